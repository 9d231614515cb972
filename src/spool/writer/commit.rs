//! One group's commit, as the sequence [`Writer::commit`] reads:
//!
//! 1. **take** each command into a [`Group`]: a batch is refused whole when the writer cannot
//!    write (no room on the filesystem, a broken segment) or the spool is full, otherwise each of
//!    its events is stored or answered as a duplicate (**dedup**); file results are encoded in
//!    their turn, the acknowledgements last;
//! 2. **write** the group's frames with one `write` and at most one `fdatasync`;
//! 3. **carry over** what is not known to be durable (acknowledgements, file results) for the next
//!    fresh segment, or, after a failed write, refuse the group's batches;
//! 4. **remember** the ids of what is now durable in the dedup window and the journal;
//! 5. **publish** the group to `State` and wake the readers and the capture stage, then answer;
//! 6. **tidy**: heal, hand delivered segments to the janitor, roll over, end a refusal.
//!
//! Nothing is answered before step 5, and nothing enters the dedup window before its frame is
//! durable (step 4 follows a successful write): the order is what the spool's crash-safety rests on.

use std::collections::{HashMap, HashSet};

use tokio::sync::oneshot;
use tracing::{error, info};

use super::{unusable, Writer, ROOM_MARGIN};
use crate::clock::now_secs;
use crate::event::{Event, EventId};
use crate::spool::format::{self, Record};
use crate::spool::io::is_no_room;
use crate::spool::{merge_ranges, to_ranges, Appended, Command, Shared, SpoolError};

/// An append's answer, sent once its group is committed (or failed).
type Reply = (oneshot::Sender<Result<Appended, SpoolError>>, Result<Appended, SpoolError>);

/// An event the group stores: its bytes (for its segment's tally) and receipt time (for the
/// undelivered index).
struct NewEvent {
    bytes: u64,
    received_at: i64,
}

/// A group's commands sorted into what they write and what they publish, gathered before anything
/// is written.
#[derive(Default)]
struct Group {
    /// The frames to write: events and file results in the order of their commands, then one
    /// acknowledgement.
    buf: Vec<u8>,
    replies: Vec<Reply>,
    /// Events stored, by seq.
    events: Vec<(u64, NewEvent)>,
    /// Their ids and receipt times, for the dedup window and its journal.
    ids: Vec<(EventId, i64)>,
    /// How many of them have files to capture.
    with_files: usize,
    /// Ids this group stored so far: an event twice in one group is a duplicate too.
    seen: HashSet<EventId>,
    /// The last run of each stream among this group's batches, recorded once the group is durable.
    runs: HashMap<[u8; 16], [u8; 16]>,
    /// Seqs acknowledged.
    acked: Vec<u64>,
    /// Their record, merged into ranges: encoded last.
    ack_record: Option<Record>,
    files_done: Vec<(u64, Vec<u8>)>,
    /// The file results were written and synced (the publisher reads them from the log).
    files_written: bool,
    close: Option<oneshot::Sender<()>>,
}

/// Where a batch begins in a group, to take it out again when it is refused.
struct Mark {
    buf: usize,
    events: usize,
    ids: usize,
    with_files: usize,
    next_seq: u64,
}

impl Group {
    fn mark(&self, next_seq: u64) -> Mark {
        Mark {
            buf: self.buf.len(),
            events: self.events.len(),
            ids: self.ids.len(),
            with_files: self.with_files,
            next_seq,
        }
    }

    /// Takes out everything added since `mark` (a refused batch).
    fn undo(&mut self, mark: &Mark) {
        for (id, _) in &self.ids[mark.ids..] {
            self.seen.remove(id);
        }
        self.buf.truncate(mark.buf);
        self.events.truncate(mark.events);
        self.ids.truncate(mark.ids);
        self.with_files = mark.with_files;
    }

    /// Encodes the acknowledgements, as merged ranges, after everything else.
    fn encode_acks(&mut self) {
        self.ack_record = (!self.acked.is_empty()).then(|| Record::Acked(to_ranges(&mut self.acked)));
        if let Some(r) = &self.ack_record {
            format::encode(r, &mut self.buf);
        }
    }
}

