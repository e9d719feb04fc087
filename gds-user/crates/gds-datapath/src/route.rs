//! Which route a read takes: `auto` follows the probe's verdict for the destination GPU; an
//! explicit `--path` is checked and refused with a typed error naming every reason it is
//! impossible here (the probe's blockers, or what the request itself rules out).

use std::path::PathBuf;

use super::error::{DatapathError, Result, Why};
use super::source::SourceKind;
use gds_probe::{DataPath, Verdict};

/// `--path`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PathArg {
    /// The probe's verdict for the destination.
    Auto,
    /// cuFile with nvidia-fs or the kernel's P2PDMA (GPUDirect Storage proper).
    Gds,
    /// NVMe passthrough into peer device memory mapped into the process.
    P2p,
    /// io_uring into pinned host memory, overlapped copies to the GPU.
    Bounce,
    /// cuFile forced into compat mode (the peer the bounce route is measured against).
    Compat,
    /// read() + synchronous cuMemcpy (a floor, for benchmarks).
    Naive,
}

/// `--to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dest {
    Host,
    Gpu(u32),
    /// p2pmem of a PCI function: `/sys/bus/pci/devices/<bdf>/p2pmem`.
    P2pMem(PathBuf),
}

impl std::str::FromStr for Dest {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "host" => Ok(Dest::Host),
            "gpu" => Ok(Dest::Gpu(0)),
            _ => {
                if let Some(n) = s.strip_prefix("gpu:") {
                    return n
                        .parse()
                        .map(Dest::Gpu)
                        .map_err(|_| format!("bad GPU index in {s:?}"));
                }
                if let Some(p) = s.strip_prefix("p2pmem:") {
                    let path = if p.starts_with('/') {
                        PathBuf::from(p)
                    } else {
                        PathBuf::from("/sys/bus/pci/devices").join(p).join("p2pmem")
                    };
                    return Ok(Dest::P2pMem(path));
                }
                Err(format!(
                    "--to {s:?}: expected gpu, gpu:N, host or p2pmem:BDF"
                ))
            }
        }
    }
}

impl Dest {
    pub fn label(&self) -> String {
        match self {
            Dest::Host => "host".into(),
            Dest::Gpu(n) => format!("gpu{n}"),
            Dest::P2pMem(_) => "p2pmem".into(),
        }
    }
}

/// A resolved route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// io_uring into host memory (also the ceiling the GPU routes are measured against).
    Host,
    Bounce,
    Gds,
    Compat,
    Naive,
    P2p,
}

impl Route {
    /// The `path` label of the pipeline metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Route::Host => "host",
            Route::Bounce => "bounce",
            Route::Gds => "gds",
            Route::Compat => "compat",
            Route::Naive => "naive",
            Route::P2p => "p2p",
        }
    }
}

fn why(reason: impl Into<String>, action: impl Into<String>) -> Why {
    Why {
        reason: reason.into(),
        action: action.into(),
    }
}

fn blockers(v: &Verdict, path: DataPath) -> Vec<Why> {
    v.blocked
        .iter()
        .filter(|b| b.path == path)
        .map(|b| why(b.reason.clone(), b.action.clone()))
        .collect()
}

/// GPU BAR1 as a passthrough target: what is missing even where the probe allows P2P DMA.
pub fn gpu_bar1_mapping_missing() -> Why {
    why(
        "NVMe passthrough needs the GPU memory mapped into this process; a dma-buf export of GPU \
         memory cannot be mmapped, and a BAR1 user mapping needs GDRCopy's gdrdrv, which this \
         build does not drive",
        "use --path gds (cuFile over the kernel's P2PDMA), or --to p2pmem:BDF for a PCI p2pmem peer",
    )
}

