//! The open-file limit: raised at start, and named when it is hit.
//!
//! The agent holds one file descriptor per uprobe it attaches (a perf event each: 28 per
//! libcufile copy, up to 3 per cuFile process beneath it, 1 per dynamic loader file), besides
//! its maps, programs, ring buffers and one per HTTP client. systemd and most container
//! runtimes start services with a soft RLIMIT_NOFILE of 1024 and a much higher hard limit
//! (systemd: 524288), kept low only for programs that still use `select(2)`, which the agent
//! does not. So the soft limit is raised to the hard one at start ([`raise_nofile`]), and any
//! EMFILE/ENFILE on the way is reported as the limit it is ([`fd_limit_hit`]), at WARN, instead
//! of as an error about whatever file was being opened.

use std::{fmt, io};

/// RLIMIT_NOFILE of this process now: `(soft, hard)`; `u64::MAX` stands for unlimited.
pub fn nofile() -> io::Result<(u64, u64)> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid pointer to an rlimit to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((r.rlim_cur, r.rlim_max))
}

/// What [`raise_nofile`] did, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NofileRaise {
    pub before: u64,
    pub now: u64,
    pub hard: u64,
}

impl fmt::Display for NofileRaise {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = |v: u64| {
            if v == libc::RLIM_INFINITY {
                "unlimited".to_owned()
            } else {
                v.to_string()
            }
        };
        if self.before == self.now {
            write!(
                f,
                "file descriptor limit {} (RLIMIT_NOFILE soft = hard; each uprobe holds one: \
                 raise LimitNOFILE= if the log says it was reached)",
                n(self.now)
            )
        } else {
            write!(
                f,
                "file descriptor limit raised from {} to {} (RLIMIT_NOFILE hard limit; each \
                 uprobe holds one)",
                n(self.before),
                n(self.now)
            )
        }
    }
}

/// Raises the soft RLIMIT_NOFILE to the hard limit (no privilege needed). Returns what it
/// was and is now.
pub fn raise_nofile() -> io::Result<NofileRaise> {
    let (soft, hard) = nofile()?;
    if soft < hard {
        let r = libc::rlimit {
            rlim_cur: hard,
            rlim_max: hard,
        };
        // SAFETY: a valid pointer to an initialised rlimit.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    let (now, hard) = nofile()?;
    Ok(NofileRaise {
        before: soft,
        now,
        hard,
    })
}

/// An error that is the open-file limit, and which one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FdLimitHit {
    /// EMFILE: this process's RLIMIT_NOFILE (its soft limit at the time, if it could be read).
    Process { limit: Option<u64> },
    /// ENFILE: the system-wide `fs.file-max`.
    System,
}

impl fmt::Display for FdLimitHit {
    /// `file descriptor limit N reached (...what to do)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FdLimitHit::Process { limit: Some(n) } => write!(
                f,
                "file descriptor limit {n} reached (RLIMIT_NOFILE; each uprobe holds one: raise \
                 LimitNOFILE= in the unit, or `ulimit -n`)"
            ),
            FdLimitHit::Process { limit: None } => f.write_str(
                "file descriptor limit reached (RLIMIT_NOFILE; each uprobe holds one: raise \
                 LimitNOFILE= in the unit, or `ulimit -n`)",
            ),
            FdLimitHit::System => f.write_str(
                "system-wide file descriptor limit reached (ENFILE: sysctl fs.file-max)",
            ),
        }
    }
}

/// Whether `e`, or any error in its `source()` chain, is EMFILE or ENFILE (an `io::Error`
/// anywhere in the chain: aya's `SyscallError`, a `ProgramError`, a `TraceError`, ...).
pub fn fd_limit_hit(e: &(dyn std::error::Error + 'static)) -> Option<FdLimitHit> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<io::Error>() {
            match io.raw_os_error() {
                Some(libc::EMFILE) => {
                    return Some(FdLimitHit::Process {
                        limit: nofile().ok().map(|(soft, _)| soft),
                    });
                }
                Some(libc::ENFILE) => return Some(FdLimitHit::System),
                _ => {}
            }
        }
        cur = err.source();
    }
    None
}

/// Logs `what` failed at WARN with the limit's message if `e` is the open-file limit; returns
/// whether it was. For every place that opens file descriptors and would otherwise report the
/// failure as something else (a vanished process, a library that does not attach).
pub fn warn_if_fd_limit(e: &(dyn std::error::Error + 'static), what: &str) -> bool {
    match fd_limit_hit(e) {
        Some(hit) => {
            tracing::warn!("{what}: {hit}");
            true
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] io::Error);

    #[test]
    fn finds_emfile_anywhere_in_the_chain() {
        let e = Outer(io::Error::from_raw_os_error(libc::EMFILE));
        let hit = fd_limit_hit(&e).expect("EMFILE beneath");
        assert!(
            hit.to_string().starts_with("file descriptor limit ")
                && hit.to_string().contains(" reached"),
            "{hit}"
        );
        let (soft, _) = nofile().unwrap();
        assert_eq!(hit, FdLimitHit::Process { limit: Some(soft) });
        assert_eq!(
            fd_limit_hit(&io::Error::from_raw_os_error(libc::ENFILE)),
            Some(FdLimitHit::System)
        );
        assert_eq!(fd_limit_hit(&Outer(io::Error::other("x"))), None);
        assert_eq!(
            fd_limit_hit(&io::Error::from_raw_os_error(libc::EPERM)),
            None
        );
    }

    /// In a child process (the limit is per process; the harness keeps its own): a soft
    /// limit of 64 under a hard 128 is raised to 128, and opening files past it gives an error
    /// recognised as that limit. The child does not allocate (other harness threads may hold
    /// the allocator's lock at fork); it reports by exit status.
    #[test]
    fn raises_the_soft_limit_and_recognises_a_real_emfile() {
        // SAFETY: fork; the child runs only syscalls and non-allocating code, then _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let code = (|| {
                let r = libc::rlimit {
                    rlim_cur: 64,
                    rlim_max: 128,
                };
                // SAFETY: a valid rlimit.
                if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) } != 0 {
                    return 2;
                }
                let raised = match raise_nofile() {
                    Ok(r) => r,
                    Err(_) => return 3,
                };
                if raised
                    != (NofileRaise {
                        before: 64,
                        now: 128,
                        hard: 128,
                    })
                {
                    return 4;
                }
                for _ in 0..200 {
                    // SAFETY: a NUL-terminated path.
                    if unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY) } < 0 {
                        let e = io::Error::last_os_error();
                        return match fd_limit_hit(&e) {
                            Some(FdLimitHit::Process { limit: Some(128) }) => 0,
                            _ => 5,
                        };
                    }
                }
                6
            })();
            // SAFETY: ends the child without running the harness's exit handlers.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(libc::WIFEXITED(status), "child status {status:#x}");
        assert_eq!(libc::WEXITSTATUS(status), 0, "see the child's return codes");
    }
}
