//! `/debug/cufile` and `/debug/snapshot` stay bounded whatever the kernel's cuFile tables hold:
//! every list keeps its most relevant rows (`model::cufile::REPORT_*`) and says how many it
//! left out (`omitted`, `files_omitted`).
//!
//! The bug (issue 21, item 7): one process registering 9,000 handles filled the kernel's
//! 8,192-row file table and `/debug/snapshot` became 2.9 MB. Here 70 processes register a few
//! handles each and one more registers 9,000, all through real uprobes on the fixture
//! stand-in library (`fixtures/libcufile_standin.c`, whose `cuFileHandleRegister` returns at
//! once; the real libcufile blocks there without a GPU), driven by `fixtures/cufile_driver.c`.
//! Needs root and a C compiler.

mod common;

use std::{
    path::Path,
    time::{Duration, Instant},
};

use common::{Agent, LineChild, build_standin, cufile_lock, require_root};
use gds_api::model::{
    Snapshot,
    cufile::{CufileReport, REPORT_FILES_PER_PROCESS, REPORT_LIBRARY_PIDS, REPORT_PROCESSES},
};
use gds_common::cufile::CUFILE_FILES_MAX;

/// What the bounds promise: `/debug/cufile` under 512 KiB and `/debug/snapshot` (the same
/// report plus statistics, layers, stalls) under 1 MiB here, however many rows the kernel
/// holds (2.9 MB before).
const CUFILE_BODY_MAX: usize = 512 << 10;
const SNAPSHOT_BODY_MAX: usize = 1 << 20;
/// Processes with a few handles each: more than `/debug/cufile` lists.
const SMALL: usize = REPORT_PROCESSES + 6;
/// Files each of them registers: one more than a process lists, so every listed process is
/// listed at its largest (the body near its bound).
const SMALL_FILES: usize = REPORT_FILES_PER_PROCESS + 1;
/// Handles the flooding process registers: more than the kernel's 8,192 rows.
const FLOOD: usize = 9_000;

/// `fixtures/cufile_driver.c LIBRARY`, driven line by line.
struct Driver {
    line: LineChild,
    pid: u32,
}

impl Driver {
    /// Spawns it and has it dlopen the library.
    fn load(driver: &Path, lib: &Path) -> Driver {
        let argv = [driver.display().to_string(), lib.display().to_string()];
        let mut line = LineChild::spawn(&argv, &std::env::temp_dir());
        let pid = line.cmd_pid("load");
        Driver { line, pid }
    }

    fn cmd(&mut self, line: &str) -> String {
        self.line.cmd(line)
    }
}

fn report(agent: &Agent) -> (CufileReport, usize) {
    let body = agent.get("/debug/cufile");
    let r = serde_json::from_str(&body).expect("/debug/cufile is a CufileReport");
    (r, body.len())
}

