//! The kernel's aggregates, decoded once per read into named rows: what `/metrics` exports and
//! what `top` computes rates from (through `/debug/snapshot`).

use gds_common::{DropReason, FLAG_ADMIN, FLAG_P2PDMA, HIST_BUCKETS, KIND_BLOCK, KIND_NVME_CMD};
use serde::{Deserialize, Serialize};

use gds_common::cufile::{CUFILE_OPS, CUFILE_PATHS, CufileCount, USER_OTHER, USER_TRUSTED};

use super::{labels, request::Stage};
use crate::raw::{CufileRaw, Source};
use gds_host::clock::{monotonic_ns, thread_cpu_ns};

/// A latency histogram: log2 buckets of nanoseconds (bucket b counts [2^b, 2^(b+1)) ns).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    pub buckets: Vec<u64>,
    pub count: u64,
    pub sum_ns: u64,
}

impl Histogram {
    pub fn new(buckets: &[u64], sum_ns: u64) -> Histogram {
        Histogram {
            buckets: buckets.to_vec(),
            count: buckets.iter().sum(),
            sum_ns,
        }
    }

    /// Quantile `q` of the observations added between `prev` and `self`, as the upper
    /// bound of the log2 bucket that holds it (the honest answer for log2 buckets), in
    /// seconds; `None` when nothing was observed in between.
    pub fn quantile_since(&self, prev: Option<&Histogram>, q: f64) -> Option<f64> {
        let delta: Vec<u64> = self
            .buckets
            .iter()
            .enumerate()
            .map(|(i, c)| {
                c.saturating_sub(prev.and_then(|p| p.buckets.get(i)).copied().unwrap_or(0))
            })
            .collect();
        let total: u64 = delta.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = q * total as f64;
        let mut cumulative = 0u64;
        for (b, c) in delta.iter().enumerate() {
            cumulative += c;
            if cumulative as f64 >= rank {
                return Some((1u64 << (b + 1).min(63)) as f64 / 1e9);
            }
        }
        None
    }
}

/// One io_uring opcode's counters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OpcodeRow {
    pub opcode: String,
    pub submitted: u64,
    pub errors: u64,
    pub slow: u64,
    pub latency: Histogram,
}

/// NVMe commands of one opcode on one disk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NvmeRow {
    pub disk: String,
    pub opcode: String,
    pub latency: Histogram,
}

/// One stage of passthrough requests on one disk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageRow {
    pub disk: String,
    pub stage: Stage,
    /// What the requests came from: `uring_cmd` (passthrough), `syscall`, `uring`, `kernel`
    /// (`labels::origin`).
    #[serde(default)]
    pub origin: String,
    pub latency: Histogram,
}

/// Block requests of one operation on one disk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BlockRow {
    pub disk: String,
    pub op: String,
    /// `host`, `p2pdma` (peer memory) or `unknown` (`labels::block_memory`).
    #[serde(default)]
    pub memory: String,
    pub latency: Histogram,
}

/// Block requests of one submitting process, by op, origin and link (`call`: to an O_DIRECT
/// file call; `page`: to a file's page cache; `none`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BlockProcessRow {
    pub pid: u32,
    pub comm: String,
    pub op: String,
    pub origin: String,
    pub link: String,
    pub requests: u64,
    pub bytes: u64,
}

/// NVMe completions with one error status on one disk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NvmeErrorRow {
    pub disk: String,
    pub status: String,
    pub count: u64,
}

/// Traced events not aggregated, by reason.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DropRow {
    pub reason: String,
    pub count: u64,
}

/// One cuFile operation's counters, over every process of one user share.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CufileOpRow {
    pub op: String,
    /// `trusted` (root and `--cufile-users`) or `other`: see `labels::CUFILE_USERS`.
    #[serde(default = "trusted")]
    pub user: String,
    pub calls: u64,
    pub errors: u64,
    pub latency: Histogram,
    pub bytes_asked: u64,
    /// Bytes returned as done, by path (read and write only; every path listed).
    pub bytes: Vec<PathCount>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PathCount {
    pub path: String,
    pub bytes: u64,
    pub calls: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CufileErrorRow {
    pub op: String,
    #[serde(default = "trusted")]
    pub user: String,
    pub error: String,
    pub count: u64,
}

/// Rows from agents before the user split were all of every user; named trusted, as the
/// alerts then read them.
fn trusted() -> String {
    labels::CUFILE_USERS[USER_TRUSTED].to_owned()
}

/// The cuFile aggregates (part of [`super::Stats`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CufileStats {
    /// Operations with any call, in operation order, trusted users' first.
    pub ops: Vec<CufileOpRow>,
    pub errors: Vec<CufileErrorRow>,
    /// libcufile files attached now.
    pub libraries: usize,
    /// Libc calls beneath cuFile, by link (`linked`, `unlinked`, `nvfs_ioctl`) and nested
    /// calls (`nested`).
    pub beneath: Vec<(String, u64)>,
}

