//! Every metric the daemon exports: name, labels and help in one place. Names follow
//! `huggy_bridge_<what>_<unit>[_total]`; labels come from closed sets (known event types plus
//! `unknown`, fixed outcomes), and every labelled counter starts at zero so `rate()` works at once.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::event::KnownType;

/// Outcomes of a webhook request, the `outcome` label of `huggy_bridge_http_requests_total`.
pub const HTTP_OUTCOMES: &[&str] = &[
    "accepted",
    "handshake",
    "unauthorized",
    "bad_request",
    "too_large",
    "timeout",
    "unavailable",
    "not_found",
    "method_not_allowed",
];

/// Results of a file download, the `result` label of `huggy_bridge_file_downloads_total`.
pub const FILE_RESULTS: &[&str] = &["stored", "failed", "expired", "refused", "too_large", "retried"];

/// Kafka error codes pre-seeded in `huggy_bridge_publish_errors_total` (others appear when met; the
/// label is always an `RDKafkaErrorCode` name, a closed set).
pub const PUBLISH_ERROR_CODES: &[&str] = &[
    "MessageTimedOut",
    "QueueFull",
    "MessageSizeTooLarge",
    "TopicAuthorizationFailed",
    "ClusterAuthorizationFailed",
    "UnknownTopicOrPartition",
    "NotEnoughReplicas",
    "NotEnoughReplicasAfterAppend",
    "RequestTimedOut",
    "NotLeaderForPartition",
    "BrokerTransportFailure",
    "AllBrokersDown",
    "Fatal",
    "OutOfOrderSequenceNumber",
    "InvalidProducerEpoch",
    "PurgeQueue",
    "PurgeInflight",
];

pub struct Metrics {
    pub registry: Registry,
    pub http_requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub events_received: IntCounterVec,
    pub events_duplicate: IntCounter,
    pub events_published: IntCounterVec,
    pub events_dead_lettered: IntCounterVec,
    pub publish_retries: IntCounter,
    pub ack_latency: Histogram,
    pub spool_events: IntGauge,
    pub spool_bytes: IntGauge,
    pub spool_max_bytes: IntGauge,
    pub spool_oldest_age: IntGauge,
    pub file_downloads: IntCounterVec,
    pub file_bytes: IntCounter,
    pub file_headroom: Histogram,
    pub file_queue: IntGauge,
    pub kafka_connected: IntGauge,
    pub kafka_brokers_up: IntGauge,
    pub kafka_queue_messages: IntGauge,
    pub kafka_queue_bytes: IntGauge,
    pub kafka_fatal: IntGauge,
    pub produce_latency: Histogram,
    pub publish_errors: IntCounterVec,
    pub published_bytes: IntCounter,
    pub producer_recreated: IntCounter,
    pub ready: IntGauge,
    pub build_info: IntGaugeVec,
}

