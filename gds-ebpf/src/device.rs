//! NVMe commands and block requests: per-disk latency, NVMe errors, the link between an
//! io_uring URING_CMD request and the NVMe command it became, and whether a block request's
//! data is PCI peer memory (P2PDMA), counted per issuing process for the cuFile programs.
//!
//! For passthrough from io_uring, `request->end_io_data` is the `struct io_uring_cmd`, which
//! sits at the start of the `struct io_kiocb` the io_uring programs key on: so the NVMe
//! program finds the io_uring entry exactly and stamps setup/complete times into it; the
//! io_uring completion then splits the latency into queue, device and completion stages.
//! The NVMe programs read with bpf_probe_read_kernel at BTF-resolved offsets: NVMe commands are
//! microseconds, and the helper keeps the programs valid on every kernel from 6.1 on. The block
//! programs run for every block request of every disk, so they load directly through their
//! BTF-typed arguments (`struct request *`, `struct bio *`, the current `task_struct`) at the
//! same BTF-resolved offsets (constants from `.rodata` to the verifier), as `file_dio_begin`
//! does: with retpoline/SRSO mitigations every helper call costs tens of ns, and a 4 KiB
//! O_DIRECT read took ~20 of them across its three block programs.
//!
//! The two NVMe programs are raw tracepoints (`BPF_PROG_TYPE_RAW_TRACEPOINT`), not BTF ones:
//! on distribution kernels the `nvme:*` tracepoints live in the `nvme_core` module, and a
//! BTF tracepoint must name its target in the BTF it was loaded against (aya 0.14 only
//! looks in vmlinux, and the module's BTF exists only once it is loaded). A raw tracepoint
//! attaches by name to built-in and module tracepoints alike, can be loaded before the
//! module exists and attached when it appears, and costs the same at run time; these
//! programs read through `bpf_probe_read_kernel` anyway, so they lose nothing by seeing their
//! arguments as plain integers.
//!
//! This module imports only [`crate::maps`] (the io_uring in-flight entries and statistics it
//! writes into), never `uring`: `uring` calls [`record_stages`] here, so imports go one way.

use core::intrinsics::AtomicOrdering::Relaxed;

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_task_btf, bpf_ktime_get_ns, bpf_probe_read_kernel,
    },
    macros::{btf_tracepoint, map, raw_tracepoint},
    maps::{Array, HashMap, LruHashMap, PerCpuHashMap},
    programs::{BtfTracePointContext, RawTracePointContext},
};
use gds_common::{
    BLOCK_INFLIGHT_MAX, BLOCK_OP_DRV_IN, BLOCK_OP_DRV_OUT, BLOCK_PROCS_MAX, BLOCK_SLOTS,
    BlockInflight, BlockProcKey, BlockProcStats, DevConfig, DevHist, DevHistKey, DropReason,
    FLAG_P2PDMA, HIST_BUCKETS, InflightReq, KIND_BLOCK, KIND_NVME_CMD, LINK_CALL, LINK_PAGE,
    MEMORY_HOST, MEMORY_P2PDMA, NVME_INFLIGHT_MAX, NvmeErrKey, NvmeInflight, NvmeRuntime,
    PF_KTHREAD, STAGE_HIST_MAX, STAGES, Scratch, Slot, StageHistKey, StageHists, Submitter,
    UringCpuStats,
    file::{FileCall, ORIGIN_KERNEL, ORIGIN_SYSCALL, ORIGIN_URING, ORIGIN_URING_CMD},
    log2_bucket,
};

use crate::{
    file::{calls, field, task_cgroup, task_comm, thread_call},
    maps::{BPF_F_MMAPABLE, PEER_IO, as_scalar, entry_mut, index, stats},
    slots::SlotTable,
};

#[unsafe(no_mangle)]
static GDS_DEV_CONFIG: DevConfig = DevConfig::DEFAULT;

#[map(name = "GDS_DEV_HIST")]
static DEV_HIST: PerCpuHashMap<DevHistKey, DevHist> = PerCpuHashMap::with_max_entries(4096, 0);

/// Queue, device and completion durations per disk and origin (`StageHists`).
#[map(name = "GDS_STAGE_HIST")]
static STAGE_HIST: PerCpuHashMap<StageHistKey, StageHists> =
    PerCpuHashMap::with_max_entries(STAGE_HIST_MAX, 0);

