//! `gds-agent bench`: gdsio-class measurements. Sequential or random reads of one block size at
//! a queue depth over threads, for a duration or a byte count, by one route or several in the
//! same run (`--compare host,bounce,compat,naive`), with the page cache and with O_DIRECT
//! (`--direct off,on`): throughput, IOPS, latency p50/p99/p99.9, ratios to the host ceiling and
//! to cuFile compat. A progress bar on a terminal; `--json` for one JSON document.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Serialize;

use super::bounce::{Limit, Pattern, Plan, Progress, Stats};
use super::cli::{
    Job, PipeArgs, check_buffer_budget, execute, metrics_server, parse_io_size, pipeline_opts,
    probe_verdict, with_progress,
};
use super::cuda::Gpu;
use super::route::{Dest, PathArg, Route, resolve};
use super::source::{Direct, Source};
use gds_host::units::{parse_duration, parse_size};

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// File, block device or NVMe namespace to read.
    pub src: PathBuf,
    /// Destination: gpu, gpu:N or host.
    #[arg(long, default_value = "gpu")]
    pub to: Dest,
    /// Route (ignored with --compare).
    #[arg(long, value_enum, default_value_t = PathArg::Auto)]
    pub path: PathArg,
    /// Run several routes in this order, same file, same run: host (io_uring into host memory,
    /// the ceiling), bounce, compat (cuFile compat mode), gds, naive.
    #[arg(long, value_delimiter = ',')]
    pub compare: Vec<String>,
    /// seq or rand.
    #[arg(long, value_enum, default_value_t = Pattern::Seq)]
    pub pattern: Pattern,
    /// Bytes per I/O.
    #[arg(long, value_parser = parse_io_size, default_value = "4M")]
    pub bs: u64,
    /// I/Os in flight per thread.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub qd: u32,
    /// Run this long (default: sequential reads the range once, random reads its size).
    #[arg(long, value_parser = parse_duration)]
    pub time: Option<Duration>,
    /// Read this many bytes in total.
    #[arg(long, value_parser = parse_size)]
    pub size: Option<u64>,
    /// First byte of the range the I/Os fall in.
    #[arg(long, value_parser = parse_size, default_value = "0")]
    pub offset: u64,
    /// Length of that range (default: to the end of SRC).
    #[arg(long, value_parser = parse_size)]
    pub span: Option<u64>,
    /// O_DIRECT settings to run, e.g. `off,on` (off = page cache).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "auto")]
    pub direct: Vec<Direct>,
    /// Read the range once through the page cache first, so page-cache runs measure memory.
    #[arg(long)]
    pub prewarm: bool,
    /// Also run fio (io_uring engine, registered buffers, same file, pattern, block size, queue
    /// depth, threads and limit) after each O_DIRECT setting, and print our ratio to it.
    #[arg(long)]
    pub fio: bool,
    /// Repeat everything (each route, each O_DIRECT setting, fio) this many times, interleaved,
    /// and add median rows: shared or virtual disks drift by tens of percent within a minute,
    /// so one pass can flatter or wrong-foot whichever side ran at a good moment.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub rounds: u32,
    /// Print one JSON document instead of the table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub pipe: PipeArgs,
}

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Which pass of `--rounds` (from 1); `None` on the median rows.
    pub round: Option<u32>,
    pub path: String,
    pub dest: String,
    pub direct: bool,
    pub pattern: Pattern,
    pub bs: u64,
    pub qd: u32,
    pub threads: usize,
    pub bytes: u64,
    pub ios: u64,
    pub seconds: f64,
    pub gb_per_sec: f64,
    pub iops: f64,
    pub lat_p50_us: f64,
    pub lat_p99_us: f64,
    pub lat_p999_us: f64,
    /// Throughput / the host ceiling of the same O_DIRECT setting, when measured.
    pub vs_ceiling: Option<f64>,
    /// Throughput / cuFile compat of the same O_DIRECT setting, when measured.
    pub vs_compat: Option<f64>,
    /// Throughput / fio of the same O_DIRECT setting, when measured (`--fio`).
    pub vs_fio: Option<f64>,
    pub notes: Vec<String>,
}

