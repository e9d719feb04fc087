//! `gds-agent run --config FILE` (or `GDS_CONFIG=FILE`): the same settings as the flags, kept
//! in a file for a service manager. Keys are the long flags of `gds-agent run` (`-` or `_`),
//! values what the flag takes:
//!
//! ```toml
//! listen = "127.0.0.1:9477"
//! opcode = ["URING_CMD", "READ"]
//! slow_threshold = "5ms"
//! ```
//!
//! A flag given on the command line wins over the same key in the file. Every value goes
//! through the flag's own parser, so the file accepts exactly what the command line accepts
//! and its errors name the file, the line and the key.

use gds_host::config_file as file;

use std::{
    ffi::{OsStr, OsString},
    path::{Path, PathBuf},
};

use clap::{Args as _, FromArgMatches as _, error::ContextKind};

use crate::agent::RunArgs;

/// Config files are a few lines; anything bigger is the wrong file.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Why a config file was refused. Each names the file; value errors name the line and key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {}: {source} (fix: check the path given with --config or GDS_CONFIG)", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {}: not a regular file (fix: give the path of a TOML file)", path.display())]
    NotAFile { path: PathBuf },
    /// A regular file whose read would wait for a writer (tracefs `trace_pipe`, a FUSE stream).
    #[error("config file {}: reading it would wait for more data (a stream such as trace_pipe, not a config file; fix: give the path of a TOML file)", path.display())]
    WouldBlock { path: PathBuf },
    #[error("config file {}: {size} bytes, more than the {MAX_CONFIG_BYTES} a config file may have", path.display())]
    TooBig { path: PathBuf, size: u64 },
    /// Bigger than its size says: made as it is read (`/proc/kallsyms` stats as 0 bytes).
    #[error("config file {}: more than the {MAX_CONFIG_BYTES} bytes a config file may have, though its size says {size} (a file made as it is read, such as one in /proc?)", path.display())]
    TooLong { path: PathBuf, size: u64 },
    #[error(
        "{CONFIG_ENV} is set but empty (fix: unset it, or set it to the path of a TOML config file)"
    )]
    EmptyEnv,
    #[error("config file {}: not UTF-8 text (TOML files are UTF-8)", path.display())]
    NotUtf8 { path: PathBuf },
    #[error("config file {}: {source}", path.display())]
    File {
        path: PathBuf,
        source: file::FileError,
    },
    #[error("config file {}, line {line}: unknown key `{key}` (keys are the long flags of `gds-agent run`: {valid})", path.display())]
    UnknownKey {
        path: PathBuf,
        line: usize,
        key: String,
        valid: String,
    },
    #[error("config file {}, line {line}: `{key}` can only be given on the command line", path.display())]
    CommandLineOnly {
        path: PathBuf,
        line: usize,
        key: String,
    },
    #[error("config file {}, line {line}: `{key}` takes one value, the file gives a list of {count}", path.display())]
    NotAList {
        path: PathBuf,
        line: usize,
        key: String,
        count: usize,
    },
    #[error("config file {}, line {line}: `{key}`: {message}", path.display())]
    Value {
        path: PathBuf,
        line: usize,
        key: String,
        message: String,
    },
    #[error("config file {} together with the command line: {message}", path.display())]
    Combined { path: PathBuf, message: String },
}

/// The `gds-agent run` flags as clap sees them (the single source of keys and value rules).
fn run_command() -> clap::Command {
    RunArgs::augment_args(clap::Command::new("gds-agent run")).no_binary_name(true)
}

/// First line of a clap error without its `error: ` prefix.
fn clap_message(err: &clap::Error) -> String {
    let rendered = err.render().to_string();
    let first = rendered.lines().next().unwrap_or_default();
    first.strip_prefix("error: ").unwrap_or(first).to_string()
}

/// Whether the command line `argv` sets the flag `--long` itself.
fn given_on_command_line(argv: &[OsString], long: &str) -> bool {
    let flag = format!("--{long}");
    argv.iter().map(|a| a.to_string_lossy()).any(|a| {
        a == flag.as_str()
            || a.strip_prefix(flag.as_str())
                .is_some_and(|rest| rest.starts_with('='))
    })
}

