//! The file and block layers' in-flight tables: direct-mapped slots (an array indexed by a hash
//! of the key, claimed with one compare-and-swap) in front of a hash map for the keys whose
//! slot is taken. Per 4 KiB O_DIRECT read the two layers insert, look up and delete twice each:
//! in hash maps that was ~600 ns of the ~1.1 µs their programs cost on the 2-core VM; an array
//! lookup is inlined and a slot costs one atomic to claim and one store to release.
//!
//! The io_uring layer's requests (`maps::requests`) live in one too: it claims a slot with
//! [`SlotTable::claim`] and writes its entry in place, field by field, with no stack copy.

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

/// What [`SlotTable::claim`] found in a key's slot.
pub(crate) enum Claim<V> {
    /// The slot was free and is the key's now: its value, to be written.
    Free(*mut V),
    /// The key held the slot already: its earlier occupant never ended visibly.
    Held(*mut V),
    /// Another key holds it: the key goes to the hash map, if anywhere.
    Taken,
}

/// A table: `slots` (a power of two of entries, `mask` = entries − 1) and `overflow`.
pub(crate) struct SlotTable<V: 'static, H: Overflow<V> + 'static> {
    pub slots: &'static Array<Slot<V>>,
    pub overflow: &'static H,
    pub mask: u64,
}

impl<V: Copy + 'static, H: Overflow<V> + 'static> SlotTable<V, H> {
    /// Claims `key`'s slot (`key` a scalar) with one compare-and-swap; the value is the
    /// caller's to write once claimed.
    #[inline(always)]
    pub fn claim(&self, key: u64) -> Claim<V> {
        let Some(slot) = self.slots.get_ptr_mut(slot_index(key, self.mask)) else {
            return Claim::Taken;
        };
        // SAFETY: map value pointer from an inlined array lookup; the value is handed out
        // only once the slot is `key`'s.
        unsafe {
            let owner = &raw mut (*slot).key;
            let (prev, ok) =
                core::intrinsics::atomic_cxchg::<u64, { SeqCst }, { Acquire }>(owner, 0, key);
            let value = &raw mut (*slot).value;
            if ok {
                Claim::Free(value)
            } else if prev == key {
                Claim::Held(value)
            } else {
                Claim::Taken
            }
        }
    }

    /// Tracks `value` under `key` (a scalar), replacing what `key` had. False only when the
    /// key's slot is taken and the hash map is full.
    #[inline(always)]
    pub fn insert(&self, key: u64, value: &V) -> bool {
        match self.claim(key) {
            // SAFETY: the slot is `key`'s.
            Claim::Free(v) | Claim::Held(v) => {
                unsafe { *v = *value };
                true
            }
            Claim::Taken => self.overflow.insert(&key, value, BPF_ANY as u64).is_ok(),
        }
    }

    /// Whether `key` is tracked (its slot or the hash map).
    #[inline(always)]
    pub fn contains(&self, key: u64) -> bool {
        if let Some(slot) = self.slots.get_ptr_mut(slot_index(key, self.mask)) {
            // SAFETY: map value pointer.
            if unsafe { core::ptr::read_volatile(&raw const (*slot).key) } == key {
                return true;
            }
        }
        self.overflow.get_ptr_mut(&key).is_some()
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
        match self.take_slot(key) {
            Some(value) => Some(value),
            None => self.take_overflow(key),
        }
    }

    /// Stops tracking `key` if its slot holds it, and returns its value; the hash map is not
    /// looked at (the io_uring layer's sampled mode never puts requests there).
    #[inline(always)]
    pub fn take_slot(&self, key: u64) -> Option<V> {
        let slot = self.slots.get_ptr_mut(slot_index(key, self.mask))?;
        // SAFETY: map value pointer; only the end of `key` releases a slot `key` owns. Plain
        // loads and stores: the BPF ISA's acquire/release forms need v4; on x86 (TSO) the JIT's
        // moves already keep the value's reads before the releasing store.
        unsafe {
            let owner = &raw mut (*slot).key;
            if core::ptr::read_volatile(owner) != key {
                return None;
            }
            let value = (*slot).value;
            core::ptr::write_volatile(owner, 0);
            Some(value)
        }
    }

    /// Stops tracking `key` in the hash map and returns its value; `None` also when another
    /// CPU deleted it between the copy and the delete (the value is the deleter's).
    #[inline(always)]
    pub fn take_overflow(&self, key: u64) -> Option<V> {
        // SAFETY: map value pointer, copied before the delete.
        let value = unsafe { *self.overflow.get_ptr_mut(&key)? };
        self.overflow.remove(&key).ok()?;
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