impl CufileStats {
    /// Names `raw`; `libraries` is the number of copies attached. Drops go to `drops`.
    pub fn decode(raw: &CufileRaw, libraries: usize, drops: &mut Vec<DropRow>) -> CufileStats {
        let mut out = CufileStats {
            libraries,
            ..Default::default()
        };
        for (entry, s) in raw.ops.iter().enumerate() {
            if s.calls == 0 {
                continue;
            }
            let (op, user) = (entry % CUFILE_OPS, entry / CUFILE_OPS);
            out.ops.push(CufileOpRow {
                op: labels::cufile_op(op as u32).to_owned(),
                user: labels::cufile_user(user).to_owned(),
                calls: s.calls,
                errors: s.errors,
                latency: Histogram::new(&s.buckets, s.sum_ns),
                bytes_asked: s.bytes_asked,
                bytes: (0..CUFILE_PATHS)
                    .map(|p| PathCount {
                        path: labels::CUFILE_PATHS[p].to_owned(),
                        bytes: s.path_bytes[p],
                        calls: s.path_calls[p],
                    })
                    .collect(),
            });
        }
        // Unknown codes share the `unknown` name: add them up.
        let mut errors: std::collections::BTreeMap<(usize, u32, &str), u64> = Default::default();
        for (user, rows) in [(USER_TRUSTED, &raw.errors), (USER_OTHER, &raw.errors_other)] {
            for (k, n) in rows {
                *errors
                    .entry((user, k.op, labels::cufile_error(k.op, k.code)))
                    .or_default() += n;
            }
        }
        out.errors = errors
            .into_iter()
            .map(|((user, op, error), count)| CufileErrorRow {
                op: labels::cufile_op(op).to_owned(),
                user: labels::cufile_user(user).to_owned(),
                error: error.to_owned(),
                count,
            })
            .collect();
        for c in CufileCount::ALL {
            let (name, is_drop) = labels::cufile_count(c);
            let count = raw.counts[c.index()];
            if is_drop {
                drops.push(DropRow {
                    reason: name.to_owned(),
                    count,
                });
            } else {
                out.beneath.push((name.to_owned(), count));
            }
        }
        out
    }
}

/// File calls of one operation, O_DIRECT or not, over every process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileOpRow {
    pub op: String,
    pub direct: bool,
    pub calls: u64,
    pub errors: u64,
    pub bytes_asked: u64,
    /// Bytes the calls returned as done.
    pub bytes: u64,
    /// Block requests (device commands) linked to these calls, and the bytes they moved.
    #[serde(default)]
    pub device_requests: u64,
    #[serde(default)]
    pub device_bytes: u64,
    pub latency: Histogram,
}

/// File calls of one process on one file, by operation and directness (from the kernel's
/// table, LRU-bounded: `gds_common::file::FILE_PROCS_MAX` rows).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileProcessRow {
    pub pid: u32,
    pub comm: String,
    /// The file's device (`major << 20 | minor`) and inode.
    pub dev: u32,
    pub ino: u64,
    pub op: String,
    pub direct: bool,
    pub calls: u64,
    pub bytes: u64,
    pub errors: u64,
    pub sum_ns: u64,
}

/// The file layer's aggregates (part of [`Stats`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FileStats {
    /// Rows with any call, in (op, direct) order.
    pub ops: Vec<FileOpRow>,
    /// Rows by pid, file, op and directness.
    pub processes: Vec<FileProcessRow>,
}

