//! Read-only queries behind `auditbridge status`.

use time::OffsetDateTime;

use crate::{Store, StoreError};

/// Dead letters of one kind: those still to replay (`open` or `pending`), those replayed,
/// and those whose replay failed again (the new dead letter counts among the open ones).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterCount {
    pub kind: String,
    /// Still to replay.
    pub count: i64,
    pub replayed: i64,
    pub failed_again: i64,
    /// The newest one still to replay, and its reason, as an example.
    pub newest: Option<OffsetDateTime>,
    pub latest_reason: Option<String>,
}

/// What is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub events: i64,
    pub newest_received_at: Option<OffsetDateTime>,
    pub dead_letters: Vec<DeadLetterCount>,
}

impl Store {
    pub async fn status(&self) -> Result<Status, StoreError> {
        let events: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_events")
            .fetch_one(&self.pool)
            .await?;
        let newest_received_at: Option<OffsetDateTime> = sqlx::query_scalar(
            "SELECT received_at FROM audit_events ORDER BY tx_id DESC, seq DESC LIMIT 1",
        )
        .fetch_optional(&self.pool)
        .await?;
        #[allow(clippy::type_complexity)]
        let rows: Vec<(
            String,
            i64,
            i64,
            i64,
            Option<OffsetDateTime>,
            Option<String>,
        )> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "WITH s AS (SELECT d.id, d.kind, d.received_at, d.reason, \
                                   {} AS state FROM dead_letters d) \
                 SELECT kind, \
                        count(*) FILTER (WHERE state IN ('open', 'pending')), \
                        count(*) FILTER (WHERE state = 'replayed'), \
                        count(*) FILTER (WHERE state = 'failed_again'), \
                        max(received_at) FILTER (WHERE state IN ('open', 'pending')), \
                        (array_agg(reason ORDER BY id DESC) \
                             FILTER (WHERE state IN ('open', 'pending')))[1] \
                 FROM s GROUP BY kind ORDER BY kind",
            crate::dead_letters::STATE_SQL
        )))
        .fetch_all(&self.pool)
        .await?;
        Ok(Status {
            events,
            newest_received_at,
            dead_letters: rows
                .into_iter()
                .map(
                    |(kind, count, replayed, failed_again, newest, latest_reason)| {
                        DeadLetterCount {
                            kind,
                            count,
                            replayed,
                            failed_again,
                            newest,
                            latest_reason,
                        }
                    },
                )
                .collect(),
        })
    }
}
