//! The tracer: options → config → load the one object → each layer attaches → read.

use std::{any::Any, sync::Mutex, time::Duration};

use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, RingBuf},
};
use gds_common::cufile::{CUFILE_TRUSTED_MAX, CufileConfig, NO_UID};
use gds_common::file::FileConfig;
use gds_common::{
    COMM_LEN, DEFAULT_MAX_INFLIGHT, DevConfig, MAP_EVENTS, MAP_URING_INFLIGHT, MAP_URING_SLOTS,
    NvmeErrKey, OPCODE_WORDS, UringConfig,
};
use tracing::info;

use super::{
    EBPF_OBJECT, TraceError, check_tracing_caps,
    cufile::{CufileLayer, CufileView, ProcessFilter},
    device::{self, DeviceMaps},
    layer::{Start, TracedLayer},
    offsets::{self, AttachMode, ResolvedAttach},
    peer::PeerIo,
    take_map,
    uring::UringLayer,
};
use gds_api::raw::{
    CufileRaw, DeviceSnapshot, DiskNames, FileRaw, Inflight, Layer, Layers, LibraryFailure,
    LibraryInfo, PeerMemory, Source, TaskFilter, UringSnapshot,
};
use gds_host::{btf::Btf, tracefs};

/// What to trace (the `gds-agent run` tracing flags).
#[derive(Debug, Clone)]
pub struct TraceOptions {
    /// Only this process (thread group id).
    pub pid: Option<u32>,
    /// Only tasks with this command name (at most 15 bytes, as the kernel keeps it).
    pub comm: Option<String>,
    /// Only these opcodes (empty: all).
    pub opcodes: Vec<u8>,
    /// Time one request in this many (1: every request).
    pub sample: u64,
    /// Completions at least this slow become slow events.
    pub slow_threshold: Duration,
    /// In-flight map capacity.
    pub max_inflight: u32,
    pub attach: AttachMode,
    /// Uids whose cuFile calls count as trusted besides root (`--cufile-users`); the
    /// `--pid`/`--comm` filters above apply to the cuFile layer too.
    pub cufile_users: Vec<u32>,
    /// Which hooks the file layer uses (`--file-hooks`).
    pub file_hooks: super::FileHooks,
}

impl Default for TraceOptions {
    fn default() -> Self {
        TraceOptions {
            pid: None,
            comm: None,
            opcodes: Vec::new(),
            sample: 1,
            slow_threshold: Duration::from_millis(100),
            max_inflight: DEFAULT_MAX_INFLIGHT,
            attach: AttachMode::Auto,
            cufile_users: Vec::new(),
            file_hooks: super::FileHooks::Auto,
        }
    }
}

impl TraceOptions {
    /// Slots of the direct-mapped in-flight table: `max_inflight` rounded up to a power of two.
    pub fn slots(&self) -> u32 {
        self.max_inflight.max(1).next_power_of_two()
    }

    /// The cuFile programs' configuration: the trusted uids.
    fn cufile_config(&self) -> Result<CufileConfig, TraceError> {
        let mut c = CufileConfig::DEFAULT;
        let mut uids: Vec<u32> = self.cufile_users.clone();
        uids.sort_unstable();
        uids.dedup();
        uids.retain(|u| *u != 0);
        if uids.len() > CUFILE_TRUSTED_MAX {
            return Err(TraceError::InvalidFilter(format!(
                "--cufile-users: {} users, at most {CUFILE_TRUSTED_MAX} (root is always trusted; \
                 list only the service accounts that run GPUDirect Storage jobs)",
                uids.len()
            )));
        }
        if let Some(u) = uids.iter().find(|u| **u == NO_UID) {
            return Err(TraceError::InvalidFilter(format!(
                "--cufile-users: {u} is (uid_t)-1, no user's uid"
            )));
        }
        c.trusted_uids[..uids.len()].copy_from_slice(&uids);
        Ok(c)
    }

