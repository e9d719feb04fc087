//! gds: GPUDirect Storage observability — the `gds-agent` binary's library: the agent
//! (`gds-agent run`), its HTTP server and collectors, `top`/`stalls`, and the probe's canary.
//!
//! Data flows one way: the eBPF programs (gds-ebpf) aggregate into maps and a ring buffer
//! (types in gds-common) → `gds_trace` loads, attaches and reads them → `gds_api::model`
//! decodes them once into typed requests, stalls and statistics → views: [`metrics`]
//! (`/metrics`), `gds_api::stall` (the detector), [`http`] (`/debug/*`), [`top`] (`top`,
//! `stalls`). NVMe passthrough (`gds_nvme`), the host probe (`gds_probe`) and the data path
//! (`gds_datapath`) are crates with no arrows back into tracing. ARCHITECTURE.md has the
//! crate graph.

pub mod agent;
pub mod canary;
pub mod config;
pub mod http;
pub mod metrics;
pub mod top;
