//! Publishing: events to Kafka records (topic, key, CloudEvents headers), delivery with retries,
//! dead-lettering of what Kafka can never take, and the loop that drains the spool.

pub mod kafka;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use futures::future::join_all;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureRecord};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::clock::now_secs;
use crate::config::KafkaConfig;
use crate::event::{Event, EventType, KnownType};
use crate::metrics::Metrics;
use crate::spool::{Spool, Stored};
pub use kafka::{KafkaHealth, Producer};

/// Topic routing from the configuration.
#[derive(Debug, Clone)]
pub struct Routes {
    template: String,
    overrides: BTreeMap<String, String>,
    fallback: String,
    pub dead_letter: String,
}

impl Routes {
    pub fn new(cfg: &KafkaConfig) -> Self {
        Routes {
            template: cfg.topic_template.clone(),
            // Keyed by the canonical type name: keys from the environment arrive lowercased.
            overrides: cfg
                .topics
                .iter()
                .filter_map(|(k, v)| KnownType::parse_ignore_case(k).map(|t| (t.as_str().to_owned(), v.clone())))
                .collect(),
            fallback: cfg.fallback_topic.clone(),
            dead_letter: cfg.dead_letter_topic.clone(),
        }
    }

    /// `kafka.topics.<type>` if set, else the template for known types, else the fallback topic.
    pub fn topic_for(&self, t: &EventType) -> String {
        match t {
            EventType::Known(k) => {
                self.overrides.get(k.as_str()).cloned().unwrap_or_else(|| self.template.replace("{event}", k.as_str()))
            }
            EventType::Unknown(_) => self.fallback.clone(),
        }
    }
}

/// The CloudEvents (Kafka binding, binary mode) and bridge headers of an event's record.
pub fn headers(ev: &Event) -> OwnedHeaders {
    let id = ev.id.to_string();
    let (ce_type, source, time) = (ev.ce_type(), ev.ce_source(), ev.ce_time());
    let mut h = OwnedHeaders::new_with_capacity(8)
        .insert(Header { key: "ce_specversion", value: Some("1.0") })
        .insert(Header { key: "ce_id", value: Some(id.as_str()) })
        .insert(Header { key: "ce_type", value: Some(ce_type.as_str()) })
        .insert(Header { key: "ce_source", value: Some(source.as_str()) })
        .insert(Header { key: "ce_time", value: Some(time.as_str()) })
        .insert(Header { key: "content-type", value: Some("application/json") });
    if let Some(orig) = &ev.original_type {
        h = h.insert(Header { key: "huggy_original_type", value: Some(orig.as_str()) });
    }
    h
}

/// How one event ended up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Published,
    DeadLettered,
    /// Not written; worth trying again later.
    Retry(String),
}

pub struct Publisher {
    producer: Producer,
    routes: Routes,
    metrics: Arc<Metrics>,
}

impl Publisher {
    pub fn new(producer: Producer, routes: Routes, metrics: Arc<Metrics>) -> Self {
        Publisher { producer, routes, metrics }
    }

    pub fn producer(&self) -> &Producer {
        &self.producer
    }

