//! What a caught panic said: the supervisor, the spool's threads and the publisher's guard log it
//! and count it, and go on. A leaf: it depends on nothing else in the crate.

/// The message a panic carried (`panic!("…")` payloads are `&str` or `String`).
pub(crate) fn message(payload: Box<dyn std::any::Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(s) => *s,
        Err(other) => match other.downcast::<&'static str>() {
            Ok(s) => (*s).to_owned(),
            Err(_) => "a panic without a message".to_owned(),
        },
    }
}
