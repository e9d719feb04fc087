//! The `gds` route (cuFile through nvidia-fs or the kernel's P2PDMA) and its peer, cuFile
//! compat mode, through cudarc's cuFile binding (loaded at run time; nothing links libcufile).
//!
//! What compat mode needs (checked here before the driver is opened, and named in the error):
//! - `libcufile.so` loadable (on the loader path: CUDA installs it under
//!   `/usr/local/cuda/targets/x86_64-linux/lib`, which may need `LD_LIBRARY_PATH`);
//! - compat allowed: `"allow_compat_mode": true` in `/etc/cufile.json` (or the file named by
//!   `CUFILE_ENV_PATH_JSON`); `CUFILE_FORCE_COMPAT_MODE=true` forces it even when nvidia-fs is
//!   loaded (this module sets it for the compat route before `cuFileDriverOpen`);
//! - a CUDA context current on the calling thread, and `cuFileDriverOpen` before
//!   `cuFileHandleRegister` (without it registration fails with 5027,
//!   CU_FILE_HANDLE_NOT_REGISTERED);
//! - udev properties of the file's block device (`ID_FS_USAGE`, `ID_FS_TYPE`): cuFile reads
//!   them at `cuFileHandleRegister` even in compat mode, and fails with 5027 without them (a
//!   host with no udevd database, e.g. a microVM or container; see [`UDEV_HINT`]);
//! - the file opened with O_DIRECT where the file system supports it (cuFile's GDS mode needs
//!   it; compat mode then does its own O_DIRECT/buffered POSIX reads through bounce buffers).

use std::os::fd::AsRawFd;
use std::sync::{Arc, Barrier};
use std::time::Instant;

use cudarc::cufile::{result as cf, sys as cfs};

use super::bounce::{Jobs, Plan, Progress, Stats};
use super::cuda::{DeviceBuffer, Gpu};
use super::error::{DatapathError, Result};
use super::source::Source;

/// Seen on hosts without udevd's database (containers, microVMs): cuFile asks udev for the
/// file system properties of the file's block device, and without them it refuses the handle,
/// compat mode included.
pub const UDEV_HINT: &str = ": cuFile could not read the udev properties (ID_FS_USAGE, ID_FS_TYPE) of the \
     file's block device; without udevd (containers, microVMs) it refuses every handle, compat \
     mode included. Run udevd, or give cuFile /run/udev/data/b<MAJ>:<MIN> with \
     E:ID_FS_USAGE=filesystem and E:ID_FS_TYPE=<fs>; CUFILE_LOGGING_LEVEL=INFO shows its reasons";

/// Which cuFile mode to ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// GDS proper: refuse to run in compat mode.
    Gds,
    /// Compat mode (forced).
    Compat,
}

/// An open cuFile driver.
pub struct Driver {
    pub props: cfs::CUfileDrvProps,
    pub mode: Mode,
    /// Puts `CUFILE_FORCE_COMPAT_MODE` back when the driver closes (cuFile reads it at open and
    /// at handle registration; it must not leak into later routes or child processes, whose
    /// probe would call gds blocked). Dropped after `Drop::drop` closed the driver.
    _env: EnvGuard,
}

struct EnvGuard(Option<Option<std::ffi::OsString>>);

impl Drop for EnvGuard {
    fn drop(&mut self) {
        if let Some(old) = self.0.take() {
            // SAFETY: the command's thread, after every cuFile worker has joined.
            unsafe {
                match old {
                    Some(v) => std::env::set_var("CUFILE_FORCE_COMPAT_MODE", v),
                    None => std::env::remove_var("CUFILE_FORCE_COMPAT_MODE"),
                }
            }
        }
    }
}

fn err(what: &'static str, e: impl std::fmt::Debug) -> DatapathError {
    DatapathError::Cufile {
        what,
        detail: format!("{e:?}"),
    }
}

