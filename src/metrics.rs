//! Every metric the daemon exports: name, labels and help in one place. Names follow
//! `huggy_bridge_<what>_<unit>[_total]`; labels come from closed sets (known event types plus
//! `unknown`, fixed outcomes), and every labelled counter starts at zero so `rate()` works at once.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::event::KnownType;

/// Declares a closed set of label values: the enum the call sites use and the list the registry
/// pre-seeds come from one declaration, so they cannot drift apart.
macro_rules! labels {
    ($(#[$doc:meta])* $name:ident { $($variant:ident => $label:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub(crate) enum $name { $($variant),+ }

        impl $name {
            /// Every value, for pre-seeding the label.
            pub(crate) const ALL: &[$name] = &[$($name::$variant),+];

            /// The label value.
            pub(crate) fn label(self) -> &'static str {
                match self { $($name::$variant => $label),+ }
            }
        }
    };
}

labels! {
    /// Outcome of a webhook request, the `outcome` label of `huggy_bridge_http_requests_total`.
    HttpOutcome {
        Accepted => "accepted",
        Handshake => "handshake",
        Unauthorized => "unauthorized",
        BadRequest => "bad_request",
        TooLarge => "too_large",
        Timeout => "timeout",
        Unavailable => "unavailable",
        Overloaded => "overloaded",
        NotFound => "not_found",
        MethodNotAllowed => "method_not_allowed",
    }
}

labels! {
    /// Where a claim check went, the `topic` label of `huggy_bridge_claim_checks_total`.
    ClaimTopic {
        Event => "event",
        DeadLetter => "dead_letter",
    }
}

labels! {
    /// Final result of a file, the `result` label of `huggy_bridge_file_downloads_total`: each file is
    /// counted once, under one of these (retries are counted apart, in
    /// `huggy_bridge_file_download_retries_total`).
    FileOutcome {
        Stored => "stored",
        Failed => "failed",
        Expired => "expired",
        Refused => "refused",
        TooLarge => "too_large",
        AckTimeout => "ack_timeout",
    }
}

labels! {
    /// A supervised background stage, the `stage` label of `huggy_bridge_stage_restarts_total`.
    Stage {
        Publisher => "publisher",
        KafkaProbe => "kafka_probe",
        FileFeed => "file_feed",
        FileResults => "file_results",
        FileDispatch => "file_dispatch",
        // The spool's janitor thread: its chores run under `catch_unwind`, so a panic costs the
        // chore, not the thread.
        Janitor => "janitor",
    }
}

labels! {
    /// Result of a configuration reload, the `result` label of `huggy_bridge_config_reloads_total`.
    ReloadResult {
        Applied => "applied",
        Rejected => "rejected",
    }
}

labels! {
    /// Why a connection to the TLS listener was not served, the `reason` label of
    /// `huggy_bridge_tls_connections_refused_total`.
    TlsRefusal {
        Plaintext => "plaintext",
        Timeout => "timeout",
        Failed => "failed",
    }
}

