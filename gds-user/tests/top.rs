//! `gds-agent top` driven in tmux (80×24, as over SSH): the stalled request appears on the
//! screen with its age and stage, and `q` quits (stopping the agent top started), within
//! 100 ms even while a snapshot fetch waits on an agent that does not answer.

mod common;

use std::{
    os::fd::AsRawFd as _,
    process::Command,
    time::{Duration, Instant},
};

use common::{require_root, serial};
use io_uring::{IoUring, opcode, types};

fn tmux(args: &[&str]) -> std::process::Output {
    Command::new("tmux")
        .args(args)
        .output()
        .expect("tmux is installed by cargo xtask setup")
}

#[test]
fn top_shows_the_stalled_request_and_quits_on_q() {
    let _g = serial();
    require_root();
    let pid = std::process::id().to_string();
    let mut fds = [0i32; 2];
    // SAFETY: valid array for pipe(2).
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);

    let session = format!("gds-top-{pid}");
    let cmd = format!(
        "{} top --interval 200ms -- --pid {pid} --stall-threshold 300ms --stall-interval 100ms",
        env!("CARGO_BIN_EXE_gds-agent")
    );
    let out = tmux(&[
        "new-session",
        "-d",
        "-s",
        &session,
        "-x",
        "80",
        "-y",
        "24",
        &cmd,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    struct Kill(String);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = Command::new("tmux")
                .args(["kill-session", "-t", &self.0])
                .output();
        }
    }
    let _kill = Kill(session.clone());

    let capture = || {
        String::from_utf8_lossy(&tmux(&["capture-pane", "-p", "-t", &session]).stdout).into_owned()
    };
    // Wait for top's own agent to be up (the header appears) before submitting.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !capture().contains("gds top") {
        assert!(Instant::now() < deadline, "top never drew:\n{}", capture());
        std::thread::sleep(Duration::from_millis(100));
    }

    let mut ring = IoUring::new(8).unwrap();
    let mut buf = [0u8; 8];
    let sqe = opcode::Read::new(types::Fd(fds[0]), buf.as_mut_ptr(), 8)
        .build()
        .user_data(0x70b5);
    // SAFETY: buf outlives the completion reaped below.
    unsafe { ring.submission().push(&sqe).unwrap() };
    ring.submit().unwrap();

    let deadline = Instant::now() + Duration::from_secs(10);
    let screen = loop {
        let s = capture();
        if s.contains("STALLED") && s.contains("0x70b5") {
            break s;
        }
        assert!(Instant::now() < deadline, "stall never shown:\n{s}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let stalled_line = screen.lines().find(|l| l.contains("STALLED")).unwrap();
    assert!(
        stalled_line.contains(&pid) && stalled_line.contains("READ"),
        "{screen}"
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

    tmux(&["send-keys", "-t", &session, "q"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while tmux(&["has-session", "-t", &session]).status.success() {
        assert!(
            Instant::now() < deadline,
            "top did not quit on q:\n{}",
            capture()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
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

    let session = format!("gds-top-block-{}", std::process::id());
    let cmd = format!(
        "{} top --interval 200ms -- --pid {}",
        env!("CARGO_BIN_EXE_gds-agent"),
        std::process::id()
    );
    let out = tmux(&[
        "new-session",
        "-d",
        "-s",
        &session,
        "-x",
        "100",
        "-y",
        "40",
        &cmd,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    struct Kill(String);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = Command::new("tmux")
                .args(["kill-session", "-t", &self.0])
                .output();
        }
    }
    let _kill = Kill(session.clone());
    let capture = || {
        String::from_utf8_lossy(&tmux(&["capture-pane", "-p", "-t", &session]).stdout).into_owned()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !capture().contains("gds top") {
        assert!(Instant::now() < deadline, "top never drew:\n{}", capture());
        std::thread::sleep(Duration::from_millis(100));
    }

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
        let s = capture();
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
    let session = format!("gds-top-q-{}", std::process::id());
    let cmd = format!(
        "GDS_CLIENT_TIMEOUT=60 {} top --agent {addr} --interval 200ms",
        env!("CARGO_BIN_EXE_gds-agent")
    );
    let out = tmux(&[
        "new-session",
        "-d",
        "-s",
        &session,
        "-x",
        "80",
        "-y",
        "24",
        &cmd,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    struct Kill(String);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = Command::new("tmux")
                .args(["kill-session", "-t", &self.0])
                .output();
        }
    }
    let _kill = Kill(session.clone());
    let capture = || {
        String::from_utf8_lossy(&tmux(&["capture-pane", "-p", "-t", &session]).stdout).into_owned()
    };
    accepted
        .recv_timeout(Duration::from_secs(10))
        .expect("top never connected");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !capture().contains("waiting for the agent") {
        assert!(
            Instant::now() < deadline,
            "top never drew while its fetch waited:\n{}",
            capture()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The fetch has been waiting for a while now.
    std::thread::sleep(Duration::from_millis(500));
    let start = Instant::now();
    tmux(&["send-keys", "-t", &session, "q"]);
    while tmux(&["has-session", "-t", &session]).status.success() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "top did not quit on q while a fetch waited:\n{}",
            capture()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let took = start.elapsed();
    eprintln!("q to exit: {took:?}");
    assert!(took < QUIT_WITHIN, "q took {took:?}");
}
