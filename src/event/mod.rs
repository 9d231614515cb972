//! Huggy batches and events: parsing the webhook body, splitting it into events, and the pure rules
//! that give each event its type, key, id and CloudEvents attributes. No async, no I/O.
//!
//! Event bytes are never re-serialized: splitting borrows each event as a [`RawValue`], so the value
//! published to Kafka is exactly what Huggy sent (ids beyond 2^53, escapes, key order, whitespace).

mod fields;
pub mod lineage;
pub(crate) mod types;

use std::collections::HashMap;
use std::fmt;

use serde::de::{IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

pub use fields::{Routing, ROUTING_HEADERS};
pub use lineage::{Lineage, Sender, Source, StreamRuns};
pub use types::{EventType, KnownType};

use crate::json::string_end;

/// Why a body was refused as a whole (HTTP 400).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BodyError {
    /// The body does not parse as JSON; the parser's message.
    #[error("body is not valid JSON: {0}")]
    NotJson(String),
    /// Valid JSON, but not an object.
    #[error("body is not a JSON object")]
    NotAnObject,
    /// Neither a handshake nor a batch: no `messages` member.
    #[error("`messages` is missing")]
    MissingMessages,
    /// `messages` is there but is not an object of event lists.
    #[error("`messages` is not an object")]
    MessagesNotAnObject,
    /// Nesting deep enough to be an attack on the parser rather than an event.
    #[error("JSON nested deeper than {MAX_DEPTH} levels")]
    TooDeep,
}

impl BodyError {
    pub(crate) fn code(&self) -> &'static str {
        match self {
            BodyError::NotJson(_) => "invalid_json",
            BodyError::NotAnObject => "not_an_object",
            BodyError::MissingMessages => "missing_messages",
            BodyError::MessagesNotAnObject => "messages_not_object",
            BodyError::TooDeep => "too_deep",
        }
    }
}

/// What a webhook body turned out to be.
#[derive(Debug)]
pub enum Body<'a> {
    /// `{"token": T, "validToken": true}`, sent when the URL is saved in Huggy.
    Handshake {
        /// The token to echo back, when it is a JSON string without escapes.
        token: Option<&'a str>,
    },
    /// Events, grouped by type under `messages`.
    Batch(Batch<'a>),
}

/// A batch of events, borrowed from the request body.
#[derive(Debug)]
pub struct Batch<'a> {
    /// The batch token, when it is a JSON string without escapes (Huggy's tokens are hex).
    pub(crate) token: Option<&'a str>,
    /// Batch `time` in unix seconds, when present and numeric.
    time: Option<i64>,
    /// What tells this batch apart from others in its events' ids.
    pub(crate) stamp: BatchStamp,
    /// `messages` in document order: (event type as sent, the value under it).
    groups: Vec<(String, Group<'a>)>,
}

/// The value under one event type in `messages`.
#[derive(Debug)]
enum Group<'a> {
    /// An array: its elements, each an event (or not, which [`split`] dead-letters).
    Events(Vec<&'a RawValue>),
    /// Anything else, dead-lettered whole.
    NotAnArray(&'a RawValue),
}

/// The envelope in one pass over the body: `messages` read straight into its groups' events.
#[derive(Deserialize)]
struct FastEnvelope<'a> {
    #[serde(borrow, default)]
    token: Option<&'a RawValue>,
    /// Not used here, but declared so that a duplicate `validToken` is refused as the general
    /// path refuses it.
    #[serde(rename = "validToken", borrow, default)]
    _valid_token: Option<&'a RawValue>,
    #[serde(borrow, default)]
    time: Option<&'a RawValue>,
    /// An object whose every member is an array; anything else fails to deserialize, and the body
    /// goes down the general path.
    #[serde(borrow, default)]
    messages: Option<Members<Vec<&'a RawValue>>>,
}

/// The envelope with `messages` kept raw, for the general path.
#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow, default)]
    token: Option<&'a RawValue>,
    #[serde(rename = "validToken", borrow, default)]
    valid_token: Option<&'a RawValue>,
    #[serde(borrow, default)]
    time: Option<&'a RawValue>,
    #[serde(borrow, default)]
    messages: Option<&'a RawValue>,
}

