//! The background task: takes events from the client's queue and publishes them, or buffers
//! them in the backing store and drains the store when NATS is back.
//!
//! Two modes. **Direct**: events are published as they come, up to `max_in_flight` awaiting
//! their JetStream ack. **Buffering**: events go to the store, behind the ones already there,
//! and the store is drained oldest first, one batch at a time, each batch removed only once
//! JetStream acknowledged it. The task switches to buffering when NATS is disconnected, a
//! publish fails, or the oldest ack has been awaited longer than `spill_after`; the events in
//! flight at that moment go to the store first (they may be published twice; JetStream's
//! duplicate window and the worker's id check absorb that). It switches back when a drain
//! finds the store empty, so while the store holds anything, newer events queue behind it.
//!
//! Only this task touches the store, so callers of `record` never do file or network I/O.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::connection::State;
use async_nats::jetstream::context::{PublishAckFuture, PublishError};
use async_nats::jetstream::{self, publish::PublishAck};
use backon::{BackoffBuilder, ExponentialBuilder};
use futures::StreamExt as _;
use futures::future::BoxFuture;
use futures::stream::FuturesOrdered;
use metrics::{counter, gauge};
use tokio::sync::{mpsc, watch};
use tokio::time::sleep_until;
use tokio_util::sync::CancellationToken;

use crate::error::Backpressure;
use crate::metric_names::*;
use crate::store::{Pending, Store};

/// State shared between the [`crate::Client`] handles and the task.
pub(crate) struct Shared {
    pub(crate) closed: AtomicBool,
    pub(crate) pressure: AtomicU8,
    pub(crate) accepted: AtomicU64,
    pub(crate) counts: Counts,
    pub(crate) progress: watch::Sender<Progress>,
    pub(crate) close: CancellationToken,
    pub(crate) close_deadline: Mutex<Option<Instant>>,
    pub(crate) store_kind: &'static str,
}

/// Running totals behind [`crate::Stats`].
#[derive(Default)]
pub(crate) struct Counts {
    pub(crate) published: AtomicU64,
    pub(crate) buffered: AtomicU64,
    pub(crate) buffered_bytes: AtomicU64,
    pub(crate) drained: AtomicU64,
    pub(crate) publish_failed: AtomicU64,
    pub(crate) refused: AtomicU64,
    pub(crate) dead_lettered: AtomicU64,
    pub(crate) store_errors: AtomicU64,
    pub(crate) store_events: AtomicU64,
    pub(crate) store_bytes: AtomicU64,
    pub(crate) queue_events: AtomicU64,
}

fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// What `flush` waits for: everything taken from the queue so far, and nothing pending.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Progress {
    pub(crate) taken: u64,
    pub(crate) idle: bool,
}

/// How the task ended; `close` turns it into its result.
#[derive(Debug)]
pub(crate) struct Finished {
    pub(crate) in_store: u64,
    pub(crate) lost: u64,
    pub(crate) durable: bool,
}

#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) max_in_flight: usize,
    pub(crate) drain_batch: usize,
    pub(crate) ack_timeout: Duration,
    pub(crate) spill_after: Duration,
    /// Used when every handle is dropped without `close`.
    pub(crate) drop_deadline: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Direct,
    Buffering,
}

/// How often the task looks at the connection and its own timers while waiting.
const CHECK_EVERY: Duration = Duration::from_millis(100);
/// A full store is tried again after this long (or at once after a drain made room).
const FULL_RETRY: Duration = Duration::from_millis(50);
const METRICS_EVERY: Duration = Duration::from_millis(250);
const POLL_EVERY: Duration = Duration::from_millis(1);
const STAY_POLLING: Duration = Duration::from_millis(200);

