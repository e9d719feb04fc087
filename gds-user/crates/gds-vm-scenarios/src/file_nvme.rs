//! File calls linked to their NVMe commands, in the generic guests (fentry and kprobes work
//! there): O_DIRECT `pread`s of the throttled controller's namespace (`gds-slow`, QEMU holds
//! each command ~20 ms past a short burst) must be counted exactly as file calls, each read's
//! NVMe commands seen (qid, cid, LBA = offset / LBA size, covering exactly the bytes asked)
//! and linked to the calling thread and the block device's inode, the per-call device
//! counters (`gds_file_device_{requests,bytes}_total`) equal to what was seen and asked, and
//! the calls' stages (`gds_request_stage_duration_seconds{origin="syscall"}`) must add up to
//! the calls' time, `device` the largest.
//!
//! How the commands are seen: the agent's stall scan (`--stall-threshold 30ms`, every 10 ms)
//! records every request in flight past the threshold, NVMe commands with the cause of the
//! block request they serve (the same `struct request *`), and keeps the ended ones. fio (8
//! psync jobs of 4 KiB O_DIRECT reads, another process: `--pid` leaves it out) keeps QEMU's
//! throttle queue full while the measured reads run one after another, so each of their
//! commands waits behind ~8 others (QEMU's throttle queue is FIFO), ~160 ms at 50 IOPS,
//! past the 30 ms threshold: every one is seen.

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use gds_api::model::{Layer, Snapshot, Stall, StallReport};
use gds_api::raw::LayerDetail;
use gds_nvme::{DmaBuffer, namespace_geometry};

use crate::agent::{counter, http_get};
use crate::nvme::{SLOW_SERIAL, find_ns};
use crate::tracing::{layer_entry, metrics, start_agent_logged};
use crate::util::open_direct;
use crate::{Ctx, Scenario};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
/// The measured reads: one per thread, sizes from 64 KiB to 1 MiB (a 1 MiB read is two
/// commands where the controller's transfer limit is 512 KiB).
const SIZES: [u64; 8] = [
    64 * KIB,
    128 * KIB,
    256 * KIB,
    512 * KIB,
    MIB,
    96 * KIB,
    768 * KIB,
    MIB,
];
/// fio's jobs keeping the throttle busy (one 4 KiB read in flight each). With the measured
/// read, 9 threads sleep in `blkdev_read_iter` at once: a kretprobe catches the returns of at
/// most `max(10, 2 x CPUs)` threads at a time (its default `maxactive`, which the perf kprobe
/// interface cannot raise), 10 in these 2-vCPU guests; the calls of threads past it never
/// end (seen: 16 at once left 6 calls in flight for good).
const BACKGROUND_JOBS: u32 = 8;

pub fn scenarios() -> Vec<Scenario> {
    // Generic kernels only, like the other file-layer scenarios (fentry and kprobes both
    // attach there; docs/notes-issue-23.md).
    if !Path::new("/etc/gds-modules").exists() {
        return Vec::new();
    }
    let s = Scenario::new;
    vec![
        s(
            "file.nvme-linked-fentry",
            "--file-hooks fentry: O_DIRECT preads of the throttled controller's block device: calls exact, each read's NVMe commands (qid, cid, LBA) linked to its thread and inode, device requests/bytes per call, stages sum to the calls' time with device dominant",
            300,
            fentry,
        ),
        s(
            "file.nvme-linked-kprobe",
            "the same with --file-hooks kprobe",
            300,
            kprobe,
        ),
        s(
            "file.kretprobe-limit",
            "--file-hooks kprobe, 24 O_DIRECT reads at once (past the kretprobe's maxactive): each counted or dropped as file_return_missed when its thread exits; none left in flight",
            180,
            kretprobe_limit,
        ),
    ]
}

fn fentry(c: &Ctx) -> Result<String> {
    linked(c, "fentry")
}

fn kprobe(c: &Ctx) -> Result<String> {
    linked(c, "kprobe")
}

/// Offset of measured read `i`: a MiB apart plus `i` pages, so every LBA differs.
fn offset(i: usize) -> u64 {
    i as u64 * (MIB + 4 * KIB)
}

