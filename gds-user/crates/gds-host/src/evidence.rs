//! What the host says about a stalled request, read once when the stall is detected: the
//! threads involved (state, wchan, system call, kernel stack), the disk (requests in flight,
//! queue depth, scheduler) and the cgroup's I/O limits in force on that disk.
//!
//! Everything here is a bounded read of `/proc` or `/sys` under a [`HostRoot`] (fixture trees
//! in tests), done only for stalls, never per request: a stall is rare and a capture is a few
//! dozen small reads. Nothing here decides a cause; `gds_api::model::evidence` does, from
//! these values.

use serde::{Deserialize, Serialize};

use crate::bounded::{HostRoot, ReadError, SMALL_FILE_LIMIT};

/// Kernel stack frames kept per thread. `/proc/PID/stack` is capped at 64 frames by the
/// kernel (`MAX_STACK_TRACE_DEPTH`); the waits that name a cause are within the top dozen.
pub const STACK_FRAMES_MAX: usize = 64;
/// io-wq workers examined per submitter: a ring's bounded workers default to
/// min(SQ entries, 4 × CPUs); the ones blocked for the stalled request are among the first.
pub const WORKERS_MAX: usize = 16;
/// Threads of a process listed at most when looking for io-wq workers.
pub const TASKS_MAX: usize = 4096;
/// Lower disks (dm/md slaves, a loop device's backing disk) whose limits also apply.
pub const LOWER_DISKS_MAX: usize = 16;
/// NVMe controllers listed for one disk: a multipath namespace has one path per controller
/// of its subsystem (a few in practice; NVMe allows many more).
pub const CONTROLLERS_MAX: usize = 16;

/// One thread's kernel-side state, from `/proc/PID/task/TID/{stat,wchan,syscall,stack}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThreadEvidence {
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
    /// The scheduler state letter of `stat` (`S` sleeping, `D` uninterruptible, `R` running).
    pub state: String,
    /// The kernel function it sleeps in; empty while it runs (`0` in the file).
    pub wchan: String,
    /// The first field of `syscall`: the system call number it is blocked in, `-1` when
    /// blocked outside one (an io-wq worker), `running`.
    pub syscall: String,
    /// Kernel frames, innermost first, symbolized by the kernel (`pipe_read+0x1c2/0x4a0`);
    /// empty where the kernel refuses (no CAP_SYS_ADMIN) or the thread is gone.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stack: Vec<String>,
    /// The files of the thread that could not be read and why (a stack refused without
    /// CAP_SYS_ADMIN, a syscall without ptrace access): what is empty above is unknown, not
    /// absent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unreadable: Vec<String>,
}

impl ThreadEvidence {
    /// The function names of the stack, without offsets (`pipe_read`).
    pub fn functions(&self) -> impl Iterator<Item = &str> {
        self.stack.iter().map(|f| frame_function(f))
    }
}

/// `pipe_read+0x1c2/0x4a0 [mod]` → `pipe_read`.
pub fn frame_function(frame: &str) -> &str {
    let f = frame.split_whitespace().next().unwrap_or("");
    f.split('+').next().unwrap_or(f)
}

/// Reads thread `tid` of process `pid`. A thread that ended between the scan and the read is
/// `NotFound`; a stack the kernel refuses is left empty (the rest still says much).
pub fn thread(root: &HostRoot, pid: u32, tid: u32) -> Result<ThreadEvidence, ReadError> {
    let dir = format!("/proc/{pid}/task/{tid}");
    let stat = root.read_attr(&format!("{dir}/stat"))?;
    // `pid (comm) S ...`: comm may hold spaces and parentheses, so split at the last ')'.
    let (comm, state) = match (stat.find('('), stat.rfind(')')) {
        (Some(a), Some(b)) if a < b => (
            stat[a + 1..b].to_owned(),
            stat[b + 1..]
                .split_whitespace()
                .next()
                .unwrap_or("")
                .to_owned(),
        ),
        _ => (String::new(), String::new()),
    };
    let wchan = root
        .read_attr(&format!("{dir}/wchan"))
        .map(|w| if w == "0" { String::new() } else { w })
        .unwrap_or_default();
    let mut unreadable = Vec::new();
    let syscall = root
        .read_attr(&format!("{dir}/syscall"))
        .map(|s| s.split_whitespace().next().unwrap_or("").to_owned())
        .unwrap_or_else(|e| {
            unreadable.push(e.to_string());
            String::new()
        });
    let stack = root
        .read(&format!("{dir}/stack"), SMALL_FILE_LIMIT)
        .map(|s| parse_stack(&s))
        .unwrap_or_else(|e| {
            unreadable.push(e.to_string());
            Vec::new()
        });
    Ok(ThreadEvidence {
        pid,
        tid,
        comm,
        state,
        wchan,
        syscall,
        stack,
        unreadable,
    })
}

