//! `huggy-bridge dead-letter replay` (SPEC §2): republishes what the dead-letter topic holds to the
//! topic each record's type routes to today, and remembers what it replayed so a second run
//! republishes nothing twice.
//!
//! The dead-letter topic is read with partitions assigned explicitly, to each partition's end (no
//! consumer-group join). What was replayed is remembered two ways:
//! - a *replay marker* appended to the dead-letter topic, in the replayed record's partition, after
//!   each record replayed: header `huggy_dlq_replayed` = `<partition>:<offset>`, the record's `ce_id`,
//!   and a small JSON value. A run reads every partition to its end first, so it knows every marker.
//! - committed offsets of the group [`REPLAY_GROUP`] (OffsetCommit without joining the group): every
//!   record below a partition's committed offset is done (replayed, or no dead letter at all), so
//!   later runs start there. A record left (still unpublishable, or filtered out by
//!   `--type`/`--reason`) holds its partition's committed offset, and is read again next time.
//!
//! A record the bridge dead-lettered by policy (`company_mismatch`, a lone surrogate, a duplicated
//! key member, an invalid type name: `event::is_refusal`) is skipped, and held like a filtered
//! one, unless `--reason` names its reason: publishing the same bytes again cures nothing and would
//! undo the refusal (a `company_mismatch` record carries its token's account in its headers and
//! another company in its value).
//!
//! Records are never re-dead-lettered: what cannot be published is reported and left where it is.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use rdkafka::consumer::{CommitMode, Consumer as _, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Header, Headers as _, Message as _, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use rdkafka::{Offset, TopicPartitionList};
use tracing::{info, warn};

use crate::config::{AckMode, Config};
use crate::event::{self, EventType};
use crate::health::KafkaHealth;
use crate::metrics::Metrics;
use crate::publish::claim::{self, ClaimChecks, TopicLimits};
use crate::publish::kafka;
use crate::publish::Routes;

/// The consumer group whose committed offsets on the dead-letter topic record what was replayed.
pub const REPLAY_GROUP: &str = "huggy-bridge-dead-letter-replay";

/// The header of a replay marker: `<partition>:<offset>` of the record replayed.
pub const REPLAYED_HEADER: &str = "huggy_dlq_replayed";

/// How long a read may go without a record or a partition's end before the replay gives up.
const READ_STALL: Duration = Duration::from_secs(30);

/// How long a republished record may wait for its delivery report.
const DELIVERY_TIMEOUT_MS: u64 = 30_000;

/// Which records to replay.
#[derive(Debug, Clone, Default)]
pub struct ReplayOptions {
    /// Only records of this event type (`receivedMessage`, or `app.huggy.receivedMessage`).
    pub event_type: Option<String>,
    /// Only records whose `huggy_dlq_reason` contains this text (case-insensitive). Also the only
    /// way to replay a record dead-lettered by one of the bridge's refusals: it must be named.
    pub reason: Option<String>,
    /// Decide and report, publish and commit nothing.
    pub dry_run: bool,
}

/// One dead-lettered record, as the report names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Partition of the dead-letter topic.
    pub partition: i32,
    /// Offset in that partition.
    pub offset: i64,
    /// `ce_id`, or empty when the record has none.
    pub id: String,
    /// The event type from `ce_type`, or empty.
    pub event_type: String,
}

/// What a replay did (or, with `--dry-run`, would do).
#[derive(Debug, Default)]
pub struct ReplayReport {
    /// Republished, each with the topic it went to.
    pub replayed: Vec<(Entry, String)>,
    /// Not considered this time (filtered out, dead-lettered by policy, not a dead letter), with why.
    pub skipped: Vec<(Entry, String)>,
    /// Still not publishable; kept in the dead-letter topic, with why.
    pub left: Vec<(Entry, String)>,
    /// Records read again that a previous run replayed already (those after a record that was left;
    /// below the committed offset nothing is read again).
    pub already_replayed: u64,
    /// Whether nothing was published or committed.
    pub dry_run: bool,
}

