//! The NVMe layer: `nvme_setup_cmd`/`nvme_complete_rq` on raw tracepoints, attached while
//! the NVMe driver is there and detached when it goes (so `nvme_core` can be unloaded), its
//! in-flight table, and whether completion status is decoded (`struct nvme_request`, from
//! vmlinux or the module's split BTF). Its per-disk statistics share `trace::device::DeviceMaps`
//! with the block layer.

use std::sync::Mutex;

use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData},
    programs::{RawTracePoint, raw_trace_point::RawTracePointLinkId},
};
use gds_api::raw::{Inflight, Layer, LayerDetail, LayerEntry};
use gds_common::{MAP_NVME_INFLIGHT, MAP_NVME_RUNTIME, NvmeInflight, NvmeRuntime};
use gds_host::{
    btf::Btf,
    kmod::{Modules, Residence},
};
use tracing::info;

use super::{
    TraceError,
    block::NEEDS_BTF,
    device::in_flight,
    layer::{Start, TracedLayer},
    program, take_map,
};

/// The NVMe layer: its programs, loaded at start and attached while the driver is there.
pub struct NvmeLayer {
    /// None where the device programs cannot run at all (no BTF).
    tracing: Option<Mutex<NvmeTracing>>,
    inflight: HashMap<MapData, u64, NvmeInflight>,
}

impl TracedLayer for NvmeLayer {
    /// Loads the programs (attached by the first refresh, here, and later ones as the driver
    /// comes and goes); off without BTF.
    fn attach(ebpf: &mut Ebpf, start: &Start) -> Result<NvmeLayer, TraceError> {
        let inflight = take_map(ebpf, MAP_NVME_INFLIGHT)?;
        let tracing = match (start.devices, start.btf) {
            (true, Some(btf)) => {
                for prog in NVME_PROGRAMS.map(|(p, _)| p) {
                    let p: &mut RawTracePoint = program(ebpf, prog)?;
                    p.load()
                        .map_err(|source| TraceError::Program { name: prog, source })?;
                }
                let mut t = NvmeTracing::new(ebpf, btf, Modules::live())?;
                if let Some(change) = t.refresh(ebpf) {
                    info!("{change}");
                }
                Some(Mutex::new(t))
            }
            _ => None,
        };
        Ok(NvmeLayer { tracing, inflight })
    }

    fn layer(&self) -> Layer {
        Layer::Nvme
    }

    fn entry(&self) -> LayerEntry {
        let mode = match &self.tracing {
            Some(t) => t.lock().unwrap_or_else(|p| p.into_inner()).layer().clone(),
            None => NvmeMode {
                residence: Modules::live().residence(NVME_CORE),
                attached: false,
                status_decoded: false,
                why: NEEDS_BTF.into(),
            },
        };
        LayerEntry {
            layer: Layer::Nvme,
            on: mode.attached,
            why: mode.why,
            detail: Some(LayerDetail::Nvme {
                residence: mode.residence,
                status_decoded: mode.status_decoded,
            }),
        }
    }

    fn inflight(&self, out: &mut Vec<Inflight>) {
        out.extend(
            in_flight(&self.inflight, |v| v.setup_ns)
                .into_iter()
                .map(|(rq, n)| Inflight::Nvme(rq, n)),
        );
    }

    /// Attaches or detaches the programs as the NVMe driver comes and goes (modules loaded or
    /// unloaded, controllers bound or removed).
    fn refresh(&self, ebpf: &Mutex<Ebpf>) -> Vec<String> {
        let Some(t) = &self.tracing else {
            return Vec::new();
        };
        let mut t = t.lock().unwrap_or_else(|p| p.into_inner());
        let mut ebpf = ebpf.lock().unwrap_or_else(|p| p.into_inner());
        t.refresh(&mut ebpf).into_iter().collect()
    }
}

/// How the NVMe layer is traced now, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NvmeMode {
    /// Where `nvme_core` lives (built in, module with/without BTF, absent).
    pub residence: Residence,
    /// The NVMe programs are attached now.
    pub attached: bool,
    /// NVMe completion status read (errors split by status); needs `struct nvme_request`.
    pub status_decoded: bool,
    /// One sentence: the mode and the reason.
    pub why: String,
}