/// `[<0>] pipe_read+0x1c2/0x4a0` lines → frames (at most [`STACK_FRAMES_MAX`]).
pub fn parse_stack(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| match l.find("] ") {
            Some(i) if l.starts_with('[') => l[i + 2..].trim(),
            _ => l.trim(),
        })
        .filter(|f| !f.is_empty())
        .take(STACK_FRAMES_MAX)
        .map(str::to_owned)
        .collect()
}

/// The io-wq workers that serve `submitter` (`iou-wrk-<submitter tid>`, threads of its
/// process): a request the ring could not complete inline blocks in one of them, not in the
/// submitter.
pub fn io_wq_workers(root: &HostRoot, pid: u32, submitter: u32) -> Vec<u32> {
    let name = format!("iou-wrk-{submitter}");
    let Ok(tasks) = root.list_dir(&format!("/proc/{pid}/task"), TASKS_MAX) else {
        return Vec::new();
    };
    tasks
        .iter()
        .filter_map(|t| t.parse::<u32>().ok())
        .filter(|tid| {
            root.read_attr(&format!("/proc/{pid}/task/{tid}/comm"))
                .is_ok_and(|c| c == name)
        })
        .take(WORKERS_MAX)
        .collect()
}

/// A disk's queue at the moment of the stall, from `/sys/block/X/{inflight,queue/*}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskEvidence {
    pub disk: String,
    /// `major:minor`.
    pub dev: String,
    /// Reads and writes the block layer has issued and not completed (`inflight`).
    pub inflight_reads: u64,
    pub inflight_writes: u64,
    /// `queue/nr_requests`: the requests (tags) the queue can hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nr_requests: Option<u64>,
    /// The scheduler in use (the bracketed one of `queue/scheduler`), `none` included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduler: Option<String>,
    /// The disks below it whose limits apply too (`major:minor`): a dm/md device's slaves,
    /// a loop device's backing file's disk (and that partition's whole disk).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lower: Vec<String>,
    /// NVMe disks only: the controllers behind it and what the tracer saw on it.
    /// `#[serde(default)]`: snapshots of agents before it still parse.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nvme: Option<NvmeDiskEvidence>,
}

/// What an NVMe disk's controllers and the tracer said at the stall.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NvmeDiskEvidence {
    /// The controllers the namespace is reached through (one, or one per path under native
    /// multipath), from sysfs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub controllers: Vec<NvmeController>,
    /// NVMe commands on this disk the tracer saw set up (`nvme_setup_cmd`) and not completed
    /// (`nvme_complete_rq`) at the scan that found the stall: the commands outstanding at the
    /// controller, io_uring passthrough included (sysfs `inflight` counts only block I/O that
    /// is accounted: passthrough commands are not). `None` where the NVMe layer is not traced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outstanding: Option<u64>,
    /// NVMe completions with an error status on this disk in the last
    /// `errors_window_ms`, by status name (`gds_nvme_errors_total`'s counters, differenced).
    /// Aborts, timeouts and resets all end here: a command the host cancels in a reset or after
    /// a timeout completes through `nvme_complete_rq` with `Command Aborted By Host` (and is
    /// retried), one the controller aborts with `Command Abort Requested`. The kernel has no
    /// tracepoint for a timeout or a reset as such, so these statuses are what the tracer sees
    /// of them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<NvmeStatusCount>,
    /// The span `errors` covers, milliseconds (from the agent's oldest sample of the
    /// counters kept, at most a few tens of seconds, to the capture).
    #[serde(default)]
    pub errors_window_ms: u64,
}

/// NVMe completions with one status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NvmeStatusCount {
    pub status: String,
    pub count: u64,
}

/// One NVMe controller and its state (`/sys/class/nvme/nvmeX/state`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NvmeController {
    /// `nvme1`.
    pub name: String,
    /// `live`, `resetting`, `connecting`, `deleting`, `deleting (no IO)`, `dead`, `new`: the
    /// kernel's `nvme_ctrl_state` names. Anything but `live` holds every command on it.
    pub state: String,
    /// `pcie`, `tcp`, `rdma`, `fc`, `loop` (`transport`), where readable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<String>,
}

