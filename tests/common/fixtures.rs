//! The Huggy payload fixtures, and what the daemon must make of them.

use std::time::Duration;

use super::consumer::Rec;

pub const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

/// Every fixture that is a batch: (file name, bytes).
pub fn batch_fixtures() -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(FIXTURES)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json") && !p.ends_with("handshake.json"))
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap()))
        .collect();
    out.sort();
    out
}

/// The token of every fixture, so a test config accepts them all.
pub fn fixture_tokens() -> Vec<String> {
    let mut t: Vec<String> = std::fs::read_dir(FIXTURES)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| {
            let v: serde_json::Value = serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap();
            v["token"].as_str().unwrap().to_owned()
        })
        .collect();
    t.sort();
    t.dedup();
    t
}

/// Independent statement of SPEC §5's key rule, for checking the daemon's records.
fn expected_key(ty: &str, v: &serde_json::Value) -> Option<String> {
    use serde_json::Value;
    let dec = |x: &Value| match x {
        Value::Number(n) => Some(n.to_string()),
        Value::String(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => Some(s.clone()),
        _ => None,
    };
    let own = match ty {
        "startedChat" | "createdChat" | "agentEntered" | "closedChat" | "leftQueue" | "createdCustomer"
        | "updatedCustomer" | "agentChangedStatus" => dec(&v["id"]),
        "startedAutomationFlow" | "finishedAutomationFlow" => dec(&v["chatID"]),
        _ => dec(&v["chat"]["id"]).or_else(|| dec(&v["chatID"])),
    };
    own.or_else(|| dec(&v["company"]["id"])).or_else(|| dec(&v["companyID"]))
}

fn rfc3339(secs: i64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(secs as u64)).to_string()
}

/// Checks that `recs` (read from every topic) hold exactly one correct record per fixture event:
/// topic, key, value bytes (a byte-exact slice of the fixture), CloudEvents headers. With `dedup`
/// (spool mode), an event already posted earlier (same type after renaming, same bytes: the older
/// docs' `sendedAllMessage` example is the `sentAllMessage` one) is expected once.
pub fn check_fixture_records(recs: &[Rec], dedup: bool) {
    let mut unmatched: Vec<&Rec> = recs.iter().collect();
    let mut expected = 0;
    let mut seen = std::collections::HashSet::new();
    for (name, bytes) in batch_fixtures() {
        let batch: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        let time = batch["time"].as_i64().unwrap();
        for (ty, events) in batch["messages"].as_object().unwrap() {
            let norm = if ty == "sendedAllMessage" { "sentAllMessage" } else { ty.as_str() };
            for ev in events.as_array().unwrap() {
                if !seen.insert((norm.to_owned(), ev.to_string())) && dedup {
                    continue;
                }
                expected += 1;
                let pos = unmatched
                    .iter()
                    .position(|r| {
                        r.topic == format!("huggy.{norm}")
                            && serde_json::from_slice::<serde_json::Value>(&r.value).ok().as_ref() == Some(ev)
                    })
                    .unwrap_or_else(|| panic!("{name}: no record on huggy.{norm} for {ev}"));
                let r = unmatched.remove(pos);
                assert!(bytes.windows(r.value.len()).any(|w| w == r.value.as_slice()), "{name}: value bytes altered");
                assert_eq!(r.key, expected_key(norm, ev), "{name}: key");
                assert_eq!(r.header("ce_specversion"), Some("1.0"));
                assert_eq!(r.header("ce_type"), Some(format!("app.huggy.{norm}").as_str()));
                assert_eq!(r.header("content-type"), Some("application/json"));
                assert_eq!(r.header("ce_time"), Some(rfc3339(time).as_str()), "{name}");
                let company = ev["company"]["id"].to_string().trim_matches('"').to_owned();
                assert_eq!(r.header("ce_source"), Some(format!("huggy://company/{company}").as_str()), "{name}");
                assert_eq!(r.header("ce_id").map(str::len), Some(32));
                assert_eq!(r.header("huggy_original_type"), (ty != norm).then_some(ty.as_str()), "{name}");
                assert_eq!(r.timestamp, Some(time * 1000), "{name}: CreateTime is the batch time");
                check_routing_headers(&name, norm, ev, r);
            }
        }
    }
    assert_eq!(expected, if dedup { 24 } else { 25 }, "fixture events");
    assert!(unmatched.is_empty(), "unexpected records: {unmatched:?}");
    let ids: std::collections::HashSet<_> = recs.iter().map(|r| r.header("ce_id")).collect();
    assert_eq!(ids.len(), 24, "one id per distinct event");
}

/// Independent statement of SPEC §5's routing headers for the fields the published examples have.
fn check_routing_headers(name: &str, ty: &str, ev: &serde_json::Value, r: &Rec) {
    use serde_json::Value;
    let text = |x: &Value| match x {
        Value::Number(n) => Some(n.to_string()),
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        _ => None,
    };
    let chat_event = matches!(ty, "startedChat" | "createdChat" | "agentEntered" | "closedChat" | "leftQueue");
    let chat_id = if chat_event { text(&ev["id"]) } else { text(&ev["chat"]["id"]).or_else(|| text(&ev["chatID"])) };
    let subject = match ty {
        "createdCustomer" | "updatedCustomer" => text(&ev["id"]).map(|id| format!("customer/{id}")),
        "agentChangedStatus" => text(&ev["id"]).map(|id| format!("agent/{id}")),
        _ => chat_id.as_ref().map(|id| format!("chat/{id}")),
    };
    let top = |k: &str| if chat_event { text(&ev[k]) } else { None };
    let channel = text(&ev["chat"]["channel"]).or_else(|| {
        if ev["channel"].is_object() {
            text(&ev["channel"]["type"])
        } else {
            text(&ev["channel"])
        }
    });
    let expected = [
        ("ce_subject", subject),
        ("huggy_company_id", text(&ev["company"]["id"])),
        ("huggy_chat_id", chat_id),
        ("huggy_sender_type", text(&ev["senderType"])),
        ("huggy_channel", channel),
        ("huggy_chat_situation", text(&ev["chat"]["situation"]).or_else(|| top("situation"))),
        ("huggy_chat_department", text(&ev["chat"]["department"]).or_else(|| top("department"))),
        ("huggy_internal", (ev["is_internal"] == Value::Bool(true)).then(|| "true".to_owned())),
    ];
    for (header, value) in expected {
        assert_eq!(r.header(header), value.as_deref(), "{name}: {header}");
    }
}

/// The topics the fixtures go to.
pub fn fixture_topics() -> Vec<String> {
    let mut t: Vec<String> = batch_fixtures()
        .iter()
        .flat_map(|(_, b)| {
            let v: serde_json::Value = serde_json::from_slice(b).unwrap();
            v["messages"].as_object().unwrap().keys().cloned().collect::<Vec<_>>()
        })
        .map(|ty| format!("huggy.{}", if ty == "sendedAllMessage" { "sentAllMessage" } else { &ty }))
        .collect();
    t.sort();
    t.dedup();
    t
}
