//! Shared helpers for end-to-end tests: a real `gds-agent` process and a real scrape.
#![allow(dead_code)]

mod cufile;
mod throttle;

use std::{
    collections::BTreeMap,
    net::{SocketAddr, TcpListener},
    process::Command,
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

#[allow(unused_imports)]
pub use cufile::{
    Driver, LineChild, StandinFixtures, build_standin, cc, libcufile, require_libcufile,
};
use gds_api::client;
pub use gds_testkit::{promtext, service::Service};
#[allow(unused_imports)]
pub use throttle::{ThrottledLoop, throttled_pread};

/// Tests filter the tracer on their own pid, so two tests in one process would see each
/// other's requests. nextest runs one process per test; under plain `cargo test` this lock
/// serialises them.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// Held by every test that makes cuFile calls and checks the agent's global cuFile counters:
/// nextest runs test binaries in parallel, and every agent counts every process's calls, so
/// two such tests at once would see each other's. A lock file, since the tests are separate
/// processes; released when the guard drops (or the process dies).
pub fn cufile_lock() -> std::fs::File {
    use std::os::fd::AsRawFd as _;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(std::env::temp_dir().join("gds-tests-cufile.lock"))
        .expect("the cuFile tests' lock file");
    // SAFETY: a valid open descriptor; flock has no other precondition.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
    assert_eq!(rc, 0, "flock: {}", std::io::Error::last_os_error());
    f
}

pub fn require_root() {
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!("this end-to-end test loads eBPF programs: run it as root (cargo xtask test does)");
    }
}

/// The uid and gid the tests run the agent as when it must not be root.
pub const NOBODY: &str = "65534";

/// `setpriv` (util-linux) arguments that become uid/gid 65534 holding exactly `caps` (e.g.
/// "+bpf,+perfmon", or "" for none) as inheritable, ambient and bounding capabilities, so they
/// survive the exec of the agent. The program to run follows.
pub fn setpriv_nobody(caps: &str) -> Vec<String> {
    let set = format!("-all{}{caps}", if caps.is_empty() { "" } else { "," });
    vec![
        "setpriv".into(),
        format!("--reuid={NOBODY}"),
        format!("--regid={NOBODY}"),
        "--clear-groups".into(),
        format!("--inh-caps={set}"),
        format!("--ambient-caps={set}"),
        format!("--bounding-set={set}"),
    ]
}

/// `unshare` (util-linux) arguments that run `setup` in a private mount namespace (so it may
/// unmount or cover what it likes) and then exec the program that follows.
pub fn unshare_private(setup: &str) -> Vec<String> {
    ["unshare", "--mount", "--propagation", "private", "sh", "-c"]
        .into_iter()
        .map(String::from)
        .chain([format!("{setup}\nexec \"$@\""), "sh".into()])
        .collect()
}

/// Submits `n` NOPs from this process, one at a time, and waits for each.
pub fn nops(n: usize) {
    let mut ring = io_uring::IoUring::new(8).unwrap();
    for i in 0..n {
        let e = io_uring::opcode::Nop::new().build().user_data(i as u64);
        // SAFETY: a NOP references no memory.
        unsafe { ring.submission().push(&e).unwrap() };
        ring.submit_and_wait(1).unwrap();
        assert_eq!(ring.completion().next().unwrap().result(), 0);
    }
}

