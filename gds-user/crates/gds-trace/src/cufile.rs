//! cuFile tracing: every libcufile in use on the host, attached by file, and the libc calls
//! beneath it in the processes that use it.
//!
//! - **Finding libraries.** Every [`CufileTracing::refresh`] (the agent calls it every
//!   500 ms; a `dlopen` is seen sooner through the loader's notification) reads
//!   `/proc/*/maps` and keeps the processes that map a `libcufile.so*`: system CUDA, Python
//!   wheels, containers and private mount namespaces alike, since the kernel reaches each file
//!   through `/proc/PID/map_files` (see [`super::procmaps`]). Each file (device, inode) is
//!   opened once and attached once, through the agent's own descriptor, for every process that
//!   maps it; it is detached [`LINGER`] after no process maps it any more.
//! - **The API.** One uprobe and one uretprobe per function in [`SYMBOLS`], the operation as
//!   the cookie. Functions a copy does not export are listed as missing, not an error.
//! - **Beneath.** In each process that maps libcufile, uprobes on its libc's `pread64` and
//!   `pwrite64` (cuFile's compat path; libcufile imports them from libc) and, only where
//!   nvidia-fs is loaded, `ioctl` (its GDS path; the CUDA driver's many ioctls go through the
//!   same function, so it is not probed where it cannot matter). These are attached per
//!   process, so no other process pays for them.
//! - **USDT.** libcufile carries ~1300 stapsdt notes on x86_64 and none on aarch64; they are
//!   counted and their providers listed (`/debug/cufile`), not attached: the API probes and the
//!   calls beneath answer the path question on both architectures.
//!
//! **Never harm a watched program.** A uprobe is a breakpoint at a file offset in every process
//! that maps the file, now and later; at a wrong offset it crashes the program or corrupts what
//! it computes. So:
//! - every file attached to for all processes (libcufile copies, dynamic loaders) is watched
//!   ([`super::filewatch`]): a rewrite in place detaches it at once, before the writer is
//!   done, and a copy that changes while mapped is not traced again until its processes are
//!   gone (they run the new bytes at old addresses anyway, and say why in `not_traced`); the
//!   periodic scan also compares size and times, for writes through shared mappings;
//! - links are closed concurrently ([`super::release`]) and "detached" is logged once they
//!   are closed, not when they were handed over;
//! - probes scoped to one process (libc beneath cuFile) cannot fire in another one, and after
//!   the process exits in none: they are closed in the background;
//! - a library file is read only as [`super::elf`] allows (regular file, size cap, by offset)
//!   and never under a lock that the HTTP server or the other tracing threads take: only the
//!   perf-event and link syscalls run under the object lock.
//!
//! **Bounded.** Any local user can map files with these names: copies attached
//! ([`LIBRARIES_MAX`]), loaders ([`LOADERS_MAX`]), processes probed ([`PROCESSES_MAX`]), files
//! remembered as not traceable ([`FAILURES_MAX`]), log lines ([`LOG_BURST`] per minute) and the
//! time spent on loader notifications ([`NOTIFY_SHARE`]) are bounded; what a bound refused is
//! counted in [`Limits`] (`/debug/layers`, `/debug/cufile`) and logged at WARN once per kind.
//!
//! `p2pdma` (O_DIRECT I/O into GPU BAR memory, CUDA 12.8+) looks like compat from libc: what
//! tells it apart is the memory type of the buffer, which the block program checks
//! (`trace::peer`) and counts per process for the cuFile return to read.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
    sync::Mutex,
    time::{Duration, Instant, SystemTime},
};

use aya::{
    Ebpf,
    maps::{HashMap, MapData, PerCpuArray, PerCpuHashMap},
    programs::{
        UProbe,
        uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeLink, UProbeScope},
    },
};
use gds_common::HIST_BUCKETS;
use gds_common::cufile::{
    BENEATH_IOCTL, BENEATH_PREAD, BENEATH_PWRITE, CUFILE_OP_TABLE, CUFILE_OPS, CUFILE_PATHS,
    CUFILE_USERS, CufileCall, CufileCpuStats, CufileErrKey, CufileFileKey, CufileFileStats,
    CufileHandleKey, CufileOpStats, LIBC_ATTACHED, MAP_CUFILE_CALLS, MAP_CUFILE_CALLS_OTHER,
    MAP_CUFILE_ERRORS, MAP_CUFILE_ERRORS_OTHER, MAP_CUFILE_FILES, MAP_CUFILE_FILES_OTHER,
    MAP_CUFILE_HANDLES, MAP_CUFILE_HANDLES_OTHER, MAP_CUFILE_LIBC, MAP_CUFILE_OPS,
    MAP_CUFILE_STATS, USER_OTHER, USER_TRUSTED,
};
use gds_common::file::{FILE_SEES_ALL, FILE_SEES_NONE, MAP_FILE_SEES};

use super::{
    TraceError,
    elf::{self, LibSymbols},
    filewatch::FileWatch,
    lease::{Lease, Leases},
    procmaps::{self, FileId, Mapping},
    program,
    release::{Link, Releaser},
    take_map,
    umulti::MultiPrograms,
};
use gds_api::raw::{CufileRaw, LibraryFailure, LibraryInfo};

/// The traced functions and their operation, from the one table of operations
/// (`gds_common::cufile::CUFILE_OP_TABLE`). A traced function called from inside another
/// counts once, as the outer call (`Nested`).
pub fn traced_functions() -> impl Iterator<Item = (&'static str, u32)> {
    CUFILE_OP_TABLE
        .iter()
        .flat_map(|o| o.symbols.iter().map(move |s| (*s, o.op)))
}

/// libc functions probed beneath cuFile (`ioctl` only where nvidia-fs is loaded).
const BENEATH: &[(&str, u32)] = &[
    ("pread64", BENEATH_PREAD),
    ("pwrite64", BENEATH_PWRITE),
    ("ioctl", BENEATH_IOCTL),
];

const PROGRAMS: [&str; 4] = ["cufile_enter", "cufile_exit", "beneath_enter", "dl_notify"];

/// How long a library stays attached after its last process exited. Closing a uprobe takes the
/// kernel's `dup_mmap_sem` for writing and waits for an RCU grace period, during which every
/// other uprobe attach (and every fork on the host) waits: lingering makes a job that
/// restarts, or a loop of short processes, reuse the probes. Safe because the file is watched
/// meanwhile (see the module documentation).
pub const LINGER: Duration = Duration::from_secs(5);

/// Most libcufile copies attached at once (28 probes and file descriptors each). A host runs
/// a handful (system CUDA, a wheel per Python environment, one per container image); 50 copies
/// in one process were tried.
pub const LIBRARIES_MAX: usize = 64;
/// Most dynamic loaders with the dlopen notification (one probe each): one per distribution
/// image in use.
pub const LOADERS_MAX: usize = 64;
/// Most processes with libc probes beneath cuFile (2–3 probes and descriptors each).
pub const PROCESSES_MAX: usize = 2048;
/// Most files remembered as not traceable (listed in `not_traced`).
pub const FAILURES_MAX: usize = 64;
/// Log lines about files that cannot be traced, per minute; the rest are counted.
pub const LOG_BURST: u32 = 16;
/// Share of one core the loader's notifications may take (re-reading the notifying
/// processes' maps); past it, notifications wait for the periodic scan. An unprivileged
/// `dlopen`/`dlclose` loop held the cuFile thread at 83 % of a core without it.
pub const NOTIFY_SHARE: f64 = 0.2;
/// How long closing links may hold up shutdown (systemd's stop timeout in the shipped unit is
/// 20 s).
const SHUTDOWN_CLOSE: Duration = Duration::from_secs(15);

/// What a file looked like when attached: size and modification time. Not the change time:
/// replacing a library (rename over it) or a `chmod` changes that, not the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp(u64, i64, i64);

impl Stamp {
    fn of(file: &File) -> Option<Stamp> {
        let m = file.metadata().ok()?;
        Some(Stamp(m.size(), m.mtime(), m.mtime_nsec()))
    }
}

