//! `cargo xtask vm-test`: boot Debian cloud kernels (6.1, 6.12) in QEMU with emulated NVMe
//! controllers and run the guest scenarios (`gds-user/crates/gds-vm-scenarios`) inside.
//!
//! Host side (this module): install qemu/busybox/cpio/fio if missing, fetch and cache kernels
//! (`kernel`), build the guest binaries and an initramfs with their libraries (`initramfs`),
//! boot each kernel with a fresh set of NVMe disks ([`GuestMachine`]), and parse the serial
//! console's `@@GDS` marker lines into per-scenario results. Any scenario that fails, times out
//! or never reports fails the command.
//!
//! Guest side: scenarios are registered in the guest binary, so new ones (e.g. tracing with
//! `gds-agent run` inside the guest) need no change here. The console log of each boot is kept
//! at `target/vm/run-<series>/console.log`.

mod initramfs;
mod kernel;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::setup::target_dir;
use anyhow::{Context, Result, bail};
use clap::Args;

pub use kernel::{GuestKernel, P2PDMA_SERIES};

#[derive(Args, Clone, Debug)]
pub struct VmTestArgs {
    /// Debian kernels to boot, comma-separated: `6.1`, `6.12` (cloud images, NVMe built in),
    /// `6.1-generic`, `6.12-generic` (NVMe as modules, loaded by the guest's init),
    /// `6.12-p2pdma` (the local CONFIG_PCI_P2PDMA kernel with a peer controller: runs the
    /// `p2pdma.*` scenarios only; skipped with a note when its image is missing).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "6.1,6.12,6.1-generic,6.12-generic,6.12-p2pdma"
    )]
    pub kernels: Vec<String>,
    /// Only these guest scenarios (comma-separated names; `prefix*` matches a prefix).
    #[arg(long)]
    pub only: Option<String>,
    /// Multiply every scenario's timeout (slow hosts).
    #[arg(long, default_value_t = 1.0)]
    pub timeout_scale: f64,
    /// Build the guest binaries with the dev profile (faster build, slower guest).
    #[arg(long)]
    pub debug: bool,
    /// Use gds-agent and gds-vm-scenarios from this directory instead of building them.
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// Give up on a guest that has not powered off after this many seconds.
    #[arg(long, default_value_t = 900)]
    pub boot_timeout_s: u64,
}

impl Default for VmTestArgs {
    fn default() -> Self {
        Self {
            kernels: ["6.1", "6.12", "6.1-generic", "6.12-generic", P2PDMA_SERIES]
                .map(String::from)
                .to_vec(),
            only: None,
            timeout_scale: 1.0,
            debug: false,
            bin_dir: None,
            boot_timeout_s: 900,
        }
    }
}

/// One emulated NVMe namespace.
#[derive(Clone, Debug)]
pub struct GuestNamespace {
    pub nsid: u32,
    pub size_mib: u64,
    pub lba_size: u32,
}

/// One emulated NVMe controller. Guests find it by `serial`, not by instance number.
#[derive(Clone, Debug)]
pub struct GuestController {
    pub serial: String,
    pub namespaces: Vec<GuestNamespace>,
    /// QEMU block throttling (`throttling.iops-total`) on every namespace's drive. QEMU lets a
    /// burst of about iops/10 requests through unthrottled before the limit applies.
    pub iops_limit: Option<u32>,
    /// A controller memory buffer of this many MiB, which a P2PDMA kernel publishes as
    /// p2pmem: the peer memory of the `p2pdma.*` scenarios (stand-in for a GPU's BAR1).
    pub cmb_mib: Option<u32>,
}

/// The NVMe side of a guest.
#[derive(Clone, Debug)]
pub struct GuestMachine {
    pub controllers: Vec<GuestController>,
    pub memory_mib: u32,
    pub cpus: u32,
    /// QEMU `-cpu` model under emulation (default `max`).
    pub cpu: &'static str,
    /// Scenarios this machine runs when none are asked for (`--only`); None: all.
    pub default_only: Option<&'static str>,
}