    fn to_config(&self) -> Result<UringConfig, TraceError> {
        let mut c = UringConfig::DEFAULT;
        if let Some(pid) = self.pid {
            if pid == 0 {
                return Err(TraceError::InvalidFilter("--pid 0 is not a process".into()));
            }
            c.filter_tgid = pid;
        }
        if let Some(comm) = &self.comm {
            let bytes = comm.as_bytes();
            if bytes.is_empty() || bytes.len() >= COMM_LEN {
                return Err(TraceError::InvalidFilter(format!(
                    "--comm {comm:?}: the kernel keeps 1 to {} bytes of a command name",
                    COMM_LEN - 1
                )));
            }
            c.filter_comm_on = 1;
            c.filter_comm[..bytes.len()].copy_from_slice(bytes);
        }
        if !self.opcodes.is_empty() {
            c.filter_opcode_on = 1;
            c.opcode_mask = [0; OPCODE_WORDS];
            for &op in &self.opcodes {
                c.opcode_mask[op as usize / 64] |= 1u64 << (op % 64);
            }
        }
        if self.sample == 0 {
            return Err(TraceError::InvalidFilter(
                "--sample must be at least 1".into(),
            ));
        }
        c.sample_every = self.sample;
        c.slow_ns = u64::try_from(self.slow_threshold.as_nanos())
            .unwrap_or(u64::MAX)
            .max(1);
        if self.max_inflight == 0 {
            return Err(TraceError::InvalidFilter(
                "--max-inflight must be at least 1".into(),
            ));
        }
        Ok(c)
    }
}

/// The warning for a `--pid` filter that names no running process now, or `None`. The filter
/// stays as given: the kernel matches the id whenever a process gets it.
pub fn pid_filter_warning(pid: Option<u32>, proc_root: &std::path::Path) -> Option<String> {
    let pid = pid?;
    (!proc_root.join(pid.to_string()).exists()).then(|| {
        format!(
            "--pid {pid}: no such process now; nothing is traced until a process with that id \
             starts (the filter stays)"
        )
    })
}

/// The loaded eBPF object and the layers attached to it. Detaches every program on drop.
///
/// Named for where gds began; it holds every layer of [`super::LAYERS`] as a list, and the
/// maps the layers share (per-disk statistics, peer-memory counts, the event ring).
pub struct UringTracer {
    /// Locked only to attach or detach programs after start (NVMe, cuFile). Dropped first,
    /// as before the layers were a list: closing the object detaches everything at once.
    ebpf: Mutex<Ebpf>,
    /// Every layer, in the order of [`super::LAYERS`].
    layers: Vec<Box<dyn TracedLayer>>,
    attach: ResolvedAttach,
    /// Per-disk statistics of the block and NVMe layers, and disk names.
    devices: DeviceMaps,
    /// Whether block requests into peer memory are told apart, and the per-process counts
    /// (written by the block programs, read at cuFile returns).
    peer: PeerMemory,
    peer_io: PeerIo,
    filter: ProcessFilter,
}