/// A file the agent holds open and attached to for every process that maps it.
struct Held {
    file: File,
    stamp: Option<Stamp>,
    links: Vec<Link>,
    /// Whether a read lease guards it (taken before its links were made).
    leased: bool,
}

impl Held {
    /// `/proc/self/fd/N`: the inode itself, for the kernel's uprobe path lookup.
    fn target(file: &File) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()))
    }

    fn changed(&self) -> bool {
        Stamp::of(&self.file) != self.stamp
    }
}

/// One libcufile file, attached.
struct AttachedLib {
    /// The path the first process seen mapping it had, and whether it was deleted.
    mapping: Mapping,
    pids: BTreeSet<u32>,
    symbols: LibSymbols,
    since: SystemTime,
    /// When its last process was seen gone (detached [`LINGER`] later).
    idle_since: Option<Instant>,
    held: Held,
}

/// One process that maps libcufile, with its libc probes.
struct TracedProcess {
    nvfs: bool,
    /// Its `pread64`/`pwrite64` are probed (else the file layer tells the cuFile programs).
    libc: bool,
    links: Vec<Link>,
}

/// What the bounds of the cuFile layer refused since start (see the module documentation).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Limits {
    /// Copies not attached: [`LIBRARIES_MAX`] were attached.
    pub libraries: u64,
    /// Loaders without the dlopen notification: [`LOADERS_MAX`] had it.
    pub loaders: u64,
    /// Processes whose I/O beneath cuFile is not classified: [`PROCESSES_MAX`] were watched
    /// (libc probes or the file layer).
    pub processes: u64,
    /// Files not traceable and not listed: [`FAILURES_MAX`] were listed.
    pub failures_unlisted: u64,
    /// Process maps read in part ([`procmaps::MAPS_MAX`]).
    pub maps_truncated: u64,
    /// Seconds in which the loader's notifications took their share ([`NOTIFY_SHARE`]) and
    /// the rest waited for the periodic scan (a `dlopen` storm).
    pub notify_pauses: u64,
    /// Attaches refused for want of file descriptors (RLIMIT_NOFILE).
    pub fd_limit: u64,
    /// Copies detached because they changed on disk.
    pub changed_on_disk: u64,
    /// Files held without a read lease (not protected before a writer starts).
    pub unleased: u64,
}

impl Limits {
    /// One line for `/debug/layers`, empty when nothing was refused.
    pub fn summary(&self) -> String {
        let parts: Vec<String> = [
            (self.libraries, "copies not attached (limit)"),
            (self.loaders, "loaders without notification (limit)"),
            (self.processes, "processes not probed (limit)"),
            (self.failures_unlisted, "untraceable files not listed"),
            (self.maps_truncated, "maps read in part"),
            (
                self.notify_pauses,
                "seconds of loader notifications paused (dlopen storm)",
            ),
            (self.fd_limit, "attaches refused: file descriptor limit"),
            (self.changed_on_disk, "copies detached: changed on disk"),
            (self.unleased, "files without a read lease"),
        ]
        .into_iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, what)| format!("{n} {what}"))
        .collect();
        parts.join(", ")
    }
}

/// What readers (HTTP, `/debug/layers`) see of the cuFile layer: published by the cuFile
/// thread after each change, so that no reader ever waits on its file reads or attaches.
#[derive(Debug, Clone, Default)]
pub struct CufileView {
    /// How probes are attached ([`Attacher::kind`]).
    pub attach: &'static str,
    pub libraries: Vec<LibraryInfo>,
    pub failures: Vec<LibraryFailure>,
    pub limits: Limits,
    /// Where the I/O beneath cuFile calls is seen (see [`Beneath`]).
    pub beneath: &'static str,
    /// Processes with libc probes now.
    pub libc_probes: Vec<u32>,
}

/// Which processes the cuFile layer attaches for (`--pid`, `--comm`).
#[derive(Debug, Clone, Default)]
pub struct ProcessFilter {
    pub pid: Option<u32>,
    pub comm: Option<String>,
}

impl ProcessFilter {
    /// Whether a task of process `tgid` named `comm` passes (`comm` as the kernel keeps it,
    /// truncated to 15 bytes, the way the in-kernel `--comm` filter compares it).
    pub fn accepts_task(&self, tgid: u32, comm: &str) -> bool {
        self.pid.is_none_or(|p| p == tgid) && self.comm.as_deref().is_none_or(|c| c == comm)
    }

    fn accepts(&self, proc_root: &Path, pid: u32) -> bool {
        if self.pid.is_some_and(|p| p != pid) {
            return false;
        }
        match &self.comm {
            None => true,
            Some(c) => std::fs::read_to_string(proc_root.join(pid.to_string()).join("comm"))
                .is_ok_and(|s| s.trim_end_matches('\n') == c),
        }
    }
}

/// The cuFile layer's programs and what they are attached to. Owned by the cuFile thread
/// (behind a lock only it and shutdown take); the object lock is taken only around attach
/// syscalls.
pub struct CufileTracing {
    proc_root: PathBuf,
    filter: ProcessFilter,
    libs: BTreeMap<FileId, AttachedLib>,
    procs: BTreeMap<u32, TracedProcess>,
    failed: BTreeMap<FileId, LibraryFailure>,
    /// Dynamic loaders with the `dl_notify` probe (`None`: it could not be attached).
    loaders: BTreeMap<FileId, Option<Held>>,
    watch: Option<FileWatch>,
    /// Read leases on held files, for the cuFile thread (made by [`Self::thread_fds`]).
    leases: Option<Leases>,
    attacher: Attacher,
    releaser: Releaser,
    /// Files whose links are being closed: not attached again until they are (the new probes
    /// would count every call twice meanwhile).
    closing: std::sync::Arc<Mutex<BTreeSet<FileId>>>,
    limits: Limits,
    /// Log lines about untraceable files in the current minute, and when it began.
    logged: (u32, Instant),
    /// Time spent on notifications in the current second, and when it began.
    notify_spent: (Duration, Instant),
    /// Processes the kernel asked libc probes for (`GDS_CUFILE_LIBC`; None: not in the object).
    libc_asked: Option<HashMap<MapData, u32, u8>>,
    /// [`Beneath::label`] at the last scan.
    beneath: &'static str,
}

