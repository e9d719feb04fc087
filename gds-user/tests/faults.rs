//! Faults: an agent killed with SIGKILL leaves no BPF programs, links or pinned maps behind
//! (everything it loads is fd-owned, so the kernel frees it with the process).

mod common;

use std::time::{Duration, Instant};

use common::{Agent, serial};

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

#[test]
fn sigkill_leaves_no_programs_behind() {
    let _g = serial();
    let mut agent = Agent::start(&["--pid", &std::process::id().to_string()]);
    let pid = agent.child.id();
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
    agent.child.kill().unwrap(); // SIGKILL: no clean shutdown
    agent.child.wait().unwrap();
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
}
