//! The agent's config file as text: TOML with top-level `key = value` lines, one per
//! `gds-agent run` flag. This layer only reads the TOML and turns each value into the text a
//! flag would take; which keys exist and what values they accept is decided by the flags
//! themselves (see `config::resolve`), so the file and the command line cannot drift apart.
//!
//! Self-contained (std, toml, thiserror) so the fuzz target can compile it on its own.

use std::collections::HashMap;
use std::ops::Range;

use toml::de::{DeTable, DeValue};

/// One `key = value` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The key as a flag name: `slow_threshold` and `slow-threshold` both become
    /// `slow-threshold`.
    pub key: String,
    /// The values as a flag takes them; several for a list (`opcode = ["READ", "WRITE"]`).
    pub values: Vec<String>,
    /// 1-based line of the key, for error messages.
    pub line: usize,
}

/// Why a config file's text was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FileError {
    #[error("line {line}, column {column}: {message}")]
    Syntax {
        line: usize,
        column: usize,
        message: String,
    },
    #[error(
        "line {line}: `{key}` is a table, but the config file has no sections: write \
         `key = value` lines at the top level"
    )]
    Table { key: String, line: usize },
    #[error(
        "line {line}: `{key}` is {kind}; give a string, a number, true/false or a list of those"
    )]
    Type {
        key: String,
        line: usize,
        kind: &'static str,
    },
    #[error("line {line}: `{key}` is an empty list; leave the key out to keep the default")]
    EmptyList { key: String, line: usize },
    #[error("line {line}: `{key}` is set twice (first on line {first})")]
    Duplicate {
        key: String,
        line: usize,
        first: usize,
    },
}

impl FileError {
    /// The 1-based line the error points at.
    pub fn line(&self) -> usize {
        match self {
            FileError::Syntax { line, .. }
            | FileError::Table { line, .. }
            | FileError::Type { line, .. }
            | FileError::EmptyList { line, .. }
            | FileError::Duplicate { line, .. } => *line,
        }
    }
}

/// 1-based line and column of byte `offset` in `text` (for the one syntax error).
fn position(text: &str, offset: usize) -> (usize, usize) {
    let before = &text.as_bytes()[..offset.min(text.len())];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    let column = String::from_utf8_lossy(&before[line_start..])
        .chars()
        .count()
        + 1;
    (line, column)
}

/// The text's newline offsets, found once: the line of every key is then a binary search,
/// not a count from the start of a file that may hold a megabyte of keys.
struct Lines(Vec<usize>);

impl Lines {
    fn new(text: &str) -> Lines {
        Lines(text.match_indices('\n').map(|(i, _)| i).collect())
    }

    /// 1-based line of the span's first byte.
    fn of(&self, span: Range<usize>) -> usize {
        self.0.partition_point(|&n| n < span.start) + 1
    }
}

