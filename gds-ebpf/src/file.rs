//! The file layer: synchronous read/write calls on files, from whichever hooks user space
//! attached (`--file-hooks`, `FileConfig::tier`):
//!
//! - **tracepoint**: `iomap_dio_rw_begin(kiocb, iter, dio_flags, done_before)` and
//!   `iomap_dio_complete(kiocb, error, ret)` (6.4+): every O_DIRECT call of ext4, xfs and btrfs,
//!   from any path (pread, readv, io_uring, aio, nvidia-fs), keyed by its `struct kiocb *`. The
//!   begin runs in the calling thread; a synchronous call completes there too, an asynchronous
//!   one in the completion context (the kiocb key works for both). With them, ext4's
//!   `ext4_sync_file_enter`/`_exit`: fsync of ext4 files, keyed by the thread.
//! - **syscalls**: `sys_enter`/`sys_exit` (raw tracepoints): every read/write-family system call
//!   on a regular file or block device, keyed by the thread, O_DIRECT from the file's
//!   `f_flags`. Any probe on these makes every syscall of every process take the slow path.
//!
//! Both end in [`end_call`]: per-CPU statistics per (op, direct) and per-process counts.

use core::intrinsics::AtomicOrdering::Relaxed;

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_get_current_task,
        bpf_get_current_task_btf, bpf_ktime_get_ns, bpf_probe_read_kernel,
    },
    macros::{btf_tracepoint, map, raw_tracepoint},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::{BtfTracePointContext, RawTracePointContext},
};
use gds_common::{
    DropReason, HIST_BUCKETS, Scratch, Slot,
    file::{
        FILE_CALL_ASYNC, FILE_HOOKED_MAX, FILE_INFLIGHT_MAX, FILE_OP_FSYNC, FILE_OP_READ,
        FILE_OP_WRITE, FILE_PROCS_MAX, FILE_ROWS, FILE_SEES_ALL, FILE_SEES_HOOKED, FILE_SEES_NONE,
        FILE_SLOTS, FileCall, FileConfig, FileProcKey, FileProcStats, FileRowStats, IOCB_DIRECT,
        O_DIRECT, ORIGIN_SYSCALL, SYSCALL_COUNT_ARG2, SYSCALL_OP_MASK, SYSCALL_POS_ARG3,
        SYSCALL_TABLE, SYSCALL_TRACED, file_row, kiocb_origin,
    },
    log2_bucket,
};

use crate::{
    maps::{BPF_F_MMAPABLE, as_scalar, entry_mut, index, stats, task_enabled},
    slots::SlotTable,
};

#[unsafe(no_mangle)]
pub(crate) static GDS_FILE_CONFIG: FileConfig = FileConfig::DEFAULT;

macro_rules! fconf {
    ($field:ident) => {
        unsafe { core::ptr::read_volatile(&GDS_FILE_CONFIG.$field) }
    };
}

/// File calls started and not ended: `struct kiocb *` (tracepoint tier) or `pid_tgid`
/// (syscalls tier) → the call, in [`calls`]' slots or, where a call's slot is taken, this
/// hash map. Kernel addresses and thread ids never collide, and only one tier is attached at
/// a time anyway.
#[map(name = "GDS_FILE_INFLIGHT")]
static FILE_INFLIGHT: HashMap<u64, FileCall> = HashMap::with_max_entries(FILE_INFLIGHT_MAX, 0);

/// The direct-mapped slots of [`calls`]. Mmapable so user space scans them without a
/// syscall per slot.
#[map(name = "GDS_FILE_SLOTS")]
static FILE_SLOT_ARRAY: Array<Slot<FileCall>> = Array::with_max_entries(FILE_SLOTS, BPF_F_MMAPABLE);

/// The file calls in flight (see [`FILE_INFLIGHT`]).
#[inline(always)]
pub(crate) fn calls() -> SlotTable<FileCall, HashMap<u64, FileCall>> {
    SlotTable {
        slots: &FILE_SLOT_ARRAY,
        overflow: &FILE_INFLIGHT,
        mask: FILE_SLOTS as u64 - 1,
    }
}

