//! The pull sources' state (migration 0015, `auditbridge poll`): each `api` source's cursor
//! and lease, the ids of a window's overlap, and the items no mapping took.
//!
//! **Fencing.** Every write a poller makes for a source happens in a transaction that first
//! locks the source's row and checks that the poller still holds an unexpired lease
//! ([`holds_lease`]); a poller that lost its lease (paused past its expiry, cut off) writes
//! nothing, and the new holder's cursor is never moved back. What the old holder published
//! in the meantime carries the same derived ids and deduplicates.

use serde_json::Value;
use sqlx::Row as _;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::{Store, StoreError};

/// A source's saved state, as the lease holder reads it when it takes over.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiSourceState {
    pub name: String,
    pub cursor_style: String,
    /// `None` until the first page was accounted for.
    pub cursor: Option<Value>,
    pub cursor_moved_at: Option<OffsetDateTime>,
}

/// One row for `auditbridge status`.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiSourceStatus {
    pub name: String,
    pub cursor_style: String,
    pub cursor_moved_at: Option<OffsetDateTime>,
    pub lease_holder: Option<String>,
    pub polls_total: i64,
    pub pages_total: i64,
    pub events_total: i64,
    pub rejected_total: i64,
    pub errors: Value,
    pub last_poll_at: Option<OffsetDateTime>,
    pub newest_event_at: Option<OffsetDateTime>,
    pub last_error: Option<String>,
    pub last_error_kind: Option<String>,
    pub last_error_at: Option<OffsetDateTime>,
    pub failing: bool,
    /// Rejected items not yet replayed.
    pub open_rejects: i64,
}

/// An item of a page that could not be mapped.
#[derive(Debug, Clone, PartialEq)]
pub struct NewReject {
    /// Its place in the page.
    pub index: u32,
    /// Its JSON text (or a withheld record).
    pub item: String,
    /// `RefusalKind` of the mapping, or `not_object`.
    pub kind: String,
    pub reason: String,
}

/// What one accounted-for page changes, written in one fenced transaction.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PageCommit {
    /// The cursor the page was fetched at (kept beside its rejects).
    pub fetched_at: Option<Value>,
    /// The cursor after it.
    pub cursor: Option<Value>,
    /// Events JetStream acknowledged.
    pub events: u64,
    /// The newest `occurred_at` among them.
    pub newest: Option<OffsetDateTime>,
    pub rejects: Vec<NewReject>,
    /// Ids to remember for a window's overlap, with their remote time.
    pub seen: Vec<(Uuid, OffsetDateTime)>,
    /// Forget remembered ids older than this.
    pub forget_before: Option<OffsetDateTime>,
}

/// A stored rejected item.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiReject {
    pub id: i64,
    pub source: String,
    pub cursor: Option<Value>,
    pub item_index: i32,
    pub item: String,
    pub kind: String,
    pub reason: String,
    pub rejected_at: OffsetDateTime,
    pub replayed_at: Option<OffsetDateTime>,
    pub replay_result: Option<String>,
    pub event_id: Option<Uuid>,
}

impl Store {
    /// Makes sure the source has its row. A source whose saved cursor is of another style
    /// than its configuration's is refused: the cursor's shape is the style's.
    /// `initial` is the cursor a new source starts with (a window's first high water, fixed
    /// now so that a restart does not move it).
    pub async fn register_api_source(
        &self,
        name: &str,
        style: &str,
        initial: Option<&Value>,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO api_sources (name, cursor_style, cursor) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(style)
        .bind(initial)
        .execute(&self.pool)
        .await?;
        let stored: String =
            sqlx::query_scalar("SELECT cursor_style FROM api_sources WHERE name = $1")
                .bind(name)
                .fetch_one(&self.pool)
                .await?;
        if stored != style {
            return Err(StoreError::Mismatch(format!(
                "api source {name}: its saved cursor is a {stored:?} cursor, but params.cursor \
                 is {style:?}; give the source a new name to start it afresh"
            )));
        }
        Ok(())
    }

