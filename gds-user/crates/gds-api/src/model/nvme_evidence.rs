//! The tracer's part of an NVMe disk's stall evidence: the commands outstanding on the disk
//! and the error completions of the last seconds. The host's part (the controllers and their
//! state) is read by `gds_host::evidence::disk`; this adds what only the tracer knows.
//!
//! Why these two and nothing else: the kernel's NVMe tracepoints are `nvme_setup_cmd`,
//! `nvme_complete_rq` (status, retries), `nvme_async_event` and `nvme_sq`; none fires for a
//! timeout, an abort sent or a reset as such. What a timeout or a reset does to commands shows
//! at `nvme_complete_rq`: the host cancels them (`nvme_cancel_request`: status `Host Aborted
//! Command`, then retried, i.e. requeued) or the controller aborts them (`Command Abort
//! Requested`). The error counters (`GDS_NVME_ERRORS`, by disk and status) already hold
//! exactly those, so differencing them over a short window gives "errors, aborts, timeouts
//! and resets seen around the stall" with no new program on the hot path. The outstanding
//! count is the NVMe in-flight table the stall scan just read.

use std::collections::{BTreeMap, VecDeque};

use gds_host::evidence::{DiskEvidence, NvmeStatusCount};

use super::{Layer, Request, labels};
use crate::raw::Source;

/// How far back the error counts of a stall's evidence reach (at least; at most
/// [`ERRORS_SPAN_NS`] + [`SAMPLE_EVERY_NS`]). A reset or a timeout shortly before the stall
/// is what explains it; half a minute covers the kernel's default I/O timeout (30 s) and
/// keeps seven samples.
pub const ERRORS_SPAN_NS: u64 = 30_000_000_000;
/// How often the counters are sampled: one map read (one system call while there are no
/// errors) per this, stalls or not.
pub const SAMPLE_EVERY_NS: u64 = 5_000_000_000;

/// Cumulative NVMe error completions by (disk, status name).
pub type ErrorCounts = BTreeMap<(String, String), u64>;

/// The NVMe error counters now, by disk and status name (several raw statuses share a name,
/// as in `gds_nvme_errors_total`).
pub fn error_counts<S: Source + ?Sized>(src: &S) -> ErrorCounts {
    let mut out = ErrorCounts::new();
    for (k, n) in src.nvme_errors() {
        *out.entry((
            src.disks().disk_name(k.dev),
            labels::nvme_status(k.status).to_owned(),
        ))
        .or_default() += n;
    }
    out
}

/// Samples of the error counters over the last [`ERRORS_SPAN_NS`], oldest first: the
/// baseline a stall's counts are differenced against.
#[derive(Debug, Default)]
pub struct ErrorWindow {
    samples: VecDeque<(u64, ErrorCounts)>,
}

impl ErrorWindow {
    /// A sample is due (none yet, or the newest is [`SAMPLE_EVERY_NS`] old).
    pub fn due(&self, now_ns: u64) -> bool {
        self.samples
            .back()
            .is_none_or(|(t, _)| now_ns.saturating_sub(*t) >= SAMPLE_EVERY_NS)
    }

    /// Keeps `counts`, read at `now_ns`, and lets go of samples no longer needed: the oldest
    /// kept is the newest at least [`ERRORS_SPAN_NS`] old.
    pub fn sample(&mut self, now_ns: u64, counts: ErrorCounts) {
        self.samples.push_back((now_ns, counts));
        while self
            .samples
            .get(1)
            .is_some_and(|(t, _)| now_ns.saturating_sub(*t) >= ERRORS_SPAN_NS)
        {
            self.samples.pop_front();
        }
    }

    /// The errors on `disk` between the oldest sample and `now` (`counts`, read at
    /// `now_ns`), and the span in milliseconds. Counters the agent had not seen at the oldest
    /// sample count from zero (a map entry appears with its first error).
    pub fn recent(
        &self,
        now_ns: u64,
        counts: &ErrorCounts,
        disk: &str,
    ) -> (Vec<NvmeStatusCount>, u64) {
        let Some((t0, base)) = self.samples.front() else {
            return (Vec::new(), 0);
        };
        let errors = counts
            .iter()
            .filter(|((d, _), _)| d == disk)
            .filter_map(|(k, n)| {
                let count = n.saturating_sub(base.get(k).copied().unwrap_or(0));
                (count > 0).then(|| NvmeStatusCount {
                    status: k.1.clone(),
                    count,
                })
            })
            .collect();
        (errors, now_ns.saturating_sub(*t0) / 1_000_000)
    }
}

