//! PCIe topology between two devices, read from the sysfs device path
//! (`/sys/bus/pci/devices/<bdf>` → `/sys/devices/pci0000:00/0000:00:01.0/0000:01:00.0`), the way
//! `nvidia-smi topo -m` classifies it: the bridges both paths share tell whether peer-to-peer
//! traffic can stay in a switch, turns at a root port, crosses the host bridge, or crosses sockets.

use serde::Serialize;

use super::Fact;
use super::bounded::{HostRoot, ReadError};

pub const PCI_DEVICES: &str = "/sys/bus/pci/devices";

/// Where a device sits: its host bridge (`pci0000:00`) and the PCI bridges from the root port down.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciPath {
    pub host_bridge: String,
    /// Bridges from the root port down, the device itself excluded.
    pub bridges: Vec<String>,
}

/// How two PCI devices are connected, best first (`nvidia-smi topo -m` names in `code`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Link {
    /// Share a PCIe switch below the root port (PIX/PXB): P2P never reaches the CPU.
    SameSwitch,
    /// Share only a root port (a single bridge): P2P turns at the root port.
    SameRootPort,
    /// Same host bridge, different root ports (PHB): P2P goes through the root complex.
    SameHostBridge,
    /// Different host bridges in one NUMA node (NODE).
    AcrossHostBridges,
    /// Different NUMA nodes (SYS): P2P crosses the inter-socket link.
    AcrossSockets,
}

impl Link {
    pub fn code(self) -> &'static str {
        match self {
            Link::SameSwitch => "PIX",
            Link::SameRootPort => "PXB",
            Link::SameHostBridge => "PHB",
            Link::AcrossHostBridges => "NODE",
            Link::AcrossSockets => "SYS",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Link::SameSwitch => "same PCIe switch",
            Link::SameRootPort => "same root port",
            Link::SameHostBridge => "same host bridge, different root ports",
            Link::AcrossHostBridges => "different root complexes (host bridges) in one NUMA node",
            Link::AcrossSockets => "different sockets (NUMA nodes)",
        }
    }

    /// Whether the kernel's P2PDMA will map memory between the two devices without help:
    /// devices under one root port always, through a host bridge only on CPUs in the kernel's
    /// allow-list, never across host bridges or sockets.
    pub fn p2p_capable(self) -> bool {
        matches!(
            self,
            Link::SameSwitch | Link::SameRootPort | Link::SameHostBridge
        )
    }
}

fn is_bdf(s: &str) -> bool {
    let b = s.as_bytes();
    // dddd:bb:dd.f
    b.len() == 12 && b[4] == b':' && b[7] == b':' && b[10] == b'.'
}

/// Parses a resolved sysfs device path into host bridge and bridges.
pub fn parse_device_path(path: &str, bdf: &str) -> Option<PciPath> {
    let mut parts = path.trim_start_matches('/').split('/');
    // sys/devices/[platform/...]/pciDDDD:BB/...
    let mut host_bridge = None;
    for part in parts.by_ref() {
        if part.starts_with("pci") && part.contains(':') {
            host_bridge = Some(part.to_owned());
            break;
        }
    }
    let host_bridge = host_bridge?;
    let chain: Vec<String> = parts.filter(|p| is_bdf(p)).map(str::to_owned).collect();
    let (last, bridges) = chain.split_last()?;
    (last == bdf).then(|| PciPath {
        host_bridge,
        bridges: bridges.to_vec(),
    })
}

pub fn device_path(root: &HostRoot, bdf: &str) -> Result<PciPath, String> {
    let link = format!("{PCI_DEVICES}/{bdf}");
    let resolved = root
        .resolve_link(&link)
        .map_err(|e: ReadError| e.to_string())?;
    parse_device_path(&resolved, bdf)
        .ok_or_else(|| format!("{link} points to {resolved}, not a PCI device path"))
}

