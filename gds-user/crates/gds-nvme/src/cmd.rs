//! Typed builders for `struct nvme_uring_cmd`, the 72-byte payload of an `IORING_OP_URING_CMD`
//! on an NVMe char device (`<linux/nvme_ioctl.h>`, stable since 5.19).
//!
//! Layout and ioctl numbers are checked against the installed kernel header by a test that
//! compiles a C program (`layout_matches_kernel_header`). The `cmd_op` (ioctl number) goes in the
//! SQE, not in this payload; the kernel builds PRPs/SGLs from `addr`/`data_len` itself.

use std::time::Duration;

use super::error::{MAX_BLOCKS_PER_COMMAND, NvmeError};
use super::geometry::NamespaceGeometry;

/// `_IOWR('N', 0x80, struct nvme_uring_cmd)`: I/O command, `addr`/`data_len` a flat buffer.
pub const NVME_URING_CMD_IO: u32 = ioc_readwrite(b'N', 0x80, 72);
/// `_IOWR('N', 0x81, struct nvme_uring_cmd)`: I/O command, `addr` an iovec array, `data_len`
/// its count.
pub const NVME_URING_CMD_IO_VEC: u32 = ioc_readwrite(b'N', 0x81, 72);
/// `_IOWR('N', 0x82, struct nvme_uring_cmd)`: admin command; only on the controller char
/// device `/dev/nvmeX`.
pub const NVME_URING_CMD_ADMIN: u32 = ioc_readwrite(b'N', 0x82, 72);
/// `_IOWR('N', 0x83, struct nvme_uring_cmd)`.
pub const NVME_URING_CMD_ADMIN_VEC: u32 = ioc_readwrite(b'N', 0x83, 72);

/// Linux `_IOC(_IOC_READ|_IOC_WRITE, ty, nr, size)` for x86/arm (dir bits 31:30, size 29:16).
const fn ioc_readwrite(ty: u8, nr: u8, size: u32) -> u32 {
    (3 << 30) | (size << 16) | ((ty as u32) << 8) | nr as u32
}

/// NVM command set and admin opcodes used here.
pub mod opcode {
    pub const FLUSH: u8 = 0x00;
    pub const WRITE: u8 = 0x01;
    pub const READ: u8 = 0x02;
    /// Admin.
    pub const IDENTIFY: u8 = 0x06;
}

/// Identify CNS values.
pub mod cns {
    pub const NAMESPACE: u8 = 0x00;
    pub const CONTROLLER: u8 = 0x01;
}

/// Size of the data an Identify command returns.
pub const IDENTIFY_DATA_LEN: u32 = 4096;

/// Which uring command (ioctl number) a payload is submitted with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UringCmdOp {
    Io,
    IoVec,
    Admin,
}

impl UringCmdOp {
    pub fn ioctl(self) -> u32 {
        match self {
            Self::Io => NVME_URING_CMD_IO,
            Self::IoVec => NVME_URING_CMD_IO_VEC,
            Self::Admin => NVME_URING_CMD_ADMIN,
        }
    }
}

/// `struct nvme_uring_cmd`, field for field.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NvmeUringCmd {
    pub opcode: u8,
    pub flags: u8,
    pub rsvd1: u16,
    pub nsid: u32,
    pub cdw2: u32,
    pub cdw3: u32,
    pub metadata: u64,
    pub addr: u64,
    pub metadata_len: u32,
    pub data_len: u32,
    pub cdw10: u32,
    pub cdw11: u32,
    pub cdw12: u32,
    pub cdw13: u32,
    pub cdw14: u32,
    pub cdw15: u32,
    pub timeout_ms: u32,
    pub rsvd2: u32,
}

const _: () = assert!(size_of::<NvmeUringCmd>() == 72);

impl NvmeUringCmd {
    /// The payload as the 80 bytes of an SQE128's command area (the last 8 stay zero).
    pub fn to_sqe_cmd(&self) -> [u8; 80] {
        let mut out = [0u8; 80];
        // SAFETY: NvmeUringCmd is repr(C), 72 bytes, no padding (all fields naturally aligned,
        // checked by the layout test), so every byte is initialised.
        let bytes: &[u8; 72] = unsafe { &*(self as *const Self as *const [u8; 72]) };
        out[..72].copy_from_slice(bytes);
        out
    }

