//! An io_uring for NVMe passthrough: SQE128 (the 72-byte command needs the 80-byte command area)
//! and CQE32 (the NVMe result travels in the CQE's second half), commands submitted with
//! `opcode::UringCmd80`, optional registered buffers (IORING_URING_CMD_FIXED + buf_index).

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use io_uring::{IoUring, cqueue, opcode, squeue, types};

use super::buffer::DmaBuffer;
use super::cmd::{IDENTIFY_DATA_LEN, NvmeIdentifyCmd, NvmeUringCmd, UringCmdOp};
use super::error::NvmeError;
use super::geometry::{IdentifyController, IdentifyNamespace, NamespaceGeometry};
use super::status::CompletionOutcome;

/// One reaped completion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NvmeCompletion {
    pub user_data: u64,
    /// `-errno`, 0, or the NVMe status (see [`CompletionOutcome::decode`]).
    pub res: i32,
    /// NVMe command result (CQE dword 0/1) from the big CQE.
    pub result: u64,
}

impl NvmeCompletion {
    pub fn outcome(&self) -> CompletionOutcome {
        CompletionOutcome::decode(self.res, self.result)
    }

    /// `Ok(result)` or the decoded failure, with the command's context.
    pub fn check(
        &self,
        device: &str,
        cmd: &NvmeUringCmd,
        op: UringCmdOp,
    ) -> Result<u64, NvmeError> {
        let (lba, blocks) = match (op, cmd.opcode) {
            (UringCmdOp::Admin, _) | (_, super::cmd::opcode::FLUSH) => (0, 0),
            _ => (cmd.slba(), cmd.blocks()),
        };
        match self.outcome() {
            CompletionOutcome::Success { result } => Ok(result),
            CompletionOutcome::Errno(errno) => Err(NvmeError::Kernel {
                device: device.to_string(),
                op: cmd.op_name(op),
                lba,
                blocks,
                errno,
            }),
            CompletionOutcome::Device(status) => Err(NvmeError::Device {
                device: device.to_string(),
                op: cmd.op_name(op),
                lba,
                blocks,
                status,
            }),
        }
    }
}

/// A passthrough ring bound to one NVMe char device (`/dev/ngXnY` for I/O, `/dev/nvmeX` for
/// admin commands).
pub struct NvmeRing {
    ring: IoUring<squeue::Entry128, cqueue::Entry32>,
    fd: OwnedFd,
    device: String,
    depth: u32,
    in_flight: u32,
    queued: u32,
    submitted_total: u64,
    registered_buffers: u16,
}

