//! File capture: Huggy's file URLs carry an access token that dies 10 minutes after the event, so
//! every file an event points to is downloaded as soon as the event is durable, earliest deadline
//! first, streamed into the store, and described in the record's `huggy_bridge_files` header when
//! the event is published (the value stays Huggy's bytes).
//!
//! How many downloads run at once follows the deadlines ([`schedule`]): `files.concurrency` is the
//! floor; when the queue cannot finish before its tokens die, more connections open, up to
//! `files.max_concurrency`, for as long as each step still raises the hosts' throughput. A file that
//! cannot make its deadline is reported `expired` as soon as that is certain, so that it takes no
//! bandwidth from files that can.

pub mod detect;
pub mod disposition;
pub(crate) mod fetch;
pub(crate) mod schedule;
pub(crate) mod store;

pub use store::StoreError;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use futures::StreamExt;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot, Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::clock::now_secs;
use crate::config::FilesConfig;
use crate::event::EventId;
use crate::metrics::{FileOutcome, Metrics};
use fetch::{Guard, RedirectRefused, Refusal, ResolvedInternal};
use schedule::{Controller, HostEstimate, Pending};
use store::FileStore;

/// One entry of header `huggy_bridge_files`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct FileResult {
    url: String,
    status: &'static str,
    location: Option<String>,
    sha256: Option<String>,
    size: Option<u64>,
    content_type: Option<String>,
    filename: Option<String>,
    error: Option<String>,
}

impl FileResult {
    pub(crate) fn failed(url: &str, error: String) -> Self {
        FileResult {
            url: without_query(url).to_owned(),
            status: "failed",
            location: None,
            sha256: None,
            size: None,
            content_type: None,
            filename: None,
            error: Some(error),
        }
    }
}

/// `url` up to its query or fragment: a Huggy file URL's query is its access token, a credential
/// that goes into no log line, header or error text.
pub(crate) fn without_query(url: &str) -> &str {
    url.find(['?', '#']).map_or(url, |end| &url[..end])
}

/// The JSON array that becomes the event's `huggy_bridge_files` header.
pub(crate) fn results_json(results: &[FileResult]) -> Vec<u8> {
    serde_json::to_vec(results).expect("plain data serializes")
}

/// A spool-mode event's files are done: record `member` (its `huggy_bridge_files` array) for `seq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileDone {
    /// The event's spool sequence number.
    pub seq: u64,
    /// The JSON array published as header `huggy_bridge_files`.
    pub member: Vec<u8>,
}

