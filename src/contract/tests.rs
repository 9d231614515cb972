use std::collections::BTreeSet;

use serde_json::Value;

use super::*;
use crate::config::Config;

/// Every event of every published example, with its normalized type.
fn examples() -> Vec<(KnownType, Value)> {
    let mut out = Vec::new();
    for text in EXAMPLES {
        let batch: Value = serde_json::from_str(text).expect("an example parses");
        for (name, events) in batch["messages"].as_object().expect("messages") {
            let Ok((EventType::Known(k), _)) = EventType::parse(name) else { panic!("{name} is a known type") };
            out.extend(events.as_array().expect("a list").iter().map(|e| (k, e.clone())));
        }
    }
    out
}

#[test]
fn the_compiled_in_examples_are_every_published_example() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
    let on_disk = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json") && !p.ends_with("handshake.json"))
        .count();
    assert_eq!(EXAMPLES.len(), on_disk);
}

#[test]
fn every_published_example_validates_against_its_types_schema() {
    let schemas = schemas();
    assert_eq!(schemas.len(), KnownType::ALL.len());
    for (k, event) in examples() {
        let schema = &schemas[k.as_str()];
        assert_eq!(schema["$schema"], SCHEMA_DIALECT);
        let validator = jsonschema::draft202012::new(schema).unwrap_or_else(|e| panic!("{k:?}: {e}"));
        let errors: Vec<String> = validator.iter_errors(&event).map(|e| e.to_string()).collect();
        assert!(errors.is_empty(), "{k:?}: {errors:?}");
    }
}

#[test]
fn the_schemas_are_open_and_allow_every_type_huggys_examples_disagree_on() {
    let schemas = schemas();
    let types = |v: &Value| -> BTreeSet<String> {
        match v {
            Value::String(s) => [s.clone()].into(),
            Value::Array(a) => a.iter().map(|t| t.as_str().unwrap().to_owned()).collect(),
            _ => panic!("no type: {v}"),
        }
    };
    let received = &schemas["receivedMessage"];
    let company_id = &received["properties"]["company"]["properties"]["id"]["type"];
    assert_eq!(types(company_id), ["integer", "string"].map(String::from).into());
    let department = &received["properties"]["chat"]["properties"]["department"]["type"];
    assert_eq!(types(department), ["boolean", "integer", "null"].map(String::from).into());
    let receiver = &received["properties"]["receiver"]["type"];
    assert!(types(receiver).is_superset(&["boolean", "object"].map(String::from).into()), "{receiver}");
    // Open content: a member Huggy adds tomorrow, and a type without any example, validate.
    for schema in schemas.values() {
        assert!(schema.get("additionalProperties").is_none() && schema.get("required").is_none());
        let validator = jsonschema::draft202012::new(schema).unwrap();
        assert!(validator.is_valid(&serde_json::json!({"brandNewMember": [1, "x"]})));
        assert!(!validator.is_valid(&serde_json::json!([1])), "an event is an object");
    }
    assert_eq!(schemas["answeredChatForm"]["type"], "object");
    // A typed sink's surprise is caught: a string where Huggy never sent one.
    let strict = jsonschema::draft202012::new(received).unwrap();
    assert!(!strict.is_valid(&serde_json::json!({"chat": {"id": [1]}})));
}

/// Every `$ref` in `v`, as JSON Pointers into the document.
fn refs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            if let Some(Value::String(r)) = m.get("$ref") {
                out.push(r.clone());
            }
            m.values().for_each(|x| refs(x, out));
        }
        Value::Array(a) => a.iter().for_each(|x| refs(x, out)),
        _ => {}
    }
}

#[test]
fn the_asyncapi_document_names_every_topic_and_its_references_resolve() {
    let mut cfg = Config::default();
    cfg.kafka.topics.insert("receivedMessage".into(), "chat.inbound".into());
    cfg.kafka.topics.insert("receivedAllMessage".into(), "chat.inbound".into());
    cfg.kafka.replication_factor = 3;
    let doc = asyncapi(&cfg);
    // It survives a round trip through its printed form.
    let doc: Value = serde_json::from_str(&pretty(&doc)).unwrap();
    assert_eq!(doc["asyncapi"], "3.0.0");
    let channels = doc["channels"].as_object().unwrap();
    let addresses: BTreeSet<String> = channels.values().map(|c| c["address"].as_str().unwrap().to_owned()).collect();
    assert_eq!(addresses, crate::publish::kafka::routable_topics(&cfg));
    for t in ["huggy.unknown", "huggy.dead-letter", "chat.inbound", "huggy.closedChat"] {
        assert!(addresses.contains(t), "{t}");
    }
    let inbound = &channels["chat.inbound"];
    let names: BTreeSet<&str> = inbound["messages"].as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(names, ["receivedAllMessage", "receivedMessage"].into());
    let kafka = &inbound["bindings"]["kafka"];
    assert_eq!((kafka["partitions"].as_i64(), kafka["replicas"].as_i64()), (Some(6), Some(3)));
    assert_eq!(kafka["topicConfiguration"]["min.insync.replicas"], 2);
    let mut all = Vec::new();
    refs(&doc, &mut all);
    assert!(all.len() > 40);
    for r in all {
        let pointer = r.strip_prefix('#').unwrap_or_else(|| panic!("a local reference: {r}"));
        assert!(doc.pointer(pointer).is_some(), "{r} resolves");
    }
    let headers = &doc["components"]["schemas"]["headers"]["properties"];
    for h in ROUTING_HEADERS.iter().chain(&["ce_id", "ce_time", "huggy_bridge_files", "huggy_claim_check"]) {
        assert!(headers.get(*h).is_some(), "{h}");
    }
    let dlq = &doc["components"]["schemas"]["deadLetterHeaders"]["required"];
    assert!(dlq.as_array().unwrap().contains(&Value::from("huggy_dlq_reason")));
    let key = &doc["components"]["messages"]["closedChat"]["bindings"]["kafka"]["key"];
    assert_eq!(key["type"], "string");
}
