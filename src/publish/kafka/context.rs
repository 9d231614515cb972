//! The producer's librdkafka context and the reachability probe: what librdkafka says of the
//! connection (statistics, errors, logs) becomes metrics and the Kafka state in
//! [`KafkaHealth`], which readiness and liveness read.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{Producer as _, ProducerContext};
use rdkafka::statistics::Statistics;
use rdkafka::ClientContext;
use tracing::{error, info, warn};

use super::Producer;
use crate::health::KafkaHealth;
use crate::metrics::Metrics;

/// The producer's librdkafka context: statistics and errors become metrics and [`KafkaHealth`].
pub(crate) struct BridgeContext {
    metrics: Arc<Metrics>,
    health: Arc<KafkaHealth>,
}

impl BridgeContext {
    /// A context that reports into `metrics` and `health`.
    pub(super) fn new(metrics: Arc<Metrics>, health: Arc<KafkaHealth>) -> Self {
        BridgeContext { metrics, health }
    }
}

impl ClientContext for BridgeContext {
    fn stats(&self, stats: Statistics) {
        let up = stats.brokers.values().filter(|b| b.state == "UP" && b.nodeid >= 0).count();
        self.metrics.kafka_brokers_up.set(up as i64);
        self.metrics.kafka_queue_messages.set(stats.msg_cnt as i64);
        self.metrics.kafka_queue_bytes.set(stats.msg_size as i64);
        self.metrics.kafka_transmitted_bytes.set(stats.tx_bytes);
        self.health.record_statistics(up);
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
