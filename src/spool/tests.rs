use std::collections::HashSet;
use std::io::Write;

use super::*;
use crate::event::{EventId, EventType, KnownType};

/// A spool with both of its followers, for tests that play every part.
struct Hub {
    spool: Spool,
    followers: Followers,
}

impl std::ops::Deref for Hub {
    type Target = Spool;
    fn deref(&self) -> &Spool {
        &self.spool
    }
}

impl Hub {
    fn reader(&self) -> Reader {
        self.followers.publish.reader()
    }
    async fn ack(&self, seqs: Vec<u64>) {
        self.followers.publish.ack(seqs).await;
    }
    fn files_result(&self, seq: u64) -> Option<Vec<u8>> {
        self.followers.publish.file_results(seq)
    }
    fn take_file_work(&self) -> Vec<FileWork> {
        self.followers.capture.take(usize::MAX, usize::MAX).expect("the log reads")
    }
    async fn files_done(&self, seq: u64, results: Vec<u8>) {
        self.followers.capture.record(seq, results).await;
    }
}

/// [`Spool::open`], with the followers kept beside the spool.
fn open(settings: SpoolSettings) -> Result<Hub, SpoolError> {
    Spool::open(settings).map(|(spool, followers)| Hub { spool, followers })
}

fn settings(dir: &Path) -> SpoolSettings {
    SpoolSettings::new(dir.to_owned(), 1 << 30, 3600)
}

/// Waits until acknowledged segments were deleted (compaction runs after the acknowledgement's
/// group is written).
async fn wait_for_room(spool: &Hub) {
    let before = spool.stats().disk_bytes;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while spool.stats().disk_bytes >= before {
        assert!(std::time::Instant::now() < deadline, "no segment was deleted: {:?}", spool.stats());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Disk bytes of one event frame of `ev(n, "1")` for a one- or two-digit `n`.
async fn one_frame() -> u64 {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(settings(dir.path())).unwrap();
    let empty = spool.stats().disk_bytes;
    spool.append(vec![ev(10, "1")], 1).await.unwrap();
    let used = spool.stats().disk_bytes - empty;
    spool.close().await;
    used
}

fn ev(n: u32, key: &str) -> Event {
    let value = format!(r#"{{"id":{n},"chat":{{"id":{key}}}}}"#).into_bytes();
    let routing = crate::event::routing_of(&EventType::Known(KnownType::ReceivedMessage), &value);
    Event {
        id: EventId::derive("receivedMessage", &value),
        event_type: EventType::Known(KnownType::ReceivedMessage),
        original_type: None,
        key: Some(key.into()),
        company: Some("1".into()),
        time: 1,
        value,
        dead_letter: None,
        files: Vec::new(),
        file_results: None,
        lineage: None,
        routing,
    }
}

async fn read_all(spool: &Hub) -> Vec<Stored> {
    let mut r = spool.reader();
    let mut out = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_millis(200), r.next_batch(1000)).await {
            Ok(b) => out.extend(b.expect("reads")),
            Err(_) => return out,
        }
    }
}

use std::time::Duration;

#[tokio::test]
async fn appended_events_come_back_in_order_and_acks_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(settings(dir.path())).unwrap();
    let r = spool.append((0..10).map(|i| ev(i, "7")).collect(), 100).await.unwrap();
    assert_eq!((r.stored, r.duplicates), (10, 0));
    assert_eq!(r.seqs, (1..=10).map(Some).collect::<Vec<_>>());
    let got = read_all(&spool).await;
    assert_eq!(
        got.iter().map(|s| s.event.value.clone()).collect::<Vec<_>>(),
        (0..10).map(|i| ev(i, "7").value).collect::<Vec<_>>()
    );
    assert!(got.windows(2).all(|w| w[0].seq < w[1].seq));
    spool.ack(got[..4].iter().map(|s| s.seq).collect()).await;
    spool.close().await;

    let spool = open(settings(dir.path())).unwrap();
    let stats = spool.stats();
    assert_eq!(stats.events, 6);
    assert_eq!(stats.oldest_received_at, Some(100));
    let again = read_all(&spool).await;
    assert_eq!(again.iter().map(|s| s.seq).collect::<Vec<_>>(), got[4..].iter().map(|s| s.seq).collect::<Vec<_>>());
    // New appends continue the sequence after a restart.
    spool.append(vec![ev(99, "8")], 101).await.unwrap();
    let all = read_all(&spool).await;
    assert!(all.last().unwrap().seq > got.last().unwrap().seq);
    spool.close().await;
}

#[tokio::test]
async fn duplicates_within_the_window_are_not_stored_even_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(settings(dir.path())).unwrap();
    let r = spool.append(vec![ev(1, "1"), ev(1, "1"), ev(2, "1")], now_secs()).await.unwrap();
    assert_eq!((r.stored, r.duplicates), (2, 1));
    assert_eq!(r.seqs, vec![Some(1), None, Some(2)]);
    spool.close().await;
    let spool = open(settings(dir.path())).unwrap();
    let r = spool.append(vec![ev(1, "1"), ev(3, "1")], now_secs()).await.unwrap();
    assert_eq!((r.stored, r.duplicates), (1, 1));
    spool.close().await;
}

/// The events of a webhook body, split as the webhook splits them for token `token`.
fn batch_events(token: &str, body: &str) -> Vec<Event> {
    let crate::event::Body::Batch(b) = crate::event::parse_body(body.as_bytes()).expect("parses") else {
        panic!("a batch")
    };
    crate::event::split(&b, &crate::event::Sender::token(token), 0)
}

