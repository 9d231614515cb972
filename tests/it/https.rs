//! The public listener over HTTPS (`[http.tls]`): a batch with a certificate signed by a CA the test
//! makes, plain HTTP refused at once, a silent client that cannot hold a slot, the certificate
//! rotated on SIGHUP and by the file watch while a request is in flight, and a broken pair refused
//! by `check-config` and by a reload that keeps the old one serving.

use crate::common;
use crate::kafka_security::{Leaf, TestCa};

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;

/// The names every test certificate carries.
const NAMES: &[&str] = &["localhost", "127.0.0.1"];

/// A TLS client trusting only `ca`.
fn connector(ca: &TestCa) -> TlsConnector {
    let mut roots = RootCertStore::empty();
    roots.add(ca.der()).unwrap();
    let mut config = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    TlsConnector::from(Arc::new(config))
}

async fn connect(tls: &TlsConnector, addr: SocketAddr) -> TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    tls.connect(ServerName::try_from("localhost").unwrap(), tcp).await.expect("TLS handshake")
}

/// The leaf certificate the server presented.
fn served(stream: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    stream.get_ref().1.peer_certificates().expect("a certificate")[0].clone().into_owned()
}

fn request_head(len: usize) -> String {
    format!(
        "POST /webhooks/huggy HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n\
         content-length: {len}\r\nconnection: close\r\n\r\n"
    )
}

/// Reads the answer to the end; (status, whole answer).
async fn answer(stream: &mut TlsStream<TcpStream>) -> (u16, String) {
    let mut buf = Vec::new();
    // A peer closing without close_notify is an error for rustls; what was read still counts.
    let _ = tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut buf)).await.expect("an answer");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, text)
}

/// POSTs `body` over a new TLS connection; (status, answer, certificate served).
async fn https_post(tls: &TlsConnector, addr: SocketAddr, body: &str) -> (u16, String, CertificateDer<'static>) {
    let mut s = connect(tls, addr).await;
    let cert = served(&s);
    s.write_all(request_head(body.len()).as_bytes()).await.unwrap();
    s.write_all(body.as_bytes()).await.unwrap();
    let (status, text) = answer(&mut s).await;
    (status, text, cert)
}

/// The certificate a new connection gets.
async fn served_now(tls: &TlsConnector, addr: SocketAddr) -> CertificateDer<'static> {
    served(&connect(tls, addr).await)
}

fn batch(client: usize, batch: usize) -> String {
    common::load_batch(client, batch, 2).0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_over_https_is_accepted_and_plain_http_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("huggy-bridge test CA");
    let leaf = ca.sign_valid(NAMES, dir.path(), "server", Some(((2020, 1, 1), (2090, 6, 1))));
    let mut cfg = common::inprocess_config(dir.path(), &[common::LOAD_TOKEN]);
    cfg.http.tls.cert_file = leaf.cert_file.display().to_string();
    cfg.http.tls.key_file = leaf.key_file.display().to_string();
    // One slot, so a client that holds it without a handshake would lock everyone out.
    cfg.http.max_connections = 1;
    cfg.http.header_timeout_ms = 500;
    let app = common::TestApp::start(cfg).await;
    let tls = connector(&ca);

    let body = batch(1, 0);
    let mut s = connect(&tls, app.http_addr).await;
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]), "HTTP/1.1 by ALPN, not h2");
    assert_eq!(served(&s), leaf.cert);
    s.write_all(request_head(body.len()).as_bytes()).await.unwrap();
    s.write_all(body.as_bytes()).await.unwrap();
    let (status, text) = answer(&mut s).await;
    assert_eq!(status, 200, "{text}");
    // Answered once in the spool; published to Kafka after.
    common::wait_for("the batch published", Duration::from_secs(30), async || (app.published() >= 2).then_some(()))
        .await;
    let recs = app.records(&["huggy.receivedMessage"]).await;
    assert!(recs.iter().any(|r| String::from_utf8_lossy(&r.value).contains("c1-b0-e1")), "the batch reached Kafka");
    assert_eq!(app.metric("huggy_bridge_tls_cert_expiry_timestamp_seconds").await, 3_799_958_400.0, "2090-06-01");

    // Plain HTTP: a 400 that says why, at once.
    let began = Instant::now();
    let plain = reqwest::Client::new()
        .post(format!("http://{}/webhooks/huggy", app.http_addr))
        .body(body.clone())
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .expect("an answer in plain HTTP");
    let took = began.elapsed();
    assert_eq!(plain.status().as_u16(), 400);
    let text = plain.text().await.unwrap();
    assert!(text.contains("speaks HTTPS") && text.contains("https_required"), "{text}");
    assert!(took < Duration::from_secs(2), "refused in {took:?}");
    assert_eq!(app.metric("huggy_bridge_tls_connections_refused_total{reason=\"plaintext\"}").await, 1.0);

    // A client that connects and says nothing loses the only slot after the header timeout.
    let mut silent = TcpStream::connect(app.http_addr).await.unwrap();
    let began = Instant::now();
    let (status, text, _) = https_post(&tls, app.http_addr, &batch(1, 1)).await;
    assert_eq!(status, 200, "{text}");
    assert!(began.elapsed() < Duration::from_secs(10), "waited {:?} for the slot", began.elapsed());
    let mut rest = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(10), silent.read(&mut rest)).await.expect("closed").unwrap_or(0);
    assert_eq!(n, 0, "the silent connection is closed");
    assert_eq!(app.metric("huggy_bridge_tls_connections_refused_total{reason=\"timeout\"}").await, 1.0);
    app.stop().await;
}