impl UringTracer {
    /// Loads the programs with `opts` (one object: the layers share its maps), then attaches
    /// each layer of [`super::LAYERS`] in turn. Detaches on drop.
    pub fn start(opts: &TraceOptions) -> Result<UringTracer, TraceError> {
        check_tracing_caps()?;
        let base = opts.to_config()?;
        if let Some(w) = pid_filter_warning(opts.pid, std::path::Path::new("/proc")) {
            tracing::warn!("{w}");
        }
        let cufile_config = opts.cufile_config()?;
        // First, while little else is held: aya's loader parses vmlinux's BTF when it is made
        // (13 MiB of heap, 19 at the peak), for CO-RE relocations only, and gds's programs have
        // none (`tests::the_object_has_no_core_relocations`). So it is let go at once.
        let mut loader = EbpfLoader::new();
        loader.btf(None);
        let btf_parsed = Btf::from_sys();
        if let Some(values) = btf_parsed
            .as_ref()
            .ok()
            .and_then(|b| b.enum_values("io_uring_op"))
        {
            gds_api::model::labels::learn_opcodes(&values);
        }
        let tracefs_dir = match tracefs::ensure_mounted() {
            Ok((dir, mounted)) => {
                if mounted {
                    info!(path = %dir.display(), "mounted tracefs");
                }
                Some(dir)
            }
            Err(e) if opts.attach == AttachMode::Classic => return Err(e.into()),
            Err(e) => {
                tracing::warn!("tracefs unavailable ({e}); BTF tracepoints do not need it");
                None
            }
        };
        let attach = offsets::resolve(
            opts.attach,
            btf_parsed.as_ref(),
            tracefs_dir.as_deref(),
            base,
        )?;
        info!(mode = ?attach.mode, "io_uring tracing: {}", attach.why);
        if attach.mode == AttachMode::Btf
            && let Err(e) = &btf_parsed
        {
            return Err(TraceError::BtfRequired(e.to_string()));
        }

        // NVMe/block programs need BTF offsets; without them they stay unattached.
        let dev_config = match (&btf_parsed, attach.mode) {
            (Ok(btf), AttachMode::Btf) => device::resolve(btf).ok(),
            _ => None,
        };
        let devices_possible = dev_config.is_some();
        let (dev_config, peer) = dev_config.unwrap_or((
            DevConfig::DEFAULT,
            PeerMemory::Unknown("block tracing is off".into()),
        ));

        let file_plan = super::FilePlan::choose(opts.file_hooks, btf_parsed.as_ref().ok());

        raise_memlock();
        let mut ebpf = loader
            .override_global(UringConfig::SYMBOL, &attach.config, true)
            .override_global(DevConfig::SYMBOL, &dev_config, true)
            .override_global(CufileConfig::SYMBOL, &cufile_config, true)
            .override_global(FileConfig::SYMBOL, &file_plan.config, true)
            .map_max_entries(MAP_URING_INFLIGHT, opts.max_inflight)
            .map_max_entries(MAP_URING_SLOTS, opts.slots())
            .load(EBPF_OBJECT)
            .map_err(|e| match &e {
                aya::EbpfError::MapError(aya::maps::MapError::CreateError { io_error, .. })
                    if io_error.raw_os_error() == Some(libc::EPERM) =>
                {
                    TraceError::NotPermitted {
                        caps: super::effective_caps(),
                    }
                }
                _ => TraceError::Load(e),
            })?;
        // Every map's descriptor, before maps are taken out: the cuFile programs are loaded
        // again for multi-uprobe links against these (`trace::umulti`).
        let map_fds = super::umulti::map_fds(&ebpf);
        let start = Start {
            opts,
            btf: btf_parsed.as_ref().ok(),
            attach: &attach,
            devices: devices_possible,
            peer: &peer,
            map_fds: &map_fds,
            file: &file_plan,
        };
        let layers = super::LAYERS
            .iter()
            .map(|attach_layer| attach_layer(&mut ebpf, &start))
            .collect::<Result<Vec<_>, _>>()?;
        drop(map_fds);
        let devices = DeviceMaps::take(&mut ebpf)?;
        let peer_io = PeerIo::take(&mut ebpf)?;
        Ok(UringTracer {
            ebpf: Mutex::new(ebpf),
            layers,
            attach,
            devices,
            peer,
            peer_io,
            filter: ProcessFilter {
                pid: opts.pid,
                comm: opts.comm.clone(),
            },
        })
    }

    /// The layer of type `L`, for what only that layer offers (io_uring statistics, the cuFile
    /// thread's work); None if the tracer does not have it.
    pub fn layer<L: TracedLayer>(&self) -> Option<&L> {
        self.layers
            .iter()
            .find_map(|l| (l.as_ref() as &dyn Any).downcast_ref::<L>())
    }

    /// Refreshes `layer` (see [`TracedLayer::refresh`]); returns the changes to log.
    pub fn refresh(&self, layer: Layer) -> Vec<String> {
        self.layers
            .iter()
            .filter(|l| l.layer() == layer)
            .flat_map(|l| l.refresh(&self.ebpf))
            .collect()
    }

    fn cufile(&self) -> Option<&CufileLayer> {
        self.layer::<CufileLayer>()
    }

    /// Attaches to libcufile copies and their processes that appeared, detaches from those
    /// gone, and forgets what exited processes left in the maps. Returns the changes to log.
    ///
    /// Also hooks file-system modules loaded since start (the file layer's fentry/kprobe
    /// tiers): loading fentry programs, opening kprobes and walking the kernel's BTF objects
    /// need the capabilities only the cuFile thread keeps.
    pub fn refresh_cufile(&self) -> Vec<String> {
        let mut changes = self.refresh(Layer::Cufile);
        changes.extend(self.refresh(Layer::File));
        let alive = |pid: u32| std::path::Path::new(&format!("/proc/{pid}")).exists();
        self.peer_io.prune(&alive);
        changes
    }

