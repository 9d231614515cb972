//! The composition root: builds every part, wires them, spawns the tasks, and orders the drain on
//! shutdown: stop accepting → finish in-flight requests → let the publisher finish its window →
//! flush the producer → close the spool.
//!
//! The [`Pipeline`] (producer, spool, file capture, spool publisher) is what runs behind the webhook;
//! `huggy-bridge spool drain` runs it alone, without listeners, until the spool is empty.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::producer::Producer as _;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{AckMode, Config};
use crate::files::{results_json, Completion, FileCapture, FileDone, FileJob, FileResult};
use crate::health::{Health, Pulse};
use crate::http::{self, AppState, ServeLimits};
use crate::ingest::{Ingest, Mode};
use crate::metrics::Metrics;
use crate::metrics::Stage;
use crate::publish::kafka::{self, EmbeddedBroker};
use crate::publish::Poison;
use crate::publish::{self as publish, KafkaHealth, Publisher, Routes};
use crate::reload::Reloader;
use crate::spool::{SegmentIo, Spool, SpoolSettings};
use crate::supervise::{Faults, Supervisor};
use crate::systemd::Notifier;

/// How long a spool-mode shutdown waits on Kafka (publisher window, producer flush).
const SPOOL_MODE_KAFKA_GRACE: Duration = Duration::from_secs(5);

