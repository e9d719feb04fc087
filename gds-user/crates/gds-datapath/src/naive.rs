//! The floor: `pread` into pageable memory, then a synchronous `cuMemcpyHtoD`, one piece at a
//! time on one thread. What a loader does without any of the bounce route's machinery.

use std::os::unix::fs::FileExt;
use std::time::Instant;

use cudarc::driver::result as cu;

use super::bounce::{Jobs, Plan, Progress, Stats};
use super::cuda::DeviceBuffer;
use super::error::{DatapathError, Result};
use super::source::Source;
use gds_nvme::DmaBuffer;

pub fn run(
    source: &Source,
    plan: &Plan,
    dst: &DeviceBuffer,
    latencies: bool,
    progress: &Progress,
) -> Result<Stats> {
    dst.gpu().bind()?;
    // Page-aligned so that O_DIRECT sources work too; still pageable (not pinned).
    let mut buf = DmaBuffer::new(source.io_len(plan.bs) as usize);
    let mut jobs = Jobs::new(plan, 0, 1);
    let start = Instant::now();
    jobs.start();
    let mut st = Stats::default();
    while let Some((off, want)) = jobs.next() {
        let t = Instant::now();
        let io = source.io_len(want) as usize;
        let mut got = 0usize;
        while got < want as usize {
            let n = source
                .file
                .read_at(&mut buf[got..io], off + got as u64)
                .map_err(|e| DatapathError::Io {
                    path: source.path.clone(),
                    what: "pread",
                    source: e,
                })?;
            if n == 0 {
                return Err(DatapathError::ShortRead {
                    path: source.path.clone(),
                    offset: off + got as u64,
                    wanted: want - got as u64,
                });
            }
            got += n;
        }
        let rel = (off - plan.range.offset) % dst.len as u64;
        // SAFETY: the device range is inside dst; buf is valid host memory.
        unsafe { cu::memcpy_htod_sync(dst.ptr + rel, &buf[..want as usize]) }
            .map_err(|e| DatapathError::cuda("cuMemcpyHtoD", e))?;
        progress.record(&mut st, want, t.elapsed(), latencies);
    }
    st.elapsed = start.elapsed();
    Ok(st)
}