    /// Like [`Self::refresh_cufile`] for `pids` only, which just loaded a library; detaches
    /// nothing.
    pub fn refresh_cufile_pids(&self, pids: &[u32]) -> Vec<String> {
        self.cufile()
            .map(|c| c.refresh_pids(&self.ebpf, pids))
            .unwrap_or_default()
    }

    /// On the cuFile thread, once before its loop: see [`CufileLayer::thread_fds`].
    pub fn cufile_thread_fds(&self) -> Vec<std::os::fd::RawFd> {
        self.cufile()
            .map(CufileLayer::thread_fds)
            .unwrap_or_default()
    }

    /// See [`CufileLayer::notify_paused_until`].
    pub fn cufile_notify_paused_until(&self) -> Option<std::time::Instant> {
        self.cufile()?.notify_paused_until()
    }

    /// Detaches from every watched file that changed on disk (logged at WARN).
    pub fn cufile_files_changed(&self) {
        if let Some(c) = self.cufile() {
            c.files_changed();
        }
    }

    /// The cuFile layer as readers see it: libraries attached, those that cannot be, and what
    /// its bounds refused.
    pub fn cufile_view(&self) -> CufileView {
        self.cufile().map(CufileLayer::view).unwrap_or_default()
    }

    /// The ring buffer of process ids the dynamic loader just loaded a library into (once).
    pub fn take_cufile_notify(&self) -> Option<RingBuf<MapData>> {
        self.cufile()?.take_notify()
    }

    /// The cuFile maps now (empty without the layer).
    pub fn cufile_raw(&self) -> Result<CufileRaw, TraceError> {
        self.cufile()
            .map_or(Ok(CufileRaw::default()), CufileLayer::raw)
    }

    /// `--pid` and `--comm`: the kernel applies them to io_uring and cuFile; user space applies
    /// them to block and NVMe requests by their submitter (those programs aggregate per disk
    /// for every process, so the filter cannot run in the kernel there).
    pub fn task_filter(&self) -> &ProcessFilter {
        &self.filter
    }

    /// The libcufile copies attached now, and those that could not be.
    pub fn cufile_libraries(&self) -> (Vec<LibraryInfo>, Vec<LibraryFailure>) {
        let v = self.cufile_view();
        (v.libraries, v.failures)
    }

    /// Attaches or detaches the NVMe programs as the NVMe driver comes and goes (modules
    /// loaded or unloaded, controllers bound or removed). Returns the change to log.
    ///
    /// Disk names are looked up again each time too: disks appear after their controller
    /// does, and a device number freed by a removed disk may name another one later.
    pub fn refresh_devices(&self) -> Option<String> {
        self.devices.refresh_names();
        let changes = self.refresh(Layer::Nvme);
        (!changes.is_empty()).then(|| changes.join("; "))
    }

    /// How each layer is traced now, and why (`/debug/layers`): each layer's own entry.
    pub fn layers(&self) -> Layers {
        Layers {
            layers: self.layers.iter().map(|l| l.entry()).collect(),
            warnings: pid_filter_warning(self.filter.pid, std::path::Path::new("/proc"))
                .into_iter()
                .collect(),
        }
    }

    pub fn attach(&self) -> &ResolvedAttach {
        &self.attach
    }

    /// Whether block requests into peer (P2PDMA) memory are told apart here, and why.
    pub fn peer_memory(&self) -> &PeerMemory {
        &self.peer
    }

    /// Block requests into peer memory per process id, as the kernel counted them.
    pub fn peer_io(&self) -> Vec<(u32, u64)> {
        self.peer_io.read()
    }

    /// Per-disk NVMe/block statistics and disk names.
    pub fn devices(&self) -> &DeviceMaps {
        &self.devices
    }

    /// Takes the event ring buffer (slow events); call once.
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>, TraceError> {
        take_map(
            self.ebpf.get_mut().unwrap_or_else(|p| p.into_inner()),
            MAP_EVENTS,
        )
    }