    /// Starting LBA of a Read/Write (CDW10/11).
    pub fn slba(&self) -> u64 {
        u64::from(self.cdw10) | (u64::from(self.cdw11) << 32)
    }

    /// Number of blocks of a Read/Write (NLB is zero-based in CDW12 15:0).
    pub fn blocks(&self) -> u32 {
        (self.cdw12 & 0xffff) + 1
    }

    /// A short name for logs and errors, given how it is submitted.
    pub fn op_name(&self, op: UringCmdOp) -> &'static str {
        match (op, self.opcode) {
            (UringCmdOp::Admin, opcode::IDENTIFY) => "identify",
            (UringCmdOp::Admin, _) => "admin command",
            (_, opcode::READ) => "read",
            (_, opcode::WRITE) => "write",
            (_, opcode::FLUSH) => "flush",
            _ => "I/O command",
        }
    }
}

/// What a Read or Write builder carries before encoding.
#[derive(Clone, Copy, Debug)]
struct RwFields {
    opcode: u8,
    nsid: u32,
    lba: u64,
    blocks: u32,
    addr: u64,
    data_len: u64,
    /// Vectored (NVME_URING_CMD_IO_VEC): `addr` is the iovec array, `data_len` above the sum
    /// of its lengths.
    iov: Option<IovSummary>,
    fua: bool,
    timeout_ms: u32,
}

/// What validation needs to know about an iovec array, taken while it was borrowed.
#[derive(Clone, Copy, Debug)]
struct IovSummary {
    count: u32,
    /// Greatest common divisor of every segment's address and length (0 if all are 0): an
    /// alignment divides all of them iff it divides this. (An OR of the bits only answers
    /// that for powers of two, and a geometry's `dma_alignment` may be any number.)
    gcd: u64,
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// The kernel's limit on iovecs per vectored command (UIO_MAXIOV).
pub const MAX_IOVECS: usize = 1024;

impl RwFields {
    fn op(&self) -> &'static str {
        if self.opcode == opcode::READ {
            "read"
        } else {
            "write"
        }
    }

    /// Limits that make a command unencodable, whatever the device.
    fn check_encodable(&self, device: &str) -> Result<(), NvmeError> {
        if self.blocks == 0 {
            return Err(NvmeError::ZeroBlocks {
                device: device.to_string(),
                op: self.op(),
            });
        }
        if self.blocks > MAX_BLOCKS_PER_COMMAND {
            return Err(NvmeError::TooManyBlocks {
                device: device.to_string(),
                op: self.op(),
                blocks: self.blocks,
            });
        }
        if let Some(iov) = self.iov
            && (iov.count == 0 || iov.count as usize > MAX_IOVECS)
        {
            return Err(NvmeError::Data {
                device: device.to_string(),
                what: format!(
                    "{} with {} iovecs: a vectored command takes 1..={MAX_IOVECS}",
                    self.op(),
                    iov.count
                ),
            });
        }
        if self.data_len > u64::from(u32::MAX) {
            return Err(NvmeError::TransferTooLarge {
                device: device.to_string(),
                op: self.op(),
                bytes: self.data_len,
                limit: u64::from(u32::MAX),
            });
        }
        Ok(())
    }

    fn check_geometry(&self, g: &NamespaceGeometry) -> Result<(), NvmeError> {
        let device = g.device.as_str();
        self.check_encodable(device)?;
        let op = self.op();
        let end = self.lba.checked_add(u64::from(self.blocks));
        if end.is_none_or(|end| end > g.capacity_blocks) {
            return Err(NvmeError::LbaOutOfRange {
                device: device.to_string(),
                op,
                lba: self.lba,
                blocks: u64::from(self.blocks),
                capacity: g.capacity_blocks,
            });
        }
        let expected = u64::from(self.blocks) * u64::from(g.lba_size);
        if self.data_len != expected {
            return Err(NvmeError::DataLenMismatch {
                device: device.to_string(),
                op,
                data_len: self.data_len,
                blocks: self.blocks,
                lba_size: g.lba_size,
            });
        }
        let align = u64::from(g.dma_alignment.max(1));
        if let Some(iov) = self.iov {
            if !iov.gcd.is_multiple_of(align) {
                return Err(NvmeError::MisalignedSegments {
                    device: device.to_string(),
                    op,
                    alignment: g.dma_alignment,
                });
            }
        } else if !self.addr.is_multiple_of(align) {
            return Err(NvmeError::MisalignedBuffer {
                device: device.to_string(),
                op,
                addr: self.addr,
                alignment: g.dma_alignment,
            });
        }
        if g.max_transfer_bytes != 0 && self.data_len > g.max_transfer_bytes {
            return Err(NvmeError::TransferTooLarge {
                device: device.to_string(),
                op,
                bytes: self.data_len,
                limit: g.max_transfer_bytes,
            });
        }
        Ok(())
    }

