//! The data-path verdict per GPU: which path `read` will take, and for every faster path that
//! is not possible, why and what to do about it.
//!
//! Paths, fastest first:
//! - `gds`: cuFile moves NVMe data straight into GPU memory, through nvidia-fs (the GDS kernel
//!   module) or through the kernel's own PCI P2PDMA (cuFile 1.13+, CUDA 12.8+, open GPU modules).
//! - `p2p`: our own NVMe passthrough (io_uring URING_CMD on `/dev/ngXnY`) into GPU memory
//!   exported as a dma-buf (BAR1 peer memory). Needs the same kernel P2PDMA support.
//! - `bounce`: read into pinned host memory, then copy to the GPU.

use serde::Serialize;

use super::Fact;
use super::cufile::CufileSection;
use super::gpu::{Gpu, GpuSection};
use super::kernel::{IommuMode, KernelSection};
use super::nvidia_fs::NvidiaFs;
use super::nvme::NvmeSection;
use super::pci::Link;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DataPath {
    Gds,
    P2p,
    Bounce,
}

impl DataPath {
    pub fn as_str(self) -> &'static str {
        match self {
            DataPath::Gds => "gds",
            DataPath::P2p => "p2p",
            DataPath::Bounce => "bounce",
        }
    }
}

/// How cuFile reaches GPU memory on the `gds` path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GdsMode {
    NvidiaFs,
    P2pdma,
}

impl GdsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            GdsMode::NvidiaFs => "nvidia_fs",
            GdsMode::P2pdma => "p2pdma",
        }
    }
}

/// One reason a path is not possible, with the action that removes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Blocker {
    pub path: DataPath,
    /// For `gds`: which of its two modes this blocks.
    pub mode: Option<GdsMode>,
    pub reason: String,
    pub action: String,
}

/// The GPU–NVMe pair a fast path would use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NvmePeer {
    pub controller: String,
    pub pci: String,
    pub link: Link,
    pub link_code: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    pub gpu: u32,
    pub pci: String,
    pub path: DataPath,
    pub gds_mode: Option<GdsMode>,
    /// The closest NVMe controller (by PCIe topology), if any.
    pub nvme: Option<NvmePeer>,
    /// Why each faster path is not possible (empty when `path` is `gds`).
    pub blocked: Vec<Blocker>,
    /// Things that do not change the path but matter (e.g. bounce needs libcuda).
    pub notes: Vec<String>,
}

/// Everything the verdict reads.
pub struct Inputs<'a> {
    pub gpus: &'a GpuSection,
    pub nvidia_fs: &'a NvidiaFs,
    pub cufile: &'a CufileSection,
    pub nvme: &'a NvmeSection,
    pub kernel: &'a KernelSection,
    /// Link between GPU pci and each NVMe controller: (gpu pci, controller, nvme pci, link).
    pub links: &'a [(String, String, String, Fact<Link>)],
}

struct Collector {
    blockers: Vec<Blocker>,
}

impl Collector {
    fn add(
        &mut self,
        path: DataPath,
        mode: Option<GdsMode>,
        reason: impl Into<String>,
        action: impl Into<String>,
    ) {
        self.blockers.push(Blocker {
            path,
            mode,
            reason: reason.into(),
            action: action.into(),
        });
    }
}

fn config_item<'a>(kernel: &'a KernelSection, item: &str) -> Result<&'a str, String> {
    match kernel.config.get(item) {
        Some(Fact::Known(v)) => Ok(v.as_str()),
        Some(Fact::Unknown(why)) => Err(why.clone()),
        None => Err(format!("{item} was not read")),
    }
}

/// `1.15.1` ≥ (1, 13)?
fn version_at_least(version: &str, major: u32, minor: u32) -> Option<bool> {
    let mut it = version.split(['.', ' ']).map(|p| p.parse::<u32>());
    let ma = it.next()?.ok()?;
    let mi = it.next()?.ok()?;
    Some((ma, mi) >= (major, minor))
}

