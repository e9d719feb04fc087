//! `cargo xtask load`: many concurrent `/metrics` scrapes while the agent traces 100k+ io_uring
//! requests per second.
//!
//! The agent (release build by default) listens on a free loopback port and traces this process
//! only (`--pid`), so its counters can be checked against what was submitted exactly. A thread
//! of this process submits io_uring NOPs and 4 KiB page-cache reads in batches at a fixed rate;
//! `wrk` scrapes `/metrics` over N connections meanwhile. The agent's RSS (VmRSS sampled,
//! VmHWM) and CPU (utime + stime over the wrk run) are read from /proc.
//!
//! Checks: no wrk socket error (connect, read, write, timeout) and no non-2xx reply; the agent
//! still running; every generated request counted by `gds_uring_requests_total`, and every
//! counted one either timed (`gds_uring_request_duration_seconds_count`), in flight, or
//! counted in `gds_trace_dropped_total`; the generator at or above `--min-ops-rate`.
//!
//! `cargo xtask test` runs it too, shorter and against the debug agent ([`test_stage`]).

use std::{
    collections::BTreeMap,
    fs,
    io::Read as _,
    net::SocketAddr,
    os::fd::AsRawFd as _,
    path::Path,
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use clap::Args;
use procfs::process::Process;
use serde_json::json;

use crate::{
    observe::{agent_client, resolve_port},
    promtext,
    service::start_agent,
    setup,
};

#[derive(Args, Clone, Debug)]
pub struct LoadArgs {
    /// How long wrk scrapes (seconds); the io_uring generator runs for the whole of it.
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
    /// Concurrent HTTP connections (wrk -c).
    #[arg(long, default_value_t = 200)]
    pub connections: u32,
    /// wrk threads (wrk -t).
    #[arg(long, default_value_t = 2)]
    pub threads: u32,
    /// io_uring requests per second the generator submits (0: as fast as it can).
    #[arg(long, default_value_t = 150_000)]
    pub ops_rate: u64,
    /// Fail when the generator's achieved rate is below this (requests per second; 0: report
    /// only).
    #[arg(long, default_value_t = 100_000)]
    pub min_ops_rate: u64,
    /// Share of the generated requests the agent's counts may miss (0: every one counted).
    #[arg(long, default_value_t = 0.0)]
    pub tolerance: f64,
    /// wrk's per-request timeout; a slower reply counts as a socket error (timeout).
    #[arg(long, default_value = "2s")]
    pub timeout: String,
    /// Fail when the agent's peak RSS (VmHWM) exceeds this many MiB (0: report only). The
    /// agent's budget: its BTF parses, maps, buffers and text, debug build included.
    #[arg(long, default_value_t = 50)]
    pub max_rss_mib: u64,
    /// Build and run the debug agent instead of the release one.
    #[arg(long)]
    pub debug: bool,
}

impl Default for LoadArgs {
    fn default() -> Self {
        use clap::Parser;
        #[derive(Parser)]
        struct Wrapper {
            #[command(flatten)]
            load: LoadArgs,
        }
        Wrapper::parse_from(["load"]).load
    }
}

/// `cargo xtask load`.
pub fn run(args: LoadArgs) -> Result<()> {
    setup::ensure_prerequisites()?;
    ensure!(
        has_wrk(),
        "wrk is not installed (`cargo xtask setup` installs it)"
    );
    require_root()?;
    let agent = setup::build_agent(!args.debug)?;
    load(&agent, &args)
}

/// The `cargo xtask test` stage: 200 connections for `GDS_LOAD_SECONDS` (default 15) against
/// `agent` (the debug build the other stages use), with the same checks as `cargo xtask load`.
/// Skipped when wrk is missing.
pub fn test_stage(agent: &Path) -> Result<()> {
    if !has_wrk() {
        eprintln!(
            "xtask load: SKIPPED: wrk is not installed (`cargo xtask setup` or \
             `apt-get install wrk` installs it)"
        );
        return Ok(());
    }
    let mut args = LoadArgs {
        seconds: env_u64("GDS_LOAD_SECONDS")?.unwrap_or(15),
        ..LoadArgs::default()
    };
    if let Some(min) = env_u64("GDS_LOAD_MIN_OPS_RATE")? {
        args.min_ops_rate = min;
    }
    if let Some(max) = env_u64("GDS_LOAD_MAX_RSS_MIB")? {
        args.max_rss_mib = max;
    }
    load(agent, &args)
}

fn env_u64(name: &str) -> Result<Option<u64>> {
    match std::env::var(name) {
        Ok(v) => {
            Ok(Some(v.trim().parse().with_context(|| {
                format!("{name}={v:?} is not a whole number")
            })?))
        }
        Err(_) => Ok(None),
    }
}

fn has_wrk() -> bool {
    // wrk prints its usage and exits 1 for -v; being able to start it is what counts.
    Command::new("wrk")
        .arg("-v")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

fn require_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { geteuid() } != 0 {
        bail!("the agent loads eBPF programs: run `cargo xtask load` as root");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The run

/// What one load run measured.
#[derive(Debug)]
struct Report {
    wrk: WrkResult,
    generator: GenResult,
    agent_rss_peak_kib: u64,
    agent_hwm_kib: u64,
    agent_rss_end_kib: u64,
    agent_cpu_percent: f64,
    generator_cpu_percent: f64,
    traced: u64,
    timed: u64,
    drops: BTreeMap<String, u64>,
    inflight_end: u64,
    failures: Vec<String>,
}

fn load(agent_bin: &Path, args: &LoadArgs) -> Result<()> {
    ensure!(args.seconds > 0, "--seconds must be at least 1");
    ensure!(
        (0.0..1.0).contains(&args.tolerance),
        "--tolerance is a share in [0, 1)"
    );
    let dir = setup::root().join("target/load");
    fs::create_dir_all(&dir)?;
    let loadavg = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    eprintln!(
        "xtask load: {} connections for {} s, io_uring generator at {}, agent {} (load average \
         before: {})",
        args.connections,
        args.seconds,
        if args.ops_rate == 0 {
            "full speed".to_owned()
        } else {
            format!("{} requests/s", args.ops_rate)
        },
        agent_bin.display(),
        loadavg
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );

    // `gds-agent run --listen <free loopback port> --pid <this process>`, once /metrics answers.
    let addr = resolve_port("127.0.0.1:0".parse()?)?;
    let mut agent = start_agent(
        Command::new(agent_bin)
            .args(["run", "--listen", &addr.to_string()])
            .args(["--pid", &std::process::id().to_string()])
            .env("GDS_LOG", "info"),
        addr,
        &dir.join("agent.log"),
        Duration::from_secs(30),
    )?;
    let url = format!("http://{addr}/metrics");
    let before = Counts::scrape(addr)?;

    // The generator runs a little before and after wrk, so wrk's whole run sees the load.
    let stop = Arc::new(AtomicBool::new(false));
    let generator = {
        let (stop, rate, dir) = (stop.clone(), args.ops_rate, dir.clone());
        thread::Builder::new()
            .name("uring-load".into())
            .spawn(move || generate(&dir, rate, &stop))?
    };
    thread::sleep(Duration::from_millis(500));

    let wrk_log = dir.join("wrk.out");
    let mut wrk = Command::new("wrk")
        .arg(format!("-t{}", args.threads))
        .arg(format!("-c{}", args.connections))
        .arg(format!("-d{}s", args.seconds))
        .args(["--timeout", &args.timeout, "--latency", &url])
        .stdin(Stdio::null())
        .stdout(fs::File::create(&wrk_log)?)
        .stderr(Stdio::piped())
        .spawn()
        .context("starting wrk")?;
    let t0 = Instant::now();
    let cpu0 = cpu_ticks(agent.pid())?;
    let self0 = cpu_ticks(std::process::id())?;
    let mut rss_peak = 0u64;
    let wrk_status = loop {
        if let Some(status) = wrk.try_wait()? {
            break status;
        }
        if let Ok(status) = proc_status(agent.pid()) {
            rss_peak = rss_peak.max(status.rss_kib);
        }
        if t0.elapsed() > Duration::from_secs(args.seconds + 60) {
            let _ = wrk.kill();
            let _ = wrk.wait();
            stop.store(true, Ordering::Relaxed);
            bail!("wrk ran a minute past its duration; killed it");
        }
        thread::sleep(Duration::from_millis(250));
    };
    let wall = t0.elapsed().as_secs_f64();
    let cpu1 = cpu_ticks(agent.pid());
    let self1 = cpu_ticks(std::process::id())?;
    thread::sleep(Duration::from_millis(250));
    stop.store(true, Ordering::Relaxed);
    let gen_result = generator
        .join()
        .map_err(|_| anyhow::anyhow!("the io_uring generator panicked"))?;

    let mut wrk_stderr = String::new();
    if let Some(mut e) = wrk.stderr.take() {
        let _ = e.read_to_string(&mut wrk_stderr);
    }
    let wrk_out = fs::read_to_string(&wrk_log)?;
    ensure!(
        wrk_status.success(),
        "wrk failed ({wrk_status}):\n{wrk_out}{wrk_stderr}"
    );
    let wrk_result = parse_wrk(&wrk_out)
        .with_context(|| format!("unexpected wrk output:\n{wrk_out}{wrk_stderr}"))?;
    let gen_result = gen_result.context("io_uring generator")?;

    let mut failures = Vec::new();
    let alive = agent.alive();
    if let Err(e) = &alive {
        failures.push(format!("the agent did not survive the load: {e:#}"));
    }
    let end_status = proc_status(agent.pid()).unwrap_or_default();
    let clk = clock_ticks_per_second();
    let agent_cpu = cpu1
        .map(|c1| (c1 - cpu0) as f64 / clk / wall * 100.0)
        .unwrap_or(f64::NAN);
    let self_cpu = (self1 - self0) as f64 / clk / wall * 100.0;

    let after = if alive.is_ok() {
        Counts::scrape(addr).context("scraping the agent after the load")?
    } else {
        Counts::default()
    };
    let traced = after.requests.saturating_sub(before.requests);
    let timed = after.timed.saturating_sub(before.timed);
    let drops: BTreeMap<String, u64> = after
        .drops
        .iter()
        .map(|(r, v)| {
            (
                r.clone(),
                v.saturating_sub(before.drops.get(r).copied().unwrap_or(0)),
            )
        })
        .collect();
    let drop_of = |r: &str| drops.get(r).copied().unwrap_or(0);

    // Checks.
    let generated = gen_result.ops();
    if wrk_result.socket_errors() > 0 {
        failures.push(format!(
            "wrk socket errors: connect {}, read {}, write {}, timeout {}",
            wrk_result.errors_connect,
            wrk_result.errors_read,
            wrk_result.errors_write,
            wrk_result.errors_timeout
        ));
    }
    if wrk_result.non_2xx > 0 {
        failures.push(format!("{} non-2xx replies", wrk_result.non_2xx));
    }
    if wrk_result.requests == 0 {
        failures.push("wrk completed no request".into());
    }
    if alive.is_ok() {
        let floor = (generated as f64 * (1.0 - args.tolerance)).ceil() as u64;
        if traced < floor {
            failures.push(format!(
                "the agent counted {traced} of {generated} generated requests (at least \
                 {floor} expected with --tolerance {})",
                args.tolerance
            ));
        }
        if traced > generated {
            failures.push(format!(
                "the agent counted {traced} requests, more than the {generated} generated \
                 (it traces only this process)"
            ));
        }
        // Every counted request is timed, still in flight, or dropped from the in-flight
        // table (inflight_full at submission, replaced by a later one under its pointer).
        let accounted = timed + after.inflight + drop_of("inflight_full") + drop_of("replaced");
        let unaccounted = traced.abs_diff(accounted);
        if unaccounted as f64 > generated as f64 * args.tolerance {
            failures.push(format!(
                "{traced} counted but {timed} timed + {} in flight + {} inflight_full + {} \
                 replaced = {accounted}: {unaccounted} not accounted for",
                after.inflight,
                drop_of("inflight_full"),
                drop_of("replaced")
            ));
        }
    }
    if alive.is_ok()
        && let Some(f) = rss_failure(end_status.hwm_kib, args.max_rss_mib)
    {
        failures.push(f);
    }
    if gen_result.rate() < args.min_ops_rate as f64 {
        failures.push(format!(
            "the io_uring generator reached {:.0} requests/s, below --min-ops-rate {}",
            gen_result.rate(),
            args.min_ops_rate
        ));
    }

    let report = Report {
        wrk: wrk_result,
        generator: gen_result,
        agent_rss_peak_kib: rss_peak.max(end_status.rss_kib),
        agent_hwm_kib: end_status.hwm_kib,
        agent_rss_end_kib: end_status.rss_kib,
        agent_cpu_percent: agent_cpu,
        generator_cpu_percent: self_cpu,
        traced,
        timed,
        drops,
        inflight_end: after.inflight,
        failures,
    };
    print_report(&report, args, wall, &dir);
    let (status, log) = (agent.terminate(), agent.log_tail());
    if !report.failures.is_empty() {
        bail!(
            "load check failed:\n  {}\nagent log ({status}):\n{log}",
            report.failures.join("\n  ")
        );
    }
    eprintln!("xtask load: all checks passed");
    Ok(())
}

fn print_report(r: &Report, args: &LoadArgs, wall: f64, dir: &Path) {
    let w = &r.wrk;
    let ms = |s: f64| format!("{:.2} ms", s * 1e3);
    let mib = |k: u64| format!("{:.1} MiB", k as f64 / 1024.0);
    let rows: Vec<(&str, String)> = vec![
        (
            "wrk",
            format!(
                "-t{} -c{} -d{}s --timeout {} --latency",
                args.threads, args.connections, args.seconds, args.timeout
            ),
        ),
        (
            "scrapes",
            format!(
                "{} in {:.1} s: {:.1} req/s",
                w.requests, w.duration_s, w.rps
            ),
        ),
        (
            "scrape latency",
            format!(
                "p50 {}  p75 {}  p90 {}  p99 {}  (avg {}, max {})",
                ms(w.p50_s),
                ms(w.p75_s),
                ms(w.p90_s),
                ms(w.p99_s),
                ms(w.avg_s),
                ms(w.max_s)
            ),
        ),
        (
            "scrape body",
            format!("{:.1} KiB", w.bytes / w.requests.max(1) as f64 / 1024.0),
        ),
        (
            "errors",
            format!(
                "socket connect {} read {} write {} timeout {}; non-2xx {}",
                w.errors_connect, w.errors_read, w.errors_write, w.errors_timeout, w.non_2xx
            ),
        ),
        (
            "agent RSS",
            format!(
                "peak (VmHWM) {}{}, peak sampled {}, at end {}",
                mib(r.agent_hwm_kib),
                if args.max_rss_mib > 0 {
                    format!(" (limit {} MiB)", args.max_rss_mib)
                } else {
                    String::new()
                },
                mib(r.agent_rss_peak_kib),
                mib(r.agent_rss_end_kib)
            ),
        ),
        (
            "agent CPU",
            format!(
                "{:.1} % of one core over {:.1} s (utime+stime)",
                r.agent_cpu_percent, wall
            ),
        ),
        (
            "io_uring generator",
            format!(
                "{} requests ({} NOP, {} READ) in {:.1} s: {:.0} req/s (slowest second {:.0}); \
                 {:.1} % CPU",
                r.generator.ops(),
                r.generator.nops,
                r.generator.reads,
                r.generator.elapsed_s,
                r.generator.rate(),
                r.generator.min_second_rate,
                r.generator_cpu_percent
            ),
        ),
        (
            "agent counted",
            format!(
                "{} of {} generated ({} timed, {} in flight at end)",
                r.traced,
                r.generator.ops(),
                r.timed,
                r.inflight_end
            ),
        ),
        (
            "note",
            if r.inflight_end > 0 {
                format!(
                    "{} request(s) still in flight for the agent although the generator reaped \
                     every completion: stale in-flight entries (the agent reports them as stalls)",
                    r.inflight_end
                )
            } else {
                "-".to_owned()
            },
        ),
        (
            "trace drops",
            r.drops
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", "),
        ),
        (
            "result",
            if r.failures.is_empty() {
                "PASS".to_owned()
            } else {
                format!("FAIL ({})", r.failures.len())
            },
        ),
    ];
    println!();
    for (k, v) in rows {
        println!("  {k:<20} {v}");
    }
    let summary = json!({
        "seconds": args.seconds,
        "connections": args.connections,
        "threads": args.threads,
        "wrk_requests": w.requests,
        "wrk_rps": w.rps,
        "latency_p50_ms": w.p50_s * 1e3,
        "latency_p75_ms": w.p75_s * 1e3,
        "latency_p90_ms": w.p90_s * 1e3,
        "latency_p99_ms": w.p99_s * 1e3,
        "latency_max_ms": w.max_s * 1e3,
        "socket_errors": w.socket_errors(),
        "non_2xx": w.non_2xx,
        "agent_rss_peak_kib": r.agent_rss_peak_kib,
        "agent_vmhwm_kib": r.agent_hwm_kib,
        "agent_cpu_percent": r.agent_cpu_percent,
        "generator_ops": r.generator.ops(),
        "generator_ops_per_s": r.generator.rate(),
        "generator_min_second_ops_per_s": r.generator.min_second_rate,
        "generator_cpu_percent": r.generator_cpu_percent,
        "traced": r.traced,
        "timed": r.timed,
        "inflight_end": r.inflight_end,
        "drops": r.drops,
        "pass": r.failures.is_empty(),
        "failures": r.failures,
    });
    println!("{summary}");
    let _ = fs::write(dir.join("summary.json"), format!("{summary}\n"));
}

/// The agent's counters for this process's requests (NOP and READ, the generator's opcodes).
#[derive(Debug, Default)]
struct Counts {
    requests: u64,
    timed: u64,
    inflight: u64,
    drops: BTreeMap<String, u64>,
}

impl Counts {
    fn scrape(addr: SocketAddr) -> Result<Counts> {
        Ok(Counts::parse(&agent_client(addr).get("/metrics")?))
    }

    fn parse(text: &str) -> Counts {
        let mut c = Counts::default();
        for s in promtext::samples(text).filter_map(Result::ok) {
            let value = s.value as u64;
            let ours = matches!(s.label("opcode"), Some("NOP" | "READ"));
            match s.name.as_str() {
                "gds_uring_requests_total" if ours => c.requests += value,
                "gds_uring_request_duration_seconds_count" if ours => c.timed += value,
                "gds_uring_inflight_requests" => c.inflight += value,
                "gds_trace_dropped_total" => {
                    if let Some(reason) = s.label("reason") {
                        c.drops.insert(reason.to_owned(), value);
                    }
                }
                _ => {}
            }
        }
        c
    }
}

// ---------------------------------------------------------------------------------------------
// /proc

#[derive(Debug, Default)]
struct ProcStatus {
    rss_kib: u64,
    hwm_kib: u64,
}

/// The failure when the agent's peak RSS `hwm_kib` (VmHWM, which counts start-up too) is over
/// `limit_mib` (0: no limit).
fn rss_failure(hwm_kib: u64, limit_mib: u64) -> Option<String> {
    (limit_mib > 0 && hwm_kib > limit_mib * 1024).then(|| {
        format!(
            "the agent's peak RSS (VmHWM) was {:.1} MiB, over --max-rss-mib {limit_mib}",
            hwm_kib as f64 / 1024.0
        )
    })
}

fn proc_status(pid: u32) -> Result<ProcStatus> {
    let s = Process::new(pid_arg(pid)?)?.status()?;
    Ok(ProcStatus {
        rss_kib: s.vmrss.unwrap_or(0),
        hwm_kib: s.vmhwm.unwrap_or(0),
    })
}

/// utime + stime of a process (all its threads), in clock ticks.
fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = Process::new(pid_arg(pid)?)
        .and_then(|p| p.stat())
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    Ok(stat.utime + stat.stime)
}

fn pid_arg(pid: u32) -> Result<i32> {
    i32::try_from(pid).with_context(|| format!("pid {pid} out of range"))
}

fn clock_ticks_per_second() -> f64 {
    procfs::ticks_per_second() as f64
}

unsafe extern "C" {
    fn geteuid() -> u32;
}

// ---------------------------------------------------------------------------------------------
// io_uring generator

/// Requests per submission: NOPs (the tracer's worst case: no I/O to hide its cost) and 4 KiB
/// reads of a page-cache-resident file.
const NOPS_PER_BATCH: usize = 48;
const READS_PER_BATCH: usize = 16;
const BATCH: usize = NOPS_PER_BATCH + READS_PER_BATCH;
const READ_SIZE: usize = 4096;
const FILE_SIZE: usize = 1 << 20;

#[derive(Debug, Default)]
pub struct GenResult {
    pub nops: u64,
    pub reads: u64,
    pub elapsed_s: f64,
    /// Requests completed in the slowest whole second of the run.
    pub min_second_rate: f64,
}

impl GenResult {
    pub fn ops(&self) -> u64 {
        self.nops + self.reads
    }

    pub fn rate(&self) -> f64 {
        if self.elapsed_s > 0.0 {
            self.ops() as f64 / self.elapsed_s
        } else {
            0.0
        }
    }
}

/// Submits batches of NOPs and cached reads at `rate` requests/s (0: unpaced) until `stop`,
/// checking every completion.
fn generate(dir: &Path, rate: u64, stop: &AtomicBool) -> Result<GenResult> {
    use io_uring::{IoUring, opcode, types::Fd};

    let path = dir.join("uring-load.dat");
    fs::write(&path, vec![0xa5u8; FILE_SIZE])?;
    let file = fs::File::open(&path)?;
    // Read once so every read below hits the page cache.
    fs::read(&path)?;
    let mut bufs = vec![0u8; READ_SIZE * READS_PER_BATCH];
    let mut ring = IoUring::new(2 * BATCH as u32).context("io_uring_setup")?;

    let mut result = GenResult {
        min_second_rate: f64::INFINITY,
        ..GenResult::default()
    };
    let start = Instant::now();
    let (mut second_start, mut second_ops) = (start, 0u64);
    let mut next_offset = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if now.duration_since(second_start) >= Duration::from_secs(1) {
            let rate = second_ops as f64 / now.duration_since(second_start).as_secs_f64();
            result.min_second_rate = result.min_second_rate.min(rate);
            (second_start, second_ops) = (now, 0);
        }
        if rate > 0 {
            let due = (now.duration_since(start).as_secs_f64() * rate as f64) as u64;
            if result.ops() >= due {
                thread::sleep(Duration::from_micros(100));
                continue;
            }
        }
        let mut batch = Vec::with_capacity(BATCH);
        for i in 0..NOPS_PER_BATCH {
            batch.push(opcode::Nop::new().build().user_data(i as u64));
        }
        for (i, buf) in bufs.chunks_mut(READ_SIZE).enumerate() {
            batch.push(
                opcode::Read::new(Fd(file.as_raw_fd()), buf.as_mut_ptr(), READ_SIZE as u32)
                    .offset(next_offset as u64)
                    .build()
                    .user_data((NOPS_PER_BATCH + i) as u64),
            );
            next_offset = (next_offset + READ_SIZE) % FILE_SIZE;
        }
        // SAFETY: the file and buffers outlive the batch: every completion is reaped below.
        unsafe { ring.submission().push_multiple(&batch) }
            .map_err(|_| anyhow::anyhow!("submission queue full"))?;
        let mut outstanding = BATCH;
        while outstanding > 0 {
            ring.submit_and_wait(outstanding)?;
            for cqe in ring.completion() {
                let res = cqe.result();
                if (cqe.user_data() as usize) < NOPS_PER_BATCH {
                    ensure!(res == 0, "NOP completed with {res}");
                    result.nops += 1;
                } else {
                    ensure!(res == READ_SIZE as i32, "4 KiB read returned {res}");
                    result.reads += 1;
                }
                outstanding -= 1;
            }
        }
        second_ops += BATCH as u64;
    }
    result.elapsed_s = start.elapsed().as_secs_f64();
    if !result.min_second_rate.is_finite() {
        result.min_second_rate = result.rate();
    }
    let _ = fs::remove_file(&path);
    Ok(result)
}

