//! cuFile calls (uprobes on libcufile's API) and the I/O beneath them (uprobes on libc's
//! `pread64`/`pwrite64`/`ioctl` in the processes that map libcufile).
//!
//! One entry and one return program serve every function: the attach cookie is the operation
//! (`CUFILE_OP_*`) or the libc call (`BENEATH_*`), so adding a function is a user-space table
//! row. Calls are keyed by thread from entry to return; a call counts when it returns.
//!
//! The path a read or write took is what grew beneath it while it was in flight: nvidia-fs data
//! ioctls in the process (GDS), block requests into P2PDMA memory issued by the process
//! (P2PDMA: the block program counts them in the shared `PEER_IO`), or libc reads and writes on
//! the call's file by any thread of the process (compat: cuFile hands the I/O to worker
//! threads, so the thread is not the link; the file and the time window are). Each file row
//! counts the linked I/O; a call snapshots the counters at entry and compares at return. The
//! order matters: a P2PDMA read is a `pread` too, so peer memory is asked before compat.
//!
//! Trust: every program first applies the `--pid`/`--comm` filters (the io_uring programs'
//! config), then asks whether the calling user is trusted (root, or a uid of
//! `--cufile-users`). Trusted and untrusted calls go to separate tables and counters (a
//! [`Share`] each): a process of another user can fill only the untrusted share, where each
//! process may also hold at most `CUFILE_PROCESS_QUOTA` file rows and handles, and cannot move
//! the trusted counters that the alerts read. Overflow is counted (`ProcessQuota`,
//! `UntrustedTableFull`).
//!
//! Imports nothing of the io_uring or device programs: a separate layer with its own maps.
//! Where the file layer sees every call on a registered file (kiocb hooks on its file system,
//! or the syscalls tier), the file layer tells this one of each read and write instead
//! ([`file_call`]), and user space attaches no libc probes: see `gds-trace`'s `cufile.rs`.

use core::intrinsics::AtomicOrdering::Relaxed;

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::{
        bpf_get_attach_cookie, bpf_get_current_pid_tgid, bpf_get_current_uid_gid, bpf_ktime_get_ns,
        bpf_probe_read_user,
    },
    macros::{map, uprobe, uretprobe},
    maps::{HashMap, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{ProbeContext, RetProbeContext},
};
use gds_common::{
    HIST_BUCKETS,
    cufile::{
        BENEATH_IOCTL, BENEATH_PREAD, BENEATH_PWRITE, CUFILE_ERRORS_MAX, CUFILE_FILES_MAX,
        CUFILE_INFLIGHT_MAX, CUFILE_LIBC_MAX, CUFILE_OP_BATCH_SUBMIT, CUFILE_OP_BUF_REGISTER,
        CUFILE_OP_HANDLE_DEREGISTER, CUFILE_OP_HANDLE_REGISTER, CUFILE_OP_READ,
        CUFILE_OP_READ_ASYNC, CUFILE_OP_WRITE, CUFILE_OP_WRITE_ASYNC, CUFILE_OPS,
        CUFILE_OTHER_ERRORS_MAX, CUFILE_OTHER_FILES_MAX, CUFILE_OTHER_INFLIGHT_MAX, CUFILE_PATHS,
        CUFILE_PROCESS_QUOTA, CUFILE_TRUSTED_MAX, CUFILE_USERS, CufileCall, CufileConfig,
        CufileCount, CufileCpuStats, CufileErrKey, CufileFileKey, CufileFileStats, CufileHandleKey,
        CufileInodeKey, CufileOpStats, LIBC_ASKED, LIBC_ATTACHED, PATH_COMPAT, PATH_NVFS,
        PATH_P2PDMA, PATH_UNKNOWN, PROCESS_ROW, USER_OTHER, USER_TRUSTED, abi, is_nvfs_io,
    },
    log2_bucket,
};

use crate::{
    file::{fd_file, file_id, sees, sees_file},
    maps::{index, peer_ios, task_enabled},
};
use gds_common::file::FILE_SEES_NONE;

/// Which uids are trusted besides root (`--cufile-users`), set by user space at load.
#[unsafe(no_mangle)]
static GDS_CUFILE_CONFIG: CufileConfig = CufileConfig::DEFAULT;

