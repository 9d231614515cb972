//! The durable spool: a segment log on local disk that every accepted event is written to, and
//! fsync'd, before the webhook answers 2xx. It is the hub of the pipeline: every later stage reads
//! what is durable and writes back only through the spool's one writer.
//!
//! ```text
//! ingest ──append──▶ writer ──committed frames──▶ reader (publisher: events, results) ──acks──┐
//!                      ▲              └──────────▶ cursor (capture: events with files) ──results──┤
//!                      └──────────────────────── one bounded command queue ◀──────────────────────┘
//! ```
//!
//! Layout of `spool.dir`:
//! - `LOCK`: held (`flock`) by the one process using the spool ([`lock`]).
//! - `segment-<first seq>.log`: a versioned header, then frames ([`format`]) of four kinds: `Event`,
//!   `Acked`, `Files` (an event's file results, header `huggy_bridge_files`) and `Abandoned` (after a failed write). A segment
//!   rolls over at `segment_bytes`; it is deleted once every event in it and in every older segment
//!   is acknowledged.
//! - `dedup-<slice start>-<span>.ids`: the dedup journal, the ids of the window a file per slice,
//!   synced before a segment is deleted ([`dedup`]).
//! - `dedup-runs.snapshot`: what each dedup stream last carried, saved by a clean shutdown, read and
//!   deleted at the next start ([`dedup::save_runs`]).
//! - `damaged/`: copies of segments in which recovery found damage, for inspection.
//! - `segment-<first seq>.deleting`: a delivered segment being deleted (removed at start if a crash
//!   left one).
//!
//! What is synced when, and what damage costs, is in [`writer`] and [`recovery`].

mod chunks;
mod dedup;
mod feeds;
mod format;
pub(crate) mod io;
mod janitor;
mod lock;
mod reader;
mod recovery;
mod segment_files;
mod status;
mod undelivered;
mod writer;

use std::collections::{HashMap, VecDeque};

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;
use undelivered::Undelivered;

use tokio::sync::{mpsc, oneshot, Notify};
use tracing::info;

use crate::clock::{monotonic_millis, now_secs};
use crate::config::DEFAULT_DEDUP_MAX_IDS;
use crate::event::{Event, EventId};
pub use feeds::{CaptureFeed, Followers, PublishFeed};
pub use io::{is_no_room, OsIo, SegmentIo};
pub use lock::LockError;
pub(crate) use reader::{Ahead, Batch, Position, Reader};
pub use recovery::RecoveryReport;
pub use status::{offline_status, OfflineStatus};

pub(crate) use dedup::{max_memory_bytes as dedup_max_bytes, MAX_BYTES_PER_ID as DEDUP_MAX_BYTES_PER_ID};

/// Segments are read (by recovery and the publisher) in chunks of this many bytes.
pub(crate) const READ_CHUNK_BYTES: usize = chunks::CHUNK;
/// Receipt-time runs the undelivered index keeps at most (16 bytes each).
pub(crate) const UNDELIVERED_AGE_RUNS: usize = undelivered::AGE_RUNS;

/// The on-disk format of the segments this build writes, and the only one it reads.
pub const FORMAT_VERSION: u32 = format::VERSION;

/// Largest segment; smaller spools get smaller segments (see [`SpoolSettings::segment_bytes_for`]).
pub(crate) const MAX_SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
/// Commands queued for the writer at most. The bytes they hold are bounded upstream: every event in
/// the queue belongs to a request whose body still holds its share of `http.max_inflight_bytes`.
const QUEUE: usize = 4096;
/// A write group stops taking appends once it holds this many bytes of events (one larger append
/// still goes alone), so the buffer the writer builds is bounded.
pub(crate) const GROUP_MAX_BYTES: usize = 8 * 1024 * 1024;

