//! The page reaches on-call: a real agent, a real Prometheus (Debian's `prometheus`) loading
//! the shipped alert rules, and a real Alertmanager (Debian's `prometheus-alertmanager`)
//! deliver `GdsRequestsStalled` for a blkio-throttled read to a webhook receiver in this test,
//! labelled with the layer and the cause, within the rule's `for` plus two evaluation
//! intervals of the stall's detection; and the resolved notification once the read ends.
//!
//! Here rather than in `cargo xtask observe`'s live check: the held request is a real
//! throttled block read of this process (tests/common's `ThrottledLoop`), and the agent
//! follows this process only, like every stall test.

mod common;

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpListener},
    path::Path,
    process::Command,
    sync::mpsc,
    time::{Duration, Instant},
};

use common::{Agent, Service, ThrottledLoop, serial};

/// The shipped rule's `for` (deploy/prometheus/alerts.yml, GdsRequestsStalled).
const FOR: Duration = Duration::from_secs(60);
/// The test's Prometheus: scrapes often, so that the bound is the evaluation's. What the bound
/// leaves over the `for` (two evaluations) has to cover one scrape, one evaluation and the
/// delivery: 5 s evaluations leave ~4 s for a loaded machine's delays, 2 s ones only ~1.4 s.
const SCRAPE: &str = "500ms";
const EVALUATION: Duration = Duration::from_secs(5);

/// A notification as Alertmanager's webhook sends it, and when it arrived.
struct Notification {
    at: Instant,
    body: serde_json::Value,
}

/// An HTTP listener taking Alertmanager's webhook POSTs: each body, parsed, on the channel.
fn webhook() -> (SocketAddr, mpsc::Receiver<Notification>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut r = BufReader::new(conn.try_clone().unwrap());
            let mut length = 0usize;
            let mut line = String::new();
            // Headers up to the blank line; the body is Content-Length bytes (Alertmanager
            // sends it so, a few KiB).
            while r.read_line(&mut line).unwrap_or(0) > 2 {
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap_or(0);
                }
                line.clear();
            }
            let mut body = vec![0u8; length.min(1 << 20)];
            if r.read_exact(&mut body).is_err() {
                continue;
            }
            let _ = conn
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            let at = Instant::now();
            if let Ok(body) = serde_json::from_slice(&body)
                && tx.send(Notification { at, body }).is_err()
            {
                break;
            }
        }
    });
    (addr, rx)
}

/// Whether `command` (of Debian's `package`) runs; `None` (with a SKIPPED line) off CI when it
/// is not installed (`cargo xtask setup` installs it; CI must have it).
fn installed(command: &str, package: &str) -> Option<()> {
    let found = Command::new(command)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "{command} is missing: apt-get install {package} (cargo xtask setup does)"
        );
        eprintln!("SKIPPED: {command} is not installed (Debian package {package})");
        return None;
    }
    Some(())
}

