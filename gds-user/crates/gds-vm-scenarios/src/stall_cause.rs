//! Why an NVMe stall is stuck (issue 24), on the guests' real (emulated) NVMe controllers:
//! reads held by the throttled controller are `device` stalls naming the commands outstanding,
//! and a controller reset while reads wait shows in the stalls' evidence (the controller not
//! `live`, the commands the reset cancelled as `Command Aborted By Host` errors).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use gds_api::model::{CauseKind, Layer, Stall, StallReport};
use gds_nvme::DmaBuffer;

use crate::nvme::{Ns, SLOW_SERIAL, find_ns};
use crate::tracing::start_agent_logged;
use crate::{Ctx, Scenario};

pub fn scenarios() -> Vec<Scenario> {
    let s = Scenario::new;
    vec![
        s(
            "stall.nvme-device-cause",
            "O_DIRECT reads held by the throttled controller are block and NVMe stalls with cause device, naming the controller's commands outstanding",
            240,
            device_cause,
        ),
        s(
            "stall.nvme-reset",
            "reset_controller while reads wait on the throttled controller: stalls' evidence shows the controller not live and the commands the reset cancelled",
            300,
            reset,
        ),
    ]
}

fn stalls() -> Result<StallReport> {
    serde_json::from_str(&crate::agent::http_get("/debug/stalls")?).context("parsing /debug/stalls")
}

/// `threads` threads named `gds-stall-rd`, each reading `reads` × 4 KiB with O_DIRECT from
/// `blk` at distinct offsets.
fn readers(
    blk: &str,
    threads: u64,
    reads: u64,
) -> Result<Vec<std::thread::JoinHandle<Result<()>>>> {
    (0..threads)
        .map(|t| {
            let blk = blk.to_owned();
            std::thread::Builder::new()
                .name("gds-stall-rd".into())
                .spawn(move || -> Result<()> {
                    use std::os::unix::fs::FileExt;
                    let f = crate::util::open_direct(&blk, false)?;
                    let mut buf = DmaBuffer::new(4096);
                    for i in 0..reads {
                        // SAFETY: buf is 4096 bytes, aligned.
                        let slice =
                            unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr(), 4096) };
                        f.read_exact_at(slice, (t * reads + i) * 4096)
                            .with_context(|| format!("read {i} of reader {t}"))?;
                    }
                    Ok(())
                })
                .context("spawning a reader")
        })
        .collect()
}

fn join(readers: Vec<std::thread::JoinHandle<Result<()>>>) -> Result<()> {
    for r in readers {
        r.join()
            .map_err(|_| anyhow::anyhow!("a reader panicked"))??;
    }
    Ok(())
}

/// Stalls of this process on `disk` at the device, with their evidence, active or ended.
fn ours<'a>(r: &'a StallReport, disk: &'a str) -> impl Iterator<Item = &'a Stall> {
    let me = std::process::id();
    r.active
        .iter()
        .chain(&r.ended)
        .filter(move |s| s.request.ctx.pid == me && s.request.target.disk == disk)
}

fn start(c: &Ctx, log: &str) -> Result<crate::agent::Agent> {
    let me = std::process::id().to_string();
    start_agent_logged(
        c,
        &[
            "--pid",
            &me,
            "--stall-threshold",
            "150ms",
            "--stall-interval",
            "50ms",
        ],
        log,
    )
}

/// The agent's `stall detected` log lines about `disk` (the cause and its one line).
fn log_lines(log: &str, disk: &str, want: &str) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("stall detected") && l.contains(disk) && l.contains(want))
        .map(str::to_owned)
        .collect()
}

/// The same stall seen again (the JSON has no request key): same request, same capture. A
/// command requeued after the reset is a new stall with a new capture.
fn same(a: &Stall, b: &Stall) -> bool {
    let (x, y) = (&a.request, &b.request);
    (
        x.layer,
        x.ctx.tid,
        x.target.sector,
        x.target.lba,
        &a.cause.because,
    ) == (
        y.layer,
        y.ctx.tid,
        y.target.sector,
        y.target.lba,
        &b.cause.because,
    )
}

fn ns_disk(ns: &Ns) -> String {
    ns.blk.trim_start_matches("/dev/").to_owned()
}

