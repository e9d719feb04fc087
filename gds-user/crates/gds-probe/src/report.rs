//! The probe report: collection, the human-readable table, and the JSON document
//! (schema in docs/probe-schema.md; bump [`SCHEMA_VERSION`] on any incompatible change).

use std::fmt::Write as _;

use serde::Serialize;

use super::Fact;
use super::bounded::HostRoot;
use super::cufile::{self, CufileSection};
use super::gpu::{self, GpuSection};
use super::kernel::{self, KernelSection};
use super::nvidia_fs::{self, NvidiaFs};
use super::nvme::{self, NvmeSection};
use super::pci::{self, Link};
use super::verdict::{self, Verdict};

pub const SCHEMA_VERSION: u32 = 1;

/// One GPU–NVMe pair and the PCIe path between them.
#[derive(Debug, Clone, Serialize)]
pub struct TopologyEntry {
    pub gpu: u32,
    pub gpu_pci: String,
    pub nvme: String,
    pub nvme_pci: String,
    pub link: Fact<Link>,
    /// `nvidia-smi topo -m` code: PIX, PXB, PHB, NODE, SYS.
    pub code: Option<&'static str>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub schema_version: u32,
    pub root: String,
    /// True when the root is `/`: live-only facts were probed.
    pub live: bool,
    pub gpu: GpuSection,
    pub nvidia_fs: NvidiaFs,
    pub cufile: CufileSection,
    pub nvme: NvmeSection,
    pub topology: Vec<TopologyEntry>,
    pub kernel: KernelSection,
    pub verdicts: Vec<Verdict>,
}

impl Report {
    pub fn collect(root: &HostRoot) -> Report {
        let gpu = gpu::probe(root);
        let nvidia_fs = nvidia_fs::probe(root);
        let cufile = cufile::probe(root);
        let nvme = nvme::probe(root);
        let kernel = kernel::probe(root);
        let mut topology = Vec::new();
        let mut links = Vec::new();
        for g in &gpu.gpus {
            for n in &nvme.controllers {
                let Some(nvme_pci) = n.pci.known() else {
                    continue;
                };
                let link = pci::link_between(root, &g.pci, nvme_pci);
                links.push((
                    g.pci.clone(),
                    n.name.clone(),
                    nvme_pci.clone(),
                    link.clone(),
                ));
                topology.push(TopologyEntry {
                    gpu: g.index,
                    gpu_pci: g.pci.clone(),
                    nvme: n.name.clone(),
                    nvme_pci: nvme_pci.clone(),
                    code: link.known().map(|l| l.code()),
                    link,
                });
            }
        }
        let inputs = verdict::Inputs {
            gpus: &gpu,
            nvidia_fs: &nvidia_fs,
            cufile: &cufile,
            nvme: &nvme,
            kernel: &kernel,
            links: &links,
        };
        let verdicts = gpu
            .gpus
            .iter()
            .map(|g| verdict::decide(&inputs, g))
            .collect();
        Report {
            schema_version: SCHEMA_VERSION,
            root: root.root().display().to_string(),
            live: root.is_live(),
            gpu,
            nvidia_fs,
            cufile,
            nvme,
            topology,
            kernel,
            verdicts,
        }
    }

    /// The verdict for GPU `index` (CUDA ordinal on a live host).
    pub fn verdict_for_gpu(&self, index: u32) -> Option<&Verdict> {
        self.verdicts.iter().find(|v| v.gpu == index)
    }

