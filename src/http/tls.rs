//! Built-in TLS for the public listener (`[http.tls]`, SPEC §3): rustls with its default modern
//! suites, TLS 1.2 and 1.3, HTTP/1.1 by ALPN.
//!
//! The certificate is served through a resolver that holds the pair in force, so a rotation
//! ([`Tls::reload`], on SIGHUP and when a file changes) reaches every new handshake while the
//! connections already open keep theirs. A new pair is checked whole (readable, key matching the
//! certificate, not expired) before it replaces the old one; a broken pair is refused and the old
//! one keeps serving.
//!
//! HTTP/2 is not offered: the bounds the public server relies on (header read timeout, read
//! buffer per connection) are HTTP/1 settings of hyper, and Huggy sends one batch per request.

use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::{rustls, TlsAcceptor};
use tracing::{info, warn};

use crate::config::{Config, ConfigError, HttpTlsConfig};
use crate::metrics::{Metrics, ReloadResult, TlsRefusal};

/// Why a certificate and key pair cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("http.tls.{key}: cannot read {path:?}")]
    Read {
        /// `cert_file` or `key_file`.
        key: &'static str,
        /// The path configured.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// A file holds no usable PEM section of the kind expected.
    #[error("http.tls.{key}: {path:?} holds no {what}")]
    Pem {
        /// `cert_file` or `key_file`.
        key: &'static str,
        /// The path configured.
        path: PathBuf,
        /// `PEM certificate` or `PEM private key`.
        what: &'static str,
        /// What the PEM reader said.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// The key cannot be used, or it is not the certificate's key.
    #[error("http.tls.key_file {key_file:?} does not go with http.tls.cert_file {cert_file:?}")]
    Mismatch {
        /// The certificate's path.
        cert_file: PathBuf,
        /// The key's path.
        key_file: PathBuf,
        /// What rustls said.
        #[source]
        source: rustls::Error,
    },
    /// The certificate's validity could not be read.
    #[error("http.tls.cert_file {path:?}: the first certificate is not a well-formed X.509 certificate")]
    Malformed {
        /// The path configured.
        path: PathBuf,
    },
    /// The certificate has expired.
    #[error("http.tls.cert_file {path:?}: the certificate expired at {not_after} (Unix time); renew it")]
    Expired {
        /// The path configured.
        path: PathBuf,
        /// Its `notAfter`, seconds since the Unix epoch.
        not_after: i64,
    },
}

/// What rustls holds for one connection at most, for the worst-case memory: a handshake message
/// being joined (rustls bounds it at 64 KiB) or one received record (≤ 18 KiB), one record being sent
/// (≤ 18 KiB), and the session's keys and state.
pub(crate) const TLS_CONNECTION_BYTES: usize = 96 * 1024;

/// A certificate chain and its key, checked, with the leaf's expiry.
#[derive(Debug, Clone)]
pub struct Pair {
    key: Arc<CertifiedKey>,
    /// The leaf certificate's `notAfter`, seconds since the Unix epoch.
    pub not_after: i64,
}

/// The crypto provider of the listener: ring, named explicitly so that another provider compiled
/// into the binary (through a dependency) cannot make the choice ambiguous.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads and checks the pair of `tls`: both files readable PEM, the key the certificate's, the
/// certificate not expired at `now`. The certificate file may hold the chain (leaf first).
///
/// # Errors
/// The first problem found, naming the setting and the path.
pub fn load_pair(tls: &HttpTlsConfig, now: SystemTime) -> Result<Pair, TlsError> {
    let (cert_file, key_file) = (Path::new(&tls.cert_file), Path::new(&tls.key_file));
    let read =
        |key, path: &Path| std::fs::read(path).map_err(|source| TlsError::Read { key, path: path.into(), source });
    let (cert_pem, key_pem) = (read("cert_file", cert_file)?, read("key_file", key_file)?);
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .and_then(|c| if c.is_empty() { Err(rustls::pki_types::pem::Error::NoItemsFound) } else { Ok(c) })
        .map_err(|source| TlsError::Pem {
            key: "cert_file",
            path: cert_file.into(),
            what: "PEM certificate",
            source,
        })?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|source| TlsError::Pem {
        key: "key_file",
        path: key_file.into(),
        what: "PEM private key",
        source,
    })?;
    let not_after = not_after(&chain[0]).ok_or_else(|| TlsError::Malformed { path: cert_file.into() })?;
    let certified = CertifiedKey::from_der(chain, key, &provider()).map_err(|source| TlsError::Mismatch {
        cert_file: cert_file.into(),
        key_file: key_file.into(),
        source,
    })?;
    let now_secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    if not_after <= now_secs {
        return Err(TlsError::Expired { path: cert_file.into(), not_after });
    }
    Ok(Pair { key: Arc::new(certified), not_after })
}

