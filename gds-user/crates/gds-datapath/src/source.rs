//! What to read: a regular file, a block device, or an NVMe namespace (`/dev/ngXnY`, whose data
//! the bounce route reads through the matching block device `/dev/nvmeXnY` and the p2p route
//! through passthrough). O_DIRECT where the source allows it; the alignment it needs.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::error::{DatapathError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    File,
    BlockDevice,
    /// An NVMe generic char device (`/dev/ngXnY`).
    NvmeGeneric,
}

/// Whether to bypass the page cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Direct {
    /// O_DIRECT when the file system and the range allow it, buffered otherwise.
    Auto,
    /// O_DIRECT or an error.
    On,
    /// Buffered (page cache).
    Off,
}

/// An open source.
#[derive(Debug)]
pub struct Source {
    /// The path as given.
    pub path: PathBuf,
    /// What is actually read (for `/dev/ngXnY`: the block device `/dev/nvmeXnY` if present).
    pub data_path: PathBuf,
    pub kind: SourceKind,
    pub file: File,
    pub size: u64,
    /// Opened with O_DIRECT.
    pub direct: bool,
    /// Offsets, lengths and buffer addresses must be multiples of this (1 when buffered).
    pub align: u64,
    /// Why O_DIRECT is not used when it was allowed (`Direct::Auto`).
    pub note: Option<String>,
}

/// Default alignment for O_DIRECT on files when statx gives none.
const DEFAULT_DIO_ALIGN: u64 = 4096;

const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
const BLKSSZGET: libc::c_ulong = 0x1268;
const STATX_DIOALIGN: u32 = 0x2000;

/// `/dev/ngXnY` → `/dev/nvmeXnY`.
pub fn block_device_for_generic(path: &Path) -> Option<PathBuf> {
    let name = path.file_name()?.to_str()?;
    let rest = name.strip_prefix("ng")?;
    let (ctrl, ns) = rest.split_once('n')?;
    if ctrl.is_empty()
        || ns.is_empty()
        || !(ctrl.chars().chain(ns.chars())).all(|c| c.is_ascii_digit())
    {
        return None;
    }
    Some(path.with_file_name(format!("nvme{ctrl}n{ns}")))
}

fn open_flags(path: &Path, direct: bool) -> std::io::Result<File> {
    let mut o = OpenOptions::new();
    o.read(true);
    if direct {
        o.custom_flags(libc::O_DIRECT);
    }
    o.open(path)
}

fn open_err(path: &Path, source: std::io::Error) -> DatapathError {
    let hint = match source.raw_os_error() {
        Some(libc::EACCES) | Some(libc::EPERM) => {
            " (no read permission: run as root or grant read access)"
        }
        Some(libc::ENOENT) => " (no such file or device)",
        Some(libc::EINVAL) => " (this file system refuses O_DIRECT: use --direct off or auto)",
        _ => "",
    };
    DatapathError::Open {
        path: path.to_path_buf(),
        hint,
        source,
    }
}

fn ioctl_u64(file: &File, req: libc::c_ulong) -> std::io::Result<u64> {
    let mut v: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 to the pointer.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), req as _, &mut v as *mut u64) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(v)
}

fn ioctl_int(file: &File, req: libc::c_ulong) -> std::io::Result<u64> {
    let mut v: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int to the pointer.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), req as _, &mut v as *mut libc::c_int) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(v.max(1) as u64)
}

/// O_DIRECT offset alignment of a file from statx (Linux 6.1+), if the kernel reports one.
fn statx_dio_align(file: &File) -> Option<u64> {
    // SAFETY: zeroed statx is a valid out-parameter.
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    let empty = c"";
    // SAFETY: AT_EMPTY_PATH with a valid fd and an empty path; `st` is writable.
    let r = unsafe {
        libc::statx(
            file.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_EMPTY_PATH,
            STATX_DIOALIGN,
            &mut st,
        )
    };
    if r != 0 || st.stx_mask & STATX_DIOALIGN == 0 || st.stx_dio_offset_align == 0 {
        return None;
    }
    Some(u64::from(st.stx_dio_offset_align.max(st.stx_dio_mem_align)))
}

