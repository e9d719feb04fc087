//! Streaming reads: keep `qd` passthrough reads in flight over an LBA range, hand each chunk to a
//! sink as it completes, and report throughput.

use std::time::{Duration, Instant};

use super::buffer::DmaBuffer;
use super::cmd::{NvmeReadCmd, NvmeUringCmd, UringCmdOp};
use super::error::NvmeError;
use super::geometry::NamespaceGeometry;
use super::ring::{NvmeCompletion, NvmeRing};

/// Default command size for streaming: large enough to amortise per-command cost, small enough
/// to stay under the MDTS of most controllers.
pub const DEFAULT_CHUNK_BYTES: u64 = 128 * 1024;

#[derive(Clone, Copy, Debug)]
pub struct StreamOptions {
    pub lba: u64,
    /// Number of blocks to read (the range is `lba..lba + blocks`).
    pub blocks: u64,
    /// Commands kept in flight.
    pub qd: u32,
    /// Blocks per command (capped by MDTS and 65,536).
    pub chunk_blocks: u32,
    /// Use registered buffers (IORING_URING_CMD_FIXED).
    pub fixed: bool,
    /// Give up if no completion arrives for this long.
    pub stall_timeout: Duration,
}

impl StreamOptions {
    /// The whole namespace at `qd`, 128 KiB commands (or MDTS if smaller).
    pub fn whole(geometry: &NamespaceGeometry, qd: u32) -> Self {
        Self {
            lba: 0,
            blocks: geometry.capacity_blocks,
            qd,
            chunk_blocks: default_chunk_blocks(geometry),
            fixed: false,
            stall_timeout: Duration::from_secs(60),
        }
    }
}

