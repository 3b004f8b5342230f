//! Retention (ARCHITECTURE.md, "Retention"): the policies in the database, the retention
//! class each new row is written with, and the partitions of `audit_events` (migration 0008).
//!
//! The configuration is the source of the policies; `migrate` writes them into
//! `retention_settings` and `retention_policies` ([`Store::apply_retention`]), where the
//! partition maintenance and expiry (both SQL, `SECURITY DEFINER`) read them. Writers cache
//! the classes ([`Store::retention_classes`]) and read them again every few seconds and
//! whenever a row finds no partition.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use time::OffsetDateTime;

use crate::{Store, StoreError};

/// The retention the configuration asks for, as `migrate` stores it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// The length of a partition (AUDITBRIDGE_PARTITION_INTERVAL), whole seconds.
    pub partition_interval: Duration,
    /// The default retention; `None` keeps forever.
    pub default_keep: Option<Duration>,
    /// Per-tenant overrides (`None`: this tenant keeps forever).
    pub tenants: Vec<(String, Option<Duration>)>,
    /// How long dead letters are kept; `None`: forever.
    pub dead_letter_keep: Option<Duration>,
}

/// A stored partition of `audit_events`.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Partition {
    pub name: String,
    /// The retention class: the seconds its tenants kept events when its rows were written
    /// (0: forever, and the legacy table).
    pub class: i64,
    /// `None` for the legacy table, which starts at the beginning of time.
    pub lower_at: Option<OffsetDateTime>,
    pub upper_at: OffsetDateTime,
    pub created_at: OffsetDateTime,
}

/// The retention class of each tenant: the whole seconds it keeps events (0: forever).
#[derive(Debug, Clone, Default)]
pub(crate) struct Classes {
    default: i64,
    tenants: HashMap<String, i64>,
    read_at: Option<Instant>,
}

/// How long a writer trusts the classes it read before reading them again.
const CLASSES_TTL: Duration = Duration::from_secs(5);

impl Classes {
    pub(crate) fn of(&self, tenant: &str) -> i64 {
        self.tenants.get(tenant).copied().unwrap_or(self.default)
    }

    fn fresh(&self) -> bool {
        self.read_at.is_some_and(|t| t.elapsed() < CLASSES_TTL)
    }
}

fn seconds(d: Option<Duration>) -> Option<i64> {
    d.map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX).max(1))
}

impl Store {
    /// The classes to write new rows with, read again when older than a few seconds.
    pub(crate) async fn retention_classes(&self) -> Result<Arc<Classes>, StoreError> {
        {
            let classes = self.classes.read().unwrap_or_else(|e| e.into_inner());
            if classes.fresh() {
                return Ok(classes.clone());
            }
        }
        self.read_classes().await
    }

    /// Reads the policies again (after `migrate` changed them, or when a row found no
    /// partition).
    pub async fn refresh_retention(&self) -> Result<(), StoreError> {
        self.read_classes().await.map(|_| ())
    }

    async fn read_classes(&self) -> Result<Arc<Classes>, StoreError> {
        let default: Option<i64> =
            sqlx::query_scalar("SELECT default_keep_s FROM retention_settings")
                .fetch_optional(&self.pool)
                .await?
                .flatten();
        let tenants: Vec<(String, Option<i64>)> =
            sqlx::query_as("SELECT tenant, keep_s FROM retention_policies")
                .fetch_all(&self.pool)
                .await?;
        let classes = Arc::new(Classes {
            default: default.unwrap_or(0),
            tenants: tenants
                .into_iter()
                .map(|(t, keep)| (t, keep.unwrap_or(0)))
                .collect(),
            read_at: Some(Instant::now()),
        });
        *self.classes.write().unwrap_or_else(|e| e.into_inner()) = classes.clone();
        Ok(classes)
    }

    /// The policies as stored.
    pub async fn retention_policy(&self) -> Result<RetentionPolicy, StoreError> {
        let (interval, default, dead): (i64, Option<i64>, Option<i64>) = sqlx::query_as(
            "SELECT partition_interval_s, default_keep_s, dead_letter_keep_s \
             FROM retention_settings",
        )
        .fetch_one(&self.pool)
        .await?;
        let tenants: Vec<(String, Option<i64>)> =
            sqlx::query_as("SELECT tenant, keep_s FROM retention_policies ORDER BY tenant")
                .fetch_all(&self.pool)
                .await?;
        let secs = |s: i64| Duration::from_secs(u64::try_from(s).unwrap_or(0));
        Ok(RetentionPolicy {
            partition_interval: secs(interval),
            default_keep: default.map(secs),
            tenants: tenants
                .into_iter()
                .map(|(t, keep)| (t, keep.map(secs)))
                .collect(),
            dead_letter_keep: dead.map(secs),
        })
    }

