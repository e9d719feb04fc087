//! The text formats of `/proc/driver/nvidia-fs/{stats,peer_distance,peer_affinity,version}`,
//! parsed without I/O. Kept free of the rest of the crate (std and serde only) so the fuzz
//! target (`fuzz/fuzz_targets/nvidia_fs_stats.rs`) compiles it on its own.
//!
//! Formats follow the driver's `nvfs-proc.c`/`nvfs-stat.c`/`nvfs-pci.c`
//! (github.com/NVIDIA/gds-nvidia-fs) and the GDS troubleshooting guide ("Displaying GDS NVIDIA
//! FS Driver Statistics"). The stats file changed layout across driver versions (stats ver
//! 1.0 … 4.0: continuation lines in old versions, `Reads : n=… ok=…` only when
//! `rw_stats_enabled=1`), so the parser is line-oriented and lenient: every
//! `section : key=value` pair becomes a named counter, other lines are skipped, and nothing in
//! the input can make it panic.

use std::collections::BTreeMap;

use serde::Serialize;

/// Counters exported as `gds_nvidia_fs_<name>`: only these, so the metric set is bounded
/// whatever the file holds. `true` marks a monotonic counter (reset only by writing to stats).
pub const EXPORTED_COUNTERS: &[(&str, bool)] = &[
    ("active_shadow_buffer_mib", false),
    ("active_process", false),
    ("batches_n", true),
    ("batches_ok", true),
    ("batches_err", true),
    ("batches_avg_submit_latency_usec", false),
    ("reads_n", true),
    ("reads_ok", true),
    ("reads_err", true),
    ("reads_readmib", true),
    ("reads_io_state_err", true),
    ("reads_bandwidth_mib_s", false),
    ("reads_avg_latency_usec", false),
    ("sparse_reads_n", true),
    ("sparse_reads_io", true),
    ("sparse_reads_holes", true),
    ("sparse_reads_pages", true),
    ("writes_n", true),
    ("writes_ok", true),
    ("writes_err", true),
    ("writes_writemib", true),
    ("writes_io_state_err", true),
    ("writes_pg_cache", true),
    ("writes_pg_cache_fail", true),
    ("writes_pg_cache_eio", true),
    ("writes_bandwidth_mib_s", false),
    ("writes_avg_latency_usec", false),
    ("mmap_n", true),
    ("mmap_ok", true),
    ("mmap_err", true),
    ("mmap_munmap", true),
    ("bar1_map_n", true),
    ("bar1_map_ok", true),
    ("bar1_map_err", true),
    ("bar1_map_free", true),
    ("bar1_map_callbacks", true),
    ("bar1_map_active", false),
    ("bar1_map_delay_frees", true),
    ("error_cpu_gpu_pages", true),
    ("error_sg_ext", true),
    ("error_dma_map", true),
    ("error_dma_ref", true),
    ("ops_read", false),
    ("ops_write", false),
    ("ops_batchio", false),
];

/// Parsed `/proc/driver/nvidia-fs/stats`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct NvfsStats {
    /// `GDS Version: 1.14.0.31`
    pub gds_version: Option<String>,
    /// `NVFS statistics(ver: 4.0)`
    pub stats_version: Option<String>,
    /// `NVFS Driver(version: 2.25.7)` (older drivers print `2:7:47`).
    pub driver_version: Option<String>,
    pub peerdirect_supported: Option<bool>,
    pub io_stats_enabled: Option<bool>,
    pub peer_io_stats_enabled: Option<bool>,
    pub logging_level: Option<String>,
    /// Named counters, e.g. `reads_n`, `bar1_map_ok`, `ops_read`, `active_shadow_buffer_mib`.
    pub counters: BTreeMap<String, u64>,
    pub gpus: Vec<NvfsGpuStats>,
    /// False when the file ends before the `Ops` line every driver version prints last
    /// (before the per-GPU lines): the read was truncated.
    pub complete: bool,
}

/// One `GPU 0000:01:00.0 uuid:… : Registered_MiB=0 Cache_MiB=0 max_pinned_MiB=1` line.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct NvfsGpuStats {
    pub pci: String,
    pub uuid: Option<String>,
    pub counters: BTreeMap<String, u64>,
}

/// Lower-case, runs of non-alphanumerics become one `_`, no leading/trailing `_`.
fn normalize_name(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    for c in raw.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('_') && !out.is_empty() {
            out.push('_');
        }
    }
    while out.ends_with('_') {
        out.pop();
    }
    out
}

fn parse_bool(value: &str) -> Option<bool> {
    match value.trim().to_ascii_lowercase().as_str() {
        "true" | "enabled" | "yes" | "1" => Some(true),
        "false" | "disabled" | "no" | "0" => Some(false),
        _ => None,
    }
}

