//! Recovery: what a previous run left in `spool.dir`, read segment by segment in bounded chunks.
//!
//! What damage costs:
//! - A frame cut short or failing its checksum **at the end of the newest segment, with nothing
//!   valid after it**, is a torn write that was never acknowledged to Huggy (its group's `fdatasync`
//!   had not returned): it is logged and truncated away.
//! - The bytes after the durable length of a segment abandoned after a failed write (recorded by an
//!   `Abandoned` frame in the next segment) belong to a group that was answered 503: skipped, logged,
//!   even where they still read back whole.
//! - Every segment read is synced before the spool opens: a group written but not yet synced when a
//!   process died is still in the page cache and reads back whole; from now on it counts as stored.
//! - Anything else that does not checksum is **damage**: logged with its offset and size, counted,
//!   the segment is copied into `damaged/` for inspection, and reading resumes at the next valid
//!   frame (found by its magic and checksum), so every valid frame after the damage is still
//!   delivered. Only the events whose frames were hit are lost.
//! - A frame that checksums but does not decode, or a segment in another format, stops the start-up
//!   with a clear error: it is data this build does not understand, never "torn".

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::time::Instant;

use tracing::{error, info, warn};

use super::chunks::Chunks;
use super::dedup::Dedup;
use super::format::{self, Next, Record};
use super::reader::Position;
use super::undelivered::Undelivered;
use super::{list_segments, FileWork, Segment, SpoolError, FILE_WORK_HELD, FILE_WORK_HELD_BYTES};
use crate::clock::now_secs;

/// Whether recovery may change files (the daemon) or only read them (`spool status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Access {
    /// Truncates torn tails, removes segments cut short before their header, keeps damaged
    /// segments aside, syncs what it read and collects the ids the dedup journal lacks.
    Repair,
    /// Changes nothing on disk.
    ReadOnly,
}

/// What recovery found.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RecoveryReport {
    pub(crate) segments: usize,
    /// Bytes of segment files read.
    pub bytes_read: u64,
    /// Frames that checksummed.
    pub frames: u64,
    /// Torn writes found at the end of the newest segment: a group cut short before its fsync
    /// returned, so never acknowledged; truncated away.
    pub torn_tails: u32,
    /// Regions that did not checksum, outside a torn tail or an abandoned write.
    pub damaged_regions: u32,
    /// Bytes in those regions.
    pub damaged_bytes: u64,
    /// Events whose frames fell in damaged regions, from the gaps in sequence numbers.
    pub events_lost: u64,
    /// Copies of damaged segments, for inspection.
    pub(super) kept_aside: Vec<PathBuf>,
    pub(crate) elapsed_ms: u64,
}

pub(super) struct Recovered {
    /// Stored events not delivered: an index that does not grow with their number.
    pub(super) undelivered: Undelivered,
    pub(super) segments: VecDeque<Segment>,
    pub(super) next_seq: u64,
    /// Where file capture begins.
    pub(super) capture: CaptureStart,
    /// Events whose files are wanted and not done.
    pub(super) files_pending: usize,
    pub(super) disk_bytes: u64,
    /// Ids of the events in segments that the dedup journal did not hold, and when each was stored
    /// ([`Access::Repair`] with a dedup window only): their appends may have been lost with the last run.
    pub(super) ids: VecDeque<(crate::event::EventId, i64)>,
    pub(super) report: RecoveryReport,
}

/// Where file capture begins after a start: the oldest events waiting for their files, held in
/// memory (at most [`FILE_WORK_HELD`] of them and [`FILE_WORK_HELD_BYTES`] of URLs), then the log
/// from `from` on — the first event recovery did not hold, or, when it held them all, the first
/// segment this run writes.
#[derive(Debug, Default)]
pub(super) struct CaptureStart {
    pub(super) held: Vec<FileWork>,
    pub(super) from: Position,
}

/// The file work recovery finds, bounded: the oldest events with files not done, then only where
/// the rest begins and how many there are.
#[derive(Default)]
struct Wanted {
    held: BTreeMap<u64, FileWork>,
    bytes: usize,
    /// The first event with files not held: its place in the log and its seq. Every later one is
    /// not held either, so that the capture cursor can take them all from there.
    rest_from: Option<(Position, u64)>,
    /// Events with files from `rest_from` on, and `Files` frames of events from there on: their
    /// difference is how many of them wait (an event is acknowledged only after its results).
    rest_events: u64,
    rest_done: u64,
}

