//! Read queries behind the query API (`auditbridge serve`): a tenant's trail filtered and paged
//! by keyset, one event by id, the live tail's reads in commit-safe order, and counts for
//! charts.
//!
//! Every filter is built from bound parameters (never spliced text). Paging is by keyset on
//! `(occurred_at, id)`, which the `(tenant, occurred_at, id)` index serves in either direction,
//! so a deep page costs what the first one does, and nothing here counts the whole result.

use sqlx::{Postgres, QueryBuilder};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::outbox::{Generation, Position, StartAt};
use crate::stored::{OutboxEvent, OutboxRecord, StoredEvent, row_of_id, stored_columns};
use crate::{Store, StoreError};

/// Values a field must (or must not) have. Empty lists mean "no condition".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Condition {
    /// The field must equal one of these (for `action`: be one of them or below it).
    pub include: Vec<String>,
    /// The field must equal none of these (for `action`: be none of them nor below them).
    pub exclude: Vec<String>,
}

impl Condition {
    pub fn is_empty(&self) -> bool {
        self.include.is_empty() && self.exclude.is_empty()
    }

    /// Equality semantics (actor, target, source, outcome). A missing value (an event without
    /// a target) matches no `include` and no `exclude`.
    fn matches_exact(&self, value: Option<&str>) -> bool {
        let hit = |list: &[String]| value.is_some_and(|v| list.iter().any(|x| x == v));
        (self.include.is_empty() || hit(&self.include)) && !hit(&self.exclude)
    }

    /// Hierarchy semantics (action): `document` matches `document` and `document.update`, not
    /// `documents.x`.
    fn matches_action(&self, action: &str) -> bool {
        let hit = |list: &[String]| list.iter().any(|p| action_under(action, p));
        (self.include.is_empty() || hit(&self.include)) && !hit(&self.exclude)
    }
}

/// Whether `action` is `prefix` or lies below it in the hierarchy.
pub fn action_under(action: &str, prefix: &str) -> bool {
    action
        .strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
}

/// Which events a query or a live tail wants.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventFilter {
    /// `None` only for an administrator's live tail of every tenant.
    pub tenant: Option<String>,
    pub actor: Condition,
    pub target: Condition,
    pub source: Condition,
    pub outcome: Condition,
    pub action: Condition,
    /// `occurred_at` at or after (inclusive).
    pub since: Option<OffsetDateTime>,
    /// `occurred_at` before (exclusive).
    pub until: Option<OffsetDateTime>,
}

impl EventFilter {
    /// The same test as the SQL of [`EventFilter::push_sql`], for rows already in memory (the
    /// live tail's shared reads).
    pub fn matches(&self, row: &StoredEvent) -> bool {
        self.tenant.as_deref().is_none_or(|t| t == row.tenant)
            && self.actor.matches_exact(Some(&row.actor_id))
            && self.target.matches_exact(row.target_id.as_deref())
            && self.source.matches_exact(Some(&row.source))
            && self.outcome.matches_exact(Some(&row.outcome))
            && self.action.matches_action(&row.action)
            && self.since.is_none_or(|s| row.occurred_at >= s)
            && self.until.is_none_or(|u| row.occurred_at < u)
    }