fn status(online: bool) -> String {
    format!(r#"{{"token":"t","time":1700000000,"messages":{{"agentChangedStatus":[{{"id":7,"isOnline":{online}}}]}}}}"#)
}

#[tokio::test]
async fn a_state_that_returns_within_one_second_is_stored_and_a_resend_of_the_last_batch_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(settings(dir.path())).unwrap();
    let now = now_secs();
    for online in [true, false, true] {
        let r = spool.append(batch_events("t", &status(online)), now).await.unwrap();
        assert_eq!((r.stored, r.duplicates), (1, 0), "online={online}");
    }
    let r = spool.append(batch_events("t", &status(true)), now).await.unwrap();
    assert_eq!((r.stored, r.duplicates), (0, 1), "the last batch again: a re-send");
    // In one write group (appends racing each other) the same holds.
    let (a, b, c) = tokio::join!(
        spool.append(batch_events("t", &status(false)), now),
        spool.append(batch_events("t", &status(true)), now),
        spool.append(batch_events("t", &status(false)), now),
    );
    let stored: usize = [a, b, c].into_iter().map(|r| r.unwrap().stored).sum();
    assert_eq!(stored, 3, "offline, online, offline: three states, whatever group they share");
    // Another token's identical event is its own.
    let r = spool.append(batch_events("u", &status(false).replace(r#""t""#, r#""u""#)), now).await.unwrap();
    assert_eq!((r.stored, r.duplicates), (1, 0), "another token, another event");
    let stored = read_all(&spool).await;
    let states: Vec<bool> = stored.iter().map(|s| String::from_utf8_lossy(&s.event.value).contains("true")).collect();
    assert_eq!(states.len(), 7);
    assert_eq!(states[..3], [true, false, true], "in the order accepted");
    spool.close().await;
    // A clean restart keeps what the streams last carried: the last batch again is still a re-send,
    // and a state that returns is still new.
    let spool = open(settings(dir.path())).unwrap();
    let last = status(false).replace(r#""t""#, r#""u""#);
    let r = spool.append(batch_events("u", &last), now).await.unwrap();
    assert_eq!((r.stored, r.duplicates), (0, 1), "re-sent across a clean restart");
    let r = spool.append(batch_events("t", &status(false)), now).await.unwrap();
    assert_eq!((r.stored, r.duplicates), (0, 1), "token t's last batch was offline");
    let r = spool.append(batch_events("t", &status(true)), now).await.unwrap();
    assert_eq!((r.stored, r.duplicates), (1, 0), "online again after a restart: new");
    spool.close().await;
    // Without a clean shutdown (no saved runs) nothing is known: a re-send is stored again, never a
    // returning state dropped.
    std::fs::remove_file(dir.path().join("dedup-runs.snapshot")).expect("saved by the clean close");
    let spool = open(settings(dir.path())).unwrap();
    let r = spool.append(batch_events("t", &status(true)), now).await.unwrap();
    assert_eq!((r.stored, r.duplicates), (1, 0), "unknown stream after a crash: stored (a duplicate at worst)");
    spool.close().await;
}

#[tokio::test]
async fn ids_in_segments_are_remembered_even_if_the_dedup_log_was_lost() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(settings(dir.path())).unwrap();
    spool.append(vec![ev(1, "1")], now_secs()).await.unwrap();
    spool.close().await;
    // The dedup journal is synced only before a segment is deleted: a crash may leave none.
    // The segment still has the id.
    remove_journal(dir.path());
    let spool = open(settings(dir.path())).unwrap();
    let r = spool.append(vec![ev(1, "1")], now_secs()).await.unwrap();
    assert_eq!((r.stored, r.duplicates), (0, 1));
    spool.close().await;
}

#[tokio::test]
async fn full_spool_refuses_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // Room for the segment header and ten events; every group rolls the segment, so acknowledged
    // events free their space once their segment is deleted.
    let frame = one_frame().await;
    let mut s = settings(dir.path());
    s.max_bytes = 16 + 10 * frame;
    s.segment_bytes = 1;
    let spool = open(s).unwrap();
    spool.append(vec![ev(1, "1"), ev(2, "1")], 1).await.unwrap();
    let err = spool.append((3..12).map(|i| ev(i, "1")).collect(), 1).await.unwrap_err();
    assert!(matches!(err, SpoolError::Full { .. }), "{err}");
    assert_eq!(spool.stats().events, 2);
    // Refused ids are not remembered as seen: the retry is stored once there is room.
    let seqs: Vec<u64> = read_all(&spool).await.iter().map(|s| s.seq).collect();
    spool.ack(seqs).await;
    wait_for_room(&spool).await;
    let r = spool.append((3..12).map(|i| ev(i, "1")).collect(), 1).await;
    assert_eq!(r.as_ref().map(|r| r.stored).ok(), Some(9), "{r:?} {:?} frame {frame}", spool.stats());
    spool.close().await;
}

#[tokio::test]
async fn torn_tail_is_discarded_and_everything_before_it_kept() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(settings(dir.path())).unwrap();
    spool.append((0..5).map(|i| ev(i, "1")).collect(), 1).await.unwrap();
    spool.close().await;
    let newest = list_segments(dir.path()).unwrap().pop().unwrap().1;
    let good_len = std::fs::metadata(&newest).unwrap().len();
    // A write cut short: a header announcing 500 bytes, and 20 of them.
    let mut f = std::fs::OpenOptions::new().append(true).open(&newest).unwrap();
    f.write_all(&500u32.to_le_bytes()).unwrap();
    f.write_all(&[0xAB; 24]).unwrap();
    drop(f);

    let spool = open(settings(dir.path())).unwrap();
    assert_eq!(spool.stats().events, 5);
    assert_eq!(std::fs::metadata(&newest).unwrap().len(), good_len, "torn bytes truncated");
    assert_eq!(read_all(&spool).await.len(), 5);
    spool.append(vec![ev(9, "1")], 1).await.unwrap();
    spool.close().await;
    let spool = open(settings(dir.path())).unwrap();
    assert_eq!(spool.stats().events, 6, "appends after recovery are readable");
    spool.close().await;
}

#[tokio::test]
async fn checksum_mismatch_at_the_tail_is_a_torn_write() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(settings(dir.path())).unwrap();
    spool.append(vec![ev(1, "1")], 1).await.unwrap();
    spool.append(vec![ev(2, "1")], 1).await.unwrap();
    spool.close().await;
    let newest = list_segments(dir.path()).unwrap().pop().unwrap().1;
    let mut bytes = std::fs::read(&newest).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xFF;
    std::fs::write(&newest, &bytes).unwrap();
    let spool = open(settings(dir.path())).unwrap();
    assert_eq!(spool.stats().events, 1, "only the damaged, last frame is discarded");
    spool.close().await;
}

#[tokio::test]
async fn segments_roll_over_and_acknowledged_ones_are_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(dir.path());
    s.segment_bytes = 512;
    let spool = open(s.clone()).unwrap();
    for i in 0..40 {
        spool.append(vec![ev(i, "1")], 1).await.unwrap();
    }
    let segments = list_segments(dir.path()).unwrap().len();
    assert!(segments > 3, "rolled over into {segments} segments");
    let got = read_all(&spool).await;
    assert_eq!(got.len(), 40);
    spool.ack(got.iter().map(|s| s.seq).collect()).await;
    spool.append(vec![ev(100, "1")], 1).await.unwrap();
    let _ = read_all(&spool).await;
    spool.append(vec![ev(101, "1")], 1).await.unwrap();
    // Compaction runs right after the writer answers: give it a moment, bounded.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut left = usize::MAX;
    while std::time::Instant::now() < deadline {
        left = list_segments(dir.path()).unwrap().len();
        if left <= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(left <= 2, "{left} segments left after everything old was acknowledged");
    spool.close().await;
    let spool = open(s).unwrap();
    assert_eq!(spool.stats().events, 2);
    spool.close().await;
}

#[tokio::test]
async fn ids_of_deleted_segments_are_still_duplicates_after_a_restart() {
    // The dedup journal is written and synced off the writer thread; a segment may only go once the
    // journal was synced after it became deletable, so a restart right after the deletion still
    // knows every id.
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(dir.path());
    s.segment_bytes = 512;
    let spool = open(s.clone()).unwrap();
    let now = now_secs();
    for i in 0..40 {
        spool.append(vec![ev(i, "1")], now).await.unwrap();
    }
    deliver_everything_until_old_segments_go(&spool, dir.path(), now).await;
    spool.close().await;
    let spool = open(s).unwrap();
    let r = spool.append((0..40).map(|i| ev(i, "1")).collect(), now_secs()).await.unwrap();
    assert_eq!((r.stored, r.duplicates), (0, 40), "every id of the deleted segments is remembered");
    spool.close().await;
}

