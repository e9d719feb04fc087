//! Kernel records → model: the one place raw in-flight entries and slow-event records become
//! [`Request`]s and [`SlowEvent`]s with names, process and disk.

use std::collections::HashMap;

use gds_common::{
    BlockInflight, InflightSlot, NvmeInflight, SlowUringEvent, Submitter, cufile::CufileCall,
    file::FileCall,
};

use super::{
    labels,
    request::{
        BlockCause, Context, Layer, NvmeCommand, Request, RequestKey, SlowEvent, SlowNvme, Stage,
        Target, UringOrigin,
    },
};
use crate::raw::{DiskNames, Inflight, Source};
use gds_host::clock::monotonic_ns;

/// `/proc/PID/comm`, or `?` when the process is gone. Read by hand: the file is the name and a
/// newline, nothing to parse (procfs offers comm only through `stat`, 52 fields parsed for it).
pub(crate) fn proc_comm(tgid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{tgid}/comm"))
        .map(|s| s.trim_end().to_owned())
        .unwrap_or_else(|_| "?".into())
}

/// The stage of an in-flight request from what the NVMe programs stamped.
pub fn stage_of(e: &gds_common::InflightReq) -> Stage {
    if e.nvme_setup_ns == 0 {
        Stage::Queue
    } else if e.nvme_complete_ns == 0 {
        Stage::Device
    } else {
        Stage::Completion
    }
}

/// A kernel `comm` buffer as text (up to its NUL).
fn comm_text(comm: &[u8]) -> String {
    let end = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..end]).into_owned()
}

/// Decodes the requests of one scan: process names and cgroups are read once per process per
/// scan.
pub struct Decoder<'a> {
    disks: &'a dyn DiskNames,
    comms: HashMap<u32, String>,
    cgroups: HashMap<u32, Option<gds_host::cgroup::CgroupInfo>>,
}

impl<'a> Decoder<'a> {
    pub fn new(disks: &'a dyn DiskNames) -> Self {
        Decoder {
            disks,
            comms: HashMap::new(),
            cgroups: HashMap::new(),
        }
    }

    fn comm(&mut self, tgid: u32) -> String {
        self.comms
            .entry(tgid)
            .or_insert_with(|| proc_comm(tgid))
            .clone()
    }

    /// The cgroup of thread `tid` of `tgid`, read once per thread per scan.
    fn cgroup(&mut self, tgid: u32, tid: u32) -> Option<gds_host::cgroup::CgroupInfo> {
        if tgid == 0 {
            return None;
        }
        self.cgroups
            .entry(tid)
            .or_insert_with(|| gds_host::cgroup::of_task(tgid, tid))
            .clone()
    }

    /// The context of a process known by its tgid (comm from `/proc`).
    fn context(&mut self, tgid: u32, tid: u32) -> Context {
        Context {
            pid: tgid,
            tid,
            comm: self.comm(tgid),
            cgroup: self.cgroup(tgid, tid),
            cgroup_id: None,
        }
    }

    /// The context the block program recorded at `block_getrq` (comm as the kernel had it
    /// then: the process may be gone).
    fn submitter(&mut self, s: &Submitter) -> Context {
        if s.pid_tgid == 0 {
            return Context {
                comm: "?".into(),
                ..Context::default()
            };
        }
        let (tgid, tid) = ((s.pid_tgid >> 32) as u32, s.pid_tgid as u32);
        Context {
            pid: tgid,
            tid,
            comm: comm_text(&s.comm),
            cgroup: self.cgroup(tgid, tid),
            cgroup_id: Some(s.cgroup),
        }
    }

