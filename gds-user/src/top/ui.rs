//! Drawing `gds-agent top`: the view only, no data collection.

use ratatui::{
    Frame,
    layout::{Constraint, Layout},
    style::{Color, Modifier, Style},
    text::{Line, Span},
    widgets::{Block, Borders, Row, Table},
};

use super::model::{CufileProcRow, RateRow, View};

fn secs(s: Option<f64>) -> String {
    match s {
        None => "-".into(),
        Some(v) if v.is_infinite() => ">17s".into(),
        Some(v) if v < 1e-3 => format!("{:.0}µs", v * 1e6),
        Some(v) if v < 1.0 => format!("{:.1}ms", v * 1e3),
        Some(v) => format!("{v:.2}s"),
    }
}

fn rate(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

fn bold() -> Style {
    Style::default().add_modifier(Modifier::BOLD)
}

fn rate_table<'a>(title: &'a str, rows: &[RateRow], first: &'a str) -> Table<'a> {
    let header = Row::new([first, "IOPS", "p50", "p99", "ERR/s"]).style(bold());
    let rows: Vec<Row> = rows
        .iter()
        .map(|r| {
            Row::new([
                r.key.clone(),
                rate(r.iops),
                secs(r.p50),
                secs(r.p99),
                format!("{:.1}", r.errors_per_s),
            ])
        })
        .collect();
    Table::new(
        rows,
        [
            Constraint::Min(12),
            Constraint::Length(8),
            Constraint::Length(8),
            Constraint::Length(8),
            Constraint::Length(7),
        ],
    )
    .header(header)
    .block(Block::default().borders(Borders::ALL).title(title))
}

fn cufile_table(rows: &[CufileProcRow]) -> Table<'_> {
    let header = Row::new([
        "PID",
        "COMM",
        "CALLS/s",
        "GB/s",
        "COMPAT",
        "PATH",
        "WHY COMPAT",
    ])
    .style(bold());
    let rows: Vec<Row> = rows
        .iter()
        .map(|r| {
            Row::new([
                r.pid.to_string(),
                r.comm.clone(),
                rate(r.calls_per_s),
                format!("{:.2}", r.bytes_per_s / 1e9),
                r.compat_share
                    .map_or("-".into(), |s| format!("{:.0}%", s * 100.0)),
                r.path.clone(),
                r.reason.clone(),
            ])
        })
        .collect();
    Table::new(
        rows,
        [
            Constraint::Length(8),
            Constraint::Length(16),
            Constraint::Length(8),
            Constraint::Length(7),
            Constraint::Length(7),
            Constraint::Length(8),
            Constraint::Min(10),
        ],
    )
    .header(header)
    .block(
        Block::default()
            .borders(Borders::ALL)
            .title("cuFile by process (path the I/O beneath took)"),
    )
}

/// The screen before the agent's first snapshot: the header, saying what top waits for (or
/// what failed).
pub fn draw_waiting(f: &mut Frame, status: &str, error: Option<&str>) {
    let chunks = Layout::vertical([Constraint::Length(1), Constraint::Min(0)]).split(f.area());
    let mut header = vec![Span::styled(
        " gds top ",
        Style::default().fg(Color::Black).bg(Color::Cyan),
    )];
    match error {
        Some(e) => header.push(Span::styled(
            format!(" {e}"),
            Style::default().fg(Color::Red),
        )),
        None => header.push(Span::raw(format!(" waiting for the {status}  q quits"))),
    }
    f.render_widget(Line::from(header), chunks[0]);
}

/// Draws the whole screen. `status` is the header's right side (agent address or an error).
pub fn draw(f: &mut Frame, view: &View, status: &str, error: Option<&str>) {
    let has_disks = !view.disks.is_empty();
    let has_cufile = !view.cufile_ops.is_empty() || !view.cufile_procs.is_empty();
    let chunks = Layout::vertical([
        Constraint::Length(1),
        Constraint::Percentage(if has_disks { 25 } else { 34 }),
        Constraint::Percentage(if has_disks { 20 } else { 0 }),
        Constraint::Percentage(if has_cufile { 22 } else { 0 }),
        Constraint::Percentage(if has_cufile { 22 } else { 33 }),
        Constraint::Min(4),
    ])
    .split(f.area());

    let mut header = vec![
        Span::styled(
            " gds top ",
            Style::default().fg(Color::Black).bg(Color::Cyan),
        ),
        Span::raw(format!(
            " IOPS {}  inflight {}  stalls {}  drops {}  ",
            rate(view.total_iops),
            view.inflight_total,
            view.active_stalls.len(),
            view.drops
        )),
    ];
    match error {
        Some(e) => header.push(Span::styled(e.to_owned(), Style::default().fg(Color::Red))),
        None => header.push(Span::raw(format!("{status}  q quits"))),
    }
    f.render_widget(Line::from(header), chunks[0]);

    f.render_widget(
        rate_table("io_uring by opcode", &view.opcodes, "OPCODE"),
        chunks[1],
    );
    if has_disks {
        f.render_widget(rate_table("NVMe by disk", &view.disks, "DISK"), chunks[2]);
    }
    if has_cufile {
        let halves = Layout::horizontal([Constraint::Percentage(40), Constraint::Percentage(60)])
            .split(chunks[3]);
        f.render_widget(
            rate_table("cuFile by op", &view.cufile_ops, "OP"),
            halves[0],
        );
        f.render_widget(cufile_table(&view.cufile_procs), halves[1]);
    }

    let rows: Vec<Row> = view
        .inflight
        .iter()
        .map(|r| {
            Row::new([
                secs(Some(r.age_seconds)),
                format!("{} {}", r.layer.label(), r.stage.label()),
                r.ctx.pid.to_string(),
                r.ctx.comm.clone(),
                r.opcode.clone(),
                r.where_text(),
            ])
        })
        .collect();
    let widths = [
        Constraint::Length(8),
        Constraint::Length(14),
        Constraint::Length(8),
        Constraint::Length(16),
        Constraint::Length(12),
        Constraint::Min(10),
    ];
    f.render_widget(
        Table::new(rows, widths)
            .header(
                Row::new(["AGE", "LAYER STAGE", "PID", "COMM", "OPCODE", "WHERE"]).style(bold()),
            )
            .block(
                Block::default()
                    .borders(Borders::ALL)
                    .title("slowest in flight"),
            ),
        chunks[4],
    );

    let stall_rows: Vec<Row> = view
        .active_stalls
        .iter()
        .map(|s| (true, s))
        .chain(view.ended_stalls.iter().map(|s| (false, s)))
        .map(|(active, s)| {
            let style = if active {
                Style::default().fg(Color::Red)
            } else {
                Style::default()
            };
            Row::new([
                if active {
                    "STALLED".into()
                } else {
                    "ended".to_string()
                },
                secs(Some(s.total_seconds.unwrap_or(s.request.age_seconds))),
                s.request.layer.label().to_string(),
                s.request.ctx.pid.to_string(),
                s.request.ctx.comm.clone(),
                s.request.opcode.clone(),
                s.request.where_text(),
            ])
            .style(style)
        })
        .collect();
    f.render_widget(
        Table::new(
            stall_rows,
            [
                Constraint::Length(8),
                Constraint::Length(8),
                Constraint::Length(8),
                Constraint::Length(14),
                Constraint::Length(10),
                Constraint::Length(10),
                Constraint::Min(8),
            ],
        )
        .header(
            Row::new(["STATE", "TIME", "LAYER", "PID", "COMM", "OPCODE", "WHERE"]).style(bold()),
        )
        .block(Block::default().borders(Borders::ALL).title("stalls")),
        chunks[5],
    );
}
