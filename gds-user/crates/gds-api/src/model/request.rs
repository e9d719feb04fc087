//! What a request is, once decoded: the one set of types every view reads and `/debug/*`
//! serves (Serialize) and clients (`top`, `stalls`, tests) read back (Deserialize).

use serde::{Deserialize, Serialize};

pub use crate::raw::Layer;

/// [`Stage`] from the one table of stages (`gds_common::with_stages!`).
macro_rules! stage_enum {
    ($($(#[$doc:meta])* $variant:ident = $konst:ident = $kind:literal, $label:literal,
       $describe:literal;)*) => {
        /// Where a request is, as far as tracing has seen it.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
        pub enum Stage {
            $(
                $(#[$doc])*
                #[serde(rename = $label)]
                $variant,
            )*
        }

        impl Stage {
            pub const ALL: [Stage; [$($kind),*].len()] = [$(Stage::$variant),*];

            pub const fn label(self) -> &'static str {
                match self {
                    $(Stage::$variant => $label,)*
                }
            }

            pub const fn describe(self) -> &'static str {
                match self {
                    $(Stage::$variant => $describe,)*
                }
            }

            /// The histogram kind its durations are counted under (`DevHistKey::kind`).
            pub const fn kind(self) -> u8 {
                match self {
                    $(Stage::$variant => gds_common::$konst,)*
                }
            }
        }
    };
}
gds_common::with_stages!(stage_enum);

impl Stage {
    /// The stage whose durations histogram kind `kind` counts, if any.
    pub fn of_kind(kind: u8) -> Option<Stage> {
        Stage::ALL.into_iter().find(|s| s.kind() == kind)
    }

    /// What a stall in this stage of `layer` means, in words.
    pub const fn describe_in(self, layer: Layer) -> &'static str {
        match (layer, self) {
            (Layer::Block, Stage::Device) => "issued to the driver, not completed",
            (Layer::Nvme, Stage::Device) => "NVMe command at the controller, not completed",
            (Layer::Cufile, _) => "in the cuFile call, not returned",
            _ => self.describe(),
        }
    }
}

/// The first stage: where a request is before tracing saw it anywhere else.
impl Default for Stage {
    fn default() -> Stage {
        Stage::ALL[0]
    }
}

/// The kernel's identity of a request while it is in flight: its layer, the object the layer
/// keys it by (`struct io_kiocb *`, `struct request *` for block and NVMe, the thread's
/// `pid_tgid` for a cuFile call) and its start time (a key is reused by later requests; the
/// triple is not).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct RequestKey {
    pub layer: Layer,
    pub req: u64,
    pub start_ns: u64,
}

/// The NVMe command an io_uring passthrough request became.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NvmeCommand {
    pub qid: u16,
    pub cid: u16,
    pub lba: u64,
    pub blocks: u32,
}

/// Who issued a request: the process context every view shows beside its timing (flattened
/// into the JSON of requests, slow events and stalls). pid 0 with comm `?` when the layer
/// could not tell (a block request whose first bio was not seen at `block_getrq`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Context {
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
    /// The process's cgroup and Kubernetes pod/container (from `/proc/PID/cgroup` while it
    /// lives); absent when the process is gone or unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<gds_host::cgroup::CgroupInfo>,
    /// The cgroup v2 id the kernel saw at submission (`bpf_get_current_cgroup_id`; block and
    /// NVMe requests), which outlives the process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup_id: Option<u64>,
}

/// The io_uring submission a request came from.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UringOrigin {
    pub user_data: u64,
    /// `struct io_ring_ctx *` of the ring, hex.
    pub ring: String,
    /// `struct io_kiocb *`, hex.
    pub req: String,
}

/// What caused a block request, as the block program linked it at `block_getrq`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BlockCause {
    /// `syscall`, `uring`, `kernel` (`labels::origin`).
    pub origin: String,
    /// `call` (an O_DIRECT file call, or the thread's call in the syscalls tier), `page` (a
    /// file's page cache), `none`.
    pub via: String,
    /// The file call's process and thread (`call` only): the request's context names the
    /// submitter, which differs when a worker submitted it (blk-throttle, writeback).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub call_pid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub call_tid: Option<u32>,
}

/// What a request reads or writes, as far as its layer knows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Target {
    /// Disk the request is on; `unknown` where the layer does not know it (io_uring before
    /// the NVMe command, cuFile).
    pub disk: String,
    /// The file (cuFile: the path of the descriptor behind the handle, from `/proc`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// Block: the first 512-byte sector.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sector: Option<u64>,
    /// NVMe: the starting LBA (in the namespace's block size).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lba: Option<u64>,
    /// Bytes asked (block, cuFile).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    /// A file call's file: inode and device (`major << 20 | minor`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inode: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_dev: Option<u32>,
}

impl Default for Target {
    fn default() -> Self {
        Target {
            disk: "unknown".into(),
            file: None,
            sector: None,
            lba: None,
            bytes: None,
            inode: None,
            file_dev: None,
        }
    }
}

