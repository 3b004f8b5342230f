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

use std::time::Duration;

use time::OffsetDateTime;
use uuid::Uuid;

use crate::{Store, StoreError};

/// The channel the writer notifies on commit, so relays wake without polling.
pub const NOTIFY_CHANNEL: &str = "auditbridge_events";

/// A place in the commit-safe order. `tx_id` is the `xid8` as text (sqlx has no type for it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub tx_id: String,
    pub seq: i64,
}

impl Position {
    /// Before every event.
    pub fn start() -> Position {
        Position {
            tx_id: "0".into(),
            seq: 0,
        }
    }
}

/// One event read from the outbox.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxRow {
    pub position: Position,
    pub id: Uuid,
    pub tenant: String,
    pub action: String,
    pub outcome: String,
    pub source: String,
    pub received_at: OffsetDateTime,
    pub json: String,
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
    last_error_at, failing";

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
);

fn state(r: StateRow) -> DestinationState {
    DestinationState {
        name: r.0,
        kind: r.1,
        cursor: Position {
            tx_id: r.2,
            seq: r.3,
        },
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

/// The outbox read: events after a position, below the horizon, in commit-safe order. Public
/// so a test can check its plan walks the (tx_id, seq) index.
pub const READ_OUTBOX: &str = "SELECT tx_id::text AS tx_text, seq, id, tenant, action, outcome, \
        source, received_at, event::text \
    FROM audit_events \
    WHERE (tx_id, seq) > ($1::text::xid8, $2) \
      AND tx_id < pg_snapshot_xmin(pg_current_snapshot()) \
    ORDER BY tx_id, seq \
    LIMIT $3";

/// The position of the newest event a reader can safely have passed right now.
const HEAD: &str = "SELECT tx_id::text AS tx_text, seq FROM audit_events \
    WHERE tx_id < pg_snapshot_xmin(pg_current_snapshot()) \
    ORDER BY tx_id DESC, seq DESC LIMIT 1";

/// An (xid, seq) pair in the outbox's order; the xid travels as text.
fn xid_key(p: &(String, i64)) -> (u64, i64) {
    (p.0.parse().unwrap_or(0), p.1)
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
            "INSERT INTO destinations (name, type, cursor_tx, cursor_seq) \
             VALUES ($1, $2, $3::text::xid8, $4) \
             ON CONFLICT (name) DO UPDATE SET type = EXCLUDED.type \
             RETURNING (xmax = 0) AS created",
        )
        .bind(name)
        .bind(kind)
        .bind(&cursor.tx_id)
        .bind(cursor.seq)
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
        let found: Option<(String, i64)> = match start {
            StartAt::Earliest => return Ok(Position::start()),
            StartAt::Now => sqlx::query_as(HEAD).fetch_optional(&self.pool).await?,
            StartAt::At(t) => {
                let first: Option<(String, i64)> = sqlx::query_as(
                    "SELECT tx_id::text AS tx_text, seq FROM audit_events WHERE received_at >= $1 \
                     ORDER BY tx_id, seq LIMIT 1",
                )
                .bind(t)
                .fetch_optional(&self.pool)
                .await?;
                let head: Option<(String, i64)> =
                    sqlx::query_as(HEAD).fetch_optional(&self.pool).await?;
                // Capped at the head: the first event at or after `t` may lie above the
                // horizon, behind a transaction still running with a lower `tx_id` whose
                // events are from `t` on too. A cursor past it would skip them for good.
                match (first, head) {
                    (Some((tx, seq)), Some(head)) => {
                        let before_first = (tx, seq - 1);
                        Some(if xid_key(&before_first) <= xid_key(&head) {
                            before_first
                        } else {
                            head
                        })
                    }
                    // Nothing below the horizon yet: before everything.
                    (Some(_), None) => None,
                    (None, head) => head,
                }
            }
        };
        Ok(found
            .map(|(tx_id, seq)| Position { tx_id, seq })
            .unwrap_or_else(Position::start))
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
    ) -> Result<Vec<OutboxRow>, StoreError> {
        type Row = (
            String,
            i64,
            Uuid,
            String,
            String,
            String,
            String,
            OffsetDateTime,
            String,
        );
        let rows: Vec<Row> = sqlx::query_as(READ_OUTBOX)
            .bind(&after.tx_id)
            .bind(after.seq)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| OutboxRow {
                position: Position {
                    tx_id: r.0,
                    seq: r.1,
                },
                id: r.2,
                tenant: r.3,
                action: r.4,
                outcome: r.5,
                source: r.6,
                received_at: r.7,
                json: r.8,
            })
            .collect())
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
            "UPDATE destinations SET cursor_tx = $3::text::xid8, cursor_seq = $4, \
                 delivered_total = delivered_total + $5, skipped_total = skipped_total + $6, \
                 last_delivered_at = CASE WHEN $5 > 0 THEN now() ELSE last_delivered_at END, \
                 failing = CASE WHEN $5 > 0 THEN false ELSE failing END \
             WHERE name = $1 AND lease_holder = $2 AND lease_expires_at > now() \
               AND (cursor_tx, cursor_seq) <= ($3::text::xid8, $4)",
        )
        .bind(name)
        .bind(holder)
        .bind(&to.tx_id)
        .bind(to.seq)
        .bind(i64::try_from(delivered).unwrap_or(i64::MAX))
        .bind(i64::try_from(skipped).unwrap_or(i64::MAX))
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
        let (counted, oldest, head_seq): (i64, Option<OffsetDateTime>, Option<i64>) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM (SELECT 1 FROM audit_events \
                     WHERE (tx_id, seq) > ($1::text::xid8, $2) LIMIT $3) AS capped), \
                    (SELECT received_at FROM audit_events WHERE (tx_id, seq) > ($1::text::xid8, $2) \
                     ORDER BY tx_id, seq LIMIT 1), \
                    (SELECT seq FROM audit_events ORDER BY tx_id DESC, seq DESC LIMIT 1)",
        )
        .bind(&after.tx_id)
        .bind(after.seq)
        .bind(EXACT_BACKLOG_UP_TO + 1)
        .fetch_one(&self.pool)
        .await?;
        if counted <= EXACT_BACKLOG_UP_TO {
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
            "UPDATE destinations SET cursor_tx = $2::text::xid8, cursor_seq = $3, \
                 lease_holder = NULL, lease_expires_at = NULL \
             WHERE name = $1",
        )
        .bind(name)
        .bind(&cursor.tx_id)
        .bind(cursor.seq)
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
