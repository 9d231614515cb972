//! `huggy-bridge spool drain`: the pipeline without listeners, until the spool is empty.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::{Overrides, Pipeline};
use crate::config::{AckMode, Config};
use crate::metrics::Metrics;
use crate::systemd::Notifier;

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
    let notifier = Notifier::from_env();
    let pipeline = Pipeline::start(&cfg, Arc::new(Metrics::new()), &Overrides::default(), notifier.as_ref()).await?;
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
            let kafka = pipeline.health.kafka().is_reachable();
            info!(left = s.events, pending_files = s.pending_files, kafka, "draining");
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
