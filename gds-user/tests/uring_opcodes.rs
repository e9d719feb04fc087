//! Every opcode gets its own statistics: the highest opcode the running kernel knows
//! (`IORING_OP_LAST - 1` from its BTF), the first it does not (`IORING_OP_LAST`) and one far
//! beyond (200) are each counted exactly under their own number, and `--opcode` selects any of
//! the 256 exactly.
//!
//! Calls the library (`UringTracer`) directly, filtered on this test's pid, and checks the
//! agent's /metrics labels them apart too. Needs root (CAP_BPF + CAP_PERFMON).

mod common;

use common::{Agent, require_root, serial};
use gds_api::raw::UringSnapshot;
use gds_common::DropReason;
use gds_trace::{AttachMode, TraceOptions, UringTracer};
use io_uring::{IoUring, opcode, squeue};

/// An SQE with all fields zero but `opcode` and `user_data`. Opcodes the kernel does not know
/// fail at submission with -EINVAL (`io_uring_req_failed`); known ones run or fail on their
/// zero arguments: either way, one request with one completion.
fn sqe(op: u8, user_data: u64) -> squeue::Entry {
    let mut e = opcode::Nop::new().build().user_data(user_data);
    // SAFETY: `squeue::Entry` is `#[repr(C)]` around `struct io_uring_sqe` (64 bytes, UAPI),
    // whose first byte is the opcode.
    unsafe { *(&raw mut e).cast::<u8>() = op };
    e
}

/// `IORING_CQE_F_NOTIF` (include/uapi/linux/io_uring.h): the second CQE of a zero-copy send,
/// with the request's user_data. The highest opcode of 6.1 is SENDMSG_ZC.
const IORING_CQE_F_NOTIF: u32 = 1 << 3;

/// Submits one SQE per opcode in `ops`, one at a time (a request refused at submission ends the
/// batch it is in), and returns each request's result, in `ops` order.
fn submit(ops: &[u8]) -> Vec<i32> {
    let mut ring = IoUring::new(8).unwrap();
    ops.iter()
        .enumerate()
        .map(|(i, &op)| {
            // SAFETY: the SQE references no memory.
            unsafe { ring.submission().push(&sqe(op, i as u64)).unwrap() };
            loop {
                ring.submit_and_wait(1).unwrap();
                if let Some(cqe) = ring
                    .completion()
                    .find(|c| c.user_data() == i as u64 && c.flags() & IORING_CQE_F_NOTIF == 0)
                {
                    return cqe.result();
                }
            }
        })
        .collect()
}

/// `enum io_uring_op` of the running kernel.
fn io_uring_ops() -> Vec<(String, i64)> {
    let btf = gds_host::btf::Btf::from_sys().expect("kernel BTF");
    btf.enum_values("io_uring_op").expect("enum io_uring_op")
}

/// `IORING_OP_LAST` of the running kernel.
fn op_last() -> u8 {
    let last = io_uring_ops()
        .into_iter()
        .find(|(n, _)| n == "IORING_OP_LAST")
        .expect("IORING_OP_LAST")
        .1;
    u8::try_from(last).expect("IORING_OP_LAST fits the SQE's u8")
}

fn tracer(attach: AttachMode, opcodes: Vec<u8>) -> UringTracer {
    require_root();
    UringTracer::start(&TraceOptions {
        pid: Some(std::process::id()),
        opcodes,
        attach,
        ..Default::default()
    })
    .expect("tracer starts")
}

