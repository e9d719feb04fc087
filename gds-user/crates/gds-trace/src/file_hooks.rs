//! The file layer's kiocb tier: fentry/fexit, else kprobe/kretprobe, on the file systems'
//! `read_iter`/`write_iter` (programs in gds-ebpf's `file_kiocb`).
//!
//! fentry programs name their target at load time, by BTF id. ext4 is a module on the generic
//! distribution kernels and xfs and btrfs are modules everywhere: their functions are in the
//! module's split BTF, and the load must pass that BTF's descriptor (`attach_btf_obj_fd`),
//! which aya 0.14 cannot (aya-rs/aya#301). So, as [`super::umulti`] does for multi-uprobes, the
//! object is parsed again with aya-obj, its map references relocated to the maps aya created,
//! and each program loaded with the `bpf` system call, once per target function; the link is
//! `BPF_RAW_TRACEPOINT_OPEN` (fentry's attach since 5.5). kprobes name functions by symbol and
//! take module functions as they are: aya attaches them.
//!
//! Whether fentry works is answered by trying (the libbpf-tools pattern): this project's dev VM
//! refuses every fentry load (EPERM) and has no kprobes; 6.1 refuses fentry on functions of 7
//! arguments (not these). A module that is not loaded at start is named on `/debug/layers`
//! and hooked when it loads ([`KiocbHooks::refresh`], on the cuFile thread's tick: the one
//! thread that keeps the capabilities loading programs needs). While fentry programs are
//! attached to a module's functions the kernel holds the module: it cannot be unloaded
//! (kprobes do not hold it).

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd, OwnedFd, RawFd},
};

use aya::{Ebpf, programs::KProbe};
use gds_host::btf::Btf;

use super::{
    device::{attach_btf, tracepoint_btf},
    layer::Start,
    program,
    umulti::{ProgLoadAttr, owned, sys_bpf},
};

/// The functions hooked: (name, the module it is in when not built in, its argument count).
pub(crate) const TARGETS: [(&str, &str, u8); 8] = [
    ("ext4_file_read_iter", "ext4", 2),
    ("ext4_file_write_iter", "ext4", 2),
    ("xfs_file_read_iter", "xfs", 2),
    ("xfs_file_write_iter", "xfs", 2),
    ("btrfs_file_read_iter", "btrfs", 2),
    ("btrfs_do_write_iter", "btrfs", 3),
    ("blkdev_read_iter", "", 2),
    ("blkdev_write_iter", "", 2),
];

/// Where asynchronous reads and writes (aio) complete; io_uring's completions come from the
/// `io_uring_complete` tracepoint.
const AIO_DONE: &str = "aio_complete_rw";

/// What the kiocb tier cannot see (on `/debug/layers`; modules not loaded are added).
pub(crate) const KIOCB_BLIND: [&str; 4] = [
    "fsync",
    "file systems other than ext4, xfs, btrfs and block devices (tmpfs, NFS, FUSE, overlay's \
     own calls)",
    "mmap page faults, splice and sendfile (no read_iter call)",
    "io_uring and aio calls whose completion is not seen stay in flight",
];

/// Which kind of hook the tier uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KiocbKind {
    Fentry,
    Kprobe,
}

/// The tier, attached: the links it holds (fentry: descriptors; kprobe: aya keeps them in the
/// object), the functions hooked and those that could not be.
pub(crate) struct KiocbHooks {
    pub kind: KiocbKind,
    pub hooked: Vec<String>,
    /// "function: why" for each target not hooked.
    pub missing: Vec<String>,
    links: Vec<OwnedFd>,
    /// fentry: the relocated programs, and the map descriptors their instructions name, kept
    /// to hook a file-system module loaded later.
    later: Option<(Relocated, Vec<(String, OwnedFd)>)>,
}