impl fmt::Display for ReplayReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verb = if self.dry_run { "would replay" } else { "replayed" };
        for (e, topic) in &self.replayed {
            writeln!(f, "{verb}\t{}@{}\t{}\t{}\t-> {topic}", e.partition, e.offset, e.id, e.event_type)?;
        }
        for (e, why) in &self.skipped {
            writeln!(f, "skipped\t{}@{}\t{}\t{}\t{why}", e.partition, e.offset, e.id, e.event_type)?;
        }
        for (e, why) in &self.left {
            writeln!(f, "left\t{}@{}\t{}\t{}\t{why}", e.partition, e.offset, e.id, e.event_type)?;
        }
        writeln!(
            f,
            "{}: {} {verb}, {} skipped, {} left, {} already replayed by an earlier run",
            if self.dry_run { "dry run" } else { "done" },
            self.replayed.len(),
            self.skipped.len(),
            self.left.len(),
            self.already_replayed
        )
    }
}

/// Progress through one partition: every offset below `next` is done; `blocked` once a record of
/// this run was not.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Progress {
    next: i64,
    blocked: bool,
}

impl Progress {
    /// From a committed offset (none yet: the partition's start).
    fn from_commit(offset: Offset) -> Progress {
        let next = match offset {
            Offset::Offset(o) if o >= 0 => o,
            _ => 0,
        };
        Progress { next, blocked: false }
    }

    /// Records whether the record at `offset` is done (replayed now or earlier, or never a dead
    /// letter); the committed offset moves over done records until the first one that is not.
    fn record(&mut self, offset: i64, done: bool) {
        if !done {
            self.blocked = true;
        } else if !self.blocked {
            self.next = offset + 1;
        }
    }
}

/// What to do with one record.
#[derive(Debug)]
enum Decision {
    Replay {
        topic: String,
        headers: OwnedHeaders,
        value: Vec<u8>,
    },
    /// Not a dead letter: never replayable, counted as done.
    NotADeadLetter(String),
    /// Filtered out this time (or dead-lettered by policy and not asked for): left for a later run.
    Filtered(String),
    /// Not publishable now; left.
    Left(String),
}