/// Checks that exactly the opcodes of `want` (opcode, completion result) were counted, once each.
fn assert_only(snap: &UringSnapshot, want: &[(u8, i32)]) {
    assert_eq!(snap.opcodes.len(), 256);
    for (op, s) in snap.opcodes.iter().enumerate() {
        match want.iter().find(|(o, _)| *o as usize == op) {
            Some(&(_, res)) => {
                assert_eq!(s.submitted, 1, "opcode {op} submitted: {s:?}");
                assert_eq!(s.timed, 1, "opcode {op} timed: {s:?}");
                assert_eq!(s.buckets.iter().sum::<u64>(), 1, "opcode {op}: {s:?}");
                assert!(s.sum_ns > 0, "opcode {op}: {s:?}");
                assert_eq!(s.errors, u64::from(res < 0), "opcode {op} res {res}: {s:?}");
            }
            None => assert_eq!(
                (s.submitted, s.timed, s.errors),
                (0, 0, 0),
                "opcode {op} was not submitted: {s:?}"
            ),
        }
    }
    // Not no_start: a zero-copy send's notification CQE has no submission of its own.
    for r in [DropReason::InflightFull, DropReason::Replaced] {
        assert_eq!(snap.drops[r as usize], 0, "{:?}: {:?}", r, snap.drops);
    }
    assert_eq!(snap.inflight(), 0);
}

fn each_opcode_counted_apart(attach: AttachMode) {
    let _g = serial();
    let last = op_last();
    let t = tracer(attach, Vec::new());
    let ops = [last - 1, last, 200];
    let res = submit(&ops);
    assert_eq!(res[1], -libc::EINVAL, "IORING_OP_LAST is refused");
    assert_eq!(res[2], -libc::EINVAL, "opcode 200 is refused");
    let snap = t.snapshot().unwrap();
    let want: Vec<(u8, i32)> = ops.into_iter().zip(res).collect();
    assert_only(&snap, &want);
}

#[test]
fn each_opcode_counted_apart_btf_tracepoints() {
    each_opcode_counted_apart(AttachMode::Btf);
}

#[test]
fn each_opcode_counted_apart_classic_tracepoints() {
    each_opcode_counted_apart(AttachMode::Classic);
}

/// `--opcode 200` counts opcode 200 and nothing else (the filter once folded every opcode
/// from 63 on into one bit).
#[test]
fn opcode_filter_is_exact_above_63() {
    let _g = serial();
    let last = op_last();
    let t = tracer(AttachMode::Auto, vec![200]);
    let res = submit(&[0, last - 1, last, 200, 255]);
    assert_only(&t.snapshot().unwrap(), &[(200, res[3])]);
}

/// The agent exports each under its own label: the kernel's name for the highest opcode it
/// knows, `OP_<n>` for the others.
#[test]
fn agent_labels_each_opcode_apart() {
    let _g = serial();
    let last = op_last();
    let top_name = io_uring_ops()
        .into_iter()
        .find(|(_, v)| *v == i64::from(last - 1))
        .and_then(|(n, _)| n.strip_prefix("IORING_OP_").map(str::to_owned))
        .expect("a name for IORING_OP_LAST - 1");
    let agent = Agent::start(&["--pid", &std::process::id().to_string()]);
    let res = submit(&[last - 1, last, 200]);
    let m = agent.scrape();
    let labels = [top_name, format!("OP_{last}"), "OP_200".to_owned()];
    for (label, r) in labels.iter().zip(res) {
        let l = [("opcode", label.as_str())];
        assert_eq!(m.value("gds_uring_requests_total", &l), 1.0, "{label}");
        assert_eq!(
            m.value("gds_uring_request_errors_total", &l),
            f64::from(u8::from(r < 0)),
            "{label}: result {r}"
        );
    }
    assert_eq!(
        m.0.keys()
            .filter(|k| k.starts_with("gds_uring_requests_total"))
            .count(),
        3,
        "three opcodes: {:?}",
        m.0.keys().collect::<Vec<_>>()
    );
}

/// The benchmarks' floor programs load and attach (BTF tracepoints through the small
/// tracepoint BTF, no kernel BTF for the loader), both variants.
#[test]
fn floor_probes_attach() {
    require_root();
    let _g = serial();
    for clock in [false, true] {
        if let Err(e) = gds_trace::FloorProbe::attach(clock) {
            panic!("floor probe (clock {clock}): {e}");
        }
    }
}
