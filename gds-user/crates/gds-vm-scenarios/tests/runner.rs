//! The guest scenario runner's contract, checked on the host: a scenario that hangs is killed at
//! its timeout and reported as TIMEOUT, a failing one as FAIL, and the run fails.

use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn hung_and_failing_scenarios_are_reported_and_fail_the_run() {
    let start = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_gds-vm-scenarios"))
        .args(["run", "--only", "selftest.hang,selftest.fail"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "the run must fail:\n{text}");
    assert!(
        text.contains("@@GDS RESULT selftest.hang TIMEOUT"),
        "no TIMEOUT for the hanging scenario:\n{text}"
    );
    assert!(
        text.contains("@@GDS RESULT selftest.fail FAIL"),
        "no FAIL for the failing scenario:\n{text}"
    );
    assert!(
        text.contains("@@GDS DETAIL selftest.fail error: deliberate failure"),
        "{text}"
    );
    assert!(text.contains("@@GDS DONE 0 2"), "{text}");
    // The hang is killed after its 1 s timeout, not after the 3600 s sleep.
    assert!(start.elapsed() < Duration::from_secs(20));
}

#[test]
fn self_tests_only_run_when_named() {
    let out = Command::new(env!("CARGO_BIN_EXE_gds-vm-scenarios"))
        .args(["run", "--only", "selftest.fail*"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("@@GDS DONE 0 0"), "{text}");
    let list = Command::new(env!("CARGO_BIN_EXE_gds-vm-scenarios"))
        .arg("list")
        .output()
        .unwrap();
    let names = String::from_utf8_lossy(&list.stdout);
    for n in [
        "nvme.pattern.qd1.plain",
        "nvme.pattern.qd32.fixed",
        "nvme.validator-refuses",
        "nvme.controller-rejects-lba-out-of-range",
        "nvme.throughput-vs-fio",
    ] {
        assert!(names.contains(n), "{n} missing from:\n{names}");
    }
}

#[test]
fn skipped_scenarios_do_not_run() {
    let out = Command::new(env!("CARGO_BIN_EXE_gds-vm-scenarios"))
        .args([
            "run",
            "--only",
            "selftest.hang,selftest.fail",
            "--skip",
            "selftest.hang",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("selftest.hang"), "{text}");
    assert!(text.contains("@@GDS RESULT selftest.fail FAIL"), "{text}");
    assert!(text.contains("@@GDS DONE 0 1"), "{text}");
}
