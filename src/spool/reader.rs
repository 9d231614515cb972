//! Reading the log forward from a position, as the followers do: committed frames in order,
//! read from the segment files (normally the page cache) in bounded chunks, damage skipped as
//! recovery skipped it.
//!
//! The publisher's [`Reader`] hands out undelivered events and the file results (`Files` frames)
//! it is asked for; it keeps its segment and every later one from deletion. The capture feed reads
//! with a [`Cursor`] of its own (events whose files are wanted), and so does the publisher when it
//! looks ahead for the results of the events it holds ([`Reader::ahead`]); neither keeps anything
//! from deletion.

use std::collections::HashSet;
use std::sync::Arc;

use super::chunks::{frame_in, Chunks};
use super::format::{self, Next, Record};
use super::{Shared, SpoolError, Stored};

/// A place in the log: a segment (its first seq) and an offset in it. Places compare in log order.
pub(crate) type Position = (u64, u64);

/// Reads committed frames forward from a [`Position`].
pub(super) struct Cursor {
    shared: Arc<Shared>,
    segment: u64,
    offset: u64,
    chunks: Option<Chunks>,
    /// Keeps the segment read and every later one from deletion (the publisher's reader).
    pins: bool,
}

impl Cursor {
    /// A cursor at `at`. When its segment is not (or no longer) in the log, it reads from the first
    /// segment after it: segments go oldest first, so a missing one was delivered and deleted, or
    /// is one the writer has not started yet.
    pub(super) fn at(shared: Arc<Shared>, at: Position, pins: bool) -> Cursor {
        Cursor { shared, segment: at.0, offset: at.1.max(format::SEGMENT_HEADER_LEN as u64), chunks: None, pins }
    }

    pub(super) fn position(&self) -> Position {
        (self.segment, self.offset)
    }

    fn move_to(&mut self, segment: u64) {
        self.segment = segment;
        self.offset = format::SEGMENT_HEADER_LEN as u64;
        self.chunks = None;
    }

    /// Hands `visit` every committed frame after the position with its place in the log and its
    /// size, moving past each frame before it is handed over, until `visit` returns `false` or the
    /// committed end is reached.
    ///
    /// # Errors
    /// A segment cannot be read.
    pub(super) fn scan(&mut self, mut visit: impl FnMut(Record, Position, usize) -> bool) -> Result<(), SpoolError> {
        loop {
            let (path, limit, is_active, next_segment) = {
                let mut st = self.shared.lock();
                let Some(idx) = st.segments.iter().position(|s| s.first_seq >= self.segment) else {
                    // Nothing at or after the position yet (a spool that cannot write may have
                    // deleted its last segment): let go of a deleted file.
                    self.chunks = None;
                    return Ok(());
                };
                if st.segments[idx].first_seq != self.segment {
                    let first = st.segments[idx].first_seq;
                    drop(st);
                    self.move_to(first);
                    continue;
                }
                if self.pins {
                    st.reader_segment = self.segment;
                }
                let seg = &st.segments[idx];
                let is_active = idx + 1 == st.segments.len();
                let limit = if is_active { Some(st.committed_len) } else { seg.limit };
                (seg.path.clone(), limit, is_active, st.segments.get(idx + 1).map(|s| s.first_seq))
            };
            if self.chunks.is_none() {
                match Chunks::open(&path) {
                    Ok(c) => self.chunks = Some(c),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => match next_segment {
                        Some(n) => {
                            self.move_to(n);
                            continue;
                        }
                        None => return Ok(()),
                    },
                    Err(e) => return Err(e.into()),
                }
            }
            let chunks = self.chunks.as_mut().expect("opened above");
            if let Some(l) = limit {
                chunks.len = l;
            } else if !is_active {
                chunks.len = std::fs::metadata(&path).map_or(chunks.len, |m| m.len());
            }
            let end = chunks.len;
            let mut more = true;
            // A cursor that keeps nothing from deletion may see its segment deleted (every event in
            // it delivered) and cut down under it: it goes on after it.
            let shared = &self.shared;
            let (segment, pins) = (self.segment, self.pins);
            let gone = || !pins && !shared.lock().segments.iter().any(|s| s.first_seq == segment);
            while more && self.offset < end {
                let next = match chunks.frame_at(self.offset) {
                    Ok(next) => next,
                    Err(_) if gone() => break,
                    Err(e) => return Err(e.into()),
                };
                match next {
                    Next::Frame(rec, used) => {
                        let at = (self.segment, self.offset);
                        self.offset += used as u64;
                        more = visit(rec, at, used);
                    }
                    Next::End => break,
                    // Damage found (and reported) at recovery: skip to the next valid frame.
                    Next::Bad(_) | Next::Undecodable(_) => match chunks.resync(self.offset + 1) {
                        Ok(Some(n)) => self.offset = n,
                        Ok(None) => self.offset = end,
                        Err(_) if gone() => break,
                        Err(e) => return Err(e.into()),
                    },
                }
            }
            if !more || is_active {
                return Ok(());
            }
            match next_segment {
                Some(n) if self.offset >= end => self.move_to(n),
                _ => return Ok(()),
            }
        }
    }
}

/// What the publisher's reader read: undelivered events, and the file results it was asked for.
#[derive(Debug, Default)]
pub(crate) struct Batch {
    pub(crate) events: Vec<Stored>,
    /// Where each of `events` is in the log, in the same order (to read it again: [`Reader::event_at`]).
    pub(crate) at: Vec<Position>,
    /// `huggy_bridge_files` of events waiting for them: those `wanted` and those of this batch.
    pub(crate) files: Vec<(u64, Vec<u8>)>,
}