/// Why the spool cannot take or hand out data.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// No room for the batch: the webhook answers 503 and Huggy retries; nothing is dropped.
    #[error("spool is full ({used} of {max} bytes on disk)")]
    Full {
        /// Bytes on disk now.
        used: u64,
        /// `spool.max_bytes`.
        max: u64,
    },
    /// The spool's filesystem has no room (`ENOSPC`): refused until delivery (or the operator) frees
    /// some; the writer keeps taking acknowledgements and deleting delivered segments meanwhile.
    #[error("no room on the spool's filesystem ({free} bytes free, {want} wanted)")]
    NoRoom {
        /// Bytes free when last looked.
        free: u64,
        /// Bytes the writer waits for before it takes batches again.
        want: u64,
    },
    /// A write or fsync of the batch failed, so it was not acknowledged.
    #[error("spool write failed; the batch is not durable")]
    WriteFailed(#[source] std::io::Error),
    /// Reading, listing or opening spool files failed.
    #[error("spool i/o failed")]
    Io(#[from] std::io::Error),
    /// Another process holds the spool directory.
    #[error(transparent)]
    Locked(#[from] LockError),
    /// A segment of a format version this build does not know.
    #[error("spool segment {path} cannot be read by this build: {reason}")]
    Format {
        /// The segment file.
        path: PathBuf,
        /// What is wrong with its header.
        reason: String,
    },
    /// The spool was closed (shutdown); nothing more is taken.
    #[error("spool is closed")]
    Closed,
}

/// How to open a spool.
#[derive(Clone)]
pub struct SpoolSettings {
    dir: PathBuf,
    /// Cap on the bytes the spool keeps on disk (segments and dedup journal).
    max_bytes: u64,
    dedup_window_secs: u64,
    /// Ids (and streams) the dedup window holds at most (`spool.dedup_max_ids`).
    pub(crate) dedup_max_ids: usize,
    segment_bytes: u64,
    /// Write and sync calls; tests inject failures here.
    pub(crate) io: Arc<dyn SegmentIo>,
    /// Told how long each group's `fdatasync` took (seconds).
    pub(crate) sync_observer: Option<SyncObserver>,
    /// Told about the janitor's chores (the composition root counts their panics).
    pub(crate) chore_hooks: Option<ChoreHooks>,
}

/// What the janitor thread tells the rest of the daemon: its chores run under `catch_unwind`, so a
/// panic costs one chore (at worst a duplicate later, never an event), is logged, and is counted
/// through `panicked`; `before` runs inside that guard before each chore (a test seam may make it
/// panic there).
#[derive(Clone)]
pub(crate) struct ChoreHooks {
    pub(crate) before: Arc<dyn Fn() + Send + Sync>,
    pub(crate) panicked: Arc<dyn Fn() + Send + Sync>,
}

/// Observes each group's `fdatasync` (seconds), for the fsync-duration histogram.
pub(crate) type SyncObserver = Arc<dyn Fn(f64) + Send + Sync>;

impl SpoolSettings {
    /// Settings with the real I/O and a segment size fit for `max_bytes`.
    pub fn new(dir: PathBuf, max_bytes: u64, dedup_window_secs: u64) -> Self {
        SpoolSettings {
            dir,
            max_bytes,
            dedup_window_secs,
            dedup_max_ids: DEFAULT_DEDUP_MAX_IDS,
            segment_bytes: Self::segment_bytes_for(max_bytes),
            io: Arc::new(OsIo),
            sync_observer: None,
            chore_hooks: None,
        }
    }

    /// Caps the dedup window's memory at `max_ids` ids and as many streams.
    #[must_use]
    pub fn with_dedup_max_ids(mut self, max_ids: usize) -> Self {
        self.dedup_max_ids = max_ids;
        self
    }

    /// A sixteenth of the cap, between 1 MiB and 64 MiB: space is freed a segment at a time, so
    /// segments much smaller than the cap keep the accounting fine-grained.
    pub(crate) fn segment_bytes_for(max_bytes: u64) -> u64 {
        (max_bytes / 16).clamp(1024 * 1024, MAX_SEGMENT_BYTES)
    }

    /// Usage below which a spool that refused a batch for lack of room takes batches again.
    fn low_water(&self) -> u64 {
        self.max_bytes / 10 * 9
    }
}

impl std::fmt::Debug for SpoolSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpoolSettings")
            .field("dir", &self.dir)
            .field("max_bytes", &self.max_bytes)
            .field("dedup_window_secs", &self.dedup_window_secs)
            .field("segment_bytes", &self.segment_bytes)
            .finish_non_exhaustive()
    }
}

/// What an append did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Appended {
    stored: usize,
    /// Events already durably stored within the dedup window: acknowledged, not stored again.
    pub(crate) duplicates: usize,
    /// The sequence number each input event was stored under (`None` for duplicates).
    pub seqs: Vec<Option<u64>>,
}

/// An event whose files must be captured before it is published.
#[derive(Debug, Clone)]
pub(crate) struct FileWork {
    pub(crate) seq: u64,
    pub(crate) received_at: i64,
    pub(crate) event_id: EventId,
    pub(crate) company: Option<String>,
    pub(crate) urls: Vec<String>,
}

impl FileWork {
    /// Bytes of its URLs: what a batch of file work is bounded by.
    pub(crate) fn url_bytes(&self) -> usize {
        self.urls.iter().map(String::len).sum()
    }
}

