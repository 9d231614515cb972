//! The binary as an operator runs it: started by a kubelet that injects service-link variables under
//! the daemon's own prefix, checked with `check-config`, scraped for `process_*` metrics.

use crate::common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

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
    assert_eq!(line.trim(), format!("huggy-bridge {} (commit {commit}, spool format 2)", env!("CARGO_PKG_VERSION")));
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
    let mut child = bridge(&["run"], &config, &[("HUGGY_BRIDGE_LOG__FORMAT", "text")])
        .env("RUST_LOG", "info,huggy_bridge=debug,librdkafka=warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let client = reqwest::Client::new();
    let exited =
        common::wait_for("/readyz to answer 200, or the daemon to exit", Duration::from_secs(60), async || {
            if let Some(status) = child.try_wait().unwrap() {
                return Some(Err(status));
            }
            let ready = client.get(format!("http://{admin}/readyz")).send().await;
            ready.is_ok_and(|r| r.status().is_success()).then_some(Ok(()))
        })
        .await;
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(exited.is_ok(), "daemon exited with {exited:?}; log:\n{text}");

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
        "huggy_bridge_build_info{{commit=\"{}\",spool_format=\"2\",version=\"{}\"}} 1",
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
