//! End-to-end tests of `gds-agent probe`: the real binary against fixture trees
//! (tests/fixtures/probe/*), a tree of FIFOs (must not hang), a tree read as an unprivileged
//! user (permission denied), and the live host.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_gds-agent");

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/probe")
        .join(name)
}

/// Runs the binary with a deadline: a hang is a failure, not a stuck test run.
fn run_with_deadline(mut cmd: Command) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn gds-agent");
    let start = Instant::now();
    loop {
        if child.try_wait().expect("wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("gds-agent probe did not finish within 60 s (a blocking read?)");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn probe(root: &Path, json: bool) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.arg("probe").arg("--root").arg(root);
    if json {
        cmd.arg("--json");
    }
    let out = run_with_deadline(cmd);
    assert!(
        out.status.success(),
        "gds-agent probe failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn probe_json(root: &Path) -> Value {
    let out = probe(root, true);
    serde_json::from_slice(&out.stdout).expect("probe --json prints JSON")
}

fn known<'a>(v: &'a Value, what: &str) -> &'a Value {
    v.get("known")
        .unwrap_or_else(|| panic!("{what} is not known: {v}"))
}

fn unknown<'a>(v: &'a Value, what: &str) -> &'a str {
    v.get("unknown")
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("{what} is not unknown: {v}"))
}

/// Every `{"unknown": ...}` in the document carries a non-empty reason.
fn assert_reasons(v: &Value, path: &str) {
    match v {
        Value::Object(map) => {
            if let Some(why) = map.get("unknown") {
                let why = why.as_str().unwrap_or("");
                assert!(!why.trim().is_empty(), "{path}: unknown without a reason");
            }
            for (k, child) in map {
                assert_reasons(child, &format!("{path}.{k}"));
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                assert_reasons(child, &format!("{path}[{i}]"));
            }
        }
        _ => {}
    }
}

