//! The tenants' verifiable logs in `log_leaves`, `log_nodes` and `log_checkpoints`
//! (migration 0007): what the sequencer appends, what proofs and audits read.
//!
//! The sequencer is the holder of the `_log` row of `destinations`: it reads the outbox after
//! that row's cursor (the relays' lease and cursor machinery), and [`Store::append_log`]
//! writes the leaves and nodes *and* moves the cursor in one transaction, fenced by the lease
//! and by the cursor it read from. So an event is sequenced exactly once: a holder that lost
//! its lease, or whose cursor someone else moved, commits nothing, and the unique keys
//! (`(tenant, log_index)`, `event_id`) refuse a repeat whatever happens.

use auditbridge_tlog::Hash;
use auditbridge_tlog::stored::StoredRange;
use time::OffsetDateTime;

use crate::outbox::Position;
use crate::{Store, StoreError};

/// The `destinations` row whose lease elects the sequencer and whose cursor is its place in
/// the outbox. Destination names start with a letter or digit, so none can take it.
pub const LOG_CURSOR: &str = "_log";

/// One leaf to append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLeaf {
    pub tenant: String,
    pub index: u64,
    pub event_id: uuid::Uuid,
    pub hash: Hash,
}

/// One stored complete subtree to append (height `8 * level`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogNode {
    pub tenant: String,
    pub level: u32,
    pub index: u64,
    pub hash: Hash,
}

/// A stored checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredCheckpoint {
    pub tenant: String,
    pub tree_size: u64,
    pub root: Hash,
    pub signed_at: OffsetDateTime,
    pub signed: bool,
    pub note: String,
}

/// Where an event is in its tenant's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    pub tenant: String,
    pub index: u64,
    pub hash: Hash,
}

/// An event as the sequencer reads it: its outbox position, id, tenant and leaf hash,
/// computed by PostgreSQL from the bytes `GET /v1/events/{id}` returns (the `event` column's
/// text): the sequencer needs no more, and the 32 bytes cross the wire instead of the event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogSource {
    pub position: Position,
    pub event_id: uuid::Uuid,
    pub tenant: String,
    pub leaf: Hash,
}

/// The leaf of log version 1, in SQL: `SHA-256(0x00 || the event's text as UTF-8)`.
macro_rules! leaf_sql {
    () => {
        "sha256('\\x00'::bytea || convert_to(event::text, 'UTF8'))"
    };
}

/// The outbox generation of the `audit_events` row `e` (its `seq` in `outbox_generations`' ranges;
/// 0 before any rebase), in SQL.
macro_rules! generation_sql {
    () => {
        "COALESCE((SELECT g.generation FROM outbox_generations g \
             WHERE g.first_seq <= e.seq ORDER BY g.first_seq DESC LIMIT 1), 0)"
    };
}

/// [`crate::outbox::READ_OUTBOX`], reading what the sequencer needs.
const READ_FOR_LOG: &str = concat!(
    "SELECT tx_id::text AS tx_text, seq, id, tenant, ",
    leaf_sql!(),
    " AS leaf FROM audit_events \
    WHERE (tx_id, seq) > ($1::text::xid8, $2) AND seq >= $4 \
      AND tx_id < pg_snapshot_xmin(pg_current_snapshot()) \
    ORDER BY tx_id, seq \
    LIMIT $3"
);

/// The same for an earlier generation (no horizon).
const READ_SEALED_FOR_LOG: &str = concat!(
    "SELECT tx_id::text AS tx_text, seq, id, tenant, ",
    leaf_sql!(),
    " AS leaf FROM audit_events \
    WHERE (tx_id, seq) > ($1::text::xid8, $2) AND seq >= $4 AND seq < $5 \
    ORDER BY tx_id, seq \
    LIMIT $3"
);

fn hash(bytes: &[u8]) -> Result<Hash, StoreError> {
    bytes
        .try_into()
        .map_err(|_| StoreError::Corrupt(format!("a log hash of {} bytes", bytes.len())))
}

