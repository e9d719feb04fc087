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

/// `PF_EXITING` in `/proc/PID/stat`'s flags field (include/linux/sched.h).
const PF_EXITING: u64 = 0x4;
/// TCP state LISTEN in `/proc/net/tcp` (include/net/tcp_states.h).
const TCP_LISTEN: &str = "0A";
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

/// The first field after `comm` (state) and the flags (field 9) of a `/proc/PID/stat` text.
pub fn parse_stat(stat: &str) -> Option<(char, u64)> {
    // comm may hold spaces and parentheses: the fields follow the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut f = rest.split_whitespace();
    let state = f.next()?.chars().next()?;
    // state, ppid, pgrp, session, tty_nr, tpgid, flags.
    let flags = f.nth(5)?.parse().ok()?;
    Some((state, flags))
}

fn holder(proc: &Path, pid: u32, owns_socket: bool) -> Option<Holder> {
    let dir = proc.join(pid.to_string());
    let (state, flags) = parse_stat(&std::fs::read_to_string(dir.join("stat")).ok()?)?;
    let comm = std::fs::read_to_string(dir.join("comm")).ok()?;
    Some(Holder {
        pid,
        comm: comm.trim_end().to_owned(),
        state,
        exiting: flags & PF_EXITING != 0 || matches!(state, 'Z' | 'X'),
        owns_socket,
    })
}

/// Inodes of the sockets listening on `port` in one `/proc/net/tcp` text.
pub fn listening_inodes(table: &str, port: u16) -> Vec<u64> {
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let local_port = f.get(1)?.rsplit(':').next()?;
            (u16::from_str_radix(local_port, 16).ok()? == port && *f.get(3)? == TCP_LISTEN)
                .then(|| f.get(9)?.parse().ok())
                .flatten()
        })
        .collect()
}

/// The process holding a listening socket on `port` (read under `proc`, normally `/proc`),
/// else another process named gds-agent, else None. Never this process.
pub fn find(proc: &Path, port: u16) -> Option<Holder> {
    let me = std::process::id();
    let mut inodes = Vec::new();
    for table in ["net/tcp", "net/tcp6"] {
        if let Ok(t) = std::fs::read_to_string(proc.join(table)) {
            inodes.extend(listening_inodes(&t, port));
        }
    }
    let targets: Vec<String> = inodes.iter().map(|i| format!("socket:[{i}]")).collect();
    let pids: Vec<u32> = std::fs::read_dir(proc)
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|&p| p != me)
        .take(MAX_PROCESSES_SCANNED)
        .collect();
    if !targets.is_empty() {
        for &pid in &pids {
            let Ok(fds) = std::fs::read_dir(proc.join(format!("{pid}/fd"))) else {
                continue;
            };
            let owns = fds.flatten().any(|fd| {
                std::fs::read_link(fd.path())
                    .is_ok_and(|l| targets.iter().any(|t| l.as_os_str() == t.as_str()))
            });
            if owns && let Some(h) = holder(proc, pid, true) {
                return Some(h);
            }
        }
    }
    // The socket was not found: a process that is exiting has given up its fd table already
    // (the last thread releases the files after `task->files` is cleared), and another
    // process's fds may be unreadable. An exiting gds-agent is the likely holder, then any.
    let agents: Vec<Holder> = pids
        .iter()
        .filter_map(|&pid| holder(proc, pid, false))
        .filter(Holder::is_agent)
        .collect();
    agents
        .iter()
        .find(|h| h.exiting)
        .or(agents.first())
        .cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_state_and_flags_after_a_comm_with_parentheses() {
        // An agent releasing its uprobes after SIGKILL: D, PF_EXITING among its flags.
        let stat = "4242 (gds) (agent) D 1 4242 4242 0 -1 4194884 0 0 0 0 5 3 0 0 20 0 1 0";
        assert_eq!(parse_stat(stat), Some(('D', 0x400244)));
        assert_eq!(0x400244 & PF_EXITING, PF_EXITING);
        assert_eq!(parse_stat("12 (x"), None);
    }

    #[test]
    fn finds_listening_sockets_by_port() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
           0: 0100007F:24F5 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 31337 1 0 100 0 0 10 0\n\
           1: 0100007F:24F5 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 31338 1 0 100 0 0 10 0\n\
           2: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 99 1 0 100 0 0 10 0\n";
        assert_eq!(listening_inodes(table, 9461), vec![31337]);
        assert_eq!(listening_inodes(table, 22), vec![99]);
        assert!(listening_inodes(table, 80).is_empty());
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
