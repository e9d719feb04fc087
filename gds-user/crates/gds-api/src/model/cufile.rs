//! cuFile calls per process and per file, with the path their I/O took and, for compat, why
//! (`/debug/cufile`, `top`). The per-operation aggregates `/metrics` exports are
//! `stats::CufileStats`.

use std::{collections::BTreeMap, path::Path};

use gds_common::cufile::{
    CUFILE_PATHS, CufileFileStats, PATH_COMPAT, PATH_NVFS, PATH_P2PDMA, PROCESS_ROW,
};
use serde::{Deserialize, Serialize};

use super::labels;
use crate::raw::{CufileRaw, LibraryFailure, LibraryInfo, PeerMemory, Source};

/// What a process's or file's cuFile calls did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CufileCounters {
    pub calls: u64,
    pub errors: u64,
    pub time_ns: u64,
    pub read_calls: u64,
    pub write_calls: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub handle_registers: u64,
    pub buf_registers: u64,
    /// Libc reads and writes linked beneath, and their bytes.
    pub compat_ios: u64,
    pub compat_bytes: u64,
    pub nvfs_ios: u64,
    /// Process only: libc reads and writes with no cuFile call in flight on their file, and
    /// their bytes (POSIX I/O outside cuFile; see [`CufileProcess::outside_cufile`]).
    #[serde(default)]
    pub outside_ios: u64,
    #[serde(default)]
    pub outside_bytes: u64,
    pub unaligned: u64,
    /// Read and write calls that succeeded, by path name.
    pub path_calls: BTreeMap<String, u64>,
}

impl CufileCounters {
    fn from_raw(s: &CufileFileStats) -> CufileCounters {
        CufileCounters {
            calls: s.calls,
            errors: s.errors,
            time_ns: s.time_ns,
            read_calls: s.read_calls,
            write_calls: s.write_calls,
            read_bytes: s.read_bytes,
            write_bytes: s.write_bytes,
            handle_registers: s.handle_registers,
            buf_registers: s.buf_registers,
            compat_ios: s.compat_ios,
            compat_bytes: s.compat_bytes,
            nvfs_ios: s.nvfs_ios,
            outside_ios: s.outside_ios,
            outside_bytes: s.outside_bytes,
            unaligned: s.unaligned,
            path_calls: (0..CUFILE_PATHS)
                .filter(|p| s.path_calls[*p] > 0)
                .map(|p| (labels::CUFILE_PATHS[p].to_owned(), s.path_calls[p]))
                .collect(),
        }
    }

    /// The path most of the successful reads and writes took, if any did.
    pub fn main_path(&self) -> Option<&str> {
        self.path_calls
            .iter()
            .max_by_key(|(_, n)| **n)
            .map(|(p, _)| p.as_str())
    }
}

/// Files listed per process on `/debug/cufile` (the most active, then the most recently
/// used); [`CufileProcess::files_omitted`] counts the rest. One process registering 9,000
/// handles filled the kernel's 8,192-row table and made `/debug/snapshot` 2.9 MB; a screenful
/// per process is what a person reads, and 16 rows of ~0.5 KiB keep a process under 10 KiB.
pub const REPORT_FILES_PER_PROCESS: usize = 16;
/// Processes listed on `/debug/cufile` (the most active, then the most recently calling);
/// [`CufileOmitted::processes`] counts the rest. 64 covers 8 GPUs × 8 loader workers, and
/// with [`REPORT_FILES_PER_PROCESS`] bounds the process list to ~650 KiB however many
/// processes and files the kernel's table (8,192 rows) holds.
pub const REPORT_PROCESSES: usize = 64;
/// cuFile calls in flight listed (the oldest); the kernel tracks up to 16,384.
pub const REPORT_INFLIGHT: usize = 256;
/// Libraries listed (those most processes map, then the most recently attached), and the
/// pids listed per library: 500 processes sharing one copy made a 500-pid list.
pub const REPORT_LIBRARIES: usize = 64;
pub const REPORT_LIBRARY_PIDS: usize = 64;
/// USDT providers listed per library: names come from the file's notes, which anyone who
/// can write a file named `libcufile.so*` chooses.
pub const REPORT_USDT_PROVIDERS: usize = 16;
/// Libraries that could not be attached, listed: 3,000 junk files named `libcufile.so.N`
/// gave 3,000 entries.
pub const REPORT_NOT_TRACED: usize = 64;
/// Processes that issued block requests into peer memory, listed (the most requests first);
/// the kernel's table holds 4,096.
pub const REPORT_PEER_IO: usize = 64;

