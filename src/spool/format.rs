//! The on-disk format of segments, version [`VERSION`].
//!
//! A segment file starts with a 16-byte header: the magic `HUGGYSPL`, the format version (u32 LE)
//! and four reserved bytes. Frames follow, each
//!
//! ```text
//! [u32 FRAME_MAGIC][u32 payload length][u32 CRC-32 of (length ‖ payload)][payload]
//! ```
//!
//! little-endian. The magic lets recovery find the next frame after damage (resync); the checksum
//! covers the length too, so a damaged length is caught rather than followed. The payload is a
//! record whose layout is spelled out here field by field (no derive), so that it cannot change by
//! accident when an in-memory type does: a change is a new [`VERSION`].

use std::fmt;

use crate::event::{routing_of, Event, EventId, EventType, KnownType, Routing};

/// Magic at the start of every segment file.
pub(super) const SEGMENT_MAGIC: &[u8; 8] = b"HUGGYSPL";
/// The format this build writes.
pub(super) const VERSION: u32 = 3;
/// The oldest format this build still reads. Version 3 appended the routing headers to an event
/// record; a version 2 event record ends before them, and they are read again from its value.
pub(super) const OLDEST_READABLE: u32 = 2;
/// Bytes of the segment header.
pub(super) const SEGMENT_HEADER_LEN: usize = 16;
/// Marks the start of a frame.
pub(super) const FRAME_MAGIC: u32 = 0x4846_5232; // "2RFH" on disk
/// Bytes before a frame's payload.
pub(super) const FRAME_HEADER_LEN: usize = 12;
/// Upper bound on one frame's payload, far above any event that fits `http.max_body_bytes`; a larger
/// length can only be damage.
pub(super) const MAX_PAYLOAD: usize = 256 * 1024 * 1024;
// The largest body accepted leaves room for an event as large as the body and its metadata.
const _: () = assert!(crate::config::MAX_BODY_BYTES_CEILING * 2 <= MAX_PAYLOAD);

/// What a frame records.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(
    clippy::large_enum_variant,
    reason = "events are nearly every record, and each is moved into a Stored at once: boxing would allocate per event"
)]
pub(super) enum Record {
    /// An event made durable, with its spool sequence number and receipt time (unix seconds).
    Event { seq: u64, received_at: i64, event: Event },
    /// Sequence numbers Kafka acknowledged, as inclusive ranges.
    Acked(Vec<(u64, u64)>),
    /// The file results (`huggy_bridge_files` array) of an event whose files are all stored or definitively failed.
    Files { seq: u64, member: Vec<u8> },
    /// Written first in a segment opened after a write or sync failure: the failed segment
    /// (`first_seq`) is durable only up to `durable_len`; whatever follows there is the failed write.
    Abandoned { first_seq: u64, durable_len: u64 },
}

const KIND_EVENT: u8 = 1;
const KIND_ACKED: u8 = 2;
const KIND_FILES: u8 = 3;
const KIND_ABANDONED: u8 = 4;

/// The header of a segment file in this build's format.
pub(super) fn segment_header() -> [u8; SEGMENT_HEADER_LEN] {
    let mut h = [0u8; SEGMENT_HEADER_LEN];
    h[..8].copy_from_slice(SEGMENT_MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h
}

/// Why a segment cannot be read by this build.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(super) enum HeaderError {
    #[error(
        "it has no format header: it was written by huggy-bridge 0.1 (unversioned format); run that version until \
         it has delivered everything (huggy_bridge_spool_events = 0), then start this one"
    )]
    Unversioned,
    #[error("it is in spool format {found}, which this build (formats {OLDEST_READABLE} to {VERSION}) cannot read")]
    Unsupported { found: u32 },
    #[error("its header is cut short ({0} bytes)")]
    Short(usize),
}

/// Checks a segment's header. An empty file (created, never written) is `Ok(false)`.
///
/// # Errors
/// The file is not in this build's format.
pub(super) fn check_header(head: &[u8]) -> Result<bool, HeaderError> {
    if head.is_empty() {
        return Ok(false);
    }
    if head.len() < SEGMENT_HEADER_LEN {
        return if SEGMENT_MAGIC.starts_with(head) {
            Err(HeaderError::Short(head.len()))
        } else {
            Err(HeaderError::Unversioned)
        };
    }
    if &head[..8] != SEGMENT_MAGIC {
        return Err(HeaderError::Unversioned);
    }
    let found = u32::from_le_bytes(head[8..12].try_into().expect("4 bytes"));
    if !(OLDEST_READABLE..=VERSION).contains(&found) {
        return Err(HeaderError::Unsupported { found });
    }
    Ok(true)
}

