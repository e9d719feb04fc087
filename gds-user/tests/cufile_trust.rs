//! The cuFile layer under hostile local users, end to end (real kernel, real uprobes, the
//! agent binary): a process of another user can neither push a root process's read out of
//! the kernel's tables nor move the counters the alerts read, and `--pid`/`--comm` filter
//! the cuFile layer as they filter io_uring.
//!
//! The library is the fixture stand-in (`fixtures/libcufile_standin.c`): its
//! `cuFileHandleRegister` returns at once and its `cuFileRead` is a real `pread(2)` beneath
//! the call, which is what the tracer classifies as compat (the real libcufile blocks in
//! registration without a GPU). The application is `fixtures/cufile_driver.c`, a C program
//! so it runs as `nobody` too. Each test holds `common::cufile_lock()`: they read the agent's
//! global counters. Needs root and a C compiler.

mod common;

use std::time::{Duration, Instant};

use common::{
    Agent, Driver, Metrics, StandinFixtures as Fixtures, cufile_lock, require_root, setpriv_nobody,
    within,
};
use gds_api::model::cufile::{CufileProcess, CufileReport};
use gds_common::cufile::{CUFILE_FILES_MAX, CUFILE_INFLIGHT_MAX, CUFILE_PROCESS_QUOTA};

fn report(agent: &Agent) -> CufileReport {
    serde_json::from_str(&agent.get("/debug/cufile")).expect("/debug/cufile is a CufileReport")
}

fn process(agent: &Agent, pid: u32) -> Option<CufileProcess> {
    report(agent).processes.into_iter().find(|p| p.pid == pid)
}

/// The `user` `/debug/cufile` gives process `pid` (`trusted` or `other`).
fn user_of(agent: &Agent, pid: u32) -> Option<String> {
    let r: serde_json::Value = serde_json::from_str(&agent.get("/debug/cufile")).unwrap();
    r["processes"]
        .as_array()?
        .iter()
        .find(|p| p["pid"] == pid)
        .and_then(|p| p["user"].as_str().map(str::to_owned))
}

/// Waits until the agent has attached the library `pid` maps.
fn wait_attached(agent: &Agent, pid: u32) {
    within(Duration::from_secs(5), "library attached", agent, || {
        report(agent)
            .libraries
            .iter()
            .any(|l| l.pids.contains(&pid))
    });
}

fn delta(before: &Metrics, now: &Metrics, name: &str, labels: &[(&str, &str)]) -> f64 {
    now.value(name, labels) - before.value(name, labels)
}

fn dropped(m: &Metrics, reason: &str) -> f64 {
    m.value("gds_trace_dropped_total", &[("reason", reason)])
}

