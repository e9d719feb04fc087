//! NVMe and block tracing: which programs attach on this kernel, the offsets they read, and
//! the per-disk statistics they aggregate.

use std::{collections::HashMap as StdHashMap, sync::Mutex};

use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, PerCpuHashMap},
    programs::{BtfTracePoint, RawTracePoint, raw_trace_point::RawTracePointLinkId},
};
use gds_common::{
    BlockInflight, DevConfig, DevHist, DevHistKey, MAP_BLOCK_INFLIGHT, MAP_DEV_HIST,
    MAP_NVME_ERRORS, MAP_NVME_INFLIGHT, MAP_NVME_RUNTIME, NvmeErrKey, NvmeInflight, NvmeRuntime,
};

use super::{TraceError, program, take_map};
use gds_api::raw::{DeviceSnapshot, DiskNames, NvmeLayer, PeerMemory};
use gds_host::{
    btf::Btf,
    kmod::{Modules, Residence},
};

/// Which device programs are attached at start, and why the others are not (said once).
#[derive(Debug, Clone, Default)]
pub struct DeviceAttach {
    pub block: bool,
    pub notes: Vec<String>,
}

/// Offsets for the NVMe/block programs from vmlinux BTF (the block layer is always built in;
/// `struct nvme_request` is resolved separately, when the NVMe programs attach), and whether
/// the block program tells peer memory apart (`trace::peer`).
pub fn resolve(btf: &Btf) -> Result<(DevConfig, PeerMemory), gds_host::btf::BtfError> {
    let mut c = DevConfig::DEFAULT;
    c.rq_q = btf.member_offset("request", &["q"])?;
    c.rq_cmd_flags = btf.member_offset("request", &["cmd_flags"])?;
    c.rq_end_io_data = btf.member_offset("request", &["end_io_data"])?;
    c.rq_mq_hctx = btf.member_offset("request", &["mq_hctx"])?;
    c.q_disk = btf.member_offset("request_queue", &["disk"])?;
    c.q_queuedata = btf.member_offset("request_queue", &["queuedata"])?;
    c.disk_major = btf.member_offset("gendisk", &["major"])?;
    c.disk_first_minor = btf.member_offset("gendisk", &["first_minor"])?;
    c.hctx_queue_num = btf.member_offset("blk_mq_hw_ctx", &["queue_num"])?;
    c.rq_bio = btf.member_offset("request", &["bio"])?;
    c.rq_sector = btf.member_offset("request", &["__sector"])?;
    c.rq_data_len = btf.member_offset("request", &["__data_len"])?;
    c.rq_size = btf.struct_size("request")?;
    let (peer, memory) = super::peer::resolve(btf);
    c.peer = peer;
    Ok((c, memory))
}

/// Loads program `prog` of the object for BTF tracepoint `tp` and attaches it.
pub(crate) fn attach_btf(
    ebpf: &mut Ebpf,
    btf: &aya::Btf,
    prog: &'static str,
    tp: &str,
) -> Result<(), TraceError> {
    let p: &mut BtfTracePoint = program(ebpf, prog)?;
    p.load(tp, btf)
        .map_err(|source| TraceError::Program { name: prog, source })?;
    p.attach()
        .map_err(|source| TraceError::Program { name: prog, source })?;
    Ok(())
}

/// What [`BtfTracePoint::load`] needs of the kernel's BTF, for tracepoints `tps`: aya looks up
/// the id of each `btf_trace_<tp>` typedef by name, and the kernel checks that id against its
/// own BTF. So the ids gds's parse found, at the same ids in a blob that holds nothing else
/// (every other id a bare pointer record), serve as well as aya's parse of vmlinux, which held
/// 13 MiB of heap (19 at its peak) while the agent attached; this one holds about 5.
pub(crate) fn tracepoint_btf(btf: &Btf, tps: &[&str]) -> Result<aya::Btf, TraceError> {
    const KIND_PTR: u32 = 2;
    const KIND_TYPEDEF: u32 = 8;
    let mut named = std::collections::BTreeMap::new();
    let mut strings = vec![0u8];
    for tp in tps {
        let id = btf
            .tracepoint_id(tp)
            .ok_or_else(|| TraceError::TracepointMissing {
                name: (*tp).to_owned(),
                place: "the kernel's BTF".into(),
            })?;
        named.insert(id, strings.len() as u32);
        strings.extend_from_slice(format!("btf_trace_{tp}").as_bytes());
        strings.push(0);
    }
    let last = named.keys().next_back().copied().unwrap_or(0);
    let mut types = Vec::with_capacity(last as usize * 12);
    for id in 1..=last {
        let (name, kind) = match named.get(&id) {
            Some(&name) => (name, KIND_TYPEDEF),
            None => (0, KIND_PTR),
        };
        for word in [name, kind << 24, 0] {
            types.extend_from_slice(&word.to_le_bytes());
        }
    }
    let mut blob = Vec::with_capacity(24 + types.len() + strings.len());
    blob.extend_from_slice(&[0x9f, 0xeb, 1, 0]);
    let (tlen, slen) = (types.len() as u32, strings.len() as u32);
    for word in [24u32, 0, tlen, tlen, slen] {
        blob.extend_from_slice(&word.to_le_bytes());
    }
    blob.extend_from_slice(&types);
    blob.extend_from_slice(&strings);
    drop(types);
    aya::Btf::parse(&blob, aya::Endianness::default())
        .map_err(|e| TraceError::Load(aya::EbpfError::BtfError(e)))
}