    /// Stores the policies (run by `migrate`, as the owner: the workers can only read them),
    /// then creates the partitions the new classes need.
    pub async fn apply_retention(&self, policy: &RetentionPolicy) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "UPDATE retention_settings SET partition_interval_s = $1, default_keep_s = $2, \
                 dead_letter_keep_s = $3, updated_at = now() \
             WHERE (partition_interval_s, default_keep_s, dead_letter_keep_s) \
                   IS DISTINCT FROM ($1, $2, $3)",
        )
        .bind(seconds(Some(policy.partition_interval)).unwrap_or(86_400))
        .bind(seconds(policy.default_keep))
        .bind(seconds(policy.dead_letter_keep))
        .execute(&mut *tx)
        .await?;
        let tenants: Vec<&str> = policy.tenants.iter().map(|(t, _)| t.as_str()).collect();
        let keeps: Vec<Option<i64>> = policy.tenants.iter().map(|(_, k)| seconds(*k)).collect();
        sqlx::query("DELETE FROM retention_policies WHERE tenant <> ALL($1::text[])")
            .bind(&tenants)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO retention_policies (tenant, keep_s) \
             SELECT * FROM UNNEST($1::text[], $2::int8[]) \
             ON CONFLICT (tenant) DO UPDATE SET keep_s = EXCLUDED.keep_s, updated_at = now() \
             WHERE retention_policies.keep_s IS DISTINCT FROM EXCLUDED.keep_s",
        )
        .bind(&tenants)
        .bind(&keeps)
        .execute(&mut *tx)
        .await?;
        sqlx::query("SELECT auditbridge_ensure_partitions()")
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        self.refresh_retention().await?;
        Ok(())
    }

    /// Creates the partitions that are missing, from one interval ago to three ahead, for
    /// every class in use; returns how many it created.
    pub async fn ensure_partitions(&self) -> Result<i32, StoreError> {
        Ok(sqlx::query_scalar("SELECT auditbridge_ensure_partitions()")
            .fetch_one(&self.pool)
            .await?)
    }

    /// The partitions of `audit_events` that exist, oldest first within each class.
    pub async fn partitions(&self) -> Result<Vec<Partition>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT p.name, p.class, \
                    CASE WHEN p.lower_at = '-infinity' THEN NULL ELSE p.lower_at END AS lower_at, \
                    p.upper_at, p.created_at \
             FROM audit_partitions p \
             WHERE p.dropped_at IS NULL AND to_regclass(format('public.%I', p.name)) IS NOT NULL \
             ORDER BY p.class, p.lower_at",
        )
        .fetch_all(&self.pool)
        .await?)
    }
}

/// One partition as `status` shows it.
#[derive(Debug, Clone)]
pub struct PartitionStatus {
    pub partition: Partition,
    /// On disk, with its indexes.
    pub bytes: i64,
    pub tenants: usize,
    /// When every tenant in it is past its retention (`None`: empty, or a tenant keeps
    /// forever); a hold can keep it longer.
    pub due_at: Option<OffsetDateTime>,
}

/// What [`Store::retention_status`] reads.
#[derive(Debug, Clone)]
pub struct RetentionStatus {
    pub policy: RetentionPolicy,
    pub partitions: Vec<PartitionStatus>,
    /// Per tenant, where its oldest partition begins (`None`: the legacy table, from the
    /// beginning): its oldest stored event was received then or later.
    pub oldest: Vec<(String, Option<OffsetDateTime>)>,
    pub holds_in_force: i64,
    pub receipts: i64,
}

impl RetentionStatus {
    /// The soonest time a partition becomes droppable.
    pub fn next_expiry(&self) -> Option<OffsetDateTime> {
        self.partitions.iter().filter_map(|p| p.due_at).min()
    }
}

/// A partition expiry may drop, with the tenants it holds and whether each is due.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub partition: Partition,
    /// Each tenant with rows in it: its retention (`None`: forever) and whether its rows
    /// are past it.
    pub tenants: Vec<(String, Option<i64>, bool)>,
    /// It ended an interval ago or more: no row can arrive in it any more (an empty
    /// partition is dropped only then).
    pub settled: bool,
}

