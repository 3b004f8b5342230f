//! The batch writer: one transaction per batch, events and dead letters together.

use std::collections::{HashMap, HashSet};
use std::io::Write as _;
use std::sync::atomic::Ordering;

use auditbridge_event::Event;
use sqlx::Row as _;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

use crate::error::{is_missing_partition, is_race, is_transient};
use crate::retention::Classes;
use crate::{Store, StoreError};

/// One validated event and the exact bytes it arrived as (stored as the `event` jsonb).
#[derive(Debug, Clone, Copy)]
pub struct NewEvent<'a> {
    pub event: &'a Event,
    /// The payload as received: UTF-8 JSON that [`auditbridge_event::decode`] accepted (or
    /// that JSON with ingest redaction applied).
    pub raw: &'a [u8],
    /// What ingest redaction did (`{"rules": version, "paths": [...]}`, JSON), stored in the
    /// `redaction` column beside the event; `None` when nothing was redacted.
    pub redaction: Option<&'a str>,
}

/// Where a message came from in the stream: what identifies it, and what a dead letter keeps.
#[derive(Debug, Clone, Copy)]
pub struct Origin<'a> {
    pub stream: &'a str,
    pub stream_seq: u64,
    /// When JetStream stored the message (its timestamp in the stream). With the sequence it
    /// tells a message apart from another one that took the same sequence in a stream deleted
    /// and created again (migration 0004); a redelivery carries the same timestamp.
    pub stored_at: OffsetDateTime,
    pub subject: &'a str,
    /// The message is a replay of a dead letter (`auditbridge dead-letters replay`): the
    /// `Auditbridge-Replay` nonce and the SHA-256 of the payload as it arrived. The verdict on
    /// it is recorded in `dead_letter_replays` (migration 0011) in the batch's transaction, if
    /// and only if a replay with this nonce and payload hash is waiting for one there.
    pub replay: Option<Replay>,
}

/// What identifies a replayed message to the replay that published it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replay {
    pub nonce: Uuid,
    pub payload_sha256: [u8; 32],
}

/// One refused message, kept with its reason (guarantee 5).
#[derive(Debug, Clone, Copy)]
pub struct DeadLetter<'a> {
    pub origin: Origin<'a>,
    pub payload: &'a [u8],
    /// A stable, low-cardinality label such as `schema` or `subject_mismatch`.
    pub kind: &'a str,
    /// What a person needs to fix it.
    pub reason: &'a str,
}

/// A valid event as the worker pulled it: the event, the message it came in, and the headers
/// that say how to recognise an honest re-send of it.
#[derive(Debug, Clone, Copy)]
pub struct Incoming<'a> {
    pub event: NewEvent<'a>,
    pub origin: Origin<'a>,
    /// `Auditbridge-Time: received`: the source filled `occurred_at` when it received the
    /// event, so a re-delivery of the same event carries another one. A re-sent id is compared
    /// with the stored event without `occurred_at`.
    pub time_received: bool,
    /// `Auditbridge-Legacy-Id`: the id an older derivation gave this event. If the row stored
    /// under that id is the same event (the same content but for the id, compared as a re-sent
    /// id is), the event is already stored (under its old id) and this message is a
    /// duplicate. Otherwise it is written under its own id: the legacy id is computable, so a
    /// producer can name another event's.
    pub legacy_id: Option<Uuid>,
}

/// What one batch of the worker did ([`Store::ingest`], [`Store::ingest_isolated`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ingested {
    /// New rows in `audit_events`.
    pub inserted: u64,
    /// Events already stored with the same content (redelivery, honest re-send, a legacy id).
    pub duplicates: u64,
    /// Events kept as dead letters instead, by index into the batch: the kind (`conflict`,
    /// `db_rejected`) and the reason.
    pub dead: Vec<(usize, &'static str, String)>,
    /// New rows in `dead_letters`, these and the refused messages passed in (a redelivered
    /// message is kept once).
    pub dead_lettered: u64,
}

/// Dead-letter kind of a re-sent id whose content differs from the stored event.
pub const CONFLICT: &str = "conflict";
/// Dead-letter kind of an event the database refuses alone while it accepts a control row.
pub const DB_REJECTED: &str = "db_rejected";

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

/// The columns of `audit_events` a batch writes, in the order [`encode_copy_row`] writes
/// their values.
pub const COPY_COLUMNS: &str = "id, tenant, action, outcome, occurred_at, actor_id, target_id, source, event, \
     retention_class, redaction";

const COPY_EVENTS: &str = "COPY audit_events \
    (id, tenant, action, outcome, occurred_at, actor_id, target_id, source, event, \
     retention_class, redaction) \
    FROM STDIN";

