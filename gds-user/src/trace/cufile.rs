//! cuFile tracing: every libcufile in use on the host, attached by file, and the libc calls
//! beneath it in the processes that use it.
//!
//! - **Finding libraries.** Every [`CufileTracing::refresh`] (the agent calls it every
//!   500 ms, so a library loaded with `dlopen` is traced within a second) reads
//!   `/proc/*/maps` and keeps the processes that map a `libcufile.so*`: system CUDA, Python
//!   wheels, containers and private mount namespaces alike, since the kernel reaches each file
//!   through `/proc/PID/map_files` (see [`super::procmaps`]). Each file (device, inode) is
//!   attached once, for every process that maps it; it is detached when no process maps it
//!   any more, which is also how a library replaced on disk is handled: the old inode goes
//!   with its last user, the new one is attached when first mapped.
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
//! `p2pdma` (O_DIRECT I/O into GPU BAR memory, CUDA 12.8+) looks like compat from libc: what
//! tells it apart is the memory type of the buffer, which the block program checks
//! (`trace::peer`) and counts per process for the cuFile return to read.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
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
    BENEATH_IOCTL, BENEATH_PREAD, BENEATH_PWRITE, CUFILE_COUNTS, CUFILE_OP_BATCH_CANCEL,
    CUFILE_OP_BATCH_GET_STATUS, CUFILE_OP_BATCH_SUBMIT, CUFILE_OP_BUF_DEREGISTER,
    CUFILE_OP_BUF_REGISTER, CUFILE_OP_DRIVER_CLOSE, CUFILE_OP_DRIVER_OPEN,
    CUFILE_OP_HANDLE_DEREGISTER, CUFILE_OP_HANDLE_REGISTER, CUFILE_OP_READ, CUFILE_OP_READ_ASYNC,
    CUFILE_OP_WRITE, CUFILE_OP_WRITE_ASYNC, CUFILE_OPS, CUFILE_PATHS, CUFILE_USERS, CufileCall,
    CufileCpuStats, CufileErrKey, CufileFileKey, CufileFileStats, CufileHandleKey, CufileOpStats,
    MAP_CUFILE_CALLS, MAP_CUFILE_CALLS_OTHER, MAP_CUFILE_ERRORS, MAP_CUFILE_ERRORS_OTHER,
    MAP_CUFILE_FILES, MAP_CUFILE_FILES_OTHER, MAP_CUFILE_HANDLES, MAP_CUFILE_HANDLES_OTHER,
    MAP_CUFILE_OPS, MAP_CUFILE_STATS, USER_OTHER, USER_TRUSTED,
};

use super::{
    TraceError,
    elf::{self, LibSymbols},
    procmaps::{self, FileId, Mapping},
    program, take_map,
};

/// The traced functions and their operation. `cuFileDriverClose_v2` (CUDA 12.2+) and
/// `cuFileDriverClose` are separate implementations, both counted as `driver_close`; a traced
/// function called from inside another counts once, as the outer call (`Nested`).
pub const SYMBOLS: &[(&str, u32)] = &[
    ("cuFileRead", CUFILE_OP_READ),
    ("cuFileWrite", CUFILE_OP_WRITE),
    ("cuFileReadAsync", CUFILE_OP_READ_ASYNC),
    ("cuFileWriteAsync", CUFILE_OP_WRITE_ASYNC),
    ("cuFileBatchIOSubmit", CUFILE_OP_BATCH_SUBMIT),
    ("cuFileBatchIOGetStatus", CUFILE_OP_BATCH_GET_STATUS),
    ("cuFileBatchIOCancel", CUFILE_OP_BATCH_CANCEL),
    ("cuFileHandleRegister", CUFILE_OP_HANDLE_REGISTER),
    ("cuFileHandleDeregister", CUFILE_OP_HANDLE_DEREGISTER),
    ("cuFileBufRegister", CUFILE_OP_BUF_REGISTER),
    ("cuFileBufDeregister", CUFILE_OP_BUF_DEREGISTER),
    ("cuFileDriverOpen", CUFILE_OP_DRIVER_OPEN),
    ("cuFileDriverClose", CUFILE_OP_DRIVER_CLOSE),
    ("cuFileDriverClose_v2", CUFILE_OP_DRIVER_CLOSE),
];

/// libc functions probed beneath cuFile (`ioctl` only where nvidia-fs is loaded).
const BENEATH: &[(&str, u32)] = &[
    ("pread64", BENEATH_PREAD),
    ("pwrite64", BENEATH_PWRITE),
    ("ioctl", BENEATH_IOCTL),
];

const PROGRAMS: [&str; 4] = ["cufile_enter", "cufile_exit", "beneath_enter", "dl_notify"];