impl CufileTracing {
    /// Loads the four uprobe programs (attached later, per library and process): for
    /// multi-uprobe links against the maps in `maps` (aya's, see [`super::umulti`]) where the
    /// kernel allows it, else as aya's perf-event uprobes.
    pub fn load(
        ebpf: &mut Ebpf,
        maps: &[(String, std::os::fd::OwnedFd)],
        filter: ProcessFilter,
        btf: Option<&gds_host::btf::Btf>,
    ) -> Result<CufileTracing, TraceError> {
        // Before 6.6 a program loads with the uprobe_multi attach type (the kernel does not
        // check it for kprobe programs) and only the link fails (EINVAL, seen on Debian's
        // 6.1): so ask the kernel's BTF whether the attach type exists before choosing.
        let kernel_has_multi = btf
            .and_then(|b| b.enum_values("bpf_attach_type"))
            .is_none_or(|v| v.iter().any(|(n, _)| n == "BPF_TRACE_UPROBE_MULTI"));
        let multi = if kernel_has_multi {
            MultiPrograms::load(super::EBPF_OBJECT, maps, &PROGRAMS).map_err(|e| e.to_string())
        } else {
            Err("the kernel has no BPF_TRACE_UPROBE_MULTI (Linux before 6.6)".to_owned())
        };
        let multi = match multi {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::info!(
                    "cuFile: no multi-uprobe links ({e}): one perf-event uprobe per probe \
                     (needs CAP_SYS_ADMIN here; closing them is serialized by the kernel)"
                );
                for name in PROGRAMS {
                    let p: &mut UProbe = program(ebpf, name)?;
                    p.load()
                        .map_err(|source| TraceError::Program { name, source })?;
                }
                None
            }
        };
        let watch = match FileWatch::new() {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(
                    "cuFile: no inotify ({e}): a library rewritten in place is seen by the \
                     periodic scan only"
                );
                None
            }
        };
        Ok(CufileTracing {
            proc_root: PathBuf::from("/proc"),
            filter,
            libs: BTreeMap::new(),
            procs: BTreeMap::new(),
            failed: BTreeMap::new(),
            loaders: BTreeMap::new(),
            watch,
            leases: None,
            attacher: Attacher {
                multi,
                probed: Mutex::default(),
            },
            releaser: Releaser::default(),
            closing: Default::default(),
            limits: Limits::default(),
            logged: (0, Instant::now()),
            libc_asked: take_map(ebpf, MAP_CUFILE_LIBC).ok(),
            beneath: "libc probes",
            notify_spent: (Duration::ZERO, Instant::now()),
        })
    }

    /// On the cuFile thread, before its first refresh: makes the thread the receiver of lease
    /// breaks and returns the descriptors it must `poll`; readable ones mean
    /// [`Self::files_changed`] must run at once.
    pub fn thread_fds(&mut self) -> Vec<std::os::fd::RawFd> {
        if self.leases.is_none() {
            match Leases::for_this_thread() {
                Ok(l) => self.leases = Some(l),
                Err(e) => tracing::warn!(
                    "cuFile: no lease-break signal ({e}): a library rewritten in place is seen \
                     by inotify only, after the writer started"
                ),
            }
        }
        self.watch
            .as_ref()
            .map(FileWatch::raw_fd)
            .into_iter()
            .chain(self.leases.as_ref().map(Leases::raw_fd))
            .collect()
    }

    /// Keeps a newly attached file watched for changes: counted if it has no read lease, and
    /// released (its links closed) if it cannot be watched either, since it could then change
    /// unseen. The error says why.
    fn hold(&mut self, id: FileId, held: Held, path: &str) -> Result<Held, String> {
        self.note_unleased(&held, path);
        if let Some(w) = self.watch.as_mut()
            && let Err(e) = w.add(&held.file, id)
        {
            self.release(id, held, |_, _| {});
            return Err(format!("cannot watch it for changes ({e}): not attached"));
        }
        Ok(held)
    }

    /// Counts a file held without a read lease, and says so once.
    fn note_unleased(&mut self, held: &Held, path: &str) {
        if held.leased || self.leases.is_none() {
            return;
        }
        if self.limits.unleased == 0 {
            tracing::warn!(
                "cuFile: no read lease on {path} (its file system may not support leases): a \
                 rewrite in place is seen by inotify, after the writer started, so a program \
                 started right after it may meet old probes"
            );
        }
        self.limits.unleased += 1;
    }

    /// What readers see (see [`CufileView`]).
    pub fn view(&self) -> CufileView {
        CufileView {
            attach: self.attacher.kind(),
            libraries: self.libraries(),
            failures: self.failed.values().cloned().collect(),
            limits: self.limits.clone(),
            beneath: self.beneath,
            libc_probes: self
                .procs
                .iter()
                .filter(|(_, p)| p.libc)
                .map(|(pid, _)| *pid)
                .collect(),
        }
    }

    /// Detaches every watched file that changed on disk (logged at WARN).
    pub fn files_changed(&mut self) {
        let c = self
            .watch
            .as_mut()
            .map(FileWatch::changes)
            .unwrap_or_default();
        let mut ids: Vec<FileId> = if c.overflow {
            // Any of them: compare each with what it was.
            self.held_files()
                .filter(|(_, h)| h.changed())
                .map(|(f, _)| f)
                .collect()
        } else {
            c.files
        };
        // Writers waiting for their lease to be let go.
        let broken = self.leases.as_ref().map(Leases::broken).unwrap_or_default();
        for fd in broken {
            if let Some((f, _)) = self.held_files().find(|(_, h)| h.file.as_raw_fd() == fd)
                && !ids.contains(&f)
            {
                ids.push(f);
            }
        }
        self.detach_changed(&ids);
    }

    fn held_files(&self) -> impl Iterator<Item = (FileId, &Held)> {
        self.libs.iter().map(|(f, l)| (*f, &l.held)).chain(
            self.loaders
                .iter()
                .filter_map(|(f, h)| h.as_ref().map(|h| (*f, h))),
        )
    }

    /// Detaches `ids` at once. Their links are closed on the pool and their files closed
    /// after them, so a writer waiting for the file's lease goes on only once no probe is left.
    /// A library still mapped is not traced again until its processes are gone.
    fn detach_changed(&mut self, ids: &[FileId]) {
        for id in ids {
            let (held, path, pids) = if let Some(lib) = self.libs.remove(id) {
                (lib.held, lib.mapping.path, lib.pids)
            } else if let Some(Some(h)) = self.loaders.remove(id) {
                (h, format!("loader inode {}", id.ino), BTreeSet::new())
            } else {
                continue;
            };
            self.limits.changed_on_disk += 1;
            let alive: Vec<String> = pids
                .iter()
                .filter(|p| self.proc_root.join(p.to_string()).exists())
                .map(u32::to_string)
                .collect();
            let still = if alive.is_empty() {
                String::new()
            } else {
                let p = alive.join(",");
                self.fail(
                    *id,
                    path.clone(),
                    format!(
                        "changed on disk while mapped by pid {p}: not traced until they exit \
                         (they now run the new bytes at the old addresses)"
                    ),
                );
                format!("; still mapped by pid {p}: not traced again until they exit")
            };
            tracing::warn!(
                "cuFile: {path} (inode {}) is being changed on disk: detaching its {} uprobes \
                 (a writer waits until they are gone){still}",
                id.ino,
                held.links.len()
            );
            self.release(*id, held, move |n, took| {
                tracing::warn!(
                    "cuFile: {path}: its {n} uprobes are closed ({took:?}); the writer goes on"
                );
            });
        }
    }

    /// Closes `held`'s links on the pool, then the file (ending its lease and watch), then runs
    /// `done` with how many links and how long; `file` is not attached again meanwhile.
    fn release(
        &mut self,
        file: FileId,
        held: Held,
        done: impl FnOnce(usize, Duration) + Send + 'static,
    ) {
        if let Some(w) = self.watch.as_mut() {
            w.remove(file);
        }
        let Held { file: f, links, .. } = held;
        let n = links.len();
        let closing = self.closing.clone();
        closing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(file);
        self.releaser.close_then(links, move |took| {
            drop(f);
            closing
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&file);
            done(n, took);
        });
    }

    /// Reads every process's maps: attaches to libraries, processes and loaders that appeared
    /// since the last call and detaches from those gone. Returns what changed, to log.
    pub fn refresh(&mut self, ebpf: &Mutex<Ebpf>, nvfs_loaded: bool) -> Vec<String> {
        // Writes the watch cannot see (through a shared mapping), or a missed event.
        let changed: Vec<FileId> = self
            .held_files()
            .filter(|(_, h)| h.changed())
            .map(|(f, _)| f)
            .collect();
        self.detach_changed(&changed);
        let seen = procmaps::scan(&self.proc_root, None);
        self.apply(ebpf, seen, nvfs_loaded, true)
    }

    /// Reads the maps of `pids` only (the loader said they loaded something): attaches what is
    /// new there, detaches nothing (that is [`Self::refresh`]'s job). Spends at most
    /// [`NOTIFY_SHARE`] of the thread's time; past it, returns at once (the periodic scan
    /// comes).
    pub fn refresh_pids(
        &mut self,
        ebpf: &Mutex<Ebpf>,
        nvfs_loaded: bool,
        pids: &[u32],
    ) -> Vec<String> {
        let now = Instant::now();
        if now.duration_since(self.notify_spent.1) >= Duration::from_secs(1) {
            self.notify_spent = (Duration::ZERO, now);
        }
        let share = Duration::from_secs(1).mul_f64(NOTIFY_SHARE);
        if self.notify_spent.0 >= share {
            return Vec::new();
        }
        let seen = procmaps::scan(&self.proc_root, Some(pids));
        tracing::debug!(
            ?pids,
            users = seen.users.len(),
            "cuFile: scanned after the loader's notification"
        );
        let changes = self.apply(ebpf, seen, nvfs_loaded, false);
        self.notify_spent.0 += now.elapsed();
        if self.notify_spent.0 >= share {
            if self.limits.notify_pauses == 0 {
                tracing::warn!(
                    "cuFile: the loader's notifications took {:.0} % of the cuFile thread this \
                     second (a dlopen storm?): it stops listening to them until the next one; \
                     the periodic scan still finds every library",
                    NOTIFY_SHARE * 100.0
                );
            }
            self.limits.notify_pauses += 1;
        }
        changes
    }

    fn is_closing(&self, file: FileId) -> bool {
        self.closing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&file)
    }

    /// While notifications take more than their share ([`NOTIFY_SHARE`]), when the cuFile
    /// thread may listen to them again: until then it does not wake for them (the kernel's
    /// ring buffer keeps the newest it can; the periodic scan finds what they would have).
    pub fn notify_paused_until(&self) -> Option<Instant> {
        let share = Duration::from_secs(1).mul_f64(NOTIFY_SHARE);
        let end = self.notify_spent.1 + Duration::from_secs(1);
        (self.notify_spent.0 >= share && Instant::now() < end).then_some(end)
    }

    /// Remembers that `file` cannot be traced (bounded; logged within [`LOG_BURST`]).
    fn fail(&mut self, file: FileId, path: String, error: String) {
        let now = Instant::now();
        if now.duration_since(self.logged.1) >= Duration::from_secs(60) {
            self.logged = (0, now);
        }
        if self.logged.0 < LOG_BURST {
            tracing::warn!("cuFile: cannot trace {path} (inode {}): {error}", file.ino);
        } else if self.logged.0 == LOG_BURST {
            tracing::warn!(
                "cuFile: more files cannot be traced; not logged for a minute (counted, and \
                 listed on /debug/cufile up to {FAILURES_MAX})"
            );
        }
        self.logged.0 = self.logged.0.saturating_add(1);
        if self.failed.len() >= FAILURES_MAX && !self.failed.contains_key(&file) {
            self.limits.failures_unlisted += 1;
            return;
        }
        self.failed.insert(file, LibraryFailure { path, error });
    }

    /// Counts an attach error that hit the file descriptor limit, with a WARN the first time.
    fn note_fd_limit(&mut self, e: &TraceError) {
        if let Some(hit) = gds_host::privileges::fd_limit_hit(e) {
            if self.limits.fd_limit == 0 {
                tracing::warn!("cuFile: uprobes not attached: {hit}");
            }
            self.limits.fd_limit += 1;
        }
    }

    fn apply(
        &mut self,
        ebpf: &Mutex<Ebpf>,
        seen: procmaps::Scan,
        nvfs_loaded: bool,
        full: bool,
    ) -> Vec<String> {
        let mut changes = Vec::new();
        if !seen.truncated.is_empty() {
            if self.limits.maps_truncated == 0 {
                tracing::warn!(
                    "cuFile: pid {:?} has over {} bytes of maps: read in part",
                    seen.truncated,
                    procmaps::MAPS_MAX
                );
            }
            self.limits.maps_truncated += seen.truncated.len() as u64;
        }

        // Processes that map libcufile, as the filter (`--pid`, `--comm`) allows.
        let users: BTreeMap<u32, (Vec<Mapping>, Vec<Mapping>)> = seen
            .users
            .into_iter()
            .filter(|(pid, _)| self.filter.accepts(&self.proc_root, *pid))
            .collect();

        // Loaders: a uprobe on each ld.so's `_dl_debug_state` says when a process loads.
        if full {
            let gone: Vec<FileId> = self
                .loaders
                .keys()
                .filter(|f| !seen.loaders.contains_key(f))
                .copied()
                .collect();
            for f in gone {
                if let Some(Some(h)) = self.loaders.remove(&f) {
                    self.release(f, h, |_, _| {});
                }
            }
        }
        for (file, m) in &seen.loaders {
            if self.loaders.contains_key(file) || self.is_closing(*file) {
                continue;
            }
            if self.loaders.len() >= LOADERS_MAX {
                if self.limits.loaders == 0 {
                    tracing::warn!(
                        "cuFile: {LOADERS_MAX} dynamic loaders have the dlopen notification; \
                         {} and any further ones have not (libraries they load are found by \
                         the periodic scan)",
                        m.path
                    );
                }
                self.limits.loaders += 1;
                continue;
            }
            match attach_loader(
                &self.attacher,
                ebpf,
                &self.releaser,
                self.leases.as_ref(),
                m,
            ) {
                Ok(held) => match self.hold(*file, held, &m.path) {
                    Ok(held) => {
                        self.loaders.insert(*file, Some(held));
                    }
                    Err(why) => {
                        tracing::warn!("cuFile: loader {}: {why}", m.path);
                        self.loaders.insert(*file, None);
                    }
                },
                // Its process exited meanwhile, or a writer has it: another scan will show it.
                Err(_) if !m.via.exists() => {}
                Err(TraceError::Busy { .. }) => {}
                Err(e) => {
                    self.note_fd_limit(&e);
                    changes.push(format!(
                        "cuFile: no dlopen notification from {} ({}): libraries it loads are \
                         found by the periodic scan only",
                        m.path,
                        with_causes(&e)
                    ));
                    self.loaders.insert(*file, None);
                }
            }
        }

        // Libraries: attach new files, keep the set of processes of each.
        let mut lib_users: BTreeMap<FileId, (Mapping, BTreeSet<u32>)> = BTreeMap::new();
        for (pid, (libs, _)) in &users {
            for m in libs {
                lib_users
                    .entry(m.file)
                    .or_insert_with(|| (m.clone(), BTreeSet::new()))
                    .1
                    .insert(*pid);
            }
        }
        if full {
            let now = Instant::now();
            let mut gone = Vec::new();
            for (f, lib) in &mut self.libs {
                if lib_users.contains_key(f) {
                    lib.idle_since = None;
                    continue;
                }
                lib.pids.clear();
                let since = *lib.idle_since.get_or_insert(now);
                if now.duration_since(since) >= LINGER {
                    gone.push(*f);
                }
            }
            for f in gone {
                if let Some(lib) = self.libs.remove(&f) {
                    let path = lib.mapping.path;
                    // Logged once true: the links closed (the kernel closes them one at a
                    // time, host-wide, so this takes seconds).
                    self.release(f, lib.held, move |n, took| {
                        tracing::info!(
                            "cuFile: detached from {path} (inode {}): no process has mapped it \
                             for {LINGER:?}; its {n} uprobes closed in {took:?}",
                            f.ino
                        );
                    });
                }
            }
            self.failed.retain(|f, _| lib_users.contains_key(f));
        }
        for (file, (mapping, pids)) in lib_users {
            if let Some(lib) = self.libs.get_mut(&file) {
                // Deleted since (replaced on disk), or now seen under another path.
                lib.mapping = mapping;
                lib.idle_since = None;
                if full {
                    lib.pids = pids;
                } else {
                    lib.pids.extend(pids);
                }
                continue;
            }
            if self.failed.contains_key(&file) || self.is_closing(file) {
                continue;
            }
            if self.libs.len() >= LIBRARIES_MAX {
                self.limits.libraries += 1;
                self.fail(
                    file,
                    mapping.path,
                    format!(
                        "{LIBRARIES_MAX} libcufile copies are attached already (the limit): not \
                         traced until one is detached"
                    ),
                );
                continue;
            }
            match attach_library(
                &self.attacher,
                ebpf,
                &self.releaser,
                self.leases.as_ref(),
                &mapping,
            ) {
                Ok((symbols, held)) => {
                    let held = match self.hold(file, held, &mapping.path) {
                        Ok(held) => held,
                        Err(why) => {
                            self.fail(file, mapping.path, why);
                            continue;
                        }
                    };
                    changes.push(format!(
                        "cuFile: attached {} uprobes ({} links) to {}{} (inode {}, used by pid {}){}",
                        symbols.found.len() * 2,
                        held.links.len(),
                        mapping.path,
                        if mapping.deleted { " (deleted)" } else { "" },
                        file.ino,
                        pids.iter()
                            .map(u32::to_string)
                            .collect::<Vec<_>>()
                            .join(","),
                        if symbols.missing.is_empty() {
                            String::new()
                        } else {
                            format!("; not exported: {}", symbols.missing.join(", "))
                        }
                    ));
                    self.libs.insert(
                        file,
                        AttachedLib {
                            mapping,
                            pids,
                            symbols,
                            since: SystemTime::now(),
                            idle_since: None,
                            held,
                        },
                    );
                }
                // The process exited while being attached to: not the library's fault; the
                // next process that maps it is tried again.
                Err(_) if !mapping.via.exists() => {}
                // Being written: tried again at the next scan.
                Err(TraceError::Busy { .. }) => {}
                Err(e) => {
                    self.note_fd_limit(&e);
                    self.fail(file, mapping.path, with_causes(&e));
                }
            }
        }

        // Processes: libc probes for each process that maps libcufile, unless the file layer
        // sees its calls (see [`Beneath`]).
        let beneath = Beneath::read(ebpf, self.libc_asked.as_ref());
        self.beneath = beneath.label();
        let (keep, gone): (BTreeMap<_, _>, BTreeMap<_, _>) = std::mem::take(&mut self.procs)
            .into_iter()
            .partition(|(pid, p)| {
                let scanned = users.contains_key(pid);
                // A notification's scan looks at its pids only: the others stay as they are.
                if !full && !scanned {
                    return true;
                }
                scanned && p.nvfs == nvfs_loaded && p.libc == beneath.libc(*pid)
            });
        self.procs = keep;
        // Scoped to their process: harmless once it exited, closed in the background.
        self.releaser
            .close_later(gone.into_values().flat_map(|p| p.links).collect());
        for (pid, (_, libcs)) in &users {
            if self.procs.contains_key(pid) {
                continue;
            }
            if self.procs.len() >= PROCESSES_MAX {
                if self.limits.processes == 0 {
                    tracing::warn!(
                        "cuFile: {PROCESSES_MAX} processes are watched beneath cuFile (the limit): the \
                         cuFile calls of pid {pid} and later ones are counted, their path is \
                         not classified"
                    );
                }
                self.limits.processes += 1;
                continue;
            }
            let libc = beneath.libc(*pid);
            let links = match libcs.first().filter(|_| libc || nvfs_loaded) {
                Some(m) => {
                    match attach_beneath(
                        &self.attacher,
                        ebpf,
                        &self.releaser,
                        *pid,
                        m,
                        (libc, nvfs_loaded),
                    ) {
                        Ok(links) => links,
                        Err(_) if !m.via.exists() => continue,
                        Err(e) => {
                            self.note_fd_limit(&e);
                            changes.push(format!(
                                "cuFile: pid {pid}: no probes on its libc ({}): {}; its calls are \
                             counted, their path is not classified",
                                m.path,
                                with_causes(&e)
                            ));
                            Vec::new()
                        }
                    }
                }
                None => Vec::new(),
            };
            if libc && beneath.sees != FILE_SEES_NONE {
                // From now on the probes count this process's I/O, not the file layer.
                if let Some(m) = self.libc_asked.as_mut() {
                    let _ = m.insert(pid, LIBC_ATTACHED, 0);
                }
            }
            self.procs.insert(
                *pid,
                TracedProcess {
                    nvfs: nvfs_loaded,
                    libc,
                    links,
                },
            );
        }
        changes
    }

    /// The libraries attached now.
    fn libraries(&self) -> Vec<LibraryInfo> {
        self.libs
            .iter()
            .map(|(f, l)| LibraryInfo {
                path: l.mapping.path.clone(),
                deleted: l.mapping.deleted,
                dev: f.dev,
                inode: f.ino,
                pids: l.pids.iter().copied().collect(),
                functions: l
                    .symbols
                    .found
                    .iter()
                    .map(|(n, _)| (*n).to_owned())
                    .collect(),
                missing: l.symbols.missing.iter().map(|n| (*n).to_owned()).collect(),
                usdt_notes: l.symbols.usdt_notes,
                usdt_providers: l.symbols.usdt_providers.iter().cloned().collect(),
                attached_unix_s: l
                    .since
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
            })
            .collect()
    }
}

