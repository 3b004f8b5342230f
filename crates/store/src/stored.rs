//! The one type of a stored event as every reader gets it: the relays (through the outbox),
//! the query API (pages, one event) and the live tail. Read with `sqlx::FromRow` from the
//! columns in `stored_columns!`, so a new reader adds a query, never a mirror type.

use time::OffsetDateTime;
use uuid::Uuid;

use crate::outbox::Position;

/// A stored event: the columns readers filter and route on, and the event itself as stored.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct StoredEvent {
    pub id: Uuid,
    pub tenant: String,
    pub action: String,
    pub outcome: String,
    pub actor_id: String,
    pub target_id: Option<String>,
    pub source: String,
    pub occurred_at: OffsetDateTime,
    /// When it was stored (its transaction's start).
    pub received_at: OffsetDateTime,
    /// The event as stored: the compact JSON text of the `event` column.
    pub json: String,
}

/// The columns of [`StoredEvent`], for a `SELECT` list: a macro, so that `concat!` can build
/// whole statements from it at compile time.
macro_rules! stored_columns {
    () => {
        "id, tenant, action, outcome, actor_id, target_id, source, occurred_at, received_at, \
         event::text AS json"
    };
}
pub(crate) use stored_columns;

/// A condition that selects the row of `audit_events` stored under the id `$id` (an SQL
/// expression), for a reader of one event: `audit_events` has no index on `id`, and
/// `audit_event_ids` says where the row is (migration 0008). Its class and time prune the
/// scan to one partition when the statement runs, its (tx_id, seq) is that partition's index.
/// No row when the id is unknown or its event has expired.
macro_rules! row_of_id {
    ($alias:literal, $id:literal) => {
        concat!(
            "(",
            $alias,
            ".retention_class, ",
            $alias,
            ".received_at, ",
            $alias,
            ".tx_id, ",
            $alias,
            ".seq) = (SELECT ids.retention_class, ids.received_at, ids.tx_id, ids.seq \
             FROM audit_event_ids ids WHERE ids.id = ",
            $id,
            ")"
        )
    };
}
pub(crate) use row_of_id;

/// A stored event with its place in the outbox order (commit-safe, see [`crate::outbox`]):
/// what relays and the live tail read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEvent {
    pub position: Position,
    pub event: StoredEvent,
}

/// A row of an outbox-order read: the position's columns (the xid8 as text) and the event.
#[derive(sqlx::FromRow)]
pub(crate) struct OutboxRecord {
    tx_text: String,
    seq: i64,
    #[sqlx(flatten)]
    event: StoredEvent,
}

impl OutboxRecord {
    /// The event at its position in `generation`.
    pub(crate) fn in_generation(self, generation: i32) -> OutboxEvent {
        OutboxEvent {
            position: Position::new(generation, self.tx_text, self.seq),
            event: self.event,
        }
    }
}
