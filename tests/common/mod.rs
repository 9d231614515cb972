//! Shared harness for the black-box tests, by concern:
//!
//! - [`fixtures`]: the Huggy payload fixtures and the records they must become;
//! - [`broker`]: a real Kafka-compatible broker (tansu) and a loopback proxy that can cut it off;
//! - [`consumer`]: a consumer that reads topics to their end;
//! - [`process`]: the daemon as a real process, configured through its environment, and a guard
//!   that kills any child process when the test ends;
//! - [`inprocess`]: the daemon in-process ([`TestApp`]);
//! - here: polling with a deadline, posting, and load with verifiable events.
//!
//! Everything is re-exported, so `use crate::common::*;` (or `common::Tansu`) reaches it all.

pub mod broker;
pub mod consumer;
pub mod fixtures;
pub mod inprocess;
pub mod process;

pub use broker::*;
pub use consumer::*;
pub use fixtures::*;
pub use inprocess::*;
pub use process::*;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::net::TcpListener as StdListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Every file under `dir`, at any depth (what a file store left on disk).
pub fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Polls `f` until it returns `Some` or the deadline passes.
pub async fn wait_for<T>(what: &str, within: Duration, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {within:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// POSTs a body and returns (status, body text).
pub async fn post(url: &str, body: impl Into<reqwest::Body>) -> (u16, String) {
    let r = reqwest::Client::new().post(url).body(body).send().await.expect("request");
    let status = r.status().as_u16();
    (status, r.text().await.unwrap_or_default())
}

// ---------------------------------------------------------------------------------------------
// Load with verifiable events

pub const LOAD_TOKEN: &str = "132ce76c7abb1154f01ebc0d508162e4";

/// A batch of `per_batch` receivedMessage events of one chat (`client`), each with a unique marker
/// `c<client>-b<batch>-e<i>` as its body and a unique id.
pub fn load_batch(client: usize, batch: usize, per_batch: usize) -> (String, Vec<String>) {
    let markers: Vec<String> = (0..per_batch).map(|i| format!("c{client}-b{batch}-e{i}")).collect();
    let events: Vec<String> = markers
        .iter()
        .enumerate()
        .map(|(i, m)| {
            format!(
                r#"{{"id":"{}","body":"{m}","is_internal":false,"senderType":"whatsapp","file":null,"chat":{{"id":{}}},"company":{{"id":"42"}}}}"#,
                client * 1_000_000 + batch * 100 + i,
                10_000 + client
            )
        })
        .collect();
    let body = format!(
        r#"{{"time":1763700000,"messages":{{"receivedMessage":[{}]}},"token":"{LOAD_TOKEN}"}}"#,
        events.join(",")
    );
    (body, markers)
}

/// Result of a load run.
#[derive(Debug, Default)]
pub struct LoadResult {
    /// Markers of events whose request was answered 2xx, per client in send order.
    pub acked: Vec<Vec<String>>,
    pub ok: usize,
    pub refused: usize,
    pub failed: usize,
}

impl LoadResult {
    pub fn acked_count(&self) -> usize {
        self.acked.iter().map(Vec::len).sum()
    }
}

/// `clients` concurrent clients, each posting its own chat's batches one after the other, until
/// `stop` is set or `max_batches` each. Every client keeps going through refusals and errors.
pub async fn run_load(
    url: String,
    clients: usize,
    per_batch: usize,
    max_batches: usize,
    stop: Arc<AtomicBool>,
) -> LoadResult {
    let http = reqwest::Client::builder().timeout(Duration::from_secs(20)).build().unwrap();
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let (http, url, stop) = (http.clone(), url.clone(), stop.clone());
            tokio::spawn(async move {
                let (mut acked, mut ok, mut refused, mut failed) = (Vec::new(), 0, 0, 0);
                for b in 0..max_batches {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let (body, markers) = load_batch(c, b, per_batch);
                    match http.post(&url).body(body).send().await {
                        Ok(r) if r.status().is_success() => {
                            ok += 1;
                            acked.extend(markers);
                        }
                        Ok(_) => {
                            refused += 1;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        Err(_) => {
                            failed += 1;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
                (acked, ok, refused, failed)
            })
        })
        .collect();
    let mut res = LoadResult::default();
    for t in tasks {
        let (acked, ok, refused, failed) = t.await.unwrap();
        res.acked.push(acked);
        res.ok += ok;
        res.refused += refused;
        res.failed += failed;
    }
    res
}

/// Asserts every acknowledged marker reached `recs`, and that per chat the first occurrences keep
/// send order. Returns the number of duplicate records.
pub fn assert_nothing_acked_is_missing(load: &LoadResult, recs: &[Rec]) -> usize {
    let mut first_pos: HashMap<String, usize> = HashMap::new();
    let mut dups = 0;
    for (i, r) in recs.iter().enumerate() {
        let v: serde_json::Value = serde_json::from_slice(&r.value).expect("record is JSON");
        let marker = v["body"].as_str().unwrap_or_default().to_owned();
        match first_pos.entry(marker) {
            std::collections::hash_map::Entry::Occupied(_) => dups += 1,
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(i);
            }
        }
    }
    let missing: Vec<&String> = load.acked.iter().flatten().filter(|m| !first_pos.contains_key(*m)).collect();
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged events missing from Kafka, e.g. {:?}",
        missing.len(),
        load.acked_count(),
        &missing[..missing.len().min(5)]
    );
    // All of one client's events share a key, hence a partition; `recs` is in partition order.
    for client in &load.acked {
        let positions: Vec<usize> = client.iter().map(|m| first_pos[m]).collect();
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "per-key order broken");
    }
    dups
}

// ---------------------------------------------------------------------------------------------
// A real broker behind a proxy that can cut it off, and the daemon's view of it

/// The daemon's configuration for spool mode on `bootstrap`, file capture off.
pub fn spool_config(bootstrap: &str, spool: &std::path::Path) -> DaemonEnv {
    DaemonEnv::new()
        .set("kafka.brokers", bootstrap)
        .set("kafka.partitions", 3)
        .set("delivery.ack", "spool")
        .set("spool.dir", spool.display())
        .set("files.enabled", false)
        .set("shutdown.timeout_secs", 10)
}

/// A tansu broker that clients reach through a loopback proxy that can be cut, with the topics created.
pub struct CuttableBroker {
    pub _tansu: Tansu,
    pub proxy: Proxy,
    pub via_proxy: String,
    pub dir: tempfile::TempDir,
}

pub fn cuttable_broker(bin: &std::path::Path) -> CuttableBroker {
    let proxy_port = free_port();
    let tansu = Tansu::start(bin, Some(proxy_port));
    let proxy = Proxy::start(proxy_port, SocketAddr::from(([127, 0, 0, 1], tansu.port)));
    let via_proxy = format!("127.0.0.1:{}", proxy.port);
    let dir = tempfile::tempdir().unwrap();
    topics_create(dir.path(), &via_proxy, 3);
    CuttableBroker { _tansu: tansu, proxy, via_proxy, dir }
}

pub async fn ready(admin: &SocketAddr) -> bool {
    reqwest::get(format!("http://{admin}/readyz")).await.is_ok_and(|r| r.status() == 200)
}

/// Waits until the daemon's spool is empty (everything acknowledged by Kafka).
pub async fn drained(d: &Daemon, within: Duration) {
    wait_for("spool drained", within, async || (d.metric("huggy_bridge_spool_events").await == 0.0).then_some(()))
        .await;
}

/// A real, small filesystem (tmpfs) mounted for one test and unmounted when dropped: what a full
/// disk does (`ENOSPC`, partial writes, free space coming back) without touching the machine's.
pub struct SmallFs {
    pub path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl SmallFs {
    /// Mounts a tmpfs of `bytes`; `None` (said on stderr) where mounting is not permitted, unless
    /// `HUGGY_TEST_REQUIRE_TMPFS=1` (CI as root, or `STRICT=1`), where that fails the test.
    pub fn mount(test: &str, bytes: u64) -> Option<SmallFs> {
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir.path())
            .output();
        match out {
            Ok(o) if o.status.success() => Some(SmallFs { path: dir.path().to_owned(), _dir: dir }),
            other => {
                let why = match other {
                    Ok(o) => String::from_utf8_lossy(&o.stderr).into_owned(),
                    Err(e) => e.to_string(),
                };
                assert!(
                    std::env::var("HUGGY_TEST_REQUIRE_TMPFS").as_deref() != Ok("1"),
                    "{test}: cannot mount a tmpfs and HUGGY_TEST_REQUIRE_TMPFS=1: {why}"
                );
                eprintln!("SKIPPED {test}: cannot mount a tmpfs (needs root or CAP_SYS_ADMIN): {why}");
                None
            }
        }
    }

    /// Fills what is left of it with a file; returns the bytes written.
    pub fn fill(&self) -> u64 {
        use std::io::Write as _;
        let mut f = std::fs::File::create(self.path.join("filler")).unwrap();
        let chunk = vec![0u8; 4096];
        let mut written = 0;
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) if e.raw_os_error() == Some(28) => break,
                Err(e) => panic!("filling the tmpfs: {e}"),
            }
        }
        let _ = f.sync_all();
        written
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        // Lazy: a daemon killed with the test may still hold a file open for a moment.
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.path).status();
    }
}
