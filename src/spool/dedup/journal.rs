//! The dedup journal: the window's ids on disk, append-only, a file per slice of the window, so
//! that a restart does not forget the ids of deleted segments ([`Journal`]).

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};

use tracing::{info, warn};

use super::Dedup;
use crate::event::EventId;

/// The journal's files: `dedup-<slice start>-<span>-<generation>.ids`, per slice of the window.
const JOURNAL_PREFIX: &str = "dedup-";
const JOURNAL_SUFFIX: &str = ".ids";
/// The dedup snapshot of earlier builds (the whole window in one file), read once and migrated.
pub(super) const LEGACY_SNAPSHOT: &str = "dedup.snapshot";
pub(super) const LEGACY_MAGIC: &[u8; 8] = b"HUGGYDDP";
pub(super) const LEGACY_VERSION: u32 = 1;
/// Starts every block of ids.
const BLOCK_MAGIC: u32 = 0x4a44_4748;
/// Magic, id count, CRC-32 of the count and the ids.
pub(super) const BLOCK_HEADER: usize = 12;
/// Ids in one block at most: a damaged block costs at most these.
const BLOCK_IDS: usize = 4096;

/// One file of the journal: ids stored during one slice of the window.
pub(super) struct JournalFile {
    path: PathBuf,
    /// Bytes on disk.
    bytes: u64,
    /// Open for appending (or syncing) once needed in this run.
    pub(super) file: Option<File>,
    /// Written since its last successful sync.
    dirty: bool,
    /// Created since the last successful sync of the directory.
    fresh: bool,
    /// A sync of it failed: what it holds beyond its last good sync may be gone whatever a later
    /// sync says ("fsyncgate"), so it is never written or synced again; the ids written since go
    /// into a fresh file. Still read at start and deleted when its slice expires.
    pub(super) broken: bool,
}

/// Ids written since the last good sync, at most, before the journal syncs on its own: bounds
/// what a failed sync has to write again (24 bytes an id).
pub(super) const SYNC_EVERY_IDS: usize = 65_536;

/// The dedup window on disk, append-only: the writer hands it the ids of every group it made durable
/// ([`Journal::append`], not synced), and before a segment is deleted the journal is synced
/// ([`Journal::sync`]), so every id of that segment is durable elsewhere first. Files per slice of
/// the window, deleted whole once the slice falls out of it ([`Journal::expire`]). Each deletion of
/// a segment costs the ids written since the last one, not the whole window.
///
/// Files are sequences of blocks (magic, count, CRC-32, ids); reading skips a damaged or torn block
/// and resumes at the next valid one. A lost id costs at most a duplicate record, never an event.
pub(in crate::spool) struct Journal {
    dir: PathBuf,
    window: i64,
    span: i64,
    /// By slice start, span (a change of `spool.dedup_window_secs` leaves files of another span)
    /// and generation (a new one after a failed sync).
    pub(super) files: BTreeMap<FileKey, JournalFile>,
    /// Ids not written yet (a write failed, or a sync did and they are written again).
    pub(super) retry: Vec<(EventId, i64)>,
    /// Ids written since the last good sync.
    pub(super) unsynced: Vec<(EventId, i64)>,
    buf: Vec<u8>,
}

impl Journal {
    /// Opens the journal in the spool directory and loads the ids still inside the window at `now`
    /// into `dedup`; files out of the window are deleted (all of them when `dedup` is disabled). A
    /// snapshot left by an earlier build is loaded, written into the journal and removed.
    pub(in crate::spool) fn open(dedup: &mut Dedup, now: i64) -> Journal {
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
    pub(in crate::spool) fn bytes(&self) -> u64 {
        self.files.values().map(|f| f.bytes).sum()
    }

    /// Appends ids stored at the given times (ids already outside the window are left out), after
    /// any still waiting from a failure, without syncing. On failure the ids not written are kept
    /// and written again before the next [`Journal::sync`] can succeed.
    ///
    /// # Errors
    /// A file could not be created or written.
    pub(in crate::spool) fn append(&mut self, ids: &[(EventId, i64)], now: i64) -> io::Result<()> {
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
    pub(in crate::spool) fn sync_due(&self) -> bool {
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
    pub(in crate::spool) fn sync(&mut self, now: i64) -> io::Result<()> {
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
    pub(in crate::spool) fn expire(&mut self, now: i64) {
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
pub(in crate::spool) fn journal_bytes(dir: &Path) -> u64 {
    let legacy = fs::metadata(dir.join(LEGACY_SNAPSHOT)).map_or(0, |m| m.len());
    list_journal(dir).unwrap_or_default().iter().map(|(_, p)| fs::metadata(p).map_or(0, |m| m.len())).sum::<u64>()
        + legacy
}

/// A journal file's slice start, span and generation.
pub(super) type FileKey = (i64, i64, u32);

/// The journal's files and their paths.
pub(super) fn list_journal(dir: &Path) -> io::Result<Vec<(FileKey, PathBuf)>> {
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