/// Appends `record` as one frame to `out`.
pub(super) fn encode(record: &Record, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&FRAME_MAGIC.to_le_bytes());
    out.extend_from_slice(&[0u8; 8]);
    let payload_start = out.len();
    encode_payload(record, out);
    let len = u32::try_from(out.len() - payload_start).expect("frame under 4 GiB");
    out[start + 4..start + 8].copy_from_slice(&len.to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&len.to_le_bytes());
    crc.update(&out[payload_start..]);
    out[start + 8..start + 12].copy_from_slice(&crc.finalize().to_le_bytes());
}

fn encode_payload(record: &Record, out: &mut Vec<u8>) {
    match record {
        Record::Event { seq, received_at, event } => {
            out.push(KIND_EVENT);
            out.extend_from_slice(&seq.to_le_bytes());
            out.extend_from_slice(&received_at.to_le_bytes());
            out.extend_from_slice(&event.id.0);
            put_bytes(out, event.event_type.as_str().as_bytes());
            put_opt(out, event.original_type.as_deref());
            put_opt(out, event.key.as_deref());
            put_opt(out, event.company.as_deref());
            out.extend_from_slice(&event.time.to_le_bytes());
            put_bytes(out, &event.value);
            put_opt(out, event.dead_letter.as_deref());
            put_u32(out, event.files.len());
            for f in &event.files {
                put_bytes(out, f.as_bytes());
            }
            let r = &event.routing;
            for field in [&r.subject, &r.chat_id, &r.sender_type, &r.channel, &r.chat_situation, &r.chat_department] {
                put_opt(out, field.as_deref());
            }
            out.push(u8::from(r.internal));
        }
        Record::Acked(ranges) => {
            out.push(KIND_ACKED);
            put_u32(out, ranges.len());
            for (a, b) in ranges {
                out.extend_from_slice(&a.to_le_bytes());
                out.extend_from_slice(&b.to_le_bytes());
            }
        }
        Record::Files { seq, member } => {
            out.push(KIND_FILES);
            out.extend_from_slice(&seq.to_le_bytes());
            put_bytes(out, member);
        }
        Record::Abandoned { first_seq, durable_len } => {
            out.push(KIND_ABANDONED);
            out.extend_from_slice(&first_seq.to_le_bytes());
            out.extend_from_slice(&durable_len.to_le_bytes());
        }
    }
}

fn put_u32(out: &mut Vec<u8>, n: usize) {
    out.extend_from_slice(&u32::try_from(n).expect("field under 4 GiB").to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_u32(out, b.len());
    out.extend_from_slice(b);
}

fn put_opt(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        None => out.push(0),
        Some(s) => {
            out.push(1);
            put_bytes(out, s.as_bytes());
        }
    }
}

/// A frame whose checksum holds but whose payload this build cannot decode: written by another
/// format, or a bug. Never treated as a torn write.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a frame with a valid checksum does not decode: {0}")]
pub(super) struct Undecodable(pub(super) String);

/// The result of looking at the bytes at one position.
#[derive(Debug)]
#[allow(clippy::large_enum_variant, reason = "as `Record`: a frame is the common case")]
pub(super) enum Next {
    /// A whole, valid frame and the bytes it takes.
    Frame(Record, usize),
    /// Clean end of data.
    End,
    /// Not a whole, valid frame here: torn write or damage.
    Bad(BadFrame),
    /// Checksummed but undecodable.
    Undecodable(Undecodable),
}

/// Why the bytes at a position are not a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum BadFrame {
    /// The data ends inside a frame (possibly a whole frame that needs more bytes than given).
    Truncated { needed: usize },
    /// No frame magic, an impossible length or a checksum mismatch.
    Invalid(&'static str),
}

impl fmt::Display for BadFrame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BadFrame::Truncated { needed } => write!(f, "frame cut short ({needed} bytes needed)"),
            BadFrame::Invalid(why) => f.write_str(why),
        }
    }
}

