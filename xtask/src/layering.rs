//! `cargo xtask layering`: what the crate graph cannot say for itself.
//!
//! The layering is the crate graph: a crate can only use what it depends on, and Cargo refuses
//! cycles. Two things Cargo cannot check are checked here:
//!
//! - **ARCHITECTURE.md tells the graph as it is.** Its crate table (`<!-- crates -->`, then
//!   `| crate | depends on | what |`) lists every workspace crate and the workspace crates it
//!   depends on (normal dependencies). A crate missing from the table, or a dependency added
//!   or dropped without the table, is an error: a new arrow between layers is drawn on purpose.
//! - **No crate compiles another's source.** A `#[path]` attribute that reaches out of its own
//!   crate's folder would let code cross the graph without a dependency.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use clap::Args;

use crate::setup;

const DOC: &str = "ARCHITECTURE.md";
const MARKER: &str = "<!-- crates -->";

#[derive(Args, Default)]
pub struct LayeringArgs {
    /// Check this tree instead of the repository.
    #[arg(long)]
    root: Option<PathBuf>,
}

pub fn run(args: LayeringArgs) -> Result<()> {
    let root = args.root.unwrap_or_else(setup::root);
    let doc = std::fs::read_to_string(root.join(DOC)).with_context(|| format!("reading {DOC}"))?;
    let table = crate_table(&doc)?;
    let (graph, dirs) = crate_graph(&root)?;
    let mut problems = compare(&table, &graph);
    for (name, dir) in &dirs {
        problems.extend(path_escapes(name, dir)?);
    }
    // The fuzz targets are a workspace of their own: they may use crates, never their files.
    let fuzz = root.join("fuzz");
    if fuzz.is_dir() {
        problems.extend(path_escapes("gds-fuzz", &fuzz)?);
    }
    for p in &problems {
        println!("layering: {p}");
    }
    if !problems.is_empty() {
        bail!(
            "layering: {} problem(s) ({DOC}, section \"Crates\")",
            problems.len()
        );
    }
    println!(
        "layering: {} crates, as {DOC} draws them; no #[path] out of a crate",
        graph.len()
    );
    Ok(())
}

type Graph = BTreeMap<String, BTreeSet<String>>;

/// The rows of the crate table: crate → the workspace crates it depends on.
fn crate_table(doc: &str) -> Result<Graph> {
    let start = doc
        .find(MARKER)
        .with_context(|| format!("{DOC} has no {MARKER} table"))?;
    let mut rows = Graph::new();
    for line in doc[start + MARKER.len()..]
        .lines()
        .skip_while(|l| l.trim().is_empty())
        .skip(2)
        .take_while(|l| l.starts_with('|'))
    {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let [_, name, deps, ..] = cells.as_slice() else {
            bail!("{DOC}: malformed crate row: {line}");
        };
        let deps = deps
            .split(',')
            .map(|d| d.trim().trim_matches('`'))
            .filter(|d| !d.is_empty() && *d != "–" && *d != "-")
            .map(str::to_owned)
            .collect();
        rows.insert(name.trim_matches('`').to_owned(), deps);
    }
    if rows.is_empty() {
        bail!("{DOC}: the crate table after {MARKER} has no rows");
    }
    Ok(rows)
}

/// The workspace's crates, their normal dependencies on each other, and their folders, from
/// `cargo metadata`.
fn crate_graph(root: &Path) -> Result<(Graph, BTreeMap<String, PathBuf>)> {
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(root)
        .output()
        .context("running cargo metadata")?;
    if !out.status.success() {
        bail!("cargo metadata: {}", String::from_utf8_lossy(&out.stderr));
    }
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let packages = meta["packages"]
        .as_array()
        .context("cargo metadata: no packages")?;
    let names: BTreeSet<&str> = packages.iter().filter_map(|p| p["name"].as_str()).collect();
    let (mut graph, mut dirs) = (Graph::new(), BTreeMap::new());
    for p in packages {
        let name = p["name"].as_str().unwrap_or_default().to_owned();
        let deps = p["dependencies"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|d| d["kind"].is_null())
            .filter_map(|d| d["name"].as_str())
            .filter(|d| names.contains(d))
            .map(str::to_owned)
            .collect();
        let manifest = PathBuf::from(p["manifest_path"].as_str().unwrap_or_default());
        dirs.insert(name.clone(), manifest.parent().unwrap_or(root).to_owned());
        graph.insert(name, deps);
    }
    Ok((graph, dirs))
}