impl GuestMachine {
    /// `gds-main`: nsid 1 (256 MiB, 512-byte LBAs) and nsid 2 (32 MiB, 4096-byte LBAs);
    /// `gds-slow`: nsid 1 (16 MiB) throttled to 50 IOPS, for stall scenarios.
    pub fn standard() -> Self {
        Self {
            controllers: vec![
                GuestController {
                    serial: "gds-main".into(),
                    namespaces: vec![
                        GuestNamespace {
                            nsid: 1,
                            size_mib: 256,
                            lba_size: 512,
                        },
                        GuestNamespace {
                            nsid: 2,
                            size_mib: 32,
                            lba_size: 4096,
                        },
                    ],
                    iops_limit: None,
                    cmb_mib: None,
                },
                GuestController {
                    serial: "gds-slow".into(),
                    namespaces: vec![GuestNamespace {
                        nsid: 1,
                        size_mib: 16,
                        lba_size: 512,
                    }],
                    iops_limit: Some(50),
                    cmb_mib: None,
                },
            ],
            memory_mib: 1536,
            cpus: 2,
            cpu: "max",
            default_only: None,
        }
    }

    /// For [`P2PDMA_SERIES`]: `gds-main` plus `gds-peer`, whose 16 MiB controller memory
    /// buffer the kernel publishes as p2pmem. `-cpu EPYC`: the kernel allows P2P DMA through
    /// a host bridge only on AMD Zen (family 0x17 on) or whitelisted Intel bridges.
    pub fn p2pdma() -> Self {
        let mut m = Self::standard();
        m.controllers.truncate(1);
        m.controllers.push(GuestController {
            serial: "gds-peer".into(),
            namespaces: vec![GuestNamespace {
                nsid: 1,
                size_mib: 16,
                lba_size: 512,
            }],
            iops_limit: None,
            cmb_mib: Some(16),
        });
        m.cpu = "EPYC";
        m.default_only = Some("p2pdma*");
        m
    }

    /// The machine a kernel series boots with.
    pub fn for_series(series: &str) -> Self {
        if series == P2PDMA_SERIES {
            Self::p2pdma()
        } else {
            Self::standard()
        }
    }

    fn namespace_count(&self) -> usize {
        self.controllers.iter().map(|c| c.namespaces.len()).sum()
    }

    /// QEMU arguments for the controllers, with fresh zeroed disk images under `dir`.
    fn qemu_args(&self, dir: &Path) -> Result<Vec<String>> {
        let mut args = Vec::new();
        for (ci, c) in self.controllers.iter().enumerate() {
            args.push("-device".into());
            let cmb = c
                .cmb_mib
                .map(|n| format!(",cmb_size_mb={n}"))
                .unwrap_or_default();
            args.push(format!("nvme,id=nvme{ci},serial={}{cmb}", c.serial));
            for ns in &c.namespaces {
                let img = dir.join(format!("{}-ns{}.img", c.serial, ns.nsid));
                let f = std::fs::File::create(&img)?;
                f.set_len(ns.size_mib << 20)?;
                let throttle = c
                    .iops_limit
                    .map(|n| format!(",throttling.iops-total={n}"))
                    .unwrap_or_default();
                let id = format!("d{ci}n{}", ns.nsid);
                args.push("-drive".into());
                args.push(format!(
                    "file={},if=none,id={id},format=raw,cache=none,aio=threads{throttle}",
                    img.display()
                ));
                args.push("-device".into());
                args.push(format!(
                    "nvme-ns,drive={id},bus=nvme{ci},nsid={},logical_block_size={},\
                     physical_block_size={}",
                    ns.nsid, ns.lba_size, ns.lba_size
                ));
            }
        }
        Ok(args)
    }
}

/// One scenario's outcome in one guest.
#[derive(Clone, Debug)]
pub struct ScenarioResult {
    pub name: String,
    /// PASS, FAIL, TIMEOUT, or MISSING (planned but never reported).
    pub verdict: String,
    pub seconds: f64,
    pub reason: String,
    pub details: Vec<String>,
    pub metrics: Vec<(String, String)>,
}

impl ScenarioResult {
    pub fn passed(&self) -> bool {
        self.verdict == "PASS"
    }
}

#[derive(Clone, Debug)]
pub struct BootReport {
    pub kernel: GuestKernel,
    /// `uname -r` in the guest.
    pub release: String,
    pub results: Vec<ScenarioResult>,
    pub boot_seconds: f64,
    pub console_log: PathBuf,
    /// Why the boot as a whole failed (no DONE marker, timeout, QEMU error).
    pub failure: Option<String>,
    /// Set when the guest died mid-run and was booted again for the scenarios that had not
    /// reported: why the first boot ended.
    pub retried_after: Option<String>,
    /// The guest died: it ended without DONE and without the host killing it.
    died: bool,
}

impl BootReport {
    pub fn passed(&self) -> bool {
        self.failure.is_none() && self.results.iter().all(ScenarioResult::passed)
    }
}