/// Waits (at most 30 s) for `GET /-/ready` of a Prometheus or Alertmanager to answer.
fn wait_ready(what: &mut Service, addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while common::http_get(addr, "/-/ready").is_err() {
        if let Err(e) = what.alive() {
            panic!("{e}");
        }
        assert!(Instant::now() < deadline, "not ready:\n{}", what.log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn alertmanager(dir: &Path, receiver: SocketAddr) -> (Service, SocketAddr) {
    let addr: SocketAddr = format!("127.0.0.1:{}", common::free_port())
        .parse()
        .unwrap();
    let config = dir.join("alertmanager.yml");
    // One group per alert; sent at once, and a resolution within a second of arriving.
    std::fs::write(
        &config,
        format!(
            "route:\n  receiver: oncall\n  group_by: [alertname, instance, layer, cause]\n  \
             group_wait: 100ms\n  group_interval: 1s\n  repeat_interval: 1h\n\
             receivers:\n  - name: oncall\n    webhook_configs:\n      - url: http://{receiver}/\n        \
             send_resolved: true\n"
        ),
    )
    .unwrap();
    let mut am = Service::spawn(
        "prometheus-alertmanager",
        Command::new("prometheus-alertmanager").args([
            format!("--config.file={}", config.display()),
            format!("--storage.path={}", dir.join("am").display()),
            format!("--web.listen-address={addr}"),
            // No cluster: nothing listens beyond the test's port.
            "--cluster.listen-address=".to_owned(),
            "--log.level=warn".to_owned(),
        ]),
        &dir.join("alertmanager.log"),
    )
    .unwrap();
    wait_ready(&mut am, addr);
    (am, addr)
}

fn prometheus(dir: &Path, agent: SocketAddr, alertmanager: SocketAddr) -> (Service, SocketAddr) {
    let addr: SocketAddr = format!("127.0.0.1:{}", common::free_port())
        .parse()
        .unwrap();
    let rules = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/prometheus/alerts.yml"
    );
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: {SCRAPE}\n  evaluation_interval: {}s\n\
             rule_files:\n  - {rules}\n\
             alerting:\n  alertmanagers:\n    - static_configs:\n        - targets: ['{alertmanager}']\n\
             scrape_configs:\n  - job_name: gds-agent\n    static_configs:\n      - targets: ['{agent}']\n",
            EVALUATION.as_secs()
        ),
    )
    .unwrap();
    let mut p = Service::spawn(
        "prometheus",
        Command::new("prometheus").args([
            format!("--config.file={}", config.display()),
            format!("--storage.tsdb.path={}", dir.join("tsdb").display()),
            format!("--web.listen-address={addr}"),
            "--log.level=warn".to_owned(),
        ]),
        &dir.join("prometheus.log"),
    )
    .unwrap();
    wait_ready(&mut p, addr);
    (p, addr)
}

/// Waits (at most 30 s) until Prometheus has the agent's stall series and has evaluated the
/// stall rules since: a running Prometheus, as in production, not one still starting.
fn wait_warm(prom: &mut Service, addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut scraped = false;
    loop {
        let get = |path: &str| -> serde_json::Value {
            common::http_get(addr, path)
                .ok()
                .and_then(|b| serde_json::from_str(&b).ok())
                .unwrap_or_default()
        };
        scraped = scraped
            || get("/api/v1/query?query=gds_stalled_requests")["data"]["result"]
                .as_array()
                .is_some_and(|r| !r.is_empty());
        let evaluated = scraped
            && get("/api/v1/rules?type=alert")["data"]["groups"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|g| g["name"] == "gds-io")
                .any(|g| {
                    g["lastEvaluation"]
                        .as_str()
                        .is_some_and(|t| !t.starts_with("0001"))
                });
        if evaluated {
            return;
        }
        if let Err(e) = prom.alive() {
            panic!("{e}");
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never warm:\n{}",
            prom.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The first notification whose status is `status` and that carries an alert matching
/// `labels`, waited for until `deadline`.
fn wait_notification(
    rx: &mpsc::Receiver<Notification>,
    status: &str,
    labels: &[(&str, &str)],
    deadline: Instant,
    logs: &dyn Fn() -> String,
) -> (Instant, serde_json::Value) {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let n = rx.recv_timeout(left).unwrap_or_else(|_| {
            panic!(
                "no {status} notification for {labels:?} in time\n{}",
                logs()
            )
        });
        let alert = n.body["alerts"].as_array().and_then(|a| {
            a.iter()
                .find(|a| a["status"] == status && labels.iter().all(|(k, v)| a["labels"][k] == *v))
        });
        if let Some(a) = alert {
            return (n.at, a.clone());
        }
    }
}

/// The time of day now, UTC, as `HH:MM:SS.mmm` (to set beside the alerts' timestamps).
fn utc_now() -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        % 86_400_000;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        ms / 3_600_000,
        ms / 60_000 % 60,
        ms / 1000 % 60,
        ms % 1000
    )
}

