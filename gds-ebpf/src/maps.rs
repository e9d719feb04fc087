//! The io_uring config and maps that both the io_uring programs (`uring`) and the NVMe/block
//! programs (`device`) use, with the accessors to reach them.
//!
//! A module below both so imports go one way: `uring` → `device` (to split a passthrough
//! request into stages) and both → `maps`; `device` never imports `uring`. The NVMe programs
//! stamp times into the io_uring in-flight entries and count their drops in the io_uring
//! statistics, which is why those live here and not in `uring`.
//!
//! Also the one map the block program and the cuFile programs share, [`PEER_IO`]: the block
//! layer is where peer memory is seen, the cuFile return is where it names the path.

use aya_ebpf::{
    helpers::generated::bpf_get_current_comm,
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
};
use gds_common::{
    COMM_LEN, DEFAULT_MAX_INFLIGHT, DEFAULT_SLOTS, InflightReq, InflightSlot, OPCODE_WORDS,
    OpcodeCpuStats, PEER_IO_MAX, Scratch, URING_OPCODES, UringConfig, UringCpuStats,
};

use crate::slots::SlotTable;

#[unsafe(no_mangle)]
pub(crate) static GDS_URING_CONFIG: UringConfig = UringConfig::DEFAULT;

/// Reads a field of [`GDS_URING_CONFIG`].
macro_rules! conf {
    ($field:ident) => {
        // Volatile so LLVM keeps the load from .rodata: the verifier turns it into a constant,
        // which is what makes the direct struct loads in `uring` verifiable.
        unsafe { core::ptr::read_volatile(&crate::maps::GDS_URING_CONFIG.$field) }
    };
}
pub(crate) use conf;

/// Statistics not tied to an opcode (drops, in-flight counts, scratch words).
#[map(name = "GDS_URING_STATS")]
static STATS: PerCpuArray<UringCpuStats> = PerCpuArray::with_max_entries(1, 0);

/// Statistics per opcode, indexed by the opcode itself: a `u8` key is always below the 256
/// entries, so no clamp, and recent kernels inline a per-CPU array lookup (6.18 does: `bpftool
/// prog dump xlated`), so an event pays a few instructions for its opcode's entry.
#[map(name = "GDS_URING_OPCODES")]
static OPCODES: PerCpuArray<OpcodeCpuStats> =
    PerCpuArray::with_max_entries(URING_OPCODES as u32, 0);

/// Direct-mapped in-flight table: the common path. An array slot is found by an inlined
/// lookup and claimed with one compare-and-swap, where a hash map insert + lookup + delete
/// costs ~150 ns per request. Requests whose slot is taken fall back to `INFLIGHT`.
/// Mmapable so user space can scan in-flight requests without a syscall per slot.
#[map(name = "GDS_URING_SLOTS")]
static SLOTS: Array<InflightSlot> = Array::with_max_entries(DEFAULT_SLOTS, BPF_F_MMAPABLE);

pub(crate) const BPF_F_MMAPABLE: u32 = 1 << 10;

#[map(name = "GDS_URING_INFLIGHT")]
static INFLIGHT: HashMap<u64, InflightReq> = HashMap::with_max_entries(DEFAULT_MAX_INFLIGHT, 0);

/// The io_uring requests in flight: [`SLOTS`] (`slot_mask` + 1 of them, set at load) in front
/// of [`INFLIGHT`].
#[inline(always)]
pub(crate) fn requests() -> SlotTable<InflightReq, HashMap<u64, InflightReq>> {
    SlotTable {
        slots: &SLOTS,
        overflow: &INFLIGHT,
        mask: conf!(slot_mask),
    }
}

/// Block requests into P2PDMA memory per process (`tgid` → count). LRU: a process that stops
/// doing such I/O ages out; only P2PDMA requests write here, so host I/O never costs a lookup.
#[map(name = "GDS_PEER_IO")]
pub(crate) static PEER_IO: LruHashMap<u32, u64> = LruHashMap::with_max_entries(PEER_IO_MAX, 0);