// ---------------------------------------------------------------------------------------------
// The binary: rotation and refusals

/// The configuration file of a TLS daemon on the embedded broker, serving `cert`/`key`.
fn write_config(dir: &Path, http: SocketAddr, admin: SocketAddr, cert: &Path, key: &Path) -> PathBuf {
    let path = dir.join("bridge.toml");
    // The slow request stays open across every rotation (a SIGHUP each, and the file watch's 10 s
    // checks, up to two for a pair written key first): its body timeout must outlast them, or it
    // ends as a 408 that says nothing about the rotation. Body timeouts have tests of their own.
    let toml = format!(
        "[http]\nlisten = \"{http}\"\nbody_timeout_ms = 120000\n[http.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n[admin]\nlisten = \"{admin}\"\n\
         [huggy]\ntokens = [\"{}\"]\n[kafka]\nbrokers = \"embedded\"\npartitions = 1\n[spool]\ndir = \"{}\"\n\
         [files]\nenabled = false\n",
        cert.display(),
        key.display(),
        common::LOAD_TOKEN,
        dir.join("spool").display()
    );
    std::fs::write(&path, toml).unwrap();
    path
}

fn bridge(args: &[&str], config: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_huggy-bridge"));
    cmd.args(args).arg("--config").arg(config);
    for (k, _) in std::env::vars_os() {
        if k.to_str().is_some_and(|k| k.starts_with("HUGGY_BRIDGE_")) {
            cmd.env_remove(k);
        }
    }
    cmd.env("HUGGY_BRIDGE_LOG__FORMAT", "text").env("RUST_LOG", "info,librdkafka=warn");
    cmd
}

