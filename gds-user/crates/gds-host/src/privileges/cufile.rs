//! What the cuFile layer needs, and what it lacks with the capabilities the agent started with.
//!
//! The layer attaches uprobes for as long as the agent runs, from its own thread (which keeps
//! [`super::CUFILE_KEEP`] where held). Each need below was found on Linux 6.18 by running the
//! agent (and a bare `perf_event_open`) under `setpriv` with one capability taken away
//! (gds-user/tests/privileges.rs runs the shipped unit's set and the minimal one):
//!
//! - **uprobe perf events** (`perf_event_open` of the `uprobe` PMU): refused with EACCES under
//!   CAP_PERFMON alone, for any file; CAP_SYS_ADMIN is needed. It also covers
//!   `/proc/PID/map_files/*`, how the agent reads a mapped library and how the kernel reaches
//!   it (in any mount namespace, deleted or not), which is gated on CAP_CHECKPOINT_RESTORE or
//!   CAP_SYS_ADMIN; that open failed with EPERM, taken for "the process exited", and left the
//!   layer silently empty (issue 21, item 3).
//! - **other processes' maps**: `/proc/PID/maps` and `map_files` need ptrace read access,
//!   which for a process of another user, or one holding capabilities the agent lacks (a root
//!   process started normally), takes CAP_SYS_PTRACE: in practice every cuFile application.
//! - **other users' processes**: `/proc/PID/map_files` is a directory of mode 0500 owned by
//!   the process's user, so uid 0 enters it only with CAP_DAC_READ_SEARCH (or
//!   CAP_DAC_OVERRIDE); the same reads a library file whose mode keeps uid 0 out. Without it
//!   the layer still traces root's processes.

use std::fmt;

use thiserror::Error;

use super::{
    CAP_DAC_READ_SEARCH, CAP_SYS_ADMIN, CAP_SYS_PTRACE, CapSet, PrivilegeError, ThreadCaps,
    cap_by_name,
};

/// CAP_DAC_OVERRIDE (capability.h): also lets uid 0 enter another user's directory.
const CAP_DAC_OVERRIDE: u32 = 1;

/// One thing the cuFile layer does that a capability gates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Need {
    /// Any one of these will do; the first is the one to grant (the narrowest).
    pub any_of: &'static [u32],
    /// What it is needed for, in words.
    pub for_what: &'static str,
    /// Without it the layer can attach to nothing (it is then off); otherwise it works for
    /// fewer files.
    pub blocks: bool,
}

impl Need {
    pub fn met_by(&self, held: CapSet) -> bool {
        self.any_of.iter().any(|&c| held.has(c))
    }
}

impl fmt::Display for Need {
    /// `cap_checkpoint_restore (or cap_sys_admin) to open /proc/PID/map_files/* (...)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names = self.any_of.iter().map(|&c| CapSet(0).with(c).to_string());
        write!(f, "{}", names.next().unwrap_or_default())?;
        let others: Vec<String> = names.collect();
        if !others.is_empty() {
            write!(f, " (or {})", others.join(", or "))?;
        }
        write!(f, " to {}", self.for_what)
    }
}

/// Everything the cuFile layer needs, most basic first. Each capability named first is in
/// [`super::CUFILE_KEEP`] (a unit test checks it), so the cuFile thread keeps it.
pub const CUFILE_NEEDS: [Need; 3] = [
    Need {
        any_of: &[CAP_SYS_ADMIN],
        for_what: "create uprobe perf events (this kernel refuses them with cap_perfmon alone: \
                   EACCES) and open /proc/PID/map_files/*",
        blocks: true,
    },
    Need {
        any_of: &[CAP_SYS_PTRACE],
        for_what: "read /proc/PID/maps of processes of other users or holding capabilities the \
                   agent lacks (every cuFile application but the agent's own kind)",
        blocks: true,
    },
    Need {
        any_of: &[CAP_DAC_READ_SEARCH, CAP_DAC_OVERRIDE],
        for_what: "enter /proc/PID/map_files of other users' processes (mode 0500): their \
                   libraries are not traced",
        blocks: false,
    },
];

