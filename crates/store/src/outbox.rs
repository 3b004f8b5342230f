//! The outbox: `audit_events` read in commit-safe order, and per-destination cursors and
//! leases in `destinations`.
//!
//! Why commit-safe: `seq` is assigned when a row is inserted, not when its transaction
//! commits, so concurrent batches become visible out of order. A reader that moved past seq N
//! could miss an N-1 committed a moment later. Instead rows are read in (`tx_id`, `seq`) order
//! and only from transactions older than the oldest transaction still running
//! (`pg_snapshot_xmin`): those have all finished, and every transaction that has not finished
//! yet — including any that will later commit rows — has a `tx_id` at or above that horizon,
//! so above any cursor a reader can have reached. Nothing can appear behind a cursor.
//!
//! **Generations.** `tx_id` values belong to the cluster that wrote them. A trail moved to
//! another cluster (`pg_dump` / `pg_restore`) keeps them, and the new cluster's ids may be far
//! lower: its rows would sort behind every cursor and the moved rows would stay above its
//! horizon (the outbox freezes). [`Store::rebase_outbox`] then starts a new *generation*: the
//! order is (generation, `tx_id`, `seq`), and a row's generation follows from its `seq`, which
//! keeps rising across a restore. Every row of an earlier generation is committed (nothing can
//! be added to it any more, see `rebase_outbox`), so earlier generations are read without the
//! horizon; the current one is read below it, as above.

use std::time::Duration;

use time::OffsetDateTime;

use sqlx::FromRow as _;

use crate::stored::{OutboxEvent, OutboxRecord, stored_columns};
use crate::{Store, StoreError};

/// The channel the writer notifies on commit, so relays wake without polling.
pub const NOTIFY_CHANNEL: &str = "auditbridge_events";

/// A place in the commit-safe order (`generation`, `tx_id`, `seq`). `tx_id` is the `xid8` as
/// text (sqlx has no type for it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    /// The outbox generation: 0 until the trail is moved to another cluster and rebased.
    pub generation: i32,
    pub tx_id: String,
    pub seq: i64,
}

impl Position {
    /// Before every event.
    pub fn start() -> Position {
        Position::new(0, "0", 0)
    }

    pub fn new(generation: i32, tx_id: impl Into<String>, seq: i64) -> Position {
        Position {
            generation,
            tx_id: tx_id.into(),
            seq,
        }
    }

    /// What positions are ordered by: the xid compared as a number, not as text.
    pub fn key(&self) -> (i32, u64, i64) {
        (self.generation, self.tx_id.parse().unwrap_or(0), self.seq)
    }
}

/// One generation of the outbox order: the rows with `first_seq <= seq < end_seq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generation {
    pub generation: i32,
    pub first_seq: i64,
    /// Where the next generation starts; `None` for the current one.
    pub end_seq: Option<i64>,
    /// The highest `tx_id` stored when it began (`None` for the first).
    pub above_tx: Option<String>,
}

/// Whether the outbox order can go on in this cluster (see [`Store::outbox_health`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxHealth {
    pub generation: i32,
    /// The cluster's next transaction id.
    pub next_xid: String,
    /// The highest `tx_id` of the current generation at or above `next_xid`, if any: a row
    /// written by another cluster.
    pub foreign_tx: Option<String>,
    /// Destinations whose cursor lies at or above `next_xid`.
    pub cursors_ahead: Vec<String>,
}

impl OutboxHealth {
    /// True when the trail came from another cluster whose transaction ids were higher: until
    /// `auditbridge outbox rebase` runs, nothing new is relayed or tailed.
    pub fn needs_rebase(&self) -> bool {
        self.foreign_tx.is_some() || !self.cursors_ahead.is_empty()
    }

    /// What to tell an operator.
    pub fn advice(&self) -> String {
        format!(
            "the outbox holds positions from another cluster (highest stored tx_id {}, this \
             cluster's next is {}{}): relays and live tails receive nothing new until \
             `auditbridge outbox rebase` runs (safe while workers run; it makes the outbox \
             order continue after every stored event)",
            self.foreign_tx.as_deref().unwrap_or("-"),
            self.next_xid,
            if self.cursors_ahead.is_empty() {
                String::new()
            } else {
                format!("; cursors ahead: {}", self.cursors_ahead.join(", "))
            }
        )
    }
}

