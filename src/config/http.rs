//! `[http]`, `[http.tls]` and `[admin]`: the public webhook listener, its limits and certificate,
//! and the listener for metrics and probes.

use std::net::SocketAddr;

use serde::{Deserialize, Deserializer, Serialize};

use super::scalar::scalar_string;

/// The largest `http.max_body_bytes` accepted: half the spool's frame limit, so that an event as
/// large as a whole body, with its key, type, company and a dead-letter reason, always fits a frame.
pub const MAX_BODY_BYTES_CEILING: usize = 128 * 1024 * 1024;

/// `[http]`: the public webhook listener and the limits that bound what a client can hold.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Public webhook listener; `:8080` means every interface.
    #[serde(deserialize_with = "listen_addr")]
    pub listen: SocketAddr,
    /// The webhook's path (POST only); any other path is 404.
    pub path: String,
    /// Larger bodies get 413, refused by `Content-Length` before reading or as soon as a chunked body
    /// crosses it.
    pub max_body_bytes: usize,
    /// Time allowed to receive the request headers; also how long an idle keep-alive connection lives.
    pub header_timeout_ms: u64,
    /// Time allowed to receive the whole body once the headers are in; a slower upload gets 408.
    pub body_timeout_ms: u64,
    /// Connections served at once; further clients wait in the listen backlog.
    pub max_connections: usize,
    /// Seconds suggested to Huggy in `Retry-After` on a 503.
    pub retry_after_secs: u64,
    /// Request-body bytes held in memory at once, across all requests; past it new requests get 503
    /// `overloaded` before their body is read.
    pub max_inflight_bytes: usize,
    /// `[http.tls]`: HTTPS on the public listener; off when both files are empty.
    pub tls: HttpTlsConfig,
}

/// `[http.tls]`: the certificate the public listener serves, re-read on reload and when a file
/// changes. Both or neither.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpTlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert_file: String,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of the leaf.
    pub key_file: String,
}

impl HttpTlsConfig {
    /// Whether the public listener speaks HTTPS.
    pub fn enabled(&self) -> bool {
        !self.cert_file.is_empty() || !self.key_file.is_empty()
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            path: "/webhooks/huggy".into(),
            max_body_bytes: 4 * 1024 * 1024,
            header_timeout_ms: 10_000,
            body_timeout_ms: 15_000,
            max_connections: 1024,
            retry_after_secs: 5,
            max_inflight_bytes: 256 * 1024 * 1024,
            tls: HttpTlsConfig::default(),
        }
    }
}

/// `[admin]`: the listener for metrics and probes.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// `/metrics`, `/healthz`, `/readyz`; keep it off the public address. `:9090`: every interface.
    #[serde(deserialize_with = "listen_addr")]
    pub listen: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self { listen: SocketAddr::from(([127, 0, 0, 1], 9090)) }
    }
}

/// A listen address: `host:port`, `[v6]:port`, or `:port` for every interface (IPv4).
fn listen_addr<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let s = scalar_string(d)?;
    let s = s.trim();
    let parsed = match s.strip_prefix(':') {
        Some(port) => port.parse::<u16>().map(|p| SocketAddr::from(([0, 0, 0, 0], p))).map_err(|e| e.to_string()),
        None => s.parse::<SocketAddr>().map_err(|e| e.to_string()),
    };
    parsed.map_err(|e| {
        serde::de::Error::custom(format!("{s:?} is not a listen address ({e}): use host:port, [v6]:port or :port"))
    })
}
