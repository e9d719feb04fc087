//! Fuzzes the NVMe passthrough validator and encoder (`gds-user/crates/gds-nvme/src/{cmd,geometry,error,
//! status}.rs`): arbitrary namespace geometry and an arbitrary Read/Write/Flush/Identify
//! request go through the typed builders, and completion `res` values through the decoder.
//!
//! Properties:
//! - nothing panics (overflow checks are on in fuzz builds);
//! - an accepted command lies inside the namespace (LBA range, MDTS, buffer size, alignment) and
//!   its 72-byte `struct nvme_uring_cmd` carries every field at the kernel's offset;
//! - a refused one is refused with the variant of the first limit broken, in the validator's
//!   documented order, and its message names the device;
//! - completions decode consistently (negative = errno, zero = success, positive = a non-zero
//!   NVMe status) and every status has a name.
//!
//! gds-nvme is used as a crate (it builds no eBPF, CUDA bindings or tokio), so the
//! fuzz build does not drag in the agent's eBPF build.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

use gds_nvme::cmd::{
    IDENTIFY_DATA_LEN, MAX_IOVECS, NvmeFlushCmd, NvmeIdentifyCmd, NvmeReadCmd, NvmeUringCmd,
    NvmeWriteCmd, UringCmdOp, opcode,
};
use gds_nvme::error::{MAX_BLOCKS_PER_COMMAND, NvmeError};
use gds_nvme::geometry::{
    GeometrySource, IdentifyController, IdentifyNamespace, NamespaceGeometry, block_name_for,
    controller_device_for,
};
use gds_nvme::status::{CompletionOutcome, NvmeStatus, errno_hint};

/// LBA size: usually a real one (512 B..64 KiB), sometimes anything at all.
#[derive(Arbitrary, Debug)]
enum LbaSize {
    Shift(u8),
    Raw(u32),
}

/// Maximum transfer: from an MDTS value the way Identify reports it, or a raw byte count (what
/// sysfs' max_hw_sectors_kb gives).
#[derive(Arbitrary, Debug)]
enum MaxTransfer {
    Mdts(u8),
    Bytes(u64),
}

/// DMA alignment: a power of two (what the kernel publishes) or anything.
#[derive(Arbitrary, Debug)]
enum Alignment {
    Pow2(u8),
    Raw(u32),
}

#[derive(Arbitrary, Debug)]
struct Geometry {
    nsid: u32,
    lba: LbaSize,
    capacity_blocks: u64,
    max_transfer: MaxTransfer,
    alignment: Alignment,
}

#[derive(Arbitrary, Debug)]
enum Data {
    /// A flat buffer; `len` None = exactly blocks x LBA size (so validation gets further).
    Buffer { addr: u64, len: Option<u64> },
    /// Scatter/gather segments (addr, len); `exact` resizes the last one so the total matches.
    Iovecs { segs: Vec<(u64, u64)>, exact: bool },
}

