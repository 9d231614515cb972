//! The webhook handler: read the body (bounded in size and time), answer the handshake,
//! authenticate the batch, split it, and hand it to the durability stage.

use std::hash::{BuildHasher, Hasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tracing::{info, info_span, warn, Instrument};

use super::{ApiError, AppState, Reservation};
use crate::clock::now_secs;
use crate::config::Secret;
use crate::event::{self, Body as WebhookBody};
use crate::metrics::HttpOutcome;

static REQUEST_SEQ: AtomicU64 = AtomicU64::new(0);

/// A random number drawn once per process, so request ids do not repeat across replicas (where the
/// pid is often 1) or restarts. std's `RandomState` is seeded from the operating system's random
/// source; a 64-bit id does not need a cryptographic generator, so no crate is added for it.
fn process_nonce() -> u64 {
    static NONCE: OnceLock<u64> = OnceLock::new();
    *NONCE.get_or_init(|| {
        let mut h = RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
        h.finish()
    })
}

/// An id for the log lines of one request, also returned as `x-request-id`: the process nonce and a
/// counter, unique across replicas and restarts.
fn request_id() -> String {
    let n = REQUEST_SEQ.fetch_add(1, Ordering::Relaxed);
    format!("{:016x}-{n}", process_nonce())
}

pub(crate) async fn handle(State(st): State<Arc<AppState>>, req: Request) -> Response {
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
    st.metrics.observe_request(outcome, started.elapsed().as_secs_f64());
    if let Ok(v) = HeaderValue::from_str(&rid) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

async fn process(st: &Arc<AppState>, req: Request) -> Result<(HttpOutcome, Response), ApiError> {
    if st.is_draining() {
        return Err(ApiError::Unavailable { reason: "shutting_down", retry_after_secs: st.retry_after_secs });
    }
    let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|len| len > st.max_body_bytes as u64) {
        return Err(ApiError::TooLarge { limit: st.max_body_bytes });
    }
    // The credentials in force when the request arrived judge it, even if a reload replaces them
    // while its body is being read.
    let auth = st.auth.current();
    // Held until the answer is ready, or until hyper drops this future because the client left.
    let (body, held) = read_body(st, req.into_body(), declared).await?;
    let received_at = now_secs();
    let (decoded, _held) = if body.len() <= DECODE_INLINE_BYTES {
        (decode(&body, &auth.tokens, received_at), held)
    } else {
        // Scanning megabytes of JSON takes long enough to hold up every other request on this
        // worker; the blocking pool keeps the workers free. The reservation goes along, so the
        // bytes stay counted until the decoding ends, even if the client leaves meanwhile.
        let decoding = tokio::task::spawn_blocking(move || (decode(&body, &auth.tokens, received_at), held));
        match decoding.await {
            Ok(done) => done,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => {
                return Err(ApiError::Unavailable { reason: "shutting_down", retry_after_secs: st.retry_after_secs })
            }
        }
    };
    match decoded? {
        Decoded::Handshake(token) => {
            info!("handshake answered");
            let resp = ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], token).into_response();
            Ok((HttpOutcome::Handshake, resp))
        }
        Decoded::Batch(events) => {
            let n = events.len();
            let accepted = st.ingest.accept(events, received_at, &st.metrics).await.map_err(|e| {
                warn!(error = %e, "batch not made durable");
                ApiError::Unavailable { reason: e.code(), retry_after_secs: st.retry_after_secs }
            })?;
            info!(events = n, duplicates = accepted.duplicates, "batch accepted");
            let body = axum::Json(serde_json::json!({ "accepted": accepted.events }));
            Ok((HttpOutcome::Accepted, (StatusCode::OK, body).into_response()))
        }
    }
}

/// Bodies up to this size are decoded on the async worker; larger ones on the blocking pool.
const DECODE_INLINE_BYTES: usize = 64 * 1024;

/// An authenticated body, owned.
enum Decoded {
    /// The token to echo back.
    Handshake(String),
    Batch(Vec<event::Event>),
}