/// The must-show: a process of `nobody` registers more handles, on more descriptors, than the
/// kernel's tables hold (on the old code this filled both: 9,000 made a root read
/// `path="unknown"`); a root process's read afterwards still gets its file row, its handle and
/// its path, and the flood is counted as the unprivileged process's quota, not as a full table.
#[test]
fn an_unprivileged_flood_cannot_push_a_root_read_out_of_its_table() {
    require_root();
    let _lock = cufile_lock();
    let fx = Fixtures::build();
    let agent = Agent::start(&[]);
    let driver = fx.path("cufile-driver");

    let mut hostile = Driver::spawn(&fx, &setpriv_nobody(""), &driver);
    let hpid = hostile.load();
    wait_attached(&agent, hpid);
    let before = agent.scrape();
    let n = u64::from(CUFILE_INFLIGHT_MAX.max(CUFILE_FILES_MAX)) + 4096;
    let t = Instant::now();
    assert_eq!(
        hostile.cmd(&format!("flood {n} 100000")),
        format!("flooded {n} {n}")
    );
    eprintln!("{n} registrations as nobody in {:?}", t.elapsed());

    let mut root = Driver::spawn(&fx, &[], &driver);
    let rpid = root.load();
    wait_attached(&agent, rpid);
    let data = fx.path("data");
    let fd: i32 = root
        .cmd(&format!("open {}", data.display()))
        .strip_prefix("opened ")
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(root.cmd("read 3 4096"), "read 3 4096");

    let compat_file = |p: &CufileProcess| {
        p.files
            .iter()
            .find(|f| f.fd == fd)
            .and_then(|f| f.counters.path_calls.get("compat").copied())
    };
    within(
        Duration::from_secs(2),
        "the root process's read on its file row, path compat",
        &agent,
        || process(&agent, rpid).is_some_and(|p| compat_file(&p) == Some(3)),
    );
    let root_row = process(&agent, rpid).unwrap();
    assert_eq!(root_row.counters.read_calls, 3, "{root_row:?}");
    assert_eq!(root_row.counters.read_bytes, 3 * 4096, "{root_row:?}");
    assert_eq!(user_of(&agent, rpid).as_deref(), Some("trusted"));

    let now = agent.scrape();
    assert_eq!(
        delta(
            &before,
            &now,
            "gds_cufile_bytes_total",
            &[("op", "read"), ("path", "compat"), ("user", "trusted")]
        ),
        3.0 * 4096.0
    );
    assert_eq!(
        delta(
            &before,
            &now,
            "gds_cufile_bytes_total",
            &[("op", "read"), ("path", "unknown"), ("user", "trusted")]
        ),
        0.0
    );
    for full in ["cufile_file_table_full", "cufile_handle_table_full"] {
        assert_eq!(dropped(&now, full) - dropped(&before, full), 0.0, "{full}");
    }
    // Refused past the quota: rows and handles, one refusal each per registration.
    let refused = dropped(&now, "cufile_process_quota") - dropped(&before, "cufile_process_quota");
    assert!(
        refused >= 2.0 * (n - CUFILE_PROCESS_QUOTA) as f64,
        "{refused} refusals for {n} registrations"
    );
    // The flooding process is still counted, in the untrusted share.
    let h = process(&agent, hpid).expect("the flooding process on /debug/cufile");
    assert_eq!(h.counters.handle_registers, n, "{h:?}");
    assert_eq!(user_of(&agent, hpid).as_deref(), Some("other"));
    assert_eq!(
        delta(
            &before,
            &now,
            "gds_cufile_calls_total",
            &[("op", "handle_register"), ("user", "other")]
        ),
        n as f64
    );
    assert_eq!(
        delta(
            &before,
            &now,
            "gds_cufile_calls_total",
            &[("op", "handle_register"), ("user", "trusted")]
        ),
        1.0,
        "the root process's one registration"
    );
    hostile.exit();
    root.exit();
    let (status, log) = agent.stop();
    assert!(status.success(), "{log}");
}

/// A fake libcufile run as `nobody` (the stand-in: any user can build one in ten lines) reads
/// through its "compat path" and fails calls: the trusted series the alerts read
/// (`GdsCufileCompatFallback`, `GdsCufileErrors`) do not move; the `user="other"` ones do.
#[test]
fn a_fake_libcufile_run_as_nobody_does_not_move_the_trusted_counters() {
    require_root();
    let _lock = cufile_lock();
    let fx = Fixtures::build();
    let agent = Agent::start(&[]);
    let mut fake = Driver::spawn(&fx, &setpriv_nobody(""), &fx.path("cufile-driver"));
    let pid = fake.load();
    wait_attached(&agent, pid);
    let before = agent.scrape();
    fake.cmd(&format!("open {}", fx.path("data").display()));
    assert_eq!(fake.cmd("read 50 65536"), "read 50 65536");
    assert_eq!(fake.cmd("badread 7"), "badread 7 -1");
    let other = |m: &Metrics| {
        m.value(
            "gds_cufile_calls_total",
            &[("op", "read"), ("user", "other")],
        ) - before.value(
            "gds_cufile_calls_total",
            &[("op", "read"), ("user", "other")],
        )
    };
    let mut now = agent.scrape();
    within(Duration::from_secs(2), "the fake's calls", &agent, || {
        now = agent.scrape();
        other(&now) == 57.0
    });
    let series = |name: &str, labels: &[(&str, &str)], user: &str| {
        let mut l = labels.to_vec();
        l.push(("user", user));
        delta(&before, &now, name, &l)
    };
    let compat = [("op", "read"), ("path", "compat")];
    let errno = [("op", "read"), ("error", "errno")];
    assert_eq!(
        series("gds_cufile_bytes_total", &compat, "other"),
        50.0 * 65536.0
    );
    assert_eq!(series("gds_cufile_errors_total", &errno, "other"), 7.0);
    assert_eq!(series("gds_cufile_bytes_total", &compat, "trusted"), 0.0);
    assert_eq!(series("gds_cufile_errors_total", &errno, "trusted"), 0.0);
    assert_eq!(
        series("gds_cufile_calls_total", &[("op", "read")], "trusted"),
        0.0
    );
    fake.exit();
    let (status, log) = agent.stop();
    assert!(status.success(), "{log}");
}

