//! `gds-agent top`: a live terminal view of a running agent (bpftop/iotop style).
//!
//! It reads the agent's model through `/debug/snapshot` (the same types the agent decodes
//! once and serves), either from an agent given with `--agent` or from one it starts itself
//! (standalone) and stops on exit. `model` computes, `ui` draws; `stalls` is the one-shot
//! `gds-agent stalls`.

pub mod model;
pub mod stalls;
mod ui;

use std::{
    net::SocketAddr,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use clap::Args;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};

use crate::{client, model::Snapshot};
use model::View;

#[derive(Args, Debug, Clone)]
pub struct TopArgs {
    /// Attach to this running agent (host:port). Without it, top starts its own agent.
    #[arg(long)]
    pub agent: Option<String>,
    /// Refresh interval.
    #[arg(long, default_value = "1s", value_parser = crate::units::parse_duration)]
    pub interval: Duration,
    /// Standalone mode: arguments for the agent it starts (e.g. --pid 1234 --stall-threshold 500ms).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub agent_args: Vec<String>,
}

/// An agent started by `top` itself, stopped on drop.
struct OwnAgent(Child);

impl Drop for OwnAgent {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

fn start_own_agent(args: &[String]) -> Result<(SocketAddr, OwnAgent)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let exe = std::env::current_exe().context("locating gds-agent")?;
    let child = Command::new(exe)
        .arg("run")
        .arg("--listen")
        .arg(addr.to_string())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting the agent")?;
    let mut own = OwnAgent(child);
    if let Err(e) = client::wait_serving(addr, &mut own.0, Duration::from_secs(30)) {
        let mut err = String::new();
        if let Some(mut stderr) = own.0.stderr.take() {
            use std::io::Read as _;
            // The agent has exited (or is stuck): whatever it said is the reason.
            if own.0.try_wait().ok().flatten().is_some() {
                let _ = stderr.read_to_string(&mut err);
            }
        }
        bail!("the agent top started did not serve: {e}\n{err}");
    }
    // Its log would scribble over the screen: drain it quietly.
    if let Some(mut e) = own.0.stderr.take() {
        std::thread::spawn(move || std::io::copy(&mut e, &mut std::io::sink()));
    }
    Ok((addr, own))
}

/// One `/debug/snapshot` of the agent at `addr`, in the model's types.
pub fn read_snapshot(addr: SocketAddr) -> Result<Snapshot> {
    let body = client::get(addr, "/debug/snapshot")?;
    serde_json::from_str(&body)
        .with_context(|| format!("the agent at {addr} sent a /debug/snapshot this top cannot read"))
}

pub fn run(args: TopArgs) -> Result<()> {
    let (addr, _own) = match &args.agent {
        Some(a) => (client::parse_addr(a)?, None),
        None => {
            let (addr, own) = start_own_agent(&args.agent_args)?;
            (addr, Some(own))
        }
    };
    let mut prev = read_snapshot(addr)?;
    let status = format!("agent {addr}");
    let mut terminal = ratatui::init();
    let result = (|| -> Result<()> {
        let mut view = View::compute(&prev, &prev);
        let mut error: Option<String> = None;
        let mut next = Instant::now() + args.interval;
        loop {
            terminal.draw(|f| ui::draw(f, &view, &status, error.as_deref()))?;
            let wait = next.saturating_duration_since(Instant::now());
            if event::poll(wait)? {
                if let Event::Key(k) = event::read()? {
                    let ctrl_c =
                        k.code == KeyCode::Char('c') && k.modifiers.contains(KeyModifiers::CONTROL);
                    if k.kind == KeyEventKind::Press
                        && (matches!(k.code, KeyCode::Char('q') | KeyCode::Esc) || ctrl_c)
                    {
                        return Ok(());
                    }
                }
                continue;
            }
            next = Instant::now() + args.interval;
            match read_snapshot(addr) {
                Ok(cur) => {
                    view = View::compute(&prev, &cur);
                    prev = cur;
                    error = None;
                }
                Err(e) => error = Some(format!("{e:#}")),
            }
        }
    })();
    ratatui::restore();
    result
}
