//! The clients (`gds-agent stalls`, `top`) against hostile servers, and the agent's HTTP server
//! under many clients: bounded memory and time on the client side, bounded threads and memory
//! on the server side, and `--listen` taking the host names `--agent` takes.

mod common;

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::{Agent, free_port, require_root, serial};
use gds_api::client::{self, MAX_ANSWER_BYTES};

const BIN: &str = env!("CARGO_BIN_EXE_gds-agent");

/// A server on a free loopback port that reads each request's head and then runs `answer` on
/// the connection (a thread per connection, for as long as the test process lives).
fn hostile_server(answer: fn(TcpStream)) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    common::serve_after_head(l, answer);
    addr
}

/// Exit status, output and peak RSS (KiB, from wait4) of `cmd`, killed after `limit`.
// The child is reaped by `wait4` (for its rusage), not by `Child::wait`.
#[allow(clippy::zombie_processes)]
fn run_measured(mut cmd: Command, limit: Duration) -> (Option<i32>, String, i64, Duration) {
    let start = Instant::now();
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let killer = std::thread::spawn(move || {
        while start.elapsed() < limit {
            std::thread::sleep(Duration::from_millis(20));
            // SAFETY: signal 0 only checks that the process exists (reaped: ESRCH).
            if unsafe { libc::kill(pid, 0) } != 0 {
                return;
            }
        }
        // SAFETY: our own child, not yet reaped (the waiter below reaps it).
        unsafe { libc::kill(pid, libc::SIGKILL) };
    });
    let mut out = child.stdout.unwrap();
    let mut err = child.stderr.unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = err.read_to_string(&mut text);
        let _ = out.read_to_string(&mut text);
        text
    });
    let mut status = 0;
    // SAFETY: zeroed rusage is a valid out-parameter.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child; status and usage are valid out-parameters.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(r, pid, "wait4");
    let took = start.elapsed();
    let text = reader.join().unwrap();
    let _ = killer.join();
    let code = libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status));
    (code, text, usage.ru_maxrss, took)
}

#[test]
fn a_huge_answer_is_refused_at_the_size_limit() {
    // 8 times the limit, as fast as loopback goes: the old client buffered all of it (a 3 GiB
    // answer took `top`/`stalls` to 9.4 GB).
    let addr = hostile_server(|mut s| {
        let total: usize = 8 * MAX_ANSWER_BYTES;
        let head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n";
        if s.write_all(head).is_err() {
            return;
        }
        let block = vec![b' '; 1 << 20];
        let mut sent = 0;
        while sent < total && s.write_all(&block).is_ok() {
            sent += block.len();
        }
    });
    let mut cmd = Command::new(BIN);
    cmd.args(["stalls", "--agent", &addr.to_string()]);
    cmd.env("GDS_CLIENT_TIMEOUT", "60");
    let (code, text, rss_kib, took) = run_measured(cmd, Duration::from_secs(90));
    assert_eq!(code, Some(1), "{text}");
    let limit_mib = MAX_ANSWER_BYTES >> 20;
    assert_eq!(
        text.trim(),
        format!(
            "gds-agent: error: the agent at {addr} sent an answer of more than {limit_mib} MiB, \
             the most this client reads (is that really the agent?)"
        )
    );
    // The limit plus the binary: what was read is held once, then refused.
    let rss_mib = rss_kib / 1024;
    assert!(
        rss_mib < 2 * limit_mib as i64,
        "peak RSS {rss_mib} MiB for a {limit_mib} MiB limit"
    );
    eprintln!("refused after {took:?}, peak RSS {rss_mib} MiB");
}

