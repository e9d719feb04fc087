//! `/debug/snapshot` and the model behind every view, on a real agent under real io_uring load:
//! the snapshot decodes into the model's own types and agrees with `/metrics`; in-flight
//! requests read under load have true ages and appear once; `--listen :0` says its port.

mod common;

use std::{
    collections::HashMap,
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use common::{Agent, PipeRead, require_root, serial};
use gds_api::model::{Layer, Request, Snapshot, Stage};
use gds_api::raw::LayerDetail;
use io_uring::{IoUring, opcode, types};

fn snapshot(agent: &Agent) -> Snapshot {
    let body = agent.get("/debug/snapshot");
    serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("/debug/snapshot does not decode into model::Snapshot: {e}"))
}

/// io_uring reads of pipes in a tight loop: 8 reads in flight, each completed by a write a few
/// microseconds after its submission and submitted again with the same user_data, so the
/// in-flight table changes all the time while the agent reads it (what fio at iodepth 16
/// does to it, at a higher rate).
fn churn(stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        const N: usize = 8;
        let mut ring = IoUring::new(16).unwrap();
        let mut pipes = [[0i32; 2]; N];
        for p in &mut pipes {
            // SAFETY: valid array for pipe(2).
            assert_eq!(unsafe { libc::pipe(p.as_mut_ptr()) }, 0);
        }
        let mut bufs = [[0u8; 8]; N];
        let mut rounds = 0u64;
        while !stop.load(Ordering::Relaxed) {
            for (i, (p, b)) in pipes.iter().zip(bufs.iter_mut()).enumerate() {
                let sqe = opcode::Read::new(types::Fd(p[0]), b.as_mut_ptr(), 1)
                    .build()
                    .user_data(0x5000 + i as u64);
                // SAFETY: the buffers outlive the completions reaped below.
                unsafe { ring.submission().push(&sqe).unwrap() };
            }
            ring.submit().unwrap();
            for p in &pipes {
                // SAFETY: writing one byte to our own pipe.
                unsafe { libc::write(p[1], b"x".as_ptr().cast(), 1) };
            }
            ring.submit_and_wait(N).unwrap();
            let done = ring.completion().count();
            assert_eq!(done, N);
            rounds += 1;
        }
        for p in pipes {
            // SAFETY: closing our own descriptors.
            unsafe {
                libc::close(p[0]);
                libc::close(p[1]);
            }
        }
        rounds
    })
}

fn churn_rows(rows: &[Request], pid: u32) -> Vec<&Request> {
    rows.iter()
        .filter(|r| {
            r.ctx.pid == pid
                && r.origin
                    .as_ref()
                    .is_some_and(|o| (0x5000..0x5008).contains(&o.user_data))
        })
        .collect()
}

/// Bug: `top` showed every in-flight READ with AGE 0µs under fio: the scan's time was taken
/// before the tables were read, so requests submitted during the read were "younger than the
/// scan". And some rows showed twice: a request that completed during the scan and was
/// resubmitted with the same user_data into a slot read later.
#[test]
fn inflight_under_churn_has_true_ages_and_no_request_twice() {
    let _g = serial();
    require_root();
    let pid = std::process::id();
    let agent = Agent::start(&["--pid", &pid.to_string()]);
    let stop = Arc::new(AtomicBool::new(false));
    let worker = churn(stop.clone());
    let (mut seen, mut zero, mut twice, mut polls) = (0usize, 0usize, 0usize, 0usize);
    let deadline = Instant::now() + Duration::from_secs(4);
    while Instant::now() < deadline && (seen < 200 || polls < 50) {
        let rows: Vec<Request> = serde_json::from_str(&agent.get("/debug/inflight")).unwrap();
        polls += 1;
        let mine = churn_rows(&rows, pid);
        seen += mine.len();
        zero += mine.iter().filter(|r| r.age_seconds <= 0.0).count();
        let mut by_ud: HashMap<u64, usize> = HashMap::new();
        for r in &mine {
            *by_ud
                .entry(r.origin.as_ref().map_or(0, |o| o.user_data))
                .or_default() += 1;
        }
        twice += by_ud.values().filter(|n| **n > 1).count();
        assert!(
            mine.len() <= 8,
            "{} rows for 8 requests: {mine:?}",
            mine.len()
        );
    }
    stop.store(true, Ordering::Relaxed);
    let rounds = worker.join().unwrap();
    assert!(
        seen >= 20,
        "only {seen} of our requests seen in flight in {polls} reads ({rounds} rounds)"
    );
    assert_eq!(
        zero, 0,
        "{zero} of {seen} in-flight rows had age 0 ({polls} reads, {rounds} rounds)"
    );
    assert_eq!(
        twice, 0,
        "a user_data showed twice in {twice} reads of {polls} ({seen} rows)"
    );
}

