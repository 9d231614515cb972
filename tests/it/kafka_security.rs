//! Managed-Kafka concerns end to end: TLS (server verification, mTLS) against a real broker behind
//! a TLS-terminating loopback proxy, SASL refused by a broker that does not offer it, and producer
//! faults injected per request by librdkafka's mock cluster — authorization errors are retried and
//! never dead-lettered, a fatal producer error gets a fresh producer and loses nothing.
//!
//! The TLS tests need tansu (skipped without it unless `HUGGY_TEST_REQUIRE_BROKER=1`); the
//! mock-cluster tests need nothing.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose};
use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

// ---------------------------------------------------------------------------------------------
// Certificates made by the test

/// A date: year, month, day.
pub(crate) type Ymd = (i32, u8, u8);

/// A certificate authority the test makes, and what it signed (also used by the HTTPS tests).
pub(crate) struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate with its key: DER for the proxy, PEM files for librdkafka.
pub(crate) struct Leaf {
    pub(crate) cert: CertificateDer<'static>,
    key: KeyPair,
    pub(crate) cert_file: PathBuf,
    pub(crate) key_file: PathBuf,
}

impl TestCa {
    pub(crate) fn new(name: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        TestCa { issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap() }
    }

    fn write_pem(&self, dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, self.issuer.pem()).unwrap();
        path
    }

    pub(crate) fn der(&self) -> CertificateDer<'static> {
        self.issuer.der().clone()
    }

    /// A certificate for `names` (DNS names or IP addresses), written to `dir/<file>.pem|.key`.
    fn sign(&self, names: &[&str], dir: &Path, file: &str) -> Leaf {
        self.sign_valid(names, dir, file, None)
    }

    /// [`TestCa::sign`], valid from `validity.0` until `validity.1` (year, month, day, UTC) when given
    /// (rcgen's default: from 1975 to 4096).
    pub(crate) fn sign_valid(&self, names: &[&str], dir: &Path, file: &str, validity: Option<(Ymd, Ymd)>) -> Leaf {
        let mut params = CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(DnType::CommonName, names[0]);
        if let Some(((y0, m0, d0), (y1, m1, d1))) = validity {
            params.not_before = rcgen::date_time_ymd(y0, m0, d0);
            params.not_after = rcgen::date_time_ymd(y1, m1, d1);
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let (cert_file, key_file) = (dir.join(format!("{file}.pem")), dir.join(format!("{file}.key")));
        std::fs::write(&cert_file, cert.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        Leaf { cert: cert.der().clone(), key, cert_file, key_file }
    }
}

// ---------------------------------------------------------------------------------------------
// A TLS-terminating proxy in front of a plaintext broker

/// Accepts TLS on 127.0.0.1:`port` with `server` and forwards the plaintext to `target`; with
/// `client_ca`, only clients presenting a certificate it signed get through (mTLS).
struct TlsProxy {
    task: tokio::task::JoinHandle<()>,
}

impl TlsProxy {
    async fn start(
        port: u16,
        target: SocketAddr,
        server: &Leaf,
        client_ca: Option<CertificateDer<'static>>,
    ) -> TlsProxy {
        // Both ring (here) and aws-lc-rs (reqwest's rustls) are linked into the test binary, so
        // rustls cannot pick a process-wide provider: name one.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions");
        let builder = match client_ca {
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                roots.add(ca).unwrap();
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .unwrap();
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server.key.serialize_der()));
        let config = builder.with_single_cert(vec![server.cert.clone()], key).unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                    let Ok(mut upstream) = tokio::net::TcpStream::connect(target).await else { return };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut upstream).await;
                });
            }
        });
        TlsProxy { task }
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// tansu reached only through TLS: it advertises `localhost:<proxy port>`, so every connection
/// librdkafka makes (bootstrap and broker) goes through the proxy and is verified.
struct TlsBroker {
    _tansu: Tansu,
    _proxy: TlsProxy,
    bootstrap: String,
    ca: TestCa,
    dir: tempfile::TempDir,
}

async fn tls_broker(bin: &Path, mtls: bool) -> TlsBroker {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("huggy-bridge test CA");
    let server = ca.sign(&["localhost", "127.0.0.1"], dir.path(), "broker");
    let port = free_port();
    let tansu = Tansu::start_advertising(bin, &format!("localhost:{port}"));
    let proxy =
        TlsProxy::start(port, SocketAddr::from(([127, 0, 0, 1], tansu.port)), &server, mtls.then(|| ca.der())).await;
    TlsBroker { _tansu: tansu, _proxy: proxy, bootstrap: format!("localhost:{port}"), ca, dir }
}

