//! What tells a re-sent batch from a state that returns (SPEC §5 Event id, *Revised*).
//!
//! An event id is a function of the batch: token ([`Source`]), type, batch `time`, bytes and
//! occurrence. Huggy's `time` has one-second resolution and many events carry no time of their
//! own, so an agent that goes online, offline, online within one second sends a third batch that is
//! byte-identical to the first: same ids. The id alone cannot tell it from a re-send; the order of
//! what was accepted can. So the spool answers an event as a duplicate only when its id was stored
//! before **and** the last batch accepted for its *stream* — same source, type and key — carried
//! exactly the same run of that stream's events as this batch does. Anything accepted for the
//! stream in between (offline) makes the returning state (online) a new event.
//!
//! The one ambiguous case left: a batch re-sent *after* a later batch of the same stream was
//! accepted (Huggy retries an old batch late) is published again, a duplicate with the same event
//! id — at-least-once, the safe side: a duplicate is visible and removable by its id, a dropped
//! state is not. The same holds for streams the spool does not remember (after a crash — a clean
//! shutdown saves them —, or beyond the ceiling of [`StreamRuns`]).
//!
//! Pure: no I/O.

use std::collections::HashMap;

use sha2::{Digest, Sha256};

use super::id::{first_128, Source};
use super::Event;

/// An event's place among the events of its stream (source, type, key).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Lineage {
    /// Digest of (source, type, key).
    pub stream: [u8; 16],
    /// Digest of the ids, in order, of every event of this stream in the event's batch: the same for
    /// all of them, and equal between two batches only if they carry the same run of the stream.
    pub run: [u8; 16],
}

fn stream_of(source: &Source, id_type: &str, key: Option<&str>) -> [u8; 16] {
    let mut h = Sha256::new();
    h.update(b"huggy-bridge stream v1\0");
    h.update(source.0);
    h.update(u32::try_from(id_type.len()).unwrap_or(u32::MAX).to_be_bytes());
    h.update(id_type.as_bytes());
    match key {
        Some(k) => {
            h.update([1]);
            h.update(k.as_bytes());
        }
        None => h.update([0]),
    }
    first_128(h)
}

/// Gives every event of one batch its [`Lineage`]; `id_types[i]` is the type name in `events[i]`'s id.
pub(crate) fn assign(events: &mut [Event], id_types: &[String], source: &Source) {
    let streams: Vec<[u8; 16]> =
        events.iter().zip(id_types).map(|(ev, ty)| stream_of(source, ty, ev.key.as_deref())).collect();
    let mut runs: HashMap<[u8; 16], Sha256> = HashMap::new();
    for (ev, stream) in events.iter().zip(&streams) {
        runs.entry(*stream).or_insert_with(|| {
            let mut h = Sha256::new();
            h.update(stream);
            h
        });
        if let Some(h) = runs.get_mut(stream) {
            h.update(ev.id.0);
        }
    }
    let runs: HashMap<[u8; 16], [u8; 16]> = runs.into_iter().map(|(s, h)| (s, first_128(h))).collect();
    for (ev, stream) in events.iter_mut().zip(streams) {
        ev.lineage = runs.get(&stream).map(|run| Box::new(Lineage { stream, run: *run }));
    }
}

/// Largest bytes one remembered stream costs in [`StreamRuns`]: 33 bytes (stream, run, control
/// byte) at the lowest load factor a table has right after it doubled (7/16).
pub const STREAM_MAX_BYTES: u64 = 76;

/// The last run accepted per stream, for at least `window` seconds and at most `max_streams`
/// streams: two tables, the current one and the one before; the older is dropped whole when the
/// current one has covered a window or holds half the ceiling. A stream forgotten that way is
/// unknown, and an unknown stream's events are never duplicates: at the ceiling a re-send is
/// published again, never a state dropped. Memory: a 16-byte stream and a 16-byte run per entry in
/// a hash table (load 7/16 to 7/8): **38 to 76 bytes per stream** ([`STREAM_MAX_BYTES`]), so
/// `max_streams` × 76 at most, and half as much again for a moment while the current table doubles.
#[derive(Debug)]
pub struct StreamRuns {
    window: i64,
    max_streams: usize,
    current: HashMap<[u8; 16], [u8; 16]>,
    previous: HashMap<[u8; 16], [u8; 16]>,
    current_since: i64,
}

impl StreamRuns {
    /// Remembers runs for `window_secs` (0: nothing is remembered) and at most `max_streams` streams.
    pub fn new(window_secs: i64, max_streams: usize) -> StreamRuns {
        StreamRuns {
            window: window_secs.max(0),
            max_streams,
            current: HashMap::new(),
            previous: HashMap::new(),
            current_since: i64::MIN,
        }
    }

