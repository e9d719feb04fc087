//! `top`'s rates under load: fio (io_uring, rate-limited so its rate is known) traced by a real
//! agent while 50 clients loop on `/debug/snapshot`; rates computed exactly as `top` computes
//! them (`top::read_snapshot` and `top::model::View::compute`) from consecutive snapshots agree
//! with fio's own within 5 %.
//!
//! The bug (issue 21, item 9): a snapshot's time was taken after the statistics *and* the
//! cuFile collection; with 50 collections running at once on 2 cores that was up to 5.55 s
//! after the counters were read, and `top` showed 27k–101k IOPS while fio ran at 50–55k.

mod common;

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use common::{Agent, http_get, require_root, serial};
use gds_host::clock::monotonic_ns;
use gds_user::top::{model::View, read_snapshot};

/// fio's rate limit: well below what fio reaches here (~50k IOPS on page-cache reads on this
/// 2-core VM), so fio keeps it steadily even while the clients and the agent take CPU.
const FIO_IOPS: u64 = 20_000;
/// Clients looping on `/debug/snapshot` (the load).
const CLIENTS: usize = 50;
/// How far apart the measuring client takes its snapshots: `top`'s default `--interval`.
const INTERVAL: Duration = Duration::from_secs(1);
/// Rates measured (pairs of consecutive snapshots).
const PAIRS: usize = 12;
/// fio is not steady on this VM at every instant: even at real-time priority its own 100 ms
/// log shows stalls of up to ~150 ms (the vCPU taken by the host), caught up in a burst right
/// after, which moves a 1 s window's true rate by 15 %. A window where any of fio's 100 ms
/// samples, from `FIO_LOG_MARGIN` before to after it, is this far off fio's rate is not one
/// where fio's rate is known; it is left out (and shown).
const FIO_UNSTEADY: f64 = 0.10;
/// How far around a window fio's samples are checked: fio's log counts from its job start,
/// which follows the spawn the test times by tens of ms.
const FIO_LOG_MARGIN: Duration = Duration::from_millis(300);
/// Windows where fio kept its rate needed at least: on a machine this loaded, fewer say more
/// about the machine than about `top`.
const STEADY_MIN: usize = PAIRS / 2;
/// The agreement asked for.
const TOLERANCE: f64 = 0.05;

/// `fio` on PATH, resolved (the test runs it under another name).
fn fio() -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("fio"))
            .find(|p| p.is_file())
    });
    found.expect("fio is not on PATH: `cargo xtask setup` installs it (apt-get install fio)")
}

