//! NVMe and block-layer tracing: in-flight commands, per-disk histograms, and the offsets of
//! kernel structs the programs read (resolved from BTF at load time).

use crate::{COMM_LEN, HIST_BUCKETS};

/// A device number as the programs build it: `major << 20 | minor` (the kernel's `MKDEV`).
pub type DevId = u32;

/// Histogram kinds in [`DevHistKey::kind`] (the stages' kinds: [`with_stages`]).
pub const KIND_NVME_CMD: u8 = 1;
pub const KIND_BLOCK: u8 = 5;

/// The stages a passthrough request's latency splits into, declared once, in order: the
/// variant of `model::Stage`, the histogram kind its durations are counted under (a
/// `KIND_STAGE_*` constant here, what the programs stamp), its name
/// (`gds_request_stage_duration_seconds{stage}`) and what a request in it waits for. Calls
/// `$m!` with the table; a new stage is a line here, its stamp in gds-ebpf's `record_stages`,
/// and, if requests in flight can be in it, `model::decode::stage_of`.
#[macro_export]
macro_rules! with_stages {
    ($m:ident) => {
        $m! {
            /// Not yet at a device: queued in io_uring or the kernel (or waiting on something
            /// that is not a device, such as an empty pipe).
            Queue = KIND_STAGE_QUEUE = 2, "queue", "not yet at the device (no device command seen)";
            /// At the device: the NVMe command was issued and has not completed.
            Device = KIND_STAGE_DEVICE = 3, "device", "at the device";
            /// Completed by the device, not yet delivered as a CQE.
            Completion = KIND_STAGE_COMPLETION = 4, "completion",
                "completed by the device but not yet delivered";
        }
    };
}

macro_rules! stage_kinds {
    ($($(#[$doc:meta])* $variant:ident = $konst:ident = $kind:literal, $label:literal,
       $describe:literal;)*) => {
        $(
            $(#[$doc])*
            pub const $konst: u8 = $kind;
        )*
    };
}
with_stages!(stage_kinds);

/// Number of stages ([`with_stages`]): [`StageHists::stages`] is indexed by
/// `kind - KIND_STAGE_QUEUE`.
pub const STAGES: usize = 3;
const _: () = assert!(
    KIND_STAGE_DEVICE == KIND_STAGE_QUEUE + 1 && KIND_STAGE_COMPLETION == KIND_STAGE_QUEUE + 2
);

/// Key of the per-CPU stage histograms (`GDS_STAGE_HIST`): the disk and the request's origin
/// (`gds_common::file::ORIGIN_*`), what [`DevHistKey`] names as `dev` and `code` for the
/// stage kinds.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StageHistKey {
    pub dev: DevId,
    pub origin: u8,
    /// Scalars, not an array: a zeroed array in a key makes LLVM call a byte-by-byte
    /// `memset` in the programs.
    pub _pad: u8,
    pub _pad2: u16,
}

/// The stage histograms of one disk and origin, kept together because a request's stages are
/// counted together: one map lookup for all of them (three in `GDS_DEV_HIST`, one per kind).
/// User space reports them as `GDS_DEV_HIST` entries of the stage kinds.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct StageHists {
    pub stages: [DevHist; STAGES],
}

pub const MAP_STAGE_HIST: &str = "GDS_STAGE_HIST";
pub const STAGE_HIST_MAX: u32 = 1024;

/// Block request operations in [`DevHistKey::code`] for [`KIND_BLOCK`] (`req_op()`).
pub const BLOCK_OP_READ: u8 = 0;
pub const BLOCK_OP_WRITE: u8 = 1;
pub const BLOCK_OP_FLUSH: u8 = 2;
pub const BLOCK_OP_DISCARD: u8 = 3;
/// `REQ_OP_DRV_IN` / `REQ_OP_DRV_OUT`: driver-private (NVMe passthrough).
pub const BLOCK_OP_DRV_IN: u8 = 34;
pub const BLOCK_OP_DRV_OUT: u8 = 35;

/// Key of the per-CPU per-disk histograms (`GDS_DEV_HIST`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DevHistKey {
    pub dev: DevId,
    pub kind: u8,
    /// NVMe opcode for [`KIND_NVME_CMD`], block op for [`KIND_BLOCK`], 0 for stages.
    pub code: u8,
    /// [`FLAG_ADMIN`]: an admin-queue command (admin and I/O opcodes overlap).
    pub flags: u16,
}

pub const FLAG_ADMIN: u16 = 1;
/// [`KIND_BLOCK`]: the request's data buffer is PCI peer memory (P2PDMA pages: a GPU's or
/// another device's BAR mapped into the process), not host memory.
pub const FLAG_P2PDMA: u16 = 2;