/// Submits `n` NOPs from this process; returns how many `agent` counted meanwhile.
pub fn counted_nops(agent: &Agent, n: usize) -> f64 {
    let count = |m: Metrics| m.value("gds_uring_requests_total", &[("opcode", "NOP")]);
    let before = count(agent.scrape());
    nops(n);
    count(agent.scrape()) - before
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running agent on a free loopback port, stopped with SIGTERM on drop.
pub struct Agent {
    pub service: Service,
    pub addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Agent {
    /// Starts `gds-agent run --listen <free port> <args>` and waits until /metrics answers
    /// (the agent serves only after every program is attached).
    pub fn start(args: &[&str]) -> Agent {
        let bin = std::path::Path::new(env!("CARGO_BIN_EXE_gds-agent"));
        let mut agent = Agent::spawn(tempfile::tempdir().unwrap(), &[], bin, args);
        agent.wait_serving();
        agent
    }

    /// An agent watching this test process only, a request in flight past 500 ms a stall,
    /// scanned every 100 ms: the stall tests' setting.
    pub fn stall_watch() -> Agent {
        let me = std::process::id().to_string();
        Agent::start(&[
            "--pid",
            &me,
            "--stall-threshold",
            "500ms",
            "--stall-interval",
            "100ms",
        ])
    }

    /// Spawns `<wrapper...> <bin> run --listen <free port> <args>` without waiting. A wrapper
    /// (unshare, setpriv, ...) must end by exec'ing the agent, so the child's pid is the
    /// agent's. `dir` keeps the log, and whatever the wrapper needs (a copy of the binary),
    /// for as long as the agent lives.
    pub fn spawn(
        dir: tempfile::TempDir,
        wrapper: &[String],
        bin: &std::path::Path,
        args: &[&str],
    ) -> Agent {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let listen = addr.to_string();
        let args: Vec<&str> = ["--listen", listen.as_str()]
            .into_iter()
            .chain(args.iter().copied())
            .collect();
        Agent::launch(dir, wrapper, bin, addr, &args)
    }

    /// Starts `gds-agent run <args>` whose arguments say where it listens themselves (a
    /// `--listen` on all interfaces, a `--config` file), and waits until /metrics answers at
    /// `addr`.
    pub fn start_reaching(addr: SocketAddr, args: &[&str]) -> Agent {
        let bin = std::path::Path::new(env!("CARGO_BIN_EXE_gds-agent"));
        let mut agent = Agent::launch(tempfile::tempdir().unwrap(), &[], bin, addr, args);
        agent.wait_serving();
        agent
    }

    fn launch(
        dir: tempfile::TempDir,
        wrapper: &[String],
        bin: &std::path::Path,
        addr: SocketAddr,
        args: &[&str],
    ) -> Agent {
        require_root();
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        cmd.arg("run")
            .args(args)
            .env("GDS_LOG", "info")
            // A directory every user may enter (the agent may run as another user).
            .current_dir("/");
        let service = Service::spawn("gds-agent", &mut cmd, &dir.path().join("agent.log"))
            .expect("spawn gds-agent or its wrapper (unshare, setpriv: util-linux)");
        Agent {
            service,
            addr,
            _dir: dir,
        }
    }

    /// Waits until /metrics answers; panics with the log if the agent exits first or takes
    /// more than 30 s.
    pub fn wait_serving(&mut self) {
        if let Err(e) = self
            .service
            .wait_serving(self.addr, Duration::from_secs(30))
        {
            panic!("{e}");
        }
    }

    /// Waits (at most 30 s) for the agent to exit by itself; its status and log.
    pub fn wait_exit(mut self) -> (std::process::ExitStatus, String) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = self.service.child.try_wait() {
                return (status, self.log());
            }
            assert!(
                Instant::now() < deadline,
                "agent did not exit:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.service.pid()
    }

    pub fn log(&self) -> String {
        self.service.log()
    }

    pub fn scrape(&self) -> Metrics {
        Metrics::parse(&http_get(self.addr, "/metrics").expect("scrape /metrics"))
    }

    pub fn get(&self, path: &str) -> String {
        http_get(self.addr, path).expect("GET")
    }

    /// SIGTERM and wait; returns the exit status and the log.
    pub fn stop(self) -> (std::process::ExitStatus, String) {
        self.service.stop()
    }
}

/// GET over a real socket, through the library's agent client.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<String, client::ClientError> {
    client::get(addr, path)
}

/// Parsed text exposition: `name{sorted labels}` → value.
#[derive(Debug, Default)]
pub struct Metrics(pub BTreeMap<String, f64>);

impl Metrics {
    pub fn parse(text: &str) -> Metrics {
        let samples = promtext::samples(text).map(|s| match s {
            Ok(s) => (s.key(), s.value),
            Err(e) => panic!("not the text format: {e}"),
        });
        Metrics(samples.collect())
    }

    /// `gds_stalled_requests` of one layer, over every cause.
    pub fn stalled(&self, layer: &str) -> f64 {
        gds_api::model::CauseKind::ALL
            .iter()
            .map(|c| {
                self.value(
                    "gds_stalled_requests",
                    &[("layer", layer), ("cause", c.label())],
                )
            })
            .sum()
    }

    /// Value of `name{labels}`; labels as `k="v"` in any order; 0 when absent.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.0
            .get(&promtext::series_key(name, labels))
            .copied()
            .unwrap_or(0.0)
    }
}

/// An io_uring read on an empty pipe: it stays in flight until [`PipeRead::complete`] writes
/// to the pipe (the tests' way of holding a real request in flight for as long as they want).
pub struct PipeRead {
    pub ring: io_uring::IoUring,
    fds: [i32; 2],
    _buf: Box<[u8; 16]>,
}