#[map(name = "GDS_NVME_ERRORS")]
static NVME_ERRORS: PerCpuHashMap<NvmeErrKey, u64> = PerCpuHashMap::with_max_entries(1024, 0);

/// Written by user space when it attaches the NVMe programs (see `NvmeRuntime`).
#[map(name = "GDS_NVME_RUNTIME")]
static NVME_RUNTIME: Array<NvmeRuntime> = Array::with_max_entries(1, 0);

#[map(name = "GDS_NVME_INFLIGHT")]
static NVME_INFLIGHT: HashMap<u64, NvmeInflight> = HashMap::with_max_entries(NVME_INFLIGHT_MAX, 0);

/// Block requests by first bio (see `MAP_BLOCK_INFLIGHT`): created at [`block_getrq`] with
/// the submitter, filled in place at [`block_issue`], deleted at [`block_complete`]. In
/// [`requests`]' slots, or this LRU hash where a request's slot is taken.
#[map(name = "GDS_BLOCK_INFLIGHT")]
static BLOCK_INFLIGHT: LruHashMap<u64, BlockInflight> =
    LruHashMap::with_max_entries(BLOCK_INFLIGHT_MAX, 0);

/// The direct-mapped slots of [`requests`] (mmapable: user space scans them).
#[map(name = "GDS_BLOCK_SLOTS")]
static BLOCK_SLOT_ARRAY: Array<Slot<BlockInflight>> =
    Array::with_max_entries(BLOCK_SLOTS, BPF_F_MMAPABLE);

/// The block requests in flight (see [`BLOCK_INFLIGHT`]).
#[inline(always)]
fn requests() -> SlotTable<BlockInflight, LruHashMap<u64, BlockInflight>> {
    SlotTable {
        slots: &BLOCK_SLOT_ARRAY,
        overflow: &BLOCK_INFLIGHT,
        mask: BLOCK_SLOTS as u64 - 1,
    }
}

/// A request's key in [`BLOCK_INFLIGHT`]: its first bio, or the request itself when it has no
/// bio (a flush, a passthrough command without data). Bios and requests are distinct objects,
/// so the two never collide.
#[inline(always)]
fn block_key(bio: u64, rq: u64) -> u64 {
    if bio != 0 { bio } else { rq }
}

/// Block requests per submitting process, op, origin and link (`BlockProcKey`).
#[map(name = "GDS_BLOCK_PROCS")]
static BLOCK_PROCS: LruHashMap<BlockProcKey, BlockProcStats> =
    LruHashMap::with_max_entries(BLOCK_PROCS_MAX, 0);

/// All-zero histogram in read-only data: inserted from here, so no 300-byte stack copy.
static ZERO_HIST: DevHist = DevHist::ZERO;

/// All-zero stage histograms (see [`ZERO_HIST`]).
// SAFETY: plain old data; all-zero is a valid value.
static ZERO_STAGES: StageHists = unsafe { core::mem::zeroed() };

/// All-zero in-flight entry in read-only data, copied word by word to start a new one: a
/// struct literal with zeroed fields makes LLVM call a byte-by-byte `memset` (five
/// instructions a byte, ~80 bytes for an entry), the copy is 18 loads and stores.
// SAFETY: plain old data; all-zero is a valid value.
static ZERO_INFLIGHT: BlockInflight = unsafe { core::mem::zeroed() };

/// A zeroed [`BlockInflight`] on the stack (see [`ZERO_INFLIGHT`]).
#[inline(always)]
fn zero_inflight() -> BlockInflight {
    // SAFETY: a static; volatile so LLVM copies it instead of folding it into a memset.
    unsafe { core::ptr::read_volatile(&ZERO_INFLIGHT) }
}

/// Reads a field of [`GDS_DEV_CONFIG`] (volatile, so the verifier sees the `.rodata` load and
/// takes its value as a constant). Usable inside the `unsafe` blocks of direct loads.
macro_rules! dconf {
    ($field:ident) => {{
        #[allow(unused_unsafe)]
        let v = unsafe { core::ptr::read_volatile(&GDS_DEV_CONFIG.$field) };
        v
    }};
    ($a:ident . $b:ident) => {{
        #[allow(unused_unsafe)]
        let v = unsafe { core::ptr::read_volatile(&GDS_DEV_CONFIG.$a.$b) };
        v
    }};
}

