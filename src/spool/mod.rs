//! The durable spool: a segment log on local disk that every accepted event is written to, and
//! fsync'd, before the webhook answers 2xx; the publisher reads it back in order and acknowledges
//! what Kafka acknowledged.
//!
//! Layout of `spool.dir`:
//! - `segment-<first seq>.log`: frames (see [`frame`]) of two kinds, `Event` (an accepted event with
//!   its sequence number) and `Acked` (sequence numbers Kafka acknowledged). A segment rolls over at
//!   [`SEGMENT_BYTES`]; a segment is deleted once every event in it, and in every older segment, is
//!   acknowledged.
//! - `dedup-<start unix secs>.log`: 24-byte entries (event id, receipt time), one file per dedup
//!   window, so the window survives restarts.
//!
//! Durability: one writer thread takes every append waiting in its queue, writes them with one
//! `write`, and calls `fdatasync` once for all of them (group commit) before any of their requests is
//! answered. The dedup log is written at the same time but synced only before a segment is deleted:
//! until then the segment is the durable record of the ids in it. Acknowledgements are written without a sync of their own: losing one only means the
//! event is published again (at-least-once, same event id).
//!
//! Recovery: segments are read in order; events without an acknowledgement are published again, in
//! sequence order. A frame cut short or failing its checksum at the end of the newest segment is a
//! torn write that was never acknowledged to Huggy: it is logged and truncated away.

mod frame;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use tokio::sync::{mpsc, oneshot, Notify};
use tracing::{error, info, warn};

use crate::clock::now_secs;
use crate::event::{Event, EventId};
use frame::{Next, Record};

/// Size at which the active segment rolls over.
pub const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
/// Commands queued for the writer thread at most; a full queue makes requests wait (bounded).
const QUEUE: usize = 4096;
/// Bytes the reader takes from a segment file per read.
const READ_CHUNK: usize = 4 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool is full ({used} of {max} bytes undelivered)")]
    Full { used: u64, max: u64 },
    #[error("spool i/o failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("spool is closed")]
    Closed,
}

#[derive(Debug, Clone)]
pub struct SpoolSettings {
    pub dir: PathBuf,
    pub max_bytes: u64,
    pub dedup_window_secs: u64,
    pub segment_bytes: u64,
}

/// What an append did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Appended {
    pub stored: usize,
    /// Events already seen within the dedup window: acknowledged, not stored again.
    pub duplicates: usize,
    /// The sequence number each input event was stored under (`None` for duplicates).
    pub seqs: Vec<Option<u64>>,
}

/// An event whose files were not captured before the last stop.
#[derive(Debug, Clone)]
pub struct PendingFiles {
    pub seq: u64,
    pub received_at: i64,
    pub event_id: EventId,
    pub company: Option<String>,
    pub urls: Vec<String>,
}

/// An event read back from the spool.
#[derive(Debug, Clone)]
pub struct Stored {
    pub seq: u64,
    pub received_at: i64,
    pub event: Event,
}

/// Gauges of the spool's content.
#[derive(Debug, Clone, Copy, Default)]
pub struct SpoolStats {
    pub events: u64,
    pub bytes: u64,
    pub max_bytes: u64,
    pub oldest_received_at: Option<i64>,
    pub writable: bool,
    /// An append was refused for lack of room and usage has not fallen below 90% since.
    pub full: bool,
}

struct Pending {
    bytes: u64,
    received_at: i64,
}

struct Segment {
    first_seq: u64,
    path: PathBuf,
}

struct State {
    unacked: BTreeMap<u64, Pending>,
    unacked_bytes: u64,
    segments: VecDeque<Segment>,
    /// Committed end of the active segment: the reader never reads past it.
    committed_len: u64,
    /// Segment the reader is in (its first seq): segments before it may be deleted.
    reader_segment: u64,
    write_error: Option<String>,
    refused_full: bool,
    /// `bridge_files` of unacknowledged events whose files are done.
    file_results: HashMap<u64, Vec<u8>>,
    /// Found at recovery: events whose files still have to be captured.
    pending_files: Vec<PendingFiles>,
}

