//! End-to-end: the real agent traces this test process's real io_uring requests.
//!
//! Each test starts `gds-agent run --pid <this process>`, submits an exact number of requests,
//! scrapes /metrics over HTTP and checks the counts. Needs root (CAP_BPF + CAP_PERFMON).

mod common;

use std::{
    io::Write as _,
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use common::{Agent, Metrics, PipeRead, serial};
use io_uring::{IoUring, opcode, types};

const N: usize = 200;
/// SOCKET_URING_OP_SIOCINQ (include/uapi/linux/io_uring.h): URING_CMD on a socket, 6.7+.
const SOCKET_URING_OP_SIOCINQ: u32 = 0;

fn pid() -> String {
    std::process::id().to_string()
}

/// Submits `n` SQEs built by `make` (in batches) and checks every completion with `check`.
fn submit_all(
    ring: &mut IoUring,
    n: usize,
    make: impl Fn(usize) -> io_uring::squeue::Entry,
    check: impl Fn(i32),
) {
    let mut done = 0;
    let mut next = 0;
    while done < n {
        while next < n && next - done < 16 {
            let e = make(next).user_data(next as u64);
            // SAFETY: buffers referenced by `make` outlive the completion (checked below).
            unsafe { ring.submission().push(&e).expect("sq full") };
            next += 1;
        }
        ring.submit_and_wait(1).expect("submit");
        for cqe in ring.completion() {
            check(cqe.result());
            done += 1;
        }
    }
}

fn nops(ring: &mut IoUring, n: usize) {
    submit_all(
        ring,
        n,
        |_| opcode::Nop::new().build(),
        |r| assert_eq!(r, 0),
    );
}

fn reads(ring: &mut IoUring, n: usize) {
    let mut f = tempfile::tempfile().unwrap();
    f.write_all(&vec![7u8; 64 * 1024]).unwrap();
    let fd = f.as_raw_fd();
    let mut buf = vec![0u8; 4096];
    let ptr = buf.as_mut_ptr();
    submit_all(
        ring,
        n,
        |i| {
            opcode::Read::new(types::Fd(fd), ptr, 4096)
                .offset(((i % 16) * 4096) as u64)
                .build()
        },
        |r| assert_eq!(r, 4096),
    );
}

fn socket_cmds(ring: &mut IoUring, n: usize) {
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let fd = sock.as_raw_fd();
    submit_all(
        ring,
        n,
        |_| opcode::UringCmd16::new(types::Fd(fd), SOCKET_URING_OP_SIOCINQ).build(),
        |r| assert!(r >= 0, "SIOCINQ URING_CMD failed: {r}"),
    );
}

fn assert_exact(m: &Metrics, opcode: &str, n: usize) {
    let l = [("opcode", opcode)];
    assert_eq!(
        m.value("gds_uring_requests_total", &l),
        n as f64,
        "{opcode} requests"
    );
    assert_eq!(
        m.value("gds_uring_request_duration_seconds_count", &l),
        n as f64,
        "{opcode} count"
    );
    let inf = [("opcode", opcode), ("le", "+Inf")];
    assert_eq!(
        m.value("gds_uring_request_duration_seconds_bucket", &inf),
        n as f64
    );
    assert!(
        m.value("gds_uring_request_duration_seconds_sum", &l) > 0.0,
        "{opcode} sum"
    );
    assert_eq!(m.value("gds_uring_request_errors_total", &l), 0.0);
}

fn exact_counts(attach: &str) {
    let _g = serial();
    let agent = Agent::start(&["--pid", &pid(), "--attach", attach]);
    let mut ring = IoUring::new(64).unwrap();
    nops(&mut ring, N);
    reads(&mut ring, N);
    socket_cmds(&mut ring, N);
    let m = agent.scrape();
    assert_exact(&m, "NOP", N);
    assert_exact(&m, "READ", N);
    assert_exact(&m, "URING_CMD", N);
    assert_eq!(m.value("gds_uring_inflight_requests", &[]), 0.0);
    for reason in ["inflight_full", "no_start", "ringbuf_full", "replaced"] {
        assert_eq!(
            m.value("gds_trace_dropped_total", &[("reason", reason)]),
            0.0,
            "{reason}"
        );
    }
    assert_eq!(
        m.0.iter()
            .filter(|(k, _)| k.starts_with("gds_uring_requests_total"))
            .count(),
        3,
        "only this process's three opcodes: {:?}",
        m.0.keys().collect::<Vec<_>>()
    );
    let (status, log) = agent.stop();
    assert!(status.success(), "agent exit {status}:\n{log}");
    assert!(log.contains("detached all programs"), "{log}");
}

#[test]
fn exact_counts_btf_tracepoints() {
    exact_counts("btf");
}

#[test]
fn exact_counts_classic_tracepoints() {
    exact_counts("classic");
}

#[test]
fn opcode_filter_counts_only_uring_cmd() {
    let _g = serial();
    let agent = Agent::start(&["--pid", &pid(), "--opcode", "URING_CMD"]);
    let mut ring = IoUring::new(64).unwrap();
    nops(&mut ring, N);
    socket_cmds(&mut ring, N);
    let m = agent.scrape();
    assert_exact(&m, "URING_CMD", N);
    assert_eq!(
        m.value("gds_uring_requests_total", &[("opcode", "NOP")]),
        0.0
    );
    assert_eq!(
        m.value("gds_trace_dropped_total", &[("reason", "no_start")]),
        0.0
    );
}

#[test]
fn sampled_mode_counts_every_request_times_one_in_n() {
    let _g = serial();
    let agent = Agent::start(&["--pid", &pid(), "--sample", "10"]);
    let mut ring = IoUring::new(64).unwrap();
    nops(&mut ring, 1000);
    let m = agent.scrape();
    let l = [("opcode", "NOP")];
    assert_eq!(m.value("gds_uring_requests_total", &l), 1000.0);
    // One in 10 per CPU: the tick is per CPU, so the test thread's migrations shift it a little.
    let timed = m.value("gds_uring_request_duration_seconds_count", &l);
    let cpus = std::thread::available_parallelism().unwrap().get() as f64;
    assert!(
        (100.0 - cpus..=100.0 + cpus).contains(&timed),
        "timed {timed}"
    );
    assert_eq!(
        m.value("gds_trace_dropped_total", &[("reason", "no_start")]),
        0.0
    );
}

/// A read on an empty pipe stays in flight until a write completes it, then it is reported
/// as a slow event with its context.
#[test]
fn pipe_read_is_inflight_then_slow_event() {
    let _g = serial();
    let agent = Agent::start(&["--pid", &pid(), "--slow-threshold", "200ms"]);
    let mut read = PipeRead::submit(0xfeed);

    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if agent.scrape().value("gds_uring_inflight_requests", &[]) >= 1.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "pipe read never showed as in flight"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(400));
    assert!(agent.scrape().value("gds_uring_inflight_requests", &[]) >= 1.0);
    assert_eq!(read.complete(b"hello"), (0xfeed, 5));

    let deadline = Instant::now() + Duration::from_secs(5);
    let event = loop {
        let events: serde_json::Value = serde_json::from_str(&agent.get("/debug/slow")).unwrap();
        if let Some(ev) = events
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["user_data"] == 0xfeed)
        {
            break ev.clone();
        }
        assert!(Instant::now() < deadline, "no slow event:\n{}", agent.log());
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(event["pid"], std::process::id());
    assert_eq!(event["opcode"], "READ");
    assert_eq!(event["res"], 5);
    assert!(event["latency_seconds"].as_f64().unwrap() >= 0.4, "{event}");
    assert!(!event["comm"].as_str().unwrap().is_empty());
    assert!(event["ring"].as_str().unwrap().starts_with("0x"));
    let m = agent.scrape();
    assert_eq!(m.value("gds_uring_inflight_requests", &[]), 0.0);
    assert_eq!(
        m.value("gds_slow_requests_total", &[("opcode", "READ")]),
        1.0
    );
    let (_, log) = agent.stop();
    assert!(
        log.contains("slow io_uring request") && log.contains("user_data=65261"),
        "{log}"
    );
}

