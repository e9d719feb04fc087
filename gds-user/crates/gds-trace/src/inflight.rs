//! Reading the in-flight tables the kernel keeps (io_uring requests, file calls, block
//! requests): the direct-mapped slots through a shared read-only mapping (no syscall per slot),
//! and the hash map of the entries whose slot was taken (`gds_common::slot`).

use std::os::fd::{AsFd as _, AsRawFd as _};

use aya::maps::{HashMap, MapData};
use gds_common::{BlockInflight, InflightReq, Slot, file::FileCall};

use super::TraceError;

pub use gds_api::raw::InflightRequest;

/// A value of an in-flight table, with its start stamp, which tells two occupants under one
/// key apart; 0: not to be shown (being written, or a block request not issued yet).
pub trait Stamped: aya::Pod {
    fn stamp(&self) -> u64;
}

impl Stamped for InflightReq {
    fn stamp(&self) -> u64 {
        self.start_ns
    }
}

impl Stamped for FileCall {
    fn stamp(&self) -> u64 {
        self.start_ns
    }
}

impl Stamped for BlockInflight {
    fn stamp(&self) -> u64 {
        self.issue_ns
    }
}

/// A read-only shared mapping of a slot table (BPF_F_MMAPABLE array).
pub struct SlotTable<V: Stamped> {
    ptr: *const Slot<V>,
    slots: usize,
    len: usize,
    // Keeps the map (and so the mapping's object) alive.
    _map: MapData,
}

// SAFETY: the mapping is read-only from user space and lives as long as the struct.
unsafe impl<V: Stamped> Send for SlotTable<V> {}
unsafe impl<V: Stamped> Sync for SlotTable<V> {}

impl<V: Stamped> SlotTable<V> {
    pub fn map(map: MapData, slots: usize) -> Result<SlotTable<V>, TraceError> {
        let page = 4096usize;
        let len = (slots * size_of::<Slot<V>>()).div_ceil(page) * page;
        // SAFETY: mapping a BPF array map fd created with BPF_F_MMAPABLE; checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(TraceError::Mmap(std::io::Error::last_os_error()));
        }
        Ok(SlotTable {
            ptr: ptr.cast(),
            slots,
            len,
            _map: map,
        })
    }

    /// Copies out the occupied slots, with their index. Each slot is read with volatile loads
    /// and kept only if its owner is the same before and after (a slot being claimed or
    /// released concurrently is skipped; it is caught by the next scan).
    fn occupied(&self, out: &mut Vec<(usize, Slot<V>)>) {
        for i in 0..self.slots {
            if let Some(r) = self.read(i) {
                out.push((i, r));
            }
        }
    }

    fn read(&self, i: usize) -> Option<Slot<V>> {
        if i >= self.slots {
            return None;
        }
        // SAFETY: i < slots, within the mapping; a slot starts with its owner's `u64` key
        // (`#[repr(C)]`).
        unsafe {
            let slot = self.ptr.add(i);
            let owner = std::ptr::read_volatile(slot.cast::<u64>());
            if owner == 0 {
                return None;
            }
            let copy = std::ptr::read_volatile(slot);
            (std::ptr::read_volatile(slot.cast::<u64>()) == owner
                && copy.key == owner
                && copy.value.stamp() != 0)
                .then_some(copy)
        }
    }

    /// Whether slot `i` still holds `r` (same key, same start).
    fn still_holds(&self, i: usize, r: &Slot<V>) -> bool {
        self.read(i)
            .is_some_and(|now| now.key == r.key && now.value.stamp() == r.value.stamp())
    }
}

impl<V: Stamped> Drop for SlotTable<V> {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `map` mapped.
        unsafe { libc::munmap(self.ptr as *mut _, self.len) };
    }
}

/// Takes the slot array `name` out of `ebpf` and maps it (`slots` entries).
pub(crate) fn take_slots<V: Stamped>(
    ebpf: &mut aya::Ebpf,
    name: &'static str,
    slots: u32,
) -> Result<SlotTable<V>, TraceError> {
    let Some(aya::maps::Map::Array(map)) = ebpf.take_map(name) else {
        return Err(TraceError::MissingMap(name));
    };
    SlotTable::map(map, slots as usize)
}

/// Every tracked entry: slot table plus hash map, as a set that was in flight at the end of
/// the read.
///
/// Reading 65536 slots takes a while, and requests complete and are submitted meanwhile: a
/// request seen early in the scan may have completed, and its key been reused by a new request
/// in a slot read later, so the same application request showed twice (seen with fio at
/// iodepth 16 in `top`). So every entry read is checked again after the scan and dropped if
/// its slot no longer holds it. The hash map's key iteration restarts from the first key when
/// the key it stands on is deleted, which repeats entries: those are removed by identity.
pub fn collect<V: Stamped>(slots: &SlotTable<V>, hash: &HashMap<MapData, u64, V>) -> Vec<Slot<V>> {
    let mut from_slots = Vec::new();
    slots.occupied(&mut from_slots);
    let mut from_hash = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for item in hash.iter() {
        // Entries deleted between key iteration and lookup are simply gone: skip them.
        if let Ok((key, value)) = item
            && value.stamp() != 0
            && seen.insert((key, value.stamp()))
        {
            from_hash.push(Slot { key, value });
        }
    }
    let mut out: Vec<Slot<V>> = from_slots
        .into_iter()
        .filter(|(i, r)| slots.still_holds(*i, r))
        .map(|(_, r)| r)
        .collect();
    out.extend(from_hash.into_iter().filter(|r| {
        hash.get(&r.key, 0)
            .is_ok_and(|v| v.stamp() == r.value.stamp())
    }));
    out
}
