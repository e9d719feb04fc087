//! cuFile (libcufile, the GDS user library): where it is, its version, and the settings in
//! `/etc/cufile.json` (or `$CUFILE_ENV_PATH_JSON`) that decide which path cuFile takes.
//!
//! cufile.json is JSON with `//` comments (NVIDIA ships it that way); comments and trailing
//! commas are stripped before serde_json sees it.

use serde::Serialize;

use super::Fact;
use super::bounded::HostRoot;

pub const DEFAULT_CONFIG: &str = "/etc/cufile.json";
const CONFIG_LIMIT: u64 = 1024 * 1024;

/// Library directories searched under the root (the CUDA toolkit and distro layouts).
const LIB_DIRS: &[&str] = &[
    "/usr/local/cuda/lib64",
    "/usr/local/cuda/targets/x86_64-linux/lib",
    "/usr/local/cuda/targets/sbsa-linux/lib",
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
];

/// Why a cuFile fact is unknown.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CufileError {
    #[error(
        "libcufile not found (searched /usr/local/cuda*/…/lib, /usr/lib*): install the GDS package (nvidia-gds / libcufile) of the CUDA toolkit"
    )]
    NotFound,
    #[error("dlopen {path}: {message}")]
    Load { path: String, message: String },
    #[error("{path} has no cuFileGetVersion (cuFile older than 1.9)")]
    NoGetVersion { path: String },
    #[error("cuFileGetVersion failed: cuFile error {err} (CUDA {cu_err})")]
    GetVersion { err: i32, cu_err: i32 },
    #[error("not JSON after removing comments: {0}")]
    Json(String),
}

#[derive(Debug, Clone, Serialize)]
pub struct CufileSection {
    /// Path of the library file found (after following links), e.g.
    /// `/usr/local/cuda-13.0/targets/x86_64-linux/lib/libcufile.so.1.15.1`.
    pub library: Fact<String>,
    /// Version from the library file name (`1.15.1`) or `cuFileGetVersion` on a live host.
    pub version: Fact<String>,
    /// Which config file was read and why (default or `CUFILE_ENV_PATH_JSON`).
    pub config_path: String,
    pub config: Fact<CufileConfig>,
    /// `CUFILE_FORCE_COMPAT_MODE=true` in our environment forces compat mode (live only).
    pub force_compat_mode_env: Option<bool>,
    /// Whether `gds-agent run` traces cuFile calls, and what it lacks if not.
    pub tracing: CufileTracingFacts,
}

/// Whether the agent's cuFile layer works with a set of capabilities: `on: ...`,
/// `on, limited: ...` or `off: the agent lacks CAP for WHAT; ...; grant ...`.
#[derive(Debug, Clone, Serialize)]
pub struct CufileTracingFacts {
    /// With the capabilities this probe runs with (a live host only): the agent started the
    /// same way gets the same answer.
    pub with_these_capabilities: Fact<String>,
    /// With those the installed systemd unit grants ([`UNIT_PATHS`], under the root).
    pub installed_unit: Fact<String>,
}

/// Where an installed gds-agent unit is looked for, first found wins (systemd's order).
pub const UNIT_PATHS: [&str; 3] = [
    "/etc/systemd/system/gds-agent.service",
    "/usr/lib/systemd/system/gds-agent.service",
    "/lib/systemd/system/gds-agent.service",
];
/// A unit file is a few KiB; anything larger is not one.
const UNIT_LIMIT: u64 = 256 * 1024;