/// Attaches the block programs and loads (without attaching) the NVMe ones, which
/// [`NvmeTracing::refresh`] attaches whenever the NVMe driver is there.
pub fn attach(ebpf: &mut Ebpf, btf: &Btf) -> Result<DeviceAttach, TraceError> {
    let mut a = DeviceAttach::default();
    for prog in NVME_PROGRAMS.map(|(p, _)| p) {
        let p: &mut RawTracePoint = program(ebpf, prog)?;
        p.load()
            .map_err(|source| TraceError::Program { name: prog, source })?;
    }
    let issue_ok = btf
        .tracepoint_params("block_rq_issue")
        .map(|p| p.len() == 1)
        .unwrap_or(false);
    if issue_ok && btf.has_tracepoint("block_rq_complete") {
        let aya_btf = &tracepoint_btf(
            btf,
            &["block_getrq", "block_rq_issue", "block_rq_complete"],
        )?;
        // The submitter first: a request issued before it attached names no process, and
        // that only for the requests in flight at start.
        let getrq_ok = btf
            .tracepoint_params("block_getrq")
            .map(|p| p.len() == 1)
            .unwrap_or(false);
        if getrq_ok {
            attach_btf(ebpf, aya_btf, "block_getrq", "block_getrq")?;
        } else {
            a.notes.push(
                "block requests name no submitter: block_getrq is absent or of an older form"
                    .into(),
            );
        }
        attach_btf(ebpf, aya_btf, "block_issue", "block_rq_issue")?;
        attach_btf(ebpf, aya_btf, "block_complete", "block_rq_complete")?;
        a.block = true;
    } else {
        a.notes.push(
            "block tracing off: block_rq_issue/complete are absent or of an older form".into(),
        );
    }
    Ok(a)
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
    layer: NvmeLayer,
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
            layer: NvmeLayer {
                residence: Residence::Absent,
                attached: false,
                status_decoded: false,
                why: String::new(),
            },
            modules,
            seen_absent: false,
        })
    }

    pub fn layer(&self) -> &NvmeLayer {
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
        let off = |why: String| NvmeLayer {
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
    fn attach(&mut self, ebpf: &mut Ebpf, residence: Residence, controllers: usize) -> NvmeLayer {
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
            return NvmeLayer {
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
        NvmeLayer {
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

/// Readers of the per-disk maps and the block and NVMe in-flight tables, and the disk-name
/// cache.
pub struct DeviceMaps {
    hist: PerCpuHashMap<MapData, DevHistKey, DevHist>,
    errors: PerCpuHashMap<MapData, NvmeErrKey, u64>,
    block_inflight: HashMap<MapData, u64, BlockInflight>,
    nvme_inflight: HashMap<MapData, u64, NvmeInflight>,
    names: Mutex<StdHashMap<u32, String>>,
}

/// The entries of a hash map keyed by `struct request *`, each once. Deleting the key the
/// iteration stands on makes the kernel restart from the first key, which repeats entries: a
/// (key, start) pair is kept once. At most the map's size (its `max_entries`).
fn in_flight<V: aya::Pod>(
    map: &HashMap<MapData, u64, V>,
    start: impl Fn(&V) -> u64,
) -> Vec<(u64, V)> {
    let mut seen = std::collections::HashSet::new();
    map.iter()
        .filter_map(Result::ok)
        .filter(|(k, v)| seen.insert((*k, start(v))))
        .collect()
}

impl DeviceMaps {
    pub fn take(ebpf: &mut Ebpf) -> Result<DeviceMaps, TraceError> {
        Ok(DeviceMaps {
            hist: take_map(ebpf, MAP_DEV_HIST)?,
            errors: take_map(ebpf, MAP_NVME_ERRORS)?,
            block_inflight: take_map(ebpf, MAP_BLOCK_INFLIGHT)?,
            nvme_inflight: take_map(ebpf, MAP_NVME_INFLIGHT)?,
            names: Mutex::new(StdHashMap::new()),
        })
    }

    /// Block requests issued and not completed now, keyed by `struct request *`.
    pub fn block_inflight(&self) -> Vec<(u64, BlockInflight)> {
        in_flight(&self.block_inflight, |v| v.issue_ns)
    }

    /// NVMe commands set up and not completed now, keyed by `struct request *` (the key of
    /// their block request too).
    pub fn nvme_inflight(&self) -> Vec<(u64, NvmeInflight)> {
        in_flight(&self.nvme_inflight, |v| v.setup_ns)
    }

    pub fn snapshot(&self) -> DeviceSnapshot {
        let mut snap = DeviceSnapshot::default();
        for item in self.hist.iter().flatten() {
            let (key, per_cpu) = item;
            let mut sum = DevHist::ZERO;
            for h in per_cpu.iter() {
                for (s, b) in sum.buckets.iter_mut().zip(h.buckets.iter()) {
                    *s += b;
                }
                sum.count += h.count;
                sum.sum_ns += h.sum_ns;
            }
            snap.hists.push((key, sum));
        }
        for (key, per_cpu) in self.errors.iter().flatten() {
            snap.errors.push((key, per_cpu.iter().sum()));
        }
        snap.hists.sort_by_key(|(k, _)| *k);
        snap.errors.sort_by_key(|(k, _)| *k);
        snap
    }

    /// Looks the cached disk names up again: after an NVMe driver went and came back, a
    /// device number may name another disk (minors of `blkext` are handed out in probe
    /// order). A disk that is gone keeps its last name, so its counts keep their labels.
    pub fn refresh_names(&self) {
        let mut names = self.names.lock().unwrap_or_else(|p| p.into_inner());
        for (dev, name) in names.iter_mut() {
            if let Some(now) = sysfs_disk_name(*dev) {
                *name = now;
            }
        }
    }

    /// Disk name of a device id (`major << 20 | minor`), from /sys/dev/block.
    pub fn disk_name(&self, dev: u32) -> String {
        let mut names = self.names.lock().unwrap_or_else(|p| p.into_inner());
        names.entry(dev).or_insert_with(|| disk_name(dev)).clone()
    }
}

impl DiskNames for DeviceMaps {
    fn disk_name(&self, dev: u32) -> String {
        DeviceMaps::disk_name(self, dev)
    }
}

fn disk_name(dev: u32) -> String {
    if dev == 0 {
        return "unknown".into();
    }
    sysfs_disk_name(dev).unwrap_or_else(|| format!("{}:{}", dev >> 20, dev & 0xf_ffff))
}

/// The name /sys/dev/block gives device `dev` now, if it exists.
fn sysfs_disk_name(dev: u32) -> Option<String> {
    let (major, minor) = (dev >> 20, dev & 0xf_ffff);
    std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/uevent"))
        .ok()
        .and_then(|u| {
            u.lines()
                .find_map(|l| l.strip_prefix("DEVNAME=").map(str::to_owned))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// aya finds each tracepoint's typedef at the id the kernel's own BTF gives it, and a
    /// tracepoint the kernel lacks is an error that names it.
    #[test]
    fn tracepoint_btf_keeps_the_kernel_ids() {
        let btf = Btf::from_sys().unwrap();
        let tps = ["io_uring_complete", "block_rq_issue", "io_uring_req_failed"];
        let small = tracepoint_btf(&btf, &tps).unwrap();
        for tp in tps {
            let name = format!("btf_trace_{tp}");
            let id = small
                .id_by_type_name_kind(&name, aya_obj::btf::BtfKind::Typedef)
                .unwrap();
            assert_eq!(Some(id), btf.tracepoint_id(tp), "{tp}");
        }
        let e = tracepoint_btf(&btf, &["no_such_tracepoint"]).unwrap_err();
        assert!(e.to_string().contains("no_such_tracepoint"), "{e}");
    }
}
