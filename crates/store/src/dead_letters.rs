//! The dead letters of ingest (`auditbridge dead-letters list|show|replay`): what was refused,
//! why, and the exact bytes; and their replays (migration 0011), each with the worker's
//! verdict.

use time::OffsetDateTime;
use uuid::Uuid;

use crate::{Store, StoreError};

/// The header that carries a replay's nonce (`dead_letter_replays.nonce`). It links a message
/// to a replay only where the nonce is waiting for a verdict with the message's payload hash.
pub const REPLAY_HEADER: &str = "Auditbridge-Replay";

/// Where a dead letter stands, from its replays (`state` of [`StoredDeadLetter`]):
///
/// - `open`: never replayed;
/// - `pending`: the latest replay has no verdict yet (or was never published);
/// - `replayed`: a replay was stored (or found stored already: a duplicate);
/// - `failed_again`: the latest replay became a new dead letter, which carries on for it.
pub const STATE_SQL: &str = "CASE \
    WHEN EXISTS (SELECT 1 FROM dead_letter_replays r \
                 WHERE r.dead_letter_id = d.id AND r.result IN ('stored', 'duplicate')) \
        THEN 'replayed' \
    ELSE COALESCE((SELECT CASE WHEN r.result IS NULL THEN 'pending' ELSE 'failed_again' END \
                   FROM dead_letter_replays r WHERE r.dead_letter_id = d.id \
                   ORDER BY r.id DESC LIMIT 1), 'open') \
    END";

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
    /// When a replay of it was stored (or found stored).
    pub replayed_at: Option<OffsetDateTime>,
    /// The dead letter this one was replayed from, as the worker recorded it.
    pub replay_of: Option<i64>,
    /// `open`, `pending`, `replayed` or `failed_again` ([`STATE_SQL`]).
    pub state: String,
}

/// One replay of a dead letter.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct StoredReplay {
    pub id: i64,
    pub dead_letter_id: i64,
    pub nonce: Uuid,
    pub corrected: bool,
    pub requested_by: String,
    pub requested_at: OffsetDateTime,
    pub stream_seq: Option<i64>,
    pub published_at: Option<OffsetDateTime>,
    /// `stored`, `duplicate` or `dead_letter`; none while the worker has not decided.
    pub result: Option<String>,
    pub event_id: Option<Uuid>,
    pub new_dead_letter_id: Option<i64>,
    pub decided_at: Option<OffsetDateTime>,
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

fn columns() -> String {
    format!(
        "d.id, d.stream, d.stream_seq, d.stream_stored_at, d.subject, d.payload, d.kind, \
         d.reason, d.received_at, \
         COALESCE(d.replayed_at, (SELECT min(r.decided_at) FROM dead_letter_replays r \
                                  WHERE r.dead_letter_id = d.id \
                                    AND r.result IN ('stored', 'duplicate'))) AS replayed_at, \
         d.replay_of, {STATE_SQL} AS state"
    )
}

const REPLAY_COLUMNS: &str = "id, dead_letter_id, nonce, corrected, requested_by, requested_at, \
     stream_seq, published_at, result, event_id, new_dead_letter_id, decided_at";

impl Store {
    /// Dead letters matching `query`, newest first.
    pub async fn dead_letters(
        &self,
        query: &DeadLetterQuery,
    ) -> Result<Vec<StoredDeadLetter>, StoreError> {
        Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {} FROM dead_letters d \
             WHERE ($1::text IS NULL OR d.kind = $1) \
               AND ($2::timestamptz IS NULL OR d.received_at >= $2) \
             ORDER BY d.id DESC LIMIT $3",
            columns()
        )))
        .bind(query.kind.as_deref())
        .bind(query.since)
        .bind(query.limit.max(0))
        .fetch_all(&self.pool)
        .await?)
    }

    /// The dead letters still to replay (`open` or `pending`) of `kind` received at or after
    /// `since`, oldest first, after id `after`: pages of at most `limit`.
    /// Ids up to `upto` only: a replay run takes what was there when it started, not the
    /// dead letters its own replays make.
    pub async fn open_dead_letters(
        &self,
        kind: &str,
        since: Option<OffsetDateTime>,
        after: i64,
        upto: i64,
        limit: i64,
    ) -> Result<Vec<StoredDeadLetter>, StoreError> {
        Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT * FROM (SELECT {} FROM dead_letters d \
                            WHERE d.kind = $1 \
                              AND ($2::timestamptz IS NULL OR d.received_at >= $2) \
                              AND d.id > $3 AND d.id <= $5 \
                            ORDER BY d.id) AS l \
             WHERE l.state IN ('open', 'pending') LIMIT $4",
            columns()
        )))
        .bind(kind)
        .bind(since)
        .bind(after)
        .bind(limit.max(0))
        .bind(upto)
        .fetch_all(&self.pool)
        .await?)
    }

    /// The newest dead letter's id (0 without any).
    pub async fn last_dead_letter_id(&self) -> Result<i64, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT COALESCE(max(id), 0)::int8 FROM dead_letters")
                .fetch_one(&self.pool)
                .await?,
        )
    }

    /// One dead letter by id.
    pub async fn dead_letter(&self, id: i64) -> Result<Option<StoredDeadLetter>, StoreError> {
        Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {} FROM dead_letters d WHERE d.id = $1",
            columns()
        )))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// A dead letter's replays, oldest first.
    pub async fn dead_letter_replays(
        &self,
        dead_letter_id: i64,
    ) -> Result<Vec<StoredReplay>, StoreError> {
        Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {REPLAY_COLUMNS} FROM dead_letter_replays \
             WHERE dead_letter_id = $1 ORDER BY id"
        )))
        .bind(dead_letter_id)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Records a replay about to be published: the nonce its message will carry and the
    /// SHA-256 of the payload it will carry. Returns the replay's id.
    pub async fn request_replay(
        &self,
        dead_letter_id: i64,
        nonce: Uuid,
        corrected: bool,
        payload_sha256: &[u8; 32],
        requested_by: &str,
    ) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar(
            "INSERT INTO dead_letter_replays \
                 (dead_letter_id, nonce, corrected, payload_sha256, requested_by) \
             VALUES ($1, $2, $3, $4, $5) RETURNING id",
        )
        .bind(dead_letter_id)
        .bind(nonce)
        .bind(corrected)
        .bind(&payload_sha256[..])
        .bind(requested_by.replace('\0', "\u{FFFD}"))
        .fetch_one(&self.pool)
        .await?)
    }

    /// Records where JetStream stored a replay's message.
    pub async fn replay_published(
        &self,
        nonce: Uuid,
        stream: &str,
        stream_seq: u64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE dead_letter_replays SET stream = $2, stream_seq = $3, published_at = now() \
             WHERE nonce = $1",
        )
        .bind(nonce)
        .bind(stream)
        .bind(i64::try_from(stream_seq).unwrap_or(i64::MAX))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The replays among `nonces` that have a verdict.
    pub async fn decided_replays(&self, nonces: &[Uuid]) -> Result<Vec<StoredReplay>, StoreError> {
        Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {REPLAY_COLUMNS} FROM dead_letter_replays \
             WHERE nonce = ANY($1) AND decided_at IS NOT NULL"
        )))
        .bind(nonces)
        .fetch_all(&self.pool)
        .await?)
    }
}
