//! `cargo xtask layering`: modules import only modules below them, and no module cycles.
//!
//! The layering is data: ARCHITECTURE.md's "Layering" section has one table per crate
//! (`<!-- layering: CRATE -->`, then `| rank | modules | what |`) giving each top-level module a
//! rank, lowest first. A module may import only modules of strictly lower rank; a module
//! missing from the table is an error, so a new module is placed on purpose.
//!
//! The import graph comes from the sources, read with a small tokenizer (comments and string
//! literals are dropped, so a path in a doc comment or an error message is no import): every
//! `use` tree (groups, `self`, `as`), every `crate::`/`super::`/`self::` path in code and in
//! attributes, and paths that start with a child module's name. `super::X` where the parent
//! re-exports `X` (`pub use error::TraceError`) resolves to the module that defines it, the way
//! the compiler sees it.
//!
//! Test code (`#[cfg(test)]`) counts like any other code, and its imports are marked "(test
//! code)" in the report. A test in a lower module that drives a higher one belongs beside the
//! higher one, where both are in reach; counting it keeps the layering true of everything in
//! `src/`, and the fix (move the assertion) loses no coverage.
//!
//! Cycles are looked for between top-level modules and between the files of each top-level
//! module (`nvme::cmd` ↔ `nvme::geometry`): a cycle of files is one or the other. Edges from a
//! module into its own submodules (`probe` → `probe::report`) are left out: a `mod.rs` declares
//! and re-exports its children, and children reaching up for a shared item (`super::Fact`) is
//! the ordinary Rust facade, not a cycle. Each cycle is shown with one file:line per edge.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    fmt::Write as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use clap::Args;

use crate::setup;

/// The crates checked, each with its crate root (the modules it declares are the graph).
/// gds-user's binaries (`src/main.rs`, `src/bin/**`) are entry points above every module.
const CRATES: &[(&str, &str)] = &[("gds-user", "src/lib.rs"), ("gds-ebpf", "src/main.rs")];

const DOC: &str = "ARCHITECTURE.md";

#[derive(Args, Default)]
pub struct LayeringArgs {
    /// Check this tree instead of the repository (its ARCHITECTURE.md and crate sources).
    #[arg(long)]
    root: Option<PathBuf>,
    /// Also list the imports between top-level modules (one witness each), to place a module.
    #[arg(long)]
    edges: bool,
}

pub fn run(args: LayeringArgs) -> Result<()> {
    let root = args.root.unwrap_or_else(setup::root);
    let (report, failures) = check_repo(&root, args.edges)?;
    print!("{report}");
    if failures > 0 {
        bail!("layering: {failures} problem(s), see above ({DOC}, section \"Layering\")");
    }
    Ok(())
}

/// Checks every crate of [`CRATES`] under `root`: the printed report and the number of
/// failures (rank violations, modules missing from the table, cycles).
pub fn check_repo(root: &Path, list_edges: bool) -> Result<(String, usize)> {
    let doc_path = root.join(DOC);
    let doc = std::fs::read_to_string(&doc_path)
        .with_context(|| format!("read {}", doc_path.display()))?;
    let tables = parse_tables(&doc)?;
    for name in tables.keys() {
        if !CRATES.iter().any(|(c, _)| c == name) {
            bail!(
                "{DOC} has a layering table for {name}, which `cargo xtask layering` does not check"
            );
        }
    }
    let mut out = String::new();
    let mut failures = 0;
    for &(name, root_file) in CRATES {
        let table = tables
            .get(name)
            .with_context(|| format!("{DOC} has no layering table for {name}"))?;
        let files = read_tree(&root.join(name).join("src"))?;
        let krate = Crate::scan(name, root_file, &files)?;
        let result = krate.check(table, list_edges);
        out += &result.text;
        failures += result.failures;
    }
    Ok((out, failures))
}

/// Every `.rs` file under `src`, keyed by its path relative to the crate (`src/trace/mod.rs`).
fn read_tree(src: &Path) -> Result<BTreeMap<PathBuf, String>> {
    fn walk(dir: &Path, rel: &Path, out: &mut BTreeMap<PathBuf, String>) -> Result<()> {
        for entry in std::fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
            let entry = entry?;
            let name = entry.file_name();
            let path = entry.path();
            if entry.file_type()?.is_dir() {
                walk(&path, &rel.join(&name), out)?;
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path)
                    .with_context(|| format!("read {}", path.display()))?;
                out.insert(rel.join(&name), text);
            }
        }
        Ok(())
    }
    let mut out = BTreeMap::new();
    walk(src, Path::new("src"), &mut out)?;
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// ARCHITECTURE.md's tables

/// One crate's table: top-level module → rank.
type Table = BTreeMap<String, u32>;

