//! Publishing: events to Kafka records (topic, key, CloudEvents headers), delivery with retries,
//! dead-lettering of what Kafka can never take, and the loop that drains the spool.
//!
//! - `routes`: which topic a record goes to; `headers`: what it carries besides Huggy's bytes.
//! - `publisher`: the `Publisher`, which sends records and awaits them; `guard` keeps a panic in
//!   publishing from stopping it, [`claim`] sends what is too large for its topic as a claim check,
//!   `stale` notices a producer the broker lost track of.
//! - `follower`: the loop that drains the spool through its publish feed, one lane per key (`lanes`).
//! - `reachability`: the Kafka probe (stage `kafka_probe`), which keeps the health's Kafka state true.
//! - [`kafka`]: the clients' setup, topic provisioning, the embedded broker, error classification.

pub mod claim;
mod follower;
mod guard;
mod headers;
pub mod kafka;
mod lanes;
mod publisher;
mod reachability;
mod routes;
mod stale;

use rdkafka::error::KafkaError;

pub(crate) use follower::{
    run_spool_publisher, Stops, HELD_PER_WINDOW, PARKED_PER_WINDOW, PARKED_URL_BYTES, WINDOW_BYTES,
};
pub use guard::Poison;
use headers::headers;
pub(crate) use publisher::Publisher;
pub(crate) use reachability::watch_kafka;
pub(crate) use routes::Routes;

/// Why an event was not written this time; it is tried again.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum RetryReason {
    #[error("kafka did not take the record now: {0}")]
    Transient(#[source] KafkaError),
    /// An ACL is missing: the operator's mistake, never the event's; retried, not dead-lettered.
    #[error("not authorized (check the ACLs; the event is kept and retried): {0}")]
    Authorization(#[source] KafkaError),
    #[error("the producer failed fatally; a fresh producer takes the record: {0}")]
    Fatal(#[source] KafkaError),
    #[error("the producer failed fatally and a fresh one could not be created: {0}")]
    Recreate(#[source] KafkaError),
    #[error("the dead-letter topic did not take the event: {0}")]
    DeadLetter(#[source] KafkaError),
    #[error("the delivery report was lost: the producer was closed")]
    Closed,
    #[error("publishing panicked, and so did dead-lettering the event: {0}")]
    Panicked(String),
    /// Too large for its topic, and its claim check could not be stored (the file store failed).
    #[error("too large for its topic and not stored as a claim check: {0}")]
    ClaimCheck(String),
    /// Not sent: an earlier event of its key in the same round could not be sent, and it must not
    /// overtake it.
    #[error("held back behind an earlier event of its key that could not be sent")]
    Behind,
}

/// How one event ended up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    Published,
    DeadLettered,
    /// Not written; worth trying again later.
    Retry(RetryReason),
}

#[cfg(test)]
mod tests;
