//! What `gds-agent top` shows, computed from two consecutive snapshots of a running agent
//! (`/debug/snapshot`, the model's own types). No drawing here.

use std::collections::BTreeMap;

use gds_api::model::{Histogram, Request, Snapshot, Stall};

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

/// A process's file calls over the interval (the file layer's per-process-and-file rows).
#[derive(Debug, Clone, PartialEq)]
pub struct FileProcRow {
    pub pid: u32,
    pub comm: String,
    pub calls_per_s: f64,
    /// Bytes returned per second.
    pub bytes_per_s: f64,
    /// Mean call time over the interval, seconds.
    pub mean: Option<f64>,
    /// The file it moved most bytes of in the interval (`inode N`: the table keys by inode).
    pub busiest: String,
}

/// Everything the screen shows.
#[derive(Debug, Clone, Default)]
pub struct View {
    pub opcodes: Vec<RateRow>,
    /// Block requests per disk (every operation), from the block layer's rows.
    pub block_disks: Vec<RateRow>,
    /// NVMe commands per disk, from the NVMe layer's rows.
    pub nvme_disks: Vec<RateRow>,
    /// cuFile per operation (calls/s, p50/p99, errors/s) and per process.
    pub cufile_ops: Vec<RateRow>,
    pub cufile_procs: Vec<CufileProcRow>,
    /// File calls per operation (`read`, `read O_DIRECT`, …) and per process.
    pub file_ops: Vec<RateRow>,
    pub file_procs: Vec<FileProcRow>,
    pub total_iops: f64,
    pub inflight_total: u64,
    pub drops: u64,
    /// Oldest first.
    pub inflight: Vec<Request>,
    pub active_stalls: Vec<Stall>,
    /// Newest first.
    pub ended_stalls: Vec<Stall>,
}

