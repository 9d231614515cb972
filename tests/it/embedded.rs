//! Black-box tests of the whole daemon, in-process, on the embedded broker (librdkafka's mock
//! cluster): HTTP in as Huggy, records out as a Kafka consumer.

use std::time::Duration;

use crate::common::*;
use huggy_bridge::config::{AckMode, Config};
use huggy_bridge::metrics::counter_sum;

fn config(dir: &std::path::Path) -> Config {
    let tokens = fixture_tokens();
    inprocess_config(dir, &tokens.iter().map(String::as_str).collect::<Vec<_>>())
}

async fn post_fixtures_and_check(mode: AckMode) {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.delivery.ack = mode;
    let d = TestApp::start(cfg).await;
    let mut total = 0;
    for (name, body) in batch_fixtures() {
        let (status, text) = post(&d.url(), body).await;
        assert_eq!(status, 200, "{name}: {text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        total += v["accepted"].as_u64().unwrap();
    }
    assert_eq!(total, 25);
    if mode == AckMode::Kafka {
        assert_eq!(d.published(), 25, "kafka mode answers only after every event is acknowledged");
    }
    // Spool mode publishes the one event that two fixtures share (same type and bytes) once.
    let distinct = if mode == AckMode::Spool { 24 } else { 25 };
    wait_for("every event published", Duration::from_secs(30), async || (d.published() == distinct).then_some(()))
        .await;
    let topics = fixture_topics();
    let recs = d.records(&topics.iter().map(String::as_str).collect::<Vec<_>>()).await;
    check_fixture_records(&recs, mode == AckMode::Spool);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fixture_becomes_correct_records_spool_mode() {
    post_fixtures_and_check(AckMode::Spool).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fixture_becomes_correct_records_kafka_mode() {
    post_fixtures_and_check(AckMode::Kafka).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_echoes_a_configured_token_only() {
    let dir = tempfile::tempdir().unwrap();
    let d = TestApp::start(config(dir.path())).await;
    let r = reqwest::Client::new()
        .post(d.url())
        .body(std::fs::read(format!("{FIXTURES}/handshake.json")).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/plain"));
    assert_eq!(r.text().await.unwrap(), "380c4e7399999999999999999999d354");
    let (status, _) = post(&d.url(), r#"{"token":"not-configured","validToken":true}"#).await;
    assert_eq!(status, 401);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejections_have_their_status_and_code_and_publish_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.http.max_body_bytes = 64 * 1024;
    let d = TestApp::start(cfg).await;
    let good = std::fs::read(format!("{FIXTURES}/receivedMessage.json")).unwrap();
    let bad_token = String::from_utf8(good.clone()).unwrap().replace("132ce76c7abb1154f01ebc0d508162e4", "0000");
    let no_token = r#"{"time":1,"messages":{"receivedMessage":[{"id":1}]}}"#;
    let numeric_token = r#"{"time":1,"token":132,"messages":{"receivedMessage":[{"id":1}]}}"#;
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (bad_token.into_bytes(), 401, "unauthorized"),
        (no_token.into(), 401, "unauthorized"),
        (numeric_token.into(), 401, "unauthorized"),
        (good[..good.len() / 2].to_vec(), 400, "invalid_json"),
        (b"[1,2,3]".to_vec(), 400, "not_an_object"),
        (b"".to_vec(), 400, "invalid_json"),
        (br#"{"token":"132ce76c7abb1154f01ebc0d508162e4","messages":"x"}"#.to_vec(), 400, "messages_not_object"),
        (vec![b' '; 64 * 1024 + 1], 413, "body_too_large"),
    ];
    for (body, status, code) in cases {
        let (got, text) = post(&d.url(), body).await;
        assert_eq!(got, status, "{text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["code"], code, "{text}");
        assert!(v["error"].is_string());
        assert!(!text.contains("0000") && !text.contains("132ce76c"), "no token in error bodies");
    }
    // Oversized and streamed without a Content-Length: refused while reading.
    let chunks = futures::stream::iter((0..100).map(|_| Ok::<_, std::io::Error>(vec![b' '; 1024])));
    let r = reqwest::Client::new().post(d.url()).body(reqwest::Body::wrap_stream(chunks)).send().await;
    match r {
        Ok(r) => assert_eq!(r.status(), 413),
        Err(e) => assert!(e.is_request() || e.is_body(), "connection closed while streaming: {e}"),
    }
    let get = reqwest::get(d.url()).await.unwrap();
    assert_eq!(get.status(), 405);
    let other =
        reqwest::Client::new().post(format!("http://{}/elsewhere", d.http_addr)).body("{}").send().await.unwrap();
    assert_eq!(other.status(), 404);
    assert_eq!(d.metric("huggy_bridge_http_requests_total{outcome=\"unauthorized\"}").await, 3.0);
    let received = counter_sum(&d.metrics.events_received);
    assert_eq!(received, 0, "nothing accepted");
    assert_eq!(d.metrics.spool_events.get(), 0);
    let metrics = reqwest::get(format!("http://{}/metrics", d.admin_addr)).await.unwrap().text().await.unwrap();
    assert!(!metrics.contains("132ce76c"), "no token in metrics");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_event_is_dead_lettered_and_its_siblings_published() {
    let dir = tempfile::tempdir().unwrap();
    let d = TestApp::start(config(dir.path())).await;
    let body = r#"{"time":1700000000,"token":"132ce76c7abb1154f01ebc0d508162e4","messages":{
        "receivedMessage":[{"id":1,"chat":{"id":10},"company":{"id":5}}, "not an object", {"id":2,"chat":{"id":10},"company":{"id":5}}],
        "brandNewType":[{"chatID":77,"company":{"id":5}}]}}"#;
    let (status, text) = post(&d.url(), body).await;
    assert_eq!((status, text.as_str()), (200, r#"{"accepted":4}"#));
    wait_for("publishing", Duration::from_secs(20), async || {
        (d.published() == 3 && d.dead_lettered() == 1).then_some(())
    })
    .await;
    let topics = ["huggy.receivedMessage", "huggy.dead-letter", "huggy.unknown"];
    let recs = d.records(&topics).await;
    let on = |t: &str| recs.iter().filter(|r| r.topic == t).collect::<Vec<_>>();
    let received = on("huggy.receivedMessage");
    assert_eq!(received.len(), 2);
    assert_eq!(
        received[0].value,
        br#"{"id":1,"chat":{"id":10},"company":{"id":5}}"#.to_vec(),
        "order kept within the key"
    );
    assert_eq!(received[1].value, br#"{"id":2,"chat":{"id":10},"company":{"id":5}}"#.to_vec());
    let dlq = on("huggy.dead-letter");
    assert_eq!(dlq.len(), 1);
    assert_eq!(dlq[0].value, br#""not an object""#.to_vec());
    assert_eq!(dlq[0].header("huggy_dlq_reason"), Some("event is not an object"));
    assert_eq!(dlq[0].header("huggy_dlq_topic"), Some("huggy.receivedMessage"));
    let unknown = on("huggy.unknown");
    assert_eq!(unknown.len(), 1);
    assert_eq!(unknown[0].key.as_deref(), Some("77"));
    assert_eq!(unknown[0].header("ce_type"), Some("app.huggy.brandNewType"));
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivered_batch_is_acknowledged_but_published_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = TestApp::start(config(dir.path())).await;
    let body = std::fs::read(format!("{FIXTURES}/startedChat+receivedMessage.json")).unwrap();
    for _ in 0..3 {
        let (status, text) = post(&d.url(), body.clone()).await;
        assert_eq!((status, text.as_str()), (200, r#"{"accepted":2}"#));
    }
    wait_for("publishing", Duration::from_secs(20), async || (d.published() == 2).then_some(())).await;
    // The redeliveries were answered as duplicates; once the spool is empty nothing more can go out.
    assert_eq!(d.metrics.events_duplicate.get(), 4);
    wait_for("spool drained", Duration::from_secs(20), async || {
        (d.metric("huggy_bridge_spool_events").await == 0.0).then_some(())
    })
    .await;
    assert_eq!(d.published(), 2);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_mode_answers_503_when_kafka_cannot_ack_in_time() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.kafka.brokers = format!("127.0.0.1:{}", free_port());
    cfg.delivery.ack = AckMode::Kafka;
    cfg.delivery.kafka_ack_timeout_ms = 1500;
    let d = TestApp::start(cfg).await;
    let body = std::fs::read(format!("{FIXTURES}/receivedMessage.json")).unwrap();
    let r = reqwest::Client::new().post(d.url()).body(body).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "5");
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["code"], "kafka_unavailable");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spool_mode_accepts_while_kafka_is_away_until_the_cap() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.kafka.brokers = format!("127.0.0.1:{}", free_port());
    cfg.spool.max_bytes = 4000;
    let d = TestApp::start(cfg).await;
    let body = std::fs::read(format!("{FIXTURES}/receivedMessage.json")).unwrap();
    let mut statuses = Vec::new();
    for i in 0..10 {
        // Distinct events: vary the body inside the event so ids differ.
        let b = String::from_utf8(body.clone()).unwrap().replace("\"teste\"", &format!("\"teste {i}\""));
        let r = reqwest::Client::new().post(d.url()).body(b).send().await.unwrap();
        if r.status() == 503 {
            assert_eq!(r.headers()["retry-after"], "5");
        }
        statuses.push(r.status().as_u16());
    }
    assert_eq!(statuses[0], 200);
    assert!(statuses.contains(&503), "{statuses:?}");
    let first_refusal = statuses.iter().position(|s| *s == 503).unwrap();
    assert!(statuses[first_refusal..].iter().all(|s| *s == 503), "{statuses:?}");
    let ready = reqwest::get(format!("http://{}/readyz", d.admin_addr)).await.unwrap();
    assert_eq!(ready.status(), 503);
    let why = ready.text().await.unwrap();
    // Spool mode: the full spool makes the replica unready; Kafka being away does not (SPEC §7).
    assert!(why.contains("spool full") && !why.contains("kafka"), "{why}");
    assert_eq!(d.metric("huggy_bridge_spool_events").await as usize, first_refusal);
    assert!(d.metric("huggy_bridge_spool_oldest_age_seconds").await >= 0.0);
    assert_eq!(
        d.metric("huggy_bridge_http_requests_total{outcome=\"unavailable\"}").await as usize,
        10 - first_refusal
    );
    d.stop().await;
}
