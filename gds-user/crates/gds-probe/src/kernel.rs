//! The kernel: version, BTF, tracefs, io_uring (enabled, opcodes, SQE128), config items, IOMMU
//! mode, and the capabilities this process holds.

use std::collections::BTreeMap;
use std::io::Read;

use serde::Serialize;

use super::Fact;
use super::bounded::HostRoot;
use gds_host::privileges::{CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN};

/// IORING_OP_URING_CMD (include/uapi/linux/io_uring.h, Linux 5.19+).
pub const IORING_OP_URING_CMD: u8 = 46;
const CONFIG_GZ_LIMIT: u64 = 4 * 1024 * 1024;
const CONFIG_TEXT_LIMIT: u64 = 16 * 1024 * 1024;
const CMDLINE_LIMIT: u64 = 64 * 1024;
const STATUS_LIMIT: u64 = 256 * 1024;

/// Config items the verdict and the tracer care about.
pub const CONFIG_ITEMS: &[&str] = &[
    "CONFIG_PCI_P2PDMA",
    "CONFIG_DMA_SHARED_BUFFER",
    "CONFIG_ZONE_DEVICE",
    "CONFIG_BLK_DEV_NVME",
    "CONFIG_NVME_MULTIPATH",
    "CONFIG_IO_URING",
    "CONFIG_BPF_SYSCALL",
    "CONFIG_DEBUG_INFO_BTF",
    "CONFIG_IOMMU_SUPPORT",
];

#[derive(Debug, Clone, Serialize)]
pub struct KernelSection {
    pub release: Fact<String>,
    pub btf: Fact<bool>,
    /// Where tracefs is mounted (`/sys/kernel/tracing`).
    pub tracefs: Fact<String>,
    /// `/proc/sys/kernel/io_uring_disabled`: 0 enabled, 1 root only, 2 disabled.
    pub io_uring_disabled: Fact<u32>,
    pub io_uring: Fact<IoUringSupport>,
    /// Source of the config (`/proc/config.gz` or `/boot/config-<release>`) and the items.
    pub config_source: Fact<String>,
    /// `y`, `m`, or `n` (not set) per item of [`CONFIG_ITEMS`].
    pub config: BTreeMap<String, Fact<String>>,
    pub iommu: Iommu,
    pub capabilities: Fact<Capabilities>,
    /// Which kinds of eBPF program load here (tried for real; live only).
    pub bpf_hooks: Fact<super::bpf_hooks::BpfHooks>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct IoUringSupport {
    pub uring_cmd: bool,
    /// A ring with IORING_SETUP_SQE128 (needed for NVMe passthrough) could be created.
    pub sqe128: bool,
    pub sqe128_error: Option<String>,
    /// Number of opcodes the kernel reports as supported.
    pub supported_opcodes: u32,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum IommuMode {
    /// No IOMMU registered (none present, or disabled on the command line).
    Off,
    /// IOMMU present, DMA domains are identity-mapped (`iommu=pt` or default passthrough).
    Passthrough,
    /// DMA is translated: peer-to-peer goes through the root complex and GDS warns against it.
    Translated,
}

#[derive(Debug, Clone, Serialize)]
pub struct Iommu {
    pub mode: Fact<IommuMode>,
    /// Registered IOMMU units (`/sys/class/iommu/*`).
    pub units: u32,
    pub groups: u32,
    /// IOMMU-related words on the kernel command line.
    pub cmdline: Vec<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Capabilities {
    pub cap_eff: String,
    pub cap_bpf: bool,
    pub cap_perfmon: bool,
    pub cap_sys_admin: bool,
}

/// `y`/`m`/`n` for `item` in a kernel config text.
pub fn config_value(config: &str, item: &str) -> String {
    let set = format!("{item}=");
    let unset = format!("# {item} is not set");
    for line in config.lines() {
        if let Some(v) = line.strip_prefix(&set) {
            return v.trim().trim_matches('"').to_owned();
        }
        if line.trim() == unset {
            return "n".to_owned();
        }
    }
    "n".to_owned()
}

pub fn parse_cap_eff(status: &str) -> Option<Capabilities> {
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))?
        .trim();
    let bits = u64::from_str_radix(hex, 16).ok()?;
    let has = |cap: u32| bits & (1u64 << cap) != 0;
    Some(Capabilities {
        cap_eff: hex.to_owned(),
        cap_bpf: has(CAP_BPF),
        cap_perfmon: has(CAP_PERFMON),
        cap_sys_admin: has(CAP_SYS_ADMIN),
    })
}

/// IOMMU words on the command line: `iommu=`, `intel_iommu=`, `amd_iommu=`.
pub fn iommu_cmdline(cmdline: &str) -> Vec<String> {
    cmdline
        .split_whitespace()
        .filter(|w| {
            w.starts_with("iommu") || w.starts_with("intel_iommu") || w.starts_with("amd_iommu")
        })
        .take(16)
        .map(str::to_owned)
        .collect()
}

fn read_config(root: &HostRoot, release: Option<&str>) -> Result<(String, String), String> {
    match root.read_bytes("/proc/config.gz", CONFIG_GZ_LIMIT) {
        Ok(gz) => {
            let mut text = String::new();
            flate2::read::GzDecoder::new(&gz[..])
                .take(CONFIG_TEXT_LIMIT)
                .read_to_string(&mut text)
                .map_err(|e| format!("/proc/config.gz is not a gzip of text: {e}"))?;
            return Ok(("/proc/config.gz".into(), text));
        }
        Err(err) if !err.is_not_found() => return Err(err.to_string()),
        Err(_) => {}
    }
    let Some(release) = release else {
        return Err("no /proc/config.gz and the kernel release is unknown".into());
    };
    let boot = format!("/boot/config-{release}");
    match root.read(&boot, CONFIG_TEXT_LIMIT) {
        Ok(text) => Ok((boot, text)),
        Err(err) if err.is_not_found() => Err(format!(
            "no /proc/config.gz (CONFIG_IKCONFIG_PROC) and no {boot}"
        )),
        Err(err) => Err(err.to_string()),
    }
}

fn tracefs(root: &HostRoot) -> Fact<String> {
    match root.read("/proc/mounts", 4 * 1024 * 1024) {
        Ok(mounts) => {
            if let Some(point) = mounts.lines().find_map(|l| {
                let mut f = l.split_whitespace();
                let (_dev, point, fstype) = (f.next()?, f.next()?, f.next()?);
                (fstype == "tracefs").then(|| point.to_owned())
            }) {
                return Fact::Known(point);
            }
            if root.is_dir("/sys/kernel/tracing/events") {
                return Fact::Known("/sys/kernel/tracing".into());
            }
            Fact::unknown("tracefs is not mounted: mount -t tracefs nodev /sys/kernel/tracing")
        }
        Err(err) => {
            if root.is_dir("/sys/kernel/tracing/events") {
                Fact::Known("/sys/kernel/tracing".into())
            } else {
                Fact::from_read_error(err)
            }
        }
    }
}

fn io_uring_live() -> Result<IoUringSupport, String> {
    let ring = io_uring::IoUring::new(8).map_err(|e| format!("io_uring_setup failed: {e}"))?;
    let mut probe = io_uring::Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|e| format!("IORING_REGISTER_PROBE failed: {e}"))?;
    let supported_opcodes = (0..=u8::MAX).filter(|op| probe.is_supported(*op)).count() as u32;
    let sqe128 =
        io_uring::IoUring::<io_uring::squeue::Entry128, io_uring::cqueue::Entry>::builder()
            .build(8)
            .map(|_| ())
            .map_err(|e| format!("io_uring_setup(IORING_SETUP_SQE128) failed: {e}"));
    Ok(IoUringSupport {
        uring_cmd: probe.is_supported(IORING_OP_URING_CMD),
        sqe128: sqe128.is_ok(),
        sqe128_error: sqe128.err(),
        supported_opcodes,
    })
}

