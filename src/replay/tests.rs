//! Unit tests of replay's decisions: what is republished, what is left, what is skipped.

use super::*;

#[test]
fn the_committed_offset_moves_over_done_records_until_the_first_left_one() {
    let mut p = Progress::from_commit(Offset::Invalid);
    assert_eq!(p.next, 0);
    p.record(0, true);
    p.record(1, true);
    assert_eq!(p.next, 2);
    p.record(2, false);
    p.record(3, true);
    assert_eq!(p.next, 2, "a left record holds the committed offset");
    assert_eq!(Progress::from_commit(Offset::Offset(7)).next, 7);
}

#[test]
fn markers_name_a_partition_and_an_offset() {
    assert_eq!(parse_marker("2:41"), Some((2, 41)));
    assert_eq!(parse_marker("2"), None);
    assert_eq!(parse_marker("x:1"), None);
}

/// A dead letter's headers, as the bridge writes them.
fn dead_letter(reason: &str) -> [(&'static str, &str); 4] {
    [
        ("ce_id", "0123456789abcdef0123456789abcdef"),
        ("ce_type", "app.huggy.receivedMessage"),
        ("huggy_dlq_reason", reason),
        ("huggy_dlq_topic", "huggy.receivedMessage"),
    ]
}

fn route_of<'h>(headers: &[(&'static str, &'h str)], opts: &ReplayOptions) -> Result<Routed<'h>, Decision> {
    let cfg = crate::config::KafkaConfig::default();
    let lookup = |name: &str| headers.iter().find(|(k, _)| *k == name).map(|(_, v)| *v);
    route(lookup, opts, &Routes::new(&cfg), &cfg.dead_letter_topic)
}

/// Where a record would be replayed to, or the decision that keeps it, as text.
fn replayed<'h>(headers: &[(&'static str, &'h str)], opts: &ReplayOptions) -> Result<Routed<'h>, String> {
    route_of(headers, opts).map_err(|d| format!("{d:?}"))
}

#[test]
fn a_record_refused_by_policy_is_skipped_and_a_retryable_one_replayed() {
    let all = ReplayOptions::default();
    let to_its_topic = Ok(Routed { id: "0123456789abcdef0123456789abcdef", topic: "huggy.receivedMessage".into() });
    let retryable = "Message production error: MessageSizeTooLarge (Broker: Message size too large)";
    assert_eq!(replayed(&dead_letter(retryable), &all), to_its_topic);
    assert_eq!(replayed(&dead_letter("manual-fix"), &all), to_its_topic, "a reason the bridge does not give");

    let refused = [
        "company_mismatch",
        "event has a \\u escape of a lone UTF-16 surrogate",
        "event cannot be read: duplicate field `chat` at line 1 column 20",
        "event type has characters outside [A-Za-z0-9._-]",
    ];
    for reason in refused {
        match route_of(&dead_letter(reason), &all) {
            Err(Decision::Filtered(why)) => assert!(why.contains("by policy") && why.contains(reason), "{why}"),
            other => panic!("{reason}: {other:?}"),
        }
        let blank = ReplayOptions { reason: Some(" ".into()), ..ReplayOptions::default() };
        assert!(matches!(route_of(&dead_letter(reason), &blank), Err(Decision::Filtered(_))), "{reason}");
    }
    // Named with --reason, the operator asks for it.
    let asked = ReplayOptions { reason: Some("COMPANY_MISMATCH".into()), ..ReplayOptions::default() };
    assert_eq!(replayed(&dead_letter("company_mismatch"), &asked), to_its_topic);
    assert!(matches!(
        route_of(&dead_letter(refused[1]), &asked),
        Err(Decision::Filtered(why)) if why.contains("reason does not contain")
    ));
}

#[test]
fn only_json_objects_are_replayable() {
    assert!(is_json_object(b" {\"a\":[1]}"));
    assert!(!is_json_object(b"[1,2]"));
    assert!(!is_json_object(b"{\"a\":"));
    assert!(!is_json_object(b""));
}
