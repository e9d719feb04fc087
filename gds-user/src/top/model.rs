//! What `gds-agent top` shows, computed from two consecutive snapshots of a running agent
//! (`/debug/snapshot`, the model's own types). No drawing here.

use std::collections::BTreeMap;

use crate::model::{Histogram, Request, Snapshot, Stall};

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
    pub inflight_total: u64,
    pub drops: u64,
    /// Oldest first.
    pub inflight: Vec<Request>,
    pub active_stalls: Vec<Stall>,
    /// Newest first.
    pub ended_stalls: Vec<Stall>,
}

/// Counts, errors and latency of one row key in one snapshot.
#[derive(Default)]
struct Totals {
    count: u64,
    errors: u64,
    latency: Histogram,
}

fn add(h: &mut Histogram, other: &Histogram) {
    if h.buckets.len() < other.buckets.len() {
        h.buckets.resize(other.buckets.len(), 0);
    }
    for (a, b) in h.buckets.iter_mut().zip(&other.buckets) {
        *a += b;
    }
    h.count += other.count;
    h.sum_ns += other.sum_ns;
}

fn by_opcode(s: &Snapshot) -> BTreeMap<String, Totals> {
    s.stats
        .opcodes
        .iter()
        .map(|o| {
            let t = Totals {
                count: o.submitted,
                errors: o.errors,
                latency: o.latency.clone(),
            };
            (o.opcode.clone(), t)
        })
        .collect()
}

fn by_disk(s: &Snapshot) -> BTreeMap<String, Totals> {
    let mut m: BTreeMap<String, Totals> = BTreeMap::new();
    for n in &s.stats.nvme {
        let t = m.entry(n.disk.clone()).or_default();
        t.count += n.latency.count;
        add(&mut t.latency, &n.latency);
    }
    for e in &s.stats.nvme_errors {
        m.entry(e.disk.clone()).or_default().errors += e.count;
    }
    m
}

fn rates(prev: &BTreeMap<String, Totals>, cur: &BTreeMap<String, Totals>, dt: f64) -> Vec<RateRow> {
    let mut rows: Vec<RateRow> = cur
        .iter()
        .map(|(k, c)| {
            let p = prev.get(k);
            RateRow {
                key: k.clone(),
                iops: c.count.saturating_sub(p.map_or(0, |p| p.count)) as f64 / dt,
                p50: c.latency.quantile_since(p.map(|p| &p.latency), 0.5),
                p99: c.latency.quantile_since(p.map(|p| &p.latency), 0.99),
                errors_per_s: c.errors.saturating_sub(p.map_or(0, |p| p.errors)) as f64 / dt,
            }
        })
        .collect();
    rows.sort_by(|a, b| b.iops.total_cmp(&a.iops).then(a.key.cmp(&b.key)));
    rows
}

impl View {
    pub fn compute(prev: &Snapshot, cur: &Snapshot) -> View {
        // The agent's own clock: how far apart the two reads of the kernel's maps were.
        let dt = (cur.taken_ns.saturating_sub(prev.taken_ns) as f64 / 1e9).max(1e-3);
        let opcodes = rates(&by_opcode(prev), &by_opcode(cur), dt);
        let disks = rates(&by_disk(prev), &by_disk(cur), dt);
        let mut ended = cur.stalls.ended.clone();
        ended.reverse();
        View {
            total_iops: opcodes.iter().map(|r| r.iops).sum(),
            opcodes,
            disks,
            inflight_total: cur.stats.inflight,
            drops: cur.stats.dropped(),
            inflight: cur.inflight.clone(),
            active_stalls: cur.stalls.active.clone(),
            ended_stalls: ended,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::stats::{OpcodeRow, Stats};
    use gds_common::HIST_BUCKETS;

    fn snapshot(taken_ns: u64, submitted: u64, errors: u64, b19: u64, b20: u64) -> Snapshot {
        let mut buckets = vec![0u64; HIST_BUCKETS];
        buckets[19] = b19;
        buckets[20] = b20;
        Snapshot {
            version: "t".into(),
            kernel: "t".into(),
            taken_ns,
            stats: Stats {
                opcodes: vec![OpcodeRow {
                    opcode: "READ".into(),
                    submitted,
                    errors,
                    slow: 0,
                    latency: Histogram::new(&buckets, 0),
                }],
                ..Default::default()
            },
            inflight: vec![],
            inflight_total: 0,
            stalls: Default::default(),
            slow: vec![],
            layers: crate::trace::Layers {
                io_uring: crate::trace::LayerMode {
                    on: true,
                    why: String::new(),
                },
                block: crate::trace::LayerMode {
                    on: true,
                    why: String::new(),
                },
                nvme: crate::trace::NvmeLayer {
                    residence: crate::kmod::Residence::Absent,
                    attached: false,
                    status_decoded: false,
                    why: String::new(),
                },
                cufile: Default::default(),
            },
            cufile: Default::default(),
        }
    }

    #[test]
    fn rates_and_quantiles_from_two_snapshots() {
        // 100 → 300 requests in 2 s; of the 200 new latencies 50 are in the first bucket.
        let a = snapshot(1_000_000_000, 100, 0, 100, 0);
        let b = snapshot(3_000_000_000, 300, 4, 150, 149);
        let v = View::compute(&a, &b);
        assert_eq!(v.opcodes.len(), 1);
        let r = &v.opcodes[0];
        assert_eq!(
            (r.key.as_str(), r.iops, r.errors_per_s),
            ("READ", 100.0, 2.0)
        );
        let second_bucket = Some((1u64 << 21) as f64 / 1e9);
        assert_eq!(r.p50, second_bucket); // median in the second bucket
        assert_eq!(r.p99, second_bucket);
        assert!(v.disks.is_empty());
    }

    #[test]
    fn quantile_of_an_idle_interval_is_none() {
        let a = snapshot(0, 5, 0, 5, 0);
        let v = View::compute(&a, &a);
        assert_eq!(v.opcodes[0].p50, None);
    }
}
