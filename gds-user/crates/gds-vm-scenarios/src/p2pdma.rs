//! Peer memory seen by the tracer, in the P2PDMA guest (`cargo xtask vm-test --kernels
//! 6.12-p2pdma`: the CONFIG_PCI_P2PDMA kernel, `gds-main` for data and `gds-peer`, whose
//! controller memory buffer the kernel publishes as p2pmem).
//!
//! p2pmem mapped into the process is the stand-in for a GPU's BAR1: the same kernel path (a
//! user mapping of ZONE_DEVICE P2PDMA pages as the target of an NVMe read) that cuFile's P2PDMA
//! mode uses. These scenarios are explicit: they run only where the machine has the peer
//! controller, which `xtask` asks for with `gds.only=p2pdma*`.

use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use gds_datapath::p2p::{P2pMem, providers};
use gds_nvme::{DmaBuffer, NvmeReadCmd, NvmeRing, UringCmdOp, namespace_geometry};

use crate::agent::{Agent, counter};
use crate::nvme::{MAIN_SERIAL, find_ns};
use crate::standin::Standin;
use crate::tracing::{json, layer_entry, metrics, wait_metrics};
use crate::{Ctx, Scenario};

pub fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario {
            name: "p2pdma.block-memory",
            about: "O_DIRECT and passthrough reads into p2pmem count as memory=\"p2pdma\", reads \
                    into host memory as \"host\"; the reading process is named",
            timeout: Duration::from_secs(240),
            explicit: true,
            run: block_memory,
        },
        Scenario {
            name: "p2pdma.cufile-path",
            about: "cuFileRead into p2pmem takes path p2pdma, into host memory compat (stand-in \
                    libcufile: O_DIRECT pread beneath)",
            timeout: Duration::from_secs(240),
            explicit: true,
            run: cufile_path,
        },
    ]
}

/// The first published p2pmem provider, mapped (1 MiB).
fn peer_memory(c: &Ctx) -> Result<P2pMem> {
    let provider = providers(Path::new("/sys/bus/pci/devices"))
        .into_iter()
        .find(|p| p.published)
        .context("no published p2pmem provider (the gds-peer controller's CMB)")?;
    c.detail(format!(
        "p2pmem provider {} ({} bytes)",
        provider.pci, provider.size
    ));
    Ok(P2pMem::map(&provider.dir, 1 << 20)?)
}

