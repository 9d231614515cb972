//! A segment file read in bounded chunks (recovery and the reader), never whole.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::format::{self, BadFrame, Next};

/// Bytes read from a segment at a time.
pub(super) const CHUNK: usize = 1024 * 1024;

/// A segment file read in bounded chunks.
pub(super) struct Chunks {
    file: File,
    /// Readable bytes: the file's length, or less (a reader's committed limit).
    pub(super) len: u64,
    base: u64,
    buf: Vec<u8>,
}

impl Chunks {
    pub(super) fn open(path: &Path) -> std::io::Result<Chunks> {
        let file = File::open(path)?;
        let len = file.metadata()?.len();
        Ok(Chunks { file, len, base: 0, buf: Vec::new() })
    }

    /// The bytes from `at` on: at least `min` of them (or up to the end of the file), usually more.
    pub(super) fn at(&mut self, at: u64, min: usize) -> std::io::Result<&[u8]> {
        let want_end = at.saturating_add(min.max(CHUNK) as u64).min(self.len);
        let have_end = self.base + self.buf.len() as u64;
        let need_end = at.saturating_add(min as u64).min(self.len);
        if at < self.base || at > have_end || need_end > have_end {
            if at >= self.base && at <= have_end {
                self.buf.drain(..usize::try_from(at - self.base).expect("in buffer"));
            } else {
                self.buf.clear();
            }
            self.base = at;
            let from = self.base + self.buf.len() as u64;
            let old = self.buf.len();
            let add = usize::try_from(want_end.saturating_sub(from)).expect("chunk fits memory");
            self.buf.resize(old + add, 0);
            self.file.read_exact_at(&mut self.buf[old..], from)?;
        }
        Ok(&self.buf[usize::try_from(at - self.base).expect("in buffer")..])
    }

    /// Decodes the frame at `at`, reading as much of the file as it needs.
    pub(super) fn frame_at(&mut self, at: u64) -> std::io::Result<Next> {
        let mut min = format::FRAME_HEADER_LEN;
        loop {
            let len = self.len;
            let view = self.at(at, min)?;
            match format::decode_at(view, 0) {
                Next::Bad(BadFrame::Truncated { needed }) if at + needed as u64 <= len && needed > view.len() => {
                    min = needed;
                }
                other => return Ok(other),
            }
        }
    }

    /// The next position at or after `from` where a valid frame starts.
    pub(super) fn resync(&mut self, from: u64) -> std::io::Result<Option<u64>> {
        let mut pos = from;
        while pos + 4 <= self.len {
            let view = self.at(pos, CHUNK)?;
            let magic = format::FRAME_MAGIC.to_le_bytes();
            match view.windows(4).position(|w| w == magic) {
                Some(off) => {
                    let cand = pos + off as u64;
                    match self.frame_at(cand)? {
                        Next::Frame(..) | Next::Undecodable(_) => return Ok(Some(cand)),
                        _ => pos = cand + 1,
                    }
                }
                None => pos += (view.len() as u64).saturating_sub(3).max(1),
            }
        }
        Ok(None)
    }
}

/// Decodes the one frame at `at` in the file at `path`, reading exactly its bytes (an event read
/// again by the publisher: no chunk for one frame).
pub(super) fn frame_in(path: &Path, at: u64) -> std::io::Result<Next> {
    let file = File::open(path)?;
    let mut head = [0u8; format::FRAME_HEADER_LEN];
    file.read_exact_at(&mut head, at)?;
    match format::decode_at(&head, 0) {
        Next::Bad(BadFrame::Truncated { needed }) if needed > head.len() => {
            let mut frame = vec![0u8; needed];
            file.read_exact_at(&mut frame, at)?;
            Ok(format::decode_at(&frame, 0))
        }
        other => Ok(other),
    }
}