fn iommu(root: &HostRoot) -> Iommu {
    let units = root
        .list_dir("/sys/class/iommu", 1024)
        .map(|v| v.len() as u32)
        .unwrap_or(0);
    let groups_list = root
        .list_dir("/sys/kernel/iommu_groups", 65536)
        .unwrap_or_default();
    let groups = groups_list.len() as u32;
    let cmdline = root
        .read("/proc/cmdline", CMDLINE_LIMIT)
        .map(|c| iommu_cmdline(&c))
        .unwrap_or_default();
    let mode = if units == 0 && groups == 0 {
        Fact::Known(IommuMode::Off)
    } else {
        // Group types: "identity" (passthrough), "DMA"/"DMA-FQ" (translated), "blocked".
        let types: Vec<String> = groups_list
            .iter()
            .take(256)
            .filter_map(|g| {
                root.read_attr(&format!("/sys/kernel/iommu_groups/{g}/type"))
                    .ok()
            })
            .collect();
        if types.iter().any(|t| t.starts_with("DMA")) {
            Fact::Known(IommuMode::Translated)
        } else if types.iter().any(|t| t == "identity") || cmdline.iter().any(|w| w == "iommu=pt") {
            Fact::Known(IommuMode::Passthrough)
        } else {
            Fact::unknown(format!(
                "{units} IOMMU units and {groups} groups, but no readable /sys/kernel/iommu_groups/*/type"
            ))
        }
    };
    Iommu {
        mode,
        units,
        groups,
        cmdline,
    }
}

const NOT_LIVE: &str = "skipped: --root is not / (describes the running kernel only)";