#[map(name = "GDS_CUFILE_STATS")]
static STATS: PerCpuArray<CufileCpuStats> = PerCpuArray::with_max_entries(1, 0);

/// Per operation and user share: entry `op + CUFILE_OPS * USER_*`.
#[map(name = "GDS_CUFILE_OPS")]
static OPS: PerCpuArray<CufileOpStats> =
    PerCpuArray::with_max_entries((CUFILE_OPS * CUFILE_USERS) as u32, 0);

#[map(name = "GDS_CUFILE_ERRORS")]
static ERRORS: PerCpuHashMap<CufileErrKey, u64> =
    PerCpuHashMap::with_max_entries(CUFILE_ERRORS_MAX, 0);

#[map(name = "GDS_CUFILE_CALLS")]
static CALLS: HashMap<u64, CufileCall> = HashMap::with_max_entries(CUFILE_INFLIGHT_MAX, 0);

#[map(name = "GDS_CUFILE_FILES")]
static FILES: HashMap<CufileFileKey, CufileFileStats> =
    HashMap::with_max_entries(CUFILE_FILES_MAX, 0);

/// Registered handles → the file descriptor they were registered with.
#[map(name = "GDS_CUFILE_HANDLES")]
static HANDLES: HashMap<CufileHandleKey, i32> = HashMap::with_max_entries(CUFILE_INFLIGHT_MAX, 0);

/// The same four tables for processes of untrusted users.
#[map(name = "GDS_CUFILE_ERRORS_OTHER")]
static ERRORS_OTHER: PerCpuHashMap<CufileErrKey, u64> =
    PerCpuHashMap::with_max_entries(CUFILE_OTHER_ERRORS_MAX, 0);

#[map(name = "GDS_CUFILE_CALLS_OTHER")]
static CALLS_OTHER: HashMap<u64, CufileCall> =
    HashMap::with_max_entries(CUFILE_OTHER_INFLIGHT_MAX, 0);

#[map(name = "GDS_CUFILE_FILES_OTHER")]
static FILES_OTHER: HashMap<CufileFileKey, CufileFileStats> =
    HashMap::with_max_entries(CUFILE_OTHER_FILES_MAX, 0);

#[map(name = "GDS_CUFILE_HANDLES_OTHER")]
static HANDLES_OTHER: HashMap<CufileHandleKey, i32> =
    HashMap::with_max_entries(CUFILE_OTHER_INFLIGHT_MAX, 0);

/// Registered files by inode: what links a call the file layer sees to its cuFile call. LRU,
/// as big as the handles table: a process of the share can only push out the share's own.
#[map(name = "GDS_CUFILE_INODES")]
static INODES: LruHashMap<CufileInodeKey, i32> =
    LruHashMap::with_max_entries(CUFILE_INFLIGHT_MAX, 0);

#[map(name = "GDS_CUFILE_INODES_OTHER")]
static INODES_OTHER: LruHashMap<CufileInodeKey, i32> =
    LruHashMap::with_max_entries(CUFILE_OTHER_INFLIGHT_MAX, 0);

/// Processes that registered a file the file layer does not see: user space attaches libc
/// probes in them (it keeps what it read, so an entry pushed out later changes nothing) and
/// says so ([`LIBC_ATTACHED`]): from then on the probes count the process's I/O, not the file
/// layer.
#[map(name = "GDS_CUFILE_LIBC")]
static LIBC: LruHashMap<u32, u8> = LruHashMap::with_max_entries(CUFILE_LIBC_MAX, 0);

/// The tables and counters of one user share. The programs are instantiated once per share
/// (`enter::<Trusted>` and `enter::<Other>`): each instance names its maps as constants, which
/// the verifier needs to inline lookups and which keeps one share's code from ever touching
/// the other's tables.
trait Share {
    const USER: usize;
    fn files() -> &'static HashMap<CufileFileKey, CufileFileStats>;
    fn handles() -> &'static HashMap<CufileHandleKey, i32>;
    fn calls() -> &'static HashMap<u64, CufileCall>;
    fn errors() -> &'static PerCpuHashMap<CufileErrKey, u64>;
    fn inodes() -> &'static LruHashMap<CufileInodeKey, i32>;
}

