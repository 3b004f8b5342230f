//! Checkpoint relays: a destination with `"checkpoints": true` also receives every new
//! checkpoint of the tenants its `filter.tenants` takes, one message each
//! ([`CheckpointMessage`]), so that copies of the log's signed state live outside the
//! database. Delivered at least once, in order, from a cursor of the destination's own (the
//! `destinations` row [`checkpoints_cursor`], its `cursor_seq` the id of the last checkpoint
//! given or passed over), under its own lease: its events and its checkpoints never wait for
//! each other.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use auditbridge_destinations::{CheckpointMessage, DeliveryError, DestinationConfig, Sink};
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

/// Checkpoints of refused tenants held in memory at most; beyond, no new ones are read until
/// some go.
const MAX_WAITING: usize = 10_000;

/// What became of one offer of a checkpoint.
enum Offer {
    Delivered,
    /// The destination refused this checkpoint (a 4xx, a RabbitMQ return): its tenant's
    /// checkpoints wait, the others go on.
    Refused,
    /// The lease was lost or shutdown came while the destination was failing.
    Stop,
}

/// Forwards checkpoints after id `cursor` until `held` is cancelled.
///
/// One tenant's checkpoint that the destination refuses never holds another tenant's: it and
/// that tenant's later ones wait in memory, offered again after a backoff, while the rest go
/// on. The stored cursor stays before the oldest waiting one, so after a takeover they are
/// offered again (with some already delivered: at least once). A failure of the destination
/// itself (connection, timeout, 5xx) holds everything, in order, as for events.
async fn forward_while_held(
    config: &DestinationConfig,
    ctx: &RelayContext,
    row: &str,
    sink: &mut Sink,
    cursor: i64,
    held: &CancellationToken,
) {
    let pause = async |d: Duration| {
        tokio::select! {
            _ = held.cancelled() => false,
            _ = tokio::time::sleep(d) => true,
        }
    };
    let (mut stored, mut read) = (cursor, cursor);
    let mut waiting: VecDeque<CheckpointMessage> = VecDeque::new();
    let mut refused: HashSet<String> = HashSet::new();
    let mut retry = crate::relay::backoff(config).build();
    let mut retry_at = Instant::now();
    let (mut delivered, mut passed) = (0u64, 0u64);
    while !held.is_cancelled() {
        // The waiting ones first, when their backoff is over, oldest first.
        if !waiting.is_empty() && Instant::now() >= retry_at {
            refused.clear();
            let mut still = VecDeque::new();
            let mut any = false;
            for message in std::mem::take(&mut waiting) {
                if refused.contains(&message.tenant) {
                    still.push_back(message);
                    continue;
                }
                match offer(config, ctx, row, sink, &message, held).await {
                    Offer::Delivered => {
                        delivered += 1;
                        any = true;
                    }
                    Offer::Refused => {
                        refused.insert(message.tenant.clone());
                        still.push_back(message);
                    }
                    Offer::Stop => return,
                }
            }
            waiting = still;
            if any {
                retry = crate::relay::backoff(config).build();
            }
            retry_at = Instant::now() + retry.next().unwrap_or(config.retry_max);
        }
        let batch = if waiting.len() >= MAX_WAITING {
            Vec::new()
        } else {
            match ctx.store.checkpoints_after(read, BATCH).await {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(error = %e, message = "Cannot read checkpoints now; retrying.");
                    if !pause(Duration::from_secs(5)).await {
                        return;
                    }
                    continue;
                }
            }
        };
        let idle = batch.is_empty();
        for c in batch {
            read = c.id;
            if !config.filter.takes_tenant(&c.tenant) {
                passed += 1;
                continue;
            }
            let message = CheckpointMessage {
                id: c.id,
                tenant: c.tenant,
                note: c.note,
            };
            if refused.contains(&message.tenant) {
                waiting.push_back(message);
                continue;
            }
            match offer(config, ctx, row, sink, &message, held).await {
                Offer::Delivered => delivered += 1,
                Offer::Refused => {
                    if waiting.is_empty() {
                        retry_at = Instant::now() + retry.next().unwrap_or(config.retry_max);
                    }
                    refused.insert(message.tenant.clone());
                    waiting.push_back(message);
                }
                Offer::Stop => return,
            }
        }
        // The stored cursor: just before the oldest waiting checkpoint, else all read.
        let to = waiting.front().map_or(read, |m| m.id - 1).max(stored);
        if to > stored || delivered > 0 || passed > 0 {
            if !advance(ctx, row, to, delivered, passed).await {
                return;
            }
            (stored, delivered, passed) = (to, 0, 0);
        }
        if idle {
            let wait = if waiting.is_empty() {
                POLL
            } else {
                retry_at
                    .saturating_duration_since(Instant::now())
                    .clamp(Duration::from_millis(10), POLL)
            };
            if !pause(wait).await {
                return;
            }
        }
    }
}

/// Offers one checkpoint: delivered; refused (its tenant waits); or, while the destination
/// itself fails, retried here with backoff until it goes, the lease is lost or shutdown.
async fn offer(
    config: &DestinationConfig,
    ctx: &RelayContext,
    row: &str,
    sink: &mut Sink,
    message: &CheckpointMessage,
    held: &CancellationToken,
) -> Offer {
    let name = config.name.as_str();
    let mut backoff = crate::relay::backoff(config).build();
    let mut failures = 0u32;
    loop {
        let e = match sink.deliver_checkpoint(message).await {
            Ok(()) => {
                counter!(LOG_CHECKPOINTS_FORWARDED, "destination" => name.to_owned()).increment(1);
                return Offer::Delivered;
            }
            Err(e) => e,
        };
        failures += 1;
        counter!(LOG_CHECKPOINT_FAILURES, "destination" => name.to_owned(), "reason" => e.reason())
            .increment(1);
        let _ = ctx
            .store
            .record_failure(row, &ctx.holder, &e.to_string(), true)
            .await;
        if matches!(e, DeliveryError::Refused { .. }) {
            tracing::warn!(error = %e, tenant = %message.tenant, message = "The destination refused a checkpoint; that tenant's checkpoints wait and are offered again, the others go on.");
            return Offer::Refused;
        }
        if failures == 1 || failures.is_multiple_of(20) {
            tracing::warn!(error = %e, tenant = %message.tenant, attempts = failures, message = "Cannot deliver a checkpoint; retrying.");
        }
        let delay = e
            .retry_after()
            .unwrap_or_else(|| backoff.next().unwrap_or(config.retry_max));
        tokio::select! {
            _ = held.cancelled() => return Offer::Stop,
            _ = tokio::time::sleep(delay) => {}
        }
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
