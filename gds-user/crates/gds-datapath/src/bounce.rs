//! The bounce route, and the raw io_uring ceiling it is measured against.
//!
//! Each worker thread owns an io_uring, `qd` reads in flight, and a set of page-aligned buffers
//! registered with the ring (IORING_OP_READ_FIXED). With a GPU destination the buffers are
//! pinned host memory (cuMemHostAlloc) and every completed read is copied to the GPU with
//! cuMemcpyHtoDAsync on one of several streams, an event marking when its buffer is free
//! again: reads and copies overlap, and the buffer count is `qd` (reading) plus `qd` (copying).
//! With a host destination the same loop without copies is the ceiling: raw io_uring reads into
//! host memory.

use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use io_uring::{IoUring, opcode, squeue, types};

use super::cuda::{DeviceBuffer, Event, Gpu, PinnedBuffer, Stream};
use super::error::{DatapathError, Result};
use super::source::{ByteRange, Source};
use gds_nvme::DmaBuffer;

/// How to keep the device busy.
#[derive(Debug, Clone, Copy)]
pub struct PipelineOpts {
    /// Reads in flight per worker.
    pub qd: u32,
    /// Worker threads, each with its own ring, buffers and streams.
    pub threads: usize,
    /// CUDA streams per worker (GPU destination).
    pub streams: usize,
    /// Register the buffers with the ring (READ_FIXED); falls back when registration fails.
    pub fixed: bool,
    /// Punt reads to io_uring's worker threads (IOSQE_ASYNC): page-cache copies then run in
    /// parallel instead of inline in the submitting thread.
    pub uring_async: bool,
    /// Completions handled per wake-up, their replacement reads submitted together; 0 = all
    /// that are ready. See [`default_batch`].
    pub batch: u32,
    /// Keep per-I/O latencies (bench).
    pub latencies: bool,
}

/// Completions to handle per wake-up when `--batch` is not given.
///
/// Why not all of them: O_DIRECT reads complete by interrupt, several at once. Handling them
/// all and then submitting their replacements as one batch leaves the device with a burst to
/// work through while the queue is shallow, and every read in the burst waits for the ones
/// before it. Two at a time keeps the queue topped up: 4 KiB random reads at QD 32 on this
/// project's VM went from 80k to 110-158k IOPS (QD 8: 78k to 91k; QD 128: 117k to 126k),
/// level with fio's default of one. Page-cache reads complete inline while they are
/// submitted, so there a wake-up's completions are all handled (capping them cost 17%).
pub fn default_batch(direct: bool) -> u32 {
    if direct { 2 } else { 0 }
}

impl Default for PipelineOpts {
    fn default() -> Self {
        Self {
            qd: 16,
            threads: 1,
            streams: 4,
            fixed: true,
            uring_async: false,
            batch: 0,
            latencies: false,
        }
    }
}

/// Access pattern and when to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Pattern {
    Seq,
    Rand,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// Each byte of the range once (`read`).
    Once,
    /// This many bytes in total.
    Bytes(u64),
    /// For this long.
    Time(Duration),
}

#[derive(Debug, Clone, Copy)]
pub struct Plan {
    pub range: ByteRange,
    /// Bytes per I/O.
    pub bs: u64,
    pub pattern: Pattern,
    pub limit: Limit,
}

impl Plan {
    pub fn once(range: ByteRange, chunk: u64) -> Self {
        Plan {
            range,
            bs: chunk,
            pattern: Pattern::Seq,
            limit: Limit::Once,
        }
    }
}

/// Sees each piece that landed in host memory: `(source offset, bytes)`.
pub type Sink<'a> = dyn Fn(u64, &[u8]) + Sync + 'a;

/// Where completed reads go.
pub enum Target<'a> {
    /// Host memory; `sink` sees each piece `(source offset, bytes)` (e.g. to hash it).
    Host { sink: Option<&'a Sink<'a>> },
    /// GPU memory: source offset `o` lands at `dst + (o - range.offset) % dst.len`.
    Gpu { dst: &'a DeviceBuffer },
}

