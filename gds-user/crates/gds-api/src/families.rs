//! Every metric family the agent and the data path export: name, help, type and label names,
//! declared once. This is the interface dashboards and alerts are written against.
//!
//! Used by the collectors (`metrics`, `probe::metrics`, `datapath::metrics`), by xtask's
//! dashboard generator and observability check (gds-api builds without the eBPF toolchain that
//! xtask installs), and by a test that checks the README's metrics table against [`ALL`].
//! Plain data only.

/// The Prometheus type of a family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    /// The word the README's metrics table starts the type column with.
    pub const fn word(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// One metric family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Family {
    pub name: &'static str,
    pub help: &'static str,
    pub kind: Kind,
    /// Label names, in the order the collectors set them.
    pub labels: &'static [&'static str],
}

impl Family {
    /// Whether `metric` (a sample name, e.g. `x_bucket` of histogram `x`) belongs to this family.
    pub fn owns(&self, metric: &str) -> bool {
        metric == self.name
            || (self.kind == Kind::Histogram
                && ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|s| metric.strip_suffix(s) == Some(self.name)))
    }
}

const fn family(
    name: &'static str,
    kind: Kind,
    labels: &'static [&'static str],
    help: &'static str,
) -> Family {
    Family {
        name,
        help,
        kind,
        labels,
    }
}

use Kind::{Counter, Gauge, Histogram};

pub const URING_REQUESTS: Family = family(
    "gds_uring_requests_total",
    Counter,
    &["opcode"],
    "io_uring requests seen at submission, by opcode.",
);
pub const URING_DURATION: Family = family(
    "gds_uring_request_duration_seconds",
    Histogram,
    &["opcode"],
    "io_uring submission-to-completion latency, by opcode.",
);
pub const URING_ERRORS: Family = family(
    "gds_uring_request_errors_total",
    Counter,
    &["opcode"],
    "io_uring completions with res < 0, by opcode.",
);
pub const URING_INFLIGHT: Family = family(
    "gds_uring_inflight_requests",
    Gauge,
    &[],
    "io_uring requests submitted and not yet completed (tracked).",
);
pub const SLOW_REQUESTS: Family = family(
    "gds_slow_requests_total",
    Counter,
    &["opcode"],
    "io_uring requests slower than the slow threshold, by opcode.",
);
pub const SLOW_EVENTS: Family = family(
    "gds_slow_events_total",
    Counter,
    &[],
    "Slow io_uring requests delivered to the agent as events (logged, listed on /debug/slow); \
     plus gds_trace_dropped_total{reason=\"ringbuf_full\"} they equal gds_slow_requests_total.",
);
pub const TRACE_DROPPED: Family = family(
    "gds_trace_dropped_total",
    Counter,
    &["reason"],
    "Traced requests or events not aggregated, by reason.",
);
pub const NVME_COMMANDS: Family = family(
    "gds_nvme_commands_total",
    Counter,
    &["disk", "opcode"],
    "NVMe commands completed, by disk and NVMe opcode.",
);
pub const NVME_DURATION: Family = family(
    "gds_nvme_command_duration_seconds",
    Histogram,
    &["disk", "opcode"],
    "NVMe command latency (setup to completion), by disk and opcode.",
);
pub const STAGE_DURATION: Family = family(
    "gds_request_stage_duration_seconds",
    Histogram,
    &["stage", "disk", "origin"],
    "Request latency split into stages (queue, device, completion), by disk and origin: \
     uring_cmd (io_uring passthrough), syscall or uring (an O_DIRECT file call, once per call: \
     queue to its first request's issue, device to its last completion, completion to its \
     return).",
);
pub const NVME_ERRORS: Family = family(
    "gds_nvme_errors_total",
    Counter,
    &["disk", "status"],
    "NVMe commands completed with an error status, by disk and status name.",
);
pub const BLOCK_DURATION: Family = family(
    "gds_block_request_duration_seconds",
    Histogram,
    &["disk", "op", "memory"],
    "Block request latency (issue to completion), by disk, operation and what the data buffer \
     is: host memory or PCI peer memory (p2pdma).",
);
pub const STALLED_REQUESTS: Family = family(
    "gds_stalled_requests",
    Gauge,
    &["layer", "cause"],
    "Requests in flight longer than the stall threshold now, by layer (one series per layer \
     of /debug/layers) and the cause named when each stalled (one series per cause).",
);
pub const OLDEST_INFLIGHT: Family = family(
    "gds_oldest_inflight_seconds",
    Gauge,
    &["layer"],
    "Age of the oldest request in flight, by layer (one series per layer of /debug/layers).",
);
pub const STALLS: Family = family(
    "gds_stalls_total",
    Counter,
    &["layer", "disk", "cause"],
    "Stalls detected, by layer (a layer of /debug/layers), disk (unknown where the layer \
     has none) and cause named when detected (throttled, waiting_for_data, page_cache, queue_full, device, \
     unknown).",
);
pub const STALL_SCAN: Family = family(
    "gds_stall_scan_duration_seconds",
    Gauge,
    &[],
    "Time the last in-flight scan took.",
);
pub const AGENT_INFO: Family = family(
    "gds_agent_info",
    Gauge,
    &["version", "kernel"],
    "gds agent version and kernel release.",
);
pub const TRACEFS_AVAILABLE: Family = family(
    "gds_agent_tracefs_available",
    Gauge,
    &[],
    "1 while tracefs is mounted where the agent can see it (needed to start with --attach \
     classic and for trace_pipe; attached programs keep tracing without it).",
);
pub const CAPABILITY_INFO: Family = family(
    "gds_capability_info",
    Gauge,
    &[
        "gpu",
        "pci",
        "path",
        "gds_mode",
        "nvidia_fs",
        "cufile",
        "p2pdma",
        "kernel",
    ],
    "GPUDirect Storage capability of this host per GPU: the data path read will take (gds, p2p, \
     bounce) and what it depends on.",
);
pub const NVIDIA_FS_UP: Family = family(
    "gds_nvidia_fs_up",
    Gauge,
    &[],
    "1 when /proc/driver/nvidia-fs/stats was read and parsed on this scrape.",
);
/// Not one family but a prefix: one `gds_nvidia_fs_<counter>[_total]` per counter of
/// `/proc/driver/nvidia-fs/stats` (see `probe::nvidia_fs::EXPORTED_COUNTERS`).
pub const NVIDIA_FS_PREFIX: &str = "gds_nvidia_fs_";
pub const PIPELINE_BYTES: Family = family(
    "gds_pipeline_bytes_total",
    Counter,
    &["path", "dest"],
    "Bytes delivered by the data path, by route and destination.",
);
pub const PIPELINE_DURATION: Family = family(
    "gds_pipeline_read_duration_seconds",
    Histogram,
    &["path"],
    "Per-I/O time from submission to data at the destination, by route.",
);

