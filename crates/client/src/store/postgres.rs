//! The `postgres` store: a table in the service's own database, for services without volumes.
//!
//! This is the one place outside `auditbridge-store` that speaks SQL: it runs in producers'
//! processes, against *their* database, not Auditbridge's. The table is created if missing.
//! Several replicas of a service may share it: a drain locks the rows it publishes
//! (`FOR UPDATE SKIP LOCKED`) and deletes them in the same transaction once JetStream acked
//! them, so a replica that dies mid-drain leaves its rows to the others.

use std::str::FromStr as _;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, Postgres, Transaction};

use super::{Pending, decode_stored};
use crate::config::PostgresParams;
use crate::error::StoreError;

/// The `application_name` of the store's sessions, unless the URL sets one.
pub(crate) const APPLICATION_NAME: &str = "auditbridge-client";

pub(crate) struct PgStore {
    pool: PgPool,
    table: String,
    prefix: String,
    max_event_bytes: usize,
    max_events: u64,
    max_bytes: u64,
    /// The open drain: its transaction and the sequence numbers it locked.
    draining: Option<(Transaction<'static, Postgres>, Vec<i64>)>,
    /// This process's view of the table's size (exact for one producer per table; refreshed
    /// whenever the table is found empty of unlocked rows).
    events: u64,
    bytes: u64,
    pub(crate) dead_lettered: u64,
}

impl PgStore {
    pub(crate) async fn open(
        params: &PostgresParams,
        prefix: &str,
        max_event_bytes: usize,
    ) -> Result<PgStore, StoreError> {
        let mut options = PgConnectOptions::from_str(params.url.expose())
            .map_err(StoreError::db("parsing the postgres store's URL"))?;
        if options.get_application_name().is_none() {
            // So that its sessions can be told apart in `pg_stat_activity`.
            options = options.application_name(APPLICATION_NAME);
        }
        // A safety net under "every path ends its transaction": a drain's transaction lives
        // for one publish of a batch (bounded by the ack timeout); one idle far longer than
        // that is ended by the server rather than left to hold back the cluster's horizon.
        let options = options.options([("idle_in_transaction_session_timeout", "60s")]);
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(std::time::Duration::from_secs(5))
            .connect_with(options)
            .await
            .map_err(StoreError::db(
                "connecting to the postgres store's database",
            ))?;
        let table = &params.table;
        sqlx::raw_sql(AssertSqlSafe(format!(
            "CREATE TABLE IF NOT EXISTS {table} (\
                seq bigserial PRIMARY KEY, \
                id uuid NOT NULL, \
                subject text NOT NULL, \
                payload bytea NOT NULL, \
                stored_at timestamptz NOT NULL DEFAULT now()); \
             CREATE TABLE IF NOT EXISTS {table}_dead (\
                seq bigint PRIMARY KEY, \
                payload bytea NOT NULL, \
                reason text NOT NULL, \
                moved_at timestamptz NOT NULL DEFAULT now())"
        )))
        .execute(&pool)
        .await
        .map_err(StoreError::db("creating the postgres store's table"))?;
        let mut store = PgStore {
            pool,
            table: table.clone(),
            prefix: prefix.to_owned(),
            max_event_bytes,
            max_events: params.max_events,
            max_bytes: params.max_bytes,
            draining: None,
            events: 0,
            bytes: 0,
            dead_lettered: 0,
        };
        store.refresh_size().await?;
        Ok(store)
    }

