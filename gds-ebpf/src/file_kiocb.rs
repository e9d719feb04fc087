//! The file layer's kiocb tier: fentry/fexit (or kprobe/kretprobe) on the file systems'
//! `read_iter`/`write_iter` (`ext4_`, `xfs_`, `btrfs_file_read_iter`/`btrfs_do_write_iter`,
//! `blkdev_`), keyed by the `struct kiocb *` (arg 0), the iterator (arg 1) giving the bytes
//! asked and the direction.
//!
//! Why there: every path to a file's data crosses them (read, pread, readv, preadv2, the write
//! family, io_uring READ/WRITE, aio, and nvidia-fs, which calls `read_iter` from its ioctl),
//! buffered and O_DIRECT alike (`IOCB_DIRECT` in `ki_flags`); `vfs_read` misses io_uring and
//! nvidia-fs (docs/notes-issue-23.md).
//!
//! A synchronous kiocb (`ki_complete == NULL`) ends when `read_iter` returns. An asynchronous
//! one (io_uring, aio) may return `-EAGAIN` (a `IOCB_NOWAIT` try io_uring repeats from a
//! worker) or `-EIOCBQUEUED`, and `read_iter` may be called again for the same request: its
//! call starts at the first `read_iter` and ends at the request's completion
//! (`io_uring_complete`, `aio_complete_rw`), counted once, as the application issued it.
//!
//! The tier's programs are loaded by user space once per function (`trace::file_hooks`: fentry
//! programs name their target at load, and aya 0.14 cannot load against a module's BTF).

use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid,
    macros::{btf_tracepoint, fentry, fexit, kprobe, kretprobe},
    programs::{BtfTracePointContext, FEntryContext, FExitContext, ProbeContext, RetProbeContext},
};
use gds_common::{
    DropReason, Scratch,
    file::{FILE_CALL_ASYNC, FILE_OP_READ, FILE_OP_WRITE, IOCB_DIRECT, kiocb_origin},
};

use crate::{
    file::{
        GDS_FILE_CONFIG, beneath_cufile, calls, count_drop, end_call, file_id, new_call,
        nvfs_complete, rd, thread_call, thread_call_begins, thread_call_ends, threads,
    },
    maps::{as_scalar, entry_mut, stats, task_enabled},
};

macro_rules! kconf {
    ($field:ident) => {
        unsafe { core::ptr::read_volatile(&GDS_FILE_CONFIG.$field) }
    };
}

/// A `read_iter`/`write_iter` call starts: `iocb` and `iter` are its arguments.
#[inline(always)]
fn begin(iocb: u64, iter: u64) {
    let pid_tgid = bpf_get_current_pid_tgid();
    if !task_enabled((pid_tgid >> 32) as u32) {
        return;
    }
    let complete: u64 = rd(iocb + kconf!(kiocb_complete) as u64);
    if complete != 0 && calls().get_mut(iocb).is_some() {
        // The same asynchronous request again (a retry after -EAGAIN or a partial read): its
        // call started at the first try.
        return;
    }
    let filp: u64 = rd(iocb + kconf!(kiocb_filp) as u64);
    let flags: u32 = rd(iocb + kconf!(kiocb_flags) as u64);
    let pos: u64 = rd(iocb + kconf!(kiocb_pos) as u64);
    let (dev, ino, _) = file_id(filp);
    let bytes: u64 = rd(iter + kconf!(iter_count) as u64);
    let source: u8 = rd(iter + kconf!(iter_source) as u64);
    let op = if source != 0 {
        FILE_OP_WRITE
    } else {
        FILE_OP_READ
    };
    let mut call = new_call(pid_tgid, dev, ino, pos, bytes, op, flags & IOCB_DIRECT != 0);
    if complete != 0 {
        call.flags = FILE_CALL_ASYNC;
        // io_uring's kiocb is at the start of its `struct io_kiocb`: the request's key.
        call.origin = kiocb_origin(complete, nvfs_complete(), entry_mut(iocb).is_some());
    } else {
        // A call still recorded for the thread is one whose return a kretprobe missed (past
        // its `maxactive`; fexit misses none).
        thread_call_begins(pid_tgid, iocb);
    }
    beneath_cufile(&call);
    if !calls().insert(iocb, &call) {
        count_drop(DropReason::FileInflightFull);
    }
}

/// `sched_process_exit`: a thread exits. A synchronous call of its still recorded (the kiocb
/// and tracepoint tiers' through `GDS_FILE_THREAD`, the syscalls tier's and fsync's under the
/// thread itself)
/// never returned where a program saw it: dropped and counted, not left a stall for good.
#[btf_tracepoint(function = "sched_process_exit")]
pub fn file_thread_exit(_ctx: BtfTracePointContext) -> i32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let key = thread_call(pid_tgid).unwrap_or(pid_tgid);
    if calls().remove(key) {
        count_drop(DropReason::FileReturnMissed);
    }
    threads().remove(pid_tgid);
    0
}