fn tracing_facts(root: &HostRoot) -> CufileTracingFacts {
    use gds_host::privileges::{CufileAccess, unit_capabilities};
    let with_these_capabilities = if root.is_live() {
        Fact::from_result(CufileAccess::of_this_thread().map(|a| a.to_string()))
    } else {
        Fact::unknown("--root is not /: this process's capabilities say nothing about that host")
    };
    let mut installed_unit = Fact::unknown(format!(
        "no gds-agent unit installed ({})",
        UNIT_PATHS.join(", ")
    ));
    for path in UNIT_PATHS {
        match root.read(path, UNIT_LIMIT) {
            Ok(text) => {
                installed_unit = match unit_capabilities(&text) {
                    Ok(caps) => Fact::Known(format!(
                        "{path} grants {caps}: cuFile tracing {}",
                        CufileAccess::of(caps)
                    )),
                    Err(e) => Fact::unknown(format!("{path}: {e}")),
                };
                break;
            }
            Err(e) if e.is_not_found() => continue,
            Err(e) => {
                installed_unit = Fact::from_read_error(e);
                break;
            }
        }
    }
    CufileTracingFacts {
        with_these_capabilities,
        installed_unit,
    }
}

/// The settings of cufile.json that matter for the data path. `None`: not set (cuFile default).
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct CufileConfig {
    pub allow_compat_mode: Option<bool>,
    pub use_poll_mode: Option<bool>,
    pub poll_mode_max_size_kb: Option<u64>,
    pub max_direct_io_size_kb: Option<u64>,
    pub max_device_cache_size_kb: Option<u64>,
    pub max_device_pinned_mem_size_kb: Option<u64>,
    /// Upstream Linux PCI P2PDMA mode instead of nvidia-fs (cuFile 1.13+, CUDA 12.8+).
    pub use_pci_p2pdma: Option<bool>,
    pub gds_rdma_write_support: Option<bool>,
    pub rdma_dynamic_routing: Option<bool>,
    pub rdma_dev_addr_list: Vec<String>,
    pub parallel_io: Option<bool>,
}

/// Removes `//` and `/* */` comments outside strings, then trailing commas before `}`/`]`.
pub fn strip_json_comments(input: &str) -> String {
    let bytes = input.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    let mut in_string = false;
    while i < bytes.len() {
        let c = bytes[i];
        if in_string {
            out.push(c);
            if c == b'\\' && i + 1 < bytes.len() {
                out.push(bytes[i + 1]);
                i += 2;
                continue;
            }
            if c == b'"' {
                in_string = false;
            }
            i += 1;
        } else if c == b'"' {
            in_string = true;
            out.push(c);
            i += 1;
        } else if c == b'/' && bytes.get(i + 1) == Some(&b'/') {
            while i < bytes.len() && bytes[i] != b'\n' {
                i += 1;
            }
        } else if c == b'/' && bytes.get(i + 1) == Some(&b'*') {
            i += 2;
            while i < bytes.len() && !(bytes[i] == b'*' && bytes.get(i + 1) == Some(&b'/')) {
                i += 1;
            }
            i += 2;
        } else {
            out.push(c);
            i += 1;
        }
    }
    // Trailing commas: `,` followed only by whitespace and then `}` or `]`.
    let mut cleaned = Vec::with_capacity(out.len());
    let mut in_string = false;
    let mut j = 0;
    while j < out.len() {
        let c = out[j];
        if in_string {
            cleaned.push(c);
            if c == b'\\' && j + 1 < out.len() {
                cleaned.push(out[j + 1]);
                j += 2;
                continue;
            }
            if c == b'"' {
                in_string = false;
            }
        } else if c == b'"' {
            in_string = true;
            cleaned.push(c);
        } else if c == b',' {
            let next = out[j + 1..].iter().find(|b| !b.is_ascii_whitespace());
            if !matches!(next, Some(b'}') | Some(b']')) {
                cleaned.push(c);
            }
        } else {
            cleaned.push(c);
        }
        j += 1;
    }
    // Only ASCII bytes were removed, so the result is still UTF-8.
    String::from_utf8(cleaned).unwrap_or_default()
}

