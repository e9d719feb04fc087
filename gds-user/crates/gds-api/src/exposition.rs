//! Building Prometheus metric families (protobuf model) from a declared [`Family`] and values:
//! the one set of helpers every collector uses (agent, probe, data path).
//!
//! Histograms are log2 buckets of nanoseconds in the kernel; they become Prometheus histograms
//! in seconds with power-of-two bounds from 2^10 ns (1.024 µs) to 2^34 ns (17.2 s).

use gds_common::HIST_BUCKETS;
use prometheus::{
    core::Desc,
    proto::{self, MetricFamily, MetricType},
};

use crate::families::{Family, Kind};

/// Lowest and highest log2 bound exported (2^10 ns ≈ 1 µs … 2^34 ns ≈ 17 s).
pub const MIN_BOUND_LOG2: usize = 10;
pub const MAX_BOUND_LOG2: usize = 34;

/// The upper bounds, in seconds, of the exported histogram buckets (+Inf not included).
pub fn bucket_bounds() -> Vec<f64> {
    (MIN_BOUND_LOG2..=MAX_BOUND_LOG2)
        .map(|b| (1u64 << b) as f64 / 1e9)
        .collect()
}

/// A label set given as (name, value) pairs.
pub fn labels(pairs: &[(&str, &str)]) -> Vec<proto::LabelPair> {
    pairs
        .iter()
        .map(|(k, v)| {
            let mut l = proto::LabelPair::default();
            l.set_name((*k).into());
            l.set_value((*v).into());
            l
        })
        .collect()
}

pub fn counter(labels: Vec<proto::LabelPair>, value: f64) -> proto::Metric {
    let mut c = proto::Counter::default();
    c.set_value(value);
    let mut m = proto::Metric::default();
    m.set_label(labels);
    m.set_counter(c);
    m
}

pub fn gauge(labels: Vec<proto::LabelPair>, value: f64) -> proto::Metric {
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

fn metric_type(kind: Kind) -> MetricType {
    match kind {
        Kind::Counter => MetricType::COUNTER,
        Kind::Gauge => MetricType::GAUGE,
        Kind::Histogram => MetricType::HISTOGRAM,
    }
}

/// The family `f` with `metrics` (their label names must be `f.labels`).
pub fn family(f: &Family, metrics: Vec<proto::Metric>) -> MetricFamily {
    debug_assert!(
        metrics.iter().all(|m| {
            let mut names: Vec<&str> = m.get_label().iter().map(|l| l.name()).collect();
            let mut want = f.labels.to_vec();
            names.sort_unstable();
            want.sort_unstable();
            names == want
        }),
        "{} exported with labels other than {:?}",
        f.name,
        f.labels
    );
    named_family(f.name, f.help, f.kind, metrics)
}

/// A family whose name is made at run time (the nvidia-fs counters, a prefix family).
pub fn named_family(
    name: &str,
    help: &str,
    kind: Kind,
    metrics: Vec<proto::Metric>,
) -> MetricFamily {
    let mut mf = MetricFamily::default();
    mf.set_name(name.into());
    mf.set_help(help.into());
    mf.set_field_type(metric_type(kind));
    mf.set_metric(metrics);
    mf
}

/// The descriptor a `Collector` registers for family `f`.
pub fn desc(f: &Family) -> Desc {
    Desc::new(f.name.into(), f.help.into(), vec![], Default::default())
        .expect("declared families have valid names")
}

/// A registered metric of a declared family, for the prometheus crate's own types
/// (`IntGaugeVec`, `CounterVec`, …).
pub fn opts(f: &Family) -> prometheus::Opts {
    prometheus::Opts::new(f.name, f.help)
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
        assert_eq!(bucket_bounds().len(), b.len());
    }
}