#[tokio::test]
async fn a_deletion_cut_short_by_a_crash_is_finished_at_start_and_is_no_damage() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(settings(dir.path())).unwrap();
    spool.append(vec![ev(1, "1")], now_secs()).await.unwrap();
    spool.close().await;
    // A delivered segment renamed for deletion and cut mid-frame when the process died.
    let leftover = dir.path().join("segment-00000000000000000000.deleting");
    std::fs::write(&leftover, b"HUGGYSEG\x02\x00\x00\x00 cut").unwrap();
    let spool = open(settings(dir.path())).unwrap();
    assert!(!leftover.exists());
    assert_eq!(spool.recovery_report().damaged_regions, 0);
    assert_eq!(spool.stats().events, 1);
    spool.close().await;
}

#[tokio::test]
async fn ids_whose_journal_appends_were_lost_are_journaled_again_before_their_segments_go() {
    // The last run died with ids still on their way to the journal: the segments have them, the
    // journal does not. They must be journaled again before those segments are deleted.
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(dir.path());
    s.segment_bytes = 512;
    let spool = open(s.clone()).unwrap();
    let now = now_secs();
    for i in 0..20 {
        spool.append(vec![ev(i, "1")], now).await.unwrap();
    }
    spool.close().await;
    remove_journal(dir.path());
    let spool = open(s.clone()).unwrap();
    deliver_everything_until_old_segments_go(&spool, dir.path(), now).await;
    spool.close().await;
    let spool = open(s).unwrap();
    let r = spool.append((0..20).map(|i| ev(i, "1")).collect(), now_secs()).await.unwrap();
    assert_eq!((r.stored, r.duplicates), (0, 20), "every id of the deleted segments is remembered");
    spool.close().await;
}

/// Acknowledges everything undelivered, then appends one more event so that a fresh segment holds
/// the writer and the reader, and waits (bounded) until every older segment is deleted.
async fn deliver_everything_until_old_segments_go(spool: &Hub, dir: &Path, now: i64) {
    let got = read_all(spool).await;
    spool.ack(got.iter().map(|s| s.seq).collect()).await;
    spool.append(vec![ev(100, "1")], now).await.unwrap();
    let _ = read_all(spool).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while list_segments(dir).unwrap().len() > 2 {
        assert!(std::time::Instant::now() < deadline, "acknowledged segments were not deleted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Deletes the dedup journal's files.
fn remove_journal(dir: &Path) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "ids") {
            std::fs::remove_file(path).unwrap();
        }
    }
}

#[test]
fn ranges_merge() {
    assert_eq!(to_ranges(&mut [5, 1, 2, 3, 9, 8]), vec![(1, 3), (5, 5), (8, 9)]);
    // Acknowledgements kept over many groups fold into few ranges.
    assert_eq!(merge_ranges(vec![(10, 20), (1, 3), (4, 9), (30, 31), (15, 25)]), vec![(1, 25), (30, 31)]);
}

// ---------------------------------------------------------------------------------------------
// What the spool must survive (SPEC §4a)

fn with_files(n: u32, key: &str) -> Event {
    let mut e = ev(n, key);
    e.files = vec![format!("https://files.huggy.app/{n}.pdf")];
    e
}

/// Flips one byte in the middle of the frame of the `nth` event (0-based) of a segment.
fn flip_in_event(path: &Path, nth: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    let mut pos = format::SEGMENT_HEADER_LEN;
    let mut seen = 0;
    loop {
        match format::decode_at(&bytes, pos) {
            format::Next::Frame(format::Record::Event { .. }, used) if seen == nth => {
                bytes[pos + used / 2] ^= 0x5A;
                break;
            }
            format::Next::Frame(format::Record::Event { .. }, used) => {
                seen += 1;
                pos += used;
            }
            format::Next::Frame(_, used) => pos += used,
            other => panic!("no event {nth} in {}: {other:?}", path.display()),
        }
    }
    std::fs::write(path, bytes).unwrap();
}

#[tokio::test]
async fn one_flipped_byte_costs_one_event_and_everything_after_it_is_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(settings(dir.path())).unwrap();
    for i in 0..30 {
        spool.append(vec![ev(i, "1")], 1).await.unwrap();
    }
    // Acknowledge the first five, so the acknowledgement frame sits before the damage.
    spool.ack((1..=5).collect()).await;
    spool.close().await;
    let newest = list_segments(dir.path()).unwrap().pop().unwrap().1;
    flip_in_event(&newest, 9);

    let spool = open(settings(dir.path())).unwrap();
    let report = spool.recovery_report().clone();
    assert_eq!(report.damaged_regions, 1, "{report:?}");
    assert_eq!(report.events_lost, 1, "{report:?}");
    assert_eq!(report.torn_tails, 0, "{report:?}");
    assert_eq!(report.kept_aside.len(), 1, "{report:?}");
    assert!(report.kept_aside[0].exists());
    let got: Vec<u32> = read_all(&spool)
        .await
        .iter()
        .map(|s| serde_json::from_slice::<serde_json::Value>(&s.event.value).unwrap()["id"].as_u64().unwrap() as u32)
        .collect();
    let want: Vec<u32> = (5..30).filter(|i| *i != 9).collect();
    assert_eq!(got, want, "events 5-29 but the damaged one");
    spool.close().await;
    // The damaged file was not truncated: a second start finds the same, and keeps one copy aside.
    let spool = open(settings(dir.path())).unwrap();
    assert_eq!(spool.stats().events, 24);
    assert_eq!(spool.recovery_report().kept_aside.len(), 1);
    assert_eq!(std::fs::read_dir(dir.path().join("damaged")).unwrap().count(), 1);
    spool.close().await;
}

#[tokio::test]
async fn damage_in_an_older_segment_is_contained_too() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(dir.path());
    s.segment_bytes = 2048;
    let spool = open(s.clone()).unwrap();
    for i in 0..60 {
        spool.append(vec![ev(i, "1")], 1).await.unwrap();
    }
    spool.close().await;
    let segments = list_segments(dir.path()).unwrap();
    assert!(segments.len() > 3);
    flip_in_event(&segments[1].1, 2);
    let spool = open(s).unwrap();
    assert_eq!(spool.recovery_report().damaged_regions, 1);
    assert_eq!(spool.stats().events, 59);
    assert_eq!(read_all(&spool).await.len(), 59);
    spool.close().await;
}

#[tokio::test]
async fn an_unknown_format_version_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(settings(dir.path())).unwrap();
    spool.append(vec![ev(1, "1")], 1).await.unwrap();
    spool.close().await;
    let seg = list_segments(dir.path()).unwrap()[0].1.clone();
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[8..12].copy_from_slice(&99u32.to_le_bytes());
    std::fs::write(&seg, &bytes).unwrap();
    let err = open(settings(dir.path())).err().expect("refuses");
    let msg = err.to_string();
    assert!(matches!(err, SpoolError::Format { .. }) && msg.contains("format 99"), "{msg}");
    // Nothing was changed: the file is as it was.
    assert_eq!(std::fs::read(&seg).unwrap(), bytes);
}

