//! What the file layer costs the application, per call: 4 KiB O_DIRECT preads of a file on the
//! host's disk (under the target directory) and a `getpid` loop, untraced, traced with the
//! default hooks (`--file-hooks auto`: the iomap tracepoints here; the whole agent's programs,
//! block layer included) and with `--file-hooks syscalls` (which puts a probe on every system
//! call), interleaved with the floor: empty programs on the five tracepoints such a read
//! crosses with the tracepoint hooks (what any tracer there costs before doing anything), and
//! the same reading the clock once each. One process, one run.
//!
//! `cargo xtask bench` (root).

mod timing;
use timing::median;

use std::{
    os::{fd::AsRawFd, unix::fs::OpenOptionsExt as _},
    time::Duration,
};

use gds_trace::{FileHooks, FloorProbe, TraceOptions, UringTracer};

const ROUNDS: usize = 3;
const ROUND_TIME: Duration = Duration::from_millis(300);
/// Untraced / default hooks / syscall hooks, interleaved this many times.
const CYCLES: usize = 5;
const FILE_SIZE: usize = 64 << 20;
/// The tracepoints a 4 KiB O_DIRECT read of an ext4/xfs/btrfs file crosses with the tracepoint
/// hooks: the call's begin and end, and its block request's allocation, issue and completion.
const READ_TRACEPOINTS: [&str; 5] = [
    "iomap_dio_rw_begin",
    "block_getrq",
    "block_rq_issue",
    "block_rq_complete",
    "iomap_dio_complete",
];

/// ns per call of `f`, median of [`ROUNDS`] rounds of [`ROUND_TIME`].
fn per_call(f: &mut dyn FnMut()) -> f64 {
    timing::per_call(ROUNDS, ROUND_TIME, 16, f)
}

fn main() {
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("file_overhead: needs root to attach; skipped");
        return;
    }
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("file-overhead");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("data");
    if std::fs::metadata(&path).map(|m| m.len() as usize).ok() != Some(FILE_SIZE) {
        std::fs::write(&path, vec![7u8; FILE_SIZE]).unwrap();
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
        .unwrap();
    let fd = file.as_raw_fd();
    let layout = std::alloc::Layout::from_size_align(4096, 4096).unwrap();
    // SAFETY: non-zero size; freed at the end.
    let buf = unsafe { std::alloc::alloc(layout) };
    let mut off = 0i64;
    let mut pread = || {
        // SAFETY: the buffer is 4096 bytes, aligned for O_DIRECT.
        let n = unsafe { libc::pread64(fd, buf.cast(), 4096, off) };
        assert_eq!(n, 4096);
        off = (off + 4096) % FILE_SIZE as i64;
    };
    let mut getpid = || {
        // SAFETY: no preconditions; the raw syscall, not a cached value.
        unsafe { libc::syscall(libc::SYS_getpid) };
    };
    for _ in 0..2 {
        per_call(&mut pread);
        per_call(&mut getpid);
    }
    let measure =
        |pread: &mut dyn FnMut(), getpid: &mut dyn FnMut()| (per_call(pread), per_call(getpid));
    // Modes interleaved, CYCLES times, the median of each kept: on a shared machine the load
    // changes over a run, and all modes should see the same.
    let (mut untraced, mut traced, mut syscalls) = (vec![], vec![], vec![]);
    let (mut floor, mut floor_clock) = (vec![], vec![]);
    let mut hooks = FileHooks::Off;
    let mut counted = 0u64;
    let attach_floor = |clock| {
        FloorProbe::attach_to(&READ_TRACEPOINTS, clock).unwrap_or_else(|e| {
            eprintln!("file_overhead: cannot attach the empty programs: {e}");
            std::process::exit(1);
        })
    };
    for _ in 0..CYCLES {
        untraced.push(measure(&mut pread, &mut getpid));
        let probe = attach_floor(false);
        floor.push(measure(&mut pread, &mut getpid));
        drop(probe);
        let probe = attach_floor(true);
        floor_clock.push(measure(&mut pread, &mut getpid));
        drop(probe);
        let tracer = UringTracer::start(&TraceOptions::default()).expect("attach the tracer");
        hooks = tracer
            .layer::<gds_trace::FileLayer>()
            .map(|l| l.hooks())
            .unwrap_or(FileHooks::Off);
        traced.push(measure(&mut pread, &mut getpid));
        counted += gds_api::raw::Source::file_raw(&tracer)
            .rows
            .iter()
            .map(|r| r.calls)
            .sum::<u64>();
        drop(tracer);
        let sys = UringTracer::start(&TraceOptions {
            file_hooks: FileHooks::Syscalls,
            ..Default::default()
        })
        .expect("attach the tracer with syscall hooks");
        syscalls.push(measure(&mut pread, &mut getpid));
        drop(sys);
    }
    let med =
        |v: &[(f64, f64)], which: fn(&(f64, f64)) -> f64| median(v.iter().map(which).collect());
    // SAFETY: allocated above with this layout; no call uses it any more.
    unsafe { std::alloc::dealloc(buf, layout) };

    println!(
        "\nFile layer cost per call (median of {CYCLES} interleaved cycles of {ROUNDS} rounds of \
         {ROUND_TIME:?}); default hooks here: {}",
        hooks.label()
    );
    println!(
        "{:<30} {:>10} {:>10} {:>9} {:>8} {:>10} {:>9} {:>8}",
        "", "untraced", "default", "added", "ratio", "syscalls", "added", "ratio"
    );
    let first: fn(&(f64, f64)) -> f64 = |p| p.0;
    let second: fn(&(f64, f64)) -> f64 = |p| p.1;
    for (name, which) in [("pread64 4 KiB O_DIRECT ns", first), ("getpid ns", second)] {
        let (a, b, s) = (
            med(&untraced, which),
            med(&traced, which),
            med(&syscalls, which),
        );
        println!(
            "{name:<30} {a:>10.0} {b:>10.0} {:>+9.0} {:>8.3} {s:>10.0} {:>+9.0} {:>8.3}",
            b - a,
            a / b,
            s - a,
            a / s
        );
    }
    let (a, f, fc) = (
        med(&untraced, first),
        med(&floor, first),
        med(&floor_clock, first),
    );
    println!(
        "floor of the 4 KiB O_DIRECT pread (empty programs on {}): {f:.0} ns ({:+.0}, ratio \
         {:.3}); the same reading the clock once each: {fc:.0} ns ({:+.0}, ratio {:.3})",
        READ_TRACEPOINTS.join(", "),
        f - a,
        a / f,
        fc - a,
        a / fc
    );
    println!(
        "file calls counted while traced with the default hooks: {counted} (ratio = untraced / \
         traced calls per second)"
    );
}