impl NvmeDiskEvidence {
    /// The controllers that are not `live`.
    pub fn not_live(&self) -> impl Iterator<Item = &NvmeController> {
        self.controllers.iter().filter(|c| c.state != "live")
    }
}

/// `controller nvme1 resetting; 32 NVMe commands outstanding; NVMe errors in the last 30 s:
/// 16 Command Aborted By Host`: a controller only when not `live` (a live one explains nothing),
/// the parts that are known.
impl std::fmt::Display for NvmeDiskEvidence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts: Vec<String> = self
            .not_live()
            .map(|c| format!("controller {} {}", c.name, c.state))
            .collect();
        if let Some(n) = self.outstanding {
            parts.push(format!("{n} NVMe commands outstanding"));
        }
        if !self.errors.is_empty() {
            let errors: Vec<String> = self
                .errors
                .iter()
                .map(|e| format!("{} {}", e.count, e.status))
                .collect();
            parts.push(format!(
                "NVMe errors in the last {} s: {}",
                self.errors_window_ms.div_ceil(1000),
                errors.join(", ")
            ));
        }
        f.write_str(&parts.join("; "))
    }
}

/// `nvme1n1 in flight 3 reads 0 writes, nr_requests 1023, scheduler none`, then the NVMe
/// part where there is one (`; controller nvme1 resetting; …`).
impl std::fmt::Display for DiskEvidence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} in flight {} reads {} writes, nr_requests {}, scheduler {}",
            self.disk,
            self.inflight_reads,
            self.inflight_writes,
            self.nr_requests.map_or("?".into(), |n| n.to_string()),
            self.scheduler.as_deref().unwrap_or("?")
        )?;
        match self.nvme.as_ref().map(ToString::to_string) {
            Some(n) if !n.is_empty() => write!(f, "; {n}"),
            _ => Ok(()),
        }
    }
}

impl DiskEvidence {
    /// This disk and the ones below it, `major:minor` each: where a limit on any of them
    /// holds the request.
    pub fn devices(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.dev.as_str()).chain(self.lower.iter().map(String::as_str))
    }
}

/// Reads disk `name` (`vda`, `loop0`, `nvme0n1`; no slashes).
pub fn disk(root: &HostRoot, name: &str) -> Result<DiskEvidence, ReadError> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return Err(ReadError::NotFound {
            path: format!("/sys/block/{name}"),
        });
    }
    let dir = format!("/sys/block/{name}");
    let dev = root.read_attr(&format!("{dir}/dev"))?;
    let inflight = root.read_attr(&format!("{dir}/inflight"))?;
    let mut n = inflight.split_whitespace().map(|v| v.parse::<u64>().ok());
    let (inflight_reads, inflight_writes) = (
        n.next().flatten().unwrap_or(0),
        n.next().flatten().unwrap_or(0),
    );
    let nr_requests = root
        .read_attr(&format!("{dir}/queue/nr_requests"))
        .ok()
        .and_then(|v| v.parse().ok());
    let scheduler = root
        .read_attr(&format!("{dir}/queue/scheduler"))
        .ok()
        .and_then(|s| scheduler_in_use(&s));
    Ok(DiskEvidence {
        disk: name.to_owned(),
        dev,
        inflight_reads,
        inflight_writes,
        nr_requests,
        scheduler,
        lower: lower_disks(root, name),
        nvme: name.starts_with("nvme").then(|| NvmeDiskEvidence {
            controllers: nvme_controllers(root, name),
            ..Default::default()
        }),
    })
}

