//! What the daemon knows of its Kafka connection. The producer's librdkafka callbacks and the
//! reachability probe (in `publish::kafka`) write into it; readiness, liveness and the gauges read
//! it. Nothing here speaks rdkafka.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Mutex;

use crate::clock::monotonic_millis;

/// How often librdkafka reports statistics (broker states, queue depth): the producer is set to
/// report this often, and a report older than three intervals no longer counts.
pub(crate) const STATISTICS_INTERVAL_MS: u64 = 2_000;

/// What the daemon knows of its Kafka connection, for readiness, liveness and metrics.
///
/// `reachable`: a broker connection is up (librdkafka's statistics), or a one-topic metadata request
/// answered. `fatal`: librdkafka raised a fatal error on the current producer (the publisher
/// replaces it). `unrecoverable`: a replacement producer could not be created — the only Kafka
/// state that should fail liveness.
#[derive(Default)]
pub(crate) struct KafkaHealth {
    pub(crate) reachable: AtomicBool,
    pub(crate) fatal: AtomicBool,
    pub(crate) unrecoverable: AtomicBool,
    /// Brokers whose connection was UP at the last statistics report; -1 before the first.
    brokers_up: AtomicI64,
    /// When that report came ([`monotonic_millis`]; 0 before the first).
    stats_at: AtomicI64,
    last_error: Mutex<Option<String>>,
}

impl KafkaHealth {
    pub(crate) fn new() -> Self {
        KafkaHealth { brokers_up: AtomicI64::new(-1), ..Default::default() }
    }
    pub(crate) fn is_reachable(&self) -> bool {
        self.reachable.load(Ordering::Relaxed)
    }
    /// The producer hit a fatal error and a fresh one could not be created: restarting the process
    /// is all that is left (liveness).
    pub(crate) fn cannot_recreate(&self) -> bool {
        self.unrecoverable.load(Ordering::Relaxed)
    }
    /// The last error librdkafka reported for the connection (TLS, authentication, transport),
    /// for readiness reasons and logs; `None` once a broker is up again.
    pub(crate) fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|e| e.clone())
    }
    /// Why Kafka is not usable, when it is not: for readiness in kafka ack mode.
    pub(crate) fn not_ready_reason(&self) -> Option<String> {
        if self.cannot_recreate() {
            return Some("kafka producer failed fatally and cannot be recreated".into());
        }
        if self.is_reachable() {
            return None;
        }
        Some(match self.last_error() {
            Some(e) => format!("kafka unreachable: {e}"),
            None => "kafka unreachable".into(),
        })
    }
    /// Brokers up according to statistics no older than three intervals (on the monotonic clock: a
    /// wall-clock step must not make Kafka look away); `None` when there are none.
    pub(crate) fn brokers_up_recently(&self) -> Option<i64> {
        let at = self.stats_at.load(Ordering::Relaxed);
        let fresh = at > 0 && monotonic_millis() - at <= 3 * STATISTICS_INTERVAL_MS as i64;
        let up = self.brokers_up.load(Ordering::Relaxed);
        (fresh && up >= 0).then_some(up)
    }
    /// A statistics report said `brokers_up` broker connections are UP now; one up clears the last
    /// error.
    pub(crate) fn record_statistics(&self, brokers_up: usize) {
        self.brokers_up.store(brokers_up as i64, Ordering::Relaxed);
        self.stats_at.store(monotonic_millis(), Ordering::Relaxed);
        if brokers_up > 0 {
            self.set_last_error(None);
        }
    }
    /// Sets (or clears) the error readiness reports while Kafka is unreachable.
    pub(crate) fn set_last_error(&self, e: Option<String>) {
        if let Ok(mut slot) = self.last_error.lock() {
            *slot = e;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wall_clock_jump_does_not_make_kafka_look_away_or_fresh() {
        use crate::clock::seam::{advance_monotonic, jump_wall};
        let h = KafkaHealth::default();
        assert_eq!(h.brokers_up_recently(), None, "no statistics yet");
        h.brokers_up.store(1, Ordering::Relaxed);
        h.stats_at.store(monotonic_millis(), Ordering::Relaxed);
        jump_wall(600_000);
        assert_eq!(h.brokers_up_recently(), Some(1), "a forward step makes fresh statistics stale");
        jump_wall(-1_200_000);
        advance_monotonic(u32::try_from(3 * STATISTICS_INTERVAL_MS + 1).unwrap());
        assert_eq!(h.brokers_up_recently(), None, "a backward step keeps stale statistics fresh");
    }

    #[test]
    fn readiness_says_why_kafka_is_unreachable() {
        let h = KafkaHealth::new();
        assert_eq!(h.not_ready_reason().as_deref(), Some("kafka unreachable"));
        h.set_last_error(Some("ssl://localhost:9093/bootstrap: SSL handshake failed".into()));
        assert!(h.not_ready_reason().is_some_and(|r| r.contains("SSL handshake failed")));
        h.reachable.store(true, Ordering::Relaxed);
        assert_eq!(h.not_ready_reason(), None);
        h.unrecoverable.store(true, Ordering::Relaxed);
        assert!(h.not_ready_reason().is_some_and(|r| r.contains("cannot be recreated")));
        assert!(h.cannot_recreate());
    }
}