#[map(name = "GDS_FILE_STATS")]
static FILE_STATS: PerCpuArray<FileRowStats> = PerCpuArray::with_max_entries(FILE_ROWS as u32, 0);

#[map(name = "GDS_FILE_PROCS")]
static FILE_PROCS: LruHashMap<FileProcKey, FileProcStats> =
    LruHashMap::with_max_entries(FILE_PROCS_MAX, 0);

/// Thread → the kiocb of its synchronous call (0: none): what the kretprobe ends (it has no
/// arguments), what a block request the thread submits links to when the bio does not name
/// the call (block-device O_DIRECT: an on-stack bio with `submit_bio_wait`), and how a call
/// whose end no program saw is found (see [`thread_call_begins`]). In [`threads`]' slots, or
/// this LRU hash where a thread's slot is taken.
#[map(name = "GDS_FILE_THREAD")]
static FILE_THREAD: LruHashMap<u64, u64> = LruHashMap::with_max_entries(FILE_INFLIGHT_MAX, 0);

#[map(name = "GDS_FILE_THREAD_SLOTS")]
static FILE_THREAD_SLOTS: Array<Slot<u64>> = Array::with_max_entries(FILE_SLOTS, 0);

/// The threads in a synchronous call (see [`FILE_THREAD`]).
#[inline(always)]
pub(crate) fn threads() -> SlotTable<u64, LruHashMap<u64, u64>> {
    SlotTable {
        slots: &FILE_THREAD_SLOTS,
        overflow: &FILE_THREAD,
        mask: FILE_SLOTS as u64 - 1,
    }
}

/// The kiocb of the current thread's synchronous call, if one is in flight.
#[inline(always)]
pub(crate) fn thread_call(pid_tgid: u64) -> Option<u64> {
    // SAFETY: map value pointer.
    threads()
        .get_mut(pid_tgid)
        .map(|p| unsafe { *p })
        .filter(|k| *k != 0)
}

/// A synchronous call of thread `pid_tgid` starts under `key`. A thread is in one synchronous
/// call at a time (the file systems hooked do not nest), so a call still recorded for it ended
/// where no program saw it: past a kretprobe's `maxactive`, or, with the iomap tracepoints, an
/// error iomap returned before its completion tracepoint (a `RWF_NOWAIT` read finding dirty
/// pages, a write whose cached pages would not go and that falls back to buffered I/O). It is
/// dropped and counted, not left a stall for good. (The kernel stack's offset is randomized
/// per system call, so a new call's on-stack kiocb seldom reuses the old one's key.)
#[inline(always)]
pub(crate) fn thread_call_begins(pid_tgid: u64, key: u64) {
    let t = threads();
    match t.get_mut(pid_tgid) {
        // SAFETY: map value pointer; only this thread writes its entry.
        Some(p) => unsafe {
            let old = *p;
            if old != 0 && old != key && calls().remove(old) {
                count_drop(DropReason::FileReturnMissed);
            }
            *p = key;
        },
        None => {
            let _ = t.insert(pid_tgid, &key);
        }
    }
}

/// The current thread's synchronous call ended (its entry stays, emptied, until it exits).
#[inline(always)]
pub(crate) fn thread_call_ends(pid_tgid: u64) {
    if let Some(p) = threads().get_mut(pid_tgid) {
        // SAFETY: map value pointer; only this thread writes its entry.
        unsafe { *p = 0 };
    }
}

/// What the hooks attached see (`FILE_SEES_*`, written by user space after attaching).
#[map(name = "GDS_FILE_SEES")]
static SEES: Array<u32> = Array::with_max_entries(1, 0);

/// The kiocb tier's hooked `read_iter` functions, by address.
#[map(name = "GDS_FILE_HOOKED")]
static HOOKED: HashMap<u64, u8> = HashMap::with_max_entries(FILE_HOOKED_MAX, 0);

