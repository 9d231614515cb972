//! Supervision of the background stages: a stage that panics is logged with its context, counted
//! (`huggy_bridge_stage_restarts_total{stage}`) and started again from durable state — the stages
//! keep nothing that the spool does not hold, so a fresh run picks up where the spool says (the
//! publisher re-reads every unacknowledged event). Restarts are paced (exponential, reset after a
//! run that lasted), and liveness fails only when a stage keeps failing: [`FAILING_RESTARTS`]
//! restarts within [`FAILING_WINDOW`], the latest less than a minute ago.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::metrics::{Metrics, Stage};

/// Restarts within [`FAILING_WINDOW`] after which a stage counts as failing (liveness).
pub(crate) const FAILING_RESTARTS: usize = 5;
/// See [`FAILING_RESTARTS`].
pub(crate) const FAILING_WINDOW: Duration = Duration::from_secs(300);
const FIRST_DELAY: Duration = Duration::from_millis(100);
const MAX_DELAY: Duration = Duration::from_secs(30);
/// A run that lasted this long was healthy: the next restart waits [`FIRST_DELAY`] again.
const HEALTHY_RUN: Duration = Duration::from_secs(60);

/// Recent restarts of every stage, for liveness.
#[derive(Debug, Default)]
pub(crate) struct Stages {
    restarts: Mutex<Vec<(Stage, VecDeque<Instant>)>>,
}

impl Stages {
    fn record(&self, stage: Stage, at: Instant) {
        let mut all = self.restarts.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let idx = match all.iter().position(|(s, _)| *s == stage) {
            Some(i) => i,
            None => {
                all.push((stage, VecDeque::new()));
                all.len() - 1
            }
        };
        let recent = &mut all[idx].1;
        recent.push_back(at);
        while recent.front().is_some_and(|t| at.duration_since(*t) > FAILING_WINDOW) {
            recent.pop_front();
        }
    }

    /// Why a stage counts as failing: it was restarted [`FAILING_RESTARTS`] times or more within
    /// [`FAILING_WINDOW`], and its latest run has not yet lasted [`HEALTHY_RUN`]. Empty when every
    /// stage is healthy.
    pub(crate) fn failing(&self) -> Vec<String> {
        let now = Instant::now();
        let all = self.restarts.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        all.iter()
            .filter_map(|(stage, recent)| {
                let n = recent.iter().filter(|t| now.duration_since(**t) <= FAILING_WINDOW).count();
                // A run that has lasted since the last restart means the stage recovered.
                let recovered = recent.back().is_none_or(|t| now.duration_since(*t) >= HEALTHY_RUN);
                (n >= FAILING_RESTARTS && !recovered).then(|| {
                    format!(
                        "stage {} restarted {n} times within {}s and keeps failing",
                        stage.label(),
                        FAILING_WINDOW.as_secs()
                    )
                })
            })
            .collect()
    }
}

/// Panics to inject into running stages: a test seam reachable only through `app::Overrides`,
/// never from a request.
#[derive(Debug, Default)]
pub struct Faults {
    armed: Mutex<Vec<(Stage, Arc<AtomicU32>)>>,
    hung: Mutex<Vec<Stage>>,
    notify: tokio::sync::Notify,
}

impl Faults {
    /// Makes the running `stage` (`publisher`, `kafka_probe`, `file_feed`, `file_results`,
    /// `file_dispatch`) panic `times` times, once per run, as soon as it is polled; the `janitor`
    /// panics in its next `times` chores.
    ///
    /// # Panics
    /// `stage` names no stage (a mistake in the test).
    pub fn panic_stage(&self, stage: &str, times: u32) {
        let stage = Stage::ALL.iter().copied().find(|s| s.label() == stage).expect("a stage name");
        self.counter(stage).fetch_add(times, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    /// Makes the running `stage` stop making progress for good, without ending or panicking (as a
    /// call that never returns would).
    ///
    /// # Panics
    /// `stage` names no stage (a mistake in the test).
    pub fn hang_stage(&self, stage: &str) {
        let stage = Stage::ALL.iter().copied().find(|s| s.label() == stage).expect("a stage name");
        self.hung.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(stage);
        self.notify.notify_waiters();
    }

    /// Whether a panic is armed for `stage`, taking it: for a stage that runs on a thread of its
    /// own and catches its panics itself (the spool's janitor), which panics when this says so.
    pub(crate) fn take_panic(&self, stage: Stage) -> bool {
        self.counter(stage).fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok()
    }

    fn is_hung(&self, stage: Stage) -> bool {
        self.hung.lock().unwrap_or_else(std::sync::PoisonError::into_inner).contains(&stage)
    }

    fn counter(&self, stage: Stage) -> Arc<AtomicU32> {
        let mut armed = self.armed.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((_, c)) = armed.iter().find(|(s, _)| *s == stage) {
            return c.clone();
        }
        let c = Arc::new(AtomicU32::new(0));
        armed.push((stage, c.clone()));
        c
    }

    /// Panics once a panic is armed for `stage`; once the stage is hung, never resolves and never
    /// lets the stage run again.
    async fn strike(&self, stage: Stage) -> Strike {
        let counter = self.counter(stage);
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let took = counter.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok();
            if took {
                panic!("injected fault: stage {} panics", stage.label());
            }
            if self.is_hung(stage) {
                return Strike::Hang;
            }
            notified.await;
        }
    }
}

enum Strike {
    Hang,
}

/// Runs stages under supervision.
#[derive(Clone)]
pub(crate) struct Supervisor {
    metrics: Arc<Metrics>,
    stages: Arc<Stages>,
    faults: Option<Arc<Faults>>,
}

impl Supervisor {
    pub(crate) fn new(metrics: Arc<Metrics>, faults: Option<Arc<Faults>>) -> Self {
        Supervisor { metrics, stages: Arc::default(), faults }
    }

