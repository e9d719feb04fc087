//! A real blkio-throttled block read: a loop device over a file on the root disk and a cgroup
//! v1 group that throttles that disk (the stalls, top and alert tests' held block request).

use std::{
    os::{
        fd::AsRawFd as _,
        unix::fs::{MetadataExt as _, OpenOptionsExt as _},
    },
    path::{Path, PathBuf},
    process::Command,
    thread::JoinHandle,
    time::{Duration, Instant},
};

/// A loop device (direct I/O) over a file on the root disk, and a cgroup v1 blkio group that
/// throttles reads of that disk. A reader in the group reading the loop device has its block
/// request issued to the loop driver at once (the loop device has no rule), while the loop
/// worker's read of the file, charged to the reader's group (loop charges its I/O to the
/// submitter's cgroup), waits in the throttle: a block request held at the "device" for as
/// long as the throttle says, on a real kernel, with nothing mocked.
pub struct ThrottledLoop {
    pub dev: String,
    pub cgroup: PathBuf,
    /// `major:minor` of the throttled disk (the one under the loop device's file).
    disk: String,
    /// The group's rule file (`blkio.throttle.read_bps_device`, `…read_iops_device`).
    rule: &'static str,
    _dir: tempfile::TempDir,
}

const BLKIO: &str = "/sys/fs/cgroup/blkio";

impl ThrottledLoop {
    /// Reads throttled to `read_bps` bytes a second. `None` (with a SKIPPED line) where
    /// cgroup v1 blkio is not mounted; CI has it.
    pub fn new(read_bps: u64) -> Option<ThrottledLoop> {
        Self::with_rule("blkio.throttle.read_bps_device", read_bps)
    }

    /// Reads throttled to `read_iops` a second.
    pub fn new_iops(read_iops: u64) -> Option<ThrottledLoop> {
        Self::with_rule("blkio.throttle.read_iops_device", read_iops)
    }

    fn with_rule(rule: &'static str, limit: u64) -> Option<ThrottledLoop> {
        if !Path::new(BLKIO).join(rule).exists() {
            assert!(std::env::var_os("CI").is_none(), "{BLKIO} is missing");
            eprintln!("SKIPPED: no cgroup v1 blkio throttling at {BLKIO}");
            return None;
        }
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let file = dir.path().join("backing");
        std::fs::write(&file, vec![0x5au8; 4 << 20]).unwrap();
        let out = Command::new("losetup")
            .args(["--direct-io=on", "--show", "-f"])
            .arg(&file)
            .output()
            .expect("losetup");
        assert!(out.status.success(), "losetup: {out:?}");
        let dev = String::from_utf8(out.stdout).unwrap().trim().to_owned();
        // The whole disk under the file: throttle rules are per disk.
        let st = std::fs::metadata(&file).unwrap();
        let (major, minor) = (libc::major(st.dev()), libc::minor(st.dev()));
        let sys = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
        let disk = if sys.join("partition").exists() {
            std::fs::read_to_string(sys.join("../dev")).unwrap()
        } else {
            format!("{major}:{minor}")
        };
        let cgroup = Path::new(BLKIO).join(format!("gds-stall-{}", std::process::id()));
        let _ = std::fs::create_dir(&cgroup);
        std::fs::write(cgroup.join(rule), format!("{} {limit}", disk.trim())).unwrap();
        Some(ThrottledLoop {
            dev,
            cgroup,
            disk: disk.trim().to_owned(),
            rule,
            _dir: dir,
        })
    }

    pub fn name(&self) -> &str {
        self.dev.trim_start_matches("/dev/")
    }

    /// Sets the group's read limit (its rule's unit) on the disk; 0 removes it, which lets a
    /// held read go.
    pub fn set_read_bps(&self, limit: u64) {
        std::fs::write(
            self.cgroup.join(self.rule),
            format!("{} {limit}", self.disk),
        )
        .unwrap();
    }

    /// One O_DIRECT `pread` of `len` bytes at `offset` of the loop device, by a thread named
    /// `gds-stall-rd` in the throttled group (see [`throttled_pread`]).
    pub fn read(&self, offset: u64, len: usize) -> (u32, JoinHandle<(isize, Duration)>) {
        throttled_pread(
            "gds-stall-rd",
            &self.cgroup.join("tasks"),
            Path::new(&self.dev),
            offset,
            len,
        )
    }
}

/// One O_DIRECT `pread` of `len` bytes at `offset` of `path`, by a thread named `name` that
/// moves itself (alone: cgroup v1) into the group whose `tasks` file is given: its tid once it
/// is about to read, and what the read returned and took.
pub fn throttled_pread(
    name: &str,
    tasks: &Path,
    path: &Path,
    offset: u64,
    len: usize,
) -> (u32, JoinHandle<(isize, Duration)>) {
    let (path, tasks) = (path.to_owned(), tasks.to_owned());
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let reader = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            // SAFETY: gettid has no preconditions.
            let tid = unsafe { libc::gettid() };
            std::fs::write(&tasks, tid.to_string()).unwrap();
            let f = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECT)
                .open(&path)
                .unwrap();
            let layout = std::alloc::Layout::from_size_align(len, 4096).unwrap();
            // SAFETY: non-zero size; freed below with the same layout.
            let buf = unsafe { std::alloc::alloc(layout) };
            tid_tx.send(tid as u32).unwrap();
            let t = Instant::now();
            // SAFETY: buf holds len bytes.
            let n = unsafe { libc::pread(f.as_raw_fd(), buf.cast(), len, offset as i64) };
            let took = t.elapsed();
            // SAFETY: allocated above with this layout.
            unsafe { std::alloc::dealloc(buf, layout) };
            (n, took)
        })
        .unwrap();
    (tid_rx.recv().unwrap(), reader)
}

impl Drop for ThrottledLoop {
    fn drop(&mut self) {
        // A read still held (a test that failed) goes, so that the group can be removed and
        // the process can exit.
        let _ = std::fs::write(self.cgroup.join(self.rule), format!("{} 0", self.disk));
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
        let _ = std::fs::remove_dir(&self.cgroup);
    }
}