    /// Appends ` AND ...` conditions for this filter.
    fn push_sql(&self, q: &mut QueryBuilder<Postgres>) {
        if let Some(t) = &self.tenant {
            q.push(" AND tenant = ").push_bind(t.clone());
        }
        for (column, c) in [
            ("actor_id", &self.actor),
            ("target_id", &self.target),
            ("source", &self.source),
            ("outcome", &self.outcome),
        ] {
            match c.include.as_slice() {
                [] => {}
                // One value as plain equality: PostgreSQL (before 17) does not read an index
                // in order for `= ANY(...)`, even of one element, and would fetch and sort
                // every match instead of reading a page off the index.
                [one] => {
                    q.push(format_args!(" AND {column} = "))
                        .push_bind(one.clone());
                }
                many => {
                    q.push(format_args!(" AND {column} = ANY("))
                        .push_bind(many.to_vec())
                        .push(")");
                }
            }
            if !c.include.is_empty() && column == "target_id" {
                // Implied already, but spelled out so the planner can use the partial index
                // on (tenant, target_id, occurred_at, id) WHERE target_id IS NOT NULL.
                q.push(" AND target_id IS NOT NULL");
            }
            if !c.exclude.is_empty() {
                // NULL (no target) is "not one of these", so it stays in.
                q.push(format_args!(" AND NOT coalesce({column} = ANY("))
                    .push_bind(c.exclude.clone())
                    .push("), false)");
            }
        }
        // `action` is COLLATE "C", so a child range is a byte range: everything that starts
        // with "document." sorts at or after "document." and before "document/" ('/' follows
        // '.'). That form uses the (tenant, action, occurred_at) index; LIKE would need
        // escaping of '_' and is no faster.
        let push_action = |q: &mut QueryBuilder<Postgres>, p: &String| {
            q.push("(action = ")
                .push_bind(p.clone())
                .push(" OR (action >= ")
                .push_bind(format!("{p}."))
                .push(" AND action < ")
                .push_bind(format!("{p}/"))
                .push("))");
        };
        if !self.action.include.is_empty() {
            q.push(" AND (");
            for (i, p) in self.action.include.iter().enumerate() {
                if i > 0 {
                    q.push(" OR ");
                }
                push_action(q, p);
            }
            q.push(")");
        }
        for p in &self.action.exclude {
            q.push(" AND NOT ");
            push_action(q, p);
        }
        if let Some(s) = self.since {
            q.push(" AND occurred_at >= ").push_bind(s);
        }
        if let Some(u) = self.until {
            q.push(" AND occurred_at < ").push_bind(u);
        }
    }
}

/// Page direction, by `(occurred_at, id)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    Asc,
    Desc,
}

/// One page of a tenant's trail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageQuery {
    pub filter: EventFilter,
    pub order: Order,
    /// Continue after this `(occurred_at, id)` (the last row of the previous page).
    pub after: Option<(OffsetDateTime, Uuid)>,
    pub limit: u32,
}

/// Counts for one time bucket of [`Store::stats`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatsRow {
    pub bucket: OffsetDateTime,
    /// The action cut to the requested depth (`document.share.revoke` at depth 1: `document`).
    pub action: String,
    pub outcome: String,
    pub count: i64,
}

/// What one bounded read of the live tail's replay found ([`Store::tail_scan`]).
#[derive(Debug, Default)]
pub struct TailScan {
    /// The matching rows, in commit-safe order.
    pub rows: Vec<OutboxEvent>,
    /// The last position the read covered; `None` when it covered nothing beyond the last
    /// row (the end of the trail, below the horizon).
    pub scanned_to: Option<Position>,
    /// Whether rows beyond `scanned_to` may be there now: read again from it. `false` means
    /// the read reached the horizon.
    pub more: bool,
}

// As in the outbox, the xid8 leaves as text under another name, so ORDER BY sorts the xid8.
const TAIL_COLUMNS: &str = concat!(
    "SELECT tx_id::text AS tx_text, seq, ",
    stored_columns!(),
    " FROM audit_events WHERE (tx_id, seq) > ("
);

/// Completes `WHERE (tx_id, seq) > (` with `from` and the bounds of generation `g`: its seq
/// range and, for the current generation, the commit-safe horizon (an earlier generation is
/// all committed: no horizon, see `crate::outbox`).
fn push_range(q: &mut QueryBuilder<Postgres>, from: &Position, g: &Generation) {
    q.push_bind(from.tx_id.clone())
        .push("::xid8, ")
        .push_bind(from.seq)
        .push(") AND seq >= ")
        .push_bind(g.first_seq);
    match g.end_seq {
        Some(end) => {
            q.push(" AND seq < ").push_bind(end);
        }
        None => {
            q.push(" AND tx_id < pg_snapshot_xmin(pg_current_snapshot())");
        }
    }
}

impl Store {
    /// One page of the trail, newest or oldest first, after the keyset `after`.
    pub async fn page(&self, query: &PageQuery) -> Result<Vec<StoredEvent>, StoreError> {
        let hidden = self.hidden().await?;
        let mut q = QueryBuilder::<Postgres>::new(concat!(
            "SELECT ",
            stored_columns!(),
            " FROM audit_events WHERE true"
        ));
        query.filter.push_sql(&mut q);
        hidden.push_sql(&mut q, query.filter.tenant.as_deref());
        let (cmp, dir) = match query.order {
            Order::Asc => (">", "ASC"),
            Order::Desc => ("<", "DESC"),
        };
        if let Some((t, id)) = query.after {
            q.push(format_args!(" AND (occurred_at, id) {cmp} ("))
                .push_bind(t)
                .push(", ")
                .push_bind(id)
                .push(")");
        }
        q.push(format_args!(" ORDER BY occurred_at {dir}, id {dir} LIMIT "))
            .push_bind(i64::from(query.limit));
        Ok(q.build_query_as().fetch_all(&self.pool).await?)
    }

