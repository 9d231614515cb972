//! Any body: parsing and splitting never panic; every event's value is a byte-exact slice of the
//! body; a well-formed event's value is a JSON object (valid JSON text: numbers such as `128e613`,
//! out of range for an f64, are valid and kept as they are).
#![no_main]

#[path = "../../src/json.rs"]
mod json;
#[allow(dead_code)]
#[path = "../../src/event/mod.rs"]
mod event;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    let Ok(event::Body::Batch(batch)) = event::parse_body(body) else { return };
    let events = event::split(&batch, 0);
    // Ids are a function of the batch (SPEC §5): the same body gives the same ids, and no two events
    // of one batch share one (repeats get their occurrence number).
    let Ok(event::Body::Batch(again)) = event::parse_body(body) else { panic!("parsed once, not twice") };
    let ids: Vec<event::EventId> = events.iter().map(|e| e.id).collect();
    assert_eq!(ids, event::split(&again, 0).iter().map(|e| e.id).collect::<Vec<_>>());
    let mut distinct = ids.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), ids.len(), "two events of one batch with one id");
    for ev in events {
        assert!(body.windows(ev.value.len().max(1)).any(|w| w == ev.value.as_slice()) || ev.value.is_empty());
        if ev.dead_letter.is_none() {
            let raw: &serde_json::value::RawValue = serde_json::from_slice(&ev.value).expect("a published event is JSON");
            assert!(raw.get().starts_with('{') && raw.get().ends_with('}'));
        }
    }
});
