//! `--verify`: every byte checked. The source range is hashed (xxh3-64, per block) through an
//! independent path (plain `pread` of the page-cache view, not the route under test) and
//! compared with the same hashes of the bytes brought back: host memory as the pieces land,
//! GPU memory copied back to the host block by block, peer memory read through its mapping.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Mutex;

use xxhash_rust::xxh3::xxh3_64;

use super::cuda::DeviceBuffer;
use super::error::{DatapathError, Result};
use super::source::ByteRange;

/// Hashes of consecutive blocks of a range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeDigest {
    pub range: ByteRange,
    pub block: u64,
    pub blocks: Vec<u64>,
}

impl RangeDigest {
    pub fn empty(range: ByteRange, block: u64) -> Self {
        let n = range.len.div_ceil(block.max(1)) as usize;
        RangeDigest {
            range,
            block: block.max(1),
            blocks: vec![0; n],
        }
    }

    /// xxh3 over the block hashes: one number for the whole range.
    pub fn digest(&self) -> u64 {
        let bytes: Vec<u8> = self.blocks.iter().flat_map(|h| h.to_le_bytes()).collect();
        xxh3_64(&bytes)
    }

    /// `Ok` when equal, else the first differing block.
    pub fn compare(&self, got: &RangeDigest, path: &Path) -> Result<()> {
        assert_eq!(
            (self.range, self.block),
            (got.range, got.block),
            "digests of different layouts"
        );
        for (i, (a, b)) in self.blocks.iter().zip(&got.blocks).enumerate() {
            if a != b {
                let offset = self.range.offset + i as u64 * self.block;
                return Err(DatapathError::Verify {
                    path: path.to_path_buf(),
                    offset,
                    end: (offset + self.block).min(self.range.end()),
                    expected: *a,
                    actual: *b,
                });
            }
        }
        Ok(())
    }
}

/// Collects block hashes from pieces that arrive in any order (pieces are block-aligned
/// relative to the range start and at most one block long).
pub struct DigestSink {
    inner: Mutex<RangeDigest>,
}

impl DigestSink {
    pub fn new(range: ByteRange, block: u64) -> Self {
        DigestSink {
            inner: Mutex::new(RangeDigest::empty(range, block)),
        }
    }

    pub fn add(&self, offset: u64, data: &[u8]) {
        let h = xxh3_64(data);
        let mut d = self.inner.lock().unwrap();
        let i = ((offset - d.range.offset) / d.block) as usize;
        debug_assert_eq!((offset - d.range.offset) % d.block, 0);
        d.blocks[i] = h;
    }

    pub fn finish(self) -> RangeDigest {
        self.inner.into_inner().unwrap()
    }
}

/// Hash the source range with plain preads (the reference).
pub fn hash_file(
    file: &std::fs::File,
    range: ByteRange,
    block: u64,
    path: &Path,
) -> Result<RangeDigest> {
    let mut d = RangeDigest::empty(range, block);
    let mut buf = vec![0u8; block as usize];
    for (i, (off, len)) in range.chunks(block).enumerate() {
        let b = &mut buf[..len as usize];
        file.read_exact_at(b, off)
            .map_err(|source| DatapathError::Io {
                path: path.to_path_buf(),
                what: "verify: pread of the source",
                source,
            })?;
        d.blocks[i] = xxh3_64(b);
    }
    Ok(d)
}

/// Hash what landed in GPU memory: `dst[0..range.len]` holds the range.
pub fn hash_device(dst: &DeviceBuffer, range: ByteRange, block: u64) -> Result<RangeDigest> {
    let mut d = RangeDigest::empty(range, block);
    let mut host = if let Ok(p) = dst.gpu().pinned(block as usize) {
        HostBuf::Pinned(p)
    } else {
        HostBuf::Vec(vec![0; block as usize])
    };
    for (i, (off, len)) in range.chunks(block).enumerate() {
        let b = &mut host.as_mut()[..len as usize];
        dst.copy_to_host((off - range.offset) as usize, b)?;
        d.blocks[i] = xxh3_64(b);
    }
    Ok(d)
}

enum HostBuf {
    Pinned(super::cuda::PinnedBuffer),
    Vec(Vec<u8>),
}

impl HostBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        match self {
            HostBuf::Pinned(p) => p.as_mut_slice(),
            HostBuf::Vec(v) => v,
        }
    }
}

/// Hash memory the process can read (host memory or a peer BAR mapping).
pub fn hash_memory(mem: &[u8], range: ByteRange, block: u64) -> RangeDigest {
    let mut d = RangeDigest::empty(range, block);
    let mut tmp = vec![0u8; block as usize];
    for (i, (off, len)) in range.chunks(block).enumerate() {
        let start = (off - range.offset) as usize;
        let src = &mem[start..start + len as usize];
        // Copy with volatile-free memcpy first: device memory is read once, linearly.
        tmp[..len as usize].copy_from_slice(src);
        d.blocks[i] = xxh3_64(&tmp[..len as usize]);
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn file_hash_matches_pieces_in_any_order_and_finds_a_flipped_byte() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&data).unwrap();
        let range = ByteRange {
            offset: 4096,
            len: 90_000,
        };
        let reference = hash_file(f.as_file(), range, 8192, f.path()).unwrap();
        let sink = DigestSink::new(range, 8192);
        let mut pieces: Vec<_> = range.chunks(8192).collect();
        pieces.reverse();
        for (off, len) in &pieces {
            sink.add(*off, &data[*off as usize..(*off + *len) as usize]);
        }
        let got = sink.finish();
        reference.compare(&got, f.path()).unwrap();
        assert_eq!(reference.digest(), got.digest());
        assert_eq!(
            hash_memory(&data[4096..4096 + 90_000], range, 8192),
            reference
        );

        let mut bad = data.clone();
        bad[4096 + 5 * 8192 + 3] ^= 1;
        let got = hash_memory(&bad[4096..4096 + 90_000], range, 8192);
        match reference.compare(&got, f.path()) {
            Err(DatapathError::Verify { offset, end, .. }) => {
                assert_eq!(offset, 4096 + 5 * 8192);
                assert_eq!(end, 4096 + 6 * 8192);
            }
            other => panic!("expected a verify error, got {other:?}"),
        }
        assert_ne!(reference.digest(), got.digest());
    }
}
