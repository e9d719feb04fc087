//! The file layer's kiocb tier (fentry/fexit, kprobe/kretprobe on `read_iter`/`write_iter`)
//! in the generic guests, where ext4 is a module (its functions hooked through its module BTF)
//! and fentry and kprobes both work (docs/notes-issue-23.md).
//!
//! Per hooks kind: an ext4 file system on the main namespace; 4 threads of this process do N
//! O_DIRECT and N buffered 1 MiB preads of a file: every call counted for this process,
//! calls and bytes, per directness; fio `psync` and `io_uring`, buffered and `--direct=1`:
//! calls equal to fio's own issued reads; O_DIRECT reads of the block device: counted, their
//! block requests linked to the calls, and as many NVMe reads on that disk as block requests.

use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use anyhow::{Context, Result, bail, ensure};
use gds_api::model::Snapshot;
use gds_api::raw::{Layer, LayerDetail};

use crate::agent::counter;
use crate::nvme::{MAIN_SERIAL, find_ns};
use crate::tracing::{layer_entry, metrics, start_agent_logged};
use crate::util::run;
use crate::{Ctx, Scenario};

const MIB: usize = 1 << 20;
/// Calls of each kind per thread.
const N: usize = 8;
const THREADS: usize = 4;
const MOUNT: &str = "/mnt/gds-ext4";
/// fio's reads per job (4 KiB each).
const FIO_IOS: u64 = 256;
/// O_DIRECT reads of the block device, 1 MiB each, past the file system.
const BLK_READS: u64 = 16;
/// The file system's size: the block-device reads start past it.
const FS_MIB: u64 = 96;

pub fn scenarios() -> Vec<Scenario> {
    // Generic kernels only (their /init loads modules, ext4 among them).
    if !Path::new("/etc/gds-modules").exists() {
        return Vec::new();
    }
    let s = Scenario::new;
    vec![
        s(
            "file.kiocb-fentry",
            "--file-hooks fentry on ext4 (module BTF) and blkdev: pool of 4 threads, fio psync/io_uring buffered+direct, blkdev O_DIRECT: every call exact, block requests linked",
            420,
            fentry,
        ),
        s(
            "file.kiocb-kprobe",
            "--file-hooks kprobe: the same, every call exact",
            420,
            kprobe,
        ),
        s(
            "file.module-later-fentry",
            "ext4 unloaded when the agent starts (--file-hooks fentry): /debug/layers says so; insmod ext4 -> hooked within seconds, the pool's calls exact",
            300,
            later_fentry,
        ),
        s(
            "file.module-later-kprobe",
            "the same with --file-hooks kprobe",
            300,
            later_kprobe,
        ),
    ]
}

fn later_fentry(c: &Ctx) -> Result<String> {
    module_later(c, "fentry")
}

fn later_kprobe(c: &Ctx) -> Result<String> {
    module_later(c, "kprobe")
}

