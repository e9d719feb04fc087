//! Peer memory at the block layer: telling a request whose data buffer is PCI peer memory
//! (P2PDMA pages: a GPU's BAR1 or another device's memory mapped into the process, the target
//! of cuFile's P2PDMA mode) from one into host memory, and which process issued it.
//!
//! The block program does what the kernel's `is_pci_p2pdma_page()` does on the first page of
//! each request: `page_zonenum(page) == ZONE_DEVICE && page->pgmap->type ==
//! MEMORY_DEVICE_PCI_P2PDMA`. Everything it needs comes from BTF, including where the zone
//! sits in `page->flags`, which the kernel computes from configuration macros BTF does not
//! carry; [`zone_bits`] recomputes it from the sizes BTF does give. Why from BTF and not the
//! kernel's configuration file: a container or initramfs often has no `/boot/config-*`, and
//! BTF is what the rest of the tracer already trusts.

use std::sync::Mutex;

use aya::maps::{HashMap, MapData};
use gds_common::{MAP_PEER_IO, PeerCheck};

use super::{TraceError, take_map};
use gds_api::raw::PeerMemory;
use gds_host::btf::Btf;

/// `ZONES_PGSHIFT` and `ZONES_MASK` of `include/linux/page-flags-layout.h`, from:
/// - `max_nr_zones`: `__MAX_NR_ZONES` of `enum zone_type`;
/// - `nr_pageflags`: `__NR_PAGEFLAGS` of `enum pageflags`;
/// - `max_numnodes`: `MAX_NUMNODES` (`1 << NODES_SHIFT`).
///
/// With SPARSEMEM_VMEMMAP (which ZONE_DEVICE requires) the section is not in the flags, the
/// node is the top field and the zone the one below it; the kernel refuses to build when the
/// node does not fit, so it always does here. None when a width is out of range.
pub fn zone_bits(max_nr_zones: u32, nr_pageflags: u32, max_numnodes: u32) -> Option<(u32, u32)> {
    let zones_width = match max_nr_zones {
        0 | 1 => 0,
        2 => 1,
        3..=4 => 2,
        5..=8 => 3,
        _ => return None,
    };
    if zones_width == 0 || !max_numnodes.is_power_of_two() {
        return None;
    }
    let nodes_width = max_numnodes.trailing_zeros();
    if nodes_width + zones_width > 64u32.checked_sub(nr_pageflags)? {
        return None;
    }
    Some((64 - nodes_width - zones_width, (1 << zones_width) - 1))
}

fn enum_value(btf: &Btf, ty: &str, name: &str) -> Result<i64, String> {
    btf.enum_values(ty)
        .ok_or_else(|| format!("BTF has no enum {ty}"))?
        .into_iter()
        .find_map(|(n, v)| (n == name).then_some(v))
        .ok_or_else(|| format!("enum {ty} has no {name}"))
}

/// What the block program needs, from `btf`.
pub fn resolve(btf: &Btf) -> (PeerCheck, PeerMemory) {
    // `struct pci_p2pdma` is defined only in drivers/pci/p2pdma.c, built with
    // CONFIG_PCI_P2PDMA: without it no peer page reaches the block layer.
    if !btf.has_struct("pci_p2pdma") {
        return (
            PeerCheck::OFF,
            PeerMemory::Impossible(
                "the kernel has no CONFIG_PCI_P2PDMA: every block request is host memory".into(),
            ),
        );
    }
    match check(btf) {
        Ok(c) => (
            c,
            PeerMemory::Checked(format!(
                "P2PDMA pages told apart on every request (zone {} at bit {} of page flags)",
                c.zone_device, c.zone_shift
            )),
        ),
        Err(e) => (
            PeerCheck::OFF,
            PeerMemory::Unknown(format!(
                "the kernel has P2PDMA but peer memory cannot be told apart: {e}"
            )),
        ),
    }
}

/// `(ZONES_PGSHIFT, ZONES_MASK)` of the kernel `btf` describes (see [`zone_bits`]).
fn zone_layout(btf: &Btf) -> Result<(u32, u32), String> {
    let max_nr_zones = enum_value(btf, "zone_type", "__MAX_NR_ZONES")?;
    let nr_pageflags = enum_value(btf, "pageflags", "__NR_PAGEFLAGS")?;
    // MAX_ZONES_PER_ZONELIST = MAX_NUMNODES * MAX_NR_ZONES, and `struct zonelist` holds one
    // more `struct zoneref` than that: the one place BTF spells out NODES_SHIFT.
    let zonelist = btf.struct_size("zonelist").map_err(|e| e.to_string())?;
    let zoneref = btf.struct_size("zoneref").map_err(|e| e.to_string())?;
    if zoneref == 0 || max_nr_zones <= 0 || zonelist % zoneref != 0 {
        return Err(format!(
            "struct zonelist ({zonelist} B) is not whole zonerefs ({zoneref} B)"
        ));
    }
    let max_numnodes = (zonelist / zoneref - 1) / max_nr_zones as u32;
    zone_bits(max_nr_zones as u32, nr_pageflags as u32, max_numnodes).ok_or_else(|| {
        format!(
            "no zone field for {max_nr_zones} zones, {nr_pageflags} page flags, {max_numnodes} nodes"
        )
    })
}

