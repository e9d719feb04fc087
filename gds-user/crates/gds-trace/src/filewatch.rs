//! Which attached files changed on disk: inotify on each file a uprobe is attached to.
//!
//! A uprobe is a breakpoint at a file offset, put into every process that maps the file, now
//! and later. A library rewritten in place (`cat new > old`, `cp`, `rsync --inplace`: same
//! inode) keeps its probes at the old offsets, and the next program to map it crashes
//! (SIGSEGV) or, where an offset falls inside an instruction, computes garbage. The watch is
//! added through the agent's own descriptor of the file (`/proc/self/fd/N`), which names the
//! inode itself, in any mount namespace, deleted or not. `IN_MODIFY` comes with the first write
//! or truncation (an `O_TRUNC` open), before the writer can finish and another program map
//! the result; the cuFile thread waits on this descriptor and detaches at once.
//!
//! inotify does not see writes through a shared writable mapping; the periodic scan compares
//! each file's size and modification time with those at attach for that case.

use std::{
    collections::BTreeMap,
    fs::File,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
};

use super::procmaps::FileId;

/// Events that mean the content may have changed.
const MASK: u32 = libc::IN_MODIFY | libc::IN_CLOSE_WRITE;

/// One inotify instance and the files it watches.
pub struct FileWatch {
    fd: OwnedFd,
    by_wd: BTreeMap<i32, FileId>,
}

/// What a read of the events found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub files: Vec<FileId>,
    /// The kernel's queue overflowed: any file may have changed.
    pub overflow: bool,
}

impl FileWatch {
    pub fn new() -> io::Result<FileWatch> {
        // SAFETY: no pointers.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new descriptor we own.
        Ok(FileWatch {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            by_wd: BTreeMap::new(),
        })
    }

    /// Watches `file` (open) as `id`. Watching the same inode twice gives the same watch.
    pub fn add(&mut self, file: &File, id: FileId) -> io::Result<()> {
        let path = std::ffi::CString::new(format!("/proc/self/fd/{}", file.as_raw_fd()))
            .map_err(io::Error::other)?;
        // SAFETY: valid descriptor and NUL-terminated path.
        let wd = unsafe { libc::inotify_add_watch(self.fd.as_raw_fd(), path.as_ptr(), MASK) };
        if wd < 0 {
            return Err(io::Error::last_os_error());
        }
        self.by_wd.insert(wd, id);
        Ok(())
    }

    /// Stops watching `id` (its file was detached).
    pub fn remove(&mut self, id: FileId) {
        let wds: Vec<i32> = self
            .by_wd
            .iter()
            .filter(|(_, f)| **f == id)
            .map(|(w, _)| *w)
            .collect();
        for wd in wds {
            self.by_wd.remove(&wd);
            // SAFETY: plain descriptor and watch numbers.
            unsafe { libc::inotify_rm_watch(self.fd.as_raw_fd(), wd) };
        }
    }

    /// The files that changed since the last call (never blocks).
    pub fn changes(&mut self) -> Changes {
        let mut out = Changes::default();
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: buffer of the given length.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                break;
            }
            let mut at = 0usize;
            let n = n as usize;
            const HEAD: usize = std::mem::size_of::<libc::inotify_event>();
            while at + HEAD <= n {
                // SAFETY: the kernel writes whole events; read unaligned.
                let ev: libc::inotify_event =
                    unsafe { std::ptr::read_unaligned(buf[at..].as_ptr().cast()) };
                if ev.mask & libc::IN_Q_OVERFLOW != 0 {
                    out.overflow = true;
                }
                if ev.mask & libc::IN_IGNORED != 0 {
                    self.by_wd.remove(&ev.wd);
                } else if let Some(id) = self.by_wd.get(&ev.wd)
                    && !out.files.contains(id)
                {
                    out.files.push(*id);
                }
                at += HEAD + ev.len as usize;
            }
        }
        out
    }

    /// For `poll`: readable when a change is waiting.
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A rewrite in place (truncating open, then write) is seen before the writer closes, and
    /// a file not written is not reported.
    #[test]
    fn in_place_rewrite_is_seen_at_the_truncating_open() {
        let dir = std::env::temp_dir().join(format!("gds-watch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b) = (dir.join("liba.so"), dir.join("libb.so"));
        std::fs::write(&a, b"old").unwrap();
        std::fs::write(&b, b"old").unwrap();
        let mut w = FileWatch::new().unwrap();
        let (ia, ib) = (FileId { dev: 1, ino: 1 }, FileId { dev: 1, ino: 2 });
        w.add(&File::open(&a).unwrap(), ia).unwrap();
        w.add(&File::open(&b).unwrap(), ib).unwrap();
        assert_eq!(w.changes(), Changes::default());
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&a)
            .unwrap();
        assert_eq!(w.changes().files, [ia], "seen at the truncating open");
        f.write_all(b"new content").unwrap();
        drop(f);
        assert_eq!(w.changes().files, [ia]);
        w.remove(ia);
        std::fs::write(&a, b"again").unwrap();
        assert_eq!(w.changes(), Changes::default());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