/// `read_iter`/`write_iter` of `iocb` returned `ret`: a synchronous call ends.
#[inline(always)]
fn finish(iocb: u64, ret: i64) {
    let pid_tgid = bpf_get_current_pid_tgid();
    thread_call_ends(pid_tgid);
    let Some(c) = calls().get_mut(iocb) else {
        return;
    };
    // SAFETY: map value pointer, copied before the delete.
    let c = unsafe { *c };
    if c.flags & FILE_CALL_ASYNC != 0 {
        return;
    }
    calls().remove(iocb);
    end_call(&c, ret);
}

/// An asynchronous request `req` (its kiocb) completed with `res`.
#[inline(always)]
fn async_done(req: u64, res: i64) {
    let Some(c) = calls().get_mut(req) else {
        return;
    };
    // SAFETY: map value pointer, copied before the delete.
    let c = unsafe { *c };
    if c.flags & FILE_CALL_ASYNC == 0 {
        return;
    }
    calls().remove(req);
    end_call(&c, res);
}

/// fentry on `<fs>_file_read_iter(struct kiocb *, struct iov_iter *)` and the write twins (the
/// function named here is only the section's; user space loads it once per target).
#[fentry(function = "ext4_file_read_iter")]
pub fn file_kiocb_entry(ctx: FEntryContext) -> i32 {
    let Some(s) = stats() else { return 0 };
    let iter = as_scalar(s, Scratch::FileBegin, ctx.arg(1));
    let iocb = as_scalar(s, Scratch::FileBegin, ctx.arg(0));
    begin(iocb, iter);
    0
}

/// fexit on a two-argument `read_iter`/`write_iter`: the return value follows the arguments.
#[fexit(function = "ext4_file_read_iter")]
pub fn file_kiocb_exit2(ctx: FExitContext) -> i32 {
    let Some(s) = stats() else { return 0 };
    let iocb = as_scalar(s, Scratch::FileComplete, ctx.arg(0));
    let ret: i64 = ctx.arg(2);
    finish(iocb, ret);
    0
}

/// fexit on `btrfs_do_write_iter(struct kiocb *, struct iov_iter *, const struct
/// btrfs_ioctl_encoded_io_args *)`: three arguments.
#[fexit(function = "btrfs_do_write_iter")]
pub fn file_kiocb_exit3(ctx: FExitContext) -> i32 {
    let Some(s) = stats() else { return 0 };
    let iocb = as_scalar(s, Scratch::FileComplete, ctx.arg(0));
    let ret: i64 = ctx.arg(3);
    finish(iocb, ret);
    0
}

/// fentry on `aio_complete_rw(struct kiocb *, long res)`: an aio read or write completes.
#[fentry(function = "aio_complete_rw")]
pub fn file_aio_done(ctx: FEntryContext) -> i32 {
    let Some(s) = stats() else { return 0 };
    let iocb = as_scalar(s, Scratch::FileComplete, ctx.arg(0));
    let res: i64 = ctx.arg(1);
    async_done(iocb, res);
    0
}

/// `io_uring_complete(struct io_ring_ctx *ctx, void *req, struct io_uring_cqe *cqe)` (6.3+;
/// `res` at 8 of the UAPI cqe): an io_uring READ/WRITE of a traced call completes.
#[btf_tracepoint(function = "io_uring_complete")]
pub fn file_uring_done(ctx: BtfTracePointContext) -> i32 {
    let req: u64 = ctx.arg(1);
    let cqe: u64 = ctx.arg(2);
    let res: i32 = rd(cqe + 8);
    async_done(req, res as i64);
    0
}

/// The flat `io_uring_complete(ctx, req, user_data, int res, …)` of 5.19 … 6.2.
#[btf_tracepoint(function = "io_uring_complete")]
pub fn file_uring_done_flat(ctx: BtfTracePointContext) -> i32 {
    let req: u64 = ctx.arg(1);
    let res: u64 = ctx.arg(3);
    async_done(req, res as i32 as i64);
    0
}

/// kprobe on the same functions (x86-64 and arm64 pass the first arguments in registers).
#[kprobe]
pub fn file_kiocb_kprobe(ctx: ProbeContext) -> u32 {
    let (Some(iocb), Some(iter)) = (ctx.arg::<u64>(0), ctx.arg::<u64>(1)) else {
        return 0;
    };
    begin(iocb, iter);
    0
}

/// kretprobe: no arguments at return, so the kiocb is the one `begin` left for the thread
/// (synchronous calls only; asynchronous ones end at their completion).
#[kretprobe]
pub fn file_kiocb_kretprobe(ctx: RetProbeContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(iocb) = thread_call(pid_tgid) else {
        return 0;
    };
    let ret: i64 = ctx.ret();
    finish(iocb, ret);
    0
}

/// kprobe on `aio_complete_rw(struct kiocb *, long res)`.
#[kprobe]
pub fn file_aio_done_kprobe(ctx: ProbeContext) -> u32 {
    let (Some(iocb), Some(res)) = (ctx.arg::<u64>(0), ctx.arg::<i64>(1)) else {
        return 0;
    };
    async_done(iocb, res);
    0
}