pub fn probe(root: &HostRoot) -> KernelSection {
    let live = root.is_live();
    let release = Fact::from_read(root.read_attr("/proc/sys/kernel/osrelease"));
    let btf = match root.read_bytes("/sys/kernel/btf/vmlinux", 0) {
        // A zero limit: the file exists and is readable; its size is irrelevant.
        Ok(_) => Fact::Known(true),
        Err(super::bounded::ReadError::TooLarge { .. }) => Fact::Known(true),
        Err(err) if err.is_not_found() => Fact::Known(false),
        Err(err) => Fact::from_read_error(err),
    };
    let io_uring_disabled = match root.read_attr("/proc/sys/kernel/io_uring_disabled") {
        Ok(v) => v
            .parse()
            .map(Fact::Known)
            .unwrap_or_else(|_| Fact::unknown(format!("io_uring_disabled holds {v:?}"))),
        Err(err) if err.is_not_found() => Fact::Known(0), // sysctl exists since 6.6; older: enabled.
        Err(err) => Fact::from_read_error(err),
    };
    let io_uring = if live {
        Fact::from_result(io_uring_live())
    } else {
        Fact::unknown(NOT_LIVE)
    };
    let (config_source, config) = match read_config(root, release.known().map(String::as_str)) {
        Ok((source, text)) => (
            Fact::Known(source),
            CONFIG_ITEMS
                .iter()
                .map(|i| ((*i).to_owned(), Fact::Known(config_value(&text, i))))
                .collect(),
        ),
        Err(why) => (
            Fact::unknown(why.clone()),
            CONFIG_ITEMS
                .iter()
                .map(|i| ((*i).to_owned(), Fact::unknown(why.clone())))
                .collect(),
        ),
    };
    let capabilities = if live {
        match root.read("/proc/self/status", STATUS_LIMIT) {
            Ok(status) => parse_cap_eff(&status)
                .map(Fact::Known)
                .unwrap_or_else(|| Fact::unknown("no CapEff line in /proc/self/status")),
            Err(err) => Fact::from_read_error(err),
        }
    } else {
        Fact::unknown(NOT_LIVE)
    };
    KernelSection {
        release,
        btf,
        tracefs: tracefs(root),
        io_uring_disabled,
        io_uring,
        config_source,
        config,
        iommu: iommu(root),
        bpf_hooks: match capabilities.known() {
            _ if !live => Fact::unknown(NOT_LIVE),
            Some(c) if c.cap_sys_admin || (c.cap_bpf && c.cap_perfmon) => {
                Fact::from_result(super::bpf_hooks::probe())
            }
            _ => Fact::unknown(
                "not tried: loading eBPF programs needs CAP_BPF and CAP_PERFMON (or root)",
            ),
        },
        capabilities,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_values() {
        let cfg =
            "CONFIG_PCI_P2PDMA=y\n# CONFIG_NVME_MULTIPATH is not set\nCONFIG_BLK_DEV_NVME=m\n";
        assert_eq!(config_value(cfg, "CONFIG_PCI_P2PDMA"), "y");
        assert_eq!(config_value(cfg, "CONFIG_BLK_DEV_NVME"), "m");
        assert_eq!(config_value(cfg, "CONFIG_NVME_MULTIPATH"), "n");
        assert_eq!(config_value(cfg, "CONFIG_ZONE_DEVICE"), "n");
        // A prefix of another item does not match it.
        assert_eq!(
            config_value("CONFIG_PCI_P2PDMA_X=y\n", "CONFIG_PCI_P2PDMA"),
            "n"
        );
    }

    #[test]
    fn capabilities_from_status() {
        let all = "Name:\tx\nCapEff:\t000001ffffffffff\n";
        let c = parse_cap_eff(all).unwrap();
        assert!(c.cap_bpf && c.cap_perfmon && c.cap_sys_admin);
        let none = "CapEff:\t0000000000000000\n";
        let c = parse_cap_eff(none).unwrap();
        assert!(!c.cap_bpf && !c.cap_perfmon && !c.cap_sys_admin);
        let only_admin = format!("CapEff:\t{:016x}\n", 1u64 << 21);
        let c = parse_cap_eff(&only_admin).unwrap();
        assert!(c.cap_sys_admin && !c.cap_bpf);
        assert!(parse_cap_eff("nothing").is_none());
    }

    #[test]
    fn iommu_words() {
        assert_eq!(
            iommu_cmdline("ro quiet intel_iommu=on iommu=pt console=ttyS0"),
            ["intel_iommu=on", "iommu=pt"]
        );
    }

    #[test]
    fn live_io_uring_probe_matches_the_kernel() {
        // This host (and CI) runs Linux 6.18 with io_uring enabled: URING_CMD and SQE128 exist.
        let disabled = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
            .map(|s| s.trim() == "2")
            .unwrap_or(false);
        match io_uring_live() {
            Ok(s) => {
                assert!(s.supported_opcodes > 0);
                let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
                let mut v = release
                    .trim()
                    .split(['.', '-'])
                    .map(|p| p.parse::<u32>().unwrap_or(0));
                let (major, minor) = (v.next().unwrap_or(0), v.next().unwrap_or(0));
                if (major, minor) >= (6, 0) {
                    assert!(s.uring_cmd);
                    assert!(s.sqe128, "{:?}", s.sqe128_error);
                }
            }
            Err(why) => assert!(
                disabled,
                "io_uring probe failed on an enabled kernel: {why}"
            ),
        }
    }
}
