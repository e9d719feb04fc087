//! What tracing costs: io_uring NOPs (the worst case: no I/O at all) and 4 KiB reads of a
//! page-cache-resident file, with the tracer detached, attached in exact mode, and attached in
//! sampled mode, measured in one run and interleaved so drift hits every variant alike. The
//! floor is measured in the same run: two empty programs on the same two tracepoints, i.e. what
//! the kernel's dispatch into BPF costs before a tracer does anything.
//!
//! `cargo xtask bench` (root). Prints ops/s per variant, added ns per request, and ratios.

mod timing;
use timing::median;

use std::{
    io::Write as _,
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use gds_trace::{FloorProbe, TraceOptions, UringTracer};
use io_uring::{IoUring, opcode, types};

const BATCH: usize = 32;
const ROUNDS: usize = 5;
const ROUND_TIME: Duration = Duration::from_millis(600);
const SAMPLE: u64 = 64;

#[derive(Clone, Copy, PartialEq)]
enum Variant {
    Detached,
    Floor,
    FloorClock,
    Exact,
    Sampled,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::Detached => "detached",
            Variant::Floor => "empty progs",
            Variant::FloorClock => "+ 1 clock each",
            Variant::Exact => "exact",
            Variant::Sampled => "sampled 1/64",
        }
    }
}

/// Runs batches of `BATCH` requests for `ROUND_TIME`; returns ns per request.
fn run(ring: &mut IoUring, make: &dyn Fn(usize) -> io_uring::squeue::Entry) -> f64 {
    let start = Instant::now();
    let mut ops = 0usize;
    while start.elapsed() < ROUND_TIME {
        for i in 0..BATCH {
            // SAFETY: buffers referenced by `make` outlive the completions reaped below.
            unsafe { ring.submission().push(&make(i)).expect("sq") };
        }
        ring.submit_and_wait(BATCH).expect("submit");
        let mut seen = 0;
        for cqe in ring.completion() {
            assert!(cqe.result() >= 0, "request failed: {}", cqe.result());
            seen += 1;
        }
        assert_eq!(seen, BATCH);
        ops += BATCH;
    }
    start.elapsed().as_nanos() as f64 / ops as f64
}

/// ns per request of each variant, in `VARIANTS` order.
const VARIANTS: [Variant; 5] = [
    Variant::Detached,
    Variant::Floor,
    Variant::FloorClock,
    Variant::Exact,
    Variant::Sampled,
];

fn measure(label: &str, make: &dyn Fn(usize) -> io_uring::squeue::Entry) -> [f64; VARIANTS.len()] {
    let mut ring = IoUring::new(256).expect("io_uring");
    run(&mut ring, make); // warm-up
    let mut ns: [Vec<f64>; VARIANTS.len()] = Default::default();
    for _ in 0..ROUNDS {
        for (i, v) in VARIANTS.iter().enumerate() {
            let (floor, tracer) = match v {
                Variant::Detached => (None, None),
                Variant::Floor | Variant::FloorClock => {
                    let clock = *v == Variant::FloorClock;
                    let floor = FloorProbe::attach(clock).unwrap_or_else(|e| {
                        eprintln!("cannot attach the empty programs: {e}");
                        std::process::exit(1);
                    });
                    (Some(floor), None)
                }
                Variant::Exact => (None, Some(UringTracer::start(&TraceOptions::default()))),
                Variant::Sampled => (
                    None,
                    Some(UringTracer::start(&TraceOptions {
                        sample: SAMPLE,
                        ..Default::default()
                    })),
                ),
            };
            let tracer = tracer.transpose().unwrap_or_else(|e| {
                eprintln!("cannot attach the tracer: {e}");
                std::process::exit(1);
            });
            ns[i].push(run(&mut ring, make));
            drop(floor);
            if let Some(t) = &tracer {
                let s = t.snapshot().unwrap();
                let submitted: u64 = s.opcodes.iter().map(|o| o.submitted).sum();
                assert!(submitted > 0, "tracer attached but saw nothing");
            }
        }
    }
    let med = ns.map(median);
    println!("\n{label} (batches of {BATCH}, median of {ROUNDS} rounds of {ROUND_TIME:?})");
    println!(
        "  {:<14} {:>12} {:>10} {:>12} {:>8}",
        "variant", "ops/s", "ns/op", "added ns", "ratio"
    );
    for (i, v) in VARIANTS.iter().enumerate() {
        println!(
            "  {:<14} {:>12.0} {:>10.1} {:>12.1} {:>8.3}",
            v.name(),
            1e9 / med[i],
            med[i],
            med[i] - med[0],
            med[0] / med[i]
        );
    }
    med
}

fn main() {
    // cargo bench passes --bench; ignore arguments.
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("trace_overhead: needs root (CAP_BPF + CAP_PERFMON) to attach the tracer");
        std::process::exit(1);
    }
    let nop = measure("io_uring NOP", &|_| opcode::Nop::new().build());

    let mut file = tempfile::tempfile().expect("tempfile");
    let size = 64 << 20;
    file.write_all(&vec![1u8; size]).unwrap();
    let fd = file.as_raw_fd();
    let mut bufs = vec![0u8; BATCH * 4096];
    let base = bufs.as_mut_ptr() as usize;
    // Warm the page cache.
    let mut ring = IoUring::new(256).unwrap();
    for chunk in 0..(size / 4096 / BATCH) {
        run_once(&mut ring, fd, base, chunk);
    }
    let read = measure("4 KiB reads, page-cache-resident 64 MiB file", &|i| {
        let off = (((i * 7919) % (size / 4096)) * 4096) as u64;
        opcode::Read::new(types::Fd(fd), (base + i * 4096) as *mut u8, 4096)
            .offset(off)
            .build()
    });
    println!("\nsummary");
    println!(
        "  NOP added per request: exact {:.0} ns (goal <= 150), sampled {:.0} ns (goal <= 90)",
        nop[3] - nop[0],
        nop[4] - nop[0]
    );
    println!(
        "  floor: two empty programs {:.0} ns; the same reading the clock once each {:.0} ns \
         (so a clock read costs {:.0} ns); exact mode's work beyond that floor {:.0} ns",
        nop[1] - nop[0],
        nop[2] - nop[0],
        (nop[2] - nop[1]) / 2.0,
        nop[3] - nop[2]
    );
    println!(
        "  cached 4 KiB reads throughput vs untraced: exact {:.3}, sampled {:.3} (goal >= 0.95); \
         empty programs {:.3}, with a clock read {:.3}",
        read[0] / read[3],
        read[0] / read[4],
        read[0] / read[1],
        read[0] / read[2]
    );
    drop(bufs);
}

fn run_once(ring: &mut IoUring, fd: i32, base: usize, chunk: usize) {
    for i in 0..BATCH {
        let off = ((chunk * BATCH + i) * 4096) as u64;
        let e = opcode::Read::new(types::Fd(fd), (base + i * 4096) as *mut u8, 4096)
            .offset(off)
            .build();
        // SAFETY: the buffer outlives the completion.
        unsafe { ring.submission().push(&e).unwrap() };
    }
    ring.submit_and_wait(BATCH).unwrap();
    ring.completion().for_each(drop);
}