/// The pair `tls` sets, if any, read and checked now ([`load_pair`]). A pair that cannot be served
/// is a configuration error: the daemon's start and `check-config` refuse it (exit 78).
///
/// # Errors
/// [`ConfigError::Tls`], whose source names the setting, the file and the problem.
pub(crate) fn configured_pair(tls: &HttpTlsConfig) -> Result<Option<Pair>, ConfigError> {
    tls.enabled().then(|| load_pair(tls, SystemTime::now())).transpose().map_err(|e| ConfigError::Tls(Box::new(e)))
}

impl Config {
    /// Reads and checks the `[http.tls]` pair, when set: readable, the key the certificate's, not
    /// expired (what the daemon checks at start; `check-config` runs it). Defined beside the
    /// loading it runs, so that the configuration does not depend on the listener.
    ///
    /// # Errors
    /// [`ConfigError::Tls`] naming the file and the problem.
    pub fn check_tls_pair(&self) -> Result<(), ConfigError> {
        configured_pair(&self.http.tls).map(drop)
    }
}

/// The pair in force, handed to every new handshake.
#[derive(Debug)]
struct Resolver(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(PoisonError::into_inner).clone())
    }
}

/// The public listener's TLS: an acceptor serving the pair in force, which [`Tls::reload`] replaces.
pub(crate) struct Tls {
    acceptor: TlsAcceptor,
    resolver: Arc<Resolver>,
    metrics: Arc<Metrics>,
    /// A handshake (and the plaintext check before it) must end within this.
    handshake_timeout: Duration,
}

impl Tls {
    /// A TLS server for `pair`.
    ///
    /// # Errors
    /// rustls refused the protocol versions (not expected with its own defaults).
    pub(crate) fn new(pair: Pair, metrics: Arc<Metrics>, handshake_timeout: Duration) -> Result<Tls, rustls::Error> {
        metrics.tls_cert_expiry.set(pair.not_after);
        let resolver = Arc::new(Resolver(RwLock::new(pair.key)));
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Tls { acceptor: TlsAcceptor::from(Arc::new(config)), resolver, metrics, handshake_timeout })
    }

    /// Re-reads the pair of `tls` and serves it to new connections; a broken pair is logged and
    /// counted, and the old one keeps serving. Blocking (reads files).
    ///
    /// # Errors
    /// The new pair was refused; the old one stays in force.
    pub(crate) fn reload(&self, tls: &HttpTlsConfig) -> Result<(), TlsError> {
        match load_pair(tls, SystemTime::now()) {
            Ok(pair) => {
                *self.resolver.0.write().unwrap_or_else(PoisonError::into_inner) = pair.key;
                self.metrics.tls_cert_expiry.set(pair.not_after);
                self.metrics.tls_reloads.with_label_values(&[ReloadResult::Applied.label()]).inc();
                info!(cert_file = %tls.cert_file, not_after = pair.not_after, "TLS certificate (re)loaded");
                Ok(())
            }
            Err(e) => {
                self.metrics.tls_reloads.with_label_values(&[ReloadResult::Rejected.label()]).inc();
                warn!(
                    error = %crate::telemetry::error_chain(&e),
                    "new TLS certificate refused; the one in force keeps serving"
                );
                Err(e)
            }
        }
    }

    /// Turns an accepted connection into a TLS stream, within the handshake timeout. A client that
    /// speaks plain HTTP gets a `400` in plain HTTP saying so, then the connection is closed.
    /// `None` when the connection is not to be served (counted by reason).
    pub(crate) async fn accept(&self, stream: TcpStream) -> Option<TlsStream<TcpStream>> {
        let started = tokio::time::Instant::now();
        let mut first = [0u8; 1];
        let refusal = match tokio::time::timeout(self.handshake_timeout, stream.peek(&mut first)).await {
            Err(_) => TlsRefusal::Timeout,
            Ok(Ok(0) | Err(_)) => TlsRefusal::Failed,
            // A TLS record starts with its content type (22 for a handshake); an HTTP request line
            // starts with an upper-case method.
            Ok(Ok(_)) if first[0].is_ascii_uppercase() => {
                answer_plaintext(stream).await;
                TlsRefusal::Plaintext
            }
            Ok(Ok(_)) => {
                let left = self.handshake_timeout.saturating_sub(started.elapsed());
                match tokio::time::timeout(left, self.acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => return Some(tls),
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "TLS handshake failed");
                        TlsRefusal::Failed
                    }
                    Err(_) => TlsRefusal::Timeout,
                }
            }
        };
        self.metrics.tls_refused.with_label_values(&[refusal.label()]).inc();
        None
    }
}

