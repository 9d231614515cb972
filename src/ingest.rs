//! The durability stage behind the webhook: what must be true before Huggy gets its 2xx.
//! `spool` mode makes the events durable on local disk (the publisher drains them later, and file
//! captures start at once in the background); `kafka` mode captures the events' files and waits
//! until Kafka acknowledged every event, all within `delivery.kafka_ack_timeout_ms`.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tracing::{info, warn};

use crate::event::Event;
use crate::files::{Completion, FileCapture, FileJob};
use crate::metrics::Metrics;
use crate::publish::{Outcome, Publisher};
use crate::spool::{Spool, SpoolError};

#[derive(Debug, thiserror::Error)]
pub(crate) enum IngestError {
    #[error("spool is full")]
    SpoolFull,
    #[error("spool cannot write")]
    SpoolFailed(#[source] SpoolError),
    #[error("kafka did not acknowledge the batch in time")]
    KafkaUnavailable,
}

impl IngestError {
    /// The short code given to the client.
    pub(crate) fn code(&self) -> &'static str {
        match self {
            IngestError::SpoolFull => "spool_full",
            IngestError::SpoolFailed(_) => "spool_unavailable",
            IngestError::KafkaUnavailable => "kafka_unavailable",
        }
    }
}

/// How a batch was taken in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Accepted {
    /// Events covered by the 2xx (stored, published or dead-lettered, or known duplicates).
    pub(crate) events: usize,
    pub(crate) duplicates: usize,
}

pub(crate) enum Mode {
    Spool(Spool),
    Kafka { publisher: Arc<Publisher>, timeout: Duration },
}

pub(crate) struct Ingest {
    pub(crate) mode: Mode,
    pub(crate) files: Option<Arc<FileCapture>>,
}

/// The seam between the webhook handler and whatever makes a batch durable: [`Ingest`] in the
/// daemon, a fake in the handler's tests (which then need no broker and no disk).
pub(crate) trait Durability: Send + Sync {
    /// Makes the events durable; see [`Ingest::accept`].
    fn accept<'a>(
        &'a self,
        events: Vec<Event>,
        received_at: i64,
        metrics: &'a Metrics,
    ) -> futures::future::BoxFuture<'a, Result<Accepted, IngestError>>;
}

impl Durability for Ingest {
    fn accept<'a>(
        &'a self,
        events: Vec<Event>,
        received_at: i64,
        metrics: &'a Metrics,
    ) -> futures::future::BoxFuture<'a, Result<Accepted, IngestError>> {
        Box::pin(Ingest::accept(self, events, received_at, metrics))
    }
}

impl Ingest {
    /// Makes the events durable according to the ack mode.
    ///
    /// # Errors
    /// The events are not durable: the client must be told to retry (503).
    pub(crate) async fn accept(
        &self,
        mut events: Vec<Event>,
        received_at: i64,
        metrics: &Metrics,
    ) -> Result<Accepted, IngestError> {
        let n = events.len();
        if let Some(fc) = &self.files {
            for ev in events.iter_mut().filter(|e| e.dead_letter.is_none()) {
                ev.files = fc.detect(&ev.value);
            }
        }
        let labels: Vec<&'static str> = events.iter().map(|e| e.event_type.label()).collect();
        let accepted = match &self.mode {
            Mode::Spool(spool) => self.store_in_spool(spool, events, received_at).await?,
            Mode::Kafka { publisher, timeout } => {
                tokio::time::timeout(*timeout, self.publish_to_kafka(publisher, events, received_at, *timeout))
                    .await
                    .map_err(|_| IngestError::KafkaUnavailable)??;
                Accepted { events: n, duplicates: 0 }
            }
        };
        for l in labels {
            metrics.events_received.with_label_values(&[l]).inc();
        }
        if accepted.duplicates > 0 {
            metrics.events_duplicate.inc_by(accepted.duplicates as u64);
        }
        Ok(accepted)
    }

    async fn store_in_spool(
        &self,
        spool: &Spool,
        events: Vec<Event>,
        received_at: i64,
    ) -> Result<Accepted, IngestError> {
        let n = events.len();
        // Captures start from the durable event (the spool hands it to the capture stage), so
        // nothing here depends on this request still being there once the append is done.
        let r = spool.append(events, received_at).await.map_err(|e| match e {
            SpoolError::Full { .. } | SpoolError::NoRoom { .. } => IngestError::SpoolFull,
            SpoolError::WriteFailed(e) if crate::spool::is_no_room(&e) => IngestError::SpoolFull,
            other => IngestError::SpoolFailed(other),
        })?;
        if r.duplicates > 0 {
            info!(duplicates = r.duplicates, of = n, "events already seen within the dedup window");
        }
        Ok(Accepted { events: n, duplicates: r.duplicates })
    }

    /// Captures the events' files within part of the ack budget `timeout` (the rest is kept for
    /// Kafka): a file not stored by then is reported `failed` with `error: "ack_timeout"` and the
    /// event is published all the same, so a slow or unreachable file host never costs a 503.
    async fn publish_to_kafka(
        &self,
        publisher: &Publisher,
        mut events: Vec<Event>,
        received_at: i64,
        timeout: Duration,
    ) -> Result<(), IngestError> {
        if let Some(fc) = &self.files {
            let files_budget = timeout.saturating_sub((timeout / 4).max(Duration::from_secs(1)));
            let mut waits = Vec::new();
            for (i, ev) in events.iter().enumerate().filter(|(_, e)| !e.files.is_empty()) {
                let (tx, rx) = oneshot::channel();
                let job = FileJob {
                    event_id: ev.id,
                    company: ev.company.clone(),
                    received_at,
                    urls: ev.files.clone(),
                    completion: Completion::Reply(tx),
                };
                fc.submit_within(job, files_budget);
                waits.push((i, rx));
            }
            for (i, rx) in waits {
                let results = rx.await.map_err(|_| IngestError::KafkaUnavailable)?;
                let ev = &mut events[i];
                ev.file_results = Some(String::from_utf8_lossy(&results).into_owned());
                ev.files.clear();
            }
        }
        let refs: Vec<&Event> = events.iter().collect();
        let outcomes = publisher.publish_guarded(&refs).await;
        if let Some(Outcome::Retry(why)) = outcomes.iter().find(|o| matches!(o, Outcome::Retry(_))) {
            warn!(%why, "kafka refused part of the batch");
            return Err(IngestError::KafkaUnavailable);
        }
        Ok(())
    }
}