/// Whether `allow_compat_mode` is enabled in the cuFile config that the library will read.
fn compat_allowed() -> std::result::Result<(), String> {
    let path = std::env::var("CUFILE_ENV_PATH_JSON")
        .ok()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "/etc/cufile.json".to_owned());
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        // cuFile's built-in default allows compat mode.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("cannot read {path}: {e}")),
    };
    match gds_probe::cufile::parse_config(&text) {
        Ok(c) if c.allow_compat_mode == Some(false) => Err(format!(
            "{path} sets \"allow_compat_mode\": false (set it to true)"
        )),
        Ok(_) => Ok(()),
        Err(e) => Err(format!("cannot parse {path}: {e}")),
    }
}

impl Driver {
    /// Open the cuFile driver for `mode` on `gpu` (which is made current).
    pub fn open(gpu: &Gpu, mode: Mode) -> Result<Self> {
        // SAFETY: only probes whether the library loads.
        if !unsafe { cfs::is_culib_present() } {
            return Err(DatapathError::Cufile {
                what: "load",
                detail: "libcufile.so is not on the loader path (install the CUDA cuFile \
                         library, or add its directory, e.g. /usr/local/cuda/targets/x86_64-linux/lib, \
                         to LD_LIBRARY_PATH)"
                    .into(),
            });
        }
        let mut restore: Option<Option<std::ffi::OsString>> = None;
        if mode == Mode::Compat {
            compat_allowed().map_err(|detail| DatapathError::Cufile {
                what: "compat mode",
                detail,
            })?;
            if std::env::var("CUFILE_FORCE_COMPAT_MODE").as_deref() != Ok("true") {
                restore = Some(std::env::var_os("CUFILE_FORCE_COMPAT_MODE"));
                // SAFETY: set before cuFileDriverOpen, from the command's thread, while no
                // other thread of ours reads the environment.
                unsafe { std::env::set_var("CUFILE_FORCE_COMPAT_MODE", "true") };
            }
        }
        let env = EnvGuard(restore);
        gpu.bind()?;
        cf::driver_open().map_err(|e| err("cuFileDriverOpen", e))?;
        let props = cf::driver_get_properties().map_err(|e| {
            let _ = cf::driver_close();
            err("cuFileDriverGetProperties", e)
        })?;
        Ok(Driver {
            props,
            mode,
            _env: env,
        })
    }

    /// nvidia-fs version the driver reports (0.0 when it runs without it).
    pub fn nvfs_version(&self) -> (u32, u32) {
        (self.props.nvfs.major_version, self.props.nvfs.minor_version)
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = cf::driver_close();
    }
}

/// A registered file.
pub struct Handle {
    fh: cfs::CUfileHandle_t,
}

// SAFETY: cuFile handles are usable from any thread.
unsafe impl Send for Handle {}
unsafe impl Sync for Handle {}

impl Handle {
    pub fn register(_driver: &Driver, source: &Source) -> Result<Self> {
        let descr = cfs::CUfileDescr_t {
            type_: cfs::CUfileFileHandleType::CU_FILE_HANDLE_TYPE_OPAQUE_FD,
            handle: cfs::CUfileDescr_t__bindgen_ty_1 {
                fd: source.file.as_raw_fd(),
            },
            fs_ops: std::ptr::null(),
        };
        let fh = cf::handle_register(&descr).map_err(|e| DatapathError::Cufile {
            what: "cuFileHandleRegister",
            detail: format!(
                "{e:?} for {} (opened {}){}",
                source.data_path.display(),
                if source.direct {
                    "O_DIRECT"
                } else {
                    "buffered"
                },
                missing_udev_properties(source).unwrap_or_default()
            ),
        })?;
        Ok(Handle { fh })
    }
}

/// [`UDEV_HINT`] with the device named, when udev has no `ID_FS_USAGE` for the block device
/// that holds `source` (the cause of most registration failures outside a full OS install).
fn missing_udev_properties(source: &Source) -> Option<String> {
    use std::os::unix::fs::MetadataExt as _;
    let dev = source.file.metadata().ok()?.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let path = format!("/run/udev/data/b{major}:{minor}");
    let props = std::fs::read_to_string(&path).unwrap_or_default();
    if props.lines().any(|l| l.starts_with("E:ID_FS_USAGE=")) {
        return None;
    }
    Some(format!(
        "{UDEV_HINT} (here: {path} {})",
        if props.is_empty() {
            "does not exist"
        } else {
            "has no ID_FS_USAGE"
        }
    ))
}

