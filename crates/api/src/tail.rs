//! `GET /v1/events/stream`: the live tail, as Server-Sent Events.
//!
//! **Order.** The tail follows the outbox's commit-safe order, `(tx_id, seq)` below the xmin
//! horizon (ARCHITECTURE.md, "The outbox"), not `occurred_at`: an event that commits late can
//! never appear behind a position a reader already passed. Each SSE `id` is that position, so
//! a reconnect with `Last-Event-ID` resumes exactly after the last event the client saw.
//!
//! **One reader for all clients.** A single [`Hub`] task reads every new row once and
//! broadcasts batches; each client filters them in memory. A client first replays from its
//! cursor with its filter in SQL, then switches to the broadcast. The seam holds because the
//! client subscribes *before* its replay starts: the broadcast then carries every row after the
//! hub's position at that moment, which is no later than the replay's horizon, and the client
//! skips rows at or before the last one it sent. No gap, no repeat.
//!
//! **Bounded replays.** A replay reads the outbox order in ranges of at most
//! [`SCAN_POSITIONS`] positions, whatever its filter matches in them, so every statement is
//! short and the client's position moves forward even through ranges with nothing for it
//! (sent as an `id`-only event, a valid `Last-Event-ID`). Each statement takes a turn of the
//! token's database budget ([`crate::budget`]); the hub reads on a connection of its own.
//!
//! **Slow clients.** Each client has a small bounded queue, bounded in events and in bytes
//! ([`CLIENT_BYTES`], and [`ALL_CLIENT_BYTES`] for all clients together; an event's bytes are
//! given back when it is handed to the connection). A client that cannot keep up falls behind
//! the broadcast (whose size is fixed, in batches of at most [`BATCH_BYTES`]), or cannot queue
//! an event for [`SLOW_CLIENT`], and is then disconnected: memory does not grow with a slow
//! reader, and a reader that stopped does not hold its slot. It reconnects with `Last-Event-ID` and replays from the database.
//! If the broadcast is overrun while the client was replaying (our doing, not the client's),
//! the client catches up from the database instead.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use auditbridge_runtime::telemetry::{API_TAIL_CLIENTS, API_TAIL_DISCONNECTS};
use auditbridge_store::{EventFilter, OutboxEvent, Position, Store};
use axum::Router;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::routing::get;
use futures::{Stream, StreamExt as _};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::AppState;
use crate::auth::{Principal, Scope};
use crate::budget::DbBudget;
use crate::error::ApiError;
use crate::params::{self, Endpoint};

/// Rows per read, for the hub and for replays.
const READ_LIMIT: u32 = 500;
/// Positions of the outbox order one replay statement covers at most, whatever its filter
/// matches among them: about 2 ms of index walk, so a statement always ends well within the
/// statement timeout and the replay moves forward by this much each time.
const SCAN_POSITIONS: u32 = 5_000;
/// Batches the broadcast keeps for a client that is behind; with [`READ_LIMIT`] this bounds
/// the hub's memory to about 32k events whatever the number of clients.
const BROADCAST_BATCHES: usize = 64;
/// Events queued per client before it counts as slow.
const CLIENT_QUEUE: usize = 1024;
/// Bytes of events queued per client before it counts as slow: events may be 64 KiB each, so
/// a bound by count alone (1,024 per client, 256 clients) would allow gigabytes. One token's
/// [`MAX_STREAMS_PER_TOKEN`] tails hold at most a quarter of [`ALL_CLIENT_BYTES`], even while
/// they stop reading (their slots last as long as their connections).
const CLIENT_BYTES: usize = 1 << 20;
/// Bytes of events queued for all clients together.
const ALL_CLIENT_BYTES: usize = 64 << 20;
/// Largest broadcast batch in bytes (one larger event travels alone), so the broadcast holds
/// at most [`BROADCAST_BATCHES`] × this, plus one event per batch.
const BATCH_BYTES: usize = 1 << 20;
/// How often the hub looks for new rows when it has caught up.
const POLL: Duration = Duration::from_millis(100);
/// Most live tails open at once.
const MAX_STREAMS: usize = 256;
/// Most live tails one token may hold open, so that one client cannot take every slot.
const MAX_STREAMS_PER_TOKEN: usize = 16;
/// A client whose queue stays full this long (it takes nothing from its socket) is
/// disconnected.
const SLOW_CLIENT: Duration = Duration::from_secs(5);

