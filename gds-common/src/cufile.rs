//! cuFile calls seen from outside the process: uprobes on libcufile's API and, beneath them,
//! on the libc calls cuFile's compat path makes (`pread64`/`pwrite64`) and the nvidia-fs
//! ioctls of its GDS path.
//!
//! Every uprobe carries its operation as the attach cookie (`bpf_get_attach_cookie`), so one
//! entry and one return program serve every function of every library copy.

use crate::HIST_BUCKETS;

/// Whose calls a counter holds: processes of trusted users (root and `--cufile-users`) or of
/// anyone else. Each share has its own tables (files, handles, calls in flight, error codes)
/// and its own operation counters, so no process of another user can fill a table a trusted
/// process needs, nor move the counters the alerts read.
pub const USER_TRUSTED: usize = 0;
pub const USER_OTHER: usize = 1;
pub const CUFILE_USERS: usize = 2;

/// One traced cuFile operation: its number (the cookie of its uprobes and, plus `CUFILE_OPS`
/// times the user share `USER_*`, the index of [`MAP_CUFILE_OPS`]), the functions libcufile
/// exports for it, and its name (`gds_cufile_*{op}`). `cuFileDriverClose_v2` (CUDA 12.2+) and
/// `cuFileDriverClose` are separate implementations, both counted as `driver_close`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CufileOp {
    pub op: u32,
    pub symbols: &'static [&'static str],
    pub label: &'static str,
}

/// Declares the operations once: a `CUFILE_OP_*` constant each (what the eBPF programs
/// compare), and [`CUFILE_OP_TABLE`] (what user space attaches and names by).
macro_rules! cufile_ops {
    ($($konst:ident = $op:literal, [$($symbol:literal),+], $label:literal;)*) => {
        $(
            #[doc = concat!("`op=\"", $label, "\"`: ", stringify!($($symbol),+), ".")]
            pub const $konst: u32 = $op;
        )*
        /// Every traced cuFile operation, in operation order.
        pub const CUFILE_OP_TABLE: &[CufileOp] = &[
            $(CufileOp { op: $konst, symbols: &[$($symbol),+], label: $label },)*
        ];
    };
}

// Adding a function: one line here (the next number), its row in README's `op` values (a test
// checks them), and its arguments in gds-ebpf/src/cufile.rs (`enter`) if they matter.
cufile_ops! {
    CUFILE_OP_READ = 0, ["cuFileRead"], "read";
    CUFILE_OP_WRITE = 1, ["cuFileWrite"], "write";
    CUFILE_OP_READ_ASYNC = 2, ["cuFileReadAsync"], "read_async";
    CUFILE_OP_WRITE_ASYNC = 3, ["cuFileWriteAsync"], "write_async";
    CUFILE_OP_BATCH_SUBMIT = 4, ["cuFileBatchIOSubmit"], "batch_submit";
    CUFILE_OP_BATCH_GET_STATUS = 5, ["cuFileBatchIOGetStatus"], "batch_get_status";
    CUFILE_OP_BATCH_CANCEL = 6, ["cuFileBatchIOCancel"], "batch_cancel";
    CUFILE_OP_HANDLE_REGISTER = 7, ["cuFileHandleRegister"], "handle_register";
    CUFILE_OP_HANDLE_DEREGISTER = 8, ["cuFileHandleDeregister"], "handle_deregister";
    CUFILE_OP_BUF_REGISTER = 9, ["cuFileBufRegister"], "buf_register";
    CUFILE_OP_BUF_DEREGISTER = 10, ["cuFileBufDeregister"], "buf_deregister";
    CUFILE_OP_DRIVER_OPEN = 11, ["cuFileDriverOpen"], "driver_open";
    CUFILE_OP_DRIVER_CLOSE = 12, ["cuFileDriverClose", "cuFileDriverClose_v2"], "driver_close";
}

// The table's row `i` is operation `i`, and every operation has its statistics entry.
const _: () = {
    let mut i = 0;
    while i < CUFILE_OP_TABLE.len() {
        assert!(CUFILE_OP_TABLE[i].op == i as u32);
        i += 1;
    }
    assert!(CUFILE_OP_TABLE.len() <= CUFILE_OPS);
};

