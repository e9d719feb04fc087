//! End-to-end: a request that never completes by itself (a read on an empty pipe) is reported
//! as stalled within threshold + one scan interval, exactly once, with its context; the stall
//! ends when a write completes it.

mod common;

use std::time::{Duration, Instant};

use common::{Agent, serial};
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
    let mut fds = [0i32; 2];
    // SAFETY: valid array for pipe(2).
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    let mut ring = IoUring::new(8).unwrap();
    let mut buf = [0u8; 16];
    let sqe = opcode::Read::new(types::Fd(fds[0]), buf.as_mut_ptr(), 16)
        .build()
        .user_data(0x5a11);
    // SAFETY: buf outlives the completion reaped below.
    unsafe { ring.submission().push(&sqe).unwrap() };
    let submitted = Instant::now();
    ring.submit().unwrap();

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

    // SAFETY: writing 3 bytes from a valid buffer.
    assert_eq!(unsafe { libc::write(fds[1], b"end".as_ptr().cast(), 3) }, 3);
    ring.submit_and_wait(1).unwrap();
    assert_eq!(ring.completion().next().unwrap().result(), 3);
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
