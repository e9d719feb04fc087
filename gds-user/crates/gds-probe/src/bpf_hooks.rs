//! Which kinds of eBPF program this kernel lets gds load, tried for real: a two-instruction
//! program (`r0 = 0; exit`) of each kind, loaded and closed at once.
//!
//! Kernel configs, lockdown and LSM policies decide this, and no file says it: on the
//! development VM BTF tracepoints load while fentry/fexit programs are refused with EPERM even
//! when empty (a security policy, not the verifier: the log stays empty). gds attaches only
//! tracepoints (BTF and raw) today; designs that hook kernel functions (a syscall layer on
//! `vfs_read`, batch clocks on `io_submit_sqes`) need fentry.

use serde::Serialize;

/// What loading one kind of program gave: `"loads"` or `{"refused": "why"}` in JSON.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Load {
    Loads,
    Refused(String),
}

impl From<Result<(), String>> for Load {
    fn from(r: Result<(), String>) -> Load {
        match r {
            Ok(()) => Load::Loads,
            Err(e) => Load::Refused(e),
        }
    }
}

impl std::fmt::Display for Load {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Load::Loads => f.write_str("loads"),
            Load::Refused(why) => write!(f, "refused ({why})"),
        }
    }
}

/// What loading each kind of program gave.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct BpfHooks {
    /// `tp_btf` on `io_uring_complete` (what the io_uring, block and NVMe programs are).
    pub btf_tracepoint: Load,
    /// A raw tracepoint program (what the NVMe programs are, for module tracepoints).
    pub raw_tracepoint: Load,
    /// fentry on `vfs_read`.
    pub fentry: Load,
    /// fexit on `vfs_read`.
    pub fexit: Load,
    /// The hooks `gds-agent run --file-hooks auto` takes here, and what they cannot see.
    pub file_hooks: String,
}

/// What `--file-hooks auto` chooses on a kernel with `btf` (the rule of `gds_trace`'s file
/// layer: fentry, else kprobes, else the iomap tracepoints; never syscalls). fentry is tried
/// by attaching an empty program to `blkdev_read_iter` (a load alone says yes where an attach
/// says no: 6.1 loads fentry on 7-argument functions and refuses the attach); kprobes by the
/// perf `kprobe` event source aya attaches through.
fn file_hooks(btf: &gds_host::btf::Btf) -> String {
    let modules = ["ext4", "xfs", "btrfs"]
        .iter()
        .filter(|m| {
            btf.func_id(&format!("{m}_file_read_iter")).is_none()
                && !std::path::Path::new("/sys/kernel/btf").join(m).exists()
        })
        .copied()
        .collect::<Vec<_>>();
    let not_loaded = if modules.is_empty() {
        String::new()
    } else {
        format!(
            "; not loaded now: {} (hooked when they load)",
            modules.join(", ")
        )
    };
    let fentry = btf
        .func_id("blkdev_read_iter")
        .ok_or_else(|| "blkdev_read_iter is not in the kernel's BTF".to_owned())
        .and_then(|id| try_attach(BPF_TRACE_FENTRY, id));
    let kprobes = std::path::Path::new("/sys/bus/event_source/devices/kprobe/type").exists();
    if fentry.is_ok() {
        format!(
            "fentry (read_iter/write_iter of ext4, xfs, btrfs, block devices: every call; \
             not fsync, mmap faults, splice{not_loaded})"
        )
    } else if kprobes {
        format!(
            "kprobe (fentry refused: {}; read_iter/write_iter of ext4, xfs, btrfs, block \
             devices: every call; not fsync, mmap faults, splice{not_loaded})",
            fentry.err().unwrap_or_default()
        )
    } else if ["iomap_dio_rw_begin", "iomap_dio_complete"]
        .iter()
        .all(|tp| btf.has_tracepoint(tp))
    {
        format!(
            "tracepoint (fentry refused: {}; no kprobes; iomap_dio_rw_begin/complete: O_DIRECT \
             calls of ext4, xfs, btrfs; not buffered calls, fsync or block devices)",
            fentry.err().unwrap_or_default()
        )
    } else {
        "off (no iomap direct-I/O tracepoints, kernel before 6.4; --file-hooks syscalls \
         traces every read/write system call at a cost to every syscall)"
            .into()
    }
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TYPE_RAW_TRACEPOINT: u32 = 17;
const BPF_PROG_TYPE_TRACING: u32 = 26;
const BPF_TRACE_RAW_TP: u32 = 23;
const BPF_TRACE_FENTRY: u32 = 24;
const BPF_TRACE_FEXIT: u32 = 25;

/// Loads `r0 = 0; exit` as a program of `prog_type` (with `attach_type` at `btf_id` for the
/// tracing kinds) and closes it.
fn try_load(prog_type: u32, attach_type: u32, btf_id: u32) -> Result<(), String> {
    let fd = load(prog_type, attach_type, btf_id)?;
    // SAFETY: closing the fd we were just given.
    unsafe { libc::close(fd) };
    Ok(())
}

/// Loads an empty tracing program for `attach_type` at `btf_id`, attaches it
/// (`BPF_RAW_TRACEPOINT_OPEN` with no name) and closes both.
fn try_attach(attach_type: u32, btf_id: u32) -> Result<(), String> {
    const BPF_RAW_TRACEPOINT_OPEN: libc::c_long = 17;
    let prog = load(BPF_PROG_TYPE_TRACING, attach_type, btf_id)?;
    // union bpf_attr, raw_tracepoint part: name @0 (NULL: the program's target), prog_fd @8.
    let mut attr = [0u8; 16];
    attr[8..12].copy_from_slice(&(prog as u32).to_ne_bytes());
    // SAFETY: bpf(2) with a valid attr of the size given.
    let link = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_RAW_TRACEPOINT_OPEN,
            attr.as_ptr(),
            attr.len() as libc::c_uint,
        )
    };
    let r = if link < 0 {
        Err(format!("attach: {}", std::io::Error::last_os_error()))
    } else {
        // SAFETY: closing the fd we were just given.
        unsafe { libc::close(link as i32) };
        Ok(())
    };
    // SAFETY: as above.
    unsafe { libc::close(prog) };
    r
}

