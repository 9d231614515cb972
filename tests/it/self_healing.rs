//! Delivery that heals itself (issue: self-healing delivery): an event whose batch `time` is odd
//! (milliseconds, past year 9999) is published like any other and never stops delivery for anyone
//! else — neither while the daemon runs nor after a restart that finds it in the spool — and a
//! background stage that panics is restarted, counted, and delivery goes on.

use std::time::Duration;

use crate::common::*;

/// A batch of one receivedMessage (body `marker`, chat `chat`) with the batch `time` given as-is.
fn batch_with_time(token: &str, time: &str, id: u64, chat: u64, marker: &str) -> String {
    format!(
        r#"{{"time":{time},"token":"{token}","messages":{{"receivedMessage":[{{"id":"{id}","body":"{marker}","is_internal":false,"senderType":"whatsapp","file":null,"chat":{{"id":{chat}}},"company":{{"id":"42"}}}}]}}}}"#
    )
}

fn by_marker(recs: &[Rec]) -> std::collections::HashMap<String, Rec> {
    recs.iter()
        .map(|r| {
            let v: serde_json::Value = serde_json::from_slice(&r.value).expect("record is JSON");
            (v["body"].as_str().unwrap_or_default().to_owned(), r.clone())
        })
        .collect()
}

const PUBLISHED: &str = "huggy_bridge_events_published_total{type=\"receivedMessage\"}";

/// Two tokens, so "another account" is a batch that shares nothing with the odd ones.
fn two_tokens() -> (String, String) {
    let t = fixture_tokens();
    assert!(t.len() >= 2, "the fixtures carry at least two tokens");
    (t[0].clone(), t[1].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_batch_times_are_published_and_never_stop_other_accounts_even_across_a_restart() {
    let Some(bin) = real_broker_or_skip("odd_batch_times") else { return };
    let b = cuttable_broker(&bin);
    let (a, other) = two_tokens();
    let cfg = spool_config(&b.via_proxy, &b.dir.path().join("spool"));
    let mut d = Daemon::start(b.dir.path(), &cfg).await;

    // While running: milliseconds, past year 9999 (seconds and milliseconds), then another account.
    let live = [
        batch_with_time(&a, "1763700000123", 1, 501, "live-ms"),
        batch_with_time(&a, "253402300800", 2, 502, "live-y10000-secs"),
        batch_with_time(&a, "253402300800000", 3, 503, "live-y10000-ms"),
        batch_with_time(&other, "1763700000", 4, 504, "live-other"),
    ];
    for body in &live {
        let (status, text) = post(&d.url(), body.clone()).await;
        assert_eq!(status, 200, "{text}");
    }
    wait_for("the live batches published", Duration::from_secs(60), async || {
        (d.metric(PUBLISHED).await >= 4.0).then_some(())
    })
    .await;

    // Across a restart: the same kinds of batches wait in the spool (Kafka cut off), the daemon is
    // killed, and the next one finds them at recovery.
    b.proxy.cut();
    let spooled = [
        batch_with_time(&a, "1763700000456", 11, 511, "spooled-ms"),
        batch_with_time(&a, "253402300800", 12, 512, "spooled-y10000-secs"),
        batch_with_time(&other, "1763700001", 13, 514, "spooled-other"),
    ];
    for body in &spooled {
        let (status, text) = post(&d.url(), body.clone()).await;
        assert_eq!(status, 200, "{text}");
    }
    d.kill9();
    b.proxy.restore();
    let d = Daemon::start(b.dir.path(), &cfg).await;
    drained(&d, Duration::from_secs(60)).await;
    let (status, text) = post(&d.url(), batch_with_time(&other, "1763700002", 21, 524, "after-restart-other")).await;
    assert_eq!(status, 200, "{text}");
    wait_for("the batch after the restart published", Duration::from_secs(60), async || {
        (d.metric(PUBLISHED).await >= 4.0).then_some(())
    })
    .await;
    drained(&d, Duration::from_secs(60)).await;

    let recs = by_marker(&read_topics_async(&b.via_proxy, &["huggy.receivedMessage"]).await);
    let ce_time = |m: &str| {
        let r = recs.get(m).unwrap_or_else(|| panic!("{m} not published; log:\n{}", d.log_text()));
        assert!(r.header("ce_id").is_some(), "{m}: a full record");
        r.header("ce_time").map(str::to_owned)
    };
    assert_eq!(ce_time("live-ms").as_deref(), Some("2025-11-21T04:40:00.123Z"), "milliseconds read as such");
    assert_eq!(ce_time("live-y10000-secs"), None, "an implausible time is left out");
    assert_eq!(ce_time("live-y10000-ms"), None, "an implausible time is left out");
    assert_eq!(ce_time("live-other").as_deref(), Some("2025-11-21T04:40:00Z"));
    assert_eq!(ce_time("spooled-ms").as_deref(), Some("2025-11-21T04:40:00.456Z"));
    assert_eq!(ce_time("spooled-y10000-secs"), None);
    assert_eq!(ce_time("spooled-other").as_deref(), Some("2025-11-21T04:40:01Z"));
    assert_eq!(ce_time("after-restart-other").as_deref(), Some("2025-11-21T04:40:02Z"));
    assert!(!d.log_text().contains("panicked"), "no stage panicked; log:\n{}", d.log_text());
}
