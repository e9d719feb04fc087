//! The p2p route for real: NVMe passthrough reads whose destination is peer device memory,
//! in a QEMU guest running the CONFIG_PCI_P2PDMA kernel (`shared/kernels/bzImage-6.12-p2pdma`)
//! with a data controller and a second controller whose 16 MiB controller memory buffer the
//! kernel publishes as p2pmem. `gds-agent read /dev/ngXn1 --to p2pmem:... --verify` maps
//! `p2pmem/allocate` and reads into it through the URING_CMD ring; every byte is compared (xxh3
//! per block) with a buffered read of `/dev/nvme0n1`. Skips with the reason when QEMU, busybox
//! or the kernel are missing.

use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_gds-agent");

fn kernel() -> PathBuf {
    std::env::var_os("GDS_P2PDMA_KERNEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/kernels/bzImage-6.12-p2pdma")
        })
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// Shared libraries of `bin` (absolute paths from ldd).
fn libs(bin: &Path) -> Vec<PathBuf> {
    let out = Command::new("ldd").arg(bin).output().expect("ldd");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
        .map(PathBuf::from)
        .collect()
}

const INIT: &str = r#"#!/bin/sh
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
P=$(ls -d /sys/bus/pci/devices/*/p2pmem | head -1)
# Controllers probe asynchronously, so which one is nvme0 differs between boots: the data
# namespace is the 64 MiB one (131072 sectors), the peer's is 16 MiB.
for b in /sys/class/block/nvme*n1; do [ "$(cat $b/size)" = 131072 ] && N=${b##*/nvme}; done
D=/dev/ng$N
echo "GDSP2P data $D"
echo "GDSP2P provider $P size $(cat $P/size) published $(cat $P/published)"
run() { name=$1; shift; /gds-agent "$@" > /out 2>&1; rc=$?; while read -r l; do echo "GDSP2P $name out $l"; done < /out; echo "GDSP2P $name rc $rc"; }
run small read $D --to p2pmem:$P --verify --size 8M --chunk 128k --qd 16 --json
run offset read $D --to p2pmem:$P --verify --offset 1M --size 12M --json
run toobig read $D --to p2pmem:$P --size 32M --json
run gpu read $D --to gpu --path p2p
run file read /gds-agent --to p2pmem:$P
echo "GDSP2P done"
poweroff -f
"#;

#[test]
fn p2p_route_reads_into_peer_memory_in_a_p2pdma_guest() {
    let k = kernel();
    let (Some(qemu), Some(busybox), Some(cpio)) =
        (which("qemu-system-x86_64"), which("busybox"), which("cpio"))
    else {
        eprintln!(
            "SKIP p2p guest: needs qemu-system-x86_64, busybox and cpio (cargo xtask test installs them)"
        );
        return;
    };
    if !k.is_file() {
        eprintln!(
            "SKIP p2p guest: no P2PDMA kernel at {} (set GDS_P2PDMA_KERNEL)",
            k.display()
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    for d in ["bin", "dev", "proc", "sys", "tmp"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy(&busybox, root.join("bin/busybox")).unwrap();
    for c in ["sh", "mount", "ls", "cat", "head", "poweroff", "echo"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(c)).unwrap();
    }
    std::fs::copy(BIN, root.join("gds-agent")).unwrap();
    for lib in libs(Path::new(BIN)) {
        let dst = root.join(lib.strip_prefix("/").unwrap());
        std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
        std::fs::copy(&lib, &dst).unwrap();
    }
    std::fs::write(root.join("init"), INIT).unwrap();
    std::fs::set_permissions(
        root.join("init"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let initrd = dir.path().join("initrd.cpio");
    let st = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd {} && find . | {} -o -H newc > {} 2>/dev/null",
            root.display(),
            cpio.display(),
            initrd.display()
        ))
        .status()
        .unwrap();
    assert!(st.success());
    // The data: 64 MiB of a position-dependent pattern; the peer's namespace is never read.
    let data: Vec<u8> = (0..64u64 << 20)
        .map(|i| (i.wrapping_mul(0x9E37_79B1) >> 9) as u8)
        .collect();
    std::fs::write(dir.path().join("data.img"), &data).unwrap();
    std::fs::File::create(dir.path().join("peer.img"))
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let out = Command::new(qemu)
        .current_dir(dir.path())
        // -cpu EPYC: the kernel allows P2P through the host bridge for AMD Zen hosts.
        .args([
            "-cpu",
            "EPYC",
            "-m",
            "2048",
            "-smp",
            "2",
            "-nographic",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(&k)
        .args([
            "-initrd",
            "initrd.cpio",
            "-append",
            "console=ttyS0 quiet panic=-1",
        ])
        .args([
            "-drive",
            "file=data.img,if=none,id=d0,format=raw",
            "-device",
            "nvme,serial=data0,drive=d0",
        ])
        .args([
            "-drive",
            "file=peer.img,if=none,id=d1,format=raw",
            "-device",
            "nvme,serial=peer0,drive=d1,cmb_size_mb=16",
        ])
        .output()
        .unwrap();
    let console = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = console
        .lines()
        .filter_map(|l| l.split_once("GDSP2P ").map(|x| x.1))
        .collect();
    eprintln!("{}", lines.join("\n"));
    assert!(lines.contains(&"done"), "guest did not finish:\n{console}");
    let provider = lines
        .iter()
        .find(|l| l.starts_with("provider "))
        .expect("a p2pmem provider");
    assert!(provider.contains("size 16777216 published 1"), "{provider}");
    let out_of = |name: &str| -> (i32, String) {
        let rc = lines
            .iter()
            .find_map(|l| l.strip_prefix(&format!("{name} rc ")))
            .unwrap_or_else(|| panic!("no rc for {name}"))
            .trim()
            .parse()
            .unwrap();
        let text: Vec<&str> = lines
            .iter()
            .filter_map(|l| l.strip_prefix(&format!("{name} out ")))
            .collect();
        (rc, text.join("\n"))
    };
    for (name, offset, len) in [("small", 0u64, 8u64 << 20), ("offset", 1 << 20, 12 << 20)] {
        let (rc, text) = out_of(name);
        assert_eq!(rc, 0, "{name}: {text}");
        let v: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        assert_eq!(v["path"], "p2p", "{v}");
        assert_eq!(v["dest"], "p2pmem", "{v}");
        assert_eq!(v["bytes"].as_u64(), Some(len), "{v}");
        assert_eq!(v["offset"].as_u64(), Some(offset), "{v}");
        assert!(v["verified"].is_string(), "{v}");
        assert_eq!(v["threads"].as_u64(), Some(1), "one passthrough ring: {v}");
    }
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(out_of("small").1.lines().last().unwrap())
            .unwrap()["qd"],
        16
    );
    let (rc, text) = out_of("toobig");
    assert_eq!(rc, 1);
    assert!(
        text.contains("p2pmem") && text.contains("mmap of 33554432 bytes"),
        "{text}"
    );
    let (rc, text) = out_of("gpu");
    assert_eq!(rc, 1);
    assert!(
        text.contains("--path p2p is not possible") && text.contains("gdrdrv"),
        "{text}"
    );
    let (rc, text) = out_of("file");
    assert_eq!(rc, 1);
    assert!(text.contains("/dev/ngXnY"), "{text}");
}
