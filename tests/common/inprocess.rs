//! The daemon in-process (`app::start`), on the embedded broker unless a test points it elsewhere.

use std::ops::Deref;
use std::path::Path;

use huggy_bridge::app::{self, Running};
use huggy_bridge::config::{Config, Secret};
use huggy_bridge::metrics::counter_sum;
use tokio_util::sync::CancellationToken;

use super::consumer::{read_topics_async, Rec};
use super::process::metric_value;

/// A configuration for the daemon in-process: both listeners on port 0, the embedded broker, the
/// spool in `dir`, file capture off.
pub fn inprocess_config(dir: &Path, tokens: &[&str]) -> Config {
    let mut cfg = Config::default();
    cfg.http.listen = "127.0.0.1:0".parse().unwrap();
    cfg.admin.listen = "127.0.0.1:0".parse().unwrap();
    cfg.huggy.tokens = tokens.iter().map(|t| Secret::new(*t)).collect();
    cfg.kafka.brokers = "embedded".into();
    cfg.kafka.partitions = 3;
    cfg.spool.dir = dir.join("spool");
    cfg.files.enabled = false;
    cfg
}

/// One in-process daemon for one test. [`TestApp::stop`] drains it and fails the test if the drain
/// fails; a test that panics before that cancels it on drop instead, so nothing outlives the test.
pub struct TestApp {
    running: Option<Running>,
}

impl TestApp {
    pub async fn start(cfg: Config) -> TestApp {
        let running = app::start(cfg, CancellationToken::new()).await.expect("daemon starts");
        TestApp { running: Some(running) }
    }

    /// The webhook URL.
    pub fn url(&self) -> String {
        format!("http://{}/webhooks/huggy", self.http_addr)
    }

    /// Events acknowledged by Kafka, all types.
    pub fn published(&self) -> u64 {
        counter_sum(&self.metrics.events_published)
    }

    pub fn dead_lettered(&self) -> u64 {
        counter_sum(&self.metrics.events_dead_lettered)
    }

    /// One sample of the admin listener's `/metrics`, as a scraper sees it.
    pub async fn metric(&self, name: &str) -> f64 {
        metric_value(&self.admin_addr, name).await
    }

    /// Every record of `topics` on the embedded broker.
    pub async fn records(&self, topics: &[&str]) -> Vec<Rec> {
        let bootstrap = self.embedded_bootstrap.as_deref().expect("the embedded broker");
        read_topics_async(bootstrap, topics).await
    }

    /// Shuts down, waits for the drain, and fails the test if it did not end cleanly.
    pub async fn stop(mut self) {
        let running = self.running.take().expect("running until stopped");
        running.shutdown();
        running.wait().await.expect("daemon drains and stops cleanly");
    }
}

impl Deref for TestApp {
    type Target = Running;
    fn deref(&self) -> &Running {
        self.running.as_ref().expect("running until stopped")
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(r) = &self.running {
            r.shutdown();
        }
    }
}
