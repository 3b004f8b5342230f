//! Reading the dead letters of ingest (`auditbridge dead-letters list|show`): what was
//! refused, why, and the exact bytes, to fix and replay.

use time::OffsetDateTime;

use crate::{Store, StoreError};

/// A dead letter as stored.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct StoredDeadLetter {
    pub id: i64,
    pub stream: String,
    pub stream_seq: i64,
    /// When JetStream stored the message (unknown for rows older than migration 0004).
    pub stream_stored_at: Option<OffsetDateTime>,
    pub subject: String,
    /// The message's payload, exactly.
    pub payload: Vec<u8>,
    pub kind: String,
    pub reason: String,
    pub received_at: OffsetDateTime,
    pub replayed_at: Option<OffsetDateTime>,
}

/// Which dead letters to list.
#[derive(Debug, Clone, Default)]
pub struct DeadLetterQuery {
    pub kind: Option<String>,
    /// Received at or after.
    pub since: Option<OffsetDateTime>,
    /// At most this many, newest first.
    pub limit: i64,
}

const COLUMNS: &str = "id, stream, stream_seq, stream_stored_at, subject, payload, kind, reason, \
                       received_at, replayed_at";

impl Store {
    /// Dead letters matching `query`, newest first.
    pub async fn dead_letters(
        &self,
        query: &DeadLetterQuery,
    ) -> Result<Vec<StoredDeadLetter>, StoreError> {
        Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM dead_letters \
             WHERE ($1::text IS NULL OR kind = $1) \
               AND ($2::timestamptz IS NULL OR received_at >= $2) \
             ORDER BY id DESC LIMIT $3"
        )))
        .bind(query.kind.as_deref())
        .bind(query.since)
        .bind(query.limit.max(0))
        .fetch_all(&self.pool)
        .await?)
    }

    /// One dead letter by id.
    pub async fn dead_letter(&self, id: i64) -> Result<Option<StoredDeadLetter>, StoreError> {
        Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM dead_letters WHERE id = $1"
        )))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?)
    }
}