/// Writes the events whose id is not stored yet. A partitioned table has no `ON CONFLICT
/// (id)` (its unique indexes must hold the partition key): the ids are in `audit_event_ids`
/// (migration 0008), which the insert's trigger fills in the same statement. Two batches
/// racing with one id both pass the `NOT EXISTS`; the second then fails on
/// `audit_event_ids_pkey` once the first commits, and is written again ([`is_race`]).
macro_rules! insert_events {
    ($returning:literal) => {
        concat!(
            "INSERT INTO audit_events \
             (id, tenant, action, outcome, occurred_at, actor_id, target_id, source, event, \
              retention_class, redaction) \
             SELECT u.id, u.tenant, u.action, u.outcome, u.occurred_at, u.actor_id, \
                    u.target_id, u.source, u.event::jsonb, u.class, u.redaction::jsonb \
             FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::timestamptz[], \
                         $6::text[], $7::text[], $8::text[], $9::text[], $10::int8[], \
                         $11::text[]) \
                  AS u(id, tenant, action, outcome, occurred_at, actor_id, target_id, source, \
                       event, class, redaction) \
             WHERE NOT EXISTS (SELECT 1 FROM audit_event_ids i WHERE i.id = u.id)",
            $returning
        )
    };
}
const INSERT_EVENTS: &str = insert_events!("");

/// [`INSERT_EVENTS`] that says which rows it inserted: the others' ids were already stored.
const INSERT_EVENTS_RETURNING: &str = insert_events!(" RETURNING id");

/// A row nobody will see (it is rolled back at once), written through the same columns as
/// events: if the database refuses it, the database refuses writes, whatever the event.
const CONTROL_INSERT: &str = "INSERT INTO audit_events \
    (id, tenant, action, outcome, occurred_at, actor_id, target_id, source, event, \
     retention_class) \
    VALUES ($1, 'auditbridge-control', 'auditbridge.control', 'unknown', now(), \
            'auditbridge-control', NULL, 'auditbridge', '{}'::jsonb, 0)";

/// For each event (by index) and the id of a stored row to compare it with (its own id, or its
/// legacy id): the stored row's tenant, source and time, and the top-level fields in which the
/// message differs from it (none: the same event). With `loose` (`Auditbridge-Time:
/// received`) `occurred_at` is left out of the comparison. `id` is always left out: the join
/// compares it, as a UUID (so `A1B2…` and `a1b2…` are one id), and a legacy id differs from
/// the message's by definition. Equality is jsonb's, so key order, white space and number
/// spelling do not count. Events with no stored id are not returned. An id whose event has
/// expired (its partition dropped, see [`crate::retention`]) is returned with no tenant,
/// source or fields: it can be neither compared nor stored again.
// Redacted paths: under the same rules both sides are redacted alike and are compared whole;
// after a rule change the union of both sides' paths is left out (but array elements, whose
// indexes a drop shifts: a rule change that drops array elements can make a conflict).
const COMPARE_STORED: &str = "WITH u AS ( \
        SELECT i, id, raw::jsonb - 'id' AS e, loose, redaction::jsonb AS red \
        FROM UNNEST($1::int4[], $2::uuid[], $3::text[], $4::bool[], $5::text[]) \
             AS t(i, id, raw, loose, redaction) \
    ), r AS ( \
        SELECT u.i, a.tenant, a.source, ids.received_at, a.event IS NULL AS gone, \
               CASE WHEN u.loose THEN a.event - 'id' - 'occurred_at' ELSE a.event - 'id' END \
                   AS stored, \
               CASE WHEN u.loose THEN u.e - 'occurred_at' ELSE u.e END AS sent, \
               CASE WHEN u.red ->> 'rules' IS NOT DISTINCT FROM a.redaction ->> 'rules' \
                    THEN '{}'::text[] \
                    ELSE ARRAY(SELECT p FROM ( \
                             SELECT jsonb_array_elements_text(COALESCE(u.red -> 'paths', '[]')) \
                             UNION \
                             SELECT jsonb_array_elements_text( \
                                        COALESCE(a.redaction -> 'paths', '[]'))) AS x(p) \
                         WHERE p !~ '/[0-9]+$') END \
                   AS strip \
        FROM u JOIN audit_event_ids ids ON ids.id = u.id \
        LEFT JOIN audit_events a \
            ON (a.retention_class, a.received_at, a.tx_id, a.seq) \
               = (ids.retention_class, ids.received_at, ids.tx_id, ids.seq) \
    ), c AS ( \
        SELECT i, tenant, source, received_at, gone, \
               CASE WHEN cardinality(strip) = 0 THEN stored \
                    ELSE auditbridge_without(stored, strip) END AS stored, \
               CASE WHEN cardinality(strip) = 0 THEN sent \
                    ELSE auditbridge_without(sent, strip) END AS sent \
        FROM r \
    ) \
    SELECT i, tenant, source, received_at, gone, \
           ARRAY(SELECT k FROM (SELECT jsonb_object_keys(stored) \
                                UNION SELECT jsonb_object_keys(sent)) AS keys(k) \
                 WHERE stored -> k IS DISTINCT FROM sent -> k ORDER BY k) AS differs \
    FROM c";

/// A dead letter of a replayed message names the dead letter it was replayed from, found by
/// the replay's nonce and payload hash (never taken from the message).
const INSERT_DEAD_LETTERS: &str = "INSERT INTO dead_letters \
    (stream, stream_seq, stream_stored_at, subject, payload, kind, reason, replay_of) \
    SELECT u.stream, u.seq, u.stored_at, u.subject, u.payload, u.kind, u.reason, \
           (SELECT p.dead_letter_id FROM dead_letter_replays p \
            WHERE p.nonce = u.nonce AND p.payload_sha256 = u.sha) \
    FROM UNNEST($1::text[], $2::int8[], $3::timestamptz[], $4::text[], $5::bytea[], \
                $6::text[], $7::text[], $8::uuid[], $9::bytea[]) \
         AS u(stream, seq, stored_at, subject, payload, kind, reason, nonce, sha) \
    ON CONFLICT (stream, stream_seq, stream_stored_at) DO NOTHING";

