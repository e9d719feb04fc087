//! NVMe tracing inside the guests (issue: trace NVMe commands and split latency into stages).
//!
//! Each scenario starts `gds-agent run` in the guest, drives real NVMe I/O (passthrough on
//! /dev/ngXnY or block reads on /dev/nvmeXnY), and checks what the agent exports.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use gds_nvme::{DmaBuffer, NvmeReadCmd, NvmeRing, UringCmdOp, namespace_geometry};

use crate::agent::{Agent, counter, http_get};
use crate::nvme::{MAIN_SERIAL, SLOW_SERIAL, find_ns};
use crate::{Ctx, Scenario};

pub fn scenarios() -> Vec<Scenario> {
    let s = Scenario::new;
    vec![
        s(
            "trace.passthrough-stages",
            "N passthrough reads -> exactly N NVMe reads for that disk; stages add up, device <= e2e",
            180,
            passthrough_stages,
        ),
        s(
            "trace.block-reads",
            "block-layer reads of /dev/nvmeXnY show in NVMe and block metrics (memory host), not as URING_CMD",
            180,
            block_reads,
        ),
        s(
            "trace.error-status",
            "an out-of-range LBA read reaches gds_nvme_errors_total with its status name",
            180,
            error_status,
        ),
        s(
            "trace.throttled-device-stage",
            "with QEMU throttling the device stage dominates; slow events and stalls name disk, qid, cid, LBA",
            240,
            throttled,
        ),
        s(
            "trace.block-nvme-stalls",
            "O_DIRECT reads (no io_uring) held by the throttled controller are block and NVMe stalls naming disk, sector/LBA, pid and comm of the reader, and end",
            240,
            block_nvme_stalls,
        ),
    ]
}

/// Starts the agent, waits until it serves /metrics, and reports how long that took.
fn start_agent(c: &Ctx, args: &[&str]) -> Result<Agent> {
    let since = Instant::now();
    let agent = Agent::start(c, args)?;
    ready(c, since);
    Ok(agent)
}

/// [`start_agent`] with the agent's log written to `log` (for scenarios that check what it
/// said).
pub fn start_agent_logged(c: &Ctx, args: &[&str], log: &str) -> Result<Agent> {
    let since = Instant::now();
    let agent = Agent::start_logged(c, args, Some(log))?;
    ready(c, since);
    Ok(agent)
}

fn ready(c: &Ctx, since: Instant) {
    c.metric(
        "agent_ready_s",
        format!("{:.1}", since.elapsed().as_secs_f64()),
    );
}

pub fn metrics() -> Result<String> {
    http_get("/metrics")
}

pub fn json(path: &str) -> Result<serde_json::Value> {
    serde_json::from_str(&http_get(path)?).with_context(|| format!("parsing {path}"))
}

/// `layer`'s entry on the running agent's `/debug/layers`, read back into the agent's type.
pub fn layer_entry(layer: gds_api::raw::Layer) -> Result<gds_api::raw::LayerEntry> {
    let layers: gds_api::raw::Layers =
        serde_json::from_str(&http_get("/debug/layers")?).context("parsing /debug/layers")?;
    layers
        .get(layer)
        .cloned()
        .with_context(|| format!("/debug/layers has no {} entry: {layers:?}", layer.label()))
}

