//! The p2p route: NVMe passthrough reads (IORING_OP_URING_CMD on `/dev/ngXnY`) whose data
//! buffer is device memory of a peer PCI function mapped into the process, so the NVMe
//! controller DMAs straight into the peer's BAR. The peer here is PCI p2pmem published by the
//! kernel (CONFIG_PCI_P2PDMA: an NVMe controller memory buffer, or any p2pmem provider);
//! `mmap` of `/sys/bus/pci/devices/<bdf>/p2pmem/allocate` (Linux 6.2+) hands out such memory.
//! A GPU's BAR1 becomes such a peer only through a driver that maps it to user space
//! (GDRCopy's gdrdrv); see `route` for the typed error when that is missing.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::bounce::{Progress, Stats};
use super::error::{DatapathError, Result};
use super::source::ByteRange;
use gds_nvme::{NvmeReadCmd, NvmeRing, NvmeUringCmd, UringCmdOp, namespace_geometry};

/// A published p2pmem provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provider {
    /// `/sys/bus/pci/devices/<bdf>/p2pmem`
    pub dir: PathBuf,
    pub pci: String,
    pub size: u64,
    pub available: u64,
    pub published: bool,
}

fn read_u64(p: &Path) -> Option<u64> {
    std::fs::read_to_string(p).ok()?.trim().parse().ok()
}

/// p2pmem providers under `sysfs_pci` (normally `/sys/bus/pci/devices`).
pub fn providers(sysfs_pci: &Path) -> Vec<Provider> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(sysfs_pci) else {
        return out;
    };
    for e in rd.flatten() {
        let dir = e.path().join("p2pmem");
        if !dir.is_dir() {
            continue;
        }
        out.push(Provider {
            pci: e.file_name().to_string_lossy().into_owned(),
            size: read_u64(&dir.join("size")).unwrap_or(0),
            available: read_u64(&dir.join("available")).unwrap_or(0),
            published: read_u64(&dir.join("published")) == Some(1),
            dir,
        });
    }
    out.sort_by(|a, b| a.pci.cmp(&b.pci));
    out
}

/// Peer device memory mapped into the process.
pub struct P2pMem {
    ptr: *mut u8,
    len: usize,
    pub path: PathBuf,
}

// SAFETY: an owned mapping.
unsafe impl Send for P2pMem {}
unsafe impl Sync for P2pMem {}

impl P2pMem {
    /// Map `len` bytes from the provider (`dir` = `.../p2pmem` or `.../p2pmem/allocate`).
    pub fn map(dir: &Path, len: usize) -> Result<Self> {
        let path = if dir.ends_with("allocate") {
            dir.to_path_buf()
        } else {
            dir.join("allocate")
        };
        let e = |what: String| DatapathError::P2pMem {
            path: path.clone(),
            what,
        };
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|err| {
                e(format!(
                    "open: {err} (needs CONFIG_PCI_P2PDMA, Linux 6.2+, a published provider, root)"
                ))
            })?;
        let len = len.div_ceil(4096).max(1) * 4096;
        // SAFETY: a fresh shared mapping of the allocate file; checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(e(format!(
                "mmap of {len} bytes: {} (is that much p2pmem available?)",
                std::io::Error::last_os_error()
            )));
        }
        Ok(P2pMem {
            ptr: p.cast(),
            len,
            path,
        })
    }

    pub fn as_mut_ptr(&self) -> *mut u8 {
        self.ptr
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The mapping as bytes (CPU reads of peer memory: slow, for verification).
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: mapped for len bytes while self lives.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    pub fn fill(&self, byte: u8) {
        // SAFETY: as above; writable mapping.
        unsafe { std::ptr::write_bytes(self.ptr, byte, self.len) }
    }
}

