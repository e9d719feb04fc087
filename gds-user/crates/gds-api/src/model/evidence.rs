//! Why a request is stuck: the evidence read once when its stall is detected, and the cause
//! named from it by rules.
//!
//! The readers are in `gds_host::evidence` (bounded `/proc` and `/sys` reads); this module
//! decides what to read for a request ([`capture`]) and what it means ([`explain`]). The
//! causes are a small closed set, each with the evidence that made it, so a metric label, an
//! alert and the on-call engineer all see the same words.

use gds_host::{
    bounded::HostRoot,
    evidence::{self as host, DiskEvidence, IoLimit, TaskCgroups, ThreadEvidence},
};
use serde::{Deserialize, Serialize};

use super::{Layer, Request, Stage};

/// What the host said about a stalled request when its stall was detected.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evidence {
    /// The threads involved: the submitter, and for io_uring the io-wq workers serving it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub threads: Vec<ThreadEvidence>,
    /// The disk's queue (block and NVMe requests, io_uring passthrough once at a device).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<DiskEvidence>,
    /// The submitter's cgroups (v1 blkio, v2), where I/O limits apply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroups: Option<TaskCgroups>,
    /// Limits of those cgroups (or their ancestors) on the disk or a disk below it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub limits: Vec<IoLimit>,
    /// What could not be read (a thread gone, no permission): the evidence is partial.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub missing: Vec<String>,
    /// A file call's file: the path of the caller's descriptor open on its inode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// How long the reads took, microseconds: the capture's cost, paid once per stall.
    #[serde(default)]
    pub capture_us: u64,
}

/// The causes a stall can be given. Bounded: one metric series per (layer, disk, cause).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CauseKind {
    /// A cgroup I/O limit (v1 `blkio.throttle.*`, v2 `io.max`) holds the request's disk.
    Throttled,
    /// A thread serving the request waits for a pipe, socket or eventfd to have data.
    WaitingForData,
    /// A block or NVMe request issued to the device and not completed by it.
    Device,
    /// None of the rules matched; the evidence is still shown.
    Unknown,
}

impl CauseKind {
    pub const ALL: [CauseKind; 4] = [
        CauseKind::Throttled,
        CauseKind::WaitingForData,
        CauseKind::Device,
        CauseKind::Unknown,
    ];

    /// The metric label and JSON value.
    pub fn label(self) -> &'static str {
        match self {
            CauseKind::Throttled => "throttled",
            CauseKind::WaitingForData => "waiting_for_data",
            CauseKind::Device => "device",
            CauseKind::Unknown => "unknown",
        }
    }
}

/// A named cause and the one line of evidence that made it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cause {
    pub kind: CauseKind,
    /// The evidence behind it (`cgroup /g (v1) blkio.throttle.read_bps_device 253:0
    /// rbps=65536`, `thread 12 iou-wrk-11 waits in pipe_read`).
    pub because: String,
}

impl Default for Cause {
    fn default() -> Self {
        Cause {
            kind: CauseKind::Unknown,
            because: String::new(),
        }
    }
}

/// Kernel functions in which a thread waits for another party to produce data, and what that
/// party is. Matched against wchan and every frame of the stack (names as in 6.x; older
/// kernels' pipe wait was `pipe_wait`).
const WAITS_FOR_DATA: &[(&str, &str)] = &[
    ("pipe_read", "pipe"),
    ("anon_pipe_read", "pipe"),
    ("fifo_pipe_read", "pipe"),
    ("pipe_wait", "pipe"),
    ("pipe_wait_readable", "pipe"),
    ("sk_wait_data", "socket"),
    ("unix_stream_read_generic", "socket"),
    ("unix_stream_data_wait", "socket"),
    ("__skb_wait_for_more_packets", "socket"),
    ("__skb_recv_datagram", "socket"),
    ("tcp_recvmsg", "socket"),
    ("inet_recvmsg", "socket"),
    ("eventfd_read", "eventfd"),
];

