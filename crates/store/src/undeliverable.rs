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
        // Locks the destination's row, so the lease cannot change hands until commit.
        let held: Option<i32> = sqlx::query_scalar(
            "SELECT 1 FROM destinations \
             WHERE name = $1 AND lease_holder = $2 AND lease_expires_at > now() FOR UPDATE",
        )
        .bind(destination)
        .bind(holder)
        .fetch_optional(&mut *tx)
        .await?;
        if held.is_none() {
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

    /// Every destination's dead letters: how many, the newest, and its reason.
    pub async fn destination_dead_letter_counts(
        &self,
    ) -> Result<Vec<DestinationDeadLetterCount>, StoreError> {
        let rows: Vec<(String, i64, OffsetDateTime, Uuid, String)> = sqlx::query_as(
            "SELECT destination, count(*), max(created_at), \
                 (array_agg(event_id ORDER BY created_at DESC, tx_id DESC, seq DESC))[1], \
                 (array_agg(kind || ': ' || reason ORDER BY created_at DESC, tx_id DESC, seq DESC))[1] \
             FROM destination_dead_letters GROUP BY destination ORDER BY destination",
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
