//! io_uring request latency: submission → completion, aggregated per opcode in the kernel.
//!
//! Keys are `struct io_kiocb *` values: unique while a request is in flight (the kernel reuses
//! them afterwards, which is why completion removes the entry). The config, statistics and
//! in-flight maps live in [`crate::maps`], which the device programs share.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel,
    },
    macros::{btf_tracepoint, map, tracepoint},
    maps::RingBuf,
    programs::{BtfTracePointContext, TracePointContext},
};
use gds_common::{
    COMM_LEN, DropReason, EVENT_URING_SLOW, HIST_BUCKETS, InflightReq, InflightSlot, OPCODE_WORDS,
    Scratch, SlowUringEvent, UringCpuStats, log2_bucket,
};

use crate::maps::{
    GDS_URING_CONFIG, as_scalar, conf, entry_mut, index, mark_seen, opcode_stats, requests, stats,
    task_enabled,
};
use crate::slots::Claim;

/// Slow events (and, later, stall and NVMe events). 1 MiB: ~10k events of backlog.
#[map(name = "GDS_EVENTS")]
static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

const EEXIST: i64 = 17;

/// The `--opcode` filter. Without it `filter_opcode_on` is a constant 0 to the verifier, which
/// then skips the rest as dead code. The word is picked through [`index`] (the 6.1 verifier
/// needs the bound on the register that indexes).
#[inline(always)]
fn opcode_enabled(opcode: u8) -> bool {
    if conf!(filter_opcode_on) == 0 {
        return true;
    }
    let op = opcode as u64;
    let Some(word) = index(op >> 6, OPCODE_WORDS).and_then(|w| GDS_URING_CONFIG.opcode_mask.get(w))
    else {
        return false;
    };
    // SAFETY: a reference into the config; volatile for the reason `conf!` gives.
    let word = unsafe { core::ptr::read_volatile(word) };
    word & (1u64 << (op & 63)) != 0
}

/// A request entered io_uring (`io_uring_submit_req`, or `io_uring_req_failed` for requests
/// that failed before submission: those never reach submit_req but still post a CQE).
#[inline(always)]
fn on_submit(req: u64, ring: u64, user_data: u64, opcode: u8, failed_init: bool) {
    let word = if failed_init {
        Scratch::UringFailed
    } else {
        Scratch::UringSubmit
    };
    if !opcode_enabled(opcode) {
        return;
    }
    let filtered = conf!(filter_tgid) != 0 || conf!(filter_comm_on) != 0;
    let mut pid_tgid = 0;
    if filtered {
        pid_tgid = bpf_get_current_pid_tgid();
        if !task_enabled((pid_tgid >> 32) as u32) {
            return;
        }
    }
    let Some(stats) = stats() else { return };
    let req = as_scalar(stats, word, req);
    if failed_init && requests().contains(req) {
        // A failed request the submit tracepoint already saw keeps its original entry.
        return;
    }
    let Some(op) = opcode_stats(opcode) else {
        return;
    };
    if op.submitted == 0 {
        // First request of this opcode on this CPU: make the entry visible to user space
        // before it counts anything.
        mark_seen(stats, opcode);
    }
    op.submitted += 1;
    let every = conf!(sample_every);
    if every > 1 {
        // Untimed requests stop here: counted, nothing else (the cheap path of --sample).
        let tick = stats.sample_tick;
        stats.sample_tick = tick + 1;
        if tick % every != 0 {
            return;
        }
    }
    if !filtered {
        pid_tgid = bpf_get_current_pid_tgid();
    }
    let start_ns = unsafe { bpf_ktime_get_ns() };
    let table = requests();
    let entry = match table.claim(req) {
        Claim::Free(e) => {
            stats.inserted += 1;
            Some(e)
        }
        Claim::Held(e) => {
            // The previous request under this pointer never completed visibly.
            stats.drops[DropReason::Replaced as usize] += 1;
            Some(e)
        }
        Claim::Taken => None,
    };
    if let Some(e) = entry {
        // SAFETY: the slot is `req`'s; the entry is written in place (no stack copy).
        unsafe {
            (*e).nvme_setup_ns = 0;
            (*e).nvme_complete_ns = 0;
            (*e).poll_armed_ns = 0;
            (*e).start_ns = start_ns;
            (*e).user_data = user_data;
            (*e).ring = ring;
            (*e).tgid = (pid_tgid >> 32) as u32;
            (*e).pid = pid_tgid as u32;
            (*e).opcode = opcode;
        }
        return;
    }
    if every > 1 {
        // Sampled mode skips colliding requests rather than paying for the hash map at
        // every completion: sampling is statistical already.
        return;
    }
    let entry = InflightReq {
        start_ns,
        user_data,
        ring,
        tgid: (pid_tgid >> 32) as u32,
        pid: pid_tgid as u32,
        opcode,
        nvme_opcode: 0,
        nvme_qid: 0,
        nvme_cid: 0,
        nvme_status: 0,
        nvme_setup_ns: 0,
        nvme_complete_ns: 0,
        nvme_lba: 0,
        nvme_blocks: 0,
        nvme_dev: 0,
        poll_armed_ns: 0,
    };
    match table.overflow.insert(&req, &entry, BPF_NOEXIST as u64) {
        Ok(()) => stats.inserted += 1,
        Err(e) if e as i64 == -EEXIST => {
            // The previous request under this pointer never completed visibly.
            stats.drops[DropReason::Replaced as usize] += 1;
            if table.overflow.insert(&req, &entry, BPF_ANY as u64).is_err() {
                stats.drops[DropReason::InflightFull as usize] += 1;
                stats.removed += 1;
            }
        }
        Err(_) => stats.drops[DropReason::InflightFull as usize] += 1,
    }
}