/// File work recovery holds in memory at most (the oldest events waiting for their files), by
/// number and by bytes of URLs; the capture feed reads the rest from the log after them, a batch
/// at a time. A spool full of events with files costs recovery no more than this.
pub(crate) const FILE_WORK_HELD: usize = 1024;
/// See [`FILE_WORK_HELD`].
pub(crate) const FILE_WORK_HELD_BYTES: usize = 4 * 1024 * 1024;

/// An event read back from the spool.
#[derive(Debug, Clone)]
pub(crate) struct Stored {
    pub(crate) seq: u64,
    pub(crate) received_at: i64,
    pub(crate) event: Event,
}

/// Gauges of the spool's content.
#[derive(Debug, Clone, Copy, Default)]
pub struct SpoolStats {
    /// Undelivered events.
    pub events: u64,
    /// Bytes of undelivered events (in proportion to the events left in a partly delivered segment).
    pub bytes: u64,
    /// Bytes on disk: segments (delivered events included until their segment is deleted) and the
    /// dedup journal. This is what `max_bytes` caps.
    pub disk_bytes: u64,
    pub(crate) max_bytes: u64,
    /// Segment files on disk.
    pub segments: usize,
    pub(crate) oldest_received_at: Option<i64>,
    /// Events whose files are still being captured.
    pub pending_files: usize,
    pub(crate) writable: bool,
    /// Refusing batches: a batch was refused for lack of room and usage has not fallen below the
    /// low-water mark since.
    pub(crate) full: bool,
    /// Refusing batches because the filesystem had no room (`ENOSPC`), until it has again.
    pub(crate) disk_full: bool,
    /// Event ids held by the dedup window.
    pub dedup_ids: usize,
}

/// The writer's pulse, for liveness: when it last finished a group, and since when it has been in
/// the current one (0 when idle); and whether its thread ended by a panic.
#[derive(Debug, Default)]
struct Heartbeat {
    last_commit_ms: AtomicI64,
    busy_since_ms: AtomicI64,
    queued: AtomicU64,
    /// When the writer's thread ended by a panic (monotonic ms; 0 while it runs): nothing can be
    /// made durable any more, whether or not work was queued then, so liveness fails and the
    /// daemon's supervisor restarts it (recovery rebuilds the writer from the segments).
    died_ms: AtomicI64,
}

/// Where a reader may read in a segment.
#[derive(Debug, Clone)]
struct Segment {
    first_seq: u64,
    path: PathBuf,
    /// Bytes of valid data: `None` for a closed segment (to its end), the durable length of an
    /// abandoned one. The active segment's limit is `State::committed_len`.
    limit: Option<u64>,
    /// Bytes on disk.
    size: u64,
    /// Events stored in it, and their bytes (for the undelivered bytes' estimate).
    events: u64,
    event_bytes: u64,
}

impl Segment {
    fn new(first_seq: u64, path: PathBuf, limit: Option<u64>, size: u64) -> Segment {
        Segment { first_seq, path, limit, size, events: 0, event_bytes: 0 }
    }
}

struct State {
    /// Stored events not yet delivered.
    undelivered: Undelivered,
    segments: VecDeque<Segment>,
    /// Committed end of the active segment: the reader never reads past it.
    committed_len: u64,
    /// Segment the reader is in (its first seq): it and later segments are kept.
    reader_segment: u64,
    /// The first seq of the newest segment this spool has had: a new one is named after it.
    newest_segment: u64,
    disk_bytes: u64,
    write_error: bool,
    /// The filesystem had no room (`ENOSPC`) and has not enough yet.
    disk_full: bool,
    refusing: bool,
    /// Bytes of the largest batch refused since refusing began: batches are refused until it fits.
    refused_need: u64,
    /// File results (`huggy_bridge_files`) of unacknowledged events that could not be written
    /// (the disk refused them; they are written with the next segment). Written results are read
    /// from the log by the publisher: none are kept here in the normal course.
    unwritten_file_results: HashMap<u64, Vec<u8>>,
    /// Events whose files are wanted (handed out or not) and not done (a gauge: after a restart
    /// that held only part of the work, an event captured twice is counted done twice).
    files_pending: usize,
    dedup_ids: usize,
}

