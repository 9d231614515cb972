//! Finding file URLs in an event: every JSON string that is a URL under an allowed prefix, by the
//! same parsed comparison the fetch guard makes ([`super::prefix::allowed`]). The event's bytes are
//! scanned once, without recursion and without re-serializing them.

use super::prefix::{allowed, Prefix};
use crate::json::string_end;

/// URLs in `event` (raw JSON) under one of `prefixes`, in document order, each once.
pub fn file_urls(event: &[u8], prefixes: &[Prefix]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while let Some(open) = memchr::memchr(b'"', &event[i..]) {
        let start = i + open;
        let end = string_end(event, start + 1);
        let token = &event[start..(end + 1).min(event.len())];
        i = end + 1;
        if i >= event.len() {
            i = event.len();
        }
        if let Some(s) = decode(token) {
            if allowed(prefixes, &s) && !out.contains(&s) {
                out.push(s);
            }
        }
    }
    out
}

/// A JSON string token to its text, when it could be a URL (it starts with `http`, in any letter
/// case); every other string is passed over without a copy.
fn decode(token: &[u8]) -> Option<String> {
    if token.len() < 10 || !token.ends_with(b"\"") {
        return None;
    }
    let inner = &token[1..token.len() - 1];
    if !inner.contains(&b'\\') {
        return inner[..4].eq_ignore_ascii_case(b"http").then(|| std::str::from_utf8(inner).ok().map(str::to_owned))?;
    }
    let s = serde_json::from_slice::<String>(token).ok()?;
    s.get(..4).is_some_and(|h| h.eq_ignore_ascii_case("http")).then_some(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::files::prefix::parse_prefixes;

    fn prefixes() -> Vec<Prefix> {
        parse_prefixes(&["https://files.huggy.app/".into(), "https://bucket.s3.amazonaws.com/".into()])
    }

    #[test]
    fn finds_file_and_file_url_anywhere_once() {
        let ev = br#"{"id":1,"file":"https://files.huggy.app/a/b.pdf?token=x","nested":{"list":["https:\/\/files.huggy.app\/c.png", 5, "https://files.huggy.app/a/b.pdf?token=x"]},
            "fileUrl":"https://bucket.s3.amazonaws.com/export.csv?X-Amz-Expires=3600","photo":"https://c.pzw.io/img/avatar.jpg","s":"say \"https://files.huggy.app/in-quote\""}"#;
        assert_eq!(
            file_urls(ev, &prefixes()),
            vec![
                "https://files.huggy.app/a/b.pdf?token=x".to_owned(),
                "https://files.huggy.app/c.png".to_owned(),
                "https://bucket.s3.amazonaws.com/export.csv?X-Amz-Expires=3600".to_owned(),
            ]
        );
    }

    #[test]
    fn none_in_published_fixtures_and_no_panic_on_garbage() {
        assert!(file_urls(br#"{"file":null,"photo":"https://c.pzw.io/x.jpg"}"#, &prefixes()).is_empty());
        for junk in
            [&b"\"https://files.huggy.app/x"[..], b"\"", b"\\\"\\", b"{\"a\":\"\\uZZZZhttps://files.huggy.app/\"}"]
        {
            let _ = file_urls(junk, &prefixes());
        }
    }

    #[test]
    fn lookalike_urls_are_not_files() {
        let ev = br#"{"a":"https://files.huggy.app.evil.com/x","b":"https://files.huggy.app@evil.com/x","c":"https://files.huggy.app:8443/x","d":"https://files.huggy.app/ok"}"#;
        assert_eq!(file_urls(ev, &prefixes()), vec!["https://files.huggy.app/ok".to_owned()]);
    }
}
