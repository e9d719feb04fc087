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

use super::{
    Layer, Request, Stage,
    cufile::{CufileCounters, CufileReport},
};

/// Other calls of a cuFile process listed in its evidence; `other_calls_total` counts all.
pub const CUFILE_OTHER_CALLS_MAX: usize = 16;

/// A stalled cuFile call's process, as the cuFile layer saw it when the stall was detected.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CufileEvidence {
    /// The path the call's I/O is taking: the one most of its file's earlier reads and writes
    /// took, else the process's (`compat`, `nvfs`, `p2pdma`); absent before any succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Whether `path` is the file's (true) or, with no call on the file done yet, the
    /// process's.
    #[serde(default)]
    pub path_of_file: bool,
    /// Why the file's I/O goes compat (not O_DIRECT, no nvidia-fs, …), where it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compat_reason: Option<String>,
    /// The process's successful calls by path so far.
    #[serde(default)]
    pub process_path_calls: std::collections::BTreeMap<String, u64>,
    /// The process's other cuFile calls in flight, oldest first (at most
    /// [`CUFILE_OTHER_CALLS_MAX`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub other_calls: Vec<CufileOtherCall>,
    #[serde(default)]
    pub other_calls_total: usize,
}

/// One other call in flight of a stalled cuFile call's process.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CufileOtherCall {
    pub tid: u32,
    pub op: String,
    pub age_seconds: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
}

/// The cuFile evidence of `req` (a cuFile call) from the cuFile report and the requests in
/// flight of the same scan; `None` for other layers or a process the report does not list.
pub fn cufile_evidence(
    req: &Request,
    report: &CufileReport,
    inflight: &[Request],
) -> Option<CufileEvidence> {
    if req.layer != Layer::Cufile {
        return None;
    }
    let pid = req.ctx.pid;
    let mut others: Vec<&Request> = inflight
        .iter()
        .filter(|r| r.layer == Layer::Cufile && r.ctx.pid == pid && r.key != req.key)
        .collect();
    others.sort_by(|a, b| b.age_seconds.total_cmp(&a.age_seconds));
    let process = report.processes.iter().find(|p| p.pid == pid);
    if process.is_none() && others.is_empty() {
        return None;
    }
    let file = process.and_then(|p| {
        p.files
            .iter()
            .find(|f| req.target.file.as_deref() == Some(f.path.as_str()))
    });
    let main = |c: &CufileCounters| c.main_path().map(str::to_owned);
    let file_path = file.and_then(|f| main(&f.counters));
    Some(CufileEvidence {
        path_of_file: file_path.is_some(),
        path: file_path.or_else(|| process.and_then(|p| main(&p.counters))),
        compat_reason: file.and_then(|f| f.compat_reason.clone()),
        process_path_calls: process
            .map(|p| p.counters.path_calls.clone())
            .unwrap_or_default(),
        other_calls_total: others.len(),
        other_calls: others
            .iter()
            .take(CUFILE_OTHER_CALLS_MAX)
            .map(|r| CufileOtherCall {
                tid: r.ctx.tid,
                op: r.opcode.clone(),
                age_seconds: r.age_seconds,
                file: r.target.file.clone(),
            })
            .collect(),
    })
}

/// What the host said about a stalled request when its stall was detected.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
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
    /// A cuFile call's process as the cuFile layer saw it: the path its I/O takes, the
    /// process's other calls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cufile: Option<CufileEvidence>,
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
    /// A thread serving the request waits for a page of the page cache: its lock (another
    /// request is reading it in) or its writeback, or the kernel holds a writer back until
    /// dirty pages are written.
    PageCache,
    /// A thread serving the request waits for a free request (tag) on the disk's queue, or a
    /// block request waits to be issued while the disk holds as many as its queue allows.
    QueueFull,
    /// A block or NVMe request issued to the device and not completed by it.
    Device,
    /// None of the rules matched; the evidence is still shown.
    Unknown,
}

impl CauseKind {
    pub const ALL: [CauseKind; 6] = [
        CauseKind::Throttled,
        CauseKind::WaitingForData,
        CauseKind::PageCache,
        CauseKind::QueueFull,
        CauseKind::Device,
        CauseKind::Unknown,
    ];

