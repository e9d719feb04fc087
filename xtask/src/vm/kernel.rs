//! Debian kernels for the guests, fetched with `apt-get download` and cached.
//!
//! Two flavours per series: the cloud image (`linux-image-6.12…-cloud-amd64`), which builds
//! NVMe in, and the generic one (`linux-image-6.12…+deb12-amd64`, like Ubuntu's and RHEL's
//! kernels), which builds `nvme` and `nvme_core` as modules with module BTF. For a generic
//! kernel the NVMe modules, ext4 (a module there too: the file-layer scenarios hook its
//! functions through its module BTF) and everything they depend on (hard and `softdep pre:`)
//! are unpacked from the package, decompressed, and listed in load order, for the guest's
//! `/init` to `insmod`. A series is named `6.12` (cloud) or `6.12-generic`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// A kernel image ready to boot.
#[derive(Clone, Debug)]
pub struct GuestKernel {
    /// The series asked for ("6.1", "6.12", "6.12-generic").
    pub series: String,
    /// The Debian package it came from.
    pub package: String,
    pub vmlinuz: PathBuf,
    /// Modules the guest loads at boot, in load order (decompressed `.ko` files); empty for a
    /// kernel with NVMe built in.
    pub modules: Vec<PathBuf>,
}

/// The modules the generic kernels' guests load, with their dependencies.
const GUEST_MODULES: [&str; 2] = ["nvme", "ext4"];

/// `6.12` → (`6.12`, cloud); `6.12-generic` → (`6.12`, generic).
fn split_series(series: &str) -> (&str, bool) {
    match series.strip_suffix("-generic") {
        Some(s) => (s, true),
        None => (series, false),
    }
}

/// Whether `name` is a package of the flavour asked for: cloud, or the generic (signed)
/// image, not its -rt, -dbg or -unsigned siblings.
fn flavour_matches(name: &str, generic: bool) -> bool {
    if name.contains("-dbg") || name.contains("-unsigned") {
        return false;
    }
    if generic {
        name.ends_with("-amd64") && !name.contains("-cloud-") && !name.contains("-rt-")
    } else {
        name.ends_with("-cloud-amd64")
    }
}