/// The `[kafka]` part of a daemon's configuration for a TLS broker, kafka ack mode.
fn tls_kafka_toml(bootstrap: &str, ca_file: &Path, client: Option<&Leaf>) -> String {
    let mtls = client.map_or(String::new(), |c| {
        format!(
            "cert_file = {:?}\nkey_file = {:?}\n",
            c.cert_file.display().to_string(),
            c.key_file.display().to_string()
        )
    });
    format!(
        "[kafka]\nbrokers = \"{bootstrap}\"\npartitions = 1\n[kafka.tls]\nenabled = true\nca_file = {:?}\n{mtls}\
         [kafka.librdkafka]\n\"broker.address.family\" = \"v4\"\n\
         [delivery]\nack = \"kafka\"\nkafka_ack_timeout_ms = 4000\n[files]\nenabled = false\n",
        ca_file.display().to_string()
    )
}

/// The same configuration as the daemon's environment (`HUGGY_BRIDGE_KAFKA__TLS__…`, and a
/// librdkafka property through `HUGGY_BRIDGE_KAFKA__LIBRDKAFKA__BROKER__ADDRESS__FAMILY`).
fn tls_kafka_env(bootstrap: &str, ca_file: &Path, client: Option<&Leaf>) -> DaemonEnv {
    let env = DaemonEnv::new()
        .set("kafka.brokers", bootstrap)
        .set("kafka.partitions", 1)
        .set("kafka.tls.enabled", true)
        .set("kafka.tls.ca_file", ca_file.display())
        .set("kafka.librdkafka.broker.address.family", "v4")
        .set("delivery.ack", "kafka")
        .set("delivery.kafka_ack_timeout_ms", 4000)
        .set("files.enabled", false);
    match client {
        Some(c) => {
            env.set("kafka.tls.cert_file", c.cert_file.display()).set("kafka.tls.key_file", c.key_file.display())
        }
        None => env,
    }
}