/// Parses `key=value` pairs; values that are not unsigned integers are skipped.
fn parse_pairs(text: &str, prefix: &str, into: &mut BTreeMap<String, u64>) {
    for token in text.split_whitespace() {
        let Some((key, value)) = token.split_once('=') else {
            continue;
        };
        let Ok(value) = value.parse::<u64>() else {
            continue;
        };
        let key = normalize_name(key);
        if key.is_empty() {
            continue;
        }
        let name = if prefix.is_empty() {
            key
        } else {
            format!("{prefix}_{key}")
        };
        into.insert(name, value);
    }
}

/// Text between `(version:` / `(ver:` and `)`.
fn paren_value(line: &str) -> Option<String> {
    let start = line.find(':')?;
    let rest = &line[start + 1..];
    let end = rest.find(')').unwrap_or(rest.len());
    let value = rest[..end].trim();
    (!value.is_empty()).then(|| value.to_owned())
}

enum Continuation {
    None,
    Section(String),
    Gpu,
}

/// Parses the stats text. Never fails: a truncated or garbled file yields fewer fields.
pub fn parse_stats(text: &str) -> NvfsStats {
    let mut stats = NvfsStats::default();
    let mut continuation = Continuation::None;
    for raw in text.lines() {
        let indented = raw.starts_with([' ', '\t']);
        let line = raw.trim();
        if line.is_empty() {
            continuation = Continuation::None;
            continue;
        }
        if indented && line.contains('=') && !line.contains(':') {
            match &continuation {
                Continuation::Section(prefix) => parse_pairs(line, prefix, &mut stats.counters),
                Continuation::Gpu => {
                    if let Some(gpu) = stats.gpus.last_mut() {
                        parse_pairs(line, "", &mut gpu.counters);
                    }
                }
                Continuation::None => {}
            }
            continue;
        }
        continuation = Continuation::None;
        if let Some(rest) = line.strip_prefix("GDS Version:") {
            stats.gds_version = Some(rest.trim().to_owned()).filter(|v| !v.is_empty());
        } else if line.starts_with("NVFS statistics") {
            stats.stats_version = paren_value(line);
        } else if line.starts_with("NVFS Driver") {
            stats.driver_version = paren_value(line).map(|v| v.replace(':', "."));
        } else if let Some(rest) = line.strip_prefix("Mellanox PeerDirect Supported:") {
            stats.peerdirect_supported = parse_bool(rest);
        } else if let Some(rest) = line.strip_prefix("IO stats:") {
            let (io, peer) = rest.split_once(',').unwrap_or((rest, ""));
            stats.io_stats_enabled = parse_bool(io);
            stats.peer_io_stats_enabled = peer
                .trim()
                .strip_prefix("peer IO stats:")
                .and_then(parse_bool);
        } else if let Some(rest) = line.strip_prefix("Logging level:") {
            stats.logging_level = Some(rest.trim().to_owned()).filter(|v| !v.is_empty());
        } else if let Some(rest) = line.strip_prefix("GPU ") {
            stats.gpus.push(parse_gpu_line(rest));
            continuation = Continuation::Gpu;
        } else if let Some((name, value)) = line.split_once(':') {
            let section = normalize_name(name);
            if section.is_empty() {
                continue;
            }
            if section == "ops" {
                stats.complete = true;
            }
            let value = value.trim();
            if let Ok(number) = value.parse::<u64>() {
                // `Active Shadow-Buffer (MiB): 0`, `Active Process: 0`
                stats.counters.insert(section, number);
            } else {
                parse_pairs(value, &section, &mut stats.counters);
                continuation = Continuation::Section(section);
            }
        }
    }
    stats
}

fn parse_gpu_line(rest: &str) -> NvfsGpuStats {
    let mut tokens = rest.split_whitespace();
    let pci = tokens.next().unwrap_or_default().to_owned();
    let uuid = rest
        .split_whitespace()
        .find_map(|t| t.strip_prefix("uuid:"))
        .map(str::to_owned);
    let mut counters = BTreeMap::new();
    let values = rest.split_once(" : ").map(|(_, v)| v).unwrap_or("");
    parse_pairs(values, "", &mut counters);
    NvfsGpuStats {
        pci,
        uuid,
        counters,
    }
}

/// One row of `peer_distance`: `gpu peer peerrank p2pdist link gen numa np2p class`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PeerDistance {
    pub gpu: String,
    pub peer: String,
    pub rank: u64,
    pub pci_distance: u64,
    pub link_width: u64,
    pub link_gen: u64,
    pub numa_node: i64,
    pub p2p_ops: u64,
    pub class: String,
}

fn parse_num(token: &str) -> Option<u64> {
    match token.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => token.parse().ok(),
    }
}

