//! `/metrics`: the model as Prometheus metric families.
//!
//! Each scrape decodes the kernel's maps once ([`Stats::read`]) and turns the rows into the
//! families declared in [`gds_api::families`]. Labels are bounded by design: opcode names, disk
//! names, stages, statuses and drop reasons, never pids.

use std::sync::{Arc, Mutex};

use prometheus::{
    core::{Collector, Desc},
    proto::MetricFamily,
};

use gds_api::{
    exposition::{counter, desc, family, gauge, labels, log2_histogram, opts},
    families::{self as f, Family},
    model::{CauseKind, Layer, LayerStalls, StallReport, Stats},
};
use gds_trace::UringTracer;

/// Exports what the tracer aggregated (io_uring, NVMe, stages, block, drops), read from the
/// kernel maps at each scrape.
pub struct TraceCollector {
    tracer: Arc<UringTracer>,
    descs: Vec<Desc>,
}

/// The families [`TraceCollector`] exports.
const TRACE_FAMILIES: [Family; 24] = [
    f::URING_REQUESTS,
    f::URING_DURATION,
    f::URING_ERRORS,
    f::URING_INFLIGHT,
    f::SLOW_REQUESTS,
    f::TRACE_DROPPED,
    f::NVME_COMMANDS,
    f::NVME_DURATION,
    f::STAGE_DURATION,
    f::NVME_ERRORS,
    f::BLOCK_DURATION,
    f::CUFILE_CALLS,
    f::CUFILE_DURATION,
    f::CUFILE_ERRORS,
    f::CUFILE_BYTES,
    f::CUFILE_REQUESTED,
    f::CUFILE_LIBRARIES,
    f::CUFILE_BENEATH,
    f::FILE_REQUESTS,
    f::FILE_BYTES,
    f::FILE_DEVICE_REQUESTS,
    f::FILE_DEVICE_BYTES,
    f::FILE_DURATION,
    f::FILE_ERRORS,
];

impl TraceCollector {
    pub fn new(tracer: Arc<UringTracer>) -> Self {
        TraceCollector {
            tracer,
            descs: TRACE_FAMILIES.iter().map(desc).collect(),
        }
    }
}