/// The `q` quantile (0..1) of unsorted samples, in µs.
pub fn quantile_us(samples: &mut [u64], q: f64) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    let i = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
    let (_, v, _) = samples.select_nth_unstable(i);
    *v as f64 / 1e3
}

fn row(
    route: Route,
    dest: &Dest,
    direct: bool,
    a: &BenchArgs,
    threads: usize,
    mut s: Stats,
) -> Row {
    let secs = s.elapsed.as_secs_f64().max(1e-9);
    Row {
        round: Some(1),
        path: route.as_str().into(),
        dest: if route == Route::Host {
            "host".into()
        } else {
            dest.label()
        },
        direct,
        pattern: a.pattern,
        bs: a.bs,
        qd: a.qd,
        threads,
        bytes: s.bytes,
        ios: s.ios,
        seconds: secs,
        gb_per_sec: s.bytes as f64 / 1e9 / secs,
        iops: s.ios as f64 / secs,
        lat_p50_us: quantile_us(&mut s.latencies_ns, 0.50),
        lat_p99_us: quantile_us(&mut s.latencies_ns, 0.99),
        lat_p999_us: quantile_us(&mut s.latencies_ns, 0.999),
        vs_ceiling: None,
        vs_compat: None,
        vs_fio: None,
        notes: s.notes,
    }
}

fn route_of(name: &str) -> anyhow::Result<PathArg> {
    Ok(match name {
        "host" | "ceiling" => PathArg::Auto,
        "bounce" => PathArg::Bounce,
        "compat" => PathArg::Compat,
        "gds" => PathArg::Gds,
        "naive" => PathArg::Naive,
        "p2p" => PathArg::P2p,
        "auto" => PathArg::Auto,
        // Not a route: pinned host→GPU copies alone (`pcie::h2d`), the PCIe half of the ceiling.
        "pcie" => PathArg::Bounce,
        other => bail!(
            "--compare: unknown route {other:?} (host, pcie, bounce, compat, gds, naive, p2p)"
        ),
    })
}

/// One GPU buffer for every route: the whole range, at most 8 GiB.
fn gpu_buffer(
    n: u32,
    range: crate::ByteRange,
    bs: u64,
    slot: &mut Option<crate::cuda::DeviceBuffer>,
) -> anyhow::Result<()> {
    if slot.is_none() {
        let gpu = Gpu::open(n)?;
        let cap = range.len.min(8 << 30) / bs * bs;
        *slot = Some(gpu.alloc(cap.max(bs) as usize)?);
    }
    Ok(())
}

/// `--compare pcie`: the bounce run's buffers (threads x qd of --bs) and streams, copied to the
/// GPU with no reads.
fn pcie_row(
    a: &BenchArgs,
    dest: &Dest,
    source: &Source,
    range: crate::ByteRange,
    bs: u64,
    limit: Limit,
    gpu_dst: &mut Option<crate::cuda::DeviceBuffer>,
) -> anyhow::Result<Row> {
    let Dest::Gpu(n) = dest else {
        bail!("--compare pcie measures host→GPU copies: give --to gpu[:N]");
    };
    gpu_buffer(*n, range, bs, gpu_dst)?;
    let dst = gpu_dst.as_ref().expect("allocated above");
    let threads = a.pipe.threads.max(1);
    let limit = match limit {
        Limit::Once => Limit::Bytes(range.len),
        other => other,
    };
    let stats = crate::pcie::h2d(
        dst,
        bs,
        threads * a.qd.max(1) as usize,
        threads * a.pipe.streams.max(1),
        limit,
    )?;
    let mut r = row(Route::Bounce, dest, source.direct, a, threads, stats);
    r.path = "pcie".into();
    r.notes
        .push("pinned host→GPU copies only (no reads): the PCIe half of the ceiling".into());
    Ok(r)
}

