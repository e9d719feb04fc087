//! NVMe controllers and namespaces from sysfs (`/sys/class/nvme/nvme*`).

use serde::Serialize;

use super::Fact;
use super::bounded::{HostRoot, ReadError};
use gds_host::kmod::{ModuleInfo, Modules, Residence};

pub const NVME_CLASS: &str = "/sys/class/nvme";
/// More controllers than this on one host is not a real host; stop reading.
const MAX_ENTRIES: usize = 1024;

#[derive(Debug, Clone, Serialize)]
pub struct NvmeController {
    /// `nvme0`
    pub name: String,
    pub model: Fact<String>,
    pub firmware_rev: Fact<String>,
    /// `pcie`, `tcp`, `rdma`, `fc`, `loop`
    pub transport: Fact<String>,
    /// PCI address for `pcie` controllers.
    pub pci: Fact<String>,
    pub numa_node: Fact<i64>,
    /// I/O queues + admin queue (`queue_count`, Linux 5.17+).
    pub queue_count: Fact<u32>,
    pub namespaces: Vec<NvmeNamespace>,
}

#[derive(Debug, Clone, Serialize)]
pub struct NvmeNamespace {
    /// `nvme0n1`
    pub name: String,
    pub nsid: Fact<u32>,
    pub logical_block_size: Fact<u32>,
    pub capacity_bytes: Fact<u64>,
    /// Largest transfer the controller accepts (MDTS), from `queue/max_hw_sectors_kb`.
    pub max_transfer_kb: Fact<u32>,
    /// The NVMe generic character device (`/dev/ng0n1`) used for io_uring passthrough.
    pub generic_device: Fact<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct NvmeSection {
    /// Set when `/sys/class/nvme` cannot be listed (no NVMe driver, or unreadable).
    pub unavailable: Option<String>,
    /// `/sys/module/nvme_core/parameters/multipath` (`Y`/`N`); cuFile's P2PDMA mode needs `N`.
    pub multipath: Fact<bool>,
    /// `nvme_core` and `nvme` as sysfs shows them: built in, module (with or without BTF)
    /// or absent, with srcversion, users and parameters.
    pub modules: Vec<ModuleInfo>,
    /// How `gds-agent run` traces the NVMe layer on this host, and why.
    pub tracing: NvmeTracingPlan,
    pub controllers: Vec<NvmeController>,
}

/// What the agent will do with the NVMe layer here (the probe's prediction; the running
/// agent says what it does on `/debug/layers`).
#[derive(Debug, Clone, Serialize)]
pub struct NvmeTracingPlan {
    /// `built_in`, `module_btf`, `module_no_btf`, `absent`.
    pub mode: &'static str,
    pub why: String,
}

const NVME_MODULES: [&str; 2] = ["nvme_core", "nvme"];

fn tracing_plan(core: Residence) -> NvmeTracingPlan {
    let why = match core {
        Residence::BuiltIn => "NVMe driver built in: the agent attaches the nvme_setup_cmd/\
            nvme_complete_rq raw tracepoints at start and decodes NVMe status from vmlinux BTF"
            .to_string(),
        Residence::Module { btf: true } => "nvme_core is a module with BTF \
            (/sys/kernel/btf/nvme_core): the agent attaches while an NVMe controller is bound \
            (and lets go when none is, so the module can be unloaded) and decodes NVMe status \
            from the module's BTF"
            .to_string(),
        Residence::Module { btf: false } => "nvme_core is a module without BTF (the kernel lacks \
            CONFIG_DEBUG_INFO_BTF_MODULES): the agent traces NVMe commands and latency but \
            cannot read the NVMe status, so errors are not split by status"
            .to_string(),
        Residence::Absent => "no NVMe driver built in or loaded: the agent traces io_uring and \
            the block layer, and attaches NVMe tracing when nvme_core is loaded"
            .to_string(),
    };
    NvmeTracingPlan {
        mode: core.label(),
        why,
    }
}

const MULTIPATH: &str = "/sys/module/nvme_core/parameters/multipath";

fn multipath(root: &HostRoot) -> Fact<bool> {
    match root.read_attr(MULTIPATH) {
        Ok(v) if v == "Y" || v == "1" => Fact::Known(true),
        Ok(v) if v == "N" || v == "0" => Fact::Known(false),
        Ok(v) => Fact::unknown(format!("{MULTIPATH} holds {v:?}")),
        Err(err) if err.is_not_found() => Fact::unknown(format!(
            "{MULTIPATH} does not exist (nvme_core not loaded, or built without NVMe multipath)"
        )),
        Err(err) => Fact::from_read_error(err),
    }
}

fn attr<T: std::str::FromStr>(root: &HostRoot, path: &str) -> Fact<T> {
    match root.read_attr(path) {
        Ok(v) => v
            .parse()
            .map(Fact::Known)
            .unwrap_or_else(|_| Fact::unknown(format!("{path} holds {v:?}, not a number"))),
        Err(err) => Fact::from_read_error(err),
    }
}

fn text(root: &HostRoot, path: &str) -> Fact<String> {
    Fact::from_read(root.read_attr(path))
}

/// `nvme0n1` → true, `nvme0c0n1` (a multipath path) → true, `nvme0` / `device` → false.
fn is_namespace(ctrl: &str, entry: &str) -> bool {
    let Some(rest) = entry.strip_prefix(ctrl) else {
        return false;
    };
    let rest = rest
        .strip_prefix('c')
        .map_or(rest, |r| r.trim_start_matches(|c: char| c.is_ascii_digit()));
    rest.strip_prefix('n')
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

fn namespace(root: &HostRoot, ctrl: &str, ns: &str) -> NvmeNamespace {
    let base = format!("{NVME_CLASS}/{ctrl}/{ns}");
    let sectors: Fact<u64> = attr(root, &format!("{base}/size"));
    let capacity_bytes = match sectors {
        // sysfs `size` counts 512-byte sectors whatever the LBA size.
        Fact::Known(s) => Fact::Known(s.saturating_mul(512)),
        Fact::Unknown(why) => Fact::Unknown(why),
    };
    let generic_device = match gds_nvme::geometry::generic_name(ns) {
        Some(ng) => {
            let dev = format!("/dev/{ng}");
            let class = format!("/sys/class/nvme-generic/{ng}");
            if root.exists(&dev) {
                Fact::Known(dev)
            } else if root.exists(&class) {
                Fact::unknown(format!(
                    "{class} exists but {dev} does not (no devtmpfs node)"
                ))
            } else {
                Fact::unknown(format!(
                    "no {dev} and no {class} (NVMe generic char devices need Linux 5.13+)"
                ))
            }
        }
        None => Fact::unknown(format!("cannot derive a generic device name from {ns}")),
    };
    NvmeNamespace {
        name: ns.to_owned(),
        nsid: attr(root, &format!("{base}/nsid")),
        logical_block_size: attr(root, &format!("{base}/queue/logical_block_size")),
        capacity_bytes,
        max_transfer_kb: attr(root, &format!("{base}/queue/max_hw_sectors_kb")),
        generic_device,
    }
}

pub fn probe(root: &HostRoot) -> NvmeSection {
    let mods = Modules::new(root.root());
    let modules: Vec<ModuleInfo> = NVME_MODULES.iter().map(|m| mods.info(m)).collect();
    let tracing = tracing_plan(modules[0].residence);
    let ctrls = match root.list_dir(NVME_CLASS, MAX_ENTRIES) {
        Ok(c) => c,
        Err(ReadError::NotFound { .. }) => {
            return NvmeSection {
                unavailable: Some(format!(
                    "{NVME_CLASS} does not exist: no NVMe driver loaded or no NVMe controllers"
                )),
                multipath: multipath(root),
                modules,
                tracing,
                controllers: Vec::new(),
            };
        }
        Err(err) => {
            return NvmeSection {
                unavailable: Some(err.to_string()),
                multipath: multipath(root),
                modules,
                tracing,
                controllers: Vec::new(),
            };
        }
    };
    let mut controllers = Vec::new();
    for name in ctrls.into_iter().filter(|n| n.starts_with("nvme")) {
        let base = format!("{NVME_CLASS}/{name}");
        let transport = text(root, &format!("{base}/transport"));
        let pci = match root.resolve_link(&format!("{base}/device")) {
            Ok(path) => {
                let last = path.rsplit('/').next().unwrap_or_default().to_owned();
                if super::pci::parse_device_path(&path, &last).is_some() {
                    Fact::Known(last)
                } else {
                    Fact::unknown(format!("{base}/device points to {path}, not a PCI device"))
                }
            }
            Err(err) => Fact::from_read_error(err),
        };
        let numa_node = match pci.known() {
            Some(bdf) => super::pci::numa_node(root, bdf),
            None => attr(root, &format!("{base}/numa_node")),
        };
        let namespaces = root
            .list_dir(&base, MAX_ENTRIES)
            .unwrap_or_default()
            .into_iter()
            .filter(|e| is_namespace(&name, e))
            .map(|ns| namespace(root, &name, &ns))
            .collect();
        controllers.push(NvmeController {
            model: text(root, &format!("{base}/model")),
            firmware_rev: text(root, &format!("{base}/firmware_rev")),
            transport,
            pci,
            numa_node,
            queue_count: attr(root, &format!("{base}/queue_count")),
            namespaces,
            name,
        });
    }
    NvmeSection {
        unavailable: None,
        multipath: multipath(root),
        modules,
        tracing,
        controllers,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_names() {
        assert!(is_namespace("nvme0", "nvme0n1"));
        assert!(is_namespace("nvme0", "nvme0c0n12"));
        assert!(!is_namespace("nvme0", "nvme0"));
        assert!(!is_namespace("nvme1", "nvme10n1"));
        assert!(!is_namespace("nvme0", "device"));
        assert!(!is_namespace("nvme0", "nvme0n"));
    }
}