#[inline(always)]
fn rd<T: Copy + Default>(addr: u64) -> T {
    unsafe { bpf_probe_read_kernel(addr as *const T).unwrap_or_default() }
}

/// `MKDEV(disk->major, disk->first_minor)` of `rq`'s queue (0 when it has no disk), by direct
/// loads: `rq` is a BTF tracepoint's `struct request *`.
#[inline(always)]
fn dev_of_request(rq: u64) -> u32 {
    // SAFETY: BTF-typed pointers and constant offsets: the verifier checks each load against
    // the member's type and turns a fault (a NULL disk) into a 0.
    unsafe {
        let q: u64 = field(rq, dconf!(rq_q));
        if q == 0 {
            return 0;
        }
        let disk: u64 = field(q, dconf!(q_disk));
        if disk == 0 {
            return 0;
        }
        let major: i32 = field(disk, dconf!(disk_major));
        let minor: i32 = field(disk, dconf!(disk_first_minor));
        ((major as u32) << 20) | (minor as u32 & 0xf_ffff)
    }
}

#[inline(always)]
fn dev_of_queue(q: u64) -> u32 {
    if q == 0 {
        return 0;
    }
    let disk: u64 = rd(q + dconf!(q_disk) as u64);
    if disk == 0 {
        return 0;
    }
    let major: i32 = rd(disk + dconf!(disk_major) as u64);
    let minor: i32 = rd(disk + dconf!(disk_first_minor) as u64);
    ((major as u32) << 20) | (minor as u32 & 0xf_ffff)
}

/// Adds one latency to the per-CPU histogram of `key`, creating it on first use.
#[inline(always)]
pub(crate) fn hist_add(key: DevHistKey, ns: u64) {
    let p = match DEV_HIST.get_ptr_mut(&key) {
        Some(p) => p,
        None => {
            let _ = DEV_HIST.insert(&key, &ZERO_HIST, BPF_NOEXIST as u64);
            match DEV_HIST.get_ptr_mut(&key) {
                Some(p) => p,
                None => return,
            }
        }
    };
    // SAFETY: per-CPU map value pointer.
    hist_put(unsafe { &mut *p }, ns);
}

#[inline(always)]
fn hist_put(h: &mut DevHist, ns: u64) {
    if let Some(b) = index(log2_bucket(ns) as u64, HIST_BUCKETS).and_then(|i| h.buckets.get_mut(i))
    {
        *b += 1;
    }
    h.count += 1;
    h.sum_ns += ns;
}

/// Adds a request's stage durations to the histograms of its disk and origin: `ns` in
/// [`STAGES`] order (queue, device, completion), the first `n` of them (a request whose call
/// ended first has no completion stage of its own).
#[inline(always)]
pub(crate) fn stages_add(dev: u32, origin: u8, ns: [u64; STAGES], n: usize) {
    let key = StageHistKey {
        dev,
        origin,
        _pad: 0,
        _pad2: 0,
    };
    let p = match STAGE_HIST.get_ptr_mut(&key) {
        Some(p) => p,
        None => {
            let _ = STAGE_HIST.insert(&key, &ZERO_STAGES, BPF_NOEXIST as u64);
            match STAGE_HIST.get_ptr_mut(&key) {
                Some(p) => p,
                None => return,
            }
        }
    };
    // SAFETY: per-CPU map value pointer.
    let h = unsafe { &mut *p };
    let [q, d, c] = &mut h.stages;
    hist_put(q, ns[0]);
    hist_put(d, ns[1]);
    if n > 2 {
        hist_put(c, ns[2]);
    }
}

#[inline(always)]
fn count_drop(reason: DropReason) {
    if let Some(s) = stats() {
        s.drops[reason as usize] += 1;
    }
}

/// Splits a completed passthrough request into its stages (called by the io_uring
/// completion when the NVMe programs stamped the entry).
#[inline(always)]
pub(crate) fn record_stages(e: &InflightReq, now: u64) {
    if e.nvme_complete_ns == 0 || e.nvme_complete_ns < e.nvme_setup_ns {
        return;
    }
    stages_add(
        e.nvme_dev,
        ORIGIN_URING_CMD,
        [
            e.nvme_setup_ns.saturating_sub(e.start_ns),
            e.nvme_complete_ns - e.nvme_setup_ns,
            now.saturating_sub(e.nvme_complete_ns),
        ],
        STAGES,
    );
}

