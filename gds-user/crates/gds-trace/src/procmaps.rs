//! Which processes map which library file, from `/proc/PID/maps`.
//!
//! A library is identified by its file (device and inode), not its path: one copy mapped by
//! many processes is attached once; the same path in two containers may be two files; a file
//! replaced on disk is a new inode while processes still map the old one. The kernel can
//! reach any of them through `/proc/PID/map_files/START-END`, a link to the mapped file itself
//! that works across mount namespaces (containers, private mounts) and for deleted files.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

/// A mapped file: `(device as in maps "maj:min" → maj << 20 | min, inode)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
}

/// One library mapped by one process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    pub file: FileId,
    /// The path as the process sees it (in its mount namespace), " (deleted)" removed.
    pub path: String,
    pub deleted: bool,
    /// `/proc/PID/map_files/START-END` of its first mapping: how the kernel reaches the file.
    pub via: PathBuf,
}

/// What one line of `/proc/PID/maps` maps, if it is a file whose name `matches`.
fn parse_line(pid: u32, line: &str, matches: &dyn Fn(&str) -> bool) -> Option<Mapping> {
    let mut f = line.splitn(6, ' ');
    let range = f.next()?;
    let _perms = f.next()?;
    let _offset = f.next()?;
    let dev = f.next()?;
    let ino: u64 = f.next()?.parse().ok()?;
    let path = f.next()?.trim_start();
    if ino == 0 || !path.starts_with('/') {
        return None;
    }
    let (path, deleted) = match path.strip_suffix(" (deleted)") {
        Some(p) => (p, true),
        None => (path, false),
    };
    let name = path.rsplit('/').next()?;
    if !matches(name) {
        return None;
    }
    let (maj, min) = dev.split_once(':')?;
    let dev = (u64::from_str_radix(maj, 16).ok()? << 20) | u64::from_str_radix(min, 16).ok()?;
    Some(Mapping {
        file: FileId { dev, ino },
        path: path.to_owned(),
        deleted,
        via: PathBuf::from(format!("/proc/{pid}/map_files/{range}")),
    })
}

/// The distinct files whose name `matches` in one process's maps text.
#[cfg(test)]
pub fn parse(pid: u32, maps: &str, matches: &dyn Fn(&str) -> bool) -> Vec<Mapping> {
    let mut out: Vec<Mapping> = Vec::new();
    for m in maps.lines().filter_map(|l| parse_line(pid, l, matches)) {
        if !out.iter().any(|o| o.file == m.file) {
            out.push(m);
        }
    }
    out
}

/// libcufile (`libcufile.so`, `.so.0`, `.so.1.15.1`), not its RDMA plugin.
pub fn is_libcufile(name: &str) -> bool {
    name.starts_with("libcufile.so")
}

/// glibc's libc (`libc.so.6`; `libc-2.31.so` on older distributions).
pub fn is_libc(name: &str) -> bool {
    name == "libc.so.6" || (name.starts_with("libc-") && name.ends_with(".so"))
}

/// The dynamic loader (`ld-linux-x86-64.so.2`, `ld-linux-aarch64.so.1`, musl's `ld-musl-*`).
pub fn is_loader(name: &str) -> bool {
    name.starts_with("ld-linux") || name.starts_with("ld-musl")
}

/// What one read of `/proc` found.
#[derive(Debug, Default)]
pub struct Scan {
    /// Processes that map libcufile: its files, and their libc.
    pub users: BTreeMap<u32, (Vec<Mapping>, Vec<Mapping>)>,
    /// Every dynamic loader file mapped by any process read.
    pub loaders: BTreeMap<FileId, Mapping>,
    /// Processes whose maps were longer than [`MAPS_MAX`]: read in part.
    pub truncated: Vec<u32>,
}

/// Most bytes of one process's maps read. A process can have 65,530 mappings (the kernel's
/// `vm.max_map_count`) of files with 4 KiB names, 268 MB of text; a Python process with CUDA
/// and PyTorch has ~5,000 lines (0.6 MB). What lies beyond is not seen (counted in
/// [`Scan::truncated`]).
pub const MAPS_MAX: u64 = 8 << 20;

