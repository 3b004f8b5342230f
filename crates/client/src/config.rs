//! Backing store configuration: in code, or from one JSON environment variable.

use std::path::PathBuf;
use std::time::Duration;

use auditbridge_config::SecretUrl;
use serde::Deserialize;

use crate::error::ConfigError;

/// The environment variable that selects the backing store, e.g.
/// `{"type":"file","params":{"dir":"/var/lib/myservice/audit"}}`.
pub const STORE_ENV: &str = "AUDITBRIDGE_CLIENT_STORE";

/// Where events wait while NATS is unreachable or slow.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(
    tag = "type",
    content = "params",
    rename_all = "lowercase",
    deny_unknown_fields
)]
pub enum StoreConfig {
    /// In process memory, bounded. Survives a NATS outage, not a restart of the service.
    Memory(MemoryParams),
    /// Append-only JSON Lines segments in a directory. Survives restarts.
    File(FileParams),
    /// A table in the service's own PostgreSQL database (for services without volumes).
    Postgres(PostgresParams),
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig::Memory(MemoryParams::default())
    }
}

impl StoreConfig {
    /// Parses the JSON form `{"type": "memory" | "file" | "postgres", "params": {...}}`.
    /// Unknown keys are refused.
    pub fn from_json(json: &str) -> Result<StoreConfig, ConfigError> {
        // `params` may be left out when every param has a default.
        let mut value: serde_json::Value = serde_json::from_str(json)
            .map_err(|e| ConfigError::new(STORE_ENV, format!("not valid JSON: {e}")))?;
        if let Some(object) = value.as_object_mut()
            && !object.contains_key("params")
        {
            object.insert("params".into(), serde_json::json!({}));
        }
        let config: StoreConfig = serde_json::from_value(value)
            .map_err(|e| ConfigError::new(STORE_ENV, e.to_string()))?;
        config.check()?;
        Ok(config)
    }

    /// Reads [`STORE_ENV`]; `None` when it is unset or empty.
    pub fn from_env() -> Result<Option<StoreConfig>, ConfigError> {
        match std::env::var(STORE_ENV) {
            Ok(v) if !v.trim().is_empty() => StoreConfig::from_json(&v).map(Some),
            Ok(_) | Err(std::env::VarError::NotPresent) => Ok(None),
            Err(e) => Err(ConfigError::new(STORE_ENV, e.to_string())),
        }
    }

    /// The store's name: `memory`, `file` or `postgres` (also the `store` metric label).
    pub fn kind(&self) -> &'static str {
        match self {
            StoreConfig::Memory(_) => "memory",
            StoreConfig::File(_) => "file",
            StoreConfig::Postgres(_) => "postgres",
        }
    }

    pub(crate) fn check(&self) -> Result<(), ConfigError> {
        let positive = |name: &str, v: u64| {
            if v == 0 {
                Err(ConfigError::new(
                    format!("{} param {name}", self.kind()),
                    "must be greater than 0",
                ))
            } else {
                Ok(())
            }
        };
        match self {
            StoreConfig::Memory(p) => {
                positive("max_events", p.max_events)?;
                positive("max_bytes", p.max_bytes)
            }
            StoreConfig::File(p) => {
                positive("segment_bytes", p.segment_bytes)?;
                positive("max_bytes", p.max_bytes)?;
                if p.dir.as_os_str().is_empty() {
                    return Err(ConfigError::new("file param dir", "must not be empty"));
                }
                Ok(())
            }
            StoreConfig::Postgres(p) => {
                positive("max_events", p.max_events)?;
                positive("max_bytes", p.max_bytes)?;
                let ok = p.table.len() <= 58
                    && p.table
                        .starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
                    && p.table
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
                if !ok {
                    return Err(ConfigError::new(
                        "postgres param table",
                        format!(
                            "expected [a-z_][a-z0-9_]{{0,57}} (the dead-letter table adds _dead), got {:?}",
                            p.table
                        ),
                    ));
                }
                Ok(())
            }
        }
    }
}

/// `memory` store params.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MemoryParams {
    /// Most events held (default 100,000).
    pub max_events: u64,
    /// Most payload bytes held (default 64 MiB).
    pub max_bytes: u64,
}

impl Default for MemoryParams {
    fn default() -> Self {
        MemoryParams {
            max_events: 100_000,
            max_bytes: 64 << 20,
        }
    }
}

/// `file` store params.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileParams {
    /// The directory (created if missing). One client at a time: it is locked.
    pub dir: PathBuf,
    /// A segment is closed and a new one started past this size (default 16 MiB).
    #[serde(default = "FileParams::default_segment_bytes")]
    pub segment_bytes: u64,
    /// The most disk the segments may use (default 1 GiB); beyond it the store is full.
    #[serde(default = "FileParams::default_max_bytes")]
    pub max_bytes: u64,
    /// When written events reach the disk (default `always`).
    #[serde(default)]
    pub fsync: Fsync,
    /// For `fsync: "interval"`: the longest a write stays unsynced (default `1s`).
    #[serde(
        default = "FileParams::default_fsync_interval",
        with = "humantime_serde"
    )]
    pub fsync_interval: Duration,
}

