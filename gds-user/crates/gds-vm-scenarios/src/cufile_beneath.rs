//! The I/O beneath cuFile's calls taken from the file layer's kiocb hooks (issue 23, "cuFile
//! beneath from the kernel"), in the generic guests where fentry and kprobes load: a file on
//! ext4 (hooked) registered with cuFile gets its compat reads linked in the kernel and the
//! process no libc probe; a file on tmpfs (not hooked) makes the kernel ask for libc probes in
//! the process, which then count its reads instead, each read once.
//!
//! The library is the stand-in (`crate::standin`): its `cuFileRead` is a buffered `pread(2)`.

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use gds_api::raw::{Layer, LayerDetail};

use crate::agent::counter;
use crate::file_layer::{MOUNT, make_file, make_fs};
use crate::nvme::{MAIN_SERIAL, find_ns};
use crate::standin::Standin;
use crate::tracing::{json, layer_entry, metrics, start_agent_logged};
use crate::util::run;
use crate::{Ctx, Scenario};

const TMPFS: &str = "/mnt/gds-tmpfs";
const READS: u64 = 8;
const SIZE: usize = 65536;

pub fn scenarios() -> Vec<Scenario> {
    // Generic kernels only (ext4 as a module, like the file-layer scenarios).
    if !std::path::Path::new("/etc/gds-modules").exists() {
        return Vec::new();
    }
    let s = Scenario::new;
    vec![
        s(
            "file.cufile-beneath-fentry",
            "--file-hooks fentry: compat reads of an ext4 file linked by the file layer, no libc \
             probes; a tmpfs file registered -> libc probes asked for the process; each read \
             counted once",
            300,
            |c| beneath(c, "fentry"),
        ),
        s(
            "file.cufile-beneath-kprobe",
            "the same with --file-hooks kprobe",
            300,
            |c| beneath(c, "kprobe"),
        ),
    ]
}

fn beneath(c: &Ctx, hooks: &str) -> Result<String> {
    let ns = find_ns(MAIN_SERIAL, 1)?;
    make_fs(&ns.blk)?;
    let r = checks(c, hooks);
    let _ = run("umount", &[TMPFS]);
    let _ = run("umount", &[MOUNT]);
    r
}

/// The cuFile layer's `beneath` and `libc_probes`.
fn cufile_beneath() -> Result<(String, Vec<u32>)> {
    match layer_entry(Layer::Cufile)?.detail {
        Some(LayerDetail::Cufile {
            beneath,
            libc_probes,
            ..
        }) => Ok((beneath, libc_probes)),
        other => bail!("cuFile layer detail: {other:?}"),
    }
}

/// `path_calls.compat` of the row of descriptor `fd` of process `me` on `/debug/cufile`.
fn compat_calls(me: u32, fd: i32) -> Result<u64> {
    let r = json("/debug/cufile")?;
    let row = r["processes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["pid"].as_u64() == Some(me.into()))
        .flat_map(|p| p["files"].as_array().cloned().unwrap_or_default())
        .find(|f| f["fd"].as_i64() == Some(fd.into()));
    Ok(row
        .and_then(|f| f["counters"]["path_calls"]["compat"].as_u64())
        .unwrap_or(0))
}

fn wait_compat(me: u32, fd: i32, want: u64) -> Result<()> {
    let start = Instant::now();
    loop {
        let got = compat_calls(me, fd)?;
        if got == want {
            return Ok(());
        }
        ensure!(
            start.elapsed() < Duration::from_secs(5),
            "fd {fd}: {got} compat calls, want {want}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn beneath_calls(m: &str, link: &str) -> f64 {
    counter(
        m,
        "gds_cufile_beneath_calls_total",
        &[&format!("link=\"{link}\"")],
    )
}

fn checks(c: &Ctx, hooks: &str) -> Result<String> {
    let me = std::process::id();
    let ext4 = format!("{MOUNT}/cufile");
    make_file(&ext4, 1)?;
    let log = format!("/tmp/agent-cufile-{hooks}.log");
    let _agent = start_agent_logged(c, &["--file-hooks", hooks], &log)?;
    let standin = Standin::open(c, me.into())?;
    let (how, libc) = cufile_beneath()?;
    c.detail(format!("beneath seen by: {how}; libc probes in {libc:?}"));
    ensure!(how.starts_with("file layer"), "beneath: {how}");
    ensure!(!libc.contains(&me), "libc probes in {me} before any file");

    // A file the hooks see: the kernel links its reads, no libc probe.
    let f = std::fs::File::open(&ext4)?;
    let fh = standin.register(f.as_raw_fd())?;
    let m0 = metrics()?;
    standin.reads(fh, READS, SIZE)?;
    wait_compat(me, f.as_raw_fd(), READS)?;
    let m1 = metrics()?;
    let linked = beneath_calls(&m1, "linked") - beneath_calls(&m0, "linked");
    ensure!(
        linked == READS as f64,
        "{READS} reads of the ext4 file, {linked} linked beneath"
    );
    let (_, libc) = cufile_beneath()?;
    ensure!(!libc.contains(&me), "libc probes in {me}: {libc:?}");
    c.detail(format!(
        "ext4: {READS} cuFileRead -> compat {READS}, linked {linked} (file layer), no libc probes"
    ));

    // A file they do not see: tmpfs. The kernel asks for libc probes at its registration.
    std::fs::create_dir_all(TMPFS)?;
    let (ok, o, e) = run("mount", &["-t", "tmpfs", "tmpfs", TMPFS])?;
    ensure!(ok, "mount tmpfs: {e}{o}");
    let tmp = format!("{TMPFS}/cufile");
    std::fs::write(&tmp, vec![7u8; 1 << 20])?;
    let g = std::fs::File::open(&tmp)?;
    let unseen0 = beneath_calls(&m1, "unseen");
    let gh = standin.register(g.as_raw_fd())?;
    let t0 = Instant::now();
    loop {
        let (_, libc) = cufile_beneath()?;
        if libc.contains(&me) {
            break;
        }
        ensure!(
            t0.elapsed() < Duration::from_secs(3),
            "no libc probes in {me} 3 s after registering a tmpfs file: {libc:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let took = t0.elapsed();
    let m2 = metrics()?;
    let unseen = beneath_calls(&m2, "unseen") - unseen0;
    ensure!(unseen == 1.0, "unseen registrations: {unseen}");
    c.detail(format!(
        "tmpfs file registered: libc probes attached {took:?} later"
    ));

    // Now the probes count: every read once, on either file.
    standin.reads(gh, READS, SIZE)?;
    standin.reads(fh, READS, SIZE)?;
    wait_compat(me, g.as_raw_fd(), READS)?;
    wait_compat(me, f.as_raw_fd(), 2 * READS)?;
    let m3 = metrics()?;
    let linked = beneath_calls(&m3, "linked") - beneath_calls(&m2, "linked");
    ensure!(
        linked == 2.0 * READS as f64,
        "{} reads after the libc probes, {linked} linked beneath (each once)",
        2 * READS
    );
    let text = std::fs::read_to_string(&log).context("agent log")?;
    ensure!(!text.contains("ERROR"), "agent log has errors");
    Ok(format!(
        "{hooks}: ext4 reads linked by the file layer ({READS}, no libc probes); tmpfs file -> \
         libc probes in {took:?}; then {} reads linked once each",
        2 * READS
    ))
}
