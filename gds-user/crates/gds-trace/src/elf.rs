//! What a uprobe needs from a shared library: the file offsets of exported functions, and its
//! USDT (SystemTap `stapsdt`) notes.
//!
//! Offsets are resolved once per library file here rather than by aya per attach (which parses
//! the file again for every symbol): libcufile is 4 MB and has a dozen traced functions.
//!
//! The files come from other users' processes (any process can map a file named
//! `libcufile.so.0` or `ld-linux-x86-64.so.2`), so reading one is bounded whatever it holds:
//! only a regular file is opened (a device or FIFO could block or have side effects), its size
//! and ELF magic are checked before anything else is read, and then only the ELF header, the
//! section headers, the dynamic symbol table, its strings and the `stapsdt` notes are read by
//! offset, each under a size cap. An 8 GiB sparse `libcufile.so.0` took the agent to 8.4 GB
//! RSS when the whole file was read.

use std::{
    collections::BTreeSet,
    fs::File,
    io::Read,
    os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt},
    path::Path,
};

use object::{
    Endianness, elf,
    read::{
        ReadCache,
        elf::{FileHeader, SectionHeader, Sym},
    },
};

/// Largest library file read. The largest NVIDIA user-space library a cuFile process maps is
/// libcuda (~100 MB); libcufile is 4–8 MB, glibc's libc 2 MB, its loader 0.2 MB.
pub const FILE_MAX: u64 = 512 << 20;
/// Largest section read (dynamic symbols, their strings, USDT notes): libcufile's are 0.1 MB
/// each, libc's 0.1 MB; 64× that still bounds what a forged file can make the agent hold.
pub const SECTION_MAX: u64 = 4 << 20;
/// Most section headers accepted (libcufile has 40, libc 70).
pub const SECTIONS_MAX: u32 = 4096;

