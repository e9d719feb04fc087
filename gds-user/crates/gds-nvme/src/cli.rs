//! `gds-agent read`: one NVMe passthrough read, or a streaming read at a queue depth with the
//! throughput reported.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::buffer::DmaBuffer;
use super::cmd::{NvmeReadCmd, UringCmdOp};
use super::error::NvmeError;
use super::geometry::NamespaceGeometry;
use super::ring::{NvmeRing, namespace_geometry};
use super::stream::{StreamOptions, StreamStats, default_chunk_blocks, stream_read};

/// Read from an NVMe namespace through io_uring passthrough (IORING_OP_URING_CMD).
#[derive(clap::Args, Debug, Clone)]
pub struct NvmeReadArgs {
    /// NVMe generic char device of the namespace, e.g. /dev/ng0n1.
    #[arg(long)]
    pub device: PathBuf,
    /// First logical block.
    #[arg(long, default_value_t = 0)]
    pub lba: u64,
    /// Number of logical blocks (one command: required, at most 65,536 and MDTS; --stream:
    /// defaults to the rest of the namespace).
    #[arg(long)]
    pub blocks: Option<u64>,
    /// Write the data read to this file (default: a hex dump of the first 256 bytes).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Stream the range with --qd commands in flight and report throughput.
    #[arg(long)]
    pub stream: bool,
    /// Queue depth for --stream.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub qd: u32,
    /// Bytes per command for --stream, in KiB (default 128, capped by MDTS).
    #[arg(long)]
    pub chunk_kib: Option<u32>,
    /// Use registered buffers (IORING_URING_CMD_FIXED).
    #[arg(long)]
    pub fixed: bool,
    /// Print the result as one JSON line.
    #[arg(long)]
    pub json: bool,
}

pub fn read(args: NvmeReadArgs) -> Result<()> {
    if args.stream {
        return stream(&args, &namespace_geometry(&args.device)?);
    }
    // Checked before the device is looked at, so its absence is what is reported.
    let Some(blocks) = args.blocks else {
        bail!("--blocks is required for a single read (or use --stream)");
    };
    single(&args, &namespace_geometry(&args.device)?, blocks)
}

fn single(args: &NvmeReadArgs, g: &NamespaceGeometry, blocks: u64) -> Result<()> {
    let blocks = u32::try_from(blocks).unwrap_or(u32::MAX);
    let len = blocks as usize * g.lba_size as usize;
    // Validate before allocating: a page-aligned stand-in address is never dereferenced by
    // `build`, so an oversized request is refused without a huge allocation.
    let stand_in = super::buffer::DMA_BUFFER_ALIGN as *mut u8;
    NvmeReadCmd::new(g.nsid, args.lba, blocks)
        .buffer(stand_in, len)
        .build(g)?;
    let mut buf = DmaBuffer::new(len);
    let cmd = NvmeReadCmd::new(g.nsid, args.lba, blocks)
        .buffer(buf.as_mut_ptr(), len)
        .timeout(Duration::from_secs(30))
        .build(g)?;
    let mut ring = NvmeRing::open(&args.device, 1)?;
    let fixed = if args.fixed {
        // SAFETY: `buf` outlives `ring`'s use of it (execute is synchronous, ring drops first).
        unsafe { ring.register_buffers(std::slice::from_mut(&mut buf))? };
        Some(0)
    } else {
        None
    };
    let start = Instant::now();
    // SAFETY: `buf` lives across the synchronous execute.
    unsafe { ring.execute(&cmd, UringCmdOp::Io, fixed)? };
    let elapsed = start.elapsed();
    ring.unregister_buffers()?;
    if let Some(out) = &args.out {
        std::fs::write(out, &buf[..]).with_context(|| format!("write {}", out.display()))?;
    }
    if args.json {
        println!(
            "{{\"device\":\"{}\",\"lba\":{},\"blocks\":{},\"bytes\":{},\"usec\":{}}}",
            args.device.display(),
            args.lba,
            blocks,
            len,
            elapsed.as_micros()
        );
    } else {
        eprintln!(
            "read {blocks} blocks ({len} bytes) at LBA {} from {} (nsid {}, {}-byte LBAs) in {} us",
            args.lba,
            args.device.display(),
            g.nsid,
            g.lba_size,
            elapsed.as_micros()
        );
        if args.out.is_none() {
            hexdump(&buf[..len.min(256)])?;
        }
    }
    Ok(())
}

fn stream(args: &NvmeReadArgs, g: &NamespaceGeometry) -> Result<()> {
    let blocks = match args.blocks {
        Some(b) => b,
        None => g.capacity_blocks.saturating_sub(args.lba),
    };
    let chunk_blocks = match args.chunk_kib {
        Some(kib) => ((u64::from(kib) * 1024) / u64::from(g.lba_size)).max(1) as u32,
        None => default_chunk_blocks(g),
    };
    let opts = StreamOptions {
        lba: args.lba,
        blocks,
        qd: args.qd,
        chunk_blocks,
        fixed: args.fixed,
        stall_timeout: Duration::from_secs(60),
    };
    let mut ring = NvmeRing::open(&args.device, args.qd.max(1))?;
    let out = match &args.out {
        Some(p) => Some(File::create(p).with_context(|| format!("create {}", p.display()))?),
        None => None,
    };
    let base = args.lba;
    let lba_size = u64::from(g.lba_size);
    let device = args.device.display().to_string();
    let stats = stream_read(&mut ring, g, &opts, |lba, data| {
        if let Some(f) = &out {
            f.write_all_at(data, (lba - base) * lba_size)
                .map_err(|e| NvmeError::Data {
                    device: device.clone(),
                    what: format!("write output: {e}"),
                })?;
        }
        Ok(())
    })?;
    report(args, &stats)
}

fn report(args: &NvmeReadArgs, s: &StreamStats) -> Result<()> {
    if args.json {
        println!(
            "{{\"device\":\"{}\",\"bytes\":{},\"commands\":{},\"seconds\":{:.6},\"qd\":{},\
             \"chunk_bytes\":{},\"fixed\":{},\"max_in_flight\":{},\"mib_per_sec\":{:.3},\
             \"iops\":{:.1}}}",
            args.device.display(),
            s.bytes,
            s.commands,
            s.elapsed.as_secs_f64(),
            s.qd,
            s.chunk_bytes,
            s.fixed,
            s.max_in_flight,
            s.mib_per_sec(),
            s.iops()
        );
    } else {
        println!(
            "{}: {:.1} MiB in {} commands of {} KiB at QD {}{} in {:.3} s: {:.1} MiB/s, {:.0} IOPS",
            args.device.display(),
            s.bytes as f64 / 1048576.0,
            s.commands,
            s.chunk_bytes / 1024,
            s.qd,
            if s.fixed { " (fixed buffers)" } else { "" },
            s.elapsed.as_secs_f64(),
            s.mib_per_sec(),
            s.iops()
        );
    }
    Ok(())
}

fn hexdump(data: &[u8]) -> Result<()> {
    let mut out = std::io::stdout().lock();
    for (i, line) in data.chunks(16).enumerate() {
        let hex: Vec<String> = line.iter().map(|b| format!("{b:02x}")).collect();
        let text: String = line
            .iter()
            .map(|&b| if b.is_ascii_graphic() { b as char } else { '.' })
            .collect();
        writeln!(out, "{:08x}  {:<47}  {text}", i * 16, hex.join(" "))?;
    }
    Ok(())
}
