//! The kernel's maps as the tracer reads them, not yet named, and what the model asks the
//! tracer for ([`Source`]).
//!
//! This is the boundary of the one-way flow kernel → maps → trace → model: `gds-trace`
//! implements [`Source`] over the loaded programs, and the model (`Stats::read`,
//! `Snapshot::collect`, `model::inflight`, `CufileReport::collect`) decodes what it returns.
//! The model never sees a map, a program or a BTF offset.

use std::collections::BTreeSet;

use gds_common::{
    BlockInflight, BlockProcKey, BlockProcStats, DROP_REASONS, DevHist, DevHistKey, InflightSlot,
    NvmeErrKey, NvmeInflight,
    cufile::{
        CUFILE_COUNTS, CufileCall, CufileErrKey, CufileFileKey, CufileFileStats, CufileOpStats,
    },
    file::{FileCall, FileProcKey, FileProcStats, FileRowStats},
};
use gds_host::kmod::Residence;

/// Where a request is being tracked. One I/O can be in flight in several layers at once (a
/// cuFile read, the block request beneath it, the NVMe command that serves that): each layer
/// reports what it sees, so a stall shows in the layer where it is stuck and those above.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Default,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Layer {
    /// io_uring: submitted, not yet completed.
    #[default]
    Uring,
    /// A block request: issued to the driver (`block_rq_issue`), not yet completed.
    Block,
    /// An NVMe command: set up (`nvme_setup_cmd`), not yet completed.
    Nvme,
    /// A cuFile call: entered, not yet returned.
    Cufile,
    /// A file read/write call (O_DIRECT through iomap, or a read/write system call): started,
    /// not yet returned.
    File,
}

impl Layer {
    pub const ALL: [Layer; 5] = [
        Layer::Uring,
        Layer::Block,
        Layer::Nvme,
        Layer::Cufile,
        Layer::File,
    ];

    pub const fn label(self) -> &'static str {
        match self {
            Layer::Uring => "uring",
            Layer::Block => "block",
            Layer::Nvme => "nvme",
            Layer::Cufile => "cufile",
            Layer::File => "file",
        }
    }
}

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
    /// The NVMe error counters alone (`devices().errors`), read where the histograms are not
    /// wanted: the stall scan samples them for the evidence of NVMe stalls.
    fn nvme_errors(&self) -> Vec<(NvmeErrKey, u64)> {
        self.devices().errors
    }
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
    /// Every layer's in-flight entries now, layer by layer.
    fn inflight(&self) -> Vec<Inflight>;
    /// `--pid` and `--comm`: the kernel applies them to io_uring and cuFile; the model applies
    /// them to block and NVMe requests by their submitter (those programs aggregate per disk
    /// for every process, so the filter cannot run in the kernel there).
    fn task_filter(&self) -> TaskFilter;
    /// How each layer is traced now (`/debug/layers`).
    fn layers(&self) -> Layers;
    /// The file layer's statistics (empty where it is off).
    fn file_raw(&self) -> FileRaw;
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

/// How each layer is traced now (`/debug/layers`): one entry per layer, in the order the
/// tracer attaches them, each written by the layer itself.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Layers {
    pub layers: Vec<LayerEntry>,
    /// What the filters make of the tracing now, when it may not be what was meant: e.g.
    /// `--pid` naming no running process (the filter stays: the process may start later).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

impl Layers {
    /// The entry of `layer`, if the tracer has that layer.
    pub fn get(&self, layer: Layer) -> Option<&LayerEntry> {
        self.layers.iter().find(|e| e.layer == layer)
    }

    /// Whether `layer` is traced now (false for a layer the tracer does not have).
    pub fn is_on(&self, layer: Layer) -> bool {
        self.get(layer).is_some_and(|e| e.on)
    }
}

/// One layer on `/debug/layers`: whether it is traced now and why, in one sentence a person
/// can act on, and what only that layer knows.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LayerEntry {
    pub layer: Layer,
    pub on: bool,
    pub why: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<LayerDetail>,
}