/// What [`Store::rebase_outbox`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rebase {
    /// The outbox order is intact; nothing changed.
    NotNeeded,
    /// A new generation starts at `first_seq`.
    Rebased {
        generation: i32,
        first_seq: i64,
        reason: String,
    },
}

/// Where a new destination's cursor starts.
#[derive(Debug, Clone, PartialEq)]
pub enum StartAt {
    Now,
    Earliest,
    At(OffsetDateTime),
}

/// A destination's row, for status and for the relay that holds its lease.
#[derive(Debug, Clone, PartialEq)]
pub struct DestinationState {
    pub name: String,
    pub kind: String,
    pub cursor: Position,
    pub lease_holder: Option<String>,
    pub lease_expires_at: Option<OffsetDateTime>,
    pub delivered_total: i64,
    pub skipped_total: i64,
    pub last_delivered_at: Option<OffsetDateTime>,
    pub last_error: Option<String>,
    pub last_error_at: Option<OffsetDateTime>,
    pub failing: bool,
}

/// Events after a cursor (before any filter) and the age of the oldest.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backlog {
    pub events: i64,
    /// False when `events` is an estimate (backlogs over [`EXACT_BACKLOG_UP_TO`]).
    pub exact: bool,
    pub oldest: Option<OffsetDateTime>,
}

/// Backlogs up to this size are counted exactly; larger ones are estimated from `seq`, so
/// that watching a million-event backlog does not cost the database a full count every few
/// seconds while it drains.
pub const EXACT_BACKLOG_UP_TO: i64 = 100_000;

const STATE_COLUMNS: &str = "name, type, cursor_tx::text, cursor_seq, lease_holder, \
    lease_expires_at, delivered_total, skipped_total, last_delivered_at, last_error, \
    last_error_at, failing, cursor_gen";

type StateRow = (
    String,
    String,
    String,
    i64,
    Option<String>,
    Option<OffsetDateTime>,
    i64,
    i64,
    Option<OffsetDateTime>,
    Option<String>,
    Option<OffsetDateTime>,
    bool,
    i32,
);

fn state(r: StateRow) -> DestinationState {
    DestinationState {
        name: r.0,
        kind: r.1,
        cursor: Position::new(r.12, r.2, r.3),
        lease_holder: r.4,
        lease_expires_at: r.5,
        delivered_total: r.6,
        skipped_total: r.7,
        last_delivered_at: r.8,
        last_error: r.9,
        last_error_at: r.10,
        failing: r.11,
    }
}

// A rule for every query here: the `xid8` goes out as text (`tx_id::text AS tx_text`) under
// another name. Left as `tx_id::text`, the output column is called `tx_id`, `ORDER BY tx_id`
// then sorts the *text* ("10000" < "9999"), the cursor can step backwards where the xid gains
// a digit, and the index on (tx_id, seq) is not used.

/// The outbox read of the current generation: events after a position, at or above the
/// generation's first `seq`, below the horizon, in commit-safe order. Public so a test can
/// check its plan walks the (tx_id, seq) index.
pub const READ_OUTBOX: &str = concat!(
    "SELECT tx_id::text AS tx_text, seq, ",
    stored_columns!(),
    " FROM audit_events \
    WHERE (tx_id, seq) > ($1::text::xid8, $2) AND seq >= $4 \
      AND tx_id < pg_snapshot_xmin(pg_current_snapshot()) \
    ORDER BY tx_id, seq \
    LIMIT $3"
);

/// The same for an earlier generation: every row of it is committed, so no horizon applies.
const READ_SEALED: &str = concat!(
    "SELECT tx_id::text AS tx_text, seq, ",
    stored_columns!(),
    " FROM audit_events \
    WHERE (tx_id, seq) > ($1::text::xid8, $2) AND seq >= $4 AND seq < $5 \
    ORDER BY tx_id, seq \
    LIMIT $3"
);

/// The newest event of the current generation (rows with `seq >= $1`) a reader can safely
/// have passed right now.
const HEAD: &str = "SELECT tx_id::text AS tx_text, seq FROM audit_events \
    WHERE seq >= $1 AND tx_id < pg_snapshot_xmin(pg_current_snapshot()) \
    ORDER BY tx_id DESC, seq DESC LIMIT 1";