    /// A block request in flight (`struct request *` `rq`); `uring`: the io_uring request of a
    /// passthrough request (found through its NVMe command), whose process it then names.
    pub fn block(
        &mut self,
        rq: u64,
        b: &BlockInflight,
        uring: Option<&InflightSlot>,
        now_ns: u64,
    ) -> Request {
        // Passthrough (`REQ_OP_DRV_*`) has no position: the command carries its own LBA.
        let passthrough =
            b.op == gds_common::BLOCK_OP_DRV_IN || b.op == gds_common::BLOCK_OP_DRV_OUT;
        let (ctx, origin) = match uring {
            Some(u) if b.submitter.pid_tgid == 0 => (
                self.context(u.value.tgid, u.value.pid),
                Some(UringOrigin {
                    user_data: u.value.user_data,
                    ring: format!("{:#x}", u.value.ring),
                    req: format!("{:#x}", u.key),
                }),
            ),
            _ => (self.submitter(&b.submitter), None),
        };
        let block_cause = block_cause(&b.submitter);
        Request {
            layer: Layer::Block,
            opcode: labels::block_op(b.op).to_owned(),
            ctx,
            target: Target {
                disk: self.disks.disk_name(b.dev),
                sector: (!passthrough).then_some(b.sector),
                bytes: Some(b.bytes.into()),
                inode: (b.submitter.ino != 0).then_some(b.submitter.ino),
                ..Target::default()
            },
            origin,
            age_seconds: now_ns.saturating_sub(b.issue_ns) as f64 / 1e9,
            stage: Stage::Device,
            nvme: None,
            poll_armed: false,
            block_cause,
            key: RequestKey {
                layer: Layer::Block,
                req: rq,
                start_ns: b.issue_ns,
            },
        }
    }

    /// An NVMe command in flight, with the process of the block request it serves (`block`,
    /// the same `struct request *`) or of the io_uring passthrough request it came from
    /// (`uring`).
    pub fn nvme(
        &mut self,
        rq: u64,
        n: &NvmeInflight,
        block: Option<&BlockInflight>,
        uring: Option<&InflightSlot>,
        now_ns: u64,
    ) -> Request {
        let (ctx, origin) = match (uring, block) {
            (Some(u), _) => (
                self.context(u.value.tgid, u.value.pid),
                Some(UringOrigin {
                    user_data: u.value.user_data,
                    ring: format!("{:#x}", u.value.ring),
                    req: format!("{:#x}", u.key),
                }),
            ),
            (None, Some(b)) => (self.submitter(&b.submitter), None),
            (None, None) => (self.submitter(&Submitter::default()), None),
        };
        let rw = n.blocks != 0;
        // The block request it serves says what caused it: the file call (process, thread,
        // file) an O_DIRECT read's command belongs to.
        let (block_cause, inode) = block.map_or((None, None), |b| {
            let w = &b.submitter;
            (block_cause(w), (w.ino != 0).then_some(w.ino))
        });
        Request {
            layer: Layer::Nvme,
            opcode: labels::nvme_opcode(n.opcode, n.admin != 0),
            ctx,
            target: Target {
                disk: self.disks.disk_name(n.dev),
                lba: rw.then_some(n.lba),
                inode,
                ..Target::default()
            },
            origin,
            age_seconds: now_ns.saturating_sub(n.setup_ns) as f64 / 1e9,
            stage: Stage::Device,
            poll_armed: false,
            block_cause,
            nvme: Some(NvmeCommand {
                qid: n.qid,
                cid: n.cid,
                lba: n.lba,
                blocks: n.blocks,
            }),
            key: RequestKey {
                layer: Layer::Nvme,
                req: rq,
                start_ns: n.setup_ns,
            },
        }
    }