/// The NVMe controllers behind disk `name`. Its sysfs `device` is the controller
/// (`nvme1n1` without native multipath, or a path disk `nvme0c1n1`), or, for a multipath
/// head (`nvme0n1` with `nvme_core.multipath`), the subsystem (`nvme-subsys0`), whose
/// entries `nvme0`, `nvme1`… are links to its controllers. A controller is a directory with
/// a `state` file; the name's digits are not used (a head's instance is the subsystem's, not
/// a controller's).
pub fn nvme_controllers(root: &HostRoot, name: &str) -> Vec<NvmeController> {
    let Ok(device) = root.resolve_link(&format!("/sys/block/{name}/device")) else {
        return Vec::new();
    };
    let read = |dir: &str| -> Option<NvmeController> {
        let state = root.read_attr(&format!("{dir}/state")).ok()?;
        let name = dir.rsplit('/').next().unwrap_or("").to_owned();
        Some(NvmeController {
            name,
            state,
            transport: root.read_attr(&format!("{dir}/transport")).ok(),
        })
    };
    if let Some(c) = read(&device) {
        return vec![c];
    }
    let Ok(entries) = root.list_dir(&device, 4096) else {
        return Vec::new();
    };
    entries
        .iter()
        .filter(|e| {
            e.strip_prefix("nvme")
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        })
        .filter_map(|e| read(&format!("{device}/{e}")))
        .take(CONTROLLERS_MAX)
        .collect()
}

/// `[none] mq-deadline kyber` → `none`; a queue with one choice lists it bare.
pub fn scheduler_in_use(text: &str) -> Option<String> {
    let words: Vec<&str> = text.split_whitespace().collect();
    words
        .iter()
        .find_map(|w| w.strip_prefix('[').and_then(|w| w.strip_suffix(']')))
        .or(match words[..] {
            [only] => Some(only),
            _ => None,
        })
        .map(str::to_owned)
}

/// The disks under `name` whose limits apply to its I/O: dm/md slaves, and for a loop device
/// its backing file's partition and whole disk (loop charges its I/O to the submitter's
/// cgroup, so a throttle on the disk below holds the loop request).
fn lower_disks(root: &HostRoot, name: &str) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(slaves) = root.list_dir(&format!("/sys/block/{name}/slaves"), LOWER_DISKS_MAX) {
        for s in slaves {
            if let Ok(dev) = root.read_attr(&format!("/sys/block/{name}/slaves/{s}/dev")) {
                out.push(dev);
            }
        }
    }
    if let Ok(file) = root.read_attr(&format!("/sys/block/{name}/loop/backing_file")) {
        // The backing file is a host path; stat it under the root.
        if let Ok(meta) = std::fs::metadata(root.path(file.trim_end_matches(" (deleted)"))) {
            use std::os::unix::fs::MetadataExt as _;
            let (major, minor) = (libc::major(meta.dev()), libc::minor(meta.dev()));
            let part = format!("{major}:{minor}");
            // A partition's whole disk is its parent in sysfs; limits are set on whole disks.
            if root.exists(&format!("/sys/dev/block/{part}/partition"))
                && let Ok(whole) = root.read_attr(&format!("/sys/dev/block/{part}/../dev"))
            {
                out.push(whole);
            }
            out.push(part);
        }
    }
    out.truncate(LOWER_DISKS_MAX);
    out
}

/// Which cgroup version a limit comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupVersion {
    V1,
    V2,
}

/// One I/O limit in force on a device for a cgroup: `blkio.throttle.read_bps_device` (v1) or
/// one key of an `io.max` line (v2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoLimit {
    /// The cgroup path (in its hierarchy) that sets the limit: the request's or an ancestor's.
    pub cgroup: String,
    pub version: CgroupVersion,
    /// The file it is read from (`blkio.throttle.read_iops_device`, `io.max`).
    pub file: String,
    /// `major:minor`.
    pub device: String,
    /// What is limited: `rbps`, `wbps`, `riops`, `wiops` (v2's names; v1's files map onto
    /// them), or `target` for an `io.latency` target (µs), which protects the group rather
    /// than limiting it.
    pub kind: String,
    pub value: u64,
}

impl IoLimit {
    /// Whether it holds the group's I/O back (`io.max`, `blkio.throttle.*`), not an
    /// `io.latency` target.
    pub fn limits(&self) -> bool {
        self.kind != "target"
    }
}

impl std::fmt::Display for IoLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let v = match self.version {
            CgroupVersion::V1 => "v1",
            CgroupVersion::V2 => "v2",
        };
        write!(
            f,
            "cgroup {} ({v}) {} {} {}={}",
            self.cgroup, self.file, self.device, self.kind, self.value
        )
    }
}

/// The cgroups of one thread that can limit its I/O: the v1 blkio one and the v2 one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskCgroups {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blkio: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unified: Option<String>,
}

