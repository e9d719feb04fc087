//! NVMe passthrough scenarios (issue 3). The guest has the controllers the host harness
//! configures (xtask/src/vm.rs, `GuestMachine::standard`): serial `gds-main` with namespace 1
//! (512-byte LBAs) and namespace 2 (4096-byte LBAs), and serial `gds-slow` (throttled).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use gds_nvme::geometry::NamespaceGeometry;
use gds_nvme::{
    DmaBuffer, NvmeError, NvmeFlushCmd, NvmeIdentifyCmd, NvmeReadCmd, NvmeRing, NvmeStatus,
    NvmeUringCmd, NvmeWriteCmd, StreamOptions, UringCmdOp, namespace_geometry, stream_read,
};

use crate::util::{check_pattern, fill_pattern, read_block, run, write_pattern_block};
use crate::{Ctx, Scenario};

pub const MAIN_SERIAL: &str = "gds-main";
/// The controller whose drive QEMU throttles (`throttling.iops-total=50`).
pub const SLOW_SERIAL: &str = "gds-slow";

pub fn scenarios() -> Vec<Scenario> {
    let s = Scenario::new;
    vec![
        s(
            "nvme.identify-matches-sysfs",
            "Identify (admin passthrough on /dev/nvmeX) agrees with sysfs geometry",
            60,
            identify_matches_sysfs,
        ),
        s(
            "nvme.pattern.qd1.plain",
            "pattern written via block device reads back via /dev/ng passthrough, QD 1",
            120,
            |c| pattern(c, 1, 1, false, 4 << 20, 8),
        ),
        s(
            "nvme.pattern.qd1.fixed",
            "same, QD 1, registered buffers (IORING_URING_CMD_FIXED)",
            120,
            |c| pattern(c, 1, 1, true, 4 << 20, 8),
        ),
        s(
            "nvme.pattern.qd32.plain",
            "same, QD 32, 128 KiB commands",
            120,
            |c| pattern(c, 1, 32, false, 32 << 20, 256),
        ),
        s(
            "nvme.pattern.qd32.fixed",
            "same, QD 32, registered buffers",
            120,
            |c| pattern(c, 1, 32, true, 32 << 20, 256),
        ),
        s(
            "nvme.pattern.4k-lba.qd8.fixed",
            "namespace 2 (4096-byte LBAs), QD 8, registered buffers",
            120,
            |c| pattern(c, 2, 8, true, 8 << 20, 16),
        ),
        s(
            "nvme.pattern.vectored.qd8",
            "same, NVME_URING_CMD_IO_VEC: each 64 KiB read scattered over 16 permuted segments",
            120,
            pattern_vectored,
        ),
        s(
            "nvme.validator-refuses",
            "out-of-range LBA and the other invalid commands are refused before submission",
            60,
            validator_refuses,
        ),
        s(
            "nvme.controller-rejects-lba-out-of-range",
            "an unvalidated read past capacity comes back as NVMe status LBA Out of Range",
            60,
            controller_rejects_lba,
        ),
        s(
            "nvme.controller-rejects-invalid-namespace",
            "Identify/Read of a nonexistent namespace come back decoded",
            60,
            controller_rejects_nsid,
        ),
        s(
            "nvme.kernel-rejects-above-mdts",
            "an unvalidated read above max_hw_sectors comes back as a decoded errno",
            60,
            kernel_rejects_mdts,
        ),
        s(
            "nvme.write-flush-passthrough",
            "batched passthrough writes + flush are read back through the block device",
            120,
            write_flush_passthrough,
        ),
        s(
            "nvme.cli-read",
            "gds-agent read (one command, --stream, refusal) against the block device",
            120,
            cli_read,
        ),
        s(
            "nvme.throttled-controller-is-slow",
            "QD 1 reads on the throttled controller take >= 10 ms each, on the main one less",
            60,
            throttled_is_slow,
        ),
        s(
            "nvme.throughput-vs-fio",
            "streaming read throughput vs fio io_uring_cmd and dd O_DIRECT, same namespace",
            300,
            throughput,
        ),
    ]
}

/// Paths of one namespace, found by controller serial and NSID (instance numbers depend on
/// probe order, serials do not).
pub struct Ns {
    pub ng: String,
    pub blk: String,
    pub ctrl: String,
}