    /// A cuFile call in flight on thread `id` (`pid_tgid`); the file is the path of the
    /// descriptor behind its handle, read from `/proc` now, or `fd N` where the agent may not
    /// read it (it dropped its capabilities after attaching: `/proc/PID/fd` of another user's
    /// process, or of one holding capabilities, is refused).
    pub fn cufile(&mut self, id: u64, c: &CufileCall, now_ns: u64) -> Request {
        let (tgid, tid) = ((id >> 32) as u32, id as u32);
        let file = (c.fd >= 0).then(|| {
            std::fs::read_link(format!("/proc/{tgid}/fd/{}", c.fd))
                .map(|p| p.display().to_string())
                .unwrap_or_else(|_| format!("fd {}", c.fd))
        });
        Request {
            layer: Layer::Cufile,
            opcode: labels::cufile_op(c.op).to_owned(),
            ctx: self.context(tgid, tid),
            target: Target {
                file,
                bytes: (c.size != 0).then_some(c.size),
                ..Target::default()
            },
            origin: None,
            age_seconds: now_ns.saturating_sub(c.start_ns) as f64 / 1e9,
            stage: Stage::Queue,
            nvme: None,
            poll_armed: false,
            block_cause: None,
            key: RequestKey {
                layer: Layer::Cufile,
                req: id,
                start_ns: c.start_ns,
            },
        }
    }

    /// A file call in flight (`key`: its `struct kiocb *` or thread). The file is the path of
    /// a descriptor of the process open on the call's (device, inode), found in `/proc` now,
    /// else `inode N on DISK`.
    pub fn file(&mut self, key: u64, c: &FileCall, now_ns: u64) -> Request {
        let (tgid, tid) = ((c.pid_tgid >> 32) as u32, c.pid_tgid as u32);
        let disk = self.disks.disk_name(c.dev);
        // Works where the agent may read the process's descriptors; a stall's evidence, read
        // by the thread that keeps CAP_SYS_PTRACE, names it everywhere else.
        let root = gds_host::bounded::HostRoot::new("/");
        let file = gds_host::evidence::fd_path(&root, tgid, c.dev, c.ino)
            .ok()
            .flatten()
            .unwrap_or_else(|| format!("inode {} on {disk}", c.ino));
        Request {
            layer: Layer::File,
            opcode: if c.direct != 0 {
                format!("{} O_DIRECT", labels::file_op(c.op))
            } else {
                labels::file_op(c.op).to_owned()
            },
            ctx: Context {
                pid: tgid,
                tid,
                comm: comm_text(&c.comm),
                cgroup: self.cgroup(tgid, tid),
                cgroup_id: Some(c.cgroup),
            },
            target: Target {
                disk,
                file: Some(file),
                bytes: (c.bytes != 0).then_some(c.bytes),
                inode: Some(c.ino),
                file_dev: Some(c.dev),
                ..Target::default()
            },
            origin: None,
            age_seconds: now_ns.saturating_sub(c.start_ns) as f64 / 1e9,
            stage: Stage::Queue,
            nvme: None,
            poll_armed: false,
            block_cause: None,
            key: RequestKey {
                layer: Layer::File,
                req: key,
                start_ns: c.start_ns,
            },
        }
    }

    /// One in-flight entry, `now_ns` being the scan's time (taken after the kernel tables
    /// were read, so no age is negative).
    pub fn request(&mut self, slot: &InflightSlot, now_ns: u64) -> Request {
        let e = &slot.value;
        let nvme = (e.nvme_setup_ns != 0).then_some(NvmeCommand {
            qid: e.nvme_qid,
            cid: e.nvme_cid,
            lba: e.nvme_lba,
            blocks: e.nvme_blocks,
        });
        Request {
            layer: Layer::Uring,
            opcode: labels::opcode(e.opcode),
            ctx: self.context(e.tgid, e.pid),
            target: Target {
                disk: if nvme.is_some() {
                    self.disks.disk_name(e.nvme_dev)
                } else {
                    "unknown".into()
                },
                lba: nvme.as_ref().map(|n| n.lba),
                ..Target::default()
            },
            origin: Some(UringOrigin {
                user_data: e.user_data,
                ring: format!("{:#x}", e.ring),
                req: format!("{:#x}", slot.key),
            }),
            age_seconds: now_ns.saturating_sub(e.start_ns) as f64 / 1e9,
            stage: stage_of(e),
            nvme,
            poll_armed: e.poll_armed_ns != 0,
            block_cause: None,
            key: RequestKey {
                layer: Layer::Uring,
                req: slot.key,
                start_ns: e.start_ns,
            },
        }
    }