    /// Publishes events, enqueueing them in order (so records of one key keep it), then waits for
    /// every delivery. Permanent failures go to the dead-letter topic.
    pub async fn publish_all(&self, events: &[&Event]) -> Vec<Outcome> {
        let mut pending = Vec::with_capacity(events.len());
        for ev in events {
            pending.push(match &ev.dead_letter {
                Some(reason) => Err(PublishError::Malformed(reason.clone())),
                None => self
                    .enqueue(&self.routes.topic_for(&ev.event_type), ev, headers(ev), &ev.value)
                    .await
                    .map_err(PublishError::Kafka),
            });
        }
        let waited = join_all(pending.into_iter().map(|p| async move {
            match p?.await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err((e, _))) => Err(PublishError::Kafka(e)),
                Err(_canceled) => Err(PublishError::Closed),
            }
        }))
        .await;
        let mut out = Vec::with_capacity(events.len());
        for (ev, result) in events.iter().zip(waited) {
            let outcome = match result {
                Ok(()) => {
                    self.metrics.events_published.with_label_values(&[ev.event_type.label()]).inc();
                    Outcome::Published
                }
                Err(PublishError::Malformed(reason)) => self.dead_letter(ev, &reason).await,
                Err(PublishError::Kafka(e)) if kafka::is_permanent(&e) => self.dead_letter(ev, &e.to_string()).await,
                Err(PublishError::Kafka(e)) => Outcome::Retry(e.to_string()),
                Err(PublishError::Closed) => Outcome::Retry("producer closed".into()),
            };
            out.push(outcome);
        }
        out
    }

    /// Sends to the dead-letter topic, with the reason and intended topic as headers. When even that
    /// is refused for good (a record too large for any topic), a stub carrying the event id and the
    /// reason is sent instead, and the loss of the body is logged.
    async fn dead_letter(&self, ev: &Event, reason: &str) -> Outcome {
        let intended = self.routes.topic_for(&ev.event_type);
        let with_reason = |h: OwnedHeaders| {
            h.insert(Header { key: "huggy_dlq_reason", value: Some(reason) })
                .insert(Header { key: "huggy_dlq_topic", value: Some(intended.as_str()) })
        };
        let first = self.deliver(&self.routes.dead_letter, ev, with_reason(headers(ev)), &ev.value).await;
        let result = match first {
            Err(e) if kafka::is_permanent(&e) => {
                error!(event_id = %ev.id, error = %e, bytes = ev.value.len(), "dead-letter topic refused the event; sending a stub without its body");
                let stub = serde_json::json!({"bridge_error": reason, "dlq_error": e.to_string(), "event_id": ev.id.to_string(), "size": ev.value.len()});
                self.deliver(&self.routes.dead_letter, ev, with_reason(headers(ev)), stub.to_string().as_bytes()).await
            }
            other => other,
        };
        match result {
            Ok(()) => {
                warn!(event_id = %ev.id, event_type = %ev.event_type, reason, "event dead-lettered");
                self.metrics.events_dead_lettered.with_label_values(&[ev.event_type.label()]).inc();
                Outcome::DeadLettered
            }
            Err(e) => Outcome::Retry(format!("dead-letter topic: {e}")),
        }
    }

    async fn deliver(&self, topic: &str, ev: &Event, headers: OwnedHeaders, value: &[u8]) -> Result<(), KafkaError> {
        match self.enqueue(topic, ev, headers, value).await?.await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err((e, _))) => Err(e),
            Err(_) => Err(KafkaError::Canceled),
        }
    }

    /// Hands one record to librdkafka, waiting while its queue is full.
    async fn enqueue(
        &self,
        topic: &str,
        ev: &Event,
        headers: OwnedHeaders,
        value: &[u8],
    ) -> Result<DeliveryFuture, KafkaError> {
        let mut wait = Duration::from_millis(1);
        loop {
            let mut rec = FutureRecord::to(topic).payload(value).headers(headers.clone());
            if let Some(k) = &ev.key {
                rec = rec.key(k.as_str());
            }
            match self.producer.send_result(rec) {
                Ok(f) => return Ok(f),
                Err((e, _)) if kafka::is_queue_full(&e) => {
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_millis(100));
                }
                Err((e, _)) => return Err(e),
            }
        }
    }
}

#[derive(Debug)]
enum PublishError {
    /// The bridge itself found the event unpublishable (`Event::dead_letter`).
    Malformed(String),
    Kafka(KafkaError),
    Closed,
}

/// When the spool publisher stops: `soft` after its current window, `hard` at once.
pub struct Stops {
    pub soft: CancellationToken,
    pub hard: CancellationToken,
}

