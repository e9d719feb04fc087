//! The file layer: synchronous read/write calls, with the hooks `--file-hooks` asks for and
//! the host allows, chosen before loading (the programs' offsets and tier are read-only
//! globals) and attached after.
//!
//! Tiers, best first (`auto` tries them in this order; `syscalls` only when asked for):
//! - `fentry`, `kprobe`: the file systems' `read_iter`/`write_iter` keyed by the kiocb (every
//!   path: syscalls, io_uring, aio, nvidia-fs; buffered and O_DIRECT): [`super::file_hooks`].
//!   Whether they work is known only by attaching: `auto` tries fentry, then kprobes, then the
//!   tracepoints; naming one tries it alone before the tracepoints.
//! - `tracepoint`: `iomap_dio_rw_begin`/`iomap_dio_complete` (6.4+): O_DIRECT calls of ext4,
//!   xfs and btrfs, exactly, from every path. Costs nothing to other I/O or syscalls.
//! - `syscalls`: `raw_syscalls` `sys_enter`/`sys_exit`: every read/write-family system call on
//!   a regular file or block device, buffered or not; every syscall of every process then
//!   takes the kernel's slow path (+40–70 ns each here, see docs/notes-issue-23.md).

use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::RawTracePoint,
};
use gds_api::raw::{FileRaw, Inflight, Layer, LayerDetail, LayerEntry};
use gds_common::file::{
    FILE_OP_FSYNC, FILE_OP_READ, FILE_OP_WRITE, FILE_ROWS, FILE_SEES_ALL, FILE_SEES_HOOKED,
    FILE_SEES_NONE, FILE_SLOTS, FILE_TIER_KIOCB, FILE_TIER_SYSCALLS, FILE_TIER_TRACEPOINT,
    FileCall, FileConfig, FileProcKey, FileProcStats, FileRowStats, MAP_FILE_HOOKED,
    MAP_FILE_INFLIGHT, MAP_FILE_NVFS, MAP_FILE_PROCS, MAP_FILE_SEES, MAP_FILE_SLOTS,
    MAP_FILE_STATS, SYSCALL_COUNT_ARG2, SYSCALL_POS_ARG3, SYSCALL_TABLE, SYSCALL_TRACED,
};
use gds_host::btf::{Btf, BtfError};
use tracing::{info, warn};

use super::{
    TraceError,
    device::{attach_btf, tracepoint_btf},
    file_hooks::{KIOCB_BLIND, KiocbHooks, KiocbKind, TARGETS},
    inflight::{self, SlotTable},
    layer::{Start, TracedLayer},
    program, take_map,
};

/// Which hooks the file layer uses (`--file-hooks`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FileHooks {
    /// fentry, else kprobes, else tracepoints (never syscalls: they slow every syscall).
    #[default]
    Auto,
    Fentry,
    Kprobe,
    Tracepoint,
    /// `raw_syscalls` sys_enter/sys_exit: every read/write system call, at a cost to every
    /// syscall of every process.
    Syscalls,
    Off,
}

impl FileHooks {
    pub const fn label(self) -> &'static str {
        match self {
            FileHooks::Auto => "auto",
            FileHooks::Fentry => "fentry",
            FileHooks::Kprobe => "kprobe",
            FileHooks::Tracepoint => "tracepoint",
            FileHooks::Syscalls => "syscalls",
            FileHooks::Off => "off",
        }
    }
}

const DIO_TPS: [&str; 2] = ["iomap_dio_rw_begin", "iomap_dio_complete"];
/// Where a thread's unfinished call is dropped (every tier).
const THREAD_EXIT_TP: &str = "sched_process_exit";
/// ext4's fsync, beside the iomap tracepoints (in vmlinux BTF where ext4 is built in; in the
/// ext4 module's on generic distribution kernels, not looked at yet).
const EXT4_FSYNC_TPS: [&str; 2] = ["ext4_sync_file_enter", "ext4_sync_file_exit"];

