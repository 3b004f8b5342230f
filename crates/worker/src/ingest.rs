//! The ingest path: pull a batch, validate, persist in one transaction, then acknowledge.
//!
//! The order of those steps is the whole point. A message is acknowledged only after the
//! commit that contains it (guarantee 2); a batch that cannot be committed is held and retried
//! with backoff and never acknowledged, so a crash at any instant leaves every unacknowledged
//! message in JetStream to be redelivered, and the `id` primary key turns the redelivery into
//! a no-op.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::consumer::pull::MessagesErrorKind;
use async_nats::jetstream::{AckKind, Message};
use auditbridge_config::IngestConfig;
use auditbridge_event::redact::Redactor;
use auditbridge_event::{Event, Invalid};
use auditbridge_store::dead_letters::REPLAY_HEADER;
use auditbridge_store::{
    CONFLICT, DeadLetter, Incoming, Ingested, NewEvent, Origin, Replay, StoreError,
};
use futures::stream::FuturesUnordered;
use metrics::{counter, histogram};
use time::OffsetDateTime;
use tokio::time::MissedTickBehavior;
use tokio_stream::StreamExt as _;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use auditbridge_runtime::ops::Health;
use auditbridge_runtime::retry_backoff;
use auditbridge_runtime::telemetry::*;

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
    pub store: auditbridge_store::Store,
    pub subject_prefix: String,
    pub stream: String,
    pub config: IngestConfig,
    pub health: Arc<Health>,
    /// For the server's `max_payload` (see [`Ingest::pull_max_bytes`]).
    pub nats: async_nats::Client,
    /// The ingest redaction rules (`[[redact]]`): applied before an event is stored, and to
    /// what a dead letter keeps.
    pub redact: Redactor,
}

/// The result of checking one message.
// Nearly every verdict is `Accept`; boxing the event would add an allocation per event to
// shrink the rare variants.
#[allow(clippy::large_enum_variant)]
enum Verdict {
    Accept(Event, Option<Redaction>),
    Refuse {
        kind: &'static str,
        reason: String,
        /// The payload with the redaction rules applied, when they changed it.
        redacted: Option<Vec<u8>>,
    },
}

/// What ingest redaction did to an accepted event: its new text (when it changed) and the
/// record kept beside it (`{"rules": version, "paths": [...]}`).
struct Redaction {
    json: Option<String>,
    record: String,
}

