//! `gds-agent read SRC --to gpu[:N]|host|p2pmem:BDF [--path ...] [--offset --size --qd --chunk]
//! [--verify]`; without SRC, `--device /dev/ngXnY` keeps the NVMe passthrough form of
//! [`gds_nvme::cli`].

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::bounce::{self, Limit, PipelineOpts, Plan, Progress, Stats, Target};
use super::cuda::{DeviceBuffer, Gpu};
use super::error::{DatapathError, Result};
use super::metrics::{PipelineMetrics, Server};
use super::route::{Dest, PathArg, Route, resolve};
use super::source::{Direct, Source};
use super::verify::{self, DigestSink, RangeDigest};
use super::{cufile, naive, p2p};
use gds_host::units::parse_size;
use gds_nvme::cli::NvmeReadArgs;

/// Smallest and largest bytes per I/O: below 4 KiB a read costs more in syscalls and
/// completions than it moves; above 256 MiB one buffer per queue slot exhausts pinned memory.
pub const IO_SIZE_RANGE: (u64, u64) = (4 << 10, 256 << 20);

/// Pinned/registered buffer memory one command may ask for (I/O size × in flight × threads).
pub const MAX_BUFFER_BYTES: u64 = 8 << 30;

/// `--chunk` / `--bs`: a size within [`IO_SIZE_RANGE`].
pub fn parse_io_size(s: &str) -> std::result::Result<u64, String> {
    let v = parse_size(s)?;
    let (lo, hi) = IO_SIZE_RANGE;
    if v < lo || v > hi {
        return Err(format!(
            "I/O size {s:?} out of range: {} KiB to {} MiB",
            lo >> 10,
            hi >> 20
        ));
    }
    Ok(v)
}

/// `--threads`: 1 to 256 workers.
pub fn parse_threads(s: &str) -> std::result::Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n @ 1..=256) => Ok(n),
        _ => Err(format!("{s:?} is not a thread count from 1 to 256")),
    }
}

/// `--streams`: 1 to 64 CUDA streams per worker.
pub fn parse_streams(s: &str) -> std::result::Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n @ 1..=64) => Ok(n),
        _ => Err(format!("{s:?} is not a stream count from 1 to 64")),
    }
}

/// Refuses a buffer set larger than [`MAX_BUFFER_BYTES`] before anything is allocated.
pub fn check_buffer_budget(io_size: u64, in_flight: u64, threads: u64) -> Result<()> {
    let total = io_size.saturating_mul(in_flight).saturating_mul(threads);
    if total > MAX_BUFFER_BYTES {
        return Err(DatapathError::Invalid(format!(
            "{} MiB per I/O x {in_flight} in flight x {threads} thread(s) needs {} MiB of pinned \
             buffers, more than the {} MiB limit (fix: lower --chunk/--bs, --qd or --threads)",
            io_size >> 20,
            total >> 20,
            MAX_BUFFER_BYTES >> 20
        )));
    }
    Ok(())
}

/// Options shared by `read` and `bench`.
#[derive(clap::Args, Debug, Clone)]
pub struct PipeArgs {
    /// Worker threads (each with its own io_uring, buffers and CUDA streams).
    #[arg(long, default_value = "4", value_parser = parse_threads)]
    pub threads: usize,
    /// CUDA streams per worker for the host→device copies (bounce route).
    #[arg(long, default_value = "4", value_parser = parse_streams)]
    pub streams: usize,
    /// Punt page-cache reads of 64 KiB and more to io_uring's worker threads (IOSQE_ASYNC), so
    /// that their copies run in parallel instead of inline in the submitting thread (O_DIRECT
    /// reads are asynchronous anyway).
    #[arg(long = "async", default_value_t = true, action = clap::ArgAction::Set)]
    pub uring_async: bool,
    /// Completions handled per wake-up, their replacement reads submitted together (0 = all
    /// that are ready). Default: 2 with O_DIRECT (smaller bursts keep the device's queue
    /// full), all for page-cache reads.
    #[arg(long, value_parser = clap::value_parser!(u32).range(0..=4096))]
    pub batch: Option<u32>,
    /// Plain io_uring reads instead of registered buffers (READ_FIXED).
    #[arg(long)]
    pub no_fixed: bool,
    /// Serve gds_pipeline_* metrics on this address while the command runs.
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// Keep serving metrics this long after the command ends (so the last values get scraped).
    #[arg(long, value_parser = gds_host::units::parse_duration_or_zero, default_value = "0s")]
    pub metrics_linger: Duration,
}