fn p2pdma_kernel(kernel: &KernelSection, c: &mut Collector, path: DataPath, mode: Option<GdsMode>) {
    match config_item(kernel, "CONFIG_PCI_P2PDMA") {
        Ok("y") => {}
        Ok(_) => c.add(
            path,
            mode,
            "the kernel is built without CONFIG_PCI_P2PDMA",
            "boot a kernel with CONFIG_PCI_P2PDMA=y (and CONFIG_ZONE_DEVICE=y), e.g. a distribution generic kernel 6.2+",
        ),
        Err(why) => c.add(
            path,
            mode,
            format!("unknown whether the kernel has CONFIG_PCI_P2PDMA: {why}"),
            "enable CONFIG_IKCONFIG_PROC or install /boot/config-$(uname -r) so the probe can check",
        ),
    }
}

fn best_nvme(inputs: &Inputs, gpu: &Gpu) -> (Option<NvmePeer>, Vec<String>) {
    let mut best: Option<NvmePeer> = None;
    let mut unknown = Vec::new();
    for (gpu_pci, ctrl, nvme_pci, link) in inputs.links {
        if *gpu_pci != gpu.pci {
            continue;
        }
        match link {
            Fact::Known(l) => {
                if best.as_ref().is_none_or(|b| *l < b.link) {
                    best = Some(NvmePeer {
                        controller: ctrl.clone(),
                        pci: nvme_pci.clone(),
                        link: *l,
                        link_code: l.code(),
                    });
                }
            }
            Fact::Unknown(why) => unknown.push(format!("{ctrl}: {why}")),
        }
    }
    (best, unknown)
}

/// Adds the NVMe/topology blockers for a path that needs a P2P-capable NVMe peer.
fn nvme_peer(
    inputs: &Inputs,
    gpu: &Gpu,
    peer: &Option<NvmePeer>,
    unknown: &[String],
    c: &mut Collector,
    path: DataPath,
    mode: Option<GdsMode>,
) {
    let pcie_ctrls = inputs
        .nvme
        .controllers
        .iter()
        .filter(|n| n.pci.known().is_some())
        .count();
    if pcie_ctrls == 0 {
        let reason = match &inputs.nvme.unavailable {
            Some(why) => format!("no local NVMe controller: {why}"),
            None => "no PCIe NVMe controller on this host".to_owned(),
        };
        c.add(
            path,
            mode,
            reason,
            "attach an NVMe drive (PCIe) to this host, ideally under the GPU's PCIe switch",
        );
        return;
    }
    match peer {
        Some(p) if p.link.p2p_capable() => {}
        Some(p) => c.add(
            path,
            mode,
            format!(
                "GPU {} ({}) and {} ({}) are on {} ({})",
                gpu.index,
                gpu.pci,
                p.controller,
                p.pci,
                p.link.describe(),
                p.link_code
            ),
            "place the NVMe drive under the same root complex as the GPU (same PCIe switch is best)",
        ),
        None => c.add(
            path,
            mode,
            format!("PCIe topology between the GPU and the NVMe controllers is unknown: {}", unknown.join("; ")),
            "check /sys/bus/pci/devices links (lspci -tv)",
        ),
    }
}