pub const CUFILE_CALLS: Family = family(
    "gds_cufile_calls_total",
    Counter,
    &["op", "user"],
    "cuFile API calls that returned (errors included), by operation and user (trusted: root and \
     --cufile-users; other: everyone else).",
);
pub const CUFILE_DURATION: Family = family(
    "gds_cufile_call_duration_seconds",
    Histogram,
    &["op", "user"],
    "Duration of cuFile API calls, entry to return, by operation and user (trusted, other).",
);
pub const CUFILE_ERRORS: Family = family(
    "gds_cufile_errors_total",
    Counter,
    &["op", "error", "user"],
    "cuFile calls that failed, by operation, CUfileOpError name (errno: a read or write \
     returned -1) and user (trusted, other).",
);
pub const CUFILE_BYTES: Family = family(
    "gds_cufile_bytes_total",
    Counter,
    &["op", "path", "user"],
    "Bytes cuFileRead/cuFileWrite returned as done, by the data path the I/O beneath them took \
     (compat, nvfs, p2pdma, unknown) and user (trusted, other).",
);
pub const CUFILE_REQUESTED: Family = family(
    "gds_cufile_requested_bytes_total",
    Counter,
    &["op", "user"],
    "Bytes asked of cuFile (size arguments; batch submits summed), by operation and user \
     (trusted, other).",
);
pub const CUFILE_LIBRARIES: Family = family(
    "gds_cufile_libraries",
    Gauge,
    &[],
    "libcufile files (copies, by inode) mapped by some process and traced now.",
);
pub const CUFILE_BENEATH: Family = family(
    "gds_cufile_beneath_calls_total",
    Counter,
    &["link"],
    "Calls beneath cuFile in its processes: libc reads/writes linked to a cuFile call on their \
     file (linked) or not (unlinked), nvidia-fs data ioctls (nvfs_ioctl), traced cuFile calls \
     made inside another (nested).",
);

pub const FILE_REQUESTS: Family = family(
    "gds_file_requests_total",
    Counter,
    &["op", "direct"],
    "File read/write calls that ended (errors included), by operation and O_DIRECT (true, \
     false); which calls are seen depends on the file layer's hooks (/debug/layers).",
);
pub const FILE_BYTES: Family = family(
    "gds_file_bytes_total",
    Counter,
    &["op", "direct"],
    "Bytes file read/write calls returned as done, by operation and O_DIRECT.",
);
pub const FILE_DEVICE_REQUESTS: Family = family(
    "gds_file_device_requests_total",
    Counter,
    &["op", "direct"],
    "Block requests (one NVMe command each) the file calls that ended became, by operation and \
     O_DIRECT: per call, divided by gds_file_requests_total; only requests linked to their call \
     count (O_DIRECT; see /debug/layers).",
);
pub const FILE_DEVICE_BYTES: Family = family(
    "gds_file_device_bytes_total",
    Counter,
    &["op", "direct"],
    "Bytes the devices moved for the file calls that ended (their linked block requests), by \
     operation and O_DIRECT: against gds_file_bytes_total, what the device did for what was \
     asked.",
);
pub const FILE_DURATION: Family = family(
    "gds_file_request_duration_seconds",
    Histogram,
    &["op", "direct"],
    "Duration of file read/write calls, start to return, by operation and O_DIRECT.",
);
pub const FILE_ERRORS: Family = family(
    "gds_file_errors_total",
    Counter,
    &["op"],
    "File read/write calls that returned an error, by operation.",
);

