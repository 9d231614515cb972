//! Publishing: events to Kafka records (topic, key, CloudEvents headers), delivery with retries,
//! dead-lettering of what Kafka can never take, and the loop that drains the spool.

pub mod claim;
mod guard;
pub mod kafka;
mod lanes;
mod stale;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use futures::future::join_all;
use futures::stream::{FuturesUnordered, StreamExt as _};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureRecord, Producer as _};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::clock::now_secs;
use crate::config::KafkaConfig;
use crate::event::{Event, EventType, KnownType};
use crate::health::KafkaHealth;
use crate::metrics::Metrics;
use crate::spool::{Spool, Stored};
pub use guard::Poison;
use kafka::ErrorClass;
pub(crate) use kafka::Producer;

/// Topic routing from the configuration, worked out once: a record's topic is a lookup.
#[derive(Debug, Clone)]
pub(crate) struct Routes {
    /// The topic of each known type, at its position in [`KnownType::ALL`].
    known: Vec<String>,
    fallback: String,
    dead_letter: String,
}

impl Routes {
    pub(crate) fn new(cfg: &KafkaConfig) -> Self {
        // Keyed by the canonical type name: keys from the environment arrive lowercased.
        let overrides: BTreeMap<&'static str, &String> =
            cfg.topics.iter().filter_map(|(k, v)| KnownType::parse_ignore_case(k).map(|t| (t.as_str(), v))).collect();
        Routes {
            known: KnownType::ALL
                .iter()
                .map(|k| match overrides.get(k.as_str()) {
                    Some(topic) => (*topic).clone(),
                    None => cfg.topic_template.replace("{event}", k.as_str()),
                })
                .collect(),
            fallback: cfg.fallback_topic.clone(),
            dead_letter: cfg.dead_letter_topic.clone(),
        }
    }

    /// `kafka.topics.<type>` if set, else the template for known types, else the fallback topic.
    pub(crate) fn topic_for(&self, t: &EventType) -> &str {
        match t {
            EventType::Known(k) => &self.known[*k as usize],
            EventType::Unknown(_) => &self.fallback,
        }
    }
}

/// The CloudEvents (Kafka binding, binary mode) and bridge headers of an event's record.
pub(crate) fn headers(ev: &Event) -> OwnedHeaders {
    let id = ev.id.to_string();
    let (ce_type, source) = (ev.ce_type(), ev.ce_source());
    let mut h = OwnedHeaders::new_with_capacity(16)
        .insert(Header { key: "ce_specversion", value: Some("1.0") })
        .insert(Header { key: "ce_id", value: Some(id.as_str()) })
        .insert(Header { key: "ce_type", value: Some(ce_type.as_str()) })
        .insert(Header { key: "ce_source", value: Some(source.as_str()) });
    // A batch `time` that is no plausible time leaves the optional attribute out (SPEC §5).
    if let Some(time) = ev.ce_time() {
        h = h.insert(Header { key: "ce_time", value: Some(time.as_str()) });
    }
    h = h.insert(Header { key: "content-type", value: Some("application/json") });
    if let Some(orig) = &ev.original_type {
        h = h.insert(Header { key: "huggy_original_type", value: Some(orig.as_str()) });
    }
    // The bridge's file results travel beside Huggy's bytes, never inside them (SPEC §5, §6).
    if let Some(files) = &ev.file_results {
        h = h.insert(Header { key: "huggy_bridge_files", value: Some(files.as_str()) });
    }
    routing_headers(h, ev)
}

/// The routing headers (SPEC §5) an event carries, after `h`.
fn routing_headers(mut h: OwnedHeaders, ev: &Event) -> OwnedHeaders {
    for (key, value) in ev.routing.headers(ev.company.as_deref()) {
        h = h.insert(Header { key, value: Some(value) });
    }
    h
}

