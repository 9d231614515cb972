//! The black-box tests, one binary: HTTP in as Huggy, records out as a Kafka consumer, the daemon
//! in-process or as a real process, on the embedded broker or a real one.
//!
//! To add a file of tests: put it in this directory, start it with `use crate::common::*;` (or
//! `use crate::common;`), and add its `mod` line below.

#[path = "../common/mod.rs"]
mod common;

mod consumer_contract;
mod deploy;
mod durability;
mod embedded;
mod fidelity;
mod files;
mod files_pressure;
mod hostile;
mod https;
mod kafka_security;
mod operations;
mod real_broker;
mod self_healing;
mod whole_events;
