//! `cargo xtask fuzz [--seconds N] [TARGET...]`: runs the cargo-fuzz targets of `fuzz/` one
//! after another, N seconds each (one libFuzzer process, one job: the machine stays usable),
//! then prints a table of what each run did. Installs cargo-fuzz when it is missing. See
//! docs/fuzzing.md.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::Path,
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};
use clap::Args;

use crate::setup;

#[derive(Args)]
pub struct FuzzArgs {
    /// How long to fuzz each target.
    #[arg(long, default_value_t = 600)]
    seconds: u64,
    /// Targets to run (default: every `[[bin]]` of fuzz/Cargo.toml).
    targets: Vec<String>,
}

/// What one run did, from libFuzzer's status lines.
#[derive(Default)]
struct Summary {
    target: String,
    seconds: u64,
    execs: u64,
    cov: u64,
    ft: u64,
    corpus: u64,
    crash: Option<String>,
    ok: bool,
}

/// The `[[bin]]` names of fuzz/Cargo.toml, in file order.
fn targets(root: &Path) -> Result<Vec<String>> {
    let manifest = root.join("fuzz/Cargo.toml");
    let text = std::fs::read_to_string(&manifest)
        .with_context(|| format!("read {}", manifest.display()))?;
    let mut in_bin = false;
    let mut names = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_bin = line == "[[bin]]";
        } else if in_bin && let Some(v) = line.strip_prefix("name") {
            let v = v
                .trim_start()
                .trim_start_matches('=')
                .trim()
                .trim_matches('"');
            names.push(v.to_string());
        }
    }
    Ok(names)
}

fn ensure_cargo_fuzz() -> Result<()> {
    let have = Command::new("rustup")
        .args(["run", "nightly", "cargo", "fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !have {
        setup::run(setup::cargo().args(["install", "cargo-fuzz", "--locked"]))?;
    }
    Ok(())
}

/// `#123  NEW  cov: 10 ft: 20 corp: 5/1Kb ...` → execs, cov, ft, corpus files.
fn status_line(line: &str, s: &mut Summary) {
    let Some(rest) = line.strip_prefix('#') else {
        return;
    };
    let mut words = rest.split_whitespace();
    let Some(Ok(execs)) = words.next().map(str::parse::<u64>) else {
        return;
    };
    s.execs = execs;
    let words: Vec<&str> = words.collect();
    for pair in words.windows(2) {
        let value = || pair[1].split('/').next().and_then(|v| v.parse().ok());
        match pair[0] {
            "cov:" => s.cov = value().unwrap_or(s.cov),
            "ft:" => s.ft = value().unwrap_or(s.ft),
            "corp:" => s.corpus = value().unwrap_or(s.corpus),
            _ => {}
        }
    }
}

fn run_target(root: &Path, target: &str, seconds: u64) -> Result<Summary> {
    let corpus = format!("fuzz/corpus/{target}");
    std::fs::create_dir_all(root.join(&corpus))?;
    let mut cmd = Command::new("rustup");
    cmd.current_dir(root)
        .args([
            "run", "nightly", "cargo", "fuzz", "run", target, &corpus, "--",
        ])
        .arg(format!("-max_total_time={seconds}"))
        .args(["-print_final_stats=1", "-rss_limit_mb=4096"])
        .stdout(Stdio::inherit())
        .stderr(Stdio::piped());
    eprintln!("xtask: running {cmd:?}");
    let started = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("start {cmd:?}"))?;
    let mut s = Summary {
        target: target.to_string(),
        ..Summary::default()
    };
    let stderr = child.stderr.take().expect("piped");
    let mut out = std::io::stderr();
    for line in BufReader::new(stderr).lines() {
        let line = line?;
        let _ = writeln!(out, "{line}");
        status_line(&line, &mut s);
        if let Some(v) = line.strip_prefix("stat::number_of_executed_units:") {
            s.execs = v.trim().parse().unwrap_or(s.execs);
        }
        if let Some((_, path)) = line.split_once("Test unit written to ") {
            s.crash = Some(path.trim().to_string());
        }
    }
    let status = child.wait()?;
    s.seconds = started.elapsed().as_secs();
    s.ok = status.success() && s.crash.is_none();
    Ok(s)
}

pub fn run(args: FuzzArgs) -> Result<()> {
    let root = setup::root();
    let all = targets(&root)?;
    let chosen = if args.targets.is_empty() {
        all.clone()
    } else {
        for t in &args.targets {
            if !all.contains(t) {
                bail!(
                    "no fuzz target {t:?}; fuzz/Cargo.toml has {}",
                    all.join(", ")
                );
            }
        }
        args.targets
    };
    ensure_cargo_fuzz()?;
    let mut summaries = Vec::new();
    for target in &chosen {
        summaries.push(run_target(&root, target, args.seconds)?);
    }
    println!(
        "\n{:<20} {:>8} {:>12} {:>6} {:>7} {:>7}  result",
        "target", "seconds", "execs", "cov", "ft", "corpus"
    );
    for s in &summaries {
        println!(
            "{:<20} {:>8} {:>12} {:>6} {:>7} {:>7}  {}",
            s.target,
            s.seconds,
            s.execs,
            s.cov,
            s.ft,
            s.corpus,
            match (&s.crash, s.ok) {
                (Some(path), _) => format!("CRASH {path}"),
                (None, true) => "ok".to_string(),
                (None, false) => "FAILED (see the output above)".to_string(),
            }
        );
    }
    let failed: Vec<&str> = summaries
        .iter()
        .filter(|s| !s.ok)
        .map(|s| s.target.as_str())
        .collect();
    if !failed.is_empty() {
        bail!("fuzzing failed for {}", failed.join(", "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_libfuzzer_status_lines() {
        let mut s = Summary::default();
        status_line(
            "#1216346\tREDUCE cov: 842 ft: 1570 corp: 357/50Kb lim: 4096 exec/s: 7416 rss: 494Mb",
            &mut s,
        );
        assert_eq!(
            (s.execs, s.cov, s.ft, s.corpus),
            (1_216_346, 842, 1570, 357)
        );
        status_line("INFO: Seed: 1", &mut s);
        assert_eq!(s.execs, 1_216_346);
    }

    #[test]
    fn lists_the_fuzz_targets() {
        let t = targets(&setup::root()).unwrap();
        assert!(t.contains(&"nvme_command".to_string()), "{t:?}");
        assert!(!t.contains(&"gds-fuzz".to_string()), "{t:?}");
    }
}
