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

mod env;
pub mod prefix;
mod secrets;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Prefix of every environment variable the daemon reads.
pub const ENV_PREFIX: &str = "HUGGY_BRIDGE_";
const REDACTED: &str = "[redacted]";

/// The largest `http.max_body_bytes` accepted: half the spool's frame limit, so that an event as
/// large as a whole body, with its key, type, company and a dead-letter reason, always fits a frame.
pub const MAX_BODY_BYTES_CEILING: usize = 128 * 1024 * 1024;

/// The smallest `files.max_buffer_bytes`: one S3 multipart part (S3's minimum size of every part
/// but the last, the size the file store uploads in), so that every download's share fits.
pub const MIN_BUFFER_BYTES: u64 = 5 * 1024 * 1024;

/// `spool.dedup_max_ids` when not configured.
pub const DEFAULT_DEDUP_MAX_IDS: usize = 1_000_000;

/// Why the configuration was refused. The message names the key; a cause (figment's parse error, a
/// prefix's flaw) is the error's source, so print the whole chain.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A source could not be read or parsed, a key is unknown, or a value has the wrong type: each
    /// problem with the key as the user wrote it (`kafka.brokers` in a file,
    /// `HUGGY_BRIDGE_KAFKA__BROKERS` in the environment) and where it came from.
    #[error("cannot load configuration: {}", describe_load_error(.0))]
    Load(Box<figment::Error>),
    /// No webhook token: no batch could ever be accepted.
    #[error("invalid configuration: huggy.tokens is empty (and huggy.tokens_file, if set, holds none, and no huggy.accounts token): no batch could ever be accepted")]
    NoTokens,
    /// A `<key>_file` could not be read.
    #[error("invalid configuration: {key}: cannot read {path:?}")]
    SecretFile {
        /// The `_file` setting.
        key: &'static str,
        /// The path configured.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// A secret is given both directly and as a file.
    #[error("invalid configuration: {key} and {file_key} are both set; set one")]
    SecretTwice {
        /// The secret's key.
        key: &'static str,
        /// Its `_file` form.
        file_key: &'static str,
    },
    /// A setting that must be given is empty.
    #[error("invalid configuration: {key} is empty")]
    Empty {
        /// The setting, e.g. `kafka.brokers`.
        key: &'static str,
    },
    /// A count or size that must be above zero is not.
    #[error("invalid configuration: {key} must be positive")]
    NotPositive {
        /// The setting, e.g. `http.max_body_bytes`.
        key: &'static str,
    },
    /// A value that must have a given form does not.
    #[error("invalid configuration: {key} must {expected}, got {value:?}")]
    Malformed {
        /// The setting.
        key: &'static str,
        /// What the value must do, e.g. `start with '/'`.
        expected: &'static str,
        /// The value found.
        value: String,
    },
    /// A setting is smaller than another one it must cover.
    #[error("invalid configuration: {key} ({value}) must be at least {bound_key} ({bound}): {reason}")]
    BelowBound {
        /// The setting that is too small.
        key: &'static str,
        /// Its value.
        value: u64,
        /// The setting it must cover.
        bound_key: &'static str,
        /// That setting's value.
        bound: u64,
        /// What would go wrong otherwise.
        reason: &'static str,
    },
    /// A `tokens_file` could not be read.
    #[error("invalid configuration: {key} {path:?} cannot be read")]
    TokensFile {
        /// The setting, e.g. `huggy.accounts[0].tokens_file`.
        key: String,
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// A `[[huggy.accounts]]` entry that cannot work.
    #[error("invalid configuration: huggy.accounts[{index}]: {problem}")]
    Account {
        /// Its position in the list.
        index: usize,
        /// What is wrong (never a token).
        problem: &'static str,
    },
    /// A size above what the bridge can handle at all.
    #[error("invalid configuration: {key} ({value}) must be at most {ceiling}: {reason}")]
    AboveCeiling {
        /// The setting.
        key: &'static str,
        /// Its value.
        value: u64,
        /// The largest value allowed.
        ceiling: u64,
        /// What would go wrong otherwise.
        reason: &'static str,
    },
    /// `spool.max_undelivered_age_secs` does not exceed `files.token_ttl_secs`, though an event may
    /// wait that long for its files.
    #[error(
        "invalid configuration: spool.max_undelivered_age_secs ({max_undelivered_age_secs}) must exceed files.token_ttl_secs ({token_ttl_secs}): an event may wait that long for its files"
    )]
    AgeWithinTokenTtl {
        /// `spool.max_undelivered_age_secs`.
        max_undelivered_age_secs: u64,
        /// `files.token_ttl_secs`.
        token_ttl_secs: u64,
    },
    /// The public and the admin listener share one address.
    #[error("invalid configuration: http.listen and admin.listen must differ")]
    SameListenAddress,
    /// A `kafka.topics` override names no event type this bridge knows.
    #[error("invalid configuration: kafka.topics.{name}: not a Huggy event type this bridge knows")]
    UnknownEventType {
        /// The key as configured.
        name: String,
    },
    /// An entry of `files.allowed_url_prefixes` is not a usable prefix.
    #[error("invalid configuration: files.allowed_url_prefixes: {prefix:?}")]
    UrlPrefix {
        /// The entry as configured.
        prefix: String,
        /// What is wrong with it.
        #[source]
        source: prefix::PrefixError,
    },
    /// The `[http.tls]` pair cannot be served: checked by `check-config` and at start, by the
    /// listener's TLS code, whose error (naming the file and the problem) is the source.
    #[error("invalid configuration")]
    Tls(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// Everything wrong with `[kafka]`, reported at once.
    #[error("invalid configuration: {}", join_problems(.0))]
    Kafka(Vec<KafkaProblem>),
}

fn join_problems(problems: &[KafkaProblem]) -> String {
    problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
}

