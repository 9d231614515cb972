//! Everything a loaded configuration must pass: values that would make the daemon misbehave
//! rather than fail are refused here, before anything starts ([`Config::validate`]), with every
//! problem of `[kafka]` reported at once.

use std::path::Path;

use super::prefix::Prefix;
use super::{
    AckMode, Config, ConfigError, KafkaConfig, KafkaProblem, SaslMechanism, Secret, MAX_BODY_BYTES_CEILING,
    MIN_BUFFER_BYTES,
};

impl Config {
    /// Rejects values that would make the daemon misbehave rather than fail.
    ///
    /// # Errors
    /// The first setting found wrong (every `[kafka]` problem at once).
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if !self.huggy.has_tokens() {
            return Err(ConfigError::NoTokens);
        }
        self.validate_offline()
    }

    /// Every account has a company id of digits and at least one token, and no token is configured
    /// twice (in two accounts, or in an account and `huggy.tokens`): which company it speaks for
    /// must be clear.
    fn validate_accounts(&self) -> Result<(), ConfigError> {
        let mut seen: std::collections::HashSet<&str> = self.huggy.tokens.iter().map(Secret::expose).collect();
        for (index, a) in self.huggy.accounts.iter().enumerate() {
            let problem = |problem| Err(ConfigError::Account { index, problem });
            if a.company_id.is_empty() || a.company_id.len() > 40 || !a.company_id.bytes().all(|b| b.is_ascii_digit()) {
                return problem("company_id must be a company id (digits)");
            }
            if a.tokens.is_empty() {
                return problem("no tokens (tokens or tokens_file)");
            }
            for t in &a.tokens {
                if !seen.insert(t.expose()) {
                    return problem("a token is configured twice (in two accounts, or also in huggy.tokens)");
                }
            }
        }
        Ok(())
    }

    /// [`Config::validate`] without the webhook's tokens.
    ///
    /// # Errors
    /// As [`Config::validate`], except for missing tokens.
    pub(crate) fn validate_offline(&self) -> Result<(), ConfigError> {
        let positive = |key: &'static str, ok: bool| if ok { Ok(()) } else { Err(ConfigError::NotPositive { key }) };
        if !self.http.path.starts_with('/') {
            return Err(ConfigError::Malformed {
                key: "http.path",
                expected: "start with '/'",
                value: self.http.path.clone(),
            });
        }
        if !is_literal_route(&self.http.path) {
            return Err(ConfigError::Malformed {
                key: "http.path",
                expected: "be a literal path: no segment starting with ':' or '*', no '{' or '}'",
                value: self.http.path.clone(),
            });
        }
        if !is_log_filter(&self.log.level) {
            return Err(ConfigError::Malformed {
                key: "log.level",
                expected: "be a tracing filter: a level (off, error, warn, info, debug, trace) and/or \
                           target=level directives, comma-separated",
                value: self.log.level.clone(),
            });
        }
        self.validate_accounts()?;
        positive("http.max_body_bytes", self.http.max_body_bytes > 0)?;
        if self.http.max_body_bytes > MAX_BODY_BYTES_CEILING {
            return Err(ConfigError::AboveCeiling {
                key: "http.max_body_bytes",
                value: self.http.max_body_bytes as u64,
                ceiling: MAX_BODY_BYTES_CEILING as u64,
                reason: "an event that large would not fit one spool frame (256 MiB with the event's metadata), \
                         and a frame over the limit reads back as damage",
            });
        }
        if self.http.max_inflight_bytes < self.http.max_body_bytes {
            return Err(ConfigError::BelowBound {
                key: "http.max_inflight_bytes",
                value: self.http.max_inflight_bytes as u64,
                bound_key: "http.max_body_bytes",
                bound: self.http.max_body_bytes as u64,
                reason: "a body of the largest accepted size could never be read",
            });
        }
        positive("http.max_connections", self.http.max_connections > 0)?;
        // A zero timeout does not mean "no timeout": every body and TLS handshake would time out.
        positive("http.header_timeout_ms", self.http.header_timeout_ms > 0)?;
        positive("http.body_timeout_ms", self.http.body_timeout_ms > 0)?;
        if self.delivery.ack == AckMode::Kafka {
            // Every batch would be answered 503 without waiting for Kafka.
            positive("delivery.kafka_ack_timeout_ms", self.delivery.kafka_ack_timeout_ms > 0)?;
        }
        if self.http.tls.enabled() {
            for (key, value) in
                [("http.tls.cert_file", &self.http.tls.cert_file), ("http.tls.key_file", &self.http.tls.key_file)]
            {
                if value.is_empty() {
                    return Err(ConfigError::Empty { key });
                }
            }
        }
        if self.http.listen == self.admin.listen {
            return Err(ConfigError::SameListenAddress);
        }
        if self.kafka.brokers.trim().is_empty() {
            return Err(ConfigError::Empty { key: "kafka.brokers" });
        }
        let kafka_problems = self.kafka.problems(self.delivery.ack);
        if !kafka_problems.is_empty() {
            return Err(ConfigError::Kafka(kafka_problems));
        }
        for ty in self.kafka.topics.keys() {
            if crate::event::KnownType::parse_ignore_case(ty).is_none() {
                return Err(ConfigError::UnknownEventType { name: ty.clone() });
            }
        }
        positive("kafka.partitions", self.kafka.partitions >= 1)?;
        positive("kafka.replication_factor", self.kafka.replication_factor >= 1)?;
        positive("kafka.max_in_flight_records", self.kafka.max_in_flight_records > 0)?;
        positive("spool.max_bytes", self.spool.max_bytes > 0)?;
        positive("spool.dedup_max_ids", self.spool.dedup_max_ids > 0)?;
        if self.delivery.ack == AckMode::Spool && self.spool.max_bytes < self.http.max_body_bytes as u64 {
            return Err(ConfigError::BelowBound {
                key: "spool.max_bytes",
                value: self.spool.max_bytes,
                bound_key: "http.max_body_bytes",
                bound: self.http.max_body_bytes as u64,
                reason: "a batch of the largest accepted size could never be stored",
            });
        }
        if self.files.enabled {
            if self.spool.max_undelivered_age_secs <= self.files.token_ttl_secs {
                return Err(ConfigError::AgeWithinTokenTtl {
                    max_undelivered_age_secs: self.spool.max_undelivered_age_secs,
                    token_ttl_secs: self.files.token_ttl_secs,
                });
            }
            positive("files.concurrency", self.files.concurrency > 0)?;
            if !(self.files.store.starts_with("file://") || self.files.store.starts_with("s3://")) {
                return Err(ConfigError::Malformed {
                    key: "files.store",
                    expected: "be file://… or s3://…",
                    value: self.files.store.clone(),
                });
            }
            if self.files.max_concurrency < self.files.concurrency {
                return Err(ConfigError::BelowBound {
                    key: "files.max_concurrency",
                    value: self.files.max_concurrency as u64,
                    bound_key: "files.concurrency",
                    bound: self.files.concurrency as u64,
                    reason: "the floor cannot be above the ceiling",
                });
            }
            if self.files.max_buffer_bytes < MIN_BUFFER_BYTES {
                return Err(ConfigError::Malformed {
                    key: "files.max_buffer_bytes",
                    expected: "be at least 5242880 (one S3 multipart part)",
                    value: self.files.max_buffer_bytes.to_string(),
                });
            }
            for p in &self.files.allowed_url_prefixes {
                if let Err(source) = Prefix::parse(p) {
                    return Err(ConfigError::UrlPrefix { prefix: p.clone(), source });
                }
            }
        }
        Ok(())
    }
}