    fn encode(&self) -> NvmeUringCmd {
        let nlb = self.blocks - 1;
        NvmeUringCmd {
            opcode: self.opcode,
            nsid: self.nsid,
            addr: self.addr,
            data_len: match self.iov {
                Some(iov) => iov.count,
                None => self.data_len as u32,
            },
            cdw10: self.lba as u32,
            cdw11: (self.lba >> 32) as u32,
            // NLB 15:0 (zero-based), FUA bit 30. DTYPE/PRINFO/LR stay zero.
            cdw12: (nlb & 0xffff) | (u32::from(self.fua) << 30),
            timeout_ms: self.timeout_ms,
            ..NvmeUringCmd::default()
        }
    }
}

macro_rules! rw_builder {
    ($(#[$doc:meta])* $name:ident, $opcode:expr, $ptr:ty) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug)]
        pub struct $name(RwFields);

        impl $name {
            /// `blocks` is the count of logical blocks (1..=65,536), not the zero-based NLB.
            pub fn new(nsid: u32, lba: u64, blocks: u32) -> Self {
                Self(RwFields {
                    opcode: $opcode,
                    nsid,
                    lba,
                    blocks,
                    addr: 0,
                    data_len: 0,
                    iov: None,
                    fua: false,
                    timeout_ms: 0,
                })
            }

            /// The data buffer. Only the address and length are recorded; the buffer must stay
            /// valid until the command completes (the ring's `push` is `unsafe` for that).
            pub fn buffer(mut self, ptr: $ptr, len: usize) -> Self {
                self.0.addr = ptr as u64;
                self.0.data_len = len as u64;
                self.0.iov = None;
                self
            }

            /// Scatter/gather the data over `iovecs`; submit the result with
            /// [`UringCmdOp::IoVec`] (the kernel then reads `addr` as the iovec array and
            /// `data_len` as its count). The array and every segment must stay valid until the
            /// command completes.
            pub fn iovecs(mut self, iovecs: &[libc::iovec]) -> Self {
                self.0.addr = iovecs.as_ptr() as u64;
                // Saturating: lengths summing past 2^64 must be refused as too large a
                // transfer, not panic (debug) or wrap to a small, valid-looking total.
                self.0.data_len = iovecs
                    .iter()
                    .fold(0u64, |acc, v| acc.saturating_add(v.iov_len as u64));
                self.0.iov = Some(IovSummary {
                    count: iovecs.len().min(u32::MAX as usize) as u32,
                    gcd: iovecs.iter().fold(0, |acc, v| {
                        gcd(gcd(acc, v.iov_base as u64), v.iov_len as u64)
                    }),
                });
                self
            }

            /// Force Unit Access.
            pub fn fua(mut self, fua: bool) -> Self {
                self.0.fua = fua;
                self
            }

            /// Per-command timeout for the driver (0 = the driver's default).
            pub fn timeout(mut self, timeout: Duration) -> Self {
                self.0.timeout_ms = timeout.as_millis().min(u128::from(u32::MAX)) as u32;
                self
            }

            /// Validate against the namespace and encode. Never panics; every refusal is an
            /// [`NvmeError`] naming the device and the limit.
            pub fn build(self, geometry: &NamespaceGeometry) -> Result<NvmeUringCmd, NvmeError> {
                self.0.check_geometry(geometry)?;
                Ok(self.0.encode())
            }

            /// Encode without checking the namespace (capacity, buffer size, alignment, MDTS):
            /// for tests that need the controller or the kernel to do the refusing. Refuses
            /// only what cannot be encoded (zero or more than 65,536 blocks).
            pub fn build_unchecked(self) -> Result<NvmeUringCmd, NvmeError> {
                self.0.check_encodable("(unvalidated)")?;
                Ok(self.0.encode())
            }
        }
    };
}

rw_builder!(
    /// NVM Read (opcode 0x02).
    NvmeReadCmd,
    opcode::READ,
    *mut u8
);
rw_builder!(
    /// NVM Write (opcode 0x01).
    NvmeWriteCmd,
    opcode::WRITE,
    *const u8
);

/// NVM Flush (opcode 0x00): commits the volatile write cache of the namespace.
#[derive(Clone, Copy, Debug)]
pub struct NvmeFlushCmd {
    nsid: u32,
}

impl NvmeFlushCmd {
    pub fn new(nsid: u32) -> Self {
        Self { nsid }
    }

    pub fn build(self) -> NvmeUringCmd {
        NvmeUringCmd {
            opcode: opcode::FLUSH,
            nsid: self.nsid,
            ..NvmeUringCmd::default()
        }
    }
}

/// Admin Identify (opcode 0x06), submitted with [`UringCmdOp::Admin`] on `/dev/nvmeX`.
#[derive(Clone, Copy, Debug)]
pub struct NvmeIdentifyCmd {
    cns: u8,
    nsid: u32,
    addr: u64,
    len: u64,
}

impl NvmeIdentifyCmd {
    /// Identify Controller (CNS 01h).
    pub fn controller() -> Self {
        Self {
            cns: cns::CONTROLLER,
            nsid: 0,
            addr: 0,
            len: 0,
        }
    }

    /// Identify Namespace (CNS 00h) for `nsid`.
    pub fn namespace(nsid: u32) -> Self {
        Self {
            cns: cns::NAMESPACE,
            nsid,
            addr: 0,
            len: 0,
        }
    }

    /// The 4096-byte buffer the controller fills.
    pub fn buffer(mut self, ptr: *mut u8, len: usize) -> Self {
        self.addr = ptr as u64;
        self.len = len as u64;
        self
    }

    pub fn build(self) -> Result<NvmeUringCmd, NvmeError> {
        if self.len != u64::from(IDENTIFY_DATA_LEN) {
            return Err(NvmeError::DataLenMismatch {
                device: "(identify)".to_string(),
                op: "identify",
                data_len: self.len,
                blocks: 1,
                lba_size: IDENTIFY_DATA_LEN,
            });
        }
        Ok(NvmeUringCmd {
            opcode: opcode::IDENTIFY,
            nsid: self.nsid,
            addr: self.addr,
            data_len: IDENTIFY_DATA_LEN,
            cdw10: u32::from(self.cns),
            ..NvmeUringCmd::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geometry::GeometrySource;

    fn geom() -> NamespaceGeometry {
        NamespaceGeometry {
            device: "/dev/ng0n1".into(),
            nsid: 1,
            lba_size: 512,
            metadata_size: 0,
            capacity_blocks: 1 << 20,
            max_transfer_bytes: 512 * 1024,
            dma_alignment: 4,
            source: GeometrySource::Sysfs,
        }
    }

    #[test]
    fn read_encodes_fields_where_the_kernel_reads_them() {
        let mut buf = vec![0u8; 8 * 512];
        let lba = 0x1_2345_6789u64;
        let mut g = geom();
        g.capacity_blocks = 1 << 40;
        let cmd = NvmeReadCmd::new(1, lba, 8)
            .buffer(buf.as_mut_ptr(), buf.len())
            .timeout(Duration::from_secs(3))
            .build(&g)
            .unwrap();
        assert_eq!(cmd.opcode, 0x02);
        assert_eq!(cmd.nsid, 1);
        assert_eq!(cmd.addr, buf.as_ptr() as u64);
        assert_eq!(cmd.data_len, 4096);
        assert_eq!(cmd.metadata_len, 0);
        assert_eq!(cmd.cdw10, 0x2345_6789);
        assert_eq!(cmd.cdw11, 0x1);
        assert_eq!(cmd.cdw12, 7);
        assert_eq!(cmd.timeout_ms, 3000);
        assert_eq!((cmd.slba(), cmd.blocks()), (lba, 8));
        let b = cmd.to_sqe_cmd();
        assert_eq!(b[0], 0x02);
        assert_eq!(&b[24..32], &(buf.as_ptr() as u64).to_ne_bytes());
        assert_eq!(
            &b[32..36],
            &[0; 4],
            "metadata_len must stay zero (seed bug 1)"
        );
        assert_eq!(&b[36..40], &4096u32.to_ne_bytes());
        assert_eq!(&b[64..68], &3000u32.to_ne_bytes());
        assert_eq!(&b[72..80], &[0; 8]);
    }

    #[test]
    fn nlb_is_sixteen_bits_and_fua_is_bit_30() {
        let g = NamespaceGeometry {
            max_transfer_bytes: 0,
            ..geom()
        };
        let mut buf = vec![0u8; 65_536 * 512];
        let cmd = NvmeWriteCmd::new(1, 0, 65_536)
            .buffer(buf.as_mut_ptr(), buf.len())
            .fua(true)
            .build(&g)
            .unwrap();
        assert_eq!(cmd.opcode, 0x01);
        assert_eq!(cmd.cdw12, 0xffff | (1 << 30));
        assert_eq!(cmd.blocks(), 65_536);
    }

    #[test]
    fn validation_refuses_without_panicking() {
        let g = geom();
        let mut buf = vec![0u8; 4096 + 8];
        let p = buf.as_mut_ptr();
        let e = NvmeReadCmd::new(1, 0, 0)
            .buffer(p, 0)
            .build(&g)
            .unwrap_err();
        assert!(matches!(e, NvmeError::ZeroBlocks { .. }), "{e}");
        let e = NvmeReadCmd::new(1, 0, 65_537).build(&g).unwrap_err();
        assert!(
            matches!(e, NvmeError::TooManyBlocks { blocks: 65_537, .. }),
            "{e}"
        );
        // Seed bug 3: 65,537 blocks must not spill into CDW12's upper bits, even unchecked.
        assert!(NvmeReadCmd::new(1, 0, 65_537).build_unchecked().is_err());
        let e = NvmeReadCmd::new(1, g.capacity_blocks - 7, 8)
            .buffer(p, 4096)
            .build(&g)
            .unwrap_err();
        assert!(matches!(e, NvmeError::LbaOutOfRange { .. }), "{e}");
        assert!(e.to_string().contains("/dev/ng0n1"), "{e}");
        let e = NvmeReadCmd::new(1, u64::MAX, 1)
            .buffer(p, 512)
            .build(&g)
            .unwrap_err();
        assert!(matches!(e, NvmeError::LbaOutOfRange { .. }), "{e}");
        // The last 8 blocks are fine.
        NvmeReadCmd::new(1, g.capacity_blocks - 8, 8)
            .buffer(p, 4096)
            .build(&g)
            .unwrap();
        let e = NvmeReadCmd::new(1, 0, 8)
            .buffer(p, 4095)
            .build(&g)
            .unwrap_err();
        assert!(
            matches!(e, NvmeError::DataLenMismatch { data_len: 4095, .. }),
            "{e}"
        );
        let misaligned = unsafe { p.add(1) };
        let e = NvmeReadCmd::new(1, 0, 8)
            .buffer(misaligned, 4096)
            .build(&g)
            .unwrap_err();
        assert!(
            matches!(e, NvmeError::MisalignedBuffer { alignment: 4, .. }),
            "{e}"
        );
        let mut big = vec![0u8; 1024 * 1024];
        let e = NvmeReadCmd::new(1, 0, 2048)
            .buffer(big.as_mut_ptr(), big.len())
            .build(&g)
            .unwrap_err();
        assert!(
            matches!(e, NvmeError::TransferTooLarge { limit: 524_288, .. }),
            "{e}"
        );
        assert!(e.is_validation());
        // build_unchecked lets a past-capacity command through for the controller to refuse.
        let cmd = NvmeReadCmd::new(1, g.capacity_blocks, 1)
            .buffer(p, 512)
            .build_unchecked()
            .unwrap();
        assert_eq!(cmd.slba(), g.capacity_blocks);
    }

    #[test]
    fn vectored_read_encodes_the_iovec_array() {
        let g = geom();
        let mut a = crate::DmaBuffer::new(4096);
        let mut b = crate::DmaBuffer::new(4096);
        let iov = [a.iovec(), b.iovec()];
        let cmd = NvmeReadCmd::new(1, 16, 16).iovecs(&iov).build(&g).unwrap();
        assert_eq!(cmd.addr, iov.as_ptr() as u64);
        assert_eq!(cmd.data_len, 2, "data_len is the iovec count for _IO_VEC");
        assert_eq!(cmd.cdw12, 15);
        // Total bytes must still match blocks x LBA size.
        let e = NvmeReadCmd::new(1, 16, 17)
            .iovecs(&iov)
            .build(&g)
            .unwrap_err();
        assert!(
            matches!(e, NvmeError::DataLenMismatch { data_len: 8192, .. }),
            "{e}"
        );
        // A segment whose length breaks the DMA alignment is refused.
        let odd = [
            libc::iovec {
                iov_base: a.as_mut_ptr().cast(),
                iov_len: 4094,
            },
            libc::iovec {
                iov_base: b.as_mut_ptr().wrapping_add(2).cast(),
                iov_len: 4098,
            },
        ];
        let e = NvmeReadCmd::new(1, 16, 16)
            .iovecs(&odd)
            .build(&g)
            .unwrap_err();
        assert!(
            matches!(e, NvmeError::MisalignedSegments { alignment: 4, .. }),
            "{e}"
        );
        let e = NvmeReadCmd::new(1, 16, 16)
            .iovecs(&[])
            .build(&g)
            .unwrap_err();
        assert!(e.to_string().contains("0 iovecs"), "{e}");
    }

    /// Found by the `nvme_command` fuzz target: iovec lengths summing past 2^64 overflowed the
    /// total (a panic in debug builds, a small wrapped total in release).
    #[test]
    fn iovec_lengths_past_u64_are_too_large_not_a_panic() {
        let iov = [
            libc::iovec {
                iov_base: 0xddde_dd00_0000_dddd_u64 as *mut libc::c_void,
                iov_len: 0xffff_ffff_ffff_ffdd,
            },
            libc::iovec {
                iov_base: 0xddde_dd00_0000_dddd_u64 as *mut libc::c_void,
                iov_len: 14_540_253,
            },
        ];
        let e = NvmeReadCmd::new(1, 0, 8)
            .iovecs(&iov)
            .build(&geom())
            .unwrap_err();
        assert!(
            matches!(
                e,
                NvmeError::TransferTooLarge {
                    bytes: u64::MAX,
                    ..
                }
            ),
            "{e}"
        );
        assert!(
            NvmeReadCmd::new(1, 0, 8)
                .iovecs(&iov)
                .build_unchecked()
                .is_err()
        );
    }

    /// Found by the `nvme_command` fuzz target: with a DMA alignment that is not a power of
    /// two, OR-ing the segments' bits let misaligned segments through (and refused aligned
    /// ones).
    #[test]
    fn segment_alignment_holds_for_any_alignment() {
        let mut g = geom();
        g.lba_size = 16384;
        g.capacity_blocks = 1 << 40;
        g.max_transfer_bytes = 0;
        g.dma_alignment = u32::MAX;
        // u64::MAX is a multiple of 2^32-1, the length (9 x 2^22) is not; their OR is.
        let iov = [libc::iovec {
            iov_base: u64::MAX as *mut libc::c_void,
            iov_len: 2304 * 16384,
        }];
        let e = NvmeReadCmd::new(1, 0, 2304)
            .iovecs(&iov)
            .build(&g)
            .unwrap_err();
        assert!(matches!(e, NvmeError::MisalignedSegments { .. }), "{e}");
        // Alignment 3: every address and length is a multiple of 3, their OR (775) is not.
        g.lba_size = 512;
        g.dma_alignment = 3;
        let iov = [
            libc::iovec {
                iov_base: 3 as *mut libc::c_void,
                iov_len: 768,
            },
            libc::iovec {
                iov_base: 6 as *mut libc::c_void,
                iov_len: 768,
            },
        ];
        assert!(NvmeReadCmd::new(1, 0, 3).iovecs(&iov).build(&g).is_ok());
    }

    #[test]
    fn reserved_fields_stay_zero() {
        let mut buf = vec![0u8; 512];
        let cmd = NvmeWriteCmd::new(1, 5, 1)
            .buffer(buf.as_mut_ptr(), 512)
            .build(&geom())
            .unwrap();
        assert_eq!(
            (
                cmd.flags,
                cmd.rsvd1,
                cmd.cdw2,
                cmd.cdw3,
                cmd.metadata,
                cmd.metadata_len
            ),
            (0, 0, 0, 0, 0, 0)
        );
        assert_eq!((cmd.cdw13, cmd.cdw14, cmd.cdw15, cmd.rsvd2), (0, 0, 0, 0));
    }

    /// Arbitrary (including absurd) inputs give a command or an error, never a panic.
    #[test]
    fn never_panics_on_arbitrary_input() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let edges = [
            0u64,
            1,
            7,
            8,
            511,
            512,
            4096,
            65_535,
            65_536,
            65_537,
            u32::MAX as u64,
            u64::MAX,
        ];
        let pick = |r: u64| -> u64 {
            if r.is_multiple_of(3) {
                edges[(r / 3) as usize % edges.len()]
            } else {
                r
            }
        };
        for _ in 0..20_000 {
            let g = NamespaceGeometry {
                device: "/dev/ngXnY".into(),
                nsid: next() as u32,
                lba_size: pick(next()) as u32,
                metadata_size: 0,
                capacity_blocks: pick(next()),
                max_transfer_bytes: pick(next()),
                dma_alignment: pick(next()) as u32,
                source: GeometrySource::Sysfs,
            };
            let (lba, blocks, addr, len) = (
                pick(next()),
                pick(next()) as u32,
                pick(next()),
                pick(next()),
            );
            let r = NvmeReadCmd::new(g.nsid, lba, blocks)
                .buffer(addr as *mut u8, len as usize)
                .build(&g);
            if let Ok(cmd) = r {
                // Anything accepted fits the namespace and the command format.
                assert!(cmd.slba() + u64::from(cmd.blocks()) <= g.capacity_blocks);
                assert_eq!(
                    u64::from(cmd.data_len),
                    u64::from(blocks) * u64::from(g.lba_size)
                );
            }
            let _ = NvmeWriteCmd::new(g.nsid, lba, blocks)
                .buffer(addr as *const u8, len as usize)
                .build_unchecked();
            let _ = g.max_blocks_per_command();
            let _ = g.capacity_bytes();
        }
    }

    /// Found by the `nvme_command` fuzz target: with 64 KiB blocks and no MDTS, the largest
    /// command a geometry allows must still be encodable (data_len is a u32).
    #[test]
    fn largest_command_of_64k_blocks_builds() {
        let mut big = geom();
        big.lba_size = 65_536;
        big.max_transfer_bytes = 0;
        let max = big.max_blocks_per_command();
        assert!(
            NvmeReadCmd::new(1, 0, max)
                .buffer(4096 as *mut u8, max as usize * 65_536)
                .build(&big)
                .is_ok()
        );
    }

    #[test]
    fn flush_and_identify() {
        let f = NvmeFlushCmd::new(3).build();
        assert_eq!((f.opcode, f.nsid, f.addr, f.data_len), (0, 3, 0, 0));
        let mut id = vec![0u8; 4096];
        let c = NvmeIdentifyCmd::controller()
            .buffer(id.as_mut_ptr(), id.len())
            .build()
            .unwrap();
        assert_eq!((c.opcode, c.cdw10, c.data_len, c.nsid), (0x06, 1, 4096, 0));
        let n = NvmeIdentifyCmd::namespace(2)
            .buffer(id.as_mut_ptr(), id.len())
            .build()
            .unwrap();
        assert_eq!((n.cdw10, n.nsid), (0, 2));
        assert!(NvmeIdentifyCmd::namespace(2).build().is_err());
        assert_eq!(c.op_name(UringCmdOp::Admin), "identify");
    }

    /// Compiles a C program against the installed <linux/nvme_ioctl.h> and compares every
    /// field offset, the struct size and the ioctl numbers with the Rust side.
    #[test]
    fn layout_matches_kernel_header() {
        use std::mem::offset_of;
        use std::process::Command;

        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("layout.c");
        let bin = dir.path().join("layout");
        let fields = [
            "opcode",
            "flags",
            "rsvd1",
            "nsid",
            "cdw2",
            "cdw3",
            "metadata",
            "addr",
            "metadata_len",
            "data_len",
            "cdw10",
            "cdw11",
            "cdw12",
            "cdw13",
            "cdw14",
            "cdw15",
            "timeout_ms",
            "rsvd2",
        ];
        let mut c = String::from(
            "#include <stdio.h>\n#include <stddef.h>\n#include <linux/ioctl.h>\n#include <linux/nvme_ioctl.h>\n\
             int main(void) {\n\
             printf(\"sizeof %zu\\n\", sizeof(struct nvme_uring_cmd));\n",
        );
        for f in fields {
            c.push_str(&format!(
                "printf(\"{f} %zu %zu\\n\", offsetof(struct nvme_uring_cmd, {f}), \
                 sizeof(((struct nvme_uring_cmd *)0)->{f}));\n"
            ));
        }
        for m in [
            "NVME_URING_CMD_IO",
            "NVME_URING_CMD_IO_VEC",
            "NVME_URING_CMD_ADMIN",
            "NVME_URING_CMD_ADMIN_VEC",
        ] {
            c.push_str(&format!("printf(\"{m} %lu\\n\", (unsigned long){m});\n"));
        }
        c.push_str("return 0; }\n");
        std::fs::write(&src, c).unwrap();
        let out = Command::new("gcc")
            .arg("-o")
            .arg(&bin)
            .arg(&src)
            .output()
            .expect("gcc must be installed (the layout test needs the kernel header)");
        assert!(
            out.status.success(),
            "gcc failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = Command::new(&bin).output().unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        let c_side: std::collections::HashMap<&str, Vec<u64>> = text
            .lines()
            .map(|l| {
                let mut it = l.split_whitespace();
                let k = it.next().unwrap();
                (k, it.map(|v| v.parse().unwrap()).collect())
            })
            .collect();

        macro_rules! field {
            ($f:ident) => {{
                let probe = NvmeUringCmd::default();
                (
                    stringify!($f),
                    offset_of!(NvmeUringCmd, $f) as u64,
                    size_of_val(&probe.$f) as u64,
                )
            }};
        }
        let rust = [
            field!(opcode),
            field!(flags),
            field!(rsvd1),
            field!(nsid),
            field!(cdw2),
            field!(cdw3),
            field!(metadata),
            field!(addr),
            field!(metadata_len),
            field!(data_len),
            field!(cdw10),
            field!(cdw11),
            field!(cdw12),
            field!(cdw13),
            field!(cdw14),
            field!(cdw15),
            field!(timeout_ms),
            field!(rsvd2),
        ];
        assert_eq!(rust.len(), fields.len());
        for (name, off, size) in rust {
            assert_eq!(
                c_side[name],
                vec![off, size],
                "field {name}: C (offset, size) vs Rust"
            );
        }
        assert_eq!(c_side["sizeof"], vec![size_of::<NvmeUringCmd>() as u64]);
        assert_eq!(
            c_side["NVME_URING_CMD_IO"],
            vec![u64::from(NVME_URING_CMD_IO)]
        );
        assert_eq!(
            c_side["NVME_URING_CMD_IO_VEC"],
            vec![u64::from(NVME_URING_CMD_IO_VEC)]
        );
        assert_eq!(
            c_side["NVME_URING_CMD_ADMIN"],
            vec![u64::from(NVME_URING_CMD_ADMIN)]
        );
        assert_eq!(
            c_side["NVME_URING_CMD_ADMIN_VEC"],
            vec![u64::from(NVME_URING_CMD_ADMIN_VEC)]
        );
        assert_eq!(NVME_URING_CMD_IO, 0xc048_4e80);
    }
}