/// One problem with `[kafka]`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KafkaProblem {
    /// The topic template would send every type to one topic.
    #[error("kafka.topic_template must contain {{event}}")]
    TemplateWithoutEvent,
    /// The template makes a name Kafka refuses for some event type.
    #[error(
        "kafka.topic_template makes {topic:?} for {event}, not a valid Kafka topic name (1-249 characters of a-z A-Z 0-9 . _ -, not . or ..)"
    )]
    TemplateMakesInvalidTopic {
        /// The name made.
        topic: String,
        /// The event type it was made for.
        event: &'static str,
    },
    /// A configured topic name Kafka refuses.
    #[error("{key}: {topic:?} is not a valid Kafka topic name (1-249 characters of a-z A-Z 0-9 . _ -, not . or ..)")]
    InvalidTopic {
        /// The setting (`kafka.fallback_topic`, `kafka.dead_letter_topic`) or the overridden event type.
        key: String,
        /// The name configured.
        topic: String,
    },
    /// `kafka.min_insync_replicas` is below 1 or above the replication factor.
    #[error(
        "kafka.min_insync_replicas ({value}) must be between 1 and kafka.replication_factor ({replication_factor})"
    )]
    MinInsyncReplicas {
        /// `kafka.min_insync_replicas`.
        value: i32,
        /// `kafka.replication_factor`.
        replication_factor: i32,
    },
    /// Certificate files are set while TLS is off: probably a forgotten `enabled = true`.
    #[error("kafka.tls: files are set but kafka.tls.enabled is false")]
    TlsFilesWithoutTls,
    /// Only one of the client certificate and its key is set.
    #[error("kafka.tls.cert_file and kafka.tls.key_file go together (mTLS needs both)")]
    CertWithoutKey,
    /// A TLS file does not exist or is not a file.
    #[error("kafka.tls.{key}: {path:?} is not a readable file")]
    UnreadableFile {
        /// `ca_file`, `cert_file` or `key_file`.
        key: &'static str,
        /// The path configured.
        path: String,
    },
    /// SASL credentials without a mechanism would be silently unused.
    #[error("kafka.sasl: credentials are set but kafka.sasl.mechanism is empty")]
    SaslWithoutMechanism,
    /// A SASL mechanism without both username and password.
    #[error("kafka.sasl: {} needs username and password", mechanism.as_str())]
    SaslIncomplete {
        /// The mechanism configured.
        mechanism: SaslMechanism,
    },
    /// A `kafka.librdkafka` property the bridge refuses: it would break the promise behind a 2xx,
    /// or a section of its own sets it.
    #[error("kafka.librdkafka.{property} is refused: {reason}")]
    RefusedProperty {
        /// The property as configured.
        property: String,
        /// Why it is refused.
        reason: String,
    },
}

/// A secret string: deserialized from config, compared by the code that owns it, printed as `[redacted]`.
#[derive(Clone)]
pub struct Secret(SecretString);

impl Secret {
    /// Wraps `value`; from here on it prints as `[redacted]`.
    pub fn new(value: impl Into<String>) -> Self {
        Self(SecretString::from(value.into()))
    }
    pub(crate) fn expose(&self) -> &str {
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

/// `[kafka]`: where events go and how the producer talks to the brokers.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// `"embedded"` for the in-process development broker, else `host:port,host:port`.
    pub brokers: String,
    /// Topic of a known event type; `{event}` is replaced by the normalized type.
    pub topic_template: String,
    /// Topic of event types the bridge does not know (they are never dropped).
    pub fallback_topic: String,
    /// Topic of events that cannot be published to their own topic.
    pub dead_letter_topic: String,
    /// Partitions of the topics `topics create` makes.
    pub partitions: i32,
    /// Replication factor of the topics `topics create` makes.
    pub replication_factor: i32,
    /// Per-event-type topic overrides, e.g. `receivedMessage = "chat.inbound"`.
    pub topics: BTreeMap<String, String>,
    /// TLS to the brokers.
    pub tls: KafkaTlsConfig,
    /// SASL authentication (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512).
    pub sasl: KafkaSaslConfig,
    /// librdkafka properties passed through as they are (after the bridge's own defaults), except
    /// those [`refused_property`] names. Nested tables are flattened with dots, so
    /// `HUGGY_BRIDGE_KAFKA__LIBRDKAFKA__SOCKET__KEEPALIVE__ENABLE` sets `socket.keepalive.enable`.
    #[serde(serialize_with = "redact_librdkafka", deserialize_with = "flat_properties")]
    pub librdkafka: BTreeMap<String, String>,
    /// Time allowed for a Kafka admin or metadata request (`topics create`, readiness probe).
    pub request_timeout_ms: u64,
    /// Records the spool publisher keeps in flight at once.
    pub max_in_flight_records: usize,
    /// `min.insync.replicas` of the topics `topics create` makes; unset: 2 when
    /// `replication_factor` is 3 or more (so `acks=all` survives one broker), else the broker's default.
    pub min_insync_replicas: Option<i32>,
    /// How a key picks its partition; `murmur2_random` hashes as Java clients do. Changing it later
    /// moves keys to other partitions (per-key order breaks across the change).
    pub partitioner: Partitioner,
}

/// librdkafka's keyed partitioners (`partitioner`). `random` is not among them: it ignores the key
/// and breaks per-key order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Partitioner {
    /// murmur2 of the key, as Java's producer, Kafka Streams and ksqlDB compute it; records without
    /// a key go to a random partition.
    #[default]
    Murmur2Random,
    /// murmur2; records without a key all go to one partition.
    Murmur2,
    /// CRC32 of the key (librdkafka's own default); records without a key go to a random partition.
    ConsistentRandom,
    /// CRC32; records without a key all go to one partition.
    Consistent,
    /// FNV-1a of the key (Sarama's hash); records without a key go to a random partition.
    Fnv1aRandom,
    /// FNV-1a; records without a key all go to one partition.
    Fnv1a,
}

impl Partitioner {
    const ALL: [Partitioner; 6] = [
        Partitioner::Murmur2Random,
        Partitioner::Murmur2,
        Partitioner::ConsistentRandom,
        Partitioner::Consistent,
        Partitioner::Fnv1aRandom,
        Partitioner::Fnv1a,
    ];

    /// The librdkafka `partitioner` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Partitioner::Murmur2Random => "murmur2_random",
            Partitioner::Murmur2 => "murmur2",
            Partitioner::ConsistentRandom => "consistent_random",
            Partitioner::Consistent => "consistent",
            Partitioner::Fnv1aRandom => "fnv1a_random",
            Partitioner::Fnv1a => "fnv1a",
        }
    }
}

impl Serialize for Partitioner {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Partitioner {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let wanted = s.trim().to_ascii_lowercase();
        Partitioner::ALL.into_iter().find(|p| p.as_str() == wanted).ok_or_else(|| {
            let names: Vec<&str> = Partitioner::ALL.iter().map(|p| p.as_str()).collect();
            let why = if wanted == "random" { " (random ignores the key and breaks per-key order)" } else { "" };
            serde::de::Error::custom(format!("unsupported partitioner {s:?}{why}: use one of {}", names.join(", ")))
        })
    }
}

/// `[kafka.tls]`: TLS to the brokers, with server verification and an optional client certificate.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaTlsConfig {
    /// TLS on; the files below are checked only then.
    pub enabled: bool,
    /// PEM CA bundle; empty: the system's roots.
    pub ca_file: String,
    /// PEM client certificate (mTLS); needs `key_file`.
    pub cert_file: String,
    /// PEM private key of `cert_file`.
    pub key_file: String,
    /// Password of an encrypted `key_file`.
    #[serde(deserialize_with = "scalar_secret")]
    pub key_password: Option<Secret>,
    /// A file holding `key_password` (one trailing line break dropped).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_password_file: Option<PathBuf>,
}

/// SASL mechanisms librdkafka can use without a system SASL library.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SaslMechanism {
    /// No SASL.
    #[default]
    None,
    /// `PLAIN`: the password travels as it is (use it with TLS).
    Plain,
    /// `SCRAM-SHA-256`.
    ScramSha256,
    /// `SCRAM-SHA-512`.
    ScramSha512,
}