/// How long a library stays attached after its last process exited, and how often links of
/// exited processes are closed. Closing a uprobe takes the kernel's `dup_mmap_sem` for writing
/// and waits for an RCU grace period per probe, during which every other uprobe attach (and
/// every fork on the host) waits: 28 probes of one library closed when a short process exits
/// held up the next process's attach by 1.4 s here. Lingering makes a job that restarts, or a
/// loop of short processes, reuse the probes; closing in batches pays the waits together.
pub const LINGER: std::time::Duration = std::time::Duration::from_secs(5);

/// One libcufile file, attached.
struct AttachedLib {
    /// The path the first process seen mapping it had, and whether it was deleted.
    mapping: Mapping,
    pids: BTreeSet<u32>,
    symbols: LibSymbols,
    since: std::time::SystemTime,
    /// When its last process was seen gone (detached [`LINGER`] later).
    idle_since: Option<std::time::Instant>,
    _links: Vec<UProbeLink>,
}

/// One process that maps libcufile, with its libc probes.
struct TracedProcess {
    nvfs: bool,
    _links: Vec<UProbeLink>,
}

/// A libcufile copy, as `/debug/cufile` lists it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct LibraryInfo {
    pub path: String,
    pub deleted: bool,
    pub dev: u64,
    pub inode: u64,
    pub pids: Vec<u32>,
    pub functions: Vec<String>,
    pub missing: Vec<String>,
    pub usdt_notes: usize,
    pub usdt_providers: Vec<String>,
    pub attached_unix_s: u64,
}

/// A library that could not be attached, and why (tried again only if it changes).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct LibraryFailure {
    pub path: String,
    pub error: String,
}

/// The cuFile layer's programs and what they are attached to. Lives under the tracer's object
/// lock: attaching needs the loaded programs.
pub struct CufileTracing {
    proc_root: PathBuf,
    libs: BTreeMap<FileId, AttachedLib>,
    procs: BTreeMap<u32, TracedProcess>,
    failed: BTreeMap<FileId, LibraryFailure>,
    /// Dynamic loaders with the `dl_notify` probe (empty: it could not be attached).
    loaders: BTreeMap<FileId, Vec<UProbeLink>>,
    /// Links to close in the next batch, and when the last batch was closed.
    pending_release: Vec<UProbeLink>,
    last_release: std::time::Instant,
}

impl CufileTracing {
    /// Loads the four uprobe programs (attached later, per library and process).
    pub fn load(ebpf: &mut Ebpf) -> Result<CufileTracing, TraceError> {
        for name in PROGRAMS {
            let p: &mut UProbe = program(ebpf, name)?;
            p.load()
                .map_err(|source| TraceError::Program { name, source })?;
        }
        Ok(CufileTracing {
            proc_root: PathBuf::from("/proc"),
            libs: BTreeMap::new(),
            procs: BTreeMap::new(),
            failed: BTreeMap::new(),
            loaders: BTreeMap::new(),
            pending_release: Vec::new(),
            last_release: std::time::Instant::now(),
        })
    }

    /// Reads every process's maps: attaches to libraries, processes and loaders that appeared
    /// since the last call and detaches from those gone. Returns what changed, to log.
    pub fn refresh(&mut self, ebpf: &mut Ebpf, nvfs_loaded: bool) -> Vec<String> {
        let seen = procmaps::scan(&self.proc_root, None);
        self.apply(ebpf, seen, nvfs_loaded, true)
    }

    /// Reads the maps of `pids` only (the loader said they loaded something): attaches what is
    /// new there, detaches nothing (that is [`Self::refresh`]'s job).
    pub fn refresh_pids(
        &mut self,
        ebpf: &mut Ebpf,
        nvfs_loaded: bool,
        pids: &[u32],
    ) -> Vec<String> {
        let seen = procmaps::scan(&self.proc_root, Some(pids));
        tracing::debug!(
            ?pids,
            users = seen.users.len(),
            "cuFile: scanned after the loader's notification"
        );
        self.apply(ebpf, seen, nvfs_loaded, false)
    }

