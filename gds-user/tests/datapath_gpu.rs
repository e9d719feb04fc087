//! GPU tests: a file with a known pattern read into GPU memory by every route this host has
//! (bounce, naive, cuFile compat, gds where the probe allows it), copied back and compared byte
//! for byte, plus `--verify`. Without a GPU each test prints why it skips (CI has none).

use std::io::Write;

use gds_datapath::bounce::{PipelineOpts, Plan, Progress};
use gds_datapath::cli::{Job, execute};
use gds_datapath::cuda::{self, Gpu};
use gds_datapath::route::{Dest, Route};
use gds_datapath::{ByteRange, Direct, Source};

fn gpu_or_skip(test: &str) -> bool {
    match cuda::unavailable(0) {
        None => true,
        Some(why) => {
            eprintln!("SKIP {test}: {why}");
            false
        }
    }
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| (i.wrapping_mul(0x9E37_79B1) >> 11) as u8 ^ (i >> 20) as u8)
        .collect()
}

fn file(data: &[u8]) -> tempfile::NamedTempFile {
    let dir = if std::path::Path::new("/var/tmp").is_dir() {
        "/var/tmp"
    } else {
        "/tmp"
    };
    let mut f = tempfile::NamedTempFile::new_in(dir).unwrap();
    f.write_all(data).unwrap();
    f.flush().unwrap();
    f
}

fn read_back_and_compare(
    route: Route,
    direct: Direct,
    offset: u64,
    len: Option<u64>,
    chunk: u64,
) -> Option<String> {
    let total = 48 << 20 | 4321;
    let data = pattern(total);
    let f = file(&data);
    let mut source = Source::open(f.path(), direct).unwrap();
    let range = source.range(offset, len, direct).unwrap();
    let chunk = source.chunk(chunk);
    let gpu = Gpu::open(0).unwrap();
    let dst = gpu.alloc(range.len as usize).unwrap();
    dst.fill(0xA5).unwrap();
    let progress = Progress::default();
    let opts = PipelineOpts {
        qd: 8,
        threads: 2,
        streams: 3,
        ..PipelineOpts::default()
    };
    let r = execute(Job {
        route,
        source: &source,
        plan: Plan::once(range, chunk),
        dest: &Dest::Gpu(0),
        opts,
        verify: true,
        progress: &progress,
        dst: Some(&dst),
    });
    let outcome = match r {
        Ok(o) => o,
        Err(e) => return Some(format!("{route:?}: {e}")),
    };
    assert_eq!(outcome.stats.bytes, range.len);
    assert!(outcome.verified.is_some());
    let mut back = vec![0u8; range.len as usize];
    dst.copy_to_host(0, &mut back).unwrap();
    let want = &data[range.offset as usize..range.end() as usize];
    if let Some(i) = back.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{route:?} {direct:?}: byte {} differs (got {:#x}, want {:#x})",
            range.offset + i as u64,
            back[i],
            want[i]
        );
    }
    eprintln!(
        "{route:?} {direct:?} offset {offset}: {} bytes into GPU 0 ({}) match the file",
        range.len, gpu.name
    );
    None
}

#[test]
fn bounce_and_naive_bytes_arrive_in_gpu_memory() {
    if !gpu_or_skip("bounce_and_naive_bytes_arrive_in_gpu_memory") {
        return;
    }
    for route in [Route::Bounce, Route::Naive] {
        for direct in [Direct::On, Direct::Off] {
            assert_eq!(read_back_and_compare(route, direct, 0, None, 1 << 20), None);
        }
        // Unaligned range, page cache.
        assert_eq!(
            read_back_and_compare(route, Direct::Off, 4097, Some(10_000_003), 256 << 10),
            None
        );
    }
}

#[test]
fn cufile_compat_bytes_arrive_in_gpu_memory() {
    if !gpu_or_skip("cufile_compat_bytes_arrive_in_gpu_memory") {
        return;
    }
    if let Some(why) = read_back_and_compare(Route::Compat, Direct::On, 0, None, 1 << 20) {
        // The one environmental refusal (no udev data for the block device) is a skip with
        // its reason; anything else is a failure.
        if why.contains("udev properties") {
            eprintln!("SKIP cufile_compat_bytes_arrive_in_gpu_memory: {why}");
            return;
        }
        panic!("cuFile compat on a GPU host: {why}");
    }
    if let Some(why) =
        read_back_and_compare(Route::Compat, Direct::Off, 8192, Some(7 << 20), 1 << 20)
    {
        eprintln!("cuFile compat with a buffered fd: {why}");
    }
}

#[test]
fn gds_route_follows_the_probe() {
    if !gpu_or_skip("gds_route_follows_the_probe") {
        return;
    }
    let f = file(&pattern(1 << 20));
    let out = std::process::Command::new(
        // GDS_AGENT_BIN: the binary when this test runs away from its build tree.
        std::env::var("GDS_AGENT_BIN")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_gds-agent").to_owned()),
    )
    .args([
        "read",
        f.path().to_str().unwrap(),
        "--to",
        "gpu",
        "--path",
        "gds",
        "--verify",
    ])
    .output()
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let verdict = gds_datapath::cli::probe_verdict(0).expect("probe sees GPU 0");
    if verdict.path == gds_probe::DataPath::Gds {
        assert!(out.status.success(), "{err}");
    } else {
        assert!(!out.status.success());
        assert!(err.contains("--path gds is not possible"), "{err}");
        for b in verdict
            .blocked
            .iter()
            .filter(|b| b.path == gds_probe::DataPath::Gds)
        {
            assert!(
                err.contains(&b.reason),
                "missing blocker {:?} in {err}",
                b.reason
            );
        }
        eprintln!("gds refused as the probe says: {err}");
    }
    let _ = ByteRange { offset: 0, len: 0 };
}