struct Shared {
    state: Mutex<State>,
    committed: Arc<Notify>,
    max_bytes: u64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; keep serving it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

enum Command {
    Append { events: Vec<Event>, received_at: i64, reply: oneshot::Sender<Result<Appended, SpoolError>> },
    Ack(Vec<u64>),
    FilesDone(u64, Vec<u8>),
    Close(oneshot::Sender<()>),
}

/// Handle to the spool; cheap to clone.
#[derive(Clone)]
pub struct Spool {
    tx: mpsc::Sender<Command>,
    shared: Arc<Shared>,
    thread: Arc<Mutex<Option<JoinHandle<()>>>>,
}

impl Spool {
    /// Opens (or creates) the spool in `settings.dir`, recovering what a previous run left.
    ///
    /// # Errors
    /// The directory cannot be created or read.
    pub fn open(settings: SpoolSettings) -> Result<Spool, SpoolError> {
        fs::create_dir_all(&settings.dir)?;
        let now = now_secs();
        let recovered = recover(&settings)?;
        let mut dedup = Dedup::open(&settings.dir, settings.dedup_window_secs, now)?;
        // The dedup log is synced lazily (before a segment is deleted); the ids of events still in
        // segments are known from the segments themselves.
        for (id, at) in &recovered.seen {
            if *at >= now - dedup.window {
                dedup.seen.entry(*id).or_insert(*at);
            }
        }
        let active = open_active(&settings.dir, recovered.next_seq)?;
        let committed_len = active.metadata()?.len();
        let mut segments = recovered.segments;
        if segments.back().map(|s| s.first_seq) != Some(recovered.next_seq) {
            segments.push_back(Segment {
                first_seq: recovered.next_seq,
                path: segment_path(&settings.dir, recovered.next_seq),
            });
        }
        let reader_segment = segments.front().map_or(recovered.next_seq, |s| s.first_seq);
        info!(
            dir = %settings.dir.display(),
            undelivered = recovered.unacked.len(),
            undelivered_bytes = recovered.unacked_bytes,
            dedup_entries = dedup.seen.len(),
            "spool opened"
        );
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                unacked: recovered.unacked,
                unacked_bytes: recovered.unacked_bytes,
                segments,
                committed_len,
                reader_segment,
                write_error: None,
                refused_full: false,
                file_results: recovered.file_results,
                pending_files: recovered.pending_files,
            }),
            committed: Arc::new(Notify::new()),
            max_bytes: settings.max_bytes,
        });
        let (tx, rx) = mpsc::channel(QUEUE);
        let writer = Writer {
            settings,
            shared: shared.clone(),
            active,
            active_first_seq: recovered.next_seq,
            active_len: committed_len,
            next_seq: recovered.next_seq,
            dedup,
            dedup_unsynced: false,
        };
        let thread = std::thread::Builder::new().name("spool-writer".into()).spawn(move || writer.run(rx))?;
        Ok(Spool { tx, shared, thread: Arc::new(Mutex::new(Some(thread))) })
    }

    /// Makes `events` durable: returns once they are fsync'd (or known duplicates).
    ///
    /// # Errors
    /// [`SpoolError::Full`] past `max_bytes`, [`SpoolError::Io`] when the disk refuses the write.
    ///
    /// # Cancel safety
    /// Dropping the future may still leave the events stored (and published): at-least-once.
    pub async fn append(&self, events: Vec<Event>, received_at: i64) -> Result<Appended, SpoolError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Command::Append { events, received_at, reply }).await.map_err(|_| SpoolError::Closed)?;
        rx.await.map_err(|_| SpoolError::Closed)?
    }

    /// Records that Kafka acknowledged these events.
    pub async fn ack(&self, seqs: Vec<u64>) {
        if !seqs.is_empty() && self.tx.send(Command::Ack(seqs)).await.is_err() {
            warn!("spool closed before an acknowledgement was recorded; the events will be published again");
        }
    }

    /// Records the `bridge_files` of an event; the publisher picks it up. Not synced on its own: if
    /// lost in a crash, the files are captured again (or reported expired) after the restart.
    pub async fn files_done(&self, seq: u64, member: Vec<u8>) {
        if self.tx.send(Command::FilesDone(seq, member)).await.is_err() {
            warn!(seq, "spool closed before file results were recorded");
        }
    }

    /// The `bridge_files` of an event, once its files are done.
    pub fn files_result(&self, seq: u64) -> Option<Vec<u8>> {
        self.shared.lock().file_results.get(&seq).cloned()
    }

    /// Events recovered at start whose files still have to be captured (handed out once).
    pub fn take_pending_files(&self) -> Vec<PendingFiles> {
        std::mem::take(&mut self.shared.lock().pending_files)
    }

    /// Notified whenever the writer committed something (appends, acks, file results).
    pub fn committed(&self) -> Arc<Notify> {
        self.shared.committed.clone()
    }

    pub fn stats(&self) -> SpoolStats {
        let st = self.shared.lock();
        SpoolStats {
            events: st.unacked.len() as u64,
            bytes: st.unacked_bytes,
            max_bytes: self.shared.max_bytes,
            oldest_received_at: st.unacked.values().next().map(|p| p.received_at),
            writable: st.write_error.is_none(),
            full: st.refused_full || st.unacked_bytes >= self.shared.max_bytes,
        }
    }

    /// A reader positioned at the oldest undelivered event.
    pub fn reader(&self) -> Reader {
        let st = self.shared.lock();
        let segment = st.segments.front().map_or(0, |s| s.first_seq);
        Reader { shared: self.shared.clone(), segment, offset: 0, buf: Vec::new() }
    }

    /// Writes what is queued, syncs and stops the writer. Idempotent.
    pub async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Command::Close(tx)).await.is_ok() {
            let _ = rx.await;
        }
        let handle = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = handle {
            let _ = tokio::task::spawn_blocking(move || h.join()).await;
        }
    }
}

