//! The binary as an operator runs it: started by a kubelet that injects service-link variables under
//! the daemon's own prefix, checked with `check-config`, scraped for `process_*` metrics.

use crate::common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use huggy_bridge::app::{self, Overrides};
use huggy_bridge::spool::SegmentIo;
use huggy_bridge::systemd::Notifier;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// What kubelet injects into every pod of a namespace with a Service `huggy-bridge` (ports `http`,
/// `admin`) and a Service `huggy-bridge-admin` (port `admin`).
const KUBELET_SERVICE_LINKS: &[(&str, &str)] = &[
    ("HUGGY_BRIDGE_SERVICE_HOST", "10.96.0.12"),
    ("HUGGY_BRIDGE_SERVICE_PORT", "8080"),
    ("HUGGY_BRIDGE_SERVICE_PORT_HTTP", "8080"),
    ("HUGGY_BRIDGE_SERVICE_PORT_ADMIN", "9090"),
    ("HUGGY_BRIDGE_PORT", "tcp://10.96.0.12:8080"),
    ("HUGGY_BRIDGE_PORT_8080_TCP", "tcp://10.96.0.12:8080"),
    ("HUGGY_BRIDGE_PORT_8080_TCP_PROTO", "tcp"),
    ("HUGGY_BRIDGE_PORT_8080_TCP_PORT", "8080"),
    ("HUGGY_BRIDGE_PORT_8080_TCP_ADDR", "10.96.0.12"),
    ("HUGGY_BRIDGE_PORT_9090_TCP", "tcp://10.96.0.12:9090"),
    ("HUGGY_BRIDGE_PORT_9090_TCP_PROTO", "tcp"),
    ("HUGGY_BRIDGE_PORT_9090_TCP_PORT", "9090"),
    ("HUGGY_BRIDGE_PORT_9090_TCP_ADDR", "10.96.0.12"),
    ("HUGGY_BRIDGE_ADMIN_SERVICE_HOST", "10.96.0.13"),
    ("HUGGY_BRIDGE_ADMIN_SERVICE_PORT", "9090"),
    ("HUGGY_BRIDGE_ADMIN_SERVICE_PORT_ADMIN", "9090"),
    ("HUGGY_BRIDGE_ADMIN_PORT", "tcp://10.96.0.13:9090"),
    ("HUGGY_BRIDGE_ADMIN_PORT_9090_TCP", "tcp://10.96.0.13:9090"),
    ("HUGGY_BRIDGE_ADMIN_PORT_9090_TCP_PROTO", "tcp"),
    ("HUGGY_BRIDGE_ADMIN_PORT_9090_TCP_PORT", "9090"),
    ("HUGGY_BRIDGE_ADMIN_PORT_9090_TCP_ADDR", "10.96.0.13"),
];

/// A configuration file for the embedded broker, its spool in `dir`, listeners on free ports.
fn write_config(dir: &Path) -> (std::path::PathBuf, SocketAddr, SocketAddr) {
    let http = SocketAddr::from(([127, 0, 0, 1], common::free_port()));
    let admin = SocketAddr::from(([127, 0, 0, 1], common::free_port()));
    let path = dir.join("bridge.toml");
    let toml = format!(
        "[http]\nlisten = \"{http}\"\n[admin]\nlisten = \"{admin}\"\n[huggy]\ntokens = [\"t\"]\n\
         [kafka]\nbrokers = \"embedded\"\npartitions = 1\n[spool]\ndir = \"{}\"\n[files]\nenabled = false\n",
        dir.join("spool").display()
    );
    std::fs::write(&path, toml).unwrap();
    (path, http, admin)
}

/// `huggy-bridge` with `args`, the kubelet's variables plus `extra` in its environment, and no other
/// `HUGGY_BRIDGE_*` variable inherited from the test's own environment.
fn bridge(args: &[&str], config: &Path, extra: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_huggy-bridge"));
    cmd.args(args).arg("--config").arg(config);
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("HUGGY_BRIDGE_")) {
        cmd.env_remove(k);
    }
    cmd.envs(KUBELET_SERVICE_LINKS.iter().chain(extra).copied());
    cmd
}