/// One file a process used through cuFile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CufileFile {
    pub fd: i32,
    /// `/proc/PID/fd/FD` now (the fd may have been closed or reused since).
    pub path: String,
    pub counters: CufileCounters,
    /// Calls in flight on the file now.
    pub active: u64,
    /// Why its I/O went compat, where it did.
    pub compat_reason: Option<String>,
}

/// One process that called cuFile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CufileProcess {
    pub pid: u32,
    pub comm: String,
    /// Its cgroup, Kubernetes pod and container, where known.
    pub cgroup: Option<gds_host::cgroup::CgroupInfo>,
    pub alive: bool,
    pub counters: CufileCounters,
    /// Block requests into PCI peer (P2PDMA) memory the process issued, cuFile's or not: what
    /// makes a read `p2pdma`.
    #[serde(default)]
    pub peer_ios: u64,
    /// Why the process did POSIX reads and writes outside cuFile, where it did: that I/O never
    /// went GPU-direct and no cuFile call saw it.
    #[serde(default)]
    pub outside_cufile: Option<String>,
    /// Its most active, then most recently used files (at most [`REPORT_FILES_PER_PROCESS`]).
    pub files: Vec<CufileFile>,
    /// Its files the kernel has rows for that `files` leaves out.
    #[serde(default)]
    pub files_omitted: usize,
    /// `trusted` (root or `--cufile-users`: its calls feed the `user="trusted"` series the
    /// alerts read) or `other` (its rows are in the untrusted share, under a per-process quota).
    #[serde(default = "trusted_user")]
    pub user: String,
}

/// Reports from agents before the user split.
fn trusted_user() -> String {
    labels::CUFILE_USERS[gds_common::cufile::USER_TRUSTED].to_owned()
}

/// A cuFile call in flight now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CufileInflight {
    pub pid: u32,
    pub tid: u32,
    pub op: String,
    pub age_ns: u64,
    pub size: u64,
    pub fd: i32,
}

/// A process that issued block requests into PCI peer (P2PDMA) memory, cuFile's or not.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerIoProcess {
    pub pid: u32,
    pub comm: String,
    pub requests: u64,
}

/// What `/debug/cufile` leaves out of each list to stay bounded (`REPORT_*`), whatever the
/// kernel's maps and the tracer hold.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CufileOmitted {
    pub libraries: usize,
    /// Pids left out of the listed libraries' `pids`.
    pub library_pids: usize,
    /// USDT providers left out of the listed libraries' `usdt_providers`.
    pub usdt_providers: usize,
    pub not_traced: usize,
    /// Processes left out, with their files.
    pub processes: usize,
    /// File rows left out, of every process (listed or not).
    pub files: usize,
    pub inflight: usize,
    pub peer_io: usize,
}

impl CufileOmitted {
    /// Whether any list was cut.
    pub fn any(&self) -> bool {
        *self != CufileOmitted::default()
    }
}

/// `/debug/cufile`: libraries, processes with their files, calls in flight. Every list is
/// bounded (`REPORT_*`); `omitted` says how much each left out.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CufileReport {
    /// CLOCK_MONOTONIC nanoseconds when the per-process and per-file counters were read (0
    /// from agents before it was carried): per-process rates divide by differences of this.
    #[serde(default)]
    pub read_ns: u64,
    /// Those most processes map, then the most recently attached (at most
    /// [`REPORT_LIBRARIES`], each with at most [`REPORT_LIBRARY_PIDS`] pids).
    pub libraries: Vec<LibraryInfo>,
    /// At most [`REPORT_NOT_TRACED`].
    pub not_traced: Vec<LibraryFailure>,
    /// The most active, then the most recently calling (at most [`REPORT_PROCESSES`]).
    pub processes: Vec<CufileProcess>,
    /// The oldest calls in flight (at most [`REPORT_INFLIGHT`]).
    pub inflight: Vec<CufileInflight>,
    pub nvidia_fs_loaded: bool,
    /// Every process the block layer saw reading or writing peer memory: what a `p2pdma` path
    /// rests on, listed also for processes that never called cuFile (an application doing
    /// P2PDMA itself, or a cuFile the agent has not attached yet). The most requests first, at
    /// most [`REPORT_PEER_IO`].
    #[serde(default)]
    pub peer_io: Vec<PeerIoProcess>,
    #[serde(default)]
    pub omitted: CufileOmitted,
}

