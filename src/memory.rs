//! The worst-case memory of a configuration: what `check-config` prints and what a container's
//! memory limit must cover (the shipped Kubernetes limit is checked against it by a test).
//!
//! Each [`Term`] bounds one consumer from the configuration and the constants of the module that
//! owns it. Two things no configuration bounds are [`Assumptions`], printed with the figure: the
//! peak event rate (the dedup window holds the ids of every event stored within
//! `spool.dedup_window_secs`) and the smallest event (an event costs memory for itself, not only
//! for its bytes, so a body of tiny events holds more than its size). The terms:
//!
//! | term | bound |
//! |---|---|
//! | request bodies | `http.max_inflight_bytes` (past it, 503 before a body is read) |
//! | connection buffers | `http.max_connections` × 64 KiB read buffer each |
//! | TLS sessions (with `[http.tls]`) | `http.max_connections` × [`crate::http::TLS_CONNECTION_BYTES`]: rustls' buffers of each connection |
//! | parsed events | the events split out of the bodies in flight: a copy of their bytes (≤ the bodies) and [`EVENT_STRUCT_BYTES`] each, at most one per `min_event_bytes` of body |
//! | write group (spool mode) | the group the spool writer encodes: 8 MiB, or one larger batch alone (`http.max_body_bytes` of events and their frames) |
//! | publisher window (spool mode) | event values read for Kafka: 32 MiB plus one event, with librdkafka's copy of each; [`EVENT_STRUCT_BYTES`] per record of `kafka.max_in_flight_records` |
//! | parked events (spool mode) | events waiting for their files (and the later events of their keys), kept without their bytes: [`crate::publish::PARKED_PER_WINDOW`] per record of `kafka.max_in_flight_records` (and one read's worth more), [`EVENT_STRUCT_BYTES`] each, [`crate::publish::PARKED_URL_BYTES`] of URLs |
//! | producer copies (kafka mode) | librdkafka's copy of the events of the requests in flight (≤ `http.max_inflight_bytes`) |
//! | undelivered index (spool mode) | not an entry per undelivered event: a [`SEGMENT_ENTRY_BYTES`] entry per segment (`spool.max_bytes` ÷ the segment size, + 2), at most 4,096 receipt-time runs of 16 bytes, and the ranges of acknowledged seqs, about one per record read and not yet acknowledged ([`DONE_RANGE_BYTES`] per record of `kafka.max_in_flight_records`) |
//! | dedup window (spool mode) | `peak_events_per_sec` × `spool.dedup_window_secs` ids, at most `spool.dedup_max_ids`, one slice more while the oldest expires, one table of a slice doubling, ≤ 40 bytes an id; as many streams' last runs, ≤ 76 bytes each, × 3/2 while a table doubles |
//! | recovery buffers (spool mode) | segments are read in 1 MiB chunks; a frame larger than that is read whole (≤ one batch) |
//! | file work (spool mode) | events waiting for their files are read back from the log, not held: recovery holds the oldest [`crate::spool::FILE_WORK_HELD`] at most ([`crate::spool::FILE_WORK_HELD_BYTES`] of URLs), the capture stage takes [`crate::files::QUEUED_JOBS`] at most ([`crate::files::QUEUED_URL_BYTES`] of URLs), either one event's more (≤ one batch); [`FILE_JOB_BYTES`] per job besides its URLs; the capture feed's and the publisher's look-ahead's 1 MiB chunks. File results are read from the log, not held |
//! | file buffers | `files.max_buffer_bytes`: every download reserves its upload buffer (its size, at most one part) from this budget before reading its body |
//! | file connections | `files.max_concurrency` downloads' own buffers, [`crate::files::CONNECTION_BYTES`] each (HTTP and TLS read buffers, the chunk between reader and writer) |
//! | runtime | [`RUNTIME_BYTES`]: code, thread stacks, librdkafka's threads and broker buffers, metrics |
//! | allocator slack | one eighth of everything above: jemalloc's size classes round small allocations up |
//!
//! Not counted: the Kafka client's queue beyond the records the bridge hands it (it holds only
//! those).

use std::fmt;

use crate::config::{AckMode, Config};
use crate::event::lineage::STREAM_MAX_BYTES;
use crate::event::Event;

