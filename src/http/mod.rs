//! The two listeners. Public: the webhook (authenticate → split → hand to the durability stage;
//! nothing slow in spool mode). Admin: `/metrics`, `/healthz`, `/readyz`, on its own address.
//!
//! The public server is hyper driven by hand, so that it can bound what a hostile client can hold:
//! a connection limit, a header (and idle keep-alive) timeout, a body timeout, a body size limit.
//! With `[http.tls]` it speaks HTTPS ([`tls`]); the handshake is bounded by the header timeout.

mod auth;
mod budget;
mod error;
mod tls;
mod webhook;

use std::net::SocketAddr;
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

pub(crate) use auth::Auth;
pub use auth::AuthTable;
pub(crate) use budget::{BodyBudget, Reservation};
pub(crate) use error::ApiError;
pub use tls::Pair;
pub(crate) use tls::{configured_pair, Tls, TLS_CONNECTION_BYTES};

use crate::config::Config;
use crate::health::Health;
use crate::ingest::Ingest;
use crate::metrics::{HttpOutcome, Metrics};

/// What the handlers share.
pub(crate) struct AppState {
    /// Accepted credentials; replaced whole by a reload.
    auth: Arc<AuthTable>,
    /// Where batches are made durable: the spool or Kafka in the daemon, a fake in tests.
    ingest: Arc<dyn Ingest>,
    metrics: Arc<Metrics>,
    /// Readiness, liveness and state gauges; also where shutdown is announced.
    health: Arc<Health>,
    max_body_bytes: usize,
    /// Request bodies held at once (`http.max_inflight_bytes`).
    body_budget: Arc<BodyBudget>,
    body_timeout: Duration,
    /// Longest wait for a body to start, or for its next bytes (`http.header_timeout_ms`).
    body_idle_timeout: Duration,
    retry_after_secs: u64,
}

impl AppState {
    pub(crate) fn new(cfg: &Config, ingest: Arc<dyn Ingest>, metrics: Arc<Metrics>, health: Arc<Health>) -> Self {
        AppState {
            auth: Arc::new(AuthTable::new(Auth::from_config(cfg))),
            ingest,
            body_budget: BodyBudget::new(cfg.http.max_inflight_bytes, metrics.http_inflight_body_bytes.clone()),
            metrics,
            health,
            max_body_bytes: cfg.http.max_body_bytes,
            body_timeout: cfg.body_timeout(),
            body_idle_timeout: cfg.header_timeout(),
            retry_after_secs: cfg.http.retry_after_secs,
        }
    }

    /// The auth table requests are judged by, for a reload to replace.
    pub(crate) fn auth(&self) -> Arc<AuthTable> {
        self.auth.clone()
    }

    pub(crate) fn is_draining(&self) -> bool {
        self.health.is_draining()
    }
}

/// The public router; built apart from binding so tests can call it directly.
pub(crate) fn public_router(path: &str, state: Arc<AppState>) -> Router {
    Router::new().route(path, post(webhook::handle).fallback(method_not_allowed)).fallback(not_found).with_state(state)
}

async fn not_found(State(st): State<Arc<AppState>>) -> ApiError {
    st.metrics.http_requests.with_label_values(&[HttpOutcome::NotFound.label()]).inc();
    ApiError::NotFound
}

async fn method_not_allowed(State(st): State<Arc<AppState>>) -> ApiError {
    st.metrics.http_requests.with_label_values(&[HttpOutcome::MethodNotAllowed.label()]).inc();
    ApiError::MethodNotAllowed
}

/// The admin router: metrics and probes.
pub(crate) fn admin_router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
}

async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    st.health.refresh_gauges();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], st.metrics.render()).into_response()
}

async fn readyz(State(st): State<Arc<AppState>>) -> Response {
    let reasons = st.health.not_ready_reasons();
    st.metrics.ready.set(i64::from(reasons.is_empty()));
    if reasons.is_empty() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, axum::Json(serde_json::json!({ "ready": false, "reasons": reasons })))
            .into_response()
    }
}

async fn healthz(State(st): State<Arc<AppState>>) -> Response {
    let reasons = st.health.not_live_reasons();
    st.metrics.live.set(i64::from(reasons.is_empty()));
    if reasons.is_empty() {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, axum::Json(serde_json::json!({ "live": false, "reasons": reasons })))
            .into_response()
    }
}

/// Limits of the public server.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ServeLimits {
    pub(crate) header_timeout: Duration,
    pub(crate) max_connections: usize,
}

/// Largest read buffer of one connection (hyper's default is about 400 KiB). With bodies bounded by
/// `http.max_inflight_bytes`, what connections hold is the other half of the memory bound:
/// `http.max_connections` × this. Request heads must fit in it too (Huggy's are well under 2 KiB).
pub(crate) const CONNECTION_READ_BUFFER_BYTES: usize = 64 * 1024;

/// Serves `router` on `listener` (over TLS with `tls`) until `stop`, then lets in-flight requests
/// finish within `drain`.
pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    tls: Option<Arc<Tls>>,
    limits: ServeLimits,
    stop: CancellationToken,
    drain: Duration,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true)
        .max_buf_size(CONNECTION_READ_BUFFER_BYTES);
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
        // Taken now, so that a shutdown waits for a connection still in its TLS handshake.
        let watcher = graceful.watcher();
        let (builder, tls) = (builder.clone(), tls.clone());
        tokio::spawn(async move {
            let served = match tls {
                None => watcher.watch(builder.serve_connection(TokioIo::new(stream), svc)).await,
                Some(tls) => match tls.accept(stream).await {
                    Some(stream) => watcher.watch(builder.serve_connection(TokioIo::new(stream), svc)).await,
                    None => Ok(()),
                },
            };
            if let Err(e) = served {
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
pub(crate) async fn serve_admin(listener: TcpListener, router: Router, stop: CancellationToken) {
    if let Err(e) = axum::serve(listener, router).with_graceful_shutdown(stop.cancelled_owned()).await {
        warn!(error = %e, "admin listener failed");
    }
}

/// A listener that could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} ({key})")]
pub(crate) struct BindError {
    /// The address asked for.
    addr: SocketAddr,
    /// The setting it came from, e.g. `http.listen`.
    key: &'static str,
    /// What the operating system said.
    #[source]
    source: std::io::Error,
}

/// Binds a listener, with a clear error naming the address and the setting it came from.
///
/// # Errors
/// The address is in use, not local, or not allowed.
pub(crate) async fn bind(addr: SocketAddr, key: &'static str) -> Result<TcpListener, BindError> {
    TcpListener::bind(addr).await.map_err(|source| BindError { addr, key, source })
}

#[cfg(test)]
mod tests;
