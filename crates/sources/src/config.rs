//! Source definitions, as `auditbridge_config` reads and checks them at load (re-exported
//! here, where the sources have always found them).

pub use auditbridge_config::api_source::ApiParams;
pub use auditbridge_config::sources::{
    FileParams, MappingConfig, SourceConfig, SourceKind, WebhookParams,
};
