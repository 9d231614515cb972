//! The durability stage behind the webhook: what must be true before Huggy gets its 2xx.
//! `spool` mode makes the events durable on local disk (the publisher drains them later);
//! `kafka` mode waits until Kafka acknowledged every one of them.

use std::sync::Arc;
use std::time::Duration;

use tracing::warn;

use crate::event::Event;
use crate::metrics::Metrics;
use crate::publish::{Outcome, Publisher};
use crate::spool::{Spool, SpoolError};

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("spool is full")]
    SpoolFull,
    #[error("spool cannot write: {0}")]
    SpoolFailed(String),
    #[error("kafka did not acknowledge the batch in time")]
    KafkaUnavailable,
}

impl IngestError {
    /// The short code given to the client.
    pub fn code(&self) -> &'static str {
        match self {
            IngestError::SpoolFull => "spool_full",
            IngestError::SpoolFailed(_) => "spool_unavailable",
            IngestError::KafkaUnavailable => "kafka_unavailable",
        }
    }
}

/// How a batch was taken in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Accepted {
    /// Events covered by the 2xx (stored, published or dead-lettered, or known duplicates).
    pub events: usize,
    pub duplicates: usize,
}

pub enum Ingest {
    Spool(Spool),
    Kafka { publisher: Arc<Publisher>, timeout: Duration },
}

impl Ingest {
    /// Makes the events durable according to the ack mode.
    ///
    /// # Errors
    /// The events are not durable: the client must be told to retry (503).
    pub async fn accept(&self, events: Vec<Event>, received_at: i64, metrics: &Metrics) -> Result<Accepted, IngestError> {
        let n = events.len();
        let labels: Vec<&'static str> = events.iter().map(|e| e.event_type.label()).collect();
        let accepted = match self {
            Ingest::Spool(spool) => {
                let ids: Vec<_> = events.iter().map(|e| e.id).collect();
                let r = spool.append(events, received_at).await.map_err(|e| match e {
                    SpoolError::Full { .. } => IngestError::SpoolFull,
                    other => IngestError::SpoolFailed(other.to_string()),
                })?;
                if r.duplicates > 0 {
                    tracing::info!(duplicates = r.duplicates, of = ids.len(), "events already seen within the dedup window");
                }
                Accepted { events: n, duplicates: r.duplicates }
            }
            Ingest::Kafka { publisher, timeout } => {
                let refs: Vec<&Event> = events.iter().collect();
                let outcomes = tokio::time::timeout(*timeout, publisher.publish_all(&refs))
                    .await
                    .map_err(|_| IngestError::KafkaUnavailable)?;
                if let Some(Outcome::Retry(why)) = outcomes.iter().find(|o| matches!(o, Outcome::Retry(_))) {
                    warn!(%why, "kafka refused part of the batch");
                    return Err(IngestError::KafkaUnavailable);
                }
                Accepted { events: n, duplicates: 0 }
            }
        };
        for l in labels {
            metrics.events_received.with_label_values(&[l]).inc();
        }
        Ok(accepted)
    }
}