/// nvidia-fs's completion function (0: not loaded), written by user space.
#[map(name = "GDS_FILE_NVFS")]
static NVFS: Array<u64> = Array::with_max_entries(1, 0);

/// nvidia-fs's completion function's address, 0 while nvidia-fs is not loaded.
#[inline(always)]
pub(crate) fn nvfs_complete() -> u64 {
    NVFS.get(0).copied().unwrap_or(0)
}

/// What the hooks attached see: `FILE_SEES_*`.
#[inline(always)]
pub(crate) fn sees() -> u32 {
    SEES.get(0).copied().unwrap_or(FILE_SEES_NONE)
}

/// Whether the hooks attached see every read and write call on `file` (a `struct file *`).
#[inline(always)]
pub(crate) fn sees_file(file: u64) -> bool {
    match sees() {
        FILE_SEES_ALL => true,
        FILE_SEES_HOOKED => {
            let fop: u64 = rd(file + fconf!(file_f_op) as u64);
            let read_iter: u64 = rd(fop + fconf!(fop_read_iter) as u64);
            // SAFETY: map value read.
            read_iter != 0 && unsafe { HOOKED.get(&read_iter) }.is_some()
        }
        _ => false,
    }
}

/// The `struct file *` of descriptor `fd` of the current process (0: none), as
/// `current->files->fdt->fd[fd]`.
#[inline(always)]
pub(crate) fn fd_file(fd: u64) -> u64 {
    let task = unsafe { bpf_get_current_task() };
    let files: u64 = rd(task + fconf!(task_files) as u64);
    let fdt: u64 = rd(files + fconf!(files_fdt) as u64);
    let max: u32 = rd(fdt + fconf!(fdt_max_fds) as u64);
    if files == 0 || fd >= max as u64 {
        return 0;
    }
    let fds: u64 = rd(fdt + fconf!(fdt_fd) as u64);
    rd(fds + fd * 8)
}

#[inline(always)]
pub(crate) fn rd<T: Copy + Default>(addr: u64) -> T {
    unsafe { bpf_probe_read_kernel(addr as *const T).unwrap_or_default() }
}

/// The offsets the direct loads use, read from the config (constants to the verifier) before
/// any `unsafe` load.
struct Offsets {
    kiocb_filp: u32,
    kiocb_flags: u32,
    kiocb_pos: u32,
    kiocb_complete: u32,
    file_inode: u32,
    inode_sb: u32,
    inode_ino: u32,
    inode_size: u32,
    sb_dev: u32,
    iter_count: u32,
    iter_source: u32,
}

impl Offsets {
    #[inline(always)]
    fn read() -> Offsets {
        Offsets {
            kiocb_filp: fconf!(kiocb_filp),
            kiocb_flags: fconf!(kiocb_flags),
            kiocb_pos: fconf!(kiocb_pos),
            kiocb_complete: fconf!(kiocb_complete),
            file_inode: fconf!(file_inode),
            inode_sb: fconf!(inode_sb),
            inode_ino: fconf!(inode_ino),
            inode_size: fconf!(inode_size),
            sb_dev: fconf!(sb_dev),
            iter_count: fconf!(iter_count),
            iter_source: fconf!(iter_source),
        }
    }
}

/// Direct load of a field of a kernel object reached from a BTF program's argument. `off`
/// must come from the read-only config so the verifier sees a constant offset.
#[inline(always)]
pub(crate) unsafe fn field<T: Copy>(base: u64, off: u32) -> T {
    unsafe { core::ptr::read_volatile((base as *const u8).add(off as usize) as *const T) }
}

/// `task->comm` by two loads from `task`, a BTF pointer, at `off` (a constant from `.rodata`):
/// the name the kernel keeps NUL-padded (`set_task_comm`), where `bpf_get_current_comm` copies
/// it with `strscpy` (~35 ns a call here).
///
/// # Safety
/// `task` is a trusted BTF pointer to a task and `off` the offset of its `comm`.
#[inline(always)]
pub(crate) unsafe fn task_comm(task: u64, off: u32) -> [u8; 16] {
    // SAFETY: as the caller promises.
    unsafe { core::mem::transmute::<[u64; 2], [u8; 16]>([field(task, off), field(task, off + 8)]) }
}