impl Drop for CufileTracing {
    /// At shutdown: every link closed, within [`SHUTDOWN_CLOSE`]; the files (and their leases)
    /// only after.
    fn drop(&mut self) {
        let mut links: Vec<Link> = Vec::new();
        let mut files: Vec<File> = Vec::new();
        let mut take = |h: Held| {
            links.extend(h.links);
            files.push(h.file);
        };
        for (_, lib) in std::mem::take(&mut self.libs) {
            take(lib.held);
        }
        for (_, h) in std::mem::take(&mut self.loaders) {
            h.into_iter().for_each(&mut take);
        }
        for (_, p) in std::mem::take(&mut self.procs) {
            links.extend(p.links);
        }
        let n = links.len();
        let took = self.releaser.close(links, SHUTDOWN_CLOSE);
        drop(files);
        tracing::info!(
            "cuFile: closed {n} uprobe links in {took:?} ({} closing threads)",
            self.releaser.threads()
        );
    }
}

/// `e` and its sources ("perf_event_open failed: Permission denied (os error 13)").
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Opens the file behind `m` ([`elf::open`]'s checks) and reads `wanted` from it: no lock held.
fn open_and_read(m: &Mapping, wanted: &[&'static str]) -> Result<(File, LibSymbols), TraceError> {
    let lib_err = |e: elf::ElfError| TraceError::Library {
        path: m.path.clone(),
        why: e.to_string(),
    };
    let file = elf::open(&m.via).map_err(lib_err)?;
    let symbols = elf::read_symbols(&file, &m.path, wanted).map_err(lib_err)?;
    Ok((file, symbols))
}

/// Takes the read lease on `file` before anything is attached to it (see [`super::lease`]):
/// whether one is held; [`TraceError::Busy`] while a writer has the file.
fn lease_first(leases: Option<&Leases>, file: &File, m: &Mapping) -> Result<bool, TraceError> {
    match leases.map(|l| l.try_take(file)) {
        Some(Lease::Held) => Ok(true),
        Some(Lease::Busy) => Err(TraceError::Busy {
            path: m.path.clone(),
        }),
        Some(Lease::Unsupported(e)) => {
            tracing::debug!("cuFile: no read lease on {}: {e}", m.path);
            Ok(false)
        }
        None => Ok(false),
    }
}

/// How probes are attached: one multi-uprobe link per file and program where the kernel
/// allows it (see [`super::umulti`]), else aya's perf-event uprobes, one per probe.
pub struct Attacher {
    multi: Option<MultiPrograms>,
    probed: Mutex<Probed>,
}

/// Bytes compared at a probed offset: the longest x86-64 instruction.
const INSN_BYTES: usize = 15;
/// Files whose probed bytes are remembered (see [`Probed`]); the oldest is forgotten first.
const PROBED_FILES_MAX: usize = 1024;

/// The instruction bytes at every offset the agent ever probed, per file.
///
/// Why: the kernel keeps one uprobe object per (inode, offset), with the instruction it
/// replaced copied from the file when first installed, and may keep it a while after the last
/// link is closed (references from return probes are dropped lazily). A probe attached again
/// at that offset reuses it: after a rewrite in place that put other bytes there, every hit
/// executes the *old* instruction (seen here: 1 round in 4 when a library rewritten in place
/// was attached again one second later). So a file is attached again only where the bytes at
/// every offset probed before are unchanged; otherwise it is refused and says why.
#[derive(Default)]
struct Probed {
    files: BTreeMap<FileId, (u64, BTreeMap<u64, [u8; INSN_BYTES]>)>,
    next: u64,
}

impl Probed {
    /// The first offset of `points` whose bytes in `file` differ from those seen when it was
    /// probed before, if any.
    fn changed_at(&self, id: FileId, file: &File, points: &[(u64, u32)]) -> Option<u64> {
        let (_, seen) = self.files.get(&id)?;
        points.iter().map(|(o, _)| *o).find(|o| {
            seen.get(o)
                .is_some_and(|before| insn_bytes(file, *o).as_ref() != Some(before))
        })
    }

    fn remember(&mut self, id: FileId, file: &File, points: &[(u64, u32)]) {
        if !self.files.contains_key(&id)
            && self.files.len() >= PROBED_FILES_MAX
            && let Some(oldest) = self
                .files
                .iter()
                .min_by_key(|(_, (n, _))| *n)
                .map(|(f, _)| *f)
        {
            self.files.remove(&oldest);
        }
        self.next += 1;
        let next = self.next;
        let entry = self
            .files
            .entry(id)
            .or_insert_with(|| (next, BTreeMap::new()));
        entry.0 = next;
        for (o, _) in points {
            if let Some(b) = insn_bytes(file, *o) {
                entry.1.insert(*o, b);
            }
        }
    }
}

/// The bytes at `offset` (zero-padded at the end of the file).
fn insn_bytes(file: &File, offset: u64) -> Option<[u8; INSN_BYTES]> {
    use std::os::unix::fs::FileExt;
    let mut b = [0u8; INSN_BYTES];
    let mut got = 0;
    while got < INSN_BYTES {
        match file.read_at(&mut b[got..], offset + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(_) => return None,
        }
    }
    Some(b)
}

impl Attacher {
    /// Probes `points` (`(file offset, cookie)`) of the file at `target` with `prog`, at
    /// return when `ret`, in process `pid` only when given. All or nothing.
    #[allow(clippy::too_many_arguments)]
    fn attach(
        &self,
        ebpf: &Mutex<Ebpf>,
        releaser: &Releaser,
        prog: &'static str,
        (file, id): (&File, FileId),
        points: &[(u64, u32)],
        ret: bool,
        pid: Option<u32>,
    ) -> Result<Vec<Link>, TraceError> {
        let target = &Held::target(file);
        {
            let mut probed = self.probed.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(at) = probed.changed_at(id, file, points) {
                return Err(TraceError::Library {
                    path: target.display().to_string(),
                    why: format!(
                        "rewritten in place since it was traced: the kernel may still hold the \
                         old instruction at offset {at:#x}, which a probe there would run; not \
                         traced (a file replaced by a new one, as package managers do, is)"
                    ),
                });
            }
            probed.remember(id, file, points);
        }
        if let Some(m) = &self.multi {
            let offsets: Vec<u64> = points.iter().map(|(o, _)| *o).collect();
            let cookies: Vec<u64> = points.iter().map(|(_, c)| u64::from(*c)).collect();
            return m
                .attach(prog, target, &offsets, &cookies, ret, pid)
                .map(|fd| vec![Link::Multi(fd)])
                .map_err(|source| TraceError::MultiLink {
                    path: target.display().to_string(),
                    prog,
                    source,
                });
        }
        let scope = match pid.and_then(std::num::NonZeroU32::new) {
            Some(p) => UProbeScope::OneProcess(p),
            None => UProbeScope::AllProcesses,
        };
        let mut links = Vec::new();
        let mut ebpf = ebpf.lock().unwrap_or_else(|p| p.into_inner());
        for (offset, cookie) in points {
            match attach_one(&mut ebpf, prog, *offset, *cookie, target, scope) {
                Ok(l) => links.push(Link::Perf(l)),
                Err(e) => {
                    releaser.close_later(links);
                    return Err(e);
                }
            }
        }
        Ok(links)
    }

    /// How probes are attached, for `/debug/layers`.
    pub fn kind(&self) -> &'static str {
        if self.multi.is_some() {
            "one multi-uprobe link per file"
        } else {
            "perf-event uprobes, one per probe"
        }
    }
}

/// Attaches entry and return probes to each function of [`traced_functions`] that `m` exports.
fn attach_library(
    at: &Attacher,
    ebpf: &Mutex<Ebpf>,
    releaser: &Releaser,
    leases: Option<&Leases>,
    m: &Mapping,
) -> Result<(LibSymbols, Held), TraceError> {
    let wanted: Vec<&'static str> = traced_functions().map(|(n, _)| n).collect();
    let (file, symbols) = open_and_read(m, &wanted)?;
    let leased = lease_first(leases, &file, m)?;
    if symbols.found.is_empty() {
        return Err(TraceError::Library {
            path: m.path.clone(),
            why: "it exports none of the cuFile functions gds traces".into(),
        });
    }
    let stamp = Stamp::of(&file);
    let points: Vec<(u64, u32)> = symbols
        .found
        .iter()
        .map(|(name, offset)| {
            let op = traced_functions()
                .find(|(n, _)| n == name)
                .map_or(0, |(_, op)| op);
            (*offset, op)
        })
        .collect();
    let f = (&file, m.file);
    // Returns first: a call already in flight when its entry probe arrives is a return without
    // an entry (`ReturnUnmatched`), not an entry that never returns and would sit in the
    // in-flight table as a phantom call.
    let exits = at.attach(ebpf, releaser, "cufile_exit", f, &points, true, None)?;
    let mut links = match at.attach(ebpf, releaser, "cufile_enter", f, &points, false, None) {
        Ok(l) => l,
        Err(e) => {
            // A library is attached whole or not at all.
            releaser.close_later(exits);
            return Err(e);
        }
    };
    // Closed in this order (entries, then returns), for the same reason.
    links.extend(exits);
    Ok((
        symbols,
        Held {
            file,
            stamp,
            links,
            leased,
        },
    ))
}

/// Attaches `dl_notify` to the loader's `_dl_debug_state` (glibc's debugger hook, exported as
/// `GLIBC_PRIVATE`; musl's loader has none).
fn attach_loader(
    at: &Attacher,
    ebpf: &Mutex<Ebpf>,
    releaser: &Releaser,
    leases: Option<&Leases>,
    m: &Mapping,
) -> Result<Held, TraceError> {
    let (file, symbols) = open_and_read(m, &["_dl_debug_state"])?;
    let leased = lease_first(leases, &file, m)?;
    let Some((_, offset)) = symbols.found.first() else {
        return Err(TraceError::Library {
            path: m.path.clone(),
            why: "it does not export _dl_debug_state".into(),
        });
    };
    let stamp = Stamp::of(&file);
    let links = at.attach(
        ebpf,
        releaser,
        "dl_notify",
        (&file, m.file),
        &[(*offset, 0)],
        false,
        None,
    )?;
    Ok(Held {
        file,
        stamp,
        links,
        leased,
    })
}

/// Where the calls beneath cuFile's are seen, read at each scan: the file layer's hooks
/// (`GDS_FILE_SEES`, which the file layer writes once attached) and the processes the kernel
/// asked libc probes for (they registered a file on a file system the hooks do not see).
///
/// Why: a uprobe on libc's `pread64` costs every `pread64` of the process two traps (+3 µs
/// here, +7.6 µs on the H100 host), where the file layer's hook costs what any traced file
/// call costs. So where the file layer sees every call on a registered file (kiocb hooks on
/// its file system, or the syscalls tier), the kernel links those calls to the cuFile call in
/// flight on the file by inode, and libc probes go only where it cannot.
struct Beneath {
    sees: u32,
    asked: BTreeSet<u32>,
}

impl Beneath {
    fn read(ebpf: &Mutex<Ebpf>, asked: Option<&HashMap<MapData, u32, u8>>) -> Beneath {
        let sees = ebpf
            .lock()
            .ok()
            .and_then(|e| {
                let m = e.map(MAP_FILE_SEES)?;
                let a = aya::maps::Array::<_, u32>::try_from(m).ok()?;
                a.get(&0, 0).ok()
            })
            .unwrap_or(FILE_SEES_NONE);
        let asked = if sees == FILE_SEES_NONE {
            BTreeSet::new()
        } else {
            asked
                .map(|m| m.keys().filter_map(Result::ok).collect())
                .unwrap_or_default()
        };
        Beneath { sees, asked }
    }

    /// Whether process `pid` gets libc probes on `pread64`/`pwrite64`.
    fn libc(&self, pid: u32) -> bool {
        self.sees == FILE_SEES_NONE || self.asked.contains(&pid)
    }

    fn label(&self) -> &'static str {
        match self.sees {
            FILE_SEES_NONE => "libc probes",
            FILE_SEES_ALL => "file layer (every read/write system call)",
            _ => {
                "file layer (files on the file systems it hooks; libc probes in processes \
                  with a file elsewhere)"
            }
        }
    }
}

