//! A stall's cause and evidence as text, section by section: what `top` draws on its evidence
//! screen and `gds-agent stalls --evidence` prints, from the model's [`Stall`] (no reading of
//! the host here: the agent read it once, when the stall was detected).

use gds_api::model::{Evidence, Stall};
use serde_json::Value;

/// One titled block of the evidence screen.
#[derive(Debug, Clone, PartialEq)]
pub struct Section {
    pub title: &'static str,
    pub lines: Vec<String>,
}

/// Which of `stalls` a stall is, as far as the snapshot tells (the kernel's key is not
/// served): its layer, thread, opcode and where it is (ring and user_data, or disk and
/// sector). Keeps a selection on its stall across refreshes and when it ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StallId {
    layer: gds_api::model::Layer,
    pid: u32,
    tid: u32,
    opcode: String,
    place: String,
}

impl StallId {
    pub fn of(s: &Stall) -> StallId {
        let q = &s.request;
        StallId {
            layer: q.layer,
            pid: q.ctx.pid,
            tid: q.ctx.tid,
            opcode: q.opcode.clone(),
            place: q.where_text(),
        }
    }
}

/// The evidence of `stall`: its own, or, for a stall that shared its capture with another of
/// the same thread and disk in one scan (the agent copies the evidence once), that other's
/// among `all`. The flag says it is shared.
pub fn evidence_of<'a>(
    stall: &'a Stall,
    mut all: impl Iterator<Item = &'a Stall>,
) -> Option<(&'a Evidence, bool)> {
    if let Some(ev) = &stall.evidence {
        return Some((ev, false));
    }
    let q = &stall.request;
    all.find(|o| {
        let r = &o.request;
        o.evidence.is_some()
            && (r.layer, r.ctx.pid, r.ctx.tid, &r.target.disk)
                == (q.layer, q.ctx.pid, q.ctx.tid, &q.target.disk)
    })
    .and_then(|o| o.evidence.as_ref())
    .map(|ev| (ev, true))
}

/// The sections for `stall` with its evidence (from [`evidence_of`]): cause, threads with their
/// kernel stacks, device, cgroups and limits, what was missing.
pub fn sections(stall: &Stall, evidence: Option<(&Evidence, bool)>) -> Vec<Section> {
    let mut out = vec![Section {
        title: "cause",
        lines: vec![format!(
            "{}: {}",
            stall.cause.kind.label(),
            if stall.cause.because.is_empty() {
                "-"
            } else {
                &stall.cause.because
            }
        )],
    }];
    let Some((ev, shared)) = evidence else {
        out.push(Section {
            title: "evidence",
            lines: vec![
                "none in the agent's report (an agent without the capture, or one of more \
                 stalls in a scan than it captures)"
                    .into(),
            ],
        });
        return out;
    };
    let mut threads = Vec::new();
    for t in &ev.threads {
        let dash = |s: &str| {
            if s.is_empty() {
                "-".to_owned()
            } else {
                s.to_owned()
            }
        };
        threads.push(format!(
            "tid {} {}  state {}  wchan {}  syscall {}",
            t.tid,
            t.comm,
            dash(&t.state),
            dash(&t.wchan),
            dash(&t.syscall)
        ));
        threads.extend(t.stack.iter().map(|f| format!("    {f}")));
        threads.extend(t.unreadable.iter().map(|u| format!("    unreadable: {u}")));
    }
    if threads.is_empty() {
        threads.push("-".into());
    }
    out.push(Section {
        title: "threads",
        lines: threads,
    });
    out.push(Section {
        title: "device",
        lines: ev
            .disk
            .as_ref()
            .map_or_else(|| vec!["-".into()], disk_lines),
    });
    let mut cgroups = Vec::new();
    if let Some(c) = &ev.cgroups {
        cgroups.extend(c.blkio.as_ref().map(|g| format!("v1 blkio {g}")));
        cgroups.extend(c.unified.as_ref().map(|g| format!("v2 {g}")));
    }
    if ev.limits.is_empty() {
        cgroups.push("no I/O limit on the disk or the disks below it".into());
    }
    cgroups.extend(ev.limits.iter().map(|l| format!("limit: {l}")));
    out.push(Section {
        title: "cgroups and limits",
        lines: cgroups,
    });
    let mut missing: Vec<String> = ev.missing.clone();
    if missing.is_empty() {
        missing.push("nothing".into());
    }
    out.push(Section {
        title: "missing",
        lines: missing,
    });
    out.push(Section {
        title: "capture",
        lines: vec![format!(
            "read in {} µs when the stall was detected{}",
            ev.capture_us,
            if shared {
                " (shared with an earlier stall of the same thread and disk)"
            } else {
                ""
            }
        )],
    });
    out
}

/// The disk's evidence: the fields this view knows by name first, then every other field of
/// [`DiskEvidence`](gds_host::evidence::DiskEvidence) (an NVMe controller's name, state and
/// counts), flattened as `name: value`: a field added to the capture shows here without a
/// change to this view.
fn disk_lines(d: &gds_host::evidence::DiskEvidence) -> Vec<String> {
    let mut out = vec![format!(
        "{} ({})  in flight {} reads {} writes  nr_requests {}  scheduler {}",
        d.disk,
        d.dev,
        d.inflight_reads,
        d.inflight_writes,
        d.nr_requests.map_or("?".into(), |n| n.to_string()),
        d.scheduler.as_deref().unwrap_or("?")
    )];
    if !d.lower.is_empty() {
        out.push(format!("lower disks {}", d.lower.join(", ")));
    }
    const SHOWN: &[&str] = &[
        "disk",
        "dev",
        "inflight_reads",
        "inflight_writes",
        "nr_requests",
        "scheduler",
        "lower",
    ];
    if let Ok(Value::Object(fields)) = serde_json::to_value(d) {
        for (k, v) in fields.iter().filter(|(k, _)| !SHOWN.contains(&k.as_str())) {
            flatten(k, v, &mut out);
        }
    }
    out
}

