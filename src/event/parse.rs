//! The webhook body: what it is (a handshake or a batch), the batch read in one pass with each
//! event borrowed as a [`RawValue`], the guard against hostile nesting, and the token found
//! without a parse of the events (a scan of the bytes, or the envelope alone). Also the readers of plain values (strings, decimal ids) out of raw JSON.

use std::fmt;

use serde::de::{IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

use super::id::BatchStamp;
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
    pub(super) time: Option<i64>,
    /// What tells this batch apart from others in its events' ids.
    pub(crate) stamp: BatchStamp,
    /// `messages` in document order: (event type as sent, the value under it).
    pub(super) groups: Vec<(String, Group<'a>)>,
}

/// The value under one event type in `messages`.
#[derive(Debug)]
pub(super) enum Group<'a> {
    /// An array: its elements, each an event (or not, which [`split`](super::split) dead-letters).
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
    #[cfg(test)]
    PARSES.with(|n| n.set(n.get() + 1));
    check_outer(body)?;
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
    let (env, messages) = read_envelope(body)?;
    let token = env.token.and_then(raw_plain_str);
    let Some(messages) = messages else {
        return Ok(Body::Handshake { token });
    };
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

#[cfg(test)]
thread_local! {
    /// Calls of [`parse_body`] on this thread, so that tests can tell a body refused before its
    /// parse from one refused after it.
    static PARSES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// How many times [`parse_body`] ran on this thread.
#[cfg(test)]
pub(crate) fn parse_count() -> usize {
    PARSES.with(std::cell::Cell::get)
}

/// The refusals of a body made before its envelope is read: nested too deep, not an object.
fn check_outer(body: &[u8]) -> Result<(), BodyError> {
    if nesting_exceeds(body, MAX_DEPTH) {
        return Err(BodyError::TooDeep);
    }
    if !body.trim_ascii_start().starts_with(b"{") {
        return match serde_json::from_slice::<IgnoredAny>(body) {
            Ok(_) => Err(BodyError::NotAnObject),
            Err(e) => Err(BodyError::NotJson(e.to_string())),
        };
    }
    Ok(())
}

/// The envelope of an object body, with its `messages` when it is a batch (`None`: a handshake).
///
/// # Errors
/// Not JSON (or a duplicate envelope member), no `messages` and not a handshake, or `messages` not
/// an object.
fn read_envelope(body: &[u8]) -> Result<(Envelope<'_>, Option<&RawValue>), BodyError> {
    let env: Envelope<'_> = serde_json::from_slice(body).map_err(|e| BodyError::NotJson(e.to_string()))?;
    let is_handshake = env.valid_token.is_some_and(|v| v.get() == "true");
    match env.messages.filter(|m| m.get() != "null") {
        None if is_handshake => Ok((env, None)),
        None => Err(BodyError::MissingMessages),
        Some(m) if !m.get().starts_with('{') => Err(BodyError::MessagesNotAnObject),
        Some(m) => Ok((env, Some(m))),
    }
}

/// The token of a body, found without reading its events: the envelope only, with `messages` kept
/// raw (borrowed, not split into events) and every other member skipped, so one pass and memory
/// that does not grow with the events. Decides exactly what [`parse_body`] decides about the token
/// and about whether the body is well-formed, which lets the webhook refuse a body without an
/// acceptable token, or a malformed one, without spending a parse of its events on it.
///
/// `Ok(Some(token))` for a handshake or a batch whose token is a JSON string without escapes (the
/// token [`parse_body`] finds); `Ok(None)` for one without a usable token: none, `null`, a number,
/// an object, a string with escapes.
///
/// # Errors
/// The [`BodyError`] [`parse_body`] refuses the body with.
pub fn envelope_token(body: &[u8]) -> Result<Option<&str>, BodyError> {
    check_outer(body)?;
    let (env, messages) = read_envelope(body)?;
    if let Some(m) = messages {
        // Read as `parse_body` reads it (its keys), keeping nothing.
        serde_json::from_str::<MemberKeys>(m.get()).map_err(|e| BodyError::NotJson(e.to_string()))?;
    }
    Ok(env.token.and_then(raw_plain_str))
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
pub(super) fn raw_plain_str(raw: &RawValue) -> Option<&str> {
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

/// A JSON object read as [`Members`] reads it (keys as strings, any values), keeping nothing.
struct MemberKeys;

impl<'de> Deserialize<'de> for MemberKeys {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> Visitor<'de> for Visit {
            type Value = MemberKeys;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object of event lists")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                while map.next_key::<String>()?.is_some() {
                    map.next_value::<IgnoredAny>()?;
                }
                Ok(MemberKeys)
            }
        }
        d.deserialize_map(Visit)
    }
}

/// A JSON integer, or a string of decimal digits, as a decimal string; digits are kept as written, so
/// ids beyond 2^64 survive.
pub(super) fn decimal(raw: &RawValue) -> Option<String> {
    let s = raw.get();
    let digits = s.strip_prefix('"').and_then(|s| s.strip_suffix('"')).unwrap_or(s);
    let valid = !digits.is_empty() && digits.len() <= 40 && digits.bytes().all(|b| b.is_ascii_digit());
    valid.then(|| digits.to_owned())
}
