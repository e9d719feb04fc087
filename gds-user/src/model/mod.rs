//! One model of an I/O request, decoded once, read by every view.
//!
//! Data flows one way: the kernel's maps (read by [`crate::trace`]) are decoded here, once per
//! read, into typed requests, events, stalls and statistics with names from [`labels`]; the
//! views (`/metrics`, `/debug/*`, the stall detector, `top`, `stalls`) read only these types.
//! Everything here is Serialize + Deserialize: the agent serves it and `top`/`stalls` read it
//! back into the same types (`/debug/snapshot`), so no view parses another's output.

pub mod cufile;
pub mod decode;
pub mod labels;
pub mod request;
pub mod stats;

pub use decode::{Decoder, inflight};
pub use request::{
    Context, Layer, NvmeCommand, Request, RequestKey, SlowEvent, SlowNvme, Stage, Stall,
    StallReport, StallTotal,
};
pub use stats::{Histogram, Stats};

use serde::{Deserialize, Serialize};

use crate::trace::{Layers, TraceError, UringTracer};

/// In-flight requests a snapshot lists at most (oldest first); `inflight_total` counts all.
pub const SNAPSHOT_INFLIGHT: usize = 10_000;
/// Recent slow events a snapshot lists at most (newest last).
pub const SNAPSHOT_SLOW: usize = 100;

/// Everything `top` shows, at one instant (`/debug/snapshot`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Snapshot {
    pub version: String,
    pub kernel: String,
    /// CLOCK_MONOTONIC nanoseconds when the in-flight tables had been read.
    pub taken_ns: u64,
    pub stats: Stats,
    /// The oldest requests in flight, oldest first (at most [`SNAPSHOT_INFLIGHT`]).
    pub inflight: Vec<Request>,
    /// Requests in flight in all.
    pub inflight_total: usize,
    pub stalls: StallReport,
    /// The most recent slow events, newest last (at most [`SNAPSHOT_SLOW`]).
    pub slow: Vec<SlowEvent>,
    /// How each layer is traced and why.
    pub layers: Layers,
    /// cuFile libraries, processes and files, calls in flight.
    #[serde(default)]
    pub cufile: cufile::CufileReport,
}

impl Snapshot {
    /// Reads the tracer's maps and in-flight tables now; `stalls` and `slow` come from the
    /// agent's stall detector and event reader.
    pub fn collect(
        tracer: &UringTracer,
        stalls: StallReport,
        mut slow: Vec<SlowEvent>,
    ) -> Result<Snapshot, TraceError> {
        let stats = Stats::read(tracer)?;
        let cufile = cufile::CufileReport::collect(tracer)?;
        let (mut inflight, taken_ns) = inflight(tracer);
        let inflight_total = inflight.len();
        inflight.truncate(SNAPSHOT_INFLIGHT);
        let skip = slow.len().saturating_sub(SNAPSHOT_SLOW);
        slow.drain(..skip);
        Ok(Snapshot {
            version: env!("CARGO_PKG_VERSION").into(),
            kernel: kernel_release(),
            taken_ns,
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
