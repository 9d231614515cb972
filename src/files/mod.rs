//! File capture: Huggy's file URLs carry an access token that dies 10 minutes after the event, so
//! every file an event points to is downloaded as soon as the event is durable, earliest deadline
//! first, streamed into the store, and described in the record's `huggy_bridge_files` header when
//! the event is published (the value stays Huggy's bytes).
//!
//! How many downloads run at once follows the deadlines ([`schedule`]): `files.concurrency` is the
//! floor; when the queue cannot finish before its tokens die, more connections open, up to
//! `files.max_concurrency`, for as long as each step still raises the hosts' throughput. A file that
//! cannot make its deadline is reported `expired` as soon as that is certain, so that it takes no
//! bandwidth from files that can.

mod capture;
pub mod detect;
pub mod disposition;
mod download;
pub(crate) mod fetch;
mod follower;
pub(crate) mod schedule;
pub(crate) mod store;

pub use store::StoreError;

pub use capture::FileCapture;
pub(crate) use follower::{start, Recorded, Started, QUEUED_JOBS, QUEUED_URL_BYTES};

use std::sync::Arc;

use serde::Serialize;
use tokio::sync::oneshot;

use crate::event::EventId;

/// One entry of header `huggy_bridge_files`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct FileResult {
    url: String,
    status: &'static str,
    location: Option<String>,
    sha256: Option<String>,
    size: Option<u64>,
    content_type: Option<String>,
    filename: Option<String>,
    error: Option<String>,
}

impl FileResult {
    pub(crate) fn failed(url: &str, error: String) -> Self {
        FileResult {
            url: without_query(url).to_owned(),
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

/// `url` up to its query or fragment: a Huggy file URL's query is its access token, a credential
/// that goes into no log line, header or error text.
pub(crate) fn without_query(url: &str) -> &str {
    url.find(['?', '#']).map_or(url, |end| &url[..end])
}

/// The JSON array that becomes the event's `huggy_bridge_files` header.
pub(crate) fn results_json(results: &[FileResult]) -> Vec<u8> {
    serde_json::to_vec(results).expect("plain data serializes")
}

/// A spool-mode event's files are done: record `member` (its `huggy_bridge_files` array) for `seq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileDone {
    /// The event's spool sequence number.
    pub seq: u64,
    /// The JSON array published as header `huggy_bridge_files`.
    pub member: Vec<u8>,
}

/// Who is waiting for an event's files.
pub enum Completion {
    /// Spool mode: the result goes to the spool through the results channel.
    Spool(u64),
    /// Kafka mode: the request waits for the result.
    Reply(oneshot::Sender<Vec<u8>>),
}

/// An event's files to capture.
pub struct FileJob {
    /// The event the files belong to; part of each stored object's key.
    pub event_id: EventId,
    /// The event's company id, the first segment of the object keys (`unknown` when absent).
    pub company: Option<String>,
    /// When the event was received (unix seconds, the wall clock: the token's age is Huggy's time):
    /// with `files.token_ttl_secs`, the files' deadline (counted down on the monotonic clock from
    /// submission), and the date in the object keys.
    pub received_at: i64,
    /// The file URLs found in the event, in order; `huggy_bridge_files` lists them in the same order.
    pub urls: Vec<String>,
    /// Where the result goes.
    pub completion: Completion,
}

/// Why file capture could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// `files.store` is malformed, or its directory or bucket client cannot be made.
    #[error("cannot open the file store")]
    Store(#[source] StoreError),
    /// The download client cannot be built (TLS roots, resolver).
    #[error("cannot build the download client")]
    Client(#[source] reqwest::Error),
}

/// The wall clock, in unix seconds (injectable, so that tests can step it).
pub type WallClock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// Memory of one running download besides its share of the buffer budget: hyper's read buffer
/// (it grows to about 400 KiB on a fast stream), TLS records, the chunk between reader and writer.
/// Measured: a few hundred KiB per download with the file host in the same process.
pub const CONNECTION_BYTES: u64 = 512 * 1024;

#[cfg(test)]
mod tests;
