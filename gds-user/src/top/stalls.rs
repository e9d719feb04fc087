//! `gds-agent stalls`: the active and recent stalls of a running agent, read from
//! `/debug/snapshot` into the model's types.

use crate::http::DEFAULT_LISTEN;
use gds_api::{client, model::StallReport};

/// `gds-agent stalls`: the active and recent stalls of a running agent.
#[derive(clap::Args, Debug, Clone)]
pub struct StallsArgs {
    /// The agent to ask (host:port).
    #[arg(long, default_value = DEFAULT_LISTEN)]
    pub agent: String,
    /// Print the agent's stall report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Under each stall, the evidence its cause rests on: the threads with their kernel
    /// stacks, the disk's queue, the cgroups and limits, what could not be read.
    #[arg(long, conflicts_with = "json")]
    pub evidence: bool,
}

pub fn run(args: StallsArgs) -> anyhow::Result<()> {
    let addr = client::parse_addr(&args.agent)?;
    let snapshot = super::read_snapshot(addr)?;
    if args.json {
        println!("{}", serde_json::to_string(&snapshot.stalls)?);
        return Ok(());
    }
    print!("{}", table(&snapshot.stalls, args.evidence));
    Ok(())
}

/// The report as a table (one line per stall, active first), each stall's cause under it and,
/// with `evidence`, the evidence the cause rests on.
pub fn table(r: &StallReport, evidence: bool) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{} active stall(s) (threshold {}s), {} request(s) in flight, oldest {:.3}s",
        r.active.len(),
        r.threshold_seconds,
        r.inflight,
        r.oldest_inflight_seconds
    );
    let _ = writeln!(
        o,
        "{:<8} {:<7} {:>9} {:>8} {:<16} {:<10}  WHERE",
        "STATE", "LAYER", "SECONDS", "PID", "COMM", "OPCODE"
    );
    for (state, rows) in [("STALLED", &r.active), ("ended", &r.ended)] {
        for s in rows {
            let q = &s.request;
            let _ = writeln!(
                o,
                "{:<8} {:<7} {:>9.3} {:>8} {:<16} {:<10}  {} ({})",
                state,
                q.layer.label(),
                s.total_seconds.unwrap_or(q.age_seconds),
                q.ctx.pid,
                q.ctx.comm,
                q.opcode,
                q.where_text(),
                s.stage_description,
            );
            // The cause and the evidence behind it, under its stall.
            let _ = writeln!(
                o,
                "{:<8} cause {}: {}",
                "",
                s.cause.kind.label(),
                s.cause.because
            );
            if evidence {
                use super::evidence::{evidence_of, sections};
                let ev = evidence_of(s, r.active.iter().chain(&r.ended));
                // The cause is on the line above already.
                for section in sections(s, ev).iter().skip(1) {
                    let _ = writeln!(o, "{:<8} {}:", "", section.title);
                    for line in &section.lines {
                        let _ = writeln!(o, "{:<8}   {line}", "");
                    }
                }
            }
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_stall_says_its_cause_under_it() {
        let mut stall = crate::top::evidence::tests::throttled_stall();
        stall.evidence = None;
        stall.cause.because = "cgroup /g (v1) blkio.throttle.read_iops_device 254:0 riops=1".into();
        let report = StallReport {
            active: vec![stall],
            ..Default::default()
        };
        let t = table(&report, false);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[2].starts_with("STALLED  block"), "{t}");
        assert_eq!(
            lines[3].trim(),
            "cause throttled: cgroup /g (v1) blkio.throttle.read_iops_device 254:0 riops=1",
            "{t}"
        );
        assert_eq!(lines.len(), 4, "no evidence unless asked: {t}");
    }

    #[test]
    fn evidence_is_printed_under_its_stall_when_asked() {
        let report = StallReport {
            active: vec![crate::top::evidence::tests::throttled_stall()],
            ..Default::default()
        };
        let t = table(&report, true);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[3].trim().starts_with("cause throttled:"), "{t}");
        for want in [
            "         threads:",
            "           tid 11 reader  state D  wchan blk_throtl_wait  syscall 17",
            "               io_schedule+0x42/0x70",
            "         device:",
            "         cgroups and limits:",
            "           limit: cgroup /g (v1) blkio.throttle.read_bps_device 254:0 rbps=65536",
            "         missing:",
        ] {
            assert!(lines.contains(&want), "{want:?} missing from:\n{t}");
        }
        assert_eq!(t.matches("throttled").count(), 1, "the cause once: {t}");
    }
}
