//! The composition root: builds every part, wires them, spawns the tasks, and orders the drain on
//! shutdown: stop accepting → finish in-flight requests → let the publisher finish its window →
//! flush the producer → close the spool.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::producer::Producer as _;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{AckMode, Config};
use crate::files::{bridge_files_json, Completion, FileCapture, FileJob, FileResult};
use crate::http::{self, AppState, ServeLimits};
use crate::ingest::{Ingest, Mode};
use crate::metrics::Metrics;
use crate::publish::kafka::{self, EmbeddedBroker};
use crate::publish::{self as publish, KafkaHealth, Publisher, Routes};
use crate::spool::{Spool, SpoolSettings, SEGMENT_BYTES};

/// How long a spool-mode shutdown waits on Kafka (publisher window, producer flush).
const SPOOL_MODE_KAFKA_GRACE: Duration = Duration::from_secs(5);

/// A started daemon.
pub struct Running {
    pub http_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// Bootstrap address of the embedded broker, when `kafka.brokers = "embedded"`.
    pub embedded_bootstrap: Option<String>,
    pub metrics: Arc<Metrics>,
    stop: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Running {
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
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(KafkaHealth::default());
    let embedded = if cfg.kafka.is_embedded() { Some(EmbeddedBroker::start(&cfg)?) } else { None };
    let embedded_bootstrap = embedded.as_ref().map(|e| e.bootstrap.clone());
    let bootstrap = embedded_bootstrap.clone().unwrap_or_else(|| cfg.kafka.brokers.clone());
    let producer =
        kafka::producer(&cfg, &bootstrap, metrics.clone(), health.clone()).context("creating the Kafka producer")?;
    let recreate = publish::Recreate {
        health: health.clone(),
        make: Box::new({
            let (cfg, bootstrap, metrics, health) = (cfg.clone(), bootstrap.clone(), metrics.clone(), health.clone());
            move || kafka::producer(&cfg, &bootstrap, metrics.clone(), health.clone())
        }),
    };
    let publisher =
        Arc::new(Publisher::new(producer, Routes::new(&cfg.kafka), metrics.clone()).recreating_with(recreate));

    let spool = match cfg.delivery.ack {
        AckMode::Spool => Some(
            Spool::open(SpoolSettings {
                dir: cfg.spool.dir.clone(),
                max_bytes: cfg.spool.max_bytes,
                dedup_window_secs: cfg.spool.dedup_window_secs,
                segment_bytes: SEGMENT_BYTES,
            })
            .with_context(|| format!("opening the spool in {}", cfg.spool.dir.display()))?,
        ),
        AckMode::Kafka => None,
    };
    let files_stop = CancellationToken::new();
    let files = start_file_capture(&cfg, spool.as_ref(), metrics.clone(), files_stop.clone()).await?;
    let mode = match &spool {
        Some(s) => Mode::Spool(s.clone()),
        None => Mode::Kafka {
            publisher: publisher.clone(),
            timeout: Duration::from_millis(cfg.delivery.kafka_ack_timeout_ms),
        },
    };
    let ingest = Ingest { mode, files };
    let state = Arc::new(AppState::new(&cfg, ingest, metrics.clone(), health.clone(), spool.clone()));

    let public = http::bind(cfg.http.listen, "http.listen").await?;
    let admin = http::bind(cfg.admin.listen, "admin.listen").await?;
    let http_addr = public.local_addr()?;
    let admin_addr = admin.local_addr()?;

    // Tasks that outlive the request path stop on their own tokens, in drain order.
    let publisher_soft_stop = CancellationToken::new();
    let publisher_hard_stop = CancellationToken::new();
    let background_stop = CancellationToken::new();
    let publisher_task = spool.clone().map(|s| {
        let work = publish::run_spool_publisher(
            s,
            publisher.clone(),
            cfg.kafka.max_in_flight_records,
            metrics.clone(),
            publish::Stops { soft: publisher_soft_stop.clone(), hard: publisher_hard_stop.clone() },
        );
        on_own_thread("spool-publisher", work)
    });
    tokio::spawn(probe_kafka(
        publisher.clone(),
        health.clone(),
        state.clone(),
        (cfg.kafka.dead_letter_topic.clone(), Duration::from_millis(cfg.kafka.request_timeout_ms.min(2_000))),
        background_stop.clone(),
    ));

    let deadline = Duration::from_secs(cfg.shutdown.timeout_secs);
    let http_stop = CancellationToken::new();
    let public_task = tokio::spawn(http::serve(
        public,
        http::public_router(&cfg.http.path, state.clone()),
        ServeLimits { header_timeout: cfg.header_timeout(), max_connections: cfg.http.max_connections },
        http_stop.clone(),
        deadline,
    ));
    let admin_stop = CancellationToken::new();
    let admin_task = tokio::spawn(http::serve_admin(admin, http::admin_router(state.clone()), admin_stop.clone()));
    info!(%http_addr, %admin_addr, path = %cfg.http.path, ack = ?cfg.delivery.ack, "huggy-bridge listening");
    crate::shutdown::notify_ready(stop.clone());

    let task = tokio::spawn({
        let stop = stop.clone();
        async move {
            stop.cancelled().await;
            let began = Instant::now();
            let left = || deadline.saturating_sub(began.elapsed());
            info!(deadline_secs = deadline.as_secs(), "shutdown: no new requests; draining");
            crate::shutdown::notify_stopping();
            state.draining.store(true, Ordering::Relaxed);
            http_stop.cancel();
            let _ = public_task.await;
            // In spool mode nothing in flight is at risk (the spool keeps it), so waiting on Kafka
            // is bounded tighter, one budget for the publisher's window and the flush: it only spares
            // duplicates after the restart.
            let kafka_budget_from = Instant::now();
            let spare = |d: Duration| {
                if spool.is_some() {
                    d.min(SPOOL_MODE_KAFKA_GRACE.saturating_sub(kafka_budget_from.elapsed()))
                } else {
                    d
                }
            };
            if let Some(t) = publisher_task {
                publisher_soft_stop.cancel();
                tokio::select! {
                    _ = t => {}
                    () = tokio::time::sleep(spare(left())) => {
                        warn!("publisher did not finish its window in time; its records stay in the spool");
                        publisher_hard_stop.cancel();
                    }
                }
            }
            let flush_for = spare(left());
            let p = publisher.clone();
            let flushed = tokio::task::spawn_blocking(move || p.producer().flush(flush_for)).await;
            match flushed {
                Ok(Ok(())) => info!("producer flushed"),
                Ok(Err(e)) => warn!(error = %e, "producer flush incomplete; unacknowledged events stay in the spool"),
                Err(e) => warn!(error = %e, "producer flush task failed"),
            }
            files_stop.cancel();
            if let Some(s) = &spool {
                s.close().await;
            }
            background_stop.cancel();
            admin_stop.cancel();
            let _ = admin_task.await;
            drop(embedded);
            info!(elapsed_ms = began.elapsed().as_millis() as u64, "shutdown complete");
            Ok(())
        }
    });
    Ok(Running { http_addr, admin_addr, embedded_bootstrap, metrics, stop, task })
}

/// Starts the file-capture workers (when enabled) and hands them the captures a previous run left
/// unfinished; with capture disabled, reports those as failed so their events get published.
async fn start_file_capture(
    cfg: &Config,
    spool: Option<&Spool>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) -> anyhow::Result<Option<Arc<FileCapture>>> {
    let pending = spool.map(Spool::take_pending_files).unwrap_or_default();
    if !cfg.files.enabled {
        if let Some(s) = spool {
            for p in pending {
                let why = "file capture is disabled (files.enabled = false)";
                let results: Vec<FileResult> = p.urls.iter().map(|u| FileResult::failed(u, why.into())).collect();
                s.files_done(p.seq, bridge_files_json(&results)).await;
            }
        }
        return Ok(None);
    }
    let fc = FileCapture::new(&cfg.files, metrics).context("setting up file capture")?;
    if let Some(s) = spool {
        let sink_spool = s.clone();
        fc.set_spool_sink(Arc::new(move |seq, member| {
            let s = sink_spool.clone();
            tokio::spawn(async move { s.files_done(seq, member).await });
        }));
    }
    for p in pending {
        info!(seq = p.seq, files = p.urls.len(), "resuming file capture interrupted by the last stop");
        fc.submit(FileJob {
            event_id: p.event_id,
            company: p.company,
            received_at: p.received_at,
            urls: p.urls,
            completion: Completion::Spool(p.seq),
        });
    }
    fc.spawn_workers(cfg.files.concurrency, stop);
    Ok(Some(fc))
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

/// Keeps `KafkaHealth::reachable` true to reality every two seconds: librdkafka's broker states,
/// else a metadata request for one topic (`probe`: the topic and the request's timeout).
async fn probe_kafka(
    publisher: Arc<Publisher>,
    health: Arc<KafkaHealth>,
    state: Arc<AppState>,
    probe: (String, Duration),
    stop: CancellationToken,
) {
    let mut was = None;
    loop {
        // A producer that failed fatally is replaced here too, not only when there is work: in kafka
        // ack mode a replica that is not ready gets no requests that would replace it.
        publisher.heal().await;
        let (p, h, (topic, timeout)) = (publisher.clone(), health.clone(), probe.clone());
        let ok = tokio::task::spawn_blocking(move || kafka::probe_reachable(&p.producer(), &h, &topic, timeout))
            .await
            .unwrap_or(false);
        health.reachable.store(ok, Ordering::Relaxed);
        if was != Some(ok) {
            if ok {
                info!("kafka reachable");
            } else {
                warn!(reason = health.last_error().as_deref().unwrap_or("no broker answered"), "kafka unreachable");
            }
            was = Some(ok);
        }
        state.refresh_gauges();
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(2)) => {}
            () = stop.cancelled() => break,
        }
    }
}