impl Wanted {
    fn add(&mut self, at: Position, work: FileWork) {
        let bytes = work.url_bytes();
        let fits =
            self.held.is_empty() || (self.held.len() < FILE_WORK_HELD && self.bytes + bytes <= FILE_WORK_HELD_BYTES);
        if self.rest_from.is_none() && fits {
            self.bytes += bytes;
            self.held.insert(work.seq, work);
            return;
        }
        self.rest_from.get_or_insert((at, work.seq));
        self.rest_events += 1;
    }

    fn done(&mut self, seq: u64) {
        if let Some(w) = self.held.remove(&seq) {
            self.bytes -= w.url_bytes();
        } else if self.rest_from.is_some_and(|(_, first)| seq >= first) {
            self.rest_done += 1;
        }
    }
}

/// Reads every segment in order: undelivered events, where file capture begins, the next sequence
/// number; adds the ids of stored events to `dedup`.
///
/// # Errors
/// A segment in another format or with an undecodable frame ([`SpoolError::Format`]); I/O errors.
pub(super) fn recover(dir: &Path, access: Access, dedup: &mut Dedup, now: i64) -> Result<Recovered, SpoolError> {
    let started = Instant::now();
    let files = list_segments(dir)?;
    let first_seq = files.first().map_or(1, |(n, _)| *n).max(1);
    let mut r = Recovered {
        undelivered: Undelivered::new(first_seq),
        segments: VecDeque::new(),
        next_seq: first_seq,
        capture: CaptureStart::default(),
        files_pending: 0,
        disk_bytes: 0,
        ids: VecDeque::new(),
        report: RecoveryReport::default(),
    };
    let abandoned = abandoned_limits(&files)?;
    let mut wanted = Wanted::default();
    let last = files.len().saturating_sub(1);
    for (i, (first_seq, path)) in files.iter().enumerate() {
        let newest = i == last;
        let mut chunks = Chunks::open(path)?;
        let head_len = chunks.len.min(format::SEGMENT_HEADER_LEN as u64) as usize;
        let head = chunks.at(0, head_len)?[..head_len].to_vec();
        match format::check_header(&head) {
            Ok(true) => {}
            Ok(false) | Err(format::HeaderError::Short(_)) if newest => {
                // Created by a roll-over that never wrote its header: nothing was ever stored in it.
                if access == Access::Repair {
                    warn!(segment = %path.display(), bytes = chunks.len, "spool: removing a segment cut short before its header");
                    fs::remove_file(path)?;
                }
                r.next_seq = r.next_seq.max(*first_seq);
                continue;
            }
            Ok(false) => {
                if access == Access::Repair {
                    fs::remove_file(path)?;
                }
                continue;
            }
            Err(e) => return Err(SpoolError::Format { path: path.clone(), reason: e.to_string() }),
        }
        r.report.segments += 1;
        let limit = abandoned.get(first_seq).copied();
        let mut pos = format::SEGMENT_HEADER_LEN as u64;
        let mut last_event_seq: Option<u64> = None;
        let mut damaged = false;
        let (mut events, mut event_bytes) = (0u64, 0u64);
        loop {
            match chunks.frame_at(pos)? {
                Next::End => break,
                // A frame that still reads back past the durable length of an abandoned segment was
                // answered 503 and may be gone after a power loss: it is not stored.
                Next::Frame(_, used) if limit.is_some_and(|l| pos + used as u64 > l) => {
                    info!(segment = %path.display(), offset = pos, bytes = chunks.len - pos,
                        "spool: skipping the failed write at the end of a segment abandoned after an i/o error");
                    break;
                }
                Next::Frame(rec, used) => {
                    r.report.frames += 1;
                    if let Record::Event { seq, event, .. } = &rec {
                        last_event_seq = Some(*seq);
                        events += 1;
                        event_bytes += event.value.len() as u64;
                    }
                    apply(&mut r, &mut wanted, dedup, access, rec, (*first_seq, pos), now);
                    pos += used as u64;
                }
                Next::Undecodable(e) => {
                    return Err(SpoolError::Format {
                        path: path.clone(),
                        reason: format!("{e} (at offset {pos}); this build cannot read it, refusing to start"),
                    });
                }
                Next::Bad(why) => {
                    if limit.is_some_and(|l| pos >= l) {
                        info!(segment = %path.display(), offset = pos, bytes = chunks.len - pos,
                            "spool: skipping the failed write at the end of a segment abandoned after an i/o error");
                        break;
                    }
                    match chunks.resync(pos + 1)? {
                        Some(next) => {
                            let lost = match (last_event_seq, first_event_seq_at(&mut chunks, next)?) {
                                (Some(before), Some(after)) if after > before + 1 => after - before - 1,
                                (None, Some(after)) if after > *first_seq => after - *first_seq,
                                _ => 0,
                            };
                            error!(
                                segment = %path.display(), offset = pos, damaged_bytes = next - pos, events_lost = lost, %why,
                                "spool: damaged data inside a segment; skipped to the next valid frame (the frames after it are delivered)"
                            );
                            r.report.damaged_regions += 1;
                            r.report.damaged_bytes += next - pos;
                            r.report.events_lost += lost;
                            damaged = true;
                            pos = next;
                        }
                        None if newest => {
                            warn!(
                                segment = %path.display(), offset = pos, discarded_bytes = chunks.len - pos, %why,
                                "spool: discarding a torn write at the end of the newest segment (it was never acknowledged)"
                            );
                            r.report.torn_tails += 1;
                            if access == Access::Repair {
                                let f = OpenOptions::new().write(true).open(path)?;
                                f.set_len(pos)?;
                                f.sync_all()?;
                                chunks.len = pos;
                            }
                            break;
                        }
                        None => {
                            error!(
                                segment = %path.display(), offset = pos, damaged_bytes = chunks.len - pos, %why,
                                "spool: damaged data at the end of an older segment"
                            );
                            r.report.damaged_regions += 1;
                            r.report.damaged_bytes += chunks.len - pos;
                            damaged = true;
                            break;
                        }
                    }
                }
            }
        }
        if damaged && access == Access::Repair {
            // A copy for inspection is no reason not to start (the disk may be full): the segment
            // itself stays until its events are delivered.
            if let Err(e) = keep_aside(dir, path, &mut r.report) {
                error!(segment = %path.display(), error = %e, "spool: could not keep a copy of a damaged segment aside");
            }
        }
        if access == Access::Repair {
            // What was read may be a group written but never synced before the last run ended (a
            // process crash leaves it in the page cache). Its events are now treated as stored: in
            // the dedup window, a re-send answered as a duplicate. Make them durable first.
            fs::File::open(path)?.sync_data()?;
        }
        r.report.bytes_read += chunks.len;
        r.disk_bytes += chunks.len;
        r.next_seq = r.next_seq.max(*first_seq);
        let mut segment = Segment::new(*first_seq, path.clone(), limit, chunks.len);
        (segment.events, segment.event_bytes) = (events, event_bytes);
        r.segments.push_back(segment);
    }
    let rest = wanted.rest_events.saturating_sub(wanted.rest_done);
    r.files_pending = wanted.held.len().saturating_add(usize::try_from(rest).unwrap_or(usize::MAX));
    r.capture = CaptureStart {
        held: wanted.held.into_values().collect(),
        from: wanted.rest_from.map_or((r.next_seq, format::SEGMENT_HEADER_LEN as u64), |(at, _)| at),
    };
    r.report.elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    Ok(r)
}

