//! Privileges: the real agent runs with only CAP_BPF + CAP_PERFMON as an unprivileged user,
//! drops every capability on every thread once its programs are attached (and still traces),
//! and says which capabilities it lacks when it has none.
//!
//! The agent is started through `setpriv` (util-linux) so the test harness itself stays root.

mod common;

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use common::{
    Agent, NOBODY, PipeRead, counted_nops, free_port, http_get, serial, setpriv_nobody,
    unshare_private,
};
use gds_user::privileges::{CAP_BPF, CAP_PERFMON, ThreadCaps};

/// The agent binary where uid 65534 can execute it: in place when every directory above it
/// is traversable by others, else a 0755 copy in `dir` (itself made 0755).
fn agent_binary_for_nobody(dir: &Path) -> PathBuf {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_gds-agent"));
    let others_can = |p: &Path, bits: u32| {
        std::fs::metadata(p)
            .map(|m| m.permissions().mode() & bits == bits)
            .unwrap_or(false)
    };
    let reachable = bin.ancestors().skip(1).all(|d| others_can(d, 0o001));
    if reachable && others_can(&bin, 0o005) {
        return bin;
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let copy = dir.join("gds-agent");
    std::fs::copy(&bin, &copy).unwrap();
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
    copy
}

/// The agent started through `wrapper` (setpriv, unshare: it execs the agent), with the binary
/// where the wrapper's user can execute it; not yet serving.
fn wrapped(wrapper: &[String], agent_args: &[&str]) -> Agent {
    let dir = tempfile::tempdir().unwrap();
    let bin = agent_binary_for_nobody(dir.path());
    Agent::spawn(dir, wrapper, &bin, agent_args)
}

/// Every thread's capability sets, by tid, with the thread's name.
fn thread_caps(pid: u32) -> Vec<(String, String, ThreadCaps)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if let Some(caps) = ThreadCaps::parse_status(&status) {
            out.push((
                t.file_name().to_string_lossy().into_owned(),
                comm.trim_end().to_owned(),
                caps,
            ));
        }
    }
    assert!(!out.is_empty(), "no threads of {pid}");
    out
}

fn status_field(pid: u32, key: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_owned()))
        .unwrap_or_else(|| panic!("{key} missing from /proc/{pid}/status"))
}

/// Asserts every thread of the agent holds nothing (effective, permitted, inheritable,
/// ambient) and has exactly `bounding` as its bounding set, but the cuFile thread
/// (`gds-cufile`), which holds at most `CUFILE_KEEP` (what attaching uprobes needs).
fn assert_dropped(pid: u32, bounding: u64) {
    let keep = gds_user::privileges::CUFILE_KEEP.0;
    let threads = thread_caps(pid);
    assert_eq!(
        threads
            .iter()
            .filter(|(_, comm, _)| comm == "gds-cufile")
            .count(),
        1,
        "one cuFile thread: {threads:?}"
    );
    for (tid, comm, c) in threads {
        if comm == "gds-cufile" {
            assert_eq!(
                c.effective.0 & !keep,
                0,
                "cuFile thread {tid} CapEff: {c:?}"
            );
            assert_eq!(
                c.permitted.0 & !keep,
                0,
                "cuFile thread {tid} CapPrm: {c:?}"
            );
            assert_eq!(c.inheritable.0, 0, "cuFile thread {tid} CapInh: {c:?}");
            assert_eq!(c.ambient.0, 0, "cuFile thread {tid} CapAmb: {c:?}");
            // It drops its bounding set to what it keeps where it may (root), else leaves it.
            if bounding == 0 {
                assert_eq!(c.bounding.0 & !keep, 0, "cuFile thread {tid} CapBnd: {c:?}");
            } else {
                assert_eq!(c.bounding.0, bounding, "cuFile thread {tid} CapBnd: {c:?}");
            }
            continue;
        }
        assert_eq!(c.effective.0, 0, "thread {tid} CapEff: {c:?}");
        assert_eq!(c.permitted.0, 0, "thread {tid} CapPrm: {c:?}");
        assert_eq!(c.inheritable.0, 0, "thread {tid} CapInh: {c:?}");
        assert_eq!(c.ambient.0, 0, "thread {tid} CapAmb: {c:?}");
        assert_eq!(c.bounding.0, bounding, "thread {tid} CapBnd: {c:?}");
    }
    assert_eq!(status_field(pid, "NoNewPrivs:"), "1");
}

