//! File capture: Huggy's file URLs carry an access token that dies 10 minutes after the event, so
//! every file an event points to is downloaded as soon as the event is durable, earliest deadline
//! first, with bounded concurrency and retries only while the token lives, streamed into the store,
//! and described in a `bridge_files` member appended to the event before it is published.

pub mod detect;
pub mod disposition;
pub mod fetch;
pub mod store;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use futures::StreamExt;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::{oneshot, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::clock::now_secs;
use crate::config::FilesConfig;
use crate::event::EventId;
use crate::metrics::Metrics;
use fetch::{Guard, Refusal};
use store::FileStore;

/// One entry of `bridge_files`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileResult {
    pub url: String,
    pub status: &'static str,
    pub location: Option<String>,
    pub sha256: Option<String>,
    pub size: Option<u64>,
    pub content_type: Option<String>,
    pub filename: Option<String>,
    pub error: Option<String>,
}

impl FileResult {
    pub fn failed(url: &str, error: String) -> Self {
        FileResult {
            url: url.to_owned(),
            status: "failed",
            location: None,
            sha256: None,
            size: None,
            content_type: None,
            filename: None,
            error: Some(error),
        }
    }
}

/// The JSON array that becomes the event's `bridge_files` member.
pub fn bridge_files_json(results: &[FileResult]) -> Vec<u8> {
    serde_json::to_vec(results).expect("plain data serializes")
}

/// Why one attempt failed, and whether another may succeed.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error("refused: {0}")]
    Refused(String),
    #[error("expired: the access token's deadline passed")]
    Expired,
    #[error("token rejected with HTTP {0} (expired or revoked)")]
    Rejected(u16),
    #[error("file larger than files.max_file_bytes ({0} bytes)")]
    TooLarge(u64),
    #[error("HTTP {0}")]
    Status(u16),
    #[error("{0}")]
    Transport(String),
    #[error("store: {0}")]
    Store(String),
}

impl Failure {
    fn retryable(&self) -> bool {
        matches!(self, Failure::Status(s) if *s >= 500 || *s == 429 || *s == 408)
            || matches!(self, Failure::Transport(_) | Failure::Store(_))
    }

    fn metric(&self) -> &'static str {
        match self {
            Failure::Refused(_) => "refused",
            Failure::Expired | Failure::Rejected(_) => "expired",
            Failure::TooLarge(_) => "too_large",
            _ => "failed",
        }
    }
}

/// Who is waiting for an event's files.
pub enum Completion {
    /// Spool mode: record the result in the spool, which wakes the publisher.
    Spool(u64),
    /// Kafka mode: the request waits for the result.
    Reply(oneshot::Sender<Vec<u8>>),
}

/// An event's files to capture.
pub struct FileJob {
    pub event_id: EventId,
    pub company: Option<String>,
    pub received_at: i64,
    pub urls: Vec<String>,
    pub completion: Completion,
}

struct Queued {
    deadline: i64,
    order: u64,
    job: usize,
    index: usize,
}

impl PartialEq for Queued {
    fn eq(&self, o: &Self) -> bool {
        (self.deadline, self.order) == (o.deadline, o.order)
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Queued {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.deadline, self.order).cmp(&(o.deadline, o.order))
    }
}

struct JobState {
    job: FileJob,
    results: Vec<Option<FileResult>>,
    remaining: usize,
}

#[derive(Default)]
struct Queue {
    heap: BinaryHeap<Reverse<Queued>>,
    jobs: HashMap<usize, JobState>,
    next_job: usize,
    next_order: u64,
}

/// Called with (spool seq, `bridge_files` JSON) when a spool-mode event's files are done.
pub type SpoolSink = Arc<dyn Fn(u64, Vec<u8>) + Send + Sync>;

pub struct FileCapture {
    queue: Mutex<Queue>,
    wake: Notify,
    client: reqwest::Client,
    guard: Arc<Guard>,
    store: FileStore,
    prefixes: Vec<String>,
    ttl_secs: i64,
    max_bytes: u64,
    idle_timeout: Duration,
    metrics: Arc<Metrics>,
    spool_sink: Mutex<Option<SpoolSink>>,
}

impl FileCapture {
    /// # Errors
    /// The store or the HTTP client cannot be set up.
    pub fn new(cfg: &FilesConfig, metrics: Arc<Metrics>) -> anyhow::Result<Arc<FileCapture>> {
        let guard = Arc::new(Guard::new(&cfg.allowed_url_prefixes));
        Ok(Arc::new(FileCapture {
            queue: Mutex::new(Queue::default()),
            wake: Notify::new(),
            client: fetch::client(guard.clone(), Duration::from_millis(cfg.connect_timeout_ms))?,
            guard,
            store: FileStore::from_config(cfg)?,
            prefixes: cfg.allowed_url_prefixes.clone(),
            ttl_secs: i64::try_from(cfg.token_ttl_secs).unwrap_or(600),
            max_bytes: cfg.max_file_bytes,
            idle_timeout: Duration::from_millis(cfg.idle_timeout_ms),
            metrics,
            spool_sink: Mutex::new(None),
        }))
    }