#[test]
fn gds_host_reports_facts_and_verdicts() {
    let r = probe_json(&fixture("gds-host"));
    assert_reasons(&r, "$");
    assert_eq!(r["schema_version"], 1);
    assert_eq!(r["live"], false);

    let gpus = r["gpu"]["gpus"].as_array().unwrap();
    assert_eq!(gpus.len(), 2);
    let g0 = &gpus[0];
    assert_eq!(g0["index"], 0);
    assert_eq!(g0["pci"], "0000:1b:00.0");
    assert_eq!(known(&g0["name"], "name"), "NVIDIA H100 80GB HBM3");
    assert_eq!(known(&g0["bar1_total_bytes"], "bar1"), 128u64 << 30);
    assert_eq!(known(&g0["pcie"], "pcie")["current_gen"], 5);
    assert_eq!(known(&g0["pcie"], "pcie")["current_width"], 16);
    assert_eq!(known(&g0["kernel_driver"], "driver"), "nvidia");
    assert_eq!(known(&gpus[1]["numa_node"], "numa"), 1);
    // Live-only facts are skipped with the reason.
    assert!(unknown(&g0["dma_buf_supported"], "dma-buf").contains("--root is not /"));
    assert!(unknown(&r["gpu"]["cuda"], "cuda").contains("--root is not /"));
    assert!(unknown(&r["kernel"]["io_uring"], "io_uring").contains("--root is not /"));
    assert!(unknown(&r["kernel"]["capabilities"], "caps").contains("--root is not /"));
    let drv = known(&r["gpu"]["kernel_driver"], "nvidia driver");
    assert_eq!(drv["version"], "580.95.05");
    assert_eq!(drv["open_kernel_module"], true);
    assert_eq!(known(&r["gpu"]["static_bar1"], "static bar1"), false);

    let nvfs = &r["nvidia_fs"];
    assert_eq!(nvfs["loaded"], true);
    assert_eq!(known(&nvfs["version"], "nvfs version"), "2.25");
    assert_eq!(known(&nvfs["device_count"], "devcount"), 2);
    let stats = known(&nvfs["stats"], "stats");
    assert_eq!(stats["driver_version"], "2.25.7");
    assert_eq!(stats["complete"], true);
    assert_eq!(stats["counters"]["reads_n"], 1024);
    assert_eq!(stats["counters"]["reads_readmib"], 4096);
    assert_eq!(stats["counters"]["bar1_map_active"], 1);
    assert_eq!(stats["gpus"][1]["counters"]["cross_root_port"], 100);
    let pd = known(&nvfs["peer_distance"], "peer_distance")
        .as_array()
        .unwrap();
    assert_eq!(pd.len(), 2);
    assert_eq!(pd[0]["p2p_ops"], 1024);
    assert_eq!(
        known(&nvfs["peer_affinity"], "peer_affinity")[0]["by_distance"][2],
        1024
    );

    let cufile = &r["cufile"];
    assert_eq!(
        known(&cufile["library"], "libcufile"),
        "/usr/local/cuda-12.8/targets/x86_64-linux/lib/libcufile.so.1.13.1"
    );
    assert_eq!(known(&cufile["version"], "cufile version"), "1.13.1");
    let cfg = known(&cufile["config"], "cufile.json");
    assert_eq!(cfg["allow_compat_mode"], true);
    assert_eq!(cfg["use_poll_mode"], false);
    assert_eq!(cfg["max_direct_io_size_kb"], 16384);
    assert_eq!(cfg["use_pci_p2pdma"], false);
    assert_eq!(cfg["parallel_io"], true);

    let ctrl = &r["nvme"]["controllers"][0];
    assert_eq!(ctrl["name"], "nvme0");
    assert_eq!(known(&ctrl["model"], "model"), "SAMSUNG MZWLO3T8HCLS-00A07");
    assert_eq!(known(&ctrl["transport"], "transport"), "pcie");
    assert_eq!(known(&ctrl["pci"], "nvme pci"), "0000:1c:00.0");
    assert_eq!(known(&ctrl["queue_count"], "queues"), 65);
    let ns = &ctrl["namespaces"][0];
    assert_eq!(known(&ns["logical_block_size"], "lba"), 4096);
    assert_eq!(
        known(&ns["capacity_bytes"], "capacity"),
        7501476528u64 * 512
    );
    assert_eq!(known(&ns["max_transfer_kb"], "mdts"), 2048);
    assert_eq!(known(&ns["generic_device"], "ng"), "/dev/ng0n1");

    let topo = r["topology"].as_array().unwrap();
    assert_eq!(topo.len(), 2);
    assert_eq!(known(&topo[0]["link"], "link"), "same_switch");
    assert_eq!(topo[0]["code"], "PIX");
    assert_eq!(known(&topo[1]["link"], "link"), "across_sockets");
    assert_eq!(topo[1]["code"], "SYS");

    let k = &r["kernel"];
    assert_eq!(known(&k["release"], "release"), "6.8.0-49-generic");
    assert_eq!(
        known(&k["config_source"], "config"),
        "/boot/config-6.8.0-49-generic"
    );
    assert_eq!(known(&k["config"]["CONFIG_PCI_P2PDMA"], "p2pdma"), "y");
    assert_eq!(
        known(&k["config"]["CONFIG_NVME_MULTIPATH"], "multipath"),
        "n"
    );
    assert_eq!(known(&k["btf"], "btf"), true);
    assert_eq!(known(&k["tracefs"], "tracefs"), "/sys/kernel/tracing");
    assert_eq!(known(&k["iommu"]["mode"], "iommu"), "passthrough");
    assert_eq!(k["iommu"]["units"], 2);

    let v = r["verdicts"].as_array().unwrap();
    assert_eq!(v[0]["path"], "gds");
    assert_eq!(v[0]["gds_mode"], "nvidia_fs");
    assert_eq!(v[0]["nvme"]["controller"], "nvme0");
    assert!(v[0]["blocked"].as_array().unwrap().is_empty());
    assert_eq!(v[1]["path"], "bounce");
    let blocked = v[1]["blocked"].as_array().unwrap();
    let reasons: Vec<&str> = blocked
        .iter()
        .map(|b| b["reason"].as_str().unwrap())
        .collect();
    assert!(
        reasons.iter().any(|r| r.contains("different sockets")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("use_pci_p2pdma")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("RMForceStaticBar1")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("multipath")),
        "{reasons:?}"
    );
    assert_eq!(known(&r["nvme"]["multipath"], "multipath"), true);
    for b in blocked {
        assert!(!b["action"].as_str().unwrap().is_empty());
    }
}

#[test]
fn gds_host_table_shows_the_verdict() {
    let out = probe(&fixture("gds-host"), false);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("GPU 0 [0000:1b:00.0]: gds via nvidia_fs (closest NVMe nvme0: PIX)"),
        "{text}"
    );
    assert!(text.contains("GPU 1 [0000:c1:00.0]: bounce"), "{text}");
    assert!(
        text.lines().any(|l| l.trim_start().starts_with("BAR1 total") && l.trim_end().ends_with(" 128 GiB")),
        "{text}"
    );
    assert!(text.contains("action: "), "{text}");
}