#[derive(Arbitrary, Debug)]
enum Request {
    Read {
        lba: u64,
        blocks: u32,
        data: Data,
        fua: bool,
        timeout_ms: u64,
    },
    Write {
        lba: u64,
        blocks: u32,
        data: Data,
        fua: bool,
        timeout_ms: u64,
    },
    /// A read whose LBA range ends at or just around the capacity.
    ReadAtEnd {
        back: u16,
        blocks: u32,
        addr: u64,
    },
    Flush,
    Identify {
        controller: bool,
        addr: u64,
        len: u64,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    geometry: Geometry,
    request: Request,
    /// Completion: `res` and the CQE result.
    res: i32,
    result: u64,
    /// Bytes of Identify Namespace/Controller data (zero-padded to 4096) and a device name.
    ns_page: Vec<u8>,
    ctrl_page: Vec<u8>,
    name: String,
}

const DEVICE: &str = "/dev/ng7n3";

fn geometry(g: &Geometry) -> NamespaceGeometry {
    let lba_size = match g.lba {
        LbaSize::Shift(s) => 1u32 << (9 + u32::from(s) % 8),
        LbaSize::Raw(v) => v,
    };
    let max_transfer_bytes = match g.max_transfer {
        MaxTransfer::Mdts(mdts) => {
            let mut page = [0u8; 4096];
            page[77] = mdts;
            IdentifyController::parse(&page).max_transfer_bytes()
        }
        MaxTransfer::Bytes(b) => b,
    };
    let dma_alignment = match g.alignment {
        Alignment::Pow2(s) => 1u32 << (s % 16),
        Alignment::Raw(v) => v,
    };
    NamespaceGeometry {
        device: DEVICE.into(),
        nsid: g.nsid,
        lba_size,
        metadata_size: 0,
        capacity_blocks: g.capacity_blocks,
        max_transfer_bytes,
        dma_alignment,
        source: GeometrySource::Sysfs,
    }
}

/// What the validator must say, in its documented order (cmd.rs `check_encodable` then
/// `check_geometry`): the name of the expected variant, or None for "accepted".
fn expected(
    g: &NamespaceGeometry,
    lba: u64,
    blocks: u32,
    addr: u64,
    data_len: u64,
    iov: Option<&[libc::iovec]>,
) -> Option<&'static str> {
    if blocks == 0 {
        return Some("ZeroBlocks");
    }
    if blocks > MAX_BLOCKS_PER_COMMAND {
        return Some("TooManyBlocks");
    }
    if let Some(iov) = iov
        && (iov.is_empty() || iov.len() > MAX_IOVECS)
    {
        return Some("Data");
    }
    if data_len > u64::from(u32::MAX) {
        return Some("TransferTooLarge");
    }
    match lba.checked_add(u64::from(blocks)) {
        Some(end) if end <= g.capacity_blocks => {}
        _ => return Some("LbaOutOfRange"),
    }
    if u128::from(data_len) != u128::from(blocks) * u128::from(g.lba_size) {
        return Some("DataLenMismatch");
    }
    let align = u64::from(g.dma_alignment.max(1));
    match iov {
        Some(iov) => {
            let aligned = iov.iter().all(|v| {
                (v.iov_base as u64).is_multiple_of(align)
                    && (v.iov_len as u64).is_multiple_of(align)
            });
            if !aligned {
                return Some("MisalignedSegments");
            }
        }
        None => {
            if !addr.is_multiple_of(align) {
                return Some("MisalignedBuffer");
            }
        }
    }
    if g.max_transfer_bytes != 0 && data_len > g.max_transfer_bytes {
        return Some("TransferTooLarge");
    }
    None
}

fn variant(e: &NvmeError) -> &'static str {
    match e {
        NvmeError::ZeroBlocks { .. } => "ZeroBlocks",
        NvmeError::TooManyBlocks { .. } => "TooManyBlocks",
        NvmeError::LbaOutOfRange { .. } => "LbaOutOfRange",
        NvmeError::DataLenMismatch { .. } => "DataLenMismatch",
        NvmeError::MisalignedBuffer { .. } => "MisalignedBuffer",
        NvmeError::MisalignedSegments { .. } => "MisalignedSegments",
        NvmeError::TransferTooLarge { .. } => "TransferTooLarge",
        NvmeError::Data { .. } => "Data",
        _ => "other",
    }
}

fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}

