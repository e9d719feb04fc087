//! What cuFile tracing costs the application, per call: `cuFileRead` (its uprobe and uretprobe;
//! with a null handle it returns at once, so the probes are the whole difference) and a 4 KiB
//! `pread64` of a page-cache-resident file in a process that maps libcufile (the libc probes
//! beneath, or the file layer where it sees every call: `--file-hooks syscalls` here). Untraced,
//! traced (default hooks, then syscalls), untraced again (drift shows as a difference between
//! the two untraced runs), in one process, with the real libcufile from PyPI.
//!
//! `cargo xtask bench` (root; `cargo xtask setup` installs the library).

mod timing;

use std::{
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use gds_trace::{FileHooks, TraceOptions, UringTracer};

const ROUNDS: usize = 5;
const ROUND_TIME: Duration = Duration::from_millis(400);

type CuFileRead = unsafe extern "C" fn(*mut u8, *mut u8, usize, i64, i64) -> isize;

/// ns per call of `f`, median of [`ROUNDS`] rounds of [`ROUND_TIME`].
fn per_call(f: &mut dyn FnMut()) -> f64 {
    timing::per_call(ROUNDS, ROUND_TIME, 64, f)
}

fn main() {
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("cufile_overhead: needs root to attach uprobes; skipped");
        return;
    }
    let lib = std::env::var_os("GDS_LIBCUFILE")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../target/pypi/nvidia-cufile/nvidia/cu13/lib/libcufile.so.0")
        });
    if !lib.exists() {
        eprintln!(
            "cufile_overhead: no libcufile at {} (`cargo xtask setup`); skipped",
            lib.display()
        );
        return;
    }
    // SAFETY: loading NVIDIA's library runs its constructors, which need nothing of us.
    let cufile = unsafe { libloading::Library::new(&lib) }.expect("dlopen libcufile");
    // SAFETY: the symbol has this C signature (cufile.h).
    let read: libloading::Symbol<CuFileRead> = unsafe { cufile.get(b"cuFileRead") }.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cached");
    std::fs::write(&path, vec![1u8; 1 << 20]).unwrap();
    let file = std::fs::File::open(&path).unwrap();
    let fd = file.as_raw_fd();
    let mut buf = vec![0u8; 4096];
    let mut api = || {
        // SAFETY: a null handle makes cuFileRead fail with -1 before touching anything.
        let r = unsafe { read(std::ptr::null_mut(), std::ptr::null_mut(), 4096, 0, 0) };
        assert_eq!(r, -1);
    };
    let mut off = 0i64;
    let mut pread = || {
        // SAFETY: the buffer is 4096 bytes.
        let n = unsafe { libc::pread64(fd, buf.as_mut_ptr().cast(), 4096, off) };
        assert_eq!(n, 4096);
        off = (off + 4096) % (1 << 20);
    };
    for _ in 0..3 {
        per_call(&mut api);
        per_call(&mut pread);
    }

    let untraced = (per_call(&mut api), per_call(&mut pread));
    // The default hooks, then the syscalls tier (the file layer sees every call: no libc
    // probes beneath cuFile, the kernel links the preads). Where `auto` finds fentry or
    // kprobes (distribution kernels) the default run is already the file layer's.
    let mut runs = Vec::new();
    for hooks in [FileHooks::Auto, FileHooks::Syscalls] {
        let opts = TraceOptions {
            file_hooks: hooks,
            ..TraceOptions::default()
        };
        let tracer = UringTracer::start(&opts).expect("attach the tracer");
        let t = Instant::now();
        tracer.refresh_cufile_pids(&[std::process::id()]);
        let attach = t.elapsed();
        assert!(
            tracer
                .cufile_libraries()
                .0
                .iter()
                .any(|l| l.pids.contains(&std::process::id())),
            "libcufile not attached"
        );
        let beneath = tracer.cufile_view().beneath;
        let traced = (per_call(&mut api), per_call(&mut pread));
        let raw = tracer.cufile_raw().unwrap();
        let counted: u64 = raw.ops.iter().map(|o| o.calls).sum();
        let t = Instant::now();
        drop(tracer);
        runs.push((hooks, beneath, traced, attach, t.elapsed(), counted));
    }
    let untraced2 = (per_call(&mut api), per_call(&mut pread));

    println!("\ncuFile tracing cost per call (median of {ROUNDS} rounds of {ROUND_TIME:?})");
    println!(
        "{:<52} {:>10} {:>10} {:>10} {:>9} {:>8}",
        "", "untraced", "traced", "untraced", "added", "ratio"
    );
    for (hooks, beneath, traced, attach, detach, counted) in &runs {
        for (name, a, b, c) in [
            (
                "cuFileRead (null handle) ns",
                untraced.0,
                traced.0,
                untraced2.0,
            ),
            (
                "pread64 4 KiB, page cache ns",
                untraced.1,
                traced.1,
                untraced2.1,
            ),
        ] {
            let base = (a + c) / 2.0;
            let name = format!("{name} [--file-hooks {}]", hooks.label());
            println!(
                "{name:<52} {a:>10.0} {b:>10.0} {c:>10.0} {:>+9.0} {:>8.3}",
                b - base,
                base / b
            );
        }
        println!(
            "  --file-hooks {}: beneath seen by {beneath}; attach {attach:?}, detach {detach:?}, \
             cuFile calls counted {counted}",
            hooks.label()
        );
    }
    println!(
        "(ratio = untraced/traced calls per second; a compat cuFileRead of 16 MiB takes ~10 ms and \
         makes one to four preads, so the added time per call is what it costs)"
    );
}
