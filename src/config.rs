//! Configuration: declared once, loaded with figment from built-in defaults, then the TOML file, then
//! `HUGGY_BRIDGE_<SECTION>__<KEY>` environment variables. Unknown keys are errors. Secrets are
//! [`Secret`]s: they never reach a log line or the output of `check-config`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Prefix of every environment variable the daemon reads.
pub const ENV_PREFIX: &str = "HUGGY_BRIDGE_";
const REDACTED: &str = "[redacted]";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot load configuration: {0}")]
    Load(#[from] Box<figment::Error>),
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// A secret string: deserialized from config, compared by the code that owns it, printed as `[redacted]`.
#[derive(Clone)]
pub struct Secret(SecretString);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(SecretString::from(value.into()))
    }
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(REDACTED)
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret::new)
    }
}

/// Accepts either a list of strings or one comma-separated string (handy in an environment variable
/// fed from a Kubernetes Secret: `HUGGY_BRIDGE_HUGGY__TOKENS=tok1,tok2`).
fn secrets_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Secret>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        // An all-digit token from the environment arrives as a number.
        Number(u64),
        Many(Vec<String>),
    }
    let items = match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => s.split(',').map(str::to_owned).collect(),
        OneOrMany::Number(n) => vec![n.to_string()],
        OneOrMany::Many(v) => v,
    };
    Ok(items.into_iter().map(|t| t.trim().to_owned()).filter(|t| !t.is_empty()).map(Secret::new).collect())
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub http: HttpConfig,
    pub admin: AdminConfig,
    pub huggy: HuggyConfig,
    pub kafka: KafkaConfig,
    pub delivery: DeliveryConfig,
    pub spool: SpoolConfig,
    pub files: FilesConfig,
    pub shutdown: ShutdownConfig,
    pub log: LogConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Public webhook listener.
    pub listen: SocketAddr,
    pub path: String,
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
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// `/metrics`, `/healthz`, `/readyz`; keep it off the public address.
    pub listen: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self { listen: SocketAddr::from(([127, 0, 0, 1], 9090)) }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HuggyConfig {
    /// Accepted batch tokens, one per Huggy account (Configurações > Webhook).
    #[serde(deserialize_with = "secrets_list")]
    pub tokens: Vec<Secret>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// `"embedded"` for the in-process development broker, else `host:port,host:port`.
    pub brokers: String,
    pub topic_template: String,
    pub fallback_topic: String,
    pub dead_letter_topic: String,
    pub partitions: i32,
    pub replication_factor: i32,
    /// Per-event-type topic overrides, e.g. `receivedMessage = "chat.inbound"`.
    pub topics: BTreeMap<String, String>,
    /// librdkafka properties passed through as they are (after the bridge's own defaults).
    #[serde(serialize_with = "redact_librdkafka")]
    pub librdkafka: BTreeMap<String, String>,
    /// Time allowed for a Kafka admin or metadata request (`topics create`, readiness probe).
    pub request_timeout_ms: u64,
    /// Records the spool publisher keeps in flight at once.
    pub max_in_flight_records: usize,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: "localhost:9092".into(),
            topic_template: "huggy.{event}".into(),
            fallback_topic: "huggy.unknown".into(),
            dead_letter_topic: "huggy.dead-letter".into(),
            partitions: 6,
            replication_factor: 1,
            topics: BTreeMap::new(),
            librdkafka: BTreeMap::new(),
            request_timeout_ms: 10_000,
            max_in_flight_records: 2_000,
        }
    }
}

impl KafkaConfig {
    pub fn is_embedded(&self) -> bool {
        self.brokers.trim() == "embedded"
    }
}

fn is_secret_property(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    ["password", "secret", "key", "token", "jaas"].iter().any(|w| k.contains(w)) && !k.ends_with(".location")
}