/// A started daemon.
pub struct Running {
    /// Where the webhook listener is bound (the real port when `http.listen` asked for port 0).
    pub http_addr: SocketAddr,
    /// Where the admin listener (`/metrics`, `/healthz`, `/readyz`) is bound.
    pub admin_addr: SocketAddr,
    /// Bootstrap address of the embedded broker, when `kafka.brokers = "embedded"`.
    pub embedded_bootstrap: Option<String>,
    /// The daemon's metrics, for reading counters without scraping `/metrics`.
    pub metrics: Arc<Metrics>,
    reloader: Reloader,
    stop: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Running {
    /// What applies a new configuration to this daemon (SIGHUP, or any other trigger).
    pub fn reloader(&self) -> Reloader {
        self.reloader.clone()
    }

    /// Begins the shutdown drain.
    pub fn shutdown(&self) {
        self.stop.cancel();
    }

    /// Waits for the daemon to stop.
    ///
    /// # Errors
    /// A part failed while draining.
    pub async fn wait(self) -> anyhow::Result<()> {
        self.task.await.context("daemon task panicked")?
    }
}

/// Replacements for parts of the daemon, for tests that need a disk that fails or a stage that
/// panics. Nothing here is reachable from a request: only code that starts the daemon sets it.
#[derive(Default, Clone)]
pub struct Overrides {
    /// The spool's write and sync calls.
    pub spool_io: Option<Arc<dyn SegmentIo>>,
    /// Panics to inject into the supervised background stages.
    pub faults: Option<Arc<Faults>>,
    /// Events (by their value's bytes) whose publishing panics, as a bug in publishing would.
    pub poison: Option<Poison>,
    /// Where systemd notifications go; unset: `$NOTIFY_SOCKET` and `$WATCHDOG_USEC`, if any.
    pub notifier: Option<Notifier>,
}

/// How often a long spool recovery extends systemd's start timeout.
const RECOVERY_EXTEND_PERIOD: Duration = Duration::from_secs(10);

/// Runs the daemon until `stop` is cancelled, then drains.
///
/// # Errors
/// A part could not be started (listener, spool, producer).
pub async fn run(cfg: Config, stop: CancellationToken) -> anyhow::Result<()> {
    let running = start(cfg, stop).await?;
    running.wait().await
}

/// Starts every part and returns once both listeners are bound.
///
/// # Errors
/// A part could not be started (listener, spool, producer).
pub async fn start(cfg: Config, stop: CancellationToken) -> anyhow::Result<Running> {
    start_with(cfg, stop, Overrides::default()).await
}

/// [`start`] with some parts replaced.
///
/// # Errors
/// A part could not be started (listener, spool, producer).
pub async fn start_with(cfg: Config, stop: CancellationToken, overrides: Overrides) -> anyhow::Result<Running> {
    let metrics = Arc::new(Metrics::new());
    // Checked before anything starts: a broken pair is a configuration error.
    let tls_pair = http::configured_pair(&cfg.http.tls)?;
    let notifier = overrides.notifier.clone().or_else(Notifier::from_env);
    let pipeline = Pipeline::start(&cfg, metrics.clone(), &overrides, notifier.as_ref()).await?;
    let health = pipeline.health.clone();
    let mode = match &pipeline.spool {
        Some(s) => Mode::Spool(s.clone()),
        None => Mode::Kafka {
            publisher: pipeline.publisher.clone(),
            timeout: Duration::from_millis(cfg.delivery.kafka_ack_timeout_ms),
        },
    };
    let ingest = Arc::new(Ingest { mode, files: pipeline.files.clone() });
    let state = Arc::new(AppState::new(&cfg, ingest, metrics.clone(), health.clone()));
    let reloader = Reloader::new(cfg.clone(), state.auth(), metrics.clone());
    let tls = tls_pair.map(|pair| start_tls(pair, &cfg, &metrics, &reloader)).transpose()?;

    let public = http::bind(cfg.http.listen, "http.listen").await?;
    let admin = http::bind(cfg.admin.listen, "admin.listen").await?;
    let http_addr = public.local_addr()?;
    let admin_addr = admin.local_addr()?;
    let deadline = Duration::from_secs(cfg.shutdown.timeout_secs);
    let http_stop = CancellationToken::new();
    let public_task = tokio::spawn(http::serve(
        public,
        http::public_router(&cfg.http.path, state.clone()),
        tls,
        ServeLimits { header_timeout: cfg.header_timeout(), max_connections: cfg.http.max_connections },
        http_stop.clone(),
        deadline,
    ));
    let admin_stop = CancellationToken::new();
    let admin_task = tokio::spawn(http::serve_admin(admin, http::admin_router(state.clone()), admin_stop.clone()));
    info!(%http_addr, %admin_addr, path = %cfg.http.path, ack = ?cfg.delivery.ack, "huggy-bridge listening");
    let watchdog_stop = CancellationToken::new();
    if let Some(n) = &notifier {
        n.send("READY=1");
        if let Some(every) = n.watchdog() {
            tokio::spawn(feed_watchdog(n.clone(), every, health.clone(), watchdog_stop.clone()));
        }
    }

    let embedded_bootstrap = pipeline.embedded_bootstrap.clone();
    let task = tokio::spawn({
        let stop = stop.clone();
        async move {
            stop.cancelled().await;
            let began = Instant::now();
            info!(deadline_secs = deadline.as_secs(), "shutdown: no new requests; draining");
            if let Some(n) = &notifier {
                n.send("STOPPING=1");
            }
            health.start_draining();
            http_stop.cancel();
            let _ = public_task.await;
            pipeline.shutdown(deadline.saturating_sub(began.elapsed())).await;
            admin_stop.cancel();
            let _ = admin_task.await;
            watchdog_stop.cancel();
            info!(elapsed_ms = began.elapsed().as_millis() as u64, "shutdown complete");
            Ok(())
        }
    });
    Ok(Running { http_addr, admin_addr, embedded_bootstrap, metrics, reloader, stop, task })
}

/// The public listener's TLS serving `pair`, re-read by every reload. A broken new pair keeps the
/// old one serving without refusing the rest of the reload: a token rotation must not wait on a
/// certificate.
fn start_tls(
    pair: http::Pair,
    cfg: &Config,
    metrics: &Arc<Metrics>,
    reloader: &Reloader,
) -> anyhow::Result<Arc<http::Tls>> {
    info!(cert_file = %cfg.http.tls.cert_file, not_after = pair.not_after, "the public listener speaks HTTPS");
    let tls = Arc::new(http::Tls::new(pair, metrics.clone(), cfg.header_timeout())?);
    let hook = tls.clone();
    reloader.on_reload("http.tls", move |new| {
        if new.http.tls.enabled() {
            // Logged and counted by `reload`; the old pair keeps serving on failure.
            let _ = hook.reload(&new.http.tls);
        } else {
            warn!("[http.tls] removed from the configuration; the listener speaks HTTPS until a restart");
        }
        Ok(())
    });
    Ok(tls)
}

/// Sends `WATCHDOG=1` twice per `interval` while liveness (`/healthz`) passes, and withholds it
/// while the daemon is stuck, so that systemd restarts it as Kubernetes would. Keeps going through
/// the drain: a drain that hangs is stuck too.
async fn feed_watchdog(notifier: Notifier, interval: Duration, health: Arc<Health>, stop: CancellationToken) {
    let mut withheld = false;
    let mut tick = tokio::time::interval(interval / 2);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => break,
        }
        let reasons = health.not_live_reasons();
        if reasons.is_empty() {
            if withheld {
                info!("liveness passes again; feeding the systemd watchdog");
                withheld = false;
            }
            notifier.send("WATCHDOG=1");
        } else if !withheld {
            tracing::error!(
                reasons = reasons.join("; "),
                "liveness fails; withholding WATCHDOG=1 so that systemd restarts the daemon"
            );
            withheld = true;
        }
    }
}

