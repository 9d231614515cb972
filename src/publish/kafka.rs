//! Kafka setup in one place: the producer's properties, its context (statistics and errors turned
//! into metrics and health), the embedded development broker, and topic provisioning.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, Producer as _, ProducerContext};
use rdkafka::statistics::Statistics;
use rdkafka::ClientContext;
use tracing::{error, info, warn};

use crate::clock::monotonic_millis;
use crate::config::{AckMode, Config, KafkaConfig, SaslMechanism};
use crate::metrics::Metrics;

/// `message.timeout.ms` in spool mode: how long a record may wait inside librdkafka (a partition
/// without a leader, a topic that does not exist) before it goes back to its key's lane.
pub(crate) const SPOOL_MESSAGE_TIMEOUT_MS: u64 = 30_000;

/// How often librdkafka reports statistics (broker states, queue depth).
pub(crate) const STATISTICS_INTERVAL_MS: u64 = 2_000;

/// What the daemon knows of its Kafka connection, for readiness, liveness and metrics.
///
/// `reachable`: a broker connection is up (librdkafka's statistics), or a one-topic metadata request
/// answered. `fatal`: librdkafka raised a fatal error on the current producer (the publisher
/// replaces it). `unrecoverable`: a replacement producer could not be created — the only Kafka
/// state that should fail liveness.
#[derive(Default)]
pub(crate) struct KafkaHealth {
    pub(crate) reachable: AtomicBool,
    pub(crate) fatal: AtomicBool,
    pub(crate) unrecoverable: AtomicBool,
    /// Brokers whose connection was UP at the last statistics report; -1 before the first.
    brokers_up: AtomicI64,
    /// When that report came ([`monotonic_millis`]; 0 before the first).
    stats_at: AtomicI64,
    last_error: Mutex<Option<String>>,
}

impl KafkaHealth {
    pub(crate) fn new() -> Self {
        KafkaHealth { brokers_up: AtomicI64::new(-1), ..Default::default() }
    }
    pub(crate) fn is_reachable(&self) -> bool {
        self.reachable.load(Ordering::Relaxed)
    }
    /// The producer hit a fatal error and a fresh one could not be created: restarting the process
    /// is all that is left (liveness).
    pub(crate) fn cannot_recreate(&self) -> bool {
        self.unrecoverable.load(Ordering::Relaxed)
    }
    /// The last error librdkafka reported for the connection (TLS, authentication, transport),
    /// for readiness reasons and logs; `None` once a broker is up again.
    pub(crate) fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|e| e.clone())
    }
    /// Why Kafka is not usable, when it is not: for readiness in kafka ack mode.
    pub(crate) fn not_ready_reason(&self) -> Option<String> {
        if self.cannot_recreate() {
            return Some("kafka producer failed fatally and cannot be recreated".into());
        }
        if self.is_reachable() {
            return None;
        }
        Some(match self.last_error() {
            Some(e) => format!("kafka unreachable: {e}"),
            None => "kafka unreachable".into(),
        })
    }
    /// Brokers up according to statistics no older than three intervals (on the monotonic clock: a
    /// wall-clock step must not make Kafka look away); `None` when there are none.
    fn brokers_up_recently(&self) -> Option<i64> {
        let at = self.stats_at.load(Ordering::Relaxed);
        let fresh = at > 0 && monotonic_millis() - at <= 3 * STATISTICS_INTERVAL_MS as i64;
        let up = self.brokers_up.load(Ordering::Relaxed);
        (fresh && up >= 0).then_some(up)
    }
    fn set_last_error(&self, e: Option<String>) {
        if let Ok(mut slot) = self.last_error.lock() {
            *slot = e;
        }
    }
}

/// The producer's librdkafka context: statistics and errors become metrics and [`KafkaHealth`].
pub(crate) struct BridgeContext {
    metrics: Arc<Metrics>,
    health: Arc<KafkaHealth>,
}

