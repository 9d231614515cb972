//! Finding file URLs in an event: every JSON string that is a URL under an allowed prefix, by the
//! same parsed comparison the fetch guard makes ([`crate::config::prefix::allowed`]). The event's
//! bytes are scanned once, without recursion and without re-serializing them.

use std::borrow::Cow;

use crate::config::prefix::{allowed, Prefix};
use crate::json::string_end;

/// Distinct strings remembered per event as not being file URLs (events repeat the same avatar
/// URL); past this many, each is judged again.
const REMEMBER_REJECTED: usize = 16;

/// URLs in `event` (raw JSON) under one of `prefixes`, in document order, each once.
pub fn file_urls(event: &[u8], prefixes: &[Prefix]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    // Tokens already judged not to be file URLs: the same bytes get the same answer, so a repeated
    // one is passed over without decoding or parsing it again.
    let mut rejected: Vec<&[u8]> = Vec::new();
    let mut i = 0;
    while let Some(open) = memchr::memchr(b'"', &event[i..]) {
        let start = i + open;
        let stop = (string_end(event, start + 1) + 1).min(event.len());
        let token = &event[start..stop];
        i = stop;
        if rejected.contains(&token) {
            continue;
        }
        if let Some(s) = decode(token) {
            if allowed(prefixes, &s) {
                if !out.iter().any(|u| *u == *s) {
                    out.push(s.into_owned());
                }
            } else if rejected.len() < REMEMBER_REJECTED {
                rejected.push(token);
            }
        }
    }
    out
}

/// A JSON string token to its text, when it could be a URL (it starts with `http`, in any letter
/// case); every other string is passed over. Borrowed when the token has no escapes.
fn decode(token: &[u8]) -> Option<Cow<'_, str>> {
    if token.len() < 10 || !token.ends_with(b"\"") {
        return None;
    }
    let inner = &token[1..token.len() - 1];
    if !inner.contains(&b'\\') {
        if !inner[..4].eq_ignore_ascii_case(b"http") {
            return None;
        }
        return std::str::from_utf8(inner).ok().map(Cow::Borrowed);
    }
    let s = serde_json::from_slice::<String>(token).ok()?;
    s.get(..4).is_some_and(|h| h.eq_ignore_ascii_case("http")).then_some(Cow::Owned(s))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::prefix::parse_prefixes;

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
    fn a_repeated_string_gets_the_same_answer_each_time() {
        let ev = br#"{"a":"https://c.pzw.io/x.jpg","b":"https://files.huggy.app/1","c":"https://c.pzw.io/x.jpg","d":"https://files.huggy.app/1","e":"https:\/\/files.huggy.app\/2","f":"https:\/\/files.huggy.app\/2"}"#;
        assert_eq!(
            file_urls(ev, &prefixes()),
            vec!["https://files.huggy.app/1".to_owned(), "https://files.huggy.app/2".to_owned()]
        );
        // More distinct rejected strings than are remembered: the ones after still count.
        let mut many = String::from("{");
        for n in 0..40 {
            many.push_str(&format!("\"r{n}\":\"https://c.pzw.io/{n}.jpg\","));
        }
        many.push_str("\"x\":\"https://c.pzw.io/39.jpg\",\"y\":\"https://files.huggy.app/late\"}");
        assert_eq!(file_urls(many.as_bytes(), &prefixes()), vec!["https://files.huggy.app/late".to_owned()]);
    }

    #[test]
    fn a_url_the_parser_would_have_to_clean_up_is_neither_found_nor_allowed() {
        // The URL parser trims spaces and controls at the ends and drops tabs and line breaks.
        let odd = [
            " https://files.huggy.app/a",
            "https://files.huggy.app/a ",
            "ht\ttps://files.huggy.app/a",
            "https://files.huggy.app/a\nb",
        ];
        for u in odd {
            assert!(url::Url::parse(u).is_ok(), "{u:?} parses");
            assert!(!allowed(&prefixes(), u), "{u:?} allowed");
            let ev = serde_json::to_vec(&serde_json::json!({ "file": u })).unwrap();
            assert!(file_urls(&ev, &prefixes()).is_empty(), "{u:?} found");
        }
        assert!(
            allowed(&prefixes(), "https://files.huggy.app/my file.pdf"),
            "an inner space is percent-encoded, not dropped"
        );
    }

    #[test]
    fn lookalike_urls_are_not_files() {
        let ev = br#"{"a":"https://files.huggy.app.evil.com/x","b":"https://files.huggy.app@evil.com/x","c":"https://files.huggy.app:8443/x","d":"https://files.huggy.app/ok"}"#;
        assert_eq!(file_urls(ev, &prefixes()), vec!["https://files.huggy.app/ok".to_owned()]);
    }
}
