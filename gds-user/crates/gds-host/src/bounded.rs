//! Bounded, non-blocking reads of host files through a root path.
//!
//! Every file the probe reads goes through [`HostRoot::read`]: it refuses anything that is not a
//! regular file (a FIFO would block `open(2)`, a directory cannot be read), opens with
//! `O_NONBLOCK` so a file swapped for a FIFO between the check and the open cannot hang us, and
//! reads at most `limit + 1` bytes so an oversized file is an error, not an allocation.
//! procfs and sysfs files report a size of 0 or 4096 whatever they hold, so the limit is
//! enforced on the bytes read, never on `st_size`.
//!
//! This is why the probe does not use the procfs crate: its readers open the host's `/proc`
//! (or a given root) without these checks and bounds, and the probe's `--root` fixtures hold
//! driver files (`/proc/driver/nvidia-fs/*`, sysfs) that procfs does not know anyway.

use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Default limit for one sysfs/procfs attribute (they are at most a page in practice).
pub const SMALL_FILE_LIMIT: u64 = 64 * 1024;

/// Why one file could not be read. The message names the host path (as seen under the root).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    #[error("{path} does not exist")]
    NotFound { path: String },
    #[error("permission denied reading {path}")]
    PermissionDenied { path: String },
    #[error("{path} is a {kind}, not a regular file")]
    NotAFile { path: String, kind: &'static str },
    #[error("{path} is larger than the {limit}-byte read limit")]
    TooLarge { path: String, limit: u64 },
    #[error("{path} is not text (binary or invalid UTF-8)")]
    NotText { path: String },
    #[error("reading {path} failed: {message}")]
    Io { path: String, message: String },
}

impl ReadError {
    /// Maps an I/O error from `stat`/`open`/`read` of `path` to the probe's vocabulary.
    pub fn from_io(path: &str, err: &io::Error) -> Self {
        let path = path.to_owned();
        match err.kind() {
            io::ErrorKind::NotFound => ReadError::NotFound { path },
            io::ErrorKind::PermissionDenied => ReadError::PermissionDenied { path },
            io::ErrorKind::IsADirectory => ReadError::NotAFile {
                path,
                kind: "directory",
            },
            _ if err.raw_os_error() == Some(libc::ENOTDIR) => ReadError::NotFound { path },
            _ if err.raw_os_error() == Some(libc::EACCES)
                || err.raw_os_error() == Some(libc::EPERM) =>
            {
                ReadError::PermissionDenied { path }
            }
            _ => ReadError::Io {
                path,
                message: err.to_string(),
            },
        }
    }

    pub fn is_not_found(&self) -> bool {
        matches!(self, ReadError::NotFound { .. })
    }
}

/// The file system the probe looks at: `/` on a live host, a fixture tree in tests.
#[derive(Debug, Clone)]
pub struct HostRoot {
    root: PathBuf,
}