impl ClientContext for BridgeContext {
    fn stats(&self, stats: Statistics) {
        let up = stats.brokers.values().filter(|b| b.state == "UP" && b.nodeid >= 0).count();
        self.metrics.kafka_brokers_up.set(up as i64);
        self.metrics.kafka_queue_messages.set(stats.msg_cnt as i64);
        self.metrics.kafka_queue_bytes.set(stats.msg_size as i64);
        self.metrics.kafka_transmitted_bytes.set(stats.tx_bytes);
        self.health.brokers_up.store(up as i64, Ordering::Relaxed);
        self.health.stats_at.store(monotonic_millis(), Ordering::Relaxed);
        if up > 0 {
            self.health.set_last_error(None);
        }
    }

    fn error(&self, err: KafkaError, reason: &str) {
        if matches!(err.rdkafka_error_code(), Some(RDKafkaErrorCode::Fatal)) {
            self.health.fatal.store(true, Ordering::Relaxed);
            self.metrics.kafka_fatal.set(1);
            error!(error = %err, reason, "kafka: fatal producer error; the producer will be recreated");
        } else {
            warn!(error = %err, reason, "kafka client error");
        }
        // "All brokers are down" follows the error that says why (TLS, authentication): keep the cause.
        let consequence = matches!(err.rdkafka_error_code(), Some(RDKafkaErrorCode::AllBrokersDown));
        if !(consequence && self.health.last_error().is_some()) {
            self.health.set_last_error(Some(reason.to_owned()));
        }
    }

    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        match level {
            RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical | RDKafkaLogLevel::Error => {
                error!(target: "librdkafka", facility = fac, "{log_message}")
            }
            RDKafkaLogLevel::Warning => warn!(target: "librdkafka", facility = fac, "{log_message}"),
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                info!(target: "librdkafka", facility = fac, "{log_message}")
            }
            RDKafkaLogLevel::Debug => tracing::debug!(target: "librdkafka", facility = fac, "{log_message}"),
        }
    }
}

impl ProducerContext for BridgeContext {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &rdkafka::message::DeliveryResult<'_>, _: Self::DeliveryOpaque) {}
}

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
    let producer: Producer = producer_config(cfg, bootstrap).create_with_context(BridgeContext { metrics, health })?;
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

/// Whether Kafka can be reached: yes when librdkafka's statistics show a broker connection up;
/// otherwise a metadata request for one topic (never the whole cluster's) decides. Blocking.
pub(crate) fn probe_reachable(producer: &Producer, health: &KafkaHealth, topic: &str, timeout: Duration) -> bool {
    if health.brokers_up_recently().is_some_and(|up| up > 0) {
        return true;
    }
    match producer.client().fetch_metadata(Some(topic), timeout) {
        Ok(_) => true,
        Err(e) => {
            if health.last_error().is_none() {
                health.set_last_error(Some(e.to_string()));
            }
            false
        }
    }
}

/// Every topic the configuration can route to: each known type's topic, the fallback and the
/// dead-letter topic.
pub fn routable_topics(cfg: &Config) -> BTreeSet<String> {
    let routes = super::Routes::new(&cfg.kafka);
    let mut topics: BTreeSet<String> = crate::event::KnownType::ALL
        .iter()
        .map(|k| routes.topic_for(&crate::event::EventType::Known(*k)).to_owned())
        .collect();
    topics.insert(cfg.kafka.fallback_topic.clone());
    topics.insert(cfg.kafka.dead_letter_topic.clone());
    topics
}

/// Outcome of `topics create` for one topic.
#[derive(Debug, PartialEq, Eq)]
pub enum TopicOutcome {
    /// The topic was made now.
    Created,
    /// The topic was there already; its settings were left alone.
    Existed,
}