/// Live counters and optional metric handles shared by the workers.
#[derive(Default)]
pub struct Progress {
    pub bytes: AtomicU64,
    pub ios: AtomicU64,
    pub metrics: Option<(prometheus::Counter, prometheus::Histogram)>,
}

impl Progress {
    /// Counts one completed I/O of `bytes` that took `lat`: in the run's stats (with its
    /// latency when `keep_latency`), in the live progress, and in the metrics when exported.
    /// Every route reports through here.
    pub fn record(&self, stats: &mut Stats, bytes: u64, lat: Duration, keep_latency: bool) {
        stats.bytes += bytes;
        stats.ios += 1;
        if keep_latency {
            stats.latencies_ns.push(lat.as_nanos() as u64);
        }
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        self.ios.fetch_add(1, Ordering::Relaxed);
        if let Some((b, h)) = &self.metrics {
            b.inc_by(bytes as f64);
            h.observe(lat.as_secs_f64());
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub bytes: u64,
    pub ios: u64,
    pub elapsed: Duration,
    /// Per-I/O latency in ns (submission to data at the destination), when asked for.
    pub latencies_ns: Vec<u64>,
    /// Things worth telling (fallbacks).
    pub notes: Vec<String>,
}

impl Stats {
    pub fn gb_per_sec(&self) -> f64 {
        self.bytes as f64 / 1e9 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Offsets one worker reads.
pub(crate) struct Jobs {
    range: ByteRange,
    bs: u64,
    pattern: Pattern,
    next: u64,
    budget: Option<u64>,
    deadline: Option<Instant>,
    once: bool,
    rng: u64,
    blocks: u64,
    pub(crate) started: Option<Instant>,
    time: Option<Duration>,
}

impl Jobs {
    /// The jobs of worker `w` of `n`.
    pub(crate) fn new(plan: &Plan, w: usize, n: usize) -> Self {
        let (range, once) = match (plan.limit, plan.pattern) {
            (_, Pattern::Rand) => (plan.range, false),
            (Limit::Once, Pattern::Seq) => (
                plan.range
                    .split(n, plan.bs)
                    .get(w)
                    .copied()
                    .unwrap_or(ByteRange {
                        offset: plan.range.end(),
                        len: 0,
                    }),
                true,
            ),
            (_, Pattern::Seq) => {
                let parts = plan.range.split(n, plan.bs);
                (parts[w % parts.len()], false)
            }
        };
        let budget = match plan.limit {
            Limit::Bytes(b) => Some(b.div_ceil(n as u64)),
            Limit::Once if plan.pattern == Pattern::Rand => Some(plan.range.len.div_ceil(n as u64)),
            _ => None,
        };
        Jobs {
            range,
            bs: plan.bs.max(1),
            pattern: plan.pattern,
            next: range.offset,
            budget,
            deadline: None,
            once,
            rng: 0x9E37_79B9_7F4A_7C15 ^ (w as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03),
            blocks: (plan.range.len / plan.bs.max(1)).max(1),
            started: None,
            time: match plan.limit {
                Limit::Time(t) => Some(t),
                _ => None,
            },
        }
    }

    pub(crate) fn start(&mut self) {
        let now = Instant::now();
        self.started = Some(now);
        self.deadline = self.time.map(|t| now + t);
    }

    pub(crate) fn next(&mut self) -> Option<(u64, u64)> {
        if self.range.len == 0 {
            return None;
        }
        if let Some(d) = self.deadline
            && Instant::now() >= d
        {
            return None;
        }
        if self.budget == Some(0) {
            return None;
        }
        let (off, len) = match self.pattern {
            Pattern::Seq => {
                if self.next >= self.range.end() {
                    if self.once {
                        return None;
                    }
                    self.next = self.range.offset;
                }
                let off = self.next;
                let len = self.bs.min(self.range.end() - off);
                self.next += len;
                (off, len)
            }
            Pattern::Rand => {
                // xorshift64*
                self.rng ^= self.rng >> 12;
                self.rng ^= self.rng << 25;
                self.rng ^= self.rng >> 27;
                let r = self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D);
                let off = self.range.offset + (r % self.blocks) * self.bs;
                (off, self.bs.min(self.range.end() - off))
            }
        };
        if let Some(b) = self.budget.as_mut() {
            *b = b.saturating_sub(len);
        }
        Some((off, len))
    }
}

enum Buf {
    Host(DmaBuffer),
    Pinned(PinnedBuffer),
}

impl Buf {
    fn ptr(&mut self) -> *mut u8 {
        match self {
            Buf::Host(b) => b.as_mut_ptr(),
            Buf::Pinned(b) => b.as_mut_ptr(),
        }
    }
    fn slice(&self, len: usize) -> &[u8] {
        match self {
            Buf::Host(b) => &b[..len],
            Buf::Pinned(b) => &b.as_slice()[..len],
        }
    }
}

#[derive(Clone, Copy)]
struct Io {
    off: u64,
    want: u64,
    /// Bytes already read (short reads are continued).
    got: u64,
    started: Instant,
}

/// Run `plan` from `source` into `target`. Blocks until done; `progress` is updated live.
pub fn run(
    source: &Source,
    plan: &Plan,
    target: &Target<'_>,
    opts: &PipelineOpts,
    progress: &Progress,
) -> Result<Stats> {
    if plan.bs == 0 || !plan.bs.is_multiple_of(source.align) {
        return Err(DatapathError::Alignment {
            path: source.path.clone(),
            what: "the chunk / block size",
            value: plan.bs,
            align: source.align,
        });
    }
    if !plan.range.offset.is_multiple_of(source.align) {
        return Err(DatapathError::Alignment {
            path: source.path.clone(),
            what: "--offset",
            value: plan.range.offset,
            align: source.align,
        });
    }
    if let Target::Gpu { dst } = target
        && (dst.len as u64) < plan.bs.min(plan.range.len)
    {
        return Err(DatapathError::Invalid(format!(
            "destination of {} bytes is smaller than one I/O of {} bytes",
            dst.len, plan.bs
        )));
    }
    let threads = opts.threads.max(1);
    let barrier = Barrier::new(threads + 1);
    let mut start = Instant::now();
    let results: Vec<Result<Stats>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|w| {
                let barrier = &barrier;
                s.spawn(move || worker(source, plan, target, opts, progress, w, threads, barrier))
            })
            .collect();
        barrier.wait();
        start = Instant::now();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(DatapathError::Invalid("worker panicked".into())))
            })
            .collect()
    });
    let elapsed = start.elapsed();
    let mut total = Stats {
        elapsed,
        ..Stats::default()
    };
    for r in results {
        let s = r?;
        total.bytes += s.bytes;
        total.ios += s.ios;
        total.latencies_ns.extend(s.latencies_ns);
        for n in s.notes {
            if !total.notes.contains(&n) {
                total.notes.push(n);
            }
        }
    }
    Ok(total)
}

