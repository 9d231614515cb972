//! The stages behind the webhook, built and started in order, and their drain.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::producer::Producer as _;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use super::Overrides;
use crate::config::{AckMode, Config};
use crate::files::FileCapture;
use crate::health::{Health, KafkaHealth, Pulse};
use crate::metrics::{Metrics, Stage};
use crate::publish::kafka::EmbeddedBroker;
use crate::publish::{self, Publisher};
use crate::spool::{Followers, Spool, SpoolSettings};
use crate::supervise::{on_own_thread, Supervisor};
use crate::systemd::Notifier;

/// How long a spool-mode shutdown waits on Kafka (publisher window, producer flush).
const SPOOL_MODE_KAFKA_GRACE: Duration = Duration::from_secs(5);
/// The least each of the drain's last steps (captures stopping, the spool closing) waits, even
/// when the budget is spent: a healthy one takes milliseconds.
const LAST_STEP_GRACE: Duration = Duration::from_secs(1);

/// How often a long spool recovery extends systemd's start timeout.
const RECOVERY_EXTEND_PERIOD: Duration = Duration::from_secs(10);

/// The stages behind the webhook: producer, spool (in spool mode), file capture, spool publisher,
/// Kafka probe — every task of theirs tracked by `tasks`.
pub(super) struct Pipeline {
    embedded: Option<EmbeddedBroker>,
    pub(super) embedded_bootstrap: Option<String>,
    pub(super) publisher: Arc<Publisher>,
    pub(super) spool: Option<Spool>,
    pub(super) files: Option<Arc<FileCapture>>,
    /// In spool mode: how far the capture results' recorder has got, for the drain.
    file_results: Option<crate::files::Recorded>,
    pub(super) health: Arc<Health>,
    pub(super) tasks: TaskTracker,
    /// The spool publisher's thread, done when it has stopped.
    publisher_done: Option<tokio::sync::oneshot::Receiver<()>>,
    /// Stops the spool publisher: after its window (`soft`), or at once (`hard`).
    publisher_stop: publish::Stops,
    /// Stops the other stages (capture, Kafka probe) once the publisher and the producer are done.
    stages_stop: CancellationToken,
}

impl Pipeline {
    pub(super) async fn start(
        cfg: &Config,
        metrics: Arc<Metrics>,
        overrides: &Overrides,
        notifier: Option<&Notifier>,
    ) -> anyhow::Result<Pipeline> {
        let tasks = TaskTracker::new();
        let kafka_health = Arc::new(KafkaHealth::new());
        let embedded = if cfg.kafka.is_embedded() { Some(EmbeddedBroker::start(cfg)?) } else { None };
        let embedded_bootstrap = embedded.as_ref().map(|e| e.bootstrap.clone());
        let bootstrap = embedded_bootstrap.clone().unwrap_or_else(|| cfg.kafka.brokers.clone());
        let (publisher, limits) =
            Publisher::for_config(cfg, &bootstrap, &metrics, &kafka_health).context("creating the Kafka producer")?;
        tasks.spawn(async move { limits.refresh().await });
        let publisher = Arc::new(match &overrides.poison {
            Some(p) => publisher.poisoned_by(p.clone()),
            None => publisher,
        });
        let supervisor = Supervisor::new(metrics.clone(), overrides.faults.clone());
        let (spool, followers) = match cfg.delivery.ack {
            AckMode::Spool => {
                // A large spool may take longer to recover than systemd's start timeout.
                let _extending = notifier.map(|n| n.extend_timeout_while(RECOVERY_EXTEND_PERIOD, "spool recovery"));
                let (spool, followers) = open_spool(cfg, &metrics, overrides)?;
                (Some(spool), Some(followers))
            }
            AckMode::Kafka => (None, None),
        };
        let stages_stop = CancellationToken::new();
        let capture_feed = followers.as_ref().map(|f| f.capture.clone());
        let crate::files::Started { capture: files, recorded: file_results } =
            crate::files::start(cfg, capture_feed, metrics.clone(), &supervisor, &tasks, &stages_stop)
                .context("setting up file capture")?;
        let pulse = Pulse::new();
        let health = Arc::new(
            Health::new(cfg, kafka_health.clone(), spool.clone(), pulse.clone(), metrics.clone())
                .with_stages(supervisor.stages()),
        );
        let publisher_stop = publish::Stops { soft: CancellationToken::new(), hard: CancellationToken::new() };
        // Each run of the publisher starts from the spool's oldest unacknowledged event.
        let publisher_done = followers.map(|f| {
            let (publisher, metrics, window) = (publisher.clone(), metrics.clone(), cfg.kafka.max_in_flight_records);
            let (sup, stops) = (supervisor.clone(), publisher_stop.clone());
            on_own_thread("spool-publisher", async move {
                sup.supervise(Stage::Publisher, stops.soft.clone(), move || {
                    let (publisher, metrics, pulse) = (publisher.clone(), metrics.clone(), pulse.clone());
                    publish::run_spool_publisher(f.publish.clone(), publisher, window, metrics, stops.clone(), pulse)
                })
                .await;
            })
        });
        let probe =
            (cfg.kafka.dead_letter_topic.clone(), Duration::from_millis(cfg.kafka.request_timeout_ms.min(2_000)));
        tasks.spawn({
            let (sup, stop, publisher, health) = (supervisor, stages_stop.clone(), publisher.clone(), health.clone());
            async move {
                sup.supervise(Stage::KafkaProbe, stop.clone(), move || {
                    publish::watch_kafka(
                        publisher.clone(),
                        kafka_health.clone(),
                        health.clone(),
                        probe.clone(),
                        stop.clone(),
                    )
                })
                .await;
            }
        });
        Ok(Pipeline {
            embedded,
            embedded_bootstrap,
            publisher,
            spool,
            files,
            file_results,
            health,
            tasks,
            publisher_done,
            publisher_stop,
            stages_stop,
        })
    }

