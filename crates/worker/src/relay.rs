//! The relay: carries stored events to each destination, reading the outbox from the
//! destination's cursor and moving the cursor only after the destination confirmed.
//!
//! Every worker runs a supervisor per configured destination, but only the one holding the
//! destination's lease relays it. The lease is renewed while it works; if the holder dies,
//! the lease expires and another worker's supervisor takes it over within one TTL. Every
//! cursor move is fenced by the lease, so a worker that lost its lease (paused, partitioned)
//! cannot move a cursor the new holder owns.
//!
//! Destinations are independent: each has its own task, sink, backoff and cursor, so one
//! failing or slow destination delays nobody else, and ingest never waits for any of them.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use auditbridge_destinations::{
    Delivered, DeliveryError, DestinationConfig, OnUndeliverable, Sink, Start, StoredEvent,
};
use auditbridge_store::{DestinationDeadLetter, OutboxEvent, Position, Redelivery, StartAt, Store};
use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use metrics::{counter, gauge, histogram};
use time::OffsetDateTime;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use auditbridge_runtime::telemetry::*;

use crate::lease::Lease;

/// What all relays of one worker share.
pub(crate) struct RelayContext {
    pub store: Store,
    /// This worker's identity in `destinations.lease_holder`.
    pub holder: String,
    pub lease_ttl: Duration,
    /// Bumped on every commit notification; relays wait on it when they have caught up.
    pub wake: watch::Receiver<u64>,
}

/// How long a caught-up relay waits for a notification before polling anyway (a commit can
/// become readable without one, when an older transaction elsewhere held the horizon).
const POLL: Duration = Duration::from_millis(500);
/// How often a relay looks for re-deliveries of its dead letters that an operator asked for.
const REDELIVERY_CHECK: Duration = Duration::from_secs(2);
/// Re-deliveries offered per check.
const REDELIVERIES_PER_CHECK: i64 = 100;

/// Registers the destination (keeping its progress if it exists), then competes for its
/// lease and relays while holding it, until shutdown.
pub(crate) async fn supervise(
    config: DestinationConfig,
    ctx: Arc<RelayContext>,
    shutdown: CancellationToken,
) {
    let span = tracing::info_span!("relay", destination = %config.name);
    supervise_with(config, ctx, shutdown, Sink::new)
        .instrument(span)
        .await;
}

/// [`supervise`] with the sink built by `build`. The sink is built before the lease is taken
/// and, when that fails (a setting validation let through, or the HTTP client's TLS set-up),
/// built again after a backoff: without it the supervisor would take the lease, fail and take
/// it again at once, forever.
async fn supervise_with(
    config: DestinationConfig,
    ctx: Arc<RelayContext>,
    shutdown: CancellationToken,
    build: impl Fn(&DestinationConfig) -> Result<Sink, DeliveryError>,
) {
    let name = config.name.clone();
    let Some(mut sink) = build_sink(&config, &shutdown, build).await else {
        return;
    };
    let start = match &config.start {
        Start::Now => StartAt::Now,
        Start::Earliest => StartAt::Earliest,
        Start::At(t) => StartAt::At(*t),
    };
    let kind = config.kind.type_name();
    let mut lease = Lease::new(&ctx.store, &name, &ctx.holder, ctx.lease_ttl);
    let register = || async {
        let created = ctx.store.register_destination(&name, kind, &start).await?;
        if created {
            tracing::info!(message = "Registered a new destination.");
        }
        Ok(created)
    };
    while let Some(held) = lease.acquire(&shutdown, register).await {
        tracing::info!(cursor = ?held.state.cursor, message = "Took the destination's lease; relaying.");
        gauge!(DEST_LEASE_HELD, "destination" => name.clone()).set(1.0);
        relay_while_held(
            &config,
            &ctx,
            &mut sink,
            held.state.cursor.clone(),
            held.token.clone(),
        )
        .await;
        gauge!(DEST_LEASE_HELD, "destination" => name.clone()).set(0.0);
        lease.finish(held, &shutdown).await;
    }
}

