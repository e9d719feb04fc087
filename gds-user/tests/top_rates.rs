//! `top`'s rates under load: fio (io_uring, rate-limited) traced by a real agent while 50 clients
//! loop on `/debug/snapshot`; rates computed exactly as `top` computes them
//! (`top::read_snapshot` and `top::model::View::compute`) from consecutive snapshots agree within
//! 5 % with fio's own count of reads in the same window, taken from its IOPS log (a line per read,
//! stamped with the wall clock, so the windows line up to the millisecond).
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
use gds_user::top::{
    model::{ReadAt, View},
    read_snapshot,
};

/// fio's rate limit: well below what fio reaches here (~50k IOPS on page-cache reads on this
/// 2-core VM), so fio's reads are paced rather than CPU-bound.
const FIO_IOPS: u64 = 20_000;
/// Clients looping on `/debug/snapshot` (the load).
const CLIENTS: usize = 50;
/// How far apart the measuring client takes its snapshots: `top`'s default `--interval`.
const INTERVAL: Duration = Duration::from_secs(1);
/// Rates measured (pairs of consecutive snapshots).
const PAIRS: usize = 12;
/// The agreement asked for. fio is not steady on this VM at every instant (its 100 ms rates swing
/// from 17.7k to 22.4k while the host takes the vCPU), so each window is compared with what fio
/// itself completed in that window, not with its long-run rate.
const TOLERANCE: f64 = 0.05;

/// fio's IOPS log without averaging: one line per completed read, stamped with the wall clock's
/// millisecond; the times, in order.
struct FioLog(Vec<u64>);

impl FioLog {
    /// Reads fio completed after wall-clock ms `from` up to `to`; `None` where the log does not
    /// cover the window.
    fn reads_between(&self, from: f64, to: f64) -> Option<usize> {
        let (first, last) = (*self.0.first()? as f64, *self.0.last()? as f64);
        if first > from || last < to {
            return None;
        }
        let after = |ms: f64| self.0.partition_point(|&t| (t as f64) <= ms);
        Some(after(to) - after(from))
    }
}

/// A `CLOCK_MONOTONIC` time in ns to wall-clock ms (fio's log clock), from one reading of both.
fn monotonic_to_wall_ms() -> impl Fn(u64) -> f64 {
    let before = monotonic_ns();
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as f64;
    let after = monotonic_ns();
    let offset = wall - (before / 2 + after / 2) as f64;
    move |ns: u64| (ns as f64 + offset) / 1e6
}

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
        // fio's own record of its reads: a line per read, stamped with the wall clock's ms
        // (~20 MB for the whole run).
        .arg(format!("--write_iops_log={}", iops_log.display()))
        .arg("--log_unix_epoch=1")
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
    // (from, to) in wall-clock ms, the times the agent read its io_uring counters (what `top`
    // divides by), and top's READ IOPS, per window.
    let mut windows: Vec<(f64, f64, f64)> = Vec::new();
    let wall_ms = monotonic_to_wall_ms();
    while windows.len() < PAIRS {
        std::thread::sleep(INTERVAL);
        let cur = read_snapshot(addr).unwrap();
        let v = View::compute(&prev, &cur);
        let rate = reads(&v).unwrap_or(0.0);
        let (from, to) = (ReadAt::of(&prev).uring_ns, ReadAt::of(&cur).uring_ns);
        windows.push((wall_ms(from), wall_ms(to), rate));
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
    let fio_reads = report["jobs"][0]["read"]["total_ios"].as_f64().unwrap();
    let mut times: Vec<u64> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("fio_iops"))
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .collect::<String>()
        .lines()
        .filter_map(|l| l.split(',').next()?.trim().parse().ok())
        .collect();
    times.sort_unstable();
    // The log is fio's own count: a line for each read it reported.
    assert_eq!(
        times.len() as f64,
        fio_reads,
        "fio's IOPS log holds {} reads, its report {fio_reads}",
        times.len()
    );
    let log = FioLog(times);
    let answered = answers.load(Ordering::Relaxed);
    // Per window: (from, to) wall-clock ms, top's READ IOPS, fio's own.
    let compared: Vec<(f64, f64, f64, f64)> = windows
        .iter()
        .map(|&(from, to, top)| {
            let fio = log.reads_between(from, to).unwrap_or_else(|| {
                panic!("fio's log does not cover the window {from:.0}..{to:.0} ms")
            });
            (from, to, top, fio as f64 * 1e3 / (to - from))
        })
        .collect();
    eprintln!(
        "fio: {fio_iops:.0} IOPS (limit {FIO_IOPS}); per window (top, fio): {:.0?}; \
         {answered} snapshots answered to {CLIENTS} clients",
        compared.iter().map(|w| (w.2, w.3)).collect::<Vec<_>>()
    );
    assert!(
        answered >= CLIENTS as u64,
        "the clients got {answered} snapshots"
    );
    let off: Vec<_> = compared
        .iter()
        .filter(|w| (w.2 - w.3).abs() > TOLERANCE * w.3)
        .collect();
    assert!(
        off.is_empty(),
        "top's READ IOPS more than 5 % off fio's own in the same window ((from, to) wall-clock \
         ms, top, fio): {off:.0?}"
    );
}
