//! Kernel records → model: the one place raw in-flight entries and slow-event records become
//! [`Request`]s and [`SlowEvent`]s with names, process and disk.

use std::collections::HashMap;

use gds_common::{InflightSlot, SlowUringEvent};

use super::{
    labels,
    request::{Context, Layer, NvmeCommand, Request, RequestKey, SlowEvent, SlowNvme, Stage},
};
use crate::raw::{DiskNames, Source};
use gds_host::clock::monotonic_ns;

/// `/proc/PID/comm`, or `?` when the process is gone.
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

/// Decodes the requests of one scan: process names are read once per process per scan.
pub struct Decoder<'a> {
    disks: &'a dyn DiskNames,
    comms: HashMap<u32, String>,
}

impl<'a> Decoder<'a> {
    pub fn new(disks: &'a dyn DiskNames) -> Self {
        Decoder {
            disks,
            comms: HashMap::new(),
        }
    }

    fn comm(&mut self, tgid: u32) -> String {
        self.comms
            .entry(tgid)
            .or_insert_with(|| proc_comm(tgid))
            .clone()
    }

    /// One in-flight entry, `now_ns` being the scan's time (taken after the kernel tables
    /// were read, so no age is negative).
    pub fn request(&mut self, slot: &InflightSlot, now_ns: u64) -> Request {
        let e = &slot.entry;
        let nvme = (e.nvme_setup_ns != 0).then_some(NvmeCommand {
            qid: e.nvme_qid,
            cid: e.nvme_cid,
            lba: e.nvme_lba,
            blocks: e.nvme_blocks,
        });
        Request {
            layer: Layer::Uring,
            ctx: Context {
                pid: e.tgid,
                tid: e.pid,
                comm: self.comm(e.tgid),
                opcode: labels::opcode(e.opcode),
                user_data: e.user_data,
                ring: format!("{:#x}", e.ring),
                req: format!("{:#x}", slot.req),
            },
            age_seconds: now_ns.saturating_sub(e.start_ns) as f64 / 1e9,
            stage: stage_of(e),
            disk: if nvme.is_some() {
                self.disks.disk_name(e.nvme_dev)
            } else {
                "unknown".into()
            },
            nvme,
            key: RequestKey {
                req: slot.req,
                start_ns: e.start_ns,
            },
        }
    }

    /// One slow-event record from the ring buffer.
    pub fn slow(&mut self, ev: &SlowUringEvent) -> SlowEvent {
        let (req, e) = (ev.slot.req, &ev.slot.entry);
        let comm = if ev.comm_valid != 0 {
            let end = ev
                .comm
                .iter()
                .position(|&b| b == 0)
                .unwrap_or(ev.comm.len());
            String::from_utf8_lossy(&ev.comm[..end]).into_owned()
        } else {
            // The completion ran outside the submitter (interrupt, io-wq): ask /proc.
            self.comm(e.tgid)
        };
        SlowEvent {
            ctx: Context {
                pid: e.tgid,
                tid: e.pid,
                comm,
                opcode: labels::opcode(e.opcode),
                user_data: e.user_data,
                ring: format!("{:#x}", e.ring),
                req: format!("{req:#x}"),
            },
            latency_seconds: ev.latency_ns as f64 / 1e9,
            res: ev.res,
            key: RequestKey {
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

/// Every request in flight now, decoded, oldest first, and the time of the scan. The time is
/// taken after the kernel tables were read: a request submitted during the read would
/// otherwise be younger than the scan and show age 0.
pub fn inflight<S: Source + ?Sized>(tracer: &S) -> (Vec<Request>, u64) {
    let raw = tracer.inflight();
    let now = monotonic_ns();
    let mut d = Decoder::new(tracer.disks());
    let mut out: Vec<Request> = raw.iter().map(|r| d.request(r, now)).collect();
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
}
