//! `gds-vm-scenarios`: the guest side of `cargo xtask vm-test`.
//!
//! Runs inside the QEMU guests (kernels 6.1 and 6.12, emulated NVMe controllers), one scenario
//! per child process so that each has a hard timeout and a crash in one cannot take the others
//! down. Results go to the serial console as marker lines the host parses:
//!
//! ```text
//! @@GDS DETAIL <scenario> <text>          (any number, from the scenario)
//! @@GDS METRIC <scenario> <key>=<value>   (numbers the host reports, e.g. MiB/s)
//! @@GDS RESULT <scenario> PASS|FAIL|TIMEOUT <seconds> <one-line reason>
//! @@GDS DONE <passed> <failed>
//! ```
//!
//! To add scenarios: write `fn(&Ctx) -> Result<String>` functions in a module and list them in
//! its `scenarios()`; [`registry`] concatenates the modules. `list` prints the names so the host
//! knows which results to expect.

mod agent;
mod cufile_beneath;
mod file_layer;
mod file_nvme;
mod file_overhead;
mod modules;
mod nvme;
mod p2pdma;
mod selftest;
mod stall_cause;
mod standin;
mod tracing;
mod uring;
mod util;

use gds_testkit::promtext;

use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::Result;

/// One guest scenario.
pub struct Scenario {
    pub name: &'static str,
    pub about: &'static str,
    pub timeout: Duration,
    /// Runs only when named in `--only`, exactly or by its group (`p2pdma*` for
    /// `p2pdma.block-memory`): self-tests of the runner, and scenarios that need a machine
    /// only one guest has (the P2PDMA guest's peer controller).
    pub explicit: bool,
    /// Returns a one-line summary on success.
    pub run: fn(&Ctx) -> Result<String>,
}

impl Scenario {
    /// A scenario that runs by default, with a timeout of `secs` seconds.
    pub fn new(
        name: &'static str,
        about: &'static str,
        secs: u64,
        run: fn(&Ctx) -> Result<String>,
    ) -> Self {
        Scenario {
            name,
            about,
            timeout: Duration::from_secs(secs),
            explicit: false,
            run,
        }
    }
}

/// What every scenario may need to know about the guest.
pub struct Ctx {
    pub name: &'static str,
    /// `uname -r`.
    pub kernel: String,
    /// The agent binary inside the guest.
    pub agent: String,
}

impl Ctx {
    pub fn detail(&self, text: impl AsRef<str>) {
        for line in text.as_ref().lines() {
            println!("@@GDS DETAIL {} {}", self.name, line);
        }
    }

    pub fn metric(&self, key: &str, value: impl std::fmt::Display) {
        println!("@@GDS METRIC {} {key}={value}", self.name);
    }
}

fn registry() -> Vec<Scenario> {
    let mut all = Vec::new();
    all.extend(nvme::scenarios());
    all.extend(agent::scenarios());
    all.extend(tracing::scenarios());
    all.extend(stall_cause::scenarios());
    all.extend(uring::scenarios());
    all.extend(modules::scenarios());
    all.extend(file_layer::scenarios());
    all.extend(cufile_beneath::scenarios());
    all.extend(file_nvme::scenarios());
    all.extend(file_overhead::scenarios());
    all.extend(p2pdma::scenarios());
    all.extend(selftest::scenarios());
    all
}

fn usage() -> ExitCode {
    eprintln!(
        "usage: gds-vm-scenarios list | run [--only NAME[,NAME..]] [--skip NAME[,NAME..]] \
         [--timeout-scale F] | one NAME"
    );
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("list") => {
            for s in registry() {
                println!("{}\t{}", s.name, s.about);
            }
            ExitCode::SUCCESS
        }
        Some("one") if args.len() == 2 => one(&args[1]),
        Some("run") => {
            let mut only: Option<Vec<String>> = None;
            let mut skip: Vec<String> = Vec::new();
            let mut scale = 1.0f64;
            let mut it = args[1..].iter();
            while let Some(a) = it.next() {
                match a.as_str() {
                    "--only" => {
                        only = it.next().map(|v| {
                            v.split(',')
                                .filter(|s| !s.is_empty())
                                .map(String::from)
                                .collect()
                        })
                    }
                    // Scenarios that already reported in an earlier boot of this guest.
                    "--skip" => {
                        skip = it
                            .next()
                            .map(|v| {
                                v.split(',')
                                    .filter(|s| !s.is_empty())
                                    .map(String::from)
                                    .collect()
                            })
                            .unwrap_or_default()
                    }
                    "--timeout-scale" => {
                        scale = it.next().and_then(|v| v.parse().ok()).unwrap_or(1.0)
                    }
                    _ => return usage(),
                }
            }
            run_all(only.as_deref(), &skip, scale)
        }
        _ => usage(),
    }
}

fn matches(s: &Scenario, only: Option<&[String]>) -> bool {
    let name = s.name;
    if s.explicit {
        let group = name.split('.').next().unwrap_or(name);
        return only.is_some_and(|list| {
            list.iter().any(|p| {
                p == name
                    || p.strip_suffix('*')
                        .is_some_and(|pre| pre.trim_end_matches('.') == group)
            })
        });
    }
    match only {
        None => true,
        Some(list) => list
            .iter()
            .any(|p| name == p || (p.ends_with('*') && name.starts_with(&p[..p.len() - 1]))),
    }
}

fn run_all(only: Option<&[String]>, skip: &[String], scale: f64) -> ExitCode {
    let exe = std::env::current_exe().expect("current_exe");
    let (mut passed, mut failed) = (0, 0);
    for s in registry()
        .into_iter()
        .filter(|s| matches(s, only) && !skip.iter().any(|k| k == s.name))
    {
        let timeout = s.timeout.mul_f64(scale);
        println!("@@GDS START {} {}", s.name, s.about);
        let start = Instant::now();
        let child = Command::new(&exe)
            .args(["one", s.name])
            .stdin(Stdio::null())
            .spawn();
        let (verdict, reason) = match child {
            Err(e) => ("FAIL", format!("spawn: {e}")),
            Ok(mut child) => loop {
                match child.try_wait() {
                    Ok(Some(st)) if st.success() => break ("PASS", String::new()),
                    Ok(Some(st)) => break ("FAIL", st.to_string()),
                    Ok(None) if start.elapsed() > timeout => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break (
                            "TIMEOUT",
                            format!("killed after {:.0} s", timeout.as_secs_f64()),
                        );
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                    Err(e) => break ("FAIL", format!("wait: {e}")),
                }
            },
        };
        if verdict == "PASS" {
            passed += 1;
        } else {
            failed += 1;
        }
        println!(
            "@@GDS RESULT {} {verdict} {:.2} {reason}",
            s.name,
            start.elapsed().as_secs_f64()
        );
    }
    println!("@@GDS DONE {passed} {failed}");
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn one(name: &str) -> ExitCode {
    let Some(s) = registry().into_iter().find(|s| s.name == name) else {
        eprintln!("no scenario named {name}");
        return ExitCode::from(2);
    };
    let ctx = Ctx {
        name: s.name,
        kernel: util::kernel_release(),
        agent: std::env::var("GDS_AGENT").unwrap_or_else(|_| "/bin/gds-agent".into()),
    };
    match (s.run)(&ctx) {
        Ok(summary) => {
            ctx.detail(format!("ok: {summary}"));
            ExitCode::SUCCESS
        }
        Err(e) => {
            ctx.detail(format!("error: {e:#}"));
            ExitCode::FAILURE
        }
    }
}
