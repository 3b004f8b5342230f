//! The batch writer: one transaction per batch, events and dead letters together.

use std::sync::atomic::Ordering;

use auditbridge_event::Event;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

use crate::{Store, StoreError};

/// One validated event and the exact bytes it arrived as (stored as the `event` jsonb).
#[derive(Debug, Clone, Copy)]
pub struct NewEvent<'a> {
    pub event: &'a Event,
    /// The payload as received: UTF-8 JSON that [`auditbridge_event::decode`] accepted.
    pub raw: &'a [u8],
}

/// One refused message, kept with its reason (guarantee 5).
#[derive(Debug, Clone, Copy)]
pub struct DeadLetter<'a> {
    pub stream: &'a str,
    pub stream_seq: u64,
    pub subject: &'a str,
    pub payload: &'a [u8],
    /// A stable, low-cardinality label such as `schema` or `subject_mismatch`.
    pub kind: &'a str,
    /// What a person needs to fix it.
    pub reason: &'a str,
}

/// What one batch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PersistOutcome {
    /// New rows in `audit_events`.
    pub inserted: u64,
    /// Events whose id was already stored (redelivery, re-send): no new row.
    pub duplicates: u64,
    /// New rows in `dead_letters` (a redelivered poison message is kept once).
    pub dead_lettered: u64,
}

const COPY_EVENTS: &str = "COPY audit_events \
    (id, tenant, action, outcome, occurred_at, actor_id, target_id, source, event) \
    FROM STDIN";

const INSERT_EVENTS: &str = "INSERT INTO audit_events \
    (id, tenant, action, outcome, occurred_at, actor_id, target_id, source, event) \
    SELECT u.id, u.tenant, u.action, u.outcome, u.occurred_at, u.actor_id, u.target_id, \
           u.source, u.event::jsonb \
    FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::timestamptz[], \
                $6::text[], $7::text[], $8::text[], $9::text[]) \
         AS u(id, tenant, action, outcome, occurred_at, actor_id, target_id, source, event) \
    ON CONFLICT (id) DO NOTHING";

const INSERT_DEAD_LETTERS: &str = "INSERT INTO dead_letters \
    (stream, stream_seq, subject, payload, kind, reason) \
    SELECT * FROM UNNEST($1::text[], $2::int8[], $3::text[], $4::bytea[], $5::text[], $6::text[]) \
    ON CONFLICT (stream, stream_seq) DO NOTHING";