fn prewarm(path: &std::path::Path, offset: u64, len: u64) -> anyhow::Result<()> {
    use std::os::unix::fs::FileExt;
    let f =
        std::fs::File::open(path).with_context(|| format!("prewarm: open {}", path.display()))?;
    let mut buf = vec![0u8; 8 << 20];
    let mut off = offset;
    while off < offset + len {
        let want = (offset + len - off).min(buf.len() as u64) as usize;
        let n = f.read_at(&mut buf[..want], off)?;
        if n == 0 {
            break;
        }
        off += n as u64;
    }
    Ok(())
}

pub fn bench(a: BenchArgs) -> anyhow::Result<()> {
    if a.bs == 0 {
        bail!("--bs must be positive");
    }
    let runs: Vec<(String, PathArg)> = if a.compare.is_empty() {
        vec![(format!("{:?}", a.path).to_lowercase(), a.path)]
    } else {
        a.compare
            .iter()
            .map(|n| Ok((n.clone(), route_of(n)?)))
            .collect::<anyhow::Result<_>>()?
    };
    let metrics = metrics_server(&a.pipe)?;
    let mut rows: Vec<Row> = Vec::new();
    let mut gpu_dst = None;
    let passes: Vec<(u32, Direct)> = (1..=a.rounds)
        .flat_map(|round| a.direct.iter().map(move |&d| (round, d)))
        .collect();
    for (round, direct) in passes {
        let first = rows.len();
        let mut source = Source::open(&a.src, direct)?;
        let range = source.range(a.offset, a.span, direct)?;
        let bs = source.chunk(a.bs);
        check_buffer_budget(bs, a.qd.into(), a.pipe.threads as u64)?;
        if range.len < bs {
            bail!(
                "the range ({} bytes) is smaller than one I/O ({bs} bytes)",
                range.len
            );
        }
        let limit = match (a.time, a.size) {
            (Some(t), _) => Limit::Time(t),
            (None, Some(s)) => Limit::Bytes(s),
            (None, None) if a.pattern == Pattern::Seq => Limit::Once,
            (None, None) => Limit::Bytes(range.len),
        };
        let plan = Plan {
            range,
            bs,
            pattern: a.pattern,
            limit,
        };
        if a.prewarm && !source.direct {
            prewarm(&source.data_path, range.offset, range.len)?;
        }
        for (name, parg) in &runs {
            let dest = if name == "host" || name == "ceiling" {
                Dest::Host
            } else {
                a.to.clone()
            };
            if name == "pcie" {
                rows.push(pcie_row(
                    &a,
                    &dest,
                    &source,
                    range,
                    bs,
                    limit,
                    &mut gpu_dst,
                )?);
                continue;
            }
            let (route, note) = resolve(*parg, &dest, source.kind, probe_verdict)?;
            if let Dest::Gpu(n) = &dest
                && route != Route::Host
            {
                gpu_buffer(*n, range, bs, &mut gpu_dst)?;
            }
            let progress = Progress {
                metrics: metrics
                    .as_ref()
                    .map(|(m, _)| m.handles(route.as_str(), &dest.label())),
                ..Progress::default()
            };
            let opts = pipeline_opts(&a.pipe, a.qd, true, source.direct, bs);
            let total = match limit {
                Limit::Once => Some(range.len),
                Limit::Bytes(b) => Some(b),
                Limit::Time(_) => None,
            };
            if !a.json {
                eprintln!(
                    "{name}: {} {} KiB QD {} x{} threads, {}",
                    format!("{:?}", a.pattern).to_lowercase(),
                    bs / 1024,
                    a.qd,
                    opts.threads,
                    if source.direct {
                        "O_DIRECT"
                    } else {
                        "page cache"
                    }
                );
            }
            let out = with_progress(&progress, total, a.json, || {
                execute(Job {
                    route,
                    source: &source,
                    plan,
                    dest: &dest,
                    opts,
                    verify: false,
                    progress: &progress,
                    dst: gpu_dst.as_ref(),
                })
            });
            // naive is one thread by definition.
            let threads = if route == Route::Naive {
                1
            } else {
                opts.threads
            };
            let mut r = match out {
                Ok(o) => row(route, &dest, source.direct, &a, threads, o.stats),
                Err(e) => {
                    eprintln!("{name}: failed: {e}");
                    let mut r = row(route, &dest, source.direct, &a, threads, Stats::default());
                    r.notes.push(format!("failed: {e}"));
                    r.gb_per_sec = 0.0;
                    r
                }
            };
            r.path = name.clone();
            r.notes.extend(note);
            r.notes.extend(source.note.clone());
            rows.push(r);
        }
        if a.fio {
            if !a.json {
                eprintln!(
                    "fio: same I/O, {}",
                    if source.direct {
                        "O_DIRECT"
                    } else {
                        "page cache"
                    }
                );
            }
            let threads = a.pipe.threads.max(1);
            match fio(&a, &source, &plan, threads) {
                Ok(r) => rows.push(r),
                Err(e) => {
                    eprintln!("fio: failed: {e:#}");
                    let mut r = row(
                        Route::Host,
                        &Dest::Host,
                        source.direct,
                        &a,
                        threads,
                        Stats::default(),
                    );
                    r.path = "fio".into();
                    r.notes.push(format!("failed: {e:#}"));
                    rows.push(r);
                }
            }
        }
        for r in &mut rows[first..] {
            r.round = Some(round);
        }
    }
    for i in 0..rows.len() {
        let find = |p: &str| {
            rows.iter()
                .find(|r| {
                    r.path == p
                        && r.direct == rows[i].direct
                        && r.round == rows[i].round
                        && r.gb_per_sec > 0.0
                })
                .map(|r| r.gb_per_sec)
        };
        // The ceiling: the host read, bounded by the pinned PCIe rate when that was measured.
        let c = match (find("host"), find("pcie")) {
            (Some(h), Some(p)) => Some(h.min(p)),
            (h, p) => h.or(p),
        };
        let (k, f) = (find("compat"), find("fio"));
        rows[i].vs_ceiling = c.map(|c| rows[i].gb_per_sec / c);
        rows[i].vs_compat = k.map(|k| rows[i].gb_per_sec / k);
        rows[i].vs_fio = f.map(|f| rows[i].gb_per_sec / f);
    }
    if a.rounds > 1 {
        let medians = median_rows(&rows);
        rows.extend(medians);
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print!("{}", table(&rows));
    }
    if let Some((_, srv)) = metrics {
        std::thread::sleep(a.pipe.metrics_linger);
        drop(srv);
    }
    if rows.iter().any(|r| r.gb_per_sec == 0.0 && r.bytes == 0) {
        bail!("some runs failed (see above)");
    }
    Ok(())
}