pub fn find_ns(serial: &str, nsid: u32) -> Result<Ns> {
    for entry in std::fs::read_dir("/sys/class/nvme").context("/sys/class/nvme")? {
        let dir = entry?.path();
        let ctrl = dir.file_name().unwrap().to_string_lossy().into_owned();
        let s = std::fs::read_to_string(dir.join("serial")).unwrap_or_default();
        if s.trim() != serial {
            continue;
        }
        for sub in std::fs::read_dir(&dir)? {
            let sub = sub?.path();
            let name = sub.file_name().unwrap().to_string_lossy().into_owned();
            if !name.starts_with(&format!("{ctrl}n")) {
                continue;
            }
            let id = std::fs::read_to_string(sub.join("nsid")).unwrap_or_default();
            if id.trim().parse::<u32>().ok() == Some(nsid) {
                let ns = Ns {
                    ng: format!("/dev/ng{}", &name["nvme".len()..]),
                    blk: format!("/dev/{name}"),
                    ctrl: format!("/dev/{ctrl}"),
                };
                for p in [&ns.ng, &ns.blk, &ns.ctrl] {
                    ensure!(
                        Path::new(p).exists(),
                        "{p} missing for {serial} nsid {nsid}"
                    );
                }
                return Ok(ns);
            }
        }
        bail!("controller {ctrl} (serial {serial}) has no namespace {nsid}");
    }
    bail!("no NVMe controller with serial {serial}")
}

fn main_ns(nsid: u32) -> Result<(Ns, NamespaceGeometry)> {
    let ns = find_ns(MAIN_SERIAL, nsid)?;
    let g = namespace_geometry(Path::new(&ns.ng))?;
    Ok((ns, g))
}

fn identify_matches_sysfs(c: &Ctx) -> Result<String> {
    let mut out = Vec::new();
    for nsid in [1, 2] {
        let (ns, sys) = main_ns(nsid)?;
        let mut ring = NvmeRing::open(&ns.ctrl, 4)?;
        let (ctrl, idns) = ring.identify(nsid)?;
        let id = NamespaceGeometry::from_identify(&ns.ng, nsid, &idns, &ctrl)?;
        c.detail(format!("sysfs    {sys:?}"));
        c.detail(format!("identify {id:?}"));
        c.detail(format!(
            "controller vid {:#06x} model {:?} serial {:?} fw {:?} mdts {} nn {}",
            ctrl.vid, ctrl.model, ctrl.serial, ctrl.firmware, ctrl.mdts, ctrl.nn
        ));
        ensure!(ctrl.serial == MAIN_SERIAL, "serial {:?}", ctrl.serial);
        ensure!(
            (id.nsid, id.lba_size, id.capacity_blocks)
                == (sys.nsid, sys.lba_size, sys.capacity_blocks),
            "identify ({}, {}, {}) != sysfs ({}, {}, {})",
            id.nsid,
            id.lba_size,
            id.capacity_blocks,
            sys.nsid,
            sys.lba_size,
            sys.capacity_blocks
        );
        // The kernel's limit can be lower than MDTS (driver caps), never higher.
        ensure!(
            id.max_transfer_bytes == 0 || sys.max_transfer_bytes <= id.max_transfer_bytes,
            "max_hw_sectors {} above MDTS {}",
            sys.max_transfer_bytes,
            id.max_transfer_bytes
        );
        out.push(format!(
            "ns{nsid}: {} x {} B, MDTS {} KiB, kernel max {} KiB, dma align {}",
            sys.capacity_blocks,
            sys.lba_size,
            id.max_transfer_bytes / 1024,
            sys.max_transfer_bytes / 1024,
            sys.dma_alignment
        ));
    }
    Ok(out.join("; "))
}