fn snapshot() -> Result<Snapshot> {
    serde_json::from_str(&http_get("/debug/snapshot")?).context("/debug/snapshot")
}

fn stalls() -> Result<StallReport> {
    serde_json::from_str(&http_get("/debug/stalls")?).context("/debug/stalls")
}

/// (calls, bytes, sum_ns) of `pid`'s O_DIRECT reads of inode `ino`.
fn direct_reads(s: &Snapshot, pid: u32, ino: u64) -> (u64, u64, u64) {
    s.stats
        .file
        .processes
        .iter()
        .filter(|r| r.pid == pid && r.ino == ino && r.op == "read" && r.direct)
        .fold((0, 0, 0), |(c, b, t), r| {
            (c + r.calls, b + r.bytes, t + r.sum_ns)
        })
}

/// One O_DIRECT pread of `len` bytes at `off` from a new thread; returns the thread's id
/// (what the NVMe commands must name) once the read returned.
fn read_in_thread(blk: &str, off: u64, len: u64) -> std::thread::JoinHandle<Result<u32>> {
    let blk = blk.to_owned();
    std::thread::spawn(move || -> Result<u32> {
        let f = open_direct(&blk, false)?;
        let mut buf = DmaBuffer::new(len as usize);
        // SAFETY: the buffer holds `len` bytes.
        let slice = unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr(), len as usize) };
        // SAFETY: gettid has no arguments and cannot fail.
        let tid = unsafe { libc::syscall(libc::SYS_gettid) } as u32;
        let n = f.read_at(slice, off)?;
        ensure!(n as u64 == len, "O_DIRECT pread of {len} at {off} gave {n}");
        Ok(tid)
    })
}

