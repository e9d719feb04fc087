//! Dropping capabilities once the tracing programs are attached.
//!
//! Loading and attaching needs CAP_BPF + CAP_PERFMON (or root). After that the agent only uses
//! what it already holds or what anyone may read: map lookups through its own map fds, the
//! mmapped in-flight slot table, the ring buffer (mmapped, polled through its fd), the listening
//! socket, and world-readable /proc and /sys files. None of that needs a capability (since
//! Linux 6.5 the bpf(2) commands on an fd the caller holds are not gated on CAP_BPF), so the
//! agent keeps nothing: a bug in the HTTP server or a parser then cannot load programs, read
//! kernel memory or mount filesystems. Kernels before 6.5 with
//! `kernel.unprivileged_bpf_disabled` set still gate map lookups on CAP_BPF; that is found by
//! experiment ([`drop_after_attach`] tries a map read with CAP_BPF out of the effective set)
//! and CAP_BPF alone is kept there.
//!
//! The cuFile layer is the exception, because it attaches for as long as the agent runs
//! (libraries and processes come and go). Its one thread ([`drop_calling_thread_to`], then
//! exempted from [`drop_after_attach`]) keeps [`CUFILE_KEEP`]: CAP_PERFMON and CAP_SYS_ADMIN
//! (uprobe perf events: the dev VM's 6.18 refuses them with CAP_PERFMON alone, EACCES),
//! CAP_SYS_PTRACE (other processes' `/proc/PID/maps`), CAP_CHECKPOINT_RESTORE
//! (`/proc/PID/map_files`, how a library in a container or a deleted one is reached) and
//! CAP_DAC_READ_SEARCH (reading the library file) and CAP_LEASE (a read lease on a library of
//! another owner: a writer waits until its probes are gone, see `trace::lease`). That thread does nothing else: it reads
//! maps and ELF symbol tables and attaches; the HTTP server, the parsers of requests and every
//! other thread hold nothing.
//!
//! The stall-evidence thread is the other exception: it keeps [`EVIDENCE_KEEP`]
//! (CAP_SYS_PTRACE, CAP_SYS_ADMIN) to read other threads' wchan, system call and kernel
//! stack, once per stall detected, and does nothing else.
//!
//! Capabilities are per thread: the tokio workers were cloned while the process held
//! everything, so dropping on the calling thread alone would leave them privileged. Every other
//! thread is made to drop the same set from a signal handler (what libc does for setuid(2)),
//! then /proc/self/task/*/status is checked, so a thread that kept anything is an error, not a
//! silent leak.