    async fn refresh_size(&mut self) -> Result<(), StoreError> {
        let (events, bytes): (i64, i64) = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT count(*), coalesce(sum(octet_length(payload)), 0)::bigint FROM {}",
            self.table
        )))
        .fetch_one(&self.pool)
        .await
        .map_err(StoreError::db("measuring the postgres store"))?;
        self.events = events as u64;
        self.bytes = bytes as u64;
        Ok(())
    }

    pub(crate) async fn append(&mut self, events: &[Pending]) -> Result<usize, StoreError> {
        let mut n = 0;
        let mut bytes = 0;
        for e in events {
            let len = e.payload.len() as u64;
            if self.events + n as u64 >= self.max_events
                || self.bytes + bytes + len > self.max_bytes
            {
                break;
            }
            n += 1;
            bytes += len;
        }
        if n == 0 {
            return Ok(0);
        }
        let taken = &events[..n];
        let ids: Vec<_> = taken.iter().map(|e| e.id).collect();
        let subjects: Vec<&str> = taken.iter().map(|e| e.subject.as_str()).collect();
        let payloads: Vec<&[u8]> = taken.iter().map(|e| e.payload.as_ref()).collect();
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {} (id, subject, payload) \
             SELECT * FROM unnest($1::uuid[], $2::text[], $3::bytea[])",
            self.table
        )))
        .bind(ids)
        .bind(subjects)
        .bind(payloads)
        .execute(&self.pool)
        .await
        .map_err(StoreError::db("writing to the postgres store"))?;
        self.events += n as u64;
        self.bytes += bytes;
        Ok(n)
    }

    /// The oldest rows not locked by another replica, locked until [`PgStore::remove`] or
    /// [`PgStore::release`] ends the transaction. Every path out of here either returns
    /// with good rows in `draining` or has ended its transaction: rows that do not decode
    /// are moved to `<table>_dead` and committed at once, and the read starts again, so a
    /// batch of nothing but corrupt rows can neither block the drain nor leave a
    /// transaction open (which would hold back the xmin horizon of the whole cluster).
    pub(crate) async fn peek(&mut self, max: usize) -> Result<Vec<Pending>, StoreError> {
        self.release().await?;
        // Each round either returns or moves at least one row out of the table.
        loop {
            let mut tx = self
                .pool
                .begin()
                .await
                .map_err(StoreError::db("starting a drain of the postgres store"))?;
            let rows: Vec<(i64, Vec<u8>)> = sqlx::query_as(AssertSqlSafe(format!(
                "SELECT seq, payload FROM {} ORDER BY seq LIMIT $1 FOR UPDATE SKIP LOCKED",
                self.table
            )))
            .bind(max as i64)
            .fetch_all(&mut *tx)
            .await
            .map_err(StoreError::db("reading the postgres store"))?;
            if rows.is_empty() {
                tx.rollback()
                    .await
                    .map_err(StoreError::db("ending a drain of the postgres store"))?;
                self.refresh_size().await?;
                return Ok(Vec::new());
            }
            let mut out = Vec::with_capacity(rows.len());
            let mut seqs = Vec::with_capacity(rows.len());
            let mut corrupt = Vec::new();
            for (seq, payload) in rows {
                match decode_stored(payload.into(), &self.prefix, self.max_event_bytes) {
                    Ok(p) => {
                        out.push(p);
                        seqs.push(seq);
                    }
                    Err(e) => corrupt.push((seq, e.to_string())),
                }
            }
            if corrupt.is_empty() {
                self.draining = Some((tx, seqs));
                return Ok(out);
            }
            // Rows are written by this crate from valid events; one that does not decode
            // was altered in the table. It moves to the dead-letter table so it blocks
            // nothing and is kept for a person; then the batch is read again.
            for (seq, reason) in &corrupt {
                tracing::warn!(table = %self.table, seq, %reason, message = "Audit client: a row of the postgres store is not a valid event; moved it to the dead-letter table.");
            }
            let (seqs, reasons): (Vec<i64>, Vec<String>) = corrupt.into_iter().unzip();
            let moved = sqlx::query(AssertSqlSafe(format!(
                "WITH bad AS (SELECT * FROM unnest($1::bigint[], $2::text[]) AS b(seq, reason)), \
                      moved AS (DELETE FROM {t} WHERE seq IN (SELECT seq FROM bad) \
                                RETURNING seq, payload) \
                 INSERT INTO {t}_dead (seq, payload, reason) \
                 SELECT moved.seq, moved.payload, bad.reason FROM moved JOIN bad USING (seq)",
                t = self.table
            )))
            .bind(&seqs)
            .bind(&reasons)
            .execute(&mut *tx)
            .await;
            let moved = match moved {
                Ok(done) => done.rows_affected(),
                Err(e) => {
                    end(tx).await;
                    return Err(StoreError::db("moving corrupt rows of the postgres store")(
                        e,
                    ));
                }
            };
            tx.commit().await.map_err(StoreError::db(
                "committing corrupt rows of the postgres store",
            ))?;
            self.events = self.events.saturating_sub(moved);
            self.dead_lettered += moved;
        }
    }

    /// Deletes the first `n` rows of the last peek (JetStream acknowledged them) and ends
    /// its transaction, also when `n` is 0.
    pub(crate) async fn remove(&mut self, n: usize) -> Result<(), StoreError> {
        let Some((mut tx, seqs)) = self.draining.take() else {
            return Ok(());
        };
        if n == 0 {
            return tx
                .rollback()
                .await
                .map_err(StoreError::db("ending a drain of the postgres store"));
        }
        let done = &seqs[..n.min(seqs.len())];
        let deleted: Result<Vec<i32>, sqlx::Error> = sqlx::query_scalar(AssertSqlSafe(format!(
            "DELETE FROM {} WHERE seq = ANY($1) RETURNING octet_length(payload)",
            self.table
        )))
        .bind(done)
        .fetch_all(&mut *tx)
        .await;
        let deleted = match deleted {
            Ok(d) => d,
            Err(e) => {
                end(tx).await;
                return Err(StoreError::db(
                    "deleting drained events from the postgres store",
                )(e));
            }
        };
        tx.commit()
            .await
            .map_err(StoreError::db("committing a drain of the postgres store"))?;
        self.events = self.events.saturating_sub(deleted.len() as u64);
        self.bytes = self
            .bytes
            .saturating_sub(deleted.iter().map(|&b| b as u64).sum());
        Ok(())
    }

    /// Ends an open drain without deleting anything (its rows are unlocked).
    pub(crate) async fn release(&mut self) -> Result<(), StoreError> {
        if let Some((tx, _)) = self.draining.take() {
            tx.rollback()
                .await
                .map_err(StoreError::db("ending a drain of the postgres store"))?;
        }
        Ok(())
    }

    pub(crate) fn events(&self) -> u64 {
        self.events
    }

    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }
}

/// Rolls back a transaction after a failed statement. Dropping it would too, but only once
/// the pool next touches the connection; this ends it now. A failure here means the
/// connection is gone, and with it the transaction.
async fn end(tx: Transaction<'static, Postgres>) {
    if let Err(e) = tx.rollback().await {
        tracing::debug!(error = %e, message = "Audit client: rolling back a failed drain of the postgres store failed; the connection is closed.");
    }
}