    /// The last run recorded for `stream`, if still remembered.
    pub fn last(&self, stream: &[u8; 16]) -> Option<[u8; 16]> {
        self.current.get(stream).or_else(|| self.previous.get(stream)).copied()
    }

    /// Whether an event whose id was already stored is a re-send (see the module): its stream's last
    /// run — `pending` (this write group's batches so far) first, then what is recorded — is its own.
    /// An event without a lineage is judged by its id alone.
    pub fn is_resend(&self, lineage: Option<&Lineage>, pending: &HashMap<[u8; 16], [u8; 16]>) -> bool {
        match lineage {
            None => true,
            Some(l) => pending.get(&l.stream).copied().or_else(|| self.last(&l.stream)) == Some(l.run),
        }
    }

    /// Records `run` as the last of `stream`, accepted at `now`.
    pub fn record(&mut self, stream: [u8; 16], run: [u8; 16], now: i64) {
        if self.window == 0 || self.max_streams == 0 {
            return;
        }
        self.expire(now);
        if self.current.len() >= (self.max_streams / 2).max(1) && !self.current.contains_key(&stream) {
            // At the ceiling: the older half is forgotten (its re-sends become duplicates).
            self.rotate(now);
        }
        self.current.insert(stream, run);
    }

    /// Drops what is older than the window.
    pub fn expire(&mut self, now: i64) {
        if self.current_since == i64::MIN {
            self.current_since = now;
        }
        if now.saturating_sub(self.current_since) >= self.window.saturating_mul(2) {
            self.previous.clear();
            self.current.clear();
            self.current_since = now;
        } else if now.saturating_sub(self.current_since) >= self.window {
            self.rotate(now);
        }
    }

    fn rotate(&mut self, now: i64) {
        self.previous = std::mem::take(&mut self.current);
        self.current_since = now;
    }

    /// Every remembered stream with its last run, older first (to save and load them across a
    /// restart in the same order).
    pub fn entries(&self) -> impl Iterator<Item = ([u8; 16], [u8; 16])> + '_ {
        let older = self.previous.iter().filter(|(s, _)| !self.current.contains_key(*s));
        older.chain(self.current.iter()).map(|(s, r)| (*s, *r))
    }

    /// Streams remembered.
    pub fn len(&self) -> usize {
        self.current.len() + self.previous.len()
    }

    /// Whether no stream is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l(stream: u8, run: u8) -> Lineage {
        Lineage { stream: [stream; 16], run: [run; 16] }
    }

    #[test]
    fn a_resend_is_its_streams_last_run_and_anything_in_between_makes_it_new() {
        let mut r = StreamRuns::new(3600, 1000);
        let none = HashMap::new();
        assert!(!r.is_resend(Some(&l(1, 1)), &none), "an unknown stream has no re-sends");
        assert!(r.is_resend(None, &none), "no lineage: the id decides");
        r.record([1; 16], [1; 16], 100);
        assert!(r.is_resend(Some(&l(1, 1)), &none));
        r.record([1; 16], [2; 16], 100);
        assert!(!r.is_resend(Some(&l(1, 1)), &none), "online, offline, online: the third is new");
        assert!(r.is_resend(Some(&l(1, 2)), &none));
        let pending = HashMap::from([([1; 16], [3; 16])]);
        assert!(!r.is_resend(Some(&l(1, 2)), &pending), "a batch earlier in the same write group counts");
        assert!(!r.is_resend(Some(&l(2, 2)), &none), "streams are independent");
    }

    #[test]
    fn runs_are_kept_for_the_window_and_the_ceiling_forgets_rather_than_grows() {
        let mut r = StreamRuns::new(10, 4);
        r.record([1; 16], [1; 16], 100);
        r.expire(109);
        assert_eq!(r.last(&[1; 16]), Some([1; 16]), "within the window");
        r.expire(115);
        assert_eq!(r.last(&[1; 16]), Some([1; 16]), "kept at least a window after it was recorded");
        r.expire(131);
        assert_eq!(r.last(&[1; 16]), None, "gone after two windows");
        for s in 0..100u8 {
            r.record([s; 16], [s; 16], 200);
            assert!(r.len() <= 4, "{} streams held", r.len());
        }
        assert_eq!(r.last(&[99; 16]), Some([99; 16]), "the newest is kept");
        assert_eq!(r.last(&[0; 16]), None, "the oldest are forgotten");
        let mut off = StreamRuns::new(0, 4);
        off.record([1; 16], [1; 16], 1);
        assert!(off.is_empty(), "no window, nothing remembered");
    }
}
