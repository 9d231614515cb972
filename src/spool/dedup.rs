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

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::fs::{self, File};
use std::hash::{BuildHasher, Hash, Hasher};
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};

use tracing::{info, warn};

use crate::event::{EventId, StreamRuns};

/// Slices of the window, each a hash set dropped whole when it expires.
pub(crate) const GENERATIONS: i64 = 8;

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
pub(crate) struct Dedup {
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
    pub(crate) fn new(dir: &Path, window_secs: u64, max_ids: usize) -> Dedup {
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
    pub(crate) fn expire(&mut self, now: i64) {
        let horizon = now - self.window;
        while self.gens.front().is_some_and(|g| g.start + self.span <= horizon) {
            if let Some(g) = self.gens.pop_front() {
                self.count -= g.len();
            }
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.count
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

    /// The span of one slice, in seconds: the granularity of expiry and of the journal's files.
    pub(crate) fn span(&self) -> i64 {
        self.span
    }

    /// The window, in seconds.
    pub(crate) fn window(&self) -> i64 {
        self.window
    }
}

/// The streams' last runs ([`StreamRuns`]) saved by a clean shutdown, for the next start: without
/// them every stream is unknown after a restart, and a batch re-sent across it is published again.
/// Read once and deleted (durably) before anything is accepted, so a later crash can never bring
/// back runs that newer batches have replaced — that could answer a returning state as a re-send.
const RUNS_SNAPSHOT: &str = "dedup-runs.snapshot";
const RUNS_MAGIC: &[u8; 8] = b"HUGGYRUN";
const RUNS_VERSION: u32 = 1;
/// Magic, version, time saved (i64), count (u64).
const RUNS_HEADER: usize = 28;

/// Saves `runs` at `now` (a clean shutdown): written aside, synced, renamed into place.
///
/// # Errors
/// The file could not be written or synced; the next start then knows no stream (re-sends across
/// the restart become duplicates).
pub(crate) fn save_runs(dir: &Path, runs: &StreamRuns, now: i64) -> io::Result<()> {
    let entries: Vec<([u8; 16], [u8; 16])> = runs.entries().collect();
    let mut buf = Vec::with_capacity(RUNS_HEADER + entries.len() * 32 + 4);
    buf.extend_from_slice(RUNS_MAGIC);
    buf.extend_from_slice(&RUNS_VERSION.to_le_bytes());
    buf.extend_from_slice(&now.to_le_bytes());
    buf.extend_from_slice(&(entries.len() as u64).to_le_bytes());
    for (stream, run) in &entries {
        buf.extend_from_slice(stream);
        buf.extend_from_slice(run);
    }
    let crc = crc32fast::hash(&buf);
    buf.extend_from_slice(&crc.to_le_bytes());
    let tmp = dir.join(format!("{RUNS_SNAPSHOT}.tmp"));
    let mut f = File::create(&tmp)?;
    f.write_all(&buf)?;
    f.sync_data()?;
    fs::rename(&tmp, dir.join(RUNS_SNAPSHOT))?;
    File::open(dir)?.sync_all()
}

/// Loads the runs a clean shutdown saved into `runs` (nothing when there is no snapshot, it is
/// damaged, or older than the window), then deletes the snapshot durably. If it cannot be deleted
/// durably, nothing is loaded.
pub(crate) fn take_runs(dir: &Path, runs: &mut StreamRuns, window: i64, now: i64) {
    let path = dir.join(RUNS_SNAPSHOT);
    let _ = fs::remove_file(dir.join(format!("{RUNS_SNAPSHOT}.tmp")));
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return,
        Err(e) => {
            warn!(path = %path.display(), error = %e, "dedup runs snapshot unreadable; ignored (a batch re-sent across the restart may be published twice)");
            Vec::new()
        }
    };
    let removed = fs::remove_file(&path).and_then(|()| File::open(dir)?.sync_all());
    if let Err(e) = removed {
        warn!(path = %path.display(), error = %e, "dedup runs snapshot cannot be deleted; ignored (a batch re-sent across the restart may be published twice)");
        return;
    }
    match parse_runs(&bytes) {
        Some((saved_at, entries)) if now.saturating_sub(saved_at) < window => {
            for (stream, run) in entries {
                runs.record(stream, run, now);
            }
            info!(streams = runs.len(), "dedup runs of the last clean shutdown loaded");
        }
        Some(_) => {}
        None if bytes.is_empty() => {}
        None => {
            warn!(path = %path.display(), "dedup runs snapshot damaged; ignored (a batch re-sent across the restart may be published twice)")
        }
    }
}

type RunEntries = Vec<([u8; 16], [u8; 16])>;

fn parse_runs(bytes: &[u8]) -> Option<(i64, RunEntries)> {
    let body = bytes.get(..bytes.len().checked_sub(4)?)?;
    let crc = u32::from_le_bytes(bytes[body.len()..].try_into().ok()?);
    if crc32fast::hash(body) != crc || body.get(..8)? != RUNS_MAGIC {
        return None;
    }
    if u32::from_le_bytes(body.get(8..12)?.try_into().ok()?) != RUNS_VERSION {
        return None;
    }
    let saved_at = i64::from_le_bytes(body.get(12..20)?.try_into().ok()?);
    let count = usize::try_from(u64::from_le_bytes(body.get(20..28)?.try_into().ok()?)).ok()?;
    let rest = body.get(RUNS_HEADER..)?;
    if rest.len() != count.checked_mul(32)? {
        return None;
    }
    let entries = rest
        .chunks_exact(32)
        .map(|c| {
            let (mut stream, mut run) = ([0u8; 16], [0u8; 16]);
            stream.copy_from_slice(&c[..16]);
            run.copy_from_slice(&c[16..]);
            (stream, run)
        })
        .collect();
    Some((saved_at, entries))
}

/// The journal's files: `dedup-<slice start>-<span>-<generation>.ids`, per slice of the window.
const JOURNAL_PREFIX: &str = "dedup-";
const JOURNAL_SUFFIX: &str = ".ids";
/// The dedup snapshot of earlier builds (the whole window in one file), read once and migrated.
const LEGACY_SNAPSHOT: &str = "dedup.snapshot";
const LEGACY_MAGIC: &[u8; 8] = b"HUGGYDDP";
const LEGACY_VERSION: u32 = 1;
/// Starts every block of ids.
const BLOCK_MAGIC: u32 = 0x4a44_4748;
/// Magic, id count, CRC-32 of the count and the ids.
const BLOCK_HEADER: usize = 12;
/// Ids in one block at most: a damaged block costs at most these.
const BLOCK_IDS: usize = 4096;

/// One file of the journal: ids stored during one slice of the window.
struct JournalFile {
    path: PathBuf,
    /// Bytes on disk.
    bytes: u64,
    /// Open for appending (or syncing) once needed in this run.
    file: Option<File>,
    /// Written since its last successful sync.
    dirty: bool,
    /// Created since the last successful sync of the directory.
    fresh: bool,
    /// A sync of it failed: what it holds beyond its last good sync may be gone whatever a later
    /// sync says ("fsyncgate"), so it is never written or synced again; the ids written since go
    /// into a fresh file. Still read at start and deleted when its slice expires.
    broken: bool,
}

/// Ids written since the last good sync, at most, before the journal syncs on its own: bounds
/// what a failed sync has to write again (24 bytes an id).
const SYNC_EVERY_IDS: usize = 65_536;

/// The dedup window on disk, append-only: the writer hands it the ids of every group it made durable
/// ([`Journal::append`], not synced), and before a segment is deleted the journal is synced
/// ([`Journal::sync`]), so every id of that segment is durable elsewhere first. Files per slice of
/// the window, deleted whole once the slice falls out of it ([`Journal::expire`]). Each deletion of
/// a segment costs the ids written since the last one, not the whole window.
///
/// Files are sequences of blocks (magic, count, CRC-32, ids); reading skips a damaged or torn block
/// and resumes at the next valid one. A lost id costs at most a duplicate record, never an event.
pub(crate) struct Journal {
    dir: PathBuf,
    window: i64,
    span: i64,
    /// By slice start, span (a change of `spool.dedup_window_secs` leaves files of another span)
    /// and generation (a new one after a failed sync).
    files: BTreeMap<FileKey, JournalFile>,
    /// Ids not written yet (a write failed, or a sync did and they are written again).
    retry: Vec<(EventId, i64)>,
    /// Ids written since the last good sync.
    unsynced: Vec<(EventId, i64)>,
    buf: Vec<u8>,
}

impl Journal {
    /// Opens the journal in the spool directory and loads the ids still inside the window at `now`
    /// into `dedup`; files out of the window are deleted (all of them when `dedup` is disabled). A
    /// snapshot left by an earlier build is loaded, written into the journal and removed.
    pub(crate) fn open(dedup: &mut Dedup, now: i64) -> Journal {
        let mut j = Journal {
            dir: dedup.dir.clone(),
            window: dedup.window(),
            span: dedup.span(),
            files: BTreeMap::new(),
            retry: Vec::new(),
            unsynced: Vec::new(),
            buf: Vec::new(),
        };
        let listed = match list_journal(&j.dir) {
            Ok(l) => l,
            Err(e) => {
                warn!(dir = %j.dir.display(), error = %e, "dedup journal unreadable; ignored (a re-sent batch may be published twice)");
                Vec::new()
            }
        };
        // A file counts only once it is durable: the run that wrote it may have ended before syncing
        // it (recovery then takes the ids from the segments instead and journals them again).
        let mut keep = Vec::new();
        for (key, path) in listed {
            let (start, span, _) = key;
            if !dedup.enabled() || start + span <= now - j.window {
                let _ = fs::remove_file(&path);
                continue;
            }
            let synced = File::open(&path).and_then(|f| f.sync_data());
            if let Err(e) = &synced {
                warn!(path = %path.display(), error = %e, "dedup journal file cannot be synced; its ids are not counted on (a re-sent batch may be published twice)");
            }
            keep.push((key, path, synced.is_ok()));
        }
        let dir_synced = keep.is_empty() || File::open(&j.dir).and_then(|d| d.sync_all()).is_ok();
        for (key, path, synced) in keep {
            let durable = synced && dir_synced;
            let bytes = if durable { fs::read(&path) } else { fs::metadata(&path).map(|_| Vec::new()) };
            let bytes = match bytes {
                Ok(b) => b,
                Err(e) => {
                    warn!(path = %path.display(), error = %e, "dedup journal file unreadable; ignored (a re-sent batch may be published twice)");
                    continue;
                }
            };
            let damaged = read_blocks(&bytes, |id| dedup.insert(EventId(id), key.0, now));
            if damaged > 0 {
                warn!(path = %path.display(), damaged_bytes = damaged, "dedup journal: skipped damaged or torn blocks (a re-sent batch may be published twice)");
            }
            let size = fs::metadata(&path).map_or(bytes.len() as u64, |m| m.len());
            // A file not known durable is kept until it expires, never written to again.
            let file = JournalFile { path, bytes: size, file: None, dirty: false, fresh: false, broken: !durable };
            j.files.insert(key, file);
        }
        j.migrate_legacy(dedup, now);
        j
    }

    fn migrate_legacy(&mut self, dedup: &mut Dedup, now: i64) {
        let path = self.dir.join(LEGACY_SNAPSHOT);
        let entries = match read_legacy_snapshot(&path) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return,
            Err(e) => {
                warn!(path = %path.display(), error = %e, "dedup snapshot unreadable; removed (a re-sent batch may be published twice)");
                let _ = fs::remove_file(&path);
                return;
            }
        };
        let mut ids = Vec::new();
        for (start, slice) in entries {
            for id in slice {
                dedup.insert(EventId(id), start, now);
                ids.push((EventId(id), start));
            }
        }
        if !dedup.enabled() {
            let _ = fs::remove_file(&path);
            return;
        }
        // The snapshot goes only once its ids are durable in the journal.
        let moved = self.append(&ids, now).and_then(|()| self.sync(now));
        match moved.and_then(|()| fs::remove_file(&path)) {
            Ok(()) => info!(ids = ids.len(), "dedup snapshot of an earlier version moved into the dedup journal"),
            Err(e) => {
                warn!(error = %e, "dedup snapshot not moved into the journal yet; it is read again at the next start")
            }
        }
    }

    /// Bytes of the journal's files on disk.
    pub(crate) fn bytes(&self) -> u64 {
        self.files.values().map(|f| f.bytes).sum()
    }

    /// Appends ids stored at the given times (ids already outside the window are left out), after
    /// any still waiting from a failure, without syncing. On failure the ids not written are kept
    /// and written again before the next [`Journal::sync`] can succeed.
    ///
    /// # Errors
    /// A file could not be created or written.
    pub(crate) fn append(&mut self, ids: &[(EventId, i64)], now: i64) -> io::Result<()> {
        let mut todo = std::mem::take(&mut self.retry);
        todo.extend_from_slice(ids);
        let horizon = now - self.window - self.span;
        todo.retain(|(_, at)| *at >= horizon);
        let mut i = 0;
        while i < todo.len() {
            let start = todo[i].1 - todo[i].1.rem_euclid(self.span);
            let mut end = i + 1;
            while end < todo.len() && end - i < BLOCK_IDS && todo[end].1 - todo[end].1.rem_euclid(self.span) == start {
                end += 1;
            }
            if let Err(e) = self.write_block(start, &todo[i..end]) {
                self.retry = todo.split_off(i);
                return Err(e);
            }
            self.unsynced.extend_from_slice(&todo[i..end]);
            i = end;
        }
        Ok(())
    }

    /// Whether so many ids were written since the last good sync that the journal should sync
    /// without being asked.
    pub(crate) fn sync_due(&self) -> bool {
        self.unsynced.len() >= SYNC_EVERY_IDS
    }

    fn write_block(&mut self, start: i64, ids: &[(EventId, i64)]) -> io::Result<()> {
        self.buf.clear();
        let count = u32::try_from(ids.len()).expect("at most BLOCK_IDS").to_le_bytes();
        self.buf.extend_from_slice(&BLOCK_MAGIC.to_le_bytes());
        self.buf.extend_from_slice(&count);
        self.buf.extend_from_slice(&[0; 4]);
        for (id, _) in ids {
            self.buf.extend_from_slice(&id.0);
        }
        let mut crc = crc32fast::Hasher::new();
        crc.update(&count);
        crc.update(&self.buf[BLOCK_HEADER..]);
        self.buf[8..12].copy_from_slice(&crc.finalize().to_le_bytes());
        let buf = std::mem::take(&mut self.buf);
        let written = self.writable(start).and_then(|entry| {
            let file = entry.file.as_mut().expect("writable files are open");
            if let Err(e) = file.write_all(&buf) {
                // Cut a partial block off, so the next append starts clean (reading would skip it anyway).
                let _ = file.set_len(entry.bytes);
                return Err(e);
            }
            entry.bytes += buf.len() as u64;
            entry.dirty = true;
            Ok(())
        });
        self.buf = buf;
        written
    }

    /// The file the ids of the slice at `start` go to, open: the newest generation of it unless
    /// that one is broken, then a fresh one.
    fn writable(&mut self, start: i64) -> io::Result<&mut JournalFile> {
        let span = self.span;
        let newest =
            self.files.range((start, span, 0)..=(start, span, u32::MAX)).next_back().map(|(k, f)| (k.2, f.broken));
        let generation = match newest {
            Some((g, false)) => g,
            Some((g, true)) => g + 1,
            None => 0,
        };
        let dir = &self.dir;
        let entry = self.files.entry((start, span, generation)).or_insert_with(|| JournalFile {
            path: dir.join(format!("{JOURNAL_PREFIX}{start:020}-{span}-{generation}{JOURNAL_SUFFIX}")),
            bytes: 0,
            file: None,
            dirty: false,
            fresh: true,
            broken: false,
        });
        if entry.file.is_none() {
            let opened = fs::OpenOptions::new().create(true).append(true).open(&entry.path)?;
            // A file left by a failed write of this run, or by an earlier run: append after what it has.
            entry.bytes = opened.metadata()?.len();
            entry.file = Some(opened);
        }
        Ok(entry)
    }

    /// Makes everything appended so far durable: the files written since their last sync, and the
    /// directory when a file is new. A failed sync breaks the files it failed on; everything
    /// written since the last good sync is then written again into fresh files before a sync can
    /// succeed.
    ///
    /// # Errors
    /// Ids could not be written, or a sync failed: the segments waiting for this sync must not
    /// be deleted.
    pub(crate) fn sync(&mut self, now: i64) -> io::Result<()> {
        // Ids that cannot be written now still leave the others to sync.
        let mut result = if self.retry.is_empty() { Ok(()) } else { self.append(&[], now) };
        for f in self.files.values_mut().filter(|f| f.dirty && !f.broken) {
            let synced = match &f.file {
                Some(file) => file.sync_data(),
                None => fs::OpenOptions::new().append(true).open(&f.path).and_then(|file| {
                    let r = file.sync_data();
                    f.file = Some(file);
                    r
                }),
            };
            match synced {
                Ok(()) => f.dirty = false,
                Err(e) => {
                    f.broken = true;
                    f.file = None;
                    if result.is_ok() {
                        result = Err(e);
                    }
                }
            }
        }
        if self.files.values().any(|f| f.fresh && !f.broken) {
            match File::open(&self.dir).and_then(|d| d.sync_all()) {
                Ok(()) => self.files.values_mut().for_each(|f| f.fresh = false),
                Err(e) => {
                    // Their names may not be durable: never count on them again.
                    for f in self.files.values_mut().filter(|f| f.fresh) {
                        f.broken = true;
                        f.file = None;
                    }
                    if result.is_ok() {
                        result = Err(e);
                    }
                }
            }
        }
        match result {
            Ok(()) => self.unsynced.clear(),
            Err(_) => {
                let mut again = std::mem::take(&mut self.unsynced);
                again.append(&mut self.retry);
                self.retry = again;
            }
        }
        result
    }

    /// Deletes the files of slices that fell out of the window at `now`.
    pub(crate) fn expire(&mut self, now: i64) {
        let horizon = now - self.window;
        let old: Vec<FileKey> = self.files.keys().filter(|(start, span, _)| start + span <= horizon).copied().collect();
        for key in old {
            let f = self.files.remove(&key).expect("listed above");
            match fs::remove_file(&f.path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    warn!(path = %f.path.display(), error = %e, "dedup journal: an expired file could not be deleted; its space stays in use");
                    self.files.insert(key, JournalFile { file: None, broken: true, ..f });
                }
            }
        }
    }
}