/// A CQE was posted for `req`. `opcode_of` reads the opcode from the request when no entry
/// exists (rare: errors and unmatched completions), so the common path has no helper call.
#[inline(always)]
fn on_complete(req: u64, res: i32, opcode_of: impl Fn() -> u8) {
    if req == 0 {
        // Auxiliary CQEs (multishot, msg_ring) carry no request.
        return;
    }
    let Some(stats) = stats() else { return };
    // Both lookups end in one `record` call: inlining it twice doubled what the 6.1 verifier
    // has to walk.
    let Some(entry) = take_entry(stats, req) else {
        unmatched(stats, res, opcode_of);
        return;
    };
    record(stats, req, res, unsafe { bpf_ktime_get_ns() }, &entry);
}

/// Removes `req`'s entry (slot table first, then the hash map) and returns a copy.
#[inline(always)]
fn take_entry(stats: &mut UringCpuStats, req: u64) -> Option<InflightReq> {
    let table = requests();
    let entry = match table.take_slot(req) {
        Some(entry) => entry,
        // Sampled mode never puts requests in the hash map.
        None if conf!(sample_every) > 1 => return None,
        None => table.take_overflow(req)?,
    };
    stats.removed += 1;
    Some(entry)
}

/// A completion without a tracked submission: counted as an error and/or a drop.
#[inline(always)]
fn unmatched(stats: &mut UringCpuStats, res: i32, opcode_of: impl Fn() -> u8) {
    let every = conf!(sample_every);
    if every > 1 && res >= 0 {
        // Sampled mode: an untimed request, already counted at submission.
        return;
    }
    if (conf!(filter_tgid) != 0 || conf!(filter_comm_on) != 0)
        && !task_enabled((bpf_get_current_pid_tgid() >> 32) as u32)
    {
        return;
    }
    if res < 0 || conf!(filter_opcode_on) != 0 {
        let opcode = opcode_of();
        if !opcode_enabled(opcode) {
            return;
        }
        if res < 0
            && let Some(op) = opcode_stats(opcode)
        {
            mark_seen(stats, opcode);
            op.errors += 1;
        }
    }
    // Sampled mode leaves most requests untimed on purpose: not a drop.
    if every <= 1 {
        stats.drops[DropReason::NoStart as usize] += 1;
    }
}