/// Root and the uids of `--cufile-users`.
struct Trusted;
/// Everyone else.
struct Other;

/// A share's tables, by name: each instance of a program names its maps as constants.
macro_rules! share {
    ($share:ident, $user:expr, $files:ident, $handles:ident, $calls:ident, $errors:ident,
     $inodes:ident) => {
        impl Share for $share {
            const USER: usize = $user;
            #[inline(always)]
            fn files() -> &'static HashMap<CufileFileKey, CufileFileStats> {
                &$files
            }
            #[inline(always)]
            fn handles() -> &'static HashMap<CufileHandleKey, i32> {
                &$handles
            }
            #[inline(always)]
            fn calls() -> &'static HashMap<u64, CufileCall> {
                &$calls
            }
            #[inline(always)]
            fn errors() -> &'static PerCpuHashMap<CufileErrKey, u64> {
                &$errors
            }
            #[inline(always)]
            fn inodes() -> &'static LruHashMap<CufileInodeKey, i32> {
                &$inodes
            }
        }
    };
}

share!(Trusted, USER_TRUSTED, FILES, HANDLES, CALLS, ERRORS, INODES);
share!(
    Other,
    USER_OTHER,
    FILES_OTHER,
    HANDLES_OTHER,
    CALLS_OTHER,
    ERRORS_OTHER,
    INODES_OTHER
);

/// Counts a table of share `S` full: the trusted table's own reason, or `UntrustedTableFull`.
#[inline(always)]
fn full<S: Share>(trusted_reason: CufileCount) {
    if S::USER == USER_OTHER {
        count(CufileCount::UntrustedTableFull);
    } else {
        count(trusted_reason);
    }
}

/// Whether the calling task's user is trusted: root, or a uid of `--cufile-users`. The real
/// uid as the initial user namespace sees it (a container's root is trusted only where the
/// container shares the host's user namespace).
#[inline(always)]
fn trusted() -> bool {
    let uid = bpf_get_current_uid_gid() as u32;
    if uid == 0 {
        return true;
    }
    let mut i = 0;
    while i < CUFILE_TRUSTED_MAX {
        if let Some(u) = GDS_CUFILE_CONFIG.trusted_uids.get(i) {
            // SAFETY: a reference into the config; volatile so the load stays (see `conf!`).
            if unsafe { core::ptr::read_volatile(u) } == uid {
                return true;
            }
        }
        i += 1;
    }
    false
}

/// Process ids that just loaded or unloaded a library (see [`dl_notify`]).
#[map(name = "GDS_CUFILE_DLOPEN")]
static DLOPEN: RingBuf = RingBuf::with_byte_size(4096, 0);

/// All-zero row in read-only data: inserted from here, so no stack copy.
static ZERO_ROW: CufileFileStats = CufileFileStats {
    calls: 0,
    errors: 0,
    time_ns: 0,
    read_calls: 0,
    write_calls: 0,
    read_bytes: 0,
    write_bytes: 0,
    handle_registers: 0,
    buf_registers: 0,
    compat_ios: 0,
    compat_bytes: 0,
    nvfs_ios: 0,
    outside_ios: 0,
    outside_bytes: 0,
    unaligned: 0,
    active: 0,
    path_calls: [0; CUFILE_PATHS],
    last_ns: 0,
    owned_rows: 0,
    owned_handles: 0,
};

/// `CufileCall::_pad` bit: the call raised its file's `active` count (lower it at return).
const CALL_ACTIVE: u32 = 1;

#[inline(always)]
fn count(what: CufileCount) {
    if let Some(s) = STATS.get_ptr_mut(0) {
        // SAFETY: per-CPU map value pointer.
        if let Some(c) = unsafe { (*s).counts.get_mut(what as usize) } {
            *c += 1;
        }
    }
}

/// Atomic add into a shared (not per-CPU) map value.
#[inline(always)]
fn add(dst: *mut u64, v: u64) {
    // SAFETY: `dst` points into a map value.
    unsafe { core::intrinsics::atomic_xadd::<u64, u64, { Relaxed }>(dst, v) };
}

#[inline(always)]
fn cookie<C: EbpfContext>(ctx: &C) -> u32 {
    // SAFETY: the helper reads the link's cookie; 0 where none was set.
    unsafe { bpf_get_attach_cookie(ctx.as_ptr()) as u32 }
}

