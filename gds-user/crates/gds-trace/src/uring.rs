//! The io_uring layer: the submit, failure and completion programs on BTF tracepoints (or
//! classic ones without BTF), its per-opcode statistics and its in-flight table.

use aya::{
    Ebpf,
    maps::{HashMap, MapData, PerCpuArray},
    programs::TracePoint,
};
use gds_api::raw::{Inflight, Layer, LayerEntry, OpcodeStats, UringSnapshot};
use gds_common::{
    HIST_BUCKETS, InflightReq, MAP_URING_INFLIGHT, MAP_URING_OPCODES, MAP_URING_SLOTS,
    MAP_URING_STATS, OPCODE_WORDS, OpcodeCpuStats, URING_OPCODES, UringCpuStats,
};

use super::{
    TraceError, device,
    inflight::{self, SlotTable},
    layer::{Start, TracedLayer},
    offsets::AttachMode,
    program, take_map,
};

/// The io_uring programs, attached, and the maps they fill.
pub struct UringLayer {
    stats: PerCpuArray<MapData, UringCpuStats>,
    opcodes: PerCpuArray<MapData, OpcodeCpuStats>,
    slots: SlotTable<InflightReq>,
    hash: HashMap<MapData, u64, InflightReq>,
    /// How it is attached, and why (the first entry of `/debug/layers`).
    why: String,
}

impl TracedLayer for UringLayer {
    /// io_uring is what gds is for: a layer that cannot attach stops the agent.
    fn attach(ebpf: &mut Ebpf, start: &Start) -> Result<UringLayer, TraceError> {
        let attach = start.attach;
        match attach.mode {
            AttachMode::Btf => {
                let parsed = start.btf.ok_or_else(|| {
                    TraceError::BtfRequired("the kernel's BTF could not be read".into())
                })?;
                let btf = device::tracepoint_btf(
                    parsed,
                    &[attach.submit_tp, "io_uring_req_failed", "io_uring_complete"],
                )?;
                for (prog, tp) in [
                    ("uring_submit", attach.submit_tp),
                    ("uring_failed", "io_uring_req_failed"),
                    (attach.complete_prog, "io_uring_complete"),
                ] {
                    device::attach_btf(ebpf, &btf, prog, tp)?;
                }
                // Optional: only what a stall's cause says (a READ waiting for its file to
                // have data); tracing goes on without it.
                let poll = device::tracepoint_btf(parsed, &["io_uring_poll_arm"]).and_then(|btf| {
                    device::attach_btf(ebpf, &btf, "uring_poll_arm", "io_uring_poll_arm")
                });
                if let Err(e) = poll {
                    tracing::info!("io_uring: poll arming not traced ({e})");
                }
            }
            AttachMode::Classic | AttachMode::Auto => {
                for (prog, tp) in [
                    ("uring_submit_tp", attach.submit_tp),
                    ("uring_failed_tp", "io_uring_req_failed"),
                    ("uring_complete_tp", "io_uring_complete"),
                ] {
                    let p: &mut TracePoint = program(ebpf, prog)?;
                    p.load()
                        .map_err(|source| TraceError::Program { name: prog, source })?;
                    p.attach("io_uring", tp)
                        .map_err(|source| TraceError::Program { name: prog, source })?;
                }
            }
        }
        Ok(UringLayer {
            stats: take_map(ebpf, MAP_URING_STATS)?,
            opcodes: take_map(ebpf, MAP_URING_OPCODES)?,
            slots: inflight::take_slots(ebpf, MAP_URING_SLOTS, start.opts.slots())?,
            hash: take_map(ebpf, MAP_URING_INFLIGHT)?,
            why: attach.why.clone(),
        })
    }

    fn layer(&self) -> Layer {
        Layer::Uring
    }

    fn entry(&self) -> LayerEntry {
        LayerEntry {
            layer: Layer::Uring,
            on: true,
            why: self.why.clone(),
            detail: None,
        }
    }

    fn inflight(&self, out: &mut Vec<Inflight>) {
        out.extend(
            inflight::collect(&self.slots, &self.hash)
                .into_iter()
                .map(Inflight::Uring),
        );
    }
}

impl UringLayer {
    /// Sums the per-CPU statistics.
    ///
    /// Reads the global value first, then only the opcodes some CPU marked in its
    /// `opcodes_seen`: one `BPF_MAP_LOOKUP_ELEM` each, so an idle agent costs one syscall and a
    /// busy one a syscall per opcode in use, each copying that opcode's 320 bytes per CPU (all
    /// 256 entries would be 80 KiB per CPU). An opcode first seen after the global read is
    /// picked up by the next snapshot.
    pub fn snapshot(&self) -> Result<UringSnapshot, TraceError> {
        let per_cpu = self.stats.get(&0, 0).map_err(|source| TraceError::Map {
            name: MAP_URING_STATS,
            source,
        })?;
        let mut snap = UringSnapshot {
            opcodes: vec![
                OpcodeStats {
                    buckets: vec![0; HIST_BUCKETS],
                    ..Default::default()
                };
                URING_OPCODES
            ],
            ..Default::default()
        };
        let mut seen = [0u64; OPCODE_WORDS];
        for cpu in per_cpu.iter() {
            for (d, v) in snap.drops.iter_mut().zip(cpu.drops.iter()) {
                *d += v;
            }
            snap.inserted += cpu.inserted;
            snap.removed += cpu.removed;
            for (s, w) in seen.iter_mut().zip(cpu.opcodes_seen) {
                *s |= w;
            }
        }
        for (op, s) in snap.opcodes.iter_mut().enumerate() {
            if seen[op / 64] & (1u64 << (op % 64)) == 0 {
                continue;
            }
            let per_cpu = self
                .opcodes
                .get(&(op as u32), 0)
                .map_err(|source| TraceError::Map {
                    name: MAP_URING_OPCODES,
                    source,
                })?;
            for cpu in per_cpu.iter() {
                for (b, v) in s.buckets.iter_mut().zip(cpu.hist) {
                    *b += v;
                    s.timed += v;
                }
                s.sum_ns += cpu.sum_ns;
                s.submitted += cpu.submitted;
                s.errors += cpu.errors;
                s.slow += cpu.slow;
            }
        }
        Ok(snap)
    }
}
