//! `gds-agent read` / `bench` end to end on this host (no GPU needed): host destination with
//! O_DIRECT and through the page cache, verification, typed route errors, the passthrough form
//! still parsed, and the pipeline metrics served while a command runs.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_gds-agent");

/// A file with a position-dependent pattern on a disk file system (O_DIRECT works there).
fn pattern_file(len: usize) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new_in("/var/tmp").unwrap();
    let data: Vec<u8> = (0..len as u64)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    f.write_all(&data).unwrap();
    f.flush().unwrap();
    f
}

fn run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn read_to_host_verifies_direct_and_buffered() {
    let f = pattern_file(24 << 20 | 12345);
    let p = f.path().to_str().unwrap();
    for extra in [
        &["--direct", "on"][..],
        // Completions handled one per wake-up: the others wait in the completion ring.
        &[
            "--direct",
            "on",
            "--batch",
            "1",
            "--qd",
            "32",
            "--chunk",
            "4k",
            "--threads",
            "2",
        ][..],
        &[
            "--direct", "off", "--batch", "3", "--qd", "7", "--chunk", "8k",
        ][..],
        &[
            "--direct",
            "off",
            "--threads",
            "3",
            "--async",
            "true",
            "--chunk",
            "192k",
        ][..],
        &[
            "--direct",
            "auto",
            "--offset",
            "4096",
            "--size",
            "5000000",
            "--no-fixed",
        ][..],
        // Unaligned offset: auto falls back to the page cache and says so.
        &[
            "--direct", "auto", "--offset", "777", "--size", "3000001", "--qd", "3",
        ][..],
    ] {
        let mut args = vec!["read", p, "--to", "host", "--verify", "--json"];
        args.extend_from_slice(extra);
        let (ok, out, err) = run(&args);
        assert!(ok, "{args:?}: {err}");
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(v["path"], "host");
        assert!(v["verified"].is_string(), "{v}");
        let want = match extra.iter().position(|a| *a == "--size") {
            Some(i) => extra[i + 1].parse::<u64>().unwrap(),
            None => (24 << 20 | 12345) as u64,
        };
        assert_eq!(v["bytes"].as_u64(), Some(want), "{v}");
        if extra.contains(&"777") {
            assert_eq!(v["direct"], false);
            assert!(v["notes"].to_string().contains("page cache"), "{v}");
        }
    }
}

#[test]
fn typed_errors_name_why() {
    let f = pattern_file(1 << 20);
    let p = f.path().to_str().unwrap();
    let (ok, _, err) = run(&["read", p, "--to", "host", "--path", "gds"]);
    assert!(!ok);
    assert!(
        err.contains("--path gds is not possible") && err.contains("--to gpu"),
        "{err}"
    );
    let (ok, _, err) = run(&["read", p, "--to", "p2pmem:0000:00:05.0"]);
    assert!(!ok);
    assert!(
        err.contains("--path p2p is not possible") && err.contains("/dev/ngXnY"),
        "{err}"
    );
    let (ok, _, err) = run(&["read", p, "--to", "host", "--offset", "2M"]);
    assert!(!ok);
    assert!(err.contains("outside the source"), "{err}");
    let (ok, _, err) = run(&[
        "read", p, "--to", "host", "--direct", "on", "--offset", "100",
    ]);
    assert!(!ok);
    assert!(err.contains("multiple of"), "{err}");
    // Explicit p2p into a GPU: typed, with every reason (no GPU here, SRC not a namespace, and
    // the missing BAR1 user mapping).
    let (ok, _, err) = run(&["read", p, "--to", "gpu", "--path", "p2p"]);
    assert!(!ok);
    assert!(
        err.contains("--path p2p is not possible") && err.contains("gdrdrv"),
        "{err}"
    );
    // Neither SRC nor --device.
    let (ok, _, err) = run(&["read"]);
    assert!(!ok && err.contains("give SRC"), "{err}");
    // The passthrough form is still `read --device` (and refuses SRC beside it).
    let (ok, _, err) = run(&["read", "--device", "/dev/ng99n1", "--blocks", "1"]);
    assert!(!ok && err.contains("/dev/ng99n1"), "{err}");
    let (ok, _, err) = run(&["read", p, "--device", "/dev/ng99n1"]);
    assert!(!ok && err.contains("cannot be used with"), "{err}");
}