/// Packages of `series` apt knows, newest first.
fn candidates(series: &str) -> Result<Vec<String>> {
    let (number, generic) = split_series(series);
    let pattern = format!("^linux-image-{}[.-].*-amd64$", number.replace('.', "\\."));
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
            .filter(|n| flavour_matches(n, generic))
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

/// The series of the P2PDMA kernel (`shared/kernels/bzImage-6.12-p2pdma`): Debian's 6.12
/// source and cloud config plus CONFIG_PCI_P2PDMA, which no Debian kernel has. Not fetched:
/// it is built once (`shared/kernels/build.sh`, an hour) and read from there.
pub const P2PDMA_SERIES: &str = "6.12-p2pdma";

/// The P2PDMA kernel's image: `GDS_P2PDMA_KERNEL`, else `shared/kernels` beside the checkout.
fn p2pdma_image() -> PathBuf {
    std::env::var_os("GDS_P2PDMA_KERNEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::setup::root().join("../shared/kernels/bzImage-6.12-p2pdma"))
}

/// Why the P2PDMA kernel cannot boot here (its image is missing), or None.
pub fn p2pdma_missing() -> Option<String> {
    let image = p2pdma_image();
    (!image.is_file()).then(|| {
        format!(
            "no P2PDMA kernel at {} (set GDS_P2PDMA_KERNEL, or build it with \
             shared/kernels/build.sh)",
            image.display()
        )
    })
}

/// The newest cloud kernel of `series`, downloaded and unpacked under `cache` once; for
/// [`P2PDMA_SERIES`], the local image.
pub fn fetch(series: &str, cache: &Path) -> Result<GuestKernel> {
    if series == P2PDMA_SERIES {
        if let Some(why) = p2pdma_missing() {
            bail!("{why}");
        }
        return Ok(GuestKernel {
            series: series.to_string(),
            package: "bzImage-6.12-p2pdma (Debian 6.12 + CONFIG_PCI_P2PDMA)".into(),
            vmlinuz: p2pdma_image(),
            modules: Vec::new(),
        });
    }
    let dir = cache.join(series);
    let vmlinuz = dir.join("vmlinuz");
    let package_file = dir.join("PACKAGE");
    let modules_file = dir.join("MODULES");
    let (_, generic) = split_series(series);
    if vmlinuz.is_file()
        && let Ok(package) = std::fs::read_to_string(&package_file)
        && let Ok(modules) = std::fs::read_to_string(&modules_file)
        // A cache made before a module joined the list is unpacked again.
        && (!generic
            || GUEST_MODULES
                .iter()
                .all(|m| modules.lines().any(|l| l == format!("{m}.ko"))))
    {
        return Ok(GuestKernel {
            series: series.to_string(),
            package: package.trim().to_string(),
            vmlinuz,
            modules: modules
                .lines()
                .map(|m| dir.join("modules").join(m))
                .collect(),
        });
    }
    let debs = cache.join("debs");
    std::fs::create_dir_all(&debs)?;
    let names = candidates(series)?;
    if names.is_empty() {
        bail!("apt knows no linux-image package for kernel {series} (is this Debian 12?)");
    }
    for name in names.iter().take(3) {
        let before: Vec<_> = list_debs(&debs)?;
        let cached = before.iter().any(|d| {
            d.file_name()
                .is_some_and(|f| f.to_string_lossy().starts_with(&format!("{name}_")))
        });
        let ok = cached || {
            eprintln!("xtask vm: fetching kernel {name}");
            Command::new("apt-get")
                .args(["download", "-qq", name])
                .current_dir(&debs)
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
        };
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
        let modules = if generic {
            unpack_modules(&unpack, &dir.join("modules"), &GUEST_MODULES)
                .with_context(|| format!("NVMe and ext4 modules of {name}"))?
        } else {
            Vec::new()
        };
        let names: Vec<String> = modules
            .iter()
            .filter_map(|m| m.file_name().map(|f| f.to_string_lossy().into_owned()))
            .collect();
        std::fs::write(&modules_file, names.join("\n"))?;
        std::fs::write(&package_file, name)?;
        let _ = std::fs::remove_dir_all(&unpack);
        return Ok(GuestKernel {
            series: series.to_string(),
            package: name.clone(),
            vmlinuz,
            modules,
        });
    }
    bail!(
        "could not download any of {:?} with apt-get download",
        &names[..names.len().min(3)]
    )
}

/// Module name as the kernel compares them (`nvme-core` = `nvme_core`).
fn canonical(name: &str) -> String {
    name.replace('-', "_")
}

/// `key=value` strings of a module's `.modinfo` section for `key` (the section is a run of
/// NUL-terminated strings; scanning the whole file for `\0key=` finds them without an ELF
/// parser, and no other section holds such strings).
fn modinfo(ko: &[u8], key: &str) -> Vec<String> {
    let needle = format!("\0{key}=");
    let needle = needle.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(pos) = ko[i..].windows(needle.len()).position(|w| w == needle) {
        let start = i + pos + needle.len();
        let end = ko[start..]
            .iter()
            .position(|&b| b == 0)
            .map_or(ko.len(), |e| start + e);
        out.push(String::from_utf8_lossy(&ko[start..end]).into_owned());
        i = end;
    }
    out
}

/// Modules a module needs loaded first: `depends=` and the `pre:` part of `softdep=`.
fn prerequisites(ko: &[u8]) -> Vec<String> {
    let mut deps: Vec<String> = modinfo(ko, "depends")
        .iter()
        .flat_map(|d| d.split(','))
        .filter(|d| !d.is_empty())
        .map(canonical)
        .collect();
    for soft in modinfo(ko, "softdep") {
        // "pre: crc64_rocksoft_generic post: x"
        let mut pre = false;
        for word in soft.split_whitespace() {
            match word {
                "pre:" => pre = true,
                "post:" => pre = false,
                m if pre => deps.push(canonical(m)),
                _ => {}
            }
        }
    }
    deps
}

/// Decompresses `targets` and every module they need from an unpacked kernel package into
/// `out`, and returns them in load order (dependencies first).
fn unpack_modules(pkg: &Path, out: &Path, targets: &[&str]) -> Result<Vec<PathBuf>> {
    let mut files = std::collections::HashMap::new();
    let mut stack = vec![pkg.join("lib/modules"), pkg.join("usr/lib/modules")];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Some(stem) = p
                .file_name()
                .and_then(|f| f.to_str())
                .and_then(|f| f.split(".ko").next().filter(|_| f.contains(".ko")))
            {
                files.insert(canonical(stem), p.clone());
            }
        }
    }
    if files.is_empty() {
        bail!("{} holds no kernel modules", pkg.display());
    }
    let _ = std::fs::remove_dir_all(out);
    std::fs::create_dir_all(out)?;
    let mut order = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for target in targets {
        visit(&canonical(target), &files, out, &mut seen, &mut order, 0)?;
    }
    Ok(order)
}

