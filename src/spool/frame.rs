//! The on-disk frame: `[u32 length][u32 crc32 of payload][payload]`, little-endian. A frame whose
//! length runs past the end of the file, or whose checksum does not match, is a torn write.

use std::io::{self, Read};

use serde::{Deserialize, Serialize};

use crate::event::{Event, EventId};

pub const HEADER_LEN: usize = 8;
/// Upper bound on one frame, far above any event that fits `http.max_body_bytes`; a larger length
/// field can only be garbage.
pub const MAX_FRAME: usize = 256 * 1024 * 1024;

/// What a frame records.
#[derive(Debug, Serialize, Deserialize)]
pub enum Record {
    /// An event made durable, with its spool sequence number and receipt time (unix seconds).
    Event { seq: u64, received_at: i64, event: Event },
    /// Sequence numbers Kafka acknowledged, as inclusive ranges.
    Acked(Vec<(u64, u64)>),
    /// The `bridge_files` array of an event whose files are all stored or definitively failed.
    Files {
        seq: u64,
        #[serde(with = "serde_bytes")]
        member: Vec<u8>,
    },
}

/// One dedup entry, written to the dedup log beside the segments.
pub const DEDUP_ENTRY_LEN: usize = 24;

pub fn encode_dedup(id: &EventId, at: i64, out: &mut Vec<u8>) {
    out.extend_from_slice(&id.0);
    out.extend_from_slice(&at.to_le_bytes());
}

pub fn decode_dedup(chunk: &[u8]) -> (EventId, i64) {
    let mut id = [0u8; 16];
    id.copy_from_slice(&chunk[..16]);
    let mut at = [0u8; 8];
    at.copy_from_slice(&chunk[16..24]);
    (EventId(id), i64::from_le_bytes(at))
}

pub fn encode(record: &Record, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0u8; HEADER_LEN]);
    // Serializing plain data into a Vec cannot fail.
    let payload = postcard::to_extend(record, Vec::new()).expect("postcard encodes plain data");
    out.extend_from_slice(&payload);
    let len = u32::try_from(payload.len()).expect("frame under 4 GiB");
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc32fast::hash(&payload).to_le_bytes());
}

/// The result of reading the next frame.
#[derive(Debug)]
pub enum Next {
    Frame(Record, usize),
    /// Clean end of data.
    End,
    /// Bytes that are not a whole, valid frame: a torn write (or corruption).
    Torn(String),
}

/// Reads one frame from `buf` at `pos`, without copying beyond what decoding needs.
pub fn decode_at(buf: &[u8], pos: usize) -> Next {
    let rest = &buf[pos..];
    if rest.is_empty() {
        return Next::End;
    }
    if rest.len() < HEADER_LEN {
        return Next::Torn(format!("{} bytes of a frame header", rest.len()));
    }
    let len = u32::from_le_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(rest[4..8].try_into().expect("4 bytes"));
    if len > MAX_FRAME || rest.len() - HEADER_LEN < len {
        return Next::Torn(format!("frame of {len} bytes with {} bytes left", rest.len() - HEADER_LEN));
    }
    let payload = &rest[HEADER_LEN..HEADER_LEN + len];
    if crc32fast::hash(payload) != crc {
        return Next::Torn("checksum mismatch".into());
    }
    match postcard::from_bytes::<Record>(payload) {
        Ok(r) => Next::Frame(r, HEADER_LEN + len),
        Err(e) => Next::Torn(format!("undecodable frame: {e}")),
    }
}

/// Reads a whole file into memory (segments are bounded in size).
pub fn read_file(path: &std::path::Path) -> io::Result<Vec<u8>> {
    let mut f = std::fs::File::open(path)?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf)?;
    Ok(buf)
}