    /// Every layer's in-flight entries now, layer by layer.
    pub fn inflight(&self) -> Vec<Inflight> {
        let mut out = Vec::new();
        for l in &self.layers {
            l.inflight(&mut out);
        }
        out
    }

    /// The io_uring statistics, summed over CPUs (see [`UringLayer::snapshot`]).
    pub fn snapshot(&self) -> Result<UringSnapshot, TraceError> {
        self.layer::<UringLayer>()
            .ok_or(TraceError::NoLayer(Layer::Uring.label()))?
            .snapshot()
    }
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; harmless elsewhere.
fn raise_memlock() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: valid pointer to an initialised rlimit.
    let _ = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) };
}

/// Empty programs of `gds-ebpf/src/floor.rs` on the tracepoints a benchmark's operation
/// crosses: the cost of any tracer there, for benchmarks to print beside the real one.
/// Detached on drop.
pub struct FloorProbe {
    _ebpf: aya::Ebpf,
}

/// The floor programs, one slot per tracepoint: (empty, reading the clock once).
const FLOOR_SLOTS: [(&str, &str); 5] = [
    ("floor_0", "floor_clock_0"),
    ("floor_1", "floor_clock_1"),
    ("floor_2", "floor_clock_2"),
    ("floor_3", "floor_clock_3"),
    ("floor_4", "floor_clock_4"),
];

impl FloorProbe {
    /// On the io_uring submit and complete tracepoints. `clock`: the programs read
    /// `bpf_ktime_get_ns` once each (what timing a request needs at the least).
    pub fn attach(clock: bool) -> Result<FloorProbe, TraceError> {
        let btf = Btf::from_sys().map_err(|e| TraceError::BtfRequired(e.to_string()))?;
        let submit_tp = offsets::btf_submit_tp(&btf)?;
        FloorProbe::load(&btf, &[submit_tp, "io_uring_complete"], clock)
    }

    /// On BTF tracepoints `tps` (five at most), e.g. the five an O_DIRECT read crosses.
    pub fn attach_to(tps: &[&str], clock: bool) -> Result<FloorProbe, TraceError> {
        let btf = Btf::from_sys().map_err(|e| TraceError::BtfRequired(e.to_string()))?;
        FloorProbe::load(&btf, tps, clock)
    }

    fn load(btf: &Btf, tps: &[&str], clock: bool) -> Result<FloorProbe, TraceError> {
        check_tracing_caps()?;
        if tps.len() > FLOOR_SLOTS.len() {
            return Err(TraceError::MissingProgram("floor_5 (five floor slots)"));
        }
        raise_memlock();
        // As in `UringTracer::start`: no CO-RE relocations, so no kernel BTF for the loader.
        let mut ebpf = EbpfLoader::new()
            .btf(None)
            .load(EBPF_OBJECT)
            .map_err(TraceError::Load)?;
        let kernel_btf = device::tracepoint_btf(btf, tps)?;
        for (tp, (empty, with_clock)) in tps.iter().zip(FLOOR_SLOTS) {
            let prog = if clock { with_clock } else { empty };
            device::attach_btf(&mut ebpf, &kernel_btf, prog, tp)?;
        }
        Ok(FloorProbe { _ebpf: ebpf })
    }
}

/// The model reads the kernel's maps through this: one home for each read, in the methods
/// above.
impl Source for UringTracer {
    type Error = TraceError;

    fn uring(&self) -> Result<UringSnapshot, TraceError> {
        self.snapshot()
    }

    fn devices(&self) -> DeviceSnapshot {
        self.devices.snapshot()
    }

    fn nvme_errors(&self) -> Vec<(NvmeErrKey, u64)> {
        self.devices.nvme_errors()
    }

    fn disks(&self) -> &dyn DiskNames {
        &self.devices
    }

    fn peer_memory(&self) -> &PeerMemory {
        &self.peer
    }

    fn peer_io(&self) -> Vec<(u32, u64)> {
        UringTracer::peer_io(self)
    }

    fn cufile_raw(&self) -> Result<CufileRaw, TraceError> {
        UringTracer::cufile_raw(self)
    }

    fn cufile_libraries(&self) -> (Vec<LibraryInfo>, Vec<LibraryFailure>) {
        UringTracer::cufile_libraries(self)
    }

