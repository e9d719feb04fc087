//! cuFile calls per process and per file, with the path their I/O took and, for compat, why
//! (`/debug/cufile`, `top`). The per-operation aggregates `/metrics` exports are
//! `stats::CufileStats`.

use std::{collections::BTreeMap, path::Path};

use gds_common::cufile::{
    CUFILE_PATHS, CufileFileStats, PATH_COMPAT, PATH_NVFS, PATH_P2PDMA, PROCESS_ROW,
};
use serde::{Deserialize, Serialize};

use super::labels;
use crate::trace::{CufileRaw, LibraryFailure, LibraryInfo};

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
    pub cgroup: Option<crate::cgroup::CgroupInfo>,
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
    pub files: Vec<CufileFile>,
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

/// `/debug/cufile`: libraries, processes with their files, calls in flight.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CufileReport {
    pub libraries: Vec<LibraryInfo>,
    pub not_traced: Vec<LibraryFailure>,
    pub processes: Vec<CufileProcess>,
    pub inflight: Vec<CufileInflight>,
    pub nvidia_fs_loaded: bool,
    /// Every process the block layer saw reading or writing peer memory: what a `p2pdma` path
    /// rests on, listed also for processes that never called cuFile (an application doing
    /// P2PDMA itself, or a cuFile the agent has not attached yet).
    #[serde(default)]
    pub peer_io: Vec<PeerIoProcess>,
}

/// Host facts the compat reasons rest on.
#[derive(Debug, Clone, Copy)]
pub struct HostFacts {
    pub nvidia_fs_loaded: bool,
    /// The kernel has CONFIG_PCI_P2PDMA: cuFile's P2PDMA mode (no nvidia-fs) is possible.
    pub p2pdma_kernel: bool,
}

impl CufileReport {
    /// Reads the tracer's cuFile maps and attachments now.
    pub fn collect(
        tracer: &crate::trace::UringTracer,
    ) -> Result<CufileReport, crate::trace::TraceError> {
        let raw = tracer.cufile_raw()?;
        let (libraries, not_traced) = tracer.cufile_libraries();
        let host = HostFacts {
            nvidia_fs_loaded: crate::kmod::Modules::live().present("nvidia_fs"),
            p2pdma_kernel: !matches!(
                tracer.peer_memory(),
                crate::trace::PeerMemory::Impossible(_)
            ),
        };
        let mut report = CufileReport::decode(
            &raw,
            libraries,
            not_traced,
            host,
            crate::trace::monotonic_ns(),
        );
        let peer: BTreeMap<u32, u64> = tracer.peer_io().into_iter().collect();
        for p in &mut report.processes {
            p.peer_ios = peer.get(&p.pid).copied().unwrap_or(0);
        }
        report.peer_io = peer
            .into_iter()
            .map(|(pid, requests)| PeerIoProcess {
                pid,
                comm: super::decode::proc_comm(pid),
                requests,
            })
            .collect();
        Ok(report)
    }

    pub fn decode(
        raw: &CufileRaw,
        libraries: Vec<LibraryInfo>,
        not_traced: Vec<LibraryFailure>,
        host: HostFacts,
        now_ns: u64,
    ) -> CufileReport {
        let proc_root = Path::new("/proc");
        let mut processes: BTreeMap<u32, CufileProcess> = BTreeMap::new();
        for (k, _) in &raw.files {
            processes.entry(k.tgid).or_insert_with(|| {
                let dir = proc_root.join(k.tgid.to_string());
                CufileProcess {
                    pid: k.tgid,
                    comm: super::decode::proc_comm(k.tgid),
                    cgroup: crate::cgroup::of_pid(k.tgid),
                    alive: dir.exists(),
                    counters: CufileCounters::default(),
                    peer_ios: 0,
                    outside_cufile: None,
                    files: Vec::new(),
                }
            });
        }
        for (k, s) in &raw.files {
            let Some(p) = processes.get_mut(&k.tgid) else {
                continue;
            };
            if k.fd == PROCESS_ROW {
                p.counters = CufileCounters::from_raw(s);
                p.outside_cufile = outside_cufile(proc_root, k.tgid, &p.counters);
                continue;
            }
            let fd_dir = proc_root.join(k.tgid.to_string()).join("fd");
            let counters = CufileCounters::from_raw(s);
            // A P2PDMA read makes its `pread` too: linked I/O alone says compat only when no
            // call took another path.
            let took = |path: usize| counters.path_calls.contains_key(labels::CUFILE_PATHS[path]);
            let compat_reason = (took(PATH_COMPAT)
                || (counters.compat_ios > 0 && !took(PATH_NVFS) && !took(PATH_P2PDMA)))
            .then(|| compat_reason(proc_root, k.tgid, k.fd, &counters, host));
            p.files.push(CufileFile {
                fd: k.fd,
                path: std::fs::read_link(fd_dir.join(k.fd.to_string()))
                    .map(|l| l.display().to_string())
                    .unwrap_or_else(|_| "(closed)".into()),
                counters,
                active: s.active,
                compat_reason,
            });
        }
        let inflight = raw
            .calls
            .iter()
            .map(|(id, c)| CufileInflight {
                pid: (id >> 32) as u32,
                tid: *id as u32,
                op: labels::cufile_op(c.op).to_owned(),
                age_ns: now_ns.saturating_sub(c.start_ns),
                size: c.size,
                fd: c.fd,
            })
            .collect();
        CufileReport {
            libraries,
            not_traced,
            processes: processes.into_values().collect(),
            inflight,
            nvidia_fs_loaded: host.nvidia_fs_loaded,
            peer_io: Vec::new(),
        }
    }
}

/// Process `pid`'s environment as `/proc/PID/environ` has it (empty when unreadable).
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
