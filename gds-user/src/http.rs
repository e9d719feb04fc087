//! The agent's HTTP server: `/metrics` for Prometheus, `/debug/*` JSON for people and tools.

use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use axum::{Router, extract::State, http::header, response::IntoResponse, routing::get};
use thiserror::Error;
use tokio::net::TcpListener;

use crate::{
    stall::StallReport,
    trace::{SlowEvent, UringTracer},
};

#[derive(Debug, Error)]
pub enum HttpError {
    #[error("cannot listen on {addr}: {source} ({})", bind_hint(source))]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
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
    pub registry: prometheus::Registry,
    pub slow: Arc<RecentEvents>,
    pub stalls: Arc<Mutex<StallReport>>,
    pub tracer: Arc<UringTracer>,
}

/// One in-flight request as `/debug/inflight` shows it.
#[derive(serde::Serialize)]
struct InflightView {
    pid: u32,
    tid: u32,
    comm: String,
    opcode: String,
    user_data: u64,
    ring: String,
    req: String,
    age_seconds: f64,
    /// Where the request is, as far as tracing has seen it (`queue`: no device command seen).
    stage: &'static str,
}

async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    let registry = s.registry.clone();
    // Map reads are syscalls: keep them off the async workers.
    let body = tokio::task::spawn_blocking(move || crate::metrics::render(&registry))
        .await
        .unwrap_or_default();
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

/// Live view of every tracked in-flight request, oldest first.
async fn inflight(State(s): State<AppState>) -> impl IntoResponse {
    let tracer = s.tracer.clone();
    let list = tokio::task::spawn_blocking(move || {
        let now = crate::trace::monotonic_ns();
        let mut reqs = tracer.inflight();
        reqs.sort_by_key(|r| r.entry.start_ns);
        let mut comms = std::collections::HashMap::new();
        reqs.iter()
            .take(10_000)
            .map(|r| InflightView {
                pid: r.entry.tgid,
                tid: r.entry.pid,
                comm: comms
                    .entry(r.entry.tgid)
                    .or_insert_with(|| {
                        std::fs::read_to_string(format!("/proc/{}/comm", r.entry.tgid))
                            .map(|c| c.trim_end().to_owned())
                            .unwrap_or_else(|_| "?".into())
                    })
                    .clone(),
                opcode: crate::uring_opcode::name(r.entry.opcode as usize),
                user_data: r.entry.user_data,
                ring: format!("{:#x}", r.entry.ring),
                req: format!("{:#x}", r.req),
                age_seconds: now.saturating_sub(r.entry.start_ns) as f64 / 1e9,
                stage: crate::stall::Stage::of(r).label(),
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default();
    axum::Json(list)
}

async fn index() -> impl IntoResponse {
    "gds-agent: /metrics (Prometheus); JSON: /debug/inflight (requests in flight, oldest first), \
     /debug/stalls (active and recent stalls), /debug/slow (recent slow requests)\n"
}

/// Binds first (so a port in use is reported before anything is loaded).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, HttpError> {
    if addr.ip().is_unspecified() {
        tracing::warn!(
            %addr,
            "listening on all interfaces: metrics and debug endpoints are reachable from the network"
        );
    }
    TcpListener::bind(addr)
        .await
        .map_err(|source| HttpError::Bind { addr, source })
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
        .with_state(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(HttpError::Serve)
}
/// What to do about a failed bind, by its cause.
fn bind_hint(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::AddrInUse => {
            "another process — maybe another gds-agent — holds the port; choose another with --listen"
        }
        std::io::ErrorKind::AddrNotAvailable => {
            "no interface of this host has that address; use 127.0.0.1 or an address from `ip addr`"
        }
        std::io::ErrorKind::PermissionDenied => {
            "ports below 1024 need CAP_NET_BIND_SERVICE; use a port such as 9477"
        }
        _ => "choose another address with --listen",
    }
}