pub(crate) struct Pump {
    js: jetstream::Context,
    nats: async_nats::Client,
    rx: mpsc::Receiver<Pending>,
    rx_done: bool,
    store: Store,
    shared: Arc<Shared>,
    settings: Settings,
    mode: Mode,
    inflight: VecDeque<(Pending, Instant)>,
    acks: FuturesOrdered<BoxFuture<'static, Result<PublishAck, PublishError>>>,
    /// Taken from the queue, not yet in the store (buffering mode): older than the queue,
    /// newer than the store.
    hold: VecDeque<Pending>,
    hold_max: usize,
    buf: Vec<Pending>,
    taken: u64,
    closing: Option<Instant>,
    drain_at: Instant,
    drain_backoff: Backoff,
    store_at: Instant,
    store_backoff: Backoff,
    /// Logged once per episode, not once per event.
    failing_logged: bool,
    metrics_at: Instant,
    exported: [u64; 8],
    last_event_at: Option<Instant>,
}

type Backoff = Box<dyn Iterator<Item = Duration> + Send>;

fn backoff() -> Backoff {
    Box::new(
        ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(2))
            .with_jitter()
            .without_max_times()
            .build(),
    )
}

impl Pump {
    pub(crate) fn new(
        js: jetstream::Context,
        nats: async_nats::Client,
        rx: mpsc::Receiver<Pending>,
        store: Store,
        shared: Arc<Shared>,
        settings: Settings,
    ) -> Pump {
        let now = Instant::now();
        Pump {
            js,
            nats,
            rx,
            rx_done: false,
            store,
            shared,
            hold_max: settings.max_in_flight.max(settings.drain_batch) * 2,
            settings,
            // The store may hold events from an earlier run: drain it first.
            mode: Mode::Buffering,
            inflight: VecDeque::new(),
            acks: FuturesOrdered::new(),
            hold: VecDeque::new(),
            buf: Vec::new(),
            taken: 0,
            closing: None,
            drain_at: now,
            drain_backoff: backoff(),
            store_at: now,
            store_backoff: backoff(),
            failing_logged: false,
            metrics_at: now,
            exported: [0; 8],
            last_event_at: None,
        }
    }

    pub(crate) async fn run(mut self) -> Finished {
        loop {
            self.report();
            if let Some(deadline) = self.closing
                && (self.idle() && self.rx_done || Instant::now() >= deadline)
            {
                break;
            }
            match self.mode {
                Mode::Direct => self.step_direct().await,
                Mode::Buffering => self.step_buffering().await,
            }
        }
        self.finish().await
    }

    fn idle(&self) -> bool {
        self.mode == Mode::Direct && self.inflight.is_empty() && self.hold.is_empty()
    }

    fn connected(&self) -> bool {
        self.nats.connection_state() == State::Connected
    }

    fn begin_close(&mut self) {
        let deadline = self
            .shared
            .close_deadline
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .unwrap_or_else(|| Instant::now() + self.settings.drop_deadline);
        self.closing = Some(deadline);
        self.rx.close();
    }

    /// `None`: every handle is gone or `close` was called, and the queue is empty.
    fn received(&mut self, n: Option<usize>) -> Vec<Pending> {
        let Some(n) = n else {
            self.rx_done = true;
            if self.closing.is_none() {
                self.begin_close();
            }
            return Vec::new();
        };
        if n > 0 {
            self.last_event_at = Some(Instant::now());
        }
        self.taken += n as u64;
        std::mem::take(&mut self.buf)
    }

    /// While events flow, the task looks at the queue every [`POLL_EVERY`] instead of being
    /// woken by each `record` — a wake-up can cost the caller a context switch (tens to
    /// hundreds of µs on a busy machine). Once idle for [`STAY_POLLING`], it sleeps until
    /// woken, so an idle service pays nothing.
    fn poll_at(&self) -> Option<Instant> {
        self.last_event_at
            .filter(|t| t.elapsed() < STAY_POLLING)
            .map(|_| Instant::now() + POLL_EVERY)
    }