    fn inflight(&self) -> Vec<Inflight> {
        UringTracer::inflight(self)
    }

    fn task_filter(&self) -> TaskFilter {
        TaskFilter {
            pid: self.filter.pid,
            comm: self.filter.comm.clone(),
        }
    }

    fn layers(&self) -> Layers {
        UringTracer::layers(self)
    }

    fn file_raw(&self) -> FileRaw {
        self.layer::<super::FileLayer>()
            .map(super::FileLayer::raw)
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pid_filter_naming_no_process_is_a_warning() {
        let proc_root = tempfile::tempdir().unwrap();
        std::fs::create_dir(proc_root.path().join("42")).unwrap();
        assert_eq!(pid_filter_warning(None, proc_root.path()), None);
        assert_eq!(pid_filter_warning(Some(42), proc_root.path()), None);
        let w = pid_filter_warning(Some(999_999), proc_root.path()).unwrap();
        assert!(w.contains("--pid 999999: no such process"), "{w}");
        assert!(w.contains("the filter stays"), "{w}");
    }

    #[test]
    fn cufile_users_become_the_trusted_uids() {
        let config = |uids: &[u32]| {
            TraceOptions {
                cufile_users: uids.to_vec(),
                ..Default::default()
            }
            .cufile_config()
        };
        let c = config(&[]).unwrap();
        assert!(c.trusts(0) && !c.trusts(1000) && !c.trusts(65534));
        let c = config(&[1000, 0, 1000, 42]).unwrap();
        assert!(c.trusts(0) && c.trusts(42) && c.trusts(1000) && !c.trusts(65534));
        assert_eq!(c.trusted_uids[..2], [42, 1000]);
        assert!(c.trusted_uids[2..].iter().all(|u| *u == NO_UID));
        assert!(!c.trusts(NO_UID));
        let many: Vec<u32> = (1..=CUFILE_TRUSTED_MAX as u32).collect();
        assert!(config(&many).is_ok());
        let too_many: Vec<u32> = (1..=CUFILE_TRUSTED_MAX as u32 + 1).collect();
        let e = config(&too_many).unwrap_err().to_string();
        assert!(e.contains("at most 16"), "{e}");
        assert!(config(&[NO_UID]).is_err());
    }

    /// `start` gives aya's loader no kernel BTF: right only while the programs have no CO-RE
    /// relocations, the one thing the loader needs it for. A program that gains one fails
    /// here, not on a host.
    #[test]
    fn the_object_has_no_core_relocations() {
        use object::{Object as _, ObjectSection as _, read::elf::ElfFile64};
        let obj = ElfFile64::<object::Endianness>::parse(EBPF_OBJECT).unwrap();
        let ext = obj.section_by_name(".BTF.ext").unwrap().data().unwrap();
        let word = |at: usize| u32::from_le_bytes(ext[at..at + 4].try_into().unwrap());
        // struct btf_ext_header: magic, version, flags, hdr_len; func_info and line_info
        // (offset, length); from a 32-byte header on, core_relo's (offset, length).
        assert_eq!(&ext[..2], &[0x9f, 0xeb]);
        if word(4) >= 32 {
            assert_eq!(
                word(28),
                0,
                "the eBPF object has CO-RE relocations: pass the \
                kernel's BTF to EbpfLoader in UringTracer::start"
            );
        }
    }

    #[test]
    fn opcode_filter_is_exact_for_every_opcode() {
        let config = |ops: &[u8]| {
            TraceOptions {
                opcodes: ops.to_vec(),
                ..Default::default()
            }
            .to_config()
            .unwrap()
        };
        let all = config(&[]);
        assert_eq!(all.filter_opcode_on, 0);
        for op in 0..=255u8 {
            let c = config(&[op]);
            assert_eq!(c.filter_opcode_on, 1);
            for other in 0..=255usize {
                let on = c.opcode_mask[other / 64] >> (other % 64) & 1 == 1;
                assert_eq!(on, other == op as usize, "--opcode {op}: bit {other}");
            }
        }
        let c = config(&[0, 46, 63, 64, 200, 255]);
        assert_eq!(
            c.opcode_mask,
            [1 | 1 << 46 | 1 << 63, 1, 0, 1 << (200 - 192) | 1 << 63]
        );
    }
}
