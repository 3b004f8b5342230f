//! Publishing to JetStream, shared by every source: `<prefix>.<tenant>.<action>` with
//! `Nats-Msg-Id: <tenant>:<id>` (tenant-scoped, [`Event::message_id`]), and nothing counts as
//! published before JetStream's ack. [`Publisher`] publishes a source's batch at a time;
//! [`publish_all`] a long stream, paced (`auditbridge publish`, the benchmarks).

use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, context::PublishAckFuture, context::PublishError as NatsError};
use auditbridge_event::{Event, Uuid};
use backon::BackoffBuilder as _;
use bytes::Bytes;
use futures::stream::{FuturesUnordered, Stream, StreamExt as _};

use crate::mapping::Mapped;

/// `Auditbridge-Time: received`: the event's `occurred_at` is the time a source received it
/// (its mapping has no time), so a re-delivery carries another one and the worker compares a
/// re-sent id without it.
pub const TIME_HEADER: &str = "Auditbridge-Time";
/// `Auditbridge-Legacy-Id: <uuid>`: the id the unkeyed derivation of earlier versions gives
/// this event; the worker treats the message as a duplicate of the row stored with that id
/// only if it is the same event (the same content but for the id), and stores it under its
/// own id otherwise.
pub const LEGACY_ID_HEADER: &str = "Auditbridge-Legacy-Id";

/// One message ready to publish.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub subject: String,
    pub id: Uuid,
    /// The `Nats-Msg-Id`: `<tenant>:<id>`.
    pub msg_id: String,
    /// Further headers, such as [`TIME_HEADER`] and [`LEGACY_ID_HEADER`].
    pub headers: Vec<(&'static str, String)>,
    pub payload: Bytes,
}

impl Outgoing {
    /// `raw`: the payload exactly as received when it already is this event (identity
    /// mapping), so the trail stores the producer's bytes; otherwise the event is serialized.
    pub fn new(event: &Event, prefix: &str, raw: Option<Bytes>) -> Outgoing {
        Outgoing {
            subject: event.subject(prefix),
            id: event.id,
            msg_id: event.message_id(),
            headers: Vec::new(),
            payload: raw.unwrap_or_else(|| {
                Bytes::from(serde_json::to_vec(event).expect("an Event always serializes"))
            }),
        }
    }

    /// A mapped payload, with the headers that say how it was mapped.
    pub fn mapped(mapped: &Mapped, prefix: &str, raw: Option<Bytes>) -> Outgoing {
        let mut out = Outgoing::new(&mapped.event, prefix, raw);
        if mapped.time_received {
            out.headers.push((TIME_HEADER, "received".to_owned()));
        }
        if let Some(legacy) = mapped.legacy_id {
            out.headers.push((LEGACY_ID_HEADER, legacy.to_string()));
        }
        out
    }

    /// `Nats-Msg-Id` and the further headers.
    fn nats_headers(&self) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", self.msg_id.as_str());
        for (name, value) in &self.headers {
            headers.insert(*name, value.as_str());
        }
        headers
    }
}

/// JetStream did not acknowledge everything in time. Retryable: re-publishing is safe, the
/// ids deduplicate.
#[derive(Debug, thiserror::Error)]
#[error(
    "JetStream acknowledged {acked} of {total} messages within {waited:?} (last error: {last})"
)]
pub struct PublishError {
    pub acked: usize,
    pub total: usize,
    pub waited: Duration,
    pub last: String,
}

/// Where sources hand their events: JetStream in production, a recorder in unit tests.
pub trait Sink: Send + Sync {
    /// Publishes the whole batch; `Ok` only when every message was acknowledged.
    fn publish(&self, batch: &[Outgoing]) -> impl Future<Output = Result<(), PublishError>> + Send;
}

/// Publishes to JetStream, retrying what was not acknowledged (with backoff) until `timeout`.
#[derive(Clone)]
pub struct Publisher {
    js: jetstream::Context,
    timeout: Duration,
}

impl Publisher {
    pub fn new(js: jetstream::Context, timeout: Duration) -> Publisher {
        Publisher { js, timeout }
    }
}

impl Sink for Publisher {
    async fn publish(&self, batch: &[Outgoing]) -> Result<(), PublishError> {
        let started = Instant::now();
        let mut pending: Vec<&Outgoing> = batch.iter().collect();
        let mut backoff = backon::ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(50))
            .with_max_delay(Duration::from_secs(1))
            .with_jitter()
            .without_max_times()
            .build();
        let mut last = String::from("none");
        loop {
            let remaining = self.timeout.saturating_sub(started.elapsed());
            let attempt = async {
                let mut acks = Vec::with_capacity(pending.len());
                for out in &pending {
                    // Awaited here, one after the other (each only buffers into the
                    // connection), so the stream holds a batch in its order; polled together
                    // they interleaved whenever one had to wait for the connection.
                    acks.push(
                        self.js
                            .publish_with_headers(
                                out.subject.clone(),
                                out.nats_headers(),
                                out.payload.clone(),
                            )
                            .await,
                    );
                }
                // Then every ack awaited at once.
                let mut futures = Vec::with_capacity(acks.len());
                for a in acks {
                    futures.push(async move { a?.await });
                }
                futures::future::join_all(futures).await
            };
            match tokio::time::timeout(remaining, attempt).await {
                Ok(results) => {
                    let mut still = Vec::new();
                    for (out, r) in pending.iter().zip(results) {
                        if let Err(e) = r {
                            last = e.to_string();
                            still.push(*out);
                        }
                    }
                    pending = still;
                }
                Err(_) => last = "timed out".into(),
            }
            if pending.is_empty() {
                return Ok(());
            }
            let delay = backoff.next().unwrap_or(Duration::from_secs(1));
            if started.elapsed() + delay >= self.timeout {
                return Err(PublishError {
                    acked: batch.len() - pending.len(),
                    total: batch.len(),
                    waited: started.elapsed(),
                    last,
                });
            }
            tracing::debug!(pending = pending.len(), error = %last, message = "Publish not acknowledged; retrying.");
            tokio::time::sleep(delay).await;
        }
    }
}