/// Slow events with NVMe context on `disk`, polled until at least `want` arrived (events
/// reach the agent through the ring buffer a little after the I/O completes).
fn slow_events(c: &Ctx, disk: &str, want: usize) -> Result<Vec<serde_json::Value>> {
    let start = Instant::now();
    loop {
        let all = json("/debug/slow")?;
        let all = all.as_array().cloned().unwrap_or_default();
        let mine: Vec<_> = all
            .iter()
            .filter(|e| e.get("nvme").is_some_and(|n| n["disk"] == disk))
            .cloned()
            .collect();
        if mine.len() >= want || start.elapsed() > Duration::from_secs(10) {
            if mine.len() < want {
                c.detail(format!(
                    "{} events in all; first: {:?}",
                    all.len(),
                    all.first()
                ));
            }
            return Ok(mine);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn disk_of(blk: &str) -> String {
    blk.trim_start_matches("/dev/").to_owned()
}

/// Polls /metrics until `cond` holds (the agent reads maps at scrape time; events lag a bit).
pub fn wait_metrics(what: &str, cond: impl Fn(&str) -> bool) -> Result<String> {
    let start = Instant::now();
    loop {
        let m = metrics()?;
        if cond(&m) {
            return Ok(m);
        }
        if start.elapsed() > Duration::from_secs(15) {
            bail!("{what} never held; metrics:\n{}", relevant(&m));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn relevant(m: &str) -> String {
    m.lines()
        .filter(|l| {
            !l.starts_with('#')
                && !l.contains("_bucket")
                && (l.contains("nvme")
                    || l.contains("stage")
                    || l.contains("URING_CMD")
                    || l.contains("dropped"))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Reads `n` x 4 KiB through passthrough at QD `qd`, returns the ring for reuse.
pub fn passthrough_reads(ng: &str, lba0: u64, n: u64, qd: u32) -> Result<()> {
    let g = namespace_geometry(Path::new(ng))?;
    let blocks = (4096 / g.lba_size).max(1);
    let mut ring = NvmeRing::open(ng, qd)?;
    let mut bufs: Vec<DmaBuffer> = (0..qd).map(|_| DmaBuffer::new(4096)).collect();
    let mut done = Vec::new();
    let mut next = 0u64;
    let mut completed = 0u64;
    while completed < n {
        while next < n && ring.in_flight() + ring.queued() < qd {
            let slot = (next % qd as u64) as usize;
            let cmd = NvmeReadCmd::new(g.nsid, lba0 + next * blocks as u64, blocks)
                .buffer(bufs[slot].as_mut_ptr(), 4096)
                .build(&g)?;
            // SAFETY: bufs outlive the completions reaped below; one command per buffer slot.
            unsafe { ring.push(&cmd, UringCmdOp::Io, None, next)? };
            next += 1;
        }
        done.clear();
        ring.wait(1, &mut done)?;
        for c in &done {
            ensure!(
                c.res == 0,
                "passthrough read {} failed: res {}",
                c.user_data,
                c.res
            );
        }
        completed += done.len() as u64;
    }
    Ok(())
}

fn passthrough_stages(c: &Ctx) -> Result<String> {
    const N: u64 = 100;
    let ns = find_ns(MAIN_SERIAL, 1)?;
    let disk = disk_of(&ns.blk);
    // Every request is "slow" (1 ns): each one's stage times come back as an event.
    let _agent = start_agent(c, &["--slow-threshold", "1ns"])?;
    let before = metrics()?;
    let reads = |m: &str| {
        counter(
            m,
            "gds_nvme_commands_total",
            &[&format!("disk=\"{disk}\""), "opcode=\"read\""],
        )
    };
    let r0 = reads(&before);
    passthrough_reads(&ns.ng, 4096, N, 1)?;
    let m = wait_metrics("N NVMe reads counted", |m| reads(m) - r0 >= N as f64)?;
    let got = reads(&m) - r0;
    ensure!(
        got == N as f64,
        "{N} passthrough reads became {got} NVMe reads on {disk}"
    );
    let stage_count = counter(
        &m,
        "gds_request_stage_duration_seconds_count",
        &["stage=\"device\"", &format!("disk=\"{disk}\"")],
    );
    ensure!(
        stage_count >= N as f64,
        "device stage count {stage_count} < {N}"
    );
    // Per request: the slow events carry the stage times.
    let events = slow_events(c, &disk, N as usize)?;
    let mut checked = 0;
    for e in &events {
        let n = &e["nvme"];
        let e2e = e["latency_seconds"].as_f64().unwrap_or(0.0);
        let (q, d, cpl) = (
            n["queue_seconds"].as_f64().unwrap_or(-1.0),
            n["device_seconds"].as_f64().unwrap_or(-1.0),
            n["completion_seconds"].as_f64().unwrap_or(-1.0),
        );
        ensure!(q >= 0.0 && d >= 0.0 && cpl >= 0.0, "negative stage in {e}");
        ensure!(d <= e2e, "device {d} > end-to-end {e2e}: {e}");
        ensure!(
            ((q + d + cpl) - e2e).abs() <= 0.05 * e2e,
            "stages {q}+{d}+{cpl} != {e2e}"
        );
        ensure!(
            n["qid"].as_u64().unwrap_or(0) >= 1,
            "I/O queue id missing: {e}"
        );
        checked += 1;
    }
    ensure!(
        checked >= N as usize,
        "only {checked} slow events with NVMe context, want {N}"
    );
    c.detail(relevant(&m));
    Ok(format!(
        "{N} passthrough reads -> {got} NVMe reads on {disk}; {checked} requests: stages sum to e2e, device <= e2e"
    ))
}

fn block_reads(c: &Ctx) -> Result<String> {
    const N: u64 = 64;
    let ns = find_ns(MAIN_SERIAL, 1)?;
    let disk = disk_of(&ns.blk);
    let _agent = start_agent(c, &[])?;
    let m0 = metrics()?;
    let nvme_reads = |m: &str| {
        counter(
            m,
            "gds_nvme_commands_total",
            &[&format!("disk=\"{disk}\""), "opcode=\"read\""],
        )
    };
    // Debian kernels have no CONFIG_PCI_P2PDMA: every request is host memory, said so.
    let block = |m: &str| {
        counter(
            m,
            "gds_block_request_duration_seconds_count",
            &[
                &format!("disk=\"{disk}\""),
                "op=\"read\"",
                "memory=\"host\"",
            ],
        )
    };
    let uring_cmd = |m: &str| counter(m, "gds_uring_requests_total", &["opcode=\"URING_CMD\""]);
    let (n0, b0, u0) = (nvme_reads(&m0), block(&m0), uring_cmd(&m0));
    // O_DIRECT 4 KiB reads at distinct offsets: one block request and one NVMe read each.
    let f = crate::util::open_direct(&ns.blk, false)?;
    let mut buf = DmaBuffer::new(4096);
    for i in 0..N {
        use std::os::unix::fs::FileExt;
        // SAFETY: buf is 4096 bytes, aligned.
        let slice = unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr(), 4096) };
        f.read_exact_at(slice, (1 << 20) + i * 4096)?;
    }
    let m = wait_metrics("block reads counted", |m| {
        nvme_reads(m) - n0 >= N as f64 && block(m) - b0 >= N as f64
    })?;
    let (dn, db, du) = (nvme_reads(&m) - n0, block(&m) - b0, uring_cmd(&m) - u0);
    ensure!(
        dn == N as f64 && db == N as f64,
        "{N} O_DIRECT reads -> {dn} NVMe reads, {db} block reads"
    );
    ensure!(
        du == 0.0,
        "block reads must not count as URING_CMD (got {du})"
    );
    Ok(format!(
        "{N} O_DIRECT reads of {} -> {dn} NVMe reads, {db} block reads, 0 URING_CMD",
        ns.blk
    ))
}

fn error_status(c: &Ctx) -> Result<String> {
    let ns = find_ns(MAIN_SERIAL, 1)?;
    let disk = disk_of(&ns.blk);
    let g = namespace_geometry(Path::new(&ns.ng))?;
    let _agent = start_agent(c, &[])?;
    let errs = |m: &str| {
        counter(
            m,
            "gds_nvme_errors_total",
            &[&format!("disk=\"{disk}\""), "status=\"LBA Out of Range\""],
        )
    };
    let e0 = errs(&metrics()?);
    let mut ring = NvmeRing::open(&ns.ng, 1)?;
    let mut buf = DmaBuffer::new(g.lba_size as usize);
    let cmd = NvmeReadCmd::new(g.nsid, g.capacity_blocks, 1)
        .buffer(buf.as_mut_ptr(), g.lba_size as usize)
        .build_unchecked()?;
    // SAFETY: buf outlives the synchronous execute.
    let res = unsafe { ring.execute(&cmd, UringCmdOp::Io, None) };
    ensure!(res.is_err(), "read past capacity succeeded");
    let m = wait_metrics("error counted", |m| errs(m) - e0 >= 1.0)?;
    ensure!(
        errs(&m) - e0 == 1.0,
        "want exactly one LBA Out of Range error"
    );
    Ok(format!(
        "gds_nvme_errors_total{{disk=\"{disk}\",status=\"LBA Out of Range\"}} +1"
    ))
}

fn throttled(c: &Ctx) -> Result<String> {
    let ns = find_ns(SLOW_SERIAL, 1)?;
    let disk = disk_of(&ns.blk);
    let _agent = Agent::start(
        c,
        &[
            "--slow-threshold",
            "20ms",
            "--stall-threshold",
            "150ms",
            "--stall-interval",
            "50ms",
        ],
    )?;
    // QEMU lets a burst through unthrottled, then 50 IOPS: 200 reads at QD 16 keep requests
    // waiting at the device for hundreds of milliseconds.
    let t0 = Instant::now();
    passthrough_reads(&ns.ng, 0, 200, 16)?;
    c.detail(format!(
        "200 reads at QD 16 took {:.2} s",
        t0.elapsed().as_secs_f64()
    ));
    let events = slow_events(c, &disk, 10)?;
    let mut device_dominant = 0;
    let mut total = 0;
    for e in &events {
        let n = &e["nvme"];
        total += 1;
        for k in ["qid", "cid", "lba", "blocks"] {
            ensure!(n.get(k).is_some(), "slow event without {k}: {e}");
        }
        let (q, d, cpl) = (
            n["queue_seconds"].as_f64().unwrap_or(0.0),
            n["device_seconds"].as_f64().unwrap_or(0.0),
            n["completion_seconds"].as_f64().unwrap_or(0.0),
        );
        if d > q + cpl {
            device_dominant += 1;
        }
    }
    ensure!(total >= 5, "only {total} slow events on {disk}");
    ensure!(
        device_dominant * 10 >= total * 9,
        "device stage dominates in {device_dominant} of {total}"
    );
    let stalls = json("/debug/stalls")?;
    let all: Vec<&serde_json::Value> = stalls["active"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(stalls["ended"].as_array().into_iter().flatten())
        .collect();
    let at_device: Vec<_> = all
        .iter()
        .filter(|s| s["layer"] == "uring" && s["stage"] == "device" && s["disk"] == disk.as_str())
        .collect();
    ensure!(
        !at_device.is_empty(),
        "no stall at the device stage: {stalls}"
    );
    let s = at_device[0];
    ensure!(s["nvme"]["lba"].is_u64(), "stall without LBA: {s}");
    c.detail(format!("stall: {s}"));
    Ok(format!(
        "{total} slow reads on {disk}, device stage dominant in {device_dominant}; {} stalls at the device, e.g. LBA {}",
        at_device.len(),
        s["nvme"]["lba"]
    ))
}

/// O_DIRECT `pread`s of the throttled controller's namespace from threads named
/// `gds-stall-rd`, no io_uring: 32 at once against QEMU's 50 IOPS keep each at the device for
/// hundreds of milliseconds, past the 150 ms threshold. Each must be a stall of layer `block`
/// (disk, sector) and of layer `nvme` (qid, cid, LBA), both naming this process and the
/// reading thread, and both must be reported ended once the reads return.
fn block_nvme_stalls(c: &Ctx) -> Result<String> {
    const THREADS: u64 = 32;
    const READS: u64 = 3;
    let ns = find_ns(SLOW_SERIAL, 1)?;
    let disk = disk_of(&ns.blk);
    let me = std::process::id();
    let _agent = start_agent(
        c,
        &[
            "--pid",
            &me.to_string(),
            "--stall-threshold",
            "150ms",
            "--stall-interval",
            "50ms",
        ],
    )?;
    let t0 = Instant::now();
    let readers: Vec<_> = (0..THREADS)
        .map(|t| {
            let blk = ns.blk.clone();
            std::thread::Builder::new()
                .name("gds-stall-rd".into())
                .spawn(move || -> Result<()> {
                    use std::os::unix::fs::FileExt;
                    let f = crate::util::open_direct(&blk, false)?;
                    let mut buf = DmaBuffer::new(4096);
                    for i in 0..READS {
                        // SAFETY: buf is 4096 bytes, aligned.
                        let slice =
                            unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr(), 4096) };
                        f.read_exact_at(slice, (t * READS + i) * 4096)?;
                    }
                    Ok(())
                })
                .context("spawning a reader")
        })
        .collect::<Result<_>>()?;
    let ours = |s: &serde_json::Value, layer: &str| {
        s["layer"] == layer && s["disk"] == disk.as_str() && s["pid"] == me
    };
    let mut seen: Vec<serde_json::Value> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(seen.iter().any(|s| s["layer"] == "block") && seen.iter().any(|s| s["layer"] == "nvme"))
    {
        ensure!(
            Instant::now() < deadline,
            "no block and NVMe stalls: {seen:?}"
        );
        let r = json("/debug/stalls")?;
        for s in r["active"].as_array().into_iter().flatten() {
            if (ours(s, "block") || ours(s, "nvme"))
                && !seen.iter().any(|x| x["layer"] == s["layer"])
            {
                seen.push(s.clone());
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for r in readers {
        r.join()
            .map_err(|_| anyhow::anyhow!("a reader panicked"))??;
    }
    let took = t0.elapsed();
    for s in &seen {
        ensure!(
            s["comm"] == "gds-stall-rd",
            "stall without the reader's comm: {s}"
        );
        ensure!(
            s["tid"].as_u64().is_some_and(|t| t != u64::from(me)),
            "stall names the main thread: {s}"
        );
        ensure!(s["stage"] == "device", "not at the device: {s}");
    }
    let block = seen.iter().find(|s| s["layer"] == "block").unwrap();
    let nvme = seen.iter().find(|s| s["layer"] == "nvme").unwrap();
    ensure!(
        block["sector"].is_u64() && block["opcode"] == "read",
        "block stall: {block}"
    );
    ensure!(
        nvme["lba"].is_u64()
            && nvme["nvme"]["qid"].as_u64().is_some_and(|q| q > 0)
            && nvme["nvme"]["cid"].is_u64(),
        "NVMe stall: {nvme}"
    );
    // Every stall of ours ends once the reads returned (the scan after the last completion).
    let deadline = Instant::now() + Duration::from_secs(5);
    let ended = loop {
        let r = json("/debug/stalls")?;
        let active = r["active"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| ours(s, "block") || ours(s, "nvme"))
            .count();
        let ended: Vec<serde_json::Value> = r["ended"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| ours(s, "block") || ours(s, "nvme"))
            .cloned()
            .collect();
        if active == 0
            && ["block", "nvme"]
                .iter()
                .all(|l| ended.iter().any(|s| s["layer"] == *l))
        {
            break ended;
        }
        ensure!(Instant::now() < deadline, "stalls never ended: {r}");
        std::thread::sleep(Duration::from_millis(50));
    };
    ensure!(
        ended
            .iter()
            .all(|s| s["total_seconds"].as_f64().is_some_and(|t| t >= 0.15)),
        "ended stalls without their total: {ended:?}"
    );
    let m = metrics()?;
    let total = |layer: &str| {
        counter(
            &m,
            "gds_stalls_total",
            &[&format!("layer=\"{layer}\""), &format!("disk=\"{disk}\"")],
        )
    };
    let (nb, nn) = (total("block"), total("nvme"));
    ensure!(
        nb >= 1.0 && nn >= 1.0,
        "gds_stalls_total: block {nb}, nvme {nn}"
    );
    c.detail(format!("block stall: {block}"));
    c.detail(format!("NVMe stall: {nvme}"));
    Ok(format!(
        "{} reads in {:.1} s: {nb} block and {nn} NVMe stalls on {disk}, e.g. sector {} / LBA {} by gds-stall-rd",
        THREADS * READS,
        took.as_secs_f64(),
        block["sector"],
        nvme["lba"]
    ))
}