/// What the tracepoint tier cannot see (on `/debug/layers`).
const TRACEPOINT_BLIND: [&str; 4] = [
    "buffered reads and writes (their block requests name the submitting thread)",
    "fsync except ext4's (and ext4's where ext4 is a module)",
    "O_DIRECT on block devices and on file systems without iomap direct I/O",
    "zero-length calls; calls iomap ends before completing (early errors, -EAGAIN under \
     IOCB_NOWAIT, -ENOTBLK fallbacks) stay in flight until their kiocb is reused",
];
/// What the syscalls tier cannot see.
const SYSCALLS_BLIND: [&str; 3] = [
    "io_uring, aio and nvidia-fs reads and writes (no read/write system call)",
    "mmap page faults, sendfile, splice and copy_file_range",
    "bytes asked of vector calls (readv, preadv, …): only bytes returned",
];

/// The hooks chosen before loading, with the programs' configuration.
#[derive(Debug, Clone)]
pub struct FilePlan {
    pub hooks: FileHooks,
    pub config: FileConfig,
    /// Why these hooks, and what was passed over (said once at start and on `/debug/layers`).
    pub notes: Vec<String>,
}

impl FilePlan {
    /// Chooses the hooks for `asked` on this kernel (`btf`: its BTF) and resolves the offsets.
    pub fn choose(asked: FileHooks, btf: Option<&Btf>) -> FilePlan {
        let mut notes = Vec::new();
        let off = |notes: Vec<String>| FilePlan {
            hooks: FileHooks::Off,
            config: FileConfig::DEFAULT,
            notes,
        };
        if asked == FileHooks::Off {
            return off(vec!["file layer off (--file-hooks off)".into()]);
        }
        let Some(btf) = btf else {
            return off(vec![
                "file layer off: it needs kernel BTF for its offsets".into(),
            ]);
        };
        if matches!(
            asked,
            FileHooks::Auto | FileHooks::Fentry | FileHooks::Kprobe
        ) {
            // Decided when attaching (the tracepoint tier reads the same offsets).
            return match resolve(btf, FILE_TIER_KIOCB) {
                Ok(config) => FilePlan {
                    hooks: asked,
                    config,
                    notes,
                },
                Err(e) => off(vec![format!("file layer off: {e}")]),
            };
        }
        let want_syscalls = asked == FileHooks::Syscalls;
        let tier = if want_syscalls {
            FILE_TIER_SYSCALLS
        } else if DIO_TPS.iter().all(|tp| btf.has_tracepoint(tp)) {
            FILE_TIER_TRACEPOINT
        } else {
            notes.push(
                "file layer off: no iomap_dio_rw_begin/iomap_dio_complete tracepoints (kernels \
                 before 6.4); --file-hooks syscalls traces every read/write system call"
                    .into(),
            );
            return off(notes);
        };
        match resolve(btf, tier) {
            Ok(config) => FilePlan {
                hooks: if tier == FILE_TIER_SYSCALLS {
                    FileHooks::Syscalls
                } else {
                    FileHooks::Tracepoint
                },
                config,
                notes,
            },
            Err(e) => {
                notes.push(format!("file layer off: {e}"));
                off(notes)
            }
        }
    }
}

/// The kallsyms addresses of the `read_iter` functions among `hooked`: a file read by one of
/// them is one whose every call the kiocb tier sees.
fn read_iter_addresses(hooked: &[String]) -> Vec<u64> {
    let names = TARGETS.map(|(n, _, _)| n);
    let addrs = super::kallsyms::addresses(std::path::Path::new("/proc/kallsyms"), names);
    names
        .iter()
        .zip(addrs)
        .filter(|(n, _)| n.ends_with("_read_iter") && hooked.iter().any(|h| h == *n))
        .filter_map(|(_, a)| a)
        .collect()
}