pub fn default_chunk_blocks(geometry: &NamespaceGeometry) -> u32 {
    let by_size = (DEFAULT_CHUNK_BYTES / u64::from(geometry.lba_size.max(1))).max(1) as u32;
    by_size.min(geometry.max_blocks_per_command())
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StreamStats {
    pub bytes: u64,
    pub commands: u64,
    pub elapsed: Duration,
    pub qd: u32,
    pub chunk_bytes: u64,
    pub fixed: bool,
    /// Most commands the kernel held at once (evidence that `qd` was reached).
    pub max_in_flight: u32,
}

impl StreamStats {
    pub fn mib_per_sec(&self) -> f64 {
        self.bytes as f64 / (1024.0 * 1024.0) / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub fn iops(&self) -> f64 {
        self.commands as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Read `opts.lba .. opts.lba + opts.blocks` with up to `opts.qd` commands in flight. `sink` gets
/// `(first_lba, data)` for every completed chunk, in completion order. Every command is
/// validated against `geometry` before submission; the first failed completion ends the stream
/// (after reaping what is still in flight) with its decoded error.
pub fn stream_read(
    ring: &mut NvmeRing,
    geometry: &NamespaceGeometry,
    opts: &StreamOptions,
    mut sink: impl FnMut(u64, &[u8]) -> Result<(), NvmeError>,
) -> Result<StreamStats, NvmeError> {
    let end = opts.lba.saturating_add(opts.blocks);
    if opts.blocks == 0 {
        return Err(NvmeError::ZeroBlocks {
            device: geometry.device.clone(),
            op: "streaming read",
        });
    }
    if end > geometry.capacity_blocks {
        return Err(NvmeError::LbaOutOfRange {
            device: geometry.device.clone(),
            op: "streaming read",
            lba: opts.lba,
            blocks: opts.blocks,
            capacity: geometry.capacity_blocks,
        });
    }
    let chunk_blocks = opts
        .chunk_blocks
        .clamp(1, geometry.max_blocks_per_command());
    let chunk_bytes = u64::from(chunk_blocks) * u64::from(geometry.lba_size);
    let total_chunks = opts.blocks.div_ceil(u64::from(chunk_blocks));
    let slots = (opts.qd.max(1) as u64)
        .min(total_chunks)
        .min(u64::from(ring.depth())) as usize;

    let mut buffers = DmaBuffer::many(slots, chunk_bytes as usize);
    if opts.fixed {
        // SAFETY: `buffers` lives until the end of this function, after unregistering.
        unsafe { ring.register_buffers(&mut buffers)? };
    }
    // Per slot: the command in flight (for error context) and its first LBA.
    let mut in_flight: Vec<Option<NvmeUringCmd>> = vec![None; slots];
    let mut next_lba = opts.lba;
    let mut stats = StreamStats {
        bytes: 0,
        commands: 0,
        elapsed: Duration::ZERO,
        qd: slots as u32,
        chunk_bytes,
        fixed: opts.fixed,
        max_in_flight: 0,
    };

    let result = (|| {
        let start = Instant::now();
        let issue = |slot: usize,
                     ring: &mut NvmeRing,
                     buffers: &mut [DmaBuffer],
                     next_lba: &mut u64,
                     in_flight: &mut [Option<NvmeUringCmd>]|
         -> Result<bool, NvmeError> {
            if *next_lba >= end {
                return Ok(false);
            }
            let blocks = (end - *next_lba).min(u64::from(chunk_blocks)) as u32;
            let len = blocks as usize * geometry.lba_size as usize;
            let cmd = NvmeReadCmd::new(geometry.nsid, *next_lba, blocks)
                .buffer(buffers[slot].as_mut_ptr(), len)
                .build(geometry)?;
            // SAFETY: buffers[slot] is not touched until this slot's completion is reaped,
            // and outlives the ring's use of it (we drain before returning).
            unsafe {
                ring.push(
                    &cmd,
                    UringCmdOp::Io,
                    opts.fixed.then_some(slot as u16),
                    slot as u64,
                )?
            };
            in_flight[slot] = Some(cmd);
            *next_lba += u64::from(blocks);
            Ok(true)
        };

        for slot in 0..slots {
            issue(slot, ring, &mut buffers, &mut next_lba, &mut in_flight)?;
        }
        let mut done: Vec<NvmeCompletion> = Vec::with_capacity(slots);
        let mut first_err: Option<NvmeError> = None;
        while in_flight.iter().any(Option::is_some) {
            done.clear();
            stats.max_in_flight = stats.max_in_flight.max(ring.in_flight() + ring.queued());
            ring.wait_timeout(1, opts.stall_timeout, &mut done)?;
            for c in &done {
                let slot = c.user_data as usize;
                let Some(cmd) = in_flight.get_mut(slot).and_then(Option::take) else {
                    continue;
                };
                match c.check(ring.device(), &cmd, UringCmdOp::Io) {
                    Ok(_) => {
                        let len = cmd.data_len as usize;
                        stats.bytes += len as u64;
                        stats.commands += 1;
                        if first_err.is_none()
                            && let Err(e) = sink(cmd.slba(), &buffers[slot][..len])
                        {
                            first_err = Some(e);
                        }
                    }
                    Err(e) => {
                        first_err.get_or_insert(e);
                    }
                }
                if first_err.is_none() {
                    issue(slot, ring, &mut buffers, &mut next_lba, &mut in_flight)?;
                }
            }
        }
        stats.elapsed = start.elapsed();
        first_err.map_or(Ok(()), Err)
    })();

    // Never free (or unregister) buffers the kernel may still write to: drain first, and if
    // the device will not give them back, leak them rather than risk a use-after-free.
    let mut drained = Vec::new();
    while ring.in_flight() > 0 || ring.queued() > 0 {
        drained.clear();
        if ring
            .wait_timeout(1, opts.stall_timeout, &mut drained)
            .is_err()
        {
            std::mem::forget(buffers);
            return Err(result.err().unwrap_or_else(|| NvmeError::Data {
                device: ring.device().to_string(),
                what: "commands still in flight after the stream ended".into(),
            }));
        }
    }
    if opts.fixed {
        let unreg = ring.unregister_buffers();
        result?;
        unreg?;
    } else {
        result?;
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geometry::GeometrySource;

    /// The default chunk is a whole number of blocks, at least one, never above what one
    /// command may carry, for every LBA size and transfer limit (including odd and zero ones).
    #[test]
    fn default_chunk_fits_one_command() {
        for lba_size in [0u32, 1, 512, 520, 4096, 65_536, u32::MAX] {
            for max_transfer_bytes in [0u64, 1, 4096, 512 * 1024, u64::MAX] {
                let g = NamespaceGeometry {
                    device: "/dev/ng0n1".into(),
                    nsid: 1,
                    lba_size,
                    metadata_size: 0,
                    capacity_blocks: 1 << 20,
                    max_transfer_bytes,
                    dma_alignment: 4,
                    source: GeometrySource::Sysfs,
                };
                let c = default_chunk_blocks(&g);
                assert!(
                    c <= g.max_blocks_per_command().max(1),
                    "{lba_size} {max_transfer_bytes}"
                );
            }
        }
    }
}
