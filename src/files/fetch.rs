//! The download client, made safe to point at URLs from the internet: only allowed prefixes, redirects
//! only inside them, no private, loopback or link-local destination (checked on the URL and on every
//! DNS answer used to connect) unless a prefix names that address, and timeouts for connecting,
//! for the response head and for a stalled body.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::redirect::Policy;
use url::{Host, Url};

use crate::config::prefix::{parse_prefixes, Prefix};

/// Most redirects followed for one download.
const MAX_REDIRECTS: usize = 5;

/// Why a URL is not fetched.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Refusal {
    #[error("url is outside files.allowed_url_prefixes")]
    NotAllowed,
    #[error("url points at an internal address ({0})")]
    Internal(IpAddr),
}

/// A redirect the guard refused to follow.
#[derive(Debug, thiserror::Error)]
#[error("redirect refused")]
pub(crate) struct RedirectRefused(#[source] pub(crate) Refusal);

/// A host name whose every address is internal (and not named by a prefix).
#[derive(Debug, thiserror::Error)]
#[error("{0} resolves only to internal addresses")]
pub(crate) struct ResolvedInternal(pub(crate) String);

/// The allow-list: prefixes, and the internal addresses a prefix names explicitly.
#[derive(Debug, Clone)]
pub(crate) struct Guard {
    prefixes: Vec<Prefix>,
    explicit: HashSet<IpAddr>,
}

impl Guard {
    pub(crate) fn new(prefixes: &[String]) -> Self {
        let prefixes = parse_prefixes(prefixes);
        let explicit = prefixes.iter().filter_map(Prefix::ip).collect();
        Guard { prefixes, explicit }
    }

    pub(crate) fn prefixes(&self) -> &[Prefix] {
        &self.prefixes
    }

    /// Whether `url` may be fetched (before any DNS lookup).
    ///
    /// # Errors
    /// The reason it may not.
    pub(crate) fn check(&self, url: &Url) -> Result<(), Refusal> {
        let ip = match url.host() {
            Some(Host::Ipv4(ip)) => Some(IpAddr::V4(ip)),
            Some(Host::Ipv6(ip)) => Some(IpAddr::V6(ip)),
            _ => None,
        };
        if let Some(ip) = ip.filter(|ip| !self.ip_allowed(*ip)) {
            return Err(Refusal::Internal(ip));
        }
        if !self.prefixes.iter().any(|p| p.matches(url)) {
            return Err(Refusal::NotAllowed);
        }
        Ok(())
    }

    pub(crate) fn ip_allowed(&self, ip: IpAddr) -> bool {
        !is_internal(ip) || self.explicit.contains(&ip)
    }
}

/// Private, loopback, link-local, unspecified, shared, benchmarking, multicast, translation and
/// similar non-public addresses.
pub(crate) fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || o[0] == 0
                || (o[0] == 100 && (64..128).contains(&o[1]))
                || (o[0] == 192 && o[1] == 0 && o[2] == 0)
                || (o[0] == 198 && (o[1] & 0xfe) == 18)
                || o[0] >= 240
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_internal(IpAddr::V4(v4));
            }
            let s = v6.segments();
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
                // NAT64, well-known (64:ff9b::/96) and local-use (64:ff9b:1::/48)
                || (s[0] == 0x64 && s[1] == 0xff9b)
                // 6to4: reaches whatever IPv4 address it embeds
                || s[0] == 0x2002
                // IPv4-compatible (deprecated)
                || s[..6].iter().all(|&x| x == 0)
                || (s[0] == 0x2001 && s[1] == 0xdb8)
        }
    }
}

/// Resolves names, keeping only addresses the guard allows: what is connected to is what was checked.
struct GuardedResolver(Arc<Guard>);

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let guard = self.0.clone();
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let all: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed: Vec<SocketAddr> = all.iter().copied().filter(|a| guard.ip_allowed(a.ip())).collect();
            if allowed.is_empty() {
                let e: Box<dyn std::error::Error + Send + Sync> = Box::new(ResolvedInternal(host));
                return Err(e);
            }
            let addrs: Addrs = Box::new(allowed.into_iter());
            Ok(addrs)
        })
    }
}

