//! The Prometheus model: kernel statistics decoded into metric families in one place.
//!
//! Histograms are log2 buckets of nanoseconds in the kernel; they become Prometheus histograms
//! in seconds with power-of-two bounds from 2^10 ns (1.024 µs) to 2^34 ns (17.2 s). Labels are
//! bounded by design: opcode names and drop reasons, never pids.

use std::sync::Arc;

use gds_common::{DropReason, HIST_BUCKETS};
use prometheus::{
    core::{Collector, Desc},
    proto::{self, MetricFamily, MetricType},
};

use crate::{trace::UringTracer, uring_opcode};

/// Lowest and highest log2 bound exported (2^10 ns ≈ 1 µs … 2^34 ns ≈ 17 s).
pub const MIN_BOUND_LOG2: usize = 10;
pub const MAX_BOUND_LOG2: usize = 34;

fn label(name: &str, value: &str) -> proto::LabelPair {
    let mut l = proto::LabelPair::default();
    l.set_name(name.into());
    l.set_value(value.into());
    l
}

fn family(name: &str, help: &str, kind: MetricType, metrics: Vec<proto::Metric>) -> MetricFamily {
    let mut f = MetricFamily::default();
    f.set_name(name.into());
    f.set_help(help.into());
    f.set_field_type(kind);
    f.set_metric(metrics);
    f
}

fn counter(labels: Vec<proto::LabelPair>, value: f64) -> proto::Metric {
    let mut c = proto::Counter::default();
    c.set_value(value);
    let mut m = proto::Metric::default();
    m.set_label(labels);
    m.set_counter(c);
    m
}

fn gauge(labels: Vec<proto::LabelPair>, value: f64) -> proto::Metric {
    let mut g = proto::Gauge::default();
    g.set_value(value);
    let mut m = proto::Metric::default();
    m.set_label(labels);
    m.set_gauge(g);
    m
}

/// A Prometheus histogram from kernel log2 buckets (bucket b = [2^b, 2^(b+1)) ns).
pub fn log2_histogram(
    labels: Vec<proto::LabelPair>,
    buckets: &[u64],
    sum_ns: u64,
) -> proto::Metric {
    let mut h = proto::Histogram::default();
    let mut cumulative = 0u64;
    let mut out = Vec::new();
    for (b, count) in buckets.iter().enumerate().take(HIST_BUCKETS) {
        cumulative += count;
        let upper_log2 = b + 1;
        if (MIN_BOUND_LOG2..=MAX_BOUND_LOG2).contains(&upper_log2) {
            let mut pb = proto::Bucket::default();
            pb.set_upper_bound((1u64 << upper_log2) as f64 / 1e9);
            pb.set_cumulative_count(cumulative);
            out.push(pb);
        }
    }
    let total: u64 = buckets.iter().sum();
    h.set_bucket(out);
    h.set_sample_count(total);
    h.set_sample_sum(sum_ns as f64 / 1e9);
    let mut m = proto::Metric::default();
    m.set_label(labels);
    m.set_histogram(h);
    m
}

/// Exports the io_uring tracer's statistics, read from the kernel maps at each scrape.
pub struct UringCollector {
    tracer: Arc<UringTracer>,
    descs: Vec<Desc>,
}

const URING_FAMILIES: &[(&str, &str)] = &[
    (
        "gds_uring_requests_total",
        "io_uring requests seen at submission, by opcode.",
    ),
    (
        "gds_uring_request_duration_seconds",
        "io_uring submission-to-completion latency, by opcode.",
    ),
    (
        "gds_uring_request_errors_total",
        "io_uring completions with res < 0, by opcode.",
    ),
    (
        "gds_uring_inflight_requests",
        "io_uring requests submitted and not yet completed (tracked).",
    ),
    (
        "gds_slow_requests_total",
        "io_uring requests slower than the slow threshold, by opcode.",
    ),
    (
        "gds_trace_dropped_total",
        "Traced requests or events not aggregated, by reason.",
    ),
];

