//! GPUs: PCI sysfs (works under any root), the NVIDIA driver's procfs, and — on a live host —
//! the CUDA driver API (cudarc, loaded with dlopen) and NVML (libnvidia-ml, loaded with dlopen).
//!
//! Nothing here links against CUDA: a host without libcuda gets GPU facts from sysfs and a reason
//! for each fact only CUDA or NVML can give.

use std::ffi::{CStr, c_char, c_int, c_uint, c_void};

use serde::Serialize;

use super::Fact;
use super::bounded::HostRoot;
use super::pci;

pub const NVIDIA_VENDOR: &str = "0x10de";

/// Why the CUDA driver API or NVML gave no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GpuError {
    #[error("libcuda is not installed (dlopen of libcuda.so / libcuda.so.1 failed)")]
    NoLibcuda,
    #[error("{call} failed: {result}")]
    Cuda { call: String, result: String },
    #[error("{0} panicked (a symbol missing from the library?)")]
    Panicked(&'static str),
    #[error("{what} did not return within {secs} s (a wedged GPU or driver?)")]
    Timeout { what: &'static str, secs: u64 },
    #[error("cannot start a thread for {what}: {message}")]
    Thread { what: &'static str, message: String },
    #[error("libnvidia-ml is not installed ({0})")]
    NoNvml(String),
    #[error("{0} is missing from libnvidia-ml")]
    NvmlSymbol(&'static str),
    #[error("{call} failed: NVML error {code}")]
    Nvml { call: String, code: i32 },
}

/// The dlopen message behind a libloading error ("libnvidia-ml.so.1: cannot open shared object
/// file: No such file or directory"), which its Display leaves out.
fn dl_reason(err: &libloading::Error) -> String {
    use std::error::Error as _;
    match err.source() {
        Some(source) => source.to_string(),
        None => err.to_string(),
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct GpuSection {
    /// `/proc/driver/nvidia/version`: the kernel driver's version line.
    pub kernel_driver: Fact<NvidiaKernelDriver>,
    /// `RMForceStaticBar1=1` in the driver's RegistryDwords (needed for upstream P2PDMA).
    pub static_bar1: Fact<bool>,
    /// CUDA driver API through cudarc (live hosts only).
    pub cuda: Fact<CudaDriver>,
    /// NVML (live hosts only).
    pub nvml: Fact<String>,
    pub gpus: Vec<Gpu>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct NvidiaKernelDriver {
    pub version: String,
    /// The open GPU kernel modules (required for P2PDMA and dma-buf export).
    pub open_kernel_module: bool,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct CudaDriver {
    /// e.g. "13.0"
    pub version: String,
    pub device_count: u32,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PcieLink {
    pub current_gen: Option<u32>,
    pub current_width: Option<u32>,
    pub max_gen: Option<u32>,
    pub max_width: Option<u32>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Gpu {
    /// CUDA ordinal when CUDA is available, else the order in PCI sysfs.
    pub index: u32,
    /// PCI address, `0000:01:00.0`.
    pub pci: String,
    pub name: Fact<String>,
    /// Kernel driver bound to the device (`nvidia`, `vfio-pci`, ...).
    pub kernel_driver: Fact<String>,
    pub numa_node: Fact<i64>,
    pub memory_total_bytes: Fact<u64>,
    pub bar1_total_bytes: Fact<u64>,
    pub bar1_used_bytes: Fact<u64>,
    pub pcie: Fact<PcieLink>,
    pub compute_capability: Fact<String>,
    pub dma_buf_supported: Fact<bool>,
    pub gpudirect_rdma_supported: Fact<bool>,
}

/// `8.0 GT/s PCIe` → 3.
pub fn pcie_gen_from_speed(speed: &str) -> Option<u32> {
    let gts: f64 = speed.split_whitespace().next()?.parse().ok()?;
    let table = [
        (2.5, 1),
        (5.0, 2),
        (8.0, 3),
        (16.0, 4),
        (32.0, 5),
        (64.0, 6),
        (128.0, 7),
    ];
    table
        .iter()
        .find(|(rate, _)| (gts - rate).abs() < 0.01)
        .map(|(_, g)| *g)
}

/// Size of BAR1 from a sysfs `resource` file (one `start end flags` line per resource; the
/// line index is the BAR number). NVIDIA GPUs expose VRAM through BAR1.
pub fn bar_size(resource: &str, bar: usize) -> Option<u64> {
    let line = resource.lines().nth(bar)?;
    let mut it = line.split_whitespace();
    let start = u64::from_str_radix(it.next()?.trim_start_matches("0x"), 16).ok()?;
    let end = u64::from_str_radix(it.next()?.trim_start_matches("0x"), 16).ok()?;
    (end > start).then(|| end - start + 1)
}

/// Normalises `00000000:3B:00.0` (CUDA/NVML style) to `0000:3b:00.0`.
pub fn normalize_bdf(raw: &str) -> String {
    let raw = raw.trim().trim_end_matches('\0').to_ascii_lowercase();
    let mut parts = raw.splitn(2, ':');
    let domain = parts.next().unwrap_or_default();
    let rest = parts.next().unwrap_or_default();
    let domain = u32::from_str_radix(domain, 16)
        .map(|d| format!("{d:04x}"))
        .unwrap_or_default();
    format!("{domain}:{rest}")
}

pub fn parse_kernel_driver(text: &str) -> Result<NvidiaKernelDriver, String> {
    let line = text
        .lines()
        .find(|l| l.starts_with("NVRM version:"))
        .ok_or("no `NVRM version:` line")?;
    let open = line.contains("Open Kernel Module");
    // The version is the first token that looks like 580.95.05.
    let version = line
        .split_whitespace()
        .find(|t| t.split('.').count() >= 2 && t.split('.').all(|p| p.parse::<u32>().is_ok()))
        .ok_or("no version number in the `NVRM version:` line")?;
    Ok(NvidiaKernelDriver {
        version: version.to_owned(),
        open_kernel_module: open,
    })
}

/// `RegistryDwords: "RMForceStaticBar1=1;RmForceDisableIomapWC=1;"` in /proc/driver/nvidia/params.
pub fn parse_static_bar1(params: &str) -> bool {
    params
        .lines()
        .filter(|l| l.starts_with("RegistryDwords"))
        .flat_map(|l| l.split(['"', ';', ' ', ':']))
        .any(|kv| kv.eq_ignore_ascii_case("RMForceStaticBar1=1"))
}

fn sysfs_gpus(root: &HostRoot) -> Vec<Gpu> {
    let Ok(devices) = root.list_dir(pci::PCI_DEVICES, 4096) else {
        return Vec::new();
    };
    let mut gpus = Vec::new();
    for bdf in devices {
        let dev = format!("{}/{bdf}", pci::PCI_DEVICES);
        if root.read_attr(&format!("{dev}/vendor")).ok().as_deref() != Some(NVIDIA_VENDOR) {
            continue;
        }
        // PCI class 0x0300 (VGA) or 0x0302 (3D controller: every data-centre GPU).
        let class = root.read_attr(&format!("{dev}/class")).unwrap_or_default();
        if !(class.starts_with("0x0300") || class.starts_with("0x0302")) {
            continue;
        }
        let index = gpus.len() as u32;
        gpus.push(sysfs_gpu(root, index, &bdf));
    }
    gpus
}

fn sysfs_gpu(root: &HostRoot, index: u32, bdf: &str) -> Gpu {
    let dev = format!("{}/{bdf}", pci::PCI_DEVICES);
    let name = match root.read(
        &format!("/proc/driver/nvidia/gpus/{bdf}/information"),
        super::bounded::SMALL_FILE_LIMIT,
    ) {
        Ok(text) => text
            .lines()
            .find_map(|l| l.strip_prefix("Model:"))
            .map(|m| Fact::Known(m.trim().to_owned()))
            .unwrap_or_else(|| {
                Fact::unknown(format!(
                    "no Model line in /proc/driver/nvidia/gpus/{bdf}/information"
                ))
            }),
        Err(err) => Fact::unknown(format!("{err} (and CUDA gave no name)")),
    };
    let kernel_driver = match root.resolve_link(&format!("{dev}/driver")) {
        Ok(path) => Fact::Known(path.rsplit('/').next().unwrap_or_default().to_owned()),
        Err(err) if err.is_not_found() => Fact::unknown("no kernel driver is bound to the device"),
        Err(err) => Fact::from_read_error(err),
    };
    let attr_u32 = |name: &str| {
        root.read_attr(&format!("{dev}/{name}"))
            .ok()
            .and_then(|v| v.parse::<u32>().ok())
    };
    let attr_gen = |name: &str| {
        root.read_attr(&format!("{dev}/{name}"))
            .ok()
            .and_then(|v| pcie_gen_from_speed(&v))
    };
    let link = PcieLink {
        current_gen: attr_gen("current_link_speed"),
        current_width: attr_u32("current_link_width"),
        max_gen: attr_gen("max_link_speed"),
        max_width: attr_u32("max_link_width"),
    };
    let pcie =
        if link.current_gen.is_none() && link.max_gen.is_none() && link.current_width.is_none() {
            Fact::unknown(format!("no PCIe link attributes under {dev}"))
        } else {
            Fact::Known(link)
        };
    let bar1_total_bytes =
        match root.read(&format!("{dev}/resource"), super::bounded::SMALL_FILE_LIMIT) {
            Ok(text) => bar_size(&text, 1).map(Fact::Known).unwrap_or_else(|| {
                Fact::unknown(format!("BAR1 is not assigned in {dev}/resource"))
            }),
            Err(err) => Fact::from_read_error(err),
        };
    const CUDA_ONLY: &str = "needs the CUDA driver (not probed)";
    Gpu {
        index,
        pci: bdf.to_owned(),
        name,
        kernel_driver,
        numa_node: pci::numa_node(root, bdf),
        memory_total_bytes: Fact::unknown(CUDA_ONLY),
        bar1_total_bytes,
        bar1_used_bytes: Fact::unknown("needs NVML (not probed)"),
        pcie,
        compute_capability: Fact::unknown(CUDA_ONLY),
        dma_buf_supported: Fact::unknown(CUDA_ONLY),
        gpudirect_rdma_supported: Fact::unknown(CUDA_ONLY),
    }
}

/// One device as the CUDA driver API sees it.
#[derive(Debug, Clone)]
struct CudaDevice {
    ordinal: u32,
    pci: String,
    name: String,
    memory_total_bytes: u64,
    compute_capability: String,
    dma_buf_supported: Result<bool, GpuError>,
    gpudirect_rdma_supported: Result<bool, GpuError>,
}

fn cuda_probe() -> Result<(CudaDriver, Vec<CudaDevice>), GpuError> {
    use cudarc::driver::sys::{self, CUdevice_attribute as A, CUresult};

    // SAFETY: is_culib_present only tries dlopen on the candidate names.
    if !unsafe { sys::is_culib_present() } {
        return Err(GpuError::NoLibcuda);
    }
    let check = |what: &str, r: CUresult| -> Result<(), GpuError> {
        if r == CUresult::CUDA_SUCCESS {
            Ok(())
        } else {
            Err(GpuError::Cuda {
                call: what.to_owned(),
                result: format!("{r:?}"),
            })
        }
    };
    // SAFETY: plain CUDA driver API calls with valid out-pointers; symbols exist in every
    // driver since CUDA 4 except the attributes, which return CUDA_ERROR_INVALID_VALUE when
    // unknown rather than failing to load.
    unsafe {
        check("cuInit", sys::cuInit(0))?;
        let mut version: c_int = 0;
        check("cuDriverGetVersion", sys::cuDriverGetVersion(&mut version))?;
        let mut count: c_int = 0;
        check("cuDeviceGetCount", sys::cuDeviceGetCount(&mut count))?;
        let mut devices = Vec::new();
        for ordinal in 0..count.max(0) {
            let mut dev: sys::CUdevice = 0;
            check("cuDeviceGet", sys::cuDeviceGet(&mut dev, ordinal))?;
            let mut name = [0 as c_char; 256];
            check(
                "cuDeviceGetName",
                sys::cuDeviceGetName(name.as_mut_ptr(), 255, dev),
            )?;
            let mut bus = [0 as c_char; 64];
            check(
                "cuDeviceGetPCIBusId",
                sys::cuDeviceGetPCIBusId(bus.as_mut_ptr(), 63, dev),
            )?;
            let mut mem: usize = 0;
            check("cuDeviceTotalMem", sys::cuDeviceTotalMem_v2(&mut mem, dev))?;
            let attr = |a: A| -> Result<i32, GpuError> {
                let mut v: c_int = 0;
                let r = sys::cuDeviceGetAttribute(&mut v, a, dev);
                if r == CUresult::CUDA_SUCCESS {
                    Ok(v)
                } else {
                    Err(GpuError::Cuda {
                        call: format!("cuDeviceGetAttribute({a:?})"),
                        result: format!("{r:?}"),
                    })
                }
            };
            let major = attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR).unwrap_or(0);
            let minor = attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR).unwrap_or(0);
            devices.push(CudaDevice {
                ordinal: ordinal as u32,
                pci: normalize_bdf(&CStr::from_ptr(bus.as_ptr()).to_string_lossy()),
                name: CStr::from_ptr(name.as_ptr()).to_string_lossy().into_owned(),
                memory_total_bytes: mem as u64,
                compute_capability: format!("{major}.{minor}"),
                dma_buf_supported: attr(A::CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED).map(|v| v != 0),
                gpudirect_rdma_supported: attr(A::CU_DEVICE_ATTRIBUTE_GPU_DIRECT_RDMA_SUPPORTED)
                    .map(|v| v != 0),
            });
        }
        Ok((
            CudaDriver {
                version: format!("{}.{}", version / 1000, (version % 1000) / 10),
                device_count: count.max(0) as u32,
            },
            devices,
        ))
    }
}

#[repr(C)]
#[derive(Default)]
struct NvmlBar1Memory {
    total: u64,
    free: u64,
    used: u64,
}

/// How long CUDA or NVML may take before the probe reports them as hung and goes on.
const LIVE_TIMEOUT_SECS: u64 = 30;

/// Runs a driver query on its own thread: a call that never returns (a wedged GPU) must not
/// hang the probe, and a panic (cudarc panics on a missing symbol) becomes an error.
fn with_timeout<T: Send + 'static>(
    what: &'static str,
    f: impl FnOnce() -> Result<T, GpuError> + Send + 'static,
) -> Result<T, GpuError> {
    with_deadline(what, LIVE_TIMEOUT_SECS, f)
}

fn with_deadline<T: Send + 'static>(
    what: &'static str,
    secs: u64,
    f: impl FnOnce() -> Result<T, GpuError> + Send + 'static,
) -> Result<T, GpuError> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name(format!("probe-{what}"))
        .spawn(move || {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
                .unwrap_or(Err(GpuError::Panicked(what)));
            let _ = tx.send(r);
        })
        .map_err(|e| GpuError::Thread {
            what,
            message: e.to_string(),
        })?;
    rx.recv_timeout(std::time::Duration::from_secs(secs))
        .unwrap_or(Err(GpuError::Timeout { what, secs }))
}

/// Each GPU's PCI address and NVML's view of it.
type NvmlDevices = Vec<(String, Result<NvmlDevice, GpuError>)>;

/// NVML's driver version and its view of each GPU (by PCI address).
fn nvml_probe(bdfs: Vec<String>) -> Result<(String, NvmlDevices), GpuError> {
    let nvml = Nvml::open()?;
    let devices = bdfs
        .into_iter()
        .map(|bdf| {
            let d = nvml.device(&bdf);
            (bdf, d)
        })
        .collect();
    Ok((nvml.driver_version.clone(), devices))
}

struct NvmlDevice {
    bar1_total: u64,
    bar1_used: u64,
    link: PcieLink,
}

struct Nvml {
    lib: libloading::Library,
    driver_version: String,
}

type NvmlReturn = c_int;

impl Nvml {
    fn open() -> Result<Nvml, GpuError> {
        // SAFETY: loading the NVML shared library runs only its (side-effect free) initialisers.
        let lib = unsafe { libloading::Library::new("libnvidia-ml.so.1") }
            .or_else(|_| unsafe { libloading::Library::new("libnvidia-ml.so") })
            .map_err(|e| GpuError::NoNvml(dl_reason(&e)))?;
        // SAFETY: signatures from nvml.h.
        unsafe {
            let init: libloading::Symbol<unsafe extern "C" fn() -> NvmlReturn> = lib
                .get(b"nvmlInit_v2\0")
                .map_err(|_| GpuError::NvmlSymbol("nvmlInit_v2"))?;
            let r = init();
            if r != 0 {
                return Err(GpuError::Nvml {
                    call: "nvmlInit_v2".into(),
                    code: r,
                });
            }
            let mut buf = [0 as c_char; 96];
            let version: libloading::Symbol<
                unsafe extern "C" fn(*mut c_char, c_uint) -> NvmlReturn,
            > = lib
                .get(b"nvmlSystemGetDriverVersion\0")
                .map_err(|_| GpuError::NvmlSymbol("nvmlSystemGetDriverVersion"))?;
            let driver_version = if version(buf.as_mut_ptr(), 95) == 0 {
                CStr::from_ptr(buf.as_ptr()).to_string_lossy().into_owned()
            } else {
                String::from("unknown")
            };
            Ok(Nvml {
                lib,
                driver_version,
            })
        }
    }

    fn device(&self, bdf: &str) -> Result<NvmlDevice, GpuError> {
        // A PCI address never holds a NUL; if it did, NVML could not look it up either.
        let bus = std::ffi::CString::new(bdf).map_err(|_| GpuError::Nvml {
            call: format!("nvmlDeviceGetHandleByPciBusId_v2({bdf:?})"),
            code: 2,
        })?;
        // SAFETY: signatures from nvml.h; handles come from NVML itself.
        unsafe {
            let by_bus: libloading::Symbol<
                unsafe extern "C" fn(*const c_char, *mut *mut c_void) -> NvmlReturn,
            > = self
                .lib
                .get(b"nvmlDeviceGetHandleByPciBusId_v2\0")
                .map_err(|_| GpuError::NvmlSymbol("nvmlDeviceGetHandleByPciBusId_v2"))?;
            let mut handle: *mut c_void = std::ptr::null_mut();
            let r = by_bus(bus.as_ptr(), &mut handle);
            if r != 0 {
                return Err(GpuError::Nvml {
                    call: format!("nvmlDeviceGetHandleByPciBusId_v2({bdf})"),
                    code: r,
                });
            }
            let bar1: libloading::Symbol<
                unsafe extern "C" fn(*mut c_void, *mut NvmlBar1Memory) -> NvmlReturn,
            > = self
                .lib
                .get(b"nvmlDeviceGetBAR1MemoryInfo\0")
                .map_err(|_| GpuError::NvmlSymbol("nvmlDeviceGetBAR1MemoryInfo"))?;
            let mut mem = NvmlBar1Memory::default();
            let r = bar1(handle, &mut mem);
            if r != 0 {
                return Err(GpuError::Nvml {
                    call: "nvmlDeviceGetBAR1MemoryInfo".into(),
                    code: r,
                });
            }
            let get_u32 = |sym: &[u8]| -> Option<u32> {
                let f: libloading::Symbol<
                    unsafe extern "C" fn(*mut c_void, *mut c_uint) -> NvmlReturn,
                > = self.lib.get(sym).ok()?;
                let mut v: c_uint = 0;
                (f(handle, &mut v) == 0).then_some(v)
            };
            Ok(NvmlDevice {
                bar1_total: mem.total,
                bar1_used: mem.used,
                link: PcieLink {
                    current_gen: get_u32(b"nvmlDeviceGetCurrPcieLinkGeneration\0"),
                    current_width: get_u32(b"nvmlDeviceGetCurrPcieLinkWidth\0"),
                    max_gen: get_u32(b"nvmlDeviceGetMaxPcieLinkGeneration\0"),
                    max_width: get_u32(b"nvmlDeviceGetMaxPcieLinkWidth\0"),
                },
            })
        }
    }
}

impl Drop for Nvml {
    fn drop(&mut self) {
        // SAFETY: balanced with the successful nvmlInit_v2 in `open`.
        unsafe {
            if let Ok(shutdown) = self
                .lib
                .get::<unsafe extern "C" fn() -> NvmlReturn>(b"nvmlShutdown\0")
            {
                shutdown();
            }
        }
    }
}

const NOT_LIVE: &str = "skipped: --root is not / (CUDA and NVML describe the running host only)";

pub fn probe(root: &HostRoot) -> GpuSection {
    let kernel_driver = match root.read(
        "/proc/driver/nvidia/version",
        super::bounded::SMALL_FILE_LIMIT,
    ) {
        Ok(text) => match parse_kernel_driver(&text) {
            Ok(d) => Fact::Known(d),
            Err(why) => Fact::unknown(format!("cannot parse /proc/driver/nvidia/version: {why}")),
        },
        Err(err) if err.is_not_found() => Fact::unknown(
            "the NVIDIA kernel driver is not loaded (/proc/driver/nvidia/version does not exist)",
        ),
        Err(err) => Fact::from_read_error(err),
    };
    let static_bar1 = match root.read(
        "/proc/driver/nvidia/params",
        super::bounded::SMALL_FILE_LIMIT,
    ) {
        Ok(text) => Fact::Known(parse_static_bar1(&text)),
        Err(err) => Fact::from_read_error(err),
    };
    let mut gpus = sysfs_gpus(root);

    if !root.is_live() {
        for gpu in &mut gpus {
            gpu.compute_capability = Fact::unknown(NOT_LIVE);
            gpu.memory_total_bytes = Fact::unknown(NOT_LIVE);
            gpu.dma_buf_supported = Fact::unknown(NOT_LIVE);
            gpu.gpudirect_rdma_supported = Fact::unknown(NOT_LIVE);
            gpu.bar1_used_bytes = Fact::unknown(NOT_LIVE);
        }
        return GpuSection {
            kernel_driver,
            static_bar1,
            cuda: Fact::unknown(NOT_LIVE),
            nvml: Fact::unknown(NOT_LIVE),
            gpus,
        };
    }

    let cuda = with_timeout("the CUDA driver API", cuda_probe);
    let cuda_fact = match &cuda {
        Ok((driver, devices)) => {
            // CUDA's ordinals are what a data path uses: order and index GPUs by them.
            let mut merged = Vec::new();
            for d in devices {
                let mut gpu = match gpus.iter().position(|g| g.pci == d.pci) {
                    Some(i) => gpus.remove(i),
                    None => {
                        let mut g = sysfs_gpu(root, d.ordinal, &d.pci);
                        g.pcie = Fact::unknown(format!("{} is not in PCI sysfs", d.pci));
                        g
                    }
                };
                gpu.index = d.ordinal;
                gpu.name = Fact::Known(d.name.clone());
                gpu.memory_total_bytes = Fact::Known(d.memory_total_bytes);
                gpu.compute_capability = Fact::Known(d.compute_capability.clone());
                gpu.dma_buf_supported = Fact::from_result(d.dma_buf_supported.clone());
                gpu.gpudirect_rdma_supported =
                    Fact::from_result(d.gpudirect_rdma_supported.clone());
                merged.push(gpu);
            }
            // GPUs in sysfs that CUDA does not show (bound to vfio-pci, hidden by
            // CUDA_VISIBLE_DEVICES): keep them, after the CUDA ones.
            let next = merged.len() as u32;
            for (i, mut gpu) in gpus.drain(..).enumerate() {
                gpu.index = next + i as u32;
                let why = "CUDA does not list this GPU (another driver, or CUDA_VISIBLE_DEVICES)";
                gpu.dma_buf_supported = Fact::unknown(why);
                gpu.gpudirect_rdma_supported = Fact::unknown(why);
                gpu.compute_capability = Fact::unknown(why);
                gpu.memory_total_bytes = Fact::unknown(why);
                merged.push(gpu);
            }
            gpus = merged;
            Fact::Known(driver.clone())
        }
        Err(why) => {
            let why = why.to_string();
            for gpu in &mut gpus {
                gpu.memory_total_bytes = Fact::unknown(why.clone());
                gpu.compute_capability = Fact::unknown(why.clone());
                gpu.dma_buf_supported = Fact::unknown(why.clone());
                gpu.gpudirect_rdma_supported = Fact::unknown(why.clone());
            }
            Fact::unknown(why.clone())
        }
    };

    let bdfs: Vec<String> = gpus.iter().map(|g| g.pci.clone()).collect();
    let nvml = match with_timeout("NVML", move || nvml_probe(bdfs)) {
        Ok((driver_version, devices)) => {
            for (gpu, (_, device)) in gpus.iter_mut().zip(devices) {
                match device {
                    Ok(d) => {
                        gpu.bar1_total_bytes = Fact::Known(d.bar1_total);
                        gpu.bar1_used_bytes = Fact::Known(d.bar1_used);
                        if d.link.current_gen.is_some() || d.link.max_gen.is_some() {
                            gpu.pcie = Fact::Known(d.link);
                        }
                    }
                    Err(why) => gpu.bar1_used_bytes = Fact::unknown(why.to_string()),
                }
            }
            Fact::Known(driver_version)
        }
        Err(why) => {
            let why = why.to_string();
            for gpu in &mut gpus {
                gpu.bar1_used_bytes = Fact::unknown(why.clone());
            }
            Fact::unknown(why)
        }
    };
    GpuSection {
        kernel_driver,
        static_bar1,
        cuda: cuda_fact,
        nvml,
        gpus,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hung_or_panicking_driver_calls_become_errors() {
        let start = std::time::Instant::now();
        let r: Result<(), _> = with_deadline("a hung call", 1, || {
            std::thread::sleep(std::time::Duration::from_secs(5));
            Ok(())
        });
        assert_eq!(
            r.unwrap_err().to_string(),
            "a hung call did not return within 1 s (a wedged GPU or driver?)"
        );
        assert!(start.elapsed() < std::time::Duration::from_secs(4));
        let r: Result<(), _> = with_deadline("a panicking call", 5, || panic!("missing symbol"));
        assert_eq!(r, Err(GpuError::Panicked("a panicking call")));
        assert_eq!(with_deadline("a call", 5, || Ok(7)), Ok(7));
    }

    #[test]
    fn link_speed_to_generation() {
        assert_eq!(pcie_gen_from_speed("32.0 GT/s PCIe"), Some(5));
        assert_eq!(pcie_gen_from_speed("2.5 GT/s"), Some(1));
        assert_eq!(pcie_gen_from_speed("Unknown"), None);
    }

    #[test]
    fn bar1_from_resource() {
        let res = "0x00000000fb000000 0x00000000fbffffff 0x0000000000040200\n\
0x0000002000000000 0x0000003fffffffff 0x000000000014220c\n\
0x0000000000000000 0x0000000000000000 0x0000000000000000\n";
        assert_eq!(bar_size(res, 0), Some(16 << 20));
        assert_eq!(bar_size(res, 1), Some(128 << 30));
        assert_eq!(bar_size(res, 2), None);
        assert_eq!(bar_size("", 1), None);
    }

    #[test]
    fn bdf_normalisation() {
        assert_eq!(normalize_bdf("00000000:3B:00.0"), "0000:3b:00.0");
        assert_eq!(normalize_bdf("0000:01:00.0\0"), "0000:01:00.0");
    }

    #[test]
    fn kernel_driver_line() {
        let open = "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.95.05  Release Build  (dvs-builder@U22)  Tue Sep 23 2025\nGCC version:  gcc version 13.3.0\n";
        let d = parse_kernel_driver(open).unwrap();
        assert_eq!(d.version, "580.95.05");
        assert!(d.open_kernel_module);
        let prop = "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 22:23:56 UTC 2024\n";
        let d = parse_kernel_driver(prop).unwrap();
        assert_eq!(d.version, "550.54.15");
        assert!(!d.open_kernel_module);
        assert!(parse_kernel_driver("nonsense").is_err());
    }

    #[test]
    fn static_bar1_registry_key() {
        assert!(parse_static_bar1(
            "ResmanDebugLevel: 4294967295\nRegistryDwords: \"RMForceStaticBar1=1;RmForceDisableIomapWC=1;\"\n"
        ));
        assert!(!parse_static_bar1("RegistryDwords: \"\"\n"));
    }
}
