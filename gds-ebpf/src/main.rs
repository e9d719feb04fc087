//! gds eBPF programs.
//!
//! One function per attach point; the per-event logic lives in small `#[inline(always)]`
//! helpers shared by the BTF programs (preferred: the kernel hands its own pointers, no record
//! is formatted) and the classic tracepoint programs (fallback for kernels without BTF).
#![no_std]
#![no_main]
#![allow(internal_features)]
#![feature(core_intrinsics)]

mod cufile;
mod device;
mod file;
mod file_kiocb;
mod floor;
mod maps;
mod slots;
mod uring;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
