//! cuFile seen from outside: the real libcufile from PyPI (`nvidia-cufile`, installed by
//! `cargo xtask setup` under `target/pypi`), loaded with dlopen by a Python process after the
//! agent started, is found and every call is counted exactly, per operation and per error,
//! within 2 s; a copy visible only inside a private mount namespace is found too; a library
//! file replaced on disk under a running agent is followed (the old inode detached when its
//! last process exits, the new one attached, a process still mapping the deleted one traced).
//!
//! Only calls that return at once without a GPU are made (null handles: -1; driver calls:
//! CUfileOpError codes). One test, so its processes are the only cuFile users the agent's
//! global counters see. Needs root.

mod common;

use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use common::{Agent, LineChild, Metrics, require_libcufile, require_root, unshare_private, within};
use gds_api::model::{cufile::CufileReport, labels};

/// The Python cuFile application (`fixtures/cufile_caller.py`), driven line by line.
struct App(LineChild);

impl App {
    /// `python3 cufile_caller.py`, after `wrapper` (which must exec it).
    fn spawn(wrapper: &[String]) -> App {
        App(LineChild::cufile_caller("python3", wrapper))
    }

    /// dlopen; returns the process id.
    fn load(&mut self, lib: &Path) -> u32 {
        self.0.cmd_pid(&format!("load {}", lib.display()))
    }

    /// Calls `name` `n` times; returns the last result.
    fn call(&mut self, name: &str, n: u32) -> i64 {
        let a = self.0.cmd(&format!("call {name} {n}"));
        a.rsplit(' ').next().unwrap().parse().unwrap()
    }

    fn cmd(&mut self, line: &str) -> String {
        self.0.cmd(line)
    }

    fn exit(self) {
        self.0.exit()
    }
}

fn report(agent: &Agent) -> CufileReport {
    serde_json::from_str(&agent.get("/debug/cufile")).expect("/debug/cufile is a CufileReport")
}

/// The inode of the library file `pid` maps.
fn attached(agent: &Agent, pid: u32) -> Option<u64> {
    report(agent)
        .libraries
        .iter()
        .find(|l| l.pids.contains(&pid))
        .map(|l| l.inode)
}

/// `name{labels}` now minus before; the families split by user get `user="trusted"` (this
/// test's processes run as root).
fn delta(before: &Metrics, now: &Metrics, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut labels = labels.to_vec();
    let by_user = gds_api::families::ALL
        .iter()
        .any(|f| f.name == name && f.labels.contains(&"user"));
    if by_user {
        labels.push(("user", "trusted"));
    }
    now.value(name, &labels) - before.value(name, &labels)
}

/// The `error` label a result the application saw must have (read/write: -1 is errno).
fn error_name(op: u32, result: i64) -> &'static str {
    let code = if result < 0 {
        (-result) as i32
    } else {
        result as u32 as i32
    };
    labels::cufile_error(op, code)
}