fn visit(
    name: &str,
    files: &std::collections::HashMap<String, PathBuf>,
    out: &Path,
    seen: &mut std::collections::HashSet<String>,
    order: &mut Vec<PathBuf>,
    depth: usize,
) -> Result<()> {
    if depth > 32 {
        bail!("module dependencies nest deeper than 32 at {name}");
    }
    // A softdep may name an alias: ext4's `pre: crypto-crc32c` is the crypto algorithm, which
    // `crc32c_generic.ko` provides (without it mounting a metadata_csum ext4 fails, ENOENT).
    let name = if matches!(name, "crc32c" | "crypto_crc32c") && !files.contains_key(name) {
        "crc32c_generic"
    } else {
        name
    };
    if !seen.insert(name.to_string()) {
        return Ok(());
    }
    // A prerequisite with no file is built in (e.g. crc64 on some kernels): nothing to load.
    let Some(src) = files.get(name) else {
        return Ok(());
    };
    let ko = decompress(src)?;
    for dep in prerequisites(&ko) {
        visit(&dep, files, out, seen, order, depth + 1)?;
    }
    let dest = out.join(format!("{name}.ko"));
    std::fs::write(&dest, &ko)?;
    order.push(dest);
    Ok(())
}

/// A module file's bytes: `.ko.xz` through `xz -dc`, `.ko.zst` through `zstd -dc`, `.ko` as is.
fn decompress(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        "xz"
    } else if name.ends_with(".zst") {
        "zstd"
    } else if name.ends_with(".gz") {
        "gzip"
    } else {
        return Ok(std::fs::read(path)?);
    };
    let out = Command::new(tool)
        .arg("-dc")
        .arg(path)
        .output()
        .with_context(|| format!("{tool} -dc {}", path.display()))?;
    if !out.status.success() {
        bail!(
            "{tool} -dc {} failed: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
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
    fn flavours_and_series() {
        assert_eq!(split_series("6.12-generic"), ("6.12", true));
        assert_eq!(split_series("6.1"), ("6.1", false));
        assert!(flavour_matches("linux-image-6.12.118+deb12-amd64", true));
        assert!(!flavour_matches(
            "linux-image-6.12.118+deb12-cloud-amd64",
            true
        ));
        assert!(!flavour_matches(
            "linux-image-6.12.118+deb12-rt-amd64",
            true
        ));
        assert!(!flavour_matches(
            "linux-image-6.1.0-57-amd64-unsigned",
            true
        ));
        assert!(flavour_matches("linux-image-6.1.0-57-cloud-amd64", false));
        assert!(!flavour_matches("linux-image-6.1.0-57-amd64", false));
    }

    #[test]
    fn modinfo_dependencies_and_softdeps() {
        let ko = b"\x7fELF junk\0license=GPL\0softdep=pre: crc64_rocksoft_generic post: zz\0\
                   depends=crc64,crc-t10dif\0name=t10_pi\0";
        assert_eq!(
            prerequisites(ko),
            vec!["crc64", "crc_t10dif", "crc64_rocksoft_generic"]
        );
        assert!(prerequisites(b"\0depends=\0").is_empty());
    }

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
