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
use gds_user::top::{model::View, read_snapshot};

/// fio's rate limit: well below what fio reaches here (~50k IOPS on page-cache reads on this
/// 2-core VM), so fio keeps it steadily even while the clients and the agent take CPU.
const FIO_IOPS: u64 = 20_000;
/// Clients looping on `/debug/snapshot` (the load).
const CLIENTS: usize = 50;
/// How far apart the measuring client takes its snapshots (`top --interval`). fio itself is
/// not steady to 5 % over short windows on this VM: its own 100 ms log showed stalls of up to
/// ~150 ms of I/O (the vCPU stolen by the host, even at real-time priority), caught up in a
/// burst right after, which moved a 1.5 s window's true rate by 5 %; over 4 s such a stall
/// is under 4 %.
const INTERVAL: Duration = Duration::from_secs(4);
/// Rates measured (pairs of consecutive snapshots).
const PAIRS: usize = 5;
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

    // Room for the start (agent, fio's first reads) and for slow answers under load.
    let runtime = Duration::from_secs(8) + INTERVAL * (PAIRS as u32 + 2);
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
    let mut rates = Vec::new();
    while rates.len() < PAIRS {
        std::thread::sleep(INTERVAL);
        let cur = read_snapshot(addr).unwrap();
        let v = View::compute(&prev, &cur);
        rates.push(reads(&v).unwrap_or(0.0));
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
    let answered = answers.load(Ordering::Relaxed);
    eprintln!(
        "fio: {fio_iops:.0} IOPS (limit {FIO_IOPS}); top: {rates:.0?}; {answered} snapshots \
         answered to {CLIENTS} clients"
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
    // fio's 100 ms samples a quarter off its rate: its own stalls and catch-up bursts.
    let fio_log = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("fio_iops"))
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .collect::<String>();
    let stalls: Vec<&str> = fio_log
        .lines()
        .filter(|l| {
            l.split(',')
                .nth(1)
                .and_then(|v| v.trim().parse::<f64>().ok())
                .is_some_and(|v| (v - FIO_IOPS as f64).abs() > FIO_IOPS as f64 / 4.0)
        })
        .collect();
    let off: Vec<f64> = rates
        .iter()
        .filter(|r| (*r - fio_iops).abs() > TOLERANCE * fio_iops)
        .copied()
        .collect();
    assert!(
        off.is_empty(),
        "top's READ IOPS {off:.0?} are more than 5 % off fio's {fio_iops:.0} (all: {rates:.0?}); \
         fio's own 100 ms samples a quarter off its rate (ms since its start, IOPS): {stalls:?}"
    );
}