impl Drop for P2pMem {
    fn drop(&mut self) {
        // SAFETY: our mapping.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Read `range` (bytes, LBA-aligned) of the namespace `device` (`/dev/ngXnY`) into `dst`
/// (`dst[0]` = `range.offset`) with `qd` passthrough commands of `chunk` bytes in flight.
pub fn run(
    device: &Path,
    range: ByteRange,
    chunk: u64,
    qd: u32,
    dst: &P2pMem,
    progress: &Progress,
) -> Result<Stats> {
    let g = namespace_geometry(device)?;
    let lba = u64::from(g.lba_size);
    if !range.offset.is_multiple_of(lba) || !range.len.is_multiple_of(lba) {
        return Err(DatapathError::Alignment {
            path: device.to_path_buf(),
            what: "--offset and --size (passthrough reads whole logical blocks)",
            value: if !range.offset.is_multiple_of(lba) {
                range.offset
            } else {
                range.len
            },
            align: lba,
        });
    }
    if range.len as usize > dst.len() {
        return Err(DatapathError::P2pMem {
            path: dst.path.clone(),
            what: format!(
                "mapping of {} bytes cannot hold {} bytes",
                dst.len(),
                range.len
            ),
        });
    }
    let max_cmd = u64::from(g.max_blocks_per_command()) * lba;
    let chunk = chunk.clamp(lba, max_cmd.max(lba)) / lba * lba;
    let pieces: Vec<(u64, u64)> = range.chunks(chunk).collect();
    let qd = (qd.max(1) as usize).min(pieces.len().max(1));
    let mut ring = NvmeRing::open(device, qd as u32)?;
    let mut next = 0usize;
    let mut in_flight: Vec<Option<(NvmeUringCmd, Instant, u64)>> = vec![None; pieces.len()];
    let mut outstanding = 0usize;
    let mut st = Stats::default();
    let start = Instant::now();
    let mut done = Vec::new();
    let mut first_err = None;
    loop {
        while first_err.is_none() && outstanding < qd && next < pieces.len() {
            let (off, len) = pieces[next];
            let ptr = unsafe { dst.as_mut_ptr().add((off - range.offset) as usize) };
            let cmd = NvmeReadCmd::new(g.nsid, off / lba, (len / lba) as u32)
                .buffer(ptr, len as usize)
                .timeout(Duration::from_secs(30))
                .build(&g)?;
            // SAFETY: the mapping outlives the ring's use (we drain before returning).
            unsafe { ring.push(&cmd, UringCmdOp::Io, None, next as u64)? };
            in_flight[next] = Some((cmd, Instant::now(), len));
            next += 1;
            outstanding += 1;
        }
        if outstanding == 0 {
            break;
        }
        done.clear();
        ring.wait_timeout(1, Duration::from_secs(60), &mut done)?;
        for c in &done {
            let Some((cmd, t, len)) = in_flight
                .get_mut(c.user_data as usize)
                .and_then(Option::take)
            else {
                continue;
            };
            outstanding -= 1;
            match c.check(ring.device(), &cmd, UringCmdOp::Io) {
                Ok(_) => {
                    progress.record(&mut st, len, t.elapsed(), false);
                }
                Err(e) => {
                    first_err.get_or_insert(DatapathError::Nvme(e));
                }
            }
        }
    }
    st.elapsed = start.elapsed();
    match first_err {
        Some(e) => Err(e),
        None => Ok(st),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn providers_from_a_sysfs_tree() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("0000:00:05.0/p2pmem");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("size"), "16777216\n").unwrap();
        std::fs::write(d.join("available"), "16777216\n").unwrap();
        std::fs::write(d.join("published"), "1\n").unwrap();
        std::fs::create_dir_all(t.path().join("0000:00:04.0")).unwrap();
        let p = providers(t.path());
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].pci, "0000:00:05.0");
        assert_eq!(
            (p[0].size, p[0].available, p[0].published),
            (16 << 20, 16 << 20, true)
        );
        // Mapping a plain file is refused by the kernel's rules for sysfs attributes only on
        // real sysfs; here the open fails because there is no allocate file.
        assert!(matches!(
            P2pMem::map(&d, 4096),
            Err(DatapathError::P2pMem { .. })
        ));
    }
}