#[inline(always)]
pub(crate) fn count_drop(reason: DropReason) {
    if let Some(s) = stats() {
        s.drops[reason as usize] += 1;
    }
}

/// Device and inode of `struct file *` `file` (`sb->s_dev` is already `MKDEV`-encoded as the
/// block programs encode disks).
#[inline(always)]
pub(crate) fn file_id(file: u64) -> (u32, u64, u64) {
    let inode: u64 = rd(file + fconf!(file_inode) as u64);
    let ino: u64 = rd(inode + fconf!(inode_ino) as u64);
    let sb: u64 = rd(inode + fconf!(inode_sb) as u64);
    let dev: u32 = rd(sb + fconf!(sb_dev) as u64);
    (dev, ino, inode)
}

/// Tells the cuFile layer of a read or write starting (it links it to the cuFile call in
/// flight on its file, where there is one).
#[inline(always)]
pub(crate) fn beneath_cufile(c: &FileCall) {
    if c.op == FILE_OP_READ || c.op == FILE_OP_WRITE {
        crate::cufile::file_call((c.pid_tgid >> 32) as u32, c.dev, c.ino, c.bytes);
    }
}

/// The cgroup id (default hierarchy) of `task`, the current task's BTF pointer: what
/// `bpf_get_current_cgroup_id` returns, as `task->cgroups->dfl_cgrp->kn->id` by direct loads
/// (the helper costs ~30 ns a call here). The helper where the offsets are unknown (the file
/// layer off: the block programs call this too).
#[inline(always)]
pub(crate) fn task_cgroup(task: u64) -> u64 {
    let cgroups = fconf!(task_cgroups);
    if cgroups == 0 {
        return unsafe { bpf_get_current_cgroup_id() };
    }
    let (dfl, kn, id) = (
        fconf!(css_set_dfl_cgrp),
        fconf!(cgroup_kn),
        fconf!(kernfs_node_id),
    );
    // SAFETY: BTF-typed pointers from the task down (the verifier types each load from BTF;
    // a NULL on the way reads as 0); constant offsets.
    unsafe {
        let set: u64 = field(task, cgroups);
        let cgroup: u64 = field(set, dfl);
        let node: u64 = field(cgroup, kn);
        field(node, id)
    }
}

/// All-zero call in read-only data. A new call starts as a word-by-word copy of it: zeroed
/// fields in a struct literal, and aya's `bpf_get_current_comm` (which zeroes its array
/// first), make LLVM call a byte-by-byte `memset`, five instructions a byte.
// SAFETY: plain old data; all-zero is a valid value.
static ZERO_CALL: FileCall = unsafe { core::mem::zeroed() };

/// All-zero per-process key (see [`ZERO_CALL`]: its 6-byte pad alone was a `memset` call).
// SAFETY: plain old data; all-zero is a valid value.
static ZERO_PROC_KEY: FileProcKey = unsafe { core::mem::zeroed() };

/// A call of the current thread starting now.
#[inline(always)]
pub(crate) fn new_call(
    pid_tgid: u64,
    dev: u32,
    ino: u64,
    pos: u64,
    bytes: u64,
    op: u8,
    direct: bool,
) -> FileCall {
    // SAFETY: a static; volatile so LLVM copies it instead of folding it into a memset.
    let mut c = unsafe { core::ptr::read_volatile(&ZERO_CALL) };
    c.start_ns = unsafe { bpf_ktime_get_ns() };
    c.pid_tgid = pid_tgid;
    c.ino = ino;
    c.pos = pos;
    c.bytes = bytes;
    let task = unsafe { bpf_get_current_task_btf() } as u64;
    c.cgroup = task_cgroup(task);
    let comm_off = fconf!(task_comm);
    // SAFETY: trusted BTF pointer to the current task; the offset of its `comm`.
    c.comm = unsafe { task_comm(task, comm_off) };
    c.dev = dev;
    c.op = op;
    c.direct = direct as u8;
    c.origin = ORIGIN_SYSCALL;
    c
}