/// Reads the config file at `path`, refusing what cannot be one before parsing it.
///
/// Opened with `O_NONBLOCK` and checked with `fstat` on the open file: opening a FIFO for
/// reading would otherwise wait for a writer, and a read of `trace_pipe` (a regular file to
/// `stat`) for a trace event, both forever. The size limit is enforced on the bytes read, not
/// on the size `stat` reports, which is 0 for files made as they are read (`/proc/kallsyms`).
fn read(path: &Path) -> Result<String, ConfigError> {
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let err = |source| ConfigError::Read {
        path: path.into(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(err)?;
    let meta = file.metadata().map_err(err)?;
    if !meta.is_file() {
        return Err(ConfigError::NotAFile { path: path.into() });
    }
    if meta.len() > MAX_CONFIG_BYTES {
        return Err(ConfigError::TooBig {
            path: path.into(),
            size: meta.len(),
        });
    }
    let mut bytes = Vec::new();
    // One byte past the limit tells a file at the limit from one beyond it.
    match file.take(MAX_CONFIG_BYTES + 1).read_to_end(&mut bytes) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
            return Err(ConfigError::WouldBlock { path: path.into() });
        }
        Err(e) => return Err(err(e)),
    }
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(ConfigError::TooLong {
            path: path.into(),
            size: meta.len(),
        });
    }
    String::from_utf8(bytes).map_err(|_| ConfigError::NotUtf8 { path: path.into() })
}

/// The environment variable naming the config file when `--config` is not given.
pub const CONFIG_ENV: &str = "GDS_CONFIG";

/// The config file's path: `--config`, else [`CONFIG_ENV`]. Read here rather than by clap's
/// `env`, which takes an empty value for a missing one and says "a value is required for
/// '--config <FILE>'" to someone who never typed `--config`.
fn config_path(args: &RunArgs) -> Result<Option<PathBuf>, ConfigError> {
    if let Some(path) = &args.config {
        return Ok(Some(path.clone()));
    }
    match std::env::var_os(CONFIG_ENV) {
        Some(v) if v.is_empty() => Err(ConfigError::EmptyEnv),
        Some(v) => Ok(Some(PathBuf::from(v))),
        None => Ok(None),
    }
}

/// The flags the file stands for, checked one key at a time so an error points at its line.
/// Keys the command line (`cli_argv`) sets itself are left out: the command line wins.
pub fn file_argv(
    path: &Path,
    text: &str,
    cli_argv: &[OsString],
) -> Result<Vec<OsString>, ConfigError> {
    let entries = file::parse(text).map_err(|source| ConfigError::File {
        path: path.into(),
        source,
    })?;
    let cmd = run_command();
    let mut argv = Vec::new();
    for entry in entries {
        let Some(arg) = cmd
            .get_arguments()
            .find(|a| a.get_long() == Some(entry.key.as_str()))
        else {
            let valid: Vec<String> = cmd
                .get_arguments()
                .filter_map(|a| a.get_long())
                .filter(|l| *l != "config")
                .map(|l| l.replace('-', "_"))
                .collect();
            return Err(ConfigError::UnknownKey {
                path: path.into(),
                line: entry.line,
                key: entry.key.replace('-', "_"),
                valid: valid.join(", "),
            });
        };
        let key = entry.key.replace('-', "_");
        if entry.key == "config" {
            return Err(ConfigError::CommandLineOnly {
                path: path.into(),
                line: entry.line,
                key,
            });
        }
        let many = matches!(arg.get_action(), clap::ArgAction::Append);
        if entry.values.len() > 1 && !many {
            return Err(ConfigError::NotAList {
                path: path.into(),
                line: entry.line,
                key,
                count: entry.values.len(),
            });
        }
        if given_on_command_line(cli_argv, &entry.key) {
            continue;
        }
        let flags: Vec<OsString> = entry
            .values
            .iter()
            .map(|v| OsString::from(format!("--{}={v}", entry.key)))
            .collect();
        if let Err(e) = cmd.clone().try_get_matches_from(&flags) {
            let mut message = clap_message(&e);
            if let Some(clap::error::ContextValue::String(v)) = e.get(ContextKind::InvalidValue) {
                message = message.replace(&format!("'{v}' for '--"), &format!("'{v}' for '"));
            }
            return Err(ConfigError::Value {
                path: path.into(),
                line: entry.line,
                key,
                message,
            });
        }
        argv.extend(flags);
    }
    Ok(argv)
}

/// `args` as parsed from the command line `cli_argv` (the words after `run`), with the config
/// file it names (if any) filling in every flag the command line left out.
pub fn resolve(args: RunArgs, cli_argv: &[OsString]) -> Result<RunArgs, ConfigError> {
    let Some(path) = config_path(&args)? else {
        return Ok(args);
    };
    let text = read(&path)?;
    let mut argv = file_argv(&path, &text, cli_argv)?;
    if argv.is_empty() {
        return Ok(RunArgs {
            config: Some(path),
            ..args
        });
    }
    argv.extend(cli_argv.iter().cloned());
    let combined = |e: clap::Error| ConfigError::Combined {
        path: path.clone(),
        message: clap_message(&e),
    };
    let matches = run_command()
        .try_get_matches_from(&argv)
        .map_err(combined)?;
    let mut merged = RunArgs::from_arg_matches(&matches).map_err(combined)?;
    // With GDS_CONFIG the path came from the environment, not argv.
    merged.config = Some(path);
    Ok(merged)
}

