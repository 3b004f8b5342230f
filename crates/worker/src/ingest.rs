//! The ingest path: pull a batch, validate, persist in one transaction, then acknowledge.
//!
//! The order of those steps is the whole point. A message is acknowledged only after the
//! commit that contains it (guarantee 2); a batch that cannot be committed is held and retried
//! with backoff and never acknowledged, so a crash at any instant leaves every unacknowledged
//! message in JetStream to be redelivered, and the `id` primary key turns the redelivery into
//! a no-op.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::consumer::pull::MessagesErrorKind;
use async_nats::jetstream::{AckKind, Message};
use auditbridge_config::IngestConfig;
use auditbridge_event::{Event, Invalid};
use auditbridge_store::{DeadLetter, NewEvent, Store, StoreError};
use backon::{BackoffBuilder, ExponentialBuilder};
use futures::stream::FuturesUnordered;
use metrics::{counter, histogram};
use time::OffsetDateTime;
use tokio_stream::StreamExt as _;
use tokio_util::sync::CancellationToken;

use crate::Health;
use crate::telemetry::*;

/// Why the consume loop stopped.
#[derive(Debug)]
pub(crate) enum Stopped {
    /// Shutdown was requested.
    Shutdown,
    /// The consumer was deleted under us; provision it again.
    ConsumerLost,
}

/// What the ingest path needs besides the consumer.
pub(crate) struct Ingest {
    pub store: Store,
    pub subject_prefix: String,
    pub stream: String,
    pub config: IngestConfig,
    pub health: Arc<Health>,
}

/// The result of checking one message.
// Nearly every verdict is `Accept`; boxing the event would add an allocation per event to
// shrink the rare variants.
#[allow(clippy::large_enum_variant)]
enum Verdict {
    Accept(Event),
    /// Same id as an earlier message of this batch: acknowledged with it, not written twice.
    DuplicateInBatch,
    Refuse {
        kind: &'static str,
        reason: String,
    },
}

impl Ingest {
    /// Pulls and processes batches until shutdown is requested or the consumer disappears.
    /// Returns only between batches: a batch in flight is finished (committed and acked) or,
    /// if shutdown comes while it waits for the database, abandoned unacknowledged.
    pub(crate) async fn consume(
        &self,
        consumer: &PullConsumer,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Stopped> {
        let batch = self.config.batch_size;
        let messages = consumer
            .stream()
            // Keep about two batches in flight from the server so the next batch is already
            // here when the current one commits.
            .max_messages_per_batch((batch * 2).max(100))
            .heartbeat(Duration::from_secs(5))
            .expires(Duration::from_secs(30))
            .messages()
            .await?;
        let chunks = messages.chunks_timeout(batch, self.config.batch_wait);
        tokio::pin!(chunks);
        // Batches being persisted and acknowledged. They are independent (each is acked after
        // its own commit), so up to `persist_concurrency` run at once and may finish in any
        // order. They are polled by this loop, on this task: no batch outlives `consume`.
        let mut in_flight = FuturesUnordered::new();
        let limit = self.config.persist_concurrency;
        let stopped = loop {
            let chunk = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break Ok(Stopped::Shutdown),
                Some(()) = in_flight.next(), if !in_flight.is_empty() => continue,
                chunk = chunks.next(), if in_flight.len() < limit => chunk,
            };
            let Some(chunk) = chunk else {
                break Err(anyhow::anyhow!("the JetStream message stream ended"));
            };
            let mut batch = Vec::with_capacity(chunk.len());
            let mut lost = false;
            for item in chunk {
                match item {
                    Ok(msg) => batch.push(msg),
                    Err(e) => match e.kind() {
                        MessagesErrorKind::MissingHeartbeat => {
                            self.health.nats.store(false, Ordering::Relaxed);
                            tracing::warn!(error = %e, message = "JetStream heartbeats missed; is NATS reachable?");
                        }
                        MessagesErrorKind::ConsumerDeleted => lost = true,
                        _ => {
                            tracing::warn!(error = %e, message = "Pulling from JetStream failed; retrying.");
                        }
                    },
                }
            }
            if !batch.is_empty() {
                self.health.nats.store(true, Ordering::Relaxed);
                in_flight.push(self.process(batch, shutdown));
            }
            if lost {
                break Ok(Stopped::ConsumerLost);
            }
        };
        // Finish what was pulled: commit and ack, or (at shutdown, while the database is
        // away) abandon it unacknowledged.
        while in_flight.next().await.is_some() {}
        stopped
    }

