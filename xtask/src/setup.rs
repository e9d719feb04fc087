//! Prerequisites for building the eBPF programs, installed only when missing.
//!
//! The chain (verified in ../shared/notes/platform.md): the nightly toolchain builds gds-ebpf
//! with `-Z build-std=core` (needs its `rust-src`), and bpf-linker links it; bpf-linker must be
//! built against the same LLVM major as nightly's rustc, so that major is read from
//! `rustc +nightly -vV` rather than hard-coded.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

/// The repository root (xtask lives one level below it).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent")
        .to_path_buf()
}

/// `cargo` from the environment cargo gave us, run in the repository root.
pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(root());
    cmd
}

/// Cargo's target directory (`CARGO_TARGET_DIR` or `target/` in the repository).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

/// Builds `gds-agent` (release or debug) and returns its path.
pub fn build_agent(release: bool) -> Result<PathBuf> {
    let mut cmd = cargo();
    cmd.args(["build", "--package", "gds-user", "--bin", "gds-agent"]);
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd)
        .context("building gds-agent (`cargo xtask setup` installs what the eBPF build needs)")?;
    let agent = target_dir()
        .join(if release { "release" } else { "debug" })
        .join("gds-agent");
    if !agent.exists() {
        bail!("{} was not built", agent.display());
    }
    Ok(agent)
}

/// Runs a command, echoing it, and fails with its exit status.
pub fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: running {cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("failed to start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("failed to start {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn step(what: &str) {
    eprintln!("xtask setup: {what}");
}

/// Installs Debian packages that are missing (`apt-get update` once, first).
/// Whether Debian's package `name` is installed.
fn has_package(name: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", name])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

/// Debian's `prometheus` and `prometheus-alertmanager` start their own servers (:9090,
/// :9093) on install; gds's checks and tests run their own, on their own ports and data
/// directories, so the packaged one is only stopped and disabled.
pub fn stop_packaged_service(name: &str) {
    let quiet = |cmd: &mut Command| {
        let _ = cmd.stdout(Stdio::null()).stderr(Stdio::null()).status();
    };
    if Path::new("/run/systemd/system").exists() {
        step(&format!(
            "disabling the {name} service that Debian's package started"
        ));
        quiet(Command::new("systemctl").args(["disable", "--now", name]));
    } else if Path::new("/etc/init.d").join(name).exists() {
        step(&format!(
            "stopping the {name} service that Debian's package started"
        ));
        quiet(Command::new(Path::new("/etc/init.d").join(name)).arg("stop"));
    }
}

pub fn apt_install(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| !has_package(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    step(&format!("installing {}", missing.join(" ")));
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// LLVM major version of the nightly toolchain (`LLVM version: 22.1.4` → 22).
fn nightly_llvm_major() -> Result<u32> {
    let vv = output(Command::new("rustup").args(["run", "nightly", "rustc", "-vV"]))
        .context("the nightly toolchain is required (it builds the eBPF programs)")?;
    let line = vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .context("`rustc +nightly -vV` printed no LLVM version")?;
    line.split('.')
        .next()
        .unwrap_or_default()
        .trim()
        .parse()
        .context("unparsable LLVM version")
}

/// The LLVM major a bpf-linker binary is linked against (it links libLLVM dynamically).
fn bpf_linker_llvm_major(linker: &Path) -> Option<u32> {
    let ldd = output(Command::new("ldd").arg(linker)).ok()?;
    let lib = ldd.lines().find_map(|l| l.trim().strip_prefix("libLLVM"))?;
    // "libLLVM.so.22.1 => ..." or "libLLVM-22.so => ..."
    lib.trim_start_matches(['.', '-', 's', 'o'])
        .split(['.', ' '])
        .next()?
        .parse()
        .ok()
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .chain(std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo/bin").join(name)))
        .find(|p| p.is_file())
}

/// The real libcufile the cuFile tests trace: NVIDIA's `nvidia-cufile` wheel from PyPI (a
/// package registry, reachable from CI), unpacked under `target/pypi/nvidia-cufile`. Pinned:
/// the tests count the error codes this version returns without a GPU.
pub const LIBCUFILE_WHEEL: &str = "nvidia-cufile==1.20.0.107";

pub fn libcufile_dir() -> PathBuf {
    target_dir().join("pypi/nvidia-cufile")
}

fn ensure_libcufile() -> Result<()> {
    let dir = libcufile_dir();
    if dir.join("nvidia/cu13/lib/libcufile.so.0").exists() {
        return Ok(());
    }
    step(&format!(
        "downloading {LIBCUFILE_WHEEL} from PyPI (the cuFile tests' libcufile)"
    ));
    let wheels = target_dir().join("pypi/wheel");
    run(Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "-q",
            "-d",
        ])
        .arg(&wheels)
        .arg(LIBCUFILE_WHEEL))?;
    // A wheel is a zip; python3 is there (pip ran), unzip may not be.
    run(Command::new("python3")
        .args([
            "-c",
            "import sys, glob, zipfile; \
             zipfile.ZipFile(sorted(glob.glob(sys.argv[1] + '/nvidia_cufile-*.whl'))[-1])\
             .extractall(sys.argv[2])",
        ])
        .arg(&wheels)
        .arg(&dir))?;
    Ok(())
}

pub fn ensure_prerequisites() -> Result<()> {
    // nightly toolchain and rust-src
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .context("the nightly toolchain is missing: it builds the eBPF programs (-Z build-std)")?;
    if !installed.lines().any(|l| l.starts_with("rust-src")) {
        step("adding rust-src to the nightly toolchain");
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }

    // LLVM dev package matching nightly, and bpf-linker built against it
    let major = nightly_llvm_major()?;
    let llvm_bin = PathBuf::from(format!("/usr/lib/llvm-{major}/bin"));
    if !llvm_bin.join("llvm-config").exists() {
        apt_install(&[
            &format!("llvm-{major}-dev"),
            &format!("libclang-{major}-dev"),
        ])?;
    }
    let linker_ok = which("bpf-linker").and_then(|p| bpf_linker_llvm_major(&p)) == Some(major);
    if !linker_ok {
        step(&format!(
            "building bpf-linker against LLVM {major} (a few minutes)"
        ));
        let path = format!(
            "{}:{}",
            llvm_bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        run(Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--force",
                "--no-default-features",
                "--features",
            ])
            .arg(format!("llvm-{major}"))
            .env("PATH", path))?;
    }

    // Test and tracing tools (wrk: the HTTP load of `cargo xtask load`; Prometheus and
    // Alertmanager: the alert rules' checks and the page test, gds-user/tests/page.rs)
    let had_alertmanager = has_package("prometheus-alertmanager");
    let had_prometheus = has_package("prometheus");
    apt_install(&[
        "fio",
        "bpftool",
        "tmux",
        "wrk",
        "prometheus",
        "prometheus-alertmanager",
    ])?;
    if !had_prometheus {
        stop_packaged_service("prometheus");
    }
    if !had_alertmanager {
        stop_packaged_service("prometheus-alertmanager");
    }
    ensure_libcufile()?;
    Ok(())
}