#[tokio::test]
async fn a_spool_of_format_2_is_read_and_its_routing_headers_come_from_the_value() {
    let dir = tempfile::tempdir().unwrap();
    let mut event = ev(1, "42");
    let expected = event.routing.clone();
    assert_eq!(expected.chat_id.as_deref(), Some("42"));
    event.routing = crate::event::Routing::default();
    let mut frame = Vec::new();
    format::encode(&format::Record::Event { seq: 1, received_at: 1, event: event.clone() }, &mut frame);
    // Format 2 wrote the same record without the routing trailer (six absent options and a flag).
    let payload = &frame[format::FRAME_HEADER_LEN..frame.len() - 7];
    let len = u32::try_from(payload.len()).unwrap().to_le_bytes();
    let mut crc = crc32fast::Hasher::new();
    crc.update(&len);
    crc.update(payload);
    let mut segment = format::segment_header().to_vec();
    segment[8..12].copy_from_slice(&2u32.to_le_bytes());
    segment.extend_from_slice(&format::FRAME_MAGIC.to_le_bytes());
    segment.extend_from_slice(&len);
    segment.extend_from_slice(&crc.finalize().to_le_bytes());
    segment.extend_from_slice(payload);
    std::fs::write(dir.path().join("segment-00000000000000000001.log"), &segment).unwrap();
    let spool = open(settings(dir.path())).unwrap();
    let got = read_all(&spool).await;
    assert_eq!(got.len(), 1);
    event.routing = expected;
    assert_eq!(got[0].event, event, "read whole, routing headers read again from the value");
    spool.close().await;
}

#[tokio::test]
async fn a_spool_of_the_unversioned_format_refuses_to_start_with_advice() {
    let dir = tempfile::tempdir().unwrap();
    // A frame of the first format: [len][crc][payload], no segment header.
    std::fs::write(dir.path().join("segment-00000000000000000001.log"), [12, 0, 0, 0, 1, 2, 3, 4, 0, 1, 2, 3]).unwrap();
    let msg = open(settings(dir.path())).err().expect("refuses").to_string();
    assert!(msg.contains("huggy-bridge 0.1") && msg.contains("delivered everything"), "{msg}");
}

#[tokio::test]
async fn a_frame_that_checksums_but_does_not_decode_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(settings(dir.path())).unwrap();
    spool.append(vec![ev(1, "1")], 1).await.unwrap();
    spool.close().await;
    let seg = list_segments(dir.path()).unwrap()[0].1.clone();
    let mut bytes = std::fs::read(&seg).unwrap();
    // A record kind this build does not know, with a valid checksum (as a newer build would write).
    let mut frame = Vec::new();
    frame.extend_from_slice(&format::FRAME_MAGIC.to_le_bytes());
    let payload = [77u8, 1, 2, 3];
    let len = (payload.len() as u32).to_le_bytes();
    let mut h = crc32fast::Hasher::new();
    h.update(&len);
    h.update(&payload);
    frame.extend_from_slice(&len);
    frame.extend_from_slice(&h.finalize().to_le_bytes());
    frame.extend_from_slice(&payload);
    bytes.extend_from_slice(&frame);
    std::fs::write(&seg, &bytes).unwrap();
    let msg = open(settings(dir.path())).err().expect("refuses").to_string();
    assert!(msg.contains("does not decode") && msg.contains("unknown record kind 77"), "{msg}");
    assert_eq!(std::fs::read(&seg).unwrap(), bytes, "not truncated as torn");
}

#[tokio::test]
async fn a_second_open_of_the_same_directory_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(settings(dir.path())).unwrap();
    spool.append(vec![ev(1, "1")], 1).await.unwrap();
    let before: Vec<_> = list_segments(dir.path()).unwrap();
    let err = open(settings(dir.path())).err().expect("refused");
    assert!(matches!(err, SpoolError::Locked(LockError::Held(_))), "{err}");
    assert!(matches!(offline_status(dir.path()), Err(SpoolError::Locked(_))));
    assert_eq!(list_segments(dir.path()).unwrap(), before);
    // The first keeps working.
    spool.append(vec![ev(2, "1")], 1).await.unwrap();
    assert_eq!(read_all(&spool).await.len(), 2);
    spool.close().await;
    drop(spool);
    let status = offline_status(dir.path()).unwrap();
    assert_eq!(status.undelivered_events, 2);
    assert_eq!(status.by_type.get("receivedMessage"), Some(&2));
}

#[tokio::test]
async fn after_a_refusal_smaller_batches_are_refused_until_below_the_low_water_mark() {
    let dir = tempfile::tempdir().unwrap();
    let frame = one_frame().await;
    let mut s = settings(dir.path());
    s.max_bytes = 16 + 20 * frame;
    s.segment_bytes = 1;
    let spool = open(s).unwrap();
    spool.append((0..10).map(|i| ev(i, "1")).collect(), 1).await.unwrap();
    // A batch of the chat that does not fit is refused ...
    let big = || (10..25).map(|i| ev(i, "1")).collect::<Vec<_>>();
    assert!(matches!(spool.append(big(), 1).await, Err(SpoolError::Full { .. })));
    // ... and so is a later, smaller one of the same chat that would fit: it must not overtake.
    assert!(matches!(spool.append(vec![ev(30, "1")], 1).await, Err(SpoolError::Full { .. })));
    assert!(spool.stats().full);
    // Once delivery frees room for the refused batch below the low-water mark, batches are taken
    // again: the refused one first, then the later one.
    let seqs: Vec<u64> = read_all(&spool).await.iter().map(|s| s.seq).collect();
    spool.ack(seqs).await;
    wait_for_room(&spool).await;
    assert_eq!(spool.append(big(), 1).await.unwrap().stored, 15);
    assert!(!spool.stats().full);
    spool.close().await;
}

#[tokio::test]
async fn file_work_comes_from_the_durable_event_and_again_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(settings(dir.path())).unwrap();
    // The caller goes away right after handing the batch over: the work is there anyway.
    let handle = {
        let spool = spool.clone();
        tokio::spawn(async move { spool.append(vec![with_files(1, "1"), ev(2, "1"), with_files(3, "2")], 1).await })
    };
    let work = tokio::time::timeout(Duration::from_secs(5), spool.followers.capture.next(usize::MAX, usize::MAX))
        .await
        .expect("file work announced");
    handle.abort();
    assert_eq!(work.iter().map(|w| w.seq).collect::<Vec<_>>(), vec![1, 3]);
    assert!(spool.take_file_work().is_empty(), "handed out once");
    assert_eq!(spool.stats().pending_files, 2);
    spool.files_done(1, b"[]".to_vec()).await;
    spool.close().await;
    // After a restart only the event whose files were not done is handed out again.
    let spool = open(settings(dir.path())).unwrap();
    assert_eq!(spool.take_file_work().iter().map(|w| w.seq).collect::<Vec<_>>(), vec![3]);
    assert_eq!(spool.files_result(1).as_deref(), Some(&b"[]"[..]));
    spool.close().await;
}

