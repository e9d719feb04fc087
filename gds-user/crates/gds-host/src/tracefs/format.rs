//! The pure part of tracefs: parsing `events/<category>/<name>/format` text into fields.
//! Self-contained (std only): the fuzz target (`fuzz/fuzz_targets/tracepoint_format.rs`)
//! depends on gds-host alone: no eBPF build, tokio or metrics.

/// One field of a tracepoint record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    pub name: String,
    pub offset: u32,
    pub size: u32,
}

/// A parsed `events/<category>/<name>/format` file.
#[derive(Debug, Clone)]
pub struct EventFormat {
    pub category: String,
    pub name: String,
    pub fields: Vec<Field>,
}

impl EventFormat {
    /// Parses the text of a format file; on error returns the offending line.
    pub fn parse(category: &str, name: &str, text: &str) -> Result<EventFormat, String> {
        let mut fields = Vec::new();
        for line in text.lines() {
            let line = line.trim();
            let Some(rest) = line.strip_prefix("field:") else {
                continue;
            };
            // field:<decl>;\toffset:<n>;\tsize:<n>;\tsigned:<n>;
            let mut decl = None;
            let mut offset = None;
            let mut size = None;
            for (i, part) in rest.split(';').enumerate() {
                let part = part.trim();
                if i == 0 {
                    decl = Some(part);
                } else if let Some(v) = part.strip_prefix("offset:") {
                    offset = v.trim().parse::<u32>().ok();
                } else if let Some(v) = part.strip_prefix("size:") {
                    size = v.trim().parse::<u32>().ok();
                }
            }
            let (Some(decl), Some(offset), Some(size)) = (decl, offset, size) else {
                return Err(line.to_owned());
            };
            // The field's end must be addressable: the record is read at offset..offset+size.
            if offset.checked_add(size).is_none() {
                return Err(line.to_owned());
            }
            // "unsigned char common_type", "char disk[32]", "__data_loc char[] op_str"
            let last = decl
                .split_whitespace()
                .last()
                .ok_or_else(|| line.to_owned())?;
            let name = last
                .split('[')
                .next()
                .unwrap_or(last)
                .trim_start_matches('*')
                .to_owned();
            if name.is_empty() {
                return Err(line.to_owned());
            }
            fields.push(Field { name, offset, size });
        }
        if fields.is_empty() {
            return Err("no fields".into());
        }
        Ok(EventFormat {
            category: category.into(),
            name: name.into(),
            fields,
        })
    }
}
