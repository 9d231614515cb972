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

/// Most redirects followed for one download.
const MAX_REDIRECTS: usize = 5;

/// Why a URL is not fetched.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("url is outside files.allowed_url_prefixes")]
    NotAllowed,
    #[error("url points at an internal address ({0})")]
    Internal(IpAddr),
}

/// The allow-list: prefixes, and the internal addresses a prefix names explicitly.
#[derive(Debug, Clone)]
pub struct Guard {
    prefixes: Vec<String>,
    explicit: HashSet<IpAddr>,
}

impl Guard {
    pub fn new(prefixes: &[String]) -> Self {
        let explicit = prefixes
            .iter()
            .filter_map(|p| Url::parse(p).ok())
            .filter_map(|u| match u.host()? {
                Host::Ipv4(ip) => Some(IpAddr::V4(ip)),
                Host::Ipv6(ip) => Some(IpAddr::V6(ip)),
                Host::Domain(_) => None,
            })
            .collect();
        Guard { prefixes: prefixes.to_vec(), explicit }
    }

    /// Whether `url` may be fetched (before any DNS lookup).
    ///
    /// # Errors
    /// The reason it may not.
    pub fn check(&self, url: &Url) -> Result<(), Refusal> {
        if !matches!(url.scheme(), "http" | "https")
            || !self.prefixes.iter().any(|p| url.as_str().starts_with(p.as_str()))
        {
            return Err(Refusal::NotAllowed);
        }
        let ip = match url.host() {
            Some(Host::Ipv4(ip)) => IpAddr::V4(ip),
            Some(Host::Ipv6(ip)) => IpAddr::V6(ip),
            _ => return Ok(()),
        };
        if self.ip_allowed(ip) {
            Ok(())
        } else {
            Err(Refusal::Internal(ip))
        }
    }

    pub fn ip_allowed(&self, ip: IpAddr) -> bool {
        !is_internal(ip) || self.explicit.contains(&ip)
    }
}

/// Private, loopback, link-local, unspecified, shared, multicast and similar non-public addresses.
pub fn is_internal(ip: IpAddr) -> bool {
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
                || (s[0] == 0x64 && s[1] == 0xff9b)
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
                let e: Box<dyn std::error::Error + Send + Sync> =
                    format!("{host} resolves only to internal addresses").into();
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
pub fn client(guard: Arc<Guard>, connect_timeout: Duration) -> reqwest::Result<reqwest::Client> {
    let g = guard.clone();
    reqwest::Client::builder()
        .dns_resolver(Arc::new(GuardedResolver(guard)))
        .redirect(Policy::custom(move |attempt| {
            if attempt.previous().len() >= MAX_REDIRECTS {
                attempt.error("too many redirects")
            } else if let Err(why) = g.check(attempt.url()) {
                attempt.error(format!("redirect refused: {why}"))
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
        ] {
            assert!(is_internal(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["8.8.8.8", "52.216.1.1", "2606:4700::1111"] {
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
}