#[tokio::test]
async fn recovery_holds_a_bounded_part_of_the_file_work_and_the_feed_reads_the_rest_from_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(settings(dir.path())).unwrap();
    let total = 2500u32;
    for first in (0..total).step_by(500) {
        spool.append((first..first + 500).map(|n| with_files(n, &(n % 7).to_string())).collect(), 1).await.unwrap();
    }
    // Done before the restart: 100 among the work recovery holds, and 10 in the rest.
    let done_held: Vec<u64> = (1..=100).collect();
    let done_rest: Vec<u64> = (2000..2010).collect();
    for &seq in done_held.iter().chain(&done_rest) {
        spool.files_done(seq, format!("[{seq}]").into_bytes()).await;
    }
    // Published and acknowledged: 10 whose files were done.
    spool.ack((91..=100).collect()).await;
    spool.close().await;

    let spool = open(settings(dir.path())).unwrap();
    assert!(spool.followers.capture.held() <= FILE_WORK_HELD, "held {}", spool.followers.capture.held());
    assert_eq!(spool.stats().pending_files, total as usize - 110, "{:?}", spool.stats());
    // A new event after the restart is handed out after the backlog, once.
    let fresh = spool.append(vec![with_files(total + 1, "x")], 1).await.unwrap().seqs[0].unwrap();
    let mut handed: Vec<u64> = Vec::new();
    loop {
        let batch = spool.followers.capture.take(100, usize::MAX).unwrap();
        if batch.is_empty() {
            break;
        }
        assert!(batch.len() <= 100);
        handed.extend(batch.iter().map(|w| w.seq));
    }
    let unique: std::collections::BTreeSet<u64> = handed.iter().copied().collect();
    assert_eq!(unique.len(), handed.len(), "each event's work is handed out once");
    let pending: std::collections::BTreeSet<u64> =
        (101..=u64::from(total)).filter(|s| !done_rest.contains(s)).collect();
    assert!(pending.iter().all(|s| unique.contains(s)), "every event still waiting for its files is handed out");
    assert!(done_held.iter().all(|s| !unique.contains(s)), "work recovery held and found done is not handed out");
    // In the rest, results recorded before the restart lie after their event in the log: at worst
    // those files are captured once more, and the publisher keeps the first results.
    assert!(unique.iter().all(|s| pending.contains(s) || done_rest.contains(s) || *s == fresh), "{handed:?}");
    assert_eq!(handed.last(), Some(&fresh));
    assert_eq!(spool.followers.publish.file_results(2005).as_deref(), Some(&b"[2005]"[..]));
    spool.files_done(2005, b"[\"again\"]".to_vec()).await;
    spool.close().await;
    let spool = open(settings(dir.path())).unwrap();
    assert_eq!(spool.followers.publish.file_results(2005).as_deref(), Some(&b"[2005]"[..]), "the first results win");
    spool.close().await;
}

#[tokio::test]
async fn written_file_results_are_read_from_the_log_not_kept_in_memory() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(settings(dir.path())).unwrap();
    let seqs: Vec<u64> = spool
        .append((0..50).map(|n| with_files(n, "1")).collect(), 1)
        .await
        .unwrap()
        .seqs
        .into_iter()
        .flatten()
        .collect();
    for &seq in &seqs {
        spool.files_done(seq, format!("[{seq}]").into_bytes()).await;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while spool.stats().pending_files > 0 {
        assert!(std::time::Instant::now() < deadline, "results not committed: {:?}", spool.stats());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(spool.queue.shared.lock().unwritten_file_results.is_empty(), "written results are not held");
    // The reader finds each event's results after it in the log, in the same read.
    let batch = spool.reader().read_now(usize::MAX, usize::MAX, &HashSet::new()).unwrap();
    assert_eq!(batch.events.len(), 50);
    let found: std::collections::HashMap<u64, Vec<u8>> = batch.files.into_iter().collect();
    assert!(seqs.iter().all(|s| found.get(s) == Some(&format!("[{s}]").into_bytes())));
    // A reader that holds events read earlier finds their results when asked for them, and a
    // look-ahead from its position finds them without taking events.
    let mut r = spool.reader();
    let first = r.read_now(5, usize::MAX, &HashSet::new()).unwrap();
    assert_eq!(first.events.len(), 5);
    let wanted: HashSet<u64> = first.events.iter().map(|s| s.seq).collect();
    let mut ahead = r.ahead(r.position());
    let found = ahead.results(&wanted).unwrap();
    assert_eq!(found.iter().map(|(s, _)| *s).collect::<HashSet<u64>>(), wanted);
    assert!(ahead.at_end());
    spool.close().await;
}

/// Fails the `n`th `fdatasync` (1-based) the way a disk does: `EIO`, and the pages written since the
/// file's last successful sync are gone (or, with `keep_pages`, still readable from the cache but
/// never written: what a later power loss takes). Optionally every sync after it fails too.
struct FaultyIo {
    syncs: std::sync::atomic::AtomicUsize,
    fail_at: usize,
    fail_after: bool,
    keep_pages: bool,
    synced_len: std::sync::Mutex<std::collections::HashMap<i32, u64>>,
}

impl FaultyIo {
    fn new(fail_at: usize, fail_after: bool) -> Arc<FaultyIo> {
        Arc::new(FaultyIo {
            syncs: Default::default(),
            fail_at,
            fail_after,
            keep_pages: false,
            synced_len: Default::default(),
        })
    }
}

impl SegmentIo for FaultyIo {
    fn sync_data(&self, file: &std::fs::File) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        let n = self.syncs.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        let mut lens = self.synced_len.lock().unwrap();
        if n == self.fail_at || (self.fail_after && n > self.fail_at) {
            if !self.keep_pages {
                let keep = lens.get(&file.as_raw_fd()).copied().unwrap_or(0);
                file.set_len(keep)?;
            }
            return Err(std::io::Error::from_raw_os_error(5));
        }
        file.sync_data()?;
        lens.insert(file.as_raw_fd(), file.metadata()?.len());
        Ok(())
    }
}

