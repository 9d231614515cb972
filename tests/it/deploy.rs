//! The deploy artifacts agree with the daemon: every metric the Grafana dashboard and the alert rules
//! query is one the daemon exports.

use std::collections::BTreeSet;

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