/// What the hub broadcasts, in commit-safe order.
#[derive(Debug)]
pub(crate) enum Batch {
    /// The next rows after the previous batch.
    Rows(Vec<OutboxEvent>),
    /// The hub moved its position without reading (nobody was listening); a client that sees
    /// this catches up from the database.
    Gap,
}

pub(crate) struct Hub {
    tx: broadcast::Sender<Arc<Batch>>,
    open: AtomicUsize,
    /// Open tails per token name. A `std` mutex: it is held for a map update, never across
    /// an `.await`.
    per_token: std::sync::Mutex<std::collections::HashMap<String, usize>>,
    shutdown: CancellationToken,
    heartbeat: Duration,
    /// Bytes of events queued for all clients ([`ALL_CLIENT_BYTES`]).
    queued_bytes: Arc<Semaphore>,
}

/// The hub's reading task, started by [`crate::Server::run`].
pub(crate) struct HubStart {
    store: Store,
    tx: broadcast::Sender<Arc<Batch>>,
    shutdown: CancellationToken,
}

impl Hub {
    pub(crate) fn new(store: Store, heartbeat: Duration) -> (Hub, HubStart) {
        let (tx, _) = broadcast::channel(BROADCAST_BATCHES);
        let shutdown = CancellationToken::new();
        (
            Hub {
                tx: tx.clone(),
                open: AtomicUsize::new(0),
                per_token: Default::default(),
                shutdown: shutdown.clone(),
                heartbeat,
                queued_bytes: Arc::new(Semaphore::new(ALL_CLIENT_BYTES)),
            },
            HubStart {
                store,
                tx,
                shutdown,
            },
        )
    }
}

impl Hub {
    /// Counts a new tail in, or refuses it when the server or this token has too many.
    fn admit(&self, token: &str) -> Result<(), ApiError> {
        let mut per_token = self.per_token.lock().expect("not poisoned");
        let mine = per_token.entry(token.to_owned()).or_default();
        if *mine >= MAX_STREAMS_PER_TOKEN {
            return Err(ApiError::Unavailable(format!(
                "token {token:?} already has {MAX_STREAMS_PER_TOKEN} live tails open; close one first"
            )));
        }
        if self.open.fetch_add(1, Ordering::SeqCst) >= MAX_STREAMS {
            self.open.fetch_sub(1, Ordering::SeqCst);
            return Err(ApiError::Unavailable(format!(
                "{MAX_STREAMS} live tails are open; try again later"
            )));
        }
        *mine += 1;
        Ok(())
    }

    fn release(&self, token: &str) {
        self.open.fetch_sub(1, Ordering::SeqCst);
        let mut per_token = self.per_token.lock().expect("not poisoned");
        if let Some(n) = per_token.get_mut(token) {
            *n -= 1;
            if *n == 0 {
                per_token.remove(token);
            }
        }
    }
}

impl HubStart {
    /// Follows the trail until `stop`; then ends every open stream.
    pub(crate) async fn run(self, stop: CancellationToken) {
        let HubStart {
            store,
            tx,
            shutdown,
        } = self;
        let _end_streams = shutdown.drop_guard();
        let mut position: Option<Position> = None;
        let mut failures = 0u32;
        loop {
            let step = async {
                let Some(pos) = &position else {
                    // The first position (at start, or after the database came back) is not
                    // read row by row: anyone already subscribed must catch up from the
                    // database, or rows between their replay and this head would be lost.
                    position = Some(store.tail_head().await?);
                    let _ = tx.send(Arc::new(Batch::Gap));
                    return Ok::<bool, auditbridge_store::StoreError>(false);
                };
                if tx.receiver_count() == 0 {
                    // Nobody listens: keep up with the head without reading rows, and tell
                    // anyone who subscribes meanwhile to catch up from the database.
                    let head = store.tail_head().await?;
                    if key(&head) > key(pos) {
                        position = Some(head);
                        let _ = tx.send(Arc::new(Batch::Gap));
                    }
                    return Ok(false);
                }
                let rows = store.tail(pos, None, READ_LIMIT).await?;
                let full = rows.len() == READ_LIMIT as usize;
                if let Some(last) = rows.last() {
                    position = Some(last.position.clone());
                    for batch in by_bytes(rows) {
                        let _ = tx.send(Arc::new(Batch::Rows(batch)));
                    }
                }
                Ok(full)
            };
            let more = match step.await {
                Ok(more) => {
                    failures = 0;
                    more
                }
                Err(e) => {
                    failures += 1;
                    if failures == 1 || failures.is_multiple_of(50) {
                        tracing::warn!(error = %e, failures, message = "Live tail cannot read the trail; retrying.");
                    }
                    false
                }
            };
            if !more {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(POLL) => {}
                }
            } else if stop.is_cancelled() {
                return;
            }
        }
    }
}