#[inline(always)]
fn read_user<T: Default>(addr: u64) -> T {
    // SAFETY: bpf_probe_read_user checks the address; a fault gives the default.
    unsafe { bpf_probe_read_user(addr as *const T) }.unwrap_or_default()
}

/// The process row of `tgid` in share `S`, created on first use. None when the table is full.
#[inline(always)]
fn process_row<S: Share>(tgid: u32) -> Option<*mut CufileFileStats> {
    let key = CufileFileKey {
        tgid,
        fd: PROCESS_ROW,
    };
    if let Some(p) = S::files().get_ptr_mut(&key) {
        return Some(p);
    }
    let _ = S::files().insert(&key, &ZERO_ROW, BPF_NOEXIST as u64);
    let p = S::files().get_ptr_mut(&key);
    if p.is_none() {
        full::<S>(CufileCount::FileTableFull);
    }
    p
}

/// The row of file `fd` of `tgid` in share `S`, created on first use. None when the table is
/// full or, for an untrusted process, when it holds its quota of rows already.
#[inline(always)]
fn file_row<S: Share>(tgid: u32, fd: i32) -> Option<*mut CufileFileStats> {
    let key = CufileFileKey { tgid, fd };
    if let Some(p) = S::files().get_ptr_mut(&key) {
        return Some(p);
    }
    if S::USER == USER_OTHER {
        let owner = process_row::<S>(tgid)?;
        // SAFETY: map value pointer. Threads racing past the check overshoot the quota by at
        // most one row each: bounded by the CPUs, and the share's size bounds the rest.
        if unsafe { core::ptr::read_volatile(&raw const (*owner).owned_rows) }
            >= CUFILE_PROCESS_QUOTA
        {
            count(CufileCount::ProcessQuota);
            return None;
        }
        if S::files()
            .insert(&key, &ZERO_ROW, BPF_NOEXIST as u64)
            .is_ok()
        {
            // SAFETY: map value pointer.
            add(unsafe { &raw mut (*owner).owned_rows }, 1);
        }
    } else {
        let _ = S::files().insert(&key, &ZERO_ROW, BPF_NOEXIST as u64);
    }
    let p = S::files().get_ptr_mut(&key);
    if p.is_none() {
        full::<S>(CufileCount::FileTableFull);
    }
    p
}

/// Remembers that `tgid` registered `handle` for `fd` (share `S`; quota for untrusted).
#[inline(always)]
fn remember_handle<S: Share>(tgid: u32, handle: u64, fd: i32) {
    let key = CufileHandleKey {
        tgid,
        _pad: 0,
        handle,
    };
    if let Some(h) = S::handles().get_ptr_mut(&key) {
        // SAFETY: map value pointer (the handle registered again, for another fd).
        unsafe { *h = fd };
        return;
    }
    if S::USER == USER_OTHER {
        let Some(owner) = process_row::<S>(tgid) else {
            return;
        };
        // SAFETY: map value pointer; the same bounded overshoot as `file_row`.
        if unsafe { core::ptr::read_volatile(&raw const (*owner).owned_handles) }
            >= CUFILE_PROCESS_QUOTA
        {
            count(CufileCount::ProcessQuota);
            return;
        }
        if S::handles().insert(&key, &fd, BPF_NOEXIST as u64).is_ok() {
            // SAFETY: map value pointer.
            add(unsafe { &raw mut (*owner).owned_handles }, 1);
            return;
        }
    } else if S::handles().insert(&key, &fd, BPF_NOEXIST as u64).is_ok() {
        return;
    }
    full::<S>(CufileCount::HandleTableFull);
}

/// Forgets a handle of `tgid` (share `S`), giving an untrusted process its quota back.
#[inline(always)]
fn forget_handle<S: Share>(tgid: u32, handle: u64) {
    let key = CufileHandleKey {
        tgid,
        _pad: 0,
        handle,
    };
    if S::handles().remove(&key).is_ok() && S::USER == USER_OTHER {
        let owner = CufileFileKey {
            tgid,
            fd: PROCESS_ROW,
        };
        if let Some(p) = S::files().get_ptr_mut(&owner) {
            // SAFETY: map value pointer; only handles counted in were removed.
            add(unsafe { &raw mut (*p).owned_handles }, u64::MAX);
        }
    }
}