/// One request in flight in any layer, with its context (`/debug/inflight`,
/// `/debug/snapshot`, stalls): the same shape for io_uring, block, NVMe and cuFile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    pub layer: Layer,
    /// The operation in its layer's names: io_uring opcode (`READ`), block op (`read`), NVMe
    /// opcode (`read`), cuFile function (`read`).
    pub opcode: String,
    #[serde(flatten)]
    pub ctx: Context,
    #[serde(flatten)]
    pub target: Target,
    /// The io_uring submission it came from, where known: every io_uring request, and the
    /// NVMe command of an io_uring passthrough request.
    #[serde(flatten)]
    pub origin: Option<UringOrigin>,
    /// Seconds since submission, at the scan that saw it.
    pub age_seconds: f64,
    pub stage: Stage,
    /// The NVMe command it is (NVMe layer) or became (io_uring passthrough), else absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nvme: Option<NvmeCommand>,
    /// io_uring: poll was armed for it (`io_uring_poll_arm`): its file (pipe, socket,
    /// eventfd) had nothing for it and it waits to be woken, with no thread blocked for it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub poll_armed: bool,
    /// Block, and the NVMe command of a block request: what caused it (the file call, the
    /// page cache, the kernel), where linked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_cause: Option<BlockCause>,
    #[serde(skip)]
    pub key: RequestKey,
}

impl Request {
    /// Where the request is and what it touches, in one line for logs and tables: disk and
    /// sector or NVMe queue, command and LBA, the file, the io_uring submission.
    pub fn where_text(&self) -> String {
        let mut parts = Vec::new();
        let t = &self.target;
        // The submission first: a request no device has seen (a READ parked on a pipe) has
        // nothing else to show, and its user_data is what its program knows it by.
        if let Some(o) = &self.origin {
            parts.push(format!("user_data {:#x} ring {}", o.user_data, o.ring));
        }
        // "unknown": no device command seen; saying so adds nothing to the line.
        if t.disk != "unknown" {
            parts.push(t.disk.clone());
        }
        if let Some(s) = t.sector {
            parts.push(format!("sector {s}"));
        }
        if let Some(n) = &self.nvme {
            parts.push(format!(
                "qid {} cid {} lba {} blocks {}",
                n.qid, n.cid, n.lba, n.blocks
            ));
        }
        if let Some(f) = &t.file {
            parts.push(f.clone());
        }
        if let Some(b) = t.bytes {
            parts.push(format!("{b} B"));
        }
        parts.join(" ")
    }
}

/// The device side of a completed passthrough request: where it went and where the time went.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SlowNvme {
    pub disk: String,
    pub qid: u16,
    pub cid: u16,
    pub lba: u64,
    pub blocks: u32,
    pub status: String,
    pub queue_seconds: f64,
    pub device_seconds: f64,
    pub completion_seconds: f64,
}

/// An io_uring request slower than the slow threshold, as logged and served on `/debug/slow`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SlowEvent {
    pub opcode: String,
    #[serde(flatten)]
    pub ctx: Context,
    #[serde(flatten)]
    pub origin: UringOrigin,
    pub latency_seconds: f64,
    pub res: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nvme: Option<SlowNvme>,
    #[serde(skip)]
    pub key: RequestKey,
    #[serde(skip)]
    pub latency_ns: u64,
}

/// A stalled request: the in-flight request and, once it ended, how long it took in all.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stall {
    #[serde(flatten)]
    pub request: Request,
    pub stage_description: String,
    /// Set when the stall has ended.
    pub total_seconds: Option<f64>,
    /// Why it is stuck, named when the stall was detected ([`super::evidence::explain`]).
    #[serde(default)]
    pub cause: super::evidence::Cause,
    /// What the host said when the stall was detected (read once, never again for it);
    /// absent where the detector was given no capture (tests, `top` reading old agents), and
    /// on later stalls of the same thread and disk in one scan (the first carries it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evidence: Option<super::evidence::Evidence>,
}

/// Active and recent stalls (`/debug/stalls`, part of `/debug/snapshot`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StallReport {
    pub threshold_seconds: f64,
    pub active: Vec<Stall>,
    /// Most recent ended stalls, newest last.
    pub ended: Vec<Stall>,
    /// Requests in flight at the last scan.
    pub inflight: usize,
    pub oldest_inflight_seconds: f64,
    pub scan_seconds: f64,
    /// Stalls detected since start, by layer, disk and cause.
    #[serde(default)]
    pub totals: Vec<StallTotal>,
    /// Per layer, at the last scan: every layer, also those with nothing in flight.
    #[serde(default)]
    pub layers: Vec<LayerStalls>,
}

/// One layer at the last scan: requests in flight, stalled, and the oldest's age.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerStalls {
    pub layer: Layer,
    pub inflight: usize,
    pub stalled: usize,
    pub oldest_inflight_seconds: f64,
}

/// Stalls detected on one (layer, disk, cause) since start (`disk` is `unknown` for the layers
/// that do not know it: io_uring requests not at a device, cuFile calls).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StallTotal {
    pub layer: Layer,
    pub disk: String,
    #[serde(default = "unknown_cause")]
    pub cause: super::evidence::CauseKind,
    pub count: u64,
}

fn unknown_cause() -> super::evidence::CauseKind {
    super::evidence::CauseKind::Unknown
}