/// What no configuration key bounds; `check-config --peak-events-per-sec … --min-event-bytes …`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Assumptions {
    /// Events stored per second at the peak: the dedup window's size.
    pub peak_events_per_sec: u64,
    /// The smallest event a batch carries, in bytes of JSON. The smallest in Huggy's published
    /// payloads is 146 bytes (`closedChat`); a sender with a token could send smaller ones.
    pub min_event_bytes: u64,
}

impl Default for Assumptions {
    fn default() -> Self {
        Self { peak_events_per_sec: DEFAULT_PEAK_EVENTS_PER_SEC, min_event_bytes: DEFAULT_MIN_EVENT_BYTES }
    }
}

/// Default of [`Assumptions::peak_events_per_sec`]: five times the rate the README's sizing uses.
pub const DEFAULT_PEAK_EVENTS_PER_SEC: u64 = 500;
/// Default of [`Assumptions::min_event_bytes`]: below the smallest event Huggy documents.
pub const DEFAULT_MIN_EVENT_BYTES: u64 = 128;

/// Memory of an event's file work besides its URLs: the work itself, the capture stage's job
/// state, one scheduling entry per file (a few files per event), rounded up.
pub const FILE_JOB_BYTES: u64 = 512;

/// Memory of one parsed event besides its bytes: the struct and the small strings it owns (type,
/// key, company), each rounded up to an allocator size class.
pub const EVENT_STRUCT_BYTES: u64 = std::mem::size_of::<Event>() as u64 + 3 * 32 + 16;
/// Bytes of an event's frame in a segment besides its value: frame header (12), kind, sequence,
/// receipt time, id, time, lengths and option tags (62), type, key and company (up to 64 together
/// for Huggy's types and numeric ids); see `spool::format`.
pub const FRAME_OVERHEAD_BYTES: u64 = 12 + 62 + 64;
/// One segment in the spool's list: its path (a `PathBuf` of about 80 bytes in a size class) and
/// counters.
pub const SEGMENT_ENTRY_BYTES: u64 = 192;
/// One range of acknowledged seqs in the undelivered index (a `BTreeMap<u64, u64>` entry, 16 bytes
/// in leaves about half full, plus the inner nodes).
pub const DONE_RANGE_BYTES: u64 = 48;
/// What the process takes before any traffic (22 MB resident measured idle, a debug build), with room
/// for what grows with load: code, tokio's and librdkafka's threads, the broker
/// connections' buffers, the metrics registry.
pub const RUNTIME_BYTES: u64 = 96 * MIB;
/// Largest bytes per id of the dedup window's tables (the `bytes_per_id` test of `spool::dedup`).
pub const DEDUP_BYTES_PER_ID: u64 = crate::spool::DEDUP_MAX_BYTES_PER_ID;

const MIB: u64 = 1024 * 1024;

/// One consumer of memory and its bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Term {
    /// What holds the memory.
    pub name: &'static str,
    /// Its bound, in bytes.
    pub bytes: u64,
    /// Where the bound comes from: the settings and constants it is computed from.
    pub from: String,
}

/// The bound and its terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorstCase {
    /// The terms, in the order of the table above; the sum is [`WorstCase::total`].
    pub terms: Vec<Term>,
    /// The assumptions the figure rests on.
    pub assumptions: Assumptions,
}

impl WorstCase {
    /// Bytes of all terms together.
    pub fn total(&self) -> u64 {
        self.terms.iter().map(|t| t.bytes).fold(0, u64::saturating_add)
    }
}

/// Rounds up to MiB for display.
fn mib(bytes: u64) -> u64 {
    bytes.div_ceil(MIB)
}

impl fmt::Display for WorstCase {
    /// TOML comments, so that `check-config`'s output stays a valid configuration file.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "# Worst-case memory: {} MiB (at most {} events/s stored, no event under {} bytes; a container \
             limit must be at least this)",
            mib(self.total()),
            self.assumptions.peak_events_per_sec,
            self.assumptions.min_event_bytes
        )?;
        for t in &self.terms {
            writeln!(f, "#   {:>6} MiB  {:<24} {}", mib(t.bytes), t.name, t.from)?;
        }
        Ok(())
    }
}