    /// The restarts liveness looks at.
    pub(crate) fn stages(&self) -> Arc<Stages> {
        self.stages.clone()
    }

    /// Runs `stage` — a fresh `make()` for every run, each on a task of its own (on the runtime this
    /// is polled on) — until a run ends by itself, or `stop` is cancelled. A run that panics is
    /// logged, counted and replaced after a pause; one that returns is done.
    pub(crate) async fn supervise<F, Fut>(&self, stage: Stage, stop: CancellationToken, mut make: F)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let mut delay = FIRST_DELAY;
        loop {
            let started = Instant::now();
            let run = make();
            let faults = self.faults.clone();
            let handle = tokio::spawn(async move {
                match faults {
                    Some(f) => {
                        tokio::pin!(run);
                        tokio::select! {
                            biased;
                            Strike::Hang = f.strike(stage) => std::future::pending::<()>().await,
                            () = &mut run => {}
                        }
                    }
                    None => run.await,
                }
            });
            let why = match handle.await {
                Ok(()) => return,
                Err(e) if e.is_panic() => crate::panics::message(e.into_panic()),
                // Cancelled: only when the runtime shuts down, which ends the stage too.
                Err(_) => return,
            };
            let ran_for = started.elapsed();
            if ran_for >= HEALTHY_RUN {
                delay = FIRST_DELAY;
            }
            self.metrics.stage_restarts.with_label_values(&[stage.label()]).inc();
            self.stages.record(stage, Instant::now());
            if stop.is_cancelled() {
                error!(stage = stage.label(), panic = %why, "stage panicked while stopping; not restarted");
                return;
            }
            error!(
                stage = stage.label(),
                panic = %why,
                ran_ms = ran_for.as_millis() as u64,
                restart_in_ms = delay.as_millis() as u64,
                "stage panicked; restarting it from the spool's durable state"
            );
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = stop.cancelled() => return,
            }
            delay = (delay * 2).min(MAX_DELAY);
            info!(stage = stage.label(), "stage restarted");
        }
    }
}

/// Runs `work` on a thread of its own (a current-thread runtime), so that reading the spool and
/// handing thousands of records to librdkafka never delays the request path's workers.
pub(crate) fn on_own_thread<F>(name: &str, work: F) -> tokio::sync::oneshot::Receiver<()>
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new().name(name.to_owned()).spawn(move || {
        match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt.block_on(work),
            Err(e) => tracing::error!(error = %e, "cannot start the publisher's runtime"),
        }
        let _ = done_tx.send(());
    });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the publisher's thread");
    }
    done_rx
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[tokio::test(start_paused = true)]
    async fn a_panicking_stage_is_restarted_counted_and_reported_failing_only_when_it_keeps_failing() {
        let metrics = Arc::new(Metrics::new());
        let sup = Supervisor::new(metrics.clone(), None);
        let runs = Arc::new(AtomicUsize::new(0));
        let stop = CancellationToken::new();
        let r = runs.clone();
        // Panics in its first three runs, then runs until stopped.
        let task = tokio::spawn({
            let (sup, stop) = (sup.clone(), stop.clone());
            async move {
                sup.supervise(Stage::Publisher, stop.clone(), move || {
                    let n = r.fetch_add(1, Ordering::SeqCst);
                    let stop = stop.clone();
                    async move {
                        assert!(n >= 3, "run {n} fails");
                        stop.cancelled().await;
                    }
                })
                .await;
            }
        });
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 4, "three failed runs replaced, the fourth runs");
        assert_eq!(metrics.stage_restarts.with_label_values(&["publisher"]).get(), 3);
        assert!(sup.stages().failing().is_empty(), "three restarts are not a failing stage");
        stop.cancel();
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_stage_that_keeps_panicking_fails_liveness_and_stops_with_its_token() {
        let metrics = Arc::new(Metrics::new());
        let sup = Supervisor::new(metrics.clone(), None);
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let (sup, stop) = (sup.clone(), stop.clone());
            async move { sup.supervise(Stage::KafkaProbe, stop, || async { panic!("always") }).await }
        });
        tokio::time::sleep(Duration::from_secs(10)).await;
        let failing = sup.stages().failing();
        assert_eq!(failing.len(), 1, "{failing:?}");
        assert!(failing[0].contains("kafka_probe"), "{failing:?}");
        stop.cancel();
        task.await.unwrap();
        assert_eq!(sup.stages().failing().len(), 1, "still failing right after");
        // A stage that stopped panicking counts as recovered once its run lasted.
        tokio::time::sleep(HEALTHY_RUN).await;
        assert!(sup.stages().failing().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn an_injected_fault_panics_the_running_stage_once() {
        let metrics = Arc::new(Metrics::new());
        let faults = Arc::new(Faults::default());
        let sup = Supervisor::new(metrics.clone(), Some(faults.clone()));
        let stop = CancellationToken::new();
        let runs = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn({
            let (sup, stop, runs) = (sup.clone(), stop.clone(), runs.clone());
            async move {
                sup.supervise(Stage::FileFeed, stop.clone(), move || {
                    runs.fetch_add(1, Ordering::SeqCst);
                    let stop = stop.clone();
                    async move { stop.cancelled().await }
                })
                .await;
            }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        faults.panic_stage("file_feed", 1);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 2, "restarted once");
        assert_eq!(metrics.stage_restarts.with_label_values(&["file_feed"]).get(), 1);
        stop.cancel();
        task.await.unwrap();
    }
}