/// Entries of [`MAP_CUFILE_OPS`] (a power of two above the last operation).
pub const CUFILE_OPS: usize = 16;

/// Cookies of the uprobes on libc, attached only in processes that map libcufile.
pub const BENEATH_PREAD: u32 = 64;
pub const BENEATH_PWRITE: u32 = 65;
pub const BENEATH_IOCTL: u32 = 66;

/// The data path a read or write took, index of [`CufileOpStats::path_bytes`].
pub const PATH_UNKNOWN: usize = 0;
/// POSIX I/O by cuFile's threads into host memory, then a copy (compatibility mode).
pub const PATH_COMPAT: usize = 1;
/// nvidia-fs: the I/O is an ioctl on `/dev/nvidia-fs*`.
pub const PATH_NVFS: usize = 2;
/// O_DIRECT I/O into peer (GPU BAR) memory: the process issued block requests whose pages are
/// P2PDMA pages while the call was in flight (`MAP_PEER_IO`).
pub const PATH_P2PDMA: usize = 3;
pub const CUFILE_PATHS: usize = 4;

/// nvidia-fs ioctl commands (`_IOW('t', n, int)`, nvidia-fs `nvfs-core.h`) that move data.
pub const NVFS_IOCTL_READ: u32 = 0x4004_7402;
pub const NVFS_IOCTL_WRITE: u32 = 0x4004_7404;
pub const NVFS_IOCTL_BATCH_IO: u32 = 0x4004_7408;

/// Whether ioctl `cmd` is one of nvidia-fs's data-moving commands (its GDS path).
#[inline(always)]
pub fn is_nvfs_io(cmd: u32) -> bool {
    cmd == NVFS_IOCTL_READ || cmd == NVFS_IOCTL_WRITE || cmd == NVFS_IOCTL_BATCH_IO
}

counted_enum! {
    /// Drop and bookkeeping counters in [`CufileCpuStats::counts`]; labelled by `reason` in
    /// `gds_trace_dropped_total` or by `link` in `gds_cufile_beneath_calls_total`
    /// (`model::labels::cufile_count` says which).
    pub enum CufileCount [CUFILE_COUNTS] {
        /// A call whose in-flight entry could not be stored: counted (`calls`), not timed.
        CallTableFull = 0 => "cufile_call_table_full",
        /// A return with no entry (the entry was refused, or the agent attached mid-call).
        ReturnUnmatched = 1 => "cufile_return_unmatched",
        /// A per-process or per-file row could not be created: the call is still in the op totals.
        FileTableFull = 2 => "cufile_file_table_full",
        /// An error code that could not get its counter (the error is in the op's `errors`).
        ErrorTableFull = 3 => "cufile_error_table_full",
        /// A registered handle that could not be remembered (its I/O is not linked to a file).
        HandleTableFull = 4 => "cufile_handle_table_full",
        /// A call found in flight on the thread at or below the new call's stack frame: its return
        /// was lost (a C++ exception or longjmp through cuFile); replaced.
        StaleReplaced = 5 => "cufile_stale_replaced",
        /// A cuFile function called from inside another traced one (counted once, as the outer).
        Nested = 6 => "nested",
        /// `pread64`/`pwrite64` in a cuFile process linked to a cuFile call in flight on its file.
        BeneathLinked = 7 => "linked",
        /// `pread64`/`pwrite64` in a cuFile process with no cuFile call in flight on the file (the
        /// application's own I/O, or cuFile's asynchronous and batch I/O).
        BeneathUnlinked = 8 => "unlinked",
        /// nvidia-fs data ioctls in cuFile processes.
        NvfsIoctls = 9 => "nvfs_ioctl",
        /// A file row or handle of a process of an untrusted user refused: the process already
        /// holds [`CUFILE_PROCESS_QUOTA`] of them (its calls still count, unlinked to the file).
        ProcessQuota = 10 => "cufile_process_quota",
        /// A row, handle, call in flight or error code of an untrusted user's process refused:
        /// the untrusted share of that table is full (the trusted tables are not touched).
        UntrustedTableFull = 11 => "cufile_untrusted_table_full",
        /// A file registered with cuFile that the file layer's hooks do not see (a file system
        /// the kiocb tier does not hook): libc probes are asked for its process.
        BeneathUnseen = 12 => "unseen",
        /// A file registered with cuFile whose inode could not be remembered (its table is
        /// full): the file layer's calls on it are not linked to its cuFile calls.
        InodeTableFull = 13 => "cufile_inode_table_full",
    }
}