use std::{
    fmt, io,
    sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use thiserror::Error;

mod caps;
mod cufile;
mod limits;

pub use caps::{
    CAP_BPF, CAP_CHECKPOINT_RESTORE, CAP_DAC_READ_SEARCH, CAP_PERFMON, CAP_SETPCAP, CAP_SYS_ADMIN,
    CAP_SYS_PTRACE, CapSet, ThreadCaps, cap_by_name, process_effective,
};
pub use cufile::{CUFILE_NEEDS, CufileAccess, Need, UnitCapsError, unit_capabilities};
pub use limits::{FdLimitHit, NofileRaise, fd_limit_hit, nofile, raise_nofile, warn_if_fd_limit};

/// What the cuFile thread keeps to attach after start (see the module documentation).
pub const CUFILE_KEEP: CapSet = CapSet(
    1u64 << CAP_PERFMON
        | 1u64 << CAP_SYS_ADMIN
        | 1u64 << CAP_SYS_PTRACE
        | 1u64 << CAP_CHECKPOINT_RESTORE
        | 1u64 << CAP_DAC_READ_SEARCH
        | 1u64 << CAP_LEASE,
);
/// Read leases on library files of other owners (`trace::lease`).
const CAP_LEASE: u32 = 28;

/// What the stall-evidence thread keeps (and nothing else in the agent but the cuFile thread):
/// CAP_SYS_PTRACE, because `/proc/PID/task/TID/{wchan,syscall,stack}` of another process
/// need ptrace access and a process holding more capabilities than the agent (any root
/// process, once the agent dropped) refuses it without; CAP_SYS_ADMIN, because `stack` also
/// requires it. The thread only reads those files, once per stall detected.
pub const EVIDENCE_KEEP: CapSet = CapSet(1u64 << CAP_SYS_ADMIN | 1u64 << CAP_SYS_PTRACE);

/// Drops the calling thread alone to `keep` (what it holds of it), bounding set included where
/// it may. For a thread that [`drop_after_attach`] then exempts. Returns its thread id.
pub fn drop_calling_thread_to(keep: CapSet) -> Result<i32, PrivilegeError> {
    let me = gettid();
    let caps = ThreadCaps::read(me)?;
    drop_this_thread(keep.0 & caps.permitted.0, caps.effective.has(CAP_SETPCAP)).map_err(
        |(step, e)| PrivilegeError::Syscall {
            step,
            tid: me,
            source: io::Error::from_raw_os_error(e),
        },
    )?;
    Ok(me)
}
use caps::{capset, errno};

impl ThreadCaps {
    fn read(tid: i32) -> Result<ThreadCaps, PrivilegeError> {
        let path = format!("/proc/self/task/{tid}/status");
        let text = std::fs::read_to_string(&path).map_err(|source| PrivilegeError::Read {
            path: path.clone(),
            source,
        })?;
        ThreadCaps::parse_status(&text).ok_or(PrivilegeError::Malformed { path })
    }
}

#[derive(Debug, Error)]
pub enum PrivilegeError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: io::Error },
    #[error("{path} has no Cap* lines (is /proc a procfs?)")]
    Malformed { path: String },
    #[error("{step} failed on thread {tid}: {source}")]
    Syscall {
        step: Step,
        tid: i32,
        source: io::Error,
    },
    #[error(
        "installing the handler of signal {signal} (used to drop capabilities on every thread) failed: {source}"
    )]
    Signal { signal: i32, source: io::Error },
    #[error(
        "{pending} thread(s) did not drop their capabilities within {timeout:?} (signal {signal} \
         blocked on them?); refusing to serve with privileged threads"
    )]
    Timeout {
        pending: usize,
        signal: i32,
        timeout: Duration,
    },
    #[error(
        "thread {tid} still holds capabilities after the drop (effective {effective}, permitted \
         {permitted}; expected {expected})"
    )]
    Kept {
        tid: i32,
        effective: CapSet,
        permitted: CapSet,
        expected: CapSet,
    },
}

/// One step of dropping capabilities on a thread (for error messages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    BoundingSet,
    Ambient,
    Capset,
    NoNewPrivs,
}

impl Step {
    /// In discriminant order (the signal handler reports a step by its index).
    const ALL: [Step; 4] = [
        Step::BoundingSet,
        Step::Ambient,
        Step::Capset,
        Step::NoNewPrivs,
    ];
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Step::BoundingSet => "dropping the capability bounding set (prctl PR_CAPBSET_DROP)",
            Step::Ambient => "clearing the ambient capabilities (prctl PR_CAP_AMBIENT)",
            Step::Capset => "dropping the effective/permitted/inheritable capabilities (capset)",
            Step::NoNewPrivs => "setting no_new_privs (prctl PR_SET_NO_NEW_PRIVS)",
        })
    }
}

/// What [`drop_after_attach`] did, for the log.
#[derive(Debug, Clone, Copy)]
pub struct Dropped {
    pub before: ThreadCaps,
    pub after: ThreadCaps,
    /// Capabilities kept because the agent failed without them.
    pub kept: CapSet,
    /// Threads that dropped (the calling one included).
    pub threads: usize,
}

