//! Lanes: the spool publisher's events held per key, so that an event Kafka will not take now (a
//! partition without a leader, a topic that does not exist) stalls only its own key. Each lane is a
//! queue of one key's events in sequence order; a lane is sent as a whole, at most once at a time,
//! and a lane whose events failed waits out its own exponential backoff while the others go on.
//! Events without a key (no chat, no company) each get a lane of their own: no order binds them.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use tokio::time::Instant;

use super::Outcome;
use crate::spool::Stored;

/// What binds events to one order.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum LaneKey {
    Key(String),
    Alone(u64),
}

fn key_of(s: &Stored) -> LaneKey {
    match &s.event.key {
        Some(k) => LaneKey::Key(k.clone()),
        None => LaneKey::Alone(s.seq),
    }
}

struct Lane {
    queue: VecDeque<Stored>,
    /// Events of this lane in a round being published now.
    in_flight: usize,
    /// After a failure: not sent again before then.
    not_before: Option<Instant>,
    backoff: Option<ExponentialBackoff>,
    /// Rounds in a row that failed.
    failures: u32,
}

/// What one finished round did.
#[derive(Debug, Default)]
pub(crate) struct Finished {
    /// Sequence numbers Kafka took (published or dead-lettered), with when they were received.
    pub(crate) done: Vec<(u64, i64)>,
    /// Events that go back to their lane.
    pub(crate) retried: usize,
    /// Lanes that began backing off with this round (they were flowing before).
    pub(crate) newly_stalled: usize,
}

/// Every lane the publisher holds.
pub(crate) struct Lanes {
    lanes: HashMap<LaneKey, Lane>,
    held: usize,
    held_bytes: usize,
    policy: ExponentialBuilder,
}

