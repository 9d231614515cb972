//! Fidelity of what is published and bounds on what a client can make the daemon hold, with the
//! daemon as a real process in spool mode against a real Kafka-compatible broker (tansu):
//!
//! - a state that returns (agent online → offline → online, chat department A → B → A) is three
//!   events, published three times in order; a batch Huggy sends again verbatim is published once;
//!   two identical events in one batch are two events;
//! - three batches in one second (online, offline, online) are three events in order; two tokens'
//!   identical events are two events; a verbatim re-send of the last batch is published once;
//! - an account's token (`[[huggy.accounts]]`) cannot publish under another company: such an event is
//!   dead-lettered (`company_mismatch`), and `ce_source` is always the account's;
//! - 160 connections that each send a head declaring 4 MiB and then nothing hold no budget: normal
//!   batches beside them get 200 at once, never 503;
//! - 300 concurrent 4 MiB uploads without a valid token stay within `http.max_inflight_bytes`: the
//!   daemon's peak RSS stays under 512 MiB and a normal batch is still accepted meanwhile.
//!
//! Skipped when no tansu binary is found, unless `HUGGY_TEST_REQUIRE_BROKER=1` (CI).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::*;

fn fixture_text(name: &str) -> String {
    std::fs::read_to_string(format!("{FIXTURES}/{name}")).unwrap()
}

/// `name` with its batch `time` set to `time` and `from` replaced by `to` (once, in the event).
fn variant(name: &str, fixture_time: &str, time: i64, from: &str, to: &str) -> String {
    let text = fixture_text(name);
    assert!(text.contains(fixture_time) && text.contains(from), "{name} changed shape");
    text.replacen(fixture_time, &format!("\"time\": {time}"), 1).replacen(from, to, 1)
}

/// Values of `recs` with key `key`, in offset order (one key, one partition).
fn values_of_key(recs: &[Rec], key: &str) -> Vec<(i64, serde_json::Value, String)> {
    let mut out: Vec<(i64, serde_json::Value, String)> = recs
        .iter()
        .filter(|r| r.key.as_deref() == Some(key))
        .map(|r| {
            (r.offset, serde_json::from_slice(&r.value).unwrap(), r.header("ce_id").unwrap_or_default().to_owned())
        })
        .collect();
    out.sort_by_key(|(offset, _, _)| *offset);
    out
}

