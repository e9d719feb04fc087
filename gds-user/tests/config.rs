//! `gds-agent run --config FILE` for real: the file's settings reach the running agent (its
//! address, its pid and opcode filters), and a flag on the command line wins over the file.

mod common;

use std::net::SocketAddr;

use common::{Agent, free_port, http_get, nops, serial};

fn write_config(dir: &std::path::Path, text: &str) -> String {
    let p = dir.join("agent.toml");
    std::fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_string()
}

#[test]
fn the_config_file_sets_address_and_filters() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let config = write_config(
        dir.path(),
        &format!(
            "# written by tests/config.rs\nlisten = \"{addr}\"\npid = {}\nopcode = [\"NOP\"]\nslow_threshold = \"1s\"\n",
            std::process::id()
        ),
    );
    let agent = Agent::start_reaching(addr, &["--config", &config]);
    nops(25);
    // A read from this process: filtered out by `opcode = ["NOP"]`.
    let mut read = common::PipeRead::submit(7);
    assert_eq!(read.complete(b"x"), (7, 1));
    let m = agent.scrape();
    let (_, text) = agent.stop();
    assert_eq!(
        m.value("gds_uring_requests_total", &[("opcode", "NOP")]),
        25.0
    );
    assert_eq!(
        m.value("gds_uring_requests_total", &[("opcode", "READ")]),
        0.0,
        "opcode filter from the file"
    );
    assert!(text.contains("settings from the config file"), "{text}");
}

#[test]
fn a_flag_on_the_command_line_wins_over_the_file() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let file_addr = format!("127.0.0.1:{}", free_port());
    let config = write_config(
        dir.path(),
        &format!(
            "listen = \"{file_addr}\"\npid = {}\nopcode = \"READ\"\n",
            std::process::id()
        ),
    );
    // Agent::start puts `--listen <its port>` and we add `--opcode NOP` on the command line.
    let agent = Agent::start(&["--config", &config, "--opcode", "NOP"]);
    assert!(
        http_get(file_addr.parse().unwrap(), "/metrics").is_err(),
        "the file's address must not be used when --listen is given"
    );
    nops(10);
    let mut read = common::PipeRead::submit(9);
    read.complete(b"y");
    let m = agent.scrape();
    assert_eq!(
        m.value("gds_uring_requests_total", &[("opcode", "NOP")]),
        10.0
    );
    assert_eq!(
        m.value("gds_uring_requests_total", &[("opcode", "READ")]),
        0.0,
        "--opcode NOP replaces the file's opcode = \"READ\""
    );
}
