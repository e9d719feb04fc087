//! Typed errors of the data path: each names the source, the route and what to do.

use std::path::PathBuf;

use gds_probe::DataPath;

/// One reason a route cannot be taken (from the probe's blockers or from the request).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Why {
    pub reason: String,
    pub action: String,
}

impl std::fmt::Display for Why {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.action.is_empty() {
            write!(f, "{}", self.reason)
        } else {
            write!(f, "{} (fix: {})", self.reason, self.action)
        }
    }
}

fn join(whys: &[Why]) -> String {
    whys.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("open {path}: {source}{hint}")]
    Open {
        path: PathBuf,
        hint: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: range {offset}+{len} is outside the source ({size} bytes)")]
    Range {
        path: PathBuf,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error("{path}: {what} must be a multiple of {align} bytes for O_DIRECT (got {value})")]
    Alignment {
        path: PathBuf,
        what: &'static str,
        value: u64,
        align: u64,
    },
    #[error("{path}: unexpected end of data at byte {offset} (wanted {wanted} more bytes)")]
    ShortRead {
        path: PathBuf,
        offset: u64,
        wanted: u64,
    },
    #[error("--path {path} is not possible: {}", join(.why))]
    RouteImpossible { path: &'static str, why: Vec<Why> },
    #[error("no usable GPU: {0}")]
    NoGpu(String),
    #[error("CUDA {what}: {detail}")]
    Cuda { what: &'static str, detail: String },
    #[error("cuFile {what}: {detail}")]
    Cufile { what: &'static str, detail: String },
    #[error("NVMe passthrough: {0}")]
    Nvme(#[from] gds_nvme::NvmeError),
    #[error("p2pmem {path}: {what}")]
    P2pMem { path: PathBuf, what: String },
    #[error(
        "verify failed: the bytes at {offset}..{end} of {path} differ from the data brought back \
         (xxh3 {expected:016x} in the source, {actual:016x} at the destination)"
    )]
    Verify {
        path: PathBuf,
        offset: u64,
        end: u64,
        expected: u64,
        actual: u64,
    },
    #[error("{0}")]
    Invalid(String),
}

impl DatapathError {
    /// The route a `DataPath` stands for in error messages.
    pub fn impossible(path: DataPath, why: Vec<Why>) -> Self {
        DatapathError::RouteImpossible {
            path: path.as_str(),
            why,
        }
    }

    pub fn cuda(what: &'static str, err: impl std::fmt::Debug) -> Self {
        DatapathError::Cuda {
            what,
            detail: format!("{err:?}"),
        }
    }
}

pub type Result<T, E = DatapathError> = std::result::Result<T, E>;
