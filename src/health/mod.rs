//! Readiness, liveness and the gauges read from state, in one place (SPEC §7).
//!
//! Readiness answers one question — *can this replica make a batch durable right now?* — because a
//! not-ready pod receives no traffic:
//! - `spool` mode: the spool is writable and not refusing for lack of room, and the daemon is not
//!   shutting down. Kafka being unreachable and undelivered events aging do **not** make it unready:
//!   riding out a Kafka outage is what the spool is for (they are metrics and alerts).
//! - `kafka` mode: Kafka is reachable, the producer is usable, and the daemon is not shutting down.
//!
//! Liveness fails only when restarting would help: the spool writer or the publisher has work and
//! has stopped making progress, the producer is fatally broken and could not be recreated, or a
//! supervised stage keeps panicking however often it is restarted.
//!
//! The Kafka connection's state lives in [`kafka`]: the producer reports into it, health reads it.

mod kafka;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tracing::warn;

use crate::clock::{free_bytes, monotonic_millis, now_secs};
use crate::config::{AckMode, Config};
use crate::metrics::Metrics;
use crate::spool::Spool;
use crate::supervise::Stages;
pub(crate) use kafka::{KafkaHealth, STATISTICS_INTERVAL_MS};

/// A stage's pulse: when it last made progress.
#[derive(Debug, Default)]
pub(crate) struct Pulse {
    last_ms: AtomicI64,
}

impl Pulse {
    pub(crate) fn new() -> Arc<Pulse> {
        let p = Pulse::default();
        p.beat();
        Arc::new(p)
    }

    /// The stage made progress (or is waiting with nothing it could do).
    pub(crate) fn beat(&self) {
        self.last_ms.store(monotonic_millis(), Ordering::Relaxed);
    }

    /// Time since the last beat.
    pub(crate) fn silent_for(&self) -> Duration {
        Duration::from_millis((monotonic_millis() - self.last_ms.load(Ordering::Relaxed)).max(0).unsigned_abs())
    }
}

/// Everything readiness and liveness look at.
pub(crate) struct Health {
    ack: AckMode,
    draining: AtomicBool,
    kafka: Arc<KafkaHealth>,
    spool: Option<Spool>,
    publisher: Arc<Pulse>,
    writer_stall: Duration,
    publisher_stall: Duration,
    warn_age_secs: u64,
    spool_dir: PathBuf,
    metrics: Arc<Metrics>,
    stages: Option<Arc<Stages>>,
}

impl Health {
    pub(crate) fn new(
        cfg: &Config,
        kafka: Arc<KafkaHealth>,
        spool: Option<Spool>,
        publisher: Arc<Pulse>,
        metrics: Arc<Metrics>,
    ) -> Health {
        let stall = Duration::from_secs(cfg.spool.stall_timeout_secs.max(1));
        Health {
            ack: cfg.delivery.ack,
            draining: AtomicBool::new(false),
            kafka,
            spool,
            publisher,
            writer_stall: stall,
            publisher_stall: stall * 5,
            warn_age_secs: cfg.spool.max_undelivered_age_secs,
            spool_dir: cfg.spool.dir.clone(),
            metrics,
            stages: None,
        }
    }

    /// Liveness also fails while a supervised stage keeps failing.
    pub(crate) fn with_stages(mut self, stages: Arc<Stages>) -> Health {
        self.stages = Some(stages);
        self
    }

    /// Shutdown began: new webhook requests get 503, readiness turns false.
    pub(crate) fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    pub(crate) fn kafka(&self) -> &KafkaHealth {
        &self.kafka
    }

    /// Reasons the daemon is not ready; empty when it is.
    pub(crate) fn not_ready_reasons(&self) -> Vec<String> {
        let mut reasons = Vec::new();
        if self.is_draining() {
            reasons.push("shutting down".to_owned());
        }
        match (&self.ack, &self.spool) {
            (AckMode::Spool, Some(spool)) => {
                let s = spool.stats();
                if !s.writable {
                    reasons.push("spool not writable".to_owned());
                }
                if s.disk_full {
                    reasons.push("no room on the spool's filesystem".to_owned());
                }
                if s.full {
                    reasons.push(format!("spool full ({} of {} bytes on disk)", s.disk_bytes, s.max_bytes));
                }
            }
            _ => reasons.extend(self.kafka.not_ready_reason()),
        }
        reasons
    }

    /// Reasons the daemon is stuck; empty when it is alive.
    pub(crate) fn not_live_reasons(&self) -> Vec<String> {
        let mut reasons = Vec::new();
        if let Some(spool) = &self.spool {
            if let Some(d) = spool.writer_stalled_for(self.writer_stall) {
                reasons.push(format!("spool writer has made no progress with work pending for {}s", d.as_secs()));
            }
            let silent = self.publisher.silent_for();
            if spool.stats().events > 0 && self.kafka.is_reachable() && silent > self.publisher_stall {
                reasons.push(format!(
                    "publisher has made no progress for {}s with undelivered events and Kafka reachable",
                    silent.as_secs()
                ));
            }
        }
        if self.kafka.cannot_recreate() {
            reasons.push("kafka producer is fatally broken and could not be recreated".to_owned());
        }
        if let Some(stages) = &self.stages {
            reasons.extend(stages.failing());
        }
        reasons
    }

    /// Refreshes gauges that are read from state rather than counted.
    pub(crate) fn refresh_gauges(&self) {
        let m = &self.metrics;
        if let Some(spool) = &self.spool {
            let s = spool.stats();
            m.spool_events.set(gauge(s.events));
            m.spool_bytes.set(gauge(s.bytes));
            m.spool_disk_bytes.set(gauge(s.disk_bytes));
            m.spool_max_bytes.set(gauge(s.max_bytes));
            m.spool_pending_files.set(gauge(s.pending_files as u64));
            let age = s.oldest_received_at.map_or(0, |at| (now_secs() - at).max(0));
            m.spool_oldest_age.set(age);
            if age.unsigned_abs() > self.warn_age_secs {
                warn!(oldest_age_secs = age, undelivered = s.events, "undelivered events are aging in the spool");
            }
            match free_bytes(&self.spool_dir) {
                Ok(free) => m.spool_fs_free_bytes.set(gauge(free)),
                Err(e) => {
                    warn!(error = %e, dir = %self.spool_dir.display(), "cannot read free space of the spool's filesystem")
                }
            }
        }
        m.kafka_connected.set(i64::from(self.kafka.is_reachable()));
        m.ready.set(i64::from(self.not_ready_reasons().is_empty()));
        m.live.set(i64::from(self.not_live_reasons().is_empty()));
    }
}

fn gauge(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::seam::{advance_monotonic, jump_wall};

    #[test]
    fn a_wall_clock_jump_neither_silences_nor_revives_a_pulse() {
        let after = Duration::from_secs(5);
        let pulse = Pulse::new();
        // Forward by ten minutes: the stage does not look silent.
        jump_wall(600_000);
        assert!(pulse.silent_for() < after, "a forward jump makes the publisher look silent: {:?}", pulse.silent_for());
        // Back by twenty minutes, and the stage really is silent for ten seconds: it is seen.
        jump_wall(-1_200_000);
        advance_monotonic(10_000);
        assert!(pulse.silent_for() >= Duration::from_secs(10), "a backward jump hides a silent publisher");
    }
}