#[test]
fn bench_host_json_seq_and_rand() {
    let f = pattern_file(16 << 20);
    let p = f.path().to_str().unwrap();
    let (ok, out, err) = run(&[
        "bench",
        p,
        "--to",
        "host",
        "--path",
        "bounce",
        "--pattern",
        "rand",
        "--bs",
        "4k",
        "--qd",
        "8",
        "--size",
        "4M",
        "--direct",
        "off,on",
        "--json",
    ]);
    assert!(ok, "{err}");
    let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 2);
    for r in rows {
        assert_eq!(r["bytes"].as_u64(), Some(4 << 20), "{r}");
        assert_eq!(r["ios"].as_u64(), Some(1024), "{r}");
        let (p50, p99, p999) = (
            r["lat_p50_us"].as_f64().unwrap(),
            r["lat_p99_us"].as_f64().unwrap(),
            r["lat_p999_us"].as_f64().unwrap(),
        );
        assert!(p50 > 0.0 && p50 <= p99 && p99 <= p999, "{r}");
    }
    assert_eq!(rows[0]["direct"], false);
    assert_eq!(rows[1]["direct"], true);
    let (ok, out, err) = run(&[
        "bench",
        p,
        "--compare",
        "host",
        "--bs",
        "1M",
        "--time",
        "300ms",
    ]);
    assert!(ok, "{err}");
    let first = out.lines().nth(1).unwrap_or_default();
    assert!(
        out.contains("GB/s") && first.split_whitespace().take(2).eq(["1", "host"]),
        "{out}"
    );
}

#[test]
fn metrics_served_while_reading() {
    let f = pattern_file(8 << 20);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let mut child = Command::new(BIN)
        .args([
            "read",
            f.path().to_str().unwrap(),
            "--to",
            "host",
            "--metrics-listen",
            &addr.to_string(),
            "--chunk",
            "1M",
            "--metrics-linger",
            "3s",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut body = String::new();
    for _ in 0..100 {
        std::thread::sleep(Duration::from_millis(50));
        if let Ok(b) = gds_api::client::get(addr, "/metrics") {
            body = b;
            if body.contains("gds_pipeline_bytes_total{dest=\"host\",path=\"host\"} 8388608") {
                break;
            }
        }
    }
    assert!(child.wait().unwrap().success());
    assert!(
        body.contains("gds_pipeline_bytes_total{dest=\"host\",path=\"host\"} 8388608"),
        "{body}"
    );
    assert!(
        body.contains("gds_pipeline_read_duration_seconds_count{path=\"host\"} 8"),
        "{body}"
    );
}

#[test]
fn bench_against_fio_in_the_same_run() {
    if Command::new("fio").arg("--version").output().is_err() {
        eprintln!("SKIP bench_against_fio_in_the_same_run: fio is not installed");
        return;
    }
    let f = pattern_file(8 << 20);
    let p = f.path().to_str().unwrap();
    let (ok, out, err) = run(&[
        "bench",
        p,
        "--to",
        "host",
        "--compare",
        "host",
        "--fio",
        "--pattern",
        "seq",
        "--bs",
        "1M",
        "--qd",
        "4",
        "--threads",
        "1",
        "--direct",
        "on",
        "--rounds",
        "2",
        "--json",
    ]);
    assert!(ok, "{err}");
    let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
    let rows = rows.as_array().unwrap();
    // host and fio in round 1, again in round 2, then their medians.
    let shape: Vec<(String, serde_json::Value)> = rows
        .iter()
        .map(|r| (r["path"].as_str().unwrap().to_owned(), r["round"].clone()))
        .collect();
    assert_eq!(
        shape,
        vec![
            ("host".into(), serde_json::json!(1)),
            ("fio".into(), serde_json::json!(1)),
            ("host".into(), serde_json::json!(2)),
            ("fio".into(), serde_json::json!(2)),
            ("host".into(), serde_json::json!(null)),
            ("fio".into(), serde_json::json!(null)),
        ],
        "{out}"
    );
    // Both read the whole file once per round.
    for r in &rows[..4] {
        assert_eq!(r["bytes"].as_u64(), Some(8 << 20), "{out}");
    }
    let per_round: Vec<f64> = [0, 2]
        .iter()
        .map(|&i| rows[i]["vs_fio"].as_f64().unwrap())
        .collect();
    let ratio = rows[4]["vs_fio"].as_f64().unwrap();
    assert!(per_round.iter().all(|r| *r > 0.0), "{out}");
    assert!(
        (ratio - (per_round[0] + per_round[1]) / 2.0).abs() < 1e-9,
        "{out}"
    );
    eprintln!(
        "ours / fio, 1 MiB sequential O_DIRECT on this host: {ratio:.2} (rounds {per_round:?})"
    );
}