/// Write a pattern through the block device, read it back through passthrough at `qd` with
/// `chunk_blocks` per command, compare every byte and check every block was covered once.
fn pattern(
    c: &Ctx,
    nsid: u32,
    qd: u32,
    fixed: bool,
    bytes: u64,
    chunk_blocks: u32,
) -> Result<String> {
    let (ns, g) = main_ns(nsid)?;
    let bytes = bytes.min(g.capacity_bytes());
    // A distinct seed and offset per run, so stale data from another scenario cannot pass.
    let seed = u64::from(qd) << 32 | u64::from(fixed) << 16 | u64::from(nsid);
    let offset = (u64::from(qd) * 1024 * 1024) % (g.capacity_bytes() - bytes + 1);
    let offset = offset - offset % u64::from(g.lba_size);
    write_pattern_block(&ns.blk, offset, bytes, seed)?;
    let lba_size = u64::from(g.lba_size);
    let first = offset / lba_size;
    let blocks = bytes / lba_size;
    let mut seen = vec![false; blocks as usize];
    let mut ring = NvmeRing::open(&ns.ng, qd)?;
    let opts = StreamOptions {
        lba: first,
        blocks,
        qd,
        chunk_blocks,
        fixed,
        stall_timeout: Duration::from_secs(30),
    };
    let dev = ns.ng.clone();
    let stats = stream_read(&mut ring, &g, &opts, |lba, data| {
        check_pattern(data, lba * lba_size, seed).map_err(|e| NvmeError::Data {
            device: dev.clone(),
            what: format!("LBA {lba}: {e}"),
        })?;
        for b in (lba - first)..(lba - first + data.len() as u64 / lba_size) {
            if std::mem::replace(&mut seen[b as usize], true) {
                return Err(NvmeError::Data {
                    device: dev.clone(),
                    what: format!("LBA {} delivered twice", first + b),
                });
            }
        }
        Ok(())
    })?;
    let missing = seen.iter().filter(|s| !**s).count();
    ensure!(missing == 0, "{missing} blocks never delivered");
    ensure!(
        stats.max_in_flight == qd.min(stats.commands as u32),
        "queue depth {qd} requested but at most {} commands were outstanding",
        stats.max_in_flight
    );
    c.metric("mib_per_sec", format!("{:.1}", stats.mib_per_sec()));
    Ok(format!(
        "{} ({}-byte LBAs): {} MiB at LBA {first} verified byte for byte; {} commands of {} KiB, \
         max outstanding {} (QD {qd}){}, {:.1} MiB/s",
        ns.ng,
        g.lba_size,
        bytes >> 20,
        stats.commands,
        stats.chunk_bytes / 1024,
        stats.max_in_flight,
        if fixed { ", fixed buffers" } else { "" },
        stats.mib_per_sec()
    ))
}

fn pattern_vectored(_c: &Ctx) -> Result<String> {
    const QD: usize = 8;
    const SEGS: usize = 16;
    const SEG: usize = 4096;
    let (ns, g) = main_ns(1)?;
    let per_cmd = SEGS * SEG;
    let blocks = (per_cmd / g.lba_size as usize) as u32;
    let total: u64 = 8 << 20;
    let offset: u64 = 96 << 20;
    let seed = 0x5643_5452;
    write_pattern_block(&ns.blk, offset, total, seed)?;
    let first = offset / u64::from(g.lba_size);
    let cmds = (total / per_cmd as u64) as usize;
    // One pool of segments per slot; segment i of a command lands in buffer (i * 7) % 16, so a
    // kernel that ignored the iovec order (or read it as a flat buffer) would fail the check.
    let mut pools: Vec<Vec<DmaBuffer>> = (0..QD)
        .map(|_| (0..SEGS).map(|_| DmaBuffer::new(SEG)).collect())
        .collect();
    let iovs: Vec<Vec<libc::iovec>> = pools
        .iter_mut()
        .map(|p| (0..SEGS).map(|i| p[(i * 7) % SEGS].iovec()).collect())
        .collect();
    let mut ring = NvmeRing::open(&ns.ng, QD as u32)?;
    let mut next = 0usize;
    let mut slot_cmd: Vec<Option<(usize, NvmeUringCmd)>> = vec![None; QD];
    let mut issue = |slot: usize,
                     ring: &mut NvmeRing,
                     slot_cmd: &mut Vec<Option<(usize, NvmeUringCmd)>>|
     -> Result<()> {
        if next >= cmds {
            return Ok(());
        }
        let lba = first + (next as u64) * u64::from(blocks);
        let cmd = NvmeReadCmd::new(g.nsid, lba, blocks)
            .iovecs(&iovs[slot])
            .build(&g)?;
        // SAFETY: the iovec array and its segments live until the end of the function, after
        // every completion is reaped, and a slot is reused only after its completion.
        unsafe { ring.push(&cmd, UringCmdOp::IoVec, None, slot as u64)? };
        slot_cmd[slot] = Some((next, cmd));
        next += 1;
        Ok(())
    };
    for slot in 0..QD {
        issue(slot, &mut ring, &mut slot_cmd)?;
    }
    let mut verified = 0usize;
    let mut done = Vec::new();
    while slot_cmd.iter().any(Option::is_some) {
        done.clear();
        ring.wait_timeout(1, Duration::from_secs(30), &mut done)?;
        for d in &done {
            let slot = d.user_data as usize;
            let (idx, cmd) = slot_cmd[slot]
                .take()
                .context("completion for an idle slot")?;
            d.check(&ns.ng, &cmd, UringCmdOp::IoVec)?;
            let base = offset + (idx * per_cmd) as u64;
            for i in 0..SEGS {
                check_pattern(&pools[slot][(i * 7) % SEGS], base + (i * SEG) as u64, seed)
                    .with_context(|| format!("command {idx} segment {i}"))?;
            }
            verified += 1;
            issue(slot, &mut ring, &mut slot_cmd)?;
        }
    }
    ensure!(verified == cmds, "{verified} of {cmds} commands verified");
    Ok(format!(
        "{} MiB in {cmds} vectored reads of {SEGS} x {} KiB permuted segments at QD {QD} verified",
        total >> 20,
        SEG / 1024
    ))
}

