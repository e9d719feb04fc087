//! Loading, attaching and reading the eBPF programs.
//!
//! [`UringTracer`] owns the loaded object: dropping it detaches every program (aya closes the
//! links with the object), which is how the agent shuts down cleanly. Each traced layer is one
//! module implementing [`TracedLayer`], registered once in [`LAYERS`].

mod block;
mod cufile;
mod device;
mod elf;
mod error;
mod events;
mod file;
mod file_hooks;
mod filewatch;
mod inflight;
mod kallsyms;
mod layer;
mod lease;
mod nvme;
mod offsets;
mod peer;
mod procmaps;
mod release;
mod tracer;
mod umulti;
mod uring;

pub use block::BlockLayer;
pub use cufile::{
    CufileLayer, CufileView, LINGER as CUFILE_LINGER, Limits as CufileLimits, ProcessFilter,
};
pub use device::DeviceMaps;
pub use error::TraceError;
pub use events::raw_event;
pub use file::{FileHooks, FileLayer, FilePlan};
pub use inflight::InflightRequest;
pub use layer::{Start, TracedLayer};
pub use nvme::NvmeLayer;
pub use offsets::{AttachMode, ResolvedAttach};
pub use tracer::{FloorProbe, TraceOptions, UringTracer};
pub use uring::UringLayer;

/// Every traced layer, in the order they attach after the object is loaded: where a layer is
/// registered, and the only place. io_uring first (it must attach, or the agent stops); then
/// block, whose submitter program must be attached before NVMe commands name it; NVMe; cuFile;
/// the file layer.
pub(crate) const LAYERS: [layer::AttachLayer; 5] = [
    layer::attach::<UringLayer>,
    layer::attach::<BlockLayer>,
    layer::attach::<NvmeLayer>,
    layer::attach::<CufileLayer>,
    layer::attach::<FileLayer>,
];

use aya::{Ebpf, include_bytes_aligned};

/// The eBPF object built by build.rs (aya-build) from gds-ebpf.
pub(crate) static EBPF_OBJECT: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/gds"));

/// Program `name` of the loaded object, as its kind `T` (`BtfTracePoint`, `RawTracePoint`, …).
pub(crate) fn program<'a, T>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut T, TraceError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(TraceError::MissingProgram(name))?
        .try_into()
        .map_err(|source| TraceError::Program { name, source })
}

/// Takes map `name` out of the loaded object, as its kind `M` (`HashMap`, `PerCpuArray`, …).
pub(crate) fn take_map<M>(ebpf: &mut Ebpf, name: &'static str) -> Result<M, TraceError>
where
    M: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(TraceError::MissingMap(name))?;
    M::try_from(map).map_err(|source| TraceError::Map { name, source })
}

/// Effective capabilities of this process (CapEff in /proc/self/status).
pub fn effective_caps() -> u64 {
    gds_host::privileges::process_effective().0
}

pub use gds_host::privileges::{CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN};

/// Loading tracing programs needs CAP_BPF + CAP_PERFMON (or CAP_SYS_ADMIN on older kernels).
pub fn check_tracing_caps() -> Result<(), TraceError> {
    let caps = effective_caps();
    let has = |c| gds_host::privileges::CapSet(caps).has(c);
    if has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON)) {
        Ok(())
    } else {
        Err(TraceError::NotPermitted { caps })
    }
}