/// Unloads ext4 (a scenario before may have left it pinned for a moment: links are released
/// after an RCU grace period), starts the agent, loads ext4 again and checks the agent hooked
/// it without a restart.
fn module_later(c: &Ctx, hooks: &str) -> Result<String> {
    let loaded = || Path::new("/sys/module/ext4/initstate").exists();
    let start = std::time::Instant::now();
    while loaded() {
        let (ok, o, e) = run("rmmod", &["ext4"])?;
        if ok {
            break;
        }
        ensure!(start.elapsed().as_secs() < 20, "rmmod ext4: {e}{o}");
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    let log = format!("/tmp/agent-later-{hooks}.log");
    let _agent = start_agent_logged(c, &["--file-hooks", hooks], &log)?;
    let e = layer_entry(Layer::File)?;
    let blind = match &e.detail {
        Some(LayerDetail::File { blind_to, .. }) => blind_to.join("; "),
        other => bail!("file layer detail: {other:?}"),
    };
    c.detail(format!("before insmod: {} | cannot see: {blind}", e.why));
    ensure!(
        e.on && blind.contains("ext4_file_read_iter: module ext4 not loaded"),
        "ext4 not said to be missing: {blind}"
    );
    let (ok, o, err) = run("insmod", &["/lib/modules/gds/ext4.ko"])?;
    ensure!(ok, "insmod ext4: {err}{o}");
    let t0 = std::time::Instant::now();
    let why = loop {
        let e = layer_entry(Layer::File)?;
        if e.why.contains("ext4_file_read_iter") {
            break e.why;
        }
        ensure!(
            // Parsing vmlinux's and ext4's BTF and verifying took 9 s under emulation.
            t0.elapsed().as_secs() < 40,
            "ext4 not hooked 40 s after insmod: {}",
            e.why
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let took = t0.elapsed().as_secs_f64();
    c.detail(format!("hooked {took:.1} s after insmod: {why}"));
    c.metric("hooked_after_insmod_s", format!("{took:.1}"));
    let ns = find_ns(MAIN_SERIAL, 1)?;
    make_fs(&ns.blk)?;
    let r = (|| -> Result<String> {
        let me = std::process::id();
        let file = format!("{MOUNT}/pool");
        let ino = make_file(&file, THREADS * N * 2)?;
        let before = snapshot()?;
        read_pool(&file)?;
        let after = snapshot()?;
        let want = (THREADS * N) as u64;
        for direct in [true, false] {
            let (a, b) = (
                calls(&before, me, ino, "read", direct),
                calls(&after, me, ino, "read", direct),
            );
            let got = (b.0 - a.0, b.1 - a.1);
            ensure!(
                got == (want, want * MIB as u64),
                "direct={direct}: {got:?} of {want} calls"
            );
        }
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        ensure!(
            text.contains("module ext4 loaded: hooked"),
            "the log does not say ext4 was hooked"
        );
        Ok(format!(
            "{hooks}: ext4 hooked {took:.1} s after insmod; pool {want}+{want} calls exact"
        ))
    })();
    let _ = run("umount", &[MOUNT]);
    r
}

fn fentry(c: &Ctx) -> Result<String> {
    kiocb(c, "fentry")
}

fn kprobe(c: &Ctx) -> Result<String> {
    kiocb(c, "kprobe")
}

fn snapshot() -> Result<Snapshot> {
    serde_json::from_str(&crate::agent::http_get("/debug/snapshot")?).context("/debug/snapshot")
}

/// (calls, bytes) of process `pid`'s `op` calls on file `ino`, O_DIRECT or not.
fn calls(s: &Snapshot, pid: u32, ino: u64, op: &str, direct: bool) -> (u64, u64) {
    s.stats
        .file
        .processes
        .iter()
        .filter(|r| r.pid == pid && r.ino == ino && r.op == op && r.direct == direct)
        .fold((0, 0), |(c, b), r| (c + r.calls, b + r.bytes))
}

/// (requests, bytes) of process `pid`'s block reads linked by `link`.
fn block_reads(s: &Snapshot, pid: u32, link: &str) -> (u64, u64) {
    s.stats
        .block_processes
        .iter()
        .filter(|r| r.pid == pid && r.op == "read" && r.link == link)
        .fold((0, 0), |(c, b), r| (c + r.requests, b + r.bytes))
}

/// A fresh ext4 on the first `FS_MIB` MiB of `blk`, mounted at [`MOUNT`].
fn make_fs(blk: &str) -> Result<()> {
    let _ = run("umount", &[MOUNT]);
    std::fs::create_dir_all(MOUNT)?;
    let size = format!("{FS_MIB}M");
    let (ok, o, e) = run(
        "/bin/mkfs.ext4",
        &["-F", "-q", "-t", "ext4", "-b", "4096", blk, &size],
    )?;
    ensure!(ok, "mkfs.ext4 {blk}: {e}{o}");
    let (ok, o, e) = run("mount", &["-t", "ext4", blk, MOUNT])?;
    ensure!(ok, "mount {blk}: {e}{o}");
    Ok(())
}

/// A file of `mib` MiB (written, synced, and its pages dropped).
fn make_file(path: &str, mib: usize) -> Result<u64> {
    use std::io::Write as _;
    let mut f = std::fs::File::create(path)?;
    let chunk = vec![0x5au8; MIB];
    for _ in 0..mib {
        f.write_all(&chunk)?;
    }
    f.sync_all()?;
    drop_cache(path)?;
    Ok(std::fs::metadata(path)?.ino())
}

fn drop_cache(path: &str) -> Result<()> {
    let f = std::fs::File::open(path)?;
    // SAFETY: valid descriptor.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    ensure!(rc == 0, "fadvise: {rc}");
    Ok(())
}

/// A 1 MiB buffer aligned for O_DIRECT.
struct Aligned(*mut u8);

impl Aligned {
    fn new() -> Aligned {
        let layout = std::alloc::Layout::from_size_align(MIB, 4096).expect("layout");
        // SAFETY: non-zero size.
        Aligned(unsafe { std::alloc::alloc(layout) })
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(MIB, 4096).expect("layout");
        // SAFETY: allocated with this layout.
        unsafe { std::alloc::dealloc(self.0, layout) };
    }
}

/// 4 threads, each N O_DIRECT then N buffered 1 MiB preads at its own offsets.
fn read_pool(path: &str) -> Result<()> {
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..THREADS)
            .map(|t| {
                s.spawn(move || -> Result<()> {
                    let direct = std::fs::OpenOptions::new()
                        .read(true)
                        .custom_flags(libc::O_DIRECT)
                        .open(path)?;
                    let buffered = std::fs::File::open(path)?;
                    let buf = Aligned::new();
                    for i in 0..N {
                        let off = ((t * N + i) * MIB) as i64;
                        // SAFETY: the buffer holds 1 MiB.
                        let n = unsafe { libc::pread(direct.as_raw_fd(), buf.0.cast(), MIB, off) };
                        ensure!(n == MIB as isize, "O_DIRECT pread gave {n}");
                    }
                    for i in 0..N {
                        let off = (((THREADS + t) * N + i) * MIB) as i64;
                        // SAFETY: as above.
                        let n =
                            unsafe { libc::pread(buffered.as_raw_fd(), buf.0.cast(), MIB, off) };
                        ensure!(n == MIB as isize, "buffered pread gave {n}");
                    }
                    Ok(())
                })
            })
            .collect();
        for h in hs {
            h.join()
                .map_err(|_| anyhow::anyhow!("a pool thread panicked"))??;
        }
        Ok(())
    })
}

