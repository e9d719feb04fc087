//! The Grafana dashboard (`dashboards/gds.json`), generated from this file so that every panel
//! uses the same datasource, filters, units and layout. `cargo xtask observe dashboard` rewrites
//! the JSON; `check` fails when the committed file and this source disagree.
//!
//! Metric names are the agent's interface (issues 2, 4, 5, 6 and 7). Panels for metrics that a
//! host does not export (NVMe on a host without NVMe, nvidia-fs without the driver) stay empty.

use std::collections::HashSet;

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};

/// Where the generated dashboard lives, relative to the repository root.
pub const DASHBOARD_PATH: &str = "dashboards/gds.json";

/// Every Prometheus reference goes through the `datasource` template variable: a dashboard with a
/// real uid only works in the Grafana it was exported from.
const DS: &str = "${datasource}";

// Label filters, so that every query honours the template variables the same way.
const I: &str = r#"instance=~"$instance""#;
const IO: &str = r#"instance=~"$instance", opcode=~"$opcode""#;
const ID: &str = r#"instance=~"$instance", disk=~"$disk""#;
const IDO: &str = r#"instance=~"$instance", disk=~"$disk", opcode=~"$opcode""#;
const RI: &str = "$__rate_interval";

/// Quantiles shown for every latency histogram.
const QUANTILES: [(&str, &str); 3] = [("0.5", "p50"), ("0.99", "p99"), ("0.999", "p99.9")];

/// The stages of issue 5, in the order a request passes them.
const STAGES: [&str; 3] = ["queue", "device", "completion"];

/// One query of a panel.
struct Query {
    expr: String,
    legend: String,
}

fn q(expr: impl Into<String>, legend: &str) -> Query {
    Query {
        expr: expr.into(),
        legend: legend.to_owned(),
    }
}

/// `histogram_quantile` for each of [`QUANTILES`], grouped by `by`.
fn quantiles(histogram: &str, filter: &str, by: &str) -> Vec<Query> {
    let legend_base: String = by
        .split(',')
        .map(|label| format!("{{{{{}}}}}", label.trim()))
        .collect::<Vec<_>>()
        .join(" ");
    QUANTILES
        .iter()
        .map(|(quantile, name)| {
            q(
                format!(
                    "histogram_quantile({quantile}, sum by ({by}, le) (rate({histogram}_bucket{{{filter}}}[{RI}])))"
                ),
                &format!("{legend_base} {name}"),
            )
        })
        .collect()
}

fn datasource() -> Value {
    json!({ "type": "prometheus", "uid": DS })
}

fn targets(queries: Vec<Query>, format: &str, instant: bool) -> Value {
    let targets: Vec<Value> = queries
        .into_iter()
        .enumerate()
        .map(|(i, query)| {
            json!({
                "datasource": datasource(),
                "editorMode": "code",
                "expr": query.expr,
                "format": format,
                "instant": instant,
                "range": !instant,
                "legendFormat": query.legend,
                "refId": ((b'A' + i as u8) as char).to_string(),
            })
        })
        .collect();
    Value::Array(targets)
}

fn timeseries(title: &str, description: &str, unit: &str, queries: Vec<Query>) -> Value {
    json!({
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": datasource(),
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "min": 0,
                "color": { "mode": "palette-classic" },
                "custom": {
                    "drawStyle": "line",
                    "lineWidth": 1,
                    "fillOpacity": 10,
                    "showPoints": "never",
                    "spanNulls": false,
                    "stacking": { "mode": "none", "group": "A" }
                }
            },
            "overrides": []
        },
        "options": {
            "legend": {
                "displayMode": "table",
                "placement": "bottom",
                "showLegend": true,
                "calcs": ["mean", "max", "lastNotNull"]
            },
            "tooltip": { "mode": "multi", "sort": "desc" }
        },
        "targets": targets(queries, "time_series", false),
    })
}

fn stacked(mut panel: Value) -> Value {
    panel["fieldConfig"]["defaults"]["custom"]["stacking"]["mode"] = json!("normal");
    panel["fieldConfig"]["defaults"]["custom"]["fillOpacity"] = json!(40);
    panel
}

fn stat(title: &str, description: &str, unit: &str, red_above: Option<f64>, query: Query) -> Value {
    stat_of(title, description, unit, red_above, vec![query])
}

fn stat_of(
    title: &str,
    description: &str,
    unit: &str,
    red_above: Option<f64>,
    queries: Vec<Query>,
) -> Value {
    let mut steps = vec![json!({ "color": "green", "value": null })];
    if let Some(limit) = red_above {
        steps.push(json!({ "color": "red", "value": limit }));
    }
    json!({
        "type": "stat",
        "title": title,
        "description": description,
        "datasource": datasource(),
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "color": { "mode": "thresholds" },
                "thresholds": { "mode": "absolute", "steps": steps }
            },
            "overrides": []
        },
        "options": {
            "reduceOptions": { "calcs": ["lastNotNull"], "fields": "", "values": false },
            "colorMode": "value",
            "graphMode": "area",
            "justifyMode": "auto",
            "orientation": "auto",
            "textMode": "auto"
        },
        "targets": targets(queries, "time_series", false),
    })
}