/// What a block request's data buffer is ([`BlockInflight::memory`]).
pub const MEMORY_HOST: u8 = 0;
pub const MEMORY_P2PDMA: u8 = 1;

/// A log2 latency histogram with count and sum (nanoseconds).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DevHist {
    pub buckets: [u64; HIST_BUCKETS],
    pub count: u64,
    pub sum_ns: u64,
}

impl DevHist {
    pub const ZERO: DevHist = DevHist {
        buckets: [0; HIST_BUCKETS],
        count: 0,
        sum_ns: 0,
    };
}

/// Key of the NVMe error counters (`GDS_NVME_ERRORS`): disk and NVMe status
/// (status code type << 8 | status code, without the DNR/More bits).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NvmeErrKey {
    pub dev: DevId,
    pub status: u16,
    pub _pad: u16,
}

/// An NVMe command between `nvme_setup_cmd` and `nvme_complete_rq`, keyed by `struct request *`:
/// the same key as its block request in [`MAP_BLOCK_INFLIGHT`], which is how user space gives
/// the command the process that submitted the request (`nvme_setup_cmd` runs before
/// `block_rq_issue`, so the program cannot copy it at setup).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct NvmeInflight {
    pub setup_ns: u64,
    /// The io_uring request (`struct io_kiocb *`) for passthrough from io_uring, else 0.
    pub uring_req: u64,
    pub dev: DevId,
    pub opcode: u8,
    pub admin: u8,
    pub qid: u16,
    /// Starting LBA and blocks of a Read or Write (0 for other commands).
    pub lba: u64,
    pub blocks: u32,
    pub cid: u16,
    pub _pad: u16,
}

/// The task that submitted a request, as the block program records it: thread and process id,
/// name and cgroup (v2 id, `bpf_get_current_cgroup_id`). All zero when unknown.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Submitter {
    /// `bpf_get_current_pid_tgid()`: tgid << 32 | pid.
    pub pid_tgid: u64,
    pub cgroup: u64,
    pub comm: [u8; COMM_LEN],
    /// What caused the request (see [`BioLink`]): the file call's thread and start (0 when the
    /// bio is not an O_DIRECT call's, or its call was not seen), the file's inode (the call's,
    /// or the page cache's for buffered I/O; 0 unknown).
    pub call_pid_tgid: u64,
    pub call_start_ns: u64,
    pub ino: u64,
    /// The call's key in the file layer's in-flight table (the kiocb, or the thread in the
    /// syscalls tier), so the completion can stamp it.
    pub call_key: u64,
    /// `gds_common::file::ORIGIN_*`.
    pub origin: u8,
    /// [`LINK_NONE`], [`LINK_CALL`] or [`LINK_PAGE`].
    pub link: u8,
    pub _pad: [u8; 6],
}

/// How a block request was linked to its cause ([`Submitter::link`]).
pub const LINK_NONE: u8 = 0;
/// Its bio belongs to an O_DIRECT file call seen by the file layer (through the kiocb).
pub const LINK_CALL: u8 = 1;
/// Its first page is in a file's page cache (buffered I/O, readahead, writeback): the inode.
pub const LINK_PAGE: u8 = 2;

/// What the block program reads to link a bio to its cause, from BTF and kallsyms; all zero
/// (`enabled` 0) where something is missing: requests then name their submitter only.
///
/// An iomap O_DIRECT bio has `bi_end_io == iomap_dio_bio_end_io` and `bi_private` = the
/// `struct iomap_dio *`, whose first member is the caller's `struct kiocb *`; a split clone has
/// `bi_end_io == bio_chain_endio` and `bi_private` = its parent bio. A page-cache bio's first
/// page has `mapping` → `host` (the inode); where that page is a tail page of a large folio (a
/// bio that starts inside one: a file with holes, or extents that break inside a folio), only
/// the head page's `mapping` is the file's, and `compound_head` (bit 0 set) names the head.
/// See docs/notes-issue-23.md.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BioLink {
    pub enabled: u32,
    pub bio_end_io: u32,
    pub bio_private: u32,
    pub bio_io_vec: u32,
    pub page_mapping: u32,
    /// `page.compound_head`: the head page + 1 in a tail page.
    pub page_compound_head: u32,
    pub mapping_host: u32,
    pub inode_ino: u32,
    /// `task_struct.flags` (`PF_KTHREAD`: the kernel's own work).
    pub task_flags: u32,
    pub _pad: u32,
    /// Addresses of `iomap_dio_bio_end_io` and `bio_chain_endio` (0: unknown).
    pub dio_end_io: u64,
    pub chain_end_io: u64,
}

impl BioLink {
    pub const OFF: BioLink = BioLink {
        enabled: 0,
        bio_end_io: 0,
        bio_private: 0,
        bio_io_vec: 0,
        page_mapping: 0,
        page_compound_head: 0,
        mapping_host: 0,
        inode_ino: 0,
        task_flags: 0,
        _pad: 0,
        dio_end_io: 0,
        chain_end_io: 0,
    };
}

