//! The one writer: a thread that takes every command waiting in its queue (bounded in bytes, see
//! [`GROUP_MAX_BYTES`]) and commits them as one group.
//!
//! What is synced when:
//! - A group holding events or file results is written with one `write` and made durable with one
//!   `fdatasync` **before** any of its requests is answered (group commit).
//! - A group holding only acknowledgements is written without a sync: losing it in a crash means
//!   those events are published again (at-least-once, same event id). Until a later sync succeeds,
//!   the writer keeps those records in memory.
//! - A new segment's header is synced, and so is the directory entry, before anything is written
//!   after it; a full segment is synced before the next one starts.
//! - The ids of every durable group go to the dedup journal ([`dedup::Journal`]), unsynced; before a
//!   segment is deleted the journal is synced. Both happen on the [`Janitor`]'s thread, and so does
//!   the unlinking of segments (milliseconds for a large one): the writer takes the deletable
//!   segments off its list and goes on committing groups; the janitor syncs the journal, then
//!   unlinks them (or puts them back on the list if the sync failed).
//!
//! When a `write` or `fdatasync` fails (Postgres' "fsyncgate": after a failed `fdatasync` the
//! kernel may have dropped the dirty pages, and a second `fdatasync` can succeed without them), the
//! segment is never synced again as if nothing happened. Its group is answered 503; the writer
//! starts a fresh segment whose first frame records how much of the failed one is durable, rewrites
//! there every acknowledgement and file result not known to be durable (those of the failed group
//! included), syncs it, and goes on. If even that fails, every append is refused (readiness turns
//! false) and the next group tries a fresh segment again, or the writer itself every
//! [`RETRY_BROKEN_EVERY`] (a replica that is not ready receives no batches).
//!
//! A full disk (`ENOSPC`) heals by itself: the group that hit it is refused like any failed write,
//! and from then on every batch is refused (`SpoolError::NoRoom`, readiness false) while the writer
//! goes on taking acknowledgements (kept in memory and written once it can write) and deleting
//! delivered segments — the broken one too, once all its events are delivered. Every
//! [`HEAL_EVERY`], and after every deletion, it looks at the free space; once the refused group fits
//! with [`ROOM_MARGIN`] to spare, it starts a fresh segment and takes batches again. A spool opened on
//! a full disk starts in the same state, without an active segment: it drains what it holds and
//! becomes ready when there is room.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, Notify};
use tracing::{error, info, warn};

use super::dedup::{self, Dedup};
use super::format::{self, Record};
use super::io::is_no_room;
use super::lock::DirLock;
use super::recovery::Recovered;
use super::{
    merge_ranges, segment_path, sync_dir, to_ranges, Appended, Command, FileWork, Heartbeat, Pending, Segment, Shared,
    SpoolError, SpoolSettings, State, GROUP_MAX_BYTES, QUEUE,
};
use crate::clock::{monotonic_millis, now_secs};
use crate::event::{EventId, StreamRuns};

/// How often a writer that cannot write (a failed segment, a full disk) tries again on its own,
/// without waiting for a batch: a replica that is not ready receives none.
const HEAL_EVERY: Duration = Duration::from_millis(250);
/// How often a writer whose disk failed otherwise than for room tries a fresh segment on its own
/// (each failure is logged).
const RETRY_BROKEN_EVERY: Duration = Duration::from_secs(5);
/// Free bytes wanted beyond the refused group before batches are taken again after `ENOSPC`, so
/// that the spool does not flap between refusing and failing writes on an almost full disk.
pub(crate) const ROOM_MARGIN: u64 = 256 * 1024;
/// Free bytes wanted after `ENOSPC` when everything is delivered (nothing more will be freed).
pub(crate) const MIN_ROOM: u64 = 64 * 1024;

pub(crate) struct Writer {
    shared: Arc<Shared>,
    /// The segment written to; `None` when the spool was opened on a full disk, or its broken one
    /// was deleted, until a fresh one can be started.
    active: Option<File>,
    /// The active segment's first seq (the newest recovered one while there is none).
    active_first_seq: u64,
    active_len: u64,
    /// Bytes of the active segment known to be durable.
    synced_len: u64,
    next_seq: u64,
    dedup: Dedup,
    /// The last run accepted per stream: what tells a re-send from a state that returns.
    runs: StreamRuns,
    /// Acknowledgements and file results written but not known to be durable.
    carry: Vec<Record>,
    /// The active segment failed a write or sync: the next group starts a fresh one.
    broken: bool,
    /// The filesystem said `ENOSPC`: the bytes of the refused group. Batches are refused until
    /// they fit with [`ROOM_MARGIN`] to spare.
    no_room: Option<u64>,
    janitor: Janitor,
    /// Dropped last: nothing is written after the directory is released.
    _lock: DirLock,
}

