//! io_uring tracing: per-CPU statistics, in-flight requests, slow events and the load-time
//! configuration handed to the programs.

use crate::{COMM_LEN, HIST_BUCKETS};

/// Entries of the per-opcode statistics (`GDS_URING_OPCODES`), indexed by opcode. The SQE
/// opcode is a `u8`, so every opcode a kernel can be sent has its own entry: the ones it knows
/// (`IORING_OP_LAST` is 63 on 6.18 and grows) and the ones it refuses at submission (counted
/// through `io_uring_req_failed`).
pub const URING_OPCODES: usize = 256;

/// Words of an opcode bitmap ([`UringConfig::opcode_mask`], [`UringCpuStats::opcodes_seen`]).
pub const OPCODE_WORDS: usize = URING_OPCODES / 64;

/// `IORING_OP_URING_CMD` (include/uapi/linux/io_uring.h), stable since 5.19.
pub const IORING_OP_URING_CMD: u8 = 46;

counted_enum! {
    /// Reasons a traced request or event did not reach a histogram. Every one is exported as
    /// `gds_trace_dropped_total{reason}`: nothing is lost silently.
    pub enum DropReason [DROP_REASONS] {
        /// The in-flight map was full at submission; the request is counted as submitted but
        /// not timed.
        InflightFull = 0 => "inflight_full",
        /// A completion arrived for a request whose submission was not seen (attached mid-flight,
        /// multishot CQEs after the first, or an in-flight entry that was dropped).
        NoStart = 1 => "no_start",
        /// A slow event could not be reserved in the ring buffer (user space too slow to drain it).
        RingbufFull = 2 => "ringbuf_full",
        /// A submission found an older entry under the same request pointer: the older request was
        /// never seen completing (e.g. `IOSQE_CQE_SKIP_SUCCESS`) and is dropped.
        Replaced = 3 => "replaced",
        /// The NVMe in-flight map was full at `nvme_setup_cmd`.
        NvmeInflightFull = 4 => "nvme_inflight_full",
        /// `nvme_complete_rq` for a command whose setup was not seen.
        NvmeNoStart = 5 => "nvme_no_start",
        /// The block in-flight map was full at `block_rq_issue`.
        BlockInflightFull = 6 => "block_inflight_full",
        /// `block_rq_complete` for a request whose issue was not seen.
        BlockNoStart = 7 => "block_no_start",
        /// The file-call in-flight map was full at the start of a call.
        FileInflightFull = 8 => "file_inflight_full",
        /// A file call ended whose start was not seen (attached mid-call).
        FileNoStart = 9 => "file_no_start",
        /// A synchronous file call whose return was never seen (a kretprobe watches at most
        /// `maxactive` threads in the function at once; with the iomap tracepoints, an error
        /// iomap returns before its completion tracepoint; a thread killed inside a system
        /// call): dropped when its thread starts another call or exits, so it is not a stall
        /// for good.
        FileReturnMissed = 10 => "file_return_missed",
    }
}

/// Per-CPU io_uring statistics of one opcode: entry `opcode` of the `PerCpuArray`
/// `GDS_URING_OPCODES` ([`URING_OPCODES`] entries). One entry per opcode rather than arrays
/// indexed by opcode in one value: a per-CPU value is limited to 32 KiB, which capped the
/// opcodes at 64 when they shared one. 320 bytes.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct OpcodeCpuStats {
    /// Completion latency histogram (timed requests only).
    pub hist: [u64; HIST_BUCKETS],
    /// Sum of timed latencies, in nanoseconds.
    pub sum_ns: u64,
    /// Requests seen at submission (after filters), timed or not.
    pub submitted: u64,
    /// Completions with `res < 0`.
    pub errors: u64,
    /// Timed completions above the slow threshold.
    pub slow: u64,
}