/// Moves a position of an earlier generation whose `seq` lies in a later one (a position
/// taken before `rebase` of a row written in the new cluster) into that generation.
pub(crate) fn normalize(p: &Position, gens: &[Generation]) -> Position {
    let mut p = p.clone();
    while let Some(i) = gens.iter().position(|g| g.generation == p.generation) {
        match (gens[i].end_seq, gens.get(i + 1)) {
            (Some(end), Some(next)) if p.seq >= end => p.generation = next.generation,
            _ => break,
        }
    }
    p
}

impl Store {
    /// Creates the destination's row with its cursor at `start`, unless it exists (then its
    /// progress is kept, whatever `start` says). Returns whether it was created.
    pub async fn register_destination(
        &self,
        name: &str,
        kind: &str,
        start: &StartAt,
    ) -> Result<bool, StoreError> {
        let cursor = self.position_for(start).await?;
        let done = sqlx::query(
            "INSERT INTO destinations (name, type, cursor_tx, cursor_seq, cursor_gen) \
             VALUES ($1, $2, $3::text::xid8, $4, $5) \
             ON CONFLICT (name) DO UPDATE SET type = EXCLUDED.type \
             RETURNING (xmax = 0) AS created",
        )
        .bind(name)
        .bind(kind)
        .bind(&cursor.tx_id)
        .bind(cursor.seq)
        .bind(cursor.generation)
        .fetch_one(&self.pool)
        .await?;
        use sqlx::Row as _;
        Ok(done.try_get::<bool, _>("created")?)
    }

    /// The cursor for a start position: `Now` is the current head; `Earliest` is before
    /// everything; `At(t)` is just before the first event (in commit-safe order) stored at or
    /// after `t`, so every such event is delivered (a few stored just before `t` may be too),
    /// but never past the head: a cursor above the horizon could pass an event whose
    /// transaction is still running.
    pub(crate) async fn position_for(&self, start: &StartAt) -> Result<Position, StoreError> {
        let gens = self.generations().await?;
        let head = self.head(&gens).await?;
        let t = match start {
            StartAt::Earliest => return Ok(Position::start()),
            StartAt::Now => return Ok(head),
            StartAt::At(t) => t,
        };
        // The first event stored at or after `t`, generation by generation (a rare operator
        // command: `received_at` has no index).
        for g in &gens {
            let first: Option<(String, i64)> = sqlx::query_as(
                "SELECT tx_id::text AS tx_text, seq FROM audit_events \
                 WHERE received_at >= $1 AND seq >= $2 AND ($3::bigint IS NULL OR seq < $3) \
                 ORDER BY tx_id, seq LIMIT 1",
            )
            .bind(t)
            .bind(g.first_seq)
            .bind(g.end_seq)
            .fetch_optional(&self.pool)
            .await?;
            if let Some((tx, seq)) = first {
                let before_first = Position::new(g.generation, tx, seq - 1);
                // Capped at the head: the first event at or after `t` may lie above the
                // horizon, behind a transaction still running with a lower `tx_id` whose
                // events are from `t` on too. A cursor past it would skip them for good.
                return Ok(if before_first.key() <= head.key() {
                    before_first
                } else {
                    head
                });
            }
        }
        Ok(head)
    }

    /// The generations of the outbox order, oldest first.
    pub async fn generations(&self) -> Result<Vec<Generation>, StoreError> {
        let rows: Vec<(i32, i64, Option<i64>, Option<String>)> = sqlx::query_as(
            "SELECT generation, first_seq, lead(first_seq) OVER (ORDER BY generation), \
                    above_tx::text \
             FROM outbox_generations ORDER BY generation",
        )
        .fetch_all(&self.pool)
        .await?;
        if rows.is_empty() {
            return Ok(vec![Generation {
                generation: 0,
                first_seq: 0,
                end_seq: None,
                above_tx: None,
            }]);
        }
        Ok(rows
            .into_iter()
            .map(|(generation, first_seq, end_seq, above_tx)| Generation {
                generation,
                first_seq,
                end_seq,
                above_tx,
            })
            .collect())
    }