pub fn parse_peer_distance(text: &str) -> Vec<PeerDistance> {
    text.lines()
        .filter_map(|line| {
            let t: Vec<&str> = line.split_whitespace().collect();
            if t.len() < 9 || t[0] == "gpu" {
                return None;
            }
            // numa is printed as %02x of an int: -1 shows as 0xffffffff.
            let numa = parse_num(t[6]).map(|n| if n > i32::MAX as u64 { -1 } else { n as i64 })?;
            Some(PeerDistance {
                gpu: t[0].to_owned(),
                peer: t[1].to_owned(),
                rank: parse_num(t[2])?,
                pci_distance: parse_num(t[3])?,
                link_width: parse_num(t[4])?,
                link_gen: parse_num(t[5])?,
                numa_node: numa,
                p2p_ops: parse_num(t[7])?,
                class: t[8].to_owned(),
            })
        })
        .collect()
}

/// One row of `peer_affinity`: P2P DMA counts by PCI distance; the last is via the root complex.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PeerAffinity {
    pub gpu: String,
    pub by_distance: Vec<u64>,
    pub cross_root_port: u64,
}

pub fn parse_peer_affinity(text: &str) -> Vec<PeerAffinity> {
    text.lines()
        .filter_map(|line| {
            let rest = line.trim().strip_prefix("GPU :")?;
            let (gpu, counts) = rest.rsplit_once(':')?;
            let mut values: Vec<u64> = counts
                .split_whitespace()
                .map(|t| t.parse().ok())
                .collect::<Option<_>>()?;
            let cross = values.pop()?;
            Some(PeerAffinity {
                gpu: gpu.trim().to_owned(),
                by_distance: values,
                cross_root_port: cross,
            })
        })
        .collect()
}