/// Why one attempt failed, and whether another may succeed.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error("refused")]
    Refused(#[from] Refusal),
    #[error("refused")]
    Redirect(#[source] RedirectRefused),
    #[error("refused")]
    Resolved(#[source] ResolvedInternal),
    #[error("invalid url")]
    InvalidUrl(#[source] url::ParseError),
    /// The token's deadline passed, or the transfer cannot end before it.
    #[error("expired")]
    Expired,
    /// Kafka ack mode: the request's budget ran out first.
    #[error("ack_timeout")]
    AckTimeout,
    #[error("token rejected with HTTP {0} (expired or revoked)")]
    Rejected(u16),
    #[error("file larger than files.max_file_bytes ({0} bytes)")]
    TooLarge(u64),
    /// Storing the file would take the store's filesystem below `files.min_free_bytes`.
    #[error("file store full: {free} bytes free, files.min_free_bytes keeps {floor} for the spool")]
    StoreFloor { free: u64, floor: u64 },
    #[error("HTTP {0}")]
    Status(u16),
    #[error("no response within {0:?}")]
    NoResponse(Duration),
    #[error("transfer stalled for {0:?}")]
    Stalled(Duration),
    #[error("download failed")]
    Http(#[source] reqwest::Error),
    #[error("store")]
    Store(#[source] StoreError),
    /// The daemon is stopping: nothing is reported, the capture resumes at the next start.
    #[error("shutting down")]
    Shutdown,
}

impl Failure {
    fn retryable(&self) -> bool {
        matches!(self, Failure::Status(s) if *s >= 500 || *s == 429 || *s == 408)
            || matches!(self, Failure::NoResponse(_) | Failure::Stalled(_) | Failure::Http(_) | Failure::Store(_))
    }

    /// The final result this failure is counted as.
    fn metric(&self) -> FileOutcome {
        match self {
            Failure::Refused(_) | Failure::Redirect(_) | Failure::Resolved(_) => FileOutcome::Refused,
            Failure::Expired | Failure::Rejected(_) => FileOutcome::Expired,
            Failure::TooLarge(_) => FileOutcome::TooLarge,
            Failure::AckTimeout => FileOutcome::AckTimeout,
            _ => FileOutcome::Failed,
        }
    }

    /// What `huggy_bridge_files[].error` says: the message and its causes.
    fn report(&self) -> String {
        let mut msg = self.to_string();
        let mut src = std::error::Error::source(self);
        while let Some(s) = src {
            msg.push_str(": ");
            msg.push_str(&s.to_string());
            src = s.source();
        }
        msg
    }
}

/// A reqwest error, refusals of the guard told apart by type (they travel inside reqwest's chain).
fn classify_transport(e: reqwest::Error) -> Failure {
    let mut src: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(&e);
    while let Some(s) = src {
        if let Some(r) = s.downcast_ref::<RedirectRefused>() {
            return Failure::Redirect(RedirectRefused(r.0.clone()));
        }
        if let Some(r) = s.downcast_ref::<ResolvedInternal>() {
            return Failure::Resolved(ResolvedInternal(r.0.clone()));
        }
        src = s.source();
    }
    // reqwest's message names the URL, query (the access token) included.
    Failure::Http(e.without_url())
}

/// Who is waiting for an event's files.
pub enum Completion {
    /// Spool mode: the result goes to the spool through the results channel.
    Spool(u64),
    /// Kafka mode: the request waits for the result.
    Reply(oneshot::Sender<Vec<u8>>),
}

/// An event's files to capture.
pub struct FileJob {
    /// The event the files belong to; part of each stored object's key.
    pub event_id: EventId,
    /// The event's company id, the first segment of the object keys (`unknown` when absent).
    pub company: Option<String>,
    /// When the event was received (unix seconds, the wall clock: the token's age is Huggy's time):
    /// with `files.token_ttl_secs`, the files' deadline (counted down on the monotonic clock from
    /// submission), and the date in the object keys.
    pub received_at: i64,
    /// The file URLs found in the event, in order; `huggy_bridge_files` lists them in the same order.
    pub urls: Vec<String>,
    /// Where the result goes.
    pub completion: Completion,
}

#[derive(Debug)]
struct Queued {
    /// When the file's token dies, on the monotonic clock.
    deadline: Instant,
    order: u64,
    job: usize,
    index: usize,
    host: Arc<str>,
}

impl PartialEq for Queued {
    fn eq(&self, o: &Self) -> bool {
        (self.deadline, self.order) == (o.deadline, o.order)
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Queued {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.deadline, self.order).cmp(&(o.deadline, o.order))
    }
}

struct JobState {
    job: FileJob,
    results: Vec<Option<FileResult>>,
    remaining: usize,
    /// Kafka ack mode: when the request stops waiting.
    give_up: Option<Instant>,
    /// Cancelled at `give_up`: running downloads of the job end with `ack_timeout`.
    cancel: CancellationToken,
}

/// A running download, as the planner sees it.
struct Progress {
    host: Arc<str>,
    /// Content-Length once known (0 before).
    expected: AtomicU64,
    received: AtomicU64,
}

/// The queue (earliest deadline first), the jobs it serves and what is known about each host.
#[derive(Default)]
struct Sched {
    heap: BinaryHeap<Reverse<Queued>>,
    jobs: HashMap<usize, JobState>,
    next_job: usize,
    next_order: u64,
    hosts: HashMap<Arc<str>, HostEstimate>,
    running: HashMap<u64, Arc<Progress>>,
    next_running: u64,
}

impl Sched {
    fn estimate(&self, host: &str) -> HostEstimate {
        self.hosts.get(host).copied().unwrap_or(HostEstimate::UNKNOWN)
    }
}

/// Why file capture could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// `files.store` is malformed, or its directory or bucket client cannot be made.
    #[error("cannot open the file store")]
    Store(#[source] StoreError),
    /// The download client cannot be built (TLS roots, resolver).
    #[error("cannot build the download client")]
    Client(#[source] reqwest::Error),
}

/// The wall clock, in unix seconds (injectable, so that tests can step it).
pub type WallClock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// Memory of one running download besides its share of the buffer budget: hyper's read buffer
/// (it grows to about 400 KiB on a fast stream), TLS records, the chunk between reader and writer.
/// Measured: a few hundred KiB per download with the file host in the same process.
pub const CONNECTION_BYTES: u64 = 512 * 1024;

/// A `file://` store's free space is looked at again each time a download has written this much.
const FREE_CHECK_BYTES: u64 = 1024 * 1024;

/// Interval at which the limit is revised and hopeless files are given up.
const TICK: Duration = Duration::from_millis(250);
/// Longest wait for a store to discard a partial upload.
const ABORT_WITHIN: Duration = Duration::from_secs(5);

/// The capture stage: one queue of files, earliest deadline first, the workers that stream them into
/// the store, and the controller that sets how many run at once.
pub struct FileCapture {
    sched: Mutex<Sched>,
    wake: Notify,
    client: reqwest::Client,
    guard: Arc<Guard>,
    store: FileStore,
    ttl_secs: i64,
    /// Reads the wall clock once per job, to turn the token's age into a monotonic deadline.
    wall: WallClock,
    max_bytes: u64,
    /// The memory budget of all downloads' upload buffers, in bytes (`files.max_buffer_bytes`).
    buffers: Arc<Semaphore>,
    buffer_budget: usize,
    /// Downloads whose response has arrived, waiting for their share of the budget.
    buffer_waiters: AtomicUsize,
    /// Free space a download leaves on a `file://` store's filesystem (`files.min_free_bytes`).
    min_free: u64,
    idle_timeout: Duration,
    floor: usize,
    max_concurrency: usize,
    metrics: Arc<Metrics>,
    results: mpsc::Sender<FileDone>,
    /// Downloads running.
    active: AtomicUsize,
    /// Downloads allowed at once (set by the controller).
    limit: AtomicUsize,
    /// Highest limit so far.
    peak: AtomicUsize,
    /// Body bytes received by all downloads, for the aggregate rate.
    received: AtomicU64,
    tasks: TaskTracker,
}

impl FileCapture {
    /// Spool-mode results are sent on `results` (awaiting room: it is bounded).
    ///
    /// # Errors
    /// The store or the HTTP client cannot be set up.
    pub fn new(
        cfg: &FilesConfig,
        metrics: Arc<Metrics>,
        results: mpsc::Sender<FileDone>,
    ) -> Result<Arc<FileCapture>, SetupError> {
        Self::with_wall_clock(cfg, metrics, results, Arc::new(now_secs))
    }

    /// [`FileCapture::new`] reading the wall clock from `wall` (unix seconds): only to turn a job's
    /// `received_at` into the token's remaining lifetime, once, when the job is submitted.
    ///
    /// # Errors
    /// The store or the HTTP client cannot be set up.
    pub fn with_wall_clock(
        cfg: &FilesConfig,
        metrics: Arc<Metrics>,
        results: mpsc::Sender<FileDone>,
        wall: WallClock,
    ) -> Result<Arc<FileCapture>, SetupError> {
        let guard = Arc::new(Guard::new(&cfg.allowed_url_prefixes));
        let floor = cfg.concurrency.max(1);
        let store = FileStore::from_config(cfg).map_err(SetupError::Store)?;
        if store.free_bytes().is_none() {
            metrics.file_store_free.set(-1);
        }
        metrics.file_concurrency_limit.set(floor as i64);
        // One part at least (checked by the configuration), so that every reservation fits.
        let buffer_budget = usize::try_from(cfg.max_buffer_bytes)
            .unwrap_or(usize::MAX)
            .clamp(store.part_bytes(), Semaphore::MAX_PERMITS);
        Ok(Arc::new(FileCapture {
            sched: Mutex::new(Sched::default()),
            wake: Notify::new(),
            client: fetch::client(guard.clone(), Duration::from_millis(cfg.connect_timeout_ms))
                .map_err(SetupError::Client)?,
            guard,
            store,
            ttl_secs: i64::try_from(cfg.token_ttl_secs).unwrap_or(600),
            wall,
            max_bytes: cfg.max_file_bytes,
            buffers: Arc::new(Semaphore::new(buffer_budget)),
            buffer_budget,
            buffer_waiters: AtomicUsize::new(0),
            min_free: cfg.min_free_bytes.unwrap_or(0),
            idle_timeout: Duration::from_millis(cfg.idle_timeout_ms),
            floor,
            max_concurrency: cfg.max_concurrency.max(floor),
            metrics,
            results,
            active: AtomicUsize::new(0),
            limit: AtomicUsize::new(floor),
            peak: AtomicUsize::new(floor),
            received: AtomicU64::new(0),
            tasks: TaskTracker::new(),
        }))
    }

    /// File URLs in an event's bytes.
    pub(crate) fn detect(&self, value: &[u8]) -> Vec<String> {
        detect::file_urls(value, self.guard.prefixes())
    }

    /// The highest download concurrency so far.
    pub fn peak_concurrency(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Sched> {
        self.sched.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues an event's files, earliest deadline first.
    pub fn submit(&self, job: FileJob) {
        self.enqueue(job, None);
    }

    /// Queues an event's files for a request that waits at most `budget` (Kafka ack mode): files
    /// not stored by then are reported `failed` with `error: "ack_timeout"`, and the reply is sent.
    pub(crate) fn submit_within(&self, job: FileJob, budget: Duration) {
        self.enqueue(job, Some(Instant::now() + budget));
    }

    fn enqueue(&self, job: FileJob, give_up: Option<Instant>) {
        // The token's age is Huggy's time (the wall clock), read once; from here on the remaining
        // lifetime is counted down on the monotonic clock, which no clock step moves.
        let left = job.received_at.saturating_add(self.ttl_secs).saturating_sub((self.wall)());
        let deadline = deadline_in(Instant::now(), left);
        let n = job.urls.len();
        let mut q = self.lock();
        let id = q.next_job;
        q.next_job += 1;
        for (index, url) in job.urls.iter().enumerate() {
            let order = q.next_order;
            q.next_order += 1;
            let host: Arc<str> = host_key(url).into();
            q.heap.push(Reverse(Queued { deadline, order, job: id, index, host }));
        }
        let cancel = CancellationToken::new();
        q.jobs.insert(id, JobState { job, results: vec![None; n], remaining: n, give_up, cancel });
        self.metrics.file_queue.add(n as i64);
        drop(q);
        self.wake.notify_one();
    }

    /// Starts the scheduler: it runs downloads, between `files.concurrency` and
    /// `files.max_concurrency` at once, until `stop`; downloads cut off by `stop` are aborted in the
    /// store and not reported (their events keep waiting for a capture). [`FileCapture::stopped`]
    /// waits for that.
    pub fn spawn_workers(self: &Arc<Self>, stop: CancellationToken) {
        self.spawn_supervised(stop, &crate::supervise::Supervisor::new(self.metrics.clone(), None));
    }

    /// [`FileCapture::spawn_workers`] under `supervisor`: a dispatcher that panics is restarted
    /// (the queue lives in `self`, so the fresh one carries on with it).
    pub(crate) fn spawn_supervised(
        self: &Arc<Self>,
        stop: CancellationToken,
        supervisor: &crate::supervise::Supervisor,
    ) {
        let (me, sup) = (self.clone(), supervisor.clone());
        self.tasks.spawn(async move {
            let run_stop = stop.clone();
            sup.supervise(crate::metrics::Stage::FileDispatch, stop, move || me.clone().dispatch(run_stop.clone()))
                .await;
        });
    }

    /// After `stop`: waits until every download has given its partial upload back to the store.
    pub async fn stopped(&self) {
        self.tasks.close();
        self.tasks.wait().await;
    }

    async fn dispatch(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut governor = Governor::new(self.floor, self.max_concurrency);
        loop {
            self.launch(&stop).await;
            tokio::select! {
                biased;
                () = stop.cancelled() => break,
                () = self.wake.notified() => {}
                _ = tick.tick() => self.govern(&mut governor).await,
            }
        }
    }

    /// Starts queued downloads while the limit allows; reports those that can no longer run.
    async fn launch(self: &Arc<Self>, stop: &CancellationToken) {
        // No download starts while the buffer budget is spent or others wait for a share: it
        // could only hold a connection open, waiting too. (More in the loop.)
        while self.active.load(Ordering::Acquire) < self.limit.load(Ordering::Acquire)
            && self.buffers.available_permits() > 0
            && self.buffer_waiters.load(Ordering::Acquire) == 0
        {
            let next = {
                let mut q = self.lock();
                // Not more downloads than the budget gives a share each, by the host's typical
                // file: connections waiting for a share would cost memory of their own.
                let Some(Reverse(top)) = q.heap.peek() else { return };
                let share = (q.estimate(&top.host).size_bytes() as usize).clamp(1, self.store.part_bytes());
                if self.active.load(Ordering::Acquire) >= (self.buffer_budget / share).max(1) {
                    return;
                }
                let Some(Reverse(item)) = q.heap.pop() else { return };
                let st = &q.jobs[&item.job];
                let url = st.job.urls[item.index].clone();
                let info = (st.job.event_id, st.job.company.clone(), st.job.received_at);
                let cancel = st.cancel.clone();
                let progress = Arc::new(Progress {
                    host: item.host.clone(),
                    expected: AtomicU64::new(0),
                    received: AtomicU64::new(0),
                });
                let slot = if cancel.is_cancelled() || Instant::now() >= item.deadline {
                    None
                } else {
                    let slot = q.next_running;
                    q.next_running += 1;
                    q.running.insert(slot, progress.clone());
                    Some(slot)
                };
                (item, url, info, cancel, progress, slot)
            };
            let (item, url, info, cancel, progress, slot) = next;
            let Some(slot) = slot else {
                let f = if cancel.is_cancelled() { Failure::AckTimeout } else { Failure::Expired };
                warn!(event_id = %info.0, error = %f, "file not captured");
                self.finish(item.job, item.index, FileResult::failed(&url, f.report()), f.metric()).await;
                continue;
            };
            let n = self.active.fetch_add(1, Ordering::AcqRel) + 1;
            self.metrics.file_concurrency.set(n as i64);
            let me = self.clone();
            let stop = stop.clone();
            self.tasks.spawn(async move {
                let outcome = me.capture(&url, &item, info, &cancel, &stop, &progress).await;
                me.lock().running.remove(&slot);
                let n = me.active.fetch_sub(1, Ordering::AcqRel) - 1;
                me.metrics.file_concurrency.set(n as i64);
                if let Some((result, label)) = outcome {
                    me.finish(item.job, item.index, result, label).await;
                }
                me.wake.notify_one();
            });
        }
    }

    /// One tick: measure, plan, set the limit, give up what cannot make it, end timed-out jobs.
    async fn govern(&self, g: &mut Governor) {
        let now = Instant::now();
        let rate = g.rate(now, self.received.load(Ordering::Relaxed));
        let (pending, order, inflight_secs, timed_out) = {
            let q = self.lock();
            let mut items: Vec<&Queued> = q.heap.iter().map(|Reverse(i)| i).collect();
            items.sort_unstable();
            let pending: Vec<Pending> = items
                .iter()
                .map(|i| {
                    let e = q.estimate(&i.host);
                    Pending {
                        deadline: secs_until(i.deadline, now),
                        service_secs: e.service_secs(),
                        trusted: e.trusted(),
                    }
                })
                .collect();
            let order: Vec<u64> = items.iter().map(|i| i.order).collect();
            let inflight_secs: f64 = q
                .running
                .values()
                .map(|p| {
                    let e = q.estimate(&p.host);
                    let expected = p.expected.load(Ordering::Relaxed);
                    let got = p.received.load(Ordering::Relaxed);
                    if expected > 0 {
                        expected.saturating_sub(got) as f64 / e.rate_bps.max(1.0)
                    } else {
                        e.service_secs()
                    }
                })
                .sum();
            let timed_out: Vec<usize> =
                q.jobs.iter().filter(|(_, st)| st.give_up.is_some_and(|t| now >= t)).map(|(id, _)| *id).collect();
            (pending, order, inflight_secs, timed_out)
        };
        let limit = g.controller.limit();
        // Deadlines are seconds from `now` (0.0), on the monotonic clock.
        let plan = schedule::plan(0.0, &pending, inflight_secs, limit, g.controller.can_grow(now));
        // Exactly the limit: after a shrink, the downloads above the new limit still running would
        // make the rate look like the new limit's own.
        let busy = self.active.load(Ordering::Acquire) == limit;
        let new_limit = g.controller.update(now, plan.required, busy, rate);
        self.limit.store(new_limit, Ordering::Release);
        self.peak.fetch_max(new_limit, Ordering::Relaxed);
        self.metrics.file_concurrency_limit.set(new_limit as i64);
        self.metrics.files_at_risk.set(plan.at_risk as i64);
        self.metrics.file_saturated.set(i64::from(g.controller.saturated(now)));
        if new_limit != limit {
            info!(
                from = limit,
                to = new_limit,
                required = plan.required,
                at_risk = plan.at_risk,
                rate_bps = rate as u64,
                saturated = g.controller.saturated(now),
                "file download concurrency changed"
            );
            self.wake.notify_one();
        }
        self.note_buffer_use();
        g.ticks += 1;
        if g.ticks % 20 == 1 {
            if let Some(free) = self.store.free_bytes() {
                match free {
                    Ok(b) => self.metrics.file_store_free.set(i64::try_from(b).unwrap_or(i64::MAX)),
                    Err(e) => warn!(error = %e, "cannot read the file store's free space"),
                }
            }
        }
        // Files that cannot make it, and jobs whose request stopped waiting, leave the queue now.
        let doomed: HashSet<u64> = plan.doomed.iter().map(|&i| order[i]).collect();
        let mut ended: Vec<(usize, usize, Failure)> = Vec::new();
        if !doomed.is_empty() || !timed_out.is_empty() {
            let mut q = self.lock();
            for id in &timed_out {
                if let Some(st) = q.jobs.get_mut(id) {
                    st.cancel.cancel();
                    st.give_up = None;
                }
            }
            let heap = std::mem::take(&mut q.heap);
            for Reverse(item) in heap {
                if timed_out.contains(&item.job) {
                    ended.push((item.job, item.index, Failure::AckTimeout));
                } else if doomed.contains(&item.order) {
                    ended.push((item.job, item.index, Failure::Expired));
                } else {
                    q.heap.push(Reverse(item));
                }
            }
        }
        for (job, index, f) in ended {
            let url = self.lock().jobs.get(&job).map(|st| st.job.urls[index].clone()).unwrap_or_default();
            warn!(error = %f, url = without_query(&url), "file given up before its download");
            self.finish(job, index, FileResult::failed(&url, f.report()), f.metric()).await;
        }
    }

    /// Records a file's final result (counted once, under `label`); when it was the event's last,
    /// hands the `huggy_bridge_files` array to whoever waits for it.
    async fn finish(&self, job: usize, index: usize, result: FileResult, outcome: FileOutcome) {
        self.metrics.count_file(outcome);
        self.metrics.file_queue.dec();
        let done = {
            let mut q = self.lock();
            let Some(st) = q.jobs.get_mut(&job) else { return };
            st.results[index] = Some(result);
            st.remaining -= 1;
            if st.remaining == 0 {
                q.jobs.remove(&job)
            } else {
                None
            }
        };
        let Some(st) = done else { return };
        let results: Vec<FileResult> = st.results.into_iter().flatten().collect();
        let member = results_json(&results);
        match st.job.completion {
            Completion::Spool(seq) => {
                if self.results.send(FileDone { seq, member }).await.is_err() {
                    warn!(seq, "file results with no spool to record them");
                }
            }
            Completion::Reply(tx) => {
                let _ = tx.send(member);
            }
        }
    }

    /// Reserves a download's share of the buffer budget before its body is read: its size, at most
    /// one store part (what its writer can hold). Waits while the budget is spent, until the
    /// deadline at most.
    async fn reserve_buffer(
        &self,
        expected: Option<u64>,
        deadline: Instant,
        cancel: &CancellationToken,
        stop: &CancellationToken,
    ) -> Result<OwnedSemaphorePermit, Failure> {
        let part = self.store.part_bytes();
        let need = expected.map_or(part, |len| usize::try_from(len).unwrap_or(usize::MAX).min(part));
        let need = u32::try_from(need.clamp(1, self.buffer_budget)).unwrap_or(u32::MAX);
        let waiting = WaitCount::enter(&self.buffer_waiters);
        let permit = tokio::select! {
            p = self.buffers.clone().acquire_many_owned(need) => match p {
                Ok(p) => p,
                // The semaphore is never closed.
                Err(_) => return Err(Failure::Shutdown),
            },
            () = tokio::time::sleep_until(tokio::time::Instant::from_std(deadline)) => return Err(Failure::Expired),
            () = cancel.cancelled() => return Err(Failure::AckTimeout),
            () = stop.cancelled() => return Err(Failure::Shutdown),
        };
        drop(waiting);
        self.note_buffer_use();
        Ok(permit)
    }

    fn note_buffer_use(&self) {
        let used = self.buffer_budget.saturating_sub(self.buffers.available_permits());
        self.metrics.file_buffer.set(i64::try_from(used).unwrap_or(i64::MAX));
    }

    /// Whether `incoming` more bytes leave a `file://` store's filesystem at least
    /// `files.min_free_bytes` free (object stores have no such floor).
    fn check_free_space(&self, incoming: u64) -> Result<(), Failure> {
        if self.min_free == 0 {
            return Ok(());
        }
        match self.store.free_bytes() {
            Some(Ok(free)) if free.saturating_sub(incoming) < self.min_free => {
                Err(Failure::StoreFloor { free, floor: self.min_free })
            }
            // An unreadable free space is warned about by the scheduler's tick; it does not stop
            // captures on its own (the write itself fails if the disk is really full).
            _ => Ok(()),
        }
    }

    /// Downloads one file, retrying while the deadline allows. `None` when cut off by shutdown.
    async fn capture(
        &self,
        url: &str,
        item: &Queued,
        (event_id, company, received_at): (EventId, Option<String>, i64),
        cancel: &CancellationToken,
        stop: &CancellationToken,
        progress: &Progress,
    ) -> Option<(FileResult, FileOutcome)> {
        let deadline = item.deadline;
        let mut backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(250))
            .with_max_delay(Duration::from_secs(20))
            .with_jitter()
            .without_max_times()
            .build();
        let ids = Ids { event_id, company: company.as_deref(), received_at, index: item.index };
        let result = loop {
            if Instant::now() >= deadline {
                break Err(Failure::Expired);
            }
            match self.attempt(url, deadline, &ids, cancel, stop, progress).await {
                Ok(r) => break Ok(r),
                Err(f) if f.retryable() => {
                    let delay = backoff.next().unwrap_or(Duration::from_secs(20));
                    if delay >= deadline.saturating_duration_since(Instant::now()) {
                        break Err(f);
                    }
                    self.metrics.file_retries.inc();
                    warn!(%event_id, error = %f.report(), delay_ms = delay.as_millis() as u64, "file download failed; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = cancel.cancelled() => break Err(Failure::AckTimeout),
                        () = stop.cancelled() => break Err(Failure::Shutdown),
                    }
                }
                Err(f) => break Err(f),
            }
        };
        match result {
            Ok((r, timing)) => {
                let headroom = deadline.saturating_duration_since(Instant::now()).as_secs();
                self.metrics.file_headroom.observe(headroom as f64);
                if let Some(size) = r.size {
                    self.metrics.file_bytes.inc_by(size);
                    self.lock().hosts.entry(item.host.clone()).or_insert(HostEstimate::UNKNOWN).observe(
                        timing.ttfb.as_secs_f64(),
                        size,
                        timing.body.as_secs_f64(),
                    );
                }
                info!(%event_id, size = r.size, headroom_secs = headroom, "file stored");
                Some((r, FileOutcome::Stored))
            }
            Err(Failure::Shutdown) => None,
            Err(f) => {
                warn!(%event_id, error = %f.report(), "file not captured");
                Some((FileResult::failed(url, f.report()), f.metric()))
            }
        }
    }

    async fn attempt(
        &self,
        raw_url: &str,
        deadline: Instant,
        ids: &Ids<'_>,
        cancel: &CancellationToken,
        stop: &CancellationToken,
        progress: &Progress,
    ) -> Result<(FileResult, Timing), Failure> {
        let url = url::Url::parse(raw_url).map_err(Failure::InvalidUrl)?;
        self.guard.check(&url)?;
        let started = Instant::now();
        let left = deadline.saturating_duration_since(started);
        let head_timeout = left.min(self.idle_timeout);
        let resp = tokio::select! {
            r = tokio::time::timeout(head_timeout, self.client.get(url.clone()).send()) => r
                .map_err(|_| Failure::NoResponse(head_timeout))?
                .map_err(classify_transport)?,
            () = cancel.cancelled() => return Err(Failure::AckTimeout),
            () = stop.cancelled() => return Err(Failure::Shutdown),
        };
        let ttfb = started.elapsed();
        let status = resp.status().as_u16();
        if matches!(status, 401 | 403 | 410) {
            return Err(Failure::Rejected(status));
        }
        if !resp.status().is_success() {
            return Err(Failure::Status(status));
        }
        let expected = resp.content_length();
        if let Some(len) = expected {
            if len > self.max_bytes {
                return Err(Failure::TooLarge(len));
            }
        }
        self.check_free_space(expected.unwrap_or(0))?;
        let _buffer = self.reserve_buffer(expected, deadline, cancel, stop).await?;
        progress.expected.store(expected.unwrap_or(0), Ordering::Relaxed);
        progress.received.store(0, Ordering::Relaxed);
        let content_type =
            resp.headers().get(reqwest::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let final_url = resp.url().clone();
        let name = resp
            .headers()
            .get(reqwest::header::CONTENT_DISPOSITION)
            .and_then(|v| {
                v.to_str().ok().map(str::to_owned).or_else(|| Some(String::from_utf8_lossy(v.as_bytes()).into_owned()))
            })
            .and_then(|v| disposition::filename_from_disposition(&v))
            .or_else(|| disposition::filename_from_url(&url))
            .or_else(|| disposition::filename_from_url(&final_url))
            .unwrap_or_else(|| "file".into());
        let safe = disposition::sanitize(&name);
        let rel = object_key(ids.company, ids.received_at, ids.event_id, ids.index, &safe);
        let (mut writer, location) = self.store.writer(&rel).await.map_err(Failure::Store)?;
        let mut body = resp.bytes_stream();
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        let body_started = Instant::now();
        let streamed: Result<(), Failure> = async {
            loop {
                let next = tokio::select! {
                    biased;
                    () = stop.cancelled() => return Err(Failure::Shutdown),
                    () = cancel.cancelled() => return Err(Failure::AckTimeout),
                    n = tokio::time::timeout(self.idle_timeout, body.next()) => n.map_err(|_| Failure::Stalled(self.idle_timeout))?,
                };
                let Some(chunk) = next else { break };
                let chunk = chunk.map_err(classify_transport)?;
                size += chunk.len() as u64;
                self.received.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                progress.received.store(size, Ordering::Relaxed);
                if size > self.max_bytes {
                    return Err(Failure::TooLarge(size));
                }
                let now = Instant::now();
                if now > deadline
                    || cannot_finish(expected, size, body_started.elapsed(), deadline.saturating_duration_since(now))
                {
                    return Err(Failure::Expired);
                }
                // Every part's worth of bytes, the store's free space is looked at again.
                if size / FREE_CHECK_BYTES != (size - chunk.len() as u64) / FREE_CHECK_BYTES {
                    self.check_free_space(FREE_CHECK_BYTES)?;
                }
                hasher.update(&chunk);
                writer.write(&chunk).await.map_err(Failure::Store)?;
            }
            Ok(())
        }
        .await;
        if let Err(f) = streamed {
            if tokio::time::timeout(ABORT_WITHIN, writer.abort()).await.is_err() {
                warn!(%location, "the store did not discard a partial upload in time");
            }
            return Err(f);
        }
        let body_time = body_started.elapsed();
        writer.finish().await.map_err(Failure::Store)?;
        let result = FileResult {
            url: without_query(raw_url).to_owned(),
            status: "stored",
            location: Some(location),
            sha256: Some(hex::encode(hasher.finalize())),
            size: Some(size),
            content_type,
            filename: Some(name),
            error: None,
        };
        Ok((result, Timing { ttfb, body: body_time }))
    }
}

/// Counts a waiter for as long as it lives, however its wait ends.
struct WaitCount<'a>(&'a AtomicUsize);

impl<'a> WaitCount<'a> {
    fn enter(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        WaitCount(count)
    }
}

impl Drop for WaitCount<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What names a file in the store.
struct Ids<'a> {
    event_id: EventId,
    company: Option<&'a str>,
    received_at: i64,
    index: usize,
}

/// How one successful download went.
struct Timing {
    ttfb: Duration,
    body: Duration,
}

/// Whether a transfer, at the pace it has kept for at least a second, would need more than `left`
/// even if it went 40 % faster from now on: then it is given up rather than kept taking bandwidth.
fn cannot_finish(expected: Option<u64>, received: u64, elapsed: Duration, left: Duration) -> bool {
    let Some(total) = expected else { return false };
    if elapsed < Duration::from_secs(1) || received == 0 {
        return false;
    }
    let rate = received as f64 / elapsed.as_secs_f64();
    let needed = total.saturating_sub(received) as f64 / (rate * 1.4);
    needed > left.as_secs_f64()
}

/// The instant `left_secs` from `now` (negative: already past, clamped to `now`).
fn deadline_in(now: Instant, left_secs: i64) -> Instant {
    let left = Duration::from_secs(left_secs.unsigned_abs());
    if left_secs >= 0 {
        now + left
    } else {
        now.checked_sub(left).unwrap_or(now)
    }
}

/// Seconds from `now` to `deadline`, negative once it has passed.
fn secs_until(deadline: Instant, now: Instant) -> f64 {
    if deadline >= now {
        deadline.duration_since(now).as_secs_f64()
    } else {
        -now.duration_since(deadline).as_secs_f64()
    }
}

/// `host:port` of a URL, the unit whose throughput is measured.
fn host_key(url: &str) -> String {
    url::Url::parse(url)
        .ok()
        .and_then(|u| Some(format!("{}:{}", u.host_str()?, u.port_or_known_default().unwrap_or(0))))
        .unwrap_or_default()
}

/// The controller and the aggregate-rate meter, owned by the dispatcher.
struct Governor {
    controller: Controller,
    samples: VecDeque<(Instant, u64)>,
    ticks: u64,
}

impl Governor {
    fn new(floor: usize, max: usize) -> Self {
        Governor { controller: Controller::new(floor, max), samples: VecDeque::new(), ticks: 0 }
    }

    /// Bytes per second over about the last [`schedule::MEASURE`].
    fn rate(&mut self, now: Instant, total: u64) -> f64 {
        self.samples.push_back((now, total));
        while self.samples.len() > 2 && now.duration_since(self.samples[1].0) >= schedule::MEASURE {
            self.samples.pop_front();
        }
        let (t0, b0) = self.samples[0];
        let dt = now.duration_since(t0).as_secs_f64();
        if dt <= 0.0 {
            0.0
        } else {
            total.saturating_sub(b0) as f64 / dt
        }
    }
}

/// `<company>/<yyyy>/<mm>/<dd>/<event id>/<index>/<file name>`: the file's position among the
/// event's files is a key segment of its own, so two files of one event never share an object
/// whatever their names, and the name is kept as the file host gave it (sanitized).
fn object_key(company: Option<&str>, received_at: i64, event_id: EventId, index: usize, name: &str) -> String {
    let date = humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + Duration::from_secs(received_at.max(0).unsigned_abs()),
    )
    .to_string();
    let (y, m, d) = (&date[0..4], &date[5..7], &date[8..10]);
    let company = disposition::sanitize(company.unwrap_or("unknown"));
    format!("{company}/{y}/{m}/{d}/{event_id}/{index}/{name}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(base: Instant, deadline: i64, order: u64) -> Reverse<Queued> {
        let deadline = deadline_in(base, deadline);
        Reverse(Queued { deadline, order, job: 0, index: 0, host: Arc::from("h:80") })
    }

    #[test]
    fn the_queue_serves_earliest_deadline_first_then_arrival() {
        let base = Instant::now();
        let mut heap = BinaryHeap::new();
        for (d, o) in [(30, 0), (10, 1), (20, 2), (10, 3), (5, 4), (30, 5)] {
            heap.push(item(base, d, o));
        }
        let popped: Vec<(i64, u64)> = std::iter::from_fn(|| heap.pop())
            .map(|Reverse(q)| (q.deadline.duration_since(base).as_secs() as i64, q.order))
            .collect();
        assert_eq!(popped, vec![(5, 4), (10, 1), (10, 3), (20, 2), (30, 0), (30, 5)]);
    }

    #[test]
    fn each_failure_has_one_final_result_and_a_readable_report() {
        assert_eq!(Failure::Expired.metric(), FileOutcome::Expired);
        assert_eq!(Failure::Expired.report(), "expired");
        assert_eq!(Failure::AckTimeout.metric(), FileOutcome::AckTimeout);
        assert_eq!(Failure::AckTimeout.report(), "ack_timeout");
        assert_eq!(Failure::Rejected(403).metric(), FileOutcome::Expired);
        assert_eq!(Failure::TooLarge(9).metric(), FileOutcome::TooLarge);
        assert_eq!(Failure::Status(502).metric(), FileOutcome::Failed);
        let redirect = Failure::Redirect(RedirectRefused(Refusal::Internal("169.254.169.254".parse().unwrap())));
        assert_eq!(redirect.metric(), FileOutcome::Refused);
        assert_eq!(redirect.report(), "refused: redirect refused: url points at an internal address (169.254.169.254)");
        assert_eq!(Failure::from(Refusal::NotAllowed).report(), "refused: url is outside files.allowed_url_prefixes");
        assert!(Failure::Status(503).retryable() && Failure::Stalled(Duration::from_secs(1)).retryable());
        assert!(!Failure::Expired.retryable() && !Failure::AckTimeout.retryable() && !Failure::Status(404).retryable());
    }

    #[test]
    fn two_files_of_one_event_never_share_an_object_whatever_their_names() {
        let id = EventId([7; 16]);
        let keys: Vec<String> = [(0, "1-x.pdf"), (1, "x.pdf"), (2, "x.pdf"), (10, "x.pdf"), (1, "0-x.pdf")]
            .iter()
            .map(|&(i, n)| object_key(Some("15693"), 1_763_700_000, id, i, n))
            .collect();
        let distinct: HashSet<&String> = keys.iter().collect();
        assert_eq!(distinct.len(), keys.len(), "{keys:?}");
        assert_eq!(keys[1], format!("15693/2025/11/21/{id}/1/x.pdf"));
        assert_ne!(keys[0], keys[1], "file 0 named 1-x.pdf and file 1 named x.pdf");
        assert_eq!(object_key(None, 0, id, 0, "a"), format!("unknown/1970/01/01/{id}/0/a"));
    }

    #[test]
    fn a_file_url_is_reported_without_its_query() {
        assert_eq!(without_query("https://files.huggy.app/a.pdf?token=s3cr3t&x=1"), "https://files.huggy.app/a.pdf");
        assert_eq!(without_query("https://files.huggy.app/a.pdf#token=s3cr3t"), "https://files.huggy.app/a.pdf");
        assert_eq!(without_query("https://files.huggy.app/a.pdf"), "https://files.huggy.app/a.pdf");
        let r = FileResult::failed("https://h/x?token=s3cr3t", "expired".into());
        assert!(!String::from_utf8(results_json(&[r])).unwrap().contains("s3cr3t"));
    }

    #[test]
    fn a_transfer_is_given_up_only_when_its_own_pace_cannot_make_it() {
        let deadline = Duration::from_secs(10);
        let second = Duration::from_secs(1);
        // 1 MB/s so far, 5 MB left, 10 s left: fine.
        assert!(!cannot_finish(Some(6_000_000), 1_000_000, second, deadline));
        // 100 kB/s so far, 5 MB left: 35 s even 40 % faster.
        assert!(cannot_finish(Some(5_100_000), 100_000, second, deadline));
        // Unknown length, or too early to judge.
        assert!(!cannot_finish(None, 100_000, second, deadline));
        assert!(!cannot_finish(Some(5_100_000), 10_000, Duration::from_millis(100), deadline));
    }
}
