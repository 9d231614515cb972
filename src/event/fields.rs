//! The members of an event the bridge reads: what decides its key and source, and the routing
//! headers consumers filter on (SPEC §5), all in the one parse [`super::split`] makes of each event.
//! Every other member is skipped, not parsed.

use std::fmt;

use serde::de::{DeserializeSeed, Error as _, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;

use super::parse::{decimal, raw_plain_str};
use super::{EventType, KnownType};

/// What consumers route and filter on without parsing the value; each is `None` when the event
/// does not carry it (or carries it in a form that is no plain value, such as `department: false`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Routing {
    /// `ce_subject`: `chat/<id>`, `customer/<id>` or `agent/<id>`.
    pub subject: Option<String>,
    /// `huggy_chat_id`: the chat the event belongs to.
    pub chat_id: Option<String>,
    /// `huggy_sender_type`: who wrote a message (`senderType`: `agent`, `widget`, `whatsapp`, …).
    pub sender_type: Option<String>,
    /// `huggy_channel`: the chat's channel (`chat.channel`, else the event's `channel`).
    pub channel: Option<String>,
    /// `huggy_chat_situation`: `chat.situation`, else the chat event's `situation` (`auto` = a bot).
    pub chat_situation: Option<String>,
    /// `huggy_chat_department`: the department id, when the chat has one.
    pub chat_department: Option<String>,
    /// `huggy_internal`: `is_internal` is `true` (an internal note, never shown to the customer).
    pub internal: bool,
}

impl Routing {
    /// The routing headers, in a fixed order, `huggy_company_id` included.
    pub(crate) fn headers<'a>(&'a self, company: Option<&'a str>) -> impl Iterator<Item = (&'static str, &'a str)> {
        [
            ("ce_subject", self.subject.as_deref()),
            ("huggy_company_id", company),
            ("huggy_chat_id", self.chat_id.as_deref()),
            ("huggy_sender_type", self.sender_type.as_deref()),
            ("huggy_channel", self.channel.as_deref()),
            ("huggy_chat_situation", self.chat_situation.as_deref()),
            ("huggy_chat_department", self.chat_department.as_deref()),
            ("huggy_internal", self.internal.then_some("true")),
        ]
        .into_iter()
        .filter_map(|(k, v)| Some((k, v?)))
    }
}

/// Every routing header name, in the order [`Routing::headers`] writes them.
pub const ROUTING_HEADERS: [&str; 8] = [
    "ce_subject",
    "huggy_company_id",
    "huggy_chat_id",
    "huggy_sender_type",
    "huggy_channel",
    "huggy_chat_situation",
    "huggy_chat_department",
    "huggy_internal",
];

/// What one parse of an event yields.
pub(super) struct Fields {
    /// The ordering key read from the event's own ids; `None` when it has none (the caller falls
    /// back to the company: the token's account's when accounts are configured).
    pub(super) key: Option<String>,
    pub(super) company: Option<String>,
    /// Every company id the event states, for the check against its token's account (read only
    /// when the token has one): one entry per `company.id` member (each of them when it is
    /// duplicated) and per `companyID`, the decimal id, or `None` when the member is there but
    /// holds no id (`"99999 "`, `9.9999e4`, a `company` that is not an object). `null` members
    /// state nothing and are left out.
    pub(super) company_claims: Vec<Option<String>>,
    pub(super) routing: Routing,
}

/// Top-level members read. The first five decide key and source: a duplicate of one of them makes
/// the event unreadable (which id would be the key?). A duplicate of a routing member only drops
/// that header: ambiguous, so not vouched for.
const TOP: [&str; 10] =
    ["id", "chat", "chatID", "company", "companyID", "senderType", "is_internal", "channel", "situation", "department"];
