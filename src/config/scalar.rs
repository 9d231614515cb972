//! Values as TOML and the environment give them: the environment's arrive typed (`1234` is a
//! number), so a string setting accepts any scalar and takes its text.

use serde::{Deserialize, Deserializer};

use super::Secret;

/// A scalar as a string: values from the environment arrive typed (`1234` is a number).
#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum Scalar {
    Str(String),
    Int(i64),
    UInt(u64),
    Float(f64),
    Bool(bool),
}

impl Scalar {
    pub(super) fn into_string(self) -> String {
        match self {
            Scalar::Str(s) => s,
            Scalar::Int(n) => n.to_string(),
            Scalar::UInt(n) => n.to_string(),
            Scalar::Float(n) => n.to_string(),
            Scalar::Bool(b) => b.to_string(),
        }
    }
}

/// A string setting: any scalar, as its text.
pub(super) fn scalar_string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Scalar::deserialize(d).map(Scalar::into_string)
}

/// An optional secret setting: any scalar, as its text.
pub(super) fn scalar_secret<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Secret>, D::Error> {
    Option::<Scalar>::deserialize(d).map(|s| s.map(|s| Secret::new(s.into_string())))
}
