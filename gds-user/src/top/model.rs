//! What `gds-agent top` shows, computed from two consecutive reads of a running agent
//! (`/metrics`, `/debug/inflight`, `/debug/stalls`). No drawing here.

use std::{collections::BTreeMap, time::Instant};

use serde::Deserialize;

/// One sample line of the text exposition: name, labels, value.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Parses the Prometheus text format (the subset the agent writes: no timestamps, no
/// escaped quotes in label values since labels are opcode/disk/reason names).
pub fn parse_metrics(text: &str) -> Vec<Series> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let Some((key, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = match key.split_once('{') {
            Some((n, rest)) => {
                let mut labels = BTreeMap::new();
                for pair in rest
                    .trim_end_matches('}')
                    .split(',')
                    .filter(|p| !p.is_empty())
                {
                    if let Some((k, v)) = pair.split_once('=') {
                        labels.insert(k.to_owned(), v.trim_matches('"').to_owned());
                    }
                }
                (n.to_owned(), labels)
            }
            None => (key.to_owned(), BTreeMap::new()),
        };
        out.push(Series {
            name,
            labels,
            value,
        });
    }
    out
}

/// One row of `/debug/inflight`.
#[derive(Debug, Clone, Deserialize)]
pub struct InflightRow {
    pub pid: u32,
    pub comm: String,
    pub opcode: String,
    pub user_data: u64,
    pub age_seconds: f64,
    #[serde(default)]
    pub stage: String,
}

/// One stall of `/debug/stalls`.
#[derive(Debug, Clone, Deserialize)]
pub struct StallRow {
    pub pid: u32,
    pub comm: String,
    pub opcode: String,
    pub user_data: u64,
    pub disk: String,
    pub stage: String,
    pub age_seconds: f64,
    pub total_seconds: Option<f64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct StallsView {
    pub active: Vec<StallRow>,
    pub ended: Vec<StallRow>,
}

/// One read of the agent.
#[derive(Debug, Clone)]
pub struct Sample {
    pub at: Instant,
    pub series: Vec<Series>,
    pub inflight: Vec<InflightRow>,
    pub stalls: StallsView,
}

/// A row of the per-opcode (or per-disk) rate table.
#[derive(Debug, Clone, PartialEq)]
pub struct RateRow {
    pub key: String,
    pub iops: f64,
    /// Quantiles over the interval, in seconds (None: no completions in the interval).
    pub p50: Option<f64>,
    pub p99: Option<f64>,
    pub errors_per_s: f64,
}

/// Everything the screen shows.
#[derive(Debug, Clone, Default)]
pub struct View {
    pub opcodes: Vec<RateRow>,
    pub disks: Vec<RateRow>,
    pub total_iops: f64,
    pub inflight_total: f64,
    pub drops: f64,
    pub inflight: Vec<InflightRow>,
    pub active_stalls: Vec<StallRow>,
    pub ended_stalls: Vec<StallRow>,
}

fn sum_by(series: &[Series], name: &str, key: &str) -> BTreeMap<String, f64> {
    let mut m = BTreeMap::new();
    for s in series.iter().filter(|s| s.name == name) {
        if let Some(k) = s.labels.get(key) {
            *m.entry(k.clone()).or_default() += s.value;
        }
    }
    m
}

/// Cumulative buckets (le → count) of histogram `name` for label `key` = `value`.
fn buckets(series: &[Series], name: &str, key: &str, value: &str) -> Vec<(f64, f64)> {
    let bucket = format!("{name}_bucket");
    let mut b: Vec<(f64, f64)> = series
        .iter()
        .filter(|s| s.name == bucket && s.labels.get(key).map(String::as_str) == Some(value))
        .filter_map(|s| {
            let le = s.labels.get("le")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, s.value))
        })
        .collect();
    b.sort_by(|a, c| a.0.total_cmp(&c.0));
    b
}

/// Quantile `q` of the observations between two cumulative bucket lists (upper bound of the
/// bucket that holds it: the honest answer for log2 buckets).
pub fn quantile(prev: &[(f64, f64)], cur: &[(f64, f64)], q: f64) -> Option<f64> {
    let delta: Vec<(f64, f64)> = cur
        .iter()
        .map(|(le, c)| {
            let p = prev
                .iter()
                .find(|(l, _)| l == le)
                .map(|(_, v)| *v)
                .unwrap_or(0.0);
            (*le, (c - p).max(0.0))
        })
        .collect();
    let total = delta.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    delta.iter().find(|(_, c)| *c >= rank).map(|(le, _)| *le)
}