/// What a plain-HTTP client gets from the TLS listener.
const PLAINTEXT_BODY: &str =
    r#"{"error":"this listener speaks HTTPS: send the request to an https:// URL","code":"https_required"}"#;

/// Answers `400` in plain HTTP and closes. The unread request is drained briefly after the answer
/// (a lingering close, as nginx does), so the close does not reset the connection before the
/// client has read the answer.
async fn answer_plaintext(mut stream: TcpStream) {
    let head = format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        PLAINTEXT_BODY.len()
    );
    let written = async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(PLAINTEXT_BODY.as_bytes()).await?;
        stream.shutdown().await
    };
    if tokio::time::timeout(Duration::from_secs(1), written).await.is_err() {
        return;
    }
    let mut sink = [0u8; 4096];
    let mut budget = 64 * 1024usize;
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while budget > 0 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => budget = budget.saturating_sub(n),
            }
        }
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// The leaf's notAfter, read from its DER (RFC 5280 §4.1): Certificate ::= SEQUENCE { tbsCertificate
// SEQUENCE { [0] version OPTIONAL, serialNumber, signature, issuer, validity SEQUENCE { notBefore,
// notAfter }, … }, … }.

/// One DER element: its tag, its content and what follows it.
fn der(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        (rest[..n].iter().fold(0usize, |acc, &b| (acc << 8) | usize::from(b)), &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// The certificate's `notAfter` in seconds since the Unix epoch.
fn not_after(cert: &[u8]) -> Option<i64> {
    const SEQUENCE: u8 = 0x30;
    let (SEQUENCE, certificate, _) = der(cert)? else { return None };
    let (SEQUENCE, mut tbs, _) = der(certificate)? else { return None };
    if tbs.first() == Some(&0xa0) {
        tbs = der(tbs)?.2;
    }
    for _ in 0..3 {
        tbs = der(tbs)?.2; // serialNumber, signature, issuer
    }
    let (SEQUENCE, validity, _) = der(tbs)? else { return None };
    let (tag, time, _) = der(der(validity)?.2)?;
    parse_time(tag, time)
}

/// UTCTime (`YYMMDDHHMMSSZ`, tag 23) or GeneralizedTime (`YYYYMMDDHHMMSSZ`, tag 24).
fn parse_time(tag: u8, s: &[u8]) -> Option<i64> {
    let digits = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = s.get(r)?;
        part.iter().all(u8::is_ascii_digit).then(|| part.iter().fold(0, |acc, &b| acc * 10 + i64::from(b - b'0')))
    };
    let (year, rest) = match (tag, s.len()) {
        (23, 13) => {
            let yy = digits(0..2)?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, 2)
        }
        (24, 15) => (digits(0..4)?, 4),
        _ => return None,
    };
    if s.last() != Some(&b'Z') {
        return None;
    }
    let field = |i: usize| digits(rest + 2 * i..rest + 2 * i + 2);
    let (month, day, hour, minute, second) = (field(0)?, field(1)?, field(2)?, field(3)?, field(4)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    Some(days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second)
}

/// Days from 1970-01-01 to a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_read_as_utc_seconds() {
        assert_eq!(parse_time(23, b"700101000000Z"), Some(0));
        assert_eq!(parse_time(23, b"491231235959Z"), Some(2_524_607_999));
        assert_eq!(parse_time(24, b"20380119031408Z"), Some(2_147_483_648));
        assert_eq!(parse_time(24, b"20240229120000Z"), Some(1_709_208_000));
        assert_eq!(parse_time(23, b"700101000000+"), None);
        assert_eq!(parse_time(24, b"2024022912000Z"), None);
        assert_eq!(parse_time(23, b"701301000000Z"), None);
    }

    #[test]
    fn a_certificate_expiry_is_read_from_its_der() {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
        params.not_after = rcgen::date_time_ymd(2061, 3, 4);
        let cert = params.self_signed(&key).expect("cert");
        // 2061-03-04T00:00:00Z (GeneralizedTime: after 2049).
        assert_eq!(not_after(cert.der()), Some(2_877_120_000));
        params.not_after = rcgen::date_time_ymd(2031, 12, 31);
        let cert = params.self_signed(&key).expect("cert");
        assert_eq!(not_after(cert.der()), Some(1_956_441_600));
        assert_eq!(not_after(&cert.der()[..40]), None);
    }
}
