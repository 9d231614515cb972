//! The durability stage behind the webhook: what must be true before Huggy gets its 2xx, one
//! [`Ingest`] implementation per ack mode. `spool` mode makes the events durable on local disk (the
//! publisher drains them later, and file captures start at once in the background); `kafka` mode
//! captures the events' files and waits until Kafka acknowledged every event, all within
//! `delivery.kafka_ack_timeout_ms`.

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

/// What makes a batch durable before Huggy gets its 2xx, one implementation per ack mode:
/// [`SpoolIngest`] (`delivery.ack = "spool"`) and [`KafkaIngest`] (`"kafka"`); a fake in the
/// handler's tests (which then need no broker and no disk).
pub(crate) trait Ingest: Send + Sync {
    /// Makes the events durable (the events' file URLs are found first, when capture is on) and
    /// counts them.
    ///
    /// # Errors
    /// The events are not durable: the client must be told to retry (503).
    fn accept<'a>(
        &'a self,
        events: Vec<Event>,
        received_at: i64,
        metrics: &'a Metrics,
    ) -> futures::future::BoxFuture<'a, Result<Accepted, IngestError>>;
}

/// Spool mode: durable once the spool's writer has fsync'd the events. Captures start from the
/// durable event (the spool hands it to the capture stage), so nothing here depends on the request
/// still being there once the append is done.
pub(crate) struct SpoolIngest {
    spool: Spool,
    files: Option<Arc<FileCapture>>,
}

impl SpoolIngest {
    /// Appends to `spool`; `files` (when capture is on) finds the events' file URLs.
    pub(crate) fn new(spool: Spool, files: Option<Arc<FileCapture>>) -> SpoolIngest {
        SpoolIngest { spool, files }
    }

    async fn store(&self, mut events: Vec<Event>, received_at: i64) -> Result<Accepted, IngestError> {
        find_files(self.files.as_deref(), &mut events);
        let n = events.len();
        let r = self.spool.append(events, received_at).await.map_err(|e| match e {
            SpoolError::Full { .. } | SpoolError::NoRoom { .. } => IngestError::SpoolFull,
            SpoolError::WriteFailed(e) if crate::spool::is_no_room(&e) => IngestError::SpoolFull,
            other => IngestError::SpoolFailed(other),
        })?;
        if r.duplicates > 0 {
            info!(duplicates = r.duplicates, of = n, "events already seen within the dedup window");
        }
        Ok(Accepted { events: n, duplicates: r.duplicates })
    }
}

impl Ingest for SpoolIngest {
    fn accept<'a>(
        &'a self,
        events: Vec<Event>,
        received_at: i64,
        metrics: &'a Metrics,
    ) -> futures::future::BoxFuture<'a, Result<Accepted, IngestError>> {
        let labels = labels_of(&events);
        Box::pin(async move { self.store(events, received_at).await.inspect(|a| count(metrics, &labels, a)) })
    }
}

/// Kafka mode: durable once Kafka acknowledged every event, the events' files captured first, all
/// within `delivery.kafka_ack_timeout_ms`.
pub(crate) struct KafkaIngest {
    publisher: Arc<Publisher>,
    timeout: Duration,
    files: Option<Arc<FileCapture>>,
}

impl KafkaIngest {
    /// Publishes with `publisher` within `timeout`; `files` (when capture is on) captures the
    /// events' files first.
    pub(crate) fn new(publisher: Arc<Publisher>, timeout: Duration, files: Option<Arc<FileCapture>>) -> KafkaIngest {
        KafkaIngest { publisher, timeout, files }
    }

    /// Captures the events' files within part of the ack budget (the rest is kept for Kafka): a
    /// file not stored by then is reported `failed` with `error: "ack_timeout"` and the event is
    /// published all the same, so a slow or unreachable file host never costs a 503.
    async fn publish(&self, mut events: Vec<Event>, received_at: i64) -> Result<(), IngestError> {
        find_files(self.files.as_deref(), &mut events);
        if let Some(fc) = &self.files {
            let files_budget = self.timeout.saturating_sub((self.timeout / 4).max(Duration::from_secs(1)));
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
        let outcomes = self.publisher.publish_guarded(&refs).await;
        if let Some(Outcome::Retry(why)) = outcomes.iter().find(|o| matches!(o, Outcome::Retry(_))) {
            warn!(%why, "kafka refused part of the batch");
            return Err(IngestError::KafkaUnavailable);
        }
        Ok(())
    }
}

impl Ingest for KafkaIngest {
    fn accept<'a>(
        &'a self,
        events: Vec<Event>,
        received_at: i64,
        metrics: &'a Metrics,
    ) -> futures::future::BoxFuture<'a, Result<Accepted, IngestError>> {
        let labels = labels_of(&events);
        let n = events.len();
        Box::pin(async move {
            tokio::time::timeout(self.timeout, self.publish(events, received_at))
                .await
                .map_err(|_| IngestError::KafkaUnavailable)??;
            let accepted = Accepted { events: n, duplicates: 0 };
            count(metrics, &labels, &accepted);
            Ok(accepted)
        })
    }
}

/// Fills each publishable event's file URLs, when capture is on.
fn find_files(files: Option<&FileCapture>, events: &mut [Event]) {
    if let Some(fc) = files {
        for ev in events.iter_mut().filter(|e| e.dead_letter.is_none()) {
            ev.files = fc.detect(&ev.value);
        }
    }
}

/// The events' type labels, for counting them once they are accepted.
fn labels_of(events: &[Event]) -> Vec<&'static str> {
    events.iter().map(|e| e.event_type.label()).collect()
}

/// Counts an accepted batch: its events by type, and the duplicates among them.
fn count(metrics: &Metrics, labels: &[&'static str], accepted: &Accepted) {
    for l in labels {
        metrics.events_received.with_label_values(&[l]).inc();
    }
    if accepted.duplicates > 0 {
        metrics.events_duplicate.inc_by(accepted.duplicates as u64);
    }
}