    /// One event by id, if it is stored (and belongs to `tenant`, when given).
    pub async fn event(
        &self,
        id: Uuid,
        tenant: Option<&str>,
    ) -> Result<Option<StoredEvent>, StoreError> {
        let hidden = self.hidden().await?;
        let row: Option<StoredEvent> = sqlx::query_as(concat!(
            "SELECT ",
            stored_columns!(),
            " FROM audit_events e WHERE ",
            row_of_id!("e", "$1"),
            " AND ($2::text IS NULL OR tenant = $2)"
        ))
        .bind(id)
        .bind(tenant)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.filter(|r| !hidden.hides(&r.tenant, r.received_at, r.occurred_at)))
    }

    /// Up to `limit` events after `after` in commit-safe order (see [`crate::outbox`]) that
    /// match `filter` (all events when `None`). The live tail replays with a filter, and its
    /// shared follower reads everything once without one.
    pub async fn tail(
        &self,
        after: &Position,
        filter: Option<&EventFilter>,
        limit: u32,
    ) -> Result<Vec<OutboxEvent>, StoreError> {
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        let (gens, Some(mut i), mut from) = self.read_plan(after).await? else {
            return Ok(Vec::new());
        };
        let hidden = self.hidden().await?;
        let mut out = Vec::new();
        loop {
            let g = &gens[i];
            let mut q = QueryBuilder::<Postgres>::new(TAIL_COLUMNS);
            push_range(&mut q, &from, g);
            if let Some(f) = filter {
                f.push_sql(&mut q);
            }
            hidden.push_sql(&mut q, filter.and_then(|f| f.tenant.as_deref()));
            q.push(" ORDER BY tx_id, seq LIMIT ")
                .push_bind(i64::try_from(limit - out.len()).unwrap_or(i64::MAX));
            let rows: Vec<OutboxRecord> = q.build_query_as().fetch_all(&self.pool).await?;
            out.extend(rows.into_iter().map(|r| r.in_generation(g.generation)));
            if out.len() >= limit || i + 1 == gens.len() {
                return Ok(out);
            }
            i += 1;
            from = Position::new(gens[i].generation, "0", 0);
        }
    }

    /// Up to `limit` events matching `filter` among at most `scan` positions after `after`
    /// in commit-safe order: the live tail's replay. Each call reads a bounded range of the
    /// outbox order whatever the filter matches in it, so a reader whose rows are rare among
    /// very many others (a small tenant behind a large one, a filter no index serves) moves
    /// forward by `scan` positions per statement instead of scanning to the end of the trail
    /// in one statement that the statement timeout cancels, again and again, at the same
    /// place.
    ///
    /// [`TailScan::scanned_to`] is the last position read (every matching row up to it is in
    /// `rows`): a valid resume point even when `rows` is empty.
    pub async fn tail_scan(
        &self,
        after: &Position,
        filter: &EventFilter,
        limit: u32,
        scan: u32,
    ) -> Result<TailScan, StoreError> {
        let (gens, Some(mut i), mut from) = self.read_plan(after).await? else {
            return Ok(TailScan::default());
        };
        let hidden = self.hidden().await?;
        let scan = i64::from(scan.max(1));
        loop {
            let g = &gens[i];
            // The end of this range: the `scan`-th position after `from`, an index-only walk
            // of `audit_events_outbox_order`. `None` when fewer remain below the horizon.
            let mut q = QueryBuilder::<Postgres>::new(
                "SELECT tx_id::text AS tx_text, seq FROM audit_events WHERE (tx_id, seq) > (",
            );
            push_range(&mut q, &from, g);
            q.push(" ORDER BY tx_id, seq OFFSET ")
                .push_bind(scan - 1)
                .push(" LIMIT 1");
            let end: Option<(String, i64)> = q.build_query_as().fetch_optional(&self.pool).await?;
            // The matching rows in (from, end]. Everything at or below `end` is committed
            // (its tx_id is below the horizon of the statement that found it, and the horizon
            // only moves forward), so this statement sees the whole range.
            let mut q = QueryBuilder::<Postgres>::new(TAIL_COLUMNS);
            push_range(&mut q, &from, g);
            if let Some((tx, seq)) = &end {
                q.push(" AND (tx_id, seq) <= (")
                    .push_bind(tx.clone())
                    .push("::xid8, ")
                    .push_bind(*seq)
                    .push(")");
            }
            filter.push_sql(&mut q);
            hidden.push_sql(&mut q, filter.tenant.as_deref());
            q.push(" ORDER BY tx_id, seq LIMIT ")
                .push_bind(i64::from(limit));
            let rows: Vec<OutboxRecord> = q.build_query_as().fetch_all(&self.pool).await?;
            let rows: Vec<OutboxEvent> = rows
                .into_iter()
                .map(|r| r.in_generation(g.generation))
                .collect();
            if rows.len() >= limit as usize {
                // The range holds more matches than one answer: resume after the last one.
                let scanned_to = rows.last().map(|r| r.position.clone());
                return Ok(TailScan {
                    rows,
                    scanned_to,
                    more: true,
                });
            }
            if let Some((tx, seq)) = end {
                return Ok(TailScan {
                    rows,
                    scanned_to: Some(Position::new(g.generation, tx, seq)),
                    more: true,
                });
            }
            // This generation is read to its end (or to the horizon).
            if !rows.is_empty() || i + 1 == gens.len() {
                let more = i + 1 < gens.len();
                let scanned_to = rows.last().map(|r| r.position.clone());
                return Ok(TailScan {
                    rows,
                    scanned_to,
                    more,
                });
            }
            i += 1;
            from = Position::new(gens[i].generation, "0", 0);
        }
    }

    /// The position of the newest event a commit-safe reader can have passed right now: a
    /// live tail without a cursor starts here.
    pub async fn tail_head(&self) -> Result<Position, StoreError> {
        // The same position a destination created with `start: now` begins at.
        self.position_for(&StartAt::Now).await
    }

    /// Counts by time bucket, action (cut to `depth` tokens) and outcome, for `filter`'s time
    /// window. Buckets start at `origin` and are `bucket` long.
    pub async fn stats(
        &self,
        filter: &EventFilter,
        origin: OffsetDateTime,
        bucket: std::time::Duration,
        depth: u32,
    ) -> Result<Vec<StatsRow>, StoreError> {
        let mut q = QueryBuilder::<Postgres>::new("SELECT date_bin(make_interval(secs => ");
        q.push_bind(bucket.as_secs_f64())
            .push("), occurred_at, ")
            .push_bind(origin)
            .push(") AS bucket, array_to_string((string_to_array(action, '.'))[1:")
            .push_bind(i32::try_from(depth).unwrap_or(i32::MAX))
            .push("], '.') AS grp, outcome, count(*) FROM audit_events WHERE true");
        filter.push_sql(&mut q);
        self.hidden()
            .await?
            .push_sql(&mut q, filter.tenant.as_deref());
        q.push(" GROUP BY 1, 2, 3 ORDER BY 1, 2, 3");
        let rows: Vec<(OffsetDateTime, String, String, i64)> =
            q.build_query_as().fetch_all(&self.pool).await?;
        Ok(rows
            .into_iter()
            .map(|(bucket, action, outcome, count)| StatsRow {
                bucket,
                action,
                outcome,
                count,
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cond(include: &[&str], exclude: &[&str]) -> Condition {
        Condition {
            include: include.iter().map(|s| (*s).to_owned()).collect(),
            exclude: exclude.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    #[test]
    fn action_prefixes_stop_at_token_boundaries() {
        assert!(action_under("document", "document"));
        assert!(action_under("document.update", "document"));
        assert!(action_under("document.share.revoke", "document"));
        assert!(action_under("document.share.revoke", "document.share"));
        assert!(!action_under("documents.x", "document"));
        assert!(!action_under("document", "document.update"));
        assert!(!action_under("doc", "document"));
        let c = cond(&["document"], &["document.share"]);
        assert!(c.matches_action("document.update"));
        assert!(!c.matches_action("document.share.revoke"));
        assert!(!c.matches_action("documents.x"));
    }

    #[test]
    fn a_missing_target_matches_no_include_and_no_exclude() {
        assert!(!cond(&["doc-1"], &[]).matches_exact(None));
        assert!(cond(&[], &["doc-1"]).matches_exact(None));
        assert!(cond(&[], &["doc-1"]).matches_exact(Some("doc-2")));
        assert!(!cond(&[], &["doc-1"]).matches_exact(Some("doc-1")));
    }
}