/// Reads the dead-letter topic to its end and republishes what can now be published.
///
/// # Errors
/// The configuration names the embedded broker; a Kafka client cannot be created; the topic's
/// partitions or committed offsets cannot be read; the read stalls; a commit fails.
pub async fn replay(cfg: &Config, opts: &ReplayOptions) -> anyhow::Result<ReplayReport> {
    if cfg.kafka.is_embedded() {
        bail!("the embedded broker lives inside the daemon's process: there is no dead-letter topic to replay from");
    }
    let bootstrap = cfg.kafka.brokers.clone();
    let dlq = cfg.kafka.dead_letter_topic.clone();
    let timeout = Duration::from_millis(cfg.kafka.request_timeout_ms.max(5_000));
    let metrics = Arc::new(Metrics::new());
    let routes = Routes::new(&cfg.kafka);
    let consumer: StreamConsumer =
        kafka::consumer_config(&cfg.kafka, &bootstrap, REPLAY_GROUP).create().context("creating the Kafka consumer")?;
    let mut send_cfg = cfg.clone();
    send_cfg.delivery.ack = AckMode::Kafka;
    send_cfg.delivery.kafka_ack_timeout_ms = DELIVERY_TIMEOUT_MS;
    let producer = kafka::producer(&send_cfg, &bootstrap, metrics.clone(), Arc::new(KafkaHealth::new()))
        .context("creating the Kafka producer")?;
    let limits = TopicLimits::read(cfg, &bootstrap, kafka::routable_topics(cfg).into_iter().collect()).await;
    let claims = ClaimChecks::new(cfg, Arc::new(limits), metrics.clone());

    let partitions = tokio::task::block_in_place(|| consumer.fetch_metadata(Some(&dlq), timeout))
        .with_context(|| format!("reading the partitions of {dlq}"))?
        .topics()
        .iter()
        .filter(|t| t.name() == dlq && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()).collect::<Vec<_>>())
        .collect::<Vec<i32>>();
    let mut report = ReplayReport { dry_run: opts.dry_run, ..ReplayReport::default() };
    if partitions.is_empty() {
        warn!(topic = %dlq, "the dead-letter topic has no partitions (does it exist?)");
        return Ok(report);
    }
    let mut wanted = TopicPartitionList::new();
    for p in &partitions {
        wanted.add_partition_offset(&dlq, *p, Offset::Invalid)?;
    }
    let committed = tokio::task::block_in_place(|| consumer.committed_offsets(wanted, timeout))
        .with_context(|| format!("reading the committed offsets of group {REPLAY_GROUP}"))?;
    let mut progress: BTreeMap<i32, Progress> = BTreeMap::new();
    let mut assignment = TopicPartitionList::new();
    for p in &partitions {
        let offset = committed.find_partition(&dlq, *p).map_or(Offset::Invalid, |e| e.offset());
        let pr = Progress::from_commit(offset);
        assignment.add_partition_offset(&dlq, *p, Offset::Offset(pr.next))?;
        progress.insert(*p, pr);
    }
    info!(topic = %dlq, start = ?progress.iter().map(|(p, pr)| (*p, pr.next)).collect::<Vec<_>>(), "reading the dead-letter topic");
    let markers = read_markers(cfg, &bootstrap, &assignment, partitions.len()).await?;
    consumer.assign(&assignment).context("assigning the dead-letter partitions")?;

    let mut at_end: HashSet<i32> = HashSet::new();
    let mut failed_keys: HashSet<Vec<u8>> = HashSet::new();
    let mut since_commit = 0usize;
    let mut last_progress = Instant::now();
    while at_end.len() < partitions.len() {
        let msg = match tokio::time::timeout(Duration::from_secs(1), consumer.recv()).await {
            Err(_) => {
                if last_progress.elapsed() > READ_STALL {
                    bail!(
                        "reading {dlq} stalled: {} of {} partitions read to their end",
                        at_end.len(),
                        partitions.len()
                    );
                }
                continue;
            }
            Ok(Err(KafkaError::PartitionEOF(p))) => {
                at_end.insert(p);
                last_progress = Instant::now();
                continue;
            }
            Ok(Err(e)) => {
                warn!(error = %e, "reading the dead-letter topic");
                continue;
            }
            Ok(Ok(m)) => m,
        };
        last_progress = Instant::now();
        let (p, offset) = (msg.partition(), msg.offset());
        let pr = progress.entry(p).or_default();
        let entry = entry_of(&msg);
        if header(&msg, REPLAYED_HEADER).is_some() {
            pr.record(offset, true); // a marker of an earlier replay
            continue;
        }
        if markers.contains(&(p, offset)) {
            report.already_replayed += 1;
            pr.record(offset, true);
            continue;
        }
        let decision = decide(&msg, opts, &routes, &dlq, &claims).await;
        match decision {
            Decision::NotADeadLetter(why) => {
                pr.record(offset, true);
                report.skipped.push((entry, why));
            }
            Decision::Filtered(why) => {
                pr.record(offset, false);
                report.skipped.push((entry, why));
            }
            Decision::Left(why) => {
                pr.record(offset, false);
                report.left.push((entry, why));
            }
            Decision::Replay { topic, headers, value } => {
                let key = msg.key().map(<[u8]>::to_vec);
                if key.as_ref().is_some_and(|k| failed_keys.contains(k)) {
                    pr.record(offset, false);
                    report.left.push((entry, "an earlier record of its key could not be replayed".into()));
                    continue;
                }
                if opts.dry_run {
                    pr.record(offset, true);
                    report.replayed.push((entry, topic));
                    continue;
                }
                let mut rec = FutureRecord::to(&topic).payload(&value).headers(headers);
                if let Some(k) = &key {
                    rec = rec.key(k.as_slice());
                }
                if let Some(ts) = msg.timestamp().to_millis() {
                    rec = rec.timestamp(ts);
                }
                match producer.send(rec, Duration::from_millis(DELIVERY_TIMEOUT_MS)).await {
                    Ok(_) => {
                        let marked = mark_replayed(&producer, &dlq, p, offset, &entry.id, &topic).await;
                        if let Err(e) = &marked {
                            warn!(partition = p, offset, error = %e, "replayed, but its replay marker was not written: a later run may replay it again");
                        }
                        pr.record(offset, marked.is_ok());
                        metrics.dead_letters_replayed.inc();
                        info!(partition = p, offset, event_id = %entry.id, %topic, "dead letter replayed");
                        report.replayed.push((entry, topic));
                        since_commit += 1;
                    }
                    Err((e, _)) => {
                        pr.record(offset, false);
                        if let Some(k) = key {
                            failed_keys.insert(k);
                        }
                        report.left.push((entry, format!("kafka did not take it on {topic}: {e}")));
                    }
                }
                if since_commit >= 100 {
                    commit(&consumer, &dlq, &progress)?;
                    since_commit = 0;
                }
            }
        }
    }
    if !opts.dry_run {
        commit(&consumer, &dlq, &progress)?;
    }
    Ok(report)
}

