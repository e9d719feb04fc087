//! The agent inside the guest: proves the harness can run `gds-agent run` next to NVMe
//! passthrough I/O. The tracing scenarios of the next issue build on [`Agent`], [`http_get`]
//! and [`counter`].

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use gds_api::client;
use gds_nvme::{DmaBuffer, NvmeReadCmd, NvmeRing, UringCmdOp, namespace_geometry};

use crate::nvme::{MAIN_SERIAL, find_ns};
use crate::{Ctx, Scenario, promtext};

pub const LISTEN: &str = "127.0.0.1:9477";

pub fn scenarios() -> Vec<Scenario> {
    vec![Scenario {
        name: "agent.counts-passthrough-reads",
        about: "gds-agent run in the guest counts N URING_CMD passthrough reads",
        timeout: Duration::from_secs(120),
        explicit: false,
        run: counts_passthrough,
    }]
}

/// A running `gds-agent run`, killed on drop.
pub struct Agent(pub Child);

impl Agent {
    /// Starts the agent and waits until it serves /metrics (it binds its port before it has
    /// attached).
    pub fn start(c: &Ctx, extra: &[&str]) -> Result<Self> {
        Agent::start_logged(c, extra, None)
    }

    /// [`Agent::start`] with its log (stderr) in file `log` instead of the console.
    pub fn start_logged(c: &Ctx, extra: &[&str], log: Option<&str>) -> Result<Self> {
        let mut cmd = Command::new(&c.agent);
        cmd.args(["run", "--listen", LISTEN])
            .args(extra)
            .stdin(Stdio::null());
        if let Some(path) = log {
            let f = std::fs::File::create(path).with_context(|| format!("create {path}"))?;
            cmd.stderr(f);
        }
        let child = cmd.spawn().context("spawn gds-agent run")?;
        let mut agent = Agent(child);
        // Loading takes seconds under emulation (longer on 6.1's verifier).
        if let Err(e) = client::wait_serving(addr(), &mut agent.0, Duration::from_secs(150)) {
            // Give it a moment to print why.
            std::thread::sleep(Duration::from_secs(2));
            bail!("{e}; its log is in {}", log.unwrap_or("the console above"));
        }
        Ok(agent)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn addr() -> SocketAddr {
    LISTEN.parse().expect("LISTEN is an address")
}

/// GET `path` from the agent: the body of its 200 answer.
pub fn http_get(path: &str) -> Result<String> {
    Ok(client::get(addr(), path)?)
}

/// Sum of a metric's samples whose labels match every matcher, written as in the exposition:
/// `opcode="URING_CMD"` (that value), or `reason="nvme_` (no closing quote: values that start
/// with it).
pub fn counter(metrics: &str, name: &str, labels: &[&str]) -> f64 {
    let matches = |s: &promtext::Sample, matcher: &str| {
        let Some((key, value)) = matcher.split_once("=\"") else {
            return false;
        };
        match (s.label(key), value.strip_suffix('"')) {
            (Some(v), Some(exact)) => v == exact,
            (Some(v), None) => v.starts_with(value),
            (None, _) => false,
        }
    };
    promtext::samples(metrics)
        .filter_map(Result::ok)
        .filter(|s| s.name == name && labels.iter().all(|m| matches(s, m)))
        .map(|s| s.value)
        .sum()
}

fn counts_passthrough(c: &Ctx) -> Result<String> {
    const N: u64 = 200;
    let ns = find_ns(MAIN_SERIAL, 1)?;
    let g = namespace_geometry(Path::new(&ns.ng))?;
    let mut agent = Agent::start(c, &[])?;
    let name = "gds_uring_requests_total";
    let label = "opcode=\"URING_CMD\"";
    let first = match http_get("/metrics") {
        Ok(t) => t,
        Err(e) => {
            std::thread::sleep(Duration::from_millis(500));
            bail!("GET /metrics: {e}; agent: {:?}", agent.0.try_wait());
        }
    };
    let before = counter(&first, name, &[label]);
    let mut ring = NvmeRing::open(&ns.ng, 1)?;
    let mut buf = DmaBuffer::new(4096);
    for i in 0..N {
        let cmd = NvmeReadCmd::new(g.nsid, i * 8, 8)
            .buffer(buf.as_mut_ptr(), 4096)
            .build(&g)?;
        // SAFETY: buf outlives the synchronous execute.
        unsafe { ring.execute(&cmd, UringCmdOp::Io, None)? };
    }
    let mut after = before;
    let start = Instant::now();
    while after - before < N as f64 && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(200));
        after = counter(&http_get("/metrics")?, name, &[label]);
    }
    let text = http_get("/metrics")?;
    for l in text.lines().filter(|l| l.contains("URING_CMD")).take(8) {
        c.detail(l);
    }
    ensure!(
        after - before == N as f64,
        "{name}{{{label}}} went from {before} to {after}, want +{N}"
    );
    Ok(format!(
        "{N} passthrough reads -> {name}{{{label}}} +{}",
        after - before
    ))
}