impl HostRoot {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        HostRoot { root: root.into() }
    }

    /// True when the root is the running host's `/`, so live facts (CUDA, io_uring, our own
    /// capabilities) describe the same machine as the files.
    pub fn is_live(&self) -> bool {
        self.root.as_os_str().is_empty()
            || fs::canonicalize(&self.root).is_ok_and(|p| p == Path::new("/"))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The real path of a host-absolute path (`/proc/...`) under the root.
    pub fn path(&self, host_path: &str) -> PathBuf {
        self.root.join(host_path.trim_start_matches('/'))
    }

    pub fn exists(&self, host_path: &str) -> bool {
        fs::metadata(self.path(host_path)).is_ok()
    }

    pub fn is_dir(&self, host_path: &str) -> bool {
        fs::metadata(self.path(host_path)).is_ok_and(|m| m.is_dir())
    }

    /// Reads a text file of at most `limit` bytes.
    pub fn read(&self, host_path: &str, limit: u64) -> Result<String, ReadError> {
        let bytes = self.read_bytes(host_path, limit)?;
        if bytes.contains(&0) {
            return Err(ReadError::NotText {
                path: host_path.to_owned(),
            });
        }
        String::from_utf8(bytes).map_err(|_| ReadError::NotText {
            path: host_path.to_owned(),
        })
    }

    /// Reads a small attribute and trims surrounding whitespace.
    pub fn read_attr(&self, host_path: &str) -> Result<String, ReadError> {
        self.read(host_path, SMALL_FILE_LIMIT)
            .map(|s| s.trim().to_owned())
    }

    /// Reads a file of at most `limit` bytes without interpreting it.
    pub fn read_bytes(&self, host_path: &str, limit: u64) -> Result<Vec<u8>, ReadError> {
        let real = self.path(host_path);
        let meta = fs::metadata(&real).map_err(|e| ReadError::from_io(host_path, &e))?;
        let file_type = meta.file_type();
        if !file_type.is_file() {
            return Err(ReadError::NotAFile {
                path: host_path.to_owned(),
                kind: file_kind(&file_type),
            });
        }
        let mut file = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
            .open(&real)
            .map_err(|e| ReadError::from_io(host_path, &e))?;
        let mut buf = Vec::new();
        file.by_ref()
            .take(limit.saturating_add(1))
            .read_to_end(&mut buf)
            .map_err(|e| ReadError::from_io(host_path, &e))?;
        if buf.len() as u64 > limit {
            return Err(ReadError::TooLarge {
                path: host_path.to_owned(),
                limit,
            });
        }
        Ok(buf)
    }

    /// Entry names of a directory, sorted; at most `limit` of them.
    pub fn list_dir(&self, host_path: &str, limit: usize) -> Result<Vec<String>, ReadError> {
        let real = self.path(host_path);
        let entries = fs::read_dir(&real).map_err(|e| ReadError::from_io(host_path, &e))?;
        let mut names = Vec::new();
        for entry in entries.take(limit) {
            let entry = entry.map_err(|e| ReadError::from_io(host_path, &e))?;
            if let Some(name) = entry.file_name().to_str() {
                names.push(name.to_owned());
            }
        }
        names.sort();
        Ok(names)
    }

    /// Resolves a symbolic link (sysfs `device`, `/sys/bus/pci/devices/*`) to a host-absolute
    /// path without leaving the root. Errors when `host_path` does not exist.
    pub fn resolve_link(&self, host_path: &str) -> Result<String, ReadError> {
        fs::symlink_metadata(self.path(host_path))
            .map_err(|e| ReadError::from_io(host_path, &e))?;
        self.canonical(host_path)
    }

    /// `realpath(3)` inside the root: every symbolic link on the way is followed, an absolute
    /// target is re-rooted, a relative one is taken from the link's real directory (sysfs nests
    /// relative links in linked directories: `/sys/bus/pci/devices/X/driver`). Components that
    /// do not exist are kept as they are.
    pub fn canonical(&self, host_path: &str) -> Result<String, ReadError> {
        let mut pending: Vec<String> = host_path
            .split('/')
            .rev()
            .filter(|c| !c.is_empty())
            .map(str::to_owned)
            .collect();
        let mut resolved: Vec<String> = Vec::new();
        let mut hops = 0;
        while let Some(component) = pending.pop() {
            match component.as_str() {
                "." => continue,
                ".." => {
                    resolved.pop();
                    continue;
                }
                _ => {}
            }
            let candidate = format!("/{}/{component}", resolved.join("/"));
            let real = self.path(&candidate);
            match fs::symlink_metadata(&real) {
                Ok(meta) if meta.file_type().is_symlink() => {
                    hops += 1;
                    if hops > 40 {
                        return Err(ReadError::Io {
                            path: host_path.to_owned(),
                            message: "too many levels of symbolic links".into(),
                        });
                    }
                    let target =
                        fs::read_link(&real).map_err(|e| ReadError::from_io(&candidate, &e))?;
                    let target = target.to_string_lossy().into_owned();
                    if target.starts_with('/') {
                        resolved.clear();
                    }
                    pending.extend(
                        target
                            .split('/')
                            .rev()
                            .filter(|c| !c.is_empty())
                            .map(str::to_owned),
                    );
                }
                _ => resolved.push(component),
            }
        }
        Ok(format!("/{}", resolved.join("/")))
    }
}