/// Host facts the compat reasons rest on.
#[derive(Debug, Clone, Copy)]
pub struct HostFacts {
    pub nvidia_fs_loaded: bool,
    /// The kernel has CONFIG_PCI_P2PDMA: cuFile's P2PDMA mode (no nvidia-fs) is possible.
    pub p2pdma_kernel: bool,
}

/// How relevant a row is: calls in flight first, then the most recent call. Ranks from the
/// kernel's counters alone, so rows left out cost no `/proc` read.
fn relevance(s: &CufileFileStats) -> (u64, u64) {
    (s.active, s.last_ns)
}

/// Keeps the first `max` of `v`; returns how many it dropped.
fn keep<T>(v: &mut Vec<T>, max: usize) -> usize {
    let cut = v.len().saturating_sub(max);
    v.truncate(max);
    cut
}

impl CufileReport {
    /// Reads the tracer's cuFile maps and attachments now.
    pub fn collect<S: Source + ?Sized>(tracer: &S) -> Result<CufileReport, S::Error> {
        let (raw, read_ns) = super::stats::read_at(|| tracer.cufile_raw())?;
        Ok(CufileReport::collect_from(tracer, &raw, read_ns))
    }

    /// The report of `raw`, the cuFile maps as read at `read_ns`, with the tracer's
    /// attachments and peer I/O now.
    pub fn collect_from<S: Source + ?Sized>(
        tracer: &S,
        raw: &CufileRaw,
        read_ns: u64,
    ) -> CufileReport {
        let (libraries, not_traced) = tracer.cufile_libraries();
        let host = HostFacts {
            nvidia_fs_loaded: gds_host::kmod::Modules::live().present("nvidia_fs"),
            p2pdma_kernel: !matches!(tracer.peer_memory(), PeerMemory::Impossible(_)),
        };
        let mut report = CufileReport::decode(
            raw,
            libraries,
            not_traced,
            host,
            gds_host::clock::monotonic_ns(),
        );
        report.read_ns = read_ns;
        let mut peer = tracer.peer_io();
        for p in &mut report.processes {
            p.peer_ios = peer
                .iter()
                .find(|(pid, _)| *pid == p.pid)
                .map_or(0, |(_, n)| *n);
        }
        peer.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        report.omitted.peer_io = keep(&mut peer, REPORT_PEER_IO);
        report.peer_io = peer
            .into_iter()
            .map(|(pid, requests)| PeerIoProcess {
                pid,
                comm: super::decode::proc_comm(pid),
                requests,
            })
            .collect();
        report
    }

