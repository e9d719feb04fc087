//! Stall detection: requests in flight longer than a threshold, seen while they happen.
//!
//! The agent scans the kernel's in-flight tables every interval ([`crate::trace`]) and feeds
//! them here. Each stall is reported once when detected and once when it ends, with the
//! request's context and the stage it is stuck in.

use std::collections::{BTreeMap, HashMap, VecDeque};

use serde::Serialize;

use crate::{trace::InflightRequest, uring_opcode};

/// Where a request is being tracked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Layer {
    /// io_uring: submitted, not yet completed.
    Uring,
}

impl Layer {
    pub const fn label(self) -> &'static str {
        match self {
            Layer::Uring => "uring",
        }
    }
}

/// Where a stalled request is stuck.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// Not yet at a device: queued in io_uring or the kernel (or waiting on something that is
    /// not a device, such as an empty pipe).
    Queue,
    /// At the device: the NVMe command was issued and has not completed.
    Device,
    /// Completed by the device, not yet delivered as a CQE.
    Completion,
}

impl Stage {
    pub const fn describe(self) -> &'static str {
        match self {
            Stage::Queue => "not yet at the device (no device command seen)",
            Stage::Device => "at the device",
            Stage::Completion => "completed by the device but not yet delivered",
        }
    }
}

/// A stalled request with its context.
#[derive(Debug, Clone, Serialize)]
pub struct Stall {
    pub layer: Layer,
    /// Disk the request is on; `unknown` until device tracing names it.
    pub disk: String,
    pub stage: Stage,
    pub stage_description: &'static str,
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
    pub ring: String,
    pub opcode: String,
    pub user_data: u64,
    /// Request identity while in flight (`struct io_kiocb *`, hex).
    pub req: String,
    /// The NVMe command it became (passthrough with NVMe tracing), else absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nvme: Option<NvmeContext>,
    /// Seconds in flight when detected / now (active) / in total (ended).
    pub age_seconds: f64,
    /// Set when the stall has ended.
    pub total_seconds: Option<f64>,
    #[serde(skip)]
    start_ns: u64,
}

/// Where an io_uring passthrough request sits on the device.
#[derive(Debug, Clone, Serialize)]
pub struct NvmeContext {
    pub qid: u16,
    pub cid: u16,
    pub lba: u64,
    pub blocks: u32,
}

impl Stage {
    /// The stage of an in-flight request from what the NVMe programs stamped.
    pub fn of(r: &InflightRequest) -> Stage {
        if r.entry.nvme_setup_ns == 0 {
            Stage::Queue
        } else if r.entry.nvme_complete_ns == 0 {
            Stage::Device
        } else {
            Stage::Completion
        }
    }

    pub const fn label(self) -> &'static str {
        match self {
            Stage::Queue => "queue",
            Stage::Device => "device",
            Stage::Completion => "completion",
        }
    }
}

/// A detection or an end, as returned by [`StallDetector::scan`].
#[derive(Debug, Clone)]
pub enum StallChange {
    Started(Stall),
    Ended(Stall),
}

/// What `/debug/stalls` and the metrics show.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StallReport {
    pub threshold_seconds: f64,
    pub active: Vec<Stall>,
    /// Most recent ended stalls, newest last.
    pub ended: Vec<Stall>,
    pub inflight: usize,
    pub oldest_inflight_seconds: f64,
    pub scan_seconds: f64,
    /// Stalls detected since start, by (layer, disk).
    #[serde(skip)]
    pub totals: BTreeMap<(Layer, String), u64>,
}

pub struct StallDetector {
    threshold_ns: u64,
    active: HashMap<(u64, u64), Stall>,
    ended: VecDeque<Stall>,
    totals: BTreeMap<(Layer, String), u64>,
    /// Exact latencies of completed requests, from slow events (req, start) → ns.
    exact: HashMap<(u64, u64), u64>,
}

const ENDED_KEPT: usize = 256;

fn comm_of(tgid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{tgid}/comm"))
        .map(|s| s.trim_end().to_owned())
        .unwrap_or_else(|_| "?".into())
}