/// With `--cufile-users nobody`, the same process counts as trusted.
#[test]
fn cufile_users_makes_a_user_trusted() {
    require_root();
    let _lock = cufile_lock();
    let fx = Fixtures::build();
    let agent = Agent::start(&["--cufile-users", "nobody"]);
    let mut app = Driver::spawn(&fx, &setpriv_nobody(""), &fx.path("cufile-driver"));
    let pid = app.load();
    wait_attached(&agent, pid);
    let before = agent.scrape();
    app.cmd(&format!("open {}", fx.path("data").display()));
    app.cmd("read 4 4096");
    let trusted = [("op", "read"), ("path", "compat"), ("user", "trusted")];
    within(
        Duration::from_secs(2),
        "nobody's reads, trusted",
        &agent,
        || delta(&before, &agent.scrape(), "gds_cufile_bytes_total", &trusted) == 4.0 * 4096.0,
    );
    app.exit();
    let (status, log) = agent.stop();
    assert!(status.success(), "{log}");
}

/// Two processes map the same library file (so its uprobes serve both, whatever user space
/// attaches): with `--pid` only the chosen one's calls are counted, and with `--comm` only
/// the one with that command name.
#[test]
fn pid_and_comm_filter_the_cufile_layer() {
    require_root();
    let _lock = cufile_lock();
    let fx = Fixtures::build();
    let data = fx.path("data");
    // Every user's reads (root's here; summed so the count does not depend on the label set).
    let calls = |m: &Metrics| -> f64 {
        m.0.iter()
            .filter(|(k, _)| k.starts_with("gds_cufile_calls_total{") && k.contains("op=\"read\""))
            .map(|(_, v)| v)
            .sum()
    };
    let keep_bin = fx.driver_named("gds-cf-keep");
    let drop_bin = fx.driver_named("gds-cf-drop");
    for filter in ["--pid", "--comm"] {
        let mut keep = Driver::spawn(&fx, &[], &keep_bin);
        let value = match filter {
            "--pid" => keep.0.child.id().to_string(),
            _ => "gds-cf-keep".to_owned(),
        };
        let agent = Agent::start(&[filter, &value]);
        let kpid = keep.load();
        let mut other = Driver::spawn(&fx, &[], &drop_bin);
        let opid = other.load();
        wait_attached(&agent, kpid);
        let before = calls(&agent.scrape());
        for d in [&mut other, &mut keep] {
            d.cmd(&format!("open {}", data.display()));
            assert_eq!(d.cmd("read 2 4096"), "read 2 4096");
        }
        within(
            Duration::from_secs(2),
            "the kept process's reads",
            &agent,
            || process(&agent, kpid).is_some_and(|p| p.counters.read_calls == 2),
        );
        // The other process's calls ran before the kept one's: had they counted, they would
        // be in by now.
        assert_eq!(calls(&agent.scrape()) - before, 2.0, "{filter} {value}");
        assert!(
            process(&agent, opid).is_none(),
            "{filter} {value}: pid {opid} ({}) is on /debug/cufile",
            drop_bin.display()
        );
        keep.exit();
        other.exit();
        let (status, log) = agent.stop();
        assert!(status.success(), "{log}");
    }
}
