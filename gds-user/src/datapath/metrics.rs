//! Pipeline metrics of `read` and `bench`.
//!
//! These commands run outside the agent, for seconds to minutes. They do not push to the agent
//! (the agent has no ingest endpoint, and pushing would add a failure mode to every read):
//! with `--metrics-listen ADDR` a command serves its own `/metrics` for as long as it runs, plus
//! `--metrics-linger` after it ends so that the last values get scraped. Point a Prometheus job
//! (e.g. `gds-pipeline`, static targets or file_sd written by the loader) at that address. The
//! reads themselves are io_uring requests, so the agent's `gds_uring_*` metrics count them too.
//!
//! - `gds_pipeline_bytes_total{path,dest}`: bytes delivered to the destination.
//! - `gds_pipeline_read_duration_seconds{path}`: per I/O, submission to data at the destination.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use prometheus::{CounterVec, Encoder, HistogramOpts, HistogramVec, Opts, Registry, TextEncoder};

pub struct PipelineMetrics {
    pub registry: Registry,
    pub bytes: CounterVec,
    pub duration: HistogramVec,
}

impl PipelineMetrics {
    pub fn new() -> Arc<Self> {
        let registry = Registry::new();
        let bytes = CounterVec::new(
            Opts::new(
                "gds_pipeline_bytes_total",
                "Bytes delivered by the data path, by route and destination.",
            ),
            &["path", "dest"],
        )
        .expect("valid metric");
        // Powers of two from 1 µs to ~17 s, like the io_uring histograms.
        let buckets: Vec<f64> = (10..=34).map(|b| (1u64 << b) as f64 / 1e9).collect();
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "gds_pipeline_read_duration_seconds",
                "Per-I/O time from submission to data at the destination, by route.",
            )
            .buckets(buckets),
            &["path"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(bytes.clone()))
            .expect("register");
        registry
            .register(Box::new(duration.clone()))
            .expect("register");
        Arc::new(PipelineMetrics {
            registry,
            bytes,
            duration,
        })
    }

    /// Handles for one route and destination.
    pub fn handles(&self, path: &str, dest: &str) -> (prometheus::Counter, prometheus::Histogram) {
        (
            self.bytes.with_label_values(&[path, dest]),
            self.duration.with_label_values(&[path]),
        )
    }

    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("encode");
        String::from_utf8(out).expect("utf-8")
    }
}

/// A minimal `/metrics` server on its own thread; stops when dropped.
pub struct Server {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    pub fn start(addr: SocketAddr, metrics: Arc<PipelineMetrics>) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        let _ = s.set_nonblocking(false);
                        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                        let mut req = [0u8; 2048];
                        let n = s.read(&mut req).unwrap_or(0);
                        let line = String::from_utf8_lossy(&req[..n]);
                        let (status, body) = if line.starts_with("GET /metrics") {
                            ("200 OK", metrics.render())
                        } else {
                            ("404 Not Found", "try /metrics\n".to_owned())
                        };
                        let _ = write!(
                            s,
                            "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        );
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Ok(Server {
            addr,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn served_over_http() {
        let m = PipelineMetrics::new();
        let (b, h) = m.handles("bounce", "gpu0");
        b.inc_by(4096.0);
        h.observe(0.000_5);
        let srv = Server::start("127.0.0.1:0".parse().unwrap(), m.clone()).unwrap();
        let mut s = std::net::TcpStream::connect(srv.addr).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        assert!(body.starts_with("HTTP/1.1 200 OK"), "{body}");
        assert!(
            body.contains("gds_pipeline_bytes_total{dest=\"gpu0\",path=\"bounce\"} 4096"),
            "{body}"
        );
        assert!(
            body.contains("gds_pipeline_read_duration_seconds_count{path=\"bounce\"} 1"),
            "{body}"
        );
        assert!(
            body.contains(
                "gds_pipeline_read_duration_seconds_bucket{path=\"bounce\",le=\"0.000524288\"} 1"
            ),
            "{body}"
        );
    }
}