/// The cgroups of thread `tid` of `pid` (`/proc/PID/task/TID/cgroup`; under v1 a thread can
/// be in a group of its own).
pub fn task_cgroups(root: &HostRoot, pid: u32, tid: u32) -> Result<TaskCgroups, ReadError> {
    let text = root.read(&format!("/proc/{pid}/task/{tid}/cgroup"), SMALL_FILE_LIMIT)?;
    Ok(parse_task_cgroups(&text))
}

/// `4:blkio:/a` and `0::/b` lines → the blkio and unified paths.
pub fn parse_task_cgroups(text: &str) -> TaskCgroups {
    let mut out = TaskCgroups::default();
    for line in text.lines() {
        let mut f = line.splitn(3, ':');
        let (Some(id), Some(ctrl), Some(path)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        if id == "0" && ctrl.is_empty() {
            out.unified = Some(path.to_owned());
        } else if ctrl.split(',').any(|c| c == "blkio" || c == "io") {
            out.blkio = Some(path.to_owned());
        }
    }
    out
}

/// Where cgroup v1 blkio and v2 are mounted on the usual layouts: v2 alone at
/// `/sys/fs/cgroup`, or hybrid with v2 at `/sys/fs/cgroup/unified`.
const BLKIO_MOUNT: &str = "/sys/fs/cgroup/blkio";
const UNIFIED_MOUNTS: [&str; 2] = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"];
/// v1 throttle files and the v2 key each maps onto.
const V1_FILES: [(&str, &str); 4] = [
    ("blkio.throttle.read_bps_device", "rbps"),
    ("blkio.throttle.write_bps_device", "wbps"),
    ("blkio.throttle.read_iops_device", "riops"),
    ("blkio.throttle.write_iops_device", "wiops"),
];
/// Ancestors examined at most: a limit on a parent holds its children too.
const DEPTH_MAX: usize = 32;

/// The limits in force on any of `devices` for the thread in `cgroups`: its group's and its
/// ancestors' (a parent's limit holds every child), v1 and v2.
pub fn io_limits(root: &HostRoot, cgroups: &TaskCgroups, devices: &[&str]) -> Vec<IoLimit> {
    let mut out = Vec::new();
    if let Some(path) = &cgroups.blkio {
        for group in ancestors(path) {
            for (file, kind) in V1_FILES {
                let at = format!("{BLKIO_MOUNT}{}/{file}", trail(group));
                let Ok(text) = root.read(&at, SMALL_FILE_LIMIT) else {
                    continue;
                };
                for line in text.lines() {
                    let mut w = line.split_whitespace();
                    if let (Some(dev), Some(v)) = (w.next(), w.next())
                        && devices.contains(&dev)
                        && let Ok(value) = v.parse()
                    {
                        out.push(IoLimit {
                            cgroup: group.to_owned(),
                            version: CgroupVersion::V1,
                            file: file.to_owned(),
                            device: dev.to_owned(),
                            kind: kind.to_owned(),
                            value,
                        });
                    }
                }
            }
        }
    }
    if let Some(path) = &cgroups.unified
        && let Some(mount) = UNIFIED_MOUNTS
            .iter()
            .find(|m| root.exists(&format!("{m}/cgroup.controllers")))
    {
        // io.latency's `target=N` (µs) is shown but limits nothing here: a group whose
        // target is missed throttles its siblings, not itself.
        for group in ancestors(path) {
            for file in ["io.max", "io.latency"] {
                let at = format!("{mount}{}/{file}", trail(group));
                let Ok(text) = root.read(&at, SMALL_FILE_LIMIT) else {
                    continue;
                };
                out.extend(
                    parse_io_max(&text)
                        .into_iter()
                        .filter(|(dev, _, _)| devices.contains(&dev.as_str()))
                        .map(|(device, kind, value)| IoLimit {
                            cgroup: group.to_owned(),
                            version: CgroupVersion::V2,
                            file: file.into(),
                            device,
                            kind,
                            value,
                        }),
                );
            }
        }
    }
    out
}

/// `8:0 rbps=1048576 wbps=max riops=max wiops=10` → the keys that are not `max`.
pub fn parse_io_max(text: &str) -> Vec<(String, String, u64)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut w = line.split_whitespace();
        let Some(dev) = w.next() else { continue };
        for kv in w {
            if let Some((k, v)) = kv.split_once('=')
                && let Ok(v) = v.parse()
            {
                out.push((dev.to_owned(), k.to_owned(), v));
            }
        }
    }
    out
}