fn check(btf: &Btf) -> Result<PeerCheck, String> {
    let off = |s: &str, p: &[&str]| btf.member_offset(s, p).map_err(|e| e.to_string());
    let zone_device = enum_value(btf, "zone_type", "ZONE_DEVICE")?;
    let (zone_shift, zone_mask) = zone_layout(btf)?;
    let bvec_page = off("bio_vec", &["bv_page"])?;
    if bvec_page != 0 {
        return Err(format!("bio_vec.bv_page at {bvec_page}, not 0"));
    }
    Ok(PeerCheck {
        enabled: 1,
        rq_bio: off("request", &["bio"])?,
        bio_io_vec: off("bio", &["bi_io_vec"])?,
        bio_idx: off("bio", &["bi_iter", "bi_idx"])?,
        bvec_size: btf.struct_size("bio_vec").map_err(|e| e.to_string())?,
        page_pgmap: off("page", &["pgmap"])?,
        pgmap_type: off("dev_pagemap", &["type"])?,
        p2pdma_type: enum_value(btf, "memory_type", "MEMORY_DEVICE_PCI_P2PDMA")? as u32,
        zone_shift,
        zone_mask,
        zone_device: zone_device as u32,
        _pad: 0,
    })
}

/// Block requests into peer memory per process, as the kernel counts them.
pub struct PeerIo {
    /// An LRU hash in the kernel; aya reads it as a hash map.
    map: Mutex<HashMap<MapData, u32, u64>>,
}

impl PeerIo {
    pub fn take(ebpf: &mut aya::Ebpf) -> Result<PeerIo, TraceError> {
        Ok(PeerIo {
            map: Mutex::new(take_map(ebpf, MAP_PEER_IO)?),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<MapData, u32, u64>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// (process id, requests) for every process that issued any, by process id.
    pub fn read(&self) -> Vec<(u32, u64)> {
        let mut v: Vec<(u32, u64)> = self.lock().iter().flatten().collect();
        v.sort_unstable();
        v
    }

    /// Forgets processes that exited, so a reused process id starts from zero. (A cuFile
    /// call compares the count at its entry and return, so no call is misclassified either
    /// way; this is for the listing.)
    pub fn prune(&self, alive: &dyn Fn(u32) -> bool) {
        let mut map = self.lock();
        let dead: Vec<u32> = map
            .keys()
            .filter_map(Result::ok)
            .filter(|pid| !alive(*pid))
            .collect();
        for pid in dead {
            let _ = map.remove(&pid);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zone_field_of_distribution_configs() {
        // Debian/Ubuntu/RHEL x86_64: NODES_SHIFT 10, zones DMA DMA32 NORMAL MOVABLE DEVICE.
        assert_eq!(zone_bits(5, 24, 1024), Some((51, 7)));
        // Four zones (no ZONE_DEVICE would be three or four): two bits.
        assert_eq!(zone_bits(4, 24, 64), Some((56, 3)));
        // No NUMA: MAX_NUMNODES is 1, the zone is the top field.
        assert_eq!(zone_bits(5, 24, 1), Some((61, 7)));
        // Not a power of two, too many zones, no room: refused rather than guessed.
        assert_eq!(zone_bits(5, 24, 1000), None);
        assert_eq!(zone_bits(9, 24, 1024), None);
        assert_eq!(zone_bits(5, 60, 1024), None);
    }

    #[test]
    fn running_kernel_resolves_or_says_why() {
        let Ok(btf) = Btf::from_sys() else {
            eprintln!("SKIP: no kernel BTF");
            return;
        };
        let (c, mode) = resolve(&btf);
        match &mode {
            PeerMemory::Checked(_) => {
                assert_eq!(c.enabled, 1);
                assert!(c.zone_shift > 32 && c.zone_mask != 0, "{c:?}");
                assert!(c.page_pgmap >= 8 && c.bvec_size >= 16, "{c:?}");
            }
            PeerMemory::Impossible(_) | PeerMemory::Unknown(_) => assert_eq!(c.enabled, 0),
        }
        // This kernel's zone field, whichever mode: the computation must accept it.
        let layout = zone_layout(&btf);
        assert!(layout.is_ok(), "{layout:?}");
        eprintln!("{mode:?}; zone field (shift, mask) {layout:?}");
    }
}