fn validator_refuses(c: &Ctx) -> Result<String> {
    let (ns, g) = main_ns(1)?;
    let mut ring = NvmeRing::open(&ns.ng, 4)?;
    let mut buf = DmaBuffer::new(1 << 20);
    let p = buf.as_mut_ptr();
    let ls = g.lba_size as usize;
    let cap = g.capacity_blocks;
    type Case<'a> = (
        &'a str,
        Result<NvmeUringCmd, NvmeError>,
        fn(&NvmeError) -> bool,
    );
    let cases: Vec<Case> = vec![
        (
            "LBA = capacity",
            NvmeReadCmd::new(g.nsid, cap, 1).buffer(p, ls).build(&g),
            |e| matches!(e, NvmeError::LbaOutOfRange { .. }),
        ),
        (
            "range straddling the end",
            NvmeReadCmd::new(g.nsid, cap - 1, 2)
                .buffer(p, 2 * ls)
                .build(&g),
            |e| matches!(e, NvmeError::LbaOutOfRange { .. }),
        ),
        (
            "zero blocks",
            NvmeReadCmd::new(g.nsid, 0, 0).buffer(p, 0).build(&g),
            |e| matches!(e, NvmeError::ZeroBlocks { .. }),
        ),
        (
            "65,537 blocks",
            NvmeReadCmd::new(g.nsid, 0, 65_537)
                .buffer(p, 65_537 * ls)
                .build(&g),
            |e| matches!(e, NvmeError::TooManyBlocks { .. }),
        ),
        (
            "data_len != blocks x LBA size",
            NvmeReadCmd::new(g.nsid, 0, 8)
                .buffer(p, 8 * ls - 4)
                .build(&g),
            |e| matches!(e, NvmeError::DataLenMismatch { .. }),
        ),
        (
            "misaligned buffer",
            NvmeReadCmd::new(g.nsid, 0, 8)
                .buffer(p.wrapping_add(1), 8 * ls)
                .build(&g),
            |e| matches!(e, NvmeError::MisalignedBuffer { .. }),
        ),
        (
            "above MDTS",
            {
                let blocks = (g.max_transfer_bytes / ls as u64 + 1) as u32;
                NvmeReadCmd::new(g.nsid, 0, blocks)
                    .buffer(p, blocks as usize * ls)
                    .build(&g)
            },
            |e| matches!(e, NvmeError::TransferTooLarge { .. }),
        ),
    ];
    for (what, res, expected) in cases {
        match res {
            Ok(cmd) => {
                // Would be a validator bug; do not submit it, but say what got through.
                bail!("{what}: validator accepted {cmd:?}");
            }
            Err(e) => {
                ensure!(expected(&e), "{what}: wrong refusal: {e}");
                ensure!(e.is_validation(), "{what}: not a validation error: {e}");
                c.detail(format!("{what}: refused: {e}"));
            }
        }
    }
    ensure!(
        ring.submitted_total() == 0,
        "{} commands reached the kernel",
        ring.submitted_total()
    );
    // The last valid block is accepted and reads fine: the boundary is exact.
    let cmd = NvmeReadCmd::new(g.nsid, cap - 1, 1)
        .buffer(p, ls)
        .build(&g)?;
    // SAFETY: buf outlives the synchronous execute.
    unsafe { ring.execute(&cmd, UringCmdOp::Io, None)? };
    Ok(format!(
        "7 invalid commands refused with 0 submissions; LBA {} (last) read OK",
        cap - 1
    ))
}