/// `nvme_setup_cmd(struct request *req, struct nvme_command *cmd)`.
#[raw_tracepoint(tracepoint = "nvme_setup_cmd")]
pub fn nvme_setup(ctx: RawTracePointContext) -> i32 {
    let rq: u64 = ctx.arg(0);
    let cmd: u64 = ctx.arg(1);
    let now = unsafe { bpf_ktime_get_ns() };
    let q: u64 = rd(rq + dconf!(rq_q) as u64);
    let dev = dev_of_queue(q);
    // The admin queue has no queuedata (nvme_req_qid() says queue 0).
    let queuedata: u64 = rd(q + dconf!(q_queuedata) as u64);
    // struct nvme_command is the 64-byte NVMe SQE: opcode 0, command id 2, SLBA 40, NLB 48.
    let opcode: u8 = rd(cmd);
    let cid: u16 = rd(cmd + 2);
    let op = rd::<u32>(rq + dconf!(rq_cmd_flags) as u64) as u8;
    // nvme_req_qid(): I/O queues are hctx + 1; the admin queue has no queuedata.
    let qid = if queuedata != 0 {
        let hctx: u64 = rd(rq + dconf!(rq_mq_hctx) as u64);
        rd::<u32>(hctx + dconf!(hctx_queue_num) as u64) as u16 + 1
    } else {
        0
    };
    // Read (0x02) and Write (0x01) on an I/O queue: SLBA and NLB (0-based) are theirs.
    let rw = queuedata != 0 && (opcode == 0x01 || opcode == 0x02);
    let slba: u64 = if rw { rd(cmd + 40) } else { 0 };
    let nlb: u16 = if rw { rd(cmd + 48) } else { 0 };
    let mut uring_req = 0;
    if op == BLOCK_OP_DRV_IN || op == BLOCK_OP_DRV_OUT {
        let owner: u64 = rd(rq + dconf!(rq_end_io_data) as u64);
        if owner != 0 {
            if let Some(e) = entry_mut(owner) {
                uring_req = owner;
                // SAFETY: map value pointer of the io_uring request, owned until it completes.
                unsafe {
                    (*e).nvme_setup_ns = now;
                    (*e).nvme_complete_ns = 0;
                    (*e).nvme_dev = dev;
                    (*e).nvme_qid = qid;
                    (*e).nvme_cid = cid;
                    (*e).nvme_opcode = opcode;
                    (*e).nvme_status = 0;
                    (*e).nvme_lba = slba;
                    (*e).nvme_blocks = if rw { nlb as u32 + 1 } else { 0 };
                }
            }
        }
    }
    let admin = (queuedata == 0) as u8;
    let v = NvmeInflight {
        setup_ns: now,
        uring_req,
        dev,
        opcode,
        admin,
        qid,
        lba: slba,
        blocks: if rw { nlb as u32 + 1 } else { 0 },
        cid,
        _pad: 0,
    };
    if NVME_INFLIGHT.insert(&rq, &v, BPF_ANY as u64).is_err() {
        count_drop(DropReason::NvmeInflightFull);
    }
    0
}

/// `nvme_complete_rq(struct request *req)`.
#[raw_tracepoint(tracepoint = "nvme_complete_rq")]
pub fn nvme_complete(ctx: RawTracePointContext) -> i32 {
    let rq: u64 = ctx.arg(0);
    let Some(v) = NVME_INFLIGHT.get_ptr(&rq) else {
        count_drop(DropReason::NvmeNoStart);
        return 0;
    };
    // SAFETY: map value pointer, copied before the delete.
    let v = unsafe { *v };
    let _ = NVME_INFLIGHT.remove(&rq);
    let now = unsafe { bpf_ktime_get_ns() };
    hist_add(
        DevHistKey {
            dev: v.dev,
            kind: KIND_NVME_CMD,
            code: v.opcode,
            flags: v.admin as u16,
        },
        now.saturating_sub(v.setup_ns),
    );
    // nvme_req(req)->status: the CQE status field without the phase bit; keep SCT and SC.
    // Unknown offset (module without BTF): not read, errors not split by status.
    let status_off = NVME_RUNTIME.get(0).map_or(0, |r| r.status_off);
    let status = if status_off != 0 {
        rd::<u16>(rq + dconf!(rq_size) as u64 + status_off as u64) & 0x7ff
    } else {
        0
    };
    if status != 0 {
        let key = NvmeErrKey {
            dev: v.dev,
            status,
            _pad: 0,
        };
        match NVME_ERRORS.get_ptr_mut(&key) {
            Some(p) => unsafe { *p += 1 },
            None => {
                let _ = NVME_ERRORS.insert(&key, &1, BPF_NOEXIST as u64);
            }
        }
    }
    if v.uring_req != 0 {
        if let Some(e) = entry_mut(v.uring_req) {
            // SAFETY: map value pointer of the io_uring request.
            unsafe {
                (*e).nvme_complete_ns = now;
                (*e).nvme_status = status;
            }
        }
    }
    0
}

