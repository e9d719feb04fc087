//! What every view of gds reads, and what the agent's API speaks: the model (requests, slow
//! events, stalls, statistics, the snapshot, names), the stall detector, the declared metric
//! families and their Prometheus encoding, and the client of the agent's HTTP API.
//!
//! Nothing here loads eBPF: `top`, xtask and the tests build this crate without the eBPF
//! toolchain. The tracer (`gds-trace`) fills the model from the kernel's maps (`raw` holds
//! the maps' contents as it reads them); the views (`/metrics`, `/debug/*`, `top`) read it.

pub mod client;
pub mod exposition;
pub mod families;
pub mod model;
pub mod raw;
pub mod stall;