// ---------------------------------------------------------------------------------------------
// wrk output

#[derive(Debug, Default, PartialEq)]
pub struct WrkResult {
    pub requests: u64,
    pub duration_s: f64,
    pub bytes: f64,
    pub rps: f64,
    pub avg_s: f64,
    pub max_s: f64,
    pub p50_s: f64,
    pub p75_s: f64,
    pub p90_s: f64,
    pub p99_s: f64,
    pub errors_connect: u64,
    pub errors_read: u64,
    pub errors_write: u64,
    pub errors_timeout: u64,
    pub non_2xx: u64,
}

impl WrkResult {
    pub fn socket_errors(&self) -> u64 {
        self.errors_connect + self.errors_read + self.errors_write + self.errors_timeout
    }
}

/// `10.5us`, `3.20ms`, `1.01s`, `2.00m`, `1.00h` (wrk's time units) in seconds.
fn parse_wrk_time(s: &str) -> Option<f64> {
    let split = s.find(|c: char| c.is_ascii_alphabetic())?;
    let (num, unit) = s.split_at(split);
    let v: f64 = num.parse().ok()?;
    Some(
        v * match unit {
            "us" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        },
    )
}

/// `1.20GB` (wrk's byte units, powers of 1024) in bytes.
fn parse_wrk_bytes(s: &str) -> Option<f64> {
    let split = s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let v: f64 = num.parse().ok()?;
    let scale = match unit {
        "" | "B" => 1.0,
        "KB" => 1024.0,
        "MB" => 1024.0 * 1024.0,
        "GB" => 1024.0 * 1024.0 * 1024.0,
        "TB" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    Some(v * scale)
}

/// Parses `wrk --latency` output (wrk 4.x).
pub fn parse_wrk(out: &str) -> Result<WrkResult> {
    let mut r = WrkResult::default();
    let (mut got_total, mut got_rps, mut got_p99) = (false, false, false);
    for line in out.lines() {
        let t = line.trim();
        let words: Vec<&str> = t.split_whitespace().collect();
        match words.as_slice() {
            ["Latency", avg, _stdev, max, ..] => {
                r.avg_s = parse_wrk_time(avg).context("latency average")?;
                r.max_s = parse_wrk_time(max).context("latency max")?;
            }
            [pct, value] if pct.ends_with('%') => {
                let v = parse_wrk_time(value).context("latency percentile")?;
                match *pct {
                    "50%" => r.p50_s = v,
                    "75%" => r.p75_s = v,
                    "90%" => r.p90_s = v,
                    "99%" => {
                        r.p99_s = v;
                        got_p99 = true;
                    }
                    _ => {}
                }
            }
            [n, "requests", "in", secs, bytes, "read"] => {
                r.requests = n.parse().context("request count")?;
                r.duration_s = parse_wrk_time(secs.trim_end_matches(',')).context("duration")?;
                r.bytes = parse_wrk_bytes(bytes).context("bytes read")?;
                got_total = true;
            }
            ["Requests/sec:", v] => {
                r.rps = v.parse().context("requests/sec")?;
                got_rps = true;
            }
            _ => {}
        }
        if let Some(rest) = t.strip_prefix("Socket errors:") {
            for part in rest.split(',') {
                let mut kv = part.split_whitespace();
                let (Some(k), Some(v)) = (kv.next(), kv.next()) else {
                    bail!("socket errors: {rest}");
                };
                let v: u64 = v.parse().context("socket error count")?;
                match k {
                    "connect" => r.errors_connect = v,
                    "read" => r.errors_read = v,
                    "write" => r.errors_write = v,
                    "timeout" => r.errors_timeout = v,
                    _ => bail!("unknown socket error kind {k:?}"),
                }
            }
        }
        if let Some(rest) = t.strip_prefix("Non-2xx or 3xx responses:") {
            r.non_2xx = rest.trim().parse().context("non-2xx count")?;
        }
    }
    ensure!(
        got_total && got_rps && got_p99,
        "no request total, Requests/sec or 99% latency line"
    );
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLEAN: &str = "\
Running 15s test @ http://127.0.0.1:40123/metrics
  2 threads and 200 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    25.31ms   10.02ms 212.50ms   80.12%
    Req/Sec     3.98k   512.00     5.10k    70.00%
  Latency Distribution
     50%   23.10ms
     75%   29.00ms
     90%   37.80ms
     99%   61.25ms
  119000 requests in 15.01s, 1.02GB read
Requests/sec:   7928.05
Transfer/sec:     69.60MB
";

    #[test]
    fn parses_clean_wrk_output() {
        let r = parse_wrk(CLEAN).unwrap();
        assert_eq!(r.requests, 119_000);
        assert!((r.duration_s - 15.01).abs() < 1e-9);
        assert!((r.bytes - 1.02 * 1024.0 * 1024.0 * 1024.0).abs() < 1.0);
        assert!((r.rps - 7928.05).abs() < 1e-9);
        assert!((r.avg_s - 0.02531).abs() < 1e-12);
        assert!((r.max_s - 0.2125).abs() < 1e-12);
        assert!((r.p50_s - 0.0231).abs() < 1e-12);
        assert!((r.p90_s - 0.0378).abs() < 1e-12);
        assert!((r.p99_s - 0.06125).abs() < 1e-12);
        assert_eq!(r.socket_errors(), 0);
        assert_eq!(r.non_2xx, 0);
    }

    #[test]
    fn parses_errors_and_other_units() {
        let out = CLEAN
            .replace("212.50ms", "2.00s")
            .replace("61.25ms", "1.50s")
            .replace("23.10ms", "950.00us")
            .replace(
                "Requests/sec:",
                "  Socket errors: connect 1, read 2, write 3, timeout 4\n  \
                 Non-2xx or 3xx responses: 5\nRequests/sec:",
            );
        let r = parse_wrk(&out).unwrap();
        assert_eq!(
            (
                r.errors_connect,
                r.errors_read,
                r.errors_write,
                r.errors_timeout
            ),
            (1, 2, 3, 4)
        );
        assert_eq!(r.socket_errors(), 10);
        assert_eq!(r.non_2xx, 5);
        assert!((r.max_s - 2.0).abs() < 1e-12);
        assert!((r.p99_s - 1.5).abs() < 1e-12);
        assert!((r.p50_s - 0.00095).abs() < 1e-12);
    }

    #[test]
    fn truncated_wrk_output_is_an_error() {
        assert!(parse_wrk("Running 15s test @ http://x/metrics\n").is_err());
    }

    #[test]
    fn peak_rss_over_the_limit_fails() {
        assert_eq!(rss_failure(50 * 1024, 50), None);
        let f = rss_failure(50 * 1024 + 1, 50).unwrap();
        assert!(
            f.contains("50.0 MiB") && f.contains("--max-rss-mib 50"),
            "{f}"
        );
        assert_eq!(rss_failure(u64::MAX / 2, 0), None);
    }

    #[test]
    fn reads_this_process_cpu_and_memory() {
        let me = std::process::id();
        let busy = std::time::Instant::now();
        while busy.elapsed() < Duration::from_millis(30) {
            std::hint::black_box(busy.elapsed());
        }
        assert!(cpu_ticks(me).unwrap() > 0);
        let s = proc_status(me).unwrap();
        assert!(s.rss_kib > 0 && s.hwm_kib >= s.rss_kib, "{s:?}");
        assert!(cpu_ticks(u32::MAX).is_err());
    }

    #[test]
    fn counts_only_the_generator_opcodes() {
        let text = "\
# HELP gds_uring_requests_total io_uring requests seen at submission, by opcode.
gds_uring_requests_total{opcode=\"NOP\"} 480
gds_uring_requests_total{opcode=\"READ\"} 160
gds_uring_requests_total{opcode=\"URING_CMD\"} 7
gds_uring_request_duration_seconds_count{opcode=\"NOP\"} 470
gds_uring_request_duration_seconds_count{opcode=\"READ\"} 160
gds_uring_inflight_requests 0
gds_trace_dropped_total{reason=\"inflight_full\"} 10
gds_trace_dropped_total{reason=\"no_start\"} 10
";
        let c = Counts::parse(text);
        assert_eq!((c.requests, c.timed, c.inflight), (640, 630, 0));
        assert_eq!(c.drops["inflight_full"], 10);
        assert_eq!(c.drops["no_start"], 10);
    }
}
