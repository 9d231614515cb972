//! Topic routing: which topic an event's record goes to, worked out once from the configuration.

use std::collections::BTreeMap;

use crate::config::KafkaConfig;
use crate::event::{EventType, KnownType};

/// Topic routing from the configuration, worked out once: a record's topic is a lookup.
#[derive(Debug, Clone)]
pub(crate) struct Routes {
    /// The topic of each known type, at its position in [`KnownType::ALL`].
    known: Vec<String>,
    fallback: String,
    pub(super) dead_letter: String,
}

impl Routes {
    pub(crate) fn new(cfg: &KafkaConfig) -> Self {
        // Keyed by the canonical type name: keys from the environment arrive lowercased.
        let overrides: BTreeMap<&'static str, &String> =
            cfg.topics.iter().filter_map(|(k, v)| KnownType::parse_ignore_case(k).map(|t| (t.as_str(), v))).collect();
        Routes {
            known: KnownType::ALL
                .iter()
                .map(|k| match overrides.get(k.as_str()) {
                    Some(topic) => (*topic).clone(),
                    None => cfg.topic_template.replace("{event}", k.as_str()),
                })
                .collect(),
            fallback: cfg.fallback_topic.clone(),
            dead_letter: cfg.dead_letter_topic.clone(),
        }
    }

    /// `kafka.topics.<type>` if set, else the template for known types, else the fallback topic.
    pub(crate) fn topic_for(&self, t: &EventType) -> &str {
        match t {
            EventType::Known(k) => &self.known[*k as usize],
            EventType::Unknown(_) => &self.fallback,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::event::tests::{batch, fixture, split_as_sent, EXPECTED};
    use crate::event::{EventId, Source};

    fn routes(overrides: &[(&str, &str)]) -> Routes {
        let cfg = KafkaConfig {
            topic_template: "chat.{event}.v1".into(),
            topics: overrides.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
            ..KafkaConfig::default()
        };
        Routes::new(&cfg)
    }

    #[test]
    fn topic_for_prefers_the_override_then_the_template_then_the_fallback() {
        let r = routes(&[("receivedMessage", "chat.inbound")]);
        assert_eq!(r.topic_for(&EventType::Known(KnownType::ReceivedMessage)), "chat.inbound");
        assert_eq!(r.topic_for(&EventType::Known(KnownType::ClosedChat)), "chat.closedChat.v1");
        assert_eq!(r.topic_for(&EventType::Unknown("brandNewEvent".into())), "huggy.unknown");
        assert_eq!(r.dead_letter, "huggy.dead-letter");
    }

    #[test]
    fn topic_overrides_match_the_type_in_any_letter_case() {
        let r = routes(&[("CLOSEDCHAT", "chat.closed"), ("receivedmessage", "chat.inbound")]);
        assert_eq!(r.topic_for(&EventType::Known(KnownType::ClosedChat)), "chat.closed");
        assert_eq!(r.topic_for(&EventType::Known(KnownType::ReceivedMessage)), "chat.inbound");
    }

    /// Where `needle` sits in `hay`, to prove a value is a byte-exact slice of the body.
    fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
        hay.windows(needle.len()).position(|w| w == needle)
    }

    #[test]
    fn every_fixture_splits_into_the_expected_records() {
        let routes = Routes::new(&KafkaConfig::default());
        let mut ids = HashSet::new();
        let mut count = 0;
        for (name, expected) in EXPECTED {
            let body = fixture(name);
            let b = batch(&body);
            let events = split_as_sent(&b, 0);
            assert_eq!(events.len(), expected.len(), "{name}");
            for (ev, (ty, key)) in events.iter().zip(expected.iter()) {
                assert_eq!(ev.event_type.as_str(), *ty, "{name}");
                assert_eq!(ev.key.as_deref(), Some(*key), "{name}");
                assert_eq!(routes.topic_for(&ev.event_type), format!("huggy.{ty}"), "{name}");
                assert!(ev.dead_letter.is_none(), "{name}: {:?}", ev.dead_letter);
                assert!(find(&body, &ev.value).is_some(), "{name}: value is not a byte-exact slice of the body");
                let parsed: serde_json::Value = serde_json::from_slice(&ev.value).expect("value is JSON");
                assert!(parsed.is_object(), "{name}");
                assert_eq!(
                    ev.id,
                    EventId::new(&Source::of_token(b.token.unwrap()), ty, &b.stamp, &ev.value, 0),
                    "{name}"
                );
                assert!(ev.time > 0, "{name}: batch time used");
                ids.insert((ev.id, ev.value.clone()));
                count += 1;
            }
        }
        // Every (id, value) pair is distinct per distinct value: equal ids only for equal bytes.
        let mut by_id = std::collections::HashMap::new();
        for (id, value) in &ids {
            if let Some(other) = by_id.insert(*id, value.clone()) {
                assert_eq!(&other, value, "two different events share id {id}");
            }
        }
        assert_eq!(count, 25);
    }

    #[test]
    fn malformed_events_are_dead_lettered_and_siblings_kept() {
        let body = br#"{"token":"t","messages":{
            "receivedMessage":[{"id":1,"chat":{"id":5}}, 42, "text", null, [1], {"id":3,"id":4}],
            "":[{"id":9}],
            "bad type\u0001":[{"id":9}],
            "closedChat": {"id": 7},
            "someNewType":[{"chatID": 12, "company": {"id": 3}}]
        }}"#;
        let events = split_as_sent(&batch(body), 0);
        let summary: Vec<(String, Option<&str>, bool)> =
            events.iter().map(|e| (e.event_type.to_string(), e.key.as_deref(), e.dead_letter.is_some())).collect();
        assert_eq!(
            summary,
            vec![
                ("receivedMessage".into(), Some("5"), false),
                ("receivedMessage".into(), None, true),
                ("receivedMessage".into(), None, true),
                ("receivedMessage".into(), None, true),
                ("receivedMessage".into(), None, true),
                ("receivedMessage".into(), None, true),
                ("invalid".into(), None, true),
                ("invalid".into(), None, true),
                ("closedChat".into(), None, true),
                ("someNewType".into(), Some("12"), false),
            ]
        );
        assert_eq!(events[1].dead_letter.as_deref(), Some("event is not an object"));
        assert_eq!(events[8].dead_letter.as_deref(), Some("event list is not an array"));
        assert_eq!(Routes::new(&KafkaConfig::default()).topic_for(&events[9].event_type), "huggy.unknown");
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment::Jail's closures return figment::Error
    fn topic_overrides_from_the_environment_ignore_letter_case() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("HUGGY_BRIDGE_HUGGY__TOKENS", "t");
            jail.set_env("HUGGY_BRIDGE_KAFKA__TOPICS__RECEIVEDMESSAGE", "chat.inbound");
            let cfg = crate::config::Config::load(None).expect("loads");
            let routes = Routes::new(&cfg.kafka);
            let t = crate::event::EventType::Known(crate::event::KnownType::ReceivedMessage);
            assert_eq!(routes.topic_for(&t), "chat.inbound");
            Ok(())
        });
    }
}
