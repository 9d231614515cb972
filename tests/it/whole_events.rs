//! Events of any accepted size reach consumers whole (compressed, or as a claim check resolved from
//! the file store), the dead-letter topic never gets a stub, and `dead-letter replay` republishes
//! dead letters once — against a real broker (tansu), the daemon as a real process.

use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use sha2::{Digest, Sha256};

use crate::common::*;

const TOPIC: &str = "huggy.receivedMessage";
const DLQ: &str = "huggy.dead-letter";

/// A receivedMessage event of chat `chat` whose body is `body` (already JSON-escaped).
fn message(id: u64, chat: u64, body: &str) -> String {
    format!(
        r#"{{"id":"{id}","body":"{body}","is_internal":false,"is_email":true,"senderType":"email","file":null,"chat":{{"id":{chat}}},"company":{{"id":"42"}}}}"#
    )
}

/// ~1.5 MB of e-mail HTML: large, and compresses well.
fn compressible_body() -> String {
    let mut s = String::with_capacity(1_600_000);
    let mut i = 0;
    while s.len() < 1_500_000 {
        s.push_str(&format!("<tr><td class=\\\"c\\\">Linha {i}</td><td>Olá, tudo bem? Pedido n. {}</td></tr>", i * 7));
        i += 1;
    }
    s
}

/// ~`n` bytes of base64 of pseudo-random bytes: zstd cannot bring it under 1 MB.
fn incompressible_body(n: usize) -> String {
    const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            B64[(x >> 58) as usize] as char
        })
        .collect()
}

