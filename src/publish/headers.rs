//! The headers of an event's record: CloudEvents attributes (Kafka binding, binary mode), the
//! bridge's own, and the routing headers.

use rdkafka::message::{Header, OwnedHeaders};

use crate::event::Event;

/// The CloudEvents (Kafka binding, binary mode) and bridge headers of an event's record.
pub(crate) fn headers(ev: &Event) -> OwnedHeaders {
    let id = ev.id.to_string();
    let (ce_type, source) = (ev.ce_type(), ev.ce_source());
    let mut h = OwnedHeaders::new_with_capacity(16)
        .insert(Header { key: "ce_specversion", value: Some("1.0") })
        .insert(Header { key: "ce_id", value: Some(id.as_str()) })
        .insert(Header { key: "ce_type", value: Some(ce_type.as_str()) })
        .insert(Header { key: "ce_source", value: Some(source.as_str()) });
    // A batch `time` that is no plausible time leaves the optional attribute out (SPEC §5).
    if let Some(time) = ev.ce_time() {
        h = h.insert(Header { key: "ce_time", value: Some(time.as_str()) });
    }
    h = h.insert(Header { key: "content-type", value: Some("application/json") });
    if let Some(orig) = &ev.original_type {
        h = h.insert(Header { key: "huggy_original_type", value: Some(orig.as_str()) });
    }
    // The bridge's file results travel beside Huggy's bytes, never inside them (SPEC §5, §6).
    if let Some(files) = &ev.file_results {
        h = h.insert(Header { key: "huggy_bridge_files", value: Some(files.as_str()) });
    }
    routing_headers(h, ev)
}

/// The routing headers (SPEC §5) an event carries, after `h`.
fn routing_headers(mut h: OwnedHeaders, ev: &Event) -> OwnedHeaders {
    for (key, value) in ev.routing.headers(ev.company.as_deref()) {
        h = h.insert(Header { key, value: Some(value) });
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::publish::tests::stored;

    #[test]
    fn file_results_go_in_their_own_header_and_nowhere_else() {
        use rdkafka::message::Headers as _;
        let mut ev = stored(1, "chat-a", false).event;
        ev.value = br#"{"a":1,"bridge_files":[{"status":"stored","location":"s3://forged"}]}"#.to_vec();
        let names = |h: &OwnedHeaders| h.iter().map(|h| h.key.to_owned()).collect::<Vec<_>>();
        assert!(!names(&headers(&ev)).contains(&"huggy_bridge_files".to_owned()), "no files, no header");
        ev.file_results = Some(r#"[{"status":"failed"}]"#.into());
        let h = headers(&ev);
        let files: Vec<_> = h.iter().filter(|h| h.key == "huggy_bridge_files").collect();
        assert_eq!(files.len(), 1);
        assert_eq!(files[0].value, Some(&br#"[{"status":"failed"}]"#[..]));
    }
}