    async fn step_direct(&mut self) {
        let room = self
            .settings
            .max_in_flight
            .saturating_sub(self.inflight.len());
        // Events held while buffering (up to `hold_max`, more than `max_in_flight`) go out
        // first, as room allows; the queue waits behind them to keep the order.
        if room > 0 && !self.hold.is_empty() {
            let n = room.min(self.hold.len());
            let events: Vec<Pending> = self.hold.drain(..n).collect();
            return self.publish_direct(events).await;
        }
        let now = Instant::now();
        let check_at = self
            .inflight
            .front()
            .map(|(_, sent)| (*sent + self.settings.spill_after).min(now + CHECK_EVERY));
        let far = now + Duration::from_secs(3600);
        let poll = self.poll_at();
        tokio::select! {
            biased;
            _ = self.shared.close.cancelled(), if self.closing.is_none() => self.begin_close(),
            Some(result) = self.acks.next(), if !self.acks.is_empty() => self.on_ack(result).await,
            n = take(&mut self.rx, &mut self.buf, room, poll), if room > 0 && !self.rx_done && self.hold.is_empty() => {
                let events = self.received(n);
                if !events.is_empty() {
                    self.publish_direct(events).await;
                }
            }
            _ = sleep_until(check_at.unwrap_or(far).into()), if check_at.is_some() => {
                let slow = self
                    .inflight
                    .front()
                    .is_some_and(|(_, sent)| sent.elapsed() >= self.settings.spill_after);
                if slow || !self.connected() {
                    let why = if slow { "NATS is slow to acknowledge" } else { "NATS is disconnected" };
                    self.spill(Vec::new(), why).await;
                }
            }
            _ = sleep_until(self.closing.unwrap_or(far).into()), if self.closing.is_some() => {}
        }
    }

    async fn on_ack(&mut self, result: Result<PublishAck, PublishError>) {
        match result {
            Ok(ack) => {
                self.inflight.pop_front();
                if !ack.duplicate {
                    add(&self.shared.counts.published, 1);
                }
            }
            Err(e) => {
                add(&self.shared.counts.publish_failed, 1);
                self.log_failure(&format!("publish not acknowledged: {e}"));
                // The failed event is still at the front of `inflight`: it goes first.
                self.spill(Vec::new(), "a publish failed").await;
            }
        }
    }

    fn log_failure(&mut self, error: &str) {
        if !self.failing_logged {
            self.failing_logged = true;
            tracing::warn!(
                error,
                message = "Audit client: publishing failed; events are kept and retried."
            );
        }
    }

    async fn publish_direct(&mut self, events: Vec<Pending>) {
        if !self.connected() {
            return self.spill(events, "NATS is disconnected").await;
        }
        let mut events = events.into_iter();
        while let Some(e) = events.next() {
            match publish(&self.js, self.settings.ack_timeout, &e).await {
                Ok(ack) => {
                    self.inflight.push_back((e, Instant::now()));
                    self.acks.push_back(ack.into_future());
                }
                Err(error) => {
                    add(&self.shared.counts.publish_failed, 1);
                    self.log_failure(&error);
                    let mut rest = vec![e];
                    rest.extend(events);
                    return self.spill(rest, "a publish failed").await;
                }
            }
        }
    }

    /// Switches to buffering: what is in flight, then `newer`, go to the store first.
    async fn spill(&mut self, newer: Vec<Pending>, why: &str) {
        self.acks = FuturesOrdered::new();
        let mut moved: VecDeque<Pending> = self.inflight.drain(..).map(|(e, _)| e).collect();
        moved.extend(newer);
        moved.append(&mut self.hold);
        self.hold = moved;
        if self.mode == Mode::Direct {
            tracing::warn!(
                reason = why,
                store = self.store.kind(),
                message = "Audit client: buffering events in the backing store until NATS takes them again."
            );
            self.mode = Mode::Buffering;
        }
        let now = Instant::now();
        self.drain_at = now + self.drain_backoff.next().unwrap_or(CHECK_EVERY);
        self.store_at = now;
        self.store_hold().await;
    }

