//! Namespace geometry: LBA size, capacity, maximum transfer and DMA alignment, from sysfs (what
//! the kernel enforces on passthrough) or from Identify data (what the controller reports).

use std::fs;
use std::path::Path;

use super::error::NvmeError;

/// Linux nvme-pci always uses 4 KiB controller pages (NVME_CTRL_PAGE_SIZE), the unit of MDTS.
pub const CONTROLLER_PAGE_SIZE: u64 = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GeometrySource {
    Sysfs,
    Identify,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamespaceGeometry {
    /// The device as the user named it (for error messages).
    pub device: String,
    pub nsid: u32,
    /// Bytes per logical block of the namespace's current format.
    pub lba_size: u32,
    /// Metadata bytes per block (0 for the usual formats; passthrough of metadata is not
    /// supported by these builders).
    pub metadata_size: u16,
    /// Namespace size in logical blocks (NSZE): valid LBAs are `0..capacity_blocks`.
    pub capacity_blocks: u64,
    /// Largest data transfer of one command in bytes (0 = no limit known).
    pub max_transfer_bytes: u64,
    /// Required alignment of the data buffer in bytes.
    pub dma_alignment: u32,
    pub source: GeometrySource,
}

impl NamespaceGeometry {
    pub fn capacity_bytes(&self) -> u64 {
        self.capacity_blocks
            .saturating_mul(u64::from(self.lba_size))
    }

    /// Largest block count per command allowed by MDTS, the 16-bit NLB and the 32-bit
    /// `data_len` of `struct nvme_uring_cmd`.
    pub fn max_blocks_per_command(&self) -> u32 {
        let lba = u64::from(self.lba_size.max(1));
        let by_nlb = u64::from(super::error::MAX_BLOCKS_PER_COMMAND);
        // 65,536 blocks of 64 KiB would be 4 GiB, one byte more than data_len can carry.
        let by_data_len = u64::from(u32::MAX) / lba;
        let by_mdts = if self.max_transfer_bytes == 0 {
            by_nlb
        } else {
            self.max_transfer_bytes / lba
        };
        by_nlb.min(by_data_len).min(by_mdts).max(1) as u32
    }

    /// Geometry of `/dev/ngXnY` (or `/dev/nvmeXnY`) from sysfs, where the kernel publishes the
    /// limits it applies to passthrough: `queue/max_hw_sectors_kb` (min of MDTS and the
    /// driver's own limit), `queue/dma_alignment` (a mask), `queue/logical_block_size`, `size`
    /// (512-byte sectors) and `nsid`.
    pub fn from_sysfs(device: &Path) -> Result<Self, NvmeError> {
        Self::from_sysfs_root(device, Path::new("/sys"))
    }

    fn from_sysfs_root(device: &Path, sys: &Path) -> Result<Self, NvmeError> {
        let dev = device.display().to_string();
        let err = |reason: String| NvmeError::Geometry {
            device: dev.clone(),
            reason,
        };
        let name = device
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| err("not a device path".into()))?;
        let block = block_name_for(name).ok_or_else(|| {
            err(format!(
                "{name} is not an NVMe namespace name (expected ngXnY or nvmeXnY)"
            ))
        })?;
        let dir = sys.join("block").join(&block);
        let read = |rel: &str| -> Result<u64, NvmeError> {
            let p = dir.join(rel);
            let text =
                fs::read_to_string(&p).map_err(|e| err(format!("read {}: {e}", p.display())))?;
            text.trim()
                .parse::<u64>()
                .map_err(|e| err(format!("parse {} ({:?}): {e}", p.display(), text.trim())))
        };
        let lba_size = read("queue/logical_block_size")? as u32;
        if lba_size == 0 || !lba_size.is_power_of_two() {
            return Err(err(format!(
                "logical block size {lba_size} is not a power of two"
            )));
        }
        let sectors = read("size")?;
        let nsid = read("nsid")? as u32;
        let max_hw_kb = read("queue/max_hw_sectors_kb")?;
        // queue/dma_alignment exists since 6.1 and holds a mask; the block layer's default
        // mask is 511 when nothing else is known.
        let dma_alignment = read("queue/dma_alignment").map(|m| m + 1).unwrap_or(512) as u32;
        Ok(Self {
            device: dev.clone(),
            nsid,
            lba_size,
            metadata_size: 0,
            capacity_blocks: sectors * 512 / u64::from(lba_size),
            max_transfer_bytes: max_hw_kb * 1024,
            dma_alignment,
            source: GeometrySource::Sysfs,
        })
    }

    /// Geometry from Identify Namespace and Identify Controller data (4096 bytes each).
    pub fn from_identify(
        device: &str,
        nsid: u32,
        ns: &IdentifyNamespace,
        ctrl: &IdentifyController,
    ) -> Result<Self, NvmeError> {
        let fmt = ns.current_format().ok_or_else(|| NvmeError::Geometry {
            device: device.to_string(),
            reason: format!(
                "FLBAS selects LBA format {} but the namespace lists {}",
                ns.flbas & 0xf,
                ns.lba_formats.len()
            ),
        })?;
        if !(9..=16).contains(&fmt.lbads) {
            return Err(NvmeError::Geometry {
                device: device.to_string(),
                reason: format!(
                    "LBADS {} is outside 9..=16 (inactive namespace?)",
                    fmt.lbads
                ),
            });
        }
        Ok(Self {
            device: device.to_string(),
            nsid,
            lba_size: 1 << fmt.lbads,
            metadata_size: fmt.ms,
            capacity_blocks: ns.nsze,
            max_transfer_bytes: ctrl.max_transfer_bytes(),
            // The NVMe PCI driver asks for dword alignment of user buffers.
            dma_alignment: 4,
            source: GeometrySource::Identify,
        })
    }
}