    fn check(&self, msg: &Message, seen: &mut HashSet<auditbridge_event::Uuid>) -> Verdict {
        let decoded = auditbridge_event::decode(&msg.payload, self.config.max_event_bytes)
            .and_then(|event| {
                event.check_subject(&self.subject_prefix, msg.subject.as_str())?;
                Ok(event)
            });
        match decoded {
            Ok(event) if !seen.insert(event.id) => Verdict::DuplicateInBatch,
            Ok(event) => Verdict::Accept(event),
            Err(Invalid { kind, detail }) => Verdict::Refuse {
                kind: kind.as_str(),
                reason: detail,
            },
        }
    }

    /// Validates, persists and acknowledges one batch. Never returns an error: a batch either
    /// commits (and is acknowledged) or is abandoned unacknowledged at shutdown.
    async fn process(&self, batch: Vec<Message>, shutdown: &CancellationToken) {
        counter!(EVENTS_RECEIVED).increment(batch.len() as u64);
        histogram!(BATCH_SIZE).record(batch.len() as f64);

        let mut seen = HashSet::with_capacity(batch.len());
        let verdicts: Vec<Verdict> = batch.iter().map(|m| self.check(m, &mut seen)).collect();
        let seqs: Vec<u64> = batch
            .iter()
            .map(|m| m.info().map(|i| i.stream_sequence).unwrap_or(0))
            .collect();

        // What still has to be committed. Events rejected by the database itself move from the
        // first list to the second (see `isolate`).
        let mut pending: Vec<usize> = (0..batch.len())
            .filter(|&i| matches!(verdicts[i], Verdict::Accept(_)))
            .collect();
        let mut refused: Vec<(usize, &'static str, String)> = verdicts
            .iter()
            .enumerate()
            .filter_map(|(i, v)| match v {
                Verdict::Refuse { kind, reason } => Some((i, *kind, reason.clone())),
                _ => None,
            })
            .collect();

        let mut backoff = retry_backoff();
        let mut failures = 0u32;
        loop {
            let events: Vec<NewEvent<'_>> = pending
                .iter()
                .filter_map(|&i| match &verdicts[i] {
                    Verdict::Accept(event) => Some(NewEvent {
                        event,
                        raw: &batch[i].payload,
                    }),
                    _ => None,
                })
                .collect();
            let dead: Vec<DeadLetter<'_>> = refused
                .iter()
                .map(|(i, kind, reason)| DeadLetter {
                    stream: &self.stream,
                    stream_seq: seqs[*i],
                    subject: batch[*i].subject.as_str(),
                    payload: &batch[*i].payload,
                    kind,
                    reason,
                })
                .collect();

            let started = Instant::now();
            let result = self.store.persist(&events, &dead).await;
            match result {
                Ok(outcome) => {
                    histogram!(PERSIST_DURATION).record(started.elapsed().as_secs_f64());
                    counter!(EVENTS_PERSISTED).increment(outcome.inserted);
                    let in_batch = verdicts
                        .iter()
                        .filter(|v| matches!(v, Verdict::DuplicateInBatch))
                        .count() as u64;
                    counter!(EVENTS_DUPLICATE).increment(outcome.duplicates + in_batch);
                    for (_, kind, _) in &refused {
                        counter!(EVENTS_DEAD_LETTERED, "kind" => *kind).increment(1);
                    }
                    if failures > 0 {
                        tracing::info!(
                            attempts = failures + 1,
                            message = "PostgreSQL accepted the batch again."
                        );
                    }
                    self.health.db.store(true, Ordering::Relaxed);
                    break;
                }
                Err(StoreError::Rejected(e)) => {
                    counter!(PERSIST_FAILURES, "reason" => "rejected").increment(1);
                    tracing::warn!(error = %e, events = pending.len(), message = "PostgreSQL rejected data in a batch; writing its events one by one to find the culprit.");
                    drop(events);
                    drop(dead);
                    let isolated = self
                        .isolate(&batch, &verdicts, &mut pending, &mut refused)
                        .await;
                    if !isolated {
                        failures += 1;
                        if !self.wait(&mut backoff, shutdown).await {
                            return;
                        }
                    }
                }
                Err(e) => {
                    counter!(PERSIST_FAILURES, "reason" => "unavailable").increment(1);
                    self.health.db.store(false, Ordering::Relaxed);
                    failures += 1;
                    if failures == 1 || failures.is_multiple_of(20) {
                        tracing::warn!(error = %e, attempts = failures, events = pending.len(), message = "Cannot persist the batch; holding it unacknowledged and retrying.");
                    }
                    if matches!(e, StoreError::NotMigrated { .. }) {
                        tracing::error!(error = %e, message = "The database schema is behind this worker.");
                    }
                    drop(events);
                    drop(dead);
                    if !self.wait(&mut backoff, shutdown).await {
                        tracing::info!(
                            messages = batch.len(),
                            message = "Shutting down with a batch not persisted; it stays unacknowledged and will be redelivered."
                        );
                        return;
                    }
                }
            }
        }

        // Committed: now, and only now, acknowledge.
        let committed_at = OffsetDateTime::now_utc();
        let mut ack_failures = 0u64;
        for (msg, verdict) in batch.iter().zip(&verdicts) {
            let ack = match verdict {
                Verdict::Refuse { .. } => msg.ack_with(AckKind::Term).await,
                Verdict::Accept(_) | Verdict::DuplicateInBatch => msg.ack().await,
            };
            if ack.is_err() {
                ack_failures += 1;
            }
            if let (Verdict::Accept(_), Ok(info)) = (verdict, msg.info()) {
                let latency = (committed_at - info.published).as_seconds_f64().max(0.0);
                histogram!(PUBLISH_TO_COMMIT).record(latency);
            }
        }
        // Acks travel with the messages they answer; a whole batch of them is flushed by the
        // client's writer, so they are not flushed one by one here.
        if ack_failures > 0 {
            counter!(ACK_FAILURES).increment(ack_failures);
            tracing::warn!(
                failed = ack_failures,
                message = "Some acknowledgements could not be sent; those messages will be redelivered and deduplicated."
            );
        }
    }

    /// The database rejected a batch. Writes each pending event alone: those it accepts are
    /// committed (and leave `pending`), those it rejects become dead letters with the
    /// database's reason. Returns false if the database became unavailable meanwhile.
    async fn isolate(
        &self,
        batch: &[Message],
        verdicts: &[Verdict],
        pending: &mut Vec<usize>,
        refused: &mut Vec<(usize, &'static str, String)>,
    ) -> bool {
        let mut still = Vec::new();
        let mut ok = true;
        for &i in pending.iter() {
            let Verdict::Accept(event) = &verdicts[i] else {
                continue;
            };
            if !ok {
                still.push(i);
                continue;
            }
            let one = [NewEvent {
                event,
                raw: &batch[i].payload,
            }];
            match self.store.persist(&one, &[]).await {
                Ok(outcome) => {
                    counter!(EVENTS_PERSISTED).increment(outcome.inserted);
                    counter!(EVENTS_DUPLICATE).increment(outcome.duplicates);
                }
                Err(StoreError::Rejected(e)) => {
                    tracing::warn!(id = %event.id, error = %e, message = "PostgreSQL rejected an event; dead-lettering it.");
                    refused.push((
                        i,
                        "db_rejected",
                        format!("PostgreSQL rejected the event: {e}"),
                    ));
                }
                Err(_) => {
                    ok = false;
                    still.push(i);
                }
            }
        }
        *pending = still;
        ok
    }

    /// Sleeps for the next backoff step. Returns false if shutdown was requested meanwhile.
    async fn wait(
        &self,
        backoff: &mut impl Iterator<Item = Duration>,
        shutdown: &CancellationToken,
    ) -> bool {
        let delay = backoff.next().unwrap_or(Duration::from_secs(5));
        tokio::select! {
            _ = shutdown.cancelled() => false,
            _ = tokio::time::sleep(delay) => true,
        }
    }
}

/// Exponential backoff with jitter from 100 ms to 5 s, forever: a database outage costs delay,
/// never events, and the worker must not give up on a batch it holds.
pub(crate) fn retry_backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
        .build()
}