#[test]
fn host_without_gpus() {
    let r = probe_json(&fixture("no-gpu"));
    assert_reasons(&r, "$");
    assert!(r["gpu"]["gpus"].as_array().unwrap().is_empty());
    assert!(r["verdicts"].as_array().unwrap().is_empty());
    assert!(r["topology"].as_array().unwrap().is_empty());
    assert!(unknown(&r["gpu"]["kernel_driver"], "driver").contains("not loaded"));
    assert_eq!(r["nvidia_fs"]["loaded"], false);
    assert!(unknown(&r["nvidia_fs"]["stats"], "stats").contains("nvidia-fs is not loaded"));
    assert!(unknown(&r["cufile"]["library"], "libcufile").contains("libcufile not found"));
    let k = &r["kernel"];
    assert_eq!(known(&k["config_source"], "config"), "/proc/config.gz");
    assert_eq!(known(&k["config"]["CONFIG_PCI_P2PDMA"], "p2pdma"), "n");
    assert_eq!(known(&k["config"]["CONFIG_BLK_DEV_NVME"], "nvme"), "y");
    assert_eq!(known(&k["io_uring_disabled"], "io_uring_disabled"), 2);
    assert_eq!(known(&k["btf"], "btf"), false);
    assert!(unknown(&k["tracefs"], "tracefs").contains("not mounted"));
    assert_eq!(known(&k["iommu"]["mode"], "iommu"), "off");
    let ctrl = &r["nvme"]["controllers"][0];
    assert_eq!(known(&ctrl["model"], "model"), "QEMU NVMe Ctrl");
    assert!(unknown(&r["nvme"]["multipath"], "multipath").contains("does not exist"));
    assert_eq!(known(&ctrl["numa_node"], "numa"), -1);
    assert!(unknown(&ctrl["namespaces"][0]["generic_device"], "ng").contains("/dev/ng0n1"));
    let table = String::from_utf8(probe(&fixture("no-gpu"), false).stdout).unwrap();
    assert!(table.contains("none: no GPU found"), "{table}");
}

#[test]
fn broken_files_become_reasons() {
    let r = probe_json(&fixture("broken"));
    assert_reasons(&r, "$");
    let k = &r["kernel"];
    assert_eq!(
        unknown(&k["release"], "release"),
        "/proc/sys/kernel/osrelease is a directory, not a regular file"
    );
    assert!(unknown(&k["config_source"], "config").contains("not a gzip"));
    assert!(unknown(&k["io_uring_disabled"], "io_uring_disabled").contains("maybe"));
    let nvfs = &r["nvidia_fs"];
    assert_eq!(
        unknown(&nvfs["version"], "version"),
        "/proc/driver/nvidia-fs/version is larger than the 65536-byte read limit"
    );
    assert_eq!(
        unknown(&nvfs["peer_distance"], "peer_distance"),
        "/proc/driver/nvidia-fs/peer_distance is not text (binary or invalid UTF-8)"
    );
    assert_eq!(
        unknown(&nvfs["device_count"], "devcount"),
        "/proc/driver/nvidia-fs/devcount is a directory, not a regular file"
    );
    assert!(unknown(&nvfs["peer_affinity"], "peer_affinity").contains("does not exist"));
    // Truncated mid-line: what was there is parsed, and the truncation is flagged.
    let stats = known(&nvfs["stats"], "stats");
    assert_eq!(stats["counters"]["reads_n"], 1024);
    assert!(stats["counters"].get("writes_n").is_none());
    assert_eq!(stats["complete"], false);
    assert!(unknown(&r["gpu"]["kernel_driver"], "driver").contains("not text"));
    assert!(unknown(&r["gpu"]["static_bar1"], "static bar1").contains("read limit"));
    let g = &r["gpu"]["gpus"][0];
    assert!(unknown(&g["bar1_total_bytes"], "bar1").contains("BAR1 is not assigned"));
    assert!(unknown(&g["numa_node"], "numa").contains("not a number"));
    assert!(
        unknown(&r["cufile"]["config"], "cufile.json").starts_with("cannot parse /etc/cufile.json")
    );
    let ctrl = &r["nvme"]["controllers"][0];
    assert!(unknown(&ctrl["model"], "model").contains("not text"));
    assert!(unknown(&ctrl["queue_count"], "queues").contains("not a number"));
    let ns = &ctrl["namespaces"][0];
    assert!(unknown(&ns["logical_block_size"], "lba").contains("is a directory"));
    assert_eq!(r["verdicts"][0]["path"], "bounce");
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(
        unsafe { libc::mkfifo(c.as_ptr(), 0o666) },
        0,
        "mkfifo {}",
        path.display()
    );
}

