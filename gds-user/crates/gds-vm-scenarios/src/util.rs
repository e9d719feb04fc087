//! Helpers shared by guest scenarios: a position-dependent data pattern, O_DIRECT block I/O and
//! running guest commands.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::process::Command;

use anyhow::{Context, Result, bail};
use gds_nvme::DmaBuffer;

pub use gds_api::model::kernel_release;

fn mix(mut x: u64) -> u64 {
    // splitmix64 finaliser: every 8-byte word differs with its position and the seed.
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Fill `buf` with the pattern for the bytes starting at absolute device offset `offset`.
pub fn fill_pattern(buf: &mut [u8], offset: u64, seed: u64) {
    assert!(offset.is_multiple_of(8) && buf.len().is_multiple_of(8));
    for (i, w) in buf.chunks_exact_mut(8).enumerate() {
        let word = (offset / 8) + i as u64;
        w.copy_from_slice(&mix(seed ^ word.wrapping_mul(0x100_0000_01b3)).to_le_bytes());
    }
}

/// Check `data` against the pattern; on mismatch say where and what.
pub fn check_pattern(data: &[u8], offset: u64, seed: u64) -> Result<()> {
    for (i, w) in data.chunks_exact(8).enumerate() {
        let word = (offset / 8) + i as u64;
        let want = mix(seed ^ word.wrapping_mul(0x100_0000_01b3)).to_le_bytes();
        if w != want {
            bail!(
                "data mismatch at device byte {} : got {:02x?}, want {:02x?}",
                offset + 8 * i as u64,
                w,
                want
            );
        }
    }
    Ok(())
}

pub fn open_direct(path: &str, write: bool) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .with_context(|| format!("open {path} O_DIRECT"))
}

/// Write the pattern over `[offset, offset + len)` of a block device with O_DIRECT, 1 MiB at a
/// time, then fsync.
pub fn write_pattern_block(dev: &str, offset: u64, len: u64, seed: u64) -> Result<()> {
    let f = open_direct(dev, true)?;
    let mut buf = DmaBuffer::new(1 << 20);
    let mut pos = offset;
    while pos < offset + len {
        let n = (offset + len - pos).min(buf.len() as u64) as usize;
        fill_pattern(&mut buf[..n], pos, seed);
        f.write_all_at(&buf[..n], pos)
            .with_context(|| format!("write {dev} at {pos}"))?;
        pos += n as u64;
    }
    f.sync_all().with_context(|| format!("fsync {dev}"))?;
    Ok(())
}

/// Read `[offset, offset + len)` of a block device with O_DIRECT.
pub fn read_block(dev: &str, offset: u64, len: usize) -> Result<DmaBuffer> {
    let f = open_direct(dev, false)?;
    let mut buf = DmaBuffer::new(len);
    f.read_exact_at(&mut buf, offset)
        .with_context(|| format!("read {dev} at {offset}"))?;
    Ok(buf)
}

/// Run a guest command, returning (success, stdout, stderr).
pub fn run(cmd: &str, args: &[&str]) -> Result<(bool, String, String)> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("spawn {cmd}"))?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_detects_shifted_data() {
        let mut a = vec![0u8; 4096];
        fill_pattern(&mut a, 8192, 7);
        check_pattern(&a, 8192, 7).unwrap();
        assert!(check_pattern(&a, 8192 + 512, 7).is_err());
        assert!(check_pattern(&a, 8192, 8).is_err());
    }
}