    fn apply(
        &mut self,
        ebpf: &mut Ebpf,
        seen: procmaps::Scan,
        nvfs_loaded: bool,
        full: bool,
    ) -> Vec<String> {
        let mut changes = Vec::new();
        let mut released = Vec::new();

        // Loaders: a uprobe on each ld.so's `_dl_debug_state` says when a process loads.
        if full {
            let gone: Vec<FileId> = self
                .loaders
                .keys()
                .filter(|f| !seen.loaders.contains_key(f))
                .copied()
                .collect();
            for f in gone {
                released.extend(self.loaders.remove(&f).unwrap_or_default());
            }
        }
        for (file, m) in &seen.loaders {
            if self.loaders.contains_key(file) {
                continue;
            }
            match attach_loader(ebpf, m) {
                Ok(links) => {
                    self.loaders.insert(*file, links);
                }
                Err(e) if !m.via.exists() => {
                    // Its process exited meanwhile: another one will show it again.
                    let _ = e;
                }
                Err(e) => {
                    changes.push(format!(
                        "cuFile: no dlopen notification from {} ({}): libraries it loads are \
                         found by the periodic scan only",
                        m.path,
                        with_causes(&e)
                    ));
                    self.loaders.insert(*file, Vec::new());
                }
            }
        }

        // Libraries: attach new files, keep the set of processes of each.
        let mut users: BTreeMap<FileId, (Mapping, BTreeSet<u32>)> = BTreeMap::new();
        for (pid, (libs, _)) in &seen.users {
            for m in libs {
                users
                    .entry(m.file)
                    .or_insert_with(|| (m.clone(), BTreeSet::new()))
                    .1
                    .insert(*pid);
            }
        }
        if full {
            let now = std::time::Instant::now();
            let mut gone = Vec::new();
            for (f, lib) in &mut self.libs {
                if users.contains_key(f) {
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
                    changes.push(format!(
                        "cuFile: detached from {} (inode {}): no process has mapped it for {:?}",
                        lib.mapping.path, f.ino, LINGER
                    ));
                    released.extend(lib._links);
                }
            }
            self.failed.retain(|f, _| users.contains_key(f));
        }
        for (file, (mapping, pids)) in users {
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
            if self.failed.contains_key(&file) {
                continue;
            }
            match attach_library(ebpf, &mapping) {
                Ok((symbols, links)) => {
                    changes.push(format!(
                        "cuFile: attached {} uprobes to {}{} (inode {}, used by pid {}){}",
                        symbols.found.len(),
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
                            since: std::time::SystemTime::now(),
                            idle_since: None,
                            _links: links,
                        },
                    );
                }
                // The process exited while being attached to: not the library's fault; the
                // next process that maps it is tried again.
                Err(_) if !mapping.via.exists() => {}
                Err(e) => {
                    let e = with_causes(&e);
                    changes.push(format!(
                        "cuFile: cannot trace {} (inode {}): {e}",
                        mapping.path, file.ino
                    ));
                    self.failed.insert(
                        file,
                        LibraryFailure {
                            path: mapping.path,
                            error: e,
                        },
                    );
                }
            }
        }

        // Processes: libc probes for each process that maps libcufile.
        if full {
            let (keep, gone): (BTreeMap<_, _>, BTreeMap<_, _>) = std::mem::take(&mut self.procs)
                .into_iter()
                .partition(|(pid, p)| seen.users.contains_key(pid) && p.nvfs == nvfs_loaded);
            self.procs = keep;
            released.extend(gone.into_values().flat_map(|p| p._links));
        }
        self.pending_release.extend(released);
        if full && self.last_release.elapsed() >= LINGER {
            release(std::mem::take(&mut self.pending_release));
            self.last_release = std::time::Instant::now();
        }
        for (pid, (_, libcs)) in &seen.users {
            if self.procs.contains_key(pid) {
                continue;
            }
            let links = match libcs.first() {
                Some(m) => match attach_beneath(ebpf, *pid, m, nvfs_loaded) {
                    Ok(links) => links,
                    Err(_) if !m.via.exists() => continue,
                    Err(e) => {
                        changes.push(format!(
                            "cuFile: pid {pid}: no probes on its libc ({}): {}; its calls are \
                             counted, their path is not classified",
                            m.path,
                            with_causes(&e)
                        ));
                        Vec::new()
                    }
                },
                None => Vec::new(),
            };
            self.procs.insert(
                *pid,
                TracedProcess {
                    nvfs: nvfs_loaded,
                    _links: links,
                },
            );
        }
        changes
    }

