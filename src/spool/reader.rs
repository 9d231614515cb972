//! The publisher's view of the spool: committed events in sequence order, acknowledged ones
//! skipped, read from the segment files (normally the page cache) in bounded chunks.

use std::sync::Arc;

use super::chunks::Chunks;
use super::format::{self, Next, Record};
use super::{Shared, SpoolError, Stored};

/// Reads committed events in sequence order, skipping acknowledged ones.
pub(crate) struct Reader {
    shared: Arc<Shared>,
    segment: u64,
    offset: u64,
    chunks: Option<Chunks>,
}

impl Reader {
    pub(super) fn new(shared: Arc<Shared>) -> Reader {
        let segment = shared.lock().segments.front().map_or(0, |s| s.first_seq);
        Reader { shared, segment, offset: format::SEGMENT_HEADER_LEN as u64, chunks: None }
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
        let committed = self.shared.committed.clone();
        loop {
            let notified = committed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let got = self.read_now(max, usize::MAX)?;
            if !got.is_empty() {
                return Ok(got);
            }
            notified.await;
        }
    }

    fn move_to(&mut self, segment: u64) {
        self.segment = segment;
        self.offset = format::SEGMENT_HEADER_LEN as u64;
        self.chunks = None;
    }

    /// Up to `max` undelivered events after the last one returned, without waiting, and no more
    /// once their values hold `max_bytes` (the first event is returned whatever its size): what the
    /// caller holds stays below `max_bytes` plus one event.
    ///
    /// # Errors
    /// A segment cannot be read.
    pub(crate) fn read_now(&mut self, max: usize, max_bytes: usize) -> Result<Vec<Stored>, SpoolError> {
        let mut out = Vec::new();
        let mut bytes = 0usize;
        while out.len() < max && bytes < max_bytes {
            let (path, limit, is_active, next_segment) = {
                let mut st = self.shared.lock();
                let Some(idx) = st.segments.iter().position(|s| s.first_seq == self.segment) else {
                    // Our segment was deleted (all acknowledged): start at the oldest that is left.
                    let Some(first) = st.segments.front().map(|s| s.first_seq) else {
                        // Not even an active one (a spool that cannot write deleted its last):
                        // let go of the deleted file.
                        self.chunks = None;
                        return Ok(out);
                    };
                    drop(st);
                    self.move_to(first);
                    continue;
                };
                st.reader_segment = self.segment;
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
                        None => return Ok(out),
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
            while self.offset < end && out.len() < max && bytes < max_bytes {
                match chunks.frame_at(self.offset)? {
                    Next::Frame(rec, used) => {
                        self.offset += used as u64;
                        if let Record::Event { seq, received_at, event } = rec {
                            if self.shared.lock().undelivered.contains(seq) {
                                bytes = bytes.saturating_add(event.value.len());
                                out.push(Stored { seq, received_at, event });
                            }
                        }
                    }
                    Next::End => break,
                    // Damage found (and reported) at recovery: skip to the next valid frame.
                    Next::Bad(_) | Next::Undecodable(_) => match chunks.resync(self.offset + 1)? {
                        Some(n) => self.offset = n,
                        None => self.offset = end,
                    },
                }
            }
            if out.len() >= max || bytes >= max_bytes || is_active {
                break;
            }
            match next_segment {
                Some(n) if self.offset >= end => self.move_to(n),
                _ => break,
            }
        }
        Ok(out)
    }
}
