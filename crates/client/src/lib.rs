//! Record audit events from any tokio service without the request ever waiting on, or
//! failing because of, the audit system — and without losing an event while NATS is down.
//!
//! ```no_run
//! use std::time::Duration;
//! use auditbridge_client::{Client, Outcome};
//!
//! # async fn handler() -> anyhow::Result<()> {
//! // Once, at startup. NATS may be down: connecting never waits for it.
//! let audit = Client::builder()
//!     .source("docs-api")
//!     .store_from_env()? // AUDITBRIDGE_CLIENT_STORE, e.g. {"type":"file","params":{"dir":"/var/lib/docs-api/audit"}}
//!     .connect()
//!     .await?;
//!
//! // On the request path: cheap, never blocks, never panics.
//! let event = audit
//!     .event("acme", "document.update")
//!     .actor("u-42")
//!     .target("doc-9")
//!     .outcome(Outcome::Success)
//!     .build()?;
//! if let Err(e) = audit.record(event).await {
//!     tracing::error!(error = %e, "audit event not recorded");
//! }
//!
//! // At shutdown: publish what is left, or leave it in the (durable) store.
//! audit.close(Duration::from_secs(5)).await?;
//! # Ok(()) }
//! ```
//!
//! # How it works
//!
//! [`Client::record`] validates the event (the worker's own rules, [`Event::validate`]),
//! serializes it and puts it on a bounded in-process queue; that is all it does on the
//! caller's task — no file or network I/O. A background task publishes each event to
//! `<prefix>.<tenant>.<action>` with the header `Nats-Msg-Id: <tenant>:<id>` and awaits its JetStream
//! acknowledgement, many at a time.
//!
//! When NATS is disconnected, a publish fails, or an acknowledgement takes longer than
//! [`ClientBuilder::spill_after`], events go to the **backing store** instead — the ones in
//! flight first — and are drained from it, oldest first, when NATS takes them again. While
//! the store holds anything, new events queue behind it, so order is kept. An event removed
//! from the store is one JetStream acknowledged. Events in flight at a failure may be
//! published twice; JetStream's duplicate window and the worker (which stores each id once)
//! absorb that. Those few may also reach the stream out of order: the NATS client re-sends
//! what it had not yet written when the connection broke, after reconnecting, while the same
//! events drain from the store (the end-to-end tests measure at most a few places).
//!
//! # Backing stores
//!
//! | type | where | survives | params (defaults) |
//! |---|---|---|---|
//! | `memory` | process memory | NATS outages | `max_events` (100,000), `max_bytes` (64 MiB) |
//! | `file` | append-only JSON Lines segments in a directory | restarts, and with `fsync: always` power loss | `dir` (required), `segment_bytes` (16 MiB), `max_bytes` (1 GiB, disk used), `fsync`: `always` \| `interval` \| `never` (`always`), `fsync_interval` (`1s`) |
//! | `postgres` | a table in the service's own database | restarts; for services without volumes | `url` (required), `table` (`auditbridge_client_buffer`), `max_events` (1,000,000), `max_bytes` (1 GiB) |
//!
//! Choose one in code ([`ClientBuilder::store`]) or with the environment variable
//! `AUDITBRIDGE_CLIENT_STORE` ([`STORE_ENV`]) holding `{"type": "...", "params": {...}}`;
//! unknown keys are refused with an error naming them.
//!
//! The file store's lines are exactly the published JSON, so a segment can be replayed with
//! `auditbridge publish < segment.jsonl`. A line that is not a valid event (a torn write, a
//! disk error) is moved to `dead-letters.jsonl` in the same directory with its position and
//! the reason, and the drain goes on. One client at a time may use a directory (it is
//! locked).
//!
//! The postgres store creates its table (and `<table>_dead` for rows that no longer decode)
//! if missing. **It is the one place outside `auditbridge-store` that speaks SQL**: it runs
//! in the producer's process, against the producer's database, not Auditbridge's. Replicas may
//! share the table: a drain locks its rows (`FOR UPDATE SKIP LOCKED`) and deletes them in
//! the same transaction once acknowledged. Its size limits are checked against this process's
//! count, which is exact for one producer per table and approximate when shared.
//!
//! # When the client is full
//!
//! Events are never dropped silently. If the queue cannot take an event — because the store
//! is at its limit while NATS is down, or the store is failing and being retried (which is
//! not treated as "full"), or events simply arrive faster than they can be published or
//! stored — `record` returns [`RecordError::Full`] naming the [`Backpressure`] cause,
//! immediately with [`OnFull::Error`] (the default) or after waiting up to the given time
//! with [`OnFull::Wait`].
//!
//! Memory use is bounded: the queue ([`ClientBuilder::queue_capacity`] events), what the
//! background task holds while it writes to the store (at most twice the larger of
//! [`ClientBuilder::max_in_flight`] and [`ClientBuilder::drain_batch`]), and the memory
//! store's own limits.
//!
//! # Metrics
//!
//! Through the [`metrics`] facade (install any recorder, e.g. Prometheus), all with the label
//! `store` (`memory`, `file`, `postgres`); [`Client::stats`] returns the same figures for
//! this client.
//!
//! | metric | kind | meaning |
//! |---|---|---|
//! | `auditbridge_client_published_events_total` | counter | acknowledged by JetStream (directly or from the store), duplicates excluded |
//! | `auditbridge_client_buffered_events_total` | counter | written to the backing store |
//! | `auditbridge_client_buffered_bytes_total` | counter | payload bytes written to the backing store |
//! | `auditbridge_client_drained_events_total` | counter | published from the store and removed from it |
//! | `auditbridge_client_publish_failed_events_total` | counter | publish attempts that failed (the event is kept and retried) |
//! | `auditbridge_client_refused_events_total{reason}` | counter | `record` returned an error: `invalid`, `oversize`, `full`, `closed` |
//! | `auditbridge_client_dead_lettered_events_total` | counter | stored events found corrupt and moved aside |
//! | `auditbridge_client_store_errors_total` | counter | failed store operations (retried) |
//! | `auditbridge_client_store_events` / `_store_bytes` | gauge | held by the store now (file: bytes on disk) |
//! | `auditbridge_client_queue_events` | gauge | waiting in the in-process queue |
//! | `auditbridge_client_buffering` | gauge | 1 while events go to the store rather than straight to NATS |

