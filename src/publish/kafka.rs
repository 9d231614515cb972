//! Kafka setup in one place: the producer's properties, its context (statistics and errors turned
//! into metrics and health), the embedded development broker, and topic provisioning.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, ProducerContext};
use rdkafka::statistics::Statistics;
use rdkafka::ClientContext;
use tracing::{error, info, warn};

use crate::config::{AckMode, Config, KafkaConfig};
use crate::metrics::Metrics;

/// What the daemon knows of its Kafka connection, for readiness and metrics.
#[derive(Default)]
pub struct KafkaHealth {
    pub reachable: AtomicBool,
    pub fatal: AtomicBool,
}

impl KafkaHealth {
    pub fn is_reachable(&self) -> bool {
        self.reachable.load(Ordering::Relaxed)
    }
    pub fn is_fatal(&self) -> bool {
        self.fatal.load(Ordering::Relaxed)
    }
    /// Whether a fatal error cannot be healed by this process (no fresh producer could be made).
    pub fn cannot_recover(&self) -> bool {
        self.is_fatal()
    }
}

pub struct BridgeContext {
    metrics: Arc<Metrics>,
    health: Arc<KafkaHealth>,
}

impl ClientContext for BridgeContext {
    fn stats(&self, stats: Statistics) {
        let up = stats.brokers.values().filter(|b| b.state == "UP" && b.nodeid >= 0).count();
        self.metrics.kafka_brokers_up.set(up as i64);
        self.metrics.kafka_queue_messages.set(stats.msg_cnt as i64);
        self.metrics.kafka_queue_bytes.set(stats.msg_size as i64);
    }

    fn error(&self, err: KafkaError, reason: &str) {
        if matches!(err.rdkafka_error_code(), Some(RDKafkaErrorCode::Fatal)) {
            self.health.fatal.store(true, Ordering::Relaxed);
            self.metrics.kafka_fatal.set(1);
            error!(error = %err, reason, "kafka: fatal producer error");
        } else {
            warn!(error = %err, reason, "kafka client error");
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

pub type Producer = FutureProducer<BridgeContext>;

/// Builds the producer: idempotent, `acks=all`, compressed, ordered per partition across retries
/// (idempotence keeps order with up to 5 requests in flight). In spool mode messages never time
/// out inside librdkafka, so a record cannot fail and be overtaken by a later one of the same key;
/// the spool holds it meanwhile. In kafka mode they time out with the request.
///
/// # Errors
/// librdkafka refuses the configuration.
pub fn producer(
    cfg: &Config,
    bootstrap: &str,
    metrics: Arc<Metrics>,
    health: Arc<KafkaHealth>,
) -> Result<Producer, KafkaError> {
    // Spool mode: never time out (the spool holds the record; order per key stays intact) and batch
    // a little. Kafka mode: a request waits for the acks, so time out with it and do not linger.
    let (message_timeout, linger_ms) = match cfg.delivery.ack {
        AckMode::Spool => (0, 5),
        AckMode::Kafka => (cfg.delivery.kafka_ack_timeout_ms.max(1), 1),
    };
    let mut cc = base_config(bootstrap);
    cc.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("max.in.flight.requests.per.connection", "5")
        .set("compression.type", "lz4")
        .set("linger.ms", linger_ms.to_string())
        .set("message.timeout.ms", message_timeout.to_string())
        .set("statistics.interval.ms", "2000")
        .set("queue.buffering.max.messages", "100000");
    apply_passthrough(&mut cc, &cfg.kafka);
    cc.set_log_level(RDKafkaLogLevel::Info);
    cc.create_with_context(BridgeContext { metrics, health })
}

fn base_config(bootstrap: &str) -> ClientConfig {
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", bootstrap).set("client.id", "huggy-bridge");
    cc
}

fn apply_passthrough(cc: &mut ClientConfig, kafka: &KafkaConfig) {
    for (k, v) in &kafka.librdkafka {
        cc.set(k, v);
    }
}

/// Every topic the configuration can route to: each known type's topic, the fallback and the
/// dead-letter topic.
pub fn routable_topics(cfg: &Config) -> BTreeSet<String> {
    let routes = super::Routes::new(&cfg.kafka);
    let mut topics: BTreeSet<String> =
        crate::event::KnownType::ALL.iter().map(|k| routes.topic_for(&crate::event::EventType::Known(*k))).collect();
    topics.insert(cfg.kafka.fallback_topic.clone());
    topics.insert(cfg.kafka.dead_letter_topic.clone());
    topics
}

/// Outcome of `topics create` for one topic.
#[derive(Debug, PartialEq, Eq)]
pub enum TopicOutcome {
    Created,
    Existed,
}

/// Creates every routable topic with the configured partitions and replication; existing topics
/// are left as they are.
///
/// # Errors
/// The admin request failed, or a topic could not be created for another reason than existing.
pub async fn create_topics(cfg: &Config, bootstrap: &str) -> anyhow::Result<Vec<(String, TopicOutcome)>> {
    let mut cc = base_config(bootstrap);
    apply_passthrough(&mut cc, &cfg.kafka);
    let admin: AdminClient<DefaultClientContext> = cc.create()?;
    let topics = routable_topics(cfg);
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| NewTopic::new(t, cfg.kafka.partitions, TopicReplication::Fixed(cfg.kafka.replication_factor)))
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_millis(cfg.kafka.request_timeout_ms)));
    let results = admin.create_topics(&new, &opts).await?;
    let mut out = Vec::new();
    let mut failures = Vec::new();
    for r in results {
        match r {
            Ok(t) => out.push((t, TopicOutcome::Created)),
            Err((t, RDKafkaErrorCode::TopicAlreadyExists)) => out.push((t, TopicOutcome::Existed)),
            Err((t, code)) => failures.push(format!("{t}: {code}")),
        }
    }
    if failures.is_empty() {
        Ok(out)
    } else {
        anyhow::bail!("topics not created: {}", failures.join(", "))
    }
}