impl KiocbHooks {
    /// The modules named "not loaded" in `missing` that are loaded now.
    fn appeared(&self) -> Vec<&'static str> {
        let mut out: Vec<&'static str> = TARGETS
            .iter()
            .map(|(_, m, _)| *m)
            .filter(|m| {
                !m.is_empty()
                    && self
                        .missing
                        .iter()
                        .any(|x| x.contains(&format!("module {m} not loaded")))
                    && std::path::Path::new("/sys/module")
                        .join(m)
                        .join("initstate")
                        .exists()
            })
            .collect();
        out.dedup();
        out
    }

    /// Hooks the targets of file-system modules loaded since start (checked on the device
    /// refresh tick: one `stat` per module missing). Returns the changes to log.
    pub(crate) fn refresh(&mut self, ebpf: &std::sync::Mutex<Ebpf>) -> Vec<String> {
        let modules = self.appeared();
        if modules.is_empty() {
            return Vec::new();
        }
        let mut changes = Vec::new();
        for module in modules {
            let names: Vec<&'static str> = TARGETS
                .iter()
                .filter(|(_, m, _)| *m == module)
                .map(|(n, _, _)| *n)
                .collect();
            self.missing
                .retain(|x| !names.iter().any(|n| x.starts_with(&format!("{n}: "))));
            let mut missing = Vec::new();
            match self.kind {
                KiocbKind::Fentry => {
                    let Some((progs, _)) = &self.later else {
                        continue;
                    };
                    let targets = Btf::from_sys_module(module)
                        .map_err(|e| e.to_string())
                        .and_then(|b| {
                            module_btf_fd(module)
                                .map_err(|e| e.to_string())
                                .map(|fd| (b, fd))
                        });
                    match targets {
                        Ok((btf, fd)) => {
                            for (name, m, nargs) in TARGETS.iter().filter(|t| t.1 == module) {
                                let r = btf
                                    .func_id(name)
                                    .ok_or_else(|| {
                                        HookError::Program(format!("not in module {m}'s BTF"))
                                    })
                                    .and_then(|id| fentry_target(progs, id, *nargs, Some(&fd)));
                                match r {
                                    Ok(l) => {
                                        self.links.extend(l);
                                        self.hooked.push((*name).to_owned());
                                    }
                                    Err(e) => missing.push(format!("{name}: {e}")),
                                }
                            }
                        }
                        Err(e) => missing.extend(names.iter().map(|n| format!("{n}: {e}"))),
                    }
                }
                KiocbKind::Kprobe => {
                    let Ok(mut ebpf) = ebpf.lock() else {
                        continue;
                    };
                    for name in &names {
                        match kprobe_target(&mut ebpf, name) {
                            Ok(()) => self.hooked.push((*name).to_owned()),
                            Err(e) => missing.push(format!("{name}: {e}")),
                        }
                    }
                }
            }
            changes.push(if missing.is_empty() {
                format!(
                    "file layer: module {module} loaded: hooked {}",
                    names.join(", ")
                )
            } else {
                format!(
                    "file layer: module {module} loaded: not hooked: {}",
                    summarize(&missing)
                )
            });
            self.missing.extend(missing);
        }
        changes
    }
}

/// fentry and fexit of one target (the exit first: a call whose start is seen must have its
/// end seen too).
fn fentry_target(
    progs: &Relocated,
    id: u32,
    nargs: u8,
    obj: Option<&OwnedFd>,
) -> Result<[OwnedFd; 2], HookError> {
    let exit = if nargs == 3 {
        "file_kiocb_exit3"
    } else {
        "file_kiocb_exit2"
    };
    let x = progs.attach(exit, BPF_TRACE_FEXIT, id, obj)?;
    let e = progs.attach("file_kiocb_entry", BPF_TRACE_FENTRY, id, obj)?;
    Ok([x, e])
}

