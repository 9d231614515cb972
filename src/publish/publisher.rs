//! The publisher: events to Kafka records, sent in order and awaited, with dead-lettering of what
//! Kafka can never take and replacement of a producer that broke for good.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use futures::future::join_all;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureRecord, Producer as _};
use tracing::{error, info, warn};

use super::kafka::{self, ErrorClass, Producer};
use super::{claim, headers, stale, Outcome, Poison, RetryReason, Routes};
use crate::event::Event;
use crate::health::KafkaHealth;
use crate::metrics::Metrics;

/// How the publisher replaces a producer that librdkafka declared fatally broken.
pub(crate) struct Recreate {
    pub(crate) health: Arc<KafkaHealth>,
    pub(crate) make: Box<dyn Fn() -> Result<Producer, KafkaError> + Send + Sync>,
}

/// Pacing of producer replacements, so that a fault which breaks every fresh producer at once (a
/// cluster ACL) does not spin.
struct Recreation {
    not_before: Option<Instant>,
    delay: Duration,
    last: Option<Instant>,
}

const RECREATE_MIN_DELAY: Duration = Duration::from_secs(1);
const RECREATE_MAX_DELAY: Duration = Duration::from_secs(60);

/// Writes events to Kafka: the one producer in use, how to replace it, routing, claim checks.
pub(crate) struct Publisher {
    producer: RwLock<Arc<Producer>>,
    recreate: Option<Recreate>,
    recreation: tokio::sync::Mutex<Recreation>,
    pub(super) routes: Routes,
    pub(super) claims: claim::ClaimChecks,
    pub(super) metrics: Arc<Metrics>,
    pub(super) poison: Option<Poison>,
    staleness: stale::Staleness,
}

impl Publisher {
    /// The daemon's publisher for `cfg`: its producer, replaced when it fails fatally (fenced
    /// idempotence, …) by a fresh one made the same way (the spool still holds every
    /// unacknowledged event), routing, and claim checks against the topics' size limits. The limits
    /// are returned unread: reading them (`TopicLimits::refresh`) is the caller's to start in the
    /// background, so that an unreachable Kafka does not delay the start.
    ///
    /// # Errors
    /// librdkafka refused the producer's configuration.
    pub(crate) fn for_config(
        cfg: &crate::config::Config,
        bootstrap: &str,
        metrics: &Arc<Metrics>,
        health: &Arc<KafkaHealth>,
    ) -> Result<(Publisher, Arc<claim::TopicLimits>), KafkaError> {
        let producer = kafka::producer(cfg, bootstrap, metrics.clone(), health.clone())?;
        let recreate = Recreate {
            health: health.clone(),
            make: Box::new({
                let (cfg, bootstrap, metrics, health) =
                    (cfg.clone(), bootstrap.to_owned(), metrics.clone(), health.clone());
                move || kafka::producer(&cfg, &bootstrap, metrics.clone(), health.clone())
            }),
        };
        let topics = kafka::routable_topics(cfg).into_iter().collect();
        let limits = Arc::new(claim::TopicLimits::unread(cfg, bootstrap, topics));
        let claims = claim::ClaimChecks::new(cfg, limits.clone(), metrics.clone());
        let publisher = Publisher::new(producer, Routes::new(&cfg.kafka), metrics.clone())
            .recreating_with(recreate)
            .with_claim_checks(claims);
        Ok((publisher, limits))
    }

    pub(crate) fn new(producer: Producer, routes: Routes, metrics: Arc<Metrics>) -> Self {
        Publisher {
            producer: RwLock::new(Arc::new(producer)),
            recreate: None,
            recreation: tokio::sync::Mutex::new(Recreation { not_before: None, delay: RECREATE_MIN_DELAY, last: None }),
            routes,
            claims: claim::ClaimChecks::new(
                &crate::config::Config::default(),
                Arc::new(claim::TopicLimits::fixed(claim::DEFAULT_MAX_MESSAGE_BYTES)),
                metrics.clone(),
            ),
            metrics,
            poison: None,
            staleness: stale::Staleness::default(),
        }
    }