fn int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Store {
    /// Creates the sequencer's row (cursor at the start: every stored event is sequenced,
    /// those stored before the log existed too) unless it exists.
    pub async fn register_log(&self) -> Result<bool, StoreError> {
        self.register_destination(LOG_CURSOR, "log", &crate::StartAt::Earliest)
            .await
    }

    /// Up to `limit` events after `after`, in commit-safe order, as the sequencer reads them.
    pub async fn read_for_log(
        &self,
        after: &Position,
        limit: usize,
    ) -> Result<Vec<LogSource>, StoreError> {
        use sqlx::Row as _;
        self.read_ordered(
            after,
            limit,
            READ_FOR_LOG,
            READ_SEALED_FOR_LOG,
            |row, generation| {
                let leaf: Vec<u8> = row.try_get("leaf")?;
                Ok(LogSource {
                    position: Position::new(
                        generation,
                        row.try_get::<String, _>("tx_text")?,
                        row.try_get("seq")?,
                    ),
                    event_id: row.try_get("id")?,
                    tenant: row.try_get("tenant")?,
                    leaf: hash(&leaf)?,
                })
            },
        )
        .await
    }

    /// The number of leaves in `tenant`'s log.
    pub async fn log_size(&self, tenant: &str) -> Result<u64, StoreError> {
        let max: Option<i64> =
            sqlx::query_scalar("SELECT max(log_index) FROM log_leaves WHERE tenant = $1")
                .bind(tenant)
                .fetch_one(&self.pool)
                .await?;
        Ok(max.map_or(0, |m| m as u64 + 1))
    }

    /// The stored nodes of each range (level 0: leaf hashes), in one round trip, each in
    /// order. A range that runs past what is stored comes back short: the caller checks.
    pub async fn log_stored(
        &self,
        tenant: &str,
        ranges: &[StoredRange],
    ) -> Result<Vec<Vec<Hash>>, StoreError> {
        let levels: Vec<i32> = ranges.iter().map(|r| r.level as i32).collect();
        let firsts: Vec<i64> = ranges.iter().map(|r| int(r.first)).collect();
        let counts: Vec<i64> = ranges.iter().map(|r| int(r.count)).collect();
        let rows: Vec<(i64, Vec<u8>)> = sqlx::query_as(
            "SELECT r.ord, x.hash FROM unnest($2::int[], $3::bigint[], $4::bigint[]) \
                 WITH ORDINALITY AS r(level, first, count, ord) \
             CROSS JOIN LATERAL ( \
                 SELECT leaf_hash AS hash, log_index AS pos FROM log_leaves \
                 WHERE r.level = 0 AND tenant = $1 \
                   AND log_index >= r.first AND log_index < r.first + r.count \
                 UNION ALL \
                 SELECT hash, node_index FROM log_nodes \
                 WHERE r.level > 0 AND tenant = $1 AND level = r.level \
                   AND node_index >= r.first AND node_index < r.first + r.count \
             ) x ORDER BY r.ord, x.pos",
        )
        .bind(tenant)
        .bind(&levels)
        .bind(&firsts)
        .bind(&counts)
        .fetch_all(&self.pool)
        .await?;
        let mut out = vec![Vec::new(); ranges.len()];
        for (ord, h) in rows {
            out[ord as usize - 1].push(hash(&h)?);
        }
        Ok(out)
    }

    /// The Merkle tree hashes of `ranges` of `tenant`'s leaves (the ranges of a proof), from
    /// the stored nodes of their complete subtrees, read in one round trip. Fails if a range
    /// reaches past what is stored.
    pub async fn log_range_hashes(
        &self,
        tenant: &str,
        ranges: &[auditbridge_tlog::tree::Range],
    ) -> Result<Vec<Hash>, StoreError> {
        let parts: Vec<Vec<auditbridge_tlog::tree::Subtree>> =
            ranges.iter().map(|r| r.subtrees()).collect();
        let wanted: Vec<StoredRange> = parts
            .iter()
            .flatten()
            .map(|s| auditbridge_tlog::stored::stored_range(*s))
            .collect();
        let stored = self.log_stored(tenant, &wanted).await?;
        let mut stored = stored.into_iter().zip(&wanted);
        let mut out = Vec::with_capacity(ranges.len());
        for (range, subtrees) in ranges.iter().zip(&parts) {
            let mut hashes = Vec::with_capacity(subtrees.len());
            for _ in subtrees {
                let (got, want) = stored.next().expect("one stored range per subtree");
                if got.len() as u64 != want.count {
                    return Err(StoreError::Corrupt(format!(
                        "tenant {tenant}'s log lacks stored nodes of level {} from {}",
                        want.level, want.first
                    )));
                }
                hashes.push(auditbridge_tlog::stored::subtree_hash(&got));
            }
            out.push(range.hash(&hashes));
        }
        Ok(out)
    }

    /// Appends leaves and nodes and moves the sequencer's cursor from `from` to `to`, in one
    /// transaction, only while `holder` holds the lease and the cursor is still at `from`.
    /// False (and nothing written) otherwise: the caller must drop what it holds in memory
    /// and start again from the stored state.
    pub async fn append_log(
        &self,
        holder: &str,
        from: &Position,
        to: &Position,
        leaves: &[LogLeaf],
        nodes: &[LogNode],
    ) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        let moved = sqlx::query(
            "UPDATE destinations SET cursor_gen = $6, cursor_tx = $3::text::xid8, cursor_seq = $4, \
                 delivered_total = delivered_total + $5, \
                 last_delivered_at = CASE WHEN $5 > 0 THEN now() ELSE last_delivered_at END \
             WHERE name = $1 AND lease_holder = $2 AND lease_expires_at > now() \
               AND (cursor_gen, cursor_tx, cursor_seq) = ($9, $7::text::xid8, $8)",
        )
        .bind(LOG_CURSOR)
        .bind(holder)
        .bind(&to.tx_id)
        .bind(to.seq)
        .bind(leaves.len() as i64)
        .bind(to.generation)
        .bind(&from.tx_id)
        .bind(from.seq)
        .bind(from.generation)
        .execute(&mut *tx)
        .await?;
        if moved.rows_affected() != 1 {
            tx.rollback().await?;
            return Ok(false);
        }
        if !leaves.is_empty() {
            let tenants: Vec<&str> = leaves.iter().map(|l| l.tenant.as_str()).collect();
            let indexes: Vec<i64> = leaves.iter().map(|l| int(l.index)).collect();
            let ids: Vec<uuid::Uuid> = leaves.iter().map(|l| l.event_id).collect();
            let hashes: Vec<&[u8]> = leaves.iter().map(|l| l.hash.as_slice()).collect();
            sqlx::query(
                "INSERT INTO log_leaves (tenant, log_index, event_id, leaf_hash) \
                 SELECT * FROM unnest($1::text[], $2::bigint[], $3::uuid[], $4::bytea[])",
            )
            .bind(&tenants)
            .bind(&indexes)
            .bind(&ids)
            .bind(&hashes)
            .execute(&mut *tx)
            .await?;
        }
        if !nodes.is_empty() {
            let tenants: Vec<&str> = nodes.iter().map(|n| n.tenant.as_str()).collect();
            let levels: Vec<i16> = nodes.iter().map(|n| n.level as i16).collect();
            let indexes: Vec<i64> = nodes.iter().map(|n| int(n.index)).collect();
            let hashes: Vec<&[u8]> = nodes.iter().map(|n| n.hash.as_slice()).collect();
            sqlx::query(
                "INSERT INTO log_nodes (tenant, level, node_index, hash) \
                 SELECT * FROM unnest($1::text[], $2::smallint[], $3::bigint[], $4::bytea[])",
            )
            .bind(&tenants)
            .bind(&levels)
            .bind(&indexes)
            .bind(&hashes)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    /// Stores a checkpoint, only while `holder` holds the sequencer's lease. False otherwise.
    pub async fn insert_checkpoint(
        &self,
        holder: &str,
        checkpoint: &StoredCheckpoint,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "INSERT INTO log_checkpoints (tenant, tree_size, root, signed_at, signed, note) \
             SELECT $2, $3, $4, $5, $6, $7 FROM destinations \
             WHERE name = $1 AND lease_holder = $8 AND lease_expires_at > now() \
             FOR SHARE",
        )
        .bind(LOG_CURSOR)
        .bind(&checkpoint.tenant)
        .bind(int(checkpoint.tree_size))
        .bind(checkpoint.root.as_slice())
        .bind(checkpoint.signed_at)
        .bind(checkpoint.signed)
        .bind(&checkpoint.note)
        .bind(holder)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Every tenant's newest checkpoint (signed or not), by tenant.
    pub async fn newest_checkpoints(&self) -> Result<Vec<StoredCheckpoint>, StoreError> {
        let rows: Vec<(String, i64, Vec<u8>, OffsetDateTime, bool, String)> = sqlx::query_as(
            "SELECT DISTINCT ON (tenant) tenant, tree_size, root, signed_at, signed, note \
             FROM log_checkpoints ORDER BY tenant, id DESC",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(checkpoint).collect()
    }

    /// `tenant`'s newest signed checkpoint.
    pub async fn newest_signed_checkpoint(
        &self,
        tenant: &str,
    ) -> Result<Option<StoredCheckpoint>, StoreError> {
        let row: Option<(String, i64, Vec<u8>, OffsetDateTime, bool, String)> = sqlx::query_as(
            "SELECT tenant, tree_size, root, signed_at, signed, note FROM log_checkpoints \
             WHERE tenant = $1 AND signed ORDER BY id DESC LIMIT 1",
        )
        .bind(tenant)
        .fetch_optional(&self.pool)
        .await?;
        row.map(checkpoint).transpose()
    }

    /// Where event `id` is in its tenant's log, if it is sequenced (`tenant`: only if it is
    /// that tenant's).
    pub async fn log_entry(
        &self,
        id: uuid::Uuid,
        tenant: Option<&str>,
    ) -> Result<Option<LogEntry>, StoreError> {
        let row: Option<(String, i64, Vec<u8>)> = sqlx::query_as(
            "SELECT tenant, log_index, leaf_hash FROM log_leaves \
             WHERE event_id = $1 AND ($2::text IS NULL OR tenant = $2)",
        )
        .bind(id)
        .bind(tenant)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|(tenant, index, h)| {
            Ok(LogEntry {
                tenant,
                index: index as u64,
                hash: hash(&h)?,
            })
        })
        .transpose()
    }

    /// Events stored but not yet in a log (the outbox after the sequencer's cursor), and
    /// the age of the oldest: the sequencer's lag.
    pub async fn log_backlog(&self) -> Result<Option<crate::Backlog>, StoreError> {
        let state = self
            .destinations()
            .await?
            .into_iter()
            .find(|d| d.name == LOG_CURSOR);
        match state {
            Some(s) => Ok(Some(self.backlog(&s.cursor).await?)),
            None => Ok(None),
        }
    }
}

type CheckpointRow = (String, i64, Vec<u8>, OffsetDateTime, bool, String);

fn checkpoint(r: CheckpointRow) -> Result<StoredCheckpoint, StoreError> {
    Ok(StoredCheckpoint {
        tenant: r.0,
        tree_size: r.1 as u64,
        root: hash(&r.2)?,
        signed_at: r.3,
        signed: r.4,
        note: r.5,
    })
}

/// One entry of a tenant's log with the event it stands for, as `auditbridge log export` and
/// `log audit` read them: what the log holds (`leaf_hash` as stored, unchecked: an audit
/// judges it) and, unless the event is gone, the event's bytes and place in commit order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedEvent {
    pub index: u64,
    pub event_id: uuid::Uuid,
    pub leaf_hash: Vec<u8>,
    pub event: Option<LoggedBody>,
}

