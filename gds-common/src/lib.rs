//! Types and constants shared by the gds eBPF programs (`gds-ebpf`) and user space (`gds-user`).
//!
//! Everything here is `#[repr(C)]` plain old data: the kernel side writes it into BPF maps and
//! the ring buffer, user space reads the same bytes back. Field order and sizes are an ABI
//! between the two halves of one build, not a stable external format.
#![no_std]

pub mod uring;

pub use uring::*;

/// Length of `task_struct::comm`, as in the kernel (`TASK_COMM_LEN`).
pub const COMM_LEN: usize = 16;

/// Number of log2 latency buckets kept per opcode. Bucket `b` counts latencies in
/// `[2^b, 2^(b+1))` nanoseconds; the last bucket also holds everything above (2^35 ns ≈ 34 s).
pub const HIST_BUCKETS: usize = 36;

/// Log2 bucket for a latency in nanoseconds (see [`HIST_BUCKETS`]).
///
/// Written as a branchy binary search because BPF has no count-leading-zeros instruction; the
/// verifier accepts it without loops. Shared by both sides so user space tests the exact
/// function the kernel runs.
#[inline(always)]
pub fn log2_bucket(ns: u64) -> usize {
    let mut v = ns;
    let mut b = 0usize;
    if v >= 1 << 32 {
        v >>= 32;
        b += 32;
    }
    if v >= 1 << 16 {
        v >>= 16;
        b += 16;
    }
    if v >= 1 << 8 {
        v >>= 8;
        b += 8;
    }
    if v >= 1 << 4 {
        v >>= 4;
        b += 4;
    }
    if v >= 1 << 2 {
        v >>= 2;
        b += 2;
    }
    if v >= 1 << 1 {
        b += 1;
    }
    if b >= HIST_BUCKETS {
        HIST_BUCKETS - 1
    } else {
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
