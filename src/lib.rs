//! huggy-bridge: Huggy webhooks in, one Kafka record per event out, durably.
//!
//! ```text
//!  Huggy ──POST──▶ http ──▶ event::split ──▶ ingest ──▶ spool writer (fsync, group commit) ──▶ 2xx
//!                                                          │ committed events, in order
//!                                          ┌───────────────┴──────────────┐
//!                                          ▼                              ▼
//!                           files (download → store)        publish (rdkafka) ──▶ Kafka
//!                                          └── results ──▶ spool writer ◀── acks ──┘
//! ```
//!
//! The spool is the hub: every later stage reads what is durable and writes back only through the
//! spool's one writer, so nothing after the 2xx depends on the request that brought the batch.
//!
//! - [`config`]: figment loading (defaults → TOML → `HUGGY_BRIDGE_*`), validation, redaction.
//! - [`contract`]: the AsyncAPI document and JSON Schemas of what the bridge publishes.
//! - `http`: the public webhook listener and the admin listener (`/metrics`, `/healthz`, `/readyz`).
//! - [`event`]: pure parsing and splitting of batches; types, keys, ids, CloudEvents attributes.
//! - `ingest`: the durability stage the handler hands a batch to (`spool` or `kafka` ack mode).
//! - [`spool`]: the crash-safe segment log, its recovery, dedup window and gauges.
//! - [`files`]: capture of the files events point to before their access tokens expire (SSRF-safe
//!   client, earliest-deadline-first scheduling, streaming into an object store).
//! - [`publish`]: the Kafka producer, routing, headers, retry classification, dead-lettering, and the
//!   loop that drains the spool.
//! - [`replay`]: `dead-letter replay` and `claim-check get`, the ways back out of the dead-letter
//!   topic and the file store.
//! - `health`: readiness, liveness and the gauges read from state.
//! - [`supervise`]: the background stages run under a supervisor that restarts them after a panic.
//! - [`reload`], [`systemd`]: a re-read configuration applied to the running daemon (SIGHUP, changed
//!   secret or certificate files); systemd notifications and a watchdog that follows liveness.
//! - [`memory`], [`build_info`]: the worst-case memory of a configuration; what build this is.
//! - [`metrics`], [`telemetry`], [`shutdown`], [`clock`], and [`app`], which wires them together.

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
