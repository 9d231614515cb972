//! The composition root: builds every part, wires them, spawns the tasks (each one tracked), and
//! orders the drain on shutdown: stop accepting → finish in-flight requests → let the publisher
//! finish its window → flush the producer → stop the capture and the probe → close the spool →
//! close the admin listener.
//!
//! The pipeline (producer, spool and its followers, file capture, Kafka probe) is what runs behind
//! the webhook; `huggy-bridge spool drain` runs it alone, without listeners, until the spool is
//! empty ([`drain_spool`]). The stages' own loops live with their owners (`files`, `publish`,
//! `systemd`); here they are only built, wired and started under the supervisor.

mod drain;
mod pipeline;

pub use drain::{drain_spool, Drained};

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::Config;
use crate::http::{self, AppState, ServeLimits};
use crate::ingest::{Ingest, KafkaIngest, SpoolIngest};
use crate::metrics::Metrics;
use crate::publish::Poison;
use crate::reload::Reloader;
use crate::spool::SegmentIo;
use crate::supervise::Faults;
use crate::systemd::Notifier;
use pipeline::Pipeline;

/// How long the end of the drain waits for the last tasks (the admin listener, the watchdog) when
/// the drain used its whole budget.
const TASKS_GRACE: Duration = Duration::from_secs(1);

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
    let (health, tasks) = (pipeline.health.clone(), pipeline.tasks.clone());
    let ingest: Arc<dyn Ingest> = match &pipeline.spool {
        Some(spool) => Arc::new(SpoolIngest::new(spool.clone(), pipeline.files.clone())),
        None => Arc::new(KafkaIngest::new(
            pipeline.publisher.clone(),
            Duration::from_millis(cfg.delivery.kafka_ack_timeout_ms),
            pipeline.files.clone(),
        )),
    };
    let state = Arc::new(AppState::new(&cfg, ingest, metrics.clone(), health.clone()));
    let reloader = Reloader::new(cfg.clone(), state.auth(), metrics.clone());
    let tls = tls_pair.map(|pair| start_tls(pair, &cfg, &metrics, &reloader)).transpose()?;

    let public = http::bind(cfg.http.listen, "http.listen").await?;
    let admin = http::bind(cfg.admin.listen, "admin.listen").await?;
    let (http_addr, admin_addr) = (public.local_addr()?, admin.local_addr()?);
    let deadline = Duration::from_secs(cfg.shutdown.timeout_secs);
    // The listeners stop in two steps: the webhook first (the drain begins), the admin listener and
    // the watchdog last (liveness stays visible while draining).
    let (http_stop, admin_stop) = (CancellationToken::new(), CancellationToken::new());
    let limits = ServeLimits { header_timeout: cfg.header_timeout(), max_connections: cfg.http.max_connections };
    let router = http::public_router(&cfg.http.path, state.clone());
    let public_task = tasks.spawn(http::serve(public, router, tls, limits, http_stop.clone(), deadline));
    tasks.spawn(http::serve_admin(admin, http::admin_router(state.clone()), admin_stop.clone()));
    info!(%http_addr, %admin_addr, path = %cfg.http.path, ack = ?cfg.delivery.ack, "huggy-bridge listening");
    if let Some(n) = &notifier {
        n.send("READY=1");
        if let Some(every) = n.watchdog() {
            tasks.spawn(crate::systemd::feed_watchdog(n.clone(), every, health.clone(), admin_stop.clone()));
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
            tasks.close();
            // What is left of the budget, and a moment at least: the last tasks end at their tokens.
            let left = deadline.saturating_sub(began.elapsed()).max(TASKS_GRACE);
            if tokio::time::timeout(left, tasks.wait()).await.is_err() {
                warn!(left = tasks.len(), "tasks still running at the end of the drain");
            }
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