impl NvmeRing {
    /// Open `device` read-write and create a ring of `depth` entries.
    pub fn open(device: impl AsRef<Path>, depth: u32) -> Result<Self, NvmeError> {
        let path = device.as_ref();
        let name = path.display().to_string();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|io| NvmeError::Open {
                device: name.clone(),
                hint: match io.raw_os_error() {
                    Some(libc::EACCES) | Some(libc::EPERM) => {
                        "passthrough needs CAP_SYS_ADMIN or read/write permission on the node"
                    }
                    Some(libc::ENOENT) => {
                        "no such node: NVMe generic char devices are /dev/ngXnY (Linux >= 5.19)"
                    }
                    _ => "check that it is an NVMe char device",
                },
                io,
            })?;
        Self::from_fd(file.into(), name, depth)
    }

    /// Use an already open NVMe char device.
    pub fn from_fd(fd: OwnedFd, device: String, depth: u32) -> Result<Self, NvmeError> {
        let depth = depth.clamp(1, 4096);
        let ring = IoUring::<squeue::Entry128, cqueue::Entry32>::builder()
            .build(depth)
            .map_err(|io| NvmeError::Ring {
                device: device.clone(),
                what: "setup (SQE128|CQE32)",
                io,
            })?;
        Ok(Self {
            ring,
            fd,
            device,
            depth,
            in_flight: 0,
            queued: 0,
            submitted_total: 0,
            registered_buffers: 0,
        })
    }

    pub fn device(&self) -> &str {
        &self.device
    }

    pub fn depth(&self) -> u32 {
        self.depth
    }

    /// Commands submitted to the kernel and not yet reaped.
    pub fn in_flight(&self) -> u32 {
        self.in_flight
    }

    /// Commands pushed but not yet submitted.
    pub fn queued(&self) -> u32 {
        self.queued
    }

    /// Commands handed to the kernel since the ring was created.
    pub fn submitted_total(&self) -> u64 {
        self.submitted_total
    }

    /// Register `buffers` as the ring's fixed buffers; index `i` is then `buf_index` `i`.
    ///
    /// # Safety
    /// The buffers must stay allocated and unmoved until [`Self::unregister_buffers`] or the
    /// ring is dropped.
    pub unsafe fn register_buffers(&mut self, buffers: &mut [DmaBuffer]) -> Result<(), NvmeError> {
        let iovecs: Vec<libc::iovec> = buffers.iter_mut().map(|b| b.iovec()).collect();
        // SAFETY: forwarded to the caller's contract.
        unsafe { self.ring.submitter().register_buffers(&iovecs) }.map_err(|io| {
            NvmeError::Ring {
                device: self.device.clone(),
                what: "register_buffers",
                io,
            }
        })?;
        self.registered_buffers = iovecs.len() as u16;
        Ok(())
    }

    pub fn unregister_buffers(&mut self) -> Result<(), NvmeError> {
        if self.registered_buffers == 0 {
            return Ok(());
        }
        self.ring
            .submitter()
            .unregister_buffers()
            .map_err(|io| NvmeError::Ring {
                device: self.device.clone(),
                what: "unregister_buffers",
                io,
            })?;
        self.registered_buffers = 0;
        Ok(())
    }

    /// Queue one command without submitting it (batching: push several, then
    /// [`Self::submit`] or [`Self::wait`]). When the SQ is full the queued commands are
    /// submitted first.
    ///
    /// # Safety
    /// The memory `cmd.addr .. cmd.addr + cmd.data_len` must stay valid (and, for reads,
    /// unaliased) until this command's completion is reaped. With `fixed = Some(i)`, that range
    /// must lie inside registered buffer `i`.
    pub unsafe fn push(
        &mut self,
        cmd: &NvmeUringCmd,
        op: UringCmdOp,
        fixed: Option<u16>,
        user_data: u64,
    ) -> Result<(), NvmeError> {
        if let Some(i) = fixed
            && i >= self.registered_buffers
        {
            return Err(NvmeError::Ring {
                device: self.device.clone(),
                what: "push (fixed buffer index)",
                io: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!(
                        "buf_index {i} but {} buffers are registered",
                        self.registered_buffers
                    ),
                ),
            });
        }
        let entry = opcode::UringCmd80::new(types::Fd(self.fd.as_raw_fd()), op.ioctl())
            .cmd(cmd.to_sqe_cmd())
            .buf_index(fixed)
            .build()
            .user_data(user_data);
        loop {
            // SAFETY: the entry only references memory under the caller's contract.
            let pushed = unsafe { self.ring.submission().push(&entry) };
            if pushed.is_ok() {
                self.queued += 1;
                return Ok(());
            }
            // SQ full: hand the queued commands over; if the kernel takes none, say so rather
            // than spin.
            if self.submit()? == 0 {
                return Err(NvmeError::Ring {
                    device: self.device.clone(),
                    what: "push (submission queue full)",
                    io: std::io::Error::from_raw_os_error(libc::EBUSY),
                });
            }
        }
    }

    /// Hand all queued commands to the kernel in one `io_uring_enter`.
    pub fn submit(&mut self) -> Result<usize, NvmeError> {
        self.submit_and_wait(0)
    }

    fn submit_and_wait(&mut self, want: usize) -> Result<usize, NvmeError> {
        let n = loop {
            match self.ring.submit_and_wait(want) {
                Ok(n) => break n,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(io) => {
                    return Err(NvmeError::Ring {
                        device: self.device.clone(),
                        what: "submit",
                        io,
                    });
                }
            }
        };
        self.account_submitted(n);
        Ok(n)
    }

    fn account_submitted(&mut self, n: usize) {
        let n = (n as u32).min(self.queued);
        self.queued -= n;
        self.in_flight += n;
        self.submitted_total += u64::from(n);
    }

    /// Submit what is queued, wait for at least `min` completions, and append every available
    /// completion to `out`.
    pub fn wait(&mut self, min: usize, out: &mut Vec<NvmeCompletion>) -> Result<(), NvmeError> {
        let min = min.min((self.in_flight + self.queued) as usize);
        self.submit_and_wait(min)?;
        self.reap(out);
        Ok(())
    }

    /// Like [`Self::wait`], but give up after `timeout` with `ETIME` (commands stay in flight).
    pub fn wait_timeout(
        &mut self,
        min: usize,
        timeout: Duration,
        out: &mut Vec<NvmeCompletion>,
    ) -> Result<(), NvmeError> {
        let min = min.min((self.in_flight + self.queued) as usize);
        let ts = types::Timespec::from(timeout);
        let args = types::SubmitArgs::new().timespec(&ts);
        // One io_uring_enter submits what is queued and waits; count what left the SQ even
        // when the wait itself timed out.
        let res = self.ring.submitter().submit_with_args(min, &args);
        let left = self.ring.submission().len() as u32;
        self.account_submitted(self.queued.saturating_sub(left) as usize);
        match res {
            Ok(_) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME) | Some(libc::EINTR)) => {}
            Err(io) => {
                return Err(NvmeError::Ring {
                    device: self.device.clone(),
                    what: "wait (submit_with_args)",
                    io,
                });
            }
        }
        let before = out.len();
        self.reap(out);
        if out.len() - before < min {
            return Err(NvmeError::Ring {
                device: self.device.clone(),
                what: "wait",
                io: std::io::Error::from_raw_os_error(libc::ETIME),
            });
        }
        Ok(())
    }

    fn reap(&mut self, out: &mut Vec<NvmeCompletion>) {
        for cqe in self.ring.completion() {
            out.push(NvmeCompletion {
                user_data: cqe.user_data(),
                res: cqe.result(),
                result: cqe.big_cqe()[0],
            });
            self.in_flight = self.in_flight.saturating_sub(1);
        }
    }

    /// Submit one command and wait for it; `Ok(result)` or the decoded failure. The ring must
    /// be idle (nothing queued or in flight).
    ///
    /// # Safety
    /// As for [`Self::push`] (the buffer only has to outlive this call).
    pub unsafe fn execute(
        &mut self,
        cmd: &NvmeUringCmd,
        op: UringCmdOp,
        fixed: Option<u16>,
    ) -> Result<u64, NvmeError> {
        const TAG: u64 = u64::MAX;
        // Completions of other commands would be reaped here and lost to their owner.
        if self.in_flight + self.queued > 0 {
            return Err(NvmeError::Ring {
                device: self.device.clone(),
                what: "execute",
                io: std::io::Error::new(
                    std::io::ErrorKind::ResourceBusy,
                    format!(
                        "{} commands are queued or in flight; execute needs an idle ring",
                        self.in_flight + self.queued
                    ),
                ),
            });
        }
        // SAFETY: forwarded; we wait for the completion before returning.
        unsafe { self.push(cmd, op, fixed, TAG)? };
        let mut done = Vec::with_capacity(1);
        while !done.iter().any(|c: &NvmeCompletion| c.user_data == TAG) {
            self.wait(1, &mut done)?;
        }
        let c = done.into_iter().find(|c| c.user_data == TAG).unwrap();
        c.check(&self.device, cmd, op)
    }

    /// Identify Controller and Identify Namespace `nsid` through this ring (it must be open on
    /// the controller char device `/dev/nvmeX`).
    pub fn identify(
        &mut self,
        nsid: u32,
    ) -> Result<(IdentifyController, IdentifyNamespace), NvmeError> {
        let mut buf = DmaBuffer::new(IDENTIFY_DATA_LEN as usize);
        let cmd = NvmeIdentifyCmd::controller()
            .buffer(buf.as_mut_ptr(), buf.len())
            .build()?;
        // SAFETY: buf outlives the synchronous execute.
        unsafe { self.execute(&cmd, UringCmdOp::Admin, None)? };
        let ctrl = IdentifyController::parse(buf[..].try_into().unwrap());
        buf.fill(0);
        let cmd = NvmeIdentifyCmd::namespace(nsid)
            .buffer(buf.as_mut_ptr(), buf.len())
            .build()?;
        // SAFETY: as above.
        unsafe { self.execute(&cmd, UringCmdOp::Admin, None)? };
        let ns = IdentifyNamespace::parse(buf[..].try_into().unwrap());
        Ok((ctrl, ns))
    }
}