    /// The metric label and JSON value.
    pub fn label(self) -> &'static str {
        match self {
            CauseKind::Throttled => "throttled",
            CauseKind::WaitingForData => "waiting_for_data",
            CauseKind::PageCache => "page_cache",
            CauseKind::QueueFull => "queue_full",
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

/// Kernel functions in which a thread waits on the page cache, and for what (5.16+ folio
/// names, then the page names of older kernels).
const WAITS_FOR_PAGES: &[(&str, &str)] = &[
    ("folio_wait_bit_common", "a page's lock or writeback bit"),
    ("folio_wait_bit", "a page's lock or writeback bit"),
    ("folio_wait_bit_killable", "a page's lock"),
    ("__folio_lock", "a page's lock"),
    ("__folio_lock_killable", "a page's lock"),
    ("__folio_lock_or_retry", "a page's lock"),
    ("folio_wait_writeback", "a page's writeback"),
    ("folio_wait_stable", "a page's writeback"),
    ("wait_on_page_bit_common", "a page's lock or writeback bit"),
    ("__lock_page", "a page's lock"),
    ("__lock_page_killable", "a page's lock"),
    ("wait_on_page_writeback", "a page's writeback"),
    (
        "balance_dirty_pages",
        "dirty pages to be written back (dirty throttling)",
    ),
];

/// Kernel functions in which a thread waits for room on a disk's queue.
const WAITS_FOR_QUEUE: &[(&str, &str)] = &[
    ("blk_mq_get_tag", "a free tag (request) on the disk's queue"),
    (
        "blk_queue_enter",
        "the disk's queue to be usable (frozen or suspended)",
    ),
    (
        "bio_queue_enter",
        "the disk's queue to be usable (frozen or suspended)",
    ),
    (
        "rq_qos_wait",
        "the disk's QoS policy (writeback throttling, io.latency, io.cost)",
    ),
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
///    (wchan or stack), or an io_uring read armed poll;
/// 3. `page_cache`: a thread serving it waits for a page's lock or writeback;
/// 4. `queue_full`: a thread serving it waits for a tag or queue QoS, or a block request not
///    yet issued while the disk holds `nr_requests`;
/// 5. `device`: a block or NVMe request at the device stage (first an NVMe controller that
///    is not `live`; then the disk's queue, NVMe commands outstanding and recent errors);
/// 6. `unknown`.
///
/// The root cause comes first: a limit holds the queue that makes a thread wait for a tag,
/// and a slow device holds the page whose lock a reader waits for.
pub fn explain(req: &Request, ev: &Evidence) -> Cause {
    let at_device = matches!(req.layer, Layer::Block | Layer::Nvme) && req.stage == Stage::Device;
    // A request the driver holds has passed its own disk's throttle: only a limit on a disk
    // below (a loop or dm device's lower bios) still holds it.
    let limits: Vec<&IoLimit> = ev
        .limits
        .iter()
        .filter(|l| l.limits())
        .filter(|l| !at_device || ev.disk.as_ref().is_none_or(|d| l.device != d.dev))
        .collect();
    if let Some(l) = limits.first() {
        let more = match limits.len() {
            1 => String::new(),
            n => format!(" (+{} more)", n - 1),
        };
        return Cause {
            kind: CauseKind::Throttled,
            because: format!("{l}{more}"),
        };
    }
    // The threads whose waits are the request's. An io_uring submitter is free while its
    // request waits: where it sleeps (a socket of its own, a futex) says nothing about the
    // request; only the io-wq workers serving it wait for it. A block or NVMe request, once
    // allocated, is the queue's and the device's: its submitter waits for it in io_schedule
    // or has moved on (to a pipe of its own, say), so no thread's wait names its cause.
    let serving: Vec<&ThreadEvidence> = match req.layer {
        Layer::Block | Layer::Nvme => Vec::new(),
        Layer::Uring => ev
            .threads
            .iter()
            .filter(|t| t.comm.starts_with("iou-wrk-"))
            .collect(),
        _ => ev.threads.iter().collect(),
    };
    if let Some((t, function, what)) = waits_in(&serving, WAITS_FOR_DATA) {
        return Cause {
            kind: CauseKind::WaitingForData,
            because: format!(
                "thread {} ({}) state {} waits for a {what} in {function}",
                t.tid, t.comm, t.state
            ),
        };
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
    if let Some((t, function, what)) = waits_in(&serving, WAITS_FOR_PAGES) {
        return Cause {
            kind: CauseKind::PageCache,
            because: format!(
                "thread {} ({}) state {} waits for {what} in {function}",
                t.tid, t.comm, t.state
            ),
        };
    }
    if let Some((t, function, what)) = waits_in(&serving, WAITS_FOR_QUEUE) {
        return Cause {
            kind: CauseKind::QueueFull,
            because: format!(
                "thread {} ({}) state {} waits for {what} in {function}{}",
                t.tid,
                t.comm,
                t.state,
                queue_text(ev.disk.as_ref())
            ),
        };
    }
    if req.layer == Layer::Block
        && req.stage == Stage::Queue
        && let Some(d) = &ev.disk
        && let Some(n) = d.nr_requests
        && n > 0
        && d.inflight_reads + d.inflight_writes >= n
    {
        return Cause {
            kind: CauseKind::QueueFull,
            because: format!(
                "block request not issued for {:.1} s while the queue is full{}",
                req.age_seconds,
                queue_text(Some(d))
            ),
        };
    }
    if at_device {
        // A controller that is not live holds every command on it: that comes first.
        let not_live: Vec<String> = ev
            .disk
            .iter()
            .filter_map(|d| d.nvme.as_ref())
            .flat_map(|n| n.not_live())
            .map(|c| format!("controller {} {}; ", c.name, c.state))
            .collect();
        // The disk's queue and, for NVMe, the commands outstanding and recent errors
        // (`DiskEvidence`'s display; the not-live controllers are already said).
        let queue = ev.disk.as_ref().map_or(String::new(), |d| {
            let mut d = d.clone();
            if let Some(n) = d.nvme.as_mut() {
                n.controllers.retain(|c| c.state == "live");
            }
            format!("; {d}")
        });
        return Cause {
            kind: CauseKind::Device,
            because: format!(
                "{}{} request at the device for {:.1} s{queue}",
                not_live.concat(),
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
    let because = match ev
        .cufile
        .as_ref()
        .and_then(|c| c.path.as_ref().map(|p| (c, p)))
    {
        Some((c, path)) => format!(
            "{because}; cuFile {} I/O takes {path}{}",
            if c.path_of_file {
                "file's"
            } else {
                "process's"
            },
            c.compat_reason
                .as_deref()
                .map_or(String::new(), |r| format!(" ({r})"))
        ),
        None => because,
    };
    Cause {
        kind: CauseKind::Unknown,
        because,
    }
}

/// The first of `threads` whose wchan or a stack frame is in `table`, with the function and
/// what it waits for.
fn waits_in<'a>(
    threads: &[&'a ThreadEvidence],
    table: &'static [(&'static str, &'static str)],
) -> Option<(&'a ThreadEvidence, &'static str, &'static str)> {
    threads.iter().find_map(|t| {
        std::iter::once(t.wchan.as_str())
            .chain(t.functions())
            .find_map(|f| table.iter().find(|(w, _)| *w == f))
            .map(|(function, what)| (*t, *function, *what))
    })
}

/// `; vda in flight 3 reads 0 writes, nr_requests 64, scheduler none`, or nothing without the
/// disk's evidence.
fn queue_text(disk: Option<&DiskEvidence>) -> String {
    disk.map_or(String::new(), |d| format!("; {d}"))
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

    fn nvme_disk(state: &str, outstanding: Option<u64>) -> DiskEvidence {
        DiskEvidence {
            disk: "nvme1n1".into(),
            inflight_reads: 32,
            nr_requests: Some(1023),
            scheduler: Some("none".into()),
            nvme: Some(host::NvmeDiskEvidence {
                controllers: vec![host::NvmeController {
                    name: "nvme1".into(),
                    state: state.into(),
                    transport: Some("pcie".into()),
                }],
                outstanding,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_device_stall_names_the_commands_outstanding_and_a_controller_not_live() {
        let live = Evidence {
            disk: Some(nvme_disk("live", Some(40))),
            ..Default::default()
        };
        let c = explain(&req(Layer::Nvme, Stage::Device), &live);
        assert_eq!(c.kind, CauseKind::Device);
        assert_eq!(
            c.because,
            "nvme request at the device for 2.0 s; nvme1n1 in flight 32 reads 0 writes, \
             nr_requests 1023, scheduler none; 40 NVMe commands outstanding"
        );
        let resetting = Evidence {
            disk: Some(nvme_disk("resetting", Some(40))),
            ..Default::default()
        };
        let c = explain(&req(Layer::Block, Stage::Device), &resetting);
        assert_eq!(c.kind, CauseKind::Device);
        assert!(
            c.because
                .starts_with("controller nvme1 resetting; block request at the device"),
            "{c:?}"
        );
        assert_eq!(
            c.because.matches("resetting").count(),
            1,
            "said once: {c:?}"
        );
        assert!(c.because.contains("40 NVMe commands outstanding"), "{c:?}");
        let mut errors = nvme_disk("live", None);
        let n = errors.nvme.as_mut().unwrap();
        n.errors = vec![host::NvmeStatusCount {
            status: "Command Aborted By Host".into(),
            count: 16,
        }];
        n.errors_window_ms = 30_000;
        let c = explain(
            &req(Layer::Nvme, Stage::Device),
            &Evidence {
                disk: Some(errors),
                ..Default::default()
            },
        );
        assert!(
            c.because
                .ends_with("NVMe errors in the last 30 s: 16 Command Aborted By Host")
                && !c.because.contains("outstanding"),
            "untraced outstanding is not said: {c:?}"
        );
    }

    #[test]
    fn a_page_lock_or_writeback_wait_is_page_cache() {
        let ev = Evidence {
            threads: vec![ThreadEvidence {
                tid: 7,
                comm: "python3".into(),
                state: "D".into(),
                stack: vec![
                    "folio_wait_bit_common+0x13f/0x340".into(),
                    "filemap_update_page+0x2a1/0x2f0".into(),
                    "filemap_read+0x10a/0x340".into(),
                ],
                ..Default::default()
            }],
            ..Default::default()
        };
        let c = explain(&req(Layer::Cufile, Stage::Queue), &ev);
        assert_eq!(c.kind, CauseKind::PageCache, "{c:?}");
        assert!(c.because.contains("folio_wait_bit_common") && c.because.contains("python3"));
        let dirty = Evidence {
            threads: vec![ThreadEvidence {
                wchan: "balance_dirty_pages".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        assert!(
            explain(&req(Layer::Cufile, Stage::Queue), &dirty)
                .because
                .contains("dirty throttling")
        );
    }

    #[test]
    fn a_tag_wait_or_a_full_queue_is_queue_full() {
        let disk = DiskEvidence {
            disk: "vdb".into(),
            dev: "254:16".into(),
            inflight_reads: 2,
            inflight_writes: 0,
            nr_requests: Some(2),
            scheduler: Some("none".into()),
            ..Default::default()
        };
        let tag_wait = Evidence {
            threads: vec![ThreadEvidence {
                tid: 9,
                comm: "fio".into(),
                state: "D".into(),
                stack: vec![
                    "io_schedule+0x46/0x70".into(),
                    "blk_mq_get_tag+0x11e/0x2d0".into(),
                    "__blk_mq_alloc_requests+0x12b/0x330".into(),
                ],
                ..Default::default()
            }],
            disk: Some(disk.clone()),
            ..Default::default()
        };
        let c = explain(&req(Layer::Cufile, Stage::Queue), &tag_wait);
        assert_eq!(c.kind, CauseKind::QueueFull, "{c:?}");
        assert!(c.because.contains("free tag") && c.because.contains("nr_requests 2"));
        // Not issued while the queue holds nr_requests: queue_full without a stack.
        let full = Evidence {
            disk: Some(disk.clone()),
            ..Default::default()
        };
        assert_eq!(
            explain(&req(Layer::Block, Stage::Queue), &full).kind,
            CauseKind::QueueFull
        );
        // Room on the queue: the wait is something else.
        let room = Evidence {
            disk: Some(DiskEvidence {
                inflight_reads: 1,
                ..disk
            }),
            ..Default::default()
        };
        assert_eq!(
            explain(&req(Layer::Block, Stage::Queue), &room).kind,
            CauseKind::Unknown
        );
    }

    #[test]
    fn the_root_cause_wins_over_what_it_makes_threads_wait_for() {
        // A throttled disk fills the queue and holds the pages readers wait for.
        let ev = Evidence {
            limits: vec![IoLimit {
                cgroup: "/g".into(),
                version: CgroupVersion::V2,
                file: "io.max".into(),
                device: "254:0".into(),
                kind: "riops".into(),
                value: 1,
            }],
            threads: vec![waiting("blk_mq_get_tag"), waiting("folio_wait_bit_common")],
            ..Default::default()
        };
        assert_eq!(
            explain(&req(Layer::Cufile, Stage::Queue), &ev).kind,
            CauseKind::Throttled
        );
        // A pipe wait is named before a page wait of another thread.
        let ev = Evidence {
            threads: vec![waiting("folio_wait_bit_common"), waiting("pipe_read")],
            ..Default::default()
        };
        assert_eq!(
            explain(&req(Layer::Cufile, Stage::Queue), &ev).kind,
            CauseKind::WaitingForData
        );
    }

    #[test]
    fn a_cufile_stall_names_the_path_its_file_takes_and_the_other_calls() {
        use super::super::cufile::{CufileCounters, CufileFile, CufileProcess};
        let counters = |compat: u64, nvfs: u64| CufileCounters {
            path_calls: [("compat".to_owned(), compat), ("nvfs".to_owned(), nvfs)]
                .into_iter()
                .filter(|(_, n)| *n > 0)
                .collect(),
            ..Default::default()
        };
        let report = CufileReport {
            processes: vec![CufileProcess {
                pid: 7,
                comm: "python3".into(),
                cgroup: None,
                alive: true,
                counters: counters(3, 40),
                peer_ios: 0,
                outside_cufile: None,
                files: vec![CufileFile {
                    fd: 5,
                    path: "/data/shard.bin".into(),
                    counters: counters(3, 0),
                    active: 2,
                    compat_reason: Some("file not opened with O_DIRECT".into()),
                }],
                files_omitted: 0,
                user: "trusted".into(),
            }],
            ..Default::default()
        };
        let mut r = req(Layer::Cufile, Stage::Queue);
        r.ctx.pid = 7;
        r.ctx.tid = 8;
        r.target.file = Some("/data/shard.bin".into());
        let mut other = r.clone();
        other.ctx.tid = 9;
        other.key.req = 1;
        other.age_seconds = 5.0;
        let mut stranger = other.clone();
        stranger.ctx.pid = 70;
        let ev = Evidence {
            cufile: cufile_evidence(&r, &report, &[r.clone(), other, stranger]),
            ..Default::default()
        };
        let c = ev.cufile.as_ref().unwrap();
        assert_eq!(
            c.path.as_deref(),
            Some("compat"),
            "the file's path, not the process's"
        );
        assert!(c.path_of_file);
        assert_eq!(c.process_path_calls["nvfs"], 40);
        assert_eq!((c.other_calls_total, c.other_calls[0].tid), (1, 9), "{c:?}");
        let cause = explain(&r, &ev);
        assert_eq!(cause.kind, CauseKind::Unknown);
        assert!(
            cause
                .because
                .contains("takes compat (file not opened with O_DIRECT)"),
            "{cause:?}"
        );
        // A file with no call done yet: the process's path, said so.
        r.target.file = Some("/data/new.bin".into());
        let c = cufile_evidence(&r, &report, &[]).unwrap();
        assert_eq!((c.path.as_deref(), c.path_of_file), (Some("nvfs"), false));
        assert_eq!(
            cufile_evidence(&req(Layer::Block, Stage::Queue), &report, &[]),
            None
        );
    }

    #[test]
    fn a_block_request_at_the_device_is_not_its_submitters_wait_nor_its_own_disks_limit() {
        // Seen: a discard issued by a process that then read a pipe was called
        // waiting_for_data.
        let disk = DiskEvidence {
            disk: "vda".into(),
            dev: "254:0".into(),
            ..Default::default()
        };
        let limit = |device: &str| IoLimit {
            cgroup: "/g".into(),
            version: CgroupVersion::V1,
            file: "blkio.throttle.read_iops_device".into(),
            device: device.into(),
            kind: "riops".into(),
            value: 1,
        };
        let ev = Evidence {
            threads: vec![waiting("anon_pipe_read"), waiting("folio_wait_bit_common")],
            disk: Some(disk.clone()),
            limits: vec![limit("254:0")],
            ..Default::default()
        };
        let c = explain(&req(Layer::Block, Stage::Device), &ev);
        assert_eq!(c.kind, CauseKind::Device, "{c:?}");
        // A latency target is evidence, never a limit.
        let target = Evidence {
            limits: vec![IoLimit {
                kind: "target".into(),
                file: "io.latency".into(),
                ..limit("254:0")
            }],
            ..Default::default()
        };
        assert_eq!(
            explain(&req(Layer::Block, Stage::Queue), &target).kind,
            CauseKind::Unknown
        );
        // Not yet issued, its disk's limit holds it.
        assert_eq!(
            explain(&req(Layer::Block, Stage::Queue), &ev).kind,
            CauseKind::Throttled
        );
        // At a loop device whose lower disk is limited: throttled.
        let ev = Evidence {
            disk: Some(DiskEvidence {
                disk: "loop0".into(),
                dev: "7:0".into(),
                lower: vec!["254:0".into()],
                ..Default::default()
            }),
            limits: vec![limit("254:0")],
            ..Default::default()
        };
        assert_eq!(
            explain(&req(Layer::Block, Stage::Device), &ev).kind,
            CauseKind::Throttled
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
