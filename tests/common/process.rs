//! The daemon as a real process: configured through its environment, killed when the test ends.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use huggy_bridge::config::ENV_PREFIX;

use super::{fixture_tokens, free_port};

/// A child process that is killed and reaped when dropped, so a test that fails half-way leaves no
/// broker, daemon or S3 server running behind it.
pub struct ChildGuard(Child);

impl ChildGuard {
    /// # Errors
    /// The program could not be started.
    pub fn spawn(cmd: &mut Command) -> std::io::Result<ChildGuard> {
        cmd.spawn().map(ChildGuard)
    }
}

impl Deref for ChildGuard {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl DerefMut for ChildGuard {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The daemon's configuration as the `HUGGY_BRIDGE_<SECTION>__<KEY>` environment variables an
/// operator would set: `DaemonEnv::new().set("kafka.brokers", addr).set("spool.max_bytes", 50_000)`.
/// A later `set` of the same key replaces the earlier one.
#[derive(Debug, Clone, Default)]
pub struct DaemonEnv(BTreeMap<String, String>);

impl DaemonEnv {
    pub fn new() -> DaemonEnv {
        DaemonEnv::default()
    }

    /// `key` is the dotted TOML path (`delivery.ack`, `files.token_ttl_secs`).
    pub fn set(mut self, key: &str, value: impl std::fmt::Display) -> DaemonEnv {
        let var = format!("{ENV_PREFIX}{}", key.replace('.', "__").to_uppercase());
        self.0.insert(var, value.to_string());
        self
    }

    /// A command for the daemon binary with exactly these variables (none inherited from the test's
    /// own environment), run in `dir` so no `./config.toml` is picked up.
    pub fn command(&self, dir: &Path, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_huggy-bridge"));
        cmd.args(args).current_dir(dir);
        for (k, _) in std::env::vars_os() {
            if k.to_str().is_some_and(|k| k.starts_with(ENV_PREFIX)) {
                cmd.env_remove(k);
            }
        }
        cmd.envs(&self.0);
        cmd
    }
}

pub struct Daemon {
    pub child: ChildGuard,
    pub http: SocketAddr,
    pub admin: SocketAddr,
    pub log: PathBuf,
    /// The environment it was started with, listeners and tokens included.
    pub env: DaemonEnv,
    dir: PathBuf,
}

impl Daemon {
    /// Starts the binary in `dir` with `env`, both listeners on free loopback ports and every fixture
    /// token accepted, and waits until `/healthz` answers.
    pub async fn start(dir: &Path, env: &DaemonEnv) -> Daemon {
        let http = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let env = env
            .clone()
            .set("http.listen", http)
            .set("admin.listen", admin)
            .set("huggy.tokens", fixture_tokens().join(","))
            .set("log.format", "text");
        let log = dir.join(format!("daemon-{}.log", http.port()));
        let logf = std::fs::File::create(&log).unwrap();
        let child = ChildGuard::spawn(
            env.command(dir, &["run"]).env("RUST_LOG", "info,librdkafka=warn").stdout(Stdio::null()).stderr(logf),
        )
        .expect("daemon starts");
        let d = Daemon { child, http, admin, log, env, dir: dir.to_owned() };
        let client = reqwest::Client::new();
        let url = format!("http://{admin}/healthz");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if client.get(&url).send().await.is_ok_and(|r| r.status().is_success()) {
                break;
            }
            assert!(Instant::now() < deadline, "daemon did not start; log:\n{}", d.log_text());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        d
    }

    /// Another command of the binary (`check-config`, `topics list`) with this daemon's configuration.
    pub fn command(&self, args: &[&str]) -> Command {
        self.env.command(&self.dir, args)
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

/// The value of one sample in the admin listener's `/metrics` (`name` with its labels, as printed).
pub async fn metric_value(admin: &SocketAddr, name: &str) -> f64 {
    let text = reqwest::get(format!("http://{admin}/metrics")).await.unwrap().text().await.unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')).map(|v| v.trim().parse().unwrap()))
        .unwrap_or_else(|| panic!("metric {name} not exported"))
}

/// Runs `huggy-bridge topics create` against a broker; returns its stdout.
pub fn topics_create(dir: &Path, bootstrap: &str, partitions: i32) -> String {
    let env =
        DaemonEnv::new().set("huggy.tokens", "x").set("kafka.brokers", bootstrap).set("kafka.partitions", partitions);
    let out = env.command(dir, &["topics", "create"]).output().unwrap();
    assert!(out.status.success(), "topics create failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}
