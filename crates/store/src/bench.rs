//! Raw-limit measurements for `auditbridge bench`: the same rows written straight into a copy
//! of `audit_events` (same columns, defaults and indexes), without NATS or validation, so the
//! pipeline's figure can be read against what PostgreSQL itself manages on this machine.

use std::time::{Duration, Instant};

use crate::persist::{NewEvent, encode_copy_row};
use crate::{Store, StoreError};

impl Store {
    /// Writes `events` by `COPY` into a scratch copy of `audit_events`, `chunk` rows per
    /// transaction, and returns the time it took. The scratch table is dropped afterwards.
    pub async fn bench_raw_copy(
        &self,
        events: &[NewEvent<'_>],
        chunk: usize,
    ) -> Result<Duration, StoreError> {
        sqlx::query("DROP TABLE IF EXISTS bench_raw_copy")
            .execute(&self.pool)
            .await?;
        sqlx::query("CREATE TABLE bench_raw_copy (LIKE audit_events INCLUDING ALL)")
            .execute(&self.pool)
            .await?;
        let started = Instant::now();
        for part in events.chunks(chunk.max(1)) {
            let mut tx = self.pool.begin().await?;
            let mut buf = Vec::with_capacity(part.len() * 800);
            for e in part {
                encode_copy_row(&mut buf, e);
            }
            let mut copy = tx
                .copy_in_raw(
                    "COPY bench_raw_copy (id, tenant, action, outcome, occurred_at, actor_id, \
                     target_id, source, event) FROM STDIN",
                )
                .await?;
            copy.send(buf).await?;
            copy.finish().await?;
            tx.commit().await?;
        }
        let elapsed = started.elapsed();
        sqlx::query("DROP TABLE bench_raw_copy")
            .execute(&self.pool)
            .await?;
        Ok(elapsed)
    }

    /// Ids of events stored after `after_seq`, in insertion order, with their `seq`. Used by
    /// the benchmark (one worker, so `seq` order is commit order) to observe commits.
    pub async fn bench_ids_after(
        &self,
        after_seq: i64,
    ) -> Result<Vec<(i64, uuid::Uuid)>, StoreError> {
        Ok(
            sqlx::query_as("SELECT seq, id FROM audit_events WHERE seq > $1 ORDER BY seq")
                .bind(after_seq)
                .fetch_all(&self.pool)
                .await?,
        )
    }

    /// Exact number of stored events.
    pub async fn count_events(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar("SELECT count(*) FROM audit_events")
            .fetch_one(&self.pool)
            .await?)
    }
}
