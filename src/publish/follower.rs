//! The spool publisher: the follower that drains the spool into Kafka, one lane per key, and
//! acknowledges what Kafka took.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt as _};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::{kafka, lanes, Outcome, Publisher};
use crate::clock::now_secs;
use crate::event::Event;
use crate::metrics::Metrics;
use crate::spool::{Ahead, Batch, Position, PublishFeed, Reader, Stored};

/// When the spool publisher stops: `soft` after its current window, `hard` at once.
#[derive(Clone)]
pub(crate) struct Stops {
    pub(crate) soft: CancellationToken,
    pub(crate) hard: CancellationToken,
}

/// Bytes of event values the spool publisher holds at most (plus one event; events parked for their
/// files are kept without theirs), whatever `kafka.max_in_flight_records` allows: a window of large events cannot take the
/// memory that many small ones would not (see `memory`).
pub(crate) const WINDOW_BYTES: usize = 32 * 1024 * 1024;

/// Events parked for their files per publishing window (`kafka.max_in_flight_records`) at most,
/// kept without their bytes (an event's struct and its URLs, [`PARKED_URL_BYTES`] of URLs in all):
/// apart from the window's places, so that keys waiting for their files hold back no other key.
pub(crate) const PARKED_PER_WINDOW: usize = 8;
/// Bytes of the URLs of parked events at most (see [`PARKED_PER_WINDOW`]).
pub(crate) const PARKED_URL_BYTES: usize = 8 * 1024 * 1024;

/// Rounds of lanes being published at once: a round holding a record Kafka cannot take now waits
/// for its delivery timeout, and the others go on meanwhile.
const ROUNDS_IN_FLIGHT: usize = 4;
/// Events held per publishing window (`kafka.max_in_flight_records`): room for the lanes of keys that
/// wait out a backoff besides the window that flows. Their bytes stay within [`WINDOW_BYTES`].
pub(crate) const HELD_PER_WINDOW: usize = 4;

/// How long a round may take before it counts as hung (liveness): librdkafka reports every record
/// within its message timeout, so a round past that and a margin is one that will not end.
const ROUND_DEADLINE: Duration = Duration::from_millis(kafka::SPOOL_MESSAGE_TIMEOUT_MS + 30_000);

type Round = std::pin::Pin<Box<dyn std::future::Future<Output = (u64, Vec<Stored>, Vec<Outcome>)> + Send>>;