/// Header set by sources whose mapping filled `occurred_at` at receive time (value `received`):
/// a re-delivery of the same event is compared without it.
pub(crate) const TIME_HEADER: &str = "Auditbridge-Time";
/// Header carrying the id an older (unkeyed) derivation gave the event: a duplicate of the row
/// stored under it only with the same content (see `auditbridge_store::Incoming::legacy_id`).
pub(crate) const LEGACY_ID_HEADER: &str = "Auditbridge-Legacy-Id";

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
        let pull_bytes = self.pull_max_bytes();
        let messages = consumer
            .stream()
            // Keep about two batches in flight from the server so the next batch is already
            // here when the current one commits.
            .max_messages_per_batch((batch * 2).max(100))
            // And bound what a pull may bring by bytes: without it, 4,000 messages of up to
            // `max_payload` each could be on their way at once.
            .max_bytes_per_batch(pull_bytes)
            .heartbeat(Duration::from_secs(5))
            .expires(Duration::from_secs(30))
            .messages()
            .await?;
        tokio::pin!(messages);
        let mut batcher = Batcher::new(batch, self.config.batch_max_bytes);
        // Closes a partial batch `batch_wait` after its first message.
        let wait = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(wait);
        // Batches being persisted and acknowledged. They are independent (each is acked after
        // its own commit), so up to `persist_concurrency` run at once and may finish in any
        // order. They are polled by this loop, on this task: no batch outlives `consume`.
        let mut in_flight = FuturesUnordered::new();
        let limit = self.config.persist_concurrency;
        let stopped = loop {
            // A batch closed by a message that did not fit (or full by itself) waits here for
            // a free slot; nothing more is pulled meanwhile.
            if batcher.is_full() && in_flight.len() < limit {
                in_flight.push(self.process(batcher.take(), shutdown));
            }
            let room = in_flight.len() < limit && !batcher.is_full();
            let item = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break Ok(Stopped::Shutdown),
                Some(()) = in_flight.next(), if !in_flight.is_empty() => continue,
                () = &mut wait, if room && !batcher.is_empty() => {
                    in_flight.push(self.process(batcher.take(), shutdown));
                    continue;
                }
                item = messages.next(), if room => item,
            };
            let Some(item) = item else {
                if !batcher.is_empty() {
                    in_flight.push(self.process(batcher.take(), shutdown));
                }
                break Err(anyhow::anyhow!("the JetStream message stream ended"));
            };
            match item {
                Ok(msg) => {
                    self.health.set_nats(true);
                    let size = msg.length;
                    if let Some(closed) = batcher.push(msg, size) {
                        in_flight.push(self.process(closed, shutdown));
                    }
                    // This message opened a batch.
                    if batcher.len() == 1 {
                        wait.as_mut()
                            .reset(tokio::time::Instant::now() + self.config.batch_wait);
                    }
                }
                Err(e) => match e.kind() {
                    MessagesErrorKind::MissingHeartbeat => {
                        self.health.set_nats(false);
                        tracing::warn!(error = %e, message = "JetStream heartbeats missed; is NATS reachable?");
                    }
                    MessagesErrorKind::ConsumerDeleted => {
                        if !batcher.is_empty() {
                            in_flight.push(self.process(batcher.take(), shutdown));
                        }
                        break Ok(Stopped::ConsumerLost);
                    }
                    _ => {
                        tracing::warn!(error = %e, message = "Pulling from JetStream failed; retrying.");
                    }
                },
            }
        };
        // Finish what was pulled: commit and ack, or (at shutdown, while the database is
        // away) abandon it unacknowledged.
        while in_flight.next().await.is_some() {}
        stopped
    }

    /// The byte limit of each pull: `batch_max_bytes`, but never below the largest message the
    /// server lets anyone publish (`max_payload`) plus its delivery overhead. The stream's own
    /// limit is not enough: messages stored before it was set (or lowered) can be larger, and
    /// a pull whose limit is below a message never gets it — JetStream answers 409 and keeps
    /// it first in line, so every later pull stalls on it too.
    fn pull_max_bytes(&self) -> usize {
        let max_payload = self.nats.server_info().max_payload;
        let floor = max_payload + auditbridge_config::DELIVERY_OVERHEAD;
        if floor > self.config.batch_max_bytes {
            tracing::info!(
                max_payload,
                batch_max_bytes = self.config.batch_max_bytes,
                message = "NATS allows messages larger than AUDITBRIDGE_BATCH_MAX_BYTES (max_payload); each pull allows one of them, so no message can stall the consumer."
            );
        }
        floor.max(self.config.batch_max_bytes)
    }

    fn check(&self, msg: &Message) -> Verdict {
        let decoded = auditbridge_event::decode(&msg.payload, self.config.max_event_bytes)
            .and_then(|event| {
                event.check_subject(&self.subject_prefix, msg.subject.as_str())?;
                Ok(event)
            });
        match decoded {
            Ok(event) if self.redact.applies_to(&event.tenant) => self.redact_event(msg, event),
            Ok(event) => Verdict::Accept(event, None),
            Err(Invalid { kind, detail }) => Verdict::Refuse {
                kind: kind.as_str(),
                reason: detail,
                redacted: self.redact_letter(msg),
            },
        }
    }

    /// Applies the ingest rules to a valid event: the event stored is the redacted one (its
    /// columns too: `actor.id` may be keyed), with the paths and the rules' version beside it.
    fn redact_event(&self, msg: &Message, event: Event) -> Verdict {
        // `decode` accepted the payload: it is UTF-8 JSON.
        let text = String::from_utf8_lossy(&msg.payload);
        let redacted = match self.redact.redact(&text, Some(&event.tenant)) {
            Ok(Some(r)) => r,
            Ok(None) => return Verdict::Accept(event, None),
            Err(e) => {
                return Verdict::Refuse {
                    kind: "redaction",
                    reason: format!("the redaction rules could not read the event: {}", e.0),
                    redacted: Some(withheld(&msg.payload, &e.0)),
                };
            }
        };
        let record = serde_json::json!({
            "rules": self.redact.version(),
            "paths": redacted.paths,
        })
        .to_string();
        let event = match &redacted.json {
            None => event,
            // Read back without the checks of `decode`: a masked `actor.ip` is no address, and
            // the event was valid before it was redacted.
            Some(json) => match serde_json::from_str::<Event>(json) {
                Ok(e) => e,
                Err(e) => {
                    return Verdict::Refuse {
                        kind: "redaction",
                        reason: format!("the event cannot be read once redacted: {e}"),
                        redacted: Some(json.clone().into_bytes()),
                    };
                }
            },
        };
        counter!(EVENTS_REDACTED).increment(1);
        Verdict::Accept(
            event,
            Some(Redaction {
                json: redacted.json,
                record,
            }),
        )
    }

    /// A refused message is kept with the same rules applied, where it is JSON: those for
    /// every tenant, the tenant its subject names, and the tenant its payload names.
    fn redact_letter(&self, msg: &Message) -> Option<Vec<u8>> {
        if self.redact.is_empty() {
            return None;
        }
        let Ok(text) = std::str::from_utf8(&msg.payload) else {
            return Some(withheld(&msg.payload, "it is not UTF-8"));
        };
        let subject_tenant = msg
            .subject
            .as_str()
            .strip_prefix(self.subject_prefix.as_str())
            .and_then(|r| r.strip_prefix('.'))
            .and_then(|r| r.split('.').next())
            .map(str::to_owned);
        let payload_tenant = serde_json::from_str::<serde_json::Value>(text)
            .ok()
            .and_then(|v| v.get("tenant")?.as_str().map(str::to_owned));
        let mut current = text.to_owned();
        let mut changed = false;
        let mut tenants = vec![subject_tenant];
        if payload_tenant != tenants[0] {
            tenants.push(payload_tenant);
        }
        for tenant in tenants {
            match self.redact.redact(&current, tenant.as_deref()) {
                Ok(Some(r)) => {
                    if let Some(json) = r.json {
                        current = json;
                        changed = true;
                    }
                }
                Ok(None) => {}
                // Rules that cannot read it cannot vouch for it: the payload is not kept.
                Err(e) => return Some(withheld(&msg.payload, &e.0)),
            }
        }
        changed.then(|| current.into_bytes())
    }

    /// Validates, persists and acknowledges one batch, in a span that carries its size. Never
    /// returns an error: a batch either commits (and is acknowledged) or is abandoned
    /// unacknowledged at shutdown.
    async fn process(&self, batch: Vec<Message>, shutdown: &CancellationToken) {
        let bytes = batch.iter().map(|m| m.length).sum::<usize>();
        counter!(EVENTS_RECEIVED).increment(batch.len() as u64);
        histogram!(BATCH_SIZE).record(batch.len() as f64);
        histogram!(BATCH_BYTES).record(bytes as f64);
        let span = tracing::info_span!("batch", messages = batch.len(), bytes);
        async {
            // The decoded events, which the split borrows.
            let verdicts: Vec<Verdict> = batch.iter().map(|m| self.check(m)).collect();
            let split = self.split(&batch, &verdicts);
            let Some(outcome) = self.persist(&batch, &split, shutdown).await else {
                tracing::info!(
                    message = "Shutting down with a batch not persisted; it stays unacknowledged and will be redelivered."
                );
                return;
            };
            counter!(EVENTS_PERSISTED).increment(outcome.inserted);
            counter!(EVENTS_DUPLICATE).increment(outcome.duplicates);
            acknowledge(split, &outcome).await;
        }
        .instrument(span)
        .await;
    }

    /// Splits the batch, once, into the events to store and the messages refused as they are
    /// (`verdicts[i]` is the check of `batch[i]`).
    fn split<'b>(&'b self, batch: &'b [Message], verdicts: &'b [Verdict]) -> Split<'b> {
        let mut split = Split::default();
        for (msg, verdict) in batch.iter().zip(verdicts) {
            let origin = self.origin(msg);
            match verdict {
                Verdict::Accept(event, redaction) => {
                    split.accepted.push(msg);
                    let raw = match redaction.as_ref().and_then(|r| r.json.as_deref()) {
                        Some(json) => json.as_bytes(),
                        None => &msg.payload[..],
                    };
                    split.events.push(Incoming {
                        event: NewEvent {
                            event,
                            raw,
                            redaction: redaction.as_ref().map(|r| r.record.as_str()),
                        },
                        origin,
                        time_received: header(msg, TIME_HEADER)
                            .is_some_and(|v| v.trim().eq_ignore_ascii_case("received")),
                        legacy_id: header(msg, LEGACY_ID_HEADER)
                            .and_then(|v| auditbridge_event::Uuid::parse_str(v.trim()).ok()),
                    });
                }
                Verdict::Refuse {
                    kind,
                    reason,
                    redacted,
                } => {
                    split.refused.push(msg);
                    split.letters.push(DeadLetter {
                        origin,
                        payload: redacted.as_deref().unwrap_or(&msg.payload),
                        kind,
                        reason,
                    });
                }
            }
        }
        split
    }

    /// Persists the split batch, retrying until it commits; `None` if shutdown came while the
    /// database was away (the batch stays unacknowledged).
    ///
    /// "Nothing is given up": a batch the database refuses as a whole is written again once,
    /// isolated event by event ([`Store::ingest_isolated`]); only an event that fails alone
    /// while a control row succeeds becomes a dead letter. Anything else is the database's
    /// fault, and the batch is held with backoff, with in-progress acks so that JetStream does
    /// not hand it to another worker meanwhile.
    async fn persist(
        &self,
        batch: &[Message],
        split: &Split<'_>,
        shutdown: &CancellationToken,
    ) -> Option<Ingested> {
        let every = (self.config.ack_wait / 3).max(Duration::from_millis(100));
        let mut progress = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        progress.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut backoff = retry_backoff();
        let mut failures = 0u32;
        let mut isolate = false;
        loop {
            let started = Instant::now();
            let attempt = async {
                if isolate {
                    self.store
                        .ingest_isolated(&split.events, &split.letters)
                        .await
                } else {
                    self.store.ingest(&split.events, &split.letters).await
                }
            };
            match holding(batch, &mut progress, attempt).await {
                Ok(outcome) => {
                    histogram!(PERSIST_DURATION).record(started.elapsed().as_secs_f64());
                    if failures > 0 {
                        tracing::info!(
                            attempts = failures + 1,
                            isolated = isolate,
                            message = "PostgreSQL accepted the batch again."
                        );
                    } else if isolate {
                        tracing::info!(
                            dead_lettered = outcome.dead.len(),
                            message = "PostgreSQL accepted the isolated batch."
                        );
                    }
                    self.health.set_database(true);
                    return Some(outcome);
                }
                Err(StoreError::Rejected(e)) if !isolate => {
                    counter!(PERSIST_FAILURES, "reason" => "rejected").increment(1);
                    tracing::warn!(error = %e, message = "PostgreSQL refused the batch; writing it again part by part to find the event at fault.");
                    isolate = true;
                }
                Err(e) => {
                    let reason = match &e {
                        StoreError::RefusesWrites { .. } => "refuses_writes",
                        StoreError::DeadLettersRefused(_) => "dead_letters_refused",
                        StoreError::Rejected(_) => "rejected",
                        _ => "unavailable",
                    };
                    counter!(PERSIST_FAILURES, "reason" => reason).increment(1);
                    if matches!(e, StoreError::Unavailable(_)) {
                        self.health.set_database(false);
                    }
                    failures += 1;
                    if failures == 1 || failures.is_multiple_of(20) {
                        tracing::warn!(error = %e, attempts = failures, message = "Cannot persist the batch; holding it unacknowledged and retrying.");
                    }
                    if matches!(e, StoreError::NotMigrated { .. }) {
                        tracing::error!(error = %e, message = "The database schema is behind this worker.");
                    }
                    // The next attempt writes the batch as a whole again: the database may
                    // take it now, and it is isolated again if it still refuses it.
                    isolate = false;
                    let delay = backoff.next().unwrap_or(Duration::from_secs(5));
                    tokio::select! {
                        _ = shutdown.cancelled() => return None,
                        _ = holding(batch, &mut progress, tokio::time::sleep(delay)) => {}
                    }
                }
            }
        }
    }

    /// Where a message sits in the stream (what a dead letter of it is keyed by).
    fn origin<'m>(&'m self, msg: &'m Message) -> Origin<'m> {
        let (stream_seq, stored_at) = msg
            .info()
            .map(|i| (i.stream_sequence, i.published))
            .unwrap_or((0, OffsetDateTime::UNIX_EPOCH));
        Origin {
            stream: &self.stream,
            stream_seq,
            stored_at,
            subject: msg.subject.as_str(),
            replay: replay(msg),
        }
    }
}