pub fn decide(inputs: &Inputs, gpu: &Gpu) -> Verdict {
    let (peer, unknown_links) = best_nvme(inputs, gpu);
    let mut nvfs = Collector {
        blockers: Vec::new(),
    };
    let mut p2pdma = Collector {
        blockers: Vec::new(),
    };
    let mut p2p = Collector {
        blockers: Vec::new(),
    };
    let gds_nvfs = Some(GdsMode::NvidiaFs);
    let gds_p2pdma = Some(GdsMode::P2pdma);

    // --- GDS through nvidia-fs.
    if !inputs.nvidia_fs.loaded {
        nvfs.add(
            DataPath::Gds,
            gds_nvfs,
            "nvidia-fs is not loaded",
            "modprobe nvidia-fs (install the nvidia-fs DKMS package of the GDS release)",
        );
    } else if let Fact::Unknown(why) = &inputs.nvidia_fs.version {
        nvfs.add(
            DataPath::Gds,
            gds_nvfs,
            format!("nvidia-fs is loaded but unreadable: {why}"),
            "run the probe as root; check dmesg for nvidia-fs errors",
        );
    }

    // --- cuFile, shared by both GDS modes.
    for (c, mode) in [(&mut nvfs, gds_nvfs), (&mut p2pdma, gds_p2pdma)] {
        if let Fact::Unknown(why) = &inputs.cufile.library {
            c.add(
                DataPath::Gds,
                mode,
                why.clone(),
                "install the GDS user library (apt install nvidia-gds / libcufile-<cuda version>)",
            );
        }
        if inputs.cufile.force_compat_mode_env == Some(true) {
            c.add(
                DataPath::Gds,
                mode,
                "CUFILE_FORCE_COMPAT_MODE=true forces cuFile into compat (POSIX) mode",
                "unset CUFILE_FORCE_COMPAT_MODE",
            );
        }
        if let Fact::Unknown(why) = &inputs.gpus.kernel_driver {
            c.add(
                DataPath::Gds,
                mode,
                why.clone(),
                "install and load the NVIDIA kernel driver",
            );
        }
        if matches!(inputs.kernel.iommu.mode, Fact::Known(IommuMode::Translated)) {
            c.add(
                DataPath::Gds,
                mode,
                "the IOMMU translates DMA, so GPU peer traffic is routed through the CPU (GDS requires it off or in passthrough)",
                "boot with iommu=pt (or intel_iommu=off / amd_iommu=off)",
            );
        }
        nvme_peer(inputs, gpu, &peer, &unknown_links, c, DataPath::Gds, mode);
    }

    // --- GDS through the kernel's PCI P2PDMA (cuFile 1.13+).
    if let Fact::Known(v) = &inputs.cufile.version
        && version_at_least(v, 1, 13) == Some(false)
    {
        p2pdma.add(
            DataPath::Gds,
            gds_p2pdma,
            format!("libcufile {v} predates P2PDMA mode (cuFile 1.13, CUDA 12.8)"),
            "upgrade the CUDA toolkit / GDS package to 12.8 or later",
        );
    }
    match &inputs.cufile.config {
        Fact::Known(cfg) if cfg.use_pci_p2pdma == Some(true) => {}
        Fact::Known(_) => p2pdma.add(
            DataPath::Gds,
            gds_p2pdma,
            format!(
                "properties.use_pci_p2pdma is not true in {}",
                inputs.cufile.config_path
            ),
            format!(
                "set \"use_pci_p2pdma\": true under \"properties\" in {}",
                inputs.cufile.config_path
            ),
        ),
        Fact::Unknown(why) => p2pdma.add(
            DataPath::Gds,
            gds_p2pdma,
            format!("cuFile P2PDMA mode is not configured: {why}"),
            "create /etc/cufile.json with \"properties\": { \"use_pci_p2pdma\": true }",
        ),
    }
    p2pdma_kernel(inputs.kernel, &mut p2pdma, DataPath::Gds, gds_p2pdma);
    match &inputs.gpus.kernel_driver {
        Fact::Known(d) if !d.open_kernel_module => p2pdma.add(
            DataPath::Gds,
            gds_p2pdma,
            format!(
                "NVIDIA driver {} is the proprietary kernel module; P2PDMA needs the open modules",
                d.version
            ),
            "install the open GPU kernel modules (nvidia-open, 565 or later)",
        ),
        _ => {}
    }
    match &inputs.gpus.static_bar1 {
        Fact::Known(true) => {}
        Fact::Known(false) => p2pdma.add(
            DataPath::Gds,
            gds_p2pdma,
            "the NVIDIA driver does not map BAR1 statically (RMForceStaticBar1 is not set)",
            "add `options nvidia NVreg_RegistryDwords=\"RMForceStaticBar1=1;RmForceDisableIomapWC=1;\"` to /etc/modprobe.d/nvidia-p2pdma.conf and reload the driver",
        ),
        Fact::Unknown(_) => {} // the driver itself is missing: reported above
    }

    if inputs.nvme.multipath == Fact::Known(true) {
        p2pdma.add(
            DataPath::Gds,
            gds_p2pdma,
            "NVMe multipath is enabled (nvme_core multipath=Y); P2PDMA mode does not support it",
            "add `options nvme_core multipath=N` to /etc/modprobe.d/nvme.conf, rebuild the initramfs and reboot",
        );
    }

    // --- Our NVMe passthrough into GPU memory.
    p2pdma_kernel(inputs.kernel, &mut p2p, DataPath::P2p, None);
    nvme_peer(
        inputs,
        gpu,
        &peer,
        &unknown_links,
        &mut p2p,
        DataPath::P2p,
        None,
    );
    if let Some(p) = &peer {
        let ctrl = inputs
            .nvme
            .controllers
            .iter()
            .find(|n| n.name == p.controller);
        let has_generic = ctrl.is_some_and(|n| {
            n.namespaces
                .iter()
                .any(|ns| ns.generic_device.known().is_some())
        });
        if !has_generic {
            let why = ctrl
                .and_then(|n| {
                    n.namespaces
                        .iter()
                        .find_map(|ns| ns.generic_device.unknown_ref().map(str::to_owned))
                })
                .unwrap_or_else(|| format!("{} has no namespaces", p.controller));
            p2p.add(
                DataPath::P2p,
                None,
                format!("no NVMe generic char device for {}: {why}", p.controller),
                "use Linux 5.13+ (CONFIG_BLK_DEV_NVME) so /dev/ngXnY exists",
            );
        }
    }
    match &gpu.dma_buf_supported {
        Fact::Known(true) => {}
        Fact::Known(false) => p2p.add(DataPath::P2p, None, format!("GPU {} cannot export memory as a dma-buf (CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED=0)", gpu.index), "use the open GPU kernel modules (515+) on a Turing or newer GPU"),
        Fact::Unknown(why) => p2p.add(DataPath::P2p, None, format!("unknown whether GPU {} can export a dma-buf: {why}", gpu.index), "run `gds-agent probe` on the host itself with libcuda installed"),
    }
    match &inputs.kernel.io_uring {
        Fact::Known(u) => {
            if !u.uring_cmd {
                p2p.add(
                    DataPath::P2p,
                    None,
                    "io_uring does not support IORING_OP_URING_CMD",
                    "use Linux 5.19 or later",
                );
            }
            if !u.sqe128 {
                p2p.add(
                    DataPath::P2p,
                    None,
                    format!(
                        "io_uring cannot create SQE128 rings: {}",
                        u.sqe128_error.as_deref().unwrap_or("unknown")
                    ),
                    "use Linux 5.19 or later",
                );
            }
        }
        Fact::Unknown(why) => p2p.add(
            DataPath::P2p,
            None,
            format!("io_uring support is unknown: {why}"),
            "run `gds-agent probe` on the host itself",
        ),
    }
    if let Fact::Known(2) = inputs.kernel.io_uring_disabled {
        p2p.add(
            DataPath::P2p,
            None,
            "io_uring is disabled (kernel.io_uring_disabled=2)",
            "sysctl kernel.io_uring_disabled=0",
        );
    }

    let (path, gds_mode, blocked) = if nvfs.blockers.is_empty() {
        (DataPath::Gds, gds_nvfs, Vec::new())
    } else if p2pdma.blockers.is_empty() {
        (DataPath::Gds, gds_p2pdma, Vec::new())
    } else if p2p.blockers.is_empty() {
        let mut b = nvfs.blockers;
        b.extend(p2pdma.blockers);
        (DataPath::P2p, None, b)
    } else {
        let mut b = nvfs.blockers;
        b.extend(p2pdma.blockers);
        b.extend(p2p.blockers);
        (DataPath::Bounce, None, b)
    };

    let mut notes = Vec::new();
    if let Fact::Unknown(why) = &inputs.gpus.cuda {
        notes.push(format!("every path, bounce included, needs the CUDA driver, which was not found or not probed: {why}"));
    }
    if path == DataPath::Gds
        && let Fact::Known(cfg) = &inputs.cufile.config
        && cfg.allow_compat_mode == Some(true)
    {
        notes.push(
            "allow_compat_mode is true: cuFile silently falls back to POSIX reads when GDS fails for a file"
                .into(),
        );
    }
    Verdict {
        gpu: gpu.index,
        pci: gpu.pci.clone(),
        path,
        gds_mode,
        nvme: peer,
        blocked,
        notes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        assert_eq!(version_at_least("1.15.1", 1, 13), Some(true));
        assert_eq!(version_at_least("1.9.0", 1, 13), Some(false));
        assert_eq!(
            version_at_least("2.0 (cuFileGetVersion 2000)", 1, 13),
            Some(true)
        );
        assert_eq!(version_at_least("x", 1, 13), None);
    }
}