    /// The libraries attached now.
    pub fn libraries(&self) -> Vec<LibraryInfo> {
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

    /// Libraries that could not be attached.
    pub fn failures(&self) -> Vec<LibraryFailure> {
        self.failed.values().cloned().collect()
    }
}

/// Detaches `links` on a thread of their own, each closed concurrently: closing a uprobe perf
/// event waits for an RCU grace period (~250 ms here), so 28 links of one library closed in a
/// row took 7 s, during which no new library would be attached.
fn release(links: Vec<UProbeLink>) {
    if links.is_empty() {
        return;
    }
    let _ = std::thread::Builder::new()
        .name("gds-cufile-detach".into())
        .spawn(move || drop_concurrently(links));
}

/// Drops every link at once (one thread each) and returns when all are closed.
fn drop_concurrently(links: Vec<UProbeLink>) {
    std::thread::scope(|s| {
        for l in links {
            s.spawn(move || drop(l));
        }
    });
}

impl Drop for CufileTracing {
    /// At shutdown too: one grace period for all, not one per link.
    fn drop(&mut self) {
        let mut links: Vec<UProbeLink> = Vec::new();
        for (_, lib) in std::mem::take(&mut self.libs) {
            links.extend(lib._links);
        }
        for (_, p) in std::mem::take(&mut self.procs) {
            links.extend(p._links);
        }
        for (_, l) in std::mem::take(&mut self.loaders) {
            links.extend(l);
        }
        links.append(&mut self.pending_release);
        let (n, t) = (links.len(), std::time::Instant::now());
        drop_concurrently(links);
        tracing::info!("cuFile: closed {n} uprobe links in {:?}", t.elapsed());
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

/// Attaches entry and return probes to each function of [`SYMBOLS`] that `m` exports.
fn attach_library(
    ebpf: &mut Ebpf,
    m: &Mapping,
) -> Result<(LibSymbols, Vec<UProbeLink>), TraceError> {
    let wanted: Vec<&'static str> = SYMBOLS.iter().map(|(n, _)| *n).collect();
    let symbols = elf::symbols(&m.via, &wanted).map_err(|e| TraceError::Library {
        path: m.path.clone(),
        why: e.to_string(),
    })?;
    if symbols.found.is_empty() {
        return Err(TraceError::Library {
            path: m.path.clone(),
            why: "it exports none of the cuFile functions gds traces".into(),
        });
    }
    let mut links = Vec::new();
    for (name, offset) in &symbols.found {
        let op = SYMBOLS
            .iter()
            .find(|(n, _)| n == name)
            .map_or(0, |(_, op)| *op);
        for prog in ["cufile_enter", "cufile_exit"] {
            links.push(attach_one(
                ebpf,
                prog,
                *offset,
                op,
                &m.via,
                UProbeScope::AllProcesses,
            )?);
        }
    }
    Ok((symbols, links))
}

/// Attaches `dl_notify` to the loader's `_dl_debug_state` (glibc's debugger hook, exported as
/// `GLIBC_PRIVATE`; musl's loader has none).
fn attach_loader(ebpf: &mut Ebpf, m: &Mapping) -> Result<Vec<UProbeLink>, TraceError> {
    let symbols = elf::symbols(&m.via, &["_dl_debug_state"]).map_err(|e| TraceError::Library {
        path: m.path.clone(),
        why: e.to_string(),
    })?;
    let Some((_, offset)) = symbols.found.first() else {
        return Err(TraceError::Library {
            path: m.path.clone(),
            why: "it does not export _dl_debug_state".into(),
        });
    };
    Ok(vec![attach_one(
        ebpf,
        "dl_notify",
        *offset,
        0,
        &m.via,
        UProbeScope::AllProcesses,
    )?])
}

/// Attaches the libc probes beneath cuFile in process `pid` only.
fn attach_beneath(
    ebpf: &mut Ebpf,
    pid: u32,
    libc: &Mapping,
    nvfs_loaded: bool,
) -> Result<Vec<UProbeLink>, TraceError> {
    let wanted: Vec<&'static str> = BENEATH
        .iter()
        .filter(|(_, k)| nvfs_loaded || *k != BENEATH_IOCTL)
        .map(|(n, _)| *n)
        .collect();
    let symbols = elf::symbols(&libc.via, &wanted).map_err(|e| TraceError::Library {
        path: libc.path.clone(),
        why: e.to_string(),
    })?;
    let scope =
        UProbeScope::OneProcess(std::num::NonZeroU32::new(pid).ok_or(TraceError::Library {
            path: libc.path.clone(),
            why: "pid 0".into(),
        })?);
    let mut links = Vec::new();
    for (name, offset) in &symbols.found {
        let kind = BENEATH
            .iter()
            .find(|(n, _)| n == name)
            .map_or(0, |(_, k)| *k);
        links.push(attach_one(
            ebpf,
            "beneath_enter",
            *offset,
            kind,
            &libc.via,
            scope,
        )?);
    }
    Ok(links)
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

/// The cuFile maps' contents at one instant, summed over CPUs, not yet named.
#[derive(Debug, Clone, Default)]
pub struct CufileRaw {
    pub counts: [u64; CUFILE_COUNTS],
    /// Indexed by `CUFILE_OP_* + CUFILE_OPS * USER_*`.
    pub ops: Vec<CufileOpStats>,
    /// Error counters of trusted users' processes.
    pub errors: Vec<(CufileErrKey, u64)>,
    /// Error counters of other users' processes.
    pub errors_other: Vec<(CufileErrKey, u64)>,
    /// Calls in flight now, by thread (`pid_tgid`), both shares.
    pub calls: Vec<(u64, CufileCall)>,
    /// Process and file rows, both shares (trusted first).
    pub files: Vec<(CufileFileKey, CufileFileStats)>,
    /// Processes whose rows are in the untrusted share (their user is neither root nor in
    /// `--cufile-users`).
    pub other: BTreeSet<u32>,
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
