//! Any body: parsing and splitting never panic; every event's value is a byte-exact slice of the
//! body; a well-formed event's value is a JSON object (valid JSON text: numbers such as `128e613`,
//! out of range for an f64, are valid and kept as they are).
//!
//! Identity and dedup (SPEC §5 Event id, *Revised*): ids are a function of the batch and its token;
//! two tokens never share an id or a stream; and the spool's rule — a duplicate only when the id was
//! stored and the stream's last accepted run is this batch's run — decides exactly as a reference
//! model that keeps every stream's last run as the full list of its ids, over a sequence of batches
//! cut from the input (`X`, `Y`, `X`, `X`, `Y`, `X` from another token), so a state that returns
//! is never answered as a duplicate and a verbatim re-send of the last batch always is.
#![no_main]

use std::collections::{HashMap, HashSet};

use huggy_bridge::event;
use libfuzzer_sys::fuzz_target;

/// Events of `body` split as sent with `token`, or `None` when the body is not a batch.
fn events_of(body: &[u8], token: &str) -> Option<Vec<event::Event>> {
    let Ok(event::Body::Batch(batch)) = event::parse_body(body) else { return None };
    Some(event::split(&batch, &event::Sender::token(token), 0))
}

/// The rule as the spool applies it (digests), and the reference model (full id lists).
#[derive(Default)]
struct Judges {
    stored: HashSet<event::EventId>,
    runs: Option<event::StreamRuns>,
    model: HashMap<[u8; 16], Vec<event::EventId>>,
}

impl Judges {
    /// Judges one batch with both; panics when they disagree. Returns the duplicates' indexes.
    fn accept(&mut self, events: &[event::Event]) -> Vec<usize> {
        let runs = self.runs.get_or_insert_with(|| event::StreamRuns::new(3600, usize::MAX));
        let mut lists: HashMap<[u8; 16], Vec<event::EventId>> = HashMap::new();
        for ev in events {
            lists.entry(ev.lineage.as_ref().expect("every split event has a lineage").stream).or_default().push(ev.id);
        }
        let none = HashMap::new();
        let mut dups = Vec::new();
        for (i, ev) in events.iter().enumerate() {
            let l = ev.lineage.as_deref().expect("lineage");
            let by_rule = self.stored.contains(&ev.id) && runs.is_resend(Some(l), &none);
            let by_model = self.stored.contains(&ev.id) && self.model.get(&l.stream) == lists.get(&l.stream);
            assert_eq!(by_rule, by_model, "the dedup rule and its model disagree on event {i}");
            if by_rule {
                dups.push(i);
            }
        }
        for ev in events {
            self.stored.insert(ev.id);
            let l = ev.lineage.as_deref().expect("lineage");
            runs.record(l.stream, l.run, 0);
        }
        self.model.extend(lists);
        dups
    }
}

fuzz_target!(|input: &[u8]| {
    // The whole input is one body; cut at the first 0xFF (never in UTF-8 JSON) it is two.
    let (x, y) = match input.iter().position(|&b| b == 0xFF) {
        Some(at) => (&input[..at], &input[at + 1..]),
        None => (input, &b""[..]),
    };
    let Some(events) = events_of(x, "token-a") else { return };
    // Ids are a function of the batch (SPEC §5): the same body gives the same ids, and no two events
    // of one batch share one (repeats get their occurrence number).
    let again = events_of(x, "token-a").expect("parsed once, not twice");
    let ids: Vec<event::EventId> = events.iter().map(|e| e.id).collect();
    assert_eq!(ids, again.iter().map(|e| e.id).collect::<Vec<_>>());
    assert_eq!(
        events.iter().map(|e| e.lineage.clone()).collect::<Vec<_>>(),
        again.iter().map(|e| e.lineage.clone()).collect::<Vec<_>>(),
        "lineages are a function of the batch too"
    );
    let mut distinct = ids.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), ids.len(), "two events of one batch with one id");
    // Another token: other ids, other streams, never a duplicate of this token's events.
    let other = events_of(x, "token-b").expect("same body");
    let other_ids: HashSet<event::EventId> = other.iter().map(|e| e.id).collect();
    assert!(ids.iter().all(|id| !other_ids.contains(id)), "two tokens share an id");
    let streams: HashSet<[u8; 16]> = events.iter().map(|e| e.lineage.as_ref().expect("lineage").stream).collect();
    assert!(other.iter().all(|e| !streams.contains(&e.lineage.as_ref().expect("lineage").stream)), "two tokens share a stream");

    let y_events = events_of(y, "token-a").unwrap_or_default();
    let mut judges = Judges::default();
    assert!(judges.accept(&events).is_empty(), "nothing is a duplicate of what was never stored");
    assert_eq!(judges.accept(&events).len(), events.len(), "a verbatim re-send of the last batch is one");
    judges.accept(&y_events);
    judges.accept(&events);
    judges.accept(&events);
    judges.accept(&y_events);
    assert!(judges.accept(&other).is_empty(), "another token's identical events are new");

    for ev in events {
        assert!(x.windows(ev.value.len().max(1)).any(|w| w == ev.value.as_slice()) || ev.value.is_empty());
        if ev.dead_letter.is_none() {
            let raw: &serde_json::value::RawValue = serde_json::from_slice(&ev.value).expect("a published event is JSON");
            assert!(raw.get().starts_with('{') && raw.get().ends_with('}'));
        }
    }
});
