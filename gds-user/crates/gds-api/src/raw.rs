//! The kernel's maps as the tracer reads them, not yet named, and what the model asks the
//! tracer for ([`Source`]).
//!
//! This is the boundary of the one-way flow kernel → maps → trace → model: `gds-trace`
//! implements [`Source`] over the loaded programs, and the model (`Stats::read`,
//! `Snapshot::collect`, `model::inflight`, `CufileReport::collect`) decodes what it returns.
//! The model never sees a map, a program or a BTF offset.

use std::collections::BTreeSet;

use gds_common::{
    BlockInflight, DROP_REASONS, DevHist, DevHistKey, InflightSlot, NvmeErrKey, NvmeInflight,
    cufile::{CUFILE_COUNTS, CufileCall, CufileErrKey, CufileFileKey, CufileFileStats, CufileOpStats},
};
use gds_host::kmod::Residence;

/// One request in flight, as the kernel recorded it at submission: the owning
/// `struct io_kiocb *` (`req`) and its entry, exactly as the slot table stores them.
pub type InflightRequest = InflightSlot;

/// What the model reads from a tracer: each call reads the kernel's maps now.
pub trait Source {
    /// Why a read failed (a map the kernel refused to read).
    type Error;
    /// io_uring statistics.
    fn uring(&self) -> Result<UringSnapshot, Self::Error>;
    /// Per-disk block and NVMe statistics.
    fn devices(&self) -> DeviceSnapshot;
    /// Names of the disks the device statistics key by device number.
    fn disks(&self) -> &dyn DiskNames;
    /// Whether a block request not flagged as peer memory is host memory for certain.
    fn peer_memory(&self) -> &PeerMemory;
    /// Block requests into peer memory, per issuing process.
    fn peer_io(&self) -> Vec<(u32, u64)>;
    /// The cuFile maps.
    fn cufile_raw(&self) -> Result<CufileRaw, Self::Error>;
    /// The libcufile copies attached, and those that could not be.
    fn cufile_libraries(&self) -> (Vec<LibraryInfo>, Vec<LibraryFailure>);
    /// io_uring requests in flight now.
    fn inflight(&self) -> Vec<InflightRequest>;
    /// Block requests issued and not completed now, keyed by `struct request *`.
    fn block_inflight(&self) -> Vec<(u64, BlockInflight)>;
    /// NVMe commands set up and not completed now, keyed by `struct request *` (the key of
    /// their block request too).
    fn nvme_inflight(&self) -> Vec<(u64, NvmeInflight)>;
    /// cuFile calls in flight now, by thread (`pid_tgid`).
    fn cufile_calls(&self) -> Vec<(u64, CufileCall)>;
    /// `--pid` and `--comm`: the kernel applies them to io_uring and cuFile; the model applies
    /// them to block and NVMe requests by their submitter (those programs aggregate per disk
    /// for every process, so the filter cannot run in the kernel there).
    fn task_filter(&self) -> TaskFilter;
    /// How each layer is traced now.
    fn layers(&self) -> Layers;
}

/// Which processes are traced (`--pid`, `--comm`).
#[derive(Debug, Clone, Default)]
pub struct TaskFilter {
    pub pid: Option<u32>,
    pub comm: Option<String>,
}

impl TaskFilter {
    /// Whether a task of process `tgid` named `comm` passes (`comm` as the kernel keeps it,
    /// truncated to 15 bytes, the way the in-kernel `--comm` filter compares it).
    pub fn accepts_task(&self, tgid: u32, comm: &str) -> bool {
        self.pid.is_none_or(|p| p == tgid) && self.comm.as_deref().is_none_or(|c| c == comm)
    }
}

/// Disk names by device number (`major << 20 | minor`).
pub trait DiskNames {
    fn disk_name(&self, dev: u32) -> String;
}

/// Statistics of one opcode, summed over CPUs.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct OpcodeStats {
    /// Log2 buckets of nanoseconds (see `gds_common::HIST_BUCKETS`).
    pub buckets: Vec<u64>,
    pub timed: u64,
    pub sum_ns: u64,
    pub submitted: u64,
    pub errors: u64,
    pub slow: u64,
}