/// `iomap_dio_rw_begin(struct kiocb *iocb, struct iov_iter *iter, unsigned int dio_flags,
/// size_t done_before)`: an O_DIRECT call enters iomap (ext4, xfs, btrfs).
#[btf_tracepoint(function = "iomap_dio_rw_begin")]
pub fn file_dio_begin(ctx: BtfTracePointContext) -> i32 {
    let Some(s) = stats() else { return 0 };
    let pid_tgid = bpf_get_current_pid_tgid();
    if !task_enabled((pid_tgid >> 32) as u32) {
        return 0;
    }
    // Direct loads through the typed arguments (the verifier follows the BTF types from
    // kiocb to file, inode and super_block; offsets are constants from `.rodata`), where
    // `bpf_probe_read_kernel` costs a helper call each (~40 ns here with the mitigations).
    let (kiocb, iter): (u64, u64) = (ctx.arg(0), ctx.arg(1));
    let iocb = as_scalar(s, Scratch::FileBegin, kiocb);
    let off = Offsets::read();
    let (flags, pos, bytes, source, dev, ino, complete, size) = unsafe {
        let filp: u64 = field(kiocb, off.kiocb_filp);
        let inode: u64 = field(filp, off.file_inode);
        let sb: u64 = field(inode, off.inode_sb);
        (
            field::<u32>(kiocb, off.kiocb_flags),
            field::<u64>(kiocb, off.kiocb_pos),
            field::<u64>(iter, off.iter_count),
            field::<u8>(iter, off.iter_source),
            field::<u32>(sb, off.sb_dev),
            field::<u64>(inode, off.inode_ino),
            // A function pointer: a scalar to the verifier.
            field::<u64>(kiocb, off.kiocb_complete),
            field::<i64>(inode, off.inode_size),
        )
    };
    // A zero-length call returns before iomap allocates its dio: no complete would follow.
    if bytes == 0 {
        return 0;
    }
    let op = if source != 0 {
        FILE_OP_WRITE
    } else {
        FILE_OP_READ
    };
    let mut call = new_call(pid_tgid, dev, ino, pos, bytes, op, flags & IOCB_DIRECT != 0);
    // A read at or past the end of the file returns 0 here, before iomap allocates anything
    // to complete (`__iomap_dio_rw` compares `ki_pos` with `i_size` the same way): the call
    // ends now, or it would stay in flight (a stall) for good. Every read-to-EOF loop ends so.
    if op == FILE_OP_READ && pos as i64 >= size {
        end_call(&call, 0);
        return 0;
    }
    // io_uring's READ/WRITE kiocb is the first member of its `struct io_kiocb` (inside the
    // command data at offset 0), so the kiocb is the io_uring request's key. Only an
    // asynchronous kiocb (`ki_complete` set) can be one: a synchronous call (pread, read)
    // costs no lookup.
    // The same rule as the kiocb tier's (nvidia-fs's O_DIRECT reads pass here too).
    let uring = complete != 0 && entry_mut(iocb).is_some();
    call.origin = kiocb_origin(complete, nvfs_complete(), uring);
    if complete != 0 {
        call.flags = FILE_CALL_ASYNC;
    } else {
        thread_call_begins(pid_tgid, iocb);
    }
    if !calls().insert(iocb, &call) {
        count_drop(DropReason::FileInflightFull);
    }
    0
}