/// Drains the spool into Kafka until cancelled: reads undelivered events in sequence order, publishes
/// a window of them, acknowledges what Kafka took, and retries the rest with exponential backoff
/// (in order, before anything newer).
///
/// An event whose files are still being captured is parked, and so is every later event with the
/// same key (order per key); events of other keys go on. Parked events go first once ready.
pub async fn run_spool_publisher(
    spool: Spool,
    publisher: Arc<Publisher>,
    window: usize,
    metrics: Arc<Metrics>,
    stops: Stops,
    pulse: Arc<crate::health::Pulse>,
) {
    let Stops { soft: stop, hard } = stops;
    let mut reader = spool.reader();
    let committed = spool.committed();
    let retry_policy = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(30))
        .with_jitter()
        .without_max_times();
    let mut parked: Vec<Stored> = Vec::new();
    while !stop.is_cancelled() {
        pulse.beat();
        let notified = committed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let room = window.saturating_sub(parked.len());
        let fresh = match if room > 0 { reader.read_now(room) } else { Ok(Vec::new()) } {
            Ok(b) => b,
            Err(e) => {
                error!(error = %e, "spool read failed; retrying");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    () = stop.cancelled() => break,
                }
            }
        };
        let (ready, still_parked) = release(std::mem::take(&mut parked).into_iter().chain(fresh), &spool);
        parked = still_parked;
        if ready.is_empty() {
            tokio::select! {
                () = &mut notified => continue,
                // Parked events also wait on file results, which the spool announces the same way;
                // the timer only bounds how long a missed wake-up could delay them.
                () = tokio::time::sleep(Duration::from_secs(1)), if !parked.is_empty() => continue,
                () = stop.cancelled() => break,
            }
        }
        let mut todo = ready;
        let mut backoff = retry_policy.build();
        while !todo.is_empty() {
            let refs: Vec<&Event> = todo.iter().map(|s| &s.event).collect();
            let outcomes = tokio::select! {
                o = publisher.publish_all(&refs) => { pulse.beat(); o }
                () = hard.cancelled() => {
                    info!(records = refs.len(), "shutdown while publishing; unacknowledged records stay in the spool");
                    return;
                }
            };
            let now = now_secs();
            let mut done = Vec::new();
            let mut again = Vec::new();
            for (stored, outcome) in todo.into_iter().zip(outcomes) {
                match outcome {
                    Outcome::Published | Outcome::DeadLettered => {
                        metrics.ack_latency.observe((now - stored.received_at).max(0) as f64);
                        done.push(stored.seq);
                    }
                    Outcome::Retry(why) => {
                        debug!(event_id = %stored.event.id, %why, "publish will be retried");
                        again.push(stored);
                    }
                }
            }
            spool.ack(done).await;
            if !again.is_empty() {
                metrics.publish_retries.inc_by(again.len() as u64);
                let delay = backoff.next().unwrap_or(Duration::from_secs(30));
                warn!(records = again.len(), delay_ms = delay.as_millis() as u64, "publishing failed; retrying");
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = stop.cancelled() => {
                        info!(records = again.len(), "shutdown with records still to publish; they stay in the spool");
                        return;
                    }
                }
            }
            todo = again;
        }
    }
}

/// Splits events (in sequence order) into those ready to publish — with their `bridge_files`
/// appended — and those that must wait: files not captured yet, or an earlier event of the same key
/// still waiting.
fn release(events: impl Iterator<Item = Stored>, spool: &Spool) -> (Vec<Stored>, Vec<Stored>) {
    let mut blocked: HashSet<String> = HashSet::new();
    let (mut ready, mut parked) = (Vec::new(), Vec::new());
    for mut s in events {
        if s.event.key.as_ref().is_some_and(|k| blocked.contains(k)) {
            parked.push(s);
            continue;
        }
        if !s.event.files.is_empty() {
            match spool.files_result(s.seq) {
                Some(member) => {
                    s.event.value = crate::event::append_member(&s.event.value, "bridge_files", &member);
                    s.event.files.clear();
                }
                None => {
                    if let Some(k) = &s.event.key {
                        blocked.insert(k.clone());
                    }
                    parked.push(s);
                    continue;
                }
            }
        }
        ready.push(s);
    }
    (ready, parked)
}