/// Parses and authenticates a body and splits a batch into events. Pure CPU work, no I/O.
fn decode(body: &[u8], tokens: &[Secret], received_at: i64) -> Result<Decoded, ApiError> {
    match event::parse_body(body)? {
        WebhookBody::Handshake { token } => {
            let token = token.filter(|t| token_accepted(tokens, t)).ok_or(ApiError::Unauthorized)?;
            Ok(Decoded::Handshake(token.to_owned()))
        }
        WebhookBody::Batch(batch) => {
            if !batch.token.is_some_and(|t| token_accepted(tokens, t)) {
                return Err(ApiError::Unauthorized);
            }
            Ok(Decoded::Batch(event::split(&batch, received_at)))
        }
    }
}

/// Reads the whole body within the in-flight budget: a declared `Content-Length` is reserved before
/// anything is read, and refused (503 `overloaded`) when the budget cannot cover it; a body without
/// one needs the budget not to be spent, then takes each chunk from it as the chunk arrives. Reading
/// stops at `max_body_bytes` (413) and when the client is too slow (408).
async fn read_body(st: &AppState, body: Body, declared: Option<u64>) -> Result<(Vec<u8>, Reservation), ApiError> {
    let overloaded = || ApiError::Overloaded { retry_after_secs: st.retry_after_secs };
    let limit = st.max_body_bytes;
    // `declared` is at most `limit` here, which is a usize.
    let declared = declared.map_or(0, |n| usize::try_from(n).unwrap_or(limit));
    let mut held = st.body_budget.try_reserve(declared).ok_or_else(overloaded)?;
    let read = async {
        let mut body = body;
        let mut buf = Vec::with_capacity(declared);
        while let Some(frame) = body.frame().await {
            let Ok(data) = frame.map_err(|_| ApiError::BodyRead)?.into_data() else { continue };
            let total = buf.len() + data.len();
            if total > limit {
                return Err(ApiError::TooLarge { limit });
            }
            if !held.try_grow_to(total) {
                return Err(overloaded());
            }
            buf.extend_from_slice(&data);
        }
        Ok(buf)
    };
    let buf = tokio::time::timeout(st.body_timeout, read).await.map_err(|_| ApiError::Timeout)??;
    Ok((buf, held))
}

/// Compares the presented token with every configured one, in time that depends on neither the
/// token's content nor its length: both sides are hashed to SHA-256 first, and the digests compared
/// with `ct_eq` without an early exit on a match.
fn token_accepted(tokens: &[Secret], token: &str) -> bool {
    let presented = Sha256::digest(token.as_bytes());
    let mut ok = subtle::Choice::from(0);
    for t in tokens {
        ok |= Sha256::digest(t.expose().as_bytes()).as_slice().ct_eq(presented.as_slice());
    }
    ok.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_carry_a_process_nonce_and_do_not_repeat() {
        let (a, b) = (request_id(), request_id());
        assert_ne!(a, b);
        let (nonce_a, _) = a.split_once('-').expect("nonce-counter");
        let (nonce_b, _) = b.split_once('-').expect("nonce-counter");
        assert_eq!(nonce_a, nonce_b, "one nonce per process");
        assert_eq!(nonce_a.len(), 16);
        assert_ne!(nonce_a, format!("{:016x}", std::process::id()), "not the pid");
    }

    #[test]
    fn any_configured_token_is_accepted_whatever_the_lengths() {
        let tokens = [Secret::new("afb53a5e1abeeece89f2c80acb1686ab"), Secret::new("420786094f46358650")];
        assert!(token_accepted(&tokens, "afb53a5e1abeeece89f2c80acb1686ab"));
        assert!(token_accepted(&tokens, "420786094f46358650"));
        for wrong in ["", "420786094f4635865", "420786094f463586500", "afb53a5e1abeeece89f2c80acb1686ac"] {
            assert!(!token_accepted(&tokens, wrong), "{wrong:?}");
        }
        assert!(!token_accepted(&[], "anything"));
    }
}
