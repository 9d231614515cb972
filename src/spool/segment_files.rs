//! The segment files' lifecycle on disk, apart from writing frames into them: a fresh segment
//! created and made durable ([`fresh_segment`]); delivered segments deleted without holding up the
//! active segment's syncs ([`delete_segments`]), or put back on the list when they cannot go
//! ([`put_back`]); and what a crash left of a deletion removed at the next start
//! ([`remove_leftovers`]). The writer and the janitor call these; neither keeps state here.

use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};

use tracing::{error, info, warn};

use super::format;
use super::{segment_path, sync_dir, Segment, Shared};

/// Creates a new segment at `next_seq` (moving past a name in use, and past every segment this
/// spool has had: a name is never used twice, so a follower that still has a deleted segment open
/// never takes a new one for it), writes its header and `head`, and makes both and the directory
/// entry durable. Returns the file, its first seq and length.
pub(super) fn fresh_segment(shared: &Shared, next_seq: &mut u64, head: &[u8]) -> std::io::Result<(File, u64, u64)> {
    let dir = &shared.settings.dir;
    *next_seq = (*next_seq).max(shared.lock().newest_segment.saturating_add(1));
    while segment_path(dir, *next_seq).exists() {
        *next_seq += 1;
    }
    let path: PathBuf = segment_path(dir, *next_seq);
    let mut file = OpenOptions::new().create_new(true).append(true).open(&path)?;
    let mut bytes = format::segment_header().to_vec();
    bytes.extend_from_slice(head);
    let io = &shared.settings.io;
    let made = io.write_all(&mut file, &bytes).and_then(|()| io.sync_data(&file)).and_then(|()| sync_dir(dir));
    if let Err(e) = made {
        let _ = fs::remove_file(&path);
        return Err(e);
    }
    shared.lock().newest_segment = *next_seq;
    Ok((file, *next_seq, bytes.len() as u64))
}

/// Bytes an unlinked segment is cut by at a time.
const SHRINK_STEP: u64 = 4 * 1024 * 1024;

/// Deletes `victims`, oldest first, and takes their bytes off `disk_bytes`; returns whether it
/// deleted them all. Each is renamed out of the segments' names, then cut down a few MiB at a time
/// and unlinked: freeing a large file's blocks in one go holds the file system's journal for
/// milliseconds, and every `fdatasync` of the active segment waits for it. (Renamed before it is
/// cut: a crash meanwhile leaves a `.deleting` file the next start removes, never a cut segment
/// that recovery would report as damage.) A segment that cannot be renamed goes back on the list,
/// counted, with every newer victim, and deletion is tried again after a later group.
pub(super) fn delete_segments(shared: &Shared, victims: Vec<Segment>) -> bool {
    let mut victims = victims.into_iter();
    while let Some(victim) = victims.next() {
        // Renamed out of the segments' names first: a crash while it is cut down leaves a file the
        // next start removes, never a cut segment.
        let doomed = victim.path.with_extension("deleting");
        match fs::rename(&victim.path, &doomed) {
            Ok(()) => shrink_and_remove(&doomed),
            // Already gone: nothing to cut, its bytes are no longer on disk.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                error!(segment = %victim.path.display(), bytes = victim.size, error = %e,
                    "spool: a delivered segment could not be deleted; it and the newer ones stay (counted) and deletion is tried again");
                put_back(shared, std::iter::once(victim).chain(victims).collect());
                return false;
            }
        }
        let mut st = shared.lock();
        st.disk_bytes = st.disk_bytes.saturating_sub(victim.size);
        // Its seqs are gone for good: the index forgets them (not those of a victim still to go,
        // which may yet be put back).
        let floor = victims.as_slice().first().or(st.segments.front()).map_or(u64::MAX, |s| s.first_seq);
        st.undelivered.raise_floor(floor);
    }
    true
}

/// Puts segments taken off the list for deletion back at its front, in order.
pub(super) fn put_back(shared: &Shared, victims: Vec<Segment>) {
    let mut st = shared.lock();
    for v in victims.into_iter().rev() {
        st.segments.push_front(v);
    }
}

/// Removes what deletions cut short by a crash left in `dir` (`segment-….deleting`).
pub(super) fn remove_leftovers(dir: &Path) -> std::io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if name.starts_with("segment-") && name.ends_with(".deleting") {
            info!(path = %path.display(), "spool: removing a segment whose deletion a crash cut short");
            shrink_and_remove(&path);
        }
    }
    Ok(())
}

/// Cuts `path` down a few MiB at a time to nothing, then unlinks it (best effort: it is no segment
/// any more). Cut to nothing, its room is free even while a reader still has it open.
fn shrink_and_remove(path: &Path) {
    if let Ok(file) = OpenOptions::new().write(true).open(path) {
        let mut len = file.metadata().map_or(0, |m| m.len());
        while len > 0 {
            len = len.saturating_sub(SHRINK_STEP);
            if file.set_len(len).is_err() {
                break;
            }
        }
    }
    if let Err(e) = fs::remove_file(path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            warn!(path = %path.display(), error = %e, "spool: a deleted segment's file could not be removed; the next start tries again");
        }
    }
}