fn type_labels() -> impl Iterator<Item = &'static str> {
    KnownType::ALL.iter().map(|k| k.as_str()).chain(std::iter::once("unknown"))
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        macro_rules! reg {
            ($m:expr) => {{
                let m = $m.expect("metric definition is valid");
                registry.register(Box::new(m.clone())).expect("metric registered once");
                m
            }};
        }
        let counter_vec = |name: &str, help: &str, label: &str| IntCounterVec::new(Opts::new(name, help), &[label]);
        let m = Metrics {
            http_requests: reg!(counter_vec(
                "huggy_bridge_http_requests_total",
                "Webhook requests by outcome.",
                "outcome"
            )),
            request_duration: reg!(HistogramVec::new(
                HistogramOpts::new(
                    "huggy_bridge_http_request_duration_seconds",
                    "Webhook request duration, receipt to answer, by outcome."
                )
                .buckets(vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
                &["outcome"]
            )),
            events_received: reg!(counter_vec(
                "huggy_bridge_events_received_total",
                "Events accepted from Huggy, by event type.",
                "type"
            )),
            events_duplicate: reg!(IntCounter::new(
                "huggy_bridge_events_duplicate_total",
                "Events acknowledged but not published again: their id was seen within the dedup window."
            )),
            events_published: reg!(counter_vec(
                "huggy_bridge_events_published_total",
                "Events acknowledged by Kafka on their topic, by event type.",
                "type"
            )),
            events_dead_lettered: reg!(counter_vec(
                "huggy_bridge_events_dead_lettered_total",
                "Events written to the dead-letter topic, by event type.",
                "type"
            )),
            publish_retries: reg!(IntCounter::new(
                "huggy_bridge_publish_retries_total",
                "Records sent again after a retryable Kafka error."
            )),
            ack_latency: reg!(Histogram::with_opts(
                HistogramOpts::new(
                    "huggy_bridge_ack_latency_seconds",
                    "Time from receipt of an event to its acknowledgement by Kafka."
                )
                .buckets(vec![
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 3600.0
                ])
            )),
            spool_events: reg!(IntGauge::new(
                "huggy_bridge_spool_events",
                "Events in the spool not yet acknowledged by Kafka."
            )),
            spool_bytes: reg!(IntGauge::new(
                "huggy_bridge_spool_bytes",
                "Bytes of events in the spool not yet acknowledged by Kafka."
            )),
            spool_max_bytes: reg!(IntGauge::new(
                "huggy_bridge_spool_max_bytes",
                "Configured spool cap (spool.max_bytes); past it the webhook answers 503."
            )),
            spool_oldest_age: reg!(IntGauge::new(
                "huggy_bridge_spool_oldest_age_seconds",
                "Age of the oldest event not yet acknowledged by Kafka (0 when none)."
            )),
            file_downloads: reg!(counter_vec(
                "huggy_bridge_file_downloads_total",
                "File downloads by result.",
                "result"
            )),
            file_bytes: reg!(IntCounter::new("huggy_bridge_file_bytes_total", "Bytes of files stored.")),
            file_headroom: reg!(Histogram::with_opts(
                HistogramOpts::new(
                    "huggy_bridge_file_token_headroom_seconds",
                    "Seconds left before a file URL's access token expires, at download completion."
                )
                .buckets(vec![0.0, 10.0, 30.0, 60.0, 120.0, 240.0, 360.0, 480.0, 540.0, 570.0, 600.0])
            )),
            file_queue: reg!(IntGauge::new("huggy_bridge_file_queue_depth", "Files waiting for or in download.")),
            kafka_connected: reg!(IntGauge::new(
                "huggy_bridge_kafka_connected",
                "1 when at least one Kafka broker connection is up."
            )),
            kafka_brokers_up: reg!(IntGauge::new(
                "huggy_bridge_kafka_brokers_up",
                "Kafka brokers whose connection is up (librdkafka statistics)."
            )),
            kafka_queue_messages: reg!(IntGauge::new(
                "huggy_bridge_kafka_producer_queue_messages",
                "Messages in the librdkafka producer queue (statistics msg_cnt)."
            )),
            kafka_queue_bytes: reg!(IntGauge::new(
                "huggy_bridge_kafka_producer_queue_bytes",
                "Bytes in the librdkafka producer queue (statistics msg_size)."
            )),
            kafka_fatal: reg!(IntGauge::new(
                "huggy_bridge_kafka_fatal_error",
                "1 after librdkafka raised a fatal error (the producer must be restarted)."
            )),
            produce_latency: reg!(Histogram::with_opts(
                HistogramOpts::new(
                    "huggy_bridge_kafka_produce_latency_seconds",
                    "Time from handing a record to librdkafka to its delivery report (acks=all), successful or not."
                )
                .buckets(vec![
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0
                ])
            )),
            publish_errors: reg!(counter_vec(
                "huggy_bridge_publish_errors_total",
                "Records Kafka did not take, by librdkafka error code (RDKafkaErrorCode name).",
                "code"
            )),
            published_bytes: reg!(IntCounter::new(
                "huggy_bridge_published_bytes_total",
                "Bytes of record values acknowledged by Kafka (event topics and the dead-letter topic)."
            )),
            producer_recreated: reg!(IntCounter::new(
                "huggy_bridge_kafka_producer_recreated_total",
                "Producers replaced after a fatal librdkafka error."
            )),
            ready: reg!(IntGauge::new("huggy_bridge_ready", "1 when /readyz answers 200.")),
            build_info: reg!(IntGaugeVec::new(
                Opts::new("huggy_bridge_build_info", "Build information."),
                &["version"]
            )),
            registry: registry.clone(),
        };
        for o in HTTP_OUTCOMES {
            m.http_requests.with_label_values(&[o]);
            m.request_duration.with_label_values(&[o]);
        }
        for t in type_labels() {
            for c in [&m.events_received, &m.events_published, &m.events_dead_lettered] {
                c.with_label_values(&[t]);
            }
        }
        for r in FILE_RESULTS {
            m.file_downloads.with_label_values(&[r]);
        }
        for c in PUBLISH_ERROR_CODES {
            m.publish_errors.with_label_values(&[c]);
        }
        m.build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        m
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::error!(error = %e, "metrics encoding failed");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The sum of a labelled counter over all its labels.
pub fn counter_sum(c: &IntCounterVec) -> u64 {
    use prometheus::core::Collector;
    c.collect().iter().flat_map(|f| f.get_metric()).map(|m| m.get_counter().get_value() as u64).sum()
}