#[allow(clippy::too_many_arguments)]
fn worker(
    source: &Source,
    plan: &Plan,
    target: &Target<'_>,
    opts: &PipelineOpts,
    progress: &Progress,
    w: usize,
    n: usize,
    barrier: &Barrier,
) -> Result<Stats> {
    // Set up everything, then meet the other workers so timing excludes allocation.
    let setup = setup(source, plan, target, opts);
    barrier.wait();
    let (mut ring, mut bufs, streams, events, mut notes, fixed) = setup?;
    let mut jobs = Jobs::new(plan, w, n);
    jobs.start();
    let mut drained = false;
    let mut stats = run_loop(
        source,
        plan,
        target,
        opts,
        progress,
        &mut ring,
        &mut bufs,
        &streams,
        &events,
        &mut jobs,
        fixed,
        &mut drained,
    );
    if let Ok(s) = stats.as_mut() {
        s.notes.append(&mut notes);
    }
    // Buffers must outlive the ring's registration: drop the ring first. After an early error
    // the kernel (or a copy engine) may still write to or read them: leak them then, never free
    // memory that I/O in flight targets.
    drop(ring);
    if drained {
        drop(bufs);
    } else {
        std::mem::forget(bufs);
    }
    stats
}

type Setup = (
    IoUring,
    Vec<Buf>,
    Vec<Stream>,
    Vec<Event>,
    Vec<String>,
    bool,
);