fn compare(table: &Graph, graph: &Graph) -> Vec<String> {
    let mut problems = Vec::new();
    for (name, deps) in graph {
        match table.get(name) {
            None => problems.push(format!("crate {name} is not in the crate table")),
            Some(listed) if listed != deps => {
                let added: Vec<_> = deps.difference(listed).collect();
                let dropped: Vec<_> = listed.difference(deps).collect();
                problems.push(format!(
                    "crate {name}: depends on {added:?} beyond the table, not on {dropped:?} \
                     that it lists"
                ));
            }
            Some(_) => {}
        }
    }
    for name in table.keys().filter(|n| !graph.contains_key(*n)) {
        problems.push(format!(
            "the crate table lists {name}, which is not in the workspace"
        ));
    }
    problems
}

/// `#[path = "…"]` attributes under `dir` whose target lies outside `dir`.
fn path_escapes(name: &str, dir: &Path) -> Result<Vec<String>> {
    let mut problems = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let path = entry?.path();
            let file_name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            if path.is_dir() {
                // Nested crates are checked on their own; build output is not source.
                if file_name != "target" && !path.join("Cargo.toml").is_file() {
                    stack.push(path);
                }
            } else if file_name.ends_with(".rs") {
                let text = std::fs::read_to_string(&path)?;
                for (n, line) in text.lines().enumerate() {
                    let Some(target) = path_attribute(line) else {
                        continue;
                    };
                    let resolved = normalize(&path.parent().unwrap_or(dir).join(target));
                    if !resolved.starts_with(normalize(dir)) {
                        problems.push(format!(
                            "{}:{}: #[path = \"{target}\"] reaches out of crate {name}: depend \
                             on the crate that owns it",
                            path.display(),
                            n + 1
                        ));
                    }
                }
            }
        }
    }
    Ok(problems)
}

/// The target of a `#[path = "…"]` attribute on this line, if it has one.
fn path_attribute(line: &str) -> Option<&str> {
    let rest = line
        .trim_start()
        .strip_prefix("#[path")?
        .trim_start()
        .strip_prefix('=')?;
    let rest = rest.trim_start().strip_prefix('"')?;
    rest.split('"').next()
}

/// `a/b/../c` → `a/c`, without touching the file system.
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn graph(rows: &[(&str, &[&str])]) -> Graph {
        rows.iter()
            .map(|(n, d)| (n.to_string(), d.iter().map(|s| s.to_string()).collect()))
            .collect()
    }

    #[test]
    fn the_table_reads_as_the_graph() {
        let doc = "x\n<!-- crates -->\n| crate | depends on | what |\n|---|---|---|\n\
                   | `gds-host` | – | a |\n| `gds-api` | `gds-host`, `gds-nvme` | b |\n\nafter\n";
        assert_eq!(
            crate_table(doc).unwrap(),
            graph(&[("gds-host", &[]), ("gds-api", &["gds-host", "gds-nvme"])])
        );
        assert!(crate_table("no table").is_err());
    }

    #[test]
    fn an_arrow_not_drawn_is_a_problem() {
        let table = graph(&[("a", &[]), ("b", &["a"])]);
        assert!(compare(&table, &graph(&[("a", &[]), ("b", &["a"])])).is_empty());
        let p = compare(&table, &graph(&[("a", &["b"]), ("b", &["a"]), ("c", &[])]));
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].contains("crate a") && p[0].contains("\"b\""), "{p:?}");
        assert!(p[1].contains("crate c is not in the crate table"), "{p:?}");
        let p = compare(&graph(&[("a", &[]), ("gone", &[])]), &graph(&[("a", &[])]));
        assert!(p[0].contains("gone"), "{p:?}");
    }

    #[test]
    fn a_path_out_of_the_crate_is_found_and_one_inside_is_not() {
        let dir = tempfile_dir();
        let src = dir.join("src");
        std::fs::create_dir_all(src.join("inner")).unwrap();
        std::fs::write(src.join("lib.rs"), "#[path = \"inner/x.rs\"]\nmod x;\n").unwrap();
        std::fs::write(src.join("inner/x.rs"), "").unwrap();
        assert!(path_escapes("c", &dir).unwrap().is_empty());
        std::fs::write(
            src.join("lib.rs"),
            "//! x\n  #[path = \"../../other/src/families.rs\"]\nmod families;\n",
        )
        .unwrap();
        let p = path_escapes("c", &dir).unwrap();
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].contains("lib.rs:2") && p[0].contains("reaches out of crate c"),
            "{p:?}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_repository_passes() {
        run(LayeringArgs::default()).unwrap();
    }

    fn tempfile_dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("layering-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