#[test]
fn fifos_never_block_the_probe() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let nvfs = root.join("proc/driver/nvidia-fs");
    std::fs::create_dir_all(&nvfs).unwrap();
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::create_dir_all(root.join("proc/sys/kernel")).unwrap();
    for name in [
        "stats",
        "version",
        "peer_distance",
        "peer_affinity",
        "devcount",
    ] {
        mkfifo(&nvfs.join(name));
    }
    mkfifo(&root.join("etc/cufile.json"));
    mkfifo(&root.join("proc/sys/kernel/osrelease"));
    mkfifo(&root.join("proc/config.gz"));
    let r = probe_json(root);
    assert_eq!(
        unknown(&r["nvidia_fs"]["stats"], "stats"),
        "/proc/driver/nvidia-fs/stats is a FIFO, not a regular file"
    );
    assert!(unknown(&r["cufile"]["config"], "cufile.json").contains("FIFO"));
    assert!(unknown(&r["kernel"]["release"], "release").contains("FIFO"));
    assert!(unknown(&r["kernel"]["config_source"], "config").contains("FIFO"));
}

#[test]
fn unreadable_files_report_permission_denied() {
    // Root bypasses file modes, so when the tests run as root the probe runs as `nobody`.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755)).unwrap();
    let nvfs = root.join("proc/driver/nvidia-fs");
    std::fs::create_dir_all(&nvfs).unwrap();
    for d in ["proc", "proc/driver", "proc/driver/nvidia-fs"] {
        std::fs::set_permissions(root.join(d), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::write(nvfs.join("stats"), "NVFS statistics(ver: 4.0)\n").unwrap();
    std::fs::set_permissions(nvfs.join("stats"), std::fs::Permissions::from_mode(0o000)).unwrap();
    std::fs::write(nvfs.join("version"), "version: 2.25\n").unwrap();
    std::fs::set_permissions(nvfs.join("version"), std::fs::Permissions::from_mode(0o644)).unwrap();

    let mut cmd = Command::new(BIN);
    cmd.arg("probe").arg("--root").arg(root).arg("--json");
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        use std::os::unix::process::CommandExt;
        cmd.uid(65534).gid(65534);
    }
    let out = run_with_deadline(cmd);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        unknown(&r["nvidia_fs"]["stats"], "stats"),
        "permission denied reading /proc/driver/nvidia-fs/stats"
    );
    assert_eq!(known(&r["nvidia_fs"]["version"], "version"), "2.25");
    let v = &r["nvidia_fs"];
    assert_eq!(v["loaded"], true);
}

#[test]
fn live_host_probe_works() {
    let r = probe_json(Path::new("/"));
    assert_reasons(&r, "$");
    assert_eq!(r["live"], true);
    // The running kernel's release, as uname reports it.
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert_eq!(known(&r["kernel"]["release"], "release"), release.trim());
    // Live-only facts were attempted: known, or unknown for a reason other than "skipped".
    for fact in [
        &r["kernel"]["io_uring"],
        &r["kernel"]["capabilities"],
        &r["gpu"]["cuda"],
    ] {
        if let Some(why) = fact.get("unknown") {
            assert!(!why.as_str().unwrap().contains("skipped"), "{fact}");
        }
    }
    // The capabilities are those of the probe process, which inherits ours.
    let caps = known(&r["kernel"]["capabilities"], "caps");
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let cap_eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .unwrap()
        .trim();
    assert_eq!(caps["cap_eff"], cap_eff);
    let bits = u64::from_str_radix(cap_eff, 16).unwrap();
    assert_eq!(caps["cap_sys_admin"], bits & (1 << 21) != 0);
    assert_eq!(caps["cap_perfmon"], bits & (1 << 38) != 0);
    assert_eq!(caps["cap_bpf"], bits & (1 << 39) != 0);
    // Without libcuda (CI, this machine) the GPU section says so.
    let has_cuda = Path::new("/usr/lib/x86_64-linux-gnu/libcuda.so.1").exists()
        || Path::new("/usr/lib64/libcuda.so.1").exists();
    if !has_cuda {
        assert!(unknown(&r["gpu"]["cuda"], "cuda").contains("libcuda"));
    }
}