/// fio with the same I/O as our `host` route: io_uring, registered buffers, IOSQE_ASYNC for
/// page-cache reads when we use it, one job per thread over the same part of the range.
fn fio(a: &BenchArgs, source: &Source, plan: &Plan, threads: usize) -> anyhow::Result<Row> {
    let range = plan.range;
    let mut cmd = std::process::Command::new("fio");
    cmd.args([
        "--name=gds",
        "--ioengine=io_uring",
        "--fixedbufs=1",
        "--group_reporting=1",
    ])
    // invalidate=0: fio drops the file's cached pages before it starts by default; we do not.
    .args([
        "--output-format=json",
        "--lat_percentiles=1",
        "--thread=1",
        "--invalidate=0",
    ])
    .arg(format!("--filename={}", source.data_path.display()))
    .arg(format!(
        "--rw={}",
        if a.pattern == Pattern::Seq {
            "read"
        } else {
            "randread"
        }
    ))
    .arg(format!("--bs={}", plan.bs))
    .arg(format!("--iodepth={}", a.qd))
    .arg(format!("--numjobs={threads}"))
    .arg(format!("--direct={}", u8::from(source.direct)));
    if super::cli::use_async(&a.pipe, source.direct, plan.bs) {
        cmd.arg("--force_async=1");
    }
    let per_job = range.len / threads as u64 / plan.bs * plan.bs;
    match (a.pattern, plan.limit) {
        (Pattern::Seq, Limit::Once) => {
            cmd.arg(format!("--offset={}", range.offset))
                .arg(format!("--size={per_job}"))
                .arg(format!("--offset_increment={per_job}"));
        }
        (_, Limit::Time(t)) => {
            cmd.arg(format!("--offset={}", range.offset))
                .arg(format!("--size={}", range.len / plan.bs * plan.bs))
                .arg(format!("--runtime={}ms", t.as_millis().max(1)))
                .arg("--time_based=1");
        }
        (_, Limit::Bytes(_)) | (_, Limit::Once) => {
            let b = if let Limit::Bytes(b) = plan.limit {
                b
            } else {
                range.len
            };
            cmd.arg(format!("--offset={}", range.offset))
                .arg(format!("--size={}", range.len / plan.bs * plan.bs))
                .arg(format!("--io_size={}", b.div_ceil(threads as u64)));
        }
    }
    let out = cmd.output().context("run fio (apt-get install fio)")?;
    if !out.status.success() {
        bail!("fio: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    // fio may print notices before the JSON document.
    let json = &text[text.find('{').context("fio printed no JSON")?..];
    let v: serde_json::Value = serde_json::from_str(json).context("parse fio JSON")?;
    let job = &v["jobs"][0];
    let read = &job["read"];
    let bytes = read["io_bytes"].as_u64().unwrap_or(0);
    let secs = read["runtime"].as_f64().unwrap_or(0.0) / 1e3;
    let pct = |k: &str| read["lat_ns"]["percentile"][k].as_f64().unwrap_or(0.0) / 1e3;
    Ok(Row {
        round: Some(1),
        path: "fio".into(),
        dest: "host".into(),
        direct: source.direct,
        pattern: a.pattern,
        bs: plan.bs,
        qd: a.qd,
        threads,
        bytes,
        ios: read["total_ios"].as_u64().unwrap_or(0),
        seconds: secs,
        gb_per_sec: read["bw_bytes"].as_f64().unwrap_or(0.0) / 1e9,
        iops: read["iops"].as_f64().unwrap_or(0.0),
        lat_p50_us: pct("50.000000"),
        lat_p99_us: pct("99.000000"),
        lat_p999_us: pct("99.900000"),
        vs_ceiling: None,
        vs_compat: None,
        vs_fio: None,
        notes: vec![format!("fio {}", v["fio version"].as_str().unwrap_or("?"))],
    })
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// One row per (path, destination, O_DIRECT setting) with the median of each number over the
/// rounds that ran; ratios are medians of the per-round ratios (each measured against a peer
/// of the same round), not ratios of medians.
pub fn median_rows(rows: &[Row]) -> Vec<Row> {
    let mut out: Vec<Row> = Vec::new();
    for r in rows.iter().filter(|r| r.round.is_some()) {
        if out
            .iter()
            .any(|m| m.path == r.path && m.dest == r.dest && m.direct == r.direct)
        {
            continue;
        }
        let same: Vec<&Row> = rows
            .iter()
            .filter(|o| {
                o.round.is_some() && o.path == r.path && o.dest == r.dest && o.direct == r.direct
            })
            .collect();
        let m = |f: fn(&Row) -> f64| median(same.iter().map(|o| f(o)).collect()).unwrap_or(0.0);
        let mr = |f: fn(&Row) -> Option<f64>| median(same.iter().filter_map(|o| f(o)).collect());
        out.push(Row {
            round: None,
            bytes: same.iter().map(|o| o.bytes).sum(),
            ios: same.iter().map(|o| o.ios).sum(),
            seconds: same.iter().map(|o| o.seconds).sum(),
            gb_per_sec: m(|o| o.gb_per_sec),
            iops: m(|o| o.iops),
            lat_p50_us: m(|o| o.lat_p50_us),
            lat_p99_us: m(|o| o.lat_p99_us),
            lat_p999_us: m(|o| o.lat_p999_us),
            vs_ceiling: mr(|o| o.vs_ceiling),
            vs_compat: mr(|o| o.vs_compat),
            vs_fio: mr(|o| o.vs_fio),
            notes: vec![format!(
                "median of {} rounds; per-round GB/s {}",
                same.len(),
                same.iter()
                    .map(|o| format!("{:.2}", o.gb_per_sec))
                    .collect::<Vec<_>>()
                    .join(", ")
            )],
            ..r.clone()
        });
    }
    out
}

pub fn table(rows: &[Row]) -> String {
    let mut s = format!(
        "{:<6} {:<8} {:<6} {:<10} {:>9} {:>10} {:>9} {:>9} {:>9} {:>8} {:>8} {:>8}\n",
        "round",
        "path",
        "dest",
        "io",
        "GB/s",
        "IOPS",
        "p50 us",
        "p99 us",
        "p99.9 us",
        "/ceiling",
        "/compat",
        "/fio"
    );
    let ratio = |r: Option<f64>| r.map_or("-".to_owned(), |v| format!("{v:.2}x"));
    for r in rows {
        s += &format!(
            "{:<6} {:<8} {:<6} {:<10} {:>9.2} {:>10.0} {:>9.1} {:>9.1} {:>9.1} {:>8} {:>8} {:>8}\n",
            r.round.map_or("median".to_owned(), |n| n.to_string()),
            r.path,
            r.dest,
            if r.direct { "O_DIRECT" } else { "pagecache" },
            r.gb_per_sec,
            r.iops,
            r.lat_p50_us,
            r.lat_p99_us,
            r.lat_p999_us,
            ratio(r.vs_ceiling),
            ratio(r.vs_compat),
            ratio(r.vs_fio),
        );
        for n in &r.notes {
            s += &format!("                note: {n}\n");
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measured(round: u32, path: &str, gb: f64, vs_fio: Option<f64>) -> Row {
        Row {
            round: Some(round),
            path: path.into(),
            dest: "host".into(),
            direct: true,
            pattern: Pattern::Rand,
            bs: 4096,
            qd: 32,
            threads: 1,
            bytes: 100,
            ios: 10,
            seconds: 1.0,
            gb_per_sec: gb,
            iops: gb * 1e6,
            lat_p50_us: gb,
            lat_p99_us: gb,
            lat_p999_us: gb,
            vs_ceiling: None,
            vs_compat: None,
            vs_fio,
            notes: Vec::new(),
        }
    }

    #[test]
    fn medians_take_per_round_ratios() {
        let rows = vec![
            measured(1, "host", 1.0, Some(0.5)),
            measured(1, "fio", 2.0, Some(1.0)),
            measured(2, "host", 3.0, Some(1.5)),
            measured(2, "fio", 2.0, Some(1.0)),
            measured(3, "host", 2.0, Some(2.0)),
            measured(3, "fio", 1.0, Some(1.0)),
        ];
        let m = median_rows(&rows);
        assert_eq!(m.len(), 2);
        let host = &m[0];
        assert_eq!((host.path.as_str(), host.round), ("host", None));
        assert_eq!(host.gb_per_sec, 2.0);
        // The median of 0.5, 1.5, 2.0, not 2.0 / 2.0.
        assert_eq!(host.vs_fio, Some(1.5));
        assert_eq!((host.bytes, host.ios), (300, 30));
        assert_eq!(m[1].gb_per_sec, 2.0);
        assert_eq!(median(vec![4.0, 1.0]), Some(2.5));
        assert_eq!(median(Vec::new()), None);
    }

    #[test]
    fn quantiles() {
        let mut v: Vec<u64> = (1..=1000).map(|i| i * 1000).collect();
        v.reverse();
        assert_eq!(quantile_us(&mut v, 0.5), 500.0);
        assert_eq!(quantile_us(&mut v, 0.99), 990.0);
        assert_eq!(quantile_us(&mut v, 0.999), 999.0);
        assert_eq!(quantile_us(&mut [], 0.5), 0.0);
        assert_eq!(quantile_us(&mut [7000], 0.999), 7.0);
    }
}