impl Candidate {
    /// Every tenant in it is due (an empty partition: once [`Candidate::settled`]).
    pub fn all_due(&self) -> bool {
        if self.tenants.is_empty() {
            return self.settled;
        }
        self.tenants.iter().all(|(_, _, due)| *due)
    }
}

/// What expiry counted of one tenant in the partition it is expiring.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingTenant {
    pub tenant: String,
    /// Its retention in seconds; `None`: forever.
    pub keep_s: Option<i64>,
    /// Its rows in the partition are past its retention.
    pub due: bool,
    /// The holds in force that cover some of its rows in the partition.
    pub held_by: Vec<i64>,
    pub events: i64,
    /// The log indexes of its rows, as half-open ranges.
    pub log_indexes: Vec<(i64, i64)>,
    pub first_received: Option<OffsetDateTime>,
    pub last_received: Option<OffsetDateTime>,
    pub first_occurred: Option<OffsetDateTime>,
    pub last_occurred: Option<OffsetDateTime>,
    /// Rows the sequencer has not logged yet.
    pub unlogged: i64,
    /// Per destination, rows it has not been delivered yet.
    pub undelivered: Vec<(String, i64)>,
}

/// One tenant's signed receipt, for [`Expiry::commit`].
#[derive(Debug, Clone)]
pub struct Receipt {
    pub tenant: String,
    pub note: String,
    /// The tenant's newest checkpoint at the cut.
    pub tree_size: Option<i64>,
    pub root: Option<Vec<u8>>,
}

/// A stored receipt.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct StoredReceipt {
    pub id: i64,
    pub tenant: String,
    pub partition_name: String,
    pub keep_s: i64,
    pub events: i64,
    pub log_indexes: String,
    pub first_received: Option<OffsetDateTime>,
    pub last_received: Option<OffsetDateTime>,
    pub unlogged: i64,
    pub undelivered: String,
    pub tree_size: Option<i64>,
    pub signed: bool,
    pub note: String,
    pub expired_at: OffsetDateTime,
}

/// A legal hold.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Hold {
    pub id: i64,
    pub tenant: String,
    /// The held events occurred in [since, until); `None`: open.
    pub since: Option<OffsetDateTime>,
    pub until: Option<OffsetDateTime>,
    pub reason: String,
    pub created_by: String,
    pub created_at: OffsetDateTime,
    pub released_by: Option<String>,
    pub released_at: Option<OffsetDateTime>,
}

/// One partition being expired: the transaction that holds its locks
/// ([`Store::begin_expiry`]) and what it counted.
pub struct Expiry {
    tx: sqlx::Transaction<'static, sqlx::Postgres>,
    pub partition: Partition,
    pub tenants: Vec<PendingTenant>,
}

/// Reads PostgreSQL's text of an `int8multirange` (`{[1,5),[7,8)}`) as half-open ranges.
pub fn parse_multirange(text: &str) -> Option<Vec<(i64, i64)>> {
    let inner = text.trim().strip_prefix('{')?.strip_suffix('}')?;
    if inner.is_empty() {
        return Some(Vec::new());
    }
    inner
        .split("),")
        .map(|r| {
            let r = r.trim().strip_prefix('[')?.trim_end_matches(')');
            let (a, b) = r.split_once(',')?;
            Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
        })
        .collect()
}

