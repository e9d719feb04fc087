//! io_uring tracing on the guest kernels, through the library: every program variant the
//! agent can load (BTF and classic tracepoints, with and without `--opcode`) passes the
//! kernel's verifier (6.1's is the strictest), and each opcode is counted under its own number,
//! including ones the kernel does not know.

use anyhow::{Context, Result, ensure};
use gds_trace::{AttachMode, TraceOptions, UringTracer};
use io_uring::{IoUring, opcode};

use crate::{Ctx, Scenario};

pub fn scenarios() -> Vec<Scenario> {
    vec![Scenario::new(
        "uring.opcodes-apart",
        "IORING_OP_LAST - 1, IORING_OP_LAST and 200 counted apart; BTF and classic, with and without --opcode",
        180,
        opcodes_apart,
    )]
}

/// `IORING_CQE_F_NOTIF`: the second CQE of a zero-copy send (6.1's highest opcode is
/// SENDMSG_ZC), with the request's user_data.
const IORING_CQE_F_NOTIF: u32 = 1 << 3;

/// A NOP SQE with another opcode: unknown opcodes fail at submission (-EINVAL), known ones run
/// or fail on their zero arguments; one result each, in `ops` order.
fn submit(ops: &[u8]) -> Result<Vec<i32>> {
    let mut ring = IoUring::new(8)?;
    let mut res = Vec::new();
    for (i, &op) in ops.iter().enumerate() {
        let mut e = opcode::Nop::new().build().user_data(i as u64);
        // SAFETY: `squeue::Entry` is `#[repr(C)]` around `struct io_uring_sqe`, opcode first.
        unsafe { *(&raw mut e).cast::<u8>() = op };
        // SAFETY: the SQE references no memory.
        unsafe { ring.submission().push(&e)? };
        let r = loop {
            ring.submit_and_wait(1)?;
            if let Some(cqe) = ring
                .completion()
                .find(|c| c.user_data() == i as u64 && c.flags() & IORING_CQE_F_NOTIF == 0)
            {
                break cqe.result();
            }
        };
        res.push(r);
    }
    Ok(res)
}

fn opcodes_apart(c: &Ctx) -> Result<String> {
    let btf = gds_host::btf::Btf::from_sys()?;
    let last = btf
        .enum_values("io_uring_op")
        .context("enum io_uring_op")?
        .into_iter()
        .find(|(n, _)| n == "IORING_OP_LAST")
        .context("IORING_OP_LAST")?
        .1 as u8;
    let ops = [0, last - 1, last, 200];
    for attach in [AttachMode::Btf, AttachMode::Classic] {
        for filter in [vec![], vec![last - 1, 200]] {
            let t = UringTracer::start(&TraceOptions {
                pid: Some(std::process::id()),
                opcodes: filter.clone(),
                attach,
                ..Default::default()
            })
            .with_context(|| format!("{attach:?} tracer, --opcode {filter:?}"))?;
            let res = submit(&ops)?;
            let snap = t.snapshot()?;
            for (op, s) in snap.opcodes.iter().enumerate() {
                let sent = ops.iter().position(|&o| o as usize == op);
                let want = u64::from(
                    sent.is_some() && (filter.is_empty() || filter.contains(&(op as u8))),
                );
                let errors = sent.map_or(0, |i| u64::from(want == 1 && res[i] < 0));
                ensure!(
                    (s.submitted, s.timed, s.errors) == (want, want, errors),
                    "{attach:?}, --opcode {filter:?}: opcode {op} counted {s:?}, want {want} \
                     (results {res:?})"
                );
            }
            c.detail(format!(
                "{attach:?} --opcode {filter:?}: ok, results {res:?}"
            ));
        }
    }
    Ok(format!(
        "IORING_OP_LAST {last}: opcodes {ops:?} counted apart in 4 configurations"
    ))
}
