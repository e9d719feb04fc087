//! Capability sets: the numbers and names of include/uapi/linux/capability.h, the sets of a
//! thread as /proc reports them, and capset(2) on the calling thread.

use std::fmt;

use procfs::{FromRead, process::Status};

pub const CAP_DAC_READ_SEARCH: u32 = 2;
pub const CAP_SETPCAP: u32 = 8;
pub const CAP_SYS_PTRACE: u32 = 19;
pub const CAP_SYS_ADMIN: u32 = 21;
pub const CAP_PERFMON: u32 = 38;
pub const CAP_BPF: u32 = 39;
pub const CAP_CHECKPOINT_RESTORE: u32 = 40;

/// Names of capabilities 0..=40 (include/uapi/linux/capability.h).
const CAP_NAMES: [&str; 41] = [
    "cap_chown",
    "cap_dac_override",
    "cap_dac_read_search",
    "cap_fowner",
    "cap_fsetid",
    "cap_kill",
    "cap_setgid",
    "cap_setuid",
    "cap_setpcap",
    "cap_linux_immutable",
    "cap_net_bind_service",
    "cap_net_broadcast",
    "cap_net_admin",
    "cap_net_raw",
    "cap_ipc_lock",
    "cap_ipc_owner",
    "cap_sys_module",
    "cap_sys_rawio",
    "cap_sys_chroot",
    "cap_sys_ptrace",
    "cap_sys_pacct",
    "cap_sys_admin",
    "cap_sys_boot",
    "cap_sys_nice",
    "cap_sys_resource",
    "cap_sys_time",
    "cap_sys_tty_config",
    "cap_mknod",
    "cap_lease",
    "cap_audit_write",
    "cap_audit_control",
    "cap_setfcap",
    "cap_mac_override",
    "cap_mac_admin",
    "cap_syslog",
    "cap_wake_alarm",
    "cap_block_suspend",
    "cap_audit_read",
    "cap_perfmon",
    "cap_bpf",
    "cap_checkpoint_restore",
];

/// The number of a capability by name, as capability.h, systemd units (`CAP_BPF`) or
/// Kubernetes (`BPF`) spell it, in any case (`cap_bpf`).
pub fn cap_by_name(name: &str) -> Option<u32> {
    let lower = name.trim().to_ascii_lowercase();
    let full = if lower.starts_with("cap_") {
        lower
    } else {
        format!("cap_{lower}")
    };
    CAP_NAMES
        .iter()
        .position(|n| *n == full)
        .and_then(|i| u32::try_from(i).ok())
}

/// A set of capabilities as a bit mask (bit n = capability n, as in /proc/PID/status).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CapSet(pub u64);

impl CapSet {
    pub fn has(self, cap: u32) -> bool {
        cap < 64 && self.0 & (1u64 << cap) != 0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn count(self) -> u32 {
        self.0.count_ones()
    }

    pub fn with(self, cap: u32) -> CapSet {
        CapSet(self.0 | 1u64.checked_shl(cap).unwrap_or(0))
    }
}

impl fmt::Display for CapSet {
    /// `none`, or the names (`cap_bpf,cap_perfmon`); unknown bits as `cap_<n>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("none");
        }
        let mut first = true;
        for cap in (0..64).filter(|&c| self.has(c)) {
            if !first {
                f.write_str(",")?;
            }
            first = false;
            match CAP_NAMES.get(cap as usize) {
                Some(name) => f.write_str(name)?,
                None => write!(f, "cap_{cap}")?,
            }
        }
        Ok(())
    }
}

/// The effective set of this process (its main thread's, `/proc/self/status`); empty when
/// unreadable.
pub fn process_effective() -> CapSet {
    Status::from_file("/proc/self/status").map_or(CapSet(0), |s| CapSet(s.capeff))
}

/// The five capability sets of one thread, from /proc/self/task/TID/status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ThreadCaps {
    pub effective: CapSet,
    pub permitted: CapSet,
    pub inheritable: CapSet,
    pub ambient: CapSet,
    pub bounding: CapSet,
}

impl ThreadCaps {
    /// The sets of a parsed status file; `None` without `CapBnd`/`CapAmb` (before Linux 4.3:
    /// the ambient set cannot be checked there).
    pub fn of_status(status: &Status) -> Option<ThreadCaps> {
        Some(ThreadCaps {
            effective: CapSet(status.capeff),
            permitted: CapSet(status.capprm),
            inheritable: CapSet(status.capinh),
            ambient: CapSet(status.capamb?),
            bounding: CapSet(status.capbnd?),
        })
    }

    /// The sets in the text of a /proc status file (`None` when it is not one).
    pub fn parse_status(status: &str) -> Option<ThreadCaps> {
        ThreadCaps::of_status(&Status::from_read(status.as_bytes()).ok()?)
    }
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

pub(super) fn errno() -> i32 {
    // SAFETY: errno is thread-local and always valid to read.
    unsafe { *libc::__errno_location() }
}

/// capset(2) on the calling thread. Async-signal-safe (one syscall, no allocation).
pub(super) fn capset(effective: u64, permitted: u64, inheritable: u64) -> Result<(), i32> {
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [
        CapData {
            effective: effective as u32,
            permitted: permitted as u32,
            inheritable: inheritable as u32,
        },
        CapData {
            effective: (effective >> 32) as u32,
            permitted: (permitted >> 32) as u32,
            inheritable: (inheritable >> 32) as u32,
        },
    ];
    // SAFETY: header and a two-element data array, as capset(2) version 3 expects.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) };
    if rc == 0 { Ok(()) } else { Err(errno()) }
}