/// The room a group starts from (read once from `State`) and the refusal it leaves behind.
struct Room {
    /// Bytes on disk when the group began.
    usage: u64,
    max_bytes: u64,
    low_water: u64,
    /// Nothing was undelivered when the group began.
    all_delivered: bool,
    /// Batches are refused for lack of room.
    refusing: bool,
    /// Bytes of the largest batch refused since refusing began.
    refused_need: u64,
}

impl Room {
    fn of(shared: &Shared) -> Room {
        let settings = &shared.settings;
        let st = shared.lock();
        Room {
            usage: st.disk_bytes,
            max_bytes: settings.max_bytes,
            low_water: settings.low_water(),
            all_delivered: st.undelivered.is_empty(),
            refusing: st.refusing,
            refused_need: st.refused_need,
        }
    }

    /// Whether a batch of `bytes` that would be written after `before` bytes on disk is taken.
    /// Once a batch was refused for lack of room, every batch is refused until the refused one
    /// would fit again below the low-water mark, so that no later batch (of the same chat) can
    /// overtake it. With nothing left to deliver no room will be freed: the group's first batch to
    /// store anything starts over (`alone`).
    fn admits(&self, before: u64, bytes: u64, alone: bool) -> bool {
        let resume = !self.refusing
            || (before < self.low_water && before + self.refused_need <= self.max_bytes)
            || (self.all_delivered && alone);
        resume && before + bytes <= self.max_bytes
    }
}

impl Writer {
    /// Commits one group with a single write and at most one sync; returns the `Close` it held.
    pub(super) fn commit(&mut self, commands: Vec<Command>) -> Option<oneshot::Sender<()>> {
        let now = now_secs();
        self.dedup.expire(now);
        self.runs.expire(now);
        if self.broken {
            self.heal();
        }
        let mut room = Room::of(&self.shared);
        let mut group = Group::default();
        for command in commands {
            self.take(&mut group, &mut room, command, now);
        }
        group.encode_acks();
        let committed = self.write_group(&mut group);
        if committed {
            self.remember(&mut group, now);
        }
        self.publish(&mut group, &room, committed);
        for (tx, r) in group.replies.drain(..) {
            let _ = tx.send(r);
        }
        self.tidy();
        group.close
    }

    /// Takes one command into the group.
    fn take(&mut self, g: &mut Group, room: &mut Room, command: Command, now: i64) {
        match command {
            Command::Append { events, received_at, reply } => {
                self.take_batch(g, room, events, received_at, reply, now);
            }
            Command::Ack(seqs) => g.acked.extend(seqs),
            Command::FilesDone(seq, member) => {
                format::encode(&Record::Files { seq, member: member.clone() }, &mut g.buf);
                g.files_done.push((seq, member));
            }
            Command::Close(tx) => g.close = Some(tx),
            // Only wakes the writer: compaction after the group picks up the journal's sync.
            Command::Compact => {}
        }
    }

    /// Takes one batch into the group, or refuses it whole: when the writer cannot write
    /// ([`Writer::refusal`]) or the spool has no room for it ([`Room::admits`]; a refused batch is
    /// taken out again and its seqs given out anew). Only a batch that stores something changes
    /// the refusal. Nothing is written or answered here: the answer waits in the group.
    fn take_batch(
        &mut self,
        g: &mut Group,
        room: &mut Room,
        events: Vec<Event>,
        received_at: i64,
        reply: oneshot::Sender<Result<Appended, SpoolError>>,
        now: i64,
    ) {
        if let Some(refused) = self.refusal() {
            g.replies.push((reply, Err(refused)));
            return;
        }
        let mark = g.mark(self.next_seq);
        // Judged against the runs before this batch: its own events do not count.
        let runs: Vec<([u8; 16], [u8; 16])> =
            events.iter().filter_map(|e| e.lineage.as_ref().map(|l| (l.stream, l.run))).collect();
        let seqs = self.store_batch(g, events, received_at, now);
        let stored = seqs.iter().flatten().count();
        let duplicates = seqs.len() - stored;
        let before = room.usage + mark.buf as u64;
        let bytes = (g.buf.len() - mark.buf) as u64;
        if stored > 0 && !room.admits(before, bytes, g.events.len() == stored) {
            g.undo(&mark);
            self.next_seq = mark.next_seq;
            room.refusing = true;
            room.refused_need = room.refused_need.max(bytes);
            g.replies.push((reply, Err(SpoolError::Full { used: before, max: room.max_bytes })));
            return;
        }
        if stored > 0 {
            room.refusing = false;
            room.refused_need = 0;
        }
        g.runs.extend(runs);
        g.replies.push((reply, Ok(Appended { stored, duplicates, seqs })));
    }