/// Takes one frame, found at `at`, into what recovery knows.
fn apply(
    r: &mut Recovered,
    wanted: &mut Wanted,
    dedup: &mut Dedup,
    access: Access,
    rec: Record,
    at: Position,
    now: i64,
) {
    match rec {
        Record::Event { seq, received_at, event } => {
            r.next_seq = r.next_seq.max(seq + 1);
            // Ids the journal already holds (loaded from it) need not be written again: files found
            // at start are synced before any segment is deleted.
            // The newest `spool.dedup_max_ids` at most: the window forgets older ones at its ceiling
            // anyway (at worst a duplicate), and a spool whose journal was lost must not cost memory
            // per event to recover.
            if access == Access::Repair && dedup.enabled() && !dedup.contains(&event.id, now) {
                if r.ids.len() >= dedup.max_ids() {
                    r.ids.pop_front();
                }
                r.ids.push_back((event.id, received_at));
            }
            dedup.insert(event.id, received_at, now);
            if !event.files.is_empty() {
                let work = FileWork { seq, received_at, event_id: event.id, company: event.company, urls: event.files };
                wanted.add(at, work);
            }
            r.undelivered.stored(seq, received_at);
        }
        Record::Acked(ranges) => {
            for (a, b) in ranges {
                r.undelivered.ack(a, b);
                let done: Vec<u64> = wanted.held.range(a..=b).map(|(s, _)| *s).collect();
                for s in done {
                    wanted.done(s);
                }
            }
        }
        // The results themselves stay in the log: the publisher reads them there.
        Record::Files { seq, .. } => wanted.done(seq),
        Record::Abandoned { .. } => {}
    }
}