/// Half-open ranges as a receipt writes them: `3-9,12` (inclusive ends).
pub fn ranges_text(ranges: &[(i64, i64)]) -> String {
    if ranges.is_empty() {
        return "none".to_owned();
    }
    ranges
        .iter()
        .map(|&(a, b)| {
            if b - a == 1 {
                a.to_string()
            } else {
                format!("{a}-{}", b - 1)
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

const HOLD_COLUMNS: &str =
    "id, tenant, since, until, reason, created_by, created_at, released_by, released_at";

impl Store {
    /// The partitions whose end has passed, each with its tenants (found by a skip scan of
    /// its (tenant, …) index: one probe per tenant, whatever the rows) and whether each is
    /// due. Oldest first.
    pub async fn expiry_candidates(&self) -> Result<Vec<Candidate>, StoreError> {
        // The database's clock, as the guarded path will judge by it.
        let (now, interval_s): (OffsetDateTime, i64) =
            sqlx::query_as("SELECT now(), partition_interval_s FROM retention_settings")
                .fetch_one(&self.pool)
                .await?;
        let interval = time::Duration::seconds(interval_s);
        let mut out = Vec::new();
        for partition in self.partitions().await? {
            if partition.upper_at > now {
                continue;
            }
            let settled = partition.upper_at + interval <= now;
            let tenants = self.partition_tenants(&partition).await?;
            out.push(Candidate {
                partition,
                tenants,
                settled,
            });
        }
        out.sort_by_key(|c| c.partition.upper_at);
        Ok(out)
    }

    /// The tenants with rows in `partition` (a skip scan of its (tenant, …) index: one probe
    /// per tenant, whatever the rows), each with its retention and whether it is due.
    async fn partition_tenants(
        &self,
        partition: &Partition,
    ) -> Result<Vec<(String, Option<i64>, bool)>, StoreError> {
        let lower = partition.lower_at;
        Ok(sqlx::query_as(
            "WITH RECURSIVE t(tenant) AS ( \
                 (SELECT tenant FROM audit_events \
                  WHERE retention_class = $1 AND received_at >= COALESCE($2, '-infinity') \
                    AND received_at < $3 ORDER BY tenant LIMIT 1) \
                 UNION ALL \
                 SELECT (SELECT e.tenant FROM audit_events e \
                         WHERE e.retention_class = $1 \
                           AND e.received_at >= COALESCE($2, '-infinity') \
                           AND e.received_at < $3 AND e.tenant > t.tenant \
                         ORDER BY e.tenant LIMIT 1) \
                 FROM t WHERE t.tenant IS NOT NULL \
             ) \
             SELECT t.tenant, k.keep_s, \
                    k.keep_s IS NOT NULL \
                        AND $3 + make_interval(secs => k.keep_s) <= now() \
             FROM t, LATERAL (SELECT auditbridge_keep_s(t.tenant) AS keep_s) k \
             WHERE t.tenant IS NOT NULL ORDER BY t.tenant",
        )
        .bind(partition.class)
        .bind(lower)
        .bind(partition.upper_at)
        .fetch_all(&self.pool)
        .await?)
    }

    /// What `status` and the retention gauges show: every partition with its size, tenants
    /// and the time it becomes droppable, the holds in force, the receipts, and where each
    /// tenant's oldest partition begins.
    pub async fn retention_status(&self) -> Result<RetentionStatus, StoreError> {
        let policy = self.retention_policy().await?;
        let mut partitions = Vec::new();
        let mut oldest: Vec<(String, Option<OffsetDateTime>)> = Vec::new();
        for p in self.partitions().await? {
            let bytes: i64 = sqlx::query_scalar(
                "SELECT pg_total_relation_size(format('public.%I', $1::text)::regclass)",
            )
            .bind(&p.name)
            .fetch_one(&self.pool)
            .await?;
            let tenants = self.partition_tenants(&p).await?;
            // Droppable once every tenant in it is past its retention (holds aside).
            let due_at = if tenants.is_empty() {
                None
            } else {
                tenants
                    .iter()
                    .map(|(_, keep, _)| keep.map(|k| p.upper_at + time::Duration::seconds(k)))
                    .collect::<Option<Vec<_>>>()
                    .and_then(|d| d.into_iter().max())
            };
            for (t, _, _) in &tenants {
                match oldest.iter_mut().find(|(o, _)| o == t) {
                    Some((_, from)) => {
                        if from.is_some_and(|f| p.lower_at.is_none_or(|l| l < f)) {
                            *from = p.lower_at;
                        }
                    }
                    None => oldest.push((t.clone(), p.lower_at)),
                }
            }
            partitions.push(PartitionStatus {
                partition: p,
                bytes,
                tenants: tenants.len(),
                due_at,
            });
        }
        oldest.sort();
        let (holds, receipts): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM legal_holds WHERE released_at IS NULL), \
                    (SELECT count(*) FROM retention_receipts)",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(RetentionStatus {
            policy,
            partitions,
            oldest,
            holds_in_force: holds,
            receipts,
        })
    }

    /// Step 1 of expiring `partition` (migration 0009): locks the holds, the policies and the
    /// partition, and counts what it holds per tenant. Nothing is dropped until
    /// [`Expiry::commit`]; dropping the [`Expiry`] or [`Expiry::abandon`] rolls back.
    pub async fn begin_expiry(&self, partition: &Partition) -> Result<Expiry, StoreError> {
        let mut tx = self.pool.begin().await?;
        let rows: Vec<PendingRow> = sqlx::query_as(
            "SELECT tenant, keep_s, due, held_by, events, log_indexes::text AS log_indexes, \
                    first_received, last_received, first_occurred, last_occurred, unlogged, \
                    undelivered::text AS undelivered \
             FROM auditbridge_expiry_begin($1)",
        )
        .bind(&partition.name)
        .fetch_all(&mut *tx)
        .await?;
        let tenants = rows
            .into_iter()
            .map(PendingRow::into_tenant)
            .collect::<Result<_, _>>()?;
        Ok(Expiry {
            tx,
            partition: partition.clone(),
            tenants,
        })
    }

    /// Deletes dead letters older than their retention, at most `max_rows` of each table.
    pub async fn expire_dead_letters(&self, max_rows: i32) -> Result<i64, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT auditbridge_expire_dead_letters($1)")
                .bind(max_rows)
                .fetch_one(&self.pool)
                .await?,
        )
    }

    /// Places a legal hold on `tenant`'s events that occurred in [since, until).
    pub async fn add_hold(
        &self,
        tenant: &str,
        since: Option<OffsetDateTime>,
        until: Option<OffsetDateTime>,
        reason: &str,
        by: &str,
    ) -> Result<Hold, StoreError> {
        Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "INSERT INTO legal_holds (tenant, since, until, reason, created_by) \
             VALUES ($1, $2, $3, $4, $5) RETURNING {HOLD_COLUMNS}"
        )))
        .bind(tenant)
        .bind(since)
        .bind(until)
        .bind(reason)
        .bind(by)
        .fetch_one(&self.pool)
        .await?)
    }

    /// The holds in force (with `all`, the released ones too), oldest first.
    pub async fn holds(&self, all: bool) -> Result<Vec<Hold>, StoreError> {
        Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {HOLD_COLUMNS} FROM legal_holds \
             WHERE $1 OR released_at IS NULL ORDER BY id"
        )))
        .bind(all)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Releases hold `id`; the hold as it is afterwards (released earlier: unchanged), or
    /// `None` if there is no such hold.
    pub async fn release_hold(&self, id: i64, by: &str) -> Result<Option<Hold>, StoreError> {
        sqlx::query(
            "UPDATE legal_holds SET released_by = $2, released_at = now() \
             WHERE id = $1 AND released_at IS NULL",
        )
        .bind(id)
        .bind(by)
        .execute(&self.pool)
        .await?;
        Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {HOLD_COLUMNS} FROM legal_holds WHERE id = $1"
        )))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// The retention receipts, of one tenant or all, oldest first.
    pub async fn receipts(&self, tenant: Option<&str>) -> Result<Vec<StoredReceipt>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT id, tenant, partition_name, keep_s, events, log_indexes::text AS log_indexes, \
                    first_received, last_received, unlogged, undelivered::text AS undelivered, \
                    tree_size, signed, note, expired_at \
             FROM retention_receipts WHERE $1::text IS NULL OR tenant = $1 ORDER BY id",
        )
        .bind(tenant)
        .fetch_all(&self.pool)
        .await?)
    }
}