    /// Why a batch is refused whole because the writer cannot write: no room on the filesystem
    /// (with the free bytes now), or a failed segment that no fresh one has replaced yet. Tries
    /// no healing: that happens before and after the group.
    fn refusal(&self) -> Option<SpoolError> {
        if let Some(want) = self.no_room {
            let free = self.free_bytes();
            return Some(SpoolError::NoRoom { free, want: want.saturating_add(ROOM_MARGIN) });
        }
        self.broken.then(|| SpoolError::WriteFailed(unusable()))
    }

    /// Dedup: stores each event of a batch (a seq, a frame in the group, its file work) unless it
    /// is a re-send of one stored within the window or earlier in the group; returns each event's
    /// seq, `None` for a duplicate. It only reads the dedup window: ids enter it once durable.
    fn store_batch(&mut self, g: &mut Group, events: Vec<Event>, received_at: i64, now: i64) -> Vec<Option<u64>> {
        let mut seqs = Vec::with_capacity(events.len());
        for event in events {
            let stored_before = self.dedup.contains(&event.id, now) || g.seen.contains(&event.id);
            if stored_before && self.runs.is_resend(event.lineage.as_deref(), &g.runs) {
                seqs.push(None);
                continue;
            }
            g.seen.insert(event.id);
            let seq = self.next_seq;
            self.next_seq += 1;
            seqs.push(Some(seq));
            g.ids.push((event.id, received_at));
            g.events.push((seq, NewEvent { bytes: event.value.len() as u64, received_at }));
            if !event.files.is_empty() {
                g.with_files += 1;
            }
            format::encode(&Record::Event { seq, received_at, event }, &mut g.buf);
        }
        seqs
    }

    /// Writes the group's frames, synced when they store events or file results (acknowledgements
    /// alone are not synced), and carries over what is not known to be durable. Returns whether
    /// the group is committed: written, or with nothing to write (a broken writer writes nothing:
    /// its batches were refused, the rest is carried). A failed write is not: its segment is
    /// abandoned ([`Writer::fail_group`]). Neither publishes nor answers anything: the state and
    /// the answers follow from its result.
    fn write_group(&mut self, g: &mut Group) -> bool {
        let must_sync = !g.events.is_empty() || !g.files_done.is_empty();
        let written = if g.buf.is_empty() { Ok(false) } else { self.write(&g.buf, must_sync) };
        match written {
            Ok(synced) => {
                g.files_written = synced;
                if synced {
                    self.carry.clear();
                } else if let Some(r) = &g.ack_record {
                    self.carry_acked(r);
                }
                true
            }
            // Nothing was written (nor is on disk): what the group carried waits for the fresh segment.
            Err(_) if self.broken => {
                self.carry_over(g.ack_record.as_ref(), &g.files_done);
                g.buf.clear();
                true
            }
            Err(e) => {
                self.fail_group(&e, g);
                false
            }
        }
    }

