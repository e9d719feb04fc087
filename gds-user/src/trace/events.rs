//! Decoding ring buffer records into events with context.

use gds_common::{EVENT_URING_SLOW, SlowUringEvent};
use serde::Serialize;

use crate::uring_opcode;

/// A request slower than the threshold, as logged and served on `/debug/slow`.
#[derive(Debug, Clone, Serialize)]
pub struct SlowEvent {
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
    pub opcode: String,
    pub user_data: u64,
    /// `struct io_ring_ctx *` of the ring, hex.
    pub ring: String,
    pub latency_seconds: f64,
    pub res: i32,
    /// `struct io_kiocb *`, hex.
    pub req: String,
    #[serde(skip)]
    pub req_raw: u64,
    #[serde(skip)]
    pub start_ns: u64,
    #[serde(skip)]
    pub latency_ns: u64,
    /// Present when the request was an NVMe passthrough command traced to the device.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nvme: Option<SlowNvme>,
}

/// The device side of a slow passthrough request: where it went and where the time went.
#[derive(Debug, Clone, Serialize)]
pub struct SlowNvme {
    pub disk: String,
    pub qid: u16,
    pub cid: u16,
    pub lba: u64,
    pub blocks: u32,
    pub status: String,
    pub queue_seconds: f64,
    pub device_seconds: f64,
    pub completion_seconds: f64,
}

fn comm_for(ev: &SlowUringEvent) -> String {
    if ev.comm_valid != 0 {
        let end = ev
            .comm
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(ev.comm.len());
        return String::from_utf8_lossy(&ev.comm[..end]).into_owned();
    }
    // The completion ran outside the submitter (interrupt, io-wq): ask /proc.
    std::fs::read_to_string(format!("/proc/{}/comm", ev.slot.entry.tgid))
        .map(|s| s.trim_end().to_owned())
        .unwrap_or_else(|_| "?".into())
}

/// Decodes one ring buffer record; `None` for records of unknown kind or size.
pub fn decode_event(bytes: &[u8]) -> Option<SlowEvent> {
    let kind = u32::from_ne_bytes(bytes.get(0..4)?.try_into().ok()?);
    if kind != EVENT_URING_SLOW || bytes.len() < size_of::<SlowUringEvent>() {
        return None;
    }
    // SAFETY: the length was checked and SlowUringEvent is plain old data.
    let ev: SlowUringEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    let (req, e) = (ev.slot.req, &ev.slot.entry);
    Some(SlowEvent {
        pid: e.tgid,
        tid: e.pid,
        comm: comm_for(&ev),
        opcode: uring_opcode::name(e.opcode as usize),
        user_data: e.user_data,
        ring: format!("{:#x}", e.ring),
        latency_seconds: ev.latency_ns as f64 / 1e9,
        res: ev.res,
        req: format!("{req:#x}"),
        req_raw: req,
        start_ns: e.start_ns,
        latency_ns: ev.latency_ns,
        nvme: (e.nvme_setup_ns != 0 && e.nvme_complete_ns >= e.nvme_setup_ns).then(|| {
            let end = e.start_ns + ev.latency_ns;
            SlowNvme {
                disk: super::disk_name(e.nvme_dev),
                qid: e.nvme_qid,
                cid: e.nvme_cid,
                lba: e.nvme_lba,
                blocks: e.nvme_blocks,
                status: crate::nvme::NvmeStatus(e.nvme_status).name().to_owned(),
                queue_seconds: e.nvme_setup_ns.saturating_sub(e.start_ns) as f64 / 1e9,
                device_seconds: (e.nvme_complete_ns - e.nvme_setup_ns) as f64 / 1e9,
                completion_seconds: end.saturating_sub(e.nvme_complete_ns) as f64 / 1e9,
            }
        }),
    })
}
