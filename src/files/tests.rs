//! Unit tests of file capture: the queue's order, failures' reports, object keys, URLs.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::capture::{deadline_in, Queued};
use super::download::{cannot_finish, object_key, Failure};
use super::fetch::{RedirectRefused, Refusal};
use super::*;
use crate::metrics::FileOutcome;

fn item(base: Instant, deadline: i64, order: u64) -> Reverse<Queued> {
    let deadline = deadline_in(base, deadline);
    Reverse(Queued { deadline, order, job: 0, index: 0, host: Arc::from("h:80") })
}

#[test]
fn the_queue_serves_earliest_deadline_first_then_arrival() {
    let base = Instant::now();
    let mut heap = BinaryHeap::new();
    for (d, o) in [(30, 0), (10, 1), (20, 2), (10, 3), (5, 4), (30, 5)] {
        heap.push(item(base, d, o));
    }
    let popped: Vec<(i64, u64)> = std::iter::from_fn(|| heap.pop())
        .map(|Reverse(q)| (q.deadline.duration_since(base).as_secs() as i64, q.order))
        .collect();
    assert_eq!(popped, vec![(5, 4), (10, 1), (10, 3), (20, 2), (30, 0), (30, 5)]);
}

#[test]
fn each_failure_has_one_final_result_and_a_readable_report() {
    assert_eq!(Failure::Expired.metric(), FileOutcome::Expired);
    assert_eq!(Failure::Expired.report(), "expired");
    assert_eq!(Failure::AckTimeout.metric(), FileOutcome::AckTimeout);
    assert_eq!(Failure::AckTimeout.report(), "ack_timeout");
    assert_eq!(Failure::Rejected(403).metric(), FileOutcome::Expired);
    assert_eq!(Failure::TooLarge(9).metric(), FileOutcome::TooLarge);
    assert_eq!(Failure::Status(502).metric(), FileOutcome::Failed);
    let redirect = Failure::Redirect(RedirectRefused(Refusal::Internal("169.254.169.254".parse().unwrap())));
    assert_eq!(redirect.metric(), FileOutcome::Refused);
    assert_eq!(redirect.report(), "refused: redirect refused: url points at an internal address (169.254.169.254)");
    assert_eq!(Failure::from(Refusal::NotAllowed).report(), "refused: url is outside files.allowed_url_prefixes");
    assert!(Failure::Status(503).retryable() && Failure::Stalled(Duration::from_secs(1)).retryable());
    assert!(!Failure::Expired.retryable() && !Failure::AckTimeout.retryable() && !Failure::Status(404).retryable());
}

#[test]
fn two_files_of_one_event_never_share_an_object_whatever_their_names() {
    let id = EventId([7; 16]);
    let keys: Vec<String> = [(0, "1-x.pdf"), (1, "x.pdf"), (2, "x.pdf"), (10, "x.pdf"), (1, "0-x.pdf")]
        .iter()
        .map(|&(i, n)| object_key(Some("15693"), 1_763_700_000, id, i, n))
        .collect();
    let distinct: HashSet<&String> = keys.iter().collect();
    assert_eq!(distinct.len(), keys.len(), "{keys:?}");
    assert_eq!(keys[1], format!("15693/2025/11/21/{id}/1/x.pdf"));
    assert_ne!(keys[0], keys[1], "file 0 named 1-x.pdf and file 1 named x.pdf");
    assert_eq!(object_key(None, 0, id, 0, "a"), format!("unknown/1970/01/01/{id}/0/a"));
}

#[test]
fn a_file_url_is_reported_without_its_query() {
    assert_eq!(without_query("https://files.huggy.app/a.pdf?token=s3cr3t&x=1"), "https://files.huggy.app/a.pdf");
    assert_eq!(without_query("https://files.huggy.app/a.pdf#token=s3cr3t"), "https://files.huggy.app/a.pdf");
    assert_eq!(without_query("https://files.huggy.app/a.pdf"), "https://files.huggy.app/a.pdf");
    let r = FileResult::failed("https://h/x?token=s3cr3t", "expired".into());
    assert!(!String::from_utf8(results_json(&[r])).unwrap().contains("s3cr3t"));
}

#[test]
fn a_transfer_is_given_up_only_when_its_own_pace_cannot_make_it() {
    let deadline = Duration::from_secs(10);
    let second = Duration::from_secs(1);
    // 1 MB/s so far, 5 MB left, 10 s left: fine.
    assert!(!cannot_finish(Some(6_000_000), 1_000_000, second, deadline));
    // 100 kB/s so far, 5 MB left: 35 s even 40 % faster.
    assert!(cannot_finish(Some(5_100_000), 100_000, second, deadline));
    // Unknown length, or too early to judge.
    assert!(!cannot_finish(None, 100_000, second, deadline));
    assert!(!cannot_finish(Some(5_100_000), 10_000, Duration::from_millis(100), deadline));
}

#[tokio::test]
async fn a_download_that_panics_fails_its_file_and_frees_its_slot() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let cfg = crate::config::FilesConfig {
        store: format!("file://{}", dir.path().join("files").display()),
        ..Default::default()
    };
    let metrics = Arc::new(crate::metrics::Metrics::new());
    let (tx, _rx) = tokio::sync::mpsc::channel(1);
    let capture = FileCapture::new(&cfg, metrics.clone(), tx).expect("a capture stage");
    capture.panic_next.store(true, std::sync::atomic::Ordering::Release);
    let stop = tokio_util::sync::CancellationToken::new();
    capture.spawn_workers(stop.clone());
    // Two files outside `files.allowed_url_prefixes`: the one whose download runs first panics,
    // the other is refused.
    let (reply, done) = tokio::sync::oneshot::channel();
    capture.submit(FileJob {
        event_id: EventId([3; 16]),
        company: None,
        received_at: crate::clock::now_secs(),
        urls: vec!["https://elsewhere.example/a.pdf".into(), "https://elsewhere.example/b.pdf".into()],
        completion: Completion::Reply(reply),
    });
    let member = tokio::time::timeout(Duration::from_secs(10), done)
        .await
        .expect("the job finishes although a download panicked")
        .expect("a reply");
    let results: serde_json::Value = serde_json::from_slice(&member).expect("json");
    let errors: Vec<&str> =
        results.as_array().expect("an array").iter().map(|r| r["error"].as_str().unwrap()).collect();
    assert_eq!(results.as_array().unwrap().len(), 2, "{results}");
    assert!(results.as_array().unwrap().iter().all(|r| r["status"] == "failed"), "{results}");
    assert_eq!(errors.iter().filter(|e| **e == "capture panicked").count(), 1, "{results}");
    assert_eq!(errors.iter().filter(|e| e.starts_with("refused")).count(), 1, "{results}");
    assert_eq!(capture.active.load(std::sync::atomic::Ordering::Acquire), 0, "the panicked download's slot is free");
    assert_eq!(metrics.file_downloads.with_label_values(&[FileOutcome::Failed.label()]).get(), 1);
    stop.cancel();
    capture.stopped().await;
}
