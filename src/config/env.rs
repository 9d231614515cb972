//! The environment as a figment provider that keeps string settings as the strings given.
//!
//! figment's own `Env` provider parses every value as a TOML-like literal: `HUGGY_BRIDGE_KAFKA__SASL__USERNAME=0123`
//! would become the number 123 and then the string `"123"`, a topic named `true` a boolean. Here a
//! value is parsed only for a setting whose declared default is not a string (a number, a boolean,
//! a list); a string setting, and every entry of a string map (`kafka.topics`, `kafka.librdkafka`),
//! takes the value exactly as given. Secrets are not read here at all (see `secrets`).

use figment::value::{Dict, Map, Value};
use figment::{Error, Metadata, Profile, Provider};

/// `inner` (prefix, filter and `__` nesting already set), with string settings kept raw.
pub(super) struct TypedEnv {
    inner: figment::providers::Env,
    /// The declared defaults, as figment values: what type each setting has.
    defaults: Dict,
}

impl TypedEnv {
    pub(super) fn new(inner: figment::providers::Env, defaults: Dict) -> TypedEnv {
        TypedEnv { inner, defaults }
    }
}

/// Whether the setting at `path` is a string: its default is a string, or it lies inside a map
/// whose defaults are empty (the string maps `kafka.topics` and `kafka.librdkafka`).
fn is_string_setting(defaults: &Dict, path: &[&str]) -> bool {
    let mut table = defaults;
    for (i, key) in path.iter().enumerate() {
        match table.get(*key) {
            Some(Value::String(..)) => return i + 1 == path.len(),
            Some(Value::Dict(_, d)) if d.is_empty() => return i + 1 < path.len(),
            Some(Value::Dict(_, d)) => table = d,
            _ => return false,
        }
    }
    false
}

fn insert(dict: &mut Dict, path: &[&str], value: Value) {
    match path {
        [] => {}
        [last] => {
            dict.insert((*last).to_owned(), value);
        }
        [first, rest @ ..] => {
            let entry = dict.entry((*first).to_owned()).or_insert_with(|| Value::from(Dict::new()));
            if !matches!(entry, Value::Dict(..)) {
                *entry = Value::from(Dict::new());
            }
            if let Value::Dict(_, d) = entry {
                insert(d, rest, value);
            }
        }
    }
}

impl Provider for TypedEnv {
    fn metadata(&self) -> Metadata {
        self.inner.metadata()
    }

    fn data(&self) -> Result<Map<Profile, Dict>, Error> {
        let mut dict = Dict::new();
        for (key, raw) in self.inner.iter() {
            let path: Vec<&str> = key.as_str().split('.').collect();
            let value = if is_string_setting(&self.defaults, &path) {
                Value::from(raw)
            } else {
                raw.parse::<Value>().unwrap_or_else(|never| match never {})
            };
            insert(&mut dict, &path, value);
        }
        Ok(self.inner.profile.collect(dict))
    }
}
