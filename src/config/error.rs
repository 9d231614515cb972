//! Why a configuration is refused: [`ConfigError`], whose message names the key as the user wrote
//! it, and [`KafkaProblem`], the problems with `[kafka]`, reported all at once.

use std::path::PathBuf;

use super::prefix::PrefixError;
use super::{SaslMechanism, ENV_PREFIX};

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
        source: PrefixError,
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
