//! `gds-agent probe --canary FILE`: one real cuFile read of FILE, with the path it took as the
//! tracer saw it beneath the call, next to the path the probe predicts from the host's
//! configuration. Agreement confirms the verdict; disagreement is the finding (e.g. cuFile
//! silently in compat mode on a host whose probe says GDS).
//!
//! The read is made by this process through the data path's cuFile binding (libcufile loaded
//! at run time, as applications do); this process traces itself with the same programs the
//! agent uses, attached to its own libcufile right after it is loaded.

use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde::Serialize;

use gds_api::model::{Layer, cufile::CufileReport};
use gds_datapath::{
    cuda::Gpu,
    cufile::{Driver, Handle, Mode},
    source::{Direct, Source},
};
use gds_host::bounded::HostRoot;
use gds_probe::{DataPath, GdsMode, Report};
use gds_trace::{TraceOptions, UringTracer};

/// What the canary read and what each side says.
#[derive(Debug, Serialize)]
pub struct CanaryReport {
    pub file: String,
    pub gpu: u32,
    pub bytes_read: u64,
    pub read_ms: f64,
    /// `nvfs`, `p2pdma` or `compat`, from `gds-agent probe`'s verdict for the GPU.
    pub predicted: String,
    pub predicted_why: String,
    /// The path the tracer classified the read as (`nvfs`, `compat`, `unknown`).
    pub traced: String,
    pub traced_detail: String,
    pub agree: bool,
}

/// Reads at most this much (a canary, not a benchmark).
const CANARY_BYTES: u64 = 16 << 20;

/// The least a canary file may hold: one 4 KiB block, the O_DIRECT alignment of the file
/// systems GDS reads (ext4, XFS); cuFile reads whole aligned blocks, so a smaller file leaves
/// nothing to read.
pub const CANARY_MIN_BYTES: u64 = 4096;

/// Why the canary's FILE cannot be read, found before any GPU or tracing work (each of these
/// once ended as "no usable GPU" on a host without one, or waited on a FIFO forever).
#[derive(Debug, thiserror::Error)]
pub enum CanaryFileError {
    #[error("--canary {}: {source} (fix: give a readable file of at least {CANARY_MIN_BYTES} bytes on the file system to test)", path.display())]
    Open {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("--canary {}: {kind}, not a regular file (fix: give a file of at least {CANARY_MIN_BYTES} bytes on the file system to test)", path.display())]
    NotAFile {
        path: std::path::PathBuf,
        kind: &'static str,
    },
    #[error("--canary {}: {size} bytes, less than the {CANARY_MIN_BYTES} a canary read needs (one aligned block)", path.display())]
    TooSmall { path: std::path::PathBuf, size: u64 },
}

/// What a non-regular file is, for [`CanaryFileError::NotAFile`].
fn file_kind(t: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt as _;
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else {
        "not a file"
    }
}

/// Checks FILE before anything else: it exists, is a regular file this process may read, and
/// holds at least one block. Opened with `O_NONBLOCK` so a FIFO is refused, not waited on.
pub fn check_file(path: &std::path::Path) -> Result<u64, CanaryFileError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|source| CanaryFileError::Open {
            path: path.into(),
            source,
        })?;
    let meta = file.metadata().map_err(|source| CanaryFileError::Open {
        path: path.into(),
        source,
    })?;
    if !meta.is_file() {
        return Err(CanaryFileError::NotAFile {
            path: path.into(),
            kind: file_kind(meta.file_type()),
        });
    }
    if meta.len() < CANARY_MIN_BYTES {
        return Err(CanaryFileError::TooSmall {
            path: path.into(),
            size: meta.len(),
        });
    }
    Ok(meta.len())
}