/// Distinct captures one scan makes at most. A hung disk under load makes thousands of stalls
/// in one scan; they share a few threads and one disk, so captures are shared by (layer,
/// thread, disk) and the scan stays within its interval. Beyond the bound a stall's cause is
/// `unknown`, saying why.
pub const CAPTURES_PER_SCAN: usize = 64;

/// The captures of one scan: each (layer, pid, tid, disk) read once, at most
/// [`CAPTURES_PER_SCAN`] of them.
/// `capture` reads one request's evidence: [`capture`] under a root, or a round trip to the
/// thread that holds what the reads need (the agent's).
pub struct ScanCaptures<F> {
    capture: F,
    seen: std::collections::HashMap<(Layer, u32, u32, String), Evidence>,
}

impl<F: FnMut(&Request) -> Evidence> ScanCaptures<F> {
    pub fn new(capture: F) -> Self {
        ScanCaptures {
            capture,
            seen: std::collections::HashMap::new(),
        }
    }

    /// The cause and evidence of a new stall (the shape
    /// [`crate::stall::StallDetector::scan_explained`] takes); the evidence only with the first
    /// stall of each capture.
    pub fn explain(&mut self, req: &Request) -> (Cause, Option<Evidence>) {
        let key = (req.layer, req.ctx.pid, req.ctx.tid, req.target.disk.clone());
        // Later stalls of a shared capture carry its cause but not a copy of the evidence:
        // ten thousand copies of one stack would make every report and scrape megabytes.
        if let Some(ev) = self.seen.get(&key) {
            return (explain(req, ev), None);
        }
        {
            if self.seen.len() >= CAPTURES_PER_SCAN {
                return (
                    Cause {
                        kind: CauseKind::Unknown,
                        because: format!(
                            "not captured: more than {CAPTURES_PER_SCAN} threads and disks stalled in one scan"
                        ),
                    },
                    None,
                );
            }
            let ev = (self.capture)(req);
            let cause = explain(req, &ev);
            self.seen.insert(key, ev.clone());
            (cause, Some(ev))
        }
    }
}

/// io_uring opcodes that wait for data when poll is armed for them (a write armed waits for
/// room, a poll or accept for an event: not data).
const READS: &[&str] = &[
    "READ",
    "READV",
    "READ_FIXED",
    "RECV",
    "RECVMSG",
    "READ_MULTISHOT",
    "RECV_ZC",
];

/// Reads the evidence for `req` (bounded reads under `root`; a few dozen small files).
pub fn capture(root: &HostRoot, req: &Request) -> Evidence {
    let t0 = std::time::Instant::now();
    let mut ev = Evidence::default();
    let (pid, tid) = (req.ctx.pid, req.ctx.tid);
    if pid != 0 && tid != 0 {
        let mut tids = vec![tid];
        if req.layer == Layer::Uring {
            tids.extend(host::io_wq_workers(root, pid, tid));
        }
        for t in tids {
            match host::thread(root, pid, t) {
                Ok(th) => ev.threads.push(th),
                Err(e) => ev.missing.push(e.to_string()),
            }
        }
        match host::task_cgroups(root, pid, tid) {
            Ok(c) => ev.cgroups = Some(c),
            Err(e) => ev.missing.push(e.to_string()),
        }
    }
    if let (Some(ino), Some(dev)) = (req.target.inode, req.target.file_dev)
        && pid != 0
    {
        match host::fd_path(root, pid, dev, ino) {
            Ok(path) => ev.file = path,
            Err(e) => ev.missing.push(e.to_string()),
        }
    }
    if req.target.disk != "unknown" && !req.target.disk.is_empty() {
        match host::disk(root, &req.target.disk) {
            Ok(d) => ev.disk = Some(d),
            Err(e) => ev.missing.push(e.to_string()),
        }
    }
    if let (Some(c), Some(d)) = (&ev.cgroups, &ev.disk) {
        let devices: Vec<&str> = d.devices().collect();
        ev.limits = host::io_limits(root, c, &devices);
    }
    ev.capture_us = u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX);
    ev
}