struct Shared {
    state: Mutex<State>,
    /// Wakes the followers: something was committed (events, acks, file results).
    committed: Arc<Notify>,
    heartbeat: Heartbeat,
    settings: SpoolSettings,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; keep serving it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

enum Command {
    Append {
        events: Vec<Event>,
        received_at: i64,
        reply: oneshot::Sender<Result<Appended, SpoolError>>,
    },
    Ack(Vec<u64>),
    FilesDone(u64, Vec<u8>),
    Close(oneshot::Sender<()>),
    /// The dedup journal was synced: the segments waiting for it can go.
    Compact,
}

/// The writer's one bounded command queue; every command is counted in the heartbeat's queue
/// (the writer takes one off for each it handles). The spool handle and each follower send through
/// it: the only way into the log.
#[derive(Clone)]
struct Queue {
    tx: mpsc::Sender<Command>,
    shared: Arc<Shared>,
}

impl Queue {
    /// Queues `command` for the writer; `false` when the spool is closed.
    ///
    /// # Cancel safety
    /// A send given up while the queue is full (its future dropped: a client that hung up) leaves
    /// the command unsent and takes it off the count again, so the writer's pulse never waits for
    /// a command that will not come.
    async fn send(&self, command: Command) -> bool {
        /// Counted in the heartbeat's queue from before the send (the writer may take the command
        /// off the count as soon as it is sent) until it is handed over or given up.
        struct Counted<'a> {
            queued: &'a AtomicU64,
            handed: bool,
        }
        impl Drop for Counted<'_> {
            fn drop(&mut self) {
                if !self.handed {
                    self.queued.fetch_sub(1, Ordering::Relaxed);
                }
            }
        }
        let mut counted = Counted { queued: &self.shared.heartbeat.queued, handed: false };
        counted.queued.fetch_add(1, Ordering::Relaxed);
        counted.handed = self.tx.send(command).await.is_ok();
        counted.handed
    }
}

/// The owner's handle to the spool (appends, gauges, close); cheap to clone. The stages that
/// follow the log get their own handles from [`Spool::open`]: see [`Followers`].
#[derive(Clone)]
pub struct Spool {
    queue: Queue,
    thread: Arc<Mutex<Option<JoinHandle<()>>>>,
    report: Arc<RecoveryReport>,
}

impl Spool {
    /// Locks `settings.dir` (creating it), recovers what a previous run left and starts the writer.
    /// Returns the spool and one handle per follower: the publisher's and the capture stage's, each
    /// their only way back into the log.
    ///
    /// # Errors
    /// Another process holds the directory, a segment is in a format this build cannot read, or the
    /// directory cannot be read or written.
    pub fn open(settings: SpoolSettings) -> Result<(Spool, Followers), SpoolError> {
        fs::create_dir_all(&settings.dir)?;
        let dir_lock = lock::DirLock::acquire(&settings.dir)?;
        segment_files::remove_leftovers(&settings.dir)?;
        let now = now_secs();
        let mut dedup = dedup::Dedup::new(&settings.dir, settings.dedup_window_secs, settings.dedup_max_ids);
        let journal = dedup::Journal::open(&mut dedup, now);
        let mut recovered = recovery::recover(&settings.dir, recovery::Access::Repair, &mut dedup, now)?;
        let report = Arc::new(recovered.report.clone());
        let capture = std::mem::take(&mut recovered.capture);
        let (tx, rx) = mpsc::channel(QUEUE);
        let (writer, shared) = writer::Writer::start(settings, recovered, dedup, journal, dir_lock, tx.downgrade())?;
        let pulse = shared.clone();
        let thread = std::thread::Builder::new().name("spool-writer".into()).spawn(move || {
            if let Err(payload) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| writer.run(rx))) {
                let panic = crate::panics::message(payload);
                tracing::error!(%panic, "spool writer panicked: no batch can be made durable; liveness fails until a restart");
                pulse.heartbeat.died_ms.store(monotonic_millis().max(1), Ordering::Relaxed);
            }
        })?;
        let stats = stats_of(&shared);
        info!(
            dir = %shared.settings.dir.display(),
            undelivered = stats.events,
            undelivered_bytes = stats.bytes,
            disk_bytes = stats.disk_bytes,
            pending_files = stats.pending_files,
            dedup_ids = stats.dedup_ids,
            "spool opened"
        );
        let queue = Queue { tx, shared };
        let followers = Followers::new(&queue, capture.held, capture.from);
        Ok((Spool { queue, thread: Arc::new(Mutex::new(Some(thread))), report }, followers))
    }

    /// Makes `events` durable: returns once they are fsync'd (or known durable duplicates).
    ///
    /// # Errors
    /// [`SpoolError::Full`] when the spool is refusing for lack of room, [`SpoolError::WriteFailed`]
    /// when the disk refused the write or the sync.
    ///
    /// # Cancel safety
    /// Dropping the future may still leave the events stored, and then published and their files
    /// captured: at-least-once. Nothing after the write depends on the caller.
    pub async fn append(&self, events: Vec<Event>, received_at: i64) -> Result<Appended, SpoolError> {
        let (reply, rx) = oneshot::channel();
        if !self.queue.send(Command::Append { events, received_at, reply }).await {
            return Err(SpoolError::Closed);
        }
        rx.await.map_err(|_| SpoolError::Closed)?
    }

    /// Notified whenever the writer committed something (appends, acks, file results).
    pub(crate) fn committed(&self) -> Arc<Notify> {
        self.queue.shared.committed.clone()
    }

    /// What recovery found when the spool was opened.
    pub fn recovery_report(&self) -> &RecoveryReport {
        &self.report
    }

    /// How long the writer has been stuck with work, if it has (see [`Heartbeat::stalled_for`]).
    pub(crate) fn writer_stalled_for(&self, after: Duration) -> Option<Duration> {
        self.queue.shared.heartbeat.stalled_for(after)
    }

    /// The spool's gauges now.
    pub fn stats(&self) -> SpoolStats {
        stats_of(&self.queue.shared)
    }

    /// Writes what is queued, syncs and stops the writer. Idempotent.
    pub async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.queue.send(Command::Close(tx)).await {
            let _ = rx.await;
        }
        let handle = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = handle {
            let _ = tokio::task::spawn_blocking(move || h.join()).await;
        }
    }
}

