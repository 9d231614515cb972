//! File capture, end to end: a local file server that signs URLs expiring after a short TTL, the
//! daemon in-process on the embedded broker (and as a process on a real broker for the crash test),
//! and the records read back from Kafka with their `huggy_bridge_files` header.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use huggy_bridge::config::{AckMode, Config, Secret};
use huggy_bridge::metrics::counter_sum;
use sha2::{Digest, Sha256};

const SECRET: &str = "file-server-secret";

/// Deterministic content of `size` bytes for `seed`.
fn content(seed: u64, size: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..size)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (x >> 33) as u8
        })
        .collect()
}

fn sig(name: &str, exp: u64) -> String {
    hex::encode(&Sha256::digest(format!("{SECRET}/{name}/{exp}"))[..8])
}

#[derive(Clone, Default)]
struct Server {
    hits: Arc<Mutex<HashMap<String, usize>>>,
    expired: Arc<Mutex<usize>>,
    other_port: u16,
}

impl Server {
    fn hits(&self, name: &str) -> usize {
        self.hits.lock().unwrap().get(name).copied().unwrap_or(0)
    }
}

async fn serve_file(
    State(s): State<Server>,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let n = {
        let mut h = s.hits.lock().unwrap();
        let e = h.entry(name.clone()).or_default();
        *e += 1;
        *e
    };
    let exp: u64 = q.get("exp").and_then(|v| v.parse().ok()).unwrap_or(0);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    if q.get("sig") != Some(&sig(&name, exp)) || now > exp {
        *s.expired.lock().unwrap() += 1;
        return (StatusCode::FORBIDDEN, "token expired").into_response();
    }
    let size: usize = q.get("size").and_then(|v| v.parse().ok()).unwrap_or(1000);
    let seed: u64 = q.get("seed").and_then(|v| v.parse().ok()).unwrap_or(0);
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_TYPE, "application/octet-stream".parse().unwrap());
    match q.get("kind").map(String::as_str).unwrap_or("plain") {
        "flaky" if n <= 2 => return (StatusCode::SERVICE_UNAVAILABLE, "try later").into_response(),
        "redirect-meta" => {
            return (StatusCode::FOUND, [(header::LOCATION, "http://169.254.169.254/latest/meta-data/")])
                .into_response()
        }
        "redirect-local" => {
            let to = format!("http://127.0.0.2:{}/files/trap?exp={exp}&sig={}", s.other_port, sig("trap", exp));
            return (StatusCode::FOUND, [(header::LOCATION, to)]).into_response();
        }
        "big" => {
            // Streamed without Content-Length: the limit must hold while streaming.
            let chunks =
                futures::stream::iter((0..size / 65536 + 1).map(|_| Ok::<_, std::io::Error>(vec![7u8; 65536])));
            return (headers, axum::body::Body::from_stream(chunks)).into_response();
        }
        "slow" => {
            let secs: u64 = q.get("delay").and_then(|v| v.parse().ok()).unwrap_or(3);
            tokio::time::sleep(Duration::from_secs(secs)).await;
        }
        _ => {}
    }
    if let Some(cd) = q.get("cd") {
        headers.insert(
            header::CONTENT_DISPOSITION,
            format!("attachment; filename=\"fallback.bin\"; filename*=UTF-8''{cd}").parse().unwrap(),
        );
    }
    (headers, content(seed, size)).into_response()
}

async fn start_server(ip: [u8; 4], other_port: u16) -> (SocketAddr, Server) {
    let state = Server { other_port, ..Default::default() };
    let app = axum::Router::new().route("/files/{name}", axum::routing::get(serve_file)).with_state(state.clone());
    let listener = tokio::net::TcpListener::bind(SocketAddr::from((ip, 0))).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, state)
}

fn signed(addr: SocketAddr, name: &str, ttl_secs: u64, extra: &str) -> String {
    let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + ttl_secs;
    // The server checks the signature of the decoded path segment.
    let decoded = percent_encoding::percent_decode_str(name).decode_utf8_lossy();
    format!("http://{addr}/files/{name}?exp={exp}&sig={}{extra}", sig(&decoded, exp))
}

