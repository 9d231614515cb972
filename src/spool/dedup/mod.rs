//! The dedup window: ids of events durably stored in the last `spool.dedup_window_secs`, so that a
//! batch Huggy sends again (it did not see our 2xx) is acknowledged without being stored twice.
//!
//! Invariant: an id enters the window only after the frame of its event is durable (the writer
//! inserts after the segment's `fdatasync`; recovery inserts what it reads from segments and from the
//! journal, both durable). So everything the window makes us skip was stored first.
//!
//! Memory: ids are kept in [`GENERATIONS`] slices, each covering an equal part of the window and
//! spread over [`SHARDS`] hash tables; a slice that falls out of the window is dropped whole. An
//! entry is the 16-byte id in a hash table with one control byte, at a load factor between 7/16 and
//! 7/8: **19.4 to 39 bytes per id** (see the `bytes_per_id` test), e.g. at most 14 MB for the default
//! one-hour window at 100 events/s. A table that fills up is rebuilt at twice its size with the old
//! one still held; with the ids in sixteen tables, that costs a sixteenth of a slice at a time
//! instead of the whole slice (about 50 MB at a million ids in one table).
//!
//! Persistence: ids whose segment is deleted would otherwise be forgotten by a restart. The
//! [`Journal`] keeps them on disk, append-only, a file per slice: the writer hands it each group's
//! ids once the group is durable (a thread of its own writes them, unsynced), and before a segment
//! is deleted the journal is synced. Deleting a segment thus costs the ids written since the last
//! deletion, never a copy of the whole window. Recovery loads the journal, then adds the ids of the
//! events still in segments (and journals them again: their earlier appends may not have been synced).

//!
//! The streams' runs, saved by a clean shutdown for the next start, are in [`runs`].

mod journal;
mod runs;

use std::collections::{HashSet, VecDeque};
use std::hash::{BuildHasher, Hash, Hasher};
use std::path::{Path, PathBuf};

use tracing::warn;

use crate::event::EventId;
pub(super) use journal::{journal_bytes, Journal};
pub(super) use runs::{save_runs, take_runs};

/// Slices of the window, each a hash set dropped whole when it expires.
const GENERATIONS: i64 = 8;

/// Most bytes an id takes in the window's tables: a table just rebuilt at twice its size, at the
/// lowest load factor (the `bytes_per_id` test holds the tables to it).
pub(crate) const MAX_BYTES_PER_ID: u64 = 40;

/// Most bytes the window takes when `ids` ids are stored per `dedup_window_secs`: the window and the
/// slice that has not yet expired whole, plus one table of a slice held twice while it is rebuilt.
pub(crate) fn max_memory_bytes(ids: u64) -> u64 {
    let slice = ids / GENERATIONS.unsigned_abs() + 1;
    let rebuilding = slice / SHARDS as u64 + 1;
    ids.saturating_add(slice).saturating_add(rebuilding).saturating_mul(MAX_BYTES_PER_ID)
}

/// Ids are SHA-256 output: their first eight bytes are already a uniform hash.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Key([u8; 16]);

impl Hash for Key {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(u64::from_le_bytes(self.0[..8].try_into().expect("8 bytes")));
    }
}

#[derive(Clone, Copy, Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

#[derive(Clone, Copy, Default)]
struct BuildIdHasher;

impl BuildHasher for BuildIdHasher {
    type Hasher = IdHasher;
    fn build_hasher(&self) -> IdHasher {
        IdHasher(0)
    }
}

/// Each slice's ids are spread over this many tables, so that a table that grows (doubling, the
/// old one held until the new one is filled) adds a sixteenth of the slice to the peak, not all of it.
const SHARDS: usize = 16;

/// The table of a slice an id goes to.
fn shard_of(k: &Key) -> usize {
    usize::from(k.0[8]) % SHARDS
}

struct Generation {
    start: i64,
    /// Chosen by the id's ninth byte (the table hashes the first eight).
    ids: Vec<HashSet<Key, BuildIdHasher>>,
}

impl Generation {
    fn new(start: i64) -> Generation {
        Generation { start, ids: (0..SHARDS).map(|_| HashSet::default()).collect() }
    }