/// Install the host tools the harness needs (qemu, busybox, cpio; fio is the throughput peer).
pub fn ensure_tools() -> Result<()> {
    crate::setup::apt_install(&[
        "qemu-system-x86",
        "busybox-static",
        "cpio",
        "fio",
        "e2fsprogs",
    ])
}

/// Build (or locate) the guest binaries: gds-agent and gds-vm-scenarios, plus fio.
pub fn guest_binaries(args: &VmTestArgs) -> Result<Vec<(PathBuf, String)>> {
    let dir = match &args.bin_dir {
        Some(d) => d.clone(),
        None => {
            let mut cmd = crate::setup::cargo();
            cmd.args([
                "build",
                "--package",
                "gds-user",
                "--package",
                "gds-vm-scenarios",
                "--bin",
                "gds-agent",
                "--bin",
                "gds-vm-scenarios",
            ]);
            if !args.debug {
                cmd.arg("--release");
            }
            crate::setup::run(&mut cmd)?;
            target_dir().join(if args.debug { "debug" } else { "release" })
        }
    };
    let mut bins = Vec::new();
    for name in ["gds-agent", "gds-vm-scenarios"] {
        let p = dir.join(name);
        if !p.is_file() {
            bail!("{} is missing", p.display());
        }
        bins.push((p, name.to_string()));
    }
    bins.push((PathBuf::from("/usr/bin/fio"), "fio".to_string()));
    // A real ext4 for the file-layer scenarios (busybox's mke2fs makes ext2 only).
    bins.push((PathBuf::from("/sbin/mke2fs"), "mkfs.ext4".to_string()));
    bins.push((standin_libcufile()?, "libcufile.so.0".to_string()));
    Ok(bins)
}

/// Builds the P2PDMA guest's stand-in libcufile (`gds-user/tests/fixtures/libcufile_standin.c`,
/// which says why it exists) with the host's C compiler, the one Rust links with.
fn standin_libcufile() -> Result<PathBuf> {
    let src = crate::setup::root().join("gds-user/tests/fixtures/libcufile_standin.c");
    let out = target_dir().join("vm").join("libcufile.so.0");
    std::fs::create_dir_all(out.parent().expect("under target"))?;
    crate::setup::run(
        Command::new("cc")
            .args(["-shared", "-fPIC", "-O2", "-Wall", "-Werror", "-o"])
            .arg(&out)
            .arg(&src),
    )?;
    Ok(out)
}

/// What one boot of a guest runs.
#[derive(Clone, Copy)]
pub struct BootPlan<'a> {
    /// Scenario selection (`--only`).
    pub only: Option<&'a str>,
    /// Scenarios not to run (they reported in an earlier boot that died).
    pub skip: &'a [String],
    /// 1 for the first boot, 2 for the boot after one that died (`gds.boot=` in the guest).
    pub attempt: u32,
    pub timeout_scale: f64,
    pub boot_timeout: Duration,
}