/// Drains the spool into Kafka until cancelled: reads undelivered events in sequence order, holds
/// them in one lane per key ([`lanes`]), publishes rounds of lanes (up to `window` events each,
/// [`ROUNDS_IN_FLIGHT`] at once), acknowledges what Kafka took, and puts what it did not back at the
/// front of its lane, which waits out its own exponential backoff: a key Kafka will not take stalls
/// only itself, in order.
///
/// An event whose files are still being captured is parked, and so is every later event with the
/// same key (order per key); events of other keys go on. Parked events go first once ready. The
/// results are read from the log, where they follow their event: by the reader as it goes, or,
/// while parked events fill its budget, by a look-ahead that reads only results ([`Ahead`]).
///
/// The pulse beats while every round in flight is younger than [`ROUND_DEADLINE`] (a round waiting
/// on an unwritable partition ends within the message timeout): a round that never ends (a
/// producer that stopped reporting) silences it, and liveness says so.
pub(crate) async fn run_spool_publisher(
    spool: PublishFeed,
    publisher: Arc<Publisher>,
    window: usize,
    metrics: Arc<Metrics>,
    stops: Stops,
    pulse: Arc<crate::health::Pulse>,
) {
    let Stops { soft: stop, hard } = stops;
    let mut reader = spool.reader();
    let committed = spool.committed();
    let mut lanes = lanes::Lanes::new();
    let mut rounds: FuturesUnordered<Round> = FuturesUnordered::new();
    let mut parked: Vec<Stored> = Vec::new();
    // Where each parked event kept without its bytes is in the log.
    let mut stripped: HashMap<u64, Position> = HashMap::new();
    let mut ahead: Option<Ahead> = None;
    let mut read_again_at: Option<tokio::time::Instant> = None;
    let mut started: HashMap<u64, tokio::time::Instant> = HashMap::new();
    let mut next_round: u64 = 0;
    loop {
        if started.values().all(|t| t.elapsed() < ROUND_DEADLINE) {
            pulse.beat();
        }
        if rounds.is_empty() && stop.is_cancelled() {
            break;
        }
        let notified = committed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if !stop.is_cancelled() && read_again_at.is_none_or(|t| t <= tokio::time::Instant::now()) {
            read_again_at = None;
            // Parked events hold neither the window's places nor its bytes (they are kept without
            // their bytes, under a budget of their own): a key waiting for its files holds back no
            // other key, unless more events wait for their files at once than that budget.
            let room =
                if parked_full(&parked, window) { 0 } else { (window * HELD_PER_WINDOW).saturating_sub(lanes.held()) };
            let room_bytes = WINDOW_BYTES.saturating_sub(lanes.held_bytes());
            let wanted: HashSet<u64> = parked.iter().filter(|s| !s.event.files.is_empty()).map(|s| s.seq).collect();
            let read = if room > 0 && room_bytes > 0 {
                // Events read now may be waiting for results the look-ahead has passed: it starts
                // again from the reader.
                ahead = None;
                reader.read_now(room, room_bytes, &wanted)
            } else if !wanted.is_empty() {
                look_ahead(&reader, &mut ahead, &wanted).map(|files| Batch { files, ..Batch::default() })
            } else {
                Ok(Batch::default())
            };
            match read {
                Ok(batch) => {
                    let mut found = first_results(batch.files);
                    let fresh_at: HashMap<u64, Position> =
                        batch.events.iter().zip(batch.at).map(|(s, at)| (s.seq, at)).collect();
                    let held = std::mem::take(&mut parked).into_iter().chain(batch.events).map(|mut s| {
                        attach(&mut s, &mut found);
                        s
                    });
                    let (ready, still_parked) =
                        release(held, |seq| spool.unwritten_file_results(seq), |s| restore(&reader, &mut stripped, s));
                    parked = still_parked;
                    for s in &mut parked {
                        if let Some(at) = fresh_at.get(&s.seq) {
                            // Parked without its bytes: they are read again when it is released.
                            s.event.value = Vec::new();
                            stripped.insert(s.seq, *at);
                        }
                    }
                    for s in ready {
                        lanes.push(s);
                    }
                    // The reader cannot take more events while some wait for their files: look
                    // ahead for their results at once, and again until the look-ahead is at the
                    // committed end (then a commit wakes it).
                    let full = parked_full(&parked, window)
                        || window * HELD_PER_WINDOW <= lanes.held()
                        || WINDOW_BYTES <= lanes.held_bytes();
                    let waiting = parked.iter().any(|s| !s.event.files.is_empty());
                    if full && waiting && ahead.as_ref().is_none_or(|a| !a.at_end()) {
                        read_again_at = Some(tokio::time::Instant::now());
                    }
                }
                Err(e) => {
                    error!(error = %e, "spool read failed; retrying");
                    read_again_at = Some(tokio::time::Instant::now() + Duration::from_secs(1));
                }
            }
            while rounds.len() < ROUNDS_IN_FLIGHT {
                let round = lanes.take_ready(tokio::time::Instant::now(), window);
                if round.is_empty() {
                    break;
                }
                let publisher = publisher.clone();
                let id = next_round;
                next_round += 1;
                started.insert(id, tokio::time::Instant::now());
                rounds.push(Box::pin(async move {
                    let refs: Vec<&Event> = round.iter().map(|s| &s.event).collect();
                    let outcomes = publisher.publish_guarded(&refs).await;
                    (id, round, outcomes)
                }));
            }
        }
        metrics.publish_stalled_keys.set(lanes.stalled() as i64);
        // Wake for: a round done, new events or file results (the feed announces both as commits),
        // a lane's backoff over, a read to retry.
        let due = if rounds.len() < ROUNDS_IN_FLIGHT { lanes.next_due() } else { None };
        // While it holds work (rounds waiting on librdkafka, events parked for their files), the
        // pulse beats every second so that liveness can tell waiting from stuck; nothing is polled.
        let pulse_at =
            (!parked.is_empty() || !rounds.is_empty()).then(|| tokio::time::Instant::now() + Duration::from_secs(1));
        let wake_at = [due, read_again_at, pulse_at].into_iter().flatten().min();
        tokio::select! {
            Some((id, round, outcomes)) = rounds.next(), if !rounds.is_empty() => {
                started.remove(&id);
                settle(&spool, &metrics, &mut lanes, round, outcomes).await;
            }
            () = &mut notified, if !stop.is_cancelled() => {}
            () = tokio::time::sleep_until(wake_at.unwrap_or_else(tokio::time::Instant::now)), if wake_at.is_some() && !stop.is_cancelled() => {}
            () = stop.cancelled(), if !stop.is_cancelled() => {
                if !rounds.is_empty() || lanes.held() > 0 {
                    info!(in_flight = rounds.len(), held = lanes.held(), "stopping: finishing the rounds in flight; the rest stays in the spool");
                }
            }
            () = hard.cancelled() => {
                info!(rounds = rounds.len(), "shutdown while publishing; unacknowledged records stay in the spool");
                return;
            }
        }
    }
}

