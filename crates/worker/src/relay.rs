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

use std::sync::Arc;
use std::time::{Duration, Instant};

use auditbridge_destinations::{
    Delivered, DeliveryError, DestinationConfig, OnUndeliverable, OutEvent, Sink, Start,
};
use auditbridge_store::{DestinationDeadLetter, OutboxRow, Position, StartAt, Store};
use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use metrics::{counter, gauge, histogram};
use time::OffsetDateTime;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::telemetry::*;

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

/// Registers the destination (keeping its progress if it exists), then competes for its
/// lease and relays while holding it, until shutdown.
pub(crate) async fn supervise(
    config: DestinationConfig,
    ctx: Arc<RelayContext>,
    shutdown: CancellationToken,
) {
    supervise_with(config, ctx, shutdown, Sink::new).await;
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
    let mut build_backoff = backoff(&config);
    let mut build_failures = 0u32;
    let mut sink = loop {
        match build(&config) {
            Ok(sink) => break sink,
            Err(e) => {
                build_failures += 1;
                let delay = build_backoff.next().unwrap_or(config.retry_max);
                if build_failures == 1 || build_failures.is_multiple_of(20) {
                    tracing::error!(destination = %name, error = %e, attempts = build_failures, retry_in = ?delay, message = "Cannot build the destination's sink; retrying. Check its configuration.");
                }
                counter!(DEST_FAILURES, "destination" => name.clone(), "reason" => "sink_build")
                    .increment(1);
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    };
    let start = match &config.start {
        Start::Now => StartAt::Now,
        Start::Earliest => StartAt::Earliest,
        Start::At(t) => StartAt::At(*t),
    };
    let mut registered = false;
    let mut failures = 0u32;
    loop {
        if shutdown.is_cancelled() {
            return;
        }
        if !registered {
            match ctx
                .store
                .register_destination(&name, config.kind.type_name(), &start)
                .await
            {
                Ok(created) => {
                    registered = true;
                    if created {
                        tracing::info!(destination = %name, message = "Registered a new destination.");
                    }
                }
                Err(e) => {
                    failures += 1;
                    if failures == 1 || failures.is_multiple_of(20) {
                        tracing::warn!(destination = %name, error = %e, message = "Cannot register the destination yet; retrying.");
                    }
                }
            }
        }
        if registered {
            match ctx
                .store
                .acquire_lease(&name, &ctx.holder, ctx.lease_ttl)
                .await
            {
                Ok(Some(state)) => {
                    tracing::info!(destination = %name, cursor = ?state.cursor, message = "Took the destination's lease; relaying.");
                    gauge!(DEST_LEASE_HELD, "destination" => name.clone()).set(1.0);
                    relay_while_held(&config, &ctx, &mut sink, state.cursor, &shutdown).await;
                    gauge!(DEST_LEASE_HELD, "destination" => name.clone()).set(0.0);
                    if shutdown.is_cancelled() {
                        // Hand over at once rather than after the TTL.
                        let _ = ctx.store.release_lease(&name, &ctx.holder).await;
                        return;
                    }
                    continue;
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::debug!(destination = %name, error = %e, message = "Lease check failed.");
                }
            }
        }
        // Someone else holds it (or the database is away): look again well within a TTL.
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(ctx.lease_ttl / 3) => {}
        }
    }
}

/// Relays from `cursor` until the lease is lost or shutdown.
async fn relay_while_held(
    config: &DestinationConfig,
    ctx: &RelayContext,
    sink: &mut Sink,
    cursor: Position,
    shutdown: &CancellationToken,
) {
    let name = config.name.as_str();
    let held = shutdown.child_token();
    let (cursor_tx, cursor_rx) = watch::channel(cursor.clone());
    let renewer = tokio::spawn(keep_lease(
        ctx.store.clone(),
        name.to_owned(),
        ctx.holder.clone(),
        ctx.lease_ttl,
        held.clone(),
    ));
    let reporter = tokio::spawn(report_backlog(
        ctx.store.clone(),
        name.to_owned(),
        cursor_rx,
        held.clone(),
    ));

    let mut relay = Relay {
        config,
        ctx,
        cursor,
        cursor_tx,
        held: held.clone(),
        sink,
        backoff: backoff(config),
    };
    relay.run().await;
    held.cancel();
    let _ = renewer.await;
    reporter.abort();
}

fn backoff(config: &DestinationConfig) -> ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(config.retry_min)
        .with_max_delay(config.retry_max)
        .with_jitter()
        .without_max_times()
        .build()
}