/// The offsets the file programs read, from BTF.
fn resolve(btf: &Btf, tier: u32) -> Result<FileConfig, BtfError> {
    let mut c = FileConfig::DEFAULT;
    c.tier = tier;
    c.kiocb_filp = btf.member_offset("kiocb", &["ki_filp"])?;
    c.kiocb_pos = btf.member_offset("kiocb", &["ki_pos"])?;
    c.kiocb_flags = btf.member_offset("kiocb", &["ki_flags"])?;
    c.kiocb_complete = btf.member_offset("kiocb", &["ki_complete"])?;
    c.file_inode = btf.member_offset("file", &["f_inode"])?;
    c.file_flags = btf.member_offset("file", &["f_flags"])?;
    c.inode_ino = btf.member_offset("inode", &["i_ino"])?;
    c.inode_sb = btf.member_offset("inode", &["i_sb"])?;
    c.inode_mode = btf.member_offset("inode", &["i_mode"])?;
    c.inode_size = btf.member_offset("inode", &["i_size"])?;
    c.sb_dev = btf.member_offset("super_block", &["s_dev"])?;
    if tier == FILE_TIER_TRACEPOINT {
        // `data_source` since 6.0 (the direction was bits of `type` before); the tracepoints
        // it serves are 6.4+.
        c.iter_count = btf.member_offset("iov_iter", &["count"])?;
        c.iter_source = btf.member_offset("iov_iter", &["data_source"])?;
    } else if tier == FILE_TIER_KIOCB
        && let (Ok(count), Ok(source)) = (
            btf.member_offset("iov_iter", &["count"]),
            btf.member_offset("iov_iter", &["data_source"]),
        )
    {
        // The kiocb tier falls back to the tracepoints when neither fentry nor kprobes attach
        // (decided after loading): their program, verified at load with direct loads, needs
        // these too.
        (c.iter_count, c.iter_source) = (count, source);
    }
    // A descriptor's file (the syscalls tier's calls; the cuFile layer's registered files,
    // whatever the tier) and which function reads it (what the kiocb tier sees).
    c.task_files = btf.member_offset("task_struct", &["files"])?;
    c.task_comm = btf.member_offset("task_struct", &["comm"])?;
    // Without one of them the programs call `bpf_get_current_cgroup_id` instead.
    if let (Ok(cgroups), Ok(dfl), Ok(kn), Ok(id)) = (
        btf.member_offset("task_struct", &["cgroups"]),
        btf.member_offset("css_set", &["dfl_cgrp"]),
        btf.member_offset("cgroup", &["kn"]),
        btf.member_offset("kernfs_node", &["id"]),
    ) {
        (
            c.task_cgroups,
            c.css_set_dfl_cgrp,
            c.cgroup_kn,
            c.kernfs_node_id,
        ) = (cgroups, dfl, kn, id);
    }
    c.files_fdt = btf.member_offset("files_struct", &["fdt"])?;
    c.fdt_fd = btf.member_offset("fdtable", &["fd"])?;
    c.fdt_max_fds = btf.member_offset("fdtable", &["max_fds"])?;
    c.file_f_op = btf.member_offset("file", &["f_op"])?;
    c.fop_read_iter = btf.member_offset("file_operations", &["read_iter"])?;
    if tier == FILE_TIER_SYSCALLS {
        let [a0, a1, a2, a3] = syscall_arg_regs(btf)?;
        (c.regs_arg0, c.regs_arg1, c.regs_arg2, c.regs_arg3) = (a0, a1, a2, a3);
        for (nr, what) in syscall_table() {
            if let Some(slot) = c.syscall_ops.get_mut(nr) {
                *slot = what;
            }
        }
    }
    Ok(c)
}

/// `pt_regs` offsets of the first four syscall arguments.
#[cfg(target_arch = "x86_64")]
fn syscall_arg_regs(btf: &Btf) -> Result<[u32; 4], BtfError> {
    Ok([
        btf.member_offset("pt_regs", &["di"])?,
        btf.member_offset("pt_regs", &["si"])?,
        btf.member_offset("pt_regs", &["dx"])?,
        btf.member_offset("pt_regs", &["r10"])?,
    ])
}

#[cfg(not(target_arch = "x86_64"))]
fn syscall_arg_regs(btf: &Btf) -> Result<[u32; 4], BtfError> {
    // arm64: `struct pt_regs` starts with `regs[31]` (x0..x30) inside an anonymous union.
    let base = btf.member_offset("pt_regs", &["regs"])?;
    Ok([base, base + 8, base + 16, base + 24])
}