/// All io_uring statistics at one instant.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct UringSnapshot {
    /// Indexed by opcode: one entry for every `u8` (`URING_OPCODES`), known to the kernel or not.
    pub opcodes: Vec<OpcodeStats>,
    /// Indexed by `DropReason`.
    pub drops: [u64; DROP_REASONS],
    pub inserted: u64,
    pub removed: u64,
}

impl UringSnapshot {
    /// Requests in the in-flight map now.
    pub fn inflight(&self) -> u64 {
        self.inserted.saturating_sub(self.removed)
    }
}

/// Whether one layer is traced and why.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct LayerMode {
    pub on: bool,
    pub why: String,
}

/// How each layer is traced now (`/debug/layers`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Layers {
    pub io_uring: LayerMode,
    pub block: LayerMode,
    pub nvme: NvmeLayer,
    /// cuFile calls (uprobes on every libcufile in use).
    #[serde(default)]
    pub cufile: LayerMode,
    /// What the filters make of the tracing now, when it may not be what was meant: e.g.
    /// `--pid` naming no running process (the filter stays: the process may start later).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// How the NVMe layer is traced now, and why: what the log, `/debug/layers` and the
/// probe say.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NvmeLayer {
    /// Where `nvme_core` lives (built in, module with/without BTF, absent).
    pub residence: Residence,
    /// The NVMe programs are attached now.
    pub attached: bool,
    /// NVMe completion status read (errors split by status); needs `struct nvme_request`.
    pub status_decoded: bool,
    /// One sentence: the mode and the reason.
    pub why: String,
}

/// Per-disk statistics summed over CPUs.
#[derive(Debug, Clone, Default)]
pub struct DeviceSnapshot {
    pub hists: Vec<(DevHistKey, DevHist)>,
    pub errors: Vec<(NvmeErrKey, u64)>,
}

/// A libcufile copy, as `/debug/cufile` lists it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct LibraryInfo {
    pub path: String,
    pub deleted: bool,
    pub dev: u64,
    pub inode: u64,
    pub pids: Vec<u32>,
    pub functions: Vec<String>,
    pub missing: Vec<String>,
    pub usdt_notes: usize,
    pub usdt_providers: Vec<String>,
    pub attached_unix_s: u64,
}

/// A library that could not be attached, and why (tried again once no process maps it).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct LibraryFailure {
    pub path: String,
    pub error: String,
}

/// The cuFile maps' contents at one instant, summed over CPUs, not yet named.
#[derive(Debug, Clone, Default)]
pub struct CufileRaw {
    pub counts: [u64; CUFILE_COUNTS],
    /// Indexed by `CUFILE_OP_* + CUFILE_OPS * USER_*`.
    pub ops: Vec<CufileOpStats>,
    /// Error counters of trusted users' processes.
    pub errors: Vec<(CufileErrKey, u64)>,
    /// Error counters of other users' processes.
    pub errors_other: Vec<(CufileErrKey, u64)>,
    /// Calls in flight now, by thread (`pid_tgid`), both shares.
    pub calls: Vec<(u64, CufileCall)>,
    /// Process and file rows, both shares (trusted first).
    pub files: Vec<(CufileFileKey, CufileFileStats)>,
    /// Processes whose rows are in the untrusted share (their user is neither root nor in
    /// `--cufile-users`).
    pub other: BTreeSet<u32>,
}

/// Whether the block program tells peer memory apart on this kernel, and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "mode", content = "why", rename_all = "snake_case")]
pub enum PeerMemory {
    /// The check runs on every block request.
    Checked(String),
    /// The kernel cannot have peer memory in a block request (no CONFIG_PCI_P2PDMA): every
    /// request is host memory without looking.
    Impossible(String),
    /// The kernel could, but the check cannot run here: requests are not classified.
    Unknown(String),
}

impl PeerMemory {
    /// A request the kernel did not flag as peer memory is host memory for certain.
    pub fn unflagged_is_host(&self) -> bool {
        !matches!(self, PeerMemory::Unknown(_))
    }

    pub fn why(&self) -> &str {
        match self {
            PeerMemory::Checked(w) | PeerMemory::Impossible(w) | PeerMemory::Unknown(w) => w,
        }
    }
}