//! Read leases on attached files: a writer waits until the agent has detached.
//!
//! A uprobe stays a breakpoint at a file offset for as long as it is attached, in every process
//! that maps the file later. If the file is rewritten in place (`cat new > old`, `cp`,
//! `rsync --inplace`: the same inode), a program that maps it next gets breakpoints at the old
//! offsets: it crashed (SIGSEGV) 2 times of 2 when this was tried, and where an offset falls
//! inside an instruction the result is silent corruption. Watching for the change (inotify) is
//! not enough: closing a uprobe waits for an RCU grace period, and the kernel closes them one
//! at a time (under `event_mutex`), so a library's 28 probes take seconds to go, long after
//! the writer finished and the next program started.
//!
//! A read lease (`F_SETLEASE`, `F_RDLCK`) turns it around: any open of the file for writing,
//! and any truncation, first *breaks the lease*: the kernel signals the lease holder and makes
//! the writer wait until the holder lets go (or `/proc/sys/fs/lease-break-time` passes, 45 s by
//! default). The cuFile thread receives the signal (thread-directed, read with a `signalfd`),
//! closes the file's links, then closes the file, which ends the lease and lets the writer go:
//! no process can map the new content while a probe is left. A lease needs the file's owner or
//! CAP_LEASE (kept by the cuFile thread), and a file system that supports them (local ones and
//! overlayfs do; NFS does not): where it cannot be taken, inotify remains, and the log says so.

use std::{
    fs::File,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
};

/// The signal lease breaks are sent with: a real-time one, queued with the descriptor.
/// glibc keeps SIGRTMIN..+2; `privileges` uses SIGRTMIN+5.
pub fn signal() -> i32 {
    libc::SIGRTMIN() + 6
}

// From <fcntl.h> / <linux/fcntl.h>; not in the libc crate.
const F_SETSIG: libc::c_int = 10;
const F_SETOWN_EX: libc::c_int = 15;
const F_OWNER_TID: libc::c_int = 0;

/// `struct f_owner_ex`.
#[repr(C)]
struct OwnerEx {
    kind: libc::c_int,
    pid: libc::pid_t,
}

/// What taking a lease gave.
#[derive(Debug)]
pub enum Lease {
    Held,
    /// Being written, or a writer waits: not now.
    Busy,
    /// The file system (or the rights held) allow no lease: inotify only.
    Unsupported(io::Error),
}

/// Lease breaks for the calling thread (see the module documentation).
pub struct Leases {
    sfd: OwnedFd,
    tid: i32,
}

impl Leases {
    /// On the thread that will hold the leases and handle their breaks: blocks the signal in
    /// it (so it waits for the `signalfd` rather than killing the process) and opens the
    /// `signalfd`.
    pub fn for_this_thread() -> io::Result<Leases> {
        // SAFETY: sigset functions on a local set; pthread_sigmask on the calling thread.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, signal());
            let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            if rc != 0 {
                return Err(io::Error::from_raw_os_error(rc));
            }
            let fd = libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(Leases {
                sfd: OwnedFd::from_raw_fd(fd),
                tid: libc::gettid(),
            })
        }
    }

    /// Takes a read lease on `file` (opened read-only), its breaks signalled to this thread.
    pub fn take(&self, file: &File) -> io::Result<()> {
        let fd = file.as_raw_fd();
        let owner = OwnerEx {
            kind: F_OWNER_TID,
            pid: self.tid,
        };
        // SAFETY: fcntl on a descriptor we own, with a valid owner struct.
        unsafe {
            if libc::fcntl(fd, F_SETSIG, signal()) != 0
                || libc::fcntl(fd, F_SETOWN_EX, &owner) != 0
                || libc::fcntl(fd, libc::F_SETLEASE, libc::F_RDLCK) != 0
            {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }

    /// Takes the lease before anything is attached to the file: a writer that comes later
    /// waits for the agent. [`Lease::Busy`] while the file is open for writing or a lease of
    /// it is being broken (a writer is waiting right now): attach it later, not now.
    pub fn try_take(&self, file: &File) -> Lease {
        match self.take(file) {
            Ok(()) => Lease::Held,
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => Lease::Busy,
            Err(e) => Lease::Unsupported(e),
        }
    }

    /// The descriptors whose lease is being broken (never blocks).
    pub fn broken(&self) -> Vec<RawFd> {
        let mut out = Vec::new();
        loop {
            // SAFETY: zeroed siginfo is valid; read fills whole records.
            let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
            let n = unsafe {
                libc::read(
                    self.sfd.as_raw_fd(),
                    (&raw mut info).cast(),
                    std::mem::size_of::<libc::signalfd_siginfo>(),
                )
            };
            if n != std::mem::size_of::<libc::signalfd_siginfo>() as isize {
                break;
            }
            if !out.contains(&info.ssi_fd) {
                out.push(info.ssi_fd);
            }
        }
        out
    }

    /// For `poll`: readable when a lease is being broken.
    pub fn raw_fd(&self) -> RawFd {
        self.sfd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// A writer opening the file blocks until the lease is let go, and the holder is told
    /// which descriptor.
    #[test]
    fn a_writer_waits_for_the_holder() {
        let dir = std::env::temp_dir().join(format!("gds-lease-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("libcufile.so.0");
        std::fs::write(&path, b"old").unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let p = path.clone();
        let holder = std::thread::spawn(move || {
            let leases = Leases::for_this_thread().unwrap();
            let f = File::open(&p).unwrap();
            leases.take(&f).unwrap();
            tx.send(()).unwrap();
            let t = Instant::now();
            let broken = loop {
                let b = leases.broken();
                if !b.is_empty() || t.elapsed() > Duration::from_secs(10) {
                    break b;
                }
                std::thread::sleep(Duration::from_millis(5));
            };
            assert_eq!(broken, [f.as_raw_fd()]);
            // The holder's work (closing probes) happens here; the writer waits.
            std::thread::sleep(Duration::from_millis(300));
            drop(f);
        });
        rx.recv().unwrap();
        let t = Instant::now();
        std::fs::write(&path, b"new").unwrap();
        let waited = t.elapsed();
        holder.join().unwrap();
        assert!(
            waited >= Duration::from_millis(300),
            "the writer went on after {waited:?}, before the holder let go"
        );
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
