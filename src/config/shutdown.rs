//! `[shutdown]`: how long stopping may take.

use serde::{Deserialize, Serialize};

/// `[shutdown]`: how long stopping may take.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// Drain deadline after SIGTERM/SIGINT: in-flight requests, producer flush, spool close.
    pub timeout_secs: u64,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self { timeout_secs: 25 }
    }
}
