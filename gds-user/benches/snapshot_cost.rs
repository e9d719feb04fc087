//! What one `UringTracer::snapshot()` costs (the io_uring part of every /metrics scrape): on an
//! idle tracer (filtered on this process, which submits nothing) and on a busy one (every
//! process traced while a thread here submits NOPs and a few other opcodes are in use).
//!
//! `cargo bench -p gds-user --bench snapshot_cost` (root). Prints µs per snapshot.

use std::{
    io::Write as _,
    os::fd::AsRawFd,
    sync::atomic::{AtomicBool, Ordering},
    time::Instant,
};

use gds_trace::{TraceOptions, UringTracer};
use io_uring::{IoUring, opcode, types};

const SNAPSHOTS: usize = 2000;

/// µs per snapshot: (median, 90th percentile), and the opcodes the last one saw.
fn measure(t: &UringTracer) -> (f64, f64, usize) {
    let mut us: Vec<f64> = (0..SNAPSHOTS)
        .map(|_| {
            let start = Instant::now();
            std::hint::black_box(t.snapshot().unwrap());
            start.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    us.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let used = t
        .snapshot()
        .unwrap()
        .opcodes
        .iter()
        .filter(|o| o.submitted > 0)
        .count();
    (us[us.len() / 2], us[us.len() * 9 / 10], used)
}

/// One request each of a few opcodes (NOP, READ, WRITE, FSYNC, URING_CMD on a socket), so a
/// busy tracer has several in use.
fn mixed_requests() {
    let mut ring = IoUring::new(8).unwrap();
    let mut f = tempfile::tempfile().unwrap();
    f.write_all(&[1u8; 4096]).unwrap();
    let fd = types::Fd(f.as_raw_fd());
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut buf = [0u8; 512];
    let sqes = [
        opcode::Nop::new().build(),
        opcode::Read::new(fd, buf.as_mut_ptr(), 512).build(),
        opcode::Write::new(fd, buf.as_ptr(), 512).build(),
        opcode::Fsync::new(fd).build(),
        opcode::UringCmd16::new(types::Fd(sock.as_raw_fd()), 0).build(),
    ];
    for e in &sqes {
        // SAFETY: `buf`, the file and the socket outlive the completion reaped here.
        unsafe { ring.submission().push(e).unwrap() };
        ring.submit_and_wait(1).unwrap();
        ring.completion().for_each(drop);
    }
}

fn main() {
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("snapshot_cost: needs root (CAP_BPF + CAP_PERFMON) to attach the tracer");
        std::process::exit(1);
    }
    let idle = UringTracer::start(&TraceOptions {
        pid: Some(std::process::id()),
        ..Default::default()
    })
    .unwrap();
    let (med, p90, used) = measure(&idle);
    println!("idle: {med:.1} µs median, {p90:.1} µs p90 per snapshot ({used} opcodes in use)");
    drop(idle);

    let busy = UringTracer::start(&TraceOptions::default()).unwrap();
    mixed_requests();
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut ring = IoUring::new(64).unwrap();
            while !stop.load(Ordering::Relaxed) {
                for _ in 0..32 {
                    // SAFETY: NOPs reference no memory.
                    unsafe { ring.submission().push(&opcode::Nop::new().build()).unwrap() };
                }
                ring.submit_and_wait(32).unwrap();
                ring.completion().for_each(drop);
            }
        });
        let (med, p90, used) = measure(&busy);
        stop.store(true, Ordering::Relaxed);
        println!(
            "busy: {med:.1} µs median, {p90:.1} µs p90 per snapshot ({used} opcodes in use, \
             NOPs submitted meanwhile)"
        );
    });
}