/// The stored event behind a log entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedBody {
    /// The bytes `GET /v1/events/{id}` returns (log version 1's leaf bytes).
    pub text: String,
    /// The columns queries filter on and destinations route by, as stored beside the event:
    /// an audit checks them against the event's own fields.
    pub columns: EventColumns,
    /// Its place in the outbox's commit-safe order, the order the sequencer appended in.
    pub position: Position,
}

/// The columns of `audit_events` that repeat fields of the event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventColumns {
    pub id: uuid::Uuid,
    pub tenant: String,
    pub action: String,
    pub outcome: String,
    pub occurred_at: OffsetDateTime,
    pub actor_id: String,
    pub target_id: Option<String>,
    pub source: String,
}

/// The stored subtree hashes of a log by `(level, index)`, as read back whole for an audit.
pub type StoredNodes = std::collections::HashMap<(u32, u64), Vec<u8>>;

impl Store {
    /// Every tenant with log entries or checkpoints, in order (a loose index scan of each
    /// table: cheap however long the logs are).
    pub async fn log_tenants(&self) -> Result<Vec<String>, StoreError> {
        let tenants: Vec<String> = sqlx::query_scalar(
            "WITH RECURSIVE l(tenant) AS ( \
                 (SELECT tenant FROM log_leaves ORDER BY tenant LIMIT 1) \
                 UNION ALL \
                 SELECT (SELECT tenant FROM log_leaves WHERE tenant > l.tenant \
                         ORDER BY tenant LIMIT 1) FROM l WHERE l.tenant IS NOT NULL \
             ), c(tenant) AS ( \
                 (SELECT tenant FROM log_checkpoints ORDER BY tenant LIMIT 1) \
                 UNION ALL \
                 SELECT (SELECT tenant FROM log_checkpoints WHERE tenant > c.tenant \
                         ORDER BY tenant LIMIT 1) FROM c WHERE c.tenant IS NOT NULL \
             ) \
             SELECT tenant FROM l WHERE tenant IS NOT NULL \
             UNION SELECT tenant FROM c WHERE tenant IS NOT NULL ORDER BY 1",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(tenants)
    }

    /// Up to `limit` entries of `tenant`'s log from index `from` (entries, not indexes: a
    /// gap shows as a jump), below `end`, in order, each with its event if it is stored.
    pub async fn logged_events(
        &self,
        tenant: &str,
        from: u64,
        end: u64,
        limit: usize,
    ) -> Result<Vec<LoggedEvent>, StoreError> {
        use sqlx::Row as _;
        let rows = sqlx::query(concat!(
            "SELECT l.log_index, l.event_id, l.leaf_hash, e.event::text AS text, e.id, e.tenant, \
                    e.action, e.outcome, e.occurred_at, e.actor_id, e.target_id, e.source, \
                    e.tx_id::text AS tx_text, e.seq, ",
            generation_sql!(),
            " AS generation \
             FROM log_leaves l \
             LEFT JOIN audit_event_ids ids ON ids.id = l.event_id \
             LEFT JOIN audit_events e \
                 ON (e.retention_class, e.received_at, e.tx_id, e.seq) \
                    = (ids.retention_class, ids.received_at, ids.tx_id, ids.seq) \
             WHERE l.tenant = $1 AND l.log_index >= $2 AND l.log_index < $3 \
             ORDER BY l.log_index LIMIT $4"
        ))
        .bind(tenant)
        .bind(int(from))
        .bind(int(end))
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let text: Option<String> = r.try_get("text")?;
                let event = match text {
                    None => None,
                    Some(text) => Some(LoggedBody {
                        text,
                        columns: EventColumns {
                            id: r.try_get("id")?,
                            tenant: r.try_get("tenant")?,
                            action: r.try_get("action")?,
                            outcome: r.try_get("outcome")?,
                            occurred_at: r.try_get("occurred_at")?,
                            actor_id: r.try_get("actor_id")?,
                            target_id: r.try_get("target_id")?,
                            source: r.try_get("source")?,
                        },
                        position: Position::new(
                            r.try_get("generation")?,
                            r.try_get::<String, _>("tx_text")?,
                            r.try_get("seq")?,
                        ),
                    }),
                };
                Ok(LoggedEvent {
                    index: r.try_get::<i64, _>("log_index")? as u64,
                    event_id: r.try_get("event_id")?,
                    leaf_hash: r.try_get("leaf_hash")?,
                    event,
                })
            })
            .collect()
    }

    /// Every stored subtree hash of `tenant`'s log (levels 1 and up: 1/255 of the leaves).
    pub async fn log_nodes(&self, tenant: &str) -> Result<StoredNodes, StoreError> {
        let rows: Vec<(i16, i64, Vec<u8>)> =
            sqlx::query_as("SELECT level, node_index, hash FROM log_nodes WHERE tenant = $1")
                .bind(tenant)
                .fetch_all(&self.pool)
                .await?;
        Ok(rows
            .into_iter()
            .map(|(level, index, hash)| ((level as u32, index as u64), hash))
            .collect())
    }

    /// Every checkpoint of `tenant`, oldest first: id, whether the row says it is signed, and
    /// the note (the other columns unchecked: an audit reads the note).
    pub async fn all_checkpoints(
        &self,
        tenant: &str,
    ) -> Result<Vec<(i64, bool, String)>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT id, signed, note FROM log_checkpoints WHERE tenant = $1 ORDER BY id",
        )
        .bind(tenant)
        .fetch_all(&self.pool)
        .await?)
    }
}