/// Bytes of the dedup journal's files (and of an earlier build's snapshot) in `dir`.
pub(crate) fn journal_bytes(dir: &Path) -> u64 {
    let legacy = fs::metadata(dir.join(LEGACY_SNAPSHOT)).map_or(0, |m| m.len());
    list_journal(dir).unwrap_or_default().iter().map(|(_, p)| fs::metadata(p).map_or(0, |m| m.len())).sum::<u64>()
        + legacy
}

/// A journal file's slice start, span and generation.
type FileKey = (i64, i64, u32);

/// The journal's files and their paths.
fn list_journal(dir: &Path) -> io::Result<Vec<(FileKey, PathBuf)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else { continue };
        let Some(parts) = name.strip_prefix(JOURNAL_PREFIX).and_then(|r| r.strip_suffix(JOURNAL_SUFFIX)) else {
            continue;
        };
        let mut parts = parts.splitn(3, '-').map(str::parse::<i64>);
        if let (Some(Ok(start)), Some(Ok(span)), Some(Ok(generation))) = (parts.next(), parts.next(), parts.next()) {
            if let Ok(generation) = u32::try_from(generation) {
                out.push(((start, span, generation), path));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Calls `each` for every id in the valid blocks of `bytes`; returns the bytes skipped as damaged
/// or torn. After a bad block, reading resumes at the next position where a valid block starts.
fn read_blocks(bytes: &[u8], mut each: impl FnMut([u8; 16])) -> usize {
    let mut pos = 0;
    let mut skipped = 0;
    while pos < bytes.len() {
        match valid_block(&bytes[pos..]) {
            Some(ids) => {
                for c in ids.chunks_exact(16) {
                    each(c.try_into().expect("16 bytes"));
                }
                pos += BLOCK_HEADER + ids.len();
            }
            None => {
                let magic = BLOCK_MAGIC.to_le_bytes();
                let next = (pos + 1..bytes.len().saturating_sub(3))
                    .find(|&p| bytes[p..p + 4] == magic && valid_block(&bytes[p..]).is_some())
                    .unwrap_or(bytes.len());
                skipped += next - pos;
                pos = next;
            }
        }
    }
    skipped
}

/// The ids of the block at the start of `b`, if a whole valid one is there.
fn valid_block(b: &[u8]) -> Option<&[u8]> {
    let head = b.get(..BLOCK_HEADER)?;
    if head[..4] != BLOCK_MAGIC.to_le_bytes() {
        return None;
    }
    let count = u32::from_le_bytes(head[4..8].try_into().expect("4 bytes")) as usize;
    if count > BLOCK_IDS {
        return None;
    }
    let ids = b.get(BLOCK_HEADER..BLOCK_HEADER + count * 16)?;
    let mut crc = crc32fast::Hasher::new();
    crc.update(&head[4..8]);
    crc.update(ids);
    (crc.finalize().to_le_bytes() == head[8..12]).then_some(ids)
}

fn read_legacy_snapshot(path: &Path) -> io::Result<Vec<(i64, Vec<[u8; 16]>)>> {
    let mut buf = Vec::new();
    BufReader::new(File::open(path)?).read_to_end(&mut buf)?;
    let bad = |why: &str| io::Error::new(io::ErrorKind::InvalidData, why.to_owned());
    if buf.len() < 20 || &buf[..8] != LEGACY_MAGIC {
        return Err(bad("not a dedup snapshot"));
    }
    let (body, crc) = buf.split_at(buf.len() - 4);
    if crc32fast::hash(body) != u32::from_le_bytes(crc.try_into().expect("4 bytes")) {
        return Err(bad("checksum mismatch"));
    }
    if u32::from_le_bytes(body[8..12].try_into().expect("4 bytes")) != LEGACY_VERSION {
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

    /// A window of 800 s (slices of 100 s) with its journal opened at `now`.
    fn opened(dir: &Path, now: i64) -> (Dedup, Journal) {
        let mut d = Dedup::new(dir, 800, usize::MAX);
        let j = Journal::open(&mut d, now);
        (d, j)
    }

    #[test]
    fn ids_expire_with_their_slice_and_survive_in_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let (mut d, mut j) = opened(dir.path(), 1500);
        d.insert(id(1), 1000, 1000);
        d.insert(id(2), 1500, 1500);
        assert!(d.contains(&id(1), 1500) && d.contains(&id(2), 1500));
        j.append(&[(id(1), 1000), (id(2), 1500)], 1500).unwrap();
        j.sync(1500).unwrap();
        assert_eq!(j.bytes(), 2 * (BLOCK_HEADER as u64 + 16), "one block per slice");
        drop(j);
        let (mut again, mut j) = opened(dir.path(), 1500);
        assert!(again.contains(&id(1), 1500) && again.contains(&id(2), 1500) && !again.contains(&id(3), 1500));
        // 1000 falls out of an 800 s window by 1900 (+ one slice of 100 s at most); so does its file.
        again.expire(2001);
        assert!(!again.contains(&id(1), 2001));
        assert!(again.contains(&id(2), 2001));
        j.expire(2001);
        assert_eq!(j.bytes(), BLOCK_HEADER as u64 + 16);
        assert_eq!(list_journal(dir.path()).unwrap().len(), 1);
        drop(j);
        let (again, _j) = opened(dir.path(), 2001);
        assert!(!again.contains(&id(1), 2001) && again.contains(&id(2), 2001));
    }

    #[test]
    fn a_damaged_block_costs_its_own_ids_only() {
        let dir = tempfile::tempdir().unwrap();
        let (_, mut j) = opened(dir.path(), 1000);
        for n in 0..3 {
            j.append(&[(id(n), 1000)], 1000).unwrap();
        }
        j.sync(1000).unwrap();
        let (_, p) = list_journal(dir.path()).unwrap().remove(0);
        let mut bytes = fs::read(&p).unwrap();
        let block = BLOCK_HEADER + 16;
        bytes[block + BLOCK_HEADER + 3] ^= 0xff; // an id byte of the second block
        bytes.extend_from_within(..block - 5); // and a torn block at the end
        fs::write(&p, bytes).unwrap();
        let (again, mut j) = opened(dir.path(), 1000);
        assert!(again.contains(&id(0), 1000) && !again.contains(&id(1), 1000) && again.contains(&id(2), 1000));
        // Appends after the torn block are read again at the next start.
        j.append(&[(id(7), 1000)], 1000).unwrap();
        j.sync(1000).unwrap();
        drop(j);
        let (again, _j) = opened(dir.path(), 1000);
        assert!(again.contains(&id(7), 1000) && again.contains(&id(2), 1000));
    }

    #[test]
    fn after_a_failed_sync_the_ids_since_the_last_good_one_go_into_a_fresh_file() {
        let dir = tempfile::tempdir().unwrap();
        let (_, mut j) = opened(dir.path(), 1000);
        j.append(&[(id(1), 1000)], 1000).unwrap();
        j.sync(1000).unwrap();
        j.append(&[(id(2), 1000)], 1000).unwrap();
        // What a failed sync does to the file it failed on, and to the ids since the last good one.
        j.files.values_mut().for_each(|f| {
            f.broken = true;
            f.file = None;
        });
        j.retry = std::mem::take(&mut j.unsynced);
        j.sync(1000).unwrap();
        let names: Vec<_> = list_journal(dir.path()).unwrap().into_iter().map(|(k, _)| k).collect();
        assert_eq!(names, vec![(1000, 100, 0), (1000, 100, 1)], "a second generation of the slice");
        assert_eq!(j.bytes(), 3 * (BLOCK_HEADER as u64 + 16), "id 2 written again");
        drop(j);
        let (d, _j) = opened(dir.path(), 1000);
        assert!(d.contains(&id(1), 1000) && d.contains(&id(2), 1000));
    }

    #[test]
    fn the_journal_syncs_on_its_own_after_many_ids() {
        let dir = tempfile::tempdir().unwrap();
        let (_, mut j) = opened(dir.path(), 1000);
        let ids: Vec<_> = (0..SYNC_EVERY_IDS as u64).map(|n| (id(n), 1000)).collect();
        j.append(&ids[..10], 1000).unwrap();
        assert!(!j.sync_due());
        j.append(&ids[10..], 1000).unwrap();
        assert!(j.sync_due());
        j.sync(1000).unwrap();
        assert!(!j.sync_due() && j.unsynced.is_empty());
    }

    #[test]
    fn an_earlier_builds_snapshot_moves_into_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        // Version 1 of `dedup.snapshot`: magic, version, slices (start, count, ids), CRC-32.
        let mut snap = LEGACY_MAGIC.to_vec();
        snap.extend_from_slice(&LEGACY_VERSION.to_le_bytes());
        snap.extend_from_slice(&1u32.to_le_bytes());
        snap.extend_from_slice(&1000i64.to_le_bytes());
        snap.extend_from_slice(&2u32.to_le_bytes());
        snap.extend_from_slice(&id(1).0);
        snap.extend_from_slice(&id(2).0);
        let crc = crc32fast::hash(&snap);
        snap.extend_from_slice(&crc.to_le_bytes());
        fs::write(dir.path().join(LEGACY_SNAPSHOT), snap).unwrap();
        let (d, j) = opened(dir.path(), 1000);
        assert!(d.contains(&id(1), 1000) && d.contains(&id(2), 1000));
        assert!(!dir.path().join(LEGACY_SNAPSHOT).exists());
        assert!(j.bytes() > 0);
        drop(j);
        let (d, _j) = opened(dir.path(), 1000);
        assert!(d.contains(&id(1), 1000) && d.contains(&id(2), 1000));
    }

    #[test]
    fn a_disabled_window_deletes_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let (_, mut j) = opened(dir.path(), 1000);
        j.append(&[(id(1), 1000)], 1000).unwrap();
        j.sync(1000).unwrap();
        let mut off = Dedup::new(dir.path(), 0, usize::MAX);
        let j = Journal::open(&mut off, 1000);
        assert_eq!(j.bytes(), 0);
        assert!(list_journal(dir.path()).unwrap().is_empty());
    }

    #[test]
    fn bytes_per_id_stay_within_the_documented_bound() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = Dedup::new(dir.path(), 3600, usize::MAX);
        let n = 360_000u64;
        for i in 0..n {
            d.insert(id(i), 10_000 + i64::try_from(i / 100).unwrap(), 10_000 + i64::try_from(i / 100).unwrap());
        }
        assert_eq!(d.len(), n as usize);
        let per_id = d.heap_bytes() as f64 / n as f64;
        assert!((17.0..=MAX_BYTES_PER_ID as f64).contains(&per_id), "{per_id} bytes per id");
    }

    #[test]
    fn at_the_ceiling_the_oldest_slice_is_forgotten_and_memory_stops_growing() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = Dedup::new(dir.path(), 800, 1000);
        for n in 0..600 {
            d.insert(id(n), 100, 100);
        }
        for n in 600..1200 {
            d.insert(id(n), 300, 300);
        }
        assert!(d.len() <= 1000, "{} ids held", d.len());
        assert!(!d.contains(&id(0), 300), "the oldest slice went first");
        assert!(d.contains(&id(1199), 300), "the newest ids are kept");
        for n in 1200..5000 {
            d.insert(id(n), 300, 300);
            assert!(d.len() <= 1000);
        }
        assert_eq!(d.len(), d.gens.iter().map(Generation::len).sum::<usize>(), "the count is exact");
    }

    #[test]
    fn runs_saved_at_a_clean_shutdown_are_loaded_once_and_only_within_the_window() {
        let dir = tempfile::tempdir().unwrap();
        let mut runs = StreamRuns::new(3600, 1000);
        runs.record([1; 16], [2; 16], 100);
        runs.record([3; 16], [4; 16], 100);
        save_runs(dir.path(), &runs, 100).unwrap();
        let mut loaded = StreamRuns::new(3600, 1000);
        take_runs(dir.path(), &mut loaded, 3600, 200);
        assert_eq!((loaded.last(&[1; 16]), loaded.last(&[3; 16])), (Some([2; 16]), Some([4; 16])));
        assert!(!dir.path().join(RUNS_SNAPSHOT).exists(), "deleted once read");
        let mut again = StreamRuns::new(3600, 1000);
        take_runs(dir.path(), &mut again, 3600, 200);
        assert!(again.is_empty(), "a crash after this start brings nothing back");
        save_runs(dir.path(), &runs, 100).unwrap();
        take_runs(dir.path(), &mut again, 3600, 100 + 3600);
        assert!(again.is_empty(), "older than the window: ignored");
        save_runs(dir.path(), &runs, 100).unwrap();
        let path = dir.path().join(RUNS_SNAPSHOT);
        let mut bytes = fs::read(&path).unwrap();
        bytes[RUNS_HEADER + 3] ^= 1;
        fs::write(&path, bytes).unwrap();
        take_runs(dir.path(), &mut again, 3600, 200);
        assert!(again.is_empty() && !path.exists(), "damaged: ignored and removed");
    }
}