/// Reads committed events in sequence order, skipping acknowledged ones.
pub struct Reader {
    shared: Arc<Shared>,
    segment: u64,
    offset: u64,
    buf: Vec<u8>,
}

impl Reader {
    /// Up to `max` undelivered events after the last one returned; waits for new ones when there
    /// are none.
    ///
    /// # Cancel safety
    /// Cancel-safe: the position only moves past events that are returned.
    pub async fn next_batch(&mut self, max: usize) -> Result<Vec<Stored>, SpoolError> {
        let shared = self.shared.clone();
        loop {
            let notified = shared.committed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let got = self.read_now(max)?;
            if !got.is_empty() {
                return Ok(got);
            }
            notified.await;
        }
    }

    /// Up to `max` undelivered events after the last one returned, without waiting. Reads segment
    /// files (normally from the page cache) on the calling thread.
    ///
    /// # Errors
    /// A segment cannot be read.
    pub fn read_now(&mut self, max: usize) -> Result<Vec<Stored>, SpoolError> {
        let mut out = Vec::new();
        while out.len() < max {
            let (path, limit, is_active, next_segment) = {
                let mut st = self.shared.lock();
                let idx = st.segments.iter().position(|s| s.first_seq == self.segment);
                let Some(idx) = idx.or_else(|| (!st.segments.is_empty()).then_some(0)) else { return Ok(out) };
                if st.segments[idx].first_seq != self.segment {
                    // Our segment was deleted (all acknowledged): start at the oldest that is left.
                    self.segment = st.segments[idx].first_seq;
                    self.offset = 0;
                    self.buf.clear();
                }
                st.reader_segment = self.segment;
                let is_active = idx + 1 == st.segments.len();
                let limit = if is_active { Some(st.committed_len) } else { None };
                (st.segments[idx].path.clone(), limit, is_active, st.segments.get(idx + 1).map(|s| s.first_seq))
            };
            let progressed = self.read_segment(&path, limit, max, &mut out)?;
            if out.len() >= max {
                break;
            }
            if !progressed || is_active {
                if is_active {
                    break;
                }
                if let Some(n) = next_segment {
                    self.segment = n;
                    self.offset = 0;
                    self.buf.clear();
                    continue;
                }
                break;
            }
        }
        Ok(out)
    }