/// `/a/b` → `/a/b`, `/a`, `/` (at most [`DEPTH_MAX`]); a path with `..` yields nothing (never
/// leave the hierarchy).
fn ancestors(path: &str) -> Vec<&str> {
    if path.split('/').any(|s| s == "..") || !path.starts_with('/') {
        return Vec::new();
    }
    let mut out = vec![path];
    let mut p = path;
    while let Some(i) = p.rfind('/') {
        p = if i == 0 { "/" } else { &p[..i] };
        if out.last() == Some(&p) || out.len() >= DEPTH_MAX {
            break;
        }
        out.push(p);
    }
    out
}

/// `/` → ``, `/a` → `/a`: joined after a mount point.
fn trail(group: &str) -> &str {
    group.trim_end_matches('/')
}

/// Descriptors of a process looked at when naming a file by its inode.
pub const FDS_MAX: usize = 4096;

/// The path of a descriptor of process `pid` open on the file (`dev`, `ino`), `dev` as the
/// kernel encodes it (`major << 20 | minor`); `Ok(None)` when none of its first [`FDS_MAX`]
/// descriptors is. Reading another process's `/proc/PID/fd` needs ptrace access (the
/// evidence thread's CAP_SYS_PTRACE).
pub fn fd_path(root: &HostRoot, pid: u32, dev: u32, ino: u64) -> Result<Option<String>, ReadError> {
    use std::os::unix::fs::MetadataExt as _;
    let dir = format!("/proc/{pid}/fd");
    for fd in root.list_dir(&dir, FDS_MAX)? {
        let link = format!("{dir}/{fd}");
        let Ok(meta) = std::fs::metadata(root.path(&link)) else {
            continue;
        };
        let (major, minor) = (libc::major(meta.dev()), libc::minor(meta.dev()));
        if meta.ino() == ino && (major << 20 | (minor & 0xf_ffff)) == dev {
            return std::fs::read_link(root.path(&link))
                .map(|p| Some(p.display().to_string()))
                .map_err(|e| ReadError::from_io(&link, &e));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stacks_parse_to_functions() {
        let t = ThreadEvidence {
            stack: parse_stack(
                "[<0>] pipe_read+0x1c2/0x4a0\n[<0>] io_read+0x5b/0x2f0 [io_uring]\n",
            ),
            ..Default::default()
        };
        assert_eq!(t.functions().collect::<Vec<_>>(), ["pipe_read", "io_read"]);
    }

    #[test]
    fn the_scheduler_in_use_is_the_bracketed_one() {
        assert_eq!(
            scheduler_in_use("none [mq-deadline] kyber\n").as_deref(),
            Some("mq-deadline")
        );
        assert_eq!(scheduler_in_use("none").as_deref(), Some("none"));
        assert_eq!(scheduler_in_use(""), None);
    }

    #[test]
    fn cgroup_lines_give_blkio_and_unified() {
        let c = parse_task_cgroups("12:pids:/x\n4:blkio:/gds-1\n0::/user.slice\n");
        assert_eq!(c.blkio.as_deref(), Some("/gds-1"));
        assert_eq!(c.unified.as_deref(), Some("/user.slice"));
    }

    #[test]
    fn ancestors_stop_at_the_root_and_refuse_dotdot() {
        assert_eq!(ancestors("/a/b"), ["/a/b", "/a", "/"]);
        assert_eq!(ancestors("/"), ["/"]);
        assert!(ancestors("/a/../b").is_empty());
    }

    #[test]
    fn limits_of_a_group_and_its_parent_on_the_disk_only() {
        let dir = tempfile::tempdir().unwrap();
        let root = HostRoot::new(dir.path());
        let blkio = dir.path().join("sys/fs/cgroup/blkio");
        std::fs::create_dir_all(blkio.join("a/b")).unwrap();
        std::fs::write(
            blkio.join("a/b/blkio.throttle.read_iops_device"),
            "253:0 1\n8:0 5\n",
        )
        .unwrap();
        std::fs::write(
            blkio.join("a/blkio.throttle.read_bps_device"),
            "253:0 4096\n",
        )
        .unwrap();
        let unified = dir.path().join("sys/fs/cgroup/unified");
        std::fs::create_dir_all(unified.join("u")).unwrap();
        std::fs::write(unified.join("cgroup.controllers"), "io\n").unwrap();
        std::fs::write(unified.join("u/io.max"), "253:0 rbps=max wiops=10\n").unwrap();
        std::fs::write(
            unified.join("io.latency"),
            "253:0 target=75\n8:0 target=10\n",
        )
        .unwrap();
        let cg = TaskCgroups {
            blkio: Some("/a/b".into()),
            unified: Some("/u".into()),
        };
        let got: Vec<String> = io_limits(&root, &cg, &["253:0"])
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            got,
            [
                "cgroup /a/b (v1) blkio.throttle.read_iops_device 253:0 riops=1",
                "cgroup /a (v1) blkio.throttle.read_bps_device 253:0 rbps=4096",
                "cgroup /u (v2) io.max 253:0 wiops=10",
                "cgroup / (v2) io.latency 253:0 target=75",
            ]
        );
        let limits = io_limits(&root, &cg, &["253:0"]);
        assert_eq!(
            limits.iter().filter(|l| !l.limits()).count(),
            1,
            "a latency target protects, it does not limit"
        );
        assert!(io_limits(&root, &cg, &["7:0"]).is_empty());
    }

    /// Writes `files` (path, contents) and `links` (path, target) under `dir`.
    fn tree(dir: &std::path::Path, files: &[(&str, &str)], links: &[(&str, &str)]) {
        for (p, text) in files {
            let p = dir.join(p);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }
        for (p, target) in links {
            let p = dir.join(p);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::os::unix::fs::symlink(target, p).unwrap();
        }
    }

    #[test]
    fn an_nvme_disk_names_its_controller_and_state() {
        let dir = tempfile::tempdir().unwrap();
        let ctrl = "sys/devices/pci0000:00/0000:00:05.0/nvme/nvme1";
        tree(
            dir.path(),
            &[
                (&format!("{ctrl}/state"), "resetting\n"),
                (&format!("{ctrl}/transport"), "pcie\n"),
                (&format!("{ctrl}/nvme1n1/dev"), "259:1\n"),
                (&format!("{ctrl}/nvme1n1/inflight"), "       7        0\n"),
                (&format!("{ctrl}/nvme1n1/queue/nr_requests"), "1023\n"),
                (
                    &format!("{ctrl}/nvme1n1/queue/scheduler"),
                    "[none] mq-deadline\n",
                ),
            ],
            &[
                (
                    "sys/block/nvme1n1",
                    "../devices/pci0000:00/0000:00:05.0/nvme/nvme1/nvme1n1",
                ),
                (&format!("{ctrl}/nvme1n1/device"), "../../nvme1"),
            ],
        );
        let d = disk(&HostRoot::new(dir.path()), "nvme1n1").unwrap();
        assert_eq!((d.inflight_reads, d.dev.as_str()), (7, "259:1"));
        let n = d.nvme.expect("an NVMe disk has NVMe evidence");
        assert_eq!(
            n.controllers,
            [NvmeController {
                name: "nvme1".into(),
                state: "resetting".into(),
                transport: Some("pcie".into()),
            }]
        );
        assert_eq!(n.not_live().count(), 1);
        assert_eq!(n.outstanding, None, "the tracer's part is not sysfs's");
        assert_eq!(
            Some(n).as_ref().map(ToString::to_string).unwrap(),
            "controller nvme1 resetting"
        );
    }

    #[test]
    fn disk_evidence_reads_as_one_line() {
        let mut d = DiskEvidence {
            disk: "nvme1n1".into(),
            inflight_reads: 32,
            nr_requests: Some(1023),
            scheduler: Some("none".into()),
            ..Default::default()
        };
        assert_eq!(
            d.to_string(),
            "nvme1n1 in flight 32 reads 0 writes, nr_requests 1023, scheduler none"
        );
        d.nvme = Some(NvmeDiskEvidence {
            controllers: vec![NvmeController {
                name: "nvme1".into(),
                state: "live".into(),
                transport: None,
            }],
            ..Default::default()
        });
        assert_eq!(
            d.to_string(),
            "nvme1n1 in flight 32 reads 0 writes, nr_requests 1023, scheduler none",
            "a live controller and nothing from the tracer add nothing"
        );
        let n = d.nvme.as_mut().unwrap();
        n.controllers[0].state = "resetting".into();
        n.outstanding = Some(40);
        n.errors = vec![NvmeStatusCount {
            status: "Command Aborted By Host".into(),
            count: 16,
        }];
        n.errors_window_ms = 29_500;
        assert_eq!(
            d.to_string(),
            "nvme1n1 in flight 32 reads 0 writes, nr_requests 1023, scheduler none; \
             controller nvme1 resetting; 40 NVMe commands outstanding; \
             NVMe errors in the last 30 s: 16 Command Aborted By Host"
        );
    }

    #[test]
    fn a_multipath_head_lists_the_controllers_of_its_subsystem() {
        let dir = tempfile::tempdir().unwrap();
        let subsys = "sys/devices/virtual/nvme-subsystem/nvme-subsys0";
        let c = |n: &str| format!("sys/devices/pci0000:00/0000:00:0{n}.0/nvme/nvme{n}");
        tree(
            dir.path(),
            &[
                (&format!("{}/state", c("0")), "live\n"),
                (&format!("{}/state", c("2")), "connecting\n"),
                (&format!("{subsys}/subsysnqn"), "nqn.2019-08.org.qemu:s\n"),
                (&format!("{subsys}/nvme0n1/dev"), "259:0\n"),
                (&format!("{subsys}/nvme0n1/inflight"), "0 0\n"),
                // A path disk's own directory sits under its controller.
                (&format!("{}/nvme0c2n1/dev", c("2")), "259:3\n"),
                (&format!("{}/nvme0c2n1/inflight", c("2")), "3 0\n"),
            ],
            &[
                (
                    "sys/block/nvme0n1",
                    "../devices/virtual/nvme-subsystem/nvme-subsys0/nvme0n1",
                ),
                (&format!("{subsys}/nvme0n1/device"), "../../nvme-subsys0"),
                (
                    &format!("{subsys}/nvme0"),
                    "../../../pci0000:00/0000:00:00.0/nvme/nvme0",
                ),
                (
                    &format!("{subsys}/nvme2"),
                    "../../../pci0000:00/0000:00:02.0/nvme/nvme2",
                ),
                (
                    "sys/block/nvme0c2n1",
                    "../devices/pci0000:00/0000:00:02.0/nvme/nvme2/nvme0c2n1",
                ),
                (&format!("{}/nvme0c2n1/device", c("2")), "../../nvme2"),
            ],
        );
        let root = HostRoot::new(dir.path());
        let states = |disk: &str| -> Vec<(String, String)> {
            nvme_controllers(&root, disk)
                .into_iter()
                .map(|c| (c.name, c.state))
                .collect()
        };
        assert_eq!(
            states("nvme0n1"),
            [
                ("nvme0".to_owned(), "live".to_owned()),
                ("nvme2".to_owned(), "connecting".to_owned())
            ]
        );
        assert_eq!(
            states("nvme0c2n1"),
            [("nvme2".to_owned(), "connecting".to_owned())]
        );
        assert!(states("nvme9n1").is_empty(), "no such disk");
    }

    #[test]
    fn other_disks_have_no_nvme_evidence() {
        let dir = tempfile::tempdir().unwrap();
        tree(
            dir.path(),
            &[
                ("sys/block/sda/dev", "8:0\n"),
                ("sys/block/sda/inflight", "0 0\n"),
                // A SCSI device has a `state` too (`running`): not a controller of ours.
                ("sys/block/sda/device/state", "running\n"),
            ],
            &[],
        );
        assert_eq!(disk(&HostRoot::new(dir.path()), "sda").unwrap().nvme, None);
    }

    #[test]
    fn older_disk_evidence_still_parses() {
        let d: DiskEvidence = serde_json::from_str(
            r#"{"disk":"nvme0n1","dev":"259:0","inflight_reads":1,"inflight_writes":0}"#,
        )
        .unwrap();
        assert_eq!(d.nvme, None);
    }

    #[test]
    fn a_live_thread_reads_its_own_state() {
        // SAFETY: getpid/gettid have no preconditions.
        let (pid, tid) = unsafe { (libc::getpid() as u32, libc::gettid() as u32) };
        let t = thread(&HostRoot::new("/"), pid, tid).unwrap();
        assert_eq!(t.tid, tid);
        // Reading its own stat, it is running.
        assert_eq!(t.state, "R", "{t:?}");
        // Root (the tests' user) reads its own stack; anyone else is told why not.
        assert!(
            !t.stack.is_empty() || t.unreadable.iter().any(|u| u.contains("stack")),
            "{t:?}"
        );
        assert!(thread(&HostRoot::new("/"), pid, u32::MAX).is_err());
    }
}