/// What a dead letter keeps, with redaction rules configured, of a payload the rules cannot
/// read (not UTF-8, not JSON, nested too deep): its size and SHA-256, not its bytes, which
/// might hold what the rules exist to remove. JetStream keeps the message itself for
/// `AUDITBRIDGE_STREAM_MAX_AGE` (the dead letter names its stream sequence).
fn withheld(payload: &[u8], why: &str) -> Vec<u8> {
    use sha2::Digest as _;
    serde_json::json!({"auditbridge_withheld": {
        "reason": format!("the redaction rules could not read the payload: {why}"),
        "bytes": payload.len(),
        "sha256": hex_of(&sha2::Sha256::digest(payload)),
    }})
    .to_string()
    .into_bytes()
}

fn hex_of(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A message published by `auditbridge dead-letters replay`: its nonce and the hash of its
/// payload, which the store matches with the replay waiting for a verdict. A header that names
/// no waiting replay (any producer can set one) links nothing.
fn replay(msg: &Message) -> Option<Replay> {
    use sha2::Digest as _;
    let nonce = header(msg, REPLAY_HEADER)?;
    let nonce = auditbridge_event::Uuid::parse_str(nonce.trim()).ok()?;
    Some(Replay {
        nonce,
        payload_sha256: sha2::Sha256::digest(&msg.payload).into(),
    })
}

/// A batch split by validation: the events to store, each with the message it came from
/// (`accepted[i]` carried `events[i]`), and the messages refused as they are, each with its
/// dead letter.
#[derive(Default)]
struct Split<'b> {
    accepted: Vec<&'b Message>,
    events: Vec<Incoming<'b>>,
    refused: Vec<&'b Message>,
    letters: Vec<DeadLetter<'b>>,
}