/// Parses a webhook body. Borrowed parts point into `body`.
///
/// # Errors
/// [`BodyError`] when the body is not JSON, not an object, or `messages` is not an object.
pub fn parse_body(body: &[u8]) -> Result<Body<'_>, BodyError> {
    if nesting_exceeds(body, MAX_DEPTH) {
        return Err(BodyError::TooDeep);
    }
    let trimmed = body.trim_ascii_start();
    if !trimmed.starts_with(b"{") {
        return match serde_json::from_slice::<IgnoredAny>(body) {
            Ok(_) => Err(BodyError::NotAnObject),
            Err(e) => Err(BodyError::NotJson(e.to_string())),
        };
    }
    // The usual batch — a numeric `time` and `messages` an object of arrays — in one pass. Anything
    // else (a handshake, no `time`, a member that is not an array, `messages` not an object, an
    // invalid body) is read again by the general path below, which keeps the raw values it needs
    // and decides what the body is.
    if let Ok(fast) = serde_json::from_slice::<FastEnvelope<'_>>(body) {
        let time = fast.time.and_then(|t| t.get().parse::<i64>().ok());
        if let (Some(t), Some(Members(groups))) = (time, fast.messages) {
            return Ok(Body::Batch(Batch {
                token: fast.token.and_then(raw_plain_str),
                time: Some(t),
                stamp: BatchStamp::Time(t),
                groups: groups.into_iter().map(|(k, events)| (k, Group::Events(events))).collect(),
            }));
        }
    }
    let env: Envelope<'_> = serde_json::from_slice(body).map_err(|e| BodyError::NotJson(e.to_string()))?;
    let token = env.token.and_then(raw_plain_str);
    let is_handshake = env.valid_token.is_some_and(|v| v.get() == "true");
    let Some(messages) = env.messages.filter(|m| m.get() != "null") else {
        return if is_handshake { Ok(Body::Handshake { token }) } else { Err(BodyError::MissingMessages) };
    };
    if !messages.get().starts_with('{') {
        return Err(BodyError::MessagesNotAnObject);
    }
    let groups = serde_json::from_str::<Members<&RawValue>>(messages.get())
        .map_err(|e| BodyError::NotJson(e.to_string()))?
        .0
        .into_iter()
        .map(|(k, raw)| match serde_json::from_str::<Vec<&RawValue>>(raw.get()) {
            Ok(events) => (k, Group::Events(events)),
            Err(_) => (k, Group::NotAnArray(raw)),
        })
        .collect();
    let time = env.time.and_then(|t| t.get().parse::<i64>().ok());
    let stamp = match time {
        Some(t) => BatchStamp::Time(t),
        None => BatchStamp::Untimed(Sha256::digest(messages.get().as_bytes()).into()),
    };
    Ok(Body::Batch(Batch { token, time, stamp, groups }))
}

/// The batch's part of its events' ids (SPEC §5): the batch `time`, which Huggy sets on every batch
/// and keeps on a re-send, so a state that returns in a later batch gets a new id.
///
/// A batch without an integer `time` has nothing that tells it apart from the next batch but its
/// content. Receipt time would give a re-sent batch new ids (duplicates published); nothing at all
/// would merge a returning state with its first occurrence across any two such batches. The digest of
/// the `messages` bytes is the middle way: a verbatim re-send keeps its ids, and an event repeated in a
/// later batch gets a new id unless the whole batch is byte-identical — which is indistinguishable
/// from a re-send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BatchStamp {
    Time(i64),
    /// SHA-256 of the raw `messages` value.
    Untimed([u8; 32]),
}

/// Deepest nesting of arrays and objects accepted in a body (serde_json's own limit is 128; events
/// are a few levels deep).
pub(crate) const MAX_DEPTH: usize = 64;

