//! What consumers rely on beyond the value (SPEC §5): record timestamps that say when things
//! happened, even after a Kafka outage, and partitions that match what Java clients (Kafka Streams,
//! ksqlDB, the Java producer) pick for the same key.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::common::*;

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_timestamps_are_the_batch_time_after_a_broker_outage() {
    let Some(bin) = real_broker_or_skip("record_timestamps_are_the_batch_time") else { return };
    let CuttableBroker { _tansu, proxy, via_proxy, dir } = cuttable_broker(&bin);
    let d = Daemon::start(dir.path(), &spool_config(&via_proxy, &dir.path().join("spool"))).await;
    wait_for("ready", Duration::from_secs(20), async || ready(&d.admin).await.then_some(())).await;
    proxy.cut();
    wait_for("kafka seen unreachable", Duration::from_secs(30), async || {
        (d.metric("huggy_bridge_kafka_connected").await == 0.0).then_some(())
    })
    .await;
    for (name, body) in batch_fixtures() {
        let (status, text) = post(&d.url(), body).await;
        assert_eq!(status, 200, "{name}: {text}");
    }
    // A batch `time` that is no plausible time: no `ce_time`, and the record's timestamp is left to
    // the producer (the time it was handed the record).
    let odd_sent = now_ms();
    let odd = format!(
        r#"{{"time":5,"token":"{LOAD_TOKEN}","messages":{{"createdChat":[{{"id":77,"company":{{"id":1}}}}]}}}}"#
    );
    assert_eq!(post(&d.url(), odd).await.0, 200);
    assert!(d.metric("huggy_bridge_spool_events").await >= 25.0, "held in the spool while Kafka is cut off");
    proxy.restore();
    drained(&d, Duration::from_secs(90)).await;
    let topics = fixture_topics();
    let recs = read_topics_async(&via_proxy, &topics.iter().map(String::as_str).collect::<Vec<_>>()).await;
    // Every record's CreateTime is its batch time (checked per record), not the publish time.
    check_fixture_records(&recs, true);
    let odd = read_topics_async(&via_proxy, &["huggy.createdChat"]).await;
    assert_eq!(odd.len(), 1);
    let ts = odd[0].timestamp.expect("a CreateTime");
    assert!((odd_sent - 1000..=now_ms()).contains(&ts), "publish time {ts}, posted at {odd_sent}");
    assert_eq!(odd[0].header("ce_time"), None);
    assert_eq!(odd[0].header("ce_subject"), Some("chat/77"));
}

/// Kafka's `Utils.murmur2`, written from the Java reference: what every Java client hashes keys with.
fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h = SEED ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = chunks.remainder();
    if !tail.is_empty() {
        for (i, b) in tail.iter().enumerate().rev() {
            h ^= u32::from(*b) << (8 * i);
        }
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// Java's `Utils.toPositive(murmur2(key)) % partitions`.
fn java_partition(key: &str, partitions: i32) -> i32 {
    (murmur2(key.as_bytes()) & 0x7fff_ffff) % partitions
}

/// Kafka's `UtilsTest.testMurmur2` vectors: the hash above is Kafka's.
#[test]
fn murmur2_matches_kafkas_published_vectors() {
    let cases: [(&[u8], i32); 6] = [
        (b"21", -973_932_308),
        (b"foobar", -790_332_482),
        (b"a-little-bit-long-string", -985_981_536),
        (b"a-little-bit-longer-string", -1_486_304_829),
        (b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58_897_971),
        (b"abc", 479_470_107),
    ];
    for (input, hash) in cases {
        assert_eq!(murmur2(input), hash, "{}", String::from_utf8_lossy(input));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_land_on_the_partition_java_clients_pick() {
    let Some(bin) = real_broker_or_skip("keys_land_on_the_partition_java_clients_pick") else { return };
    const PARTITIONS: i32 = 7;
    let tansu = Tansu::start(&bin, None);
    let dir = tempfile::tempdir().unwrap();
    topics_create(dir.path(), &tansu.bootstrap(), PARTITIONS);
    let d = Daemon::start(dir.path(), &spool_config(&tansu.bootstrap(), &dir.path().join("spool"))).await;
    // Chat ids of many lengths, ids from the published examples, and ids beyond 2^64.
    let mut keys: Vec<String> = (0..300).map(|i| (i * 7919 + i % 13).to_string()).collect();
    keys.extend(
        ["217806", "2932424", "92340841", "18446744073709551617", "123456789012345678901234567890"].map(String::from),
    );
    let events: Vec<String> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| format!(r#"{{"id":{i},"chat":{{"id":{k}}},"company":{{"id":1}}}}"#))
        .collect();
    let body = format!(
        r#"{{"time":1700000000,"token":"{LOAD_TOKEN}","messages":{{"receivedMessage":[{}]}}}}"#,
        events.join(",")
    );
    assert_eq!(post(&d.url(), body).await.0, 200);
    drained(&d, Duration::from_secs(60)).await;
    let recs = read_topics_async(&tansu.bootstrap(), &["huggy.receivedMessage"]).await;
    assert_eq!(recs.len(), keys.len());
    let mut crc_would_differ = 0;
    for r in &recs {
        let key = r.key.as_deref().expect("keyed");
        assert_eq!(r.partition, java_partition(key, PARTITIONS), "key {key}");
        let crc = (crc32fast::hash(key.as_bytes()) % PARTITIONS as u32) as i32;
        crc_would_differ += usize::from(crc != r.partition);
    }
    // librdkafka's own default (CRC32) would have put most keys elsewhere: the check can tell them apart.
    assert!(crc_would_differ > keys.len() / 2, "{crc_would_differ} of {}", keys.len());
}

/// `docs/contract/` holds what the commands print for the shipped `config.toml`; regenerate with
/// `huggy-bridge contract asyncapi > docs/contract/asyncapi.json` and
/// `huggy-bridge contract schemas docs/contract/schemas`.
#[test]
fn the_shipped_contract_documents_are_what_the_commands_print() {
    let root = env!("CARGO_MANIFEST_DIR");
    let config = format!("{root}/config.toml");
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let out = DaemonEnv::new().command(dir.path(), args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let printed = run(&["contract", "asyncapi", "--config", &config]);
    let shipped = std::fs::read_to_string(format!("{root}/docs/contract/asyncapi.json")).unwrap();
    assert!(printed == shipped, "docs/contract/asyncapi.json is stale: regenerate it");
    // The document parses and has a channel for every topic the configuration routes to.
    let doc: serde_json::Value = serde_json::from_str(&printed).unwrap();
    let addresses: std::collections::BTreeSet<&str> =
        doc["channels"].as_object().unwrap().values().map(|c| c["address"].as_str().unwrap()).collect();
    let listed = run(&["topics", "list", "--config", &config]);
    assert_eq!(addresses, listed.lines().collect(), "every topic, fallback and dead-letter included");
    assert!(addresses.contains("huggy.unknown") && addresses.contains("huggy.dead-letter"));

    let out = dir.path().join("schemas");
    run(&["contract", "schemas", out.to_str().unwrap()]);
    let files = |d: &std::path::Path| -> std::collections::BTreeMap<String, String> {
        std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().path())
            .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read_to_string(&p).unwrap()))
            .collect()
    };
    let written = files(&out);
    assert_eq!(written.len(), 19, "one schema per known event type");
    let shipped = files(std::path::Path::new(&format!("{root}/docs/contract/schemas")));
    assert!(written == shipped, "docs/contract/schemas is stale: regenerate it");
}