pub fn parse_version(text: &str) -> Result<String, String> {
    text.lines()
        .find_map(|l| l.trim().strip_prefix("version:"))
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
        .ok_or_else(|| "no `version:` line".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    // The example of the GDS troubleshooting guide (stats ver 4.0, I/O stats enabled, driver
    // 2.7 layout with continuation lines).
    const GUIDE_EXAMPLE: &str = "GDS Version: 1.0.0.71
NVFS statistics(ver: 4.0)
NVFS Driver(version: 2:7:47)
Mellanox PeerDirect Supported: True
IO stats: Enabled, peer IO stats: Enabled
Logging level: info

Active Shadow-Buffer (MiB): 0
Active Process: 0
Reads                           : n=0 ok=0 err=0 readMiB=0 io_state_err=0
Reads                           : Bandwidth(MiB/s)=0 Avg-Latency(usec)=0
Sparse Reads : n=6 io=0 holes=0 pages=0
Writes                          : n=0 ok=0 err=0 writeMiB=0 io_state_err=0
        pg-cache=0 pg-cache-fail=0 pg-cache-eio=0
Writes                          : Bandwidth(MiB/s)=0 Avg-Latency(usec)=0
Mmap : n=183 ok=183 err=0 munmap=183
Bar1-map                        : n=183 ok=183 err=0 free=165 callbacks=18
        active=0
Error                           : cpu-gpu-pages=0 sg-ext=0 dma-map=0 dma-ref=0
Ops : Read=0 Write=0
GPU 0000:be:00.0  uuid:87e5c586-88ed-583b-df45-fcee0f1e7917 : Registered_MiB=0 Cache_MiB=0
        max_pinned_MiB=1 cross_root_port(%)=0
GPU 0000:e7:00.0  uuid:029faa3b-cb0d-2718-259c-6dc650c636eb : Registered_MiB=0 Cache_MiB=0
        max_pinned_MiB=1 cross_root_port(%)=0
";

    #[test]
    fn parses_the_guide_example() {
        let s = parse_stats(GUIDE_EXAMPLE);
        assert_eq!(s.gds_version.as_deref(), Some("1.0.0.71"));
        assert_eq!(s.stats_version.as_deref(), Some("4.0"));
        assert_eq!(s.driver_version.as_deref(), Some("2.7.47"));
        assert_eq!(s.peerdirect_supported, Some(true));
        assert_eq!(s.io_stats_enabled, Some(true));
        assert_eq!(s.peer_io_stats_enabled, Some(true));
        assert_eq!(s.counters["sparse_reads_n"], 6);
        assert_eq!(s.counters["mmap_n"], 183);
        assert_eq!(s.counters["bar1_map_free"], 165);
        assert_eq!(s.counters["bar1_map_callbacks"], 18);
        assert_eq!(s.counters["bar1_map_active"], 0);
        assert_eq!(s.counters["writes_pg_cache_fail"], 0);
        assert_eq!(s.counters["reads_bandwidth_mib_s"], 0);
        assert_eq!(s.counters["reads_avg_latency_usec"], 0);
        assert_eq!(s.gpus.len(), 2);
        assert_eq!(s.gpus[0].pci, "0000:be:00.0");
        assert_eq!(
            s.gpus[0].uuid.as_deref(),
            Some("87e5c586-88ed-583b-df45-fcee0f1e7917")
        );
        assert_eq!(s.gpus[0].counters["max_pinned_mib"], 1);
        assert_eq!(s.gpus[0].counters["cross_root_port"], 0);
        assert!(s.complete);
        let cut = GUIDE_EXAMPLE.find("Mmap").unwrap();
        assert!(!parse_stats(&GUIDE_EXAMPLE[..cut]).complete);
    }

    #[test]
    fn parses_the_current_driver_layout() {
        let text = "GDS Version: 1.14.0.31 \nNVFS statistics(ver: 4.0)\nNVFS Driver(version: 2.25.7)\n\
Mellanox PeerDirect Supported: True\nIO stats: Disabled, peer IO stats: Disabled\nLogging level: info\n\n\
Active Shadow-Buffer (MiB): 12\nActive Process: 3\n\
Reads\t\t\t\t: err=2 io_state_err=0\n\
Sparse Reads\t\t        : n=0 io=0 holes=0 pages=0 \n\
Writes\t\t\t\t: err=0 io_state_err=0 pg-cache=0 pg-cache-fail=0 pg-cache-eio=0\n\
Mmap\t\t\t\t: n=1 ok=1 err=0 munmap=2\n\
Bar1-map\t\t\t: n=1 ok=1 err=0 free=1 callbacks=0 active=0 delay-frees=0\n\
Error\t\t\t\t: cpu-gpu-pages=0 sg-ext=0 dma-map=0 dma-ref=0\n\
Ops\t\t\t\t: Read=0 Write=0 BatchIO=7\n\
GPU 0000:01:00.0  uuid:fb1e6550-2a78-d767-1f0d-7512eb8c552d : Registered_MiB=0 Cache_MiB=0 max_pinned_MiB=1 \n";
        let s = parse_stats(text);
        assert_eq!(s.gds_version.as_deref(), Some("1.14.0.31"));
        assert_eq!(s.driver_version.as_deref(), Some("2.25.7"));
        assert_eq!(s.io_stats_enabled, Some(false));
        assert_eq!(s.counters["active_shadow_buffer_mib"], 12);
        assert_eq!(s.counters["active_process"], 3);
        assert_eq!(s.counters["reads_err"], 2);
        assert_eq!(s.counters["bar1_map_delay_frees"], 0);
        assert_eq!(s.counters["ops_batchio"], 7);
        assert!(!s.counters.contains_key("reads_n"));
        assert_eq!(s.gpus[0].counters["max_pinned_mib"], 1);
        // Every counter the parser produced from the real layout is one we export.
        for name in s.counters.keys() {
            assert!(
                EXPORTED_COUNTERS.iter().any(|(n, _)| n == name),
                "{name} is not exported"
            );
        }
    }

    #[test]
    fn truncated_and_garbage_input_never_panics() {
        for cut in 0..GUIDE_EXAMPLE.len() {
            if GUIDE_EXAMPLE.is_char_boundary(cut) {
                let _ = parse_stats(&GUIDE_EXAMPLE[..cut]);
            }
        }
        let s = parse_stats(":::\n=\n GPU\nGPU\n  a=b=c\nReads : n=99999999999999999999999 ok=1\n");
        assert_eq!(s.counters.get("reads_ok"), Some(&1));
        assert!(!s.counters.contains_key("reads_n"));
    }

    #[test]
    fn parses_peer_distance_and_affinity() {
        let text = "gpu\t\tpeer\t\tpeerrank\tp2pdist\tlink\tgen\tnuma\tnp2p\tclass\n\
0000:01:00.0\t0000:02:00.0\t0x00000001\t0x0001\t0x04\t0x03\t0x00\t100\tnvme\n\
0000:01:00.0\t0000:81:00.0\t0x00000010\t0x0008\t0x04\t0x04\t0xffffffff\t0\tnvme\n";
        let rows = parse_peer_distance(text);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].peer, "0000:02:00.0");
        assert_eq!(rows[0].link_width, 4);
        assert_eq!(rows[0].p2p_ops, 100);
        assert_eq!(rows[1].pci_distance, 8);
        assert_eq!(rows[1].numa_node, -1);

        let text = "GPU P2P DMA distribution based on pci-distance\n\n(last column indicates p2p via root complex)\n\
GPU :0000:01:00.0:0 5 0 0 0 0 0 0 0 0 2\n";
        let rows = parse_peer_affinity(text);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].gpu, "0000:01:00.0");
        assert_eq!(rows[0].by_distance[1], 5);
        assert_eq!(rows[0].cross_root_port, 2);
    }

    #[test]
    fn parses_version() {
        assert_eq!(parse_version("version: 2.25\n").unwrap(), "2.25");
        assert!(parse_version("garbage").is_err());
    }
}
