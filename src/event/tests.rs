use std::collections::HashSet;

use sha2::{Digest, Sha256};

use super::id::BatchStamp;
use super::parse::MAX_DEPTH;
use super::*;

pub(crate) fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Splits `batch` as the webhook does: its source is its own token's.
pub(crate) fn split_as_sent(batch: &Batch<'_>, received_at: i64) -> Vec<Event> {
    split(batch, &Sender::token(batch.token.expect("a token")), received_at)
}

/// The source of token `"t"`.
fn t() -> Source {
    Source::of_token("t")
}

pub(crate) fn batch(body: &[u8]) -> Batch<'_> {
    match parse_body(body).expect("parses") {
        Body::Batch(b) => b,
        Body::Handshake { .. } => panic!("not a batch"),
    }
}

/// (fixture, [(event type, key)]) for every published example, in document order.
pub(crate) const EXPECTED: &[(&str, &[(&str, &str)])] = &[
    ("agentChangedStatus.json", &[("agentChangedStatus", "40419")]),
    ("agentEntered.json", &[("agentEntered", "30608118")]),
    ("asyncExportData.json", &[("asyncExportData", "1")]),
    ("closedChat.json", &[("closedChat", "30608118")]),
    ("createdCustomer.json", &[("createdCustomer", "217806")]),
    ("finishedAutomationFlow.json", &[("finishedAutomationFlow", "99999")]),
    ("leftQueue.json", &[("leftQueue", "92340841")]),
    ("newInternalMessage.json", &[("newInternalMessage", "214420")]),
    ("receivedAllMessage.2.json", &[("receivedAllMessage", "2932423")]),
    ("receivedAllMessage.json", &[("receivedAllMessage", "19585255")]),
    ("receivedMessage.json", &[("receivedMessage", "2932424")]),
    ("sendedAllMessage.older-docs.json", &[("sentAllMessage", "13120639")]),
    ("sentAllMessage.json", &[("sentAllMessage", "13120639")]),
    (
        "startedAutomationFlow+finishedAutomationFlow.2.json",
        &[("startedAutomationFlow", "214570"), ("finishedAutomationFlow", "214570")],
    ),
    (
        "startedAutomationFlow+finishedAutomationFlow.json",
        &[("startedAutomationFlow", "214570"), ("finishedAutomationFlow", "214570")],
    ),
    ("startedAutomationFlow.json", &[("startedAutomationFlow", "99999")]),
    ("startedChat+receivedMessage.json", &[("startedChat", "171789"), ("receivedMessage", "171789")]),
    ("startedChat.json", &[("startedChat", "171780")]),
    ("startedWidgetAttendance.json", &[("startedWidgetAttendance", "9999")]),
    ("updatedChatDepartment.json", &[("updatedChatDepartment", "217618")]),
    ("updatedCustomer.json", &[("updatedCustomer", "217806")]),
    ("updatedWorkflowStep.json", &[("updatedWorkflowStep", "31155221")]),
];

#[test]
fn handshake_is_recognised() {
    let body = fixture("handshake.json");
    match parse_body(&body).unwrap() {
        Body::Handshake { token } => assert_eq!(token, Some("380c4e7399999999999999999999d354")),
        Body::Batch(_) => panic!("handshake parsed as a batch"),
    }
}

#[test]
fn old_spelling_is_renamed_and_remembered() {
    let body = fixture("sendedAllMessage.older-docs.json");
    let events = split_as_sent(&batch(&body), 0);
    assert_eq!(events[0].event_type, EventType::Known(KnownType::SentAllMessage));
    assert_eq!(events[0].original_type.as_deref(), Some("sendedAllMessage"));
    let body = fixture("sentAllMessage.json");
    assert_eq!(split_as_sent(&batch(&body), 0)[0].original_type, None);
}

#[test]
fn bytes_survive_exactly_big_ids_escapes_emoji_whitespace() {
    let body = "{ \"token\" : \"t\" ,\"time\":1700000000,\n \"messages\" : {\"receivedMessage\" : [ \
        {\"id\" :  123456789012345678901234567890 , \"body\":\"ol\\u00e1 \u{1F600} \\\"q\\\" \\ud83d\\ude00\",\r\n\t\"chat\" : {\"id\": 9007199254740993}, \
        \"company\":{\"id\":\"77\"}, \"id2\": 1.0e+2 }\n , {\"chat\":{\"id\":\"18446744073709551617\"}} ] } }";
    let events = split_as_sent(&batch(body.as_bytes()), 5);
    assert_eq!(events.len(), 2);
    let first = &events[0];
    let start = body.find("{\"id\" :").unwrap();
    let end = body.find("1.0e+2 }").unwrap() + "1.0e+2 }".len();
    assert_eq!(first.value, body.as_bytes()[start..end].to_vec());
    assert_eq!(first.key.as_deref(), Some("9007199254740993"));
    assert_eq!(first.company.as_deref(), Some("77"));
    assert_eq!(first.time, 1_700_000_000);
    assert_eq!(first.ce_time().as_deref(), Some("2023-11-14T22:13:20Z"));
    assert_eq!(first.ce_source(), "huggy://company/77");
    assert_eq!(events[1].key.as_deref(), Some("18446744073709551617"), "ids beyond 2^64 keep their digits");
}