    /// The newest position a commit-safe reader can have passed right now: the newest event
    /// of the current generation below the horizon, or the generation's start.
    pub(crate) async fn head(&self, gens: &[Generation]) -> Result<Position, StoreError> {
        let current = gens.last().expect("at least one generation");
        let found: Option<(String, i64)> = sqlx::query_as(HEAD)
            .bind(current.first_seq)
            .fetch_optional(&self.pool)
            .await?;
        Ok(match found {
            Some((tx, seq)) => Position::new(current.generation, tx, seq),
            None => Position::new(current.generation, "0", 0),
        })
    }

    /// Where a read after `after` starts: the generations, the index of `after`'s (`None`
    /// when the trail has no such generation: nothing lies after it) and `after` normalized.
    /// Readers take earlier generations whole, then the current one below the horizon.
    pub(crate) async fn read_plan(
        &self,
        after: &Position,
    ) -> Result<(Vec<Generation>, Option<usize>, Position), StoreError> {
        let gens = self.generations().await?;
        let from = normalize(after, &gens);
        let i = gens.iter().position(|g| g.generation == from.generation);
        Ok((gens, i, from))
    }

    /// Whether the outbox order can go on in this cluster: stored positions at or above the
    /// cluster's next transaction id came from another cluster (a dump restored elsewhere),
    /// and nothing new would ever sort after them. Cheap: an index range and the cursors.
    pub async fn outbox_health(&self) -> Result<OutboxHealth, StoreError> {
        let gens = self.generations().await?;
        let current = gens.last().expect("at least one generation").clone();
        let next_xid: String =
            sqlx::query_scalar("SELECT pg_snapshot_xmax(pg_current_snapshot())::text")
                .fetch_one(&self.pool)
                .await?;
        // Rows of earlier generations lie at or below `above_tx`; starting above it keeps
        // them out of the scan.
        let next: u64 = next_xid.parse().unwrap_or(0);
        let above: u64 = current
            .above_tx
            .as_deref()
            .and_then(|a| a.parse().ok())
            .map_or(0, |a: u64| a + 1);
        let from = next.max(above).to_string();
        let foreign_tx: Option<String> = sqlx::query_scalar(
            "SELECT tx_id::text AS tx_text FROM audit_events \
             WHERE tx_id >= $1::text::xid8 AND seq >= $2 ORDER BY tx_id DESC, seq DESC LIMIT 1",
        )
        .bind(&from)
        .bind(current.first_seq)
        .fetch_optional(&self.pool)
        .await?;
        let cursors_ahead: Vec<String> = sqlx::query_scalar(
            "SELECT name FROM destinations \
             WHERE cursor_tx >= $1::text::xid8 AND (cursor_gen = $2 OR cursor_seq >= $3) \
             ORDER BY name",
        )
        .bind(&next_xid)
        .bind(current.generation)
        .bind(current.first_seq)
        .fetch_all(&self.pool)
        .await?;
        Ok(OutboxHealth {
            generation: current.generation,
            next_xid,
            foreign_tx,
            cursors_ahead,
        })
    }