/// The read/write-family syscalls of this architecture: (number, what the program reads).
fn syscall_table() -> Vec<(usize, u8)> {
    let (r, w, s) = (
        SYSCALL_TRACED | FILE_OP_READ,
        SYSCALL_TRACED | FILE_OP_WRITE,
        SYSCALL_TRACED | FILE_OP_FSYNC,
    );
    let (count, pos) = (SYSCALL_COUNT_ARG2, SYSCALL_POS_ARG3);
    // (read, write, pread64, pwrite64, readv, writev, preadv, pwritev, preadv2, pwritev2,
    // fsync, fdatasync)
    #[cfg(target_arch = "x86_64")]
    let nrs = [0, 1, 17, 18, 19, 20, 295, 296, 327, 328, 74, 75];
    #[cfg(not(target_arch = "x86_64"))]
    let nrs = [63, 64, 67, 68, 65, 66, 69, 70, 286, 287, 82, 83];
    let what = [
        r | count,
        w | count,
        r | count | pos,
        w | count | pos,
        r,
        w,
        r | pos,
        w | pos,
        r | pos,
        w | pos,
        s,
        s,
    ];
    let table: Vec<(usize, u8)> = nrs.into_iter().zip(what).collect();
    debug_assert!(table.iter().all(|(nr, _)| *nr < SYSCALL_TABLE));
    table
}

/// The file layer, attached with the hooks its plan chose.
pub struct FileLayer {
    plan: FilePlan,
    on: bool,
    /// ext4's fsync tracepoints are attached too (tracepoint tier).
    ext4_fsync: bool,
    /// The hooks attached (the plan's `auto` resolved), and the kiocb tier's links.
    used: FileHooks,
    kiocb: std::sync::Mutex<Option<KiocbHooks>>,
    /// nvidia-fs's completion was found and written for the programs (`GDS_FILE_NVFS`).
    nvfs_known: std::sync::atomic::AtomicBool,
    slots: SlotTable<FileCall>,
    inflight: HashMap<MapData, u64, FileCall>,
    stats: PerCpuArray<MapData, FileRowStats>,
    procs: HashMap<MapData, FileProcKey, FileProcStats>,
}

impl FileLayer {
    /// The hooks in use.
    pub fn hooks(&self) -> FileHooks {
        if self.on { self.used } else { FileHooks::Off }
    }

    /// The statistics rows summed over CPUs, and the per-process counts.
    pub fn raw(&self) -> FileRaw {
        let mut rows = vec![FileRowStats::ZERO; FILE_ROWS];
        if self.on {
            for (i, row) in rows.iter_mut().enumerate() {
                let Ok(per_cpu) = self.stats.get(&(i as u32), 0) else {
                    continue;
                };
                for r in per_cpu.iter() {
                    for (s, b) in row.buckets.iter_mut().zip(r.buckets.iter()) {
                        *s += b;
                    }
                    row.calls += r.calls;
                    row.sum_ns += r.sum_ns;
                    row.bytes_asked += r.bytes_asked;
                    row.bytes_done += r.bytes_done;
                    row.errors += r.errors;
                    row.device_requests += r.device_requests;
                    row.device_bytes += r.device_bytes;
                }
            }
        }
        let procs = if self.on {
            self.procs.iter().filter_map(Result::ok).collect()
        } else {
            Vec::new()
        };
        FileRaw { rows, procs }
    }