#[test]
fn a_trickling_answer_is_cut_at_the_whole_answer_deadline() {
    // The head, then a byte every 300 ms: each read is quick, the answer never ends. The old
    // client's timeout was per read and waited forever.
    let addr = hostile_server(|mut s| {
        if s.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n")
            .is_err()
        {
            return;
        }
        for b in b"{\"x\": 1".iter().cycle() {
            if s.write_all(&[*b]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    });
    let mut cmd = Command::new(BIN);
    cmd.args(["stalls", "--agent", &addr.to_string()]);
    cmd.env("GDS_CLIENT_TIMEOUT", "2");
    let (code, text, _, took) = run_measured(cmd, Duration::from_secs(30));
    assert_eq!(code, Some(1), "after {took:?}: {text}");
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_millis(3500),
        "GDS_CLIENT_TIMEOUT=2 bounds the whole answer, took {took:?}: {text}"
    );
    let line = text.trim();
    let prefix =
        format!("gds-agent: error: the agent at {addr} accepted the connection but sent only ");
    assert!(
        line.starts_with(&prefix)
            && line.ends_with(" bytes of its answer within 2 s (is it stuck?)"),
        "{line}"
    );
}

#[test]
fn listen_takes_a_host_name_as_agent_does() {
    let _g = serial();
    require_root();
    let hostport = format!("localhost:{}", free_port());
    // The address `--agent localhost:PORT` (and the test's client) resolves to.
    let addr = client::parse_addr(&hostport).unwrap();
    let agent = Agent::start_reaching(addr, &["--listen", &hostport]);
    let out = Command::new(BIN)
        .args(["stalls", "--agent", &hostport])
        .output()
        .unwrap();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("active stall"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        agent.log().contains(&format!("listen={addr}")),
        "{}",
        agent.log()
    );
    let (status, log) = agent.stop();
    assert!(status.success(), "{log}");
}

/// The runtime's threads (async workers and blocking pool, all named `tokio-rt-worker`) and
/// `VmRSS` (KiB) of `pid`. Other threads (the cuFile layer's) come and go with what other
/// processes on the host map, not with HTTP clients.
fn threads_and_rss(pid: u32) -> (u64, u64) {
    let tokio = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.trim() == "tokio-rt-worker")
        .count() as u64;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    (tokio, rss)
}

#[test]
fn fifty_snapshot_clients_leave_no_threads_or_memory_behind() {
    let _g = serial();
    require_root();
    // Only this process traced: no other test's cuFile process moves the agent's memory.
    let agent = Agent::start(&["--pid", &std::process::id().to_string()]);
    let (threads_before, rss_before) = threads_and_rss(agent.pid());
    let addr = agent.addr;
    let until = Instant::now() + Duration::from_secs(8);
    let clients: Vec<_> = (0..50)
        .map(|_| {
            std::thread::spawn(move || {
                let c = client::Client {
                    peer: client::AGENT,
                    addr,
                    timeout: Duration::from_secs(60),
                };
                let mut answers = 0;
                while Instant::now() < until {
                    c.get("/debug/snapshot").unwrap();
                    answers += 1;
                }
                answers
            })
        })
        .collect();
    let mut peak_threads = 0;
    while Instant::now() < until {
        peak_threads = peak_threads.max(threads_and_rss(agent.pid()).0);
        std::thread::sleep(Duration::from_millis(200));
    }
    let answers: u32 = clients.into_iter().map(|c| c.join().unwrap()).sum();
    std::thread::sleep(Duration::from_secs(2));
    let (threads_after, rss_after) = threads_and_rss(agent.pid());
    eprintln!(
        "{answers} answers; runtime threads {threads_before} → peak {peak_threads} → \
         {threads_after}; RSS {} → {} MiB",
        rss_before / 1024,
        rss_after / 1024
    );
    assert!(answers >= 50, "{answers} answers");
    // The 2 async workers and the blocking pool's bound; before, 50 clients left 54 runtime
    // threads for good.
    let bound = 2 + gds_user::agent::MAX_BLOCKING_THREADS as u64;
    assert!(
        peak_threads <= bound && threads_after <= bound,
        "threads {threads_before} → peak {peak_threads} → {threads_after}, bound {bound}"
    );
    // Before: +16 to +45 MiB that stayed (a malloc arena per thread).
    assert!(
        rss_after < rss_before + 8 * 1024,
        "RSS {} → {} MiB",
        rss_before / 1024,
        rss_after / 1024
    );
    let (status, log) = agent.stop();
    assert!(status.success(), "{log}");
}
