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
}

pub fn run(args: StallsArgs) -> anyhow::Result<()> {
    let addr = client::parse_addr(&args.agent)?;
    let snapshot = super::read_snapshot(addr)?;
    if args.json {
        println!("{}", serde_json::to_string(&snapshot.stalls)?);
        return Ok(());
    }
    print!("{}", table(&snapshot.stalls));
    Ok(())
}

/// The report as a table (one line per stall, active first).
pub fn table(r: &StallReport) -> String {
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
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use gds_api::model::{Cause, CauseKind, Request, Stage, Stall};

    #[test]
    fn each_stall_says_its_cause_under_it() {
        let stall = Stall {
            request: Request {
                layer: gds_api::model::Layer::Block,
                opcode: "read".into(),
                ctx: Default::default(),
                target: Default::default(),
                origin: None,
                age_seconds: 2.0,
                stage: Stage::Device,
                nvme: None,
                poll_armed: false,
                block_cause: None,
                key: Default::default(),
            },
            stage_description: "at the device".into(),
            total_seconds: None,
            cause: Cause {
                kind: CauseKind::Throttled,
                because: "cgroup /g (v1) blkio.throttle.read_iops_device 254:0 riops=1".into(),
            },
            evidence: None,
        };
        let t = table(&StallReport {
            active: vec![stall],
            ..Default::default()
        });
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[2].starts_with("STALLED  block"), "{t}");
        assert_eq!(
            lines[3].trim(),
            "cause throttled: cgroup /g (v1) blkio.throttle.read_iops_device 254:0 riops=1",
            "{t}"
        );
    }
}