impl FileStats {
    pub fn decode(raw: &crate::raw::FileRaw) -> FileStats {
        let mut out = FileStats::default();
        for (row, r) in raw.rows.iter().enumerate() {
            if r.calls == 0 {
                continue;
            }
            out.ops.push(FileOpRow {
                op: labels::file_op((row / 2) as u8).to_owned(),
                direct: row % 2 == 1,
                calls: r.calls,
                errors: r.errors,
                bytes_asked: r.bytes_asked,
                bytes: r.bytes_done,
                device_requests: r.device_requests,
                device_bytes: r.device_bytes,
                latency: Histogram::new(&r.buckets, r.sum_ns),
            });
        }
        let mut comms = std::collections::HashMap::new();
        let mut procs: Vec<_> = raw.procs.clone();
        procs.sort_by_key(|(k, _)| *k);
        for (k, v) in procs {
            let comm = comms
                .entry(k.tgid)
                .or_insert_with(|| super::decode::proc_comm(k.tgid))
                .clone();
            out.processes.push(FileProcessRow {
                pid: k.tgid,
                comm,
                dev: k.dev,
                ino: k.ino,
                op: labels::file_op(k.op).to_owned(),
                direct: k.direct != 0,
                calls: v.calls,
                bytes: v.bytes,
                errors: v.errors,
                sum_ns: v.sum_ns,
            });
        }
        out
    }
}

/// When each group of counters in [`Stats`] was read, in CLOCK_MONOTONIC nanoseconds.
///
/// The groups come from different maps read one after another, and under load (50 concurrent
/// `/debug/snapshot` clients on 2 cores) seconds passed between them: a rate is a difference
/// of counters over the difference of the times *those* counters were read, never of a time
/// taken before or after other work (`top` showed 27k–101k IOPS for fio's steady 50–55k when
/// the snapshot's one time was taken after the cuFile collection).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct ReadTimes {
    /// The io_uring counters: `opcodes`, `drops` of the io_uring programs, `inflight`.
    pub uring_ns: u64,
    /// The block and NVMe histograms and errors: `nvme`, `stages`, `block`, `nvme_errors`.
    pub devices_ns: u64,
    /// The cuFile aggregates: `cufile` (and the cuFile drop reasons).
    pub cufile_ns: u64,
    /// The file layer's counters: `file`.
    #[serde(default)]
    pub file_ns: u64,
}

/// Waiting within a read (its wall time minus the CPU time the reading thread spent) beyond
/// which the read is taken again: the counters were copied at an unknown instant of the wait.
/// Under a load average of 12 on 2 cores a reading thread was preempted for ~200 ms between
/// the clock and the map read, and a 1.5 s rate came out 15 % off; a read itself waits
/// microseconds.
pub const READ_AT_MAX_WAIT_NS: u64 = 1_000_000;
/// Reads taken at most while each waited longer than [`READ_AT_MAX_WAIT_NS`]; the one that
/// waited least is kept. One preemption is common under load, four in a row are rare.
pub const READ_AT_ATTEMPTS: usize = 4;

/// Runs `read` and returns its value with the instant it read at: the middle of the
/// CLOCK_MONOTONIC times taken right before and right after it. Where the thread waited in
/// between (preempted, or blocked on a lock) longer than [`READ_AT_MAX_WAIT_NS`], it reads
/// again, up to [`READ_AT_ATTEMPTS`] times, and keeps the read that waited least: the time is
/// then off by at most half that wait plus half the read's own CPU time (a map lookup:
/// microseconds), whatever runs before or after. A long read that is all CPU (a big table)
/// is not repeated.
pub fn read_at<T, E>(mut read: impl FnMut() -> Result<T, E>) -> Result<(T, u64), E> {
    // (value, instant, time waited)
    let mut attempt = || -> Result<(T, u64, u64), E> {
        let (before, cpu_before) = (monotonic_ns(), thread_cpu_ns());
        let value = read()?;
        let (after, cpu_after) = (monotonic_ns(), thread_cpu_ns());
        let wall = after.saturating_sub(before);
        let waited = wall.saturating_sub(cpu_after.saturating_sub(cpu_before));
        Ok((value, before + wall / 2, waited))
    };
    let mut best = attempt()?;
    for _ in 1..READ_AT_ATTEMPTS {
        if best.2 <= READ_AT_MAX_WAIT_NS {
            break;
        }
        let next = attempt()?;
        if next.2 < best.2 {
            best = next;
        }
    }
    Ok((best.0, best.1))
}

/// Everything the kernel aggregated, at one instant, with names.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// Opcodes with any request, in opcode order.
    pub opcodes: Vec<OpcodeRow>,
    pub nvme: Vec<NvmeRow>,
    pub stages: Vec<StageRow>,
    pub block: Vec<BlockRow>,
    /// Block requests per submitting process (LRU-bounded in the kernel).
    #[serde(default)]
    pub block_processes: Vec<BlockProcessRow>,
    pub nvme_errors: Vec<NvmeErrorRow>,
    /// Every drop reason, zero or not.
    pub drops: Vec<DropRow>,
    /// Requests in the kernel's in-flight tables (inserted − removed).
    pub inflight: u64,
    /// cuFile calls, over every process.
    #[serde(default)]
    pub cufile: CufileStats,
    /// File calls (read, write) over every process, and per process.
    #[serde(default)]
    pub file: FileStats,
    /// When each group of these counters was read (0 from agents before they were carried).
    #[serde(default)]
    pub read_ns: ReadTimes,
}

