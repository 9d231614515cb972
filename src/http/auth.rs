//! Who may send batches: the auth table, swapped whole when the configuration is reloaded.
//!
//! A request takes the table in force when it arrives ([`AuthTable::current`]) and is judged by it
//! to the end, however long its body takes; a reload replaces the table for the requests that
//! arrive after it.

use std::sync::{Arc, PoisonError, RwLock};

use crate::config::{Config, Secret};

/// The credentials in force at one moment.
#[derive(Debug)]
pub(crate) struct Auth {
    /// Accepted batch tokens (`huggy.tokens`, `huggy.tokens_file`).
    pub(crate) tokens: Vec<Secret>,
}

impl Auth {
    /// The credentials `cfg` accepts.
    pub(crate) fn from_config(cfg: &Config) -> Auth {
        Auth { tokens: cfg.huggy.tokens.clone() }
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