mod builder;
mod config;
mod error;
mod pump;
mod store;

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use auditbridge_config::ExposeSecret as _;
pub use auditbridge_event::{Actor, Event, Invalid, InvalidKind, Outcome, Target, Uuid};
use metrics::counter;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use crate::builder::EventBuilder;
pub use crate::config::{
    FileParams, Fsync, MemoryParams, OnFull, PostgresParams, STORE_ENV, StoreConfig,
};
pub use crate::error::{
    Backpressure, BuildError, CloseError, ConfigError, ConnectError, FlushTimeout, RecordError,
    StoreError,
};
use crate::pump::{Counts, Finished, Progress, Pump, Settings, Shared};
use crate::store::{Pending, Store};

/// How long [`ClientBuilder::connect`] waits for NATS before going on without it.
const CONNECT_WAIT: Duration = Duration::from_millis(500);

/// The names of the metrics this crate records.
pub mod metric_names {
    pub const PUBLISHED_EVENTS: &str = "auditbridge_client_published_events_total";
    pub const BUFFERED_EVENTS: &str = "auditbridge_client_buffered_events_total";
    pub const BUFFERED_BYTES: &str = "auditbridge_client_buffered_bytes_total";
    pub const DRAINED_EVENTS: &str = "auditbridge_client_drained_events_total";
    pub const PUBLISH_FAILED_EVENTS: &str = "auditbridge_client_publish_failed_events_total";
    pub const REFUSED_EVENTS: &str = "auditbridge_client_refused_events_total";
    pub const DEAD_LETTERED_EVENTS: &str = "auditbridge_client_dead_lettered_events_total";
    pub const STORE_ERRORS: &str = "auditbridge_client_store_errors_total";
    pub const STORE_EVENTS: &str = "auditbridge_client_store_events";
    pub const STORE_BYTES: &str = "auditbridge_client_store_bytes";
    pub const QUEUE_EVENTS: &str = "auditbridge_client_queue_events";
    pub const BUFFERING: &str = "auditbridge_client_buffering";
}

