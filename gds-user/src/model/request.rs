//! What a request is, once decoded: the one set of types every view reads and `/debug/*`
//! serves (Serialize) and clients (`top`, `stalls`, tests) read back (Deserialize).

use serde::{Deserialize, Serialize};

/// Where a request is being tracked.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Layer {
    /// io_uring: submitted, not yet completed.
    #[default]
    Uring,
}

impl Layer {
    pub const ALL: [Layer; 1] = [Layer::Uring];

    pub const fn label(self) -> &'static str {
        match self {
            Layer::Uring => "uring",
        }
    }
}

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
}

/// The first stage: where a request is before tracing saw it anywhere else.
impl Default for Stage {
    fn default() -> Stage {
        Stage::ALL[0]
    }
}

/// The kernel's identity of a request while it is in flight: the `struct io_kiocb *` and
/// its submission time (a pointer is reused by later requests; the pair is not).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct RequestKey {
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

/// Who issued a request and what it is: the context every view shows beside its timing
/// (flattened into the JSON of requests, slow events and stalls).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Context {
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
    pub opcode: String,
    pub user_data: u64,
    /// `struct io_ring_ctx *` of the ring, hex.
    pub ring: String,
    /// `struct io_kiocb *`, hex.
    pub req: String,
}

/// One request in flight, with its context (`/debug/inflight`, `/debug/snapshot`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    pub layer: Layer,
    #[serde(flatten)]
    pub ctx: Context,
    /// Seconds since submission, at the scan that saw it.
    pub age_seconds: f64,
    pub stage: Stage,
    /// Disk the request is on; `unknown` until device tracing names it.
    pub disk: String,
    /// The NVMe command it became (passthrough with NVMe tracing), else absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nvme: Option<NvmeCommand>,
    #[serde(skip)]
    pub key: RequestKey,
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

/// A request slower than the slow threshold, as logged and served on `/debug/slow`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SlowEvent {
    #[serde(flatten)]
    pub ctx: Context,
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
    /// Stalls detected since start, by layer and disk.
    #[serde(default)]
    pub totals: Vec<StallTotal>,
}

/// Stalls detected on one (layer, disk) since start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StallTotal {
    pub layer: Layer,
    pub disk: String,
    pub count: u64,
}