    /// Decides record sizes and stores claim checks with `claims` (else: Kafka's default limit,
    /// claim checks in the default file store).
    pub(crate) fn with_claim_checks(mut self, claims: claim::ClaimChecks) -> Self {
        self.claims = claims;
        self
    }

    /// Lets the publisher replace its producer after a fatal error (else such an error is final).
    pub(crate) fn recreating_with(mut self, recreate: Recreate) -> Self {
        self.recreate = Some(recreate);
        self
    }

    /// The producer in use now.
    pub(crate) fn producer(&self) -> Arc<Producer> {
        match self.producer.read() {
            Ok(p) => p.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Replaces the producer if librdkafka declared it fatally broken (paced; see `usable_producer`).
    pub(crate) async fn heal(&self) {
        let _ = self.usable_producer().await;
    }

    /// The producer to send with: the current one, or a fresh one when librdkafka declared the
    /// current one fatally broken. Unacknowledged records are not lost with the old one: their
    /// events come back as [`Outcome::Retry`] and stay in the spool (or get a 503 in kafka mode).
    ///
    /// # Errors
    /// The producer is broken and may not (yet) or cannot be replaced.
    pub(super) async fn usable_producer(&self) -> Result<Arc<Producer>, RetryReason> {
        let current = self.producer();
        // A fatally broken producer cannot send at all; a stale one (the broker lost its state, see
        // `stale`) is used until it may be replaced.
        let (code, reason, fatal_now) = match current.client().fatal_error() {
            Some((code, reason)) => (code, reason, true),
            None => match self.recreate.as_ref().and_then(|r| self.staleness.stale(r.health.is_reachable())) {
                Some((code, reason)) => (code, reason, false),
                None => return Ok(current),
            },
        };
        let fatal = KafkaError::Global(code);
        let Some(recreate) = &self.recreate else { return Err(RetryReason::Fatal(fatal)) };
        let mut pace = self.recreation.lock().await;
        let now_current = self.producer();
        if !Arc::ptr_eq(&now_current, &current) {
            return Ok(now_current); // replaced while this call waited
        }
        if pace.not_before.is_some_and(|t| Instant::now() < t) {
            return if fatal_now { Err(RetryReason::Fatal(fatal)) } else { Ok(current) };
        }
        // A producer that broke soon after the last replacement doubles the wait for the next one.
        pace.delay = match pace.last {
            Some(at) if at.elapsed() < RECREATE_MAX_DELAY => (pace.delay * 2).min(RECREATE_MAX_DELAY),
            _ => RECREATE_MIN_DELAY,
        };
        pace.not_before = Some(Instant::now() + pace.delay);
        if fatal_now {
            error!(code = ?code, reason, "kafka producer failed fatally; replacing it (unacknowledged events are sent again)");
        } else {
            error!(code = ?code, reason, "kafka producer makes no progress; replacing it (unacknowledged events are sent again)");
        }
        match (recreate.make)() {
            Ok(fresh) => {
                let fresh = Arc::new(fresh);
                match self.producer.write() {
                    Ok(mut p) => *p = fresh.clone(),
                    Err(poisoned) => *poisoned.into_inner() = fresh.clone(),
                }
                pace.last = Some(Instant::now());
                self.staleness.reset();
                recreate.health.fatal.store(false, Ordering::Relaxed);
                recreate.health.unrecoverable.store(false, Ordering::Relaxed);
                self.metrics.kafka_fatal.set(0);
                self.metrics.producer_recreated.inc();
                info!("kafka producer replaced");
                // Dropping a producer purges and joins its threads: not on a runtime worker.
                drop(now_current);
                tokio::task::spawn_blocking(move || drop(current));
                Ok(fresh)
            }
            Err(e) => {
                recreate.health.unrecoverable.store(true, Ordering::Relaxed);
                error!(error = %e, retry_in_ms = pace.delay.as_millis() as u64, "cannot create a fresh kafka producer");
                Err(RetryReason::Recreate(e))
            }
        }
    }

    /// Publishes events, enqueueing them in order (so records of one key keep it), then waits for
    /// every delivery. Permanent failures go to the dead-letter topic; authorization failures and
    /// everything else are retried.
    pub(crate) async fn publish_all(&self, events: &[&Event]) -> Vec<Outcome> {
        let producer = match self.usable_producer().await {
            Ok(p) => p,
            Err(why) => return events.iter().map(|_| Outcome::Retry(why.clone())).collect(),
        };
        let mut pending = Vec::with_capacity(events.len());
        // Keys whose event could not be sent in this round (its claim check not stored, the
        // producer's queue refusing it): their later events are not sent either, so that none of
        // them is written before the one that comes back to its lane first.
        let mut held_back: HashSet<&str> = HashSet::new();
        for ev in events {
            self.check_poison(ev);
            let key = ev.key.as_deref();
            if key.is_some_and(|k| held_back.contains(k)) {
                pending.push(Err(PublishError::Behind));
                continue;
            }
            let sent = match &ev.dead_letter {
                Some(reason) => Err(PublishError::Malformed(reason.clone())),
                None => self
                    .enqueue_fitting(&producer, self.routes.topic_for(&ev.event_type), ev)
                    .await
                    .map(|f| (Instant::now(), f))
                    .map_err(PublishError::from),
            };
            if let (Err(PublishError::Claim(_) | PublishError::Kafka(_)), Some(k)) = (&sent, key) {
                held_back.insert(k);
            }
            pending.push(sent);
        }
        let waited = join_all(pending.into_iter().map(|p| async move {
            let (sent, delivery) = p?;
            let report = delivery.await;
            self.metrics.produce_latency.observe(sent.elapsed().as_secs_f64());
            match report {
                Ok(Ok(_)) => Ok(()),
                Ok(Err((e, _))) => Err(PublishError::Kafka(e)),
                Err(_canceled) => Err(PublishError::Closed),
            }
        }))
        .await;
        let mut out = Vec::with_capacity(events.len());
        let mut unauthorized: Option<(String, KafkaError, usize)> = None;
        for (ev, result) in events.iter().zip(waited) {
            let outcome = match result {
                Ok(()) => {
                    self.staleness.delivered();
                    self.metrics.events_published.with_label_values(&[ev.event_type.label()]).inc();
                    self.metrics.published_bytes.inc_by(ev.value.len() as u64);
                    Outcome::Published
                }
                Err(PublishError::Malformed(reason)) => self.dead_letter(&producer, ev, &reason).await,
                Err(PublishError::Claim(why)) => Outcome::Retry(RetryReason::ClaimCheck(why)),
                Err(PublishError::Kafka(e)) if claim::is_too_large(&e) => {
                    // The broker's limit is below what was read: read it again and send a claim check.
                    self.count_error(&e);
                    let topic = self.routes.topic_for(&ev.event_type);
                    match self.deliver_claim_check(&producer, topic, ev, headers(ev)).await {
                        Ok(()) => {
                            self.metrics.events_published.with_label_values(&[ev.event_type.label()]).inc();
                            Outcome::Published
                        }
                        Err(claim::SendError::Kafka(e)) if kafka::is_permanent(&e) => {
                            self.dead_letter(&producer, ev, &e.to_string()).await
                        }
                        Err(other) => other.retry(),
                    }
                }
                Err(PublishError::Kafka(e)) => {
                    self.count_error(&e);
                    self.staleness.failed(&e);
                    match kafka::classify(&e) {
                        ErrorClass::Permanent => self.dead_letter(&producer, ev, &e.to_string()).await,
                        ErrorClass::Authorization => {
                            let n = unauthorized.as_ref().map_or(0, |u| u.2);
                            unauthorized = Some((self.routes.topic_for(&ev.event_type).to_owned(), e.clone(), n + 1));
                            Outcome::Retry(RetryReason::Authorization(e))
                        }
                        ErrorClass::Fatal => Outcome::Retry(RetryReason::Fatal(e)),
                        ErrorClass::Transient => Outcome::Retry(RetryReason::Transient(e)),
                    }
                }
                Err(PublishError::Closed) => Outcome::Retry(RetryReason::Closed),
                Err(PublishError::Behind) => Outcome::Retry(RetryReason::Behind),
            };
            out.push(outcome);
        }
        if let Some((topic, e, records)) = unauthorized {
            error!(%topic, error = %e, records, "kafka refused records: not authorized. Fix the ACL; the events are kept and retried, never dead-lettered");
        }
        out
    }

    pub(super) fn count_error(&self, e: &KafkaError) {
        self.metrics.publish_errors.with_label_values(&[&kafka::error_code_label(e)]).inc();
    }

    /// Sends to the dead-letter topic, with the reason and intended topic as headers. An event too
    /// large for that topic goes as a claim check, like on any topic: never without its bytes.
    async fn dead_letter(&self, producer: &Producer, ev: &Event, reason: &str) -> Outcome {
        let intended = self.routes.topic_for(&ev.event_type);
        let h = headers(ev)
            .insert(Header { key: "huggy_dlq_reason", value: Some(reason) })
            .insert(Header { key: "huggy_dlq_topic", value: Some(intended) });
        match self.deliver_fitting(producer, &self.routes.dead_letter, ev, h).await {
            Ok(()) => {
                warn!(event_id = %ev.id, event_type = %ev.event_type, reason, "event dead-lettered");
                self.metrics.events_dead_lettered.with_label_values(&[ev.event_type.label()]).inc();
                Outcome::DeadLettered
            }
            Err(e) => e.retry(),
        }
    }

    /// Sends one record and waits for its delivery report, counting what it cost.
    pub(super) async fn deliver(
        &self,
        producer: &Producer,
        topic: &str,
        ev: &Event,
        headers: OwnedHeaders,
        value: &[u8],
    ) -> Result<(), KafkaError> {
        let sent = Instant::now();
        let result = match self.enqueue(producer, topic, ev, headers, value).await {
            Err(e) => Err(e),
            Ok(delivery) => {
                let report = delivery.await;
                self.metrics.produce_latency.observe(sent.elapsed().as_secs_f64());
                match report {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err((e, _))) => Err(e),
                    Err(_) => Err(KafkaError::Canceled),
                }
            }
        };
        match &result {
            Ok(()) => self.metrics.published_bytes.inc_by(value.len() as u64),
            Err(e) => self.count_error(e),
        }
        result
    }

    /// Hands one record to librdkafka, waiting while its queue is full.
    pub(super) async fn enqueue(
        &self,
        producer: &Producer,
        topic: &str,
        ev: &Event,
        headers: OwnedHeaders,
        value: &[u8],
    ) -> Result<DeliveryFuture, KafkaError> {
        let mut wait = Duration::from_millis(1);
        let mut rec = FutureRecord::to(topic).payload(value).headers(headers);
        if let Some(k) = &ev.key {
            rec = rec.key(k.as_str());
        }
        // CreateTime is when the event happened, not when it is published (SPEC §5); an implausible
        // batch `time` leaves it to librdkafka (the publish time), as `ce_time` is left out then.
        if let Some(ms) = ev.time_millis() {
            rec = rec.timestamp(ms);
        }
        loop {
            match producer.send_result(rec) {
                Ok(f) => return Ok(f),
                // librdkafka hands the record back: the same one goes again once there is room.
                Err((e, back)) if kafka::is_queue_full(&e) => {
                    rec = back;
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_millis(100));
                }
                Err((e, _)) => return Err(e),
            }
        }
    }
}

impl From<claim::SendError> for PublishError {
    fn from(e: claim::SendError) -> Self {
        match e {
            claim::SendError::Kafka(e) => PublishError::Kafka(e),
            claim::SendError::Claim(why) => PublishError::Claim(why),
        }
    }
}

#[derive(Debug)]
enum PublishError {
    /// The bridge itself found the event unpublishable (`Event::dead_letter`).
    Malformed(String),
    Kafka(KafkaError),
    /// Too large for its topic, and the claim check could not be stored.
    Claim(String),
    Closed,
    /// Not sent: an earlier event of its key in the round could not be sent.
    Behind,
}