fn redact_librdkafka<S: Serializer>(map: &BTreeMap<String, String>, s: S) -> Result<S::Ok, S::Error> {
    let redacted: BTreeMap<&str, &str> =
        map.iter().map(|(k, v)| (k.as_str(), if is_secret_property(k) { REDACTED } else { v.as_str() })).collect();
    redacted.serialize(s)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AckMode {
    /// 2xx once the batch is fsync'd to the local spool.
    Spool,
    /// 2xx once Kafka acknowledged every event of the batch (`acks=all`).
    Kafka,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    pub ack: AckMode,
    /// In `kafka` mode: how long a request waits for Kafka before answering 503.
    pub kafka_ack_timeout_ms: u64,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self { ack: AckMode::Spool, kafka_ack_timeout_ms: 10_000 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpoolConfig {
    pub dir: PathBuf,
    /// Bytes the spool keeps on disk at most (segments, delivered events included until their
    /// segment is deleted, and the dedup snapshot); past it the webhook answers 503, never drops.
    pub max_bytes: u64,
    /// An event id durably stored within this window is acknowledged but not stored again (a batch
    /// Huggy sends twice). 19–39 bytes of memory per id.
    pub dedup_window_secs: u64,
    /// A warning is logged while the oldest undelivered event is older than this (readiness does not
    /// depend on it: riding out a Kafka outage is what the spool is for; alert on
    /// `huggy_bridge_spool_oldest_age_seconds`). Above `files.token_ttl_secs`: an event may wait that
    /// long for its files.
    pub max_undelivered_age_secs: u64,
    /// Liveness fails when the spool writer has had work and made no progress for this long (the
    /// publisher: five times this, while Kafka is reachable).
    pub stall_timeout_secs: u64,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("./data/spool"),
            max_bytes: 1024 * 1024 * 1024,
            // Huggy sends a batch again when it did not get our answer, within minutes; an hour covers
            // that with room to spare at 14 MB per 100 events/s. Consumers deduplicate by ce_id anyway.
            dedup_window_secs: 3600,
            max_undelivered_age_secs: 900,
            stall_timeout_secs: 60,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FilesConfig {
    pub enabled: bool,
    pub allowed_url_prefixes: Vec<String>,
    pub token_ttl_secs: u64,
    pub max_file_bytes: u64,
    /// `file://path` or `s3://bucket/prefix`.
    pub store: String,
    /// Downloads running at once at least (the floor); more open under deadline pressure.
    pub concurrency: usize,
    /// Downloads running at once at most, however many files are at risk.
    pub max_concurrency: usize,
    pub connect_timeout_ms: u64,
    /// A transfer that receives nothing for this long is abandoned (and retried while the token lives).
    pub idle_timeout_ms: u64,
    pub s3: S3Config,
}

impl Default for FilesConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            allowed_url_prefixes: vec![
                "https://files.huggy.app/".into(),
                "https://huggy-svc-async-report-export-origin.s3.us-east-1.amazonaws.com/".into(),
            ],
            token_ttl_secs: 600,
            max_file_bytes: 100 * 1024 * 1024,
            store: "file://./data/files".into(),
            concurrency: 16,
            max_concurrency: 256,
            connect_timeout_ms: 5_000,
            idle_timeout_ms: 20_000,
            s3: S3Config::default(),
        }
    }
}

/// Settings for an `s3://` store; unset values fall back to the standard `AWS_*` environment.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct S3Config {
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<Secret>,
    pub secret_access_key: Option<Secret>,
    pub allow_http: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// Drain deadline after SIGTERM/SIGINT: in-flight requests, producer flush, spool close.
    pub timeout_secs: u64,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self { timeout_secs: 25 }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// JSON when stderr is not a terminal, human-readable otherwise.
    Auto,
    Json,
    Text,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A tracing filter; `RUST_LOG`, when set, wins.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { format: LogFormat::Auto, level: "info".into() }
    }
}

