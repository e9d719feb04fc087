//! The kernel's aggregates, decoded once per read into named rows: what `/metrics` exports and
//! what `top` computes rates from (through `/debug/snapshot`).

use gds_common::{
    DropReason, FLAG_ADMIN, FLAG_P2PDMA, HIST_BUCKETS, KIND_BLOCK, KIND_NVME_CMD,
    KIND_STAGE_COMPLETION, KIND_STAGE_DEVICE, KIND_STAGE_QUEUE,
};
use serde::{Deserialize, Serialize};

use gds_common::cufile::{CUFILE_OPS, CUFILE_PATHS, CufileCount, USER_OTHER, USER_TRUSTED};

use super::{labels, request::Stage};
use crate::trace::{CufileRaw, TraceError, UringTracer};

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
            let count = raw.counts[c as usize];
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

/// Everything the kernel aggregated, at one instant, with names.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// Opcodes with any request, in opcode order.
    pub opcodes: Vec<OpcodeRow>,
    pub nvme: Vec<NvmeRow>,
    pub stages: Vec<StageRow>,
    pub block: Vec<BlockRow>,
    pub nvme_errors: Vec<NvmeErrorRow>,
    /// Every drop reason, zero or not.
    pub drops: Vec<DropRow>,
    /// Requests in the kernel's in-flight tables (inserted − removed).
    pub inflight: u64,
    /// cuFile calls, over every process.
    #[serde(default)]
    pub cufile: CufileStats,
}

impl Stats {
    /// Reads and decodes the tracer's maps.
    pub fn read(tracer: &UringTracer) -> Result<Stats, TraceError> {
        let snap = tracer.snapshot()?;
        let mut stats = Stats {
            inflight: snap.inflight(),
            ..Default::default()
        };
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
                count: snap.drops[*r as usize],
            })
            .collect();
        let maps = tracer.devices();
        let dev = maps.snapshot();
        let unflagged_is_host = tracer.peer_memory().unflagged_is_host();
        for (k, h) in &dev.hists {
            let disk = maps.disk_name(k.dev);
            let latency = Histogram {
                buckets: h.buckets[..HIST_BUCKETS].to_vec(),
                count: h.count,
                sum_ns: h.sum_ns,
            };
            let stage = match k.kind {
                KIND_STAGE_QUEUE => Some(Stage::Queue),
                KIND_STAGE_DEVICE => Some(Stage::Device),
                KIND_STAGE_COMPLETION => Some(Stage::Completion),
                _ => None,
            };
            match (k.kind, stage) {
                (KIND_NVME_CMD, _) => stats.nvme.push(NvmeRow {
                    disk,
                    opcode: labels::nvme_opcode(k.code, k.flags & FLAG_ADMIN != 0),
                    latency,
                }),
                (_, Some(stage)) => stats.stages.push(StageRow {
                    disk,
                    stage,
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
        stats.cufile = CufileStats::decode(&tracer.cufile_raw()?, libraries, &mut stats.drops);
        Ok(stats)
    }

    /// Sum of the drops.
    pub fn dropped(&self) -> u64 {
        self.drops.iter().map(|d| d.count).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