    /// What the hooks attached see, for the cuFile layer (`GDS_FILE_SEES`, `GDS_FILE_HOOKED`):
    /// every call (syscalls tier), every call of the files the hooked `read_iter` functions
    /// read (kiocb tier; their addresses from kallsyms), or nothing it can rely on. Returns a
    /// note where the kiocb tier's functions have no address (kallsyms hidden).
    fn publish_sees(&self, ebpf: &mut Ebpf) -> Option<String> {
        let hooked: Vec<String> = self
            .kiocb
            .lock()
            .ok()
            .and_then(|k| k.as_ref().map(|k| k.hooked.clone()))
            .unwrap_or_default();
        let (sees, addrs) = match self.hooks() {
            FileHooks::Syscalls => (FILE_SEES_ALL, Vec::new()),
            FileHooks::Fentry | FileHooks::Kprobe => {
                let addrs = read_iter_addresses(&hooked);
                if addrs.is_empty() {
                    (FILE_SEES_NONE, addrs)
                } else {
                    (FILE_SEES_HOOKED, addrs)
                }
            }
            _ => (FILE_SEES_NONE, Vec::new()),
        };
        let written = (|| -> Result<(), aya::maps::MapError> {
            if let Some(m) = ebpf.map_mut(MAP_FILE_HOOKED) {
                let mut m = HashMap::<_, u64, u8>::try_from(m)?;
                for a in &addrs {
                    m.insert(a, 1, 0)?;
                }
            }
            if let Some(m) = ebpf.map_mut(MAP_FILE_SEES) {
                Array::<_, u32>::try_from(m)?.set(0, sees, 0)?;
            }
            Ok(())
        })();
        match written {
            Err(e) => Some(format!(
                "the cuFile layer takes no calls from this layer ({e}): libc probes beneath it"
            )),
            Ok(()) if sees == FILE_SEES_NONE && self.on && !hooked.is_empty() => Some(
                "no kallsyms addresses for the hooked read_iter functions (kptr_restrict?): \
                 the cuFile layer uses libc probes beneath it"
                    .into(),
            ),
            Ok(()) => None,
        }
    }

    /// Once nvidia-fs is loaded, gives the programs its completion function (`nvfs_io_complete`
    /// from kallsyms), which marks the reads its ioctl starts (origin `nvfs`; see
    /// `gds_common::file::kiocb_origin`). One `stat` per call until then.
    fn publish_nvfs(&self, ebpf: &mut Ebpf) {
        use std::sync::atomic::Ordering::Relaxed;
        if self.nvfs_known.load(Relaxed) || !std::path::Path::new("/sys/module/nvidia_fs").exists()
        {
            return;
        }
        let [addr] = super::kallsyms::addresses(
            std::path::Path::new("/proc/kallsyms"),
            ["nvfs_io_complete"],
        );
        let Some(addr) = addr else {
            warn!(
                "file layer: nvidia-fs is loaded but kallsyms has no nvfs_io_complete: its \
                 reads are not told apart (origin syscall)"
            );
            self.nvfs_known.store(true, Relaxed);
            return;
        };
        if let Some(m) = ebpf.map_mut(MAP_FILE_NVFS)
            && let Ok(mut a) = Array::<_, u64>::try_from(m)
            && a.set(0, addr, 0).is_ok()
        {
            info!("file layer: nvidia-fs loaded: its reads are origin nvfs");
            self.nvfs_known.store(true, Relaxed);
        }
    }

    fn blind_to(&self) -> Vec<String> {
        let list: &[&str] = match self.hooks() {
            FileHooks::Tracepoint => &TRACEPOINT_BLIND,
            FileHooks::Syscalls => &SYSCALLS_BLIND,
            FileHooks::Fentry | FileHooks::Kprobe => &KIOCB_BLIND,
            FileHooks::Off => &["every file call"],
            FileHooks::Auto => &[],
        };
        let mut out: Vec<String> = list.iter().map(|s| (*s).to_owned()).collect();
        if let Ok(k) = self.kiocb.lock()
            && let Some(k) = k.as_ref().filter(|_| self.on)
        {
            out.extend(k.missing.iter().cloned());
        }
        out
    }
}