/// A latency heatmap over Prometheus histogram buckets (no client-side bucketing).
fn heatmap(title: &str, description: &str, histogram: &str, filter: &str) -> Value {
    json!({
        "type": "heatmap",
        "title": title,
        "description": description,
        "datasource": datasource(),
        "fieldConfig": {
            "defaults": {
                "unit": "s",
                "custom": {
                    "scaleDistribution": { "type": "linear" },
                    "hideFrom": { "legend": false, "tooltip": false, "viz": false }
                }
            },
            "overrides": []
        },
        "options": {
            "calculate": false,
            "cellGap": 1,
            "color": {
                "mode": "scheme",
                "scheme": "Spectral",
                "exponent": 0.5,
                "fill": "dark-orange",
                "reverse": false,
                "scale": "exponential",
                "steps": 64
            },
            "filterValues": { "le": 1e-9 },
            "rowsFrame": { "layout": "ge" },
            "yAxis": { "axisPlacement": "left", "unit": "s", "reverse": false },
            "cellValues": { "unit": "reqps" },
            "tooltip": { "mode": "single", "yHistogram": true, "showColorScale": false },
            "legend": { "show": true },
            "exemplars": { "color": "rgba(255,0,255,0.7)" }
        },
        "targets": targets(
            vec![q(format!("sum by (le) (rate({histogram}_bucket{{{filter}}}[{RI}]))"), "{{le}}")],
            "heatmap",
            false
        ),
    })
}

/// A table of the current series of `expr`, one row each, with `columns` in that order (a
/// label name, `__name__` or `Value`); Time, job and unlisted labels are hidden.
fn label_table(title: &str, description: &str, expr: String, columns: &[&str]) -> Value {
    let mut excluded = serde_json::Map::new();
    for column in ["Time", "__name__", "job", "Value"] {
        if !columns.contains(&column) {
            excluded.insert(column.to_owned(), json!(true));
        }
    }
    let order: serde_json::Map<String, Value> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| ((*c).to_owned(), json!(i)))
        .collect();
    json!({
        "type": "table",
        "title": title,
        "description": description,
        "datasource": datasource(),
        "fieldConfig": {
            "defaults": { "unit": "none", "custom": { "align": "auto", "filterable": true } },
            "overrides": []
        },
        "options": { "showHeader": true, "cellHeight": "sm" },
        "transformations": [
            { "id": "organize", "options": { "excludeByName": excluded, "indexByName": order } }
        ],
        "targets": targets(vec![q(expr, "")], "table", true),
    })
}

/// Places panels left to right on Grafana's 24-column grid and numbers them.
struct Layout {
    panels: Vec<Value>,
    next_id: u64,
    x: u64,
    y: u64,
    line_height: u64,
}

impl Layout {
    fn new() -> Self {
        Layout {
            panels: Vec::new(),
            next_id: 1,
            x: 0,
            y: 0,
            line_height: 0,
        }
    }

    fn id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    fn newline(&mut self) {
        self.y += self.line_height;
        self.x = 0;
        self.line_height = 0;
    }

    fn row(&mut self, title: &str) {
        self.newline();
        let id = self.id();
        self.panels.push(json!({
            "type": "row",
            "title": title,
            "id": id,
            "collapsed": false,
            "gridPos": { "h": 1, "w": 24, "x": 0, "y": self.y },
            "panels": []
        }));
        self.y += 1;
    }

    fn add(&mut self, w: u64, h: u64, mut panel: Value) {
        if self.x + w > 24 {
            self.newline();
        }
        panel["id"] = json!(self.id());
        panel["gridPos"] = json!({ "h": h, "w": w, "x": self.x, "y": self.y });
        self.panels.push(panel);
        self.x += w;
        self.line_height = self.line_height.max(h);
    }
}

fn variable(name: &str, label: &str, query: &str) -> Value {
    json!({
        "type": "query",
        "name": name,
        "label": label,
        "datasource": datasource(),
        "definition": query,
        "query": { "query": query, "refId": format!("{name}-values") },
        "refresh": 2,
        "includeAll": true,
        "allValue": ".*",
        "multi": true,
        "current": { "selected": true, "text": ["All"], "value": ["$__all"] },
        "options": [],
        "regex": "",
        "sort": 1,
        "hide": 0,
        "skipUrlSync": false
    })
}

fn templating() -> Value {
    json!({ "list": [
        {
            "type": "datasource",
            "name": "datasource",
            "label": "Data source",
            "query": "prometheus",
            "current": {},
            "options": [],
            "refresh": 1,
            "regex": "",
            "hide": 0,
            "includeAll": false,
            "multi": false,
            "skipUrlSync": false
        },
        variable("instance", "Instance", "label_values(gds_agent_info, instance)"),
        variable(
            "disk",
            "Disk",
            r#"label_values({__name__=~"gds_nvme_commands_total|gds_block_request_duration_seconds_count", instance=~"$instance"}, disk)"#,
        ),
        variable(
            "opcode",
            "io_uring opcode",
            r#"label_values(gds_uring_requests_total{instance=~"$instance"}, opcode)"#,
        ),
    ]})
}

