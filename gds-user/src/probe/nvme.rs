//! NVMe controllers and namespaces from sysfs (`/sys/class/nvme/nvme*`).

use serde::Serialize;

use super::Fact;
use super::bounded::{HostRoot, ReadError};

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
    pub controllers: Vec<NvmeController>,
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
    let generic_device = match crate::nvme::geometry::generic_name(ns) {
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
    let ctrls = match root.list_dir(NVME_CLASS, MAX_ENTRIES) {
        Ok(c) => c,
        Err(ReadError::NotFound { .. }) => {
            return NvmeSection {
                unavailable: Some(format!(
                    "{NVME_CLASS} does not exist: no NVMe driver loaded or no NVMe controllers"
                )),
                multipath: multipath(root),
                controllers: Vec::new(),
            };
        }
        Err(err) => {
            return NvmeSection {
                unavailable: Some(err.to_string()),
                multipath: multipath(root),
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
