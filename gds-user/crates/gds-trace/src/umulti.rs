//! Multi-uprobe links (`BPF_LINK_TYPE_UPROBE_MULTI`, Linux 6.6+): every probe of one file in
//! one link.
//!
//! Why: a perf-event uprobe (one per probe, what aya 0.14 attaches) costs a file descriptor,
//! needs CAP_SYS_ADMIN on 6.18, and closing it waits for an RCU grace period under the
//! kernel's global `event_mutex`: 28 probes of one libcufile took 3.2 s to close, 1,400 (50
//! copies) minutes, during which the agent could not exit. A multi link holds all of a file's
//! probes: one descriptor, CAP_BPF + CAP_PERFMON, and closing it unregisters every probe at once
//! (the breakpoints were gone 0.2–10 ms after `close` began) then waits one grace period,
//! without the global mutex, so closes on several threads overlap (50 links × 28 probes: 3.1 s
//! one after another, 0.07–0.17 s from 50 threads). Measured on this project's dev VM.
//!
//! aya 0.14 can neither load a program for this attach type nor create the link, so this
//! module does both with the `bpf` system call: aya has created every map (globals included,
//! as overridden); the object is parsed again with aya-obj, the map references relocated to
//! aya's descriptors (the programs share aya's maps), and the program loaded with
//! `expected_attach_type = BPF_TRACE_UPROBE_MULTI`. Where that fails (older kernels), the
//! caller keeps aya's perf-event uprobes.

use std::{
    collections::{BTreeMap, HashSet},
    ffi::CString,
    io,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd},
    path::Path,
};

use aya::{Ebpf, maps::Map};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_KPROBE: u32 = 2;
/// `enum bpf_attach_type`: BPF_TRACE_UPROBE_MULTI (not in this libc's headers).
const BPF_TRACE_UPROBE_MULTI: u32 = 48;
const BPF_F_UPROBE_MULTI_RETURN: u32 = 1;
/// Verifier log kept when a load fails.
const LOG_BYTES: usize = 256 << 10;

