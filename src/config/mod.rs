//! Configuration: declared once, loaded with figment from built-in defaults, then the TOML file, then
//! `HUGGY_BRIDGE_<SECTION>__<KEY>` environment variables. Unknown keys are errors. Secrets are
//! [`Secret`]s: they never reach a log line or the output of `check-config`.
//!
//! One file per section: `http` (`[http]`, `[http.tls]`, `[admin]`), `huggy`, `kafka`, `delivery`,
//! `spool`, `files`, `shutdown`, `log`. `validate` holds every check a loaded configuration must
//! pass, `error` every way it is refused, `secrets` the [`Secret`] type and the `<key>_file` forms,
//! [`prefix`] the parsed form of `files.allowed_url_prefixes`. The `[http.tls]` pair itself is read
//! and checked by the listener's TLS code, which owns it ([`Config::check_tls_pair`]).

use std::path::Path;
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

mod delivery;
mod env;
mod error;
mod files;
mod http;
mod huggy;
mod kafka;
mod log;
pub mod prefix;
mod scalar;
mod secrets;
mod shutdown;
mod spool;
#[cfg(test)]
mod tests;
mod validate;

pub use delivery::{AckMode, DeliveryConfig};
pub use error::{ConfigError, KafkaProblem};
pub use files::{FilesConfig, S3Config, MIN_BUFFER_BYTES};
pub use http::{AdminConfig, HttpConfig, HttpTlsConfig, MAX_BODY_BYTES_CEILING};
pub use huggy::{AccountConfig, HuggyConfig};
pub use kafka::{KafkaConfig, KafkaSaslConfig, KafkaTlsConfig, Partitioner, SaslMechanism};
pub use log::{LogConfig, LogFormat};
pub use secrets::Secret;
pub use shutdown::ShutdownConfig;
pub use spool::{SpoolConfig, DEFAULT_DEDUP_MAX_IDS};

/// Prefix of every environment variable the daemon reads.
pub const ENV_PREFIX: &str = "HUGGY_BRIDGE_";

/// The whole configuration, one field per TOML section. [`Default`] is the built-in defaults, which
/// lack only `huggy.tokens`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `[http]`: the public webhook listener.
    pub http: HttpConfig,
    /// `[admin]`: the metrics and probes listener.
    pub admin: AdminConfig,
    /// `[huggy]`: the accepted batch tokens.
    pub huggy: HuggyConfig,
    /// `[kafka]`: brokers, topics, security, producer properties.
    pub kafka: KafkaConfig,
    /// `[delivery]`: when a batch is answered 2xx.
    pub delivery: DeliveryConfig,
    /// `[spool]`: the local durable log.
    pub spool: SpoolConfig,
    /// `[files]`: capture of the files events point to.
    pub files: FilesConfig,
    /// `[shutdown]`: the drain deadline.
    pub shutdown: ShutdownConfig,
    /// `[log]`: log format and filter.
    pub log: LogConfig,
}

/// The declared defaults as figment values, by section.
fn default_values() -> figment::value::Dict {
    match figment::value::Value::serialize(Config::default()) {
        Ok(figment::value::Value::Dict(_, sections)) => sections,
        other => unreachable!("the default configuration serializes to a table, got {other:?}"),
    }
}

/// The top-level sections (`http`, `kafka`, …), as the declared defaults serialize them.
fn section_names() -> Vec<String> {
    default_values().into_keys().collect()
}

/// Whether an environment key (prefix stripped) is configuration: its first `__`-separated segment
/// names a section. Only `__` nests, so `ADMIN_PORT` (a Kubernetes service link) is not `admin.port`;
/// an unknown key inside a section (`KAFKA__BROKRES`) still reaches the `deny_unknown_fields` check.
fn names_a_section(sections: &[String], key: &str) -> bool {
    let first = key.split("__").next().unwrap_or_default();
    sections.iter().any(|s| s.eq_ignore_ascii_case(first))
}

impl Config {
    /// Loads defaults, then `path` (or `./config.toml` when it exists), then the environment, and validates.
    ///
    /// # Errors
    /// Unreadable or malformed TOML, unknown keys, wrong types, or a failed [`Config::validate`].
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        Self::extract(path)?.validated()
    }

    /// The sources merged and every `<key>_file` read, not validated.
    fn extract(path: Option<&Path>) -> Result<Self, ConfigError> {
        let mut cfg = Self::figment(path).extract::<Config>().map_err(|e| ConfigError::Load(Box::new(e)))?;
        cfg.resolve_secret_files()?;
        Ok(cfg)
    }

    pub(crate) fn figment(path: Option<&Path>) -> Figment {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        match path {
            Some(p) => figment = figment.merge(Toml::file_exact(p)),
            None if Path::new("config.toml").exists() => figment = figment.merge(Toml::file_exact("config.toml")),
            None => {}
        }
        let sections = section_names();
        // String settings keep the value as given; secret keys are merged raw after the others.
        let env = Env::prefixed(ENV_PREFIX)
            .filter(move |key| names_a_section(&sections, key.as_str()) && !secrets::is_raw_env_key(key.as_str()))
            .split("__");
        secrets::merge_raw_env(figment.merge(env::TypedEnv::new(env, default_values())))
    }

    /// Names of the variables under [`ENV_PREFIX`] that configuration loading ignored because their
    /// first segment is not a section (Kubernetes service links such as `HUGGY_BRIDGE_SERVICE_HOST`,
    /// `HUGGY_BRIDGE_PORT`, `HUGGY_BRIDGE_ADMIN_PORT`). Logged once telemetry is up.
    pub fn ignored_env_vars() -> Vec<String> {
        let sections = section_names();
        let mut names: Vec<String> = std::env::vars_os()
            .filter_map(|(k, _)| k.into_string().ok())
            .filter(|k| {
                k.get(..ENV_PREFIX.len()).is_some_and(|p| p.eq_ignore_ascii_case(ENV_PREFIX))
                    && !names_a_section(&sections, &k[ENV_PREFIX.len()..])
            })
            .collect();
        names.sort();
        names
    }

    fn validated(self) -> Result<Self, ConfigError> {
        self.validate()?;
        Ok(self)
    }

    /// Loads like [`Config::load`] for commands that receive no webhooks (`topics`): `huggy.tokens`
    /// may be empty.
    ///
    /// # Errors
    /// As [`Config::load`], except for missing tokens.
    pub fn load_offline(path: Option<&Path>) -> Result<Self, ConfigError> {
        let cfg = Self::extract(path)?;
        cfg.validate_offline()?;
        Ok(cfg)
    }

    /// The effective configuration as TOML, secrets redacted.
    pub fn to_redacted_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render configuration: {e}\n"))
    }

    pub(crate) fn header_timeout(&self) -> Duration {
        Duration::from_millis(self.http.header_timeout_ms)
    }
    pub(crate) fn body_timeout(&self) -> Duration {
        Duration::from_millis(self.http.body_timeout_ms)
    }
}