/// Where the file layer sees the calls on `fd` (registered by `tgid`), remembers its inode, so
/// those calls link to the cuFile call in flight on it ([`file_call`]); where it does not,
/// asks user space for libc probes in the process (and tells it now, as a `dlopen` does).
#[inline(always)]
fn remember_inode<S: Share>(tgid: u32, fd: i32) {
    if sees() == FILE_SEES_NONE {
        return;
    }
    let file = fd_file(fd as u64);
    if file == 0 {
        return;
    }
    if !sees_file(file) {
        count(CufileCount::BeneathUnseen);
        // SAFETY: map read.
        if unsafe { LIBC.get(&tgid) }.is_none() {
            let _ = LIBC.insert(&tgid, &LIBC_ASKED, BPF_ANY as u64);
            let _ = DLOPEN.output::<u32>(&tgid, 0);
        }
        return;
    }
    let (dev, ino, _) = file_id(file);
    let key = CufileInodeKey { tgid, dev, ino };
    if S::inodes().insert(&key, &fd, BPF_ANY as u64).is_err() {
        count(CufileCount::InodeTableFull);
    }
}

/// A read or write on file (`dev`, `ino`) of process `tgid` starts, seen by the file layer:
/// the kernel-side replacement for the libc probes ([`beneath_enter`]), linked the same way
/// (by the file, not the thread: cuFile hands its I/O to worker threads) and counted in the
/// same counters. Costs one array read where the file layer sees no file's every call.
#[inline(always)]
pub(crate) fn file_call(tgid: u32, dev: u32, ino: u64, asked: u64) {
    if sees() == FILE_SEES_NONE {
        return;
    }
    if trusted() {
        file_call_in::<Trusted>(tgid, dev, ino, asked);
    } else {
        file_call_in::<Other>(tgid, dev, ino, asked);
    }
}

#[inline(always)]
fn file_call_in<S: Share>(tgid: u32, dev: u32, ino: u64, asked: u64) {
    let key = CufileInodeKey { tgid, dev, ino };
    // SAFETY: map value read.
    let Some(fd) = (unsafe { S::inodes().get(&key) }).copied() else {
        return;
    };
    // SAFETY: map value read.
    if unsafe { LIBC.get(&tgid) }.copied() == Some(LIBC_ATTACHED) {
        // Its libc probes count every pread and pwrite of the process already.
        return;
    }
    if let Some(r) = S::files().get_ptr_mut(&CufileFileKey { tgid, fd }) {
        // SAFETY: map value pointer.
        unsafe {
            if core::ptr::read_volatile(&raw const (*r).active) != 0 {
                add(&raw mut (*r).compat_ios, 1);
                add(&raw mut (*r).compat_bytes, asked);
                count(CufileCount::BeneathLinked);
                return;
            }
        }
    }
    count(CufileCount::BeneathUnlinked);
    let owner = CufileFileKey {
        tgid,
        fd: PROCESS_ROW,
    };
    if let Some(p) = S::files().get_ptr_mut(&owner) {
        // SAFETY: map value pointer.
        unsafe {
            add(&raw mut (*p).outside_ios, 1);
            add(&raw mut (*p).outside_bytes, asked);
        }
    }
}

#[inline(always)]
fn is_sync_io(op: u32) -> bool {
    op == CUFILE_OP_READ || op == CUFILE_OP_WRITE
}

/// Entry of every traced libcufile function; the cookie is its `CUFILE_OP_*`.
#[uprobe]
pub fn cufile_enter(ctx: ProbeContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    if !task_enabled((id >> 32) as u32) {
        return 0;
    }
    if trusted() {
        enter::<Trusted>(&ctx, id);
    } else {
        enter::<Other>(&ctx, id);
    }
    0
}