/// The families of one [`Stats`] (empty families left out).
pub fn trace_families(s: &Stats) -> Vec<MetricFamily> {
    let (mut requests, mut durations, mut errors, mut slow) = (vec![], vec![], vec![], vec![]);
    for o in &s.opcodes {
        let l = || labels(&[("opcode", &o.opcode)]);
        requests.push(counter(l(), o.submitted as f64));
        durations.push(log2_histogram(l(), &o.latency.buckets, o.latency.sum_ns));
        errors.push(counter(l(), o.errors as f64));
        slow.push(counter(l(), o.slow as f64));
    }
    let drops = s
        .drops
        .iter()
        .map(|d| counter(labels(&[("reason", &d.reason)]), d.count as f64))
        .collect();
    let (mut cmds, mut cmd_hist) = (vec![], vec![]);
    for n in &s.nvme {
        let l = || labels(&[("disk", &n.disk), ("opcode", &n.opcode)]);
        cmds.push(counter(l(), n.latency.count as f64));
        cmd_hist.push(log2_histogram(l(), &n.latency.buckets, n.latency.sum_ns));
    }
    let stages = s
        .stages
        .iter()
        .map(|r| {
            log2_histogram(
                labels(&[
                    ("stage", r.stage.label()),
                    ("disk", &r.disk),
                    ("origin", &r.origin),
                ]),
                &r.latency.buckets,
                r.latency.sum_ns,
            )
        })
        .collect();
    let nvme_errors = s
        .nvme_errors
        .iter()
        .map(|e| {
            counter(
                labels(&[("disk", &e.disk), ("status", &e.status)]),
                e.count as f64,
            )
        })
        .collect();
    let block = s
        .block
        .iter()
        .map(|b| {
            log2_histogram(
                labels(&[("disk", &b.disk), ("op", &b.op), ("memory", &b.memory)]),
                &b.latency.buckets,
                b.latency.sum_ns,
            )
        })
        .collect();
    let c = &s.cufile;
    let (mut cf_calls, mut cf_hist, mut cf_bytes, mut cf_asked) = (vec![], vec![], vec![], vec![]);
    for o in &c.ops {
        let l = || labels(&[("op", &o.op), ("user", &o.user)]);
        cf_calls.push(counter(l(), o.calls as f64));
        cf_hist.push(log2_histogram(l(), &o.latency.buckets, o.latency.sum_ns));
        cf_asked.push(counter(l(), o.bytes_asked as f64));
        if o.op == "read" || o.op == "write" {
            for p in &o.bytes {
                cf_bytes.push(counter(
                    labels(&[("op", &o.op), ("path", &p.path), ("user", &o.user)]),
                    p.bytes as f64,
                ));
            }
        }
    }
    let cf_errors = c
        .errors
        .iter()
        .map(|e| {
            counter(
                labels(&[("op", &e.op), ("error", &e.error), ("user", &e.user)]),
                e.count as f64,
            )
        })
        .collect();
    let cf_beneath = c
        .beneath
        .iter()
        .map(|(link, n)| counter(labels(&[("link", link)]), *n as f64))
        .collect();
    let (mut f_calls, mut f_bytes, mut f_hist) = (vec![], vec![], vec![]);
    let (mut f_dev_reqs, mut f_dev_bytes) = (vec![], vec![]);
    let mut f_errors: std::collections::BTreeMap<&str, u64> = Default::default();
    for r in &s.file.ops {
        let direct = gds_api::model::labels::file_direct(r.direct);
        let l = || labels(&[("op", &r.op), ("direct", direct)]);
        f_calls.push(counter(l(), r.calls as f64));
        f_bytes.push(counter(l(), r.bytes as f64));
        f_dev_reqs.push(counter(l(), r.device_requests as f64));
        f_dev_bytes.push(counter(l(), r.device_bytes as f64));
        f_hist.push(log2_histogram(l(), &r.latency.buckets, r.latency.sum_ns));
        *f_errors.entry(&r.op).or_default() += r.errors;
    }
    let f_errors = f_errors
        .into_iter()
        .map(|(op, n)| counter(labels(&[("op", op)]), n as f64))
        .collect();
    [
        (f::URING_REQUESTS, requests),
        (f::URING_DURATION, durations),
        (f::URING_ERRORS, errors),
        (f::URING_INFLIGHT, vec![gauge(vec![], s.inflight as f64)]),
        (f::SLOW_REQUESTS, slow),
        (f::TRACE_DROPPED, drops),
        (f::NVME_COMMANDS, cmds),
        (f::NVME_DURATION, cmd_hist),
        (f::STAGE_DURATION, stages),
        (f::NVME_ERRORS, nvme_errors),
        (f::BLOCK_DURATION, block),
        (f::CUFILE_CALLS, cf_calls),
        (f::CUFILE_DURATION, cf_hist),
        (f::CUFILE_ERRORS, cf_errors),
        (f::CUFILE_BYTES, cf_bytes),
        (f::CUFILE_REQUESTED, cf_asked),
        (f::CUFILE_LIBRARIES, vec![gauge(vec![], c.libraries as f64)]),
        (f::CUFILE_BENEATH, cf_beneath),
        (f::FILE_REQUESTS, f_calls),
        (f::FILE_BYTES, f_bytes),
        (f::FILE_DEVICE_REQUESTS, f_dev_reqs),
        (f::FILE_DEVICE_BYTES, f_dev_bytes),
        (f::FILE_DURATION, f_hist),
        (f::FILE_ERRORS, f_errors),
    ]
    .into_iter()
    .filter(|(_, m)| !m.is_empty())
    .map(|(fam, m)| family(&fam, m))
    .collect()
}

impl Collector for TraceCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        match Stats::read(&*self.tracer) {
            Ok(s) => trace_families(&s),
            Err(e) => {
                tracing::warn!("reading the tracer's statistics failed: {e}");
                Vec::new()
            }
        }
    }
}

