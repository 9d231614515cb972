//! The spool's followers: the stages that read what is durable and write back only through the
//! spool's writer. [`Spool::open`](super::Spool::open) hands out one handle per follower, once:
//!
//! - [`PublishFeed`] — the publisher: committed events in sequence order, their file results, and
//!   acknowledgements (Kafka took the event, or it was dead-lettered).
//! - [`CaptureFeed`] — the file-capture stage: the events whose files must be captured, read from
//!   the log by a cursor of its own a bounded number at a time (those recovery held first, then on
//!   from where it stopped holding them), and the results it records.
//!
//! Each handle is cheap to clone, so a supervised stage that restarts takes the same handle up
//! again and carries on from the spool's durable state.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tracing::{error, warn};

use super::format::Record;
use super::reader::{Cursor, Position};
use super::{Command, FileWork, Queue, Reader, SpoolError};

/// The handles of the stages that follow the spool, as [`Spool::open`](super::Spool::open) hands
/// them out.
pub struct Followers {
    /// The publisher's handle.
    pub publish: PublishFeed,
    /// The file-capture stage's handle.
    pub capture: CaptureFeed,
}

impl Followers {
    /// The followers of the log behind `queue`; capture begins with the work recovery `held`, then
    /// reads the log `from` there on.
    pub(super) fn new(queue: &Queue, held: Vec<FileWork>, from: Position) -> Followers {
        let cursor = Cursor::at(queue.shared.clone(), from, false);
        let work = WorkCursor { held: held.into(), cursor, more: false };
        Followers {
            publish: PublishFeed { queue: queue.clone() },
            capture: CaptureFeed { queue: queue.clone(), work: Arc::new(Mutex::new(work)) },
        }
    }
}

/// The publisher's view of the spool: what to publish, and where to say it was.
#[derive(Clone)]
pub struct PublishFeed {
    queue: Queue,
}

impl PublishFeed {
    /// A reader positioned at the oldest undelivered event.
    pub(crate) fn reader(&self) -> Reader {
        Reader::new(self.queue.shared.clone())
    }

    /// Notified whenever the writer committed something: new events, acknowledgements, file
    /// results (so an event waiting for its files is released without polling).
    pub(crate) fn committed(&self) -> Arc<Notify> {
        self.queue.shared.committed.clone()
    }

    /// The file results (`huggy_bridge_files`) of an event whose `Files` frame could not be
    /// written yet (the disk refused it; it is written when the disk takes writes again). Results
    /// that are written are read from the log ([`Reader::read_now`]), not kept in memory.
    pub(crate) fn unwritten_file_results(&self, seq: u64) -> Option<Vec<u8>> {
        self.queue.shared.lock().unwritten_file_results.get(&seq).cloned()
    }

    /// The results of an event as the publisher finds them: the first `Files` frame for it in the
    /// log, or those not written yet.
    #[cfg(test)]
    pub(crate) fn file_results(&self, seq: u64) -> Option<Vec<u8>> {
        let wanted = std::collections::HashSet::from([seq]);
        let batch = self.reader().read_now(usize::MAX, usize::MAX, &wanted).expect("the log reads");
        batch.files.into_iter().find(|(s, _)| *s == seq).map(|(_, r)| r).or_else(|| self.unwritten_file_results(seq))
    }

    /// Records that Kafka acknowledged these events (or they were dead-lettered).
    pub async fn ack(&self, seqs: Vec<u64>) {
        if seqs.is_empty() {
            return;
        }
        if !self.queue.send(Command::Ack(seqs)).await {
            warn!("spool closed before an acknowledgement was recorded; the events will be published again");
        }
    }
}

/// The capture stage's view of the spool: the file work of durable events, and where its results go.
#[derive(Clone)]
pub struct CaptureFeed {
    queue: Queue,
    work: Arc<Mutex<WorkCursor>>,
}