impl Stats {
    /// Reads and decodes the tracer's maps.
    pub fn read<S: Source + ?Sized>(tracer: &S) -> Result<Stats, S::Error> {
        Ok(Stats::read_with_cufile(tracer)?.0)
    }

    /// [`Stats::read`], also returning the cuFile maps as read (at `read_ns.cufile_ns`), so a
    /// snapshot's per-process cuFile report decodes the same read as its aggregates.
    pub fn read_with_cufile<S: Source + ?Sized>(
        tracer: &S,
    ) -> Result<(Stats, CufileRaw), S::Error> {
        let (snap, uring_ns) = read_at(|| tracer.uring())?;
        let mut stats = Stats {
            inflight: snap.inflight(),
            ..Default::default()
        };
        stats.read_ns.uring_ns = uring_ns;
        for (op, s) in snap.opcodes.iter().enumerate() {
            if s.submitted == 0 && s.timed == 0 && s.errors == 0 {
                continue;
            }
            stats.opcodes.push(OpcodeRow {
                opcode: labels::opcode(u8::try_from(op).unwrap_or(u8::MAX)),
                submitted: s.submitted,
                errors: s.errors,
                slow: s.slow,
                latency: Histogram::new(&s.buckets, s.sum_ns),
            });
        }
        stats.drops = DropReason::ALL
            .iter()
            .map(|r| DropRow {
                reason: labels::drop_reason(*r).to_owned(),
                count: snap.drops[r.index()],
            })
            .collect();
        let maps = tracer.disks();
        let (dev, devices_ns) = read_at(|| Ok::<_, S::Error>(tracer.devices()))?;
        stats.read_ns.devices_ns = devices_ns;
        let unflagged_is_host = tracer.peer_memory().unflagged_is_host();
        for (k, h) in &dev.hists {
            let disk = maps.disk_name(k.dev);
            let latency = Histogram {
                buckets: h.buckets[..HIST_BUCKETS].to_vec(),
                count: h.count,
                sum_ns: h.sum_ns,
            };
            let stage = Stage::of_kind(k.kind);
            match (k.kind, stage) {
                (KIND_NVME_CMD, _) => stats.nvme.push(NvmeRow {
                    disk,
                    opcode: labels::nvme_opcode(k.code, k.flags & FLAG_ADMIN != 0),
                    latency,
                }),
                (_, Some(stage)) => stats.stages.push(StageRow {
                    disk,
                    stage,
                    origin: labels::origin(k.code).to_owned(),
                    latency,
                }),
                (KIND_BLOCK, _) => stats.block.push(BlockRow {
                    disk,
                    op: labels::block_op(k.code).to_owned(),
                    memory: labels::block_memory(k.flags & FLAG_P2PDMA != 0, unflagged_is_host)
                        .to_owned(),
                    latency,
                }),
                _ => {}
            }
        }
        let mut comms = std::collections::HashMap::new();
        for (k, v) in &dev.procs {
            let comm = comms
                .entry(k.tgid)
                .or_insert_with(|| super::decode::proc_comm(k.tgid))
                .clone();
            stats.block_processes.push(BlockProcessRow {
                pid: k.tgid,
                comm,
                op: labels::block_op(k.op).to_owned(),
                origin: labels::origin(k.origin).to_owned(),
                link: labels::block_link(k.link).to_owned(),
                requests: v.requests,
                bytes: v.bytes,
            });
        }
        // Several raw statuses share a name (DNR/More bits are masked in the kernel).
        let mut by_name: std::collections::BTreeMap<(String, &'static str), u64> =
            Default::default();
        for (k, n) in &dev.errors {
            *by_name
                .entry((maps.disk_name(k.dev), labels::nvme_status(k.status)))
                .or_default() += n;
        }
        stats.nvme_errors = by_name
            .into_iter()
            .map(|((disk, status), count)| NvmeErrorRow {
                disk,
                status: status.to_owned(),
                count,
            })
            .collect();
        let libraries = tracer.cufile_libraries().0.len();
        let (raw, cufile_ns) = read_at(|| tracer.cufile_raw())?;
        stats.read_ns.cufile_ns = cufile_ns;
        stats.cufile = CufileStats::decode(&raw, libraries, &mut stats.drops);
        let (file, file_ns) = read_at(|| Ok::<_, S::Error>(tracer.file_raw()))?;
        stats.read_ns.file_ns = file_ns;
        stats.file = FileStats::decode(&file);
        Ok((stats, raw))
    }

    /// Sum of the drops.
    pub fn dropped(&self) -> u64 {
        self.drops.iter().map(|d| d.count).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The stage table (`gds_common::with_stages!`) gives every stage its own histogram kind,
    /// none of the other kinds, and its name on the wire as in the metric.
    #[test]
    fn stages_from_their_histogram_kinds() {
        for s in Stage::ALL {
            assert_eq!(Stage::of_kind(s.kind()), Some(s));
            assert_eq!(
                serde_json::to_string(&s).unwrap(),
                format!("\"{}\"", s.label())
            );
            assert!(!s.describe().is_empty());
        }
        assert_eq!(Stage::of_kind(KIND_NVME_CMD), None);
        assert_eq!(Stage::of_kind(KIND_BLOCK), None);
        assert_eq!(Stage::default(), Stage::Queue);
        let labels: Vec<&str> = Stage::ALL.iter().map(|s| s.label()).collect();
        assert_eq!(labels, ["queue", "device", "completion"]);
    }

    #[test]
    fn quantiles_between_two_reads() {
        let mut a = vec![0u64; HIST_BUCKETS];
        a[19] = 100; // [2^19, 2^20) ns: le 2^20 ns
        let prev = Histogram::new(&a, 0);
        let mut b = a.clone();
        b[19] += 50;
        b[20] += 149;
        b[21] += 1;
        let cur = Histogram::new(&b, 0);
        // 50 of 200 new observations in bucket 19: the median is in bucket 20.
        assert_eq!(
            cur.quantile_since(Some(&prev), 0.5),
            Some((1u64 << 21) as f64 / 1e9)
        );
        assert_eq!(
            cur.quantile_since(Some(&prev), 0.99),
            Some((1u64 << 21) as f64 / 1e9)
        );
        assert_eq!(
            cur.quantile_since(Some(&prev), 1.0),
            Some((1u64 << 22) as f64 / 1e9)
        );
        assert_eq!(prev.quantile_since(Some(&prev), 0.5), None, "idle interval");
    }

    /// The file rows are named by their index (`op * 2 + direct`), empty rows left out, and
    /// the per-process rows sorted by process and file.
    #[test]
    fn file_rows_by_op_and_direct() {
        use gds_common::file::{
            FILE_OP_FSYNC, FILE_OP_READ, FILE_ROWS, FileProcKey, FileProcStats, FileRowStats,
            file_row,
        };
        let mut rows = vec![FileRowStats::ZERO; FILE_ROWS];
        let r = &mut rows[file_row(FILE_OP_READ, true) as usize];
        r.calls = 3;
        r.bytes_done = 3 << 20;
        r.device_requests = 6;
        r.device_bytes = 3 << 20;
        r.buckets[20] = 3;
        rows[file_row(FILE_OP_FSYNC, false) as usize].calls = 1;
        let key = |tgid, ino| FileProcKey {
            tgid,
            dev: 1,
            ino,
            op: FILE_OP_READ,
            direct: 1,
            _pad: [0; 6],
        };
        let stats = |calls| FileProcStats {
            calls,
            ..Default::default()
        };
        let raw = crate::raw::FileRaw {
            rows,
            procs: vec![(key(9, 2), stats(1)), (key(9, 1), stats(2))],
        };
        let f = FileStats::decode(&raw);
        let named: Vec<(&str, bool, u64)> = f
            .ops
            .iter()
            .map(|o| (o.op.as_str(), o.direct, o.calls))
            .collect();
        assert_eq!(named, [("read", true, 3), ("fsync", false, 1)]);
        assert_eq!(f.ops[0].bytes, 3 << 20);
        assert_eq!(
            (f.ops[0].device_requests, f.ops[0].device_bytes),
            (6, 3 << 20)
        );
        assert_eq!(f.ops[0].latency.count, 3);
        let inodes: Vec<u64> = f.processes.iter().map(|p| p.ino).collect();
        assert_eq!(inodes, [1, 2]);
        assert!(f.processes.iter().all(|p| p.op == "read" && p.direct));
    }
}