/// Cuts rows into batches of at most [`BATCH_BYTES`] (an event larger than that alone).
fn by_bytes(rows: Vec<OutboxEvent>) -> Vec<Vec<OutboxEvent>> {
    let mut batches = Vec::new();
    let mut batch = Vec::new();
    let mut bytes = 0;
    for row in rows {
        if !batch.is_empty() && bytes + row.event.json.len() > BATCH_BYTES {
            batches.push(std::mem::take(&mut batch));
            bytes = 0;
        }
        bytes += row.event.json.len();
        batch.push(row);
    }
    if !batch.is_empty() {
        batches.push(batch);
    }
    batches
}

/// Positions compare as (generation, xid, seq); the xid travels as text.
fn key(p: &Position) -> (i32, u64, i64) {
    p.key()
}

/// The SSE id of a position: `<tx_id>.<seq>`, prefixed with `<generation>.` once the trail
/// was rebased (ARCHITECTURE.md, "The outbox"), so ids sent before stay valid.
fn position_id(p: &Position) -> String {
    if p.generation == 0 {
        format!("{}.{}", p.tx_id, p.seq)
    } else {
        format!("{}.{}.{}", p.generation, p.tx_id, p.seq)
    }
}

fn parse_position(s: &str, param: &str) -> Result<Position, ApiError> {
    let bad = || {
        ApiError::bad(
            param,
            "not an event id of this stream (expected the SSE id as sent)",
        )
    };
    let parts: Vec<&str> = s.trim().split('.').collect();
    let (generation, tx, seq) = match parts.as_slice() {
        [tx, seq] => ("0", *tx, *seq),
        [generation, tx, seq] => (*generation, *tx, *seq),
        _ => return Err(bad()),
    };
    let generation: i32 = generation
        .parse()
        .ok()
        .filter(|g| *g >= 0)
        .ok_or_else(bad)?;
    let tx: u64 = tx.parse().map_err(|_| bad())?;
    let seq: i64 = seq.parse().map_err(|_| bad())?;
    Ok(Position::new(generation, tx.to_string(), seq))
}

pub(crate) fn routes() -> Router<AppState> {
    Router::new().route("/v1/events/stream", get(stream))
}

async fn stream(
    State(state): State<AppState>,
    principal: Principal,
    headers: HeaderMap,
    Query(pairs): Query<Vec<(String, String)>>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    principal.require(Scope::Read)?;
    let parsed = params::parse(Endpoint::Stream, &pairs, &principal)?;
    let resume = match headers.get("last-event-id") {
        Some(v) => Some(parse_position(
            v.to_str().unwrap_or_default(),
            "Last-Event-ID",
        )?),
        None => parsed
            .cursor
            .as_deref()
            .map(|c| parse_position(c, "cursor"))
            .transpose()?,
    };
    let hub = state.tail.clone();
    hub.admit(&principal.name)?;
    metrics::gauge!(API_TAIL_CLIENTS).increment(1.0);
    // The slot is the response's, not `follow`'s: it is given back when the connection is
    // dropped. A client that stops reading keeps its queued events (and their bytes) for as
    // long as its connection lives, so if `follow` gave the slot back when it gave up, one
    // token could open tail after tail, each holding its bytes, and take the whole budget.
    let slot = Slot {
        hub: hub.clone(),
        token: principal.name.clone(),
    };
    // Subscribe before anything is read: the seam depends on it (module docs).
    let live = hub.tx.subscribe();
    let (tx, rx) = mpsc::channel(CLIENT_QUEUE);
    let out = Out {
        tx,
        mine: Arc::new(Semaphore::new(CLIENT_BYTES)),
        all: hub.queued_bytes.clone(),
    };
    let heartbeat = hub.heartbeat;
    tokio::spawn(follow(
        Reader {
            store: state.store,
            budget: state.budget,
            token: principal.name,
        },
        parsed.filter,
        resume,
        live,
        out,
        hub,
    ));
    // An event's bytes are given back as it is handed to the connection.
    let events = ReceiverStream::new(rx).map(move |q: Queued| {
        let _slot = &slot;
        Ok::<_, Infallible>(q.event)
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(heartbeat)))
}

