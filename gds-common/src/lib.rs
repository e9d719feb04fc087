//! Types and constants shared by the gds eBPF programs (`gds-ebpf`) and user space (`gds-user`).
//!
//! Everything here is `#[repr(C)]` plain old data: the kernel side writes it into BPF maps and
//! the ring buffer, user space reads the same bytes back. Field order and sizes are an ABI
//! between the two halves of one build, not a stable external format.
#![no_std]

/// Declares an enum whose variants are counter slots (a per-CPU array of them in the kernel,
/// a labelled series each in user space), once: the `#[repr(u32)]` variants numbered from 0,
/// the number of slots (`$count`), `ALL` in slot order, and each variant's label.
macro_rules! counted_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident [$count:ident] {
            $($(#[$vmeta:meta])* $variant:ident = $n:literal => $label:literal,)*
        }
    ) => {
        $(#[$meta])*
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum $name {
            $($(#[$vmeta])* $variant = $n,)*
        }

        #[doc = concat!("Number of [`", stringify!($name), "`] slots.")]
        pub const $count: usize = [$($n),*].len();

        impl $name {
            /// Every variant, in slot order.
            pub const ALL: [$name; $count] = [$($name::$variant),*];

            /// The label value it is exported under.
            pub const fn label(self) -> &'static str {
                match self {
                    $($name::$variant => $label,)*
                }
            }

            /// Its slot in the counter arrays.
            pub const fn index(self) -> usize {
                self as usize
            }
        }

        // Slots are dense: variant `i` is slot `i`.
        const _: () = {
            let mut i = 0;
            while i < $count {
                assert!($name::ALL[i] as usize == i);
                i += 1;
            }
        };
    };
}

pub mod uring;

pub use uring::*;

pub mod slot;

pub use slot::*;

/// Length of `task_struct::comm`, as in the kernel (`TASK_COMM_LEN`).
pub const COMM_LEN: usize = 16;

/// Number of log2 latency buckets kept per opcode. Bucket `b` counts latencies in
/// `[2^b, 2^(b+1))` nanoseconds; the last bucket also holds everything above (2^35 ns ≈ 34 s).
pub const HIST_BUCKETS: usize = 36;

/// De Bruijn table for the index of the highest set bit of a "smeared" 64-bit value (all bits
/// below the highest set): `TABLE[(v * DEBRUIJN) >> 58]`, with indexes above the last bucket
/// already clamped to it (so the programs need no comparison on the result).
const DEBRUIJN: u64 = 0x03f7_9d71_b4cb_0a89;
static LOG2_BUCKET_TABLE: [u8; 64] = [
    0, 35, 1, 35, 35, 27, 2, 35, 35, 35, 35, 35, 28, 16, 3, 35, 35, 35, 35, 35, 35, 35, 21, 35, 35,
    32, 29, 23, 17, 11, 4, 35, 35, 35, 26, 35, 35, 35, 15, 35, 34, 35, 20, 35, 31, 22, 10, 35, 25,
    35, 14, 33, 19, 30, 9, 24, 13, 18, 8, 12, 7, 6, 5, 35,
];

/// Log2 bucket for a latency in nanoseconds (see [`HIST_BUCKETS`]).
///
/// Branch-free (bit smearing and a De Bruijn multiply): BPF has no count-leading-zeros
/// instruction, and a chain of comparisons gives the verifier one path per bucket; a few such
/// chains in one program exceed the 6.1 verifier's limits. Shared by both sides so user space
/// tests the exact function the kernel runs.
#[inline(always)]
pub fn log2_bucket(ns: u64) -> usize {
    let mut v = ns;
    v |= v >> 1;
    v |= v >> 2;
    v |= v >> 4;
    v |= v >> 8;
    v |= v >> 16;
    v |= v >> 32;
    LOG2_BUCKET_TABLE[(v.wrapping_mul(DEBRUIJN) >> 58) as usize] as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every counted enum: slot `i` is `ALL[i]`, and no two variants share a label (they would
    /// be one series).
    #[test]
    fn counted_enums_are_dense_and_labelled_apart() {
        use cufile::{CUFILE_COUNTS, CufileCount};
        let drops = DropReason::ALL.map(|r| (r.index(), r.label()));
        let counts = CufileCount::ALL.map(|c| (c.index(), c.label()));
        for (i, (slot, _)) in drops.iter().enumerate() {
            assert_eq!(*slot, i);
        }
        for (i, (slot, _)) in counts.iter().enumerate() {
            assert_eq!(*slot, i);
        }
        assert_eq!((drops.len(), counts.len()), (DROP_REASONS, CUFILE_COUNTS));
        let labels: [&str; DROP_REASONS + CUFILE_COUNTS] = core::array::from_fn(|i| {
            if i < DROP_REASONS {
                drops[i].1
            } else {
                counts[i - DROP_REASONS].1
            }
        });
        for (i, a) in labels.iter().enumerate() {
            assert!(!labels[i + 1..].contains(a), "{a} twice");
        }
        assert_eq!(DropReason::BlockNoStart.label(), "block_no_start");
        assert_eq!(CufileCount::NvfsIoctls.label(), "nvfs_ioctl");
    }

    #[test]
    fn log2_bucket_edges() {
        assert_eq!(log2_bucket(0), 0);
        assert_eq!(log2_bucket(1), 0);
        assert_eq!(log2_bucket(2), 1);
        assert_eq!(log2_bucket(3), 1);
        assert_eq!(log2_bucket(1023), 9);
        assert_eq!(log2_bucket(1024), 10);
        assert_eq!(log2_bucket((1 << 35) - 1), 34);
        assert_eq!(log2_bucket(1 << 35), 35);
        assert_eq!(log2_bucket(u64::MAX), HIST_BUCKETS - 1);
        for shift in 0..35 {
            assert_eq!(log2_bucket(1u64 << shift), shift as usize);
            assert_eq!(log2_bucket((1u64 << (shift + 1)) - 1), shift as usize);
        }
    }
}

pub mod device;
pub use device::*;

pub mod cufile;

pub mod file;