    async fn store_hold(&mut self) {
        if self.hold.is_empty() {
            return;
        }
        let events = self.hold.make_contiguous();
        match self.store.append(events).await {
            Ok(n) => {
                let bytes: usize = self.hold.drain(..n).map(|e| e.payload.len()).sum();
                add(&self.shared.counts.buffered, n as u64);
                add(&self.shared.counts.buffered_bytes, bytes as u64);
                self.store_backoff = backoff();
                let pressure = if self.hold.is_empty() {
                    Backpressure::Busy
                } else {
                    self.store_at = Instant::now() + FULL_RETRY;
                    Backpressure::StoreFull
                };
                self.set_pressure(pressure);
            }
            Err(e) => {
                add(&self.shared.counts.store_errors, 1);
                tracing::warn!(error = %e, store = self.store.kind(), held = self.hold.len(), message = "Audit client: writing to the backing store failed; keeping the events in memory and retrying.");
                self.set_pressure(Backpressure::StoreFailing);
                self.store_at = Instant::now() + self.store_backoff.next().unwrap_or(CHECK_EVERY);
            }
        }
    }

    fn set_pressure(&self, p: Backpressure) {
        let old = self.shared.pressure.swap(p.as_u8(), Ordering::Relaxed);
        if old != p.as_u8() && p == Backpressure::StoreFull {
            tracing::warn!(
                store = self.store.kind(),
                message = "Audit client: the backing store is full; record() refuses or waits (OnFull) until it drains."
            );
        }
    }

    async fn step_buffering(&mut self) {
        let now = Instant::now();
        if !self.connected() && (!self.hold.is_empty() || self.store.events() > 0) {
            // Also when NATS was never reachable since the client started.
            self.log_failure("NATS is not connected");
        }
        if !self.hold.is_empty() && now >= self.store_at {
            self.store_hold().await;
        }
        if self.connected() && now >= self.drain_at {
            return self.drain_once().await;
        }
        self.store.tick().await;
        let mut wake = now + CHECK_EVERY;
        if !self.hold.is_empty() {
            wake = wake.min(self.store_at);
        }
        if self.connected() {
            wake = wake.min(self.drain_at);
        }
        if let Some(deadline) = self.closing {
            wake = wake.min(deadline);
        }
        let room = self.hold_max.saturating_sub(self.hold.len());
        let poll = self.poll_at();
        tokio::select! {
            biased;
            _ = self.shared.close.cancelled(), if self.closing.is_none() => self.begin_close(),
            n = take(&mut self.rx, &mut self.buf, room, poll), if room > 0 && !self.rx_done => {
                let events = self.received(n);
                self.hold.extend(events);
                if Instant::now() >= self.store_at {
                    self.store_hold().await;
                }
            }
            _ = sleep_until(wake.into()) => {}
        }
    }