/// A live tail's place among [`MAX_STREAMS`] and its token's [`MAX_STREAMS_PER_TOKEN`], held by
/// the response stream and given back when it is dropped.
struct Slot {
    hub: Arc<Hub>,
    token: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.hub.release(&self.token);
        metrics::gauge!(API_TAIL_CLIENTS).decrement(1.0);
    }
}

/// Why a client's stream ended.
enum End {
    /// The client went away, or the server is stopping.
    Closed,
    /// The client fell behind the broadcast.
    TooSlow,
    Database,
}

/// An event in a client's queue, holding its share of the byte budgets until it is sent.
struct Queued {
    event: SseEvent,
    _bytes: (OwnedSemaphorePermit, OwnedSemaphorePermit),
}

/// A client's queue and its byte budgets.
struct Out {
    tx: mpsc::Sender<Queued>,
    /// This client's bytes ([`CLIENT_BYTES`]).
    mine: Arc<Semaphore>,
    /// Every client's bytes ([`ALL_CLIENT_BYTES`]).
    all: Arc<Semaphore>,
}

impl Out {
    async fn closed(&self) {
        self.tx.closed().await;
    }
}

/// A client's way to the database: the request pool, one statement at a time within its
/// token's budget ([`crate::budget`]).
struct Reader {
    store: Store,
    budget: Arc<DbBudget>,
    token: String,
}

async fn follow(
    reader: Reader,
    filter: EventFilter,
    resume: Option<Position>,
    mut live: broadcast::Receiver<Arc<Batch>>,
    out: Out,
    hub: Arc<Hub>,
) {
    let end = async {
        let mut last = match resume {
            Some(p) => p,
            None => {
                let _turn = reader.budget.tail(&reader.token).await;
                reader.store.tail_head().await.map_err(|_| End::Database)?
            }
        };
        catch_up(&reader, &filter, &mut last, &out).await?;
        let ready = SseEvent::default()
            .event("caught-up")
            .data(format!("{{\"position\":\"{}\"}}", position_id(&last)));
        deliver(&out, ready, 0).await?;
        // Whether we just read from the database. Falling behind the broadcast then is our
        // doing, and the cure is another read; falling behind while following live means the
        // client does not take events as fast as they come.
        let mut replayed = true;
        loop {
            let batch = tokio::select! {
                _ = out.closed() => return Err(End::Closed),
                _ = hub.shutdown.cancelled() => return Err(End::Closed),
                b = live.recv() => b,
            };
            match batch {
                Ok(batch) => match batch.as_ref() {
                    Batch::Rows(rows) => {
                        let floor = key(&last);
                        for row in rows {
                            if key(&row.position) > floor && filter.matches(&row.event) {
                                send(&out, row).await?;
                                last = row.position.clone();
                            }
                        }
                        replayed = false;
                    }
                    Batch::Gap => {
                        catch_up(&reader, &filter, &mut last, &out).await?;
                        replayed = true;
                    }
                },
                Err(broadcast::error::RecvError::Lagged(_)) if replayed => {
                    catch_up(&reader, &filter, &mut last, &out).await?;
                }
                Err(broadcast::error::RecvError::Lagged(_)) => return Err(End::TooSlow),
                Err(broadcast::error::RecvError::Closed) => return Err(End::Closed),
            }
        }
        #[allow(unreachable_code)]
        Ok::<(), End>(())
    };
    let result = end.await;
    let token_name = reader.token;
    match result {
        Err(End::TooSlow) => {
            metrics::counter!(API_TAIL_DISCONNECTS, "reason" => "slow").increment(1);
            tracing::info!(token = %token_name, message = "Disconnected a live tail that could not keep up; it can resume with Last-Event-ID.");
        }
        Err(End::Database) => {
            metrics::counter!(API_TAIL_DISCONNECTS, "reason" => "database").increment(1);
            tracing::warn!(token = %token_name, message = "Ended a live tail: the database cannot answer.");
        }
        _ => {}
    }
}

