//! Raw-limit measurements for `auditbridge bench`: the same rows written straight into a copy
//! of `audit_events` (same columns, defaults and indexes), without NATS or validation, so the
//! pipeline's figure can be read against what PostgreSQL itself manages on this machine.

use std::time::{Duration, Instant};

use crate::outbox::Position;
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

    /// Events that became visible after `after`, in the relay's commit-safe order
    /// (`tx_id`, `seq`), with the position to pass next time. Only rows of transactions older
    /// than every transaction still running are read, so a batch that commits late cannot
    /// fall behind the position (see ARCHITECTURE.md, "The outbox"). Uses the outbox index,
    /// so polling stays cheap as the table grows.
    pub async fn bench_ids_after(
        &self,
        after: &Position,
    ) -> Result<(Vec<uuid::Uuid>, Position), StoreError> {
        let rows: Vec<(String, i64, uuid::Uuid)> = sqlx::query_as(
            "SELECT tx_id::text AS tx_text, seq, id FROM audit_events \
             WHERE (tx_id, seq) > ($1::text::xid8, $2) \
               AND tx_id < pg_snapshot_xmin(pg_current_snapshot()) \
             ORDER BY tx_id, seq",
        )
        .bind(&after.tx_id)
        .bind(after.seq)
        .fetch_all(&self.pool)
        .await?;
        let next = rows
            .last()
            .map(|(tx_id, seq, _)| Position::new(after.generation, tx_id.clone(), *seq))
            .unwrap_or_else(|| after.clone());
        Ok((rows.into_iter().map(|(_, _, id)| id).collect(), next))
    }

    /// Flushes dirty buffers now, so a measurement that follows a bulk load is not hit by the
    /// checkpoint that load's WAL would trigger a moment later.
    pub async fn bench_checkpoint(&self) -> Result<(), StoreError> {
        sqlx::query("CHECKPOINT").execute(&self.pool).await?;
        Ok(())
    }

    /// Exact number of stored events.
    pub async fn count_events(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar("SELECT count(*) FROM audit_events")
            .fetch_one(&self.pool)
            .await?)
    }
}

/// What the query benchmark filters on: the largest tenant and its most frequent values.
#[derive(Debug, Clone)]
pub struct QuerySample {
    pub tenant: String,
    pub tenant_events: i64,
    pub actor: String,
    pub target: String,
    /// The most frequent top-level action token.
    pub action: String,
    pub newest: time::OffsetDateTime,
}

impl Store {
    /// Fresh planner statistics and a checkpoint after a bulk load, so measurements that
    /// follow see the plans and I/O of a settled database.
    pub async fn bench_analyze(&self) -> Result<(), StoreError> {
        sqlx::query("ANALYZE audit_events")
            .execute(&self.pool)
            .await?;
        self.bench_checkpoint().await
    }

    /// The largest tenant and its most frequent actor, target and top-level action.
    pub async fn bench_sample(&self) -> Result<QuerySample, StoreError> {
        let (tenant, tenant_events): (String, i64) = sqlx::query_as(
            "SELECT tenant, count(*) FROM audit_events GROUP BY tenant ORDER BY 2 DESC LIMIT 1",
        )
        .fetch_one(&self.pool)
        .await?;
        let top = |column: &str| {
            format!(
                "SELECT {column} FROM audit_events WHERE tenant = $1 AND {column} IS NOT NULL \
                 GROUP BY 1 ORDER BY count(*) DESC LIMIT 1"
            )
        };
        let actor: String = sqlx::query_scalar(sqlx::AssertSqlSafe(top("actor_id")))
            .bind(&tenant)
            .fetch_one(&self.pool)
            .await?;
        let target: String = sqlx::query_scalar(sqlx::AssertSqlSafe(top("target_id")))
            .bind(&tenant)
            .fetch_one(&self.pool)
            .await?;
        let action: String =
            sqlx::query_scalar(sqlx::AssertSqlSafe(top("split_part(action, '.', 1)")))
                .bind(&tenant)
                .fetch_one(&self.pool)
                .await?;
        let newest: time::OffsetDateTime =
            sqlx::query_scalar("SELECT max(occurred_at) FROM audit_events WHERE tenant = $1")
                .bind(&tenant)
                .fetch_one(&self.pool)
                .await?;
        Ok(QuerySample {
            tenant,
            tenant_events,
            actor,
            target,
            action,
            newest,
        })
    }
}
