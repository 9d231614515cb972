//! `[spool]`: the local durable log every accepted event is written to before the 2xx.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// `spool.dedup_max_ids` when not configured.
pub const DEFAULT_DEDUP_MAX_IDS: usize = 1_000_000;

/// `[spool]`: the segment log every accepted event is written to before the 2xx.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpoolConfig {
    /// The spool's directory; one per replica, held by one process at a time.
    pub dir: PathBuf,
    /// Bytes the spool keeps on disk at most (segments, delivered events included until their
    /// segment is deleted, and the dedup journal); past it the webhook answers 503, never drops.
    pub max_bytes: u64,
    /// An event id durably stored within this window is acknowledged but not stored again (a batch
    /// Huggy sends twice), unless another batch of its stream came in between. 19–39 bytes of memory
    /// per id, and 38–76 per stream remembered.
    pub dedup_window_secs: u64,
    /// Ids the dedup window holds at most, and streams (token, type, key) it remembers at most: the
    /// ceiling of its memory. At the ceiling the oldest are forgotten early, which costs at most a
    /// duplicate record of a late re-send, never an event.
    pub dedup_max_ids: usize,
    /// A warning is logged while the oldest undelivered event is older than this (readiness does not
    /// depend on it: riding out a Kafka outage is what the spool is for; alert on
    /// `huggy_bridge_spool_oldest_age_seconds`). Above `files.token_ttl_secs`: an event may wait that
    /// long for its files.
    pub max_undelivered_age_secs: u64,
    /// Liveness fails when the spool writer has had work and made no progress for this long (the
    /// publisher: five times this, while Kafka is reachable).
    pub stall_timeout_secs: u64,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("./data/spool"),
            max_bytes: 1024 * 1024 * 1024,
            // Huggy sends a batch again when it did not get our answer, within minutes; an hour covers
            // that with room to spare at 14 MB per 100 events/s. Consumers deduplicate by ce_id anyway.
            dedup_window_secs: 3600,
            // 39 MB of ids and 76 MB of streams at most: an hour at 270 events/s.
            dedup_max_ids: DEFAULT_DEDUP_MAX_IDS,
            max_undelivered_age_secs: 900,
            stall_timeout_secs: 60,
        }
    }
}