/// What a [`publish_all`] run achieved.
#[derive(Debug, Default, Clone, Copy)]
pub struct PublishReport {
    /// Acknowledged by JetStream (stored, or recognised as a duplicate).
    pub acked: u64,
    /// Of those, recognised as re-sends inside the duplicate window.
    pub duplicates: u64,
    /// Not acknowledged after every retry.
    pub failed: u64,
}

/// Most publishes awaiting their acknowledgement at once.
const MAX_IN_FLIGHT: usize = 4096;
/// Attempts per message before it counts as failed.
const ATTEMPTS: u32 = 5;

type InFlight =
    std::pin::Pin<Box<dyn Future<Output = (Outgoing, u32, Result<bool, NatsError>)> + Send>>;

async fn send(js: &jetstream::Context, out: Outgoing, attempt: u32) -> InFlight {
    let sent = js
        .publish_with_headers(out.subject.clone(), out.nats_headers(), out.payload.clone())
        .await;
    Box::pin(async move {
        let result = match sent {
            Ok(ack) => wait_ack(ack).await,
            Err(e) => Err(e),
        };
        (out, attempt, result)
    })
}

async fn wait_ack(ack: PublishAckFuture) -> Result<bool, NatsError> {
    Ok(ack.await?.duplicate)
}

/// Publishes everything `messages` yields, paced to `rate` events/s if given, with at most
/// [`MAX_IN_FLIGHT`] unacknowledged; retries a failed publish (same `Nats-Msg-Id`, so
/// JetStream stores it once) with a growing pause.
pub async fn publish_all(
    js: &jetstream::Context,
    messages: impl Stream<Item = Outgoing>,
    rate: Option<f64>,
) -> PublishReport {
    let mut report = PublishReport::default();
    let mut in_flight: FuturesUnordered<InFlight> = FuturesUnordered::new();
    let started = Instant::now();
    let mut last_progress = Instant::now();
    let mut sent: u64 = 0;
    let interval = rate
        .filter(|r| *r > 0.0)
        .map(|r| Duration::from_secs_f64(1.0 / r));
    tokio::pin!(messages);

    let settle = |report: &mut PublishReport,
                  done: (Outgoing, u32, Result<bool, NatsError>)|
     -> Option<(Outgoing, u32)> {
        let (out, attempt, result) = done;
        match result {
            Ok(duplicate) => {
                report.acked += 1;
                report.duplicates += u64::from(duplicate);
                None
            }
            Err(e) if attempt < ATTEMPTS => {
                tracing::debug!(msg_id = %out.msg_id, error = %e, attempt, message = "Publish not acknowledged; retrying.");
                Some((out, attempt + 1))
            }
            Err(e) => {
                tracing::warn!(msg_id = %out.msg_id, error = %e, message = "Publish failed after every retry.");
                report.failed += 1;
                None
            }
        }
    };

    loop {
        // Pace before taking the next message, so a stream that stamps its items when they
        // are taken (the benchmark does) stamps them when they are really sent.
        if let Some(step) = interval {
            let due = started + step.mul_f64(sent as f64);
            tokio::time::sleep_until(due.into()).await;
        }
        let Some(out) = messages.next().await else {
            break;
        };
        while in_flight.len() >= MAX_IN_FLIGHT {
            if let Some(done) = in_flight.next().await
                && let Some((out, attempt)) = settle(&mut report, done)
            {
                tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt))).await;
                let next = send(js, out, attempt).await;
                in_flight.push(next);
            }
        }
        // Awaited before `push` (which takes `&self`), so no borrow of the set is held across
        // the await and the future stays `Send`.
        let next = send(js, out, 1).await;
        in_flight.push(next);
        sent += 1;
        if last_progress.elapsed() >= Duration::from_secs(5) {
            last_progress = Instant::now();
            tracing::info!(sent, acked = report.acked, message = "Publishing.");
        }
    }
    while let Some(done) = in_flight.next().await {
        if let Some((out, attempt)) = settle(&mut report, done) {
            tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt))).await;
            let next = send(js, out, attempt).await;
            in_flight.push(next);
        }
    }
    report
}