/// Another program's requests (fio's io_uring engine) are counted when not filtered out.
#[test]
fn counts_an_unrelated_fio_workload() {
    let _g = serial();
    let agent = Agent::start(&["--comm", "fio"]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("fio.dat");
    let out = std::process::Command::new("fio")
        .args([
            "--name=gds",
            "--ioengine=io_uring",
            "--rw=read",
            "--bs=4k",
            "--size=4M",
        ])
        .arg(format!("--filename={}", file.display()))
        .output()
        .expect("fio is installed by cargo xtask setup");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m = agent.scrape();
    let reads = m.value("gds_uring_requests_total", &[("opcode", "READ")]);
    assert_eq!(reads, 1024.0, "4 MiB in 4 KiB reads; metrics: {:?}", m.0);
    assert_eq!(
        m.value(
            "gds_uring_request_duration_seconds_count",
            &[("opcode", "READ")]
        ),
        1024.0
    );
}

/// With a tiny in-flight capacity, every request is still accounted for:
/// submitted = timed + in flight + dropped (inflight_full), and the completions of dropped
/// requests show up as no_start.
#[test]
fn tiny_inflight_capacity_accounts_for_every_request() {
    let _g = serial();
    let agent = Agent::start(&["--pid", &pid(), "--max-inflight", "2"]);
    const K: usize = 10;
    let mut ring = IoUring::new(32).unwrap();
    let mut pipes = Vec::new();
    let mut bufs = [[0u8; 8]; K];
    for (i, buf) in bufs.iter_mut().enumerate() {
        let mut fds = [0i32; 2];
        // SAFETY: valid array for pipe(2).
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        let sqe = opcode::Read::new(types::Fd(fds[0]), buf.as_mut_ptr(), 8)
            .build()
            .user_data(i as u64);
        // SAFETY: bufs outlive the completions reaped below.
        unsafe { ring.submission().push(&sqe).unwrap() };
        pipes.push(fds);
    }
    ring.submit().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let m = agent.scrape();
    let inflight = m.value("gds_uring_inflight_requests", &[]);
    let full = m.value("gds_trace_dropped_total", &[("reason", "inflight_full")]);
    assert_eq!(
        m.value("gds_uring_requests_total", &[("opcode", "READ")]),
        K as f64
    );
    assert_eq!(
        inflight + full,
        K as f64,
        "in flight {inflight} + dropped {full}"
    );
    assert!(
        (2.0..=4.0).contains(&inflight),
        "2 slots + 2 hash entries, got {inflight}"
    );
    for fds in &pipes {
        // SAFETY: writing 1 byte from a valid buffer.
        assert_eq!(unsafe { libc::write(fds[1], b"x".as_ptr().cast(), 1) }, 1);
    }
    ring.submit_and_wait(K).unwrap();
    assert_eq!(ring.completion().count(), K);
    let m = agent.scrape();
    let l = [("opcode", "READ")];
    assert_eq!(
        m.value("gds_uring_request_duration_seconds_count", &l),
        inflight
    );
    assert_eq!(m.value("gds_uring_inflight_requests", &[]), 0.0);
    assert_eq!(
        m.value("gds_trace_dropped_total", &[("reason", "no_start")]),
        full
    );
}

/// Ring buffer overflow is accounted like every other loss: with the agent stopped (SIGSTOP)
/// its reader cannot drain the 1 MiB event ring, so of N slow requests some reach user space
/// (`gds_slow_events_total`) and the rest are `gds_trace_dropped_total{reason="ringbuf_full"}`,
/// and the two add up to `gds_slow_requests_total` = N exactly.
#[test]
fn ring_buffer_overflow_is_counted_not_lost() {
    let _g = serial();
    let agent = Agent::start(&["--pid", &pid(), "--slow-threshold", "1ns"]);
    const N: usize = 20_000;
    let agent_pid = agent.pid() as i32;
    // SAFETY: plain kill(2) on our child.
    assert_eq!(unsafe { libc::kill(agent_pid, libc::SIGSTOP) }, 0);
    let mut ring = IoUring::new(64).unwrap();
    nops(&mut ring, N);
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(agent_pid, libc::SIGCONT) }, 0);
    let l = [("opcode", "NOP")];
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let m = agent.scrape();
        let slow = m.value("gds_slow_requests_total", &l);
        let received = m.value("gds_slow_events_total", &[]);
        let full = m.value("gds_trace_dropped_total", &[("reason", "ringbuf_full")]);
        if received + full == N as f64 {
            assert_eq!(slow, N as f64, "every NOP is slower than 1 ns");
            assert_eq!(m.value("gds_uring_requests_total", &l), N as f64);
            assert!(
                full > 0.0,
                "{N} events must overflow a 1 MiB ring: {received} received"
            );
            assert!(received > 0.0, "the ring held some events");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "slow {slow} != received {received} + ringbuf_full {full}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Bug: `--pid` naming no running process started without a word. It is a warning in the log
/// and on `/debug/layers`; the filter stays (a process may get the id later), and a pid that
/// runs gets no warning.
#[test]
fn a_pid_naming_no_process_is_a_warning() {
    let pid_max: u32 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let absent = (1..pid_max)
        .rev()
        .find(|p| !std::path::Path::new(&format!("/proc/{p}")).exists())
        .unwrap();
    let agent = Agent::start(&["--pid", &absent.to_string()]);
    let want = format!("--pid {absent}: no such process now");
    let layers: serde_json::Value = serde_json::from_str(&agent.get("/debug/layers")).unwrap();
    let warnings = layers["warnings"].as_array().cloned().unwrap_or_default();
    assert!(
        warnings.iter().any(|w| w.as_str().unwrap().contains(&want)),
        "/debug/layers: {layers}"
    );
    let log = agent.log();
    assert!(
        log.lines().any(|l| l.contains("WARN") && l.contains(&want)),
        "{log}"
    );
    let (status, _) = agent.stop();
    assert!(status.success(), "{status}");

    let agent = Agent::start(&["--pid", &pid()]);
    let layers: serde_json::Value = serde_json::from_str(&agent.get("/debug/layers")).unwrap();
    assert!(layers.get("warnings").is_none(), "/debug/layers: {layers}");
    assert!(!agent.log().contains("no such process"), "{}", agent.log());
}