/// Kafka error codes pre-seeded in `huggy_bridge_publish_errors_total` (others appear when met; the
/// label is always an `RDKafkaErrorCode` name, a closed set).
pub(crate) const PUBLISH_ERROR_CODES: &[&str] = &[
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

/// Every metric of the daemon, registered in one registry; cheap to share (`Arc`), updated by every
/// stage and rendered by `/metrics`.
pub struct Metrics {
    registry: Registry,
    pub(crate) http_requests: IntCounterVec,
    request_duration: HistogramVec,
    pub(crate) http_inflight_body_bytes: IntGauge,
    /// `huggy_bridge_events_received_total`: events accepted from Huggy, by type.
    pub events_received: IntCounterVec,
    /// `huggy_bridge_events_duplicate_total`: events acknowledged but not stored again (dedup window).
    pub events_duplicate: IntCounter,
    /// `huggy_bridge_events_published_total`: events Kafka acknowledged on their topic, by type.
    pub events_published: IntCounterVec,
    /// `huggy_bridge_events_dead_lettered_total`: events written to the dead-letter topic, by type.
    pub events_dead_lettered: IntCounterVec,
    /// `huggy_bridge_publish_retries_total`: records sent again after a retryable Kafka error.
    pub publish_retries: IntCounter,
    pub(crate) ack_latency: Histogram,
    /// `huggy_bridge_spool_events`: events in the spool Kafka has not acknowledged yet.
    pub spool_events: IntGauge,
    pub(crate) spool_bytes: IntGauge,
    pub(crate) spool_max_bytes: IntGauge,
    pub(crate) spool_oldest_age: IntGauge,
    pub(crate) spool_disk_bytes: IntGauge,
    pub(crate) spool_fs_free_bytes: IntGauge,
    pub(crate) spool_fsync_duration: Histogram,
    pub(crate) spool_damaged: IntCounter,
    pub(crate) spool_pending_files: IntGauge,
    pub(crate) live: IntGauge,
    /// `huggy_bridge_file_downloads_total`: final result of each file, by `result`.
    pub file_downloads: IntCounterVec,
    pub(crate) file_bytes: IntCounter,
    /// `huggy_bridge_file_token_headroom_seconds`: token lifetime left when a download completed.
    pub file_headroom: Histogram,
    pub(crate) file_queue: IntGauge,
    pub(crate) file_retries: IntCounter,
    /// `huggy_bridge_file_download_concurrency`: downloads running now.
    pub file_concurrency: IntGauge,
    /// `huggy_bridge_file_download_concurrency_limit`: downloads allowed at once now.
    pub file_concurrency_limit: IntGauge,
    /// `huggy_bridge_file_download_saturated`: 1 while more connections stopped raising throughput.
    pub file_saturated: IntGauge,
    /// `huggy_bridge_files_at_risk`: queued files projected to miss their deadline.
    pub files_at_risk: IntGauge,
    pub(crate) file_store_free: IntGauge,
    /// `huggy_bridge_file_buffer_bytes`: memory reserved by running downloads (≤ files.max_buffer_bytes).
    pub file_buffer: IntGauge,
    pub(crate) kafka_connected: IntGauge,
    pub(crate) kafka_brokers_up: IntGauge,
    pub(crate) kafka_queue_messages: IntGauge,
    pub(crate) kafka_queue_bytes: IntGauge,
    /// `huggy_bridge_kafka_transmitted_bytes`: bytes the current producer sent to brokers (requests
    /// on the wire, compressed), from librdkafka's statistics.
    pub kafka_transmitted_bytes: IntGauge,
    /// `huggy_bridge_kafka_fatal_error`: 1 after librdkafka raised a fatal error.
    pub kafka_fatal: IntGauge,
    pub(crate) produce_latency: Histogram,
    /// `huggy_bridge_publish_errors_total`: records Kafka did not take, by librdkafka error code.
    pub publish_errors: IntCounterVec,
    pub(crate) published_bytes: IntCounter,
    /// `huggy_bridge_kafka_producer_recreated_total`: producers replaced after a fatal error.
    pub producer_recreated: IntCounter,
    /// `huggy_bridge_claim_checks_total`: events too large for their topic, stored in the file store
    /// and published as a claim check, by `topic` (`event` or `dead_letter`).
    pub claim_checks: IntCounterVec,
    /// `huggy_bridge_claim_check_bytes_total`: bytes of the events stored as claim checks.
    pub claim_check_bytes: IntCounter,
    /// `huggy_bridge_dead_letters_replayed_total`: dead-lettered records republished by
    /// `dead-letter replay`.
    pub dead_letters_replayed: IntCounter,
    pub(crate) ready: IntGauge,
    /// `huggy_bridge_publish_stalled_keys`: keys whose last publish failed, waiting out a backoff.
    pub publish_stalled_keys: IntGauge,
    /// `huggy_bridge_stage_restarts_total`: background stages restarted after a panic, by stage.
    pub stage_restarts: IntCounterVec,
    /// `huggy_bridge_config_reloads_total`: reloads (SIGHUP) by `result`.
    pub config_reloads: IntCounterVec,
    /// `huggy_bridge_tls_cert_expiry_timestamp_seconds`: the serving certificate's `notAfter`.
    pub tls_cert_expiry: IntGauge,
    /// `huggy_bridge_tls_reloads_total`: certificate re-reads by `result`.
    pub tls_reloads: IntCounterVec,
    /// `huggy_bridge_tls_connections_refused_total`: connections not served, by `reason`.
    pub tls_refused: IntCounterVec,
    build_info: IntGaugeVec,
}

fn type_labels() -> impl Iterator<Item = &'static str> {
    KnownType::ALL.iter().map(|k| k.as_str()).chain(std::iter::once("unknown"))
}

