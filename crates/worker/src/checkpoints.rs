//! Checkpoint relays: a destination with `"checkpoints": true` also receives every new
//! checkpoint of the tenants its `filter.tenants` takes, one message each
//! ([`CheckpointMessage`]), so that copies of the log's signed state live outside the
//! database. Delivered at least once, in order, from a cursor of the destination's own (the
//! `destinations` row [`checkpoints_cursor`], its `cursor_seq` the id of the last checkpoint
//! given or passed over), under its own lease: its events and its checkpoints never wait for
//! each other.

use std::sync::Arc;
use std::time::Duration;

use auditbridge_destinations::{CheckpointMessage, DestinationConfig, Sink};
use auditbridge_runtime::telemetry::{LOG_CHECKPOINT_FAILURES, LOG_CHECKPOINTS_FORWARDED};
use auditbridge_store::Position;
use auditbridge_store::log::checkpoints_cursor;
use backon::BackoffBuilder as _;
use metrics::counter;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::relay::RelayContext;

/// How often a caught-up checkpoint relay looks for new checkpoints (they come at most once
/// per `AUDITBRIDGE_LOG_CHECKPOINT_INTERVAL` per tenant).
const POLL: Duration = Duration::from_secs(1);
/// Checkpoints read at once.
const BATCH: usize = 100;

pub(crate) async fn supervise(
    config: DestinationConfig,
    ctx: Arc<RelayContext>,
    shutdown: CancellationToken,
) {
    let span = tracing::info_span!("checkpoints", destination = %config.name);
    run(config, ctx, shutdown).instrument(span).await;
}

async fn run(config: DestinationConfig, ctx: Arc<RelayContext>, shutdown: CancellationToken) {
    let Some(mut sink) = crate::relay::build_sink(&config, &shutdown, Sink::new).await else {
        return;
    };
    let row = checkpoints_cursor(&config.name);
    let mut lease = crate::lease::Lease::new(&ctx.store, &row, &ctx.holder, ctx.lease_ttl);
    let register = || ctx.store.register_checkpoint_cursor(&config.name);
    while let Some(held) = lease.acquire(&shutdown, register).await {
        let after = held.state.cursor.seq;
        tracing::info!(
            after,
            message = "Took the checkpoint cursor's lease; forwarding checkpoints."
        );
        forward_while_held(&config, &ctx, &row, &mut sink, after, &held.token).await;
        lease.finish(held, &shutdown).await;
    }
}

/// Forwards checkpoints after id `cursor` until `held` is cancelled.
async fn forward_while_held(
    config: &DestinationConfig,
    ctx: &RelayContext,
    row: &str,
    sink: &mut Sink,
    mut cursor: i64,
    held: &CancellationToken,
) {
    let name = config.name.as_str();
    let pause = async |d: Duration| {
        tokio::select! {
            _ = held.cancelled() => false,
            _ = tokio::time::sleep(d) => true,
        }
    };
    while !held.is_cancelled() {
        let batch = match ctx.store.checkpoints_after(cursor, BATCH).await {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, message = "Cannot read checkpoints now; retrying.");
                if !pause(Duration::from_secs(5)).await {
                    return;
                }
                continue;
            }
        };
        if batch.is_empty() {
            if !pause(POLL).await {
                return;
            }
            continue;
        }
        let (mut delivered, mut passed) = (0u64, 0u64);
        let mut to = cursor;
        for c in batch {
            if config.filter.takes_tenant(&c.tenant) {
                // Everything passed over so far is recorded first: a delivery can wait long.
                if passed > 0 && !advance(ctx, row, to, 0, passed).await {
                    return;
                }
                passed = 0;
                let message = CheckpointMessage {
                    id: c.id,
                    tenant: c.tenant,
                    note: c.note,
                };
                let mut backoff = crate::relay::backoff(config).build();
                let mut failures = 0u32;
                loop {
                    match sink.deliver_checkpoint(&message).await {
                        Ok(()) => break,
                        Err(e) => {
                            failures += 1;
                            counter!(LOG_CHECKPOINT_FAILURES, "destination" => name.to_owned(), "reason" => e.reason()).increment(1);
                            if failures == 1 || failures.is_multiple_of(20) {
                                tracing::warn!(error = %e, tenant = %message.tenant, attempts = failures, message = "Cannot deliver a checkpoint; retrying.");
                            }
                            let _ = ctx
                                .store
                                .record_failure(row, &ctx.holder, &e.to_string(), true)
                                .await;
                            let delay = e
                                .retry_after()
                                .unwrap_or_else(|| backoff.next().unwrap_or(config.retry_max));
                            if !pause(delay).await {
                                return;
                            }
                        }
                    }
                }
                counter!(LOG_CHECKPOINTS_FORWARDED, "destination" => name.to_owned()).increment(1);
                delivered += 1;
                to = message.id;
                if !advance(ctx, row, to, delivered, 0).await {
                    return;
                }
                delivered = 0;
            } else {
                passed += 1;
                to = c.id;
            }
        }
        if passed > 0 && !advance(ctx, row, to, delivered, passed).await {
            return;
        }
        cursor = to;
    }
}

/// Moves the checkpoint cursor to `to` under the lease; false when the relay must stop.
async fn advance(ctx: &RelayContext, row: &str, to: i64, delivered: u64, passed: u64) -> bool {
    match ctx
        .store
        .advance(
            row,
            &ctx.holder,
            &Position::new(0, "0", to),
            delivered,
            passed,
        )
        .await
    {
        Ok(true) => true,
        Ok(false) => {
            tracing::warn!(message = "The checkpoint cursor's lease was lost; stopping.");
            false
        }
        Err(e) => {
            tracing::warn!(error = %e, message = "Cannot record checkpoint progress; giving the lease up (they will be sent again).");
            false
        }
    }
}
