use thiserror::Error;

use crate::{btf::BtfError, tracefs::TracefsError};

#[derive(Debug, Error)]
pub enum TraceError {
    #[error(
        "not permitted to load eBPF programs (effective capabilities {caps:#x}): run gds-agent as \
         root, or grant CAP_BPF and CAP_PERFMON (e.g. `setcap cap_bpf,cap_perfmon+ep gds-agent`)"
    )]
    NotPermitted { caps: u64 },
    #[error("kernel BTF is required for --attach btf: {0}; or use --attach classic (tracefs)")]
    BtfRequired(String),
    #[error("kernel BTF: {0}")]
    Btf(#[from] BtfError),
    #[error(transparent)]
    Tracefs(#[from] TracefsError),
    #[error(
        "tracepoint {name} is absent from {place} (the kernel needs CONFIG_IO_URING and \
         tracepoints, 5.19+)"
    )]
    TracepointMissing { name: String, place: String },
    #[error("tracepoint {name} has an unsupported prototype ({params}); gds supports 6.1 … 6.18")]
    UnsupportedPrototype { name: String, params: String },
    #[error("loading the eBPF object failed: {0}")]
    Load(#[source] aya::EbpfError),
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("eBPF map {0} is missing from the object")]
    MissingMap(&'static str),
    #[error("eBPF program {0} is missing from the object")]
    MissingProgram(&'static str),
    #[error("cannot map the in-flight table into memory: {0}")]
    Mmap(#[source] std::io::Error),
    #[error("invalid filter: {0}")]
    InvalidFilter(String),
}
