//! End-to-end: a request that never completes by itself (a read on an empty pipe) is reported
//! as stalled within threshold + one scan interval, exactly once, with its context; the stall
//! ends when a write completes it.

mod common;

use std::time::{Duration, Instant};

use common::{Agent, PipeRead, serial};
use io_uring::{IoUring, opcode, types};

#[test]
fn pipe_read_stalls_once_and_ends_on_write() {
    let _g = serial();
    let agent = Agent::start(&[
        "--pid",
        &std::process::id().to_string(),
        "--stall-threshold",
        "500ms",
        "--stall-interval",
        "100ms",
    ]);
    let submitted = Instant::now();
    let mut read = PipeRead::submit(0x5a11);

    let stall = loop {
        let report: serde_json::Value = serde_json::from_str(&agent.get("/debug/stalls")).unwrap();
        if let Some(s) = report["active"].as_array().unwrap().first() {
            break s.clone();
        }
        assert!(
            submitted.elapsed() < Duration::from_secs(3),
            "no stall:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let detected_after = submitted.elapsed();
    // threshold + one interval, plus scheduling slack on a loaded 2-core machine
    assert!(
        detected_after <= Duration::from_millis(500 + 100 + 400),
        "{detected_after:?}"
    );
    assert!(
        detected_after >= Duration::from_millis(500),
        "{detected_after:?}"
    );
    assert_eq!(stall["pid"], std::process::id());
    assert_eq!(stall["opcode"], "READ");
    assert_eq!(stall["user_data"], 0x5a11);
    assert_eq!(stall["layer"], "uring");
    assert_eq!(stall["stage"], "queue");
    assert!(stall["ring"].as_str().unwrap().starts_with("0x"));
    assert!(!stall["comm"].as_str().unwrap().is_empty());

    let inflight: serde_json::Value = serde_json::from_str(&agent.get("/debug/inflight")).unwrap();
    assert!(
        inflight
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["user_data"] == 0x5a11),
        "{inflight}"
    );

    std::thread::sleep(Duration::from_millis(700)); // several more scans
    let m = agent.scrape();
    assert_eq!(m.value("gds_stalled_requests", &[("layer", "uring")]), 1.0);
    assert_eq!(
        m.value(
            "gds_stalls_total",
            &[("layer", "uring"), ("disk", "unknown")]
        ),
        1.0
    );
    assert!(m.value("gds_oldest_inflight_seconds", &[("layer", "uring")]) >= 1.0);
    assert_eq!(
        agent.log().matches("stall detected").count(),
        1,
        "{}",
        agent.log()
    );

    assert_eq!(read.complete(b"end"), (0x5a11, 3));
    let ended_at = submitted.elapsed().as_secs_f64();

    let deadline = Instant::now() + Duration::from_secs(3);
    let ended = loop {
        let report: serde_json::Value = serde_json::from_str(&agent.get("/debug/stalls")).unwrap();
        if report["active"].as_array().unwrap().is_empty() {
            if let Some(e) = report["ended"].as_array().unwrap().last() {
                break e.clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "stall never ended:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let total = ended["total_seconds"].as_f64().unwrap();
    assert!(
        total > 1.0 && total <= ended_at + 0.05,
        "total {total}, completed at {ended_at}"
    );
    std::thread::sleep(Duration::from_millis(300));
    let m = agent.scrape();
    assert_eq!(m.value("gds_stalled_requests", &[("layer", "uring")]), 0.0);
    assert_eq!(
        m.value(
            "gds_stalls_total",
            &[("layer", "uring"), ("disk", "unknown")]
        ),
        1.0
    );
    let log = agent.log();
    assert_eq!(log.matches("stall detected").count(), 1, "{log}");
    assert_eq!(log.matches("stall ended").count(), 1, "{log}");
}

/// 10,000 requests in flight at once are all tracked, reported as stalls, and scanned within
/// an interval; the test prints the scan time (the stall detector's cost).
#[test]
fn ten_thousand_inflight_requests_are_tracked_and_scanned() {
    let _g = serial();
    const K: usize = 10_000;
    let agent = Agent::start(&[
        "--pid",
        &std::process::id().to_string(),
        "--stall-threshold",
        "300ms",
        "--stall-interval",
        "200ms",
    ]);
    let mut fds = [0i32; 2];
    // SAFETY: valid array for pipe(2).
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    let mut ring: IoUring = IoUring::builder()
        .setup_cqsize(16_384)
        .build(16_384)
        .unwrap();
    let mut bufs = vec![0u8; K];
    for i in 0..K {
        let sqe = opcode::Read::new(types::Fd(fds[0]), bufs[i..].as_mut_ptr(), 1)
            .build()
            .user_data(i as u64);
        // SAFETY: bufs outlives the completions reaped below.
        unsafe { ring.submission().push(&sqe).unwrap() };
    }
    assert_eq!(ring.submit().unwrap(), K);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let m = agent.scrape();
        if m.value("gds_stalled_requests", &[("layer", "uring")]) == K as f64 {
            assert_eq!(m.value("gds_uring_inflight_requests", &[]), K as f64);
            assert_eq!(
                m.value("gds_trace_dropped_total", &[("reason", "inflight_full")]),
                0.0
            );
            let scan = m.value("gds_stall_scan_duration_seconds", &[]);
            println!("scan of {K} in-flight requests: {:.2} ms", scan * 1e3);
            assert!(
                scan > 0.0 && scan < 0.2,
                "a scan must fit in the interval: {scan}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "stalls never reached {K}:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let written = vec![b'x'; K];
    // SAFETY: writing K bytes from a valid buffer (the pipe holds 64 KiB).
    assert_eq!(
        unsafe { libc::write(fds[1], written.as_ptr().cast(), K) },
        K as isize
    );
    ring.submit_and_wait(K).unwrap();
    let mut done = 0;
    while done < K {
        done += ring.completion().count();
        if done < K {
            ring.submit_and_wait(1).unwrap();
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while agent
        .scrape()
        .value("gds_stalled_requests", &[("layer", "uring")])
        != 0.0
    {
        assert!(Instant::now() < deadline, "stalls never ended");
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = agent.log();
    assert_eq!(log.matches("stall detected").count(), K);
    assert_eq!(log.matches("stall ended").count(), K);
}