/// Acknowledges what a round got into Kafka and returns the rest to its lanes.
async fn settle(
    spool: &PublishFeed,
    metrics: &Metrics,
    lanes: &mut lanes::Lanes,
    round: Vec<Stored>,
    outcomes: Vec<Outcome>,
) {
    for (s, o) in round.iter().zip(&outcomes) {
        if let Outcome::Retry(why) = o {
            debug!(event_id = %s.event.id, %why, "publish will be retried");
        }
    }
    let first_failure = round.iter().zip(&outcomes).find_map(|(s, o)| match o {
        Outcome::Retry(why) => Some((s.event.id, why.to_string())),
        _ => None,
    });
    let fin = lanes.finish(round, outcomes, tokio::time::Instant::now());
    let now = now_secs();
    for (_, received_at) in &fin.done {
        metrics.ack_latency.observe((now - received_at).max(0) as f64);
    }
    spool.ack(fin.done.iter().map(|d| d.0).collect()).await;
    if fin.retried > 0 {
        metrics.publish_retries.inc_by(fin.retried as u64);
        if let Some((event_id, why)) = first_failure {
            warn!(
                records = fin.retried,
                %event_id,
                reason = %why,
                stalled_keys = lanes.stalled(),
                newly_stalled = fin.newly_stalled,
                "publishing failed; these keys back off and are retried, the others go on"
            );
        }
    }
}

/// Reads ahead of `reader` for the file results of the `wanted` events (the ones it holds), from
/// where the last look-ahead stopped or, when there was none since the reader last read, from the
/// reader on.
fn look_ahead(
    reader: &Reader,
    ahead: &mut Option<Ahead>,
    wanted: &HashSet<u64>,
) -> Result<Vec<(u64, Vec<u8>)>, crate::spool::SpoolError> {
    let from = reader.position();
    let a = match ahead {
        Some(a) if a.position() >= from => a,
        _ => ahead.insert(reader.ahead(from)),
    };
    a.results(wanted)
}

/// Whether the events parked for their files fill their budget ([`PARKED_PER_WINDOW`],
/// [`PARKED_URL_BYTES`]): then the reader takes no more events.
fn parked_full(parked: &[Stored], window: usize) -> bool {
    parked.len() >= window.saturating_mul(PARKED_PER_WINDOW)
        || parked.iter().map(|s| s.event.files.iter().map(String::len).sum::<usize>()).sum::<usize>()
            >= PARKED_URL_BYTES
}

/// Gives a parked event kept without its bytes its bytes again, read from the log, before it is
/// published; `false` (logged) when they cannot be read now: it stays parked, and so do the later
/// events of its key.
fn restore(reader: &Reader, stripped: &mut HashMap<u64, Position>, s: &mut Stored) -> bool {
    let Some(at) = stripped.get(&s.seq).copied() else { return true };
    match reader.event_at(at) {
        Ok(again) if again.seq == s.seq => {
            s.event.value = again.event.value;
            stripped.remove(&s.seq);
            true
        }
        Ok(again) => {
            error!(seq = s.seq, found = again.seq, "a parked event's frame holds another event; it stays parked");
            false
        }
        Err(e) => {
            error!(seq = s.seq, error = %e, "a parked event's bytes could not be read again; it stays parked and is tried again");
            false
        }
    }
}