/// The worst-case memory of `cfg` under `a`.
pub fn worst_case(cfg: &Config, a: &Assumptions) -> WorstCase {
    let min_event = a.min_event_bytes.max(2); // `{}` is the smallest JSON object
    let inflight = cfg.http.max_inflight_bytes as u64;
    let max_body = cfg.http.max_body_bytes as u64;
    let spool_mode = cfg.delivery.ack == AckMode::Spool;
    let mut terms = vec![
        Term { name: "request bodies", bytes: inflight, from: "http.max_inflight_bytes".into() },
        Term {
            name: "connection buffers",
            bytes: (cfg.http.max_connections as u64).saturating_mul(crate::http::CONNECTION_READ_BUFFER_BYTES as u64),
            from: format!("http.max_connections × {} KiB", crate::http::CONNECTION_READ_BUFFER_BYTES / 1024),
        },
    ];
    if cfg.http.tls.enabled() {
        terms.push(Term {
            name: "TLS sessions",
            bytes: (cfg.http.max_connections as u64).saturating_mul(crate::http::TLS_CONNECTION_BYTES as u64),
            from: format!("http.max_connections × {} KiB ([http.tls])", crate::http::TLS_CONNECTION_BYTES / 1024),
        });
    }
    terms.push(Term {
        name: "parsed events",
        bytes: inflight.saturating_add((inflight / min_event).saturating_mul(EVENT_STRUCT_BYTES)),
        from: format!(
            "their bytes (≤ http.max_inflight_bytes) + {EVENT_STRUCT_BYTES} bytes per event, one per {min_event} bytes"
        ),
    });
    if spool_mode {
        let group = (crate::spool::GROUP_MAX_BYTES as u64).max(max_body);
        terms.push(Term {
            name: "write group",
            bytes: group.saturating_add((group / min_event).saturating_mul(FRAME_OVERHEAD_BYTES)),
            from: format!(
                "max({} MiB, http.max_body_bytes) of events + {FRAME_OVERHEAD_BYTES} bytes of frame each",
                crate::spool::GROUP_MAX_BYTES as u64 / MIB
            ),
        });
        let window = (crate::publish::WINDOW_BYTES as u64).saturating_add(max_body);
        let held = cfg.kafka.max_in_flight_records.saturating_mul(crate::publish::HELD_PER_WINDOW) as u64;
        let records = held.min(window / min_event + 1);
        terms.push(Term {
            name: "publisher window",
            bytes: window.saturating_mul(2).saturating_add(records.saturating_mul(EVENT_STRUCT_BYTES)),
            from: format!(
                "2 × ({} MiB + http.max_body_bytes): read and librdkafka's copy; {EVENT_STRUCT_BYTES} bytes per \
                 record held (4 × kafka.max_in_flight_records: the flowing window and the lanes backing off)",
                crate::publish::WINDOW_BYTES as u64 / MIB
            ),
        });
        // One read may park all it read beyond the budget.
        let parked =
            cfg.kafka
                .max_in_flight_records
                .saturating_mul(crate::publish::PARKED_PER_WINDOW + crate::publish::HELD_PER_WINDOW) as u64;
        terms.push(Term {
            name: "parked events",
            bytes: parked
                .saturating_mul(EVENT_STRUCT_BYTES)
                .saturating_add(crate::publish::PARKED_URL_BYTES as u64)
                .saturating_add(max_body),
            from: format!(
                "{} × kafka.max_in_flight_records events waiting for their files, kept without their bytes: \
                 {EVENT_STRUCT_BYTES} bytes each, {} MiB of URLs (+ one batch)",
                crate::publish::PARKED_PER_WINDOW + crate::publish::HELD_PER_WINDOW,
                crate::publish::PARKED_URL_BYTES / (1024 * 1024)
            ),
        });
        let segment_bytes = crate::spool::SpoolSettings::segment_bytes_for(cfg.spool.max_bytes);
        let segments = (cfg.spool.max_bytes / segment_bytes).saturating_add(2);
        let runs = crate::spool::UNDELIVERED_AGE_RUNS as u64;
        terms.push(Term {
            name: "undelivered index",
            bytes: segments
                .saturating_mul(SEGMENT_ENTRY_BYTES)
                .saturating_add(runs * 16)
                .saturating_add((cfg.kafka.max_in_flight_records as u64).saturating_mul(DONE_RANGE_BYTES)),
            from: format!(
                "{segments} segments × {SEGMENT_ENTRY_BYTES} + {runs} time runs × 16 + {DONE_RANGE_BYTES} bytes per \
                 record (kafka.max_in_flight_records); not per undelivered event"
            ),
        });
        let ids = a
            .peak_events_per_sec
            .saturating_mul(cfg.spool.dedup_window_secs)
            .min(u64::try_from(cfg.spool.dedup_max_ids).unwrap_or(u64::MAX));
        // At most one stream per id stored, each while its table may be doubling (× 3/2).
        let streams = ids.saturating_mul(STREAM_MAX_BYTES).saturating_mul(3) / 2;
        terms.push(Term {
            name: "dedup window",
            bytes: crate::spool::dedup_max_bytes(ids).saturating_add(streams),
            from: format!(
                "{ids} ids (events/s × spool.dedup_window_secs, at most spool.dedup_max_ids) × ≤ {DEDUP_BYTES_PER_ID} bytes, + a slice; \
                 as many streams × ≤ {STREAM_MAX_BYTES} bytes, × 3/2 while a table doubles"
            ),
        });
        terms.push(Term {
            name: "recovery buffers",
            bytes: (crate::spool::READ_CHUNK_BYTES as u64)
                .saturating_add(max_body)
                .saturating_add(FRAME_OVERHEAD_BYTES),
            from: format!(
                "{} MiB chunks; a larger frame whole (http.max_body_bytes)",
                crate::spool::READ_CHUNK_BYTES / (1024 * 1024)
            ),
        });
        let jobs = (crate::spool::FILE_WORK_HELD + crate::files::QUEUED_JOBS) as u64;
        let urls = (crate::spool::FILE_WORK_HELD_BYTES + crate::files::QUEUED_URL_BYTES) as u64;
        terms.push(Term {
            name: "file work",
            bytes: urls
                .saturating_add(max_body.saturating_mul(2))
                .saturating_add(jobs * FILE_JOB_BYTES)
                .saturating_add(2 * crate::spool::READ_CHUNK_BYTES as u64),
            from: format!(
                "{} + {} events' jobs (held at recovery + queued for capture) × {FILE_JOB_BYTES} bytes, {} MiB of their URLs \
                 (+ one batch each), two 1 MiB chunks; the rest is read from the spool when its turn comes",
                crate::spool::FILE_WORK_HELD,
                crate::files::QUEUED_JOBS,
                urls / MIB
            ),
        });
    } else {
        terms.push(Term {
            name: "producer copies",
            bytes: inflight,
            from: "librdkafka's copy of the events in flight (≤ http.max_inflight_bytes)".into(),
        });
    }
    if cfg.files.enabled {
        terms.push(Term {
            name: "file buffers",
            bytes: cfg.files.max_buffer_bytes,
            from: "files.max_buffer_bytes (upload buffers of all downloads)".into(),
        });
        let per = crate::files::CONNECTION_BYTES;
        terms.push(Term {
            name: "file connections",
            bytes: (cfg.files.max_concurrency as u64).saturating_mul(per),
            from: format!("files.max_concurrency × {} KiB of connection buffers", per / 1024),
        });
    }
    terms.push(Term { name: "runtime", bytes: RUNTIME_BYTES, from: "code, threads, Kafka client, metrics".into() });
    let sum: u64 = terms.iter().map(|t| t.bytes).fold(0, u64::saturating_add);
    terms.push(Term { name: "allocator slack", bytes: sum / 8, from: "one eighth of the above".into() });
    WorstCase { terms, assumptions: *a }
}

