//! Who holds a TCP port the agent could not bind, and whether it is going away by itself.
//!
//! After a SIGKILL the kernel releases a process's files one by one; each uprobe perf event
//! costs an RCU grace period or more, so an agent with ~1,400 uprobe links kept its listening
//! socket 27 s and sat in D state ~107 s (issue 21, item 6). A restart in that window met
//! EADDRINUSE. The holder is found from the listening socket's inode (`/proc/net/tcp{,6}`,
//! then `/proc/*/fd`), falling back to another process named `gds-agent`, an exiting one
//! first: an exiting process's fd table is detached before its files are released, and
//! another process's fds may be unreadable. A process is exiting when its `PF_EXITING` flag is
//! set (`/proc/PID/stat` field 9, set early in do_exit: D while releasing) or when its
//! thread-group leader is a zombie while other threads still hold the files (state Z).

use std::{fmt, path::Path};

use procfs::{
    FromReadSI,
    net::{TcpNetEntries, TcpState},
    process::{FDTarget, Process, Stat, all_processes_with_root},
};

/// `PF_EXITING` in `/proc/PID/stat`'s flags field (include/linux/sched.h).
const PF_EXITING: u32 = 0x4;
/// Processes looked at when searching `/proc/*/fd` for the socket: a bound on the work an
/// error message may do on a host with very many processes (a few ms per hundred).
const MAX_PROCESSES_SCANNED: usize = 100_000;

/// A process that holds (or may hold) the port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    pub comm: String,
    /// The state letter of `/proc/PID/stat` (R, S, D, T, t, Z, ...).
    pub state: char,
    pub exiting: bool,
    /// Found through the socket's inode (else: only a process named gds-agent).
    pub owns_socket: bool,
}

impl Holder {
    pub fn is_agent(&self) -> bool {
        self.comm == "gds-agent"
    }

    /// Whether it is an agent that will release the port by itself, soon.
    pub fn agent_exiting(&self) -> bool {
        self.is_agent() && self.exiting
    }

    fn state_words(&self) -> &'static str {
        match self.state {
            'R' => "running",
            'S' => "sleeping",
            'D' => "in uninterruptible sleep",
            'T' => "stopped",
            't' => "stopped by a tracer",
            'Z' => "a zombie",
            'I' => "idle",
            _ => "in an unusual state",
        }
    }
}

impl fmt::Display for Holder {
    /// What to tell the user about it, ending with what to do.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (pid, state, words) = (self.pid, self.state, self.state_words());
        if self.agent_exiting() {
            return write!(
                f,
                "the previous gds-agent (pid {pid}, state {state}: {words}) is still releasing \
                 its probes; it exits by itself, retry in a few seconds"
            );
        }
        let who = if self.owns_socket {
            format!(
                "process {pid} ({}, state {state}: {words}) holds the port",
                self.comm
            )
        } else {
            format!(
                "another process holds the port; gds-agent pid {pid} (state {state}: {words}) \
                 runs on this host and may be it"
            )
        };
        match (self.is_agent(), state) {
            (true, 'T' | 't') => write!(
                f,
                "{who}: another gds-agent, stopped, not exiting; resume or end it (kill -CONT \
                 {pid} / kill {pid}), or choose another port with --listen"
            ),
            (true, _) => write!(
                f,
                "{who}: another gds-agent is running; stop it first (systemctl stop gds-agent / \
                 kill {pid}) or choose another port with --listen"
            ),
            (false, _) => write!(f, "{who}; choose another with --listen"),
        }
    }
}

/// What `stat` says of one process (comm, state letter, `PF_EXITING`).
fn holder(stat: &Stat, owns_socket: bool) -> Holder {
    Holder {
        pid: stat.pid.unsigned_abs(),
        comm: stat.comm.clone(),
        state: stat.state,
        exiting: stat.flags & PF_EXITING != 0 || matches!(stat.state, 'Z' | 'X'),
        owns_socket,
    }
}

/// Inodes of the sockets listening on `port` in the TCP tables under `proc` (v4 and v6; a table
/// that is absent or unreadable is skipped, as with IPv6 disabled).
fn listening_inodes(proc: &Path, port: u16) -> Vec<u64> {
    let si = procfs::current_system_info();
    ["net/tcp", "net/tcp6"]
        .into_iter()
        .filter_map(|table| TcpNetEntries::from_file(proc.join(table), si).ok())
        .flat_map(|t| t.0)
        .filter(|e| e.local_address.port() == port && e.state == TcpState::Listen)
        .map(|e| e.inode)
        .collect()
}