/// NVMe commands outstanding per disk in the scan's in-flight requests (the NVMe layer's
/// table: block I/O and passthrough alike; `--pid`/`--comm` narrow it as they narrow stalls).
pub fn outstanding(inflight: &[Request]) -> BTreeMap<&str, u64> {
    let mut out = BTreeMap::new();
    for r in inflight.iter().filter(|r| r.layer == Layer::Nvme) {
        *out.entry(r.target.disk.as_str()).or_default() += 1;
    }
    out
}

/// What the tracer saw, for one scan: read once, at the first capture of an NVMe disk.
pub struct ScanNvme<'a> {
    /// Commands outstanding per disk; `None` where the NVMe layer is not traced.
    pub outstanding: Option<BTreeMap<&'a str, u64>>,
    pub counts: ErrorCounts,
    pub now_ns: u64,
}

impl ScanNvme<'_> {
    /// Adds the tracer's part to `disk`'s NVMe evidence (a disk that is not NVMe is left as
    /// it is).
    pub fn fill(&self, disk: &mut DiskEvidence, window: &ErrorWindow) {
        let Some(n) = disk.nvme.as_mut() else {
            return;
        };
        n.outstanding = self
            .outstanding
            .as_ref()
            .map(|o| o.get(disk.disk.as_str()).copied().unwrap_or(0));
        (n.errors, n.errors_window_ms) = window.recent(self.now_ns, &self.counts, &disk.disk);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gds_host::evidence::NvmeDiskEvidence;

    const S: u64 = 1_000_000_000;

    fn counts(items: &[(&str, &str, u64)]) -> ErrorCounts {
        items
            .iter()
            .map(|(d, s, n)| ((d.to_string(), s.to_string()), *n))
            .collect()
    }

    #[test]
    fn errors_are_the_difference_over_the_span_on_the_disk_only() {
        let mut w = ErrorWindow::default();
        assert!(w.due(0));
        w.sample(0, counts(&[("nvme0n1", "LBA Out of Range", 4)]));
        assert!(!w.due(4 * S), "sampled every 5 s");
        for t in (5..=40).step_by(5) {
            assert!(w.due(t * S));
            w.sample(t * S, counts(&[("nvme0n1", "LBA Out of Range", 4 + t)]));
        }
        // The oldest kept is the newest at least 30 s old: t = 10 s.
        let now = counts(&[
            ("nvme0n1", "LBA Out of Range", 50),
            ("nvme1n1", "Command Aborted By Host", 16),
        ]);
        let (e, ms) = w.recent(42 * S, &now, "nvme0n1");
        assert_eq!(ms, 32_000);
        assert_eq!(
            e,
            [NvmeStatusCount {
                status: "LBA Out of Range".into(),
                count: 50 - 14
            }]
        );
        // A counter that appeared after the oldest sample counts from zero.
        let (e, _) = w.recent(42 * S, &now, "nvme1n1");
        assert_eq!(e[0].count, 16);
        assert!(w.recent(42 * S, &now, "nvme2n1").0.is_empty());
        assert!(
            ErrorWindow::default()
                .recent(0, &now, "nvme1n1")
                .0
                .is_empty(),
            "no baseline, no claim"
        );
    }

    #[test]
    fn fill_adds_the_tracer_part_to_nvme_disks_only() {
        let mut w = ErrorWindow::default();
        w.sample(0, ErrorCounts::new());
        let scan = ScanNvme {
            outstanding: Some(BTreeMap::from([("nvme1n1", 40)])),
            counts: counts(&[("nvme1n1", "Command Aborted By Host", 16)]),
            now_ns: 3 * S,
        };
        let mut d = DiskEvidence {
            disk: "nvme1n1".into(),
            nvme: Some(NvmeDiskEvidence::default()),
            ..Default::default()
        };
        scan.fill(&mut d, &w);
        let n = d.nvme.unwrap();
        assert_eq!(n.outstanding, Some(40));
        assert_eq!(n.errors_window_ms, 3_000);
        assert_eq!(n.errors[0].count, 16);
        let mut vda = DiskEvidence {
            disk: "vda".into(),
            ..Default::default()
        };
        scan.fill(&mut vda, &w);
        assert_eq!(vda.nvme, None);
        let untraced = ScanNvme {
            outstanding: None,
            ..scan
        };
        let mut d = DiskEvidence {
            disk: "nvme1n1".into(),
            nvme: Some(NvmeDiskEvidence::default()),
            ..Default::default()
        };
        untraced.fill(&mut d, &w);
        assert_eq!(
            d.nvme.unwrap().outstanding,
            None,
            "not traced is not zero outstanding"
        );
    }
}