/// Builds the destination's sink with `build`, again after a backoff while that fails;
/// `None` at shutdown.
pub(crate) async fn build_sink(
    config: &DestinationConfig,
    shutdown: &CancellationToken,
    build: impl Fn(&DestinationConfig) -> Result<Sink, DeliveryError>,
) -> Option<Sink> {
    let name = config.name.clone();
    let mut build_backoff = backoff(config);
    let mut build_failures = 0u32;
    loop {
        match build(config) {
            Ok(sink) => return Some(sink),
            Err(e) => {
                build_failures += 1;
                let delay = build_backoff.next().unwrap_or(config.retry_max);
                if build_failures == 1 || build_failures.is_multiple_of(20) {
                    tracing::error!(error = %e, attempts = build_failures, retry_in = ?delay, message = "Cannot build the destination's sink; retrying. Check its configuration.");
                }
                counter!(DEST_FAILURES, "destination" => name.clone(), "reason" => "sink_build")
                    .increment(1);
                tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// Relays from `cursor` until `held` is cancelled (the lease lost, or shutdown).
async fn relay_while_held(
    config: &DestinationConfig,
    ctx: &RelayContext,
    sink: &mut Sink,
    cursor: Position,
    held: CancellationToken,
) {
    let name = config.name.as_str();
    let (cursor_tx, cursor_rx) = watch::channel(cursor.clone());
    let reporter = tokio::spawn(
        report_backlog(ctx.store.clone(), name.to_owned(), cursor_rx, held.clone())
            .in_current_span(),
    );

    let mut relay = Relay {
        config,
        ctx,
        cursor: cursor.clone(),
        cursor_tx,
        held: held.clone(),
        sink,
        backoff: backoff(config),
        suspects: Suspects::new(cursor),
        redeliveries_due: tokio::time::Instant::now(),
    };
    relay.run().await;
    reporter.abort();
}

pub(crate) fn backoff(config: &DestinationConfig) -> ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(config.retry_min)
        .with_max_delay(config.retry_max)
        .with_jitter()
        .without_max_times()
        .build()
}

type ReadAhead = tokio::task::JoinHandle<Result<Vec<OutboxEvent>, auditbridge_store::StoreError>>;

struct Relay<'a> {
    config: &'a DestinationConfig,
    ctx: &'a RelayContext,
    cursor: Position,
    cursor_tx: watch::Sender<Position>,
    held: CancellationToken,
    sink: &'a mut Sink,
    backoff: ExponentialBackoff,
    suspects: Suspects,
    /// When to look for re-deliveries asked for ([`Relay::redeliver`]).
    redeliveries_due: tokio::time::Instant,
}

/// Isolating an event a destination refuses, without blaming events for a destination that
/// refuses everything (a revoked token, a receiver expecting another format).
///
/// An event refused alone becomes a *suspect*: it is held in memory, the cursor stays before
/// it, and the relay reads on past it (from `frontier`) and offers the next events alone, one
/// by one. A suspect is dead-lettered only when it is refused alone a **second** time after
/// the destination **took** some event since its first refusal: a destination-wide refusal
/// that ends between two probes convicts nobody. After each probe that is taken, and after
/// each backoff, the held events are offered again from the oldest, so a destination that
/// recovers receives them in order.
///
/// New suspects allowed before the relay backs off start at [`FIRST_PROBES`] and double with
/// each backoff while no event is taken, up to [`MAX_PROBES`]; at most [`MAX_HELD_EVENTS`]
/// events and [`MAX_HELD_BYTES`] bytes are held. Past that the destination is held as failing
/// (the relay keeps probing the next event after each backoff).
struct Suspects {
    /// The events between the cursor and `frontier` that the destination matches, in order:
    /// each refused (a suspect) or already settled (waiting for the ones before it).
    queue: VecDeque<HeldEvent>,
    /// The last outbox position examined: every matching event in (cursor, frontier] is in
    /// `queue`. Equal to the cursor while `queue` is empty.
    frontier: Position,
    /// Bytes of the suspects' JSON in `queue`.
    bytes: usize,
    /// Events the destination took while this relay held the lease (the evidence that it
    /// takes events at all).
    taken: u64,
    /// Offer the oldest held events again before probing new ones.
    recheck: bool,
    /// New suspects allowed before the next backoff, and how many came since the last one.
    allowance: usize,
    new: usize,
}

struct HeldEvent {
    position: Position,
    fate: Fate,
}

enum Fate {
    /// Refused alone when the destination had taken `taken` events.
    Suspect {
        event: Box<StoredEvent>,
        error: DeliveryError,
        taken: u64,
    },
    /// Taken (`delivered`) or dead-lettered; the cursor passes it with the events before it.
    Settled { delivered: bool },
}

const FIRST_PROBES: usize = 5;
const MAX_PROBES: usize = 512;
const MAX_HELD_EVENTS: usize = 4_096;
const MAX_HELD_BYTES: usize = 32 << 20;

impl Suspects {
    fn new(cursor: Position) -> Suspects {
        Suspects {
            queue: VecDeque::new(),
            frontier: cursor,
            bytes: 0,
            taken: 0,
            recheck: false,
            allowance: FIRST_PROBES,
            new: 0,
        }
    }

    fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    fn is_full(&self) -> bool {
        self.queue.len() >= MAX_HELD_EVENTS || self.bytes >= MAX_HELD_BYTES
    }

    fn push(&mut self, position: Position, fate: Fate) {
        if let Fate::Suspect { event, .. } = &fate {
            self.bytes += event.json.len();
        }
        self.frontier = position.clone();
        self.queue.push_back(HeldEvent { position, fate });
    }

    /// Removes the oldest held event; returns where the cursor may move and whether it was
    /// delivered.
    fn pop(&mut self) -> (Position, bool) {
        let front = self.queue.pop_front().expect("a held event");
        let delivered = match front.fate {
            Fate::Suspect { event, .. } => {
                self.bytes -= event.json.len();
                false
            }
            Fate::Settled { delivered } => delivered,
        };
        // Past every examined row once nothing is held, else just past this event.
        let to = if self.queue.is_empty() {
            self.frontier.clone()
        } else {
            front.position
        };
        (to, delivered)
    }
}

/// What the relay does after one step.
enum Flow {
    /// Go on with the events in hand.
    Go,
    /// Read again from the frontier (after a backoff, or to apply `max_backlog_age`).
    Reread,
    /// The lease is lost or shutdown: stop relaying.
    Stop,
}

impl Flow {
    fn from_pause(go_on: bool, then: Flow) -> Flow {
        if go_on { then } else { Flow::Stop }
    }
}

/// How the destination answered one event offered alone.
enum Answer {
    Taken,
    /// Refused, or settled as undeliverable with nothing confirmed (which alone does not show
    /// that the destination takes anything).
    Refused(DeliveryError),
    /// Nothing settled: try again later.
    Failed(DeliveryError),
}

/// How far `settled` more events from `done` take a batch of `len` events whose rows end at
/// `last`: the new `done` and the position the cursor may move to. `None` when nothing was
/// settled, which must never move the cursor (a sink that settles nothing has confirmed
/// nothing). A sink claiming more than it was offered settles only what it was offered.
fn progress(
    done: usize,
    offered: usize,
    settled: usize,
    positions: &[Position],
    last: &Position,
) -> Option<(usize, Position)> {
    if settled == 0 {
        return None;
    }
    let done = done + settled.min(offered);
    // Past the last row read when every event is settled (non-matching rows included), else
    // just past the last settled event.
    let to = if done == positions.len() {
        last.clone()
    } else {
        positions[done - 1].clone()
    };
    Some((done, to))
}

impl Relay<'_> {
    fn name(&self) -> &str {
        &self.config.name
    }

    async fn run(&mut self) {
        let mut wake = self.ctx.wake.clone();
        // The next batch, read while the current one is delivered: (where it starts, the read).
        let mut ahead: Option<(Position, ReadAhead)> = None;
        while !self.held.is_cancelled() {
            wake.borrow_and_update();
            if tokio::time::Instant::now() >= self.redeliveries_due {
                self.redeliveries_due = tokio::time::Instant::now() + REDELIVERY_CHECK;
                if !self.redeliver().await {
                    return;
                }
            }
            let from = self.suspects.frontier.clone();
            let read = match ahead.take() {
                // Used only if the current batch was relayed to its end (the usual case);
                // otherwise (a partial delivery before a re-read) it is dropped.
                Some((start, handle)) if start == from => match handle.await {
                    Ok(result) => result,
                    // The read-ahead task itself failed: read again here.
                    Err(_) => {
                        self.ctx
                            .store
                            .read_outbox(&from, self.config.batch_size)
                            .await
                    }
                },
                _ => {
                    self.ctx
                        .store
                        .read_outbox(&from, self.config.batch_size)
                        .await
                }
            };
            let rows = match read {
                Ok(rows) => rows,
                Err(e) => {
                    tracing::warn!(error = %e, message = "Cannot read the outbox; retrying.");
                    if !self.pause(Duration::from_secs(1)).await {
                        return;
                    }
                    continue;
                }
            };
            if rows.is_empty() {
                if !self.suspects.is_empty() {
                    // Held events and nothing after them yet: offer them again after a
                    // backoff (the destination may have recovered), then look for new events.
                    if let Some(error) = self.oldest_refusal()
                        && !self.failed(&error, true).await
                    {
                        return;
                    }
                    self.suspects.recheck = true;
                    if !self.relay_rows(Vec::new()).await {
                        return;
                    }
                    continue;
                }
                tokio::select! {
                    _ = self.held.cancelled() => return,
                    _ = wake.changed() => {}
                    _ = tokio::time::sleep(POLL) => {}
                }
                continue;
            }
            // Start reading what follows while this batch goes out: the broker or receiver
            // is not left idle while the database answers. Reading ahead is as safe as reading
            // later: it returns only rows below the horizon at that moment.
            let last = rows
                .last()
                .map(|r| r.position.clone())
                .expect("rows is not empty");
            let store = self.ctx.store.clone();
            let limit = self.config.batch_size;
            let start = last.clone();
            ahead = Some((
                last,
                tokio::spawn(
                    async move { store.read_outbox(&start, limit).await }.in_current_span(),
                ),
            ));
            if !self.relay_rows(rows).await {
                return;
            }
        }
    }

    /// Why the oldest suspect was refused, if a suspect is held.
    fn oldest_refusal(&self) -> Option<DeliveryError> {
        self.suspects.queue.iter().find_map(|h| match &h.fate {
            Fate::Suspect { error, .. } => Some(error.clone()),
            Fate::Settled { .. } => None,
        })
    }

    /// Skips what is too old, delivers what matches, and moves the cursor past the rows (or,
    /// while suspects are held, the frontier). False when the relay must stop (lease lost,
    /// shutdown).
    async fn relay_rows(&mut self, rows: Vec<OutboxEvent>) -> bool {
        let mut rows = rows;
        let last = rows.last().map(|r| r.position.clone());

        if let Some(max_age) = self.config.max_backlog_age
            && !self.suspects.is_empty()
            && !self.skip_aged_held(max_age).await
        {
            return false;
        }
        if let Some(max_age) = self.config.max_backlog_age
            && self.suspects.is_empty()
            && !rows.is_empty()
        {
            // Ages are measured on the database's clock, the one `received_at` was taken on:
            // a worker whose clock runs ahead would otherwise skip fresh events. If the
            // database cannot say, nothing is skipped this time.
            let old = match self.ctx.store.now().await {
                Ok(now) => {
                    let limit = now - max_age;
                    rows.iter()
                        .take_while(|r| r.event.received_at < limit)
                        .count()
                }
                Err(e) => {
                    tracing::debug!(error = %e, message = "Cannot read the database's clock; not applying max_backlog_age this time.");
                    0
                }
            };
            if old > 0 {
                let to = rows[old - 1].position.clone();
                tracing::warn!(skipped = old, max_backlog_age = %humantime::format_duration(max_age), message = "Skipping backlog older than max_backlog_age: these events will NOT be delivered to this destination.");
                counter!(DEST_SKIPPED, "destination" => self.name().to_owned())
                    .increment(old as u64);
                if !self.advance(&to, 0, old as u64).await {
                    return false;
                }
                rows.drain(..old);
                if rows.is_empty() {
                    return true;
                }
            }
        }

        let filter = &self.config.filter;
        let (positions, events): (Vec<Position>, Vec<StoredEvent>) = rows
            .into_iter()
            .filter(|r| filter.matches(&r.event.tenant, &r.event.action, &r.event.outcome))
            .map(|r| (r.position, r.event))
            .unzip();

        // events[..next] are settled or held.
        let mut next = 0;
        // The most events offered at once: halved after each refusal of several.
        let mut window = usize::MAX;
        loop {
            let flow = if self.suspects.recheck && !self.suspects.is_empty() {
                self.recheck_oldest().await
            } else {
                self.suspects.recheck = false;
                if next == events.len() {
                    break;
                }
                if self.suspects.is_empty() {
                    self.deliver_batch(&events, &positions, last.as_ref(), &mut next, &mut window)
                        .await
                } else {
                    self.probe(&events[next], &positions[next], &mut next).await
                }
            };
            match flow {
                Flow::Go => {}
                Flow::Reread => return true,
                Flow::Stop => return false,
            }
        }
        // Every event in hand is settled or held: move past the rows read.
        let Some(last) = last else { return true };
        if self.suspects.is_empty() {
            if last != self.cursor {
                return self.advance(&last, 0, 0).await;
            }
        } else {
            self.suspects.frontier = last;
        }
        true
    }

    /// `max_backlog_age` for held events: suspects older than it are skipped like any old
    /// backlog (counted, logged), and settled ones before them passed. False if the relay
    /// must stop.
    async fn skip_aged_held(&mut self, max_age: Duration) -> bool {
        let limit = match self.ctx.store.now().await {
            Ok(now) => now - max_age,
            Err(e) => {
                tracing::debug!(error = %e, message = "Cannot read the database's clock; not applying max_backlog_age this time.");
                return true;
            }
        };
        let mut skipped = 0u64;
        while let Some(front) = self.suspects.queue.front() {
            let old = match &front.fate {
                Fate::Suspect { event, .. } => event.received_at < limit,
                Fate::Settled { .. } => true,
            };
            if !old {
                break;
            }
            let was_suspect = matches!(front.fate, Fate::Suspect { .. });
            let (to, delivered) = self.suspects.pop();
            let skip = u64::from(was_suspect);
            skipped += skip;
            if !self.advance(&to, u64::from(delivered), skip).await {
                return false;
            }
        }
        if skipped > 0 {
            tracing::warn!(skipped, max_backlog_age = %humantime::format_duration(max_age), message = "Skipping backlog older than max_backlog_age (events held as suspects): these events will NOT be delivered to this destination.");
            counter!(DEST_SKIPPED, "destination" => self.name().to_owned()).increment(skipped);
        }
        true
    }

    /// Offers `events[next..]` in batches while nothing is held. Advances the cursor past what
    /// the destination settled; an event refused alone becomes the first suspect.
    async fn deliver_batch(
        &mut self,
        events: &[StoredEvent],
        positions: &[Position],
        last: Option<&Position>,
        next: &mut usize,
        window: &mut usize,
    ) -> Flow {
        let last = last.expect("events come from rows");
        let dead_letter = self.config.on_undeliverable == OnUndeliverable::DeadLetter;
        let probe = *next;
        let offered = (*window).min(events.len() - probe);
        match self.sink.deliver(&events[probe..probe + offered]).await {
            Ok(Delivered {
                settled,
                mut undeliverable,
            }) => {
                let mut settled = settled.min(offered);
                undeliverable.retain(|u| u.index < settled);
                if dead_letter && settled > 0 && undeliverable.len() == settled {
                    // Settled, but nothing confirmed (a RabbitMQ return, a routing key that
                    // cannot be built): that alone does not show the destination takes
                    // anything, so the first event is isolated and probed like a refusal.
                    if offered > 1 {
                        *window = 1;
                        return Flow::Go;
                    }
                    let u = &undeliverable[0];
                    let error = DeliveryError::Refused {
                        reason: u.reason,
                        detail: u.detail.clone(),
                    };
                    return self
                        .suspect(&events[probe], &positions[probe], error, next)
                        .await;
                }
                let mut blocked = None;
                if !dead_letter && let Some(first) = undeliverable.first() {
                    // `block`: settle only what comes before it; then hold.
                    settled = first.index;
                    blocked = Some(DeliveryError::Refused {
                        reason: first.reason,
                        detail: first.detail.clone(),
                    });
                    undeliverable.clear();
                }
                let Some((new_done, to)) = progress(probe, offered, settled, positions, last)
                else {
                    let refused = blocked.is_some();
                    let nothing = blocked.unwrap_or_else(|| DeliveryError::Retry {
                        reason: "none_confirmed",
                        detail: "the destination confirmed none of the events offered".into(),
                        retry_after: None,
                    });
                    let go_on = self.failed(&nothing, refused).await;
                    return Flow::from_pause(go_on, self.after_failure());
                };
                let label = self.name().to_owned();
                if !undeliverable.is_empty() {
                    let records: Vec<DestinationDeadLetter> = undeliverable
                        .iter()
                        .map(|u| DestinationDeadLetter {
                            event_id: events[probe + u.index].id,
                            position: positions[probe + u.index].clone(),
                            kind: u.reason.to_owned(),
                            reason: u.detail.clone(),
                        })
                        .collect();
                    if !self.record_dead(&records).await {
                        return Flow::Stop;
                    }
                    for u in &undeliverable {
                        tracing::warn!(event = %events[probe + u.index].id, kind = u.reason, reason = %u.detail, message = "The destination cannot take this event; kept in its dead letters and going on.");
                        counter!(DEST_DEAD_LETTERED, "destination" => label.clone(), "reason" => u.reason)
                            .increment(1);
                    }
                }
                let confirmed = settled - undeliverable.len();
                if confirmed > 0 {
                    let refused: Vec<usize> = undeliverable.iter().map(|u| u.index).collect();
                    let taken = events[probe..probe + settled]
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| !refused.contains(i))
                        .map(|(_, e)| e);
                    self.record_taken(taken);
                }
                *window = usize::MAX;
                *next = new_done;
                if !self.advance(&to, confirmed as u64, 0).await {
                    return Flow::Stop;
                }
                match blocked {
                    Some(refusal) => {
                        Flow::from_pause(self.failed(&refusal, true).await, Flow::Reread)
                    }
                    None => Flow::Go,
                }
            }
            Err(e @ DeliveryError::Refused { .. }) if dead_letter => {
                if offered > 1 {
                    // Refused as a batch: find the event it is about by offering less.
                    counter!(DEST_FAILURES, "destination" => self.name().to_owned(), "reason" => e.reason())
                        .increment(1);
                    *window = offered / 2;
                    tracing::info!(offered, reason = e.reason(), error = %e, message = "The destination refused a batch; isolating the event it cannot take.");
                    Flow::Go
                } else {
                    self.suspect(&events[probe], &positions[probe], e, next)
                        .await
                }
            }
            Err(e) => {
                let refused = matches!(e, DeliveryError::Refused { .. });
                let go_on = self.failed(&e, refused).await;
                Flow::from_pause(go_on, self.after_failure())
            }
        }
    }

    /// After a failed attempt with nothing held: read again from the cursor when the events in
    /// hand aged while we waited (so `max_backlog_age` applies to them), else try them again.
    fn after_failure(&self) -> Flow {
        if self.config.max_backlog_age.is_some() {
            Flow::Reread
        } else {
            Flow::Go
        }
    }

    /// Offers the event after the held ones alone.
    async fn probe(&mut self, event: &StoredEvent, position: &Position, next: &mut usize) -> Flow {
        match self.offer_alone(event).await {
            Answer::Taken => {
                // The destination takes events: the suspects get their second offer.
                self.suspects
                    .push(position.clone(), Fate::Settled { delivered: true });
                self.suspects.recheck = true;
                *next += 1;
                Flow::Go
            }
            Answer::Refused(error) => self.suspect(event, position, error, next).await,
            Answer::Failed(error) => {
                self.suspects.recheck = true;
                Flow::from_pause(self.failed(&error, false).await, Flow::Reread)
            }
        }
    }

    /// Holds `event`, refused alone, as a suspect and moves on to the next one; backs off
    /// once this round's allowance of new suspects is used up.
    async fn suspect(
        &mut self,
        event: &StoredEvent,
        position: &Position,
        error: DeliveryError,
        next: &mut usize,
    ) -> Flow {
        // Counted here, or by `failed` where the relay backs off.
        if self.suspects.is_full() {
            tracing::error!(held = self.suspects.queue.len(), held_bytes = self.suspects.bytes, event = %event.id, message = "The destination has refused this many events one by one with none taken since; holding it as failing until it takes the event after them.");
            self.suspects.recheck = true;
            return Flow::from_pause(self.failed(&error, true).await, Flow::Reread);
        }
        tracing::info!(event = %event.id, reason = error.reason(), error = %error, held = self.suspects.queue.len() + 1, message = "The destination refused an event alone; holding it and trying the next ones to tell whether the event or the destination is at fault.");
        let s = &mut self.suspects;
        let taken = s.taken;
        s.push(
            position.clone(),
            Fate::Suspect {
                event: Box::new(event.clone()),
                error: error.clone(),
                taken,
            },
        );
        *next += 1;
        s.new += 1;
        if s.new < s.allowance {
            counter!(DEST_FAILURES, "destination" => self.config.name.clone(), "reason" => error.reason())
                .increment(1);
            return Flow::Go;
        }
        // Refused one by one, none taken: maybe the destination refuses everything. Offer the
        // oldest again after a backoff, then probe further (with a larger allowance).
        s.new = 0;
        s.allowance = (s.allowance * 2).min(MAX_PROBES);
        s.recheck = true;
        Flow::from_pause(self.failed(&error, true).await, Flow::Reread)
    }

    /// Offers the oldest held event again (a suspect), or lets the cursor pass it (settled).
    /// A suspect refused again after the destination took something since its first refusal
    /// is dead-lettered; one refused again with nothing taken since stays a suspect.
    async fn recheck_oldest(&mut self) -> Flow {
        let oldest = match &self.suspects.queue.front().expect("a held event").fate {
            Fate::Settled { .. } => None,
            Fate::Suspect { event, taken, .. } => Some(((**event).clone(), *taken)),
        };
        let Some((event, taken_then)) = oldest else {
            return self.pass_oldest().await;
        };
        match self.offer_alone(&event).await {
            Answer::Taken => {
                self.suspects.queue[0].fate = Fate::Settled { delivered: true };
                self.suspects.bytes -= event.json.len();
                self.pass_oldest().await
            }
            Answer::Refused(error) if self.suspects.taken > taken_then => {
                let label = self.name().to_owned();
                let record = DestinationDeadLetter {
                    event_id: event.id,
                    position: self.suspects.queue[0].position.clone(),
                    kind: error.reason().to_owned(),
                    reason: error.to_string(),
                };
                if !self.record_dead(&[record]).await {
                    return Flow::Stop;
                }
                tracing::warn!(event = %event.id, kind = error.reason(), reason = %error, message = "The destination refused this event twice while taking others; kept in its dead letters and going on.");
                counter!(DEST_DEAD_LETTERED, "destination" => label, "reason" => error.reason())
                    .increment(1);
                self.pass_oldest().await
            }
            Answer::Refused(error) => {
                // Nothing taken since it was first refused: still a suspect. Probe on.
                if let Fate::Suspect { error: e, .. } = &mut self.suspects.queue[0].fate {
                    *e = error;
                }
                self.suspects.recheck = false;
                Flow::Go
            }
            Answer::Failed(error) => {
                Flow::from_pause(self.failed(&error, false).await, Flow::Reread)
            }
        }
    }

    /// Moves the cursor past the oldest held event (settled or dead-lettered).
    async fn pass_oldest(&mut self) -> Flow {
        let (to, delivered) = self.suspects.pop();
        let go_on = self.advance(&to, u64::from(delivered), 0).await;
        Flow::from_pause(go_on, Flow::Go)
    }

    /// Delivers one event alone and classifies the answer.
    async fn offer_alone(&mut self, event: &StoredEvent) -> Answer {
        match self.sink.deliver(std::slice::from_ref(event)).await {
            Ok(Delivered {
                settled,
                undeliverable,
            }) => match undeliverable.into_iter().find(|u| u.index == 0) {
                _ if settled == 0 => Answer::Failed(DeliveryError::Retry {
                    reason: "none_confirmed",
                    detail: "the destination confirmed none of the events offered".into(),
                    retry_after: None,
                }),
                Some(u) => Answer::Refused(DeliveryError::Refused {
                    reason: u.reason,
                    detail: u.detail,
                }),
                None => {
                    self.record_taken(std::iter::once(event));
                    Answer::Taken
                }
            },
            Err(e @ DeliveryError::Refused { .. }) => Answer::Refused(e),
            Err(e) => Answer::Failed(e),
        }
    }

    /// Counts events the destination confirmed: metrics, and the evidence that it takes
    /// events (which convicts suspects and resets the backoff).
    fn record_taken<'e>(&mut self, events: impl Iterator<Item = &'e StoredEvent>) {
        let label = self.name().to_owned();
        let confirmed_at = OffsetDateTime::now_utc();
        let mut n = 0u64;
        for e in events {
            histogram!(DEST_LATENCY, "destination" => label.clone())
                .record((confirmed_at - e.received_at).as_seconds_f64().max(0.0));
            n += 1;
        }
        counter!(DEST_DELIVERED, "destination" => label.clone()).increment(n);
        gauge!(DEST_UP, "destination" => label).set(1.0);
        self.backoff = backoff(self.config);
        let s = &mut self.suspects;
        s.taken += n;
        s.allowance = FIRST_PROBES;
        s.new = 0;
    }

    /// Offers again, each alone, the dead letters an operator asked to redeliver
    /// (`auditbridge destinations redeliver`), and records what each came to. They go out of
    /// the outbox order, beside it: the cursor does not move. A delivery that fails (the
    /// destination is down) leaves the request for the next check. False if the relay must
    /// stop.
    async fn redeliver(&mut self) -> bool {
        let name = self.name().to_owned();
        let requests = match self
            .ctx
            .store
            .redelivery_requests(&name, REDELIVERIES_PER_CHECK)
            .await
        {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, message = "Cannot read the re-deliveries asked for; trying again later.");
                return true;
            }
        };
        for (id, requested_at) in requests {
            let event = match self.ctx.store.event(id, None).await {
                Ok(e) => e,
                Err(e) => {
                    tracing::debug!(error = %e, message = "Cannot read an event to redeliver; trying again later.");
                    return true;
                }
            };
            let outcome = match event {
                None => Redelivery::Refused(
                    "the event can no longer be read: it has expired under its tenant's retention policy".into(),
                ),
                Some(event)
                    if !self
                        .config
                        .filter
                        .matches(&event.tenant, &event.action, &event.outcome) =>
                {
                    Redelivery::Refused(
                        "the event no longer matches the destination's filter".into(),
                    )
                }
                Some(event) => match self.offer_alone(&event).await {
                    Answer::Taken => Redelivery::Delivered,
                    Answer::Refused(e) => Redelivery::Refused(e.to_string()),
                    Answer::Failed(e) => {
                        tracing::warn!(event = %id, error = %e, message = "A re-delivery failed; it is tried again at the next check.");
                        return true;
                    }
                },
            };
            let label = match outcome {
                Redelivery::Delivered => "delivered",
                Redelivery::Refused(_) => "refused",
            };
            counter!(DEST_REDELIVERED, "destination" => name.clone(), "outcome" => label)
                .increment(1);
            tracing::info!(event = %id, outcome = label, message = "Offered a dead letter of the destination again.");
            let (store, holder) = (self.ctx.store.clone(), self.ctx.holder.clone());
            let recorded = self
                .write_under_lease(
                    "Cannot record a re-delivery; giving the lease up (it will be offered again).",
                    || store.settle_redelivery(&name, &holder, id, requested_at, &outcome),
                )
                .await;
            if !recorded {
                return false;
            }
        }
        true
    }

    /// Records dead letters for this destination, retrying while the lease may still be ours
    /// (as [`Relay::advance`] does). False if the relay must stop.
    async fn record_dead(&mut self, dead: &[DestinationDeadLetter]) -> bool {
        let (store, holder) = (self.ctx.store.clone(), self.ctx.holder.clone());
        let name = self.name().to_owned();
        self.write_under_lease(
            "Cannot record the destination's dead letters; giving the lease up (the events will be tried again).",
            || store.record_undeliverable(&name, &holder, dead),
        )
        .await
    }

    /// Runs a write that holds only under this worker's lease (it answers `false` once the
    /// lease is another's), retrying a database error for as long as the lease may still be
    /// ours. `false`: the lease is lost or given up, and relaying stops; the next holder carries
    /// on from the stored cursor (sending again what this one could not record: duplicates,
    /// no loss).
    async fn write_under_lease<F>(
        &mut self,
        giving_up: &'static str,
        mut write: impl FnMut() -> F,
    ) -> bool
    where
        F: Future<Output = Result<bool, auditbridge_store::StoreError>>,
    {
        let started = Instant::now();
        loop {
            match write().await {
                Ok(true) => return true,
                Ok(false) => {
                    tracing::warn!(
                        message = "Lost the destination's lease; another worker carries on from the stored cursor."
                    );
                    self.held.cancel();
                    return false;
                }
                Err(e) => {
                    if started.elapsed() > self.ctx.lease_ttl {
                        tracing::warn!(error = %e, message = giving_up);
                        self.held.cancel();
                        return false;
                    }
                    if !self.pause(Duration::from_millis(500)).await {
                        return false;
                    }
                }
            }
        }
    }

    /// Records a failure and waits the backoff (or the destination's Retry-After, capped).
    /// `refused`: someone must look (shown as failing in `status`), the events are held.
    async fn failed(&mut self, e: &DeliveryError, refused: bool) -> bool {
        let name = self.name().to_owned();
        counter!(DEST_FAILURES, "destination" => name.clone(), "reason" => e.reason()).increment(1);
        gauge!(DEST_UP, "destination" => name.clone()).set(0.0);
        let delay = self.backoff.next().unwrap_or(self.config.retry_max);
        let delay = e
            .retry_after()
            .map_or(delay, |r| r.min(self.config.retry_max).max(delay));
        if refused {
            tracing::error!(reason = e.reason(), error = %e, retry_in = ?delay, message = "The destination refused the delivery; the events are kept and retried. Check its configuration.");
        } else {
            tracing::warn!(reason = e.reason(), error = %e, retry_in = ?delay, message = "Delivery failed; retrying.");
        }
        if let Err(err) = self
            .ctx
            .store
            .record_failure(&name, &self.ctx.holder, &e.to_string(), refused)
            .await
        {
            tracing::debug!(error = %err, message = "Could not record the failure.");
        }
        self.pause(delay).await
    }

    async fn advance(&mut self, to: &Position, delivered: u64, skipped: u64) -> bool {
        let (store, holder) = (self.ctx.store.clone(), self.ctx.holder.clone());
        let name = self.name().to_owned();
        // Delivered but not yet recorded: if the lease is lost, the next holder resends.
        let recorded = self
            .write_under_lease(
                "Cannot record progress; giving the lease up (the events will be sent again).",
                || store.advance(&name, &holder, to, delivered, skipped),
            )
            .await;
        if recorded {
            self.cursor = to.clone();
            if self.suspects.is_empty() {
                self.suspects.frontier = to.clone();
            }
            let _ = self.cursor_tx.send(to.clone());
        }
        recorded
    }

    /// Sleeps unless the lease is lost or shutdown comes first.
    async fn pause(&self, d: Duration) -> bool {
        tokio::select! {
            _ = self.held.cancelled() => false,
            _ = tokio::time::sleep(d) => true,
        }
    }
}

