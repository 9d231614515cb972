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
use tracing::{info, info_span, warn, Instrument};

use super::{ApiError, AppState, Auth, Reservation};
use crate::clock::now_secs;
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
        (decode(&body, &auth, received_at), held)
    } else {
        // Scanning megabytes of JSON takes long enough to hold up every other request on this
        // worker; the blocking pool keeps the workers free. The reservation goes along, so the
        // bytes stay counted until the decoding ends, even if the client leaves meanwhile.
        let decoding = tokio::task::spawn_blocking(move || (decode(&body, &auth, received_at), held));
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

/// Authenticates and parses a body and splits a batch into events. Pure CPU work, no I/O.
fn decode(body: &[u8], auth: &Auth, received_at: i64) -> Result<Decoded, ApiError> {
    // A wrong token found by a cheap scan (one pass, no allocation) is refused before the parse.
    // A token the scan does not find (none at all, an escaped one, an escaped `token` key) is looked
    // for in the envelope, read without its events: the parse of the events, which takes several
    // times the body in memory, is only spent on a body whose token is accepted. A malformed body
    // gets the parse's 400 from the envelope too.
    match event::top_level_token(body) {
        Some(t) if !auth.accepts(t) => return Err(ApiError::Unauthorized),
        Some(_) => {}
        None => match event::envelope_token(body)? {
            Some(t) if auth.accepts(t) => {}
            _ => return Err(ApiError::Unauthorized),
        },
    }
    match event::parse_body(body)? {
        WebhookBody::Handshake { token } => {
            let token = token.filter(|t| auth.accepts(t)).ok_or(ApiError::Unauthorized)?;
            Ok(Decoded::Handshake(token.to_owned()))
        }
        WebhookBody::Batch(batch) => {
            let sender = batch.token.and_then(|t| auth.check(t)).ok_or(ApiError::Unauthorized)?;
            Ok(Decoded::Batch(event::split(&batch, &sender, received_at)))
        }
    }
}

/// Reads the whole body within the in-flight budget. What counts is bytes *received*, never what
/// `Content-Length` declares: a request takes nothing from the budget until its body arrives, and
/// then the memory its buffer needs as each chunk comes in (a declared length only caps how far the
/// buffer grows ahead of the bytes). So a connection that sends a head and then nothing holds its
/// socket and nothing else. A request needs the budget not to be spent to start, and is refused
/// (503 `overloaded`) when a chunk does not fit. Reading stops at `max_body_bytes` (413), when the
/// whole body takes longer than `http.body_timeout_ms`, and when the body does not start or stalls
/// for longer than `http.header_timeout_ms` (408): an idle sender is let go as fast as an idle head.
async fn read_body(st: &AppState, body: Body, declared: Option<u64>) -> Result<(Vec<u8>, Reservation), ApiError> {
    let overloaded = || ApiError::Overloaded { retry_after_secs: st.retry_after_secs };
    let limit = st.max_body_bytes;
    // `declared` is at most `limit` here, which is a usize.
    let declared = declared.map(|n| usize::try_from(n).unwrap_or(limit));
    let mut held = st.body_budget.try_reserve(0).ok_or_else(overloaded)?;
    let idle = st.body_idle_timeout.min(st.body_timeout);
    let read = async {
        let mut body = body;
        let mut buf: Vec<u8> = Vec::new();
        loop {
            let frame = tokio::time::timeout(idle, body.frame()).await.map_err(|_| ApiError::Timeout)?;
            let Some(frame) = frame else { break };
            let Ok(data) = frame.map_err(|_| ApiError::BodyRead)?.into_data() else { continue };
            let total = buf.len() + data.len();
            if total > limit {
                return Err(ApiError::TooLarge { limit });
            }
            if total > buf.capacity() {
                let capacity = grown_capacity(buf.capacity(), total, declared, limit);
                if !held.try_grow_to(capacity) {
                    return Err(overloaded());
                }
                buf.reserve_exact(capacity - buf.len());
            }
            buf.extend_from_slice(&data);
        }
        Ok(buf)
    };
    let buf = tokio::time::timeout(st.body_timeout, read).await.map_err(|_| ApiError::Timeout)??;
    Ok((buf, held))
}

/// The capacity a body buffer grows to so that it holds `needed` bytes: doubling (amortized
/// copies), but never past the declared length when the body stays within it, nor past `limit`.
/// The budget is charged this capacity, so it counts the memory held, not only the bytes in it.
pub(super) fn grown_capacity(current: usize, needed: usize, declared: Option<usize>, limit: usize) -> usize {
    let ceiling = declared.unwrap_or(limit).max(needed).min(limit);
    current.saturating_mul(2).max(needed).min(ceiling)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    const TOKEN: &str = "132ce76c7abb1154f01ebc0d508162e4";

    fn auth() -> Auth {
        Auth::new(&[Secret::new(TOKEN)])
    }

    /// `decode`'s verdict on `body`, and whether it parsed the body to get there.
    fn decode_counting(body: &[u8]) -> (Result<Decoded, ApiError>, bool) {
        let before = event::parse_count();
        let decoded = decode(body, &auth(), 1);
        (decoded, event::parse_count() > before)
    }

    #[test]
    fn a_body_without_an_acceptable_token_is_refused_before_its_events_are_parsed() {
        let events = vec!["1"; 100_000].join(",");
        let bodies = [
            format!(r#"{{"time":1,"messages":{{"a":[{events}]}}}}"#),
            format!(r#"{{"time":1,"messages":{{"a":[{events}]}},"token":null}}"#),
            format!(r#"{{"time":1,"messages":{{"a":[{events}]}},"token":123}}"#),
            format!(r#"{{"time":1,"messages":{{"a":[{events}]}},"token":{{"t":1}}}}"#),
            // Escaped: not found by the scan; a token with escapes is refused, as before.
            format!(r#"{{"time":1,"messages":{{"a":[{events}]}},"token":"132ce76c7abb1154f01ebc0d508162e\u0034"}}"#),
            // An escaped key names the token, which the scan does not see; a wrong one is refused.
            format!(r#"{{"time":1,"messages":{{"a":[{events}]}},"tok\u0065n":"wrong"}}"#),
            format!(r#"{{"messages":{{"a":[{events}]}}}}"#),
            r#"{"token":"132ce76c7abb1154f01ebc0d508162e\u0034","validToken":true}"#.to_owned(),
        ];
        for body in bodies {
            let (decoded, parsed) = decode_counting(body.as_bytes());
            let what = &body[body.len().saturating_sub(80)..];
            assert!(matches!(decoded, Err(ApiError::Unauthorized)), "{what}");
            assert!(!parsed, "refused before the parse: {what}");
        }
    }

    #[test]
    fn a_token_under_an_escaped_key_is_still_read_for_a_batch_and_a_handshake() {
        let batch =
            format!(r#"{{"time":1,"messages":{{"receivedMessage":[{{"id":1}},{{"id":2}}]}},"tok\u0065n":"{TOKEN}"}}"#);
        let (decoded, parsed) = decode_counting(batch.as_bytes());
        assert!(matches!(decoded, Ok(Decoded::Batch(ref e)) if e.len() == 2), "{:?}", decoded.err());
        assert!(parsed);
        let handshake = format!(r#"{{"tok\u0065n":"{TOKEN}","validToken":true}}"#);
        assert!(matches!(decode(handshake.as_bytes(), &auth(), 1), Ok(Decoded::Handshake(t)) if t == TOKEN));
        // And with the token where the scan finds it, as always.
        let plain = format!(r#"{{"token":"{TOKEN}","validToken":true}}"#);
        assert!(matches!(decode(plain.as_bytes(), &auth(), 1), Ok(Decoded::Handshake(t)) if t == TOKEN));
    }

    #[test]
    fn malformed_bodies_without_a_token_keep_the_parsers_400_without_the_parse() {
        let deep = format!(r#"{{"messages":{{"a":{}1{}}}}}"#, "[".repeat(70), "]".repeat(70));
        let cases: [(&[u8], &str); 10] = [
            (b"{not json", "invalid_json"),
            (b"", "invalid_json"),
            (b"[1,2,3]", "not_an_object"),
            (b"[null,null,null,null]", "not_an_object"),
            (br#"{"time":1}"#, "missing_messages"),
            (br#"{"time":1,"messages":null}"#, "missing_messages"),
            (br#"{"time":1,"messages":"x"}"#, "messages_not_object"),
            (br#"{"time":1,"messages":{"a":[1]}}garbage"#, "invalid_json"),
            (br#"{"token":"a\u0062","token":"ab","messages":{}}"#, "invalid_json"),
            (deep.as_bytes(), "too_deep"),
        ];
        for (body, code) in cases {
            let what = String::from_utf8_lossy(body);
            let (decoded, parsed) = decode_counting(body);
            let Err(ApiError::BadBody(e)) = decoded else { panic!("400 expected: {what}") };
            assert_eq!(e.code(), code, "{what}");
            assert_eq!(Err(e), event::parse_body(body).map(|_| ()), "the parse's own verdict: {what}");
            assert!(!parsed, "without a parse of the events: {what}");
        }
    }

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
}
