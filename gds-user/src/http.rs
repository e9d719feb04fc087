//! The agent's HTTP server: `/metrics` for Prometheus, `/debug/*` JSON for people and tools.

use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use axum::{
    Router, body::Bytes, extract::State, http::header, response::IntoResponse, routing::get,
};
use thiserror::Error;
use tokio::net::TcpListener;

use gds_api::model::{self, SlowEvent, Snapshot, StallReport};
use gds_trace::UringTracer;

/// The agent's default address: loopback only (see `run --listen`).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9477";

#[derive(Debug, Error)]
pub enum HttpError {
    #[error("cannot listen on {addr}: {source} ({hint})")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
        /// What to do, from the cause ([`bind_hint`]): for a port in use, who holds it.
        hint: String,
    },
    #[error("HTTP server failed: {0}")]
    Serve(std::io::Error),
}

/// Recent slow events, newest last, bounded.
#[derive(Default)]
pub struct RecentEvents {
    events: Mutex<VecDeque<SlowEvent>>,
}

impl RecentEvents {
    pub const CAPACITY: usize = 1024;

    pub fn push(&self, ev: SlowEvent) {
        let mut q = self.events.lock().unwrap_or_else(|p| p.into_inner());
        if q.len() == Self::CAPACITY {
            q.pop_front();
        }
        q.push_back(ev);
    }

    pub fn list(&self) -> Vec<SlowEvent> {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }
}

#[derive(Clone)]
pub struct AppState {
    pub metrics: Arc<MetricsRenderer>,
    pub slow: Arc<RecentEvents>,
    pub stalls: Arc<Mutex<StallReport>>,
    pub tracer: Arc<UringTracer>,
    /// `/debug/snapshot` and `/debug/cufile` bodies, shared between concurrent clients.
    pub debug_reads: Arc<DebugReads>,
}

/// `/metrics` for any number of concurrent scrapes, one render at a time.
///
/// A render reads every map (syscalls) and encodes the text. Done once per scrape, 200
/// concurrent scrapes ran up to 200 renders at once, each on its own blocking thread (`cargo
/// xtask load`: 330-515 threads, 90 MiB RSS, 135 % CPU for 5k scrapes/s), for no fresher data.
/// Renders are serialised instead, and a scrape that waited takes the body of a render that
/// *started after it arrived* when one has finished meanwhile: every reply is still at least
/// as fresh as its request, as with one render per scrape (7 threads, 46 MiB, 63 % CPU for
/// 20k scrapes/s).
pub struct MetricsRenderer {
    registry: prometheus::Registry,
    /// Renders started so far; render number `n` is the `n`th to start.
    started: AtomicU64,
    /// The number and body of the last finished render; held while rendering.
    last: tokio::sync::Mutex<(u64, Bytes)>,
}

impl MetricsRenderer {
    pub fn new(registry: prometheus::Registry) -> Self {
        MetricsRenderer {
            registry,
            started: AtomicU64::new(0),
            last: tokio::sync::Mutex::new((0, Bytes::new())),
        }
    }

    async fn render(&self) -> Bytes {
        // Renders numbered above `arrival` started after this request arrived.
        let arrival = self.started.load(Ordering::SeqCst);
        let mut last = self.last.lock().await;
        if last.0 > arrival {
            return last.1.clone();
        }
        let number = self.started.fetch_add(1, Ordering::SeqCst) + 1;
        let registry = self.registry.clone();
        // Map reads are syscalls: keep them off the async workers.
        let body = tokio::task::spawn_blocking(move || gds_api::exposition::render(&registry))
            .await
            .unwrap_or_default();
        *last = (number, Bytes::from(body));
        last.1.clone()
    }
}

async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    let body = s.metrics.render().await;
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
}

async fn slow(State(s): State<AppState>) -> impl IntoResponse {
    axum::Json(s.slow.list())
}

async fn stalls(State(s): State<AppState>) -> impl IntoResponse {
    axum::Json(s.stalls.lock().unwrap_or_else(|p| p.into_inner()).clone())
}