/// Boot `kernel` with `machine` and `initrd`, run the scenarios `plan` selects, and parse
/// the results.
pub fn boot(
    kernel: &GuestKernel,
    machine: &GuestMachine,
    initrd: &Path,
    plan: &BootPlan<'_>,
) -> Result<BootReport> {
    let BootPlan {
        only,
        skip,
        attempt,
        timeout_scale,
        boot_timeout,
    } = *plan;
    let run_dir = target_dir()
        .join("vm")
        .join(format!("run-{}", kernel.series));
    std::fs::create_dir_all(&run_dir)?;
    let console_log = run_dir.join("console.log");
    let mut append = format!(
        "console=ttyS0 loglevel=3 panic=-1 gds.ngs={} gds.scale={timeout_scale} gds.boot={}",
        machine.namespace_count(),
        attempt
    );
    if let Some(o) = only.or(machine.default_only) {
        append.push_str(&format!(" gds.only={o}"));
    }
    // After a boot that died (`boot_again`): the scenarios that reported are not run again.
    if !skip.is_empty() {
        append.push_str(&format!(" gds.skip={}", skip.join(",")));
    }
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-nographic",
        "-no-reboot",
        "-nodefaults",
        "-serial",
        "stdio",
    ])
    .args(["-m", &machine.memory_mib.to_string()])
    .args(["-smp", &machine.cpus.to_string()]);
    // Software emulation. /dev/kvm exists on some of these hosts but is unusable (QEMU aborts
    // setting MSRs with -cpu host, the guest faults on BMI2 with qemu64), so KVM is opt-in.
    if std::env::var_os("GDS_VM_KVM").is_some() {
        cmd.args(["-enable-kvm", "-cpu", "host"]);
    } else {
        cmd.args(["-accel", "tcg,thread=multi", "-cpu", machine.cpu]);
    }
    cmd.arg("-kernel")
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", &append])
        .args(machine.qemu_args(&run_dir)?)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    eprintln!(
        "xtask vm: booting {} ({}) with {} NVMe namespaces",
        kernel.series,
        kernel.package,
        machine.namespace_count()
    );
    let start = Instant::now();
    let mut child = cmd.spawn().context("start qemu-system-x86_64")?;
    let (tx, rx) = mpsc::channel::<String>();
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let tx2 = tx.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx2.send(format!("qemu: {line}"));
        }
    });
    let mut log = Vec::new();
    let mut parser = MarkerParser::default();
    let mut failure = None;
    let mut timed_out = false;
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                let line = line.replace('\r', "");
                if let Some(echo) = parser.feed(&line) {
                    eprintln!("  [{}] {echo}", kernel.series);
                }
                log.push(line);
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if start.elapsed() > boot_timeout {
            timed_out = true;
            let _ = child.kill();
            failure = Some(format!(
                "guest did not power off within {} s",
                boot_timeout.as_secs()
            ));
            break;
        }
    }
    let status = child.wait()?;
    std::fs::write(&console_log, log.join("\n") + "\n")?;
    if failure.is_none() && !parser.done {
        // Which of the two ways it ended: the runner died (init saw it exit and powered
        // off), or the kernel itself went down (panic, reset) before init could say anything.
        let how = match &parser.exit {
            Some(code) => format!("the scenario runner exited with status {code} before DONE"),
            None => "the runner never returned: the guest kernel panicked or reset".to_string(),
        };
        failure = Some(format!(
            "guest ended without the DONE marker ({how}; qemu {status}); see {}",
            console_log.display()
        ));
    }
    if failure.is_some() {
        // CI keeps only what xtask prints: the console's last lines say how the guest died
        // (a kernel panic, an oops, the scenario runner's last words).
        eprintln!(
            "xtask vm: {} guest failed; last {CONSOLE_TAIL} console lines:",
            kernel.series
        );
        for line in console_tail(&log, CONSOLE_TAIL) {
            eprintln!("  [{}] | {line}", kernel.series);
        }
    }
    // Without DONE, `failure` is set above; a timeout is the host's doing, not a death.
    let died = !parser.done && !timed_out;
    Ok(BootReport {
        kernel: kernel.clone(),
        release: parser.release.clone().unwrap_or_default(),
        results: parser.finish(),
        boot_seconds: start.elapsed().as_secs_f64(),
        console_log,
        died,
        failure,
        retried_after: None,
    })
}

/// Console lines printed when a guest fails.
const CONSOLE_TAIL: usize = 60;

/// The last `n` lines of the console without terminal colour codes (the agent logs in colour).
fn console_tail(log: &[String], n: usize) -> Vec<String> {
    log[log.len().saturating_sub(n)..]
        .iter()
        .map(|l| strip_ansi(l))
        .collect()
}

fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters final-byte (0x40..=0x7e).
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// A guest that died mid-run (kernel panic, reset, the runner killed) is booted once more for
/// the scenarios that had not reported; the ones that had keep their verdicts. The death is
/// printed with the console's last lines (by [`boot`]) and kept in `retried_after`, so the
/// summary and the CI log say it happened. A scenario that kills the guest again fails: the
/// second boot's failure stands.
///
/// Why retry at all: these guests run under software emulation (TCG) on a shared 2-core host,
/// and one CI run in about twenty lost its 6.12 guest between two scenarios with no output.
fn boot_again(
    kernel: &GuestKernel,
    machine: &GuestMachine,
    initrd: &Path,
    plan: &BootPlan<'_>,
    first: BootReport,
) -> Result<BootReport> {
    let why = first.failure.clone().unwrap_or_default();
    let (mut results, _missing): (Vec<ScenarioResult>, Vec<ScenarioResult>) = first
        .results
        .into_iter()
        .partition(|r| r.verdict != "MISSING");
    let reported: Vec<String> = results.iter().map(|r| r.name.clone()).collect();
    eprintln!(
        "xtask vm: the {} guest died ({why}); booting it again without the {} scenario(s) that reported",
        kernel.series,
        reported.len()
    );
    let first_log = first.console_log.with_file_name("console-first-boot.log");
    std::fs::rename(&first.console_log, &first_log)?;
    let again = BootPlan {
        skip: &reported,
        attempt: plan.attempt + 1,
        ..*plan
    };
    let mut second = boot(kernel, machine, initrd, &again)?;
    results.append(&mut second.results);
    second.results = results;
    second.boot_seconds += first.boot_seconds;
    second.retried_after = Some(format!(
        "{why} (first boot's console: {})",
        first_log.display()
    ));
    Ok(second)
}