    /// Takes (or renews) the source's lease for `holder` if it is free, expired, or already
    /// `holder`'s; its state when the lease is ours.
    pub async fn acquire_api_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: std::time::Duration,
    ) -> Result<Option<ApiSourceState>, StoreError> {
        let row = sqlx::query(
            "UPDATE api_sources SET lease_holder = $2, \
                 lease_expires_at = now() + make_interval(secs => $3) \
             WHERE name = $1 AND (lease_holder IS NULL OR lease_holder = $2 \
                 OR lease_expires_at < now()) \
             RETURNING name, cursor_style, cursor, cursor_moved_at",
        )
        .bind(name)
        .bind(holder)
        .bind(ttl.as_secs_f64())
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            Ok(ApiSourceState {
                name: r.try_get("name")?,
                cursor_style: r.try_get("cursor_style")?,
                cursor: r.try_get("cursor")?,
                cursor_moved_at: r.try_get("cursor_moved_at")?,
            })
        })
        .transpose()
    }

    /// Extends a lease `holder` still has; false if it was lost.
    pub async fn renew_api_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: std::time::Duration,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE api_sources SET lease_expires_at = now() + make_interval(secs => $3) \
             WHERE name = $1 AND lease_holder = $2 AND lease_expires_at > now()",
        )
        .bind(name)
        .bind(holder)
        .bind(ttl.as_secs_f64())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Gives the lease up at shutdown, so another poller takes over at once.
    pub async fn release_api_lease(&self, name: &str, holder: &str) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE api_sources SET lease_holder = NULL, lease_expires_at = NULL \
             WHERE name = $1 AND lease_holder = $2",
        )
        .bind(name)
        .bind(holder)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Which of `ids` a window source already published (within its overlap).
    pub async fn api_seen(&self, name: &str, ids: &[Uuid]) -> Result<Vec<Uuid>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        Ok(sqlx::query_scalar(
            "SELECT event_id FROM api_source_seen WHERE source = $1 AND event_id = ANY($2)",
        )
        .bind(name)
        .bind(ids)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Accounts for one page under `holder`'s lease: its rejects, the ids to remember, the
    /// counters and the new cursor, in one transaction. False (and nothing written) when the
    /// lease is no longer `holder`'s.
    pub async fn commit_api_page(
        &self,
        name: &str,
        holder: &str,
        page: &PageCommit,
    ) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        if !holds_lease(&mut tx, name, holder).await? {
            return Ok(false);
        }
        if !page.rejects.is_empty() {
            let indexes: Vec<i32> = page.rejects.iter().map(|r| r.index as i32).collect();
            let items: Vec<&str> = page.rejects.iter().map(|r| r.item.as_str()).collect();
            let kinds: Vec<&str> = page.rejects.iter().map(|r| r.kind.as_str()).collect();
            let reasons: Vec<String> = page.rejects.iter().map(|r| clip(&r.reason, 2000)).collect();
            sqlx::query(
                "INSERT INTO api_source_rejects (source, cursor, item_index, item, kind, reason) \
                 SELECT $1, $2, i, it, k, r FROM unnest($3::int[], $4::text[], $5::text[], \
                     $6::text[]) AS u(i, it, k, r)",
            )
            .bind(name)
            .bind(&page.fetched_at)
            .bind(&indexes)
            .bind(&items)
            .bind(&kinds)
            .bind(&reasons)
            .execute(&mut *tx)
            .await?;
        }
        if !page.seen.is_empty() {
            let ids: Vec<Uuid> = page.seen.iter().map(|s| s.0).collect();
            let times: Vec<OffsetDateTime> = page.seen.iter().map(|s| s.1).collect();
            sqlx::query(
                "INSERT INTO api_source_seen (source, event_id, occurred_at) \
                 SELECT $1, i, t FROM unnest($2::uuid[], $3::timestamptz[]) AS u(i, t) \
                 ON CONFLICT (source, event_id) DO NOTHING",
            )
            .bind(name)
            .bind(&ids)
            .bind(&times)
            .execute(&mut *tx)
            .await?;
        }
        if let Some(before) = page.forget_before {
            sqlx::query("DELETE FROM api_source_seen WHERE source = $1 AND occurred_at < $2")
                .bind(name)
                .bind(before)
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query(
            "UPDATE api_sources SET \
                 cursor_moved_at = CASE WHEN cursor IS DISTINCT FROM $2 THEN now() \
                                        ELSE cursor_moved_at END, \
                 cursor = $2, \
                 polls_total = polls_total + 1, pages_total = pages_total + 1, \
                 events_total = events_total + $3, rejected_total = rejected_total + $4, \
                 newest_event_at = greatest(newest_event_at, $5), last_poll_at = now(), \
                 failing = false \
             WHERE name = $1",
        )
        .bind(name)
        .bind(&page.cursor)
        .bind(page.events as i64)
        .bind(page.rejects.len() as i64)
        .bind(page.newest)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Records a failed poll of kind `kind` (counted in `errors`); `failing` when the API
    /// refused our credentials. Fenced like a page.
    pub async fn record_api_error(
        &self,
        name: &str,
        holder: &str,
        kind: &str,
        detail: &str,
        failing: bool,
    ) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        if !holds_lease(&mut tx, name, holder).await? {
            return Ok(false);
        }
        sqlx::query(
            "UPDATE api_sources SET polls_total = polls_total + 1, last_poll_at = now(), \
                 errors = errors || jsonb_build_object($2::text, \
                     coalesce((errors ->> $2)::bigint, 0) + 1), \
                 last_error = $3, last_error_kind = $2, last_error_at = now(), \
                 failing = $4 \
             WHERE name = $1",
        )
        .bind(name)
        .bind(kind)
        .bind(clip(detail, 2000))
        .bind(failing)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Every api source's state, for `status`.
    pub async fn api_sources(&self) -> Result<Vec<ApiSourceStatus>, StoreError> {
        let rows = sqlx::query(
            "SELECT s.name, s.cursor_style, s.cursor_moved_at, \
                 CASE WHEN s.lease_expires_at > now() THEN s.lease_holder END AS lease_holder, \
                 s.polls_total, s.pages_total, s.events_total, s.rejected_total, s.errors, \
                 s.last_poll_at, s.newest_event_at, s.last_error, s.last_error_kind, \
                 s.last_error_at, s.failing, \
                 (SELECT count(*) FROM api_source_rejects r \
                  WHERE r.source = s.name AND r.replayed_at IS NULL) AS open_rejects \
             FROM api_sources s ORDER BY s.name",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|r| {
                Ok(ApiSourceStatus {
                    name: r.try_get("name")?,
                    cursor_style: r.try_get("cursor_style")?,
                    cursor_moved_at: r.try_get("cursor_moved_at")?,
                    lease_holder: r.try_get("lease_holder")?,
                    polls_total: r.try_get("polls_total")?,
                    pages_total: r.try_get("pages_total")?,
                    events_total: r.try_get("events_total")?,
                    rejected_total: r.try_get("rejected_total")?,
                    errors: r.try_get("errors")?,
                    last_poll_at: r.try_get("last_poll_at")?,
                    newest_event_at: r.try_get("newest_event_at")?,
                    last_error: r.try_get("last_error")?,
                    last_error_kind: r.try_get("last_error_kind")?,
                    last_error_at: r.try_get("last_error_at")?,
                    failing: r.try_get("failing")?,
                    open_rejects: r.try_get("open_rejects")?,
                })
            })
            .collect()
    }

    /// A source's rejected items after `after` (by id), oldest first; only those not yet
    /// replayed when `open`.
    pub async fn api_rejects(
        &self,
        name: &str,
        open: bool,
        after: i64,
        limit: i64,
    ) -> Result<Vec<ApiReject>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, source, cursor, item_index, item, kind, reason, rejected_at, \
                 replayed_at, replay_result, event_id \
             FROM api_source_rejects \
             WHERE source = $1 AND id > $2 AND (NOT $3 OR replayed_at IS NULL) \
             ORDER BY id LIMIT $4",
        )
        .bind(name)
        .bind(after)
        .bind(open)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|r| {
                Ok(ApiReject {
                    id: r.try_get("id")?,
                    source: r.try_get("source")?,
                    cursor: r.try_get("cursor")?,
                    item_index: r.try_get("item_index")?,
                    item: r.try_get("item")?,
                    kind: r.try_get("kind")?,
                    reason: r.try_get("reason")?,
                    rejected_at: r.try_get("rejected_at")?,
                    replayed_at: r.try_get("replayed_at")?,
                    replay_result: r.try_get("replay_result")?,
                    event_id: r.try_get("event_id")?,
                })
            })
            .collect()
    }

    /// Records a replay of a rejected item: published as `event_id` (then it is no longer
    /// open), or refused again with `result`.
    pub async fn settle_api_reject(
        &self,
        id: i64,
        result: &str,
        event_id: Option<Uuid>,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE api_source_rejects SET replay_result = $2, event_id = $3, \
                 replayed_at = CASE WHEN $3::uuid IS NOT NULL THEN now() END \
             WHERE id = $1 AND replayed_at IS NULL",
        )
        .bind(id)
        .bind(clip(result, 2000))
        .bind(event_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}

/// Whether `holder` holds the source's lease, locking its row until `tx` ends.
async fn holds_lease(
    tx: &mut sqlx::PgConnection,
    name: &str,
    holder: &str,
) -> Result<bool, sqlx::Error> {
    let held: Option<i32> = sqlx::query_scalar(
        "SELECT 1 FROM api_sources \
         WHERE name = $1 AND lease_holder = $2 AND lease_expires_at > now() FOR UPDATE",
    )
    .bind(name)
    .bind(holder)
    .fetch_optional(&mut *tx)
    .await?;
    Ok(held.is_some())
}

/// At most `max` characters of `text` (reasons and errors are bounded by the table).
fn clip(text: &str, max: usize) -> String {
    if text.chars().nth(max).is_none() {
        return text.to_owned();
    }
    let at = text
        .char_indices()
        .nth(max.saturating_sub(1))
        .map_or(text.len(), |(at, _)| at);
    format!("{}…", &text[..at])
}
