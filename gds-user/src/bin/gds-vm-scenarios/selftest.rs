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
    ]
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
