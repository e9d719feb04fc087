//! nvidia-fs (the GDS kernel module): `/proc/driver/nvidia-fs/{version,stats,devcount,
//! peer_distance,peer_affinity}`, read with bounded reads and parsed by
//! [`gds_host::nvidia_fs`] (the formats: fuzzed on their own).

use gds_host::nvidia_fs as format;

use serde::Serialize;

pub use format::{
    EXPORTED_COUNTERS, NvfsGpuStats, NvfsStats, PeerAffinity, PeerDistance, parse_peer_affinity,
    parse_peer_distance, parse_stats, parse_version,
};

use super::Fact;
use super::bounded::{HostRoot, ReadError, SMALL_FILE_LIMIT};

pub const PROC_DIR: &str = "/proc/driver/nvidia-fs";
/// The stats file grows by one line per GPU; 1 MiB is far beyond any real host.
pub const STATS_LIMIT: u64 = 1024 * 1024;

/// What the probe knows about nvidia-fs.
#[derive(Debug, Clone, Serialize)]
pub struct NvidiaFs {
    /// True when `/proc/driver/nvidia-fs` exists (the module is loaded).
    pub loaded: bool,
    /// `version: 2.25` from `/proc/driver/nvidia-fs/version`.
    pub version: Fact<String>,
    /// `/proc/driver/nvidia-fs/devcount` (older drivers: `devices`).
    pub device_count: Fact<u64>,
    pub stats: Fact<NvfsStats>,
    pub peer_distance: Fact<Vec<PeerDistance>>,
    pub peer_affinity: Fact<Vec<PeerAffinity>>,
}

fn not_loaded<T>() -> Fact<T> {
    Fact::unknown(format!(
        "nvidia-fs is not loaded ({PROC_DIR} does not exist)"
    ))
}

fn read_fact<T>(
    root: &HostRoot,
    name: &str,
    limit: u64,
    parse: impl FnOnce(&str) -> Result<T, String>,
) -> Fact<T> {
    let path = format!("{PROC_DIR}/{name}");
    match root.read(&path, limit) {
        Ok(text) => match parse(&text) {
            Ok(value) => Fact::Known(value),
            Err(why) => Fact::unknown(format!("cannot parse {path}: {why}")),
        },
        Err(err) => Fact::from_read_error(err),
    }
}

/// Reads only the stats file (what a metrics scrape needs).
pub fn read_stats(root: &HostRoot) -> Result<NvfsStats, ReadError> {
    root.read(&format!("{PROC_DIR}/stats"), STATS_LIMIT)
        .map(|t| parse_stats(&t))
}

pub fn probe(root: &HostRoot) -> NvidiaFs {
    if !root.exists(PROC_DIR) {
        return NvidiaFs {
            loaded: false,
            version: not_loaded(),
            device_count: not_loaded(),
            stats: not_loaded(),
            peer_distance: not_loaded(),
            peer_affinity: not_loaded(),
        };
    }
    let count_file = if root.exists(&format!("{PROC_DIR}/devcount")) {
        "devcount"
    } else {
        "devices"
    };
    NvidiaFs {
        loaded: true,
        version: read_fact(root, "version", SMALL_FILE_LIMIT, parse_version),
        device_count: read_fact(root, count_file, SMALL_FILE_LIMIT, |t| {
            t.trim().parse::<u64>().map_err(|e| e.to_string())
        }),
        stats: read_fact(root, "stats", STATS_LIMIT, |t| {
            let stats = parse_stats(t);
            if stats.stats_version.is_none() && stats.counters.is_empty() {
                Err("no NVFS statistics header and no counters".to_owned())
            } else {
                Ok(stats)
            }
        }),
        peer_distance: read_fact(root, "peer_distance", STATS_LIMIT, |t| {
            Ok(parse_peer_distance(t))
        }),
        peer_affinity: read_fact(root, "peer_affinity", STATS_LIMIT, |t| {
            Ok(parse_peer_affinity(t))
        }),
    }
}