    /// One slow-event record from the ring buffer.
    pub fn slow(&mut self, ev: &SlowUringEvent) -> SlowEvent {
        let (req, e) = (ev.slot.key, &ev.slot.value);
        let comm = if ev.comm_valid != 0 {
            comm_text(&ev.comm)
        } else {
            // The completion ran outside the submitter (interrupt, io-wq): ask /proc.
            self.comm(e.tgid)
        };
        SlowEvent {
            opcode: labels::opcode(e.opcode),
            ctx: Context {
                pid: e.tgid,
                tid: e.pid,
                comm,
                cgroup: self.cgroup(e.tgid, e.pid),
                cgroup_id: None,
            },
            origin: UringOrigin {
                user_data: e.user_data,
                ring: format!("{:#x}", e.ring),
                req: format!("{req:#x}"),
            },
            latency_seconds: ev.latency_ns as f64 / 1e9,
            res: ev.res,
            key: RequestKey {
                layer: Layer::Uring,
                req,
                start_ns: e.start_ns,
            },
            latency_ns: ev.latency_ns,
            nvme: (e.nvme_setup_ns != 0 && e.nvme_complete_ns >= e.nvme_setup_ns).then(|| {
                let end = e.start_ns + ev.latency_ns;
                SlowNvme {
                    disk: self.disks.disk_name(e.nvme_dev),
                    qid: e.nvme_qid,
                    cid: e.nvme_cid,
                    lba: e.nvme_lba,
                    blocks: e.nvme_blocks,
                    status: labels::nvme_status(e.nvme_status).to_owned(),
                    queue_seconds: e.nvme_setup_ns.saturating_sub(e.start_ns) as f64 / 1e9,
                    device_seconds: (e.nvme_complete_ns - e.nvme_setup_ns) as f64 / 1e9,
                    completion_seconds: end.saturating_sub(e.nvme_complete_ns) as f64 / 1e9,
                }
            }),
        }
    }
}

/// What caused a block request, as its submitter record says (`None` where nothing was
/// recorded): shown on the block request and on the NVMe command serving it.
fn block_cause(w: &Submitter) -> Option<BlockCause> {
    (w.pid_tgid != 0 && w.origin != 0).then(|| BlockCause {
        origin: labels::origin(w.origin).to_owned(),
        via: labels::block_link(w.link).to_owned(),
        call_pid: (w.call_pid_tgid != 0).then_some((w.call_pid_tgid >> 32) as u32),
        call_tid: (w.call_pid_tgid != 0).then_some(w.call_pid_tgid as u32),
    })
}

