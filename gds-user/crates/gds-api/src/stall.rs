//! Stall detection: requests in flight longer than a threshold, seen while they happen.
//!
//! The agent scans the kernel's in-flight tables every interval, decodes them into the model
//! ([`crate::model::inflight`]) and feeds them here. Each stall is reported once when detected
//! and once when it ends, with the request's context and the stage it is stuck in.

use std::collections::{BTreeMap, HashMap, VecDeque};

use crate::model::{
    Cause, CauseKind, Evidence, Layer, LayerStalls, Request, RequestKey, Stall, StallReport,
    StallTotal,
};

/// A detection or an end, as returned by [`StallDetector::scan`].
#[derive(Debug, Clone)]
pub enum StallChange {
    Started(Stall),
    Ended(Stall),
}

pub struct StallDetector {
    threshold_ns: u64,
    active: HashMap<RequestKey, Stall>,
    ended: VecDeque<Stall>,
    totals: BTreeMap<(Layer, String, CauseKind), u64>,
    /// Exact latencies of completed requests, from slow events.
    exact: HashMap<RequestKey, u64>,
}

const ENDED_KEPT: usize = 256;

impl StallDetector {
    pub fn new(threshold_ns: u64) -> Self {
        StallDetector {
            threshold_ns,
            active: HashMap::new(),
            ended: VecDeque::new(),
            // Counters exist from the start, so rate() works from the first stall on: one per
            // layer (a disk's appears with its first stall).
            totals: Layer::ALL
                .iter()
                .map(|l| ((*l, "unknown".to_owned(), CauseKind::Unknown), 0))
                .collect(),
            exact: HashMap::new(),
        }
    }

    /// Records a completion's exact latency (from a slow event) so an ending stall reports
    /// it rather than the scan-interval approximation.
    pub fn completed(&mut self, key: RequestKey, latency_ns: u64) {
        if self.active.contains_key(&key) {
            self.exact.insert(key, latency_ns);
        }
    }

    /// Compares the requests in flight at `now_ns` (CLOCK_MONOTONIC) with the known stalls,
    /// naming no cause (`unknown`, no evidence).
    pub fn scan(&mut self, now_ns: u64, inflight: &[Request]) -> Vec<StallChange> {
        self.scan_explained(now_ns, inflight, |_| (Cause::default(), None))
    }