/// The tables that follow `<!-- layering: CRATE ... -->` markers: the first Markdown table after
/// the marker, header and separator rows skipped, up to the first line that is not a row.
fn parse_tables(doc: &str) -> Result<BTreeMap<String, Table>> {
    let mut tables = BTreeMap::new();
    let mut lines = doc.lines().enumerate().peekable();
    while let Some((n, line)) = lines.next() {
        let Some(rest) = line.trim().strip_prefix("<!-- layering:") else {
            continue;
        };
        let name = rest
            .split_whitespace()
            .next()
            .filter(|s| *s != "-->")
            .with_context(|| format!("{DOC}:{}: layering marker names no crate", n + 1))?
            .to_string();
        while lines.next_if(|(_, l)| l.trim().is_empty()).is_some() {}
        let mut rows = 0;
        let mut table = Table::new();
        while let Some((n, row)) = lines.next_if(|(_, l)| l.trim_start().starts_with('|')) {
            rows += 1;
            let cells: Vec<&str> = row
                .trim()
                .trim_matches('|')
                .split('|')
                .map(str::trim)
                .collect();
            let at = || format!("{DOC}:{}", n + 1);
            if rows == 1 {
                if cells.len() < 2 || cells[0] != "rank" || cells[1] != "modules" {
                    bail!("{}: a layering table starts `| rank | modules | ...`", at());
                }
                continue;
            }
            if rows == 2 {
                continue; // |---|---|
            }
            let rank: u32 = cells[0]
                .parse()
                .with_context(|| format!("{}: rank {:?} is not a number", at(), cells[0]))?;
            for module in cells.get(1).copied().unwrap_or_default().split(',') {
                let module = module.trim().trim_matches('`');
                if module.is_empty() {
                    continue;
                }
                if table.insert(module.to_string(), rank).is_some() {
                    bail!(
                        "{}: {module} appears twice in {name}'s layering table",
                        at()
                    );
                }
            }
        }
        if table.is_empty() {
            bail!(
                "{DOC}:{}: no layering table after the marker for {name}",
                n + 1
            );
        }
        if tables.insert(name.clone(), table).is_some() {
            bail!("{DOC}: two layering tables for {name}");
        }
    }
    Ok(tables)
}

// ---------------------------------------------------------------------------------------------
// Tokens: identifiers, `::` and punctuation; comments dropped, literals reduced to one token.

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    PathSep,
    Punct(char),
    /// A string, char or number literal (contents dropped) or a lifetime.
    Lit,
}

#[derive(Debug, Clone)]
struct Token {
    tok: Tok,
    line: u32,
}

