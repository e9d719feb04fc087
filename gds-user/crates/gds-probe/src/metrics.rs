//! The probe as Prometheus metrics: `gds_capability_info{...}` (probed once, when the collector
//! is created: GPUs, drivers and libraries do not change under a running agent) and the
//! nvidia-fs counters as `gds_nvidia_fs_*` (re-read on every scrape: one bounded read of
//! `/proc/driver/nvidia-fs/stats`, at most 1 MiB).
//!
//! Label values are bounded by design: one series per GPU, path/mode/state from small enums,
//! the kernel release of this host.

use std::collections::HashMap;
use std::path::Path;

use prometheus::core::{Collector, Desc};
use prometheus::proto::{LabelPair, Metric, MetricFamily};

use super::Fact;
use super::bounded::HostRoot;
use super::nvidia_fs::{self, EXPORTED_COUNTERS};
use super::report::Report;
use gds_api::exposition::{counter, desc, family, gauge, named_family};
use gds_api::families::{self as f, Kind, NVIDIA_FS_PREFIX};

const GPU_PREFIX: &str = "gds_nvidia_fs_gpu_";
/// Per-GPU nvidia-fs values (`GPU ... : Registered_MiB=0 Cache_MiB=0 max_pinned_MiB=1 cross_root_port(%)=0`).
const GPU_VALUES: &[&str] = &[
    "registered_mib",
    "cache_mib",
    "max_pinned_mib",
    "cross_root_port",
];

/// Collects the probe's metrics; see the module docs for the cost of a scrape.
pub struct ProbeCollector {
    root: HostRoot,
    descs: Vec<Desc>,
    /// Label sets of `gds_capability_info`, fixed at creation.
    info: Vec<Vec<(String, String)>>,
}

fn metric_name(counter: &str, monotonic: bool) -> String {
    if monotonic {
        format!("{NVIDIA_FS_PREFIX}{counter}_total")
    } else {
        format!("{NVIDIA_FS_PREFIX}{counter}")
    }
}

/// The label sets of `gds_capability_info` for a report.
pub fn info_labels(report: &Report) -> Vec<Vec<(String, String)>> {
    let nvidia_fs = if report.nvidia_fs.loaded {
        "loaded"
    } else {
        "not_loaded"
    }
    .to_owned();
    let cufile = match (&report.cufile.library, &report.cufile.version) {
        (Fact::Known(_), Fact::Known(v)) => v.split(' ').next().unwrap_or("unknown").to_owned(),
        (Fact::Known(_), Fact::Unknown(_)) => "found".to_owned(),
        (Fact::Unknown(_), _) => "missing".to_owned(),
    };
    let p2pdma = match report.kernel.config.get("CONFIG_PCI_P2PDMA") {
        Some(Fact::Known(v)) => v.clone(),
        _ => "unknown".to_owned(),
    };
    let kernel = report
        .kernel
        .release
        .known()
        .cloned()
        .unwrap_or_else(|| "unknown".into());
    let common = |gpu: String, pci: String, path: &str, mode: &str| {
        vec![
            ("gpu".to_owned(), gpu),
            ("pci".to_owned(), pci),
            ("path".to_owned(), path.to_owned()),
            ("gds_mode".to_owned(), mode.to_owned()),
            ("nvidia_fs".to_owned(), nvidia_fs.clone()),
            ("cufile".to_owned(), cufile.clone()),
            ("p2pdma".to_owned(), p2pdma.clone()),
            ("kernel".to_owned(), kernel.clone()),
        ]
    };
    if report.verdicts.is_empty() {
        return vec![common("none".into(), "none".into(), "none", "none")];
    }
    report
        .verdicts
        .iter()
        .map(|v| {
            common(
                v.gpu.to_string(),
                v.pci.clone(),
                v.path.as_str(),
                v.gds_mode.map(|m| m.as_str()).unwrap_or("none"),
            )
        })
        .collect()
}

impl ProbeCollector {
    /// Probes the host once (CUDA and NVML included on a live root) and prepares the collector.
    pub fn new(root: &Path) -> prometheus::Result<Self> {
        let root = HostRoot::new(root);
        let report = Report::collect(&root);
        let info = info_labels(&report);
        let mut descs = vec![desc(&f::CAPABILITY_INFO), desc(&f::NVIDIA_FS_UP)];
        for (name, monotonic) in EXPORTED_COUNTERS {
            descs.push(Desc::new(
                metric_name(name, *monotonic),
                format!("nvidia-fs stats counter `{name}` (/proc/driver/nvidia-fs/stats)."),
                vec![],
                HashMap::new(),
            )?);
        }
        for v in GPU_VALUES {
            descs.push(Desc::new(
                format!("{GPU_PREFIX}{v}"),
                format!("nvidia-fs per-GPU `{v}` (/proc/driver/nvidia-fs/stats)."),
                vec!["pci".into()],
                HashMap::new(),
            )?);
        }
        Ok(ProbeCollector { root, descs, info })
    }
}

/// Labels sorted by name (the info labels are built in a different order).
fn labels(pairs: &[(String, String)]) -> Vec<LabelPair> {
    let mut sorted: Vec<(&str, &str)> = pairs
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    gds_api::exposition::labels(&sorted)
}

impl Collector for ProbeCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let mut out = Vec::new();
        out.push(family(
            &f::CAPABILITY_INFO,
            self.info.iter().map(|l| gauge(labels(l), 1.0)).collect(),
        ));
        let stats = nvidia_fs::read_stats(&self.root)
            .ok()
            .filter(|s| s.stats_version.is_some() || !s.counters.is_empty());
        out.push(family(
            &f::NVIDIA_FS_UP,
            vec![gauge(vec![], if stats.is_some() { 1.0 } else { 0.0 })],
        ));
        let Some(stats) = stats else {
            return out;
        };
        for (i, (name, monotonic)) in EXPORTED_COUNTERS.iter().enumerate() {
            let Some(value) = stats.counters.get(*name) else {
                continue;
            };
            let desc = &self.descs[2 + i];
            let (metric, kind) = if *monotonic {
                (counter(vec![], *value as f64), Kind::Counter)
            } else {
                (gauge(vec![], *value as f64), Kind::Gauge)
            };
            out.push(named_family(&desc.fq_name, &desc.help, kind, vec![metric]));
        }
        for (i, v) in GPU_VALUES.iter().enumerate() {
            let metrics: Vec<Metric> = stats
                .gpus
                .iter()
                .take(256)
                .filter_map(|g| {
                    g.counters
                        .get(*v)
                        .map(|val| gauge(labels(&[("pci".into(), g.pci.clone())]), *val as f64))
                })
                .collect();
            if !metrics.is_empty() {
                let desc = &self.descs[2 + EXPORTED_COUNTERS.len() + i];
                out.push(named_family(
                    &desc.fq_name,
                    &desc.help,
                    Kind::Gauge,
                    metrics,
                ));
            }
        }
        out
    }
}

/// Registers the probe's metrics on `registry` (probing the host once, now).
pub fn register_metrics(registry: &prometheus::Registry, root: &Path) -> prometheus::Result<()> {
    registry.register(Box::new(ProbeCollector::new(root)?))
}
