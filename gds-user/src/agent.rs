//! `gds-agent run`: load and attach the tracers, serve metrics, log slow requests, and detach
//! everything on SIGINT/SIGTERM.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, Result};
use clap::Args;
use tokio::{io::unix::AsyncFd, signal::unix::SignalKind};
use tracing::{info, warn};

use crate::http::DEFAULT_LISTEN;
use crate::{
    http::{self, AppState, RecentEvents},
    metrics,
};
use gds_api::{
    model::{self, Decoder, Request, StallReport, labels},
    stall::{StallChange, StallDetector},
};
use gds_host::{tracefs, units::parse_duration};
use gds_trace::{AttachMode, FileHooks, TraceOptions, UringTracer, raw_event};

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// TOML file with the same settings as these flags (keys are the flag names; a flag on
    /// the command line wins); without it, the file GDS_CONFIG names. See docs/deploy.md.
    // GDS_CONFIG is read by `config::resolve`, which can say when it is set but empty.
    #[arg(long, value_name = "FILE")]
    pub config: Option<std::path::PathBuf>,
    /// Address to serve /metrics and /debug on. Binding 0.0.0.0 exposes them to the network.
    #[arg(long, default_value = DEFAULT_LISTEN, value_parser = http::parse_listen)]
    pub listen: SocketAddr,
    /// Trace only this process id.
    #[arg(long)]
    pub pid: Option<u32>,
    /// Trace only tasks with this command name (as in /proc/PID/comm, at most 15 bytes).
    #[arg(long)]
    pub comm: Option<String>,
    /// Trace only these opcodes (names such as URING_CMD, READ, NOP, or numbers; repeatable or
    /// comma-separated).
    #[arg(long, value_delimiter = ',', value_parser = parse_opcode)]
    pub opcode: Vec<u8>,
    /// Count every request but time one in N (for very high request rates).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub sample: u64,
    /// Requests at least this slow are logged as slow events (e.g. 500us, 10ms, 1s).
    #[arg(long, default_value = "100ms", value_parser = parse_duration)]
    pub slow_threshold: Duration,
    /// In-flight map capacity (requests tracked at once; more are counted as drops).
    #[arg(long, default_value_t = gds_common::DEFAULT_MAX_INFLIGHT,
          value_parser = clap::value_parser!(u32).range(1..=16_777_216))]
    pub max_inflight: u32,
    /// Requests in flight at least this long are reported as stalls.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub stall_threshold: Duration,
    /// How often the in-flight tables are scanned for stalls.
    #[arg(long, default_value = "250ms", value_parser = parse_duration)]
    pub stall_interval: Duration,
    /// How to attach to io_uring tracepoints.
    #[arg(long, value_enum, default_value_t = AttachMode::Auto)]
    pub attach: AttachMode,
    /// Users besides root whose cuFile calls are trusted (user names or uids, comma-separated;
    /// at most 16): they feed the `user="trusted"` series the alerts read and the tables
    /// reserved for them. Every other user's calls are counted apart (`user="other"`).
    #[arg(long, value_delimiter = ',', value_name = "USER",
          value_parser = gds_host::users::parse)]
    pub cufile_users: Vec<u32>,
    /// Hooks of the file layer (synchronous read/write calls): auto (fentry, else kprobes,
    /// else tracepoints), or one of them; `syscalls` traces every read/write system call and
    /// slows every syscall of every process; `off`. `/debug/layers` says what is used and
    /// what it cannot see.
    #[arg(long, value_enum, default_value_t = FileHooks::Auto)]
    pub file_hooks: FileHooks,
}

impl RunArgs {
    /// `gds-agent` with no subcommand: `run` with every default.
    pub fn default_from_cli() -> RunArgs {
        use clap::Parser;
        #[derive(Parser)]
        struct Wrapper {
            #[command(flatten)]
            run: RunArgs,
        }
        Wrapper::parse_from(["gds-agent"]).run
    }

    fn trace_options(&self) -> TraceOptions {
        TraceOptions {
            pid: self.pid,
            comm: self.comm.clone(),
            opcodes: self.opcode.clone(),
            sample: self.sample,
            slow_threshold: self.slow_threshold,
            max_inflight: self.max_inflight,
            attach: self.attach,
            cufile_users: self.cufile_users.clone(),
            file_hooks: self.file_hooks,
        }
    }
}

