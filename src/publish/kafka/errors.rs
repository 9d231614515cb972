//! What a Kafka error means for the record that met it (retry classification), and the error code
//! label of the publish errors counter.

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

/// What an error means for the record that met it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ErrorClass {
    /// Kafka can never take this record on its topic: dead-letter it.
    Permanent,
    /// An ACL is missing: the operator's mistake, not the event's. Retry (with backoff) and alert;
    /// never dead-letter.
    Authorization,
    /// The producer instance is broken for good (fenced, sequence desynchronised): replace it and
    /// retry the record with the new one.
    Fatal,
    /// Not now: retry.
    Transient,
}

/// Classifies an error of a send or a delivery report.
pub(crate) fn classify(err: &KafkaError) -> ErrorClass {
    use RDKafkaErrorCode::*;
    match err.rdkafka_error_code() {
        Some(
            MessageSizeTooLarge
            | InvalidMessageSize
            | MessageBatchTooLarge
            | InvalidRecord
            | InvalidMessage
            | InvalidTopic
            | PolicyViolation
            | UnsupportedCompressionType,
        ) => ErrorClass::Permanent,
        Some(
            TopicAuthorizationFailed
            | ClusterAuthorizationFailed
            | TransactionalIdAuthorizationFailed
            | SaslAuthenticationFailed
            | Authentication,
        ) => ErrorClass::Authorization,
        Some(Fatal | Fenced | ProducerFenced) => ErrorClass::Fatal,
        _ => ErrorClass::Transient,
    }
}

/// Whether an error means the record can never be written to its topic (dead-letter it) rather than
/// "not now" (keep it and try again).
pub(crate) fn is_permanent(err: &KafkaError) -> bool {
    classify(err) == ErrorClass::Permanent
}

/// The `code` label of `huggy_bridge_publish_errors_total`: the `RDKafkaErrorCode` name, or
/// `Unknown` for an error that carries none.
pub(crate) fn error_code_label(err: &KafkaError) -> String {
    err.rdkafka_error_code().map_or_else(|| "Unknown".to_owned(), |c| format!("{c:?}"))
}

/// librdkafka's "queue full" when enqueueing: wait and try again.
pub(crate) fn is_queue_full(err: &KafkaError) -> bool {
    matches!(err.rdkafka_error_code(), Some(RDKafkaErrorCode::QueueFull))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(code: RDKafkaErrorCode) -> KafkaError {
        KafkaError::MessageProduction(code)
    }

    #[test]
    fn authorization_errors_are_retried_never_dead_lettered() {
        for code in [RDKafkaErrorCode::TopicAuthorizationFailed, RDKafkaErrorCode::ClusterAuthorizationFailed] {
            assert_eq!(classify(&err(code)), ErrorClass::Authorization, "{code:?}");
            assert!(!is_permanent(&err(code)), "{code:?} must not dead-letter");
        }
    }

    #[test]
    fn errors_are_classified_by_code() {
        use RDKafkaErrorCode::*;
        for c in [MessageSizeTooLarge, InvalidTopic, PolicyViolation, InvalidRecord] {
            assert_eq!(classify(&err(c)), ErrorClass::Permanent, "{c:?}");
        }
        for c in [Fatal, Fenced, ProducerFenced] {
            assert_eq!(classify(&err(c)), ErrorClass::Fatal, "{c:?}");
        }
        for c in [MessageTimedOut, NotEnoughReplicas, AllBrokersDown, RequestTimedOut, PurgeQueue] {
            assert_eq!(classify(&err(c)), ErrorClass::Transient, "{c:?}");
        }
        assert_eq!(classify(&KafkaError::Canceled), ErrorClass::Transient);
        assert!(is_queue_full(&err(QueueFull)));
    }

    #[test]
    fn the_error_code_label_is_the_rdkafka_error_code_name() {
        assert_eq!(error_code_label(&err(RDKafkaErrorCode::TopicAuthorizationFailed)), "TopicAuthorizationFailed");
        assert_eq!(error_code_label(&KafkaError::Canceled), "Unknown");
        for seeded in crate::metrics::PUBLISH_ERROR_CODES {
            assert!(!seeded.contains(' '), "{seeded}");
        }
    }
}
