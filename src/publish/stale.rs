//! A producer whose state the broker lost: after a broker restart that lost its producer ids (or a
//! log truncation), librdkafka's idempotent producer can loop on `UnknownProducerId` /
//! `OutOfOrderSequence` without ever raising a fatal error, and records stop being delivered while
//! Kafka looks reachable. Such a producer is declared stale and replaced like a fatally broken one
//! (paced), with nothing acknowledged lost: the spool still holds every unacknowledged event.

use std::sync::Mutex;
use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use tokio::time::Instant;

use super::kafka::SPOOL_MESSAGE_TIMEOUT_MS;

/// Only timeouts, nothing delivered, for this long (two message timeouts) while Kafka is
/// reachable: the producer is making no progress.
pub(crate) const STALE_AFTER: Duration = Duration::from_millis(2 * SPOOL_MESSAGE_TIMEOUT_MS);

/// What the publisher saw of the current producer's deliveries.
#[derive(Debug, Default)]
pub(crate) struct Staleness {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// The broker said it does not know the producer's id or sequence.
    lost_state: Option<RDKafkaErrorCode>,
    /// The first timed-out record since the last delivery.
    timing_out_since: Option<Instant>,
}

impl Staleness {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A record was delivered: the producer makes progress.
    pub(crate) fn delivered(&self) {
        let mut s = self.state();
        s.timing_out_since = None;
    }

    /// A record failed with `e`.
    pub(crate) fn failed(&self, e: &KafkaError) {
        use RDKafkaErrorCode::*;
        let mut s = self.state();
        match e.rdkafka_error_code() {
            Some(
                code @ (UnknownProducerId | OutOfOrderSequenceNumber | InvalidProducerIdMapping | InvalidProducerEpoch),
            ) => {
                s.lost_state = Some(code);
            }
            Some(MessageTimedOut) => {
                s.timing_out_since.get_or_insert_with(Instant::now);
            }
            _ => {}
        }
    }

    /// Why the current producer should be replaced, if it should: the broker lost its state, or
    /// (with Kafka `reachable`) nothing but timeouts for [`STALE_AFTER`].
    pub(crate) fn stale(&self, reachable: bool) -> Option<(RDKafkaErrorCode, String)> {
        let s = self.state();
        if let Some(code) = s.lost_state {
            return Some((code, format!("the broker lost the producer's state ({code:?})")));
        }
        let since = s.timing_out_since?;
        (reachable && since.elapsed() >= STALE_AFTER).then(|| {
            (
                RDKafkaErrorCode::MessageTimedOut,
                format!(
                    "no record delivered for {}s, only timeouts, while Kafka is reachable",
                    since.elapsed().as_secs()
                ),
            )
        })
    }

    /// A fresh producer: nothing seen yet.
    pub(crate) fn reset(&self) {
        *self.state() = State::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broker_that_lost_the_producer_state_makes_it_stale_at_once() {
        let s = Staleness::default();
        s.failed(&KafkaError::MessageProduction(RDKafkaErrorCode::NotEnoughReplicas));
        assert!(s.stale(true).is_none(), "an ordinary retryable error is no reason");
        s.failed(&KafkaError::MessageProduction(RDKafkaErrorCode::OutOfOrderSequenceNumber));
        let (code, why) = s.stale(false).expect("stale");
        assert_eq!(code, RDKafkaErrorCode::OutOfOrderSequenceNumber);
        assert!(why.contains("lost"), "{why}");
        s.reset();
        assert!(s.stale(true).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn only_timeouts_for_long_while_kafka_is_reachable_make_it_stale() {
        let s = Staleness::default();
        s.failed(&KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut));
        tokio::time::sleep(STALE_AFTER).await;
        assert!(s.stale(false).is_none(), "Kafka unreachable: a fresh producer would not help");
        assert!(s.stale(true).is_some());
        s.delivered();
        assert!(s.stale(true).is_none(), "a delivery is progress");
        s.failed(&KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut));
        tokio::time::sleep(STALE_AFTER / 2).await;
        assert!(s.stale(true).is_none(), "not for long yet");
    }
}
