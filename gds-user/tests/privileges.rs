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
    Agent, LineChild, NOBODY, PipeRead, counted_nops, free_port, http_get, require_libcufile,
    serial, setpriv_nobody, unshare_private,
};
use gds_host::privileges::{
    CAP_BPF, CAP_PERFMON, CapSet, CufileAccess, ThreadCaps, unit_capabilities,
};

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
/// (`gds-cufile`, there only if `cufile_on`), which holds at most `CUFILE_KEEP` (what
/// attaching uprobes needs), and the stall-evidence thread (`gds-evidence`, always one),
/// which holds at most `EVIDENCE_KEEP` (other threads' wchan, system call, kernel stack).
fn assert_dropped(pid: u32, bounding: u64, cufile_on: bool) {
    let threads = thread_caps(pid);
    let count = |name: &str| threads.iter().filter(|(_, comm, _)| comm == name).count();
    assert_eq!(
        count("gds-cufile"),
        usize::from(cufile_on),
        "one cuFile thread where the layer is on, none where it is off: {threads:?}"
    );
    assert_eq!(count("gds-evidence"), 1, "one evidence thread: {threads:?}");
    for (tid, comm, c) in threads {
        let keep = match comm.as_str() {
            "gds-cufile" => gds_host::privileges::CUFILE_KEEP.0,
            "gds-evidence" => gds_host::privileges::EVIDENCE_KEEP.0,
            _ => 0,
        };
        if keep != 0 {
            assert_eq!(
                c.effective.0 & !keep,
                0,
                "{comm} thread {tid} CapEff: {c:?}"
            );
            assert_eq!(
                c.permitted.0 & !keep,
                0,
                "{comm} thread {tid} CapPrm: {c:?}"
            );
            assert_eq!(c.inheritable.0, 0, "{comm} thread {tid} CapInh: {c:?}");
            assert_eq!(c.ambient.0, 0, "{comm} thread {tid} CapAmb: {c:?}");
            // It drops its bounding set to what it keeps where it may (root), else leaves it.
            if bounding == 0 {
                assert_eq!(c.bounding.0 & !keep, 0, "{comm} thread {tid} CapBnd: {c:?}");
            } else {
                assert_eq!(c.bounding.0, bounding, "{comm} thread {tid} CapBnd: {c:?}");
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
    assert_dropped(agent.pid(), 0, true);
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
    // Without CAP_SETPCAP the bounding set cannot shrink: it stays what setpriv left. The
    // cuFile layer is off (it needs CAP_SYS_ADMIN and more), so no thread keeps anything.
    assert_dropped(agent.pid(), 1 << CAP_BPF | 1 << CAP_PERFMON, false);
    assert_still_traces(&agent);
    let log = agent.log();
    assert!(
        log.contains("mode=Btf")
            && log.contains("(cap_perfmon,cap_bpf); kept: none")
            && log.contains("cuFile tracing off: the agent lacks cap_sys_admin"),
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

/// `setpriv` (util-linux) arguments that stay uid 0 and hold exactly `caps` (inheritable,
/// ambient and bounding, as systemd's `AmbientCapabilities=` + `CapabilityBoundingSet=` with
/// `User=root` leave a service), with no_new_privs (`NoNewPrivileges=yes`).
fn setpriv_root(caps: CapSet) -> Vec<String> {
    let list: String = std::iter::once("-all".to_owned())
        .chain(
            caps.to_string()
                .split(',')
                .filter(|c| *c != "none")
                .map(|c| format!("+{}", c.trim_start_matches("cap_"))),
        )
        .collect::<Vec<_>>()
        .join(",");
    vec![
        "setpriv".into(),
        "--no-new-privs".into(),
        format!("--inh-caps={list}"),
        format!("--ambient-caps={list}"),
        format!("--bounding-set={list}"),
    ]
}

fn repo_file(path: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The capabilities the shipped systemd unit gives the agent, read from the unit file.
fn shipped_unit_caps() -> CapSet {
    unit_capabilities(&repo_file("deploy/systemd/gds-agent.service")).expect("the unit parses")
}

/// The real libcufile from PyPI (see tests/cufile.rs).
/// Calls process `pid` made that /debug/cufile counts (None: not listed).
fn cufile_calls_of(agent: &Agent, pid: u32) -> Option<u64> {
    let r: serde_json::Value = serde_json::from_str(&agent.get("/debug/cufile")).unwrap();
    r["processes"]
        .as_array()?
        .iter()
        .find(|p| p["pid"] == pid)
        .and_then(|p| p["counters"]["calls"].as_u64())
}

/// Whether /debug/cufile lists a libcufile attached for process `pid`.
fn library_attached_for(agent: &Agent, pid: u32) -> bool {
    let r: serde_json::Value = serde_json::from_str(&agent.get("/debug/cufile")).unwrap();
    r["libraries"].as_array().is_some_and(|libs| {
        libs.iter().any(|l| {
            l["pids"]
                .as_array()
                .is_some_and(|p| p.iter().any(|p| *p == pid))
        })
    })
}

/// Waits up to 10 s for `ok`, panicking with what the agent said.
fn within_10s(what: &str, agent: &Agent, mut ok: impl FnMut() -> bool) {
    let t = std::time::Instant::now();
    while !ok() {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(10),
            "{what}: not within 10 s\n/debug/cufile: {}\n/debug/layers: {}\nagent log:\n{}",
            agent.get("/debug/cufile"),
            agent.get("/debug/layers"),
            agent.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The cuFile entry of `/debug/layers` (a list, one entry per layer).
fn cufile_layer(agent: &Agent) -> serde_json::Value {
    let layers: serde_json::Value = serde_json::from_str(&agent.get("/debug/layers")).unwrap();
    layers["layers"]
        .as_array()
        .and_then(|l| l.iter().find(|e| e["layer"] == "cufile"))
        .cloned()
        .unwrap_or_else(|| panic!("/debug/layers has no cufile entry: {layers}"))
}

/// Issue 21, item 3: started with exactly the capabilities of the shipped unit (parsed from
/// deploy/systemd/gds-agent.service), the agent either counts the cuFile calls of a root
/// process and of an unprivileged one, or says in a WARN and on /debug/layers which capability
/// it lacks. The shipped unit grants what the layer needs, so today it must count.
#[test]
fn shipped_unit_capabilities_count_cufile_calls_or_say_what_is_missing() {
    let _g = serial();
    let Some(lib) = require_libcufile() else {
        return;
    };
    let caps = shipped_unit_caps();
    let access = CufileAccess::of(caps);
    eprintln!("the unit grants {caps}: {access}");
    let mut agent = wrapped(&setpriv_root(caps), &[]);
    agent.wait_serving();
    let layer = cufile_layer(&agent);
    if !access.works() {
        let log = agent.log();
        for need in access.missing.iter().filter(|n| n.blocks) {
            let cap = CapSet(0).with(need.any_of[0]).to_string();
            assert!(
                log.contains("WARN") && log.contains("cuFile tracing off") && log.contains(&cap),
                "the WARN names {cap}:\n{log}"
            );
            assert!(
                layer["on"] == false && layer["why"].as_str().unwrap().contains(&cap),
                "/debug/layers names {cap}: {layer}"
            );
        }
        return;
    }
    assert_eq!(layer["on"], true, "{layer}");
    assert!(
        !agent.log().contains("cuFile tracing off"),
        "{}",
        agent.log()
    );
    // Every thread holds nothing but the cuFile thread; the bounding set stays the unit's
    // (it has no CAP_SETPCAP to drop it).
    assert_dropped(agent.pid(), caps.0, true);

    let nobody = vec![
        "setpriv".to_owned(),
        format!("--reuid={NOBODY}"),
        format!("--regid={NOBODY}"),
        "--clear-groups".into(),
    ];
    for (who, wrapper) in [("root", vec![]), ("nobody", nobody)] {
        let mut app = LineChild::cufile_caller("/usr/bin/python3", &wrapper);
        let a = app.cmd(&format!("load {}", lib.display()));
        let pid: u32 = a.strip_prefix("loaded ").unwrap().parse().unwrap();
        within_10s(&format!("{who}'s process {pid} attached"), &agent, || {
            library_attached_for(&agent, pid)
        });
        let before = cufile_calls_of(&agent, pid).unwrap_or(0);
        app.cmd("call cuFileRead 3");
        app.cmd("call cuFileBufDeregister 2");
        within_10s(&format!("{who}'s 5 calls counted"), &agent, || {
            cufile_calls_of(&agent, pid) == Some(before + 5)
        });
    }
    let log = agent.log();
    assert!(
        !log.contains("cannot trace") && !log.contains("Permission denied"),
        "{log}"
    );
}

/// The minimal alternative docs/deploy.md describes (CAP_BPF + CAP_PERFMON, as uid 0): the
/// cuFile layer is off, and the log (WARN), /debug/layers and `gds-agent probe` run the same
/// way name each capability it lacks; no thread keeps anything, since none attaches later.
#[test]
fn minimal_capabilities_turn_cufile_off_and_say_which_are_missing() {
    let _g = serial();
    let minimal = CapSet(0).with(CAP_BPF).with(CAP_PERFMON);
    let mut agent = wrapped(&setpriv_root(minimal), &[]);
    agent.wait_serving();
    let log = agent.log();
    let warn = log
        .lines()
        .find(|l| l.contains("cuFile tracing off"))
        .unwrap_or_else(|| panic!("no cuFile WARN:\n{log}"));
    assert!(warn.contains("WARN"), "{warn}");
    let says = [
        "the agent lacks cap_sys_admin to create uprobe perf events",
        "cap_sys_ptrace to read /proc/PID/maps",
        "grant cap_dac_read_search,cap_sys_ptrace,cap_sys_admin",
    ];
    for s in says {
        assert!(warn.contains(s), "the WARN says {s:?}: {warn}");
    }
    let layer = cufile_layer(&agent);
    assert_eq!(layer["on"], false, "{layer}");
    for s in says {
        assert!(
            layer["why"].as_str().unwrap().contains(s),
            "/debug/layers says {s:?}: {layer}"
        );
    }
    for (tid, comm, c) in thread_caps(agent.pid()) {
        assert_ne!(comm, "gds-cufile", "no cuFile thread when the layer is off");
        assert!(
            c.effective.is_empty() && c.permitted.is_empty(),
            "thread {tid} ({comm}) holds {c:?}"
        );
    }
    assert_still_traces(&agent);
    drop(agent);

    // `gds-agent probe` under the same capabilities says the same.
    let mut probe = Command::new(setpriv_root(minimal)[0].clone());
    probe
        .args(&setpriv_root(minimal)[1..])
        .arg(env!("CARGO_BIN_EXE_gds-agent"))
        .args(["probe", "--json"]);
    let out = probe.output().unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    let these = report["cufile"]["tracing"]["with_these_capabilities"]["known"]
        .as_str()
        .unwrap_or_else(|| panic!("{}", report["cufile"]));
    for s in says {
        assert!(these.contains(s), "probe says {s:?}: {these}");
    }
}

/// `gds-agent probe --root` over a tree holding the shipped unit says what that unit lets the
/// cuFile layer do (on), and over one holding the minimal unit of docs/deploy.md, what it lacks.
#[test]
fn probe_reads_the_installed_units_capabilities() {
    let shipped = repo_file("deploy/systemd/gds-agent.service");
    let minimal = shipped
        .lines()
        .map(|l| {
            if l.starts_with("AmbientCapabilities=") || l.starts_with("CapabilityBoundingSet=") {
                format!("{}=CAP_BPF CAP_PERFMON", l.split('=').next().unwrap())
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    for (unit, says) in [
        (
            &shipped,
            "cuFile tracing on: every capability it needs is held",
        ),
        (
            &minimal,
            "cuFile tracing off: the agent lacks cap_sys_admin",
        ),
    ] {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("etc/systemd/system");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("gds-agent.service"), unit).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_gds-agent"))
            .args(["probe", "--json", "--root"])
            .arg(root.path())
            .output()
            .unwrap();
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let unit_says = report["cufile"]["tracing"]["installed_unit"]["known"]
            .as_str()
            .unwrap_or_else(|| panic!("{}", report["cufile"]));
        assert!(
            unit_says.starts_with("/etc/systemd/system/gds-agent.service grants ")
                && unit_says.contains(says),
            "{unit_says}"
        );
    }
}

/// The DaemonSet grants the same capabilities as the systemd unit (one decision, two files).
#[test]
fn daemonset_grants_what_the_unit_grants() {
    let ds = repo_file("deploy/kubernetes/daemonset.yaml");
    let add = ds
        .lines()
        .find_map(|l| l.trim().strip_prefix("add: "))
        .expect("the DaemonSet adds capabilities");
    let mut granted = CapSet(0);
    for name in add.trim_matches(|c| c == '[' || c == ']').split(',') {
        let name = name.trim().trim_matches('"');
        granted = granted.with(
            gds_host::privileges::cap_by_name(name)
                .unwrap_or_else(|| panic!("unknown capability {name:?} in the DaemonSet")),
        );
    }
    assert_eq!(granted, shipped_unit_caps());
}

/// Issue 21, item 4: started with systemd's default soft open-file limit (1024) under the hard
/// limit the shipped unit sets (`LimitNOFILE=`, read from the unit file), the agent raises the
/// soft limit to the hard one and logs it.
#[test]
fn open_file_limit_is_raised_to_the_units_limit_and_logged() {
    let _g = serial();
    let hard: u64 = repo_file("deploy/systemd/gds-agent.service")
        .lines()
        .find_map(|l| l.strip_prefix("LimitNOFILE="))
        .expect("the unit sets LimitNOFILE")
        .trim()
        .parse()
        .expect("LimitNOFILE is a number");
    assert!(
        hard > 1024,
        "the unit raises the limit above systemd's 1024: {hard}"
    );
    // Raising a hard limit takes CAP_SYS_RESOURCE, which a sandboxed harness may lack: where
    // this process's own hard limit is lower, the agent is given that one.
    let (_, ours) = gds_host::privileges::nofile().unwrap();
    let hard = hard.min(ours);
    assert!(
        hard > 1024,
        "this harness's hard limit leaves nothing to raise: {ours}"
    );
    let mut agent = wrapped(
        &["prlimit".into(), format!("--nofile=1024:{hard}")],
        &["--pid", &std::process::id().to_string()],
    );
    agent.wait_serving();
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", agent.pid())).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let nums: Vec<&str> = line.split_whitespace().skip(3).take(2).collect();
    assert_eq!(nums, [hard.to_string(), hard.to_string()], "{line}");
    let log = agent.log();
    assert!(
        log.contains(&format!("file descriptor limit raised from 1024 to {hard}")),
        "{log}"
    );
}
