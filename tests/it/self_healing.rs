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

/// The restarts of one stage, as `/metrics` shows them.
fn restarts(stage: &str) -> String {
    format!("huggy_bridge_stage_restarts_total{{stage=\"{stage}\"}}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_each_background_stage_is_survived_counted_and_delivery_goes_on() {
    use huggy_bridge::app::{self, Overrides};
    use huggy_bridge::metrics::counter_sum;
    use huggy_bridge::supervise::Faults;
    use std::sync::Arc;
    use tokio_util::sync::CancellationToken;

    let files = axum::Router::new().route("/files/{name}", axum::routing::get(|| async { vec![7u8; 5000] }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let files_addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, files).await.unwrap() });

    let dir = tempfile::tempdir().unwrap();
    let mut cfg = inprocess_config(dir.path(), &[LOAD_TOKEN]);
    cfg.files.enabled = true;
    cfg.files.allowed_url_prefixes = vec![format!("http://{files_addr}/files/")];
    cfg.files.store = format!("file://{}", dir.path().join("files").display());
    let faults = Arc::new(Faults::default());
    let overrides = Overrides {
        faults: Some(faults.clone()),
        poison: Some(Arc::new(|v: &[u8]| v.windows(6).any(|w| w == b"POISON"))),
        ..Overrides::default()
    };
    let d = app::start_with(cfg, CancellationToken::new(), overrides).await.expect("daemon starts");
    let url = format!("http://{}/webhooks/huggy", d.http_addr);
    let healthz = async || reqwest::get(format!("http://{}/healthz", d.admin_addr)).await.unwrap().status().as_u16();
    let batch = |n: u64, with_file: bool, body: &str| {
        let file = if with_file { format!(r#""http://{files_addr}/files/f{n}.pdf""#) } else { "null".into() };
        let ev =
            format!(r#"{{"id":{n},"body":"{body}","file":{file},"chat":{{"id":{}}},"company":{{"id":"7"}}}}"#, 700 + n);
        format!(r#"{{"time":1763700000,"token":"{LOAD_TOKEN}","messages":{{"receivedMessage":[{ev}]}}}}"#)
    };

    let mut n = 0;
    for stage in ["publisher", "kafka_probe", "file_feed", "file_results", "file_dispatch"] {
        faults.panic_stage(stage, 1);
        wait_for(&format!("{stage} restarted"), Duration::from_secs(20), async || {
            (metric_value(&d.admin_addr, &restarts(stage)).await == 1.0).then_some(())
        })
        .await;
        // Delivery goes on, files included, after the restart.
        for with_file in [true, false] {
            n += 1;
            let (status, text) = post(&url, batch(n, with_file, &format!("after-{stage}-{with_file}"))).await;
            assert_eq!(status, 200, "{text}");
        }
        wait_for(&format!("published after {stage} restarted"), Duration::from_secs(30), async || {
            (counter_sum(&d.metrics.events_published) >= n).then_some(())
        })
        .await;
        assert_eq!(healthz().await, 200, "one restart is no liveness failure");
    }
    // The spool's janitor (dedup journal writes and syncs, segment deletion) is a thread that catches
    // a chore's panic itself: the panic is counted, and the spool goes on taking and delivering. Its
    // chores follow durable groups, so batches come first here.
    faults.panic_stage("janitor", 1);
    for i in 0..2 {
        n += 1;
        let (status, text) = post(&url, batch(n, false, &format!("janitor-{i}"))).await;
        assert_eq!(status, 200, "{text}");
    }
    wait_for("janitor chore panic counted", Duration::from_secs(20), async || {
        (metric_value(&d.admin_addr, &restarts("janitor")).await == 1.0).then_some(())
    })
    .await;
    n += 1;
    let (status, text) = post(&url, batch(n, false, "after-janitor")).await;
    assert_eq!(status, 200, "{text}");
    wait_for("published after the janitor's panic", Duration::from_secs(30), async || {
        (counter_sum(&d.metrics.events_published) >= n).then_some(())
    })
    .await;
    assert_eq!(healthz().await, 200, "a janitor chore's panic is no liveness failure");
    let bootstrap = d.embedded_bootstrap.clone().unwrap();
    let recs = read_topics_async(&bootstrap, &["huggy.receivedMessage"]).await;
    let with_files: Vec<&Rec> = recs
        .iter()
        .filter(|r| {
            let v = serde_json::from_slice::<serde_json::Value>(&r.value).unwrap();
            v["body"].as_str().is_some_and(|b| b.ends_with("-true"))
        })
        .collect();
    assert_eq!(with_files.len(), 5);
    for r in &with_files {
        // The bridge's file results travel in their own header (SPEC §6), never in the value.
        let files: serde_json::Value =
            serde_json::from_str(r.header("huggy_bridge_files").expect("the huggy_bridge_files header")).unwrap();
        assert_eq!(files[0]["status"], "stored", "{files}");
    }

    // A poisoned event (its publishing panics) is dead-lettered with the reason; the events around
    // it, in the same window, are published; the publisher is not restarted for it.
    let evs: Vec<String> = ["before-poison", "POISON", "after-poison"]
        .iter()
        .enumerate()
        .map(|(i, b)| {
            format!(
                r#"{{"id":{},"body":"{b}","file":null,"chat":{{"id":{}}},"company":{{"id":"7"}}}}"#,
                900 + i,
                900 + i
            )
        })
        .collect();
    let body =
        format!(r#"{{"time":1763700000,"token":"{LOAD_TOKEN}","messages":{{"receivedMessage":[{}]}}}}"#, evs.join(","));
    assert_eq!(post(&url, body).await.0, 200);
    wait_for("the poisoned event dead-lettered, the others published", Duration::from_secs(30), async || {
        (counter_sum(&d.metrics.events_dead_lettered) == 1 && counter_sum(&d.metrics.events_published) >= n + 2)
            .then_some(())
    })
    .await;
    let dlq = read_topics_async(&bootstrap, &["huggy.dead-letter"]).await;
    assert_eq!(dlq.len(), 1, "{dlq:?}");
    let reason = dlq[0].header("huggy_dlq_reason").unwrap_or_default();
    assert!(reason.contains("panicked") && reason.contains("injected fault"), "{reason}");
    assert_eq!(dlq[0].header("huggy_dlq_topic"), Some("huggy.receivedMessage"));
    assert!(String::from_utf8_lossy(&dlq[0].value).contains("POISON"), "the event's bytes are kept");
    let published: Vec<String> = read_topics_async(&bootstrap, &["huggy.receivedMessage"])
        .await
        .iter()
        .map(|r| serde_json::from_slice::<serde_json::Value>(&r.value).unwrap()["body"].as_str().unwrap().to_owned())
        .collect();
    assert!(published.iter().any(|b| b == "before-poison") && published.iter().any(|b| b == "after-poison"));
    assert!(!published.iter().any(|b| b == "POISON"));
    assert_eq!(metric_value(&d.admin_addr, &restarts("publisher")).await, 1.0, "no restart for a poisoned event");

    // A stage that keeps panicking fails liveness, and says which.
    faults.panic_stage("kafka_probe", 6);
    let why = wait_for("liveness fails", Duration::from_secs(30), async || {
        let r = reqwest::get(format!("http://{}/healthz", d.admin_addr)).await.unwrap();
        (r.status() == 503).then_some(r.text().await.unwrap())
    })
    .await;
    assert!(why.contains("kafka_probe"), "{why}");
    // Delivery is not what failed: it still goes on.
    n += 1;
    assert_eq!(post(&url, batch(n + 10, false, "while-failing")).await.0, 200);
    wait_for("published while a stage is failing", Duration::from_secs(30), async || {
        (counter_sum(&d.metrics.events_published) >= n + 2).then_some(())
    })
    .await;
    d.shutdown();
    d.wait().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// No head-of-line blocking: librdkafka's mock cluster makes one partition or topic unwritable

/// One event of `ty` (its own key: the chat or event id `id`) in a batch.
fn one_event(ty: &str, id: u64, body: &str) -> String {
    let ev = match ty {
        "receivedMessage" => {
            format!(r#"{{"id":{id},"body":"{body}","file":null,"chat":{{"id":{id}}},"company":{{"id":"7"}}}}"#)
        }
        _ => format!(r#"{{"id":{id},"body":"{body}","company":{{"id":"7"}}}}"#),
    };
    format!(r#"{{"time":1763700000,"token":"{LOAD_TOKEN}","messages":{{"{ty}":[{ev}]}}}}"#)
}

/// A one-broker mock cluster with every routable topic (one partition each), `cfg` pointed at it.
fn mock_cluster(
    cfg: &mut huggy_bridge::config::Config,
) -> rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext> {
    let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
    for t in huggy_bridge::publish::kafka::routable_topics(cfg) {
        cluster.create_topic(&t, 1, 1).unwrap();
    }
    cfg.kafka.brokers = cluster.bootstrap_servers();
    cluster
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_without_a_leader_and_a_missing_topic_stall_only_their_own_keys() {
    use huggy_bridge::metrics::counter_sum;
    use rdkafka::types::RDKafkaRespErr;

    let dir = tempfile::tempdir().unwrap();
    let mut cfg = inprocess_config(dir.path(), &[LOAD_TOKEN]);
    cfg.kafka.partitions = 1;
    // Liveness after 5 s without progress: far shorter than a stuck record's message timeout.
    cfg.spool.stall_timeout_secs = 1;
    let cluster = mock_cluster(&mut cfg);
    // closedChat's only partition has no leader; agentEntered's topic is unknown to the cluster.
    cluster.partition_leader("huggy.closedChat", 0, None).unwrap();
    cluster.topic_error("huggy.agentEntered", RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART).unwrap();
    let d = huggy_bridge::app::start(cfg.clone(), tokio_util::sync::CancellationToken::new()).await.unwrap();
    let url = format!("http://{}/webhooks/huggy", d.http_addr);
    for (ty, id) in [("closedChat", 1), ("agentEntered", 2)] {
        let (status, text) = post(&url, one_event(ty, id, &format!("stuck-{ty}"))).await;
        assert_eq!(status, 200, "{text}");
    }
    // Other chats, on other topics, sent after the stuck ones, over a while longer than one round.
    let began = std::time::Instant::now();
    for i in 0..20u64 {
        let (status, text) = post(&url, one_event("receivedMessage", 100 + i, &format!("flowing-{i}"))).await;
        assert_eq!(status, 200, "{text}");
        wait_for("the flowing chat published", Duration::from_secs(20), async || {
            (counter_sum(&d.metrics.events_published) > i).then_some(())
        })
        .await;
    }
    let flowed_in = began.elapsed();
    assert_eq!(counter_sum(&d.metrics.events_published), 20, "the stuck keys are not published");
    // The stuck records come back from librdkafka (message timeout) and wait in their own lanes.
    wait_for("the stuck keys reported", Duration::from_secs(90), async || {
        (metric_value(&d.admin_addr, "huggy_bridge_publish_stalled_keys").await >= 2.0).then_some(())
    })
    .await;
    // Still flowing while they back off; liveness holds (an unwritable partition is not a stuck daemon).
    let (status, _) = post(&url, one_event("receivedMessage", 200, "flowing-during-backoff")).await;
    assert_eq!(status, 200);
    wait_for("published during the backoff", Duration::from_secs(20), async || {
        (counter_sum(&d.metrics.events_published) >= 21).then_some(())
    })
    .await;
    let healthz = reqwest::get(format!("http://{}/healthz", d.admin_addr)).await.unwrap();
    assert_eq!(healthz.status(), 200, "{}", healthz.text().await.unwrap());
    assert_eq!(metric_value(&d.admin_addr, "huggy_bridge_live").await, 1.0, "never failed liveness meanwhile");

    // Kafka can take them again: they are published, nothing lost, nothing dead-lettered.
    cluster.partition_leader("huggy.closedChat", 0, Some(1)).unwrap();
    cluster.topic_error("huggy.agentEntered", RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR).unwrap();
    wait_for("the stuck keys published once writable", Duration::from_secs(120), async || {
        (counter_sum(&d.metrics.events_published) >= 23).then_some(())
    })
    .await;
    assert_eq!(counter_sum(&d.metrics.events_dead_lettered), 0);
    wait_for("no stalled key left", Duration::from_secs(10), async || {
        (metric_value(&d.admin_addr, "huggy_bridge_publish_stalled_keys").await == 0.0).then_some(())
    })
    .await;
    let recs = read_topics_async(&cfg.kafka.brokers, &["huggy.closedChat", "huggy.agentEntered"]).await;
    assert_eq!(recs.len(), 2, "{recs:?}");
    eprintln!("20 events of other keys published one after the other in {flowed_in:?} while two keys were unwritable");
    d.shutdown();
    d.wait().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// A broker that loses the producer's state

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_that_loses_producer_state_is_recovered_without_a_daemon_restart() {
    use huggy_bridge::metrics::counter_sum;
    let Some(bin) = real_broker_or_skip("broker_loses_producer_state") else { return };
    let mut tansu = Tansu::start(&bin, None);
    let dir = tempfile::tempdir().unwrap();
    topics_create(dir.path(), &tansu.bootstrap(), 3);
    let mut cfg = inprocess_config(dir.path(), &[LOAD_TOKEN]);
    cfg.kafka.brokers = tansu.bootstrap();
    let d = huggy_bridge::app::start(cfg, tokio_util::sync::CancellationToken::new()).await.unwrap();
    let url = format!("http://{}/webhooks/huggy", d.http_addr);
    for b in 0..5 {
        assert_eq!(post(&url, load_batch(1, b, 4).0).await.0, 200);
    }
    wait_for("published before the broker restart", Duration::from_secs(30), async || {
        (counter_sum(&d.metrics.events_published) >= 20).then_some(())
    })
    .await;
    // The broker comes back empty: no topics, no producer ids, sequence numbers unknown.
    tansu.restart_losing_state(&bin);
    topics_create(dir.path(), &tansu.bootstrap(), 3);
    let mut load = LoadResult::default();
    for b in 5..15 {
        let (body, markers) = load_batch(1, b, 4);
        assert_eq!(post(&url, body).await.0, 200);
        load.acked.push(markers);
    }
    let began = std::time::Instant::now();
    wait_for("everything accepted after the restart published", Duration::from_secs(180), async || {
        (counter_sum(&d.metrics.events_published) >= 60).then_some(())
    })
    .await;
    eprintln!(
        "broker lost its state: published again after {:?}, producer replaced {} times",
        began.elapsed(),
        d.metrics.producer_recreated.get()
    );
    let recs = read_topics_async(&tansu.bootstrap(), &["huggy.receivedMessage"]).await;
    let load = LoadResult { acked: vec![load.acked.concat()], ..Default::default() };
    assert_nothing_acked_is_missing(&load, &recs);
    let healthz = reqwest::get(format!("http://{}/healthz", d.admin_addr)).await.unwrap();
    assert_eq!(healthz.status(), 200, "{}", healthz.text().await.unwrap());
    d.shutdown();
    d.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_unknown_producer_id_errors_lose_nothing_and_need_no_restart() {
    use huggy_bridge::metrics::counter_sum;
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

    let dir = tempfile::tempdir().unwrap();
    let mut cfg = inprocess_config(dir.path(), &[LOAD_TOKEN]);
    cfg.kafka.partitions = 1;
    let cluster = mock_cluster(&mut cfg);
    let d = huggy_bridge::app::start(cfg.clone(), tokio_util::sync::CancellationToken::new()).await.unwrap();
    let url = format!("http://{}/webhooks/huggy", d.http_addr);
    assert_eq!(post(&url, load_batch(1, 0, 5).0).await.0, 200);
    wait_for("first batch published", Duration::from_secs(30), async || {
        (counter_sum(&d.metrics.events_published) >= 5).then_some(())
    })
    .await;
    let errors = [RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_PRODUCER_ID; 4];
    cluster.request_errors(RDKafkaApiKey::Produce, &errors);
    let mut load = LoadResult::default();
    for b in 1..6 {
        let (body, markers) = load_batch(1, b, 5);
        assert_eq!(post(&url, body).await.0, 200);
        load.acked.push(markers);
    }
    wait_for("published despite the lost producer ids", Duration::from_secs(120), async || {
        (counter_sum(&d.metrics.events_published) >= 30).then_some(())
    })
    .await;
    let recs = read_topics_async(&cfg.kafka.brokers, &["huggy.receivedMessage"]).await;
    let load = LoadResult { acked: vec![load.acked.concat()], ..Default::default() };
    let dups = assert_nothing_acked_is_missing(&load, &recs);
    eprintln!("unknown producer id: {dups} duplicates, producer replaced {} times", d.metrics.producer_recreated.get());
    d.shutdown();
    d.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_that_stops_making_progress_with_work_still_fails_liveness() {
    use huggy_bridge::app::{self, Overrides};
    use huggy_bridge::supervise::Faults;
    use std::sync::Arc;

    let dir = tempfile::tempdir().unwrap();
    let mut cfg = inprocess_config(dir.path(), &[LOAD_TOKEN]);
    cfg.spool.stall_timeout_secs = 1;
    let faults = Arc::new(Faults::default());
    let overrides = Overrides { faults: Some(faults.clone()), ..Overrides::default() };
    let d = app::start_with(cfg, tokio_util::sync::CancellationToken::new(), overrides).await.unwrap();
    let url = format!("http://{}/webhooks/huggy", d.http_addr);
    assert_eq!(post(&url, load_batch(1, 0, 2).0).await.0, 200);
    wait_for("published", Duration::from_secs(20), async || {
        (huggy_bridge::metrics::counter_sum(&d.metrics.events_published) >= 2).then_some(())
    })
    .await;
    let healthz = async || {
        let r = reqwest::get(format!("http://{}/healthz", d.admin_addr)).await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    };
    // Idle with nothing to publish: alive, however long.
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert_eq!(healthz().await.0, 200, "an idle publisher is alive");
    // The publisher hangs (as a call that never returns would), with work waiting and Kafka up.
    faults.hang_stage("publisher");
    assert_eq!(post(&url, load_batch(1, 1, 2).0).await.0, 200);
    let why = wait_for("liveness fails", Duration::from_secs(30), async || {
        let (code, body) = healthz().await;
        (code == 503).then_some(body)
    })
    .await;
    assert!(why.contains("publisher has made no progress"), "{why}");
    d.shutdown();
    let _ = d.wait().await;
}
