//! URL detection over arbitrary bytes: never panics, finds only strings with an allowed prefix, each
//! once; and in valid JSON it finds every string (value or key) that has one.
#![no_main]

use huggy_bridge::config::prefix;
use huggy_bridge::files::detect;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let raw = vec!["https://files.huggy.app/".to_owned(), "http://127.0.0.1:1/".to_owned()];
    let prefixes = prefix::parse_prefixes(&raw);
    let found = detect::file_urls(data, &prefixes);
    for (i, url) in found.iter().enumerate() {
        assert!(prefix::allowed(&prefixes, url), "{url}");
        assert!(!found[..i].contains(url), "{url} found twice");
    }
    if let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) {
        let mut strings = Vec::new();
        walk(&value, &mut strings);
        for s in strings.into_iter().filter(|s| prefix::allowed(&prefixes, s)) {
            assert!(found.contains(&s), "{s} missed");
        }
    }
});

/// Every string in `v`, keys included.
fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::String(s) => out.push(s.clone()),
        serde_json::Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
        serde_json::Value::Object(m) => m.iter().for_each(|(k, x)| {
            out.push(k.clone());
            walk(x, out);
        }),
        _ => {}
    }
}