/// Commits each partition's progress.
fn commit(consumer: &StreamConsumer, dlq: &str, progress: &BTreeMap<i32, Progress>) -> anyhow::Result<()> {
    let mut tpl = TopicPartitionList::new();
    for (p, pr) in progress {
        tpl.add_partition_offset(dlq, *p, Offset::Offset(pr.next))?;
    }
    tokio::task::block_in_place(|| consumer.commit(&tpl, CommitMode::Sync))
        .with_context(|| format!("committing the replay's progress (group {REPLAY_GROUP})"))
}

/// Reads `assignment` to the end of each partition and returns the records the replay markers
/// there name, as (partition, offset).
async fn read_markers(
    cfg: &Config,
    bootstrap: &str,
    assignment: &TopicPartitionList,
    partitions: usize,
) -> anyhow::Result<HashSet<(i32, i64)>> {
    let consumer: StreamConsumer =
        kafka::consumer_config(&cfg.kafka, bootstrap, REPLAY_GROUP).create().context("creating the Kafka consumer")?;
    consumer.assign(assignment).context("assigning the dead-letter partitions")?;
    let mut markers = HashSet::new();
    let mut at_end: HashSet<i32> = HashSet::new();
    let mut last_progress = Instant::now();
    while at_end.len() < partitions {
        match tokio::time::timeout(Duration::from_secs(1), consumer.recv()).await {
            Err(_) => {
                if last_progress.elapsed() > READ_STALL {
                    bail!(
                        "reading the dead-letter topic stalled: {} of {partitions} partitions read to their end",
                        at_end.len()
                    );
                }
                continue;
            }
            Ok(Err(KafkaError::PartitionEOF(p))) => {
                at_end.insert(p);
            }
            Ok(Err(e)) => warn!(error = %e, "reading the dead-letter topic"),
            Ok(Ok(m)) => {
                if let Some(at) = header(&m, REPLAYED_HEADER).and_then(parse_marker) {
                    markers.insert(at);
                }
            }
        }
        last_progress = Instant::now();
    }
    Ok(markers)
}

/// `<partition>:<offset>` of a replay marker.
fn parse_marker(v: &str) -> Option<(i32, i64)> {
    let (p, o) = v.split_once(':')?;
    Some((p.parse().ok()?, o.parse().ok()?))
}

/// Appends the replay marker of the record at `partition`/`offset` to the dead-letter topic, in
/// the same partition (so the next run reads it with the partition).
async fn mark_replayed(
    producer: &kafka::Producer,
    dlq: &str,
    partition: i32,
    offset: i64,
    id: &str,
    topic: &str,
) -> Result<(), KafkaError> {
    let at = format!("{partition}:{offset}");
    let value = serde_json::json!({ REPLAYED_HEADER: { "partition": partition, "offset": offset, "ce_id": id, "topic": topic } })
        .to_string();
    let headers = OwnedHeaders::new()
        .insert(Header { key: REPLAYED_HEADER, value: Some(at.as_str()) })
        .insert(Header { key: "ce_id", value: Some(id) })
        .insert(Header { key: "content-type", value: Some("application/json") });
    let rec = FutureRecord::<(), _>::to(dlq).partition(partition).payload(&value).headers(headers);
    producer.send(rec, Duration::from_millis(DELIVERY_TIMEOUT_MS)).await.map(|_| ()).map_err(|(e, _)| e)
}

fn header<'a>(msg: &'a BorrowedMessage<'_>, key: &str) -> Option<&'a str> {
    msg.headers()?.iter().find(|h| h.key == key).and_then(|h| std::str::from_utf8(h.value?).ok())
}

fn entry_of(msg: &BorrowedMessage<'_>) -> Entry {
    Entry {
        partition: msg.partition(),
        offset: msg.offset(),
        id: header(msg, "ce_id").unwrap_or_default().to_owned(),
        event_type: header(msg, "ce_type")
            .map(|t| t.strip_prefix("app.huggy.").unwrap_or(t))
            .unwrap_or_default()
            .to_owned(),
    }
}

/// Where a dead-lettered record would go, read from its headers alone.
#[derive(Debug, PartialEq, Eq)]
struct Routed<'h> {
    /// Its `ce_id`.
    id: &'h str,
    /// The topic its type routes to today.
    topic: String,
}

