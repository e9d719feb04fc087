//! One error type for NVMe passthrough: every variant names the device, the limit that was hit
//! and what to do about it.

use std::io;

use thiserror::Error;

use super::status::{NvmeStatus, errno_hint};

/// Largest number of logical blocks one NVMe Read/Write can carry: NLB is a 16-bit zero-based
/// field in CDW12 bits 15:0.
pub const MAX_BLOCKS_PER_COMMAND: u32 = 65_536;

#[derive(Debug, Error)]
pub enum NvmeError {
    #[error(
        "{device}: a {op} of zero blocks is not a command (NLB is zero-based); ask for 1 or more"
    )]
    ZeroBlocks { device: String, op: &'static str },

    #[error(
        "{device}: {op} of {blocks} blocks exceeds the NVMe limit of 65,536 blocks per command \
         (NLB is 16 bits); split it into several commands"
    )]
    TooManyBlocks {
        device: String,
        op: &'static str,
        blocks: u32,
    },

    #[error(
        "{device}: {op} of LBA {lba}..{end} is past the namespace capacity of {capacity} blocks \
         (last LBA {last}); stay below LBA {capacity}",
        end = lba.saturating_add(*blocks),
        last = capacity.saturating_sub(1)
    )]
    LbaOutOfRange {
        device: String,
        op: &'static str,
        lba: u64,
        blocks: u64,
        capacity: u64,
    },

    #[error(
        "{device}: {op} buffer is {data_len} bytes but {blocks} blocks x {lba_size} bytes = \
         {expected}; size the buffer to the blocks requested",
        expected = u64::from(*blocks) * u64::from(*lba_size)
    )]
    DataLenMismatch {
        device: String,
        op: &'static str,
        data_len: u64,
        blocks: u32,
        lba_size: u32,
    },

    #[error(
        "{device}: {op} buffer at {addr:#x} is not aligned to the device's DMA alignment of \
         {alignment} bytes (queue/dma_alignment); allocate it aligned (e.g. DmaBuffer)"
    )]
    MisalignedBuffer {
        device: String,
        op: &'static str,
        addr: u64,
        alignment: u32,
    },

    #[error(
        "{device}: {op}: an iovec segment's address or length is not a multiple of the device's \
         DMA alignment of {alignment} bytes; align every segment"
    )]
    MisalignedSegments {
        device: String,
        op: &'static str,
        alignment: u32,
    },

    #[error(
        "{device}: {op} of {bytes} bytes exceeds the controller's maximum transfer of {limit} \
         bytes (MDTS / max_hw_sectors_kb); split it into commands of at most {limit} bytes"
    )]
    TransferTooLarge {
        device: String,
        op: &'static str,
        bytes: u64,
        limit: u64,
    },

    #[error("{device}: {what}, not an NVMe namespace's generic char device (fix: {fix})")]
    NotANamespace {
        device: String,
        what: String,
        fix: String,
    },

    #[error("{device}: namespace geometry unavailable: {reason}")]
    Geometry { device: String, reason: String },

    // The io::Error is part of the message (not a `source`), so that `{}` alone says why and
    // `{:#}` does not say it twice.
    #[error("{device}: cannot open: {io}; {hint}")]
    Open {
        device: String,
        hint: &'static str,
        io: io::Error,
    },

    #[error("{device}: io_uring {what} failed: {io}")]
    Ring {
        device: String,
        what: &'static str,
        io: io::Error,
    },

    #[error(
        "{device}: kernel failed {op}{range} with {name} ({errno}): {hint}",
        range = range(*lba, *blocks),
        name = errno_hint(*errno).0,
        hint = errno_hint(*errno).1
    )]
    Kernel {
        device: String,
        op: &'static str,
        lba: u64,
        blocks: u32,
        errno: i32,
    },

    #[error(
        "{device}: controller completed {op}{range} with {status}",
        range = range(*lba, *blocks)
    )]
    Device {
        device: String,
        op: &'static str,
        lba: u64,
        blocks: u32,
        status: NvmeStatus,
    },

    #[error("{device}: {what}")]
    Data { device: String, what: String },
}

/// " (LBA l, n blocks)" for commands that address blocks, "" for the others.
fn range(lba: u64, blocks: u32) -> String {
    if blocks == 0 {
        String::new()
    } else {
        format!(" (LBA {lba}, {blocks} blocks)")
    }
}

impl NvmeError {
    /// The NVMe status if the controller rejected the command.
    pub fn nvme_status(&self) -> Option<NvmeStatus> {
        match self {
            Self::Device { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The errno if the kernel failed the command.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Kernel { errno, .. } => Some(*errno),
            _ => None,
        }
    }

    /// True for the errors the validator raises before anything is submitted.
    pub fn is_validation(&self) -> bool {
        matches!(
            self,
            Self::ZeroBlocks { .. }
                | Self::TooManyBlocks { .. }
                | Self::LbaOutOfRange { .. }
                | Self::DataLenMismatch { .. }
                | Self::MisalignedBuffer { .. }
                | Self::MisalignedSegments { .. }
                | Self::TransferTooLarge { .. }
        )
    }
}
