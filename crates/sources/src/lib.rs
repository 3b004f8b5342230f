//! Ingest sources for systems that cannot speak NATS: signed webhooks (served by the API),
//! followed JSONL files (`auditbridge tail-file`) and, through the API, plain HTTP ingest.
//! Every path ends in the same JetStream subjects, so the worker stays the only way into the
//! trail: sources map, validate and publish with acks; they never write to PostgreSQL.
//!
//! - [`config`]: `[[sources]]` / `AUDITBRIDGE_SOURCES` definitions, validated.
//! - [`mapping`]: foreign JSON → v1 event, declaratively (pure); the keyed dedup id
//!   derivation.
//! - [`signature`]: the HMAC-SHA256 check of a webhook request.
//! - [`publish`]: JetStream publishing with `Nats-Msg-Id: <tenant>:<id>` and acks, retried
//!   with backoff.
//! - [`tail`]: the file follower (position persisted as inode + offset, rotation,
//!   truncation, partial lines).

pub mod config;
pub mod mapping;
pub mod publish;
pub mod signature;
pub mod tail;

pub use config::{ConfigError, FileParams, SourceConfig, SourceKind, WebhookParams, parse_sources};
pub use mapping::{
    IdKey, Mapped, Mapping, Refusal, RefusalKind, check_tenant, derive_id, legacy_derive_id,
};
pub use publish::{LEGACY_ID_HEADER, Outgoing, PublishError, Publisher, Sink, TIME_HEADER};

/// Metric names of the sources, decided in one place. Labels are bounded: `source` is a
/// configured name, `result` and `reason` are fixed sets.
pub mod metrics {
    /// Labels `source`, `result`: accepted | rejected | unauthorized | unavailable |
    /// too_large | timeout | busy.
    pub const WEBHOOK_REQUESTS: &str = "auditbridge_webhook_requests_total";
    /// Label `source`, `reason`: missing | bad_timestamp | expired | malformed | mismatch.
    pub const WEBHOOK_SIGNATURE_FAILURES: &str = "auditbridge_webhook_signature_failures_total";
    /// Label `result`: accepted | rejected.
    pub const INGEST_EVENTS: &str = "auditbridge_ingest_events_total";
    /// Labels `source`, `result`: published | rejected.
    pub const TAIL_LINES: &str = "auditbridge_tail_lines_total";
    /// Label `source`: the persisted byte offset in the current file.
    pub const TAIL_OFFSET: &str = "auditbridge_tail_offset_bytes";
    /// Label `source`.
    pub const TAIL_ROTATIONS: &str = "auditbridge_tail_rotations_total";
    /// Label `source`.
    pub const TAIL_TRUNCATIONS: &str = "auditbridge_tail_truncations_total";
    /// Label `source`: files the tail had not finished that were gone before it could read
    /// them (deleted or compressed while it was stopped); their unread lines are lost.
    pub const TAIL_FILES_LOST: &str = "auditbridge_tail_files_lost_total";
    /// Label `source`: publish attempts that failed and are being retried.
    pub const TAIL_PUBLISH_FAILURES: &str = "auditbridge_tail_publish_failures_total";
}
