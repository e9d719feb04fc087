//! Choosing how to attach, and resolving the offsets the programs read at.
//!
//! BTF tracepoints are preferred: the kernel hands its own pointers and no record is
//! formatted (classic io_uring_submit_req even copies the opcode name string), measured ~100 ns
//! cheaper per request here. Their field offsets come from /sys/kernel/btf/vmlinux. Without
//! BTF, the classic tracepoints are used with offsets from their format files.

use std::path::Path;

use gds_common::UringConfig;

use super::TraceError;
use gds_host::{btf::Btf, tracefs::EventFormat};

/// How to attach (`--attach`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    /// BTF tracepoints when the kernel has BTF, classic tracepoints otherwise.
    #[default]
    Auto,
    /// BTF (tp_btf) tracepoints only.
    Btf,
    /// Classic tracepoints only (offsets from tracefs format files).
    Classic,
}

/// What was decided: the mode, the program for each attach point, and the offsets.
#[derive(Debug, Clone)]
pub struct ResolvedAttach {
    pub mode: AttachMode,
    /// Submission tracepoint name: `io_uring_submit_req` (6.3+) or `io_uring_submit_sqe`.
    pub submit_tp: &'static str,
    /// Completion program: `uring_complete` (cqe pointer, 6.3+) or `uring_complete_flat`.
    pub complete_prog: &'static str,
    pub config: UringConfig,
    /// Why this mode (logged once at start).
    pub why: String,
}

const SUBMIT_TPS: [&str; 2] = ["io_uring_submit_req", "io_uring_submit_sqe"];

/// The submission tracepoint this kernel's BTF has (kernels name it one of two ways).
pub(crate) fn btf_submit_tp(btf: &Btf) -> Result<&'static str, TraceError> {
    SUBMIT_TPS
        .into_iter()
        .find(|tp| btf.has_tracepoint(tp))
        .ok_or_else(|| TraceError::TracepointMissing {
            name: SUBMIT_TPS.join(" / "),
            place: "the kernel's BTF".into(),
        })
}

fn kiocb_offsets(btf: &Btf, cfg: &mut UringConfig) -> Result<(), TraceError> {
    cfg.kiocb_opcode = btf.member_offset("io_kiocb", &["opcode"])?;
    cfg.kiocb_ctx = btf.member_offset("io_kiocb", &["ctx"])?;
    cfg.kiocb_user_data = btf.member_offset("io_kiocb", &["cqe", "user_data"])?;
    Ok(())
}

fn resolve_btf(btf: &Btf, base: UringConfig) -> Result<ResolvedAttach, TraceError> {
    let mut config = base;
    kiocb_offsets(btf, &mut config)?;
    let submit_tp = btf_submit_tp(btf)?;
    for tp in ["io_uring_req_failed", "io_uring_complete"] {
        if !btf.has_tracepoint(tp) {
            return Err(TraceError::TracepointMissing {
                name: tp.into(),
                place: "the kernel's BTF".into(),
            });
        }
    }
    let params = btf.tracepoint_params("io_uring_complete")?;
    let complete_prog = match params.len() {
        3 if params[2].contains("io_uring_cqe") => "uring_complete",
        7 => "uring_complete_flat",
        _ => {
            return Err(TraceError::UnsupportedPrototype {
                name: "io_uring_complete".into(),
                params: params.join(", "),
            });
        }
    };
    Ok(ResolvedAttach {
        mode: AttachMode::Btf,
        submit_tp,
        complete_prog,
        config,
        why: format!(
            "BTF tracepoints ({submit_tp}, io_uring_complete with {} arguments, io_uring_req_failed)",
            params.len()
        ),
    })
}

fn resolve_classic(
    tracefs: &Path,
    btf: Option<&Btf>,
    base: UringConfig,
) -> Result<ResolvedAttach, TraceError> {
    let mut config = base;
    let submit_tp = SUBMIT_TPS
        .into_iter()
        .find(|tp| tracefs.join("events/io_uring").join(tp).exists())
        .ok_or_else(|| TraceError::TracepointMissing {
            name: SUBMIT_TPS.join(" / "),
            place: tracefs.join("events/io_uring").display().to_string(),
        })?;
    let submit = EventFormat::read(tracefs, "io_uring", submit_tp)?;
    config.tp_submit_ctx = submit.offset("ctx")?;
    config.tp_submit_req = submit.offset("req")?;
    config.tp_submit_user_data = submit.offset("user_data")?;
    config.tp_submit_opcode = submit.offset("opcode")?;
    let complete = EventFormat::read(tracefs, "io_uring", "io_uring_complete")?;
    config.tp_complete_req = complete.offset("req")?;
    config.tp_complete_res = complete.offset("res")?;
    let failed = EventFormat::read(tracefs, "io_uring", "io_uring_req_failed")?;
    config.tp_failed_ctx = failed.offset("ctx")?;
    config.tp_failed_req = failed.offset("req")?;
    config.tp_failed_user_data = failed.offset("user_data")?;
    config.tp_failed_opcode = failed.offset("opcode")?;
    // Opcode of unmatched error completions: only known with BTF (else counted under 255).
    if let Some(btf) = btf {
        config.kiocb_opcode = btf.member_offset("io_kiocb", &["opcode"]).unwrap_or(0);
    }
    Ok(ResolvedAttach {
        mode: AttachMode::Classic,
        submit_tp,
        complete_prog: "uring_complete_tp",
        config,
        why: format!("classic tracepoints ({submit_tp}, io_uring_complete, io_uring_req_failed)"),
    })
}

/// Decides how to attach. `tracefs` is needed only for the classic mode.
pub fn resolve(
    mode: AttachMode,
    btf: Result<&Btf, &gds_host::btf::BtfError>,
    tracefs: Option<&Path>,
    base: UringConfig,
) -> Result<ResolvedAttach, TraceError> {
    let classic = |btf: Option<&Btf>, why: String| -> Result<ResolvedAttach, TraceError> {
        let dir = tracefs.ok_or_else(|| TraceError::NoTracefs { why: why.clone() })?;
        let mut r = resolve_classic(dir, btf, base)?;
        r.why = format!("{} — {why}", r.why);
        Ok(r)
    };
    match (mode, btf) {
        (AttachMode::Btf, Ok(btf)) => resolve_btf(btf, base),
        (AttachMode::Btf, Err(e)) => Err(TraceError::BtfRequired(e.to_string())),
        (AttachMode::Classic, btf) => classic(btf.ok(), "requested with --attach classic".into()),
        (AttachMode::Auto, Ok(btf)) => match resolve_btf(btf, base) {
            Ok(r) => Ok(r),
            Err(e) => classic(Some(btf), format!("BTF mode unavailable: {e}")),
        },
        (AttachMode::Auto, Err(e)) => classic(None, format!("no usable kernel BTF: {e}")),
    }
}