impl Store {
    /// Writes one batch in one transaction and commits it. When this returns `Ok`, every event
    /// of the batch is durably in `audit_events` (new, or already there) and every dead letter
    /// in `dead_letters`, so the caller may acknowledge all of them.
    ///
    /// Events go in by `COPY`, the fastest path PostgreSQL has. `COPY` has no `ON CONFLICT`,
    /// so when a batch holds an id that is already stored the transaction is rolled back and
    /// the batch is written again with `INSERT ... ON CONFLICT (id) DO NOTHING`. (Not a
    /// savepoint: a subtransaction costs on every row it writes, and conflicts are rare.) Duplicates come in runs (a redelivery after a crash is a whole stream of
    /// them), so after a conflict the writer uses the `INSERT` path directly until a batch
    /// comes through without one.
    ///
    /// The caller must not pass two events with the same id in one batch.
    pub async fn persist(
        &self,
        events: &[NewEvent<'_>],
        dead_letters: &[DeadLetter<'_>],
    ) -> Result<PersistOutcome, StoreError> {
        let mut tx = self.pool.begin().await?;
        let mut outcome = PersistOutcome::default();

        if !events.is_empty() {
            let inserted = if self.recent_conflict.load(Ordering::Relaxed) {
                insert_events(&mut tx, events).await?
            } else {
                match copy_events(&mut tx, events).await {
                    Ok(n) => n,
                    Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("23505") => {
                        // The failed COPY aborted the transaction; start again without it.
                        tx.rollback().await?;
                        tx = self.pool.begin().await?;
                        insert_events(&mut tx, events).await?
                    }
                    Err(e) => return Err(e.into()),
                }
            };
            let total = events.len() as u64;
            outcome.inserted = inserted;
            outcome.duplicates = total - inserted;
            self.recent_conflict
                .store(inserted < total, Ordering::Relaxed);
        }

        if !dead_letters.is_empty() {
            outcome.dead_lettered = insert_dead_letters(&mut tx, dead_letters).await?;
        }
        if self.notify && outcome.inserted > 0 {
            // Delivered at commit, and only if it commits.
            sqlx::query("SELECT pg_notify($1, '')")
                .bind(crate::outbox::NOTIFY_CHANNEL)
                .execute(&mut *tx)
                .await?;
        }

        tx.commit().await?;
        Ok(outcome)
    }
}

async fn copy_events(
    conn: &mut sqlx::PgConnection,
    events: &[NewEvent<'_>],
) -> Result<u64, sqlx::Error> {
    let mut buf = Vec::with_capacity(events.iter().map(|e| e.raw.len() + 200).sum());
    for e in events {
        encode_copy_row(&mut buf, e);
    }
    let mut copy = conn.copy_in_raw(COPY_EVENTS).await?;
    if let Err(e) = copy.send(buf).await {
        // Leave the connection usable; the error that matters is the send's.
        let _ = copy.abort("send failed").await;
        return Err(e);
    }
    copy.finish().await
}

/// One row of `COPY ... FROM STDIN` text format: tab-separated, `\N` for NULL, backslash,
/// newline, carriage return and tab escaped.
pub(crate) fn encode_copy_row(buf: &mut Vec<u8>, e: &NewEvent<'_>) {
    let ev = e.event;
    let mut uuid = Uuid::encode_buffer();
    buf.extend_from_slice(ev.id.hyphenated().encode_lower(&mut uuid).as_bytes());
    buf.push(b'\t');
    push_text(buf, ev.tenant.as_bytes());
    buf.push(b'\t');
    push_text(buf, ev.action.as_bytes());
    buf.push(b'\t');
    buf.extend_from_slice(ev.outcome.as_str().as_bytes());
    buf.push(b'\t');
    // Formatting a valid OffsetDateTime as RFC 3339 fails only outside years 0..=9999, which
    // `Event` cannot hold after parsing RFC 3339.
    let ts = ev.occurred_at.format(&Rfc3339).unwrap_or_default();
    buf.extend_from_slice(ts.as_bytes());
    buf.push(b'\t');
    push_text(buf, ev.actor.id.as_bytes());
    buf.push(b'\t');
    match ev.target.as_ref().and_then(|t| t.id.as_deref()) {
        Some(id) => push_text(buf, id.as_bytes()),
        None => buf.extend_from_slice(b"\\N"),
    }
    buf.push(b'\t');
    push_text(buf, ev.source.as_bytes());
    buf.push(b'\t');
    push_text(buf, e.raw);
    buf.push(b'\n');
}

fn push_text(buf: &mut Vec<u8>, s: &[u8]) {
    let special = |b: &u8| matches!(b, b'\\' | b'\n' | b'\r' | b'\t');
    // Most values have nothing to escape; one scan that the compiler vectorises beats
    // pushing byte by byte (this was the worker's hottest function).
    if !s.iter().any(special) {
        buf.extend_from_slice(s);
        return;
    }
    for &b in s {
        match b {
            b'\\' => buf.extend_from_slice(b"\\\\"),
            b'\n' => buf.extend_from_slice(b"\\n"),
            b'\r' => buf.extend_from_slice(b"\\r"),
            b'\t' => buf.extend_from_slice(b"\\t"),
            _ => buf.push(b),
        }
    }
}

async fn insert_events(
    conn: &mut sqlx::PgConnection,
    events: &[NewEvent<'_>],
) -> Result<u64, sqlx::Error> {
    let n = events.len();
    let mut ids = Vec::with_capacity(n);
    let mut tenants = Vec::with_capacity(n);
    let mut actions = Vec::with_capacity(n);
    let mut outcomes = Vec::with_capacity(n);
    let mut occurred = Vec::with_capacity(n);
    let mut actors = Vec::with_capacity(n);
    let mut targets = Vec::with_capacity(n);
    let mut sources = Vec::with_capacity(n);
    let mut raws = Vec::with_capacity(n);
    for e in events {
        let ev = e.event;
        ids.push(ev.id);
        tenants.push(ev.tenant.as_str());
        actions.push(ev.action.as_str());
        outcomes.push(ev.outcome.as_str());
        occurred.push(ev.occurred_at);
        actors.push(ev.actor.id.as_str());
        targets.push(ev.target.as_ref().and_then(|t| t.id.as_deref()));
        sources.push(ev.source.as_str());
        // `decode` accepted these bytes, so they are UTF-8.
        raws.push(String::from_utf8_lossy(e.raw));
    }
    let raws: Vec<&str> = raws.iter().map(|r| r.as_ref()).collect();
    let done = sqlx::query(INSERT_EVENTS)
        .bind(&ids)
        .bind(&tenants)
        .bind(&actions)
        .bind(&outcomes)
        .bind(&occurred)
        .bind(&actors)
        .bind(&targets)
        .bind(&sources)
        .bind(&raws)
        .execute(&mut *conn)
        .await?;
    Ok(done.rows_affected())
}

async fn insert_dead_letters(
    conn: &mut sqlx::PgConnection,
    dead_letters: &[DeadLetter<'_>],
) -> Result<u64, sqlx::Error> {
    // PostgreSQL text cannot hold U+0000; a subject or reason is never worth losing a dead
    // letter over, so such characters are replaced. The payload is bytea and kept exactly.
    let clean = |s: &str| s.replace('\0', "\u{FFFD}");
    let streams: Vec<&str> = dead_letters.iter().map(|d| d.stream).collect();
    let seqs: Vec<i64> = dead_letters
        .iter()
        .map(|d| i64::try_from(d.stream_seq).unwrap_or(i64::MAX))
        .collect();
    let subjects: Vec<String> = dead_letters.iter().map(|d| clean(d.subject)).collect();
    let payloads: Vec<&[u8]> = dead_letters.iter().map(|d| d.payload).collect();
    let kinds: Vec<&str> = dead_letters.iter().map(|d| d.kind).collect();
    let reasons: Vec<String> = dead_letters.iter().map(|d| clean(d.reason)).collect();
    let done = sqlx::query(INSERT_DEAD_LETTERS)
        .bind(&streams)
        .bind(&seqs)
        .bind(&subjects)
        .bind(&payloads)
        .bind(&kinds)
        .bind(&reasons)
        .execute(&mut *conn)
        .await?;
    Ok(done.rows_affected())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_text_escapes_what_copy_would_misread() {
        let mut buf = Vec::new();
        push_text(&mut buf, b"a\\b\tc\nd\re");
        assert_eq!(buf, b"a\\\\b\\tc\\nd\\re");
    }
}