/// Whether `[`/`{` nesting outside strings goes deeper than `limit`. A single pass without
/// recursion, so a hostile body cannot exhaust the stack here or in any consumer downstream.
fn nesting_exceeds(body: &[u8], limit: usize) -> bool {
    let mut depth = 0usize;
    let mut i = 0;
    while i < body.len() {
        match body[i] {
            // Strings are most of a body: jump over them.
            b'"' => i = string_end(body, i + 1),
            b'[' | b'{' => {
                depth += 1;
                if depth > limit {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    false
}

/// The top-level `token` member of a body, found without parsing it: one pass over the bytes that
/// jumps over strings and nested values, no allocation. `None` when the body is not an object, has
/// no top-level `token`, or its value is not a plain string (the full parse then decides). Lets the
/// webhook refuse a body with a wrong token before it spends a full parse on it; the first `token`
/// member counts (a body with two is refused by the full parse anyway).
pub fn top_level_token(body: &[u8]) -> Option<&str> {
    let skip_ws = |mut i: usize| {
        while body.get(i).is_some_and(u8::is_ascii_whitespace) {
            i += 1;
        }
        i
    };
    let mut i = skip_ws(0);
    if body.get(i) != Some(&b'{') {
        return None;
    }
    i += 1;
    loop {
        i = skip_ws(i);
        if body.get(i) != Some(&b'"') {
            return None;
        }
        let key_end = string_end(body, i + 1);
        let key = body.get(i + 1..key_end)?;
        i = skip_ws(key_end + 1);
        if body.get(i) != Some(&b':') {
            return None;
        }
        i = skip_ws(i + 1);
        let value_start = i;
        i = value_end(body, i)?;
        if key == b"token" {
            let raw = std::str::from_utf8(&body[value_start..i]).ok()?;
            let inner = raw.strip_prefix('"')?.strip_suffix('"')?;
            return (!inner.contains('\\')).then_some(inner);
        }
        i = skip_ws(i);
        match body.get(i) {
            Some(b',') => i += 1,
            _ => return None,
        }
    }
}

/// The index just past the JSON value starting at `from`, skipping nested arrays and objects by
/// counting brackets outside strings (no recursion); `None` when the body ends first.
fn value_end(body: &[u8], from: usize) -> Option<usize> {
    let mut depth = 0usize;
    let mut i = from;
    loop {
        match *body.get(i)? {
            b'"' => {
                i = string_end(body, i + 1);
                body.get(i)?;
            }
            b'[' | b'{' => depth += 1,
            b']' | b'}' if depth > 0 => depth -= 1,
            b',' | b']' | b'}' if depth == 0 => return Some(i),
            c if depth == 0 && c.is_ascii_whitespace() => return Some(i),
            _ => {}
        }
        i += 1;
        if depth == 0 && matches!(body.get(i - 1), Some(b'"' | b']' | b'}')) {
            return Some(i);
        }
    }
}

/// A JSON string value without escapes, borrowed; `None` for anything else (numbers, objects,
/// escaped strings). Tokens and ids Huggy sends never need escapes.
fn raw_plain_str(raw: &RawValue) -> Option<&str> {
    let s = raw.get();
    let inner = s.strip_prefix('"')?.strip_suffix('"')?;
    (!inner.contains('\\') && !inner.contains('"')).then_some(inner)
}

/// The members of a JSON object, in document order, duplicates kept: `messages` read by the general
/// path as `Members<&RawValue>`, and by the fast path as `Members<Vec<&RawValue>>`, which fails on
/// any member that is not an array.
struct Members<V>(Vec<(String, V)>);

impl<'de, V: Deserialize<'de>> Deserialize<'de> for Members<V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit<V>(std::marker::PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for Visit<V> {
            type Value = Members<V>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object of event lists")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(k) = map.next_key::<String>()? {
                    out.push((k, map.next_value::<V>()?));
                }
                Ok(Members(out))
            }
        }
        d.deserialize_map(Visit(std::marker::PhantomData))
    }
}

/// A Huggy event split out of a batch, ready to be made durable and published.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Deterministic id: the same batch delivered again gives the same ids (`ce_id`).
    pub id: EventId,
    /// The normalized type, which picks the topic.
    pub event_type: EventType,
    /// The type as Huggy spelled it, when it was renamed (`sendedAllMessage`).
    pub(crate) original_type: Option<String>,
    /// The ordering key, a decimal string (chat, customer, agent or company id).
    pub key: Option<String>,
    /// Company id, for `ce_source`.
    pub(crate) company: Option<String>,
    /// Batch time (unix seconds), receipt time when the batch had none.
    pub(crate) time: i64,
    /// The event's bytes exactly as received.
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
    /// Set when the event cannot be published to its topic and goes to the dead-letter topic.
    pub dead_letter: Option<String>,
    /// File URLs to capture before publishing (filled by the files stage, empty otherwise).
    pub(crate) files: Vec<String>,
    /// The bridge's file results (a JSON array), published as header `huggy_bridge_files` once the
    /// files are stored or definitively failed. Never part of the value: a sender cannot write it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) file_results: Option<String>,
    /// What the spool's dedup needs besides the id (SPEC §5): the event's stream and that stream's
    /// run in its batch. In memory only, never in the spool's frames: `None` for events read back
    /// from disk and for events made outside a batch, which are then judged by their id alone.
    #[serde(skip)]
    pub(crate) lineage: Option<Box<Lineage>>,
    /// The routing headers, read in the same parse as the key.
    #[serde(default)]
    pub routing: Routing,
}

