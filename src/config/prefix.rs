//! Allowed URL prefixes (`files.allowed_url_prefixes`), compared by parsed parts: a configuration
//! value, checked when the configuration is. Pure code (only `url`), shared by detection and the
//! fetch guard.

use std::net::IpAddr;

use url::{Host, Url};

/// Why a configured prefix is not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrefixError {
    /// It does not parse as an absolute URL.
    #[error("not a URL")]
    NotUrl,
    /// A scheme other than `http` or `https`.
    #[error("only http and https are fetched")]
    Scheme,
    /// No host to compare with.
    #[error("names no host")]
    NoHost,
    /// `user:password@` in a prefix would only ever match URLs that are refused anyway.
    #[error("carries user information")]
    UserInfo,
    /// A prefix is scheme, host, port and path; a query or fragment cannot be a prefix of anything.
    #[error("carries a query or fragment (a prefix is scheme, host, port and path)")]
    QueryOrFragment,
    /// Without a trailing `/`, `…/files` would admit `…/files-private`; carries the corrected prefix.
    #[error("must end with '/': a prefix is matched on whole path segments, so write {0:?}")]
    NoTrailingSlash(String),
}

/// An allowed URL prefix, compared by parts: scheme, host and port exactly (as the URL parser
/// normalises them: case, IDNA, percent-encoding), then the path on segment boundaries. A string
/// comparison would let `https://files.huggy.app` admit `https://files.huggy.app.evil.com/x` and
/// `https://files.huggy.app@evil.com/x`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prefix {
    scheme: String,
    host: Host<String>,
    port: Option<u16>,
    /// Always ends with `/`.
    path: String,
}

impl Prefix {
    /// # Errors
    /// Why `raw` cannot be a prefix.
    pub(crate) fn parse(raw: &str) -> Result<Prefix, PrefixError> {
        let u = Url::parse(raw).map_err(|_| PrefixError::NotUrl)?;
        if !matches!(u.scheme(), "http" | "https") {
            return Err(PrefixError::Scheme);
        }
        let host = u.host().ok_or(PrefixError::NoHost)?.to_owned();
        if !u.username().is_empty() || u.password().is_some() {
            return Err(PrefixError::UserInfo);
        }
        if u.query().is_some() || u.fragment().is_some() {
            return Err(PrefixError::QueryOrFragment);
        }
        if !raw.ends_with('/') {
            let mut fixed = u.clone();
            if !fixed.path().ends_with('/') {
                fixed.set_path(&format!("{}/", fixed.path()));
            }
            return Err(PrefixError::NoTrailingSlash(fixed.to_string()));
        }
        Ok(Prefix { scheme: u.scheme().to_owned(), host, port: u.port_or_known_default(), path: u.path().to_owned() })
    }

    /// Whether `url` lies under this prefix. URLs with user information never do.
    pub(crate) fn matches(&self, url: &Url) -> bool {
        url.scheme() == self.scheme
            && url.username().is_empty()
            && url.password().is_none()
            && url.host().map(|h| h.to_owned()).as_ref() == Some(&self.host)
            && url.port_or_known_default() == self.port
            && url.path().starts_with(&self.path)
    }

    /// The address the prefix names, when its host is an IP literal.
    pub(crate) fn ip(&self) -> Option<IpAddr> {
        match self.host {
            Host::Ipv4(ip) => Some(IpAddr::V4(ip)),
            Host::Ipv6(ip) => Some(IpAddr::V6(ip)),
            Host::Domain(_) => None,
        }
    }
}

/// The configured prefixes that parse (configuration validation rejects the others).
pub fn parse_prefixes(raw: &[String]) -> Vec<Prefix> {
    raw.iter().filter_map(|p| Prefix::parse(p).ok()).collect()
}

/// Whether `text` is a URL under one of `prefixes`: what detection asks of each string. The fetch
/// guard compares the parsed URL with the same prefixes ([`Prefix::matches`]), so whatever detection
/// finds, the guard admits; detection is the narrower of the two.
///
/// Only a URL written as it is parsed: the URL parser would drop leading and trailing spaces and
/// control characters and every tab or line break, so `" https://…"` or `"ht\ttps://…"` would
/// parse as an allowed URL that a string is not; such strings are refused. (This also makes a
/// leading `http`, in any letter case, necessary for a match, which detection relies on.)
pub fn allowed(prefixes: &[Prefix], text: &str) -> bool {
    let edges = |b: Option<&u8>| b.is_some_and(|b| *b <= b' ');
    let bytes = text.as_bytes();
    if edges(bytes.first()) || edges(bytes.last()) || bytes.iter().any(|b| matches!(b, b'\t' | b'\n' | b'\r')) {
        return false;
    }
    Url::parse(text).is_ok_and(|u| prefixes.iter().any(|p| p.matches(&u)))
}
