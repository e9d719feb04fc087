//! The synchronous file I/O layer: read/write calls on files (pread, read, readv, write, …),
//! whichever hooks the host allows (`--file-hooks`): the iomap direct-I/O tracepoints
//! (`iomap_dio_rw_begin`/`iomap_dio_complete`, O_DIRECT calls of ext4, xfs and btrfs, kernels
//! 6.4+), or the `raw_syscalls` tracepoints (`sys_enter`/`sys_exit`, every read and write
//! system call, at a cost to every syscall of every process).

use crate::{COMM_LEN, HIST_BUCKETS};

/// Operations, in [`FileCall::op`] and the statistics' rows (`op` label).
pub const FILE_OP_READ: u8 = 0;
pub const FILE_OP_WRITE: u8 = 1;
pub const FILE_OP_FSYNC: u8 = 2;
pub const FILE_OPS: usize = 3;
/// Statistics rows: `op * 2 + direct`.
pub const FILE_ROWS: usize = FILE_OPS * 2;

/// The row of `op` (O_DIRECT or not) in `GDS_FILE_STATS`.
#[inline(always)]
pub const fn file_row(op: u8, direct: bool) -> u32 {
    op as u32 * 2 + direct as u32
}

/// Which programs user space attached ([`FileConfig::tier`]), so each knows its key.
pub const FILE_TIER_OFF: u32 = 0;
pub const FILE_TIER_TRACEPOINT: u32 = 1;
pub const FILE_TIER_SYSCALLS: u32 = 2;
/// fentry/fexit or kprobe/kretprobe on the file systems' `read_iter`/`write_iter`, keyed by
/// the kiocb (`gds-ebpf` `file_kiocb`).
pub const FILE_TIER_KIOCB: u32 = 3;

/// Where a call came from ([`FileCall::origin`], and the `origin` label of the block requests
/// linked to it).
pub const ORIGIN_UNKNOWN: u8 = 0;
/// A system call (read, pread, write, …) of the thread itself.
pub const ORIGIN_SYSCALL: u8 = 1;
/// An io_uring request (the kiocb of a READ/WRITE is inside the `struct io_kiocb`).
pub const ORIGIN_URING: u8 = 2;
/// An io_uring passthrough command (`URING_CMD`): stages of NVMe passthrough.
pub const ORIGIN_URING_CMD: u8 = 3;
/// The kernel's own work (writeback, journal, readahead workers: a kernel thread).
pub const ORIGIN_KERNEL: u8 = 4;
/// nvidia-fs (GDS proper): the read or write its ioctl started on the file system, with its
/// own completion (`nvfs_io_complete`) in the kiocb.
pub const ORIGIN_NVFS: u8 = 5;

/// Where a call came from, by what the program that sees it start (the kiocb tier at
/// `read_iter`/`write_iter`, the tracepoint tier at `iomap_dio_rw_begin`)
/// knows there: the kiocb's completion (`ki_complete`; 0 for a synchronous call), nvidia-fs's
/// completion function (`nvfs_io_complete` from kallsyms; 0 where nvidia-fs is not loaded) and
/// whether the kiocb is an io_uring request's.
///
/// nvidia-fs's ioctl sets up a kiocb of its own and calls `read_iter` with `nvfs_io_complete`
/// as its completion (asynchronous mode, the one cuFile's reads use); its synchronous mode
/// (no completion) is a plain call of the ioctl's thread, `syscall`, as the ioctl is one.
#[inline(always)]
pub const fn kiocb_origin(complete: u64, nvfs_complete: u64, uring: bool) -> u8 {
    if complete == 0 {
        ORIGIN_SYSCALL
    } else if nvfs_complete != 0 && complete == nvfs_complete {
        ORIGIN_NVFS
    } else if uring {
        ORIGIN_URING
    } else {
        ORIGIN_SYSCALL
    }
}

/// nvidia-fs's completion function's address (`GDS_FILE_NVFS`, entry 0; 0 while nvidia-fs is
/// not loaded), written by user space when it finds the module.
pub const MAP_FILE_NVFS: &str = "GDS_FILE_NVFS";

