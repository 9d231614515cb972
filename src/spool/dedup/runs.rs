//! The streams' runs snapshot: what each dedup stream last carried ([`StreamRuns`]), saved by a
//! clean shutdown ([`save_runs`]) and read and deleted at the next start ([`take_runs`]), so that a
//! batch re-sent across a restart is still told from a state that returns.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::Path;

use tracing::{info, warn};

use crate::event::StreamRuns;

/// The streams' last runs ([`StreamRuns`]) saved by a clean shutdown, for the next start: without
/// them every stream is unknown after a restart, and a batch re-sent across it is published again.
/// Read once and deleted (durably) before anything is accepted, so a later crash can never bring
/// back runs that newer batches have replaced — that could answer a returning state as a re-send.
pub(super) const RUNS_SNAPSHOT: &str = "dedup-runs.snapshot";
const RUNS_MAGIC: &[u8; 8] = b"HUGGYRUN";
const RUNS_VERSION: u32 = 1;
/// Magic, version, time saved (i64), count (u64).
pub(super) const RUNS_HEADER: usize = 28;

/// Saves `runs` at `now` (a clean shutdown): written aside, synced, renamed into place.
///
/// # Errors
/// The file could not be written or synced; the next start then knows no stream (re-sends across
/// the restart become duplicates).
pub(in crate::spool) fn save_runs(dir: &Path, runs: &StreamRuns, now: i64) -> io::Result<()> {
    let entries: Vec<([u8; 16], [u8; 16])> = runs.entries().collect();
    let mut buf = Vec::with_capacity(RUNS_HEADER + entries.len() * 32 + 4);
    buf.extend_from_slice(RUNS_MAGIC);
    buf.extend_from_slice(&RUNS_VERSION.to_le_bytes());
    buf.extend_from_slice(&now.to_le_bytes());
    buf.extend_from_slice(&(entries.len() as u64).to_le_bytes());
    for (stream, run) in &entries {
        buf.extend_from_slice(stream);
        buf.extend_from_slice(run);
    }
    let crc = crc32fast::hash(&buf);
    buf.extend_from_slice(&crc.to_le_bytes());
    let tmp = dir.join(format!("{RUNS_SNAPSHOT}.tmp"));
    let mut f = File::create(&tmp)?;
    f.write_all(&buf)?;
    f.sync_data()?;
    fs::rename(&tmp, dir.join(RUNS_SNAPSHOT))?;
    File::open(dir)?.sync_all()
}

/// Loads the runs a clean shutdown saved into `runs` (nothing when there is no snapshot, it is
/// damaged, or older than the window), then deletes the snapshot durably. If it cannot be deleted
/// durably, nothing is loaded.
pub(in crate::spool) fn take_runs(dir: &Path, runs: &mut StreamRuns, window: i64, now: i64) {
    let path = dir.join(RUNS_SNAPSHOT);
    let _ = fs::remove_file(dir.join(format!("{RUNS_SNAPSHOT}.tmp")));
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return,
        Err(e) => {
            warn!(path = %path.display(), error = %e, "dedup runs snapshot unreadable; ignored (a batch re-sent across the restart may be published twice)");
            Vec::new()
        }
    };
    let removed = fs::remove_file(&path).and_then(|()| File::open(dir)?.sync_all());
    if let Err(e) = removed {
        warn!(path = %path.display(), error = %e, "dedup runs snapshot cannot be deleted; ignored (a batch re-sent across the restart may be published twice)");
        return;
    }
    match parse_runs(&bytes) {
        Some((saved_at, entries)) if now.saturating_sub(saved_at) < window => {
            for (stream, run) in entries {
                runs.record(stream, run, now);
            }
            info!(streams = runs.len(), "dedup runs of the last clean shutdown loaded");
        }
        Some(_) => {}
        None if bytes.is_empty() => {}
        None => {
            warn!(path = %path.display(), "dedup runs snapshot damaged; ignored (a batch re-sent across the restart may be published twice)")
        }
    }
}

type RunEntries = Vec<([u8; 16], [u8; 16])>;

fn parse_runs(bytes: &[u8]) -> Option<(i64, RunEntries)> {
    let body = bytes.get(..bytes.len().checked_sub(4)?)?;
    let crc = u32::from_le_bytes(bytes[body.len()..].try_into().ok()?);
    if crc32fast::hash(body) != crc || body.get(..8)? != RUNS_MAGIC {
        return None;
    }
    if u32::from_le_bytes(body.get(8..12)?.try_into().ok()?) != RUNS_VERSION {
        return None;
    }
    let saved_at = i64::from_le_bytes(body.get(12..20)?.try_into().ok()?);
    let count = usize::try_from(u64::from_le_bytes(body.get(20..28)?.try_into().ok()?)).ok()?;
    let rest = body.get(RUNS_HEADER..)?;
    if rest.len() != count.checked_mul(32)? {
        return None;
    }
    let entries = rest
        .chunks_exact(32)
        .map(|c| {
            let (mut stream, mut run) = ([0u8; 16], [0u8; 16]);
            stream.copy_from_slice(&c[..16]);
            run.copy_from_slice(&c[16..]);
            (stream, run)
        })
        .collect();
    Some((saved_at, entries))
}