/// Waits until at most one segment is left and `disk_bytes` counts exactly the segment files on
/// disk; fails after `within` with `what`.
async fn wait_counted_exactly(spool: &Hub, dir: &Path, within: Duration, what: &str) {
    let deadline = std::time::Instant::now() + within;
    while spool.stats().segments > 1 || spool.stats().disk_bytes != segment_bytes_on_disk(dir) {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: {:?}, {} bytes on disk",
            spool.stats(),
            segment_bytes_on_disk(dir)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Bytes of the segment files in `dir` (one the janitor is deleting right now counts as gone).
fn segment_bytes_on_disk(dir: &Path) -> u64 {
    list_segments(dir).unwrap().iter().filter_map(|(_, p)| std::fs::metadata(p).ok()).map(|m| m.len()).sum()
}

#[tokio::test]
async fn after_a_failed_fdatasync_the_disk_bytes_count_what_the_failed_group_left_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    // No dedup window: what is on disk is segments only.
    let mut s = SpoolSettings::new(dir.path().to_owned(), 1 << 30, 0);
    // Sync 1: the first segment's header. 2: an append. 3: fails, its pages still on disk.
    s.io = Arc::new(FaultyIo { keep_pages: true, ..Arc::into_inner(FaultyIo::new(3, false)).unwrap() });
    let spool = open(s).unwrap();
    spool.append((0..20).map(|i| ev(i, "1")).collect(), 1).await.unwrap();
    let failed = spool.append((20..400).map(|i| ev(i, "1")).collect(), 1).await;
    assert!(matches!(failed, Err(SpoolError::WriteFailed(_))), "{failed:?}");
    let retried = spool.append(vec![ev(500, "1")], 1).await.unwrap();
    assert_eq!(retried.stored, 1);
    assert_eq!(spool.stats().disk_bytes, segment_bytes_on_disk(dir.path()), "{:?}", spool.stats());
    // Once everything is delivered and the abandoned segment deleted, the count is still exact.
    let seqs: Vec<u64> = read_all(&spool).await.iter().map(|s| s.seq).collect();
    spool.ack(seqs).await;
    wait_counted_exactly(&spool, dir.path(), Duration::from_secs(5), "delivered segments not deleted, or miscounted")
        .await;
    spool.close().await;
}

/// A disk whose syncs fail (`EIO`, pages kept) while `failing` is set.
#[derive(Default)]
struct FlakyIo {
    failing: std::sync::atomic::AtomicBool,
}

impl SegmentIo for FlakyIo {
    fn sync_data(&self, file: &std::fs::File) -> std::io::Result<()> {
        if self.failing.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(std::io::Error::from_raw_os_error(5));
        }
        file.sync_data()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_bytes_stay_exact_when_the_segment_after_a_failed_fdatasync_comes_late() {
    let dir = tempfile::tempdir().unwrap();
    let io = Arc::new(FlakyIo::default());
    let mut s = SpoolSettings::new(dir.path().to_owned(), 1 << 30, 0);
    s.io = io.clone();
    let spool = open(s).unwrap();
    let seqs: Vec<u64> =
        spool.append((0..20).map(|i| ev(i, "1")).collect(), 1).await.unwrap().seqs.into_iter().flatten().collect();
    // The disk fails: the group is refused, and no fresh segment can be started either.
    io.failing.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(spool.append((20..400).map(|i| ev(i, "1")).collect(), 1).await.is_err());
    // Acknowledgements go on meanwhile (kept for the next segment); half the events stay
    // undelivered, so the failed segment stays too.
    spool.ack(seqs[..10].to_vec()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The disk recovers: the writer starts a fresh segment on its own.
    io.failing.store(false, std::sync::atomic::Ordering::SeqCst);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !spool.stats().writable || spool.stats().disk_bytes != segment_bytes_on_disk(dir.path()) {
        assert!(
            std::time::Instant::now() < deadline,
            "not writable again, or miscounted: {:?}, {} bytes on disk",
            spool.stats(),
            segment_bytes_on_disk(dir.path())
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Delivered (read past, acknowledged) and deleted, the failed segment takes off what it
    // holds: still exact.
    assert_eq!(read_all(&spool).await.len(), 10);
    spool.ack(seqs[10..].to_vec()).await;
    wait_counted_exactly(&spool, dir.path(), Duration::from_secs(15), "not deleted, or miscounted").await;
    spool.close().await;
}

#[tokio::test]
async fn the_capture_feed_reads_a_long_stretch_without_files_a_bounded_piece_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(settings(dir.path())).unwrap();
    // 20 MiB of events without files, then one with.
    let big = |n: u32| {
        let mut e = ev(n, "1");
        e.value = format!(r#"{{"id":{n},"pad":"{}"}}"#, "x".repeat(64 * 1024)).into_bytes();
        e.id = EventId::derive("receivedMessage", &e.value);
        e
    };
    for first in (0..320).step_by(40) {
        spool.append((first..first + 40).map(big).collect(), 1).await.unwrap();
    }
    let with = spool.append(vec![with_files(1_000, "2")], 1).await.unwrap().seqs[0].unwrap();
    let first = spool.followers.capture.take(10, usize::MAX).unwrap();
    assert!(first.is_empty(), "one take reads no more than its budget of the log");
    let work = tokio::time::timeout(Duration::from_secs(10), spool.followers.capture.next(10, usize::MAX))
        .await
        .expect("the feed goes on at once, without a commit");
    assert_eq!(work.iter().map(|w| w.seq).collect::<Vec<_>>(), [with]);
    spool.close().await;
}

#[tokio::test]
async fn a_failed_fdatasync_answers_no_2xx_and_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(dir.path());
    // Sync 1: the first segment's header. 2, 3: two appends. 4: fails.
    s.io = FaultyIo::new(4, false);
    let spool = open(s).unwrap();
    spool.append(vec![ev(1, "1")], 1).await.unwrap();
    spool.append(vec![with_files(2, "2")], 1).await.unwrap();
    // An acknowledgement (not synced by itself) and a file result ride along with the failing group.
    spool.ack(vec![1]).await;
    let failed = spool.append(vec![ev(3, "1")], 1).await;
    assert!(matches!(failed, Err(SpoolError::WriteFailed(_))), "{failed:?}");
    // The writer goes on, on a fresh segment.
    spool.files_done(2, b"[{\"status\":\"stored\"}]".to_vec()).await;
    let retried = spool.append(vec![ev(3, "1")], 1).await.unwrap();
    assert_eq!(retried.stored, 1, "the failed batch is not a duplicate of something never stored");
    assert!(spool.stats().writable);
    spool.close().await;

    let spool = open(settings(dir.path())).unwrap();
    let left: Vec<u32> = read_all(&spool)
        .await
        .iter()
        .map(|s| serde_json::from_slice::<serde_json::Value>(&s.event.value).unwrap()["id"].as_u64().unwrap() as u32)
        .collect();
    assert_eq!(left, vec![2, 3], "acknowledged 1 stays acknowledged; 2 and 3 are undelivered");
    assert!(spool.files_result(left_seq(&spool, 2).await).is_some(), "the file result survived the failure");
    assert_eq!(spool.recovery_report().damaged_regions, 0, "the failed write is not mistaken for damage");
    spool.close().await;
}

async fn left_seq(spool: &Hub, id: u32) -> u64 {
    read_all(spool)
        .await
        .iter()
        .find(|s| serde_json::from_slice::<serde_json::Value>(&s.event.value).unwrap()["id"] == id)
        .unwrap()
        .seq
}

#[tokio::test]
async fn a_refused_group_that_still_reads_back_is_not_taken_for_stored() {
    // The sync failed but the group's pages are still in the cache: the 503'd event reads back
    // whole past the abandoned segment's durable length. It must not count as stored (nor as a
    // duplicate of its re-send), since a power loss would take it.
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(dir.path());
    s.io = Arc::new(FaultyIo { keep_pages: true, ..Arc::into_inner(FaultyIo::new(3, false)).unwrap() });
    let spool = open(s).unwrap();
    spool.append(vec![ev(1, "1")], now_secs()).await.unwrap();
    assert!(spool.append(vec![ev(2, "1")], now_secs()).await.is_err());
    spool.close().await;
    let spool = open(settings(dir.path())).unwrap();
    assert_eq!(spool.stats().events, 1, "only the event answered 2xx");
    let again = spool.append(vec![ev(2, "1")], now_secs()).await.unwrap();
    assert_eq!((again.stored, again.duplicates), (1, 0), "the re-send is stored, not skipped as a duplicate");
    spool.close().await;
}

#[tokio::test]
async fn a_disk_that_keeps_failing_refuses_every_batch_and_recovers_nothing_it_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(dir.path());
    s.io = FaultyIo::new(3, true);
    let spool = open(s).unwrap();
    spool.append(vec![ev(1, "1")], 1).await.unwrap();
    for i in 2..5 {
        assert!(spool.append(vec![ev(i, "1")], 1).await.is_err());
    }
    assert!(!spool.stats().writable);
    spool.close().await;
    let spool = open(settings(dir.path())).unwrap();
    assert_eq!(spool.stats().events, 1, "only the acknowledged-to-Huggy event");
    spool.append(vec![ev(2, "1")], 1).await.unwrap();
    spool.close().await;
}

/// A filesystem of `capacity` bytes holding only the spool's directory: a write that does not fit
/// writes what fits and fails with `ENOSPC`, as a real one does.
struct SmallDisk {
    dir: std::path::PathBuf,
    capacity: std::sync::atomic::AtomicU64,
}

impl SmallDisk {
    fn new(dir: &Path, capacity: u64) -> Arc<SmallDisk> {
        Arc::new(SmallDisk { dir: dir.to_owned(), capacity: capacity.into() })
    }

    fn used(&self) -> u64 {
        std::fs::read_dir(&self.dir)
            .unwrap()
            .filter_map(|e| e.ok()?.metadata().ok())
            .filter(|m| m.is_file())
            .map(|m| m.len())
            .sum()
    }
}

impl SegmentIo for SmallDisk {
    fn write_all(&self, file: &mut std::fs::File, buf: &[u8]) -> std::io::Result<()> {
        let room = self.capacity.load(std::sync::atomic::Ordering::SeqCst).saturating_sub(self.used());
        if buf.len() as u64 > room {
            file.write_all(&buf[..room as usize])?;
            return Err(std::io::Error::from_raw_os_error(28));
        }
        file.write_all(buf)
    }

    fn free_bytes(&self, _dir: &Path) -> std::io::Result<u64> {
        Ok(self.capacity.load(std::sync::atomic::Ordering::SeqCst).saturating_sub(self.used()))
    }
}

/// Waits (bounded) until the spool takes batches again by itself.
async fn wait_until_writable(spool: &Hub) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let s = spool.stats();
        if s.writable && !s.disk_full {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "still refusing: {s:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_full_disk_refuses_keeps_delivering_and_deleting_and_takes_batches_again_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(dir.path());
    s.segment_bytes = 4096;
    let disk = SmallDisk::new(dir.path(), 64 * 1024 + 2 * writer::ROOM_MARGIN);
    s.io = disk.clone();
    let spool = open(s).unwrap();
    let mut stored = 0;
    let mut i = 0;
    let first_refusal = loop {
        match spool.append((0..20).map(|k| ev(i * 20 + k, "1")).collect(), now_secs()).await {
            Ok(r) => stored += r.stored,
            Err(e) => break e,
        }
        i += 1;
        assert!(i < 10_000, "the disk never filled");
    };
    assert!(
        matches!(&first_refusal, SpoolError::WriteFailed(e) if is_no_room(e)),
        "the group that hit ENOSPC is refused: {first_refusal}"
    );
    let again = spool.append(vec![ev(1_000_000, "1")], now_secs()).await.unwrap_err();
    assert!(matches!(again, SpoolError::NoRoom { .. }), "then every batch is refused: {again}");
    let st = spool.stats();
    assert!(st.disk_full && st.events == stored as u64, "{st:?} after {stored} stored");
    // Delivery goes on: everything acknowledged to Huggy is read, and the acknowledgements free the
    // room without any batch arriving (a replica that is not ready receives none).
    let got = read_all(&spool).await;
    assert_eq!(got.len(), stored, "every event answered 2xx is delivered");
    let segments_full = list_segments(dir.path()).unwrap().len();
    spool.ack(got.iter().map(|s| s.seq).collect()).await;
    wait_until_writable(&spool).await;
    assert!(
        list_segments(dir.path()).unwrap().len() < segments_full,
        "delivered segments were deleted, the broken one too"
    );
    let r = spool.append(vec![ev(1_000_000, "1")], now_secs()).await.unwrap();
    assert_eq!(r.stored, 1, "the refused batch is stored once there is room");
    // What the spool counts on disk is what is on disk (the janitor's journal writes land a little
    // later: bounded wait).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while spool.stats().disk_bytes != disk.used() {
        assert!(std::time::Instant::now() < deadline, "counted {} on disk {}", spool.stats().disk_bytes, disk.used());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    spool.close().await;
    let spool = open(settings(dir.path())).unwrap();
    assert_eq!(spool.stats().events, 1, "only the batch taken after the disk healed is undelivered");
    assert_eq!(spool.recovery_report().damaged_regions, 0, "the failed write is no damage");
    spool.close().await;
}

#[tokio::test]
async fn a_spool_opened_on_a_full_disk_delivers_what_it_holds_and_then_takes_batches() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(dir.path());
    s.segment_bytes = 4096;
    let spool = open(s.clone()).unwrap();
    // More than `MIN_ROOM` of segments: what delivery frees is all the room there will be.
    for i in 0..100 {
        spool.append((0..20).map(|k| ev(i * 20 + k, "1")).collect(), now_secs()).await.unwrap();
    }
    spool.close().await;
    let disk = SmallDisk::new(dir.path(), 0);
    disk.capacity.store(disk.used(), std::sync::atomic::Ordering::SeqCst);
    s.io = disk.clone();
    let spool = open(s).expect("a full disk is no reason not to start");
    let st = spool.stats();
    assert!(st.disk_full && st.events == 2000, "{st:?}");
    let refused = spool.append(vec![ev(1_000_000, "1")], now_secs()).await.unwrap_err();
    assert!(matches!(refused, SpoolError::NoRoom { .. }), "{refused}");
    let got = read_all(&spool).await;
    assert_eq!(got.len(), 2000, "everything it holds is delivered");
    spool.ack(got.iter().map(|s| s.seq).collect()).await;
    wait_until_writable(&spool).await;
    assert_eq!(spool.append(vec![ev(1_000_000, "1")], now_secs()).await.unwrap().stored, 1);
    spool.close().await;
    let spool = open(settings(dir.path())).unwrap();
    assert_eq!(spool.stats().events, 1);
    spool.close().await;
}

#[test]
fn a_wall_clock_jump_moves_no_heartbeat_and_no_stall_check() {
    use crate::clock::seam::{advance_monotonic, jump_wall};
    let after = Duration::from_secs(5);
    // The writer finished a group just now and has work queued.
    let hb = Heartbeat::default();
    hb.last_commit_ms.store(monotonic_millis(), Ordering::Relaxed);
    hb.queued.store(1, Ordering::Relaxed);
    // Forward by ten minutes: nothing looks stuck.
    jump_wall(600_000);
    assert_eq!(hb.stalled_for(after), None, "a forward jump makes the writer look stuck");
    // Back by twenty minutes, and the writer really is stuck for ten seconds: it is seen.
    jump_wall(-1_200_000);
    hb.busy_since_ms.store(monotonic_millis(), Ordering::Relaxed);
    advance_monotonic(10_000);
    let stalled = hb.stalled_for(after).expect("a backward jump hides a stuck writer");
    assert!(stalled >= Duration::from_secs(10) && stalled < Duration::from_secs(11), "{stalled:?}");
    // The wall clock did jump, for what it is for (when things happened).
    let wall = now_secs();
    jump_wall(600_000);
    assert!(now_secs() - wall >= 599, "the seam moves the wall clock");
}

#[tokio::test]
async fn undelivered_gauges_follow_acknowledgements_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(settings(dir.path())).unwrap();
    spool.append((1..=4).map(|i| ev(i, "1")).collect(), 100).await.unwrap();
    spool.append((5..=6).map(|i| ev(i, "1")).collect(), 200).await.unwrap();
    let total: u64 = (1..=6).map(|i| ev(i, "1").value.len() as u64).sum();
    let st = spool.stats();
    assert_eq!((st.events, st.bytes, st.oldest_received_at), (6, total, Some(100)));
    let got = read_all(&spool).await;
    spool.ack(got.iter().take(4).map(|s| s.seq).collect()).await;
    spool.ack(vec![got[0].seq]).await;
    let left = |s: &Spool| {
        let st = s.stats();
        (st.events, st.oldest_received_at)
    };
    // Acknowledgements are applied after their group: wait for them, bounded.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while left(&spool) != (2, Some(200)) {
        assert!(std::time::Instant::now() < deadline, "{:?}", spool.stats());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let bytes = spool.stats().bytes;
    assert!(bytes > 0 && bytes < total, "in proportion within a partly delivered segment: {bytes} of {total}");
    spool.close().await;
    let spool = open(settings(dir.path())).unwrap();
    assert_eq!(left(&spool), (2, Some(200)), "the same after a restart");
    let seqs: Vec<u64> = read_all(&spool).await.iter().map(|s| s.seq).collect();
    assert_eq!(seqs, got[4..].iter().map(|s| s.seq).collect::<Vec<_>>(), "only the unacknowledged are read again");
    spool.close().await;
}

#[tokio::test]
async fn a_read_stops_at_its_byte_budget_and_the_next_one_goes_on_from_there() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(settings(dir.path())).unwrap();
    let events: Vec<Event> = (10..40).map(|n| ev(n, "1")).collect();
    let each = events[0].value.len();
    spool.append(events, 1).await.unwrap();
    let mut r = spool.reader();
    // Three values' worth and a byte: the fourth event is the one that crosses the budget.
    let first = r.read_now(1000, 3 * each + 1, &HashSet::new()).unwrap().events;
    assert_eq!(first.len(), 4, "stops after the event that reaches the budget");
    // A budget smaller than one event still returns one: a large event is never stuck.
    let one = r.read_now(1000, 1, &HashSet::new()).unwrap().events;
    assert_eq!(one.len(), 1);
    let rest = r.read_now(1000, usize::MAX, &HashSet::new()).unwrap().events;
    let seqs: Vec<u64> = first.iter().chain(&one).chain(&rest).map(|s| s.seq).collect();
    assert_eq!(seqs.len(), 30, "nothing skipped or repeated across reads");
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    spool.close().await;
}