/// After the drop the agent still reads its maps (counts), its mmapped slot table and hash
/// (an in-flight request with this process's comm), and serves /debug.
fn assert_still_traces(agent: &Agent) {
    assert_eq!(
        counted_nops(agent, 37),
        37.0,
        "NOPs after the drop:\n{}",
        agent.log()
    );

    let mut read = PipeRead::submit(0x5eed);
    let inflight = http_get(agent.addr, "/debug/inflight").unwrap();
    let list: serde_json::Value = serde_json::from_str(&inflight).unwrap();
    let me = std::process::id();
    let mine = list
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["pid"] == me && r["user_data"] == 0x5eed)
        .unwrap_or_else(|| panic!("our pipe read is not in /debug/inflight: {inflight}"));
    let comm = std::fs::read_to_string("/proc/self/comm").unwrap();
    assert_eq!(mine["comm"], comm.trim_end(), "{mine}");
    assert_eq!(read.complete(b"x"), (0x5eed, 1));
    let m = agent.scrape();
    assert_eq!(
        m.value("gds_uring_requests_total", &[("opcode", "READ")]),
        1.0
    );
}

#[test]
fn root_agent_drops_every_capability_and_keeps_tracing() {
    let _g = serial();
    // setpriv with no options: a plain exec, as root with every capability.
    let mut agent = wrapped(
        &["setpriv".into()],
        &["--pid", &std::process::id().to_string()],
    );
    agent.wait_serving();
    assert_eq!(status_field(agent.pid(), "Uid:"), "0\t0\t0\t0");
    assert_dropped(agent.pid(), 0);
    assert_still_traces(&agent);
    let log = agent.log();
    assert!(
        log.contains("kept: none") && log.contains("bounding set now none"),
        "the drop is logged:\n{log}"
    );
}

#[test]
fn nobody_with_cap_bpf_and_cap_perfmon_runs_and_drops_them() {
    let _g = serial();
    let mut agent = wrapped(
        &setpriv_nobody("+bpf,+perfmon"),
        &["--pid", &std::process::id().to_string()],
    );
    agent.wait_serving();
    assert_eq!(
        status_field(agent.pid(), "Uid:"),
        format!("{NOBODY}\t{NOBODY}\t{NOBODY}\t{NOBODY}")
    );
    // Without CAP_SETPCAP the bounding set cannot shrink: it stays what setpriv left.
    assert_dropped(agent.pid(), 1 << CAP_BPF | 1 << CAP_PERFMON);
    assert_still_traces(&agent);
    let log = agent.log();
    assert!(
        log.contains("mode=Btf") && log.contains("(cap_perfmon,cap_bpf); kept: none"),
        "{log}"
    );
}

#[test]
fn nobody_without_capabilities_is_told_which_are_missing() {
    let _g = serial();
    for (caps, says) in [
        ("", "CAP_BPF and CAP_PERFMON are missing"),
        ("+bpf", "CAP_PERFMON is missing (CAP_BPF is there)"),
        ("+perfmon", "CAP_BPF is missing (CAP_PERFMON is there)"),
    ] {
        let (status, log) = wrapped(&setpriv_nobody(caps), &[]).wait_exit();
        assert!(!status.success(), "caps {caps:?}: {status}\n{log}");
        assert!(
            log.contains("not permitted to load eBPF programs") && log.contains(says),
            "caps {caps:?}: the error names the missing capability ({says}):\n{log}"
        );
        assert!(!log.contains("panicked"), "{log}");
    }
}

#[test]
fn nobody_classic_attach_says_tracefs_is_unreadable() {
    let _g = serial();
    // In a private mount namespace with tracefs mounted (hosts that boot without it included),
    // so the failure is about reading it; the root namespace is not touched.
    let mut wrapper = unshare_private(
        "mountpoint -q /sys/kernel/tracing || mount -t tracefs nodev /sys/kernel/tracing",
    );
    wrapper.extend(setpriv_nobody("+bpf,+perfmon"));
    let (status, log) = wrapped(&wrapper, &["--attach", "classic"]).wait_exit();
    assert!(!status.success(), "{status}\n{log}");
    assert!(
        log.contains("is not readable by this user")
            && log.contains("CAP_DAC_READ_SEARCH")
            && log.contains("--attach btf"),
        "{log}"
    );
}

/// The endpoints are loopback-only unless asked otherwise: the binary's default address is
/// 127.0.0.1:9477, and binding every interface works but says, in the log, that /metrics and
/// /debug are now reachable from the network.
#[test]
fn loopback_by_default_and_a_warning_for_all_interfaces() {
    let _g = serial();
    let help = Command::new(env!("CARGO_BIN_EXE_gds-agent"))
        .args(["run", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("[default: 127.0.0.1:9477]"), "{help}");

    let port = free_port();
    let agent = Agent::start_reaching(
        format!("127.0.0.1:{port}").parse().unwrap(),
        &[
            "--listen",
            &format!("0.0.0.0:{port}"),
            "--pid",
            &std::process::id().to_string(),
        ],
    );
    let (_, log) = agent.stop();
    assert!(
        log.contains("WARN") && log.contains("listening on all interfaces"),
        "{log}"
    );
}
