//! Kafka setup in one place: the producer's properties and the other clients' (admin, consumer),
//! checked with librdkafka itself. Beside it: the producer's context (`context`), topic
//! provisioning (`topics`), the embedded development broker (`embedded`) and what an error
//! means for a record (`errors`).

mod context;
mod embedded;
mod errors;
mod topics;

use std::sync::Arc;

use rdkafka::admin::AdminClient;
use rdkafka::client::DefaultClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::KafkaError;
use rdkafka::producer::FutureProducer;
use tracing::warn;

use crate::config::{AckMode, Config, KafkaConfig, SaslMechanism};
use crate::health::{KafkaHealth, STATISTICS_INTERVAL_MS};
use crate::metrics::Metrics;
pub(crate) use context::probe_reachable;
use context::BridgeContext;
pub(crate) use embedded::EmbeddedBroker;
pub(crate) use errors::{classify, error_code_label, is_permanent, is_queue_full, ErrorClass};
pub use topics::{create_topics, routable_topics, TopicOutcome, TopicsError};

/// `message.timeout.ms` in spool mode: how long a record may wait inside librdkafka (a partition
/// without a leader, a topic that does not exist) before it goes back to its key's lane.
pub(crate) const SPOOL_MESSAGE_TIMEOUT_MS: u64 = 30_000;
pub(crate) type Producer = FutureProducer<BridgeContext>;

/// Builds the producer: idempotent, `acks=all`, compressed, ordered per partition across retries
/// (idempotence keeps order with up to 5 requests in flight). In spool mode messages never time
/// out inside librdkafka, so a record cannot fail and be overtaken by a later one of the same key;
/// the spool holds it meanwhile. In kafka mode they time out with the request.
///
/// # Errors
/// librdkafka refuses the configuration (a property, a certificate file).
pub(crate) fn producer(
    cfg: &Config,
    bootstrap: &str,
    metrics: Arc<Metrics>,
    health: Arc<KafkaHealth>,
) -> Result<Producer, KafkaError> {
    if cfg.kafka.sasl.mechanism == SaslMechanism::Plain && !cfg.kafka.tls.enabled {
        warn!("kafka.sasl.mechanism = PLAIN without kafka.tls: the password crosses the network in clear text");
    }
    let producer: Producer =
        producer_config(cfg, bootstrap).create_with_context(BridgeContext::new(metrics, health))?;
    Ok(producer)
}

/// Every property the producer is created with, passthrough included.
pub(crate) fn producer_config(cfg: &Config, bootstrap: &str) -> ClientConfig {
    // Spool mode: time out (SPOOL_MESSAGE_TIMEOUT_MS) so that a record of a partition Kafka cannot
    // write now comes back to its key's lane instead of holding the publisher; the spool still holds
    // it, and the lane re-sends it before anything newer of its key. Batch a little. Kafka mode: a
    // request waits for the acks, so time out with it and linger briefly (2 ms measured best against
    // 0, 1, 3 and 5 ms; BENCHMARKS.md).
    let (message_timeout, linger_ms) = match cfg.delivery.ack {
        AckMode::Spool => (SPOOL_MESSAGE_TIMEOUT_MS, 5),
        AckMode::Kafka => (cfg.delivery.kafka_ack_timeout_ms.max(1), 2),
    };
    let mut cc = client_config(&cfg.kafka, bootstrap);
    cc.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("max.in.flight.requests.per.connection", "5")
        .set("compression.type", DEFAULT_COMPRESSION)
        .set("message.max.bytes", producer_max_message_bytes(cfg).to_string())
        .set("linger.ms", linger_ms.to_string())
        .set("message.timeout.ms", message_timeout.to_string())
        .set("statistics.interval.ms", STATISTICS_INTERVAL_MS.to_string())
        .set("queue.buffering.max.messages", "100000")
        .set("partitioner", cfg.kafka.partitioner.as_str());
    apply_passthrough(&mut cc, &cfg.kafka);
    cc.set_log_level(RDKafkaLogLevel::Info);
    cc
}

/// The codec records are compressed with unless `kafka.librdkafka."compression.type"` says
/// otherwise: zstd sent 9-17 % fewer bytes than lz4 on Huggy batches and makes a 1.5 MB e-mail fit
/// Kafka's default limit (BENCHMARKS.md).
pub(crate) const DEFAULT_COMPRESSION: &str = "zstd";

/// The codec the producer uses: the passthrough's `compression.type` (or its alias
/// `compression.codec`), else [`DEFAULT_COMPRESSION`].
pub(crate) fn compression_type(kafka: &KafkaConfig) -> &str {
    kafka
        .librdkafka
        .get("compression.type")
        .or_else(|| kafka.librdkafka.get("compression.codec"))
        .map_or(DEFAULT_COMPRESSION, String::as_str)
}