fn cufile_path(c: &Ctx) -> Result<String> {
    const PEER: u64 = 24;
    const HOST: u64 = 16;
    const BLOCK: usize = 4096;
    let ns = find_ns(MAIN_SERIAL, 1)?;
    let peer = peer_memory(c)?;
    let slots = (peer.len() / BLOCK) as u64;
    let _agent = Agent::start(c, &[])?;
    let me = std::process::id() as u64;
    let m0 = metrics()?;

    let standin = Standin::open(c, me)?;

    let f = crate::util::open_direct(&ns.blk, false)?;
    let fh = standin.register(f.as_raw_fd())?;
    let mut host = DmaBuffer::new(BLOCK);
    // (buffer, its slots of BLOCK bytes, calls, what it is)
    let targets = [
        (peer.as_mut_ptr(), slots, PEER, "p2pmem"),
        (host.as_mut_ptr(), 1, HOST, "host memory"),
    ];
    for (buf, slots, calls, what) in targets {
        for i in 0..calls {
            let buf_off = ((i % slots) as usize * BLOCK) as i64;
            let file_off = (6 << 20) + (i * BLOCK as u64) as i64;
            // SAFETY: buf + buf_off + BLOCK lies inside the buffer, which outlives the call.
            let n = unsafe { (standin.read)(fh, buf, BLOCK, file_off, buf_off) };
            ensure!(
                n == BLOCK as isize,
                "cuFileRead {i} into {what} returned {n}"
            );
        }
    }

    let bytes = |m: &str, path: &str| {
        counter(
            m,
            "gds_cufile_bytes_total",
            &["op=\"read\"", &format!("path=\"{path}\"")],
        )
    };
    let (p0, h0) = (bytes(&m0, "p2pdma"), bytes(&m0, "compat"));
    let want_p = (PEER * BLOCK as u64) as f64;
    let want_h = (HOST * BLOCK as u64) as f64;
    let m = wait_metrics("cuFile reads counted by path", |m| {
        bytes(m, "p2pdma") - p0 >= want_p && bytes(m, "compat") - h0 >= want_h
    })?;
    let (dp, dh) = (bytes(&m, "p2pdma") - p0, bytes(&m, "compat") - h0);
    for l in m
        .lines()
        .filter(|l| l.starts_with("gds_cufile_bytes_total"))
    {
        c.detail(l);
    }
    ensure!(
        dp == want_p && dh == want_h,
        "{PEER} cuFileRead into p2pmem, {HOST} into host memory -> p2pdma +{dp} B, compat +{dh} B"
    );
    let r = json("/debug/cufile")?;
    let proc_row = r["processes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["pid"].as_u64() == Some(me))
        .cloned()
        .with_context(|| format!("/debug/cufile has no process {me}: {r}"))?;
    let file = proc_row["files"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|row| row["fd"].as_i64() == Some(f.as_raw_fd() as i64))
        .cloned()
        .with_context(|| format!("process {me} has no row for fd {}", f.as_raw_fd()))?;
    c.detail(format!("file row: {file}"));
    let calls = &file["counters"]["path_calls"];
    ensure!(
        calls["p2pdma"].as_u64() == Some(PEER) && calls["compat"].as_u64() == Some(HOST),
        "file row path_calls {calls}, want p2pdma {PEER} compat {HOST}"
    );
    ensure!(
        proc_row["peer_ios"].as_u64() == Some(PEER),
        "process peer_ios {}, want {PEER}",
        proc_row["peer_ios"]
    );
    Ok(format!(
        "{PEER} cuFileRead into p2pmem -> path p2pdma {dp} B; {HOST} into host memory -> compat \
         {dh} B; file row p2pdma {PEER} compat {HOST}; reason {}",
        file["compat_reason"]
    ))
}

fn block_memory(c: &Ctx) -> Result<String> {
    const PEER: u64 = 64;
    const HOST: u64 = 40;
    const PASSTHROUGH: u64 = 16;
    const BLOCK: usize = 4096;
    let ns = find_ns(MAIN_SERIAL, 1)?;
    let g = namespace_geometry(Path::new(&ns.ng))?;
    let disk = ns.blk.trim_start_matches("/dev/").to_owned();
    let peer = peer_memory(c)?;
    let slots = (peer.len() / BLOCK) as u64;

    let _agent = Agent::start(c, &[])?;
    let block_why = layer_entry(gds_api::raw::Layer::Block)?.why;
    c.detail(format!("block layer: {block_why}"));
    ensure!(
        block_why.contains("P2PDMA pages told apart"),
        "the agent does not check for peer memory here: {block_why}"
    );

    let count = |m: &str, op: &str, memory: &str| {
        counter(
            m,
            "gds_block_request_duration_seconds_count",
            &[
                &format!("disk=\"{disk}\""),
                &format!("op=\"{op}\""),
                &format!("memory=\"{memory}\""),
            ],
        )
    };
    let m0 = metrics()?;
    let (p0, h0, d0) = (
        count(&m0, "read", "p2pdma"),
        count(&m0, "read", "host"),
        count(&m0, "drv_in", "p2pdma"),
    );

    // O_DIRECT 4 KiB reads at distinct offsets: one block request each, into peer memory…
    let f = crate::util::open_direct(&ns.blk, false)?;
    for i in 0..PEER {
        // SAFETY: the slot lies inside the mapping, which outlives the read.
        let dst = unsafe {
            std::slice::from_raw_parts_mut(
                peer.as_mut_ptr().add(((i % slots) as usize) * BLOCK),
                BLOCK,
            )
        };
        f.read_exact_at(dst, (2 << 20) + i * BLOCK as u64)
            .with_context(|| format!("O_DIRECT read {i} into p2pmem"))?;
    }
    // …and into host memory; the last block both ways must hold the same bytes.
    let mut host = DmaBuffer::new(BLOCK);
    for i in 0..HOST {
        f.read_exact_at(&mut host, (2 << 20) + i * BLOCK as u64)
            .with_context(|| format!("O_DIRECT read {i} into host memory"))?;
    }
    let last = ((HOST - 1) % slots) as usize * BLOCK;
    ensure!(
        peer.as_slice()[last..last + BLOCK] == host[..],
        "the same block read into p2pmem and into host memory differs"
    );
    // NVMe passthrough (URING_CMD) into peer memory: REQ_OP_DRV_IN requests.
    let mut ring = NvmeRing::open(&ns.ng, 1)?;
    let blocks = (BLOCK as u32) / g.lba_size;
    for i in 0..PASSTHROUGH {
        let cmd = NvmeReadCmd::new(
            g.nsid,
            (4 << 20) / g.lba_size as u64 + i * blocks as u64,
            blocks,
        )
        // SAFETY: slot i of the mapping, which outlives the synchronous execute.
        .buffer(unsafe { peer.as_mut_ptr().add(i as usize * BLOCK) }, BLOCK)
        .build(&g)?;
        // SAFETY: as above.
        unsafe { ring.execute(&cmd, UringCmdOp::Io, None) }
            .with_context(|| format!("passthrough read {i} into p2pmem"))?;
    }

    let m = wait_metrics("reads counted by memory", |m| {
        count(m, "read", "p2pdma") - p0 >= PEER as f64
            && count(m, "read", "host") - h0 >= HOST as f64
            && count(m, "drv_in", "p2pdma") - d0 >= PASSTHROUGH as f64
    })?;
    let (dp, dh, dd) = (
        count(&m, "read", "p2pdma") - p0,
        count(&m, "read", "host") - h0,
        count(&m, "drv_in", "p2pdma") - d0,
    );
    for l in m
        .lines()
        .filter(|l| l.starts_with("gds_block_request_duration_seconds_count"))
    {
        c.detail(l);
    }
    ensure!(
        dp == PEER as f64 && dh == HOST as f64 && dd == PASSTHROUGH as f64,
        "{PEER} reads into p2pmem, {HOST} into host memory, {PASSTHROUGH} passthrough into \
         p2pmem -> read/p2pdma +{dp}, read/host +{dh}, drv_in/p2pdma +{dd}"
    );
    let unknown = counter(
        &m,
        "gds_block_request_duration_seconds_count",
        &["memory=\"unknown\""],
    );
    ensure!(
        unknown == 0.0,
        "{unknown} requests of unknown memory where the check runs"
    );

    // The reading process, as the cuFile classification sees it.
    let me = std::process::id();
    let report = json("/debug/cufile")?;
    let mine = report["peer_io"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["pid"].as_u64() == Some(me as u64))
        .cloned()
        .with_context(|| format!("/debug/cufile peer_io does not name pid {me}: {report}"))?;
    c.detail(format!("peer_io row: {mine}"));
    ensure!(
        mine["requests"].as_u64() == Some(PEER + PASSTHROUGH),
        "pid {me} issued {} requests into peer memory, peer_io says {mine}",
        PEER + PASSTHROUGH
    );
    Ok(format!(
        "{PEER} O_DIRECT reads into p2pmem -> memory=p2pdma +{dp}; {HOST} into host memory -> \
         host +{dh}; {PASSTHROUGH} passthrough into p2pmem -> drv_in/p2pdma +{dd}; pid {me} \
         named with {} peer requests",
        PEER + PASSTHROUGH
    ))
}