fn lex(src: &str) -> Vec<Token> {
    let c: Vec<char> = src.chars().collect();
    let at = |i: usize| c.get(i).copied().unwrap_or('\0');
    let ident_start = |ch: char| ch.is_alphabetic() || ch == '_';
    let ident_char = |ch: char| ch.is_alphanumeric() || ch == '_';
    let mut out = Vec::new();
    let mut line = 1;
    let mut i = 0;
    // Skips a quoted literal whose opening quote is at `i`; returns the index past its end.
    let quoted = |mut i: usize, quote: char, line: &mut u32| {
        i += 1;
        while i < c.len() && c[i] != quote {
            if c[i] == '\\' {
                i += 1;
            }
            if at(i) == '\n' {
                *line += 1;
            }
            i += 1;
        }
        i + 1
    };
    // A raw string `r#*"…"#*` whose `r` is at `i`, or None when this is no raw string.
    let raw = |i: usize, line: &mut u32| {
        let mut j = i + 1;
        while at(j) == '#' {
            j += 1;
        }
        if at(j) != '"' {
            return None;
        }
        let hashes = j - i - 1;
        j += 1;
        while j < c.len() {
            if c[j] == '"' && (1..=hashes).all(|k| at(j + k) == '#') {
                return Some(j + 1 + hashes);
            }
            if c[j] == '\n' {
                *line += 1;
            }
            j += 1;
        }
        Some(j)
    };
    while i < c.len() {
        let ch = c[i];
        let start_line = line;
        let mut push = |tok| {
            out.push(Token {
                tok,
                line: start_line,
            })
        };
        if ch == '\n' {
            line += 1;
            i += 1;
        } else if ch.is_whitespace() {
            i += 1;
        } else if ch == '/' && at(i + 1) == '/' {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if ch == '/' && at(i + 1) == '*' {
            let mut depth = 0;
            while i < c.len() {
                if c[i] == '/' && at(i + 1) == '*' {
                    depth += 1;
                    i += 2;
                } else if c[i] == '*' && at(i + 1) == '/' {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    if c[i] == '\n' {
                        line += 1;
                    }
                    i += 1;
                }
            }
        } else if ch == '"' {
            i = quoted(i, '"', &mut line);
            push(Tok::Lit);
        } else if ch == 'r'
            && let Some(end) = raw(i, &mut line)
        {
            i = end;
            push(Tok::Lit);
        } else if matches!(ch, 'b' | 'c')
            && at(i + 1) == 'r'
            && let Some(end) = raw(i + 1, &mut line)
        {
            i = end;
            push(Tok::Lit);
        } else if matches!(ch, 'b' | 'c') && at(i + 1) == '"' {
            i = quoted(i + 1, '"', &mut line);
            push(Tok::Lit);
        } else if ch == 'b' && at(i + 1) == '\'' {
            i = quoted(i + 1, '\'', &mut line);
            push(Tok::Lit);
        } else if ch == '\'' {
            if at(i + 1) == '\\' || at(i + 2) == '\'' {
                i = quoted(i, '\'', &mut line); // a char literal
            } else {
                i += 1; // a lifetime or a label
                while ident_char(at(i)) {
                    i += 1;
                }
            }
            push(Tok::Lit);
        } else if ch == 'r' && at(i + 1) == '#' && ident_start(at(i + 2)) {
            let start = i + 2;
            i = start;
            while ident_char(at(i)) {
                i += 1;
            }
            push(Tok::Ident(c[start..i].iter().collect()));
        } else if ident_start(ch) {
            let start = i;
            while ident_char(at(i)) {
                i += 1;
            }
            push(Tok::Ident(c[start..i].iter().collect()));
        } else if ch.is_ascii_digit() {
            while ident_char(at(i)) {
                i += 1;
            }
            push(Tok::Lit);
        } else if ch == ':' && at(i + 1) == ':' {
            i += 2;
            push(Tok::PathSep);
        } else {
            i += 1;
            push(Tok::Punct(ch));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// One file: its module declarations, `use` bindings and path references.

/// A path as written, with where it was written.
#[derive(Debug, Clone)]
struct PathRef {
    /// The module the path is written in, inline modules included (`trace::uring::tests`).
    scope: Vec<String>,
    /// The path's segments (`super`, `TraceError`).
    segs: Vec<String>,
    line: u32,
    /// Inside `#[cfg(test)]` code.
    test: bool,
}

/// What `use` brings into a module: `name` → the path it names.
#[derive(Debug, Clone)]
struct Binding {
    name: String,
    path: PathRef,
}

#[derive(Debug, Default)]
struct FileScan {
    /// `mod x;` declarations: the scope they are in (inline modules of this file) and `x`.
    mod_decls: Vec<(Vec<String>, String)>,
    /// `mod x { … }`: the full path of each inline module.
    inline_mods: Vec<Vec<String>>,
    bindings: Vec<Binding>,
    refs: Vec<PathRef>,
}

/// A `{`, `(` or `[` that is open.
struct Frame {
    close: char,
    /// The inline module this brace opens, if any.
    module: Option<String>,
    test: bool,
}

fn ident(t: Option<&Token>) -> Option<&str> {
    match t.map(|t| &t.tok) {
        Some(Tok::Ident(s)) => Some(s),
        _ => None,
    }
}

fn is_punct(t: Option<&Token>, ch: char) -> bool {
    t.is_some_and(|t| t.tok == Tok::Punct(ch))
}

fn is_sep(t: Option<&Token>) -> bool {
    t.is_some_and(|t| t.tok == Tok::PathSep)
}

/// Whether the attribute whose `[` is at `open` is `cfg(...)` with `test` (and no `not`).
fn is_cfg_test(toks: &[Token], open: usize) -> bool {
    if ident(toks.get(open + 1)) != Some("cfg") {
        return false;
    }
    let mut depth = 0;
    let mut test = false;
    for t in &toks[open..] {
        match &t.tok {
            Tok::Punct('[') => depth += 1,
            Tok::Punct(']') => {
                depth -= 1;
                if depth == 0 {
                    break;
                }
            }
            Tok::Ident(s) if s == "not" => return false,
            Tok::Ident(s) if s == "test" => test = true,
            _ => {}
        }
    }
    test
}

/// Parses the use tree starting at `i` (after `use` or a `{`/`,` of a group) with the
/// segments before it in `prefix`; pushes `(bound name, path, line)` for each leaf (a glob has
/// no name). Returns the index after the tree.
fn use_tree(
    toks: &[Token],
    mut i: usize,
    prefix: &[String],
    out: &mut Vec<(Option<String>, Vec<String>, u32)>,
) -> usize {
    let mut path = prefix.to_vec();
    loop {
        let Some(t) = toks.get(i) else { return i };
        match &t.tok {
            Tok::PathSep => i += 1,
            Tok::Punct('*') => {
                out.push((None, path, t.line));
                return i + 1;
            }
            Tok::Punct('{') => {
                i += 1;
                while i < toks.len() && !is_punct(toks.get(i), '}') {
                    i = use_tree(toks, i, &path, out);
                    if is_punct(toks.get(i), ',') {
                        i += 1;
                    }
                }
                return i + 1;
            }
            Tok::Ident(s) => {
                path.push(s.clone());
                i += 1;
                if is_sep(toks.get(i)) {
                    continue;
                }
                if path.last().is_some_and(|s| s == "self") {
                    path.pop();
                }
                let mut name = path.last().cloned();
                if ident(toks.get(i)) == Some("as") {
                    name = ident(toks.get(i + 1))
                        .filter(|n| *n != "_")
                        .map(String::from);
                    i += 2;
                }
                out.push((name, path, t.line));
                return i;
            }
            _ => return i,
        }
    }
}

fn scan(src: &str, module: &[String]) -> FileScan {
    let toks = lex(src);
    let mut scan = FileScan::default();
    let mut frames: Vec<Frame> = Vec::new();
    // `#[cfg(test)]` seen; the item it gates ends at a `;` or at the `}` of its body, at this
    // nesting depth.
    let mut pending_test: Option<usize> = None;
    let mut file_test = false;
    let mut i = 0;
    while i < toks.len() {
        let scope = || {
            let mut s = module.to_vec();
            s.extend(frames.iter().filter_map(|f| f.module.clone()));
            s
        };
        let test = file_test || pending_test.is_some() || frames.last().is_some_and(|f| f.test);
        let t = &toks[i];
        match &t.tok {
            Tok::Punct('#') => {
                let inner = is_punct(toks.get(i + 1), '!');
                let open = i + 1 + usize::from(inner);
                if is_punct(toks.get(open), '[') && is_cfg_test(&toks, open) {
                    if inner {
                        match frames.last_mut() {
                            Some(f) => f.test = true,
                            None => file_test = true,
                        }
                    } else if pending_test.is_none() {
                        pending_test = Some(frames.len());
                    }
                }
                i += 1;
            }
            Tok::Punct(open @ ('{' | '(' | '[')) => {
                let module = (*open == '{' && ident(toks.get(i.wrapping_sub(2))) == Some("mod"))
                    .then(|| ident(toks.get(i - 1)).map(String::from))
                    .flatten();
                if let Some(m) = &module {
                    let mut path = scope();
                    path.push(m.clone());
                    scan.inline_mods.push(path);
                }
                let gated = *open == '{' && pending_test == Some(frames.len());
                if gated {
                    pending_test = None;
                }
                frames.push(Frame {
                    close: match open {
                        '{' => '}',
                        '(' => ')',
                        _ => ']',
                    },
                    module,
                    test: test || gated,
                });
                i += 1;
            }
            Tok::Punct(close @ ('}' | ')' | ']')) => {
                // Unbalanced input (a macro's odd tokens) must not end the scan.
                if frames.last().is_some_and(|f| f.close == *close) {
                    frames.pop();
                }
                i += 1;
            }
            Tok::Punct(';') => {
                if pending_test == Some(frames.len()) {
                    pending_test = None;
                }
                i += 1;
            }
            Tok::Ident(kw) if kw == "mod" => {
                if let Some(name) = ident(toks.get(i + 1))
                    && is_punct(toks.get(i + 2), ';')
                {
                    scan.mod_decls
                        .push((scope()[module.len()..].to_vec(), name.to_string()));
                }
                i += 1;
            }
            Tok::Ident(kw) if kw == "use" => {
                let mut leaves = Vec::new();
                i = use_tree(&toks, i + 1, &[], &mut leaves);
                let scope = scope();
                for (name, segs, line) in leaves {
                    let path = PathRef {
                        scope: scope.clone(),
                        segs,
                        line,
                        test,
                    };
                    if let Some(name) = name {
                        scan.bindings.push(Binding {
                            name,
                            path: path.clone(),
                        });
                    }
                    scan.refs.push(path);
                }
                // The `;` ends a `#[cfg(test)] use …;`.
                if pending_test == Some(frames.len()) && is_punct(toks.get(i), ';') {
                    pending_test = None;
                }
            }
            Tok::Ident(first)
                if is_sep(toks.get(i + 1)) && !is_sep(toks.get(i.wrapping_sub(1))) =>
            {
                let mut segs = vec![first.trim_start_matches('$').to_string()];
                let mut j = i + 1;
                while is_sep(toks.get(j))
                    && let Some(s) = ident(toks.get(j + 1))
                {
                    segs.push(s.to_string());
                    j += 2;
                }
                // `pub(in crate::x)` names a visibility, not a dependency.
                let visibility = ident(toks.get(i.wrapping_sub(1))) == Some("in")
                    && is_punct(toks.get(i.wrapping_sub(2)), '(');
                if !visibility {
                    scan.refs.push(PathRef {
                        scope: scope(),
                        segs,
                        line: t.line,
                        test,
                    });
                }
                i = j;
            }
            _ => i += 1,
        }
    }
    scan
}

// ---------------------------------------------------------------------------------------------
// A crate: its modules and the edges between them.

/// A reference from one file-level module to another.
#[derive(Debug, Clone)]
struct Edge {
    from: String,
    to: String,
    file: PathBuf,
    line: u32,
    /// The path as it resolves from `crate` (`crate::agent::DEFAULT_LISTEN`).
    path: String,
    test: bool,
}

struct Crate {
    name: String,
    /// File-level modules (`trace::uring`; the crate root is ``) → their file.
    files: BTreeMap<String, PathBuf>,
    /// Every module, inline ones included → the file-level module holding it.
    modules: HashMap<Vec<String>, String>,
    /// Per module (inline ones included): names brought in by `use` → the paths they name.
    bindings: HashMap<Vec<String>, HashMap<String, PathRef>>,
    refs: Vec<(PathBuf, String, PathRef)>,
}

fn join(path: &[String]) -> String {
    path.join("::")
}

fn top(module: &str) -> &str {
    module.split("::").next().unwrap_or_default()
}

impl Crate {
    /// Reads the crate from `files` (path relative to the crate → source), starting at its root
    /// file and following `mod x;` declarations.
    fn scan(name: &str, root_file: &str, files: &BTreeMap<PathBuf, String>) -> Result<Crate> {
        let mut krate = Crate {
            name: name.to_string(),
            files: BTreeMap::new(),
            modules: HashMap::new(),
            bindings: HashMap::new(),
            refs: Vec::new(),
        };
        let mut queue = VecDeque::from([(Vec::<String>::new(), PathBuf::from(root_file))]);
        while let Some((module, file)) = queue.pop_front() {
            let src = files
                .get(&file)
                .with_context(|| format!("{name}: {} not found", file.display()))?;
            let scan = scan(src, &module);
            let module_name = join(&module);
            // Children of `a/b.rs` live in `a/b/`; of `a/mod.rs` and of the root, in `a/`.
            let dir = file.parent().unwrap_or(Path::new("")).to_path_buf();
            let stem = file
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or_default();
            let children_dir = if module.is_empty() || stem == "mod" {
                dir
            } else {
                dir.join(stem)
            };
            for (inline, child) in &scan.mod_decls {
                let dir = inline.iter().fold(children_dir.clone(), |d, m| d.join(m));
                let flat = dir.join(format!("{child}.rs"));
                let nested = dir.join(child).join("mod.rs");
                let child_file = [flat, nested]
                    .into_iter()
                    .find(|f| files.contains_key(f))
                    .with_context(|| {
                        let (file, dir) = (file.display(), dir.display());
                        format!(
                            "{name}: module {child} declared in {file} has no file \
                             ({dir}/{child}.rs or {dir}/{child}/mod.rs)"
                        )
                    })?;
                let mut path = module.clone();
                path.extend(inline.iter().cloned());
                path.push(child.clone());
                queue.push_back((path, child_file));
            }
            krate.modules.insert(module.clone(), module_name.clone());
            for inline in scan.inline_mods {
                krate.modules.insert(inline, module_name.clone());
            }
            for b in scan.bindings {
                krate
                    .bindings
                    .entry(b.path.scope.clone())
                    .or_default()
                    .entry(b.name)
                    .or_insert(b.path);
            }
            for r in scan.refs {
                krate.refs.push((file.clone(), module_name.clone(), r));
            }
            krate.files.insert(module_name, file);
        }
        Ok(krate)
    }

    /// The absolute path (from `crate`) that `r` names, or None for paths outside the crate
    /// (`std::…`, another crate) and for `super` above the root.
    fn absolute(&self, r: &PathRef) -> Option<Vec<String>> {
        let mut segs = r.segs.iter().peekable();
        let mut abs = match segs.peek()?.as_str() {
            "crate" => {
                segs.next();
                Vec::new()
            }
            "self" | "super" => {
                let mut abs = r.scope.clone();
                segs.next_if(|s| *s == "self");
                while segs.next_if(|s| *s == "super").is_some() {
                    abs.pop()?;
                }
                abs
            }
            child => {
                let mut abs = r.scope.clone();
                abs.push(child.to_string());
                if !self.modules.contains_key(&abs) {
                    return None;
                }
                segs.next();
                abs
            }
        };
        abs.extend(segs.cloned());
        Some(abs)
    }

    /// The file-level module that defines what `abs` names: the longest prefix that is a
    /// module, followed through `use` re-exports of the next segment.
    fn target(&self, abs: &[String], depth: u32) -> String {
        let mut k = abs.len();
        while !self.modules.contains_key(&abs[..k]) {
            k -= 1; // `[]`, the crate root, is always a module
        }
        let module = &abs[..k];
        if depth < 16
            && let Some(name) = abs.get(k)
            && let Some(via) = self.bindings.get(module).and_then(|b| b.get(name))
            && let Some(mut next) = self.absolute(via)
        {
            next.extend(abs[k + 1..].iter().cloned());
            if next != abs {
                return self.target(&next, depth + 1);
            }
        }
        self.modules[module].clone()
    }

    /// Every reference from one file-level module to another, in source order.
    fn edges(&self) -> Vec<Edge> {
        let mut edges = Vec::new();
        for (file, from, r) in &self.refs {
            let Some(abs) = self.absolute(r) else {
                continue;
            };
            let to = self.target(&abs, 0);
            // The root only declares modules; a glob of it (`use super::*` in a top-level
            // module) brings nothing to check.
            if to == *from || to.is_empty() {
                continue;
            }
            let mut path = String::from("crate");
            for s in &abs {
                path += "::";
                path += s;
            }
            edges.push(Edge {
                from: from.clone(),
                to,
                file: file.clone(),
                line: r.line,
                path,
                test: r.test,
            });
        }
        edges
    }

    fn check(&self, table: &Table, list_edges: bool) -> Outcome {
        let mut text = String::new();
        let mut failures = 0;
        let name = &self.name;
        let loc = |e: &Edge| {
            let test = if e.test { " (test code)" } else { "" };
            format!("{name}/{}:{}{test}", e.file.display(), e.line)
        };
        let edges = self.edges();

        // Every top-level module has a rank.
        let tops: BTreeSet<&str> = self
            .files
            .keys()
            .map(|m| top(m))
            .filter(|m| !m.is_empty())
            .collect();
        for m in &tops {
            if !table.contains_key(*m) {
                failures += 1;
                let _ = writeln!(
                    text,
                    "error: module {m} is not in {DOC}'s layering table for {name}: add it"
                );
            }
        }
        let planned: Vec<&str> = table
            .keys()
            .map(String::as_str)
            .filter(|m| !tops.contains(m))
            .collect();

        // Ranks: strictly downwards between top-level modules. One message per line of source
        // and module imported (a grouped `use` names several items).
        let ranked = |a: &str, b: &str| match (table.get(a), table.get(b)) {
            (Some(ra), Some(rb)) if ra <= rb => Some((*ra, *rb)),
            _ => None,
        };
        let mut upward: BTreeMap<(&Path, u32, &str), Vec<&Edge>> = BTreeMap::new();
        for e in &edges {
            let (a, b) = (top(&e.from), top(&e.to));
            if a != b && ranked(a, b).is_some() {
                upward.entry((&e.file, e.line, b)).or_default().push(e);
            }
        }
        for group in upward.values() {
            let e = group[0];
            let (a, b) = (top(&e.from), top(&e.to));
            let Some((ra, rb)) = ranked(a, b) else {
                continue;
            };
            let paths: Vec<String> = group.iter().map(|e| format!("`{}`", e.path)).collect();
            failures += 1;
            let _ = writeln!(
                text,
                "error: {}: {a} (rank {ra}) imports {b} (rank {rb}) through {}: a module may \
                 import only modules of lower rank",
                loc(e),
                paths.join(", "),
            );
        }

        // Two graphs, one witness per edge (code rather than a test where both import):
        // top-level modules, and the file-level modules inside each top-level module. A
        // file-level cycle either stays inside one top-level module or passes through several,
        // and then it is a cycle between top-level modules too.
        let mut pairs = BTreeSet::new();
        let mut between: Graph = BTreeMap::new();
        let mut inside: Graph = BTreeMap::new();
        for e in &edges {
            pairs.insert((e.from.as_str(), e.to.as_str()));
            let (a, b) = (top(&e.from), top(&e.to));
            let (graph, from, to) = if a != b {
                (&mut between, a, b)
            } else if !e.to.starts_with(&format!("{}::", e.from)) {
                (&mut inside, e.from.as_str(), e.to.as_str())
            } else {
                continue; // into its own submodule: the facade, see the module comment
            };
            if from.is_empty() {
                continue; // the crate root declares the modules
            }
            let witness = graph.entry(from).or_default().entry(to).or_insert(e);
            if witness.test && !e.test {
                *witness = e;
            }
        }
        let mut cycles = 0;
        // Between top-level modules, each cycle contains an import against the ranks: show the
        // shortest cycle through each of those first.
        let against: Vec<(&str, &str)> = between
            .iter()
            .flat_map(|(a, outs)| outs.keys().map(move |b| (*a, *b)))
            .filter(|(a, b)| ranked(a, b).is_some())
            .collect();
        let all_ranked = tops.iter().all(|m| table.contains_key(*m));
        for (graph, is_inside) in [(&between, false), (&inside, true)] {
            let first = if is_inside { &[][..] } else { &against[..] };
            for cycle in find_cycles(graph, first, is_inside || !all_ranked) {
                cycles += 1;
                failures += 1;
                let what = if is_inside {
                    format!("inside {}", top(cycle[0]))
                } else {
                    "between top-level modules".to_string()
                };
                let _ = writeln!(
                    text,
                    "error: cycle {what}: {} -> {}",
                    cycle.join(" -> "),
                    cycle[0]
                );
                for (k, a) in cycle.iter().enumerate() {
                    let b = cycle[(k + 1) % cycle.len()];
                    let e = graph[a][b];
                    let _ = writeln!(text, "    {a} -> {b}: {} `{}`", loc(e), e.path);
                }
            }
        }

        if list_edges {
            let rank = |m: &str| table.get(m).map_or("?".to_string(), u32::to_string);
            for (a, outs) in &between {
                for (b, e) in outs {
                    let _ = writeln!(
                        text,
                        "{name}: {a} ({}) -> {b} ({}): {} `{}`",
                        rank(a),
                        rank(b),
                        loc(e),
                        e.path
                    );
                }
            }
        }
        let _ = writeln!(
            text,
            "{name}: {} modules ({} top-level), {} edges between modules ({} between top-level \
             modules), {cycles} cycle(s), {failures} problem(s){}",
            self.files.len() - 1,
            tops.len(),
            pairs.len(),
            between.values().map(BTreeMap::len).sum::<usize>(),
            if planned.is_empty() {
                String::new()
            } else {
                format!(
                    "; in the table, not yet in the code: {}",
                    planned.join(", ")
                )
            }
        );
        Outcome { text, failures }
    }
}

struct Outcome {
    text: String,
    failures: usize,
}

/// Module → module it imports → one place it does.
type Graph<'a> = BTreeMap<&'a str, BTreeMap<&'a str, &'a Edge>>;

/// Cycles, each as its modules in order: first the shortest cycle through each edge of `first`
/// that lies on one; then, with `cover`, for each module in name order not yet on a cycle
/// shown, the shortest cycle through it (so every module on a cycle is on one shown). Between
/// ranked modules every cycle holds an import against the ranks, so the first part suffices
/// there: once those imports go, no cycle is left.
fn find_cycles<'a>(
    graph: &Graph<'a>,
    first: &[(&'a str, &'a str)],
    cover: bool,
) -> Vec<Vec<&'a str>> {
    // The shortest path from `start` to a module with an edge to `goal` (`goal` itself may
    // be `start`): its modules, `start` first.
    let bfs = |start: &'a str, goal: &'a str| -> Option<Vec<&'a str>> {
        let mut prev: HashMap<&str, &'a str> = HashMap::new();
        let mut queue = VecDeque::from([start]);
        while let Some(n) = queue.pop_front() {
            for &m in graph.get(n).into_iter().flat_map(BTreeMap::keys) {
                if m == goal {
                    let mut path = vec![n];
                    while let Some(&p) = prev.get(path.last()?) {
                        path.push(p);
                    }
                    path.reverse();
                    return Some(path);
                }
                if m != start && !prev.contains_key(m) {
                    prev.insert(m, n);
                    queue.push_back(m);
                }
            }
        }
        None
    };
    let mut cycles: Vec<Vec<&'a str>> = Vec::new();
    let on_shown = |cycles: &[Vec<&'a str>], a: &str, b: Option<&str>| {
        cycles
            .iter()
            .any(|c| (0..c.len()).any(|k| c[k] == a && b.is_none_or(|b| c[(k + 1) % c.len()] == b)))
    };
    for &(a, b) in first {
        if !on_shown(&cycles, a, Some(b))
            && let Some(back) = bfs(b, a)
        {
            let mut cycle = vec![a];
            cycle.extend(back);
            cycles.push(cycle);
        }
    }
    for &n in graph.keys().filter(|_| cover) {
        if !on_shown(&cycles, n, None)
            && let Some(cycle) = bfs(n, n)
        {
            cycles.push(cycle);
        }
    }
    cycles
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(files: &[(&str, &str)]) -> BTreeMap<PathBuf, String> {
        files
            .iter()
            .map(|(p, s)| (PathBuf::from(p), s.to_string()))
            .collect()
    }

    fn table(ranks: &[(&str, u32)]) -> Table {
        ranks.iter().map(|(m, r)| (m.to_string(), *r)).collect()
    }

    fn check(files: &[(&str, &str)], ranks: &[(&str, u32)]) -> Outcome {
        Crate::scan("c", "src/lib.rs", &tree(files))
            .unwrap()
            .check(&table(ranks), false)
    }

    /// `(from, to, line, test)` of every edge, in source order.
    fn edges(files: &[(&str, &str)]) -> Vec<(String, String, u32, bool)> {
        Crate::scan("c", "src/lib.rs", &tree(files))
            .unwrap()
            .edges()
            .into_iter()
            .map(|e| (e.from, e.to, e.line, e.test))
            .collect()
    }

    fn edge(from: &str, to: &str, line: u32) -> (String, String, u32, bool) {
        (from.into(), to.into(), line, false)
    }

    #[test]
    fn grouped_nested_use_trees() {
        let s = scan(
            "use crate::{a, b::{c, d as e, self, f::{g, *}}, h as _};\nuse std::io;\n",
            &["m".to_string()],
        );
        let refs: Vec<String> = s.refs.iter().map(|r| r.segs.join("::")).collect();
        assert_eq!(
            refs,
            [
                "crate::a",
                "crate::b::c",
                "crate::b::d",
                "crate::b",
                "crate::b::f::g",
                "crate::b::f",
                "crate::h",
                "std::io"
            ]
        );
        let names: Vec<&str> = s.bindings.iter().map(|b| b.name.as_str()).collect();
        assert_eq!(names, ["a", "c", "e", "b", "g", "io"]);
        assert!(s.refs.iter().all(|r| r.scope == ["m"]));
    }

    #[test]
    fn comments_strings_and_chars_are_not_imports() {
        let src = r###"//! Uses [`crate::agent`] (a doc link).
/// crate::agent::X in a doc comment
/* crate::agent /* nested */ crate::agent */
/** crate::agent */
fn f<'a>(x: &'a str) -> &'static str {
    let _ = "crate::agent::DEFAULT_LISTEN";
    let _ = r#"crate::agent "quoted" "#;
    let _ = b"crate::agent";
    let _ = ('"', '\'', b'"', '\u{22}');
    let _ = "escaped \" crate::agent";
    crate::units::parse(x) // crate::agent
}
"###;
        let s = scan(src, &["m".to_string()]);
        let refs: Vec<(String, u32)> = s.refs.iter().map(|r| (r.segs.join("::"), r.line)).collect();
        assert_eq!(refs, [("crate::units::parse".to_string(), 11)]);
    }

    #[test]
    fn super_self_and_reexports_resolve_to_the_defining_file() {
        let files = [
            ("src/lib.rs", "pub mod trace;\npub mod units;\n"),
            ("src/units.rs", "pub fn f() {}\n"),
            (
                "src/trace/mod.rs",
                "mod error;\nmod uring;\npub use error::TraceError;\npub use crate::units::f as g;\n",
            ),
            ("src/trace/error.rs", "pub struct TraceError;\n"),
            (
                "src/trace/uring.rs",
                "use super::TraceError;\n\
                 fn x() { super::g(); self::y(); }\n\
                 fn y() {}\n\
                 #[cfg(test)]\n\
                 mod tests {\n\
                     use super::*;\n\
                     fn t() { super::y(); super::super::error::TraceError; }\n\
                 }\n",
            ),
        ];
        assert_eq!(
            edges(&files),
            [
                edge("trace", "trace::error", 3),
                edge("trace", "units", 4),
                edge("trace::uring", "trace::error", 1),
                // `super::g` is `crate::units::f` re-exported by `trace`.
                edge("trace::uring", "units", 2),
                ("trace::uring".into(), "trace::error".into(), 7, true),
            ]
        );
    }

    #[test]
    fn child_module_paths_and_inline_modules() {
        let files = [
            ("src/lib.rs", "mod nvme;\n"),
            (
                "src/nvme/mod.rs",
                "mod cmd;\nfn f() { cmd::opcode::READ; }\nmod inner { mod deep; }\n",
            ),
            (
                "src/nvme/cmd.rs",
                "pub mod opcode { pub const READ: u8 = 2; }\nfn g() { opcode::READ; }\n",
            ),
            (
                "src/nvme/inner/deep.rs",
                "use crate::nvme::cmd::opcode::READ;\n",
            ),
        ];
        assert_eq!(
            edges(&files),
            [
                edge("nvme", "nvme::cmd", 2),
                edge("nvme::inner::deep", "nvme::cmd", 1),
            ]
        );
    }

    #[test]
    fn planted_back_edge_fails_naming_file_line_import_and_ranks() {
        let files = [
            ("src/lib.rs", "mod agent;\nmod btf;\n"),
            ("src/agent.rs", "use crate::btf::Btf;\n"),
            (
                "src/btf.rs",
                "pub struct Btf;\n\nuse crate::agent::{RunArgs, run};\n",
            ),
        ];
        let out = check(&files, &[("btf", 0), ("agent", 1)]);
        assert_eq!(
            out.text.lines().next().unwrap(),
            "error: c/src/btf.rs:3: btf (rank 0) imports agent (rank 1) through \
             `crate::agent::RunArgs`, `crate::agent::run`: a module may import only modules of \
             lower rank"
        );
        assert!(out.text.contains(
            "error: cycle between top-level modules: btf -> agent -> btf\n    \
             btf -> agent: c/src/btf.rs:3 `crate::agent::RunArgs`\n    \
             agent -> btf: c/src/agent.rs:1 `crate::btf::Btf`\n"
        ));
        assert_eq!(out.failures, 2);
    }

    #[test]
    fn same_rank_imports_fail_too() {
        let files = [
            ("src/lib.rs", "mod datapath;\nmod trace;\n"),
            ("src/datapath.rs", "fn f() { crate::trace::attach(); }\n"),
            ("src/trace.rs", "pub fn attach() {}\n"),
        ];
        let out = check(&files, &[("datapath", 4), ("trace", 4)]);
        assert!(
            out.text.contains(
                "datapath (rank 4) imports trace (rank 4) through `crate::trace::attach`"
            )
        );
        assert_eq!(out.failures, 1);
    }

    #[test]
    fn planted_cycle_between_submodules_is_found() {
        let files = [
            ("src/lib.rs", "mod nvme;\n"),
            ("src/nvme/mod.rs", "mod a;\nmod b;\nmod c;\npub use b::B;\n"),
            ("src/nvme/a.rs", "use super::B;\npub struct A;\n"),
            (
                "src/nvme/b.rs",
                "pub struct B;\nfn f() { super::c::g(); }\n",
            ),
            (
                "src/nvme/c.rs",
                "pub fn g() {}\n#[cfg(test)]\nmod tests {\n    use crate::nvme::a::A;\n}\n",
            ),
        ];
        let out = check(&files, &[("nvme", 0)]);
        assert_eq!(
            out.text,
            "error: cycle inside nvme: nvme::a -> nvme::b -> nvme::c -> nvme::a\n    \
             nvme::a -> nvme::b: c/src/nvme/a.rs:1 `crate::nvme::B`\n    \
             nvme::b -> nvme::c: c/src/nvme/b.rs:2 `crate::nvme::c::g`\n    \
             nvme::c -> nvme::a: c/src/nvme/c.rs:4 (test code) `crate::nvme::a::A`\n\
             c: 4 modules (1 top-level), 4 edges between modules (0 between top-level modules), \
             1 cycle(s), 1 problem(s)\n"
        );
    }

    #[test]
    fn clean_tree_passes() {
        let files = [
            (
                "src/lib.rs",
                "pub mod units;\npub mod trace;\npub mod http;\n",
            ),
            ("src/units.rs", "pub fn parse() {}\n"),
            ("src/trace/mod.rs", "mod uring;\npub use uring::Tracer;\n"),
            (
                "src/trace/uring.rs",
                "pub struct Tracer;\nfn f() { crate::units::parse(); }\n",
            ),
            (
                "src/http.rs",
                "use crate::{trace::Tracer, units};\n\
                 /// Not [`crate::http`]'s job: see crate::top.\n\
                 fn f() { let _ = \"crate::top\"; }\n",
            ),
        ];
        let out = check(
            &files,
            &[("units", 0), ("trace", 1), ("http", 2), ("top", 3)],
        );
        assert_eq!(
            out.text,
            "c: 4 modules (3 top-level), 4 edges between modules (3 between top-level modules), \
             0 cycle(s), 0 problem(s); in the table, not yet in the code: top\n"
        );
        assert_eq!(out.failures, 0);
    }

    #[test]
    fn module_missing_from_the_table_is_an_error() {
        let files = [
            ("src/lib.rs", "mod units;\nmod model;\n"),
            ("src/units.rs", ""),
            ("src/model.rs", ""),
        ];
        let out = check(&files, &[("units", 0)]);
        assert!(out.text.starts_with(
            "error: module model is not in ARCHITECTURE.md's layering table for c: add it\n"
        ));
        assert_eq!(out.failures, 1);
    }

    #[test]
    fn tables_are_read_between_marker_and_end_of_table() {
        let doc = "# Arch\n\n| rank | modules | what |\n|---|---|---|\n| 9 | other | x |\n\n\
                   <!-- layering: gds-user (checked) -->\n\
                   | rank | modules | what |\n|---|---|---|\n\
                   | 0 | units, `btf` | foundations |\n| 1 | trace | tracing |\n\
                   \nA paragraph.\n| 5 | after | not part of it |\n";
        let tables = parse_tables(doc).unwrap();
        assert_eq!(tables.len(), 1);
        assert_eq!(
            tables["gds-user"],
            table(&[("units", 0), ("btf", 0), ("trace", 1)])
        );
        let twice = "<!-- layering: x -->\n| rank | modules |\n|-|-|\n| 0 | a |\n| 1 | a |\n";
        assert!(parse_tables(twice).is_err());
        let bad = "<!-- layering: x -->\n| rank | modules |\n|-|-|\n| one | a |\n";
        assert!(parse_tables(bad).is_err());
    }

    /// The real gds-user with `use crate::agent::RunArgs;` added to btf.rs: the check names it.
    #[test]
    fn planted_back_edge_in_the_real_tree_fails() {
        let root = setup::root();
        let doc = std::fs::read_to_string(root.join(DOC)).unwrap();
        let table = &parse_tables(&doc).unwrap()["gds-user"];
        let mut files = read_tree(&root.join("gds-user/src")).unwrap();
        let btf = files.get_mut(Path::new("src/btf.rs")).unwrap();
        let line = btf.lines().count() + 1;
        btf.push_str("use crate::agent::RunArgs;\n");
        let krate = Crate::scan("gds-user", "src/lib.rs", &files).unwrap();
        let out = krate.check(table, false);
        let expected = format!(
            "error: gds-user/src/btf.rs:{line}: btf (rank {}) imports agent (rank {}) through \
             `crate::agent::RunArgs`: a module may import only modules of lower rank\n",
            table["btf"], table["agent"]
        );
        assert!(out.text.contains(&expected), "{}", out.text);
    }
}
