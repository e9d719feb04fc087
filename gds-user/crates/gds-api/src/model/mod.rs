//! One model of an I/O request, decoded once, read by every view.
//!
//! Data flows one way: the kernel's maps (read by the tracer, `gds-trace`, through [`crate::raw::Source`]) are decoded here, once per
//! read, into typed requests, events, stalls and statistics with names from [`labels`]; the
//! views (`/metrics`, `/debug/*`, the stall detector, `top`, `stalls`) read only these types.
//! Everything here is Serialize + Deserialize: the agent serves it and `top`/`stalls` read it
//! back into the same types (`/debug/snapshot`), so no view parses another's output.

pub mod cufile;
pub mod decode;
pub mod evidence;
pub mod labels;
pub mod nvme_evidence;
pub mod request;
pub mod stats;

pub use decode::{Decoder, inflight};
pub use evidence::{Cause, CauseKind, Evidence};
pub use request::{
    BlockCause, Context, Layer, LayerStalls, NvmeCommand, Request, RequestKey, SlowEvent, SlowNvme,
    Stage, Stall, StallReport, StallTotal, Target, UringOrigin,
};
pub use stats::{Histogram, ReadTimes, Stats};

use serde::{Deserialize, Serialize};

use crate::raw::{Layers, Source};

/// In-flight requests a snapshot (and `/debug/inflight`) lists at most, oldest first;
/// `inflight_total` counts all. `top` shows a screenful; 1,000 rows of ~0.4 KiB keep the list
/// under 0.5 MiB when the kernel's tables hold tens of thousands.
pub const SNAPSHOT_INFLIGHT: usize = 1_000;
/// Recent slow events a snapshot lists at most (newest last).
pub const SNAPSHOT_SLOW: usize = 100;
/// Active stalls a snapshot lists at most (the oldest first): every request in flight past
/// the threshold is one, so a hung disk under load makes as many as the in-flight tables hold.
pub const SNAPSHOT_STALLS: usize = 1_000;

/// What a snapshot leaves out of its lists to stay bounded (`SNAPSHOT_*`; the cuFile report
/// says its own in `cufile.omitted`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SnapshotOmitted {
    /// In-flight requests not listed (`inflight_total` − listed).
    pub inflight: usize,
    /// Active stalls not listed (the youngest).
    pub active_stalls: usize,
    /// Recent slow events not listed (the oldest of those the agent keeps).
    pub slow: usize,
}

/// Everything `top` shows (`/debug/snapshot`), each group of counters with the instant it was
/// read.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Snapshot {
    pub version: String,
    pub kernel: String,
    /// CLOCK_MONOTONIC nanoseconds when the io_uring counters (`stats.opcodes`) were read,
    /// i.e. `stats.read_ns.uring_ns`; the other groups carry their own (`stats.read_ns`,
    /// `cufile.read_ns`). Rates divide by differences of these, never of the time the whole
    /// collection ended.
    pub taken_ns: u64,
    pub stats: Stats,
    /// The oldest requests in flight, oldest first (at most [`SNAPSHOT_INFLIGHT`]).
    pub inflight: Vec<Request>,
    /// Requests in flight in all.
    pub inflight_total: usize,
    /// Active stalls, the oldest first (at most [`SNAPSHOT_STALLS`]), and recent ended ones.
    pub stalls: StallReport,
    /// The most recent slow events, newest last (at most [`SNAPSHOT_SLOW`]).
    pub slow: Vec<SlowEvent>,
    /// How each layer is traced and why.
    pub layers: Layers,
    /// cuFile libraries, processes and files, calls in flight (bounded: `cufile.omitted`).
    #[serde(default)]
    pub cufile: cufile::CufileReport,
    #[serde(default)]
    pub omitted: SnapshotOmitted,
}

impl Snapshot {
    /// Reads the tracer's maps and in-flight tables now; `stalls` and `slow` come from the
    /// agent's stall detector and event reader.
    pub fn collect<S: Source + ?Sized>(
        tracer: &S,
        mut stalls: StallReport,
        mut slow: Vec<SlowEvent>,
    ) -> Result<Snapshot, S::Error> {
        let (stats, cufile_raw) = Stats::read_with_cufile(tracer)?;
        let cufile =
            cufile::CufileReport::collect_from(tracer, &cufile_raw, stats.read_ns.cufile_ns);
        let (mut inflight, _) = inflight(tracer);
        let inflight_total = inflight.len();
        inflight.truncate(SNAPSHOT_INFLIGHT);
        // The detector lists them oldest first.
        let active_stalls = stalls.active.len().saturating_sub(SNAPSHOT_STALLS);
        stalls.active.truncate(SNAPSHOT_STALLS);
        let skip = slow.len().saturating_sub(SNAPSHOT_SLOW);
        slow.drain(..skip);
        Ok(Snapshot {
            version: env!("CARGO_PKG_VERSION").into(),
            kernel: kernel_release(),
            taken_ns: stats.read_ns.uring_ns,
            omitted: SnapshotOmitted {
                inflight: inflight_total - inflight.len(),
                active_stalls,
                slow: skip,
            },
            stats,
            inflight,
            inflight_total,
            stalls,
            slow,
            layers: tracer.layers(),
            cufile,
        })
    }
}

/// `uname -r`.
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}