#[inline(always)]
fn enter<S: Share>(ctx: &ProbeContext, id: u64) {
    let op = cookie(ctx);
    if op as usize >= CUFILE_OPS {
        return;
    }
    let tgid = (id >> 32) as u32;
    // SAFETY: the context is the uprobe's pt_regs.
    let sp = unsafe { (*ctx.regs).rsp };
    let ret_addr = read_user::<u64>(sp);
    if let Some(c) = S::calls().get_ptr_mut(&id) {
        // SAFETY: map value pointer.
        let c = unsafe { &mut *c };
        if sp < c.sp || (sp == c.sp && ret_addr != c.ret_addr) {
            c.depth += 1;
            count(CufileCount::Nested);
            return;
        }
        count(CufileCount::StaleReplaced);
    }
    let arg = |n| ctx.arg::<u64>(n).unwrap_or(0);
    let mut call = CufileCall {
        // SAFETY: helper without arguments.
        start_ns: unsafe { bpf_ktime_get_ns() },
        op,
        fd: -1,
        sp,
        ret_addr,
        ..Default::default()
    };
    if op == CUFILE_OP_READ || op == CUFILE_OP_WRITE {
        // cuFileRead(fh, buf, size, file_offset, buf_offset)
        call.handle = arg(0);
        call.size = arg(2);
        call.offset = arg(3) as i64;
    } else if op == CUFILE_OP_READ_ASYNC || op == CUFILE_OP_WRITE_ASYNC {
        // cuFileReadAsync(fh, buf, size_t *size, off_t *file_offset, …): pointers, read now
        // (the application may change them once the call returns).
        call.handle = arg(0);
        call.size = read_user::<u64>(arg(2));
        call.offset = read_user::<i64>(arg(3));
    } else if op == CUFILE_OP_BATCH_SUBMIT {
        // cuFileBatchIOSubmit(batch, unsigned nr, CUfileIOParams_t *params, flags)
        let nr = arg(1) as u32;
        let params = arg(2);
        let mut sum = 0u64;
        let mut i = 0u32;
        while i < abi::BATCH_SUM_MAX && i < nr {
            sum += read_user::<u64>(
                params + i as u64 * abi::IO_PARAMS_SIZE + abi::IO_PARAMS_BATCH_SIZE,
            );
            i += 1;
        }
        call.size = sum;
    } else if op == CUFILE_OP_HANDLE_REGISTER {
        // cuFileHandleRegister(CUfileHandle_t *fh, CUfileDescr_t *descr)
        call.handle = arg(0);
        call.fd = read_user::<i32>(arg(1) + abi::DESCR_FD);
    } else if op == CUFILE_OP_HANDLE_DEREGISTER {
        call.handle = arg(0);
    }
    if call.fd < 0 && call.handle != 0 && op != CUFILE_OP_HANDLE_REGISTER {
        let key = CufileHandleKey {
            tgid,
            _pad: 0,
            handle: call.handle,
        };
        // SAFETY: map value read.
        if let Some(fd) = unsafe { S::handles().get(&key) } {
            call.fd = *fd;
        }
    }
    if is_sync_io(op) && call.fd >= 0 {
        if let Some(r) = file_row::<S>(tgid, call.fd) {
            // SAFETY: map value pointer.
            unsafe {
                add(&raw mut (*r).active, 1);
                call.compat_at_entry = core::ptr::read_volatile(&raw const (*r).compat_ios);
            }
            call._pad |= CALL_ACTIVE;
        }
        if let Some(p) = process_row::<S>(tgid) {
            // SAFETY: map value pointer.
            call.nvfs_at_entry = unsafe { core::ptr::read_volatile(&raw const (*p).nvfs_ios) };
        }
        call.peer_at_entry = peer_ios(tgid);
    }
    if S::calls().insert(&id, &call, BPF_ANY as u64).is_err() {
        full::<S>(CufileCount::CallTableFull);
        if call._pad & CALL_ACTIVE != 0 {
            if let Some(r) = file_row::<S>(tgid, call.fd) {
                // SAFETY: map value pointer.
                add(unsafe { &raw mut (*r).active }, u64::MAX);
            }
        }
    }
}

/// Return of every traced libcufile function.
#[uretprobe]
pub fn cufile_exit(ctx: RetProbeContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    if !task_enabled((id >> 32) as u32) {
        return 0;
    }
    if trusted() {
        exit::<Trusted>(&ctx, id);
    } else {
        exit::<Other>(&ctx, id);
    }
    0
}