impl StallDetector {
    pub fn new(threshold_ns: u64) -> Self {
        StallDetector {
            threshold_ns,
            active: HashMap::new(),
            ended: VecDeque::new(),
            // Counters exist from the start, so rate() works from the first stall on.
            totals: BTreeMap::from([((Layer::Uring, "unknown".to_owned()), 0)]),
            exact: HashMap::new(),
        }
    }

    /// Records a completion's exact latency (from a slow event) so an ending stall reports
    /// it rather than the scan-interval approximation.
    pub fn completed(&mut self, req: u64, start_ns: u64, latency_ns: u64) {
        if self.active.contains_key(&(req, start_ns)) {
            self.exact.insert((req, start_ns), latency_ns);
        }
    }

    /// Compares the in-flight requests at `now_ns` (CLOCK_MONOTONIC) with the known stalls.
    pub fn scan(&mut self, now_ns: u64, inflight: &[InflightRequest]) -> Vec<StallChange> {
        let mut changes = Vec::new();
        let mut seen = std::collections::HashSet::with_capacity(self.active.len());
        for r in inflight {
            let age = now_ns.saturating_sub(r.entry.start_ns);
            if age < self.threshold_ns {
                continue;
            }
            let key = (r.req, r.entry.start_ns);
            seen.insert(key);
            let stage = Stage::of(r);
            if let Some(s) = self.active.get_mut(&key) {
                s.age_seconds = age as f64 / 1e9;
                // A stall can move on (e.g. issued to the device after waiting in a queue).
                s.stage = stage;
                s.stage_description = stage.describe();
                continue;
            }
            let nvme = (r.entry.nvme_setup_ns != 0).then(|| NvmeContext {
                qid: r.entry.nvme_qid,
                cid: r.entry.nvme_cid,
                lba: r.entry.nvme_lba,
                blocks: r.entry.nvme_blocks,
            });
            let disk = if nvme.is_some() {
                crate::trace::disk_name(r.entry.nvme_dev)
            } else {
                "unknown".into()
            };
            let stall = Stall {
                layer: Layer::Uring,
                disk,
                stage,
                stage_description: stage.describe(),
                nvme,
                pid: r.entry.tgid,
                tid: r.entry.pid,
                comm: comm_of(r.entry.tgid),
                ring: format!("{:#x}", r.entry.ring),
                opcode: uring_opcode::name(r.entry.opcode as usize),
                user_data: r.entry.user_data,
                req: format!("{:#x}", r.req),
                age_seconds: age as f64 / 1e9,
                total_seconds: None,
                start_ns: r.entry.start_ns,
            };
            *self
                .totals
                .entry((stall.layer, stall.disk.clone()))
                .or_default() += 1;
            self.active.insert(key, stall.clone());
            changes.push(StallChange::Started(stall));
        }
        let gone: Vec<(u64, u64)> = self
            .active
            .keys()
            .filter(|k| !seen.contains(*k))
            .copied()
            .collect();
        for key in gone {
            let Some(mut s) = self.active.remove(&key) else {
                continue;
            };
            let total = self
                .exact
                .remove(&key)
                .unwrap_or(now_ns.saturating_sub(s.start_ns));
            s.total_seconds = Some(total as f64 / 1e9);
            s.age_seconds = total as f64 / 1e9;
            if self.ended.len() == ENDED_KEPT {
                self.ended.pop_front();
            }
            self.ended.push_back(s.clone());
            changes.push(StallChange::Ended(s));
        }
        self.exact.retain(|k, _| self.active.contains_key(k));
        changes
    }

