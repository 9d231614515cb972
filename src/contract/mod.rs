//! The consumer contract as documents (SPEC §5 Contract): a JSON Schema of each event type's value,
//! and the AsyncAPI 3 document of what a configuration publishes — topics (fallback and dead-letter
//! included), key, headers, Kafka bindings and the value schema per type.
//!
//! The value schemas are inferred from every example Huggy published (the fixtures shipped with the
//! repository, compiled in), with an open content model: Huggy adds members, so nothing is closed
//! and nothing is required. Where Huggy's examples disagree on a member's type — `company.id` a
//! number or a string, `department` a number, `false` or `null` — the schema allows every type seen
//! for that member name in any example, everywhere the name occurs.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde_json::{json, Map, Value};

use crate::config::Config;
use crate::event::{EventType, KnownType, ROUTING_HEADERS};
use crate::publish::Routes;

/// JSON Schema dialect of the files `contract schemas` writes.
pub const SCHEMA_DIALECT: &str = "https://json-schema.org/draft/2020-12/schema";

/// Version of the AsyncAPI Kafka bindings used.
const KAFKA_BINDING_VERSION: &str = "0.5.0";

/// Every published Huggy example, as shipped in `tests/fixtures/` (the handshake is no event).
const EXAMPLES: &[&str] = &[
    include_str!("../../tests/fixtures/agentChangedStatus.json"),
    include_str!("../../tests/fixtures/agentEntered.json"),
    include_str!("../../tests/fixtures/asyncExportData.json"),
    include_str!("../../tests/fixtures/closedChat.json"),
    include_str!("../../tests/fixtures/createdCustomer.json"),
    include_str!("../../tests/fixtures/finishedAutomationFlow.json"),
    include_str!("../../tests/fixtures/leftQueue.json"),
    include_str!("../../tests/fixtures/newInternalMessage.json"),
    include_str!("../../tests/fixtures/receivedAllMessage.2.json"),
    include_str!("../../tests/fixtures/receivedAllMessage.json"),
    include_str!("../../tests/fixtures/receivedMessage.json"),
    include_str!("../../tests/fixtures/sendedAllMessage.older-docs.json"),
    include_str!("../../tests/fixtures/sentAllMessage.json"),
    include_str!("../../tests/fixtures/startedAutomationFlow+finishedAutomationFlow.2.json"),
    include_str!("../../tests/fixtures/startedAutomationFlow+finishedAutomationFlow.json"),
    include_str!("../../tests/fixtures/startedAutomationFlow.json"),
    include_str!("../../tests/fixtures/startedChat+receivedMessage.json"),
    include_str!("../../tests/fixtures/startedChat.json"),
    include_str!("../../tests/fixtures/startedWidgetAttendance.json"),
    include_str!("../../tests/fixtures/updatedChatDepartment.json"),
    include_str!("../../tests/fixtures/updatedCustomer.json"),
    include_str!("../../tests/fixtures/updatedWorkflowStep.json"),
];