async fn published(d: &Daemon, ty: &str) -> f64 {
    d.metric(&format!("huggy_bridge_events_published_total{{type=\"{ty}\"}}")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn returning_states_are_new_events_and_a_verbatim_resend_is_published_once() {
    let Some(bin) = real_broker_or_skip("returning_states") else { return };
    let tansu = Tansu::start(&bin, None);
    let dir = tempfile::tempdir().unwrap();
    topics_create(dir.path(), &tansu.bootstrap(), 3);
    let d = Daemon::start(dir.path(), &spool_config(&tansu.bootstrap(), &dir.path().join("spool"))).await;

    // Agent 40419 online → offline → online, one batch each, as Huggy sends them (the event has no
    // timestamp of its own: first and third are byte-identical).
    let online = r#""isOnline": true"#;
    let offline = r#""isOnline": false"#;
    let status_time = r#""time": 1644341895"#;
    let status = [
        variant("agentChangedStatus.json", status_time, 1_763_700_000, online, online),
        variant("agentChangedStatus.json", status_time, 1_763_700_060, online, offline),
        variant("agentChangedStatus.json", status_time, 1_763_700_120, online, online),
    ];
    // Chat 217618 moved to department A → B → A.
    let (a, b) = (r#""department": 30643"#, r#""department": 30644"#);
    let dept_time = r#""time": 1727185640"#;
    let department = [
        variant("updatedChatDepartment.json", dept_time, 1_763_700_000, a, a),
        variant("updatedChatDepartment.json", dept_time, 1_763_700_030, a, b),
        variant("updatedChatDepartment.json", dept_time, 1_763_700_090, a, a),
    ];
    for (s, dep) in status.iter().zip(&department) {
        for body in [s, dep] {
            let (code, text) = post(&d.url(), body.clone()).await;
            assert_eq!(code, 200, "{text}");
            assert_eq!(text, r#"{"accepted":1}"#);
        }
    }
    // Huggy did not see the answer to the last status batch and sends it again, byte for byte.
    let (code, text) = post(&d.url(), status[2].clone()).await;
    assert_eq!(code, 200, "a re-send is acknowledged: {text}");
    // Two identical events in one batch (the customer updated twice to the same values).
    let mut customer: serde_json::Value = serde_json::from_str(&fixture_text("updatedCustomer.json")).unwrap();
    let list = customer["messages"]["updatedCustomer"].as_array_mut().unwrap();
    list.push(list[0].clone());
    let (code, text) = post(&d.url(), serde_json::to_string(&customer).unwrap()).await;
    assert_eq!((code, text.as_str()), (200, r#"{"accepted":2}"#));

    wait_for("everything published", Duration::from_secs(60), async || {
        let done = d.metric("huggy_bridge_spool_events").await == 0.0
            && published(&d, "agentChangedStatus").await >= 3.0
            && published(&d, "updatedChatDepartment").await >= 3.0
            && published(&d, "updatedCustomer").await >= 2.0;
        done.then_some(())
    })
    .await;
    assert_eq!(d.metric("huggy_bridge_events_duplicate_total").await, 1.0, "only the verbatim re-send");

    let recs = read_topics_async(
        &tansu.bootstrap(),
        &["huggy.agentChangedStatus", "huggy.updatedChatDepartment", "huggy.updatedCustomer"],
    )
    .await;
    let agent = values_of_key(&recs, "40419");
    let states: Vec<bool> = agent.iter().map(|(_, v, _)| v["isOnline"].as_bool().unwrap()).collect();
    assert_eq!(states, [true, false, true], "online, offline, online; the re-send not published again");
    let chat = values_of_key(&recs, "217618");
    let departments: Vec<i64> = chat.iter().map(|(_, v, _)| v["chat"]["department"].as_i64().unwrap()).collect();
    assert_eq!(departments, [30643, 30644, 30643], "A, B, A in order");
    let customer = values_of_key(&recs, "217806");
    assert_eq!(customer.len(), 2, "two identical events in one batch are two events");
    assert_eq!(customer[0].1, customer[1].1);
    for recs in [&agent, &chat, &customer] {
        let ids: std::collections::HashSet<&String> = recs.iter().map(|(_, _, id)| id).collect();
        assert_eq!(ids.len(), recs.len(), "each event has its own ce_id: {recs:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn states_returning_within_one_second_and_two_tokens_identical_events_are_all_published() {
    let Some(bin) = real_broker_or_skip("same_second") else { return };
    let tansu = Tansu::start(&bin, None);
    let dir = tempfile::tempdir().unwrap();
    topics_create(dir.path(), &tansu.bootstrap(), 3);
    let d = Daemon::start(dir.path(), &spool_config(&tansu.bootstrap(), &dir.path().join("spool"))).await;

    // Agent 40419 online → offline → online, three batches with one and the same `time` (Huggy's
    // resolution is a second): first and third are byte-identical bodies.
    let (online, offline, status_time) = (r#""isOnline": true"#, r#""isOnline": false"#, r#""time": 1644341895"#);
    let second = 1_763_800_000;
    let status = [
        variant("agentChangedStatus.json", status_time, second, online, online),
        variant("agentChangedStatus.json", status_time, second, online, offline),
        variant("agentChangedStatus.json", status_time, second, online, online),
    ];
    assert_eq!(status[0], status[2]);
    for body in &status {
        let (code, text) = post(&d.url(), body.clone()).await;
        assert_eq!((code, text.as_str()), (200, r#"{"accepted":1}"#));
    }
    // Huggy did not see the last answer and sends the third batch again, byte for byte.
    let (code, _) = post(&d.url(), status[2].clone()).await;
    assert_eq!(code, 200);
    // Agent 50000's identical event from two accounts' tokens, in the same second.
    let agent = |token: &str| {
        variant("agentChangedStatus.json", status_time, second, r#""id": 40419"#, r#""id": 50000"#)
            .replace("afb53a5e1abeeece89f2c80acb1686ab", token)
    };
    let other_token = LOAD_TOKEN;
    for body in [agent("afb53a5e1abeeece89f2c80acb1686ab"), agent(other_token)] {
        let (code, text) = post(&d.url(), body).await;
        assert_eq!((code, text.as_str()), (200, r#"{"accepted":1}"#));
    }

    wait_for("everything published", Duration::from_secs(60), async || {
        let done =
            d.metric("huggy_bridge_spool_events").await == 0.0 && published(&d, "agentChangedStatus").await >= 5.0;
        done.then_some(())
    })
    .await;
    assert_eq!(d.metric("huggy_bridge_events_duplicate_total").await, 1.0, "only the verbatim re-send");
    let recs = read_topics_async(&tansu.bootstrap(), &["huggy.agentChangedStatus"]).await;
    let agent = values_of_key(&recs, "40419");
    let states: Vec<bool> = agent.iter().map(|(_, v, _)| v["isOnline"].as_bool().unwrap()).collect();
    assert_eq!(states, [true, false, true], "online, offline, online within one second; the re-send not again");
    assert_eq!(
        agent[0].2, agent[2].2,
        "the returning state carries its first occurrence's id (same bytes, same second)"
    );
    let two = values_of_key(&recs, "50000");
    assert_eq!(two.len(), 2, "two tokens' identical events are two records");
    assert_eq!(two[0].1, two[1].1);
    assert_ne!(two[0].2, two[1].2, "with two ids");
    let log = d.log_text();
    assert!(!log.contains("afb53a5e1abeeece89f2c80acb1686ab") && !log.contains(other_token), "no token in the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_only_connections_hold_no_budget_and_huggy_is_served_beside_them() {
    let Some(bin) = real_broker_or_skip("head_only_flood") else { return };
    let tansu = Tansu::start(&bin, None);
    let dir = tempfile::tempdir().unwrap();
    topics_create(dir.path(), &tansu.bootstrap(), 3);
    // Defaults: max_body_bytes 4 MiB, max_inflight_bytes 256 MiB (64 such heads used to take it all).
    let env = spool_config(&tansu.bootstrap(), &dir.path().join("spool")).set("http.header_timeout_ms", 4_000);
    let d = Daemon::start(dir.path(), &env).await;
    const HEADS: usize = 160;
    let head = b"POST /webhooks/huggy HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 4194304\r\n\r\n";
    let mut heads = Vec::new();
    for _ in 0..HEADS {
        let mut s = tokio::net::TcpStream::connect(d.http).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut s, head).await.unwrap();
        heads.push(s);
    }
    // Let the daemon read every head.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(d.metric("huggy_bridge_http_inflight_body_bytes").await, 0.0, "declared bytes are not held");
    let mut took = Vec::new();
    for i in 0..20 {
        let body = variant("receivedMessage.json", r#""time": 1524155854"#, 1_763_900_000 + i, "", "");
        let t0 = Instant::now();
        let (code, text) = post(&d.url(), body).await;
        took.push(t0.elapsed());
        assert_eq!(code, 200, "a normal batch beside {HEADS} head-only connections: {text}");
    }
    took.sort();
    let (median, slowest) = (took[took.len() / 2], took[took.len() - 1]);
    eprintln!("head-only flood: {HEADS} connections declaring 4 MiB each; 20 normal batches, median {median:?}, slowest {slowest:?}");
    assert!(slowest < Duration::from_secs(3), "normal batches answered promptly (slowest {slowest:?})");
    assert_eq!(d.metric("huggy_bridge_http_requests_total{outcome=\"overloaded\"}").await, 0.0);
    // The heads are let go: a body that does not start within the header timeout gets 408.
    let started = Instant::now();
    let mut timed_out = 0;
    for mut s in heads {
        let mut buf = Vec::new();
        let left = Duration::from_secs(20).saturating_sub(started.elapsed());
        if let Ok(Ok(_)) = tokio::time::timeout(left, tokio::io::AsyncReadExt::read_to_end(&mut s, &mut buf)).await {
            if String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 408") {
                timed_out += 1;
            }
        }
    }
    assert_eq!(timed_out, HEADS, "every head-only connection got 408 and was closed");
    wait_for("normal batches published", Duration::from_secs(30), async || {
        (published(&d, "receivedMessage").await == 20.0).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accounts_token_cannot_publish_under_another_company() {
    let Some(bin) = real_broker_or_skip("accounts") else { return };
    let tansu = Tansu::start(&bin, None);
    let dir = tempfile::tempdir().unwrap();
    topics_create(dir.path(), &tansu.bootstrap(), 3);
    // The daemon runs in `dir`, where it reads `config.toml`; the environment adds the plain tokens.
    const ACCOUNT_TOKEN: &str = "0a0b0c0d0e0f0a0b0c0d0e0f0a0b0c0d";
    std::fs::write(
        dir.path().join("config.toml"),
        format!("[[huggy.accounts]]\ncompany_id = 15693\ntokens = [\"{ACCOUNT_TOKEN}\"]\n"),
    )
    .unwrap();
    let d = Daemon::start(dir.path(), &spool_config(&tansu.bootstrap(), &dir.path().join("spool"))).await;
    let status_time = r#""time": 1644341895"#;
    let company = r#""company": {
          "id": 15693
        }"#;
    let batch = |agent: u32, company_json: &str| {
        variant("agentChangedStatus.json", status_time, 1_763_950_000, r#""id": 40419"#, &format!(r#""id": {agent}"#))
            .replacen(company, company_json, 1)
            .replace("afb53a5e1abeeece89f2c80acb1686ab", ACCOUNT_TOKEN)
    };
    // Its own company, another company, none at all.
    for body in
        [batch(1, r#""company": {"id": 15693}"#), batch(2, r#""company": {"id": 66666}"#), batch(3, r#""nothing": {}"#)]
    {
        let (code, text) = post(&d.url(), body).await;
        assert_eq!((code, text.as_str()), (200, r#"{"accepted":1}"#), "accepted (the 2xx covers dead letters)");
    }
    // A plain token (huggy.tokens) keeps naming whatever company its events name.
    let plain = variant("agentChangedStatus.json", status_time, 1_763_950_000, r#""id": 40419"#, r#""id": 4"#)
        .replacen(company, r#""company": {"id": 77777}"#, 1);
    assert_eq!(post(&d.url(), plain).await.0, 200);

    wait_for("published and dead-lettered", Duration::from_secs(60), async || {
        let done =
            d.metric("huggy_bridge_spool_events").await == 0.0 && published(&d, "agentChangedStatus").await >= 3.0;
        done.then_some(())
    })
    .await;
    let recs = read_topics_async(&tansu.bootstrap(), &["huggy.agentChangedStatus", "huggy.dead-letter"]).await;
    let on = |topic: &str, key: &str| -> Vec<&Rec> {
        recs.iter().filter(|r| r.topic == topic && r.key.as_deref() == Some(key)).collect()
    };
    let own = on("huggy.agentChangedStatus", "1");
    assert_eq!(own.len(), 1);
    assert_eq!(own[0].header("ce_source"), Some("huggy://company/15693"));
    assert!(on("huggy.agentChangedStatus", "2").is_empty(), "not published under company 66666");
    let dead = on("huggy.dead-letter", "2");
    assert_eq!(dead.len(), 1, "dead-lettered instead");
    assert_eq!(dead[0].header("huggy_dlq_reason"), Some("company_mismatch"));
    assert_eq!(dead[0].header("ce_source"), Some("huggy://company/15693"), "the token's account, not the claim");
    assert!(String::from_utf8_lossy(&dead[0].value).contains("66666"), "the event's bytes, untouched");
    let none = on("huggy.agentChangedStatus", "3");
    assert_eq!(none.len(), 1);
    assert_eq!(none[0].header("ce_source"), Some("huggy://company/15693"), "no company: the account's");
    let plain = on("huggy.agentChangedStatus", "4");
    assert_eq!(plain.len(), 1);
    assert_eq!(plain[0].header("ce_source"), Some("huggy://company/77777"), "huggy.tokens works as before");
    assert!(recs.iter().all(|r| r.header("ce_source") != Some("huggy://company/66666")));
    assert!(!d.log_text().contains(ACCOUNT_TOKEN), "no token in the log");
}

/// Peak resident set of a process (`VmHWM`), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/<pid>/status");
    kib * 1024
}

const MIB: u64 = 1024 * 1024;

/// A 4 MiB batch (exactly `http.max_body_bytes`) whose token is not configured.
fn flood_body() -> bytes::Bytes {
    let head = r#"{"time":1763700000,"token":"not-a-configured-token","messages":{"receivedMessage":[{"chat":{"id":1},"body":""#;
    let tail = r#""}]}}"#;
    let pad = 4 * MIB as usize - head.len() - tail.len();
    bytes::Bytes::from(format!("{head}{}{tail}", "x".repeat(pad)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_large_unauthenticated_uploads_stays_within_the_inflight_budget() {
    let Some(bin) = real_broker_or_skip("body_flood") else { return };
    let tansu = Tansu::start(&bin, None);
    let dir = tempfile::tempdir().unwrap();
    topics_create(dir.path(), &tansu.bootstrap(), 3);
    // Defaults: max_body_bytes 4 MiB, max_inflight_bytes 256 MiB, 1024 connections.
    let d = Daemon::start(dir.path(), &spool_config(&tansu.bootstrap(), &dir.path().join("spool"))).await;
    let pid = d.child.id();
    let before = peak_rss(pid);

    const CLIENTS: usize = 300;
    let body = flood_body();
    let stop = Arc::new(AtomicBool::new(false));
    let counter = || Arc::new(AtomicUsize::new(0));
    let (sent, finished, unauthorized, overloaded, cut) = (counter(), counter(), counter(), counter(), counter());
    let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
    let flood: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (http, url, body, stop) = (http.clone(), d.url(), body.clone(), stop.clone());
            let (sent, finished) = (sent.clone(), finished.clone());
            let (unauthorized, overloaded, cut) = (unauthorized.clone(), overloaded.clone(), cut.clone());
            tokio::spawn(async move {
                // Every client uploads at least once, then keeps going until the normal batch is in.
                let mut first = true;
                while first || !stop.load(Ordering::Relaxed) {
                    first = false;
                    sent.fetch_add(1, Ordering::Relaxed);
                    match http.post(&url).body(body.clone()).send().await {
                        Ok(r) if r.status() == 401 => _ = unauthorized.fetch_add(1, Ordering::Relaxed),
                        Ok(r) if r.status() == 503 => {
                            assert!(r.headers().contains_key("retry-after"));
                            let text = r.text().await.unwrap_or_default();
                            assert!(text.contains(r#""code":"overloaded""#), "{text}");
                            overloaded.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(r) => panic!("a flood upload got {}", r.status()),
                        // Refused before its body was read: the daemon answers and closes while the
                        // client is still writing.
                        Err(_) => _ = cut.fetch_add(1, Ordering::Relaxed),
                    }
                    finished.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();

    // Meanwhile normal batches, one every 200 ms for FLOOD_SECS, each retried on 503 as Huggy does,
    // are all accepted. They are sent from a thread of their own, so that the flood's clients in
    // this process do not delay them on the client side.
    const FLOOD_SECS: u64 = 10;
    let url = d.url();
    let in_flight = {
        let (sent, finished) = (sent.clone(), finished.clone());
        move || sent.load(Ordering::Relaxed) - finished.load(Ordering::Relaxed)
    };
    let huggy = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let http = reqwest::Client::new();
            let started = Instant::now();
            let (mut normal, mut refusals, mut slowest, mut in_flight_seen) =
                (0usize, 0usize, Duration::ZERO, usize::MAX);
            while started.elapsed() < Duration::from_secs(FLOOD_SECS) {
                let time = 1_763_700_000 + normal as i64;
                let body = variant("receivedMessage.json", r#""time": 1524155854"#, time, "", "");
                let sent_at = Instant::now();
                loop {
                    match http.post(&url).body(body.clone()).send().await {
                        Ok(r) if r.status() == 200 => break,
                        Ok(r) if r.status() == 503 => refusals += 1,
                        other => panic!("normal batch: {other:?}"),
                    }
                    assert!(sent_at.elapsed() < Duration::from_secs(30), "a normal batch not accepted within 30 s");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                slowest = slowest.max(sent_at.elapsed());
                in_flight_seen = in_flight_seen.min(in_flight());
                normal += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            (normal, refusals, slowest, in_flight_seen)
        })
    });
    let (normal, refusals, slowest, in_flight_seen) = tokio::task::spawn_blocking(move || huggy.join())
        .await
        .unwrap()
        .unwrap_or_else(|e| std::panic::resume_unwind(e));
    stop.store(true, Ordering::Relaxed);
    for t in flood {
        t.await.unwrap();
    }
    let peak = peak_rss(pid);
    let [sent, unauthorized, overloaded, cut] =
        [sent, unauthorized, overloaded, cut].map(|c| c.load(Ordering::Relaxed));
    eprintln!(
        "body flood: {CLIENTS} clients, {sent} uploads of 4 MiB ({unauthorized} read and refused 401, {overloaded} 503 overloaded, \
         {cut} cut off before their body was read); {normal} normal batches accepted meanwhile, slowest after {slowest:?} ({refusals} refusals, at least {in_flight_seen} uploads in flight); \
         daemon peak RSS {} MiB (before the flood {} MiB)",
        peak / MIB,
        before / MIB
    );
    assert!(in_flight_seen > 0, "every normal batch was accepted while flood uploads were in flight");
    assert!(unauthorized > 0, "uploads within the budget are read and refused by token");
    assert!(overloaded + cut > 0, "uploads beyond the budget are refused before being read");
    assert!(d.metric("huggy_bridge_http_requests_total{outcome=\"overloaded\"}").await > 0.0);
    assert_eq!(d.metric("huggy_bridge_http_inflight_body_bytes").await, 0.0, "every reservation given back");
    assert!(peak < 512 * MIB, "daemon peak RSS {} MiB under the flood", peak / MIB);
    // Every normal batch reaches Kafka.
    wait_for("normal batches published", Duration::from_secs(30), async || {
        (published(&d, "receivedMessage").await == normal as f64).then_some(())
    })
    .await;
}
