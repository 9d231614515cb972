//! The [`Event`] the rest of the pipeline carries, and the CloudEvents attributes derived from it:
//! `ce_source`, `ce_type` and `ce_time`, with the plausibility window of a batch `time`.

use serde::{Deserialize, Serialize};

use super::{EventId, EventType, Lineage, Routing};

/// A Huggy event split out of a batch, ready to be made durable and published.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Deterministic id: the same batch delivered again gives the same ids (`ce_id`).
    pub id: EventId,
    /// The normalized type, which picks the topic.
    pub event_type: EventType,
    /// The type as Huggy spelled it, when it was renamed (`sendedAllMessage`).
    pub(crate) original_type: Option<String>,
    /// The ordering key, a decimal string (chat, customer, agent or company id).
    pub key: Option<String>,
    /// Company id, for `ce_source`.
    pub(crate) company: Option<String>,
    /// Batch time (unix seconds), receipt time when the batch had none.
    pub(crate) time: i64,
    /// The event's bytes exactly as received.
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
    /// Set when the event cannot be published to its topic and goes to the dead-letter topic.
    pub dead_letter: Option<String>,
    /// File URLs to capture before publishing (filled by the files stage, empty otherwise).
    pub(crate) files: Vec<String>,
    /// The bridge's file results (a JSON array), published as header `huggy_bridge_files` once the
    /// files are stored or definitively failed. Never part of the value: a sender cannot write it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) file_results: Option<String>,
    /// What the spool's dedup needs besides the id (SPEC §5): the event's stream and that stream's
    /// run in its batch. In memory only, never in the spool's frames: `None` for events read back
    /// from disk and for events made outside a batch, which are then judged by their id alone.
    // Public for the fuzz targets, which check the dedup rule on split events' lineages.
    #[doc(hidden)]
    #[serde(skip)]
    pub lineage: Option<Box<Lineage>>,
    /// The routing headers, read in the same parse as the key.
    #[serde(default)]
    pub routing: Routing,
}

impl Event {
    /// Sets the file URLs to capture, as the files stage does when it finds them in the value.
    // Public for the benchmarks, which build spools of events with files through the library.
    #[doc(hidden)]
    pub fn set_files(&mut self, urls: Vec<String>) {
        self.files = urls;
    }

    pub(crate) fn ce_source(&self) -> String {
        format!("huggy://company/{}", self.company.as_deref().unwrap_or("unknown"))
    }

    pub(crate) fn ce_type(&self) -> String {
        format!("app.huggy.{}", self.event_type.as_str())
    }

    /// The event's time in Unix milliseconds, read from the batch `time` as Huggy may send it
    /// ([`time_millis`]); `None` when it is a plausible time in neither seconds nor milliseconds.
    pub fn time_millis(&self) -> Option<i64> {
        time_millis(self.time)
    }

    /// The `ce_time` header: the event's time as RFC 3339 (whole seconds, or milliseconds when the
    /// batch `time` had them); `None` when the batch `time` is not a plausible time, so the header
    /// is left out and the event still published (SPEC §5).
    pub fn ce_time(&self) -> Option<String> {
        let ms = self.time_millis()?;
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.unsigned_abs());
        Some(if ms % 1000 == 0 {
            humantime::format_rfc3339_seconds(t).to_string()
        } else {
            humantime::format_rfc3339_millis(t).to_string()
        })
    }
}

/// The times the bridge vouches for: 2000-01-01T00:00:00Z up to (not including) 2200-01-01, in
/// Unix seconds. Huggy sends seconds; some senders send milliseconds; the two windows are far apart
/// (10 digits against 13), so a value is read in the unit that makes it plausible.
const PLAUSIBLE_SECS: std::ops::Range<i64> = 946_684_800..7_258_118_400;

/// A batch `time` in Unix milliseconds: seconds (what Huggy documents) are scaled, milliseconds are
/// kept, and anything that is a plausible time in neither unit — negative, zero, a year past 2200
/// or before 2000 — is `None`. Never panics and never overflows, whatever a client sends.
pub fn time_millis(time: i64) -> Option<i64> {
    if PLAUSIBLE_SECS.contains(&time) {
        Some(time * 1000)
    } else if (PLAUSIBLE_SECS.start * 1000..PLAUSIBLE_SECS.end * 1000).contains(&time) {
        Some(time)
    } else {
        None
    }
}
