//! Fuzzes the tracefs format-file parser (`gds-user/crates/gds-host/src/tracefs/format.rs`, the text of
//! `/sys/kernel/tracing/events/<category>/<name>/format`), which the classic-tracepoint
//! attach path takes record offsets from.
//!
//! Properties: never panics; an accepted file has one field per `field:` line, each with a
//! non-empty C identifier-ish name taken from that line, and an offset + size that fits in u32
//! (the record layout is addressed with them); rendering the fields back into a format file
//! parses to the same fields; a refusal names the offending `field:` line (or "no fields").
//! gds-host is used as a crate (no eBPF build).
#![no_main]

use libfuzzer_sys::fuzz_target;

use gds_host::tracefs::{EventFormat, Field};

fn render(fields: &[Field]) -> String {
    let mut s = String::from("name: fuzz\nID: 1\nformat:\n");
    for f in fields {
        s.push_str(&format!(
            "\tfield:unsigned int {};\toffset:{};\tsize:{};\tsigned:0;\n",
            f.name, f.offset, f.size
        ));
    }
    s.push_str("\nprint fmt: \"\"\n");
    s
}

fuzz_target!(|data: &[u8]| {
    // The agent reads the file with read_to_string (UTF-8 or an error); lossy decoding still
    // reaches the parser with every byte pattern it could see.
    let text = String::from_utf8_lossy(data);
    let field_lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("field:"))
        .collect();
    let parsed = EventFormat::parse("io_uring", "io_uring_submit_req", &text);
    match &parsed {
        Ok(f) => {
            assert_eq!(f.category, "io_uring");
            assert_eq!(f.name, "io_uring_submit_req");
            assert!(!f.fields.is_empty());
            assert_eq!(
                f.fields.len(),
                field_lines.len(),
                "a field: line was skipped"
            );
            for (field, line) in f.fields.iter().zip(&field_lines) {
                assert!(!field.name.is_empty());
                assert!(
                    !field
                        .name
                        .contains(|c: char| c.is_whitespace() || c == '[' || c == ';'),
                    "name {:?}",
                    field.name
                );
                assert!(!field.name.starts_with('*'), "name {:?}", field.name);
                // The name is what the line declared, before the first ';'.
                let decl = line["field:".len()..].split(';').next().unwrap();
                assert!(
                    decl.contains(field.name.as_str()),
                    "{:?} not in {line:?}",
                    field.name
                );
                assert!(
                    field.offset.checked_add(field.size).is_some(),
                    "offset {} + size {} overflows",
                    field.offset,
                    field.size
                );
            }
            // Rendering the fields back gives the same fields.
            let again = EventFormat::parse("io_uring", "io_uring_submit_req", &render(&f.fields))
                .expect("re-rendered format refused");
            assert_eq!(again.fields, f.fields);
        }
        Err(line) => {
            assert!(
                line == "no fields" || field_lines.contains(&line.as_str()),
                "error {line:?} is not a field: line of the input"
            );
            if line == "no fields" {
                assert!(field_lines.is_empty());
            }
        }
    }
    // Parsing is a pure function of the text.
    let twice = EventFormat::parse("io_uring", "io_uring_submit_req", &text);
    assert_eq!(parsed.map(|f| f.fields), twice.map(|f| f.fields));
});