impl Metrics {
    /// Counts a webhook request and its duration under its outcome.
    pub(crate) fn observe_request(&self, outcome: HttpOutcome, secs: f64) {
        self.http_requests.with_label_values(&[outcome.label()]).inc();
        self.request_duration.with_label_values(&[outcome.label()]).observe(secs);
    }

    /// Counts a file's final result.
    pub(crate) fn count_file(&self, outcome: FileOutcome) {
        self.file_downloads.with_label_values(&[outcome.label()]).inc();
    }

    /// Registers every metric, with every label value of a closed set at zero.
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
            http_inflight_body_bytes: reg!(IntGauge::new(
                "huggy_bridge_http_inflight_body_bytes",
                "Request-body bytes held by requests being read or handled; at http.max_inflight_bytes new requests get 503."
            )),
            events_received: reg!(counter_vec(
                "huggy_bridge_events_received_total",
                "Events accepted from Huggy, by event type.",
                "type"
            )),
            events_duplicate: reg!(IntCounter::new(
                "huggy_bridge_events_duplicate_total",
                "Events acknowledged but not published again: a re-send (their id was stored within the dedup window, and their stream's last batch carried them too)."
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
            spool_disk_bytes: reg!(IntGauge::new(
                "huggy_bridge_spool_disk_bytes",
                "Bytes the spool holds on disk (segments, delivered events included until their segment is deleted, and the dedup journal); spool.max_bytes caps this."
            )),
            spool_fs_free_bytes: reg!(IntGauge::new(
                "huggy_bridge_spool_fs_free_bytes",
                "Free bytes on the filesystem of spool.dir (for unprivileged users)."
            )),
            spool_fsync_duration: reg!(Histogram::with_opts(
                HistogramOpts::new(
                    "huggy_bridge_spool_fsync_duration_seconds",
                    "Duration of each group commit's fdatasync."
                )
                .buckets(vec![0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0])
            )),
            spool_damaged: reg!(IntCounter::new(
                "huggy_bridge_spool_damaged_frames_total",
                "Damaged regions (one or more frames that do not checksum) found in spool segments at start-up; the segment is copied into spool.dir/damaged."
            )),
            spool_pending_files: reg!(IntGauge::new(
                "huggy_bridge_spool_pending_file_captures",
                "Durable events waiting for their files to be captured before they are published."
            )),
            live: reg!(IntGauge::new("huggy_bridge_live", "1 when /healthz answers 200.")),
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
            file_retries: reg!(IntCounter::new(
                "huggy_bridge_file_download_retries_total",
                "File download attempts that failed and were retried (not final results)."
            )),
            file_concurrency: reg!(IntGauge::new(
                "huggy_bridge_file_download_concurrency",
                "File downloads running now."
            )),
            file_concurrency_limit: reg!(IntGauge::new(
                "huggy_bridge_file_download_concurrency_limit",
                "Downloads allowed at once now: files.concurrency, raised towards files.max_concurrency under deadline pressure."
            )),
            file_saturated: reg!(IntGauge::new(
                "huggy_bridge_file_download_saturated",
                "1 while more connections no longer raised the file hosts' throughput (growth paused)."
            )),
            files_at_risk: reg!(IntGauge::new(
                "huggy_bridge_files_at_risk",
                "Queued files projected to miss their token's deadline at the current concurrency."
            )),
            file_store_free: reg!(IntGauge::new(
                "huggy_bridge_file_store_fs_free_bytes",
                "Bytes available to the daemon on the filesystem of a file:// store (-1 for an s3:// store)."
            )),
            file_buffer: reg!(IntGauge::new(
                "huggy_bridge_file_buffer_bytes",
                "Upload buffer bytes reserved by running file downloads; at most files.max_buffer_bytes."
            )),
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
            kafka_transmitted_bytes: reg!(IntGauge::new(
                "huggy_bridge_kafka_transmitted_bytes",
                "Bytes the current Kafka producer sent to brokers (requests as on the wire, records compressed), from librdkafka statistics; starts over when the producer is replaced."
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
            claim_checks: reg!(counter_vec(
                "huggy_bridge_claim_checks_total",
                "Events too large for their topic, stored in the file store and published as a claim check, by topic kind (event, dead_letter).",
                "topic"
            )),
            claim_check_bytes: reg!(IntCounter::new(
                "huggy_bridge_claim_check_bytes_total",
                "Bytes of the events stored in the file store as claim checks."
            )),
            dead_letters_replayed: reg!(IntCounter::new(
                "huggy_bridge_dead_letters_replayed_total",
                "Dead-lettered records republished to their topic by `dead-letter replay`."
            )),
            ready: reg!(IntGauge::new("huggy_bridge_ready", "1 when /readyz answers 200.")),
            publish_stalled_keys: reg!(IntGauge::new(
                "huggy_bridge_publish_stalled_keys",
                "Keys (chats, companies) whose last publish failed and that wait out their own backoff; the other keys go on."
            )),
            stage_restarts: reg!(counter_vec(
                "huggy_bridge_stage_restarts_total",
                "Background stages restarted after a panic, by stage (publisher, kafka_probe, file_feed, file_results, file_dispatch).",
                "stage"
            )),
            config_reloads: reg!(counter_vec(
                "huggy_bridge_config_reloads_total",
                "Configuration reloads (SIGHUP) by result: applied, or rejected with the old configuration kept.",
                "result"
            )),
            tls_cert_expiry: reg!(IntGauge::new(
                "huggy_bridge_tls_cert_expiry_timestamp_seconds",
                "notAfter of the certificate the public listener serves (Unix seconds); 0 without [http.tls]."
            )),
            tls_reloads: reg!(counter_vec(
                "huggy_bridge_tls_reloads_total",
                "Re-reads of the [http.tls] certificate and key by result: applied, or rejected with the old pair kept.",
                "result"
            )),
            tls_refused: reg!(counter_vec(
                "huggy_bridge_tls_connections_refused_total",
                "Connections to the TLS listener not served, by reason: plaintext (plain HTTP, answered 400), timeout (no handshake in time), failed (handshake error).",
                "reason"
            )),
            build_info: reg!(IntGaugeVec::new(
                Opts::new(
                    "huggy_bridge_build_info",
                    "1, labelled with the running build: version, commit and the spool format it writes."
                ),
                &["version", "commit", "spool_format"]
            )),
            registry: registry.clone(),
        };
        for o in HttpOutcome::ALL {
            m.http_requests.with_label_values(&[o.label()]);
            m.request_duration.with_label_values(&[o.label()]);
        }
        for t in type_labels() {
            for c in [&m.events_received, &m.events_published, &m.events_dead_lettered] {
                c.with_label_values(&[t]);
            }
        }
        for r in FileOutcome::ALL {
            m.file_downloads.with_label_values(&[r.label()]);
        }
        for s in Stage::ALL {
            m.stage_restarts.with_label_values(&[s.label()]);
        }
        for k in ClaimTopic::ALL {
            m.claim_checks.with_label_values(&[k.label()]);
        }
        for r in ReloadResult::ALL {
            m.config_reloads.with_label_values(&[r.label()]);
        }
        for r in ReloadResult::ALL {
            m.tls_reloads.with_label_values(&[r.label()]);
        }
        for r in TlsRefusal::ALL {
            m.tls_refused.with_label_values(&[r.label()]);
        }
        for c in PUBLISH_ERROR_CODES {
            m.publish_errors.with_label_values(&[c]);
        }
        m.build_info
            .with_label_values(&[
                crate::build_info::VERSION,
                crate::build_info::COMMIT,
                &crate::build_info::SPOOL_FORMAT.to_string(),
            ])
            .set(1);
        // process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds, … (from /proc).
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))
            .expect("process collector registered once");
        m
    }

    /// The Prometheus text exposition of every metric.
    pub(crate) fn render(&self) -> String {
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