    /// [`Self::scan`], calling `explain` once for each new stall, when it is detected (never
    /// again for it, never for a request that is not stalled): the evidence is what the host
    /// showed at that moment, and the cause counts in the totals.
    pub fn scan_explained(
        &mut self,
        now_ns: u64,
        inflight: &[Request],
        mut explain: impl FnMut(&Request) -> (Cause, Option<Evidence>),
    ) -> Vec<StallChange> {
        let mut changes = Vec::new();
        let mut seen = std::collections::HashSet::with_capacity(self.active.len());
        for r in inflight {
            let age = now_ns.saturating_sub(r.key.start_ns);
            if age < self.threshold_ns {
                continue;
            }
            seen.insert(r.key);
            if let Some(s) = self.active.get_mut(&r.key) {
                // A stall can move on (e.g. issued to the device after waiting in a queue).
                // The file path the evidence found stays (the decoder may not read it).
                let file = s.evidence.as_ref().and_then(|e| e.file.clone());
                s.request = r.clone();
                if file.is_some() {
                    s.request.target.file = file;
                }
                s.request.age_seconds = age as f64 / 1e9;
                s.stage_description = r.stage.describe_in(r.layer).into();
                continue;
            }
            let mut request = r.clone();
            request.age_seconds = age as f64 / 1e9;
            let (cause, evidence) = explain(&request);
            if let Some(f) = evidence.as_ref().and_then(|e| e.file.clone()) {
                request.target.file = Some(f);
            }
            let stall = Stall {
                stage_description: r.stage.describe_in(r.layer).into(),
                request,
                total_seconds: None,
                cause,
                evidence,
            };
            *self
                .totals
                .entry((
                    stall.request.layer,
                    stall.request.target.disk.clone(),
                    stall.cause.kind,
                ))
                .or_default() += 1;
            self.active.insert(r.key, stall.clone());
            changes.push(StallChange::Started(stall));
        }
        let gone: Vec<RequestKey> = self
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
                .unwrap_or(now_ns.saturating_sub(key.start_ns));
            s.total_seconds = Some(total as f64 / 1e9);
            s.request.age_seconds = total as f64 / 1e9;
            if self.ended.len() == ENDED_KEPT {
                self.ended.pop_front();
            }
            self.ended.push_back(s.clone());
            changes.push(StallChange::Ended(s));
        }
        self.exact.retain(|k, _| self.active.contains_key(k));
        changes
    }

    pub fn report(&self, now_ns: u64, inflight: &[Request], scan_seconds: f64) -> StallReport {
        let mut active: Vec<Stall> = self.active.values().cloned().collect();
        active.sort_by(|a, b| b.request.age_seconds.total_cmp(&a.request.age_seconds));
        let oldest = inflight
            .iter()
            .map(|r| now_ns.saturating_sub(r.key.start_ns))
            .max()
            .unwrap_or(0);
        let layers = Layer::ALL
            .iter()
            .map(|&layer| {
                let ages = inflight
                    .iter()
                    .filter(|r| r.layer == layer)
                    .map(|r| now_ns.saturating_sub(r.key.start_ns));
                let (n, oldest) = ages.fold((0, 0), |(n, o), a| (n + 1, o.max(a)));
                LayerStalls {
                    layer,
                    inflight: n,
                    stalled: active.iter().filter(|s| s.request.layer == layer).count(),
                    oldest_inflight_seconds: oldest as f64 / 1e9,
                }
            })
            .collect();
        StallReport {
            layers,
            threshold_seconds: self.threshold_ns as f64 / 1e9,
            active,
            ended: self.ended.iter().cloned().collect(),
            inflight: inflight.len(),
            oldest_inflight_seconds: oldest as f64 / 1e9,
            scan_seconds,
            totals: self
                .totals
                .iter()
                .map(|((layer, disk, cause), count)| StallTotal {
                    layer: *layer,
                    disk: disk.clone(),
                    cause: *cause,
                    count: *count,
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Stage;

    fn req(req: u64, start_ns: u64) -> Request {
        Request {
            layer: Layer::Uring,
            opcode: "READ".into(),
            ctx: crate::model::Context {
                pid: 1,
                tid: 1,
                comm: "t".into(),
                ..Default::default()
            },
            target: Default::default(),
            origin: Some(crate::model::UringOrigin {
                user_data: 7,
                ring: "0x10".into(),
                req: format!("{req:#x}"),
            }),
            age_seconds: 0.0,
            stage: Stage::Queue,
            nvme: None,
            poll_armed: false,
            block_cause: None,
            key: RequestKey {
                layer: Layer::Uring,
                req,
                start_ns,
            },
        }
    }

    #[test]
    fn a_stall_starts_once_and_ends_once() {
        let mut d = StallDetector::new(1_000);
        let r = req(0xabc, 100);
        assert!(
            d.scan(500, std::slice::from_ref(&r)).is_empty(),
            "younger than the threshold"
        );
        let c = d.scan(1_200, std::slice::from_ref(&r));
        assert!(
            matches!(&c[..], [StallChange::Started(s)] if s.request.opcode == "READ" && s.request.origin.as_ref().is_some_and(|o| o.user_data == 7))
        );
        assert!(
            d.scan(5_000, std::slice::from_ref(&r)).is_empty(),
            "reported once"
        );
        assert_eq!(
            d.report(5_000, std::slice::from_ref(&r), 0.0).active[0]
                .request
                .age_seconds,
            4_900e-9
        );
        d.completed(r.key, 4_000);
        let c = d.scan(9_000, &[]);
        assert!(matches!(&c[..], [StallChange::Ended(s)] if s.total_seconds == Some(4e-6)));
        assert!(d.scan(10_000, &[]).is_empty());
        let rep = d.report(10_000, &[], 0.0);
        let total = |disk: &str| {
            rep.totals
                .iter()
                .find(|t| t.layer == Layer::Uring && t.disk == disk)
                .map(|t| t.count)
        };
        assert_eq!(total("unknown"), Some(1));
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

    #[test]
    fn the_cause_is_named_once_per_stall_and_counted() {
        let mut d = StallDetector::new(1_000);
        let mut calls = 0;
        let mut explain = |r: &Request| {
            calls += 1;
            assert!(r.age_seconds > 0.0, "explained with its age");
            (
                Cause {
                    kind: CauseKind::WaitingForData,
                    because: "pipe".into(),
                },
                Some(Evidence::default()),
            )
        };
        assert!(d.scan_explained(500, &[req(1, 0)], &mut explain).is_empty());
        let c = d.scan_explained(2_000, &[req(1, 0)], &mut explain);
        assert!(
            matches!(&c[..], [StallChange::Started(s)] if s.cause.kind == CauseKind::WaitingForData && s.evidence.is_some())
        );
        d.scan_explained(3_000, &[req(1, 0)], &mut explain);
        assert_eq!(calls, 1, "once, when detected");
        let rep = d.report(3_000, &[req(1, 0)], 0.0);
        assert_eq!(rep.active[0].cause.because, "pipe");
        assert!(rep.totals.iter().any(|t| t.layer == Layer::Uring
            && t.cause == CauseKind::WaitingForData
            && t.count == 1));
        assert!(
            rep.totals
                .iter()
                .any(|t| t.layer == Layer::Uring && t.cause == CauseKind::Unknown && t.count == 0)
        );
    }
}