fn file_kind(file_type: &fs::FileType) -> &'static str {
    if file_type.is_dir() {
        "directory"
    } else if file_type.is_fifo() {
        "FIFO"
    } else if file_type.is_socket() {
        "socket"
    } else if file_type.is_char_device() {
        "character device"
    } else if file_type.is_block_device() {
        "block device"
    } else {
        "special file"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn tree() -> (tempfile::TempDir, HostRoot) {
        let dir = tempfile::tempdir().unwrap();
        let root = HostRoot::new(dir.path());
        (dir, root)
    }

    #[test]
    fn reads_text_within_limit_and_refuses_larger() {
        let (dir, root) = tree();
        fs::write(dir.path().join("a"), "hello\n").unwrap();
        assert_eq!(root.read("/a", 6).unwrap(), "hello\n");
        assert_eq!(
            root.read("/a", 5),
            Err(ReadError::TooLarge {
                path: "/a".into(),
                limit: 5
            })
        );
    }

    #[test]
    fn binary_and_invalid_utf8_are_not_text() {
        let (dir, root) = tree();
        fs::write(dir.path().join("nul"), b"a\0b").unwrap();
        fs::write(dir.path().join("bad"), [0xff, 0xfe, b'x']).unwrap();
        assert!(matches!(
            root.read("/nul", 100),
            Err(ReadError::NotText { .. })
        ));
        assert!(matches!(
            root.read("/bad", 100),
            Err(ReadError::NotText { .. })
        ));
    }

    #[test]
    fn fifo_is_refused_without_blocking() {
        let (dir, root) = tree();
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        let err = root.read("/fifo", 100).unwrap_err();
        assert_eq!(err.to_string(), "/fifo is a FIFO, not a regular file");
    }

    #[test]
    fn directory_and_missing_paths_have_reasons() {
        let (dir, root) = tree();
        fs::create_dir(dir.path().join("d")).unwrap();
        assert_eq!(
            root.read("/d", 10).unwrap_err().to_string(),
            "/d is a directory, not a regular file"
        );
        assert!(root.read("/missing", 10).unwrap_err().is_not_found());
        // A path through a regular file (ENOTDIR) reads as missing, not as an I/O failure.
        fs::write(dir.path().join("f"), "x").unwrap();
        assert!(root.read("/f/child", 10).unwrap_err().is_not_found());
    }

    #[test]
    fn permission_errors_map_to_permission_denied() {
        // Tests run as root, which bypasses file modes; the mapping itself is what matters.
        let err = io::Error::from_raw_os_error(libc::EACCES);
        assert_eq!(
            ReadError::from_io("/proc/driver/nvidia-fs/stats", &err).to_string(),
            "permission denied reading /proc/driver/nvidia-fs/stats"
        );
        let err = io::Error::from_raw_os_error(libc::EPERM);
        assert!(matches!(
            ReadError::from_io("/x", &err),
            ReadError::PermissionDenied { .. }
        ));
    }

    #[test]
    fn links_resolve_inside_the_root() {
        let (dir, root) = tree();
        fs::create_dir_all(
            dir.path()
                .join("sys/devices/pci0000:00/0000:00:01.0/0000:01:00.0"),
        )
        .unwrap();
        fs::create_dir_all(dir.path().join("sys/bus/pci/devices")).unwrap();
        symlink(
            "../../../devices/pci0000:00/0000:00:01.0/0000:01:00.0",
            dir.path().join("sys/bus/pci/devices/0000:01:00.0"),
        )
        .unwrap();
        symlink("/sys/devices/x", dir.path().join("abs")).unwrap();
        assert_eq!(
            root.resolve_link("/sys/bus/pci/devices/0000:01:00.0")
                .unwrap(),
            "/sys/devices/pci0000:00/0000:00:01.0/0000:01:00.0"
        );
        assert_eq!(root.resolve_link("/abs").unwrap(), "/sys/devices/x");
        // A relative link inside a linked directory resolves from the real directory.
        fs::create_dir_all(dir.path().join("sys/bus/pci/drivers/nvidia")).unwrap();
        symlink(
            "../../../../bus/pci/drivers/nvidia",
            dir.path()
                .join("sys/devices/pci0000:00/0000:00:01.0/0000:01:00.0/driver"),
        )
        .unwrap();
        assert_eq!(
            root.resolve_link("/sys/bus/pci/devices/0000:01:00.0/driver")
                .unwrap(),
            "/sys/bus/pci/drivers/nvidia"
        );
        assert!(
            root.resolve_link("/sys/bus/pci/devices/0000:09:00.0")
                .unwrap_err()
                .is_not_found()
        );
        // Link loops end with an error, not a hang.
        symlink("loop", dir.path().join("loop")).unwrap();
        assert!(root.resolve_link("/loop").is_err());
    }
}