fn controller_rejects_lba(c: &Ctx) -> Result<String> {
    let (ns, g) = main_ns(1)?;
    let mut ring = NvmeRing::open(&ns.ng, 4)?;
    let mut buf = DmaBuffer::new(2 * g.lba_size as usize);
    let mut names = Vec::new();
    for (lba, blocks) in [(g.capacity_blocks, 1u32), (g.capacity_blocks - 1, 2)] {
        let cmd = NvmeReadCmd::new(g.nsid, lba, blocks)
            .buffer(buf.as_mut_ptr(), blocks as usize * g.lba_size as usize)
            .build_unchecked()?;
        ensure!(
            NvmeReadCmd::new(g.nsid, lba, blocks)
                .buffer(buf.as_mut_ptr(), blocks as usize * g.lba_size as usize)
                .build(&g)
                .is_err(),
            "the validator should refuse LBA {lba}"
        );
        // SAFETY: buf outlives the synchronous execute.
        let res = unsafe { ring.execute(&cmd, UringCmdOp::Io, None) };
        let err = match res {
            Ok(_) => bail!(
                "read of LBA {lba}+{blocks} past capacity {} succeeded",
                g.capacity_blocks
            ),
            Err(e) => e,
        };
        c.detail(format!("LBA {lba} x{blocks}: {err}"));
        let status = err
            .nvme_status()
            .with_context(|| format!("expected an NVMe status, got: {err}"))?;
        ensure!(
            status.sct_bits() == 0 && status.sc() == NvmeStatus::LBA_OUT_OF_RANGE,
            "expected LBA Out of Range, got {status}"
        );
        ensure!(status.name() == "LBA Out of Range");
        names.push(format!("{status}"));
    }
    ensure!(ring.submitted_total() == 2);
    Ok(format!("controller said: {}", names.join(" / ")))
}

fn controller_rejects_nsid(c: &Ctx) -> Result<String> {
    let (ns, _) = main_ns(1)?;
    const BAD: u32 = 0x7777;
    // Admin Identify Namespace for an NSID above NN: the controller must refuse it.
    let mut admin = NvmeRing::open(&ns.ctrl, 2)?;
    let mut id = DmaBuffer::new(4096);
    let cmd = NvmeIdentifyCmd::namespace(BAD)
        .buffer(id.as_mut_ptr(), id.len())
        .build()?;
    // SAFETY: id outlives the synchronous execute.
    let err = match unsafe { admin.execute(&cmd, UringCmdOp::Admin, None) } {
        Ok(_) => bail!("Identify of namespace {BAD:#x} succeeded"),
        Err(e) => e,
    };
    c.detail(format!("identify nsid {BAD:#x}: {err}"));
    let st = err
        .nvme_status()
        .with_context(|| format!("expected a status: {err}"))?;
    ensure!(
        st.sc() == NvmeStatus::INVALID_NAMESPACE && st.sct_bits() == 0,
        "expected Invalid Namespace or Format, got {st}"
    );
    // An I/O read naming another namespace through /dev/ng's char device: the kernel may
    // refuse the mismatch itself or pass it on; either way it must fail and decode.
    let mut ring = NvmeRing::open(&ns.ng, 2)?;
    let mut buf = DmaBuffer::new(4096);
    let read = NvmeReadCmd::new(BAD, 0, 1)
        .buffer(buf.as_mut_ptr(), 512)
        .build_unchecked()?;
    // SAFETY: buf outlives the synchronous execute.
    let io = match unsafe { ring.execute(&read, UringCmdOp::Io, None) } {
        Ok(_) => bail!("read with nsid {BAD:#x} succeeded"),
        Err(e) => e,
    };
    c.detail(format!("read nsid {BAD:#x}: {io}"));
    let who = match (&io.nvme_status(), io.errno()) {
        (Some(st), _) => {
            ensure!(st.sc() == NvmeStatus::INVALID_NAMESPACE, "unexpected {st}");
            format!("controller: {}", st.name())
        }
        (None, Some(errno)) => format!("kernel: errno {errno}"),
        _ => bail!("undecoded failure: {io}"),
    };
    Ok(format!("identify -> {}; I/O read -> {who}", st.name()))
}

fn kernel_rejects_mdts(c: &Ctx) -> Result<String> {
    let (ns, g) = main_ns(1)?;
    let bytes = (g.max_transfer_bytes * 2).min(65_536 * u64::from(g.lba_size));
    ensure!(
        bytes > g.max_transfer_bytes,
        "MDTS already at the NLB limit"
    );
    let blocks = (bytes / u64::from(g.lba_size)) as u32;
    let mut buf = DmaBuffer::new(bytes as usize);
    let mut ring = NvmeRing::open(&ns.ng, 2)?;
    let cmd = NvmeReadCmd::new(g.nsid, 0, blocks)
        .buffer(buf.as_mut_ptr(), bytes as usize)
        .build_unchecked()?;
    // SAFETY: buf outlives the synchronous execute.
    let err = match unsafe { ring.execute(&cmd, UringCmdOp::Io, None) } {
        Ok(_) => bail!("{bytes}-byte read above max_hw_sectors succeeded"),
        Err(e) => e,
    };
    c.detail(format!("{err}"));
    ensure!(
        err.errno() == Some(libc::EINVAL),
        "expected EINVAL from the kernel, got {err}"
    );
    Ok(format!(
        "{} KiB read (limit {} KiB) -> EINVAL, decoded with hint",
        bytes / 1024,
        g.max_transfer_bytes / 1024
    ))
}