/// What a record's headers (`header` looks one up by name) decide, before its value is read:
/// where it would go, or why it stays. A record dead-lettered by one of the bridge's refusals
/// (`event::is_refusal`: `company_mismatch`, a lone surrogate, a duplicated key member, an
/// invalid type name) is skipped unless the operator asks for it by naming its reason with
/// `--reason`: publishing the same bytes again would only undo the refusal.
fn route<'h>(
    header: impl Fn(&str) -> Option<&'h str>,
    opts: &ReplayOptions,
    routes: &Routes,
    dlq: &str,
) -> Result<Routed<'h>, Decision> {
    let Some(reason) = header("huggy_dlq_reason") else {
        return Err(Decision::NotADeadLetter("not a dead letter (no huggy_dlq_reason header)".into()));
    };
    let Some(ce_type) = header("ce_type") else { return Err(Decision::Left("no ce_type header".into())) };
    let type_name = ce_type.strip_prefix("app.huggy.").unwrap_or(ce_type);
    if let Some(want) = &opts.event_type {
        let want = want.strip_prefix("app.huggy.").unwrap_or(want);
        if !type_name.eq_ignore_ascii_case(want) {
            return Err(Decision::Filtered(format!("not of type {want}")));
        }
    }
    if let Some(text) = &opts.reason {
        if !reason.to_lowercase().contains(&text.to_lowercase()) {
            return Err(Decision::Filtered(format!("reason does not contain {text:?}")));
        }
    }
    let asked_for = opts.reason.as_deref().is_some_and(|r| !r.trim().is_empty());
    if event::is_refusal(reason) && !asked_for {
        return Err(Decision::Filtered(format!(
            "dead-lettered by policy ({reason}): publishing it again would not cure it; \
             name its reason with --reason to replay it anyway"
        )));
    }
    let Some(id) = header("ce_id").filter(|i| !i.is_empty()) else {
        return Err(Decision::Left("no ce_id header".into()));
    };
    let event_type = match EventType::parse(type_name) {
        Ok((t, _)) => t,
        Err(why) => return Err(Decision::Left(format!("its type still cannot be routed: {why}"))),
    };
    let topic = routes.topic_for(&event_type).to_owned();
    if topic == dlq {
        return Err(Decision::Left(format!("type {type_name} routes to the dead-letter topic itself")));
    }
    Ok(Routed { id, topic })
}

/// Decides what to do with one dead-lettered record: where it would go today and what it would carry.
async fn decide(
    msg: &BorrowedMessage<'_>,
    opts: &ReplayOptions,
    routes: &Routes,
    dlq: &str,
    claims: &ClaimChecks,
) -> Decision {
    let Routed { id, topic } = match route(|name| header(msg, name), opts, routes, dlq) {
        Ok(r) => r,
        Err(d) => return d,
    };
    let value = match claim::reference_of(msg.headers()) {
        Some(r) => match claims.resolve(&r).await {
            Ok(bytes) => bytes,
            Err(why) => return Decision::Left(format!("its claim check cannot be resolved: {why}")),
        },
        None => msg.payload().unwrap_or_default().to_vec(),
    };
    if !is_json_object(&value) {
        return Decision::Left("its value is still not a JSON object".into());
    }
    let mut headers = OwnedHeaders::new();
    if let Some(hs) = msg.headers() {
        for h in hs.iter() {
            let dropped =
                h.key.starts_with("huggy_dlq_") || h.key == claim::CLAIM_CHECK_HEADER || h.key == claim::DATAREF_HEADER;
            if !dropped {
                headers = headers.insert(Header { key: h.key, value: h.value });
            }
        }
    }
    let key = msg.key().map(String::from_utf8_lossy);
    match claims.shape(&topic, id, key.as_deref(), headers, &value, false).await {
        Ok((headers, shaped)) => Decision::Replay { topic, headers, value: shaped.into_owned() },
        Err(e) => Decision::Left(e.to_string()),
    }
}

/// Whether `bytes` are one JSON object.
fn is_json_object(bytes: &[u8]) -> bool {
    bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{')
        && serde_json::from_slice::<&serde_json::value::RawValue>(bytes).is_ok()
}

/// The bytes a claim-check location points to, read from the configured `files.store`; checked
/// against `sha256` (hex) when given. For `huggy-bridge claim-check get`.
///
/// # Errors
/// The store cannot be opened or read, the location is outside it, or the digest differs.
pub async fn claim_check_get(cfg: &Config, location: &str, sha256: Option<&str>) -> anyhow::Result<Vec<u8>> {
    let store = crate::files::store::FileStore::from_config(&cfg.files).context("opening files.store")?;
    let bytes = store.get(location).await.with_context(|| format!("reading {location}"))?;
    if let Some(want) = sha256 {
        let got = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes));
        if !got.eq_ignore_ascii_case(want) {
            bail!("{location}: sha256 is {got}, not {want}");
        }
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests;