pub fn parse_config(text: &str) -> Result<CufileConfig, CufileError> {
    let value: serde_json::Value = serde_json::from_str(&strip_json_comments(text))
        .map_err(|e| CufileError::Json(e.to_string()))?;
    let props = value.get("properties");
    let get = |key: &str| props.and_then(|p| p.get(key));
    let boolean = |key: &str| get(key).and_then(serde_json::Value::as_bool);
    let number = |key: &str| get(key).and_then(serde_json::Value::as_u64);
    Ok(CufileConfig {
        allow_compat_mode: boolean("allow_compat_mode"),
        use_poll_mode: boolean("use_poll_mode"),
        poll_mode_max_size_kb: number("poll_mode_max_size_kb"),
        max_direct_io_size_kb: number("max_direct_io_size_kb"),
        max_device_cache_size_kb: number("max_device_cache_size_kb"),
        max_device_pinned_mem_size_kb: number("max_device_pinned_mem_size_kb"),
        use_pci_p2pdma: boolean("use_pci_p2pdma"),
        gds_rdma_write_support: boolean("gds_rdma_write_support"),
        rdma_dynamic_routing: boolean("rdma_dynamic_routing"),
        rdma_dev_addr_list: get("rdma_dev_addr_list")
            .and_then(serde_json::Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .take(64)
                    .collect()
            })
            .unwrap_or_default(),
        parallel_io: value
            .get("execution")
            .and_then(|e| e.get("parallel_io"))
            .and_then(serde_json::Value::as_bool),
    })
}

/// `libcufile.so.1.15.1` → `1.15.1`.
pub fn version_from_file_name(name: &str) -> Option<String> {
    let version = name.strip_prefix("libcufile.so.")?;
    (version.split('.').count() >= 2 && version.split('.').all(|p| p.parse::<u32>().is_ok()))
        .then(|| version.to_owned())
}

/// Finds libcufile under the root: known directories, then `/usr/local/cuda-*` toolkits.
/// Returns the host path of the most specific file (the one with a full version, if any).
fn find_library(root: &HostRoot) -> Result<String, CufileError> {
    let mut dirs: Vec<String> = LIB_DIRS.iter().map(|d| (*d).to_owned()).collect();
    if let Ok(entries) = root.list_dir("/usr/local", 256) {
        for e in entries.iter().filter(|e| e.starts_with("cuda-")) {
            dirs.push(format!("/usr/local/{e}/targets/x86_64-linux/lib"));
            dirs.push(format!("/usr/local/{e}/targets/sbsa-linux/lib"));
            dirs.push(format!("/usr/local/{e}/lib64"));
        }
    }
    let mut best: Option<String> = None;
    for dir in &dirs {
        let Ok(entries) = root.list_dir(dir, 16 * 1024) else {
            continue;
        };
        for e in entries
            .iter()
            .filter(|e| *e == "libcufile.so" || e.starts_with("libcufile.so."))
        {
            let path = format!("{dir}/{e}");
            if version_from_file_name(e).is_some() {
                return Ok(path);
            }
            best.get_or_insert(path);
        }
    }
    best.ok_or(CufileError::NotFound)
}

/// Follows the chain of symbolic links inside the root (`libcufile.so` → `.so.0` → `.so.1.15.1`).
fn follow(root: &HostRoot, path: String) -> String {
    root.canonical(&path).unwrap_or(path)
}

/// `CUfileError_t` from cufile.h: `{ CUfileOpError err; CUresult cu_err; }`.
#[repr(C)]
struct CUfileErrorT {
    err: i32,
    cu_err: i32,
}

/// `cuFileGetVersion` from the library itself (live hosts, when the file name carries no
/// version). `cuFileDriverOpen` is deliberately not called: it starts threads and writes logs.
fn library_version(path: &str) -> Result<String, CufileError> {
    // SAFETY: loading libcufile runs its static initialisers only; cuFileGetVersion(int*) is
    // declared in cufile.h and has no preconditions.
    unsafe {
        let lib = libloading::Library::new(path).map_err(|e| {
            use std::error::Error as _;
            CufileError::Load {
                path: path.to_owned(),
                message: e.source().map_or_else(|| e.to_string(), |s| s.to_string()),
            }
        })?;
        let get: libloading::Symbol<unsafe extern "C" fn(*mut i32) -> CUfileErrorT> = lib
            .get(b"cuFileGetVersion\0")
            .map_err(|_| CufileError::NoGetVersion {
                path: path.to_owned(),
            })?;
        let mut v = 0i32;
        let r = get(&mut v);
        if r.err != 0 {
            return Err(CufileError::GetVersion {
                err: r.err,
                cu_err: r.cu_err,
            });
        }
        // Encoded like the CUDA versions: 1000 * major + 10 * minor.
        Ok(format!(
            "{}.{} (cuFileGetVersion {v})",
            v / 1000,
            (v % 1000) / 10
        ))
    }
}