/// Every request in flight now in every layer (io_uring, block, NVMe, cuFile), decoded,
/// oldest first, and the time of the scan. The time is taken after the kernel tables were
/// read: a request submitted during the read would otherwise be younger than the scan and
/// show age 0.
///
/// Bounded by the kernel's tables (`--max-inflight` for io_uring, `BLOCK_INFLIGHT_MAX`,
/// `NVME_INFLIGHT_MAX`, `CUFILE_INFLIGHT_MAX` per share). Block and NVMe requests pass
/// `--pid`/`--comm` here, by their submitter (see [`Source::task_filter`]); the kernel
/// filtered the others already.
pub fn inflight<S: Source + ?Sized>(tracer: &S) -> (Vec<Request>, u64) {
    let (mut raw, mut block, mut nvme, mut calls, mut files) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for entry in tracer.inflight() {
        match entry {
            Inflight::Uring(r) => raw.push(r),
            Inflight::Block(rq, b) => block.push((rq, b)),
            Inflight::Nvme(rq, n) => nvme.push((rq, n)),
            Inflight::Cufile(id, c) => calls.push((id, c)),
            Inflight::File(key, c) => files.push((key, c)),
        }
    }
    let now = monotonic_ns();
    let mut d = Decoder::new(tracer.disks());
    let mut out: Vec<Request> = raw.iter().map(|r| d.request(r, now)).collect();
    let blocks: HashMap<u64, &BlockInflight> = block.iter().map(|(rq, b)| (*rq, b)).collect();
    let urings: HashMap<u64, &InflightSlot> = raw.iter().map(|r| (r.key, r)).collect();
    let filter = tracer.task_filter();
    let filtered = filter.pid.is_some() || filter.comm.is_some();
    let keep = |r: &Request| !filtered || filter.accepts_task(r.ctx.pid, &r.ctx.comm);
    // A passthrough request's io_uring owner, by `struct request *`, from its NVMe command.
    let owners: HashMap<u64, &InflightSlot> = nvme
        .iter()
        .filter_map(|(rq, n)| Some((*rq, *urings.get(&n.uring_req)?)))
        .collect();
    out.extend(
        block
            .iter()
            .map(|(rq, b)| d.block(*rq, b, owners.get(rq).copied(), now))
            .filter(|r| keep(r)),
    );
    out.extend(
        nvme.iter()
            .map(|(rq, n)| {
                let uring = (n.uring_req != 0)
                    .then(|| urings.get(&n.uring_req).copied())
                    .flatten();
                d.nvme(*rq, n, blocks.get(rq).copied(), uring, now)
            })
            .filter(|r| keep(r)),
    );
    out.extend(calls.iter().map(|(id, c)| d.cufile(*id, c, now)));
    out.extend(files.iter().map(|(key, c)| d.file(*key, c, now)));
    out.sort_by(|a, b| b.age_seconds.total_cmp(&a.age_seconds));
    (out, now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use gds_common::InflightReq;

    #[test]
    fn stages_from_stamps() {
        let mut e = InflightReq::default();
        assert_eq!(stage_of(&e), Stage::Queue);
        e.nvme_setup_ns = 5;
        assert_eq!(stage_of(&e), Stage::Device);
        e.nvme_complete_ns = 9;
        assert_eq!(stage_of(&e), Stage::Completion);
    }

    struct OneDisk;
    impl DiskNames for OneDisk {
        fn disk_name(&self, _dev: u32) -> String {
            "nvme1n1".into()
        }
    }

    /// An NVMe command serving an O_DIRECT read's block request (same `struct request *`)
    /// names the file call behind it: process, thread and inode, with its qid, cid and LBA;
    /// without the block request it names no cause.
    #[test]
    fn nvme_command_names_the_file_call_of_its_block_request() {
        let call = (7u64 << 32) | 9;
        let b = BlockInflight {
            submitter: Submitter {
                pid_tgid: call,
                call_pid_tgid: call,
                ino: 42,
                origin: gds_common::file::ORIGIN_SYSCALL,
                link: gds_common::LINK_CALL,
                ..Submitter::default()
            },
            ..BlockInflight::default()
        };
        let n = NvmeInflight {
            qid: 2,
            cid: 17,
            lba: 2048,
            blocks: 1024,
            opcode: 0x02,
            ..NvmeInflight::default()
        };
        let mut d = Decoder::new(&OneDisk);
        let r = d.nvme(0xabc, &n, Some(&b), None, 0);
        let cause = r.block_cause.expect("a cause");
        assert_eq!(
            (cause.origin.as_str(), cause.via.as_str()),
            ("syscall", "call")
        );
        assert_eq!((cause.call_pid, cause.call_tid), (Some(7), Some(9)));
        assert_eq!(r.target.inode, Some(42));
        assert_eq!((r.ctx.pid, r.ctx.tid), (7, 9));
        let c = r.nvme.expect("the command");
        assert_eq!(
            (c.qid, c.cid, c.lba, r.target.lba),
            (2, 17, 2048, Some(2048))
        );
        let alone = d.nvme(0xabc, &n, None, None, 0);
        assert!(alone.block_cause.is_none() && alone.target.inode.is_none());
    }
}
