use rdkafka::error::KafkaError;

use super::*;
use crate::event::{Event, EventId, EventType, KnownType};
use crate::spool::Stored;

pub(super) fn stored(seq: u64, key: &str, files: bool) -> Stored {
    Stored {
        seq,
        received_at: 0,
        event: Event {
            id: EventId([seq as u8; 16]),
            event_type: EventType::Known(KnownType::ReceivedMessage),
            original_type: None,
            key: Some(key.to_owned()),
            company: None,
            time: 0,
            value: br#"{"a":1}"#.to_vec(),
            dead_letter: None,
            files: if files { vec!["https://files.huggy.app/x".into()] } else { Vec::new() },
            file_results: None,
            lineage: None,
            routing: Default::default(),
        },
    }
}

#[test]
fn retry_reasons_keep_the_kafka_error_as_their_source() {
    use std::error::Error as _;
    let e = KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::TopicAuthorizationFailed);
    let why = RetryReason::Authorization(e.clone());
    assert!(why.to_string().contains("not authorized"), "{why}");
    let source = why.source().expect("a source").to_string();
    assert_eq!(source, e.to_string());
}