/// Attaches the libc probes beneath cuFile in process `pid` only: `pread64`/`pwrite64` where
/// `reads`, `ioctl` where nvidia-fs is loaded.
fn attach_beneath(
    at: &Attacher,
    ebpf: &Mutex<Ebpf>,
    releaser: &Releaser,
    pid: u32,
    libc: &Mapping,
    (reads, nvfs_loaded): (bool, bool),
) -> Result<Vec<Link>, TraceError> {
    let wanted: Vec<&'static str> = BENEATH
        .iter()
        .filter(|(_, k)| {
            if *k == BENEATH_IOCTL {
                nvfs_loaded
            } else {
                reads
            }
        })
        .map(|(n, _)| *n)
        .collect();
    let (file, symbols) = open_and_read(libc, &wanted)?;
    if pid == 0 {
        return Err(TraceError::Library {
            path: libc.path.clone(),
            why: "pid 0".into(),
        });
    }
    let points: Vec<(u64, u32)> = symbols
        .found
        .iter()
        .map(|(name, offset)| {
            let kind = BENEATH
                .iter()
                .find(|(n, _)| n == name)
                .map_or(0, |(_, k)| *k);
            (*offset, kind)
        })
        .collect();
    if points.is_empty() {
        return Ok(Vec::new());
    }
    at.attach(
        ebpf,
        releaser,
        "beneath_enter",
        (&file, libc.file),
        &points,
        false,
        Some(pid),
    )
}