/// A file call between its start and its end. Keyed by `struct kiocb *` (tracepoint tier)
/// or by the thread's `pid_tgid` (syscalls tier). 104 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct FileCall {
    pub start_ns: u64,
    /// `bpf_get_current_pid_tgid()` of the thread that started it.
    pub pid_tgid: u64,
    pub cgroup: u64,
    /// Inode number of the file.
    pub ino: u64,
    /// File offset the call starts at (`ki_pos`; the syscall's offset argument).
    pub pos: u64,
    /// Bytes asked (`iov_iter_count`; the syscall's count, 0 for vectors).
    pub bytes: u64,
    pub comm: [u8; COMM_LEN],
    /// `MKDEV` of the file system's device (`sb->s_dev`, as the programs build device ids).
    pub dev: u32,
    pub op: u8,
    /// 1 for O_DIRECT (`IOCB_DIRECT`; `O_DIRECT` in the file's flags).
    pub direct: u8,
    pub origin: u8,
    /// [`FILE_CALL_ASYNC`]: the call ends at its completion, not when `read_iter` returns.
    pub flags: u8,
    /// Stamped by the completions of the block requests linked to it: the disk, the first
    /// request's issue and the last one's completion (0: none yet). At its return the call's
    /// stages are queue (start → first issue), device (→ last completion) and completion
    /// (→ return): they add up to the call's duration, however many requests it became.
    pub blk_dev: u32,
    /// Block requests linked to it that completed while it was in flight, and the bytes they
    /// moved (`blk_rq_bytes()` at issue): the device commands per call and the bytes the
    /// device moved against the bytes asked (splits, merges and a short read show here).
    pub blk_requests: u32,
    pub first_issue_ns: u64,
    pub last_done_ns: u64,
    pub blk_bytes: u64,
}

/// [`FileCall::flags`]: an asynchronous kiocb (io_uring, aio): `read_iter` may return
/// `-EIOCBQUEUED` or `-EAGAIN` and be called again for the same request; the call ends at the
/// request's completion.
pub const FILE_CALL_ASYNC: u8 = 1;

/// One row of the file statistics (per CPU): calls that ended, their latency histogram,
/// bytes asked and returned, errors.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FileRowStats {
    pub buckets: [u64; HIST_BUCKETS],
    pub calls: u64,
    pub sum_ns: u64,
    pub bytes_asked: u64,
    pub bytes_done: u64,
    pub errors: u64,
    /// The calls' linked block requests and the bytes they moved ([`FileCall::blk_requests`],
    /// [`FileCall::blk_bytes`]).
    pub device_requests: u64,
    pub device_bytes: u64,
}

impl FileRowStats {
    pub const ZERO: FileRowStats = FileRowStats {
        buckets: [0; HIST_BUCKETS],
        calls: 0,
        sum_ns: 0,
        bytes_asked: 0,
        bytes_done: 0,
        errors: 0,
        device_requests: 0,
        device_bytes: 0,
    };
}

/// Key of the per-process, per-file counts (`GDS_FILE_PROCS`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileProcKey {
    pub tgid: u32,
    /// The file: device (`MKDEV`) and inode.
    pub dev: u32,
    pub ino: u64,
    pub op: u8,
    pub direct: u8,
    pub _pad: [u8; 6],
}

/// Counts of one process, operation and directness (atomic adds: threads share it).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct FileProcStats {
    pub calls: u64,
    pub bytes: u64,
    pub errors: u64,
    pub sum_ns: u64,
}

