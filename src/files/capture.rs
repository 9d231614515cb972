//! The capture stage's queue and dispatcher: files of every submitted job wait in one queue,
//! earliest deadline first; the dispatcher starts downloads while the concurrency limit and the
//! buffer budget allow, and on each tick re-plans the limit ([`super::schedule`]), gives up files
//! that can no longer make their deadline and ends jobs whose request stopped waiting. A job's
//! result goes to whoever waits for it ([`Completion`]) once its last file is done.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt;
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use super::download::Failure;
use super::fetch::{self, Guard};
use super::schedule::{self, Controller, HostEstimate, Pending};
use super::store::FileStore;
use super::{detect, results_json, without_query, Completion, FileDone, FileJob, FileResult, SetupError, WallClock};
use crate::clock::now_secs;
use crate::config::FilesConfig;
use crate::metrics::{FileOutcome, Metrics};

#[derive(Debug)]
pub(super) struct Queued {
    /// When the file's token dies, on the monotonic clock.
    pub(super) deadline: Instant,
    pub(super) order: u64,
    pub(super) job: usize,
    pub(super) index: usize,
    pub(super) host: Arc<str>,
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
pub(super) struct Progress {
    pub(super) host: Arc<str>,
    /// Content-Length once known (0 before).
    pub(super) expected: AtomicU64,
    pub(super) received: AtomicU64,
}

/// The queue (earliest deadline first), the jobs it serves and what is known about each host.
#[derive(Default)]
pub(super) struct Sched {
    heap: BinaryHeap<Reverse<Queued>>,
    jobs: HashMap<usize, JobState>,
    next_job: usize,
    next_order: u64,
    pub(super) hosts: HashMap<Arc<str>, HostEstimate>,
    running: HashMap<u64, Arc<Progress>>,
    next_running: u64,
}

impl Sched {
    fn estimate(&self, host: &str) -> HostEstimate {
        self.hosts.get(host).copied().unwrap_or(HostEstimate::UNKNOWN)
    }
}

/// Interval at which the limit is revised and hopeless files are given up.
const TICK: Duration = Duration::from_millis(250);

/// The capture stage: one queue of files, earliest deadline first, the workers that stream them into
/// the store, and the controller that sets how many run at once.
pub struct FileCapture {
    pub(super) sched: Mutex<Sched>,
    pub(super) wake: Notify,
    /// Told when an event's job ends (its files are done): room in the queue.
    pub(super) job_done: Notify,
    pub(super) client: reqwest::Client,
    pub(super) guard: Arc<Guard>,
    pub(super) store: FileStore,
    pub(super) ttl_secs: i64,
    /// Reads the wall clock once per job, to turn the token's age into a monotonic deadline.
    pub(super) wall: WallClock,
    pub(super) max_bytes: u64,
    /// The memory budget of all downloads' upload buffers, in bytes (`files.max_buffer_bytes`).
    pub(super) buffers: Arc<Semaphore>,
    pub(super) buffer_budget: usize,
    /// Downloads whose response has arrived, waiting for their share of the budget.
    pub(super) buffer_waiters: AtomicUsize,
    /// Free space a download leaves on a `file://` store's filesystem (`files.min_free_bytes`).
    pub(super) min_free: u64,
    pub(super) idle_timeout: Duration,
    pub(super) floor: usize,
    pub(super) max_concurrency: usize,
    pub(super) metrics: Arc<Metrics>,
    pub(super) results: mpsc::Sender<FileDone>,
    /// Results sent on `results` so far, for the drain to see when all were recorded.
    pub(super) results_sent: AtomicU64,
    /// Downloads running.
    pub(super) active: AtomicUsize,
    /// Downloads allowed at once (set by the controller).
    pub(super) limit: AtomicUsize,
    /// Highest limit so far.
    pub(super) peak: AtomicUsize,
    /// Body bytes received by all downloads, for the aggregate rate.
    pub(super) received: AtomicU64,
    pub(super) tasks: TaskTracker,
    /// Tests: the next download panics.
    #[cfg(test)]
    pub(super) panic_next: std::sync::atomic::AtomicBool,
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
            job_done: Notify::new(),
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
            results_sent: AtomicU64::new(0),
            active: AtomicUsize::new(0),
            limit: AtomicUsize::new(floor),
            peak: AtomicUsize::new(floor),
            received: AtomicU64::new(0),
            tasks: TaskTracker::new(),
            #[cfg(test)]
            panic_next: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    /// File URLs in an event's bytes.
    pub(crate) fn detect(&self, value: &[u8]) -> Vec<String> {
        detect::file_urls(value, self.guard.prefixes())
    }

    /// How many spool-mode results were sent on the results channel so far. Once
    /// [`FileCapture::stopped`] returned no more are: the drain waits until as many were recorded.
    pub(crate) fn results_sent(&self) -> u64 {
        self.results_sent.load(Ordering::Acquire)
    }

    /// The highest download concurrency so far.
    pub fn peak_concurrency(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, Sched> {
        self.sched.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Events' jobs queued or running, and the bytes of their URLs.
    pub(crate) fn queued(&self) -> (usize, usize) {
        let q = self.lock();
        (q.jobs.len(), q.jobs.values().map(|j| j.job.urls.iter().map(String::len).sum::<usize>()).sum())
    }

    /// Waits until fewer than `max_jobs` events' jobs are queued or running and their URLs hold
    /// fewer than `max_bytes`; returns the room left in each.
    pub(crate) async fn room(&self, max_jobs: usize, max_bytes: usize) -> (usize, usize) {
        loop {
            let done = self.job_done.notified();
            tokio::pin!(done);
            done.as_mut().enable();
            let (jobs, bytes) = self.queued();
            if jobs < max_jobs && bytes < max_bytes {
                return (max_jobs - jobs, max_bytes - bytes);
            }
            done.await;
        }
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
                let event_id = info.0;
                let outcome =
                    AssertUnwindSafe(me.capture(&url, &item, info, &cancel, &stop, &progress)).catch_unwind().await;
                me.lock().running.remove(&slot);
                let n = me.active.fetch_sub(1, Ordering::AcqRel) - 1;
                me.metrics.file_concurrency.set(n as i64);
                // A panic ends this file, not the event: it is reported failed like any other
                // failure, and its slot is free. Its upload is dropped unfinished: no object is
                // published under its key.
                let outcome = outcome.unwrap_or_else(|panic| {
                    let why = crate::panics::message(panic);
                    error!(%event_id, url = without_query(&url), panic = %why, "file capture panicked");
                    Some((FileResult::failed(&url, "capture panicked".into()), FileOutcome::Failed))
                });
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
        self.job_done.notify_waiters();
        let results: Vec<FileResult> = st.results.into_iter().flatten().collect();
        let member = results_json(&results);
        match st.job.completion {
            Completion::Spool(seq) => {
                if self.results.send(FileDone { seq, member }).await.is_err() {
                    warn!(seq, "file results with no spool to record them");
                } else {
                    self.results_sent.fetch_add(1, Ordering::AcqRel);
                }
            }
            Completion::Reply(tx) => {
                let _ = tx.send(member);
            }
        }
    }
}

/// The instant `left_secs` from `now` (negative: already past, clamped to `now`).
pub(super) fn deadline_in(now: Instant, left_secs: i64) -> Instant {
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