/// The kernel's `is_pci_p2pdma_page()` on the first page of `rq`'s data:
/// `page_zonenum(page) == ZONE_DEVICE && page->pgmap->type == MEMORY_DEVICE_PCI_P2PDMA`.
/// Why the first page only: a request's pages come from one I/O buffer, and a buffer is one
/// mapping, host or peer (the block layer does not even merge pages of different page maps
/// into one segment). The zone comes first: only a ZONE_DEVICE page has `pgmap` where it is
/// read (for other pages that word is an LRU link). Runs only where user space enabled it
/// (CONFIG_PCI_P2PDMA): elsewhere the read-only config makes it dead code the verifier drops.
#[inline(always)]
fn is_peer_memory(rq: u64) -> bool {
    let bio: u64 = rd(rq + dconf!(peer.rq_bio) as u64);
    if bio == 0 {
        return false;
    }
    let vecs: u64 = rd(bio + dconf!(peer.bio_io_vec) as u64);
    let idx: u32 = rd(bio + dconf!(peer.bio_idx) as u64);
    let page: u64 = rd(vecs + idx as u64 * dconf!(peer.bvec_size) as u64);
    if page == 0 {
        return false;
    }
    let flags: u64 = rd(page);
    let zone = (flags >> (dconf!(peer.zone_shift) & 63)) & dconf!(peer.zone_mask) as u64;
    if zone != dconf!(peer.zone_device) as u64 {
        return false;
    }
    let pgmap: u64 = rd(page + dconf!(peer.page_pgmap) as u64);
    pgmap != 0 && rd::<u32>(pgmap + dconf!(peer.pgmap_type) as u64) == dconf!(peer.p2pdma_type)
}

/// Counts a P2PDMA request for the process issuing it (the submitter for synchronous
/// O_DIRECT: the block layer issues a plugged request in the task that made it).
#[inline(always)]
fn count_peer_io() {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    match PEER_IO.get_ptr_mut(&tgid) {
        // SAFETY: map value pointer; threads of one process share it.
        Some(p) => unsafe {
            core::intrinsics::atomic_xadd::<u64, u64, { Relaxed }>(p, 1);
        },
        None => {
            let _ = PEER_IO.insert(&tgid, &1, BPF_NOEXIST as u64);
        }
    }
}

/// `block_getrq(struct bio *bio)` (5.11+): the block layer allocated a request for `bio`,
/// which becomes the request's first bio (`rq->bio`). Records the current task as the
/// request's submitter, for [`block_issue`] to find through `rq->bio`.
///
/// Why here and not at issue: `block_rq_issue` runs in whichever task dispatches the queue (a
/// plug flushed at schedule, kblockd, another submitter's run of the hardware queue), and
/// `block_rq_complete` in an interrupt; `block_getrq` runs in `submit_bio` of the task that
/// made the bio, for synchronous and asynchronous I/O alike, once per request (a bio merged
/// into an existing request costs nothing here). `block_bio_queue` also runs there, but once
/// per bio, merged or not. The exceptions are those of every submit-side hook: a bio the
/// blk-throttle held is submitted by the throttle's dispatch worker, writeback by the flusher,
/// dm/md/loop by their workers; the request then names that worker, which is where the
/// kernel ran it. `block_io_start` (6.5+) would give the request itself, but not on 6.1.
#[btf_tracepoint(function = "block_getrq")]
pub fn block_getrq(ctx: BtfTracePointContext) -> i32 {
    let Some(s) = stats() else { return 0 };
    let bio_ptr: u64 = ctx.arg(0);
    let bio = as_scalar(s, Scratch::BlockGetrq, bio_ptr);
    // The current task's ids, name and flags by direct loads from its BTF pointer: one helper
    // call where `bpf_get_current_pid_tgid`, `_comm` and a `bpf_probe_read_kernel` of the flags
    // were four.
    let task = unsafe { bpf_get_current_task_btf() } as u64;
    // SAFETY: trusted BTF pointer to the current task, constant offsets (see `dev_of_request`).
    let (pid, tgid, comm, task_flags) = unsafe {
        (
            field::<u32>(task, dconf!(task_pid)),
            field::<u32>(task, dconf!(task_tgid)),
            task_comm(task, dconf!(task_comm)),
            field::<u32>(task, dconf!(link.task_flags)),
        )
    };
    let mut v = zero_inflight();
    let who = &mut v.submitter;
    who.pid_tgid = ((tgid as u64) << 32) | pid as u64;
    who.comm = comm;
    if dconf!(link.enabled) != 0 {
        link_bio(s, bio_ptr, task_flags, who);
    }
    // A request of a file call is the call's cgroup's (`link_bio` copied it; a throttled
    // bio's submitter is the throttle's worker), any other the submitter's: one helper call
    // less for every O_DIRECT request.
    if who.link != LINK_CALL {
        who.cgroup = task_cgroup(task);
    }
    // A failed insert (never, for an LRU hash with free entries) leaves the request to
    // `block_issue`, which counts it if the table is full.
    let _ = requests().insert(bio, &v);
    0
}