/// Offsets and constants for the file programs (`GDS_FILE_CONFIG`), from BTF and kallsyms.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FileConfig {
    /// [`FILE_TIER_OFF`], [`FILE_TIER_TRACEPOINT`] or [`FILE_TIER_SYSCALLS`].
    pub tier: u32,
    pub kiocb_filp: u32,
    pub kiocb_pos: u32,
    pub kiocb_flags: u32,
    /// `kiocb.ki_complete`: NULL for a synchronous call (ends when `read_iter` returns), else
    /// the completion an asynchronous one (io_uring, aio) ends at.
    pub kiocb_complete: u32,
    pub file_inode: u32,
    pub file_flags: u32,
    pub inode_ino: u32,
    pub inode_sb: u32,
    pub inode_mode: u32,
    /// `inode.i_size`: an O_DIRECT read at or past it returns 0 before iomap's completion,
    /// whose tracepoint then never fires (`file_dio_begin` ends such a call at once).
    pub inode_size: u32,
    pub sb_dev: u32,
    /// `iov_iter.count` and `iov_iter.data_source` (true: data flows from the iterator, a write).
    pub iter_count: u32,
    pub iter_source: u32,
    /// `task_struct.files`, `files_struct.fdt`, `fdtable.fd`, `fdtable.max_fds`: a
    /// descriptor's `struct file *` in the syscalls tier.
    pub task_files: u32,
    /// `task_struct.comm`: a call's thread name, two loads from the current task where
    /// `bpf_get_current_comm` costs ~35 ns a call (it copies the name with `strscpy`).
    pub task_comm: u32,
    /// `task_struct.cgroups`, `css_set.dfl_cgrp`, `cgroup.kn`, `kernfs_node.id`: the current
    /// task's cgroup id (what `bpf_get_current_cgroup_id` returns, ~30 ns a call here) by four
    /// loads. `task_cgroups` 0: unknown, the helper is called.
    pub task_cgroups: u32,
    pub css_set_dfl_cgrp: u32,
    pub cgroup_kn: u32,
    pub kernfs_node_id: u32,
    pub files_fdt: u32,
    pub fdt_fd: u32,
    pub fdt_max_fds: u32,
    /// `file.f_op` and `file_operations.read_iter`: which function reads a file, i.e. whether
    /// the kiocb tier's hooks see its calls ([`MAP_FILE_HOOKED`]).
    pub file_f_op: u32,
    pub fop_read_iter: u32,
    /// `pt_regs` offsets of the first three syscall arguments (x86-64: di, si, dx) and r10.
    pub regs_arg0: u32,
    pub regs_arg1: u32,
    pub regs_arg2: u32,
    pub regs_arg3: u32,
    /// Per syscall number below [`SYSCALL_TABLE`]: 0 (not traced) or [`SYSCALL_TRACED`] |
    /// the op | [`SYSCALL_COUNT_ARG2`] | [`SYSCALL_POS_ARG3`] (the architecture's numbers are
    /// user space's business: `trace::file`).
    pub syscall_ops: [u8; SYSCALL_TABLE],
}

/// Syscall numbers the syscalls tier looks up (x86-64's and arm64's read/write families are
/// all below it).
pub const SYSCALL_TABLE: usize = 512;
pub const SYSCALL_TRACED: u8 = 0x80;
pub const SYSCALL_OP_MASK: u8 = 0x03;
/// The byte count is the third argument (read, write, pread64, pwrite64).
pub const SYSCALL_COUNT_ARG2: u8 = 0x04;
/// The file offset is the fourth argument (pread64, pwrite64, preadv*, pwritev*).
pub const SYSCALL_POS_ARG3: u8 = 0x08;

impl FileConfig {
    pub const SYMBOL: &'static str = "GDS_FILE_CONFIG";
    pub const DEFAULT: FileConfig = FileConfig {
        tier: FILE_TIER_OFF,
        kiocb_filp: 0,
        kiocb_pos: 0,
        kiocb_flags: 0,
        kiocb_complete: 0,
        file_inode: 0,
        file_flags: 0,
        inode_ino: 0,
        inode_sb: 0,
        inode_mode: 0,
        inode_size: 0,
        sb_dev: 0,
        iter_count: 0,
        iter_source: 0,
        task_files: 0,
        task_comm: 0,
        task_cgroups: 0,
        css_set_dfl_cgrp: 0,
        cgroup_kn: 0,
        kernfs_node_id: 0,
        files_fdt: 0,
        fdt_fd: 0,
        fdt_max_fds: 0,
        file_f_op: 0,
        fop_read_iter: 0,
        regs_arg0: 0,
        regs_arg1: 0,
        regs_arg2: 0,
        regs_arg3: 0,
        syscall_ops: [0; SYSCALL_TABLE],
    };
}