/// Adds a completed request to the histograms, and emits it when slow.
#[inline(always)]
fn record(stats: &mut UringCpuStats, req: u64, res: i32, now: u64, entry: &InflightReq) {
    let latency = now.saturating_sub(entry.start_ns);
    // Its submission marked the opcode seen (on the CPU it ran on).
    let Some(op) = opcode_stats(entry.opcode) else {
        return;
    };
    if let Some(b) =
        index(log2_bucket(latency) as u64, HIST_BUCKETS).and_then(|i| op.hist.get_mut(i))
    {
        *b += 1;
    }
    op.sum_ns += latency;
    if entry.nvme_setup_ns != 0 {
        crate::device::record_stages(entry, now);
    }
    if res < 0 {
        op.errors += 1;
    }
    if latency >= conf!(slow_ns) {
        op.slow += 1;
        emit_slow(stats, req, res, latency, entry);
    }
}

#[inline(always)]
fn emit_slow(stats: &mut UringCpuStats, req: u64, res: i32, latency: u64, entry: &InflightReq) {
    let Some(mut slot) = EVENTS.reserve::<SlowUringEvent>(0) else {
        stats.drops[DropReason::RingbufFull as usize] += 1;
        return;
    };
    let current_tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let (comm, comm_valid) = if current_tgid == entry.tgid {
        match bpf_get_current_comm() {
            Ok(c) => (c, 1),
            Err(_) => ([0u8; COMM_LEN], 0),
        }
    } else {
        ([0u8; COMM_LEN], 0)
    };
    slot.write(SlowUringEvent {
        kind: EVENT_URING_SLOW,
        res,
        latency_ns: latency,
        comm_valid,
        _pad: [0; 7],
        comm,
        slot: InflightSlot {
            key: req,
            value: *entry,
        },
    });
    slot.submit(0);
}

/// Direct load of a field of a kernel object handed to a BTF program. `off` must come from the
/// read-only config so the verifier sees a constant offset into a typed pointer.
#[inline(always)]
unsafe fn field<T: Copy>(base: u64, off: u32) -> T {
    unsafe { core::ptr::read_volatile((base as *const u8).add(off as usize) as *const T) }
}

#[inline(always)]
fn probe_opcode(req: u64) -> u8 {
    let off = conf!(kiocb_opcode);
    if off == 0 {
        // Classic-tracepoint fallback without BTF: the offset is unknown; counted under 255, an
        // opcode no kernel has.
        return u8::MAX;
    }
    let addr = req.wrapping_add(off as u64);
    unsafe { bpf_probe_read_kernel(addr as *const u8).unwrap_or(u8::MAX) }
}

// ---- BTF tracepoints (preferred) -------------------------------------------------------------

/// `io_uring_submit_req(struct io_kiocb *req)` (6.3+; `io_uring_submit_sqe` before, same shape).
#[btf_tracepoint(function = "io_uring_submit_req")]
pub fn uring_submit(ctx: BtfTracePointContext) -> i32 {
    let req: u64 = ctx.arg(0);
    let (op_off, ctx_off, ud_off) = (
        conf!(kiocb_opcode),
        conf!(kiocb_ctx),
        conf!(kiocb_user_data),
    );
    let (opcode, ring, user_data) = unsafe {
        (
            field::<u8>(req, op_off),
            field::<u64>(req, ctx_off),
            field::<u64>(req, ud_off),
        )
    };
    on_submit(req, ring, user_data, opcode, false);
    0
}

/// `io_uring_req_failed(const struct io_uring_sqe *sqe, struct io_kiocb *req, int error)`.
/// The SQE layout is UAPI: opcode at 0, user_data at 32.
#[btf_tracepoint(function = "io_uring_req_failed")]
pub fn uring_failed(ctx: BtfTracePointContext) -> i32 {
    let sqe: u64 = ctx.arg(0);
    let req: u64 = ctx.arg(1);
    let ctx_off = conf!(kiocb_ctx);
    let (opcode, user_data, ring) = unsafe {
        (
            field::<u8>(sqe, 0),
            field::<u64>(sqe, 32),
            field::<u64>(req, ctx_off),
        )
    };
    on_submit(req, ring, user_data, opcode, true);
    0
}