/// Publishes the backlog gauges every 5 s while the lease is held.
async fn report_backlog(
    store: Store,
    name: String,
    cursor: watch::Receiver<Position>,
    held: CancellationToken,
) {
    loop {
        let at = cursor.borrow().clone();
        if let Ok(b) = store.backlog(&at).await
            && let Ok(now) = store.now().await
        {
            gauge!(DEST_BACKLOG_EVENTS, "destination" => name.clone()).set(b.events as f64);
            // On the database's clock, the one `received_at` was taken on.
            let age = b
                .oldest
                .map_or(0.0, |t| (now - t).as_seconds_f64().max(0.0));
            gauge!(DEST_BACKLOG_SECONDS, "destination" => name.clone()).set(age);
        }
        tokio::select! {
            _ = held.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
}

/// Says loudly, at start, when the trail holds outbox positions from another cluster (a
/// dump restored into a new one): relays would deliver nothing new until
/// `auditbridge outbox rebase` runs. Ingest is not held for it.
pub(crate) async fn warn_if_outbox_moved(store: &Store) {
    match store.outbox_health().await {
        Ok(h) if h.needs_rebase() => {
            tracing::error!(generation = h.generation, next_xid = %h.next_xid, foreign_tx = ?h.foreign_tx, message = %format!("The outbox cannot continue in this cluster: {}.", h.advice()));
        }
        Ok(_) => {}
        Err(e) => {
            tracing::debug!(error = %e, message = "Cannot check the outbox order.");
        }
    }
}

/// Listens for commit notifications and bumps `wake`; reconnects with a pause if the
/// database goes away (relays fall back to polling meanwhile).
pub(crate) async fn listen(store: Store, wake: watch::Sender<u64>, stop: CancellationToken) {
    loop {
        let mut listener = match store.listen().await {
            Ok(l) => l,
            Err(e) => {
                tracing::debug!(error = %e, message = "Cannot listen for commits yet.");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                n = listener.recv() => match n {
                    Ok(_) => wake.send_modify(|v| *v = v.wrapping_add(1)),
                    Err(e) => {
                        tracing::debug!(error = %e, message = "Commit listener lost; reconnecting.");
                        break;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn at(seq: i64) -> Position {
        Position::new(0, "100", seq)
    }

    #[test]
    fn nothing_settled_never_moves_the_cursor() {
        let positions: Vec<Position> = (1..=5).map(at).collect();
        let last = at(9);
        // `clamp(1, …)` once turned a sink's 0 into 1, past an unconfirmed event.
        assert_eq!(progress(0, 5, 0, &positions, &last), None);
        assert_eq!(progress(2, 3, 0, &positions, &last), None);
        assert_eq!(progress(0, 5, 2, &positions, &last), Some((2, at(2))));
        assert_eq!(progress(2, 3, 1, &positions, &last), Some((3, at(3))));
        // All settled: past the last row read (non-matching rows after the events included).
        assert_eq!(progress(2, 3, 3, &positions, &last), Some((5, at(9))));
        // A sink claiming more than it was offered settles only what it was offered.
        assert_eq!(progress(0, 2, 4, &positions, &last), Some((2, at(2))));
    }

    #[tokio::test]
    async fn a_sink_that_cannot_be_built_is_retried_with_backoff_not_in_a_loop() {
        let definitions = serde_json::json!([{
            "name": "siem", "type": "http",
            "params": {"url": "http://127.0.0.1:9/in", "retry_min": "200ms", "retry_max": "5s"}
        }]);
        let vars = [(
            "AUDITBRIDGE_DESTINATIONS".to_owned(),
            definitions.to_string(),
        )];
        let config = auditbridge_config::Config::from_env(vars)
            .unwrap()
            .destinations
            .remove(0);
        let ctx = Arc::new(RelayContext {
            // Never reached: nothing is registered before the sink exists.
            store: Store::connect_lazy("postgres://nobody@127.0.0.1:1/none", 1).unwrap(),
            holder: "test".into(),
            lease_ttl: Duration::from_secs(10),
            wake: watch::channel(0).1,
        });
        let attempts = Arc::new(AtomicUsize::new(0));
        let counted = attempts.clone();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(supervise_with(
            config,
            ctx,
            shutdown.clone(),
            move |_: &DestinationConfig| {
                counted.fetch_add(1, Ordering::Relaxed);
                Err(DeliveryError::Refused {
                    reason: "config",
                    detail: "cannot build".into(),
                })
            },
        ));
        tokio::time::sleep(Duration::from_secs(3)).await;
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(2), task)
            .await
            .expect("the supervisor stops at shutdown")
            .unwrap();
        // Backoff from 200 ms, doubling with jitter: about five attempts in 3 s, not thousands.
        let n = attempts.load(Ordering::Relaxed);
        assert!((2..=8).contains(&n), "{n} attempts in 3 s");
    }
}
