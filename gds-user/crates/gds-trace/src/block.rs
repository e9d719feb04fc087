//! The block layer: `block_rq_issue`/`block_rq_complete` (and the submitter at
//! `block_getrq`) on BTF tracepoints, its in-flight table, and whether it tells peer memory
//! apart (`trace::peer`). Its per-disk statistics share `trace::device::DeviceMaps` with NVMe.

use aya::{
    Ebpf,
    maps::{HashMap, MapData},
};
use gds_api::raw::{Inflight, Layer, LayerEntry};
use gds_common::{BLOCK_SLOTS, BlockInflight, MAP_BLOCK_INFLIGHT, MAP_BLOCK_SLOTS};
use tracing::info;

use super::{
    TraceError,
    device::{attach_btf, tracepoint_btf},
    inflight::{self, SlotTable},
    layer::{Start, TracedLayer},
    take_map,
};

/// Why the block and NVMe layers are off without the device offsets.
pub(crate) const NEEDS_BTF: &str =
    "NVMe and block tracing need kernel BTF (BTF tracepoints); they are off";

/// The block programs, attached where the kernel's tracepoints have the form they read.
pub struct BlockLayer {
    on: bool,
    /// Why it is off, or what it lacks while on (said once at start, and on `/debug/layers`).
    notes: Vec<String>,
    /// Whether peer memory is told apart, and why.
    peer: String,
    slots: SlotTable<BlockInflight>,
    inflight: HashMap<MapData, u64, BlockInflight>,
}

impl TracedLayer for BlockLayer {
    /// Off (not an error) where the kernel lacks BTF or the tracepoints have an older form:
    /// io_uring tracing goes on without it.
    fn attach(ebpf: &mut Ebpf, start: &Start) -> Result<BlockLayer, TraceError> {
        let mut layer = BlockLayer {
            on: false,
            notes: Vec::new(),
            peer: start.peer.why().to_owned(),
            slots: inflight::take_slots(ebpf, MAP_BLOCK_SLOTS, BLOCK_SLOTS)?,
            inflight: take_map(ebpf, MAP_BLOCK_INFLIGHT)?,
        };
        let btf = match (start.devices, start.btf) {
            (true, Some(btf)) => btf,
            _ => {
                layer.notes.push(NEEDS_BTF.into());
                info!("{NEEDS_BTF}");
                return Ok(layer);
            }
        };
        let issue_ok = btf
            .tracepoint_params("block_rq_issue")
            .map(|p| p.len() == 1)
            .unwrap_or(false);
        if issue_ok && btf.has_tracepoint("block_rq_complete") {
            let aya_btf =
                &tracepoint_btf(btf, &["block_getrq", "block_rq_issue", "block_rq_complete"])?;
            // The submitter first: a request issued before it attached names no process, and
            // that only for the requests in flight at start.
            let getrq_ok = btf
                .tracepoint_params("block_getrq")
                .map(|p| p.len() == 1)
                .unwrap_or(false);
            if getrq_ok {
                attach_btf(ebpf, aya_btf, "block_getrq", "block_getrq")?;
            } else {
                layer.notes.push(
                    "block requests name no submitter: block_getrq is absent or of an older \
                     form"
                        .into(),
                );
            }
            attach_btf(ebpf, aya_btf, "block_issue", "block_rq_issue")?;
            attach_btf(ebpf, aya_btf, "block_complete", "block_rq_complete")?;
            layer.on = true;
        } else {
            layer.notes.push(
                "block tracing off: block_rq_issue/complete are absent or of an older form".into(),
            );
        }
        for note in &layer.notes {
            info!("{note}");
        }
        if layer.on {
            info!(
                "block tracing on: block_rq_issue/block_rq_complete; peer memory: {}",
                layer.peer
            );
        }
        Ok(layer)
    }

    fn layer(&self) -> Layer {
        Layer::Block
    }

    fn entry(&self) -> LayerEntry {
        LayerEntry {
            layer: Layer::Block,
            on: self.on,
            why: if self.on {
                format!(
                    "BTF tracepoints block_rq_issue/block_rq_complete, the submitter at \
                     block_getrq; peer memory: {}",
                    self.peer
                )
            } else {
                self.notes.join("; ")
            },
            detail: None,
        }
    }

    /// Issued requests, by their `struct request *` (the table is keyed by first bio, and
    /// holds requests not yet issued too, which `collect` leaves out).
    fn inflight(&self, out: &mut Vec<Inflight>) {
        out.extend(
            inflight::collect(&self.slots, &self.inflight)
                .into_iter()
                .filter(|s| s.value.rq != 0)
                .map(|s| Inflight::Block(s.value.rq, s.value)),
        );
    }
}