impl Lanes {
    pub(crate) fn new() -> Self {
        Lanes {
            lanes: HashMap::new(),
            held: 0,
            held_bytes: 0,
            policy: ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(200))
                .with_max_delay(Duration::from_secs(30))
                .with_jitter()
                .without_max_times(),
        }
    }

    /// Events held, queued or in flight.
    pub(crate) fn held(&self) -> usize {
        self.held
    }

    /// Bytes of the values of the events held.
    pub(crate) fn held_bytes(&self) -> usize {
        self.held_bytes
    }

    /// Appends an event (in sequence order) to its key's lane.
    pub(crate) fn push(&mut self, s: Stored) {
        let lane = self.lanes.entry(key_of(&s)).or_insert_with(|| Lane {
            queue: VecDeque::new(),
            in_flight: 0,
            not_before: None,
            backoff: None,
            failures: 0,
        });
        self.held += 1;
        self.held_bytes += s.event.value.len();
        lane.queue.push_back(s);
    }

    /// Takes the queued events of lanes that may be sent now (none in flight, no backoff pending)
    /// — whole lanes, up to about `max` events — and marks them in flight.
    pub(crate) fn take_ready(&mut self, now: Instant, max: usize) -> Vec<Stored> {
        let mut round = Vec::new();
        for lane in self.lanes.values_mut() {
            if round.len() >= max {
                break;
            }
            let due = lane.not_before.is_none_or(|t| t <= now);
            if lane.in_flight > 0 || !due || lane.queue.is_empty() {
                continue;
            }
            let n = lane.queue.len().min(max - round.len());
            lane.in_flight = n;
            round.extend(lane.queue.drain(..n));
        }
        round
    }

    /// Returns a round's outcomes to the lanes: what Kafka took leaves, what failed goes back to the
    /// front of its lane (before anything newer of its key) and the lane backs off.
    pub(crate) fn finish(&mut self, round: Vec<Stored>, outcomes: Vec<Outcome>, now: Instant) -> Finished {
        let mut fin = Finished::default();
        let mut failed: HashMap<LaneKey, Vec<Stored>> = HashMap::new();
        let mut keys: Vec<LaneKey> = Vec::new();
        for (s, o) in round.into_iter().zip(outcomes) {
            let k = key_of(&s);
            if !keys.contains(&k) {
                keys.push(k.clone());
            }
            self.held -= 1;
            self.held_bytes -= s.event.value.len();
            match o {
                Outcome::Published | Outcome::DeadLettered => fin.done.push((s.seq, s.received_at)),
                Outcome::Retry(_) => failed.entry(k).or_default().push(s),
            }
        }
        for k in keys {
            let Some(lane) = self.lanes.get_mut(&k) else { continue };
            lane.in_flight = 0;
            match failed.remove(&k) {
                Some(back) => {
                    fin.retried += back.len();
                    self.held += back.len();
                    self.held_bytes += back.iter().map(|s| s.event.value.len()).sum::<usize>();
                    for s in back.into_iter().rev() {
                        lane.queue.push_front(s);
                    }
                    if lane.failures == 0 {
                        fin.newly_stalled += 1;
                    }
                    lane.failures += 1;
                    let policy = self.policy;
                    let delay = lane.backoff.get_or_insert_with(|| policy.build()).next();
                    lane.not_before = Some(now + delay.unwrap_or(Duration::from_secs(30)));
                }
                None => {
                    lane.failures = 0;
                    lane.backoff = None;
                    lane.not_before = None;
                }
            }
            if lane.queue.is_empty() && lane.failures == 0 {
                self.lanes.remove(&k);
            }
        }
        fin
    }

    /// When the first lane waiting out a backoff may be sent again.
    pub(crate) fn next_due(&self) -> Option<Instant> {
        self.lanes.values().filter(|l| l.in_flight == 0 && !l.queue.is_empty()).filter_map(|l| l.not_before).min()
    }

    /// Lanes whose last round failed: keys Kafka does not take now.
    pub(crate) fn stalled(&self) -> usize {
        self.lanes.values().filter(|l| l.failures > 0).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::publish::RetryReason;
    use rdkafka::error::KafkaError;
    use rdkafka::types::RDKafkaErrorCode;

    fn stored(seq: u64, key: Option<&str>) -> Stored {
        let mut s = crate::publish::tests::stored(seq, key.unwrap_or_default(), false);
        s.event.key = key.map(str::to_owned);
        s
    }

    fn retry() -> Outcome {
        Outcome::Retry(RetryReason::Transient(KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut)))
    }

    fn seqs(v: &[Stored]) -> Vec<u64> {
        let mut s: Vec<u64> = v.iter().map(|s| s.seq).collect();
        s.sort_unstable();
        s
    }

    #[test]
    fn a_failed_key_backs_off_alone_and_keeps_its_order() {
        let mut lanes = Lanes::new();
        let t0 = Instant::now();
        for (seq, k) in [(1, "a"), (2, "b"), (3, "a")] {
            lanes.push(stored(seq, Some(k)));
        }
        let round = lanes.take_ready(t0, 100);
        assert_eq!(seqs(&round), [1, 2, 3]);
        // Key a fails (both its events), key b is taken.
        let outcomes = round.iter().map(|s| if s.seq == 2 { Outcome::Published } else { retry() }).collect();
        let fin = lanes.finish(round, outcomes, t0);
        assert_eq!(fin.done.iter().map(|d| d.0).collect::<Vec<_>>(), [2]);
        assert_eq!((fin.retried, fin.newly_stalled, lanes.stalled(), lanes.held()), (2, 1, 1, 2));
        // New events: b flows at once; a's new one waits behind a's failed ones.
        lanes.push(stored(4, Some("b")));
        lanes.push(stored(5, Some("a")));
        assert_eq!(seqs(&lanes.take_ready(t0, 100)), [4], "only the flowing key is sent during the backoff");
        let due = lanes.next_due().expect("a backs off");
        assert!(due > t0);
        let again = lanes.take_ready(due, 100);
        assert_eq!(again.iter().map(|s| s.seq).collect::<Vec<_>>(), [1, 3, 5], "a's events in order");
    }

    #[test]
    fn a_lane_in_flight_is_not_sent_twice_and_events_without_a_key_are_independent() {
        let mut lanes = Lanes::new();
        let t0 = Instant::now();
        lanes.push(stored(1, Some("a")));
        lanes.push(stored(2, None));
        lanes.push(stored(3, None));
        let first = lanes.take_ready(t0, 100);
        assert_eq!(seqs(&first), [1, 2, 3]);
        lanes.push(stored(4, Some("a")));
        assert!(lanes.take_ready(t0, 100).is_empty(), "a is in flight: 4 waits for 1's outcome");
        let outcomes = first.iter().map(|s| if s.seq == 2 { retry() } else { Outcome::Published }).collect();
        let fin = lanes.finish(first, outcomes, t0);
        assert_eq!(fin.newly_stalled, 1);
        assert_eq!(seqs(&lanes.take_ready(t0, 100)), [4], "a flows again; the failed keyless event backs off alone");
    }

    #[test]
    fn a_round_is_bounded_and_a_recovered_lane_is_forgotten() {
        let mut lanes = Lanes::new();
        let t0 = Instant::now();
        for seq in 0..10 {
            lanes.push(stored(seq, Some("a")));
        }
        let round = lanes.take_ready(t0, 4);
        assert_eq!(round.len(), 4);
        let n = round.len();
        lanes.finish(round, (0..n).map(|_| Outcome::Published).collect(), t0);
        assert_eq!((lanes.held(), lanes.held_bytes()), (6, 6 * br#"{"a":1}"#.len()));
        let rest = lanes.take_ready(t0, 100);
        let n = rest.len();
        lanes.finish(rest, (0..n).map(|_| Outcome::Published).collect(), t0);
        assert_eq!((lanes.held(), lanes.held_bytes(), lanes.stalled(), lanes.lanes.len()), (0, 0, 0, 0));
    }
}
