//! Project tasks: `cargo xtask <command>`.
//!
//! `setup` installs what building the eBPF programs needs, `run` starts the agent, `test` runs
//! every test (the layering check, unit, end-to-end against the real kernel, VM scenarios,
//! observability checks).

mod dashboard;
mod fuzz;
mod layering;
mod load;
mod observe;
mod setup;
mod test;
mod vm;

// The families, the API client and the test kit come from crates that build without the eBPF
// toolchain (gds-api, gds-testkit): xtask installs that toolchain, so it cannot need it.
use gds_api::{client, families};
use gds_testkit::{promtext, service};

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "gds project tasks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install the prerequisites (nightly rust-src, llvm-N-dev, bpf-linker), skipping those present.
    Setup,
    /// Build and start the agent with its defaults (extra arguments go to `gds-agent run`).
    Run {
        /// Build in release mode.
        #[arg(long)]
        release: bool,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run every test: layering, unit, end-to-end (real kernel, needs root), VM and
    /// observability checks.
    Test(test::TestArgs),
    /// Boot kernels 6.1 and 6.12 in QEMU with emulated NVMe and run the guest scenarios.
    VmTest(vm::VmTestArgs),
    /// Tracing overhead benchmarks: io_uring NOPs and cached 4 KiB reads, agent attached vs not;
    /// cuFile calls and the preads beneath them, traced vs not; 4 KiB O_DIRECT preads and getpid
    /// with the file layer's default and syscall hooks.
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Agent + local Prometheus + Grafana dashboard; `observe dashboard`, `observe check`.
    Observe(observe::ObserveArgs),
    /// HTTP load: wrk scrapes /metrics over many connections while the agent traces 100k+
    /// io_uring requests/s; reports scrape latency, agent RSS and CPU, and checks the counts.
    Load(load::LoadArgs),
    /// Run the cargo-fuzz targets one after another (`--seconds N` each, default 600; installs
    /// cargo-fuzz when missing) and print a summary table. See docs/fuzzing.md.
    Fuzz(fuzz::FuzzArgs),
    /// Check that modules import only lower layers (ARCHITECTURE.md's tables) and that no
    /// module cycle exists in gds-user and gds-ebpf. Also the first stage of `test`.
    Layering(layering::LayeringArgs),
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Setup => setup::ensure_prerequisites(),
        Command::Run { release, args } => {
            setup::ensure_prerequisites()?;
            let mut cmd = setup::cargo();
            cmd.args(["run", "--package", "gds-user", "--bin", "gds-agent"]);
            if release {
                cmd.arg("--release");
            }
            cmd.args(["--", "run"]).args(args);
            setup::run(&mut cmd)
        }
        Command::Test(args) => test::run(args),
        Command::VmTest(args) => vm::vm_test(&args).map(drop),
        Command::Observe(args) => observe::run(args),
        Command::Load(args) => load::run(args),
        Command::Fuzz(args) => fuzz::run(args),
        Command::Layering(args) => layering::run(args),
        Command::Bench { args } => {
            setup::ensure_prerequisites()?;
            // io_uring (trace_overhead, which takes the extra arguments), then cuFile uprobes on
            // the real libcufile from PyPI, per call, then the file layer (cufile_overhead and
            // file_overhead ignore them).
            let mut cmd = setup::cargo();
            cmd.args(["bench", "--package", "gds-user"])
                .args([
                    "--bench",
                    "trace_overhead",
                    "--bench",
                    "cufile_overhead",
                    "--bench",
                    "file_overhead",
                    "--",
                ])
                .args(&args)
                .env(
                    "GDS_LIBCUFILE",
                    setup::libcufile_dir().join("nvidia/cu13/lib/libcufile.so.0"),
                );
            setup::run(&mut cmd)
        }
    }
}
