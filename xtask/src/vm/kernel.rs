//! Debian cloud kernels for the guests, fetched with `apt-get download` and cached.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// A kernel image ready to boot.
#[derive(Clone, Debug)]
pub struct GuestKernel {
    /// The series asked for ("6.1", "6.12").
    pub series: String,
    /// The Debian package it came from.
    pub package: String,
    pub vmlinuz: PathBuf,
}

/// `linux-image-<series>…-cloud-amd64` packages apt knows, newest first.
fn candidates(series: &str) -> Result<Vec<String>> {
    let pattern = format!(
        "^linux-image-{}[.-].*-cloud-amd64$",
        series.replace('.', "\\.")
    );
    let search = |update: bool| -> Result<Vec<String>> {
        if update {
            crate::setup::run(Command::new("apt-get").args(["update", "-qq"]))?;
        }
        let out = Command::new("apt-cache")
            .args(["search", "--names-only", &pattern])
            .output()
            .context("apt-cache search")?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|n| !n.contains("-dbg") && !n.contains("-unsigned"))
            .map(String::from)
            .collect())
    };
    let mut names = search(false)?;
    if names.is_empty() {
        names = search(true)?;
    }
    newest_first(&mut names);
    Ok(names)
}

/// Sort package names newest first by the numbers in them (6.12.117+deb12 > 6.12.100+deb12,
/// 6.1.0-56 > 6.1.0-9).
fn newest_first(names: &mut [String]) {
    let key = |n: &String| -> Vec<u64> {
        n.split(|c: char| !c.is_ascii_digit())
            .filter(|s| !s.is_empty())
            .filter_map(|s| s.parse().ok())
            .collect()
    };
    names.sort_by_key(|n| std::cmp::Reverse(key(n)));
}

/// The newest cloud kernel of `series`, downloaded and unpacked under `cache` once.
pub fn fetch(series: &str, cache: &Path) -> Result<GuestKernel> {
    let dir = cache.join(series);
    let vmlinuz = dir.join("vmlinuz");
    let package_file = dir.join("PACKAGE");
    if vmlinuz.is_file()
        && let Ok(package) = std::fs::read_to_string(&package_file)
    {
        return Ok(GuestKernel {
            series: series.to_string(),
            package: package.trim().to_string(),
            vmlinuz,
        });
    }
    let debs = cache.join("debs");
    std::fs::create_dir_all(&debs)?;
    let names = candidates(series)?;
    if names.is_empty() {
        bail!("apt knows no linux-image-{series}*-cloud-amd64 package (is this Debian 12?)");
    }
    for name in names.iter().take(3) {
        eprintln!("xtask vm: fetching kernel {name}");
        let before: Vec<_> = list_debs(&debs)?;
        let ok = Command::new("apt-get")
            .args(["download", "-qq", name])
            .current_dir(&debs)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            continue;
        }
        let deb = list_debs(&debs)?
            .into_iter()
            .find(|d| {
                !before.contains(d)
                    || d.file_name()
                        .is_some_and(|f| f.to_string_lossy().starts_with(&format!("{name}_")))
            })
            .with_context(|| format!("apt-get download {name} left no .deb"))?;
        let unpack = dir.join("pkg");
        let _ = std::fs::remove_dir_all(&unpack);
        std::fs::create_dir_all(&unpack)?;
        crate::setup::run(Command::new("dpkg").arg("-x").arg(&deb).arg(&unpack))?;
        let image = std::fs::read_dir(unpack.join("boot"))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| {
                p.file_name()
                    .is_some_and(|f| f.to_string_lossy().starts_with("vmlinuz-"))
            })
            .with_context(|| format!("{name} has no boot/vmlinuz-*"))?;
        std::fs::copy(&image, &vmlinuz)?;
        std::fs::write(&package_file, name)?;
        let _ = std::fs::remove_dir_all(&unpack);
        return Ok(GuestKernel {
            series: series.to_string(),
            package: name.clone(),
            vmlinuz,
        });
    }
    bail!(
        "could not download any of {:?} with apt-get download",
        &names[..names.len().min(3)]
    )
}

fn list_debs(dir: &Path) -> Result<Vec<PathBuf>> {
    Ok(std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "deb"))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_kernel_first() {
        let mut v: Vec<String> = [
            "linux-image-6.1.0-9-cloud-amd64",
            "linux-image-6.1.0-56-cloud-amd64",
            "linux-image-6.1.0-47-cloud-amd64",
        ]
        .map(String::from)
        .to_vec();
        newest_first(&mut v);
        assert_eq!(v[0], "linux-image-6.1.0-56-cloud-amd64");
        assert_eq!(v[2], "linux-image-6.1.0-9-cloud-amd64");
        let mut w: Vec<String> = [
            "linux-image-6.12.100+deb12-cloud-amd64",
            "linux-image-6.12.117+deb12-cloud-amd64",
        ]
        .map(String::from)
        .to_vec();
        newest_first(&mut w);
        assert_eq!(w[0], "linux-image-6.12.117+deb12-cloud-amd64");
    }
}
