//! `gds-agent`: trace, probe and move data for GPUDirect Storage.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "gds-agent",
    version,
    about = "GPUDirect Storage observability agent"
)]
struct Cli {
    /// What to do (default: run).
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Load the tracing programs and serve Prometheus metrics (the default).
    Run(gds_user::agent::RunArgs),
    /// Live terminal view: IOPS and latency per opcode and disk, slowest in-flight requests,
    /// stalls. Attaches to --agent, or starts its own agent (extra arguments go to it).
    Top(gds_user::top::TopArgs),
    /// Active and recent stalls of a running agent.
    Stalls(gds_user::top::stalls::StallsArgs),
    /// Report what this host can do for GPUDirect Storage and which data path `read` will use.
    Probe(gds_probe::ProbeArgs),
    /// Stream SRC (file, block device, /dev/ngXnY) into GPU or host memory by the best route
    /// (`--path`); without SRC, `--device` reads an NVMe namespace through passthrough.
    Read(gds_datapath::cli::ReadArgs),
    /// Measure read throughput, IOPS and latency by route (gdsio-class).
    Bench(gds_datapath::bench::BenchArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        None => gds_user::config::resolve(gds_user::agent::RunArgs::default_from_cli(), &[])
            .map_err(Into::into)
            .and_then(gds_user::agent::run),
        Some(Command::Run(args)) => {
            let argv: Vec<_> = std::env::args_os().collect();
            gds_user::config::resolve(args, &gds_user::config::run_argv(&argv))
                .map_err(Into::into)
                .and_then(gds_user::agent::run)
        }
        Some(Command::Top(args)) => gds_user::top::run(args),
        Some(Command::Stalls(args)) => gds_user::top::stalls::run(args),
        Some(Command::Probe(args)) => match &args.canary {
            Some(file) => gds_user::canary::run(file, args.gpu, args.json),
            None => gds_probe::run(args),
        },
        Some(Command::Read(args)) => gds_datapath::cli::read(args),
        Some(Command::Bench(args)) => gds_datapath::bench::bench(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("gds-agent: error: {}", describe(&err));
            if err.is::<gds_user::top::NoTerminal>() {
                ExitCode::from(gds_user::top::NoTerminal::EXIT_STATUS)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// The error and its causes, each said once: many errors put their cause in their own message
/// (so that `{}` alone says why), and `{:#}` would then repeat it.
fn describe(err: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in err.chain() {
        let msg = cause.to_string();
        if out.contains(&msg) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&msg);
    }
    out
}