impl SaslMechanism {
    /// The name librdkafka and Kafka use (`""` for none).
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            SaslMechanism::None => "",
            SaslMechanism::Plain => "PLAIN",
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

impl Serialize for SaslMechanism {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for SaslMechanism {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        match s.trim().to_ascii_uppercase().as_str() {
            "" => Ok(SaslMechanism::None),
            "PLAIN" => Ok(SaslMechanism::Plain),
            "SCRAM-SHA-256" => Ok(SaslMechanism::ScramSha256),
            "SCRAM-SHA-512" => Ok(SaslMechanism::ScramSha512),
            other => Err(serde::de::Error::custom(format!(
                "unsupported SASL mechanism {other:?}: use \"PLAIN\", \"SCRAM-SHA-256\" or \"SCRAM-SHA-512\""
            ))),
        }
    }
}

/// `[kafka.sasl]`: SASL credentials. The password is a [`Secret`], settable as
/// `HUGGY_BRIDGE_KAFKA__SASL__PASSWORD`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaSaslConfig {
    /// The mechanism; none turns SASL off.
    pub mechanism: SaslMechanism,
    /// The SASL user.
    #[serde(deserialize_with = "scalar_string")]
    pub username: String,
    /// The SASL password, redacted wherever the configuration is printed.
    #[serde(deserialize_with = "scalar_secret")]
    pub password: Option<Secret>,
    /// A file holding `password` (one trailing line break dropped).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
}

impl KafkaSaslConfig {
    fn password_is_empty(&self) -> bool {
        self.password.as_ref().is_none_or(|p| p.expose().is_empty())
    }
}

/// A scalar as a string: values from the environment arrive typed (`1234` is a number).
#[derive(Deserialize)]
#[serde(untagged)]
enum Scalar {
    Str(String),
    Int(i64),
    UInt(u64),
    Float(f64),
    Bool(bool),
}

impl Scalar {
    fn into_string(self) -> String {
        match self {
            Scalar::Str(s) => s,
            Scalar::Int(n) => n.to_string(),
            Scalar::UInt(n) => n.to_string(),
            Scalar::Float(n) => n.to_string(),
            Scalar::Bool(b) => b.to_string(),
        }
    }
}

fn scalar_string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Scalar::deserialize(d).map(Scalar::into_string)
}

fn scalar_secret<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Secret>, D::Error> {
    Option::<Scalar>::deserialize(d).map(|s| s.map(|s| Secret::new(s.into_string())))
}

/// librdkafka properties from a table that may be nested: TOML's dotted keys (`socket.timeout.ms = 1`)
/// and environment variables (`…__LIBRDKAFKA__SOCKET__TIMEOUT__MS`) arrive as nested tables; the
/// property is the path joined with dots.
fn flat_properties<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Node {
        Leaf(Scalar),
        Table(BTreeMap<String, Node>),
    }
    fn flatten(prefix: &str, table: BTreeMap<String, Node>, out: &mut BTreeMap<String, String>) {
        for (k, v) in table {
            let key = if prefix.is_empty() { k } else { format!("{prefix}.{k}") };
            match v {
                Node::Leaf(s) => {
                    out.insert(key, s.into_string());
                }
                Node::Table(t) => flatten(&key, t, out),
            }
        }
    }
    let mut out = BTreeMap::new();
    flatten("", BTreeMap::<String, Node>::deserialize(d)?, &mut out);
    Ok(out)
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
            tls: KafkaTlsConfig::default(),
            sasl: KafkaSaslConfig::default(),
            librdkafka: BTreeMap::new(),
            request_timeout_ms: 10_000,
            max_in_flight_records: 2_000,
            min_insync_replicas: None,
            partitioner: Partitioner::default(),
        }
    }
}

impl KafkaConfig {
    /// Whether `brokers` asks for the in-process development broker.
    pub fn is_embedded(&self) -> bool {
        self.brokers.trim() == "embedded"
    }

    /// `min.insync.replicas` for `topics create`: the configured value, else 2 when the replication
    /// factor is 3 or more, else none (the broker's default).
    pub(crate) fn effective_min_insync_replicas(&self) -> Option<i32> {
        self.min_insync_replicas.or((self.replication_factor >= 3).then_some(2))
    }

    /// librdkafka's `security.protocol` for `[kafka.tls]` and `[kafka.sasl]`; `None` when neither is on.
    pub(crate) fn security_protocol(&self) -> Option<&'static str> {
        match (self.tls.enabled, self.sasl.mechanism != SaslMechanism::None) {
            (false, false) => None,
            (true, false) => Some("ssl"),
            (false, true) => Some("sasl_plaintext"),
            (true, true) => Some("sasl_ssl"),
        }
    }

    /// The problems with `[kafka]`; `ack` decides what the passthrough may hold.
    fn problems(&self, ack: AckMode) -> Vec<KafkaProblem> {
        let mut out = Vec::new();
        if !self.topic_template.contains("{event}") {
            out.push(KafkaProblem::TemplateWithoutEvent);
        } else {
            for k in crate::event::KnownType::ALL {
                let t = self.topic_template.replace("{event}", k.as_str());
                if !crate::event::types::is_valid_topic(&t) {
                    out.push(KafkaProblem::TemplateMakesInvalidTopic { topic: t, event: k.as_str() });
                    break;
                }
            }
        }
        let named =
            [("kafka.fallback_topic", &self.fallback_topic), ("kafka.dead_letter_topic", &self.dead_letter_topic)];
        let overrides = self.topics.iter().map(|(k, v)| (k.as_str(), v));
        for (key, t) in named.into_iter().chain(overrides) {
            if !crate::event::types::is_valid_topic(t) {
                out.push(KafkaProblem::InvalidTopic { key: key.to_owned(), topic: t.clone() });
            }
        }
        if let Some(m) = self.min_insync_replicas {
            if m < 1 || m > self.replication_factor {
                out.push(KafkaProblem::MinInsyncReplicas { value: m, replication_factor: self.replication_factor });
            }
        }
        let tls = &self.tls;
        if !tls.enabled {
            if !tls.ca_file.is_empty() || !tls.cert_file.is_empty() || !tls.key_file.is_empty() {
                out.push(KafkaProblem::TlsFilesWithoutTls);
            }
        } else {
            if tls.cert_file.is_empty() != tls.key_file.is_empty() {
                out.push(KafkaProblem::CertWithoutKey);
            }
            for (key, path) in [("ca_file", &tls.ca_file), ("cert_file", &tls.cert_file), ("key_file", &tls.key_file)] {
                if !path.is_empty() && !Path::new(path).is_file() {
                    out.push(KafkaProblem::UnreadableFile { key, path: path.clone() });
                }
            }
        }
        let sasl = &self.sasl;
        match sasl.mechanism {
            SaslMechanism::None if !sasl.username.is_empty() || !sasl.password_is_empty() => {
                out.push(KafkaProblem::SaslWithoutMechanism);
            }
            SaslMechanism::None => {}
            mechanism if sasl.username.is_empty() || sasl.password_is_empty() => {
                out.push(KafkaProblem::SaslIncomplete { mechanism });
            }
            _ => {}
        }
        for (k, v) in &self.librdkafka {
            if let Some(reason) = refused_property(k, v, ack, self) {
                out.push(KafkaProblem::RefusedProperty { property: k.clone(), reason });
            }
        }
        out
    }
}

