//! `cargo xtask test`: every test, in one command.
//!
//! Unit and end-to-end tests run under cargo-nextest, one process per test: the end-to-end
//! tests filter the tracer on their own pid, so tests must not share a process.

use std::process::Command;

use anyhow::{Result, bail};
use clap::Args;

use crate::setup;

#[derive(Args)]
pub struct TestArgs {
    /// Only the host tests (skip VM scenarios, the Prometheus checks and the HTTP load).
    #[arg(long)]
    pub host_only: bool,
    /// Extra arguments for `cargo nextest run` (e.g. a test name filter).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub nextest_args: Vec<String>,
}

fn ensure_nextest() -> Result<()> {
    let present = Command::new("cargo")
        .args(["nextest", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !present {
        eprintln!("xtask setup: installing cargo-nextest");
        setup::run(Command::new("cargo").args(["install", "cargo-nextest", "--locked"]))?;
    }
    Ok(())
}

pub fn run(args: TestArgs) -> Result<()> {
    setup::ensure_prerequisites()?;
    ensure_nextest()?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc_geteuid() } != 0 {
        bail!(
            "cargo xtask test loads eBPF programs and boots VMs: run it as root \
             (or with CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN)"
        );
    }
    let mut failures = Vec::new();
    // The crate table in ARCHITECTURE.md is the crate graph; no #[path] across crates (first: fast).
    if let Err(e) = crate::layering::run(Default::default()) {
        failures.push(format!("{e:#}"));
    }
    // QEMU and busybox first: some host tests boot guests too (the P2PDMA data-path test).
    crate::vm::ensure_tools()?;
    // The default members: gds-ebpf builds only for the BPF target (through gds-user's build.rs).
    let mut nextest = setup::cargo();
    nextest
        .args(["nextest", "run", "--no-fail-fast"])
        .args(&args.nextest_args)
        .env(
            "GDS_LIBCUFILE",
            setup::libcufile_dir().join("nvidia/cu13/lib/libcufile.so.0"),
        );
    if let Err(e) = setup::run(&mut nextest) {
        failures.push(format!("host tests: {e:#}"));
    }
    if !args.host_only {
        // NVMe passthrough and NVMe tracing inside QEMU guests (Debian 6.1 and 6.12 kernels).
        if let Err(e) = crate::vm::vm_test(&crate::vm::VmTestArgs::default()) {
            failures.push(format!("VM scenarios: {e:#}"));
        }
        // A real Prometheus scrapes a real agent under io_uring load; every dashboard and
        // alert expression is evaluated through its HTTP API; promtool checks and tests.
        // 200 concurrent /metrics scrapes (wrk) while the agent traces 100k+ io_uring
        // requests/s: no HTTP error, every request counted, the agent alive (GDS_LOAD_SECONDS,
        // default 15; `cargo xtask load` is the 60 s release-build measurement). Both stages
        // run the same debug agent, built once.
        match setup::build_agent(false) {
            Ok(agent) => {
                if let Err(e) = crate::observe::check_observability(&setup::root(), &agent) {
                    failures.push(format!("observability: {e:#}"));
                }
                if let Err(e) = crate::load::test_stage(&agent) {
                    failures.push(format!("load: {e:#}"));
                }
            }
            Err(e) => failures.push(format!("observability and load: {e:#}")),
        }
    }
    if !failures.is_empty() {
        bail!(
            "{} test stage(s) failed:\n  {}",
            failures.len(),
            failures.join("\n  ")
        );
    }
    eprintln!("xtask test: all stages passed");
    Ok(())
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}
