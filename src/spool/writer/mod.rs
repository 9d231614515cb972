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
//!   segment is deleted the journal is synced. Both happen on the janitor's thread
//!   ([`super::janitor`]), and so does the unlinking of segments (milliseconds for a large one):
//!   the writer takes the deletable segments off its list and goes on committing groups; the
//!   janitor syncs the journal, then unlinks them (or puts them back on the list if the sync failed).
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
//!
//! A group's commit, step by step, is in [`commit`]; segment files are created and deleted by
//! [`super::segment_files`].

mod commit;

use std::fs::File;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, Notify};
use tracing::{error, info, warn};

use super::dedup::{self, Dedup};
use super::format::{self, Record};
use super::io::is_no_room;
use super::janitor::Janitor;
use super::lock::DirLock;
use super::recovery::Recovered;
use super::segment_files::fresh_segment;
use super::{
    segment_path, Command, Heartbeat, Segment, Shared, SpoolError, SpoolSettings, State, GROUP_MAX_BYTES, QUEUE,
};
use crate::clock::{monotonic_millis, now_secs};
use crate::event::StreamRuns;

/// How often a writer that cannot write (a failed segment, a full disk) tries again on its own,
/// without waiting for a batch: a replica that is not ready receives none.
const HEAL_EVERY: Duration = Duration::from_millis(250);
/// How often a writer whose disk failed otherwise than for room tries a fresh segment on its own
/// (each failure is logged).
const RETRY_BROKEN_EVERY: Duration = Duration::from_secs(5);
/// Free bytes wanted beyond the refused group before batches are taken again after `ENOSPC`, so
/// that the spool does not flap between refusing and failing writes on an almost full disk.
pub(super) const ROOM_MARGIN: u64 = 256 * 1024;
/// Free bytes wanted after `ENOSPC` when everything is delivered (nothing more will be freed).
const MIN_ROOM: u64 = 64 * 1024;

/// The spool's one writer, on a thread of its own: the only one to write segments; it owns the
/// active segment, the dedup window and the streams' runs.
pub(super) struct Writer {
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

impl Writer {
    /// Builds the shared state from what recovery found and opens a fresh active segment.
    /// `wake` is the writer's own queue, for the janitor to say a sync or a deletion is done.
    pub(super) fn start(
        settings: SpoolSettings,
        recovered: Recovered,
        dedup: Dedup,
        journal: dedup::Journal,
        lock: DirLock,
        wake: mpsc::WeakSender<Command>,
    ) -> Result<(Writer, Arc<Shared>), SpoolError> {
        let journal_bytes = journal.bytes();
        let newest_segment = recovered.segments.back().map_or(0, |s| s.first_seq);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                undelivered: recovered.undelivered,
                segments: recovered.segments,
                committed_len: 0,
                reader_segment: 0,
                newest_segment,
                disk_bytes: recovered.disk_bytes + journal_bytes,
                write_error: false,
                disk_full: false,
                refusing: false,
                refused_need: 0,
                unwritten_file_results: std::collections::HashMap::new(),
                files_pending: recovered.files_pending,
                dedup_ids: dedup.len(),
            }),
            committed: Arc::new(Notify::new()),
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
        janitor.append(recovered.ids.into());
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

    /// Commits what waits in `rx` a group at a time (see [`GROUP_MAX_BYTES`]) until a `Close` or
    /// until every sender is gone; then syncs the active segment, saves the streams' runs for the
    /// next start and answers the `Close`. The heartbeat tells how long each group took.
    pub(super) fn run(mut self, mut rx: mpsc::Receiver<Command>) {
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
        let mut guard = self.shared.lock();
        let st = &mut *guard;
        if let Some(old) = self.settle_active_size(st) {
            old.limit = previous_limit;
        }
        st.segments.push_back(Segment::new(first_seq, segment_path(&self.shared.settings.dir, first_seq), None, len));
        st.committed_len = len;
        st.disk_bytes += len;
        drop(guard);
        self.active = Some(file);
        self.active_first_seq = first_seq;
        self.active_len = len;
        self.synced_len = len;
        self.carry.clear();
    }

    /// Once the active segment has reached `segment_bytes`: syncs it (a failed sync abandons it
    /// for a fresh one that carries what was not durable) and installs a fresh segment after it (if
    /// that fails, the current one keeps growing).
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
        if self.janitor.deleting() {
            return;
        }
        let victims = self.take_deletable();
        if victims.is_empty() {
            return;
        }
        self.janitor.delete(&self.shared, victims, self.dedup.enabled());
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
            // What its deletion takes off `disk_bytes` is counted first.
            self.settle_active_size(&mut st);
            self.active = None;
        }
        st.segments.drain(..n).collect()
    }

    /// Before the active segment is replaced or deleted: its size as the disk has it, counted in
    /// `disk_bytes`, which counted it up to its committed end only — after a failed write or sync it
    /// also holds the failed group's bytes. Returns the segment, if there is an active one.
    fn settle_active_size<'a>(&self, st: &'a mut State) -> Option<&'a mut Segment> {
        let file = self.active.as_ref()?;
        let seg = st.segments.iter_mut().find(|s| s.first_seq == self.active_first_seq)?;
        let size = file.metadata().map_or(self.active_len, |m| m.len());
        st.disk_bytes += size.saturating_sub(st.committed_len.max(seg.size));
        seg.size = size;
        Some(seg)
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