/// A scalar as the text a flag would be given.
fn scalar(value: &DeValue<'_>) -> Result<String, &'static str> {
    match value {
        DeValue::String(s) => Ok(s.to_string()),
        DeValue::Integer(i) => i128::from_str_radix(i.as_str(), i.radix())
            .map(|v| v.to_string())
            .map_err(|_| "an integer out of range"),
        DeValue::Float(f) => Ok(f.as_str().to_string()),
        DeValue::Boolean(b) => Ok(b.to_string()),
        DeValue::Datetime(_) => Err("a date/time"),
        DeValue::Array(_) => Err("a list inside a list"),
        DeValue::Table(_) => Err("a table"),
    }
}

/// Reads the entries of a config file, in file order.
pub fn parse(text: &str) -> Result<Vec<Entry>, FileError> {
    let table = DeTable::parse(text).map_err(|e| {
        let (line, column) = position(text, e.span().map_or(0, |s| s.start));
        FileError::Syntax {
            line,
            column,
            message: e.message().trim().to_string(),
        }
    })?;
    let lines = Lines::new(text);
    let mut entries: Vec<Entry> = Vec::new();
    for (key, value) in table.get_ref() {
        let line = lines.of(key.span());
        let name = key.get_ref().replace('_', "-");
        let values = match value.get_ref() {
            DeValue::Table(_) => {
                return Err(FileError::Table {
                    key: key.get_ref().to_string(),
                    line,
                });
            }
            DeValue::Array(items) => {
                let mut values = Vec::new();
                for item in items.iter() {
                    values.push(scalar(item.get_ref()).map_err(|kind| FileError::Type {
                        key: key.get_ref().to_string(),
                        line: lines.of(item.span()),
                        kind,
                    })?);
                }
                if values.is_empty() {
                    return Err(FileError::EmptyList {
                        key: key.get_ref().to_string(),
                        line,
                    });
                }
                values
            }
            other => vec![scalar(other).map_err(|kind| FileError::Type {
                key: key.get_ref().to_string(),
                line,
                kind,
            })?],
        };
        entries.push(Entry {
            key: name,
            values,
            line,
        });
    }
    // The parser's map is sorted by key; errors and precedence read better in file order.
    entries.sort_by_key(|e| e.line);
    // Keys that differ only in `_` / `-` are one flag: the first in file order wins the report.
    let mut first_line: HashMap<&str, usize> = HashMap::with_capacity(entries.len());
    for e in &entries {
        if let Some(&first) = first_line.get(e.key.as_str()) {
            return Err(FileError::Duplicate {
                key: e.key.replace('-', "_"),
                line: e.line,
                first,
            });
        }
        first_line.insert(&e.key, e.line);
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_scalars_lists_and_lines() {
        let text = "# agent\nlisten = \"127.0.0.1:9000\"\nsample = 0x10\n\nslow_threshold = \"5ms\"\nopcode = [\"READ\", 46]\nstall-interval = 0.5\n";
        let e = parse(text).unwrap();
        let got: Vec<(&str, Vec<&str>, usize)> = e
            .iter()
            .map(|e| {
                (
                    e.key.as_str(),
                    e.values.iter().map(String::as_str).collect(),
                    e.line,
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("listen", vec!["127.0.0.1:9000"], 2),
                ("sample", vec!["16"], 3),
                ("slow-threshold", vec!["5ms"], 5),
                ("opcode", vec!["READ", "46"], 6),
                ("stall-interval", vec!["0.5"], 7),
            ]
        );
    }

    #[test]
    fn refuses_what_a_flag_cannot_take() {
        let err = |t: &str| parse(t).unwrap_err();
        assert!(matches!(
            err("a = 1\n[trace]\nb = 2\n"),
            FileError::Table { line: 2, .. }
        ));
        assert!(matches!(
            err("x = 1\ny = 1979-05-27\n"),
            FileError::Type {
                line: 2,
                kind: "a date/time",
                ..
            }
        ));
        assert!(matches!(
            err("opcode = []\n"),
            FileError::EmptyList { line: 1, .. }
        ));
        assert!(matches!(err("opcode = [[1]]\n"), FileError::Type { .. }));
        assert!(matches!(
            err("inline = { a = 1 }\n"),
            FileError::Table { .. }
        ));
        assert!(matches!(
            err("slow_threshold = \"1s\"\nslow-threshold = \"2s\"\n"),
            FileError::Duplicate {
                line: 2,
                first: 1,
                ..
            }
        ));
        let e = err("listen = \n");
        assert_eq!(e.line(), 1, "{e}");
        assert!(matches!(e, FileError::Syntax { .. }), "{e}");
        let e = err("a = 1\na = 2\n");
        assert_eq!(e.line(), 2, "{e}");
    }

    #[test]
    fn positions_count_characters_not_bytes() {
        assert_eq!(position("é = \n", 4), (1, 4));
        assert_eq!(position("a\nbc", 3), (2, 2));
        assert_eq!(position("", 10), (1, 1));
    }
}
