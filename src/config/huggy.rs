//! `[huggy]` and `[[huggy.accounts]]`: the batch tokens Huggy sends, alone or bound to a company.

use std::path::PathBuf;

use serde::{Deserialize, Deserializer, Serialize};

use super::scalar::Scalar;
use super::Secret;

/// `[huggy]`: what Huggy sends with every batch.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HuggyConfig {
    /// Accepted batch tokens, one per Huggy account (Configurações > Webhook). Their events name
    /// their company themselves.
    #[serde(deserialize_with = "secrets_list")]
    pub tokens: Vec<Secret>,
    /// A file of accepted tokens, one per line (a Kubernetes Secret volume, systemd
    /// `LoadCredential=`); read at start and on every reload. Not together with `tokens`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_file: Option<PathBuf>,
    /// `[[huggy.accounts]]`: tokens bound to one company id each. An event of such a token that
    /// names another company is dead-lettered (`company_mismatch`); `ce_source` and a company key
    /// are the account's.
    pub accounts: Vec<AccountConfig>,
}

impl HuggyConfig {
    /// Whether any token is configured, bound to an account or not.
    pub(crate) fn has_tokens(&self) -> bool {
        !self.tokens.is_empty() || self.accounts.iter().any(|a| !a.tokens.is_empty())
    }
}

/// One `[[huggy.accounts]]` entry.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccountConfig {
    /// The Huggy company id of the account, as in its events' `company.id`.
    #[serde(deserialize_with = "company_id")]
    pub company_id: String,
    /// The account's tokens.
    #[serde(deserialize_with = "secrets_list")]
    pub tokens: Vec<Secret>,
    /// A file of the account's tokens, one a line (a Kubernetes Secret volume, systemd
    /// `LoadCredential=`); read at start and on every reload. Not together with `tokens`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_file: Option<PathBuf>,
}

/// A company id as TOML or the environment give it: a number, or a string of digits.
fn company_id<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum NumberOrString {
        Number(u64),
        String(String),
    }
    Ok(match NumberOrString::deserialize(d)? {
        NumberOrString::Number(n) => n.to_string(),
        NumberOrString::String(s) => s.trim().to_owned(),
    })
}

/// Accepts either a list of strings or one comma-separated string (handy in an environment variable
/// fed from a Kubernetes Secret: `HUGGY_BRIDGE_HUGGY__TOKENS=tok1,tok2`). The environment's value
/// arrives as the string given (see `secrets`); a bare TOML number is taken as its digits.
fn secrets_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Secret>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(Scalar),
        Many(Vec<Scalar>),
    }
    let items: Vec<String> = match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => s.into_string().split(',').map(str::to_owned).collect(),
        OneOrMany::Many(v) => v.into_iter().map(Scalar::into_string).collect(),
    };
    Ok(items.into_iter().map(|t| t.trim().to_owned()).filter(|t| !t.is_empty()).map(Secret::new).collect())
}
