//! tracefs: finding (or mounting) it and reading tracepoint format files.
//!
//! BTF tracepoints need no tracefs, but the classic-tracepoint fallback does (event ids and
//! record layouts come from `events/<category>/<name>/{id,format}`), and so do people reading
//! `trace_pipe` beside the agent. The Firecracker kernels here boot without it mounted.

use std::{
    ffi::CString,
    path::{Path, PathBuf},
};

use thiserror::Error;

mod format;

pub use format::{EventFormat, Field};

pub const DEFAULT_TRACEFS: &str = "/sys/kernel/tracing";

#[derive(Debug, Error)]
pub enum TracefsError {
    #[error(
        "tracefs is not mounted and mounting it on {path} failed: {source} \
         (mount it with `mount -t tracefs nodev {path}`, or run the agent as root)"
    )]
    Mount {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "tracefs at {path} is not readable by this user ({source}): `--attach classic` reads \
         tracepoint ids and formats there; run the agent as root, grant it CAP_DAC_READ_SEARCH, \
         or use BTF tracepoints (`--attach btf`/`auto`), which need only CAP_BPF and CAP_PERFMON"
    )]
    NoAccess {
        path: String,
        source: std::io::Error,
    },
    #[error("tracepoint {category}:{name} does not exist on this kernel ({path} missing)")]
    NoEvent {
        category: String,
        name: String,
        path: String,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("format of {category}:{name} has no field {field}")]
    NoField {
        category: String,
        name: String,
        field: String,
    },
    #[error("malformed format file {path}: {line}")]
    Malformed { path: String, line: String },
}

/// Where tracefs is mounted, from /proc/mounts (the first such mount; `None` when there is
/// none or /proc/mounts is unreadable). Mount points with spaces come back unescaped.
pub fn find_mount() -> Option<PathBuf> {
    procfs::mounts()
        .ok()?
        .into_iter()
        .find(|m| m.fs_vfstype == "tracefs")
        .map(|m| PathBuf::from(m.fs_file))
}

/// The tracefs mount point, mounting it on /sys/kernel/tracing when it is not mounted.
/// Returns whether this call mounted it. A mount this user cannot read (tracefs is 0700 root)
/// is an error here, so the classic fallback says so instead of "tracepoint absent".
pub fn ensure_mounted() -> Result<(PathBuf, bool), TracefsError> {
    if let Some(dir) = find_mount() {
        let events = dir.join("events");
        if let Err(source) = std::fs::read_dir(&events)
            && source.kind() == std::io::ErrorKind::PermissionDenied
        {
            return Err(TracefsError::NoAccess {
                path: dir.display().to_string(),
                source,
            });
        }
        return Ok((dir, false));
    }
    let target = Path::new(DEFAULT_TRACEFS);
    let err = |source| TracefsError::Mount {
        path: DEFAULT_TRACEFS.into(),
        source,
    };
    let c_target = CString::new(DEFAULT_TRACEFS).expect("no NUL");
    let fstype = CString::new("tracefs").expect("no NUL");
    let source = CString::new("nodev").expect("no NUL");
    if !target.is_dir() {
        return Err(err(std::io::Error::from_raw_os_error(libc::ENOENT)));
    }
    // SAFETY: all pointers are valid NUL-terminated strings; data may be NULL for tracefs.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            c_target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    Ok((target.to_path_buf(), true))
}

/// How often [`spawn_watch`] looks at the mount table.
pub const WATCH_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);

/// A change of tracefs availability worth a log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TracefsChange {
    /// Not mounted when the agent started.
    AbsentAtStart,
    /// Was mounted at this path and is not any more.
    Unmounted(PathBuf),
    /// Mounted (again) at this path.
    Mounted(PathBuf),
}

/// Tracks whether tracefs is mounted in the agent's mount namespace.
///
/// The attached programs do not use tracefs (BTF tracepoints never did; classic ones read
/// their event ids and formats from it only while attaching), so losing it does not stop
/// tracing. It is still worth saying: a restart with `--attach classic` would then fail, and
/// people lose `trace_pipe`. One log line per change, not one per check.
#[derive(Debug, Default)]
pub struct TracefsWatch {
    /// None before the first check.
    last: Option<Option<PathBuf>>,
}

impl TracefsWatch {
    /// Records the current mount point (None: not mounted); returns the change to log, if any.
    pub fn update(&mut self, now: Option<PathBuf>) -> Option<TracefsChange> {
        let change = match (&self.last, &now) {
            (None, None) => Some(TracefsChange::AbsentAtStart),
            (None, Some(_)) => None,
            (Some(Some(was)), None) => Some(TracefsChange::Unmounted(was.clone())),
            (Some(None), Some(dir)) => Some(TracefsChange::Mounted(dir.clone())),
            (Some(_), _) => None,
        };
        self.last = Some(now);
        change
    }

