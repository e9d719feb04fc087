//! `gds-agent top`: a live terminal view of a running agent (bpftop/iotop style).
//!
//! It reads the agent's model through `/debug/snapshot` (the same types the agent decodes
//! once and serves), either from an agent given with `--agent` or from one it starts itself
//! (standalone) and stops on exit. `model` computes, `ui` draws; `stalls` is the one-shot
//! `gds-agent stalls`.

pub mod evidence;
pub mod model;
mod nav;
pub mod stalls;
mod ui;

use std::{
    net::SocketAddr,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use clap::Args;
use ratatui::crossterm::{
    self,
    event::{self, Event, KeyCode, KeyEventKind, KeyModifiers},
};

use gds_api::{client, model::Snapshot};
use model::View;

#[derive(Args, Debug, Clone)]
pub struct TopArgs {
    /// Attach to this running agent (host:port). Without it, top starts its own agent.
    #[arg(long)]
    pub agent: Option<String>,
    /// Refresh interval.
    #[arg(long, default_value = "1s", value_parser = gds_host::units::parse_duration)]
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

/// `top` draws on a terminal and reads its keys from one; without one it stops at once (exit
/// status 2, like a refused argument) instead of failing inside the terminal library.
#[derive(Debug, thiserror::Error)]
#[error(
    "top needs a terminal, and its {0} is not one (for a one-shot view: `gds-agent stalls`, or \
     GET /debug/snapshot)"
)]
pub struct NoTerminal(&'static str);

impl NoTerminal {
    /// The exit status `gds-agent` ends with for this error.
    pub const EXIT_STATUS: u8 = 2;
}

/// Whether top can draw (stdout) and read keys (stdin, else the controlling terminal, as the
/// terminal library does).
fn check_terminal() -> Result<(), NoTerminal> {
    use std::io::IsTerminal as _;
    if !std::io::stdout().is_terminal() {
        return Err(NoTerminal("output"));
    }
    if !std::io::stdin().is_terminal() && std::fs::File::open("/dev/tty").is_err() {
        return Err(NoTerminal("input"));
    }
    Ok(())
}

/// How long top waits for the agent's first answer before taking the screen: an agent that is
/// not there (connection refused) answers at once, and is then reported as a plain error line
/// on an untouched terminal; a slow one gets the screen, with "waiting" on it, and `q` works.
const FIRST_ANSWER_GRACE: Duration = Duration::from_millis(300);

/// The longest the key loop sleeps before looking for a fetched snapshot: how late one may be
/// drawn. Keys wake the loop at once, so `q` does not wait for this.
const ANSWER_CHECK: Duration = Duration::from_millis(50);

/// Fetches snapshots on its own thread, so that the key loop never waits on the network: a
/// fetch may take up to `GDS_CLIENT_TIMEOUT`, `q` must quit at once.
struct Fetcher {
    ask: mpsc::Sender<()>,
    answers: mpsc::Receiver<Result<Snapshot>>,
    in_flight: bool,
}

impl Fetcher {
    fn spawn(addr: SocketAddr) -> Result<Fetcher> {
        let (ask, asked) = mpsc::channel::<()>();
        let (answer, answers) = mpsc::channel();
        // Ends when top drops its sender; a fetch still waiting then is cut off when the
        // process exits (it holds nothing but a socket).
        std::thread::Builder::new()
            .name("top-fetch".into())
            .spawn(move || {
                for () in asked {
                    if answer.send(read_snapshot(addr)).is_err() {
                        break;
                    }
                }
            })
            .context("starting top's fetch thread")?;
        Ok(Fetcher {
            ask,
            answers,
            in_flight: false,
        })
    }

    fn ask(&mut self) {
        if !self.in_flight {
            self.in_flight = self.ask.send(()).is_ok();
        }
    }

    fn answer(&mut self) -> Option<Result<Snapshot>> {
        let a = self.answers.try_recv().ok()?;
        self.in_flight = false;
        Some(a)
    }
}

/// `q`, Esc or Ctrl-C: how top quits before its first snapshot, when there is no stall list
/// to move in yet.
fn quits(e: &Event) -> bool {
    let Event::Key(k) = e else { return false };
    let ctrl_c = k.code == KeyCode::Char('c') && k.modifiers.contains(KeyModifiers::CONTROL);
    k.kind == KeyEventKind::Press && (matches!(k.code, KeyCode::Char('q') | KeyCode::Esc) || ctrl_c)
}

pub fn run(args: TopArgs) -> Result<()> {
    check_terminal()?;
    let (addr, _own) = match &args.agent {
        Some(a) => (client::parse_addr(a)?, None),
        None => {
            let (addr, own) = start_own_agent(&args.agent_args)?;
            (addr, Some(own))
        }
    };
    let mut fetcher = Fetcher::spawn(addr)?;
    fetcher.ask();
    // Keys are read raw from the start, so that `q` works during the grace too.
    crossterm::terminal::enable_raw_mode().context("setting up the terminal")?;
    let mut terminal: Option<ratatui::DefaultTerminal> = None;
    let result = ui_loop(&args, addr, &mut fetcher, &mut terminal);
    // The screen is given back before the agent top started (if any) is stopped on return.
    match terminal {
        Some(_) => ratatui::restore(),
        None => {
            let _ = crossterm::terminal::disable_raw_mode();
        }
    }
    result
}

fn ui_loop(
    args: &TopArgs,
    addr: SocketAddr,
    fetcher: &mut Fetcher,
    terminal: &mut Option<ratatui::DefaultTerminal>,
) -> Result<()> {
    let status = format!("agent {addr}");
    let started = Instant::now();
    let mut prev: Option<Snapshot> = None;
    let mut view: Option<View> = None;
    let mut nav = nav::Nav::default();
    let mut error: Option<String> = None;
    let mut next = started + args.interval;
    let mut dirty = true;
    loop {
        match fetcher.answer() {
            Some(Ok(cur)) => {
                let v = View::compute(prev.as_ref().unwrap_or(&cur), &cur);
                nav.follow(&v.stalls());
                view = Some(v);
                prev = Some(cur);
                error = None;
                dirty = true;
            }
            // Not there at all: a plain error, the screen untouched.
            Some(Err(e)) if terminal.is_none() => return Err(e),
            Some(Err(e)) => {
                error = Some(format!("{e:#}"));
                dirty = true;
            }
            None => {}
        }
        if terminal.is_none() && (prev.is_some() || started.elapsed() >= FIRST_ANSWER_GRACE) {
            *terminal = Some(ratatui::try_init().context("setting up the terminal")?);
            dirty = true;
        }
        if let (Some(t), true) = (terminal.as_mut(), dirty) {
            t.draw(|f| match (&nav.open, &view) {
                (Some(o), _) => ui::draw_evidence(f, o, &status, error.as_deref()),
                (None, Some(v)) => {
                    let selected = nav.selected(&v.stalls());
                    ui::draw(f, v, selected, &status, error.as_deref())
                }
                (None, None) => ui::draw_waiting(f, &status, error.as_deref()),
            })?;
            dirty = false;
        }
        let now = Instant::now();
        if now >= next && !fetcher.in_flight {
            fetcher.ask();
            next = now + args.interval;
        }
        let wait = if fetcher.in_flight {
            ANSWER_CHECK
        } else {
            ANSWER_CHECK.min(next.saturating_duration_since(now))
        };
        if event::poll(wait)? {
            let e = event::read()?;
            match (&e, &view) {
                (Event::Key(k), Some(v)) => match nav.key(k, &v.stalls()) {
                    nav::Outcome::Quit => return Ok(()),
                    nav::Outcome::Redraw => dirty = true,
                    nav::Outcome::Nothing => {}
                },
                (e, None) if quits(e) => return Ok(()),
                _ => {}
            }
            dirty |= matches!(e, Event::Resize(..));
        }
    }
}
