//! The guest's root: busybox, an `/init` that runs the scenario runner and powers off, and the
//! test binaries with the shared libraries `ldd` finds for them (the host has no musl target,
//! so glibc-dynamic binaries travel with their libraries at the same paths).

use std::collections::BTreeSet;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// `/init`: mounts what the agent and scenarios need, waits for the NVMe char devices, runs
/// the scenarios (selected with `gds.only=` on the kernel command line) and powers off.
const INIT: &str = r#"#!/bin/sh
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /tmp /dev/shm /sys/kernel/tracing /sys/kernel/debug /sys/fs/bpf /run
mount -t tmpfs tmp /tmp
mount -t tmpfs shm /dev/shm
mount -t tmpfs run /run
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
mount -t bpf bpf /sys/fs/bpf 2>/dev/null
ip link set lo up 2>/dev/null
# Generic kernels: NVMe is a module; load it and its dependencies as a distribution would.
if [ -f /etc/gds-modules ]; then
  for m in $(cat /etc/gds-modules); do
    insmod "/lib/modules/gds/$m.ko" || echo "@@GDS MODULE-FAILED $m"
  done
  echo "@@GDS MODULES $(tr '\n' ' ' < /etc/gds-modules)"
fi
[ -f /etc/gds-ld-path ] && export LD_LIBRARY_PATH="$(cat /etc/gds-ld-path)"
only=""; skip=""; scale=1; ngs=1
for a in $(cat /proc/cmdline); do
  case "$a" in
    gds.only=*) only="${a#gds.only=}" ;;
    gds.skip=*) skip="${a#gds.skip=}" ;;
    gds.scale=*) scale="${a#gds.scale=}" ;;
    gds.ngs=*) ngs="${a#gds.ngs=}" ;;
  esac
done
echo "@@GDS BOOT $(uname -r)"
i=0
while [ "$(ls /dev/ng* 2>/dev/null | wc -l)" -lt "$ngs" ] && [ $i -lt 200 ]; do sleep 0.1; i=$((i+1)); done
echo "@@GDS DEVICES $(ls /dev/ng* /dev/nvme* 2>/dev/null | tr '\n' ' ')"
set -- --timeout-scale "$scale"
[ -n "$only" ] && set -- "$@" --only "$only"
[ -n "$skip" ] && set -- "$@" --skip "$skip"
/bin/gds-vm-scenarios run "$@"
echo "@@GDS EXIT $?"
sync
poweroff -f
"#;

/// Where the guest finds the modules `/init` loads, and the file listing their load order.
pub const GUEST_MODULE_DIR: &str = "/lib/modules/gds";
pub const GUEST_MODULE_LIST: &str = "/etc/gds-modules";

/// `base` with `modules` appended as a second cpio archive (the kernel unpacks concatenated
/// newc archives in order), so one common image serves every kernel and each generic kernel
/// adds only its own modules.
pub fn with_modules(work: &Path, base: &Path, modules: &[PathBuf], out: &Path) -> Result<()> {
    let root = work.join("modules-root");
    let _ = std::fs::remove_dir_all(&root);
    let mut names = Vec::new();
    for m in modules {
        let name = m
            .file_stem()
            .and_then(|s| s.to_str())
            .with_context(|| format!("module path {}", m.display()))?;
        install(
            &root,
            m,
            &Path::new(GUEST_MODULE_DIR).join(format!("{name}.ko")),
            0o644,
        )?;
        names.push(name.to_string());
    }
    let list = root.join(GUEST_MODULE_LIST.trim_start_matches('/'));
    std::fs::create_dir_all(list.parent().unwrap())?;
    std::fs::write(&list, names.join("\n") + "\n")?;
    let extra = work.join("modules.cpio");
    cpio(&root, &extra)?;
    let mut bytes = std::fs::read(base)?;
    bytes.extend(std::fs::read(&extra)?);
    std::fs::write(out, bytes)?;
    Ok(())
}

fn cpio(root: &Path, out: &Path) -> Result<()> {
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd '{}' && find . | cpio -o -H newc --quiet > '{}'",
            root.display(),
            out.display()
        ))
        .status()
        .context("cpio")?;
    if !status.success() {
        bail!("building {} with cpio failed", out.display());
    }
    Ok(())
}

/// Shared libraries (resolved paths) a dynamic binary needs, plus its loader.
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .with_context(|| format!("ldd {}", binary.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if text.contains("not a dynamic executable") || !out.status.success() {
        return Ok(Vec::new());
    }
    let mut libs = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)" or "/lib64/ld-linux-x86-64.so.2 (0x…)"
        let path = match line.split_once("=>") {
            Some((_, rhs)) => rhs.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        } else if line.contains("not found") {
            bail!("{}: {line}", binary.display());
        }
    }
    Ok(libs)
}

/// Copy `src` to `root` + `dest` (absolute guest path), creating parents.
fn install(root: &Path, src: &Path, dest: &Path, mode: u32) -> Result<()> {
    let target = root.join(dest.strip_prefix("/").unwrap_or(dest));
    std::fs::create_dir_all(target.parent().unwrap())?;
    std::fs::copy(src, &target)
        .with_context(|| format!("copy {} -> {}", src.display(), target.display()))?;
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// Build `out` (an uncompressed newc cpio: the kernel unpacks it faster than it could inflate
/// a gzip one under emulation) from busybox, `/init` and `binaries` (host path, guest name in
/// /bin).
pub fn build(work: &Path, binaries: &[(PathBuf, String)], out: &Path) -> Result<()> {
    let root = work.join("root");
    let _ = std::fs::remove_dir_all(&root);
    for d in ["bin", "sbin", "etc", "proc", "sys", "dev", "tmp", "root"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.is_file())
        .context("busybox-static is not installed")?;
    install(&root, busybox, Path::new("/bin/busybox"), 0o755)?;
    let applets = Command::new(busybox).arg("--list").output()?;
    for applet in String::from_utf8_lossy(&applets.stdout).lines() {
        let link = root.join("bin").join(applet);
        if applet != "busybox" && !link.exists() {
            symlink("busybox", &link)?;
        }
    }
    let mut lib_dirs = BTreeSet::new();
    let mut libs = BTreeSet::new();
    for (src, name) in binaries {
        // Replace a busybox applet of the same name (none today, but keep it explicit).
        let _ = std::fs::remove_file(root.join("bin").join(name));
        install(&root, src, &Path::new("/bin").join(name), 0o755)?;
        libs.extend(shared_libraries(src)?);
    }
    for lib in &libs {
        if let Some(d) = lib.parent() {
            lib_dirs.insert(d.display().to_string());
        }
        // Copy the file the symlink points to, under the name the loader asks for.
        install(&root, &std::fs::canonicalize(lib)?, lib, 0o755)?;
    }
    std::fs::write(
        root.join("etc/gds-ld-path"),
        lib_dirs.into_iter().collect::<Vec<_>>().join(":"),
    )?;
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")?;
    std::fs::write(root.join("init"), INIT)?;
    std::fs::set_permissions(root.join("init"), std::fs::Permissions::from_mode(0o755))?;
    cpio(&root, out)
}
