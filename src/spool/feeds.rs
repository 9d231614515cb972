//! The spool's followers: the stages that read what is durable and write back only through the
//! spool's writer. [`Spool::open`](super::Spool::open) hands out one handle per follower, once:
//!
//! - [`PublishFeed`] — the publisher: committed events in sequence order, their file results, and
//!   acknowledgements (Kafka took the event, or it was dead-lettered).
//! - [`CaptureFeed`] — the file-capture stage: the events whose files must be captured (those found
//!   at recovery, then each as it is committed), and the results it records.
//!
//! Each handle is cheap to clone, so a supervised stage that restarts takes the same handle up
//! again and carries on from the spool's durable state.

use std::sync::Arc;

use tokio::sync::Notify;
use tracing::warn;

use super::{Command, FileWork, Queue, Reader};

/// The handles of the stages that follow the spool, as [`Spool::open`](super::Spool::open) hands
/// them out.
pub struct Followers {
    /// The publisher's handle.
    pub publish: PublishFeed,
    /// The file-capture stage's handle.
    pub capture: CaptureFeed,
}

impl Followers {
    pub(super) fn new(queue: &Queue) -> Followers {
        Followers { publish: PublishFeed { queue: queue.clone() }, capture: CaptureFeed { queue: queue.clone() } }
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

    /// The file results (`huggy_bridge_files`) of an event, once its files are done.
    pub(crate) fn file_results(&self, seq: u64) -> Option<Vec<u8>> {
        self.queue.shared.lock().file_results.get(&seq).cloned()
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
}

impl CaptureFeed {
    /// Durable events whose files must be captured, each handed out once: those found at recovery,
    /// then each one as it is committed; empty when there is none now.
    pub(crate) fn take(&self) -> Vec<FileWork> {
        self.queue.shared.lock().file_work.drain(..).collect()
    }

    /// Like [`CaptureFeed::take`], waiting until there is some.
    ///
    /// # Cancel safety
    /// Cancel-safe: work is taken only when it is returned.
    pub(crate) async fn next(&self) -> Vec<FileWork> {
        loop {
            // `notify_one` stores a permit when nobody waits, so work committed between the take
            // and the wait is not missed.
            let work = self.take();
            if !work.is_empty() {
                return work;
            }
            self.queue.shared.file_work.notified().await;
        }
    }

    /// Records the file results of an event; synced with its group, then the publisher sees them.
    pub(crate) async fn record(&self, seq: u64, results: Vec<u8>) {
        if !self.queue.send(Command::FilesDone(seq, results)).await {
            warn!(seq, "spool closed before file results were recorded; they are captured again after the restart");
        }
    }
}
