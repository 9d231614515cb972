//! Who may send batches: the accepted tokens (`huggy.tokens`, `huggy.tokens_file`, and those of
//! `[[huggy.accounts]]` with the company each speaks for), in one table swapped whole when the
//! configuration is reloaded.
//!
//! A request takes the table in force when it arrives ([`AuthTable::current`]) and is judged by it
//! to the end, however long its body takes; a reload replaces the table for the requests that
//! arrive after it.

use std::sync::{Arc, PoisonError, RwLock};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::{Config, Secret};
use crate::event::{Sender, Source};

/// The accepted tokens, each stored only as digests: the SHA-256 compared in constant time, and the
/// [`Source`] that tells its events apart from other tokens' events (event ids, dedup); with the
/// account's company id for a token bound to one.
#[derive(Debug)]
pub(crate) struct Auth {
    entries: Vec<Entry>,
}

#[derive(Debug)]
struct Entry {
    digest: [u8; 32],
    sender: Sender,
}

impl Entry {
    fn new(token: &Secret, account: Option<&str>) -> Entry {
        Entry {
            digest: Sha256::digest(token.expose().as_bytes()).into(),
            sender: Sender {
                source: Source::of_token(token.expose()),
                account: account.map(|a| a.trim_start_matches('0').to_owned()),
            },
        }
    }
}

impl Auth {
    pub(crate) fn from_config(cfg: &Config) -> Auth {
        let mut auth = Auth::new(&cfg.huggy.tokens);
        for account in &cfg.huggy.accounts {
            for t in &account.tokens {
                auth.entries.push(Entry::new(t, Some(&account.company_id)));
            }
        }
        auth
    }

    /// Tokens not bound to an account.
    pub(crate) fn new(tokens: &[Secret]) -> Auth {
        Auth { entries: tokens.iter().map(|t| Entry::new(t, None)).collect() }
    }

    /// The source of a presented token, or `None` when no configured token matches. Takes time that
    /// depends on neither the token's content nor its length: the presented token is hashed, and its
    /// digest compared with every configured one with `ct_eq`, without an early exit on a match.
    pub(crate) fn check(&self, token: &str) -> Option<Sender> {
        let presented = Sha256::digest(token.as_bytes());
        let mut found = None;
        for e in &self.entries {
            let hit: bool = e.digest.ct_eq(presented.as_slice()).into();
            // Every entry is compared; the branch only picks which sender to remember.
            if hit && found.is_none() {
                found = Some(&e.sender);
            }
        }
        found.cloned()
    }

    pub(crate) fn accepts(&self, token: &str) -> bool {
        self.check(token).is_some()
    }

    /// Tokens accepted.
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}

/// The auth table in force; readers take a snapshot, a reload replaces it atomically.
#[derive(Debug)]
pub struct AuthTable(RwLock<Arc<Auth>>);

impl AuthTable {
    pub(crate) fn new(auth: Auth) -> Self {
        AuthTable(RwLock::new(Arc::new(auth)))
    }

    /// The table in force now.
    pub(crate) fn current(&self) -> Arc<Auth> {
        self.0.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Puts `auth` in force for every request that arrives from now on.
    pub(crate) fn replace(&self, auth: Auth) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(auth);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_configured_token_is_accepted_whatever_the_lengths() {
        let auth = Auth::new(&[Secret::new("afb53a5e1abeeece89f2c80acb1686ab"), Secret::new("420786094f46358650")]);
        assert!(auth.accepts("afb53a5e1abeeece89f2c80acb1686ab"));
        assert!(auth.accepts("420786094f46358650"));
        for wrong in ["", "420786094f4635865", "420786094f463586500", "afb53a5e1abeeece89f2c80acb1686ac"] {
            assert!(!auth.accepts(wrong), "{wrong:?}");
        }
        assert!(!Auth::new(&[]).accepts("anything"));
    }

    #[test]
    fn each_token_has_its_own_source_and_none_is_the_token_in_clear() {
        let (a, b) = ("afb53a5e1abeeece89f2c80acb1686ab", "420786094f46358650");
        let auth = Auth::new(&[Secret::new(a), Secret::new(b)]);
        let (sa, sb) = (auth.check(a).unwrap().source, auth.check(b).unwrap().source);
        assert_ne!(sa, sb);
        assert_eq!(sa, Source::of_token(a), "stable across builds of the table");
        assert!(!format!("{sa:?}{}", hex::encode(sa.0)).contains(a));
    }

    #[test]
    fn an_accounts_token_carries_its_company_and_a_plain_token_none() {
        let mut cfg = Config::default();
        cfg.huggy.tokens = vec![Secret::new("plain")];
        cfg.huggy.accounts = vec![crate::config::AccountConfig {
            company_id: "15693".into(),
            tokens: vec![Secret::new("bound-1"), Secret::new("bound-2")],
            tokens_file: None,
        }];
        let auth = Auth::from_config(&cfg);
        assert_eq!(auth.check("plain").unwrap().account, None);
        assert_eq!(auth.check("bound-2").unwrap().account.as_deref(), Some("15693"));
        assert!(auth.check("bound-3").is_none());
    }
}