/// `/debug/snapshot` decodes into the model's types and agrees with `/metrics` on a real agent
/// under load: per-opcode counts, drops, requests in flight and stalls.
#[test]
fn snapshot_decodes_and_agrees_with_metrics_under_load() {
    let _g = serial();
    require_root();
    let pid = std::process::id();
    let agent = Agent::start(&[
        "--pid",
        &pid.to_string(),
        "--stall-threshold",
        "300ms",
        "--stall-interval",
        "50ms",
    ]);
    // Three reads held in flight (stalls once older than 300 ms), and churn beside them.
    let mut held: Vec<PipeRead> = (0..3).map(|i| PipeRead::submit(0x7700 + i)).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let worker = churn(stop.clone());
    // Under load: every snapshot decodes; the held reads are there with their context.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut reads = 0;
    loop {
        let s = snapshot(&agent);
        reads += 1;
        let held_rows: Vec<&Request> = s
            .inflight
            .iter()
            .filter(|r| {
                r.origin
                    .as_ref()
                    .is_some_and(|o| (0x7700..0x7703).contains(&o.user_data))
            })
            .collect();
        assert_eq!(
            held_rows.len(),
            3,
            "held reads in the snapshot: {held_rows:?}"
        );
        for r in &held_rows {
            assert_eq!(
                (r.ctx.pid, r.opcode.as_str(), r.stage),
                (pid, "READ", Stage::Queue)
            );
            assert!(r.age_seconds > 0.0 && !r.ctx.comm.is_empty(), "{r:?}");
        }
        if s.stalls.active.len() == 3 || Instant::now() > deadline {
            assert_eq!(s.stalls.active.len(), 3, "stalls: {:?}", s.stalls);
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    worker.join().unwrap();
    // Quiet now (only the three held reads): the snapshot and /metrics must say the same.
    std::thread::sleep(Duration::from_millis(200));
    let s = snapshot(&agent);
    let m = agent.scrape();
    assert_eq!(s.inflight_total, 3, "{:?}", s.inflight);
    assert_eq!(
        s.stats.inflight as f64,
        m.value("gds_uring_inflight_requests", &[])
    );
    assert_eq!(s.stalls.active.len() as f64, m.stalled("uring"));
    assert!(!s.stats.opcodes.is_empty());
    for o in &s.stats.opcodes {
        let l = [("opcode", o.opcode.as_str())];
        assert_eq!(
            o.submitted as f64,
            m.value("gds_uring_requests_total", &l),
            "{}",
            o.opcode
        );
        assert_eq!(
            o.errors as f64,
            m.value("gds_uring_request_errors_total", &l)
        );
        assert_eq!(
            o.latency.count as f64,
            m.value("gds_uring_request_duration_seconds_count", &l)
        );
    }
    for d in &s.stats.drops {
        assert_eq!(
            d.count as f64,
            m.value("gds_trace_dropped_total", &[("reason", &d.reason)]),
            "{}",
            d.reason
        );
    }
    assert!(s.layers.is_on(Layer::Uring), "{:?}", s.layers);
    // Every layer has its one entry, in the order the tracer attaches them.
    let listed: Vec<Layer> = s.layers.layers.iter().map(|e| e.layer).collect();
    assert_eq!(listed, Layer::ALL, "{:?}", s.layers);
    // Each says why, and NVMe and cuFile say what only they know, on or off.
    for e in &s.layers.layers {
        assert!(!e.why.is_empty(), "{e:?}");
    }
    let detail = |l| s.layers.get(l).and_then(|e| e.detail.clone());
    assert!(
        matches!(detail(Layer::Nvme), Some(LayerDetail::Nvme { .. })),
        "{:?}",
        s.layers
    );
    assert!(
        matches!(detail(Layer::Cufile), Some(LayerDetail::Cufile { .. })),
        "{:?}",
        s.layers
    );
    assert!(reads > 1);
    for h in &mut held {
        h.complete(b"x");
    }
}

/// Bug: `run --listen 127.0.0.1:0` logged "serving http://127.0.0.1:0/metrics" instead of the
/// port it bound.
#[test]
fn listen_on_port_zero_logs_the_port_it_bound() {
    let _g = serial();
    require_root();
    let mut child = Command::new(env!("CARGO_BIN_EXE_gds-agent"))
        .args(["run", "--listen", "127.0.0.1:0", "--pid", "1"])
        .env("GDS_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut log = Vec::new();
    let serving = loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                if line.contains("serving http://") {
                    break line;
                }
                log.push(line);
            }
            Err(_) if Instant::now() > deadline => {
                let _ = child.kill();
                panic!("no 'serving' line in 30 s:\n{}", log.join("\n"));
            }
            Err(_) => {}
        }
    };
    let url = serving
        .split("serving http://")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .unwrap();
    let addr: std::net::SocketAddr = url.parse().unwrap();
    let got = (addr.port() != 0).then(|| common::http_get(addr, "/metrics"));
    // Stopped before any assertion: a failing check must not leave the agent running.
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
    assert_ne!(addr.port(), 0, "the log names port 0: {serving}");
    assert!(
        got.as_ref().is_some_and(Result::is_ok),
        "nothing serves at the logged {addr}: {got:?}"
    );
}