/// Geometry of an NVMe namespace char device: sysfs first (the limits the kernel applies),
/// Identify through the controller's char device when sysfs has no entry for it.
/// Refuses what cannot take NVMe passthrough before anything is opened, saying what it is
/// instead: a regular file, a block device (whose generic twin is named), or another char
/// device (named by its driver class in /sys/dev/char).
fn check_generic_device(device: &Path, meta: &std::fs::Metadata) -> Result<(), NvmeError> {
    use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
    let name = device.display().to_string();
    let ft = meta.file_type();
    let file = device.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let refuse = |what: String, fix: String| {
        Err(NvmeError::NotANamespace {
            device: name.clone(),
            what,
            fix,
        })
    };
    if ft.is_block_device() {
        let fix = match super::geometry::generic_name(file) {
            Some(ng) => format!("use /dev/{ng}, the generic char device of the same namespace"),
            None => "passthrough reads take /dev/ngXnY; read a block device as SRC instead: `gds-agent read DEV`"
                .into(),
        };
        return refuse("a block device".into(), fix);
    }
    if !ft.is_char_device() {
        let what = if meta.is_dir() {
            "a directory"
        } else if meta.is_file() {
            "a regular file"
        } else {
            "not a device"
        };
        return refuse(
            what.into(),
            "give /dev/ngXnY (see `ls /dev/ng*`); read files as SRC: `gds-agent read FILE`".into(),
        );
    }
    let (major, minor) = (
        libc::major(meta.rdev() as libc::dev_t),
        libc::minor(meta.rdev() as libc::dev_t),
    );
    let class = std::fs::read_link(format!("/sys/dev/char/{major}:{minor}/subsystem"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
    match class.as_deref() {
        Some("nvme-generic") | None => Ok(()),
        Some("nvme") => refuse(
            "an NVMe controller's char device".into(),
            format!(
                "give one of its namespaces' generic devices, e.g. {}n1",
                name.replace("/dev/nvme", "/dev/ng")
            ),
        ),
        Some(other) => refuse(
            format!("a character device of class {other}"),
            "give /dev/ngXnY (see `ls /dev/ng*`)".into(),
        ),
    }
}

pub fn namespace_geometry(device: &Path) -> Result<NamespaceGeometry, NvmeError> {
    let name = device.display().to_string();
    let meta = match std::fs::metadata(device) {
        Ok(m) => m,
        Err(io) => {
            return Err(NvmeError::Open {
                device: name,
                hint: "NVMe namespaces have generic char devices /dev/ngXnY (Linux >= 5.19)",
                io,
            });
        }
    };
    check_generic_device(device, &meta)?;
    let sysfs_err = match NamespaceGeometry::from_sysfs(device) {
        Ok(g) => return Ok(g),
        Err(e) => e,
    };
    let file = device.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let (Some(ctrl_dev), Some(nsid)) = (
        super::geometry::controller_device_for(file),
        file.rsplit_once('n')
            .and_then(|(_, y)| y.parse::<u32>().ok()),
    ) else {
        return Err(sysfs_err);
    };
    let identify = NvmeRing::open(&ctrl_dev, 2)
        .and_then(|mut ring| ring.identify(nsid))
        .and_then(|(ctrl, ns)| NamespaceGeometry::from_identify(&name, nsid, &ns, &ctrl));
    identify.map_err(|e| NvmeError::Geometry {
        device: name,
        reason: format!("{sysfs_err}; and Identify through {ctrl_dev} failed: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NvmeFlushCmd;

    /// The host has no NVMe, but the ring path (SQE128|CQE32 setup, UringCmd80, submit, reap,
    /// decode) is the same for any file: a regular file has no `uring_cmd` and fails with
    /// EOPNOTSUPP. (Not /dev/null: recent kernels give it a `uring_cmd` that succeeds.)
    fn file_ring(depth: u32) -> NvmeRing {
        let f = tempfile::tempfile().unwrap();
        NvmeRing::from_fd(f.into(), "/tmp/regular-file".into(), depth).unwrap()
    }

    #[test]
    fn errno_from_a_file_without_uring_cmd_is_decoded() {
        let mut ring = file_ring(2);
        let cmd = NvmeFlushCmd::new(1).build();
        // SAFETY: the command carries no buffer.
        let err = unsafe { ring.execute(&cmd, UringCmdOp::Io, None) }.unwrap_err();
        assert_eq!(err.errno(), Some(libc::EOPNOTSUPP), "{err}");
        let text = err.to_string();
        assert!(
            text.contains("/tmp/regular-file: kernel failed flush with EOPNOTSUPP"),
            "{text}"
        );
        assert_eq!(
            (ring.in_flight(), ring.queued(), ring.submitted_total()),
            (0, 0, 1)
        );
    }

    #[test]
    fn pushing_past_the_sq_submits_and_every_completion_is_reaped() {
        let mut ring = file_ring(8);
        let cmd = NvmeFlushCmd::new(1).build();
        for i in 0..40 {
            // SAFETY: no buffer.
            unsafe { ring.push(&cmd, UringCmdOp::Io, None, i).unwrap() };
        }
        assert!(ring.submitted_total() >= 32, "a full SQ must be submitted");
        // execute refuses to run while others are outstanding (it would steal completions).
        // SAFETY: no buffer.
        assert!(unsafe { ring.execute(&cmd, UringCmdOp::Io, None) }.is_err());
        let mut done = Vec::new();
        while done.len() < 40 {
            ring.wait_timeout(1, Duration::from_secs(5), &mut done)
                .unwrap();
        }
        let mut tags: Vec<u64> = done.iter().map(|c| c.user_data).collect();
        tags.sort_unstable();
        assert_eq!(tags, (0..40).collect::<Vec<_>>());
        assert!(done.iter().all(|c| c.res == -libc::EOPNOTSUPP));
        assert_eq!(
            (ring.in_flight(), ring.queued(), ring.submitted_total()),
            (0, 0, 40)
        );
        // A fixed-buffer index without registered buffers is refused before submission.
        // SAFETY: no buffer.
        assert!(unsafe { ring.push(&cmd, UringCmdOp::Io, Some(0), 0) }.is_err());
    }
}
