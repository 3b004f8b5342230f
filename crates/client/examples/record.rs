//! Records a few audit events the way a service would.
//!
//! ```sh
//! # Any store; the file store keeps events across restarts while NATS is down.
//! AUDITBRIDGE_CLIENT_STORE='{"type":"file","params":{"dir":"/tmp/audit-buffer"}}' \
//!     cargo run -p auditbridge-client --example record
//! ```
//!
//! With a worker running (`auditbridge worker`), the events land in PostgreSQL. Stop NATS
//! while it runs: `record` keeps returning at once, the events wait in the store, and they are
//! published when NATS is back (or on the next run, with the file store).

use std::time::Duration;

use auditbridge_client::{Client, OnFull, Outcome, RecordError};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber_init();
    // AUDITBRIDGE_NATS_URL, AUDITBRIDGE_SUBJECT_PREFIX and AUDITBRIDGE_CLIENT_STORE, if set.
    let audit = auditbridge_client::ClientBuilder::from_env()?
        .source("example-service")
        // A request may wait up to 5 ms for room if the store is full; then it gets an error.
        .on_full(OnFull::Wait(Duration::from_millis(5)))
        .connect()
        .await?;

    for i in 0..10 {
        handle_request(&audit, i).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!("{:#?}", audit.stats());

    match audit.close(Duration::from_secs(5)).await {
        Ok(()) => println!("every event was acknowledged by JetStream"),
        // E.g. NATS is down: with a durable store, the next run publishes them.
        Err(e) => println!("{e}"),
    }
    Ok(())
}

/// A request handler: the audit event never fails the request.
async fn handle_request(audit: &Client, i: u32) {
    let event = audit
        .event("acme", "document.update")
        .actor("u-42")
        .actor_type("user")
        .actor_ip("203.0.113.9")
        .target(format!("doc-{i}"))
        .target_type("document")
        .outcome(Outcome::Success)
        .request_id(format!("req-{i}"))
        .meta("changes", serde_json::json!({"title": ["old", "new"]}))
        .build();
    let result = match event {
        Ok(event) => audit.record(event).await,
        // A bug in how this service builds events: the error names the field.
        Err(e) => {
            eprintln!("not a valid audit event: {e}");
            return;
        }
    };
    match result {
        Ok(()) => println!("recorded event {i}"),
        Err(e @ RecordError::Full { .. }) => eprintln!("audit event {i} not recorded: {e}"),
        Err(e) => eprintln!("audit event {i} refused: {e}"),
    }
}

/// The client logs through `tracing` (outages, a full store, dead-lettered lines).
fn tracing_subscriber_init() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
}
