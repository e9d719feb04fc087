//! Drawing `gds-agent top`: the view only, no data collection.

use ratatui::{
    Frame,
    layout::{Constraint, Layout},
    style::{Color, Modifier, Style},
    text::{Line, Span},
    widgets::{Block, Borders, Paragraph, Row, Table, TableState, Wrap},
};

use super::{
    evidence,
    model::{CufileProcRow, FileProcRow, RateRow, View},
    nav::Opened,
};

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
    // A rate is never negative; -0.0 (and rounding of a tiny negative) would print "-0".
    let v = v.max(0.0) + 0.0;
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

/// Width of a column: a fixed number of cells, or what is left (at least this many).
#[derive(Clone, Copy)]
enum W {
    Fixed(u16),
    Rest(u16),
}

/// One table of the screen: its columns (header and width each, in order), rows and title.
fn table<'a>(title: &'a str, columns: &[(&'a str, W)], rows: Vec<Row<'a>>) -> Table<'a> {
    let widths = columns.iter().map(|(_, w)| match *w {
        W::Fixed(n) => Constraint::Length(n),
        W::Rest(n) => Constraint::Min(n),
    });
    Table::new(rows, widths)
        .header(Row::new(columns.iter().map(|(h, _)| *h)).style(bold()))
        .block(Block::default().borders(Borders::ALL).title(title))
}

fn rate_table<'a>(title: &'a str, rows: &[RateRow], first: &'a str) -> Table<'a> {
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
    table(
        title,
        &[
            (first, W::Rest(12)),
            ("IOPS", W::Fixed(8)),
            ("p50", W::Fixed(8)),
            ("p99", W::Fixed(8)),
            ("ERR/s", W::Fixed(7)),
        ],
        rows,
    )
}

fn cufile_table(rows: &[CufileProcRow]) -> Table<'_> {
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
    table(
        "cuFile by process (path the I/O beneath took)",
        &[
            ("PID", W::Fixed(8)),
            ("COMM", W::Fixed(16)),
            ("CALLS/s", W::Fixed(8)),
            ("GB/s", W::Fixed(7)),
            ("COMPAT", W::Fixed(7)),
            ("PATH", W::Fixed(8)),
            ("WHY COMPAT", W::Rest(10)),
        ],
        rows,
    )
}

fn file_table(rows: &[FileProcRow]) -> Table<'_> {
    let rows: Vec<Row> = rows
        .iter()
        .map(|r| {
            Row::new([
                r.pid.to_string(),
                r.comm.clone(),
                rate(r.calls_per_s),
                format!("{:.1}", r.bytes_per_s / 1e6),
                secs(r.mean),
                r.busiest.clone(),
            ])
        })
        .collect();
    table(
        "files by process",
        &[
            ("PID", W::Fixed(8)),
            ("COMM", W::Fixed(16)),
            ("CALLS/s", W::Fixed(8)),
            ("MB/s", W::Fixed(8)),
            ("MEAN", W::Fixed(8)),
            ("BUSIEST FILE", W::Rest(10)),
        ],
        rows,
    )
}

/// The one-line header of the waiting and evidence screens: the name, then the error in red
/// where there is one, else `right`.
fn header_line(error: Option<&str>, right: String) -> Line<'static> {
    let name = Span::styled(
        " gds top ",
        Style::default().fg(Color::Black).bg(Color::Cyan),
    );
    Line::from(vec![
        name,
        match error {
            Some(e) => Span::styled(format!(" {e}"), Style::default().fg(Color::Red)),
            None => Span::raw(right),
        },
    ])
}

/// The screen before the agent's first snapshot: the header, saying what top waits for (or
/// what failed).
pub fn draw_waiting(f: &mut Frame, status: &str, error: Option<&str>) {
    let chunks = Layout::vertical([Constraint::Length(1), Constraint::Min(0)]).split(f.area());
    f.render_widget(
        header_line(error, format!(" waiting for the {status}  q quits")),
        chunks[0],
    );
}

