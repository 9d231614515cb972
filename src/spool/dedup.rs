//! The dedup window: ids of events durably stored in the last `spool.dedup_window_secs`, so that a
//! batch Huggy sends again (it did not see our 2xx) is acknowledged without being stored twice.
//!
//! Invariant: an id enters the window only after the frame of its event is durable (the writer
//! inserts after the segment's `fdatasync`; recovery inserts what it reads from segments and from the
//! snapshot, both durable). So everything the window makes us skip was stored first.
//!
//! Memory: ids are kept in [`GENERATIONS`] slices, each covering an equal part of the window and
//! spread over [`SHARDS`] hash tables; a slice that falls out of the window is dropped whole. An
//! entry is the 16-byte id in a hash table with one control byte, at a load factor between 7/16 and
//! 7/8: **19.4 to 39 bytes per id** (see the `bytes_per_id` test), e.g. at most 14 MB for the default
//! one-hour window at 100 events/s. A table that fills up is rebuilt at twice its size with the old
//! one still held; with the ids in sixteen tables, that costs a sixteenth of a slice at a time
//! instead of the whole slice (about 50 MB at a million ids in one table).
//!
//! Persistence: ids whose segment is about to be deleted would otherwise be forgotten by a restart,
//! so before the writer deletes a segment the whole window is written to `dedup.snapshot` (temporary
//! file, `fdatasync`, rename, directory sync). The writer encodes the window ([`Dedup::snapshot`], a
//! copy of the ids) and a thread of its own writes and syncs it ([`write_snapshot`]), so requests
//! never wait for that write; the segments are deleted once it is durable. Recovery loads the
//! snapshot, then adds the ids of the events still in segments.

use std::collections::{HashSet, VecDeque};
use std::fs::{self, File};
use std::hash::{BuildHasher, Hash, Hasher};
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};

use tracing::warn;

use crate::event::EventId;

/// Slices of the window, each a hash set dropped whole when it expires.
pub(crate) const GENERATIONS: i64 = 8;
const SNAPSHOT: &str = "dedup.snapshot";
const SNAPSHOT_MAGIC: &[u8; 8] = b"HUGGYDDP";
const SNAPSHOT_VERSION: u32 = 1;

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
        &self.ids[usize::from(k.0[8]) % SHARDS]
    }

    fn insert(&mut self, k: Key) {
        self.ids[usize::from(k.0[8]) % SHARDS].insert(k);
    }

    fn len(&self) -> usize {
        self.ids.iter().map(HashSet::len).sum()
    }
}

/// The ids seen within the window.
pub(crate) struct Dedup {
    dir: PathBuf,
    window: i64,
    span: i64,
    /// Oldest first; `start`s are multiples of `span`.
    gens: VecDeque<Generation>,
}

impl Dedup {
    /// An empty window of `window_secs` (0 disables deduplication).
    pub(crate) fn new(dir: &Path, window_secs: u64) -> Dedup {
        let window = i64::try_from(window_secs).unwrap_or(i64::MAX / 4);
        Dedup { dir: dir.to_owned(), window, span: (window / GENERATIONS).max(1), gens: VecDeque::new() }
    }

