//! Huggy batches and events: parsing the webhook body, splitting it into events, and the pure rules
//! that give each event its type, key, id and CloudEvents attributes. No async, no I/O.
//!
//! Event bytes are never re-serialized: splitting borrows each event as a
//! [`RawValue`](serde_json::value::RawValue), so the value published to Kafka is exactly what Huggy
//! sent (ids beyond 2^53, escapes, key order, whitespace).
//!
//! The way through, one file each: `parse` reads the body into a [`Batch`] ([`parse_body`]);
//! [`split()`] (`split`) makes one [`Event`] of each of its events: the members that decide its key
//! and routing headers (`fields`), its type ([`EventType`], `types`), its id from the batch and its
//! [`Sender`] ([`EventId`], `id`) and its place in its stream ([`lineage`]). `cloudevent` holds the
//! [`Event`] and the CloudEvents attributes derived from it.

mod cloudevent;
mod fields;
mod id;
pub mod lineage;
mod parse;
mod split;
pub(crate) mod types;

pub use cloudevent::{time_millis, Event};
pub use fields::{Routing, ROUTING_HEADERS};
pub use id::{EventId, Sender, Source};
pub use lineage::{Lineage, StreamRuns};
#[cfg(test)]
pub(crate) use parse::parse_count;
pub use parse::{envelope_token, parse_body, top_level_token, Batch, Body, BodyError};
pub(crate) use split::{is_refusal, routing_of};
pub use split::{split, COMPANY_MISMATCH};
pub use types::{EventType, KnownType};

#[cfg(test)]
pub(crate) mod tests;
