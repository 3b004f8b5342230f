//! Per-destination dead letters (`destination_dead_letters`): the events a destination could
//! never take, recorded before its cursor moves past them, so that a destination can go on
//! without skipping anything silently. And the database's clock, which every age compared
//! with a stored time is measured on (workers' clocks may differ from it).

use time::OffsetDateTime;
use uuid::Uuid;

use crate::outbox::Position;
use crate::{Store, StoreError};

/// One event a destination could not take.
#[derive(Debug, Clone, PartialEq)]
pub struct DestinationDeadLetter {
    pub event_id: Uuid,
    pub position: Position,
    /// A short label: `routing_key`, `returned`, `status_4xx`, ...
    pub kind: String,
    pub reason: String,
}

/// A destination's dead letter as stored, with its re-delivery (migration 0012).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct StoredDestinationDeadLetter {
    pub event_id: Uuid,
    pub tx_id: String,
    pub seq: i64,
    /// The first refusal.
    pub kind: String,
    pub reason: String,
    pub created_at: OffsetDateTime,
    /// A re-delivery asked for and not yet tried.
    pub redeliver_requested_at: Option<OffsetDateTime>,
    pub redeliver_requested_by: Option<String>,
    pub redelivered_at: Option<OffsetDateTime>,
    pub attempts: i32,
    pub last_attempt_at: Option<OffsetDateTime>,
    /// The answer to the last re-delivery, when it was refused again.
    pub last_reason: Option<String>,
}

/// What one re-delivery came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Redelivery {
    /// The destination took the event.
    Delivered,
    /// Refused again (or the event can no longer be read: expired), with why.
    Refused(String),
}

const DEAD_COLUMNS: &str = "event_id, tx_id::text AS tx_id, seq, kind, reason, created_at, \
     redeliver_requested_at, redeliver_requested_by, redelivered_at, attempts, last_attempt_at, \
     last_reason";

/// One destination's dead letters, for `auditbridge status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DestinationDeadLetterCount {
    pub destination: String,
    pub count: i64,
    pub newest: OffsetDateTime,
    /// The newest one's event and reason, as an example.
    pub latest_event: Uuid,
    pub latest_reason: String,
}

impl Store {
    /// The database's current time (`now()`), the clock `received_at` was taken on.
    pub async fn now(&self) -> Result<OffsetDateTime, StoreError> {
        Ok(sqlx::query_scalar("SELECT now()")
            .fetch_one(&self.pool)
            .await?)
    }