/// `PF_KTHREAD` in `task_struct.flags` (include/linux/sched.h; a `#define`, not in BTF).
pub const PF_KTHREAD: u32 = 0x0020_0000;

/// Key of the per-process block counts (`GDS_BLOCK_PROCS`): the process of the file call the
/// request is linked to, else the submitter's; the request's op, its origin and link.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockProcKey {
    pub tgid: u32,
    pub op: u8,
    pub origin: u8,
    pub link: u8,
    pub _pad: u8,
}

/// Block requests completed and their bytes (atomic adds).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct BlockProcStats {
    pub requests: u64,
    pub bytes: u64,
}

pub const MAP_BLOCK_PROCS: &str = "GDS_BLOCK_PROCS";
pub const BLOCK_PROCS_MAX: u32 = 4096;

/// A block request from `block_getrq` (or its first `block_rq_issue`) to `block_rq_complete`,
/// keyed by its first bio (`request.bio`; the request itself where it has none). One entry per
/// request, created where its submitter is known and filled in place at issue: the submitter
/// is never copied from one table to another (a lookup, a delete and an insert per request).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct BlockInflight {
    /// 0 until the request is issued: such an entry is not in flight at a device yet, and
    /// readers skip it.
    pub issue_ns: u64,
    /// The `struct request *` (0 until issued): the key NVMe commands share
    /// ([`MAP_NVME_INFLIGHT`]).
    pub rq: u64,
    /// `blk_rq_pos()`: the first 512-byte sector.
    pub sector: u64,
    /// `blk_rq_bytes()` at issue.
    pub bytes: u32,
    pub dev: DevId,
    pub op: u8,
    /// [`MEMORY_HOST`] or [`MEMORY_P2PDMA`] (the first page of the request's data).
    pub memory: u8,
    pub _pad: [u8; 6],
    /// Who submitted it (recorded at `block_getrq`); zero when the request's first bio was not
    /// seen there (passthrough, or a bio merged in front of it).
    pub submitter: Submitter,
}

/// Offsets for the NVMe and block programs (`GDS_DEV_CONFIG`), from BTF.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DevConfig {
    pub rq_q: u32,
    pub rq_cmd_flags: u32,
    pub rq_end_io_data: u32,
    pub rq_mq_hctx: u32,
    pub q_disk: u32,
    pub q_queuedata: u32,
    pub disk_major: u32,
    pub disk_first_minor: u32,
    pub hctx_queue_num: u32,
    /// `request.bio`, `request.__sector`, `request.__data_len`: the request's first bio (to
    /// find its submitter), position and length.
    pub rq_bio: u32,
    pub rq_sector: u32,
    pub rq_data_len: u32,
    /// `task_struct.pid`, `.tgid` and `.comm`: `block_getrq` reads its submitter straight from
    /// `bpf_get_current_task_btf()` (direct loads), not through three helper calls.
    pub task_pid: u32,
    /// `sizeof(struct request)`: the NVMe driver's `struct nvme_request` follows it.
    pub rq_size: u32,
    pub task_tgid: u32,
    pub task_comm: u32,
    /// Telling P2PDMA pages from host pages (see [`PeerCheck`]); all zero when the kernel has
    /// no P2PDMA, so the block programs read nothing more.
    pub peer: PeerCheck,
    /// Linking a bio to the file call or page cache it came from.
    pub link: BioLink,
}

/// What the block program needs to do the kernel's `is_pci_p2pdma_page()` on the first page of
/// a request: `rq->bio->bi_io_vec[bi_iter.bi_idx].bv_page`, then
/// `page_zonenum(page) == ZONE_DEVICE && page->pgmap->type == MEMORY_DEVICE_PCI_P2PDMA`.
/// Offsets from BTF; the zone's place in `page->flags` from the sizes BTF gives (see
/// `trace::peer`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerCheck {
    /// 1 when the check runs (the kernel has CONFIG_PCI_P2PDMA and every offset resolved).
    pub enabled: u32,
    pub rq_bio: u32,
    pub bio_io_vec: u32,
    /// `bio->bi_iter.bi_idx`.
    pub bio_idx: u32,
    /// `sizeof(struct bio_vec)`; `bv_page` is its first member.
    pub bvec_size: u32,
    pub page_pgmap: u32,
    pub pgmap_type: u32,
    /// `MEMORY_DEVICE_PCI_P2PDMA` of `enum memory_type`.
    pub p2pdma_type: u32,
    /// `ZONES_PGSHIFT` and `ZONES_MASK`: `page_zonenum(page) = (flags >> shift) & mask`.
    pub zone_shift: u32,
    pub zone_mask: u32,
    /// `ZONE_DEVICE` of `enum zone_type`.
    pub zone_device: u32,
    pub _pad: u32,
}