fn setup(source: &Source, plan: &Plan, target: &Target<'_>, opts: &PipelineOpts) -> Result<Setup> {
    let qd = opts.qd.clamp(1, 4096);
    let buf_len = source.io_len(plan.bs) as usize;
    let mut notes = Vec::new();
    let mut fixed = false;
    let ring = IoUring::new(qd.next_power_of_two()).map_err(|e| DatapathError::Io {
        path: source.path.clone(),
        what: "io_uring setup",
        source: e,
    })?;
    let (mut bufs, streams, events) = match target {
        Target::Host { .. } => (
            DmaBuffer::many(qd as usize, buf_len)
                .into_iter()
                .map(Buf::Host)
                .collect::<Vec<_>>(),
            Vec::new(),
            Vec::new(),
        ),
        Target::Gpu { dst } => {
            let gpu: &Arc<Gpu> = dst.gpu();
            gpu.bind()?;
            let nbuf = (qd * 2) as usize;
            let bufs: Vec<Buf> = gpu
                .pinned_many(nbuf, buf_len)?
                .into_iter()
                .map(Buf::Pinned)
                .collect();
            let streams = (0..opts.streams.max(1))
                .map(|_| gpu.stream())
                .collect::<Result<Vec<_>>>()?;
            let events = (0..nbuf).map(|_| gpu.event()).collect::<Result<Vec<_>>>()?;
            (bufs, streams, events)
        }
    };
    if opts.fixed {
        let iov: Vec<libc::iovec> = bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.ptr().cast(),
                iov_len: buf_len,
            })
            .collect();
        // SAFETY: the buffers outlive the ring (the worker drops the ring first).
        match unsafe { ring.submitter().register_buffers(&iov) } {
            Ok(()) => fixed = true,
            Err(e) => notes.push(format!(
                "io_uring buffer registration failed ({e}): plain reads"
            )),
        }
    }
    Ok((ring, bufs, streams, events, notes, fixed))
}