fn attach_one(
    ebpf: &mut Ebpf,
    prog: &'static str,
    offset: u64,
    cookie: u32,
    target: &Path,
    scope: UProbeScope,
) -> Result<UProbeLink, TraceError> {
    let p: &mut UProbe = program(ebpf, prog)?;
    let point = UProbeAttachPoint {
        location: UProbeAttachLocation::AbsoluteOffset(offset),
        cookie: Some(u64::from(cookie)),
    };
    let id = p
        .attach(point, target, scope)
        .map_err(|source| TraceError::Program { name: prog, source })?;
    p.take_link(id)
        .map_err(|source| TraceError::Program { name: prog, source })
}

/// The cuFile maps, read without the object lock: each table twice, the trusted share's and
/// the untrusted share's (see `gds_common::cufile::USER_OTHER`).
pub struct CufileMaps {
    stats: PerCpuArray<MapData, CufileCpuStats>,
    ops: PerCpuArray<MapData, CufileOpStats>,
    errors: [PerCpuHashMap<MapData, CufileErrKey, u64>; CUFILE_USERS],
    calls: [HashMap<MapData, u64, CufileCall>; CUFILE_USERS],
    files: [HashMap<MapData, CufileFileKey, CufileFileStats>; CUFILE_USERS],
    handles: [HashMap<MapData, CufileHandleKey, i32>; CUFILE_USERS],
}

