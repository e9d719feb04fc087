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

use std::future::IntoFuture as _;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use gds_api::families;
use prometheus::{CounterVec, Encoder, HistogramOpts, HistogramVec, Opts, Registry, TextEncoder};
use tokio::sync::oneshot;

pub struct PipelineMetrics {
    pub registry: Registry,
    pub bytes: CounterVec,
    pub duration: HistogramVec,
}

impl PipelineMetrics {
    pub fn new() -> Arc<Self> {
        let registry = Registry::new();
        let (fb, fd) = (&families::PIPELINE_BYTES, &families::PIPELINE_DURATION);
        let bytes = CounterVec::new(Opts::new(fb.name, fb.help), fb.labels).expect("valid metric");
        // Powers of two from 1 µs to ~17 s, like the io_uring histograms.
        let duration = HistogramVec::new(
            HistogramOpts::new(fd.name, fd.help).buckets(gds_api::exposition::bucket_bounds()),
            fd.labels,
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

/// `/metrics` over HTTP, with axum like the agent's server, on a thread of its own (the data
/// path is synchronous); stops when dropped. Every other path or method is a 404, and every
/// answer closes its connection.
pub struct Server {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    pub fn start(addr: SocketAddr, metrics: Arc<PipelineMetrics>) -> std::io::Result<Self> {
        // Bound here, so that a port in use is the caller's error and port 0 is known at once.
        let listener = std::net::TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let listener = {
            let _in_runtime = runtime.enter();
            tokio::net::TcpListener::from_std(listener)?
        };
        let app = Router::new()
            .route("/metrics", get(render).fallback(not_found))
            .fallback(not_found)
            .with_state(metrics);
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("metrics-http".into())
            .spawn(move || {
                runtime.block_on(async move {
                    tokio::select! {
                        _ = axum::serve(listener, app).into_future() => {}
                        _ = stopped => {}
                    }
                });
                // Dropping the runtime ends the connections still open.
            })?;
        Ok(Server {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

const CONTENT_TYPE: &str = "text/plain; version=0.0.4";

async fn render(State(metrics): State<Arc<PipelineMetrics>>) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, CONTENT_TYPE),
            (header::CONNECTION, "close"),
        ],
        metrics.render(),
    )
}

async fn not_found() -> impl IntoResponse {
    (
        StatusCode::NOT_FOUND,
        [
            (header::CONTENT_TYPE, CONTENT_TYPE),
            (header::CONNECTION, "close"),
        ],
        "try /metrics\n",
    )
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read as _, Write as _};

    /// The raw answer to a raw request: these tests check the server's bytes on the wire.
    fn ask(addr: SocketAddr, request: &[u8]) -> String {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(request).unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        answer
    }

    #[test]
    fn served_over_http() {
        let m = PipelineMetrics::new();
        let (b, h) = m.handles("bounce", "gpu0");
        b.inc_by(4096.0);
        h.observe(0.000_5);
        let srv = Server::start("127.0.0.1:0".parse().unwrap(), m.clone()).unwrap();
        let body = ask(srv.addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
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

    #[test]
    fn elsewhere_is_404_and_drop_stops_serving() {
        let srv = Server::start("127.0.0.1:0".parse().unwrap(), PipelineMetrics::new()).unwrap();
        let addr = srv.addr;
        let answer = ask(addr, b"GET /other HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(answer.starts_with("HTTP/1.1 404 Not Found"), "{answer}");
        assert!(
            answer.contains("content-type: text/plain; version=0.0.4"),
            "{answer}"
        );
        assert!(answer.ends_with("try /metrics\n"), "{answer}");
        let answer = ask(
            addr,
            b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
        );
        assert!(answer.starts_with("HTTP/1.1 404 Not Found"), "{answer}");
        // A connection that never sends a request does not hold up the stop.
        let _idle = std::net::TcpStream::connect(addr).unwrap();
        let t = std::time::Instant::now();
        drop(srv);
        assert!(t.elapsed() < std::time::Duration::from_secs(1));
        assert!(std::net::TcpStream::connect(addr).is_err());
    }
}