fn write_flush_passthrough(_c: &Ctx) -> Result<String> {
    let (ns, g) = main_ns(1)?;
    const CMDS: usize = 16;
    let per = 64 * 1024usize;
    let blocks = (per / g.lba_size as usize) as u32;
    let seed = 0x5752_4954_4531;
    let first = g.capacity_blocks / 2;
    let mut bufs: Vec<DmaBuffer> = (0..CMDS).map(|_| DmaBuffer::new(per)).collect();
    let mut ring = NvmeRing::open(&ns.ng, CMDS as u32)?;
    // SAFETY: bufs outlive the ring's use (all completions are reaped below).
    unsafe { ring.register_buffers(&mut bufs)? };
    let mut cmds = Vec::new();
    for (i, b) in bufs.iter_mut().enumerate() {
        let lba = first + (i as u64) * u64::from(blocks);
        fill_pattern(b, lba * u64::from(g.lba_size), seed);
        let cmd = NvmeWriteCmd::new(g.nsid, lba, blocks)
            .buffer(b.as_ptr(), per)
            .build(&g)?;
        // SAFETY: as above; odd commands use the registered buffer, even ones the plain path.
        unsafe {
            ring.push(
                &cmd,
                UringCmdOp::Io,
                (i % 2 == 1).then_some(i as u16),
                i as u64,
            )?
        };
        cmds.push(cmd);
    }
    ensure!(ring.submitted_total() == 0, "push must only queue");
    let submitted = ring.submit()?;
    ensure!(submitted == CMDS, "one submit took {submitted} of {CMDS}");
    let mut done = Vec::new();
    while done.len() < CMDS {
        ring.wait_timeout(1, Duration::from_secs(30), &mut done)?;
    }
    for d in &done {
        d.check(&ns.ng, &cmds[d.user_data as usize], UringCmdOp::Io)?;
    }
    let flush = NvmeFlushCmd::new(g.nsid).build();
    // SAFETY: flush carries no buffer.
    unsafe { ring.execute(&flush, UringCmdOp::Io, None)? };
    ring.unregister_buffers()?;
    let total = CMDS * per;
    let back = read_block(&ns.blk, first * u64::from(g.lba_size), total)?;
    check_pattern(&back, first * u64::from(g.lba_size), seed)?;
    Ok(format!(
        "{CMDS} writes of {} KiB in one submit (half fixed), flush OK, {} KiB verified via {}",
        per / 1024,
        total / 1024,
        ns.blk
    ))
}

fn cli_read(c: &Ctx) -> Result<String> {
    let (ns, g) = main_ns(1)?;
    let lba = 4096u64;
    let blocks = 64u64;
    let off = lba * u64::from(g.lba_size);
    let len = blocks * u64::from(g.lba_size);
    write_pattern_block(&ns.blk, off, len, 0xc11)?;
    let out = "/tmp/cli-read.bin";
    let (ok, _o, e) = run(
        &c.agent,
        &[
            "read",
            "--device",
            &ns.ng,
            "--lba",
            &lba.to_string(),
            "--blocks",
            &blocks.to_string(),
            "--out",
            out,
        ],
    )?;
    ensure!(ok, "gds-agent read failed: {e}");
    let data = std::fs::read(out)?;
    ensure!(
        data.len() as u64 == len,
        "{} bytes written, want {len}",
        data.len()
    );
    check_pattern(&data, off, 0xc11)?;
    c.detail(e.trim());

    let (ok, o, e) = run(
        &c.agent,
        &[
            "read", "--device", &ns.ng, "--stream", "--qd", "16", "--fixed", "--json",
        ],
    )?;
    ensure!(ok, "gds-agent read --stream failed: {e}");
    let v: serde_json::Value = serde_json::from_str(o.trim()).context("stream JSON")?;
    ensure!(
        v["bytes"].as_u64() == Some(g.capacity_bytes()),
        "streamed {} bytes of {}",
        v["bytes"],
        g.capacity_bytes()
    );
    c.detail(o.trim());

    let (ok, _o, e) = run(
        &c.agent,
        &[
            "read",
            "--device",
            &ns.ng,
            "--lba",
            &g.capacity_blocks.to_string(),
            "--blocks",
            "1",
        ],
    )?;
    ensure!(!ok, "a read at LBA = capacity succeeded");
    ensure!(
        e.contains("past the namespace capacity"),
        "unexpected message: {e}"
    );
    c.detail(e.trim());
    Ok(format!(
        "single read of {blocks} blocks matches; stream of {} MiB at QD 16; LBA {} refused",
        g.capacity_bytes() >> 20,
        g.capacity_blocks
    ))
}