/// Whether the router takes `path` as the literal path it is. Its syntax gives `{name}` and
/// `{*name}` a meaning (a capture, a wildcard: any path would then be the webhook's), and it refuses
/// a segment starting with `:` or `*` (the old capture syntax) by panicking when the server starts.
fn is_literal_route(path: &str) -> bool {
    !path.contains(['{', '}']) && !path.split('/').any(|segment| segment.starts_with([':', '*']))
}

/// Whether `level` is a filter `log.level` can be: one the tracing filter parses (it would drop a
/// directive it cannot parse, without a word), and without a bare level name of another logging
/// convention. The filter takes a bare word that is not one of its levels as a target: `warning`
/// enables every level for a target named `warning` and nothing else, so no log line at all.
fn is_log_filter(level: &str) -> bool {
    /// Level names of syslog and other loggers that are not tracing's.
    const FOREIGN_LEVELS: &[&str] = &[
        "warning",
        "err",
        "fatal",
        "critical",
        "crit",
        "alert",
        "emerg",
        "emergency",
        "panic",
        "notice",
        "information",
        "informational",
        "verbose",
        "dbg",
        "all",
        "none",
    ];
    tracing_subscriber::EnvFilter::try_new(level).is_ok()
        && !level.split(',').any(|d| FOREIGN_LEVELS.iter().any(|f| d.trim().eq_ignore_ascii_case(f)))
}