fn parse_opcode(s: &str) -> Result<u8, String> {
    labels::parse_opcode(s).ok_or_else(|| {
        format!(
            "unknown io_uring opcode {s:?} (use a name such as URING_CMD, READ, NOP, or a number)"
        )
    })
}

pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("GDS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal as _;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
}

/// Threads the runtime may start for blocking work: map reads for `/metrics`, `/debug/*` and
/// the stall scan, each a few milliseconds, the big ones shared between concurrent clients.
/// Eight run one of each at once with room to spare. Unbounded (tokio's 512), 50 concurrent
/// `/debug/snapshot` clients started 49 of them, which never exited: the stall scan's
/// `spawn_blocking` every 250 ms woke each idle one before its keep-alive ran out.
pub const MAX_BLOCKING_THREADS: usize = 8;

/// glibc malloc arenas: one per thread that allocates, up to 8 per core by default, each
/// keeping its free memory. Two are enough for an agent whose work is a few short map reads
/// at a time; with the default, the 50-client load above left RSS 52 → 97 MiB for good.
pub const MALLOC_ARENAS: i32 = 2;

/// Gives the pages of freed heap memory back to the kernel. Start-up parses the kernel's BTF
/// (several MiB, freed once the programs are attached) among allocations that live on: glibc
/// returns memory only from the top of the heap by itself, and kept 9 MiB of it.
fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim(3) only releases free memory of malloc's arenas.
    unsafe {
        libc::malloc_trim(0)
    };
}

pub fn run(args: RunArgs) -> Result<()> {
    // Before any thread exists, so that none gets an arena of its own.
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt(3) only sets a malloc parameter.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS)
    };
    init_logging();
    if let Some(path) = &args.config {
        info!(config = %path.display(), "settings from the config file, flags given win");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(MAX_BLOCKING_THREADS)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(run_async(args))
}