#[test]
fn same_event_same_id_different_event_different_id() {
    let a = br#"{"token":"t","time":99,"messages":{"receivedMessage":[{"id":1,"chat":{"id":5}}]}}"#;
    let b = br#"{"token":"other", "time":99, "messages":{"receivedMessage":[{"id":1,"chat":{"id":5}}]}}"#;
    let c = br#"{"token":"t","time":99,"messages":{"receivedMessage":[{"id":2,"chat":{"id":5}}]}}"#;
    let d = br#"{"token":"t","time":99,"messages":{"receivedAllMessage":[{"id":1,"chat":{"id":5}}]}}"#;
    let id = |body: &[u8]| split_as_sent(&batch(body), 0)[0].id;
    assert_eq!(id(a), id(a), "a verbatim re-send keeps the id");
    assert_ne!(id(a), id(b), "two tokens' identical events are two events");
    let spaced = br#"{"token":"t", "time":99, "messages":{"receivedMessage":[{"id":1,"chat":{"id":5}}]}}"#;
    assert_eq!(id(a), id(spaced), "only token, type, batch time, event bytes and occurrence count");
    assert_ne!(id(a), id(c));
    assert_ne!(id(a), id(d), "the type is part of the id");
    // Pinned: ids must not change between releases, consumers deduplicate on them.
    assert_eq!(id(a).to_string(), PINNED_ID);
}

/// Changed once, deliberately, when the token's source joined the id (see CHANGELOG).
const PINNED_ID: &str = "838309afee9e14149304c7537181da01";

/// SPEC §5 restated independently of the implementation: SHA-256 over the token's source digest and
/// length-prefixed parts.
fn spec_id(token: &str, ty: &str, time: Option<i64>, messages: &[u8], value: &[u8], occurrence: u32) -> String {
    let mut h = Sha256::new();
    let source = Sha256::digest([&b"huggy-bridge source v1\0"[..], token.as_bytes()].concat());
    h.update(&source[..16]);
    h.update((ty.len() as u32).to_be_bytes());
    h.update(ty);
    match time {
        Some(t) => {
            h.update([1]);
            h.update(t.to_be_bytes());
        }
        None => {
            h.update([0]);
            h.update(Sha256::digest(messages));
        }
    }
    h.update((value.len() as u64).to_be_bytes());
    h.update(value);
    h.update(occurrence.to_be_bytes());
    hex::encode(&h.finalize()[..16])
}

