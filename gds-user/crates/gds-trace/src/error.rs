use thiserror::Error;

use gds_host::{btf::BtfError, tracefs::TracefsError};

#[derive(Debug, Error)]
pub enum TraceError {
    #[error(
        "not permitted to load eBPF programs: {} (effective capabilities {caps:#x}); run gds-agent \
         as root, or grant CAP_BPF and CAP_PERFMON (e.g. `setcap cap_bpf,cap_perfmon+ep gds-agent`)",
        missing_caps(*caps)
    )]
    NotPermitted { caps: u64 },
    #[error("kernel BTF is required for --attach btf: {0}; or use --attach classic (tracefs)")]
    BtfRequired(String),
    #[error("kernel BTF: {0}")]
    Btf(#[from] BtfError),
    #[error(transparent)]
    Tracefs(#[from] TracefsError),
    #[error(
        "classic tracepoints need tracefs, which is not mounted here ({why}): mount it \
         (`mount -t tracefs nodev /sys/kernel/tracing`) or run the agent as root, which mounts it"
    )]
    NoTracefs { why: String },
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
    #[error("library {path}: {why}")]
    Library { path: String, why: String },
    #[error("library {path} is being written (or a writer waits for it): attached once it is not")]
    Busy { path: String },
    #[error("library {path}: multi-uprobe link for {prog}: {source}")]
    MultiLink {
        path: String,
        prog: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the tracer has no {0} layer")]
    NoLayer(&'static str),
    #[error("invalid filter: {0}")]
    InvalidFilter(String),
}

/// Which of the two tracing capabilities `caps` lacks, in words.
fn missing_caps(caps: u64) -> String {
    let has = |c| gds_host::privileges::CapSet(caps).has(c);
    match (has(super::CAP_BPF), has(super::CAP_PERFMON)) {
        (false, false) => "CAP_BPF and CAP_PERFMON are missing".into(),
        (false, true) => "CAP_BPF is missing (CAP_PERFMON is there)".into(),
        (true, false) => "CAP_PERFMON is missing (CAP_BPF is there)".into(),
        (true, true) => "the kernel refused although CAP_BPF and CAP_PERFMON are there \
                         (a security module or kernel.unprivileged_bpf_disabled?)"
            .into(),
    }
}