    pub fn log(change: &TracefsChange) {
        match change {
            TracefsChange::AbsentAtStart => tracing::warn!(
                "tracefs is not mounted in the agent's mount namespace: tracing is unaffected, \
                 but `--attach classic` cannot start and trace_pipe is unavailable until it is \
                 mounted (`mount -t tracefs nodev {DEFAULT_TRACEFS}`); gds_agent_tracefs_available is 0"
            ),
            TracefsChange::Unmounted(dir) => tracing::warn!(
                path = %dir.display(),
                "tracefs was unmounted: tracing continues (the attached programs do not use it), \
                 but a restart with `--attach classic` would fail until it is mounted again \
                 (`mount -t tracefs nodev {DEFAULT_TRACEFS}`); gds_agent_tracefs_available is 0"
            ),
            TracefsChange::Mounted(dir) => tracing::info!(
                path = %dir.display(),
                "tracefs is mounted again; gds_agent_tracefs_available is 1"
            ),
        }
    }
}

impl EventFormat {
    pub fn read(tracefs: &Path, category: &str, name: &str) -> Result<EventFormat, TracefsError> {
        let path = tracefs
            .join("events")
            .join(category)
            .join(name)
            .join("format");
        if !path.exists() {
            return Err(TracefsError::NoEvent {
                category: category.into(),
                name: name.into(),
                path: path.display().to_string(),
            });
        }
        let text = std::fs::read_to_string(&path).map_err(|source| TracefsError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(category, name, &text).map_err(|line| TracefsError::Malformed {
            path: path.display().to_string(),
            line,
        })
    }

    pub fn field(&self, field: &str) -> Result<&Field, TracefsError> {
        self.fields
            .iter()
            .find(|f| f.name == field)
            .ok_or_else(|| TracefsError::NoField {
                category: self.category.clone(),
                name: self.name.clone(),
                field: field.into(),
            })
    }

    pub fn offset(&self, field: &str) -> Result<u32, TracefsError> {
        self.field(field).map(|f| f.offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SUBMIT_REQ_6_18: &str = "name: io_uring_submit_req
ID: 1234
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:void * ctx;\toffset:8;\tsize:8;\tsigned:0;
\tfield:void * req;\toffset:16;\tsize:8;\tsigned:0;
\tfield:unsigned long long user_data;\toffset:24;\tsize:8;\tsigned:0;
\tfield:u8 opcode;\toffset:32;\tsize:1;\tsigned:0;
\tfield:unsigned long long flags;\toffset:40;\tsize:8;\tsigned:0;
\tfield:bool sq_thread;\toffset:48;\tsize:1;\tsigned:0;
\tfield:__data_loc char[] op_str;\toffset:52;\tsize:4;\tsigned:0;

print fmt: \"ring %p, req %p\", REC->ctx, REC->req
";

    #[test]
    fn parses_format_file() {
        let f = EventFormat::parse("io_uring", "io_uring_submit_req", SUBMIT_REQ_6_18).unwrap();
        assert_eq!(f.offset("ctx").unwrap(), 8);
        assert_eq!(f.offset("user_data").unwrap(), 24);
        assert_eq!(f.offset("opcode").unwrap(), 32);
        assert_eq!(f.field("op_str").unwrap().size, 4);
        assert!(matches!(
            f.offset("nope"),
            Err(TracefsError::NoField { .. })
        ));
    }

    #[test]
    fn rejects_malformed_formats() {
        assert!(EventFormat::parse("a", "b", "").is_err());
        assert!(EventFormat::parse("a", "b", "field:int x;\toffset:zz;\tsize:4;").is_err());
        assert!(EventFormat::parse("a", "b", "field:;\toffset:1;\tsize:4;").is_err());
        // Found with the tracepoint_format fuzz target's offset+size property: a field whose
        // end does not fit in u32 was accepted.
        let line = "field:int x;\toffset:4294967295;\tsize:4;\tsigned:1;";
        assert_eq!(EventFormat::parse("a", "b", line).unwrap_err(), line);
    }

    #[test]
    fn watch_reports_each_change_once() {
        let dir = || Some(PathBuf::from(DEFAULT_TRACEFS));
        let mut w = TracefsWatch::default();
        assert_eq!(w.update(dir()), None);
        assert_eq!(w.update(dir()), None);
        assert_eq!(
            w.update(None),
            Some(TracefsChange::Unmounted(PathBuf::from(DEFAULT_TRACEFS)))
        );
        assert_eq!(w.update(None), None);
        assert_eq!(
            w.update(dir()),
            Some(TracefsChange::Mounted(PathBuf::from(DEFAULT_TRACEFS)))
        );
        let mut w = TracefsWatch::default();
        assert_eq!(w.update(None), Some(TracefsChange::AbsentAtStart));
        assert_eq!(w.update(None), None);
    }

    #[test]
    fn live_format_matches_kernel() {
        let (dir, _) = ensure_mounted().expect("tests run as root");
        let f = EventFormat::read(&dir, "io_uring", "io_uring_complete").unwrap();
        assert!(f.offset("req").is_ok() && f.offset("res").is_ok());
        assert!(matches!(
            EventFormat::read(&dir, "io_uring", "no_such_event"),
            Err(TracefsError::NoEvent { .. })
        ));
    }
}
