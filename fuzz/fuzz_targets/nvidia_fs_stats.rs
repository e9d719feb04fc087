//! Fuzzes the parsers of `/proc/driver/nvidia-fs/{stats,peer_distance,peer_affinity,version}`.
//! The parser module is compiled in directly (it depends on std and serde only), so the fuzz
//! build does not drag in the agent's eBPF build, CUDA bindings or tokio.
#![no_main]

use libfuzzer_sys::fuzz_target;

use gds_host::nvidia_fs as format;

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('_')
        && !name.ends_with('_')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

fuzz_target!(|data: &[u8]| {
    // The probe rejects non-UTF-8 before parsing; lossy decoding still feeds every byte pattern
    // the parser could see through replacement characters.
    let text = String::from_utf8_lossy(data);
    let stats = format::parse_stats(&text);
    // Counter names are what metric names are built from: they must stay [a-z0-9_].
    for name in stats.counters.keys() {
        assert!(valid_name(name), "bad counter name {name:?}");
    }
    for gpu in &stats.gpus {
        for name in gpu.counters.keys() {
            assert!(valid_name(name), "bad GPU counter name {name:?}");
        }
    }
    // Parsing is a pure function of the text.
    assert_eq!(stats, format::parse_stats(&text));
    let _ = format::parse_peer_distance(&text);
    for row in format::parse_peer_affinity(&text) {
        assert!(!row.gpu.contains('\n'));
    }
    if let Ok(v) = format::parse_version(&text) {
        assert!(!v.is_empty());
    }
});