const ZERO_OP: CufileOpStats = CufileOpStats {
    calls: 0,
    errors: 0,
    buckets: [0; HIST_BUCKETS],
    sum_ns: 0,
    bytes_asked: 0,
    path_bytes: [0; CUFILE_PATHS],
    path_calls: [0; CUFILE_PATHS],
};

impl CufileMaps {
    /// The cuFile calls in flight now, by thread (`pid_tgid`), both shares: what the stall
    /// detector scans, without reading the other tables. At most `CUFILE_INFLIGHT_MAX` per
    /// share (the maps' size).
    pub fn calls(&self) -> Vec<(u64, CufileCall)> {
        let mut out = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for user in [USER_TRUSTED, USER_OTHER] {
            out.extend(
                self.calls[user]
                    .iter()
                    .filter_map(Result::ok)
                    .filter(|(id, c)| seen.insert((*id, c.start_ns))),
            );
        }
        out
    }

    pub(crate) fn take(ebpf: &mut Ebpf) -> Result<CufileMaps, TraceError> {
        Ok(CufileMaps {
            stats: take_map(ebpf, MAP_CUFILE_STATS)?,
            ops: take_map(ebpf, MAP_CUFILE_OPS)?,
            errors: [
                take_map(ebpf, MAP_CUFILE_ERRORS)?,
                take_map(ebpf, MAP_CUFILE_ERRORS_OTHER)?,
            ],
            calls: [
                take_map(ebpf, MAP_CUFILE_CALLS)?,
                take_map(ebpf, MAP_CUFILE_CALLS_OTHER)?,
            ],
            files: [
                take_map(ebpf, MAP_CUFILE_FILES)?,
                take_map(ebpf, MAP_CUFILE_FILES_OTHER)?,
            ],
            handles: [
                take_map(ebpf, MAP_CUFILE_HANDLES)?,
                take_map(ebpf, MAP_CUFILE_HANDLES_OTHER)?,
            ],
        })
    }

    /// Reads every map once.
    pub fn read(&self) -> Result<CufileRaw, TraceError> {
        let map_err = |name| move |source| TraceError::Map { name, source };
        let mut raw = CufileRaw::default();
        for cpu in self
            .stats
            .get(&0, 0)
            .map_err(map_err(MAP_CUFILE_STATS))?
            .iter()
        {
            for (t, c) in raw.counts.iter_mut().zip(cpu.counts) {
                *t += c;
            }
        }
        for entry in 0..(CUFILE_OPS * CUFILE_USERS) as u32 {
            let mut sum = ZERO_OP;
            for cpu in self
                .ops
                .get(&entry, 0)
                .map_err(map_err(MAP_CUFILE_OPS))?
                .iter()
            {
                sum.calls += cpu.calls;
                sum.errors += cpu.errors;
                sum.sum_ns += cpu.sum_ns;
                sum.bytes_asked += cpu.bytes_asked;
                for (t, c) in sum.buckets.iter_mut().zip(cpu.buckets) {
                    *t += c;
                }
                for (t, c) in sum.path_bytes.iter_mut().zip(cpu.path_bytes) {
                    *t += c;
                }
                for (t, c) in sum.path_calls.iter_mut().zip(cpu.path_calls) {
                    *t += c;
                }
            }
            raw.ops.push(sum);
        }
        for (user, name) in [
            (USER_TRUSTED, MAP_CUFILE_ERRORS),
            (USER_OTHER, MAP_CUFILE_ERRORS_OTHER),
        ] {
            let mut errors = Vec::new();
            for item in self.errors[user].iter() {
                let (k, per_cpu) = item.map_err(map_err(name))?;
                errors.push((k, per_cpu.iter().sum()));
            }
            errors.sort_by_key(|(k, _)| *k);
            if user == USER_OTHER {
                raw.errors_other = errors;
            } else {
                raw.errors = errors;
            }
        }
        // Shared hash maps: entries may come and go while iterated; what fails to read is
        // simply not in this read.
        for user in [USER_TRUSTED, USER_OTHER] {
            raw.calls
                .extend(self.calls[user].iter().filter_map(Result::ok));
            let mut files: Vec<_> = self.files[user].iter().filter_map(Result::ok).collect();
            files.sort_by_key(|(k, _)| *k);
            if user == USER_OTHER {
                raw.other.extend(files.iter().map(|(k, _)| k.tgid));
            }
            raw.files.extend(files);
        }
        Ok(raw)
    }

    /// Removes what processes that exited left behind: their rows once idle for `keep_ns`
    /// (a process that just finished stays visible on `/debug/cufile` a while), and at once
    /// their handles and the entries of calls that never returned. Both shares.
    pub fn prune(&mut self, alive: &dyn Fn(u32) -> bool, now_ns: u64, keep_ns: u64) {
        let thread_gone = |id: u64| {
            let (tgid, tid) = ((id >> 32) as u32, id as u32);
            !alive(tgid) || !Path::new(&format!("/proc/{tgid}/task/{tid}")).exists()
        };
        for user in [USER_TRUSTED, USER_OTHER] {
            let files = &mut self.files[user];
            let dead_rows: Vec<CufileFileKey> = files
                .iter()
                .filter_map(Result::ok)
                .filter(|(k, v)| !alive(k.tgid) && now_ns.saturating_sub(v.last_ns) > keep_ns)
                .map(|(k, _)| k)
                .collect();
            for k in dead_rows {
                let _ = files.remove(&k);
            }
            let handles = &mut self.handles[user];
            let dead_handles: Vec<CufileHandleKey> = handles
                .keys()
                .filter_map(Result::ok)
                .filter(|k| !alive(k.tgid))
                .collect();
            for k in dead_handles {
                let _ = handles.remove(&k);
            }
            let calls = &mut self.calls[user];
            let stale: Vec<u64> = calls
                .keys()
                .filter_map(Result::ok)
                .filter(|id| thread_gone(*id))
                .collect();
            for id in stale {
                let _ = calls.remove(&id);
            }
        }
    }
}

