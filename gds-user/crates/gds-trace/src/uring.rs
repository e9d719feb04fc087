//! The io_uring tracer: options → config → load → attach → read.

use std::time::Duration;

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, PerCpuArray, RingBuf},
    programs::TracePoint,
};
use gds_common::cufile::{CUFILE_TRUSTED_MAX, CufileConfig, NO_UID};
use gds_common::{
    COMM_LEN, DEFAULT_MAX_INFLIGHT, DevConfig, HIST_BUCKETS, InflightReq, MAP_EVENTS,
    MAP_URING_INFLIGHT, MAP_URING_OPCODES, MAP_URING_SLOTS, MAP_URING_STATS, OPCODE_WORDS,
    OpcodeCpuStats, URING_OPCODES, UringConfig, UringCpuStats,
};
use tracing::info;

use super::{
    EBPF_OBJECT, InflightRequest, TraceError, check_tracing_caps,
    cufile::{CufileMaps, CufileTracing, CufileView, ProcessFilter},
    device::{self, DeviceAttach, DeviceMaps, NvmeTracing},
    inflight::{self, SlotTable},
    offsets::{self, AttachMode, ResolvedAttach},
    peer::PeerIo,
    program, take_map,
};
use gds_api::raw::{
    CufileRaw, DeviceSnapshot, DiskNames, LayerMode, Layers, LibraryFailure, LibraryInfo,
    NvmeLayer, OpcodeStats, PeerMemory, Source, TaskFilter, UringSnapshot,
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

/// Loaded and attached io_uring tracing programs.
pub struct UringTracer {
    /// Locked only to attach or detach the NVMe programs after start.
    ebpf: std::sync::Mutex<Ebpf>,
    stats: PerCpuArray<MapData, UringCpuStats>,
    opcodes: PerCpuArray<MapData, OpcodeCpuStats>,
    slots: SlotTable,
    hash: HashMap<MapData, u64, InflightReq>,
    attach: ResolvedAttach,
    devices: DeviceMaps,
    devices_attached: DeviceAttach,
    /// Whether block requests into peer memory are told apart, and the per-process counts.
    peer: PeerMemory,
    peer_io: PeerIo,
    /// None where the device programs cannot run at all (no BTF).
    nvme: Option<std::sync::Mutex<NvmeTracing>>,
    /// None where uprobes cannot be loaded. Locked by the cuFile thread (and at shutdown)
    /// only: readers read `cufile_view`, so none waits on its file reads and attaches.
    cufile: Option<std::sync::Mutex<CufileTracing>>,
    cufile_view: std::sync::Mutex<CufileView>,
    cufile_maps: std::sync::Mutex<CufileMaps>,
    cufile_why: String,
    /// The loader's dlopen notifications, taken by the cuFile thread.
    cufile_notify: std::sync::Mutex<Option<RingBuf<MapData>>>,
    filter: ProcessFilter,
}

impl UringTracer {
    /// Loads the programs with `opts` and attaches them. Detaches on drop.
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

        // NVMe/block programs need BTF offsets; without them they stay unattached.
        let dev_config = match (&btf_parsed, attach.mode) {
            (Ok(btf), AttachMode::Btf) => device::resolve(btf).ok(),
            _ => None,
        };
        let device_possible = dev_config.is_some();
        let (dev_config, peer) = dev_config.unwrap_or((
            DevConfig::DEFAULT,
            PeerMemory::Unknown("block tracing is off".into()),
        ));

        raise_memlock();
        let mut ebpf = loader
            .override_global(UringConfig::SYMBOL, &attach.config, true)
            .override_global(DevConfig::SYMBOL, &dev_config, true)
            .override_global(CufileConfig::SYMBOL, &cufile_config, true)
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
        let cufile_map_fds = super::umulti::map_fds(&ebpf);

        let mut nvme = None;
        let mut devices_attached = DeviceAttach {
            notes: vec![
                "NVMe and block tracing need kernel BTF (BTF tracepoints); they are off".into(),
            ],
            ..Default::default()
        };
        match attach.mode {
            AttachMode::Btf => {
                let parsed = btf_parsed
                    .as_ref()
                    .map_err(|e| TraceError::BtfRequired(e.to_string()))?;
                let btf = device::tracepoint_btf(
                    parsed,
                    &[attach.submit_tp, "io_uring_req_failed", "io_uring_complete"],
                )?;
                for (prog, tp) in [
                    ("uring_submit", attach.submit_tp),
                    ("uring_failed", "io_uring_req_failed"),
                    (attach.complete_prog, "io_uring_complete"),
                ] {
                    device::attach_btf(&mut ebpf, &btf, prog, tp)?;
                }
                if let (Ok(parsed), true) = (&btf_parsed, device_possible) {
                    devices_attached = device::attach(&mut ebpf, parsed)?;
                    nvme = Some(NvmeTracing::new(
                        &mut ebpf,
                        parsed,
                        gds_host::kmod::Modules::live(),
                    )?);
                }
            }
            AttachMode::Classic | AttachMode::Auto => {
                for (prog, tp) in [
                    ("uring_submit_tp", attach.submit_tp),
                    ("uring_failed_tp", "io_uring_req_failed"),
                    ("uring_complete_tp", "io_uring_complete"),
                ] {
                    let p: &mut TracePoint = program(&mut ebpf, prog)?;
                    p.load()
                        .map_err(|source| TraceError::Program { name: prog, source })?;
                    p.attach("io_uring", tp)
                        .map_err(|source| TraceError::Program { name: prog, source })?;
                }
            }
        }

        let stats = take_map(&mut ebpf, MAP_URING_STATS)?;
        let opcodes = take_map(&mut ebpf, MAP_URING_OPCODES)?;
        let Some(aya::maps::Map::Array(slot_map)) = ebpf.take_map(MAP_URING_SLOTS) else {
            return Err(TraceError::MissingMap(MAP_URING_SLOTS));
        };
        let slots = SlotTable::map(slot_map, opts.slots() as usize)?;
        let hash = take_map(&mut ebpf, MAP_URING_INFLIGHT)?;
        for note in &devices_attached.notes {
            info!("{note}");
        }
        if let Some(n) = nvme.as_mut()
            && let Some(change) = n.refresh(&mut ebpf)
        {
            info!("{change}");
        }
        if devices_attached.block {
            info!(
                "block tracing on: block_rq_issue/block_rq_complete; peer memory: {}",
                peer.why()
            );
        }
        let devices = DeviceMaps::take(&mut ebpf)?;
        let peer_io = PeerIo::take(&mut ebpf)?;
        // The cuFile layer holds one file descriptor per uprobe: the soft limit (1024 under
        // systemd) goes up to the hard one. Then it is on only where its capabilities are
        // held; otherwise it is off and says which ones are missing, for what.
        match gds_host::privileges::raise_nofile() {
            Ok(r) => info!("{r}"),
            Err(e) => tracing::warn!("cannot raise RLIMIT_NOFILE: {e}"),
        }
        let access = gds_host::privileges::CufileAccess::of_this_thread();
        let (cufile, cufile_why) = match access.as_ref().map(|a| (a.works(), a)) {
            Ok((false, a)) => {
                let why = format!("cuFile tracing {a}");
                tracing::warn!("{why}");
                (None, why)
            }
            _ => match CufileTracing::load(
                &mut ebpf,
                &cufile_map_fds,
                ProcessFilter {
                    pid: opts.pid,
                    comm: opts.comm.clone(),
                },
            ) {
                Ok(c) => {
                    let mut why =
                        "uprobes on every libcufile mapped by a process (checked every 500 ms)"
                            .to_owned();
                    match &access {
                        Ok(a) if !a.missing.is_empty() => {
                            tracing::warn!("cuFile tracing {a}");
                            why = format!("{why}; {a}");
                        }
                        Ok(_) => {}
                        Err(e) => tracing::warn!(
                            "cuFile tracing: cannot tell which capabilities it holds ({e}); \
                             attaching may fail"
                        ),
                    }
                    (Some(std::sync::Mutex::new(c)), why)
                }
                Err(e) => {
                    let why = format!("cuFile tracing off: the uprobe programs do not load ({e})");
                    tracing::warn!("{why}");
                    (None, why)
                }
            },
        };
        let cufile_maps = std::sync::Mutex::new(CufileMaps::take(&mut ebpf)?);
        let cufile_notify = std::sync::Mutex::new(Some(take_map(
            &mut ebpf,
            gds_common::cufile::MAP_CUFILE_DLOPEN,
        )?));
        Ok(UringTracer {
            ebpf: std::sync::Mutex::new(ebpf),
            stats,
            opcodes,
            slots,
            hash,
            attach,
            devices,
            devices_attached,
            peer,
            peer_io,
            nvme: nvme.map(std::sync::Mutex::new),
            cufile,
            cufile_view: Default::default(),
            cufile_maps,
            cufile_why,
            cufile_notify,
            filter: ProcessFilter {
                pid: opts.pid,
                comm: opts.comm.clone(),
            },
        })
    }

    /// Attaches to libcufile copies and their processes that appeared, detaches from those
    /// gone, and forgets what exited processes left in the maps. Returns the changes to log.
    pub fn refresh_cufile(&self) -> Vec<String> {
        let changes = self.cufile_attach(None);
        let alive = |pid: u32| std::path::Path::new(&format!("/proc/{pid}")).exists();
        self.cufile_maps
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .prune(&alive, gds_host::clock::monotonic_ns(), 60_000_000_000);
        self.peer_io.prune(&alive);
        changes
    }

    /// Like [`Self::refresh_cufile`] for `pids` only, which just loaded a library; detaches
    /// nothing.
    pub fn refresh_cufile_pids(&self, pids: &[u32]) -> Vec<String> {
        self.cufile_attach(Some(pids))
    }

    /// A full refresh (`None`) or one of `pids`; the object lock is taken only around the
    /// attach syscalls. Publishes what readers see.
    fn cufile_attach(&self, pids: Option<&[u32]>) -> Vec<String> {
        let Some(cufile) = &self.cufile else {
            return Vec::new();
        };
        let nvfs = gds_host::kmod::Modules::live().present("nvidia_fs");
        let mut cufile = cufile.lock().unwrap_or_else(|p| p.into_inner());
        let changes = match pids {
            None => cufile.refresh(&self.ebpf, nvfs),
            Some(pids) => cufile.refresh_pids(&self.ebpf, nvfs, pids),
        };
        *self.cufile_view.lock().unwrap_or_else(|p| p.into_inner()) = cufile.view();
        changes
    }

    /// On the cuFile thread, once before its loop: the descriptors it must `poll` (a watched
    /// file changes, a writer waits for a lease); when one is readable, call
    /// [`Self::cufile_files_changed`] at once.
    pub fn cufile_thread_fds(&self) -> Vec<std::os::fd::RawFd> {
        match &self.cufile {
            Some(c) => c.lock().unwrap_or_else(|p| p.into_inner()).thread_fds(),
            None => Vec::new(),
        }
    }

    /// Until when the cuFile thread should not wake for the loader's notifications (they
    /// took their share of its time: see `trace::cufile::NOTIFY_SHARE`).
    pub fn cufile_notify_paused_until(&self) -> Option<std::time::Instant> {
        self.cufile
            .as_ref()?
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .notify_paused_until()
    }

    /// Detaches from every watched file that changed on disk (logged at WARN).
    pub fn cufile_files_changed(&self) {
        if let Some(c) = &self.cufile {
            let mut c = c.lock().unwrap_or_else(|p| p.into_inner());
            c.files_changed();
            *self.cufile_view.lock().unwrap_or_else(|p| p.into_inner()) = c.view();
        }
    }

    /// The cuFile layer as readers see it: libraries attached, those that cannot be, and what
    /// its bounds refused.
    pub fn cufile_view(&self) -> CufileView {
        self.cufile_view
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The ring buffer of process ids the dynamic loader just loaded a library into (once).
    pub fn take_cufile_notify(&self) -> Option<RingBuf<MapData>> {
        self.cufile_notify
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// The cuFile maps now.
    pub fn cufile_raw(&self) -> Result<CufileRaw, TraceError> {
        self.cufile_maps
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .read()
    }

    /// The cuFile calls in flight now, by thread (`pid_tgid`), without the other cuFile tables.
    pub fn cufile_calls(&self) -> Vec<(u64, gds_common::cufile::CufileCall)> {
        self.cufile_maps
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .calls()
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
        let nvme = self.nvme.as_ref()?;
        let mut nvme = nvme.lock().unwrap_or_else(|p| p.into_inner());
        let mut ebpf = self.ebpf.lock().unwrap_or_else(|p| p.into_inner());
        nvme.refresh(&mut ebpf)
    }

    /// How each layer is traced now, and why (`/debug/layers`).
    pub fn layers(&self) -> Layers {
        let nvme = match &self.nvme {
            Some(n) => n.lock().unwrap_or_else(|p| p.into_inner()).layer().clone(),
            None => NvmeLayer {
                residence: gds_host::kmod::Modules::live().residence(device::NVME_CORE),
                attached: false,
                status_decoded: false,
                why: self.devices_attached.notes.join("; "),
            },
        };
        Layers {
            io_uring: LayerMode {
                on: true,
                why: self.attach.why.clone(),
            },
            block: LayerMode {
                on: self.devices_attached.block,
                why: if self.devices_attached.block {
                    format!(
                        "BTF tracepoints block_rq_issue/block_rq_complete, the submitter at \
                         block_getrq; peer memory: {}",
                        self.peer.why()
                    )
                } else {
                    self.devices_attached.notes.join("; ")
                },
            },
            nvme,
            cufile: LayerMode {
                on: self.cufile.is_some(),
                why: {
                    let v = self.cufile_view();
                    let limits = v.limits.summary();
                    format!(
                        "{}; {}; {} libcufile file(s) attached now{}",
                        self.cufile_why,
                        v.attach,
                        v.libraries.len(),
                        if limits.is_empty() {
                            String::new()
                        } else {
                            format!("; refused by its bounds: {limits}")
                        }
                    )
                },
            },
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

    /// Which device programs are attached.
    pub fn devices_attached(&self) -> &DeviceAttach {
        &self.devices_attached
    }

    /// Takes the event ring buffer (slow events); call once.
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>, TraceError> {
        take_map(
            self.ebpf.get_mut().unwrap_or_else(|p| p.into_inner()),
            MAP_EVENTS,
        )
    }

    /// Every request the kernel tracks as in flight now.
    pub fn inflight(&self) -> Vec<InflightRequest> {
        inflight::collect(&self.slots, &self.hash)
    }

    /// Sums the per-CPU statistics.
    ///
    /// Reads the global value first, then only the opcodes some CPU marked in its
    /// `opcodes_seen`: one `BPF_MAP_LOOKUP_ELEM` each, so an idle agent costs one syscall and a
    /// busy one a syscall per opcode in use, each copying that opcode's 320 bytes per CPU (all
    /// 256 entries would be 80 KiB per CPU). An opcode first seen after the global read is
    /// picked up by the next snapshot.
    pub fn snapshot(&self) -> Result<UringSnapshot, TraceError> {
        let per_cpu = self.stats.get(&0, 0).map_err(|source| TraceError::Map {
            name: MAP_URING_STATS,
            source,
        })?;
        let mut snap = UringSnapshot {
            opcodes: vec![
                OpcodeStats {
                    buckets: vec![0; HIST_BUCKETS],
                    ..Default::default()
                };
                URING_OPCODES
            ],
            ..Default::default()
        };
        let mut seen = [0u64; OPCODE_WORDS];
        for cpu in per_cpu.iter() {
            for (d, v) in snap.drops.iter_mut().zip(cpu.drops.iter()) {
                *d += v;
            }
            snap.inserted += cpu.inserted;
            snap.removed += cpu.removed;
            for (s, w) in seen.iter_mut().zip(cpu.opcodes_seen) {
                *s |= w;
            }
        }
        for (op, s) in snap.opcodes.iter_mut().enumerate() {
            if seen[op / 64] & (1u64 << (op % 64)) == 0 {
                continue;
            }
            let per_cpu = self
                .opcodes
                .get(&(op as u32), 0)
                .map_err(|source| TraceError::Map {
                    name: MAP_URING_OPCODES,
                    source,
                })?;
            for cpu in per_cpu.iter() {
                for (b, v) in s.buckets.iter_mut().zip(cpu.hist) {
                    *b += v;
                    s.timed += v;
                }
                s.sum_ns += cpu.sum_ns;
                s.submitted += cpu.submitted;
                s.errors += cpu.errors;
                s.slow += cpu.slow;
            }
        }
        Ok(snap)
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

/// The two empty programs of `gds-ebpf/src/floor.rs` on the io_uring submit and complete
/// tracepoints: the cost of any tracer there, for benchmarks to print beside the real one.
/// Detached on drop.
pub struct FloorProbe {
    _ebpf: aya::Ebpf,
}

impl FloorProbe {
    /// `clock`: the programs read `bpf_ktime_get_ns` once each (what timing a request needs at
    /// the least).
    pub fn attach(clock: bool) -> Result<FloorProbe, TraceError> {
        check_tracing_caps()?;
        let btf = Btf::from_sys().map_err(|e| TraceError::BtfRequired(e.to_string()))?;
        let submit_tp = offsets::btf_submit_tp(&btf)?;
        raise_memlock();
        // As in `UringTracer::start`: no CO-RE relocations, so no kernel BTF for the loader.
        let mut ebpf = EbpfLoader::new()
            .btf(None)
            .load(EBPF_OBJECT)
            .map_err(TraceError::Load)?;
        let kernel_btf = device::tracepoint_btf(&btf, &[submit_tp, "io_uring_complete"])?;
        let (submit, complete) = if clock {
            ("floor_clock_submit", "floor_clock_complete")
        } else {
            ("floor_submit", "floor_complete")
        };
        for (prog, tp) in [(submit, submit_tp), (complete, "io_uring_complete")] {
            device::attach_btf(&mut ebpf, &kernel_btf, prog, tp)?;
        }
        Ok(FloorProbe { _ebpf: ebpf })
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

    fn inflight(&self) -> Vec<InflightRequest> {
        UringTracer::inflight(self)
    }

    fn block_inflight(&self) -> Vec<(u64, gds_common::BlockInflight)> {
        self.devices.block_inflight()
    }

    fn nvme_inflight(&self) -> Vec<(u64, gds_common::NvmeInflight)> {
        self.devices.nvme_inflight()
    }

    fn cufile_calls(&self) -> Vec<(u64, gds_common::cufile::CufileCall)> {
        UringTracer::cufile_calls(self)
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
}