/// Why the schemas could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ContractError {
    /// The directory or a file in it could not be written.
    #[error("cannot write {path}")]
    Write {
        /// The path.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// What the examples show of a JSON value: the types seen, and the same for members and items.
#[derive(Default)]
struct Shape {
    types: BTreeSet<&'static str>,
    members: BTreeMap<String, Shape>,
    items: Option<Box<Shape>>,
}

impl Shape {
    fn observe(&mut self, v: &Value, names: &mut BTreeMap<String, BTreeSet<&'static str>>) {
        self.types.insert(json_type(v));
        match v {
            Value::Object(m) => {
                for (k, x) in m {
                    names.entry(k.clone()).or_default().insert(json_type(x));
                    self.members.entry(k.clone()).or_default().observe(x, names);
                }
            }
            Value::Array(a) => {
                for x in a {
                    self.items.get_or_insert_with(Box::default).observe(x, names);
                }
            }
            _ => {}
        }
    }

    /// The schema of this shape; `name` is the member it is the value of, whose types seen anywhere
    /// are allowed here too.
    fn schema(&self, name: Option<&str>, names: &BTreeMap<String, BTreeSet<&'static str>>) -> Value {
        let mut types = self.types.clone();
        if let Some(seen) = name.and_then(|n| names.get(n)) {
            types.extend(seen);
        }
        // An integer is a number: say `number` once when both were seen.
        if types.contains("number") {
            types.remove("integer");
        }
        let mut out = Map::new();
        let list: Vec<&str> = types.iter().copied().collect();
        out.insert("type".into(), if list.len() == 1 { json!(list[0]) } else { json!(list) });
        if types.contains("object") && !self.members.is_empty() {
            let props: Map<String, Value> =
                self.members.iter().map(|(k, s)| (k.clone(), s.schema(Some(k), names))).collect();
            out.insert("properties".into(), Value::Object(props));
        }
        if let Some(items) = self.items.as_deref().filter(|_| types.contains("array")) {
            out.insert("items".into(), items.schema(None, names));
        }
        Value::Object(out)
    }
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// The shapes of every known type's examples, and the types seen per member name.
fn shapes() -> (BTreeMap<KnownType, Shape>, BTreeMap<String, BTreeSet<&'static str>>) {
    let mut shapes: BTreeMap<KnownType, Shape> = BTreeMap::new();
    let mut names = BTreeMap::new();
    for text in EXAMPLES {
        let Ok(batch) = serde_json::from_str::<Value>(text) else { continue };
        let Some(messages) = batch.get("messages").and_then(Value::as_object) else { continue };
        for (name, events) in messages {
            let Ok((EventType::Known(k), _)) = EventType::parse(name) else { continue };
            for ev in events.as_array().into_iter().flatten() {
                shapes.entry(k).or_default().observe(ev, &mut names);
            }
        }
    }
    (shapes, names)
}

/// The JSON Schema (draft 2020-12) of each known event type's value, by type name.
pub fn schemas() -> BTreeMap<&'static str, Value> {
    let (shapes, names) = shapes();
    KnownType::ALL
        .iter()
        .map(|k| {
            let mut schema = Map::new();
            schema.insert("$schema".into(), json!(SCHEMA_DIALECT));
            schema.insert("title".into(), json!(k.as_str()));
            match shapes.get(k) {
                Some(shape) => {
                    schema.insert(
                        "description".into(),
                        json!(format!(
                            "The value of a `{}` record: the event exactly as Huggy sent it. Inferred from Huggy's \
                             published examples; open (Huggy adds members), nothing required. A member whose type \
                             the examples disagree on allows every type seen.",
                            k.as_str()
                        )),
                    );
                    if let Value::Object(body) = shape.schema(None, &names) {
                        schema.extend(body);
                    }
                }
                None => {
                    schema.insert(
                        "description".into(),
                        json!(format!(
                            "The value of a `{}` record: the event exactly as Huggy sent it. Huggy has published no \
                             example of this type: any object.",
                            k.as_str()
                        )),
                    );
                    schema.insert("type".into(), json!("object"));
                }
            }
            (k.as_str(), Value::Object(schema))
        })
        .collect()
}

/// Writes one `<type>.schema.json` per known event type into `dir` (created if missing), each as
/// [`schemas`] has it; returns the paths written.
///
/// # Errors
/// The directory or a file cannot be written.
pub fn write_schemas(dir: &Path) -> Result<Vec<String>, ContractError> {
    let failed = |path: &Path| {
        let path = path.display().to_string();
        move |source| ContractError::Write { path, source }
    };
    std::fs::create_dir_all(dir).map_err(failed(dir))?;
    let mut written = Vec::new();
    for (name, schema) in schemas() {
        let path = dir.join(format!("{name}.schema.json"));
        std::fs::write(&path, pretty(&schema)).map_err(failed(&path))?;
        written.push(path.display().to_string());
    }
    Ok(written)
}

/// A document as the commands print it: pretty JSON and a final newline.
pub fn pretty(v: &Value) -> String {
    let mut s = serde_json::to_string_pretty(v).unwrap_or_default();
    s.push('\n');
    s
}

/// A header of the records, for the AsyncAPI headers schema.
struct HeaderDoc {
    name: &'static str,
    description: &'static str,
    required: bool,
}

const fn h(name: &'static str, required: bool, description: &'static str) -> HeaderDoc {
    HeaderDoc { name, description, required }
}

/// Every header a record in its own topic can carry (SPEC §5).
const HEADERS: &[HeaderDoc] = &[
    h("ce_specversion", true, "CloudEvents spec version: `1.0`."),
    h(
        "ce_id",
        true,
        "Event id, 32 hex digits, deterministic: a re-sent batch gives the same ids. Deduplicate on it \
         (delivery is at-least-once).",
    ),
    h("ce_type", true, "`app.huggy.<type>`, the normalized event type."),
    h("ce_source", true, "`huggy://company/<company id>` (`unknown` when the event has none)."),
    h(
        "ce_time",
        false,
        "The batch `time` as RFC 3339; left out when that is no plausible time. The record's timestamp \
         (CreateTime) is the same instant in milliseconds.",
    ),
    h("content-type", true, "`application/json`."),
    h("huggy_original_type", false, "The type as Huggy spelled it, when the bridge renamed it (`sendedAllMessage`)."),
    h(
        "huggy_bridge_files",
        false,
        "JSON array: where each file the event pointed to was stored, or why it could not be.",
    ),
    h(
        "huggy_claim_check",
        false,
        "JSON `{\"location\", \"sha256\", \"size\"}`: the event was too large for Kafka; its exact bytes are at \
         `location` in the file store and the value is a small reference.",
    ),
    h("ce_subject", false, "`chat/<id>`, `customer/<id>` or `agent/<id>`: what the event is about."),
    h("huggy_company_id", false, "The Huggy company (account) id."),
    h("huggy_chat_id", false, "The chat the event belongs to."),
    h("huggy_sender_type", false, "Who wrote a message (`senderType`: `agent`, `widget`, `whatsapp`, …)."),
    h("huggy_channel", false, "The chat's channel (`chat.channel`, else the event's `channel`)."),
    h("huggy_chat_situation", false, "`chat.situation`, else the chat event's `situation` (`auto`: a bot)."),
    h("huggy_chat_department", false, "The chat's department id, when it has one."),
    h("huggy_internal", false, "`true` on internal messages (notes never shown to the customer); absent otherwise."),
];

/// The headers the dead-letter topic adds.
const DEAD_LETTER_HEADERS: &[HeaderDoc] = &[
    h("huggy_dlq_reason", true, "Why the event could not be published to its topic."),
    h("huggy_dlq_topic", true, "The topic it was meant for."),
];

fn headers_schema(extra: &[HeaderDoc]) -> Value {
    let all = || HEADERS.iter().chain(extra);
    let props: Map<String, Value> =
        all().map(|h| (h.name.to_owned(), json!({"type": "string", "description": h.description}))).collect();
    let required: Vec<&str> = all().filter(|h| h.required).map(|h| h.name).collect();
    json!({"type": "object", "properties": props, "required": required})
}

const KEY_RULE: &str = "The id that orders the event's conversation, as a decimal string: the chat id for chat \
                        events, the customer id for createdCustomer/updatedCustomer, the agent id for \
                        agentChangedStatus, else the company id. Records of one key keep Huggy's order. \
                        Partitioned with murmur2 as Java clients do (kafka.partitioner).";

/// The AsyncAPI 3.0.0 document of what `cfg` publishes.
pub fn asyncapi(cfg: &Config) -> Value {
    let kafka = &cfg.kafka;
    let routes = Routes::new(kafka);
    let schemas = schemas();
    // Types by topic: overrides may send several types to one topic.
    let mut topics: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut messages = Map::new();
    let mut components = Map::new();
    let message = |name: &str, title: String, payload: Value, headers: &str| {
        json!({
            "name": name,
            "title": title,
            "contentType": "application/json",
            "headers": {"$ref": format!("#/components/schemas/{headers}")},
            "payload": payload,
            "bindings": {"kafka": {
                "key": {"type": "string", "pattern": "^[0-9]+$", "description": KEY_RULE},
                "bindingVersion": KAFKA_BINDING_VERSION,
            }},
        })
    };
    for k in KnownType::ALL {
        let name = k.as_str();
        topics.entry(routes.topic_for(&EventType::Known(*k)).to_owned()).or_default().push(name.to_owned());
        let mut payload = schemas[name].clone();
        if let Value::Object(m) = &mut payload {
            // The AsyncAPI schema format is JSON Schema draft 7 compatible: no dialect keyword inline.
            m.remove("$schema");
        }
        components.insert(name.to_owned(), payload);
        let payload = json!({"$ref": format!("#/components/schemas/{name}")});
        messages.insert(name.to_owned(), message(name, format!("Huggy {name} event"), payload, "headers"));
    }
    topics.entry(kafka.fallback_topic.clone()).or_default().push("unknownType".into());
    messages.insert(
        "unknownType".into(),
        message(
            "unknownType",
            "An event of a type the bridge does not know (kafka.fallback_topic)".into(),
            json!({"type": "object", "description": "The event exactly as Huggy sent it; `ce_type` names its type."}),
            "headers",
        ),
    );
    topics.entry(kafka.dead_letter_topic.clone()).or_default().push("deadLetter".into());
    messages.insert(
        "deadLetter".into(),
        message(
            "deadLetter",
            "An event that could not be published to its topic (kafka.dead_letter_topic)".into(),
            json!({"description": "The event's bytes as Huggy sent them (not always an object: that may be why it is here)."}),
            "deadLetterHeaders",
        ),
    );
    components.insert("headers".into(), headers_schema(&[]));
    components.insert("deadLetterHeaders".into(), headers_schema(DEAD_LETTER_HEADERS));

    let mut channels = Map::new();
    let mut operations = Map::new();
    for (topic, types) in &topics {
        let refs: Map<String, Value> =
            types.iter().map(|t| (t.clone(), json!({"$ref": format!("#/components/messages/{t}")}))).collect();
        let mut topic_configuration = Map::new();
        if let Some(m) = kafka.effective_min_insync_replicas() {
            topic_configuration.insert("min.insync.replicas".into(), json!(m));
        }
        let mut binding = json!({
            "topic": topic,
            "partitions": kafka.partitions,
            "replicas": kafka.replication_factor,
            "bindingVersion": KAFKA_BINDING_VERSION,
        });
        if !topic_configuration.is_empty() {
            binding["topicConfiguration"] = Value::Object(topic_configuration);
        }
        channels.insert(
            topic.clone(),
            json!({"address": topic, "title": topic, "messages": refs, "bindings": {"kafka": binding}}),
        );
        let message_refs: Vec<Value> = types
            .iter()
            .map(|t| json!({"$ref": format!("#/channels/{}/messages/{t}", pointer_escape(topic))}))
            .collect();
        operations.insert(
            format!("publish {topic}"),
            json!({
                "action": "send",
                "channel": {"$ref": format!("#/channels/{}", pointer_escape(topic))},
                "messages": message_refs,
            }),
        );
    }
    json!({
        "asyncapi": "3.0.0",
        "info": {
            "title": "huggy-bridge",
            "version": env!("CARGO_PKG_VERSION"),
            "description": format!(
                "Huggy webhook events as Kafka records: one record per event, the value exactly as Huggy sent it, \
                 CloudEvents headers (binary mode) and routing headers ({}). The record timestamp (CreateTime) is the \
                 event's time. Delivery is at-least-once: deduplicate on `ce_id`.",
                ROUTING_HEADERS.join(", ")
            ),
        },
        "defaultContentType": "application/json",
        "servers": {"kafka": {
            "host": kafka.brokers,
            "protocol": "kafka",
            "description": "kafka.brokers of the configuration this document was made from",
            "bindings": {"kafka": {"bindingVersion": KAFKA_BINDING_VERSION}},
        }},
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": components},
    })
}

/// `s` as a JSON Pointer token (RFC 6901).
fn pointer_escape(s: &str) -> String {
    s.replace('~', "~0").replace('/', "~1")
}

#[cfg(test)]
mod tests;
