//! `[files]` and `[files.s3]`: capture of the files events point to, and the store they go to.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::scalar::scalar_secret;
use super::Secret;

/// The smallest `files.max_buffer_bytes`: one S3 multipart part (S3's minimum size of every part
/// but the last, the size the file store uploads in), so that every download's share fits.
pub const MIN_BUFFER_BYTES: u64 = 5 * 1024 * 1024;

/// `[files]`: capture of the files events point to, before their access tokens expire.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FilesConfig {
    /// Capture on or off; off, events are published without waiting for files.
    pub enabled: bool,
    /// Strings in an event that start with one of these are files to capture; nothing else is
    /// fetched. Each must end with `/`.
    pub allowed_url_prefixes: Vec<String>,
    /// Lifetime of a file URL's token: its deadline is the event's receipt plus this.
    pub token_ttl_secs: u64,
    /// Larger files are reported `failed`, and nothing of them is left in the store.
    pub max_file_bytes: u64,
    /// `file://path` or `s3://bucket/prefix`.
    pub store: String,
    /// Downloads running at once at least (the floor); more open under deadline pressure.
    pub concurrency: usize,
    /// Downloads running at once at most, however many files are at risk.
    pub max_concurrency: usize,
    /// Time allowed to connect to a file host.
    pub connect_timeout_ms: u64,
    /// A transfer that receives nothing for this long is abandoned (and retried while the token lives).
    pub idle_timeout_ms: u64,
    /// Bytes all downloads together may hold in memory (their upload buffers), whatever the
    /// concurrency: a download reserves its share (its size, at most one store part) before reading
    /// its body, and waits while the budget is spent. At least one S3 part (5 MiB).
    pub max_buffer_bytes: u64,
    /// `file://` stores: free space the captures leave on the store's filesystem. A file whose
    /// download would take the free space below this is reported `failed` (the event is still
    /// published). Unset: the spool's `spool.max_bytes` when the store is on the spool's
    /// filesystem (captures never take the room the spool may need), else 0.
    pub min_free_bytes: Option<u64>,
    /// `[files.s3]`: settings of an `s3://` store.
    pub s3: S3Config,
}

impl Default for FilesConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            allowed_url_prefixes: vec![
                "https://files.huggy.app/".into(),
                "https://huggy-svc-async-report-export-origin.s3.us-east-1.amazonaws.com/".into(),
            ],
            token_ttl_secs: 600,
            max_file_bytes: 100 * 1024 * 1024,
            store: "file://./data/files".into(),
            concurrency: 16,
            max_concurrency: 256,
            connect_timeout_ms: 5_000,
            idle_timeout_ms: 20_000,
            max_buffer_bytes: 64 * 1024 * 1024,
            min_free_bytes: None,
            s3: S3Config::default(),
        }
    }
}

/// Settings for an `s3://` store; unset values fall back to the standard `AWS_*` environment.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct S3Config {
    /// Endpoint URL of an S3-compatible service (MinIO, R2, …); unset: `AWS_ENDPOINT`, else AWS.
    pub endpoint: Option<String>,
    /// The bucket's region.
    pub region: Option<String>,
    /// Access key id.
    #[serde(deserialize_with = "scalar_secret")]
    pub access_key_id: Option<Secret>,
    /// A file holding `access_key_id` (one trailing line break dropped).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access_key_id_file: Option<PathBuf>,
    /// Secret access key.
    #[serde(deserialize_with = "scalar_secret")]
    pub secret_access_key: Option<Secret>,
    /// A file holding `secret_access_key` (one trailing line break dropped).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_access_key_file: Option<PathBuf>,
    /// Allows a plain `http://` endpoint (local test services).
    pub allow_http: bool,
}