/// `iomap_dio_complete(struct kiocb *iocb, int error, ssize_t ret)`.
#[btf_tracepoint(function = "iomap_dio_complete")]
pub fn file_dio_complete(ctx: BtfTracePointContext) -> i32 {
    let Some(s) = stats() else { return 0 };
    let iocb = as_scalar(s, Scratch::FileComplete, ctx.arg(0));
    let ret: i64 = ctx.arg(2);
    let Some(c) = calls().take(iocb) else {
        count_drop(DropReason::FileNoStart);
        return 0;
    };
    if c.flags & FILE_CALL_ASYNC == 0 {
        thread_call_ends(c.pid_tgid);
    }
    end_call(&c, ret);
    0
}

/// `ext4_sync_file_enter(struct file *file, int datasync)`: an fsync of an ext4 file starts,
/// in the calling thread (keyed by it; the call is synchronous).
#[btf_tracepoint(function = "ext4_sync_file_enter")]
pub fn file_ext4_fsync_enter(ctx: BtfTracePointContext) -> i32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    if !task_enabled((pid_tgid >> 32) as u32) {
        return 0;
    }
    let file: u64 = ctx.arg(0);
    let off = Offsets::read();
    let (dev, ino) = unsafe {
        let inode: u64 = field(file, off.file_inode);
        let sb: u64 = field(inode, off.inode_sb);
        (
            field::<u32>(sb, off.sb_dev),
            field::<u64>(inode, off.inode_ino),
        )
    };
    let call = new_call(pid_tgid, dev, ino, 0, 0, FILE_OP_FSYNC, false);
    if !calls().insert(pid_tgid, &call) {
        count_drop(DropReason::FileInflightFull);
    }
    0
}

/// `ext4_sync_file_exit(struct inode *inode, int ret)`.
#[btf_tracepoint(function = "ext4_sync_file_exit")]
pub fn file_ext4_fsync_exit(ctx: BtfTracePointContext) -> i32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(c) = calls().take(pid_tgid) else {
        return 0;
    };
    let ret: i32 = ctx.arg(1);
    end_call(&c, ret as i64);
    0
}

/// `sys_enter(struct pt_regs *regs, long id)`: a read/write-family system call on a regular
/// file or block device starts (the table in `FileConfig::syscall_ops` says which numbers).
#[raw_tracepoint(tracepoint = "sys_enter")]
pub fn file_sys_enter(ctx: RawTracePointContext) -> i32 {
    let id: u64 = ctx.arg(1);
    let Some(i) = index(id, SYSCALL_TABLE) else {
        return 0;
    };
    let what = unsafe { core::ptr::read_volatile(&GDS_FILE_CONFIG.syscall_ops[i]) };
    if what & SYSCALL_TRACED == 0 {
        return 0;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    if !task_enabled((pid_tgid >> 32) as u32) {
        return 0;
    }
    let regs: u64 = ctx.arg(0);
    let fd: u64 = rd(regs + fconf!(regs_arg0) as u64);
    let file = fd_file(fd);
    if file == 0 {
        return 0;
    }
    let (dev, ino, inode) = file_id(file);
    let mode: u16 = rd(inode + fconf!(inode_mode) as u64);
    // Regular files and block devices only: pipes, sockets and terminals are not file I/O.
    let kind = mode & 0xf000;
    if kind != 0x8000 && kind != 0x6000 {
        return 0;
    }
    let f_flags: u32 = rd(file + fconf!(file_flags) as u64);
    let bytes: u64 = if what & SYSCALL_COUNT_ARG2 != 0 {
        rd(regs + fconf!(regs_arg2) as u64)
    } else {
        0
    };
    let pos: u64 = if what & SYSCALL_POS_ARG3 != 0 {
        rd(regs + fconf!(regs_arg3) as u64)
    } else {
        0
    };
    let call = new_call(
        pid_tgid,
        dev,
        ino,
        pos,
        bytes,
        what & SYSCALL_OP_MASK,
        f_flags & O_DIRECT != 0,
    );
    beneath_cufile(&call);
    if !calls().insert(pid_tgid, &call) {
        count_drop(DropReason::FileInflightFull);
    }
    0
}

/// `sys_exit(struct pt_regs *regs, long ret)`: ends the thread's call if one is tracked.
#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn file_sys_exit(ctx: RawTracePointContext) -> i32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(c) = calls().take(pid_tgid) else {
        return 0;
    };
    let ret: i64 = ctx.arg(1);
    end_call(&c, ret);
    0
}