#[test]
fn throttled_reads_page_on_call_with_layer_and_cause_and_resolve() {
    let _g = serial();
    common::require_root();
    if installed("prometheus", "prometheus").is_none()
        || installed("prometheus-alertmanager", "prometheus-alertmanager").is_none()
    {
        return;
    }
    // 1 KiB/s: the 128 KiB read is held for two minutes unless the limit is lifted.
    let Some(lo) = ThrottledLoop::new(1 << 10) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::stall_watch();
    let (hook, notifications) = webhook();
    let (am, am_addr) = alertmanager(dir.path(), hook);
    let (mut prom, prom_addr) = prometheus(dir.path(), agent.addr, am_addr);
    wait_warm(&mut prom, prom_addr);
    let logs = || {
        format!(
            "prometheus:\n{}\nalertmanager:\n{}\nagent:\n{}",
            prom.log_tail(),
            am.log_tail(),
            agent.service.log_tail()
        )
    };

    let (_tid, reader) = lo.read(1 << 20, 128 << 10);
    let disk = lo.name().to_owned();
    let deadline = Instant::now() + Duration::from_secs(5);
    let detected = loop {
        let report: serde_json::Value = serde_json::from_str(&agent.get("/debug/stalls")).unwrap();
        let ours = report["active"].as_array().unwrap().iter().any(|s| {
            s["layer"] == "block" && s["disk"] == disk.as_str() && s["cause"]["kind"] == "throttled"
        });
        if ours {
            println!("stall detected at {}", utc_now());
            break Instant::now();
        }
        assert!(Instant::now() < deadline, "no throttled stall: {report}");
        std::thread::sleep(Duration::from_millis(20));
    };

    let instance = agent.addr.to_string();
    let ours = [
        ("alertname", "GdsRequestsStalled"),
        ("instance", instance.as_str()),
        ("layer", "block"),
        ("cause", "throttled"),
    ];
    let bound = FOR + 2 * EVALUATION;
    // A little past the bound, so that a late page is measured and reported, not lost.
    let (fired_at, alert) = wait_notification(
        &notifications,
        "firing",
        &ours,
        detected + bound + Duration::from_secs(15),
        &logs,
    );
    let to_page = fired_at - detected;
    let active_at = common::http_get(prom_addr, "/api/v1/alerts")
        .ok()
        .and_then(|b| serde_json::from_str::<serde_json::Value>(&b).ok())
        .and_then(|v| {
            v["data"]["alerts"].as_array()?.iter().find_map(|a| {
                (a["labels"]["cause"] == "throttled").then(|| a["activeAt"].to_string())
            })
        });
    println!(
        "stall detected → page delivered: {:.1} s (bound {bound:?}); pending since {}, firing \
         since {} (Prometheus), delivered at {}",
        to_page.as_secs_f64(),
        active_at.unwrap_or_default(),
        alert["startsAt"],
        utc_now(),
    );
    assert_eq!(alert["labels"]["severity"], "warning", "{alert}");
    assert!(
        alert["annotations"]["summary"]
            .as_str()
            .unwrap()
            .contains("(cause throttled)"),
        "{alert}"
    );
    assert!(to_page >= FOR, "paged before the rule's for: {to_page:?}");
    assert!(
        to_page <= bound,
        "paged after for + 2 evaluations: {to_page:?}\n{}",
        logs()
    );

    // The read ends when the limit is lifted; the page resolves.
    lo.set_read_bps(0);
    let (n, _) = reader.join().unwrap();
    assert_eq!(n, 128 << 10);
    let ended = Instant::now();
    let (resolved_at, _) = wait_notification(
        &notifications,
        "resolved",
        &ours,
        ended + Duration::from_secs(30),
        &logs,
    );
    let to_resolve = resolved_at - ended;
    println!(
        "read ended → resolved delivered: {:.1} s",
        to_resolve.as_secs_f64()
    );
    // The agent's next scan, a scrape, an evaluation, Alertmanager's group interval (1 s).
    assert!(
        to_resolve <= 2 * EVALUATION + Duration::from_secs(3),
        "resolved late: {to_resolve:?}\n{}",
        logs()
    );
}
