//! One shape for every traced layer (io_uring, block, NVMe, cuFile).
//!
//! The programs of every layer are in one eBPF object and share its maps (the config, the
//! event ring, peer-memory counts), so loading stays one step ([`super::UringTracer::start`]).
//! Then each layer, in the order of [`super::LAYERS`], attaches itself to the loaded object
//! and takes the maps it reads; from then on it answers for itself: its `/debug/layers`
//! entry, its in-flight table, and its refresh where it has one (NVMe follows the driver,
//! cuFile scans for libraries). The tracer holds the list and iterates it; what only one layer
//! offers (io_uring statistics, cuFile's thread) is reached through [`super::UringTracer::layer`].

use std::{any::Any, os::fd::OwnedFd, sync::Mutex};

use aya::Ebpf;
use gds_api::raw::{Inflight, Layer, LayerEntry, PeerMemory};
use gds_host::btf::Btf;

use super::{TraceError, TraceOptions, offsets::ResolvedAttach};

/// What start resolved before loading, that a layer may need to attach.
pub struct Start<'a> {
    pub opts: &'a TraceOptions,
    /// The kernel's BTF, parsed once (None where the kernel has none).
    pub btf: Option<&'a Btf>,
    /// How io_uring is traced (BTF or classic tracepoints), chosen before loading because the
    /// programs' config depends on it.
    pub attach: &'a ResolvedAttach,
    /// The block and NVMe programs can run: their offsets were resolved from BTF and written
    /// into the object (only with BTF tracepoints).
    pub devices: bool,
    /// Whether the block program tells peer memory apart, and why.
    pub peer: &'a PeerMemory,
    /// Every map's descriptor, taken right after loading (before any layer took a map): the
    /// cuFile programs are loaded again against them for multi-uprobe links.
    pub map_fds: &'a [(String, OwnedFd)],
    /// The file layer's hooks and offsets, chosen before loading (its config is read-only).
    pub file: &'a super::FilePlan,
}

/// A traced layer: attached to the loaded object, it serves its own part of reading and of
/// `/debug/layers`. Adding a layer is a type implementing this plus its line in
/// [`super::LAYERS`].
pub trait TracedLayer: Any + Send + Sync {
    /// Attaches the layer's programs to the loaded object and takes the maps it reads. A
    /// layer that cannot be traced on this host is returned off (its entry says why); an
    /// error stops the agent, for what must work (io_uring) or a broken object.
    fn attach(ebpf: &mut Ebpf, start: &Start) -> Result<Self, TraceError>
    where
        Self: Sized;

    /// Which layer this is.
    fn layer(&self) -> Layer;

    /// Its `/debug/layers` entry now.
    fn entry(&self) -> LayerEntry;

    /// Its in-flight table now, appended to `out` (for the model and the stall detector).
    fn inflight(&self, out: &mut Vec<Inflight>);

    /// Brings the attachment in line with the host (a driver that came or went, libraries
    /// mapped or unmapped); returns the changes to log. The object lock is taken only around
    /// attach and detach syscalls. Most layers attach once and have nothing to refresh.
    fn refresh(&self, _ebpf: &Mutex<Ebpf>) -> Vec<String> {
        Vec::new()
    }
}

/// How [`super::LAYERS`] names a layer: its attach, boxed.
pub type AttachLayer = fn(&mut Ebpf, &Start) -> Result<Box<dyn TracedLayer>, TraceError>;

/// [`TracedLayer::attach`] of `L`, boxed for the list.
pub fn attach<L: TracedLayer>(
    ebpf: &mut Ebpf,
    start: &Start,
) -> Result<Box<dyn TracedLayer>, TraceError> {
    Ok(Box::new(L::attach(ebpf, start)?))
}
