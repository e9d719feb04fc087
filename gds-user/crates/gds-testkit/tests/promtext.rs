//! The Prometheus text parser that the tests, the VM scenarios and xtask share
//! (`gds_testkit::promtext`), tested once here rather than in every test binary that includes it.

use gds_testkit::promtext::{Sample, samples, series_key};

#[test]
fn reads_what_the_agent_writes() {
    let text = "\
# HELP gds_uring_requests_total io_uring requests seen at submission, by opcode.
# TYPE gds_uring_requests_total counter
gds_uring_requests_total{opcode=\"NOP\"} 480
gds_nvme_errors_total{disk=\"nvme0n1\",status=\"LBA Out of Range\"} 2
gds_uring_request_duration_seconds_bucket{opcode=\"NOP\",le=\"+Inf\"} 1.5e3
gds_agent_info{kernel=\"6.1 \\\"x\\\", a\\\\b\",version=\"0.1.0\",} 1 1700000000000

gds_uring_inflight_requests 0
";
    let s: Vec<Sample> = samples(text).map(Result::unwrap).collect();
    assert_eq!(s.len(), 5);
    assert_eq!(s[0].name, "gds_uring_requests_total");
    assert_eq!((s[0].label("opcode"), s[0].value), (Some("NOP"), 480.0));
    assert_eq!(s[1].label("status"), Some("LBA Out of Range"));
    assert_eq!((s[2].label("le"), s[2].value), (Some("+Inf"), 1500.0));
    assert_eq!(s[3].label("kernel"), Some("6.1 \"x\", a\\b"));
    assert_eq!(s[3].label("version"), Some("0.1.0"));
    assert_eq!((s[4].labels.len(), s[4].value), (0, 0.0));
    assert_eq!(
        s[1].key(),
        "gds_nvme_errors_total{disk=\"nvme0n1\",status=\"LBA Out of Range\"}"
    );
    assert_eq!(
        s[3].key(),
        "gds_agent_info{kernel=\"6.1 \\\"x\\\", a\\\\b\",version=\"0.1.0\"}"
    );
    assert_eq!(
        series_key("m", &[("opcode", "NOP"), ("disk", "a")]),
        "m{disk=\"a\",opcode=\"NOP\"}"
    );
}

#[test]
fn special_values_and_errors() {
    let v = |t: &str| samples(t).next().unwrap().map(|s| s.value);
    assert_eq!(v("a +Inf"), Ok(f64::INFINITY));
    assert_eq!(v("a -Inf"), Ok(f64::NEG_INFINITY));
    assert!(v("a NaN").unwrap().is_nan());
    let what = |t: &str| samples(t).next().unwrap().unwrap_err().what;
    assert_eq!(what("a{b=\"c} 1"), "unterminated label value");
    assert_eq!(what("a{b=\"c\" 1"), "no , or } after a label");
    assert_eq!(what("a{b=c} 1"), "label value not quoted");
    assert_eq!(what("a{b=\"c\"} x"), "value is not a number");
    assert_eq!(what("a{b=\"c\"}1"), "no space before the value");
    assert_eq!(what("{b=\"c\"} 1"), "no metric name");
}
