//! The Prometheus text exposition format, the subset the agent writes: `name value` and
//! `name{k="v",...} value` lines (values may escape `\\`, `\"` and `\n`), `# HELP` / `# TYPE`
//! comments skipped. The product only writes this format; the end-to-end tests, the VM
//! scenarios (`gds-vm-scenarios`) and xtask read it with this one parser.

use std::fmt;

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    /// As written, values unescaped.
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// `name{k="v",...}` with the labels sorted: one key per series, whatever order they were
    /// written in.
    pub fn key(&self) -> String {
        let labels: Vec<(&str, &str)> = self
            .labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        series_key(&self.name, &labels)
    }
}

/// [`Sample::key`] of the series `name{labels}`, labels given in any order.
pub fn series_key(name: &str, labels: &[(&str, &str)]) -> String {
    if labels.is_empty() {
        return name.to_owned();
    }
    let mut pairs: Vec<String> = labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect();
    pairs.sort();
    format!("{name}{{{}}}", pairs.join(","))
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A line that is not a sample.
#[derive(Debug, Clone, PartialEq)]
pub struct ParseError {
    /// 1-based.
    pub line: usize,
    pub text: String,
    pub what: &'static str,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}: {:?}", self.line, self.what, self.text)
    }
}

impl std::error::Error for ParseError {}

/// Every sample of `text`, in order, each parsed or the reason its line is not a sample.
pub fn samples(text: &str) -> impl Iterator<Item = Result<Sample, ParseError>> + '_ {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .map(|(i, l)| {
            parse_line(l.trim()).map_err(|what| ParseError {
                line: i + 1,
                text: l.to_owned(),
                what,
            })
        })
}

fn parse_line(line: &str) -> Result<Sample, &'static str> {
    let name_end = line
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .unwrap_or(line.len());
    let name = &line[..name_end];
    if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
        return Err("no metric name");
    }
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(after) = rest.strip_prefix('{') {
        rest = after;
        loop {
            rest = rest.trim_start();
            if let Some(after) = rest.strip_prefix('}') {
                rest = after;
                break;
            }
            let key_end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .ok_or("unterminated labels")?;
            let key = &rest[..key_end];
            if key.is_empty() {
                return Err("no label name");
            }
            rest = rest[key_end..]
                .trim_start()
                .strip_prefix('=')
                .ok_or("no = after a label name")?
                .trim_start()
                .strip_prefix('"')
                .ok_or("label value not quoted")?;
            let mut value = String::new();
            let mut chars = rest.char_indices();
            let end = loop {
                match chars.next().ok_or("unterminated label value")? {
                    (i, '"') => break i,
                    (_, '\\') => match chars.next().ok_or("unterminated label value")?.1 {
                        'n' => value.push('\n'),
                        c => value.push(c),
                    },
                    (_, c) => value.push(c),
                }
            };
            labels.push((key.to_owned(), value));
            rest = rest[end + 1..].trim_start();
            if let Some(after) = rest.strip_prefix(',') {
                rest = after;
            } else if !rest.starts_with('}') {
                return Err("no , or } after a label");
            }
        }
    }
    if !rest.starts_with(char::is_whitespace) {
        return Err("no space before the value");
    }
    // A timestamp may follow the value.
    let value = rest.split_whitespace().next().ok_or("no value")?;
    let value = value.parse().map_err(|_| "value is not a number")?;
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}