/// What `spool status` shows of the undelivered events beyond their number, counted by reading the
/// segments once more (recovery keeps nothing per event).
pub(super) struct Tally {
    pub(super) by_type: BTreeMap<String, u64>,
    pub(super) bytes: u64,
    pub(super) oldest_received_at: Option<i64>,
}

/// Reads the segments `r` found again and counts the undelivered events by type, their bytes and
/// the earliest receipt time. Damage is skipped as recovery skipped it.
///
/// # Errors
/// A segment cannot be read.
pub(super) fn tally(r: &Recovered) -> Result<Tally, SpoolError> {
    let mut t = Tally { by_type: BTreeMap::new(), bytes: 0, oldest_received_at: None };
    for segment in &r.segments {
        let mut chunks = Chunks::open(&segment.path)?;
        let end = segment.limit.unwrap_or(chunks.len).min(chunks.len);
        let mut pos = format::SEGMENT_HEADER_LEN as u64;
        while pos < end {
            match chunks.frame_at(pos)? {
                Next::Frame(_, used) if pos + used as u64 > end => break,
                Next::Frame(rec, used) => {
                    if let Record::Event { seq, received_at, event } = rec {
                        if r.undelivered.contains(seq) {
                            *t.by_type.entry(event.event_type.label().to_owned()).or_default() += 1;
                            t.bytes += event.value.len() as u64;
                            t.oldest_received_at =
                                Some(t.oldest_received_at.map_or(received_at, |o| o.min(received_at)));
                        }
                    }
                    pos += used as u64;
                }
                Next::End | Next::Undecodable(_) => break,
                Next::Bad(_) => match chunks.resync(pos + 1)? {
                    Some(next) => pos = next,
                    None => break,
                },
            }
        }
    }
    Ok(t)
}

/// Durable lengths of abandoned segments, from the `Abandoned` frame that opens the segment after.
fn abandoned_limits(files: &[(u64, PathBuf)]) -> Result<HashMap<u64, u64>, SpoolError> {
    let mut out = HashMap::new();
    for (_, path) in files {
        let mut chunks = Chunks::open(path)?;
        if chunks.len <= format::SEGMENT_HEADER_LEN as u64 {
            continue;
        }
        let head = chunks.at(0, format::SEGMENT_HEADER_LEN)?[..format::SEGMENT_HEADER_LEN].to_vec();
        if format::check_header(&head) != Ok(true) {
            continue;
        }
        if let Next::Frame(Record::Abandoned { first_seq, durable_len }, _) =
            chunks.frame_at(format::SEGMENT_HEADER_LEN as u64)?
        {
            out.insert(first_seq, durable_len);
        }
    }
    Ok(out)
}

/// The sequence number of the first event frame at or after `pos` (to size a damaged gap).
fn first_event_seq_at(chunks: &mut Chunks, mut pos: u64) -> std::io::Result<Option<u64>> {
    for _ in 0..64 {
        match chunks.frame_at(pos)? {
            Next::Frame(Record::Event { seq, .. }, _) => return Ok(Some(seq)),
            Next::Frame(_, used) => pos += used as u64,
            _ => return Ok(None),
        }
    }
    Ok(None)
}

/// Copies a damaged segment into `damaged/` (once per file name and start).
fn keep_aside(dir: &Path, path: &Path, report: &mut RecoveryReport) -> std::io::Result<()> {
    let aside = dir.join("damaged");
    fs::create_dir_all(&aside)?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let prefix = format!("{name}.");
    for entry in fs::read_dir(&aside)? {
        let kept = entry?.path();
        if kept.file_name().is_some_and(|n| n.to_string_lossy().starts_with(&prefix)) {
            // Kept aside by an earlier start already.
            report.kept_aside.push(kept);
            return Ok(());
        }
    }
    let to = aside.join(format!("{prefix}{}", now_secs()));
    fs::copy(path, &to)?;
    error!(copy = %to.display(), "spool: damaged segment kept aside for inspection");
    report.kept_aside.push(to);
    Ok(())
}
