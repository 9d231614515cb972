//! `huggy-bridge spool status`: what a spool holds, read without writing to it (no truncation, no
//! copies, no dedup), under its lock, while no daemon runs on it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::dedup;
use super::lock;
use super::recovery::{self, RecoveryReport};
use super::SpoolError;
use crate::clock::now_secs;

/// What `huggy-bridge spool status` shows: read without changing anything, under the lock.
#[derive(Debug, Clone, serde::Serialize)]
pub struct OfflineStatus {
    /// The spool directory read.
    pub dir: PathBuf,
    /// Events not yet acknowledged by Kafka.
    pub undelivered_events: u64,
    /// Their bytes.
    pub undelivered_bytes: u64,
    /// Undelivered events by type.
    pub by_type: BTreeMap<String, u64>,
    oldest_received_at: Option<i64>,
    /// Age of the oldest undelivered event, in seconds; `None` when there is none.
    pub oldest_age_secs: Option<i64>,
    /// Undelivered events still waiting for their files.
    pub pending_file_captures: usize,
    /// Segment files.
    pub segments: usize,
    /// Bytes on disk (segments and the dedup journal).
    pub disk_bytes: u64,
    /// What reading the segments found: torn tails, damaged regions, events lost.
    pub damage: RecoveryReport,
}

/// Reads a spool without writing to it (no truncation, no copies, no dedup), holding its lock
/// meanwhile.
///
/// # Errors
/// The directory is held by another process, or cannot be read.
pub fn offline_status(dir: &Path) -> Result<OfflineStatus, SpoolError> {
    if !dir.is_dir() {
        return Err(SpoolError::Io(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("no spool directory at {}", dir.display()),
        )));
    }
    let _lock = lock::DirLock::acquire(dir)?;
    let now = now_secs();
    let mut dedup = dedup::Dedup::new(dir, 0, 1);
    let r = recovery::recover(dir, recovery::Access::ReadOnly, &mut dedup, now)?;
    let tally = recovery::tally(&r)?;
    let oldest = tally.oldest_received_at;
    Ok(OfflineStatus {
        dir: dir.to_owned(),
        undelivered_events: r.undelivered.len(),
        undelivered_bytes: tally.bytes,
        by_type: tally.by_type,
        oldest_received_at: oldest,
        oldest_age_secs: oldest.map(|at| (now - at).max(0)),
        pending_file_captures: r.files_pending,
        segments: r.segments.len(),
        disk_bytes: r.disk_bytes + dedup::journal_bytes(dir),
        damage: r.report,
    })
}