fn check_config(config: &Path) -> (Option<i32>, String) {
    let out = bridge(&["check-config"], config).output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn copy_pair(from: &Leaf, cert: &Path, key: &Path) {
    std::fs::write(key, std::fs::read(&from.key_file).unwrap()).unwrap();
    std::fs::write(cert, std::fs::read(&from.cert_file).unwrap()).unwrap();
}

async fn metric(admin: &SocketAddr, name: &str) -> f64 {
    common::process::metric_value(admin, name).await
}

#[test]
fn check_config_refuses_a_key_of_another_certificate_an_expired_one_and_a_missing_file() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("huggy-bridge test CA");
    let good = ca.sign_valid(NAMES, dir.path(), "good", None);
    let other = ca.sign_valid(NAMES, dir.path(), "other", None);
    let expired = ca.sign_valid(NAMES, dir.path(), "expired", Some(((2000, 1, 1), (2001, 1, 1))));
    let addr = |p| SocketAddr::from(([127, 0, 0, 1], p));
    let write = |cert: &Path, key: &Path| write_config(dir.path(), addr(1), addr(2), cert, key);

    let (code, stderr) = check_config(&write(&good.cert_file, &good.key_file));
    assert_eq!(code, Some(0), "{stderr}");
    let (code, stderr) = check_config(&write(&good.cert_file, &other.key_file));
    assert_eq!(code, Some(78), "{stderr}");
    assert!(stderr.contains("http.tls.key_file") && stderr.contains("does not go with"), "{stderr}");
    let (code, stderr) = check_config(&write(&expired.cert_file, &expired.key_file));
    assert_eq!(code, Some(78), "{stderr}");
    assert!(stderr.contains("expired"), "{stderr}");
    let (code, stderr) = check_config(&write(&dir.path().join("missing.pem"), &good.key_file));
    assert_eq!(code, Some(78), "{stderr}");
    assert!(stderr.contains("http.tls.cert_file") && stderr.contains("cannot read"), "{stderr}");
    let (code, stderr) = check_config(&write(&good.key_file, &good.key_file));
    assert_eq!(code, Some(78), "a key where the certificate should be: {stderr}");
    assert!(stderr.contains("holds no PEM certificate"), "{stderr}");
    // The daemon refuses to start on it too, as a configuration error.
    let out = bridge(&["run"], &write(&good.cert_file, &other.key_file)).stdout(Stdio::null()).output().unwrap();
    assert_eq!(out.status.code(), Some(78), "{}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_certificate_rotates_on_sighup_and_on_file_change_while_a_request_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("huggy-bridge test CA");
    let first = ca.sign_valid(NAMES, dir.path(), "first", Some(((2020, 1, 1), (2080, 1, 1))));
    let second = ca.sign_valid(NAMES, dir.path(), "second", Some(((2020, 1, 1), (2081, 1, 1))));
    let third = ca.sign_valid(NAMES, dir.path(), "third", Some(((2020, 1, 1), (2082, 1, 1))));
    let stranger = ca.sign_valid(NAMES, dir.path(), "stranger", None);
    let (cert, key) = (dir.path().join("live-cert.pem"), dir.path().join("live-key.pem"));
    copy_pair(&first, &cert, &key);
    let http = SocketAddr::from(([127, 0, 0, 1], common::free_port()));
    let admin = SocketAddr::from(([127, 0, 0, 1], common::free_port()));
    let config = write_config(dir.path(), http, admin, &cert, &key);
    let log = dir.path().join("daemon.log");
    let child = common::process::ChildGuard::spawn(
        bridge(&["run"], &config).stdout(Stdio::null()).stderr(std::fs::File::create(&log).unwrap()),
    )
    .unwrap();
    let client = reqwest::Client::new();
    common::wait_for("/readyz", Duration::from_secs(60), async || {
        client.get(format!("http://{admin}/readyz")).send().await.is_ok_and(|r| r.status().is_success()).then_some(())
    })
    .await;
    let tls = connector(&ca);
    let hangup = || {
        assert!(Command::new("kill").args(["-HUP", &child.id().to_string()]).status().unwrap().success());
    };
    let tls_reloads =
        async |result: &str| metric(&admin, &format!("huggy_bridge_tls_reloads_total{{result=\"{result}\"}}")).await;

    // A request in flight on a connection made with the first certificate.
    let slow_body = batch(9, 0);
    let mut slow = connect(&tls, http).await;
    assert_eq!(served(&slow), first.cert);
    slow.write_all(request_head(slow_body.len()).as_bytes()).await.unwrap();
    slow.write_all(&slow_body.as_bytes()[..10]).await.unwrap();
    common::wait_for("the slow request to be in the handler", Duration::from_secs(20), async || {
        (metric(&admin, "huggy_bridge_http_inflight_body_bytes").await > 0.0).then_some(())
    })
    .await;

    // SIGHUP: the configuration now names the second pair (a path the file watch does not follow).
    write_config(dir.path(), http, admin, &second.cert_file, &second.key_file);
    hangup();
    common::wait_for("the second certificate after SIGHUP", Duration::from_secs(20), async || {
        (served_now(&tls, http).await == second.cert).then_some(())
    })
    .await;
    assert_eq!(metric(&admin, "huggy_bridge_tls_cert_expiry_timestamp_seconds").await, 3_502_915_200.0, "2081-01-01");

    // A key that is not the certificate's: refused, the second pair keeps serving, the daemon too.
    write_config(dir.path(), http, admin, &second.cert_file, &stranger.key_file);
    let rejected = tls_reloads("rejected").await;
    hangup();
    common::wait_for("the mismatched pair refused", Duration::from_secs(20), async || {
        (tls_reloads("rejected").await > rejected).then_some(())
    })
    .await;
    let (status, text, served_cert) = https_post(&tls, http, &batch(9, 1)).await;
    assert_eq!((status, served_cert == second.cert), (200, true), "{text}");
    assert_eq!(metric(&admin, "huggy_bridge_tls_cert_expiry_timestamp_seconds").await, 3_502_915_200.0);

    // The file watch, no signal: back to the live files, then the third pair written over them in
    // place (as certbot and cert-manager do), key first.
    write_config(dir.path(), http, admin, &cert, &key);
    hangup();
    common::wait_for("the live files after SIGHUP", Duration::from_secs(20), async || {
        (served_now(&tls, http).await == first.cert).then_some(())
    })
    .await;
    copy_pair(&third, &cert, &key);
    common::wait_for("the third certificate from the file watch", Duration::from_secs(60), async || {
        (served_now(&tls, http).await == third.cert).then_some(())
    })
    .await;
    assert_eq!(metric(&admin, "huggy_bridge_tls_cert_expiry_timestamp_seconds").await, 3_534_451_200.0, "2082-01-01");

    // The request begun before every rotation finishes on its connection.
    slow.write_all(&slow_body.as_bytes()[10..]).await.unwrap();
    let (status, text) = answer(&mut slow).await;
    assert_eq!(status, 200, "the batch read across the rotations: {text}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("new TLS certificate refused") && text.contains("does not go with"), "{text}");
}