#[test]
fn cufile_calls_counted_exactly_wherever_the_library_is() {
    require_root();
    let Some(lib) = require_libcufile() else {
        return;
    };
    // Other tests' cuFile calls would be in this agent's global counters.
    let _lock = common::cufile_lock();
    let agent = Agent::start(&[]);

    // 1. dlopen after the agent started; every call counted exactly.
    let mut app = App::spawn(&[]);
    let pid = app.load(&lib);
    let took = within(Duration::from_secs(2), "library attached", &agent, || {
        attached(&agent, pid).is_some()
    });
    eprintln!("attached {took:?} after dlopen");
    let before = agent.scrape();
    use gds_common::cufile::*;
    let plan: [(&str, u32, u32, &str); 9] = [
        ("cuFileRead", 3, CUFILE_OP_READ, "read"),
        ("cuFileWrite", 5, CUFILE_OP_WRITE, "write"),
        (
            "cuFileDriverClose_v2",
            2,
            CUFILE_OP_DRIVER_CLOSE,
            "driver_close",
        ),
        // Jumps to cuFileDriverClose_v2: one call, not two (the inner one is `nested`).
        (
            "cuFileDriverClose",
            1,
            CUFILE_OP_DRIVER_CLOSE,
            "driver_close",
        ),
        (
            "cuFileBatchIOSubmit",
            2,
            CUFILE_OP_BATCH_SUBMIT,
            "batch_submit",
        ),
        (
            "cuFileBatchIOGetStatus",
            1,
            CUFILE_OP_BATCH_GET_STATUS,
            "batch_get_status",
        ),
        (
            "cuFileBatchIOCancel",
            1,
            CUFILE_OP_BATCH_CANCEL,
            "batch_cancel",
        ),
        (
            "cuFileBufDeregister",
            2,
            CUFILE_OP_BUF_DEREGISTER,
            "buf_deregister",
        ),
        (
            "cuFileHandleDeregister",
            4,
            CUFILE_OP_HANDLE_DEREGISTER,
            "handle_deregister",
        ),
    ];
    let mut expected_calls = std::collections::BTreeMap::<&str, f64>::new();
    let mut expected_errors = std::collections::BTreeMap::<(&str, &str), f64>::new();
    let t_calls = Instant::now();
    for (name, n, op, label) in plan {
        let r = app.call(name, n);
        *expected_calls.entry(label).or_default() += f64::from(n);
        if op != CUFILE_OP_HANDLE_DEREGISTER && r != 0 {
            *expected_errors
                .entry((label, error_name(op, r)))
                .or_default() += f64::from(n);
        }
    }
    assert_eq!(
        expected_errors.get(&("driver_close", "CU_FILE_DRIVER_NOT_INITIALIZED")),
        Some(&3.0),
        "cuFileDriverClose without a driver returns 5001: {expected_errors:?}"
    );
    assert_eq!(expected_errors.get(&("read", "errno")), Some(&3.0));
    app.cmd("pread 7");
    let count_ok = |m: &Metrics| {
        expected_calls
            .iter()
            .all(|(op, n)| delta(&before, m, "gds_cufile_calls_total", &[("op", op)]) == *n)
    };
    let mut now = agent.scrape();
    within(Duration::from_secs(2), "calls counted", &agent, || {
        now = agent.scrape();
        count_ok(&now)
    });
    eprintln!("counted within {:?} of the first call", t_calls.elapsed());
    for ((op, error), n) in &expected_errors {
        assert_eq!(
            delta(
                &before,
                &now,
                "gds_cufile_errors_total",
                &[("op", op), ("error", error)]
            ),
            *n,
            "errors {op}/{error}"
        );
    }
    assert_eq!(
        delta(
            &before,
            &now,
            "gds_cufile_requested_bytes_total",
            &[("op", "read")]
        ),
        3.0 * 4096.0
    );
    assert_eq!(
        delta(
            &before,
            &now,
            "gds_cufile_requested_bytes_total",
            &[("op", "write")]
        ),
        5.0 * 4096.0
    );
    assert_eq!(
        delta(
            &before,
            &now,
            "gds_cufile_beneath_calls_total",
            &[("link", "unlinked")]
        ),
        7.0,
        "7 preads from 3 threads of a cuFile process, no cuFile call on their file"
    );
    assert_eq!(
        delta(
            &before,
            &now,
            "gds_cufile_beneath_calls_total",
            &[("link", "nested")]
        ),
        1.0
    );
    for (k, v) in &now.0 {
        if k.starts_with("gds_trace_dropped_total{reason=\"cufile") {
            assert_eq!(*v, 0.0, "{k}");
        }
    }
    eprintln!("checked at {:?}", t_calls.elapsed());
    let r = report(&agent);
    let p = r
        .processes
        .iter()
        .find(|p| p.pid == pid)
        .expect("the process on /debug/cufile");
    assert_eq!(p.counters.calls, 21, "{p:?}");
    assert_eq!(p.counters.read_calls, 3);
    assert_eq!(p.counters.write_calls, 5);
    assert_eq!(
        p.counters.outside_ios, 7,
        "the 7 preads, on the process: {p:?}"
    );
    assert_eq!(p.counters.outside_bytes, 7 * 64);
    assert!(
        p.outside_cufile
            .as_deref()
            .is_some_and(|w| w.starts_with("7 read(s)/write(s), 448 bytes asked")),
        "{p:?}"
    );
    assert_eq!(p.comm, "python3");
    assert!(now.value("gds_cufile_libraries", &[]) >= 1.0);
    app.exit();

    // 2. A copy only a private mount namespace sees.
    let private = tempfile::tempdir().unwrap();
    let dir = private.path().display().to_string();
    let setup = format!(
        "mount -t tmpfs gds-private {dir} && cp {} {dir}/libcufile.so.0",
        lib.display()
    );
    let mut hidden = App::spawn(&unshare_private(&setup));
    let hidden_lib = private.path().join("libcufile.so.0");
    let hpid = hidden.load(&hidden_lib);
    assert!(
        !hidden_lib.exists(),
        "the copy must be invisible outside the namespace"
    );
    within(
        Duration::from_secs(2),
        "private copy attached",
        &agent,
        || attached(&agent, hpid).is_some(),
    );
    let before = agent.scrape();
    hidden.call("cuFileRead", 4);
    within(
        Duration::from_secs(2),
        "private copy's calls",
        &agent,
        || {
            delta(
                &before,
                &agent.scrape(),
                "gds_cufile_calls_total",
                &[("op", "read")],
            ) == 4.0
        },
    );
    hidden.exit();

    // 3. The file replaced on disk under a running agent.
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("libcufile.so.0");
    let install = |p: &Path| {
        let tmp = d.path().join("libcufile.so.0.new");
        std::fs::copy(&lib, &tmp).unwrap();
        std::fs::rename(&tmp, p).unwrap();
        std::fs::metadata(p)
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .unwrap()
    };
    let ino1 = install(&path);
    let mut a = App::spawn(&[]);
    let apid = a.load(&path);
    within(
        Duration::from_secs(2),
        "first file attached",
        &agent,
        || attached(&agent, apid) == Some(ino1),
    );
    a.exit();
    // Kept attached for LINGER after its last process (a restarting job reuses the probes).
    let linger = gds_trace::CUFILE_LINGER;
    within(
        linger + Duration::from_secs(2),
        "first file detached after its last process",
        &agent,
        // The log line follows the removal the report shows: wait for both.
        || {
            !report(&agent).libraries.iter().any(|l| l.inode == ino1)
                && agent.log().contains("no process has mapped it for")
        },
    );
    let ino2 = install(&path);
    assert_ne!(ino1, ino2);
    let mut b = App::spawn(&[]);
    let bpid = b.load(&path);
    within(
        Duration::from_secs(2),
        "replacement attached",
        &agent,
        || attached(&agent, bpid) == Some(ino2),
    );
    // Replace again while b runs: b keeps the deleted inode, c loads the new one.
    let ino3 = install(&path);
    let mut c = App::spawn(&[]);
    let cpid = c.load(&path);
    within(
        Duration::from_secs(2),
        "second replacement attached",
        &agent,
        || attached(&agent, cpid) == Some(ino3),
    );
    let before = agent.scrape();
    b.call("cuFileWrite", 2);
    c.call("cuFileWrite", 3);
    within(Duration::from_secs(2), "both copies' calls", &agent, || {
        delta(
            &before,
            &agent.scrape(),
            "gds_cufile_calls_total",
            &[("op", "write")],
        ) == 5.0
    });
    // The periodic scan (every 500 ms) notices the file b maps is gone from the directory.
    within(
        Duration::from_secs(2),
        "b's copy listed as deleted",
        &agent,
        || {
            report(&agent)
                .libraries
                .iter()
                .any(|l| l.inode == ino2 && l.deleted && l.pids.contains(&bpid))
        },
    );
    b.exit();
    c.exit();
    // Closing a uprobe costs ~90 ms of kernel time here (event_mutex and an RCU grace period
    // per probe, serialized): let the lingering copies detach before SIGTERM, so the clean
    // shutdown checked here is not a race against 100+ probes closing.
    within(
        Duration::from_secs(30),
        "every copy detached",
        &agent,
        || report(&agent).libraries.is_empty(),
    );
    let (status, log) = agent.stop();
    assert!(status.success(), "{log}");
}

/// `probe --canary` on a host without a GPU (CI) fails with the reason, before any cuFile call;
/// its real run is on the GPU machine (the README's cuFile section).
#[test]
fn canary_without_a_gpu_says_why() {
    require_root();
    if Path::new("/dev/nvidiactl").exists() {
        eprintln!("SKIPPED: this host has a GPU (the canary's real run is a GPU-host check)");
        return;
    }
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), vec![7u8; 1 << 20]).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_gds-agent"))
        .args(["probe", "--canary"])
        .arg(f.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("opening GPU 0: no usable GPU"), "{err}");
}
