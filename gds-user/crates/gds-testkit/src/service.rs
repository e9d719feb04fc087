//! A child process with its output in a log file, stopped (SIGTERM, then SIGKILL after 10 s)
//! when dropped; [`start_agent`] spawns `gds-agent run` and waits until its /metrics answers.
//!
//! The one spawn-and-wait of the end-to-end tests (`common::Agent` adds a free port, a scratch
//! directory and unshare/setpriv wrappers) and of xtask (which also runs Prometheus and fio as
//! services), over `gds_api::client`.

use std::{
    fs, io,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use thiserror::Error;

use gds_api::client::{self, ClientError};

#[derive(Debug, Error)]
pub enum ServiceError {
    #[error("creating {}: {source}", path.display())]
    Log { path: PathBuf, source: io::Error },
    #[error("starting {name}: {cmd}: {source}")]
    Spawn {
        name: &'static str,
        cmd: String,
        source: io::Error,
    },
    #[error("{name} exited ({status}); its log:\n{log}")]
    Exited {
        name: &'static str,
        status: ExitStatus,
        log: String,
    },
    #[error("{source}; its log:\n{log}")]
    NotServing { source: ClientError, log: String },
}

/// A child process whose stdout and stderr go to `log`.
pub struct Service {
    pub name: &'static str,
    pub child: Child,
    pub log: PathBuf,
}

/// Starts `cmd` (`gds-agent run` listening on `addr`, or a wrapper that ends by exec'ing it)
/// and waits until its /metrics answers; fails with its log if it exits first.
pub fn start_agent(
    cmd: &mut Command,
    addr: SocketAddr,
    log: &Path,
    timeout: Duration,
) -> Result<Service, ServiceError> {
    let mut agent = Service::spawn("gds-agent", cmd, log)?;
    agent.wait_serving(addr, timeout)?;
    Ok(agent)
}

impl Service {
    pub fn spawn(
        name: &'static str,
        cmd: &mut Command,
        log: &Path,
    ) -> Result<Service, ServiceError> {
        let log_err = |source| ServiceError::Log {
            path: log.to_owned(),
            source,
        };
        let out = fs::File::create(log).map_err(log_err)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone().map_err(log_err)?)
            .stderr(out)
            .spawn()
            .map_err(|source| ServiceError::Spawn {
                name,
                cmd: format!("{cmd:?}"),
                source,
            })?;
        Ok(Service {
            name,
            child,
            log: log.to_owned(),
        })
    }

    /// Waits until the agent this service runs serves /metrics at `addr`; how long that took.
    pub fn wait_serving(
        &mut self,
        addr: SocketAddr,
        timeout: Duration,
    ) -> Result<Duration, ServiceError> {
        client::wait_serving(addr, &mut self.child, timeout).map_err(|source| {
            ServiceError::NotServing {
                source,
                log: self.log_tail(),
            }
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// An error with the log's tail once the process has exited.
    pub fn alive(&mut self) -> Result<(), ServiceError> {
        match self.child.try_wait() {
            Ok(Some(status)) => Err(ServiceError::Exited {
                name: self.name,
                status,
                log: self.log_tail(),
            }),
            _ => Ok(()),
        }
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The log's last 3000 bytes or so (whole characters).
    pub fn log_tail(&self) -> String {
        let text = self.log();
        let start = text.len().saturating_sub(3000);
        let start = (start..text.len())
            .find(|i| text.is_char_boundary(*i))
            .unwrap_or(text.len());
        text[start..].to_owned()
    }

    /// Stops it now; its exit status and whole log.
    pub fn stop(mut self) -> (ExitStatus, String) {
        (self.terminate(), self.log())
    }

    /// SIGTERM (the agent detaches its programs, Prometheus closes its TSDB), SIGKILL after
    /// 30 s; the exit status. Long because an agent that attached to a libcufile (any test's
    /// agent sees the cuFile test's processes) closes 28 uprobes per library at ~90 ms each on
    /// the 2-CPU VM (the kernel serializes them).
    pub fn terminate(&mut self) -> ExitStatus {
        if let Ok(Some(status)) = self.child.try_wait() {
            return status;
        }
        // SAFETY: kill(2) on our own child, which has not been reaped.
        unsafe { kill(self.child.id() as i32, SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        self.child.wait().expect("wait for a killed child")
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.terminate();
    }
}

const SIGTERM: i32 = 15;

unsafe extern "C" {
    fn kill(pid: i32, sig: i32) -> i32;
}