/// Whether `p` has one of `inodes` among its open files (false when its fds are unreadable or
/// it exited meanwhile).
fn holds_socket(p: &Process, inodes: &[u64]) -> bool {
    p.fd().is_ok_and(|fds| {
        fds.flatten()
            .any(|fd| matches!(fd.target, FDTarget::Socket(i) if inodes.contains(&i)))
    })
}

/// The process holding a listening socket on `port` (read under `proc`, normally `/proc`),
/// else another process named gds-agent, else None. Never this process. A process that exits
/// while it is looked at is skipped.
pub fn find(proc: &Path, port: u16) -> Option<Holder> {
    let me = std::process::id();
    let inodes = listening_inodes(proc, port);
    // The socket's holder wins outright; gds-agents are kept for when it is not found.
    let mut agents = Vec::new();
    let processes = all_processes_with_root(proc)
        .ok()?
        .flatten()
        .filter(|p| p.pid().unsigned_abs() != me)
        .take(MAX_PROCESSES_SCANNED);
    for p in processes {
        let owns = !inodes.is_empty() && holds_socket(&p, &inodes);
        let Ok(stat) = p.stat() else { continue };
        let h = holder(&stat, owns);
        if owns {
            return Some(h);
        }
        if h.is_agent() {
            agents.push(h);
        }
    }
    // The socket was not found: a process that is exiting has given up its fd table already
    // (the last thread releases the files after `task->files` is cleared), and another
    // process's fds may be unreadable. An exiting gds-agent is the likely holder, then any.
    let exiting = agents.iter().position(|h| h.exiting).unwrap_or(0);
    (!agents.is_empty()).then(|| agents.swap_remove(exiting))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `/proc/PID/stat` line of an agent releasing its uprobes after SIGKILL: D, with
    /// `PF_EXITING` among its flags (0x400244), and a comm holding spaces and parentheses.
    const EXITING_STAT: &str = "4242 (gds) (agent) D 1 4242 4242 0 -1 4194884 98 0 0 0 5 3 0 0 \
        20 0 1 0 1312221 3133440 358 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0 \
        0 0 0 0 0 0 0 0\n";

    #[test]
    fn an_agent_in_do_exit_is_exiting() {
        use procfs::FromRead;
        let h = holder(&Stat::from_read(EXITING_STAT.as_bytes()).unwrap(), false);
        assert_eq!(
            (h.pid, h.comm.as_str(), h.state),
            (4242, "gds) (agent", 'D')
        );
        assert!(h.exiting);
        let sleeping = EXITING_STAT
            .replace(" D 1 ", " S 1 ")
            .replace("4194884", "4194304");
        assert!(!holder(&Stat::from_read(sleeping.as_bytes()).unwrap(), false).exiting);
    }

    #[test]
    fn finds_the_process_holding_a_listening_socket() {
        use std::os::{fd::AsRawFd, unix::process::CommandExt};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let fd = listener.as_raw_fd();
        let mut cmd = std::process::Command::new("sleep");
        cmd.arg("30");
        // SAFETY: fcntl is async-signal-safe; clearing close-on-exec in the child (its own fd
        // table) makes it keep the socket across exec, holding the port as another process would.
        unsafe {
            cmd.pre_exec(move || {
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            })
        };
        let mut child = cmd.spawn().unwrap();
        // This process holds the socket too, and is never the answer.
        let found = find(Path::new("/proc"), port);
        child.kill().unwrap();
        child.wait().unwrap();
        let h = found.expect("the child holds the port");
        assert_eq!((h.pid, h.comm.as_str()), (child.id(), "sleep"));
        assert!(h.owns_socket && !h.exiting, "{h:?}");
    }

    #[test]
    fn says_what_to_do_for_each_kind_of_holder() {
        let h = |comm: &str, state, exiting| Holder {
            pid: 7,
            comm: comm.into(),
            state,
            exiting,
            owns_socket: true,
        };
        let dying = h("gds-agent", 'D', true).to_string();
        assert!(
            dying.starts_with("the previous gds-agent (pid 7, state D")
                && dying.contains(
                    "still releasing its probes; it exits by itself, retry in a few seconds"
                ),
            "{dying}"
        );
        let stopped = h("gds-agent", 'T', false).to_string();
        assert!(stopped.contains("stopped, not exiting") && stopped.contains("kill -CONT 7"));
        let other = h("nginx", 'S', false).to_string();
        assert!(
            other.starts_with("process 7 (nginx, state S: sleeping) holds the port")
                && other.ends_with("choose another with --listen"),
            "{other}"
        );
    }
}