/// The dashboard, as Grafana (schema 39, Grafana 10.x/11.x) imports and provisions it.
pub fn render() -> Value {
    let mut l = Layout::new();

    l.row("Overview");
    l.add(
        4,
        4,
        stat(
            "Agents reporting",
            "gds-agent instances exporting gds_agent_info (one per node).",
            "none",
            None,
            q(format!("count(gds_agent_info{{{I}}})"), ""),
        ),
    );
    l.add(
        4,
        4,
        stat(
            "io_uring IOPS",
            "Completed io_uring requests per second, all selected instances and opcodes.",
            "iops",
            None,
            q(
                format!("sum(rate(gds_uring_requests_total{{{IO}}}[{RI}]))"),
                "",
            ),
        ),
    );
    l.add(4, 4, stat(
        "io_uring error ratio",
        "Share of io_uring completions with a negative result. Some opcodes fail by design \
         (TIMEOUT completes with -ETIME): filter by opcode before judging.",
        "percentunit",
        Some(0.01),
        q(
            format!(
                "sum(rate(gds_uring_request_errors_total{{{IO}}}[{RI}])) / sum(rate(gds_uring_requests_total{{{IO}}}[{RI}]))"
            ),
            "",
        ),
    ));
    l.add(4, 4, stat(
        "io_uring p99 latency",
        "99th percentile of submit-to-complete latency, all selected opcodes.",
        "s",
        Some(0.05),
        q(
            format!(
                "histogram_quantile(0.99, sum by (le) (rate(gds_uring_request_duration_seconds_bucket{{{IO}}}[{RI}])))"
            ),
            "",
        ),
    ));
    l.add(
        4,
        4,
        stat(
            "In flight",
            "io_uring requests submitted and not yet completed.",
            "none",
            None,
            q(format!("sum(gds_uring_inflight_requests{{{I}}})"), ""),
        ),
    );
    l.add(
        4,
        4,
        stat(
            "Stalled now",
            "Requests in flight longer than the agent's --stall-threshold, all layers.",
            "none",
            Some(1.0),
            q(format!("sum(gds_stalled_requests{{{I}}})"), ""),
        ),
    );
    l.add(
        12,
        8,
        timeseries(
            "io_uring IOPS by opcode",
            "Completed io_uring requests per second.",
            "iops",
            vec![q(
                format!("sum by (opcode) (rate(gds_uring_requests_total{{{IO}}}[{RI}]))"),
                "{{opcode}}",
            )],
        ),
    );
    l.add(12, 8, stacked(timeseries(
        "Throughput by data path",
        "Bytes per second moved by gds-agent read/bench, by route (gds, p2p, bounce) and destination.",
        "Bps",
        vec![q(
            format!("sum by (path, dest) (rate(gds_pipeline_bytes_total{{{I}}}[{RI}]))"),
            "{{path}} → {{dest}}",
        )],
    )));
    l.add(12, 8, timeseries(
        "io_uring error ratio by opcode",
        "Share of completions with res < 0, per opcode.",
        "percentunit",
        vec![q(
            format!(
                "sum by (opcode) (rate(gds_uring_request_errors_total{{{IO}}}[{RI}])) / sum by (opcode) (rate(gds_uring_requests_total{{{IO}}}[{RI}]))"
            ),
            "{{opcode}}",
        )],
    ));
    l.add(12, 8, timeseries(
        "Errors per second",
        "io_uring completions with res < 0 by opcode, and NVMe completions with a non-zero status by disk.",
        "ops",
        vec![
            q(
                format!("sum by (opcode) (rate(gds_uring_request_errors_total{{{IO}}}[{RI}]))"),
                "io_uring {{opcode}}",
            ),
            q(
                format!("sum by (disk, status) (rate(gds_nvme_errors_total{{{ID}}}[{RI}]))"),
                "nvme {{disk}} {{status}}",
            ),
        ],
    ));

    l.row("io_uring latency");
    l.add(
        12,
        9,
        heatmap(
            "io_uring request latency",
            "Submit-to-complete latency of the selected opcodes (log2 buckets from the kernel).",
            "gds_uring_request_duration_seconds",
            IO,
        ),
    );
    l.add(12, 9, timeseries(
        "io_uring latency p50 / p99 / p99.9 by opcode",
        "Quantiles estimated from the histogram buckets (powers of two: an estimate within a factor of 2).",
        "s",
        quantiles("gds_uring_request_duration_seconds", IO, "opcode"),
    ));
    l.add(12, 8, timeseries(
        "io_uring mean latency by opcode",
        "Sum of latencies over number of requests.",
        "s",
        vec![q(
            format!(
                "sum by (opcode) (rate(gds_uring_request_duration_seconds_sum{{{IO}}}[{RI}])) / sum by (opcode) (rate(gds_uring_request_duration_seconds_count{{{IO}}}[{RI}]))"
            ),
            "{{opcode}}",
        )],
    ));
    l.add(12, 8, timeseries(
        "Slow requests per second by opcode",
        "Requests slower than the agent's slow threshold; each is logged with pid, comm, ring and user_data.",
        "ops",
        vec![q(
            format!("sum by (opcode) (rate(gds_slow_requests_total{{{IO}}}[{RI}]))"),
            "{{opcode}}",
        )],
    ));

    l.row("Request stages: queue → device → completion");
    for stage in STAGES {
        l.add(
            8,
            8,
            heatmap(
                &format!("Stage latency: {stage}"),
                match stage {
                    "queue" => "io_uring submit → NVMe command setup (kernel submission path).",
                    "device" => "NVMe setup → NVMe completion (the device).",
                    _ => "NVMe completion → io_uring completion (completion delivery).",
                },
                "gds_request_stage_duration_seconds",
                &format!(r#"{ID}, stage="{stage}""#),
            ),
        );
    }
    l.add(
        12,
        8,
        timeseries(
            "Stage latency p50 / p99 / p99.9",
            "Where requests spend their time: kernel (queue), device, or completion delivery.",
            "s",
            quantiles("gds_request_stage_duration_seconds", ID, "stage"),
        ),
    );
    l.add(12, 8, stacked(timeseries(
        "Mean time per stage (stacked)",
        "The stacked total is the mean end-to-end latency of traced NVMe requests.",
        "s",
        vec![q(
            format!(
                "sum by (stage) (rate(gds_request_stage_duration_seconds_sum{{{ID}}}[{RI}])) / sum by (stage) (rate(gds_request_stage_duration_seconds_count{{{ID}}}[{RI}]))"
            ),
            "{{stage}}",
        )],
    )));

    l.row("NVMe per disk");
    l.add(
        12,
        8,
        timeseries(
            "NVMe commands per second",
            "NVMe commands completed, by disk and opcode (passthrough and block layer).",
            "iops",
            vec![q(
                format!("sum by (disk, opcode) (rate(gds_nvme_commands_total{{{IDO}}}[{RI}]))"),
                "{{disk}} {{opcode}}",
            )],
        ),
    );
    l.add(
        12,
        8,
        timeseries(
            "NVMe command latency p50 / p99 / p99.9 by disk",
            "NVMe setup → completion, per disk.",
            "s",
            quantiles("gds_nvme_command_duration_seconds", IDO, "disk"),
        ),
    );
    l.add(
        8,
        8,
        heatmap(
            "NVMe command latency",
            "NVMe setup → completion of the selected disks and opcodes.",
            "gds_nvme_command_duration_seconds",
            IDO,
        ),
    );
    l.add(
        8,
        8,
        timeseries(
            "NVMe errors per second by status",
            "NVMe completions with a non-zero status, by status name.",
            "ops",
            vec![q(
                format!("sum by (disk, status) (rate(gds_nvme_errors_total{{{ID}}}[{RI}]))"),
                "{{disk}} {{status}}",
            )],
        ),
    );
    l.add(8, 8, timeseries(
        "Block-layer latency p99 by disk and op",
        "block_rq_issue → block_rq_complete for I/O that goes through the block layer.",
        "s",
        vec![q(
            format!(
                "histogram_quantile(0.99, sum by (disk, op, le) (rate(gds_block_request_duration_seconds_bucket{{{ID}}}[{RI}])))"
            ),
            "{{disk}} {{op}} p99",
        )],
    ));

    l.row("In flight and stalls");
    l.add(
        6,
        8,
        timeseries(
            "io_uring requests in flight",
            "Submitted and not yet completed, per instance.",
            "none",
            vec![q(
                format!("sum by (instance) (gds_uring_inflight_requests{{{I}}})"),
                "{{instance}}",
            )],
        ),
    );
    l.add(
        6,
        8,
        timeseries(
            "Stalled requests by layer and cause",
            "Requests in flight longer than --stall-threshold, now, by the cause named when each \
             stalled (gds-agent stalls --evidence, or Enter on it in top, shows the evidence).",
            "none",
            vec![q(
                format!("sum by (layer, cause) (gds_stalled_requests{{{I}}})"),
                "{{layer}} {{cause}}",
            )],
        ),
    );
    l.add(
        6,
        8,
        timeseries(
            "Oldest in-flight request by layer",
            "Age of the oldest request still in flight.",
            "s",
            vec![q(
                format!("max by (layer) (gds_oldest_inflight_seconds{{{I}}})"),
                "{{layer}}",
            )],
        ),
    );
    l.add(6, 8, timeseries(
        "Stalls started per second",
        "New stalls by layer and disk (disk is empty for io_uring-only stalls).",
        "ops",
        vec![q(
            format!(
                r#"sum by (layer, disk) (rate(gds_stalls_total{{instance=~"$instance", disk=~"$disk|"}}[{RI}]))"#
            ),
            "{{layer}} {{disk}}",
        )],
    ));

    l.row("Tracing health");
    l.add(8, 8, timeseries(
        "Trace drops per second by reason",
        "Events the kernel side could not record (in-flight map full, completion without a start, \
         ring buffer full). Non-zero means the numbers above undercount.",
        "ops",
        vec![q(
            format!("sum by (instance, reason) (rate(gds_trace_dropped_total{{{I}}}[{RI}]))"),
            "{{instance}} {{reason}}",
        )],
    ));
    l.add(
        8,
        8,
        timeseries(
            "Requests traced per second by instance",
            "Traced io_uring completions per agent; compare with the drops beside it.",
            "ops",
            vec![q(
                format!("sum by (instance) (rate(gds_uring_requests_total{{{I}}}[{RI}]))"),
                "{{instance}}",
            )],
        ),
    );
    l.add(8, 8, timeseries(
        "Stall scan duration",
        "Time the agent's last scan of the in-flight maps took (the stall detector's own cost).",
        "s",
        vec![q(format!("max by (instance) (gds_stall_scan_duration_seconds{{{I}}})"), "{{instance}}")],
    ));

    l.row("cuFile: every process's calls and the path they really took");
    l.add(4, 8, stat(
        "Compat share of cuFile bytes",
        "Share of the bytes cuFileRead/cuFileWrite moved through cuFile's compat path (POSIX I/O \
         by cuFile's threads, then a copy), seen beneath the calls. 1 = every byte fell back. \
         /debug/cufile on the agent names the process, the file and the reason.",
        "percentunit",
        Some(0.5),
        q(
            format!(
                "sum(rate(gds_cufile_bytes_total{{{I},path=\"compat\"}}[{RI}])) / \
                 sum(rate(gds_cufile_bytes_total{{{I}}}[{RI}]))"
            ),
            "compat",
        ),
    ));
    l.add(
        4,
        8,
        stat(
            "libcufile copies traced",
            "libcufile files (by inode: system CUDA, Python wheels, containers) mapped by some \
         process and traced now.",
            "short",
            None,
            q(format!("sum(gds_cufile_libraries{{{I}}})"), "copies"),
        ),
    );
    l.add(
        8,
        8,
        stacked(timeseries(
            "cuFile bytes by path",
            "Bytes cuFileRead/cuFileWrite returned, by the path the I/O beneath them took: \
             nvfs (nvidia-fs, GDS proper), compat (fallback), p2pdma, unknown (nothing seen beneath).",
            "Bps",
            vec![q(
                format!("sum by (op, path) (rate(gds_cufile_bytes_total{{{I}}}[{RI}]))"),
                "{{op}} {{path}}",
            )],
        )),
    );
    l.add(
        8,
        8,
        timeseries(
            "cuFile calls per second",
            "cuFile API calls that returned, by operation. handle_register or buf_register \
             near the read rate means the application registers per I/O (churn).",
            "ops",
            vec![q(
                format!("sum by (op) (rate(gds_cufile_calls_total{{{I}}}[{RI}]))"),
                "{{op}}",
            )],
        ),
    );
    l.add(
        8,
        8,
        timeseries(
            "cuFile call latency p50 / p99 / p99.9",
            "Duration of cuFile calls, entry to return, by operation.",
            "s",
            quantiles("gds_cufile_call_duration_seconds", I, "op"),
        ),
    );
    l.add(
        8,
        8,
        timeseries(
            "cuFile errors",
            "Failed cuFile calls by operation and CUfileOpError name (errno: a read or write \
             returned -1).",
            "ops",
            vec![q(
                format!("sum by (op, error) (rate(gds_cufile_errors_total{{{I}}}[{RI}]))"),
                "{{op}} {{error}}",
            )],
        ),
    );
    l.add(
        8,
        8,
        timeseries(
            "Block requests into peer memory (P2PDMA)",
            "Block requests whose data pages are PCI peer memory (GPU BAR1, p2pmem), by disk and \
             op: the I/O under cuFile's p2pdma path, and any other P2PDMA reader. Empty on kernels \
             without CONFIG_PCI_P2PDMA. /debug/cufile lists the processes (peer_io).",
            "ops",
            vec![q(
                format!(
                    "sum by (disk, op) (rate(gds_block_request_duration_seconds_count{{{I},memory=\"p2pdma\"}}[{RI}]))"
                ),
                "{{disk}} {{op}}",
            )],
        ),
    );

    l.row("File calls: read, write and fsync, by the hooks the host allows");
    l.add(
        8,
        8,
        timeseries(
            "File calls per second",
            "File read/write/fsync calls that ended, by operation and O_DIRECT. Which calls \
             are seen depends on the file layer's hooks (/debug/layers: tracepoint = O_DIRECT \
             of ext4/xfs/btrfs and ext4 fsync; syscalls = every read/write system call).",
            "ops",
            vec![q(
                format!("sum by (op, direct) (rate(gds_file_requests_total{{{I}}}[{RI}]))"),
                "{{op}} direct={{direct}}",
            )],
        ),
    );
    l.add(
        8,
        8,
        stacked(timeseries(
            "File bytes per second",
            "Bytes file calls returned as done, by operation and O_DIRECT.",
            "Bps",
            vec![q(
                format!("sum by (op, direct) (rate(gds_file_bytes_total{{{I}}}[{RI}]))"),
                "{{op}} direct={{direct}}",
            )],
        )),
    );
    l.add(
        8,
        8,
        timeseries(
            "File call latency p50 / p99 / p99.9",
            "Duration of file calls, start to return, by operation and O_DIRECT: what the \
             application waited. /debug/snapshot's file rows name the process and file.",
            "s",
            quantiles("gds_file_request_duration_seconds", I, "op, direct"),
        ),
    );
    l.add(
        8,
        8,
        timeseries(
            "File call errors",
            "File calls that returned an error, by operation.",
            "ops",
            vec![q(
                format!("sum by (op) (rate(gds_file_errors_total{{{I}}}[{RI}]))"),
                "{{op}}",
            )],
        ),
    );
    l.add(
        8,
        8,
        timeseries(
            "Device commands per file call",
            "Block requests (one NVMe command each) per file call, by operation and O_DIRECT: \
             above 1, the block layer split the calls (transfer limits, fragmented files); \
             only requests linked to their call count (O_DIRECT).",
            "none",
            vec![q(
                format!(
                    "sum by (op, direct) (rate(gds_file_device_requests_total{{{I}}}[{RI}])) / \
                     sum by (op, direct) (rate(gds_file_requests_total{{{I}}}[{RI}]))"
                ),
                "{{op}} direct={{direct}}",
            )],
        ),
    );
    l.add(
        8,
        8,
        timeseries(
            "Bytes the device moved per byte returned",
            "Bytes of the file calls' linked block requests over the bytes the calls returned, \
             by operation and O_DIRECT: 1 when the device moved what was returned; above, \
             it moved more (a short read). Buffered calls' requests are the page cache's, not \
             linked to a call: 0.",
            "none",
            vec![q(
                format!(
                    "sum by (op, direct) (rate(gds_file_device_bytes_total{{{I}}}[{RI}])) / \
                     sum by (op, direct) (rate(gds_file_bytes_total{{{I}}}[{RI}]))"
                ),
                "{{op}} direct={{direct}}",
            )],
        ),
    );

    l.row("Data path");
    l.add(
        8,
        8,
        stacked(timeseries(
            "Throughput by route and destination",
            "gds (cuFile), p2p (passthrough into BAR1 / p2pmem), bounce (pinned host memory).",
            "Bps",
            vec![q(
                format!("sum by (path, dest) (rate(gds_pipeline_bytes_total{{{I}}}[{RI}]))"),
                "{{path}} → {{dest}}",
            )],
        )),
    );
    l.add(
        8,
        8,
        timeseries(
            "Read latency p50 / p99 / p99.9 by route",
            "Duration of one pipeline read (chunk), by route.",
            "s",
            quantiles("gds_pipeline_read_duration_seconds", I, "path"),
        ),
    );
    l.add(
        8,
        8,
        timeseries(
            "Reads per second by route",
            "Pipeline reads completed, by route.",
            "ops",
            vec![q(
                format!(
                    "sum by (path) (rate(gds_pipeline_read_duration_seconds_count{{{I}}}[{RI}]))"
                ),
                "{{path}}",
            )],
        ),
    );

    l.row("Host capability and nvidia-fs");
    l.add(
        8,
        8,
        label_table(
            "Agents",
            "Agent version and kernel per instance.",
            format!("gds_agent_info{{{I}}}"),
            &["instance", "version", "kernel"],
        ),
    );
    l.add(16, 8, label_table(
        "Capability verdict",
        "What `gds-agent probe` concluded on each host, per GPU: the data path reads take \
         (gds, p2p, bounce) and what it depends on. `gds-agent probe` on the host gives the reasons.",
        format!("gds_capability_info{{{I}}}"),
        &["instance", "gpu", "pci", "path", "gds_mode", "nvidia_fs", "cufile", "p2pdma", "kernel"],
    ));
    l.add(4, 8, stat_of(
        "Hosts with nvidia-fs",
        "Instances whose /proc/driver/nvidia-fs/stats was read on the last scrape, of all instances probed.",
        "none",
        None,
        vec![
            q(format!("sum(gds_nvidia_fs_up{{{I}}})"), "nvidia-fs"),
            q(format!("count(gds_nvidia_fs_up{{{I}}})"), "probed"),
        ],
    ));
    l.add(
        10,
        8,
        timeseries(
            "nvidia-fs operations per second",
            "Reads and writes through nvidia-fs (GDS) and their errors.",
            "ops",
            [
                "reads_n",
                "reads_err",
                "writes_n",
                "writes_err",
                "batches_n",
                "bar1_map_err",
            ]
            .iter()
            .map(|c| {
                q(
                    format!("sum by (instance) (rate(gds_nvidia_fs_{c}_total{{{I}}}[{RI}]))"),
                    &format!("{{{{instance}}}} {c}"),
                )
            })
            .collect(),
        ),
    );
    l.add(10, 8, stacked(timeseries(
        "nvidia-fs throughput",
        "Bytes read and written through nvidia-fs (its MiB counters).",
        "Bps",
        vec![
            q(
                format!("sum by (instance) (rate(gds_nvidia_fs_reads_readmib_total{{{I}}}[{RI}])) * 1048576"),
                "{{instance}} read",
            ),
            q(
                format!("sum by (instance) (rate(gds_nvidia_fs_writes_writemib_total{{{I}}}[{RI}])) * 1048576"),
                "{{instance}} write",
            ),
        ],
    )));
    l.add(
        8,
        8,
        timeseries(
            "GPU memory registered with nvidia-fs",
            "Per GPU (PCI address): memory pinned for GDS.",
            "mbytes",
            vec![q(
                format!("sum by (instance, pci) (gds_nvidia_fs_gpu_registered_mib{{{I}}})"),
                "{{instance}} {{pci}}",
            )],
        ),
    );
    l.add(8, 8, timeseries(
        "All nvidia-fs counters per second",
        "Every monotonic nvidia-fs counter (gds_nvidia_fs_*_total) as a rate over 5 minutes.",
        "ops",
        vec![q(
            format!(
                r#"sum by (instance, counter) (rate(label_replace({{__name__=~"gds_nvidia_fs_.+_total", {I}}}, "counter", "$1", "__name__", "gds_nvidia_fs_(.+)_total")[5m:15s]))"#
            ),
            "{{instance}} {{counter}}",
        )],
    ));
    l.add(
        8,
        8,
        label_table(
            "nvidia-fs values now",
            "Every gds_nvidia_fs_* series as last scraped (counters and gauges).",
            format!(r#"{{__name__=~"gds_nvidia_fs_.+", {I}}}"#),
            &["__name__", "instance", "pci", "Value"],
        ),
    );

    json!({
        "id": null,
        "uid": "gds-overview",
        "title": "GPUDirect Storage (gds)",
        "description": "io_uring, NVMe and data-path latency from gds-agent. Source: xtask/src/dashboard.rs.",
        "tags": ["gds", "io_uring", "nvme", "gpudirect"],
        "editable": true,
        "fiscalYearStartMonth": 0,
        "graphTooltip": 1,
        "links": [],
        "liveNow": false,
        "refresh": "30s",
        "schemaVersion": 39,
        "version": 1,
        "time": { "from": "now-1h", "to": "now" },
        "timepicker": {},
        "timezone": "",
        "weekStart": "",
        "templating": templating(),
        "annotations": { "list": [] },
        "panels": l.panels,
    })
}

/// The dashboard as written to [`DASHBOARD_PATH`].
pub fn render_text() -> String {
    let mut text = serde_json::to_string_pretty(&render()).expect("a JSON value always serializes");
    text.push('\n');
    text
}

/// A PromQL expression of the dashboard and where it came from.
#[derive(Debug, Clone)]
pub struct DashboardQuery {
    pub origin: String,
    pub expr: String,
}

/// Every PromQL expression of the dashboard: panel targets and template-variable queries
/// (`label_values(SELECTOR, LABEL)` becomes `count by (LABEL) (SELECTOR)`). Template variables
/// are left in place.
pub fn queries(dashboard: &Value) -> Result<Vec<DashboardQuery>> {
    let mut found = Vec::new();
    for panel in panels(dashboard) {
        let title = panel["title"].as_str().unwrap_or("?");
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().context("target without expr")?;
            let ref_id = target["refId"].as_str().unwrap_or("?");
            found.push(DashboardQuery {
                origin: format!("panel {:?} {ref_id}", title),
                expr: expr.to_owned(),
            });
        }
    }
    for var in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if var["type"] != "query" {
            continue;
        }
        let name = var["name"].as_str().unwrap_or("?");
        let definition = var["definition"]
            .as_str()
            .context("query variable without definition")?;
        found.push(DashboardQuery {
            origin: format!("variable ${name}"),
            expr: label_values_as_promql(definition)
                .with_context(|| format!("variable ${name}: {definition}"))?,
        });
    }
    Ok(found)
}

