//! huggy-bridge: Huggy webhooks in, one Kafka record per event out, durably.
//!
//! ```text
//!  Huggy ──POST──▶ http ──▶ event::split ──▶ ingest ──append──▶ spool writer (fsync, group commit) ──▶ 2xx
//!                                                                  │ committed events, in order
//!                                          ┌───────────────────────┴──────────────────────┐
//!                                          ▼ CaptureFeed                      PublishFeed ▼
//!                           files (download → store)                 publish (rdkafka) ──▶ Kafka
//!                                          └── results ──▶ spool writer ◀── acks ─────────┘
//!  health ◀── writer heartbeat, publisher pulse, Kafka state, stage restarts ──▶ /readyz, /healthz, gauges
//! ```
//!
//! The spool is the hub: every later stage reads what is durable and writes back only through the
//! spool's one writer, so nothing after the 2xx depends on the request that brought the batch.
//! [`spool::Spool::open`] hands out one handle per follower ([`spool::Followers`]): the publish
//! feed and the capture feed are each their stage's only way back into the log. In kafka ack mode
//! `ingest` publishes (files first) and waits for Kafka's acks instead.
//!
//! Modules, leaves first (no module imports one that comes after it, and none imports its
//! importers: the graph has no cycles):
//! - [`event`]: pure parsing and splitting of batches; types, keys, ids, CloudEvents attributes.
//!   `json`: byte-level JSON scanning shared by parsing and file-URL detection.
//! - [`config`]: figment loading (defaults → TOML → `HUGGY_BRIDGE_*`), one file per section,
//!   validation, secrets, redaction. [`clock`]: the wall and monotonic clocks, free disk space.
//!   [`telemetry`]: logging.
//! - [`spool`]: the crash-safe segment log — writer, janitor, reader, recovery, dedup window — and
//!   the follower handles it hands out.
//! - [`metrics`], [`build_info`], [`supervise`]: every metric; what build this is; the supervisor
//!   the background stages run under (a panic is counted and the stage restarted from the spool).
//! - [`files`]: capture of the files events point to before their access tokens expire (SSRF-safe
//!   client, earliest-deadline-first scheduling, streaming into an object store), and its loops
//!   over the capture feed.
//! - `health`: readiness, liveness and the gauges read from state; it owns the Kafka connection
//!   state the producer reports into.
//! - [`publish`]: the Kafka producer, routing, headers, retry classification, dead-lettering,
//!   claim checks, the Kafka probe, and the follower that drains the spool one lane per key.
//! - `ingest`: what makes a batch durable before its 2xx, one implementation per ack mode.
//! - `http`: the public webhook listener and the admin listener (`/metrics`, `/healthz`, `/readyz`).
//! - [`reload`], [`systemd`], [`shutdown`]: a re-read configuration applied to the running daemon;
//!   systemd notifications and the watchdog; signals.
//! - [`replay`], [`contract`], [`memory`]: `dead-letter replay` and `claim-check get`; the AsyncAPI
//!   document and JSON Schemas of what is published; the worst-case memory of a configuration.
//! - [`app`]: the composition root — builds, wires, starts each stage once under the supervisor
//!   (every task tracked), and orders the drain.

#![warn(missing_docs)]

pub mod app;
pub mod build_info;
pub mod clock;
pub mod config;
pub mod contract;
pub mod event;
pub mod files;
mod health;
mod http;
mod ingest;
mod json;
pub mod memory;
pub mod metrics;
mod panics;
pub mod publish;
pub mod reload;
pub mod replay;
pub mod shutdown;
pub mod spool;
pub mod supervise;
pub mod systemd;
pub mod telemetry;
