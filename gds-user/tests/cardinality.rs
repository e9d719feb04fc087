//! Label cardinality: 10,000 distinct short-lived processes, each submitting a real io_uring
//! request, add no series to /metrics (labels are opcodes, drop reasons, layers and disks, never
//! pids or command names) and leave /debug bounded.
//!
//! The children are forks of this test process: each renames itself to [`CHILD_COMM`] (the
//! agent filters on it, so only they are counted), sets up a ring, submits one NOP and exits.

mod common;

use std::{
    collections::{BTreeSet, HashSet, VecDeque},
    time::{Duration, Instant},
};

use common::{Agent, Metrics, rss_kib, serial};

const CHILDREN: usize = 10_000;
/// Command name of the children (at most 15 bytes).
const CHILD_COMM: &str = "gds-card-child";
/// Forks in flight at once (enough to keep both cores busy, few enough to stay polite).
const PARALLEL: usize = 32;
/// Families whose series depend on host block/NVMe activity (a disk this test does not touch
/// may appear meanwhile); their new series must still carry only device labels.
const DEVICE_FAMILIES: [&str; 3] = ["gds_block_", "gds_nvme_", "gds_request_stage_"];
/// Labels a series may carry at all: none of them can take a value per process. (`error`: a
/// fixed table of CUfileOpError names plus `errno`/`unknown`; `link`: four words; `memory`:
/// `host`, `p2pdma`, `unknown`; `user`: `trusted` or `other`, never a user name or uid.)
const BOUNDED_LABELS: [&str; 24] = [
    "opcode",
    "reason",
    "layer",
    "disk",
    "op",
    "stage",
    "status",
    "le",
    "version",
    "kernel",
    "gpu",
    "pci",
    "path",
    "gds_mode",
    "nvidia_fs",
    "cufile",
    "p2pdma",
    "error",
    "link",
    "memory",
    "user",
    // gds_stalls_total: one of model::CauseKind::ALL.
    "cause",
    // gds_file_*: `true` or `false`.
    "direct",
    // gds_request_stage_duration_seconds: one of model::labels::origin's five words.
    "origin",
];

/// In the forked child: rename, one NOP through a fresh ring, exit. Never returns; never
/// unwinds into the parent's test harness.
fn child() -> ! {
    let code = (|| -> Result<i32, std::io::Error> {
        let name = std::ffi::CString::new(CHILD_COMM).unwrap();
        // SAFETY: PR_SET_NAME with a valid NUL-terminated string.
        unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr() as libc::c_ulong, 0, 0, 0) };
        let mut ring = io_uring::IoUring::new(2)?;
        // SAFETY: a NOP references no memory.
        unsafe {
            ring.submission()
                .push(&io_uring::opcode::Nop::new().build())
                .map_err(|_| std::io::Error::other("sq full"))?
        };
        ring.submit_and_wait(1)?;
        let res = ring.completion().next().map(|c| c.result());
        Ok(if res == Some(0) { 0 } else { 3 })
    })()
    .unwrap_or(2);
    // SAFETY: leaving the forked child without running the parent's destructors or atexit.
    unsafe { libc::_exit(code) }
}

fn reap(pid: libc::pid_t) {
    let mut status = 0;
    // SAFETY: waiting for our own child.
    let r = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(r, pid, "waitpid: {}", std::io::Error::last_os_error());
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "child {pid} failed: status {status:#x}"
    );
}

/// Forks children until `n` distinct pids have each submitted one NOP; returns how many ran.
fn run_children(n: usize) -> usize {
    let mut pids = HashSet::new();
    let mut running = VecDeque::new();
    let mut forked = 0;
    while pids.len() < n {
        // SAFETY: the child only makes syscalls, allocates (glibc's malloc is fork-safe) and
        // leaves with _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
        if pid == 0 {
            child();
        }
        forked += 1;
        pids.insert(pid);
        running.push_back(pid);
        if running.len() >= PARALLEL {
            reap(running.pop_front().unwrap());
        }
    }
    running.into_iter().for_each(reap);
    forked
}

/// Label names of a parsed series key `name{a="x",b="y"}`.
fn label_names(key: &str) -> Vec<String> {
    let Some((_, labels)) = key.split_once('{') else {
        return Vec::new();
    };
    labels
        .trim_end_matches('}')
        .split(',')
        .filter_map(|kv| kv.split_once('=').map(|(k, _)| k.to_owned()))
        .collect()
}

fn is_device_series(key: &str) -> bool {
    DEVICE_FAMILIES.iter().any(|p| key.starts_with(p))
}

