//! The capture stage as the daemon runs it. In spool mode it follows the spool through its
//! [`CaptureFeed`]: every durable event with files — committed just now or found at recovery,
//! whatever became of the request that brought it — is queued for capture (stage `file_feed`), and
//! each event's results go back into the spool through the same feed (stage `file_results`), where
//! the publisher finds them. In kafka mode the request path submits jobs itself and waits for
//! their replies within its ack budget. Every loop runs under the supervisor.

use std::path::Path;
use std::sync::Arc;

use tokio::sync::{mpsc, Mutex};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use super::{results_json, Completion, FileCapture, FileDone, FileJob, FileResult, SetupError};
use crate::config::{Config, FilesConfig};
use crate::metrics::{Metrics, Stage};
use crate::spool::CaptureFeed;
use crate::supervise::Supervisor;

/// Results waiting to be recorded in the spool at most; a full queue holds the downloads that
/// finish (they await room), never memory.
const RESULTS_QUEUE: usize = 1024;

/// Starts file capture for `cfg`, its loops tracked by `tasks` and stopped by `stop`: the capture
/// stage when `files.enabled` (returned, for the kafka-mode request path and the drain), and in
/// spool mode (`feed` given) the loops that follow the spool. With capture disabled, the spool's
/// file work is reported failed so that its events get published.
///
/// # Errors
/// The store or the download client cannot be set up.
pub(crate) fn start(
    cfg: &Config,
    feed: Option<CaptureFeed>,
    metrics: Arc<Metrics>,
    supervisor: &Supervisor,
    tasks: &TaskTracker,
    stop: &CancellationToken,
) -> Result<Option<Arc<FileCapture>>, SetupError> {
    let capture = if cfg.files.enabled {
        let (done_tx, done_rx) = mpsc::channel::<FileDone>(RESULTS_QUEUE);
        let capture = FileCapture::new(&files_config(cfg, feed.is_some()), metrics, done_tx)?;
        if let Some(feed) = feed.clone() {
            // Shared so that a restarted recorder takes over the same queue; it ends when every
            // sender is gone.
            let done_rx = Arc::new(Mutex::new(done_rx));
            let (sup, stop) = (supervisor.clone(), stop.clone());
            tasks.spawn(async move {
                sup.supervise(Stage::FileResults, stop, move || record_results(feed.clone(), done_rx.clone())).await;
            });
        }
        capture.spawn_supervised(stop.clone(), supervisor);
        Some(capture)
    } else {
        None
    };
    if let Some(feed) = feed {
        let (sup, capture, stop) = (supervisor.clone(), capture.clone(), stop.clone());
        tasks.spawn(async move {
            let run_stop = stop.clone();
            sup.supervise(Stage::FileFeed, stop, move || follow(feed.clone(), capture.clone(), run_stop.clone())).await;
        });
    }
    Ok(capture)
}

/// `[files]` with `min_free_bytes` worked out when unset: a `file://` store on the spool's
/// filesystem leaves `spool.max_bytes` free, so that captures never take the room the spool may
/// need; elsewhere (another volume, an object store, no spool) nothing is held back.
fn files_config(cfg: &Config, spooled: bool) -> FilesConfig {
    let mut files = cfg.files.clone();
    if files.min_free_bytes.is_none() {
        let shared = match files.store.strip_prefix("file://") {
            Some(dir) if spooled => crate::clock::same_filesystem(Path::new(dir), &cfg.spool.dir).unwrap_or_else(|e| {
                warn!(error = %e, "cannot tell whether the file store shares the spool's disk; assuming it does");
                true
            }),
            _ => false,
        };
        let floor = if shared { cfg.spool.max_bytes } else { 0 };
        info!(min_free_bytes = floor, shared_with_spool = shared, "file store free-space floor");
        files.min_free_bytes = Some(floor);
    }
    files
}

/// Records capture results in the spool until every sender is gone.
async fn record_results(feed: CaptureFeed, done: Arc<Mutex<mpsc::Receiver<FileDone>>>) {
    let mut done = done.lock().await;
    while let Some(d) = done.recv().await {
        feed.record(d.seq, d.member).await;
    }
}

/// Queues the spool's file work for capture as it appears (or, with capture disabled, records it
/// failed at once).
async fn follow(feed: CaptureFeed, capture: Option<Arc<FileCapture>>, stop: CancellationToken) {
    loop {
        let work = tokio::select! {
            work = feed.next() => work,
            () = stop.cancelled() => break,
        };
        for w in work {
            match &capture {
                Some(capture) => capture.submit(FileJob {
                    event_id: w.event_id,
                    company: w.company,
                    received_at: w.received_at,
                    urls: w.urls,
                    completion: Completion::Spool(w.seq),
                }),
                None => {
                    let why = "file capture is disabled (files.enabled = false)";
                    let results: Vec<FileResult> = w.urls.iter().map(|u| FileResult::failed(u, why.into())).collect();
                    feed.record(w.seq, results_json(&results)).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_store_on_the_spools_disk_leaves_the_spool_its_room_by_default() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let mut cfg = Config::default();
        cfg.spool.dir = dir.path().join("spool");
        cfg.spool.max_bytes = 123_456_789;
        cfg.files.store = format!("file://{}", dir.path().join("files").display());
        assert_eq!(files_config(&cfg, true).min_free_bytes, Some(123_456_789), "same filesystem");
        assert_eq!(files_config(&cfg, false).min_free_bytes, Some(0), "no spool to protect");
        cfg.files.store = "s3://bucket/prefix".into();
        assert_eq!(files_config(&cfg, true).min_free_bytes, Some(0), "an object store takes no local disk");
        cfg.files.min_free_bytes = Some(7);
        assert_eq!(files_config(&cfg, true).min_free_bytes, Some(7), "an explicit floor is kept");
    }
}