#[test]
fn check_config_accepts_kubelet_service_links() {
    let dir = tempfile::tempdir().unwrap();
    let (config, _, admin) = write_config(dir.path());
    let out = bridge(&["check-config"], &config, &[]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "check-config failed: {stderr}");
    assert!(stdout.contains(&format!("listen = \"{admin}\"")), "the file's admin.listen stands:\n{stdout}");
    assert!(!stdout.contains("10.96.0"), "no service-link value became configuration:\n{stdout}");
    // Then the worst-case memory of that configuration, as comments: the output stays a config file.
    let cfg = huggy_bridge::config::Config::load_offline(Some(&config)).unwrap();
    let worst = huggy_bridge::memory::worst_case(&cfg, &huggy_bridge::memory::Assumptions::default());
    let figure = format!("# Worst-case memory: {} MiB", worst.total().div_ceil(1 << 20));
    assert!(stdout.contains(&figure), "{figure} expected in:\n{stdout}");
    assert!(stdout.parse::<toml::Table>().is_ok(), "check-config's output is TOML:\n{stdout}");
    let tiny = bridge(&["check-config", "--min-event-bytes", "16", "--peak-events-per-sec", "5000"], &config, &[])
        .output()
        .unwrap();
    let tiny = String::from_utf8_lossy(&tiny.stdout);
    assert!(tiny.contains("at most 5000 events/s stored, no event under 16 bytes"), "{tiny}");
}

#[test]
fn version_names_the_version_the_commit_and_the_spool_format() {
    let out = Command::new(env!("CARGO_BIN_EXE_huggy-bridge")).arg("--version").output().unwrap();
    assert!(out.status.success());
    let line = String::from_utf8(out.stdout).unwrap();
    let commit = huggy_bridge::build_info::COMMIT;
    assert_eq!(line.trim(), format!("huggy-bridge {} (commit {commit}, spool format 3)", env!("CARGO_PKG_VERSION")));
    // Built from a checkout, the commit is its HEAD (with -dirty when tracked files differ).
    let root = env!("CARGO_MANIFEST_DIR");
    if Path::new(root).join(".git").exists() {
        let head = Command::new("git").args(["-C", root, "rev-parse", "HEAD"]).output().unwrap();
        let head = String::from_utf8(head.stdout).unwrap();
        assert_eq!(commit.trim_end_matches("-dirty"), head.trim(), "the commit is the checkout's HEAD");
    }
}

