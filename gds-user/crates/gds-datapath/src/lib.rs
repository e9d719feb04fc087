//! The data path: stream a file, block device or NVMe namespace into GPU (or host) memory by
//! the best route the host offers, and prove each byte arrived.
//!
//! [`source`] opens what is read (O_DIRECT, alignment); [`route`] picks the route (the probe's
//! verdict, or an explicit `--path` with a typed error naming why it is impossible); the routes
//! are [`bounce`] (io_uring into pinned host memory, overlapped async copies to the GPU; with a
//! host destination it is the raw io_uring ceiling), [`cufile`] (cuFile: GDS, or compat mode),
//! [`naive`] (read() + cuMemcpy, a floor) and [`p2p`] (NVMe passthrough into a peer PCI BAR
//! mapped into the process); [`pcie`] measures the pinned host→device copy rate (the other
//! half of the bounce ceiling); [`verify`] hashes both ends; [`metrics`] exports the pipeline
//! counters while a command runs; [`cli`] and [`bench`] are `gds-agent read` and `bench`.

pub mod bench;
pub mod bounce;
pub mod cli;
pub mod cuda;
pub mod cufile;
pub mod error;
pub mod metrics;
pub mod naive;
pub mod p2p;
pub mod pcie;
pub mod route;
pub mod source;
pub mod verify;

pub use error::{DatapathError, Why};
pub use route::Route;
pub use source::{ByteRange, Direct, Source, SourceKind};