/// Where the capture stage is in the log: work recovery held (the oldest), then a cursor over the
/// log; each event's work is handed out once.
struct WorkCursor {
    held: VecDeque<FileWork>,
    cursor: Cursor,
    /// The last take stopped at [`TAKE_SCAN_BYTES`] before the committed end: more to read now.
    more: bool,
}

/// Bytes of log one [`CaptureFeed::take`] reads at most, so that a backlog whose events with files
/// are few and far between never holds a worker for long: the next call goes on from there.
const TAKE_SCAN_BYTES: usize = 16 * 1024 * 1024;

impl CaptureFeed {
    /// Up to `max` durable events whose files must be captured, and no more once their URLs hold
    /// `max_bytes` (the first is returned whatever its size), each handed out once: those recovery
    /// held, then the others in log order as they are committed; empty when there is none now, or
    /// none in the [`TAKE_SCAN_BYTES`] of log it read (then [`CaptureFeed::next`] goes on at once).
    ///
    /// # Errors
    /// A segment cannot be read and nothing was collected before it (the position stays at the
    /// frame that failed: it is read again next time).
    pub(crate) fn take(&self, max: usize, max_bytes: usize) -> Result<Vec<FileWork>, SpoolError> {
        let mut w = self.work.lock().unwrap_or_else(|p| p.into_inner());
        let shared = self.queue.shared.clone();
        let mut out: Vec<FileWork> = Vec::new();
        let mut bytes = 0usize;
        while out.len() < max && bytes < max_bytes {
            let Some(work) = w.held.pop_front() else { break };
            if shared.lock().undelivered.contains(work.seq) {
                bytes = bytes.saturating_add(work.url_bytes());
                out.push(work);
            }
        }
        if out.len() >= max || bytes >= max_bytes {
            return Ok(out);
        }
        let mut read = 0usize;
        let mut stopped = false;
        let scanned = w.cursor.scan(|rec, _, used| {
            read += used;
            if let Record::Event { seq, received_at, event } = rec {
                if !event.files.is_empty() && shared.lock().undelivered.contains(seq) {
                    let work =
                        FileWork { seq, received_at, event_id: event.id, company: event.company, urls: event.files };
                    bytes = bytes.saturating_add(work.url_bytes());
                    out.push(work);
                }
            }
            stopped = read >= TAKE_SCAN_BYTES;
            out.len() < max && bytes < max_bytes && !stopped
        });
        w.more = stopped && scanned.is_ok();
        // The cursor has moved past what it collected: hand that out even when a later frame
        // could not be read (it is read again next time).
        match scanned {
            Err(e) if out.is_empty() => Err(e),
            _ => Ok(out),
        }
    }

    /// Like [`CaptureFeed::take`], waiting until there is some; a read that fails is logged and
    /// tried again a second later.
    ///
    /// # Cancel safety
    /// Cancel-safe: work is taken only when it is returned.
    pub(crate) async fn next(&self, max: usize, max_bytes: usize) -> Vec<FileWork> {
        let committed = self.queue.shared.committed.clone();
        loop {
            let notified = committed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.take(max, max_bytes) {
                Ok(work) if !work.is_empty() => return work,
                // Stopped at its scan budget: the rest of the log now, after other tasks had a turn.
                Ok(_) if self.work.lock().unwrap_or_else(|p| p.into_inner()).more => tokio::task::yield_now().await,
                Ok(_) => notified.await,
                Err(e) => {
                    error!(error = %e, "spool: reading file work failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// File work held in memory now (recovery's, not handed out yet).
    #[cfg(test)]
    pub(crate) fn held(&self) -> usize {
        self.work.lock().unwrap_or_else(|p| p.into_inner()).held.len()
    }

    /// Records the file results of an event; synced with its group, then the publisher sees them.
    pub async fn record(&self, seq: u64, results: Vec<u8>) {
        if !self.queue.send(Command::FilesDone(seq, results)).await {
            warn!(seq, "spool closed before file results were recorded; they are captured again after the restart");
        }
    }
}