fn batch(messages: &[&str]) -> String {
    format!(r#"{{"time":1763700000,"messages":{{"receivedMessage":[{}]}},"token":"{LOAD_TOKEN}"}}"#, messages.join(","))
}

fn sha256_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// The bytes a record stands for: its value, or what its claim check points to, fetched with
/// `huggy-bridge claim-check get` and checked against the reference's digest and size.
fn resolve(d: &Daemon, r: &Rec) -> Vec<u8> {
    let Some(reference) = r.header("huggy_claim_check") else { return r.value.clone() };
    let reference: serde_json::Value = serde_json::from_str(reference).expect("the claim check is JSON");
    let location = reference["location"].as_str().expect("location");
    assert_eq!(r.header("ce_dataref"), Some(location), "ce_dataref is the location");
    let value: serde_json::Value = serde_json::from_slice(&r.value).expect("a claim check's value is JSON");
    assert_eq!(value["huggy_claim_check"], reference, "the value is the small JSON reference, never empty");
    let sha = reference["sha256"].as_str().expect("sha256");
    let out = d.command(&["claim-check", "get", location, "--sha256", sha]).output().expect("claim-check get runs");
    assert!(out.status.success(), "claim-check get: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.stdout.len() as u64, reference["size"].as_u64().expect("size"));
    assert_eq!(sha256_hex(&out.stdout), sha);
    out.stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_events_reach_consumers_whole_with_the_next_event_after_them_in_both_ack_modes() {
    let Some(bin) = real_broker_or_skip("large_events_whole") else { return };
    let big = message(1, 777, &compressible_body());
    let after_big = message(2, 777, "next after the e-mail");
    let huge = message(3, 777, &incompressible_body(3_500_000));
    let after_huge = message(4, 777, "next after the attachment");
    assert!(big.len() > 1_400_000 && huge.len() > 3_400_000 && huge.len() < 4 * 1024 * 1024 - 1_000);
    for mode in ["spool", "kafka"] {
        let tansu = Tansu::start(&bin, None);
        let dir = tempfile::tempdir().unwrap();
        topics_create(dir.path(), &tansu.bootstrap(), 3);
        let store = dir.path().join("store");
        let cfg = spool_config(&tansu.bootstrap(), &dir.path().join("spool"))
            .set("delivery.ack", mode)
            .set("files.store", format!("file://{}", store.display()));
        let d = Daemon::start(dir.path(), &cfg).await;
        for body in [batch(&[&big, &after_big]), batch(&[&huge, &after_huge])] {
            let (status, text) = post(&d.url(), body).await;
            assert_eq!(status, 200, "{mode}: {text}");
        }
        wait_for("published", Duration::from_secs(60), async || {
            (d.metric("huggy_bridge_events_published_total{type=\"receivedMessage\"}").await == 4.0).then_some(())
        })
        .await;
        let recs = read_topics_async(&tansu.bootstrap(), &[TOPIC, DLQ]).await;
        assert!(recs.iter().all(|r| r.topic == TOPIC), "{mode}: nothing in the dead-letter topic, stub or otherwise");
        let chat: Vec<&Rec> = recs.iter().filter(|r| r.key.as_deref() == Some("777")).collect();
        assert_eq!(chat.len(), 4, "{mode}");
        let got: Vec<Vec<u8>> = chat.iter().map(|r| resolve(&d, r)).collect();
        let want: Vec<&[u8]> = vec![big.as_bytes(), after_big.as_bytes(), huge.as_bytes(), after_huge.as_bytes()];
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                g.as_slice() == *w,
                "{mode}: record {i} of the chat is not the event's exact bytes (or out of order)"
            );
        }
        assert!(chat[0].header("huggy_claim_check").is_none(), "{mode}: 1.5 MB of HTML fits once compressed");
        assert!(chat[2].header("huggy_claim_check").is_some(), "{mode}: 3.5 MB of noise is a claim check");
        assert!(chat
            .iter()
            .all(|r| r.header("ce_id").is_some() && r.header("ce_type") == Some("app.huggy.receivedMessage")));
        assert_eq!(d.metric("huggy_bridge_claim_checks_total{topic=\"event\"}").await, 1.0, "{mode}");
        assert!(d.metric("huggy_bridge_claim_check_bytes_total").await >= 3_400_000.0, "{mode}");
    }
}

/// Runs `dead-letter replay` with `args`; returns its stdout and the numbers of its summary line
/// (replayed, skipped, left, already replayed by an earlier run and read again).
async fn replay(d: &Daemon, args: &[&str]) -> (String, [u64; 4]) {
    let mut all = vec!["dead-letter", "replay"];
    all.extend_from_slice(args);
    let mut cmd = d.command(&all);
    let out = tokio::task::spawn_blocking(move || cmd.output()).await.unwrap().expect("replay runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "replay {args:?} failed: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    let summary = stdout.lines().last().unwrap_or_default().to_owned();
    let n: Vec<u64> =
        summary.split(|c: char| !c.is_ascii_digit()).filter(|s| !s.is_empty()).map(|s| s.parse().unwrap()).collect();
    assert_eq!(n.len(), 4, "summary: {summary}");
    (stdout, [n[0], n[1], n[2], n[3]])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_replayed_once_filtered_and_what_still_cannot_be_published_is_left() {
    let Some(bin) = real_broker_or_skip("dead_letter_replay") else { return };
    let tansu = Tansu::start(&bin, None);
    let dir = tempfile::tempdir().unwrap();
    topics_create(dir.path(), &tansu.bootstrap(), 3);
    let store = dir.path().join("store");
    let cfg = spool_config(&tansu.bootstrap(), &dir.path().join("spool"))
        .set("files.store", format!("file://{}", store.display()));
    let d = Daemon::start(dir.path(), &cfg).await;

    // Dead letters of the bridge's own making: an event list that is an object instead of an array
    // (the object is an event: publishable), a list element that is no object (never publishable),
    // and a 3.5 MB object list that does not fit the dead-letter topic (a claim check there).
    let lone = message(10, 555, "sent without its array");
    let lone_huge = message(11, 556, &incompressible_body(3_500_000));
    for body in [
        format!(
            r#"{{"time":1763700000,"messages":{{"receivedMessage":{lone},"closedChat":["not an object"]}},"token":"{LOAD_TOKEN}"}}"#
        ),
        format!(r#"{{"time":1763700001,"messages":{{"receivedMessage":{lone_huge}}},"token":"{LOAD_TOKEN}"}}"#),
    ] {
        let (status, text) = post(&d.url(), body).await;
        assert_eq!(status, 200, "{text}");
    }
    // Dead letters written by another producer with the documented headers.
    let producer: FutureProducer =
        ClientConfig::new().set("bootstrap.servers", tansu.bootstrap()).create().expect("producer");
    let manual = [
        ("closedChat", "0123456789abcdef0123456789abcdef", r#"{"id":900,"situation":"finished"}"#, "manual-fix"),
        (
            "receivedMessage",
            "fedcba9876543210fedcba9876543210",
            r#"{"id":"901","body":"hand-made","chat":{"id":557}}"#,
            "manual-fix",
        ),
    ];
    for (t, id, value, reason) in manual {
        let ce_type = format!("app.huggy.{t}");
        let headers = OwnedHeaders::new()
            .insert(Header { key: "ce_specversion", value: Some("1.0") })
            .insert(Header { key: "ce_id", value: Some(id) })
            .insert(Header { key: "ce_type", value: Some(ce_type.as_str()) })
            .insert(Header { key: "huggy_dlq_reason", value: Some(reason) })
            .insert(Header { key: "huggy_dlq_topic", value: Some("huggy.somewhere") });
        producer
            .send(FutureRecord::to(DLQ).key("557").payload(value).headers(headers), Duration::from_secs(10))
            .await
            .expect("dead letter produced");
    }
    wait_for("dead-lettered", Duration::from_secs(60), async || {
        (counter_total(&d, "huggy_bridge_events_dead_lettered_total").await == 3.0).then_some(())
    })
    .await;
    drained(&d, Duration::from_secs(30)).await;
    let dlq = read_topics_async(&tansu.bootstrap(), &[DLQ]).await;
    assert_eq!(dlq.len(), 5);
    let huge_dl =
        dlq.iter().find(|r| r.header("huggy_claim_check").is_some()).expect("a claim check in the dead-letter topic");
    assert_eq!(resolve(&d, huge_dl), lone_huge.as_bytes(), "the dead-letter topic got the bytes, not a stub");
    assert!(dlq.iter().all(|r| !r.value.is_empty()));
    assert_eq!(d.metric("huggy_bridge_claim_checks_total{topic=\"dead_letter\"}").await, 1.0);

    let (out, n) = replay(&d, &["--dry-run"]).await;
    assert_eq!(n, [4, 0, 1, 0], "{out}");
    assert!(out.contains("still not a JSON object"), "{out}");
    assert!(
        read_topics_async(&tansu.bootstrap(), &[TOPIC, "huggy.closedChat"]).await.is_empty(),
        "a dry run publishes nothing"
    );

    let (out, n) = replay(&d, &["--type", "closedChat", "--reason", "MANUAL"]).await;
    assert_eq!(n[0], 1, "{out}");
    assert_eq!(n[1], 4, "the others are filtered out: {out}");
    let (out, n) = replay(&d, &[]).await;
    assert_eq!((n[0], n[1], n[2]), (3, 0, 1), "{out}");
    assert!(out.contains("still not a JSON object"), "{out}");
    let (out, n) = replay(&d, &[]).await;
    assert_eq!((n[0], n[1], n[2]), (0, 0, 1), "a second run replays nothing and reports what is left: {out}");

    let recs = read_topics_async(&tansu.bootstrap(), &[TOPIC, "huggy.closedChat", DLQ]).await;
    let replayed: Vec<&Rec> = recs.iter().filter(|r| r.topic != DLQ).collect();
    assert_eq!(replayed.len(), 4, "each replayable dead letter published once");
    for r in &replayed {
        assert!(r.headers.keys().all(|k| !k.starts_with("huggy_dlq_")), "{:?}", r.headers);
        let original = dlq.iter().find(|o| o.header("ce_id") == r.header("ce_id")).expect("same ce_id");
        assert_eq!(r.key, original.key);
        assert_eq!(resolve(&d, r), resolve(&d, original), "same bytes");
    }
    assert_eq!(replayed.iter().filter(|r| r.topic == "huggy.closedChat").count(), 1);
    let after: Vec<&Rec> = recs.iter().filter(|r| r.topic == DLQ).collect();
    let (dead, markers): (Vec<&Rec>, Vec<&Rec>) = after.iter().partition(|r| r.header("huggy_dlq_reason").is_some());
    assert_eq!(dead.len(), 5, "nothing re-dead-lettered");
    assert_eq!(markers.len(), 4, "one replay marker per replayed record");
    for m in &markers {
        let at = m.header("huggy_dlq_replayed").expect("a replay marker");
        let (p, o) = at.split_once(':').expect("partition:offset");
        let named = dead
            .iter()
            .find(|r| r.partition.to_string() == p && r.offset.to_string() == o)
            .expect("names a dead letter");
        assert_eq!(m.partition, named.partition, "a marker goes to the partition of its record");
        assert_eq!(m.header("ce_id"), named.header("ce_id"));
        assert!(replayed.iter().any(|r| r.header("ce_id") == named.header("ce_id")));
    }
}

async fn counter_total(d: &Daemon, name: &str) -> f64 {
    let text = reqwest::get(format!("http://{}/metrics", d.admin)).await.unwrap().text().await.unwrap();
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A record refused as too large although the bridge thought it fitted (here librdkafka's own
/// limit, lowered through the passthrough; in production a topic's limit lowered while the daemon
/// runs) is sent as a claim check, not dead-lettered, and the key's next event follows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_refused_as_too_large_becomes_a_claim_check_not_a_dead_letter() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = inprocess_config(dir.path(), &[LOAD_TOKEN]);
    cfg.kafka.librdkafka.insert("message.max.bytes".into(), "300000".into());
    cfg.files.store = format!("file://{}", dir.path().join("store").display());
    let d = TestApp::start(cfg.clone()).await;
    let refused = message(20, 888, &incompressible_body(500_000));
    let next = message(21, 888, "after the refused one");
    let (status, text) = post(&d.url(), batch(&[&refused, &next])).await;
    assert_eq!(status, 200, "{text}");
    wait_for("published", Duration::from_secs(30), async || (d.published() == 2).then_some(())).await;
    assert_eq!(d.dead_lettered(), 0);
    let recs = d.records(&[TOPIC, DLQ]).await;
    assert!(recs.iter().all(|r| r.topic == TOPIC), "nothing dead-lettered");
    assert_eq!(recs.len(), 2);
    let reference: serde_json::Value =
        serde_json::from_str(recs[0].header("huggy_claim_check").expect("a claim check")).unwrap();
    let location = reference["location"].as_str().unwrap().strip_prefix("file://").unwrap();
    assert_eq!(std::fs::read(location).unwrap(), refused.as_bytes());
    assert_eq!(recs[1].value, next.as_bytes(), "the key's next event after the claim check");
    assert_eq!(d.metric("huggy_bridge_claim_checks_total{topic=\"event\"}").await, 1.0);
    d.stop().await;
}

/// An event too large for its topic whose claim check cannot be stored (the store refuses the
/// write) goes back to its chat's lane, and the chat's next event, sent in the same round, waits
/// behind it: consumers never see the later event first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_check_that_cannot_be_stored_holds_back_the_chats_later_events() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = inprocess_config(dir.path(), &[LOAD_TOKEN]);
    cfg.kafka.librdkafka.insert("message.max.bytes".into(), "300000".into());
    let store = dir.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    // A file where the store's `claim-checks/` directory goes: every claim check fails to store.
    let blocker = store.join("claim-checks");
    std::fs::write(&blocker, b"not a directory").unwrap();
    cfg.files.store = format!("file://{}", store.display());
    let d = TestApp::start(cfg.clone()).await;
    let large = message(30, 999, &incompressible_body(500_000));
    let next = message(31, 999, "after the large one");
    let other = message(32, 1000, "another chat");
    let (status, text) = post(&d.url(), batch(&[&large, &next, &other])).await;
    assert_eq!(status, 200, "{text}");
    wait_for("the other chat published", Duration::from_secs(30), async || (d.published() >= 1).then_some(())).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(d.published(), 1, "only the other chat: the large event's chat waits behind it");
    // The store takes writes again: the chat goes on, in order.
    std::fs::remove_file(&blocker).unwrap();
    wait_for("published", Duration::from_secs(60), async || (d.published() == 3).then_some(())).await;
    let recs = d.records(&[TOPIC, DLQ]).await;
    assert!(recs.iter().all(|r| r.topic == TOPIC), "nothing dead-lettered");
    let chat: Vec<&Rec> = recs.iter().filter(|r| r.key.as_deref() == Some("999")).collect();
    assert_eq!(chat.len(), 2);
    assert!(chat[0].header("huggy_claim_check").is_some(), "the large event first, as a claim check");
    assert_eq!(chat[1].value, next.as_bytes(), "then the chat's next event");
    d.stop().await;
}
