//! `[log]`: how log lines are written, and which.

use serde::{Deserialize, Serialize};

/// How log lines are written to stderr (`log.format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// JSON when stderr is not a terminal, human-readable otherwise.
    Auto,
    /// One JSON object per line, for log collectors.
    Json,
    /// Human-readable lines.
    Text,
}

/// `[log]`: log format and filter.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `json`, `text` or `auto`.
    pub format: LogFormat,
    /// A tracing filter; `RUST_LOG`, when set, wins.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { format: LogFormat::Auto, level: "info".into() }
    }
}