    /// After a failed write or sync: the group's acknowledgement and file results are carried
    /// over, the segment is abandoned (the next group, or the writer on its own, starts a fresh
    /// one), `ENOSPC` starts refusing batches for lack of room, and every batch the group took is
    /// answered `WriteFailed`.
    fn fail_group(&mut self, e: &std::io::Error, g: &mut Group) {
        error!(error = %e, segment = self.active_first_seq, "spool: write failed; this group is refused and the segment abandoned");
        self.carry_over(g.ack_record.as_ref(), &g.files_done);
        self.broken = true;
        if is_no_room(e) {
            error!(dir = %self.shared.settings.dir.display(), "spool: its filesystem is full; refusing batches, delivering and deleting what was delivered until there is room");
            self.no_room = Some(g.buf.len() as u64);
        }
        for (_, r) in &mut g.replies {
            if r.is_ok() {
                *r = Err(SpoolError::WriteFailed(std::io::Error::new(e.kind(), e.to_string())));
            }
        }
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

    /// Puts the ids and stream runs of a committed group into the dedup window, and hands the ids
    /// to the janitor for the journal. Called only once the group's frames are durable.
    fn remember(&mut self, g: &mut Group, now: i64) {
        if !self.dedup.enabled() {
            return;
        }
        for (id, at) in &g.ids {
            self.dedup.insert(*id, *at, now);
        }
        for (stream, run) in std::mem::take(&mut g.runs) {
            self.runs.record(stream, run, now);
        }
        self.janitor.append(std::mem::take(&mut g.ids));
    }

    /// Publishes the group to `State` under one lock, then wakes the followers (the capture
    /// stage reads new file work from the log, the publisher new events and results). A group
    /// that is not committed publishes no event, byte or file work; its acknowledgements and file
    /// results are facts all the same (they are carried over, and results not written are kept
    /// for the publisher until then).
    fn publish(&self, g: &mut Group, room: &Room, committed: bool) {
        {
            let mut st = self.shared.lock();
            if committed {
                st.disk_bytes += g.buf.len() as u64;
                let (events, bytes) = (g.events.len() as u64, g.events.iter().map(|(_, e)| e.bytes).sum::<u64>());
                for (seq, e) in &g.events {
                    st.undelivered.stored(*seq, e.received_at);
                }
                if let Some(active) = st.segments.iter_mut().rev().find(|s| s.first_seq == self.active_first_seq) {
                    active.events += events;
                    active.event_bytes += bytes;
                }
                st.files_pending += g.with_files;
                // Not while broken: the active segment's length then holds a failed group's bytes,
                // which readers must not read and which are counted when it is replaced.
                if !self.broken {
                    st.committed_len = self.active_len;
                }
            }
            // Acknowledgements and file results are facts whether or not their frames were written:
            // the failure path keeps them for the fresh segment.
            for (seq, member) in g.files_done.drain(..) {
                if st.undelivered.contains(seq) {
                    st.files_pending = st.files_pending.saturating_sub(1);
                    if !g.files_written {
                        st.unwritten_file_results.insert(seq, member);
                    }
                }
            }
            if let Some(Record::Acked(ranges)) = &g.ack_record {
                for &(a, b) in ranges {
                    st.undelivered.ack(a, b);
                }
            }
            if !st.unwritten_file_results.is_empty() {
                for seq in &g.acked {
                    st.unwritten_file_results.remove(seq);
                }
            }
            st.refusing = room.refusing;
            st.refused_need = room.refused_need;
            st.write_error = self.broken && self.no_room.is_none();
            st.disk_full = self.no_room.is_some();
            st.dedup_ids = self.dedup.len();
        }
        self.shared.committed.notify_waiters();
    }

    /// After the group is answered: heals a writer that cannot write, hands delivered segments to
    /// the janitor (even while it cannot write: on a full disk that is what makes room), rolls over
    /// a full segment, and ends a refusal that delivery made room for. It comes after the answers
    /// so that none of them waits for it.
    fn tidy(&mut self) {
        if self.broken {
            self.heal();
        }
        self.compact();
        if !self.broken {
            self.maybe_roll();
        }
        // Room freed by delivery ends a refusal without waiting for the next batch: a replica that
        // is not ready receives no batches.
        let settings = &self.shared.settings;
        let (max_bytes, low_water) = (settings.max_bytes, settings.low_water());
        let mut st = self.shared.lock();
        if st.refusing && st.disk_bytes < low_water && st.disk_bytes + st.refused_need <= max_bytes {
            st.refusing = false;
            st.refused_need = 0;
            info!(disk_bytes = st.disk_bytes, "spool has room again; taking batches");
        }
    }
}
