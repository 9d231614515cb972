//! `[kafka]`, `[kafka.tls]` and `[kafka.sasl]`: brokers, topics, security, and the librdkafka
//! properties passed through (redacted when printed). What `[kafka]` may not hold is checked in
//! `validate`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::scalar::{scalar_secret, scalar_string, Scalar};
use super::secrets::REDACTED;
use super::Secret;

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
    /// those [`refused_property`](super::validate::refused_property) names. Nested tables are flattened with dots, so
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
    pub(super) fn password_is_empty(&self) -> bool {
        self.password.as_ref().is_none_or(|p| p.expose().is_empty())
    }
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
