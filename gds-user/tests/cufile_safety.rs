//! The cuFile layer watches other people's programs as root: it must never harm one, and no
//! unprivileged process may make it do unbounded work (docs/RELIABILITY.md, "cuFile layer").
//!
//! - A library rewritten in place right after its last user exited: the next program that maps
//!   it runs correctly, 20 times of 20 (a uprobe left at an old offset makes the kernel run the
//!   old file's instruction there: `fixtures/libcufile_rewrite.c` says how that shows).
//! - An 8 GiB sparse file named `libcufile.so.0`, and a 3 GiB one named like the dynamic
//!   loader, mapped by `nobody`: the agent's RSS grows by less than 5 MiB and `/metrics`
//!   answers within 1 s throughout.
//!
//! Needs root, python3 and cc.

mod common;

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::{Agent, LineChild, cc, cufile_lock, libcufile, require_root, rss_kib, setpriv_nobody};
use gds_api::model::cufile::CufileReport;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// `cc` builds of `fixtures/libcufile_rewrite.c`: (old, new).
fn build_rewrite_libs(dir: &Path) -> (PathBuf, PathBuf) {
    let src = fixture("libcufile_rewrite.c");
    let build = |out: &str, old: bool| {
        let path = dir.join(out);
        let (p, src) = (path.to_str().unwrap(), src.to_str().unwrap());
        let mut args = vec![
            "-O1",
            "-shared",
            "-fPIC",
            "-fcf-protection=none",
            "-o",
            p,
            src,
        ];
        if old {
            args.push("-DOLD");
        }
        cc(&args);
        path
    };
    (build("old.so", true), build("new.so", false))
}

fn report(agent: &Agent) -> CufileReport {
    serde_json::from_str(&agent.get("/debug/cufile")).expect("/debug/cufile is a CufileReport")
}