/// A disk whose write panics once armed: a bug in the writer's thread, as a panic anywhere there.
struct PanickingIo(std::sync::atomic::AtomicBool);

impl SegmentIo for PanickingIo {
    fn write_all(&self, file: &mut std::fs::File, buf: &[u8]) -> std::io::Result<()> {
        assert!(!self.0.load(std::sync::atomic::Ordering::SeqCst), "injected: the spool writer panics");
        file.write_all(buf)
    }
}

#[tokio::test]
async fn a_writer_that_panics_fails_liveness_at_once_and_acknowledges_nothing_more() {
    let dir = tempfile::tempdir().unwrap();
    let io = Arc::new(PanickingIo(std::sync::atomic::AtomicBool::new(false)));
    let mut s = settings(dir.path());
    s.io = io.clone();
    let spool = open(s).unwrap();
    spool.append(vec![ev(1, "a")], 1).await.expect("a healthy writer stores");
    let long = Duration::from_secs(3600);
    assert_eq!(spool.writer_stalled_for(long), None);
    io.0.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(spool.append(vec![ev(2, "a")], 1).await.is_err(), "no batch is answered as stored after the panic");
    // Liveness fails at once, however long the stall limit, and whether or not work is queued.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while spool.writer_stalled_for(long).is_none() {
        assert!(std::time::Instant::now() < deadline, "a dead writer still looks alive");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(spool.append(vec![ev(3, "a")], 1).await.is_err());
    assert!(spool.writer_stalled_for(long).is_some());
}

