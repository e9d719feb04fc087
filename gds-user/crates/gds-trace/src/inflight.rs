//! Reading the in-flight requests the kernel tracks: the direct-mapped slot table through a
//! shared read-only mapping (no syscall per slot), and the hash map of colliding requests.

use std::os::fd::{AsFd as _, AsRawFd as _};

use aya::maps::{HashMap, MapData};
use gds_common::{InflightReq, InflightSlot};

use super::TraceError;

pub use gds_api::raw::InflightRequest;

/// A read-only shared mapping of the slot table (BPF_F_MMAPABLE array).
pub struct SlotTable {
    ptr: *const InflightSlot,
    slots: usize,
    len: usize,
    // Keeps the map (and so the mapping's object) alive.
    _map: MapData,
}

// SAFETY: the mapping is read-only from user space and lives as long as the struct.
unsafe impl Send for SlotTable {}
unsafe impl Sync for SlotTable {}

impl SlotTable {
    pub fn map(map: MapData, slots: usize) -> Result<SlotTable, TraceError> {
        let page = 4096usize;
        let len = (slots * size_of::<InflightSlot>()).div_ceil(page) * page;
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
    pub fn occupied(&self, out: &mut Vec<(usize, InflightRequest)>) {
        for i in 0..self.slots {
            if let Some(r) = self.read(i) {
                out.push((i, r));
            }
        }
    }

    fn read(&self, i: usize) -> Option<InflightRequest> {
        if i >= self.slots {
            return None;
        }
        // SAFETY: i < slots, within the mapping.
        unsafe {
            let slot = self.ptr.add(i);
            let owner = std::ptr::read_volatile(&raw const (*slot).req);
            if owner == 0 {
                return None;
            }
            let entry = std::ptr::read_volatile(&raw const (*slot).entry);
            (std::ptr::read_volatile(&raw const (*slot).req) == owner && entry.start_ns != 0)
                .then_some(InflightSlot { req: owner, entry })
        }
    }

    /// Whether slot `i` still holds the request `r` (same pointer, same submission).
    fn still_holds(&self, i: usize, r: &InflightRequest) -> bool {
        self.read(i)
            .is_some_and(|now| now.req == r.req && now.entry.start_ns == r.entry.start_ns)
    }
}

impl Drop for SlotTable {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `map` mapped.
        unsafe { libc::munmap(self.ptr as *mut _, self.len) };
    }
}

/// Every tracked request: slot table plus hash map, as a set that was in flight at the end
/// of the read.
///
/// Reading 65536 slots takes a while, and requests complete and are submitted meanwhile: a
/// request seen early in the scan may have completed, and its `user_data` been reused by a new
/// request in a slot read later, so the same application request showed twice (seen with fio
/// at iodepth 16 in `top`). So every entry read is checked again after the scan and dropped if
/// its slot no longer holds it. The hash map's key iteration restarts from the first key when
/// the key it stands on is deleted, which repeats entries: those are removed by identity.
pub fn collect(
    slots: &SlotTable,
    hash: &HashMap<MapData, u64, InflightReq>,
) -> Vec<InflightRequest> {
    let mut from_slots = Vec::new();
    slots.occupied(&mut from_slots);
    let mut from_hash = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for item in hash.iter() {
        // Entries deleted between key iteration and lookup are simply gone: skip them.
        if let Ok((req, entry)) = item
            && seen.insert((req, entry.start_ns))
        {
            from_hash.push(InflightSlot { req, entry });
        }
    }
    let mut out: Vec<InflightRequest> = from_slots
        .into_iter()
        .filter(|(i, r)| slots.still_holds(*i, r))
        .map(|(_, r)| r)
        .collect();
    out.extend(from_hash.into_iter().filter(|r| {
        hash.get(&r.req, 0)
            .is_ok_and(|e| e.start_ns == r.entry.start_ns)
    }));
    out
}