/// Why a passthrough property is refused, if it is: properties that would break the promise behind
/// a 2xx (every event reaches Kafka, in order per key), or that the bridge sets from its own keys.
pub(crate) fn refused_property(key: &str, value: &str, ack: AckMode, kafka: &KafkaConfig) -> Option<String> {
    let v = value.trim().to_ascii_lowercase();
    let section_owned = |section: &str| format!("set by [{section}]; configure it there");
    match key.trim().to_ascii_lowercase().as_str() {
        "acks" | "request.required.acks" if !matches!(v.as_str(), "all" | "-1") => Some(
            "a 2xx promises the event is on every in-sync replica; the bridge produces with acks=all".into(),
        ),
        "enable.idempotence" if v != "true" => Some(
            "without idempotence a retried request can duplicate or reorder records of one key".into(),
        ),
        "max.in.flight.requests.per.connection" | "max.in.flight" if !v.parse::<u32>().is_ok_and(|n| n <= 5) => {
            Some("above 5 the idempotent producer cannot keep records of one key in order".into())
        }
        "message.timeout.ms" | "delivery.timeout.ms" if ack == AckMode::Spool => Some(
            "in spool mode the bridge sets it (30 s) and re-sends a timed-out record itself, before any later one of its key".into(),
        ),
        "transactional.id" => Some(
            "the bridge never commits a transaction: its records would stay invisible to read_committed consumers".into(),
        ),
        "partitioner" => Some("set by kafka.partitioner (a random partitioner would break per-key order)".into()),
        "enable.gapless.guarantee" if v == "true" => Some(
            "it makes every permanent error (a record too large) fatal for the producer instead of dead-lettering one event".into(),
        ),
        "bootstrap.servers" | "metadata.broker.list" => Some("set by kafka.brokers".into()),
        "statistics.interval.ms" => Some("the bridge's Kafka health reads librdkafka statistics every 2 s".into()),
        "security.protocol" if kafka.tls.enabled || kafka.sasl.mechanism != SaslMechanism::None => {
            Some(section_owned("kafka.tls] / [kafka.sasl"))
        }
        "sasl.mechanism" | "sasl.mechanisms" | "sasl.username" | "sasl.password"
            if kafka.sasl.mechanism != SaslMechanism::None =>
        {
            Some(section_owned("kafka.sasl"))
        }
        "ssl.ca.location" | "ssl.certificate.location" | "ssl.key.location" | "ssl.key.password" if kafka.tls.enabled => {
            Some(section_owned("kafka.tls"))
        }
        _ => None,
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

/// When the webhook answers 2xx (`delivery.ack`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AckMode {
    /// 2xx once the batch is fsync'd to the local spool.
    Spool,
    /// 2xx once Kafka acknowledged every event of the batch (`acks=all`).
    Kafka,
}

/// `[delivery]`: what a 2xx promises.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    /// `spool` (after the local fsync) or `kafka` (after Kafka acknowledged every event).
    pub ack: AckMode,
    /// In `kafka` mode: how long a request waits for Kafka before answering 503.
    pub kafka_ack_timeout_ms: u64,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self { ack: AckMode::Spool, kafka_ack_timeout_ms: 10_000 }
    }
}

/// `[spool]`: the segment log every accepted event is written to before the 2xx.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpoolConfig {
    /// The spool's directory; one per replica, held by one process at a time.
    pub dir: PathBuf,
    /// Bytes the spool keeps on disk at most (segments, delivered events included until their
    /// segment is deleted, and the dedup journal); past it the webhook answers 503, never drops.
    pub max_bytes: u64,
    /// An event id durably stored within this window is acknowledged but not stored again (a batch
    /// Huggy sends twice), unless another batch of its stream came in between. 19–39 bytes of memory
    /// per id, and 38–76 per stream remembered.
    pub dedup_window_secs: u64,
    /// Ids the dedup window holds at most, and streams (token, type, key) it remembers at most: the
    /// ceiling of its memory. At the ceiling the oldest are forgotten early, which costs at most a
    /// duplicate record of a late re-send, never an event.
    pub dedup_max_ids: usize,
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
            // 39 MB of ids and 76 MB of streams at most: an hour at 270 events/s.
            dedup_max_ids: DEFAULT_DEDUP_MAX_IDS,
            max_undelivered_age_secs: 900,
            stall_timeout_secs: 60,
        }
    }
}

/// `[files]`: capture of the files events point to, before their access tokens expire.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FilesConfig {
    /// Capture on or off; off, events are published without waiting for files.
    pub enabled: bool,
    /// Strings in an event that start with one of these are files to capture; nothing else is
    /// fetched. Each must end with `/`.
    pub allowed_url_prefixes: Vec<String>,
    /// Lifetime of a file URL's token: its deadline is the event's receipt plus this.
    pub token_ttl_secs: u64,
    /// Larger files are reported `failed`, and nothing of them is left in the store.
    pub max_file_bytes: u64,
    /// `file://path` or `s3://bucket/prefix`.
    pub store: String,
    /// Downloads running at once at least (the floor); more open under deadline pressure.
    pub concurrency: usize,
    /// Downloads running at once at most, however many files are at risk.
    pub max_concurrency: usize,
    /// Time allowed to connect to a file host.
    pub connect_timeout_ms: u64,
    /// A transfer that receives nothing for this long is abandoned (and retried while the token lives).
    pub idle_timeout_ms: u64,
    /// Bytes all downloads together may hold in memory (their upload buffers), whatever the
    /// concurrency: a download reserves its share (its size, at most one store part) before reading
    /// its body, and waits while the budget is spent. At least one S3 part (5 MiB).
    pub max_buffer_bytes: u64,
    /// `file://` stores: free space the captures leave on the store's filesystem. A file whose
    /// download would take the free space below this is reported `failed` (the event is still
    /// published). Unset: the spool's `spool.max_bytes` when the store is on the spool's
    /// filesystem (captures never take the room the spool may need), else 0.
    pub min_free_bytes: Option<u64>,
    /// `[files.s3]`: settings of an `s3://` store.
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
            max_buffer_bytes: 64 * 1024 * 1024,
            min_free_bytes: None,
            s3: S3Config::default(),
        }
    }
}

/// Settings for an `s3://` store; unset values fall back to the standard `AWS_*` environment.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct S3Config {
    /// Endpoint URL of an S3-compatible service (MinIO, R2, …); unset: `AWS_ENDPOINT`, else AWS.
    pub endpoint: Option<String>,
    /// The bucket's region.
    pub region: Option<String>,
    /// Access key id.
    #[serde(deserialize_with = "scalar_secret")]
    pub access_key_id: Option<Secret>,
    /// A file holding `access_key_id` (one trailing line break dropped).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access_key_id_file: Option<PathBuf>,
    /// Secret access key.
    #[serde(deserialize_with = "scalar_secret")]
    pub secret_access_key: Option<Secret>,
    /// A file holding `secret_access_key` (one trailing line break dropped).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_access_key_file: Option<PathBuf>,
    /// Allows a plain `http://` endpoint (local test services).
    pub allow_http: bool,
}

/// `[shutdown]`: how long stopping may take.
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