impl Event {
    pub(crate) fn ce_source(&self) -> String {
        format!("huggy://company/{}", self.company.as_deref().unwrap_or("unknown"))
    }

    pub(crate) fn ce_type(&self) -> String {
        format!("app.huggy.{}", self.event_type.as_str())
    }

    /// The event's time in Unix milliseconds, read from the batch `time` as Huggy may send it
    /// ([`time_millis`]); `None` when it is a plausible time in neither seconds nor milliseconds.
    pub fn time_millis(&self) -> Option<i64> {
        time_millis(self.time)
    }

    /// The `ce_time` header: the event's time as RFC 3339 (whole seconds, or milliseconds when the
    /// batch `time` had them); `None` when the batch `time` is not a plausible time, so the header
    /// is left out and the event still published (SPEC §5).
    pub fn ce_time(&self) -> Option<String> {
        let ms = self.time_millis()?;
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.unsigned_abs());
        Some(if ms % 1000 == 0 {
            humantime::format_rfc3339_seconds(t).to_string()
        } else {
            humantime::format_rfc3339_millis(t).to_string()
        })
    }
}

/// The times the bridge vouches for: 2000-01-01T00:00:00Z up to (not including) 2200-01-01, in
/// Unix seconds. Huggy sends seconds; some senders send milliseconds; the two windows are far apart
/// (10 digits against 13), so a value is read in the unit that makes it plausible.
const PLAUSIBLE_SECS: std::ops::Range<i64> = 946_684_800..7_258_118_400;

/// A batch `time` in Unix milliseconds: seconds (what Huggy documents) are scaled, milliseconds are
/// kept, and anything that is a plausible time in neither unit — negative, zero, a year past 2200
/// or before 2000 — is `None`. Never panics and never overflows, whatever a client sends.
pub fn time_millis(time: i64) -> Option<i64> {
    if PLAUSIBLE_SECS.contains(&time) {
        Some(time * 1000)
    } else if (PLAUSIBLE_SECS.start * 1000..PLAUSIBLE_SECS.end * 1000).contains(&time) {
        Some(time)
    } else {
        None
    }
}

/// Deterministic event id (SPEC §5), shown as 32 hex digits: the first 128 bits of SHA-256 over
///
/// | part | encoding |
/// |---|---|
/// | source | 16 bytes: [`Source`], a digest of the batch token (never the token itself) |
/// | normalized event type | u32 big-endian length, then the UTF-8 bytes |
/// | batch stamp | `0x01` + `time` as i64 big-endian, or `0x00` + SHA-256 of `messages` (no `time`) |
/// | event bytes, as received | u64 big-endian length, then the bytes |
/// | occurrence number | u32 big-endian: 0 for the first event of this type with these bytes in the batch, 1 for the next… |
///
/// The same batch delivered again yields the same ids; a state that returns in a later batch, or an
/// event repeated within one batch, gets a new one; the same event sent with two tokens is two
/// events. A state that returns within the same second (same batch `time`) has the id of its first
/// occurrence: the spool's dedup tells it from a re-send by its [`Lineage`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct EventId(pub [u8; 16]);

impl EventId {
    pub(crate) fn new(source: &Source, event_type: &str, stamp: &BatchStamp, value: &[u8], occurrence: u32) -> Self {
        Self::finish(Self::prefix(source, event_type, stamp, value), occurrence)
    }

    /// The digest over everything but the occurrence number, to finish once per occurrence.
    fn prefix(source: &Source, event_type: &str, stamp: &BatchStamp, value: &[u8]) -> Sha256 {
        let mut h = Sha256::new();
        h.update(source.0);
        h.update(u32::try_from(event_type.len()).unwrap_or(u32::MAX).to_be_bytes());
        h.update(event_type.as_bytes());
        match stamp {
            BatchStamp::Time(t) => {
                h.update([1u8]);
                h.update(t.to_be_bytes());
            }
            BatchStamp::Untimed(digest) => {
                h.update([0u8]);
                h.update(digest);
            }
        }
        h.update((value.len() as u64).to_be_bytes());
        h.update(value);
        h
    }

