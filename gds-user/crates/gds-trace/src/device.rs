//! What the block and NVMe layers share: the offsets their programs read (resolved from BTF
//! before loading), attaching a BTF tracepoint, the per-disk statistics they aggregate, and
//! reading an in-flight table keyed by `struct request *`.

use std::{collections::HashMap as StdHashMap, sync::Mutex};

use aya::{
    Ebpf,
    maps::{HashMap, MapData, PerCpuHashMap},
    programs::BtfTracePoint,
};
use gds_common::{
    BioLink, BlockProcKey, BlockProcStats, DevConfig, DevHist, DevHistKey, KIND_STAGE_QUEUE,
    MAP_BLOCK_PROCS, MAP_DEV_HIST, MAP_NVME_ERRORS, MAP_STAGE_HIST, NvmeErrKey, StageHistKey,
    StageHists,
};

use super::{TraceError, program, take_map};
use gds_api::raw::{DeviceSnapshot, DiskNames, PeerMemory};
use gds_host::btf::Btf;

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
    c.task_pid = btf.member_offset("task_struct", &["pid"])?;
    c.task_tgid = btf.member_offset("task_struct", &["tgid"])?;
    c.task_comm = btf.member_offset("task_struct", &["comm"])?;
    let (peer, memory) = super::peer::resolve(btf);
    c.peer = peer;
    c.link = bio_link(btf, std::path::Path::new("/proc/kallsyms")).unwrap_or(BioLink::OFF);
    Ok((c, memory))
}

/// What the block program needs to link a bio to its cause (`BioLink`): offsets from BTF,
/// the two completion functions' addresses from `kallsyms` (None where any is missing, or
/// addresses are hidden: the link is then off and requests name their submitter only).
fn bio_link(btf: &Btf, kallsyms: &std::path::Path) -> Option<BioLink> {
    let off = |s: &str, m: &[&str]| btf.member_offset(s, m).ok();
    let [dio, chain] =
        super::kallsyms::addresses(kallsyms, ["iomap_dio_bio_end_io", "bio_chain_endio"]);
    let (dio, chain) = (dio?, chain?);
    Some(BioLink {
        enabled: 1,
        bio_end_io: off("bio", &["bi_end_io"])?,
        bio_private: off("bio", &["bi_private"])?,
        bio_io_vec: off("bio", &["bi_io_vec"])?,
        page_mapping: off("page", &["mapping"])?,
        page_compound_head: off("page", &["compound_head"])?,
        mapping_host: off("address_space", &["host"])?,
        inode_ino: off("inode", &["i_ino"])?,
        task_flags: off("task_struct", &["flags"])?,
        _pad: 0,
        dio_end_io: dio,
        chain_end_io: chain,
    })
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

/// Readers of the per-disk maps (block and NVMe alike) and the disk-name cache; the layers
/// read their own in-flight tables (`trace::block`, `trace::nvme`).
pub struct DeviceMaps {
    hist: PerCpuHashMap<MapData, DevHistKey, DevHist>,
    stages: PerCpuHashMap<MapData, StageHistKey, StageHists>,
    errors: PerCpuHashMap<MapData, NvmeErrKey, u64>,
    procs: HashMap<MapData, BlockProcKey, BlockProcStats>,
    names: Mutex<StdHashMap<u32, String>>,
}

/// One histogram summed over CPUs.
fn sum_cpus<'a>(per_cpu: impl Iterator<Item = &'a DevHist>) -> DevHist {
    let mut sum = DevHist::ZERO;
    for h in per_cpu {
        for (s, b) in sum.buckets.iter_mut().zip(h.buckets.iter()) {
            *s += b;
        }
        sum.count += h.count;
        sum.sum_ns += h.sum_ns;
    }
    sum
}

/// The entries of a hash map keyed by `struct request *`, each once. Deleting the key the
/// iteration stands on makes the kernel restart from the first key, which repeats entries: a
/// (key, start) pair is kept once. At most the map's size (its `max_entries`).
pub(crate) fn in_flight<V: aya::Pod>(
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
            stages: take_map(ebpf, MAP_STAGE_HIST)?,
            errors: take_map(ebpf, MAP_NVME_ERRORS)?,
            procs: take_map(ebpf, MAP_BLOCK_PROCS)?,
            names: Mutex::new(StdHashMap::new()),
        })
    }

    pub fn snapshot(&self) -> DeviceSnapshot {
        let mut snap = DeviceSnapshot::default();
        for (key, per_cpu) in self.hist.iter().flatten() {
            snap.hists.push((key, sum_cpus(per_cpu.iter())));
        }
        // The stage histograms kept together per disk and origin, as the entries of their
        // kinds (a stage never counted, as a request without a completion stage, has none).
        for (key, per_cpu) in self.stages.iter().flatten() {
            for (i, kind) in (KIND_STAGE_QUEUE..).take(gds_common::STAGES).enumerate() {
                let sum = sum_cpus(per_cpu.iter().filter_map(|s| s.stages.get(i)));
                if sum.count != 0 {
                    let key = DevHistKey {
                        dev: key.dev,
                        kind,
                        code: key.origin,
                        flags: 0,
                    };
                    snap.hists.push((key, sum));
                }
            }
        }
        for (key, per_cpu) in self.errors.iter().flatten() {
            snap.errors.push((key, per_cpu.iter().sum()));
        }
        snap.procs = self.procs.iter().filter_map(Result::ok).collect();
        snap.procs.sort_by_key(|(k, _)| *k);
        snap.hists.sort_by_key(|(k, _)| *k);
        snap.errors.sort_by_key(|(k, _)| *k);
        snap
    }

    /// The NVMe error counters summed over CPUs (an empty map, the usual case, is one
    /// system call).
    pub fn nvme_errors(&self) -> Vec<(NvmeErrKey, u64)> {
        let mut out: Vec<(NvmeErrKey, u64)> = self
            .errors
            .iter()
            .flatten()
            .map(|(key, per_cpu)| (key, per_cpu.iter().sum()))
            .collect();
        out.sort_by_key(|(k, _)| *k);
        out
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

    /// Here (root, kallsyms readable) the link resolves, with the addresses kallsyms lists;
    /// a kallsyms without them, or with hidden addresses, turns it off.
    #[test]
    fn bio_link_from_btf_and_kallsyms() {
        let btf = Btf::from_sys().unwrap();
        let link = bio_link(&btf, std::path::Path::new("/proc/kallsyms")).unwrap();
        assert_eq!(link.enabled, 1);
        assert_ne!(link.dio_end_io, link.chain_end_io);
        assert_eq!(
            link.bio_private,
            btf.member_offset("bio", &["bi_private"]).unwrap()
        );
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("kallsyms");
        std::fs::write(&fake, "0 T iomap_dio_bio_end_io\n0 t bio_chain_endio\n").unwrap();
        assert!(bio_link(&btf, &fake).is_none(), "hidden addresses");
        std::fs::write(&fake, "ffffffff81000000 T iomap_dio_bio_end_io\n").unwrap();
        assert!(bio_link(&btf, &fake).is_none(), "one missing");
    }
}