/// What the cuFile layer can do with a set of capabilities.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CufileAccess {
    /// The capabilities the cuFile thread will hold (the process's permitted set at start:
    /// the thread raises its effective set to what it keeps of it).
    pub held: CapSet,
    /// Needs not met, in [`CUFILE_NEEDS`] order.
    pub missing: Vec<Need>,
}

impl CufileAccess {
    pub fn of(held: CapSet) -> CufileAccess {
        CufileAccess {
            held,
            missing: CUFILE_NEEDS
                .iter()
                .filter(|n| !n.met_by(held))
                .copied()
                .collect(),
        }
    }

    /// From the calling thread's permitted set (call it before capabilities are dropped).
    pub fn of_this_thread() -> Result<CufileAccess, PrivilegeError> {
        let caps = ThreadCaps::read(super::gettid())?;
        Ok(CufileAccess::of(caps.permitted))
    }

    /// Whether the layer can attach at all (no blocking need is missing).
    pub fn works(&self) -> bool {
        !self.missing.iter().any(|n| n.blocks)
    }

    /// The capabilities to grant for everything to work: the first of each missing need.
    pub fn to_grant(&self) -> CapSet {
        self.missing
            .iter()
            .fold(CapSet(0), |s, n| s.with(n.any_of[0]))
    }

    fn list(&self, blocks: bool) -> String {
        self.missing
            .iter()
            .filter(|n| n.blocks == blocks)
            .map(Need::to_string)
            .collect::<Vec<_>>()
            .join("; ")
    }
}

impl fmt::Display for CufileAccess {
    /// `off: it lacks ...; grant ...`, `on, limited: ...` or `on: ...`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.works() {
            write!(f, "off: the agent lacks {}", self.list(true))?;
            let limits = self.list(false);
            if !limits.is_empty() {
                write!(f, "; and {limits}")?;
            }
            return write!(
                f,
                "; grant {} (deploy/systemd/gds-agent.service and the DaemonSet do; see \
                 docs/deploy.md)",
                self.to_grant()
            );
        }
        if self.missing.is_empty() {
            return f.write_str("on: every capability it needs is held");
        }
        write!(
            f,
            "on, limited: the agent lacks {}; grant {} to lift it",
            self.list(false),
            self.to_grant()
        )
    }
}

/// Why a unit file's capabilities could not be read.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum UnitCapsError {
    #[error("line {line}: unknown capability {name:?} in {key}")]
    Unknown {
        line: usize,
        key: &'static str,
        name: String,
    },
}