/// Live view of every tracked in-flight request, oldest first (at most
/// [`model::SNAPSHOT_INFLIGHT`]).
async fn inflight(State(s): State<AppState>) -> impl IntoResponse {
    let tracer = s.tracer.clone();
    let list = tokio::task::spawn_blocking(move || {
        let (mut reqs, _) = model::inflight(&*tracer);
        reqs.truncate(model::SNAPSHOT_INFLIGHT);
        reqs
    })
    .await
    .unwrap_or_default();
    axum::Json(list)
}

/// A JSON body read from the tracer's maps (`/debug/snapshot`, `/debug/cufile`) for any number
/// of concurrent clients, one read at a time, shared as [`MetricsRenderer`] shares renders:
/// a client that waited takes the body of a read that *started after it arrived* when one has
/// finished meanwhile, so every answer is at least as fresh as its request.
///
/// Read once per request, 50 clients looping on `/debug/snapshot` ran 50 collections at once
/// on 2 cores: each took seconds, 55 threads and 48 MB of RSS stayed, and a snapshot's time
/// was taken up to 5.55 s after its counters were read.
pub struct SharedRead {
    /// Reads started so far; read number `n` is the `n`th to start.
    started: AtomicU64,
    /// The number and body (or what failed) of the last finished read; held while reading.
    last: tokio::sync::Mutex<(u64, Result<Bytes, String>)>,
}

impl Default for SharedRead {
    fn default() -> Self {
        SharedRead {
            started: AtomicU64::new(0),
            // Number 0 is never served: a request waits for read 1 at least.
            last: tokio::sync::Mutex::new((0, Ok(Bytes::new()))),
        }
    }
}

impl SharedRead {
    async fn get(
        &self,
        read: impl FnOnce() -> Result<Bytes, String> + Send + 'static,
    ) -> Result<Bytes, String> {
        // Reads numbered above `arrival` started after this request arrived.
        let arrival = self.started.load(Ordering::SeqCst);
        let mut last = self.last.lock().await;
        if last.0 > arrival {
            return last.1.clone();
        }
        let number = self.started.fetch_add(1, Ordering::SeqCst) + 1;
        // Map reads are syscalls: keep them off the async workers.
        let body = tokio::task::spawn_blocking(read)
            .await
            .unwrap_or_else(|e| Err(format!("the task reading failed: {e}")));
        *last = (number, body);
        last.1.clone()
    }
}

/// The shared reads of the `/debug` bodies read from the maps.
#[derive(Default)]
pub struct DebugReads {
    pub snapshot: SharedRead,
    pub cufile: SharedRead,
}

/// `read`'s value as JSON, or what failed reading `what`.
fn json_of<T: serde::Serialize>(
    what: &str,
    read: impl FnOnce() -> Result<T, gds_trace::TraceError>,
) -> Result<Bytes, String> {
    let value = read().map_err(|e| format!("reading {what} failed: {e}"))?;
    serde_json::to_vec(&value)
        .map(Bytes::from)
        .map_err(|e| format!("encoding {what} as JSON failed: {e}"))
}

/// A shared read's answer: the JSON body, or a 500 that says what failed.
fn json_response(body: Result<Bytes, String>) -> axum::response::Response {
    match body {
        Ok(b) => ([(header::CONTENT_TYPE, "application/json")], b).into_response(),
        Err(e) => (
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            format!("{e}\n"),
        )
            .into_response(),
    }
}

/// Everything `top` shows, in the model's types: statistics, in-flight requests, stalls,
/// recent slow events, layers, cuFile. Every list bounded (`model::SNAPSHOT_*`,
/// `model::cufile::REPORT_*`).
async fn snapshot(State(s): State<AppState>) -> axum::response::Response {
    let (stalls, slow, tracer) = (s.stalls.clone(), s.slow.clone(), s.tracer.clone());
    let body = s
        .debug_reads
        .snapshot
        .get(move || {
            let stalls = stalls.lock().unwrap_or_else(|p| p.into_inner()).clone();
            json_of("the tracer's maps", || {
                Snapshot::collect(&*tracer, stalls, slow.list())
            })
        })
        .await;
    json_response(body)
}