/// After the commit, and only then: acknowledges the stored events, and terminates the
/// messages kept as dead letters (refused at validation, or by the database when isolated)
/// so that JetStream never redelivers them.
async fn acknowledge(split: Split<'_>, outcome: &Ingested) {
    for letter in &split.letters {
        counter!(EVENTS_DEAD_LETTERED, "kind" => letter.kind.to_owned()).increment(1);
    }
    let mut kept = vec![false; split.accepted.len()];
    for (i, kind, reason) in &outcome.dead {
        kept[*i] = true;
        counter!(EVENTS_DEAD_LETTERED, "kind" => *kind).increment(1);
        if *kind == CONFLICT {
            counter!(EVENTS_CONFLICT).increment(1);
            let origin = &split.events[*i].origin;
            tracing::warn!(stream_seq = origin.stream_seq, subject = %origin.subject, reason = %reason, message = "A re-sent id carries different content; kept as a dead letter of kind conflict.");
        }
    }
    let committed_at = OffsetDateTime::now_utc();
    let mut ack_failures = 0u64;
    for (msg, kept) in split.accepted.iter().zip(kept) {
        let ack = if kept {
            msg.ack_with(AckKind::Term).await
        } else {
            msg.ack().await
        };
        ack_failures += u64::from(ack.is_err());
        if let (false, Ok(info)) = (kept, msg.info()) {
            let latency = (committed_at - info.published).as_seconds_f64().max(0.0);
            histogram!(PUBLISH_TO_COMMIT).record(latency);
        }
    }
    for msg in &split.refused {
        ack_failures += u64::from(msg.ack_with(AckKind::Term).await.is_err());
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

/// Gathers pulled messages into batches of at most `max_messages` messages and `max_bytes`
/// bytes. A message that would take a batch over `max_bytes` closes it and opens the next; a
/// message larger than `max_bytes` on its own (the configuration keeps the stream's messages
/// below it, but one stored before can be larger) makes a batch by itself, so nothing is ever
/// refused here. What the worker holds is then bounded by bytes, whatever the messages' sizes.
#[derive(Debug)]
struct Batcher<T> {
    items: Vec<T>,
    bytes: usize,
    max_messages: usize,
    max_bytes: usize,
}

impl<T> Batcher<T> {
    fn new(max_messages: usize, max_bytes: usize) -> Batcher<T> {
        Batcher {
            items: Vec::new(),
            bytes: 0,
            max_messages: max_messages.max(1),
            max_bytes,
        }
    }

    /// Adds one item of `size` bytes. Returns the batch it closed, if it did not fit there.
    fn push(&mut self, item: T, size: usize) -> Option<Vec<T>> {
        let closed = (!self.items.is_empty() && self.bytes.saturating_add(size) > self.max_bytes)
            .then(|| self.take());
        if self.items.is_empty() {
            self.items.reserve(self.max_messages.min(1024));
        }
        self.items.push(item);
        self.bytes = self.bytes.saturating_add(size);
        closed
    }

    /// Full: the next item would not fit, whatever its size.
    fn is_full(&self) -> bool {
        self.items.len() >= self.max_messages || self.bytes >= self.max_bytes
    }

    fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    fn len(&self) -> usize {
        self.items.len()
    }

    fn take(&mut self) -> Vec<T> {
        self.bytes = 0;
        std::mem::take(&mut self.items)
    }
}

fn header<'m>(msg: &'m Message, name: &str) -> Option<&'m str> {
    Some(msg.headers.as_ref()?.get(name)?.as_str())
}