impl UringCollector {
    pub fn new(tracer: Arc<UringTracer>) -> Self {
        let descs = URING_FAMILIES
            .iter()
            .map(|(n, h)| {
                Desc::new((*n).into(), (*h).into(), vec![], Default::default()).expect("valid")
            })
            .collect();
        UringCollector { tracer, descs }
    }
}

impl Collector for UringCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let snap = match self.tracer.snapshot() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("reading io_uring statistics failed: {e}");
                return Vec::new();
            }
        };
        let (mut requests, mut durations, mut errors, mut slow) = (vec![], vec![], vec![], vec![]);
        for (op, s) in snap.opcodes.iter().enumerate() {
            if s.submitted == 0 && s.timed == 0 && s.errors == 0 {
                continue;
            }
            let name = uring_opcode::name(op);
            let l = || vec![label("opcode", &name)];
            requests.push(counter(l(), s.submitted as f64));
            durations.push(log2_histogram(l(), &s.buckets, s.sum_ns));
            errors.push(counter(l(), s.errors as f64));
            slow.push(counter(l(), s.slow as f64));
        }
        let drops = DropReason::ALL
            .iter()
            .map(|r| {
                counter(
                    vec![label("reason", r.label())],
                    snap.drops[*r as usize] as f64,
                )
            })
            .collect();
        vec![
            family(
                URING_FAMILIES[0].0,
                URING_FAMILIES[0].1,
                MetricType::COUNTER,
                requests,
            ),
            family(
                URING_FAMILIES[1].0,
                URING_FAMILIES[1].1,
                MetricType::HISTOGRAM,
                durations,
            ),
            family(
                URING_FAMILIES[2].0,
                URING_FAMILIES[2].1,
                MetricType::COUNTER,
                errors,
            ),
            family(
                URING_FAMILIES[3].0,
                URING_FAMILIES[3].1,
                MetricType::GAUGE,
                vec![gauge(vec![], snap.inflight() as f64)],
            ),
            family(
                URING_FAMILIES[4].0,
                URING_FAMILIES[4].1,
                MetricType::COUNTER,
                slow,
            ),
            family(
                URING_FAMILIES[5].0,
                URING_FAMILIES[5].1,
                MetricType::COUNTER,
                drops,
            ),
        ]
        .into_iter()
        .filter(|f| !f.get_metric().is_empty())
        .collect()
    }
}

/// Stall metrics from the latest scan: `gds_stalled_requests{layer}`,
/// `gds_oldest_inflight_seconds{layer}`, `gds_stalls_total{layer,disk}`.
pub struct StallCollector {
    state: Arc<std::sync::Mutex<crate::stall::StallReport>>,
    descs: Vec<Desc>,
}

const STALL_FAMILIES: &[(&str, &str)] = &[
    (
        "gds_stalled_requests",
        "Requests in flight longer than the stall threshold now, by layer.",
    ),
    (
        "gds_oldest_inflight_seconds",
        "Age of the oldest request in flight, by layer.",
    ),
    ("gds_stalls_total", "Stalls detected, by layer and disk."),
    (
        "gds_stall_scan_duration_seconds",
        "Time the last in-flight scan took.",
    ),
];

impl StallCollector {
    pub fn new(state: Arc<std::sync::Mutex<crate::stall::StallReport>>) -> Self {
        let descs = STALL_FAMILIES
            .iter()
            .map(|(n, h)| {
                Desc::new((*n).into(), (*h).into(), vec![], Default::default()).expect("valid")
            })
            .collect();
        StallCollector { state, descs }
    }
}

