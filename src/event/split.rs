//! Splitting a parsed batch into events: each event's type, id, key, company and routing headers,
//! and the reasons an event is dead-lettered instead of published.

use serde_json::value::RawValue;

use super::id::Occurrences;
use super::parse::{Batch, Group};
use super::{fields, lineage, Event, EventId, EventType, Routing, Sender};

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
    let mut seen = Occurrences::new(sender.source);
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

/// The dead-letter reason of an event whose token's account is not the company it names.
pub const COMPANY_MISMATCH: &str = "company_mismatch";

/// The dead-letter reason of an event with a `\u` escape of a lone UTF-16 surrogate.
const LONE_SURROGATE: &str = "event has a \\u escape of a lone UTF-16 surrogate";

/// How the dead-letter reason of an event the parser refused begins (a duplicated key member:
/// which one would be the key?); the parser's message follows.
const UNREADABLE: &str = "event cannot be read: ";

/// How the dead-letter reason of an event under an invalid type name begins (see
/// [`EventType::parse`]); the name itself is not kept.
const INVALID_TYPE: &str = "event type ";

/// Whether a dead-letter reason is one of the bridge's refusals of the event itself: what no
/// configuration, ACL or topic fixed later can cure, so publishing the same bytes again would
/// undo the refusal ([`COMPANY_MISMATCH`]: the event under its token's account's name although it
/// names another company; a lone surrogate; a duplicated key member; an invalid type name).
/// `dead-letter replay` leaves these unless the operator names their reason.
pub(crate) fn is_refusal(reason: &str) -> bool {
    reason == COMPANY_MISMATCH
        || reason == LONE_SURROGATE
        || reason.starts_with(UNREADABLE)
        || reason.starts_with(INVALID_TYPE)
}

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
/// whatever the event says; an event with a company member (`company.id`, `companyID`) that names
/// another company, holds no readable id, or is duplicated with another value is dead-lettered
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
        return dead_event(id, event_type, raw, time, account, LONE_SURROGATE.into());
    }
    let fields = match fields::read(event_type, raw, account.is_some()) {
        Ok(f) => f,
        Err(e) => return dead_event(id, event_type, raw, time, account, format!("{UNREADABLE}{e}")),
    };
    let claimed = fields.company;
    let mismatch = account.is_some_and(|a| !claims_only(a, &fields.company_claims));
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

/// Whether every company id an event states (`claims`, see `fields`) is `account`: a member that
/// names another company, or holds no id one can read, or is duplicated with another value, fails.
/// An event that states none is the account's. Leading zeros do not make another id (`"015693"`).
fn claims_only(account: &str, claims: &[Option<String>]) -> bool {
    let account = account.trim_start_matches('0');
    claims.iter().all(|c| c.as_deref().is_some_and(|c| c.trim_start_matches('0') == account))
}

/// The routing headers of an event's bytes, read as [`split`] reads them; for events stored before
/// the spool kept them.
pub(crate) fn routing_of(event_type: &EventType, value: &[u8]) -> Routing {
    std::str::from_utf8(value)
        .ok()
        .filter(|v| v.starts_with('{'))
        .and_then(|v| serde_json::from_str::<&RawValue>(v).ok())
        .and_then(|raw| fields::read(event_type, raw, false).ok())
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
