//! `gds-agent top` driven in tmux (80×24, as over SSH): the stalled request appears on the
//! screen with its age and stage, and `q` quits (stopping the agent top started), within
//! 100 ms even while a snapshot fetch waits on an agent that does not answer.

mod common;

use std::{
    os::fd::AsRawFd as _,
    process::Command,
    time::{Duration, Instant},
};

use common::{ThrottledLoop, require_root, serial};
use io_uring::{IoUring, opcode, types};

fn tmux(args: &[&str]) -> std::process::Output {
    Command::new("tmux")
        .args(args)
        .output()
        .expect("tmux is installed by cargo xtask setup")
}

/// `cmd` running in a detached tmux session of `cols`×`rows` (as over SSH), killed on drop.
struct Session(String);

impl Session {
    fn start(name: &str, cols: u16, rows: u16, cmd: &str) -> Session {
        let name = format!("{name}-{}", std::process::id());
        let (x, y) = (cols.to_string(), rows.to_string());
        let out = tmux(&["new-session", "-d", "-s", &name, "-x", &x, "-y", &y, cmd]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Session(name)
    }

    /// The screen as text.
    fn capture(&self) -> String {
        String::from_utf8_lossy(&tmux(&["capture-pane", "-p", "-t", &self.0]).stdout).into_owned()
    }

    /// Types `keys` (tmux key names: `q`, `Enter`, `Down`, `Escape`).
    fn keys(&self, keys: &str) {
        tmux(&["send-keys", "-t", &self.0, keys]);
    }

    fn alive(&self) -> bool {
        tmux(&["has-session", "-t", &self.0]).status.success()
    }

    /// The screen once `ready` holds for it, polled every 50 ms for at most `within`.
    fn wait_for(&self, within: Duration, what: &str, ready: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + within;
        loop {
            let s = self.capture();
            if ready(&s) {
                return s;
            }
            assert!(Instant::now() < deadline, "{what}:\n{s}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits (at most 10 s) for the program to end, as after `q`.
    fn wait_exit(&self, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.alive() {
            assert!(Instant::now() < deadline, "{what}:\n{}", self.capture());
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["kill-session", "-t", &self.0])
            .output();
    }
}

#[test]
fn top_shows_the_stalled_request_and_quits_on_q() {
    let _g = serial();
    require_root();
    let pid = std::process::id().to_string();
    let mut fds = [0i32; 2];
    // SAFETY: valid array for pipe(2).
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);

    let cmd = format!(
        "{} top --interval 200ms -- --pid {pid} --stall-threshold 300ms --stall-interval 100ms",
        env!("CARGO_BIN_EXE_gds-agent")
    );
    let session = Session::start("gds-top", 80, 24, &cmd);
    // Wait for top's own agent to be up (the header appears) before submitting.
    session.wait_for(Duration::from_secs(30), "top never drew", |s| {
        s.contains("gds top")
    });

    let mut ring = IoUring::new(8).unwrap();
    let mut buf = [0u8; 8];
    let sqe = opcode::Read::new(types::Fd(fds[0]), buf.as_mut_ptr(), 8)
        .build()
        .user_data(0x70b5);
    // SAFETY: buf outlives the completion reaped below.
    unsafe { ring.submission().push(&sqe).unwrap() };
    ring.submit().unwrap();

    let screen = session.wait_for(Duration::from_secs(10), "stall never shown", |s| {
        s.contains("STALLED") && s.contains("0x70b5")
    });
    let stalled_line = screen.lines().find(|l| l.contains("STALLED")).unwrap();
    assert!(
        stalled_line.contains(&pid)
            && stalled_line.contains("READ")
            && stalled_line.contains("waiting_for_data"),
        "the stall with its cause: {screen}"
    );
    let inflight_line = screen
        .lines()
        .find(|l| l.contains("0x70b5") && !l.contains("STALLED"))
        .unwrap();
    assert!(
        inflight_line.contains("queue") && inflight_line.contains("READ"),
        "{screen}"
    );
    assert!(screen.lines().count() <= 24 && screen.lines().all(|l| l.chars().count() <= 80));

    session.keys("q");
    session.wait_exit("top did not quit on q");
    // SAFETY: completing the read so the ring can be dropped cleanly.
    unsafe { libc::write(fds[1], b"x".as_ptr().cast(), 1) };
    ring.submit_and_wait(1).unwrap();
}

/// The disk holding `path`, as the block layer names it: the device of its file system, or the
/// disk a partition belongs to. `None` where the file system has no block device (overlay,
/// tmpfs).
fn disk_of(path: &std::path::Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt as _;
    let dev = std::fs::metadata(path).ok()?.dev();
    let sys = std::fs::canonicalize(format!(
        "/sys/dev/block/{}:{}",
        libc::major(dev),
        libc::minor(dev)
    ))
    .ok()?;
    let dir = if sys.join("partition").exists() {
        sys.parent()?.to_path_buf()
    } else {
        sys
    };
    Some(dir.file_name()?.to_str()?.to_owned())
}

/// Bug: under O_DIRECT reads (no io_uring) top showed nothing of the block layer: its
/// per-disk panel was NVMe's. The block layer's panel shows the disk read from.
#[test]
fn top_shows_block_requests_by_disk() {
    use std::os::unix::fs::OpenOptionsExt as _;
    let _g = serial();
    require_root();
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let Some(disk) = disk_of(dir.path()) else {
        eprintln!("SKIPPED: {} is on no block device", dir.path().display());
        return;
    };
    let path = dir.path().join("direct.dat");
    std::fs::write(&path, vec![0x5au8; 1 << 20]).unwrap();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
        .unwrap();

    let cmd = format!(
        "{} top --interval 200ms -- --pid {}",
        env!("CARGO_BIN_EXE_gds-agent"),
        std::process::id()
    );
    let session = Session::start("gds-top-block", 100, 40, &cmd);
    session.wait_for(Duration::from_secs(30), "top never drew", |s| {
        s.contains("gds top")
    });

    // 4 KiB O_DIRECT reads (an aligned buffer) until the panel shows the disk.
    let layout = std::alloc::Layout::from_size_align(4096, 4096).unwrap();
    // SAFETY: non-zero size; freed below.
    let buf = unsafe { std::alloc::alloc(layout) };
    let deadline = Instant::now() + Duration::from_secs(15);
    let screen = loop {
        for i in 0..256i64 {
            // SAFETY: buf holds 4096 bytes.
            let n = unsafe { libc::pread(file.as_raw_fd(), buf.cast(), 4096, (i % 256) * 4096) };
            assert_eq!(
                n,
                4096,
                "O_DIRECT read: {}",
                std::io::Error::last_os_error()
            );
        }
        let s = session.capture();
        let panel = s.split("block by disk").nth(1);
        if panel.is_some_and(|p| p.lines().any(|l| l.contains(&format!("│{disk} ")))) {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "no block panel with {disk}:\n{s}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    // SAFETY: allocated above with this layout.
    unsafe { std::alloc::dealloc(buf, layout) };
    assert!(screen.contains("io_uring by opcode"), "{screen}");
    assert!(!screen.contains("IOPS -0"), "{screen}");
}

/// The most `q` may take to end `top`, measured from tmux's send-keys to the session's end.
const QUIT_WITHIN: Duration = Duration::from_millis(100);

#[test]
fn q_quits_within_100ms_while_a_fetch_waits() {
    // An "agent" that takes every connection and never answers: top's fetch waits on it for
    // the whole GDS_CLIENT_TIMEOUT. The old top read snapshots on its key loop's thread, so
    // it neither drew nor read a key until the fetch gave up.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let (accepted_tx, accepted) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in l.incoming() {
            held.push(s);
            let _ = accepted_tx.send(());
        }
    });
    let cmd = format!(
        "GDS_CLIENT_TIMEOUT=60 {} top --agent {addr} --interval 200ms",
        env!("CARGO_BIN_EXE_gds-agent")
    );
    let session = Session::start("gds-top-q", 80, 24, &cmd);
    accepted
        .recv_timeout(Duration::from_secs(10))
        .expect("top never connected");
    session.wait_for(
        Duration::from_secs(10),
        "top never drew while its fetch waited",
        |s| s.contains("waiting for the agent"),
    );
    // The fetch has been waiting for a while now.
    std::thread::sleep(Duration::from_millis(500));
    let start = Instant::now();
    session.keys("q");
    session.wait_exit("top did not quit on q while a fetch waited");
    let took = start.elapsed();
    eprintln!("q to exit: {took:?}");
    assert!(took < QUIT_WITHIN, "q took {took:?}");
}

/// The on-call engineer's path: a real blkio-throttled read stalls; its row in the stall list
/// names the cause; ↓/Enter on it opens one screen with the cause and its evidence (the
/// reader's state and kernel stack, the loop disk's queue, the cgroup and its limit, what was
/// missing); Esc goes back to the list and q quits.
#[test]
fn top_opens_a_stalls_evidence_on_one_screen() {
    let _g = serial();
    require_root();
    // 128 KiB at 16 KiB/s: held ~8 s unless the limit is lifted first.
    let Some(lo) = ThrottledLoop::new(16 << 10) else {
        return;
    };
    let cmd = format!(
        "{} top --interval 200ms -- --pid {} --stall-threshold 300ms --stall-interval 100ms",
        env!("CARGO_BIN_EXE_gds-agent"),
        std::process::id()
    );
    let session = Session::start("gds-top-why", 100, 50, &cmd);
    session.wait_for(Duration::from_secs(30), "top never drew", |s| {
        s.contains("gds top")
    });
    let (tid, reader) = lo.read(1 << 20, 128 << 10);
    let disk = lo.name().to_owned();
    let ours = |l: &str| l.contains("STALLED") && l.contains(&disk) && l.contains("block");
    let screen = session.wait_for(Duration::from_secs(5), "no throttled stall row", |s| {
        s.lines().any(|l| ours(l) && l.contains("throttled"))
    });
    // Our row among the stalls (others of this process may be listed): move onto it.
    let stalls = screen.split("STATE").last().unwrap();
    let row = stalls
        .lines()
        .skip(1)
        .position(ours)
        .expect("our stall row");
    for _ in 0..row {
        session.keys("Down");
    }
    session.keys("Enter");
    let why = session.wait_for(Duration::from_secs(5), "no evidence screen", |s| {
        s.contains("┌why it is stuck") && s.contains("MISSING")
    });
    let group = lo.cgroup.file_name().unwrap().to_str().unwrap().to_owned();
    for want in [
        format!(
            "block read  pid {} tid {tid} gds-stall-rd",
            std::process::id()
        ),
        format!("throttled: cgroup /{group} (v1) blkio.throttle.read_bps_device"),
        format!("tid {tid} gds-stall-rd  state D"),
        format!("{disk} ("),
        "in flight 1 reads".into(),
        format!("v1 blkio /{group}"),
        format!("limit: cgroup /{group} (v1) blkio.throttle.read_bps_device"),
        "CAPTURE".into(),
    ] {
        assert!(why.contains(&want), "{want:?} missing from:\n{why}");
    }
    println!("{why}");
    // The reader's kernel stack, symbolized, under its thread line.
    let threads = why.split("THREADS").nth(1).unwrap();
    let frames = threads
        .lines()
        .skip(1)
        .take_while(|l| !l.contains("DEVICE"))
        .filter(|l| l.contains("+0x"))
        .count();
    assert!(frames >= 2, "the reader's kernel stack:\n{why}");
    assert!(why.lines().all(|l| l.chars().count() <= 100), "{why}");

    session.keys("Escape");
    session.wait_for(Duration::from_secs(5), "Esc did not go back", |s| {
        !s.contains("┌why it is stuck") && s.contains("STATE") && s.contains("CAUSE")
    });
    assert!(session.alive(), "Esc on the evidence screen must not quit");
    lo.set_read_bps(0);
    let (n, _) = reader.join().unwrap();
    assert_eq!(n, 128 << 10);
    session.keys("q");
    session.wait_exit("top did not quit on q");
}