/// Per-CPU counters not tied to an operation (`GDS_CUFILE_STATS`, one entry).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct CufileCpuStats {
    pub counts: [u64; CUFILE_COUNTS],
}

/// Per-CPU statistics of one cuFile operation and user share (`GDS_CUFILE_OPS`, indexed by
/// `CUFILE_OP_* + CUFILE_OPS * USER_*`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct CufileOpStats {
    /// Calls that returned (errors included); a call counts when it returns.
    pub calls: u64,
    pub errors: u64,
    /// Log2 buckets of the call's duration in nanoseconds.
    pub buckets: [u64; HIST_BUCKETS],
    pub sum_ns: u64,
    /// Bytes asked (size argument; for batch submits the sum over the submitted entries).
    pub bytes_asked: u64,
    /// Bytes the call returned as done (read and write), by [`PATH_UNKNOWN`] etc.
    pub path_bytes: [u64; CUFILE_PATHS],
    /// Calls that returned success, by path (read and write).
    pub path_calls: [u64; CUFILE_PATHS],
}

/// Key of the error counters (`GDS_CUFILE_ERRORS`): operation and error code. For read and
/// write the code is the negated return (`-1`: errno set; otherwise a `CUfileOpError`); for
/// the other calls it is `CUfileError_t.err`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CufileErrKey {
    pub op: u32,
    pub code: i32,
}

/// A cuFile call between its entry and return, keyed by thread (`pid_tgid`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct CufileCall {
    pub start_ns: u64,
    pub op: u32,
    /// Calls of traced functions made from inside this one, not yet returned.
    pub depth: u32,
    pub size: u64,
    pub offset: i64,
    /// The `CUfileHandle_t` argument, or for `cuFileHandleRegister` the address it writes the
    /// handle to.
    pub handle: u64,
    /// The file descriptor behind the handle (or, for registration, the one registered);
    /// -1 when unknown.
    pub fd: i32,
    pub _pad: u32,
    /// The file's [`CufileFileStats::compat_ios`] and the process's
    /// [`CufileFileStats::nvfs_ios`] at entry: what grew during the call is what it caused.
    pub compat_at_entry: u64,
    pub nvfs_at_entry: u64,
    /// The process's block requests into P2PDMA memory (`MAP_PEER_IO`) at entry.
    pub peer_at_entry: u64,
    /// The stack pointer at entry and the return address it pointed at. A traced call made
    /// from inside this one has a lower stack pointer; one it tail-calls (`cuFileDriverClose`
    /// jumps to `cuFileDriverClose_v2`) the same stack pointer but a return address the
    /// uretprobe replaced. Anything else means this call's return was lost (stale).
    pub sp: u64,
    pub ret_addr: u64,
}

/// Key of the per-process and per-file rows (`GDS_CUFILE_FILES`). [`PROCESS_ROW`] as `fd` is
/// the process's own row.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CufileFileKey {
    pub tgid: u32,
    pub fd: i32,
}

pub const PROCESS_ROW: i32 = -1;

/// Counters of one process or one of its files, updated atomically (several threads of one
/// process share a row).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct CufileFileStats {
    pub calls: u64,
    pub errors: u64,
    pub time_ns: u64,
    pub read_calls: u64,
    pub write_calls: u64,
    /// Bytes returned as done by read and write calls.
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub handle_registers: u64,
    pub buf_registers: u64,
    /// Libc reads and writes linked to a cuFile call on this file, and the bytes they asked.
    pub compat_ios: u64,
    pub compat_bytes: u64,
    /// nvidia-fs data ioctls (process row).
    pub nvfs_ios: u64,
    /// Libc reads and writes with no cuFile call in flight on their file, and the bytes they
    /// asked (process row): POSIX I/O of a cuFile process outside cuFile, e.g. KvikIO's reads
    /// below its GDS threshold, which never reach cuFile.
    pub outside_ios: u64,
    pub outside_bytes: u64,
    /// Read and write calls whose offset or size is not a multiple of 4 KiB.
    pub unaligned: u64,
    /// Synchronous read and write calls in flight on this file now.
    pub active: u64,
    /// Calls that returned success, by path.
    pub path_calls: [u64; CUFILE_PATHS],
    pub last_ns: u64,
    /// Process row of an untrusted user's process: the file rows and the handles it holds,
    /// checked against [`CUFILE_PROCESS_QUOTA`]. Zero for trusted processes (no quota).
    pub owned_rows: u64,
    pub owned_handles: u64,
}