    /// Names `raw`, keeping the most relevant rows of each list (`REPORT_*`) and counting the
    /// rest in `omitted`. `/proc` is read only for the rows kept.
    pub fn decode(
        raw: &CufileRaw,
        mut libraries: Vec<LibraryInfo>,
        mut not_traced: Vec<LibraryFailure>,
        host: HostFacts,
        now_ns: u64,
    ) -> CufileReport {
        let mut omitted = CufileOmitted::default();
        // Processes by relevance: the most calls in flight over their rows, then the latest
        // call on any of them.
        let mut rows: BTreeMap<u32, Vec<(i32, &CufileFileStats)>> = BTreeMap::new();
        for (k, s) in &raw.files {
            rows.entry(k.tgid).or_default().push((k.fd, s));
        }
        let mut ranked: Vec<(u32, Vec<(i32, &CufileFileStats)>)> = rows.into_iter().collect();
        let rank = |files: &[(i32, &CufileFileStats)]| {
            files.iter().fold((0u64, 0u64), |(active, last), (_, s)| {
                (active + s.active, last.max(s.last_ns))
            })
        };
        ranked.sort_by_cached_key(|(pid, files)| {
            let (active, last) = rank(files);
            (std::cmp::Reverse(active), std::cmp::Reverse(last), *pid)
        });
        for (_, files) in ranked.iter().skip(REPORT_PROCESSES) {
            omitted.processes += 1;
            omitted.files += files.iter().filter(|(fd, _)| *fd != PROCESS_ROW).count();
        }
        ranked.truncate(REPORT_PROCESSES);
        let proc_root = Path::new("/proc");
        let processes = ranked
            .into_iter()
            .map(|(pid, mut files)| {
                let own = files.iter().find(|(fd, _)| *fd == PROCESS_ROW).map(|r| r.1);
                files.retain(|(fd, _)| *fd != PROCESS_ROW);
                files.sort_by_key(|(fd, s)| {
                    let (active, last) = relevance(s);
                    (std::cmp::Reverse(active), std::cmp::Reverse(last), *fd)
                });
                let files_omitted = keep(&mut files, REPORT_FILES_PER_PROCESS);
                omitted.files += files_omitted;
                let counters = own.map(CufileCounters::from_raw).unwrap_or_default();
                let mut listed: Vec<CufileFile> = files
                    .into_iter()
                    .map(|(fd, s)| file(proc_root, pid, fd, s, host))
                    .collect();
                listed.sort_by_key(|f| f.fd);
                CufileProcess {
                    pid,
                    comm: super::decode::proc_comm(pid),
                    cgroup: gds_host::cgroup::of_pid(pid),
                    alive: proc_root.join(pid.to_string()).exists(),
                    outside_cufile: outside_cufile(proc_root, pid, &counters),
                    counters,
                    peer_ios: 0,
                    files: listed,
                    files_omitted,
                    user: labels::cufile_user(if raw.other.contains(&pid) {
                        gds_common::cufile::USER_OTHER
                    } else {
                        gds_common::cufile::USER_TRUSTED
                    })
                    .to_owned(),
                }
            })
            .collect();
        let mut calls: Vec<&(u64, gds_common::cufile::CufileCall)> = raw.calls.iter().collect();
        calls.sort_by_key(|(id, c)| (c.start_ns, *id));
        omitted.inflight = calls.len().saturating_sub(REPORT_INFLIGHT);
        let inflight = calls
            .into_iter()
            .take(REPORT_INFLIGHT)
            .map(|(id, c)| CufileInflight {
                pid: (id >> 32) as u32,
                tid: *id as u32,
                op: labels::cufile_op(c.op).to_owned(),
                age_ns: now_ns.saturating_sub(c.start_ns),
                size: c.size,
                fd: c.fd,
            })
            .collect();
        libraries.sort_by(|a, b| {
            b.pids
                .len()
                .cmp(&a.pids.len())
                .then(b.attached_unix_s.cmp(&a.attached_unix_s))
                .then(a.path.cmp(&b.path))
        });
        omitted.libraries = keep(&mut libraries, REPORT_LIBRARIES);
        for l in &mut libraries {
            omitted.library_pids += keep(&mut l.pids, REPORT_LIBRARY_PIDS);
            omitted.usdt_providers += keep(&mut l.usdt_providers, REPORT_USDT_PROVIDERS);
        }
        omitted.not_traced = keep(&mut not_traced, REPORT_NOT_TRACED);
        CufileReport {
            read_ns: 0,
            libraries,
            not_traced,
            processes,
            inflight,
            nvidia_fs_loaded: host.nvidia_fs_loaded,
            peer_io: Vec::new(),
            omitted,
        }
    }
}

/// One listed file of process `pid`, with its path and compat reason from `/proc`.
fn file(proc_root: &Path, pid: u32, fd: i32, s: &CufileFileStats, host: HostFacts) -> CufileFile {
    let fd_dir = proc_root.join(pid.to_string()).join("fd");
    let counters = CufileCounters::from_raw(s);
    // A P2PDMA read makes its `pread` too: linked I/O alone says compat only when no call took
    // another path.
    let took = |path: usize| counters.path_calls.contains_key(labels::CUFILE_PATHS[path]);
    let compat_reason = (took(PATH_COMPAT)
        || (counters.compat_ios > 0 && !took(PATH_NVFS) && !took(PATH_P2PDMA)))
    .then(|| compat_reason(proc_root, pid, fd, &counters, host));
    CufileFile {
        fd,
        path: std::fs::read_link(fd_dir.join(fd.to_string()))
            .map(|l| l.display().to_string())
            .unwrap_or_else(|_| "(closed)".into()),
        counters,
        active: s.active,
        compat_reason,
    }
}