/// Why `topics create` failed.
#[derive(Debug, thiserror::Error)]
pub enum TopicsError {
    /// The admin client could not be made (configuration, TLS files).
    #[error("cannot create the Kafka admin client")]
    Client(#[source] KafkaError),
    /// The request as a whole failed (no broker answered, not authorized).
    #[error("the create-topics request failed")]
    Request(#[source] KafkaError),
    /// No answer within `kafka.request_timeout_ms`.
    #[error("no answer from the brokers within kafka.request_timeout_ms ({0} ms)")]
    Timeout(u64),
    /// Topics the brokers refused, each with its error code.
    #[error("topics not created: {}", .0.iter().map(|(t, c)| format!("{t}: {c} ({c:?})")).collect::<Vec<_>>().join(", "))]
    Refused(Vec<(String, RDKafkaErrorCode)>),
}

/// Creates every routable topic with the configured partitions, replication and
/// `min.insync.replicas`; existing topics are left as they are.
///
/// # Errors
/// The admin request failed, or a topic could not be created for another reason than existing.
pub async fn create_topics(cfg: &Config, bootstrap: &str) -> Result<Vec<(String, TopicOutcome)>, TopicsError> {
    let mut cc = client_config(&cfg.kafka, bootstrap);
    apply_passthrough(&mut cc, &cfg.kafka);
    let admin: AdminClient<DefaultClientContext> = cc.create().map_err(TopicsError::Client)?;
    let topics = routable_topics(cfg);
    let min_insync = cfg.kafka.effective_min_insync_replicas().map(|m| m.to_string());
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| {
            let topic = NewTopic::new(t, cfg.kafka.partitions, TopicReplication::Fixed(cfg.kafka.replication_factor));
            match &min_insync {
                Some(m) => topic.set("min.insync.replicas", m),
                None => topic,
            }
        })
        .collect();
    // The request timeout covers finding a broker too (librdkafka's default is socket.timeout.ms,
    // 60 s); the operation timeout is how long the controller may take. The outer timeout is a
    // backstop in case librdkafka does not answer at all.
    let timeout = Duration::from_millis(cfg.kafka.request_timeout_ms);
    let opts = AdminOptions::new().request_timeout(Some(timeout)).operation_timeout(Some(timeout));
    let results = tokio::time::timeout(timeout + Duration::from_secs(1), admin.create_topics(&new, &opts))
        .await
        .map_err(|_| TopicsError::Timeout(cfg.kafka.request_timeout_ms))?
        .map_err(|e| match e {
            KafkaError::AdminOp(RDKafkaErrorCode::OperationTimedOut) => {
                TopicsError::Timeout(cfg.kafka.request_timeout_ms)
            }
            other => TopicsError::Request(other),
        })?;
    let mut out = Vec::new();
    let mut failures = Vec::new();
    for r in results {
        match r {
            Ok(t) => out.push((t, TopicOutcome::Created)),
            Err((t, RDKafkaErrorCode::TopicAlreadyExists)) => out.push((t, TopicOutcome::Existed)),
            Err((t, code)) => failures.push((t, code)),
        }
    }
    if failures.is_empty() {
        Ok(out)
    } else {
        Err(TopicsError::Refused(failures))
    }
}

/// Why the embedded broker did not start.
#[derive(Debug, thiserror::Error)]
pub(crate) enum EmbeddedBrokerError {
    /// The thread that owns the cluster could not be started.
    #[error("cannot start the embedded broker's thread")]
    Thread(#[from] std::io::Error),
    /// librdkafka could not create the mock cluster.
    #[error("embedded broker failed")]
    Cluster(#[source] KafkaError),
    /// A routable topic could not be created on it.
    #[error("embedded broker failed: creating {topic}")]
    Topic {
        /// The topic.
        topic: String,
        /// Why.
        #[source]
        source: KafkaError,
    },
    /// The cluster's thread ended without saying whether the broker started.
    #[error("embedded broker failed: its thread ended before the broker was ready")]
    Gone(#[from] std::sync::mpsc::RecvError),
}

/// The embedded development broker: librdkafka's mock cluster, owned by a thread of its own for the
/// life of the process (the cluster is not `Send`).
pub(crate) struct EmbeddedBroker {
    pub(crate) bootstrap: String,
    stop: std::sync::mpsc::Sender<()>,
}

impl EmbeddedBroker {
    /// Starts the mock cluster and creates the routable topics on it.
    ///
    /// # Errors
    /// librdkafka could not create the cluster or its topics, or its thread could not start.
    pub(crate) fn start(cfg: &Config) -> Result<EmbeddedBroker, EmbeddedBrokerError> {
        let topics = routable_topics(cfg);
        let partitions = cfg.kafka.partitions;
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<String, EmbeddedBrokerError>>();
        let (stop, stop_rx) = std::sync::mpsc::channel::<()>();
        std::thread::Builder::new().name("embedded-kafka".into()).spawn(move || {
            let cluster = match rdkafka::mocking::MockCluster::new(1) {
                Ok(c) => c,
                Err(e) => {
                    let _ = ready_tx.send(Err(EmbeddedBrokerError::Cluster(e)));
                    return;
                }
            };
            for t in &topics {
                if let Err(source) = cluster.create_topic(t, partitions, 1) {
                    let _ = ready_tx.send(Err(EmbeddedBrokerError::Topic { topic: t.clone(), source }));
                    return;
                }
            }
            let _ = ready_tx.send(Ok(cluster.bootstrap_servers()));
            let _ = stop_rx.recv();
            drop(cluster);
        })?;
        let bootstrap = ready_rx.recv()??;
        warn!(
            bootstrap = %bootstrap,
            "EMBEDDED KAFKA BROKER (development only): attach any Kafka client to {bootstrap}; nothing it holds survives a restart"
        );
        Ok(EmbeddedBroker { bootstrap, stop })
    }
}

impl Drop for EmbeddedBroker {
    fn drop(&mut self) {
        let _ = self.stop.send(());
    }
}

/// What an error means for the record that met it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ErrorClass {
    /// Kafka can never take this record on its topic: dead-letter it.
    Permanent,
    /// An ACL is missing: the operator's mistake, not the event's. Retry (with backoff) and alert;
    /// never dead-letter.
    Authorization,
    /// The producer instance is broken for good (fenced, sequence desynchronised): replace it and
    /// retry the record with the new one.
    Fatal,
    /// Not now: retry.
    Transient,
}

/// Classifies an error of a send or a delivery report.
pub(crate) fn classify(err: &KafkaError) -> ErrorClass {
    use RDKafkaErrorCode::*;
    match err.rdkafka_error_code() {
        Some(
            MessageSizeTooLarge
            | InvalidMessageSize
            | MessageBatchTooLarge
            | InvalidRecord
            | InvalidMessage
            | InvalidTopic
            | PolicyViolation
            | UnsupportedCompressionType,
        ) => ErrorClass::Permanent,
        Some(
            TopicAuthorizationFailed
            | ClusterAuthorizationFailed
            | TransactionalIdAuthorizationFailed
            | SaslAuthenticationFailed
            | Authentication,
        ) => ErrorClass::Authorization,
        Some(Fatal | Fenced | ProducerFenced) => ErrorClass::Fatal,
        _ => ErrorClass::Transient,
    }
}

/// Whether an error means the record can never be written to its topic (dead-letter it) rather than
/// "not now" (keep it and try again).
pub(crate) fn is_permanent(err: &KafkaError) -> bool {
    classify(err) == ErrorClass::Permanent
}

/// The `code` label of `huggy_bridge_publish_errors_total`: the `RDKafkaErrorCode` name, or
/// `Unknown` for an error that carries none.
pub(crate) fn error_code_label(err: &KafkaError) -> String {
    err.rdkafka_error_code().map_or_else(|| "Unknown".to_owned(), |c| format!("{c:?}"))
}

/// librdkafka's "queue full" when enqueueing: wait and try again.
pub(crate) fn is_queue_full(err: &KafkaError) -> bool {
    matches!(err.rdkafka_error_code(), Some(RDKafkaErrorCode::QueueFull))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{SaslMechanism, Secret};

    fn err(code: RDKafkaErrorCode) -> KafkaError {
        KafkaError::MessageProduction(code)
    }

    #[test]
    fn a_wall_clock_jump_does_not_make_kafka_look_away_or_fresh() {
        use crate::clock::seam::{advance_monotonic, jump_wall};
        let h = KafkaHealth::default();
        assert_eq!(h.brokers_up_recently(), None, "no statistics yet");
        h.brokers_up.store(1, Ordering::Relaxed);
        h.stats_at.store(monotonic_millis(), Ordering::Relaxed);
        jump_wall(600_000);
        assert_eq!(h.brokers_up_recently(), Some(1), "a forward step makes fresh statistics stale");
        jump_wall(-1_200_000);
        advance_monotonic(u32::try_from(3 * STATISTICS_INTERVAL_MS + 1).unwrap());
        assert_eq!(h.brokers_up_recently(), None, "a backward step keeps stale statistics fresh");
    }

    #[test]
    fn authorization_errors_are_retried_never_dead_lettered() {
        for code in [RDKafkaErrorCode::TopicAuthorizationFailed, RDKafkaErrorCode::ClusterAuthorizationFailed] {
            assert_eq!(classify(&err(code)), ErrorClass::Authorization, "{code:?}");
            assert!(!is_permanent(&err(code)), "{code:?} must not dead-letter");
        }
    }

    #[test]
    fn errors_are_classified_by_code() {
        use RDKafkaErrorCode::*;
        for c in [MessageSizeTooLarge, InvalidTopic, PolicyViolation, InvalidRecord] {
            assert_eq!(classify(&err(c)), ErrorClass::Permanent, "{c:?}");
        }
        for c in [Fatal, Fenced, ProducerFenced] {
            assert_eq!(classify(&err(c)), ErrorClass::Fatal, "{c:?}");
        }
        for c in [MessageTimedOut, NotEnoughReplicas, AllBrokersDown, RequestTimedOut, PurgeQueue] {
            assert_eq!(classify(&err(c)), ErrorClass::Transient, "{c:?}");
        }
        assert_eq!(classify(&KafkaError::Canceled), ErrorClass::Transient);
        assert!(is_queue_full(&err(QueueFull)));
    }

    #[test]
    fn the_error_code_label_is_the_rdkafka_error_code_name() {
        assert_eq!(error_code_label(&err(RDKafkaErrorCode::TopicAuthorizationFailed)), "TopicAuthorizationFailed");
        assert_eq!(error_code_label(&KafkaError::Canceled), "Unknown");
        for seeded in crate::metrics::PUBLISH_ERROR_CODES {
            assert!(!seeded.contains(' '), "{seeded}");
        }
    }

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

    #[test]
    fn readiness_says_why_kafka_is_unreachable() {
        let h = KafkaHealth::new();
        assert_eq!(h.not_ready_reason().as_deref(), Some("kafka unreachable"));
        h.set_last_error(Some("ssl://localhost:9093/bootstrap: SSL handshake failed".into()));
        assert!(h.not_ready_reason().is_some_and(|r| r.contains("SSL handshake failed")));
        h.reachable.store(true, Ordering::Relaxed);
        assert_eq!(h.not_ready_reason(), None);
        h.unrecoverable.store(true, Ordering::Relaxed);
        assert!(h.not_ready_reason().is_some_and(|r| r.contains("cannot be recreated")));
        assert!(h.cannot_recreate());
    }

    #[test]
    fn min_insync_replicas_defaults_to_two_from_replication_factor_three() {
        let mut k = KafkaConfig::default();
        assert_eq!(k.effective_min_insync_replicas(), None);
        k.replication_factor = 3;
        assert_eq!(k.effective_min_insync_replicas(), Some(2));
        k.min_insync_replicas = Some(3);
        assert_eq!(k.effective_min_insync_replicas(), Some(3));
    }
}