/// The /debug bodies, by path.
fn debug_bodies(agent: &Agent) -> Vec<(&'static str, String)> {
    ["/debug/inflight", "/debug/slow", "/debug/stalls"]
        .into_iter()
        .map(|p| (p, agent.get(p)))
        .collect()
}

#[test]
fn ten_thousand_pids_add_no_series() {
    let _g = serial();
    let agent = Agent::start(&["--comm", CHILD_COMM]);
    let agent_pid = agent.pid();
    // One child first: the NOP series exists from here on (it depends on the opcode only).
    assert_eq!(run_children(1), 1);
    // The stall counters appear with the first in-flight scan (--stall-interval after start).
    let deadline = Instant::now() + Duration::from_secs(10);
    let before = loop {
        let m = agent.scrape();
        if m.0.keys().any(|k| k.starts_with("gds_stalls_total")) {
            break m;
        }
        assert!(Instant::now() < deadline, "no stall scan:\n{}", agent.log());
        std::thread::sleep(Duration::from_millis(50));
    };
    let nops = |m: &Metrics| m.value("gds_uring_requests_total", &[("opcode", "NOP")]);
    assert_eq!(nops(&before), 1.0, "the filter counts exactly our child");
    let rss_before = rss_kib(agent_pid);
    let debug_before = debug_bodies(&agent);

    let t0 = Instant::now();
    let forked = run_children(CHILDREN);
    let took = t0.elapsed();
    let after = agent.scrape();
    let rss_after = rss_kib(agent_pid);
    let debug_after = debug_bodies(&agent);
    eprintln!(
        "{forked} processes ({CHILDREN} distinct pids) in {:.1} s; agent RSS {rss_before} KiB \
         before, {rss_after} KiB after; {} series before, {} after",
        took.as_secs_f64(),
        before.0.len(),
        after.0.len()
    );

    assert_eq!(
        nops(&after) - nops(&before),
        forked as f64,
        "every child's NOP counted once"
    );

    for key in after.0.keys() {
        for label in label_names(key) {
            assert!(
                BOUNDED_LABELS.contains(&label.as_str()),
                "series {key} carries label {label:?}, which is not known to be bounded"
            );
        }
    }
    let keys = |m: &Metrics, device: bool| -> BTreeSet<String> {
        m.0.keys()
            .filter(|k| is_device_series(k) == device)
            .cloned()
            .collect()
    };
    let (a, b) = (keys(&after, false), keys(&before, false));
    assert!(
        a == b,
        "10,000 pids changed the non-device series: new {:?}, gone {:?}\n/debug/stalls: {}",
        a.difference(&b).collect::<Vec<_>>(),
        b.difference(&a).collect::<Vec<_>>(),
        agent.get("/debug/stalls")
    );
    let new_device: Vec<_> = keys(&after, true)
        .difference(&keys(&before, true))
        .cloned()
        .collect();
    // New device series come from host disk I/O meanwhile: they must name a real disk of
    // this host and carry only device labels.
    for key in &new_device {
        let disk = key
            .split("disk=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap_or_else(|| panic!("device series {key} has no disk label"));
        assert!(
            disk == "unknown" || std::path::Path::new("/sys/class/block").join(disk).exists(),
            "device series {key} names {disk:?}, not a disk of this host"
        );
        for label in label_names(key) {
            assert!(
                [
                    "disk", "op", "opcode", "stage", "status", "memory", "origin", "le"
                ]
                .contains(&label.as_str()),
                "device series {key} carries {label:?}"
            );
        }
    }
    if !new_device.is_empty() {
        eprintln!("device series that appeared meanwhile (host disk I/O): {new_device:?}");
    }

    for ((path, b), (_, a)) in debug_before.iter().zip(&debug_after) {
        let entries = |s: &str| {
            serde_json::from_str::<serde_json::Value>(s)
                .ok()
                .and_then(|v| v.as_array().map(Vec::len))
        };
        assert!(
            a.len() <= b.len() + 4096 && a.len() < 64 * 1024,
            "{path} grew from {} to {} bytes",
            b.len(),
            a.len()
        );
        if let Some(n) = entries(a) {
            assert!(n <= 1024, "{path} lists {n} entries");
        }
    }
    assert!(
        rss_after < rss_before + 16 * 1024,
        "agent RSS grew from {rss_before} KiB to {rss_after} KiB"
    );
    assert!(
        took < Duration::from_secs(120),
        "{CHILDREN} children took {took:?}"
    );
}
