//! Hostile input: whatever arrives, the daemon answers a clear 4xx (JSON with a `code`) or closes
//! the connection, keeps serving everyone else, and never publishes garbage as a valid event.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::common::*;
use huggy_bridge::config::Config;
use huggy_bridge::metrics::counter_sum;

const TOKEN: &str = LOAD_TOKEN;

fn config(dir: &std::path::Path) -> Config {
    let mut cfg = inprocess_config(dir, &[TOKEN]);
    cfg.kafka.partitions = 1;
    cfg.http.max_body_bytes = 256 * 1024;
    cfg
}

fn wrap(messages: &str) -> Vec<u8> {
    format!(r#"{{"time":1,"token":"{TOKEN}","messages":{messages}}}"#).into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_bodies_get_a_4xx_with_a_code_and_publish_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = TestApp::start(config(dir.path())).await;
    // With the configured token, so that the parser itself meets the depth (a wrong token is refused
    // before any parse: the last case).
    let mut deep = format!("{{\"token\":\"{TOKEN}\",\"messages\":{{\"a\":[");
    deep.push_str(&"[".repeat(100_000));
    let unauthenticated_deep = deep.replacen(TOKEN, "x", 1);
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        ("truncated", wrap(r#"{"receivedMessage":[{"id":1}"#), 400, "invalid_json"),
        ("trailing garbage", [wrap(r#"{}"#), b"}}garbage".to_vec()].concat(), 400, "invalid_json"),
        ("array at the top", b"[{\"token\":\"x\"}]".to_vec(), 400, "not_an_object"),
        ("string at the top", b"\"hello\"".to_vec(), 400, "not_an_object"),
        ("number at the top", b"42".to_vec(), 400, "not_an_object"),
        ("null at the top", b"null".to_vec(), 400, "not_an_object"),
        ("messages null", wrap("null"), 400, "missing_messages"),
        ("messages a string", wrap("\"x\""), 400, "messages_not_object"),
        ("messages an array", wrap("[1,2]"), 400, "messages_not_object"),
        (
            "duplicate top-level keys",
            format!(r#"{{"token":"{TOKEN}","token":"{TOKEN}","messages":{{}}}}"#).into_bytes(),
            400,
            "invalid_json",
        ),
        (
            "invalid UTF-8",
            [&b"{\"token\":\""[..], TOKEN.as_bytes(), b"\",\"messages\":{\"a\":[{\"b\":\"\xC3\x28\"}]}}"].concat(),
            400,
            "invalid_json",
        ),
        ("raw NUL in a string", wrap("{\"a\":[{\"b\":\"x\u{0}y\"}]}"), 400, "invalid_json"),
        ("100,000 levels deep", deep.into_bytes(), 400, "too_deep"),
        ("empty", Vec::new(), 400, "invalid_json"),
        ("whitespace only", b" \n\t \r\n".to_vec(), 400, "invalid_json"),
        ("token a number", br#"{"token":123,"messages":{"receivedMessage":[{"id":1}]}}"#.to_vec(), 401, "unauthorized"),
        (
            "token an object",
            br#"{"token":{"t":1},"messages":{"receivedMessage":[{"id":1}]}}"#.to_vec(),
            401,
            "unauthorized",
        ),
        ("token null", br#"{"token":null,"messages":{}}"#.to_vec(), 401, "unauthorized"),
        (
            "token with escapes",
            br#"{"token":"132ce76c7abb1154f01ebc0d508162e\u0034","messages":{}}"#.to_vec(),
            401,
            "unauthorized",
        ),
        ("a wrong token before 100,000 levels", unauthenticated_deep.into_bytes(), 401, "unauthorized"),
    ];
    for (what, body, status, code) in cases {
        let r = reqwest::Client::new().post(d.url()).body(body).send().await.unwrap();
        assert_eq!(r.status().as_u16(), status, "{what}");
        let v: serde_json::Value = r.json().await.unwrap_or_else(|e| panic!("{what}: JSON error body expected: {e}"));
        assert_eq!(v["code"], code, "{what}: {v}");
    }
    assert_eq!(counter_sum(&d.metrics.events_received), 0);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_events_inside_a_valid_batch_are_dead_lettered_never_published_as_valid() {
    let dir = tempfile::tempdir().unwrap();
    let d = TestApp::start(config(dir.path())).await;
    let huge_type = "x".repeat(10_000);
    let body = wrap(&format!(
        r#"{{"receivedMessage":[1,"s",null,true,[],{{"id":1,"id":2}},{{"ok":"\ud800"}},{{"n":1e400,"chat":{{"id":1}}}}],"":[{{"a":1}}],"{huge_type}":[{{"a":1}}],"bad\u0007type":[{{"a":1}}],"\u0000":[{{"a":1}}]}}"#
    ));
    let (status, text) = post(&d.url(), body).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(text, r#"{"accepted":12}"#);
    wait_for("all handled", Duration::from_secs(20), async || {
        (counter_sum(&d.metrics.events_published) + counter_sum(&d.metrics.events_dead_lettered) == 12).then_some(())
    })
    .await;
    let topics = ["huggy.receivedMessage", "huggy.dead-letter", "huggy.unknown"];
    let recs = d.records(&topics).await;
    let valid: Vec<&Rec> = recs.iter().filter(|r| r.topic != "huggy.dead-letter").collect();
    let valid_values: Vec<String> = valid.iter().map(|r| String::from_utf8_lossy(&r.value).into_owned()).collect();
    assert_eq!(
        valid_values,
        vec![r#"{"n":1e400,"chat":{"id":1}}"#.to_owned()],
        "only the well-formed event is published as valid"
    );
    let dlq: Vec<&Rec> = recs.iter().filter(|r| r.topic == "huggy.dead-letter").collect();
    assert_eq!(dlq.len(), 11);
    assert!(dlq.iter().all(|r| r.header("huggy_dlq_reason").is_some_and(|h| !h.is_empty())));
    assert!(
        dlq.iter().all(|r| r.header("ce_type").is_some_and(|t| t.len() < 100 && !t.contains('\u{7}'))),
        "no garbage in headers"
    );
    d.stop().await;
}

/// Sends raw bytes on a new connection and returns what comes back (until close or `wait`).
fn raw_exchange(addr: SocketAddr, bytes: &[u8], wait: Duration) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(wait)).unwrap();
    s.write_all(bytes).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_are_refused_without_reading_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = TestApp::start(config(dir.path())).await;
    let addr = d.http_addr;
    // Content-Length says 100 MB; only the headers are sent.
    let answer = tokio::task::spawn_blocking(move || {
        raw_exchange(
            addr,
            b"POST /webhooks/huggy HTTP/1.1\r\nhost: x\r\ncontent-length: 100000000\r\n\r\n{",
            Duration::from_secs(5),
        )
    })
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("body_too_large"));
    // Chunked, no length: refused once the limit is crossed, long before the client is done.
    let answer = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"POST /webhooks/huggy HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n").unwrap();
        let chunk = format!("{:x}\r\n{}\r\n", 64 * 1024, " ".repeat(64 * 1024));
        let mut sent = 0;
        for _ in 0..64 {
            if s.write_all(chunk.as_bytes()).is_err() {
                break;
            }
            sent += 1;
        }
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        (sent, String::from_utf8_lossy(&out).into_owned())
    })
    .await
    .unwrap();
    assert!(answer.1.starts_with("HTTP/1.1 413"), "{answer:?}");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_10000_events_is_accepted_and_fully_published() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.http.max_body_bytes = 4 * 1024 * 1024;
    let d = TestApp::start(cfg).await;
    let events: Vec<String> =
        (0..10_000).map(|i| format!(r#"{{"id":{i},"chat":{{"id":{}}},"company":{{"id":1}}}}"#, i % 50)).collect();
    let body = wrap(&format!(r#"{{"receivedMessage":[{}]}}"#, events.join(",")));
    let (status, text) = post(&d.url(), body).await;
    assert_eq!((status, text.as_str()), (200, r#"{"accepted":10000}"#));
    wait_for("10,000 published", Duration::from_secs(60), async || {
        (counter_sum(&d.metrics.events_published) == 10_000).then_some(())
    })
    .await;
    let recs = d.records(&["huggy.receivedMessage"]).await;
    assert_eq!(recs.len(), 10_000);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_and_stalled_clients_do_not_stop_a_normal_request() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.http.header_timeout_ms = 3_000;
    cfg.http.body_timeout_ms = 3_000;
    cfg.http.max_connections = 1_000;
    let d = TestApp::start(cfg).await;
    let addr = d.http_addr;
    // 500 idle connections (nothing sent) and 100 stalled uploads (headers, then a trickle).
    let mut idle = Vec::new();
    for _ in 0..500 {
        idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    let mut stalled = Vec::new();
    for _ in 0..100 {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(
            &mut s,
            b"POST /webhooks/huggy HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\n{",
        )
        .await
        .unwrap();
        stalled.push(s);
    }
    let trickle = tokio::spawn(async move {
        let started = Instant::now();
        let mut answers = Vec::new();
        for mut s in stalled {
            let _ = tokio::io::AsyncWriteExt::write_all(&mut s, b" ").await;
            let mut buf = Vec::new();
            let r =
                tokio::time::timeout(Duration::from_secs(10), tokio::io::AsyncReadExt::read_to_end(&mut s, &mut buf))
                    .await;
            answers.push((r.is_ok(), String::from_utf8_lossy(&buf).into_owned()));
        }
        (started.elapsed(), answers)
    });
    let t0 = Instant::now();
    let body = std::fs::read(format!("{FIXTURES}/receivedMessage.json")).unwrap();
    let body = String::from_utf8(body).unwrap().replace("132ce76c7abb1154f01ebc0d508162e4", TOKEN);
    let (status, _) = post(&d.url(), body).await;
    let served_in = t0.elapsed();
    assert_eq!(status, 200);
    assert!(served_in < Duration::from_secs(3), "normal request took {served_in:?}");
    let (took, answers) = trickle.await.unwrap();
    assert!(took < Duration::from_secs(12), "stalled uploads closed within the timeout, took {took:?}");
    for (closed, text) in &answers {
        assert!(*closed, "a stalled upload was neither answered nor closed");
        assert!(text.is_empty() || text.starts_with("HTTP/1.1 408"), "{text}");
    }
    assert!(answers.iter().filter(|(_, t)| t.starts_with("HTTP/1.1 408")).count() >= 90, "stalled uploads get 408");
    // Idle connections are closed by the header timeout.
    let mut closed = 0;
    for mut s in idle {
        let mut buf = [0u8; 64];
        if let Ok(Ok(0)) =
            tokio::time::timeout(Duration::from_secs(6), tokio::io::AsyncReadExt::read(&mut s, &mut buf)).await
        {
            closed += 1;
        }
    }
    assert_eq!(closed, 500, "idle connections closed by the server");
    eprintln!("slow clients: normal request served in {served_in:?} beside 500 idle and 100 stalled connections");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_limit_holds_and_the_next_client_is_served_when_a_slot_frees() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.http.max_connections = 20;
    cfg.http.header_timeout_ms = 1_500;
    let d = TestApp::start(cfg).await;
    let mut hogs = Vec::new();
    for _ in 0..20 {
        hogs.push(tokio::net::TcpStream::connect(d.http_addr).await.unwrap());
    }
    let t0 = Instant::now();
    let (status, _) = post(&d.url(), wrap(r#"{"receivedMessage":[{"id":1}]}"#)).await;
    assert_eq!(status, 200);
    let waited = t0.elapsed();
    assert!(waited >= Duration::from_millis(1_000), "the 21st connection waited for a slot ({waited:?})");
    assert!(waited < Duration::from_secs(5), "and was served once idle ones timed out ({waited:?})");
    drop(hogs);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_never_reach_logs_error_bodies_or_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let wrong = "wr0ng-token-fedcba9876543210";
    let env = DaemonEnv::new()
        .set("kafka.brokers", "embedded")
        .set("spool.dir", dir.path().join("spool").display())
        .set("files.enabled", false);
    let d = Daemon::start(dir.path(), &env).await;
    let batch = |t: &str| format!(r#"{{"time":1,"token":"{t}","messages":{{"receivedMessage":[{{"id":1}}]}}}}"#);
    let (s, body) = post(&d.url(), batch(wrong)).await;
    assert_eq!(s, 401);
    assert!(!body.contains(wrong));
    let (s, _) = post(&d.url(), format!(r#"{{"token":"{wrong}","validToken":true}}"#)).await;
    assert_eq!(s, 401);
    let metrics = reqwest::get(format!("http://{}/metrics", d.admin)).await.unwrap().text().await.unwrap();
    assert!(!metrics.contains(wrong) && !metrics.contains(LOAD_TOKEN));
    let log = d.log_text();
    assert!(!log.contains(wrong), "{log}");
    for t in fixture_tokens() {
        assert!(!log.contains(&t), "configured token in the log");
    }
    let out = d.command(&["check-config"]).output().unwrap();
    assert!(out.status.success());
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        printed.contains("[redacted]") && !fixture_tokens().iter().any(|t| printed.contains(t.as_str())),
        "{printed}"
    );
}

#[test]
/// SPEC §2: a configuration error exits 78 (`EX_CONFIG`), so a supervisor does not restart-loop on it.
fn check_config_exits_78_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    // `check-config` on `toml`: its exit code and what it printed on stderr.
    let check = |toml: &str| {
        std::fs::write(&path, toml).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_huggy-bridge"))
            .args(["check-config", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, err) = check("[kafka]\nbrokerz = \"x\"\n");
    assert_eq!(code, Some(78));
    assert!(err.contains("kafka.brokerz") && !err.contains("default."), "{err}");
    let (code, err) =
        check("[huggy]\ntokens = [\"t\"]\n[http]\nlisten = \"127.0.0.1:1\"\n[admin]\nlisten = \"127.0.0.1:1\"\n");
    assert_eq!(code, Some(78));
    assert!(err.contains("must differ"));
    // A body limit above what one spool frame can hold is refused, with the reason.
    let (code, err) =
        check("[huggy]\ntokens = [\"t\"]\n[http]\nmax_body_bytes = 268435456\nmax_inflight_bytes = 1073741824\n");
    assert_eq!(code, Some(78));
    assert!(err.contains("http.max_body_bytes") && err.contains("134217728") && err.contains("spool frame"), "{err}");
}
