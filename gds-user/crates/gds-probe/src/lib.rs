//! `gds-agent probe`: what this host can do for GPUDirect Storage, and which data path `read`
//! will take per GPU (`gds`, `p2p` or `bounce`) with the reason and the fix for every faster
//! path that is not possible.
//!
//! Every file is read through a [`HostRoot`] (default `/`, `--root` for fixture trees) with
//! bounded, non-blocking reads; facts that need the running host (CUDA, NVML, io_uring, our
//! capabilities) are skipped with a reason when the root is not `/`. A fact that cannot be read
//! is a [`Fact::Unknown`] carrying the reason, never a panic or a silent default.

/// Bounded reads of host files under a root (a foundation, shared with `kmod`).
pub use gds_host::bounded;
pub mod bpf_hooks;
pub mod cufile;
pub mod gpu;
pub mod kernel;
pub mod metrics;
pub mod nvidia_fs;
pub mod nvme;
pub mod pci;
pub mod report;
pub mod verdict;

use std::path::PathBuf;

use serde::Serialize;

pub use bounded::{HostRoot, ReadError};
pub use report::{Report, SCHEMA_VERSION};
pub use verdict::{Blocker, DataPath, GdsMode, Verdict};

/// A fact about the host: known, or unknown with the reason.
/// Serialised as `{"known": value}` or `{"unknown": "reason"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Fact<T> {
    Known(T),
    Unknown(String),
}

impl<T> Fact<T> {
    pub fn unknown(reason: impl Into<String>) -> Self {
        Fact::Unknown(reason.into())
    }

    pub fn from_read_error(err: ReadError) -> Self {
        Fact::Unknown(err.to_string())
    }

    pub fn from_read(r: Result<T, ReadError>) -> Self {
        match r {
            Ok(v) => Fact::Known(v),
            Err(e) => Fact::from_read_error(e),
        }
    }

    pub fn from_result<E: std::fmt::Display>(r: Result<T, E>) -> Self {
        match r {
            Ok(v) => Fact::Known(v),
            Err(e) => Fact::Unknown(e.to_string()),
        }
    }

    pub fn known(&self) -> Option<&T> {
        match self {
            Fact::Known(v) => Some(v),
            Fact::Unknown(_) => None,
        }
    }

    pub fn unknown_ref(&self) -> Option<&str> {
        match self {
            Fact::Known(_) => None,
            Fact::Unknown(why) => Some(why),
        }
    }
}

/// `gds-agent probe [--root DIR] [--json]`
#[derive(Debug, Clone, clap::Args)]
pub struct ProbeArgs {
    /// Read the host through this directory instead of `/` (a fixture tree, a chroot). CUDA,
    /// NVML, io_uring and capability checks only run when this is `/`.
    #[arg(long, default_value = "/")]
    pub root: PathBuf,
    /// Print the report as JSON (schema: docs/probe-schema.md) instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Instead of the report: one real cuFile read of FILE into GPU `--gpu`, traced, with the
    /// path it took next to the path the probe predicts (root; exit status 1 when they differ).
    #[arg(long, value_name = "FILE")]
    pub canary: Option<PathBuf>,
    /// The GPU the canary reads into.
    #[arg(long, default_value_t = 0, requires = "canary")]
    pub gpu: u32,
}

/// Runs the probe and prints the report.
pub fn run(args: ProbeArgs) -> anyhow::Result<()> {
    if !args.root.is_dir() {
        anyhow::bail!("--root {} is not a directory", args.root.display());
    }
    let report = Report::collect(&HostRoot::new(&args.root));
    let out = if args.json {
        let mut s = serde_json::to_string_pretty(&report)?;
        s.push('\n');
        s
    } else {
        report.to_table()
    };
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    // A closed pipe (`| head`) is not an error worth a message.
    match stdout
        .write_all(out.as_bytes())
        .and_then(|_| stdout.flush())
    {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => Ok(r?),
    }
}