    /// Loads the snapshot a previous run left, keeping what is still inside the window at `now`. A
    /// damaged snapshot is logged and ignored: it costs at most a duplicate record, never an event.
    pub(crate) fn load(&mut self, now: i64) {
        let path = self.dir.join(SNAPSHOT);
        match read_snapshot(&path) {
            Ok(entries) => {
                for (start, ids) in entries {
                    for id in ids {
                        self.insert(EventId(id), start, now);
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                warn!(path = %path.display(), error = %e, "dedup snapshot unreadable; ignored (a re-sent batch may be published twice)")
            }
        }
    }

    pub(crate) fn enabled(&self) -> bool {
        self.window > 0
    }

    /// Whether `id` was stored within the window.
    pub(crate) fn contains(&self, id: &EventId, now: i64) -> bool {
        let horizon = now - self.window;
        self.gens
            .iter()
            .rev()
            .take_while(|g| g.start + self.span > horizon)
            .any(|g| g.shard(&Key(id.0)).contains(&Key(id.0)))
    }

    /// Records `id` as stored at `at` (no-op when `at` is already outside the window).
    pub(crate) fn insert(&mut self, id: EventId, at: i64, now: i64) {
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
        self.gens[idx].insert(Key(id.0));
    }

    /// Forgets the slices that fell out of the window.
    pub(crate) fn expire(&mut self, now: i64) {
        let horizon = now - self.window;
        while self.gens.front().is_some_and(|g| g.start + self.span <= horizon) {
            self.gens.pop_front();
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.gens.iter().map(Generation::len).sum()
    }

    #[cfg(test)]
    /// Bytes the window's tables hold: buckets (capacity is 7/8 of them) of one id and one control
    /// byte each.
    pub(crate) fn heap_bytes(&self) -> usize {
        self.gens
            .iter()
            .flat_map(|g| &g.ids)
            .map(|t| (t.capacity() * 8 / 7 + 16) * (std::mem::size_of::<Key>() + 1))
            .sum()
    }

    /// Writes the window to `dedup.snapshot` durably, on the caller's thread.
    ///
    /// # Errors
    /// The snapshot could not be made durable; the caller must not delete segments then.
    #[cfg(test)]
    pub(crate) fn persist(&self) -> io::Result<()> {
        let mut snapshot = Vec::new();
        self.snapshot_into(&mut snapshot);
        write_snapshot(&self.dir, &snapshot).map(drop)
    }

    /// Writes the window in the snapshot's format into `out`, for [`write_snapshot`].
    /// `out` is cleared first; passing the same buffer each time keeps one buffer of the window's
    /// size instead of a fresh one per snapshot.
    pub(crate) fn snapshot_into(&self, out: &mut Vec<u8>) {
        out.clear();
        out.reserve(16 + self.len() * 16 + self.gens.len() * 12 + 4);
        out.extend_from_slice(SNAPSHOT_MAGIC);
        out.extend_from_slice(&SNAPSHOT_VERSION.to_le_bytes());
        out.extend_from_slice(&u32::try_from(self.gens.len()).unwrap_or(u32::MAX).to_le_bytes());
        for g in &self.gens {
            out.extend_from_slice(&g.start.to_le_bytes());
            out.extend_from_slice(&u32::try_from(g.len()).unwrap_or(u32::MAX).to_le_bytes());
            for k in g.ids.iter().flatten() {
                out.extend_from_slice(&k.0);
            }
        }
        let crc = crc32fast::hash(out);
        out.extend_from_slice(&crc.to_le_bytes());
    }
}

/// Makes `snapshot` (from [`Dedup::snapshot`]) the durable `dedup.snapshot` of `dir`: temporary
/// file, sync, rename, directory sync. Returns its size.
///
/// # Errors
/// The snapshot could not be made durable; the segments it was to cover must not be deleted.
pub fn write_snapshot(dir: &Path, snapshot: &[u8]) -> io::Result<u64> {
    let tmp = dir.join(format!("{SNAPSHOT}.tmp"));
    {
        let mut f = File::create(&tmp)?;
        f.write_all(snapshot)?;
        f.sync_data()?;
    }
    fs::rename(&tmp, dir.join(SNAPSHOT))?;
    File::open(dir)?.sync_all()?;
    Ok(snapshot.len() as u64)
}

fn read_snapshot(path: &Path) -> io::Result<Vec<(i64, Vec<[u8; 16]>)>> {
    let mut buf = Vec::new();
    BufReader::new(File::open(path)?).read_to_end(&mut buf)?;
    let bad = |why: &str| io::Error::new(io::ErrorKind::InvalidData, why.to_owned());
    if buf.len() < 20 || &buf[..8] != SNAPSHOT_MAGIC {
        return Err(bad("not a dedup snapshot"));
    }
    let (body, crc) = buf.split_at(buf.len() - 4);
    if crc32fast::hash(body) != u32::from_le_bytes(crc.try_into().expect("4 bytes")) {
        return Err(bad("checksum mismatch"));
    }
    if u32::from_le_bytes(body[8..12].try_into().expect("4 bytes")) != SNAPSHOT_VERSION {
        return Err(bad("unknown snapshot version"));
    }
    let gens = u32::from_le_bytes(body[12..16].try_into().expect("4 bytes")) as usize;
    let mut pos = 16;
    let mut out = Vec::with_capacity(gens.min(64));
    for _ in 0..gens {
        let head = body.get(pos..pos + 12).ok_or_else(|| bad("cut short"))?;
        let start = i64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
        let n = u32::from_le_bytes(head[8..12].try_into().expect("4 bytes")) as usize;
        pos += 12;
        let ids = body.get(pos..pos + n * 16).ok_or_else(|| bad("cut short"))?;
        out.push((start, ids.chunks_exact(16).map(|c| c.try_into().expect("16 bytes")).collect()));
        pos += n * 16;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u64) -> EventId {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&n.wrapping_mul(0x9E37_79B9_7F4A_7C15).to_le_bytes());
        b[8..].copy_from_slice(&n.to_le_bytes());
        EventId(b)
    }

    #[test]
    fn ids_expire_with_their_slice_and_survive_a_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = Dedup::new(dir.path(), 800);
        d.insert(id(1), 1000, 1000);
        d.insert(id(2), 1500, 1500);
        assert!(d.contains(&id(1), 1500) && d.contains(&id(2), 1500));
        d.persist().unwrap();
        let mut again = Dedup::new(dir.path(), 800);
        again.load(1500);
        assert!(again.contains(&id(1), 1500) && again.contains(&id(2), 1500) && !again.contains(&id(3), 1500));
        // 1000 falls out of an 800 s window by 1900 (+ one slice of 100 s at most).
        again.expire(2001);
        assert!(!again.contains(&id(1), 2001));
        assert!(again.contains(&id(2), 2001));
    }

    #[test]
    fn a_damaged_snapshot_is_ignored_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = Dedup::new(dir.path(), 800);
        d.insert(id(1), 1000, 1000);
        d.persist().unwrap();
        let p = dir.path().join(SNAPSHOT);
        let mut bytes = fs::read(&p).unwrap();
        bytes[20] ^= 0xff;
        fs::write(&p, bytes).unwrap();
        let mut again = Dedup::new(dir.path(), 800);
        again.load(1000);
        assert_eq!(again.len(), 0);
    }

    #[test]
    fn bytes_per_id_stay_within_the_documented_bound() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = Dedup::new(dir.path(), 3600);
        let n = 360_000u64;
        for i in 0..n {
            d.insert(id(i), 10_000 + i64::try_from(i / 100).unwrap(), 10_000 + i64::try_from(i / 100).unwrap());
        }
        assert_eq!(d.len(), n as usize);
        let per_id = d.heap_bytes() as f64 / n as f64;
        assert!((17.0..=40.0).contains(&per_id), "{per_id} bytes per id");
    }
}