/// The publisher's reader: undelivered events in sequence order, acknowledged ones skipped, and
/// the file results (`Files` frames, which follow their event in the log) of the events it holds.
pub(crate) struct Reader {
    cursor: Cursor,
}

impl Reader {
    pub(super) fn new(shared: Arc<Shared>) -> Reader {
        let segment = shared.lock().segments.front().map_or(0, |s| s.first_seq);
        Reader { cursor: Cursor::at(shared, (segment, 0), true) }
    }

    /// Where the next read begins.
    pub(crate) fn position(&self) -> Position {
        self.cursor.position()
    }

    /// A reader of file results only, from `at` on, that keeps nothing from deletion: how the
    /// publisher finds the results of the events it holds while it cannot take more events.
    pub(crate) fn ahead(&self, at: Position) -> Ahead {
        Ahead { cursor: Cursor::at(self.cursor.shared.clone(), at, false), at_end: false }
    }

    /// The event whose frame is at `at` (a place [`Reader::read_now`] gave), read again: what the
    /// publisher does for an event it parked without its bytes.
    ///
    /// # Errors
    /// Its segment is gone or cannot be read, or no event is there.
    pub(crate) fn event_at(&self, at: Position) -> Result<Stored, SpoolError> {
        let path = self.cursor.shared.lock().segments.iter().find(|s| s.first_seq == at.0).map(|s| s.path.clone());
        let not_there = |what: &str| SpoolError::Io(std::io::Error::other(format!("no event at {at:?}: {what}")));
        let path = path.ok_or_else(|| not_there("its segment is gone"))?;
        match frame_in(&path, at.1)? {
            Next::Frame(Record::Event { seq, received_at, event }, _) => Ok(Stored { seq, received_at, event }),
            _ => Err(not_there("another frame")),
        }
    }

    /// Up to `max` undelivered events after the last one returned; waits for new ones when there
    /// are none.
    ///
    /// # Errors
    /// A segment cannot be read.
    ///
    /// # Cancel safety
    /// Cancel-safe: the position only moves past events that are returned.
    #[cfg(test)]
    pub(crate) async fn next_batch(&mut self, max: usize) -> Result<Vec<Stored>, SpoolError> {
        let committed = self.cursor.shared.committed.clone();
        loop {
            let notified = committed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let got = self.read_now(max, usize::MAX, &HashSet::new())?.events;
            if !got.is_empty() {
                return Ok(got);
            }
            notified.await;
        }
    }

    /// Up to `max` undelivered events after the last one returned, without waiting, and no more
    /// once their values hold `max_bytes` (the first event is returned whatever its size): what the
    /// caller holds stays below `max_bytes` plus one event. With them, the file results read on the
    /// way of the events in `wanted` and of those returned.
    ///
    /// # Errors
    /// A segment cannot be read and nothing was read before it.
    pub(crate) fn read_now(
        &mut self,
        max: usize,
        max_bytes: usize,
        wanted: &HashSet<u64>,
    ) -> Result<Batch, SpoolError> {
        let mut out = Batch::default();
        if max == 0 {
            return Ok(out);
        }
        let shared = self.cursor.shared.clone();
        let mut with_files: HashSet<u64> = HashSet::new();
        let mut bytes = 0usize;
        let scanned = self.cursor.scan(|rec, at, _| {
            match rec {
                Record::Event { seq, received_at, event } if shared.lock().undelivered.contains(seq) => {
                    out.at.push(at);
                    bytes = bytes.saturating_add(event.value.len());
                    if !event.files.is_empty() {
                        with_files.insert(seq);
                    }
                    out.events.push(Stored { seq, received_at, event });
                }
                Record::Files { seq, member } if wanted.contains(&seq) || with_files.contains(&seq) => {
                    out.files.push((seq, member));
                }
                _ => {}
            }
            out.events.len() < max && bytes < max_bytes
        });
        // The position has moved past what was collected: hand it out even when a later frame
        // could not be read (that one is read again next time).
        match scanned {
            Err(e) if out.events.is_empty() && out.files.is_empty() => Err(e),
            _ => Ok(out),
        }
    }
}

/// Bytes of log [`Ahead::results`] reads at most in one call, so that the publisher's loop is
/// never held for long.
pub(crate) const AHEAD_SCAN_BYTES: usize = 16 * 1024 * 1024;

/// Reads file results ahead of the publisher's reader (see [`Reader::ahead`]).
pub(crate) struct Ahead {
    cursor: Cursor,
    at_end: bool,
}

impl Ahead {
    /// Where the next read begins.
    pub(crate) fn position(&self) -> Position {
        self.cursor.position()
    }

    /// Whether the last call read to the committed end (nothing more until the writer commits).
    pub(crate) fn at_end(&self) -> bool {
        self.at_end
    }

    /// The file results of the events in `wanted` found in up to [`AHEAD_SCAN_BYTES`] of log.
    ///
    /// # Errors
    /// A segment cannot be read and nothing was found before it.
    pub(crate) fn results(&mut self, wanted: &HashSet<u64>) -> Result<Vec<(u64, Vec<u8>)>, SpoolError> {
        let mut found = Vec::new();
        let mut scanned = 0usize;
        let mut stopped = false;
        let scanned = self.cursor.scan(|rec, _, used| {
            if let Record::Files { seq, member } = rec {
                if wanted.contains(&seq) {
                    found.push((seq, member));
                }
            }
            scanned += used;
            stopped = scanned >= AHEAD_SCAN_BYTES;
            !stopped
        });
        self.at_end = scanned.is_ok() && !stopped;
        match scanned {
            Err(e) if found.is_empty() => Err(e),
            _ => Ok(found),
        }
    }
}