#[test]
fn check_config_still_rejects_a_typo_inside_a_section() {
    let dir = tempfile::tempdir().unwrap();
    let (config, _, _) = write_config(dir.path());
    let out = bridge(&["check-config"], &config, &[("HUGGY_BRIDGE_KAFKA__BROKRES", "k1:9092")]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a typo in a known section must fail");
    assert!(stderr.contains("brokres") && stderr.contains("HUGGY_BRIDGE_"), "names the key and its source: {stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_starts_with_kubelet_service_links_and_exports_process_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let (config, _, admin) = write_config(dir.path());
    let log = dir.path().join("daemon.log");
    let mut child = start_binary(&config, admin, &log, "info,huggy_bridge=debug,librdkafka=warn", &[]).await;
    let client = reqwest::Client::new();

    let metrics = client.get(format!("http://{admin}/metrics")).send().await.unwrap().text().await.unwrap();
    let rss: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("process_resident_memory_bytes "))
        .unwrap_or_else(|| panic!("process_resident_memory_bytes not exported:\n{metrics}"))
        .trim()
        .parse()
        .unwrap();
    assert!(rss > 1e6, "resident memory of a running daemon: {rss}");
    let info = format!(
        "huggy_bridge_build_info{{commit=\"{}\",spool_format=\"3\",version=\"{}\"}} 1",
        huggy_bridge::build_info::COMMIT,
        env!("CARGO_PKG_VERSION")
    );
    assert!(metrics.lines().any(|l| l == info), "{info} not exported:\n{metrics}");
    for family in ["process_cpu_seconds_total", "process_open_fds", "process_start_time_seconds"] {
        assert!(metrics.contains(&format!("# TYPE {family} ")), "{family} not exported");
    }

    let text = std::fs::read_to_string(&log).unwrap();
    for (name, _) in KUBELET_SERVICE_LINKS {
        assert!(text.contains(name), "{name} is logged as ignored; log:\n{text}");
    }

    let pid = child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let status =
        common::wait_for("exit after SIGTERM", Duration::from_secs(30), async || child.try_wait().unwrap()).await;
    assert!(status.success(), "exit status {status}; log:\n{}", std::fs::read_to_string(&log).unwrap());
}

// ---------------------------------------------------------------------------------------------
// Exit codes, `topics create` within its timeout, signals, reload, the systemd watchdog

/// A binary run to completion: (exit code, stderr).
fn outcome(cmd: &mut Command) -> (Option<i32>, String) {
    let out = cmd.output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn configuration_errors_exit_78_in_every_command_and_usage_errors_2() {
    let dir = tempfile::tempdir().unwrap();
    let (config, _, _) = write_config(dir.path());
    let typo = [("HUGGY_BRIDGE_KAFKA__BROKERZ", "k1:9092")];
    for args in [
        &["check-config"][..],
        &["run"],
        &["topics", "create"],
        &["topics", "list"],
        &["spool", "status"],
        &["spool", "drain"],
        &["probe"],
    ] {
        let (code, stderr) = outcome(&mut bridge(args, &config, &typo));
        assert_eq!(code, Some(78), "{args:?}: {stderr}");
        assert!(stderr.contains("HUGGY_BRIDGE_KAFKA__BROKERZ: unknown field"), "{args:?}: {stderr}");
        assert_eq!(stderr.matches("BROKERZ").count(), 1, "printed once: {stderr}");
    }
    let missing = [("HUGGY_BRIDGE_HUGGY__TOKENS_FILE", "/nonexistent/tokens")];
    let (code, stderr) = outcome(&mut bridge(&["run"], &config, &missing));
    assert_eq!(code, Some(78), "an unreadable secret file is a configuration error: {stderr}");
    let (code, stderr) = outcome(&mut bridge(&["check-config", "--no-such-flag"], &config, &[]));
    assert_eq!(code, Some(2), "usage: {stderr}");
    let (code, _) = outcome(&mut bridge(&["check-config"], &config, &[]));
    assert_eq!(code, Some(0));
}

#[test]
fn topics_create_gives_up_within_the_request_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let (config, _, _) = write_config(dir.path());
    // A port nothing listens on: every connection is refused, no broker ever answers.
    let brokers = format!("127.0.0.1:{}", common::free_port());
    let began = std::time::Instant::now();
    let (code, stderr) = outcome(&mut bridge(
        &["topics", "create"],
        &config,
        &[("HUGGY_BRIDGE_KAFKA__BROKERS", &brokers), ("HUGGY_BRIDGE_KAFKA__REQUEST_TIMEOUT_MS", "2000")],
    ));
    let took = began.elapsed();
    assert_eq!(code, Some(1), "a runtime failure, not a configuration error: {stderr}");
    assert!(took < Duration::from_secs(20), "took {took:?} (librdkafka's default is 60 s): {stderr}");
    assert!(took >= Duration::from_millis(1900), "gave up before the timeout: {took:?}");
    assert!(stderr.contains("kafka.request_timeout_ms (2000 ms)"), "{stderr}");
    assert_eq!(stderr.matches("request_timeout_ms").count(), 1, "the error is printed once: {stderr}");
}

/// The log filter of a daemon whose log a test reads.
const QUIET: &str = "info,librdkafka=warn";

/// A running binary with `config`, its log in `log`; waits for `/readyz`.
async fn start_binary(
    config: &Path,
    admin: SocketAddr,
    log: &Path,
    rust_log: &str,
    extra: &[(&str, &str)],
) -> common::process::ChildGuard {
    let mut child = common::process::ChildGuard::spawn(
        bridge(&["run"], config, &[[("HUGGY_BRIDGE_LOG__FORMAT", "text")].as_slice(), extra].concat())
            .env("RUST_LOG", rust_log)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap()),
    )
    .unwrap();
    let client = reqwest::Client::new();
    let started =
        common::wait_for("/readyz to answer 200, or the daemon to exit", Duration::from_secs(60), async || {
            if let Some(status) = child.try_wait().unwrap() {
                return Some(Err(status));
            }
            let ready = client.get(format!("http://{admin}/readyz")).send().await;
            ready.is_ok_and(|r| r.status().is_success()).then_some(Ok(()))
        })
        .await;
    assert!(started.is_ok(), "daemon exited with {started:?}; log:\n{}", std::fs::read_to_string(log).unwrap());
    child
}