#[derive(sqlx::FromRow)]
struct PendingRow {
    tenant: String,
    keep_s: Option<i64>,
    due: bool,
    held_by: Vec<i64>,
    events: i64,
    log_indexes: String,
    first_received: Option<OffsetDateTime>,
    last_received: Option<OffsetDateTime>,
    first_occurred: Option<OffsetDateTime>,
    last_occurred: Option<OffsetDateTime>,
    unlogged: i64,
    undelivered: String,
}

impl PendingRow {
    fn into_tenant(self) -> Result<PendingTenant, StoreError> {
        let log_indexes = parse_multirange(&self.log_indexes)
            .ok_or_else(|| StoreError::Corrupt(format!("a multirange {:?}", self.log_indexes)))?;
        let undelivered: std::collections::BTreeMap<String, i64> =
            serde_json::from_str(&self.undelivered)
                .map_err(|e| StoreError::Corrupt(format!("undelivered counts: {e}")))?;
        Ok(PendingTenant {
            tenant: self.tenant,
            keep_s: self.keep_s,
            due: self.due,
            held_by: self.held_by,
            events: self.events,
            log_indexes,
            first_received: self.first_received,
            last_received: self.last_received,
            first_occurred: self.first_occurred,
            last_occurred: self.last_occurred,
            unlogged: self.unlogged,
            undelivered: undelivered.into_iter().collect(),
        })
    }
}