/// cuFile: libraries attached, processes and their files with the path their I/O took (and
/// why compat), calls in flight; every list bounded (`model::cufile::REPORT_*`).
async fn cufile(State(s): State<AppState>) -> axum::response::Response {
    let tracer = s.tracer.clone();
    let body = s
        .debug_reads
        .cufile
        .get(move || {
            json_of("the cuFile maps", || {
                model::cufile::CufileReport::collect(&*tracer)
            })
        })
        .await;
    json_response(body)
}

/// How each layer (io_uring, block, NVMe, cuFile) is traced now and why.
async fn layers(State(state): State<AppState>) -> impl IntoResponse {
    axum::Json(state.tracer.layers())
}

async fn index() -> impl IntoResponse {
    "gds-agent: /metrics (Prometheus); JSON: /debug/inflight (requests in flight, oldest first), \
     /debug/stalls (active and recent stalls), /debug/slow (recent slow requests), \
     /debug/layers (how each layer is traced and why), /debug/cufile (cuFile libraries, \
     processes, files and the path their I/O took), /debug/snapshot (all of it, as `top` \
     reads it)\n"
}

mod port_holder;

/// How long a restart waits for a previous gds-agent that is still exiting to release the
/// port: after a SIGKILL with ~1,400 uprobe links it held the port 27 s on the dev VM (each
/// link's release waits for an RCU grace period); 30 s covers that, and stays within what a
/// supervisor lets a start take (systemd's default TimeoutStartSec is 90 s).
pub const PREVIOUS_AGENT_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// How often the bind is retried while waiting for a previous agent to exit.
const PREVIOUS_AGENT_POLL: std::time::Duration = std::time::Duration::from_millis(200);

/// What to do about a failed bind, by its cause; for a port in use, who holds it (and whether
/// it is a previous gds-agent still exiting).
fn bind_hint(e: &std::io::Error, addr: SocketAddr) -> String {
    match e.kind() {
        std::io::ErrorKind::AddrInUse => {
            match port_holder::find(std::path::Path::new("/proc"), addr.port()) {
                Some(h) => h.to_string(),
                None => "another process holds the port (none found in this PID namespace's \
                         /proc); choose another with --listen"
                    .into(),
            }
        }
        std::io::ErrorKind::AddrNotAvailable => {
            "no interface of this host has that address; use 127.0.0.1 or an address from `ip addr`"
                .into()
        }
        std::io::ErrorKind::PermissionDenied => {
            "ports below 1024 need CAP_NET_BIND_SERVICE; use a port such as 9477".into()
        }
        _ => "choose another address with --listen".into(),
    }
}

/// `--listen`: `IP:PORT`, `[IPv6]:PORT` or `HOST:PORT`. A host name is resolved as `--agent`
/// resolves it ([`gds_api::client::parse_addr`], the first address the resolver gives), so
/// `--listen localhost:9477` and `--agent localhost:9477` name the same socket.
pub fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = s.parse() {
        return Ok(addr);
    }
    if s.contains("://") {
        return Err(format!(
            "{s:?} is a URL; give host:port (e.g. 127.0.0.1:9477, [::1]:9477, localhost:9477)"
        ));
    }
    gds_api::client::parse_addr(s).map_err(|_| {
        format!(
            "{s:?} is not host:port with a host this machine can resolve (e.g. 127.0.0.1:9477, \
             [::1]:9477, localhost:9477)"
        )
    })
}

