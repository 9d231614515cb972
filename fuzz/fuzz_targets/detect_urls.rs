//! URL detection over arbitrary bytes: never panics, finds only strings with an allowed prefix.
#![no_main]

#[path = "../../src/json.rs"]
mod json;
#[allow(dead_code)]
#[path = "../../src/files/prefix.rs"]
mod prefix;
#[allow(dead_code)]
#[path = "../../src/files/detect.rs"]
mod detect;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let raw = vec!["https://files.huggy.app/".to_owned(), "http://127.0.0.1:1/".to_owned()];
    let prefixes = prefix::parse_prefixes(&raw);
    for url in detect::file_urls(data, &prefixes) {
        assert!(prefix::allowed(&prefixes, &url), "{url}");
    }
});