/// The `destinations` row of a destination's checkpoint cursor: its `cursor_seq` is the id of
/// the last checkpoint the destination was given (or passed over by its filter).
pub fn checkpoints_cursor(destination: &str) -> String {
    format!("_checkpoints.{destination}")
}

/// A checkpoint to forward.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardCheckpoint {
    pub id: i64,
    pub tenant: String,
    pub note: String,
}

impl Store {
    /// Creates a destination's checkpoint cursor, after every checkpoint stored so far (a
    /// destination gets the checkpoints signed from its creation on; an idle tenant's is
    /// signed again within a minute), unless it exists.
    pub async fn register_checkpoint_cursor(&self, destination: &str) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "INSERT INTO destinations (name, type, cursor_tx, cursor_seq, cursor_gen) \
             SELECT $1, 'checkpoints', '0'::text::xid8, COALESCE(max(id), 0), 0 \
             FROM log_checkpoints \
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(checkpoints_cursor(destination))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// How many checkpoints were stored after id `after`.
    pub async fn checkpoints_behind(&self, after: i64) -> Result<i64, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT count(*) FROM log_checkpoints WHERE id > $1")
                .bind(after)
                .fetch_one(&self.pool)
                .await?,
        )
    }

    /// Up to `limit` checkpoints after id `after`, oldest first. Ids are in commit order: the
    /// one sequencer stores them one at a time, each insert holding its lease row against a
    /// takeover until it commits.
    pub async fn checkpoints_after(
        &self,
        after: i64,
        limit: usize,
    ) -> Result<Vec<ForwardCheckpoint>, StoreError> {
        let rows: Vec<(i64, String, String)> = sqlx::query_as(
            "SELECT id, tenant, note FROM log_checkpoints WHERE id > $1 ORDER BY id LIMIT $2",
        )
        .bind(after)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(id, tenant, note)| ForwardCheckpoint { id, tenant, note })
            .collect())
    }
}