/// kretprobe and kprobe of one target (return probe first, as for fentry); the entry's
/// failure takes the return probe back off.
fn kprobe_target(ebpf: &mut Ebpf, name: &str) -> Result<(), aya::programs::ProgramError> {
    let ret = program::<KProbe>(ebpf, "file_kiocb_kretprobe")
        .map_err(|_| aya::programs::ProgramError::NotLoaded)?
        .attach(name, 0)?;
    let entry = program::<KProbe>(ebpf, "file_kiocb_kprobe")
        .map_err(|_| aya::programs::ProgramError::NotLoaded)?
        .attach(name, 0);
    if let Err(e) = entry {
        let _ = program::<KProbe>(ebpf, "file_kiocb_kretprobe").map(|p| p.detach(ret));
        return Err(e);
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum HookError {
    #[error("parsing the eBPF object again: {0}")]
    Parse(String),
    #[error("relocating the file programs to the loaded maps: {0}")]
    Relocate(String),
    #[error("program {0} is not in the eBPF object")]
    Missing(&'static str),
    #[error("none of the functions could be hooked ({0})")]
    Nothing(String),
    #[error("{0}")]
    Program(String),
}

impl From<super::umulti::Unready> for HookError {
    fn from(e: super::umulti::Unready) -> Self {
        use super::umulti::Unready;
        match e {
            Unready::Parse(e) => HookError::Parse(e),
            Unready::Relocate(e) => HookError::Relocate(e),
            Unready::Missing(n) => HookError::Missing(n),
        }
    }
}

/// A target function resolved in BTF: its type id and the module BTF's descriptor (None:
/// vmlinux).
struct Resolved {
    name: &'static str,
    nargs: u8,
    id: u32,
    obj: Option<OwnedFd>,
}

/// Finds each target in vmlinux's BTF, else in its module's (loaded modules only).
fn resolve(btf: &Btf, missing: &mut Vec<String>) -> Vec<Resolved> {
    let mut out = Vec::new();
    let mut modules: Vec<(&str, Option<(Btf, OwnedFd)>)> = Vec::new();
    for (name, module, nargs) in TARGETS {
        if let Some(id) = btf.func_id(name) {
            out.push(Resolved {
                name,
                nargs,
                id,
                obj: None,
            });
            continue;
        }
        if module.is_empty() {
            missing.push(format!("{name}: not in the kernel's BTF"));
            continue;
        }
        if !modules.iter().any(|(m, _)| *m == module) {
            let loaded = Btf::from_sys_module(module)
                .ok()
                .and_then(|b| module_btf_fd(module).ok().map(|fd| (b, fd)));
            modules.push((module, loaded));
        }
        let Some((_, Some((mbtf, fd)))) = modules.iter().find(|(m, _)| *m == module) else {
            missing.push(format!(
                "{name}: module {module} not loaded (hooked when it loads)"
            ));
            continue;
        };
        match (mbtf.func_id(name), fd.try_clone()) {
            (Some(id), Ok(obj)) => out.push(Resolved {
                name,
                nargs,
                id,
                obj: Some(obj),
            }),
            (None, _) => missing.push(format!("{name}: not in module {module}'s BTF")),
            (_, Err(e)) => missing.push(format!("{name}: {e}")),
        }
    }
    out
}

/// fentry/fexit on every target found; Err when not one could be hooked (fentry refused, as on
/// this project's dev VM), so the caller moves on to kprobes.
pub(crate) fn attach_fentry(
    ebpf: &mut Ebpf,
    start: &Start,
    btf: &Btf,
) -> Result<KiocbHooks, HookError> {
    let mut missing = Vec::new();
    let targets = resolve(btf, &mut missing);
    if targets.is_empty() {
        return Err(HookError::Nothing(summarize(&missing)));
    }
    // Own copies of the map descriptors: the relocated instructions name them, and they must
    // stay open for modules loaded later (the start's copies are closed after attaching).
    let map_fds: Vec<(String, OwnedFd)> = start
        .map_fds
        .iter()
        .filter_map(|(n, fd)| fd.try_clone().ok().map(|fd| (n.clone(), fd)))
        .collect();
    let progs = Relocated::load(
        super::EBPF_OBJECT,
        &map_fds,
        &[
            "file_kiocb_entry",
            "file_kiocb_exit2",
            "file_kiocb_exit3",
            "file_aio_done",
        ],
    )?;
    let mut links = Vec::new();
    let mut hooked = Vec::new();
    for t in &targets {
        match fentry_target(&progs, t.id, t.nargs, t.obj.as_ref()) {
            Ok(l) => {
                links.extend(l);
                hooked.push(t.name.to_owned());
            }
            Err(e) => missing.push(format!("{}: {e}", t.name)),
        }
    }
    if hooked.is_empty() {
        return Err(HookError::Nothing(summarize(&missing)));
    }
    match btf
        .func_id(AIO_DONE)
        .ok_or_else(|| HookError::Program("not in BTF".into()))
        .and_then(|id| progs.attach("file_aio_done", BPF_TRACE_FENTRY, id, None))
    {
        Ok(l) => links.push(l),
        Err(e) => missing.push(format!("{AIO_DONE} (aio completions): {e}")),
    }
    uring_done(ebpf, start, btf, &mut missing);
    Ok(KiocbHooks {
        kind: KiocbKind::Fentry,
        hooked,
        missing,
        links,
        later: Some((progs, map_fds)),
    })
}

/// kprobe/kretprobe on every target whose symbol the kernel has; Err when none.
pub(crate) fn attach_kprobe(
    ebpf: &mut Ebpf,
    start: &Start,
    btf: &Btf,
) -> Result<KiocbHooks, HookError> {
    let mut missing = Vec::new();
    let mut hooked = Vec::new();
    for prog in ["file_kiocb_kretprobe", "file_kiocb_kprobe"] {
        let p: &mut KProbe = program(ebpf, prog).map_err(|e| HookError::Program(e.to_string()))?;
        p.load()
            .map_err(|e| HookError::Program(format!("{prog}: {e}")))?;
    }
    for (name, module, _) in TARGETS {
        match kprobe_target(ebpf, name) {
            Ok(()) => hooked.push(name.to_owned()),
            Err(e) => missing.push(kprobe_missing(btf, name, module, &e)),
        }
    }
    if hooked.is_empty() {
        return Err(HookError::Nothing(summarize(&missing)));
    }
    let aio = program::<KProbe>(ebpf, "file_aio_done_kprobe")
        .map_err(|e| e.to_string())
        .and_then(|p| {
            p.load()
                .map_err(|e| e.to_string())
                .and_then(|()| p.attach(AIO_DONE, 0).map(drop).map_err(|e| e.to_string()))
        });
    if let Err(e) = aio {
        missing.push(format!("{AIO_DONE} (aio completions): {e}"));
    }
    uring_done(ebpf, start, btf, &mut missing);
    Ok(KiocbHooks {
        kind: KiocbKind::Kprobe,
        hooked,
        missing,
        links: Vec::new(),
        later: None,
    })
}

fn kprobe_missing(btf: &Btf, name: &str, module: &str, e: &aya::programs::ProgramError) -> String {
    let kprobe_pmu = "/sys/bus/event_source/devices/kprobe";
    if !std::path::Path::new(kprobe_pmu).exists() {
        format!("{name}: no kprobes in this kernel (no {kprobe_pmu})")
    } else if !module.is_empty()
        && btf.func_id(name).is_none()
        && !std::path::Path::new("/sys/kernel/btf")
            .join(module)
            .exists()
    {
        format!("{name}: module {module} not loaded (hooked when it loads)")
    } else {
        format!("{name}: {e}")
    }
}

/// "function: why" lines grouped by why: "why (f1, f2); why2 (f3)", so a refusal of every
/// function reads once.
pub(crate) fn summarize(missing: &[String]) -> String {
    let mut groups: Vec<(&str, Vec<&str>)> = Vec::new();
    for m in missing {
        let (name, why) = m.split_once(": ").unwrap_or(("", m.as_str()));
        match groups.iter_mut().find(|(w, _)| *w == why) {
            Some((_, names)) => names.push(name),
            None => groups.push((why, vec![name])),
        }
    }
    groups
        .iter()
        .map(|(why, names)| format!("{why} ({})", names.join(", ")))
        .collect::<Vec<_>>()
        .join("; ")
}

/// io_uring READ/WRITE calls end at their CQE: the `io_uring_complete` form the io_uring layer
/// chose.
fn uring_done(ebpf: &mut Ebpf, start: &Start, btf: &Btf, missing: &mut Vec<String>) {
    let prog = if start.attach.complete_prog == "uring_complete_flat" {
        "file_uring_done_flat"
    } else {
        "file_uring_done"
    };
    let r = tracepoint_btf(btf, &["io_uring_complete"])
        .and_then(|b| attach_btf(ebpf, &b, prog, "io_uring_complete"));
    if let Err(e) = r {
        missing.push(format!(
            "io_uring_complete (io_uring calls stay in flight): {e}"
        ));
    }
}

const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_RAW_TRACEPOINT_OPEN: libc::c_long = 17;
const BPF_BTF_GET_FD_BY_ID: libc::c_long = 19;
const BPF_BTF_GET_NEXT_ID: libc::c_long = 23;
const BPF_PROG_TYPE_TRACING: u32 = 26;
const BPF_TRACE_FENTRY: u32 = 24;
const BPF_TRACE_FEXIT: u32 = 25;

/// The object's programs with their map references pointing at aya's maps, ready to load.
struct Relocated {
    progs: Vec<(&'static str, Vec<aya_obj::generated::bpf_insn>)>,
}

impl Relocated {
    fn load(
        object: &[u8],
        maps: &[(String, OwnedFd)],
        names: &[&'static str],
    ) -> Result<Relocated, HookError> {
        let progs = super::umulti::relocated(object, maps, names)?;
        Ok(Relocated { progs })
    }

    /// Loads `name` for `attach_type` on BTF id `id` (of `obj`'s BTF, else vmlinux's) and
    /// attaches it; the link's descriptor holds it.
    fn attach(
        &self,
        name: &'static str,
        attach_type: u32,
        id: u32,
        obj: Option<&OwnedFd>,
    ) -> Result<OwnedFd, HookError> {
        let insns = self
            .progs
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, i)| i)
            .ok_or(HookError::Missing(name))?;
        let prog = prog_load(insns, name, attach_type, id, obj.map(|f| f.as_raw_fd()))?;
        raw_tp_open(&prog).map_err(|e| HookError::Program(format!("attaching {name}: {e}")))
    }
}

/// Loads `name` as an fentry/fexit program (`attach_type`) on BTF id `id`, of module BTF
/// object `obj` where given.
fn prog_load(
    insns: &[aya_obj::generated::bpf_insn],
    name: &'static str,
    attach_type: u32,
    id: u32,
    obj: Option<RawFd>,
) -> Result<OwnedFd, HookError> {
    let attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_TRACING,
        expected_attach_type: attach_type,
        attach_btf_id: id,
        attach_btf_obj_fd: obj.unwrap_or(0) as u32,
        ..Default::default()
    };
    super::umulti::prog_load(insns, name, attr, 400).map_err(|r| {
        HookError::Program(if r.log.is_empty() {
            format!("load refused: {}", r.source)
        } else {
            format!(
                "load of {name} refused: {} (verifier: …{})",
                r.source, r.log
            )
        })
    })
}

/// `BPF_RAW_TRACEPOINT_OPEN` with no name: attaches a loaded fentry/fexit program.
fn raw_tp_open(prog: &OwnedFd) -> io::Result<OwnedFd> {
    #[repr(C)]
    struct Attr {
        name: u64,
        prog_fd: u32,
        _pad: u32,
    }
    let mut attr = Attr {
        name: 0,
        prog_fd: prog.as_raw_fd() as u32,
        _pad: 0,
    };
    sys_bpf(BPF_RAW_TRACEPOINT_OPEN, &mut attr).map(owned)
}

/// The descriptor of loaded module `module`'s BTF object: the kernel's BTF objects are walked
/// by id (`BPF_BTF_GET_NEXT_ID`) and each named through `BPF_OBJ_GET_INFO_BY_FD`.
fn module_btf_fd(module: &str) -> io::Result<OwnedFd> {
    #[repr(C)]
    #[derive(Default)]
    struct IdAttr {
        id: u32,
        next_id: u32,
        open_flags: u32,
    }
    #[repr(C)]
    #[derive(Default)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct BtfInfo {
        btf: u64,
        btf_size: u32,
        id: u32,
        name: u64,
        name_len: u32,
        kernel_btf: u32,
    }
    let want = CString::new(module).map_err(io::Error::other)?;
    let mut id = 0u32;
    // Bounded: a kernel has one BTF object per module and per loaded program's BTF.
    for _ in 0..100_000 {
        let mut a = IdAttr {
            id,
            ..Default::default()
        };
        sys_bpf(BPF_BTF_GET_NEXT_ID, &mut a)?;
        id = a.next_id;
        let mut a = IdAttr {
            id,
            ..Default::default()
        };
        let Ok(fd) = sys_bpf(BPF_BTF_GET_FD_BY_ID, &mut a).map(owned) else {
            continue; // gone meanwhile
        };
        let mut name = [0u8; 64];
        let mut info = BtfInfo {
            name: name.as_mut_ptr() as u64,
            name_len: name.len() as u32,
            ..Default::default()
        };
        let mut ia = InfoAttr {
            bpf_fd: fd.as_raw_fd() as u32,
            info_len: std::mem::size_of::<BtfInfo>() as u32,
            info: &raw mut info as u64,
        };
        if sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut ia).is_err() || info.kernel_btf == 0 {
            continue;
        }
        let got = name.split(|b| *b == 0).next().unwrap_or_default();
        if got == want.as_bytes() {
            return Ok(fd);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!("no BTF object for module {module}"),
    ))
}

