//! gds: GPUDirect Storage observability.
//!
//! Data flows one way: the eBPF programs (gds-ebpf) aggregate into maps and a ring buffer
//! (types in gds-common) → [`trace`] loads, attaches and reads them → [`metrics`] turns them
//! into one model → views: [`http`] (`/metrics`, `/debug/*`). NVMe encoding, rings, the data
//! path and the host probe are separate modules with no arrows back into tracing.

pub mod agent;
pub mod btf;
pub mod client;
pub mod config;
pub mod datapath;
pub mod http;
pub mod kmod;
pub mod metrics;
pub mod nvme;
pub mod privileges;
pub mod probe;
pub mod stall;
pub mod top;
pub mod trace;
pub mod tracefs;
pub mod units;
pub mod uring_opcode;
