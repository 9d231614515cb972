//! Events too large for their topic: what each topic accepts (`max.message.bytes`, read from the
//! brokers), whether a record fits once compressed, and claim checks — the event's exact bytes kept
//! in the file store and a small JSON reference published in its place (SPEC §5, Size).
//!
//! The decision is taken before a record is handed to librdkafka, so a claim check keeps its place
//! among the records of its key. A record the broker refuses anyway (a topic's limit lowered while
//! the daemon runs) makes the limits be read again and goes out as a claim check then.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers as _, OwnedHeaders};
use rdkafka::producer::DeliveryFuture;
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use super::kafka::{self, ErrorClass, Producer};
use super::{Outcome, Publisher, RetryReason};
use crate::config::{Config, FilesConfig};
use crate::event::Event;
use crate::files::store::FileStore;
use crate::metrics::{ClaimTopic, Metrics};

/// Kafka's default `max.message.bytes`: assumed for a topic whose setting cannot be read.
pub(crate) const DEFAULT_MAX_MESSAGE_BYTES: usize = 1_048_588;

/// Bytes of a record batch beyond its key, value and headers (batch header, record framing,
/// varints), with room to spare.
const RECORD_OVERHEAD: usize = 512;

/// The zstd level librdkafka compresses with by default (`compression.level` -1).
const ZSTD_DEFAULT_LEVEL: i32 = 3;

/// How often a refused record may make the limits be read again.
const REFRESH_AT_MOST_EVERY: Duration = Duration::from_secs(10);

/// Header naming the stored event: JSON `{"location","sha256","size"}`.
pub const CLAIM_CHECK_HEADER: &str = "huggy_claim_check";
/// The CloudEvents attribute pointing at the data when it is not in the record.
pub const DATAREF_HEADER: &str = "ce_dataref";

/// Where an event's bytes were stored, and how to check them.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Reference {
    /// `file:///…` or `s3://bucket/…`: what `huggy-bridge claim-check get` takes.
    pub location: String,
    /// Lowercase hex SHA-256 of the stored bytes.
    pub sha256: String,
    /// Length of the stored bytes.
    pub size: u64,
}

impl Reference {
    /// The reference to `bytes` stored at `location`.
    fn of(location: String, bytes: &[u8]) -> Self {
        Reference { location, sha256: hex::encode(Sha256::digest(bytes)), size: bytes.len() as u64 }
    }

    /// Whether `bytes` are the ones this reference was made for.
    pub fn matches(&self, bytes: &[u8]) -> bool {
        bytes.len() as u64 == self.size && hex::encode(Sha256::digest(bytes)) == self.sha256
    }
}

/// The codec the producer compresses with, as far as the size check is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Codec {
    /// Estimated by compressing with zstd at librdkafka's default level.
    Zstd,
    /// Any other codec (or none): counted uncompressed, which can only err toward a claim check.
    Other,
}

/// `max.message.bytes` of each topic as the brokers report it, read at start and again (at most
/// every ten seconds) when a broker refuses a record as too large.
pub(crate) struct TopicLimits {
    admin: Option<AdminClient<DefaultClientContext>>,
    topics: Vec<String>,
    timeout: Duration,
    known: RwLock<HashMap<String, usize>>,
    refreshed: Mutex<Option<Instant>>,
}

impl TopicLimits {
    /// Every topic is assumed to accept `limit` bytes; nothing is read from the brokers.
    pub(crate) fn fixed(limit: usize) -> Self {
        TopicLimits {
            admin: None,
            topics: Vec::new(),
            timeout: Duration::ZERO,
            known: RwLock::new(HashMap::new()),
            refreshed: Mutex::new(None),
        }
        .with_default(limit)
    }

    fn with_default(self, limit: usize) -> Self {
        if let Ok(mut k) = self.known.write() {
            k.insert(String::new(), limit);
        }
        self
    }

    /// Reads the limits of `topics` from the brokers at `bootstrap`. A topic whose limit cannot be
    /// read (no such topic yet, a broker without DescribeConfigs) is assumed to take Kafka's default.
    pub(crate) async fn read(cfg: &Config, bootstrap: &str, topics: Vec<String>) -> Self {
        let limits = Self::unread(cfg, bootstrap, topics);
        limits.refresh().await;
        limits
    }