/// Runs fio (one job) reading `path` with `engine`, O_DIRECT or not; returns its pid and the
/// reads it says it issued (`issued rwts`, from the JSON's `total_ios`).
fn fio(path: &str, engine: &str, direct: bool) -> Result<(u32, u64)> {
    let size = FIO_IOS * 4096;
    let args = [
        "--name=gds".to_string(),
        // Jobs as threads of this one process, whose pid the counts are checked for.
        "--thread".into(),
        format!("--filename={path}"),
        "--rw=read".into(),
        "--bs=4k".into(),
        format!("--size={size}"),
        format!("--ioengine={engine}"),
        format!("--direct={}", direct as u8),
        "--iodepth=4".into(),
        "--invalidate=1".into(),
        "--output-format=json".into(),
    ];
    let child = std::process::Command::new("/bin/fio")
        .args(&args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("spawn fio")?;
    let pid = child.id();
    let out = child.wait_with_output()?;
    let o = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "fio {engine}: {}{o}",
        String::from_utf8_lossy(&out.stderr)
    );
    let start = o.find('{').context("fio printed no JSON")?;
    let v: serde_json::Value = serde_json::from_str(&o[start..]).context("fio JSON")?;
    let ios = v["jobs"][0]["read"]["total_ios"]
        .as_u64()
        .context("fio JSON has no jobs[0].read.total_ios")?;
    Ok((pid, ios))
}

/// O_DIRECT 1 MiB reads of the block device past the file system.
fn blkdev_reads(blk: &str) -> Result<()> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(blk)?;
    let buf = Aligned::new();
    for i in 0..BLK_READS {
        let off = ((FS_MIB + 16 + i) * MIB as u64) as i64;
        // SAFETY: the buffer holds 1 MiB.
        let n = unsafe { libc::pread(f.as_raw_fd(), buf.0.cast(), MIB, off) };
        ensure!(n == MIB as isize, "O_DIRECT pread of {blk} gave {n}");
    }
    Ok(())
}

fn kiocb(c: &Ctx, hooks: &str) -> Result<String> {
    let ns = find_ns(MAIN_SERIAL, 1)?;
    make_fs(&ns.blk)?;
    let r = kiocb_on_fs(c, hooks, &ns.blk);
    let _ = run("umount", &[MOUNT]);
    r
}

