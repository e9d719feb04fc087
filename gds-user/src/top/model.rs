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

/// A process's cuFile activity over the interval.
#[derive(Debug, Clone, PartialEq)]
pub struct CufileProcRow {
    pub pid: u32,
    pub comm: String,
    pub calls_per_s: f64,
    /// Bytes read and written (returned by cuFileRead/cuFileWrite) per second.
    pub bytes_per_s: f64,
    /// Share of its successful reads and writes that went compat, since it started.
    pub compat_share: Option<f64>,
    /// The path most of its reads and writes took, and why compat where known.
    pub path: String,
    pub reason: String,
}

/// Everything the screen shows.
#[derive(Debug, Clone, Default)]
pub struct View {
    pub opcodes: Vec<RateRow>,
    pub disks: Vec<RateRow>,
    /// cuFile per operation (calls/s, p50/p99, errors/s) and per process.
    pub cufile_ops: Vec<RateRow>,
    pub cufile_procs: Vec<CufileProcRow>,
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

/// Rows keyed by name, from (name, count, errors, latency) of one snapshot.
fn totals<'a>(
    rows: impl Iterator<Item = (&'a String, u64, u64, &'a Histogram)>,
) -> BTreeMap<String, Totals> {
    rows.map(|(key, count, errors, latency)| {
        let t = Totals {
            count,
            errors,
            latency: latency.clone(),
        };
        (key.clone(), t)
    })
    .collect()
}

fn by_opcode(s: &Snapshot) -> BTreeMap<String, Totals> {
    totals(
        s.stats
            .opcodes
            .iter()
            .map(|o| (&o.opcode, o.submitted, o.errors, &o.latency)),
    )
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

/// Per operation, over both user shares (trusted and other).
fn by_cufile_op(s: &Snapshot) -> BTreeMap<String, Totals> {
    let mut m: BTreeMap<String, Totals> = BTreeMap::new();
    for o in &s.stats.cufile.ops {
        let t = m.entry(o.op.clone()).or_default();
        t.count += o.calls;
        t.errors += o.errors;
        add(&mut t.latency, &o.latency);
    }
    m
}

/// Per process, from the two snapshots' counters (a process new in `cur` counts from zero).
fn cufile_procs(prev: &Snapshot, cur: &Snapshot, dt: f64) -> Vec<CufileProcRow> {
    let mut rows: Vec<CufileProcRow> = cur
        .cufile
        .processes
        .iter()
        .map(|p| {
            let before = prev.cufile.processes.iter().find(|q| q.pid == p.pid);
            let c = &p.counters;
            let (calls0, bytes0) = before.map_or((0, 0), |b| {
                (
                    b.counters.calls,
                    b.counters.read_bytes + b.counters.write_bytes,
                )
            });
            let ok: u64 = c.path_calls.values().sum();
            let compat = c.path_calls.get("compat").copied().unwrap_or(0);
            CufileProcRow {
                pid: p.pid,
                comm: p.comm.clone(),
                calls_per_s: c.calls.saturating_sub(calls0) as f64 / dt,
                bytes_per_s: (c.read_bytes + c.write_bytes).saturating_sub(bytes0) as f64 / dt,
                compat_share: (ok > 0).then(|| compat as f64 / ok as f64),
                path: c.main_path().unwrap_or("-").to_owned(),
                reason: p
                    .files
                    .iter()
                    .find_map(|f| f.compat_reason.clone())
                    .unwrap_or_default(),
            }
        })
        .collect();
    rows.sort_by(|a, b| {
        b.bytes_per_s
            .total_cmp(&a.bytes_per_s)
            .then(a.pid.cmp(&b.pid))
    });
    rows
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
        let cufile_ops = rates(&by_cufile_op(prev), &by_cufile_op(cur), dt);
        let cufile_procs = cufile_procs(prev, cur, dt);
        let mut ended = cur.stalls.ended.clone();
        ended.reverse();
        View {
            total_iops: opcodes.iter().map(|r| r.iops).sum(),
            opcodes,
            disks,
            cufile_ops,
            cufile_procs,
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

    #[test]
    fn cufile_rows_per_op_and_per_process() {
        use crate::model::cufile::{CufileCounters, CufileFile, CufileProcess};
        use crate::model::stats::CufileOpRow;
        let with = |taken_ns: u64, calls: u64, bytes: u64| {
            let mut s = snapshot(taken_ns, 0, 0, 0, 0);
            let mut buckets = vec![0u64; HIST_BUCKETS];
            buckets[24] = calls;
            s.stats.cufile.ops.push(CufileOpRow {
                op: "read".into(),
                calls,
                errors: 0,
                latency: Histogram::new(&buckets, 0),
                bytes_asked: bytes,
                bytes: vec![],
            });
            let counters = CufileCounters {
                calls,
                read_calls: calls,
                read_bytes: bytes,
                path_calls: [("compat".to_owned(), calls)].into(),
                ..Default::default()
            };
            s.cufile.processes.push(CufileProcess {
                pid: 42,
                comm: "python3".into(),
                cgroup: None,
                alive: true,
                counters: counters.clone(),
                peer_ios: 0,
                outside_cufile: None,
                files: vec![CufileFile {
                    fd: 3,
                    path: "/data/x".into(),
                    counters,
                    active: 0,
                    compat_reason: Some("nvidia-fs not loaded".into()),
                }],
            });
            s
        };
        // 2 s apart: 100 more reads of 16 MiB each.
        let a = with(1_000_000_000, 10, 10 << 24);
        let b = with(3_000_000_000, 110, 110 << 24);
        let v = View::compute(&a, &b);
        assert_eq!(v.cufile_ops.len(), 1);
        assert_eq!(v.cufile_ops[0].key, "read");
        assert_eq!(v.cufile_ops[0].iops, 50.0);
        assert_eq!(v.cufile_ops[0].p99, Some((1u64 << 25) as f64 / 1e9));
        let p = &v.cufile_procs[0];
        assert_eq!((p.pid, p.calls_per_s), (42, 50.0));
        assert_eq!(p.bytes_per_s, (100u64 << 24) as f64 / 2.0);
        assert_eq!(p.compat_share, Some(1.0));
        assert_eq!(p.path, "compat");
        assert_eq!(p.reason, "nvidia-fs not loaded");
    }
}