#[inline(always)]
fn exit<S: Share>(ctx: &RetProbeContext, id: u64) {
    let tgid = (id >> 32) as u32;
    let Some(c) = S::calls().get_ptr_mut(&id) else {
        count(CufileCount::ReturnUnmatched);
        return;
    };
    // SAFETY: map value pointer; copied out before the entry is removed.
    let call = unsafe {
        if (*c).depth > 0 {
            (*c).depth -= 1;
            return;
        }
        *c
    };
    let _ = S::calls().remove(&id);
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let ns = now.saturating_sub(call.start_ns);
    let rax: u64 = ctx.ret();
    let op = call.op;

    // Read and write return ssize_t: bytes, or -1 (errno) or -CUfileOpError. Deregistering a
    // handle returns nothing. The rest return CUfileError_t { err, cu_err } in rax: err low.
    let mut code: i32 = 0;
    let mut done: u64 = 0;
    if is_sync_io(op) {
        let r = rax as i64;
        if r < 0 {
            code = r.wrapping_neg() as i32;
        } else {
            done = r as u64;
        }
    } else if op != CUFILE_OP_HANDLE_DEREGISTER {
        code = rax as u32 as i32;
    }

    let mut path = PATH_UNKNOWN;
    if is_sync_io(op) && code == 0 && call.fd >= 0 {
        if let Some(p) = process_row::<S>(tgid) {
            // SAFETY: map value pointer.
            if unsafe { core::ptr::read_volatile(&raw const (*p).nvfs_ios) } != call.nvfs_at_entry {
                path = PATH_NVFS;
            }
        }
        if path == PATH_UNKNOWN && peer_ios(tgid) != call.peer_at_entry {
            path = PATH_P2PDMA;
        }
        if path == PATH_UNKNOWN {
            if let Some(r) = file_row::<S>(tgid, call.fd) {
                // SAFETY: map value pointer.
                if unsafe { core::ptr::read_volatile(&raw const (*r).compat_ios) }
                    != call.compat_at_entry
                {
                    path = PATH_COMPAT;
                }
            }
        }
    }

    let entry = op as u64 + (S::USER * CUFILE_OPS) as u64;
    if let Some(s) = index(entry, CUFILE_OPS * CUFILE_USERS).and_then(|i| OPS.get_ptr_mut(i as u32))
    {
        // SAFETY: per-CPU map value pointer.
        let s = unsafe { &mut *s };
        s.calls += 1;
        s.sum_ns += ns;
        if let Some(b) =
            index(log2_bucket(ns) as u64, HIST_BUCKETS).and_then(|i| s.buckets.get_mut(i))
        {
            *b += 1;
        }
        s.bytes_asked += call.size;
        if code != 0 {
            s.errors += 1;
        } else if is_sync_io(op) {
            if let Some(b) = index(path as u64, CUFILE_PATHS).and_then(|i| s.path_bytes.get_mut(i))
            {
                *b += done;
            }
            if let Some(n) = index(path as u64, CUFILE_PATHS).and_then(|i| s.path_calls.get_mut(i))
            {
                *n += 1;
            }
        }
    }
    if code != 0 {
        let key = CufileErrKey { op, code };
        match S::errors().get_ptr_mut(&key) {
            // SAFETY: per-CPU map value pointer.
            Some(n) => unsafe { *n += 1 },
            None => {
                if S::errors().insert(&key, &1, BPF_NOEXIST as u64).is_err() {
                    full::<S>(CufileCount::ErrorTableFull);
                }
            }
        }
    }

    if op == CUFILE_OP_HANDLE_REGISTER && code == 0 && call.fd >= 0 {
        remember_handle::<S>(tgid, read_user::<u64>(call.handle), call.fd);
        remember_inode::<S>(tgid, call.fd);
    } else if op == CUFILE_OP_HANDLE_DEREGISTER {
        forget_handle::<S>(tgid, call.handle);
    }

    let unaligned = ((call.offset as u64) | call.size) & 4095 != 0;
    let update = |r: *mut CufileFileStats| {
        // SAFETY: map value pointer.
        unsafe {
            add(&raw mut (*r).calls, 1);
            add(&raw mut (*r).time_ns, ns);
            if code != 0 {
                add(&raw mut (*r).errors, 1);
            }
            if op == CUFILE_OP_HANDLE_REGISTER {
                add(&raw mut (*r).handle_registers, 1);
            } else if op == CUFILE_OP_BUF_REGISTER {
                add(&raw mut (*r).buf_registers, 1);
            } else if is_sync_io(op) {
                if op == CUFILE_OP_READ {
                    add(&raw mut (*r).read_calls, 1);
                    add(&raw mut (*r).read_bytes, done);
                } else {
                    add(&raw mut (*r).write_calls, 1);
                    add(&raw mut (*r).write_bytes, done);
                }
                if unaligned {
                    add(&raw mut (*r).unaligned, 1);
                }
                if code == 0 {
                    if let Some(n) =
                        index(path as u64, CUFILE_PATHS).and_then(|i| (*r).path_calls.get_mut(i))
                    {
                        add(n, 1);
                    }
                }
            }
            core::ptr::write_volatile(&raw mut (*r).last_ns, now);
        }
    };
    if let Some(p) = process_row::<S>(tgid) {
        update(p);
    }
    if call.fd >= 0 {
        if let Some(r) = file_row::<S>(tgid, call.fd) {
            update(r);
            if call._pad & CALL_ACTIVE != 0 {
                // SAFETY: map value pointer.
                add(unsafe { &raw mut (*r).active }, u64::MAX);
            }
        }
    }
}