pub fn probe(root: &HostRoot) -> CufileSection {
    let live = root.is_live();
    let (library, version) = match find_library(root) {
        Ok(found) => {
            let real = follow(root, found.clone());
            let name = real.rsplit('/').next().unwrap_or_default();
            let from_name = version_from_file_name(name);
            let version = match (from_name, live) {
                (Some(v), _) => Fact::Known(v),
                (None, true) => Fact::from_result(library_version(&found)),
                (None, false) => Fact::unknown(format!(
                    "{real} carries no version in its name and --root is not / (cuFileGetVersion skipped)"
                )),
            };
            (Fact::Known(real), version)
        }
        Err(why) => (
            Fact::from_result(Err(why.clone())),
            Fact::from_result(Err(why)),
        ),
    };
    let env_path = live
        .then(|| std::env::var("CUFILE_ENV_PATH_JSON").ok())
        .flatten()
        .filter(|p| !p.is_empty());
    let config_path = env_path
        .clone()
        .unwrap_or_else(|| DEFAULT_CONFIG.to_owned());
    let config = match root.read(&config_path, CONFIG_LIMIT) {
        Ok(text) => match parse_config(&text) {
            Ok(c) => Fact::Known(c),
            Err(why) => Fact::unknown(format!("cannot parse {config_path}: {why}")),
        },
        Err(err) if err.is_not_found() => Fact::unknown(format!(
            "{config_path} does not exist (cuFile uses its built-in defaults)"
        )),
        Err(err) => Fact::from_read_error(err),
    };
    let force_compat_mode_env = live
        .then(|| std::env::var("CUFILE_FORCE_COMPAT_MODE").ok())
        .flatten()
        .map(|v| v.eq_ignore_ascii_case("true") || v == "1");
    CufileSection {
        library,
        version,
        config_path: match env_path {
            Some(p) => format!("{p} (CUFILE_ENV_PATH_JSON)"),
            None => config_path,
        },
        config,
        force_compat_mode_env,
        tracing: tracing_facts(root),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_comments_but_not_urls_in_strings() {
        let text = r#"{
            // a comment
            "logging": { "dir": "/var/log//x", "level": "ERROR" }, /* block */
            "properties": {
                "max_direct_io_size_kb" : 16384, // 16 MiB
                "allow_compat_mode": true,
                "use_pci_p2pdma": false,
                "rdma_dev_addr_list": [ "172.16.8.25", ],
            },
        }"#;
        let c = parse_config(text).unwrap();
        assert_eq!(c.max_direct_io_size_kb, Some(16384));
        assert_eq!(c.allow_compat_mode, Some(true));
        assert_eq!(c.use_pci_p2pdma, Some(false));
        assert_eq!(c.rdma_dev_addr_list, ["172.16.8.25"]);
        assert_eq!(c.use_poll_mode, None);
        let stripped = strip_json_comments(text);
        assert!(stripped.contains("/var/log//x"));
    }

    #[test]
    fn rejects_broken_json_with_a_reason() {
        assert!(parse_config("{ \"properties\": ").is_err());
        assert!(parse_config("").is_err());
    }

    #[test]
    fn versions_from_file_names() {
        assert_eq!(
            version_from_file_name("libcufile.so.1.15.1").as_deref(),
            Some("1.15.1")
        );
        assert_eq!(version_from_file_name("libcufile.so.0"), None);
        assert_eq!(version_from_file_name("libcufile.so"), None);
        assert_eq!(version_from_file_name("libcufile_rdma.so.1.15.1"), None);
    }
}
