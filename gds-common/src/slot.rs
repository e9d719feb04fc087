//! Direct-mapped in-flight tables: an array of slots indexed by a hash of the key (a kernel
//! pointer), claimed with one compare-and-swap, with a hash map for the keys whose slot is
//! taken. The io_uring layer's requests (`GDS_URING_SLOTS`), the file layer's calls
//! (`GDS_FILE_SLOTS`) and the block layer's requests (`GDS_BLOCK_SLOTS`) live in such tables:
//! a hash map insert, lookup and delete cost ~300 ns per request on the 2-core VM, an array
//! slot a few instructions (inlined lookup, one atomic).

/// Slot of a key (a kernel pointer, or a thread id) in a table of `mask + 1` slots.
/// Multiplicative (Fibonacci) hashing: slab objects lie a fixed stride apart, so low bits
/// alone would collide in patterns.
#[inline(always)]
pub fn slot_index(req: u64, mask: u64) -> u32 {
    ((req.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40) & mask) as u32
}

/// One slot of an io_uring, file or block table: `key` owns it (0: free), `value` is what the layer
/// tracks. Written by the programs, read by user space through a read-only mapping: a slot is
/// kept only if its key is the same before and after its value is copied.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Slot<V> {
    pub key: u64,
    pub value: V,
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    unsafe impl aya::Pod for Slot<crate::InflightReq> {}
    unsafe impl aya::Pod for Slot<crate::file::FileCall> {}
    unsafe impl aya::Pod for Slot<crate::device::BlockInflight> {}
}