async fn run_async(args: RunArgs) -> Result<()> {
    // Handlers first: once the listener is up a client may scrape and then stop us at once
    // (tests, supervisors), and a SIGTERM that arrives before the handler exists kills the
    // process without detaching or saying so (seen once in CI).
    let mut term =
        tokio::signal::unix::signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = tokio::signal::unix::signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let listener = http::bind(args.listen).await?;
    let mut tracer = UringTracer::start(&args.trace_options())?;
    let events = tracer.take_events()?;
    release_freed_memory();
    let tracer = Arc::new(tracer);
    let cufile = CufileWatch::spawn(&tracer)?;
    let evidence = Arc::new(EvidenceThread::spawn());
    let exempt: Vec<_> = cufile
        .as_ref()
        .map(|c| (c.tid, gds_host::privileges::CUFILE_KEEP))
        .into_iter()
        .chain(
            evidence
                .tid
                .map(|t| (t, gds_host::privileges::EVIDENCE_KEEP)),
        )
        .collect();
    let dropped = gds_host::privileges::drop_after_attach(|| tracer.snapshot().is_ok(), &exempt)?;
    info!("programs attached; {dropped}");
    if let Some(c) = &cufile {
        info!(
            "cuFile: thread {} keeps what attaching uprobes needs (cap_perfmon, cap_sys_admin, \
             cap_sys_ptrace, cap_checkpoint_restore, cap_dac_read_search, cap_lease, where held); no other \
             thread does but the stall-evidence one",
            c.tid
        );
    }
    if let Some(t) = evidence.tid {
        info!(
            "stall evidence: thread {t} keeps what reading other threads' wchan, system call and \
             kernel stack needs (cap_sys_ptrace, cap_sys_admin, where held)"
        );
    }

    let registry = prometheus::Registry::new();
    registry
        .register(Box::new(metrics::agent_info()))
        .context("registering gds_agent_info")?;
    registry
        .register(Box::new(metrics::TraceCollector::new(tracer.clone())))
        .context("registering io_uring, NVMe and block metrics")?;
    gds_probe::metrics::register_metrics(&registry, std::path::Path::new("/"))
        .context("registering the probe's capability and nvidia-fs metrics")?;
    let tracefs = metrics::tracefs_available();
    registry
        .register(Box::new(tracefs.clone()))
        .context("registering gds_agent_tracefs_available")?;
    spawn_tracefs_watch(tracefs);

    let stall_report = Arc::new(Mutex::new(StallReport::default()));
    registry
        .register(Box::new(metrics::StallCollector::new(stall_report.clone())))
        .context("registering stall metrics")?;
    let detector = Arc::new(Mutex::new(StallDetector::new(
        u64::try_from(args.stall_threshold.as_nanos()).unwrap_or(u64::MAX),
    )));

    let received = metrics::slow_events_received();
    registry
        .register(Box::new(received.clone()))
        .context("registering gds_slow_events_total")?;
    let slow = Arc::new(RecentEvents::default());
    let reader = tokio::spawn(read_events(
        events,
        tracer.clone(),
        slow.clone(),
        detector.clone(),
        received,
    ));
    let devices = tokio::spawn(watch_devices(tracer.clone(), DEVICE_WATCH_INTERVAL));
    let scanner = tokio::spawn(scan_stalls(
        tracer.clone(),
        detector,
        stall_report.clone(),
        args.stall_interval,
        evidence,
    ));

    let state = AppState {
        metrics: Arc::new(http::MetricsRenderer::new(registry)),
        slow,
        stalls: stall_report,
        tracer: tracer.clone(),
        debug_reads: Default::default(),
    };
    // The address bound, not the one asked for: `--listen 127.0.0.1:0` picks a free port.
    let bound = listener
        .local_addr()
        .context("reading the listening socket's address")?;
    info!(
        listen = %bound,
        "gds-agent attached; serving http://{bound}/metrics"
    );
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(http::serve(listener, state, async {
        let _ = rx.await;
    }));

    tokio::select! {
        _ = term.recv() => info!("SIGTERM: shutting down"),
        _ = int.recv() => info!("SIGINT: shutting down"),
        r = server => {
            reader.abort();
            scanner.abort();
            devices.abort();
            if let Some(c) = cufile {
                c.stop();
            }
            return match r {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(e.into()),
                Err(e) => Err(anyhow::anyhow!("HTTP server task failed: {e}")),
            };
        }
    }
    let _ = tx.send(());
    reader.abort();
    scanner.abort();
    devices.abort();
    if let Some(c) = cufile {
        c.stop();
    }
    let _ = reader.await;
    let _ = scanner.await;
    let _ = devices.await;
    match Arc::try_unwrap(tracer) {
        Ok(tracer) => drop(tracer),
        Err(shared) => {
            // The server's last scrape may still hold a reference; give it a moment.
            tokio::time::sleep(Duration::from_millis(200)).await;
            drop(shared);
        }
    }
    info!("detached all programs; bye");
    Ok(())
}

/// How often the agent looks for NVMe drivers and controllers coming and going, and for disk
/// names that changed. Short, so that `rmmod nvme_core` right after the last controller went
/// away finds the module let go; a readdir, a stat and one small sysfs read per traced disk
/// per tick.
const DEVICE_WATCH_INTERVAL: Duration = Duration::from_millis(200);
/// How often `/proc/*/maps` is read for libcufile: a `dlopen` is traced within this, and the
/// issue's bound is 2 s.
const CUFILE_WATCH_INTERVAL: Duration = Duration::from_millis(500);

/// Attaches and detaches the NVMe programs as the driver is loaded and unloaded, logging each
/// change.
async fn watch_devices(tracer: Arc<UringTracer>, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let t = tracer.clone();
        if let Ok(Some(change)) = tokio::task::spawn_blocking(move || t.refresh_devices()).await {
            info!("{change}");
        }
    }
}

/// The cuFile layer's own thread: every [`CUFILE_WATCH_INTERVAL`] it attaches to libcufile
/// copies and their processes that appeared and detaches from those gone. A plain thread, not
/// a task: it alone keeps the capabilities attaching needs (capabilities are per thread; see
/// `privileges`), so it must never run anything else.
struct CufileWatch {
    tid: i32,
    stop: Arc<std::sync::atomic::AtomicBool>,
    handle: std::thread::JoinHandle<()>,
}