fn rates(
    prev: &Sample,
    cur: &Sample,
    counter: &str,
    hist: &str,
    errors: &str,
    key: &str,
) -> Vec<RateRow> {
    let dt = cur.at.duration_since(prev.at).as_secs_f64().max(1e-3);
    let (p, c) = (
        sum_by(&prev.series, counter, key),
        sum_by(&cur.series, counter, key),
    );
    let (pe, ce) = (
        sum_by(&prev.series, errors, key),
        sum_by(&cur.series, errors, key),
    );
    let mut rows: Vec<RateRow> = c
        .iter()
        .map(|(k, v)| {
            let (pb, cb) = (
                buckets(&prev.series, hist, key, k),
                buckets(&cur.series, hist, key, k),
            );
            RateRow {
                key: k.clone(),
                iops: (v - p.get(k).copied().unwrap_or(0.0)).max(0.0) / dt,
                p50: quantile(&pb, &cb, 0.5),
                p99: quantile(&pb, &cb, 0.99),
                errors_per_s: (ce.get(k).copied().unwrap_or(0.0)
                    - pe.get(k).copied().unwrap_or(0.0))
                .max(0.0)
                    / dt,
            }
        })
        .collect();
    rows.sort_by(|a, b| b.iops.total_cmp(&a.iops).then(a.key.cmp(&b.key)));
    rows
}

fn scalar(series: &[Series], name: &str) -> f64 {
    series
        .iter()
        .filter(|s| s.name == name)
        .map(|s| s.value)
        .sum()
}

impl View {
    pub fn compute(prev: &Sample, cur: &Sample) -> View {
        let opcodes = rates(
            prev,
            cur,
            "gds_uring_requests_total",
            "gds_uring_request_duration_seconds",
            "gds_uring_request_errors_total",
            "opcode",
        );
        let disks = rates(
            prev,
            cur,
            "gds_nvme_commands_total",
            "gds_nvme_command_duration_seconds",
            "gds_nvme_errors_total",
            "disk",
        );
        let mut inflight = cur.inflight.clone();
        inflight.sort_by(|a, b| b.age_seconds.total_cmp(&a.age_seconds));
        let mut ended = cur.stalls.ended.clone();
        ended.reverse();
        View {
            total_iops: opcodes.iter().map(|r| r.iops).sum(),
            opcodes,
            disks,
            inflight_total: scalar(&cur.series, "gds_uring_inflight_requests"),
            drops: scalar(&cur.series, "gds_trace_dropped_total"),
            inflight,
            active_stalls: cur.stalls.active.clone(),
            ended_stalls: ended,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(text: &str, at: Instant) -> Sample {
        Sample {
            at,
            series: parse_metrics(text),
            inflight: vec![],
            stalls: Default::default(),
        }
    }

    #[test]
    fn rates_and_quantiles_from_two_scrapes() {
        let t0 = Instant::now();
        let a = sample(
            "gds_uring_requests_total{opcode=\"READ\"} 100\n\
             gds_uring_request_duration_seconds_bucket{opcode=\"READ\",le=\"0.001\"} 100\n\
             gds_uring_request_duration_seconds_bucket{opcode=\"READ\",le=\"0.002\"} 100\n\
             gds_uring_request_duration_seconds_bucket{opcode=\"READ\",le=\"+Inf\"} 100\n",
            t0,
        );
        let b = sample(
            "# HELP x\ngds_uring_requests_total{opcode=\"READ\"} 300\n\
             gds_uring_request_duration_seconds_bucket{opcode=\"READ\",le=\"0.001\"} 150\n\
             gds_uring_request_duration_seconds_bucket{opcode=\"READ\",le=\"0.002\"} 299\n\
             gds_uring_request_duration_seconds_bucket{opcode=\"READ\",le=\"+Inf\"} 300\n\
             gds_uring_request_errors_total{opcode=\"READ\"} 4\n",
            t0 + std::time::Duration::from_secs(2),
        );
        let v = View::compute(&a, &b);
        assert_eq!(v.opcodes.len(), 1);
        let r = &v.opcodes[0];
        assert_eq!(
            (r.key.as_str(), r.iops, r.errors_per_s),
            ("READ", 100.0, 2.0)
        );
        assert_eq!(r.p50, Some(0.002)); // 50 of 200 in the first bucket: median in the second
        assert_eq!(r.p99, Some(0.002));
        assert!(v.disks.is_empty());
    }

    #[test]
    fn quantile_of_an_idle_interval_is_none() {
        let b = vec![(0.001, 5.0), (f64::INFINITY, 5.0)];
        assert_eq!(quantile(&b, &b, 0.5), None);
    }
}