impl Collector for StallCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let r = self.state.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let layer = crate::stall::Layer::Uring.label();
        let totals = r
            .totals
            .iter()
            .map(|((l, disk), n)| {
                counter(
                    vec![label("layer", l.label()), label("disk", disk)],
                    *n as f64,
                )
            })
            .collect::<Vec<_>>();
        let mut out = vec![
            family(
                STALL_FAMILIES[0].0,
                STALL_FAMILIES[0].1,
                MetricType::GAUGE,
                vec![gauge(vec![label("layer", layer)], r.active.len() as f64)],
            ),
            family(
                STALL_FAMILIES[1].0,
                STALL_FAMILIES[1].1,
                MetricType::GAUGE,
                vec![gauge(
                    vec![label("layer", layer)],
                    r.oldest_inflight_seconds,
                )],
            ),
            family(
                STALL_FAMILIES[3].0,
                STALL_FAMILIES[3].1,
                MetricType::GAUGE,
                vec![gauge(vec![], r.scan_seconds)],
            ),
        ];
        if !totals.is_empty() {
            out.push(family(
                STALL_FAMILIES[2].0,
                STALL_FAMILIES[2].1,
                MetricType::COUNTER,
                totals,
            ));
        }
        out
    }
}

/// `gds_agent_info{version,kernel} 1`.
pub fn agent_info() -> prometheus::IntGaugeVec {
    let g = prometheus::IntGaugeVec::new(
        prometheus::Opts::new("gds_agent_info", "gds agent version and kernel release."),
        &["version", "kernel"],
    )
    .expect("valid metric");
    g.with_label_values(&[env!("CARGO_PKG_VERSION"), &kernel_release()])
        .set(1);
    g
}

/// `gds_slow_events_total`: slow events that reached user space. The kernel counts every slow
/// request (`gds_slow_requests_total`); those it could not hand over are
/// `gds_trace_dropped_total{reason="ringbuf_full"}`, so the three always add up.
pub fn slow_events_received() -> prometheus::IntCounter {
    prometheus::IntCounter::new(
        "gds_slow_events_total",
        "Slow io_uring requests delivered to the agent as events (logged, listed on /debug/slow); \
         plus gds_trace_dropped_total{reason=\"ringbuf_full\"} they equal gds_slow_requests_total.",
    )
    .expect("valid metric")
}

/// `gds_agent_tracefs_available`: 1 while tracefs is mounted in the agent's mount namespace
/// (kept current by `tracefs::spawn_watch`). Tracing does not depend on it once attached; a
/// restart with `--attach classic` does.
pub fn tracefs_available() -> prometheus::IntGauge {
    prometheus::IntGauge::new(
        "gds_agent_tracefs_available",
        "1 while tracefs is mounted where the agent can see it (needed to start with --attach \
         classic and for trace_pipe; attached programs keep tracing without it).",
    )
    .expect("valid metric")
}

/// `uname -r`.
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

/// Renders a registry in the text exposition format.
pub fn render(registry: &prometheus::Registry) -> String {
    let mut buf = String::new();
    let encoder = prometheus::TextEncoder::new();
    if let Err(e) = encoder.encode_utf8(&registry.gather(), &mut buf) {
        tracing::warn!("encoding metrics failed: {e}");
    }
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_bounds_and_cumulative_counts() {
        let mut buckets = vec![0u64; HIST_BUCKETS];
        buckets[3] = 5; // 8..16 ns: below the first bound, folded into le=1.024e-6
        buckets[12] = 2; // 4..8 µs
        buckets[35] = 1; // > 17 s: only in +Inf
        let m = log2_histogram(vec![], &buckets, 1_000);
        let h = m.get_histogram();
        let b = h.get_bucket();
        assert_eq!(b.len(), MAX_BOUND_LOG2 - MIN_BOUND_LOG2 + 1);
        assert!((b[0].upper_bound() - 1.024e-6).abs() < 1e-15);
        assert_eq!(b[0].cumulative_count(), 5);
        assert_eq!(b[3].cumulative_count(), 7); // le = 2^13 ns
        assert_eq!(b.last().unwrap().cumulative_count(), 7);
        assert_eq!(h.get_sample_count(), 8);
        assert!((h.get_sample_sum() - 1e-6).abs() < 1e-15);
    }
}

/// NVMe, stage and block metrics from the per-disk maps: `gds_nvme_commands_total{disk,opcode}`,
/// `gds_nvme_command_duration_seconds{disk,opcode}`, `gds_request_stage_duration_seconds{stage,disk}`,
/// `gds_nvme_errors_total{disk,status}`, `gds_block_request_duration_seconds{disk,op}`.
pub struct DeviceCollector {
    tracer: Arc<UringTracer>,
    descs: Vec<Desc>,
}

