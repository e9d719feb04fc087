//! The file and block layers' in-flight tables: direct-mapped slots (an array indexed by a hash
//! of the key, claimed with one compare-and-swap) in front of a hash map for the keys whose
//! slot is taken. Per 4 KiB O_DIRECT read the two layers insert, look up and delete twice each:
//! in hash maps that was ~600 ns of the ~1.1 µs their programs cost on the 2-core VM; an array
//! lookup is inlined and a slot costs one atomic to claim and one store to release.
//!
//! Same scheme as the io_uring layer's table (`maps::SLOTS`), which writes its entries in
//! place field by field; these tables take whole values.

use core::intrinsics::AtomicOrdering::{Acquire, SeqCst};

use aya_ebpf::{
    bindings::BPF_ANY,
    maps::{Array, HashMap, LruHashMap},
};
use gds_common::{Slot, slot_index};

/// The hash maps a table can fall back to (the block table's is an LRU hash).
pub(crate) trait Overflow<V> {
    fn get_ptr_mut(&self, key: &u64) -> Option<*mut V>;
    fn insert(&self, key: &u64, value: &V, flags: u64) -> Result<(), i32>;
    fn remove(&self, key: &u64) -> Result<(), i32>;
}

macro_rules! overflow {
    ($map:ident) => {
        impl<V> Overflow<V> for $map<u64, V> {
            #[inline(always)]
            fn get_ptr_mut(&self, key: &u64) -> Option<*mut V> {
                $map::get_ptr_mut(self, key)
            }
            #[inline(always)]
            fn insert(&self, key: &u64, value: &V, flags: u64) -> Result<(), i32> {
                $map::insert(self, key, value, flags)
            }
            #[inline(always)]
            fn remove(&self, key: &u64) -> Result<(), i32> {
                $map::remove(self, key)
            }
        }
    };
}
overflow!(HashMap);
overflow!(LruHashMap);

/// A table: `slots` (a power of two of entries, `mask` = entries − 1) and `overflow`.
pub(crate) struct SlotTable<V: 'static, H: Overflow<V> + 'static> {
    pub slots: &'static Array<Slot<V>>,
    pub overflow: &'static H,
    pub mask: u64,
}

impl<V: Copy + 'static, H: Overflow<V> + 'static> SlotTable<V, H> {
    /// Tracks `value` under `key` (a scalar), replacing what `key` had. False only when the
    /// key's slot is taken and the hash map is full.
    #[inline(always)]
    pub fn insert(&self, key: u64, value: &V) -> bool {
        if let Some(slot) = self.slots.get_ptr_mut(slot_index(key, self.mask)) {
            // SAFETY: map value pointer from an inlined array lookup; the slot is written
            // only once it is ours.
            unsafe {
                let owner = &raw mut (*slot).key;
                let (prev, ok) =
                    core::intrinsics::atomic_cxchg::<u64, { SeqCst }, { Acquire }>(owner, 0, key);
                if ok || prev == key {
                    (*slot).value = *value;
                    return true;
                }
            }
        }
        self.overflow.insert(&key, value, BPF_ANY as u64).is_ok()
    }

    /// The value tracked under `key`, in place.
    #[inline(always)]
    pub fn get_mut(&self, key: u64) -> Option<*mut V> {
        if let Some(slot) = self.slots.get_ptr_mut(slot_index(key, self.mask)) {
            // SAFETY: map value pointer.
            if unsafe { core::ptr::read_volatile(&raw const (*slot).key) } == key {
                return Some(unsafe { &raw mut (*slot).value });
            }
        }
        self.overflow.get_ptr_mut(&key)
    }

    /// Stops tracking `key` and returns its value.
    #[inline(always)]
    pub fn take(&self, key: u64) -> Option<V> {
        if let Some(slot) = self.slots.get_ptr_mut(slot_index(key, self.mask)) {
            // SAFETY: map value pointer. Plain loads and stores: on x86 (TSO) the JIT's moves
            // keep the value's reads before the releasing store (as `uring::take_entry`).
            unsafe {
                let owner = &raw mut (*slot).key;
                if core::ptr::read_volatile(owner) == key {
                    let value = (*slot).value;
                    core::ptr::write_volatile(owner, 0);
                    return Some(value);
                }
            }
        }
        // SAFETY: map value pointer, copied before the delete.
        let value = unsafe { *self.overflow.get_ptr_mut(&key)? };
        let _ = self.overflow.remove(&key);
        Some(value)
    }

    /// Stops tracking `key`; whether it was tracked.
    #[inline(always)]
    pub fn remove(&self, key: u64) -> bool {
        if let Some(slot) = self.slots.get_ptr_mut(slot_index(key, self.mask)) {
            // SAFETY: map value pointer.
            unsafe {
                let owner = &raw mut (*slot).key;
                if core::ptr::read_volatile(owner) == key {
                    core::ptr::write_volatile(owner, 0);
                    return true;
                }
            }
        }
        self.overflow.remove(&key).is_ok()
    }
}