/// `--device` when not given (the passthrough form's device is required by its own struct).
const NO_DEVICE: &str = "(none)";

/// `gds-agent read`: a data-path read (SRC) or an NVMe passthrough read (--device).
#[derive(clap::Args, Debug, Clone)]
#[command(mut_arg("device", |a| a.required(false).default_value(NO_DEVICE).hide_default_value(true).conflicts_with("src")))]
pub struct ReadArgs {
    /// File, block device or NVMe namespace (/dev/ngXnY) to stream into memory. Without SRC,
    /// --device selects the NVMe passthrough read.
    pub src: Option<PathBuf>,
    /// Destination: gpu, gpu:N, host, or p2pmem:BDF (PCI p2pmem of a peer device).
    #[arg(long, default_value = "gpu")]
    pub to: Dest,
    /// Route: auto (the probe's verdict), gds, p2p, bounce; compat and naive for comparisons.
    #[arg(long, value_enum, default_value_t = PathArg::Auto)]
    pub path: PathArg,
    /// First byte of SRC.
    #[arg(long, value_parser = parse_size, default_value = "0")]
    pub offset: u64,
    /// Bytes to read (default: to the end of SRC).
    #[arg(long, value_parser = parse_size)]
    pub size: Option<u64>,
    /// Bytes per I/O (4 MiB: host→device copies of 1 MiB reach only ~60% of the PCIe rate on
    /// an H100, 4 MiB ~95%).
    #[arg(long, value_parser = parse_io_size, default_value = "4M")]
    pub chunk: u64,
    /// Check every byte: xxh3 of the source range against the bytes brought back.
    #[arg(long)]
    pub verify: bool,
    /// O_DIRECT: auto (when the file system allows it), on, off.
    #[arg(long, value_enum, default_value_t = Direct::Auto)]
    pub direct: Direct,
    #[command(flatten)]
    pub pipe: PipeArgs,
    #[command(flatten)]
    pub nvme: NvmeReadArgs,
}

/// What one execution produced.
pub struct Outcome {
    pub route: Route,
    pub stats: Stats,
    /// `(reference, got)` when verified (equal, or the run failed).
    pub verified: Option<RangeDigest>,
}

/// Everything `execute` needs.
pub struct Job<'a> {
    pub route: Route,
    pub source: &'a Source,
    pub plan: Plan,
    pub dest: &'a Dest,
    pub opts: PipelineOpts,
    pub verify: bool,
    pub progress: &'a Progress,
    /// A GPU buffer to reuse (bench runs several routes into one allocation).
    pub dst: Option<&'a DeviceBuffer>,
}

/// Run one route; verify when asked (only for `Limit::Once` plans: every byte once).
pub fn execute(job: Job<'_>) -> Result<Outcome> {
    let Job {
        route,
        source,
        plan,
        dest,
        opts,
        verify,
        progress,
        dst,
    } = job;
    let block = plan.bs;
    let reference = |src: &Source| -> Result<RangeDigest> {
        let f = std::fs::File::open(&src.data_path).map_err(|e| DatapathError::Io {
            path: src.data_path.clone(),
            what: "verify: open buffered",
            source: e,
        })?;
        verify::hash_file(&f, plan.range, block, &src.path)
    };
    let verify = verify && plan.limit == Limit::Once;
    match route {
        Route::Host => {
            let sink = DigestSink::new(plan.range, block);
            let add = |off: u64, data: &[u8]| sink.add(off, data);
            let target = Target::Host {
                sink: if verify { Some(&add) } else { None },
            };
            let stats = bounce::run(source, &plan, &target, &opts, progress)?;
            let verified = if verify {
                let want = reference(source)?;
                let got = sink.finish();
                want.compare(&got, &source.path)?;
                Some(got)
            } else {
                None
            };
            Ok(Outcome {
                route,
                stats,
                verified,
            })
        }
        Route::Bounce | Route::Gds | Route::Compat | Route::Naive => {
            let Dest::Gpu(n) = dest else {
                return Err(DatapathError::Invalid(format!(
                    "route {} needs --to gpu",
                    route.as_str()
                )));
            };
            let owned;
            let dst = match dst {
                Some(d) => d,
                None => {
                    let gpu = Gpu::open(*n)?;
                    owned = gpu.alloc(plan.range.len.max(1) as usize)?;
                    &owned
                }
            };
            let stats = match route {
                Route::Bounce => bounce::run(source, &plan, &Target::Gpu { dst }, &opts, progress)?,
                Route::Naive => naive::run(source, &plan, dst, opts.latencies, progress)?,
                _ => {
                    let mode = if route == Route::Gds {
                        cufile::Mode::Gds
                    } else {
                        cufile::Mode::Compat
                    };
                    let driver = cufile::Driver::open(dst.gpu(), mode)?;
                    cufile::run(
                        &driver,
                        source,
                        &plan,
                        dst,
                        opts.threads,
                        opts.latencies,
                        progress,
                    )?
                }
            };
            let verified = if verify {
                let want = reference(source)?;
                let got = verify::hash_device(dst, plan.range, block)?;
                want.compare(&got, &source.path)?;
                Some(got)
            } else {
                None
            };
            Ok(Outcome {
                route,
                stats,
                verified,
            })
        }
        Route::P2p => {
            let Dest::P2pMem(dir) = dest else {
                return Err(DatapathError::impossible(
                    gds_probe::DataPath::P2p,
                    vec![super::route::gpu_bar1_mapping_missing()],
                ));
            };
            let mem = p2p::P2pMem::map(dir, plan.range.len as usize)?;
            mem.fill(0);
            let stats = p2p::run(&source.path, plan.range, plan.bs, opts.qd, &mem, progress)?;
            let verified = if verify {
                let want = reference(source)?;
                let got = verify::hash_memory(
                    &mem.as_slice()[..plan.range.len as usize],
                    plan.range,
                    block,
                );
                want.compare(&got, &source.path)?;
                Some(got)
            } else {
                None
            };
            Ok(Outcome {
                route,
                stats,
                verified,
            })
        }
    }
}

