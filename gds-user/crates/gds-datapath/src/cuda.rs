//! The few CUDA driver calls the data path needs, through cudarc's dynamically loaded driver
//! API: nothing here links against CUDA, and without `libcuda.so` every entry point returns
//! [`DatapathError::NoGpu`] instead of panicking.

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::result as cu;
use cudarc::driver::sys;

use super::error::{DatapathError, Result};
use gds_nvme::DmaBuffer;

/// Why no GPU can be used here, or `None` when one can (for tests that skip).
pub fn unavailable(ordinal: u32) -> Option<String> {
    Gpu::open(ordinal).err().map(|e| e.to_string())
}

/// A GPU with its primary context retained; [`Gpu::bind`] makes it current on a thread.
#[derive(Debug)]
pub struct Gpu {
    pub ordinal: u32,
    dev: sys::CUdevice,
    ctx: sys::CUcontext,
    pub name: String,
}

// SAFETY: a CUDA context may be used from any thread once made current there.
unsafe impl Send for Gpu {}
unsafe impl Sync for Gpu {}

impl Gpu {
    pub fn open(ordinal: u32) -> Result<Arc<Gpu>> {
        // SAFETY: only probes whether the library loads.
        if !unsafe { sys::is_culib_present() } {
            return Err(DatapathError::NoGpu(
                "the CUDA driver library (libcuda.so) is not installed".into(),
            ));
        }
        cu::init().map_err(|e| DatapathError::NoGpu(format!("cuInit: {e:?}")))?;
        let count =
            cu::device::get_count().map_err(|e| DatapathError::cuda("cuDeviceGetCount", e))?;
        if ordinal as i32 >= count {
            return Err(DatapathError::NoGpu(format!(
                "GPU {ordinal} requested, {count} present"
            )));
        }
        let dev =
            cu::device::get(ordinal as i32).map_err(|e| DatapathError::cuda("cuDeviceGet", e))?;
        // SAFETY: dev is a valid device handle.
        let ctx = unsafe { cu::primary_ctx::retain(dev) }
            .map_err(|e| DatapathError::cuda("cuDevicePrimaryCtxRetain", e))?;
        let name = cu::device::get_name(dev).unwrap_or_default();
        let gpu = Arc::new(Gpu {
            ordinal,
            dev,
            ctx,
            name,
        });
        gpu.bind()?;
        Ok(gpu)
    }

    /// Make this GPU's context current on the calling thread.
    pub fn bind(&self) -> Result<()> {
        // SAFETY: ctx is a retained primary context.
        unsafe { cu::ctx::set_current(self.ctx) }
            .map_err(|e| DatapathError::cuda("cuCtxSetCurrent", e))
    }

    pub fn alloc(self: &Arc<Self>, len: usize) -> Result<DeviceBuffer> {
        self.bind()?;
        // SAFETY: plain allocation in the current context.
        let ptr = unsafe { cu::malloc_sync(len.max(1)) }
            .map_err(|e| DatapathError::cuda("cuMemAlloc", e))?;
        Ok(DeviceBuffer {
            ptr,
            len,
            gpu: self.clone(),
        })
    }

    pub fn pinned(self: &Arc<Self>, len: usize) -> Result<PinnedBuffer> {
        self.bind()?;
        // SAFETY: cuMemHostAlloc; PORTABLE so every context sees it pinned.
        let ptr = unsafe { cu::malloc_host(len.max(1), sys::CU_MEMHOSTALLOC_PORTABLE) }
            .map_err(|e| DatapathError::cuda("cuMemHostAlloc", e))?;
        Ok(PinnedBuffer {
            ptr: ptr.cast(),
            len,
            gpu: self.clone(),
            registered: None,
        })
    }

    /// `count` pinned buffers of `len` bytes for reads kept in flight together: carved from one
    /// huge-page-advised mapping ([`DmaBuffer::many`], which says why: fewer, larger physical
    /// pieces per O_DIRECT read) and page-locked with cuMemHostRegister, so reads into them
    /// are as cheap as the host route's and the copies to the GPU as fast as from
    /// cuMemHostAlloc memory.
    pub fn pinned_many(self: &Arc<Self>, count: usize, len: usize) -> Result<Vec<PinnedBuffer>> {
        self.bind()?;
        DmaBuffer::many(count, len.max(1))
            .into_iter()
            .map(|mut host| {
                let ptr = host.as_mut_ptr();
                // SAFETY: ptr..ptr+len is memory `host` owns; it stays registered until the
                // PinnedBuffer unregisters it in Drop, before `host` is freed.
                unsafe {
                    sys::cuMemHostRegister_v2(
                        ptr.cast(),
                        host.len(),
                        sys::CU_MEMHOSTREGISTER_PORTABLE,
                    )
                }
                .result()
                .map_err(|e| DatapathError::cuda("cuMemHostRegister", e))?;
                Ok(PinnedBuffer {
                    ptr,
                    len,
                    gpu: self.clone(),
                    registered: Some(host),
                })
            })
            .collect()
    }

    pub fn stream(self: &Arc<Self>) -> Result<Stream> {
        self.bind()?;
        let s = cu::stream::create(cu::stream::StreamKind::NonBlocking)
            .map_err(|e| DatapathError::cuda("cuStreamCreate", e))?;
        Ok(Stream(s))
    }

    pub fn event(self: &Arc<Self>) -> Result<Event> {
        self.bind()?;
        let e = cu::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING)
            .map_err(|e| DatapathError::cuda("cuEventCreate", e))?;
        Ok(Event(e))
    }

    /// Device attribute, e.g. for the report.
    pub fn attribute(&self, attr: sys::CUdevice_attribute) -> Option<i32> {
        // SAFETY: valid device handle.
        unsafe { cu::device::get_attribute(self.dev, attr) }.ok()
    }
}