/// Per-CPU statistics not tied to an opcode: the one value of a one-entry `PerCpuArray`
/// (`GDS_URING_STATS`). 224 bytes.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct UringCpuStats {
    /// Drops by [`DropReason`] (io_uring, NVMe and block tracing).
    pub drops: [u64; DROP_REASONS],
    /// Entries added to / removed from the in-flight map; their difference is the in-flight count.
    pub inserted: u64,
    pub removed: u64,
    /// Sampling tick (sampled mode times one request in `sample_every`).
    pub sample_tick: u64,
    /// Bit `op % 64` of word `op / 64` set: this CPU counted a request of opcode `op` (set
    /// before its first count, never cleared). User space reads only the `GDS_URING_OPCODES` entries some CPU marked, so a
    /// scrape copies a few opcodes' values instead of all 256 of every CPU.
    pub opcodes_seen: [u64; OPCODE_WORDS],
    /// Scratch words: the programs pass a kernel pointer through one to get a plain integer
    /// (the verifier forbids arithmetic such as hashing on typed pointers). One word per
    /// program ([`Scratch`]): a program in interrupt context (a block or NVMe completion) can
    /// run between another program's store and load on the same CPU, and must not overwrite
    /// its word; a program never nests with itself (the kernel skips recursive runs).
    pub scratch: [u64; SCRATCH_WORDS],
}

/// Number of [`UringCpuStats::scratch`] words.
pub const SCRATCH_WORDS: usize = 10;

/// Which program owns which scratch word.
#[repr(usize)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scratch {
    UringSubmit = 0,
    UringFailed = 1,
    NvmeSetup = 2,
    NvmeComplete = 3,
    BlockIssue = 4,
    BlockComplete = 5,
    BlockGetrq = 6,
    UringPollArm = 7,
    FileBegin = 8,
    FileComplete = 9,
}

/// A request between submission and completion, keyed by its `struct io_kiocb *`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct InflightReq {
    pub start_ns: u64,
    pub user_data: u64,
    /// `struct io_ring_ctx *` of the ring the request belongs to (identifies the ring).
    pub ring: u64,
    pub tgid: u32,
    pub pid: u32,
    pub opcode: u8,
    pub nvme_opcode: u8,
    /// NVMe queue id and command id once the command is set up (passthrough from io_uring).
    pub nvme_qid: u16,
    pub nvme_cid: u16,
    pub nvme_status: u16,
    /// CLOCK_MONOTONIC ns of `nvme_setup_cmd` / `nvme_complete_rq` (0: not yet).
    pub nvme_setup_ns: u64,
    pub nvme_complete_ns: u64,
    pub nvme_lba: u64,
    pub nvme_blocks: u32,
    pub nvme_dev: u32,
    /// CLOCK_MONOTONIC ns when io_uring armed poll for it (`io_uring_poll_arm`; 0: not
    /// armed): its file (pipe, socket, eventfd, tty) had nothing to read or no room, and the
    /// request waits for the file to wake it, with no thread blocked for it.
    pub poll_armed_ns: u64,
}

/// One slot of the direct-mapped in-flight table (`GDS_URING_SLOTS`): its key is the owning
/// `struct io_kiocb *` (0: free). Requests whose slot is taken go to the hash map instead.
pub type InflightSlot = crate::Slot<InflightReq>;

/// Ring buffer record kinds.
pub const EVENT_URING_SLOW: u32 = 1;

/// A request slower than the configured threshold, sent to user space with its context.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SlowUringEvent {
    pub kind: u32,
    pub res: i32,
    pub latency_ns: u64,
    /// 1 when `comm` was read in the submitter's thread group, 0 when the completion ran
    /// elsewhere (user space then resolves the name from /proc).
    pub comm_valid: u8,
    pub _pad: [u8; 7],
    pub comm: [u8; COMM_LEN],
    /// The request and its in-flight entry as tracked (context and NVMe stamps).
    pub slot: InflightSlot,
}