fn le64(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

/// The SQE command area holds the struct at the kernel's offsets (`<linux/nvme_ioctl.h>`).
fn check_layout(cmd: &NvmeUringCmd) {
    let b = cmd.to_sqe_cmd();
    assert_eq!(b[0], cmd.opcode);
    assert_eq!(b[1], cmd.flags);
    assert_eq!(u16::from_le_bytes([b[2], b[3]]), cmd.rsvd1);
    assert_eq!(le32(&b, 4), cmd.nsid);
    assert_eq!(le32(&b, 8), cmd.cdw2);
    assert_eq!(le32(&b, 12), cmd.cdw3);
    assert_eq!(le64(&b, 16), cmd.metadata);
    assert_eq!(le64(&b, 24), cmd.addr);
    assert_eq!(le32(&b, 32), cmd.metadata_len);
    assert_eq!(le32(&b, 36), cmd.data_len);
    assert_eq!(le32(&b, 40), cmd.cdw10);
    assert_eq!(le32(&b, 44), cmd.cdw11);
    assert_eq!(le32(&b, 48), cmd.cdw12);
    assert_eq!(le32(&b, 52), cmd.cdw13);
    assert_eq!(le32(&b, 56), cmd.cdw14);
    assert_eq!(le32(&b, 60), cmd.cdw15);
    assert_eq!(le32(&b, 64), cmd.timeout_ms);
    assert_eq!(le32(&b, 68), cmd.rsvd2);
    assert_eq!(&b[72..], &[0u8; 8]);
}

#[allow(clippy::too_many_arguments)]
fn check_rw(
    g: &NamespaceGeometry,
    is_read: bool,
    lba: u64,
    blocks: u32,
    data: &Data,
    fua: bool,
    timeout_ms: u64,
) {
    let mut iovecs: Vec<libc::iovec>;
    let (addr, data_len, iov) = match data {
        Data::Buffer { addr, len } => {
            let len = len.unwrap_or(u64::from(blocks).wrapping_mul(u64::from(g.lba_size)));
            // usize is 64 bits on every target this runs on.
            (*addr, len, None)
        }
        Data::Iovecs { segs, exact } => {
            iovecs = segs
                .iter()
                .map(|&(base, len)| libc::iovec {
                    iov_base: base as *mut libc::c_void,
                    iov_len: len as usize,
                })
                .collect();
            if *exact && let Some((last, rest)) = iovecs.split_last_mut() {
                let others: u64 = rest
                    .iter()
                    .fold(0u64, |a, v| a.wrapping_add(v.iov_len as u64));
                let want = u64::from(blocks) * u64::from(g.lba_size);
                last.iov_len = want.wrapping_sub(others) as usize;
            }
            // Lengths that sum past 2^64 are simply too large a transfer.
            let total = iovecs
                .iter()
                .fold(0u64, |a, v| a.saturating_add(v.iov_len as u64));
            (iovecs.as_ptr() as u64, total, Some(iovecs.as_slice()))
        }
    };
    let timeout = Duration::from_millis(timeout_ms);
    let (built, unchecked) = if is_read {
        let mut b = NvmeReadCmd::new(g.nsid, lba, blocks)
            .fua(fua)
            .timeout(timeout);
        b = match iov {
            Some(iov) => b.iovecs(iov),
            None => b.buffer(addr as *mut u8, data_len as usize),
        };
        (b.build(g), b.build_unchecked())
    } else {
        let mut b = NvmeWriteCmd::new(g.nsid, lba, blocks)
            .fua(fua)
            .timeout(timeout);
        b = match iov {
            Some(iov) => b.iovecs(iov),
            None => b.buffer(addr as *const u8, data_len as usize),
        };
        (b.build(g), b.build_unchecked())
    };
    let want = expected(g, lba, blocks, addr, data_len, iov);
    let op_name = if is_read { "read" } else { "write" };
    match (&built, want) {
        (Ok(cmd), None) => {
            // Inside the namespace and the controller's limits.
            assert!(blocks >= 1 && blocks <= MAX_BLOCKS_PER_COMMAND);
            assert!(lba + u64::from(blocks) <= g.capacity_blocks);
            assert_eq!(data_len, u64::from(blocks) * u64::from(g.lba_size));
            assert!(g.max_transfer_bytes == 0 || data_len <= g.max_transfer_bytes);
            // Encoded where the kernel reads it.
            assert_eq!(
                cmd.opcode,
                if is_read { opcode::READ } else { opcode::WRITE }
            );
            assert_eq!(cmd.nsid, g.nsid);
            assert_eq!(cmd.addr, addr);
            match iov {
                Some(iov) => assert_eq!(cmd.data_len as usize, iov.len()),
                None => assert_eq!(u64::from(cmd.data_len), data_len),
            }
            assert_eq!(cmd.slba(), lba);
            assert_eq!(cmd.cdw10, lba as u32);
            assert_eq!(cmd.cdw11, (lba >> 32) as u32);
            assert_eq!(cmd.cdw12 & 0xffff, blocks - 1);
            assert_eq!(cmd.blocks(), blocks);
            assert_eq!(cmd.cdw12 >> 30 & 1, u32::from(fua));
            assert_eq!(
                cmd.cdw12 & !(0xffff | 1 << 30),
                0,
                "reserved CDW12 bits set"
            );
            assert_eq!(
                u64::from(cmd.timeout_ms),
                timeout_ms.min(u64::from(u32::MAX))
            );
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
            check_layout(cmd);
            let io = if iov.is_some() {
                UringCmdOp::IoVec
            } else {
                UringCmdOp::Io
            };
            assert_eq!(cmd.op_name(io), op_name);
            // Unchecked encoding of an accepted command is the same command.
            assert_eq!(unchecked.as_ref().ok(), Some(cmd));
        }
        (Err(e), Some(want)) => {
            assert_eq!(variant(e), want, "refused with {e:?}, expected {want}");
            assert!(e.is_validation() || want == "Data", "{e:?}");
            let msg = e.to_string();
            assert!(msg.contains(DEVICE), "{msg}");
            match e {
                NvmeError::ZeroBlocks { op, .. }
                | NvmeError::TooManyBlocks { op, .. }
                | NvmeError::LbaOutOfRange { op, .. }
                | NvmeError::DataLenMismatch { op, .. }
                | NvmeError::MisalignedBuffer { op, .. }
                | NvmeError::MisalignedSegments { op, .. }
                | NvmeError::TransferTooLarge { op, .. } => assert_eq!(*op, op_name),
                _ => {}
            }
            if let NvmeError::LbaOutOfRange {
                lba: l,
                blocks: n,
                capacity,
                ..
            } = e
            {
                assert_eq!(
                    (*l, *n, *capacity),
                    (lba, u64::from(blocks), g.capacity_blocks)
                );
            }
            if let NvmeError::TransferTooLarge { bytes, limit, .. } = e {
                assert_eq!(*bytes, data_len);
                assert!(bytes > limit);
            }
            if let NvmeError::DataLenMismatch { data_len: d, .. } = e {
                assert_eq!(*d, data_len);
            }
            // Unchecked refuses only what cannot be encoded.
            match want {
                "ZeroBlocks" | "TooManyBlocks" | "Data" => assert!(unchecked.is_err()),
                "TransferTooLarge" if data_len > u64::from(u32::MAX) => {
                    assert!(unchecked.is_err())
                }
                _ => {
                    let cmd = unchecked.expect("encodable command refused by build_unchecked");
                    assert_eq!(cmd.slba(), lba);
                    assert_eq!(cmd.blocks(), blocks);
                    check_layout(&cmd);
                }
            }
        }
        (got, want) => panic!("validator said {got:?}, expected {want:?} for {g:?}"),
    }
}

fn check_geometry(g: &NamespaceGeometry) {
    let max = g.max_blocks_per_command();
    assert!((1..=MAX_BLOCKS_PER_COMMAND).contains(&max));
    if g.max_transfer_bytes >= u64::from(g.lba_size) && g.lba_size > 0 {
        assert!(u64::from(max) * u64::from(g.lba_size) <= g.max_transfer_bytes);
    }
    assert!(g.capacity_bytes() >= g.capacity_blocks || g.lba_size == 0);
}

fn page(bytes: &[u8]) -> [u8; 4096] {
    let mut p = [0u8; 4096];
    let n = bytes.len().min(4096);
    p[..n].copy_from_slice(&bytes[..n]);
    p
}

fn check_identify(input: &Input) {
    let ns = IdentifyNamespace::parse(&page(&input.ns_page));
    let ctrl = IdentifyController::parse(&page(&input.ctrl_page));
    assert!(!ns.lba_formats.is_empty() && ns.lba_formats.len() <= 64);
    let mt = ctrl.max_transfer_bytes();
    assert!(mt == 0 || (mt.is_power_of_two() && mt >= 8192));
    match NamespaceGeometry::from_identify(DEVICE, 3, &ns, &ctrl) {
        Ok(g) => {
            assert!(g.lba_size.is_power_of_two() && (512..=65536).contains(&g.lba_size));
            assert_eq!(g.capacity_blocks, ns.nsze);
            assert_eq!(g.max_transfer_bytes, mt);
            check_geometry(&g);
            // The largest command the geometry allows at LBA 0 is accepted when it fits.
            let blocks = g.max_blocks_per_command();
            let len = u64::from(blocks) * u64::from(g.lba_size);
            if u64::from(blocks) <= g.capacity_blocks && (mt == 0 || len <= mt) {
                let r = NvmeReadCmd::new(3, 0, blocks)
                    .buffer(4096 as *mut u8, len as usize)
                    .build(&g);
                assert!(r.is_ok(), "{r:?}");
            }
        }
        Err(e) => {
            assert!(matches!(e, NvmeError::Geometry { .. }), "{e:?}");
            assert!(e.to_string().contains(DEVICE));
        }
    }
    if let Some(block) = block_name_for(&input.name) {
        assert!(block.starts_with("nvme"));
        let ctrl = controller_device_for(&input.name).expect("namespace without controller");
        assert!(ctrl.starts_with("/dev/nvme"));
        assert!(
            block.starts_with(&format!("{}n", &ctrl[5..])),
            "{block} vs {ctrl}"
        );
    }
}

fn check_completion(res: i32, result: u64) {
    let outcome = CompletionOutcome::decode(res, result);
    match outcome {
        CompletionOutcome::Success { result: r } => {
            assert_eq!(res, 0);
            assert_eq!(r, result);
        }
        CompletionOutcome::Errno(errno) => {
            assert!(res < 0);
            assert!(errno > 0, "errno {errno} from res {res}");
            let (name, hint) = errno_hint(errno);
            assert!(!name.is_empty() && !hint.is_empty());
            let e = NvmeError::Kernel {
                device: DEVICE.into(),
                op: "read",
                lba: result,
                blocks: 1,
                errno,
            };
            assert!(e.to_string().contains(DEVICE));
            assert_eq!(e.errno(), Some(errno));
        }
        CompletionOutcome::Device(status) => {
            assert!(res > 0);
            // A failed command never decodes to a status that reads as success: the kernel's
            // status bits are kept (bit 15 and above-16-bit values included, saturated).
            assert_ne!(status.0, 0, "res {res:#x} decoded as {status:?}");
            if res <= 0x7fff {
                assert_eq!(i32::from(status.0), res);
            } else {
                assert!(
                    status.0 & 0x8000 != 0 || status.0 == u16::MAX,
                    "{res:#x} {status:?}"
                );
            }
            if res > 0xffff {
                assert!(!status.is_success(), "res {res:#x} decoded as {status:?}");
            }
            assert!(!status.name().is_empty());
            assert!(status.sct_bits() <= 7 && status.crd() <= 3);
            let shown = status.to_string();
            assert!(shown.starts_with(status.name()), "{shown}");
            let e = NvmeError::Device {
                device: DEVICE.into(),
                op: "write",
                lba: 0,
                blocks: 0,
                status,
            };
            assert_eq!(e.nvme_status(), Some(status));
            assert!(e.to_string().contains(DEVICE));
        }
    }
    // Every 16-bit status has a name and a Display.
    let st = NvmeStatus(result as u16);
    assert!(!st.name().is_empty() && !format!("{st:?}").is_empty());
}

fuzz_target!(|input: Input| {
    let g = geometry(&input.geometry);
    check_geometry(&g);
    match &input.request {
        Request::Read {
            lba,
            blocks,
            data,
            fua,
            timeout_ms,
        } => check_rw(&g, true, *lba, *blocks, data, *fua, *timeout_ms),
        Request::Write {
            lba,
            blocks,
            data,
            fua,
            timeout_ms,
        } => check_rw(&g, false, *lba, *blocks, data, *fua, *timeout_ms),
        Request::ReadAtEnd { back, blocks, addr } => {
            let lba = g.capacity_blocks.saturating_sub(u64::from(*back));
            let data = Data::Buffer {
                addr: *addr,
                len: None,
            };
            check_rw(&g, true, lba, *blocks, &data, false, 0)
        }
        Request::Flush => {
            let cmd = NvmeFlushCmd::new(g.nsid).build();
            assert_eq!(
                cmd,
                NvmeUringCmd {
                    opcode: opcode::FLUSH,
                    nsid: g.nsid,
                    ..Default::default()
                }
            );
            assert_eq!(cmd.op_name(UringCmdOp::Io), "flush");
            check_layout(&cmd);
        }
        Request::Identify {
            controller,
            addr,
            len,
        } => {
            let b = if *controller {
                NvmeIdentifyCmd::controller()
            } else {
                NvmeIdentifyCmd::namespace(g.nsid)
            };
            match b.buffer(*addr as *mut u8, *len as usize).build() {
                Ok(cmd) => {
                    assert_eq!(*len, u64::from(IDENTIFY_DATA_LEN));
                    assert_eq!(cmd.opcode, opcode::IDENTIFY);
                    assert_eq!(cmd.addr, *addr);
                    assert_eq!(cmd.data_len, IDENTIFY_DATA_LEN);
                    assert_eq!(cmd.cdw10, u32::from(*controller)); // CNS 01h controller, 00h namespace
                    assert_eq!(cmd.nsid, if *controller { 0 } else { g.nsid });
                    assert_eq!(cmd.op_name(UringCmdOp::Admin), "identify");
                    check_layout(&cmd);
                }
                Err(e) => {
                    assert_ne!(*len, u64::from(IDENTIFY_DATA_LEN));
                    assert!(matches!(e, NvmeError::DataLenMismatch { .. }), "{e:?}");
                    assert!(!e.to_string().is_empty());
                }
            }
        }
    }
    check_completion(input.res, input.result);
    check_identify(&input);
});