fn label_values_as_promql(definition: &str) -> Result<String> {
    let inner = definition
        .trim()
        .strip_prefix("label_values(")
        .and_then(|rest| rest.strip_suffix(')'))
        .context("only label_values(SELECTOR, LABEL) variables are supported")?;
    let (selector, label) = inner
        .rsplit_once(',')
        .context("label_values without a label")?;
    Ok(format!("count by ({}) ({})", label.trim(), selector.trim()))
}

/// All panels, rows included, with the panels nested in collapsed rows.
fn panels(dashboard: &Value) -> Vec<&Value> {
    let mut all = Vec::new();
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        all.push(panel);
        all.extend(panel["panels"].as_array().into_iter().flatten());
    }
    all
}

/// Sanity rules for the dashboard: unique panel ids, every panel has a query and a unit, no
/// hard-coded datasource uid, the template variables exist and every query uses `$instance`.
pub fn sanity_check(dashboard: &Value) -> Result<()> {
    let mut problems = Vec::new();
    let mut ids = HashSet::new();

    for var in ["datasource", "instance", "disk", "opcode"] {
        let found = dashboard["templating"]["list"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|v| v["name"] == var);
        match found {
            None => problems.push(format!("template variable ${var} is missing")),
            Some(v)
                if var == "datasource"
                    && (v["type"] != "datasource" || v["query"] != "prometheus") =>
            {
                problems.push("$datasource must be a prometheus datasource variable".to_owned())
            }
            Some(_) => {}
        }
    }

    let all = panels(dashboard);
    ensure!(!all.is_empty(), "dashboard has no panels");
    for panel in all {
        let title = panel["title"].as_str().unwrap_or("<untitled>");
        match panel["id"].as_u64() {
            Some(id) if !ids.insert(id) => {
                problems.push(format!("panel {title:?}: duplicate id {id}"))
            }
            Some(_) => {}
            None => problems.push(format!("panel {title:?}: no numeric id")),
        }
        for key in ["h", "w", "x", "y"] {
            if panel["gridPos"][key].as_u64().is_none() {
                problems.push(format!("panel {title:?}: gridPos.{key} missing"));
            }
        }
        if panel["type"] == "row" {
            continue;
        }
        let unit = panel["fieldConfig"]["defaults"]["unit"]
            .as_str()
            .unwrap_or("");
        if unit.is_empty() {
            problems.push(format!("panel {title:?}: no unit"));
        }
        let targets = panel["targets"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        if targets.is_empty() {
            problems.push(format!("panel {title:?}: no query"));
        }
        for target in targets {
            let expr = target["expr"].as_str().unwrap_or("");
            if expr.trim().is_empty() {
                problems.push(format!("panel {title:?}: empty query"));
            } else if !expr.contains("$instance") {
                problems.push(format!("panel {title:?}: query ignores $instance: {expr}"));
            }
        }
    }

    datasource_uids(dashboard, "$", &mut problems);
    for q in queries(dashboard)? {
        for name in undeclared_metrics(&q.expr) {
            problems.push(format!(
                "{}: {name} is not a declared metric family (gds-user/crates/gds-api/src/families.rs)",
                q.origin
            ));
        }
    }

    if problems.is_empty() {
        Ok(())
    } else {
        bail!(
            "dashboard sanity check failed:\n  {}",
            problems.join("\n  ")
        )
    }
}

/// The `gds_*` metric names in `text` that no declared family owns (histogram suffixes and
/// the nvidia-fs prefix family count as declared).
pub fn undeclared_metrics(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(pos) = text[i..].find("gds_") {
        let start = i + pos;
        let boundary =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let end = text[start..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(text.len(), |e| start + e);
        let name = &text[start..end];
        if boundary && crate::families::family_of(name).is_none() && !out.iter().any(|n| n == name)
        {
            out.push(name.to_owned());
        }
        i = end;
    }
    out
}

/// Every `datasource` object anywhere in the JSON must point at the `$datasource` variable.
fn datasource_uids(value: &Value, path: &str, problems: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, child) in map {
                let child_path = format!("{path}.{key}");
                if key == "datasource" {
                    match child {
                        Value::Object(ds) if ds.get("uid").and_then(Value::as_str) != Some(DS) => {
                            problems
                                .push(format!("{child_path}: datasource uid is not {DS}: {child}"))
                        }
                        // The datasource template variable itself has no "datasource" key; a
                        // string here is the pre-7 form of a hard-coded datasource.
                        Value::String(s) if s != DS => {
                            problems.push(format!("{child_path}: hard-coded datasource {s:?}"))
                        }
                        _ => {}
                    }
                }
                datasource_uids(child, &child_path, problems);
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                datasource_uids(item, &format!("{path}[{i}]"), problems);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_dashboard_is_sane() {
        sanity_check(&render()).unwrap();
    }

    #[test]
    fn sanity_check_catches_hard_coded_uid_duplicate_id_and_missing_unit() {
        let mut dashboard = render();
        dashboard["panels"][1]["targets"][0]["datasource"]["uid"] = json!("P1809F7CD0C75ACF3");
        dashboard["panels"][2]["id"] = dashboard["panels"][1]["id"].clone();
        dashboard["panels"][3]["fieldConfig"]["defaults"]
            .as_object_mut()
            .unwrap()
            .remove("unit");
        let err = sanity_check(&dashboard).unwrap_err().to_string();
        assert!(err.contains("P1809F7CD0C75ACF3"), "{err}");
        assert!(err.contains("duplicate id"), "{err}");
        assert!(err.contains("no unit"), "{err}");
    }

    /// The dashboard and the alert rules use only declared metric families: a renamed or
    /// removed family fails here, not on a dark panel in production.
    #[test]
    fn dashboard_and_alerts_use_declared_families() {
        let mut dashboard = render();
        sanity_check(&dashboard).unwrap();
        let alerts =
            std::fs::read_to_string(crate::setup::root().join("deploy/prometheus/alerts.yml"))
                .unwrap();
        assert_eq!(undeclared_metrics(&alerts), Vec::<String>::new());
        // A planted unknown name is caught.
        dashboard["panels"][1]["targets"][0]["expr"] =
            json!("rate(gds_no_such_metric_total{instance=~\"$instance\"}[5m])");
        let err = sanity_check(&dashboard).unwrap_err().to_string();
        assert!(
            err.contains("gds_no_such_metric_total is not a declared"),
            "{err}"
        );
        assert_eq!(
            undeclared_metrics(
                "x gds_uring_request_duration_seconds_bucket gds_nvidia_fs_reads_total"
            ),
            Vec::<String>::new()
        );
    }

    #[test]
    fn variables_become_promql() {
        assert_eq!(
            label_values_as_promql("label_values(gds_agent_info, instance)").unwrap(),
            "count by (instance) (gds_agent_info)"
        );
        assert_eq!(
            label_values_as_promql(r#"label_values(m{a=~"x,y"}, disk)"#).unwrap(),
            r#"count by (disk) (m{a=~"x,y"})"#
        );
    }
}