/// This client's figures since it was built (see the metrics table in the crate docs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub accepted_events: u64,
    pub published_events: u64,
    pub buffered_events: u64,
    pub buffered_bytes: u64,
    pub drained_events: u64,
    pub publish_failed_events: u64,
    pub refused_events: u64,
    pub dead_lettered_events: u64,
    pub store_errors: u64,
    pub store_events: u64,
    pub store_bytes: u64,
    pub queue_events: u64,
}

/// Configures and connects a [`Client`]. Its `Debug` shows URLs without their passwords or
/// tokens.
#[derive(Clone)]
#[must_use]
pub struct ClientBuilder {
    nats_url: String,
    subject_prefix: String,
    source: Option<String>,
    store: StoreConfig,
    on_full: OnFull,
    queue_capacity: usize,
    max_in_flight: usize,
    drain_batch: usize,
    ack_timeout: Duration,
    spill_after: Duration,
    max_event_bytes: usize,
    name: String,
}

// By hand, so that a password or token in a URL never reaches a log line through `{:?}`.
impl std::fmt::Debug for ClientBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientBuilder")
            .field("nats_url", &auditbridge_config::redact_url(&self.nats_url))
            .field("subject_prefix", &self.subject_prefix)
            .field("source", &self.source)
            .field("store", &self.store)
            .field("on_full", &self.on_full)
            .field("queue_capacity", &self.queue_capacity)
            .field("max_in_flight", &self.max_in_flight)
            .field("drain_batch", &self.drain_batch)
            .field("ack_timeout", &self.ack_timeout)
            .field("spill_after", &self.spill_after)
            .field("max_event_bytes", &self.max_event_bytes)
            .field("name", &self.name)
            .finish()
    }
}

impl Default for ClientBuilder {
    fn default() -> Self {
        ClientBuilder {
            nats_url: "nats://127.0.0.1:4222".into(),
            subject_prefix: "audit".into(),
            source: None,
            store: StoreConfig::default(),
            on_full: OnFull::default(),
            queue_capacity: 8192,
            max_in_flight: 4096,
            drain_batch: 512,
            ack_timeout: Duration::from_secs(5),
            spill_after: Duration::from_secs(1),
            max_event_bytes: auditbridge_event::DEFAULT_MAX_EVENT_BYTES,
            name: "auditbridge-client".into(),
        }
    }
}

impl ClientBuilder {
    /// NATS server URL(s), comma-separated (default `nats://127.0.0.1:4222`, or
    /// `AUDITBRIDGE_NATS_URL` with [`ClientBuilder::from_env`]).
    pub fn nats_url(mut self, url: impl Into<String>) -> Self {
        self.nats_url = url.into();
        self
    }