impl DevConfig {
    pub const SYMBOL: &'static str = "GDS_DEV_CONFIG";
    pub const DEFAULT: DevConfig = DevConfig {
        rq_q: 0,
        rq_cmd_flags: 0,
        rq_end_io_data: 0,
        rq_mq_hctx: 0,
        q_disk: 0,
        q_queuedata: 0,
        disk_major: 0,
        disk_first_minor: 0,
        hctx_queue_num: 0,
        rq_bio: 0,
        rq_sector: 0,
        rq_data_len: 0,
        task_pid: 0,
        rq_size: 0,
        task_tgid: 0,
        task_comm: 0,
        peer: PeerCheck::OFF,
        link: BioLink::OFF,
    };
}

impl PeerCheck {
    /// The check off: the block program reads nothing more.
    pub const OFF: PeerCheck = PeerCheck {
        enabled: 0,
        rq_bio: 0,
        bio_io_vec: 0,
        bio_idx: 0,
        bvec_size: 0,
        page_pgmap: 0,
        pgmap_type: 0,
        p2pdma_type: 0,
        zone_shift: 0,
        zone_mask: 0,
        zone_device: 0,
        _pad: 0,
    };
}

/// What the NVMe programs learn only when the NVMe driver is there (`GDS_NVME_RUNTIME`, a
/// one-entry array written by user space when it attaches them). Not a read-only global like
/// [`DevConfig`]: with `nvme_core` a module, `struct nvme_request` is in the module's BTF, which
/// exists only once the module is loaded, possibly long after the programs were loaded.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NvmeRuntime {
    /// Offset of `status` in `struct nvme_request` (which follows `struct request`); 0 when
    /// unknown (a module without BTF): the status is then not read and errors are not split.
    /// 0 is never the real offset (the struct starts with the command pointer).
    pub status_off: u32,
    pub _pad: u32,
}

pub const MAP_NVME_RUNTIME: &str = "GDS_NVME_RUNTIME";
pub const MAP_DEV_HIST: &str = "GDS_DEV_HIST";
pub const MAP_NVME_ERRORS: &str = "GDS_NVME_ERRORS";
pub const MAP_NVME_INFLIGHT: &str = "GDS_NVME_INFLIGHT";
/// The block requests between `block_getrq` and `block_rq_complete` ([`BlockInflight`]), an LRU
/// hash: an entry whose request is never issued (an error after `block_getrq`, a bio merged in
/// front of it) ages out instead of filling it. A request pushed out before it completes is
/// counted at its completion (`block_no_start`), as one beyond a full table is at its issue
/// (`block_inflight_full`).
pub const MAP_BLOCK_INFLIGHT: &str = "GDS_BLOCK_INFLIGHT";
/// The direct-mapped slots in front of it (see `slot`): a request whose slot is taken goes to
/// the LRU hash. A slot whose request is never issued stays taken until its bio's address is
/// reused (the next request with that first bio takes it over); it is never shown, as
/// unissued entries of the hash are not.
pub const MAP_BLOCK_SLOTS: &str = "GDS_BLOCK_SLOTS";
/// Slots of the direct-mapped block table (a power of two; ~0.6 MiB).
pub const BLOCK_SLOTS: u32 = 4096;
/// Entries of the block and NVMe in-flight tables.
pub const BLOCK_INFLIGHT_MAX: u32 = 16384;
pub const NVME_INFLIGHT_MAX: u32 = 16384;
/// Block requests into P2PDMA memory per process (`tgid` → count), an LRU hash: written by the
/// block program when the issuing task's request is peer memory, read by the cuFile programs
/// (a read that caused such I/O took the `p2pdma` path) and by user space.
pub const MAP_PEER_IO: &str = "GDS_PEER_IO";
pub const PEER_IO_MAX: u32 = 4096;

#[cfg(feature = "user")]
mod pod {
    use super::*;
    unsafe impl aya::Pod for DevHistKey {}
    unsafe impl aya::Pod for DevHist {}
    unsafe impl aya::Pod for StageHistKey {}
    unsafe impl aya::Pod for StageHists {}
    unsafe impl aya::Pod for NvmeErrKey {}
    unsafe impl aya::Pod for NvmeInflight {}
    unsafe impl aya::Pod for BlockInflight {}
    unsafe impl aya::Pod for Submitter {}
    unsafe impl aya::Pod for DevConfig {}
    unsafe impl aya::Pod for NvmeRuntime {}
    unsafe impl aya::Pod for BlockProcKey {}
    unsafe impl aya::Pod for BlockProcStats {}
}