/// The cuFile layer: the uprobe programs (loaded at start, attached per library and process by
/// the cuFile thread), what readers see of them, and its maps.
pub struct CufileLayer {
    /// None where uprobes cannot be loaded. Locked by the cuFile thread (and at shutdown)
    /// only: readers read `view`, so none waits on its file reads and attaches.
    tracing: Option<Mutex<CufileTracing>>,
    view: Mutex<CufileView>,
    maps: Mutex<CufileMaps>,
    /// How it is traced or why not, said once at start.
    why: String,
    /// The loader's dlopen notifications, taken by the cuFile thread.
    notify: Mutex<Option<aya::maps::RingBuf<MapData>>>,
}

impl super::layer::TracedLayer for CufileLayer {
    /// Off (not an error) where the programs do not load or the capabilities attaching needs
    /// are not held: the log and `/debug/layers` say which are missing, for what.
    fn attach(ebpf: &mut Ebpf, start: &super::layer::Start) -> Result<CufileLayer, TraceError> {
        // One file descriptor per uprobe: the soft limit (1024 under systemd) goes up to the
        // hard one.
        match gds_host::privileges::raise_nofile() {
            Ok(r) => tracing::info!("{r}"),
            Err(e) => tracing::warn!("cannot raise RLIMIT_NOFILE: {e}"),
        }
        let access = gds_host::privileges::CufileAccess::of_this_thread();
        let (tracing, why) = match access.as_ref().map(|a| (a.works(), a)) {
            Ok((false, a)) => {
                let why = format!("cuFile tracing {a}");
                tracing::warn!("{why}");
                (None, why)
            }
            _ => match CufileTracing::load(
                ebpf,
                start.map_fds,
                ProcessFilter {
                    pid: start.opts.pid,
                    comm: start.opts.comm.clone(),
                },
                start.btf,
            ) {
                Ok(c) => {
                    let mut why =
                        "uprobes on every libcufile mapped by a process (checked every 500 ms)"
                            .to_owned();
                    match &access {
                        Ok(a) if !a.missing.is_empty() => {
                            tracing::warn!("cuFile tracing {a}");
                            why = format!("{why}; {a}");
                        }
                        Ok(_) => {}
                        Err(e) => tracing::warn!(
                            "cuFile tracing: cannot tell which capabilities it holds ({e}); \
                             attaching may fail"
                        ),
                    }
                    (Some(Mutex::new(c)), why)
                }
                Err(e) => {
                    let why = format!("cuFile tracing off: the uprobe programs do not load ({e})");
                    tracing::warn!("{why}");
                    (None, why)
                }
            },
        };
        Ok(CufileLayer {
            tracing,
            view: Default::default(),
            maps: Mutex::new(CufileMaps::take(ebpf)?),
            why,
            notify: Mutex::new(Some(take_map(ebpf, gds_common::cufile::MAP_CUFILE_DLOPEN)?)),
        })
    }

    fn layer(&self) -> gds_api::raw::Layer {
        gds_api::raw::Layer::Cufile
    }

    fn entry(&self) -> gds_api::raw::LayerEntry {
        let v = self.view();
        let limits = v.limits.summary();
        gds_api::raw::LayerEntry {
            layer: gds_api::raw::Layer::Cufile,
            on: self.tracing.is_some(),
            why: format!(
                "{}; {}; {} libcufile file(s) attached now; I/O beneath seen by {}{}",
                self.why,
                v.attach,
                v.libraries.len(),
                v.beneath,
                if limits.is_empty() {
                    String::new()
                } else {
                    format!("; refused by its bounds: {limits}")
                }
            ),
            detail: Some(gds_api::raw::LayerDetail::Cufile {
                libraries: v.libraries.len(),
                beneath: v.beneath.to_owned(),
                libc_probes: v.libc_probes,
            }),
        }
    }

    fn inflight(&self, out: &mut Vec<gds_api::raw::Inflight>) {
        out.extend(
            self.calls()
                .into_iter()
                .map(|(id, c)| gds_api::raw::Inflight::Cufile(id, c)),
        );
    }

    /// Attaches to libcufile copies and their processes that appeared, detaches from those
    /// gone, and forgets what exited processes left in the maps. On the cuFile thread only:
    /// it alone holds the capabilities attaching needs.
    fn refresh(&self, ebpf: &Mutex<Ebpf>) -> Vec<String> {
        let changes = self.attach_now(ebpf, None);
        let alive = |pid: u32| Path::new(&format!("/proc/{pid}")).exists();
        self.maps.lock().unwrap_or_else(|p| p.into_inner()).prune(
            &alive,
            gds_host::clock::monotonic_ns(),
            60_000_000_000,
        );
        changes
    }
}

impl CufileLayer {
    /// Like [`super::layer::TracedLayer::refresh`] for `pids` only, which just loaded a
    /// library; detaches nothing.
    pub fn refresh_pids(&self, ebpf: &Mutex<Ebpf>, pids: &[u32]) -> Vec<String> {
        self.attach_now(ebpf, Some(pids))
    }

    /// A full refresh (`None`) or one of `pids`; the object lock is taken only around the
    /// attach syscalls. Publishes what readers see.
    fn attach_now(&self, ebpf: &Mutex<Ebpf>, pids: Option<&[u32]>) -> Vec<String> {
        let Some(cufile) = &self.tracing else {
            return Vec::new();
        };
        let nvfs = gds_host::kmod::Modules::live().present("nvidia_fs");
        let mut cufile = cufile.lock().unwrap_or_else(|p| p.into_inner());
        let changes = match pids {
            None => cufile.refresh(ebpf, nvfs),
            Some(pids) => cufile.refresh_pids(ebpf, nvfs, pids),
        };
        *self.view.lock().unwrap_or_else(|p| p.into_inner()) = cufile.view();
        changes
    }

    /// On the cuFile thread, once before its loop: the descriptors it must `poll` (a watched
    /// file changes, a writer waits for a lease); when one is readable, call
    /// [`Self::files_changed`] at once.
    pub fn thread_fds(&self) -> Vec<std::os::fd::RawFd> {
        match &self.tracing {
            Some(c) => c.lock().unwrap_or_else(|p| p.into_inner()).thread_fds(),
            None => Vec::new(),
        }
    }

    /// Until when the cuFile thread should not wake for the loader's notifications (they
    /// took their share of its time: see [`NOTIFY_SHARE`]).
    pub fn notify_paused_until(&self) -> Option<Instant> {
        self.tracing
            .as_ref()?
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .notify_paused_until()
    }

    /// Detaches from every watched file that changed on disk (logged at WARN).
    pub fn files_changed(&self) {
        if let Some(c) = &self.tracing {
            let mut c = c.lock().unwrap_or_else(|p| p.into_inner());
            c.files_changed();
            *self.view.lock().unwrap_or_else(|p| p.into_inner()) = c.view();
        }
    }

    /// The layer as readers see it: libraries attached, those that cannot be, and what its
    /// bounds refused.
    pub fn view(&self) -> CufileView {
        self.view.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The ring buffer of process ids the dynamic loader just loaded a library into (once).
    pub fn take_notify(&self) -> Option<aya::maps::RingBuf<MapData>> {
        self.notify.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// The cuFile maps now.
    pub fn raw(&self) -> Result<CufileRaw, TraceError> {
        self.maps.lock().unwrap_or_else(|p| p.into_inner()).read()
    }

    /// The calls in flight now, by thread (`pid_tgid`), without the other cuFile tables.
    pub fn calls(&self) -> Vec<(u64, CufileCall)> {
        self.maps.lock().unwrap_or_else(|p| p.into_inner()).calls()
    }
}