/// Resolve `path` for `dest`. `verdict` is asked (once, lazily) for the probe's verdict of a GPU.
pub fn resolve(
    path: PathArg,
    dest: &Dest,
    kind: SourceKind,
    verdict: impl FnOnce(u32) -> Option<Verdict>,
) -> Result<(Route, Option<String>)> {
    let not_for = |p: &'static str, reason: &str, action: &str| DatapathError::RouteImpossible {
        path: p,
        why: vec![why(reason, action)],
    };
    match dest {
        Dest::Host => match path {
            PathArg::Auto | PathArg::Bounce => Ok((Route::Host, None)),
            PathArg::P2p => Err(not_for(
                "p2p",
                "--to host is host memory; the p2p route writes into peer device memory",
                "use --to p2pmem:BDF or --to gpu",
            )),
            PathArg::Gds | PathArg::Compat | PathArg::Naive => Err(not_for(
                match path {
                    PathArg::Gds => "gds",
                    PathArg::Compat => "compat",
                    _ => "naive",
                },
                "this route moves data into GPU memory and --to host asks for host memory",
                "use --to gpu[:N]",
            )),
        },
        Dest::P2pMem(_) => match path {
            PathArg::Auto | PathArg::P2p if kind == SourceKind::NvmeGeneric => {
                Ok((Route::P2p, None))
            }
            PathArg::Auto | PathArg::P2p => Err(not_for(
                "p2p",
                "the p2p route reads with NVMe passthrough, so SRC must be an NVMe namespace's generic device (/dev/ngXnY)",
                "give /dev/ngXnY as SRC",
            )),
            other => Err(not_for(
                match other {
                    PathArg::Gds => "gds",
                    PathArg::Bounce => "bounce",
                    PathArg::Compat => "compat",
                    _ => "naive",
                },
                "--to p2pmem is reached only by the p2p route",
                "use --path p2p (or auto)",
            )),
        },
        Dest::Gpu(n) => {
            let n = *n;
            match path {
                PathArg::Bounce => Ok((Route::Bounce, None)),
                PathArg::Compat => Ok((Route::Compat, None)),
                PathArg::Naive => Ok((Route::Naive, None)),
                PathArg::Gds => {
                    let Some(v) = verdict(n) else {
                        return Err(not_for("gds", &format!("the probe found no GPU {n}"), "check `gds-agent probe`"));
                    };
                    if v.path != DataPath::Gds {
                        return Err(DatapathError::impossible(DataPath::Gds, blockers(&v, DataPath::Gds)));
                    }
                    if kind == SourceKind::NvmeGeneric {
                        return Err(not_for(
                            "gds",
                            "cuFile reads files and block devices, not NVMe generic char devices",
                            "give the block device /dev/nvmeXnY or a file on it",
                        ));
                    }
                    Ok((Route::Gds, None))
                }
                PathArg::P2p => {
                    let mut whys = match verdict(n) {
                        Some(v) => blockers(&v, DataPath::P2p),
                        None => vec![why(format!("the probe found no GPU {n}"), "check `gds-agent probe`")],
                    };
                    if kind != SourceKind::NvmeGeneric {
                        whys.push(why(
                            "the p2p route reads with NVMe passthrough, so SRC must be /dev/ngXnY",
                            "give the namespace's generic device",
                        ));
                    }
                    whys.push(gpu_bar1_mapping_missing());
                    Err(DatapathError::impossible(DataPath::P2p, whys))
                }
                PathArg::Auto => match verdict(n) {
                    Some(v) => match v.path {
                        DataPath::Gds if kind != SourceKind::NvmeGeneric => Ok((Route::Gds, None)),
                        DataPath::Gds => Ok((
                            Route::Bounce,
                            Some("the probe says gds, but cuFile cannot read an NVMe char device: bounce".into()),
                        )),
                        DataPath::P2p => Ok((
                            Route::Bounce,
                            Some(format!(
                                "the probe allows p2p for GPU {n}, but: {}; taking bounce",
                                gpu_bar1_mapping_missing()
                            )),
                        )),
                        DataPath::Bounce => Ok((Route::Bounce, None)),
                    },
                    // No verdict: the GPU open will say why there is no GPU.
                    None => Ok((Route::Bounce, Some(format!("the probe found no GPU {n}")))),
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gds_probe::{Blocker, GdsMode};

    fn verdict(path: DataPath) -> Verdict {
        let b = |p, reason: &str| Blocker {
            path: p,
            mode: if p == DataPath::Gds {
                Some(GdsMode::NvidiaFs)
            } else {
                None
            },
            reason: reason.into(),
            action: "do something".into(),
        };
        Verdict {
            gpu: 0,
            pci: "0000:01:00.0".into(),
            path,
            gds_mode: None,
            nvme: None,
            blocked: match path {
                DataPath::Gds => vec![],
                DataPath::P2p => vec![b(DataPath::Gds, "nvidia-fs is not loaded")],
                DataPath::Bounce => vec![
                    b(DataPath::Gds, "nvidia-fs is not loaded"),
                    b(
                        DataPath::P2p,
                        "the kernel is built without CONFIG_PCI_P2PDMA",
                    ),
                ],
            },
            notes: vec![],
        }
    }

    #[test]
    fn dest_parsing() {
        assert_eq!("gpu".parse::<Dest>(), Ok(Dest::Gpu(0)));
        assert_eq!("gpu:3".parse::<Dest>(), Ok(Dest::Gpu(3)));
        assert_eq!("host".parse::<Dest>(), Ok(Dest::Host));
        assert_eq!(
            "p2pmem:0000:00:05.0".parse::<Dest>(),
            Ok(Dest::P2pMem(
                "/sys/bus/pci/devices/0000:00:05.0/p2pmem".into()
            ))
        );
        assert!("gpu:x".parse::<Dest>().is_err());
        assert!("disk".parse::<Dest>().is_err());
    }

    #[test]
    fn auto_follows_the_verdict() {
        let g = Dest::Gpu(0);
        let r = |p, k| resolve(PathArg::Auto, &g, k, |_| Some(verdict(p))).unwrap();
        assert_eq!(r(DataPath::Bounce, SourceKind::File).0, Route::Bounce);
        assert_eq!(r(DataPath::Gds, SourceKind::File).0, Route::Gds);
        assert_eq!(r(DataPath::Gds, SourceKind::NvmeGeneric).0, Route::Bounce);
        let (route, note) = r(DataPath::P2p, SourceKind::NvmeGeneric);
        assert_eq!(route, Route::Bounce);
        assert!(note.unwrap().contains("gdrdrv"));
        assert_eq!(
            resolve(PathArg::Auto, &Dest::Host, SourceKind::File, |_| panic!(
                "no probe for host"
            ))
            .unwrap()
            .0,
            Route::Host
        );
    }

    #[test]
    fn impossible_routes_name_why() {
        let g = Dest::Gpu(0);
        let e = resolve(PathArg::P2p, &g, SourceKind::File, |_| {
            Some(verdict(DataPath::Bounce))
        })
        .unwrap_err();
        let msg = e.to_string();
        assert!(msg.starts_with("--path p2p is not possible"), "{msg}");
        assert!(msg.contains("CONFIG_PCI_P2PDMA"), "{msg}");
        assert!(msg.contains("/dev/ngXnY"), "{msg}");
        assert!(!msg.contains("nvidia-fs"), "only p2p blockers: {msg}");

        let e = resolve(PathArg::Gds, &g, SourceKind::File, |_| {
            Some(verdict(DataPath::Bounce))
        })
        .unwrap_err();
        match &e {
            DatapathError::RouteImpossible { path, why } => {
                assert_eq!(*path, "gds");
                assert_eq!(why.len(), 1);
                assert_eq!(why[0].reason, "nvidia-fs is not loaded");
            }
            other => panic!("{other:?}"),
        }
        let e = resolve(PathArg::Gds, &g, SourceKind::File, |_| None).unwrap_err();
        assert!(e.to_string().contains("no GPU 0"));
        assert!(resolve(PathArg::Gds, &Dest::Host, SourceKind::File, |_| None).is_err());
        let pm = Dest::P2pMem("/x".into());
        assert_eq!(
            resolve(PathArg::Auto, &pm, SourceKind::NvmeGeneric, |_| None)
                .unwrap()
                .0,
            Route::P2p
        );
        assert!(
            resolve(PathArg::P2p, &pm, SourceKind::File, |_| None)
                .unwrap_err()
                .to_string()
                .contains("/dev/ngXnY")
        );
        assert!(resolve(PathArg::Bounce, &pm, SourceKind::NvmeGeneric, |_| None).is_err());
        // Explicit bounce / compat / naive need no verdict.
        for (p, want) in [
            (PathArg::Bounce, Route::Bounce),
            (PathArg::Compat, Route::Compat),
            (PathArg::Naive, Route::Naive),
        ] {
            assert_eq!(
                resolve(p, &g, SourceKind::File, |_| panic!("no probe"))
                    .unwrap()
                    .0,
                want
            );
        }
    }
}
