//! NVMe as a module (generic distribution kernels): the driver loaded after the agent started,
//! and unloaded under load (issue: NVMe tracing on distribution kernels).
//!
//! These scenarios exist only in guests whose `/init` loaded NVMe modules (the generic
//! kernels: `/etc/gds-modules` lists them in load order); on the cloud kernels NVMe is built
//! in and cannot come or go.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use gds_api::raw::{Layer, LayerDetail};
use gds_host::kmod::Residence;
use gds_nvme::{DmaBuffer, NvmeReadCmd, NvmeRing, UringCmdOp, namespace_geometry};

use crate::agent::counter;
use crate::nvme::{MAIN_SERIAL, find_ns};
use crate::tracing::{layer_entry, metrics, passthrough_reads, start_agent_logged, wait_metrics};
use crate::{Ctx, Scenario};

/// Written by the guest's `/init` on generic kernels.
const MODULE_LIST: &str = "/etc/gds-modules";
const MODULE_DIR: &str = "/lib/modules/gds";

pub fn scenarios() -> Vec<Scenario> {
    if !Path::new(MODULE_LIST).exists() {
        return Vec::new();
    }
    let s = Scenario::new;
    vec![
        s(
            "modules.load-after-start",
            "agent started with no NVMe driver; insmod nvme_core+nvme -> NVMe attached, N reads counted exactly",
            240,
            load_after_start,
        ),
        s(
            "modules.unload-under-load",
            "controller hot-removed under passthrough load, rmmod nvme + nvme_core while the agent runs, reload -> exact counts again",
            300,
            unload_under_load,
        ),
    ]
}

fn loaded(module: &str) -> bool {
    Path::new("/sys/module")
        .join(module)
        .join("initstate")
        .exists()
}