/// What `spool drain` did.
#[derive(Debug, Clone, Copy)]
pub struct Drained {
    /// Undelivered events the spool held when the drain began.
    pub events: u64,
    /// How long the drain took.
    pub elapsed: Duration,
}

/// Publishes everything undelivered in the spool of `cfg` (capturing the files its events still
/// wait for) and returns once the spool is empty; for the volume of a replica that was scaled away.
/// `stop` gives up early, leaving the rest in the spool.
///
/// # Errors
/// The spool is held by another process or cannot be opened; the producer cannot be made; `stop`
/// was cancelled before the spool was empty.
pub async fn drain_spool(mut cfg: Config, stop: CancellationToken) -> anyhow::Result<Drained> {
    cfg.delivery.ack = AckMode::Spool;
    let began = Instant::now();
    let metrics = Arc::new(Metrics::new());
    let notifier = Notifier::from_env();
    let pipeline = Pipeline::start(&cfg, metrics, &Overrides::default(), notifier.as_ref()).await?;
    let spool = pipeline.spool.clone().context("spool drain needs the spool")?;
    let total = spool.stats().events;
    info!(events = total, dir = %cfg.spool.dir.display(), "draining the spool");
    let committed = spool.committed();
    let mut last_log = Instant::now();
    let result = loop {
        let notified = committed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let s = spool.stats();
        if s.events == 0 {
            break Ok(());
        }
        if last_log.elapsed() > Duration::from_secs(5) {
            info!(
                left = s.events,
                pending_files = s.pending_files,
                kafka = pipeline.health.kafka().is_reachable(),
                "draining"
            );
            last_log = Instant::now();
        }
        tokio::select! {
            () = &mut notified => {}
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            () = stop.cancelled() => break Err(anyhow::anyhow!("interrupted with {} events left in the spool", s.events)),
        }
    };
    pipeline.shutdown(Duration::from_secs(cfg.shutdown.timeout_secs)).await;
    result.map(|()| Drained { events: total, elapsed: began.elapsed() })
}

/// The stages behind the webhook: producer, spool (in spool mode), file capture, spool publisher.
struct Pipeline {
    embedded: Option<EmbeddedBroker>,
    embedded_bootstrap: Option<String>,
    publisher: Arc<Publisher>,
    spool: Option<Spool>,
    files: Option<Arc<FileCapture>>,
    health: Arc<Health>,
    publisher_task: Option<tokio::sync::oneshot::Receiver<()>>,
    publisher_soft_stop: CancellationToken,
    publisher_hard_stop: CancellationToken,
    files_stop: CancellationToken,
    background_stop: CancellationToken,
}