    /// Publishes the oldest batch of the store and removes what JetStream acknowledged.
    /// Meanwhile, newly recorded events keep going to the store behind it.
    async fn drain_once(&mut self) {
        let batch = match self.store.peek(self.settings.drain_batch).await {
            Ok(batch) => batch,
            Err(e) => {
                add(&self.shared.counts.store_errors, 1);
                tracing::warn!(error = %e, store = self.store.kind(), message = "Audit client: reading the backing store failed; retrying.");
                self.drain_at = Instant::now() + self.store_backoff.next().unwrap_or(CHECK_EVERY);
                return;
            }
        };
        if batch.is_empty() {
            // Everything older is published: what is held can go out directly.
            if self.mode == Mode::Buffering && self.failing_logged {
                tracing::info!(
                    store = self.store.kind(),
                    message =
                        "Audit client: the backing store is drained; publishing directly again."
                );
            }
            self.mode = Mode::Direct;
            self.failing_logged = false;
            self.drain_backoff = backoff();
            self.set_pressure(Backpressure::Busy);
            // What is held goes out from `step_direct`, at most `max_in_flight` at a time.
            return;
        }

        let mut acks = Vec::with_capacity(batch.len());
        let mut send_error = None;
        for e in &batch {
            match publish(&self.js, self.settings.ack_timeout, e).await {
                Ok(ack) => acks.push(ack.into_future()),
                Err(error) => {
                    send_error = Some(error);
                    break;
                }
            }
        }
        let all = futures::future::join_all(acks);
        tokio::pin!(all);
        let results = loop {
            let room = self.hold_max.saturating_sub(self.hold.len());
            let poll = self.poll_at();
            tokio::select! {
                biased;
                results = &mut all => break results,
                _ = self.shared.close.cancelled(), if self.closing.is_none() => self.begin_close(),
                n = take(&mut self.rx, &mut self.buf, room, poll), if room > 0 && !self.rx_done => {
                    let events = self.received(n);
                    self.hold.extend(events);
                    if Instant::now() >= self.store_at {
                        self.store_hold().await;
                    }
                }
            }
        };

        let ok = results.iter().take_while(|r| r.is_ok()).count();
        let fresh = results[..ok]
            .iter()
            .filter(|r| r.as_ref().is_ok_and(|a| !a.duplicate))
            .count();
        add(&self.shared.counts.published, fresh as u64);
        // Also with nothing acknowledged: `remove` ends the peek (the postgres store's
        // transaction), which must not stay open for as long as NATS is away.
        {
            match self.store.remove(ok).await {
                Ok(()) => add(&self.shared.counts.drained, ok as u64),
                Err(e) => {
                    // They stay stored and are published again: duplicates, not losses.
                    add(&self.shared.counts.store_errors, 1);
                    tracing::warn!(error = %e, store = self.store.kind(), message = "Audit client: removing published events from the backing store failed; they will be published again.");
                }
            }
        }
        if ok < batch.len() {
            add(
                &self.shared.counts.publish_failed,
                (batch.len() - ok) as u64,
            );
            let error = results[ok..]
                .iter()
                .find_map(|r| r.as_ref().err().map(ToString::to_string))
                .or(send_error)
                .unwrap_or_default();
            self.log_failure(&error);
            self.drain_at = Instant::now() + self.drain_backoff.next().unwrap_or(CHECK_EVERY);
        } else {
            self.drain_backoff = backoff();
        }
        // Room was made: a full store can take the held events now.
        self.store_at = Instant::now();
    }

    /// After the deadline or once idle: whatever is not acknowledged goes to the store.
    async fn finish(mut self) -> Finished {
        let mut rest: VecDeque<Pending> = self.inflight.drain(..).map(|(e, _)| e).collect();
        rest.append(&mut self.hold);
        self.rx.close();
        while let Ok(e) = self.rx.try_recv() {
            self.taken += 1;
            rest.push_back(e);
        }
        self.hold = rest;
        self.acks = FuturesOrdered::new();
        // A short, bounded grace for a store that is full or failing right now.
        let give_up = Instant::now() + Duration::from_millis(500);
        while !self.hold.is_empty() {
            self.store_at = Instant::now();
            self.store_hold().await;
            if self.hold.is_empty() || Instant::now() >= give_up {
                break;
            }
            tokio::time::sleep(FULL_RETRY).await;
        }
        if let Err(e) = self.store.sync().await {
            tracing::warn!(error = %e, store = self.store.kind(), message = "Audit client: syncing the backing store at close failed.");
        }
        let lost = self.hold.len() as u64;
        if lost > 0 {
            tracing::error!(
                events = lost,
                store = self.store.kind(),
                message = "Audit client: closed with events that neither NATS nor the backing store took; they are lost."
            );
        }
        self.report();
        self.export_metrics();
        Finished {
            in_store: self.store.events(),
            lost,
            durable: self.store.durable(),
        }
    }