/// What the verifiable log takes on disk (tables with their indexes and TOAST), next to the
/// trail itself, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogStorage {
    pub events: i64,
    pub leaves: i64,
    pub nodes: i64,
    pub checkpoints: i64,
}

impl Store {
    /// Every tenant's leaves, counted.
    pub async fn log_leaf_count(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar("SELECT count(*) FROM log_leaves")
            .fetch_one(&self.pool)
            .await?)
    }

    /// The log's tables' sizes next to `audit_events`'.
    pub async fn log_storage(&self) -> Result<LogStorage, StoreError> {
        let (events, leaves, nodes, checkpoints): (i64, i64, i64, i64) = sqlx::query_as(
            "SELECT pg_total_relation_size('audit_events'), pg_total_relation_size('log_leaves'), \
                    pg_total_relation_size('log_nodes'), pg_total_relation_size('log_checkpoints')",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(LogStorage {
            events,
            leaves,
            nodes,
            checkpoints,
        })
    }
}

impl Store {
    /// Up to `limit` events of `tenant` in the trail, at or before the sequencer's cursor,
    /// that no log holds: events the sequencer passed without appending, which only an
    /// insert behind its cursor (or a deleted leaf) makes. With no cursor, none.
    pub async fn unlogged_events(
        &self,
        tenant: &str,
        limit: usize,
    ) -> Result<Vec<uuid::Uuid>, StoreError> {
        let Some(cursor) = self
            .destinations()
            .await?
            .into_iter()
            .find(|d| d.name == LOG_CURSOR)
            .map(|d| d.cursor)
        else {
            return Ok(Vec::new());
        };
        Ok(sqlx::query_scalar(concat!(
            "SELECT e.id FROM audit_events e \
             WHERE e.tenant = $1 \
               AND NOT EXISTS (SELECT 1 FROM log_leaves l WHERE l.event_id = e.id) \
               AND (",
            generation_sql!(),
            ", e.tx_id, e.seq) <= ($2, $3::text::xid8, $4) \
             ORDER BY e.tx_id, e.seq LIMIT $5"
        ))
        .bind(tenant)
        .bind(cursor.generation)
        .bind(&cursor.tx_id)
        .bind(cursor.seq)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?)
    }
}