/// Key of the files registered with cuFile, by what the file layer knows of a call: the
/// process and the file's device and inode (`GDS_CUFILE_INODES`, value: the descriptor it was
/// registered with, i.e. its row's `fd`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CufileInodeKey {
    pub tgid: u32,
    pub dev: u32,
    pub ino: u64,
}

/// Key of the registered handles (`GDS_CUFILE_HANDLES`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CufileHandleKey {
    pub tgid: u32,
    pub _pad: u32,
    pub handle: u64,
}

pub const MAP_CUFILE_STATS: &str = "GDS_CUFILE_STATS";
pub const MAP_CUFILE_OPS: &str = "GDS_CUFILE_OPS";
pub const MAP_CUFILE_ERRORS: &str = "GDS_CUFILE_ERRORS";
pub const MAP_CUFILE_CALLS: &str = "GDS_CUFILE_CALLS";
pub const MAP_CUFILE_FILES: &str = "GDS_CUFILE_FILES";
pub const MAP_CUFILE_HANDLES: &str = "GDS_CUFILE_HANDLES";
pub const MAP_CUFILE_DLOPEN: &str = "GDS_CUFILE_DLOPEN";
/// Registered files by inode (LRU, both shares): how a call the file layer sees is linked to
/// the cuFile call in flight on its file.
pub const MAP_CUFILE_INODES: &str = "GDS_CUFILE_INODES";
pub const MAP_CUFILE_INODES_OTHER: &str = "GDS_CUFILE_INODES_OTHER";
/// Processes that registered a file the file layer does not see (LRU): user space attaches
/// libc probes beneath cuFile in them.
pub const MAP_CUFILE_LIBC: &str = "GDS_CUFILE_LIBC";
pub const CUFILE_LIBC_MAX: u32 = 1024;
/// [`MAP_CUFILE_LIBC`] values: the kernel asks, user space answers once attached.
pub const LIBC_ASKED: u8 = 1;
pub const LIBC_ATTACHED: u8 = 2;
/// The untrusted share's tables (see [`USER_OTHER`]).
pub const MAP_CUFILE_ERRORS_OTHER: &str = "GDS_CUFILE_ERRORS_OTHER";
pub const MAP_CUFILE_CALLS_OTHER: &str = "GDS_CUFILE_CALLS_OTHER";
pub const MAP_CUFILE_FILES_OTHER: &str = "GDS_CUFILE_FILES_OTHER";
pub const MAP_CUFILE_HANDLES_OTHER: &str = "GDS_CUFILE_HANDLES_OTHER";

/// Capacity of the in-flight calls and handles tables (trusted share).
pub const CUFILE_INFLIGHT_MAX: u32 = 16384;
/// Capacity of the per-process and per-file rows (trusted share); user space removes rows of
/// exited processes.
pub const CUFILE_FILES_MAX: u32 = 8192;
/// Capacity of the error-code counters (trusted share): cuFile has ~50 error codes per
/// operation; anything beyond is a library returning junk.
pub const CUFILE_ERRORS_MAX: u32 = 1024;
/// Capacity of the untrusted share's rows, handles and calls in flight: half the trusted
/// tables. Processes of users not in `--cufile-users` are observed, not served; what they
/// cannot store is counted (`UntrustedTableFull`) and costs the kernel no more memory.
pub const CUFILE_OTHER_FILES_MAX: u32 = CUFILE_FILES_MAX / 2;
pub const CUFILE_OTHER_INFLIGHT_MAX: u32 = CUFILE_INFLIGHT_MAX / 2;
/// Capacity of the untrusted share's error-code counters: the ~50 real codes per operation
/// fit many times over; a fake library's junk codes stop here.
pub const CUFILE_OTHER_ERRORS_MAX: u32 = 256;
/// File rows and, separately, registered handles one untrusted process may hold: so one such
/// process cannot fill the untrusted share for the others. A real application registers a
/// handle per file it reads through cuFile; 512 files open at once through cuFile is far
/// more than a data loader keeps (and 8 such processes still fit in the share).
pub const CUFILE_PROCESS_QUOTA: u64 = 512;