/// Sends every matching event after `last` from the database, up to the horizon, reading
/// the outbox order in ranges of at most [`SCAN_POSITIONS`] (`Store::tail_scan`). `last`
/// moves to the end of each range even when nothing in it matched, and a client is sent that
/// position as an event with an `id` and no data (an `EventSource` updates its
/// `Last-Event-ID` from it and dispatches nothing), so a client that reconnects resumes
/// after what was read for it, not at the same old place.
async fn catch_up(
    reader: &Reader,
    filter: &EventFilter,
    last: &mut Position,
    out: &Out,
) -> Result<(), End> {
    loop {
        let scan = {
            let _turn = reader.budget.tail(&reader.token).await;
            reader
                .store
                .tail_scan(last, filter, READ_LIMIT, SCAN_POSITIONS)
                .await
                .map_err(|_| End::Database)?
        };
        for row in &scan.rows {
            send(out, row).await?;
            *last = row.position.clone();
        }
        if let Some(to) = scan.scanned_to
            && key(&to) > key(last)
        {
            *last = to;
            if scan.rows.is_empty() {
                deliver(out, SseEvent::default().id(position_id(last)), 0).await?;
            }
        }
        if !scan.more {
            return Ok(());
        }
    }
}

async fn send(out: &Out, row: &OutboxEvent) -> Result<(), End> {
    let event = SseEvent::default()
        .id(position_id(&row.position))
        .event("audit")
        .data(&row.event.json);
    deliver(out, event, row.event.json.len()).await
}

/// Queues one event of about `bytes` for the client; a client that cannot queue it for
/// [`SLOW_CLIENT`] (its queue or its byte budget full, or every client's) is too slow.
async fn deliver(out: &Out, event: SseEvent, bytes: usize) -> Result<(), End> {
    // The SSE framing (id, event name) on top of the data; at most the whole budget, so one
    // event larger than it still goes through alone.
    let n = u32::try_from((bytes + 64).min(CLIENT_BYTES)).unwrap_or(u32::MAX);
    let deadline = tokio::time::Instant::now() + SLOW_CLIENT;
    let acquire = async {
        let mine = out.mine.clone().acquire_many_owned(n).await;
        let all = out.all.clone().acquire_many_owned(n).await;
        (mine, all)
    };
    let (mine, all) = match tokio::time::timeout_at(deadline, acquire).await {
        Ok((Ok(mine), Ok(all))) => (mine, all),
        Ok(_) => return Err(End::Closed),
        Err(_) => return Err(End::TooSlow),
    };
    let queued = Queued {
        event,
        _bytes: (mine, all),
    };
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    match out.tx.send_timeout(queued, left).await {
        Ok(()) => Ok(()),
        Err(mpsc::error::SendTimeoutError::Timeout(_)) => Err(End::TooSlow),
        Err(mpsc::error::SendTimeoutError::Closed(_)) => Err(End::Closed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_compare_numerically_and_round_trip() {
        let a = Position::new(0, "9999", 5);
        let b = Position::new(0, "10000", 1);
        assert!(key(&b) > key(&a));
        assert_eq!(parse_position(&position_id(&b), "cursor").unwrap(), b);
        assert_eq!(position_id(&b), "10000.1");
        // A later generation sorts after every earlier position, whatever its xid.
        let c = Position::new(1, "700", 1);
        assert!(key(&c) > key(&b));
        assert_eq!(position_id(&c), "1.700.1");
        assert_eq!(parse_position(&position_id(&c), "cursor").unwrap(), c);
        assert!(parse_position("abc", "cursor").is_err());
        assert!(parse_position("1.x", "cursor").is_err());
        assert!(parse_position("-1.2.3", "cursor").is_err());
        assert!(parse_position("1.2.3.4", "cursor").is_err());
    }
}