    fn finish(mut h: Sha256, occurrence: u32) -> Self {
        h.update(occurrence.to_be_bytes());
        let digest = h.finalize();
        let mut id = [0u8; 16];
        id.copy_from_slice(&digest[..16]);
        EventId(id)
    }

    /// The id of a lone event in a batch stamped `time` 0 from [`Source::NONE`]: for tests and
    /// tools that need an id for bytes outside any batch. Webhook events get theirs from [`split`].
    pub fn derive(event_type: &str, value: &[u8]) -> Self {
        Self::new(&Source::NONE, event_type, &BatchStamp::Time(0), value, 0)
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EventId({self})")
    }
}

/// Splits a batch into events, in document order. Never fails: an event that cannot be published to
/// its own topic comes back with `dead_letter` set, so its siblings are still accepted.
///
/// ```
/// use huggy_bridge::event::{parse_body, split, Body};
///
/// let body = br#"{"time":1700000000,"token":"t","messages":{"receivedMessage":[{"id":1, "chat":{"id":42}}, 7]}}"#;
/// use huggy_bridge::event::Sender;
///
/// let Ok(Body::Batch(batch)) = parse_body(body) else { panic!("a batch") };
/// let events = split(&batch, &Sender::token("t"), 0);
/// assert_eq!(events[0].key.as_deref(), Some("42"));
/// assert_eq!(events[0].value, br#"{"id":1, "chat":{"id":42}}"#, "byte for byte");
/// assert_eq!(events[0].ce_time().as_deref(), Some("2023-11-14T22:13:20Z"));
/// assert_eq!(events[1].dead_letter.as_deref(), Some("event is not an object"));
/// ```
pub fn split(batch: &Batch<'_>, sender: &Sender, received_at: i64) -> Vec<Event> {
    let time = batch.time.unwrap_or(received_at);
    let account = sender.account.as_deref();
    let mut seen = Occurrences { source: sender.source, counts: HashMap::new() };
    let mut out = Vec::new();
    // The type each event's stream is named by (the id's type name), in the order of `out`.
    let mut stream_types: Vec<String> = Vec::new();
    for (raw_type, list) in &batch.groups {
        let parsed = EventType::parse(raw_type);
        let (event_type, original_type, type_problem) = match parsed {
            Ok((t, renamed)) => (t, renamed.then(|| raw_type.clone()), None),
            Err(reason) => (EventType::Unknown("invalid".into()), None, Some(reason)),
        };
        // The name in the id: the normalized one, or the type as sent when it is invalid
        // ("invalid" would merge events of different bad types).
        let id_type: &str = match (&event_type, &type_problem) {
            (EventType::Known(k), _) => k.as_str(),
            _ => raw_type,
        };
        let items = match list {
            Group::Events(items) => items,
            Group::NotAnArray(raw) => {
                let id = seen.id(id_type, &batch.stamp, raw.get().as_bytes());
                out.push(dead_event(id, &event_type, raw, time, account, "event list is not an array".into()));
                stream_types.push(id_type.to_owned());
                continue;
            }
        };
        for item in items.iter().copied() {
            let id = seen.id(id_type, &batch.stamp, item.get().as_bytes());
            let mut ev = build_event(id, &event_type, original_type.clone(), item, time, account);
            if let Some(reason) = &type_problem {
                ev.dead_letter = Some(reason.clone());
            }
            out.push(ev);
            stream_types.push(id_type.to_owned());
        }
    }
    lineage::assign(&mut out, &stream_types, &sender.source);
    out
}

/// How many times each (type, bytes) pair has come up so far in one batch, for the occurrence number
/// of [`EventId`]. Pairs are told apart by the id of their first occurrence, which is computed
/// anyway, rather than by hashing the event's bytes a second time.
struct Occurrences {
    source: Source,
    counts: HashMap<EventId, u32>,
}

impl Occurrences {
    fn id(&mut self, event_type: &str, stamp: &BatchStamp, value: &[u8]) -> EventId {
        let prefix = EventId::prefix(&self.source, event_type, stamp, value);
        let first = EventId::finish(prefix.clone(), 0);
        let n = self.counts.entry(first).or_insert(0);
        let id = if *n == 0 { first } else { EventId::finish(prefix, *n) };
        *n = n.saturating_add(1);
        id
    }
}

/// The dead-letter reason of an event whose token's account is not the company it names.
pub const COMPANY_MISMATCH: &str = "company_mismatch";