#[allow(clippy::too_many_arguments)]
fn run_loop(
    source: &Source,
    plan: &Plan,
    target: &Target<'_>,
    opts: &PipelineOpts,
    progress: &Progress,
    ring: &mut IoUring,
    bufs: &mut [Buf],
    streams: &[Stream],
    events: &[Event],
    jobs: &mut Jobs,
    fixed: bool,
    drained: &mut bool,
) -> Result<Stats> {
    let qd = opts.qd.clamp(1, 4096);
    let fd = types::Fd(source.file.as_raw_fd());
    let flags = if opts.uring_async {
        squeue::Flags::ASYNC
    } else {
        squeue::Flags::empty()
    };
    let mut stats = Stats::default();
    let mut free: Vec<usize> = (0..bufs.len()).rev().collect();
    let mut ios: Vec<Option<Io>> = vec![None; bufs.len()];
    let mut copying: VecDeque<usize> = VecDeque::new();
    let mut reads_in_flight = 0u32;
    let mut exhausted = false;
    let mut first_err: Option<DatapathError> = None;
    let mut cqes: Vec<(u64, i32)> = Vec::with_capacity(qd as usize);
    let mut stream_rr = 0usize;
    let align = source.align;
    let reap_per_wake = match opts.batch {
        0 => usize::MAX,
        n => n as usize,
    };

    let push_read = |ring: &mut IoUring, bufs: &mut [Buf], slot: usize, io: &Io| -> Result<()> {
        let remaining = io.want - io.got;
        let len = if io.got == 0 {
            source.io_len(remaining)
        } else {
            remaining.div_ceil(align) * align
        };
        // SAFETY: bufs[slot] stays allocated and untouched until this read completes.
        let ptr = unsafe { bufs[slot].ptr().add(io.got as usize) };
        let entry = if fixed {
            opcode::ReadFixed::new(fd, ptr, len as u32, slot as u16)
                .offset(io.off + io.got)
                .build()
        } else {
            opcode::Read::new(fd, ptr, len as u32)
                .offset(io.off + io.got)
                .build()
        }
        .flags(flags)
        .user_data(slot as u64);
        // SAFETY: the entry references memory that outlives the I/O (drained before return).
        while unsafe { ring.submission().push(&entry) }.is_err() {
            ring.submit().map_err(|e| DatapathError::Io {
                path: source.path.clone(),
                what: "io_uring submit",
                source: e,
            })?;
        }
        Ok(())
    };

    loop {
        // Keep qd reads in flight.
        while first_err.is_none() && !exhausted && reads_in_flight < qd {
            let Some(slot) = free.pop() else { break };
            match jobs.next() {
                Some((off, want)) => {
                    let io = Io {
                        off,
                        want,
                        got: 0,
                        started: Instant::now(),
                    };
                    push_read(ring, bufs, slot, &io)?;
                    ios[slot] = Some(io);
                    reads_in_flight += 1;
                }
                None => {
                    free.push(slot);
                    exhausted = true;
                }
            }
        }
        if reads_in_flight == 0 && copying.is_empty() {
            break;
        }
        if reads_in_flight > 0 {
            let res = if copying.is_empty() {
                ring.submit_and_wait(1)
            } else {
                // Copies free buffers too: do not sleep long on reads alone.
                let ts = types::Timespec::new().nsec(20_000);
                let args = types::SubmitArgs::new().timespec(&ts);
                ring.submitter().submit_with_args(1, &args)
            };
            match res {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY)
                    ) => {}
                Err(e) => {
                    return Err(DatapathError::Io {
                        path: source.path.clone(),
                        what: "io_uring wait",
                        source: e,
                    });
                }
            }
        } else if let Some(&slot) = copying.front() {
            events[slot].wait()?;
        }
        cqes.clear();
        // The rest stay in the completion ring: the next wait returns at once.
        cqes.extend(
            ring.completion()
                .take(reap_per_wake)
                .map(|c| (c.user_data(), c.result())),
        );
        for &(ud, res) in &cqes {
            let slot = ud as usize;
            let Some(mut io) = ios[slot] else { continue };
            if res < 0 {
                let errno = -res;
                if errno == libc::EAGAIN || errno == libc::EINTR {
                    push_read(ring, bufs, slot, &io)?;
                    continue;
                }
                reads_in_flight -= 1;
                ios[slot] = None;
                free.push(slot);
                first_err.get_or_insert(DatapathError::Io {
                    path: source.path.clone(),
                    what: "read",
                    source: std::io::Error::from_raw_os_error(errno),
                });
                continue;
            }
            io.got += res as u64;
            if io.got < io.want {
                if res == 0 || (source.direct && io.got % align != 0) {
                    reads_in_flight -= 1;
                    ios[slot] = None;
                    free.push(slot);
                    first_err.get_or_insert(DatapathError::ShortRead {
                        path: source.path.clone(),
                        offset: io.off + io.got,
                        wanted: io.want - io.got,
                    });
                    continue;
                }
                ios[slot] = Some(io);
                push_read(ring, bufs, slot, &io)?;
                continue;
            }
            reads_in_flight -= 1;
            if first_err.is_some() {
                ios[slot] = None;
                free.push(slot);
                continue;
            }
            match target {
                Target::Host { sink } => {
                    if let Some(sink) = sink {
                        sink(io.off, bufs[slot].slice(io.want as usize));
                    }
                    finish(&mut stats, progress, opts, &io);
                    ios[slot] = None;
                    free.push(slot);
                }
                Target::Gpu { dst } => {
                    let rel = (io.off - plan.range.offset) % dst.len as u64;
                    let stream = &streams[stream_rr % streams.len()];
                    stream_rr += 1;
                    let ptr = bufs[slot].ptr();
                    let len = io.want.min(dst.len as u64 - rel) as usize;
                    // SAFETY: the pinned buffer stays untouched until events[slot] fires, and
                    // the device range is inside `dst`, which outlives the pipeline.
                    let r = unsafe { stream.copy_h2d(dst.ptr + rel, ptr, len) }
                        .and_then(|()| events[slot].record(stream));
                    match r {
                        Ok(()) => {
                            ios[slot] = Some(io);
                            copying.push_back(slot);
                        }
                        Err(e) => {
                            ios[slot] = None;
                            free.push(slot);
                            first_err.get_or_insert(e);
                        }
                    }
                }
            }
        }
        // Buffers whose copies are done are free again (in order of submission).
        while let Some(&slot) = copying.front() {
            match events[slot].done() {
                Ok(true) => {
                    copying.pop_front();
                    if let Some(io) = ios[slot].take() {
                        finish(&mut stats, progress, opts, &io);
                    }
                    free.push(slot);
                }
                Ok(false) => break,
                Err(e) => {
                    // Wait for the rest to settle before the buffers can go.
                    for &s in &copying {
                        let _ = events[s].wait();
                    }
                    copying.clear();
                    first_err.get_or_insert(e);
                }
            }
        }
    }
    // The loop only ends with nothing in flight.
    *drained = true;
    if let Some(started) = jobs.started {
        stats.elapsed = started.elapsed();
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(stats),
    }
}

