//! The two listeners. Public: the webhook (authenticate → split → hand to the durability stage;
//! nothing slow in spool mode). Admin: `/metrics`, `/healthz`, `/readyz`, on its own address.
//!
//! The public server is hyper driven by hand, so that it can bound what a hostile client can hold:
//! a connection limit, a header (and idle keep-alive) timeout, a body timeout, a body size limit.

mod error;
mod webhook;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub use error::ApiError;

use crate::config::{Config, Secret};
use crate::ingest::Ingest;
use crate::metrics::Metrics;
use crate::publish::KafkaHealth;
use crate::clock::now_secs;
use crate::spool::Spool;

/// What the handlers share.
pub struct AppState {
    pub tokens: Vec<Secret>,
    pub ingest: Ingest,
    pub metrics: Arc<Metrics>,
    pub kafka: Arc<KafkaHealth>,
    pub spool: Option<Spool>,
    pub max_body_bytes: usize,
    pub body_timeout: Duration,
    pub retry_after_secs: u64,
    pub max_undelivered_age_secs: u64,
    /// Set when shutdown begins: new webhook requests get 503, readiness turns false.
    pub draining: AtomicBool,
}

impl AppState {
    pub fn new(
        cfg: &Config,
        ingest: Ingest,
        metrics: Arc<Metrics>,
        kafka: Arc<KafkaHealth>,
        spool: Option<Spool>,
    ) -> Self {
        AppState {
            tokens: cfg.huggy.tokens.clone(),
            ingest,
            metrics,
            kafka,
            spool,
            max_body_bytes: cfg.http.max_body_bytes,
            body_timeout: cfg.body_timeout(),
            retry_after_secs: cfg.http.retry_after_secs,
            max_undelivered_age_secs: cfg.spool.max_undelivered_age_secs,
            draining: AtomicBool::new(false),
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Reasons the daemon is not ready; empty when it is.
    pub fn not_ready_reasons(&self) -> Vec<String> {
        let mut reasons = Vec::new();
        if self.is_draining() {
            reasons.push("shutting down".to_owned());
        }
        if let Some(why) = self.kafka.not_ready_reason() {
            reasons.push(why);
        }
        if let Some(spool) = &self.spool {
            let s = spool.stats();
            if !s.writable {
                reasons.push("spool not writable".to_owned());
            }
            if s.full {
                reasons.push(format!("spool full ({} of {} bytes)", s.bytes, s.max_bytes));
            }
            if let Some(at) = s.oldest_received_at {
                let age = (now_secs() - at).max(0).unsigned_abs();
                if age > self.max_undelivered_age_secs {
                    reasons.push(format!("oldest undelivered event is {age}s old"));
                }
            }
        }
        reasons
    }

    /// Refreshes gauges that are read from state rather than counted.
    pub fn refresh_gauges(&self) {
        if let Some(spool) = &self.spool {
            let s = spool.stats();
            self.metrics.spool_events.set(s.events as i64);
            self.metrics.spool_bytes.set(s.bytes as i64);
            self.metrics.spool_max_bytes.set(s.max_bytes as i64);
            let age = s.oldest_received_at.map_or(0, |at| (now_secs() - at).max(0));
            self.metrics.spool_oldest_age.set(age);
        }
        self.metrics.kafka_connected.set(i64::from(self.kafka.is_reachable()));
        self.metrics.ready.set(i64::from(self.not_ready_reasons().is_empty()));
    }
}

/// The public router; built apart from binding so tests can call it directly.
pub fn public_router(path: &str, state: Arc<AppState>) -> Router {
    Router::new().route(path, post(webhook::handle).fallback(method_not_allowed)).fallback(not_found).with_state(state)
}

async fn not_found(State(st): State<Arc<AppState>>) -> ApiError {
    st.metrics.http_requests.with_label_values(&["not_found"]).inc();
    ApiError::NotFound
}

async fn method_not_allowed(State(st): State<Arc<AppState>>) -> ApiError {
    st.metrics.http_requests.with_label_values(&["method_not_allowed"]).inc();
    ApiError::MethodNotAllowed
}

/// The admin router: metrics and probes.
pub fn admin_router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(state)
}

async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    st.refresh_gauges();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], st.metrics.render()).into_response()
}

async fn readyz(State(st): State<Arc<AppState>>) -> Response {
    let reasons = st.not_ready_reasons();
    st.metrics.ready.set(i64::from(reasons.is_empty()));
    if reasons.is_empty() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, axum::Json(serde_json::json!({ "ready": false, "reasons": reasons })))
            .into_response()
    }
}

/// Limits of the public server.
#[derive(Debug, Clone, Copy)]
pub struct ServeLimits {
    pub header_timeout: Duration,
    pub max_connections: usize,
}

/// Serves `router` on `listener` until `stop`, then lets in-flight requests finish within `drain`.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ServeLimits,
    stop: CancellationToken,
    drain: Duration,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(limits.header_timeout).keep_alive(true);
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            () = stop.cancelled() => break,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stop.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        let svc = TowerToHyperService::new(router.clone());
        let conn = graceful.watch(builder.serve_connection(TokioIo::new(stream), svc));
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(%peer, error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    info!("listener closed; draining in-flight requests");
    tokio::select! {
        () = graceful.shutdown() => info!("in-flight requests finished"),
        () = tokio::time::sleep(drain) => warn!("drain deadline reached with requests still in flight"),
    }
}

/// Serves the admin router (plain axum) until `stop`.
pub async fn serve_admin(listener: TcpListener, router: Router, stop: CancellationToken) {
    if let Err(e) = axum::serve(listener, router).with_graceful_shutdown(stop.cancelled_owned()).await {
        warn!(error = %e, "admin listener failed");
    }
}

/// Binds a listener, with a clear error naming the address.
pub async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| anyhow::anyhow!("cannot listen on {addr} ({what}): {e}"))
}