    /// The limits of `topics`, all Kafka's default until [`TopicLimits::refresh`] reads them (the
    /// daemon does that in the background: an unreachable Kafka must not delay its start).
    pub(crate) fn unread(cfg: &Config, bootstrap: &str, topics: Vec<String>) -> Self {
        let admin = match kafka::admin_client(&cfg.kafka, bootstrap) {
            Ok(a) => Some(a),
            Err(e) => {
                warn!(error = %e, "cannot create a Kafka admin client; assuming every topic takes {DEFAULT_MAX_MESSAGE_BYTES} bytes");
                None
            }
        };
        TopicLimits {
            admin,
            topics,
            timeout: Duration::from_millis(cfg.kafka.request_timeout_ms.min(10_000)),
            known: RwLock::new(HashMap::new()),
            refreshed: Mutex::new(None),
        }
        .with_default(DEFAULT_MAX_MESSAGE_BYTES)
    }

    /// The largest record `topic` accepts, in bytes.
    pub(crate) fn limit(&self, topic: &str) -> usize {
        let known = match self.known.read() {
            Ok(k) => k,
            Err(poisoned) => poisoned.into_inner(),
        };
        known.get(topic).or_else(|| known.get("")).copied().unwrap_or(DEFAULT_MAX_MESSAGE_BYTES)
    }

    /// Reads the limits again, unless that was done less than ten seconds ago.
    pub(crate) async fn refresh(&self) {
        let Some(admin) = &self.admin else { return };
        {
            let Ok(mut at) = self.refreshed.lock() else { return };
            if at.is_some_and(|t| t.elapsed() < REFRESH_AT_MOST_EVERY) {
                return;
            }
            *at = Some(Instant::now());
        }
        let specs: Vec<ResourceSpecifier<'_>> = self.topics.iter().map(|t| ResourceSpecifier::Topic(t)).collect();
        let opts = AdminOptions::new().request_timeout(Some(self.timeout));
        let answer = tokio::time::timeout(self.timeout + Duration::from_secs(1), admin.describe_configs(&specs, &opts));
        let results = match answer.await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                warn!(error = %e, "cannot read the topics' max.message.bytes; keeping the limits known so far");
                return;
            }
            Err(_) => {
                warn!("reading the topics' max.message.bytes timed out; keeping the limits known so far");
                return;
            }
        };
        let mut read = HashMap::new();
        for (topic, result) in self.topics.iter().zip(results) {
            let value = result
                .ok()
                .and_then(|r| r.entries.into_iter().find(|e| e.name == "max.message.bytes").and_then(|e| e.value));
            if let Some(limit) = value.and_then(|v| v.parse::<usize>().ok()) {
                read.insert(topic.clone(), limit);
            }
        }
        info!(topics = read.len(), smallest = read.values().min().copied(), "read the topics' max.message.bytes");
        if let Ok(mut k) = self.known.write() {
            k.extend(read);
        }
    }
}

