//! The webhook handler through the router, with a fake durability stage: `oneshot` requests, no
//! broker, no disk (axum's `examples/testing`).

use std::sync::Mutex;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use tower::ServiceExt;

use super::*;
use crate::config::Secret;
use crate::event::Event;
use crate::health::{KafkaHealth, Pulse};
use crate::ingest::{Accepted, IngestError};

const FIXTURE: &str = include_str!("../../tests/fixtures/startedChat+receivedMessage.json");

/// Records what it is handed and answers as told.
struct Fake {
    seen: Mutex<Vec<Event>>,
    refuse: bool,
}

impl Ingest for Fake {
    fn accept<'a>(
        &'a self,
        events: Vec<Event>,
        _received_at: i64,
        _metrics: &'a Metrics,
    ) -> futures::future::BoxFuture<'a, Result<Accepted, IngestError>> {
        Box::pin(async move {
            if self.refuse {
                return Err(IngestError::SpoolFull);
            }
            let n = events.len();
            self.seen.lock().unwrap().extend(events);
            Ok(Accepted { events: n, duplicates: 0 })
        })
    }
}

fn token() -> String {
    serde_json::from_str::<serde_json::Value>(FIXTURE).unwrap()["token"].as_str().unwrap().to_owned()
}

fn app(refuse: bool) -> (Router, Arc<Fake>, Arc<AppState>) {
    let mut cfg = Config::default();
    cfg.huggy.tokens = vec![Secret::new(token())];
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::new(&cfg, Arc::new(KafkaHealth::default()), None, Pulse::new(), metrics.clone()));
    let fake = Arc::new(Fake { seen: Mutex::new(Vec::new()), refuse });
    let state = Arc::new(AppState::new(&cfg, fake.clone(), metrics, health));
    (public_router(&cfg.http.path, state.clone()), fake, state)
}

async fn post(router: Router, body: impl Into<Body>) -> (StatusCode, axum::http::HeaderMap, String) {
    let req = Request::post("/webhooks/huggy").header("content-type", "application/json").body(body.into()).unwrap();
    let resp = router.oneshot(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    (parts.status, parts.headers, String::from_utf8_lossy(&bytes).into_owned())
}

#[tokio::test]
async fn a_batch_with_a_known_token_is_split_handed_over_and_answered_with_the_count() {
    let (router, fake, state) = app(false);
    let (status, _, body) = post(router, FIXTURE).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let seen = fake.seen.lock().unwrap();
    assert_eq!(body, format!(r#"{{"accepted":{}}}"#, seen.len()));
    assert_eq!(seen.len(), 2, "startedChat + receivedMessage");
    assert!(seen.iter().all(|e| FIXTURE.contains(std::str::from_utf8(&e.value).unwrap())), "values byte-exact");
    assert_eq!(state.metrics.http_requests.with_label_values(&[HttpOutcome::Accepted.label()]).get(), 1);
}

#[tokio::test]
async fn the_handshake_reads_the_token_back_and_an_unknown_token_gets_401_with_nothing_handed_over() {
    let (router, fake, _) = app(false);
    let (status, headers, body) = post(router.clone(), format!(r#"{{"token":"{}","validToken":true}}"#, token())).await;
    assert_eq!((status, body), (StatusCode::OK, token()));
    assert!(headers["content-type"].to_str().unwrap().starts_with("text/plain"));
    let forged = FIXTURE.replace(&token(), "not-a-configured-token");
    let (status, _, body) = post(router, forged).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert!(fake.seen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_refusal_of_the_durability_stage_is_503_with_retry_after_and_its_code() {
    let (router, _, state) = app(true);
    let (status, headers, body) = post(router, FIXTURE).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(headers.contains_key("retry-after"));
    assert!(body.contains("spool_full"), "{body}");
    assert_eq!(state.metrics.http_requests.with_label_values(&[HttpOutcome::Unavailable.label()]).get(), 1);
}

#[tokio::test]
async fn malformed_bodies_are_400_and_a_draining_daemon_is_503_before_anything_is_read() {
    let (router, fake, state) = app(false);
    let (status, _, body) = post(router.clone(), "{not json").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    state.health.start_draining();
    let (status, headers, body) = post(router, FIXTURE).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(headers.contains_key("retry-after") && body.contains("shutting_down"), "{body}");
    assert!(fake.seen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_wrong_token_is_refused_before_the_body_is_parsed() {
    let (router, fake, _) = app(false);
    // Nested far past the parser's limit after the token: a full parse would answer 400 `too_deep`.
    let body = format!(r#"{{"token":"not-a-configured-token","messages":{}}}"#, "[".repeat(10_000));
    let (status, _, text) = post(router.clone(), body).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{text}");
    // A configured token in front of the same garbage still gets the parser's verdict.
    let body = format!(r#"{{"token":"{}","messages":{}}}"#, token(), "[".repeat(10_000));
    let (status, _, text) = post(router, body).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
    assert!(fake.seen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn another_method_on_the_webhook_path_is_405_naming_post_in_allow() {
    let (router, fake, state) = app(false);
    for method in ["GET", "PUT", "DELETE", "HEAD"] {
        let req = Request::builder().method(method).uri("/webhooks/huggy").body(Body::empty()).unwrap();
        let resp = router.clone().oneshot(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED, "{method}");
        let allow: Vec<_> = resp.headers().get_all(axum::http::header::ALLOW).iter().collect();
        assert_eq!(allow, ["POST"], "{method}");
    }
    let label = HttpOutcome::MethodNotAllowed.label();
    assert_eq!(state.metrics.http_requests.with_label_values(&[label]).get(), 4);
    assert!(fake.seen.lock().unwrap().is_empty());
    // Elsewhere it is 404, with no Allow.
    let req = Request::get("/elsewhere").body(Body::empty()).unwrap();
    let resp = router.oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert!(!resp.headers().contains_key(axum::http::header::ALLOW));
}

#[tokio::test]
async fn a_declared_length_holds_nothing_until_its_bytes_arrive() {
    let (router, fake, state) = app(false);
    // A head that declares 4 MiB and a body that never comes.
    let (tx, rx) = futures::channel::mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(1);
    let stuck = Request::post("/webhooks/huggy")
        .header("content-length", (4 * 1024 * 1024).to_string())
        .body(Body::from_stream(rx))
        .unwrap();
    let waiting = tokio::spawn(router.clone().oneshot(stuck));
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(state.body_budget.held(), 0, "nothing received, nothing held");
    // Meanwhile a normal batch is served, and only its own bytes were counted.
    let (status, _, text) = post(router, FIXTURE).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert_eq!(fake.seen.lock().unwrap().len(), 2);
    assert_eq!(state.body_budget.held(), 0, "given back");
    drop(tx);
    let resp = waiting.await.unwrap().unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "the cut-short body is refused");
}

#[test]
fn a_body_buffer_grows_by_doubling_up_to_what_was_declared_and_the_limit() {
    assert_eq!(webhook::grown_capacity(0, 10, Some(100), 1000), 10);
    assert_eq!(webhook::grown_capacity(10, 11, Some(100), 1000), 20, "doubling");
    assert_eq!(webhook::grown_capacity(80, 90, Some(100), 1000), 100, "not past the declared length");
    assert_eq!(webhook::grown_capacity(100, 150, Some(100), 1000), 150, "a body longer than declared still fits");
    assert_eq!(webhook::grown_capacity(600, 700, None, 1000), 1000, "not past the limit");
}