    /// Records events `destination` cannot take, only while `holder` holds its lease (as
    /// `advance` is fenced). An event already recorded for the destination is kept once.
    /// False if the lease was lost (nothing recorded): the caller must stop.
    pub async fn record_undeliverable(
        &self,
        destination: &str,
        holder: &str,
        dead: &[DestinationDeadLetter],
    ) -> Result<bool, StoreError> {
        let ids: Vec<Uuid> = dead.iter().map(|d| d.event_id).collect();
        let txs: Vec<&str> = dead.iter().map(|d| d.position.tx_id.as_str()).collect();
        let seqs: Vec<i64> = dead.iter().map(|d| d.position.seq).collect();
        let kinds: Vec<&str> = dead.iter().map(|d| d.kind.as_str()).collect();
        let reasons: Vec<String> = dead
            .iter()
            .map(|d| d.reason.replace('\0', "\u{FFFD}"))
            .collect();
        let mut tx = self.pool.begin().await?;
        if !holds_lease(&mut tx, destination, holder).await? {
            return Ok(false);
        }
        sqlx::query(
            "INSERT INTO destination_dead_letters (destination, event_id, tx_id, seq, kind, reason) \
             SELECT $1, u.id, u.tx::xid8, u.seq, u.kind, u.reason \
             FROM unnest($2::uuid[], $3::text[], $4::bigint[], $5::text[], $6::text[]) \
                 AS u(id, tx, seq, kind, reason) \
             ON CONFLICT (destination, event_id) DO NOTHING",
        )
        .bind(destination)
        .bind(&ids)
        .bind(&txs)
        .bind(&seqs)
        .bind(&kinds)
        .bind(&reasons)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// `destination`'s dead letters in outbox order: those not redelivered (all with `all`),
    /// at most `limit`.
    pub async fn destination_dead_letters(
        &self,
        destination: &str,
        all: bool,
        limit: i64,
    ) -> Result<Vec<StoredDestinationDeadLetter>, StoreError> {
        Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {DEAD_COLUMNS} FROM destination_dead_letters \
             WHERE destination = $1 AND ($2 OR redelivered_at IS NULL) \
             ORDER BY tx_id, seq LIMIT $3"
        )))
        .bind(destination)
        .bind(all)
        .bind(limit.max(0))
        .fetch_all(&self.pool)
        .await?)
    }

    /// Asks the relay of `destination` to offer again its dead letters not yet redelivered:
    /// those of `events`, or all of them. Returns the events asked for and when.
    pub async fn request_redelivery(
        &self,
        destination: &str,
        events: Option<&[Uuid]>,
        by: &str,
    ) -> Result<Vec<(Uuid, OffsetDateTime)>, StoreError> {
        Ok(sqlx::query_as(
            "UPDATE destination_dead_letters \
             SET redeliver_requested_at = clock_timestamp(), redeliver_requested_by = $3 \
             WHERE destination = $1 AND redelivered_at IS NULL \
               AND ($2::uuid[] IS NULL OR event_id = ANY($2)) \
             RETURNING event_id, redeliver_requested_at",
        )
        .bind(destination)
        .bind(events)
        .bind(by.replace('\0', "\u{FFFD}"))
        .fetch_all(&self.pool)
        .await?)
    }

    /// The re-deliveries `destination`'s relay is asked for, oldest in the outbox first.
    pub async fn redelivery_requests(
        &self,
        destination: &str,
        limit: i64,
    ) -> Result<Vec<(Uuid, OffsetDateTime)>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT event_id, redeliver_requested_at FROM destination_dead_letters \
             WHERE destination = $1 AND redeliver_requested_at IS NOT NULL \
             ORDER BY tx_id, seq LIMIT $2",
        )
        .bind(destination)
        .bind(limit.max(0))
        .fetch_all(&self.pool)
        .await?)
    }

    /// Records what a re-delivery came to, only while `holder` holds the destination's lease
    /// and only for the request it answers (`requested_at`: a request made meanwhile is kept).
    /// False if the lease was lost.
    pub async fn settle_redelivery(
        &self,
        destination: &str,
        holder: &str,
        event_id: Uuid,
        requested_at: OffsetDateTime,
        outcome: &Redelivery,
    ) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        if !holds_lease(&mut tx, destination, holder).await? {
            return Ok(false);
        }
        let (delivered, reason) = match outcome {
            Redelivery::Delivered => (true, None),
            Redelivery::Refused(r) => (false, Some(r.replace('\0', "\u{FFFD}"))),
        };
        sqlx::query(
            "UPDATE destination_dead_letters \
             SET attempts = attempts + 1, last_attempt_at = now(), \
                 redelivered_at = CASE WHEN $4 THEN now() END, \
                 last_reason = COALESCE($5, last_reason), \
                 redeliver_requested_at = CASE WHEN redeliver_requested_at = $3 THEN NULL \
                                               ELSE redeliver_requested_at END \
             WHERE destination = $1 AND event_id = $2",
        )
        .bind(destination)
        .bind(event_id)
        .bind(requested_at)
        .bind(delivered)
        .bind(reason)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Every destination's dead letters: how many, the newest, and its reason.
    pub async fn destination_dead_letter_counts(
        &self,
    ) -> Result<Vec<DestinationDeadLetterCount>, StoreError> {
        let rows: Vec<(String, i64, OffsetDateTime, Uuid, String)> = sqlx::query_as(
            "SELECT destination, count(*), max(created_at), \
                 (array_agg(event_id ORDER BY created_at DESC, tx_id DESC, seq DESC))[1], \
                 (array_agg(kind || ': ' || reason ORDER BY created_at DESC, tx_id DESC, seq DESC))[1] \
             FROM destination_dead_letters WHERE redelivered_at IS NULL \
             GROUP BY destination ORDER BY destination",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(
                |(destination, count, newest, latest_event, latest_reason)| {
                    DestinationDeadLetterCount {
                        destination,
                        count,
                        newest,
                        latest_event,
                        latest_reason,
                    }
                },
            )
            .collect())
    }
}

/// Whether `holder` holds `destination`'s lease, locking its row so that the lease cannot
/// change hands before `tx` commits: what fences every write a relay makes under its lease.
async fn holds_lease(
    tx: &mut sqlx::PgConnection,
    destination: &str,
    holder: &str,
) -> Result<bool, sqlx::Error> {
    let held: Option<i32> = sqlx::query_scalar(
        "SELECT 1 FROM destinations \
         WHERE name = $1 AND lease_holder = $2 AND lease_expires_at > now() FOR UPDATE",
    )
    .bind(destination)
    .bind(holder)
    .fetch_optional(&mut *tx)
    .await?;
    Ok(held.is_some())
}