type ReadAhead = tokio::task::JoinHandle<Result<Vec<OutboxRow>, auditbridge_store::StoreError>>;

struct Relay<'a> {
    config: &'a DestinationConfig,
    ctx: &'a RelayContext,
    cursor: Position,
    cursor_tx: watch::Sender<Position>,
    held: CancellationToken,
    sink: &'a mut Sink,
    backoff: ExponentialBackoff,
}

/// Events refused alone in a row, with nothing after them taken, before the relay concludes
/// that the destination refuses everything (a revoked token, a wrong URL) rather than those
/// events: it then holds them, marks the destination failing and backs off.
const MAX_SUSPECTS: usize = 5;

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
            let read = match ahead.take() {
                // Used only if the current batch was relayed to its end (the usual case);
                // otherwise (a partial delivery before a re-read) it is dropped.
                Some((from, handle)) if from == self.cursor => match handle.await {
                    Ok(result) => result,
                    // The read-ahead task itself failed: read again here.
                    Err(_) => {
                        self.ctx
                            .store
                            .read_outbox(&self.cursor, self.config.batch_size)
                            .await
                    }
                },
                _ => {
                    self.ctx
                        .store
                        .read_outbox(&self.cursor, self.config.batch_size)
                        .await
                }
            };
            let rows = match read {
                Ok(rows) => rows,
                Err(e) => {
                    tracing::warn!(destination = %self.name(), error = %e, message = "Cannot read the outbox; retrying.");
                    if !self.pause(Duration::from_secs(1)).await {
                        return;
                    }
                    continue;
                }
            };
            if rows.is_empty() {
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
            let from = last.clone();
            ahead = Some((
                last,
                tokio::spawn(async move { store.read_outbox(&from, limit).await }),
            ));
            if !self.relay_rows(rows).await {
                return;
            }
        }
    }

    /// Skips what is too old, delivers what matches, and moves the cursor past the rows.
    /// False when the relay must stop (lease lost, shutdown).
    async fn relay_rows(&mut self, rows: Vec<OutboxRow>) -> bool {
        let last = rows
            .last()
            .map(|r| r.position.clone())
            .expect("rows is not empty");
        let mut rows = rows;

        if let Some(max_age) = self.config.max_backlog_age {
            // Ages are measured on the database's clock, the one `received_at` was taken on:
            // a worker whose clock runs ahead would otherwise skip fresh events. If the
            // database cannot say, nothing is skipped this time.
            let old = match self.ctx.store.now().await {
                Ok(now) => {
                    let limit = now - max_age;
                    rows.iter().take_while(|r| r.received_at < limit).count()
                }
                Err(e) => {
                    tracing::debug!(destination = %self.name(), error = %e, message = "Cannot read the database's clock; not applying max_backlog_age this time.");
                    0
                }
            };
            if old > 0 {
                let to = rows[old - 1].position.clone();
                tracing::warn!(destination = %self.name(), skipped = old, max_backlog_age = %humantime::format_duration(max_age), message = "Skipping backlog older than max_backlog_age: these events will NOT be delivered to this destination.");
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
        let (positions, events): (Vec<Position>, Vec<OutEvent>) = rows
            .into_iter()
            .filter(|r| filter.matches(&r.tenant, &r.action, &r.outcome))
            .map(|r| {
                (
                    r.position,
                    OutEvent {
                        id: r.id,
                        tenant: r.tenant,
                        action: r.action,
                        outcome: r.outcome,
                        source: r.source,
                        received_at: r.received_at,
                        json: r.json,
                    },
                )
            })
            .unzip();
        if events.is_empty() {
            return self.advance(&last, 0, 0).await;
        }

        let dead_letter = self.config.on_undeliverable == OnUndeliverable::DeadLetter;
        // events[..done] are settled and the cursor is past them.
        let mut done = 0;
        // Isolating a permanent refusal: the most events offered at once (halved after each
        // refusal of several), and the events since `done` that were refused alone. Those are
        // the events' fault only once an event after them is taken; until then the destination
        // may be refusing everything.
        let mut window = usize::MAX;
        let mut suspects: Vec<DeliveryError> = Vec::new();
        while done < events.len() {
            let probe = done + suspects.len();
            if probe == events.len() || suspects.len() > MAX_SUSPECTS {
                // Nothing after the suspects was taken (or none is in hand): keep them, say the
                // destination is failing, and read again from the cursor after a backoff (more
                // events may have arrived by then to tell the two apart).
                let refusal = suspects.pop().expect("there is a suspect");
                return self.failed(&refusal, true).await;
            }
            let offered = if suspects.is_empty() {
                window.min(events.len() - probe)
            } else {
                1
            };
            let result = self.sink.deliver(&events[probe..probe + offered]).await;
            match result {
                Ok(delivered) => {
                    let Delivered {
                        settled,
                        mut undeliverable,
                    } = delivered;
                    let mut settled = settled.min(offered);
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
                    let Some((new_done, to)) = progress(probe, offered, settled, &positions, &last)
                    else {
                        let refused = blocked.is_some();
                        let nothing = blocked.unwrap_or_else(|| DeliveryError::Retry {
                            reason: "none_confirmed",
                            detail: "the destination confirmed none of the events offered".into(),
                            retry_after: None,
                        });
                        if !self.failed(&nothing, refused).await {
                            return false;
                        }
                        if self.config.max_backlog_age.is_some() || !suspects.is_empty() {
                            return true;
                        }
                        continue;
                    };
                    undeliverable.retain(|u| u.index < settled);
                    // The suspects are convicted: an event after them was settled.
                    let mut dead: Vec<(usize, &'static str, String)> = suspects
                        .drain(..)
                        .enumerate()
                        .map(|(i, e)| (done + i, e.reason(), e.to_string()))
                        .collect();
                    dead.extend(
                        undeliverable
                            .iter()
                            .map(|u| (probe + u.index, u.reason, u.detail.clone())),
                    );
                    let confirmed = settled - undeliverable.len();
                    let label = self.name().to_owned();
                    if !dead.is_empty() {
                        let records: Vec<DestinationDeadLetter> = dead
                            .iter()
                            .map(|(i, kind, reason)| DestinationDeadLetter {
                                event_id: events[*i].id,
                                position: positions[*i].clone(),
                                kind: (*kind).to_owned(),
                                reason: reason.clone(),
                            })
                            .collect();
                        if !self.record_dead(&records).await {
                            return false;
                        }
                        for (i, kind, reason) in &dead {
                            tracing::warn!(destination = %label, event = %events[*i].id, kind, reason = %reason, message = "The destination cannot take this event; kept in its dead letters and going on.");
                            counter!(DEST_DEAD_LETTERED, "destination" => label.clone(), "reason" => *kind)
                                .increment(1);
                        }
                    }
                    if confirmed > 0 {
                        let confirmed_at = OffsetDateTime::now_utc();
                        let refused: Vec<usize> = undeliverable.iter().map(|u| u.index).collect();
                        for (i, e) in events[probe..probe + settled].iter().enumerate() {
                            if !refused.contains(&i) {
                                histogram!(DEST_LATENCY, "destination" => label.clone()).record(
                                    (confirmed_at - e.received_at).as_seconds_f64().max(0.0),
                                );
                            }
                        }
                        counter!(DEST_DELIVERED, "destination" => label.clone())
                            .increment(confirmed as u64);
                        gauge!(DEST_UP, "destination" => label).set(1.0);
                        self.backoff = backoff(self.config);
                    }
                    window = usize::MAX;
                    done = new_done;
                    if !self.advance(&to, confirmed as u64, 0).await {
                        return false;
                    }
                    if let Some(refusal) = blocked {
                        return self.failed(&refusal, true).await;
                    }
                }
                Err(e @ DeliveryError::Refused { .. }) if dead_letter => {
                    counter!(DEST_FAILURES, "destination" => self.name().to_owned(), "reason" => e.reason())
                        .increment(1);
                    if offered > 1 {
                        // Refused as a batch: find the event it is about by offering less.
                        window = offered / 2;
                        tracing::info!(destination = %self.name(), offered, reason = e.reason(), error = %e, message = "The destination refused a batch; isolating the event it cannot take.");
                    } else {
                        tracing::info!(destination = %self.name(), event = %events[probe].id, reason = e.reason(), error = %e, message = "The destination refused an event alone; trying the next one to tell whether the event or the destination is at fault.");
                        suspects.push(e);
                    }
                }
                Err(e) => {
                    let refused = matches!(e, DeliveryError::Refused { .. });
                    if !self.failed(&e, refused).await {
                        return false;
                    }
                    if self.config.max_backlog_age.is_some() {
                        // While we waited the events in hand aged: read again from the cursor
                        // so the age limit is applied to them before the next attempt.
                        return true;
                    }
                }
            }
        }
        true
    }

    /// Records dead letters for this destination, retrying while the lease may still be ours
    /// (as [`Relay::advance`] does). False if the relay must stop.
    async fn record_dead(&mut self, dead: &[DestinationDeadLetter]) -> bool {
        let started = Instant::now();
        loop {
            match self
                .ctx
                .store
                .record_undeliverable(self.name(), &self.ctx.holder, dead)
                .await
            {
                Ok(true) => return true,
                Ok(false) => {
                    tracing::warn!(destination = %self.name(), message = "Lost the destination's lease; another worker carries on from the stored cursor.");
                    self.held.cancel();
                    return false;
                }
                Err(e) => {
                    if started.elapsed() > self.ctx.lease_ttl {
                        tracing::warn!(destination = %self.name(), error = %e, message = "Cannot record the destination's dead letters; giving the lease up (the events will be tried again).");
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
            tracing::error!(destination = %name, reason = e.reason(), error = %e, retry_in = ?delay, message = "The destination refused the delivery; the events are kept and retried. Check its configuration.");
        } else {
            tracing::warn!(destination = %name, reason = e.reason(), error = %e, retry_in = ?delay, message = "Delivery failed; retrying.");
        }
        if let Err(err) = self
            .ctx
            .store
            .record_failure(&name, &self.ctx.holder, &e.to_string(), refused)
            .await
        {
            tracing::debug!(destination = %name, error = %err, message = "Could not record the failure.");
        }
        self.pause(delay).await
    }

    async fn advance(&mut self, to: &Position, delivered: u64, skipped: u64) -> bool {
        let started = Instant::now();
        loop {
            match self
                .ctx
                .store
                .advance(self.name(), &self.ctx.holder, to, delivered, skipped)
                .await
            {
                Ok(true) => {
                    self.cursor = to.clone();
                    let _ = self.cursor_tx.send(to.clone());
                    return true;
                }
                Ok(false) => {
                    tracing::warn!(destination = %self.name(), message = "Lost the destination's lease; another worker carries on from the stored cursor.");
                    self.held.cancel();
                    return false;
                }
                Err(e) => {
                    // Delivered but not yet recorded: keep trying for as long as the lease may
                    // be ours; if it is lost, the next holder resends (duplicates, no loss).
                    if started.elapsed() > self.ctx.lease_ttl {
                        tracing::warn!(destination = %self.name(), error = %e, message = "Cannot record progress; giving the lease up (the events will be sent again).");
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

    /// Sleeps unless the lease is lost or shutdown comes first.
    async fn pause(&self, d: Duration) -> bool {
        tokio::select! {
            _ = self.held.cancelled() => false,
            _ = tokio::time::sleep(d) => true,
        }
    }
}

/// Renews the lease every third of its TTL; cancels `held` if it is lost.
async fn keep_lease(
    store: Store,
    name: String,
    holder: String,
    ttl: Duration,
    held: CancellationToken,
) {
    let mut last_ok = Instant::now();
    loop {
        tokio::select! {
            _ = held.cancelled() => return,
            _ = tokio::time::sleep(ttl / 3) => {}
        }
        match store.renew_lease(&name, &holder, ttl).await {
            Ok(true) => last_ok = Instant::now(),
            Ok(false) => {
                tracing::warn!(destination = %name, message = "The destination's lease was taken (expired or rewound); stopping.");
                held.cancel();
                return;
            }
            Err(e) if last_ok.elapsed() >= ttl => {
                tracing::warn!(destination = %name, error = %e, message = "Cannot renew the lease before it expires; stopping.");
                held.cancel();
                return;
            }
            Err(_) => {}
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
        let config = auditbridge_destinations::parse_destinations(&[serde_json::json!({
            "name": "siem", "type": "http",
            "params": {"url": "http://127.0.0.1:9/in", "retry_min": "200ms", "retry_max": "5s"}
        })])
        .unwrap()
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