const KEY_MEMBERS: usize = 5;
const T_ID: usize = 0;
const T_CHAT: usize = 1;
const T_CHAT_ID: usize = 2;
const T_COMPANY: usize = 3;
const T_COMPANY_ID: usize = 4;
const T_SENDER: usize = 5;
const T_INTERNAL: usize = 6;
const T_CHANNEL: usize = 7;
const T_SITUATION: usize = 8;
const T_DEPARTMENT: usize = 9;

/// Members of `chat`.
const CHAT: [&str; 4] = ["id", "channel", "situation", "department"];
/// Members of an object `channel` (chat events): its `type`.
const CHANNEL: [&str; 1] = ["type"];
/// Members of a `company` or `department` object.
const ID: [&str; 1] = ["id"];

/// Reads an event object (`raw` starts with `{`); its company claims only `with_claims` (a token
/// bound to an account: the only check that needs them).
///
/// # Errors
/// The parser's message: the event is not valid JSON, or a key member is duplicated.
pub(super) fn read(event_type: &EventType, raw: &RawValue, with_claims: bool) -> Result<Fields, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_str(raw.get());
    let top = Pick { names: &TOP, strict: KEY_MEMBERS }.deserialize(&mut de)?;
    let chat = top.get(T_CHAT).and_then(|c| pick(c, &CHAT));
    let chat_field = |i: usize| chat.as_ref().and_then(|c| c.get(i));

    use KnownType::*;
    let known = event_type.known();
    // Events about a chat itself carry the chat's id, situation and department at the top.
    let is_chat_event = matches!(known, Some(StartedChat | CreatedChat | AgentEntered | ClosedChat | LeftQueue));
    let chat_id = if is_chat_event {
        top.get(T_ID).and_then(decimal)
    } else {
        chat_field(0).and_then(decimal).or_else(|| top.get(T_CHAT_ID).and_then(decimal))
    };
    let own = |prefix: &str| top.get(T_ID).and_then(decimal).map(|id| (id.clone(), format!("{prefix}/{id}")));
    let (key, subject) = match known {
        Some(CreatedCustomer | UpdatedCustomer) => own("customer").unzip(),
        Some(AgentChangedStatus) => own("agent").unzip(),
        _ => (chat_id.clone(), chat_id.as_ref().map(|id| format!("chat/{id}"))),
    };
    let company = top
        .get(T_COMPANY)
        .and_then(|c| pick(c, &ID))
        .and_then(|c| c.get(0).and_then(decimal))
        .or_else(|| top.get(T_COMPANY_ID).and_then(decimal));
    let company_claims =
        if with_claims { company_claims(top.get(T_COMPANY), top.get(T_COMPANY_ID)) } else { Vec::new() };
    let top_if_chat_event = |i: usize| if is_chat_event { top.get(i) } else { None };
    let channel = chat_field(1).and_then(label).or_else(|| {
        let c = top.get(T_CHANNEL)?;
        if c.get().starts_with('{') {
            pick(c, &CHANNEL)?.get(0).and_then(label)
        } else {
            label(c)
        }
    });
    Ok(Fields {
        key,
        company,
        company_claims,
        routing: Routing {
            subject,
            chat_id,
            sender_type: top.get(T_SENDER).and_then(label),
            channel,
            chat_situation: chat_field(2).or_else(|| top_if_chat_event(T_SITUATION)).and_then(label),
            chat_department: chat_field(3).or_else(|| top_if_chat_event(T_DEPARTMENT)).and_then(department),
            internal: top.get(T_INTERNAL).is_some_and(|v| v.get() == "true"),
        },
    })
}

/// What the members `company` and `companyID` say the event's company is (see
/// [`Fields::company_claims`]). Neither can be duplicated here: a duplicate of a key member makes
/// the whole event unreadable.
fn company_claims(company: Option<&RawValue>, company_id: Option<&RawValue>) -> Vec<Option<String>> {
    let stated = |raw: &RawValue| raw.get() != "null";
    let mut claims = Vec::new();
    if let Some(c) = company.filter(|c| stated(c)) {
        match all_ids(c) {
            Some(ids) => claims.extend(ids.into_iter().filter(|id| stated(id)).map(decimal)),
            None => claims.push(None),
        }
    }
    claims.extend(company_id.filter(|c| stated(c)).map(decimal));
    claims
}