    fn report(&mut self) {
        let counts = &self.shared.counts;
        let dead = self.store.take_dead_lettered();
        add(&counts.dead_lettered, dead);
        counts
            .store_events
            .store(self.store.events(), Ordering::Relaxed);
        counts
            .store_bytes
            .store(self.store.bytes(), Ordering::Relaxed);
        counts
            .queue_events
            .store(self.rx.len() as u64, Ordering::Relaxed);
        let progress = Progress {
            taken: self.taken,
            idle: self.idle(),
        };
        self.shared.progress.send_if_modified(|p| {
            let changed = *p != progress;
            *p = progress;
            changed
        });
        if self.metrics_at.elapsed() >= METRICS_EVERY {
            self.export_metrics();
        }
    }

    fn export_metrics(&mut self) {
        self.metrics_at = Instant::now();
        let c = &self.shared.counts;
        let store = self.shared.store_kind;
        let now = [
            &c.published,
            &c.buffered,
            &c.buffered_bytes,
            &c.drained,
            &c.publish_failed,
            &c.dead_lettered,
            &c.store_errors,
            &c.refused,
        ]
        .map(|a| a.load(Ordering::Relaxed));
        let names = [
            PUBLISHED_EVENTS,
            BUFFERED_EVENTS,
            BUFFERED_BYTES,
            DRAINED_EVENTS,
            PUBLISH_FAILED_EVENTS,
            DEAD_LETTERED_EVENTS,
            STORE_ERRORS,
        ];
        for (i, name) in names.into_iter().enumerate() {
            let delta = now[i] - self.exported[i];
            if delta > 0 {
                counter!(name, "store" => store).increment(delta);
            }
        }
        self.exported = now;
        gauge!(STORE_EVENTS, "store" => store).set(c.store_events.load(Ordering::Relaxed) as f64);
        gauge!(STORE_BYTES, "store" => store).set(c.store_bytes.load(Ordering::Relaxed) as f64);
        gauge!(QUEUE_EVENTS, "store" => store).set(c.queue_events.load(Ordering::Relaxed) as f64);
        gauge!(BUFFERING, "store" => store).set(if self.mode == Mode::Buffering {
            1.0
        } else {
            0.0
        });
    }
}

/// Hands one event to the NATS client with its `Nats-Msg-Id` (`<tenant>:<id>`); the returned future resolves
/// with JetStream's acknowledgement (or times out after the context's ack timeout).
async fn publish(
    js: &jetstream::Context,
    timeout: Duration,
    e: &Pending,
) -> Result<PublishAckFuture, String> {
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", e.msg_id.as_str());
    let publish = js.publish_with_headers(e.subject.clone(), headers, e.payload.clone());
    match tokio::time::timeout(timeout, publish).await {
        Ok(Ok(ack)) => Ok(ack),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out handing the event to the NATS client".into()),
    }
}

/// Takes up to `room` events from the queue: waits to be woken when `poll` is `None`,
/// otherwise sleeps until `poll` and takes what is there (possibly nothing). `None` when the
/// queue is closed and empty.
async fn take(
    rx: &mut mpsc::Receiver<Pending>,
    buf: &mut Vec<Pending>,
    room: usize,
    poll: Option<Instant>,
) -> Option<usize> {
    let Some(at) = poll else {
        return match rx.recv_many(buf, room).await {
            0 => None,
            n => Some(n),
        };
    };
    sleep_until(at.into()).await;
    let mut n = 0;
    while n < room {
        match rx.try_recv() {
            Ok(e) => {
                buf.push(e);
                n += 1;
            }
            Err(mpsc::error::TryRecvError::Empty) => break,
            Err(mpsc::error::TryRecvError::Disconnected) if n == 0 => return None,
            Err(mpsc::error::TryRecvError::Disconnected) => break,
        }
    }
    Some(n)
}