/// Bug: `top`'s IOPS ranged 27k–101k for fio's steady 50–55k under 50 snapshot clients.
#[test]
fn top_iops_agree_with_fio_under_fifty_snapshot_clients() {
    let _g = serial();
    require_root();
    let dir = tempfile::tempdir().unwrap();
    // fio under a name of its own, so only this fio is traced (`--comm`), not another test's.
    let name = format!("fiotop{}", std::process::id() % 1_000_000);
    let exe = dir.path().join(&name);
    std::os::unix::fs::symlink(fio(), &exe).unwrap();
    let data = dir.path().join("data");
    std::fs::write(&data, vec![7u8; 16 << 20]).unwrap();

    let agent = Agent::start(&["--comm", &name]);
    let addr = agent.addr;

    let stop = Arc::new(AtomicBool::new(false));
    let answers = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (stop, answers) = (stop.clone(), answers.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let body = http_get(addr, "/debug/snapshot").expect("/debug/snapshot");
                    assert!(body.starts_with('{'), "{body}");
                    answers.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();

    // Room for the start (agent, fio's first reads) and for slow answers under load (fio is
    // stopped as soon as the windows are measured).
    let runtime = Duration::from_secs(10) + INTERVAL * (PAIRS as u32 * 2);
    let iops_log = dir.path().join("fio");
    let mut fio = Command::new(&exe);
    // Real-time priority: with 50 clients and the agent on 2 cores, a fio descheduled for
    // 100 ms falls behind its rate and then catches up in a burst (23.4k IOPS in one 1.5 s
    // window for a 20k limit, as top rightly showed); fio needs ~1/4 of a core, so it never
    // waits and runs at its limit in every window. What varies then is only `top`'s clock.
    // SAFETY: sched_setscheduler on the child itself, between fork and exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut fio, || {
            let param = libc::sched_param { sched_priority: 10 };
            if libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let fio = fio
        .args([
            "--name=rates",
            "--ioengine=io_uring",
            "--rw=randread",
            "--bs=4k",
            "--iodepth=4",
            "--time_based",
            "--output-format=json",
        ])
        .arg(format!("--rate_iops={FIO_IOPS}"))
        // fio's own IOPS per 100 ms, to tell fio's stalls from `top`'s errors on failure.
        .arg(format!("--write_iops_log={}", iops_log.display()))
        .arg("--log_avg_msec=100")
        .arg(format!("--runtime={}ms", runtime.as_millis()))
        .arg(format!("--filename={}", data.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let fio_start_ns = monotonic_ns();

    // Wait for fio's reads to show, then 1 s more for its start, then measure as top does.
    let reads = |v: &View| v.opcodes.iter().find(|r| r.key == "READ").map(|r| r.iops);
    let mut prev = read_snapshot(addr).unwrap();
    loop {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "fio's reads never showed: {:?}\n{}",
            prev.stats.opcodes,
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(200));
        let cur = read_snapshot(addr).unwrap();
        let seen = cur.stats.opcodes.iter().any(|o| o.opcode == "READ");
        prev = cur;
        if seen {
            break;
        }
    }
    std::thread::sleep(Duration::from_secs(1));
    prev = read_snapshot(addr).unwrap();
    // (from, to) in fio's log time (ms since its start) and top's READ IOPS, per window.
    let mut windows: Vec<(f64, f64, f64)> = Vec::new();
    let fio_ms = |taken_ns: u64| taken_ns.saturating_sub(fio_start_ns) as f64 / 1e6;
    while windows.len() < PAIRS {
        std::thread::sleep(INTERVAL);
        let cur = read_snapshot(addr).unwrap();
        let v = View::compute(&prev, &cur);
        let rate = reads(&v).unwrap_or(0.0);
        windows.push((fio_ms(prev.taken_ns), fio_ms(cur.taken_ns), rate));
        prev = cur;
    }
    let measured_by = started.elapsed();
    // Done measuring: fio stops on SIGINT and reports on the time it ran.
    // SAFETY: signalling our own child.
    unsafe { libc::kill(fio.id() as i32, libc::SIGINT) };
    let out = fio.wait_with_output().unwrap();
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    // Interrupted, fio exits 128 after "fio: terminating on signal 2" and its report.
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        matches!(out.status.code(), Some(0 | 128)),
        "fio: {}{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        measured_by < runtime,
        "measured until {measured_by:?}, past fio's {runtime:?}: the windows are not all fio's"
    );
    let json = stdout.find('{').map_or("", |i| &stdout[i..]);
    let report: serde_json::Value =
        serde_json::from_str(json).unwrap_or_else(|e| panic!("fio's JSON: {e}\n{stdout}"));
    let fio_iops = report["jobs"][0]["read"]["iops"].as_f64().unwrap();
    // fio's own IOPS per 100 ms: (ms since its start, IOPS).
    let samples: Vec<(f64, f64)> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("fio_iops"))
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .collect::<String>()
        .lines()
        .filter_map(|l| {
            let mut f = l.split(',').map(|v| v.trim().parse::<f64>());
            Some((f.next()?.ok()?, f.next()?.ok()?))
        })
        .collect();
    assert!(!samples.is_empty(), "fio wrote no IOPS log");
    let margin = FIO_LOG_MARGIN.as_secs_f64() * 1e3;
    let steady = |from: f64, to: f64| {
        samples
            .iter()
            .filter(|(t, _)| *t >= from - margin && *t <= to + margin)
            .all(|(_, iops)| (iops - fio_iops).abs() <= FIO_UNSTEADY * fio_iops)
    };
    let rates: Vec<f64> = windows.iter().map(|w| w.2).collect();
    let (kept, unsteady): (Vec<&(f64, f64, f64)>, Vec<_>) =
        windows.iter().partition(|w| steady(w.0, w.1));
    let answered = answers.load(Ordering::Relaxed);
    eprintln!(
        "fio: {fio_iops:.0} IOPS (limit {FIO_IOPS}); top: {rates:.0?}; {} windows left out \
         where fio itself was off its rate; {answered} snapshots answered to {CLIENTS} clients",
        unsteady.len()
    );
    // fio itself kept its rate: otherwise this machine, not `top`, is what is measured.
    assert!(
        (fio_iops - FIO_IOPS as f64).abs() < TOLERANCE * FIO_IOPS as f64,
        "fio ran at {fio_iops:.0} IOPS, not its limit {FIO_IOPS}: the machine is too loaded \
         for this measurement"
    );
    assert!(
        answered >= CLIENTS as u64,
        "the clients got {answered} snapshots"
    );
    assert!(
        kept.len() >= STEADY_MIN,
        "fio kept its rate in only {} of {PAIRS} windows (its samples: {samples:?}): the \
         machine is too loaded for this measurement",
        kept.len()
    );
    let off: Vec<&(f64, f64, f64)> = kept
        .iter()
        .copied()
        .filter(|w| (w.2 - fio_iops).abs() > TOLERANCE * fio_iops)
        .collect();
    assert!(
        off.is_empty(),
        "top's READ IOPS more than 5 % off fio's {fio_iops:.0} in windows where fio kept its \
         rate ((from, to) ms of fio's run, IOPS): {off:.0?} (all: {windows:.0?})"
    );
}