/// Names the cause of `req`'s stall from `ev`, by the first rule that holds:
/// 1. `throttled`: a cgroup limit in force on its disk (or one below it);
/// 2. `waiting_for_data`: a thread serving it sleeps in a pipe, socket or eventfd wait
///    (wchan or stack);
/// 3. `device`: a block or NVMe request at the device stage;
/// 4. `unknown`.
pub fn explain(req: &Request, ev: &Evidence) -> Cause {
    if let Some(l) = ev.limits.first() {
        let more = match ev.limits.len() {
            1 => String::new(),
            n => format!(" (+{} more)", n - 1),
        };
        return Cause {
            kind: CauseKind::Throttled,
            because: format!("{l}{more}"),
        };
    }
    // An io_uring submitter is free while its request waits: where it sleeps (a socket of
    // its own, a futex) says nothing about the request. Only the io-wq workers serving it
    // wait for the request.
    let serving = |t: &&ThreadEvidence| req.layer != Layer::Uring || t.comm.starts_with("iou-wrk-");
    for t in ev.threads.iter().filter(serving) {
        let wait = std::iter::once(t.wchan.as_str())
            .chain(t.functions())
            .find_map(|f| WAITS_FOR_DATA.iter().find(|(w, _)| *w == f));
        if let Some((function, what)) = wait {
            return Cause {
                kind: CauseKind::WaitingForData,
                because: format!(
                    "thread {} ({}) state {} waits for a {what} in {function}",
                    t.tid, t.comm, t.state
                ),
            };
        }
    }
    if req.layer == Layer::Uring && req.poll_armed && READS.contains(&req.opcode.as_str()) {
        return Cause {
            kind: CauseKind::WaitingForData,
            because: format!(
                "io_uring {} armed poll on its file (pipe, socket, eventfd): no data yet",
                req.opcode
            ),
        };
    }
    if matches!(req.layer, Layer::Block | Layer::Nvme) && req.stage == Stage::Device {
        let queue = ev.disk.as_ref().map_or(String::new(), |d| {
            format!(
                "; {} in flight {} reads {} writes, nr_requests {}, scheduler {}",
                d.disk,
                d.inflight_reads,
                d.inflight_writes,
                d.nr_requests.map_or("?".into(), |n| n.to_string()),
                d.scheduler.as_deref().unwrap_or("?")
            )
        });
        return Cause {
            kind: CauseKind::Device,
            because: format!(
                "{} request at the device for {:.1} s{queue}",
                req.layer.label(),
                req.age_seconds
            ),
        };
    }
    let because = ev
        .threads
        .first()
        .map(|t| {
            format!(
                "thread {} ({}) state {} wchan {}",
                t.tid,
                t.comm,
                t.state,
                if t.wchan.is_empty() { "-" } else { &t.wchan }
            )
        })
        .unwrap_or_else(|| "no thread or device evidence".into());
    Cause {
        kind: CauseKind::Unknown,
        because,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gds_host::evidence::CgroupVersion;

    fn req(layer: Layer, stage: Stage) -> Request {
        Request {
            layer,
            opcode: "read".into(),
            ctx: Default::default(),
            target: Default::default(),
            origin: None,
            age_seconds: 2.0,
            stage,
            nvme: None,
            poll_armed: false,
            block_cause: None,
            key: Default::default(),
        }
    }

    fn waiting(function: &str) -> ThreadEvidence {
        ThreadEvidence {
            tid: 12,
            comm: "iou-wrk-11".into(),
            state: "S".into(),
            stack: vec![format!("{function}+0x1/0x2"), "io_read+0x5/0x9".into()],
            ..Default::default()
        }
    }

    #[test]
    fn a_limit_on_the_disk_is_throttled_before_anything_else() {
        let ev = Evidence {
            limits: vec![IoLimit {
                cgroup: "/g".into(),
                version: CgroupVersion::V1,
                file: "blkio.throttle.read_iops_device".into(),
                device: "253:0".into(),
                kind: "riops".into(),
                value: 1,
            }],
            threads: vec![waiting("pipe_read")],
            ..Default::default()
        };
        let c = explain(&req(Layer::Block, Stage::Device), &ev);
        assert_eq!(c.kind, CauseKind::Throttled);
        assert!(
            c.because.contains("/g") && c.because.contains("riops=1"),
            "{c:?}"
        );
    }

    #[test]
    fn a_pipe_wait_in_the_stack_is_waiting_for_data() {
        let ev = Evidence {
            threads: vec![ThreadEvidence::default(), waiting("pipe_read")],
            ..Default::default()
        };
        let c = explain(&req(Layer::Uring, Stage::Queue), &ev);
        assert_eq!(c.kind, CauseKind::WaitingForData);
        assert!(
            c.because.contains("pipe") && c.because.contains("iou-wrk-11"),
            "{c:?}"
        );
        let sock = Evidence {
            threads: vec![ThreadEvidence {
                wchan: "sk_wait_data".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        assert_eq!(
            explain(&req(Layer::Uring, Stage::Queue), &sock).kind,
            CauseKind::Unknown,
            "an io_uring submitter's own wait is not the request's"
        );
        assert!(
            explain(&req(Layer::Cufile, Stage::Queue), &sock)
                .because
                .contains("socket")
        );
    }

    #[test]
    fn an_io_uring_read_armed_for_poll_is_waiting_for_data() {
        let mut r = req(Layer::Uring, Stage::Queue);
        r.opcode = "READ".into();
        r.poll_armed = true;
        let c = explain(&r, &Evidence::default());
        assert_eq!(c.kind, CauseKind::WaitingForData, "{c:?}");
        r.opcode = "WRITE".into();
        assert_eq!(
            explain(&r, &Evidence::default()).kind,
            CauseKind::Unknown,
            "a write armed waits for room, not data"
        );
    }

    #[test]
    fn a_device_request_without_limits_is_device_else_unknown() {
        let ev = Evidence {
            threads: vec![waiting("io_schedule")],
            ..Default::default()
        };
        assert_eq!(
            explain(&req(Layer::Nvme, Stage::Device), &ev).kind,
            CauseKind::Device
        );
        assert_eq!(
            explain(&req(Layer::Block, Stage::Queue), &ev).kind,
            CauseKind::Unknown
        );
        assert_eq!(
            explain(&req(Layer::Uring, Stage::Device), &ev).kind,
            CauseKind::Unknown
        );
    }

    #[test]
    fn labels_are_distinct() {
        let mut l: Vec<_> = CauseKind::ALL.iter().map(|c| c.label()).collect();
        l.dedup();
        assert_eq!(l.len(), CauseKind::ALL.len());
    }

    #[test]
    fn a_scan_captures_each_thread_and_disk_once_and_at_most_the_bound() {
        let mut calls = 0;
        let mut scan = ScanCaptures::new(|_: &Request| {
            calls += 1;
            Evidence {
                threads: vec![waiting("pipe_read")],
                ..Default::default()
            }
        });
        let mut r = req(Layer::Cufile, Stage::Queue);
        let (c, ev) = scan.explain(&r);
        assert_eq!(c.kind, CauseKind::WaitingForData);
        assert!(ev.is_some());
        let (c, ev) = scan.explain(&r);
        assert_eq!(
            c.kind,
            CauseKind::WaitingForData,
            "the shared capture's cause"
        );
        assert!(ev.is_none(), "no second copy");
        // tid 0 was the first capture: 63 more fill the bound.
        for tid in 1..CAPTURES_PER_SCAN as u32 {
            r.ctx.tid = tid;
            scan.explain(&r);
        }
        let (c, ev) = scan.explain(&r);
        assert_eq!(
            c.kind,
            CauseKind::WaitingForData,
            "tid {} shared",
            r.ctx.tid
        );
        assert!(ev.is_none());
        r.ctx.tid = 10_000;
        let (c, _) = scan.explain(&r);
        assert_eq!(c.kind, CauseKind::Unknown, "past the bound: {c:?}");
        drop(scan);
        assert_eq!(calls, CAPTURES_PER_SCAN);
    }
}
