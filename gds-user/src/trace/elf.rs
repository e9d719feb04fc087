//! What a uprobe needs from a shared library: the file offsets of exported functions, and its
//! USDT (SystemTap `stapsdt`) notes.
//!
//! Offsets are resolved once per library file here rather than by aya per attach (which parses
//! the file again for every symbol): libcufile is 4 MB and has a dozen traced functions.

use std::{collections::BTreeSet, path::Path};

use object::{Object, ObjectSection, ObjectSymbol};

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
    #[error("{path} is not an ELF shared object this build can read: {source}")]
    Parse {
        path: String,
        #[source]
        source: object::Error,
    },
}

/// Looks `wanted` up in the dynamic symbol table of the ELF file at `path` (versioned names
/// such as `pread64@@GLIBC_2.2.5` match their base name). Undefined symbols do not count.
pub fn symbols(path: &Path, wanted: &[&'static str]) -> Result<LibSymbols, ElfError> {
    let data = std::fs::read(path).map_err(|source| ElfError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse(&data, wanted).map_err(|source| ElfError::Parse {
        path: path.display().to_string(),
        source,
    })
}

fn parse(data: &[u8], wanted: &[&'static str]) -> Result<LibSymbols, object::Error> {
    let file = object::File::parse(data)?;
    let mut out = LibSymbols::default();
    for &name in wanted {
        let sym = file.dynamic_symbols().find(|s| {
            s.is_definition() && s.name().is_ok_and(|n| n.split('@').next() == Some(name))
        });
        let offset = sym.and_then(|s| {
            let section = file.section_by_index(s.section_index()?).ok()?;
            let (file_start, _) = section.file_range()?;
            s.address()
                .checked_sub(section.address())?
                .checked_add(file_start)
        });
        match offset {
            Some(o) => out.found.push((name, o)),
            None => out.missing.push(name),
        }
    }
    if let Some(notes) = file.section_by_name(".note.stapsdt")
        && let Ok(bytes) = notes.data()
    {
        for desc in stapsdt_descs(bytes) {
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
            while desc.len() % 4 != 0 {
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
