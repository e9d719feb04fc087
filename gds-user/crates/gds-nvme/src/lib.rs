//! NVMe passthrough over io_uring (`IORING_OP_URING_CMD` on `/dev/ngXnY`).
//!
//! [`cmd`] encodes `struct nvme_uring_cmd` with typed, validating builders; [`geometry`] says
//! what the namespace allows; [`ring`] submits through an SQE128|CQE32 ring, with registered
//! buffers and batching; [`status`] decodes completions; [`stream`] keeps a queue depth of
//! reads in flight; [`cli`] is `gds-agent read`. Nothing here depends on tracing.

pub mod buffer;
pub mod cli;
pub mod cmd;
pub mod error;
pub mod geometry;
pub mod ring;
pub mod status;
pub mod stream;

pub use buffer::DmaBuffer;
pub use cmd::{
    NVME_URING_CMD_ADMIN, NVME_URING_CMD_IO, NVME_URING_CMD_IO_VEC, NvmeFlushCmd, NvmeIdentifyCmd,
    NvmeReadCmd, NvmeUringCmd, NvmeWriteCmd, UringCmdOp,
};
pub use error::{MAX_BLOCKS_PER_COMMAND, NvmeError};
pub use geometry::NamespaceGeometry;
pub use ring::{NvmeCompletion, NvmeRing, namespace_geometry};
pub use status::{CompletionOutcome, NvmeStatus};
pub use stream::{StreamOptions, StreamStats, stream_read};
