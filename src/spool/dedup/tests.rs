use std::fs;

use super::journal::{list_journal, BLOCK_HEADER, LEGACY_MAGIC, LEGACY_SNAPSHOT, LEGACY_VERSION, SYNC_EVERY_IDS};
use super::runs::{RUNS_HEADER, RUNS_SNAPSHOT};
use super::*;
use crate::event::StreamRuns;

fn id(n: u64) -> EventId {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&n.wrapping_mul(0x9E37_79B9_7F4A_7C15).to_le_bytes());
    b[8..].copy_from_slice(&n.to_le_bytes());
    EventId(b)
}

/// A window of 800 s (slices of 100 s) with its journal opened at `now`.
fn opened(dir: &Path, now: i64) -> (Dedup, Journal) {
    let mut d = Dedup::new(dir, 800, usize::MAX);
    let j = Journal::open(&mut d, now);
    (d, j)
}

#[test]
fn ids_expire_with_their_slice_and_survive_in_the_journal() {
    let dir = tempfile::tempdir().unwrap();
    let (mut d, mut j) = opened(dir.path(), 1500);
    d.insert(id(1), 1000, 1000);
    d.insert(id(2), 1500, 1500);
    assert!(d.contains(&id(1), 1500) && d.contains(&id(2), 1500));
    j.append(&[(id(1), 1000), (id(2), 1500)], 1500).unwrap();
    j.sync(1500).unwrap();
    assert_eq!(j.bytes(), 2 * (BLOCK_HEADER as u64 + 16), "one block per slice");
    drop(j);
    let (mut again, mut j) = opened(dir.path(), 1500);
    assert!(again.contains(&id(1), 1500) && again.contains(&id(2), 1500) && !again.contains(&id(3), 1500));
    // 1000 falls out of an 800 s window by 1900 (+ one slice of 100 s at most); so does its file.
    again.expire(2001);
    assert!(!again.contains(&id(1), 2001));
    assert!(again.contains(&id(2), 2001));
    j.expire(2001);
    assert_eq!(j.bytes(), BLOCK_HEADER as u64 + 16);
    assert_eq!(list_journal(dir.path()).unwrap().len(), 1);
    drop(j);
    let (again, _j) = opened(dir.path(), 2001);
    assert!(!again.contains(&id(1), 2001) && again.contains(&id(2), 2001));
}

#[test]
fn a_damaged_block_costs_its_own_ids_only() {
    let dir = tempfile::tempdir().unwrap();
    let (_, mut j) = opened(dir.path(), 1000);
    for n in 0..3 {
        j.append(&[(id(n), 1000)], 1000).unwrap();
    }
    j.sync(1000).unwrap();
    let (_, p) = list_journal(dir.path()).unwrap().remove(0);
    let mut bytes = fs::read(&p).unwrap();
    let block = BLOCK_HEADER + 16;
    bytes[block + BLOCK_HEADER + 3] ^= 0xff; // an id byte of the second block
    bytes.extend_from_within(..block - 5); // and a torn block at the end
    fs::write(&p, bytes).unwrap();
    let (again, mut j) = opened(dir.path(), 1000);
    assert!(again.contains(&id(0), 1000) && !again.contains(&id(1), 1000) && again.contains(&id(2), 1000));
    // Appends after the torn block are read again at the next start.
    j.append(&[(id(7), 1000)], 1000).unwrap();
    j.sync(1000).unwrap();
    drop(j);
    let (again, _j) = opened(dir.path(), 1000);
    assert!(again.contains(&id(7), 1000) && again.contains(&id(2), 1000));
}

#[test]
fn after_a_failed_sync_the_ids_since_the_last_good_one_go_into_a_fresh_file() {
    let dir = tempfile::tempdir().unwrap();
    let (_, mut j) = opened(dir.path(), 1000);
    j.append(&[(id(1), 1000)], 1000).unwrap();
    j.sync(1000).unwrap();
    j.append(&[(id(2), 1000)], 1000).unwrap();
    // What a failed sync does to the file it failed on, and to the ids since the last good one.
    j.files.values_mut().for_each(|f| {
        f.broken = true;
        f.file = None;
    });
    j.retry = std::mem::take(&mut j.unsynced);
    j.sync(1000).unwrap();
    let names: Vec<_> = list_journal(dir.path()).unwrap().into_iter().map(|(k, _)| k).collect();
    assert_eq!(names, vec![(1000, 100, 0), (1000, 100, 1)], "a second generation of the slice");
    assert_eq!(j.bytes(), 3 * (BLOCK_HEADER as u64 + 16), "id 2 written again");
    drop(j);
    let (d, _j) = opened(dir.path(), 1000);
    assert!(d.contains(&id(1), 1000) && d.contains(&id(2), 1000));
}

#[test]
fn the_journal_syncs_on_its_own_after_many_ids() {
    let dir = tempfile::tempdir().unwrap();
    let (_, mut j) = opened(dir.path(), 1000);
    let ids: Vec<_> = (0..SYNC_EVERY_IDS as u64).map(|n| (id(n), 1000)).collect();
    j.append(&ids[..10], 1000).unwrap();
    assert!(!j.sync_due());
    j.append(&ids[10..], 1000).unwrap();
    assert!(j.sync_due());
    j.sync(1000).unwrap();
    assert!(!j.sync_due() && j.unsynced.is_empty());
}