/// Why an event could not be stored as a claim check (it is kept and tried again).
#[derive(Debug, thiserror::Error)]
pub(crate) enum ClaimError {
    #[error("the file store for claim checks cannot be opened: {0}")]
    Open(#[source] crate::files::store::StoreError),
    #[error("storing the claim check failed: {0}")]
    Store(#[source] crate::files::store::StoreError),
}

/// Size decisions and claim checks for one producer's records.
pub(crate) struct ClaimChecks {
    pub(crate) limits: Arc<TopicLimits>,
    codec: Codec,
    files: FilesConfig,
    dead_letter_topic: String,
    store: tokio::sync::OnceCell<Arc<FileStore>>,
    metrics: Arc<Metrics>,
}

impl ClaimChecks {
    /// Claim checks stored in `cfg.files.store` (opened at the first one), the limits in `limits`.
    pub(crate) fn new(cfg: &Config, limits: Arc<TopicLimits>, metrics: Arc<Metrics>) -> Self {
        let codec = if kafka::compression_type(&cfg.kafka) == "zstd" { Codec::Zstd } else { Codec::Other };
        ClaimChecks {
            limits,
            codec,
            files: cfg.files.clone(),
            dead_letter_topic: cfg.kafka.dead_letter_topic.clone(),
            store: tokio::sync::OnceCell::new(),
            metrics,
        }
    }

    /// Whether the record fits `topic`: uncompressed, or else once compressed.
    pub(crate) fn fits(&self, topic: &str, key: Option<&str>, headers: &OwnedHeaders, value: &[u8]) -> bool {
        let limit = self.limits.limit(topic);
        let framing = RECORD_OVERHEAD + key.map_or(0, str::len) + headers_len(headers);
        if value.len() + framing <= limit {
            return true;
        }
        match self.codec {
            Codec::Zstd => zstd::bulk::compress(value, ZSTD_DEFAULT_LEVEL).is_ok_and(|c| c.len() + framing <= limit),
            Codec::Other => false,
        }
    }

    async fn store(&self) -> Result<&Arc<FileStore>, ClaimError> {
        self.store
            .get_or_try_init(|| async { FileStore::from_config(&self.files).map(Arc::new).map_err(ClaimError::Open) })
            .await
    }

    /// Stores `value` byte-exact as the claim check of event `id` on `topic`; storing it again (a
    /// retry) replaces the same object.
    pub(crate) async fn put(&self, topic: &str, id: &str, value: &[u8]) -> Result<Reference, ClaimError> {
        let location = self.store().await?.put(&object_key(topic, id), value).await.map_err(ClaimError::Store)?;
        let kind = if topic == self.dead_letter_topic { ClaimTopic::DeadLetter } else { ClaimTopic::Event };
        self.metrics.claim_checks.with_label_values(&[kind.label()]).inc();
        self.metrics.claim_check_bytes.inc_by(value.len() as u64);
        info!(topic, event_id = id, bytes = value.len(), %location, "event too large for its topic: published as a claim check");
        Ok(Reference::of(location, value))
    }

    /// The bytes a claim check points to, checked against its digest.
    ///
    /// # Errors
    /// The store cannot be opened or read, or the bytes are not the ones referenced.
    pub(crate) async fn resolve(&self, r: &Reference) -> Result<Vec<u8>, String> {
        let store = self.store().await.map_err(|e| e.to_string())?;
        let bytes = store.get(&r.location).await.map_err(|e| e.to_string())?;
        if !r.matches(&bytes) {
            return Err(format!("{} does not match its sha256 and size", r.location));
        }
        Ok(bytes)
    }

    /// The record to send for an event: `value` with `headers` when it fits `topic`, else a claim
    /// check (stored now) when it does not or when `force`d.
    pub(crate) async fn shape<'a>(
        &self,
        topic: &str,
        id: &str,
        key: Option<&str>,
        headers: OwnedHeaders,
        value: &'a [u8],
        force: bool,
    ) -> Result<(OwnedHeaders, Cow<'a, [u8]>), ClaimError> {
        if !force && self.fits(topic, key, &headers, value) {
            return Ok((headers, Cow::Borrowed(value)));
        }
        let r = self.put(topic, id, value).await?;
        let (headers, value) = claim_record(headers, &r);
        Ok((headers, Cow::Owned(value)))
    }
}

/// The object key of an event's claim check. Topic names are `[A-Za-z0-9._-]` (checked by the
/// configuration); an id that is not a plain name (from a hand-made dead letter) is hashed.
fn object_key(topic: &str, id: &str) -> String {
    let plain =
        !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if plain {
        format!("claim-checks/{topic}/{id}.json")
    } else {
        format!("claim-checks/{topic}/{}.json", hex::encode(Sha256::digest(id.as_bytes())))
    }
}

fn headers_len(h: &OwnedHeaders) -> usize {
    h.iter().map(|x| x.key.len() + x.value.map_or(0, <[u8]>::len) + 8).sum()
}

/// The headers and value of a claim-check record: `huggy_claim_check` and `ce_dataref` added to
/// `headers`; the value `{"huggy_claim_check":{…}}` — never empty, which sinks read as a tombstone.
pub(crate) fn claim_record(headers: OwnedHeaders, r: &Reference) -> (OwnedHeaders, Vec<u8>) {
    let reference = serde_json::to_string(r).unwrap_or_default();
    let value = format!("{{\"{CLAIM_CHECK_HEADER}\":{reference}}}").into_bytes();
    let headers = headers
        .insert(Header { key: CLAIM_CHECK_HEADER, value: Some(reference.as_str()) })
        .insert(Header { key: DATAREF_HEADER, value: Some(r.location.as_str()) });
    (headers, value)
}

/// The claim check a record carries, if it is one.
pub fn reference_of(headers: Option<&rdkafka::message::BorrowedHeaders>) -> Option<Reference> {
    let h = headers?;
    h.iter().find(|x| x.key == CLAIM_CHECK_HEADER).and_then(|x| serde_json::from_slice(x.value?).ok())
}

/// Whether an error says the record is too large for its topic (or for the producer).
pub(crate) fn is_too_large(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::MessageBatchTooLarge
                | RDKafkaErrorCode::InvalidMessageSize
        )
    )
}

