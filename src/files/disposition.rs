//! The file name of a download: `Content-Disposition` (`filename*` per RFC 6266/5987 first, then
//! `filename`), else the last segment of the URL path, percent-decoded; then made safe to use as one
//! path segment of a store.

use percent_encoding::percent_decode_str;

/// The file name a `Content-Disposition` value carries, if any.
pub fn filename_from_disposition(value: &str) -> Option<String> {
    let mut plain = None;
    let mut extended = None;
    for param in split_params(value).into_iter().skip(1) {
        let Some((name, val)) = param.split_once('=') else { continue };
        let name = name.trim().to_ascii_lowercase();
        let val = val.trim();
        match name.as_str() {
            "filename*" => extended = extended.or_else(|| decode_ext_value(val)),
            "filename" => plain = plain.or_else(|| Some(unquote(val))),
            _ => {}
        }
    }
    extended.or(plain).filter(|s| !s.trim().is_empty())
}

/// Splits on `;` outside quoted strings.
fn split_params(value: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, c) in value.char_indices() {
        match (quoted, escaped, c) {
            (true, true, _) => escaped = false,
            (true, false, '\\') => escaped = true,
            (_, _, '"') => quoted = !quoted,
            (false, _, ';') => {
                out.push(&value[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&value[start..]);
    out
}

fn unquote(v: &str) -> String {
    let Some(inner) = v.strip_prefix('"').map(|s| s.strip_suffix('"').unwrap_or(s)) else { return v.to_owned() };
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(n) = chars.next() {
                out.push(n);
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// RFC 5987 `charset'language'pct-encoded`; UTF-8 and ISO-8859-1 are understood.
fn decode_ext_value(v: &str) -> Option<String> {
    let v = v.trim_matches('"');
    let mut parts = v.splitn(3, '\'');
    let charset = parts.next()?.to_ascii_lowercase();
    let _language = parts.next()?;
    let encoded = parts.next()?;
    let bytes: Vec<u8> = percent_decode_str(encoded).collect();
    match charset.as_str() {
        "utf-8" => String::from_utf8(bytes).ok(),
        "iso-8859-1" | "latin1" => Some(bytes.iter().map(|&b| char::from(b)).collect()),
        _ => None,
    }
}

/// The last non-empty segment of a URL path, percent-decoded.
pub fn filename_from_url(url: &url::Url) -> Option<String> {
    let seg = url.path_segments()?.rev().find(|s| !s.is_empty())?;
    let decoded = percent_decode_str(seg).decode_utf8_lossy().into_owned();
    (!decoded.trim().is_empty()).then_some(decoded)
}

/// Longest file name kept, in bytes.
const MAX_NAME: usize = 160;

/// A name safe as one path segment on any store: no separators, control characters or leading dots,
/// at most [`MAX_NAME`] bytes (cut on a character boundary, extension kept when short), never empty.
pub fn sanitize(name: &str) -> String {
    let cleaned: String = name
        .chars()
        .map(|c| {
            if c.is_control() || matches!(c, '/' | '\\' | ':' | '*' | '?' | '"' | '<' | '>' | '|' | '%') {
                '_'
            } else {
                c
            }
        })
        .collect();
    let trimmed = cleaned.trim_start_matches(|c: char| c == '.' || c.is_whitespace()).trim_end();
    let mut out = trimmed.to_owned();
    if out.len() > MAX_NAME {
        let ext =
            out.rsplit_once('.').map(|(_, e)| e).filter(|e| e.len() <= 16 && !e.is_empty()).map(|e| format!(".{e}"));
        let keep = MAX_NAME - ext.as_ref().map_or(0, String::len);
        let mut cut = keep;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
        if let Some(e) = ext {
            out.push_str(&e);
        }
    }
    if out.is_empty() {
        "file".to_owned()
    } else {
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extended_name_wins_and_is_decoded() {
        let v = r#"attachment; filename="fallback.pdf"; filename*=UTF-8''Relat%C3%B3rio%20final%20%E2%82%AC.pdf"#;
        assert_eq!(filename_from_disposition(v).as_deref(), Some("Relatório final €.pdf"));
        assert_eq!(
            filename_from_disposition("attachment; filename*=iso-8859-1'pt'ol%E1.txt").as_deref(),
            Some("olá.txt")
        );
    }

    #[test]
    fn plain_names_quoted_or_not() {
        assert_eq!(
            filename_from_disposition(r#"inline; filename="a \"b\"; c.png""#).as_deref(),
            Some(r#"a "b"; c.png"#)
        );
        assert_eq!(filename_from_disposition("attachment; filename=report.csv").as_deref(), Some("report.csv"));
        assert_eq!(filename_from_disposition("attachment"), None);
        assert_eq!(filename_from_disposition("attachment; filename*=UTF-8''%FF%FE"), None, "invalid UTF-8 is no name");
    }

    #[test]
    fn url_path_fallback() {
        let u = url::Url::parse("https://files.huggy.app/1/2/Foto%20do%20cliente.jpeg?token=abc").unwrap();
        assert_eq!(filename_from_url(&u).as_deref(), Some("Foto do cliente.jpeg"));
        assert_eq!(filename_from_url(&url::Url::parse("https://files.huggy.app/").unwrap()), None);
    }

    #[test]
    fn sanitizing_blocks_traversal_and_keeps_extensions() {
        assert_eq!(sanitize("../../etc/passwd"), "_.._etc_passwd");
        assert_eq!(sanitize("..\\..\\x"), "_.._x");
        assert_eq!(sanitize("  \u{0}\n "), "__");
        assert_eq!(sanitize(""), "file");
        assert_eq!(sanitize("..."), "file");
        assert_eq!(sanitize(". . .hidden"), "hidden");
        let long = format!("{}.pdf", "á".repeat(200));
        let s = sanitize(&long);
        assert!(s.len() <= MAX_NAME && s.ends_with(".pdf"), "{s}");
    }
}
