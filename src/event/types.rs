//! Event types: the closed set the bridge knows (every type of Huggy's webhook reference), the
//! `sendedAllMessage` alias, and the rules for names of unknown types and of topics.

use std::fmt;

use serde::{Deserialize, Serialize};

macro_rules! known_types {
    ($($variant:ident => $name:literal),+ $(,)?) => {
        /// Every event type of Huggy's webhook reference (current and older pages).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum KnownType { $(#[doc = concat!("`", $name, "`")] $variant),+ }

        impl KnownType {
            pub(crate) const ALL: &'static [KnownType] = &[$(KnownType::$variant),+];

            pub(crate) fn as_str(self) -> &'static str {
                match self { $(KnownType::$variant => $name),+ }
            }

            /// The normalized name only; use [`EventType::parse`] for what Huggy sends.
            pub(crate) fn parse(name: &str) -> Option<Self> {
                match name { $($name => Some(KnownType::$variant),)+ _ => None }
            }

            /// The normalized name in any letter case: configuration keys may arrive lowercased
            /// (environment variables), e.g. `kafka.topics.receivedmessage`.
            pub(crate) fn parse_ignore_case(name: &str) -> Option<Self> {
                Self::ALL.iter().copied().find(|k| k.as_str().eq_ignore_ascii_case(name))
            }
        }
    };
}

known_types! {
    ReceivedMessage => "receivedMessage",
    ReceivedAllMessage => "receivedAllMessage",
    SentAllMessage => "sentAllMessage",
    NewInternalMessage => "newInternalMessage",
    StartedChat => "startedChat",
    CreatedChat => "createdChat",
    AgentEntered => "agentEntered",
    ClosedChat => "closedChat",
    LeftQueue => "leftQueue",
    AnsweredChatForm => "answeredChatForm",
    UpdatedChatDepartment => "updatedChatDepartment",
    UpdatedWorkflowStep => "updatedWorkflowStep",
    StartedWidgetAttendance => "startedWidgetAttendance",
    StartedAutomationFlow => "startedAutomationFlow",
    FinishedAutomationFlow => "finishedAutomationFlow",
    CreatedCustomer => "createdCustomer",
    UpdatedCustomer => "updatedCustomer",
    AgentChangedStatus => "agentChangedStatus",
    AsyncExportData => "asyncExportData",
}

/// Older spellings Huggy used, and the name each became.
const ALIASES: &[(&str, KnownType)] = &[("sendedAllMessage", KnownType::SentAllMessage)];

/// Longest event type name accepted for an unknown type.
const MAX_TYPE_LEN: usize = 64;

/// A normalized event type: known, or unknown but with a name safe to use in a topic and a header.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EventType {
    /// A type of Huggy's webhook reference.
    Known(#[serde(with = "known_serde")] KnownType),
    /// Any other name Huggy sends; such events go to `kafka.fallback_topic`.
    Unknown(String),
}

impl EventType {
    /// Normalizes a `messages` key: `(type, renamed)`.
    ///
    /// # Errors
    /// A reason when the name is empty, too long or has characters outside `[A-Za-z0-9._-]`; such
    /// events go to the dead-letter topic.
    pub(crate) fn parse(name: &str) -> Result<(EventType, bool), String> {
        if let Some(k) = KnownType::parse(name) {
            return Ok((EventType::Known(k), false));
        }
        if let Some((_, k)) = ALIASES.iter().find(|(alias, _)| *alias == name) {
            return Ok((EventType::Known(*k), true));
        }
        if name.is_empty() {
            return Err("event type is empty".into());
        }
        if name.len() > MAX_TYPE_LEN {
            return Err(format!("event type is longer than {MAX_TYPE_LEN} bytes"));
        }
        if !name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')) {
            return Err("event type has characters outside [A-Za-z0-9._-]".into());
        }
        Ok((EventType::Unknown(name.to_owned()), false))
    }

    /// The normalized name (`sentAllMessage` for `sendedAllMessage`), as in topics and `ce_type`.
    pub fn as_str(&self) -> &str {
        match self {
            EventType::Known(k) => k.as_str(),
            EventType::Unknown(s) => s,
        }
    }

    pub(crate) fn known(&self) -> Option<KnownType> {
        match self {
            EventType::Known(k) => Some(*k),
            EventType::Unknown(_) => None,
        }
    }

    /// A metrics label from a closed set: the known name or `unknown`.
    pub(crate) fn label(&self) -> &'static str {
        self.known().map_or("unknown", KnownType::as_str)
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

mod known_serde {
    use super::KnownType;
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(k: &KnownType, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(k.as_str())
    }
    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<KnownType, D::Error> {
        let name = String::deserialize(d)?;
        KnownType::parse(&name).ok_or_else(|| D::Error::custom(format!("unknown event type {name}")))
    }
}

/// Kafka's rule for topic names: 1–249 characters of `[A-Za-z0-9._-]`, not `.` or `..`.
pub(crate) fn is_valid_topic(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 249
        && t != "."
        && t != ".."
        && t.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}
