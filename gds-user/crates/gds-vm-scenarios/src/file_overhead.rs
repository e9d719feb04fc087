//! What the file layer's guest tiers cost the application, per call (`file.overhead`, run
//! only when named: it reports, it does not gate): 4 KiB O_DIRECT `pread64`s of the main
//! namespace's block device (`blkdev_read_iter`, hooked like the file systems' `read_iter`;
//! no file system, whose lazy initialisation after `mkfs` made reads 30x slower at times) and
//! a raw `getpid` loop, untraced and with `gds-agent run --file-hooks fentry` / `kprobe` (the
//! whole agent: block and NVMe programs too), the modes interleaved. The host bench
//! (`benches/file_overhead.rs`) does the same where only the tracepoints load. Under TCG
//! emulation the absolute times are the emulator's and noisy; the ratios (untraced / traced)
//! are what compares.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use gds_nvme::DmaBuffer;

use crate::nvme::{MAIN_SERIAL, find_ns};
use crate::tracing::start_agent_logged;
use crate::util::open_direct;
use crate::{Ctx, Scenario};

const ROUNDS: usize = 3;
const ROUND_TIME: Duration = Duration::from_millis(300);
/// Untraced / fentry / kprobe, interleaved this many times (odd: the median is one of them).
const CYCLES: usize = 5;
/// The part of the namespace read, round and round.
const SPAN_MIB: usize = 64;

pub fn scenarios() -> Vec<Scenario> {
    if !Path::new("/etc/gds-modules").exists() {
        return Vec::new();
    }
    vec![Scenario {
        name: "file.overhead",
        about: "per-call cost of --file-hooks fentry and kprobe: 4 KiB O_DIRECT pread64 and getpid, untraced vs traced (reported, not gated)",
        timeout: Duration::from_secs(900),
        explicit: true,
        run: overhead,
    }]
}

/// ns per call of `f`: the median of [`ROUNDS`] rounds of [`ROUND_TIME`].
fn per_call(f: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
    let mut v = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        let t0 = Instant::now();
        let mut n = 0u64;
        while t0.elapsed() < ROUND_TIME {
            for _ in 0..16 {
                f()?;
            }
            n += 16;
        }
        v.push(t0.elapsed().as_nanos() as f64 / n as f64);
    }
    Ok(median(v))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn overhead(c: &Ctx) -> Result<String> {
    let ns = find_ns(MAIN_SERIAL, 1)?;
    let file = open_direct(&ns.blk, false)?;
    let fd = file.as_raw_fd();
    let mut buf = DmaBuffer::new(4096);
    let ptr = buf.as_mut_ptr();
    let mut off = 0i64;
    let mut pread = || -> Result<()> {
        // SAFETY: the buffer is 4096 bytes, aligned for O_DIRECT.
        let n = unsafe { libc::pread64(fd, ptr.cast(), 4096, off) };
        ensure!(n == 4096, "pread64 gave {n}");
        off = (off + 4096) % (SPAN_MIB << 20) as i64;
        Ok(())
    };
    let mut getpid = || -> Result<()> {
        // SAFETY: no preconditions; the raw syscall, not a cached value.
        unsafe { libc::syscall(libc::SYS_getpid) };
        Ok(())
    };
    // Warm up.
    per_call(&mut pread)?;
    per_call(&mut getpid)?;
    let modes = ["untraced", "fentry", "kprobe"];
    let mut got: Vec<Vec<(f64, f64)>> = vec![Vec::new(); modes.len()];
    for cycle in 0..CYCLES {
        for (i, mode) in modes.iter().enumerate() {
            let _agent = if *mode == "untraced" {
                None
            } else {
                let log = format!("/tmp/agent-overhead-{mode}.log");
                let agent = start_agent_logged(c, &["--file-hooks", mode], &log)?;
                // Let its start-up work end before timing.
                std::thread::sleep(Duration::from_secs(2));
                Some(agent)
            };
            let p = per_call(&mut pread)?;
            let g = per_call(&mut getpid)?;
            c.detail(format!(
                "cycle {cycle} {mode}: pread64 {p:.0} ns, getpid {g:.0} ns"
            ));
            got[i].push((p, g));
        }
    }
    let med = |i: usize, which: fn(&(f64, f64)) -> f64| median(got[i].iter().map(which).collect());
    let first: fn(&(f64, f64)) -> f64 = |p| p.0;
    let second: fn(&(f64, f64)) -> f64 = |p| p.1;
    let mut summary = Vec::new();
    for (name, which) in [("pread64 4 KiB O_DIRECT", first), ("getpid", second)] {
        let base = med(0, which);
        let mut line = format!("{name}: untraced {base:.0} ns");
        for (i, mode) in modes.iter().enumerate().skip(1) {
            let t = med(i, which);
            line.push_str(&format!(
                ", {mode} {t:.0} ns ({:+.0} ns, ratio {:.3})",
                t - base,
                base / t
            ));
            c.metric(
                &format!("{}_{mode}_ratio", name.split(' ').next().unwrap_or(name)),
                format!("{:.3}", base / t),
            );
        }
        c.detail(&line);
        summary.push(line);
    }
    Ok(summary.join("; "))
}