    /// The subject prefix (default `audit`): events go to `<prefix>.<tenant>.<action>`.
    pub fn subject_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.subject_prefix = prefix.into();
        self
    }

    /// The `source` that [`Client::event`] puts in every event: this service's name.
    pub fn source(mut self, source: impl Into<String>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// The backing store (default: `memory` with its default limits).
    pub fn store(mut self, store: StoreConfig) -> Self {
        self.store = store;
        self
    }

    /// Uses the store in `AUDITBRIDGE_CLIENT_STORE` if it is set; keeps the current one
    /// otherwise.
    pub fn store_from_env(mut self) -> Result<Self, ConfigError> {
        if let Some(store) = StoreConfig::from_env()? {
            self.store = store;
        }
        Ok(self)
    }

    /// `AUDITBRIDGE_NATS_URL`, `AUDITBRIDGE_SUBJECT_PREFIX` and `AUDITBRIDGE_CLIENT_STORE`,
    /// where set, over the defaults.
    pub fn from_env() -> Result<Self, ConfigError> {
        let mut builder = ClientBuilder::default();
        if let Ok(url) = std::env::var("AUDITBRIDGE_NATS_URL") {
            builder.nats_url = url;
        }
        if let Ok(prefix) = std::env::var("AUDITBRIDGE_SUBJECT_PREFIX") {
            builder.subject_prefix = prefix;
        }
        builder.store_from_env()
    }

    /// What `record` does when the client is full (default [`OnFull::Error`]).
    pub fn on_full(mut self, on_full: OnFull) -> Self {
        self.on_full = on_full;
        self
    }

    /// Events the in-process queue holds (default 8192). It absorbs bursts while the
    /// background task publishes or writes to the store.
    pub fn queue_capacity(mut self, events: usize) -> Self {
        self.queue_capacity = events;
        self
    }

    /// Events awaiting their JetStream ack at once (default 4096; in the bench, 1024 gave
    /// about 59k events/s and 4096 about 90k).
    pub fn max_in_flight(mut self, events: usize) -> Self {
        self.max_in_flight = events;
        self
    }

    /// Events published from the store per batch (default 512).
    pub fn drain_batch(mut self, events: usize) -> Self {
        self.drain_batch = events;
        self
    }

    /// How long a JetStream ack is awaited before the publish counts as failed (default 5 s).
    pub fn ack_timeout(mut self, timeout: Duration) -> Self {
        self.ack_timeout = timeout;
        self
    }

    /// "Slow": once the oldest ack has been awaited this long, new events go to the store
    /// (default 1 s).
    pub fn spill_after(mut self, after: Duration) -> Self {
        self.spill_after = after;
        self
    }

    /// The largest serialized event accepted (default 64 KiB, the worker's default).
    pub fn max_event_bytes(mut self, bytes: usize) -> Self {
        self.max_event_bytes = bytes;
        self
    }

    /// The NATS connection name (default `auditbridge-client`).
    pub fn connection_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    fn check(&self) -> Result<(), ConfigError> {
        let prefix = &self.subject_prefix;
        if prefix.is_empty()
            || prefix
                .chars()
                .any(|c| c.is_whitespace() || c == '*' || c == '>')
            || prefix.split('.').any(str::is_empty)
        {
            return Err(ConfigError::new(
                "subject_prefix",
                format!(
                    "expected dot-separated tokens without spaces or wildcards, got {prefix:?}"
                ),
            ));
        }
        for (name, v) in [
            ("queue_capacity", self.queue_capacity),
            ("max_in_flight", self.max_in_flight),
            ("drain_batch", self.drain_batch),
            ("max_event_bytes", self.max_event_bytes),
        ] {
            if v == 0 {
                return Err(ConfigError::new(name, "must be greater than 0"));
            }
        }
        self.store.check()
    }

    /// Opens the store and starts the background task. NATS may be unreachable: after
    /// waiting at most half a second for it, the client goes on connecting (and later
    /// reconnecting) in the background and buffers meanwhile. Must be called within a tokio
    /// runtime.
    pub async fn connect(self) -> Result<Client, ConnectError> {
        self.check()?;
        let kind = self.store.kind();
        let store = Store::open(&self.store, &self.subject_prefix, self.max_event_bytes)
            .await
            .map_err(|source| ConnectError::Store {
                store: kind,
                source,
            })?;
        // Credentials go in as options, not in the URLs: the NATS client ignores them there
        // and writes the URLs it connects to into its debug log.
        let (servers, auth) = auditbridge_config::nats_credentials(&self.nats_url)
            .map_err(|e| ConfigError::new("nats_url", e))?;
        let options = match auth {
            Some(auditbridge_config::NatsAuth::UserPassword { user, password }) => {
                async_nats::ConnectOptions::new()
                    .user_and_password(user, password.expose_secret().to_owned())
            }
            Some(auditbridge_config::NatsAuth::Token(token)) => {
                async_nats::ConnectOptions::new().token(token.expose_secret().to_owned())
            }
            None => async_nats::ConnectOptions::new(),
        };
        let nats = options
            .name(&self.name)
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connection_timeout(Duration::from_secs(2))
            .reconnect_delay_callback(|attempts| {
                Duration::from_millis(50 * 2u64.pow(attempts.min(6) as u32))
                    .min(Duration::from_secs(2))
            })
            .event_callback(|event| async move {
                tracing::debug!(event = %event, message = "Audit client: NATS connection event.");
            })
            .connect(servers.as_str())
            .await?;
        // Give a reachable NATS a moment, so a fresh client does not buffer its first events
        // for nothing; an unreachable one costs at most this wait, never an error.
        let connected = async {
            while nats.connection_state() != async_nats::connection::State::Connected {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        let _ = tokio::time::timeout(CONNECT_WAIT, connected).await;
        let js = jetstream::ContextBuilder::new()
            .timeout(self.ack_timeout)
            // Acks of abandoned publishes hold a permit until they time out.
            .max_ack_inflight(4 * (self.max_in_flight + self.drain_batch))
            .build(nats.clone());

        let (tx, rx) = mpsc::channel(self.queue_capacity);
        let shared = Arc::new(Shared {
            closed: AtomicBool::new(false),
            pressure: AtomicU8::new(Backpressure::Busy.as_u8()),
            accepted: AtomicU64::new(0),
            counts: Counts::default(),
            progress: watch::Sender::new(Progress::default()),
            close: CancellationToken::new(),
            close_deadline: Mutex::new(None),
            store_kind: kind,
        });
        let settings = Settings {
            max_in_flight: self.max_in_flight,
            drain_batch: self.drain_batch,
            ack_timeout: self.ack_timeout,
            spill_after: self.spill_after,
            drop_deadline: Duration::from_secs(5),
        };
        let pump = Pump::new(js, nats, rx, store, shared.clone(), settings);
        let task = tokio::spawn(pump.run());
        Ok(Client {
            inner: Arc::new(Inner {
                tx,
                shared,
                prefix: self.subject_prefix,
                source: self.source,
                max_event_bytes: self.max_event_bytes,
                on_full: self.on_full,
                task: Mutex::new(Some(task)),
            }),
        })
    }
}

/// Records audit events. Cheap to clone; every clone feeds the same background task.
///
/// Call [`Client::close`] at shutdown. If every handle is dropped instead, the background
/// task still tries for 5 s to publish what it holds and then leaves the rest in the store —
/// if the runtime lets it run that long.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    tx: mpsc::Sender<Pending>,
    shared: Arc<Shared>,
    prefix: String,
    source: Option<String>,
    max_event_bytes: usize,
    on_full: OnFull,
    task: Mutex<Option<JoinHandle<Finished>>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("prefix", &self.inner.prefix)
            .field("store", &self.inner.shared.store_kind)
            .finish_non_exhaustive()
    }
}

