//! The other half of the bounce route's ceiling, measured: host→device copies from pinned
//! memory with the same I/O size, buffers and streams as the bounce run, and no reads at all.
//! `bench --compare pcie` prints it as a row; `/ceiling` is then the lower of this and the
//! host read (the "ceiling, bounded by storage and the pinned PCIe rate"), measured in
//! the same run instead of quoted from an earlier one.

use std::time::{Duration, Instant};

use super::bounce::{Limit, Stats};
use super::cuda::{DeviceBuffer, Gpu};
use super::error::Result;

/// Copies `bs`-byte pieces from `buffers` pinned buffers to `dst` on `streams` streams until
/// `limit` (`Once` = `dst.len` bytes), round-robin, synchronizing every 256 MiB per stream so
/// the queue stays bounded. The source is never written, so buffers are reused freely.
pub fn h2d(
    dst: &DeviceBuffer,
    bs: u64,
    buffers: usize,
    streams: usize,
    limit: Limit,
) -> Result<Stats> {
    let gpu: &std::sync::Arc<Gpu> = dst.gpu();
    let bs = bs.clamp(1, dst.len.max(1) as u64) as usize;
    let mut pinned = gpu.pinned_many(buffers.max(1), bs)?;
    for (i, b) in pinned.iter_mut().enumerate() {
        b.as_mut_slice().fill(i as u8);
    }
    let streams: Vec<_> = (0..streams.max(1))
        .map(|_| gpu.stream())
        .collect::<Result<_>>()?;
    let slots = (dst.len / bs).max(1);
    let batch = (streams.len() * ((256 << 20) / bs).max(4)) as u64;
    let (max_bytes, max_time) = match limit {
        Limit::Once => (dst.len as u64, None),
        Limit::Bytes(b) => (b, None),
        Limit::Time(t) => (u64::MAX, Some(t)),
    };
    let start = Instant::now();
    let mut stats = Stats::default();
    let mut n: u64 = 0;
    while stats.bytes < max_bytes && max_time.is_none_or(|t| start.elapsed() < t) {
        for _ in 0..batch {
            if stats.bytes >= max_bytes {
                break;
            }
            let i = n as usize;
            let off = (i % slots) * bs;
            // SAFETY: `off + bs <= dst.len` (slots = dst.len / bs); the pinned buffer lives
            // until the streams are synchronized below.
            unsafe {
                streams[i % streams.len()].copy_h2d(
                    dst.ptr + off as u64,
                    pinned[i % pinned.len()].as_ptr(),
                    bs,
                )?
            };
            n += 1;
            stats.bytes += bs as u64;
        }
        for s in &streams {
            s.synchronize()?;
        }
    }
    stats.ios = n;
    stats.elapsed = start.elapsed().max(Duration::from_nanos(1));
    Ok(stats)
}