fn device_cause(c: &Ctx) -> Result<String> {
    let ns = find_ns(SLOW_SERIAL, 1)?;
    let (disk, ctrl) = (ns_disk(&ns), ns.ctrl.trim_start_matches("/dev/").to_owned());
    let log = "/tmp/agent-device-cause.log";
    let _agent = start(c, log)?;
    // 32 readers against QEMU's 50 IOPS: each read waits at the device for hundreds of ms.
    let rd = readers(&ns.blk, 32, 3)?;
    let mut seen: Vec<Stall> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while [Layer::Block, Layer::Nvme]
        .iter()
        .any(|l| !seen.iter().any(|s| s.request.layer == *l))
    {
        ensure!(
            Instant::now() < deadline,
            "no block and NVMe stalls with evidence: {seen:?}"
        );
        let r = stalls()?;
        for s in ours(&r, &disk) {
            if s.evidence.is_some() && !seen.iter().any(|x| x.request.layer == s.request.layer) {
                seen.push(s.clone());
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    join(rd)?;
    for s in &seen {
        c.detail(format!(
            "{} stall: cause {} because \"{}\"",
            s.request.layer.label(),
            s.cause.kind.label(),
            s.cause.because
        ));
        let d = s.evidence.as_ref().and_then(|e| e.disk.as_ref());
        c.detail(format!(
            "{} evidence disk: {}",
            s.request.layer.label(),
            serde_json::to_string(&d)?
        ));
        ensure!(
            s.cause.kind == CauseKind::Device,
            "not a device stall: {s:?}"
        );
        let n = d
            .and_then(|d| d.nvme.as_ref())
            .with_context(|| format!("no NVMe evidence: {s:?}"))?;
        ensure!(
            n.controllers
                .iter()
                .any(|c| c.name == ctrl && c.state == "live"),
            "controller {ctrl} not named live: {n:?}"
        );
        let out = n
            .outstanding
            .with_context(|| format!("no commands outstanding: {n:?}"))?;
        ensure!(out >= 1, "{out} commands outstanding while one stalls");
        ensure!(
            s.cause
                .because
                .contains(&format!("{out} NVMe commands outstanding")),
            "because does not name the commands outstanding: {}",
            s.cause.because
        );
    }
    for l in log_lines(log, &disk, "cause=device").iter().take(2) {
        c.detail(format!("log: {l}"));
    }
    let out = |l: Layer| {
        seen.iter()
            .find(|s| s.request.layer == l)
            .and_then(|s| {
                s.evidence
                    .as_ref()?
                    .disk
                    .as_ref()?
                    .nvme
                    .as_ref()?
                    .outstanding
            })
            .unwrap_or(0)
    };
    Ok(format!(
        "block and NVMe stalls on {disk}: cause device, controller {ctrl} live, {} / {} NVMe commands outstanding",
        out(Layer::Block),
        out(Layer::Nvme)
    ))
}

fn reset(c: &Ctx) -> Result<String> {
    let ns = find_ns(SLOW_SERIAL, 1)?;
    let (disk, ctrl) = (ns_disk(&ns), ns.ctrl.trim_start_matches("/dev/").to_owned());
    let state_file = format!("/sys/class/nvme/{ctrl}/state");
    let log = "/tmp/agent-nvme-reset.log";
    let _agent = start(c, log)?;
    // 64 readers × 4 reads at 50 IOPS: about 5 s of reads, 64 commands at the controller.
    let rd = readers(&ns.blk, 64, 4)?;
    // Wait until reads wait at the device (a stall of ours), then reset.
    let deadline = Instant::now() + Duration::from_secs(60);
    while ours(&stalls()?, &disk).next().is_none() {
        ensure!(Instant::now() < deadline, "no stall before the reset");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The controller's states while the reset runs, sampled every 2 ms.
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (done, state_file) = (done.clone(), state_file.clone());
        std::thread::spawn(move || {
            let mut changes: Vec<(f64, String)> = Vec::new();
            let t0 = Instant::now();
            while !done.load(Ordering::Relaxed) {
                let s = std::fs::read_to_string(&state_file).unwrap_or_default();
                let s = s.trim().to_owned();
                if changes.last().is_none_or(|(_, last)| *last != s) {
                    changes.push((t0.elapsed().as_secs_f64(), s));
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            changes
        })
    };
    let t0 = Instant::now();
    // The write returns once the reset is done (`nvme_reset_ctrl_sync`).
    std::fs::write(format!("/sys/class/nvme/{ctrl}/reset_controller"), "1")
        .with_context(|| format!("resetting {ctrl}"))?;
    let reset_s = t0.elapsed().as_secs_f64();
    // Stalls detected while the reset ran, and after it (the requeued commands).
    let mut all: Vec<Stall> = Vec::new();
    let watch_until = Instant::now() + Duration::from_secs(30);
    let mut finished = false;
    while Instant::now() < watch_until && !finished {
        finished = rd.iter().all(|r| r.is_finished());
        let r = stalls()?;
        for s in ours(&r, &disk) {
            // The latest state of each: a stall first seen active is kept with its total once
            // it is seen ended.
            match all.iter_mut().find(|x| same(x, s)) {
                Some(x) if s.total_seconds.is_some() => *x = s.clone(),
                Some(_) => {}
                None => all.push(s.clone()),
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    done.store(true, Ordering::Relaxed);
    let states = sampler
        .join()
        .map_err(|_| anyhow::anyhow!("sampler panicked"))?;
    let reads = join(rd);
    c.detail(format!(
        "reset_controller write took {reset_s:.3} s; {ctrl} states: {states:?}; reads: {}",
        reads
            .as_ref()
            .map_or_else(|e| format!("{e:#}"), |_| "all returned".into())
    ));
    let not_live: Vec<&Stall> = all
        .iter()
        .filter(|s| {
            s.evidence
                .as_ref()
                .and_then(|e| e.disk.as_ref()?.nvme.as_ref())
                .is_some_and(|n| n.not_live().any(|c| c.name == ctrl))
        })
        .collect();
    // The error completions the captures saw around the reset, by status.
    let mut statuses: std::collections::BTreeMap<String, u64> = Default::default();
    for n in all
        .iter()
        .filter_map(|s| s.evidence.as_ref()?.disk.as_ref()?.nvme.as_ref())
    {
        for e in &n.errors {
            let m = statuses.entry(e.status.clone()).or_default();
            *m = (*m).max(e.count);
        }
    }
    // The stalls that waited through the reset: detected before it ended, ended after.
    let waited = all
        .iter()
        .filter(|s| s.total_seconds.is_some_and(|t| t >= reset_s))
        .count();
    let errors_total: Vec<String> = crate::tracing::metrics()?
        .lines()
        .filter(|l| l.starts_with("gds_nvme_errors_total") && l.contains(&disk))
        .map(str::to_owned)
        .collect();
    c.detail(format!(
        "errors in stalls' evidence (most in one capture): {statuses:?}; {errors_total:?}"
    ));
    for s in not_live.iter().take(2) {
        c.detail(format!(
            "{} stall: cause {} because \"{}\"",
            s.request.layer.label(),
            s.cause.kind.label(),
            s.cause.because
        ));
    }
    for l in log_lines(log, &disk, &format!("controller {ctrl}"))
        .iter()
        .take(2)
    {
        c.detail(format!("log: {l}"));
    }
    c.detail(format!(
        "{} stalls of ours; {} captured with {ctrl} not live; {waited} lasted the whole reset",
        all.len(),
        not_live.len(),
    ));
    ensure!(
        states.iter().any(|(_, s)| s != "live"),
        "the reset never showed in {state_file}: {states:?}"
    );
    ensure!(
        !not_live.is_empty(),
        "no stall captured while {ctrl} was not live (states {states:?}, reset {reset_s:.3} s)"
    );
    let s = not_live[0];
    ensure!(
        s.cause.kind == CauseKind::Device
            && s.cause.because.starts_with(&format!("controller {ctrl} ")),
        "a stall captured during the reset does not name the controller first: {:?}",
        s.cause
    );
    ensure!(
        s.cause.because.contains(" NVMe commands outstanding")
            && s.evidence
                .as_ref()
                .and_then(|e| e.disk.as_ref()?.nvme.as_ref()?.outstanding)
                .is_some_and(|n| n >= 1),
        "a stall during the reset does not name the commands waiting for it: {:?}",
        s.cause
    );
    ensure!(waited >= 1, "no stall lasted through the reset");
    reads?;
    Ok(format!(
        "reset of {ctrl} took {reset_s:.2} s; {} of {} stalls captured with {ctrl} not live (\"{}\"), {waited} lasted through it; errors seen: {statuses:?}",
        not_live.len(),
        all.len(),
        s.cause.because.split(';').next().unwrap_or(""),
    ))
}
