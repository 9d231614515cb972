//! Event ids (SPEC §5): who sent a batch ([`Source`], [`Sender`]), the digest that makes an
//! [`EventId`] from the batch and the event, the batch's part of it ([`BatchStamp`]), and the
//! occurrence count that keeps repeats in one batch apart.

use std::collections::HashMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Who sent a batch, as the bridge tells tokens apart without keeping them: the first 128 bits of
/// SHA-256 over a domain tag and the token. Part of every event id and dedup stream; never the token
/// itself, and not a plain hash of it either (a token cannot be looked up in a table of hashes).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Source(pub [u8; 16]);

impl Source {
    /// The source of events made outside any batch (tests, tools).
    pub const NONE: Source = Source([0; 16]);

    /// The source of batches carrying `token`.
    pub fn of_token(token: &str) -> Source {
        let mut h = Sha256::new();
        h.update(b"huggy-bridge source v1\0");
        h.update(token.as_bytes());
        Source(first_128(h))
    }
}

/// Who sent a batch, as its token says: the token's [`Source`], and the company id of its account
/// when the token is bound to one (`[[huggy.accounts]]`).
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Sender {
    /// The token's digest.
    pub source: Source,
    /// The account's company id, digits.
    pub account: Option<String>,
}

impl Sender {
    /// A token not bound to an account: its events name their company themselves.
    pub fn token(token: &str) -> Sender {
        Sender { source: Source::of_token(token), account: None }
    }
}

/// The first 128 bits of a finished digest: what ids, sources, streams and runs are made of.
pub(super) fn first_128(h: Sha256) -> [u8; 16] {
    let digest = h.finalize();
    let mut out = [0u8; 16];
    out.copy_from_slice(&digest[..16]);
    out
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
/// occurrence: the spool's dedup tells it from a re-send by its [`Lineage`](super::Lineage).
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
        EventId(first_128(h))
    }

    /// The id of a lone event in a batch stamped `time` 0 from [`Source::NONE`]: for tests and
    /// tools that need an id for bytes outside any batch. Webhook events get theirs from [`split`](super::split).
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

/// How many times each (type, bytes) pair has come up so far in one batch, for the occurrence number
/// of [`EventId`]. Pairs are told apart by the id of their first occurrence, which is computed
/// anyway, rather than by hashing the event's bytes a second time.
pub(super) struct Occurrences {
    source: Source,
    counts: HashMap<EventId, u32>,
}

impl Occurrences {
    /// No event of a batch from `source` seen yet.
    pub(super) fn new(source: Source) -> Self {
        Occurrences { source, counts: HashMap::new() }
    }

    pub(super) fn id(&mut self, event_type: &str, stamp: &BatchStamp, value: &[u8]) -> EventId {
        let prefix = EventId::prefix(&self.source, event_type, stamp, value);
        let first = EventId::finish(prefix.clone(), 0);
        let n = self.counts.entry(first).or_insert(0);
        let id = if *n == 0 { first } else { EventId::finish(prefix, *n) };
        *n = n.saturating_add(1);
        id
    }
}