/// `IOCB_DIRECT` in `kiocb.ki_flags` (include/linux/fs.h: `1 << 17` since 5.9; it is a
/// `#define`, so not in BTF).
pub const IOCB_DIRECT: u32 = 1 << 17;
/// `O_DIRECT` in `file.f_flags` (x86-64, arm64 differs: `0o200000`).
#[cfg(not(target_arch = "aarch64"))]
pub const O_DIRECT: u32 = 0o40000;
#[cfg(target_arch = "aarch64")]
pub const O_DIRECT: u32 = 0o200000;

/// Calls in flight: the direct-mapped slots (see `slot`), and the hash map of calls whose slot
/// was taken.
pub const MAP_FILE_SLOTS: &str = "GDS_FILE_SLOTS";
pub const MAP_FILE_INFLIGHT: &str = "GDS_FILE_INFLIGHT";
pub const MAP_FILE_STATS: &str = "GDS_FILE_STATS";
pub const MAP_FILE_PROCS: &str = "GDS_FILE_PROCS";
/// Thread (`pid_tgid`) → the kiocb of its synchronous call in the kiocb tier: what a
/// kretprobe ends, and what a block request the thread submits links to.
pub const MAP_FILE_THREAD: &str = "GDS_FILE_THREAD";
/// What the file layer's hooks see (`GDS_FILE_SEES`, entry 0: one of `FILE_SEES_*`), written
/// by user space once they are attached (the kiocb tier may fall back to the tracepoints after
/// loading, so it is not load-time configuration). The cuFile layer links the I/O beneath its
/// calls from the file layer where it sees it, and asks for libc probes only where not.
pub const MAP_FILE_SEES: &str = "GDS_FILE_SEES";
/// The file layer sees no file's every call (off, or the tracepoint tier: O_DIRECT only).
pub const FILE_SEES_NONE: u32 = 0;
/// Every read/write system call on every file (the syscalls tier).
pub const FILE_SEES_ALL: u32 = 1;
/// Every call of the files whose `f_op->read_iter` is hooked (the kiocb tier): their
/// addresses are the keys of [`MAP_FILE_HOOKED`].
pub const FILE_SEES_HOOKED: u32 = 2;
/// Addresses of the `read_iter` functions the kiocb tier hooks (from kallsyms; a module's are
/// added when it loads).
pub const MAP_FILE_HOOKED: &str = "GDS_FILE_HOOKED";
pub const FILE_HOOKED_MAX: u32 = 16;
/// Calls tracked at once; a call beyond is counted (`file_inflight_full`), never timed.
pub const FILE_INFLIGHT_MAX: u32 = 16384;
/// Slots of the direct-mapped call table (a power of two; ~0.5 MiB).
pub const FILE_SLOTS: u32 = 4096;
/// Process × file × (op, direct) rows kept (LRU: processes that stop doing file I/O age out).
pub const FILE_PROCS_MAX: u32 = 4096;

#[cfg(test)]
mod tests {
    use super::*;

    const NVFS: u64 = 0xffff_ffff_c0de_0000;
    const AIO: u64 = 0xffff_ffff_8100_1000;

    #[test]
    fn nvidia_fs_reads_are_told_by_their_completion() {
        // The ioctl's asynchronous read: nvidia-fs's completion in its kiocb.
        assert_eq!(kiocb_origin(NVFS, NVFS, false), ORIGIN_NVFS);
        // An io_uring read and an aio read complete elsewhere.
        assert_eq!(kiocb_origin(AIO, NVFS, true), ORIGIN_URING);
        assert_eq!(kiocb_origin(AIO, NVFS, false), ORIGIN_SYSCALL);
        // A synchronous call (nvidia-fs's sync mode included) is its thread's system call.
        assert_eq!(kiocb_origin(0, NVFS, false), ORIGIN_SYSCALL);
        // nvidia-fs not loaded: nothing is nvidia-fs's, even a zero completion.
        assert_eq!(kiocb_origin(AIO, 0, false), ORIGIN_SYSCALL);
        assert_eq!(kiocb_origin(0, 0, false), ORIGIN_SYSCALL);
    }
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    unsafe impl aya::Pod for FileCall {}
    unsafe impl aya::Pod for FileRowStats {}
    unsafe impl aya::Pod for FileProcKey {}
    unsafe impl aya::Pod for FileProcStats {}
    unsafe impl aya::Pod for FileConfig {}
}