/// Reads the maps of `pids`, or of every process under `proc` (normally `/proc`), line by line
/// (the text is never held whole). Processes that vanish while being read are skipped.
/// Hand-written rather than procfs's `Process::maps`: that reads the whole file, of a size any
/// process chooses, into one `Vec`, where this stops at [`MAPS_MAX`] and says so (issue 21).
pub fn scan(proc: &Path, pids: Option<&[u32]>) -> Scan {
    use std::io::{BufRead, Read};
    let mut out = Scan::default();
    let all: Vec<u32> = match pids {
        Some(p) => p.to_vec(),
        None => match std::fs::read_dir(proc) {
            Ok(dir) => dir
                .flatten()
                .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
                .collect(),
            Err(_) => return out,
        },
    };
    let mut line = String::new();
    for pid in all {
        let Ok(f) = std::fs::File::open(proc.join(pid.to_string()).join("maps")) else {
            continue;
        };
        let mut r = std::io::BufReader::with_capacity(64 << 10, f.take(MAPS_MAX));
        let (mut libs, mut libcs): (Vec<Mapping>, Vec<Mapping>) = (Vec::new(), Vec::new());
        let mut read = 0u64;
        loop {
            line.clear();
            match r.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(n) => read += n as u64,
            }
            let l = line.trim_end_matches('\n');
            // Most lines are none of these: the name test first, on the last path element.
            let name = l.rsplit('/').next().unwrap_or("");
            let name = name.strip_suffix(" (deleted)").unwrap_or(name);
            let into = if is_libcufile(name) {
                &mut libs
            } else if is_libc(name) {
                &mut libcs
            } else if is_loader(name) {
                if let Some(m) = parse_line(pid, l, &is_loader) {
                    out.loaders.entry(m.file).or_insert(m);
                }
                continue;
            } else {
                continue;
            };
            if let Some(m) = parse_line(pid, l, &|_| true)
                && !into.iter().any(|o| o.file == m.file)
            {
                into.push(m);
            }
        }
        if read >= MAPS_MAX {
            out.truncated.push(pid);
        }
        if !libs.is_empty() {
            out.users.insert(pid, (libs, libcs));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: &str = "\
55d0c0a00000-55d0c0a01000 r--p 00000000 fd:01 1234 /usr/bin/python3.12
7f10a0000000-7f10a0020000 r--p 00000000 fd:01 5555 /opt/venv/nvidia/cu13/lib/libcufile.so.0
7f10a0020000-7f10a0300000 r-xp 00020000 fd:01 5555 /opt/venv/nvidia/cu13/lib/libcufile.so.0
7f10a1000000-7f10a1100000 r-xp 00000000 fd:01 5556 /opt/venv/nvidia/cu13/lib/libcufile_rdma.so.1
7f10a2000000-7f10a2200000 r-xp 00000000 00:2a 77 /tmp/x/libcufile.so.1.15.1 (deleted)
7f10a3000000-7f10a3200000 r-xp 00000000 103:02 4242 /usr/lib/x86_64-linux-gnu/libc.so.6
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]
";

    /// `scan` over a directory laid out like /proc: users with their libc, loaders, and a
    /// process whose maps are cut at the limit.
    #[test]
    fn scan_reads_users_loaders_and_cuts_long_maps() {
        let root = std::env::temp_dir().join(format!("gds-procmaps-{}", std::process::id()));
        for (pid, text) in [
            ("42", MAPS.to_owned()),
            (
                "43",
                "7f00-7f01 r-xp 00000000 fd:01 9 /lib64/ld-linux-x86-64.so.2\n".to_owned(),
            ),
        ] {
            std::fs::create_dir_all(root.join(pid)).unwrap();
            std::fs::write(root.join(pid).join("maps"), text).unwrap();
        }
        std::fs::create_dir_all(root.join("44")).unwrap();
        let filler =
            "7f00-7f01 r-xp 00000000 fd:01 1 /usr/lib/x.so\n".repeat((MAPS_MAX as usize) / 40 + 1);
        std::fs::write(
            root.join("44").join("maps"),
            filler + "7f10-7f11 r-xp 00000000 fd:01 5555 /x/libcufile.so.0\n",
        )
        .unwrap();
        let s = scan(&root, None);
        assert_eq!(s.users.keys().copied().collect::<Vec<_>>(), [42]);
        assert_eq!(s.users[&42].0.len(), 2);
        assert_eq!(s.users[&42].1.len(), 1);
        assert_eq!(s.loaders.len(), 1);
        assert_eq!(s.truncated, [44]);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn maps_lines_give_files_once_with_their_link() {
        let libs = parse(42, MAPS, &is_libcufile);
        assert_eq!(libs.len(), 2, "{libs:?}");
        assert_eq!(
            libs[0].file,
            FileId {
                dev: (0xfd << 20) | 1,
                ino: 5555
            }
        );
        assert_eq!(
            libs[0].via,
            Path::new("/proc/42/map_files/7f10a0000000-7f10a0020000")
        );
        assert!(!libs[0].deleted);
        assert_eq!(libs[1].path, "/tmp/x/libcufile.so.1.15.1");
        assert!(libs[1].deleted);
        let libc = parse(42, MAPS, &is_libc);
        assert_eq!(libc.len(), 1);
        assert_eq!(libc[0].file.dev, (0x103 << 20) | 2);
    }
}