/// Parses a Kubernetes memory quantity (`512Mi`, `2Gi`, `1G`, `1500M`, `1048576`) into bytes.
pub fn parse_quantity(q: &str) -> Option<u64> {
    let q = q.trim();
    let digits = q.find(|c: char| !c.is_ascii_digit()).unwrap_or(q.len());
    let (n, unit) = q.split_at(digits);
    let n: u64 = n.parse().ok()?;
    let factor: u64 = match unit {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        _ => return None,
    };
    n.checked_mul(factor)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn by_name<'a>(w: &'a WorstCase, name: &str) -> &'a Term {
        w.terms.iter().find(|t| t.name == name).unwrap_or_else(|| panic!("no term {name}: {w}"))
    }

    #[test]
    fn every_term_follows_its_setting() {
        let a = Assumptions::default();
        let base = Config::default();
        let w = worst_case(&base, &a);
        let mut more = base.clone();
        more.http.max_inflight_bytes *= 2;
        more.http.max_connections *= 2;
        more.spool.max_bytes *= 2;
        more.spool.dedup_window_secs *= 2;
        // Above the peak rate × window, so that the window, not the ceiling, decides.
        more.spool.dedup_max_ids *= 4;
        more.files.max_concurrency *= 2;
        more.files.max_buffer_bytes *= 2;
        let w2 = worst_case(&more, &a);
        for name in ["request bodies", "connection buffers", "parsed events", "file buffers", "file connections"] {
            assert_eq!(by_name(&w2, name).bytes, 2 * by_name(&w, name).bytes, "{name}");
        }
        // What the spool keeps of its undelivered events does not follow their number, nor the cap
        // much (one entry per segment).
        assert!(by_name(&w2, "undelivered index").bytes < MIB, "{w2}");
        assert!(by_name(&w2, "dedup window").bytes > by_name(&w, "dedup window").bytes);
        // `spool.dedup_max_ids` caps the dedup window whatever the rate and the window.
        let mut capped = more.clone();
        capped.spool.dedup_max_ids = 1000;
        let small = by_name(&worst_case(&capped, &a), "dedup window").bytes;
        assert!(small < by_name(&w, "dedup window").bytes && small < 1000 * 200, "{small}");
        assert!(w2.total() > w.total());
        // Smaller events cost more memory per byte of body.
        let tiny = worst_case(&base, &Assumptions { min_event_bytes: 16, ..a });
        assert!(by_name(&tiny, "parsed events").bytes > by_name(&w, "parsed events").bytes);
        // The total is the sum, slack included (one eighth of the rest).
        let sum: u64 = w.terms.iter().map(|t| t.bytes).sum();
        assert_eq!(w.total(), sum);
        let slack = by_name(&w, "allocator slack").bytes;
        assert_eq!(slack, (sum - slack) / 8);
    }

    #[test]
    fn kafka_mode_has_no_spool_terms_and_capture_off_has_no_capture_term() {
        let mut cfg = Config::default();
        cfg.delivery.ack = AckMode::Kafka;
        cfg.files.enabled = false;
        let w = worst_case(&cfg, &Assumptions::default());
        let names: Vec<&str> = w.terms.iter().map(|t| t.name).collect();
        for absent in
            ["write group", "publisher window", "undelivered index", "dedup window", "file buffers", "file connections"]
        {
            assert!(!names.contains(&absent), "{names:?}");
        }
        assert_eq!(by_name(&w, "producer copies").bytes, cfg.http.max_inflight_bytes as u64);
    }

    #[test]
    fn https_adds_rustls_buffers_per_connection() {
        let mut cfg = Config::default();
        let plain = worst_case(&cfg, &Assumptions::default());
        assert!(plain.terms.iter().all(|t| t.name != "TLS sessions"), "{plain}");
        cfg.http.tls.cert_file = "cert.pem".into();
        cfg.http.tls.key_file = "key.pem".into();
        let tls = worst_case(&cfg, &Assumptions::default());
        assert_eq!(by_name(&tls, "TLS sessions").bytes, 1024 * 96 * 1024, "1024 connections × 96 KiB");
        assert!(tls.total() > plain.total());
    }

    #[test]
    fn the_printed_figure_is_toml_comments_naming_every_term() {
        let w = worst_case(&Config::default(), &Assumptions::default());
        let text = w.to_string();
        assert!(text.lines().all(|l| l.starts_with('#')), "{text}");
        assert!(text.contains(&format!("{} MiB", w.total().div_ceil(MIB))), "{text}");
        for t in &w.terms {
            assert!(text.contains(t.name), "{text}");
        }
        assert!(toml::from_str::<toml::Table>(&text).is_ok());
    }

    #[test]
    fn absurd_settings_saturate_instead_of_overflowing() {
        let mut cfg = Config::default();
        cfg.http.max_inflight_bytes = usize::MAX;
        cfg.http.max_connections = usize::MAX;
        cfg.files.max_concurrency = usize::MAX;
        cfg.files.max_buffer_bytes = u64::MAX;
        cfg.spool.max_bytes = u64::MAX;
        let w = worst_case(&cfg, &Assumptions { peak_events_per_sec: u64::MAX, min_event_bytes: u64::MAX });
        assert_eq!(w.total(), u64::MAX);
    }

    #[test]
    fn quantities_parse_as_kubernetes_reads_them() {
        assert_eq!(parse_quantity("512Mi"), Some(512 << 20));
        assert_eq!(parse_quantity("2Gi"), Some(2 << 30));
        assert_eq!(parse_quantity("1G"), Some(1_000_000_000));
        assert_eq!(parse_quantity("1048576"), Some(1 << 20));
        assert_eq!(parse_quantity("1.5Gi"), None);
        assert_eq!(parse_quantity("Mi"), None);
    }
}
