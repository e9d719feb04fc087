//! A restart while the port is held by another gds-agent (issue 21, item 6): after a SIGKILL
//! with many uprobe links the old process releases its files for tens of seconds and keeps the
//! port; the restart must say that the previous agent is still exiting, and wait for it
//! (bounded), instead of "maybe another gds-agent holds the port".
//!
//! Both holders are real gds-agent processes: one stopped with SIGSTOP (state T: not exiting,
//! it will not go away by itself), and one SIGKILLed while a thread of it is held, by this
//! test as its tracer, at the exit stop (`PTRACE_O_TRACEEXIT`) before it releases its files:
//! exactly the window a SIGKILLed agent spends releasing its uprobes (its leader is already a
//! zombie, the socket still open), made as long as the test wants.

mod common;

use std::{
    net::SocketAddr,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::{Agent, serial};

/// `gds-agent run --listen addr --pid <this test>` with its output in `log`, not waited for.
fn second_agent(addr: SocketAddr, log: &std::path::Path) -> std::process::Child {
    let out = std::fs::File::create(log).unwrap();
    Command::new(env!("CARGO_BIN_EXE_gds-agent"))
        .args(["run", "--listen", &addr.to_string()])
        .args(["--pid", &std::process::id().to_string()])
        .env("GDS_LOG", "info")
        .stdout(Stdio::null())
        .stderr(out)
        .spawn()
        .unwrap()
}

/// Waits up to `limit` for `ok`; panics with `what` and `log()`.
fn within(limit: Duration, what: &str, log: impl Fn() -> String, mut ok: impl FnMut() -> bool) {
    let t = Instant::now();
    while !ok() {
        assert!(
            t.elapsed() < limit,
            "{what}: not within {limit:?}\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A thread this test traces, stopped at its exit. [`Tracee::release`] (also on drop, when an
/// assertion fails) lets it exit and reaps it: a traced thread's exit is reported to its
/// tracer, and until the tracer collects it the agent's leader cannot be reaped either.
struct Tracee(Option<i32>);

impl Tracee {
    fn release(&mut self) {
        let Some(tid) = self.0.take() else {
            return;
        };
        // SAFETY: PTRACE_CONT on our stopped tracee, then waiting for its exit.
        unsafe {
            libc::ptrace(
                libc::PTRACE_CONT,
                tid,
                std::ptr::null_mut::<libc::c_void>(),
                std::ptr::null_mut::<libc::c_void>(),
            );
            let mut status = 0;
            libc::waitpid(tid, &mut status, libc::__WALL);
        }
    }
}

impl Drop for Tracee {
    fn drop(&mut self) {
        self.release();
    }
}

fn state_of(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..]
        .split_whitespace()
        .next()?
        .chars()
        .next()
}

#[test]
fn restart_names_a_stopped_agent_holding_the_port() {
    let _g = serial();
    let first = Agent::start(&["--pid", &std::process::id().to_string()]);
    let pid = first.pid();
    // SAFETY: signals to our own child.
    unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
    within(Duration::from_secs(5), "stopped", String::new, || {
        state_of(pid) == Some('T')
    });
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("second.log");
    let t = Instant::now();
    let status = second_agent(first.addr, &log).wait().unwrap();
    let took = t.elapsed();
    let text = std::fs::read_to_string(&log).unwrap();
    unsafe { libc::kill(pid as i32, libc::SIGCONT) };
    assert_eq!(status.code(), Some(1), "{text}");
    let want = format!(
        "process {pid} (gds-agent, state T: stopped) holds the port: another gds-agent, \
         stopped, not exiting; resume or end it (kill -CONT {pid} / kill {pid})"
    );
    assert!(text.contains(&want), "says {want:?}:\n{text}");
    assert!(
        !text.contains("waiting up to"),
        "a stopped agent is not waited for:\n{text}"
    );
    assert!(
        took < Duration::from_secs(10),
        "failed at once, not after {took:?}"
    );
    let (_, log) = first.stop();
    assert!(log.contains("SIGTERM"), "{log}");
}

#[test]
fn restart_waits_for_the_previous_agent_still_releasing() {
    let _g = serial();
    let first = Agent::start(&["--pid", &std::process::id().to_string()]);
    let pid = first.pid();
    let addr = first.addr;
    // A thread other than the leader: the leader exits (a zombie) while this one holds the
    // files at its exit stop, as the last thread of a SIGKILLed agent does while releasing.
    let tid: i32 = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .find(|&t: &i32| t != pid as i32)
        .expect("the agent has more than one thread");
    // SAFETY: ptrace and kill on our own child's thread / process.
    unsafe {
        assert_eq!(
            libc::ptrace(
                libc::PTRACE_SEIZE,
                tid,
                std::ptr::null_mut::<libc::c_void>(),
                libc::PTRACE_O_TRACEEXIT as usize as *mut libc::c_void,
            ),
            0,
            "PTRACE_SEIZE {tid}: {}",
            std::io::Error::last_os_error()
        );
        libc::kill(pid as i32, libc::SIGKILL);
    }
    let mut tracee = Tracee(Some(tid));
    // The traced thread reaches its exit stop (waited for by tid, as its tracer).
    let mut status = 0;
    // SAFETY: waiting for our tracee.
    let got = unsafe { libc::waitpid(tid, &mut status, libc::__WALL) };
    assert_eq!(got, tid, "{}", std::io::Error::last_os_error());
    assert_eq!(status >> 8, libc::SIGTRAP | (libc::PTRACE_EVENT_EXIT << 8));
    within(
        Duration::from_secs(5),
        "leader a zombie",
        String::new,
        || state_of(pid) == Some('Z'),
    );

    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("second.log");
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    let mut second = second_agent(addr, &log);
    let want = format!(
        "the previous gds-agent (pid {pid}, state Z: a zombie) is still releasing its probes; \
         it exits by itself, retry in a few seconds: waiting up to {}s for it",
        gds_user::http::PREVIOUS_AGENT_WAIT.as_secs()
    );
    // The new agent loads and attaches every program before it binds: under the parallel
    // tests of `cargo xtask test` that took over 10 s once; 30 s, as every test waits for an
    // agent to serve.
    within(Duration::from_secs(30), "the WARN", read, || {
        read().contains(&want)
    });
    assert!(read().contains("WARN"), "{}", read());
    // Still waiting, not failed, while the old one holds the port.
    std::thread::sleep(Duration::from_secs(1));
    assert!(second.try_wait().unwrap().is_none(), "{}", read());

    // Let the old one finish exiting: its files go, the port with them.
    let released = Instant::now();
    tracee.release();
    gds_api::client::wait_serving(addr, &mut second, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}\n{}", read()));
    eprintln!(
        "serving {:?} after the old agent exited",
        released.elapsed()
    );
    // SAFETY: stopping our own child.
    unsafe { libc::kill(second.id() as i32, libc::SIGTERM) };
    let status = second.wait().unwrap();
    assert!(status.success(), "{status}\n{}", read());
    drop(first);
}
