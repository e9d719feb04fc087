//! `cargo xtask observe`: the agent, a local Prometheus (Debian's `prometheus` package) scraping
//! it, and how to put the dashboard into Grafana. Also the observability checks that
//! `cargo xtask test` runs: [`check_observability`].
//!
//! The live check proves the dashboard and the alert rules against the real thing: a Prometheus
//! server scrapes a running agent while io_uring work happens, and every PromQL expression of
//! `dashboards/gds.json` and `deploy/prometheus/alerts.yml` is evaluated through its HTTP API.

use std::{
    collections::BTreeSet,
    fs,
    io::Write as _,
    net::{SocketAddr, TcpListener, UdpSocket},
    os::fd::AsRawFd,
    path::Path,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use clap::{Args, Subcommand};
use serde_json::Value;

use crate::{
    client::{self, Client, Response},
    dashboard,
    service::{Service, start_agent},
    setup,
};

pub const ALERTS_PATH: &str = "deploy/prometheus/alerts.yml";
pub const ALERT_TESTS_PATH: &str = "deploy/prometheus/alerts_test.yml";
/// Complete Prometheus configurations shipped in deploy/ (checked with `promtool check config`).
/// deploy/kubernetes/prometheus-scrape.yml is not among them: Debian builds Prometheus without
/// Kubernetes service discovery, so its promtool rejects `kubernetes_sd_configs`.
const SHIPPED_CONFIGS: &[&str] = &["deploy/prometheus/scrape.yml"];

/// Metric families the agent exports on every host today (issue 2): they must reach Prometheus,
/// and a dashboard or alert query that reads only these families, or families the agent was
/// seen exporting during the check, must return data. Queries over the other declared families
/// ([`declared`]: NVMe, stalls, data path, nvidia-fs, cuFile) only have to evaluate without
/// error. Add a family here once the agent exports it on every host, so that its absence fails
/// the check.
pub const MUST_HAVE_DATA: &[&str] = &[
    "up",
    "gds_agent_info",
    "gds_uring_requests_total",
    "gds_uring_request_duration_seconds",
    "gds_uring_request_errors_total",
    "gds_uring_inflight_requests",
    "gds_slow_requests_total",
    "gds_trace_dropped_total",
];

/// Whether `family` (as [`metric_families`] names it) is part of the interface: declared in
/// `gds-user/crates/gds-api/src/families.rs` (nvidia-fs's counters by their prefix), or Prometheus's own `up`.
/// Queries over declared families outside [`MUST_HAVE_DATA`] must evaluate without error and
/// may be empty; a family named in a query that is not declared is a typo and fails the check.
fn declared(family: &str) -> bool {
    family == "up" || crate::families::family_of(family).is_some()
}

/// Label matchers this host cannot produce data for, though the family is exported: (the
/// matcher, the one to check the query with instead, why). An empty query with the first is
/// evaluated again with the second, which must have data: the query is right, the host lacks
/// the thing.
const HOST_LACKS: &[(&str, &str, &str)] = &[(
    "memory=\"p2pdma\"",
    "memory=\"host\"",
    "no P2PDMA on this kernel",
)];

/// Template variables as Grafana substitutes them with "All" selected.
const TEMPLATE_VALUES: &[(&str, &str)] = &[
    ("$__rate_interval", "1m"),
    ("$instance", ".*"),
    ("$disk", ".*"),
    ("$opcode", ".*"),
];

/// `cargo xtask observe`'s Prometheus port when free (Debian's packaged server has 9090, the
/// agent 9477).
const PREFERRED_PROMETHEUS_PORT: u16 = 9479;

/// The job name every shipped scrape config uses; the AgentDown alert selects on it.
const JOB: &str = "gds-agent";

#[derive(Args)]
pub struct ObserveArgs {
    #[command(subcommand)]
    pub action: Option<ObserveAction>,
    /// Where the agent serves /metrics; an agent already answering there is used as it is.
    #[arg(long, default_value = "127.0.0.1:9477")]
    pub listen: SocketAddr,
    /// Where the local Prometheus listens (port 0: 9479 if free, else any free port; never
    /// Debian's default 9090).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub prometheus: SocketAddr,
    /// Also run an fio io_uring workload for this many seconds, so the panels have data.
    #[arg(long, default_value_t = 0)]
    pub workload: u64,
    /// Stop after this many seconds (default: until Ctrl-C).
    #[arg(long)]
    pub duration: Option<u64>,
}

#[derive(Subcommand)]
pub enum ObserveAction {
    /// Regenerate dashboards/gds.json from xtask/src/dashboard.rs.
    Dashboard,
    /// Run the observability checks (promtool, dashboard sanity, live queries via Prometheus).
    Check,
}

/// `cargo xtask observe [dashboard|check]`.
pub fn run(args: ObserveArgs) -> Result<()> {
    let root = setup::root();
    match args.action {
        Some(ObserveAction::Dashboard) => {
            let path = root.join(dashboard::DASHBOARD_PATH);
            fs::create_dir_all(path.parent().unwrap())?;
            fs::write(&path, dashboard::render_text())
                .with_context(|| format!("writing {}", path.display()))?;
            eprintln!("xtask observe: wrote {}", path.display());
            Ok(())
        }
        Some(ObserveAction::Check) => {
            let agent = setup::build_agent(false)?;
            check_observability(&root, &agent)
        }
        None => observe(&root, &args),
    }
}

fn observe(root: &Path, args: &ObserveArgs) -> Result<()> {
    ensure_tools(args.workload > 0)?;
    let dir = root.join("target/observe");
    fs::create_dir_all(&dir)?;

    let mut agent = None;
    if metrics_ready(args.listen) {
        eprintln!(
            "xtask observe: using the agent already serving http://{}/metrics",
            args.listen
        );
    } else {
        let binary = setup::build_agent(false)?;
        let log = dir.join("agent.log");
        agent = Some(start_agent(
            Command::new(&binary).args(["run", "--listen", &args.listen.to_string()]),
            args.listen,
            &log,
            Duration::from_secs(60),
        )?);
        eprintln!(
            "xtask observe: agent serving http://{}/metrics (log: {})",
            args.listen,
            log.display()
        );
    }

    // A stable port when it is free, so a Grafana data source keeps working across runs.
    let prometheus_addr = match args.prometheus {
        a if a.port() == 0 && TcpListener::bind((a.ip(), PREFERRED_PROMETHEUS_PORT)).is_ok() => {
            SocketAddr::new(a.ip(), PREFERRED_PROMETHEUS_PORT)
        }
        a => resolve_port(a)?,
    };
    let mut prometheus = start_prometheus(
        root,
        &dir.join("prometheus"),
        prometheus_addr,
        args.listen,
        "5s",
        true,
    )?;
    wait_until("Prometheus", Duration::from_secs(60), || {
        prometheus.alive()?;
        Ok(prometheus_client(prometheus_addr)
            .request("/-/ready")
            .is_ok_and(|r| r.code == 200)
            .then_some(()))
    })?;

    let mut fio = None;
    if args.workload > 0 {
        fio = Some(start_fio(&dir, args.workload)?);
    }

    println!(
        "\n\
Prometheus:  http://{prometheus_addr}  (scrapes the agent at {listen} every 5s, alert rules from {ALERTS_PATH})
             data: {tsdb}
Grafana:     add a Prometheus data source with URL http://{prometheus_addr}, then
             Dashboards → New → Import → Upload dashboards/gds.json and choose that data source.
             File provisioning: copy deploy/grafana/provisioning/ into Grafana's provisioning
             directory, dashboards/gds.json into /var/lib/grafana/dashboards/gds/, and set
             GDS_PROMETHEUS_URL=http://{prometheus_addr} in Grafana's environment (docs/deploy.md).
Stop:        Ctrl-C\n",
        listen = args.listen,
        tsdb = dir.join("prometheus/tsdb").display(),
    );

    let deadline = args
        .duration
        .map(|s| Instant::now() + Duration::from_secs(s));
    loop {
        thread::sleep(Duration::from_millis(500));
        prometheus.alive()?;
        alive(agent.as_mut())?;
        if let Some(f) = fio.as_mut()
            && f.child.try_wait()?.is_some()
        {
            eprintln!("xtask observe: fio workload finished");
            fio = None;
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            eprintln!("xtask observe: --duration reached, stopping");
            return Ok(());
        }
    }
}

/// The observability checks of `cargo xtask test` (issue 8), run against the agent binary
/// `agent` (e.g. `target/debug/gds-agent`). Needs root (the agent loads eBPF programs) and
/// installs `prometheus` and `fio` from Debian when missing. Idempotent: every process it
/// starts is stopped and its scratch directory under target/observe/ removed, pass or fail.
///
/// 1. `promtool check rules` and `promtool test rules` on the alert rules, `promtool check
///    config` on the shipped scrape configs;
/// 2. dashboard sanity (valid JSON, identical to its generator, unique panel ids, every panel
///    with a query and a unit, no hard-coded datasource uid);
/// 3. a real Prometheus scrapes the agent under an io_uring workload (fio plus NOPs, file reads,
///    URING_CMD socket commands, failing reads and a pipe read that stays in flight), and every
///    PromQL expression of the dashboard and the alert rules is evaluated through
///    /api/v1/query. Errors always fail, and so do metric names the project does not define;
///    empty results fail for expressions that read only [`MUST_HAVE_DATA`] families or families
///    the agent exported during the check.
pub fn check_observability(root: &Path, agent: &Path) -> Result<()> {
    ensure_tools(true)?;
    check_promtool(root)?;
    let dashboard = check_dashboard(root)?;
    check_live(root, agent, &dashboard)
}

fn step(what: &str) {
    eprintln!("xtask observe: {what}");
}

// ---------------------------------------------------------------------------------------------
// Prerequisites

fn ensure_tools(fio: bool) -> Result<()> {
    let had_prometheus = has_command("prometheus") && has_command("promtool");
    let mut packages = vec!["prometheus"];
    if fio {
        packages.push("fio");
    }
    setup::apt_install(&packages)?;
    if !had_prometheus {
        setup::stop_packaged_service("prometheus");
    }
    ensure!(
        has_command("prometheus") && has_command("promtool"),
        "prometheus/promtool still missing after installing Debian's prometheus package"
    );
    Ok(())
}

fn has_command(name: &str) -> bool {
    Command::new(name)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

// ---------------------------------------------------------------------------------------------
// 1. promtool

fn promtool(root: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(root)
        .output()
        .context("running promtool")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!(
            "promtool {} failed ({}):\n{}",
            args.join(" "),
            out.status,
            text.trim_end()
        );
    }
    Ok(text)
}

fn check_promtool(root: &Path) -> Result<()> {
    promtool(root, &["check", "rules", ALERTS_PATH])?;
    step(&format!("promtool check rules {ALERTS_PATH}: ok"));
    let tests = promtool(root, &["test", "rules", ALERT_TESTS_PATH])?;
    ensure!(
        tests.contains("SUCCESS"),
        "promtool test rules printed no SUCCESS:\n{tests}"
    );
    step(&format!("promtool test rules {ALERT_TESTS_PATH}: ok"));
    check_every_cause_pages(root)?;
    for config in SHIPPED_CONFIGS {
        promtool(root, &["check", "config", "--syntax-only", config])?;
        step(&format!("promtool check config {config}: ok"));
    }
    Ok(())
}

/// Every cause the agent can name (`CauseKind::ALL`, not a list written here) fires exactly one
/// `GdsRequestsStalled` carrying it: a cause added to the agent is never left without a page,
/// and no two rules of the family overlap (which would send two alerts, of two severities, for
/// one stall). A promtool test generated from the causes, counting the firing alerts by cause.
fn check_every_cause_pages(root: &Path) -> Result<()> {
    use gds_api::model::CauseKind;
    use std::fmt::Write as _;
    let mut series = String::new();
    let mut samples = String::new();
    for c in CauseKind::ALL {
        let c = c.label();
        let _ = writeln!(
            series,
            "      - series: 'gds_stalled_requests{{job=\"{JOB}\", instance=\"n1:9477\", layer=\"block\", cause=\"{c}\"}}'\n        values: '1x5'"
        );
        let _ = writeln!(
            samples,
            "          - labels: '{{cause=\"{c}\"}}'\n            value: 1"
        );
    }
    let test = format!(
        "rule_files:\n  - {alerts}\nevaluation_interval: 1m\ntests:\n  - interval: 1m\n    \
         input_series:\n{series}    promql_expr_test:\n      - expr: count by (cause) \
         (ALERTS{{alertname=\"GdsRequestsStalled\", alertstate=\"firing\"}})\n        \
         eval_time: 3m\n        exp_samples:\n{samples}",
        alerts = root.join(ALERTS_PATH).display(),
    );
    let dir = root.join("target/observe");
    fs::create_dir_all(&dir)?;
    let path = dir.join(format!("every-cause-pages-{}.yml", std::process::id()));
    fs::write(&path, test).with_context(|| format!("writing {}", path.display()))?;
    let out = promtool(root, &["test", "rules", &path.display().to_string()]);
    let _ = fs::remove_file(&path);
    let out =
        out.context("GdsRequestsStalled must fire exactly once for every cause the agent names")?;
    ensure!(
        out.contains("SUCCESS"),
        "promtool printed no SUCCESS:\n{out}"
    );
    step(&format!(
        "every cause ({}) fires one GdsRequestsStalled: ok",
        CauseKind::ALL.map(|c| c.label()).join(", ")
    ));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 2. dashboard sanity

fn check_dashboard(root: &Path) -> Result<Value> {
    let path = root.join(dashboard::DASHBOARD_PATH);
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let parsed: Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", path.display()))?;
    dashboard::sanity_check(&parsed)?;
    ensure!(
        text == dashboard::render_text(),
        "{} differs from its source xtask/src/dashboard.rs: edit the source and run \
         `cargo xtask observe dashboard`",
        dashboard::DASHBOARD_PATH
    );
    step(&format!(
        "dashboard {}: valid, sane, generated from xtask/src/dashboard.rs",
        dashboard::DASHBOARD_PATH
    ));
    Ok(parsed)
}

// ---------------------------------------------------------------------------------------------
// 3. live: agent + Prometheus + workload, every expression evaluated

fn check_live(root: &Path, agent_binary: &Path, dashboard_json: &Value) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    ensure!(
        unsafe { geteuid() } == 0,
        "the live observability check runs gds-agent, which loads eBPF programs: run as root"
    );
    remove_stale_scratch(&root.join("target/observe"));
    let scratch = root.join(format!("target/observe/check-{}", std::process::id()));
    let _ = fs::remove_dir_all(&scratch);
    fs::create_dir_all(&scratch)?;
    let result = check_live_in(root, agent_binary, dashboard_json, &scratch);
    // Processes are stopped by now (their guards dropped inside); the data goes too.
    let _ = fs::remove_dir_all(&scratch);
    result
}

fn check_live_in(
    root: &Path,
    agent_binary: &Path,
    dashboard_json: &Value,
    dir: &Path,
) -> Result<()> {
    let agent_addr = resolve_port("127.0.0.1:0".parse()?)?;
    let mut agent = start_agent(
        Command::new(agent_binary).args(["run", "--listen", &agent_addr.to_string()]),
        agent_addr,
        &dir.join("agent.log"),
        Duration::from_secs(60),
    )?;
    step(&format!("agent serving http://{agent_addr}/metrics"));

    let prometheus_addr = resolve_port("127.0.0.1:0".parse()?)?;
    let mut prometheus = start_prometheus(root, dir, prometheus_addr, agent_addr, "1s", false)?;
    let prom = PrometheusApi {
        client: prometheus_client(prometheus_addr),
    };
    wait_until(
        "Prometheus to scrape the agent",
        Duration::from_secs(60),
        || {
            prometheus.alive()?;
            agent.alive()?;
            let up = prom.query(&format!("up{{job=\"{JOB}\"}} == 1")).ok();
            Ok(up.filter(|data| result_len(data) > 0).map(|_| ()))
        },
    )?;
    step(&format!(
        "Prometheus http://{prometheus_addr} scrapes the agent"
    ));

    let workload_for = Duration::from_secs(8);
    let mut fio = start_fio(dir, workload_for.as_secs())?;
    let cufile = cufile_workload(root, dir)?;
    let counts = uring_workload(dir, workload_for, Duration::from_millis(2500))?;
    if let Some(mut c) = cufile {
        let status = c.wait()?;
        ensure!(status.success(), "the cuFile workload failed: {status}");
        step("cuFile workload done: PyPI libcufile loaded, read/write/driver/deregister calls");
    }
    let fio_status = fio.child.wait()?;
    ensure!(
        fio_status.success(),
        "fio failed: {fio_status}\n{}",
        fio.log_tail()
    );
    step(&format!(
        "workload done: fio (io_uring randread) and {} NOPs, {} file reads, {} URING_CMDs, \
         {} failing reads, 1 pipe read held {:?}",
        counts.nops, counts.reads, counts.uring_cmds, counts.failing_reads, counts.held_for
    ));

    // Every must-have family present in Prometheus (the slow event and the held read are
    // counted once they complete), and every alert rule evaluated at least once.
    wait_until(
        "all must-have metric families in Prometheus",
        Duration::from_secs(30),
        || {
            agent.alive()?;
            prometheus.alive()?;
            let present = prom.families()?;
            Ok(MUST_HAVE_DATA
                .iter()
                .all(|f| present.contains(*f))
                .then_some(()))
        },
    )
    .map_err(|e| {
        let present = prom.families().unwrap_or_default();
        let missing: Vec<_> = MUST_HAVE_DATA
            .iter()
            .filter(|f| !present.contains(**f))
            .collect();
        e.context(format!(
            "missing in Prometheus: {missing:?}; present: {present:?}"
        ))
    })?;
    // Let a few more scrapes land so that rates over the window see the whole workload.
    thread::sleep(Duration::from_secs(3));
    let rules = wait_until("alert rules evaluated", Duration::from_secs(30), || {
        let rules = prom.rules()?;
        Ok(rules.iter().all(|r| r.health != "unknown").then_some(rules))
    })?;

    let mut expressions = Vec::new();
    for query in dashboard::queries(dashboard_json)? {
        expressions.push(Expression {
            origin: format!("dashboard {}", query.origin),
            expr: substitute_template(&query.expr)?,
        });
    }
    let mut failures = Vec::new();
    for rule in &rules {
        if rule.health != "ok" {
            failures.push(format!(
                "rule {:?} health {} in Prometheus: {}",
                rule.name, rule.health, rule.last_error
            ));
        }
        expressions.push(Expression {
            origin: format!("alert {}", rule.name),
            expr: rule.query.clone(),
        });
        // An alert expression returns nothing while the alert does not fire; with every
        // comparison turned into its `bool` form it returns the series it judges, so the
        // "must have data" rule applies to what the alert watches.
        expressions.push(Expression {
            origin: format!("alert {} (comparisons as bool)", rule.name),
            expr: comparisons_as_bool(&rule.query),
        });
    }
    ensure!(
        !rules.is_empty(),
        "Prometheus loaded no rules from {ALERTS_PATH}"
    );

    // Families the agent exports on this host, beyond the must-have list (e.g. the probe's).
    let exported = prom.families()?;
    println!(
        "observability: families in Prometheus: {}",
        exported.iter().cloned().collect::<Vec<_>>().join(", ")
    );
    let mut with_data = 0;
    let mut quiet = 0;
    let mut empty_allowed = Vec::new();
    println!(
        "observability: evaluating {} expressions through Prometheus",
        expressions.len()
    );
    for e in &expressions {
        let families = metric_families(&e.expr);
        let unknown: Vec<&String> = families
            .iter()
            .filter(|f| !f.starts_with('<') && !declared(f))
            .collect();
        if !unknown.is_empty() {
            failures.push(format!(
                "{}: unknown metric family {unknown:?}\n      {}",
                e.origin, e.expr
            ));
            continue;
        }
        let must = !families.is_empty()
            && families
                .iter()
                .all(|f| MUST_HAVE_DATA.contains(&f.as_str()) || exported.contains(f));
        match prom.query(&e.expr) {
            Err(err) => failures.push(format!("{}: {err:#}\n      {}", e.origin, e.expr)),
            Ok(data) => {
                let n = result_len(&data);
                let is_firing_form =
                    e.origin.starts_with("alert ") && !e.origin.ends_with("as bool)");
                if n > 0 {
                    with_data += 1;
                    println!("  data  {n:>4}  {}", e.origin);
                } else if is_firing_form {
                    // Not firing: judged by its bool form below.
                    quiet += 1;
                    println!("  quiet       {}", e.origin);
                } else if let Some((lacks, instead, why)) =
                    HOST_LACKS.iter().find(|(m, _, _)| e.expr.contains(m))
                {
                    let twin = e.expr.replace(lacks, instead);
                    match prom.query(&twin).map(|d| result_len(&d)) {
                        Ok(n) if n > 0 => {
                            println!(
                                "  empty       {}  [{why}; with {instead}: {n} series]",
                                e.origin
                            );
                            empty_allowed.push(e.origin.clone());
                        }
                        other => failures.push(format!(
                            "{}: no data ({why}), and none with {instead} either ({other:?})\n      {}",
                            e.origin, twin
                        )),
                    }
                } else if must {
                    println!("  EMPTY       {}", e.origin);
                    failures.push(format!(
                        "{}: no data, though it reads only metrics the agent exports ({})\n      {}",
                        e.origin,
                        families.iter().cloned().collect::<Vec<_>>().join(", "),
                        e.expr
                    ));
                } else {
                    println!(
                        "  empty       {}  [not exported here: {}]",
                        e.origin,
                        families.iter().cloned().collect::<Vec<_>>().join(", ")
                    );
                    empty_allowed.push(e.origin.clone());
                }
            }
        }
    }
    println!(
        "observability: {} expressions ({} dashboard, {} alert rules as written and in bool form): \
         {} with data, {} alerts quiet (not firing), {} empty (metrics not exported here), {} failed",
        expressions.len(),
        expressions.len() - 2 * rules.len(),
        rules.len(),
        with_data,
        quiet,
        empty_allowed.len(),
        failures.len()
    );
    let firing = prom.firing_alerts()?;
    if !firing.is_empty() {
        println!(
            "observability: alerts firing/pending during the check: {}",
            firing.join(", ")
        );
    }

    drop(prometheus);
    drop(agent);
    if !failures.is_empty() {
        bail!("observability check failed:\n  {}", failures.join("\n  "));
    }
    Ok(())
}

/// Scratch directories of earlier checks that were killed before they could clean up.
fn remove_stale_scratch(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix("check-")) else {
            continue;
        };
        if !Path::new("/proc").join(pid).exists() {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

struct Expression {
    origin: String,
    expr: String,
}

/// Grafana's template variables replaced as with "All" selected; a variable left over fails.
pub fn substitute_template(expr: &str) -> Result<String> {
    let mut out = expr.to_owned();
    for (var, value) in TEMPLATE_VALUES {
        out = out.replace(var, value);
    }
    // `$1` in label_replace is PromQL's own; any `$name` left is a variable we don't know.
    let bytes = out.as_bytes();
    for (i, b) in bytes.iter().enumerate() {
        if *b == b'$'
            && bytes
                .get(i + 1)
                .is_some_and(|c| c.is_ascii_alphabetic() || *c == b'_' || *c == b'{')
        {
            bail!("unknown template variable at {:?} in {expr}", &out[i..]);
        }
    }
    Ok(out)
}

/// Metric families an expression reads: identifiers outside strings and label braces that start
/// with `gds_` or are `up`, histogram suffixes removed. A `__name__` matcher reads families that
/// cannot be named, so such an expression is never "must have data".
pub fn metric_families(expr: &str) -> BTreeSet<String> {
    let mut families = BTreeSet::new();
    if expr.contains("__name__") {
        families.insert("<__name__ regex>".to_owned());
    }
    let chars: Vec<char> = expr.chars().collect();
    let mut i = 0;
    let mut braces = 0usize;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            i += 1;
            while i < chars.len() && chars[i] != c {
                if chars[i] == '\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
            continue;
        }
        if c == '{' {
            braces += 1;
        } else if c == '}' {
            braces = braces.saturating_sub(1);
        }
        if braces == 0 && (c.is_ascii_alphabetic() || c == '_' || c == ':') {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
            {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let next = chars[i..].iter().find(|c| !c.is_whitespace());
            let is_metric = word.starts_with("gds_") || (word == "up" && next != Some(&'('));
            if is_metric {
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| {
                        word.strip_suffix(s)
                            .filter(|base| base.ends_with("_seconds"))
                    })
                    .unwrap_or(&word);
                families.insert(family.to_owned());
            }
            continue;
        }
        i += 1;
    }
    families
}

/// Every comparison operator outside label matchers gets the `bool` modifier, so that the
/// expression returns 0/1 for every series it compares instead of filtering them out.
pub fn comparisons_as_bool(expr: &str) -> String {
    let chars: Vec<char> = expr.chars().collect();
    let mut out = String::with_capacity(expr.len() + 16);
    let mut i = 0;
    let mut braces = 0usize;
    let mut brackets = 0usize;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            let start = i;
            i += 1;
            while i < chars.len() && chars[i] != c {
                if chars[i] == '\\' {
                    i += 1;
                }
                i += 1;
            }
            i = (i + 1).min(chars.len());
            out.extend(&chars[start..i]);
            continue;
        }
        match c {
            '{' => braces += 1,
            '}' => braces = braces.saturating_sub(1),
            '[' => brackets += 1,
            ']' => brackets = brackets.saturating_sub(1),
            _ => {}
        }
        let next = chars.get(i + 1).copied();
        let op_len = if braces > 0 || brackets > 0 {
            0
        } else {
            match (c, next) {
                ('=', Some('=')) | ('!', Some('=')) | ('>', Some('=')) | ('<', Some('=')) => 2,
                ('>', _) | ('<', _) => 1,
                _ => 0,
            }
        };
        if op_len == 0 {
            out.push(c);
            i += 1;
            continue;
        }
        out.extend(&chars[i..i + op_len]);
        i += op_len;
        let rest: String = chars[i..].iter().collect();
        let trimmed = rest.trim_start();
        let already_bool = trimmed.starts_with("bool")
            && !trimmed[4..].starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_');
        if !already_bool {
            out.push_str(" bool");
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Processes

fn alive(service: Option<&mut Service>) -> Result<()> {
    service.map_or(Ok(()), |s| Ok(s.alive()?))
}

fn wait_until<T>(
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe()? {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        thread::sleep(Duration::from_millis(250));
    }
}

/// Port 0 becomes a free port (the listener is closed again at once).
pub(crate) fn resolve_port(addr: SocketAddr) -> Result<SocketAddr> {
    if addr.port() != 0 {
        return Ok(addr);
    }
    let listener = TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
    Ok(listener.local_addr()?)
}

/// Writes a configuration that scrapes the agent and loads the shipped alert rules, and starts
/// Prometheus with its data under `dir`.
fn start_prometheus(
    root: &Path,
    dir: &Path,
    listen: SocketAddr,
    agent: SocketAddr,
    interval: &str,
    keep_data: bool,
) -> Result<Service> {
    fs::create_dir_all(dir)?;
    let config = dir.join("prometheus.yml");
    let alerts = root.join(ALERTS_PATH);
    fs::write(
        &config,
        format!(
            "# Generated by `cargo xtask observe`.\n\
             global:\n  scrape_interval: {interval}\n  evaluation_interval: {interval}\n\
             rule_files:\n  - {alerts}\n\
             scrape_configs:\n  - job_name: {JOB}\n    static_configs:\n      - targets: ['{agent}']\n",
            alerts = alerts.display(),
        ),
    )?;
    let tsdb = dir.join("tsdb");
    if !keep_data {
        let _ = fs::remove_dir_all(&tsdb);
    }
    Ok(Service::spawn(
        "prometheus",
        Command::new("prometheus").args([
            format!("--config.file={}", config.display()),
            format!("--storage.tsdb.path={}", tsdb.display()),
            format!("--web.listen-address={listen}"),
            "--storage.tsdb.retention.time=2d".to_owned(),
            "--log.level=warn".to_owned(),
        ]),
        &dir.join("prometheus.log"),
    )?)
}

/// fio's io_uring engine (O_DIRECT) as an unrelated program the agent traces.
fn start_fio(dir: &Path, seconds: u64) -> Result<Service> {
    Ok(Service::spawn(
        "fio",
        Command::new("fio").args([
            "--name=gds-observe".to_owned(),
            "--ioengine=io_uring".to_owned(),
            format!("--filename={}", dir.join("fio.dat").display()),
            "--size=16M".to_owned(),
            "--rw=randread".to_owned(),
            // O_DIRECT: the reads reach the disk, so the file layer, the block requests linked
            // to their calls and the request stages have data too.
            "--direct=1".to_owned(),
            "--bs=4k".to_owned(),
            "--iodepth=16".to_owned(),
            "--time_based".to_owned(),
            format!("--runtime={seconds}"),
            "--rate_iops=20000".to_owned(),
        ]),
        &dir.join("fio.log"),
    )?)
}

// ---------------------------------------------------------------------------------------------
// io_uring workload

struct WorkloadCounts {
    nops: u64,
    reads: u64,
    uring_cmds: u64,
    failing_reads: u64,
    held_for: Duration,
}

/// io_uring `SOCKET_URING_OP_SIOCINQ` (include/uapi/linux/io_uring.h): bytes queued on a socket.
const SOCKET_URING_OP_SIOCINQ: u32 = 0;
/// A Python process that loads the real libcufile (PyPI, `cargo xtask setup`) after the agent
/// started and calls what returns at once without a GPU: failing reads and writes, driver
/// closes, deregistrations, preads beneath. The cuFile panels and alerts then have data (not
/// the bytes by path: no read succeeds without a GPU). None where the library is not installed.
fn cufile_workload(root: &Path, dir: &Path) -> Result<Option<std::process::Child>> {
    let lib = setup::libcufile_dir().join("nvidia/cu13/lib/libcufile.so.0");
    if !lib.exists() {
        step("no libcufile under target/pypi (`cargo xtask setup`): no cuFile workload");
        return Ok(None);
    }
    let script = format!(
        "load {}\nsleep 1\ncall cuFileRead 40\ncall cuFileWrite 20\ncall cuFileDriverClose 2\n\
         call cuFileHandleDeregister 30\ncall cuFileBufDeregister 10\npread 12\nsleep 1\nexit\n",
        lib.display()
    );
    let mut child = Command::new("python3")
        .arg(root.join("gds-user/tests/fixtures/cufile_caller.py"))
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .context("starting python3 for the cuFile workload")?;
    use std::io::Write as _;
    child
        .stdin
        .take()
        .context("cuFile workload stdin")?
        .write_all(script.as_bytes())?;
    Ok(Some(child))
}

const HELD: u64 = u64::MAX;

/// Requests of every kind the issue-2 metrics count, from this process: NOPs, file reads,
/// URING_CMD socket commands, reads on a bad fd (errors, -EBADF), and one pipe read that stays
/// in flight for `hold` (in-flight gauge, then a slow request) until a write completes it.
fn uring_workload(dir: &Path, duration: Duration, hold: Duration) -> Result<WorkloadCounts> {
    use io_uring::{IoUring, opcode, types::Fd};

    const CHUNK: usize = 4096;
    const READS: usize = 8;
    let path = dir.join("uring.dat");
    fs::write(&path, vec![0x5a_u8; CHUNK * READS])?;
    let file = fs::File::open(&path)?;
    let socket = UdpSocket::bind("127.0.0.1:0")?;
    let (pipe_reader, mut pipe_writer) = std::io::pipe()?;
    let mut pipe_buf = [0u8; 8];
    let mut bufs = vec![0u8; CHUNK * READS];

    let mut ring = IoUring::new(64).context("io_uring_setup")?;
    let held = opcode::Read::new(Fd(pipe_reader.as_raw_fd()), pipe_buf.as_mut_ptr(), 8)
        .build()
        .user_data(HELD);
    // SAFETY: the pipe and its buffer outlive the request: we wait for its completion below.
    unsafe { ring.submission().push(&held) }
        .map_err(|_| anyhow::anyhow!("submission queue full"))?;
    ring.submit()?;

    let start = Instant::now();
    let mut counts = WorkloadCounts {
        nops: 0,
        reads: 0,
        uring_cmds: 0,
        failing_reads: 0,
        held_for: hold,
    };
    let mut written = false;
    let mut held_done = false;
    while start.elapsed() < duration || !held_done {
        if !written && start.elapsed() >= hold {
            pipe_writer.write_all(b"x")?;
            written = true;
        }
        ensure!(
            start.elapsed() < duration + hold + Duration::from_secs(10),
            "the held pipe read never completed"
        );
        let mut batch = Vec::new();
        for i in 0..16u64 {
            batch.push(opcode::Nop::new().build().user_data(i));
        }
        for (i, chunk) in bufs.chunks_mut(CHUNK).enumerate() {
            batch.push(
                opcode::Read::new(Fd(file.as_raw_fd()), chunk.as_mut_ptr(), CHUNK as u32)
                    .offset((i * CHUNK) as u64)
                    .build()
                    .user_data(100 + i as u64),
            );
        }
        for i in 0..4u64 {
            batch.push(
                opcode::UringCmd16::new(Fd(socket.as_raw_fd()), SOCKET_URING_OP_SIOCINQ)
                    .build()
                    .user_data(200 + i),
            );
        }
        batch.push(
            opcode::Read::new(Fd(-1), bufs.as_mut_ptr(), 1)
                .build()
                .user_data(300),
        );
        // SAFETY: every buffer and fd lives until the loop below has reaped the whole batch.
        unsafe { ring.submission().push_multiple(&batch) }
            .map_err(|_| anyhow::anyhow!("submission queue full"))?;
        let mut outstanding = batch.len();
        while outstanding > 0 {
            ring.submit_and_wait(1)?;
            for cqe in ring.completion() {
                let res = cqe.result();
                match cqe.user_data() {
                    HELD => {
                        ensure!(res == 1, "held pipe read completed with {res}");
                        held_done = true;
                        continue;
                    }
                    0..=99 => counts.nops += 1,
                    100..=199 => {
                        ensure!(res == CHUNK as i32, "file read returned {res}");
                        counts.reads += 1
                    }
                    200..=299 => {
                        ensure!(res >= 0, "URING_CMD SIOCINQ failed: {res} (kernel < 6.7?)");
                        counts.uring_cmds += 1
                    }
                    _ => {
                        ensure!(res == -9, "read on fd -1 returned {res}, not -EBADF");
                        counts.failing_reads += 1
                    }
                }
                outstanding -= 1;
            }
        }
        // ~50 batches a second: enough for every panel, little CPU beside fio and Prometheus.
        thread::sleep(Duration::from_millis(20));
    }
    Ok(counts)
}

// ---------------------------------------------------------------------------------------------
// HTTP and the Prometheus API

/// How long xtask waits for an answer from the agent or Prometheus (a scrape under load, a
/// query over the whole workload).
const HTTP_TIMEOUT: Duration = Duration::from_secs(30);

/// The agent at `addr`. Also `cargo xtask load`'s scrape.
pub(crate) fn agent_client(addr: SocketAddr) -> Client {
    Client {
        peer: client::AGENT,
        addr,
        timeout: HTTP_TIMEOUT,
    }
}

fn prometheus_client(addr: SocketAddr) -> Client {
    Client {
        peer: "Prometheus",
        addr,
        timeout: HTTP_TIMEOUT,
    }
}

fn metrics_ready(addr: SocketAddr) -> bool {
    agent_client(addr)
        .get("/metrics")
        .is_ok_and(|body| body.contains("gds_agent_info"))
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

struct PrometheusApi {
    client: Client,
}

struct Rule {
    name: String,
    query: String,
    health: String,
    last_error: String,
}

impl PrometheusApi {
    /// GET an API path; `data` on success, the API's own error otherwise.
    fn api(&self, target: &str) -> Result<Value> {
        let Response { code, body, .. } = self.client.request(target)?;
        let reply: Value = serde_json::from_str(&body)
            .with_context(|| format!("HTTP {code} from Prometheus is not JSON: {body:.200}"))?;
        if reply["status"] != "success" {
            bail!(
                "{}: {}",
                reply["errorType"].as_str().unwrap_or("error"),
                reply["error"].as_str().unwrap_or(&body)
            );
        }
        if let Some(warnings) = reply["warnings"].as_array().filter(|w| !w.is_empty()) {
            bail!("warnings: {warnings:?}");
        }
        Ok(reply["data"].clone())
    }

    fn query(&self, expr: &str) -> Result<Value> {
        self.api(&format!("/api/v1/query?query={}", percent_encode(expr)))
    }

    /// Metric families with at least one series now (histogram suffixes removed).
    fn families(&self) -> Result<BTreeSet<String>> {
        let data = self.query(r#"count by (__name__) ({__name__=~"gds_.+|up"})"#)?;
        let mut names = BTreeSet::new();
        for sample in data["result"].as_array().into_iter().flatten() {
            if let Some(name) = sample["metric"]["__name__"].as_str() {
                names.extend(metric_families(name));
            }
        }
        Ok(names)
    }

    fn rules(&self) -> Result<Vec<Rule>> {
        let data = self.api("/api/v1/rules")?;
        let mut rules = Vec::new();
        for group in data["groups"].as_array().into_iter().flatten() {
            for rule in group["rules"].as_array().into_iter().flatten() {
                rules.push(Rule {
                    name: rule["name"].as_str().unwrap_or("?").to_owned(),
                    query: rule["query"]
                        .as_str()
                        .context("rule without query")?
                        .to_owned(),
                    health: rule["health"].as_str().unwrap_or("unknown").to_owned(),
                    last_error: rule["lastError"].as_str().unwrap_or("").to_owned(),
                });
            }
        }
        Ok(rules)
    }

    fn firing_alerts(&self) -> Result<Vec<String>> {
        let data = self.api("/api/v1/alerts")?;
        Ok(data["alerts"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|a| {
                format!(
                    "{} ({})",
                    a["labels"]["alertname"].as_str().unwrap_or("?"),
                    a["state"].as_str().unwrap_or("?")
                )
            })
            .collect())
    }
}

/// Number of samples or series in a query result.
fn result_len(data: &Value) -> usize {
    match data["resultType"].as_str() {
        Some("vector" | "matrix") => data["result"].as_array().map_or(0, Vec::len),
        Some("scalar" | "string") => 1,
        _ => 0,
    }
}

unsafe extern "C" {
    fn geteuid() -> u32;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The families the check knows are the declared ones: every declared family, each
    /// must-have one among them, and no other name.
    #[test]
    fn known_families_are_the_declared_ones() {
        for f in crate::families::ALL {
            assert!(declared(f.name), "{}", f.name);
        }
        for f in MUST_HAVE_DATA {
            assert!(
                declared(f),
                "MUST_HAVE_DATA names {f}, which is not declared"
            );
        }
        assert!(declared("gds_nvidia_fs_reads_n_total"));
        assert!(!declared("gds_uring_request_total"), "a typo");
        assert!(!declared("node_cpu_seconds_total"));
    }

    #[test]
    fn comparisons_get_bool_outside_matchers_only() {
        assert_eq!(
            comparisons_as_bool(r#"up{job="gds-agent"} == 0"#),
            r#"up{job="gds-agent"} == bool 0"#
        );
        assert_eq!(
            comparisons_as_bool(r#"sum(rate(a{x!="y",z=~"a|b"}[5m])) > 0.01 and b >= 1"#),
            r#"sum(rate(a{x!="y",z=~"a|b"}[5m])) > bool 0.01 and b >= bool 1"#
        );
        assert_eq!(comparisons_as_bool("a > bool 1"), "a > bool 1");
        assert_eq!(
            comparisons_as_bool(r#"a{l=">"} < b"#),
            r#"a{l=">"} < bool b"#
        );
    }

    #[test]
    fn families_are_read_from_expressions() {
        let f = metric_families(
            r#"histogram_quantile(0.99, sum by (opcode, le) (rate(gds_uring_request_duration_seconds_bucket{instance=~".*", opcode="gds_x"}[1m]))) / on() up"#,
        );
        assert_eq!(
            f.into_iter().collect::<Vec<_>>(),
            vec![
                "gds_uring_request_duration_seconds".to_owned(),
                "up".to_owned()
            ]
        );
        assert!(metric_families(r#"{__name__=~"gds_nvidia_fs_.+"}"#).contains("<__name__ regex>"));
        assert!(metric_families("gds_uring_requests_total").contains("gds_uring_requests_total"));
    }

    #[test]
    fn template_variables_are_substituted_and_unknown_ones_refused() {
        assert_eq!(
            substitute_template(
                r#"rate(m{instance=~"$instance", opcode=~"$opcode"}[$__rate_interval])"#
            )
            .unwrap(),
            r#"rate(m{instance=~".*", opcode=~".*"}[1m])"#
        );
        assert!(substitute_template(r#"label_replace(m, "a", "$1", "b", "(.*)")"#).is_ok());
        assert!(substitute_template("rate(m[$__interval])").is_err());
    }
}
