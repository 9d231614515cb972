//! The deploy artifacts agree with the daemon: every metric the Grafana dashboard and the alert rules
//! query is one the daemon exports; the Kubernetes memory limits cover the worst case of the shipped
//! configuration.

use std::collections::BTreeSet;
use std::path::Path;

use huggy_bridge::config::Config;
use huggy_bridge::memory::{parse_quantity, worst_case, Assumptions};

use crate::common::{inprocess_config, TestApp};

/// `huggy_bridge_*` and `process_*` names in a text, histogram series suffixes folded to the family name.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    for prefix in ["huggy_bridge_", "process_"] {
        let mut i = 0;
        while let Some(pos) = text[i..].find(prefix) {
            let start = i + pos;
            let mut end = start;
            while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
                end += 1;
            }
            // A word that merely ends in the prefix (`subprocess_`) is not a metric name.
            let inside_word = prefix == "process_"
                && start > 0
                && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
            if !inside_word {
                out.insert(text[start..end].to_owned());
            }
            i = end;
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_and_alerts_query_is_exported() {
    let root = env!("CARGO_MANIFEST_DIR");
    let dashboard = std::fs::read_to_string(format!("{root}/deploy/grafana/huggy-bridge.json")).unwrap();
    let rules = std::fs::read_to_string(format!("{root}/deploy/kubernetes/prometheusrule.yaml")).unwrap();
    let wanted: BTreeSet<String> = metric_names(&dashboard).into_iter().chain(metric_names(&rules)).collect();
    assert!(wanted.len() >= 15, "{wanted:?}");

    let dir = tempfile::tempdir().unwrap();
    let mut cfg = inprocess_config(dir.path(), &["t"]);
    cfg.files.enabled = true;
    cfg.files.store = format!("file://{}", dir.path().join("files").display());
    let d = TestApp::start(cfg).await;
    let exported = reqwest::get(format!("http://{}/metrics", d.admin_addr)).await.unwrap().text().await.unwrap();
    let families: BTreeSet<String> = exported
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect();
    let missing: Vec<&String> = wanted
        .iter()
        .filter(|name| {
            let family = ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(name);
            !families.contains(*name) && !families.contains(family)
        })
        .collect();
    assert!(missing.is_empty(), "queried but not exported: {missing:?}");
    for line in exported.lines().filter(|l| l.starts_with("# HELP huggy_bridge_")) {
        assert!(line.split_whitespace().count() > 3, "help text on every family: {line}");
    }
    d.stop().await;
}

/// `resources.limits.memory` of the one container in a manifest.
fn memory_limit(manifest: &str) -> u64 {
    let lines: Vec<&str> = manifest.lines().collect();
    let indent = |l: &str| l.len() - l.trim_start().len();
    let at = lines.iter().position(|l| l.trim() == "limits:").expect("a resources.limits block");
    let value = lines[at + 1..]
        .iter()
        .take_while(|l| indent(l) > indent(lines[at]))
        .find_map(|l| l.trim().strip_prefix("memory:"))
        .expect("limits.memory");
    parse_quantity(value.trim().trim_matches('"')).unwrap_or_else(|| panic!("a quantity: {value}"))
}

#[test]
fn the_shipped_memory_limits_cover_the_worst_case_of_the_shipped_configuration() {
    let root = env!("CARGO_MANIFEST_DIR");
    let config = Path::new(root).join("deploy/kubernetes/config/config.toml");
    let cfg = Config::load_offline(Some(&config)).expect("the shipped configuration loads");
    let need = worst_case(&cfg, &Assumptions::default());
    // The figure must not be trivially small: every term of spool mode with capture is in it.
    assert!(need.terms.len() >= 11 && need.total() > 512 << 20, "{need}");
    for manifest in ["statefulset.yaml", "jobs/drain-spool/job.yaml"] {
        let text = std::fs::read_to_string(Path::new(root).join("deploy/kubernetes").join(manifest)).unwrap();
        let limit = memory_limit(&text);
        assert!(
            limit >= need.total(),
            "{manifest}: limits.memory is {} MiB, below the worst case of the shipped configuration:\n{need}",
            limit >> 20
        );
    }
}
