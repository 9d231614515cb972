//! Byte-level helpers for scanning raw JSON without parsing it, shared by the body's depth check
//! and file URL detection. Pure: no I/O.

/// The index of the quote that closes the JSON string whose contents start at `from` (the length
/// of `bytes` when it is not closed).
pub fn string_end(bytes: &[u8], mut from: usize) -> usize {
    while let Some(at) = memchr::memchr2(b'"', b'\\', bytes.get(from..).unwrap_or_default()) {
        let at = from + at;
        if bytes[at] == b'"' {
            return at;
        }
        from = at + 2;
    }
    bytes.len()
}
