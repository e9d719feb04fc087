//! Kernel modules: whether a kernel facility is built in, a loaded module (with or without its
//! BTF) or absent, read from sysfs.
//!
//! Distribution kernels (Debian, Ubuntu, RHEL) build `nvme` and `nvme_core` as modules, so the
//! `nvme:*` tracepoints and `struct nvme_request` exist only while `nvme_core` is loaded, and
//! the struct is described by `/sys/kernel/btf/nvme_core`, not by vmlinux. The tracer and the
//! probe both ask this module where a facility lives, so they say the same thing.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::bounded::HostRoot;

/// Where a module's facility lives on this kernel. Serialized as its [`label`](Self::label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Residence {
    /// Compiled into the kernel image: its types are in vmlinux BTF, it can never go away.
    BuiltIn,
    /// A loaded module; `btf`: `/sys/kernel/btf/<name>` describes its types.
    Module { btf: bool },
    /// Neither built in nor loaded (it may be loaded later).
    Absent,
}

impl Residence {
    /// The words the log and the probe use.
    pub fn describe(self) -> &'static str {
        match self {
            Residence::BuiltIn => "built in",
            Residence::Module { btf: true } => "module with BTF",
            Residence::Module { btf: false } => "module without BTF",
            Residence::Absent => "absent",
        }
    }

    /// A short machine label (`built_in`, `module_btf`, `module_no_btf`, `absent`).
    pub fn label(self) -> &'static str {
        match self {
            Residence::BuiltIn => "built_in",
            Residence::Module { btf: true } => "module_btf",
            Residence::Module { btf: false } => "module_no_btf",
            Residence::Absent => "absent",
        }
    }
}

impl Residence {
    const ALL: [Residence; 4] = [
        Residence::BuiltIn,
        Residence::Module { btf: true },
        Residence::Module { btf: false },
        Residence::Absent,
    ];
}

impl Serialize for Residence {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.label())
    }
}

impl<'de> Deserialize<'de> for Residence {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let label = String::deserialize(d)?;
        Residence::ALL
            .into_iter()
            .find(|r| r.label() == label)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown residence {label:?}")))
    }
}

/// What sysfs says about one module.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleInfo {
    /// As the kernel names it (`nvme_core`: underscores).
    pub name: String,
    pub residence: Residence,
    /// `initstate` of a loadable module: `live`, `coming`, `going`.
    pub state: Option<String>,
    /// `version` (few modules set one; nvme_core does not) and `srcversion` (a hash of the
    /// source, which tells two builds apart).
    pub version: Option<String>,
    pub srcversion: Option<String>,
    /// Users of a loaded module (`refcnt`); an attached tracer is one of them.
    pub refcnt: Option<u32>,
    /// `parameters/*` (e.g. nvme_core `multipath`, `io_timeout`), unreadable ones left out.
    pub parameters: BTreeMap<String, String>,
}

/// Reads module facts under a root (`/` on the live host; the probe's `--root` otherwise),
/// through the probe's bounded reads.
pub struct Modules {
    root: HostRoot,
}

/// Parameters read at most (a module with more is not a real module).
const MAX_PARAMETERS: usize = 256;
/// Controllers listed at most.
const MAX_CONTROLLERS: usize = 1024;

impl Modules {
    pub fn new(root: impl Into<std::path::PathBuf>) -> Modules {
        Modules {
            root: HostRoot::new(root),
        }
    }

    /// The running host.
    pub fn live() -> Modules {
        Modules::new("/")
    }

    fn attr(&self, host_path: &str) -> Option<String> {
        self.root.read_attr(host_path).ok()
    }

    /// Where module `name` lives. A module sysfs directory with `initstate` is a loaded
    /// module; one without is a built-in that has parameters (nvme_core always has some).
    pub fn residence(&self, name: &str) -> Residence {
        let name = canonical(name);
        let dir = format!("/sys/module/{name}");
        if self.root.exists(&format!("{dir}/initstate")) {
            Residence::Module {
                btf: self.has_btf(&name),
            }
        } else if self.root.is_dir(&dir) {
            Residence::BuiltIn
        } else {
            Residence::Absent
        }
    }