    fn shard(&self, k: &Key) -> &HashSet<Key, BuildIdHasher> {
        &self.ids[shard_of(k)]
    }

    /// Whether `k` was new.
    fn insert(&mut self, k: Key) -> bool {
        self.ids[shard_of(&k)].insert(k)
    }

    fn len(&self) -> usize {
        self.ids.iter().map(HashSet::len).sum()
    }
}

/// The ids seen within the window.
pub(super) struct Dedup {
    dir: PathBuf,
    window: i64,
    span: i64,
    /// Oldest first; `start`s are multiples of `span`.
    gens: VecDeque<Generation>,
    /// Ids held at most (`spool.dedup_max_ids`): at the ceiling the oldest slice is dropped early, so
    /// a re-send of its batches is published again (a duplicate), never an event lost.
    max_ids: usize,
    /// Ids held now.
    count: usize,
}

impl Dedup {
    /// An empty window of `window_secs` (0 disables deduplication) holding at most `max_ids` ids.
    pub(super) fn new(dir: &Path, window_secs: u64, max_ids: usize) -> Dedup {
        let window = i64::try_from(window_secs).unwrap_or(i64::MAX / 4);
        Dedup {
            dir: dir.to_owned(),
            window,
            span: (window / GENERATIONS).max(1),
            gens: VecDeque::new(),
            max_ids: max_ids.max(1),
            count: 0,
        }
    }

    pub(super) fn enabled(&self) -> bool {
        self.window > 0
    }

    /// Ids held at most (`spool.dedup_max_ids`).
    pub(super) fn max_ids(&self) -> usize {
        self.max_ids
    }

    /// Whether `id` was stored within the window.
    pub(super) fn contains(&self, id: &EventId, now: i64) -> bool {
        let horizon = now - self.window;
        self.gens
            .iter()
            .rev()
            .take_while(|g| g.start + self.span > horizon)
            .any(|g| g.shard(&Key(id.0)).contains(&Key(id.0)))
    }

    /// Records `id` as stored at `at` (no-op when `at` is already outside the window).
    pub(super) fn insert(&mut self, id: EventId, at: i64, now: i64) {
        if !self.enabled() || at + self.window < now - self.span {
            return;
        }
        let start = at - at.rem_euclid(self.span);
        let idx = match self.gens.iter().rposition(|g| g.start <= start) {
            Some(i) if self.gens[i].start == start => i,
            Some(i) => {
                self.gens.insert(i + 1, Generation::new(start));
                i + 1
            }
            None => {
                self.gens.push_front(Generation::new(start));
                0
            }
        };
        if self.gens[idx].insert(Key(id.0)) {
            self.count += 1;
        }
        // At the ceiling the oldest slice goes (the newest, when it is the only one): its ids are
        // forgotten early, which costs at most a duplicate record of a late re-send.
        while self.count > self.max_ids {
            let Some(oldest) = self.gens.pop_front() else { break };
            self.count -= oldest.len();
            warn!(
                max_ids = self.max_ids,
                forgotten = oldest.len(),
                "dedup window at its ceiling (spool.dedup_max_ids): its oldest ids are forgotten early; a late re-send of their batches will be published again"
            );
        }
    }

    /// Forgets the slices that fell out of the window.
    pub(super) fn expire(&mut self, now: i64) {
        let horizon = now - self.window;
        while self.gens.front().is_some_and(|g| g.start + self.span <= horizon) {
            if let Some(g) = self.gens.pop_front() {
                self.count -= g.len();
            }
        }
    }

    pub(super) fn len(&self) -> usize {
        self.count
    }

    #[cfg(test)]
    /// Bytes the window's tables hold: buckets (capacity is 7/8 of them) of one id and one control
    /// byte each.
    fn heap_bytes(&self) -> usize {
        self.gens
            .iter()
            .flat_map(|g| &g.ids)
            .map(|t| (t.capacity() * 8 / 7 + 16) * (std::mem::size_of::<Key>() + 1))
            .sum()
    }

    /// The span of one slice, in seconds: the granularity of expiry and of the journal's files.
    fn span(&self) -> i64 {
        self.span
    }

    /// The window, in seconds.
    pub(super) fn window(&self) -> i64 {
        self.window
    }
}

#[cfg(test)]
mod tests;