/// A disk whose syncs wait while it is held.
struct HeldIo(std::sync::Mutex<bool>, std::sync::Condvar);

impl SegmentIo for HeldIo {
    fn sync_data(&self, file: &std::fs::File) -> std::io::Result<()> {
        let held = self.0.lock().unwrap();
        drop(self.1.wait_while(held, |h| *h).unwrap());
        file.sync_data()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_given_up_while_the_queue_is_full_leaves_no_phantom_work_for_liveness() {
    let dir = tempfile::tempdir().unwrap();
    let io = Arc::new(HeldIo(std::sync::Mutex::new(false), std::sync::Condvar::new()));
    let mut s = settings(dir.path());
    s.io = io.clone();
    let spool = open(s).unwrap();
    *io.0.lock().unwrap() = true;
    // The writer waits in a sync; the queue fills behind it.
    let mut waiting = Vec::new();
    let first = spool.spool.clone();
    waiting.push(tokio::spawn(async move { first.append(vec![ev(0, "a")], 1).await }));
    tokio::time::sleep(Duration::from_millis(200)).await;
    for i in 1..(QUEUE as u32 + 8) {
        let spool = spool.spool.clone();
        waiting.push(tokio::spawn(async move { spool.append(vec![ev(i, "a")], 1).await }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A client hangs up while its append waits for room in the full queue.
    let given_up = tokio::time::timeout(Duration::from_millis(100), spool.append(vec![ev(999_999, "b")], 1)).await;
    assert!(given_up.is_err(), "the queue was full: the append waited");
    *io.0.lock().unwrap() = false;
    io.1.notify_all();
    for w in waiting {
        w.await.unwrap().expect("stored");
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while spool.queue.shared.heartbeat.queued.load(Ordering::Relaxed) != 0 {
        assert!(std::time::Instant::now() < deadline, "a command given up is still counted as queued");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // With nothing queued, an idle writer is not stuck however long it idles.
    assert_eq!(spool.writer_stalled_for(Duration::ZERO), None);
    spool.close().await;
}

#[tokio::test]
async fn a_lost_dedup_journal_costs_recovery_no_more_ids_than_the_window_holds() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(settings(dir.path())).unwrap();
    spool.append((1..=50).map(|i| ev(i, "1")).collect(), now_secs()).await.unwrap();
    spool.close().await;
    drop(spool);
    // The journal is lost (another volume, an operator's cleanup): every stored id is missing from it.
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let path = entry.unwrap().path();
        if path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("dedup-")) {
            std::fs::remove_file(path).unwrap();
        }
    }
    let mut dedup = dedup::Dedup::new(dir.path(), 3600, 10);
    let r = recovery::recover(dir.path(), recovery::Access::Repair, &mut dedup, now_secs()).unwrap();
    let newest: Vec<EventId> = (41..=50).map(|i| ev(i, "1").id).collect();
    assert_eq!(
        r.ids.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        newest,
        "the newest ids, as many as the window holds"
    );
    assert_eq!(r.undelivered.len(), 50, "every event is still recovered");
}