fn event_with_file(id: usize, chat: usize, url: &str) -> String {
    format!(r#"{{"id":{id},"body":"arquivo","file":"{url}","chat":{{"id":{chat}}},"company":{{"id":"7"}}}}"#)
}

fn batch(events: &[String]) -> String {
    format!(r#"{{"time":1763700000,"token":"{LOAD_TOKEN}","messages":{{"receivedMessage":[{}]}}}}"#, events.join(","))
}

fn config(dir: &std::path::Path, file_server: SocketAddr) -> Config {
    let mut cfg = inprocess_config(dir, &[LOAD_TOKEN]);
    cfg.files.enabled = true;
    cfg.files.allowed_url_prefixes = vec![format!("http://{file_server}/files/")];
    cfg.files.store = format!("file://{}", dir.join("files").display());
    cfg.files.token_ttl_secs = 30;
    cfg.files.max_file_bytes = 3 * 1024 * 1024;
    cfg
}

async fn records(d: &TestApp) -> Vec<Rec> {
    d.records(&["huggy.receivedMessage"]).await
}

/// The bridge's file results of a record: header `huggy_bridge_files` (SPEC §6), never the value.
fn bridge_files(r: &Rec) -> Vec<serde_json::Value> {
    let v: serde_json::Value = serde_json::from_slice(&r.value).unwrap();
    assert!(v.get("bridge_files").is_none(), "the value is Huggy's bytes: {v}");
    r.header("huggy_bridge_files")
        .map(|h| serde_json::from_str::<Vec<serde_json::Value>>(h).expect("huggy_bridge_files is a JSON array"))
        .unwrap_or_default()
}

async fn wait_published(d: &TestApp, n: u64, within: Duration) {
    wait_for("events published", within, async || (counter_sum(&d.metrics.events_published) >= n).then_some(())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_200_files_is_stored_before_the_tokens_expire() {
    let (addr, server) = start_server([127, 0, 0, 1], 0).await;
    let dir = tempfile::tempdir().unwrap();
    let d = TestApp::start(config(dir.path(), addr)).await;
    let n = 200;
    let mut expected = HashMap::new();
    let mut signed_urls = HashMap::new();
    let mut events = Vec::new();
    for i in 0..n {
        let size = 10 * 1024 + (i * 10_453) % (2 * 1024 * 1024 - 10 * 1024);
        let (name, extra, expected_name) = if i % 2 == 0 {
            (
                format!("obj{i}"),
                format!("&size={size}&seed={i}&cd=relat%C3%B3rio%20{i}.bin"),
                format!("relatório {i}.bin"),
            )
        } else {
            (format!("arquivo%20{i}.bin"), format!("&size={size}&seed={i}"), format!("arquivo {i}.bin"))
        };
        let url = signed(addr, &name, 30, &extra);
        // Reported without its query: the access token stays out of the record.
        let reported = url.split('?').next().unwrap().to_owned();
        signed_urls.insert(reported.clone(), url.clone());
        expected.insert(reported, (hex::encode(Sha256::digest(content(i as u64, size))), size as u64, expected_name));
        events.push(event_with_file(i, 500 + i % 20, &url));
    }
    let started = Instant::now();
    for chunk in events.chunks(50) {
        let (status, text) = post(&d.url(), batch(chunk)).await;
        assert_eq!(status, 200, "{text}");
    }
    wait_published(&d, n as u64, Duration::from_secs(60)).await;
    let took = started.elapsed();
    let recs = records(&d).await;
    assert_eq!(recs.len(), n);
    let total: u64 = expected.values().map(|(_, s, _)| s).sum();
    for r in &recs {
        let files = bridge_files(r);
        assert_eq!(files.len(), 1);
        let f = &files[0];
        let (sha, size, name) = &expected[f["url"].as_str().unwrap()];
        assert_eq!(f["status"], "stored", "{f}");
        assert_eq!(f["sha256"].as_str(), Some(sha.as_str()));
        assert_eq!(f["size"].as_u64(), Some(*size));
        assert_eq!(f["filename"].as_str(), Some(name.as_str()));
        assert_eq!(f["content_type"], "application/octet-stream");
        assert!(f["error"].is_null());
        let location = f["location"].as_str().unwrap().strip_prefix("file://").unwrap();
        let parts: Vec<&str> = location.rsplitn(8, '/').collect();
        // <company>/<yyyy>/<mm>/<dd>/<event id>/<index>/<file name>
        // On a local disk object_store percent-encodes non-ASCII bytes of the name.
        assert_eq!(percent_encoding::percent_decode_str(parts[0]).decode_utf8_lossy(), name.as_str());
        assert_eq!(parts[1], "0", "{location}");
        assert_eq!(parts[2].len(), 32, "{location}");
        assert!(parts[3].len() == 2 && parts[4].len() == 2 && parts[5].len() == 4, "{location}");
        assert_eq!(parts[6], "7", "{location}");
        let meta = std::fs::metadata(location).unwrap_or_else(|e| {
            panic!(
                "{location}: {e}; store has {:?}",
                walk(&dir.path().join("files")).iter().take(3).collect::<Vec<_>>()
            )
        });
        assert_eq!(meta.len(), *size);
        // The value is the original bytes, untouched.
        let v: serde_json::Value = serde_json::from_slice(&r.value).unwrap();
        let original = event_with_file(
            v["id"].as_u64().unwrap() as usize,
            v["chat"]["id"].as_u64().unwrap() as usize,
            &signed_urls[f["url"].as_str().unwrap()],
        );
        assert_eq!(r.value, original.as_bytes());
    }
    assert_eq!(*server.expired.lock().unwrap(), 0, "no URL was used after its expiry");
    let headroom_count = d.metrics.file_headroom.get_sample_count();
    assert_eq!(headroom_count, n as u64);
    eprintln!(
        "burst: {n} files, {:.1} MB, stored and published in {took:?}: {:.1} files/s, {:.1} MB/s; min headroom sum/n {:.0}s",
        total as f64 / 1e6,
        n as f64 / took.as_secs_f64(),
        total as f64 / 1e6 / took.as_secs_f64(),
        d.metrics.file_headroom.get_sample_sum() / n as f64
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_reported_and_the_event_still_published() {
    let (trap_addr, trap) = start_server([127, 0, 0, 2], 0).await;
    let (addr, server) = start_server([127, 0, 0, 1], trap_addr.port()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), addr);
    cfg.files.max_file_bytes = 1024 * 1024;
    let d = TestApp::start(cfg).await;
    let expired = {
        let exp = 1_000; // long gone
        format!("http://{addr}/files/old?exp={exp}&sig={}", sig("old", exp))
    };
    let flaky = signed(addr, "flaky", 30, "&kind=flaky&size=5000&seed=3");
    let big = signed(addr, "big", 30, "&kind=big&size=2097152");
    let meta = signed(addr, "meta", 30, "&kind=redirect-meta");
    let local = signed(addr, "local", 30, "&kind=redirect-local");
    let off_list = format!("http://{addr}/elsewhere/x.pdf");
    let events = vec![
        event_with_file(1, 1, &expired),
        event_with_file(2, 2, &flaky),
        event_with_file(3, 3, &big),
        event_with_file(4, 4, &meta),
        event_with_file(5, 5, &local),
        event_with_file(6, 6, &off_list),
    ];
    let (status, _) = post(&d.url(), batch(&events)).await;
    assert_eq!(status, 200);
    wait_published(&d, 6, Duration::from_secs(60)).await;
    let recs = records(&d).await;
    let by_chat = |c: u64| recs.iter().find(|r| r.key.as_deref() == Some(c.to_string().as_str())).unwrap();
    let one = |c: u64| bridge_files(by_chat(c)).pop().unwrap();

    let f = one(1);
    assert_eq!(f["status"], "failed");
    assert!(f["error"].as_str().unwrap().contains("403"), "{f}");
    let f = one(2);
    assert_eq!(f["status"], "stored", "503 twice then 200: {f}");
    assert_eq!(server.hits("flaky"), 3);
    let f = one(3);
    assert_eq!(f["status"], "failed");
    assert!(f["error"].as_str().unwrap().contains("larger than"), "{f}");
    let f = one(4);
    assert_eq!(f["status"], "failed");
    assert!(f["error"].as_str().unwrap().contains("redirect refused"), "{f}");
    let f = one(5);
    assert_eq!(f["status"], "failed");
    assert_eq!(trap.hits("trap"), 0, "the redirect target on another loopback address was never fetched");
    assert!(bridge_files(by_chat(6)).is_empty(), "an off-list URL is not a file to capture");
    assert_eq!(by_chat(6).value, event_with_file(6, 6, &off_list).into_bytes(), "value untouched");
    assert_eq!(server.hits("x.pdf"), 0);

    // Nothing of the oversized file, or of any failed one, is left in the store.
    let stored: Vec<_> = walk(&dir.path().join("files"));
    assert_eq!(stored.len(), 1, "only the flaky file is stored: {stored:?}");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn later_events_of_the_same_chat_wait_for_the_files_other_chats_do_not() {
    let (addr, _server) = start_server([127, 0, 0, 1], 0).await;
    let dir = tempfile::tempdir().unwrap();
    let d = TestApp::start(config(dir.path(), addr)).await;
    let slow = signed(addr, "slow", 30, "&kind=slow&size=100");
    let events = vec![
        event_with_file(1, 900, &slow),
        r#"{"id":2,"body":"after the file","chat":{"id":900},"company":{"id":"7"}}"#.to_owned(),
        r#"{"id":3,"body":"other chat","chat":{"id":901},"company":{"id":"7"}}"#.to_owned(),
    ];
    let (status, _) = post(&d.url(), batch(&events)).await;
    assert_eq!(status, 200);
    wait_published(&d, 1, Duration::from_secs(10)).await;
    assert_eq!(counter_sum(&d.metrics.events_published), 1, "only the other chat's event went ahead");
    wait_published(&d, 3, Duration::from_secs(30)).await;
    let recs = records(&d).await;
    let chat900: Vec<&Rec> = recs.iter().filter(|r| r.key.as_deref() == Some("900")).collect();
    assert_eq!(chat900.len(), 2);
    assert_eq!(bridge_files(chat900[0])[0]["status"], "stored");
    assert!(String::from_utf8_lossy(&chat900[1].value).contains("after the file"));
    d.stop().await;
}

/// An S3-compatible server (moto) on loopback: `MOTO_SERVER`, else `moto_server` on PATH.
fn moto_binary() -> Option<std::path::PathBuf> {
    if let Some(p) = std::env::var_os("MOTO_SERVER").filter(|p| !p.is_empty()) {
        return Some(p.into());
    }
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| std::path::Path::new(d).join("moto_server"))
        .find(|p| p.is_file())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_are_streamed_into_an_s3_compatible_store() {
    let Some(moto) = moto_binary() else {
        assert!(
            std::env::var("HUGGY_TEST_REQUIRE_S3").as_deref() != Ok("1"),
            "no moto_server and HUGGY_TEST_REQUIRE_S3=1"
        );
        eprintln!(
            "SKIPPED files_are_streamed_into_an_s3_compatible_store: no moto_server (pip install 'moto[server]')"
        );
        return;
    };
    let port = free_port();
    let _moto = ChildGuard::spawn(
        std::process::Command::new(moto)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null()),
    )
    .unwrap();
    let endpoint = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    wait_for("moto up", Duration::from_secs(30), async || {
        http.put(format!("{endpoint}/captured")).send().await.ok().filter(|r| r.status().is_success())
    })
    .await;

    let (addr, _server) = start_server([127, 0, 0, 1], 0).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), addr);
    cfg.files.store = "s3://captured/huggy".into();
    cfg.files.s3.endpoint = Some(endpoint.clone());
    cfg.files.s3.region = Some("us-east-1".into());
    cfg.files.s3.access_key_id = Some(Secret::new("testing"));
    cfg.files.s3.secret_access_key = Some(Secret::new("testing"));
    cfg.files.s3.allow_http = true;
    cfg.files.max_file_bytes = 16 * 1024 * 1024;
    let d = TestApp::start(cfg).await;
    // 7 MiB: more than one multipart part.
    let size = 7 * 1024 * 1024 + 123;
    let url = signed(addr, "big.bin", 30, &format!("&size={size}&seed=9"));
    let (status, _) = post(&d.url(), batch(&[event_with_file(1, 1, &url)])).await;
    assert_eq!(status, 200);
    wait_published(&d, 1, Duration::from_secs(60)).await;
    let f = bridge_files(&records(&d).await[0]).pop().unwrap();
    assert_eq!(f["status"], "stored", "{f}");
    let location = f["location"].as_str().unwrap();
    let key = location.strip_prefix("s3://captured/").expect("s3 location");
    assert!(key.starts_with("huggy/7/"), "{key}");
    let body = http.get(format!("{endpoint}/captured/{key}")).send().await.unwrap().bytes().await.unwrap();
    assert_eq!(body.len(), size);
    assert_eq!(hex::encode(Sha256::digest(&body)), f["sha256"].as_str().unwrap());

    // Files whose names collide are separate objects in a bucket too.
    let (event, expected) = same_named_files(addr);
    let (status, _) = post(&d.url(), batch(&[event])).await;
    assert_eq!(status, 200);
    wait_published(&d, 2, Duration::from_secs(60)).await;
    let recs = records(&d).await;
    let rec = recs.iter().find(|r| r.key.as_deref() == Some("77")).expect("the record of chat 77");
    assert_three_objects(&bridge_files(rec), &expected, async |location: &str| {
        let key = location.strip_prefix("s3://captured/").expect("s3 location");
        http.get(format!("{endpoint}/captured/{key}")).send().await.unwrap().bytes().await.unwrap().to_vec()
    })
    .await;
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_with_downloads_pending_then_restart_stores_the_files_and_publishes_once() {
    let Some(bin) = real_broker_or_skip("files_sigkill") else { return };
    let tansu = Tansu::start(&bin, None);
    let (addr, server) = start_server([127, 0, 0, 1], 0).await;
    let dir = tempfile::tempdir().unwrap();
    topics_create(dir.path(), &tansu.bootstrap(), 3);
    let cfg = DaemonEnv::new()
        .set("kafka.brokers", tansu.bootstrap())
        .set("spool.dir", dir.path().join("spool").display())
        .set("files.allowed_url_prefixes", format!("[\"http://{addr}/files/\"]"))
        .set("files.store", format!("file://{}", dir.path().join("files").display()))
        .set("files.token_ttl_secs", 60);
    let mut d = Daemon::start(dir.path(), &cfg).await;
    let events: Vec<String> = (0..10)
        .map(|i| event_with_file(i, 100 + i, &signed(addr, &format!("s{i}"), 60, "&kind=slow&size=2000")))
        .collect();
    let (status, _) = post(&d.url(), batch(&events)).await;
    assert_eq!(status, 200);
    wait_for("downloads under way", Duration::from_secs(20), async || {
        (0..10).any(|i| server.hits(&format!("s{i}")) > 0).then_some(())
    })
    .await;
    d.kill9();
    let d = Daemon::start(dir.path(), &cfg).await;
    wait_for("published after restart", Duration::from_secs(60), async || {
        (d.metric("huggy_bridge_events_published_total{type=\"receivedMessage\"}").await == 10.0).then_some(())
    })
    .await;
    let recs = read_topics_async(&tansu.bootstrap(), &["huggy.receivedMessage"]).await;
    assert_eq!(recs.len(), 10, "each event published once");
    for r in &recs {
        let f = bridge_files(r).pop().unwrap();
        assert_eq!(f["status"], "stored", "{f}");
    }
    assert!(server.hits("s0") >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_bridge_files_member_is_published_byte_identical_beside_the_bridges_own_results() {
    let (addr, _server) = start_server([127, 0, 0, 1], 0).await;
    for ack in [AckMode::Spool, AckMode::Kafka] {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path(), addr);
        cfg.delivery.ack = ack;
        cfg.delivery.kafka_ack_timeout_ms = 10_000;
        let d = TestApp::start(cfg).await;
        let url = signed(addr, "real.pdf", 30, "&size=2048&seed=4");
        // A sender claims a capture the bridge never made, with the member the bridge used to append.
        let forged = r#"[{"url":"https://files.huggy.app/payroll.xlsx","status":"stored","location":"s3://evil/payroll.xlsx","sha256":"00","size":1}]"#;
        let event = format!(
            r#"{{"id":1,"body":"arquivo","file":"{url}","chat":{{"id":31}},"company":{{"id":"7"}},"bridge_files":{forged}}}"#
        );
        let (status, text) = post(&d.url(), batch(std::slice::from_ref(&event))).await;
        assert_eq!(status, 200, "{ack:?}: {text}");
        wait_published(&d, 1, Duration::from_secs(30)).await;
        let recs = records(&d).await;
        assert_eq!(recs.len(), 1, "{ack:?}");
        assert_eq!(recs[0].value, event.as_bytes(), "{ack:?}: the value is the sender's bytes, byte for byte");
        let header = recs[0].header("huggy_bridge_files").expect("the bridge's own results");
        assert!(!header.contains("evil") && !header.contains("payroll"), "{ack:?}: {header}");
        let files: Vec<serde_json::Value> = serde_json::from_str(header).unwrap();
        assert_eq!(files.len(), 1, "{ack:?}: only the bridge's capture: {header}");
        assert_eq!(files[0]["status"], "stored", "{ack:?}: {header}");
        assert_eq!(files[0]["url"], format!("http://{addr}/files/real.pdf"), "{ack:?}: without its query");
        assert_eq!(files[0]["sha256"].as_str(), Some(hex::encode(Sha256::digest(content(4, 2048))).as_str()));
        d.stop().await;
    }
}

/// Three files of one event whose names collide under any name-only scheme: `1-x.pdf` first, then
/// two files called `x.pdf` (one by its path, one by Content-Disposition).
fn same_named_files(addr: SocketAddr) -> (String, Vec<(String, Vec<u8>)>) {
    let files = [
        ("1-x.pdf", 11, "&size=3000&seed=11"),
        ("x.pdf", 12, "&size=4000&seed=12"),
        ("y", 13, "&size=5000&seed=13&cd=x.pdf"),
    ];
    let urls: Vec<String> = files.iter().map(|(name, _, extra)| signed(addr, name, 30, extra)).collect();
    let event = format!(
        r#"{{"id":7,"body":"três arquivos","file":"{}","attachments":["{}","{}"],"chat":{{"id":77}},"company":{{"id":"7"}}}}"#,
        urls[0], urls[1], urls[2]
    );
    let sizes = [3000, 4000, 5000];
    let expected =
        files.iter().zip(sizes).map(|((name, seed, _), size)| ((*name).to_owned(), content(*seed, size))).collect();
    (event, expected)
}

/// Checks the results of [`same_named_files`]: three objects, each with its own bytes; `read` gets an
/// object's bytes by its `location`.
async fn assert_three_objects(
    files: &[serde_json::Value],
    expected: &[(String, Vec<u8>)],
    read: impl AsyncFn(&str) -> Vec<u8>,
) {
    assert_eq!(files.len(), 3, "{files:?}");
    let mut locations = std::collections::HashSet::new();
    for (f, (name, bytes)) in files.iter().zip(expected) {
        assert_eq!(f["status"], "stored", "{f}");
        assert!(f["url"].as_str().unwrap().ends_with(&format!("/files/{name}")), "results keep the event's order: {f}");
        let location = f["location"].as_str().unwrap();
        assert!(locations.insert(location.to_owned()), "two files share {location}");
        let stored = read(location).await;
        assert_eq!(stored.len(), bytes.len(), "{location}");
        assert!(stored == *bytes, "{location} holds another file's bytes");
        assert_eq!(f["sha256"].as_str(), Some(hex::encode(Sha256::digest(bytes)).as_str()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_named_files_of_one_event_are_stored_as_separate_objects() {
    let (addr, _server) = start_server([127, 0, 0, 1], 0).await;
    let dir = tempfile::tempdir().unwrap();
    let d = TestApp::start(config(dir.path(), addr)).await;
    let (event, expected) = same_named_files(addr);
    let (status, _) = post(&d.url(), batch(&[event])).await;
    assert_eq!(status, 200);
    wait_published(&d, 1, Duration::from_secs(30)).await;
    let files = bridge_files(&records(&d).await[0]);
    assert_three_objects(&files, &expected, async |location: &str| {
        std::fs::read(location.strip_prefix("file://").unwrap()).unwrap()
    })
    .await;
    assert_eq!(walk(&dir.path().join("files")).len(), 3);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_access_token_in_logs_metrics_or_records_after_a_refused_connection_and_a_403() {
    let Some(bin) = real_broker_or_skip("files_token_redaction") else { return };
    let tansu = Tansu::start(&bin, None);
    let (addr, _server) = start_server([127, 0, 0, 1], 0).await;
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let dir = tempfile::tempdir().unwrap();
    topics_create(dir.path(), &tansu.bootstrap(), 3);
    let cfg = DaemonEnv::new()
        .set("kafka.brokers", tansu.bootstrap())
        .set("spool.dir", dir.path().join("spool").display())
        .set("files.allowed_url_prefixes", format!("[\"http://{addr}/files/\",\"http://{closed}/files/\"]"))
        .set("files.store", format!("file://{}", dir.path().join("files").display()))
        // Connection refused is retried until the token's lifetime is over: keep it short.
        .set("files.token_ttl_secs", 6);
    let d = Daemon::start(dir.path(), &cfg).await;
    let refused_secret = "tok3n-refused-5ecret";
    let rejected_secret = "tok3n-rejected-5ecret";
    let events = vec![
        event_with_file(1, 41, &format!("http://{closed}/files/a.pdf?token={refused_secret}")),
        event_with_file(2, 42, &format!("http://{addr}/files/b.pdf?exp=1&sig=bad&token={rejected_secret}")),
    ];
    let (status, _) = post(&d.url(), batch(&events)).await;
    assert_eq!(status, 200);
    wait_for("both published", Duration::from_secs(60), async || {
        (d.metric("huggy_bridge_events_published_total{type=\"receivedMessage\"}").await == 2.0).then_some(())
    })
    .await;
    let recs = read_topics_async(&tansu.bootstrap(), &["huggy.receivedMessage"]).await;
    assert_eq!(recs.len(), 2);
    let metrics = reqwest::get(format!("http://{}/metrics", d.admin)).await.unwrap().text().await.unwrap();
    let log = d.log_text();
    assert!(log.contains("file not captured"), "the failures were logged: {log}");
    for r in &recs {
        let f = bridge_files(r).pop().unwrap();
        assert_eq!(f["status"], "failed", "{f}");
        let headers = format!("{:?}", r.headers);
        for secret in [refused_secret, rejected_secret] {
            assert!(!headers.contains(secret), "token in the record's headers: {headers}");
        }
        assert!(!headers.contains("token="), "{headers}");
    }
    let by_chat = |c: &str| recs.iter().find(|r| r.key.as_deref() == Some(c)).unwrap();
    let refused = bridge_files(by_chat("41")).pop().unwrap();
    assert_eq!(refused["url"], format!("http://{closed}/files/a.pdf"));
    // Retried until the token's lifetime is over: the last attempt's transport error, or `expired`
    // when the deadline came first (a slow machine).
    let error = refused["error"].as_str().unwrap();
    assert!(error.contains("download failed") || error == "expired", "{refused}");
    let rejected = bridge_files(by_chat("42")).pop().unwrap();
    assert!(rejected["error"].as_str().unwrap().contains("403"), "{rejected}");
    for secret in [refused_secret, rejected_secret] {
        assert!(!log.contains(secret), "token in the log:\n{log}");
        assert!(!metrics.contains(secret), "token in a metric");
    }
    assert!(!log.contains("token="), "a query in the log:\n{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_at_its_free_space_floor_fails_the_file_and_still_publishes_the_event() {
    let (addr, _server) = start_server([127, 0, 0, 1], 0).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), addr);
    // A floor above what any disk has free: captures must leave the spool its room.
    cfg.files.min_free_bytes = Some(1 << 62);
    let d = TestApp::start(cfg).await;
    let url = signed(addr, "doc.pdf", 30, "&size=5000&seed=3");
    let event = event_with_file(1, 51, &url);
    let (status, _) = post(&d.url(), batch(std::slice::from_ref(&event))).await;
    assert_eq!(status, 200);
    wait_published(&d, 1, Duration::from_secs(20)).await;
    let recs = records(&d).await;
    assert_eq!(recs[0].value, event.as_bytes());
    let f = bridge_files(&recs[0]).pop().unwrap();
    assert_eq!(f["status"], "failed", "{f}");
    assert!(f["error"].as_str().unwrap().starts_with("file store full"), "{f}");
    assert!(walk(&dir.path().join("files")).is_empty());
    d.stop().await;
}

/// Events waiting for slow files fill the publisher's whole budget for them (a window of 2: 16
/// events parked) while their results are written far behind them in the spool: the publisher
/// finds the results there by reading ahead, so every event is published, in order per chat, with
/// its files stored — none waits for a restart, and no results are kept in memory to make it so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_waiting_for_files_beyond_the_publishers_budget_are_released_from_the_log() {
    let (addr, server) = start_server([127, 0, 0, 1], 0).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), addr);
    cfg.kafka.max_in_flight_records = 2;
    cfg.files.concurrency = 4;
    cfg.files.max_concurrency = 4;
    cfg.files.token_ttl_secs = 120;
    let d = TestApp::start(cfg).await;
    // 24 slow files (3 s each, 4 at a time: about 18 s), each on its own chat, then two events
    // without files on each of those chats, and 20 on chats of their own.
    let slow: Vec<String> = (0..24)
        .map(|i| event_with_file(i, 1000 + i, &signed(addr, &format!("slow{i}"), 120, "&kind=slow&size=2000")))
        .collect();
    let (status, text) = post(&d.url(), batch(&slow)).await;
    assert_eq!(status, 200, "{text}");
    let plain = |id: usize, chat: usize| {
        format!(r#"{{"id":{id},"body":"sem arquivo","chat":{{"id":{chat}}},"company":{{"id":"7"}}}}"#)
    };
    let mut later: Vec<String> = (0..48).map(|i| plain(100 + i, 1000 + i % 24)).collect();
    later.extend((0..20).map(|i| plain(200 + i, 5000 + i)));
    let (status, text) = post(&d.url(), batch(&later)).await;
    assert_eq!(status, 200, "{text}");
    wait_published(&d, 24 + 48 + 20, Duration::from_secs(90)).await;
    all_published_whole_in_order(&records(&d).await, &slow, &later);
    assert_eq!(*server.expired.lock().unwrap(), 0);
    d.stop().await;
}

/// Every event of `slow` (ids 0..24, one file each) and `later` (no files) is a record whose value
/// is the event's bytes, the slow ones with their file stored, in order per chat.
fn all_published_whole_in_order(recs: &[Rec], slow: &[String], later: &[String]) {
    assert_eq!(recs.len(), slow.len() + later.len());
    let mut by_chat: HashMap<u64, Vec<u64>> = HashMap::new();
    for r in recs {
        let v: serde_json::Value = serde_json::from_slice(&r.value).unwrap();
        let id = v["id"].as_u64().unwrap();
        by_chat.entry(v["chat"]["id"].as_u64().unwrap()).or_default().push(id);
        let files = bridge_files(r);
        let sent = match slow.get(id as usize) {
            Some(event) => {
                assert_eq!(files.len(), 1, "{id}");
                assert_eq!(files[0]["status"], "stored", "{id}: {}", files[0]);
                event
            }
            None => {
                assert!(files.is_empty(), "{id}");
                later.iter().find(|e| e.starts_with(&format!(r#"{{"id":{id},"#))).unwrap()
            }
        };
        // Huggy's bytes, read again for the events parked without them.
        assert_eq!(r.value, sent.as_bytes(), "{id}");
    }
    for (chat, ids) in &by_chat {
        let mut sorted = ids.clone();
        sorted.sort_unstable();
        assert_eq!(ids, &sorted, "chat {chat}: order per chat");
    }
}

/// Events waiting for slow files, and the later events of their chats, hold back no other chat:
/// with a window of 8 (32 events held, 64 parked), 24 events whose files take 15 s and one more on
/// each of their chats are parked without their bytes, and 20 events of other chats behind them in
/// the spool are published at once, long before those files are done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chats_waiting_for_slow_files_hold_back_no_other_chat() {
    let (addr, server) = start_server([127, 0, 0, 1], 0).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), addr);
    cfg.kafka.max_in_flight_records = 8;
    cfg.files.token_ttl_secs = 120;
    let d = TestApp::start(cfg).await;
    let slow: Vec<String> = (0..24)
        .map(|i| event_with_file(i, 1000 + i, &signed(addr, &format!("slow{i}"), 120, "&kind=slow&delay=15&size=2000")))
        .collect();
    let plain = |id: usize, chat: usize| {
        format!(r#"{{"id":{id},"body":"sem arquivo","chat":{{"id":{chat}}},"company":{{"id":"7"}}}}"#)
    };
    let mut later: Vec<String> = (0..24).map(|i| plain(100 + i, 1000 + i)).collect();
    later.extend((0..20).map(|i| plain(200 + i, 5000 + i)));
    let posted = Instant::now();
    for body in [batch(&slow), batch(&later)] {
        let (status, text) = post(&d.url(), body).await;
        assert_eq!(status, 200, "{text}");
    }
    wait_published(&d, 20, Duration::from_secs(12)).await;
    let published = counter_sum(&d.metrics.events_published);
    assert_eq!(published, 20, "only the other chats: the slow chats wait for their files, in order");
    assert!(posted.elapsed() < Duration::from_secs(15), "the other chats did not wait for the slow files");
    wait_published(&d, 24 + 24 + 20, Duration::from_secs(90)).await;
    all_published_whole_in_order(&records(&d).await, &slow, &later);
    assert_eq!(*server.expired.lock().unwrap(), 0);
    d.stop().await;
}