/// `name: value` lines of a JSON value, nested objects as `outer.inner`, arrays of plain
/// values on one line, arrays of objects one line per element.
fn flatten(name: &str, v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                flatten(&format!("{name}.{k}"), v, out);
            }
        }
        Value::Array(a) if a.iter().any(|e| e.is_object() || e.is_array()) => {
            for (i, e) in a.iter().enumerate() {
                flatten(&format!("{name}[{i}]"), e, out);
            }
        }
        Value::Array(a) => {
            let items: Vec<String> = a.iter().map(plain).collect();
            out.push(format!("{name}: {}", items.join(", ")));
        }
        v => out.push(format!("{name}: {}", plain(v))),
    }
}

fn plain(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        v => v.to_string(),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use gds_api::model::{Cause, CauseKind, Layer, Request, Stage};
    use gds_host::evidence::{CgroupVersion, DiskEvidence, IoLimit, TaskCgroups, ThreadEvidence};

    pub(crate) fn throttled_stall() -> Stall {
        Stall {
            request: Request {
                layer: Layer::Block,
                opcode: "read".into(),
                ctx: Default::default(),
                target: Default::default(),
                origin: None,
                age_seconds: 2.0,
                stage: Stage::Device,
                nvme: None,
                poll_armed: false,
                key: Default::default(),
                block_cause: None,
            },
            stage_description: "at the device".into(),
            total_seconds: None,
            cause: Cause {
                kind: CauseKind::Throttled,
                because: "cgroup /g (v1) blkio.throttle.read_bps_device 254:0 rbps=65536".into(),
            },
            evidence: Some(Evidence {
                threads: vec![ThreadEvidence {
                    pid: 10,
                    tid: 11,
                    comm: "reader".into(),
                    state: "D".into(),
                    wchan: "blk_throtl_wait".into(),
                    syscall: "17".into(),
                    stack: vec!["io_schedule+0x42/0x70".into()],
                    unreadable: vec![],
                }],
                disk: Some(DiskEvidence {
                    disk: "loop3".into(),
                    dev: "7:3".into(),
                    inflight_reads: 1,
                    inflight_writes: 0,
                    nr_requests: Some(128),
                    scheduler: Some("none".into()),
                    lower: vec!["254:0".into()],
                    ..Default::default()
                }),
                cgroups: Some(TaskCgroups {
                    blkio: Some("/g".into()),
                    unified: None,
                }),
                limits: vec![IoLimit {
                    cgroup: "/g".into(),
                    version: CgroupVersion::V1,
                    file: "blkio.throttle.read_bps_device".into(),
                    device: "254:0".into(),
                    kind: "rbps".into(),
                    value: 65536,
                }],
                missing: vec!["/proc/10/task/12: gone".into()],
                capture_us: 410,
                ..Default::default()
            }),
        }
    }

    fn text(s: &[Section]) -> String {
        s.iter()
            .map(|s| format!("[{}]\n{}\n", s.title, s.lines.join("\n")))
            .collect()
    }

    #[test]
    fn every_part_of_the_evidence_has_its_section() {
        let s = throttled_stall();
        let t = text(&sections(&s, evidence_of(&s, std::iter::empty())));
        for want in [
            "[cause]\nthrottled: cgroup /g (v1) blkio.throttle.read_bps_device 254:0 rbps=65536",
            "tid 11 reader  state D  wchan blk_throtl_wait  syscall 17",
            "    io_schedule+0x42/0x70",
            "loop3 (7:3)  in flight 1 reads 0 writes  nr_requests 128  scheduler none",
            "lower disks 254:0",
            "v1 blkio /g",
            "limit: cgroup /g (v1) blkio.throttle.read_bps_device 254:0 rbps=65536",
            "[missing]\n/proc/10/task/12: gone",
            "read in 410 µs",
        ] {
            assert!(t.contains(want), "{want:?} missing from:\n{t}");
        }
    }

    #[test]
    fn a_stall_sharing_a_capture_shows_the_others_evidence() {
        let first = throttled_stall();
        let mut second = first.clone();
        second.evidence = None;
        second.request.target.sector = Some(8);
        let all = [first.clone(), second.clone()];
        let (ev, shared) = evidence_of(&second, all.iter()).unwrap();
        assert!(shared);
        assert_eq!(Some(ev), first.evidence.as_ref());
        let t = text(&sections(&second, evidence_of(&second, all.iter())));
        assert!(t.contains("shared with an earlier stall"), "{t}");
        // Another thread's evidence is not this stall's.
        second.request.ctx.tid = 99;
        assert!(evidence_of(&second, all.iter()).is_none());
        let t = text(&sections(&second, evidence_of(&second, all.iter())));
        assert!(t.contains("[evidence]\nnone"), "{t}");
    }

    /// Fields a newer agent adds to the disk's evidence (an NVMe controller's state) are
    /// shown, not dropped.
    #[test]
    fn unknown_disk_fields_are_shown_flattened() {
        let mut out = Vec::new();
        let v: Value = serde_json::json!({
            "controller": {"name": "nvme0", "state": "resetting"},
            "errors": [1, 2],
        });
        for (k, v) in v.as_object().unwrap() {
            flatten(k, v, &mut out);
        }
        assert!(
            out.contains(&"controller.state: resetting".to_owned()),
            "{out:?}"
        );
        assert!(out.contains(&"errors: 1, 2".to_owned()), "{out:?}");
    }
}