/// How log lines are written to stderr (`log.format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// JSON when stderr is not a terminal, human-readable otherwise.
    Auto,
    /// One JSON object per line, for log collectors.
    Json,
    /// Human-readable lines.
    Text,
}

/// `[log]`: log format and filter.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `json`, `text` or `auto`.
    pub format: LogFormat,
    /// A tracing filter; `RUST_LOG`, when set, wins.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { format: LogFormat::Auto, level: "info".into() }
    }
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

/// figment's errors, one per line, each naming the key as the user wrote it — the dotted key and
/// the file for a file, the variable for the environment — without figment's profile (`default.`).
fn describe_load_error(e: &figment::Error) -> String {
    let mut lines = Vec::new();
    for err in e.clone() {
        let key = err.path.join(".");
        let from_env = err.metadata.as_ref().is_some_and(|m| m.name.contains("environment variable"));
        let mut line = if key.is_empty() {
            err.kind.to_string()
        } else if from_env {
            format!("{ENV_PREFIX}{}: {}", err.path.join("__").to_ascii_uppercase(), err.kind)
        } else {
            format!("{key}: {}", err.kind)
        };
        match err.metadata.as_ref().and_then(|m| m.source.as_ref()) {
            Some(figment::Source::File(path)) => line.push_str(&format!(" (in {})", path.display())),
            Some(figment::Source::Custom(source)) if !from_env => line.push_str(&format!(" (in {source})")),
            _ if from_env && !key.is_empty() => line.push_str(&format!(" (the environment; the key is {key})")),
            _ => {}
        }
        lines.push(line);
    }
    lines.join("; ")
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

    /// Rejects values that would make the daemon misbehave rather than fail.
    ///
    /// # Errors
    /// The first setting found wrong (every `[kafka]` problem at once).
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if !self.huggy.has_tokens() {
            return Err(ConfigError::NoTokens);
        }
        self.validate_offline()
    }

    /// Every account has a company id of digits and at least one token, and no token is configured
    /// twice (in two accounts, or in an account and `huggy.tokens`): which company it speaks for
    /// must be clear.
    fn validate_accounts(&self) -> Result<(), ConfigError> {
        let mut seen: std::collections::HashSet<&str> = self.huggy.tokens.iter().map(Secret::expose).collect();
        for (index, a) in self.huggy.accounts.iter().enumerate() {
            let problem = |problem| Err(ConfigError::Account { index, problem });
            if a.company_id.is_empty() || a.company_id.len() > 40 || !a.company_id.bytes().all(|b| b.is_ascii_digit()) {
                return problem("company_id must be a company id (digits)");
            }
            if a.tokens.is_empty() {
                return problem("no tokens (tokens or tokens_file)");
            }
            for t in &a.tokens {
                if !seen.insert(t.expose()) {
                    return problem("a token is configured twice (in two accounts, or also in huggy.tokens)");
                }
            }
        }
        Ok(())
    }

    /// [`Config::validate`] without the webhook's tokens.
    ///
    /// # Errors
    /// As [`Config::validate`], except for missing tokens.
    pub(crate) fn validate_offline(&self) -> Result<(), ConfigError> {
        let positive = |key: &'static str, ok: bool| if ok { Ok(()) } else { Err(ConfigError::NotPositive { key }) };
        if !self.http.path.starts_with('/') {
            return Err(ConfigError::Malformed {
                key: "http.path",
                expected: "start with '/'",
                value: self.http.path.clone(),
            });
        }
        self.validate_accounts()?;
        positive("http.max_body_bytes", self.http.max_body_bytes > 0)?;
        if self.http.max_body_bytes > MAX_BODY_BYTES_CEILING {
            return Err(ConfigError::AboveCeiling {
                key: "http.max_body_bytes",
                value: self.http.max_body_bytes as u64,
                ceiling: MAX_BODY_BYTES_CEILING as u64,
                reason: "an event that large would not fit one spool frame (256 MiB with the event's metadata), \
                         and a frame over the limit reads back as damage",
            });
        }
        if self.http.max_inflight_bytes < self.http.max_body_bytes {
            return Err(ConfigError::BelowBound {
                key: "http.max_inflight_bytes",
                value: self.http.max_inflight_bytes as u64,
                bound_key: "http.max_body_bytes",
                bound: self.http.max_body_bytes as u64,
                reason: "a body of the largest accepted size could never be read",
            });
        }
        positive("http.max_connections", self.http.max_connections > 0)?;
        if self.http.tls.enabled() {
            for (key, value) in
                [("http.tls.cert_file", &self.http.tls.cert_file), ("http.tls.key_file", &self.http.tls.key_file)]
            {
                if value.is_empty() {
                    return Err(ConfigError::Empty { key });
                }
            }
        }
        if self.http.listen == self.admin.listen {
            return Err(ConfigError::SameListenAddress);
        }
        if self.kafka.brokers.trim().is_empty() {
            return Err(ConfigError::Empty { key: "kafka.brokers" });
        }
        let kafka_problems = self.kafka.problems(self.delivery.ack);
        if !kafka_problems.is_empty() {
            return Err(ConfigError::Kafka(kafka_problems));
        }
        for ty in self.kafka.topics.keys() {
            if crate::event::KnownType::parse_ignore_case(ty).is_none() {
                return Err(ConfigError::UnknownEventType { name: ty.clone() });
            }
        }
        positive("kafka.partitions", self.kafka.partitions >= 1)?;
        positive("kafka.replication_factor", self.kafka.replication_factor >= 1)?;
        positive("kafka.max_in_flight_records", self.kafka.max_in_flight_records > 0)?;
        positive("spool.max_bytes", self.spool.max_bytes > 0)?;
        positive("spool.dedup_max_ids", self.spool.dedup_max_ids > 0)?;
        if self.delivery.ack == AckMode::Spool && self.spool.max_bytes < self.http.max_body_bytes as u64 {
            return Err(ConfigError::BelowBound {
                key: "spool.max_bytes",
                value: self.spool.max_bytes,
                bound_key: "http.max_body_bytes",
                bound: self.http.max_body_bytes as u64,
                reason: "a batch of the largest accepted size could never be stored",
            });
        }
        if self.files.enabled {
            if self.spool.max_undelivered_age_secs <= self.files.token_ttl_secs {
                return Err(ConfigError::AgeWithinTokenTtl {
                    max_undelivered_age_secs: self.spool.max_undelivered_age_secs,
                    token_ttl_secs: self.files.token_ttl_secs,
                });
            }
            positive("files.concurrency", self.files.concurrency > 0)?;
            if !(self.files.store.starts_with("file://") || self.files.store.starts_with("s3://")) {
                return Err(ConfigError::Malformed {
                    key: "files.store",
                    expected: "be file://… or s3://…",
                    value: self.files.store.clone(),
                });
            }
            if self.files.max_concurrency < self.files.concurrency {
                return Err(ConfigError::BelowBound {
                    key: "files.max_concurrency",
                    value: self.files.max_concurrency as u64,
                    bound_key: "files.concurrency",
                    bound: self.files.concurrency as u64,
                    reason: "the floor cannot be above the ceiling",
                });
            }
            if self.files.max_buffer_bytes < MIN_BUFFER_BYTES {
                return Err(ConfigError::Malformed {
                    key: "files.max_buffer_bytes",
                    expected: "be at least 5242880 (one S3 multipart part)",
                    value: self.files.max_buffer_bytes.to_string(),
                });
            }
            for p in &self.files.allowed_url_prefixes {
                if let Err(source) = prefix::Prefix::parse(p) {
                    return Err(ConfigError::UrlPrefix { prefix: p.clone(), source });
                }
            }
        }
        Ok(())
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

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return figment::Error
mod tests {
    use super::*;
    use figment::Jail;

    /// The error and its causes, as the binary prints them.
    fn message(e: &ConfigError) -> String {
        let mut out = e.to_string();
        let mut cause = std::error::Error::source(e);
        while let Some(c) = cause {
            out = format!("{out}: {c}");
            cause = c.source();
        }
        out
    }

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
            let err = message(&Config::load(Some(Path::new("c.toml"))).unwrap_err());
            assert!(err.contains("kafka.brokerz: unknown field") && err.contains("c.toml"), "{err}");
            assert!(!err.contains("default."), "no figment profile: {err}");
            Ok(())
        });
    }

    #[test]
    fn string_settings_from_the_environment_are_never_coerced() {
        Jail::expect_with(|jail| {
            jail.set_env("HUGGY_BRIDGE_HUGGY__TOKENS", "t");
            jail.set_env("HUGGY_BRIDGE_KAFKA__SASL__MECHANISM", "PLAIN");
            jail.set_env("HUGGY_BRIDGE_KAFKA__SASL__USERNAME", "0123");
            jail.set_env("HUGGY_BRIDGE_KAFKA__SASL__PASSWORD", "true");
            jail.set_env("HUGGY_BRIDGE_KAFKA__FALLBACK_TOPIC", "007");
            jail.set_env("HUGGY_BRIDGE_KAFKA__TOPICS__RECEIVEDMESSAGE", "1e3");
            jail.set_env("HUGGY_BRIDGE_KAFKA__LIBRDKAFKA__CLIENT__RACK", "0042");
            jail.set_env("HUGGY_BRIDGE_KAFKA__LIBRDKAFKA__SOCKET__KEEPALIVE__ENABLE", "true");
            jail.set_env("HUGGY_BRIDGE_HTTP__PATH", "/0123");
            jail.set_env("HUGGY_BRIDGE_LOG__LEVEL", "true");
            // Numbers and booleans still parse for settings that are numbers and booleans.
            jail.set_env("HUGGY_BRIDGE_KAFKA__PARTITIONS", "12");
            jail.set_env("HUGGY_BRIDGE_KAFKA__TLS__ENABLED", "false");
            jail.set_env("HUGGY_BRIDGE_FILES__ALLOWED_URL_PREFIXES", "[\"https://a.example/\"]");
            let cfg = Config::load(None).expect("loads");
            assert_eq!(cfg.kafka.sasl.username, "0123");
            assert_eq!(cfg.kafka.sasl.password.as_ref().map(Secret::expose), Some("true"));
            assert_eq!(cfg.kafka.fallback_topic, "007");
            assert_eq!(
                cfg.kafka.topics.get("receivedMessage").or(cfg.kafka.topics.get("receivedmessage")).map(String::as_str),
                Some("1e3")
            );
            assert_eq!(cfg.kafka.librdkafka.get("client.rack").map(String::as_str), Some("0042"));
            assert_eq!(cfg.kafka.librdkafka.get("socket.keepalive.enable").map(String::as_str), Some("true"));
            assert_eq!(cfg.http.path, "/0123");
            assert_eq!(cfg.log.level, "true");
            assert_eq!(cfg.kafka.partitions, 12);
            assert!(!cfg.kafka.tls.enabled);
            assert_eq!(cfg.files.allowed_url_prefixes, ["https://a.example/"]);
            Ok(())
        });
    }

    #[test]
    fn errors_from_the_environment_name_the_variable() {
        Jail::expect_with(|jail| {
            jail.set_env("HUGGY_BRIDGE_HUGGY__TOKENS", "t");
            jail.set_env("HUGGY_BRIDGE_KAFKA__PARTITIONS", "six");
            let err = message(&Config::load(None).unwrap_err());
            assert!(err.contains("HUGGY_BRIDGE_KAFKA__PARTITIONS: invalid type"), "{err}");
            assert!(err.contains("the key is kafka.partitions"), "{err}");
            jail.set_env("HUGGY_BRIDGE_KAFKA__PARTITIONS", "6");
            jail.set_env("HUGGY_BRIDGE_SPOOL__MAX_BYTEZ", "1");
            let err = message(&Config::load(None).unwrap_err());
            assert!(err.contains("HUGGY_BRIDGE_SPOOL__MAX_BYTEZ: unknown field"), "{err}");
            assert!(!err.contains("default."), "{err}");
            Ok(())
        });
    }

    #[test]
    fn a_listen_address_without_a_host_means_every_interface() {
        Jail::expect_with(|jail| {
            jail.create_file("c.toml", "[huggy]\ntokens=[\"t\"]\n[http]\nlisten = \":8080\"\n")?;
            jail.set_env("HUGGY_BRIDGE_ADMIN__LISTEN", ":9090");
            let cfg = Config::load(Some(Path::new("c.toml"))).expect("loads");
            assert_eq!(cfg.http.listen, SocketAddr::from(([0, 0, 0, 0], 8080)));
            assert_eq!(cfg.admin.listen, SocketAddr::from(([0, 0, 0, 0], 9090)));
            jail.set_env("HUGGY_BRIDGE_ADMIN__LISTEN", "[::1]:9091");
            assert_eq!(Config::load(Some(Path::new("c.toml"))).expect("loads").admin.listen.port(), 9091);
            jail.set_env("HUGGY_BRIDGE_ADMIN__LISTEN", ":http");
            let err = message(&Config::load(Some(Path::new("c.toml"))).unwrap_err());
            assert!(err.contains("HUGGY_BRIDGE_ADMIN__LISTEN") && err.contains("\":http\""), "{err}");
            Ok(())
        });
    }

    #[test]
    fn the_tls_pair_is_both_files_or_neither() {
        let mut cfg = Config::default();
        cfg.huggy.tokens = vec![Secret::new("t")];
        assert!(!cfg.http.tls.enabled());
        cfg.validate().expect("plain HTTP");
        cfg.check_tls_pair().expect("nothing to check without [http.tls]");
        cfg.http.tls.cert_file = "cert.pem".into();
        assert_eq!(cfg.validate().unwrap_err().to_string(), "invalid configuration: http.tls.key_file is empty");
        cfg.http.tls = HttpTlsConfig { cert_file: String::new(), key_file: "key.pem".into() };
        assert_eq!(cfg.validate().unwrap_err().to_string(), "invalid configuration: http.tls.cert_file is empty");
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
            let err = message(&Config::load(None).unwrap_err());
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
        let body = cfg.http.max_body_bytes;
        cfg.http.max_body_bytes = MAX_BODY_BYTES_CEILING + 1;
        cfg.http.max_inflight_bytes = usize::MAX;
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("http.max_body_bytes") && err.contains("must be at most 134217728"), "{err}");
        assert!(err.contains("spool frame"), "the reason is given: {err}");
        cfg.http.max_body_bytes = MAX_BODY_BYTES_CEILING;
        cfg.spool.max_bytes = u64::MAX;
        assert!(cfg.validate().is_ok(), "the ceiling itself is accepted");
        cfg.spool.max_bytes = 1024 * 1024 * 1024;
        cfg.http.max_body_bytes = body;
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
        let err = message(&cfg.validate().unwrap_err());
        assert!(err.contains("must end with '/'") && err.contains("\"https://files.huggy.app/\""), "{err}");
        cfg.files.allowed_url_prefixes = vec!["https://files.huggy.app@evil.com/".into()];
        assert!(message(&cfg.validate().unwrap_err()).contains("user information"));
        cfg.files.allowed_url_prefixes = vec!["https://files.huggy.app/".into()];
        cfg.validate().expect("a prefix ending in a slash is fine");
        cfg.files.max_concurrency = 8;
        assert!(cfg.validate().unwrap_err().to_string().contains("files.max_concurrency (8)"));
    }

    #[test]
    fn a_capture_buffer_budget_below_one_part_is_refused() {
        let mut cfg = Config::default();
        cfg.huggy.tokens = vec![Secret::new("t")];
        cfg.files.max_buffer_bytes = 5 * 1024 * 1024 - 1;
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("files.max_buffer_bytes") && err.contains("5242880"), "{err}");
        cfg.files.max_buffer_bytes = 5 * 1024 * 1024;
        cfg.validate().expect("one part is enough");
    }

    fn with_token() -> Config {
        let mut cfg = Config::default();
        cfg.huggy.tokens = vec![Secret::new("t")];
        cfg
    }

    #[test]
    fn tls_and_sasl_load_from_toml_and_the_password_from_the_environment_redacted() {
        Jail::expect_with(|jail| {
            jail.create_file("ca.pem", "not checked here")?;
            jail.create_file(
                "bridge.toml",
                r#"
                [huggy]
                tokens = ["t"]
                [kafka]
                brokers = "b-1.msk:9096"
                [kafka.tls]
                enabled = true
                ca_file = "ca.pem"
                [kafka.sasl]
                mechanism = "scram-sha-512"
                username = "bridge"
                "#,
            )?;
            jail.set_env("HUGGY_BRIDGE_KAFKA__SASL__PASSWORD", "[0123456789]");
            let cfg = Config::load(Some(Path::new("bridge.toml"))).expect("loads");
            assert_eq!(cfg.kafka.sasl.mechanism, SaslMechanism::ScramSha512);
            let password = cfg.kafka.sasl.password.as_ref().map(Secret::expose);
            assert_eq!(password, Some("[0123456789]"), "taken as it is, not as a TOML array");
            assert_eq!(cfg.kafka.security_protocol(), Some("sasl_ssl"));
            let printed = cfg.to_redacted_toml();
            assert!(!printed.contains("0123456789"), "{printed}");
            assert!(printed.contains("mechanism = \"SCRAM-SHA-512\""), "{printed}");
            assert!(!format!("{cfg:?}").contains("0123456789"), "Debug redacts too");
            Ok(())
        });
    }

    #[test]
    fn librdkafka_properties_from_the_environment_and_dotted_toml_keys() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "c.toml",
                "[huggy]\ntokens=[\"t\"]\n[kafka.librdkafka]\n\"linger.ms\" = \"7\"\nsocket.timeout.ms = 30000\n",
            )?;
            jail.set_env("HUGGY_BRIDGE_KAFKA__LIBRDKAFKA__SOCKET__KEEPALIVE__ENABLE", "true");
            jail.set_env("HUGGY_BRIDGE_KAFKA__LIBRDKAFKA__SASL__OAUTHBEARER__CLIENT__SECRET", "hunter2");
            let cfg = Config::load(Some(Path::new("c.toml"))).expect("loads");
            let p = &cfg.kafka.librdkafka;
            assert_eq!(p.get("linger.ms").map(String::as_str), Some("7"));
            assert_eq!(p.get("socket.timeout.ms").map(String::as_str), Some("30000"));
            assert_eq!(p.get("socket.keepalive.enable").map(String::as_str), Some("true"));
            assert_eq!(p.get("sasl.oauthbearer.client.secret").map(String::as_str), Some("hunter2"));
            assert!(!cfg.to_redacted_toml().contains("hunter2"));
            Ok(())
        });
    }

    #[test]
    fn the_passthrough_guard_refuses_what_breaks_the_2xx_promise_naming_property_and_reason() {
        let refused = [
            ("acks", "1", "acks=all"),
            ("request.required.acks", "0", "acks=all"),
            ("enable.idempotence", "false", "idempotence"),
            ("max.in.flight.requests.per.connection", "6", "above 5"),
            ("max.in.flight", "100", "above 5"),
            ("message.timeout.ms", "30000", "re-sends a timed-out record"),
            ("delivery.timeout.ms", "30000", "re-sends a timed-out record"),
            ("transactional.id", "bridge-1", "transaction"),
            ("partitioner", "random", "per-key order"),
            ("bootstrap.servers", "x:9092", "kafka.brokers"),
        ];
        for (k, v, why) in refused {
            let mut cfg = with_token();
            cfg.kafka.librdkafka.insert(k.into(), v.into());
            let e = cfg.validate().unwrap_err().to_string();
            assert!(e.contains(&format!("kafka.librdkafka.{k} is refused")) && e.contains(why), "{k}={v}: {e}");
        }
        let allowed = [("acks", "all"), ("max.in.flight.requests.per.connection", "5"), ("linger.ms", "50")];
        for (k, v) in allowed {
            let mut cfg = with_token();
            cfg.kafka.librdkafka.insert(k.into(), v.into());
            cfg.validate().unwrap_or_else(|e| panic!("{k}={v}: {e}"));
        }
        let mut cfg = with_token();
        cfg.delivery.ack = AckMode::Kafka;
        cfg.kafka.librdkafka.insert("message.timeout.ms".into(), "5000".into());
        cfg.validate().expect("kafka mode: a message timeout only makes a 503 earlier");
    }

    #[test]
    fn the_passthrough_cannot_contradict_the_tls_and_sasl_sections() {
        let mut cfg = with_token();
        cfg.kafka.sasl.mechanism = SaslMechanism::Plain;
        cfg.kafka.sasl.username = "u".into();
        cfg.kafka.sasl.password = Some(Secret::new("p"));
        cfg.kafka.librdkafka.insert("sasl.password".into(), "other".into());
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains("kafka.librdkafka.sasl.password is refused") && e.contains("[kafka.sasl]"), "{e}");
        assert!(!e.contains("other"), "{e}");
        let mut cfg = with_token();
        cfg.kafka.librdkafka.insert("security.protocol".into(), "sasl_ssl".into());
        cfg.kafka.librdkafka.insert("sasl.mechanism".into(), "OAUTHBEARER".into());
        cfg.validate().expect("without the sections, the passthrough may configure other mechanisms");
    }

    #[test]
    fn tls_and_sasl_settings_are_checked() {
        let mut cfg = with_token();
        cfg.kafka.tls.ca_file = "ca.pem".into();
        assert!(cfg.validate().unwrap_err().to_string().contains("kafka.tls.enabled is false"));
        cfg.kafka.tls.enabled = true;
        cfg.kafka.tls.ca_file = "/nonexistent/ca.pem".into();
        assert!(cfg.validate().unwrap_err().to_string().contains("kafka.tls.ca_file"));
        cfg.kafka.tls.ca_file.clear();
        cfg.kafka.tls.cert_file = "/nonexistent/client.pem".into();
        assert!(cfg.validate().unwrap_err().to_string().contains("go together"));
        cfg.kafka.tls.cert_file.clear();
        cfg.validate().expect("TLS with the system roots");
        cfg.kafka.sasl.mechanism = SaslMechanism::ScramSha256;
        cfg.kafka.sasl.username = "u".into();
        assert!(cfg.validate().unwrap_err().to_string().contains("needs username and password"));
        cfg.kafka.sasl.password = Some(Secret::new("p"));
        cfg.validate().expect("complete");
    }

    #[test]
    fn an_unsupported_sasl_mechanism_is_named() {
        Jail::expect_with(|jail| {
            jail.set_env("HUGGY_BRIDGE_HUGGY__TOKENS", "t");
            jail.set_env("HUGGY_BRIDGE_KAFKA__SASL__MECHANISM", "GSSAPI");
            let e = message(&Config::load(None).unwrap_err());
            assert!(e.contains("GSSAPI") && e.contains("SCRAM-SHA-512"), "{e}");
            Ok(())
        });
    }

    #[test]
    fn topic_names_from_the_template_and_overrides_follow_kafka_rules() {
        let mut cfg = with_token();
        cfg.kafka.topic_template = "huggy/{event}".into();
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains("kafka.topic_template makes \"huggy/"), "{e}");
        cfg.kafka.topic_template = format!("{}{{event}}", "x".repeat(240));
        assert!(cfg.validate().is_err(), "longer than 249 for some type");
        cfg.kafka.topic_template = "huggy.{event}".into();
        cfg.kafka.dead_letter_topic = "..".into();
        assert!(cfg.validate().unwrap_err().to_string().contains("kafka.dead_letter_topic"));
        cfg.kafka.dead_letter_topic = "huggy.dead-letter".into();
        cfg.kafka.topics.insert("receivedMessage".into(), "chat inbound".into());
        assert!(cfg.validate().unwrap_err().to_string().contains("receivedMessage"));
    }

    #[test]
    fn min_insync_replicas_must_fit_the_replication_factor() {
        let mut cfg = with_token();
        cfg.kafka.replication_factor = 3;
        cfg.kafka.min_insync_replicas = Some(4);
        assert!(cfg.validate().unwrap_err().to_string().contains("kafka.min_insync_replicas"));
        cfg.kafka.min_insync_replicas = Some(3);
        cfg.validate().expect("fits");
    }

    #[test]
    fn the_partitioner_defaults_to_murmur2_random_and_only_keyed_partitioners_are_accepted() {
        assert_eq!(Config::default().kafka.partitioner, Partitioner::Murmur2Random);
        Jail::expect_with(|jail| {
            jail.set_env("HUGGY_BRIDGE_KAFKA__PARTITIONER", "Consistent_Random");
            assert_eq!(Config::load_offline(None).expect("loads").kafka.partitioner, Partitioner::ConsistentRandom);
            jail.set_env("HUGGY_BRIDGE_KAFKA__PARTITIONER", "random");
            let e = message(&Config::load_offline(None).unwrap_err());
            assert!(e.contains("per-key order") && e.contains("murmur2_random"), "{e}");
            jail.set_env("HUGGY_BRIDGE_KAFKA__PARTITIONER", "crc32");
            assert!(message(&Config::load_offline(None).unwrap_err()).contains("unsupported partitioner"));
            Ok(())
        });
        let mut cfg = with_token();
        cfg.kafka.librdkafka.insert("partitioner".into(), "murmur2".into());
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains("kafka.librdkafka.partitioner is refused") && e.contains("kafka.partitioner"), "{e}");
    }

    #[test]
    fn offline_commands_need_no_webhook_tokens() {
        Jail::expect_with(|jail| {
            jail.set_env("HUGGY_BRIDGE_KAFKA__BROKERS", "k1:9092");
            assert!(Config::load(None).is_err());
            let cfg = Config::load_offline(None).expect("no tokens needed");
            assert_eq!(cfg.kafka.brokers, "k1:9092");
            jail.set_env("HUGGY_BRIDGE_KAFKA__LIBRDKAFKA__ACKS", "1");
            assert!(Config::load_offline(None).unwrap_err().to_string().contains("acks"));
            Ok(())
        });
    }

    #[test]
    fn accounts_bind_tokens_to_a_company_from_the_file_or_the_list() {
        Jail::expect_with(|jail| {
            jail.create_file("account-b.tokens", "b-1\n\n  b-2  \n")?;
            jail.create_file(
                "c.toml",
                r#"
                [huggy]
                tokens = ["plain"]
                [[huggy.accounts]]
                company_id = 15693
                tokens = ["a-1"]
                [[huggy.accounts]]
                company_id = "20001"
                tokens_file = "account-b.tokens"
                "#,
            )?;
            let cfg = Config::load(Some(Path::new("c.toml"))).expect("valid");
            let accounts = &cfg.huggy.accounts;
            assert_eq!((accounts[0].company_id.as_str(), accounts[1].company_id.as_str()), ("15693", "20001"));
            let b: Vec<&str> = accounts[1].tokens.iter().map(Secret::expose).collect();
            assert_eq!(b, ["b-1", "b-2"], "one token a line, exactly");
            let shown = toml::to_string(&cfg).unwrap_or_default() + &format!("{cfg:?}");
            assert!(!shown.contains("a-1") && !shown.contains("b-2"), "tokens never printed");

            jail.create_file("only-accounts.toml", "[[huggy.accounts]]\ncompany_id = 1\ntokens = [\"x\"]\n")?;
            assert!(Config::load(Some(Path::new("only-accounts.toml"))).is_ok(), "accounts alone are tokens enough");
            for (toml, expected) in [
                ("[huggy]\ntokens = [\"y\"]\n[[huggy.accounts]]\ncompany_id = 1\n", "no tokens"),
                ("[[huggy.accounts]]\ncompany_id = \"x1\"\ntokens = [\"x\"]\n", "company_id must be"),
                (
                    "[huggy]\ntokens = [\"x\"]\n[[huggy.accounts]]\ncompany_id = 1\ntokens = [\"x\"]\n",
                    "configured twice",
                ),
                ("[[huggy.accounts]]\ncompany_id = 1\ntokens_file = \"missing.tokens\"\n", "tokens_file"),
            ] {
                jail.create_file("bad.toml", toml)?;
                let err = message(&Config::load(Some(Path::new("bad.toml"))).unwrap_err());
                assert!(err.contains(expected) && !err.contains("\"x\""), "{toml}: {err}");
            }
            Ok(())
        });
    }
}
