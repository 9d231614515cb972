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
    use super::*;

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
}