    /// The drain after the listeners closed: the publisher finishes its window, the producer
    /// flushes, captures stop (what they had not finished is captured again after the restart) and
    /// the results of those that ended are recorded, the spool closes. In spool mode nothing in flight is at risk (the spool keeps it), so Kafka gets
    /// a tighter budget: it only spares duplicates after the restart.
    pub(super) async fn shutdown(self, budget: Duration) {
        let began = Instant::now();
        let left = || budget.saturating_sub(began.elapsed());
        let spare = |d: Duration| {
            if self.spool.is_some() {
                d.min(SPOOL_MODE_KAFKA_GRACE.saturating_sub(began.elapsed()))
            } else {
                d
            }
        };
        if let Some(done) = self.publisher_done {
            self.publisher_stop.soft.cancel();
            tokio::select! {
                _ = done => {}
                () = tokio::time::sleep(spare(left())) => {
                    warn!("publisher did not finish its window in time; its records stay in the spool");
                    self.publisher_stop.hard.cancel();
                }
            }
        }
        let flush_for = spare(left());
        let p = self.publisher.clone();
        match tokio::task::spawn_blocking(move || p.producer().flush(flush_for)).await {
            Ok(Ok(())) => info!("producer flushed"),
            Ok(Err(e)) => warn!(error = %e, "producer flush incomplete; unacknowledged events stay in the spool"),
            Err(e) => warn!(error = %e, "producer flush task failed"),
        }
        self.stages_stop.cancel();
        if let Some(f) = &self.files {
            // Downloads cut off are aborted in the store before the spool closes; a store that
            // hangs holds the drain no longer than its budget (an upload it did not abort stays
            // incomplete in the store).
            if tokio::time::timeout(left().max(LAST_STEP_GRACE), f.stopped()).await.is_err() {
                warn!(
                    "captures did not stop within the drain's budget; their files are captured again after the restart"
                );
            }
            // The results of those that ended are only queued: each is recorded before the spool
            // closes (else the file is captured again after the restart, its token likely dead).
            if let Some(r) = &self.file_results {
                r.flushed(f.results_sent(), left()).await;
            }
        }
        if let Some(s) = &self.spool {
            // A disk that hangs in a write or sync holds the drain no longer than its budget:
            // everything answered 2xx is already durable, and what the writer still held (acks,
            // results) is at worst published or captured again after the restart.
            if tokio::time::timeout(left().max(LAST_STEP_GRACE), s.close()).await.is_err() {
                warn!("the spool did not close within the drain's budget (its disk hangs); everything acknowledged is durable, the rest is read again at the next start");
            }
        }
        drop(self.embedded);
    }
}

/// Opens the spool, reporting what recovery found as metrics.
fn open_spool(cfg: &Config, metrics: &Arc<Metrics>, overrides: &Overrides) -> anyhow::Result<(Spool, Followers)> {
    let mut settings = SpoolSettings::new(cfg.spool.dir.clone(), cfg.spool.max_bytes, cfg.spool.dedup_window_secs)
        .with_dedup_max_ids(cfg.spool.dedup_max_ids);
    if let Some(io) = &overrides.spool_io {
        settings.io = io.clone();
    }
    let fsync = metrics.spool_fsync_duration.clone();
    settings.sync_observer = Some(Arc::new(move |secs| fsync.observe(secs)));
    let (faults, restarts) = (overrides.faults.clone(), metrics.stage_restarts.clone());
    settings.chore_hooks = Some(crate::spool::ChoreHooks {
        before: Arc::new(move || {
            if faults.as_ref().is_some_and(|f| f.take_panic(Stage::Janitor)) {
                panic!("injected fault: stage janitor panics");
            }
        }),
        panicked: Arc::new(move || restarts.with_label_values(&[Stage::Janitor.label()]).inc()),
    });
    let (spool, followers) =
        Spool::open(settings).with_context(|| format!("opening the spool in {}", cfg.spool.dir.display()))?;
    let report = spool.recovery_report();
    metrics.spool_damaged.inc_by(u64::from(report.damaged_regions));
    info!(
        segments = report.segments,
        bytes = report.bytes_read,
        frames = report.frames,
        elapsed_ms = report.elapsed_ms,
        torn_tails = report.torn_tails,
        damaged_regions = report.damaged_regions,
        events_lost = report.events_lost,
        "spool recovered"
    );
    Ok((spool, followers))
}