/// Why an event was not written this time; it is tried again.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum RetryReason {
    #[error("kafka did not take the record now: {0}")]
    Transient(#[source] KafkaError),
    /// An ACL is missing: the operator's mistake, never the event's; retried, not dead-lettered.
    #[error("not authorized (check the ACLs; the event is kept and retried): {0}")]
    Authorization(#[source] KafkaError),
    #[error("the producer failed fatally; a fresh producer takes the record: {0}")]
    Fatal(#[source] KafkaError),
    #[error("the producer failed fatally and a fresh one could not be created: {0}")]
    Recreate(#[source] KafkaError),
    #[error("the dead-letter topic did not take the event: {0}")]
    DeadLetter(#[source] KafkaError),
    #[error("the delivery report was lost: the producer was closed")]
    Closed,
    #[error("publishing panicked, and so did dead-lettering the event: {0}")]
    Panicked(String),
    /// Too large for its topic, and its claim check could not be stored (the file store failed).
    #[error("too large for its topic and not stored as a claim check: {0}")]
    ClaimCheck(String),
}

/// How one event ended up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    Published,
    DeadLettered,
    /// Not written; worth trying again later.
    Retry(RetryReason),
}

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

pub(crate) struct Publisher {
    producer: RwLock<Arc<Producer>>,
    recreate: Option<Recreate>,
    recreation: tokio::sync::Mutex<Recreation>,
    routes: Routes,
    claims: claim::ClaimChecks,
    metrics: Arc<Metrics>,
    poison: Option<Poison>,
    staleness: stale::Staleness,
}

impl Publisher {
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
    async fn usable_producer(&self) -> Result<Arc<Producer>, RetryReason> {
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
        for ev in events {
            self.check_poison(ev);
            pending.push(match &ev.dead_letter {
                Some(reason) => Err(PublishError::Malformed(reason.clone())),
                None => self
                    .enqueue_fitting(&producer, self.routes.topic_for(&ev.event_type), ev)
                    .await
                    .map(|f| (Instant::now(), f))
                    .map_err(PublishError::from),
            });
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
            };
            out.push(outcome);
        }
        if let Some((topic, e, records)) = unauthorized {
            error!(%topic, error = %e, records, "kafka refused records: not authorized. Fix the ACL; the events are kept and retried, never dead-lettered");
        }
        out
    }

    fn count_error(&self, e: &KafkaError) {
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
    async fn deliver(
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
    async fn enqueue(
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
}

/// When the spool publisher stops: `soft` after its current window, `hard` at once.
#[derive(Clone)]
pub(crate) struct Stops {
    pub(crate) soft: CancellationToken,
    pub(crate) hard: CancellationToken,
}

/// Bytes of event values the spool publisher holds at most (plus one event), parked ones included,
/// whatever `kafka.max_in_flight_records` allows: a window of large events cannot take the
/// memory that many small ones would not (see `memory`).
pub(crate) const WINDOW_BYTES: usize = 32 * 1024 * 1024;

/// Rounds of lanes being published at once: a round holding a record Kafka cannot take now waits
/// for its delivery timeout, and the others go on meanwhile.
const ROUNDS_IN_FLIGHT: usize = 4;
/// Events held per publishing window (`kafka.max_in_flight_records`): room for the lanes of keys that
/// wait out a backoff besides the window that flows. Their bytes stay within [`WINDOW_BYTES`].
pub(crate) const HELD_PER_WINDOW: usize = 4;

/// How long a round may take before it counts as hung (liveness): librdkafka reports every record
/// within its message timeout, so a round past that and a margin is one that will not end.
const ROUND_DEADLINE: Duration = Duration::from_millis(kafka::SPOOL_MESSAGE_TIMEOUT_MS + 30_000);

type Round = std::pin::Pin<Box<dyn std::future::Future<Output = (u64, Vec<Stored>, Vec<Outcome>)> + Send>>;

/// Drains the spool into Kafka until cancelled: reads undelivered events in sequence order, holds
/// them in one lane per key ([`lanes`]), publishes rounds of lanes (up to `window` events each,
/// [`ROUNDS_IN_FLIGHT`] at once), acknowledges what Kafka took, and puts what it did not back at the
/// front of its lane, which waits out its own exponential backoff: a key Kafka will not take stalls
/// only itself, in order.
///
/// An event whose files are still being captured is parked, and so is every later event with the
/// same key (order per key); events of other keys go on. Parked events go first once ready.
///
/// The pulse beats while every round in flight is younger than [`ROUND_DEADLINE`] (a round waiting
/// on an unwritable partition ends within the message timeout): a round that never ends (a
/// producer that stopped reporting) silences it, and liveness says so.
pub(crate) async fn run_spool_publisher(
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
    let mut lanes = lanes::Lanes::new();
    let mut rounds: FuturesUnordered<Round> = FuturesUnordered::new();
    let mut parked: Vec<Stored> = Vec::new();
    let mut read_again_at: Option<tokio::time::Instant> = None;
    let mut started: HashMap<u64, tokio::time::Instant> = HashMap::new();
    let mut next_round: u64 = 0;
    loop {
        if started.values().all(|t| t.elapsed() < ROUND_DEADLINE) {
            pulse.beat();
        }
        if rounds.is_empty() && stop.is_cancelled() {
            break;
        }
        let notified = committed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if !stop.is_cancelled() && read_again_at.is_none_or(|t| t <= tokio::time::Instant::now()) {
            read_again_at = None;
            let room = (window * HELD_PER_WINDOW).saturating_sub(lanes.held() + parked.len());
            let parked_bytes: usize = parked.iter().map(|s| s.event.value.len()).sum();
            let room_bytes = WINDOW_BYTES.saturating_sub(parked_bytes + lanes.held_bytes());
            match if room > 0 && room_bytes > 0 { reader.read_now(room, room_bytes) } else { Ok(Vec::new()) } {
                Ok(fresh) => {
                    let (ready, still_parked) =
                        release(std::mem::take(&mut parked).into_iter().chain(fresh), |seq| spool.files_result(seq));
                    parked = still_parked;
                    for s in ready {
                        lanes.push(s);
                    }
                }
                Err(e) => {
                    error!(error = %e, "spool read failed; retrying");
                    read_again_at = Some(tokio::time::Instant::now() + Duration::from_secs(1));
                }
            }
            while rounds.len() < ROUNDS_IN_FLIGHT {
                let round = lanes.take_ready(tokio::time::Instant::now(), window);
                if round.is_empty() {
                    break;
                }
                let publisher = publisher.clone();
                let id = next_round;
                next_round += 1;
                started.insert(id, tokio::time::Instant::now());
                rounds.push(Box::pin(async move {
                    let refs: Vec<&Event> = round.iter().map(|s| &s.event).collect();
                    let outcomes = publisher.publish_guarded(&refs).await;
                    (id, round, outcomes)
                }));
            }
        }
        metrics.publish_stalled_keys.set(lanes.stalled() as i64);
        // Wake for: a round done, new events, a lane's backoff over, parked events (their file
        // results are announced like commits; the timer only bounds a missed wake-up), a read to retry.
        let due = if rounds.len() < ROUNDS_IN_FLIGHT { lanes.next_due() } else { None };
        // With rounds in flight, a tick keeps the pulse honest while they wait on librdkafka.
        let tick =
            (!parked.is_empty() || !rounds.is_empty()).then(|| tokio::time::Instant::now() + Duration::from_secs(1));
        let wake_at = [due, read_again_at, tick].into_iter().flatten().min();
        tokio::select! {
            Some((id, round, outcomes)) = rounds.next(), if !rounds.is_empty() => {
                started.remove(&id);
                settle(&spool, &metrics, &mut lanes, round, outcomes).await;
            }
            () = &mut notified, if !stop.is_cancelled() => {}
            () = tokio::time::sleep_until(wake_at.unwrap_or_else(tokio::time::Instant::now)), if wake_at.is_some() && !stop.is_cancelled() => {}
            () = stop.cancelled(), if !stop.is_cancelled() => {
                if !rounds.is_empty() || lanes.held() > 0 {
                    info!(in_flight = rounds.len(), held = lanes.held(), "stopping: finishing the rounds in flight; the rest stays in the spool");
                }
            }
            () = hard.cancelled() => {
                info!(rounds = rounds.len(), "shutdown while publishing; unacknowledged records stay in the spool");
                return;
            }
        }
    }
}

/// Acknowledges what a round got into Kafka and returns the rest to its lanes.
async fn settle(
    spool: &Spool,
    metrics: &Metrics,
    lanes: &mut lanes::Lanes,
    round: Vec<Stored>,
    outcomes: Vec<Outcome>,
) {
    for (s, o) in round.iter().zip(&outcomes) {
        if let Outcome::Retry(why) = o {
            debug!(event_id = %s.event.id, %why, "publish will be retried");
        }
    }
    let first_failure = round.iter().zip(&outcomes).find_map(|(s, o)| match o {
        Outcome::Retry(why) => Some((s.event.id, why.to_string())),
        _ => None,
    });
    let fin = lanes.finish(round, outcomes, tokio::time::Instant::now());
    let now = now_secs();
    for (_, received_at) in &fin.done {
        metrics.ack_latency.observe((now - received_at).max(0) as f64);
    }
    spool.ack(fin.done.iter().map(|d| d.0).collect()).await;
    if fin.retried > 0 {
        metrics.publish_retries.inc_by(fin.retried as u64);
        if let Some((event_id, why)) = first_failure {
            warn!(
                records = fin.retried,
                %event_id,
                reason = %why,
                stalled_keys = lanes.stalled(),
                newly_stalled = fin.newly_stalled,
                "publishing failed; these keys back off and are retried, the others go on"
            );
        }
    }
}

/// Splits events (in sequence order) into those ready to publish — with their file results for
/// header `huggy_bridge_files` — and those that must wait: files not captured yet, or an earlier event of the same key
/// still waiting.
fn release(
    events: impl Iterator<Item = Stored>,
    files_result: impl Fn(u64) -> Option<Vec<u8>>,
) -> (Vec<Stored>, Vec<Stored>) {
    let mut blocked: HashSet<String> = HashSet::new();
    let (mut ready, mut parked) = (Vec::new(), Vec::new());
    for mut s in events {
        if s.event.key.as_ref().is_some_and(|k| blocked.contains(k)) {
            parked.push(s);
            continue;
        }
        if !s.event.files.is_empty() {
            match files_result(s.seq) {
                Some(results) => {
                    s.event.file_results = Some(String::from_utf8_lossy(&results).into_owned());
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventId;

    fn routes(overrides: &[(&str, &str)]) -> Routes {
        let cfg = KafkaConfig {
            topic_template: "chat.{event}.v1".into(),
            topics: overrides.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
            ..KafkaConfig::default()
        };
        Routes::new(&cfg)
    }

    #[test]
    fn topic_for_prefers_the_override_then_the_template_then_the_fallback() {
        let r = routes(&[("receivedMessage", "chat.inbound")]);
        assert_eq!(r.topic_for(&EventType::Known(KnownType::ReceivedMessage)), "chat.inbound");
        assert_eq!(r.topic_for(&EventType::Known(KnownType::ClosedChat)), "chat.closedChat.v1");
        assert_eq!(r.topic_for(&EventType::Unknown("brandNewEvent".into())), "huggy.unknown");
        assert_eq!(r.dead_letter, "huggy.dead-letter");
    }

    #[test]
    fn topic_overrides_match_the_type_in_any_letter_case() {
        let r = routes(&[("CLOSEDCHAT", "chat.closed"), ("receivedmessage", "chat.inbound")]);
        assert_eq!(r.topic_for(&EventType::Known(KnownType::ClosedChat)), "chat.closed");
        assert_eq!(r.topic_for(&EventType::Known(KnownType::ReceivedMessage)), "chat.inbound");
    }

    pub(super) fn stored(seq: u64, key: &str, files: bool) -> Stored {
        Stored {
            seq,
            received_at: 0,
            event: Event {
                id: EventId([seq as u8; 16]),
                event_type: EventType::Known(KnownType::ReceivedMessage),
                original_type: None,
                key: Some(key.to_owned()),
                company: None,
                time: 0,
                value: br#"{"a":1}"#.to_vec(),
                dead_letter: None,
                files: if files { vec!["https://files.huggy.app/x".into()] } else { Vec::new() },
                file_results: None,
                lineage: None,
                routing: Default::default(),
            },
        }
    }

    fn seqs(v: &[Stored]) -> Vec<u64> {
        v.iter().map(|s| s.seq).collect()
    }

    #[test]
    fn release_parks_an_event_waiting_for_files_and_every_later_event_of_its_key() {
        let events = vec![stored(1, "chat-a", true), stored(2, "chat-b", false), stored(3, "chat-a", false)];
        let (ready, parked) = release(events.into_iter(), |_| None);
        assert_eq!(seqs(&ready), [2], "other keys go on");
        assert_eq!(seqs(&parked), [1, 3], "the key waits behind its first event, in order");
    }

    #[test]
    fn release_attaches_the_file_results_beside_the_untouched_value() {
        let events = vec![stored(1, "chat-a", true), stored(2, "chat-a", false)];
        let (ready, parked) =
            release(events.into_iter(), |seq| (seq == 1).then(|| br#"[{"status":"stored"}]"#.to_vec()));
        assert!(parked.is_empty());
        assert_eq!(seqs(&ready), [1, 2]);
        assert_eq!(ready[0].event.value, br#"{"a":1}"#.to_vec(), "the value is Huggy's bytes");
        assert_eq!(ready[0].event.file_results.as_deref(), Some(r#"[{"status":"stored"}]"#));
        assert!(ready[0].event.files.is_empty(), "files are not captured twice");
        assert_eq!(ready[1].event.file_results, None);
    }

    #[test]
    fn file_results_go_in_their_own_header_and_nowhere_else() {
        use rdkafka::message::Headers as _;
        let mut ev = stored(1, "chat-a", false).event;
        ev.value = br#"{"a":1,"bridge_files":[{"status":"stored","location":"s3://forged"}]}"#.to_vec();
        let names = |h: &OwnedHeaders| h.iter().map(|h| h.key.to_owned()).collect::<Vec<_>>();
        assert!(!names(&headers(&ev)).contains(&"huggy_bridge_files".to_owned()), "no files, no header");
        ev.file_results = Some(r#"[{"status":"failed"}]"#.into());
        let h = headers(&ev);
        let files: Vec<_> = h.iter().filter(|h| h.key == "huggy_bridge_files").collect();
        assert_eq!(files.len(), 1);
        assert_eq!(files[0].value, Some(&br#"[{"status":"failed"}]"#[..]));
    }

    #[test]
    fn release_keeps_a_later_event_parked_behind_an_earlier_parked_one_of_its_key() {
        // Event 2 has its files, but event 1 of the same key does not yet: 2 must not overtake 1.
        let events = vec![stored(1, "k", true), stored(2, "k", true), stored(3, "other", true)];
        let (ready, parked) = release(events.into_iter(), |seq| (seq != 1).then(|| b"[]".to_vec()));
        assert_eq!(seqs(&ready), [3]);
        assert_eq!(seqs(&parked), [1, 2]);
    }

    #[test]
    fn retry_reasons_keep_the_kafka_error_as_their_source() {
        use std::error::Error as _;
        let e = KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::TopicAuthorizationFailed);
        let why = RetryReason::Authorization(e.clone());
        assert!(why.to_string().contains("not authorized"), "{why}");
        let source = why.source().expect("a source").to_string();
        assert_eq!(source, e.to_string());
    }
}
