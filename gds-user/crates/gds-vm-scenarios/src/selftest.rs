//! Self-tests of the runner, run only when named: they prove that a scenario that hangs is
//! killed at its timeout and reported, and that a failing one is reported as FAIL.

use std::time::Duration;

use anyhow::{Result, bail};

use crate::{Ctx, Scenario};

pub fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario {
            name: "selftest.hang",
            about: "sleeps forever; the runner must report TIMEOUT after 1 s",
            timeout: Duration::from_secs(1),
            explicit: true,
            run: hang,
        },
        Scenario {
            name: "selftest.fail",
            about: "fails; the runner must report FAIL",
            timeout: Duration::from_secs(10),
            explicit: true,
            run: fail,
        },
        Scenario {
            name: "selftest.guest-dies-once",
            about: "panics the guest kernel on its first boot, passes on the next; the host \
                    must boot the guest again for it",
            timeout: Duration::from_secs(10),
            explicit: true,
            run: guest_dies_once,
        },
    ]
}

/// Which boot of this guest this is (`gds.boot=N` on the kernel command line, from 1).
fn boot_number() -> u32 {
    std::fs::read_to_string("/proc/cmdline")
        .unwrap_or_default()
        .split_whitespace()
        .find_map(|a| a.strip_prefix("gds.boot="))
        .and_then(|n| n.parse().ok())
        .unwrap_or(1)
}

fn guest_dies_once(c: &Ctx) -> Result<String> {
    let boot = boot_number();
    if boot == 1 {
        c.detail("panicking the guest kernel (sysrq c)");
        std::fs::write("/proc/sysrq-trigger", "c")?;
        bail!("the kernel survived sysrq c");
    }
    Ok(format!("boot {boot}: alive"))
}

fn hang(c: &Ctx) -> Result<String> {
    c.detail("sleeping");
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn fail(_c: &Ctx) -> Result<String> {
    bail!("deliberate failure")
}