impl Source {
    /// Open `path` for reading with the requested O_DIRECT policy.
    pub fn open(path: impl AsRef<Path>, direct: Direct) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let meta = std::fs::metadata(&path).map_err(|e| open_err(&path, e))?;
        let ft = meta.file_type();
        let (kind, data_path) = if ft.is_char_device() {
            let Some(blk) = block_device_for_generic(&path) else {
                return Err(DatapathError::Invalid(format!(
                    "{}: a character device that is not an NVMe generic namespace (/dev/ngXnY)",
                    path.display()
                )));
            };
            (SourceKind::NvmeGeneric, blk)
        } else if ft.is_block_device() {
            (SourceKind::BlockDevice, path.clone())
        } else if ft.is_file() {
            (SourceKind::File, path.clone())
        } else {
            return Err(DatapathError::Invalid(format!(
                "{}: not a regular file, block device or NVMe namespace",
                path.display()
            )));
        };
        let want_direct = direct != Direct::Off;
        let mut note = None;
        let (file, is_direct) = match open_flags(&data_path, want_direct) {
            Ok(f) => (f, want_direct),
            Err(e) if direct == Direct::Auto && e.raw_os_error() == Some(libc::EINVAL) => {
                note = Some(format!(
                    "{} refuses O_DIRECT (EINVAL, e.g. tmpfs): reading through the page cache",
                    data_path.display()
                ));
                (
                    open_flags(&data_path, false).map_err(|e| open_err(&data_path, e))?,
                    false,
                )
            }
            Err(e) => return Err(open_err(&data_path, e)),
        };
        let (size, block) = match kind {
            SourceKind::File => (meta.len(), None),
            _ => {
                let size = ioctl_u64(&file, BLKGETSIZE64).map_err(|source| DatapathError::Io {
                    path: data_path.clone(),
                    what: "BLKGETSIZE64",
                    source,
                })?;
                let lbs = ioctl_int(&file, BLKSSZGET).map_err(|source| DatapathError::Io {
                    path: data_path.clone(),
                    what: "BLKSSZGET",
                    source,
                })?;
                (size, Some(lbs))
            }
        };
        let align = if is_direct {
            block
                .or_else(|| statx_dio_align(&file))
                .unwrap_or(DEFAULT_DIO_ALIGN)
                .max(1)
        } else {
            1
        };
        Ok(Source {
            path,
            data_path,
            kind,
            file,
            size,
            direct: is_direct,
            align,
            note,
        })
    }

    /// Validate and resolve `offset`/`size` (default: to the end) against this source.
    /// With O_DIRECT the offset must be aligned; under `Direct::Auto` an unaligned offset
    /// reopens the source buffered instead.
    pub fn range(&mut self, offset: u64, len: Option<u64>, direct: Direct) -> Result<ByteRange> {
        if offset > self.size {
            return Err(DatapathError::Range {
                path: self.path.clone(),
                offset,
                len: len.unwrap_or(0),
                size: self.size,
            });
        }
        let len = len.unwrap_or(self.size - offset);
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(DatapathError::Range {
                path: self.path.clone(),
                offset,
                len,
                size: self.size,
            });
        }
        if self.direct && !offset.is_multiple_of(self.align) {
            if direct == Direct::On {
                return Err(DatapathError::Alignment {
                    path: self.path.clone(),
                    what: "--offset",
                    value: offset,
                    align: self.align,
                });
            }
            self.file =
                open_flags(&self.data_path, false).map_err(|e| open_err(&self.data_path, e))?;
            self.note = Some(format!(
                "offset {offset} is not a multiple of {} bytes: reading through the page cache",
                self.align
            ));
            self.direct = false;
            self.align = 1;
        }
        Ok(ByteRange { offset, len })
    }

    /// A chunk size usable with this source: at least `align`, a multiple of it.
    pub fn chunk(&self, chunk: u64) -> u64 {
        chunk.max(self.align).div_ceil(self.align) * self.align
    }

    /// Read length for a piece of `want` bytes: rounded up to the alignment (O_DIRECT reads
    /// whole blocks; bytes past `want` are ignored).
    pub fn io_len(&self, want: u64) -> u64 {
        want.div_ceil(self.align) * self.align
    }
}