impl Handle {
    /// One synchronous `cuFileRead` of `len` bytes at `offset` into the start of `dst`; the
    /// bytes read.
    pub fn read(&self, dst: &DeviceBuffer, len: usize, offset: u64) -> Result<usize> {
        let len = len.min(dst.len);
        // SAFETY: the device range [dst.ptr, dst.ptr + len) is inside dst's allocation.
        let n = unsafe { cf::read(self.fh, dst.ptr as *mut _, len, offset as i64, 0) }
            .map_err(|e| err("cuFileRead", e))?;
        Ok(n as usize)
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: registered in `register`, no I/O outstanding (reads are synchronous).
        let _ = unsafe { cf::handle_deregister(self.fh) };
    }
}

/// Read `plan` into `dst` with `threads` threads issuing cuFileRead (synchronous calls).
pub fn run(
    driver: &Driver,
    source: &Source,
    plan: &Plan,
    dst: &DeviceBuffer,
    threads: usize,
    latencies: bool,
    progress: &Progress,
) -> Result<Stats> {
    let handle = Handle::register(driver, source)?;
    let gpu: Arc<Gpu> = dst.gpu().clone();
    let mut notes = Vec::new();
    // Registration helps GDS mode; compat mode does not need it.
    // SAFETY: the range is dst's whole allocation.
    let registered = match unsafe { cf::buf_register(dst.ptr as *const _, dst.len, 0) } {
        Ok(()) => true,
        Err(e) => {
            notes.push(format!(
                "cuFileBufRegister failed ({e:?}): unregistered buffer"
            ));
            false
        }
    };
    let threads = threads.max(1);
    let barrier = Barrier::new(threads + 1);
    let mut start = Instant::now();
    let results: Vec<Result<Stats>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|w| {
                let (barrier, handle, gpu) = (&barrier, &handle, &gpu);
                s.spawn(move || -> Result<Stats> {
                    let bound = gpu.bind();
                    barrier.wait();
                    bound?;
                    let mut jobs = Jobs::new(plan, w, threads);
                    jobs.start();
                    let mut st = Stats::default();
                    while let Some((off, want)) = jobs.next() {
                        let rel = (off - plan.range.offset) % dst.len as u64;
                        let t = Instant::now();
                        // SAFETY: the device range is inside dst.
                        let n = unsafe {
                            cf::read(
                                handle.fh,
                                dst.ptr as *mut _,
                                want as usize,
                                off as i64,
                                rel as i64,
                            )
                        }
                        .map_err(|e| err("cuFileRead", e))?;
                        if (n as u64) < want {
                            return Err(DatapathError::ShortRead {
                                path: source.path.clone(),
                                offset: off + n as u64,
                                wanted: want - n as u64,
                            });
                        }
                        progress.record(&mut st, want, t.elapsed(), latencies);
                    }
                    Ok(st)
                })
            })
            .collect();
        barrier.wait();
        start = Instant::now();
        hs.into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(DatapathError::Invalid("cuFile worker panicked".into()))
                })
            })
            .collect()
    });
    let elapsed = start.elapsed();
    if registered {
        // SAFETY: registered above, no I/O outstanding.
        let _ = unsafe { cf::buf_deregister(dst.ptr as *const _) };
    }
    let mut total = Stats {
        elapsed,
        notes,
        ..Stats::default()
    };
    for r in results {
        let s = r?;
        total.bytes += s.bytes;
        total.ios += s.ios;
        total.latencies_ns.extend(s.latencies_ns);
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    #[test]
    fn compat_config_check_reads_the_real_file_or_defaults() {
        // Without /etc/cufile.json cuFile's defaults allow compat mode; with one, its setting
        // decides. Either way the check answers instead of failing on a missing library.
        let r = super::compat_allowed();
        match std::fs::read_to_string("/etc/cufile.json") {
            Err(_) => assert!(r.is_ok()),
            Ok(t) if t.contains("\"allow_compat_mode\": false") => assert!(r.is_err()),
            Ok(_) => {}
        }
    }
}
