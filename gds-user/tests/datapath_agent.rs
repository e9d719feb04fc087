//! End-to-end: `gds-agent read` is an io_uring user like any other, so a running agent counts
//! its reads (READ_FIXED with registered buffers, plain READ without) in `gds_uring_*`.

mod common;

use std::io::Write;
use std::process::Command;

use common::{Agent, serial};

#[test]
fn read_shows_up_in_the_agents_io_uring_metrics() {
    let _g = serial();
    let agent = Agent::start(&["--comm", "gds-agent"]);
    let mut f = tempfile::NamedTempFile::new_in("/var/tmp").unwrap();
    f.write_all(&vec![0x5au8; 24 << 20]).unwrap();
    f.flush().unwrap();
    let count = |op: &str| {
        agent
            .scrape()
            .value("gds_uring_requests_total", &[("opcode", op)])
    };
    let (fixed0, plain0) = (count("READ_FIXED"), count("READ"));
    for extra in [&[][..], &["--no-fixed"][..]] {
        let out = Command::new(env!("CARGO_BIN_EXE_gds-agent"))
            .args([
                "read",
                f.path().to_str().unwrap(),
                "--to",
                "host",
                "--chunk",
                "1M",
                "--verify",
            ])
            .args(extra)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // 24 reads of 1 MiB each way (more if a read came back short and was continued).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (fixed, plain) = (count("READ_FIXED") - fixed0, count("READ") - plain0);
        if fixed >= 24.0 && plain >= 24.0 {
            eprintln!(
                "agent counted {fixed} READ_FIXED and {plain} READ requests of the two reads"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "agent counted {fixed} READ_FIXED, {plain} READ; want >= 24 each\n{}",
            agent.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let (status, log) = agent.stop();
    assert!(status.success(), "{log}");
}