/// Counts an ended call: its row's histogram, bytes and errors, and its process's counts.
#[inline(always)]
pub(crate) fn end_call(c: &FileCall, ret: i64) {
    let now = unsafe { bpf_ktime_get_ns() };
    let ns = now.saturating_sub(c.start_ns);
    // Its block requests' stages, once per call: they add up to its duration.
    if c.last_done_ns != 0 && c.first_issue_ns != 0 {
        let first = c.first_issue_ns.max(c.start_ns);
        let last = c.last_done_ns.max(first);
        crate::device::stages_add(
            c.blk_dev,
            c.origin,
            [first - c.start_ns, last - first, now.saturating_sub(last)],
            gds_common::device::STAGES,
        );
    }
    let done = if ret > 0 { ret as u64 } else { 0 };
    let err = (ret < 0) as u64;
    if let Some(p) = FILE_STATS.get_ptr_mut(file_row(c.op, c.direct != 0)) {
        // SAFETY: per-CPU map value pointer.
        let r = unsafe { &mut *p };
        if let Some(b) =
            index(log2_bucket(ns) as u64, HIST_BUCKETS).and_then(|i| r.buckets.get_mut(i))
        {
            *b += 1;
        }
        r.calls += 1;
        r.sum_ns += ns;
        r.bytes_asked += c.bytes;
        r.bytes_done += done;
        r.errors += err;
        r.device_requests += c.blk_requests as u64;
        r.device_bytes += c.blk_bytes;
    }
    // SAFETY: a static (see [`ZERO_PROC_KEY`]).
    let mut key = unsafe { core::ptr::read_volatile(&ZERO_PROC_KEY) };
    key.tgid = (c.pid_tgid >> 32) as u32;
    key.dev = c.dev;
    key.ino = c.ino;
    key.op = c.op;
    key.direct = c.direct;
    match FILE_PROCS.get_ptr_mut(&key) {
        // SAFETY: map value pointer; threads of one process add to it at once.
        Some(p) => unsafe {
            core::intrinsics::atomic_xadd::<u64, u64, { Relaxed }>(&raw mut (*p).calls, 1);
            core::intrinsics::atomic_xadd::<u64, u64, { Relaxed }>(&raw mut (*p).bytes, done);
            // An atomic add costs ~7 ns here: none for the common zero.
            if err != 0 {
                core::intrinsics::atomic_xadd::<u64, u64, { Relaxed }>(&raw mut (*p).errors, 1);
            }
            core::intrinsics::atomic_xadd::<u64, u64, { Relaxed }>(&raw mut (*p).sum_ns, ns);
        },
        None => {
            let v = FileProcStats {
                calls: 1,
                bytes: done,
                errors: err,
                sum_ns: ns,
            };
            // Two threads may race to create it: the loser adds to the winner's.
            if FILE_PROCS.insert(&key, &v, BPF_NOEXIST as u64).is_err() {
                if let Some(p) = FILE_PROCS.get_ptr_mut(&key) {
                    unsafe {
                        core::intrinsics::atomic_xadd::<u64, u64, { Relaxed }>(
                            &raw mut (*p).calls,
                            1,
                        );
                        core::intrinsics::atomic_xadd::<u64, u64, { Relaxed }>(
                            &raw mut (*p).bytes,
                            done,
                        );
                        core::intrinsics::atomic_xadd::<u64, u64, { Relaxed }>(
                            &raw mut (*p).errors,
                            err,
                        );
                        core::intrinsics::atomic_xadd::<u64, u64, { Relaxed }>(
                            &raw mut (*p).sum_ns,
                            ns,
                        );
                    }
                }
            }
        }
    }
}