/// What the janitor is asked to do, in order.
enum Chore {
    /// Ids of a durable group, with the time each was stored.
    Append(Vec<(EventId, i64)>),
    /// Delete these segments, oldest first (already off the shared list), once the journal holding
    /// their ids is synced (`sync`: the dedup window is on). Unlinking a segment of tens of MiB takes
    /// milliseconds (its cached pages and extents are freed): not on the writer's thread, where
    /// every request would wait for it.
    Delete { victims: Vec<Segment>, sync: bool },
}

/// The thread that does the spool's slow housekeeping off the writer's thread: it keeps the dedup
/// journal ([`dedup::Journal`]) and deletes segments.
struct Janitor {
    jobs: Option<Sender<Chore>>,
    /// A deletion is in flight (set by the writer, cleared by the janitor when done): the next waits
    /// for it, so segments go strictly oldest first (a segment put back on the list goes back
    /// before anything newer is taken off it).
    deleting: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Janitor {
    /// Starts the thread. After a deletion that freed room it queues [`Command::Compact`] (if the
    /// spool is still open and the queue has room; a busy writer compacts after its group anyway),
    /// so that the writer deletes what became deletable meanwhile and ends a refusal. The bytes it
    /// adds and frees on disk are kept in the shared `disk_bytes`.
    fn start(
        shared: Arc<Shared>,
        mut journal: dedup::Journal,
        wake: mpsc::WeakSender<Command>,
    ) -> std::io::Result<Janitor> {
        let (jobs, todo) = std::sync::mpsc::channel::<Chore>();
        let deleting = Arc::new(AtomicBool::new(false));
        let deletion_done = deleting.clone();
        let thread = std::thread::Builder::new().name("spool-janitor".into()).spawn(move || {
            let mut failing = false;
            for job in todo {
                let is_delete = matches!(job, Chore::Delete { .. });
                let before = journal.bytes();
                // A panic in one chore must not end the thread: the writer could delete nothing more.
                let hooks = shared.settings.chore_hooks.clone();
                let freed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    if let Some(h) = &hooks {
                        (h.before)();
                    }
                    do_chore(&shared, &mut journal, job, &mut failing)
                }))
                .unwrap_or_else(|payload| {
                    let panic = crate::supervise::panic_message(payload);
                    error!(%panic, "spool: a janitor chore panicked; carrying on with the next one");
                    if let Some(h) = &hooks {
                        (h.panicked)();
                    }
                    false
                });
                let after = journal.bytes();
                {
                    let mut st = shared.lock();
                    st.disk_bytes = (st.disk_bytes + after).saturating_sub(before);
                }
                if is_delete {
                    deletion_done.store(false, Ordering::Release);
                }
                // Not after a failed deletion: the writer tries again after its next group, not in a loop.
                if freed {
                    if let Some(tx) = wake.upgrade() {
                        let queued = &shared.heartbeat.queued;
                        queued.fetch_add(1, Ordering::Relaxed);
                        if tx.try_send(Command::Compact).is_err() {
                            queued.fetch_sub(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        })?;
        Ok(Janitor { jobs: Some(jobs), deleting, thread: Some(thread) })
    }

    /// Hands the thread the ids of a durable group.
    fn append(&self, ids: Vec<(EventId, i64)>) {
        if let Some(jobs) = &self.jobs {
            if !ids.is_empty() && jobs.send(Chore::Append(ids)).is_err() {
                error!("spool: the janitor thread stopped; acknowledged segments are kept");
            }
        }
    }
}

impl Drop for Janitor {
    /// Lets the thread finish what it was handed.
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Does one chore; returns whether segments were deleted. `failing` keeps the journal's failures
/// logged once, when they start and when they end.
fn do_chore(shared: &Shared, journal: &mut dedup::Journal, job: Chore, failing: &mut bool) -> bool {
    let now = now_secs();
    // What the journal did: `Some` when it synced (or failed to write), `None` for a plain append
    // that went well, which says nothing about whether syncing works again.
    let (outcome, freed): (Option<std::io::Result<()>>, bool) = match job {
        Chore::Append(ids) => {
            let r = match journal.append(&ids, now) {
                Ok(()) if journal.sync_due() => Some(journal.sync(now)),
                Ok(()) => None,
                Err(e) => Some(Err(e)),
            };
            journal.expire(now);
            (r, false)
        }
        Chore::Delete { victims, sync } => {
            let synced = sync.then(|| journal.sync(now));
            let freed = match &synced {
                // Waiting for room would wedge the spool: only deleting segments frees it. The ids
                // not yet in the journal cost at most a duplicate record after a restart.
                Some(Err(e)) if e.kind() == std::io::ErrorKind::StorageFull => {
                    warn!("spool: disk full; deleting delivered segments although the dedup journal could not take their ids (after a restart a re-sent batch may be published twice)");
                    delete_segments(shared, victims)
                }
                Some(Err(_)) => {
                    put_back(shared, victims);
                    false
                }
                _ => delete_segments(shared, victims),
            };
            (synced, freed)
        }
    };
    match outcome {
        Some(Err(e)) if !*failing => {
            *failing = true;
            error!(dir = %shared.settings.dir.display(), error = %e, "spool: the dedup journal cannot be written or synced; delivered segments are kept (and the spool fills) until it can, except on a full disk");
        }
        Some(Ok(())) if *failing => {
            *failing = false;
            info!("spool: the dedup journal is written and synced again");
        }
        _ => {}
    }
    freed
}

type Reply = (oneshot::Sender<Result<Appended, SpoolError>>, Result<Appended, SpoolError>);

impl Writer {
    /// Builds the shared state from what recovery found and opens a fresh active segment.
    /// `wake` is the writer's own queue, for the janitor to say a sync or a deletion is done.
    pub(crate) fn start(
        settings: SpoolSettings,
        recovered: Recovered,
        dedup: Dedup,
        journal: dedup::Journal,
        lock: DirLock,
        wake: mpsc::WeakSender<Command>,
    ) -> Result<(Writer, Arc<Shared>), SpoolError> {
        let journal_bytes = journal.bytes();
        let files_pending = recovered.file_work.len();
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                undelivered: recovered.undelivered,
                segments: recovered.segments,
                committed_len: 0,
                reader_segment: 0,
                disk_bytes: recovered.disk_bytes + journal_bytes,
                write_error: false,
                disk_full: false,
                refusing: false,
                refused_need: 0,
                file_results: recovered.file_results,
                file_work: recovered.file_work.into_iter().collect(),
                files_pending,
                dedup_ids: dedup.len(),
            }),
            committed: Arc::new(Notify::new()),
            file_work: Arc::new(Notify::new()),
            heartbeat: Heartbeat::default(),
            settings,
        });
        shared.heartbeat.last_commit_ms.store(monotonic_millis(), Ordering::Relaxed);
        let mut next_seq = recovered.next_seq;
        let (active, first_seq, len, no_room) = match fresh_segment(&shared, &mut next_seq, &[]) {
            Ok((file, first_seq, len)) => {
                let mut st = shared.lock();
                st.segments.push_back(Segment::new(
                    first_seq,
                    segment_path(&shared.settings.dir, first_seq),
                    None,
                    len,
                ));
                st.disk_bytes += len;
                (Some(file), first_seq, len, None)
            }
            // Started on a full disk: deliver what is there, take batches once there is room.
            Err(e) if is_no_room(&e) => {
                error!(dir = %shared.settings.dir.display(), error = %e,
                    "spool: no room on its filesystem for a fresh segment; delivering what it holds and refusing batches until there is room");
                let st = shared.lock();
                let newest = st.segments.back().map_or((next_seq, 0), |s| (s.first_seq, s.size));
                (None, newest.0, newest.1, Some(0))
            }
            Err(e) => return Err(e.into()),
        };
        {
            let mut st = shared.lock();
            st.committed_len = len;
            st.reader_segment = st.segments.front().map_or(first_seq, |s| s.first_seq);
            st.disk_full = no_room.is_some();
        }
        let janitor = Janitor::start(shared.clone(), journal, wake)?;
        // Their appends in the last run may not have been synced before it ended.
        janitor.append(recovered.ids);
        let mut runs = StreamRuns::new(dedup.window(), shared.settings.dedup_max_ids);
        if dedup.enabled() {
            dedup::take_runs(&shared.settings.dir, &mut runs, dedup.window(), now_secs());
        }
        let writer = Writer {
            shared: shared.clone(),
            active,
            active_first_seq: first_seq,
            active_len: len,
            synced_len: len,
            next_seq,
            dedup,
            runs,
            carry: Vec::new(),
            broken: no_room.is_some(),
            no_room,
            janitor,
            _lock: lock,
        };
        Ok((writer, shared))
    }

