//! The I/O beneath cuFile's calls, seen by the file layer instead of libc probes (issue 23,
//! "cuFile beneath from the kernel"): where the file layer's hooks see every call on a file
//! (here `--file-hooks syscalls`; the kiocb tier in the guests, `file.cufile-beneath-*`), a
//! compat read is linked to its cuFile call in the kernel by the file's inode, and the process
//! gets no `pread64`/`pwrite64` uprobes; with the default hooks here (the tracepoint tier,
//! which sees O_DIRECT calls only) the libc probes stay. Both classify the same reads as
//! compat, byte for byte.
//!
//! The library is the stand-in (`fixtures/libcufile_standin.c`: its `cuFileRead` is a real
//! buffered `pread(2)` beneath the call). Needs root and a C compiler.

mod common;

use std::time::Duration;

use common::{Agent, Driver, StandinFixtures, cufile_lock, require_root, within};
use gds_api::{
    model::cufile::{CufileProcess, CufileReport},
    raw::{Layer, LayerDetail, Layers},
};

fn process(agent: &Agent, pid: u32) -> Option<CufileProcess> {
    let r: CufileReport = serde_json::from_str(&agent.get("/debug/cufile")).unwrap();
    r.processes.into_iter().find(|p| p.pid == pid)
}

/// The cuFile layer's `beneath` and `libc_probes` on `/debug/layers`.
fn beneath(agent: &Agent) -> (String, Vec<u32>) {
    let l: Layers = serde_json::from_str(&agent.get("/debug/layers")).unwrap();
    l.layers
        .into_iter()
        .find(|e| e.layer == Layer::Cufile)
        .and_then(|e| match e.detail {
            Some(LayerDetail::Cufile {
                beneath,
                libc_probes,
                ..
            }) => Some((beneath, libc_probes)),
            _ => None,
        })
        .expect("/debug/layers has the cuFile layer's detail")
}

/// Runs the stand-in's reads under an agent started with `args`; returns what `/debug/layers`
/// said of the process and the metric delta of linked calls beneath.
fn compat_reads(fx: &StandinFixtures, args: &[&str]) -> (String, bool, f64) {
    const READS: u64 = 8;
    const SIZE: u64 = 65536;
    let agent = Agent::start(args);
    let mut driver = Driver::spawn(fx, &[], &fx.path("cufile-driver"));
    let pid = driver.load();
    within(Duration::from_secs(5), "library attached", &agent, || {
        let r: CufileReport = serde_json::from_str(&agent.get("/debug/cufile")).unwrap();
        r.libraries.iter().any(|l| l.pids.contains(&pid))
    });
    let before = agent.scrape();
    let fd: i32 = driver
        .cmd(&format!("open {}", fx.path("data").display()))
        .strip_prefix("opened ")
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        driver.cmd(&format!("read {READS} {SIZE}")),
        format!("read {READS} {SIZE}")
    );
    let compat = |p: &CufileProcess| {
        p.files
            .iter()
            .find(|f| f.fd == fd)
            .and_then(|f| f.counters.path_calls.get("compat").copied())
    };
    within(
        Duration::from_secs(3),
        "the reads on the file's row, path compat",
        &agent,
        || process(&agent, pid).is_some_and(|p| compat(&p) == Some(READS)),
    );
    let row = process(&agent, pid).unwrap();
    assert_eq!(row.counters.read_calls, READS, "{row:?}");
    assert_eq!(row.counters.read_bytes, READS * SIZE, "{row:?}");
    let now = agent.scrape();
    let linked = now.value("gds_cufile_beneath_calls_total", &[("link", "linked")])
        - before.value("gds_cufile_beneath_calls_total", &[("link", "linked")]);
    let compat_bytes = |m: &common::Metrics| {
        m.value(
            "gds_cufile_bytes_total",
            &[("op", "read"), ("path", "compat"), ("user", "trusted")],
        )
    };
    assert_eq!(
        compat_bytes(&now) - compat_bytes(&before),
        (READS * SIZE) as f64
    );
    let (how, libc) = beneath(&agent);
    driver.exit();
    let (status, log) = agent.stop();
    assert!(status.success(), "{log}");
    (how, libc.contains(&pid), linked)
}

#[test]
fn compat_reads_come_from_the_file_layer_where_it_sees_every_call() {
    require_root();
    let _lock = cufile_lock();
    let fx = StandinFixtures::build();

    // Default hooks here: the tracepoint tier sees O_DIRECT calls only: libc probes.
    let (how, probed, linked) = compat_reads(&fx, &[]);
    eprintln!("default hooks: beneath seen by {how:?}, libc probes {probed}, linked {linked}");
    assert_eq!(how, "libc probes");
    assert!(
        probed,
        "the process has libc probes with the tracepoint tier"
    );
    assert!(linked >= 8.0, "linked calls beneath: {linked}");

    // The syscalls tier sees every read: the kernel links them, no libc probe in the process.
    let (how, probed, linked) = compat_reads(&fx, &["--file-hooks", "syscalls"]);
    eprintln!("syscalls hooks: beneath seen by {how:?}, libc probes {probed}, linked {linked}");
    assert!(how.starts_with("file layer"), "{how}");
    assert!(
        !probed,
        "no libc probes where the file layer sees every call"
    );
    assert!(linked >= 8.0, "linked calls beneath: {linked}");
}