/// Entry of libc's `pread64`/`pwrite64`/`ioctl` in a process that maps libcufile (the
/// cookie says which). Linked at entry, with the bytes asked: a uretprobe here would add a
/// third trap to every call of the application's (`pread64` starts with a RIP-relative compare
/// that the kernel single-steps out of line: two traps already), and the link needs only that
/// the call happened on a file with a cuFile call in flight. Only nvidia-fs data ioctls count:
/// the CUDA driver's own ioctls go through the same function.
#[uprobe]
pub fn beneath_enter(ctx: ProbeContext) -> u32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if !task_enabled(tgid) {
        return 0;
    }
    if trusted() {
        beneath::<Trusted>(&ctx, tgid);
    } else {
        beneath::<Other>(&ctx, tgid);
    }
    0
}

#[inline(always)]
fn beneath<S: Share>(ctx: &ProbeContext, tgid: u32) {
    let kind = cookie(ctx);
    let fd = ctx.arg::<u64>(0).unwrap_or(0) as i32;
    if kind == BENEATH_IOCTL {
        if !is_nvfs_io(ctx.arg::<u64>(1).unwrap_or(0) as u32) {
            return;
        }
        count(CufileCount::NvfsIoctls);
        if let Some(p) = process_row::<S>(tgid) {
            // SAFETY: map value pointer.
            add(unsafe { &raw mut (*p).nvfs_ios }, 1);
        }
        return;
    }
    if kind != BENEATH_PREAD && kind != BENEATH_PWRITE {
        return;
    }
    let asked = ctx.arg::<u64>(2).unwrap_or(0);
    let key = CufileFileKey { tgid, fd };
    if let Some(r) = S::files().get_ptr_mut(&key) {
        // SAFETY: map value pointer.
        unsafe {
            if core::ptr::read_volatile(&raw const (*r).active) != 0 {
                add(&raw mut (*r).compat_ios, 1);
                add(&raw mut (*r).compat_bytes, asked);
                count(CufileCount::BeneathLinked);
                return;
            }
        }
    }
    count(CufileCount::BeneathUnlinked);
    if let Some(p) = process_row::<S>(tgid) {
        // SAFETY: map value pointer.
        unsafe {
            add(&raw mut (*p).outside_ios, 1);
            add(&raw mut (*p).outside_bytes, asked);
        }
    }
}

/// `_dl_debug_state` in ld.so: the dynamic loader calls it (the debugger interface, `r_brk`)
/// before and after it maps or unmaps libraries, in every process. Tells user space which
/// process to look at now, so a library loaded with dlopen is attached in milliseconds rather
/// than at the next periodic scan. A full ring buffer loses only the hurry: the scan still
/// comes. Processes the `--pid`/`--comm` filters leave out are not reported.
#[uprobe]
pub fn dl_notify(_ctx: ProbeContext) -> u32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if !task_enabled(tgid) {
        return 0;
    }
    let _ = DLOPEN.output::<u32>(&tgid, 0);
    0
}