fn run(cmd: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("{cmd} {}", args.join(" ")))?;
    ensure!(
        out.status.success(),
        "{cmd} {} failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// Unloads the NVMe driver and core (their dependencies stay, as `modprobe -r nvme` without
/// `--remove-dependencies` would leave them).
fn unload() -> Result<()> {
    for m in ["nvme", "nvme_core"] {
        if loaded(m) {
            run("rmmod", &[m])?;
        }
    }
    Ok(())
}

/// Loads every module of the list that is not loaded, in order.
fn insmod_all() -> Result<()> {
    let list = std::fs::read_to_string(MODULE_LIST)?;
    for m in list.split_whitespace() {
        if !loaded(m) {
            run("insmod", &[&format!("{MODULE_DIR}/{m}.ko")])?;
        }
    }
    Ok(())
}

/// Loads the modules, then waits for every namespace's generic device.
fn load(c: &Ctx) -> Result<()> {
    insmod_all()?;
    wait_namespaces(c)
}

/// Waits until the guest's namespaces (`gds.ngs=` of them) have their generic devices.
fn wait_namespaces(c: &Ctx) -> Result<()> {
    let want = std::fs::read_to_string("/proc/cmdline")?
        .split_whitespace()
        .find_map(|a| a.strip_prefix("gds.ngs="))
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or(1);
    let start = Instant::now();
    loop {
        let n = std::fs::read_dir("/dev")?
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("ng"))
            .count();
        if n >= want {
            break;
        }
        ensure!(
            start.elapsed() < Duration::from_secs(30),
            "only {n} of {want} NVMe generic devices appeared after insmod"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    c.detail(format!(
        "{want} namespaces in {:.1} s",
        start.elapsed().as_secs_f64()
    ));
    Ok(())
}

fn nvme_attached() -> Result<bool> {
    Ok(layer_entry(Layer::Nvme)?.on)
}

fn wait_attached(want: bool, within: Duration) -> Result<Duration> {
    let start = Instant::now();
    loop {
        if nvme_attached()? == want {
            return Ok(start.elapsed());
        }
        if start.elapsed() > within {
            bail!(
                "NVMe layer attached != {want} after {within:?}: {:?}",
                layer_entry(Layer::Nvme)?
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// NVMe reads counted for `disk`.
fn nvme_reads(m: &str, disk: &str) -> f64 {
    counter(
        m,
        "gds_nvme_commands_total",
        &[&format!("disk=\"{disk}\""), "opcode=\"read\""],
    )
}

/// Waits until no NVMe command is counted for 1 s (the kernel's own reads after a probe).
fn settle() -> Result<String> {
    let total = |m: &str| counter(m, "gds_nvme_commands_total", &[]);
    let mut last = total(&metrics()?);
    let mut still = Instant::now();
    let start = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let m = metrics()?;
        let now = total(&m);
        if now != last {
            last = now;
            still = Instant::now();
        } else if still.elapsed() >= Duration::from_secs(1) {
            return Ok(m);
        }
        ensure!(
            start.elapsed() < Duration::from_secs(30),
            "NVMe commands kept coming for 30 s"
        );
    }
}

/// N passthrough reads of the main namespace: exactly N more NVMe reads on its disk.
fn exact_reads(c: &Ctx, n: u64, phase: &str) -> Result<String> {
    let ns = find_ns(MAIN_SERIAL, 1)?;
    let disk = ns.blk.trim_start_matches("/dev/").to_owned();
    let m0 = settle()?;
    let r0 = nvme_reads(&m0, &disk);
    passthrough_reads(&ns.ng, 8192, n, 4)?;
    let m = wait_metrics("N reads counted", |m| nvme_reads(m, &disk) - r0 >= n as f64)?;
    let got = nvme_reads(&m, &disk) - r0;
    ensure!(
        got == n as f64,
        "{phase}: {n} passthrough reads became {got} NVMe reads on {disk}"
    );
    c.metric(&format!("{phase}_nvme_reads"), got);
    Ok(format!("{phase}: {n} reads -> {got} on {disk}"))
}

fn agent_log(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Lines of the agent's log that say how the NVMe layer changed.
fn nvme_log_lines(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains("NVMe tracing"))
        .map(|l| {
            l.split("NVMe tracing")
                .nth(1)
                .map_or(l.to_string(), |r| format!("NVMe tracing{r}"))
        })
        .collect()
}

fn load_after_start(c: &Ctx) -> Result<String> {
    const N: u64 = 100;
    unload()?;
    ensure!(!loaded("nvme_core"), "nvme_core still loaded");
    let log = "/tmp/agent-load-after-start.log";
    let agent = start_agent_logged(c, &[], log)?;
    let nvme = layer_entry(Layer::Nvme)?;
    ensure!(
        !nvme.on
            && matches!(
                nvme.detail,
                Some(LayerDetail::Nvme {
                    residence: Residence::Absent,
                    ..
                })
            ),
        "with nvme_core unloaded the NVMe layer should be absent: {nvme:?}"
    );
    ensure!(
        agent_log(log).contains("NVMe tracing off: no NVMe driver built in or loaded"),
        "the log does not say NVMe is absent:\n{}",
        agent_log(log)
    );
    let t0 = Instant::now();
    load(c)?;
    let attach_after = wait_attached(true, Duration::from_secs(5))?;
    c.metric(
        "attached_after_insmod_s",
        format!("{:.2}", t0.elapsed().as_secs_f64()),
    );
    let nvme = layer_entry(Layer::Nvme)?;
    ensure!(
        matches!(
            nvme.detail,
            Some(LayerDetail::Nvme {
                residence: Residence::Module { btf: true },
                status_decoded: true,
            })
        ),
        "after insmod: {nvme:?}"
    );
    let counted = exact_reads(c, N, "after_load")?;
    // The status is decoded from the module's BTF: an out-of-range read names its status.
    let ns = find_ns(MAIN_SERIAL, 1)?;
    let disk = ns.blk.trim_start_matches("/dev/").to_owned();
    let errs = |m: &str| {
        counter(
            m,
            "gds_nvme_errors_total",
            &[&format!("disk=\"{disk}\""), "status=\"LBA Out of Range\""],
        )
    };
    let e0 = errs(&metrics()?);
    let g = namespace_geometry(Path::new(&ns.ng))?;
    let mut ring = NvmeRing::open(&ns.ng, 1)?;
    let mut buf = DmaBuffer::new(g.lba_size as usize);
    let cmd = NvmeReadCmd::new(g.nsid, g.capacity_blocks, 1)
        .buffer(buf.as_mut_ptr(), g.lba_size as usize)
        .build_unchecked()?;
    // SAFETY: buf outlives the synchronous execute.
    ensure!(
        unsafe { ring.execute(&cmd, UringCmdOp::Io, None) }.is_err(),
        "read past capacity succeeded"
    );
    let m = wait_metrics("error counted", |m| errs(m) - e0 >= 1.0)?;
    ensure!(errs(&m) - e0 == 1.0, "want exactly one LBA Out of Range");
    drop(agent);
    let lines = nvme_log_lines(&agent_log(log));
    for l in &lines {
        c.detail(format!("log: {l}"));
    }
    ensure!(
        lines
            .iter()
            .any(|l| l.contains("NVMe tracing on") && l.contains("loaded after the agent started")),
        "the log does not say NVMe attached after a late load"
    );
    Ok(format!(
        "absent at start, attached {:.2} s after the modules appeared; {counted}; 1 LBA Out of Range decoded",
        attach_after.as_secs_f64()
    ))
}

fn unload_under_load(c: &Ctx) -> Result<String> {
    const N: u64 = 100;
    load(c)?;
    let log = "/tmp/agent-unload.log";
    let agent = start_agent_logged(c, &[], log)?;
    wait_attached(true, Duration::from_secs(5))?;
    let before = exact_reads(c, N, "before_unload")?;

    // Load: passthrough reads at QD 8 on the main namespace until the device goes away.
    let ns = find_ns(MAIN_SERIAL, 1)?;
    let disk = ns.blk.trim_start_matches("/dev/").to_owned();
    let m0 = settle()?;
    let r0 = nvme_reads(&m0, &disk);
    let drops = |m: &str| counter(m, "gds_trace_dropped_total", &["reason=\"nvme_"]);
    let d0 = drops(&m0);
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let loader = {
        let (stop, ok, failed, ng) = (stop.clone(), ok.clone(), failed.clone(), ns.ng.clone());
        std::thread::spawn(move || -> Result<()> {
            let g = namespace_geometry(Path::new(&ng))?;
            let mut ring = NvmeRing::open(&ng, 8)?;
            let mut bufs: Vec<DmaBuffer> = (0..8).map(|_| DmaBuffer::new(4096)).collect();
            let blocks = (4096 / g.lba_size).max(1);
            let mut next = 0u64;
            let mut done = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                while ring.in_flight() + ring.queued() < 8 {
                    let slot = (next % 8) as usize;
                    let lba = (next * blocks as u64) % (g.capacity_blocks / 2);
                    let cmd = NvmeReadCmd::new(g.nsid, lba, blocks)
                        .buffer(bufs[slot].as_mut_ptr(), 4096)
                        .build(&g)?;
                    // SAFETY: the buffers outlive the ring (dropped after it, below).
                    if unsafe { ring.push(&cmd, UringCmdOp::Io, None, next) }.is_err() {
                        return Ok(());
                    }
                    next += 1;
                }
                done.clear();
                if ring.wait(1, &mut done).is_err() {
                    return Ok(());
                }
                for d in &done {
                    if d.res == 0 {
                        ok.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failed.fetch_add(1, Ordering::Relaxed);
                        return Ok(());
                    }
                }
            }
            // Reap what is still in flight before the buffers go.
            while ring.in_flight() > 0 {
                done.clear();
                if ring.wait(1, &mut done).is_err() {
                    break;
                }
                for d in &done {
                    if d.res == 0 {
                        ok.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            drop(ring);
            drop(bufs);
            Ok(())
        })
    };
    std::thread::sleep(Duration::from_millis(700));
    let under_load = ok.load(Ordering::Relaxed);
    ensure!(under_load > 0, "the load did not start");
    // The kernel refuses to unload the driver of an open namespace (each open holds the
    // transport module): rmmod under load fails, whoever traces it.
    let refused = run("rmmod", &["nvme"]);
    ensure!(
        refused.is_err() && loaded("nvme"),
        "rmmod nvme with a namespace open should be refused"
    );
    c.detail(format!(
        "rmmod nvme under load refused by the kernel, as expected: {:#}",
        refused.unwrap_err()
    ));
    // What does take a controller away under load: hot removal of its PCI device.
    let ctrl = ns.ctrl.trim_start_matches("/dev/").to_owned();
    let t0 = Instant::now();
    std::fs::write(format!("/sys/class/nvme/{ctrl}/device/remove"), "1")
        .with_context(|| format!("hot-removing {ctrl}"))?;
    c.metric("hot_remove_s", format!("{:.2}", t0.elapsed().as_secs_f64()));
    stop.store(true, Ordering::Relaxed);
    // The loader ends on its first error or when stopped; a ring on a removed device may
    // block, so it is not joined past a few seconds.
    let start = Instant::now();
    while !loader.is_finished() && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    ensure!(
        loader.is_finished(),
        "the load did not end within 10 s of the hot removal"
    );
    // With the removed controller's namespace closed, the driver goes (and with it the
    // other controller); the agent lets nvme_core go once no controller is left.
    run("rmmod", &["nvme"])?;
    let detached_after = wait_attached(false, Duration::from_secs(5))?;
    c.metric(
        "detached_after_s",
        format!("{:.2}", detached_after.as_secs_f64()),
    );
    run("rmmod", &["nvme_core"]).context("nvme_core should be free once the agent detached")?;
    ensure!(!loaded("nvme_core"), "nvme_core still loaded");
    let m = metrics()?;
    let (good, bad) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    let counted = nvme_reads(&m, &disk) - r0;
    c.detail(format!(
        "under load: {good} reads completed, {bad} failed by the removal; {counted} NVMe reads counted on {disk}"
    ));
    ensure!(
        counted >= good as f64,
        "{good} reads completed under load but only {counted} NVMe reads counted"
    );
    ensure!(
        drops(&m) == d0,
        "NVMe drops went from {d0} to {}: a command was lost",
        drops(&m)
    );

    // Reload, and bring the hot-removed controller back.
    insmod_all()?;
    std::fs::write("/sys/bus/pci/rescan", "1").context("PCI rescan")?;
    wait_namespaces(c)?;
    wait_attached(true, Duration::from_secs(5))?;
    let after = exact_reads(c, N, "after_reload")?;
    ensure!(
        agent.0.id() > 0 && crate::agent::http_get("/metrics").is_ok(),
        "the agent stopped serving"
    );
    drop(agent);
    let lines = nvme_log_lines(&agent_log(log));
    for l in &lines {
        c.detail(format!("log: {l}"));
    }
    ensure!(
        lines.iter().any(|l| l.contains("NVMe tracing paused")),
        "the log does not say NVMe tracing paused"
    );
    ensure!(
        lines
            .iter()
            .filter(|l| l.contains("NVMe tracing on"))
            .count()
            >= 2,
        "the log does not say NVMe attached again"
    );
    Ok(format!(
        "{before}; hot removal under load ({good} ok, {bad} failed, {counted} counted), rmmod nvme, detached in {:.2} s, rmmod nvme_core ok; {after}",
        detached_after.as_secs_f64()
    ))
}