/// Links `bio` to what caused it (see `BioLink`): the O_DIRECT file call through its kiocb,
/// else the file whose page cache the first page belongs to; the origin from the call, else
/// from the submitting task (a kernel thread: `kernel`; a user thread: `syscall`).
///
/// `bio` is the tracepoint's `struct bio *`: its fields are direct loads. `bi_private` is a
/// `void *` to the verifier, so what lies behind it (a split clone's parent, the `iomap_dio`)
/// is read with `bpf_probe_read_kernel`: one call for an unsplit O_DIRECT bio.
#[inline(always)]
fn link_bio(s: &mut UringCpuStats, bio: u64, task_flags: u32, who: &mut Submitter) {
    let (end_io_off, private_off) = (dconf!(link.bio_end_io), dconf!(link.bio_private));
    // SAFETY: BTF-typed pointer, constant offsets (function pointer and `void *`: scalars).
    let (mut end_io, mut private): (u64, u64) =
        unsafe { (field(bio, end_io_off), field(bio, private_off)) };
    // Split clones point at their parent; a 1 MiB bio split in 3 is 2 levels at most.
    let chain = dconf!(link.chain_end_io);
    let mut hops = 0;
    while hops < 4 && chain != 0 && end_io == chain {
        let parent = private;
        end_io = rd(parent + end_io_off as u64);
        private = rd(parent + private_off as u64);
        hops += 1;
    }
    who.origin = if task_flags & PF_KTHREAD != 0 {
        ORIGIN_KERNEL
    } else {
        ORIGIN_SYSCALL
    };
    let dio_end_io = dconf!(link.dio_end_io);
    if dio_end_io != 0 && end_io == dio_end_io {
        // `struct iomap_dio` starts with the caller's `struct kiocb *`.
        let kiocb: u64 = rd(private);
        if let Some(c) = calls().get_mut(kiocb) {
            link_call(who, c, kiocb);
            return;
        } else if entry_mut(kiocb).is_some() {
            who.origin = ORIGIN_URING;
            return;
        }
    }
    // The syscalls tier keys calls by thread, the kiocb tier names the thread's synchronous
    // call: a request submitted during the thread's call (block-device O_DIRECT's on-stack bio).
    let key = thread_call(who.pid_tgid).unwrap_or(who.pid_tgid);
    if let Some(c) = calls().get_mut(key) {
        link_call(who, c, key);
        return;
    }
    // The first page of the bio's own vector (a split clone shares its parent's), by direct
    // loads: bio → bio_vec → page → address_space → inode.
    // SAFETY: BTF-typed pointers, constant offsets; a NULL on the way reads as 0.
    unsafe {
        let vecs: u64 = field(bio, dconf!(link.bio_io_vec));
        if vecs == 0 {
            return;
        }
        let page: u64 = field(vecs, 0);
        if page == 0 {
            return;
        }
        // A bio that starts inside a large folio (a file with holes, extents that break inside
        // a folio: `block_read_full_folio`'s per-block bios) names a tail page, whose `mapping`
        // is not the file's: 88 % of a sparse file's read bytes went unattributed so. The head
        // is `compound_head - 1`; read by helper (a computed address is no BTF pointer).
        let head = as_scalar(
            s,
            Scratch::BlockGetrq,
            field(page, dconf!(link.page_compound_head)),
        );
        if head & 1 != 0 {
            let mapping: u64 = rd(head - 1 + dconf!(link.page_mapping) as u64);
            if mapping == 0 || mapping & 3 != 0 {
                return;
            }
            let host: u64 = rd(mapping + dconf!(link.mapping_host) as u64);
            if host != 0 {
                who.ino = rd(host + dconf!(link.inode_ino) as u64);
                who.link = LINK_PAGE;
            }
            return;
        }
        let mapping: u64 = field(page, dconf!(link.page_mapping));
        // The low bits tag anonymous and movable pages (PAGE_MAPPING_FLAGS): no file behind
        // them. Tested on a scalar copy: the verifier refuses arithmetic on a typed pointer.
        if mapping == 0 || as_scalar(s, Scratch::BlockGetrq, mapping) & 3 != 0 {
            return;
        }
        let host: u64 = field(mapping, dconf!(link.mapping_host));
        if host != 0 {
            who.ino = field(host, dconf!(link.inode_ino));
            who.link = LINK_PAGE;
        }
    }
}