/// The words after `run` in this process's arguments (none when `run` was implied).
pub fn run_argv(argv: &[OsString]) -> Vec<OsString> {
    match argv.get(1) {
        Some(a) if a.as_os_str() == OsStr::new("run") => argv[2..].to_vec(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    fn argv(text: &str, cli: &[&str]) -> Result<Vec<String>, ConfigError> {
        file_argv(Path::new("/etc/gds/agent.toml"), text, &os(cli))
            .map(|v| v.into_iter().map(|s| s.into_string().unwrap()).collect())
    }

    #[test]
    fn keys_become_flags_and_the_command_line_wins() {
        let text = "listen = \"127.0.0.1:9000\"\nslow_threshold = \"5ms\"\nopcode = [\"READ\", \"NOP\"]\nsample = 4\n";
        assert_eq!(
            argv(text, &["--sample", "8"]).unwrap(),
            vec![
                "--listen=127.0.0.1:9000",
                "--slow-threshold=5ms",
                "--opcode=READ",
                "--opcode=NOP"
            ]
        );
        assert_eq!(argv(text, &["--opcode=WRITE"]).unwrap().len(), 3);
    }

    #[test]
    fn value_errors_name_file_line_and_key() {
        let e = argv("listen = \"127.0.0.1:9000\"\nsample = 0\n", &[]).unwrap_err();
        let s = e.to_string();
        assert!(matches!(e, ConfigError::Value { line: 2, .. }), "{s}");
        assert!(
            s.starts_with("config file /etc/gds/agent.toml, line 2: `sample`:"),
            "{s}"
        );
        assert!(s.contains("'0'"), "{s}");
        let s = argv("slow_threshold = \"10 parsecs\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(s.contains("invalid duration"), "{s}");
        let s = argv("opcode = [\"READ\", \"FROB\"]\n", &[])
            .unwrap_err()
            .to_string();
        assert!(s.contains("unknown io_uring opcode \"FROB\""), "{s}");
    }

    #[test]
    fn unknown_keys_lists_and_config_in_config_are_refused() {
        let e = argv("\n\nslow_treshold = \"5ms\"\n", &[]).unwrap_err();
        assert!(matches!(e, ConfigError::UnknownKey { line: 3, .. }), "{e}");
        assert!(
            e.to_string().contains("slow_threshold"),
            "lists valid keys: {e}"
        );
        assert!(!e.to_string().contains("config,"), "{e}");
        let e = argv("listen = [\"a\", \"b\"]\n", &[]).unwrap_err();
        assert!(matches!(e, ConfigError::NotAList { count: 2, .. }), "{e}");
        let e = argv("config = \"/etc/other.toml\"\n", &[]).unwrap_err();
        assert!(matches!(e, ConfigError::CommandLineOnly { .. }), "{e}");
    }

    #[test]
    fn the_shipped_example_is_valid() {
        let text = include_str!("../../../deploy/agent.toml");
        let flags = argv(text, &[]).unwrap();
        assert!(
            flags.contains(&"--slow-threshold=10ms".to_string()),
            "{flags:?}"
        );
        let cmd = run_command();
        cmd.try_get_matches_from(&flags).unwrap();
    }

    #[test]
    fn run_argv_is_what_follows_run() {
        assert_eq!(
            run_argv(&os(&["gds-agent", "run", "--pid", "1"])),
            os(&["--pid", "1"])
        );
        assert!(run_argv(&os(&["gds-agent"])).is_empty());
        assert!(run_argv(&os(&["gds-agent", "top", "--pid", "1"])).is_empty());
    }

    #[test]
    fn given_on_command_line_matches_whole_flags() {
        let cli = os(&["--slow-threshold=1s", "--pid", "3"]);
        assert!(given_on_command_line(&cli, "slow-threshold"));
        assert!(given_on_command_line(&cli, "pid"));
        assert!(!given_on_command_line(&cli, "slow"));
        assert!(!given_on_command_line(&os(&["--pidfile"]), "pid"));
    }

    /// The config key is the flag's: lists of names or uids, each checked on its line.
    #[test]
    fn config_key_cufile_users() {
        let path = std::path::Path::new("/etc/gds/agent.toml");
        let argv = file_argv(path, "cufile_users = [\"nobody\", \"0\"]\n", &[]).unwrap();
        assert_eq!(argv, ["--cufile-users=nobody", "--cufile-users=0"]);
        let e = file_argv(
            path,
            "listen = \"127.0.0.1:1\"\ncufile_users = [\"no-such-user-gds\"]\n",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("line 2") && e.contains("unknown user"), "{e}");
    }
}