/// MiB/s of one streaming read of the whole namespace at `qd` with 128 KiB commands.
/// Passes over the namespace per throughput sample: one pass of 256 MiB lasts ~0.2 s under
/// emulation, too short to average out the emulator's jitter.
const PASSES: u32 = 4;

/// MiB/s of `PASSES` streaming reads of the whole namespace at `qd` with 128 KiB commands.
fn gds_stream(ns: &Ns, g: &NamespaceGeometry, qd: u32, fixed: bool) -> Result<f64> {
    let mut ring = NvmeRing::open(&ns.ng, qd)?;
    let mut opts = StreamOptions::whole(g, qd);
    opts.fixed = fixed;
    opts.chunk_blocks = (128 * 1024 / g.lba_size).min(g.max_blocks_per_command());
    let (mut bytes, mut secs) = (0u64, 0f64);
    for _ in 0..PASSES {
        let stats = stream_read(&mut ring, g, &opts, |_, _| Ok(()))?;
        bytes += stats.bytes;
        secs += stats.elapsed.as_secs_f64();
    }
    ensure!(
        bytes == u64::from(PASSES) * g.capacity_bytes(),
        "short stream: {bytes} bytes"
    );
    Ok(bytes as f64 / 1048576.0 / secs)
}

/// fio's io_uring_cmd engine on the same namespace: MiB/s. `lean` adds `--gtod_reduce=1` (no
/// per-I/O timestamps), fio's fastest configuration.
fn fio(ns: &Ns, g: &NamespaceGeometry, qd: u32, fixed: bool, lean: bool) -> Result<f64> {
    let filename = format!("--filename={}", ns.ng);
    let iodepth = format!("--iodepth={qd}");
    let fixedbufs = format!("--fixedbufs={}", u8::from(fixed));
    let loops = format!("--loops={PASSES}");
    let mut args = vec![
        "--name=peer",
        &filename,
        "--ioengine=io_uring_cmd",
        "--cmd_type=nvme",
        "--rw=read",
        "--bs=128k",
        &iodepth,
        &fixedbufs,
        "--size=100%",
        &loops,
        "--output-format=json",
    ];
    if lean {
        args.push("--gtod_reduce=1");
    }
    let (ok, o, e) = run("/bin/fio", &args)?;
    ensure!(ok, "fio failed: {e}{o}");
    let start = o.find('{').context("fio printed no JSON")?;
    let v: serde_json::Value = serde_json::from_str(&o[start..]).context("fio JSON")?;
    let read = &v["jobs"][0]["read"];
    let bytes = read["io_bytes"].as_f64().context("io_bytes")?;
    let ms = read["runtime"].as_f64().context("runtime")?;
    ensure!(
        bytes as u64 == u64::from(PASSES) * g.capacity_bytes() && ms > 0.0,
        "fio read {bytes} bytes in {ms} ms, want {PASSES} passes"
    );
    Ok(bytes / 1048576.0 / (ms / 1000.0))
}

fn throttled_is_slow(c: &Ctx) -> Result<String> {
    const N: u32 = 10;
    let mut lat = Vec::new();
    for serial in [SLOW_SERIAL, MAIN_SERIAL] {
        let ns = find_ns(serial, 1)?;
        let g = namespace_geometry(Path::new(&ns.ng))?;
        let mut ring = NvmeRing::open(&ns.ng, 1)?;
        let mut buf = DmaBuffer::new(4096);
        let blocks = 4096 / g.lba_size;
        // QEMU's throttle lets a burst of iops/10 through at full speed; spend it first.
        for i in 0..N {
            let cmd = NvmeReadCmd::new(g.nsid, u64::from(i * blocks), blocks)
                .buffer(buf.as_mut_ptr(), 4096)
                .build(&g)?;
            // SAFETY: buf outlives the synchronous execute.
            unsafe { ring.execute(&cmd, UringCmdOp::Io, None)? };
        }
        let start = Instant::now();
        for i in 0..N {
            let cmd = NvmeReadCmd::new(g.nsid, u64::from(i * blocks), blocks)
                .buffer(buf.as_mut_ptr(), 4096)
                .build(&g)?;
            // SAFETY: buf outlives the synchronous execute.
            unsafe { ring.execute(&cmd, UringCmdOp::Io, None)? };
        }
        let per = start.elapsed() / N;
        c.detail(format!(
            "{serial} ({}): {:.2} ms per 4 KiB read",
            ns.ng,
            per.as_secs_f64() * 1e3
        ));
        lat.push(per);
    }
    ensure!(
        lat[0] >= Duration::from_millis(10),
        "throttled controller answered in {:?} per read (50 IOPS limit means ~20 ms)",
        lat[0]
    );
    ensure!(
        lat[1] < lat[0] / 2,
        "main controller ({:?}) is not clearly faster than the throttled one ({:?})",
        lat[1],
        lat[0]
    );
    Ok(format!(
        "{SLOW_SERIAL}: {:.1} ms/read, {MAIN_SERIAL}: {:.2} ms/read",
        lat[0].as_secs_f64() * 1e3,
        lat[1].as_secs_f64() * 1e3
    ))
}