/// Stall metrics from the latest scan: `gds_stalled_requests{layer,cause}`,
/// `gds_oldest_inflight_seconds{layer}`, `gds_stalls_total{layer,disk,cause}`,
/// `gds_stall_scan_duration_seconds`.
pub struct StallCollector {
    state: Arc<Mutex<StallReport>>,
    descs: Vec<Desc>,
}

const STALL_FAMILIES: [Family; 4] = [
    f::STALLED_REQUESTS,
    f::OLDEST_INFLIGHT,
    f::STALLS,
    f::STALL_SCAN,
];

impl StallCollector {
    pub fn new(state: Arc<Mutex<StallReport>>) -> Self {
        StallCollector {
            state,
            descs: STALL_FAMILIES.iter().map(desc).collect(),
        }
    }
}

impl Collector for StallCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let r = self.state.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let totals: Vec<_> = r
            .totals
            .iter()
            .map(|t| {
                counter(
                    labels(&[
                        ("layer", t.layer.label()),
                        ("disk", &t.disk),
                        ("cause", t.cause.label()),
                    ]),
                    t.count as f64,
                )
            })
            .collect();
        let mut out = vec![
            family(&f::STALLED_REQUESTS, stalled_by_layer_and_cause(&r)),
            family(
                &f::OLDEST_INFLIGHT,
                per_layer(&r, |l| l.oldest_inflight_seconds),
            ),
            family(&f::STALL_SCAN, vec![gauge(vec![], r.scan_seconds)]),
        ];
        if !totals.is_empty() {
            out.push(family(&f::STALLS, totals));
        }
        out
    }
}

/// Stalled requests now, one gauge per (layer, cause), every pair (0 when none), so an alert's
/// series exist from the start and `GdsRequestsStalled` can name the cause it pages for.
fn stalled_by_layer_and_cause(r: &StallReport) -> Vec<prometheus::proto::Metric> {
    let mut n = std::collections::BTreeMap::<(Layer, CauseKind), usize>::new();
    for s in &r.active {
        *n.entry((s.request.layer, s.cause.kind)).or_default() += 1;
    }
    Layer::ALL
        .iter()
        .flat_map(|&layer| CauseKind::ALL.iter().map(move |&cause| (layer, cause)))
        .map(|(layer, cause)| {
            let v = n.get(&(layer, cause)).copied().unwrap_or(0) as f64;
            gauge(
                labels(&[("layer", layer.label()), ("cause", cause.label())]),
                v,
            )
        })
        .collect()
}

/// One gauge per layer from the report, every layer (0 before the first scan), so an alert's
/// series exist from the start.
fn per_layer(
    r: &StallReport,
    value: impl Fn(&LayerStalls) -> f64,
) -> Vec<prometheus::proto::Metric> {
    Layer::ALL
        .iter()
        .map(|&layer| {
            let v = r
                .layers
                .iter()
                .find(|l| l.layer == layer)
                .map_or(0.0, &value);
            gauge(labels(&[("layer", layer.label())]), v)
        })
        .collect()
}

/// `gds_agent_info{version,kernel} 1`.
pub fn agent_info() -> prometheus::IntGaugeVec {
    let g = prometheus::IntGaugeVec::new(opts(&f::AGENT_INFO), f::AGENT_INFO.labels)
        .expect("valid metric");
    g.with_label_values(&[env!("CARGO_PKG_VERSION"), &gds_api::model::kernel_release()])
        .set(1);
    g
}

/// `gds_slow_events_total`: slow events that reached user space. The kernel counts every slow
/// request (`gds_slow_requests_total`); those it could not hand over are
/// `gds_trace_dropped_total{reason="ringbuf_full"}`, so the three always add up.
pub fn slow_events_received() -> prometheus::IntCounter {
    prometheus::IntCounter::with_opts(opts(&f::SLOW_EVENTS)).expect("valid metric")
}

/// `gds_agent_tracefs_available`: 1 while tracefs is mounted in the agent's mount namespace
/// (kept current by `tracefs::spawn_watch`). Tracing does not depend on it once attached; a
/// restart with `--attach classic` does.
pub fn tracefs_available() -> prometheus::IntGauge {
    prometheus::IntGauge::with_opts(opts(&f::TRACEFS_AVAILABLE)).expect("valid metric")
}