/// Records the worker's verdict on replayed messages: only on a replay waiting for one, with
/// the nonce and the payload hash the message arrived with. A verdict is never changed (a
/// redelivery of a stored replay is a duplicate, but the replay stored it).
const RECORD_REPLAYS: &str = "UPDATE dead_letter_replays p \
    SET result = r.result, event_id = r.event_id, decided_at = now(), \
        new_dead_letter_id = CASE WHEN r.result = 'dead_letter' THEN \
            (SELECT d.id FROM dead_letters d \
             WHERE d.stream = r.stream AND d.stream_seq = r.seq \
               AND d.stream_stored_at = r.stored_at) END \
    FROM UNNEST($1::uuid[], $2::bytea[], $3::text[], $4::uuid[], $5::text[], $6::int8[], \
                $7::timestamptz[]) AS r(nonce, sha, result, event_id, stream, seq, stored_at) \
    WHERE p.nonce = r.nonce AND p.payload_sha256 = r.sha AND p.decided_at IS NULL";

/// The longest reason written for `conflict` and `db_rejected` (the database's message can
/// quote a whole value).
const MAX_REASON_CHARS: usize = 2000;

impl Store {
    /// Writes one batch in one transaction and commits it. When this returns `Ok`, every event
    /// of the batch is durably in `audit_events` (new, or already there) and every dead letter
    /// in `dead_letters`, so the caller may acknowledge all of them.
    ///
    /// Events go in by `COPY`, the fastest path PostgreSQL has. `COPY` has no `ON CONFLICT`,
    /// so when a batch holds an id that is already stored the transaction is rolled back and
    /// the batch is written again with `INSERT ... ON CONFLICT (id) DO NOTHING`. (Not a
    /// savepoint: a subtransaction costs on every row it writes, and conflicts are rare.)
    /// Duplicates come in runs (a redelivery after a crash is a whole stream of them), so
    /// after a conflict the writer uses the `INSERT` path directly until a batch comes
    /// through without one.
    ///
    /// This is the plain writer of tools and benchmarks: a stored id counts as a duplicate
    /// whatever its content. The worker uses [`Store::ingest`], which compares it.
    ///
    /// The caller must not pass two events with the same id in one batch.
    pub async fn persist(
        &self,
        events: &[NewEvent<'_>],
        dead_letters: &[DeadLetter<'_>],
    ) -> Result<PersistOutcome, StoreError> {
        let mut attempt = Attempts::default();
        loop {
            let classes = self.retention_classes().await?;
            match self.persist_once(events, dead_letters, &classes).await {
                Err(e) if attempt.again(self, &e).await? => continue,
                done => return done,
            }
        }
    }

    async fn persist_once(
        &self,
        events: &[NewEvent<'_>],
        dead_letters: &[DeadLetter<'_>],
        classes: &Classes,
    ) -> Result<PersistOutcome, StoreError> {
        let mut tx = self.pool.begin().await?;
        let mut outcome = PersistOutcome::default();

        if !events.is_empty() {
            let inserted = if self.recent_conflict.load(Ordering::Relaxed) {
                insert_events(&mut tx, events, classes).await?
            } else {
                match copy_events(&mut tx, events, classes).await {
                    Ok(n) => n,
                    Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("23505") => {
                        // The failed COPY aborted the transaction; start again without it.
                        tx.rollback().await?;
                        tx = self.pool.begin().await?;
                        insert_events(&mut tx, events, classes).await?
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
        self.commit_batch(tx, outcome.inserted).await?;
        Ok(outcome)
    }

    /// Commits a batch's transaction, waking the relays first if it inserted rows (the
    /// notification is delivered at commit, and only if it commits).
    async fn commit_batch(
        &self,
        mut tx: sqlx::Transaction<'static, sqlx::Postgres>,
        inserted: u64,
    ) -> Result<(), sqlx::Error> {
        if self.notify && inserted > 0 {
            sqlx::query("SELECT pg_notify($1, '')")
                .bind(crate::outbox::NOTIFY_CHANNEL)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await
    }
}

async fn copy_events(
    conn: &mut sqlx::PgConnection,
    events: &[NewEvent<'_>],
    classes: &Classes,
) -> Result<u64, sqlx::Error> {
    let mut buf = Vec::with_capacity(events.iter().map(|e| e.raw.len() + 200).sum());
    for e in events {
        encode_copy_row(&mut buf, e, classes.of(&e.event.tenant));
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
/// newline, carriage return and tab escaped; the values of [`COPY_COLUMNS`], the event's
/// retention class last. Public for the benchmarks' raw limit, which copies the very rows the
/// writer copies.
pub fn encode_copy_row(buf: &mut Vec<u8>, e: &NewEvent<'_>, retention_class: i64) {
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
    buf.push(b'\t');
    // Writing into a Vec cannot fail.
    let _ = write!(buf, "{retention_class}");
    buf.push(b'\t');
    match e.redaction {
        Some(r) => push_text(buf, r.as_bytes()),
        None => buf.extend_from_slice(b"\\N"),
    }
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
    classes: &Classes,
) -> Result<u64, sqlx::Error> {
    let done = bind_events(sqlx::query(INSERT_EVENTS), events, classes)
        .execute(&mut *conn)
        .await?;
    Ok(done.rows_affected())
}

/// Binds the eleven arrays of [`INSERT_EVENTS`] (and [`INSERT_EVENTS_RETURNING`]).
fn bind_events<'q>(
    query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    events: &[NewEvent<'_>],
    classes: &Classes,
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
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
    let mut class = Vec::with_capacity(n);
    let mut redactions = Vec::with_capacity(n);
    for e in events {
        redactions.push(e.redaction);
        class.push(classes.of(&e.event.tenant));
        let ev = e.event;
        ids.push(ev.id);
        tenants.push(ev.tenant.clone());
        actions.push(ev.action.clone());
        outcomes.push(ev.outcome.as_str().to_owned());
        occurred.push(ev.occurred_at);
        actors.push(ev.actor.id.clone());
        targets.push(ev.target.as_ref().and_then(|t| t.id.clone()));
        sources.push(ev.source.clone());
        // `decode` accepted these bytes, so they are UTF-8.
        raws.push(String::from_utf8_lossy(e.raw).into_owned());
    }
    query
        .bind(ids)
        .bind(tenants)
        .bind(actions)
        .bind(outcomes)
        .bind(occurred)
        .bind(actors)
        .bind(targets)
        .bind(sources)
        .bind(raws)
        .bind(class)
        .bind(redactions)
}

/// At most this many payload bytes go into one dead-letter statement. A refused message can be
/// as large as NATS lets it be (not `max_event_bytes`), and a batch of 2,000 of them in one
/// `bytea[]` would pass PostgreSQL's 1 GB limit on a message: the statement would fail every
/// time, and the batch with it.
const DEAD_LETTER_STATEMENT_BYTES: usize = 32 << 20;

async fn insert_dead_letters(
    conn: &mut sqlx::PgConnection,
    dead_letters: &[DeadLetter<'_>],
) -> Result<u64, sqlx::Error> {
    let mut inserted = 0;
    let mut rest = dead_letters;
    while !rest.is_empty() {
        // At least one per statement, however large.
        let mut take = 1;
        let mut bytes = rest[0].payload.len();
        while take < rest.len() && bytes + rest[take].payload.len() <= DEAD_LETTER_STATEMENT_BYTES {
            bytes += rest[take].payload.len();
            take += 1;
        }
        let (chunk, tail) = rest.split_at(take);
        inserted += insert_dead_letter_chunk(conn, chunk).await?;
        rest = tail;
    }
    Ok(inserted)
}

async fn insert_dead_letter_chunk(
    conn: &mut sqlx::PgConnection,
    dead_letters: &[DeadLetter<'_>],
) -> Result<u64, sqlx::Error> {
    // PostgreSQL text cannot hold U+0000; a subject or reason is never worth losing a dead
    // letter over, so such characters are replaced. The payload is bytea and kept exactly.
    let clean = |s: &str| s.replace('\0', "\u{FFFD}");
    let streams: Vec<&str> = dead_letters.iter().map(|d| d.origin.stream).collect();
    let seqs: Vec<i64> = dead_letters
        .iter()
        .map(|d| i64::try_from(d.origin.stream_seq).unwrap_or(i64::MAX))
        .collect();
    let stored: Vec<OffsetDateTime> = dead_letters.iter().map(|d| d.origin.stored_at).collect();
    let subjects: Vec<String> = dead_letters
        .iter()
        .map(|d| clean(d.origin.subject))
        .collect();
    let payloads: Vec<&[u8]> = dead_letters.iter().map(|d| d.payload).collect();
    let kinds: Vec<&str> = dead_letters.iter().map(|d| d.kind).collect();
    let reasons: Vec<String> = dead_letters.iter().map(|d| clean(d.reason)).collect();
    let nonces: Vec<Option<Uuid>> = dead_letters
        .iter()
        .map(|d| d.origin.replay.map(|r| r.nonce))
        .collect();
    let hashes: Vec<Option<&[u8]>> = dead_letters
        .iter()
        .map(|d| d.origin.replay.as_ref().map(|r| &r.payload_sha256[..]))
        .collect();
    let done = sqlx::query(INSERT_DEAD_LETTERS)
        .bind(&streams)
        .bind(&seqs)
        .bind(&stored)
        .bind(&subjects)
        .bind(&payloads)
        .bind(&kinds)
        .bind(&reasons)
        .bind(&nonces)
        .bind(&hashes)
        .execute(&mut *conn)
        .await?;
    Ok(done.rows_affected())
}

/// The dead letters of a batch could not be written: a lost connection is the database's
/// state; anything else is a refusal that no event caused and no retry by itself cures soon.
/// Both hold the batch (with backoff): nothing else keeps those messages.
fn dead_letters_failed(e: sqlx::Error) -> StoreError {
    if is_transient(&e) {
        StoreError::Unavailable(e)
    } else {
        StoreError::DeadLettersRefused(e)
    }
}

impl Store {
    /// Writes one batch of the worker in one transaction and commits it. When this returns
    /// `Ok`, every event is durably in `audit_events` (new, or already there with the same
    /// content) or in `dead_letters` (listed in [`Ingested::dead`]), and so is every refused
    /// message passed in, so the caller may acknowledge all of them.
    ///
    /// The fast path is the one of [`Store::persist`]: `COPY`, or `INSERT ... ON CONFLICT`
    /// after a conflict. Only events whose id turns out to be stored already are compared
    /// with the stored rows (one query, on the conflict path only): the same content is a
    /// duplicate, other content a dead letter of kind [`CONFLICT`] naming the stored event —
    /// never dropped silently, whichever tenant sent it. An id repeated inside the batch is
    /// compared the same way with the first one. Events with a legacy id cost one lookup, the
    /// same comparison with the row stored under the legacy id.
    ///
    /// [`StoreError::Rejected`] means the database refused the batch for a reason that may be
    /// one event's: write it again with [`Store::ingest_isolated`].
    pub async fn ingest(
        &self,
        events: &[Incoming<'_>],
        refused: &[DeadLetter<'_>],
    ) -> Result<Ingested, StoreError> {
        self.ingest_with(events, refused, false).await
    }

    /// Writes a batch that the database refused as a whole, in one transaction, part by part
    /// inside savepoints (halving a part that fails, so one poison event among 2,000 costs
    /// about 22 statements, not 2,000). An event that fails alone is the event's fault only
    /// if a control row, written right after in the same session inside a savepoint that is
    /// rolled back, succeeds: then it becomes a dead letter of kind [`DB_REJECTED`] with the
    /// database's SQLSTATE and message, and the rest of the batch commits. If the control
    /// fails too, the database refuses writes ([`StoreError::RefusesWrites`]); a timeout,
    /// cancel, deadlock or lost connection is the database's too ([`StoreError::Unavailable`]).
    /// Either way nothing is committed and the caller holds the batch.
    pub async fn ingest_isolated(
        &self,
        events: &[Incoming<'_>],
        refused: &[DeadLetter<'_>],
    ) -> Result<Ingested, StoreError> {
        self.ingest_with(events, refused, true).await
    }

    async fn ingest_with(
        &self,
        events: &[Incoming<'_>],
        refused: &[DeadLetter<'_>],
        isolated: bool,
    ) -> Result<Ingested, StoreError> {
        let mut attempt = Attempts::default();
        loop {
            let classes = self.retention_classes().await?;
            match self.ingest_once(events, refused, isolated, &classes).await {
                Err(e) if attempt.again(self, &e).await? => continue,
                done => return done,
            }
        }
    }

    async fn ingest_once(
        &self,
        events: &[Incoming<'_>],
        refused: &[DeadLetter<'_>],
        isolated: bool,
        classes: &Classes,
    ) -> Result<Ingested, StoreError> {
        let mut tx = self.pool.begin().await?;
        let mut out = Ingested::default();

        let legacy = legacy_duplicates(&mut tx, events).await?;
        out.duplicates += legacy.len() as u64;
        let rounds = rounds(events, &legacy);

        // Indexes of events not inserted because their id was stored already (by another
        // batch, or by an earlier round of this one).
        let mut existing = Vec::new();
        for (r, round) in rounds.iter().enumerate() {
            let inserted: HashSet<Uuid> = if isolated {
                insert_isolated(&mut tx, events, round, classes, &mut out.dead).await?
            } else if r == 0 && !self.recent_conflict.load(Ordering::Relaxed) {
                let rows: Vec<NewEvent<'_>> = round.iter().map(|&i| events[i].event).collect();
                match copy_events(&mut tx, &rows, classes).await {
                    Ok(_) => round.iter().map(|&i| events[i].event.event.id).collect(),
                    Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("23505") => {
                        // The failed COPY aborted the transaction; start again without it.
                        // (What the legacy lookup found is still true: rows are immutable.)
                        tx.rollback().await?;
                        tx = self.pool.begin().await?;
                        insert_returning(&mut tx, events, round, classes).await?
                    }
                    Err(e) => return Err(e.into()),
                }
            } else {
                insert_returning(&mut tx, events, round, classes).await?
            };
            let before = existing.len();
            existing.extend(round.iter().copied().filter(|&i| {
                !inserted.contains(&events[i].event.event.id)
                    && !out.dead.iter().any(|(d, _, _)| *d == i)
            }));
            if r == 0 {
                self.recent_conflict
                    .store(existing.len() > before, Ordering::Relaxed);
            }
            out.inserted += inserted.len() as u64;
        }

        if !existing.is_empty() {
            let conflicts = compare_stored(&mut tx, events, &existing).await?;
            out.duplicates += (existing.len() - conflicts.len()) as u64;
            out.dead.extend(
                conflicts
                    .into_iter()
                    .map(|(i, reason)| (i, CONFLICT, reason)),
            );
        }

        let mut letters: Vec<DeadLetter<'_>> = refused.to_vec();
        letters.extend(out.dead.iter().map(|(i, kind, reason)| DeadLetter {
            origin: events[*i].origin,
            payload: events[*i].event.raw,
            kind,
            reason,
        }));
        if !letters.is_empty() {
            out.dead_lettered = insert_dead_letters(&mut tx, &letters)
                .await
                .map_err(dead_letters_failed)?;
        }
        let replays = verdicts(events, refused, &out, &legacy, &existing);
        if !replays.is_empty() {
            record_replays(&mut tx, &replays).await?;
        }
        self.commit_batch(tx, out.inserted).await?;
        Ok(out)
    }
}

/// The worker's verdict on one replayed message ([`RECORD_REPLAYS`]).
struct Verdict<'a> {
    origin: Origin<'a>,
    replay: Replay,
    result: &'static str,
    event_id: Option<Uuid>,
}

/// The verdicts on the replayed messages of a batch: each refused one is a new dead letter; an
/// event is a dead letter if it became one, a duplicate if its id was stored already (or its
/// legacy id), and stored otherwise.
fn verdicts<'a>(
    events: &[Incoming<'a>],
    refused: &[DeadLetter<'a>],
    out: &Ingested,
    legacy: &HashSet<usize>,
    existing: &[usize],
) -> Vec<Verdict<'a>> {
    let mut verdicts = Vec::new();
    for (i, e) in events.iter().enumerate() {
        let Some(replay) = e.origin.replay else {
            continue;
        };
        let result = if out.dead.iter().any(|(d, _, _)| *d == i) {
            "dead_letter"
        } else if legacy.contains(&i) || existing.contains(&i) {
            "duplicate"
        } else {
            "stored"
        };
        verdicts.push(Verdict {
            origin: e.origin,
            replay,
            result,
            event_id: Some(e.event.event.id),
        });
    }
    for d in refused {
        if let Some(replay) = d.origin.replay {
            verdicts.push(Verdict {
                origin: d.origin,
                replay,
                result: "dead_letter",
                event_id: None,
            });
        }
    }
    verdicts
}

async fn record_replays(
    conn: &mut sqlx::PgConnection,
    verdicts: &[Verdict<'_>],
) -> Result<(), sqlx::Error> {
    let nonces: Vec<Uuid> = verdicts.iter().map(|v| v.replay.nonce).collect();
    let hashes: Vec<&[u8]> = verdicts
        .iter()
        .map(|v| &v.replay.payload_sha256[..])
        .collect();
    let results: Vec<&str> = verdicts.iter().map(|v| v.result).collect();
    let ids: Vec<Option<Uuid>> = verdicts.iter().map(|v| v.event_id).collect();
    let streams: Vec<&str> = verdicts.iter().map(|v| v.origin.stream).collect();
    let seqs: Vec<i64> = verdicts
        .iter()
        .map(|v| i64::try_from(v.origin.stream_seq).unwrap_or(i64::MAX))
        .collect();
    let stored: Vec<OffsetDateTime> = verdicts.iter().map(|v| v.origin.stored_at).collect();
    sqlx::query(RECORD_REPLAYS)
        .bind(&nonces)
        .bind(&hashes)
        .bind(&results)
        .bind(&ids)
        .bind(&streams)
        .bind(&seqs)
        .bind(&stored)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Which events carry a legacy id under which the same event is stored: a re-delivery of an
/// event stored by an earlier version (under the id its unkeyed derivation gave), and so a
/// duplicate. The same event means the same content but for the id, by [`compare`], the one
/// comparison of re-sends (with `Auditbridge-Time: received`, `occurred_at` aside too): the
/// tenant and source are part of it. A legacy id names a row with other content when a
/// producer chose it (the unkeyed derivation is computable, so anyone can name another
/// event's): that event is not a duplicate and is written under its own id like any other,
/// never dropped, and logged.
async fn legacy_duplicates(
    conn: &mut sqlx::PgConnection,
    events: &[Incoming<'_>],
) -> Result<HashSet<usize>, sqlx::Error> {
    let lookups: Vec<(usize, Uuid)> = events
        .iter()
        .enumerate()
        .filter_map(|(i, e)| Some((i, e.legacy_id.filter(|l| *l != e.event.event.id)?)))
        .collect();
    if lookups.is_empty() {
        return Ok(HashSet::new());
    }
    let mut same = HashSet::new();
    for row in compare(conn, events, &lookups).await? {
        if row.gone {
            continue;
        }
        if row.differs.is_empty() {
            same.insert(row.i);
        } else {
            let e = &events[row.i].event.event;
            tracing::warn!(
                id = %e.id,
                legacy_id = ?events[row.i].legacy_id,
                differs = %row.differs.join(", "),
                message = "A message names a stored event as its legacy id but differs from it; storing it under its own id, not as a duplicate."
            );
        }
    }
    Ok(same)
}

/// One row of [`COMPARE_STORED`]: event `i` of the batch and the stored row it was compared
/// with.
struct Compared {
    i: usize,
    tenant: String,
    source: String,
    received_at: OffsetDateTime,
    /// The id is stored but its event has expired: nothing to compare with.
    gone: bool,
    /// The top-level fields that differ (the id aside); empty for the same event.
    differs: Vec<String>,
}

/// Compares events with stored rows: each `(i, id)` compares event `i` of the batch with the
/// row stored under `id` ([`COMPARE_STORED`]). Pairs whose row does not exist are left out.
async fn compare(
    conn: &mut sqlx::PgConnection,
    events: &[Incoming<'_>],
    lookups: &[(usize, Uuid)],
) -> Result<Vec<Compared>, sqlx::Error> {
    let is: Vec<i32> = lookups
        .iter()
        .map(|&(i, _)| i32::try_from(i).unwrap_or(i32::MAX))
        .collect();
    let ids: Vec<Uuid> = lookups.iter().map(|&(_, id)| id).collect();
    let raws: Vec<String> = lookups
        .iter()
        .map(|&(i, _)| String::from_utf8_lossy(events[i].event.raw).into_owned())
        .collect();
    let loose: Vec<bool> = lookups
        .iter()
        .map(|&(i, _)| events[i].time_received)
        .collect();
    let redactions: Vec<Option<&str>> = lookups
        .iter()
        .map(|&(i, _)| events[i].event.redaction)
        .collect();
    #[allow(clippy::type_complexity)]
    let rows: Vec<(
        i32,
        Option<String>,
        Option<String>,
        OffsetDateTime,
        bool,
        Vec<String>,
    )> = sqlx::query_as(COMPARE_STORED)
        .bind(&is)
        .bind(&ids)
        .bind(&raws)
        .bind(&loose)
        .bind(&redactions)
        .fetch_all(&mut *conn)
        .await?;
    Ok(rows
        .into_iter()
        .map(|(i, tenant, source, received_at, gone, differs)| Compared {
            i: i as usize,
            tenant: tenant.unwrap_or_default(),
            source: source.unwrap_or_default(),
            received_at,
            gone,
            differs,
        })
        .collect())
}

/// The events to write, in rounds of distinct ids: round 0 holds the first event of each id,
/// round 1 the second, and so on (ids repeat in a batch when a producer re-sends with a new
/// message id). A later round meets the id stored by an earlier one and is compared with it.
fn rounds(events: &[Incoming<'_>], skip: &HashSet<usize>) -> Vec<Vec<usize>> {
    let mut seen: HashMap<Uuid, usize> = HashMap::with_capacity(events.len());
    let mut rounds: Vec<Vec<usize>> = vec![Vec::with_capacity(events.len())];
    for (i, e) in events.iter().enumerate() {
        if skip.contains(&i) {
            continue;
        }
        let n = seen.entry(e.event.event.id).or_insert(0);
        if *n == rounds.len() {
            rounds.push(Vec::new());
        }
        rounds[*n].push(i);
        *n += 1;
    }
    rounds
}

/// Writes the events by `INSERT ... ON CONFLICT (id) DO NOTHING RETURNING id`.
async fn insert_returning(
    conn: &mut sqlx::PgConnection,
    events: &[Incoming<'_>],
    idxs: &[usize],
    classes: &Classes,
) -> Result<HashSet<Uuid>, sqlx::Error> {
    let rows: Vec<NewEvent<'_>> = idxs.iter().map(|&i| events[i].event).collect();
    let rows = bind_events(sqlx::query(INSERT_EVENTS_RETURNING), &rows, classes)
        .fetch_all(&mut *conn)
        .await?;
    rows.iter().map(|row| row.try_get::<Uuid, _>(0)).collect()
}

/// [`insert_returning`] part by part inside savepoints; see [`Store::ingest_isolated`].
/// Events the database refuses alone (with a control row accepted) are added to `dead`.
async fn insert_isolated(
    conn: &mut sqlx::PgConnection,
    events: &[Incoming<'_>],
    idxs: &[usize],
    classes: &Classes,
    dead: &mut Vec<(usize, &'static str, String)>,
) -> Result<HashSet<Uuid>, StoreError> {
    let mut inserted = HashSet::new();
    // Parts still to write, the next one last.
    let mut todo: Vec<&[usize]> = vec![idxs];
    while let Some(part) = todo.pop() {
        if part.is_empty() {
            continue;
        }
        savepoint(conn, "SAVEPOINT auditbridge_part").await?;
        match insert_returning(conn, events, part, classes).await {
            Ok(ids) => {
                savepoint(conn, "RELEASE SAVEPOINT auditbridge_part").await?;
                inserted.extend(ids);
            }
            Err(e) => {
                savepoint(conn, "ROLLBACK TO SAVEPOINT auditbridge_part").await?;
                savepoint(conn, "RELEASE SAVEPOINT auditbridge_part").await?;
                if is_transient(&e) {
                    return Err(StoreError::Unavailable(e));
                }
                if let [i] = part {
                    if let Err(control) = control(conn).await {
                        return Err(StoreError::RefusesWrites { event: e, control });
                    }
                    tracing::warn!(id = %events[*i].event.event.id, error = %e, message = "PostgreSQL refused an event alone and accepted a control row; dead-lettering the event.");
                    dead.push((*i, DB_REJECTED, refusal(&e)));
                } else {
                    let (first, second) = part.split_at(part.len() / 2);
                    todo.push(second);
                    todo.push(first);
                }
            }
        }
    }
    Ok(inserted)
}

async fn savepoint(conn: &mut sqlx::PgConnection, sql: &'static str) -> Result<(), StoreError> {
    sqlx::query(sql)
        .execute(&mut *conn)
        .await
        .map(|_| ())
        .map_err(StoreError::Unavailable)
}

/// Writes a known-good row inside a savepoint and rolls it back: succeeds exactly when the
/// database takes writes into `audit_events` in this session now (permissions, read-only,
/// disk, the table and its triggers).
async fn control(conn: &mut sqlx::PgConnection) -> Result<(), sqlx::Error> {
    sqlx::query("SAVEPOINT auditbridge_control")
        .execute(&mut *conn)
        .await?;
    let result = sqlx::query(CONTROL_INSERT)
        .bind(Uuid::now_v7())
        .execute(&mut *conn)
        .await;
    sqlx::query("ROLLBACK TO SAVEPOINT auditbridge_control")
        .execute(&mut *conn)
        .await?;
    sqlx::query("RELEASE SAVEPOINT auditbridge_control")
        .execute(&mut *conn)
        .await?;
    result.map(|_| ())
}

/// The reason of a `db_rejected` dead letter: the database's SQLSTATE, message and detail.
fn refusal(e: &sqlx::Error) -> String {
    let text = match e {
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default().into_owned();
            let detail = db
                .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                .and_then(|pg| pg.detail())
                .map(|d| format!(" ({d})"))
                .unwrap_or_default();
            format!(
                "PostgreSQL refused this event alone (a control row in the same session was accepted): SQLSTATE {code}: {}{detail}",
                db.message()
            )
        }
        other => format!("PostgreSQL refused this event alone: {other}"),
    };
    truncate(text)
}

fn truncate(mut s: String) -> String {
    if let Some((at, _)) = s.char_indices().nth(MAX_REASON_CHARS) {
        s.truncate(at);
        s.push('…');
    }
    s
}

/// Compares each event whose id was stored already with the stored row. Returns the
/// conflicts (different content) with their reason; the rest are honest duplicates.
async fn compare_stored(
    conn: &mut sqlx::PgConnection,
    events: &[Incoming<'_>],
    idxs: &[usize],
) -> Result<Vec<(usize, String)>, StoreError> {
    let lookups: Vec<(usize, Uuid)> = idxs
        .iter()
        .map(|&i| (i, events[i].event.event.id))
        .collect();
    let rows = compare(conn, events, &lookups).await?;
    if rows.len() != idxs.len() {
        // `ON CONFLICT` skipped them because the id is stored, so the rows exist; if one does
        // not, something removed it meanwhile. Never count such an event as a duplicate:
        // retry the batch, which then inserts it.
        return Err(StoreError::Unavailable(sqlx::Error::RowNotFound));
    }
    let mut conflicts = Vec::new();
    for row in rows {
        let e = &events[row.i];
        if row.gone {
            let received = row.received_at.format(&Rfc3339).unwrap_or_default();
            conflicts.push((
                row.i,
                format!(
                    "id {} was stored (received {received}) and has expired under its tenant's retention policy; an expired id is never stored again",
                    e.event.event.id
                ),
            ));
            continue;
        }
        if row.differs.is_empty() {
            continue;
        }
        let fields: Vec<String> = row
            .differs
            .iter()
            .map(|k| match k.as_str() {
                "tenant" => format!("tenant ({:?} in this message)", e.event.event.tenant),
                "source" => format!("source ({:?} in this message)", e.event.event.source),
                other => other.to_owned(),
            })
            .collect();
        let received = row.received_at.format(&Rfc3339).unwrap_or_default();
        conflicts.push((
            row.i,
            truncate(format!(
                "id {} is already stored with different content (the stored event: tenant {:?}, source {:?}, received {received}); this message differs in {}",
                e.event.event.id,
                row.tenant,
                row.source,
                fields.join(", ")
            )),
        ));
    }
    Ok(conflicts)
}

/// How often one batch is written again after losing a race for an id to another batch
/// (the other one committed it: the next attempt finds it stored), before the error goes to
/// the caller, which holds the batch and retries later.
const RACE_ATTEMPTS: u32 = 5;

/// The retries of one batch inside the writer: after a race for an id, and once after a row
/// found no partition (the partitions are created, the classes read again).
#[derive(Default)]
struct Attempts {
    races: u32,
    ensured: bool,
}

impl Attempts {
    /// Whether to write the batch again after `e`.
    async fn again(&mut self, store: &Store, e: &StoreError) -> Result<bool, StoreError> {
        let Some(sql) = e.sql() else {
            return Ok(false);
        };
        if is_race(sql) && self.races + 1 < RACE_ATTEMPTS {
            self.races += 1;
            tracing::debug!(error = %sql, attempt = self.races, message = "Another batch stored an id of this batch meanwhile; writing the batch again.");
            return Ok(true);
        }
        if is_missing_partition(sql) && !self.ensured {
            self.ensured = true;
            tracing::info!(error = %sql, message = "A row found no partition; creating the partitions that are missing and writing the batch again.");
            store.refresh_retention().await?;
            store.ensure_partitions().await?;
            return Ok(true);
        }
        Ok(false)
    }
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