impl fmt::Display for Dropped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dropped = CapSet(self.before.permitted.0 & !self.after.permitted.0);
        write!(
            f,
            "dropped {} capabilities on {} threads ({}); kept: {}",
            dropped.count(),
            self.threads,
            if dropped.count() > 8 {
                format!(
                    "permitted {:#x} → {:#x}",
                    self.before.permitted.0, self.after.permitted.0
                )
            } else {
                dropped.to_string()
            },
            self.kept,
        )?;
        if self.after.bounding == self.before.bounding {
            write!(
                f,
                "; bounding set left as is (no cap_setpcap; exec cannot regain anything: no_new_privs is set)"
            )
        } else {
            write!(f, "; bounding set now {}", self.after.bounding)
        }
    }
}

/// Drops the calling thread to `keep`: bounding set (when `bounding` and the thread holds
/// CAP_SETPCAP), ambient, then effective/permitted/inheritable; sets no_new_privs so an exec
/// (of a setuid or file-capability binary, or as uid 0) cannot regain anything.
/// Async-signal-safe: only syscalls, no allocation, so it also runs in the signal handler.
fn drop_this_thread(keep: u64, bounding: bool) -> Result<(), (Step, i32)> {
    // SAFETY (all prctl calls): integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err((Step::NoNewPrivs, errno()));
    }
    if bounding {
        for cap in 0..64u32 {
            if keep & (1u64 << cap) != 0 {
                continue;
            }
            let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
            // EINVAL: past the last capability this kernel knows.
            if rc != 0 && errno() != libc::EINVAL {
                return Err((Step::BoundingSet, errno()));
            }
        }
    }
    let rc = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    // EINVAL: a kernel without ambient capabilities (before 4.3), nothing to clear.
    if rc != 0 && errno() != libc::EINVAL {
        return Err((Step::Ambient, errno()));
    }
    capset(keep, keep, 0).map_err(|e| (Step::Capset, e))
}

/// Target of the signal handler: the set to keep and whether to drop the bounding set.
static TARGET_KEEP: AtomicU64 = AtomicU64::new(0);
static TARGET_BOUNDING: AtomicBool = AtomicBool::new(false);
static ACKED: AtomicUsize = AtomicUsize::new(0);
/// First failure in a handler: step index << 32 | errno (0: none).
static FAILED: AtomicU64 = AtomicU64::new(0);
static FAILED_TID: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_drop_signal(_sig: libc::c_int) {
    let saved = errno();
    let r = drop_this_thread(
        TARGET_KEEP.load(Ordering::SeqCst),
        TARGET_BOUNDING.load(Ordering::SeqCst),
    );
    if let Err((step, e)) = r {
        let code = (step as u64 + 1) << 32 | u64::from(e as u32);
        if FAILED
            .compare_exchange(0, code, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            FAILED_TID.store(gettid(), Ordering::SeqCst);
        }
    }
    ACKED.fetch_add(1, Ordering::SeqCst);
    // SAFETY: restoring this thread's errno.
    unsafe { *libc::__errno_location() = saved };
}

/// The signal the drop is broadcast with. glibc keeps SIGRTMIN..SIGRTMIN+2 for itself
/// (SIGRTMIN() returns the first free one); tokio only installs handlers it is asked for.
fn drop_signal() -> i32 {
    libc::SIGRTMIN() + 5
}

fn gettid() -> i32 {
    // SAFETY: no preconditions.
    unsafe { libc::gettid() }
}

fn task_ids() -> Result<Vec<i32>, PrivilegeError> {
    let dir = "/proc/self/task";
    let rd = std::fs::read_dir(dir).map_err(|source| PrivilegeError::Read {
        path: dir.into(),
        source,
    })?;
    Ok(rd
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect())
}

fn install_handler(signal: i32) -> Result<(), PrivilegeError> {
    // SAFETY: a zeroed sigaction is valid; we set the handler and an empty mask. The handler is
    // async-signal-safe and stays installed (a late signal must never meet SIG_DFL, which for
    // a real-time signal terminates the process).
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_drop_signal as *const () as usize;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(signal, &sa, std::ptr::null_mut()) != 0 {
            return Err(PrivilegeError::Signal {
                signal,
                source: io::Error::last_os_error(),
            });
        }
    }
    Ok(())
}