impl CufileWatch {
    /// Starts the thread where the cuFile programs loaded; it drops to `CUFILE_KEEP` first.
    fn spawn(tracer: &Arc<UringTracer>) -> Result<Option<CufileWatch>> {
        if !tracer.layers().is_on(gds_api::model::Layer::Cufile) {
            return Ok(None);
        }
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let (t, s) = (tracer.clone(), stop.clone());
        let handle = std::thread::Builder::new()
            .name("gds-cufile".into())
            .spawn(move || {
                let dropped =
                    gds_host::privileges::drop_calling_thread_to(gds_host::privileges::CUFILE_KEEP);
                let ok = dropped.is_ok();
                let _ = tx.send(dropped);
                if !ok {
                    return;
                }
                let mut notify = t.take_cufile_notify();
                let watch = t.cufile_thread_fds();
                let mut next_scan = std::time::Instant::now();
                while !s.load(std::sync::atomic::Ordering::SeqCst) {
                    let now = std::time::Instant::now();
                    if now >= next_scan {
                        for c in t.refresh_cufile() {
                            info!("{c}");
                        }
                        tracing::debug!(took = ?now.elapsed(), "cuFile: periodic scan");
                        next_scan = now + CUFILE_WATCH_INTERVAL;
                    }
                    // A dlopen storm: not woken by notifications until the pause ends.
                    let paused = t.cufile_notify_paused_until();
                    let until = paused.map_or(next_scan, |p| p.min(next_scan));
                    let wait = until.saturating_duration_since(std::time::Instant::now());
                    let rb = if paused.is_some() {
                        None
                    } else {
                        notify.as_mut()
                    };
                    let (pids, changed) = wait_loaded(rb, &watch, wait);
                    // First: a changed file's probes must go before anything maps it.
                    if changed {
                        t.cufile_files_changed();
                    }
                    if !pids.is_empty() {
                        tracing::debug!(?pids, "cuFile: the loader notified");
                        for c in t.refresh_cufile_pids(&pids) {
                            info!("{c}");
                        }
                    }
                }
            })
            .context("starting the cuFile thread")?;
        let tid = rx
            .recv()
            .context("the cuFile thread exited before it started")?
            .context("the cuFile thread could not drop its capabilities")?;
        Ok(Some(CufileWatch { tid, stop, handle }))
    }

    /// Stops the thread and waits for it (it holds the tracer; it wakes within
    /// [`CUFILE_WATCH_INTERVAL`]).
    fn stop(self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = self.handle.join();
    }
}

