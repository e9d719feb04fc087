//! gds: GPUDirect Storage observability.
//!
//! Data flows one way: the eBPF programs (gds-ebpf) aggregate into maps and a ring buffer
//! (types in gds-common) → [`trace`] loads, attaches and reads them → [`model`] decodes them
//! once into typed requests, stalls and statistics → views: [`metrics`] (`/metrics`),
//! [`stall`] (the detector), [`http`] (`/debug/*`), [`top`] (`top`, `stalls`). NVMe encoding,
//! rings, the data path and the host probe are separate modules with no arrows back into
//! tracing. ARCHITECTURE.md has the layering, checked by `cargo xtask layering`.

pub mod agent;
pub mod bounded;
pub mod btf;
pub mod canary;
pub mod cgroup;
pub mod client;
pub mod config;
pub mod datapath;
pub mod exposition;
pub mod families;
pub mod http;
pub mod kmod;
pub mod metrics;
pub mod model;
pub mod nvme;
pub mod privileges;
pub mod probe;
pub mod stall;
pub mod top;
pub mod trace;
pub mod tracefs;
pub mod units;
pub mod users;