const DEVICE_FAMILIES: &[(&str, &str)] = &[
    (
        "gds_nvme_commands_total",
        "NVMe commands completed, by disk and NVMe opcode.",
    ),
    (
        "gds_nvme_command_duration_seconds",
        "NVMe command latency (setup to completion), by disk and opcode.",
    ),
    (
        "gds_request_stage_duration_seconds",
        "io_uring passthrough latency split into stages (queue, device, completion), by disk.",
    ),
    (
        "gds_nvme_errors_total",
        "NVMe commands completed with an error status, by disk and status name.",
    ),
    (
        "gds_block_request_duration_seconds",
        "Block request latency (issue to completion), by disk and operation.",
    ),
];

impl DeviceCollector {
    pub fn new(tracer: Arc<UringTracer>) -> Self {
        let descs = DEVICE_FAMILIES
            .iter()
            .map(|(n, h)| {
                Desc::new((*n).into(), (*h).into(), vec![], Default::default()).expect("valid")
            })
            .collect();
        DeviceCollector { tracer, descs }
    }
}

impl Collector for DeviceCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        use gds_common::{
            FLAG_ADMIN, KIND_BLOCK, KIND_NVME_CMD, KIND_STAGE_COMPLETION, KIND_STAGE_DEVICE,
            KIND_STAGE_QUEUE,
        };
        let maps = self.tracer.devices();
        let snap = maps.snapshot();
        let (mut cmds, mut cmd_hist, mut stages, mut errors, mut block) =
            (vec![], vec![], vec![], vec![], vec![]);
        for (k, h) in &snap.hists {
            let disk = maps.disk_name(k.dev);
            match k.kind {
                KIND_NVME_CMD => {
                    let op = crate::trace::nvme_opcode_name(k.code, k.flags & FLAG_ADMIN != 0);
                    let l = || vec![label("disk", &disk), label("opcode", &op)];
                    cmds.push(counter(l(), h.count as f64));
                    cmd_hist.push(log2_histogram(l(), &h.buckets, h.sum_ns));
                }
                KIND_STAGE_QUEUE | KIND_STAGE_DEVICE | KIND_STAGE_COMPLETION => {
                    let stage = match k.kind {
                        KIND_STAGE_QUEUE => "queue",
                        KIND_STAGE_DEVICE => "device",
                        _ => "completion",
                    };
                    stages.push(log2_histogram(
                        vec![label("stage", stage), label("disk", &disk)],
                        &h.buckets,
                        h.sum_ns,
                    ));
                }
                KIND_BLOCK => block.push(log2_histogram(
                    vec![
                        label("disk", &disk),
                        label("op", crate::trace::block_op_name(k.code)),
                    ],
                    &h.buckets,
                    h.sum_ns,
                )),
                _ => {}
            }
        }
        // Several raw statuses can share a name (DNR/More bits are masked in the kernel).
        let mut by_name: std::collections::BTreeMap<(String, &'static str), u64> =
            Default::default();
        for (k, n) in &snap.errors {
            let name = crate::nvme::NvmeStatus(k.status).name();
            *by_name.entry((maps.disk_name(k.dev), name)).or_default() += n;
        }
        for ((disk, status), n) in by_name {
            errors.push(counter(
                vec![label("disk", &disk), label("status", status)],
                n as f64,
            ));
        }
        let kinds = [
            (MetricType::COUNTER, cmds),
            (MetricType::HISTOGRAM, cmd_hist),
            (MetricType::HISTOGRAM, stages),
            (MetricType::COUNTER, errors),
            (MetricType::HISTOGRAM, block),
        ];
        kinds
            .into_iter()
            .zip(DEVICE_FAMILIES)
            .filter(|((_, m), _)| !m.is_empty())
            .map(|((t, m), (n, h))| family(n, h, t, m))
            .collect()
    }
}
