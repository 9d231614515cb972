//! `[delivery]`: when the webhook answers 2xx, and so what that answer promises.

use serde::{Deserialize, Serialize};

/// When the webhook answers 2xx (`delivery.ack`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AckMode {
    /// 2xx once the batch is fsync'd to the local spool.
    Spool,
    /// 2xx once Kafka acknowledged every event of the batch (`acks=all`).
    Kafka,
}

/// `[delivery]`: what a 2xx promises.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    /// `spool` (after the local fsync) or `kafka` (after Kafka acknowledged every event).
    pub ack: AckMode,
    /// In `kafka` mode: how long a request waits for Kafka before answering 503.
    pub kafka_ack_timeout_ms: u64,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self { ack: AckMode::Spool, kafka_ack_timeout_ms: 10_000 }
    }
}