#[derive(Debug, thiserror::Error)]
pub enum MultiError {
    #[error("parsing the eBPF object again: {0}")]
    Parse(String),
    #[error("relocating the cuFile programs to the loaded maps: {0}")]
    Relocate(String),
    #[error("program {0} is not in the eBPF object")]
    Missing(&'static str),
    #[error("loading {name} for multi-uprobe links: {source}{log}")]
    Load {
        name: &'static str,
        source: io::Error,
        log: String,
    },
}

/// Why an object's programs could not be made ready to load against aya's maps.
#[derive(Debug)]
pub(crate) enum Unready {
    Parse(String),
    Relocate(String),
    Missing(&'static str),
}

impl From<Unready> for MultiError {
    fn from(e: Unready) -> Self {
        match e {
            Unready::Parse(e) => MultiError::Parse(e),
            Unready::Relocate(e) => MultiError::Relocate(e),
            Unready::Missing(n) => MultiError::Missing(n),
        }
    }
}

/// The instructions of `names` in `object` (parsed again), their map references pointing at
/// the descriptors in `maps` and their calls resolved: what loading a program ourselves, beside
/// aya, takes (multi-uprobe links here, fentry against module BTF in `file_hooks`).
pub(crate) fn relocated(
    object: &[u8],
    maps: &[(String, OwnedFd)],
    names: &[&'static str],
) -> Result<Vec<(&'static str, Vec<aya_obj::generated::bpf_insn>)>, Unready> {
    let mut obj = aya_obj::Object::parse(object).map_err(|e| Unready::Parse(e.to_string()))?;
    let defs = obj.maps.clone();
    let text: HashSet<usize> = obj.functions.keys().map(|(s, _)| *s).collect();
    obj.relocate_maps(
        maps.iter()
            .filter_map(|(n, fd)| defs.get(n).map(|d| (n.as_str(), fd.as_raw_fd(), d))),
        &text,
    )
    .map_err(|e| Unready::Relocate(e.to_string()))?;
    obj.relocate_calls(&text)
        .map_err(|e| Unready::Relocate(e.to_string()))?;
    let mut progs = Vec::new();
    for &name in names {
        let p = obj.programs.get(name).ok_or(Unready::Missing(name))?;
        let f = obj
            .functions
            .get(&p.function_key())
            .ok_or(Unready::Missing(name))?;
        progs.push((name, f.instructions.clone()));
    }
    Ok(progs)
}

/// The file descriptors of every map aya created, by name (duplicated: they outlive the maps
/// taken out of the object later).
pub fn map_fds(ebpf: &Ebpf) -> Vec<(String, OwnedFd)> {
    ebpf.maps()
        .filter_map(|(name, m)| {
            let fd = map_fd(m)?;
            fd.try_clone_to_owned().ok().map(|fd| (name.to_owned(), fd))
        })
        .collect()
}

fn map_fd(m: &Map) -> Option<std::os::fd::BorrowedFd<'_>> {
    macro_rules! fd {
        ($($v:ident)|*) => {
            match m {
                $(Map::$v(d) => Some(d.fd().as_fd()),)*
                _ => None,
            }
        };
    }
    fd!(Array
        | BloomFilter
        | HashMap
        | LpmTrie
        | LruHashMap
        | PerCpuArray
        | PerCpuHashMap
        | PerCpuLruHashMap
        | PerfEventArray
        | ProgramArray
        | Queue
        | RingBuf
        | Stack
        | StackTraceMap)
}

/// Programs loaded for multi-uprobe links, by name.
pub struct MultiPrograms {
    progs: BTreeMap<&'static str, OwnedFd>,
}

impl MultiPrograms {
    /// Loads `names` from `object` against the maps in `maps` (see the module documentation).
    pub fn load(
        object: &[u8],
        maps: &[(String, OwnedFd)],
        names: &[&'static str],
    ) -> Result<MultiPrograms, MultiError> {
        let mut progs = BTreeMap::new();
        for (name, insns) in relocated(object, maps, names)? {
            progs.insert(name, multi_load(&insns, name)?);
        }
        Ok(MultiPrograms { progs })
    }

    /// Attaches `prog` at `offsets` of the file at `path` (each with its cookie), at return
    /// when `ret`, in process `pid` only when given.
    pub fn attach(
        &self,
        prog: &'static str,
        path: &Path,
        offsets: &[u64],
        cookies: &[u64],
        ret: bool,
        pid: Option<u32>,
    ) -> io::Result<OwnedFd> {
        let p = self
            .progs
            .get(prog)
            .ok_or_else(|| io::Error::other(format!("program {prog} not loaded")))?;
        link_create(p.as_raw_fd(), path, offsets, cookies, ret, pid.unwrap_or(0))
    }
}

/// `union bpf_attr` for BPF_PROG_LOAD, up to `attach_btf_obj_fd`: the multi-uprobe loader here
/// and the fentry loader (`trace::file_hooks`) fill it, zeroes beyond what each sets.
#[repr(C)]
#[derive(Default)]
pub(crate) struct ProgLoadAttr {
    pub prog_type: u32,
    pub insn_cnt: u32,
    pub insns: u64,
    pub license: u64,
    pub log_level: u32,
    pub log_size: u32,
    pub log_buf: u64,
    pub kern_version: u32,
    pub prog_flags: u32,
    pub prog_name: [u8; 16],
    pub prog_ifindex: u32,
    pub expected_attach_type: u32,
    pub prog_btf_fd: u32,
    pub func_info_rec_size: u32,
    pub func_info: u64,
    pub func_info_cnt: u32,
    pub line_info_rec_size: u32,
    pub line_info: u64,
    pub line_info_cnt: u32,
    pub attach_btf_id: u32,
    pub attach_btf_obj_fd: u32,
    pub _pad: u32,
}

/// The `bpf` system call with attribute struct `attr`: a new descriptor or the error.
pub(crate) fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<RawFd> {
    // SAFETY: a valid attribute struct whose pointers outlive the call.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, std::mem::size_of::<T>()) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as RawFd)
    }
}

/// Owns a descriptor the kernel just returned.
pub(crate) fn owned(fd: RawFd) -> OwnedFd {
    // SAFETY: a new descriptor the kernel just gave us.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// A program the kernel refused: its error, and the end of the verifier's log (the last
/// `tail` characters of a second try with the log on; empty where it said nothing).
pub(crate) struct Refused {
    pub source: io::Error,
    pub log: String,
}

/// Loads `insns` as program `name` with the type and attach fields of `attr` (the rest is
/// filled here). Refused, it loads again with the verifier's log, to say why.
pub(crate) fn prog_load(
    insns: &[aya_obj::generated::bpf_insn],
    name: &str,
    mut attr: ProgLoadAttr,
    tail: usize,
) -> Result<OwnedFd, Refused> {
    let license = c"GPL";
    attr.insn_cnt = insns.len() as u32;
    attr.insns = insns.as_ptr() as u64;
    attr.license = license.as_ptr() as u64;
    let n = name.len().min(15);
    attr.prog_name[..n].copy_from_slice(&name.as_bytes()[..n]);
    let source = match sys_bpf(BPF_PROG_LOAD, &mut attr) {
        Ok(fd) => return Ok(owned(fd)),
        Err(e) => e,
    };
    let mut log = vec![0u8; LOG_BYTES];
    attr.log_level = 1;
    attr.log_size = log.len() as u32;
    attr.log_buf = log.as_mut_ptr() as u64;
    if let Ok(fd) = sys_bpf(BPF_PROG_LOAD, &mut attr) {
        return Ok(owned(fd));
    }
    let text = String::from_utf8_lossy(&log);
    let text = text.trim_end_matches('\0').trim();
    let log = text[text.floor_char_boundary(text.len().saturating_sub(tail))..].to_owned();
    Err(Refused { source, log })
}

/// `union bpf_attr` for BPF_LINK_CREATE with `uprobe_multi`.
#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
    path: u64,
    offsets: u64,
    ref_ctr_offsets: u64,
    cookies: u64,
    cnt: u32,
    multi_flags: u32,
    pid: u32,
    _pad: u32,
}

/// Loads `name` for multi-uprobe links.
fn multi_load(
    insns: &[aya_obj::generated::bpf_insn],
    name: &'static str,
) -> Result<OwnedFd, MultiError> {
    let attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_KPROBE,
        expected_attach_type: BPF_TRACE_UPROBE_MULTI,
        ..Default::default()
    };
    prog_load(insns, name, attr, 600).map_err(|r| MultiError::Load {
        name,
        source: r.source,
        log: if r.log.is_empty() {
            String::new()
        } else {
            format!(" (verifier: …{})", r.log)
        },
    })
}

fn link_create(
    prog: RawFd,
    path: &Path,
    offsets: &[u64],
    cookies: &[u64],
    ret: bool,
    pid: u32,
) -> io::Result<OwnedFd> {
    if offsets.len() != cookies.len() || offsets.is_empty() {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    let path = CString::new(path.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    let attr = LinkCreateAttr {
        prog_fd: prog as u32,
        attach_type: BPF_TRACE_UPROBE_MULTI,
        path: path.as_ptr() as u64,
        offsets: offsets.as_ptr() as u64,
        cookies: cookies.as_ptr() as u64,
        cnt: offsets.len() as u32,
        multi_flags: if ret { BPF_F_UPROBE_MULTI_RETURN } else { 0 },
        pid,
        ..Default::default()
    };
    // SAFETY: a valid attribute struct whose pointers outlive the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_CREATE,
            &attr as *const LinkCreateAttr,
            std::mem::size_of::<LinkCreateAttr>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor the kernel just gave us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The attribute layouts the kernel reads (include/uapi/linux/bpf.h).
    #[test]
    fn attr_layouts() {
        assert_eq!(std::mem::offset_of!(ProgLoadAttr, expected_attach_type), 68);
        assert_eq!(std::mem::offset_of!(ProgLoadAttr, attach_btf_id), 108);
        assert_eq!(std::mem::offset_of!(ProgLoadAttr, attach_btf_obj_fd), 112);
    }
}