/// Binds first (so a port in use is reported before anything is loaded).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, HttpError> {
    if addr.ip().is_unspecified() {
        tracing::warn!(
            %addr,
            "listening on all interfaces: metrics and debug endpoints are reachable from the network"
        );
    }
    // A previous gds-agent still exiting (SIGKILLed, releasing its uprobes) holds the port
    // for seconds: wait for it, bounded, saying so once.
    let deadline = std::time::Instant::now() + PREVIOUS_AGENT_WAIT;
    let mut said = false;
    loop {
        let source = match TcpListener::bind(addr).await {
            Ok(l) => return Ok(l),
            Err(e) => e,
        };
        let dying = (source.kind() == std::io::ErrorKind::AddrInUse)
            .then(|| port_holder::find(std::path::Path::new("/proc"), addr.port()))
            .flatten()
            .filter(port_holder::Holder::agent_exiting);
        match dying {
            Some(h) if std::time::Instant::now() < deadline => {
                if !said {
                    tracing::warn!(
                        %addr,
                        "{h}: waiting up to {}s for it",
                        PREVIOUS_AGENT_WAIT.as_secs()
                    );
                    said = true;
                }
                tokio::time::sleep(PREVIOUS_AGENT_POLL).await;
            }
            _ => {
                let hint = bind_hint(&source, addr);
                return Err(HttpError::Bind { addr, source, hint });
            }
        }
    }
}

/// Serves until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), HttpError> {
    let app = Router::new()
        .route("/", get(index))
        .route("/metrics", get(metrics))
        .route("/debug/slow", get(slow))
        .route("/debug/stalls", get(stalls))
        .route("/debug/inflight", get(inflight))
        .route("/debug/layers", get(layers))
        .route("/debug/snapshot", get(snapshot))
        .route("/debug/cufile", get(cufile))
        .with_state(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(HttpError::Serve)
}

#[cfg(test)]
mod tests {
    use std::{sync::atomic::AtomicU64, time::Duration};

    use prometheus::{
        core::{Collector, Desc},
        proto::MetricFamily,
    };

    use super::*;

    /// A gauge whose value is the number of times it was collected; each collect takes 20 ms.
    struct Collects {
        n: Arc<AtomicU64>,
        gauge: prometheus::IntGauge,
    }

    impl Collector for Collects {
        fn desc(&self) -> Vec<&Desc> {
            self.gauge.desc()
        }

        fn collect(&self) -> Vec<MetricFamily> {
            let n = self.n.fetch_add(1, Ordering::SeqCst) + 1;
            std::thread::sleep(Duration::from_millis(20));
            self.gauge.set(n as i64);
            self.gauge.collect()
        }
    }

    fn renderer() -> (Arc<MetricsRenderer>, Arc<AtomicU64>) {
        let n = Arc::new(AtomicU64::new(0));
        let registry = prometheus::Registry::new();
        let gauge = prometheus::IntGauge::new("collects", "times collected").unwrap();
        registry
            .register(Box::new(Collects {
                n: n.clone(),
                gauge,
            }))
            .unwrap();
        (Arc::new(MetricsRenderer::new(registry)), n)
    }

    fn value(body: &Bytes) -> u64 {
        let text = std::str::from_utf8(body).unwrap();
        let line = text.lines().find(|l| l.starts_with("collects ")).unwrap();
        line["collects ".len()..].parse().unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_scrapes_share_renders() {
        let (r, n) = renderer();
        let tasks: Vec<_> = (0..200)
            .map(|_| {
                let r = r.clone();
                tokio::spawn(async move { r.render().await })
            })
            .collect();
        for t in tasks {
            assert!(value(&t.await.unwrap()) >= 1);
        }
        // One render for the first scrape, one for everyone who waited on it (a few more when
        // the spawns straddle a render).
        let renders = n.load(Ordering::SeqCst);
        assert!(
            renders <= 10,
            "{renders} renders for 200 concurrent scrapes"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_scrape_sees_a_render_that_started_after_it() {
        let (r, n) = renderer();
        for expected in 1..=3 {
            assert_eq!(value(&r.render().await), expected, "sequential scrapes");
        }
        // A scrape arriving while a render runs must not take that render's (older) body.
        let first = tokio::spawn({
            let r = r.clone();
            async move { r.render().await }
        });
        tokio::time::sleep(Duration::from_millis(5)).await;
        let before_second = n.load(Ordering::SeqCst);
        let second = r.render().await;
        assert!(value(&second) > before_second, "stale body");
        assert!(value(&first.await.unwrap()) >= 4);
    }
}