impl Drop for Gpu {
    fn drop(&mut self) {
        // SAFETY: balances the retain in `open`.
        let _ = unsafe { cu::primary_ctx::release(self.dev) };
    }
}

/// Device memory (cuMemAlloc).
#[derive(Debug)]
pub struct DeviceBuffer {
    pub ptr: sys::CUdeviceptr,
    pub len: usize,
    gpu: Arc<Gpu>,
}

impl DeviceBuffer {
    /// Copy `dst.len()` bytes at `offset` back to the host (synchronous).
    pub fn copy_to_host(&self, offset: usize, dst: &mut [u8]) -> Result<()> {
        assert!(offset + dst.len() <= self.len, "copy_to_host out of range");
        self.gpu.bind()?;
        // SAFETY: the device range is inside this allocation; dst is valid host memory.
        unsafe { cu::memcpy_dtoh_sync(dst, self.ptr + offset as u64) }
            .map_err(|e| DatapathError::cuda("cuMemcpyDtoH", e))
    }

    pub fn fill(&self, byte: u8) -> Result<()> {
        self.gpu.bind()?;
        // SAFETY: the whole allocation.
        unsafe { cu::memset_d8_sync(self.ptr, byte, self.len) }
            .map_err(|e| DatapathError::cuda("cuMemsetD8", e))
    }

    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        let _ = self.gpu.bind();
        // SAFETY: allocated by cuMemAlloc; every copy into it has been waited for by its owner.
        let _ = unsafe { cu::free_sync(self.ptr) };
    }
}

/// Page-locked host memory (cuMemHostAlloc, or a [`DmaBuffer`] registered with
/// cuMemHostRegister): page-aligned, so it also serves O_DIRECT and io_uring registered
/// buffers.
#[derive(Debug)]
pub struct PinnedBuffer {
    ptr: *mut u8,
    len: usize,
    gpu: Arc<Gpu>,
    /// The memory, when it was registered rather than allocated by CUDA.
    registered: Option<DmaBuffer>,
}

// SAFETY: owned memory, like Vec<u8>.
unsafe impl Send for PinnedBuffer {}

impl PinnedBuffer {
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr
    }
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for len bytes while self lives.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for PinnedBuffer {
    fn drop(&mut self) {
        let _ = self.gpu.bind();
        if self.registered.is_some() {
            // SAFETY: registered in `pinned_many`; the DmaBuffer is dropped after this.
            let _ = unsafe { sys::cuMemHostUnregister(self.ptr.cast::<c_void>()) };
            return;
        }
        // SAFETY: allocated by cuMemHostAlloc.
        let _ = unsafe { cu::free_host(self.ptr.cast::<c_void>()) };
    }
}

#[derive(Debug)]
pub struct Stream(pub sys::CUstream);

// SAFETY: CUDA streams may be used from any thread with the context current.
unsafe impl Send for Stream {}

impl Stream {
    /// Queue a host→device copy. The caller keeps `src` alive and unchanged until an event
    /// recorded after it completes.
    ///
    /// # Safety
    /// `dst .. dst + len` must be inside a live device allocation and `src .. src + len` valid
    /// pinned host memory until the copy completes.
    pub unsafe fn copy_h2d(&self, dst: sys::CUdeviceptr, src: *const u8, len: usize) -> Result<()> {
        // SAFETY: forwarded to the caller.
        unsafe { cu::memcpy_htod_async(dst, std::slice::from_raw_parts(src, len), self.0) }
            .map_err(|e| DatapathError::cuda("cuMemcpyHtoDAsync", e))
    }

    pub fn synchronize(&self) -> Result<()> {
        // SAFETY: valid stream.
        unsafe { cu::stream::synchronize(self.0) }
            .map_err(|e| DatapathError::cuda("cuStreamSynchronize", e))
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        // SAFETY: valid stream; pending work completes before its resources go.
        let _ = unsafe { cu::stream::destroy(self.0) };
    }
}

#[derive(Debug)]
pub struct Event(sys::CUevent);

// SAFETY: as for streams.
unsafe impl Send for Event {}

impl Event {
    pub fn record(&self, stream: &Stream) -> Result<()> {
        // SAFETY: valid event and stream.
        unsafe { cu::event::record(self.0, stream.0) }
            .map_err(|e| DatapathError::cuda("cuEventRecord", e))
    }

    /// Whether the work before the last record has completed.
    pub fn done(&self) -> Result<bool> {
        // SAFETY: valid event.
        match unsafe { cu::event::query(self.0) } {
            Ok(()) => Ok(true),
            Err(e) if e.0 == sys::CUresult::CUDA_ERROR_NOT_READY => Ok(false),
            Err(e) => Err(DatapathError::cuda("cuEventQuery", e)),
        }
    }

    pub fn wait(&self) -> Result<()> {
        // SAFETY: valid event.
        unsafe { cu::event::synchronize(self.0) }
            .map_err(|e| DatapathError::cuda("cuEventSynchronize", e))
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: valid event.
        let _ = unsafe { cu::event::destroy(self.0) };
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn no_driver_is_an_error_not_a_panic() {
        // On hosts with a GPU this opens it; without libcuda it must say why.
        match super::Gpu::open(0) {
            Ok(g) => eprintln!("GPU 0 present: {}", g.name),
            Err(e) => {
                let msg = e.to_string();
                eprintln!("no GPU (expected on CI): {msg}");
                assert!(msg.contains("GPU") || msg.contains("CUDA"), "{msg}");
            }
        }
        assert!(super::Gpu::open(4096).is_err());
    }
}
