//! The janitor: a thread that does the spool's slow housekeeping off the writer's thread, so that
//! no request waits for it. It keeps the dedup journal ([`dedup::Journal`]: appends each durable
//! group's ids, syncs them before a segment goes) and deletes delivered segments, strictly oldest
//! first, one deletion at a time. It never writes a segment and never decides what is deletable:
//! the writer takes the deletable segments off the shared list and hands them over.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::thread::JoinHandle;

use tokio::sync::mpsc;
use tracing::{error, info, warn};

use super::dedup;
use super::segment_files::{delete_segments, put_back};
use super::{Command, Segment, Shared};
use crate::clock::now_secs;
use crate::event::EventId;

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
pub(super) struct Janitor {
    jobs: Option<Sender<Chore>>,
    /// A deletion is in flight (set on the writer's thread by [`Janitor::delete`], cleared by the
    /// thread when done): the next waits for it, so segments go strictly oldest first (a segment
    /// put back on the list goes back before anything newer is taken off it).
    deleting: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Janitor {
    /// Starts the thread. After a deletion that freed room it queues [`Command::Compact`] (if the
    /// spool is still open and the queue has room; a busy writer compacts after its group anyway),
    /// so that the writer deletes what became deletable meanwhile and ends a refusal. The bytes it
    /// adds and frees on disk are kept in the shared `disk_bytes`.
    pub(super) fn start(
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
                    let panic = crate::panics::message(payload);
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
    pub(super) fn append(&self, ids: Vec<(EventId, i64)>) {
        if let Some(jobs) = &self.jobs {
            if !ids.is_empty() && jobs.send(Chore::Append(ids)).is_err() {
                error!("spool: the janitor thread stopped; acknowledged segments are kept");
            }
        }
    }

    /// Whether a deletion is in flight: the writer takes nothing more off the list until it is done.
    pub(super) fn deleting(&self) -> bool {
        self.deleting.load(Ordering::Acquire)
    }

    /// Hands the thread segments taken off the shared list, oldest first, to delete once the
    /// journal holding their ids is synced (`sync`: the dedup window is on). With no thread to take
    /// them they are deleted here when there is no window, and put back on the list when there is
    /// one (nothing could sync the journal).
    pub(super) fn delete(&self, shared: &Shared, victims: Vec<Segment>, sync: bool) {
        self.deleting.store(true, Ordering::Release);
        let unsent = match self.jobs.as_ref() {
            Some(jobs) => jobs.send(Chore::Delete { victims, sync }).err().map(|std::sync::mpsc::SendError(c)| c),
            None => Some(Chore::Delete { victims, sync }),
        };
        if let Some(Chore::Delete { victims, sync }) = unsent {
            // No janitor: without a window delete here; with one, nothing can sync the journal.
            if sync {
                error!("spool: the janitor thread stopped; acknowledged segments are kept");
                put_back(shared, victims);
            } else {
                delete_segments(shared, victims);
            }
            self.deleting.store(false, Ordering::Release);
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
