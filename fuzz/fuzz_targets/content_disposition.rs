//! Content-Disposition parsing and file-name sanitising: never panic; a sanitised name is never
//! empty, never a path, never hidden, and bounded in length.
#![no_main]

use huggy_bridge::files::disposition;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let name = disposition::filename_from_disposition(text).unwrap_or_else(|| text.to_owned());
    let safe = disposition::sanitize(&name);
    assert!(!safe.is_empty() && safe.len() <= 160);
    assert!(!safe.contains('/') && !safe.contains('\\') && !safe.starts_with('.'));
    assert!(!safe.chars().any(char::is_control));
    if let Ok(u) = url::Url::parse(&format!("https://files.huggy.app/{text}")) {
        let _ = disposition::filename_from_url(&u);
    }
});