impl View {
    /// The stalls as the list shows them: active (oldest first), then ended (newest first).
    pub fn stalls(&self) -> Vec<&Stall> {
        self.active_stalls
            .iter()
            .chain(&self.ended_stalls)
            .collect()
    }
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

/// Block requests per disk, over every operation and memory kind (the block layer has no
/// error counts: its errors column stays 0).
fn by_block_disk(s: &Snapshot) -> BTreeMap<String, Totals> {
    let mut m: BTreeMap<String, Totals> = BTreeMap::new();
    for b in &s.stats.block {
        let t = m.entry(b.disk.clone()).or_default();
        t.count += b.latency.count;
        add(&mut t.latency, &b.latency);
    }
    m
}

fn by_nvme_disk(s: &Snapshot) -> BTreeMap<String, Totals> {
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

/// Per operation and O_DIRECT (`read O_DIRECT`).
fn by_file_op(s: &Snapshot) -> BTreeMap<String, Totals> {
    let mut m: BTreeMap<String, Totals> = BTreeMap::new();
    for o in &s.stats.file.ops {
        let key = if o.direct {
            format!("{} O_DIRECT", o.op)
        } else {
            o.op.clone()
        };
        let t = m.entry(key).or_default();
        t.count += o.calls;
        t.errors += o.errors;
        add(&mut t.latency, &o.latency);
    }
    m
}

/// Per process over the interval, busiest first (a row new in `cur` counts from zero).
fn file_procs(prev: &Snapshot, cur: &Snapshot, dt: f64) -> Vec<FileProcRow> {
    #[derive(Default)]
    struct Sum {
        comm: String,
        calls: u64,
        bytes: u64,
        ns: u64,
        /// (bytes, inode) of the file with the most bytes.
        busiest: (u64, u64),
    }
    let mut by_pid: BTreeMap<u32, Sum> = BTreeMap::new();
    for r in &cur.stats.file.processes {
        let before = prev.stats.file.processes.iter().find(|q| {
            (q.pid, q.dev, q.ino, &q.op, q.direct) == (r.pid, r.dev, r.ino, &r.op, r.direct)
        });
        let (calls, bytes, ns) = match before {
            Some(b) => (
                r.calls.saturating_sub(b.calls),
                r.bytes.saturating_sub(b.bytes),
                r.sum_ns.saturating_sub(b.sum_ns),
            ),
            None => (r.calls, r.bytes, r.sum_ns),
        };
        if calls == 0 {
            continue;
        }
        let e = by_pid.entry(r.pid).or_insert_with(|| Sum {
            comm: r.comm.clone(),
            ..Sum::default()
        });
        e.calls += calls;
        e.bytes += bytes;
        e.ns += ns;
        if bytes >= e.busiest.0 {
            e.busiest = (bytes, r.ino);
        }
    }
    let mut rows: Vec<FileProcRow> = by_pid
        .into_iter()
        .map(|(pid, e)| FileProcRow {
            pid,
            comm: e.comm,
            calls_per_s: e.calls as f64 / dt,
            bytes_per_s: e.bytes as f64 / dt,
            mean: (e.calls > 0).then(|| e.ns as f64 / e.calls as f64 / 1e9),
            busiest: format!("inode {}", e.busiest.1),
        })
        .collect();
    rows.sort_by(|a, b| b.bytes_per_s.total_cmp(&a.bytes_per_s));
    rows
}

/// Per process, from the two snapshots' counters (a process new in `cur` counts from zero).
/// A process missing from `prev` while `prev` left processes out (`cufile.omitted`) may have
/// been one of those: its rate is unknown, and it waits for the next interval.
fn cufile_procs(prev: &Snapshot, cur: &Snapshot, dt: f64) -> Vec<CufileProcRow> {
    let prev_cut = prev.cufile.omitted.processes > 0;
    let mut rows: Vec<CufileProcRow> = cur
        .cufile
        .processes
        .iter()
        .filter_map(|p| {
            let before = prev.cufile.processes.iter().find(|q| q.pid == p.pid);
            if before.is_none() && prev_cut {
                return None;
            }
            let c = &p.counters;
            let (calls0, bytes0) = before.map_or((0, 0), |b| {
                (
                    b.counters.calls,
                    b.counters.read_bytes + b.counters.write_bytes,
                )
            });
            let ok: u64 = c.path_calls.values().sum();
            let compat = c.path_calls.get("compat").copied().unwrap_or(0);
            Some(CufileProcRow {
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
            })
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

/// When each group of counters `top` differentiates was read, in the agent's clock.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReadAt {
    /// Per-opcode io_uring counters.
    pub uring_ns: u64,
    /// Block and NVMe histograms (per disk).
    pub devices_ns: u64,
    /// cuFile aggregates (per operation).
    pub cufile_ops_ns: u64,
    /// cuFile per-process counters.
    pub cufile_procs_ns: u64,
    /// File layer counters (per operation and per process).
    pub file_ns: u64,
}

impl ReadAt {
    /// The times `s` carries; from an agent that carried only `taken_ns`, that one for all.
    pub fn of(s: &Snapshot) -> ReadAt {
        let or_taken = |ns: u64| if ns == 0 { s.taken_ns } else { ns };
        let cufile_ops_ns = or_taken(s.stats.read_ns.cufile_ns);
        ReadAt {
            uring_ns: or_taken(s.stats.read_ns.uring_ns),
            devices_ns: or_taken(s.stats.read_ns.devices_ns),
            cufile_ops_ns,
            cufile_procs_ns: if s.cufile.read_ns == 0 {
                cufile_ops_ns
            } else {
                s.cufile.read_ns
            },
            file_ns: or_taken(s.stats.read_ns.file_ns),
        }
    }
}

/// Seconds between two reads of one group of counters (at least 1 ms: no division by zero).
fn seconds(prev_ns: u64, cur_ns: u64) -> f64 {
    (cur_ns.saturating_sub(prev_ns) as f64 / 1e9).max(1e-3)
}

impl View {
    pub fn compute(prev: &Snapshot, cur: &Snapshot) -> View {
        // The agent's own clock: how far apart the two reads of each group of counters were,
        // each group with its own (they are read one after another, and not at once).
        let (a, b) = (ReadAt::of(prev), ReadAt::of(cur));
        let opcodes = rates(
            &by_opcode(prev),
            &by_opcode(cur),
            seconds(a.uring_ns, b.uring_ns),
        );
        let devices_dt = seconds(a.devices_ns, b.devices_ns);
        let block_disks = rates(&by_block_disk(prev), &by_block_disk(cur), devices_dt);
        let nvme_disks = rates(&by_nvme_disk(prev), &by_nvme_disk(cur), devices_dt);
        let cufile_ops = rates(
            &by_cufile_op(prev),
            &by_cufile_op(cur),
            seconds(a.cufile_ops_ns, b.cufile_ops_ns),
        );
        let cufile_procs = cufile_procs(prev, cur, seconds(a.cufile_procs_ns, b.cufile_procs_ns));
        let file_dt = seconds(a.file_ns, b.file_ns);
        let file_ops = rates(&by_file_op(prev), &by_file_op(cur), file_dt);
        let file_procs = file_procs(prev, cur, file_dt);
        let mut ended = cur.stalls.ended.clone();
        ended.reverse();
        View {
            // From +0.0: the sum of no rows is -0.0 in Rust, which an idle top showed as "-0".
            total_iops: opcodes.iter().fold(0.0, |sum, r| sum + r.iops),
            opcodes,
            block_disks,
            nvme_disks,
            cufile_ops,
            cufile_procs,
            file_ops,
            file_procs,
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
    use gds_api::model::stats::{OpcodeRow, Stats};
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
            layers: gds_api::raw::Layers {
                layers: [gds_api::model::Layer::Uring, gds_api::model::Layer::Block]
                    .map(|layer| gds_api::raw::LayerEntry {
                        layer,
                        on: true,
                        why: String::new(),
                        detail: None,
                    })
                    .to_vec(),
                warnings: vec![],
            },
            cufile: Default::default(),
            omitted: Default::default(),
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
        assert!(v.block_disks.is_empty() && v.nvme_disks.is_empty());
    }

    /// Each group of counters is divided by the interval between *its* reads: the io_uring
    /// counters read 1 s apart, the cuFile ones 4 s apart, the collection's end anywhere.
    #[test]
    fn each_rate_uses_the_time_its_counters_were_read() {
        let mut a = snapshot(0, 100, 0, 100, 0);
        let mut b = snapshot(0, 1_100, 0, 1_100, 0);
        a.stats.read_ns.uring_ns = 10_000_000_000;
        b.stats.read_ns.uring_ns = 11_000_000_000;
        // `taken_ns` an unrelated 5.55 s later than the counters in `b` (the old bug).
        a.taken_ns = 10_000_000_000;
        b.taken_ns = 16_550_000_000;
        let v = View::compute(&a, &b);
        assert_eq!(v.opcodes[0].iops, 1000.0, "uring counters 1 s apart");

        use gds_api::model::stats::CufileOpRow;
        for (s, calls, ns) in [(&mut a, 10, 20_000_000_000), (&mut b, 410, 24_000_000_000)] {
            s.stats.read_ns.cufile_ns = ns;
            s.stats.cufile.ops.push(CufileOpRow {
                op: "read".into(),
                user: "trusted".into(),
                calls,
                errors: 0,
                latency: Histogram::default(),
                bytes_asked: 0,
                bytes: vec![],
            });
        }
        let v = View::compute(&a, &b);
        assert_eq!(v.opcodes[0].iops, 1000.0);
        assert_eq!(v.cufile_ops[0].iops, 100.0, "cuFile counters 4 s apart");
    }

    /// From an agent that carried only `taken_ns`, every group uses it.
    #[test]
    fn an_older_agent_s_single_time_is_used_for_all() {
        let a = snapshot(1_000_000_000, 100, 0, 100, 0);
        let b = snapshot(3_000_000_000, 300, 0, 300, 0);
        assert_eq!(b.stats.read_ns, Default::default());
        let t = ReadAt::of(&b);
        assert_eq!(
            (t.uring_ns, t.devices_ns, t.cufile_ops_ns, t.cufile_procs_ns),
            (3_000_000_000, 3_000_000_000, 3_000_000_000, 3_000_000_000)
        );
        assert_eq!(View::compute(&a, &b).opcodes[0].iops, 100.0);
    }

    /// Bug: with no io_uring request at all, the header's IOPS was the sum of no rows, -0.0.
    #[test]
    fn total_iops_of_no_rows_is_positive_zero() {
        let mut a = snapshot(0, 0, 0, 0, 0);
        a.stats.opcodes.clear();
        let v = View::compute(&a, &a);
        assert!(v.opcodes.is_empty());
        assert!(v.total_iops == 0.0 && v.total_iops.is_sign_positive());
    }

    /// Block and NVMe rows each come from their own layer's part of the snapshot, per disk:
    /// block requests over every operation and memory kind, NVMe commands with their errors.
    #[test]
    fn block_and_nvme_rows_per_disk() {
        use gds_api::model::stats::{BlockRow, NvmeErrorRow, NvmeRow};
        let with = |taken_ns: u64, n: u64| {
            let mut s = snapshot(taken_ns, 0, 0, 0, 0);
            let mut buckets = vec![0u64; HIST_BUCKETS];
            buckets[17] = n;
            let latency = Histogram::new(&buckets, 0);
            for (op, memory) in [("read", "host"), ("write", "host"), ("read", "p2pdma")] {
                s.stats.block.push(BlockRow {
                    disk: "vda".into(),
                    op: op.into(),
                    memory: memory.into(),
                    latency: latency.clone(),
                });
            }
            s.stats.nvme.push(NvmeRow {
                disk: "nvme0n1".into(),
                opcode: "read".into(),
                latency,
            });
            s.stats.nvme_errors.push(NvmeErrorRow {
                disk: "nvme0n1".into(),
                status: "LBA Out of Range".into(),
                count: n / 10,
            });
            s
        };
        // 1 s apart: 1,000 more of each row.
        let v = View::compute(&with(1_000_000_000, 1_000), &with(2_000_000_000, 2_000));
        assert_eq!(v.block_disks.len(), 1);
        let b = &v.block_disks[0];
        assert_eq!(
            (b.key.as_str(), b.iops, b.errors_per_s),
            ("vda", 3_000.0, 0.0)
        );
        assert_eq!(b.p50, Some((1u64 << 18) as f64 / 1e9));
        assert_eq!(v.nvme_disks.len(), 1);
        let n = &v.nvme_disks[0];
        assert_eq!(
            (n.key.as_str(), n.iops, n.errors_per_s),
            ("nvme0n1", 1_000.0, 100.0)
        );
        // io_uring saw none of it.
        assert!(v.opcodes.iter().all(|r| r.iops == 0.0));
    }

    #[test]
    fn quantile_of_an_idle_interval_is_none() {
        let a = snapshot(0, 5, 0, 5, 0);
        let v = View::compute(&a, &a);
        assert_eq!(v.opcodes[0].p50, None);
    }

    #[test]
    fn cufile_rows_per_op_and_per_process() {
        use gds_api::model::cufile::{CufileCounters, CufileFile, CufileProcess};
        use gds_api::model::stats::CufileOpRow;
        let with = |taken_ns: u64, calls: u64, bytes: u64| {
            let mut s = snapshot(taken_ns, 0, 0, 0, 0);
            let mut buckets = vec![0u64; HIST_BUCKETS];
            buckets[24] = calls;
            s.stats.cufile.ops.push(CufileOpRow {
                op: "read".into(),
                user: "trusted".into(),
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
                files_omitted: 0,
                user: "trusted".into(),
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

    /// Files: per operation (O_DIRECT apart) and per process over the interval, the process's
    /// busiest file by bytes; a process idle in the interval is not listed.
    #[test]
    fn file_rates_from_two_snapshots() {
        use gds_api::model::stats::{FileOpRow, FileProcessRow};
        let proc_row = |pid, ino, calls, bytes| FileProcessRow {
            pid,
            comm: format!("p{pid}"),
            dev: 1,
            ino,
            op: "read".into(),
            direct: true,
            calls,
            bytes,
            errors: 0,
            sum_ns: calls * 1_000_000,
        };
        let mut a = snapshot(1_000_000_000, 0, 0, 0, 0);
        let mut b = snapshot(3_000_000_000, 0, 0, 0, 0);
        let op_row = |calls| FileOpRow {
            op: "read".into(),
            direct: true,
            calls,
            errors: 0,
            bytes_asked: 0,
            bytes: 0,
            device_requests: 0,
            device_bytes: 0,
            latency: Histogram::new(&[0; HIST_BUCKETS], 0),
        };
        a.stats.file.ops = vec![op_row(10)];
        b.stats.file.ops = vec![op_row(30)];
        a.stats.file.processes = vec![proc_row(7, 100, 10, 10 << 20), proc_row(8, 5, 4, 4)];
        b.stats.file.processes = vec![
            proc_row(7, 100, 20, 30 << 20),
            proc_row(7, 101, 2, 1 << 20),
            proc_row(8, 5, 4, 4),
        ];
        b.stats.read_ns.file_ns = 3_000_000_000;
        a.stats.read_ns.file_ns = 1_000_000_000;
        let v = View::compute(&a, &b);
        assert_eq!(v.file_ops.len(), 1);
        assert_eq!(
            (v.file_ops[0].key.as_str(), v.file_ops[0].iops),
            ("read O_DIRECT", 10.0)
        );
        assert_eq!(v.file_procs.len(), 1, "{:?}", v.file_procs);
        let p = &v.file_procs[0];
        assert_eq!((p.pid, p.comm.as_str()), (7, "p7"));
        assert_eq!(p.calls_per_s, 6.0);
        assert_eq!(p.bytes_per_s, (21 << 20) as f64 / 2.0);
        assert_eq!(p.busiest, "inode 100");
        assert_eq!(p.mean, Some(0.001));
    }
}
