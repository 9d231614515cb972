use std::io::Write;

use super::*;
use crate::event::{EventId, EventType, KnownType};

fn settings(dir: &Path) -> SpoolSettings {
    SpoolSettings { dir: dir.to_owned(), max_bytes: 1 << 30, dedup_window_secs: 3600, segment_bytes: SEGMENT_BYTES }
}

fn ev(n: u32, key: &str) -> Event {
    let value = format!(r#"{{"id":{n},"chat":{{"id":{key}}}}}"#).into_bytes();
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
    }
}

async fn read_all(spool: &Spool) -> Vec<Stored> {
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
    let spool = Spool::open(settings(dir.path())).unwrap();
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

    let spool = Spool::open(settings(dir.path())).unwrap();
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
    let spool = Spool::open(settings(dir.path())).unwrap();
    let r = spool.append(vec![ev(1, "1"), ev(1, "1"), ev(2, "1")], now_secs()).await.unwrap();
    assert_eq!((r.stored, r.duplicates), (2, 1));
    assert_eq!(r.seqs, vec![Some(1), None, Some(2)]);
    spool.close().await;
    let spool = Spool::open(settings(dir.path())).unwrap();
    let r = spool.append(vec![ev(1, "1"), ev(3, "1")], now_secs()).await.unwrap();
    assert_eq!((r.stored, r.duplicates), (1, 1));
    spool.close().await;
}

#[tokio::test]
async fn ids_in_segments_are_remembered_even_if_the_dedup_log_was_lost() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(settings(dir.path())).unwrap();
    spool.append(vec![ev(1, "1")], now_secs()).await.unwrap();
    spool.close().await;
    // The dedup log is synced lazily: a crash may lose its tail. The segment still has the id.
    for (_, p) in list_numbered(dir.path(), "dedup-").unwrap() {
        std::fs::write(p, b"").unwrap();
    }
    let spool = Spool::open(settings(dir.path())).unwrap();
    let r = spool.append(vec![ev(1, "1")], now_secs()).await.unwrap();
    assert_eq!((r.stored, r.duplicates), (0, 1));
    spool.close().await;
}

#[tokio::test]
async fn full_spool_refuses_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(dir.path());
    s.max_bytes = 100;
    let spool = Spool::open(s).unwrap();
    spool.append(vec![ev(1, "1"), ev(2, "1")], 1).await.unwrap();
    let err = spool.append((3..10).map(|i| ev(i, "1")).collect(), 1).await.unwrap_err();
    assert!(matches!(err, SpoolError::Full { .. }), "{err}");
    assert_eq!(spool.stats().events, 2);
    // Refused ids are not remembered as seen: the retry is stored once there is room.
    let seqs: Vec<u64> = read_all(&spool).await.iter().map(|s| s.seq).collect();
    spool.ack(seqs).await;
    let r = spool.append(vec![ev(3, "1")], 1).await.unwrap();
    assert_eq!(r.stored, 1);
    spool.close().await;
}

#[tokio::test]
async fn torn_tail_is_discarded_and_everything_before_it_kept() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(settings(dir.path())).unwrap();
    spool.append((0..5).map(|i| ev(i, "1")).collect(), 1).await.unwrap();
    spool.close().await;
    let newest = list_numbered(dir.path(), "segment-").unwrap().pop().unwrap().1;
    let good_len = std::fs::metadata(&newest).unwrap().len();
    // A write cut short: a header announcing 500 bytes, and 20 of them.
    let mut f = OpenOptions::new().append(true).open(&newest).unwrap();
    f.write_all(&500u32.to_le_bytes()).unwrap();
    f.write_all(&[0xAB; 24]).unwrap();
    drop(f);

    let spool = Spool::open(settings(dir.path())).unwrap();
    assert_eq!(spool.stats().events, 5);
    assert_eq!(std::fs::metadata(&newest).unwrap().len(), good_len, "torn bytes truncated");
    assert_eq!(read_all(&spool).await.len(), 5);
    spool.append(vec![ev(9, "1")], 1).await.unwrap();
    spool.close().await;
    let spool = Spool::open(settings(dir.path())).unwrap();
    assert_eq!(spool.stats().events, 6, "appends after recovery are readable");
    spool.close().await;
}

#[tokio::test]
async fn checksum_mismatch_at_the_tail_is_a_torn_write() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(settings(dir.path())).unwrap();
    spool.append(vec![ev(1, "1")], 1).await.unwrap();
    spool.append(vec![ev(2, "1")], 1).await.unwrap();
    spool.close().await;
    let newest = list_numbered(dir.path(), "segment-").unwrap().pop().unwrap().1;
    let mut bytes = std::fs::read(&newest).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xFF;
    std::fs::write(&newest, &bytes).unwrap();
    let spool = Spool::open(settings(dir.path())).unwrap();
    assert_eq!(spool.stats().events, 1, "only the damaged, last frame is discarded");
    spool.close().await;
}

#[tokio::test]
async fn segments_roll_over_and_acknowledged_ones_are_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(dir.path());
    s.segment_bytes = 512;
    let spool = Spool::open(s.clone()).unwrap();
    for i in 0..40 {
        spool.append(vec![ev(i, "1")], 1).await.unwrap();
    }
    let segments = list_numbered(dir.path(), "segment-").unwrap().len();
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
        left = list_numbered(dir.path(), "segment-").unwrap().len();
        if left <= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(left <= 2, "{left} segments left after everything old was acknowledged");
    spool.close().await;
    let spool = Spool::open(s).unwrap();
    assert_eq!(spool.stats().events, 2);
    spool.close().await;
}

#[test]
fn ranges_merge() {
    assert_eq!(to_ranges(&mut [5, 1, 2, 3, 9, 8]), vec![(1, 3), (5, 5), (8, 9)]);
}