impl Client {
    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }

    /// An [`EventBuilder`] with this client's `source` already set.
    pub fn event(&self, tenant: impl Into<String>, action: impl Into<String>) -> EventBuilder {
        let builder = EventBuilder::new(tenant, action);
        match &self.inner.source {
            Some(source) => builder.source(source.clone()),
            None => builder,
        }
    }

    /// Accepts an event for publishing. Validates and serializes it, then hands it to the
    /// background task; it does no I/O and returns at once unless the client is full and
    /// [`OnFull::Wait`] was chosen. `Ok` means the client holds the event: it will be
    /// published, or kept in the backing store until it can be.
    pub async fn record(&self, event: Event) -> Result<(), RecordError> {
        let result = self.enqueue(event).await;
        if let Err(e) = &result {
            let reason = match e {
                RecordError::Invalid(_) => "invalid",
                RecordError::Oversize { .. } => "oversize",
                RecordError::Full { .. } => "full",
                RecordError::Closed => "closed",
                RecordError::Encode(_) => "invalid",
            };
            self.inner
                .shared
                .counts
                .refused
                .fetch_add(1, Ordering::Relaxed);
            counter!(metric_names::REFUSED_EVENTS, "store" => self.inner.shared.store_kind, "reason" => reason)
                .increment(1);
        }
        result
    }

    async fn enqueue(&self, event: Event) -> Result<(), RecordError> {
        let inner = &*self.inner;
        if inner.shared.closed.load(Ordering::Relaxed) {
            return Err(RecordError::Closed);
        }
        event.validate()?;
        // Most events fit; one allocation instead of a series of doublings.
        let mut payload = Vec::with_capacity(1024);
        serde_json::to_writer(&mut payload, &event).map_err(RecordError::Encode)?;
        if payload.len() > inner.max_event_bytes {
            return Err(RecordError::Oversize {
                bytes: payload.len(),
                limit: inner.max_event_bytes,
            });
        }
        let pending = Pending {
            id: event.id,
            msg_id: event.message_id(),
            subject: event.subject(&inner.prefix),
            payload: payload.into(),
        };
        match inner.tx.try_send(pending) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(RecordError::Closed),
            Err(mpsc::error::TrySendError::Full(pending)) => match inner.on_full {
                OnFull::Error => return Err(self.full(Duration::ZERO)),
                OnFull::Wait(limit) => {
                    let started = Instant::now();
                    match tokio::time::timeout(limit, inner.tx.send(pending)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(_)) => return Err(RecordError::Closed),
                        Err(_) => return Err(self.full(started.elapsed())),
                    }
                }
            },
        }
        inner.shared.accepted.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn full(&self, waited: Duration) -> RecordError {
        RecordError::Full {
            cause: Backpressure::from_u8(self.inner.shared.pressure.load(Ordering::Relaxed)),
            waited,
        }
    }

    /// Waits until every event accepted before this call has been acknowledged by JetStream
    /// (and the store is empty), or `timeout` passes.
    pub async fn flush(&self, timeout: Duration) -> Result<(), FlushTimeout> {
        let target = self.inner.shared.accepted.load(Ordering::Relaxed);
        let mut progress = self.inner.shared.progress.subscribe();
        let done = progress.wait_for(|p| p.taken >= target && p.idle);
        match tokio::time::timeout(timeout, done).await {
            Ok(Ok(_)) => Ok(()),
            // The task has ended (closed): nothing more will be published.
            Ok(Err(_)) | Err(_) => Err(FlushTimeout { waited: timeout }),
        }
    }

    /// Stops accepting events, publishes what the client holds until `timeout`, then leaves
    /// the rest in the backing store (where a durable store keeps it for the next run).
    /// `Ok` means everything accepted was acknowledged by JetStream.
    pub async fn close(&self, timeout: Duration) -> Result<(), CloseError> {
        let task = self
            .inner
            .task
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let Some(task) = task else {
            return Err(CloseError::AlreadyClosed);
        };
        let shared = &self.inner.shared;
        shared.closed.store(true, Ordering::Relaxed);
        // Publishing gets most of the time; the rest is for writing leftovers to the store.
        *shared
            .close_deadline
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Instant::now() + timeout.mul_f64(0.8));
        shared.close.cancel();
        let store = shared.store_kind;
        let finished = match task.await {
            Ok(f) => f,
            Err(e) => {
                tracing::error!(error = %e, message = "Audit client: the background task failed.");
                return Err(CloseError::Lost {
                    events: shared.counts.queue_events.load(Ordering::Relaxed),
                    store,
                });
            }
        };
        if finished.lost > 0 {
            return Err(CloseError::Lost {
                events: finished.lost,
                store,
            });
        }
        if finished.in_store > 0 {
            return Err(CloseError::Unpublished {
                events: finished.in_store,
                store,
                durable: finished.durable,
            });
        }
        Ok(())
    }

    /// This client's figures; see [`Stats`].
    pub fn stats(&self) -> Stats {
        let c = &self.inner.shared.counts;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Stats {
            accepted_events: get(&self.inner.shared.accepted),
            published_events: get(&c.published),
            buffered_events: get(&c.buffered),
            buffered_bytes: get(&c.buffered_bytes),
            drained_events: get(&c.drained),
            publish_failed_events: get(&c.publish_failed),
            refused_events: get(&c.refused),
            dead_lettered_events: get(&c.dead_lettered),
            store_errors: get(&c.store_errors),
            store_events: get(&c.store_events),
            store_bytes: get(&c.store_bytes),
            queue_events: get(&c.queue_events),
        }
    }
}