/// An event that cannot go to its topic. Its company is its token's account's, if any: nothing the
/// event says about itself is trusted.
fn dead_event(
    id: EventId,
    event_type: &EventType,
    raw: &RawValue,
    time: i64,
    account: Option<&str>,
    reason: String,
) -> Event {
    Event {
        id,
        event_type: event_type.clone(),
        original_type: None,
        key: account.map(str::to_owned),
        company: account.map(str::to_owned),
        time,
        value: raw.get().as_bytes().to_vec(),
        dead_letter: Some(reason),
        files: Vec::new(),
        file_results: None,
        lineage: None,
        routing: Routing::default(),
    }
}

/// Builds one event. With a token bound to an account (`account`), the company is the account's
/// whatever the event says; an event that names another company is dead-lettered
/// ([`COMPANY_MISMATCH`]), so no account's token can publish under another's name.
fn build_event(
    id: EventId,
    event_type: &EventType,
    original_type: Option<String>,
    raw: &RawValue,
    time: i64,
    account: Option<&str>,
) -> Event {
    if !raw.get().starts_with('{') {
        return dead_event(id, event_type, raw, time, account, "event is not an object".into());
    }
    if has_lone_surrogate(raw.get()) {
        let reason = "event has a \\u escape of a lone UTF-16 surrogate".into();
        return dead_event(id, event_type, raw, time, account, reason);
    }
    let fields = match fields::read(event_type, raw) {
        Ok(f) => f,
        Err(e) => return dead_event(id, event_type, raw, time, account, format!("event cannot be read: {e}")),
    };
    let claimed = fields.company;
    let mismatch = match (account, &claimed) {
        (Some(a), Some(c)) => a.trim_start_matches('0') != c.trim_start_matches('0'),
        _ => false,
    };
    let company = account.map(str::to_owned).or(claimed);
    let key = fields.key.or_else(|| company.clone());
    Event {
        id,
        event_type: event_type.clone(),
        original_type,
        key,
        company,
        time,
        value: raw.get().as_bytes().to_vec(),
        dead_letter: mismatch.then(|| COMPANY_MISMATCH.to_owned()),
        files: Vec::new(),
        file_results: None,
        lineage: None,
        routing: fields.routing,
    }
}

/// The routing headers of an event's bytes, read as [`split`] reads them; for events stored before
/// the spool kept them.
pub(crate) fn routing_of(event_type: &EventType, value: &[u8]) -> Routing {
    std::str::from_utf8(value)
        .ok()
        .filter(|v| v.starts_with('{'))
        .and_then(|v| serde_json::from_str::<&RawValue>(v).ok())
        .and_then(|raw| fields::read(event_type, raw).ok())
        .map(|f| f.routing)
        .unwrap_or_default()
}

/// Whether a `\\uD800`–`\\uDFFF` escape appears without its pair: valid JSON grammar, but not
/// Unicode, and many consumers reject or mangle it.
fn has_lone_surrogate(json: &str) -> bool {
    let b = json.as_bytes();
    let hex_at = |i: usize| -> Option<u16> {
        let h = b.get(i..i + 4)?;
        u16::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok()
    };
    let mut i = 0;
    while i + 1 < b.len() {
        // Escapes are rare: jump to the next backslash.
        match memchr::memchr(b'\\', &b[i..]) {
            Some(at) => i += at,
            None => break,
        }
        if i + 1 >= b.len() {
            break;
        }
        if b[i + 1] != b'u' {
            i += 2;
            continue;
        }
        let Some(u) = hex_at(i + 2) else { return false };
        i += 6;
        match u {
            0xD800..=0xDBFF => {
                let low = (b.get(i) == Some(&b'\\') && b.get(i + 1) == Some(&b'u')).then(|| hex_at(i + 2)).flatten();
                match low {
                    Some(0xDC00..=0xDFFF) => i += 6,
                    _ => return true,
                }
            }
            0xDC00..=0xDFFF => return true,
            _ => {}
        }
    }
    false
}

/// A JSON integer, or a string of decimal digits, as a decimal string; digits are kept as written, so
/// ids beyond 2^64 survive.
fn decimal(raw: &RawValue) -> Option<String> {
    let s = raw.get();
    let digits = s.strip_prefix('"').and_then(|s| s.strip_suffix('"')).unwrap_or(s);
    let valid = !digits.is_empty() && digits.len() <= 40 && digits.bytes().all(|b| b.is_ascii_digit());
    valid.then(|| digits.to_owned())
}

#[cfg(test)]
pub(crate) mod tests;