    pub(crate) fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        let mut close_reply = None;
        while close_reply.is_none() {
            let Some(first) = self.next_command(&mut rx) else { break };
            let mut bytes = command_bytes(&first);
            let mut group = vec![first];
            while group.len() < QUEUE && bytes < GROUP_MAX_BYTES {
                match rx.try_recv() {
                    Ok(c) => {
                        bytes += command_bytes(&c);
                        group.push(c);
                    }
                    Err(_) => break,
                }
            }
            let shared = self.shared.clone();
            let hb = &shared.heartbeat;
            hb.busy_since_ms.store(monotonic_millis(), Ordering::Relaxed);
            let n = group.len() as u64;
            close_reply = self.commit(group);
            hb.queued.fetch_sub(n, Ordering::Relaxed);
            hb.last_commit_ms.store(monotonic_millis(), Ordering::Relaxed);
            hb.busy_since_ms.store(0, Ordering::Relaxed);
        }
        if let (false, Some(active)) = (self.broken, &self.active) {
            if let Err(e) = self.shared.settings.io.sync_data(active) {
                error!(error = %e, "spool: final sync failed; unsynced acknowledgements will be published again");
            }
        }
        if self.dedup.enabled() && !self.runs.is_empty() {
            if let Err(e) = dedup::save_runs(&self.shared.settings.dir, &self.runs, now_secs()) {
                warn!(error = %e, "spool: dedup runs not saved; a batch re-sent across the restart may be published twice");
            }
        }
        info!("spool closed");
        if let Some(tx) = close_reply {
            let _ = tx.send(());
        }
    }

    /// The next command; `None` once every sender is gone. While the writer cannot write it does
    /// not only wait: every [`HEAL_EVERY`] it deletes what became deletable and tries to write again.
    fn next_command(&mut self, rx: &mut mpsc::Receiver<Command>) -> Option<Command> {
        let every = |no_room: Option<u64>| if no_room.is_some() { HEAL_EVERY } else { RETRY_BROKEN_EVERY };
        let mut next_try = Instant::now() + every(self.no_room);
        while self.broken {
            match rx.try_recv() {
                Ok(c) => return Some(c),
                Err(mpsc::error::TryRecvError::Disconnected) => return None,
                Err(mpsc::error::TryRecvError::Empty) => {}
            }
            if Instant::now() >= next_try {
                self.compact();
                self.heal();
                self.shared.committed.notify_waiters();
                next_try = Instant::now() + every(self.no_room);
            } else {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        rx.blocking_recv()
    }

    /// After a failed write: once the disk has room again (when it was full), a fresh segment.
    fn heal(&mut self) {
        if let Some(want) = self.no_room {
            let (all_delivered, free) = (self.shared.lock().undelivered.is_empty(), self.free_bytes());
            // With nothing left to deliver the spool frees no more room: the refused group is no
            // reason to wait any longer, room for a few small groups is.
            let needed = if all_delivered { MIN_ROOM } else { want.saturating_add(ROOM_MARGIN) };
            if free < needed {
                return;
            }
            info!(free_bytes = free, "spool: its filesystem has room again");
            self.no_room = None;
            self.shared.lock().disk_full = false;
        }
        if self.broken {
            self.replace_segment();
        }
    }

    /// Free bytes on the spool's filesystem (0 when they cannot be read: keep waiting).
    fn free_bytes(&self) -> u64 {
        let settings = &self.shared.settings;
        settings.io.free_bytes(&settings.dir).unwrap_or_else(|e| {
            warn!(dir = %settings.dir.display(), error = %e, "spool: cannot read the free space of its filesystem");
            0
        })
    }

    /// Commits one group with a single write and at most one sync.
    fn commit(&mut self, group: Vec<Command>) -> Option<oneshot::Sender<()>> {
        let now = now_secs();
        self.dedup.expire(now);
        self.runs.expire(now);
        if self.broken {
            self.heal();
        }
        let settings = &self.shared.settings;
        let (max_bytes, low_water) = (settings.max_bytes, settings.low_water());
        let (usage, mut refusing, mut refused_need, unacked_empty) = {
            let st = self.shared.lock();
            (st.disk_bytes, st.refusing, st.refused_need, st.undelivered.is_empty())
        };
        let mut buf = Vec::new();
        let mut replies: Vec<Reply> = Vec::new();
        let mut new_pending: Vec<(u64, Pending)> = Vec::new();
        let mut new_ids: Vec<(EventId, i64)> = Vec::new();
        let mut new_work: Vec<FileWork> = Vec::new();
        let mut group_ids: HashSet<EventId> = HashSet::new();
        // The last run of each stream among this group's batches, recorded once the group is durable.
        let mut group_runs: HashMap<[u8; 16], [u8; 16]> = HashMap::new();
        let mut acked: Vec<u64> = Vec::new();
        let mut files_done: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut close = None;
        for cmd in group {
            match cmd {
                Command::Append { events, received_at, reply } => {
                    if let Some(want) = self.no_room {
                        let free = self.free_bytes();
                        replies.push((reply, Err(SpoolError::NoRoom { free, want: want.saturating_add(ROOM_MARGIN) })));
                        continue;
                    }
                    if self.broken {
                        replies.push((reply, Err(SpoolError::WriteFailed(unusable()))));
                        continue;
                    }
                    let mark = buf.len();
                    let first = self.next_seq;
                    let mut seqs = Vec::with_capacity(events.len());
                    let (mut stored, mut duplicates) = (0, 0);
                    let (pending_mark, ids_mark, work_mark) = (new_pending.len(), new_ids.len(), new_work.len());
                    // Judged against the runs before this batch: its own events do not count.
                    let runs: Vec<([u8; 16], [u8; 16])> =
                        events.iter().filter_map(|e| e.lineage.as_ref().map(|l| (l.stream, l.run))).collect();
                    for event in events {
                        let stored_before = self.dedup.contains(&event.id, now) || group_ids.contains(&event.id);
                        if stored_before && self.runs.is_resend(event.lineage.as_deref(), &group_runs) {
                            duplicates += 1;
                            seqs.push(None);
                            continue;
                        }
                        group_ids.insert(event.id);
                        let seq = self.next_seq;
                        self.next_seq += 1;
                        stored += 1;
                        seqs.push(Some(seq));
                        new_ids.push((event.id, received_at));
                        new_pending.push((seq, Pending { bytes: event.value.len() as u64, received_at }));
                        if !event.files.is_empty() {
                            new_work.push(FileWork {
                                seq,
                                received_at,
                                event_id: event.id,
                                company: event.company.clone(),
                                urls: event.files.clone(),
                            });
                        }
                        format::encode(&Record::Event { seq, received_at, event }, &mut buf);
                    }
                    let before = usage + mark as u64;
                    let bytes = (buf.len() - mark) as u64;
                    // Once a batch was refused for lack of room, every batch is refused until the
                    // refused one would fit again below the low-water mark, so that no later batch
                    // (of the same chat) can overtake it. With nothing left to deliver no room will
                    // be freed: start over.
                    let resume = !refusing
                        || (before < low_water && before + refused_need <= max_bytes)
                        || (unacked_empty && new_pending.len() == stored);
                    if stored > 0 && (!resume || before + bytes > max_bytes) {
                        for (id, _) in &new_ids[ids_mark..] {
                            group_ids.remove(id);
                        }
                        buf.truncate(mark);
                        new_pending.truncate(pending_mark);
                        new_ids.truncate(ids_mark);
                        new_work.truncate(work_mark);
                        self.next_seq = first;
                        refusing = true;
                        refused_need = refused_need.max(bytes);
                        replies.push((reply, Err(SpoolError::Full { used: before, max: max_bytes })));
                        continue;
                    }
                    if stored > 0 {
                        refusing = false;
                        refused_need = 0;
                    }
                    group_runs.extend(runs);
                    replies.push((reply, Ok(Appended { stored, duplicates, seqs })));
                }
                Command::Ack(seqs) => acked.extend(seqs),
                Command::FilesDone(seq, member) => {
                    format::encode(&Record::Files { seq, member: member.clone() }, &mut buf);
                    files_done.push((seq, member));
                }
                Command::Close(tx) => close = Some(tx),
                // Only wakes the writer: compaction below picks up the journal's sync.
                Command::Compact => {}
            }
        }
        let ack_record = (!acked.is_empty()).then(|| Record::Acked(to_ranges(&mut acked)));
        if let Some(r) = &ack_record {
            format::encode(r, &mut buf);
        }
        let must_sync = !new_pending.is_empty() || !files_done.is_empty();
        let written = if buf.is_empty() { Ok(false) } else { self.write(&buf, must_sync) };
        let ok = match written {
            Ok(synced) => {
                if synced {
                    self.carry.clear();
                } else if let Some(r) = &ack_record {
                    self.carry_acked(r);
                }
                true
            }
            // Nothing was written (nor is on disk): what the group carried waits for the fresh segment.
            Err(_) if self.broken => {
                self.carry_over(ack_record.as_ref(), &files_done);
                buf.clear();
                true
            }
            Err(e) => {
                error!(error = %e, segment = self.active_first_seq, "spool: write failed; this group is refused and the segment abandoned");
                self.carry_over(ack_record.as_ref(), &files_done);
                self.broken = true;
                if is_no_room(&e) {
                    error!(dir = %self.shared.settings.dir.display(), "spool: its filesystem is full; refusing batches, delivering and deleting what was delivered until there is room");
                    self.no_room = Some(buf.len() as u64);
                }
                for (_, r) in &mut replies {
                    if r.is_ok() {
                        *r = Err(SpoolError::WriteFailed(std::io::Error::new(e.kind(), e.to_string())));
                    }
                }
                false
            }
        };
        if ok && self.dedup.enabled() {
            for (id, at) in &new_ids {
                self.dedup.insert(*id, *at, now);
            }
            for (stream, run) in group_runs {
                self.runs.record(stream, run, now);
            }
            self.janitor.append(new_ids);
        }
        {
            let mut st = self.shared.lock();
            if ok {
                st.disk_bytes += buf.len() as u64;
                let (events, bytes) = (new_pending.len() as u64, new_pending.iter().map(|(_, p)| p.bytes).sum::<u64>());
                for (seq, p) in new_pending {
                    st.undelivered.stored(seq, p.received_at);
                }
                if let Some(active) = st.segments.iter_mut().rev().find(|s| s.first_seq == self.active_first_seq) {
                    active.events += events;
                    active.event_bytes += bytes;
                }
                st.files_pending += new_work.len();
                st.file_work.extend(new_work.iter().cloned());
                st.committed_len = self.active_len;
            }
            // Acknowledgements and file results are facts whether or not their frames were written:
            // the failure path keeps them for the fresh segment.
            for (seq, member) in files_done {
                if st.undelivered.contains(seq) && st.file_results.insert(seq, member).is_none() {
                    st.files_pending = st.files_pending.saturating_sub(1);
                }
            }
            if let Some(Record::Acked(ranges)) = &ack_record {
                for &(a, b) in ranges {
                    st.undelivered.ack(a, b);
                }
            }
            for seq in &acked {
                st.file_results.remove(seq);
            }
            st.refusing = refusing;
            st.refused_need = refused_need;
            st.write_error = self.broken && self.no_room.is_none();
            st.disk_full = self.no_room.is_some();
            st.dedup_ids = self.dedup.len();
        }
        if ok && !new_work.is_empty() {
            self.shared.file_work.notify_one();
        }
        self.shared.committed.notify_waiters();
        for (tx, r) in replies {
            let _ = tx.send(r);
        }
        if self.broken {
            self.heal();
        }
        // Delivered segments go even while the writer cannot write: on a full disk that is what
        // makes room.
        self.compact();
        if !self.broken {
            self.maybe_roll();
        }
        // Room freed by delivery ends a refusal without waiting for the next batch: a replica that
        // is not ready receives no batches.
        let mut st = self.shared.lock();
        if st.refusing && st.disk_bytes < low_water && st.disk_bytes + st.refused_need <= max_bytes {
            st.refusing = false;
            st.refused_need = 0;
            info!(disk_bytes = st.disk_bytes, "spool has room again; taking batches");
        }
        drop(st);
        close
    }

    /// Keeps an acknowledgement and file results that were not written for the fresh segment.
    fn carry_over(&mut self, acked: Option<&Record>, files_done: &[(u64, Vec<u8>)]) {
        if let Some(r) = acked {
            self.carry_acked(r);
        }
        self.carry.extend(files_done.iter().map(|(seq, m)| Record::Files { seq: *seq, member: m.clone() }));
    }

    /// Keeps an acknowledgement not known to be durable, merged into the one already kept: while
    /// nothing is synced (a drain with no batches coming in, a full disk) they would otherwise pile
    /// up a record per group.
    fn carry_acked(&mut self, record: &Record) {
        let Record::Acked(ranges) = record else { return };
        match self.carry.iter_mut().find_map(|r| if let Record::Acked(kept) = r { Some(kept) } else { None }) {
            Some(kept) => {
                kept.extend_from_slice(ranges);
                *kept = merge_ranges(std::mem::take(kept));
            }
            None => self.carry.push(record.clone()),
        }
    }

    /// Writes `buf` at the end of the active segment, synced when `sync`. Returns whether it synced.
    ///
    /// # Errors
    /// The write or the sync failed, or the writer cannot write (broken: nothing was written).
    fn write(&mut self, buf: &[u8], sync: bool) -> std::io::Result<bool> {
        let io = &self.shared.settings.io;
        let active = match &mut self.active {
            Some(file) if !self.broken => file,
            _ => return Err(unusable()),
        };
        io.write_all(active, buf)?;
        self.active_len += buf.len() as u64;
        if sync {
            let started = Instant::now();
            io.sync_data(active)?;
            self.synced_len = self.active_len;
            if let Some(observe) = &self.shared.settings.sync_observer {
                observe(started.elapsed().as_secs_f64());
            }
        }
        Ok(sync)
    }

    /// After a failure: a fresh segment that records how much of the failed one is durable and
    /// carries the records not known to be durable.
    fn replace_segment(&mut self) {
        let durable_len = self.synced_len;
        let mut head = Vec::new();
        // No segment was abandoned when there is none (opened on a full disk, or the broken one
        // was delivered and deleted).
        if self.active.is_some() {
            format::encode(&Record::Abandoned { first_seq: self.active_first_seq, durable_len }, &mut head);
        }
        for r in &self.carry {
            format::encode(r, &mut head);
        }
        match fresh_segment(&self.shared, &mut self.next_seq, &head) {
            Ok((file, first_seq, len)) => {
                info!(
                    abandoned = self.active_first_seq,
                    durable_len,
                    segment = first_seq,
                    "spool: writing on a fresh segment"
                );
                self.install(file, first_seq, len, Some(durable_len));
                self.shared.lock().write_error = false;
                self.broken = false;
            }
            Err(e) => {
                error!(error = %e, "spool: cannot start a fresh segment; refusing batches until the disk takes writes again");
                if is_no_room(&e) {
                    self.no_room = Some(self.no_room.unwrap_or(0));
                    self.shared.lock().disk_full = true;
                }
            }
        }
    }

    /// Makes a fresh, synced segment the active one; the previous one keeps its size and, when it
    /// was abandoned, the length known to be durable.
    fn install(&mut self, file: File, first_seq: u64, len: u64, previous_limit: Option<u64>) {
        let mut st = self.shared.lock();
        if let Some(old) =
            st.segments.iter_mut().find(|s| s.first_seq == self.active_first_seq).filter(|_| self.active.is_some())
        {
            old.size = self.active_len;
            old.limit = previous_limit;
        }
        st.segments.push_back(Segment::new(first_seq, segment_path(&self.shared.settings.dir, first_seq), None, len));
        st.committed_len = len;
        st.disk_bytes += len;
        drop(st);
        self.active = Some(file);
        self.active_first_seq = first_seq;
        self.active_len = len;
        self.synced_len = len;
        self.carry.clear();
    }

    fn maybe_roll(&mut self) {
        if self.active_len < self.shared.settings.segment_bytes || self.active_len <= format::SEGMENT_HEADER_LEN as u64
        {
            return;
        }
        let Some(active) = &self.active else { return };
        if let Err(e) = self.shared.settings.io.sync_data(active) {
            error!(error = %e, "spool: sync before roll-over failed; abandoning the segment");
            self.broken = true;
            self.shared.lock().write_error = true;
            self.replace_segment();
            return;
        }
        self.synced_len = self.active_len;
        self.carry.clear();
        match fresh_segment(&self.shared, &mut self.next_seq, &[]) {
            Ok((file, first_seq, len)) => self.install(file, first_seq, len, None),
            Err(e) => warn!(error = %e, "spool: segment roll-over failed; the current segment keeps growing"),
        }
    }

    /// Deletes old segments whose events are all acknowledged and that the reader has left: takes
    /// them off the shared list and has the janitor sync the dedup journal (their ids would
    /// otherwise be forgotten by a restart) and then unlink them. One deletion at a time.
    fn compact(&mut self) {
        if self.janitor.deleting.load(Ordering::Acquire) {
            return;
        }
        let victims = self.take_deletable();
        if victims.is_empty() {
            return;
        }
        let sync = self.dedup.enabled();
        self.janitor.deleting.store(true, Ordering::Release);
        let unsent = match self.janitor.jobs.as_ref() {
            Some(jobs) => jobs.send(Chore::Delete { victims, sync }).err().map(|std::sync::mpsc::SendError(c)| c),
            None => Some(Chore::Delete { victims, sync }),
        };
        if let Some(Chore::Delete { victims, sync }) = unsent {
            // No janitor: without a window delete here; with one, nothing can sync the journal.
            if sync {
                error!("spool: the janitor thread stopped; acknowledged segments are kept");
                put_back(&self.shared, victims);
            } else {
                delete_segments(&self.shared, victims);
            }
            self.janitor.deleting.store(false, Ordering::Release);
        }
    }

    /// Takes off the shared list the oldest segments, in order, whose events are all acknowledged
    /// and that neither the reader nor the writer is in.
    fn take_deletable(&mut self) -> Vec<Segment> {
        let mut st = self.shared.lock();
        let oldest_unacked = st.undelivered.oldest().unwrap_or(u64::MAX);
        let mut n = st
            .segments
            .iter()
            .zip(st.segments.iter().skip(1))
            .take_while(|(seg, next)| {
                oldest_unacked >= next.first_seq
                    && st.reader_segment != seg.first_seq
                    && seg.first_seq != self.active_first_seq
            })
            .count();
        // A writer that cannot write keeps no segment for itself: once everything is delivered the
        // newest goes too (the broken active one, or the newest recovered one of a spool opened on
        // a full disk), so that a full disk gets all its room back. The reader has nothing left in
        // it, and every seq ever given out is below `next_seq`.
        if self.broken && n + 1 == st.segments.len() && oldest_unacked >= self.next_seq {
            n += 1;
            self.active = None;
        }
        st.segments.drain(..n).collect()
    }
}

/// Bytes an unlinked segment is cut by at a time.
const SHRINK_STEP: u64 = 4 * 1024 * 1024;

/// Deletes `victims`, oldest first, and takes their bytes off `disk_bytes`; returns whether it
/// deleted them all. Each is renamed out of the segments' names, then cut down a few MiB at a time
/// and unlinked: freeing a large file's blocks in one go holds the file system's journal for
/// milliseconds, and every `fdatasync` of the active segment waits for it. (Renamed before it is
/// cut: a crash meanwhile leaves a `.deleting` file the next start removes, never a cut segment
/// that recovery would report as damage.) A segment that cannot be renamed goes back on the list,
/// counted, with every newer victim, and deletion is tried again after a later group.
fn delete_segments(shared: &Shared, victims: Vec<Segment>) -> bool {
    let mut victims = victims.into_iter();
    while let Some(victim) = victims.next() {
        // Renamed out of the segments' names first: a crash while it is cut down leaves a file the
        // next start removes, never a cut segment.
        let doomed = victim.path.with_extension("deleting");
        match fs::rename(&victim.path, &doomed) {
            Ok(()) => shrink_and_remove(&doomed),
            // Already gone: nothing to cut, its bytes are no longer on disk.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                error!(segment = %victim.path.display(), bytes = victim.size, error = %e,
                    "spool: a delivered segment could not be deleted; it and the newer ones stay (counted) and deletion is tried again");
                put_back(shared, std::iter::once(victim).chain(victims).collect());
                return false;
            }
        }
        let mut st = shared.lock();
        st.disk_bytes = st.disk_bytes.saturating_sub(victim.size);
        // Its seqs are gone for good: the index forgets them (not those of a victim still to go,
        // which may yet be put back).
        let floor = victims.as_slice().first().or(st.segments.front()).map_or(u64::MAX, |s| s.first_seq);
        st.undelivered.raise_floor(floor);
    }
    true
}