/// A progress bar on stderr while `f` runs, when stderr is a terminal.
pub fn with_progress<T>(
    progress: &Progress,
    total: Option<u64>,
    quiet: bool,
    f: impl FnOnce() -> T,
) -> T {
    if quiet || !std::io::stderr().is_terminal() {
        return f();
    }
    let bar = match total {
        Some(t) => indicatif::ProgressBar::new(t).with_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
            )
            .unwrap(),
        ),
        None => indicatif::ProgressBar::new_spinner().with_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} {bytes} {binary_bytes_per_sec} {elapsed}",
            )
            .unwrap(),
        ),
    };
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            while !done.load(Ordering::Relaxed) {
                bar.set_position(progress.bytes.load(Ordering::Relaxed));
                std::thread::sleep(Duration::from_millis(100));
            }
            bar.finish_and_clear();
        });
        let r = f();
        done.store(true, Ordering::Relaxed);
        r
    })
}

pub fn metrics_server(pipe: &PipeArgs) -> anyhow::Result<Option<(Arc<PipelineMetrics>, Server)>> {
    match pipe.metrics_listen {
        None => Ok(None),
        Some(addr) => {
            let m = PipelineMetrics::new();
            let srv = Server::start(addr, m.clone())
                .with_context(|| format!("--metrics-listen {addr}"))?;
            eprintln!(
                "serving gds_pipeline_* metrics on http://{}/metrics",
                srv.addr
            );
            Ok(Some((m, srv)))
        }
    }
}

/// Whether reads are punted to io_uring's workers: page-cache reads of at least 64 KiB (a
/// small read that hits the cache completes inline faster than a worker could take it).
pub fn use_async(pipe: &PipeArgs, direct: bool, bs: u64) -> bool {
    pipe.uring_async && !direct && bs >= 64 << 10
}

pub fn pipeline_opts(
    pipe: &PipeArgs,
    qd: u32,
    latencies: bool,
    direct: bool,
    bs: u64,
) -> PipelineOpts {
    PipelineOpts {
        qd,
        threads: pipe.threads.max(1),
        streams: pipe.streams.max(1),
        fixed: !pipe.no_fixed,
        uring_async: use_async(pipe, direct, bs),
        batch: pipe
            .batch
            .unwrap_or_else(|| super::bounce::default_batch(direct)),
        latencies,
    }
}

/// The probe's verdict for GPU `n` on this host.
pub fn probe_verdict(n: u32) -> Option<gds_probe::Verdict> {
    let report = gds_probe::Report::collect(&gds_probe::HostRoot::new("/"));
    report.verdict_for_gpu(n).cloned()
}