#[test]
fn the_id_is_the_documented_digest() {
    let ev = br#"{"id":1,"chat":{"id":5}}"#;
    let body = br#"{"token":"t","time":99,"messages":{"receivedMessage":[{"id":1,"chat":{"id":5}}]}}"#;
    assert_eq!(split_as_sent(&batch(body), 0)[0].id.to_string(), spec_id("t", "receivedMessage", Some(99), b"", ev, 0));
    let messages = br#"{"sendedAllMessage":[{"id":1,"chat":{"id":5}}]}"#;
    let body = [&br#"{"token":"t","messages":"#[..], messages, b"}"].concat();
    assert_eq!(
        split_as_sent(&batch(&body), 0)[0].id.to_string(),
        spec_id("t", "sentAllMessage", None, messages, ev, 0),
        "without time; the normalized type"
    );
    // Length prefixes: moving bytes between the type and the value changes the id.
    assert_ne!(
        EventId::new(&Source::NONE, "ab", &BatchStamp::Time(1), b"c", 0),
        EventId::new(&Source::NONE, "a", &BatchStamp::Time(1), b"bc", 0)
    );
}

/// `fixture` with its `time` replaced and, when given, `from` replaced by `to` in the events.
fn variant(name: &str, time: i64, from: &str, to: &str) -> Vec<u8> {
    let mut v: serde_json::Value = serde_json::from_slice(&fixture(name)).unwrap();
    v["time"] = time.into();
    serde_json::to_string(&v).unwrap().replace(from, to).into_bytes()
}

#[test]
fn a_state_that_returns_in_a_later_batch_is_a_new_event() {
    let toggles = [
        ("agentChangedStatus.json", r#""isOnline":true"#, r#""isOnline":false"#),
        ("updatedChatDepartment.json", r#""department":30643"#, r#""department":30644"#),
    ];
    for (name, a, b) in toggles {
        let bodies = [
            variant(name, 1_700_000_000, a, a),
            variant(name, 1_700_000_060, a, b),
            variant(name, 1_700_000_120, a, a),
        ];
        let events: Vec<Event> = bodies.iter().map(|body| split_as_sent(&batch(body), 0).remove(0)).collect();
        assert_eq!(events[0].value, events[2].value, "{name}: first and third are byte-identical");
        assert_ne!(events[0].value, events[1].value, "{name}");
        let ids: HashSet<EventId> = events.iter().map(|e| e.id).collect();
        assert_eq!(ids.len(), 3, "{name}: three states, three ids");
        let again = split_as_sent(&batch(&bodies[2]), 0);
        assert_eq!(again[0].id, events[2].id, "{name}: the third batch re-sent keeps its id");
    }
}

#[test]
fn identical_events_in_one_batch_are_distinct_and_stable() {
    let body = br#"{"token":"t","time":5,"messages":{
        "agentChangedStatus":[{"id":7,"isOnline":true},{"id":7,"isOnline":false},{"id":7,"isOnline":true}],
        "sendedAllMessage":[{"id":1}],
        "sentAllMessage":[{"id":1}],
        "receivedMessage":[{"id":7,"isOnline":true}]
    }}"#;
    let events = split_as_sent(&batch(body), 0);
    let ids: HashSet<EventId> = events.iter().map(|e| e.id).collect();
    assert_eq!(ids.len(), events.len(), "every event of the batch has its own id");
    let ev = br#"{"id":7,"isOnline":true}"#;
    assert_eq!(events[0].id, EventId::new(&t(), "agentChangedStatus", &BatchStamp::Time(5), ev, 0));
    assert_eq!(events[2].id, EventId::new(&t(), "agentChangedStatus", &BatchStamp::Time(5), ev, 1));
    assert_eq!(events[4].id, EventId::new(&t(), "sentAllMessage", &BatchStamp::Time(5), br#"{"id":1}"#, 1), "one type");
    assert_eq!(events[5].id, EventId::new(&t(), "receivedMessage", &BatchStamp::Time(5), ev, 0), "counted per type");
    let again: Vec<EventId> = split_as_sent(&batch(body), 99).iter().map(|e| e.id).collect();
    assert_eq!(again, events.iter().map(|e| e.id).collect::<Vec<_>>(), "a re-send keeps every id, in order");
}

#[test]
fn a_batch_without_time_keeps_its_ids_on_a_resend_and_differs_from_other_batches() {
    let one = br#"{"token":"t","messages":{"updatedCustomer":[{"id":3,"name":"a"}]}}"#;
    let two = br#"{"token":"t","messages":{"updatedCustomer":[{"id":3,"name":"a"}],"closedChat":[{"id":1}]}}"#;
    let id = |body: &[u8], received_at| split_as_sent(&batch(body), received_at)[0].id;
    assert_eq!(id(one, 1), id(one, 2), "not the receipt time: a re-send a second later keeps the id");
    assert_ne!(id(one, 1), id(two, 1), "the same event in a different batch is a new event");
    let timed = br#"{"token":"t","time":1,"messages":{"updatedCustomer":[{"id":3,"name":"a"}]}}"#;
    assert_ne!(id(one, 1), id(timed, 1));
}

#[test]
fn a_timed_batch_reads_the_same_whichever_path_reads_it() {
    // A batch with a numeric `time` whose members are all arrays is read in one pass; a member that
    // is not an array (here a number no f64 holds) sends it through the general path. Both give
    // the same events, byte for byte and id for id.
    let usual = br#"{"token":"t","time":5,"messages":{"receivedMessage":[{"id":1,"chat":{"id":5}}, 42],"closedChat":[{"id":2,"chat":{"id":6}}]}}"#;
    let unusual = br#"{"token":"t","time":5,"messages":{"receivedMessage":[{"id":1,"chat":{"id":5}}, 42],"weird":1e999,"closedChat":[{"id":2,"chat":{"id":6}}]}}"#;
    let a = split_as_sent(&batch(usual), 0);
    let b = split_as_sent(&batch(unusual), 0);
    assert_eq!((a.len(), b.len()), (3, 4));
    assert_eq!(b[2].dead_letter.as_deref(), Some("event list is not an array"));
    assert_eq!(b[2].value, b"1e999");
    assert_eq!(a[..2], b[..2]);
    assert_eq!(a[2], b[3]);
    assert_eq!(a[1].dead_letter.as_deref(), Some("event is not an object"));
}

#[test]
fn bodies_that_are_not_batches_are_refused_with_a_code() {
    let cases: &[(&[u8], &str)] = &[
        (b"", "invalid_json"),
        (b"   \n ", "invalid_json"),
        (b"{\"token\":\"t\",\"messages\":{", "invalid_json"),
        (b"{\"token\":\"t\",\"messages\":{}} trailing", "invalid_json"),
        (b"[1,2]", "not_an_object"),
        (b"\"x\"", "not_an_object"),
        (b"12", "not_an_object"),
        (b"{\"token\":\"t\"}", "missing_messages"),
        (b"{\"token\":\"t\",\"messages\":null}", "missing_messages"),
        (b"{\"token\":\"t\",\"messages\":\"x\"}", "messages_not_object"),
        (b"{\"token\":\"t\",\"messages\":[]}", "messages_not_object"),
        (b"{\"token\":\"t\",\"token\":\"u\",\"messages\":{}}", "invalid_json"),
        (b"{\"token\":\"\xff\xfe\",\"messages\":{}}", "invalid_json"),
    ];
    for (body, code) in cases {
        let err = parse_body(body).expect_err(&String::from_utf8_lossy(body));
        assert_eq!(err.code(), *code, "{}", String::from_utf8_lossy(body));
    }
}

#[test]
fn deep_nesting_is_refused_without_overflowing_the_stack() {
    let depth = 100_000;
    let mut body = String::from("{\"token\":\"t\",\"messages\":{\"receivedMessage\":[");
    body.push_str(&"[".repeat(depth));
    body.push_str(&"]".repeat(depth));
    body.push_str("]}}");
    let refused = matches!(parse_body(body.as_bytes()), Err(BodyError::TooDeep));
    assert!(refused, "a 100,000-level body must be refused as too deep");
    let mut ok = String::from("{\"token\":\"t\",\"messages\":{\"x\":[");
    ok.push_str(&"[".repeat(MAX_DEPTH - 3));
    ok.push_str(&"]".repeat(MAX_DEPTH - 3));
    ok.push_str("]},\"s\":\"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\\\"\"}");
    assert!(parse_body(ok.as_bytes()).is_ok(), "brackets inside strings do not count");
}

/// Found by fuzzing (`fuzz/artifacts/parse_split/crash-efdb784f…`, the newInternalMessage fixture
/// with its id mutated to `128e613`): valid JSON that no f64 holds. It is published byte for byte;
/// the id is no decimal integer, so the key falls back to the chat.
#[test]
fn an_id_out_of_f64_range_is_kept_and_not_used_as_a_key() {
    let body =
        br#"{"token":"t","messages":{"newInternalMessage":[{"id": 128e613,"chat":{"id":214420},"company":{"id":1}}]}}"#;
    let events = split_as_sent(&batch(body), 0);
    assert!(events[0].dead_letter.is_none());
    assert_eq!(events[0].value, br#"{"id": 128e613,"chat":{"id":214420},"company":{"id":1}}"#.to_vec());
    assert_eq!(events[0].key.as_deref(), Some("214420"));
    let body = br#"{"token":"t","messages":{"closedChat":[{"id": 128e613,"company":{"id":9}}]}}"#;
    assert_eq!(split_as_sent(&batch(body), 0)[0].key.as_deref(), Some("9"), "no chat id: the company orders it");
}

#[test]
fn huge_numbers_pass_through_untouched() {
    let body =
        br#"{"token":"t","time":1e400,"messages":{"receivedMessage":[{"chat":{"id":1},"n":1e400,"m":-0.0e-999}]}}"#;
    let events = split_as_sent(&batch(body), 7);
    assert_eq!(events[0].value, br#"{"chat":{"id":1},"n":1e400,"m":-0.0e-999}"#.to_vec());
    assert_eq!(events[0].time, 7, "a time that is not an integer falls back to receipt time");
}

#[test]
fn tokens_that_are_not_strings_are_absent() {
    for body in [&br#"{"token":12,"messages":{}}"#[..], br#"{"token":{"a":1},"messages":{}}"#, br#"{"messages":{}}"#] {
        assert_eq!(batch(body).token, None);
    }
}

#[test]
fn lone_surrogates_are_dead_lettered_pairs_are_fine() {
    let body = br#"{"token":"t","messages":{"receivedMessage":[{"a":"\ud83d\ude00"},{"a":"\ud800"},{"a":"x\udc00"},{"a":"\\ud800"},{"a":"\ud800\u0041"}]}}"#;
    let events = split_as_sent(&batch(body), 0);
    let dead: Vec<bool> = events.iter().map(|e| e.dead_letter.is_some()).collect();
    assert_eq!(dead, vec![false, true, true, false, true]);
}

#[test]
fn a_batch_time_in_seconds_or_milliseconds_is_read_as_such_and_nonsense_is_left_out() {
    let at = |time: i64| {
        let body = format!(r#"{{"time":{time},"token":"t","messages":{{"agentChangedStatus":[{{"id":1}}]}}}}"#);
        let events = split_as_sent(&batch(body.as_bytes()), 7);
        (events[0].time_millis(), events[0].ce_time())
    };
    assert_eq!(at(1_700_000_000), (Some(1_700_000_000_000), Some("2023-11-14T22:13:20Z".into())));
    assert_eq!(at(1_700_000_000_123), (Some(1_700_000_000_123), Some("2023-11-14T22:13:20.123Z".into())));
    assert_eq!(at(1_700_000_000_000), (Some(1_700_000_000_000), Some("2023-11-14T22:13:20Z".into())));
    // Past the year 9999 as seconds (humantime's limit; 1978 if read as milliseconds), microseconds,
    // zero, negative, and the extremes of i64: no panic, no overflow, no `ce_time`.
    for nonsense in [253_402_300_800, 1_700_000_000_000_000, 0, -1, i64::MIN, i64::MAX] {
        assert_eq!(at(nonsense), (None, None), "time {nonsense}");
    }
}

/// Lineage of every event of `body`, as split with its own token.
fn lineages(body: &[u8]) -> Vec<Lineage> {
    split_as_sent(&batch(body), 0).iter().map(|e| *e.lineage.clone().expect("every split event has one")).collect()
}

#[test]
fn a_stream_is_token_type_and_key_and_its_run_is_the_whole_batch_of_it() {
    let body = br#"{"token":"t","time":5,"messages":{
        "updatedChatDepartment":[{"chat":{"id":1},"department":2},{"chat":{"id":1},"department":3},{"chat":{"id":9},"department":2}],
        "closedChat":[{"id":1}]
    }}"#;
    let l = lineages(body);
    assert_eq!(l[0], l[1], "one chat's events in one batch share stream and run");
    assert_ne!(l[0].stream, l[2].stream, "another key, another stream");
    assert_ne!(l[0].stream, l[3].stream, "another type, another stream");
    let other_token = String::from_utf8(body.to_vec()).unwrap().replacen(r#""token":"t""#, r#""token":"u""#, 1);
    let m = lineages(other_token.as_bytes());
    assert!(l.iter().zip(&m).all(|(a, b)| a.stream != b.stream), "another token, other streams");
    // The same last event after a different earlier one: a different run.
    let shorter = br#"{"token":"t","time":5,"messages":{"updatedChatDepartment":[{"chat":{"id":1},"department":3}]}}"#;
    assert_eq!(lineages(shorter)[0].stream, l[1].stream);
    assert_ne!(lineages(shorter)[0].run, l[1].run, "a run is every event of the stream in the batch, in order");
}

#[test]
fn online_offline_online_in_one_second_is_three_events_and_a_resend_is_one() {
    let online = br#"{"token":"t","time":1700000000,"messages":{"agentChangedStatus":[{"id":7,"isOnline":true}]}}"#;
    let offline = br#"{"token":"t","time":1700000000,"messages":{"agentChangedStatus":[{"id":7,"isOnline":false}]}}"#;
    let mut runs = StreamRuns::new(3600, 1000);
    let mut stored: HashSet<EventId> = HashSet::new();
    let none = std::collections::HashMap::new();
    // The spool's rule: a duplicate when the id was stored and the stream's last run is its own.
    let mut accept = |body: &[u8]| -> bool {
        let ev = split_as_sent(&batch(body), 0).remove(0);
        let l = *ev.lineage.unwrap();
        let duplicate = stored.contains(&ev.id) && runs.is_resend(Some(&l), &none);
        stored.insert(ev.id);
        runs.record(l.stream, l.run, 1_700_000_000);
        !duplicate
    };
    assert!(accept(online));
    assert!(accept(offline));
    assert!(accept(online), "the state returned: a new event although its id is the first's");
    assert!(!accept(online), "a verbatim re-send of the last batch is a duplicate");
}

#[test]
fn the_top_level_token_is_found_without_a_parse_wherever_it_sits() {
    for name in
        ["receivedMessage.json", "agentChangedStatus.json", "handshake.json", "startedChat+receivedMessage.json"]
    {
        let body = fixture(name);
        let parsed: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(top_level_token(&body), parsed["token"].as_str(), "{name}");
    }
    let cases: &[(&str, Option<&str>)] = &[
        (r#"{"token":"a"}"#, Some("a")),
        (r#" { "time" : 1 , "token" : "b" , "messages":{}}"#, Some("b")),
        (r#"{"messages":{"x":[{"token":"inner"}]},"token":"outer"}"#, Some("outer")),
        (r#"{"a":"he said \"token\":\"x\"","token":"c"}"#, Some("c")),
        (r#"{"a":[1,{"b":"}"}],"token":"d"}"#, Some("d")),
        (r#"{"token":"a\"b"}"#, None),
        (r#"{"token":5}"#, None),
        (r#"{"messages":{"x":[{"token":"inner"}]}}"#, None),
        (r#"["token","x"]"#, None),
        (r#"{"a":1 "token":"x"}"#, None),
        (r#"{"a":"#, None),
        ("", None),
        (r#"{"token":"first","token":"second"}"#, Some("first")),
    ];
    for (body, want) in cases {
        assert_eq!(top_level_token(body.as_bytes()), *want, "{body}");
    }
}

#[test]
fn the_envelope_alone_decides_the_token_and_the_refusals_as_the_full_parse_does() {
    let deep = format!(r#"{{"messages":{{"a":{}1{}}}}}"#, "[".repeat(MAX_DEPTH + 5), "]".repeat(MAX_DEPTH + 5));
    let mut bodies: Vec<Vec<u8>> = ["receivedMessage.json", "handshake.json", "startedChat+receivedMessage.json"]
        .into_iter()
        .map(fixture)
        .collect();
    let more: &[&[u8]] = &[
        b"",
        b"   \n ",
        b"{not json",
        b"[1,2]",
        b"[null,null,null,null]",
        b"12",
        br#"{"time":1,"messages":{"a":[1,2,3]}}"#,
        br#"{"messages":{"a":[1],"b":{"x":1},"a":[2]}}"#,
        br#"{"time":"x","messages":{"a":[1]},"token":"t"}"#,
        br#"{"time":1,"messages":{"a":[1]},"token":null}"#,
        br#"{"time":1,"messages":{"a":[1]},"token":5}"#,
        br#"{"time":1,"messages":{"a":[1]},"token":"t\u0031"}"#,
        br#"{"time":1,"messages":{"a":[1]},"tok\u0065n":"t"}"#,
        br#"{"tok\u0065n":"t","validToken":true}"#,
        br#"{"token":"t","validToken":false}"#,
        br#"{"validToken":true}"#,
        br#"{"time":1}"#,
        br#"{"messages":null}"#,
        br#"{"messages":"x"}"#,
        br#"{"messages":[]}"#,
        br#"{"messages":{"a":[1]}} trailing"#,
        br#"{"messages":{"a":[1]},"messages":{}}"#,
        br#"{"token":"a\u0062","token":"ab","messages":{}}"#,
        br#"{"messages":{"\ud800":[1]}}"#,
        br#"{"messages":{"a":["\ud800"]}}"#,
        b"{\"messages\":{\"a\":[\"\xff\"]}}",
    ];
    bodies.extend(more.iter().map(|b| b.to_vec()));
    bodies.push(deep.into_bytes());
    for body in &bodies {
        let what = String::from_utf8_lossy(body);
        let want = parse_body(body).map(|b| match b {
            Body::Handshake { token } | Body::Batch(Batch { token, .. }) => token,
        });
        assert_eq!(envelope_token(body), want, "{what}");
    }
}

#[test]
fn an_accounts_events_are_its_company_and_one_naming_another_is_dead_lettered() {
    let body = br#"{"token":"t","time":5,"messages":{"agentChangedStatus":[
        {"id":7,"company":{"id":15693}},
        {"id":8,"company":{"id":99}},
        {"id":9},
        {"id":10,"companyID":"015693"}
    ],"closedChat":[{"company":{"id":99}}], "updatedChatDepartment":[3]}}"#;
    let account = Sender { source: Source::of_token("t"), account: Some("15693".into()) };
    let events = split(&batch(body), &account, 0);
    let companies: Vec<Option<&str>> = events.iter().map(|e| e.company.as_deref()).collect();
    assert_eq!(companies, [Some("15693"); 6], "ce_source is the account's, whatever the event says");
    let dead: Vec<Option<&str>> = events.iter().map(|e| e.dead_letter.as_deref()).collect();
    assert_eq!(
        dead,
        [None, Some(COMPANY_MISMATCH), None, None, Some(COMPANY_MISMATCH), Some("event is not an object")],
        "another company: dead-lettered; none: the account's; leading zeros are the same id"
    );
    assert_eq!(events[4].key.as_deref(), Some("15693"), "a company key is the account's, not the claimed one");
    // Without an account the event names its company, as before.
    let plain = split_as_sent(&batch(body), 0);
    assert_eq!(plain[1].company.as_deref(), Some("99"));
    assert!(plain.iter().take(5).all(|e| e.dead_letter.is_none()));
    assert_eq!(plain.iter().map(|e| e.id).collect::<Vec<_>>(), events.iter().map(|e| e.id).collect::<Vec<_>>());
}

#[test]
fn an_account_refuses_every_company_member_it_cannot_vouch_for() {
    // (event, whether a token bound to company 15693 may publish it)
    let cases: &[(&str, bool)] = &[
        (r#"{"id":1,"company":{"id":15693},"companyID":99999}"#, false),
        (r#"{"id":1,"company":{"id":15693},"companyID":"99999"}"#, false),
        (r#"{"id":1,"companyID":"15693","company":{"id":99999}}"#, false),
        (r#"{"id":1,"company":{"id":"99999 "}}"#, false),
        (r#"{"id":1,"company":{"id":" 15693"}}"#, false),
        (r#"{"id":1,"company":{"id":9.9999e4}}"#, false),
        (r#"{"id":1,"company":{"id":15693.0}}"#, false),
        (r#"{"id":1,"company":{"id":-15693}}"#, false),
        (r#"{"id":1,"company":{"id":{"id":15693}}}"#, false),
        (r#"{"id":1,"company":{"id":15693,"id":99999}}"#, false),
        (r#"{"id":1,"company":{"id":99999,"id":15693}}"#, false),
        (r#"{"id":1,"company":{"id":15693,"id":"x"}}"#, false),
        (r#"{"id":1,"company":99999}"#, false),
        (r#"{"id":1,"company":[15693]}"#, false),
        (r#"{"id":1,"companyID":""}"#, false),
        (r#"{"id":1,"companyID":"9.9999e4"}"#, false),
        // What Huggy sends: a number, or digits in a string; both members when it sends both.
        (r#"{"id":1,"company":{"id":15693}}"#, true),
        (r#"{"id":1,"company":{"id":"15693"}}"#, true),
        (r#"{"id":1,"companyID":"15693","company":{"id":"15693"}}"#, true),
        (r#"{"id":1,"companyID":15693,"company":{"id":15693}}"#, true),
        (r#"{"id":1,"company":{"id":15693,"id":"15693"}}"#, true),
        // No company stated: the account's, as before.
        (r#"{"id":1}"#, true),
        (r#"{"id":1,"company":{"name":"Huggy Testing"}}"#, true),
        (r#"{"id":1,"company":{"id":null},"companyID":null}"#, true),
        (r#"{"id":1,"company":null}"#, true),
    ];
    let account = Sender { source: Source::of_token("t"), account: Some("15693".into()) };
    for (event, allowed) in cases {
        let body = format!(r#"{{"token":"t","time":5,"messages":{{"agentChangedStatus":[{event}]}}}}"#);
        let ev = split(&batch(body.as_bytes()), &account, 0).remove(0);
        let want = if *allowed { None } else { Some(COMPANY_MISMATCH) };
        assert_eq!(ev.dead_letter.as_deref(), want, "{event}");
        assert_eq!(ev.company.as_deref(), Some("15693"), "{event}: the account's, whatever the event says");
        assert_eq!(ev.key.as_deref(), Some("1"), "{event}");
    }
    // Without an account nothing is refused for its company members, as before.
    for (event, _) in cases {
        let body = format!(r#"{{"token":"t","time":5,"messages":{{"agentChangedStatus":[{event}]}}}}"#);
        assert_eq!(split_as_sent(&batch(body.as_bytes()), 0)[0].dead_letter, None, "{event}");
    }
}

#[test]
fn every_published_example_passes_the_check_of_its_own_account() {
    for (name, _) in EXPECTED {
        let body = fixture(name);
        let plain = split_as_sent(&batch(&body), 0);
        for ev in &plain {
            let company = ev.company.clone().unwrap_or_else(|| panic!("{name}: names its company"));
            let account = Sender { source: Source::of_token("t"), account: Some(company.clone()) };
            let bound = split(&batch(&body), &account, 0);
            for b in &bound {
                assert_eq!(b.dead_letter, None, "{name}: bound to {company}");
                assert_eq!(b.company.as_deref(), Some(company.as_str()), "{name}");
            }
            let other = Sender { source: Source::of_token("t"), account: Some("424242".into()) };
            for b in split(&batch(&body), &other, 0) {
                assert_eq!(b.dead_letter.as_deref(), Some(COMPANY_MISMATCH), "{name}: bound to another account");
            }
        }
    }
}

#[test]
fn the_refusals_split_makes_are_known_as_refusals() {
    let body = br#"{"token":"t","time":5,"messages":{
        "receivedMessage":[{"id":1,"company":{"id":99}}, {"id":2,"body":"\ud800"}, {"id":3,"chat":{"id":1},"chat":{"id":2}}, 4],
        "bad type!":[{"id":5}],
        "closedChat":{"id":6}}}"#;
    let account = Sender { source: Source::of_token("t"), account: Some("15693".into()) };
    let reasons: Vec<String> =
        split(&batch(body), &account, 0).into_iter().map(|e| e.dead_letter.expect("dead")).collect();
    let refused: Vec<bool> = reasons.iter().map(|r| is_refusal(r)).collect();
    assert_eq!(refused, [true, true, true, false, true, false], "{reasons:?}");
    assert_eq!(reasons[0], COMPANY_MISMATCH);
    // Not refusals: what cannot be published stays anyway, or (a lone event sent without its
    // array) can be published as it is; and Kafka's permanent errors, which a fix of the cause cures.
    assert!(!is_refusal("Message production error: MessageSizeTooLarge (Broker: Message size too large)"));
}

/// The routing headers of an event as `name=value` pairs in header order.
fn routing_line(ev: &Event) -> String {
    ev.routing.headers(ev.company.as_deref()).map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ")
}

#[test]
fn routing_headers_of_every_published_example() {
    let expected: &[(&str, &[&str])] = &[
        ("agentChangedStatus.json", &["ce_subject=agent/40419 huggy_company_id=15693"]),
        (
            "agentEntered.json",
            &["ce_subject=chat/30608118 huggy_company_id=15691 huggy_chat_id=30608118 huggy_channel=email huggy_chat_situation=in_chat"],
        ),
        ("asyncExportData.json", &["huggy_company_id=1"]),
        (
            "closedChat.json",
            &["ce_subject=chat/30608118 huggy_company_id=15691 huggy_chat_id=30608118 huggy_channel=email huggy_chat_situation=finishing"],
        ),
        ("createdCustomer.json", &["ce_subject=customer/217806 huggy_company_id=1"]),
        ("finishedAutomationFlow.json", &["ce_subject=chat/99999 huggy_company_id=99999 huggy_chat_id=99999"]),
        (
            "leftQueue.json",
            &["ce_subject=chat/92340841 huggy_company_id=15693 huggy_chat_id=92340841 huggy_chat_situation=in_chat"],
        ),
        (
            "newInternalMessage.json",
            &["ce_subject=chat/214420 huggy_company_id=1 huggy_chat_id=214420 huggy_sender_type=agent huggy_channel=telegram_bot huggy_chat_situation=in_chat huggy_internal=true"],
        ),
        (
            "receivedAllMessage.2.json",
            &["ce_subject=chat/2932423 huggy_company_id=9999 huggy_chat_id=2932423 huggy_sender_type=widget huggy_channel=widget huggy_chat_situation=in_chat huggy_chat_department=11445"],
        ),
        (
            "receivedAllMessage.json",
            &["ce_subject=chat/19585255 huggy_company_id=15691 huggy_chat_id=19585255 huggy_sender_type=widget huggy_channel=widget huggy_chat_situation=in_chat"],
        ),
        (
            "receivedMessage.json",
            &["ce_subject=chat/2932424 huggy_company_id=6618 huggy_chat_id=2932424 huggy_sender_type=widget huggy_channel=widget huggy_chat_situation=wait_for_chat huggy_chat_department=11445"],
        ),
        (
            "sendedAllMessage.older-docs.json",
            &["ce_subject=chat/13120639 huggy_company_id=11721 huggy_chat_id=13120639 huggy_sender_type=agent huggy_channel=widget huggy_chat_situation=in_chat"],
        ),
        (
            "sentAllMessage.json",
            &["ce_subject=chat/13120639 huggy_company_id=11721 huggy_chat_id=13120639 huggy_sender_type=agent huggy_channel=widget huggy_chat_situation=in_chat"],
        ),
        (
            "startedAutomationFlow+finishedAutomationFlow.2.json",
            &[
                "ce_subject=chat/214570 huggy_company_id=1 huggy_chat_id=214570",
                "ce_subject=chat/214570 huggy_company_id=1 huggy_chat_id=214570",
            ],
        ),
        (
            "startedAutomationFlow+finishedAutomationFlow.json",
            &[
                "ce_subject=chat/214570 huggy_company_id=1 huggy_chat_id=214570",
                "ce_subject=chat/214570 huggy_company_id=1 huggy_chat_id=214570",
            ],
        ),
        ("startedAutomationFlow.json", &["ce_subject=chat/99999 huggy_company_id=99999 huggy_chat_id=99999"]),
        (
            "startedChat+receivedMessage.json",
            &[
                "ce_subject=chat/171789 huggy_company_id=3526 huggy_chat_id=171789 huggy_chat_situation=auto",
                "ce_subject=chat/171789 huggy_company_id=3526 huggy_chat_id=171789 huggy_sender_type=widget huggy_channel=widget huggy_chat_situation=wait_for_chat",
            ],
        ),
        (
            "startedChat.json",
            &["ce_subject=chat/171780 huggy_company_id=3526 huggy_chat_id=171780 huggy_channel=Email huggy_chat_situation=auto"],
        ),
        ("startedWidgetAttendance.json", &["huggy_company_id=9999"]),
        (
            "updatedChatDepartment.json",
            &["ce_subject=chat/217618 huggy_company_id=1 huggy_chat_id=217618 huggy_channel=widget huggy_chat_situation=in_chat huggy_chat_department=30643"],
        ),
        ("updatedCustomer.json", &["ce_subject=customer/217806 huggy_company_id=1"]),
        (
            "updatedWorkflowStep.json",
            &["ce_subject=chat/31155221 huggy_company_id=11721 huggy_chat_id=31155221 huggy_channel=widget huggy_chat_situation=in_chat"],
        ),
    ];
    assert_eq!(expected.len(), EXPECTED.len(), "every published example");
    for (name, lines) in expected {
        let body = fixture(name);
        let events = split_as_sent(&batch(&body), 0);
        let got: Vec<String> = events.iter().map(routing_line).collect();
        assert_eq!(got, *lines, "{name}");
        for ev in &events {
            // The key is the subject's id: one parse decides both.
            let subject_id = ev.routing.subject.as_deref().and_then(|s| s.split_once('/')).map(|(_, id)| id);
            assert_eq!(subject_id.or(ev.company.as_deref()), ev.key.as_deref(), "{name}");
        }
    }
}

/// One event of `event_type` in a batch, split.
fn one(event_type: &str, event: &str) -> Event {
    let body = format!(r#"{{"token":"t","time":1700000000,"messages":{{"{event_type}":[{event}]}}}}"#);
    split_as_sent(&batch(body.as_bytes()), 0).remove(0)
}

#[test]
fn routing_headers_of_internal_bot_and_whatsapp_events() {
    let internal = one(
        "newInternalMessage",
        r#"{"id":1,"is_internal":true,"senderType":"agent","chat":{"id":7,"channel":"whatsapp","situation":"in_chat","department":false},"company":{"id":3}}"#,
    );
    assert_eq!(
        routing_line(&internal),
        "ce_subject=chat/7 huggy_company_id=3 huggy_chat_id=7 huggy_sender_type=agent huggy_channel=whatsapp huggy_chat_situation=in_chat huggy_internal=true"
    );
    let whatsapp = one(
        "receivedMessage",
        r#"{"id":"2","is_internal":false,"senderType":"whatsapp","channel":"whatsapp","chat":{"id":"8","channel":"whatsapp","situation":"wait_for_chat","department":{"id":55}},"company":{"id":"3"}}"#,
    );
    assert_eq!(
        routing_line(&whatsapp),
        "ce_subject=chat/8 huggy_company_id=3 huggy_chat_id=8 huggy_sender_type=whatsapp huggy_channel=whatsapp huggy_chat_situation=wait_for_chat huggy_chat_department=55"
    );
    let bot =
        one("createdChat", r#"{"id":9,"situation":"auto","channel":"whatsapp","department":12,"company":{"id":3}}"#);
    assert_eq!(
        routing_line(&bot),
        "ce_subject=chat/9 huggy_company_id=3 huggy_chat_id=9 huggy_channel=whatsapp huggy_chat_situation=auto huggy_chat_department=12"
    );
    // Only a JSON `true` is internal; a message's own `situation` is no chat situation.
    let not_internal = one("receivedMessage", r#"{"id":3,"is_internal":"true","situation":"x","chat":{"id":1}}"#);
    assert_eq!(routing_line(&not_internal), "ce_subject=chat/1 huggy_chat_id=1");
    assert_eq!(
        one("agentChangedStatus", r#"{"id":40,"status":"online"}"#).routing.subject.as_deref(),
        Some("agent/40")
    );
}

#[test]
fn routing_values_that_are_not_plain_labels_are_left_out_and_the_event_kept() {
    // A duplicated routing member is ambiguous: its header is left out, the event published.
    let dup = one(
        "receivedMessage",
        r#"{"senderType":"agent","senderType":"widget","chat":{"id":1,"channel":"a","channel":"b"}}"#,
    );
    assert_eq!((dup.dead_letter.as_deref(), routing_line(&dup).as_str()), (None, "ce_subject=chat/1 huggy_chat_id=1"));
    // A duplicated key member stays what it was: an event that cannot be read.
    let dup_id = one("startedChat", r#"{"id":1,"id":2}"#);
    assert!(dup_id.dead_letter.as_deref().is_some_and(|r| r.contains("duplicate field `id`")), "{dup_id:?}");
    let odd = format!(
        r#"{{"senderType":"a\"b","channel":"{}","chat":{{"id":1,"situation":"","department":"x1","channel":7}}}}"#,
        "w".repeat(65)
    );
    let odd = one("receivedMessage", &odd);
    assert_eq!(routing_line(&odd), "ce_subject=chat/1 huggy_chat_id=1");
    // The routing headers read again from stored bytes are the ones split read.
    let again = routing_of(&odd.event_type, &odd.value);
    assert_eq!(again, odd.routing);
    let body = fixture("newInternalMessage.json");
    for ev in split_as_sent(&batch(&body), 0) {
        assert_eq!(routing_of(&ev.event_type, &ev.value), ev.routing);
    }
}