/// Users besides root whose processes are trusted (`--cufile-users`): a few service accounts
/// per host; each costs one comparison in every cuFile probe.
pub const CUFILE_TRUSTED_MAX: usize = 16;
/// An unused entry of [`CufileConfig::trusted_uids`]: `(uid_t)-1` is no user's uid (the
/// kernel refuses it in setuid and reports unmapped ids as the overflow uid instead).
pub const NO_UID: u32 = u32::MAX;

/// Load-time configuration of the cuFile programs (a global in the object's read-only data,
/// set by user space before loading). The `--pid`/`--comm` filters are the io_uring
/// programs' (`UringConfig`), applied by the cuFile programs as well.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CufileConfig {
    /// Uids trusted besides root; unused entries are [`NO_UID`].
    pub trusted_uids: [u32; CUFILE_TRUSTED_MAX],
}

impl CufileConfig {
    /// Name of the global in the eBPF object.
    pub const SYMBOL: &'static str = "GDS_CUFILE_CONFIG";
    /// Root only.
    pub const DEFAULT: CufileConfig = CufileConfig {
        trusted_uids: [NO_UID; CUFILE_TRUSTED_MAX],
    };

    /// Whether a call made with `uid` counts as trusted (root always does).
    pub fn trusts(&self, uid: u32) -> bool {
        uid == 0 || (uid != NO_UID && self.trusted_uids.contains(&uid))
    }
}

/// Byte offsets in cuFile's ABI (`cufile.h`, CUDA 11.4 to 13: unchanged).
pub mod abi {
    /// `CUfileDescr_t.handle.fd` (after the `int type` and padding).
    pub const DESCR_FD: u64 = 8;
    /// `sizeof(CUfileIOParams_t)` and its `u.batch.size`.
    pub const IO_PARAMS_SIZE: u64 = 64;
    pub const IO_PARAMS_BATCH_SIZE: u64 = 32;
    /// Batch entries whose sizes a submit sums (more are counted, their bytes not).
    pub const BATCH_SUM_MAX: u32 = 64;
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    unsafe impl aya::Pod for CufileCpuStats {}
    unsafe impl aya::Pod for CufileOpStats {}
    unsafe impl aya::Pod for CufileErrKey {}
    unsafe impl aya::Pod for CufileCall {}
    unsafe impl aya::Pod for CufileFileKey {}
    unsafe impl aya::Pod for CufileFileStats {}
    unsafe impl aya::Pod for CufileHandleKey {}
    unsafe impl aya::Pod for CufileInodeKey {}
    unsafe impl aya::Pod for CufileConfig {}
}

#[cfg(test)]
mod tests {
    use super::*;

    /// nvidia-fs cannot run on the test machines: its classification rests on these codes,
    /// `_IOW('t', n, int)` of nvidia-fs's `nvfs-core.h`, checked here against the encoding.
    #[test]
    fn nvfs_data_ioctls_and_nothing_else() {
        let iow = |nr: u32| (1u32 << 30) | (4 << 16) | ((b't' as u32) << 8) | nr;
        assert_eq!(NVFS_IOCTL_READ, iow(2));
        assert_eq!(NVFS_IOCTL_WRITE, iow(4));
        assert_eq!(NVFS_IOCTL_BATCH_IO, iow(8));
        for io in [NVFS_IOCTL_READ, NVFS_IOCTL_WRITE, NVFS_IOCTL_BATCH_IO] {
            assert!(is_nvfs_io(io));
        }
        // MAP (buffer registration), a CUDA driver ioctl seen under torch, and TCGETS.
        for other in [iow(3), 0xc020_462a, 0x5401] {
            assert!(!is_nvfs_io(other), "{other:#x}");
        }
    }
}