pub fn read(args: ReadArgs) -> anyhow::Result<()> {
    let Some(src) = args.src.clone() else {
        if args.nvme.device.as_os_str() == NO_DEVICE {
            bail!(
                "give SRC (a file, block device or /dev/ngXnY) or --device /dev/ngXnY for a passthrough read"
            );
        }
        return gds_nvme::cli::read(args.nvme);
    };
    let mut source = Source::open(&src, args.direct)?;
    let (route, note) = resolve(args.path, &args.to, source.kind, probe_verdict)?;
    let range = source.range(args.offset, args.size, args.direct)?;
    if range.len == 0 {
        return Err(DatapathError::Invalid(format!(
            "{}: nothing to read: the range is empty (source {} bytes, --offset {}{})",
            src.display(),
            source.size,
            args.offset,
            args.size
                .map(|s| format!(", --size {s}"))
                .unwrap_or_default()
        ))
        .into());
    }
    // No I/O larger than the range: a small file read with --chunk 256M needs small buffers.
    let chunk = source.chunk(args.chunk.min(range.len));
    let plan = Plan::once(range, chunk);
    let metrics = metrics_server(&args.pipe)?;
    let progress = Progress {
        metrics: metrics
            .as_ref()
            .map(|(m, _)| m.handles(route.as_str(), &args.to.label())),
        ..Progress::default()
    };
    // --qd is the total in flight, shared by the workers. Page-cache reads are memory copies:
    // at most 16 MiB in flight per worker, so that the buffers stay in the CPU's cache (on the
    // H100 host, 4 x 4 MiB per worker moved 40 GB/s to the GPU, 8 x 4 MiB 26 GB/s).
    let mut per_worker = args
        .nvme
        .qd
        .div_ceil(args.pipe.threads.max(1) as u32)
        .max(1);
    if !source.direct {
        per_worker = per_worker.min(((16 << 20) / chunk).max(1) as u32);
    }
    let mut opts = pipeline_opts(&args.pipe, per_worker, false, source.direct, chunk);
    if route == Route::P2p {
        // One passthrough ring keeps all of --qd in flight.
        opts.qd = args.nvme.qd.max(1);
        opts.threads = 1;
    }
    check_buffer_budget(chunk, opts.qd.into(), opts.threads as u64)?;
    let t0 = Instant::now();
    let outcome = with_progress(&progress, Some(range.len), args.nvme.json, || {
        execute(Job {
            route,
            source: &source,
            plan,
            dest: &args.to,
            opts,
            verify: args.verify,
            progress: &progress,
            dst: None,
        })
    });
    let wall = t0.elapsed();
    let outcome = outcome?;
    let s = &outcome.stats;
    let mut notes: Vec<String> = note.into_iter().chain(source.note.clone()).collect();
    notes.extend(s.notes.iter().cloned());
    if args.nvme.json {
        let v = serde_json::json!({
            "src": src,
            "dest": args.to.label(),
            "path": route.as_str(),
            "direct": source.direct,
            "offset": range.offset,
            "bytes": s.bytes,
            "chunk": chunk,
            "qd": opts.qd * opts.threads as u32,
            "threads": opts.threads,
            "seconds": s.elapsed.as_secs_f64(),
            "wall_seconds": wall.as_secs_f64(),
            "gb_per_sec": s.gb_per_sec(),
            "verified": outcome.verified.as_ref().map(|d| format!("{:016x}", d.digest())),
            "notes": notes,
        });
        println!("{v}");
    } else {
        for n in &notes {
            eprintln!("note: {n}");
        }
        println!(
            "read {} bytes of {} at {} into {} by {} ({}, {} KiB I/Os, QD {}, {} thread{}) in {:.3} s: {:.2} GB/s",
            s.bytes,
            src.display(),
            range.offset,
            args.to.label(),
            route.as_str(),
            if source.direct {
                "O_DIRECT"
            } else {
                "page cache"
            },
            chunk / 1024,
            opts.qd * opts.threads as u32,
            opts.threads,
            if opts.threads == 1 { "" } else { "s" },
            s.elapsed.as_secs_f64(),
            s.gb_per_sec()
        );
        if let Some(d) = &outcome.verified {
            println!(
                "verify: ok, every byte matches the source (xxh3 of {} blocks: {:016x})",
                d.blocks.len(),
                d.digest()
            );
        }
    }
    if let Some((_, srv)) = metrics {
        std::thread::sleep(args.pipe.metrics_linger);
        drop(srv);
    }
    Ok(())
}