/// Process `pid`'s environment as `/proc/PID/environ` has it (empty when unreadable). Kept as
/// bytes rather than procfs's `environ()` map: with a name set twice the map keeps the last
/// value, where `getenv` in the process (what cuFile and KvikIO saw) finds the first.
fn environ(proc_root: &Path, pid: u32) -> Vec<u8> {
    std::fs::read(proc_root.join(pid.to_string()).join("environ")).unwrap_or_default()
}

/// The values of variable `name` in an environment block, in order.
fn env_values<'a>(env: &'a [u8], name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
    env.split(|&b| b == 0).filter_map(move |kv| {
        kv.strip_prefix(name.as_bytes())
            .and_then(|rest| rest.strip_prefix(b"="))
    })
}

/// What to say of process `pid`'s POSIX reads and writes outside cuFile calls, if it made
/// any. KvikIO, the common caller, sends reads and writes below `KVIKIO_GDS_THRESHOLD` (1 MiB
/// unless set) straight to POSIX without calling cuFile, so from inside the application they
/// look like cuFile I/O that fell back; the environment says which threshold was in force.
pub fn outside_cufile(proc_root: &Path, pid: u32, c: &CufileCounters) -> Option<String> {
    if c.outside_ios == 0 {
        return None;
    }
    let env = environ(proc_root, pid);
    let threshold = env_values(&env, "KVIKIO_GDS_THRESHOLD")
        .next()
        .map(|v| String::from_utf8_lossy(v).into_owned());
    let why = match threshold {
        Some(t) => format!("KVIKIO_GDS_THRESHOLD={t} is set: KvikIO reads and writes below it bypass cuFile"),
        None => "e.g. KvikIO sends reads and writes below KVIKIO_GDS_THRESHOLD (1 MiB unless set) to POSIX without cuFile".into(),
    };
    Some(format!(
        "{} read(s)/write(s), {} bytes asked, with no cuFile call in flight on their file: POSIX \
         I/O that never went GPU-direct ({why})",
        c.outside_ios, c.outside_bytes
    ))
}