/// A record that could not be sent: Kafka refused it, or its claim check could not be stored.
#[derive(Debug)]
pub(crate) enum SendError {
    Kafka(KafkaError),
    Claim(String),
}

impl SendError {
    /// What a failed send means for the event: kept and retried.
    pub(crate) fn retry(self) -> Outcome {
        Outcome::Retry(match self {
            SendError::Claim(why) => RetryReason::ClaimCheck(why),
            SendError::Kafka(e) => match kafka::classify(&e) {
                ErrorClass::Authorization => RetryReason::Authorization(e),
                ErrorClass::Fatal => RetryReason::Fatal(e),
                ErrorClass::Permanent | ErrorClass::Transient => RetryReason::DeadLetter(e),
            },
        })
    }
}

impl Publisher {
    /// The record of `ev` for `topic`: whole when it fits (unless `force`d), else a claim check.
    async fn shape_event<'a>(
        &self,
        topic: &str,
        ev: &'a Event,
        headers: OwnedHeaders,
        force: bool,
    ) -> Result<(OwnedHeaders, Cow<'a, [u8]>), SendError> {
        let id = ev.id.to_string();
        self.claims
            .shape(topic, &id, ev.key.as_deref(), headers, &ev.value, force)
            .await
            .map_err(|e| SendError::Claim(e.to_string()))
    }

    /// Hands the record of `ev` to librdkafka for `topic`: whole when it fits, else a claim check
    /// (stored first). A record librdkafka refuses at once as too large goes as a claim check in
    /// its place, so it keeps its order among the records of its key.
    pub(super) async fn enqueue_fitting(
        &self,
        producer: &Producer,
        topic: &str,
        ev: &Event,
    ) -> Result<DeliveryFuture, SendError> {
        let (h, v) = self.shape_event(topic, ev, super::headers(ev), false).await?;
        let claimed = matches!(v, Cow::Owned(_));
        match self.enqueue(producer, topic, ev, h, &v).await {
            Err(e) if is_too_large(&e) && !claimed => {
                self.count_error(&e);
                let (h, v) = self.shape_event(topic, ev, super::headers(ev), true).await?;
                self.enqueue(producer, topic, ev, h, &v).await.map_err(SendError::Kafka)
            }
            other => other.map_err(SendError::Kafka),
        }
    }

    /// Sends `ev` to `topic` with `headers` and waits for the delivery: whole when it fits, else as
    /// a claim check; a record the broker refuses as too large anyway makes the limits be read again
    /// and goes as a claim check.
    pub(super) async fn deliver_fitting(
        &self,
        producer: &Producer,
        topic: &str,
        ev: &Event,
        headers: OwnedHeaders,
    ) -> Result<(), SendError> {
        let (h, v) = self.shape_event(topic, ev, headers.clone(), false).await?;
        let claimed = matches!(v, Cow::Owned(_));
        match self.deliver(producer, topic, ev, h, &v).await {
            Err(e) if is_too_large(&e) && !claimed => self.deliver_claim_check(producer, topic, ev, headers).await,
            other => other.map_err(SendError::Kafka),
        }
    }

    /// Sends `ev` to `topic` as a claim check, after a broker refused its whole record.
    pub(super) async fn deliver_claim_check(
        &self,
        producer: &Producer,
        topic: &str,
        ev: &Event,
        headers: OwnedHeaders,
    ) -> Result<(), SendError> {
        self.claims.limits.refresh().await;
        let (h, v) = self.shape_event(topic, ev, headers, true).await?;
        self.deliver(producer, topic, ev, h, &v).await.map_err(SendError::Kafka)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checks(limit: usize) -> ClaimChecks {
        ClaimChecks::new(&Config::default(), Arc::new(TopicLimits::fixed(limit)), Arc::new(Metrics::new()))
    }

    #[test]
    fn a_compressible_value_over_the_limit_fits_once_compressed_an_incompressible_one_does_not() {
        let c = checks(100_000);
        let h = OwnedHeaders::new().insert(Header { key: "ce_id", value: Some("x") });
        let text = br#"{"body":""#.iter().copied().chain(b"<p>ol\xc3\xa1</p>".repeat(20_000)).chain(*br#""}"#).collect::<Vec<u8>>();
        assert!(text.len() > 200_000);
        assert!(c.fits("t", Some("k"), &h, &text), "compresses far below the limit");
        let mut noise = Vec::with_capacity(200_000);
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        while noise.len() < 200_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            noise.extend_from_slice(&x.to_le_bytes());
        }
        assert!(!c.fits("t", Some("k"), &h, &noise), "random bytes do not compress");
        assert!(c.fits("t", Some("k"), &h, &noise[..50_000]));
    }

    #[test]
    fn object_keys_are_plain_names_whatever_the_id() {
        assert_eq!(object_key("huggy.closedChat", "00ff"), "claim-checks/huggy.closedChat/00ff.json");
        let odd = object_key("t", "../../etc/passwd");
        assert!(odd.starts_with("claim-checks/t/") && !odd.contains(".."), "{odd}");
    }

    #[test]
    fn a_topic_limit_read_from_the_brokers_wins_over_the_default() {
        let l = TopicLimits::fixed(1_000);
        if let Ok(mut k) = l.known.write() {
            k.insert("big".into(), 5_000_000);
        }
        assert_eq!(l.limit("big"), 5_000_000);
        assert_eq!(l.limit("other"), 1_000);
    }

    #[test]
    fn a_claim_record_carries_the_reference_in_headers_and_a_non_empty_json_value() {
        let r = Reference::of("file:///store/claim-checks/t/ab.json".into(), b"{\"a\":1}");
        let (h, v) = claim_record(OwnedHeaders::new().insert(Header { key: "ce_id", value: Some("ab") }), &r);
        let v: serde_json::Value = serde_json::from_slice(&v).expect("json");
        assert_eq!(v["huggy_claim_check"]["location"], "file:///store/claim-checks/t/ab.json");
        assert_eq!(v["huggy_claim_check"]["size"], 7);
        let keys: Vec<&str> = h.iter().map(|x| x.key).collect();
        assert_eq!(keys, ["ce_id", "huggy_claim_check", "ce_dataref"]);
        let header: Reference = serde_json::from_slice(h.iter().nth(1).and_then(|x| x.value).expect("v")).expect("ref");
        assert_eq!(header, r);
        assert!(r.matches(b"{\"a\":1}"));
        assert!(!r.matches(b"{\"a\":2}"));
    }

    #[tokio::test]
    async fn a_claim_check_is_stored_byte_exact_and_resolves() {
        let dir = std::env::temp_dir().join(format!("huggy-claim-{}", std::process::id()));
        let mut cfg = Config::default();
        cfg.files.store = format!("file://{}", dir.display());
        let c = ClaimChecks::new(&cfg, Arc::new(TopicLimits::fixed(10)), Arc::new(Metrics::new()));
        let value = b"{\"big\":\"\\u00e9\xc3\xa9\"}".to_vec();
        let (h, v) = c.shape("chat.t", "00ff", None, OwnedHeaders::new(), &value, false).await.expect("stored");
        assert!(matches!(v, Cow::Owned(_)));
        let r: Reference = serde_json::from_slice(h.iter().next().and_then(|x| x.value).expect("header")).expect("ref");
        assert!(
            r.location.starts_with("file:///") && r.location.ends_with("claim-checks/chat.t/00ff.json"),
            "{}",
            r.location
        );
        assert_eq!(c.resolve(&r).await.expect("resolves"), value);
        let outside = Reference { location: "file:///etc/passwd".into(), ..r.clone() };
        assert!(c.resolve(&outside).await.is_err(), "only locations inside the store are read");
        let _ = std::fs::remove_dir_all(dir);
    }
}
