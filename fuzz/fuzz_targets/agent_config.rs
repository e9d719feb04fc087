//! Fuzzes the config-file reader of `gds-agent run --config FILE`
//! (`gds-user/crates/gds-host/src/config_file.rs`: TOML text -> `key = value` entries or a typed `FileError`).
//! Which keys exist and what values they take is decided by `gds-agent run`'s clap flags in
//! `config/mod.rs`, which cannot be compiled without the whole agent; this layer holds the
//! rules the file itself must meet.
//!
//! Properties:
//! - never panics, whatever the text;
//! - accepted: keys are non-empty flag names (`_` turned into `-`), each appearing once; every
//!   key has at least one value; lines are 1-based, inside the text and in file order;
//! - differential: whenever the full `toml` parser reads the text as a table of scalars and
//!   non-empty lists of scalars (no dates), the reader accepts it with the same values;
//! - accepted entries written back as TOML read back to the same keys and values;
//! - refused: the message is non-empty and names the line (and the key, where there is one),
//!   and that line exists.
#![no_main]

use libfuzzer_sys::fuzz_target;

use gds_host::config_file::{self as file, Entry, FileError};

/// Which scalar values the flags would be given, per `toml::Value`, or None when the file
/// reader must refuse it (dates, tables, nested or empty lists).
fn expected_values(v: &toml::Value) -> Option<Vec<Option<String>>> {
    fn scalar(v: &toml::Value) -> Option<Option<String>> {
        match v {
            toml::Value::String(s) => Some(Some(s.clone())),
            toml::Value::Integer(i) => Some(Some(i.to_string())),
            // Floats are passed on as written (e.g. `0.5`, `1e3`): compare them loosely.
            toml::Value::Float(_) => Some(None),
            toml::Value::Boolean(b) => Some(Some(b.to_string())),
            _ => None,
        }
    }
    match v {
        toml::Value::Array(items) if !items.is_empty() => items.iter().map(scalar).collect(),
        toml::Value::Array(_) => None,
        other => scalar(other).map(|s| vec![s]),
    }
}

fn quote(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

fn render(entries: &[Entry]) -> String {
    let mut out = String::new();
    for e in entries {
        let values: Vec<String> = e.values.iter().map(|v| quote(v)).collect();
        out.push_str(&format!("{} = [{}]\n", quote(&e.key), values.join(", ")));
    }
    out
}

fuzz_target!(|data: &[u8]| {
    // The agent refuses non-UTF-8 before parsing (ConfigError::NotUtf8); lossy decoding still
    // gives the reader every byte pattern it could see.
    let text = String::from_utf8_lossy(data);
    let lines = text.split('\n').count();
    let parsed = file::parse(&text);
    match &parsed {
        Ok(entries) => {
            let mut seen = std::collections::HashSet::new();
            let mut last_line = 0;
            for e in entries {
                assert!(!e.key.is_empty() || text.contains("\"\"") || text.contains("''"));
                assert!(!e.key.contains('_'), "key {:?} not normalised", e.key);
                assert!(seen.insert(e.key.clone()), "key {:?} twice", e.key);
                assert!(!e.values.is_empty(), "key {:?} without values", e.key);
                assert!(e.line >= 1 && e.line <= lines, "line {} of {lines}", e.line);
                assert!(e.line >= last_line, "entries out of file order");
                last_line = e.line;
            }
            // Written back, the entries read back the same.
            let again = file::parse(&render(entries)).expect("re-rendered config refused");
            let a: Vec<_> = entries.iter().map(|e| (&e.key, &e.values)).collect();
            let b: Vec<_> = again.iter().map(|e| (&e.key, &e.values)).collect();
            assert_eq!(a, b);
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(!msg.is_empty());
            assert!(msg.contains(&format!("line {}", e.line())), "{msg}");
            assert!(
                e.line() >= 1 && e.line() <= lines,
                "line {} of {lines}: {msg}",
                e.line()
            );
            match e {
                FileError::Syntax {
                    column, message, ..
                } => {
                    assert!(*column >= 1);
                    assert!(!message.is_empty(), "{msg}");
                }
                FileError::Table { key, .. }
                | FileError::Type { key, .. }
                | FileError::EmptyList { key, .. }
                | FileError::Duplicate { key, .. } => {
                    assert!(msg.contains(&format!("`{key}`")), "{msg}");
                }
            }
            if let FileError::Duplicate { line, first, .. } = e {
                assert!(first <= line, "{msg}");
            }
        }
    }
    // Differential against the full TOML parser.
    if let Ok(table) = text.parse::<toml::Table>() {
        let expected: Option<Vec<(String, Vec<Option<String>>)>> = table
            .iter()
            .map(|(k, v)| expected_values(v).map(|vals| (k.replace('_', "-"), vals)))
            .collect();
        let mut keys: Vec<String> = table.keys().map(|k| k.replace('_', "-")).collect();
        keys.sort();
        let unique = keys.windows(2).all(|w| w[0] != w[1]);
        match expected {
            Some(expected) if unique => {
                let entries = parsed.as_ref().unwrap_or_else(|e| {
                    panic!("TOML reads {table:?} but the config reader refuses: {e}")
                });
                assert_eq!(entries.len(), expected.len());
                for (key, vals) in expected {
                    let e = entries.iter().find(|e| e.key == key).expect("key lost");
                    assert_eq!(e.values.len(), vals.len());
                    for (got, want) in e.values.iter().zip(vals) {
                        if let Some(want) = want {
                            assert_eq!(got, &want, "value of {key}");
                        }
                    }
                }
            }
            _ => assert!(parsed.is_err(), "config reader accepts {table:?}"),
        }
    }
});