#[test]
fn root_must_be_a_directory() {
    let out = run_with_deadline({
        let mut c = Command::new(BIN);
        c.args(["probe", "--root", "/nonexistent/gds-probe-root"]);
        c
    });
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a directory"));
}

#[test]
fn metrics_export_capability_and_nvidia_fs_counters() {
    let registry = prometheus::Registry::new();
    gds_probe::metrics::register_metrics(&registry, &fixture("gds-host")).unwrap();
    let families = registry.gather();
    let find = |name: &str| families.iter().find(|f| f.name() == name);
    let info = find("gds_capability_info").expect("gds_capability_info");
    assert_eq!(info.get_metric().len(), 2);
    let labels = |m: &prometheus::proto::Metric| -> Vec<(String, String)> {
        m.get_label()
            .iter()
            .map(|l| (l.name().to_owned(), l.value().to_owned()))
            .collect()
    };
    let by_gpu = |gpu: &str| {
        info.get_metric()
            .iter()
            .map(labels)
            .find(|l| l.contains(&("gpu".to_owned(), gpu.to_owned())))
            .unwrap_or_else(|| panic!("no gds_capability_info for gpu {gpu}"))
    };
    let gpu0 = by_gpu("0");
    for want in [
        ("gpu", "0"),
        ("path", "gds"),
        ("gds_mode", "nvidia_fs"),
        ("nvidia_fs", "loaded"),
        ("cufile", "1.13.1"),
        ("p2pdma", "y"),
        ("kernel", "6.8.0-49-generic"),
    ] {
        assert!(
            gpu0.contains(&(want.0.to_owned(), want.1.to_owned())),
            "{gpu0:?} lacks {want:?}"
        );
    }
    let gpu1 = by_gpu("1");
    assert!(
        gpu1.contains(&("path".to_owned(), "bounce".to_owned())),
        "{gpu1:?}"
    );
    let up = find("gds_nvidia_fs_up").unwrap();
    assert_eq!(up.get_metric()[0].get_gauge().get_value(), 1.0);
    let reads = find("gds_nvidia_fs_reads_n_total").expect("reads counter");
    assert_eq!(reads.get_metric()[0].get_counter().get_value(), 1024.0);
    let registered = find("gds_nvidia_fs_gpu_registered_mib").expect("per-GPU gauge");
    assert_eq!(registered.get_metric().len(), 2);
    // The text format renders without error and carries the info metric.
    let text = prometheus::TextEncoder::new()
        .encode_to_string(&families)
        .unwrap();
    assert!(text.contains("gds_capability_info{"), "{text}");

    // Without nvidia-fs: only the info metric and up=0.
    let registry = prometheus::Registry::new();
    gds_probe::metrics::register_metrics(&registry, &fixture("no-gpu")).unwrap();
    let families = registry.gather();
    let up = families
        .iter()
        .find(|f| f.name() == "gds_nvidia_fs_up")
        .unwrap();
    assert_eq!(up.get_metric()[0].get_gauge().get_value(), 0.0);
    assert!(
        !families
            .iter()
            .any(|f| f.name() == "gds_nvidia_fs_reads_n_total")
    );
    let info = families
        .iter()
        .find(|f| f.name() == "gds_capability_info")
        .unwrap();
    let l = labels(&info.get_metric()[0]);
    assert!(l.contains(&("gpu".to_owned(), "none".to_owned())), "{l:?}");
}

#[test]
fn typed_verdicts_for_the_data_path() {
    use gds_probe::{DataPath, GdsMode, HostRoot, Report};
    let report = Report::collect(&HostRoot::new(fixture("gds-host")));
    let v0 = report.verdict_for_gpu(0).expect("GPU 0");
    assert_eq!(v0.path, DataPath::Gds);
    assert_eq!(v0.gds_mode, Some(GdsMode::NvidiaFs));
    assert_eq!(
        v0.nvme.as_ref().map(|n| n.controller.as_str()),
        Some("nvme0")
    );
    let v1 = report.verdict_for_gpu(1).expect("GPU 1");
    assert_eq!(v1.path, DataPath::Bounce);
    assert!(v1.blocked.iter().any(|b| b.path == DataPath::P2p));
    assert!(report.verdict_for_gpu(2).is_none());
    let report = Report::collect(&HostRoot::new(fixture("no-gpu")));
    assert!(report.verdict_for_gpu(0).is_none());
}