    /// Reads frames of one segment from `self.offset`; `limit` caps the bytes read in the active
    /// segment. Returns whether the segment may hold more.
    fn read_segment(
        &mut self,
        path: &Path,
        limit: Option<u64>,
        max: usize,
        out: &mut Vec<Stored>,
    ) -> Result<bool, SpoolError> {
        let mut file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e.into()),
        };
        let end = limit.unwrap_or(file.metadata()?.len());
        while self.offset < end && out.len() < max {
            let want = ((end - self.offset) as usize).min(READ_CHUNK.max(self.buf.len() * 2));
            self.buf.resize(want, 0);
            file.seek(SeekFrom::Start(self.offset))?;
            file.read_exact(&mut self.buf)?;
            let buf_start = self.offset;
            let mut pos = 0;
            let mut complete = false;
            while out.len() < max {
                match frame::decode_at(&self.buf, pos) {
                    Next::Frame(rec, used) => {
                        pos += used;
                        if let Record::Event { seq, received_at, event } = rec {
                            if self.shared.lock().unacked.contains_key(&seq) {
                                out.push(Stored { seq, received_at, event });
                            }
                        }
                    }
                    Next::End => {
                        complete = true;
                        break;
                    }
                    Next::Torn(_) if want < (end - self.offset) as usize => break,
                    Next::Torn(why) => {
                        // Past the committed end nothing is torn; in a closed segment this is
                        // corruption found at recovery, already logged: skip the rest.
                        warn!(segment = %path.display(), offset = buf_start + pos as u64, %why, "skipping unreadable spool data");
                        self.offset = end;
                        return Ok(false);
                    }
                }
            }
            self.offset = buf_start + pos as u64;
            if pos == 0 && !complete {
                // One frame larger than the chunk: read more next time round.
                self.buf.resize(want * 2, 0);
            } else {
                self.buf.clear();
            }
        }
        Ok(self.offset < end)
    }
}

struct Recovered {
    /// Ids of every event still in a segment, acknowledged or not, with their receipt time.
    seen: Vec<(EventId, i64)>,
    unacked: BTreeMap<u64, Pending>,
    unacked_bytes: u64,
    segments: VecDeque<Segment>,
    next_seq: u64,
    file_results: HashMap<u64, Vec<u8>>,
    pending_files: Vec<PendingFiles>,
}

fn segment_path(dir: &Path, first_seq: u64) -> PathBuf {
    dir.join(format!("segment-{first_seq:020}.log"))
}

fn list_numbered(dir: &Path, prefix: &str) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else { continue };
        if let Some(n) = name.strip_prefix(prefix).and_then(|r| r.strip_suffix(".log")).and_then(|n| n.parse().ok()) {
            out.push((n, path));
        }
    }
    out.sort();
    Ok(out)
}

/// Reads every segment: which events are still unacknowledged, and the next sequence number.
fn recover(settings: &SpoolSettings) -> Result<Recovered, SpoolError> {
    let files = list_numbered(&settings.dir, "segment-")?;
    let mut unacked = BTreeMap::new();
    let mut segments = VecDeque::new();
    let mut with_files: BTreeMap<u64, PendingFiles> = BTreeMap::new();
    let mut seen = Vec::new();
    let mut file_results: HashMap<u64, Vec<u8>> = HashMap::new();
    let mut next_seq = files.first().map_or(1, |(n, _)| *n).max(1);
    let last = files.len().saturating_sub(1);
    for (i, (first_seq, path)) in files.into_iter().enumerate() {
        let buf = frame::read_file(&path)?;
        let mut pos = 0;
        loop {
            match frame::decode_at(&buf, pos) {
                Next::Frame(Record::Event { seq, received_at, event }, used) => {
                    unacked.insert(seq, Pending { bytes: event.value.len() as u64, received_at });
                    seen.push((event.id, received_at));
                    if !event.files.is_empty() {
                        with_files.insert(
                            seq,
                            PendingFiles {
                                seq,
                                received_at,
                                event_id: event.id,
                                company: event.company,
                                urls: event.files,
                            },
                        );
                    }
                    next_seq = next_seq.max(seq + 1);
                    pos += used;
                }
                Next::Frame(Record::Files { seq, member }, used) => {
                    file_results.insert(seq, member);
                    pos += used;
                }
                Next::Frame(Record::Acked(ranges), used) => {
                    for (a, b) in ranges {
                        let keys: Vec<u64> = unacked.range(a..=b).map(|(k, _)| *k).collect();
                        for k in keys {
                            unacked.remove(&k);
                        }
                    }
                    pos += used;
                }
                Next::End => break,
                Next::Torn(why) if i == last => {
                    let discarded = buf.len() - pos;
                    warn!(
                        segment = %path.display(), offset = pos, discarded_bytes = discarded, %why,
                        "spool: discarding a torn write at the end of the newest segment (it was never acknowledged)"
                    );
                    let f = OpenOptions::new().write(true).open(&path)?;
                    f.set_len(pos as u64)?;
                    f.sync_all()?;
                    break;
                }
                Next::Torn(why) => {
                    error!(
                        segment = %path.display(), offset = pos, unreadable_bytes = buf.len() - pos, %why,
                        "spool: corruption inside an older segment; the rest of it cannot be read and is skipped"
                    );
                    break;
                }
            }
        }
        next_seq = next_seq.max(first_seq);
        segments.push_back(Segment { first_seq, path });
    }
    let unacked_bytes = unacked.values().map(|p: &Pending| p.bytes).sum();
    file_results.retain(|seq, _| unacked.contains_key(seq));
    let pending_files = with_files
        .into_values()
        .filter(|p| unacked.contains_key(&p.seq) && !file_results.contains_key(&p.seq))
        .collect();
    Ok(Recovered { seen, unacked, unacked_bytes, segments, next_seq, file_results, pending_files })
}

