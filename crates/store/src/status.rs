//! Read-only queries behind `auditbridge status`.

use time::OffsetDateTime;

use crate::{Store, StoreError};

/// Dead letters of one kind that have not been replayed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterCount {
    pub kind: String,
    pub count: i64,
    pub newest: OffsetDateTime,
    /// The reason given for the newest one, as an example.
    pub latest_reason: String,
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
        let rows: Vec<(String, i64, OffsetDateTime, String)> = sqlx::query_as(
            "SELECT kind, count(*), max(received_at), (array_agg(reason ORDER BY id DESC))[1] \
             FROM dead_letters WHERE replayed_at IS NULL GROUP BY kind ORDER BY kind",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(Status {
            events,
            newest_received_at,
            dead_letters: rows
                .into_iter()
                .map(|(kind, count, newest, latest_reason)| DeadLetterCount {
                    kind,
                    count,
                    newest,
                    latest_reason,
                })
                .collect(),
        })
    }
}