/// Draws the whole screen. `status` is the header's right side (agent address or an error);
/// `selected` the row of the stall list that Enter opens.
///
/// Every layer with data gets its panel, each from its own rows: io_uring by opcode (always),
/// block by disk, NVMe by disk, cuFile; then the slowest requests in flight and the stalls.
pub fn draw(
    f: &mut Frame,
    view: &View,
    selected: Option<usize>,
    status: &str,
    error: Option<&str>,
) {
    let has_block = !view.block_disks.is_empty();
    let has_nvme = !view.nvme_disks.is_empty();
    let has_cufile = !view.cufile_ops.is_empty() || !view.cufile_procs.is_empty();
    let has_file = !view.file_ops.is_empty() || !view.file_procs.is_empty();
    // Shares of the screen below the header: the panels shown split what the layers take.
    let layers = 1
        + u16::from(has_block)
        + u16::from(has_nvme)
        + u16::from(has_cufile)
        + u16::from(has_file);
    let share = |on: bool| Constraint::Percentage(if on { 66 / layers } else { 0 });
    let chunks = Layout::vertical([
        Constraint::Length(1),
        share(true),
        share(has_block),
        share(has_nvme),
        share(has_cufile),
        share(has_file),
        Constraint::Percentage(if layers > 1 { 17 } else { 33 }),
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
    if has_block {
        f.render_widget(
            rate_table("block by disk", &view.block_disks, "DISK"),
            chunks[2],
        );
    }
    if has_nvme {
        f.render_widget(
            rate_table("NVMe by disk", &view.nvme_disks, "DISK"),
            chunks[3],
        );
    }
    if has_cufile {
        let halves = Layout::horizontal([Constraint::Percentage(40), Constraint::Percentage(60)])
            .split(chunks[4]);
        f.render_widget(
            rate_table("cuFile by op", &view.cufile_ops, "OP"),
            halves[0],
        );
        f.render_widget(cufile_table(&view.cufile_procs), halves[1]);
    }
    if has_file {
        let halves = Layout::horizontal([Constraint::Percentage(40), Constraint::Percentage(60)])
            .split(chunks[5]);
        f.render_widget(rate_table("files by op", &view.file_ops, "OP"), halves[0]);
        f.render_widget(file_table(&view.file_procs), halves[1]);
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
    // WHERE gets what is left: on an 80-column terminal, enough for a disk and sector or an
    // io_uring request's user_data.
    f.render_widget(
        table(
            "slowest in flight",
            &[
                ("AGE", W::Fixed(8)),
                ("LAYER STAGE", W::Fixed(14)),
                ("PID", W::Fixed(8)),
                ("COMM", W::Fixed(12)),
                ("OPCODE", W::Fixed(8)),
                ("WHERE", W::Rest(10)),
            ],
            rows,
        ),
        chunks[6],
    );

    let stall_rows: Vec<Row> = view
        .stalls()
        .into_iter()
        .map(|s| {
            let active = s.total_seconds.is_none();
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
                s.cause.kind.label().to_string(),
                s.request.ctx.pid.to_string(),
                s.request.ctx.comm.clone(),
                s.request.opcode.clone(),
                s.request.where_text(),
            ])
            .style(style)
        })
        .collect();
    // CAUSE fits its longest label (waiting_for_data); WHERE keeps a dozen columns at 80.
    let mut state = TableState::default().with_selected(selected);
    f.render_stateful_widget(
        table(
            if selected.is_some() {
                "stalls (↑↓ select, Enter: why it is stuck)"
            } else {
                "stalls"
            },
            &[
                ("STATE", W::Fixed(7)),
                ("TIME", W::Fixed(7)),
                ("LAYER", W::Fixed(6)),
                ("CAUSE", W::Fixed(16)),
                ("PID", W::Fixed(7)),
                ("COMM", W::Fixed(10)),
                ("OPCODE", W::Fixed(6)),
                ("WHERE", W::Rest(8)),
            ],
            stall_rows,
        )
        .row_highlight_style(Style::default().add_modifier(Modifier::REVERSED)),
        chunks[7],
        &mut state,
    );
}

/// The evidence screen of one stall: what it is, its cause and the evidence the cause rests
/// on (threads with their kernel stacks, device, cgroups and limits, what was missing).
pub fn draw_evidence(f: &mut Frame, o: &Opened, status: &str, error: Option<&str>) {
    let chunks = Layout::vertical([Constraint::Length(1), Constraint::Min(0)]).split(f.area());
    f.render_widget(
        header_line(error, format!(" {status}  ↑↓ scroll  Esc back")),
        chunks[0],
    );

    let s = &o.stall;
    let q = &s.request;
    let state = match s.total_seconds {
        None => Span::styled(
            format!("STALLED {}", secs(Some(q.age_seconds))),
            Style::default().fg(Color::Red).add_modifier(Modifier::BOLD),
        ),
        Some(t) => Span::raw(format!("ended after {}", secs(Some(t)))),
    };
    let mut lines = vec![
        Line::from(vec![
            state,
            Span::raw(format!(
                "  {} {}  pid {} tid {} {}",
                q.layer.label(),
                q.opcode,
                q.ctx.pid,
                q.ctx.tid,
                q.ctx.comm
            )),
        ]),
        Line::from(format!("{} ({})", q.where_text(), s.stage_description)),
    ];
    let ev = o.evidence.as_ref().map(|(e, shared)| (e, *shared));
    for section in evidence::sections(s, ev) {
        lines.push(Line::from(Span::styled(
            section.title.to_uppercase(),
            bold(),
        )));
        lines.extend(
            section
                .lines
                .into_iter()
                .map(|l| Line::from(format!("  {l}"))),
        );
    }
    f.render_widget(
        // Long lines (a cause's because, a limit) wrap rather than lose their end.
        Paragraph::new(lines)
            .wrap(Wrap { trim: false })
            .scroll((o.scroll, 0))
            .block(
                Block::default()
                    .borders(Borders::ALL)
                    .title("why it is stuck"),
            ),
        chunks[1],
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::top::model::RateRow;

    fn screen(view: &View) -> String {
        let backend = ratatui::backend::TestBackend::new(100, 60);
        let mut term = ratatui::Terminal::new(backend).unwrap();
        term.draw(|f| draw(f, view, None, "127.0.0.1:9477", None))
            .unwrap();
        let buf = term.backend().buffer();
        let mut out = String::new();
        for y in 0..buf.area.height {
            for x in 0..buf.area.width {
                out.push_str(buf[(x, y)].symbol());
            }
            out.push('\n');
        }
        out
    }

    fn row(key: &str, iops: f64) -> RateRow {
        RateRow {
            key: key.into(),
            iops,
            p50: Some(20e-6),
            p99: Some(80e-6),
            errors_per_s: 0.0,
        }
    }

    /// Bug: an idle agent's header said `IOPS -0`.
    #[test]
    fn idle_header_says_iops_0() {
        assert_eq!(rate(-0.0), "0");
        assert_eq!(rate(-1e-9), "0");
        let s = screen(&View {
            total_iops: -0.0,
            ..Default::default()
        });
        assert!(s.contains(" IOPS 0 "), "{s}");
        assert!(!s.contains("-0"), "{s}");
        // Only io_uring's panel when no other layer has data.
        assert!(s.contains("io_uring by opcode"), "{s}");
        assert!(
            !s.contains("block by disk") && !s.contains("NVMe by disk"),
            "{s}"
        );
    }

    /// Bug: under O_DIRECT reads of `vda` (no NVMe) top showed io_uring only: its per-disk panel
    /// was NVMe's. Each layer with data has its panel, with its own rows.
    #[test]
    fn every_layer_with_data_has_its_panel() {
        let view = View {
            opcodes: vec![row("READ", 900.0)],
            block_disks: vec![row("vda", 93_000.0)],
            nvme_disks: vec![row("nvme0n1", 1_500.0)],
            cufile_ops: vec![row("read", 12.0)],
            total_iops: 900.0,
            ..Default::default()
        };
        let s = screen(&view);
        for want in [
            "io_uring by opcode",
            "READ",
            "block by disk",
            "vda",
            "93.0k",
            "NVMe by disk",
            "nvme0n1",
            "1.5k",
            "cuFile by op",
            "slowest in flight",
            "stalls",
        ] {
            assert!(s.contains(want), "{want:?} missing from:\n{s}");
        }
        // Block alone (the fio case): its panel, and no NVMe one.
        let s = screen(&View {
            block_disks: vec![row("vda", 93_000.0)],
            ..Default::default()
        });
        assert!(s.contains("block by disk") && s.contains("vda"), "{s}");
        assert!(!s.contains("NVMe by disk"), "{s}");
    }
}