    /// Whether module `name` is loaded or built in.
    pub fn present(&self, name: &str) -> bool {
        self.residence(name) != Residence::Absent
    }

    /// Whether the kernel publishes BTF for module `name`.
    pub fn has_btf(&self, name: &str) -> bool {
        self.root.exists(&format!(
            "{}/{}",
            crate::btf::MODULE_BTF_DIR,
            canonical(name)
        ))
    }

    pub fn info(&self, name: &str) -> ModuleInfo {
        let name = canonical(name);
        let dir = format!("/sys/module/{name}");
        let parameters = self
            .root
            .list_dir(&format!("{dir}/parameters"), MAX_PARAMETERS)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|key| {
                let v = self.attr(&format!("{dir}/parameters/{key}"))?;
                Some((key, v))
            })
            .collect();
        ModuleInfo {
            residence: self.residence(&name),
            state: self.attr(&format!("{dir}/initstate")),
            version: self.attr(&format!("{dir}/version")),
            srcversion: self.attr(&format!("{dir}/srcversion")),
            refcnt: self
                .attr(&format!("{dir}/refcnt"))
                .and_then(|v| v.parse().ok()),
            parameters,
            name,
        }
    }

    /// How many NVMe controllers (PCIe or fabrics) are bound now.
    pub fn nvme_controllers(&self) -> usize {
        self.root
            .list_dir("/sys/class/nvme", MAX_CONTROLLERS)
            .map(|d| d.iter().filter(|e| e.starts_with("nvme")).count())
            .unwrap_or(0)
    }
}

/// The kernel's name of a module: `nvme-core` and `nvme_core` are the same module.
pub fn canonical(name: &str) -> String {
    name.replace('-', "_")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn write(root: &Path, path: &str, text: &str) {
        let p = root.join(path.trim_start_matches('/'));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    /// The four residences, from sysfs trees laid out as the kernel lays them out.
    #[test]
    fn residence_from_sysfs() {
        let dir = std::env::temp_dir().join(format!("gds-kmod-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let m = Modules::new(&dir);
        assert_eq!(m.residence("nvme_core"), Residence::Absent);
        // Built in: parameters, no initstate.
        write(&dir, "/sys/module/nvme_core/parameters/multipath", "Y\n");
        assert_eq!(m.residence("nvme-core"), Residence::BuiltIn);
        // Loaded module without BTF, then with.
        write(&dir, "/sys/module/nvme_core/initstate", "live\n");
        write(&dir, "/sys/module/nvme_core/refcnt", "1\n");
        write(&dir, "/sys/module/nvme_core/srcversion", "ABC123\n");
        assert_eq!(m.residence("nvme_core"), Residence::Module { btf: false });
        write(&dir, "/sys/kernel/btf/nvme_core", "\u{9f}");
        assert_eq!(m.residence("nvme_core"), Residence::Module { btf: true });
        let info = m.info("nvme-core");
        assert_eq!(info.name, "nvme_core");
        assert_eq!(info.state.as_deref(), Some("live"));
        assert_eq!(info.refcnt, Some(1));
        assert_eq!(info.srcversion.as_deref(), Some("ABC123"));
        assert_eq!(info.version, None);
        assert_eq!(
            info.parameters.get("multipath").map(String::as_str),
            Some("Y")
        );
        assert_eq!(m.nvme_controllers(), 0);
        std::fs::create_dir_all(dir.join("sys/class/nvme/nvme0")).unwrap();
        assert_eq!(m.nvme_controllers(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn labels_are_distinct_and_round_trip() {
        let labels: std::collections::BTreeSet<_> =
            Residence::ALL.iter().map(|r| r.label()).collect();
        assert_eq!(labels.len(), 4);
        for r in Residence::ALL {
            let json = serde_json::to_string(&r).unwrap();
            assert_eq!(json, format!("\"{}\"", r.label()));
            assert_eq!(serde_json::from_str::<Residence>(&json).unwrap(), r);
        }
        assert!(serde_json::from_str::<Residence>("\"nope\"").is_err());
        assert_eq!(
            Residence::Module { btf: false }.describe(),
            "module without BTF"
        );
    }
}