    pub fn report(
        &self,
        now_ns: u64,
        inflight: &[InflightRequest],
        scan_seconds: f64,
    ) -> StallReport {
        let mut active: Vec<Stall> = self.active.values().cloned().collect();
        active.sort_by(|a, b| b.age_seconds.total_cmp(&a.age_seconds));
        let oldest = inflight
            .iter()
            .map(|r| now_ns.saturating_sub(r.entry.start_ns))
            .max()
            .unwrap_or(0);
        StallReport {
            threshold_seconds: self.threshold_ns as f64 / 1e9,
            active,
            ended: self.ended.iter().cloned().collect(),
            inflight: inflight.len(),
            oldest_inflight_seconds: oldest as f64 / 1e9,
            scan_seconds,
            totals: self.totals.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(req: u64, start_ns: u64) -> InflightRequest {
        let entry = gds_common::InflightReq {
            start_ns,
            user_data: 7,
            ring: 0x10,
            tgid: 1,
            pid: 1,
            opcode: 22,
            ..Default::default()
        };
        InflightRequest { req, entry }
    }

    #[test]
    fn a_stall_starts_once_and_ends_once() {
        let mut d = StallDetector::new(1_000);
        let r = req(0xabc, 100);
        assert!(d.scan(500, &[r]).is_empty(), "younger than the threshold");
        let c = d.scan(1_200, &[r]);
        assert!(
            matches!(&c[..], [StallChange::Started(s)] if s.opcode == "READ" && s.user_data == 7)
        );
        assert!(d.scan(5_000, &[r]).is_empty(), "reported once");
        assert_eq!(d.report(5_000, &[r], 0.0).active[0].age_seconds, 4_900e-9);
        d.completed(0xabc, 100, 4_000);
        let c = d.scan(9_000, &[]);
        assert!(matches!(&c[..], [StallChange::Ended(s)] if s.total_seconds == Some(4e-6)));
        assert!(d.scan(10_000, &[]).is_empty());
        let rep = d.report(10_000, &[], 0.0);
        assert_eq!(rep.totals[&(Layer::Uring, "unknown".to_string())], 1);
        assert_eq!(rep.ended.len(), 1);
        assert!(rep.active.is_empty());
    }

    #[test]
    fn a_reused_request_pointer_is_a_new_request() {
        let mut d = StallDetector::new(1_000);
        assert_eq!(d.scan(2_000, &[req(1, 0)]).len(), 1);
        // Same pointer, new start: the old one ended, a new one is in flight.
        let c = d.scan(4_000, &[req(1, 2_500)]);
        assert!(matches!(
            &c[..],
            [StallChange::Started(_), StallChange::Ended(_)]
        ));
    }
}

/// `gds-agent stalls`: the active and recent stalls of a running agent.
#[derive(clap::Args, Debug, Clone)]
pub struct StallsArgs {
    /// The agent to ask (host:port).
    #[arg(long, default_value = crate::agent::DEFAULT_LISTEN)]
    pub agent: String,
    /// Print the agent's JSON report as is.
    #[arg(long)]
    pub json: bool,
}

pub fn stalls_cmd(args: StallsArgs) -> anyhow::Result<()> {
    let addr = crate::client::parse_addr(&args.agent)?;
    let body = crate::client::get(addr, "/debug/stalls")?;
    if args.json {
        println!("{body}");
        return Ok(());
    }
    let v: serde_json::Value = serde_json::from_str(&body)?;
    let rows = |key: &str| v[key].as_array().cloned().unwrap_or_default();
    println!(
        "{} active stall(s) (threshold {}s), {} request(s) in flight, oldest {:.3}s",
        rows("active").len(),
        v["threshold_seconds"],
        v["inflight"],
        v["oldest_inflight_seconds"].as_f64().unwrap_or(0.0)
    );
    println!(
        "{:<8} {:>9} {:>8} {:<16} {:<10} {:>18}  WHERE",
        "STATE", "SECONDS", "PID", "COMM", "OPCODE", "USER_DATA"
    );
    for (state, key) in [("STALLED", "active"), ("ended", "ended")] {
        for s in rows(key) {
            println!(
                "{:<8} {:>9.3} {:>8} {:<16} {:<10} {:>#18x}  {} ({})",
                state,
                s["total_seconds"]
                    .as_f64()
                    .or(s["age_seconds"].as_f64())
                    .unwrap_or(0.0),
                s["pid"],
                s["comm"].as_str().unwrap_or("?"),
                s["opcode"].as_str().unwrap_or("?"),
                s["user_data"].as_u64().unwrap_or(0),
                s["disk"].as_str().unwrap_or("?"),
                s["stage_description"].as_str().unwrap_or("?"),
            );
        }
    }
    Ok(())
}