/// Every `id` member of an object, duplicates included, in document order; `None` when `raw` is
/// not an object.
fn all_ids(raw: &RawValue) -> Option<Vec<&RawValue>> {
    if !raw.get().starts_with('{') {
        return None;
    }
    let mut de = serde_json::Deserializer::from_str(raw.get());
    de.deserialize_map(AllIds).ok()
}

/// Reads an object keeping every `id` member, skipping the rest unparsed.
struct AllIds;

impl<'de> Visitor<'de> for AllIds {
    type Value = Vec<&'de RawValue>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut ids = Vec::new();
        while let Some(name) = map.next_key_seed(Name(&ID))? {
            if name.is_some() {
                ids.push(map.next_value::<&'de RawValue>()?);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(ids)
    }
}

/// A short plain string (no escapes, 1–64 bytes, no control characters) as a header value; Huggy's
/// labels (`widget`, `in_chat`, `whatsapp`) are. Anything else is no label to route on.
fn label(raw: &RawValue) -> Option<String> {
    let s = raw_plain_str(raw)?;
    let fits = !s.is_empty() && s.len() <= 64 && !s.chars().any(char::is_control);
    fits.then(|| s.to_owned())
}

/// A department: an id (number or digits), or an object with one; `false` and `null` (no
/// department) are none.
fn department(raw: &RawValue) -> Option<String> {
    if raw.get().starts_with('{') {
        pick(raw, &ID)?.get(0).and_then(decimal)
    } else {
        decimal(raw)
    }
}

/// The members `names` of a nested object, `None` when it is not an object that parses.
fn pick<'a>(raw: &'a RawValue, names: &[&'static str]) -> Option<Picked<'a>> {
    if !raw.get().starts_with('{') {
        return None;
    }
    let mut de = serde_json::Deserializer::from_str(raw.get());
    Pick { names, strict: 0 }.deserialize(&mut de).ok()
}

/// Members of an object by name, each borrowed raw; a duplicated one is `None`.
pub(super) struct Picked<'a> {
    values: [Option<&'a RawValue>; TOP.len()],
    duplicated: [bool; TOP.len()],
}

impl<'a> Picked<'a> {
    fn get(&self, i: usize) -> Option<&'a RawValue> {
        if self.duplicated[i] {
            None
        } else {
            self.values[i]
        }
    }
}

/// Reads an object keeping the members `names` (at most [`TOP`]`.len()`), skipping the rest
/// unparsed. A duplicate of one of the first `strict` names is an error.
struct Pick<'n> {
    names: &'n [&'static str],
    strict: usize,
}

impl<'de> DeserializeSeed<'de> for Pick<'_> {
    type Value = Picked<'de>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Pick<'_> {
    type Value = Picked<'de>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an event object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = Picked { values: [None; TOP.len()], duplicated: [false; TOP.len()] };
        while let Some(name) = map.next_key_seed(Name(self.names))? {
            let Some(i) = name else {
                map.next_value::<IgnoredAny>()?;
                continue;
            };
            let value: &'de RawValue = map.next_value()?;
            if out.values[i].is_some() {
                if i < self.strict {
                    return Err(A::Error::duplicate_field(self.names[i]));
                }
                out.duplicated[i] = true;
            } else {
                out.values[i] = Some(value);
            }
        }
        Ok(out)
    }
}

/// A member name: its position in the names looked for, if it is one.
struct Name<'n>(&'n [&'static str]);

impl<'de> DeserializeSeed<'de> for Name<'_> {
    type Value = Option<usize>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl Visitor<'_> for Name<'_> {
    type Value = Option<usize>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a member name")
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(self.0.iter().position(|n| *n == v))
    }
}