/// Puts segments taken off the list for deletion back at its front, in order.
fn put_back(shared: &Shared, victims: Vec<Segment>) {
    let mut st = shared.lock();
    for v in victims.into_iter().rev() {
        st.segments.push_front(v);
    }
}

/// Removes what deletions cut short by a crash left in `dir` (`segment-….deleting`).
pub(crate) fn remove_leftovers(dir: &std::path::Path) -> std::io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if name.starts_with("segment-") && name.ends_with(".deleting") {
            info!(path = %path.display(), "spool: removing a segment whose deletion a crash cut short");
            shrink_and_remove(&path);
        }
    }
    Ok(())
}

/// Cuts `path` down a few MiB at a time to nothing, then unlinks it (best effort: it is no segment
/// any more). Cut to nothing, its room is free even while a reader still has it open.
fn shrink_and_remove(path: &std::path::Path) {
    if let Ok(file) = OpenOptions::new().write(true).open(path) {
        let mut len = file.metadata().map_or(0, |m| m.len());
        while len > 0 {
            len = len.saturating_sub(SHRINK_STEP);
            if file.set_len(len).is_err() {
                break;
            }
        }
    }
    if let Err(e) = fs::remove_file(path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            warn!(path = %path.display(), error = %e, "spool: a deleted segment's file could not be removed; the next start tries again");
        }
    }
}