impl Pipeline {
    async fn start(
        cfg: &Config,
        metrics: Arc<Metrics>,
        overrides: &Overrides,
        notifier: Option<&Notifier>,
    ) -> anyhow::Result<Pipeline> {
        let kafka_health = Arc::new(KafkaHealth::new());
        let embedded = if cfg.kafka.is_embedded() { Some(EmbeddedBroker::start(cfg)?) } else { None };
        let embedded_bootstrap = embedded.as_ref().map(|e| e.bootstrap.clone());
        let bootstrap = embedded_bootstrap.clone().unwrap_or_else(|| cfg.kafka.brokers.clone());
        let producer = kafka::producer(cfg, &bootstrap, metrics.clone(), kafka_health.clone())
            .context("creating the Kafka producer")?;
        // A producer that fails fatally (fenced idempotence, …) is replaced by a fresh one made the
        // same way; the spool still holds every unacknowledged event.
        let recreate = publish::Recreate {
            health: kafka_health.clone(),
            make: Box::new({
                let (cfg, bootstrap, metrics, health) =
                    (cfg.clone(), bootstrap.clone(), metrics.clone(), kafka_health.clone());
                move || kafka::producer(&cfg, &bootstrap, metrics.clone(), health.clone())
            }),
        };
        // The topics' limits are read in the background: an unreachable Kafka must not delay the start.
        let limits = Arc::new(publish::claim::TopicLimits::unread(
            cfg,
            &bootstrap,
            kafka::routable_topics(cfg).into_iter().collect(),
        ));
        tokio::spawn({
            let limits = limits.clone();
            async move { limits.refresh().await }
        });
        let claims = publish::claim::ClaimChecks::new(cfg, limits, metrics.clone());
        let mut publisher = Publisher::new(producer, Routes::new(&cfg.kafka), metrics.clone())
            .recreating_with(recreate)
            .with_claim_checks(claims);
        if let Some(p) = &overrides.poison {
            publisher = publisher.poisoned_by(p.clone());
        }
        let publisher = Arc::new(publisher);
        let supervisor = Supervisor::new(metrics.clone(), overrides.faults.clone());
        let spool = match cfg.delivery.ack {
            AckMode::Spool => {
                // A large spool may take longer to recover than systemd's start timeout.
                let _extending = notifier.map(|n| n.extend_timeout_while(RECOVERY_EXTEND_PERIOD, "spool recovery"));
                Some(open_spool(cfg, &metrics, overrides)?)
            }
            AckMode::Kafka => None,
        };
        let files_stop = CancellationToken::new();
        let files = start_file_capture(cfg, spool.as_ref(), metrics.clone(), files_stop.clone(), &supervisor).await?;
        let pulse = Pulse::new();
        let health = Arc::new(
            Health::new(cfg, kafka_health.clone(), spool.clone(), pulse.clone(), metrics.clone())
                .with_stages(supervisor.stages()),
        );

        // Tasks that outlive the request path stop on their own tokens, in drain order.
        let publisher_soft_stop = CancellationToken::new();
        let publisher_hard_stop = CancellationToken::new();
        let background_stop = CancellationToken::new();
        // Each run of the publisher starts from the spool's oldest unacknowledged event.
        let publisher_task = spool.clone().map(|s| {
            let (publisher, metrics, window) = (publisher.clone(), metrics.clone(), cfg.kafka.max_in_flight_records);
            let stops = publish::Stops { soft: publisher_soft_stop.clone(), hard: publisher_hard_stop.clone() };
            let (sup, soft) = (supervisor.clone(), publisher_soft_stop.clone());
            on_own_thread("spool-publisher", async move {
                sup.supervise(Stage::Publisher, soft, move || {
                    publish::run_spool_publisher(
                        s.clone(),
                        publisher.clone(),
                        window,
                        metrics.clone(),
                        stops.clone(),
                        pulse.clone(),
                    )
                })
                .await;
            })
        });
        let probe =
            (cfg.kafka.dead_letter_topic.clone(), Duration::from_millis(cfg.kafka.request_timeout_ms.min(2_000)));
        tokio::spawn({
            let (sup, stop, publisher, health) =
                (supervisor.clone(), background_stop.clone(), publisher.clone(), health.clone());
            async move {
                sup.supervise(Stage::KafkaProbe, stop.clone(), move || {
                    probe_kafka(publisher.clone(), kafka_health.clone(), health.clone(), probe.clone(), stop.clone())
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
            health,
            publisher_task,
            publisher_soft_stop,
            publisher_hard_stop,
            files_stop,
            background_stop,
        })
    }

    /// The drain after the listeners closed: the publisher finishes its window, the producer
    /// flushes, captures stop (what they had not finished is captured again after the restart), the
    /// spool closes. In spool mode nothing in flight is at risk (the spool keeps it), so Kafka gets
    /// a tighter budget: it only spares duplicates after the restart.
    async fn shutdown(self, budget: Duration) {
        let began = Instant::now();
        let left = || budget.saturating_sub(began.elapsed());
        let spare = |d: Duration| {
            if self.spool.is_some() {
                d.min(SPOOL_MODE_KAFKA_GRACE.saturating_sub(began.elapsed()))
            } else {
                d
            }
        };
        if let Some(t) = self.publisher_task {
            self.publisher_soft_stop.cancel();
            tokio::select! {
                _ = t => {}
                () = tokio::time::sleep(spare(left())) => {
                    warn!("publisher did not finish its window in time; its records stay in the spool");
                    self.publisher_hard_stop.cancel();
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
        self.files_stop.cancel();
        if let Some(f) = &self.files {
            // Downloads cut off are aborted in the store before the spool closes.
            f.stopped().await;
        }
        if let Some(s) = &self.spool {
            s.close().await;
        }
        self.background_stop.cancel();
        drop(self.embedded);
    }
}

/// Opens the spool, reporting what recovery found as metrics.
fn open_spool(cfg: &Config, metrics: &Arc<Metrics>, overrides: &Overrides) -> anyhow::Result<Spool> {
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
    let spool = Spool::open(settings).with_context(|| format!("opening the spool in {}", cfg.spool.dir.display()))?;
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
    Ok(spool)
}

/// Starts the file-capture workers (when enabled) and, in spool mode, the task that feeds them the
/// spool's file work: every durable event with files, whether it was just committed or found at
/// recovery, whatever became of the request that brought it. With capture disabled, file work is
/// reported failed so its events get published.
async fn start_file_capture(
    cfg: &Config,
    spool: Option<&Spool>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
    supervisor: &Supervisor,
) -> anyhow::Result<Option<Arc<FileCapture>>> {
    let fc = if cfg.files.enabled {
        // Results flow back into the spool's writer through one bounded channel (awaiting room,
        // never a task per result).
        let (done_tx, done_rx) = tokio::sync::mpsc::channel::<FileDone>(1024);
        let files_cfg = files_config(cfg, spool.is_some());
        let fc = FileCapture::new(&files_cfg, metrics, done_tx).context("setting up file capture")?;
        if let Some(s) = spool.cloned() {
            // Shared so that a restarted forwarder takes over the same channel; it ends when every
            // sender is gone.
            let done_rx = Arc::new(tokio::sync::Mutex::new(done_rx));
            let sup = supervisor.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                sup.supervise(Stage::FileResults, stop, move || forward_file_results(s.clone(), done_rx.clone())).await;
            });
        }
        fc.spawn_supervised(stop.clone(), supervisor);
        Some(fc)
    } else {
        None
    };
    if let Some(s) = spool.cloned() {
        let (sup, fc) = (supervisor.clone(), fc.clone());
        tokio::spawn(async move {
            let run_stop = stop.clone();
            sup.supervise(Stage::FileFeed, stop, move || feed_file_work(s.clone(), fc.clone(), run_stop.clone())).await;
        });
    }
    Ok(fc)
}

/// `[files]` with `min_free_bytes` worked out when unset: a `file://` store on the spool's
/// filesystem leaves `spool.max_bytes` free, so that captures never take the room the spool may
/// need; elsewhere (another volume, an object store, no spool) nothing is held back.
fn files_config(cfg: &Config, spooled: bool) -> crate::config::FilesConfig {
    let mut files = cfg.files.clone();
    if files.min_free_bytes.is_none() {
        let shared = match files.store.strip_prefix("file://") {
            Some(dir) if spooled => crate::clock::same_filesystem(std::path::Path::new(dir), &cfg.spool.dir)
                .unwrap_or_else(|e| {
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

/// Hands capture results back to the spool's writer until every sender is gone.
async fn forward_file_results(spool: Spool, done: Arc<tokio::sync::Mutex<tokio::sync::mpsc::Receiver<FileDone>>>) {
    let mut done = done.lock().await;
    while let Some(d) = done.recv().await {
        spool.files_done(d.seq, d.member).await;
    }
}

/// Hands the spool's file work to the capture stage as it appears.
async fn feed_file_work(spool: Spool, fc: Option<Arc<FileCapture>>, stop: CancellationToken) {
    let notify = spool.file_work_notify();
    loop {
        for w in spool.take_file_work() {
            match &fc {
                Some(fc) => fc.submit(FileJob {
                    event_id: w.event_id,
                    company: w.company,
                    received_at: w.received_at,
                    urls: w.urls,
                    completion: Completion::Spool(w.seq),
                }),
                None => {
                    let why = "file capture is disabled (files.enabled = false)";
                    let results: Vec<FileResult> = w.urls.iter().map(|u| FileResult::failed(u, why.into())).collect();
                    spool.files_done(w.seq, results_json(&results)).await;
                }
            }
        }
        // `notify_one` stores a permit when nobody waits, so work committed between the take above
        // and this wait is not missed.
        tokio::select! {
            () = notify.notified() => {}
            () = stop.cancelled() => break,
        }
    }
}

/// Runs `work` on a thread of its own (a current-thread runtime), so that reading the spool and
/// handing thousands of records to librdkafka never delays the request path's workers.
fn on_own_thread<F>(name: &str, work: F) -> tokio::sync::oneshot::Receiver<()>
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

/// Keeps `KafkaHealth::reachable` true to reality every two seconds — librdkafka's broker states,
/// else a metadata request for one topic (`probe`: the topic and the request's timeout) — replaces a
/// producer that failed fatally, and refreshes the state gauges at the same pace.
async fn probe_kafka(
    publisher: Arc<Publisher>,
    kafka_health: Arc<KafkaHealth>,
    health: Arc<Health>,
    probe: (String, Duration),
    stop: CancellationToken,
) {
    let mut was = None;
    loop {
        // A producer that failed fatally is replaced here too, not only when there is work: in kafka
        // ack mode a replica that is not ready gets no requests that would replace it.
        publisher.heal().await;
        let (p, h, (topic, timeout)) = (publisher.clone(), kafka_health.clone(), probe.clone());
        let ok = tokio::task::spawn_blocking(move || kafka::probe_reachable(&p.producer(), &h, &topic, timeout))
            .await
            .unwrap_or(false);
        kafka_health.reachable.store(ok, std::sync::atomic::Ordering::Relaxed);
        if was != Some(ok) {
            if ok {
                info!("kafka reachable");
            } else {
                warn!(
                    reason = kafka_health.last_error().as_deref().unwrap_or("no broker answered"),
                    "kafka unreachable"
                );
            }
            was = Some(ok);
        }
        health.refresh_gauges();
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(2)) => {}
            () = stop.cancelled() => break,
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