    /// Starts a new outbox generation when the trail holds positions from another cluster
    /// (see [`Store::outbox_health`]); does nothing otherwise.
    ///
    /// Why the order then continues correctly: the transaction locks `audit_events` in SHARE
    /// mode, which waits for every transaction that inserted into it to end and holds new
    /// inserts until the commit. Under the lock it takes its own xid `N`: every row this
    /// cluster wrote has a lower `tx_id`, so the rows at or above `N` came from elsewhere,
    /// and their highest `seq` `M` (and that of any cursor there) bounds the moved part of
    /// the current generation. The new generation starts at `M + 1`. Every row below that
    /// is committed, and no row can be added below it (the identity only rises, and it was
    /// restored at or above every moved row's `seq`), so readers take the old generation
    /// whole, then the new one below the horizon. Every row this cluster wrote before the
    /// rebase has a `seq` above every moved row's, so it is in the new generation, after
    /// every cursor: delivered, not skipped. Moved rows written after `M` by transactions
    /// with lower ids in the old cluster (concurrent batches) land in the new generation too
    /// and may be delivered again (at least once, never a gap).
    pub async fn rebase_outbox(&self) -> Result<Rebase, StoreError> {
        let mut tx = self.pool.begin().await?;
        // Writers queue behind a waiting lock: give up rather than stall ingest for long.
        sqlx::query("SET LOCAL lock_timeout = '10s'")
            .execute(&mut *tx)
            .await?;
        // One rebase at a time.
        sqlx::query("LOCK TABLE outbox_generations IN EXCLUSIVE MODE")
            .execute(&mut *tx)
            .await?;
        sqlx::query("LOCK TABLE audit_events IN SHARE MODE")
            .execute(&mut *tx)
            .await?;
        let n: String = sqlx::query_scalar("SELECT pg_current_xact_id()::text")
            .fetch_one(&mut *tx)
            .await?;
        let (generation, first_seq): (i32, i64) = sqlx::query_as(
            "SELECT generation, first_seq FROM outbox_generations \
             ORDER BY generation DESC LIMIT 1",
        )
        .fetch_optional(&mut *tx)
        .await?
        .unwrap_or((0, 0));
        let (moved_seq, highest): (Option<i64>, Option<String>) = sqlx::query_as(
            "SELECT (SELECT max(seq) FROM audit_events \
                     WHERE tx_id >= $1::text::xid8 AND seq >= $2), \
                    (SELECT max(tx_id)::text FROM audit_events)",
        )
        .bind(&n)
        .bind(first_seq)
        .fetch_one(&mut *tx)
        .await?;
        let cursor_seq: Option<i64> = sqlx::query_scalar(
            "SELECT max(cursor_seq) FROM destinations \
             WHERE cursor_tx >= $1::text::xid8 AND (cursor_gen = $2 OR cursor_seq >= $3)",
        )
        .bind(&n)
        .bind(generation)
        .bind(first_seq)
        .fetch_one(&mut *tx)
        .await?;
        let Some(moved) = moved_seq.max(cursor_seq) else {
            tx.rollback().await?;
            return Ok(Rebase::NotNeeded);
        };
        let next = generation + 1;
        let start = moved.max(first_seq) + 1;
        let reason = format!(
            "rebase: positions up to tx_id {} came from another cluster (this one's next was \
             {n}); seq {start} on is generation {next}",
            highest.as_deref().unwrap_or("-")
        );
        sqlx::query(
            "INSERT INTO outbox_generations (generation, first_seq, above_tx, reason) \
             VALUES ($1, $2, $3::text::xid8, $4)",
        )
        .bind(next)
        .bind(start)
        .bind(&highest)
        .bind(&reason)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Rebase::Rebased {
            generation: next,
            first_seq: start,
            reason,
        })
    }

    /// Takes (or renews) the destination's lease for `holder` if it is free, expired, or
    /// already held by `holder`. Returns the destination's state when the lease is ours.
    pub async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<Option<DestinationState>, StoreError> {
        let sql = format!(
            "UPDATE destinations SET lease_holder = $2, \
                 lease_expires_at = now() + make_interval(secs => $3) \
             WHERE name = $1 AND (lease_holder IS NULL OR lease_holder = $2 \
                 OR lease_expires_at < now()) \
             RETURNING {STATE_COLUMNS}"
        );
        let row: Option<StateRow> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(name)
            .bind(holder)
            .bind(ttl.as_secs_f64())
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(state))
    }

    /// Extends a lease `holder` still has. False if it was lost (expired and taken).
    pub async fn renew_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE destinations SET lease_expires_at = now() + make_interval(secs => $3) \
             WHERE name = $1 AND lease_holder = $2",
        )
        .bind(name)
        .bind(holder)
        .bind(ttl.as_secs_f64())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Gives the lease up at shutdown so another worker takes over at once.
    pub async fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE destinations SET lease_holder = NULL, lease_expires_at = NULL \
             WHERE name = $1 AND lease_holder = $2",
        )
        .bind(name)
        .bind(holder)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Up to `limit` events after `after`, in commit-safe order (see the module docs).
    pub async fn read_outbox(
        &self,
        after: &Position,
        limit: usize,
    ) -> Result<Vec<OutboxEvent>, StoreError> {
        self.read_ordered(after, limit, READ_OUTBOX, READ_SEALED, |row, generation| {
            Ok(OutboxRecord::from_row(&row)?.in_generation(generation))
        })
        .await
    }

    /// Up to `limit` rows after `after` in commit-safe order, by `current` (the current
    /// generation, below the horizon) and `sealed` (earlier ones), each bound to (cursor tx,
    /// cursor seq, limit, first seq, end seq) and returning `tx_text` and `seq` first; each row
    /// read by `read` with its generation.
    pub(crate) async fn read_ordered<T>(
        &self,
        after: &Position,
        limit: usize,
        current: &'static str,
        sealed: &'static str,
        read: impl Fn(sqlx::postgres::PgRow, i32) -> Result<T, StoreError>,
    ) -> Result<Vec<T>, StoreError> {
        let (gens, Some(mut i), mut from) = self.read_plan(after).await? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        loop {
            let g = &gens[i];
            let sql = match g.end_seq {
                None => current,
                Some(_) => sealed,
            };
            let rows = sqlx::query(sql)
                .bind(&from.tx_id)
                .bind(from.seq)
                .bind(i64::try_from(limit - out.len()).unwrap_or(i64::MAX))
                .bind(g.first_seq)
                .bind(g.end_seq)
                .fetch_all(&self.pool)
                .await?;
            for row in rows {
                out.push(read(row, g.generation)?);
            }
            if out.len() >= limit || i + 1 == gens.len() {
                return Ok(out);
            }
            i += 1;
            from = Position::new(gens[i].generation, "0", 0);
        }
    }

    /// Moves the cursor forward after the destination confirmed (or after events were
    /// skipped), only while `holder` holds the lease. False if the lease was lost: the caller
    /// must stop, the new holder carries on from the stored cursor.
    pub async fn advance(
        &self,
        name: &str,
        holder: &str,
        to: &Position,
        delivered: u64,
        skipped: u64,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE destinations SET cursor_gen = $7, cursor_tx = $3::text::xid8, cursor_seq = $4, \
                 delivered_total = delivered_total + $5, skipped_total = skipped_total + $6, \
                 last_delivered_at = CASE WHEN $5 > 0 THEN now() ELSE last_delivered_at END, \
                 failing = CASE WHEN $5 > 0 THEN false ELSE failing END \
             WHERE name = $1 AND lease_holder = $2 AND lease_expires_at > now() \
               AND (cursor_gen, cursor_tx, cursor_seq) <= ($7, $3::text::xid8, $4)",
        )
        .bind(name)
        .bind(holder)
        .bind(&to.tx_id)
        .bind(to.seq)
        .bind(i64::try_from(delivered).unwrap_or(i64::MAX))
        .bind(i64::try_from(skipped).unwrap_or(i64::MAX))
        .bind(to.generation)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Records a failed delivery attempt for `auditbridge status`.
    pub async fn record_failure(
        &self,
        name: &str,
        holder: &str,
        error: &str,
        failing: bool,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE destinations SET last_error = $3, last_error_at = now(), failing = $4 \
             WHERE name = $1 AND lease_holder = $2",
        )
        .bind(name)
        .bind(holder)
        .bind(error.replace('\0', "\u{FFFD}"))
        .bind(failing)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// How many events lie after `after` (before any filter), and when the oldest was stored.
    pub async fn backlog(&self, after: &Position) -> Result<Backlog, StoreError> {
        let gens = self.generations().await?;
        let after = normalize(after, &gens);
        let Some(g) = gens.iter().find(|g| g.generation == after.generation) else {
            return Ok(Backlog {
                events: 0,
                exact: true,
                oldest: None,
            });
        };
        // Counted within the cursor's generation (the index serves it); later generations
        // are estimated below.
        let (counted, oldest, head_seq): (i64, Option<OffsetDateTime>, Option<i64>) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM (SELECT 1 FROM audit_events \
                     WHERE (tx_id, seq) > ($1::text::xid8, $2) AND seq >= $4 \
                       AND ($5::bigint IS NULL OR seq < $5) LIMIT $3) AS capped), \
                    (SELECT received_at FROM audit_events WHERE (tx_id, seq) > ($1::text::xid8, $2) \
                       AND seq >= $4 AND ($5::bigint IS NULL OR seq < $5) \
                     ORDER BY tx_id, seq LIMIT 1), \
                    (SELECT seq FROM audit_events \
                     WHERE tx_id < pg_snapshot_xmax(pg_current_snapshot()) \
                     ORDER BY tx_id DESC, seq DESC LIMIT 1)",
        )
        .bind(&after.tx_id)
        .bind(after.seq)
        .bind(EXACT_BACKLOG_UP_TO + 1)
        .bind(g.first_seq)
        .bind(g.end_seq)
        .fetch_one(&self.pool)
        .await?;
        if counted <= EXACT_BACKLOG_UP_TO && g.end_seq.is_none() {
            return Ok(Backlog {
                events: counted,
                exact: true,
                oldest,
            });
        }
        // `seq` counts inserts, so the distance from the cursor to the newest row is the
        // backlog give or take rolled-back batches and concurrent ordering.
        let estimate = head_seq.map_or(counted, |h| (h - after.seq).max(counted));
        Ok(Backlog {
            events: estimate,
            exact: false,
            oldest,
        })
    }

    /// Every destination's row.
    pub async fn destinations(&self) -> Result<Vec<DestinationState>, StoreError> {
        let sql = format!("SELECT {STATE_COLUMNS} FROM destinations ORDER BY name");
        let rows: Vec<StateRow> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().map(state).collect())
    }

    /// Moves a destination's cursor back (or forward) to just before the first event stored
    /// at or after `to`, so they are delivered again. The holder of the lease, if any,
    /// notices within one lease renewal and restarts from the new cursor. Returns the new
    /// cursor, or `None` if there is no such destination.
    pub async fn rewind(
        &self,
        name: &str,
        to: OffsetDateTime,
    ) -> Result<Option<Position>, StoreError> {
        let cursor = self.position_for(&StartAt::At(to)).await?;
        // Taking the lease away makes the current holder stop and re-read the cursor.
        let done = sqlx::query(
            "UPDATE destinations SET cursor_gen = $4, cursor_tx = $2::text::xid8, cursor_seq = $3, \
                 lease_holder = NULL, lease_expires_at = NULL \
             WHERE name = $1",
        )
        .bind(name)
        .bind(&cursor.tx_id)
        .bind(cursor.seq)
        .bind(cursor.generation)
        .execute(&self.pool)
        .await?;
        Ok((done.rows_affected() == 1).then_some(cursor))
    }

    /// A listener for commit notifications (see [`NOTIFY_CHANNEL`]).
    pub async fn listen(&self) -> Result<sqlx::postgres::PgListener, StoreError> {
        let mut listener = sqlx::postgres::PgListener::connect_with(&self.pool).await?;
        listener.listen(NOTIFY_CHANNEL).await?;
        Ok(listener)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generation(generation: i32, first_seq: i64, end_seq: Option<i64>) -> Generation {
        Generation {
            generation,
            first_seq,
            end_seq,
            above_tx: None,
        }
    }

    #[test]
    fn a_position_of_a_row_of_a_later_generation_moves_into_it() {
        let gens = [
            generation(0, 0, Some(100)),
            generation(1, 100, Some(250)),
            generation(2, 250, None),
        ];
        // A moved row's position stays where it is.
        let moved = Position::new(0, "9000000", 99);
        assert_eq!(normalize(&moved, &gens), moved);
        // A position taken in the new cluster before the rebase (seq above the cut).
        let early = Position::new(0, "750", 120);
        assert_eq!(normalize(&early, &gens), Position::new(1, "750", 120));
        assert_eq!(
            normalize(&Position::new(0, "750", 300), &gens),
            Position::new(2, "750", 300)
        );
        // Never down, and the current generation stays.
        assert_eq!(
            normalize(&Position::new(2, "5", 1), &gens),
            Position::new(2, "5", 1)
        );
        // An unknown generation is left alone (nothing lies after it).
        assert_eq!(
            normalize(&Position::new(7, "5", 1), &gens),
            Position::new(7, "5", 1)
        );
        assert!(Position::new(1, "1", 0).key() > Position::new(0, "99999999", 5).key());
    }
}
