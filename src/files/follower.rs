//! The capture stage as the daemon runs it. In spool mode it follows the spool through its
//! [`CaptureFeed`]: every durable event with files — committed just now or found at recovery,
//! whatever became of the request that brought it — is queued for capture (stage `file_feed`), and
//! each event's results go back into the spool through the same feed (stage `file_results`), where
//! the publisher finds them. In kafka mode the request path submits jobs itself and waits for
//! their replies within its ack budget. Every loop runs under the supervisor.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch, Mutex};
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

/// What [`start`] started.
pub(crate) struct Started {
    /// The capture stage, when `files.enabled`.
    pub(crate) capture: Option<Arc<FileCapture>>,
    /// In spool mode with capture on: how far the recorder of its results has got.
    pub(crate) recorded: Option<Recorded>,
}

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
) -> Result<Started, SetupError> {
    let mut recorded = None;
    let capture = if cfg.files.enabled {
        let (done_tx, done_rx) = mpsc::channel::<FileDone>(RESULTS_QUEUE);
        let capture = FileCapture::new(&files_config(cfg, feed.is_some()), metrics, done_tx)?;
        if let Some(feed) = feed.clone() {
            // Shared so that a restarted recorder takes over the same queue (and count); it ends
            // when every sender is gone, not at `stop`: the drain waits for what is queued.
            let done_rx = Arc::new(Mutex::new(done_rx));
            let (count, seen) = watch::channel(0);
            let count = Arc::new(count);
            recorded = Some(Recorded(seen));
            let (sup, stop) = (supervisor.clone(), stop.clone());
            tasks.spawn(async move {
                sup.supervise(Stage::FileResults, stop, move || {
                    record_results(feed.clone(), done_rx.clone(), count.clone())
                })
                .await;
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
    Ok(Started { capture, recorded })
}

/// How many capture results the recorder has recorded in the spool: each handed to its writer, so
/// its frame is written before the spool's close.
pub(crate) struct Recorded(watch::Receiver<u64>);

impl Recorded {
    /// The drain, after [`FileCapture::stopped`]: waits until the `sent` results the capture stage
    /// sent ([`FileCapture::results_sent`]) are all recorded, `within` at most. Returns how many
    /// were not (warned about: those files are captured again after the restart).
    pub(crate) async fn flushed(&self, sent: u64, within: Duration) -> u64 {
        let mut seen = self.0.clone();
        let _ = tokio::time::timeout(within, seen.wait_for(|&n| n >= sent)).await;
        let missing = sent.saturating_sub(*seen.borrow());
        if missing > 0 {
            warn!(
                missing,
                sent, "the drain ran out of time before every file result was recorded; those files are captured again after the restart"
            );
        }
        missing
    }
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

/// Records capture results in the spool until every sender is gone, counting them in `count`.
async fn record_results(feed: CaptureFeed, done: Arc<Mutex<mpsc::Receiver<FileDone>>>, count: Arc<watch::Sender<u64>>) {
    let mut done = done.lock().await;
    while let Some(d) = done.recv().await {
        feed.record(d.seq, d.member).await;
        count.send_modify(|n| *n += 1);
    }
}

/// Events' jobs the capture stage takes from the spool at most while earlier ones are queued or
/// running, and bytes of their URLs: the rest waits in the log, not in memory, whatever the
/// controller's concurrency. Jobs are queued earliest deadline first among these.
pub(crate) const QUEUED_JOBS: usize = 1024;
/// See [`QUEUED_JOBS`].
pub(crate) const QUEUED_URL_BYTES: usize = 4 * 1024 * 1024;

/// Queues the spool's file work for capture as it appears, as much as the capture stage has room
/// for ([`QUEUED_JOBS`], [`QUEUED_URL_BYTES`]); with capture disabled, records it failed at once.
async fn follow(feed: CaptureFeed, capture: Option<Arc<FileCapture>>, stop: CancellationToken) {
    loop {
        let (jobs, bytes) = match &capture {
            Some(capture) => tokio::select! {
                room = capture.room(QUEUED_JOBS, QUEUED_URL_BYTES) => room,
                () = stop.cancelled() => break,
            },
            None => (QUEUED_JOBS, QUEUED_URL_BYTES),
        };
        let work = tokio::select! {
            work = feed.next(jobs, bytes) => work,
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
    use crate::event::{Event, EventId, EventType, KnownType};
    use crate::spool::{Spool, SpoolSettings};

    /// An event with one file, outside `files.allowed_url_prefixes`: its capture is refused at once.
    fn with_a_file(n: u32, url: &str) -> Event {
        let value = format!(r#"{{"id":{n},"file":"{url}"}}"#).into_bytes();
        let event_type = EventType::Known(KnownType::ReceivedMessage);
        Event {
            id: EventId::derive("receivedMessage", &value),
            routing: crate::event::routing_of(&event_type, &value),
            event_type,
            original_type: None,
            key: Some("1".into()),
            company: Some("1".into()),
            time: 1,
            value,
            dead_letter: None,
            files: vec![url.into()],
            file_results: None,
            lineage: None,
        }
    }

    #[tokio::test]
    async fn results_queued_when_captures_stop_are_in_the_spool_after_the_drain() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let settings = || SpoolSettings::new(dir.path().join("spool"), 1 << 30, 3600);
        let (spool, followers) = Spool::open(settings()).expect("a spool");
        let url = "https://elsewhere.example/a.pdf";
        let now = crate::clock::now_secs();
        let mut seqs = Vec::new();
        for n in 0..50 {
            let appended = spool.append(vec![with_a_file(n, url)], now).await.expect("appended");
            seqs.extend(appended.seqs.into_iter().flatten());
        }
        let files =
            FilesConfig { store: format!("file://{}", dir.path().join("files").display()), ..Default::default() };
        let (tx, rx) = mpsc::channel(RESULTS_QUEUE);
        let capture = FileCapture::new(&files, Arc::new(Metrics::new()), tx).expect("a capture stage");
        let stop = CancellationToken::new();
        capture.spawn_workers(stop.clone());
        for &seq in &seqs {
            capture.submit(FileJob {
                event_id: EventId([1; 16]),
                company: None,
                received_at: now,
                urls: vec![url.into()],
                completion: Completion::Spool(seq),
            });
        }
        let waited = std::time::Instant::now();
        while capture.results_sent() < seqs.len() as u64 {
            assert!(waited.elapsed() < Duration::from_secs(10), "{} results sent", capture.results_sent());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // The capture stage stops with every result still queued: its recorder is behind (here it
        // gets to the queue 200 ms late, as one restarted after a panic does).
        stop.cancel();
        capture.stopped().await;
        let (count, seen) = watch::channel(0);
        let feed = followers.capture.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            record_results(feed, Arc::new(Mutex::new(rx)), Arc::new(count)).await;
        });
        assert_eq!(Recorded(seen).flushed(capture.results_sent(), Duration::from_secs(10)).await, 0);
        spool.close().await;

        let (spool, followers) = Spool::open(settings()).expect("the spool again");
        for seq in seqs {
            let recorded = followers.publish.file_results(seq).expect("the event's file results survived the drain");
            let recorded: serde_json::Value = serde_json::from_slice(&recorded).expect("json");
            assert_eq!(recorded[0]["status"], "failed", "{recorded}");
            assert_eq!(recorded[0]["url"], url, "{recorded}");
        }
        spool.close().await;
        // Out of time (here, the recorder gone after 3 of 5): what was not recorded is counted.
        let (count, seen) = watch::channel(3);
        drop(count);
        assert_eq!(Recorded(seen).flushed(5, Duration::from_millis(10)).await, 2);
    }

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

    #[tokio::test]
    async fn the_capture_stage_takes_no_more_work_from_the_spool_than_its_queue_holds() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let (spool, followers) =
            Spool::open(SpoolSettings::new(dir.path().join("spool"), 1 << 30, 3600)).expect("a spool");
        let url = "https://elsewhere.example/a.pdf";
        let now = crate::clock::now_secs();
        let total = QUEUED_JOBS * 3;
        for first in (0..total).step_by(500) {
            let events = (first..first + 500).map(|n| with_a_file(u32::try_from(n).expect("small"), url)).collect();
            spool.append(events, now).await.expect("appended");
        }
        let files =
            FilesConfig { store: format!("file://{}", dir.path().join("files").display()), ..Default::default() };
        let (tx, mut rx) = mpsc::channel(RESULTS_QUEUE);
        let capture = FileCapture::new(&files, Arc::new(Metrics::new()), tx).expect("a capture stage");
        let stop = CancellationToken::new();
        // The feed runs, downloads do not yet: what the stage holds is what the feed gave it.
        let feeding = tokio::spawn(follow(followers.capture.clone(), Some(capture.clone()), stop.clone()));
        let queued = || capture.queued().0;
        let waited = std::time::Instant::now();
        while queued() < QUEUED_JOBS {
            assert!(waited.elapsed() < Duration::from_secs(10), "{} jobs queued", queued());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(queued(), QUEUED_JOBS, "the rest of the work waits in the spool");
        // Once downloads run (each refused at once: the URL is not allowed), the feed keeps the
        // queue topped up until every event has its results.
        capture.spawn_workers(stop.clone());
        let mut results = 0;
        while results < total {
            let got = tokio::time::timeout(Duration::from_secs(20), rx.recv()).await.expect("results keep coming");
            assert!(got.is_some());
            results += 1;
            assert!(queued() <= QUEUED_JOBS);
        }
        stop.cancel();
        feeding.await.expect("the feed stops");
        spool.close().await;
    }
}