fn unusable() -> std::io::Error {
    std::io::Error::other("the spool cannot write: its last segment failed and no fresh one could be started")
}

/// Bytes an event-carrying command adds to a group.
fn command_bytes(c: &Command) -> usize {
    match c {
        Command::Append { events, .. } => events.iter().map(|e| e.value.len() + 128).sum(),
        Command::FilesDone(_, m) => m.len(),
        _ => 16,
    }
}

/// Creates a new segment at `next_seq` (moving past a name in use), writes its header and `head`,
/// and makes both and the directory entry durable. Returns the file, its first seq and length.
fn fresh_segment(shared: &Shared, next_seq: &mut u64, head: &[u8]) -> std::io::Result<(File, u64, u64)> {
    let dir = &shared.settings.dir;
    while segment_path(dir, *next_seq).exists() {
        *next_seq += 1;
    }
    let path: PathBuf = segment_path(dir, *next_seq);
    let mut file = OpenOptions::new().create_new(true).append(true).open(&path)?;
    let mut bytes = format::segment_header().to_vec();
    bytes.extend_from_slice(head);
    let io = &shared.settings.io;
    let made = io.write_all(&mut file, &bytes).and_then(|()| io.sync_data(&file)).and_then(|()| sync_dir(dir));
    if let Err(e) = made {
        let _ = fs::remove_file(&path);
        return Err(e);
    }
    Ok((file, *next_seq, bytes.len() as u64))
}