/// The NVMe raw-tracepoint programs and the tracepoints they attach to (by name: built-in
/// and module tracepoints alike, see gds-ebpf/src/device.rs).
const NVME_PROGRAMS: [(&str, &str); 2] = [
    ("nvme_setup", "nvme_setup_cmd"),
    ("nvme_complete", "nvme_complete_rq"),
];

/// The module that defines the `nvme:*` tracepoints and `struct nvme_request`.
pub const NVME_CORE: &str = "nvme_core";

/// Attaches the NVMe programs when the NVMe driver is there and detaches them when its last
/// controller goes, so that a module loaded after the agent started is picked up and an
/// unloaded one is let go.
///
/// Why detach at all: the kernel pins a module while a program is attached to one of its
/// tracepoints (raw, BTF or classic alike), so an attached agent would make `rmmod
/// nvme_core` fail with "in use". With no controller bound there is nothing to trace, so the
/// programs let go and attach again when a controller appears.
pub struct NvmeTracing {
    /// vmlinux BTF has the NVMe tracepoints: the driver is built in and never goes away. Then
    /// also the status offset, read from the vmlinux BTF already parsed at start.
    built_in: Option<Result<u32, String>>,
    runtime: Array<MapData, NvmeRuntime>,
    links: Vec<(&'static str, RawTracePointLinkId)>,
    /// What the last refresh found (its `why` is what was logged last: a change is logged
    /// once, not every scan).
    layer: NvmeMode,
    modules: Modules,
    /// A refresh after the first found `nvme_core` absent: any later attach is of a module
    /// loaded while the agent ran (also when it first came with no controller bound).
    seen_absent: bool,
}

/// Offset of `status` in `struct nvme_request` in `btf`.
fn status_offset(btf: &Btf) -> Result<u32, String> {
    btf.member_offset("nvme_request", &["status"])
        .map_err(|e| e.to_string())
}

impl NvmeTracing {
    pub fn new(
        ebpf: &mut Ebpf,
        vmlinux: &Btf,
        modules: Modules,
    ) -> Result<NvmeTracing, TraceError> {
        Ok(NvmeTracing {
            built_in: vmlinux
                .has_tracepoint("nvme_setup_cmd")
                .then(|| status_offset(vmlinux)),
            runtime: take_map(ebpf, MAP_NVME_RUNTIME)?,
            links: Vec::new(),
            layer: NvmeMode {
                residence: Residence::Absent,
                attached: false,
                status_decoded: false,
                why: String::new(),
            },
            modules,
            seen_absent: false,
        })
    }

    pub fn layer(&self) -> &NvmeMode {
        &self.layer
    }

    fn residence(&self) -> Residence {
        if self.built_in.is_some() {
            return Residence::BuiltIn;
        }
        match self.modules.residence(NVME_CORE) {
            // vmlinux has no NVMe tracepoints, so sysfs's "built in" (a parameters directory
            // without initstate) cannot be the NVMe driver we could trace.
            Residence::BuiltIn => Residence::Absent,
            r => r,
        }
    }

    /// Offset of `status` in `struct nvme_request`, from vmlinux (built in) or the module's
    /// split BTF; `Err` says why it is unknown.
    fn status_offset(&self, residence: Residence) -> Result<u32, String> {
        match (&self.built_in, residence) {
            (Some(off), _) => off.clone(),
            (None, Residence::Module { btf: true }) => Btf::from_sys_module(NVME_CORE)
                .map_err(|e| e.to_string())
                .and_then(|b| status_offset(&b)),
            _ => Err(format!(
                "{NVME_CORE} has no BTF ({}/{NVME_CORE} is missing: the kernel lacks \
                 CONFIG_DEBUG_INFO_BTF_MODULES)",
                gds_host::btf::MODULE_BTF_DIR
            )),
        }
    }

