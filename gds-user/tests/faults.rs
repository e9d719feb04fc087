//! Faults: an agent killed with SIGKILL leaves no BPF programs, links or pinned maps behind
//! (everything it loads is fd-owned, so the kernel frees it with the process).

mod common;

use std::time::{Duration, Instant};

use common::{Agent, counted_nops, nops, serial, unshare_private};

/// Ids of the BPF programs `pid` holds, from the `prog_id:` lines of its fds' fdinfo.
fn programs_of(pid: u32) -> Vec<u64> {
    let mut ids = Vec::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .unwrap()
        .flatten()
    {
        let info = std::fs::read_to_string(fd.path()).unwrap_or_default();
        if let Some(id) = info.lines().find_map(|l| l.strip_prefix("prog_id:")) {
            ids.push(id.trim().parse().unwrap());
        }
    }
    ids.sort();
    ids.dedup();
    ids
}

fn live_program_ids() -> Vec<u64> {
    let out = std::process::Command::new("bpftool")
        .args(["prog", "show", "-j"])
        .output()
        .expect("bpftool is installed by cargo xtask setup");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let progs: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    progs
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["id"].as_u64())
        .collect()
}

/// A supervisor (or a test) may stop the agent the moment its port accepts, while it is still
/// attaching: that SIGTERM must still end in a clean stop that detaches, never in death by the
/// signal's default action. The listener is bound before attaching, so this connects early.
#[test]
fn sigterm_as_soon_as_the_port_accepts_is_a_clean_stop() {
    let _g = serial();
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_gds-agent"));
    let agent = Agent::spawn(tempfile::tempdir().unwrap(), &[], bin, &[]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(agent.addr).is_err() {
        assert!(Instant::now() < deadline, "no listener:\n{}", agent.log());
        std::thread::sleep(Duration::from_millis(2));
    }
    let (status, log) = agent.stop();
    assert!(status.success(), "agent exit {status}:\n{log}");
    assert!(log.contains("SIGTERM: shutting down"), "{log}");
    assert!(log.contains("detached all programs"), "{log}");
}

#[test]
fn sigkill_leaves_no_programs_behind() {
    let _g = serial();
    let mut agent = Agent::start(&["--pid", &std::process::id().to_string()]);
    let pid = agent.pid();
    let mine = programs_of(pid);
    assert!(
        mine.len() >= 3,
        "the agent should own its io_uring programs, found {mine:?}"
    );
    let live = live_program_ids();
    assert!(
        mine.iter().all(|id| live.contains(id)),
        "bpftool lists {live:?}, agent holds {mine:?}"
    );
    agent.service.child.kill().unwrap(); // SIGKILL: no clean shutdown
    agent.service.child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let live = live_program_ids();
        let left: Vec<_> = mine.iter().filter(|id| live.contains(id)).collect();
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "programs {left:?} outlived the killed agent"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let pinned = std::fs::read_dir("/sys/fs/bpf")
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().contains("gds"))
                .count()
        })
        .unwrap_or(0);
    assert_eq!(pinned, 0, "the agent pins nothing under /sys/fs/bpf");

    // Restarted, the agent attaches afresh (nothing left over to clash with) and counts.
    let again = Agent::start(&["--pid", &std::process::id().to_string()]);
    let theirs = programs_of(again.pid());
    assert!(
        theirs.len() >= 3 && theirs.iter().all(|id| !mine.contains(id)),
        "the restarted agent loads its own programs: {theirs:?} (killed one had {mine:?})"
    );
    nops(5);
    assert_eq!(
        again
            .scrape()
            .value("gds_uring_requests_total", &[("opcode", "NOP")]),
        5.0
    );
}

// --- tracefs disappearing -------------------------------------------------------------------
//
// Each test runs the agent in its own private mount namespace (`unshare --mount --propagation
// private`) and unmounts tracefs only there, with `nsenter --target <agent> --mount`; the
// test's (root) namespace is checked to be untouched.

use std::process::Command;

/// Shell that unmounts every tracefs of its (private) mount namespace, deepest first.
const UMOUNT_TRACEFS: &str = "grep ' tracefs ' /proc/self/mounts | cut -d' ' -f2 | sort -r | \
                              while read -r m; do umount \"$m\" || exit 1; done";

/// tracefs mount points of `pid`'s mount namespace ("self" for ours), from its mount table.
fn tracefs_mounts(pid: &str) -> Vec<String> {
    std::fs::read_to_string(format!("/proc/{pid}/mounts"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"tracefs")).then(|| f[1].to_owned())
        })
        .collect()
}

/// `unshare --mount --propagation private sh -c '<setup>; exec "$@"' sh <agent> run ...`, not
/// yet serving.
fn ns_agent(setup: &str, agent_args: &[&str]) -> Agent {
    let wrapper = unshare_private(setup);
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_gds-agent"));
    Agent::spawn(tempfile::tempdir().unwrap(), &wrapper, bin, agent_args)
}