/// Results read from the log, by event: an event captured again after a restart has two there,
/// and the first one is what its record carries.
fn first_results(files: Vec<(u64, Vec<u8>)>) -> HashMap<u64, Vec<u8>> {
    let mut found = HashMap::new();
    for (seq, results) in files {
        found.entry(seq).or_insert(results);
    }
    found
}

/// Gives an event waiting for its files the results read for it, beside its untouched value.
fn attach(s: &mut Stored, found: &mut HashMap<u64, Vec<u8>>) {
    if s.event.files.is_empty() {
        return;
    }
    if let Some(results) = found.remove(&s.seq) {
        s.event.file_results = Some(String::from_utf8_lossy(&results).into_owned());
        s.event.files.clear();
    }
}

/// Splits events (in sequence order) into those ready to publish — with their file results for
/// header `huggy_bridge_files` — and those that must wait: files not captured yet, or an earlier event of the same key
/// still waiting.
fn release(
    events: impl Iterator<Item = Stored>,
    files_result: impl Fn(u64) -> Option<Vec<u8>>,
    mut restore: impl FnMut(&mut Stored) -> bool,
) -> (Vec<Stored>, Vec<Stored>) {
    let mut blocked: HashSet<String> = HashSet::new();
    let (mut ready, mut parked) = (Vec::new(), Vec::new());
    for mut s in events {
        if s.event.key.as_ref().is_some_and(|k| blocked.contains(k)) {
            parked.push(s);
            continue;
        }
        if !s.event.files.is_empty() {
            match files_result(s.seq) {
                Some(results) => {
                    s.event.file_results = Some(String::from_utf8_lossy(&results).into_owned());
                    s.event.files.clear();
                }
                None => {
                    if let Some(k) = &s.event.key {
                        blocked.insert(k.clone());
                    }
                    parked.push(s);
                    continue;
                }
            }
        }
        if !restore(&mut s) {
            if let Some(k) = &s.event.key {
                blocked.insert(k.clone());
            }
            parked.push(s);
            continue;
        }
        ready.push(s);
    }
    (ready, parked)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::publish::tests::stored;

    fn seqs(v: &[Stored]) -> Vec<u64> {
        v.iter().map(|s| s.seq).collect()
    }

    #[test]
    fn release_parks_an_event_waiting_for_files_and_every_later_event_of_its_key() {
        let events = vec![stored(1, "chat-a", true), stored(2, "chat-b", false), stored(3, "chat-a", false)];
        let (ready, parked) = release(events.into_iter(), |_| None, |_| true);
        assert_eq!(seqs(&ready), [2], "other keys go on");
        assert_eq!(seqs(&parked), [1, 3], "the key waits behind its first event, in order");
    }

    #[test]
    fn release_attaches_the_file_results_beside_the_untouched_value() {
        let events = vec![stored(1, "chat-a", true), stored(2, "chat-a", false)];
        let (ready, parked) =
            release(events.into_iter(), |seq| (seq == 1).then(|| br#"[{"status":"stored"}]"#.to_vec()), |_| true);
        assert!(parked.is_empty());
        assert_eq!(seqs(&ready), [1, 2]);
        assert_eq!(ready[0].event.value, br#"{"a":1}"#.to_vec(), "the value is Huggy's bytes");
        assert_eq!(ready[0].event.file_results.as_deref(), Some(r#"[{"status":"stored"}]"#));
        assert!(ready[0].event.files.is_empty(), "files are not captured twice");
        assert_eq!(ready[1].event.file_results, None);
    }

    #[test]
    fn release_keeps_a_later_event_parked_behind_an_earlier_parked_one_of_its_key() {
        // Event 2 has its files, but event 1 of the same key does not yet: 2 must not overtake 1.
        let events = vec![stored(1, "k", true), stored(2, "k", true), stored(3, "other", true)];
        let (ready, parked) = release(events.into_iter(), |seq| (seq != 1).then(|| b"[]".to_vec()), |_| true);
        assert_eq!(seqs(&ready), [3]);
        assert_eq!(seqs(&parked), [1, 2]);
    }

    #[test]
    fn the_first_results_in_the_log_win() {
        let found = first_results(vec![(7, b"stored".to_vec()), (8, b"x".to_vec()), (7, b"expired".to_vec())]);
        assert_eq!(found[&7], b"stored".to_vec());
        assert_eq!(found.len(), 2);
    }
}