/// librdkafka consumer properties for the same broker.
fn tls_consumer(ca_file: &Path, client: &Leaf) -> Vec<(String, String)> {
    [
        ("security.protocol", "ssl".to_owned()),
        ("ssl.ca.location", ca_file.display().to_string()),
        ("ssl.certificate.location", client.cert_file.display().to_string()),
        ("ssl.key.location", client.key_file.display().to_string()),
        ("broker.address.family", "v4".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

async fn readyz(admin: &SocketAddr) -> (u16, String) {
    let r = reqwest::get(format!("http://{admin}/readyz")).await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_to_a_tls_only_broker_topics_create_and_every_fixture_acknowledged() {
    let Some(bin) = real_broker_or_skip("mtls_to_a_tls_only_broker") else { return };
    let broker = tls_broker(&bin, true).await;
    let dir = broker.dir.path();
    let ca_file = broker.ca.write_pem(dir, "ca.pem");
    let client = broker.ca.sign(&["huggy-bridge"], dir, "client");
    let kafka_toml = tls_kafka_toml(&broker.bootstrap, &ca_file, Some(&client));

    // `topics create` over mTLS, with no webhook tokens in its configuration.
    let topics_cfg = dir.join("topics.toml");
    std::fs::write(&topics_cfg, &kafka_toml).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_huggy-bridge"))
        .args(["topics", "create", "--config"])
        .arg(&topics_cfg)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "topics create over TLS: {}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.lines().count() >= 21 && stdout.lines().all(|l| l.ends_with("\tcreated")), "{stdout}");

    let d = Daemon::start(dir, &tls_kafka_env(&broker.bootstrap, &ca_file, Some(&client))).await;
    wait_for("ready over TLS", Duration::from_secs(30), async || (readyz(&d.admin).await.0 == 200).then_some(())).await;
    for (name, body) in batch_fixtures() {
        let (status, text) = post(&d.url(), body).await;
        assert_eq!(status, 200, "{name}: {text}\n{}", d.log_text());
    }
    let topics = fixture_topics();
    let props = tls_consumer(&ca_file, &client);
    let recs = read_topics_with_async(&broker.bootstrap, props, topics.iter().map(String::as_str).collect()).await;
    check_fixture_records(&recs, false);
    assert!(d.metric("huggy_bridge_published_bytes_total").await > 0.0);
    assert!(d.metric("huggy_bridge_kafka_produce_latency_seconds_count").await >= 25.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_certificate_from_an_untrusted_ca_is_refused_no_2xx_and_readiness_and_logs_say_why() {
    let Some(bin) = real_broker_or_skip("untrusted_broker_certificate") else { return };
    let broker = tls_broker(&bin, false).await;
    let dir = broker.dir.path();
    let stranger = TestCa::new("some other CA");
    let wrong_ca = stranger.write_pem(dir, "wrong-ca.pem");
    let d = Daemon::start(dir, &tls_kafka_env(&broker.bootstrap, &wrong_ca, None)).await;

    let body = std::fs::read(format!("{FIXTURES}/receivedMessage.json")).unwrap();
    let (status, text) = post(&d.url(), body).await;
    assert_eq!(status, 503, "an unverified broker must not lead to a 2xx: {text}");
    assert!(text.contains("kafka_unavailable"), "{text}");

    let why = wait_for("readiness names the TLS failure", Duration::from_secs(20), async || {
        let (status, body) = readyz(&d.admin).await;
        (status == 503 && body.contains("certificate verify failed")).then_some(body)
    })
    .await;
    eprintln!("readiness: {why}");
    assert!(why.contains("kafka unreachable"), "{why}");
    let log = d.log_text();
    assert!(log.contains("certificate verify failed"), "the log says why:\n{log}");
    assert_eq!(d.metric("huggy_bridge_kafka_connected").await, 0.0);
}

// ---------------------------------------------------------------------------------------------
// Faults injected by librdkafka's mock cluster

/// A mock cluster with every routable topic, and an in-process daemon publishing to it.
struct MockSetup {
    cluster: MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    _dir: tempfile::TempDir,
    cfg: huggy_bridge::config::Config,
}

fn mock_setup(ack: huggy_bridge::config::AckMode) -> MockSetup {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = inprocess_config(dir.path(), &[LOAD_TOKEN]);
    cfg.kafka.partitions = 1;
    cfg.delivery.ack = ack;
    cfg.delivery.kafka_ack_timeout_ms = 3_000;
    let cluster = MockCluster::new(1).unwrap();
    for t in huggy_bridge::publish::kafka::routable_topics(&cfg) {
        cluster.create_topic(&t, 1, 1).unwrap();
    }
    cfg.kafka.brokers = cluster.bootstrap_servers();
    MockSetup { cluster, _dir: dir, cfg }
}

fn counter(m: &huggy_bridge::metrics::Metrics, name: &str, label: &str) -> u64 {
    use prometheus::core::Collector;
    let c = match name {
        "publish_errors" => &m.publish_errors,
        "published" => &m.events_published,
        "dead_lettered" => &m.events_dead_lettered,
        other => panic!("{other}"),
    };
    c.collect()
        .iter()
        .flat_map(|f| f.get_metric())
        .filter(|s| s.get_label().iter().any(|l| l.value() == label))
        .map(|s| s.get_counter().get_value() as u64)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_authorization_error_is_retried_counted_and_never_dead_lettered() {
    let setup = mock_setup(huggy_bridge::config::AckMode::Spool);
    let errors = [RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 3];
    setup.cluster.request_errors(RDKafkaApiKey::Produce, &errors);
    let stop = tokio_util::sync::CancellationToken::new();
    let running = huggy_bridge::app::start(setup.cfg.clone(), stop.clone()).await.unwrap();
    let url = format!("http://{}/webhooks/huggy", running.http_addr);
    let (body, markers) = load_batch(0, 0, 5);
    let (status, text) = post(&url, body).await;
    assert_eq!(status, 200, "{text}");

    let m = running.metrics.clone();
    wait_for("published after the ACL errors", Duration::from_secs(60), async || {
        (counter(&m, "published", "receivedMessage") == 5).then_some(())
    })
    .await;
    assert!(counter(&m, "publish_errors", "TopicAuthorizationFailed") >= 1, "counted by code");
    assert_eq!(huggy_bridge::metrics::counter_sum(&m.events_dead_lettered), 0, "an ACL mistake dead-letters nothing");
    assert!(m.publish_retries.get() >= 1);
    let recs = read_topics_async(&setup.cfg.kafka.brokers, &["huggy.receivedMessage", "huggy.dead-letter"]).await;
    let load = LoadResult { acked: vec![markers], ok: 1, ..Default::default() };
    assert_nothing_acked_is_missing(&load, &recs);
    assert!(recs.iter().all(|r| r.topic == "huggy.receivedMessage"), "nothing on the dead-letter topic");
    running.shutdown();
    running.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fatal_producer_error_mid_stream_gets_a_fresh_producer_and_the_spool_loses_nothing() {
    let setup = mock_setup(huggy_bridge::config::AckMode::Spool);
    let stop = tokio_util::sync::CancellationToken::new();
    let running = huggy_bridge::app::start(setup.cfg.clone(), stop.clone()).await.unwrap();
    let url = format!("http://{}/webhooks/huggy", running.http_addr);
    // The head-of-line request failing with a sequence error desynchronises the idempotent producer:
    // librdkafka raises a fatal error and no record can be sent with that producer again.
    let errors = [RDKafkaRespErr::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER];
    setup.cluster.request_errors(RDKafkaApiKey::Produce, &errors);
    let mut load = LoadResult::default();
    for b in 0..4 {
        let (body, markers) = load_batch(1, b, 10);
        let (status, text) = post(&url, body).await;
        assert_eq!(status, 200, "{text}");
        load.acked.push(markers);
    }
    let m = running.metrics.clone();
    wait_for("every event published by the fresh producer", Duration::from_secs(60), async || {
        (counter(&m, "published", "receivedMessage") >= 40).then_some(())
    })
    .await;
    assert!(m.producer_recreated.get() >= 1, "the producer was replaced");
    assert_eq!(m.kafka_fatal.get(), 0, "the fatal gauge clears with the fresh producer");
    let recs = read_topics_async(&setup.cfg.kafka.brokers, &["huggy.receivedMessage"]).await;
    assert_nothing_acked_is_missing(&LoadResult { acked: vec![load.acked.concat()], ..Default::default() }, &recs);
    running.shutdown();
    running.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_fenced_at_start_is_replaced_and_kafka_mode_answers_2xx_again() {
    let setup = mock_setup(huggy_bridge::config::AckMode::Kafka);
    // The producer id request fails with "fenced": fatal for the first producer the daemon makes.
    setup.cluster.request_errors(RDKafkaApiKey::InitProducerId, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_PRODUCER_FENCED]);
    let stop = tokio_util::sync::CancellationToken::new();
    let running = huggy_bridge::app::start(setup.cfg.clone(), stop.clone()).await.unwrap();
    let url = format!("http://{}/webhooks/huggy", running.http_addr);
    let m = running.metrics.clone();
    wait_for("a fresh producer", Duration::from_secs(30), async || (m.producer_recreated.get() >= 1).then_some(()))
        .await;
    let markers = wait_for("a 2xx in kafka mode", Duration::from_secs(30), async || {
        let (body, markers) = load_batch(2, 0, 3);
        (post(&url, body).await.0 == 200).then_some(markers)
    })
    .await;
    let admin = running.admin_addr;
    let status = reqwest::get(format!("http://{admin}/healthz")).await.unwrap().status();
    assert_eq!(status, 200, "liveness holds: the producer could be recreated");
    let recs = read_topics_async(&setup.cfg.kafka.brokers, &["huggy.receivedMessage"]).await;
    assert_nothing_acked_is_missing(&LoadResult { acked: vec![markers], ..Default::default() }, &recs);
    running.shutdown();
    running.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sasl_against_a_broker_that_does_not_offer_it_gives_no_2xx_and_readiness_says_why() {
    let mut setup = mock_setup(huggy_bridge::config::AckMode::Kafka);
    setup.cfg.kafka.sasl.mechanism = huggy_bridge::config::SaslMechanism::ScramSha512;
    setup.cfg.kafka.sasl.username = "bridge".into();
    setup.cfg.kafka.sasl.password = Some(huggy_bridge::config::Secret::new("wrong-or-right"));
    let stop = tokio_util::sync::CancellationToken::new();
    let running = huggy_bridge::app::start(setup.cfg.clone(), stop.clone()).await.unwrap();
    let url = format!("http://{}/webhooks/huggy", running.http_addr);
    let (body, _) = load_batch(3, 0, 1);
    let (status, text) = post(&url, body).await;
    assert_eq!(status, 503, "{text}");
    let admin = running.admin_addr;
    let why = wait_for("readiness names the SASL failure", Duration::from_secs(20), async || {
        let (status, body) = readyz(&admin).await;
        (status == 503 && body.to_ascii_lowercase().contains("sasl")).then_some(body)
    })
    .await;
    eprintln!("readiness: {why}");
    assert!(!why.contains("wrong-or-right"), "no password in readiness: {why}");
    running.shutdown();
    running.wait().await.unwrap();
}
