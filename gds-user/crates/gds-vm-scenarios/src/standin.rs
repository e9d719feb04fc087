//! The stand-in libcufile (`gds-user/tests/fixtures/libcufile_standin.c`, which says why it
//! exists), installed in every guest as `/bin/libcufile.so.0` by `cargo xtask vm-test`:
//! loaded into the scenario process with dlopen and called through cuFile's signatures, so
//! the agent's uprobes fire in this process.

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};

use crate::Ctx;
use crate::tracing::json;

pub const STANDIN: &str = "/bin/libcufile.so.0";

/// `CUfileDescr_t`: the type, then the descriptor after an int of padding.
#[repr(C)]
struct Descr {
    ty: i32,
    _pad: i32,
    fd: i32,
    _rest: [u8; 52],
}

type Register = unsafe extern "C" fn(*mut usize, *const Descr) -> u64;
pub type Read = unsafe extern "C" fn(usize, *mut u8, usize, i64, i64) -> isize;

/// The library loaded into this process (never closed: the process ends first).
pub struct Standin {
    register: Register,
    pub read: Read,
}

/// `name` from the library `lib` (a dlopen handle).
fn symbol<T: Copy>(lib: *mut libc::c_void, name: &str) -> Result<T> {
    let cname = std::ffi::CString::new(name)?;
    // SAFETY: a valid handle and a C string; the symbol's type is the caller's.
    let p = unsafe { libc::dlsym(lib, cname.as_ptr()) };
    ensure!(!p.is_null(), "{STANDIN} has no {name}");
    // SAFETY: T is a function pointer type of the symbol's signature.
    Ok(unsafe { std::mem::transmute_copy(&p) })
}

impl Standin {
    /// dlopens the stand-in and waits until the agent has attached it for process `me` (within
    /// milliseconds of the dlopen: the loader's notification).
    pub fn open(c: &Ctx, me: u64) -> Result<Standin> {
        let path = std::ffi::CString::new(STANDIN)?;
        // SAFETY: dlopen of a plain shared library; never closed (the process ends first).
        let lib = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW) };
        ensure!(!lib.is_null(), "dlopen {STANDIN} failed");
        let standin = Standin {
            register: symbol(lib, "cuFileHandleRegister")?,
            read: symbol(lib, "cuFileRead")?,
        };
        let start = Instant::now();
        loop {
            let r = json("/debug/cufile")?;
            let attached = r["libraries"].as_array().into_iter().flatten().any(|l| {
                l["pids"]
                    .as_array()
                    .is_some_and(|p| p.iter().any(|p| p.as_u64() == Some(me)))
            });
            if attached {
                break;
            }
            ensure!(
                start.elapsed() < Duration::from_secs(2),
                "stand-in libcufile not attached 2 s after dlopen: {r}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        c.detail(format!("attached {:?} after dlopen", start.elapsed()));
        Ok(standin)
    }

    /// `cuFileHandleRegister` of descriptor `fd`: the handle.
    pub fn register(&self, fd: i32) -> Result<usize> {
        let descr = Descr {
            ty: 1,
            _pad: 0,
            fd,
            _rest: [0; 52],
        };
        let mut fh = 0usize;
        // SAFETY: cuFile's signature; both pointers live across the call.
        let err = unsafe { (self.register)(&mut fh, &descr) };
        ensure!(err as u32 == 0, "cuFileHandleRegister: {err:#x}");
        Ok(fh)
    }

    /// `n` cuFileReads of `size` bytes at offset 0 of handle `fh` into a host buffer.
    pub fn reads(&self, fh: usize, n: u64, size: usize) -> Result<()> {
        let mut buf = vec![0u8; size];
        for i in 0..n {
            // SAFETY: the buffer holds `size` bytes and outlives the call.
            let got = unsafe { (self.read)(fh, buf.as_mut_ptr(), size, 0, 0) };
            ensure!(got == size as isize, "cuFileRead {i} returned {got}");
        }
        Ok(())
    }
}