impl FileParams {
    /// Defaults for everything but the directory.
    pub fn new(dir: impl Into<PathBuf>) -> FileParams {
        FileParams {
            dir: dir.into(),
            segment_bytes: FileParams::default_segment_bytes(),
            max_bytes: FileParams::default_max_bytes(),
            fsync: Fsync::default(),
            fsync_interval: FileParams::default_fsync_interval(),
        }
    }

    fn default_segment_bytes() -> u64 {
        16 << 20
    }

    fn default_max_bytes() -> u64 {
        1 << 30
    }

    fn default_fsync_interval() -> Duration {
        Duration::from_secs(1)
    }
}

/// The file store's fsync policy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fsync {
    /// After every write (one write holds every event taken at once), before the events
    /// count as buffered: survives power loss.
    #[default]
    Always,
    /// At most `fsync_interval` after a write: a power loss can cost that much.
    Interval,
    /// Left to the operating system: survives a crash of the process, not of the machine.
    Never,
}

/// `postgres` store params. Its `Debug` shows the URL without its password.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresParams {
    /// The service's database, e.g. `postgres://app@db/app`.
    pub url: SecretUrl,
    /// The table, created if missing (default `auditbridge_client_buffer`).
    #[serde(default = "PostgresParams::default_table")]
    pub table: String,
    /// Most events held (default 1,000,000).
    #[serde(default = "PostgresParams::default_max_events")]
    pub max_events: u64,
    /// Most payload bytes held (default 1 GiB).
    #[serde(default = "PostgresParams::default_max_bytes")]
    pub max_bytes: u64,
}

impl PostgresParams {
    /// Defaults for everything but the URL.
    pub fn new(url: impl Into<SecretUrl>) -> PostgresParams {
        PostgresParams {
            url: url.into(),
            table: PostgresParams::default_table(),
            max_events: PostgresParams::default_max_events(),
            max_bytes: PostgresParams::default_max_bytes(),
        }
    }

    fn default_table() -> String {
        "auditbridge_client_buffer".into()
    }

    fn default_max_events() -> u64 {
        1_000_000
    }

    fn default_max_bytes() -> u64 {
        1 << 30
    }
}

/// What [`crate::Client::record`] does when the client cannot take an event at once (its
/// queue is full because the store is full, failing, or slower than the caller). Events are
/// never dropped silently: the caller gets a [`crate::RecordError::Full`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnFull {
    /// Return the error immediately: `record` never waits.
    #[default]
    Error,
    /// Wait up to this long for room, then return the error.
    Wait(Duration),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_three_stores_parse() {
        assert_eq!(
            StoreConfig::from_json(r#"{"type":"memory"}"#).unwrap(),
            StoreConfig::Memory(MemoryParams::default())
        );
        let file = StoreConfig::from_json(
            r#"{"type":"file","params":{"dir":"/tmp/x","segment_bytes":1024,"fsync":"interval","fsync_interval":"250ms"}}"#,
        )
        .unwrap();
        let StoreConfig::File(p) = file else {
            panic!("{file:?}")
        };
        assert_eq!(p.segment_bytes, 1024);
        assert_eq!(p.max_bytes, 1 << 30);
        assert_eq!(p.fsync, Fsync::Interval);
        assert_eq!(p.fsync_interval, Duration::from_millis(250));
        let pg = StoreConfig::from_json(r#"{"type":"postgres","params":{"url":"postgres://x/y"}}"#)
            .unwrap();
        assert_eq!(
            pg,
            StoreConfig::Postgres(PostgresParams::new("postgres://x/y"))
        );
    }

    #[test]
    fn debug_shows_no_password() {
        let store = StoreConfig::from_json(
            r#"{"type":"postgres","params":{"url":"postgres://app:pg-s3cret@db/app?password=q-s3cret"}}"#,
        )
        .unwrap();
        let shown = format!("{store:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("postgres://app:***@db/app"), "{shown}");
        let err = StoreConfig::from_json(
            r#"{"type":"postgres","params":{"url":"postgres://app:pg-s3cret@db/app","table":"a b"}}"#,
        )
        .unwrap_err();
        assert!(!err.to_string().contains("s3cret"), "{err}");
    }

    #[test]
    fn mistakes_name_the_setting() {
        let err = |json: &str| StoreConfig::from_json(json).unwrap_err().to_string();
        assert!(err(r#"{"type":"disk"}"#).contains("unknown variant `disk`"));
        assert!(
            err(r#"{"type":"file","params":{"dir":"/x","fsynk":"never"}}"#)
                .contains("unknown field `fsynk`")
        );
        assert!(err(r#"{"type":"file","params":{}}"#).contains("missing field `dir`"));
        assert!(
            err(r#"{"type":"memory","params":{"max_events":0}}"#)
                .contains("memory param max_events: must be greater than 0")
        );
        assert!(
            err(r#"{"type":"postgres","params":{"url":"u","table":"a; drop"}}"#)
                .contains("postgres param table")
        );
        assert!(
            err(r#"{"type":"file","params":{"dir":"/x","fsync_interval":"soon"}}"#)
                .contains("expected a duration")
        );
        assert!(
            err("nope").starts_with("invalid setting AUDITBRIDGE_CLIENT_STORE: not valid JSON")
        );
    }
}