/// Turns the guest's `@@GDS` lines into results.
#[derive(Default)]
struct MarkerParser {
    release: Option<String>,
    results: Vec<ScenarioResult>,
    done: bool,
    /// The runner's exit status, printed by /init after it returns.
    exit: Option<String>,
}

impl MarkerParser {
    fn entry(&mut self, name: &str) -> &mut ScenarioResult {
        if let Some(i) = self.results.iter().position(|r| r.name == name) {
            return &mut self.results[i];
        }
        self.results.push(ScenarioResult {
            name: name.to_string(),
            verdict: "MISSING".into(),
            seconds: 0.0,
            reason: "started but never reported".into(),
            details: Vec::new(),
            metrics: Vec::new(),
        });
        self.results.last_mut().unwrap()
    }

    /// Returns what to echo on the host's terminal.
    fn feed(&mut self, line: &str) -> Option<String> {
        // Kernel messages can share a line with a marker; the marker starts at "@@GDS ".
        let m = &line[line.find("@@GDS ")? + 6..];
        let (kind, rest) = m.split_once(' ').unwrap_or((m, ""));
        match kind {
            "BOOT" => {
                self.release = Some(rest.trim().to_string());
                Some(format!("booted {}", rest.trim()))
            }
            "DEVICES" => Some(format!("devices: {}", rest.trim())),
            "MODULES" => Some(format!("modules loaded: {}", rest.trim())),
            "MODULE-FAILED" => Some(format!("insmod failed: {}", rest.trim())),
            "START" => {
                let name = rest.split_whitespace().next()?;
                self.entry(name);
                None
            }
            "DETAIL" => {
                let (name, text) = rest.split_once(' ').unwrap_or((rest, ""));
                self.entry(name).details.push(text.to_string());
                None
            }
            "METRIC" => {
                let (name, kv) = rest.split_once(' ')?;
                let (k, v) = kv.split_once('=')?;
                self.entry(name)
                    .metrics
                    .push((k.to_string(), v.trim().to_string()));
                None
            }
            "RESULT" => {
                let mut it = rest.splitn(4, ' ');
                let (name, verdict, secs) = (it.next()?, it.next()?, it.next()?);
                let reason = it.next().unwrap_or("").to_string();
                let r = self.entry(name);
                r.verdict = verdict.to_string();
                r.seconds = secs.parse().unwrap_or(0.0);
                r.reason = reason;
                let summary = r
                    .details
                    .iter()
                    .rev()
                    .find_map(|d| d.strip_prefix("ok: ").or_else(|| d.strip_prefix("error: ")))
                    .unwrap_or(&r.reason)
                    .to_string();
                Some(format!("{verdict:7} {name} ({secs} s): {summary}"))
            }
            "DONE" => {
                self.done = true;
                Some(format!("done: {}", rest.trim()))
            }
            "EXIT" => {
                self.exit = Some(rest.trim().to_string());
                None
            }
            _ => None,
        }
    }

    fn finish(self) -> Vec<ScenarioResult> {
        self.results
    }
}