/// Configuration written by user space into the programs' read-only data before loading
/// (`GDS_URING_CONFIG`). The verifier treats frozen read-only globals as constants, which is
/// what lets the BTF programs load struct fields directly at these offsets.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct UringConfig {
    /// Only this thread group (0: all).
    pub filter_tgid: u32,
    /// 1: only tasks whose comm equals `filter_comm`.
    pub filter_comm_on: u32,
    pub filter_comm: [u8; COMM_LEN],
    /// Bit `op % 64` of word `op / 64` set: trace opcode `op` (read only when
    /// `filter_opcode_on` is 1).
    pub opcode_mask: [u64; OPCODE_WORDS],
    /// Time one request in this many (1: every request).
    pub sample_every: u64,
    /// Completions slower than this go to the ring buffer.
    pub slow_ns: u64,
    /// Slot index mask of the direct-mapped in-flight table (its size minus one).
    pub slot_mask: u64,
    /// 1: only opcodes in `opcode_mask`. A flag of its own so that without `--opcode` the
    /// verifier sees a constant and drops the check from the programs.
    pub filter_opcode_on: u32,
    /// Offsets in `struct io_kiocb` (BTF programs): `opcode`, `ctx`, `cqe.user_data`.
    pub kiocb_opcode: u32,
    pub kiocb_ctx: u32,
    pub kiocb_user_data: u32,
    /// Offsets in the classic tracepoint records (fallback programs), from the format files.
    pub tp_submit_ctx: u32,
    pub tp_submit_req: u32,
    pub tp_submit_user_data: u32,
    pub tp_submit_opcode: u32,
    pub tp_complete_req: u32,
    pub tp_complete_res: u32,
    pub tp_failed_ctx: u32,
    pub tp_failed_req: u32,
    pub tp_failed_user_data: u32,
    pub tp_failed_opcode: u32,
}

impl UringConfig {
    /// Name of the global in the eBPF object.
    pub const SYMBOL: &'static str = "GDS_URING_CONFIG";

    pub const DEFAULT: UringConfig = UringConfig {
        filter_tgid: 0,
        filter_comm_on: 0,
        filter_comm: [0; COMM_LEN],
        opcode_mask: [u64::MAX; OPCODE_WORDS],
        sample_every: 1,
        slow_ns: u64::MAX,
        slot_mask: DEFAULT_SLOTS as u64 - 1,
        filter_opcode_on: 0,
        kiocb_opcode: 0,
        kiocb_ctx: 0,
        kiocb_user_data: 0,
        tp_submit_ctx: 0,
        tp_submit_req: 0,
        tp_submit_user_data: 0,
        tp_submit_opcode: 0,
        tp_complete_req: 0,
        tp_complete_res: 0,
        tp_failed_ctx: 0,
        tp_failed_req: 0,
        tp_failed_user_data: 0,
        tp_failed_opcode: 0,
    };
}

/// Map names in the eBPF object.
pub const MAP_URING_STATS: &str = "GDS_URING_STATS";
pub const MAP_URING_OPCODES: &str = "GDS_URING_OPCODES";
pub const MAP_URING_INFLIGHT: &str = "GDS_URING_INFLIGHT";
pub const MAP_URING_SLOTS: &str = "GDS_URING_SLOTS";
pub const MAP_EVENTS: &str = "GDS_EVENTS";

/// Default in-flight capacity (`--max-inflight`): the hash map's size; the direct-mapped
/// table has the next power of two of slots.
pub const DEFAULT_MAX_INFLIGHT: u32 = 65_536;
pub const DEFAULT_SLOTS: u32 = 65_536;

#[cfg(feature = "user")]
mod pod {
    use super::*;
    unsafe impl aya::Pod for UringCpuStats {}
    unsafe impl aya::Pod for OpcodeCpuStats {}
    unsafe impl aya::Pod for InflightReq {}
    unsafe impl aya::Pod for SlowUringEvent {}
    unsafe impl aya::Pod for UringConfig {}
}

// Sizes the doc comments state, and no implicit padding in the config (aya::Pod copies every
// byte of it into the object).
const _: () = assert!(core::mem::size_of::<OpcodeCpuStats>() == 320);
const _: () = assert!(core::mem::size_of::<UringCpuStats>() == 224);
const _: () = assert!(core::mem::size_of::<UringConfig>() == 24 + 8 * OPCODE_WORDS + 24 + 14 * 4);
