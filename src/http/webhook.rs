//! The webhook handler: read the body (bounded in size and time), answer the handshake,
//! authenticate the batch, split it, and hand it to the durability stage.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use subtle::ConstantTimeEq;
use tracing::{info, info_span, warn, Instrument};

use super::{ApiError, AppState};
use crate::clock::now_secs;
use crate::event::{self, Body as WebhookBody};

static REQUEST_SEQ: AtomicU64 = AtomicU64::new(0);

/// A short id for the log lines of one request, also returned as `x-request-id`.
fn request_id() -> String {
    let n = REQUEST_SEQ.fetch_add(1, Ordering::Relaxed);
    format!("{:08x}-{n}", std::process::id())
}

pub async fn handle(State(st): State<Arc<AppState>>, req: Request) -> Response {
    let rid = request_id();
    let span = info_span!("request", request_id = %rid);
    let started = Instant::now();
    let (outcome, mut resp) = async {
        match process(&st, req).await {
            Ok((outcome, resp)) => (outcome, resp),
            Err(e) => {
                match &e {
                    ApiError::Unavailable { .. } => warn!(code = e.code(), error = %e, "webhook refused"),
                    _ => info!(code = e.code(), error = %e, "webhook refused"),
                }
                (e.outcome(), e.into_response())
            }
        }
    }
    .instrument(span)
    .await;
    st.metrics.http_requests.with_label_values(&[outcome]).inc();
    st.metrics.request_duration.with_label_values(&[outcome]).observe(started.elapsed().as_secs_f64());
    if let Ok(v) = HeaderValue::from_str(&rid) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

async fn process(st: &AppState, req: Request) -> Result<(&'static str, Response), ApiError> {
    if st.is_draining() {
        return Err(ApiError::Unavailable { reason: "shutting_down", retry_after_secs: st.retry_after_secs });
    }
    let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|len| len > st.max_body_bytes as u64) {
        return Err(ApiError::TooLarge { limit: st.max_body_bytes });
    }
    let body = read_body(st, req.into_body()).await?;
    let received_at = now_secs();
    match event::parse_body(&body)? {
        WebhookBody::Handshake { token } => {
            let token = token.filter(|t| token_accepted(st, t)).ok_or(ApiError::Unauthorized)?;
            info!("handshake answered");
            let resp = ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], token.to_owned()).into_response();
            Ok(("handshake", resp))
        }
        WebhookBody::Batch(batch) => {
            if !batch.token.is_some_and(|t| token_accepted(st, t)) {
                return Err(ApiError::Unauthorized);
            }
            let events = event::split(&batch, received_at);
            let n = events.len();
            let accepted = st.ingest.accept(events, received_at, &st.metrics).await.map_err(|e| {
                warn!(error = %e, "batch not made durable");
                ApiError::Unavailable { reason: e.code(), retry_after_secs: st.retry_after_secs }
            })?;
            info!(events = n, duplicates = accepted.duplicates, "batch accepted");
            let body = axum::Json(serde_json::json!({ "accepted": accepted.events }));
            Ok(("accepted", (StatusCode::OK, body).into_response()))
        }
    }
}

/// Reads the whole body: refuses by `Content-Length` before reading, stops reading at the limit, and
/// gives up when the client is too slow.
async fn read_body(st: &AppState, body: Body) -> Result<Bytes, ApiError> {
    let limit = st.max_body_bytes;
    let collected = tokio::time::timeout(st.body_timeout, Limited::new(body, limit).collect())
        .await
        .map_err(|_| ApiError::Timeout)?;
    match collected {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Err(ApiError::TooLarge { limit }),
        Err(_) => Err(ApiError::BodyRead),
    }
}

/// Compares against every configured token in constant time (no early exit on a match).
fn token_accepted(st: &AppState, token: &str) -> bool {
    let mut ok = subtle::Choice::from(0);
    for t in &st.tokens {
        ok |= t.expose().as_bytes().ct_eq(token.as_bytes());
    }
    ok.into()
}
