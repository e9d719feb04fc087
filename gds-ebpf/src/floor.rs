//! Empty programs for benchmarks: what any tracer on a tracepoint costs before doing anything
//! (the kernel's dispatch into BPF), and the same reading the clock once, as every timing
//! tracer must (`bpf_ktime_get_ns` goes through the clocksource's read function, an indirect
//! call, so its cost depends on the CPU's mitigations). `cargo xtask bench` attaches them to
//! print the floor beside the real programs; the agent never loads them.
//!
//! A BTF tracepoint program names its tracepoint when it is loaded, not when it is built: the
//! section names below are placeholders, and user space (`FloorProbe`) loads slot `i` for the
//! `i`th tracepoint a benchmark asks for (five at most: the file layer's O_DIRECT read crosses
//! five).

use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};

macro_rules! floors {
    ($($empty:ident, $clock:ident;)*) => {$(
        #[btf_tracepoint(function = "io_uring_complete")]
        pub fn $empty(_ctx: BtfTracePointContext) -> i32 {
            0
        }

        #[btf_tracepoint(function = "io_uring_complete")]
        pub fn $clock(_ctx: BtfTracePointContext) -> i32 {
            // SAFETY: helper without arguments.
            unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() as i32 & 0 }
        }
    )*};
}

floors! {
    floor_0, floor_clock_0;
    floor_1, floor_clock_1;
    floor_2, floor_clock_2;
    floor_3, floor_clock_3;
    floor_4, floor_clock_4;
}