impl KafkaConfig {
    /// The problems with `[kafka]`; `ack` decides what the passthrough may hold.
    pub(super) fn problems(&self, ack: AckMode) -> Vec<KafkaProblem> {
        let mut out = Vec::new();
        if !self.topic_template.contains("{event}") {
            out.push(KafkaProblem::TemplateWithoutEvent);
        } else {
            for k in crate::event::KnownType::ALL {
                let t = self.topic_template.replace("{event}", k.as_str());
                if !crate::event::types::is_valid_topic(&t) {
                    out.push(KafkaProblem::TemplateMakesInvalidTopic { topic: t, event: k.as_str() });
                    break;
                }
            }
        }
        let named =
            [("kafka.fallback_topic", &self.fallback_topic), ("kafka.dead_letter_topic", &self.dead_letter_topic)];
        let overrides = self.topics.iter().map(|(k, v)| (k.as_str(), v));
        for (key, t) in named.into_iter().chain(overrides) {
            if !crate::event::types::is_valid_topic(t) {
                out.push(KafkaProblem::InvalidTopic { key: key.to_owned(), topic: t.clone() });
            }
        }
        if let Some(m) = self.min_insync_replicas {
            if m < 1 || m > self.replication_factor {
                out.push(KafkaProblem::MinInsyncReplicas { value: m, replication_factor: self.replication_factor });
            }
        }
        let tls = &self.tls;
        if !tls.enabled {
            if !tls.ca_file.is_empty() || !tls.cert_file.is_empty() || !tls.key_file.is_empty() {
                out.push(KafkaProblem::TlsFilesWithoutTls);
            }
        } else {
            if tls.cert_file.is_empty() != tls.key_file.is_empty() {
                out.push(KafkaProblem::CertWithoutKey);
            }
            for (key, path) in [("ca_file", &tls.ca_file), ("cert_file", &tls.cert_file), ("key_file", &tls.key_file)] {
                if !path.is_empty() && !Path::new(path).is_file() {
                    out.push(KafkaProblem::UnreadableFile { key, path: path.clone() });
                }
            }
        }
        let sasl = &self.sasl;
        match sasl.mechanism {
            SaslMechanism::None if !sasl.username.is_empty() || !sasl.password_is_empty() => {
                out.push(KafkaProblem::SaslWithoutMechanism);
            }
            SaslMechanism::None => {}
            mechanism if sasl.username.is_empty() || sasl.password_is_empty() => {
                out.push(KafkaProblem::SaslIncomplete { mechanism });
            }
            _ => {}
        }
        for (k, v) in &self.librdkafka {
            if let Some(reason) = refused_property(k, v, ack, self) {
                out.push(KafkaProblem::RefusedProperty { property: k.clone(), reason });
            }
        }
        out
    }
}

/// Why a passthrough property is refused, if it is: properties that would break the promise behind
/// a 2xx (every event reaches Kafka, in order per key), or that the bridge sets from its own keys.
pub(crate) fn refused_property(key: &str, value: &str, ack: AckMode, kafka: &KafkaConfig) -> Option<String> {
    let v = value.trim().to_ascii_lowercase();
    let section_owned = |section: &str| format!("set by [{section}]; configure it there");
    match key.trim().to_ascii_lowercase().as_str() {
        "acks" | "request.required.acks" if !matches!(v.as_str(), "all" | "-1") => Some(
            "a 2xx promises the event is on every in-sync replica; the bridge produces with acks=all".into(),
        ),
        "enable.idempotence" if v != "true" => Some(
            "without idempotence a retried request can duplicate or reorder records of one key".into(),
        ),
        "max.in.flight.requests.per.connection" | "max.in.flight" if !v.parse::<u32>().is_ok_and(|n| n <= 5) => {
            Some("above 5 the idempotent producer cannot keep records of one key in order".into())
        }
        "message.timeout.ms" | "delivery.timeout.ms" if ack == AckMode::Spool => Some(
            "in spool mode the bridge sets it (30 s) and re-sends a timed-out record itself, before any later one of its key".into(),
        ),
        "transactional.id" => Some(
            "the bridge never commits a transaction: its records would stay invisible to read_committed consumers".into(),
        ),
        "partitioner" => Some("set by kafka.partitioner (a random partitioner would break per-key order)".into()),
        "enable.gapless.guarantee" if v == "true" => Some(
            "it makes every permanent error (a record too large) fatal for the producer instead of dead-lettering one event".into(),
        ),
        "bootstrap.servers" | "metadata.broker.list" => Some("set by kafka.brokers".into()),
        "statistics.interval.ms" => Some("the bridge's Kafka health reads librdkafka statistics every 2 s".into()),
        "security.protocol" if kafka.tls.enabled || kafka.sasl.mechanism != SaslMechanism::None => {
            Some(section_owned("kafka.tls] / [kafka.sasl"))
        }
        "sasl.mechanism" | "sasl.mechanisms" | "sasl.username" | "sasl.password"
            if kafka.sasl.mechanism != SaslMechanism::None =>
        {
            Some(section_owned("kafka.sasl"))
        }
        "ssl.ca.location" | "ssl.certificate.location" | "ssl.key.location" | "ssl.key.password" if kafka.tls.enabled => {
            Some(section_owned("kafka.tls"))
        }
        _ => None,
    }
}