fn dd(ns: &Ns, g: &NamespaceGeometry) -> Result<f64> {
    let start = Instant::now();
    let (ok, o, e) = run(
        "/bin/dd",
        &[
            &format!("if={}", ns.blk),
            "of=/dev/null",
            "bs=128k",
            "iflag=direct",
        ],
    )?;
    ensure!(ok, "dd failed: {e}{o}");
    Ok(g.capacity_bytes() as f64 / 1048576.0 / start.elapsed().as_secs_f64())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn throughput(c: &Ctx) -> Result<String> {
    let (ns, g) = main_ns(1)?;
    const QD: u32 = 32;
    const ROUNDS: usize = 4;
    let mut report = Vec::new();
    for fixed in [false, true] {
        let (mut ours, mut peer, mut lean, mut ratios) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        // The host is shared and emulation jitters by tens of percent between runs, so each
        // round measures all three back to back (in a rotating order) and yields one ratio
        // against the faster fio of that round; the figure is the median of those ratios.
        for round in 0..ROUNDS {
            let (mut o, mut p, mut l) = (0.0, 0.0, 0.0);
            for step in 0..3 {
                match (round + step) % 3 {
                    0 => o = gds_stream(&ns, &g, QD, fixed)?,
                    1 => p = fio(&ns, &g, QD, fixed, false)?,
                    _ => l = fio(&ns, &g, QD, fixed, true)?,
                }
            }
            ours.push(o);
            peer.push(p);
            lean.push(l);
            ratios.push(o / f64::max(p, l));
        }
        let tag = if fixed { "fixed" } else { "plain" };
        c.detail(format!(
            "{tag}: gds {ours:.1?} MiB/s, fio {peer:.1?} MiB/s, fio --gtod_reduce=1 {lean:.1?} \
             MiB/s, per-round gds/fio {ratios:.2?}"
        ));
        let (o, p, l, r) = (median(ours), median(peer), median(lean), median(ratios));
        c.metric(&format!("gds_{tag}_mib_s"), format!("{o:.1}"));
        c.metric(&format!("fio_{tag}_mib_s"), format!("{p:.1}"));
        c.metric(&format!("fio_lean_{tag}_mib_s"), format!("{l:.1}"));
        c.metric(&format!("ratio_{tag}"), format!("{r:.3}"));
        report.push((tag, o, p.max(l), r));
    }
    let d = median((0..3).map(|_| dd(&ns, &g)).collect::<Result<Vec<_>>>()?);
    c.metric("dd_direct_mib_s", format!("{d:.1}"));
    let summary = report
        .iter()
        .map(|(t, o, p, r)| format!("{t}: gds {o:.1} vs fio {p:.1} MiB/s, ratio {r:.2}"))
        .collect::<Vec<_>>()
        .join("; ");
    if cfg!(debug_assertions) {
        c.detail("dev-profile build: the ratio is reported, not enforced");
        return Ok(format!("(dev profile, not enforced) {summary}"));
    }
    // Emulation makes absolute numbers meaningless; the ratio is the figure, and the goal is
    // 0.9. On a loaded 2-core host single rounds swing from 0.77 to 1.22 within one run, so
    // the enforced floor is 0.75: it catches a real regression (a path that loses queue depth
    // or batching lands far lower) without failing on emulator jitter.
    let goal_met = report.iter().all(|(_, _, _, r)| *r >= 0.9);
    c.metric("goal_0_9_met", goal_met);
    for (t, _, _, r) in &report {
        ensure!(
            *r >= 0.75,
            "{t}: median gds/fio = {r:.2} is below 0.75 ({summary})"
        );
    }
    Ok(format!(
        "{} MiB x {PASSES} passes, QD {QD}, 128 KiB, medians of {ROUNDS} rounds: {summary}; \
         dd O_DIRECT (QD 1) {d:.1} MiB/s; goal 0.9 {}",
        g.capacity_bytes() >> 20,
        if goal_met { "met" } else { "NOT met" }
    ))
}