/// Makes every thread but the caller drop to the target set, then checks every thread.
fn drop_other_threads(
    keep: CapSet,
    bounding: bool,
    exempt: &[(i32, CapSet)],
) -> Result<usize, PrivilegeError> {
    let signal = drop_signal();
    TARGET_KEEP.store(keep.0, Ordering::SeqCst);
    TARGET_BOUNDING.store(bounding, Ordering::SeqCst);
    install_handler(signal)?;
    let me = gettid();
    // SAFETY: no preconditions.
    let pid = unsafe { libc::getpid() };
    let timeout = Duration::from_secs(5);
    // A thread could be cloned (still privileged) by one that had not dropped yet: go round
    // until every listed thread checks out; after five rounds of signals, one last check.
    const ROUNDS: usize = 5;
    for round in 0..=ROUNDS {
        let mut pending = Vec::new();
        let mut threads = 0;
        for tid in task_ids()? {
            let caps = match ThreadCaps::read(tid) {
                Ok(c) => c,
                // The thread exited in between.
                Err(PrivilegeError::Read { .. }) => continue,
                Err(e) => return Err(e),
            };
            threads += 1;
            if let Some(&(_, allowed)) = exempt.iter().find(|(t, _)| *t == tid) {
                let within = |c: CapSet| c.0 & !allowed.0 == 0;
                if !within(caps.permitted) || !within(caps.effective) || !caps.ambient.is_empty() {
                    return Err(PrivilegeError::Kept {
                        tid,
                        effective: caps.effective,
                        permitted: caps.permitted,
                        expected: allowed,
                    });
                }
                continue;
            }
            if caps.permitted != keep || caps.effective != keep || !caps.ambient.is_empty() {
                pending.push((tid, caps));
            }
        }
        // The caller has dropped already; any other thread still privileged at the end is
        // reported as the first one left.
        if let Some(&(tid, caps)) = pending
            .iter()
            .find(|(tid, _)| *tid == me)
            .or(pending.first().filter(|_| round == ROUNDS))
        {
            return Err(PrivilegeError::Kept {
                tid,
                effective: caps.effective,
                permitted: caps.permitted,
                expected: keep,
            });
        }
        if pending.is_empty() {
            return Ok(threads);
        }
        ACKED.store(0, Ordering::SeqCst);
        let mut sent = 0;
        for &(tid, _) in &pending {
            // SAFETY: tgkill on a thread of this process.
            if unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, signal) } == 0 {
                sent += 1;
            }
        }
        let deadline = Instant::now() + timeout;
        while ACKED.load(Ordering::SeqCst) < sent {
            if Instant::now() > deadline {
                return Err(PrivilegeError::Timeout {
                    pending: sent - ACKED.load(Ordering::SeqCst),
                    signal,
                    timeout,
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let failed = FAILED.swap(0, Ordering::SeqCst);
        if failed != 0 {
            let step = Step::ALL[((failed >> 32) as usize - 1).min(Step::ALL.len() - 1)];
            return Err(PrivilegeError::Syscall {
                step,
                tid: FAILED_TID.load(Ordering::SeqCst),
                source: io::Error::from_raw_os_error(failed as u32 as i32),
            });
        }
    }
    unreachable!("the last round returns")
}

/// Drops every capability the attached agent does not need, on every thread.
///
/// `still_works` is a read the agent does while serving (a map lookup by fd); it is tried
/// with CAP_BPF out of the effective set, and CAP_BPF is kept only if it then fails (kernels
/// before 6.5 with `unprivileged_bpf_disabled`). The bounding set is dropped too when the
/// process may (it holds CAP_SETPCAP, e.g. root); no_new_privs is set either way.
/// `exempt`: threads that dropped themselves already ([`drop_calling_thread_to`]) to at most
/// the set given with each; each is checked against its set instead.
pub fn drop_after_attach(
    still_works: impl Fn() -> bool,
    exempt: &[(i32, CapSet)],
) -> Result<Dropped, PrivilegeError> {
    let me = gettid();
    let syscall_err = |step: Step, e: i32| PrivilegeError::Syscall {
        step,
        tid: me,
        source: io::Error::from_raw_os_error(e),
    };
    // This thread's own sets, as capset will want them back after the experiment.
    let before = ThreadCaps::read(me)?;
    let (eff, prm, inh) = (before.effective, before.permitted, before.inheritable);

    // Experiment: serve a read with CAP_BPF out of the effective set.
    let mut keep = CapSet(0);
    if prm.has(CAP_BPF) || prm.has(CAP_SYS_ADMIN) {
        let without = eff.0 & !(1u64 << CAP_BPF | 1u64 << CAP_SYS_ADMIN);
        capset(without, prm.0, inh.0).map_err(|e| syscall_err(Step::Capset, e))?;
        let ok = still_works();
        capset(eff.0, prm.0, inh.0).map_err(|e| syscall_err(Step::Capset, e))?;
        if !ok {
            tracing::info!(
                "map reads need CAP_BPF on this kernel (before 6.5 with \
                 kernel.unprivileged_bpf_disabled): keeping it"
            );
            // CAP_SYS_ADMIN stands in for CAP_BPF where the process was given only that.
            let cap = if prm.has(CAP_BPF) {
                CAP_BPF
            } else {
                CAP_SYS_ADMIN
            };
            keep = CapSet(1u64 << cap);
        }
    }
    let bounding = eff.has(CAP_SETPCAP);
    drop_this_thread(keep.0, bounding).map_err(|(step, e)| syscall_err(step, e))?;
    let threads = drop_other_threads(keep, bounding, exempt)?;
    let after = ThreadCaps::read(me)?;
    Ok(Dropped {
        before,
        after,
        kept: keep,
        threads,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_capability_sets() {
        assert_eq!(CapSet(0).to_string(), "none");
        assert_eq!(
            CapSet(1 << CAP_BPF | 1 << CAP_PERFMON).to_string(),
            "cap_perfmon,cap_bpf"
        );
        assert_eq!(CapSet(1 << 50).to_string(), "cap_50");
    }

    #[test]
    fn steps_round_trip_through_their_index() {
        for (i, step) in Step::ALL.iter().enumerate() {
            assert_eq!(*step as usize, i);
        }
    }

    #[test]
    fn parses_status_lines() {
        // The lines procfs requires of a status file, and the five capability sets.
        let s = "Name:\tx\nState:\tS (sleeping)\nTgid:\t7\nPid:\t7\nPPid:\t1\nTracerPid:\t0\n\
                 Uid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\nFDSize:\t64\nGroups:\t0 \nThreads:\t1\n\
                 SigQ:\t0/1\nSigPnd:\t0\nShdPnd:\t0\nSigBlk:\t0\nSigIgn:\t0\nSigCgt:\t0\n\
                 CapInh:\t0000000000000000\nCapPrm:\t000000c000000000\n\
                 CapEff:\t000000c000000000\nCapBnd:\t000001ffffffffff\nCapAmb:\t0000000000000000\n";
        let c = ThreadCaps::parse_status(s).unwrap();
        assert!(c.effective.has(CAP_BPF) && c.effective.has(CAP_PERFMON));
        assert_eq!(c.effective.count(), 2);
        assert_eq!(c.bounding.count(), 41);
        assert!(ThreadCaps::parse_status("Name:\tx\n").is_none());
        // Before Linux 4.3 there is no ambient set to check: not a status this can trust.
        assert!(ThreadCaps::parse_status(&s.replace("CapAmb:", "Cap_Amb:")).is_none());
        // This process's own.
        let own = std::fs::read_to_string("/proc/self/status").unwrap();
        assert_eq!(
            ThreadCaps::parse_status(&own).map(|c| c.effective),
            Some(process_effective())
        );
    }
}
