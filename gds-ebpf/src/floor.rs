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