fn kiocb_on_fs(c: &Ctx, hooks: &str, blk: &str) -> Result<String> {
    let file = format!("{MOUNT}/pool");
    let ino = make_file(&file, THREADS * N * 2)?;
    let fio_file = format!("{MOUNT}/fio");
    let fio_ino = make_file(&fio_file, (FIO_IOS as usize * 4096).div_ceil(MIB))?;
    if hooks == "fentry" {
        // What `gds-agent probe` says `auto` takes here: it attaches, not only loads.
        let (ok, o, e) = run(&c.agent, &["probe"])?;
        let line = o
            .lines()
            .find(|l| l.trim_start().starts_with("file layer"))
            .unwrap_or_default()
            .trim()
            .to_owned();
        c.detail(format!("gds-agent probe: {line}"));
        ensure!(
            ok && line.contains("fentry (read_iter"),
            "gds-agent probe does not say fentry: {line:?} {e}"
        );
    }
    let log = format!("/tmp/agent-file-{hooks}.log");
    let agent = start_agent_logged(c, &["--file-hooks", hooks], &log)?;
    let r = checks(c, hooks, blk, &log, (&file, ino), (&fio_file, fio_ino));
    if r.is_err() {
        let pid = agent.0.id();
        let mut lines = vec![format!(
            "loadavg {}",
            std::fs::read_to_string("/proc/loadavg")
                .unwrap_or_default()
                .trim()
        )];
        for t in std::fs::read_dir(format!("/proc/{pid}/task"))?.flatten() {
            let p = t.path();
            let rd = |f: &str| std::fs::read_to_string(p.join(f)).unwrap_or_default();
            let stat = rd("stat");
            let state = stat
                .rsplit(')')
                .next()
                .unwrap_or("")
                .split_whitespace()
                .next();
            lines.push(format!(
                "task {:?} {} state {:?} wchan {} stack {}",
                t.file_name(),
                rd("comm").trim(),
                state,
                rd("wchan"),
                rd("stack").replace('\n', " <- ")
            ));
        }
        c.detail(lines.join("\n"));
        // What the agent and the kernel said, to tell why.
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        c.detail(format!(
            "agent log tail:\n{}",
            lines[lines.len().saturating_sub(20)..].join("\n")
        ));
        if let Ok((_, o, _)) = run("dmesg", &[]) {
            let lines: Vec<&str> = o.lines().collect();
            c.detail(format!(
                "dmesg tail:\n{}",
                lines[lines.len().saturating_sub(30)..].join("\n")
            ));
        }
    }
    r
}