/// Every family with a fixed name, agent first, then the data path's (`read`/`bench
/// --metrics-listen`).
pub const ALL: &[Family] = &[
    URING_REQUESTS,
    URING_DURATION,
    URING_ERRORS,
    URING_INFLIGHT,
    SLOW_REQUESTS,
    SLOW_EVENTS,
    TRACE_DROPPED,
    NVME_COMMANDS,
    NVME_DURATION,
    STAGE_DURATION,
    NVME_ERRORS,
    BLOCK_DURATION,
    STALLED_REQUESTS,
    OLDEST_INFLIGHT,
    STALLS,
    STALL_SCAN,
    AGENT_INFO,
    TRACEFS_AVAILABLE,
    CAPABILITY_INFO,
    NVIDIA_FS_UP,
    CUFILE_CALLS,
    CUFILE_DURATION,
    CUFILE_ERRORS,
    CUFILE_BYTES,
    CUFILE_REQUESTED,
    CUFILE_LIBRARIES,
    CUFILE_BENEATH,
    FILE_REQUESTS,
    FILE_BYTES,
    FILE_DEVICE_REQUESTS,
    FILE_DEVICE_BYTES,
    FILE_DURATION,
    FILE_ERRORS,
    PIPELINE_BYTES,
    PIPELINE_DURATION,
];

/// The family a sample name belongs to (histogram suffixes and the nvidia-fs prefix included):
/// `None` means the name is not part of the interface.
pub fn family_of(metric: &str) -> Option<&'static str> {
    ALL.iter()
        .find(|f| f.owns(metric))
        .map(|f| f.name)
        .or_else(|| {
            metric
                .starts_with(NVIDIA_FS_PREFIX)
                .then_some(NVIDIA_FS_PREFIX)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One row of the README's metrics table: name, type word, label names.
    fn readme_rows() -> Vec<(String, String, Vec<String>)> {
        let readme =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../README.md"))
                .expect("README.md at the workspace root");
        let start = readme
            .find("| metric | type | labels |")
            .expect("README has the metrics table");
        readme[start..]
            .lines()
            .skip(2)
            .take_while(|l| l.starts_with('|'))
            .map(|l| {
                let cells: Vec<&str> = l.trim_matches('|').split('|').map(str::trim).collect();
                let name = cells[0].trim_matches('`').to_owned();
                let kind = cells[1].split_whitespace().next().unwrap_or("").to_owned();
                // "stage (`queue`, …), disk" → ["stage", "disk"]; "—" → [].
                let mut depth = 0;
                let bare: String = cells[2]
                    .chars()
                    .filter(|c| {
                        match c {
                            '(' => depth += 1,
                            ')' => depth -= 1,
                            _ => return depth == 0,
                        }
                        false
                    })
                    .collect();
                let labels = bare
                    .split(',')
                    .filter_map(|l| l.split_whitespace().next())
                    .filter(|l| *l != "—" && *l != "-")
                    .map(str::to_owned)
                    .collect();
                (name, kind, labels)
            })
            .collect()
    }

    /// The README's metrics table is the interface's documentation: it must list exactly the
    /// declared families, with their types and labels.
    #[test]
    fn readme_metrics_table_matches_the_declared_families() {
        let rows = readme_rows();
        assert!(rows.len() >= ALL.len(), "{rows:?}");
        for f in ALL {
            let Some((_, kind, labels)) = rows.iter().find(|(n, _, _)| n == f.name) else {
                panic!("README's metrics table lacks {}", f.name);
            };
            assert_eq!(kind, f.kind.word(), "type of {} in the README", f.name);
            let mut want: Vec<&str> = f.labels.to_vec();
            let mut got: Vec<&str> = labels.iter().map(String::as_str).collect();
            want.sort_unstable();
            got.sort_unstable();
            assert_eq!(got, want, "labels of {} in the README", f.name);
        }
        for (name, _, _) in &rows {
            let known = ALL.iter().any(|f| f.name == name)
                || name.strip_suffix('*') == Some(NVIDIA_FS_PREFIX);
            assert!(known, "README lists {name}, which no collector declares");
        }
    }

    #[test]
    fn histogram_samples_belong_to_their_family() {
        assert_eq!(
            family_of("gds_uring_request_duration_seconds_bucket"),
            Some("gds_uring_request_duration_seconds")
        );
        assert_eq!(family_of("gds_uring_requests_total_count"), None);
        assert_eq!(
            family_of("gds_nvidia_fs_reads_total"),
            Some(NVIDIA_FS_PREFIX)
        );
        assert_eq!(family_of("gds_nope"), None);
    }
}