/// A validated byte range of a source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    pub offset: u64,
    pub len: u64,
}

impl ByteRange {
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }

    /// Pieces of at most `chunk` bytes: `(offset, len)`.
    pub fn chunks(&self, chunk: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        let chunk = chunk.max(1);
        (0..self.len.div_ceil(chunk)).map(move |i| {
            let off = self.offset + i * chunk;
            (off, chunk.min(self.end() - off))
        })
    }

    /// Split into `parts` contiguous sub-ranges whose boundaries are multiples of `chunk`
    /// from the start (fewer parts when the range is small).
    pub fn split(&self, parts: usize, chunk: u64) -> Vec<ByteRange> {
        let chunk = chunk.max(1);
        let n_chunks = self.len.div_ceil(chunk);
        let parts = (parts.max(1) as u64).min(n_chunks.max(1));
        let per = n_chunks.div_ceil(parts);
        let mut out = Vec::new();
        let mut off = self.offset;
        while off < self.end() {
            let len = (per * chunk).min(self.end() - off);
            out.push(ByteRange { offset: off, len });
            off += len;
        }
        if out.is_empty() {
            out.push(*self);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn generic_to_block() {
        assert_eq!(
            block_device_for_generic(Path::new("/dev/ng0n1")),
            Some(PathBuf::from("/dev/nvme0n1"))
        );
        assert_eq!(
            block_device_for_generic(Path::new("/dev/ng12n3")),
            Some(PathBuf::from("/dev/nvme12n3"))
        );
        assert_eq!(block_device_for_generic(Path::new("/dev/nvme0n1")), None);
        assert_eq!(block_device_for_generic(Path::new("/dev/ngxn1")), None);
    }

    #[test]
    fn chunks_and_split_cover_the_range_once() {
        let r = ByteRange {
            offset: 4096,
            len: 10 * 4096 + 17,
        };
        let c: Vec<_> = r.chunks(3 * 4096).collect();
        assert_eq!(c.first(), Some(&(4096, 3 * 4096)));
        assert_eq!(c.last(), Some(&(4096 + 9 * 4096, 4096 + 17)));
        assert_eq!(c.iter().map(|x| x.1).sum::<u64>(), r.len);
        for parts in 1..6 {
            let s = r.split(parts, 4096);
            assert!(s.len() <= parts);
            assert_eq!(s.iter().map(|p| p.len).sum::<u64>(), r.len);
            for w in s.windows(2) {
                assert_eq!(w[0].end(), w[1].offset);
                assert_eq!((w[0].offset - r.offset) % 4096, 0);
            }
        }
    }

    #[test]
    fn file_range_validation_and_direct_fallback() {
        // /var/tmp is a disk file system here (O_DIRECT works); tmpfs would refuse it.
        let mut f = tempfile::NamedTempFile::new_in("/var/tmp").unwrap();
        f.write_all(&vec![7u8; 3 * 4096]).unwrap();
        let mut s = Source::open(f.path(), Direct::Auto).unwrap();
        assert_eq!(s.kind, SourceKind::File);
        assert_eq!(s.size, 3 * 4096);
        assert!(matches!(
            s.range(4096, Some(3 * 4096), Direct::Auto),
            Err(DatapathError::Range { .. })
        ));
        if s.direct {
            assert!(s.align >= 512);
            assert!(matches!(
                s.range(100, Some(10), Direct::On),
                Err(DatapathError::Alignment { .. })
            ));
            // Auto falls back to buffered for an unaligned offset, and says so.
            let r = s.range(100, Some(10), Direct::Auto).unwrap();
            assert_eq!((r.offset, r.len), (100, 10));
            assert!(!s.direct && s.align == 1 && s.note.is_some());
        }
        let r = s.range(0, None, Direct::Auto).unwrap();
        assert_eq!(r.len, 3 * 4096);
    }
}