/// Waits up to `wait` for the loader's notifications or a change of a watched file; returns
/// the distinct process ids notified and whether a watched file changed.
fn wait_loaded(
    rb: Option<&mut aya::maps::RingBuf<aya::maps::MapData>>,
    watch: &[std::os::fd::RawFd],
    wait: Duration,
) -> (Vec<u32>, bool) {
    use std::os::fd::AsRawFd;
    let pfd = |fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // A negative descriptor is ignored by poll.
    let mut fds: Vec<libc::pollfd> = std::iter::once(rb.as_ref().map_or(-1, |r| r.as_raw_fd()))
        .chain(watch.iter().copied())
        .map(pfd)
        .collect();
    let ms = i32::try_from(wait.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: valid pollfds, as many as passed.
    unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    let changed = fds[1..].iter().any(|f| f.revents & libc::POLLIN != 0);
    let mut pids = Vec::new();
    if let Some(rb) = rb {
        while let Some(item) = rb.next() {
            if let Ok(b) = <[u8; 4]>::try_from(&item[..]) {
                let pid = u32::from_ne_bytes(b);
                if !pids.contains(&pid) {
                    pids.push(pid);
                }
            }
        }
    }
    (pids, changed)
}

/// A request whose evidence is wanted, and where to send it.
type EvidenceJob = (Request, std::sync::mpsc::SyncSender<model::Evidence>);

/// The one thread that reads stall evidence: it keeps `EVIDENCE_KEEP` (CAP_SYS_PTRACE and
/// CAP_SYS_ADMIN, for other processes' wchan, syscall and kernel stack) when every other
/// thread but the cuFile one holds nothing, and does nothing but those reads, once per stall.
struct EvidenceThread {
    tid: Option<i32>,
    jobs: Option<Mutex<std::sync::mpsc::Sender<EvidenceJob>>>,
}

impl EvidenceThread {
    /// Where the thread cannot start or drop, evidence is read on the scan's own (unprivileged)
    /// thread: state and the disk and cgroup files still read; `missing` or empty stacks say
    /// what did not.
    fn spawn() -> EvidenceThread {
        let (tx, rx) = std::sync::mpsc::channel::<EvidenceJob>();
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let started = std::thread::Builder::new()
            .name("gds-evidence".into())
            .spawn(move || {
                let dropped = gds_host::privileges::drop_calling_thread_to(
                    gds_host::privileges::EVIDENCE_KEEP,
                );
                let ok = dropped.is_ok();
                let _ = tid_tx.send(dropped);
                if !ok {
                    return;
                }
                let root = gds_host::bounded::HostRoot::new("/");
                // Ends when the agent drops the sender.
                for (req, reply) in rx {
                    let _ = reply.send(model::evidence::capture(&root, &req));
                }
            });
        let none = EvidenceThread {
            tid: None,
            jobs: None,
        };
        if let Err(e) = started {
            warn!("stall evidence: no thread of its own ({e}); stacks will be missing");
            return none;
        }
        match tid_rx.recv() {
            Ok(Ok(tid)) => EvidenceThread {
                tid: Some(tid),
                jobs: Some(Mutex::new(tx)),
            },
            Ok(Err(e)) => {
                warn!("stall evidence: {e}; stacks will be missing");
                none
            }
            Err(_) => none,
        }
    }

    /// The evidence of `req`, from the thread (a round trip of a few milliseconds), else read
    /// here.
    fn capture(&self, req: &Request) -> model::Evidence {
        if let Some(jobs) = &self.jobs {
            let (tx, rx) = std::sync::mpsc::sync_channel(1);
            let sent = jobs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .send((req.clone(), tx))
                .is_ok();
            if sent && let Ok(ev) = rx.recv() {
                return ev;
            }
        }
        model::evidence::capture(&gds_host::bounded::HostRoot::new("/"), req)
    }
}

/// Scans the in-flight tables every `interval`, logging each stall when it starts and ends.
/// A new stall's evidence (its threads, disk, cgroup limits) is read once, here, on the
/// blocking pool, and its cause named from it: nothing is read while nothing stalls.
async fn scan_stalls(
    tracer: Arc<UringTracer>,
    detector: Arc<Mutex<StallDetector>>,
    report: Arc<Mutex<StallReport>>,
    interval: Duration,
    evidence: Arc<EvidenceThread>,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The NVMe error counters' recent samples: what a stall's errors are counted from.
    let window = Arc::new(Mutex::new(model::nvme_evidence::ErrorWindow::default()));
    loop {
        tick.tick().await;
        let (tracer2, detector2, evidence, window) = (
            tracer.clone(),
            detector.clone(),
            evidence.clone(),
            window.clone(),
        );
        let done = tokio::task::spawn_blocking(move || {
            let t0 = std::time::Instant::now();
            let (inflight, now) = model::inflight(&*tracer2);
            let scan = t0.elapsed().as_secs_f64();
            let mut window = window.lock().unwrap_or_else(|p| p.into_inner());
            if window.due(now) {
                window.sample(now, model::nvme_evidence::error_counts(&*tracer2));
            }
            // Read once per scan, at its first NVMe capture.
            let nvme = std::cell::OnceCell::new();
            let mut d = detector2.lock().unwrap_or_else(|p| p.into_inner());
            // The cuFile report is read once per scan, and only when a cuFile call stalls.
            let mut cufile: Option<Option<model::cufile::CufileReport>> = None;
            let mut capture = model::evidence::ScanCaptures::new(|r: &Request| {
                let mut ev = evidence.capture(r);
                if r.layer == model::Layer::Cufile
                    && let Some(report) = cufile
                        .get_or_insert_with(|| model::cufile::CufileReport::collect(&*tracer2).ok())
                {
                    ev.cufile = model::evidence::cufile_evidence(r, report, &inflight);
                }
                if let Some(disk) = ev.disk.as_mut().filter(|d| d.nvme.is_some()) {
                    nvme.get_or_init(|| model::nvme_evidence::ScanNvme {
                        outstanding: tracer2
                            .layers()
                            .is_on(model::Layer::Nvme)
                            .then(|| model::nvme_evidence::outstanding(&inflight)),
                        counts: model::nvme_evidence::error_counts(&*tracer2),
                        now_ns: now,
                    })
                    .fill(disk, &window);
                }
                ev
            });
            let changes = d.scan_explained(now, &inflight, |r| capture.explain(r));
            (changes, d.report(now, &inflight, scan))
        })
        .await;
        let Ok((changes, new_report)) = done else {
            continue;
        };
        for c in changes {
            match c {
                StallChange::Started(s) => warn!(
                    layer = s.request.layer.label(),
                    disk = %s.request.target.disk,
                    stage = %s.stage_description,
                    pid = s.request.ctx.pid,
                    tid = s.request.ctx.tid,
                    comm = %s.request.ctx.comm,
                    cgroup = %s.request.ctx.cgroup.as_ref().map(|c| c.path.as_str()).unwrap_or(""),
                    opcode = %s.request.opcode,
                    target = %s.request.where_text(),
                    age_ms = (s.request.age_seconds * 1e3).round() as u64,
                    cause = %s.cause.kind.label(),
                    because = %s.cause.because,
                    "stall detected"
                ),
                StallChange::Ended(s) => info!(
                    layer = s.request.layer.label(),
                    disk = %s.request.target.disk,
                    pid = s.request.ctx.pid,
                    comm = %s.request.ctx.comm,
                    opcode = %s.request.opcode,
                    target = %s.request.where_text(),
                    total_ms = (s.total_seconds.unwrap_or_default() * 1e3).round() as u64,
                    cause = %s.cause.kind.label(),
                    "stall ended"
                ),
            }
        }
        *report.lock().unwrap_or_else(|p| p.into_inner()) = new_report;
    }
}

async fn read_events(
    ring: aya::maps::RingBuf<aya::maps::MapData>,
    tracer: Arc<UringTracer>,
    recent: Arc<RecentEvents>,
    detector: Arc<Mutex<StallDetector>>,
    received: prometheus::IntCounter,
) {
    // SAFETY: the ring buffer owns its map fd, which stays open and unchanged until the
    // RingBuf (owned by the AsyncFd) is dropped.
    let registered =
        unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            warn!("cannot poll the event ring buffer: {e}; slow events are counted but not logged");
            return;
        }
    };
    loop {
        let mut guard = match fd.readable_mut().await {
            Ok(g) => g,
            Err(e) => {
                warn!("event ring buffer poll failed: {e}");
                return;
            }
        };
        let ring = guard.get_inner_mut();
        let mut decoder = Decoder::new(tracer.devices());
        while let Some(item) = ring.next() {
            if let Some(raw) = raw_event(&item) {
                let ev = decoder.slow(&raw);
                received.inc();
                warn!(
                    pid = ev.ctx.pid,
                    tid = ev.ctx.tid,
                    comm = %ev.ctx.comm,
                    opcode = %ev.opcode,
                    user_data = ev.origin.user_data,
                    ring = %ev.origin.ring,
                    latency_us = (ev.latency_seconds * 1e6).round() as u64,
                    res = ev.res,
                    nvme = ev.nvme.as_ref().map(describe_slow_nvme).unwrap_or_default(),
                    "slow io_uring request"
                );
                detector
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .completed(ev.key, ev.latency_ns);
                recent.push(ev);
            }
        }
        guard.clear_ready();
    }
}

fn describe_slow_nvme(n: &model::SlowNvme) -> String {
    format!(
        "disk={} qid={} cid={} lba={} blocks={} status={:?} queue_us={} device_us={} completion_us={}",
        n.disk,
        n.qid,
        n.cid,
        n.lba,
        n.blocks,
        n.status,
        (n.queue_seconds * 1e6).round(),
        (n.device_seconds * 1e6).round(),
        (n.completion_seconds * 1e6).round()
    )
}

/// Keeps `gauge` (`gds_agent_tracefs_available`, made and registered by the caller) current
/// from a task that re-reads /proc/self/mounts every [`tracefs::WATCH_INTERVAL`] (the agent's own mount
/// namespace), logging each change once. The task ends with the runtime.
fn spawn_tracefs_watch(gauge: prometheus::IntGauge) {
    let mut watch = tracefs::TracefsWatch::default();
    let mut check = move || {
        let now = tracefs::find_mount();
        gauge.set(i64::from(now.is_some()));
        if let Some(change) = watch.update(now) {
            tracefs::TracefsWatch::log(&change);
        }
    };
    check();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(tracefs::WATCH_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await; // the first tick is immediate; checked above
        loop {
            tick.tick().await;
            check();
        }
    });
}
