//! File capture: Huggy's file URLs carry an access token that dies 10 minutes after the event, so
//! every file an event points to is downloaded as soon as the event is durable, earliest deadline
//! first, streamed into the store, and described in a `bridge_files` member appended to the event
//! before it is published.
//!
//! How many downloads run at once follows the deadlines ([`schedule`]): `files.concurrency` is the
//! floor; when the queue cannot finish before its tokens die, more connections open, up to
//! `files.max_concurrency`, for as long as each step still raises the hosts' throughput. A file that
//! cannot make its deadline is reported `expired` as soon as that is certain, so that it takes no
//! bandwidth from files that can.

pub mod detect;
pub mod disposition;
pub(crate) mod fetch;
pub mod prefix;
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
use tokio::sync::{mpsc, oneshot, Notify};
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

/// One entry of `bridge_files`.
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
            url: url.to_owned(),
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

/// The JSON array that becomes the event's `bridge_files` member.
pub(crate) fn bridge_files_json(results: &[FileResult]) -> Vec<u8> {
    serde_json::to_vec(results).expect("plain data serializes")
}

/// A spool-mode event's files are done: record `member` (its `bridge_files` array) for `seq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileDone {
    /// The event's spool sequence number.
    pub seq: u64,
    /// The JSON array appended to the event as `bridge_files`.
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

    /// What `bridge_files[].error` says: the message and its causes.
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
    Failure::Http(e)
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
    /// When the event was received (unix seconds): with `files.token_ttl_secs`, the files' deadline,
    /// and the date in the object keys.
    pub received_at: i64,
    /// The file URLs found in the event, in order; `bridge_files` lists them in the same order.
    pub urls: Vec<String>,
    /// Where the result goes.
    pub completion: Completion,
}

#[derive(Debug)]
struct Queued {
    deadline: i64,
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
    max_bytes: u64,
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
        let guard = Arc::new(Guard::new(&cfg.allowed_url_prefixes));
        let floor = cfg.concurrency.max(1);
        let store = FileStore::from_config(cfg).map_err(SetupError::Store)?;
        if store.free_bytes().is_none() {
            metrics.file_store_free.set(-1);
        }
        metrics.file_concurrency_limit.set(floor as i64);
        Ok(Arc::new(FileCapture {
            sched: Mutex::new(Sched::default()),
            wake: Notify::new(),
            client: fetch::client(guard.clone(), Duration::from_millis(cfg.connect_timeout_ms))
                .map_err(SetupError::Client)?,
            guard,
            store,
            ttl_secs: i64::try_from(cfg.token_ttl_secs).unwrap_or(600),
            max_bytes: cfg.max_file_bytes,
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
        let deadline = job.received_at + self.ttl_secs;
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
        while self.active.load(Ordering::Acquire) < self.limit.load(Ordering::Acquire) {
            let next = {
                let mut q = self.lock();
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
                let slot = if cancel.is_cancelled() || now_secs() >= item.deadline {
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
        let now_unix = unix_now_f64();
        let (pending, order, inflight_secs, timed_out) = {
            let q = self.lock();
            let mut items: Vec<&Queued> = q.heap.iter().map(|Reverse(i)| i).collect();
            items.sort_unstable();
            let pending: Vec<Pending> = items
                .iter()
                .map(|i| {
                    let e = q.estimate(&i.host);
                    Pending { deadline: i.deadline as f64, service_secs: e.service_secs(), trusted: e.trusted() }
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
        let plan = schedule::plan(now_unix, &pending, inflight_secs, limit, g.controller.can_grow(now));
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
            warn!(error = %f, %url, "file given up before its download");
            self.finish(job, index, FileResult::failed(&url, f.report()), f.metric()).await;
        }
    }

    /// Records a file's final result (counted once, under `label`); when it was the event's last,
    /// hands the `bridge_files` member to whoever waits for it.
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
        let member = bridge_files_json(&results);
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
            if now_secs() >= deadline {
                break Err(Failure::Expired);
            }
            match self.attempt(url, deadline, &ids, cancel, stop, progress).await {
                Ok(r) => break Ok(r),
                Err(f) if f.retryable() => {
                    let delay = backoff.next().unwrap_or(Duration::from_secs(20));
                    let left = deadline - now_secs();
                    if i64::try_from(delay.as_secs()).unwrap_or(i64::MAX) >= left {
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
                let headroom = (deadline - now_secs()).max(0);
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
        deadline: i64,
        ids: &Ids<'_>,
        cancel: &CancellationToken,
        stop: &CancellationToken,
        progress: &Progress,
    ) -> Result<(FileResult, Timing), Failure> {
        let url = url::Url::parse(raw_url).map_err(Failure::InvalidUrl)?;
        self.guard.check(&url)?;
        let started = Instant::now();
        let left = Duration::from_secs(u64::try_from(deadline - now_secs()).unwrap_or(0));
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
                if now_secs() > deadline || cannot_finish(expected, size, body_started.elapsed(), deadline) {
                    return Err(Failure::Expired);
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
            url: raw_url.to_owned(),
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

/// Whether a transfer, at the pace it has kept for at least a second, would end after `deadline`
/// even if it went 40 % faster from now on: then it is given up rather than kept taking bandwidth.
fn cannot_finish(expected: Option<u64>, received: u64, elapsed: Duration, deadline: i64) -> bool {
    let Some(total) = expected else { return false };
    if elapsed < Duration::from_secs(1) || received == 0 {
        return false;
    }
    let rate = received as f64 / elapsed.as_secs_f64();
    let needed = total.saturating_sub(received) as f64 / (rate * 1.4);
    unix_now_f64() + needed > deadline as f64
}

fn unix_now_f64() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
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

/// `<company>/<yyyy>/<mm>/<dd>/<event id>/<file name>`; a second file of the same event gets its
/// index in front of the name so two files never overwrite each other.
fn object_key(company: Option<&str>, received_at: i64, event_id: EventId, index: usize, name: &str) -> String {
    let date = humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + Duration::from_secs(received_at.max(0).unsigned_abs()),
    )
    .to_string();
    let (y, m, d) = (&date[0..4], &date[5..7], &date[8..10]);
    let company = disposition::sanitize(company.unwrap_or("unknown"));
    let name = if index == 0 { name.to_owned() } else { format!("{index}-{name}") };
    format!("{company}/{y}/{m}/{d}/{event_id}/{name}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(deadline: i64, order: u64) -> Reverse<Queued> {
        Reverse(Queued { deadline, order, job: 0, index: 0, host: Arc::from("h:80") })
    }

    #[test]
    fn the_queue_serves_earliest_deadline_first_then_arrival() {
        let mut heap = BinaryHeap::new();
        for (d, o) in [(30, 0), (10, 1), (20, 2), (10, 3), (5, 4), (30, 5)] {
            heap.push(item(d, o));
        }
        let popped: Vec<(i64, u64)> =
            std::iter::from_fn(|| heap.pop()).map(|Reverse(q)| (q.deadline, q.order)).collect();
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
    fn a_transfer_is_given_up_only_when_its_own_pace_cannot_make_it() {
        let now = unix_now_f64();
        let deadline = now as i64 + 10;
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