/// The top-level sections (`http`, `kafka`, …), as the declared defaults serialize them.
fn section_names() -> Vec<String> {
    match figment::value::Value::serialize(Config::default()) {
        Ok(figment::value::Value::Dict(_, sections)) => sections.into_keys().collect(),
        other => unreachable!("the default configuration serializes to a table, got {other:?}"),
    }
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
        Self::figment(path).extract::<Config>().map_err(|e| ConfigError::Load(Box::new(e)))?.validated()
    }

    pub fn figment(path: Option<&Path>) -> Figment {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        match path {
            Some(p) => figment = figment.merge(Toml::file_exact(p)),
            None if Path::new("config.toml").exists() => figment = figment.merge(Toml::file_exact("config.toml")),
            None => {}
        }
        let sections = section_names();
        figment.merge(Env::prefixed(ENV_PREFIX).filter(move |key| names_a_section(&sections, key.as_str())).split("__"))
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

    /// Rejects values that would make the daemon misbehave rather than fail.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if !self.http.path.starts_with('/') {
            return bad(format!("http.path must start with '/', got {:?}", self.http.path));
        }
        if self.http.max_body_bytes == 0 {
            return bad("http.max_body_bytes must be positive".into());
        }
        if self.http.max_inflight_bytes < self.http.max_body_bytes {
            return bad(format!(
                "http.max_inflight_bytes ({}) must be at least http.max_body_bytes ({}): a body of the largest accepted size could never be read",
                self.http.max_inflight_bytes, self.http.max_body_bytes
            ));
        }
        if self.http.max_connections == 0 {
            return bad("http.max_connections must be positive".into());
        }
        if self.http.listen == self.admin.listen {
            return bad("http.listen and admin.listen must differ".into());
        }
        if self.huggy.tokens.is_empty() {
            return bad("huggy.tokens is empty: no batch could ever be accepted".into());
        }
        if self.kafka.brokers.trim().is_empty() {
            return bad("kafka.brokers is empty".into());
        }
        if !self.kafka.topic_template.contains("{event}") {
            return bad("kafka.topic_template must contain {event}".into());
        }
        let topics = std::iter::once(&self.kafka.fallback_topic)
            .chain(std::iter::once(&self.kafka.dead_letter_topic))
            .chain(self.kafka.topics.values());
        for t in topics {
            if !crate::event::is_valid_topic(t) {
                return bad(format!("{t:?} is not a valid Kafka topic name"));
            }
        }
        for ty in self.kafka.topics.keys() {
            if crate::event::KnownType::parse_ignore_case(ty).is_none() {
                return bad(format!("kafka.topics.{ty}: not a Huggy event type this bridge knows"));
            }
        }
        if self.kafka.partitions < 1 || self.kafka.replication_factor < 1 {
            return bad("kafka.partitions and kafka.replication_factor must be at least 1".into());
        }
        if self.kafka.max_in_flight_records == 0 {
            return bad("kafka.max_in_flight_records must be positive".into());
        }
        if self.spool.max_bytes == 0 {
            return bad("spool.max_bytes must be positive".into());
        }
        if self.delivery.ack == AckMode::Spool && self.spool.max_bytes < self.http.max_body_bytes as u64 {
            return bad(format!(
                "spool.max_bytes ({}) must be at least http.max_body_bytes ({}): a batch of the largest accepted size could never be stored",
                self.spool.max_bytes, self.http.max_body_bytes
            ));
        }
        if self.files.enabled {
            if self.spool.max_undelivered_age_secs <= self.files.token_ttl_secs {
                return bad(format!(
                    "spool.max_undelivered_age_secs ({}) must exceed files.token_ttl_secs ({}): an event may wait that long for its files",
                    self.spool.max_undelivered_age_secs, self.files.token_ttl_secs
                ));
            }
            if self.files.concurrency == 0 {
                return bad("files.concurrency must be positive".into());
            }
            if !(self.files.store.starts_with("file://") || self.files.store.starts_with("s3://")) {
                return bad(format!("files.store must be file://… or s3://…, got {:?}", self.files.store));
            }
            if self.files.max_concurrency < self.files.concurrency {
                return bad(format!(
                    "files.max_concurrency ({}) must be at least files.concurrency ({}), the floor",
                    self.files.max_concurrency, self.files.concurrency
                ));
            }
            for p in &self.files.allowed_url_prefixes {
                if let Err(why) = crate::files::fetch::Prefix::parse(p) {
                    return bad(format!("files.allowed_url_prefixes: {p:?} {why}"));
                }
            }
        }
        Ok(())
    }

    /// The effective configuration as TOML, secrets redacted.
    pub fn to_redacted_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render configuration: {e}\n"))
    }

    pub fn header_timeout(&self) -> Duration {
        Duration::from_millis(self.http.header_timeout_ms)
    }
    pub fn body_timeout(&self) -> Duration {
        Duration::from_millis(self.http.body_timeout_ms)
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return figment::Error
mod tests {
    use super::*;
    use figment::Jail;

    #[test]
    fn toml_then_env_override_and_tokens_are_redacted() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "bridge.toml",
                r#"
                [huggy]
                tokens = ["first-secret-token"]
                [kafka]
                brokers = "k1:9092"
                [kafka.librdkafka]
                "sasl.password" = "hunter2"
                "linger.ms" = "7"
                "#,
            )?;
            jail.set_env("HUGGY_BRIDGE_KAFKA__BROKERS", "k1:9092,k2:9092");
            jail.set_env("HUGGY_BRIDGE_HUGGY__TOKENS", "a-token,b-token");
            let cfg = Config::load(Some(Path::new("bridge.toml"))).expect("loads");
            assert_eq!(cfg.kafka.brokers, "k1:9092,k2:9092");
            assert_eq!(cfg.huggy.tokens.iter().map(Secret::expose).collect::<Vec<_>>(), ["a-token", "b-token"]);
            let printed = cfg.to_redacted_toml();
            assert!(!printed.contains("a-token") && !printed.contains("hunter2"), "{printed}");
            assert!(printed.contains("linger.ms") && printed.contains("[redacted]"));
            Ok(())
        });
    }

    #[test]
    fn a_numeric_token_from_the_environment_is_a_token() {
        Jail::expect_with(|jail| {
            jail.set_env("HUGGY_BRIDGE_HUGGY__TOKENS", "12345678");
            let cfg = Config::load(None).expect("loads");
            assert_eq!(cfg.huggy.tokens[0].expose(), "12345678");
            Ok(())
        });
    }

    #[test]
    fn topic_overrides_from_the_environment_ignore_letter_case() {
        Jail::expect_with(|jail| {
            jail.set_env("HUGGY_BRIDGE_HUGGY__TOKENS", "t");
            jail.set_env("HUGGY_BRIDGE_KAFKA__TOPICS__RECEIVEDMESSAGE", "chat.inbound");
            let cfg = Config::load(None).expect("loads");
            let routes = crate::publish::Routes::new(&cfg.kafka);
            let t = crate::event::EventType::Known(crate::event::KnownType::ReceivedMessage);
            assert_eq!(routes.topic_for(&t), "chat.inbound");
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_are_rejected() {
        Jail::expect_with(|jail| {
            jail.create_file("c.toml", "[huggy]\ntokens=[\"t\"]\n[kafka]\nbrokerz = \"x\"\n")?;
            let err = Config::load(Some(Path::new("c.toml"))).unwrap_err().to_string();
            assert!(err.contains("brokerz"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn validate_rejects_conflicts() {
        let mut cfg = Config::default();
        assert!(cfg.validate().is_err(), "no tokens");
        cfg.huggy.tokens = vec![Secret::new("t")];
        cfg.validate().expect("defaults plus a token are valid");
        cfg.kafka.topics.insert("notAType".into(), "x".into());
        assert!(cfg.validate().is_err());
        cfg.kafka.topics.clear();
        cfg.kafka.topic_template = "static".into();
        assert!(cfg.validate().is_err());
        cfg.kafka.topic_template = "huggy.{event}".into();
        cfg.spool.max_undelivered_age_secs = 600;
        assert!(cfg.validate().unwrap_err().to_string().contains("must exceed files.token_ttl_secs"));
        cfg.files.enabled = false;
        cfg.validate().expect("without file capture any age is fine");
    }

    /// What kubelet injects for Services `huggy-bridge` (ports `http`, `admin`) and `huggy-bridge-admin`.
    pub(crate) const KUBELET_SERVICE_LINKS: &[(&str, &str)] = &[
        ("HUGGY_BRIDGE_SERVICE_HOST", "10.96.0.12"),
        ("HUGGY_BRIDGE_SERVICE_PORT", "8080"),
        ("HUGGY_BRIDGE_SERVICE_PORT_HTTP", "8080"),
        ("HUGGY_BRIDGE_SERVICE_PORT_ADMIN", "9090"),
        ("HUGGY_BRIDGE_PORT", "tcp://10.96.0.12:8080"),
        ("HUGGY_BRIDGE_PORT_8080_TCP", "tcp://10.96.0.12:8080"),
        ("HUGGY_BRIDGE_PORT_8080_TCP_PROTO", "tcp"),
        ("HUGGY_BRIDGE_PORT_8080_TCP_PORT", "8080"),
        ("HUGGY_BRIDGE_PORT_8080_TCP_ADDR", "10.96.0.12"),
        ("HUGGY_BRIDGE_ADMIN_SERVICE_HOST", "10.96.0.13"),
        ("HUGGY_BRIDGE_ADMIN_SERVICE_PORT", "9090"),
        ("HUGGY_BRIDGE_ADMIN_SERVICE_PORT_ADMIN", "9090"),
        ("HUGGY_BRIDGE_ADMIN_PORT", "tcp://10.96.0.13:9090"),
        ("HUGGY_BRIDGE_ADMIN_PORT_9090_TCP", "tcp://10.96.0.13:9090"),
        ("HUGGY_BRIDGE_ADMIN_PORT_9090_TCP_PROTO", "tcp"),
        ("HUGGY_BRIDGE_ADMIN_PORT_9090_TCP_PORT", "9090"),
        ("HUGGY_BRIDGE_ADMIN_PORT_9090_TCP_ADDR", "10.96.0.13"),
    ];

    #[test]
    fn kubernetes_service_links_are_ignored_and_reported() {
        Jail::expect_with(|jail| {
            jail.set_env("HUGGY_BRIDGE_HUGGY__TOKENS", "t");
            jail.set_env("HUGGY_BRIDGE_ADMIN__LISTEN", "127.0.0.1:9999");
            for (k, v) in KUBELET_SERVICE_LINKS {
                jail.set_env(k, v);
            }
            let cfg = Config::load(None).expect("service links are not configuration");
            assert_eq!(cfg.admin.listen, SocketAddr::from(([127, 0, 0, 1], 9999)), "a real admin key still applies");
            let mut expected: Vec<String> = KUBELET_SERVICE_LINKS.iter().map(|(k, _)| k.to_string()).collect();
            expected.sort();
            assert_eq!(Config::ignored_env_vars(), expected);
            Ok(())
        });
    }

    #[test]
    fn an_unknown_key_inside_a_known_section_is_still_an_error() {
        Jail::expect_with(|jail| {
            jail.set_env("HUGGY_BRIDGE_HUGGY__TOKENS", "t");
            jail.set_env("HUGGY_BRIDGE_SERVICE_HOST", "10.96.0.12");
            jail.set_env("HUGGY_BRIDGE_KAFKA__BROKRES", "k1:9092");
            let err = Config::load(None).unwrap_err().to_string();
            assert!(err.contains("brokres"), "{err}");
            assert_eq!(Config::ignored_env_vars(), ["HUGGY_BRIDGE_SERVICE_HOST"], "a section typo is not ignored");
            Ok(())
        });
    }

    #[test]
    fn only_a_double_underscore_nests() {
        let sections = section_names();
        assert!(sections.len() >= 9, "{sections:?}");
        for key in ["HTTP__LISTEN", "ADMIN__LISTEN", "kafka__brokers", "SPOOL__DIR", "LOG__LEVEL", "FILES__STORE"] {
            assert!(names_a_section(&sections, key), "{key}");
        }
        for key in ["ADMIN_PORT", "ADMIN_SERVICE_HOST", "PORT", "SERVICE_HOST", "KAFKA_PORT_9092_TCP", ""] {
            assert!(!names_a_section(&sections, key), "{key}");
        }
    }

    #[test]
    fn body_limits_must_fit_the_inflight_budget_and_the_spool() {
        let mut cfg = Config::default();
        cfg.huggy.tokens = vec![Secret::new("t")];
        assert_eq!(cfg.http.max_inflight_bytes, 256 * 1024 * 1024);
        cfg.http.max_inflight_bytes = cfg.http.max_body_bytes - 1;
        assert!(cfg.validate().unwrap_err().to_string().contains("http.max_inflight_bytes"));
        cfg.http.max_inflight_bytes = cfg.http.max_body_bytes;
        cfg.validate().expect("one body at a time is a valid budget");
        cfg.spool.max_bytes = cfg.http.max_body_bytes as u64 - 1;
        assert!(cfg.validate().unwrap_err().to_string().contains("spool.max_bytes"));
        cfg.delivery.ack = AckMode::Kafka;
        cfg.validate().expect("kafka mode does not store batches in the spool");
    }

    #[test]
    fn file_prefixes_without_a_slash_and_inverted_concurrency_are_refused() {
        let mut cfg = Config::default();
        cfg.huggy.tokens = vec![Secret::new("t")];
        cfg.files.allowed_url_prefixes = vec!["https://files.huggy.app".into()];
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("must end with '/'") && err.contains("\"https://files.huggy.app/\""), "{err}");
        cfg.files.allowed_url_prefixes = vec!["https://files.huggy.app@evil.com/".into()];
        assert!(cfg.validate().unwrap_err().to_string().contains("user information"));
        cfg.files.allowed_url_prefixes = vec!["https://files.huggy.app/".into()];
        cfg.validate().expect("a prefix ending in a slash is fine");
        cfg.files.max_concurrency = 8;
        assert!(cfg.validate().unwrap_err().to_string().contains("files.max_concurrency (8)"));
    }
}
