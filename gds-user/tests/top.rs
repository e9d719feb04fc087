//! `gds-agent top` driven in tmux (80×24, as over SSH): the stalled request appears on the
//! screen with its age and stage, and `q` quits (stopping the agent top started).

mod common;

use std::{
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
