//! End-to-end: a request that never completes by itself (a read on an empty pipe) is reported
//! as stalled within threshold + one scan interval, exactly once, with its context; the stall
//! ends when a write completes it.

mod common;

use std::{
    io::Write as _,
    time::{Duration, Instant},
};

use common::{Agent, PipeRead, ThrottledLoop, serial, wait_ended, wait_stall};
use io_uring::{IoUring, opcode, types};

#[test]
fn pipe_read_stalls_once_and_ends_on_write() {
    let _g = serial();
    let agent = Agent::stall_watch();
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
    // threshold + one interval, plus scheduling slack on a loaded 2-core machine (1.66 s seen
    // with other agents' tests beside it)
    assert!(
        detected_after <= Duration::from_millis(500 + 100 + 1400),
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
    // io_uring armed poll on the empty pipe: no thread waits for the read, the kernel's
    // io_uring_poll_arm says why it waits.
    assert_eq!(stall["poll_armed"], true, "{stall}");
    assert_eq!(stall["cause"]["kind"], "waiting_for_data", "{stall}");
    assert!(
        stall["cause"]["because"]
            .as_str()
            .unwrap()
            .contains("READ armed poll"),
        "{stall}"
    );
    assert_eq!(
        stall["evidence"]["threads"][0]["tid"], stall["tid"],
        "{stall}"
    );

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
    assert_eq!(m.stalled("uring"), 1.0);
    assert_eq!(
        m.value(
            "gds_stalled_requests",
            &[("layer", "uring"), ("cause", "waiting_for_data")]
        ),
        1.0,
        "the stall is counted under its cause"
    );
    assert_eq!(
        m.value(
            "gds_stalls_total",
            &[
                ("layer", "uring"),
                ("disk", "unknown"),
                ("cause", "waiting_for_data")
            ]
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
        if report["active"].as_array().unwrap().is_empty()
            && let Some(e) = report["ended"].as_array().unwrap().last()
        {
            break e.clone();
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
    assert_eq!(m.stalled("uring"), 0.0);
    assert_eq!(
        m.value(
            "gds_stalls_total",
            &[
                ("layer", "uring"),
                ("disk", "unknown"),
                ("cause", "waiting_for_data")
            ]
        ),
        1.0
    );
    let log = agent.log();
    assert_eq!(log.matches("stall detected").count(), 1, "{log}");
    assert_eq!(log.matches("stall ended").count(), 1, "{log}");
}

/// An io_uring READ on an empty pipe forced to an io-wq worker (`IOSQE_ASYNC`): the worker
/// too arms poll on a pipe rather than block in it (6.x), so the cause is the armed poll;
/// the evidence lists the submitter and the worker (`iou-wrk-<tid>`) with their kernel
/// stacks, read by the agent's evidence thread (other processes' stacks need its
/// capabilities).
#[test]
fn pipe_read_in_io_wq_is_waiting_for_data_with_the_threads_stacks() {
    let _g = serial();
    let agent = Agent::stall_watch();
    let mut read = PipeRead::submit_async(0x5a12);
    let stall = wait_stall(&agent, Duration::from_secs(3), |s| s["user_data"] == 0x5a12);
    assert_eq!(stall["cause"]["kind"], "waiting_for_data", "{stall}");
    let threads = stall["evidence"]["threads"].as_array().unwrap();
    let submitter = stall["tid"].as_u64().unwrap();
    assert_eq!(threads[0]["tid"], submitter, "the submitter first: {stall}");
    let worker = threads
        .iter()
        .find(|t| t["comm"] == format!("iou-wrk-{submitter}").as_str())
        .unwrap_or_else(|| panic!("no io-wq worker: {stall}"));
    assert!(
        stack_of(worker)
            .iter()
            .any(|f| f.starts_with("io_wq_worker+")),
        "the worker's symbolized stack: {worker}"
    );
    // The submitter is this test's thread, polling /debug/stalls: caught running, it has no
    // kernel stack to show (seen on a loaded machine); asleep, it has one.
    assert!(
        threads[0]["state"] == "R" || !stack_of(&threads[0]).is_empty(),
        "the submitter's stack: {stall}"
    );
    // What one capture costs: its time, and the memory a stall keeps for it (its JSON).
    let kept = stall["evidence"].to_string().len();
    println!(
        "io_uring stall evidence (2 threads) captured in {} µs, {kept} bytes kept",
        stall["evidence"]["capture_us"]
    );
    assert!(kept < 64 << 10, "one capture keeps {kept} bytes");
    let log = agent.log();
    assert!(
        log.lines()
            .any(|l| l.contains("stall detected") && l.contains("cause=waiting_for_data")),
        "{log}"
    );
    assert_eq!(read.complete(b"x"), (0x5a12, 1));
    let ended = wait_ended(&agent, Duration::from_secs(3), |s| s["user_data"] == 0x5a12);
    assert_eq!(
        ended["cause"]["kind"], "waiting_for_data",
        "kept when it ends: {ended}"
    );
}

/// The kernel frames of a thread of a stall's evidence.
fn stack_of(thread: &serde_json::Value) -> Vec<String> {
    thread["stack"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|f| f.as_str().unwrap_or("").to_owned())
                .collect()
        })
        .unwrap_or_default()
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
        if m.stalled("uring") == K as f64 {
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
    while agent.scrape().stalled("uring") != 0.0 {
        assert!(Instant::now() < deadline, "stalls never ended");
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = agent.log();
    assert_eq!(log.matches("stall detected").count(), K);
    assert_eq!(log.matches("stall ended").count(), K);
}

/// Reads in a blkio group throttled to 1 read/s: the ones held past the threshold are stalls
/// of cause `throttled`, naming the group and its limit (`riops=1`), each reported ended.
#[test]
fn reads_throttled_to_one_read_a_second_are_throttled_naming_the_limit() {
    let _g = serial();
    let Some(lo) = ThrottledLoop::new_iops(1) else {
        return;
    };
    let agent = Agent::stall_watch();
    // Three 4 KiB reads at once: the throttle lets one a second through.
    let readers: Vec<_> = (0..3u64).map(|i| lo.read(i << 20, 4096)).collect();
    let name = lo.name().to_owned();
    let ours = |s: &serde_json::Value| s["layer"] == "block" && s["disk"] == name.as_str();
    let stall = wait_stall(&agent, Duration::from_secs(5), ours);
    let group = lo.cgroup.file_name().unwrap().to_str().unwrap();
    assert_eq!(stall["cause"]["kind"], "throttled", "{stall}");
    let because = stall["cause"]["because"].as_str().unwrap();
    assert_eq!(
        because,
        format!(
            "cgroup /{group} (v1) blkio.throttle.read_iops_device {} riops=1",
            stall["evidence"]["limits"][0]["device"].as_str().unwrap()
        ),
        "{stall}"
    );
    for (_, r) in readers {
        let (n, _) = r.join().unwrap();
        assert_eq!(n, 4096);
    }
    // Every stall of ours ends, still throttled, once the reads returned.
    let ended = wait_ended(&agent, Duration::from_secs(3), ours);
    assert_eq!(ended["cause"]["kind"], "throttled", "{ended}");
    assert!(ended["total_seconds"].as_f64().unwrap() >= 0.5, "{ended}");
}

/// A plain O_DIRECT `pread` (no io_uring) held past the threshold is a stall of layer `block`
/// naming the disk, the sector, the reading thread's process, thread, name and cgroup; it is
/// reported ended once the read returns, and counted in `gds_stalls_total{layer="block"}`.
#[test]
fn held_block_request_is_a_block_stall_naming_its_reader() {
    let _g = serial();
    let Some(lo) = ThrottledLoop::new(64 << 10) else {
        return;
    };
    let agent = Agent::stall_watch();
    const OFFSET: u64 = 1 << 20;
    const LEN: usize = 128 << 10;
    let (tid, reader) = lo.read(OFFSET, LEN);
    let name = lo.name().to_owned();
    let ours = |s: &serde_json::Value| s["layer"] == "block" && s["disk"] == name.as_str();
    let stall = wait_stall(&agent, Duration::from_secs(5), ours);
    assert_eq!(stall["sector"], OFFSET / 512, "{stall}");
    assert_eq!(stall["bytes"], LEN, "{stall}");
    assert_eq!(stall["opcode"], "read", "{stall}");
    assert_eq!(stall["pid"], std::process::id(), "{stall}");
    assert_eq!(stall["tid"], tid, "{stall}");
    assert_eq!(stall["comm"], "gds-stall-rd", "{stall}");
    assert_eq!(stall["stage"], "device", "{stall}");
    let group = lo.cgroup.file_name().unwrap().to_str().unwrap();
    assert_eq!(
        stall["cgroup"]["path"],
        format!("/{group}"),
        "the reader's blkio group: {stall}"
    );
    assert!(stall["age_seconds"].as_f64().unwrap() >= 0.5, "{stall}");
    // Throttled, naming the group, the file and the limit on the disk under the loop device.
    let cause = &stall["cause"];
    assert_eq!(cause["kind"], "throttled", "{stall}");
    let because = cause["because"].as_str().unwrap();
    assert!(
        because.contains(&format!(
            "cgroup /{group} (v1) blkio.throttle.read_bps_device"
        )) && because.ends_with(&format!("rbps={}", 64 << 10)),
        "{because}"
    );
    let ev = &stall["evidence"];
    assert_eq!(ev["limits"][0]["value"], 64 << 10, "{stall}");
    assert_eq!(ev["disk"]["disk"], name.as_str(), "{stall}");
    assert!(
        ev["disk"]["inflight_reads"].as_u64().unwrap() >= 1,
        "{stall}"
    );
    assert!(ev["disk"]["scheduler"].is_string(), "{stall}");
    assert!(ev["disk"]["nr_requests"].as_u64().unwrap() >= 1, "{stall}");
    assert_eq!(ev["threads"][0]["tid"], tid, "{stall}");
    assert_eq!(ev["threads"][0]["state"], "D", "in the read: {stall}");
    // `gds-agent stalls` prints the cause under the stall, and with --evidence what it rests on.
    let printed = stalls_cli(&agent, &[]);
    let row = printed
        .lines()
        .position(|l| l.starts_with("STALLED") && l.contains(&name))
        .unwrap_or_else(|| panic!("no row for {name}:\n{printed}"));
    let cause_line = printed.lines().nth(row + 1).unwrap().trim();
    assert_eq!(
        cause_line,
        format!("cause throttled: {because}"),
        "{printed}"
    );
    assert!(
        !printed.contains("threads:"),
        "evidence only when asked: {printed}"
    );
    let printed = stalls_cli(&agent, &["--evidence"]);
    for want in [
        format!("cause throttled: {because}"),
        "threads:".into(),
        format!("tid {tid} gds-stall-rd  state D"),
        "device:".into(),
        format!("{name} ("),
        "cgroups and limits:".into(),
        format!("limit: {because}"),
        "missing:".into(),
    ] {
        assert!(printed.contains(&want), "{want:?} missing from:\n{printed}");
    }
    let us = ev["capture_us"].as_u64().unwrap();
    println!("block stall evidence captured in {us} µs");
    assert!(
        us > 0 && us < 100_000,
        "a capture is a few small reads: {us} µs"
    );
    let (n, took) = reader.join().unwrap();
    assert_eq!(n, LEN as isize);
    assert!(took >= Duration::from_millis(600), "not held: {took:?}");
    let ended = wait_ended(&agent, Duration::from_secs(3), ours);
    let total = ended["total_seconds"].as_f64().unwrap();
    assert!(
        total >= 0.5 && total <= took.as_secs_f64() + 0.3,
        "total {total}, read took {took:?}"
    );
    let m = agent.scrape();
    assert_eq!(
        m.value(
            "gds_stalls_total",
            &[("layer", "block"), ("disk", &name), ("cause", "throttled")]
        ),
        1.0
    );
    assert_eq!(m.stalled("block"), 0.0);
    let log = agent.log();
    let logged = |what: &str| {
        log.lines()
            .filter(|l| l.contains(what) && l.contains(&name))
            .count()
    };
    assert_eq!(logged("stall detected"), 1, "{log}");
    assert!(
        log.lines()
            .any(|l| l.contains("stall detected") && l.contains("cause=throttled")),
        "the log line names the cause: {log}"
    );
    assert_eq!(logged("stall ended"), 1, "{log}");
}

/// A cuFile call held past the threshold is a stall of layer `cufile` naming the process, the
/// call and its file; it ends when the call returns. The stand-in library's `cuFileRead` on a
/// pipe waits for the writer, so the test holds the call as long as it wants.
#[test]
fn held_cufile_call_is_a_cufile_stall_and_ends() {
    common::require_root();
    let _lock = common::cufile_lock();
    let dir = tempfile::tempdir().unwrap();
    let (lib, driver) = common::build_standin(dir.path());
    // Its own name, for `--comm`: the agent then reports this process's calls only.
    const COMM: &str = "gds-stall-cuf";
    let named = dir.path().join(COMM);
    std::fs::copy(&driver, &named).unwrap();
    let fifo = dir.path().join("held");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    // Read and write: opening it does not wait for a reader, and the driver's read-only open
    // then finds a writer.
    let mut writer = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&fifo)
        .unwrap();
    let agent = Agent::start(&[
        "--comm",
        COMM,
        "--stall-threshold",
        "500ms",
        "--stall-interval",
        "100ms",
    ]);
    // Root without capabilities: the agent, which dropped its own after attaching, may read
    // `/proc/PID/fd` of a process of its uid holding no capability it lacks (ptrace access
    // rules), which is how it names the file.
    let mut app = common::LineChild::spawn(
        &[
            "setpriv".into(),
            "--inh-caps=-all".into(),
            "--bounding-set=-all".into(),
            named.display().to_string(),
            lib.display().to_string(),
        ],
        dir.path(),
    );
    let pid = app.cmd_pid("load");
    common::within(Duration::from_secs(5), "library attached", &agent, || {
        let r: serde_json::Value = serde_json::from_str(&agent.get("/debug/cufile")).unwrap();
        r["libraries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["pids"].as_array().unwrap().iter().any(|p| *p == pid))
    });
    // One call done on a regular file first: the stall's evidence then says which path the
    // process's I/O takes.
    let data = dir.path().join("data");
    std::fs::write(&data, vec![1u8; 8192]).unwrap();
    assert!(
        app.cmd(&format!("open {}", data.display()))
            .starts_with("opened ")
    );
    assert_eq!(app.cmd("read 1 4096"), "read 1 4096");
    let fd = app.cmd(&format!("open {}", fifo.display()));
    assert!(fd.starts_with("opened "), "{fd}");
    let held = Instant::now();
    app.send("read 1 4096");
    let ours = |s: &serde_json::Value| s["layer"] == "cufile" && s["pid"] == pid;
    let stall = wait_stall(&agent, Duration::from_secs(5), ours);
    assert!(held.elapsed() >= Duration::from_millis(500));
    assert_eq!(stall["opcode"], "read", "{stall}");
    assert_eq!(stall["comm"], COMM, "{stall}");
    assert_eq!(stall["file"], fifo.to_str().unwrap(), "{stall}");
    assert_eq!(stall["bytes"], 4096, "{stall}");
    assert!(stall["age_seconds"].as_f64().unwrap() >= 0.5, "{stall}");
    // The calling thread blocks in the FIFO's read: its kernel stack shows the pipe wait.
    assert_eq!(stall["cause"]["kind"], "waiting_for_data", "{stall}");
    let caller = &stall["evidence"]["threads"][0];
    assert!(
        stack_of(caller).iter().any(|f| f.contains("pipe_read")),
        "the stack shows the pipe wait: {caller}"
    );
    assert!(
        stall["cause"]["because"]
            .as_str()
            .unwrap()
            .contains("waits for a pipe"),
        "{stall}"
    );
    // The cuFile layer's view of the process: its one earlier call's path (the FIFO has none
    // yet, so the path is the process's) and no other call in flight.
    let cf = &stall["evidence"]["cufile"];
    let calls = cf["process_path_calls"]
        .as_object()
        .expect("cuFile evidence");
    assert_eq!(
        calls.values().filter_map(|v| v.as_u64()).sum::<u64>(),
        1,
        "{cf}"
    );
    assert_eq!(
        calls.get(cf["path"].as_str().unwrap()),
        Some(&1.into()),
        "{cf}"
    );
    assert_eq!(cf["path_of_file"], false, "{cf}");
    assert_eq!(cf["other_calls_total"], 0, "{cf}");
    std::thread::sleep(Duration::from_millis(300));
    let m = agent.scrape();
    assert_eq!(m.stalled("cufile"), 1.0);
    assert!(m.value("gds_oldest_inflight_seconds", &[("layer", "cufile")]) >= 0.5);

    writer.write_all(&[7u8; 4096]).unwrap();
    assert_eq!(app.answer("read 1 4096"), "read 1 4096");
    let returned = held.elapsed().as_secs_f64();
    let ended = wait_ended(&agent, Duration::from_secs(3), ours);
    let total = ended["total_seconds"].as_f64().unwrap();
    assert!(
        total >= 0.8 && total <= returned + 0.3,
        "total {total}, returned after {returned}"
    );
    let m = agent.scrape();
    assert_eq!(stalls_total(&m, "cufile", "unknown"), 1.0);
    assert_eq!(m.stalled("cufile"), 0.0);
    app.exit();
}

/// What `gds-agent stalls --agent <agent> <args>` prints (it must succeed).
fn stalls_cli(agent: &Agent, args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gds-agent"))
        .args(["stalls", "--agent", &agent.addr.to_string()])
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "gds-agent stalls {args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// `gds_stalls_total` of one layer and disk over every cause.
fn stalls_total(m: &common::Metrics, layer: &str, disk: &str) -> f64 {
    gds_api::model::CauseKind::ALL
        .iter()
        .map(|c| {
            m.value(
                "gds_stalls_total",
                &[("layer", layer), ("disk", disk), ("cause", c.label())],
            )
        })
        .sum()
}