fn signal(child: &std::process::Child, name: &str) {
    assert!(Command::new("kill").args([&format!("-{name}"), &child.id().to_string()]).status().unwrap().success());
}

/// A configuration whose tokens come from `tokens_file`, for the embedded broker.
fn write_config_with_tokens_file(dir: &Path, extra: &str) -> (std::path::PathBuf, SocketAddr, SocketAddr) {
    let http = SocketAddr::from(([127, 0, 0, 1], common::free_port()));
    let admin = SocketAddr::from(([127, 0, 0, 1], common::free_port()));
    let path = dir.join("bridge.toml");
    let toml = format!(
        "[http]\nlisten = \"{http}\"\n[admin]\nlisten = \"{admin}\"\n[huggy]\ntokens_file = \"{}\"\n\
         [kafka]\nbrokers = \"embedded\"\npartitions = 1\n[spool]\ndir = \"{}\"\n[files]\nenabled = false\n{extra}",
        dir.join("tokens").display(),
        dir.join("spool").display()
    );
    std::fs::write(&path, toml).unwrap();
    (path, http, admin)
}

/// Replaces a file the way Kubernetes updates a Secret volume: a new file renamed over the old.
fn replace_file(path: &Path, content: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn batch_with_token(token: &str, client: usize, batch: usize) -> String {
    common::load_batch(client, batch, 2).0.replace(common::LOAD_TOKEN, token)
}

async fn reloads(admin: &SocketAddr, result: &str) -> f64 {
    common::process::metric_value(admin, &format!("huggy_bridge_config_reloads_total{{result=\"{result}\"}}")).await
}

/// SIGHUP and wait until the reload is counted under `result`.
async fn hangup(child: &std::process::Child, admin: &SocketAddr, result: &str) {
    let before = reloads(admin, result).await;
    signal(child, "HUP");
    common::wait_for(&format!("a reload counted as {result}"), Duration::from_secs(20), async || {
        (reloads(admin, result).await > before).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_rotate_through_a_tokens_file_and_sighup_under_load() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "0123\n").unwrap();
    let (config, http, admin) = write_config_with_tokens_file(dir.path(), "");
    let log = dir.path().join("daemon.log");
    let mut child = start_binary(&config, admin, &log, QUIET, &[]).await;
    let url = format!("http://{http}/webhooks/huggy");

    // A batch whose body is still arriving when its token is removed: judged by the tokens in force
    // when it arrived. It is the only request in flight until its body bytes are reserved, which
    // happens after the handler took the tokens in force.
    let slow_body = batch_with_token("0123", 99, 0);
    let mut slow = tokio::net::TcpStream::connect(http).await.unwrap();
    let head = format!(
        "POST /webhooks/huggy HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        slow_body.len()
    );
    slow.write_all(head.as_bytes()).await.unwrap();
    slow.write_all(&slow_body.as_bytes()[..10]).await.unwrap();
    common::wait_for("the slow request to be in the handler", Duration::from_secs(20), async || {
        let held = common::process::metric_value(&admin, "huggy_bridge_http_inflight_body_bytes").await;
        (held > 0.0).then_some(())
    })
    .await;

    // Load throughout: every client sends with the token it was told is valid, and records any
    // refusal. A client holds the token's read lock for the whole request, so the token changes
    // only between requests, and only while both the old and the new one are accepted.
    let token = Arc::new(tokio::sync::RwLock::new("0123".to_owned()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..4 {
        let (token, stop, url) = (token.clone(), stop.clone(), url.clone());
        clients.push(tokio::spawn(async move {
            let (mut sent, mut refused) = (0, Vec::new());
            for b in 0.. {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let t = token.read().await;
                let (status, text) = common::post(&url, batch_with_token(&t, c, b)).await;
                sent += 1;
                if status != 200 {
                    refused.push(format!("{}: {status} {text}", *t));
                }
            }
            (sent, refused)
        }));
    }

    tokio::time::sleep(Duration::from_millis(300)).await;
    // Rotation, as an operator does it: add the new token, move Huggy over, remove the old one.
    replace_file(&tokens, "0123\ntrue\n");
    hangup(&child, &admin, "applied").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Waits for the requests in flight with the old token to be answered.
    *token.write().await = "true".to_owned();
    tokio::time::sleep(Duration::from_millis(300)).await;
    replace_file(&tokens, "true\n");
    hangup(&child, &admin, "applied").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    let mut total = 0;
    for c in clients {
        let (sent, refused) = c.await.unwrap();
        assert!(refused.is_empty(), "requests refused though their token was valid: {refused:?}");
        total += sent;
    }
    assert!(total >= 8, "load ran throughout: {total} requests");

    slow.write_all(&slow_body.as_bytes()[10..]).await.unwrap();
    let mut answer = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(20), slow.read(&mut answer)).await.unwrap().unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 200"), "the batch read across the reload: {answer}");

    let (status, _) = common::post(&url, batch_with_token("0123", 7, 0)).await;
    assert_eq!(status, 401, "a removed token is refused from then on");
    let (status, _) = common::post(&url, batch_with_token("true", 7, 1)).await;
    assert_eq!(status, 200);
    let (status, echo) = common::post(&url, r#"{"token":"true","validToken":true}"#).await;
    assert_eq!((status, echo.as_str()), (200, "true"), "the handshake with the new token");

    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(text.matches("configuration reloaded").count(), 2, "{text}");
    signal(&child, "TERM");
    let status =
        common::wait_for("exit after SIGTERM", Duration::from_secs(30), async || child.try_wait().unwrap()).await;
    assert!(status.success(), "{status}; log:\n{}", std::fs::read_to_string(&log).unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_reload_keeps_the_old_configuration_serving() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "old-token\n").unwrap();
    let (config, http, admin) = write_config_with_tokens_file(dir.path(), "");
    let log = dir.path().join("daemon.log");
    let child = start_binary(&config, admin, &log, QUIET, &[]).await;
    let url = format!("http://{http}/webhooks/huggy");

    // A broken file, then a vanished tokens file, then an empty one: each refused, the old tokens stay.
    let good = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("{good}\n[shutdown]\ntimeout_sec = 1\n")).unwrap();
    hangup(&child, &admin, "rejected").await;
    std::fs::write(&config, &good).unwrap();
    std::fs::remove_file(&tokens).unwrap();
    hangup(&child, &admin, "rejected").await;
    std::fs::write(&tokens, "\n").unwrap();
    hangup(&child, &admin, "rejected").await;
    assert_eq!(reloads(&admin, "applied").await, 0.0);

    let (status, text) = common::post(&url, batch_with_token("old-token", 1, 0)).await;
    assert_eq!(status, 200, "still serving with the old tokens: {text}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(text.matches("configuration reload refused").count(), 3, "{text}");
    assert!(
        text.contains("shutdown.timeout_sec: unknown field") && text.contains("huggy.tokens_file: cannot read"),
        "the log says why:\n{text}"
    );

    // A changed section that a reload cannot apply is named.
    std::fs::write(&tokens, "old-token\n").unwrap();
    std::fs::write(&config, good.replace("partitions = 1", "partitions = 2")).unwrap();
    hangup(&child, &admin, "applied").await;
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.lines().any(|l| l.contains("restart to apply them")
            && (l.contains("sections=\"kafka\"") || l.contains("sections=kafka"))),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let (config, http, admin) = write_config_with_tokens_file(dir.path(), "[shutdown]\ntimeout_secs = 120\n");
    std::fs::write(dir.path().join("tokens"), "t\n").unwrap();
    let log = dir.path().join("daemon.log");
    let mut child =
        start_binary(&config, admin, &log, QUIET, &[("HUGGY_BRIDGE_HTTP__BODY_TIMEOUT_MS", "120000")]).await;
    // A request whose body never finishes keeps the drain waiting for up to shutdown.timeout_secs.
    let mut stuck = tokio::net::TcpStream::connect(http).await.unwrap();
    stuck.write_all(b"POST /webhooks/huggy HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{\"tok").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    signal(&child, "TERM");
    common::wait_for("the drain to begin", Duration::from_secs(20), async || {
        std::fs::read_to_string(&log).unwrap().contains("draining").then_some(())
    })
    .await;
    assert!(child.try_wait().unwrap().is_none(), "the drain waits for the request in flight");
    let began = std::time::Instant::now();
    signal(&child, "INT");
    let status =
        common::wait_for("exit after the second signal", Duration::from_secs(10), async || child.try_wait().unwrap())
            .await;
    assert!(began.elapsed() < Duration::from_secs(10));
    assert_eq!(status.code(), Some(huggy_bridge::shutdown::INTERRUPTED_EXIT_CODE));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("second signal: exiting now"), "{text}");
}

/// A disk whose `fdatasync` can be made to hang until released: a stuck spool writer.
#[derive(Default)]
struct HangingDisk {
    hang: Mutex<bool>,
    released: Condvar,
}

impl HangingDisk {
    fn set(&self, hang: bool) {
        *self.hang.lock().unwrap() = hang;
        self.released.notify_all();
    }
}

impl SegmentIo for HangingDisk {
    fn sync_data(&self, file: &std::fs::File) -> std::io::Result<()> {
        let mut hung = self.hang.lock().unwrap();
        while *hung {
            hung = self.released.wait(hung).unwrap();
        }
        drop(hung);
        file.sync_data()
    }
}

/// Notifications received on a fake `NOTIFY_SOCKET` within `window`.
async fn notifications(sock: &tokio::net::UnixDatagram, window: Duration) -> Vec<String> {
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    let end = tokio::time::Instant::now() + window;
    while let Ok(Ok(n)) = tokio::time::timeout_at(end, sock.recv(&mut buf)).await {
        got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watchdog_stops_while_the_spool_writer_is_stuck() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("notify.sock");
    let sock = tokio::net::UnixDatagram::bind(&socket).unwrap();
    let mut cfg = common::inprocess_config(dir.path(), &[common::LOAD_TOKEN]);
    cfg.spool.stall_timeout_secs = 1;
    let disk = Arc::new(HangingDisk::default());
    let overrides = Overrides {
        spool_io: Some(disk.clone() as Arc<dyn SegmentIo>),
        notifier: Some(Notifier::new(&socket, Some(Duration::from_millis(400)))),
        ..Overrides::default()
    };
    let d = app::start_with(cfg, CancellationToken::new(), overrides).await.expect("daemon starts");
    let healthz = format!("http://{}/healthz", d.admin_addr);

    let first = notifications(&sock, Duration::from_secs(2)).await;
    assert_eq!(first.first().map(String::as_str), Some("READY=1"), "{first:?}");
    let fed = first.iter().filter(|m| *m == "WATCHDOG=1").count();
    assert!(fed >= 3, "fed twice per interval while alive: {first:?}");

    // The spool writer hangs in fdatasync with a batch to make durable.
    disk.set(true);
    let url = format!("http://{}/webhooks/huggy", d.http_addr);
    let stuck = tokio::spawn(async move { common::post(&url, common::load_batch(1, 0, 2).0).await });
    common::wait_for("/healthz to fail", Duration::from_secs(30), async || {
        let r = reqwest::get(&healthz).await.ok()?;
        (r.status() == 503).then_some(())
    })
    .await;
    let _ = notifications(&sock, Duration::from_millis(250)).await; // one already on its way
    let while_stuck = notifications(&sock, Duration::from_secs(3)).await;
    assert!(!while_stuck.iter().any(|m| m == "WATCHDOG=1"), "no WATCHDOG=1 while stuck: {while_stuck:?}");

    // Released, the writer finishes, liveness passes and the watchdog is fed again.
    disk.set(false);
    let (status, text) = stuck.await.unwrap();
    assert!(status == 200 || status == 503, "answered once the disk is back: {status} {text}");
    let after = notifications(&sock, Duration::from_secs(3)).await;
    assert!(after.iter().any(|m| m == "WATCHDOG=1"), "fed again once alive: {after:?}");

    d.shutdown();
    d.wait().await.unwrap();
    let last = notifications(&sock, Duration::from_millis(500)).await;
    assert!(after.iter().chain(&last).any(|m| m == "STOPPING=1"), "{after:?} {last:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_ends_within_its_budget_while_the_spool_disk_hangs() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::inprocess_config(dir.path(), &[common::LOAD_TOKEN]);
    cfg.shutdown.timeout_secs = 2;
    let disk = Arc::new(HangingDisk::default());
    let overrides = Overrides { spool_io: Some(disk.clone() as Arc<dyn SegmentIo>), ..Overrides::default() };
    let d = app::start_with(cfg, CancellationToken::new(), overrides).await.expect("daemon starts");
    let url = format!("http://{}/webhooks/huggy", d.http_addr);
    let (status, _) = common::post(&url, common::load_batch(1, 0, 2).0).await;
    assert_eq!(status, 200);
    // The writer hangs in fdatasync with a batch to make durable (never answered 2xx).
    disk.set(true);
    let stuck = tokio::spawn(async move { common::post(&url, common::load_batch(1, 1, 2).0).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let began = std::time::Instant::now();
    d.shutdown();
    let ended = tokio::time::timeout(Duration::from_secs(20), d.wait()).await;
    let took = began.elapsed();
    disk.set(false);
    assert!(ended.is_ok(), "the drain waited for the hung disk beyond its budget");
    // The budget (2 s) plus a second for each of the last steps and the tasks' grace, with room.
    assert!(took < Duration::from_secs(12), "drain took {took:?}");
    let _ = stuck.await;
    eprintln!("drain with a hung spool disk ended after {took:?} (budget 2 s)");
}

/// A Secret volume as kubelet lays it out: `tokens -> ..data/tokens`, `..data -> ..<version>`.
fn kubelet_secret_volume(dir: &Path, version: &str, tokens: &str) {
    let versioned = dir.join(format!("..{version}"));
    std::fs::create_dir_all(&versioned).unwrap();
    std::fs::write(versioned.join("tokens"), tokens).unwrap();
    let tmp = dir.join("..data_tmp");
    std::os::unix::fs::symlink(format!("..{version}"), &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    if !dir.join("tokens").exists() {
        std::os::unix::fs::symlink("..data/tokens", dir.join("tokens")).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_volume_updated_in_place_is_picked_up_without_a_signal() {
    let dir = tempfile::tempdir().unwrap();
    let volume = dir.path().join("secrets");
    std::fs::create_dir(&volume).unwrap();
    kubelet_secret_volume(&volume, "2026_01_01", "first\n");
    let config = dir.path().join("bridge.toml");
    std::fs::write(
        &config,
        format!(
            "[http]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:{}\"\n[huggy]\ntokens_file = \"{}\"\n\
             [kafka]\nbrokers = \"embedded\"\npartitions = 1\n[spool]\ndir = \"{}\"\n[files]\nenabled = false\n",
            common::free_port(),
            volume.join("tokens").display(),
            dir.path().join("spool").display()
        ),
    )
    .unwrap();
    let cfg = huggy_bridge::config::Config::load(Some(&config)).expect("loads");
    let d = app::start(cfg, CancellationToken::new()).await.expect("daemon starts");
    let stop = CancellationToken::new();
    d.reloader().watch_secret_files(Some(config.clone()), Duration::from_millis(100), stop.clone());
    let url = format!("http://{}/webhooks/huggy", d.http_addr);
    assert_eq!(common::post(&url, batch_with_token("first", 1, 0)).await.0, 200);

    kubelet_secret_volume(&volume, "2026_01_02", "second\n");
    common::wait_for("the rotated token to be accepted", Duration::from_secs(20), async || {
        (common::post(&url, batch_with_token("second", 1, 1)).await.0 == 200).then_some(())
    })
    .await;
    assert_eq!(common::post(&url, batch_with_token("first", 1, 2)).await.0, 401, "the old token is gone");
    let applied = huggy_bridge::metrics::counter_sum(&d.metrics.config_reloads);
    assert_eq!(applied, 1, "one change, one reload");
    stop.cancel();
    d.shutdown();
    d.wait().await.unwrap();
}