/// The kiocb tier `asked` allows (`auto`: fentry, else kprobes), attached; None with the
/// reasons in `notes` when neither could be.
pub(crate) fn attach_best(
    ebpf: &mut Ebpf,
    start: &Start,
    btf: &Btf,
    asked: super::FileHooks,
    notes: &mut Vec<String>,
) -> Option<KiocbHooks> {
    use super::FileHooks;
    if matches!(asked, FileHooks::Auto | FileHooks::Fentry) {
        match attach_fentry(ebpf, start, btf) {
            Ok(h) => return Some(h),
            Err(e) => notes.push(format!("fentry: {e}")),
        }
    }
    if matches!(asked, FileHooks::Auto | FileHooks::Kprobe) {
        match attach_kprobe(ebpf, start, btf) {
            Ok(h) => return Some(h),
            Err(e) => notes.push(format!("kprobe: {e}")),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On this kernel the built-in targets resolve from vmlinux's BTF (block devices always;
    /// ext4/xfs where built in), every module one from its module's.
    #[test]
    fn targets_resolve_here() {
        let btf = Btf::from_sys().unwrap();
        let mut missing = Vec::new();
        let got = resolve(&btf, &mut missing);
        assert!(
            got.iter()
                .any(|t| t.name == "blkdev_read_iter" && t.obj.is_none()),
            "{missing:?}"
        );
        assert_eq!(got.len() + missing.len(), TARGETS.len(), "{missing:?}");
    }

    #[test]
    fn reasons_read_once() {
        let m = [
            "a: load refused: EPERM".to_owned(),
            "b: module xfs not loaded".to_owned(),
            "c: load refused: EPERM".to_owned(),
        ];
        assert_eq!(
            summarize(&m),
            "load refused: EPERM (a, c); module xfs not loaded (b)"
        );
    }
}