/// Reads one frame from `buf` at `pos`.
pub(super) fn decode_at(buf: &[u8], pos: usize) -> Next {
    let rest = &buf[pos..];
    if rest.is_empty() {
        return Next::End;
    }
    if rest.len() < FRAME_HEADER_LEN {
        if !FRAME_MAGIC.to_le_bytes().starts_with(&rest[..rest.len().min(4)]) {
            return Next::Bad(BadFrame::Invalid("no frame magic"));
        }
        return Next::Bad(BadFrame::Truncated { needed: FRAME_HEADER_LEN });
    }
    if rest[0..4] != FRAME_MAGIC.to_le_bytes() {
        return Next::Bad(BadFrame::Invalid("no frame magic"));
    }
    let len_bytes: [u8; 4] = rest[4..8].try_into().expect("4 bytes");
    let len = u32::from_le_bytes(len_bytes) as usize;
    if len > MAX_PAYLOAD {
        return Next::Bad(BadFrame::Invalid("impossible frame length"));
    }
    if rest.len() - FRAME_HEADER_LEN < len {
        return Next::Bad(BadFrame::Truncated { needed: FRAME_HEADER_LEN + len });
    }
    let crc = u32::from_le_bytes(rest[8..12].try_into().expect("4 bytes"));
    let payload = &rest[FRAME_HEADER_LEN..FRAME_HEADER_LEN + len];
    let mut h = crc32fast::Hasher::new();
    h.update(&len_bytes);
    h.update(payload);
    if h.finalize() != crc {
        return Next::Bad(BadFrame::Invalid("checksum mismatch"));
    }
    match decode_payload(payload) {
        Ok(r) => Next::Frame(r, FRAME_HEADER_LEN + len),
        Err(e) => Next::Undecodable(e),
    }
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Undecodable> {
        let end = self.pos.checked_add(n).filter(|e| *e <= self.buf.len()).ok_or_else(|| short("field"))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, Undecodable> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<usize, Undecodable> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")) as usize)
    }
    fn u64(&mut self) -> Result<u64, Undecodable> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    fn i64(&mut self) -> Result<i64, Undecodable> {
        Ok(i64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    fn bytes(&mut self) -> Result<&'a [u8], Undecodable> {
        let n = self.u32()?;
        self.take(n)
    }
    fn string(&mut self) -> Result<String, Undecodable> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| Undecodable("a string field is not UTF-8".into()))
    }
    fn opt(&mut self) -> Result<Option<String>, Undecodable> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(self.string()?)),
            t => Err(Undecodable(format!("option tag {t}"))),
        }
    }
}

fn short(what: &str) -> Undecodable {
    Undecodable(format!("{what} runs past the end of the payload"))
}

fn decode_payload(payload: &[u8]) -> Result<Record, Undecodable> {
    let mut c = Cursor { buf: payload, pos: 0 };
    let record = match c.u8()? {
        KIND_EVENT => {
            let seq = c.u64()?;
            let received_at = c.i64()?;
            let id = EventId(c.take(16)?.try_into().expect("16 bytes"));
            let type_name = c.string()?;
            let original_type = c.opt()?;
            // Stored names are normalized already: known, or unknown as they were accepted.
            let event_type = KnownType::parse(&type_name).map_or(EventType::Unknown(type_name), EventType::Known);
            let key = c.opt()?;
            let company = c.opt()?;
            let time = c.i64()?;
            let value = c.bytes()?.to_vec();
            let dead_letter = c.opt()?;
            let n = c.u32()?;
            let mut files = Vec::with_capacity(n.min(1024));
            for _ in 0..n {
                files.push(c.string()?);
            }
            // Format 2 ended here; its events' routing headers are read from the value once.
            let routing = if c.pos == payload.len() {
                routing_of(&event_type, &value)
            } else {
                let (subject, chat_id, sender_type) = (c.opt()?, c.opt()?, c.opt()?);
                let (channel, chat_situation, chat_department) = (c.opt()?, c.opt()?, c.opt()?);
                let internal = match c.u8()? {
                    0 => false,
                    1 => true,
                    t => return Err(Undecodable(format!("internal flag {t}"))),
                };
                Routing { subject, chat_id, sender_type, channel, chat_situation, chat_department, internal }
            };
            // File results are a record of their own (`Files`), attached when the event is released.
            let event = Event {
                id,
                event_type,
                original_type,
                key,
                company,
                time,
                value,
                dead_letter,
                files,
                file_results: None,
                lineage: None,
                routing,
            };
            Record::Event { seq, received_at, event }
        }
        KIND_ACKED => {
            let n = c.u32()?;
            let mut ranges = Vec::with_capacity(n.min(1 << 16));
            for _ in 0..n {
                ranges.push((c.u64()?, c.u64()?));
            }
            Record::Acked(ranges)
        }
        KIND_FILES => Record::Files { seq: c.u64()?, member: c.bytes()?.to_vec() },
        KIND_ABANDONED => Record::Abandoned { first_seq: c.u64()?, durable_len: c.u64()? },
        kind => return Err(Undecodable(format!("unknown record kind {kind}"))),
    };
    if c.pos != payload.len() {
        return Err(Undecodable(format!("{} bytes left after the record", payload.len() - c.pos)));
    }
    Ok(record)
}