/// Rounds of: a process maps the old build and calls it (the agent attaches), exits; the file
/// is rewritten in place at once (same inode: `open(O_TRUNC)` and write, as `cat new > old`,
/// `cp` and `rsync --inplace` do); a new program maps it and checks every result.
#[test]
fn library_rewritten_in_place_never_meets_old_probes() {
    require_root();
    // Its processes map files named libcufile: every agent of the tests running beside it
    // traces them, and those tests check global cuFile counters.
    let _serial = cufile_lock();
    const ROUNDS: usize = 20;
    let dir = tempfile::tempdir().unwrap();
    let (old, new) = build_rewrite_libs(dir.path());
    let new_bytes = std::fs::read(&new).unwrap();
    let agent = Agent::start(&[]);
    let mut failed = Vec::new();
    let mut writer_waits = Vec::new();
    for round in 0..ROUNDS {
        // A new inode each round, as a job that installs its library afresh.
        let lib = dir.path().join(format!("r{round}")).join("libcufile.so.0");
        std::fs::create_dir_all(lib.parent().unwrap()).unwrap();
        std::fs::copy(&old, &lib).unwrap();
        let ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&lib).unwrap());
        let mut a = LineChild::cufile_caller("python3", &[]);
        let pid = a.cmd_pid(&format!("load {}", lib.display()));
        let t = Instant::now();
        while !report(&agent)
            .libraries
            .iter()
            .any(|l| l.inode == ino && l.pids.contains(&pid))
        {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "round {round}: the old build was not attached within 10 s\n{}",
                agent.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        a.cmd("call cuFileRead 3");
        a.exit();
        // Rewritten in place right after the last user exited (the probes linger 5 s).
        let t = Instant::now();
        std::fs::write(&lib, &new_bytes).unwrap();
        writer_waits.push(t.elapsed());
        let out = Command::new("python3")
            .arg(fixture("rewrite_check.py"))
            .arg(&lib)
            .output()
            .expect("python3");
        let said = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if !out.status.success() || said != "ok" {
            failed.push(format!(
                "round {round}: {} {said} {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    let log = agent.log();
    assert!(
        failed.is_empty(),
        "{} of {ROUNDS} programs met old probes:\n{}\nagent log:\n{log}",
        failed.len(),
        failed.join("\n")
    );
    assert!(
        log.contains("is being changed on disk"),
        "the rewrite was never seen:\n{log}"
    );
    writer_waits.sort();
    eprintln!(
        "{ROUNDS} of {ROUNDS} ran correctly; the writer waited for the detach: median {:?}, max {:?}",
        writer_waits[ROUNDS / 2],
        writer_waits[ROUNDS - 1]
    );
}

/// `nobody` maps `names` in `dir` (read-only, private) and sleeps 30 s; returns once they are
/// mapped. Debian's python: one under /root (pyenv) is not reachable by nobody.
fn nobody_maps(dir: &Path, names: &[&str]) -> std::process::Child {
    let script = format!(
        "import mmap, os, time\n\
         ms = []\n\
         for n in {names:?}:\n\
         \x20   f = os.open(os.path.join('{}', n), os.O_RDONLY)\n\
         \x20   ms.append(mmap.mmap(f, os.fstat(f).st_size, mmap.MAP_PRIVATE, mmap.PROT_READ))\n\
         print('mapped', flush=True)\n\
         time.sleep(30)\n",
        dir.display()
    );
    let mut argv = setpriv_nobody("");
    argv.extend(["/usr/bin/python3".into(), "-c".into(), script]);
    let mut nobody = Command::new(&argv[0])
        .args(&argv[1..])
        .stdout(Stdio::piped())
        .spawn()
        .expect("setpriv python3");
    let mut line = String::new();
    BufReader::new(nobody.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "mapped");
    nobody
}

/// Huge sparse files named like libcufile and like the loader, mapped by `nobody`: refused
/// from their size, without reading them and without holding up the HTTP server.
#[test]
fn huge_files_named_like_libraries_cost_nothing() {
    require_root();
    // Its processes map files named libcufile: every agent of the tests running beside it
    // traces them, and those tests check global cuFile counters.
    let _serial = cufile_lock();
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let files = [
        ("libcufile.so.0", 8u64 << 30),
        ("ld-linux-x86-64.so.2", 3u64 << 30),
    ];
    for (name, size) in files {
        let f = std::fs::File::create(dir.path().join(name)).unwrap();
        // ELF magic first, then a hole: every byte the agent would read costs it memory.
        std::os::unix::fs::FileExt::write_all_at(&f, b"\x7fELF\x02\x01\x01", 0).unwrap();
        f.set_len(size).unwrap();
        std::fs::set_permissions(
            dir.path().join(name),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
    }
    let agent = Agent::start(&[]);
    // Settled: the first scans done, the allocator warm.
    std::thread::sleep(Duration::from_secs(2));
    for _ in 0..5 {
        agent.get("/metrics");
    }
    let before = rss_kib(agent.pid());
    // nobody maps both (read-only, private) and waits.
    let mut nobody = nobody_maps(dir.path(), &["libcufile.so.0", "ld-linux-x86-64.so.2"]);
    // 4 s: eight periodic scans, and the loader's notifications.
    let t = Instant::now();
    let mut slowest = Duration::ZERO;
    let mut peak = before;
    while t.elapsed() < Duration::from_secs(4) {
        let s = Instant::now();
        agent.get("/metrics");
        slowest = slowest.max(s.elapsed());
        peak = peak.max(rss_kib(agent.pid()));
        std::thread::sleep(Duration::from_millis(100));
    }
    let refused = report(&agent).not_traced;
    let _ = nobody.kill();
    let _ = nobody.wait();
    let grew = peak.saturating_sub(before);
    eprintln!(
        "agent RSS {before} KiB → peak {peak} KiB (+{grew} KiB); slowest /metrics {slowest:?}"
    );
    assert!(
        grew < 5 * 1024,
        "the agent grew by {grew} KiB mapping-by-nobody of huge files\n{}",
        agent.log()
    );
    assert!(
        slowest < Duration::from_secs(1),
        "/metrics took {slowest:?}"
    );
    assert!(
        refused
            .iter()
            .any(|f| f.path.ends_with("libcufile.so.0") && f.error.contains("limit")),
        "the 8 GiB libcufile.so.0 is not listed as refused for its size: {refused:?}"
    );
}

/// 50 copies of libcufile in one process, the agent under the shipped unit's limits as
/// systemd applies them (soft RLIMIT_NOFILE 1024, a pids limit of 200): every call counted,
/// `/metrics` answering throughout, and SIGTERM done within the unit's 20 s stop timeout,
/// without a panic.
#[test]
fn fifty_copies_under_the_units_limits() {
    require_root();
    // Its processes map files named libcufile: every agent of the tests running beside it
    // traces them, and those tests check global cuFile counters.
    let _serial = cufile_lock();
    const COPIES: usize = 50;
    const CALLS: usize = 4;
    let lib = libcufile()
        .expect("NVIDIA's libcufile: run `cargo xtask setup` (it installs it from PyPI)");
    let dir = tempfile::tempdir().unwrap();
    let copies: Vec<PathBuf> = (0..COPIES)
        .map(|i| {
            let p = dir.path().join(format!("c{i}")).join("libcufile.so.0");
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::copy(&lib, &p).unwrap();
            p
        })
        .collect();
    // The application: waits, loads every copy, waits, calls each copy's cuFileRead.
    let script = format!(
        "import ctypes, sys\n\
         sys.stdin.readline()\n\
         libs = [ctypes.CDLL(p) for p in {:?}]\n\
         print('loaded', flush=True)\n\
         sys.stdin.readline()\n\
         for l in libs:\n\
         \x20   f = l.cuFileRead\n\
         \x20   f.restype = ctypes.c_int64\n\
         \x20   for _ in range({CALLS}):\n\
         \x20       f(None, None, ctypes.c_size_t(4096), ctypes.c_int64(0), ctypes.c_int64(0))\n\
         print('called', flush=True)\n\
         sys.stdin.readline()\n",
        copies
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
    );
    let mut app = Command::new("python3")
        .args(["-c", &script])
        .current_dir(std::env::temp_dir())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut to_app = app.stdin.take().unwrap();
    let mut from_app = BufReader::new(app.stdout.take().unwrap());
    let app_pid = app.id().to_string();

    // A pids cgroup of 200 (v1 here; the unit's TasksMax, a pod's pids limit).
    let cg = Path::new("/sys/fs/cgroup/pids").join(format!("gds-test-{}", std::process::id()));
    std::fs::create_dir_all(&cg).expect("a pids cgroup (cgroup v1 pids controller)");
    std::fs::write(cg.join("pids.max"), "200").unwrap();
    let wrapper: Vec<String> = [
        "sh".to_owned(),
        "-c".to_owned(),
        format!(
            "echo $$ > {}/cgroup.procs && exec prlimit --nofile=1024: -- \"$@\"",
            cg.display()
        ),
        "sh".to_owned(),
    ]
    .into();
    let bin = Path::new(env!("CARGO_BIN_EXE_gds-agent"));
    // --pid: only this test's application (other tests' processes map libcufile too).
    let mut agent = Agent::spawn(
        tempfile::tempdir().unwrap(),
        &wrapper,
        bin,
        &["--pid", &app_pid],
    );
    agent.wait_serving();

    writeln!(to_app, "load").unwrap();
    let mut line = String::new();
    from_app.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "loaded");
    let t = Instant::now();
    loop {
        let r = report(&agent);
        let n = r
            .libraries
            .iter()
            .filter(|l| l.pids.iter().any(|p| p.to_string() == app_pid))
            .count();
        if n == COPIES {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "{n} of {COPIES} copies attached after 30 s\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let before = agent.scrape();
    writeln!(to_app, "call").unwrap();
    line.clear();
    from_app.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "called");
    let want = (COPIES * CALLS) as f64;
    let t = Instant::now();
    let mut slowest = Duration::ZERO;
    let counted = loop {
        let s = Instant::now();
        let now = agent.scrape();
        slowest = slowest.max(s.elapsed());
        let series = [("op", "read"), ("user", "trusted")];
        let n = now.value("gds_cufile_calls_total", &series)
            - before.value("gds_cufile_calls_total", &series);
        if n >= want || t.elapsed() > Duration::from_secs(5) {
            break n;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(counted, want, "calls counted of {COPIES} copies × {CALLS}");
    assert!(
        slowest < Duration::from_secs(1),
        "/metrics took {slowest:?}"
    );
    let threads = std::fs::read_dir(format!("/proc/{}/task", agent.pid()))
        .map(|d| d.count())
        .unwrap_or(0);

    // Shutdown with everything attached, inside the pids limit.
    let t = Instant::now();
    let (status, log) = agent.stop();
    let took = t.elapsed();
    let _ = writeln!(to_app, "exit");
    let _ = app.wait();
    let _ = std::fs::remove_dir(&cg);
    eprintln!(
        "{COPIES} copies: {counted} calls counted; agent threads {threads}; SIGTERM took {took:?}"
    );
    assert!(status.success(), "agent exited with {status}\n{log}");
    assert!(!log.contains("panicked"), "the agent panicked:\n{log}");
    assert!(
        took < Duration::from_secs(20),
        "SIGTERM took {took:?}\n{log}"
    );
}

/// CPU time (user + system) of the agent's thread named `name`, in clock ticks.
fn thread_ticks(pid: u32, name: &str) -> u64 {
    let mut total = 0;
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        // After the ")" that ends comm: state is field 3; utime and stime are 14 and 15.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<&str> = rest.split_whitespace().collect();
        total += f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
            + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    }
    total
}

/// An unprivileged `dlopen`/`dlclose` loop makes the loader notify the agent thousands of times
/// a second: the cuFile thread's work on them is bounded (20 % of a core for the maps it reads,
/// then it stops listening until the next second; the periodic scan goes on), where it took 83 %
/// of a core before.
#[test]
fn a_dlopen_storm_by_nobody_costs_the_agent_a_bounded_share_of_a_core() {
    require_root();
    // The cuFile thread's time is measured: not while other tests start cuFile processes,
    // which it then (rightly) attaches to.
    let _serial = cufile_lock();
    // A library no process has loaded: every dlopen maps it, every dlclose unmaps it (and the
    // loader calls `_dl_debug_state` around each).
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let lib = dir.path().join("libgdsstorm.so");
    let mut cc = Command::new("cc")
        .args(["-shared", "-fPIC", "-x", "c", "-", "-o"])
        .arg(&lib)
        .stdin(Stdio::piped())
        .spawn()
        .expect("cc");
    cc.stdin
        .take()
        .unwrap()
        .write_all(b"int gds_storm(void) { return 1; }\n")
        .unwrap();
    assert!(cc.wait().unwrap().success());
    let agent = Agent::start(&[]);
    std::thread::sleep(Duration::from_secs(1));
    let script = format!(
        "import ctypes, _ctypes, time\n\
         end = time.time() + 6\n\
         n = 0\n\
         while time.time() < end:\n\
         \x20   h = ctypes.CDLL('{}')._handle\n\
         \x20   _ctypes.dlclose(h)\n\
         \x20   n += 1\n\
         print(n, flush=True)\n",
        lib.display()
    );
    let mut argv = setpriv_nobody("");
    argv.extend(["/usr/bin/python3".into(), "-c".into(), script]);
    let storm = Command::new(&argv[0])
        .args(&argv[1..])
        .stdout(Stdio::piped())
        .spawn()
        .expect("setpriv python3");
    std::thread::sleep(Duration::from_secs(1));
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let (t0, c0) = (Instant::now(), thread_ticks(agent.pid(), "gds-cufile"));
    std::thread::sleep(Duration::from_secs(4));
    let (t1, c1) = (Instant::now(), thread_ticks(agent.pid(), "gds-cufile"));
    let out = storm.wait_with_output().unwrap();
    let loops: u64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    let share = (c1 - c0) as f64 / hz / (t1 - t0).as_secs_f64();
    let layers = agent.get("/debug/layers");
    eprintln!(
        "{loops} dlopen/dlclose in 6 s by nobody; the cuFile thread used {:.0} % of a core",
        share * 100.0
    );
    assert!(loops > 1000, "the storm did not run: {loops} loops");
    assert!(
        share < 0.30,
        "the cuFile thread used {:.0} % of a core under the storm\n{}",
        share * 100.0,
        agent.log()
    );
    assert!(
        layers.contains("loader notifications paused"),
        "/debug/layers does not say notifications were paused: {layers}"
    );
}

/// 300 junk files named `libcufile.so.N` mapped by `nobody`: the list of files not traced, the
/// log and the work stay bounded, and what was left out is counted (before: 3,000 files gave
/// 3,000 `not_traced` entries and 3,000 log lines).
#[test]
fn junk_libraries_are_listed_and_logged_within_bounds() {
    require_root();
    // Its processes map files named libcufile: every agent of the tests running beside it
    // traces them, and those tests check global cuFile counters.
    let _serial = cufile_lock();
    const JUNK: usize = 300;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    for i in 0..JUNK {
        let p = dir.path().join(format!("libcufile.so.{i}"));
        std::fs::write(&p, b"not an ELF file, only its name").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let agent = Agent::start(&[]);
    let names: Vec<String> = (0..JUNK).map(|i| format!("libcufile.so.{i}")).collect();
    let mut nobody = nobody_maps(
        dir.path(),
        &names.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    // Three periodic scans.
    std::thread::sleep(Duration::from_secs(2));
    let listed = report(&agent).not_traced.len();
    let layers = agent.get("/debug/layers");
    let _ = nobody.kill();
    let _ = nobody.wait();
    let log = agent.log();
    let logged = log.matches("cuFile: cannot trace").count();
    eprintln!("{JUNK} junk libraries: {listed} listed, {logged} log lines");
    assert!(listed <= 64, "{listed} files listed as not traced");
    assert!(logged <= 16, "{logged} 'cannot trace' log lines:\n{log}");
    assert!(
        layers.contains("untraceable files not listed"),
        "/debug/layers does not count the files left out: {layers}"
    );
}