    /// Brings the attachment in line with the driver's presence. Returns what changed (one
    /// line to log), or `None`.
    pub fn refresh(&mut self, ebpf: &mut Ebpf) -> Option<String> {
        let residence = self.residence();
        // The first refresh (at start) leaves `why` empty until it is set below.
        if residence == Residence::Absent && !self.layer.why.is_empty() {
            self.seen_absent = true;
        }
        let controllers = self.modules.nvme_controllers();
        let want = match residence {
            Residence::BuiltIn => true,
            Residence::Module { .. } => controllers > 0,
            Residence::Absent => false,
        };
        let attached = !self.links.is_empty();
        let off = |why: String| NvmeMode {
            residence,
            attached: false,
            status_decoded: false,
            why,
        };
        let next = match (want, attached) {
            (true, false) => self.attach(ebpf, residence, controllers),
            (false, true) => {
                self.detach_all(ebpf);
                off(match residence {
                    Residence::Absent => format!(
                        "NVMe tracing paused: {NVME_CORE} was unloaded; attaching again when it \
                         is loaded"
                    ),
                    _ => format!(
                        "NVMe tracing paused: no NVMe controller is bound any more (driver \
                         unloaded or device removed); detached so {NVME_CORE} can be unloaded, \
                         attaching again when a controller appears"
                    ),
                })
            }
            (false, false) => off(match residence {
                Residence::Absent => format!(
                    "NVMe tracing off: no NVMe driver built in or loaded ({NVME_CORE} absent); \
                     io_uring and block tracing continue, NVMe attaches when the module is loaded"
                ),
                _ => format!(
                    "NVMe tracing waiting: {NVME_CORE} is a {} with no NVMe controller bound; \
                     attaching when one appears",
                    residence.describe()
                ),
            }),
            (true, true) => return None,
        };
        if next == self.layer {
            return None;
        }
        self.layer = next;
        Some(self.layer.why.clone())
    }

    /// Attaches the programs (status offset first); the layer as it is then.
    fn attach(&mut self, ebpf: &mut Ebpf, residence: Residence, controllers: usize) -> NvmeMode {
        let status = self.status_offset(residence);
        let runtime = NvmeRuntime {
            status_off: *status.as_ref().unwrap_or(&0),
            _pad: 0,
        };
        if let Err(e) = self
            .runtime
            .set(0, runtime, 0)
            .map_err(|e| e.to_string())
            .and_then(|()| self.attach_all(ebpf))
        {
            self.detach_all(ebpf);
            return NvmeMode {
                residence,
                attached: false,
                status_decoded: false,
                why: format!(
                    "NVMe tracing off: {NVME_CORE} is {} but attaching failed: {e}",
                    residence.describe()
                ),
            };
        }
        let status_words = match &status {
            Ok(off) => format!("NVMe status decoded (struct nvme_request.status at +{off})"),
            Err(why) => format!("NVMe status not decoded, errors not split by status ({why})"),
        };
        // nvme_core was absent at start (or since) and is here now: loaded while the agent ran,
        // whether the controllers came with it or a moment later.
        let late = self.seen_absent
            || (self.layer.residence == Residence::Absent && !self.layer.why.is_empty());
        let origin = match residence {
            Residence::BuiltIn => "the NVMe driver is built in (vmlinux BTF)".to_string(),
            _ => format!(
                "{NVME_CORE} is a {} ({controllers} controller(s) bound){}",
                residence.describe(),
                if late {
                    ", loaded after the agent started"
                } else {
                    ""
                }
            ),
        };
        NvmeMode {
            residence,
            attached: true,
            status_decoded: status.is_ok(),
            why: format!(
                "NVMe tracing on: {origin}; raw tracepoints nvme_setup_cmd/nvme_complete_rq, \
                 passthrough linked to io_uring by request->end_io_data; {status_words}"
            ),
        }
    }

    fn attach_all(&mut self, ebpf: &mut Ebpf) -> Result<(), String> {
        for (prog, tp) in NVME_PROGRAMS {
            let p: &mut RawTracePoint = program(ebpf, prog).map_err(|e| e.to_string())?;
            let link = p.attach(tp).map_err(|e| format!("{tp}: {e}"))?;
            self.links.push((prog, link));
        }
        Ok(())
    }

    fn detach_all(&mut self, ebpf: &mut Ebpf) {
        for (prog, link) in self.links.drain(..) {
            if let Ok(p) = program::<RawTracePoint>(ebpf, prog) {
                let _ = p.detach(link);
            }
        }
    }
}