    /// Where spool-mode results go.
    pub fn set_spool_sink(&self, sink: SpoolSink) {
        *self.spool_sink.lock().unwrap_or_else(|p| p.into_inner()) = Some(sink);
    }

    /// File URLs in an event's bytes.
    pub fn detect(&self, value: &[u8]) -> Vec<String> {
        detect::file_urls(value, &self.prefixes)
    }

    pub fn store(&self) -> &FileStore {
        &self.store
    }

    /// Queues an event's files, earliest deadline first.
    pub fn submit(&self, job: FileJob) {
        let deadline = job.received_at + self.ttl_secs;
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        let id = q.next_job;
        q.next_job += 1;
        let n = job.urls.len();
        for index in 0..n {
            let order = q.next_order;
            q.next_order += 1;
            q.heap.push(Reverse(Queued { deadline, order, job: id, index }));
        }
        q.jobs.insert(id, JobState { job, results: vec![None; n], remaining: n });
        self.metrics.file_queue.add(n as i64);
        drop(q);
        for _ in 0..n {
            self.wake.notify_one();
        }
    }

    /// Runs `concurrency` download workers until `stop`.
    pub fn spawn_workers(self: &Arc<Self>, concurrency: usize, stop: CancellationToken) {
        for _ in 0..concurrency {
            let me = self.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                loop {
                    let next = me.queue.lock().unwrap_or_else(|p| p.into_inner()).heap.pop();
                    let Some(Reverse(item)) = next else {
                        tokio::select! {
                            () = me.wake.notified() => continue,
                            () = stop.cancelled() => break,
                        }
                    };
                    let (url, job_info) = {
                        let q = me.queue.lock().unwrap_or_else(|p| p.into_inner());
                        let st = &q.jobs[&item.job];
                        (st.job.urls[item.index].clone(), (st.job.event_id, st.job.company.clone(), st.job.received_at))
                    };
                    let result = tokio::select! {
                        r = me.capture(&url, item.deadline, item.index, job_info) => r,
                        () = stop.cancelled() => break,
                    };
                    me.metrics.file_queue.dec();
                    me.finish(item.job, item.index, result);
                }
            });
        }
    }

    fn finish(&self, job: usize, index: usize, result: FileResult) {
        let done = {
            let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            let st = q.jobs.get_mut(&job).expect("job present while its files are queued");
            st.results[index] = Some(result);
            st.remaining -= 1;
            if st.remaining == 0 {
                q.jobs.remove(&job)
            } else {
                None
            }
        };
        let Some(st) = done else { return };
        let results: Vec<FileResult> = st.results.into_iter().flatten().collect();
        let json = bridge_files_json(&results);
        match st.job.completion {
            Completion::Spool(seq) => {
                let sink = self.spool_sink.lock().unwrap_or_else(|p| p.into_inner()).clone();
                match sink {
                    Some(s) => s(seq, json),
                    None => warn!(seq, "file results with no spool to record them"),
                }
            }
            Completion::Reply(tx) => {
                let _ = tx.send(json);
            }
        }
    }

    /// Downloads one file, retrying while the deadline allows; never fails, reports instead.
    async fn capture(
        &self,
        url: &str,
        deadline: i64,
        index: usize,
        (event_id, company, received_at): (EventId, Option<String>, i64),
    ) -> FileResult {
        let mut backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(250))
            .with_max_delay(Duration::from_secs(20))
            .with_jitter()
            .without_max_times()
            .build();
        let result = loop {
            if now_secs() >= deadline {
                break Err(Failure::Expired);
            }
            match self.attempt(url, deadline, index, event_id, company.as_deref(), received_at).await {
                Ok(r) => break Ok(r),
                Err(f) if f.retryable() => {
                    let delay = backoff.next().unwrap_or(Duration::from_secs(20));
                    let left = deadline - now_secs();
                    if i64::try_from(delay.as_secs()).unwrap_or(i64::MAX) >= left {
                        break Err(f);
                    }
                    self.metrics.file_downloads.with_label_values(&["retried"]).inc();
                    warn!(%event_id, error = %f, delay_ms = delay.as_millis() as u64, "file download failed; retrying");
                    tokio::time::sleep(delay).await;
                }
                Err(f) => break Err(f),
            }
        };
        match result {
            Ok(r) => {
                let headroom = (deadline - now_secs()).max(0);
                self.metrics.file_downloads.with_label_values(&["stored"]).inc();
                self.metrics.file_headroom.observe(headroom as f64);
                if let Some(size) = r.size {
                    self.metrics.file_bytes.inc_by(size);
                }
                info!(%event_id, size = r.size, headroom_secs = headroom, "file stored");
                r
            }
            Err(f) => {
                self.metrics.file_downloads.with_label_values(&[f.metric()]).inc();
                if f.metric() != "failed" {
                    self.metrics.file_downloads.with_label_values(&["failed"]).inc();
                }
                warn!(%event_id, error = %f, "file not captured");
                FileResult::failed(url, f.to_string())
            }
        }
    }

    async fn attempt(
        &self,
        raw_url: &str,
        deadline: i64,
        index: usize,
        event_id: EventId,
        company: Option<&str>,
        received_at: i64,
    ) -> Result<FileResult, Failure> {
        let url = url::Url::parse(raw_url).map_err(|e| Failure::Transport(format!("invalid url: {e}")))?;
        self.guard.check(&url).map_err(|r: Refusal| Failure::Refused(r.to_string()))?;
        let left = Duration::from_secs(u64::try_from(deadline - now_secs()).unwrap_or(0));
        let head_timeout = left.min(self.idle_timeout);
        let resp = tokio::time::timeout(head_timeout, self.client.get(url.clone()).send())
            .await
            .map_err(|_| Failure::Transport("no response in time".into()))?
            .map_err(|e| classify_transport(&e))?;
        let status = resp.status().as_u16();
        if matches!(status, 401 | 403 | 410) {
            return Err(Failure::Rejected(status));
        }
        if !resp.status().is_success() {
            return Err(Failure::Status(status));
        }
        if let Some(len) = resp.content_length() {
            if len > self.max_bytes {
                return Err(Failure::TooLarge(len));
            }
        }
        let content_type =
            resp.headers().get(reqwest::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let final_url = resp.url().clone();
        let name = resp
            .headers()
            .get(reqwest::header::CONTENT_DISPOSITION)
            .and_then(|v| {
                v.to_str().ok().map(str::to_owned).or_else(|| Some(String::from_utf8_lossy(v.as_bytes()).into_owned()))
            })
            .and_then(|v| disposition::filename_from_disposition(&v))
            .or_else(|| disposition::filename_from_url(&url))
            .or_else(|| disposition::filename_from_url(&final_url))
            .unwrap_or_else(|| "file".into());
        let safe = disposition::sanitize(&name);
        let rel = object_key(company, received_at, event_id, index, &safe);
        let (mut writer, location) = self.store.writer(&rel).await.map_err(|e| Failure::Store(e.to_string()))?;
        let mut body = resp.bytes_stream();
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        let streamed: Result<(), Failure> = async {
            loop {
                let next = tokio::time::timeout(self.idle_timeout, body.next())
                    .await
                    .map_err(|_| Failure::Transport("transfer stalled".into()))?;
                let Some(chunk) = next else { break };
                let chunk = chunk.map_err(|e| classify_transport(&e))?;
                size += chunk.len() as u64;
                if size > self.max_bytes {
                    return Err(Failure::TooLarge(size));
                }
                if now_secs() > deadline {
                    return Err(Failure::Expired);
                }
                hasher.update(&chunk);
                writer.write(&chunk).await.map_err(|e| Failure::Store(e.to_string()))?;
            }
            Ok(())
        }
        .await;
        if let Err(f) = streamed {
            writer.abort().await;
            return Err(f);
        }
        writer.finish().await.map_err(|e| Failure::Store(e.to_string()))?;
        Ok(FileResult {
            url: raw_url.to_owned(),
            status: "stored",
            location: Some(location),
            sha256: Some(hex::encode(hasher.finalize())),
            size: Some(size),
            content_type,
            filename: Some(name),
            error: None,
        })
    }
}

fn classify_transport(e: &reqwest::Error) -> Failure {
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    if e.is_redirect() || msg.contains("internal addresses") {
        Failure::Refused(msg)
    } else {
        Failure::Transport(msg)
    }
}

/// `<company>/<yyyy>/<mm>/<dd>/<event id>/<file name>`; a second file of the same event gets its
/// index in front of the name so two files never overwrite each other.
fn object_key(company: Option<&str>, received_at: i64, event_id: EventId, index: usize, name: &str) -> String {
    let date = humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + Duration::from_secs(received_at.max(0).unsigned_abs()),
    )
    .to_string();
    let (y, m, d) = (&date[0..4], &date[5..7], &date[8..10]);
    let company = disposition::sanitize(company.unwrap_or("unknown"));
    let name = if index == 0 { name.to_owned() } else { format!("{index}-{name}") };
    format!("{company}/{y}/{m}/{d}/{event_id}/{name}")
}