fn finish(stats: &mut Stats, progress: &Progress, opts: &PipelineOpts, io: &Io) {
    progress.record(stats, io.want, io.started.elapsed(), opts.latencies);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(pattern: Pattern, limit: Limit) -> Plan {
        Plan {
            range: ByteRange {
                offset: 8192,
                len: 64 * 4096,
            },
            bs: 4096,
            pattern,
            limit,
        }
    }

    #[test]
    fn once_covers_every_block_exactly_once_across_workers() {
        let p = plan(Pattern::Seq, Limit::Once);
        let mut seen = Vec::new();
        for w in 0..3 {
            let mut j = Jobs::new(&p, w, 3);
            j.start();
            while let Some((off, len)) = j.next() {
                seen.push((off, len));
            }
        }
        seen.sort();
        let want: Vec<_> = p.range.chunks(4096).collect();
        assert_eq!(seen, want);
    }

    #[test]
    fn random_offsets_are_aligned_inside_and_bounded_by_bytes() {
        let p = plan(Pattern::Rand, Limit::Bytes(100 * 4096));
        let mut total = 0;
        let mut distinct = std::collections::HashSet::new();
        for w in 0..2 {
            let mut j = Jobs::new(&p, w, 2);
            j.start();
            while let Some((off, len)) = j.next() {
                assert_eq!((off - 8192) % 4096, 0);
                assert!(off + len <= p.range.end());
                total += len;
                distinct.insert(off);
            }
        }
        assert_eq!(total, 100 * 4096);
        assert!(
            distinct.len() > 30,
            "random offsets look stuck: {}",
            distinct.len()
        );
    }

    #[test]
    fn time_limit_stops() {
        let p = plan(Pattern::Seq, Limit::Time(Duration::from_millis(20)));
        let mut j = Jobs::new(&p, 0, 1);
        let t = Instant::now();
        j.start();
        let mut n = 0u64;
        while j.next().is_some() {
            n += 1;
        }
        assert!(n > 64, "sequential with a time limit wraps around");
        assert!(t.elapsed() >= Duration::from_millis(20));
    }
}