/// Exported functions found in one file, and its USDT probes.
#[derive(Debug, Clone, Default)]
pub struct LibSymbols {
    /// `(name, file offset)` of each wanted symbol found, in the order asked.
    pub found: Vec<(&'static str, u64)>,
    /// Wanted symbols the file does not export.
    pub missing: Vec<&'static str>,
    /// USDT notes (`.note.stapsdt`) and their providers.
    pub usdt_notes: usize,
    pub usdt_providers: BTreeSet<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a regular file: not read")]
    NotRegular { path: String },
    #[error("{path} is {size} bytes, over the {max}-byte limit for a library: not read")]
    TooLarge { path: String, size: u64, max: u64 },
    #[error("{path} is not a 64-bit little-endian ELF file (no ELF magic): not read")]
    NotElf { path: String },
    #[error("{path}: its {what} is {size} bytes, over the {max}-byte limit: not read")]
    SectionTooLarge {
        path: String,
        what: &'static str,
        size: u64,
        max: u64,
    },
    #[error("{path} is not an ELF shared object this build can read: {source}")]
    Parse {
        path: String,
        #[source]
        source: object::Error,
    },
}

/// Opens the library at `path` (normally `/proc/PID/map_files/…`) if it is a regular file of at
/// most [`FILE_MAX`] bytes, without following it onto a device or FIFO: `stat` first, then
/// open non-blocking, then check that the opened file is the one stat saw.
pub fn open(path: &Path) -> Result<File, ElfError> {
    let name = || path.display().to_string();
    let read_err = |source| ElfError::Read {
        path: name(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(read_err)?;
    if !meta.file_type().is_file() {
        return Err(ElfError::NotRegular { path: name() });
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(read_err)?;
    let opened = file.metadata().map_err(read_err)?;
    if !opened.file_type().is_file() || (opened.dev(), opened.ino()) != (meta.dev(), meta.ino()) {
        return Err(ElfError::NotRegular { path: name() });
    }
    Ok(file)
}

/// Looks `wanted` up in the dynamic symbol table of the ELF file at `path` (see [`open`] and
/// [`read_symbols`]).
#[cfg(test)]
pub fn symbols(path: &Path, wanted: &[&'static str]) -> Result<LibSymbols, ElfError> {
    read_symbols(&open(path)?, &path.display().to_string(), wanted)
}

/// Looks `wanted` up in the dynamic symbol table of `file` (versioned names such as
/// `pread64@@GLIBC_2.2.5` match their base name). Undefined symbols do not count, nor symbols
/// outside an executable section: a uprobe goes only on code. Reads by offset, each piece
/// under its cap (see the module documentation).
pub fn read_symbols(
    file: &File,
    name: &str,
    wanted: &[&'static str],
) -> Result<LibSymbols, ElfError> {
    let path = || name.to_owned();
    let read_err = |source| ElfError::Read {
        path: path(),
        source,
    };
    let size = file.metadata().map_err(read_err)?.len();
    if size > FILE_MAX {
        return Err(ElfError::TooLarge {
            path: path(),
            size,
            max: FILE_MAX,
        });
    }
    let mut ident = [0u8; 6];
    if file.read_exact_at(&mut ident, 0).is_err()
        || ident[..4] != elf::ELFMAG
        || ident[4] != elf::ELFCLASS64
        || ident[5] != elf::ELFDATA2LSB
    {
        return Err(ElfError::NotElf { path: path() });
    }
    let parse_err = |source| ElfError::Parse {
        path: path(),
        source,
    };
    let too_large = |what, size| ElfError::SectionTooLarge {
        path: path(),
        what,
        size,
        max: SECTION_MAX,
    };
    let cache = ReadCache::new(Positioned { file, at: 0 });
    let data = &cache;
    let header = elf::FileHeader64::<Endianness>::parse(data).map_err(parse_err)?;
    let endian = header.endian().map_err(parse_err)?;
    let shnum = header.shnum(endian, data).map_err(parse_err)?;
    if shnum > SECTIONS_MAX as usize {
        return Err(too_large("section header table", shnum as u64 * 64));
    }
    let sections = header.sections(endian, data).map_err(parse_err)?;
    let mut out = LibSymbols::default();
    // The dynamic symbols and their strings, each read whole (under the cap) by offset.
    let read_section = |what, s: &elf::SectionHeader64<Endianness>| {
        let len = s.sh_size(endian);
        if len > SECTION_MAX {
            return Err(too_large(what, len));
        }
        let mut bytes = vec![0u8; len as usize];
        file.read_exact_at(&mut bytes, s.sh_offset(endian))
            .map_err(read_err)?;
        Ok(bytes)
    };
    let (syms, strs) = match sections
        .iter()
        .find(|s| s.sh_type(endian) == elf::SHT_DYNSYM)
    {
        Some(s) => {
            let strings = sections
                .section(object::SectionIndex(s.sh_link(endian) as usize))
                .map_err(parse_err)?;
            (
                read_section("dynamic symbol table", s)?,
                read_section("dynamic string table", strings)?,
            )
        }
        None => (Vec::new(), Vec::new()),
    };
    // Endian-wrapped fields are byte arrays: any alignment; a trailing partial entry is ignored.
    let (symbols, _) =
        object::pod::slice_from_bytes::<elf::Sym64<Endianness>>(&syms, syms.len() / 24)
            .unwrap_or((&[], &[]));
    let strings = object::read::StringTable::new(&strs[..], 0, strs.len() as u64);
    for &want in wanted {
        let offset = symbols.iter().find_map(|sym| {
            if sym.st_shndx(endian) == elf::SHN_UNDEF {
                return None;
            }
            let n = sym.name(endian, strings).ok()?;
            if n.split(|&b| b == b'@').next() != Some(want.as_bytes()) {
                return None;
            }
            let section = sections
                .section(object::SectionIndex(sym.st_shndx(endian) as usize))
                .ok()?;
            if section.sh_flags(endian) & u64::from(elf::SHF_EXECINSTR) == 0 {
                return None;
            }
            let (addr, value) = (section.sh_addr(endian), sym.st_value(endian));
            if value < addr || value - addr >= section.sh_size(endian) {
                return None;
            }
            (value - addr).checked_add(section.sh_offset(endian))
        });
        match offset {
            Some(o) if o < size => out.found.push((want, o)),
            _ => out.missing.push(want),
        }
    }
    // Notes only counted: a note section over the cap is skipped, not an error.
    if let Some((_, notes)) = sections.section_by_name(endian, b".note.stapsdt")
        && let Ok(bytes) = read_section("USDT note section", notes)
    {
        for desc in stapsdt_descs(&bytes) {
            out.usdt_notes += 1;
            // desc: pc, base, semaphore (3 × u64), then "provider\0name\0args\0".
            if let Some(provider) = desc
                .get(24..)
                .and_then(|s| s.split(|&b| b == 0).next())
                .and_then(|p| std::str::from_utf8(p).ok())
            {
                out.usdt_providers.insert(provider.to_owned());
            }
        }
    }
    Ok(out)
}

/// `Read + Seek` by positioned reads on a shared `&File` (the cache asks for ranges).
struct Positioned<'a> {
    file: &'a File,
    at: u64,
}

impl Read for Positioned<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.file.read_at(buf, self.at)?;
        self.at += n as u64;
        Ok(n)
    }
}

impl std::io::Seek for Positioned<'_> {
    fn seek(&mut self, pos: std::io::SeekFrom) -> std::io::Result<u64> {
        let len = || self.file.metadata().map(|m| m.len());
        let to = match pos {
            std::io::SeekFrom::Start(o) => Some(o),
            std::io::SeekFrom::End(d) => len()?.checked_add_signed(d),
            std::io::SeekFrom::Current(d) => self.at.checked_add_signed(d),
        };
        self.at = to.ok_or_else(|| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        Ok(self.at)
    }
}

/// The descriptors of the `stapsdt` notes (type 3) in a note section (little endian).
fn stapsdt_descs(mut bytes: &[u8]) -> Vec<&[u8]> {
    let align4 = |n: usize| (n + 3) & !3;
    let mut out = Vec::new();
    while bytes.len() >= 12 {
        let word = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().unwrap()) as usize;
        let (namesz, descsz, kind) = (word(0), word(4), word(8));
        let name_end = 12 + align4(namesz);
        let desc_end = name_end + align4(descsz);
        if desc_end > bytes.len() {
            break;
        }
        if kind == 3 && bytes.get(12..12 + namesz) == Some(b"stapsdt\0") {
            out.push(&bytes[name_end..name_end + descsz]);
        }
        bytes = &bytes[desc_end..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// libc of the machine running the tests: its `getpid` is found at a sane offset and a
    /// made-up name is reported missing.
    #[test]
    fn finds_libc_symbols_and_reports_missing() {
        let libc = ["/lib/x86_64-linux-gnu/libc.so.6", "/usr/lib64/libc.so.6"]
            .into_iter()
            .map(Path::new)
            .find(|p| p.exists())
            .expect("a glibc on the test machine");
        let s = symbols(libc, &["pread64", "no_such_function_gds"]).unwrap();
        assert_eq!(s.missing, ["no_such_function_gds"]);
        let (name, off) = s.found[0];
        assert_eq!(name, "pread64");
        let len = std::fs::metadata(libc).unwrap().len();
        assert!(
            off > 0 && off < len,
            "offset {off:#x} outside the file ({len} bytes)"
        );
    }

    /// A sparse file over the cap is refused from its size alone: nothing of it is read.
    #[test]
    fn huge_file_is_refused_by_size() {
        let dir = std::env::temp_dir().join(format!("gds-elf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("libcufile.so.0");
        let f = File::create(&path).unwrap();
        f.write_all_at(&elf::ELFMAG, 0).unwrap();
        f.set_len(8 << 30).unwrap();
        let e = symbols(&path, &["cuFileRead"]).unwrap_err();
        assert!(
            matches!(e, ElfError::TooLarge { size, .. } if size == 8 << 30),
            "{e}"
        );
        // Not ELF: refused after reading 6 bytes.
        std::fs::write(&path, b"#!/bin/sh\necho hi\n").unwrap();
        let e = symbols(&path, &["cuFileRead"]).unwrap_err();
        assert!(matches!(e, ElfError::NotElf { .. }), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A FIFO named like a library is not opened (opening it would block until a writer
    /// came), nor is a device.
    #[test]
    fn fifo_and_device_are_not_opened() {
        let dir = std::env::temp_dir().join(format!("gds-elf-fifo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("ld-linux-x86-64.so.2");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = symbols(&fifo, &["_dl_debug_state"]).unwrap_err();
        assert!(matches!(e, ElfError::NotRegular { .. }), "{e}");
        let e = symbols(Path::new("/dev/zero"), &["x"]).unwrap_err();
        assert!(matches!(e, ElfError::NotRegular { .. }), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A forged dynamic symbol table larger than the cap is refused, not read.
    #[test]
    fn oversized_symbol_table_is_refused() {
        let libc = ["/lib/x86_64-linux-gnu/libc.so.6", "/usr/lib64/libc.so.6"]
            .into_iter()
            .map(Path::new)
            .find(|p| p.exists())
            .expect("a glibc on the test machine");
        let mut bytes = std::fs::read(libc).unwrap();
        let e = Endianness::Little;
        let header = elf::FileHeader64::<Endianness>::parse(&bytes[..]).unwrap();
        let shoff = header.e_shoff(e) as usize;
        let shnum = header.e_shnum(e) as usize;
        let mut patched = false;
        for i in 0..shnum {
            let at = shoff + i * 64;
            if u32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap()) == elf::SHT_DYNSYM {
                // sh_size at +32.
                bytes[at + 32..at + 40].copy_from_slice(&(1u64 << 40).to_le_bytes());
                patched = true;
            }
        }
        assert!(patched);
        let dir = std::env::temp_dir().join(format!("gds-elf-big-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("libcufile.so.0");
        std::fs::write(&path, &bytes).unwrap();
        let err = symbols(&path, &["pread64"]).unwrap_err();
        assert!(matches!(err, ElfError::SectionTooLarge { .. }), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn stapsdt_notes_are_split() {
        let mut sec = Vec::new();
        for provider in ["cufio", "cufio-px"] {
            let mut desc = vec![0u8; 24];
            desc.extend_from_slice(provider.as_bytes());
            desc.extend_from_slice(b"\0probe\0-4@%edi\0");
            sec.extend_from_slice(&8u32.to_le_bytes());
            sec.extend_from_slice(&(desc.len() as u32).to_le_bytes());
            sec.extend_from_slice(&3u32.to_le_bytes());
            sec.extend_from_slice(b"stapsdt\0");
            while !desc.len().is_multiple_of(4) {
                desc.push(0);
            }
            sec.extend_from_slice(&desc);
        }
        let descs = stapsdt_descs(&sec);
        assert_eq!(descs.len(), 2);
        assert!(descs[1][24..].starts_with(b"cufio-px\0"));
        // Truncated input stops cleanly.
        assert_eq!(stapsdt_descs(&sec[..sec.len() - 3]).len(), 1);
    }
}