fn checks(
    c: &Ctx,
    hooks: &str,
    blk: &str,
    log: &str,
    (file, ino): (&str, u64),
    (fio_file, fio_ino): (&str, u64),
) -> Result<String> {
    let me = std::process::id();
    let e = layer_entry(Layer::File)?;
    let Some(LayerDetail::File {
        hooks: used,
        blind_to,
    }) = &e.detail
    else {
        bail!("file layer detail: {:?}", e.detail);
    };
    c.detail(format!(
        "file layer: on={} hooks={used} why: {}",
        e.on, e.why
    ));
    c.detail(format!("cannot see: {}", blind_to.join("; ")));
    ensure!(
        e.on && used == hooks,
        "asked {hooks}, got {used}: {}",
        e.why
    );
    ensure!(
        e.why.contains("ext4_file_read_iter") && e.why.contains("blkdev_read_iter"),
        "ext4 or blkdev not hooked: {}",
        e.why
    );
    ensure!(
        blind_to
            .iter()
            .any(|b| b.contains("xfs") && b.contains("not loaded")),
        "xfs (not loaded) not named: {blind_to:?}"
    );

    // The pool.
    let before = snapshot()?;
    read_pool(file)?;
    std::thread::sleep(std::time::Duration::from_millis(300));
    let after = snapshot()?;
    let delta = |direct| {
        let (a, b) = (
            calls(&before, me, ino, "read", direct),
            calls(&after, me, ino, "read", direct),
        );
        (b.0 - a.0, b.1 - a.1)
    };
    let want = (THREADS * N) as u64;
    let (direct, buffered) = (delta(true), delta(false));
    c.detail(format!(
        "pool: O_DIRECT {direct:?}, buffered {buffered:?} (calls, bytes); want {want} x 1 MiB each"
    ));
    ensure!(
        direct == (want, want * MIB as u64),
        "O_DIRECT calls/bytes {direct:?}"
    );
    ensure!(
        buffered == (want, want * MIB as u64),
        "buffered calls/bytes {buffered:?}"
    );
    let linked = block_reads(&after, me, "call").1 - block_reads(&before, me, "call").1;
    c.detail(format!("pool: block read bytes linked to calls {linked}"));
    ensure!(
        linked >= want * MIB as u64,
        "block bytes linked to the pool's calls: {linked}"
    );

    // The block device.
    let dev_ino = std::fs::metadata(blk)?.ino();
    let disk = blk.trim_start_matches("/dev/").to_owned();
    let nvme_reads = |m: &str| {
        counter(
            m,
            "gds_nvme_commands_total",
            &[&format!("disk=\"{disk}\""), "opcode=\"read\""],
        )
    };
    let before = snapshot()?;
    let m0 = metrics()?;
    blkdev_reads(blk)?;
    std::thread::sleep(std::time::Duration::from_millis(500));
    let after = snapshot()?;
    let m1 = metrics()?;
    let (n, bytes) = calls(&after, me, dev_ino, "read", true);
    let (n0, bytes0) = calls(&before, me, dev_ino, "read", true);
    let (reqs, rbytes) = {
        let (a, b) = (
            block_reads(&before, me, "call"),
            block_reads(&after, me, "call"),
        );
        (b.0 - a.0, b.1 - a.1)
    };
    let nvme = nvme_reads(&m1) - nvme_reads(&m0);
    let line = format!(
        "{blk} O_DIRECT: {} calls {} bytes; block requests linked to calls {reqs} ({rbytes} \
         bytes); NVMe reads on {disk} {nvme}",
        n - n0,
        bytes - bytes0
    );
    c.detail(&line);
    ensure!(
        (n - n0, bytes - bytes0) == (BLK_READS, BLK_READS * MIB as u64),
        "{line}"
    );
    ensure!(rbytes == BLK_READS * MIB as u64, "{line}");
    ensure!(nvme as u64 == reqs, "{line}");
    // fio, four ways.
    let mut fio_lines = Vec::new();
    for (engine, direct) in [
        ("psync", false),
        ("psync", true),
        ("io_uring", true),
        ("io_uring", false),
    ] {
        drop_cache(fio_file)?;
        let (pid, issued) = fio(fio_file, engine, direct)?;
        std::thread::sleep(std::time::Duration::from_millis(300));
        // The agent stops answering for 10-22 s after the first io_uring process of a guest
        // (seen with --file-hooks off too, debug build): waited out, and the time said.
        let t0 = std::time::Instant::now();
        let mut m = metrics();
        while m.is_err() && t0.elapsed().as_secs() < 90 {
            m = metrics();
        }
        let m = m?;
        c.detail(format!(
            "after fio {engine} direct={} (metrics took {:.1} s): {}",
            direct as u8,
            t0.elapsed().as_secs_f64(),
            m.lines()
                .filter(|l| {
                    l.starts_with("gds_file_requests_total")
                        || l.starts_with("gds_oldest_inflight_seconds")
                        || (l.starts_with("gds_trace_dropped_total") && !l.ends_with(" 0"))
                })
                .collect::<Vec<_>>()
                .join(" | ")
        ));
        let s = snapshot()?;
        let (n, bytes) = calls(&s, pid, fio_ino, "read", direct);
        let line = format!(
            "fio {engine} direct={}: issued {issued}, counted {n} calls {bytes} bytes",
            direct as u8
        );
        c.detail(&line);
        ensure!(n == issued, "{line}");
        ensure!(bytes == issued * 4096, "{line}");
        fio_lines.push(format!(
            "{engine}/{}={n}",
            if direct { "direct" } else { "buf" }
        ));
    }

    let log = std::fs::read_to_string(log).unwrap_or_default();
    ensure!(
        log.contains(&format!("file layer: hooks {hooks}")),
        "the log does not say the hooks: {log}"
    );
    Ok(format!(
        "{hooks}: pool {want}+{want} calls exact; fio {}; {BLK_READS} blkdev reads -> {reqs} \
         requests, {nvme} NVMe reads",
        fio_lines.join(" ")
    ))
}
