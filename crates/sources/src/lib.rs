//! Ingest sources for systems that cannot speak NATS: signed webhooks (served by the API),
//! followed JSONL files (`auditbridge tail-file`) and, through the API, plain HTTP ingest.
//! Every path ends in the same JetStream subjects, so the worker stays the only way into the
//! trail: sources map, validate and publish with acks; they never write events to PostgreSQL.
//!
//! - [`config`]: `[[sources]]` / `AUDITBRIDGE_SOURCES` definitions, as the configuration
//!   read and checked them.
//! - [`mapping`]: foreign JSON → v1 event, declaratively (pure); the keyed dedup id
//!   derivation.
//! - [`signature`]: the HMAC-SHA256 check of a webhook request.
//! - [`publish`]: JetStream publishing with `Nats-Msg-Id: <tenant>:<id>` and acks, retried
//!   with backoff.
//! - [`tail`]: the file follower (position persisted as inode + offset, rotation,
//!   truncation, partial lines).
//! - [`poll`]: the API poller (`type = "api"`): cursor styles, leases, pages accounted for in
//!   PostgreSQL only after JetStream acknowledged their events. The one source that writes
//!   PostgreSQL, and only its own cursor, lease and rejected items.

pub mod config;
pub mod mapping;
pub mod poll;
pub mod publish;
pub mod signature;
pub mod tail;

pub use config::{FileParams, MappingConfig, SourceConfig, SourceKind, WebhookParams};
pub use mapping::{
    IdKey, Mapped, Mapping, Refusal, RefusalKind, check_tenant, derive_id, legacy_derive_id,
};
pub use publish::{
    LEGACY_ID_HEADER, Outgoing, PublishError, PublishReport, Publisher, Sink, TIME_HEADER,
    publish_all,
};

/// Source definitions for this crate's tests, read by the configuration as an operator's
/// would be.
#[cfg(test)]
pub(crate) mod test_config {
    use auditbridge_config::{Config, sources::MappingConfig};

    use crate::{Mapping, SourceKind};

    /// The id key the tests' mappings derive ids with.
    pub(crate) const ID_KEY: &str = "test-id-key-0123456789abcdef0123456789";

    /// One `{"name", "type", "params"}` definition, loaded.
    pub(crate) fn load(definition: &serde_json::Value) -> SourceKind {
        let vars = [
            ("AUDITBRIDGE_SOURCES".to_owned(), format!("[{definition}]")),
            ("AUDITBRIDGE_ID_KEY".to_owned(), ID_KEY.to_owned()),
        ];
        let mut config = Config::from_env(vars).unwrap_or_else(|e| panic!("{definition}: {e}"));
        config.sources.remove(0).kind
    }

    /// A mapping object, loaded as a file source's.
    pub(crate) fn mapping(mapping: &serde_json::Value) -> Mapping {
        let kind = load(&serde_json::json!({"name": "m", "type": "file",
            "params": {"path": "/dev/null", "mapping": mapping}}));
        let SourceKind::File(f) = kind else {
            unreachable!("a file source")
        };
        assert!(matches!(f.mapping, MappingConfig::Fields(_)));
        Mapping::new(&f.mapping)
    }
}