/// `io_uring_complete(struct io_ring_ctx *ctx, void *req, struct io_uring_cqe *cqe)` (6.3+).
/// `struct io_uring_cqe` is UAPI: res at 8.
#[btf_tracepoint(function = "io_uring_complete")]
pub fn uring_complete(ctx: BtfTracePointContext) -> i32 {
    let req: u64 = ctx.arg(1);
    let cqe: u64 = ctx.arg(2);
    let res: i32 = unsafe { field(cqe, 8) };
    on_complete(req, res, || probe_opcode(req));
    0
}

/// `io_uring_complete(void *ctx, void *req, u64 user_data, int res, unsigned cflags, u64 extra1,
/// u64 extra2)`: the flat form of 5.19 … 6.2 (6.1 LTS among them).
#[btf_tracepoint(function = "io_uring_complete")]
pub fn uring_complete_flat(ctx: BtfTracePointContext) -> i32 {
    let req: u64 = ctx.arg(1);
    let res: u64 = ctx.arg(3);
    on_complete(req, res as i32, || probe_opcode(req));
    0
}

/// `io_uring_poll_arm(struct io_kiocb *req, int mask, int events)`: the request's file could
/// not serve it now and io_uring armed poll on it (also from an io-wq worker, for a forced
/// async request on a pollable file). Marks the in-flight entry, which says why a stalled
/// READ of a pipe or socket waits when no thread does. Optional: attached where the
/// tracepoint exists.
#[btf_tracepoint(function = "io_uring_poll_arm")]
pub fn uring_poll_arm(ctx: BtfTracePointContext) -> i32 {
    let req: u64 = ctx.arg(0);
    let Some(stats) = stats() else { return 0 };
    // The BTF argument is a trusted pointer the verifier will not hash (slot_index).
    let req = as_scalar(stats, Scratch::UringPollArm, req);
    if let Some(e) = entry_mut(req) {
        // SAFETY: map value pointer of the request's entry, owned until it completes.
        unsafe {
            if (*e).poll_armed_ns == 0 {
                (*e).poll_armed_ns = bpf_ktime_get_ns();
            }
        }
    }
    0
}

// ---- Classic tracepoints (fallback without BTF; offsets from the format files) -------------

#[inline(always)]
fn tp_read<T: Copy + Default>(ctx: &TracePointContext, off: u32) -> T {
    unsafe { ctx.read_at::<T>(off as usize).unwrap_or_default() }
}

#[tracepoint(category = "io_uring", name = "io_uring_submit_req")]
pub fn uring_submit_tp(ctx: TracePointContext) -> u32 {
    let req: u64 = tp_read(&ctx, conf!(tp_submit_req));
    let ring: u64 = tp_read(&ctx, conf!(tp_submit_ctx));
    let user_data: u64 = tp_read(&ctx, conf!(tp_submit_user_data));
    let opcode: u8 = tp_read(&ctx, conf!(tp_submit_opcode));
    on_submit(req, ring, user_data, opcode, false);
    0
}

#[tracepoint(category = "io_uring", name = "io_uring_req_failed")]
pub fn uring_failed_tp(ctx: TracePointContext) -> u32 {
    let req: u64 = tp_read(&ctx, conf!(tp_failed_req));
    let ring: u64 = tp_read(&ctx, conf!(tp_failed_ctx));
    let user_data: u64 = tp_read(&ctx, conf!(tp_failed_user_data));
    let opcode: u8 = tp_read(&ctx, conf!(tp_failed_opcode));
    on_submit(req, ring, user_data, opcode, true);
    0
}

#[tracepoint(category = "io_uring", name = "io_uring_complete")]
pub fn uring_complete_tp(ctx: TracePointContext) -> u32 {
    let req: u64 = tp_read(&ctx, conf!(tp_complete_req));
    let res: i32 = tp_read(&ctx, conf!(tp_complete_res));
    on_complete(req, res, || probe_opcode(req));
    0
}