/// The capabilities a systemd service's process starts with, from its unit text:
/// `CapabilityBoundingSet=` (every line, `~` for "all but"), `AmbientCapabilities=` and `User=`.
/// A uid-0 service gets its whole bounding set (what `User=root` with a bounding set does); any
/// other user gets the ambient capabilities within the bounding set.
pub fn unit_capabilities(text: &str) -> Result<CapSet, UnitCapsError> {
    const ALL: CapSet = CapSet((1u64 << 41) - 1);
    let mut bounding: Option<CapSet> = None;
    let mut ambient = CapSet(0);
    let mut root = true;
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let key = key.trim();
        let parse = |key: &'static str, v: &str| -> Result<(bool, CapSet), UnitCapsError> {
            let (invert, v) = match v.trim().strip_prefix('~') {
                Some(rest) => (true, rest),
                None => (false, v),
            };
            let mut set = CapSet(0);
            for name in v.split_whitespace() {
                let cap = cap_by_name(name).ok_or_else(|| UnitCapsError::Unknown {
                    line: i + 1,
                    key,
                    name: name.to_owned(),
                })?;
                set = set.with(cap);
            }
            Ok((invert, set))
        };
        match key {
            "CapabilityBoundingSet" => {
                let (invert, set) = parse("CapabilityBoundingSet", value)?;
                let cur = bounding.unwrap_or(CapSet(0));
                // An empty assignment resets; lines otherwise add up (systemd.exec(5)).
                bounding = Some(if value.trim().is_empty() {
                    CapSet(0)
                } else if invert {
                    CapSet(bounding.unwrap_or(ALL).0 & !set.0)
                } else {
                    CapSet(cur.0 | set.0)
                });
            }
            "AmbientCapabilities" => {
                let (invert, set) = parse("AmbientCapabilities", value)?;
                ambient = if value.trim().is_empty() {
                    CapSet(0)
                } else if invert {
                    CapSet(ALL.0 & !set.0)
                } else {
                    CapSet(ambient.0 | set.0)
                };
            }
            "User" => root = matches!(value.trim(), "root" | "0"),
            _ => {}
        }
    }
    let bounding = bounding.unwrap_or(ALL);
    Ok(if root {
        bounding
    } else {
        CapSet(ambient.0 & bounding.0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::privileges::{CAP_BPF, CAP_PERFMON, CUFILE_KEEP};

    #[test]
    fn every_needed_capability_is_kept_by_the_cufile_thread() {
        for n in CUFILE_NEEDS {
            assert!(CUFILE_KEEP.has(n.any_of[0]), "{n}");
        }
    }

    #[test]
    fn names_what_is_missing_for_what() {
        let basic = CapSet(0).with(CAP_BPF).with(CAP_PERFMON);
        let a = CufileAccess::of(basic);
        assert!(!a.works());
        let s = a.to_string();
        assert!(
            s.starts_with("off: the agent lacks cap_sys_admin to create uprobe perf events"),
            "{s}"
        );
        assert!(s.contains("; cap_sys_ptrace to read /proc/PID/maps"), "{s}");
        assert!(
            s.contains("; and cap_dac_read_search (or cap_dac_override) to enter"),
            "{s}"
        );
        assert!(
            s.contains("grant cap_dac_read_search,cap_sys_ptrace,cap_sys_admin"),
            "{s}"
        );

        let full = basic
            .with(CAP_SYS_ADMIN)
            .with(CAP_SYS_PTRACE)
            .with(CAP_DAC_READ_SEARCH);
        assert!(CufileAccess::of(full).missing.is_empty());
        assert_eq!(
            CufileAccess::of(full).to_string(),
            "on: every capability it needs is held"
        );
        let limited = CufileAccess::of(CapSet(full.0 & !(1 << CAP_DAC_READ_SEARCH)));
        assert!(limited.works());
        assert!(
            limited
                .to_string()
                .starts_with("on, limited: the agent lacks cap_dac_read_search"),
            "{limited}"
        );
        assert!(
            CufileAccess::of(limited.held.with(CAP_DAC_OVERRIDE))
                .missing
                .is_empty()
        );
        let no_ptrace = CufileAccess::of(CapSet(full.0 & !(1 << CAP_SYS_PTRACE)));
        assert!(!no_ptrace.works());
        assert_eq!(no_ptrace.to_grant(), CapSet(0).with(CAP_SYS_PTRACE));
        assert!(!CufileAccess::of(CapSet(0)).works());
    }

    #[test]
    fn reads_a_units_capabilities() {
        let unit = "[Service]\nUser=root\nAmbientCapabilities=CAP_BPF CAP_PERFMON\n\
                    CapabilityBoundingSet=CAP_BPF CAP_PERFMON\nCapabilityBoundingSet=CAP_SYS_PTRACE\n";
        assert_eq!(
            unit_capabilities(unit).unwrap(),
            CapSet(0)
                .with(CAP_BPF)
                .with(CAP_PERFMON)
                .with(CAP_SYS_PTRACE)
        );
        // Not root: only the ambient ones within the bounding set.
        let nobody = unit.replace("User=root", "User=gds");
        assert_eq!(
            unit_capabilities(&nobody).unwrap(),
            CapSet(0).with(CAP_BPF).with(CAP_PERFMON)
        );
        let all_but_admin = unit_capabilities("CapabilityBoundingSet=~CAP_SYS_ADMIN\n").unwrap();
        assert!(!all_but_admin.has(CAP_SYS_ADMIN) && all_but_admin.has(CAP_SYS_PTRACE));
        assert_eq!(
            unit_capabilities("x\nCapabilityBoundingSet=CAP_FROB\n"),
            Err(UnitCapsError::Unknown {
                line: 2,
                key: "CapabilityBoundingSet",
                name: "CAP_FROB".into()
            })
        );
        assert_eq!(cap_by_name("PERFMON"), Some(CAP_PERFMON));
        assert_eq!(cap_by_name("cap_sys_admin"), Some(CAP_SYS_ADMIN));
    }
}