impl Expiry {
    /// The tenant's newest checkpoint: its tree size and root.
    pub async fn checkpoint(&mut self, tenant: &str) -> Result<Option<(i64, Vec<u8>)>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT tree_size, root FROM log_checkpoints WHERE tenant = $1 \
             ORDER BY id DESC LIMIT 1",
        )
        .bind(tenant)
        .fetch_optional(&mut *self.tx)
        .await?)
    }

    /// Step 3: stores the receipts (one per tenant counted) and drops the partition, asking
    /// for its lock at most `attempts` times for `lock_wait` each; then commits. Returns the
    /// events that left. A refusal (not due, held, busy) rolls everything back.
    pub async fn commit(
        mut self,
        receipts: &[Receipt],
        signed: bool,
        lock_wait: Duration,
        attempts: u32,
    ) -> Result<i64, StoreError> {
        let tenants: Vec<&str> = receipts.iter().map(|r| r.tenant.as_str()).collect();
        let notes: Vec<&str> = receipts.iter().map(|r| r.note.as_str()).collect();
        let sizes: Vec<Option<i64>> = receipts.iter().map(|r| r.tree_size).collect();
        let roots: Vec<Option<&[u8]>> = receipts.iter().map(|r| r.root.as_deref()).collect();
        let events: i64 = sqlx::query_scalar(
            "SELECT auditbridge_expire_partition($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&self.partition.name)
        .bind(&tenants)
        .bind(&notes)
        .bind(signed)
        .bind(&sizes)
        .bind(&roots)
        .bind(i32::try_from(lock_wait.as_millis()).unwrap_or(i32::MAX))
        .bind(i32::try_from(attempts).unwrap_or(i32::MAX))
        .fetch_one(&mut *self.tx)
        .await?;
        self.tx.commit().await?;
        Ok(events)
    }

    /// Rolls back: the locks go, nothing changed.
    pub async fn abandon(self) -> Result<(), StoreError> {
        self.tx.rollback().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multiranges_read_and_write_as_receipts_show_them() {
        assert_eq!(parse_multirange("{}"), Some(vec![]));
        let r = parse_multirange("{[0,5),[7,8),[10,12)}").unwrap();
        assert_eq!(r, vec![(0, 5), (7, 8), (10, 12)]);
        assert_eq!(ranges_text(&r), "0-4,7,10-11");
        assert_eq!(ranges_text(&[]), "none");
        assert_eq!(parse_multirange("[0,5)"), None);
        assert_eq!(parse_multirange("{[a,5)}"), None);
    }
}

/// Which rows readers must no longer be served: those past their tenant's retention that no
/// hold in force covers. Expiry drops them within an interval; until then the query API,
/// the live tail and `log export` hide them ([`Hidden::push_sql`]).
#[derive(Debug, Clone, Default)]
pub struct Hidden {
    /// Rows received before this are past the default retention (`None`: forever).
    default_cutoff: Option<OffsetDateTime>,
    /// Per tenant with a policy of its own: its cutoff (`None`: forever).
    tenants: Vec<(String, Option<OffsetDateTime>)>,
    /// The holds in force: tenant and the `occurred_at` range.
    holds: Vec<(String, Option<OffsetDateTime>, Option<OffsetDateTime>)>,
    read_at: Option<Instant>,
}

/// How long readers trust the cutoffs they read.
const HIDDEN_TTL: Duration = Duration::from_secs(1);

impl Hidden {
    fn cutoff(&self, tenant: &str) -> Option<OffsetDateTime> {
        match self.tenants.iter().find(|(t, _)| t == tenant) {
            Some((_, c)) => *c,
            None => self.default_cutoff,
        }
    }

    /// Whether nothing can be hidden (no finite retention).
    fn nothing(&self) -> bool {
        self.default_cutoff.is_none() && self.tenants.iter().all(|(_, c)| c.is_none())
    }

    /// The same test as [`Hidden::push_sql`], for a row in memory.
    pub fn hides(
        &self,
        tenant: &str,
        received_at: OffsetDateTime,
        occurred_at: OffsetDateTime,
    ) -> bool {
        let Some(cutoff) = self.cutoff(tenant) else {
            return false;
        };
        received_at < cutoff
            && !self.holds.iter().any(|(t, since, until)| {
                t == tenant
                    && since.is_none_or(|s| occurred_at >= s)
                    && until.is_none_or(|u| occurred_at < u)
            })
    }

    /// Appends ` AND NOT (<past retention> AND NOT <held>)` for rows of `tenant` (all
    /// tenants: `None`) with columns `tenant`, `received_at` and `occurred_at`.
    pub(crate) fn push_sql(
        &self,
        q: &mut sqlx::QueryBuilder<sqlx::Postgres>,
        tenant: Option<&str>,
    ) {
        if self.nothing() {
            return;
        }
        match tenant {
            Some(t) => {
                let Some(cutoff) = self.cutoff(t) else {
                    return;
                };
                q.push(" AND NOT (received_at < ").push_bind(cutoff);
            }
            None => {
                // A CASE over the tenants with policies of their own (none: the default
                // alone); NULL (forever) never hides.
                q.push(" AND NOT (coalesce(received_at < ");
                if self.tenants.is_empty() {
                    q.push_bind(self.default_cutoff).push("::timestamptz");
                } else {
                    q.push("CASE tenant");
                    for (t, c) in &self.tenants {
                        q.push(" WHEN ")
                            .push_bind(t.clone())
                            .push(" THEN ")
                            .push_bind(*c);
                    }
                    q.push(" ELSE ")
                        .push_bind(self.default_cutoff)
                        .push("::timestamptz END");
                }
                q.push(", false)");
            }
        }
        for (t, since, until) in &self.holds {
            if tenant.is_some_and(|want| want != t) {
                continue;
            }
            q.push(" AND NOT (tenant = ").push_bind(t.clone());
            if let Some(s) = since {
                q.push(" AND occurred_at >= ").push_bind(*s);
            }
            if let Some(u) = until {
                q.push(" AND occurred_at < ").push_bind(*u);
            }
            q.push(")");
        }
        q.push(")");
    }
}

impl Store {
    /// How many of `tenant`'s stored events are hidden now (past its retention, under no
    /// hold, not yet dropped).
    pub async fn hidden_count(&self, tenant: &str) -> Result<i64, StoreError> {
        let hidden = self.hidden().await?;
        let mut q = sqlx::QueryBuilder::<sqlx::Postgres>::new(
            "SELECT count(*) FROM audit_events WHERE tenant = ",
        );
        q.push_bind(tenant.to_owned());
        // The rows the filter keeps are the served ones: count the others.
        let all: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_events WHERE tenant = $1")
            .bind(tenant)
            .fetch_one(&self.pool)
            .await?;
        hidden.push_sql(&mut q, Some(tenant));
        let served: i64 = q.build_query_scalar().fetch_one(&self.pool).await?;
        Ok(all - served)
    }

    /// What readers must hide now, read again when older than a second.
    pub async fn hidden(&self) -> Result<Arc<Hidden>, StoreError> {
        {
            let hidden = self.hidden.read().unwrap_or_else(|e| e.into_inner());
            if hidden.read_at.is_some_and(|t| t.elapsed() < HIDDEN_TTL) {
                return Ok(hidden.clone());
            }
        }
        let (default_cutoff,): (Option<OffsetDateTime>,) = sqlx::query_as(
            "SELECT now() - make_interval(secs => default_keep_s) FROM retention_settings",
        )
        .fetch_one(&self.pool)
        .await?;
        let tenants: Vec<(String, Option<OffsetDateTime>)> = sqlx::query_as(
            "SELECT tenant, now() - make_interval(secs => keep_s) FROM retention_policies \
             ORDER BY tenant",
        )
        .fetch_all(&self.pool)
        .await?;
        let holds: Vec<(String, Option<OffsetDateTime>, Option<OffsetDateTime>)> = sqlx::query_as(
            "SELECT tenant, since, until FROM legal_holds WHERE released_at IS NULL \
                 ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await?;
        let hidden = Arc::new(Hidden {
            default_cutoff,
            tenants,
            holds,
            read_at: Some(Instant::now()),
        });
        *self.hidden.write().unwrap_or_else(|e| e.into_inner()) = hidden.clone();
        Ok(hidden)
    }
}
