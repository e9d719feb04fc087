//! Page-aligned, zeroed host buffers for NVMe data transfers.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// Alignment of every [`DmaBuffer`]: a page, which satisfies any queue/dma_alignment and lets the
/// kernel map the buffer without bouncing.
pub const DMA_BUFFER_ALIGN: usize = 4096;

/// A heap buffer aligned to [`DMA_BUFFER_ALIGN`]. Its address never changes, so it can be handed
/// to the kernel (and registered as a fixed buffer) for as long as it lives.
pub struct DmaBuffer {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: DmaBuffer owns its allocation exclusively, like Vec<u8>.
unsafe impl Send for DmaBuffer {}
unsafe impl Sync for DmaBuffer {}

impl DmaBuffer {
    /// A zeroed buffer of `len` bytes (at least one page is allocated for `len == 0`).
    pub fn new(len: usize) -> Self {
        let layout = Layout::from_size_align(len.max(1), DMA_BUFFER_ALIGN)
            .expect("DmaBuffer length overflows isize");
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        Self { ptr, len }
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// The buffer as an iovec, for `register_buffers`.
    pub fn iovec(&mut self) -> libc::iovec {
        libc::iovec {
            iov_base: self.ptr.as_ptr().cast(),
            iov_len: self.len,
        }
    }
}

impl Deref for DmaBuffer {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for len initialised (zeroed) bytes for our lifetime.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for DmaBuffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for DmaBuffer {
    fn drop(&mut self) {
        let layout = Layout::from_size_align(self.len.max(1), DMA_BUFFER_ALIGN).unwrap();
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.ptr.as_ptr(), layout) }
    }
}

impl std::fmt::Debug for DmaBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmaBuffer")
            .field("ptr", &self.ptr)
            .field("len", &self.len)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_zeroed() {
        let mut b = DmaBuffer::new(12_345);
        assert_eq!(b.as_ptr() as usize % DMA_BUFFER_ALIGN, 0);
        assert_eq!(b.len(), 12_345);
        assert!(b.iter().all(|&x| x == 0));
        b[12_344] = 7;
        assert_eq!(b.iovec().iov_len, 12_345);
        assert_eq!(DmaBuffer::new(0).len(), 0);
    }
}