/// `r0 = 0; exit` loaded as described at [`try_load`]: its descriptor.
fn load(prog_type: u32, attach_type: u32, btf_id: u32) -> Result<i32, String> {
    // BPF_MOV64_IMM(r0, 0); BPF_EXIT_INSN().
    let insns: [u64; 2] = [0xb7, 0x95];
    let license = b"GPL\0";
    // union bpf_attr, BPF_PROG_LOAD part (include/uapi/linux/bpf.h): prog_type @0, insn_cnt
    // @4, insns @8, license @16, expected_attach_type @68, attach_btf_id @108.
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&prog_type.to_ne_bytes());
    attr[4..8].copy_from_slice(&2u32.to_ne_bytes());
    attr[8..16].copy_from_slice(&(insns.as_ptr() as u64).to_ne_bytes());
    attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
    attr[68..72].copy_from_slice(&attach_type.to_ne_bytes());
    attr[108..112].copy_from_slice(&btf_id.to_ne_bytes());
    // SAFETY: bpf(2) with a valid attr of the size given; the pointers outlive the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            attr.as_ptr(),
            attr.len() as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    Ok(fd as i32)
}

/// Tries each kind on the running kernel (needs CAP_BPF + CAP_PERFMON, or root).
pub fn probe() -> Result<BpfHooks, String> {
    let btf = gds_host::btf::Btf::from_sys().map_err(|e| e.to_string())?;
    let tracing = |attach: u32, id: Option<u32>, what: &str| match id {
        Some(id) => try_load(BPF_PROG_TYPE_TRACING, attach, id),
        None => Err(format!("{what} is not in the kernel's BTF")),
    };
    let complete = btf.tracepoint_id("io_uring_complete");
    let vfs_read = btf.func_id("vfs_read");
    Ok(BpfHooks {
        btf_tracepoint: tracing(BPF_TRACE_RAW_TP, complete, "btf_trace_io_uring_complete").into(),
        raw_tracepoint: try_load(BPF_PROG_TYPE_RAW_TRACEPOINT, 0, 0).into(),
        fentry: tracing(BPF_TRACE_FENTRY, vfs_read, "vfs_read").into(),
        fexit: tracing(BPF_TRACE_FEXIT, vfs_read, "vfs_read").into(),
        file_hooks: file_hooks(&btf),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The agent's own programs are BTF and raw tracepoints: where it runs (as root, in the
    /// test suite) both kinds load. fentry's answer is reported, whatever it is.
    #[test]
    fn tracepoint_programs_load_here() {
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: loading programs needs root");
            return;
        }
        let h = probe().expect("kernel BTF");
        assert_eq!(h.btf_tracepoint, Load::Loads);
        assert_eq!(h.raw_tracepoint, Load::Loads);
        eprintln!("fentry: {:?}, fexit: {:?}", h.fentry, h.fexit);
    }

    #[test]
    fn an_invalid_program_type_is_an_error_not_a_panic() {
        assert!(try_load(u32::MAX, 0, 0).is_err());
    }
}