/// Links the request to file call `c` (in flight under `key`): its process, start, file,
/// origin and cgroup (a throttled bio's submitter is the throttle's worker).
#[inline(always)]
fn link_call(who: &mut Submitter, c: *mut FileCall, key: u64) {
    // SAFETY: map value pointer; fields copied.
    unsafe {
        who.call_pid_tgid = (*c).pid_tgid;
        who.call_start_ns = (*c).start_ns;
        who.ino = (*c).ino;
        who.origin = (*c).origin;
        who.cgroup = (*c).cgroup;
    }
    who.call_key = key;
    who.link = LINK_CALL;
}

/// `block_rq_issue(struct request *rq)` (5.11+).
#[btf_tracepoint(function = "block_rq_issue")]
pub fn block_issue(ctx: BtfTracePointContext) -> i32 {
    let Some(s) = stats() else { return 0 };
    let rq_ptr: u64 = ctx.arg(0);
    let rq = as_scalar(s, Scratch::BlockIssue, rq_ptr);
    let mut memory = MEMORY_HOST;
    if dconf!(peer.enabled) != 0 && is_peer_memory(rq) {
        memory = MEMORY_P2PDMA;
        count_peer_io();
    }
    // The submitter recorded at `block_getrq` for the request's first bio; a requeued
    // request is issued again and keeps what its first issue found.
    // SAFETY: BTF-typed `struct request *`, constant offsets.
    let (bio, sector, bytes, cmd_flags) = unsafe {
        (
            field::<u64>(rq_ptr, dconf!(rq_bio)),
            field::<u64>(rq_ptr, dconf!(rq_sector)),
            field::<u32>(rq_ptr, dconf!(rq_data_len)),
            field::<u32>(rq_ptr, dconf!(rq_cmd_flags)),
        )
    };
    let key = block_key(as_scalar(s, Scratch::BlockIssue, bio), rq);
    let issue_ns = unsafe { bpf_ktime_get_ns() };
    let dev = dev_of_request(rq_ptr);
    let op = cmd_flags as u8;
    if let Some(e) = requests().get_mut(key) {
        // SAFETY: map value pointer; the request is this program's until it completes.
        unsafe {
            (*e).issue_ns = issue_ns;
            (*e).rq = rq;
            (*e).sector = sector;
            (*e).bytes = bytes;
            (*e).dev = dev;
            (*e).op = op;
            (*e).memory = memory;
        }
        return 0;
    }
    let mut v = zero_inflight();
    v.issue_ns = issue_ns;
    v.rq = rq;
    v.sector = sector;
    v.bytes = bytes;
    v.dev = dev;
    v.op = op;
    v.memory = memory;
    if !requests().insert(key, &v) {
        count_drop(DropReason::BlockInflightFull);
    }
    0
}