pub fn numa_node(root: &HostRoot, bdf: &str) -> Fact<i64> {
    match root.read_attr(&format!("{PCI_DEVICES}/{bdf}/numa_node")) {
        Ok(v) => v.parse().map(Fact::Known).unwrap_or_else(|_| {
            Fact::unknown(format!("{PCI_DEVICES}/{bdf}/numa_node is not a number"))
        }),
        Err(err) => Fact::from_read_error(err),
    }
}

pub fn classify(a: &PciPath, b: &PciPath, numa_a: Option<i64>, numa_b: Option<i64>) -> Link {
    if a.host_bridge != b.host_bridge {
        // numa_node -1 means "no NUMA information": treat as one node.
        return match (numa_a, numa_b) {
            (Some(x), Some(y)) if x >= 0 && y >= 0 && x != y => Link::AcrossSockets,
            _ => Link::AcrossHostBridges,
        };
    }
    let common = a
        .bridges
        .iter()
        .zip(&b.bridges)
        .take_while(|(x, y)| x == y)
        .count();
    match common {
        0 => Link::SameHostBridge,
        1 => Link::SameRootPort,
        _ => Link::SameSwitch,
    }
}

/// The link between two devices, or why it is unknown.
pub fn link_between(root: &HostRoot, a: &str, b: &str) -> Fact<Link> {
    let pa = match device_path(root, a) {
        Ok(p) => p,
        Err(why) => return Fact::unknown(why),
    };
    let pb = match device_path(root, b) {
        Ok(p) => p,
        Err(why) => return Fact::unknown(why),
    };
    let na = numa_node(root, a).known().copied();
    let nb = numa_node(root, b).known().copied();
    Fact::Known(classify(&pa, &pb, na, nb))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(path: &str) -> PciPath {
        let bdf = path.rsplit('/').next().unwrap();
        parse_device_path(path, bdf).unwrap()
    }

    #[test]
    fn parses_paths() {
        let path = p("/sys/devices/pci0000:00/0000:00:01.0/0000:01:00.0/0000:02:08.0/0000:03:00.0");
        assert_eq!(path.host_bridge, "pci0000:00");
        assert_eq!(
            path.bridges,
            ["0000:00:01.0", "0000:01:00.0", "0000:02:08.0"]
        );
        assert!(parse_device_path("/sys/devices/virtual/net/lo", "lo").is_none());
        assert!(
            parse_device_path("/sys/devices/pci0000:00/0000:00:01.0", "0000:00:02.0").is_none()
        );
    }

    #[test]
    fn classifies_like_nvidia_smi() {
        let gpu = p("/sys/devices/pci0000:00/0000:00:01.0/0000:01:00.0/0000:02:08.0/0000:03:00.0");
        let nvme_switch =
            p("/sys/devices/pci0000:00/0000:00:01.0/0000:01:00.0/0000:02:10.0/0000:04:00.0");
        let nvme_rp = p("/sys/devices/pci0000:00/0000:00:01.0/0000:05:00.0");
        let nvme_other_rp = p("/sys/devices/pci0000:00/0000:00:03.0/0000:06:00.0");
        let nvme_other_hb = p("/sys/devices/pci0000:80/0000:80:01.0/0000:81:00.0");
        assert_eq!(
            classify(&gpu, &nvme_switch, Some(0), Some(0)),
            Link::SameSwitch
        );
        assert_eq!(
            classify(&gpu, &nvme_rp, Some(0), Some(0)),
            Link::SameRootPort
        );
        assert_eq!(
            classify(&gpu, &nvme_other_rp, Some(0), Some(0)),
            Link::SameHostBridge
        );
        assert_eq!(
            classify(&gpu, &nvme_other_hb, Some(0), Some(0)),
            Link::AcrossHostBridges
        );
        assert_eq!(
            classify(&gpu, &nvme_other_hb, Some(0), Some(1)),
            Link::AcrossSockets
        );
        assert_eq!(
            classify(&gpu, &nvme_other_hb, Some(-1), Some(1)),
            Link::AcrossHostBridges
        );
        assert!(Link::SameHostBridge.p2p_capable());
        assert!(!Link::AcrossHostBridges.p2p_capable());
    }
}