/// librdkafka's `message.max.bytes`. librdkafka compares it with a record's *uncompressed* size
/// while brokers compare a topic's `max.message.bytes` with the *compressed* batch, so it is set
/// above anything the bridge may send (the largest accepted body plus room for key and headers):
/// whether a record fits its topic is decided per topic by the publisher
/// (`claim::ClaimChecks::fits`), with the topics' limits read from the brokers.
fn producer_max_message_bytes(cfg: &Config) -> usize {
    (cfg.http.max_body_bytes + 1024 * 1024).max(super::claim::DEFAULT_MAX_MESSAGE_BYTES)
}

/// An admin client for the configured cluster (TLS, SASL and passthrough included).
pub(crate) fn admin_client(
    kafka: &KafkaConfig,
    bootstrap: &str,
) -> Result<AdminClient<DefaultClientContext>, KafkaError> {
    let mut cc = client_config(kafka, bootstrap);
    apply_passthrough_common(&mut cc, kafka);
    cc.create()
}

/// The properties of a consumer of the configured cluster: connection, TLS and SASL, passthrough
/// properties that are not the producer's own, no auto-commit, partition EOF reported.
pub(crate) fn consumer_config(kafka: &KafkaConfig, bootstrap: &str, group: &str) -> ClientConfig {
    let mut cc = client_config(kafka, bootstrap);
    apply_passthrough_common(&mut cc, kafka);
    cc.set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "earliest")
        .set("fetch.message.max.bytes", "10485760")
        .set("receive.message.max.bytes", "104857600");
    cc.set_log_level(RDKafkaLogLevel::Warning);
    cc
}

/// Passthrough properties every client type understands (connection and security ones), leaving
/// out producer-only ones a consumer or admin client would refuse.
fn apply_passthrough_common(cc: &mut ClientConfig, kafka: &KafkaConfig) {
    const PRODUCER_ONLY: &[&str] = &[
        "acks",
        "request.required.acks",
        "compression.type",
        "compression.codec",
        "compression.level",
        "linger.ms",
        "queue.buffering.max.ms",
        "batch.size",
        "batch.num.messages",
        "message.timeout.ms",
        "delivery.timeout.ms",
        "enable.idempotence",
        "max.in.flight.requests.per.connection",
        "max.in.flight",
        "partitioner",
        "queue.buffering.max.messages",
        "queue.buffering.max.kbytes",
        "retries",
        "message.send.max.retries",
        "retry.backoff.ms",
        "request.timeout.ms",
        "sticky.partitioning.linger.ms",
        "transactional.id",
    ];
    for (k, v) in &kafka.librdkafka {
        if !PRODUCER_ONLY.contains(&k.as_str()) {
            cc.set(k, v);
        }
    }
}

/// A property librdkafka refused (its value is left out: it may be a secret).
#[derive(Debug, thiserror::Error)]
#[error("librdkafka refuses {property}: {reason}")]
pub struct PropertyError {
    property: String,
    reason: String,
}

/// Checks every producer property with librdkafka itself (names, values) without connecting; for
/// `check-config` and start-up.
///
/// # Errors
/// The property librdkafka refused, and why.
pub fn check_properties(cfg: &Config) -> Result<(), PropertyError> {
    match producer_config(cfg, "localhost:9092").create_native_config() {
        Ok(_) => Ok(()),
        Err(KafkaError::ClientConfig(_, reason, property, _value)) => Err(PropertyError { property, reason }),
        Err(other) => Err(PropertyError { property: "(configuration)".into(), reason: other.to_string() }),
    }
}

/// The connection properties every client shares: brokers, TLS and SASL from `[kafka.tls]` and
/// `[kafka.sasl]`.
fn client_config(kafka: &KafkaConfig, bootstrap: &str) -> ClientConfig {
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", bootstrap).set("client.id", "huggy-bridge");
    if let Some(protocol) = kafka.security_protocol() {
        cc.set("security.protocol", protocol);
    }
    let tls = &kafka.tls;
    if tls.enabled {
        // A statically linked OpenSSL has no system paths of its own: probe the usual bundle files.
        cc.set("ssl.ca.location", if tls.ca_file.is_empty() { "probe" } else { tls.ca_file.as_str() });
        if !tls.cert_file.is_empty() {
            cc.set("ssl.certificate.location", &tls.cert_file).set("ssl.key.location", &tls.key_file);
        }
        if let Some(p) = &tls.key_password {
            cc.set("ssl.key.password", p.expose());
        }
    }
    let sasl = &kafka.sasl;
    if sasl.mechanism != SaslMechanism::None {
        cc.set("sasl.mechanism", sasl.mechanism.as_str()).set("sasl.username", &sasl.username);
        if let Some(p) = &sasl.password {
            cc.set("sasl.password", p.expose());
        }
    }
    cc
}

