//! The end-to-end suite against the real NATS, PostgreSQL and RabbitMQ on 127.0.0.1, as one
//! test binary with a module per area (zero-to-production's `tests/api/main.rs`), so the suite
//! links once. Every test has its own database, subject prefix, stream and consumer
//! (`auditbridge_tests::TestEnv`), and whatever it reads that is global to this process (the
//! in-process API server's metrics) is its own, so the tests of every module run in parallel.
//! Run one area with `cargo test -p auditbridge-tests --test e2e forwarding::`.
//!
//! Tests that restart the shared services live in `faults_global.rs`, a binary of its own:
//! cargo runs test binaries one after another, so nothing of this one runs beside them.

mod api;
mod cli;
mod client;
mod dead_letters;
mod destinations;
mod faults;
mod formats;
mod forwarding;
mod ingest;
mod limits;
mod log;
mod log_audit;
mod outbox;
mod page;
mod poison;
mod poll;
mod redact;
mod replay;
mod retention;
mod roles;
mod schema;
mod sources;
mod tidy;