/// `block_rq_complete(struct request *rq, blk_status_t error, unsigned int nr_bytes)`.
#[btf_tracepoint(function = "block_rq_complete")]
pub fn block_complete(ctx: BtfTracePointContext) -> i32 {
    let Some(s) = stats() else { return 0 };
    let rq_ptr: u64 = ctx.arg(0);
    let rq = as_scalar(s, Scratch::BlockComplete, rq_ptr);
    // The tracepoint runs before the request's bios are ended: `rq->bio` is still the first.
    // SAFETY: BTF-typed `struct request *`, constant offset.
    let bio: u64 = unsafe { field(rq_ptr, dconf!(rq_bio)) };
    let key = block_key(as_scalar(s, Scratch::BlockComplete, bio), rq);
    let Some(v) = requests().take(key) else {
        count_drop(DropReason::BlockNoStart);
        return 0;
    };
    // Created at `block_getrq` but its issue not seen (attached in between).
    if v.rq != rq {
        count_drop(DropReason::BlockNoStart);
        return 0;
    }
    let now = unsafe { bpf_ktime_get_ns() };
    hist_add(
        DevHistKey {
            dev: v.dev,
            kind: KIND_BLOCK,
            code: v.op,
            flags: if v.memory == MEMORY_P2PDMA {
                FLAG_P2PDMA
            } else {
                0
            },
        },
        now.saturating_sub(v.issue_ns),
    );
    let w = &v.submitter;
    // A request of a file call counts for the call's process, whoever submitted it (a bio
    // held by blk-throttle is submitted by the throttle's worker).
    let owner = if w.call_pid_tgid != 0 {
        w.call_pid_tgid
    } else {
        w.pid_tgid
    };
    if owner != 0 {
        count_block_proc(
            BlockProcKey {
                tgid: (owner >> 32) as u32,
                op: v.op,
                origin: w.origin,
                link: w.link,
                _pad: 0,
            },
            v.bytes as u64,
        );
    }
    // A request of a file call stamps the call (if it is still the same one); the call adds
    // its stages when it returns. Concurrent completions of one call's requests may race on
    // the stamps: a stage then moves by the gap between two of its requests, no more.
    if w.link == LINK_CALL && w.call_start_ns != 0 {
        let stamped = match calls().get_mut(w.call_key) {
            // SAFETY: map value pointer.
            Some(c) => unsafe {
                if (*c).start_ns == w.call_start_ns {
                    (*c).blk_dev = v.dev;
                    if (*c).first_issue_ns == 0 || v.issue_ns < (*c).first_issue_ns {
                        (*c).first_issue_ns = v.issue_ns;
                    }
                    if now > (*c).last_done_ns {
                        (*c).last_done_ns = now;
                    }
                    // Completions of one call's requests may run on several CPUs at once.
                    core::intrinsics::atomic_xadd::<u32, u32, { Relaxed }>(
                        &raw mut (*c).blk_requests,
                        1,
                    );
                    core::intrinsics::atomic_xadd::<u64, u64, { Relaxed }>(
                        &raw mut (*c).blk_bytes,
                        v.bytes as u64,
                    );
                    true
                } else {
                    false
                }
            },
            None => false,
        };
        // The call ended first (an asynchronous one completed by another path): this
        // request's own queue and device, so nothing is lost.
        if !stamped {
            stages_add(
                v.dev,
                w.origin,
                [
                    v.issue_ns.saturating_sub(w.call_start_ns),
                    now.saturating_sub(v.issue_ns),
                    0,
                ],
                2,
            );
        }
    }
    0
}

#[inline(always)]
fn count_block_proc(key: BlockProcKey, bytes: u64) {
    match BLOCK_PROCS.get_ptr_mut(&key) {
        // SAFETY: map value pointer; completions on several CPUs add at once.
        Some(p) => unsafe {
            core::intrinsics::atomic_xadd::<u64, u64, { Relaxed }>(&raw mut (*p).requests, 1);
            core::intrinsics::atomic_xadd::<u64, u64, { Relaxed }>(&raw mut (*p).bytes, bytes);
        },
        None => {
            let v = BlockProcStats { requests: 1, bytes };
            if BLOCK_PROCS.insert(&key, &v, BPF_NOEXIST as u64).is_err() {
                if let Some(p) = BLOCK_PROCS.get_ptr_mut(&key) {
                    unsafe {
                        core::intrinsics::atomic_xadd::<u64, u64, { Relaxed }>(
                            &raw mut (*p).requests,
                            1,
                        );
                        core::intrinsics::atomic_xadd::<u64, u64, { Relaxed }>(
                            &raw mut (*p).bytes,
                            bytes,
                        );
                    }
                }
            }
        }
    }
}