impl TracedLayer for FileLayer {
    fn attach(ebpf: &mut Ebpf, start: &Start) -> Result<FileLayer, TraceError> {
        let mut layer = FileLayer {
            plan: start.file.clone(),
            on: false,
            ext4_fsync: false,
            slots: inflight::take_slots(ebpf, MAP_FILE_SLOTS, FILE_SLOTS)?,
            inflight: take_map(ebpf, MAP_FILE_INFLIGHT)?,
            stats: take_map(ebpf, MAP_FILE_STATS)?,
            procs: take_map(ebpf, MAP_FILE_PROCS)?,
            used: start.file.hooks,
            kiocb: std::sync::Mutex::new(None),
            nvfs_known: Default::default(),
        };
        if matches!(
            layer.plan.hooks,
            FileHooks::Auto | FileHooks::Fentry | FileHooks::Kprobe
        ) && let Some(btf) = start.btf
        {
            let asked = layer.plan.hooks;
            let mut why = Vec::new();
            if let Some(k) = super::file_hooks::attach_best(ebpf, start, btf, asked, &mut why) {
                layer.used = match k.kind {
                    KiocbKind::Fentry => FileHooks::Fentry,
                    KiocbKind::Kprobe => FileHooks::Kprobe,
                };
                layer.kiocb = std::sync::Mutex::new(Some(k));
                layer.on = true;
            } else if DIO_TPS.iter().all(|tp| btf.has_tracepoint(tp)) {
                layer.used = FileHooks::Tracepoint;
                why.push("using the iomap tracepoints".into());
            } else {
                layer.used = FileHooks::Off;
                why.push(
                    "no iomap_dio_rw_begin/iomap_dio_complete tracepoints (kernels before 6.4) \
                     either: file layer off (--file-hooks syscalls traces every read/write \
                     system call)"
                        .into(),
                );
            }
            layer.plan.notes.extend(why);
        }
        match layer.used {
            FileHooks::Tracepoint => {
                let Some(btf) = start.btf else {
                    return Ok(layer);
                };
                let aya_btf = tracepoint_btf(btf, &DIO_TPS)?;
                attach_btf(ebpf, &aya_btf, "file_dio_begin", DIO_TPS[0])?;
                attach_btf(ebpf, &aya_btf, "file_dio_complete", DIO_TPS[1])?;
                if EXT4_FSYNC_TPS.iter().all(|tp| btf.has_tracepoint(tp)) {
                    let fsync_btf = tracepoint_btf(btf, &EXT4_FSYNC_TPS)?;
                    attach_btf(ebpf, &fsync_btf, "file_ext4_fsync_enter", EXT4_FSYNC_TPS[0])?;
                    attach_btf(ebpf, &fsync_btf, "file_ext4_fsync_exit", EXT4_FSYNC_TPS[1])?;
                    layer.ext4_fsync = true;
                } else {
                    layer
                        .plan
                        .notes
                        .push("ext4 fsync not traced: no ext4_sync_file_* in vmlinux BTF".into());
                }
                layer.on = true;
            }
            FileHooks::Syscalls => {
                for (prog, tp) in [
                    ("file_sys_exit", "sys_exit"),
                    ("file_sys_enter", "sys_enter"),
                ] {
                    let p: &mut RawTracePoint = program(ebpf, prog)?;
                    p.load()
                        .and_then(|()| p.attach(tp).map(drop))
                        .map_err(|source| TraceError::Program { name: prog, source })?;
                }
                layer.on = true;
                warn!(
                    "file layer: --file-hooks syscalls puts a probe on every system call of \
                     every process (each takes the kernel's slow path, +40-70 ns here)"
                );
            }
            _ => {}
        }
        debug_assert!(layer.on || layer.used == FileHooks::Off || start.btf.is_none());
        if layer.on
            && let Some(btf) = start.btf
        {
            // Calls of exiting threads whose return no program saw (see `file_thread_exit`).
            let r = tracepoint_btf(btf, &[THREAD_EXIT_TP])
                .and_then(|b| attach_btf(ebpf, &b, "file_thread_exit", THREAD_EXIT_TP));
            if let Err(e) = r {
                layer.plan.notes.push(format!(
                    "calls of threads that exit inside them stay in flight ({e})"
                ));
            }
        }
        let note = layer.publish_sees(ebpf);
        layer.plan.notes.extend(note);
        layer.publish_nvfs(ebpf);
        for note in &layer.plan.notes {
            info!("file layer: {note}");
        }
        info!(
            "file layer: hooks {}; cannot see: {}",
            layer.hooks().label(),
            layer.blind_to().join("; ")
        );
        Ok(layer)
    }

    fn layer(&self) -> Layer {
        Layer::File
    }