/// The process's count in [`PEER_IO`] (0 when it has none).
#[inline(always)]
pub(crate) fn peer_ios(tgid: u32) -> u64 {
    match PEER_IO.get_ptr(&tgid) {
        // SAFETY: map value pointer; a plain load (another CPU may be adding).
        Some(p) => unsafe { core::ptr::read_volatile(p) },
        None => 0,
    }
}

/// Task filters (`--pid`, `--comm`), evaluated in the current task: the io_uring programs and
/// the cuFile programs apply the same ones.
#[inline(always)]
pub(crate) fn task_enabled(tgid: u32) -> bool {
    let want = conf!(filter_tgid);
    if want != 0 && want != tgid {
        return false;
    }
    if conf!(filter_comm_on) != 0 {
        // Two words, not aya's zeroed `[u8; 16]`: LLVM zeroes that with a call to a
        // byte-by-byte `memset` subprogram, whose frame counts against the 512-byte stack of
        // every program that inlines this (6.1's verifier refused the kiocb programs for it).
        let mut buf = core::mem::MaybeUninit::<[u64; COMM_LEN / 8]>::uninit();
        // SAFETY: the helper writes all 16 bytes (the name, NUL-padded) or fails; its argument
        // may be uninitialized memory.
        if unsafe { bpf_get_current_comm(buf.as_mut_ptr().cast(), COMM_LEN as u32) } != 0 {
            return false;
        }
        // SAFETY: written by the helper above.
        let words = unsafe { buf.assume_init() };
        let mut i = 0;
        while i < COMM_LEN {
            let want = unsafe { core::ptr::read_volatile(&GDS_URING_CONFIG.filter_comm[i]) };
            let got = (words[i / 8] >> ((i % 8) * 8)) as u8;
            if got != want {
                return false;
            }
            if want == 0 {
                break;
            }
            i += 1;
        }
    }
    true
}

#[inline(always)]
pub(crate) fn stats() -> Option<&'static mut UringCpuStats> {
    STATS.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

/// This CPU's statistics of `opcode`. Every `u8` has an entry, so this fails only if the map
/// does (never, for an array).
#[inline(always)]
pub(crate) fn opcode_stats(opcode: u8) -> Option<&'static mut OpcodeCpuStats> {
    OPCODES
        .get_ptr_mut(opcode as u32)
        .map(|p| unsafe { &mut *p })
}

/// Marks `opcode` in [`UringCpuStats::opcodes_seen`] (user space reads only marked entries).
#[inline(always)]
pub(crate) fn mark_seen(stats: &mut UringCpuStats, opcode: u8) {
    let op = opcode as u64;
    if let Some(w) = index(op >> 6, OPCODE_WORDS).and_then(|w| stats.opcodes_seen.get_mut(w)) {
        *w |= 1u64 << (op & 63);
    }
}

/// `v` as an index below `len`, or None. The value goes through a stack slot first so the
/// bounds check is made on the very register used to index: older verifiers (6.1) do not carry
/// a bound over to a zero-extended copy that LLVM may take before the comparison.
#[inline(always)]
pub(crate) fn index(v: u64, len: usize) -> Option<usize> {
    let x = v;
    let x = unsafe { core::ptr::read_volatile(&x) };
    if x < len as u64 {
        Some(x as usize)
    } else {
        None
    }
}

/// `req` as a plain integer: a round trip through a map value, since the verifier treats a
/// typed kernel pointer as a pointer even after `as u64` and refuses to hash it.
#[inline(always)]
pub(crate) fn as_scalar(stats: &mut UringCpuStats, word: Scratch, req: u64) -> u64 {
    let w = &raw mut stats.scratch[word as usize];
    unsafe {
        core::ptr::write_volatile(w, req);
        core::ptr::read_volatile(w)
    }
}

/// The in-flight entry of io_uring request `req` (slot table or hash map), if tracked.
#[inline(always)]
pub(crate) fn entry_mut(req: u64) -> Option<*mut InflightReq> {
    requests().get_mut(req)
}