impl PipeRead {
    pub fn submit(user_data: u64) -> PipeRead {
        Self::submit_with(user_data, io_uring::squeue::Flags::empty())
    }

    /// The read forced to an io-wq worker (`IOSQE_ASYNC`): the worker thread
    /// (`iou-wrk-<tid>`) blocks in the pipe's read, where a kernel stack shows it, instead of
    /// the request waiting on a poll wakeup no thread sleeps for.
    pub fn submit_async(user_data: u64) -> PipeRead {
        Self::submit_with(user_data, io_uring::squeue::Flags::ASYNC)
    }

    fn submit_with(user_data: u64, flags: io_uring::squeue::Flags) -> PipeRead {
        let mut fds = [0i32; 2];
        // SAFETY: valid array for pipe(2).
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        let mut ring = io_uring::IoUring::new(8).unwrap();
        let mut buf = Box::new([0u8; 16]);
        let sqe = io_uring::opcode::Read::new(io_uring::types::Fd(fds[0]), buf.as_mut_ptr(), 16)
            .build()
            .flags(flags)
            .user_data(user_data);
        // SAFETY: the buffer is owned by the PipeRead, which outlives the completion.
        unsafe { ring.submission().push(&sqe).unwrap() };
        ring.submit().unwrap();
        PipeRead {
            ring,
            fds,
            _buf: buf,
        }
    }

    /// Writes `data` to the pipe and returns the read's (user_data, result).
    pub fn complete(&mut self, data: &[u8]) -> (u64, i32) {
        // SAFETY: writing from a valid buffer to our pipe.
        let n = unsafe { libc::write(self.fds[1], data.as_ptr().cast(), data.len()) };
        assert_eq!(n, data.len() as isize);
        self.ring.submit_and_wait(1).unwrap();
        let cqe = self.ring.completion().next().unwrap();
        (cqe.user_data(), cqe.result())
    }
}

impl Drop for PipeRead {
    fn drop(&mut self) {
        // SAFETY: closing our own fds; the ring (dropped after) cancels anything left.
        unsafe {
            libc::close(self.fds[0]);
            libc::close(self.fds[1]);
        }
    }
}

/// Waits up to `limit` for `ok`, failing with `/debug/cufile` and the agent's log; returns how
/// long it took.
pub fn within(
    limit: Duration,
    what: &str,
    agent: &Agent,
    mut ok: impl FnMut() -> bool,
) -> Duration {
    let t = Instant::now();
    while !ok() {
        assert!(
            t.elapsed() < limit,
            "{what}: not within {limit:?}\n/debug/cufile: {}\nagent log:\n{}",
            agent.get("/debug/cufile"),
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    t.elapsed()
}

/// A process's resident memory, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// Serves `listener` as a hostile agent would: reads each request's head, then runs `answer`
/// on the connection (a thread per connection, for as long as the test process lives).
pub fn serve_after_head(listener: TcpListener, answer: fn(std::net::TcpStream)) {
    use std::io::Read as _;
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                let mut req = Vec::new();
                let mut byte = [0u8];
                while !req.ends_with(b"\r\n\r\n") && matches!(s.read(&mut byte), Ok(1)) {
                    req.push(byte[0]);
                }
                answer(s);
            });
        }
    });
}

/// Polls `/debug/stalls` every 20 ms for up to `within` until `find` picks something from the
/// report; panics with `what`, the report and the agent's log past it.
fn poll_stalls(
    agent: &Agent,
    within: Duration,
    what: &str,
    find: impl Fn(&serde_json::Value) -> Option<serde_json::Value>,
) -> serde_json::Value {
    let deadline = Instant::now() + within;
    loop {
        let report: serde_json::Value = serde_json::from_str(&agent.get("/debug/stalls")).unwrap();
        if let Some(s) = find(&report) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {report}\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An active stall on `/debug/stalls` matching `pick`, waited for up to `within`.
pub fn wait_stall(
    agent: &Agent,
    within: Duration,
    pick: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    poll_stalls(agent, within, "no such stall", |r| {
        r["active"].as_array()?.iter().find(|s| pick(s)).cloned()
    })
}

/// An ended stall matching `pick` (and none active), waited for up to `within`.
pub fn wait_ended(
    agent: &Agent,
    within: Duration,
    pick: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    poll_stalls(agent, within, "stall never ended", |r| {
        if r["active"].as_array()?.iter().any(&pick) {
            return None;
        }
        r["ended"].as_array()?.iter().find(|s| pick(s)).cloned()
    })
}