/// The embedded development broker: librdkafka's mock cluster, owned by a thread of its own for the
/// life of the process (the cluster is not `Send`).
pub struct EmbeddedBroker {
    pub bootstrap: String,
    stop: std::sync::mpsc::Sender<()>,
}

impl EmbeddedBroker {
    /// Starts the mock cluster and creates the routable topics on it.
    ///
    /// # Errors
    /// librdkafka could not create the cluster.
    pub fn start(cfg: &Config) -> anyhow::Result<EmbeddedBroker> {
        let topics = routable_topics(cfg);
        let partitions = cfg.kafka.partitions;
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<String, String>>();
        let (stop, stop_rx) = std::sync::mpsc::channel::<()>();
        std::thread::Builder::new().name("embedded-kafka".into()).spawn(move || {
            let cluster = match rdkafka::mocking::MockCluster::new(1) {
                Ok(c) => c,
                Err(e) => {
                    let _ = ready_tx.send(Err(e.to_string()));
                    return;
                }
            };
            for t in &topics {
                if let Err(e) = cluster.create_topic(t, partitions, 1) {
                    let _ = ready_tx.send(Err(format!("creating {t}: {e}")));
                    return;
                }
            }
            let _ = ready_tx.send(Ok(cluster.bootstrap_servers()));
            let _ = stop_rx.recv();
            drop(cluster);
        })?;
        let bootstrap = ready_rx.recv()?.map_err(|e| anyhow::anyhow!("embedded broker failed: {e}"))?;
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

/// Whether an error means the record can never be written to its topic (dead-letter it) rather than
/// "not now" (keep it and try again).
pub fn is_permanent(err: &KafkaError) -> bool {
    use RDKafkaErrorCode::*;
    matches!(
        err.rdkafka_error_code(),
        Some(
            MessageSizeTooLarge
                | InvalidMessageSize
                | MessageBatchTooLarge
                | InvalidRecord
                | InvalidMessage
                | TopicAuthorizationFailed
                | InvalidTopic
                | PolicyViolation
                | UnsupportedCompressionType
        )
    )
}

/// librdkafka's "queue full" when enqueueing: wait and try again.
pub fn is_queue_full(err: &KafkaError) -> bool {
    matches!(err.rdkafka_error_code(), Some(RDKafkaErrorCode::QueueFull))
}