fn linked(c: &Ctx, hooks: &str) -> Result<String> {
    let ns = find_ns(SLOW_SERIAL, 1)?;
    let disk = ns.blk.trim_start_matches("/dev/").to_owned();
    let lba_size = u64::from(namespace_geometry(Path::new(&ns.ng))?.lba_size);
    let dev_ino = std::fs::metadata(&ns.blk)?.ino();
    let me = std::process::id();
    let log = format!("/tmp/agent-nvme-linked-{hooks}.log");
    let _agent = start_agent_logged(
        c,
        &[
            "--file-hooks",
            hooks,
            "--pid",
            &me.to_string(),
            "--stall-threshold",
            "30ms",
            "--stall-interval",
            "10ms",
        ],
        &log,
    )?;
    let e = layer_entry(Layer::File)?;
    match &e.detail {
        Some(LayerDetail::File { hooks: used, .. }) if e.on && used == hooks => {}
        other => bail!("asked {hooks}: {} {other:?}", e.why),
    }
    ensure!(
        e.why.contains("blkdev_read_iter"),
        "blkdev not hooked: {}",
        e.why
    );

    let stage = |m: &str, s: &str| {
        counter(
            m,
            "gds_request_stage_duration_seconds_sum",
            &[
                &format!("stage=\"{s}\""),
                &format!("disk=\"{disk}\""),
                "origin=\"syscall\"",
            ],
        )
    };
    let file_counter = |m: &str, name: &str| counter(m, name, &["op=\"read\"", "direct=\"true\""]);
    let s0 = snapshot()?;
    let m0 = metrics()?;

    // The throttle kept busy by another process, then the measured reads behind it.
    let mut fio = Background::start(&ns.blk, &disk)?;
    let t0 = Instant::now();
    // One after another, each from its own thread (its tid names its call): at most
    // BACKGROUND_JOBS + 1 threads in `blkdev_read_iter` at once, under the kretprobes' limit
    // (10 here).
    let tids = SIZES
        .iter()
        .enumerate()
        .map(|(i, &len)| {
            read_in_thread(&ns.blk, offset(i), len)
                .join()
                .map_err(|_| anyhow::anyhow!("a reader panicked"))?
        })
        .collect::<Result<Vec<u32>>>();
    fio.stop();
    let tids = tids?;
    let took = t0.elapsed().as_secs_f64();

    // Every stall of ours ended (the scan after the last completion), the counters final.
    let deadline = Instant::now() + Duration::from_secs(20);
    let report = loop {
        let r = stalls()?;
        if r.active.iter().all(|s| s.request.ctx.pid != me) {
            break r;
        }
        if Instant::now() > deadline {
            let left: Vec<String> = r
                .active
                .iter()
                .filter(|s| s.request.ctx.pid == me)
                .map(|s| {
                    format!(
                        "{} tid {} age {:.1} s {}",
                        s.request.layer.label(),
                        s.request.ctx.tid,
                        s.request.age_seconds,
                        s.request.where_text()
                    )
                })
                .collect();
            bail!(
                "{} stalls of ours never ended (the reads returned):\n{}",
                left.len(),
                left.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    std::thread::sleep(Duration::from_millis(300));
    let s1 = snapshot()?;
    let m1 = metrics()?;

    // The file calls, exact.
    let (a, b) = (
        direct_reads(&s0, me, dev_ino),
        direct_reads(&s1, me, dev_ino),
    );
    let (calls, bytes, sum_ns) = (b.0 - a.0, b.1 - a.1, b.2 - a.2);
    let asked: u64 = SIZES.iter().sum::<u64>();
    let n_calls = SIZES.len() as u64;
    let line = format!(
        "{} O_DIRECT preads of {} (inode {dev_ino}) in {took:.2} s: counted {calls} calls, \
         {bytes} bytes (asked {n_calls}, {asked})",
        n_calls, ns.blk
    );
    c.detail(&line);
    ensure!((calls, bytes) == (n_calls, asked), "{line}");

    // Each measured read's NVMe commands: linked to its thread and the device's inode, LBAs
    // from offset / LBA size, covering exactly the bytes asked.
    let ours = |s: &&Stall| s.request.layer == Layer::Nvme && s.request.target.disk == disk;
    let nvme: Vec<&Stall> = report.ended.iter().filter(ours).collect();
    let mut commands = 0u64;
    let mut lines = Vec::new();
    for (i, (&len, &tid)) in SIZES.iter().zip(&tids).enumerate() {
        let mut mine: Vec<&Stall> = nvme
            .iter()
            .copied()
            .filter(|s| {
                s.request
                    .block_cause
                    .as_ref()
                    .is_some_and(|b| b.call_tid == Some(tid))
            })
            .collect();
        mine.sort_by_key(|s| s.request.nvme.as_ref().map_or(0, |n| n.lba));
        let want_lba = offset(i) / lba_size;
        let seen: Vec<String> = mine
            .iter()
            .map(|s| {
                let n = s.request.nvme.as_ref();
                format!(
                    "qid {} cid {} lba {} blocks {} ({:.0} ms)",
                    n.map_or(0, |n| n.qid),
                    n.map_or(0, |n| n.cid),
                    n.map_or(0, |n| n.lba),
                    n.map_or(0, |n| n.blocks),
                    s.total_seconds.unwrap_or(0.0) * 1e3
                )
            })
            .collect();
        let l = format!(
            "read {i}: {len} B at {} (tid {tid}) -> LBA {want_lba}: {}",
            offset(i),
            seen.join(", ")
        );
        c.detail(&l);
        if mine.is_empty() {
            let all: Vec<String> = nvme
                .iter()
                .map(|s| {
                    format!(
                        "pid {} tid {} cause {:?} {}",
                        s.request.ctx.pid,
                        s.request.ctx.tid,
                        s.request.block_cause,
                        s.request.where_text()
                    )
                })
                .collect();
            c.detail(format!(
                "NVMe stalls on {disk} ({}):\n{}",
                all.len(),
                all.join("\n")
            ));
            let calls: Vec<String> = report
                .ended
                .iter()
                .filter(|s| s.request.layer == Layer::File && s.request.ctx.pid == me)
                .map(|s| {
                    format!(
                        "tid {} {:.0} ms",
                        s.request.ctx.tid,
                        s.total_seconds.unwrap_or(0.0) * 1e3
                    )
                })
                .collect();
            c.detail(format!(
                "file-call stalls: {}; last scan took {:.1} ms",
                calls.join(", "),
                report.scan_seconds * 1e3
            ));
            bail!("no NVMe command seen: {l}");
        }
        let mut next = want_lba;
        for s in &mine {
            let r = &s.request;
            let n = r.nvme.as_ref().context("NVMe stall without its command")?;
            let cause = r.block_cause.as_ref().context("no cause")?;
            ensure!(
                r.ctx.pid == me
                    && cause.call_pid == Some(me)
                    && cause.via == "call"
                    && cause.origin == "syscall"
                    && r.target.inode == Some(dev_ino),
                "command not linked to this process's call on inode {dev_ino}: {r:?}"
            );
            ensure!(n.qid >= 1, "not an I/O queue: {l}");
            ensure!(n.lba == next, "LBAs not contiguous from {want_lba}: {l}");
            next += u64::from(n.blocks);
        }
        ensure!(
            (next - want_lba) * lba_size == len,
            "commands cover {} bytes of {len}: {l}",
            (next - want_lba) * lba_size
        );
        commands += mine.len() as u64;
        lines.push(format!("{}x", mine.len()));
    }
    // The file calls of the measured reads were stalls too, on that inode.
    let file_stalls = report
        .ended
        .iter()
        .filter(|s| {
            s.request.layer == Layer::File
                && s.request.ctx.pid == me
                && tids.contains(&s.request.ctx.tid)
                && s.request.target.inode == Some(dev_ino)
        })
        .count();
    c.detail(format!(
        "file-call stalls of the measured threads on inode {dev_ino}: {file_stalls}"
    ));
    ensure!(
        file_stalls == SIZES.len(),
        "{file_stalls} file-call stalls of {} reads",
        SIZES.len()
    );

    // Device requests and bytes per call: the commands seen; the bytes moved are the bytes
    // asked.
    let dev_reqs = file_counter(&m1, "gds_file_device_requests_total")
        - file_counter(&m0, "gds_file_device_requests_total");
    let dev_bytes = file_counter(&m1, "gds_file_device_bytes_total")
        - file_counter(&m0, "gds_file_device_bytes_total");
    let line = format!(
        "gds_file_device_requests_total +{dev_reqs} ({:.2} per call; measured reads' commands \
         seen {commands}), gds_file_device_bytes_total +{dev_bytes} (asked {asked})",
        dev_reqs / n_calls as f64
    );
    c.detail(&line);
    ensure!(dev_reqs == commands as f64, "{line}");
    ensure!(dev_bytes == asked as f64, "{line}");

    // Stages: once per call, they add up to the calls' time; the throttled device dominates.
    let [q, d, cpl] = ["queue", "device", "completion"].map(|s| stage(&m1, s) - stage(&m0, s));
    let total = sum_ns as f64 / 1e9;
    let sum = q + d + cpl;
    let line = format!(
        "stages on {disk} (origin syscall): queue {q:.6} s + device {d:.6} s + completion \
         {cpl:.6} s = {sum:.6} s; the calls' time {total:.6} s; device {:.1} %",
        100.0 * d / sum.max(f64::MIN_POSITIVE)
    );
    c.detail(&line);
    ensure!((sum - total).abs() <= 0.01 * total, "{line}");
    ensure!(
        d > q && d > cpl && d > 0.5 * sum,
        "device not dominant: {line}"
    );
    c.metric("device_share", format!("{:.3}", d / sum));
    c.metric(
        "device_requests_per_call",
        format!("{:.2}", dev_reqs / n_calls as f64),
    );
    Ok(format!(
        "{hooks}: {n_calls} calls / {asked} B exact; {} measured reads -> {commands} NVMe \
         commands ({}) with qid/cid/LBA linked to their threads; device {dev_reqs} requests / \
         {dev_bytes} B; stages = calls' time {total:.3} s, device {:.1} %",
        SIZES.len(),
        lines.join(" "),
        100.0 * d / sum
    ))
}

/// fio reading `blk` (the 4 MiB past the measured reads) with [`BACKGROUND_JOBS`] psync jobs
/// until stopped; started once the disk has that many reads in flight.
struct Background(std::process::Child);

impl Background {
    fn start(blk: &str, disk: &str) -> Result<Background> {
        let child = std::process::Command::new("/bin/fio")
            .args([
                "--name=busy",
                "--thread",
                &format!("--filename={blk}"),
                "--rw=randread",
                "--bs=4k",
                "--direct=1",
                "--ioengine=psync",
                &format!("--numjobs={BACKGROUND_JOBS}"),
                &format!("--offset={}", 12 * MIB),
                &format!("--size={}", 4 * MIB),
                "--time_based",
                "--runtime=120",
            ])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("spawn fio")?;
        let mut bg = Background(child);
        // The kernel's count of the disk's reads in flight ("reads writes").
        let path = format!("/sys/block/{disk}/inflight");
        let start = Instant::now();
        loop {
            let text = std::fs::read_to_string(&path).with_context(|| path.clone())?;
            let reads: u32 = text
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .with_context(|| format!("{path}: {text:?}"))?;
            if reads + 1 >= BACKGROUND_JOBS {
                break;
            }
            if let Ok(Some(st)) = bg.0.try_wait() {
                bail!("fio exited early: {st}");
            }
            if start.elapsed() > Duration::from_secs(60) {
                bg.stop();
                bail!("fio never had {BACKGROUND_JOBS} reads in flight on {disk}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Past QEMU's burst: the throttle queue holds fio's reads now.
        std::thread::sleep(Duration::from_millis(300));
        Ok(bg)
    }

    fn stop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Threads in `blkdev_read_iter` at once in [`kretprobe_limit`]: more than a kretprobe's
/// default `maxactive` (`max(10, 2 × CPUs)`, 10 in these guests).
const CROWD: usize = 24;

/// `--file-hooks kprobe`: [`CROWD`] threads each do one O_DIRECT read of the throttled
/// controller at once, more than the kretprobe can watch; then they exit. Every call is either
/// counted or dropped as `file_return_missed` (at its thread's exit), none stays in flight.
pub fn kretprobe_limit(c: &Ctx) -> Result<String> {
    let ns = find_ns(SLOW_SERIAL, 1)?;
    let me = std::process::id();
    let dev_ino = std::fs::metadata(&ns.blk)?.ino();
    let log = "/tmp/agent-kretprobe-limit.log";
    let _agent = start_agent_logged(
        c,
        &["--file-hooks", "kprobe", "--pid", &me.to_string()],
        log,
    )?;
    let missed = |m: &str| {
        counter(
            m,
            "gds_trace_dropped_total",
            &["reason=\"file_return_missed\""],
        )
    };
    let (s0, m0) = (snapshot()?, metrics()?);
    let readers: Vec<_> = (0..CROWD)
        // 64 KiB apart: within the throttled namespace, whatever its size.
        .map(|i| read_in_thread(&ns.blk, i as u64 * 64 * KIB, 4 * KIB))
        .collect();
    for r in readers {
        r.join()
            .map_err(|_| anyhow::anyhow!("a reader panicked"))??;
    }
    // The threads have exited: what the kretprobe missed is dropped at their exit.
    std::thread::sleep(Duration::from_millis(500));
    let (s1, m1) = (snapshot()?, metrics()?);
    let counted = direct_reads(&s1, me, dev_ino).0 - direct_reads(&s0, me, dev_ino).0;
    let dropped = missed(&m1) - missed(&m0);
    let left: Vec<String> = s1
        .inflight
        .iter()
        .filter(|r| r.layer == Layer::File && r.ctx.pid == me)
        .map(|r| format!("tid {} age {:.1} s", r.ctx.tid, r.age_seconds))
        .collect();
    c.detail(format!(
        "{CROWD} concurrent reads: {counted} counted, {dropped} dropped as file_return_missed, \
         {} file calls of ours still in flight {left:?}",
        left.len()
    ));
    ensure!(
        counted + dropped as u64 == CROWD as u64,
        "{counted} counted + {dropped} dropped != {CROWD} calls"
    );
    ensure!(left.is_empty(), "calls left in flight: {left:?}");
    Ok(format!(
        "{CROWD} reads at once under kretprobes: {counted} counted, {dropped} missed returns \
         dropped at thread exit, none left in flight"
    ))
}