fn apply_passthrough(cc: &mut ClientConfig, kafka: &KafkaConfig) {
    for (k, v) in &kafka.librdkafka {
        cc.set(k, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{SaslMechanism, Secret};

    fn secured_config(mechanism: SaslMechanism, ca_file: &str) -> Config {
        let mut cfg = Config::default();
        cfg.kafka.tls.enabled = true;
        cfg.kafka.tls.ca_file = ca_file.into();
        cfg.kafka.sasl.mechanism = mechanism;
        cfg.kafka.sasl.username = "bridge".into();
        cfg.kafka.sasl.password = Some(Secret::new("s3cret"));
        cfg
    }

    #[test]
    fn tls_and_sasl_map_onto_librdkafka_properties() {
        let cfg = secured_config(SaslMechanism::ScramSha512, "");
        let cc = producer_config(&cfg, "b1:9096");
        assert_eq!(cc.get("security.protocol"), Some("sasl_ssl"));
        assert_eq!(cc.get("sasl.mechanism"), Some("SCRAM-SHA-512"));
        assert_eq!(cc.get("sasl.username"), Some("bridge"));
        assert_eq!(cc.get("sasl.password"), Some("s3cret"));
        assert_eq!(cc.get("ssl.ca.location"), Some("probe"), "system roots, found by probing");
        assert_eq!(cc.get("ssl.certificate.location"), None);
        assert_eq!(cc.get("bootstrap.servers"), Some("b1:9096"));

        let mut cfg = secured_config(SaslMechanism::None, "/etc/kafka/ca.pem");
        cfg.kafka.sasl.username.clear();
        cfg.kafka.sasl.password = None;
        cfg.kafka.tls.cert_file = "/etc/kafka/client.pem".into();
        cfg.kafka.tls.key_file = "/etc/kafka/client.key".into();
        let cc = producer_config(&cfg, "b1:9093");
        assert_eq!(cc.get("security.protocol"), Some("ssl"));
        assert_eq!(cc.get("ssl.ca.location"), Some("/etc/kafka/ca.pem"));
        assert_eq!(cc.get("ssl.certificate.location"), Some("/etc/kafka/client.pem"));
        assert_eq!(cc.get("ssl.key.location"), Some("/etc/kafka/client.key"));
        assert_eq!(cc.get("sasl.mechanism"), None);

        let mut cfg = Config::default();
        cfg.kafka.sasl = secured_config(SaslMechanism::Plain, "").kafka.sasl;
        assert_eq!(producer_config(&cfg, "b").get("security.protocol"), Some("sasl_plaintext"));
        assert_eq!(producer_config(&Config::default(), "b").get("security.protocol"), None);
    }

    #[test]
    fn the_bridge_settings_come_before_the_passthrough() {
        let mut cfg = Config::default();
        cfg.kafka.librdkafka.insert("linger.ms".into(), "20".into());
        let cc = producer_config(&cfg, "b");
        assert_eq!(cc.get("linger.ms"), Some("20"));
        assert_eq!(cc.get("acks"), Some("all"));
        assert_eq!(cc.get("enable.idempotence"), Some("true"));
        assert_eq!(cc.get("partitioner"), Some("murmur2_random"), "Java-compatible by default");
        cfg.kafka.partitioner = crate::config::Partitioner::Fnv1a;
        assert_eq!(producer_config(&cfg, "b").get("partitioner"), Some("fnv1a"));
    }

    /// This build of librdkafka has what managed Kafka needs: TLS, SASL SCRAM and PLAIN, zstd, lz4.
    #[test]
    fn librdkafka_is_built_with_tls_sasl_scram_zstd_and_lz4() {
        let native = ClientConfig::new().create_native_config().expect("native config");
        let features = native.get("builtin.features").expect("builtin.features");
        for f in ["ssl", "sasl_scram", "sasl_plain", "zstd", "lz4"] {
            assert!(features.split(',').any(|x| x == f), "librdkafka lacks {f}: {features}");
        }
    }

    /// librdkafka accepts every SASL mechanism the configuration offers, over TLS, and creates the
    /// producer (creation is where it checks SSL and SASL support; no broker is contacted here).
    #[test]
    fn a_sasl_ssl_producer_can_be_created_for_every_mechanism() {
        for m in [SaslMechanism::Plain, SaslMechanism::ScramSha256, SaslMechanism::ScramSha512] {
            let cfg = secured_config(m, "");
            check_properties(&cfg).unwrap_or_else(|e| panic!("{m:?}: {e}"));
            let health = Arc::new(KafkaHealth::new());
            let p = producer(&cfg, "127.0.0.1:9", Arc::new(Metrics::new()), health);
            assert!(p.is_ok(), "{m:?}: {:?}", p.err());
        }
    }

    #[test]
    fn check_properties_names_the_property_librdkafka_refuses_without_its_value() {
        let mut cfg = Config::default();
        cfg.kafka.librdkafka.insert("sasl.oauthbearer.client.secret.typo".into(), "hunter2".into());
        let e = check_properties(&cfg).unwrap_err().to_string();
        assert!(e.contains("sasl.oauthbearer.client.secret.typo"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
    }
}
