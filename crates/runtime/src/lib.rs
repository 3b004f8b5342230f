//! What the long-running commands (`worker`, `serve`, `tail-file`, and `publish`/`status`
//! where they touch NATS) share, so that none of them reaches into another:
//!
//! - [`nats`]: connecting to NATS with the credentials kept out of the client's logs.
//! - [`provision`]: the JetStream stream and the shared durable consumer, created or brought in
//!   line with the configuration, with a typed error ([`provision::ProvisionError`]) whose
//!   variants are the caller's decision (stop, or retry).
//! - [`telemetry`]: every metric name, unit and description of the services; the Prometheus
//!   recorder; logging set-up.
//! - [`ops`]: the one `/metrics`, `/healthz` and `/readyz` server, and the [`ops::Health`] it
//!   reports.
//! - [`db_role`]: the start-up warning about a database role with more rights than needed.
//! - [`shutdown`]: the one deadline every step of a stop runs within.
//!
//! It holds no business logic: nothing here decides what an event is or where it goes.

pub mod db_role;
pub mod nats;
pub mod ops;
pub mod provision;
pub mod shutdown;
pub mod telemetry;

use std::time::Duration;

use backon::{BackoffBuilder as _, ExponentialBuilder};

/// The delays between attempts at something that will work again once a service is back
/// (a database, NATS): 100 ms doubling to 5 s, jittered so that workers restarted together do
/// not retry in step; never gives up (the caller stops at shutdown).
pub fn retry_backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
        .build()
}

/// A lease holder's name, unique per process: host, pid and a random suffix (a pid is reused
/// after a restart, a container's host name too).
pub fn holder_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into());
    let nonce = &uuid::Uuid::new_v4().simple().to_string()[..8];
    format!("{host}-{}-{nonce}", std::process::id())
}
