//! The size limits of event format v1: part of the contract (README, "Event format: limits").
//!
//! Every limit is in bytes of UTF-8, not characters: that is what PostgreSQL's indexes and
//! AMQP's routing keys count. They are chosen so that the database can always take what
//! validation accepts:
//!
//! - **Indexes.** A btree index entry must fit in a third of an 8 KiB page, 2,704 bytes
//!   (PostgreSQL's `BTMaxItemSize`), or the insert fails (SQLSTATE 54000) and holds its whole
//!   batch. The largest entry of any index of `audit_events` is `(tenant, actor_id,
//!   occurred_at, id)` or `(tenant, target_id, occurred_at, id)`: with ids of [`ID_BYTES`]
//!   that is about 1,140 bytes even if nothing compresses, less than half the limit, so a later
//!   index on two ids still fits. `tests/tests/e2e/limits.rs` recomputes this from the catalog for
//!   every index, so a new index on an unbounded column fails a test, not a batch.
//! - **Routing keys.** The default RabbitMQ routing key `<tenant>.<action>` must fit AMQP's
//!   255-byte short string: [`TENANT_BYTES`] + 1 + [`ACTION_BYTES`] = 255.
//! - **Numbers in metadata.** PostgreSQL's `jsonb` keeps every digit of a number as written
//!   out in plain decimal (`1e-300` becomes `0.000…1`, 302 characters) and refuses more than
//!   16,383 digits after the point. A number may take at most [`NUMBER_CHARS`] characters when
//!   written out, enough for every `f64` (`-2.2250738585072014e-308` is 327), and the
//!   payload with its numbers written out must stay within the size limit: so a 64 KiB
//!   payload cannot become megabytes of digits for every reader.
//! - **Nesting.** `metadata` may nest [`METADATA_DEPTH`] levels below itself (the JSON parser
//!   stops at 128 levels for the whole payload anyway).
//!
//! The payload itself is bounded by the configured `max_event_bytes` (64 KiB by default, at
//! most 8 MiB), far below what `jsonb` refuses (strings and keys of 256 MiB, 268 million
//! pairs), so the count and length of metadata keys need no limit of their own.

/// `tenant`: `[a-z0-9][a-z0-9_-]{0,62}`.
pub const TENANT_BYTES: usize = 63;
/// `action` as a whole: 255 − [`TENANT_BYTES`] − 1, so that `<tenant>.<action>` fits a
/// routing key.
pub const ACTION_BYTES: usize = 191;
/// One token of `action`.
pub const ACTION_TOKEN_BYTES: usize = 63;
/// Tokens of `action`.
pub const ACTION_TOKENS: usize = 8;
/// `actor.id`, `target.id` and `request_id`.
pub const ID_BYTES: usize = 1024;
/// `actor.type` and `target.type`.
pub const TYPE_BYTES: usize = 128;
/// `actor.name` and `target.name`.
pub const NAME_BYTES: usize = 1024;
/// `source`.
pub const SOURCE_BYTES: usize = 256;
/// `actor.user_agent`.
pub const USER_AGENT_BYTES: usize = 2048;
/// `reason`.
pub const REASON_BYTES: usize = 4096;
/// Levels of objects and arrays below `metadata`.
pub const METADATA_DEPTH: usize = 64;
/// Characters of one number in `metadata`, written out in plain decimal.
pub const NUMBER_CHARS: usize = 400;

/// The largest index entry PostgreSQL's btree takes with 8 KiB pages (`BTMaxItemSize`).
pub const BTREE_MAX_ITEM_BYTES: usize = 2704;