/// Everything `cargo xtask vm-test` does; `cargo xtask test` calls this with
/// `VmTestArgs::default()`. Returns the reports, or an error naming every failed scenario.
pub fn vm_test(args: &VmTestArgs) -> Result<Vec<BootReport>> {
    ensure_tools()?;
    let vm_dir = target_dir().join("vm");
    std::fs::create_dir_all(&vm_dir)?;
    let mut kernels = Vec::new();
    for s in &args.kernels {
        if s == P2PDMA_SERIES
            && let Some(why) = kernel::p2pdma_missing()
        {
            eprintln!("xtask vm: SKIP {s}: {why}");
            continue;
        }
        kernels.push(kernel::fetch(s, &vm_dir.join("kernels"))?);
    }
    let bins = guest_binaries(args)?;
    let initrd = vm_dir.join("initramfs.cpio");
    initramfs::build(&vm_dir, &bins, &initrd)?;
    let mut reports = Vec::new();
    let plan = BootPlan {
        only: args.only.as_deref(),
        skip: &[],
        attempt: 1,
        timeout_scale: args.timeout_scale,
        boot_timeout: Duration::from_secs(args.boot_timeout_s),
    };
    for k in &kernels {
        let machine = GuestMachine::for_series(&k.series);
        // A generic kernel's guest gets its NVMe modules appended to the common image.
        let initrd = if k.modules.is_empty() {
            initrd.clone()
        } else {
            let own = vm_dir.join(format!("initramfs-{}.cpio", k.series));
            initramfs::with_modules(&vm_dir, &initrd, &k.modules, &own)?;
            own
        };
        let mut report = boot(k, &machine, &initrd, &plan)?;
        if report.died {
            report = boot_again(k, &machine, &initrd, &plan, report)?;
        }
        reports.push(report);
    }
    print_summary(&reports);
    let mut failed = Vec::new();
    for r in &reports {
        if let Some(f) = &r.failure {
            failed.push(format!("{}: {f}", r.kernel.series));
        }
        for s in r.results.iter().filter(|s| !s.passed()) {
            failed.push(format!(
                "{} {}: {} {}",
                r.kernel.series,
                s.name,
                s.verdict,
                s.details
                    .iter()
                    .rev()
                    .find_map(|d| d.strip_prefix("error: "))
                    .unwrap_or(&s.reason)
            ));
        }
        if r.results.is_empty() && r.failure.is_none() {
            failed.push(format!("{}: no scenario ran", r.kernel.series));
        }
    }
    if failed.is_empty() && reports.iter().all(BootReport::passed) {
        return Ok(reports);
    }
    bail!(
        "vm-test: {} failure(s):\n  {}",
        failed.len(),
        failed.join("\n  ")
    )
}

fn print_summary(reports: &[BootReport]) {
    eprintln!("\nvm-test summary");
    for r in reports {
        let passed = r.results.iter().filter(|s| s.passed()).count();
        eprintln!(
            "  kernel {} ({}, {}): {passed}/{} passed in {:.0} s{}  [log {}]",
            r.kernel.series,
            r.release,
            r.kernel.package,
            r.results.len(),
            r.boot_seconds,
            r.failure
                .as_deref()
                .map(|f| format!(" - {f}"))
                .unwrap_or_default(),
            r.console_log.display()
        );
        if let Some(why) = &r.retried_after {
            eprintln!("    RETRIED: the first boot died: {why}");
        }
        for s in &r.results {
            eprintln!("    {:7} {:45} {:6.2} s", s.verdict, s.name, s.seconds);
            for (k, v) in &s.metrics {
                eprintln!("            {k} = {v}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_tail_is_the_last_lines_without_colour() {
        let log: Vec<String> = [
            "one",
            "\u{1b}[2m2026\u{1b}[0m \u{1b}[33m WARN\u{1b}[0m slow",
            "three",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(console_tail(&log, 2), vec!["2026  WARN slow", "three"]);
        assert_eq!(console_tail(&log, 10).len(), 3);
    }

    #[test]
    fn parses_markers_even_after_kernel_noise() {
        let mut p = MarkerParser::default();
        p.feed("@@GDS BOOT 6.12.100+deb12-cloud-amd64");
        p.feed("@@GDS START a first");
        p.feed("[    1.0] nvme nvme0: something@@GDS DETAIL a ok: fine");
        p.feed("@@GDS METRIC a mib_s=12.5");
        p.feed("@@GDS RESULT a PASS 0.50 ");
        p.feed("@@GDS START b second");
        p.feed("@@GDS START c third");
        p.feed("@@GDS RESULT b FAIL 1.00 exit status: 1");
        assert!(!p.done);
        p.feed("@@GDS DONE 1 1");
        assert!(p.done);
        assert_eq!(p.exit, None);
        p.feed("@@GDS EXIT 1");
        assert_eq!(p.exit.as_deref(), Some("1"));
        let r = p.finish();
        assert_eq!(r.len(), 3);
        assert!(r[0].passed());
        assert_eq!(r[0].metrics, vec![("mib_s".into(), "12.5".into())]);
        assert_eq!(r[0].details, vec!["ok: fine".to_string()]);
        assert_eq!(r[1].verdict, "FAIL");
        // Started, never reported (guest crashed mid-scenario): not a pass.
        assert_eq!(r[2].verdict, "MISSING");
        assert!(!r[2].passed());
    }
}