#[test]
fn an_earlier_builds_snapshot_moves_into_the_journal() {
    let dir = tempfile::tempdir().unwrap();
    // Version 1 of `dedup.snapshot`: magic, version, slices (start, count, ids), CRC-32.
    let mut snap = LEGACY_MAGIC.to_vec();
    snap.extend_from_slice(&LEGACY_VERSION.to_le_bytes());
    snap.extend_from_slice(&1u32.to_le_bytes());
    snap.extend_from_slice(&1000i64.to_le_bytes());
    snap.extend_from_slice(&2u32.to_le_bytes());
    snap.extend_from_slice(&id(1).0);
    snap.extend_from_slice(&id(2).0);
    let crc = crc32fast::hash(&snap);
    snap.extend_from_slice(&crc.to_le_bytes());
    fs::write(dir.path().join(LEGACY_SNAPSHOT), snap).unwrap();
    let (d, j) = opened(dir.path(), 1000);
    assert!(d.contains(&id(1), 1000) && d.contains(&id(2), 1000));
    assert!(!dir.path().join(LEGACY_SNAPSHOT).exists());
    assert!(j.bytes() > 0);
    drop(j);
    let (d, _j) = opened(dir.path(), 1000);
    assert!(d.contains(&id(1), 1000) && d.contains(&id(2), 1000));
}

#[test]
fn a_disabled_window_deletes_the_journal() {
    let dir = tempfile::tempdir().unwrap();
    let (_, mut j) = opened(dir.path(), 1000);
    j.append(&[(id(1), 1000)], 1000).unwrap();
    j.sync(1000).unwrap();
    let mut off = Dedup::new(dir.path(), 0, usize::MAX);
    let j = Journal::open(&mut off, 1000);
    assert_eq!(j.bytes(), 0);
    assert!(list_journal(dir.path()).unwrap().is_empty());
}

#[test]
fn bytes_per_id_stay_within_the_documented_bound() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Dedup::new(dir.path(), 3600, usize::MAX);
    let n = 360_000u64;
    for i in 0..n {
        d.insert(id(i), 10_000 + i64::try_from(i / 100).unwrap(), 10_000 + i64::try_from(i / 100).unwrap());
    }
    assert_eq!(d.len(), n as usize);
    let per_id = d.heap_bytes() as f64 / n as f64;
    assert!((17.0..=MAX_BYTES_PER_ID as f64).contains(&per_id), "{per_id} bytes per id");
}

#[test]
fn at_the_ceiling_the_oldest_slice_is_forgotten_and_memory_stops_growing() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Dedup::new(dir.path(), 800, 1000);
    for n in 0..600 {
        d.insert(id(n), 100, 100);
    }
    for n in 600..1200 {
        d.insert(id(n), 300, 300);
    }
    assert!(d.len() <= 1000, "{} ids held", d.len());
    assert!(!d.contains(&id(0), 300), "the oldest slice went first");
    assert!(d.contains(&id(1199), 300), "the newest ids are kept");
    for n in 1200..5000 {
        d.insert(id(n), 300, 300);
        assert!(d.len() <= 1000);
    }
    assert_eq!(d.len(), d.gens.iter().map(Generation::len).sum::<usize>(), "the count is exact");
}

#[test]
fn runs_saved_at_a_clean_shutdown_are_loaded_once_and_only_within_the_window() {
    let dir = tempfile::tempdir().unwrap();
    let mut runs = StreamRuns::new(3600, 1000);
    runs.record([1; 16], [2; 16], 100);
    runs.record([3; 16], [4; 16], 100);
    save_runs(dir.path(), &runs, 100).unwrap();
    let mut loaded = StreamRuns::new(3600, 1000);
    take_runs(dir.path(), &mut loaded, 3600, 200);
    assert_eq!((loaded.last(&[1; 16]), loaded.last(&[3; 16])), (Some([2; 16]), Some([4; 16])));
    assert!(!dir.path().join(RUNS_SNAPSHOT).exists(), "deleted once read");
    let mut again = StreamRuns::new(3600, 1000);
    take_runs(dir.path(), &mut again, 3600, 200);
    assert!(again.is_empty(), "a crash after this start brings nothing back");
    save_runs(dir.path(), &runs, 100).unwrap();
    take_runs(dir.path(), &mut again, 3600, 100 + 3600);
    assert!(again.is_empty(), "older than the window: ignored");
    save_runs(dir.path(), &runs, 100).unwrap();
    let path = dir.path().join(RUNS_SNAPSHOT);
    let mut bytes = fs::read(&path).unwrap();
    bytes[RUNS_HEADER + 3] ^= 1;
    fs::write(&path, bytes).unwrap();
    take_runs(dir.path(), &mut again, 3600, 200);
    assert!(again.is_empty() && !path.exists(), "damaged: ignored and removed");
}