/// What one layer says beyond on and why. Untagged: the entry's `layer` already names it,
/// so the JSON reads `"detail": {"residence": "module_btf", "status_decoded": true}`; the
/// variants have no field in common, so each reads back as itself.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
pub enum LayerDetail {
    Nvme {
        /// Where `nvme_core` lives (built in, module with/without BTF, absent).
        residence: Residence,
        /// NVMe completion status read (errors split by status); needs
        /// `struct nvme_request`.
        status_decoded: bool,
    },
    Cufile {
        /// libcufile files attached now.
        libraries: usize,
        /// Where the calls beneath cuFile's (compat `pread`/`pwrite`) are seen: `file layer`
        /// (its hooks see every call on the file: no libc probes), or `libc probes`.
        #[serde(default)]
        beneath: String,
        /// Processes with libc probes beneath cuFile now (every cuFile process where the file
        /// layer sees no file's every call; else those that registered a file it does not see).
        #[serde(default)]
        libc_probes: Vec<u32>,
    },
    File {
        /// The hooks in use (`fentry`, `kprobe`, `tracepoint`, `syscalls`, `off`).
        hooks: String,
        /// What these hooks cannot see, one phrase each.
        blind_to: Vec<String>,
    },
}

/// One entry of a layer's in-flight table, as the kernel recorded it; what
/// [`Source::inflight`] returns for every layer, and `model::inflight` decodes.
#[derive(Debug, Clone, Copy)]
pub enum Inflight {
    /// An io_uring request: its `struct io_kiocb *` and entry.
    Uring(InflightRequest),
    /// A block request issued and not completed, keyed by `struct request *`.
    Block(u64, BlockInflight),
    /// An NVMe command set up and not completed, keyed by `struct request *` (the key of its
    /// block request too).
    Nvme(u64, NvmeInflight),
    /// A cuFile call entered and not returned, keyed by thread (`pid_tgid`).
    Cufile(u64, CufileCall),
    /// A file call started and not ended, keyed by `struct kiocb *` or thread (`pid_tgid`).
    File(u64, FileCall),
}

/// The file layer's maps at one instant: the statistics rows summed over CPUs (indexed by
/// `gds_common::file::file_row`) and the per-process counts.
#[derive(Debug, Clone, Default)]
pub struct FileRaw {
    pub rows: Vec<FileRowStats>,
    pub procs: Vec<(FileProcKey, FileProcStats)>,
}

/// Per-disk statistics summed over CPUs.
#[derive(Debug, Clone, Default)]
pub struct DeviceSnapshot {
    pub hists: Vec<(DevHistKey, DevHist)>,
    pub errors: Vec<(NvmeErrKey, u64)>,
    /// Block requests per submitting process, op, origin and link.
    pub procs: Vec<(BlockProcKey, BlockProcStats)>,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// `/debug/layers` is read back by `top`, the tests and the guest scenarios: each entry's
    /// detail must come back as its own variant (it is untagged), and an entry without one
    /// must not grow an empty `detail`.
    #[test]
    fn layers_read_back_as_written() {
        let layers = Layers {
            layers: vec![
                LayerEntry {
                    layer: Layer::Uring,
                    on: true,
                    why: "BTF tracepoints".into(),
                    detail: None,
                },
                LayerEntry {
                    layer: Layer::Nvme,
                    on: false,
                    why: "nvme_core absent".into(),
                    detail: Some(LayerDetail::Nvme {
                        residence: Residence::Module { btf: true },
                        status_decoded: true,
                    }),
                },
                LayerEntry {
                    layer: Layer::Cufile,
                    on: true,
                    why: "uprobes".into(),
                    detail: Some(LayerDetail::Cufile {
                        libraries: 2,
                        beneath: "libc probes".into(),
                        libc_probes: vec![7],
                    }),
                },
            ],
            warnings: vec!["--pid 7: no such process now".into()],
        };
        let json = serde_json::to_value(&layers).unwrap();
        assert_eq!(json["layers"][0]["layer"], "uring");
        assert!(json["layers"][0].get("detail").is_none(), "{json}");
        assert_eq!(json["layers"][1]["detail"]["residence"], "module_btf");
        assert_eq!(json["layers"][2]["detail"]["libraries"], 2);
        let back: Layers = serde_json::from_value(json).unwrap();
        assert_eq!(back.layers, layers.layers);
        assert_eq!(back.warnings, layers.warnings);
        assert!(back.is_on(Layer::Cufile) && !back.is_on(Layer::Nvme));
        assert!(!back.is_on(Layer::Block) && back.get(Layer::Block).is_none());
        let no_warnings = serde_json::to_value(Layers::default()).unwrap();
        assert!(no_warnings.get("warnings").is_none(), "{no_warnings}");
    }
}
