//! Two empty programs on the io_uring submit and complete tracepoints: what any tracer there
//! costs before doing anything (the kernel's dispatch into BPF). `cargo xtask bench` attaches
//! them to print the floor beside the real programs; the agent never loads them.

use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};

#[btf_tracepoint(function = "io_uring_submit_req")]
pub fn floor_submit(_ctx: BtfTracePointContext) -> i32 {
    0
}

#[btf_tracepoint(function = "io_uring_complete")]
pub fn floor_complete(_ctx: BtfTracePointContext) -> i32 {
    0
}

/// The same two programs reading the clock once each, as every timing tracer must: the floor
/// of exact-mode timing (`bpf_ktime_get_ns` goes through the clocksource's read function, an
/// indirect call, so its cost depends on the CPU's mitigations).
#[btf_tracepoint(function = "io_uring_submit_req")]
pub fn floor_clock_submit(_ctx: BtfTracePointContext) -> i32 {
    // SAFETY: helper without arguments.
    unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() as i32 & 0 }
}

#[btf_tracepoint(function = "io_uring_complete")]
pub fn floor_clock_complete(_ctx: BtfTracePointContext) -> i32 {
    // SAFETY: helper without arguments.
    unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() as i32 & 0 }
}