/// The HTTP client for downloads.
///
/// # Errors
/// The TLS backend cannot be initialised.
pub(crate) fn client(guard: Arc<Guard>, connect_timeout: Duration) -> reqwest::Result<reqwest::Client> {
    let g = guard.clone();
    reqwest::Client::builder()
        .dns_resolver(Arc::new(GuardedResolver(guard)))
        .redirect(Policy::custom(move |attempt| {
            if attempt.previous().len() >= MAX_REDIRECTS {
                attempt.error("too many redirects")
            } else if let Err(why) = g.check(attempt.url()) {
                attempt.error(RedirectRefused(why))
            } else {
                attempt.follow()
            }
        }))
        .connect_timeout(connect_timeout)
        .no_proxy()
        .user_agent(concat!("huggy-bridge/", env!("CARGO_PKG_VERSION")))
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::prefix::{allowed, PrefixError};

    #[test]
    fn internal_addresses() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a00:1",
            "64:ff9b:1::1",
            "64:ff9b:1:ffff::8.8.8.8",
            "2002:7f00:1::1",
            "2002:808:808::1",
            "::7f00:1",
            "::808:808",
            "198.18.0.1",
            "198.19.255.254",
        ] {
            assert!(is_internal(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["8.8.8.8", "52.216.1.1", "2606:4700::1111", "198.20.0.1", "198.17.255.255", "2003::1"] {
            assert!(!is_internal(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn guard_checks_prefix_and_literal_addresses() {
        let g = Guard::new(&["https://files.huggy.app/".into(), "http://127.0.0.1:8999/files/".into()]);
        let ok = |u: &str| g.check(&Url::parse(u).unwrap());
        assert_eq!(ok("https://files.huggy.app/x.pdf?token=1"), Ok(()));
        assert_eq!(ok("https://files.huggy.app.evil.com/x"), Err(Refusal::NotAllowed));
        assert_eq!(ok("http://127.0.0.1:8999/files/a"), Ok(()), "named explicitly by a prefix");
        assert_eq!(ok("http://127.0.0.1:8999/other"), Err(Refusal::NotAllowed));
        let g2 = Guard::new(&["http://169.254.169.254.nip.io/".into(), "http://".into()]);
        assert_eq!(
            g2.check(&Url::parse("http://169.254.169.254/latest/meta-data").unwrap()),
            Err(Refusal::Internal("169.254.169.254".parse().unwrap()))
        );
    }

    fn guard() -> Guard {
        Guard::new(&["https://files.huggy.app/".into(), "https://bucket.s3.amazonaws.com/exports/".into()])
    }

    fn admits(g: &Guard, u: &str) -> bool {
        let url = Url::parse(u).unwrap();
        let admitted = g.check(&url).is_ok();
        assert_eq!(admitted, allowed(g.prefixes(), u), "detection and the guard disagree on {u}");
        admitted
    }

    #[test]
    fn prefixes_compare_parsed_parts_not_strings() {
        let g = guard();
        for u in [
            "https://files.huggy.app/x.pdf?token=1",
            "https://FILES.HUGGY.APP/x.pdf",
            "https://files.huggy.app:443/x.pdf",
            "https://files%2Ehuggy.app/x.pdf",
            "https://bucket.s3.amazonaws.com/exports/a.csv?X-Amz-Expires=600",
            "https://bucket.s3.amazonaws.com/exports/sub/dir/a.csv",
        ] {
            assert!(admits(&g, u), "{u}");
        }
        for u in [
            // suffix host
            "https://files.huggy.app.evil.com/x",
            // userinfo: the host is evil.com, or credentials are smuggled to the right host
            "https://files.huggy.app@evil.com/x",
            "https://files.huggy.app:443@evil.com/x",
            "https://user:pw@files.huggy.app/x",
            // port and scheme
            "https://files.huggy.app:8443/x",
            "http://files.huggy.app/x",
            // path segment boundary and traversal, plain or percent-encoded
            "https://bucket.s3.amazonaws.com/exports-private/a.csv",
            "https://bucket.s3.amazonaws.com/exports",
            "https://bucket.s3.amazonaws.com/exports/../secrets/a.csv",
            "https://bucket.s3.amazonaws.com/exports/%2e%2e/secrets/a.csv",
            "https://bucket.s3.amazonaws.com/exports/%2E%2E/secrets/a.csv",
            "https://bucket.s3.amazonaws.com/exports%2F..%2Fsecrets/a.csv",
            "https://bucket.s3.amazonaws.com/EXPORTS/a.csv",
        ] {
            assert!(!admits(&g, u), "{u}");
        }
    }

    #[test]
    fn unusable_prefixes_are_named() {
        assert_eq!(
            Prefix::parse("https://files.huggy.app"),
            Err(PrefixError::NoTrailingSlash("https://files.huggy.app/".into()))
        );
        assert_eq!(
            Prefix::parse("https://b.s3.amazonaws.com/exports"),
            Err(PrefixError::NoTrailingSlash("https://b.s3.amazonaws.com/exports/".into()))
        );
        assert_eq!(Prefix::parse("https://u@files.huggy.app/"), Err(PrefixError::UserInfo));
        assert_eq!(Prefix::parse("https://files.huggy.app/?a=1"), Err(PrefixError::QueryOrFragment));
        assert_eq!(Prefix::parse("ftp://files.huggy.app/"), Err(PrefixError::Scheme));
        assert_eq!(Prefix::parse("files.huggy.app/"), Err(PrefixError::NotUrl));
        assert!(Prefix::parse("http://127.0.0.1:8999/files/").is_ok());
    }

    #[tokio::test]
    async fn a_name_resolving_inside_is_refused_by_type() {
        let guard = Arc::new(Guard::new(&["http://localhost:9/files/".into()]));
        let c = client(guard, Duration::from_secs(2)).unwrap();
        let err = c.get("http://localhost:9/files/x").send().await.unwrap_err();
        let mut src: Option<&(dyn std::error::Error + 'static)> = Some(&err);
        let mut found = false;
        while let Some(e) = src {
            found |= e.downcast_ref::<ResolvedInternal>().is_some();
            src = e.source();
        }
        assert!(found, "{err:?}");
    }
}