/// The prediction for GPU `gpu`: the gds path's mode where the probe says it is possible, else
/// compat with the first reason gds is blocked.
fn predict(gpu: u32) -> (String, String) {
    let report = Report::collect(&HostRoot::new("/"));
    let Some(v) = report.verdicts.iter().find(|v| v.gpu == gpu) else {
        return ("compat".into(), format!("the probe found no GPU {gpu}"));
    };
    match v.gds_mode {
        Some(GdsMode::NvidiaFs) => ("nvfs".into(), "nvidia-fs is loaded and usable".into()),
        Some(GdsMode::P2pdma) => ("p2pdma".into(), "the kernel's P2PDMA is configured".into()),
        None => (
            "compat".into(),
            v.blocked
                .iter()
                .find(|b| b.path == DataPath::Gds)
                .map_or_else(|| "no GDS path".into(), |b| b.reason.clone()),
        ),
    }
}

pub fn run(file: &std::path::Path, gpu_ordinal: u32, json: bool) -> Result<()> {
    check_file(file)?;
    let (predicted, predicted_why) = predict(gpu_ordinal);
    let me = std::process::id();
    let tracer = UringTracer::start(&TraceOptions {
        pid: Some(me),
        ..Default::default()
    })
    .context("the canary traces itself with the agent's programs")?;
    let layers = tracer.layers();
    if !layers.is_on(Layer::Cufile) {
        let why = layers
            .get(Layer::Cufile)
            .map_or("no cuFile layer", |e| &e.why);
        bail!("cuFile tracing is off here: {why}");
    }
    let gpu = Gpu::open(gpu_ordinal).with_context(|| format!("opening GPU {gpu_ordinal}"))?;
    // Loads libcufile (dlopen) and opens the driver as configured: neither forced into compat
    // mode nor refused it, so cuFile takes the path it would take for any application.
    let driver = Driver::open(&gpu, Mode::Gds)?;
    for change in tracer.refresh_cufile_pids(&[me]) {
        tracing::info!("{change}");
    }
    let attached = tracer
        .cufile_libraries()
        .0
        .iter()
        .any(|l| l.pids.contains(&me));
    if !attached {
        bail!(
            "the canary could not trace its own libcufile: {:?}",
            tracer.cufile_libraries().1
        );
    }
    let source = Source::open(file, Direct::Auto)?;
    let len = CANARY_BYTES.min(source.size);
    let len = len - len % source.align.max(1);
    if len == 0 {
        bail!("{} is too small for a canary read", file.display());
    }
    let handle = Handle::register(&driver, &source)?;
    let dst = gpu.alloc(len as usize)?;
    let t = Instant::now();
    let n = handle.read(&dst, len as usize, 0)?;
    let read_ms = t.elapsed().as_secs_f64() * 1e3;
    // The model's view of this process: the same decoding `/debug/cufile` serves.
    let report = CufileReport::collect(&tracer)?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&source.file);
    let me_row = report.processes.iter().find(|p| p.pid == me);
    let (traced, traced_detail) = match me_row.and_then(|p| p.files.iter().find(|f| f.fd == fd)) {
        None => (
            "unknown".to_owned(),
            "the tracer saw no call on the file".to_owned(),
        ),
        Some(f) => {
            let c = &f.counters;
            (
                c.main_path().unwrap_or("unknown").to_owned(),
                format!(
                    "{} read call(s), {} I/O(s) beneath linked ({} bytes), {} nvidia-fs ioctl(s)",
                    c.read_calls,
                    c.compat_ios,
                    c.compat_bytes,
                    me_row.map_or(0, |p| p.counters.nvfs_ios)
                ),
            )
        }
    };
    drop(handle);
    drop(driver);
    let report = CanaryReport {
        file: file.display().to_string(),
        gpu: gpu_ordinal,
        bytes_read: n as u64,
        read_ms,
        agree: traced == predicted,
        predicted,
        predicted_why,
        traced,
        traced_detail,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "canary: {} bytes of {} into GPU {} in {:.1} ms\n  predicted: {} ({})\n  traced:    {} ({})\n  {}",
            report.bytes_read,
            report.file,
            report.gpu,
            report.read_ms,
            report.predicted,
            report.predicted_why,
            report.traced,
            report.traced_detail,
            if report.agree {
                "agree"
            } else {
                "DISAGREE: cuFile did not take the path the configuration predicts"
            }
        );
    }
    if !report.agree {
        bail!(
            "the canary read went {} where the probe predicts {}",
            report.traced,
            report.predicted
        );
    }
    Ok(())
}
