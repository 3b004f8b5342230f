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
pub use publish::{
    LEGACY_ID_HEADER, Outgoing, PublishError, PublishReport, Publisher, Sink, TIME_HEADER,
    publish_all,
};