/// `ngXnY` → `nvmeXnY`; `nvmeXnY` unchanged. Other names → None.
pub fn block_name_for(name: &str) -> Option<String> {
    let rest = name
        .strip_prefix("ng")
        .or_else(|| name.strip_prefix("nvme"))?;
    let (ctrl, ns) = rest.split_once('n')?;
    if ctrl.is_empty() || ns.is_empty() {
        return None;
    }
    if !ctrl.bytes().all(|b| b.is_ascii_digit()) || !ns.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(format!("nvme{ctrl}n{ns}"))
}

/// `nvme0n1` → `ng0n1`, `nvme0c0n1` → `ng0n1` (the generic device is per namespace).
pub fn generic_name(ns: &str) -> Option<String> {
    let rest = ns.strip_prefix("nvme")?;
    let (ctrl, tail) = rest.split_once(['n', 'c'])?;
    let nsid = tail.rsplit('n').next()?;
    Some(format!("ng{ctrl}n{nsid}"))
}

/// `ngXnY`/`nvmeXnY` → `/dev/nvmeX`, the controller char device for admin commands.
pub fn controller_device_for(name: &str) -> Option<String> {
    let block = block_name_for(name)?;
    let ctrl = block.strip_prefix("nvme")?.split_once('n')?.0.to_string();
    Some(format!("/dev/nvme{ctrl}"))
}

/// One entry of the Identify Namespace LBA format table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LbaFormat {
    /// Metadata size per block.
    pub ms: u16,
    /// LBA data size as a power of two.
    pub lbads: u8,
    /// Relative performance (0 best).
    pub rp: u8,
}

/// The fields of Identify Namespace (CNS 00h) that geometry needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentifyNamespace {
    pub nsze: u64,
    pub ncap: u64,
    pub nuse: u64,
    pub flbas: u8,
    pub lba_formats: Vec<LbaFormat>,
}

impl IdentifyNamespace {
    pub fn parse(data: &[u8; 4096]) -> Self {
        let u64_at = |o: usize| u64::from_le_bytes(data[o..o + 8].try_into().unwrap());
        let nlbaf = data[25] as usize + 1; // zero-based
        let lba_formats = (0..nlbaf.min(64))
            .map(|i| {
                let o = 128 + 4 * i;
                LbaFormat {
                    ms: u16::from_le_bytes([data[o], data[o + 1]]),
                    lbads: data[o + 2],
                    rp: data[o + 3] & 0x3,
                }
            })
            .collect();
        Self {
            nsze: u64_at(0),
            ncap: u64_at(8),
            nuse: u64_at(16),
            flbas: data[26],
            lba_formats,
        }
    }

    /// The LBA format in use: FLBAS bits 3:0, plus bits 6:5 as the upper index bits when more
    /// than 16 formats exist (NVMe 2.0).
    pub fn current_format(&self) -> Option<LbaFormat> {
        let mut idx = usize::from(self.flbas & 0xf);
        if self.lba_formats.len() > 16 {
            idx |= usize::from((self.flbas >> 5) & 0x3) << 4;
        }
        self.lba_formats.get(idx).copied()
    }
}

/// The fields of Identify Controller (CNS 01h) that matter here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentifyController {
    pub vid: u16,
    pub serial: String,
    pub model: String,
    pub firmware: String,
    /// Maximum Data Transfer Size, a power of two in units of the minimum page size (0 = none).
    pub mdts: u8,
    /// Number of namespaces.
    pub nn: u32,
}

impl IdentifyController {
    pub fn parse(data: &[u8; 4096]) -> Self {
        let text = |r: std::ops::Range<usize>| {
            String::from_utf8_lossy(&data[r])
                .trim_end_matches([' ', '\0'])
                .to_string()
        };
        Self {
            vid: u16::from_le_bytes([data[0], data[1]]),
            serial: text(4..24),
            model: text(24..64),
            firmware: text(64..72),
            mdts: data[77],
            nn: u32::from_le_bytes(data[516..520].try_into().unwrap()),
        }
    }