    pub fn to_table(&self) -> String {
        let mut out = String::new();
        let o = &mut out;
        let _ = writeln!(
            o,
            "gds-agent probe (root {}{})",
            self.root,
            if self.live { ", live" } else { "" }
        );

        section(o, "GPUs");
        row(
            o,
            "NVIDIA kernel driver",
            &show(&self.gpu.kernel_driver, |d| {
                format!(
                    "{} ({})",
                    d.version,
                    if d.open_kernel_module {
                        "open kernel module"
                    } else {
                        "proprietary kernel module"
                    }
                )
            }),
        );
        row(
            o,
            "CUDA driver",
            &show(&self.gpu.cuda, |c| {
                format!("{} ({} device(s))", c.version, c.device_count)
            }),
        );
        row(o, "NVML", &show(&self.gpu.nvml, |v| format!("driver {v}")));
        row(
            o,
            "BAR1 static (RMForceStaticBar1)",
            &show(&self.gpu.static_bar1, yes_no),
        );
        if self.gpu.gpus.is_empty() {
            row(
                o,
                "GPUs",
                "none found (no NVIDIA PCI device in /sys/bus/pci/devices and none from CUDA)",
            );
        }
        for g in &self.gpu.gpus {
            let _ = writeln!(
                o,
                "  GPU {} [{}] {}",
                g.index,
                g.pci,
                show(&g.name, |n| n.clone())
            );
            row(o, "  kernel driver", &show(&g.kernel_driver, |d| d.clone()));
            row(o, "  memory", &show(&g.memory_total_bytes, |b| bytes(*b)));
            row(o, "  BAR1 total", &show(&g.bar1_total_bytes, |b| bytes(*b)));
            row(o, "  BAR1 used", &show(&g.bar1_used_bytes, |b| bytes(*b)));
            row(
                o,
                "  PCIe link",
                &show(&g.pcie, |l| {
                    format!(
                        "Gen{} x{} (max Gen{} x{})",
                        opt(l.current_gen),
                        opt(l.current_width),
                        opt(l.max_gen),
                        opt(l.max_width)
                    )
                }),
            );
            row(o, "  NUMA node", &show(&g.numa_node, |n| n.to_string()));
            row(
                o,
                "  compute capability",
                &show(&g.compute_capability, |c| c.clone()),
            );
            row(o, "  dma-buf export", &show(&g.dma_buf_supported, yes_no));
            row(
                o,
                "  GPUDirect RDMA",
                &show(&g.gpudirect_rdma_supported, yes_no),
            );
        }

        section(o, "nvidia-fs");
        row(
            o,
            "loaded",
            if self.nvidia_fs.loaded { "yes" } else { "no" },
        );
        row(o, "version", &show(&self.nvidia_fs.version, |v| v.clone()));
        row(
            o,
            "devices",
            &show(&self.nvidia_fs.device_count, |v| v.to_string()),
        );
        row(
            o,
            "stats",
            &show(&self.nvidia_fs.stats, |s| {
                format!(
                    "GDS {} / driver {} / stats ver {}; {} counters, {} GPU(s); IO stats {}{}",
                    s.gds_version.as_deref().unwrap_or("?"),
                    s.driver_version.as_deref().unwrap_or("?"),
                    s.stats_version.as_deref().unwrap_or("?"),
                    s.counters.len(),
                    s.gpus.len(),
                    match s.io_stats_enabled {
                        Some(true) => "enabled",
                        Some(false) => "disabled (modprobe nvidia-fs rw_stats_enabled=1)",
                        None => "?",
                    },
                    if s.complete {
                        ""
                    } else {
                        "; TRUNCATED (no `Ops` line)"
                    }
                )
            }),
        );
        if let Fact::Known(s) = &self.nvidia_fs.stats {
            for key in [
                "reads_n",
                "reads_err",
                "writes_n",
                "writes_err",
                "bar1_map_n",
                "bar1_map_err",
                "active_shadow_buffer_mib",
                "ops_read",
                "ops_write",
            ] {
                if let Some(v) = s.counters.get(key) {
                    row(o, &format!("  {key}"), &v.to_string());
                }
            }
        }
        row(
            o,
            "peer_distance",
            &show(&self.nvidia_fs.peer_distance, |p| {
                format!("{} GPU-peer pair(s)", p.len())
            }),
        );
        row(
            o,
            "peer_affinity",
            &show(&self.nvidia_fs.peer_affinity, |p| {
                format!("{} GPU(s)", p.len())
            }),
        );

        section(o, "cuFile");
        row(o, "library", &show(&self.cufile.library, |l| l.clone()));
        row(o, "version", &show(&self.cufile.version, |v| v.clone()));
        row(o, "config", &self.cufile.config_path);
        match &self.cufile.config {
            Fact::Known(c) => {
                row(o, "  allow_compat_mode", &optb(c.allow_compat_mode));
                row(o, "  use_poll_mode", &optb(c.use_poll_mode));
                row(o, "  poll_mode_max_size_kb", &opt(c.poll_mode_max_size_kb));
                row(o, "  max_direct_io_size_kb", &opt(c.max_direct_io_size_kb));
                row(o, "  use_pci_p2pdma", &optb(c.use_pci_p2pdma));
                row(
                    o,
                    "  gds_rdma_write_support",
                    &optb(c.gds_rdma_write_support),
                );
                row(
                    o,
                    "  rdma_dev_addr_list",
                    &if c.rdma_dev_addr_list.is_empty() {
                        "(none)".to_owned()
                    } else {
                        c.rdma_dev_addr_list.join(", ")
                    },
                );
            }
            Fact::Unknown(why) => row(o, "  settings", &format!("unknown: {why}")),
        }
        let t = &self.cufile.tracing;
        row(
            o,
            "agent tracing (these caps)",
            &show(&t.with_these_capabilities, |v| v.clone()),
        );
        row(
            o,
            "agent tracing (unit)",
            &show(&t.installed_unit, |v| v.clone()),
        );
        if let Some(force) = self.cufile.force_compat_mode_env {
            row(
                o,
                "CUFILE_FORCE_COMPAT_MODE",
                if force {
                    "true (compat mode forced)"
                } else {
                    "false"
                },
            );
        }

        section(o, "NVMe");
        if let Some(why) = &self.nvme.unavailable {
            row(o, "controllers", &format!("none: {why}"));
        } else if self.nvme.controllers.is_empty() {
            row(o, "controllers", "none");
        }
        row(
            o,
            "multipath (nvme_core)",
            &show(&self.nvme.multipath, yes_no),
        );
        for m in &self.nvme.modules {
            let mut facts = vec![m.residence.describe().to_string()];
            if let Some(v) = &m.version {
                facts.push(format!("version {v}"));
            }
            if let Some(v) = &m.srcversion {
                facts.push(format!("srcversion {v}"));
            }
            if let Some(n) = m.refcnt {
                facts.push(format!("{n} user(s)"));
            }
            if !m.parameters.is_empty() {
                let params: Vec<String> = m
                    .parameters
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                facts.push(params.join(" "));
            }
            row(o, &format!("module {}", m.name), &facts.join(", "));
        }
        row(
            o,
            "NVMe tracing",
            &format!("{}: {}", self.nvme.tracing.mode, self.nvme.tracing.why),
        );
        for c in &self.nvme.controllers {
            let _ = writeln!(o, "  {} {}", c.name, show(&c.model, |m| m.clone()));
            row(o, "  firmware", &show(&c.firmware_rev, |f| f.clone()));
            row(o, "  transport", &show(&c.transport, |t| t.clone()));
            row(o, "  PCI", &show(&c.pci, |p| p.clone()));
            row(o, "  NUMA node", &show(&c.numa_node, |n| n.to_string()));
            row(o, "  queues", &show(&c.queue_count, |q| q.to_string()));
            for ns in &c.namespaces {
                row(
                    o,
                    &format!("  {}", ns.name),
                    &format!(
                        "{}, LBA {}, MDTS {}, generic {}",
                        show(&ns.capacity_bytes, |b| bytes(*b)),
                        show(&ns.logical_block_size, |b| format!("{b} B")),
                        show(&ns.max_transfer_kb, |k| format!("{k} KiB")),
                        show(&ns.generic_device, |g| g.clone())
                    ),
                );
            }
        }

        section(o, "PCIe topology (GPU to NVMe)");
        if self.topology.is_empty() {
            row(
                o,
                "pairs",
                "none (needs at least one GPU and one PCIe NVMe controller)",
            );
        }
        for t in &self.topology {
            row(
                o,
                &format!("GPU {} - {}", t.gpu, t.nvme),
                &show(&t.link, |l| format!("{} ({})", l.code(), l.describe())),
            );
        }

        section(o, "Kernel");
        let k = &self.kernel;
        row(o, "release", &show(&k.release, |r| r.clone()));
        row(
            o,
            "BTF",
            &show(&k.btf, |b| {
                if *b {
                    "/sys/kernel/btf/vmlinux".into()
                } else {
                    "no".into()
                }
            }),
        );
        row(o, "tracefs", &show(&k.tracefs, |t| t.clone()));
        row(
            o,
            "io_uring_disabled",
            &show(&k.io_uring_disabled, |d| d.to_string()),
        );
        row(
            o,
            "io_uring",
            &show(&k.io_uring, |u| {
                format!(
                    "{} opcodes; URING_CMD {}; SQE128 {}",
                    u.supported_opcodes,
                    if u.uring_cmd { "yes" } else { "no" },
                    if u.sqe128 {
                        "yes".to_owned()
                    } else {
                        format!("no ({})", u.sqe128_error.as_deref().unwrap_or("?"))
                    }
                )
            }),
        );
        row(o, "config source", &show(&k.config_source, |s| s.clone()));
        for (item, value) in &k.config {
            if k.config_source.known().is_some() {
                row(o, &format!("  {item}"), &show(value, |v| v.clone()));
            }
        }
        row(
            o,
            "IOMMU",
            &format!(
                "{} ({} unit(s), {} group(s){})",
                show(&k.iommu.mode, |m| format!("{m:?}").to_lowercase()),
                k.iommu.units,
                k.iommu.groups,
                if k.iommu.cmdline.is_empty() {
                    String::new()
                } else {
                    format!(", cmdline {}", k.iommu.cmdline.join(" "))
                }
            ),
        );
        row(
            o,
            "capabilities",
            &show(&k.capabilities, |c| {
                format!(
                    "CAP_BPF {}, CAP_PERFMON {}, CAP_SYS_ADMIN {} (CapEff {})",
                    yes_no(&c.cap_bpf),
                    yes_no(&c.cap_perfmon),
                    yes_no(&c.cap_sys_admin),
                    c.cap_eff
                )
            }),
        );
        row(
            o,
            "eBPF programs",
            &show(&k.bpf_hooks, |h| {
                format!(
                    "BTF tracepoint {}, raw tracepoint {}, fentry {}, fexit {}",
                    h.btf_tracepoint, h.raw_tracepoint, h.fentry, h.fexit
                )
            }),
        );
        row(
            o,
            "file layer",
            &show(&k.bpf_hooks, |h| h.file_hooks.clone()),
        );

        section(o, "Verdict");
        if self.verdicts.is_empty() {
            row(o, "data path", "none: no GPU found");
        }
        for v in &self.verdicts {
            let _ = writeln!(
                o,
                "  GPU {} [{}]: {}{}{}",
                v.gpu,
                v.pci,
                v.path.as_str(),
                v.gds_mode
                    .map(|m| format!(" via {}", m.as_str()))
                    .unwrap_or_default(),
                v.nvme
                    .as_ref()
                    .map(|n| format!(" (closest NVMe {}: {})", n.controller, n.link_code))
                    .unwrap_or_default()
            );
            for b in &v.blocked {
                let path = match b.mode {
                    Some(m) => format!("{} via {}", b.path.as_str(), m.as_str()),
                    None => b.path.as_str().to_owned(),
                };
                let _ = writeln!(o, "    - not {path}: {}", b.reason);
                let _ = writeln!(o, "        action: {}", b.action);
            }
            for n in &v.notes {
                let _ = writeln!(o, "    note: {n}");
            }
        }
        out
    }
}

fn section(o: &mut String, name: &str) {
    let _ = writeln!(o, "\n{name}");
}

fn row(o: &mut String, key: &str, value: &str) {
    let _ = writeln!(o, "  {key:<32} {value}");
}

fn show<T>(fact: &Fact<T>, f: impl FnOnce(&T) -> String) -> String {
    match fact {
        Fact::Known(v) => f(v),
        Fact::Unknown(why) => format!("unknown: {why}"),
    }
}

fn yes_no(b: &bool) -> String {
    if *b { "yes".into() } else { "no".into() }
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "?".into())
}

fn optb(v: Option<bool>) -> String {
    v.map(|v| v.to_string())
        .unwrap_or_else(|| "(not set: cuFile default)".into())
}

/// 137438953472 → "128 GiB".
pub fn bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    if v.fract() == 0.0 {
        format!("{v:.0} {}", UNITS[i])
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_units() {
        assert_eq!(bytes(128 << 30), "128 GiB");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(0), "0 B");
    }
}