/// Runs `work` while telling JetStream, every `progress` tick, that the batch is still being
/// worked on (`AckKind::Progress` resets each message's ack wait). Without it a batch held
/// longer than the ack wait (a database outage, a long isolation) is redelivered, in a burst,
/// to other workers, which then hold it too.
async fn holding<T>(
    batch: &[Message],
    progress: &mut tokio::time::Interval,
    work: impl Future<Output = T>,
) -> T {
    tokio::pin!(work);
    loop {
        tokio::select! {
            done = &mut work => return done,
            _ = progress.tick() => {
                for msg in batch {
                    // A lost progress ack costs at most a redelivery, which is deduplicated.
                    let _ = msg.ack_with(AckKind::Progress).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Batcher;

    /// Pushes `sizes` in order; returns the sizes of the batches closed on the way, then
    /// what is left open.
    fn batches(max_messages: usize, max_bytes: usize, sizes: &[usize]) -> Vec<Vec<usize>> {
        let mut b = Batcher::new(max_messages, max_bytes);
        let mut out = Vec::new();
        for &size in sizes {
            if b.is_full() {
                out.push(b.take());
            }
            out.extend(b.push(size, size));
        }
        if !b.is_empty() {
            out.push(b.take());
        }
        out
    }

    #[test]
    fn a_batch_closes_at_its_message_count() {
        assert_eq!(
            batches(3, 1000, &[1, 1, 1, 1, 1]),
            [vec![1, 1, 1], vec![1, 1]]
        );
    }

    #[test]
    fn a_batch_closes_before_the_message_that_would_take_it_over_its_bytes() {
        assert_eq!(
            batches(100, 10, &[4, 4, 4, 6, 1, 9]),
            [vec![4, 4], vec![4, 6], vec![1, 9]]
        );
        // Exactly at the bound is full: the next message opens a new batch.
        let mut b = Batcher::new(100, 10);
        assert!(b.push(10, 10).is_none());
        assert!(b.is_full());
    }

    #[test]
    fn a_message_larger_than_the_bound_is_a_batch_of_its_own() {
        assert_eq!(
            batches(100, 10, &[3, 25, 3, 3]),
            [vec![3], vec![25], vec![3, 3]]
        );
    }

    #[test]
    fn no_batch_is_ever_over_either_bound_but_for_one_large_message() {
        let sizes: Vec<usize> = (0..2000).map(|i| (i * 7919) % 300 + 1).collect();
        let all = batches(17, 1000, &sizes);
        assert_eq!(all.iter().map(Vec::len).sum::<usize>(), sizes.len());
        for b in &all {
            assert!(b.len() <= 17);
            assert!(b.iter().sum::<usize>() <= 1000 || b.len() == 1, "{b:?}");
        }
        assert_eq!(all.concat(), sizes, "order is kept");
    }
}