/// Registers handles on `fds` descriptors of `d` until the agent counts them (its uprobes on
/// the process are attached a few ms after the dlopen). The newest caller is the most recent,
/// so it is listed whatever the bound.
fn register_until_counted(agent: &Agent, d: &mut Driver, fds: usize) {
    let t = Instant::now();
    loop {
        d.cmd(&format!("flood {fds} 1000"));
        let (r, _) = report(agent);
        let counted = r
            .processes
            .iter()
            .any(|p| p.pid == d.pid && p.counters.handle_registers > 0);
        if counted {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "process {} never counted:\n{}",
            d.pid,
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn debug_bodies_stay_bounded_with_the_cufile_tables_full() {
    require_root();
    let _lock = cufile_lock();
    let dir = tempfile::tempdir().unwrap();
    let (lib, driver) = build_standin(dir.path());
    // The driver under a name of its own: the agent traces only these processes (`--comm`
    // applies to the cuFile layer), not another test's.
    let name = format!("cfbody{}", std::process::id() % 1_000_000);
    let driver = {
        let named = dir.path().join(&name);
        std::fs::rename(&driver, &named).unwrap();
        named
    };
    let agent = Agent::start(&["--comm", &name]);

    // SMALL processes, SMALL_FILES files each, one after another (the first ones the least
    // recent).
    let mut small: Vec<Driver> = Vec::new();
    for _ in 0..SMALL {
        let mut d = Driver::load(&driver, &lib);
        register_until_counted(&agent, &mut d, SMALL_FILES);
        small.push(d);
    }
    // Then one process registers FLOOD handles, on as many descriptors.
    let mut flood = Driver::load(&driver, &lib);
    register_until_counted(&agent, &mut flood, 1);
    let answer = flood.cmd(&format!("flood {FLOOD} 2000"));
    assert!(answer.starts_with(&format!("flooded {FLOOD}")), "{answer}");

    let (r, size) = report(&agent);
    let snapshot_body = agent.get("/debug/snapshot");
    let s: Snapshot = serde_json::from_str(&snapshot_body).expect("/debug/snapshot decodes");
    let listed_files: usize = r.processes.iter().map(|p| p.files.len()).sum();
    eprintln!(
        "/debug/cufile {size} bytes: {} processes, {listed_files} files listed; omitted {:?}; \
         /debug/snapshot {} bytes",
        r.processes.len(),
        r.omitted,
        snapshot_body.len()
    );
    assert!(
        size < CUFILE_BODY_MAX,
        "/debug/cufile is {size} bytes; omitted: {:?}",
        r.omitted
    );
    assert!(
        snapshot_body.len() < SNAPSHOT_BODY_MAX,
        "/debug/snapshot is {} bytes",
        snapshot_body.len()
    );
    assert_eq!(r.processes.len(), REPORT_PROCESSES);
    assert_eq!(s.cufile.processes.len(), REPORT_PROCESSES);
    // Every process that called cuFile is either listed or counted as left out, and the least
    // recent are the ones left out.
    assert_eq!(r.processes.len() + r.omitted.processes, SMALL + 1);
    let listed: Vec<bool> = small
        .iter()
        .map(|d| r.processes.iter().any(|p| p.pid == d.pid))
        .collect();
    assert_eq!(
        listed,
        (0..SMALL)
            .map(|i| i >= r.omitted.processes)
            .collect::<Vec<_>>(),
        "listed, in the order they called"
    );
    for p in r.processes.iter().filter(|p| p.pid != flood.pid) {
        assert_eq!(
            (p.files.len(), p.files_omitted),
            (
                REPORT_FILES_PER_PROCESS,
                SMALL_FILES - REPORT_FILES_PER_PROCESS
            ),
            "process {}",
            p.pid
        );
    }
    // The flood: its most recent files listed, the rest counted; the table held what it could.
    let p = r
        .processes
        .iter()
        .find(|p| p.pid == flood.pid)
        .expect("the most recent caller is listed");
    assert_eq!(p.files.len(), REPORT_FILES_PER_PROCESS);
    // The table full: every row is a small process's, its own process row, or a file of it.
    let table = CUFILE_FILES_MAX as usize;
    assert_eq!(
        p.files.len() + p.files_omitted,
        table - SMALL * (SMALL_FILES + 1) - 1,
        "the flood's files, listed and left out"
    );
    let small_rows_left_out = r.omitted.processes * SMALL_FILES
        + (REPORT_PROCESSES - 1) * (SMALL_FILES - REPORT_FILES_PER_PROCESS);
    assert_eq!(r.omitted.files, p.files_omitted + small_rows_left_out);
    // Many processes map the one library: its pid list is bounded too.
    let l = r
        .libraries
        .iter()
        .find(|l| l.path == lib.display().to_string())
        .expect("the stand-in library");
    assert!(l.pids.len() <= REPORT_LIBRARY_PIDS);
    assert!(
        r.omitted.library_pids >= SMALL + 1 - REPORT_LIBRARY_PIDS,
        "{:?}",
        r.omitted
    );
    drop(small);
    drop(flood);
}
