//! NVMe and block tracing: which programs attach on this kernel, the offsets they read, and
//! the per-disk statistics they aggregate.

use std::{collections::HashMap as StdHashMap, sync::Mutex};

use aya::{
    Ebpf,
    maps::{MapData, PerCpuHashMap},
    programs::BtfTracePoint,
};
use gds_common::{DevConfig, DevHist, DevHistKey, MAP_DEV_HIST, MAP_NVME_ERRORS, NvmeErrKey};

use super::TraceError;
use crate::btf::Btf;

/// Which device programs are attached, and why the others are not (said once at start).
#[derive(Debug, Clone, Default)]
pub struct DeviceAttach {
    pub nvme: bool,
    pub block: bool,
    pub notes: Vec<String>,
}

/// Offsets for the NVMe/block programs from BTF.
pub fn resolve(btf: &Btf) -> Result<DevConfig, crate::btf::BtfError> {
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
    c.rq_size = btf.struct_size("request")?;
    // struct nvme_request exists when the NVMe driver is built in (Debian cloud kernels);
    // without it the status reads as 0 and errors are not split by status.
    c.nvme_req_status = btf.member_offset("nvme_request", &["status"]).unwrap_or(0);
    Ok(c)
}

/// Loads program `prog` of the object for BTF tracepoint `tp` and attaches it.
pub(crate) fn attach_btf(
    ebpf: &mut Ebpf,
    btf: &aya::Btf,
    prog: &'static str,
    tp: &str,
) -> Result<(), TraceError> {
    let p: &mut BtfTracePoint = ebpf
        .program_mut(prog)
        .ok_or(TraceError::MissingProgram(prog))?
        .try_into()
        .map_err(|source| TraceError::Program { name: prog, source })?;
    p.load(tp, btf)
        .map_err(|source| TraceError::Program { name: prog, source })?;
    p.attach()
        .map_err(|source| TraceError::Program { name: prog, source })?;
    Ok(())
}

/// Attaches the NVMe and block programs where the kernel has their tracepoints.
pub fn attach(ebpf: &mut Ebpf, btf: &Btf, aya_btf: &aya::Btf) -> Result<DeviceAttach, TraceError> {
    let mut a = DeviceAttach::default();
    if btf.has_tracepoint("nvme_setup_cmd") && btf.has_tracepoint("nvme_complete_rq") {
        attach_btf(ebpf, aya_btf, "nvme_setup", "nvme_setup_cmd")?;
        attach_btf(ebpf, aya_btf, "nvme_complete", "nvme_complete_rq")?;
        a.nvme = true;
    } else {
        a.notes.push(
            "NVMe tracing off: this kernel has no nvme tracepoints (no NVMe driver built in or \
             loaded); io_uring and block tracing continue"
                .into(),
        );
    }
    let issue_ok = btf
        .tracepoint_params("block_rq_issue")
        .map(|p| p.len() == 1)
        .unwrap_or(false);
    if issue_ok && btf.has_tracepoint("block_rq_complete") {
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

/// Per-disk statistics summed over CPUs.
#[derive(Debug, Clone, Default)]
pub struct DeviceSnapshot {
    pub hists: Vec<(DevHistKey, DevHist)>,
    pub errors: Vec<(NvmeErrKey, u64)>,
}

/// Readers of the per-disk maps, and the disk-name cache.
pub struct DeviceMaps {
    hist: PerCpuHashMap<MapData, DevHistKey, DevHist>,
    errors: PerCpuHashMap<MapData, NvmeErrKey, u64>,
    names: Mutex<StdHashMap<u32, String>>,
}

impl DeviceMaps {
    pub fn take(ebpf: &mut Ebpf) -> Result<DeviceMaps, TraceError> {
        let hist = ebpf
            .take_map(MAP_DEV_HIST)
            .ok_or(TraceError::MissingMap(MAP_DEV_HIST))?;
        let errors = ebpf
            .take_map(MAP_NVME_ERRORS)
            .ok_or(TraceError::MissingMap(MAP_NVME_ERRORS))?;
        Ok(DeviceMaps {
            hist: PerCpuHashMap::try_from(hist).map_err(|source| TraceError::Map {
                name: MAP_DEV_HIST,
                source,
            })?,
            errors: PerCpuHashMap::try_from(errors).map_err(|source| TraceError::Map {
                name: MAP_NVME_ERRORS,
                source,
            })?,
            names: Mutex::new(StdHashMap::new()),
        })
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

    /// Disk name of a device id (`major << 20 | minor`), from /sys/dev/block.
    pub fn disk_name(&self, dev: u32) -> String {
        let mut names = self.names.lock().unwrap_or_else(|p| p.into_inner());
        names.entry(dev).or_insert_with(|| disk_name(dev)).clone()
    }
}

pub fn disk_name(dev: u32) -> String {
    if dev == 0 {
        return "unknown".into();
    }
    let (major, minor) = (dev >> 20, dev & 0xf_ffff);
    std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/uevent"))
        .ok()
        .and_then(|u| {
            u.lines()
                .find_map(|l| l.strip_prefix("DEVNAME=").map(str::to_owned))
        })
        .unwrap_or_else(|| format!("{major}:{minor}"))
}

/// NVMe opcode names (NVMe base / NVM command set specs), I/O and admin.
pub fn nvme_opcode_name(opcode: u8, admin: bool) -> String {
    let name = if admin {
        match opcode {
            0x00 => "delete_sq",
            0x01 => "create_sq",
            0x02 => "get_log_page",
            0x04 => "delete_cq",
            0x05 => "create_cq",
            0x06 => "identify",
            0x08 => "abort",
            0x09 => "set_features",
            0x0a => "get_features",
            0x0c => "async_event",
            0x18 => "keep_alive",
            _ => "",
        }
    } else {
        match opcode {
            0x00 => "flush",
            0x01 => "write",
            0x02 => "read",
            0x04 => "write_uncorrectable",
            0x05 => "compare",
            0x08 => "write_zeroes",
            0x09 => "dataset_management",
            0x0d => "reservation_register",
            0x19 => "copy",
            _ => "",
        }
    };
    if name.is_empty() {
        format!("{}0x{opcode:02x}", if admin { "admin_" } else { "io_" })
    } else {
        name.into()
    }
}

/// Block request operation names (`enum req_op`).
pub fn block_op_name(op: u8) -> &'static str {
    match op {
        0 => "read",
        1 => "write",
        2 => "flush",
        3 => "discard",
        5 => "secure_erase",
        9 => "write_zeroes",
        34 => "drv_in",
        35 => "drv_out",
        _ => "other",
    }
}