fn open_active(dir: &Path, first_seq: u64) -> std::io::Result<File> {
    let path = segment_path(dir, first_seq);
    let existed = path.exists();
    let f = OpenOptions::new().create(true).append(true).open(&path)?;
    if !existed {
        f.sync_all()?;
        sync_dir(dir)?;
    }
    Ok(f)
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The dedup window: ids seen recently, persisted in one log file per window.
struct Dedup {
    dir: PathBuf,
    window: i64,
    seen: HashMap<EventId, i64>,
    file: File,
    file_start: i64,
}

impl Dedup {
    fn open(dir: &Path, window_secs: u64, now: i64) -> std::io::Result<Dedup> {
        let window = i64::try_from(window_secs).unwrap_or(i64::MAX / 4);
        let mut seen = HashMap::new();
        let mut newest = None;
        for (start, path) in list_numbered(dir, "dedup-")? {
            let start = i64::try_from(start).unwrap_or(0);
            if start.saturating_add(window) < now - window {
                fs::remove_file(&path)?;
                continue;
            }
            let buf = frame::read_file(&path)?;
            for chunk in buf.chunks_exact(frame::DEDUP_ENTRY_LEN) {
                let (id, at) = frame::decode_dedup(chunk);
                if at >= now - window {
                    seen.insert(id, at);
                }
            }
            newest = Some(start);
        }
        let file_start = match newest {
            Some(s) if now - s < window => s,
            _ => now,
        };
        let file = Self::open_file(dir, file_start)?;
        Ok(Dedup { dir: dir.to_owned(), window, seen, file, file_start })
    }

    fn open_file(dir: &Path, start: i64) -> std::io::Result<File> {
        let path = dir.join(format!("dedup-{start:020}.log"));
        let mut f = OpenOptions::new().create(true).read(true).append(true).open(&path)?;
        // A torn entry at the end would shift every later one: cut it off.
        let len = f.seek(SeekFrom::End(0))?;
        let whole = len - len % frame::DEDUP_ENTRY_LEN as u64;
        if whole != len {
            f.set_len(whole)?;
        }
        Ok(f)
    }

    fn contains(&self, id: &EventId, now: i64) -> bool {
        self.seen.get(id).is_some_and(|at| *at >= now - self.window)
    }

    /// Starts a new file once the current one covers a whole window; forgets what fell out of it.
    fn rotate(&mut self, now: i64) -> std::io::Result<()> {
        if now - self.file_start < self.window {
            return Ok(());
        }
        self.file = Self::open_file(&self.dir, now)?;
        self.file_start = now;
        let horizon = now - self.window;
        self.seen.retain(|_, at| *at >= horizon);
        for (start, path) in list_numbered(&self.dir, "dedup-")? {
            if i64::try_from(start).unwrap_or(0).saturating_add(self.window) < horizon {
                fs::remove_file(path)?;
            }
        }
        Ok(())
    }
}

struct Writer {
    settings: SpoolSettings,
    shared: Arc<Shared>,
    active: File,
    active_first_seq: u64,
    active_len: u64,
    next_seq: u64,
    dedup: Dedup,
    /// Dedup entries written since the dedup log was last synced.
    dedup_unsynced: bool,
}

type Reply = (oneshot::Sender<Result<Appended, SpoolError>>, Result<Appended, SpoolError>);

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        let mut close_reply = None;
        while close_reply.is_none() {
            let Some(first) = rx.blocking_recv() else { break };
            let mut group = vec![first];
            while group.len() < QUEUE {
                match rx.try_recv() {
                    Ok(c) => group.push(c),
                    Err(_) => break,
                }
            }
            close_reply = self.commit(group);
        }
        if let Err(e) = self.active.sync_data() {
            error!(error = %e, "spool: final sync failed");
        }
        info!("spool closed");
        if let Some(tx) = close_reply {
            let _ = tx.send(());
        }
    }

    /// Writes one group of commands with a single write and at most one sync.
    fn commit(&mut self, group: Vec<Command>) -> Option<oneshot::Sender<()>> {
        let now = now_secs();
        if let Err(e) = self.dedup.rotate(now) {
            warn!(error = %e, "spool: dedup log rotation failed");
        }
        let mut buf = Vec::new();
        let mut dedup_buf = Vec::new();
        let mut replies: Vec<Reply> = Vec::new();
        let mut new_pending: Vec<(u64, Pending)> = Vec::new();
        let mut new_ids: Vec<EventId> = Vec::new();
        let mut group_ids: std::collections::HashSet<EventId> = std::collections::HashSet::new();
        let mut acked: Vec<u64> = Vec::new();
        let mut files_done: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut close = None;
        let used = self.shared.lock().unacked_bytes;
        let mut group_bytes = 0u64;
        for cmd in group {
            match cmd {
                Command::Append { events, received_at, reply } => {
                    let mut fresh = Vec::with_capacity(events.len());
                    let mut duplicates = 0;
                    let mut is_fresh = Vec::with_capacity(events.len());
                    for ev in events {
                        if self.dedup.contains(&ev.id, now) || !group_ids.insert(ev.id) {
                            duplicates += 1;
                            is_fresh.push(false);
                        } else {
                            fresh.push(ev);
                            is_fresh.push(true);
                        }
                    }
                    let bytes: u64 = fresh.iter().map(|e| e.value.len() as u64).sum();
                    if used + group_bytes + bytes > self.settings.max_bytes && bytes > 0 {
                        for e in &fresh {
                            group_ids.remove(&e.id);
                        }
                        replies.push((
                            reply,
                            Err(SpoolError::Full { used: used + group_bytes, max: self.settings.max_bytes }),
                        ));
                        continue;
                    }
                    group_bytes += bytes;
                    let stored = fresh.len();
                    let first = self.next_seq;
                    let mut k = 0;
                    let seqs = is_fresh
                        .iter()
                        .map(|f| {
                            f.then(|| {
                                k += 1;
                                first + k - 1
                            })
                        })
                        .collect();
                    for event in fresh {
                        let seq = self.next_seq;
                        self.next_seq += 1;
                        frame::encode_dedup(&event.id, received_at, &mut dedup_buf);
                        new_ids.push(event.id);
                        new_pending.push((seq, Pending { bytes: event.value.len() as u64, received_at }));
                        frame::encode(&Record::Event { seq, received_at, event }, &mut buf);
                    }
                    replies.push((reply, Ok(Appended { stored, duplicates, seqs })));
                }
                Command::Ack(seqs) => acked.extend(seqs),
                Command::FilesDone(seq, member) => {
                    frame::encode(&Record::Files { seq, member: member.clone() }, &mut buf);
                    files_done.push((seq, member));
                }
                Command::Close(tx) => close = Some(tx),
            }
        }
        if !acked.is_empty() {
            frame::encode(&Record::Acked(to_ranges(&mut acked)), &mut buf);
        }
        let must_sync = !new_pending.is_empty();
        match self.write(&buf, &dedup_buf, must_sync) {
            Ok(()) => {
                for id in &new_ids {
                    self.dedup.seen.insert(*id, now);
                }
                let mut st = self.shared.lock();
                st.write_error = None;
                for (seq, p) in new_pending {
                    st.unacked_bytes += p.bytes;
                    st.unacked.insert(seq, p);
                }
                for (seq, member) in files_done {
                    if st.unacked.contains_key(&seq) {
                        st.file_results.insert(seq, member);
                    }
                }
                for seq in &acked {
                    if let Some(p) = st.unacked.remove(seq) {
                        st.unacked_bytes -= p.bytes;
                    }
                    st.file_results.remove(seq);
                }
                st.committed_len = self.active_len;
                if replies.iter().any(|(_, r)| matches!(r, Err(SpoolError::Full { .. }))) {
                    st.refused_full = true;
                } else if st.unacked_bytes < self.settings.max_bytes / 10 * 9 {
                    st.refused_full = false;
                }
                drop(st);
                for (tx, r) in replies {
                    let _ = tx.send(r);
                }
            }
            Err(e) => {
                error!(error = %e, "spool write failed; the requests in this group are refused");
                self.next_seq -= new_pending.len() as u64;
                self.shared.lock().write_error = Some(e.to_string());
                for (tx, r) in replies {
                    let _ = tx.send(r.and(Err(SpoolError::Io(std::io::Error::new(e.kind(), e.to_string())))));
                }
            }
        }
        self.shared.committed.notify_waiters();
        {
            if let Err(e) = self.compact() {
                warn!(error = %e, "spool compaction failed; will retry");
            }
        }
        if let Err(e) = self.maybe_roll() {
            error!(error = %e, "spool segment roll-over failed");
            self.shared.lock().write_error = Some(e.to_string());
        }
        close
    }

    fn write(&mut self, buf: &[u8], dedup_buf: &[u8], sync: bool) -> std::io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let before = self.active_len;
        let result = (|| {
            self.active.write_all(buf)?;
            if sync {
                self.active.sync_data()?;
            }
            // Not synced here: until their segment is deleted, the segment itself is the durable
            // record of these ids (recovery reads them back); compaction syncs this log first.
            self.dedup.file.write_all(dedup_buf)?;
            Ok(())
        })();
        match result {
            Ok(()) => {
                self.active_len += buf.len() as u64;
                self.dedup_unsynced |= !dedup_buf.is_empty();
                Ok(())
            }
            Err(e) => {
                // Leave no partial frame behind: the next write starts on a frame boundary.
                let _ = self.active.set_len(before);
                let _ = self.active.seek(SeekFrom::End(0));
                Err(e)
            }
        }
    }

    fn maybe_roll(&mut self) -> std::io::Result<()> {
        if self.active_len < self.settings.segment_bytes {
            return Ok(());
        }
        self.active.sync_data()?;
        let first_seq = self.next_seq;
        let file = open_active(&self.settings.dir, first_seq)?;
        self.active = file;
        self.active_first_seq = first_seq;
        self.active_len = 0;
        let mut st = self.shared.lock();
        st.segments.push_back(Segment { first_seq, path: segment_path(&self.settings.dir, first_seq) });
        st.committed_len = 0;
        Ok(())
    }

    /// Deletes old segments whose events are all acknowledged and that the reader has left.
    fn compact(&mut self) -> std::io::Result<()> {
        loop {
            let victim = {
                let mut st = self.shared.lock();
                if st.segments.len() < 2 {
                    return Ok(());
                }
                let next_first = st.segments[1].first_seq;
                let oldest_unacked = st.unacked.keys().next().copied().unwrap_or(u64::MAX);
                let first = st.segments[0].first_seq;
                if oldest_unacked < next_first || st.reader_segment == first || first == self.active_first_seq {
                    return Ok(());
                }
                st.segments.pop_front().map(|s| s.path)
            };
            if let Some(path) = victim {
                if self.dedup_unsynced {
                    self.dedup.file.sync_data()?;
                    self.dedup_unsynced = false;
                }
                fs::remove_file(&path)?;
            }
        }
    }
}

/// Sorted, merged inclusive ranges.
fn to_ranges(seqs: &mut [u64]) -> Vec<(u64, u64)> {
    seqs.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &s in seqs.iter() {
        match out.last_mut() {
            Some((_, end)) if *end + 1 >= s => *end = (*end).max(s),
            _ => out.push((s, s)),
        }
    }
    out
}


#[cfg(test)]
mod tests;