fn stats_of(shared: &Shared) -> SpoolStats {
    let st = shared.lock();
    let max_bytes = shared.settings.max_bytes;
    SpoolStats {
        events: st.undelivered.len(),
        bytes: undelivered_bytes(&st.undelivered, &st.segments),
        disk_bytes: st.disk_bytes,
        max_bytes,
        segments: st.segments.len(),
        oldest_received_at: st.undelivered.oldest_received_at(),
        pending_files: st.files_pending,
        writable: !st.write_error,
        full: st.refusing || st.disk_bytes >= max_bytes,
        disk_full: st.disk_full,
        dedup_ids: st.dedup_ids,
    }
}

/// Bytes of undelivered events: exact for segments wholly undelivered or delivered, in proportion
/// to the events left for one partly delivered (events are not indexed one by one).
fn undelivered_bytes(undelivered: &Undelivered, segments: &VecDeque<Segment>) -> u64 {
    let ends = segments.iter().skip(1).map(|s| s.first_seq).chain(std::iter::once(u64::MAX));
    segments
        .iter()
        .zip(ends)
        .filter(|(s, _)| s.events > 0)
        .map(|(s, end)| {
            let left = undelivered.count_in(s.first_seq, end).min(s.events);
            u64::try_from(u128::from(s.event_bytes) * u128::from(left) / u128::from(s.events)).unwrap_or(u64::MAX)
        })
        .sum()
}

/// Sorted, merged inclusive ranges.
fn to_ranges(seqs: &mut [u64]) -> Vec<(u64, u64)> {
    merge_ranges(seqs.iter().map(|&s| (s, s)).collect())
}

/// Inclusive ranges sorted and merged where they overlap or touch.
fn merge_ranges(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (a, b) in ranges {
        match out.last_mut() {
            Some((_, end)) if end.saturating_add(1) >= a => *end = (*end).max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

fn segment_path(dir: &Path, first_seq: u64) -> PathBuf {
    dir.join(format!("segment-{first_seq:020}.log"))
}

fn list_segments(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else { continue };
        if let Some(n) = name.strip_prefix("segment-").and_then(|r| r.strip_suffix(".log")).and_then(|n| n.parse().ok())
        {
            out.push((n, path));
        }
    }
    out.sort();
    Ok(out)
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

impl Heartbeat {
    /// How long the writer has been stuck with work, if it has: in one group for longer than
    /// `after`, or with queued commands and no group finished for longer than `after` — or since
    /// its thread died of a panic, at once.
    fn stalled_for(&self, after: Duration) -> Option<Duration> {
        let now = monotonic_millis();
        let died = self.died_ms.load(Ordering::Relaxed);
        if died > 0 {
            return Some(Duration::from_millis((now - died).unsigned_abs()));
        }
        let limit = i64::try_from(after.as_millis()).unwrap_or(i64::MAX);
        let busy = self.busy_since_ms.load(Ordering::Relaxed);
        if busy > 0 && now - busy > limit {
            return Some(Duration::from_millis((now - busy).unsigned_abs()));
        }
        let last = self.last_commit_ms.load(Ordering::Relaxed);
        if self.queued.load(Ordering::Relaxed) > 0 && now - last > limit {
            return Some(Duration::from_millis((now - last).unsigned_abs()));
        }
        None
    }
}

#[cfg(test)]
mod tests;
