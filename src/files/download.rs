//! One file's download: the guard's checks, the request, the budget share of its buffer, the
//! stream into the store with its hash, retries with backoff while the deadline allows, and the
//! failure that ends it when it cannot be captured.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use futures::StreamExt;
use sha2::{Digest, Sha256};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::capture::{Progress, Queued};
use super::fetch::{RedirectRefused, Refusal, ResolvedInternal};
use super::schedule::HostEstimate;
use super::{disposition, without_query, FileCapture, FileResult, StoreError};
use crate::event::EventId;
use crate::metrics::FileOutcome;

/// Why one attempt failed, and whether another may succeed.
#[derive(Debug, thiserror::Error)]
pub(super) enum Failure {
    #[error("refused")]
    Refused(#[from] Refusal),
    #[error("refused")]
    Redirect(#[source] RedirectRefused),
    #[error("refused")]
    Resolved(#[source] ResolvedInternal),
    #[error("invalid url")]
    InvalidUrl(#[source] url::ParseError),
    /// The token's deadline passed, or the transfer cannot end before it.
    #[error("expired")]
    Expired,
    /// Kafka ack mode: the request's budget ran out first.
    #[error("ack_timeout")]
    AckTimeout,
    #[error("token rejected with HTTP {0} (expired or revoked)")]
    Rejected(u16),
    #[error("file larger than files.max_file_bytes ({0} bytes)")]
    TooLarge(u64),
    /// Storing the file would take the store's filesystem below `files.min_free_bytes`.
    #[error("file store full: {free} bytes free, files.min_free_bytes keeps {floor} for the spool")]
    StoreFloor { free: u64, floor: u64 },
    #[error("HTTP {0}")]
    Status(u16),
    #[error("no response within {0:?}")]
    NoResponse(Duration),
    #[error("transfer stalled for {0:?}")]
    Stalled(Duration),
    #[error("download failed")]
    Http(#[source] reqwest::Error),
    #[error("store")]
    Store(#[source] StoreError),
    /// The daemon is stopping: nothing is reported, the capture resumes at the next start.
    #[error("shutting down")]
    Shutdown,
}

impl Failure {
    pub(super) fn retryable(&self) -> bool {
        matches!(self, Failure::Status(s) if *s >= 500 || *s == 429 || *s == 408)
            || matches!(self, Failure::NoResponse(_) | Failure::Stalled(_) | Failure::Http(_) | Failure::Store(_))
    }

    /// The final result this failure is counted as.
    pub(super) fn metric(&self) -> FileOutcome {
        match self {
            Failure::Refused(_) | Failure::Redirect(_) | Failure::Resolved(_) => FileOutcome::Refused,
            Failure::Expired | Failure::Rejected(_) => FileOutcome::Expired,
            Failure::TooLarge(_) => FileOutcome::TooLarge,
            Failure::AckTimeout => FileOutcome::AckTimeout,
            _ => FileOutcome::Failed,
        }
    }

    /// What `huggy_bridge_files[].error` says: the message and its causes.
    pub(super) fn report(&self) -> String {
        let mut msg = self.to_string();
        let mut src = std::error::Error::source(self);
        while let Some(s) = src {
            msg.push_str(": ");
            msg.push_str(&s.to_string());
            src = s.source();
        }
        msg
    }
}

/// A reqwest error, refusals of the guard told apart by type (they travel inside reqwest's chain).
fn classify_transport(e: reqwest::Error) -> Failure {
    let mut src: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(&e);
    while let Some(s) = src {
        if let Some(r) = s.downcast_ref::<RedirectRefused>() {
            return Failure::Redirect(RedirectRefused(r.0.clone()));
        }
        if let Some(r) = s.downcast_ref::<ResolvedInternal>() {
            return Failure::Resolved(ResolvedInternal(r.0.clone()));
        }
        src = s.source();
    }
    // reqwest's message names the URL, query (the access token) included.
    Failure::Http(e.without_url())
}

/// A `file://` store's free space is looked at again each time a download has written this much.
const FREE_CHECK_BYTES: u64 = 1024 * 1024;
/// Longest wait for a store to discard a partial upload.
const ABORT_WITHIN: Duration = Duration::from_secs(5);

impl FileCapture {
    /// Reserves a download's share of the buffer budget before its body is read: its size, at most
    /// one store part (what its writer can hold). Waits while the budget is spent, until the
    /// deadline at most.
    async fn reserve_buffer(
        &self,
        expected: Option<u64>,
        deadline: Instant,
        cancel: &CancellationToken,
        stop: &CancellationToken,
    ) -> Result<OwnedSemaphorePermit, Failure> {
        let part = self.store.part_bytes();
        let need = expected.map_or(part, |len| usize::try_from(len).unwrap_or(usize::MAX).min(part));
        let need = u32::try_from(need.clamp(1, self.buffer_budget)).unwrap_or(u32::MAX);
        let waiting = WaitCount::enter(&self.buffer_waiters);
        let permit = tokio::select! {
            p = self.buffers.clone().acquire_many_owned(need) => match p {
                Ok(p) => p,
                // The semaphore is never closed.
                Err(_) => return Err(Failure::Shutdown),
            },
            () = tokio::time::sleep_until(tokio::time::Instant::from_std(deadline)) => return Err(Failure::Expired),
            () = cancel.cancelled() => return Err(Failure::AckTimeout),
            () = stop.cancelled() => return Err(Failure::Shutdown),
        };
        drop(waiting);
        self.note_buffer_use();
        Ok(permit)
    }

    pub(super) fn note_buffer_use(&self) {
        let used = self.buffer_budget.saturating_sub(self.buffers.available_permits());
        self.metrics.file_buffer.set(i64::try_from(used).unwrap_or(i64::MAX));
    }

    /// Whether `incoming` more bytes leave a `file://` store's filesystem at least
    /// `files.min_free_bytes` free (object stores have no such floor).
    fn check_free_space(&self, incoming: u64) -> Result<(), Failure> {
        if self.min_free == 0 {
            return Ok(());
        }
        match self.store.free_bytes() {
            Some(Ok(free)) if free.saturating_sub(incoming) < self.min_free => {
                Err(Failure::StoreFloor { free, floor: self.min_free })
            }
            // An unreadable free space is warned about by the scheduler's tick; it does not stop
            // captures on its own (the write itself fails if the disk is really full).
            _ => Ok(()),
        }
    }

    /// Downloads one file, retrying while the deadline allows. `None` when cut off by shutdown.
    pub(super) async fn capture(
        &self,
        url: &str,
        item: &Queued,
        (event_id, company, received_at): (EventId, Option<String>, i64),
        cancel: &CancellationToken,
        stop: &CancellationToken,
        progress: &Progress,
    ) -> Option<(FileResult, FileOutcome)> {
        #[cfg(test)]
        if self.panic_next.swap(false, Ordering::AcqRel) {
            panic!("injected fault: a download panics");
        }
        let deadline = item.deadline;
        let mut backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(250))
            .with_max_delay(Duration::from_secs(20))
            .with_jitter()
            .without_max_times()
            .build();
        let ids = Ids { event_id, company: company.as_deref(), received_at, index: item.index };
        let result = loop {
            if Instant::now() >= deadline {
                break Err(Failure::Expired);
            }
            match self.attempt(url, deadline, &ids, cancel, stop, progress).await {
                Ok(r) => break Ok(r),
                Err(f) if f.retryable() => {
                    let delay = backoff.next().unwrap_or(Duration::from_secs(20));
                    if delay >= deadline.saturating_duration_since(Instant::now()) {
                        break Err(f);
                    }
                    self.metrics.file_retries.inc();
                    warn!(%event_id, error = %f.report(), delay_ms = delay.as_millis() as u64, "file download failed; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = cancel.cancelled() => break Err(Failure::AckTimeout),
                        () = stop.cancelled() => break Err(Failure::Shutdown),
                    }
                }
                Err(f) => break Err(f),
            }
        };
        match result {
            Ok((r, timing)) => {
                let headroom = deadline.saturating_duration_since(Instant::now()).as_secs();
                self.metrics.file_headroom.observe(headroom as f64);
                if let Some(size) = r.size {
                    self.metrics.file_bytes.inc_by(size);
                    self.lock().hosts.entry(item.host.clone()).or_insert(HostEstimate::UNKNOWN).observe(
                        timing.ttfb.as_secs_f64(),
                        size,
                        timing.body.as_secs_f64(),
                    );
                }
                info!(%event_id, size = r.size, headroom_secs = headroom, "file stored");
                Some((r, FileOutcome::Stored))
            }
            Err(Failure::Shutdown) => None,
            Err(f) => {
                warn!(%event_id, error = %f.report(), "file not captured");
                Some((FileResult::failed(url, f.report()), f.metric()))
            }
        }
    }

    async fn attempt(
        &self,
        raw_url: &str,
        deadline: Instant,
        ids: &Ids<'_>,
        cancel: &CancellationToken,
        stop: &CancellationToken,
        progress: &Progress,
    ) -> Result<(FileResult, Timing), Failure> {
        let url = url::Url::parse(raw_url).map_err(Failure::InvalidUrl)?;
        self.guard.check(&url)?;
        let started = Instant::now();
        let left = deadline.saturating_duration_since(started);
        let head_timeout = left.min(self.idle_timeout);
        let resp = tokio::select! {
            r = tokio::time::timeout(head_timeout, self.client.get(url.clone()).send()) => r
                .map_err(|_| Failure::NoResponse(head_timeout))?
                .map_err(classify_transport)?,
            () = cancel.cancelled() => return Err(Failure::AckTimeout),
            () = stop.cancelled() => return Err(Failure::Shutdown),
        };
        let ttfb = started.elapsed();
        let status = resp.status().as_u16();
        if matches!(status, 401 | 403 | 410) {
            return Err(Failure::Rejected(status));
        }
        if !resp.status().is_success() {
            return Err(Failure::Status(status));
        }
        let expected = resp.content_length();
        if let Some(len) = expected {
            if len > self.max_bytes {
                return Err(Failure::TooLarge(len));
            }
        }
        self.check_free_space(expected.unwrap_or(0))?;
        let _buffer = self.reserve_buffer(expected, deadline, cancel, stop).await?;
        progress.expected.store(expected.unwrap_or(0), Ordering::Relaxed);
        progress.received.store(0, Ordering::Relaxed);
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
        let rel = object_key(ids.company, ids.received_at, ids.event_id, ids.index, &safe);
        let (mut writer, location) = self.store.writer(&rel).await.map_err(Failure::Store)?;
        let mut body = resp.bytes_stream();
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        let body_started = Instant::now();
        let streamed: Result<(), Failure> = async {
            loop {
                let next = tokio::select! {
                    biased;
                    () = stop.cancelled() => return Err(Failure::Shutdown),
                    () = cancel.cancelled() => return Err(Failure::AckTimeout),
                    n = tokio::time::timeout(self.idle_timeout, body.next()) => n.map_err(|_| Failure::Stalled(self.idle_timeout))?,
                };
                let Some(chunk) = next else { break };
                let chunk = chunk.map_err(classify_transport)?;
                size += chunk.len() as u64;
                self.received.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                progress.received.store(size, Ordering::Relaxed);
                if size > self.max_bytes {
                    return Err(Failure::TooLarge(size));
                }
                let now = Instant::now();
                if now > deadline
                    || cannot_finish(expected, size, body_started.elapsed(), deadline.saturating_duration_since(now))
                {
                    return Err(Failure::Expired);
                }
                // Every part's worth of bytes, the store's free space is looked at again.
                if size / FREE_CHECK_BYTES != (size - chunk.len() as u64) / FREE_CHECK_BYTES {
                    self.check_free_space(FREE_CHECK_BYTES)?;
                }
                hasher.update(&chunk);
                writer.write(&chunk).await.map_err(Failure::Store)?;
            }
            Ok(())
        }
        .await;
        if let Err(f) = streamed {
            if tokio::time::timeout(ABORT_WITHIN, writer.abort()).await.is_err() {
                warn!(%location, "the store did not discard a partial upload in time");
            }
            return Err(f);
        }
        let body_time = body_started.elapsed();
        writer.finish().await.map_err(Failure::Store)?;
        let result = FileResult {
            url: without_query(raw_url).to_owned(),
            status: "stored",
            location: Some(location),
            sha256: Some(hex::encode(hasher.finalize())),
            size: Some(size),
            content_type,
            filename: Some(name),
            error: None,
        };
        Ok((result, Timing { ttfb, body: body_time }))
    }
}

/// Counts a waiter for as long as it lives, however its wait ends.
struct WaitCount<'a>(&'a AtomicUsize);

impl<'a> WaitCount<'a> {
    fn enter(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        WaitCount(count)
    }
}

impl Drop for WaitCount<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What names a file in the store.
struct Ids<'a> {
    event_id: EventId,
    company: Option<&'a str>,
    received_at: i64,
    index: usize,
}

/// How one successful download went.
struct Timing {
    ttfb: Duration,
    body: Duration,
}

/// Whether a transfer, at the pace it has kept for at least a second, would need more than `left`
/// even if it went 40 % faster from now on: then it is given up rather than kept taking bandwidth.
pub(super) fn cannot_finish(expected: Option<u64>, received: u64, elapsed: Duration, left: Duration) -> bool {
    let Some(total) = expected else { return false };
    if elapsed < Duration::from_secs(1) || received == 0 {
        return false;
    }
    let rate = received as f64 / elapsed.as_secs_f64();
    let needed = total.saturating_sub(received) as f64 / (rate * 1.4);
    needed > left.as_secs_f64()
}

/// `<company>/<yyyy>/<mm>/<dd>/<event id>/<index>/<file name>`: the file's position among the
/// event's files is a key segment of its own, so two files of one event never share an object
/// whatever their names, and the name is kept as the file host gave it (sanitized).
pub(super) fn object_key(
    company: Option<&str>,
    received_at: i64,
    event_id: EventId,
    index: usize,
    name: &str,
) -> String {
    let date = humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + Duration::from_secs(received_at.max(0).unsigned_abs()),
    )
    .to_string();
    let (y, m, d) = (&date[0..4], &date[5..7], &date[8..10]);
    let company = disposition::sanitize(company.unwrap_or("unknown"));
    format!("{company}/{y}/{m}/{d}/{event_id}/{index}/{name}")
}