    /// MDTS in bytes (0 = no limit reported).
    pub fn max_transfer_bytes(&self) -> u64 {
        if self.mdts == 0 || self.mdts > 20 {
            0
        } else {
            CONTROLLER_PAGE_SIZE << self.mdts
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(block_name_for("ng0n1").as_deref(), Some("nvme0n1"));
        assert_eq!(block_name_for("nvme12n3").as_deref(), Some("nvme12n3"));
        assert_eq!(block_name_for("nvme0"), None);
        assert_eq!(block_name_for("ng0n"), None);
        assert_eq!(block_name_for("sda"), None);
        assert_eq!(
            controller_device_for("ng1n2").as_deref(),
            Some("/dev/nvme1")
        );
    }

    #[test]
    fn generic_device_names() {
        assert_eq!(generic_name("nvme0n1").as_deref(), Some("ng0n1"));
        assert_eq!(generic_name("nvme12n3").as_deref(), Some("ng12n3"));
        assert_eq!(generic_name("nvme0c1n2").as_deref(), Some("ng0n2"));
        assert_eq!(generic_name("sda"), None);
    }

    #[test]
    fn identify_parsing() {
        let mut ns = [0u8; 4096];
        ns[0..8].copy_from_slice(&262_144u64.to_le_bytes());
        ns[8..16].copy_from_slice(&262_144u64.to_le_bytes());
        ns[25] = 1; // two formats
        ns[26] = 1; // using format 1
        ns[128 + 2] = 9;
        ns[132 + 2] = 12;
        let ns = IdentifyNamespace::parse(&ns);
        assert_eq!(ns.current_format().unwrap().lbads, 12);
        let mut c = [0u8; 4096];
        c[0] = 0x36;
        c[1] = 0x1b;
        c[4..12].copy_from_slice(b"deadbeef");
        c[24..28].copy_from_slice(b"QEMU");
        c[77] = 7;
        c[516] = 256u32.to_le_bytes()[0];
        c[517] = 256u32.to_le_bytes()[1];
        let c = IdentifyController::parse(&c);
        assert_eq!(c.vid, 0x1b36);
        assert_eq!(c.serial, "deadbeef");
        assert_eq!(c.model, "QEMU");
        assert_eq!(c.nn, 256);
        assert_eq!(c.max_transfer_bytes(), 512 * 1024);
        let g = NamespaceGeometry::from_identify("/dev/ng0n2", 2, &ns, &c).unwrap();
        assert_eq!(g.lba_size, 4096);
        assert_eq!(g.capacity_blocks, 262_144);
        assert_eq!(g.max_blocks_per_command(), 128);
        // Found by the `nvme_command` fuzz target: with 64 KiB blocks and no MDTS, 65,536
        // blocks is 4 GiB, which data_len (u32) cannot carry; the limit must be encodable.
        let mut big = g.clone();
        big.lba_size = 65_536;
        big.max_transfer_bytes = 0;
        big.capacity_blocks = 1 << 20;
        // (That a command of this many blocks builds is checked in cmd.rs, which builds them.)
        assert_eq!(big.max_blocks_per_command(), 65_535);
        // An inactive namespace (all zero) is refused, not turned into a 1-byte LBA size.
        let zero = IdentifyNamespace::parse(&[0u8; 4096]);
        assert!(NamespaceGeometry::from_identify("/dev/ng0n9", 9, &zero, &c).is_err());
    }

    #[test]
    fn sysfs_layout() {
        let root = tempfile::tempdir().unwrap();
        let q = root.path().join("block/nvme0n1/queue");
        fs::create_dir_all(&q).unwrap();
        fs::write(q.join("logical_block_size"), "4096\n").unwrap();
        fs::write(q.join("max_hw_sectors_kb"), "512\n").unwrap();
        fs::write(q.join("dma_alignment"), "3\n").unwrap();
        fs::write(root.path().join("block/nvme0n1/size"), "131072\n").unwrap();
        fs::write(root.path().join("block/nvme0n1/nsid"), "1\n").unwrap();
        let g = NamespaceGeometry::from_sysfs_root(Path::new("/dev/ng0n1"), root.path()).unwrap();
        assert_eq!(g.lba_size, 4096);
        assert_eq!(g.capacity_blocks, 131_072 * 512 / 4096);
        assert_eq!(g.max_transfer_bytes, 512 * 1024);
        assert_eq!(g.dma_alignment, 4);
        assert_eq!(g.nsid, 1);
        let e =
            NamespaceGeometry::from_sysfs_root(Path::new("/dev/ng3n1"), root.path()).unwrap_err();
        assert!(e.to_string().contains("/dev/ng3n1"), "{e}");
    }
}
