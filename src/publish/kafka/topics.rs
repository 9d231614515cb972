//! Topic provisioning: every topic the configuration routes to, and `topics create`.

use std::collections::BTreeSet;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use super::{apply_passthrough, client_config};
use crate::config::Config;

/// Every topic the configuration can route to: each known type's topic, the fallback and the
/// dead-letter topic.
pub fn routable_topics(cfg: &Config) -> BTreeSet<String> {
    let routes = crate::publish::Routes::new(&cfg.kafka);
    let mut topics: BTreeSet<String> = crate::event::KnownType::ALL
        .iter()
        .map(|k| routes.topic_for(&crate::event::EventType::Known(*k)).to_owned())
        .collect();
    topics.insert(cfg.kafka.fallback_topic.clone());
    topics.insert(cfg.kafka.dead_letter_topic.clone());
    topics
}

/// Outcome of `topics create` for one topic.
#[derive(Debug, PartialEq, Eq)]
pub enum TopicOutcome {
    /// The topic was made now.
    Created,
    /// The topic was there already; its settings were left alone.
    Existed,
}

/// Why `topics create` failed.
#[derive(Debug, thiserror::Error)]
pub enum TopicsError {
    /// The admin client could not be made (configuration, TLS files).
    #[error("cannot create the Kafka admin client")]
    Client(#[source] KafkaError),
    /// The request as a whole failed (no broker answered, not authorized).
    #[error("the create-topics request failed")]
    Request(#[source] KafkaError),
    /// No answer within `kafka.request_timeout_ms`.
    #[error("no answer from the brokers within kafka.request_timeout_ms ({0} ms)")]
    Timeout(u64),
    /// Topics the brokers refused, each with its error code.
    #[error("topics not created: {}", .0.iter().map(|(t, c)| format!("{t}: {c} ({c:?})")).collect::<Vec<_>>().join(", "))]
    Refused(Vec<(String, RDKafkaErrorCode)>),
}

/// Creates every routable topic with the configured partitions, replication and
/// `min.insync.replicas`; existing topics are left as they are.
///
/// # Errors
/// The admin request failed, or a topic could not be created for another reason than existing.
pub async fn create_topics(cfg: &Config, bootstrap: &str) -> Result<Vec<(String, TopicOutcome)>, TopicsError> {
    let mut cc = client_config(&cfg.kafka, bootstrap);
    apply_passthrough(&mut cc, &cfg.kafka);
    let admin: AdminClient<DefaultClientContext> = cc.create().map_err(TopicsError::Client)?;
    let topics = routable_topics(cfg);
    let min_insync = cfg.kafka.effective_min_insync_replicas().map(|m| m.to_string());
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| {
            let topic = NewTopic::new(t, cfg.kafka.partitions, TopicReplication::Fixed(cfg.kafka.replication_factor));
            match &min_insync {
                Some(m) => topic.set("min.insync.replicas", m),
                None => topic,
            }
        })
        .collect();
    // The request timeout covers finding a broker too (librdkafka's default is socket.timeout.ms,
    // 60 s); the operation timeout is how long the controller may take. The outer timeout is a
    // backstop in case librdkafka does not answer at all.
    let timeout = Duration::from_millis(cfg.kafka.request_timeout_ms);
    let opts = AdminOptions::new().request_timeout(Some(timeout)).operation_timeout(Some(timeout));
    let results = tokio::time::timeout(timeout + Duration::from_secs(1), admin.create_topics(&new, &opts))
        .await
        .map_err(|_| TopicsError::Timeout(cfg.kafka.request_timeout_ms))?
        .map_err(|e| match e {
            KafkaError::AdminOp(RDKafkaErrorCode::OperationTimedOut) => {
                TopicsError::Timeout(cfg.kafka.request_timeout_ms)
            }
            other => TopicsError::Request(other),
        })?;
    let mut out = Vec::new();
    let mut failures = Vec::new();
    for r in results {
        match r {
            Ok(t) => out.push((t, TopicOutcome::Created)),
            Err((t, RDKafkaErrorCode::TopicAlreadyExists)) => out.push((t, TopicOutcome::Existed)),
            Err((t, code)) => failures.push((t, code)),
        }
    }
    if failures.is_empty() {
        Ok(out)
    } else {
        Err(TopicsError::Refused(failures))
    }
}

#[cfg(test)]
mod tests {
    use crate::config::KafkaConfig;

    #[test]
    fn min_insync_replicas_defaults_to_two_from_replication_factor_three() {
        let mut k = KafkaConfig::default();
        assert_eq!(k.effective_min_insync_replicas(), None);
        k.replication_factor = 3;
        assert_eq!(k.effective_min_insync_replicas(), Some(2));
        k.min_insync_replicas = Some(3);
        assert_eq!(k.effective_min_insync_replicas(), Some(3));
    }
}