/// Runs `cmd` in `agent`'s mount namespace.
fn nsenter(agent: &Agent, cmd: &str) {
    let out = Command::new("nsenter")
        .args([
            "--target",
            &agent.pid().to_string(),
            "--mount",
            "sh",
            "-c",
            cmd,
        ])
        .output()
        .expect("nsenter (util-linux)");
    assert!(
        out.status.success(),
        "nsenter {cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Waits until `gds_agent_tracefs_available` reads `want` (the watch checks every 2 s).
fn wait_tracefs_gauge(agent: &Agent, want: f64) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let v = agent.scrape().0.get("gds_agent_tracefs_available").copied();
        if v == Some(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "gds_agent_tracefs_available is {v:?}, want {want}:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Unmounts tracefs under a running agent, checks it keeps tracing and reports the loss, then
/// mounts it back and checks that is reported too. `attach` is the agent's --attach.
fn tracefs_unmounted_while_running(attach: &str) {
    let _g = serial();
    let ours = tracefs_mounts("self");
    // Where the host has no tracefs, the agent (root) mounts one in its own namespace.
    let mut agent = ns_agent(
        "true",
        &["--attach", attach, "--pid", &std::process::id().to_string()],
    );
    agent.wait_serving();
    let ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/mnt")).unwrap();
    assert_ne!(
        ns(&agent.pid().to_string()),
        ns("self"),
        "the agent has its own mount namespace"
    );
    assert!(!tracefs_mounts(&agent.pid().to_string()).is_empty());
    let mode = if attach == "btf" { "Btf" } else { "Classic" };
    assert!(
        agent.log().contains(&format!("mode={mode}")),
        "{}",
        agent.log()
    );
    wait_tracefs_gauge(&agent, 1.0);
    assert_eq!(counted_nops(&agent, 20), 20.0);

    nsenter(&agent, UMOUNT_TRACEFS);
    assert_eq!(
        tracefs_mounts(&agent.pid().to_string()),
        Vec::<String>::new()
    );
    assert_eq!(
        tracefs_mounts("self"),
        ours,
        "our namespace keeps its tracefs"
    );
    wait_tracefs_gauge(&agent, 0.0);
    assert_eq!(counted_nops(&agent, 30), 30.0, "{}", agent.log());
    assert_eq!(
        agent.log().matches("tracefs was unmounted").count(),
        1,
        "warned once:\n{}",
        agent.log()
    );

    nsenter(&agent, "mount -t tracefs nodev /sys/kernel/tracing");
    wait_tracefs_gauge(&agent, 1.0);
    assert!(
        agent.log().contains("tracefs is mounted again"),
        "{}",
        agent.log()
    );
    assert_eq!(counted_nops(&agent, 10), 10.0);
    let (status, log) = agent.stop();
    assert!(status.success(), "{status}\n{log}");
    assert!(!log.contains("panicked"), "{log}");
    assert_eq!(tracefs_mounts("self"), ours);
}

#[test]
fn tracefs_unmounted_under_btf_agent_is_reported_and_tracing_continues() {
    tracefs_unmounted_while_running("btf");
}

#[test]
fn tracefs_unmounted_under_classic_agent_is_reported_and_tracing_continues() {
    tracefs_unmounted_while_running("classic");
}

/// Setup for an agent that starts with no tracefs and cannot mount one: unmount it in the
/// private namespace, then drop CAP_SYS_ADMIN (the agent is still root with CAP_BPF and
/// CAP_PERFMON).
fn no_tracefs_setup() -> String {
    format!(
        "{UMOUNT_TRACEFS}\nset -- setpriv --bounding-set=-sys_admin --inh-caps=-sys_admin \"$@\""
    )
}

#[test]
fn agent_starts_without_tracefs_in_btf_mode_and_says_so() {
    let _g = serial();
    let ours = tracefs_mounts("self");
    let mut agent = ns_agent(
        &no_tracefs_setup(),
        &["--pid", &std::process::id().to_string()],
    );
    agent.wait_serving();
    assert_eq!(
        tracefs_mounts(&agent.pid().to_string()),
        Vec::<String>::new()
    );
    wait_tracefs_gauge(&agent, 0.0);
    assert_eq!(counted_nops(&agent, 25), 25.0);
    let log = agent.log();
    assert!(log.contains("mode=Btf"), "{log}");
    assert!(
        log.contains("tracefs unavailable")
            && log.contains("tracefs is not mounted in the agent's mount namespace"),
        "{log}"
    );
    drop(agent);
    assert_eq!(tracefs_mounts("self"), ours);
}

#[test]
fn classic_attach_without_tracefs_fails_saying_how_to_mount_it() {
    let _g = serial();
    let (status, log) = ns_agent(&no_tracefs_setup(), &["--attach", "classic"]).wait_exit();
    assert!(!status.success(), "{status}\n{log}");
    assert!(
        log.contains("tracefs is not mounted")
            && log.contains("mount -t tracefs nodev /sys/kernel/tracing"),
        "{log}"
    );
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn root_agent_mounts_missing_tracefs_in_its_own_namespace() {
    let _g = serial();
    let ours = tracefs_mounts("self");
    let mut agent = ns_agent(
        UMOUNT_TRACEFS,
        &[
            "--attach",
            "classic",
            "--pid",
            &std::process::id().to_string(),
        ],
    );
    agent.wait_serving();
    let log = agent.log();
    assert!(
        log.contains("mounted tracefs") && log.contains("mode=Classic"),
        "{log}"
    );
    assert_eq!(
        tracefs_mounts(&agent.pid().to_string()),
        vec!["/sys/kernel/tracing".to_owned()]
    );
    wait_tracefs_gauge(&agent, 1.0);
    assert_eq!(counted_nops(&agent, 15), 15.0);
    drop(agent);
    assert_eq!(
        tracefs_mounts("self"),
        ours,
        "only the agent's namespace got a mount"
    );
}