/// Why cuFile used its compat path for file `fd` of process `pid`: the first of these that
/// holds, in the order cuFile decides (documented in NVIDIA's GDS troubleshooting guide):
/// compat forced by the environment, no nvidia-fs on a kernel without P2PDMA (so no GPU-direct
/// path at all), the file not opened with O_DIRECT, I/O not 4 KiB aligned, and on a P2PDMA
/// kernel without nvidia-fs, P2PDMA not configured for cuFile.
pub fn compat_reason(
    proc_root: &Path,
    pid: u32,
    fd: i32,
    c: &CufileCounters,
    host: HostFacts,
) -> String {
    let dir = proc_root.join(pid.to_string());
    let forced = env_values(&environ(proc_root, pid), "CUFILE_FORCE_COMPAT_MODE")
        .any(|v| v.eq_ignore_ascii_case(b"true") || v == b"1");
    if forced {
        return "CUFILE_FORCE_COMPAT_MODE is set in the process's environment".into();
    }
    if !host.nvidia_fs_loaded && !host.p2pdma_kernel {
        return "nvidia-fs not loaded".into();
    }
    let flags = std::fs::read_to_string(dir.join("fdinfo").join(fd.to_string()))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("flags:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 8).ok())
        });
    if flags.is_some_and(|f| f & libc::O_DIRECT as u64 == 0) {
        return "file not opened O_DIRECT".into();
    }
    if c.unaligned > 0 {
        return format!(
            "{} unaligned call(s) (offset or size not a multiple of 4 KiB)",
            c.unaligned
        );
    }
    if !host.nvidia_fs_loaded {
        return "nvidia-fs not loaded and P2PDMA not configured (the kernel has P2PDMA: cuFile \
                needs `use_pci_p2pdma` in cufile.json and the GPU's BAR published as peer memory)"
            .into();
    }
    "unknown (nvidia-fs is loaded, the file is O_DIRECT and the I/O aligned)".into()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake /proc: one process with an environment and one fd's flags.
    fn fake_proc(env: &[u8], flags: &str) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("7");
        std::fs::create_dir_all(p.join("fdinfo")).unwrap();
        std::fs::write(p.join("environ"), env).unwrap();
        std::fs::write(p.join("fdinfo/5"), format!("pos:\t0\nflags:\t{flags}\n")).unwrap();
        d
    }

    /// Every list of the report is cut at its bound, keeps the most relevant rows and counts
    /// the rest, whatever the maps and the tracer hold (pids that do not exist: no `/proc`).
    #[test]
    fn every_list_is_bounded_with_the_most_relevant_rows() {
        use gds_common::cufile::{CufileCall, CufileFileKey};
        const PROCS: u32 = REPORT_PROCESSES as u32 + 36;
        const FILES: i32 = REPORT_FILES_PER_PROCESS as i32 + 4;
        let base = 4_000_000_000u32;
        let mut raw = CufileRaw::default();
        for i in 0..PROCS {
            // Process i called last at i: the higher, the more recent.
            let row = |fd: i32, active: u64| {
                let key = CufileFileKey { tgid: base + i, fd };
                let stats = CufileFileStats {
                    calls: 1,
                    last_ns: u64::from(i) * 1_000 + fd.max(0) as u64,
                    active,
                    ..Default::default()
                };
                (key, stats)
            };
            raw.files.push(row(PROCESS_ROW, 0));
            for fd in 0..FILES {
                // The least recent process has a call in flight on its fd 0: most active.
                raw.files.push(row(fd, u64::from(i == 0 && fd == 0)));
            }
        }
        for t in 0..REPORT_INFLIGHT as u64 + 44 {
            raw.calls.push((
                (u64::from(base) << 32) | t,
                CufileCall {
                    start_ns: 1_000_000 - t,
                    op: 0,
                    depth: 0,
                    size: 4096,
                    offset: 0,
                    handle: 0,
                    fd: 3,
                    _pad: 0,
                    compat_at_entry: 0,
                    nvfs_at_entry: 0,
                    peer_at_entry: 0,
                    sp: 0,
                    ret_addr: 0,
                },
            ));
        }
        let libraries: Vec<LibraryInfo> = (0..REPORT_LIBRARIES as u64 + 6)
            .map(|n| LibraryInfo {
                path: format!("/x/{n}/libcufile.so.0"),
                deleted: false,
                dev: 1,
                inode: n,
                // Library n is mapped by n processes.
                pids: (0..n as u32 + 60).collect(),
                functions: vec![],
                missing: vec![],
                usdt_notes: 0,
                usdt_providers: (0..20).map(|p| format!("p{p}")).collect(),
                attached_unix_s: n,
            })
            .collect();
        let not_traced: Vec<LibraryFailure> = (0..REPORT_NOT_TRACED + 10)
            .map(|n| LibraryFailure {
                path: format!("/junk/libcufile.so.{n}"),
                error: "no cuFile symbol".into(),
            })
            .collect();
        let host = HostFacts {
            nvidia_fs_loaded: false,
            p2pdma_kernel: false,
        };
        let r = CufileReport::decode(&raw, libraries, not_traced, host, 2_000_000);

        assert_eq!(r.processes.len(), REPORT_PROCESSES);
        assert_eq!(r.omitted.processes, PROCS as usize - REPORT_PROCESSES);
        // The one with a call in flight first, then the most recent.
        let order: Vec<u32> = r.processes.iter().map(|p| p.pid - base).collect();
        let mut expected = vec![0];
        expected.extend((0..PROCS).rev().take(REPORT_PROCESSES - 1));
        assert_eq!(order, expected);
        for p in &r.processes {
            assert_eq!(p.files.len(), REPORT_FILES_PER_PROCESS, "{}", p.pid);
            assert_eq!(p.files_omitted, FILES as usize - REPORT_FILES_PER_PROCESS);
            assert_eq!(p.counters.calls, 1, "the process row is not a file");
        }
        // Process 0's file with a call in flight, then its most recent ones.
        let fds: Vec<i32> = r.processes[0].files.iter().map(|f| f.fd).collect();
        let mut kept: Vec<i32> = vec![0];
        kept.extend((0..FILES).rev().take(REPORT_FILES_PER_PROCESS - 1));
        kept.sort();
        assert_eq!(fds, kept, "listed by fd");
        assert_eq!(
            r.omitted.files,
            REPORT_PROCESSES * (FILES as usize - REPORT_FILES_PER_PROCESS)
                + r.omitted.processes * FILES as usize
        );

        assert_eq!(r.inflight.len(), REPORT_INFLIGHT);
        assert_eq!(r.omitted.inflight, 44);
        assert!(
            r.inflight.windows(2).all(|w| w[0].age_ns >= w[1].age_ns),
            "oldest first"
        );
        assert_eq!(r.inflight[0].age_ns, 2_000_000 - (1_000_000 - 299));

        assert_eq!(r.libraries.len(), REPORT_LIBRARIES);
        assert_eq!(r.omitted.libraries, 6);
        assert_eq!(
            r.libraries[0].inode,
            REPORT_LIBRARIES as u64 + 5,
            "most pids first"
        );
        assert!(
            r.libraries
                .iter()
                .all(|l| l.pids.len() == REPORT_LIBRARY_PIDS)
        );
        assert!(
            r.libraries
                .iter()
                .all(|l| l.usdt_providers.len() == REPORT_USDT_PROVIDERS)
        );
        assert_eq!(
            r.omitted.usdt_providers,
            REPORT_LIBRARIES * (20 - REPORT_USDT_PROVIDERS)
        );
        assert_eq!(r.not_traced.len(), REPORT_NOT_TRACED);
        assert_eq!(r.omitted.not_traced, 10);
        assert!(r.omitted.any());
    }

    #[test]
    fn io_outside_cufile_names_the_threshold() {
        let none = CufileCounters::default();
        let d = fake_proc(b"A=1\0", "0100002");
        assert_eq!(outside_cufile(d.path(), 7, &none), None);
        let some = CufileCounters {
            outside_ios: 7,
            outside_bytes: 448,
            ..Default::default()
        };
        let text = outside_cufile(d.path(), 7, &some).unwrap();
        assert!(
            text.starts_with("7 read(s)/write(s), 448 bytes asked"),
            "{text}"
        );
        assert!(text.contains("1 MiB unless set"), "{text}");
        let d = fake_proc(b"KVIKIO_GDS_THRESHOLD=65536\0", "0100002");
        let text = outside_cufile(d.path(), 7, &some).unwrap();
        assert!(text.contains("KVIKIO_GDS_THRESHOLD=65536 is set"), "{text}");
    }

    #[test]
    fn compat_reasons_in_cufile_order() {
        let c = CufileCounters::default();
        let no_nvfs = HostFacts {
            nvidia_fs_loaded: false,
            p2pdma_kernel: false,
        };
        let nvfs = HostFacts {
            nvidia_fs_loaded: true,
            p2pdma_kernel: false,
        };
        let p2p_only = HostFacts {
            nvidia_fs_loaded: false,
            p2pdma_kernel: true,
        };
        let d = fake_proc(b"A=1\0CUFILE_FORCE_COMPAT_MODE=true\0", "0100002");
        assert!(compat_reason(d.path(), 7, 5, &c, nvfs).starts_with("CUFILE_FORCE_COMPAT_MODE"));
        let d = fake_proc(b"A=1\0", "0100002");
        assert_eq!(
            compat_reason(d.path(), 7, 5, &c, no_nvfs),
            "nvidia-fs not loaded"
        );
        assert_eq!(
            compat_reason(d.path(), 7, 5, &c, nvfs),
            "file not opened O_DIRECT"
        );
        let d = fake_proc(b"", "0140002");
        let unaligned = CufileCounters {
            unaligned: 3,
            ..Default::default()
        };
        assert!(compat_reason(d.path(), 7, 5, &unaligned, nvfs).starts_with("3 unaligned"));
        assert!(compat_reason(d.path(), 7, 5, &c, nvfs).starts_with("unknown"));
        // No nvidia-fs on a P2PDMA kernel: O_DIRECT and alignment still come first, then
        // P2PDMA not configured for cuFile.
        assert!(compat_reason(d.path(), 7, 5, &unaligned, p2p_only).starts_with("3 unaligned"));
        assert!(
            compat_reason(d.path(), 7, 5, &c, p2p_only)
                .starts_with("nvidia-fs not loaded and P2PDMA not configured")
        );
        let d = fake_proc(b"", "0100002");
        assert_eq!(
            compat_reason(d.path(), 7, 5, &c, p2p_only),
            "file not opened O_DIRECT"
        );
    }
}