    fn entry(&self) -> LayerEntry {
        let how = match self.hooks() {
            FileHooks::Tracepoint => format!(
                "BTF tracepoints iomap_dio_rw_begin/iomap_dio_complete: O_DIRECT calls of \
                 ext4, xfs and btrfs, exactly{}",
                if self.ext4_fsync {
                    "; ext4_sync_file_enter/exit: fsync of ext4 files"
                } else {
                    ""
                }
            ),
            FileHooks::Syscalls => "raw tracepoints sys_enter/sys_exit: every read/write \
                                    system call on a file (slows every syscall)"
                .to_owned(),
            FileHooks::Fentry | FileHooks::Kprobe => format!(
                "{} on {}: every call, buffered and O_DIRECT, from every path",
                if self.used == FileHooks::Fentry {
                    "fentry/fexit"
                } else {
                    "kprobe/kretprobe"
                },
                self.kiocb
                    .lock()
                    .ok()
                    .and_then(|k| k.as_ref().map(|k| k.hooked.join(", ")))
                    .unwrap_or_default()
            ),
            _ => "off".to_owned(),
        };
        let mut why = vec![how];
        why.extend(self.plan.notes.iter().cloned());
        LayerEntry {
            layer: Layer::File,
            on: self.on,
            why: why.join("; "),
            detail: Some(LayerDetail::File {
                hooks: self.hooks().label().to_owned(),
                blind_to: self.blind_to(),
            }),
        }
    }

    /// fentry/kprobe tiers: hooks the functions of a file-system module loaded since start.
    fn refresh(&self, ebpf: &std::sync::Mutex<Ebpf>) -> Vec<String> {
        let changes = match self.kiocb.lock() {
            Ok(mut k) => k.as_mut().map(|k| k.refresh(ebpf)).unwrap_or_default(),
            Err(_) => Vec::new(),
        };
        if let Ok(mut e) = ebpf.lock() {
            if !changes.is_empty()
                && let Some(note) = self.publish_sees(&mut e)
            {
                warn!("file layer: {note}");
            }
            self.publish_nvfs(&mut e);
        }
        changes
    }

    fn inflight(&self, out: &mut Vec<Inflight>) {
        if !self.on {
            return;
        }
        out.extend(
            inflight::collect(&self.slots, &self.inflight)
                .into_iter()
                .map(|s| Inflight::File(s.key, s.value)),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On this kernel (6.18 here, like CI): `auto` chooses the tracepoints and resolves every
    /// offset; `syscalls` resolves the task and register offsets too; `off` is off.
    #[test]
    fn tiers_on_this_kernel() {
        let btf = Btf::from_sys().unwrap();
        let auto = FilePlan::choose(FileHooks::Auto, Some(&btf));
        // fentry, kprobes or tracepoints: known only by attaching (`file_layer` tests).
        assert_eq!(auto.hooks, FileHooks::Auto, "{:?}", auto.notes);
        assert_eq!(auto.config.tier, FILE_TIER_KIOCB);
        assert_eq!(
            auto.config.kiocb_flags,
            btf.member_offset("kiocb", &["ki_flags"]).unwrap()
        );
        assert_eq!(
            auto.config.kiocb_complete,
            btf.member_offset("kiocb", &["ki_complete"]).unwrap()
        );
        // What the tracepoints read if `auto` falls back to them (as here).
        assert_eq!(
            auto.config.iter_count,
            btf.member_offset("iov_iter", &["count"]).unwrap()
        );
        let tp = FilePlan::choose(FileHooks::Tracepoint, Some(&btf));
        if DIO_TPS.iter().all(|tp| btf.has_tracepoint(tp)) {
            assert_eq!(tp.config.tier, FILE_TIER_TRACEPOINT);
        }
        let sys = FilePlan::choose(FileHooks::Syscalls, Some(&btf));
        assert_eq!(sys.hooks, FileHooks::Syscalls, "{:?}", sys.notes);
        assert_ne!(sys.config.task_files, 0);
        assert_ne!(sys.config.syscall_ops[17] & SYSCALL_TRACED, 0);
        assert_eq!(sys.config.syscall_ops[39], 0, "getpid is not traced");
        let off = FilePlan::choose(FileHooks::Off, Some(&btf));
        assert_eq!(off.hooks, FileHooks::Off);
        assert_eq!(
            FilePlan::choose(FileHooks::Auto, None).hooks,
            FileHooks::Off
        );
    }
}
