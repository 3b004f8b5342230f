//! The typed configuration tree shared by every command.
//!
//! Settings are layered by `figment`: built-in defaults that work on a local machine, an
//! optional TOML file named by `AUDITBRIDGE_CONFIG`, then `AUDITBRIDGE_*` environment
//! variables. [`Config::load`] reads and checks everything once, at startup — the scalar
//! settings, and the definitions of destinations, sources, API tokens and retention (the file's
//! arrays of tables, extended by JSON arrays in `AUDITBRIDGE_DESTINATIONS`, `_SOURCES`,
//! `_API_TOKENS`, `_RETENTION`).
//! If it succeeds the configuration is valid: no later step refuses a definition. Every error
//! names the setting and where its value came from (the variable, or the key and the file), so
//! an operator can fix it without reading code. Unknown keys in the file are refused; unknown
//! `AUDITBRIDGE_*` variables are reported by [`Config::unknown_env`] so the caller can warn
//! about typos. Secrets are [`secrecy::SecretString`]s and URLs that may carry credentials are
//! [`SecretUrl`]s: `Debug` of the whole tree shows none of them.
//!
//! This crate does no network I/O; it reads the configuration file and nothing else.

pub mod api_source;
mod de;
pub mod destinations;
mod lists;
mod providers;
pub mod redact;
pub mod retention;
pub mod sources;
pub mod tokens;
mod urls;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use figment::Figment;
use figment::value::magic::Tagged;
pub use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

pub use destinations::DestinationConfig;
pub use lists::Origin;
pub use retention::{Retention, TenantRetention};
pub use sources::SourceConfig;
pub use tokens::{ApiToken, Scope};
pub use urls::{NatsAuth, SecretUrl, nats_credentials, redact_url};

/// A setting that could not be used. The message names the setting the way the operator
/// wrote it (`AUDITBRIDGE_BATCH_SIZE`, or `batch_size` in a named file).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A value that does not fit its setting, as the layering found it.
    #[error("invalid setting: {0}")]
    Setting(Box<figment::Error>),
    /// A value that does not fit with another setting.
    #[error("invalid setting {setting}={value:?}: {expected}")]
    Invalid {
        setting: String,
        value: String,
        expected: String,
    },
    #[error("cannot read configuration file {path} (from AUDITBRIDGE_CONFIG): {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("configuration file {path} is not valid TOML: {message}")]
    Parse { path: PathBuf, message: String },
    #[error(
        "configuration file {path}: unknown setting {key:?} (known settings: {})",
        providers::file_keys().join(", ")
    )]
    UnknownKey { path: PathBuf, key: String },
    /// A destination, source, API token or retention item that cannot be used.
    #[error("{what} {name}: {setting}: {message} ({origin})")]
    Definition {
        /// `destination`, `source`, `api token` or `retention`.
        what: &'static str,
        /// The item's name, or its position (`#2`) when it has no usable name.
        name: String,
        setting: String,
        message: String,
        origin: Origin,
    },
}

impl From<figment::Error> for ConfigError {
    fn from(e: figment::Error) -> ConfigError {
        ConfigError::Setting(Box::new(e))
    }
}

/// Shortest accepted `AUDITBRIDGE_ID_KEY`, in characters.
pub const ID_KEY_MIN_LEN: usize = 32;

/// What a message may carry in headers beyond its payload: the stream refuses messages larger
/// than `max_event_bytes` plus this ([`IngestConfig::stream_max_message_size`]). The headers
/// producers set (`Nats-Msg-Id`, `Auditbridge-Time`, `Auditbridge-Legacy-Id`) take about 200
/// bytes; the rest is room for a producer's own (tracing) headers.
pub const STREAM_HEADER_HEADROOM: usize = 16 * 1024;

/// What JetStream counts against a pull's byte limit beyond the stored message (headers and
/// payload): its subject and the ack reply subject. A subject is at most the server's control
/// line (4 KiB by default) and an ack reply a few hundred bytes; this is generous on purpose. A
/// pull whose limit is below one message does not get that message at all (the server answers
/// 409 and keeps it, and the next pull gets the same answer): the consumer would stall.
pub const DELIVERY_OVERHEAD: usize = 64 * 1024;

impl IngestConfig {
    /// The stream's `max_message_size`: the largest payload the worker accepts plus header
    /// room. JetStream refuses a larger message at publish time, so its producer gets the
    /// refusal, rather than the stream and the worker carrying a message that could only be
    /// dead-lettered.
    pub fn stream_max_message_size(&self) -> usize {
        self.max_event_bytes + STREAM_HEADER_HEADROOM
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Settings of the ingest path (JetStream → PostgreSQL).
#[derive(Debug, Clone, PartialEq)]
pub struct IngestConfig {
    /// Most messages persisted in one transaction.
    pub batch_size: usize,
    /// Longest a partial batch waits for more messages before it is persisted.
    pub batch_wait: Duration,
    /// Largest accepted payload; larger ones are dead-lettered.
    pub max_event_bytes: usize,
    /// Most bytes of messages in one batch (and requested by one JetStream pull): what bounds
    /// the worker's memory whatever the messages' sizes. A batch closes at `batch_size`
    /// messages or at this many bytes, whichever comes first. At least one largest message
    /// the stream takes ([`IngestConfig::stream_max_message_size`]) plus
    /// [`DELIVERY_OVERHEAD`], so that every message fits in a batch and a pull.
    pub batch_max_bytes: usize,
    /// JetStream redelivers a message not acknowledged within this time.
    pub ack_wait: Duration,
    /// Most messages delivered and not yet acknowledged, across all workers.
    pub max_ack_pending: i64,
    /// How long the stream keeps messages (they can be replayed within it).
    pub stream_max_age: Duration,
    /// JetStream drops a re-sent `Nats-Msg-Id` inside this window.
    pub duplicate_window: Duration,
    /// PostgreSQL connections per worker.
    pub db_max_connections: u32,
    /// Batches a worker persists at once: while one commits, the next is validated and
    /// written, so neither the worker nor PostgreSQL waits for the other.
    pub persist_concurrency: usize,
}

/// The whole configuration of a worker (and of the other commands, which use parts of it).
#[derive(Debug, Clone)]
pub struct Config {
    /// One NATS URL or a comma-separated list of them.
    pub nats_url: SecretUrl,
    pub database_url: SecretUrl,
    /// What `auditbridge migrate` connects as: a superuser, or the owner role
    /// (`AUDITBRIDGE_MIGRATE_DATABASE_URL`, defaulting to `database_url`).
    pub migrate_database_url: SecretUrl,
    pub subject_prefix: String,
    pub stream: String,
    pub consumer: String,
    pub metrics_addr: SocketAddr,
    pub api_addr: SocketAddr,
    /// Largest request body `auditbridge serve` accepts (HTTP ingest batches, webhooks).
    pub api_max_body_bytes: usize,
    /// How often an idle live tail (Server-Sent Events) sends a heartbeat comment, so proxies
    /// do not close it.
    pub api_heartbeat: Duration,
    /// Longest one SQL statement of `serve` may run before PostgreSQL cancels it.
    pub api_statement_timeout: Duration,
    /// `serve` cuts a connection whose writes take no byte for this long (a client that
    /// stopped reading, holding its live tail's queue and slot).
    pub api_write_timeout: Duration,
    pub log: String,
    pub log_format: LogFormat,
    pub ingest: IngestConfig,
    /// How long a stopping worker may take to finish the batch in flight and flush.
    pub shutdown_timeout: Duration,
    /// A destination's relay lease lasts this long unless renewed; another worker takes over
    /// within about this time after the holder dies.
    pub lease_ttl: Duration,
    /// The file's `[[destinations]]`, then the items of `AUDITBRIDGE_DESTINATIONS`.
    pub destinations: Vec<DestinationConfig>,
    /// Tokens of `auditbridge serve` (`[[api_tokens]]`, then `AUDITBRIDGE_API_TOKENS`). They
    /// hold hashes, not tokens.
    pub api_tokens: Vec<ApiToken>,
    /// Ingest sources (signed webhooks, file tails): `[[sources]]`, then
    /// `AUDITBRIDGE_SOURCES`.
    pub sources: Vec<SourceConfig>,
    /// `AUDITBRIDGE_ID_KEY`: the key of the ids that sources derive for foreign events, one
    /// secret shared by every `serve`, `tail-file` and poller. `None` when unset; a source
    /// whose mapping derives ids is then refused at load.
    pub id_key: Option<SecretString>,
    /// `AUDITBRIDGE_LOG_KEY_FILE`: the signed-note private key (`auditbridge log keygen`) the
    /// sequencer signs checkpoints with; read and checked by the worker at start-up. `None`:
    /// the logs are built, their checkpoints are not signed.
    pub log_key_file: Option<PathBuf>,
    /// Most often a tenant whose tree grew gets a new checkpoint (an idle tenant's is signed
    /// again every minute, so its freshness stays verifiable).
    pub log_checkpoint_interval: Duration,
    /// `AUDITBRIDGE_PARTITION_INTERVAL`: the span of time one partition of stored events covers
    /// (whole seconds, from 1s to 366d; default one day).
    pub partition_interval: Duration,
    /// `AUDITBRIDGE_DEAD_LETTER_RETENTION`: how long dead letters are kept (a duration in whole
    /// seconds from 1s to 100y, or `forever`). `None`, the default: forever.
    pub dead_letter_retention: Option<Duration>,
    /// How long each tenant's events are kept: the file's `[[retention]]` items (`tenant`,
    /// `keep`), then `AUDITBRIDGE_RETENTION` (a plain duration or `forever` for the default,
    /// or a JSON array of items). By default every event is kept forever.
    pub retention: Retention,
    /// The ingest redaction rules (`[[redact]]`, then `AUDITBRIDGE_REDACT`): applied by the
    /// worker before an event is stored (README, "Redaction").
    pub redact: auditbridge_event::redact::Redactor,
    /// `AUDITBRIDGE_REDACT_KEY`: the key of every `hmac` redaction (ingest and destinations).
    pub redact_key: Option<SecretString>,
    unknown_env: Vec<String>,
}

/// Every setting of the file and the environment, flat, as the layers give them: the schema.
/// The environment variable of a key is `AUDITBRIDGE_` followed by the key in upper case.
#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Settings {
    #[serde(deserialize_with = "de::nats_urls")]
    nats_url: SecretUrl,
    #[serde(deserialize_with = "de::postgres_url")]
    database_url: SecretUrl,
    /// Empty: the same as `database_url`.
    #[serde(deserialize_with = "de::optional_postgres_url")]
    migrate_database_url: Option<SecretUrl>,
    #[serde(deserialize_with = "de::subject_prefix")]
    subject_prefix: String,
    #[serde(deserialize_with = "de::nats_name")]
    stream: String,
    #[serde(deserialize_with = "de::nats_name")]
    consumer: String,
    #[serde(deserialize_with = "de::socket_addr")]
    metrics_addr: SocketAddr,
    #[serde(deserialize_with = "de::socket_addr")]
    api_addr: SocketAddr,
    #[serde(deserialize_with = "de::int::<_, _, 1024, { 256 * 1024 * 1024 }>")]
    api_max_body_bytes: usize,
    #[serde(deserialize_with = "de::duration::<_, 100, 3_600_000>")]
    api_heartbeat: Duration,
    #[serde(deserialize_with = "de::duration::<_, 10, 3_600_000>")]
    api_statement_timeout: Duration,
    #[serde(deserialize_with = "de::duration::<_, 100, 3_600_000>")]
    api_write_timeout: Duration,
    #[serde(deserialize_with = "de::log_filter")]
    log: String,
    #[serde(deserialize_with = "de::log_format")]
    log_format: LogFormat,
    #[serde(deserialize_with = "de::int::<_, _, 1, 10_000>")]
    batch_size: usize,
    #[serde(deserialize_with = "de::duration::<_, 1, 10_000>")]
    batch_wait: Duration,
    #[serde(deserialize_with = "de::int::<_, _, 256, { 8 * 1024 * 1024 }>")]
    max_event_bytes: usize,
    #[serde(deserialize_with = "de::int::<_, _, { 1024 * 1024 }, { 256 * 1024 * 1024 }>")]
    batch_max_bytes: usize,
    #[serde(deserialize_with = "de::duration::<_, 1000, 3_600_000>")]
    ack_wait: Duration,
    #[serde(deserialize_with = "de::int::<_, _, 1, 1_000_000>")]
    max_ack_pending: i64,
    #[serde(deserialize_with = "de::duration::<_, 60_000, { 10 * 365 * 86_400_000 }>")]
    stream_max_age: Duration,
    #[serde(deserialize_with = "de::duration::<_, 1000, 86_400_000>")]
    duplicate_window: Duration,
    #[serde(deserialize_with = "de::int::<_, _, 2, 1000>")]
    db_max_connections: u32,
    #[serde(deserialize_with = "de::int::<_, _, 1, 16>")]
    persist_concurrency: usize,
    #[serde(deserialize_with = "de::duration::<_, 1000, 600_000>")]
    lease_ttl: Duration,
    #[serde(deserialize_with = "de::duration::<_, 1000, 600_000>")]
    shutdown_timeout: Duration,
    /// Empty: unset. A secret: never part of an error message.
    #[serde(deserialize_with = "de::id_key")]
    id_key: Option<SecretString>,
    /// Empty: unset (checkpoints are not signed).
    #[serde(deserialize_with = "de::optional_path")]
    log_key_file: Option<PathBuf>,
    #[serde(deserialize_with = "de::duration::<_, 1000, 3_600_000>")]
    log_checkpoint_interval: Duration,
    #[serde(deserialize_with = "de::seconds::<_, 1, { 366 * 86_400 }>")]
    partition_interval: Duration,
    /// Empty: unset (kept forever).
    #[serde(deserialize_with = "retention::optional_keep")]
    dead_letter_retention: Option<Duration>,
    destinations: Vec<Tagged<serde_json::Value>>,
    api_tokens: Vec<Tagged<serde_json::Value>>,
    sources: Vec<Tagged<serde_json::Value>>,
    retention: Vec<Tagged<serde_json::Value>>,
    redact: Vec<Tagged<serde_json::Value>>,
    /// Empty: unset. A secret: never part of an error message.
    #[serde(deserialize_with = "de::id_key")]
    redact_key: Option<SecretString>,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            nats_url: SecretUrl::unchecked("nats://127.0.0.1:4222"),
            database_url: SecretUrl::unchecked("postgres://postgres@127.0.0.1:5432/auditbridge"),
            migrate_database_url: None,
            subject_prefix: "audit".into(),
            stream: "AUDIT".into(),
            consumer: "auditbridge".into(),
            metrics_addr: SocketAddr::from(([127, 0, 0, 1], 9464)),
            api_addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            api_max_body_bytes: 10 * 1024 * 1024,
            api_heartbeat: Duration::from_secs(15),
            api_statement_timeout: Duration::from_secs(30),
            api_write_timeout: Duration::from_secs(30),
            log: "info".into(),
            log_format: LogFormat::Text,
            batch_size: 2000,
            batch_wait: Duration::from_millis(20),
            max_event_bytes: 64 * 1024,
            batch_max_bytes: 16 * 1024 * 1024,
            ack_wait: Duration::from_secs(30),
            max_ack_pending: 20_000,
            stream_max_age: Duration::from_secs(7 * 86_400),
            duplicate_window: Duration::from_secs(120),
            db_max_connections: 8,
            persist_concurrency: 3,
            lease_ttl: Duration::from_secs(10),
            shutdown_timeout: Duration::from_secs(15),
            id_key: None,
            log_key_file: None,
            log_checkpoint_interval: Duration::from_secs(10),
            partition_interval: Duration::from_secs(86_400),
            dead_letter_retention: None,
            destinations: Vec::new(),
            api_tokens: Vec::new(),
            sources: Vec::new(),
            retention: Vec::new(),
            redact: Vec::new(),
            redact_key: None,
        }
    }
}

/// The settings that hold lists of definitions, and the variable that extends each.
const LISTS: [(&str, &str); 5] = [
    ("destinations", "AUDITBRIDGE_DESTINATIONS"),
    ("api_tokens", "AUDITBRIDGE_API_TOKENS"),
    ("sources", "AUDITBRIDGE_SOURCES"),
    ("retention", "AUDITBRIDGE_RETENTION"),
    ("redact", "AUDITBRIDGE_REDACT"),
];

/// Variables that are read elsewhere and must not be reported as unknown.
const OTHER_ENV: &[&str] = &["AUDITBRIDGE_CONFIG"];

impl Config {
    /// Loads the configuration from the process environment (and the file it names).
    pub fn load() -> Result<Config, ConfigError> {
        Config::from_env(std::env::vars())
    }

    /// Loads the configuration from the given variables instead of the process environment.
    pub fn from_env(
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let env: BTreeMap<String, String> = vars
            .into_iter()
            .filter(|(k, _)| k.starts_with("AUDITBRIDGE_"))
            .collect();
        let mut figment = Figment::new();
        if let Some(path) = env.get("AUDITBRIDGE_CONFIG").filter(|p| !p.is_empty()) {
            figment = figment.merge(providers::File::read(PathBuf::from(path))?);
        }
        // `admerge`: a variable replaces the file's value, and a list variable's items follow
        // the file's.
        let figment = figment.admerge(providers::Env::new(&env));
        let s: Settings = figment.extract()?;
        let unknown_env = env
            .keys()
            .filter(|k| !OTHER_ENV.contains(&k.as_str()) && !providers::is_setting(k))
            .cloned()
            .collect();
        let setting = |key: &str| providers::setting_name(&figment, key);

        let ingest = IngestConfig {
            batch_size: s.batch_size,
            batch_wait: s.batch_wait,
            max_event_bytes: s.max_event_bytes,
            batch_max_bytes: s.batch_max_bytes,
            ack_wait: s.ack_wait,
            max_ack_pending: s.max_ack_pending,
            stream_max_age: s.stream_max_age,
            duplicate_window: s.duplicate_window,
            db_max_connections: s.db_max_connections,
            persist_concurrency: s.persist_concurrency,
        };
        if ingest.persist_concurrency as u32 >= ingest.db_max_connections {
            return Err(ConfigError::Invalid {
                setting: setting("persist_concurrency"),
                value: ingest.persist_concurrency.to_string(),
                expected: format!(
                    "fewer than db_max_connections ({}), which must also serve health checks",
                    ingest.db_max_connections
                ),
            });
        }
        let largest = ingest.stream_max_message_size() + DELIVERY_OVERHEAD;
        if ingest.batch_max_bytes < largest {
            return Err(ConfigError::Invalid {
                setting: setting("batch_max_bytes"),
                value: ingest.batch_max_bytes.to_string(),
                expected: format!(
                    "at least {largest} bytes with {}={}: the largest message the stream takes \
                     ({} of payload + {STREAM_HEADER_HEADROOM} of headers) and its delivery \
                     ({DELIVERY_OVERHEAD}) must fit in one batch; raise it, or lower the \
                     largest event",
                    setting("max_event_bytes"),
                    ingest.max_event_bytes,
                    ingest.max_event_bytes,
                ),
            });
        }
        if ingest.duplicate_window > ingest.stream_max_age {
            return Err(ConfigError::Invalid {
                setting: setting("duplicate_window"),
                value: humantime::format_duration(ingest.duplicate_window).to_string(),
                expected: "a duration no longer than stream_max_age".into(),
            });
        }

        let items = |list: Vec<Tagged<serde_json::Value>>, var: &'static str| {
            list.into_iter()
                .map(|item| lists::Item {
                    origin: providers::origin(&figment, item.tag(), var),
                    value: item.into_inner(),
                })
                .collect::<Vec<_>>()
        };
        let [
            (_, destinations_var),
            (_, tokens_var),
            (_, sources_var),
            (_, retention_var),
            (_, redact_var),
        ] = LISTS;
        let redact_key = s.redact_key;
        let destinations = lists::read_list(
            "destination",
            items(s.destinations, destinations_var),
            |v| destinations::read(v, redact_key.as_ref()),
            &[(
                "name",
                |d: &DestinationConfig| d.name.clone().into_bytes(),
                "is used by another destination; names must be unique",
            )],
        )?;
        let id_key = s.id_key;
        let sources = lists::read_list(
            "source",
            items(s.sources, sources_var),
            |v| sources::read(v, id_key.as_ref()),
            &[(
                "name",
                |d: &SourceConfig| d.name.clone().into_bytes(),
                "is used by another source; names must be unique",
            )],
        )?;
        let api_tokens = lists::read_list(
            "api token",
            items(s.api_tokens, tokens_var),
            tokens::read,
            &[
                (
                    "name",
                    |t: &ApiToken| t.name.clone().into_bytes(),
                    "another token has the same name",
                ),
                (
                    "sha256",
                    |t: &ApiToken| t.sha256.to_vec(),
                    "the same token is configured twice",
                ),
            ],
        )?;
        let retention = retention::read(items(s.retention, retention_var))?;
        let redact = redact::read(items(s.redact, redact_var), redact_key.as_ref())?;

        Ok(Config {
            migrate_database_url: s
                .migrate_database_url
                .unwrap_or_else(|| s.database_url.clone()),
            nats_url: s.nats_url,
            database_url: s.database_url,
            subject_prefix: s.subject_prefix,
            stream: s.stream,
            consumer: s.consumer,
            metrics_addr: s.metrics_addr,
            api_addr: s.api_addr,
            api_max_body_bytes: s.api_max_body_bytes,
            api_heartbeat: s.api_heartbeat,
            api_statement_timeout: s.api_statement_timeout,
            api_write_timeout: s.api_write_timeout,
            log: s.log,
            log_format: s.log_format,
            ingest,
            shutdown_timeout: s.shutdown_timeout,
            lease_ttl: s.lease_ttl,
            destinations,
            api_tokens,
            sources,
            id_key,
            log_key_file: s.log_key_file,
            log_checkpoint_interval: s.log_checkpoint_interval,
            partition_interval: s.partition_interval,
            dead_letter_retention: s.dead_letter_retention,
            retention,
            redact,
            redact_key,
            unknown_env,
        })
    }

    /// `AUDITBRIDGE_*` variables that no setting reads (probably typos).
    pub fn unknown_env(&self) -> &[String] {
        &self.unknown_env
    }

    /// The database name in `database_url` (the part after the last `/`, before `?`).
    pub fn database_name(&self) -> &str {
        let tail = self.database_url.expose().rsplit('/').next().unwrap_or("");
        tail.split('?').next().unwrap_or("")
    }
}

impl Default for Config {
    fn default() -> Self {
        Config::from_env(std::iter::empty()).expect("the built-in defaults are valid")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn defaults_match_the_contract() {
        let c = Config::from_env(env(&[])).unwrap();
        assert_eq!(c.nats_url.expose(), "nats://127.0.0.1:4222");
        assert_eq!(
            c.database_url.expose(),
            "postgres://postgres@127.0.0.1:5432/auditbridge"
        );
        assert_eq!(c.subject_prefix, "audit");
        assert_eq!(c.stream, "AUDIT");
        assert_eq!(c.consumer, "auditbridge");
        assert_eq!(c.metrics_addr.to_string(), "127.0.0.1:9464");
        assert_eq!(c.api_addr.to_string(), "127.0.0.1:8080");
        assert_eq!(c.log, "info");
        assert_eq!(c.log_format, LogFormat::Text);
        assert_eq!(c.database_name(), "auditbridge");
        assert!(c.destinations.is_empty());
    }

    /// A batch (and a pull) must hold the largest message the stream takes: with a larger
    /// event limit than the batch's byte bound, the error names both settings.
    #[test]
    fn a_batch_holds_at_least_the_largest_message() {
        let c = Config::from_env(env(&[])).unwrap();
        assert_eq!(c.ingest.batch_max_bytes, 16 * 1024 * 1024);
        assert_eq!(c.ingest.stream_max_message_size(), 65536 + 16 * 1024);
        // The default bound holds the largest event allowed.
        let c = Config::from_env(env(&[("AUDITBRIDGE_MAX_EVENT_BYTES", "8388608")])).unwrap();
        assert!(c.ingest.batch_max_bytes >= c.ingest.stream_max_message_size() + DELIVERY_OVERHEAD);
        // Exactly enough is enough; one byte less is refused.
        let limit = 1024 * 1024 - STREAM_HEADER_HEADROOM - DELIVERY_OVERHEAD;
        let ok = limit.to_string();
        let c = Config::from_env(env(&[
            ("AUDITBRIDGE_BATCH_MAX_BYTES", "1048576"),
            ("AUDITBRIDGE_MAX_EVENT_BYTES", &ok),
        ]))
        .unwrap();
        assert_eq!(c.ingest.batch_max_bytes, 1024 * 1024);
        let over = (limit + 1).to_string();
        let err = Config::from_env(env(&[
            ("AUDITBRIDGE_BATCH_MAX_BYTES", "1048576"),
            ("AUDITBRIDGE_MAX_EVENT_BYTES", &over),
        ]))
        .unwrap_err()
        .to_string();
        assert!(err.contains("AUDITBRIDGE_BATCH_MAX_BYTES"), "{err}");
        assert!(
            err.contains(&format!("AUDITBRIDGE_MAX_EVENT_BYTES={over}")),
            "{err}"
        );
        assert!(err.contains("at least 1048577 bytes"), "{err}");
        // Out of range on its own.
        for value in ["1048575", "268435457", "lots"] {
            let err = Config::from_env(env(&[("AUDITBRIDGE_BATCH_MAX_BYTES", value)]))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("AUDITBRIDGE_BATCH_MAX_BYTES")
                    && err.contains("integer from 1048576 to 268435456"),
                "{err}"
            );
        }
    }

    #[test]
    fn env_overrides_file_and_file_overrides_defaults() {
        let dir = std::env::temp_dir().join(format!("abcfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.toml");
        std::fs::write(
            &path,
            "batch_size = 100\nstream = \"FROMFILE\"\n[[destinations]]\nname = \"siem\"\ntype = \"http\"\nparams = { url = \"https://siem.example/in\" }\n",
        )
        .unwrap();
        let c = Config::from_env(env(&[
            ("AUDITBRIDGE_CONFIG", path.to_str().unwrap()),
            ("AUDITBRIDGE_BATCH_SIZE", "250"),
            (
                "AUDITBRIDGE_DESTINATIONS",
                r#"[{"name":"bus","type":"rabbitmq","params":{"url":"amqp://h","exchange":"e"}}]"#,
            ),
        ]))
        .unwrap();
        assert_eq!(c.ingest.batch_size, 250);
        assert_eq!(c.stream, "FROMFILE");
        assert_eq!(c.destinations.len(), 2);
        assert_eq!(c.destinations[0].name, "siem");
        assert_eq!(c.destinations[1].name, "bus");
    }

    #[test]
    fn every_list_comes_from_the_file_then_the_environment() {
        let dir = std::env::temp_dir().join(format!("abcfg3-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("lists.toml");
        std::fs::write(
            &path,
            format!(
                "[[api_tokens]]\nname = \"a\"\nsha256 = \"{}\"\nadmin = true\n\
                 [[sources]]\nname = \"gh\"\ntype = \"webhook\"\nparams = {{ secret = \"0123456789abcdef\" }}\n",
                "ab".repeat(32)
            ),
        )
        .unwrap();
        let c = Config::from_env(env(&[
            ("AUDITBRIDGE_CONFIG", path.to_str().unwrap()),
            (
                "AUDITBRIDGE_API_TOKENS",
                &format!(
                    r#"[{{"name":"b","sha256":"{}","tenant":"acme"}}]"#,
                    "cd".repeat(32)
                ),
            ),
            (
                "AUDITBRIDGE_SOURCES",
                r#"[{"name":"f","type":"file","params":{"path":"/var/log/a.jsonl"}}]"#,
            ),
        ]))
        .unwrap();
        assert!(c.unknown_env().is_empty(), "{:?}", c.unknown_env());
        let tokens: Vec<_> = c.api_tokens.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(tokens, ["a", "b"]);
        let sources: Vec<_> = c.sources.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(sources, ["gh", "f"]);
        assert!(c.destinations.is_empty());

        for var in ["AUDITBRIDGE_API_TOKENS", "AUDITBRIDGE_SOURCES"] {
            let err = Config::from_env(env(&[(var, "{}")]))
                .unwrap_err()
                .to_string();
            assert!(err.contains(var) && err.contains("JSON array"), "{err}");
        }
        std::fs::write(&path, "api_tokens = \"x\"\n").unwrap();
        let err = Config::from_env(env(&[("AUDITBRIDGE_CONFIG", path.to_str().unwrap())]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("[[api_tokens]]"), "{err}");
    }

    #[test]
    fn invalid_values_name_the_setting_and_its_origin() {
        let err = Config::from_env(env(&[("AUDITBRIDGE_BATCH_SIZE", "lots")])).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("AUDITBRIDGE_BATCH_SIZE"), "{msg}");
        assert!(msg.contains("\"lots\""), "{msg}");
        assert!(msg.contains("integer from 1 to 10000"), "{msg}");

        for (var, value) in [
            ("AUDITBRIDGE_BATCH_SIZE", "0"),
            ("AUDITBRIDGE_BATCH_WAIT", "soon"),
            ("AUDITBRIDGE_ACK_WAIT", "0s"),
            ("AUDITBRIDGE_NATS_URL", "127.0.0.1:4222"),
            ("AUDITBRIDGE_DATABASE_URL", "mysql://x/y"),
            ("AUDITBRIDGE_METRICS_ADDR", "localhost"),
            ("AUDITBRIDGE_STREAM", "A.B"),
            ("AUDITBRIDGE_CONSUMER", "has space"),
            ("AUDITBRIDGE_SUBJECT_PREFIX", "audit.>"),
            ("AUDITBRIDGE_SUBJECT_PREFIX", "a..b"),
            ("AUDITBRIDGE_LOG_FORMAT", "xml"),
            ("AUDITBRIDGE_DESTINATIONS", "{\"name\":1}"),
            ("AUDITBRIDGE_DESTINATIONS", "[oops"),
        ] {
            let err = Config::from_env(env(&[(var, value)]))
                .unwrap_err()
                .to_string();
            assert!(err.contains(var), "{var}={value}: {err}");
        }
    }

    #[test]
    fn file_errors_name_the_file_and_key() {
        let dir = std::env::temp_dir().join(format!("abcfg2-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("b.toml");
        std::fs::write(&path, "batch_sise = 3\n").unwrap();
        let err = Config::from_env(env(&[("AUDITBRIDGE_CONFIG", path.to_str().unwrap())]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("batch_sise") && err.contains("b.toml"),
            "{err}"
        );

        std::fs::write(&path, "batch_size = \"x\"\n").unwrap();
        let err = Config::from_env(env(&[("AUDITBRIDGE_CONFIG", path.to_str().unwrap())]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("\"batch_size\"") && err.contains("b.toml"),
            "{err}"
        );

        let missing = dir.join("missing.toml");
        let err = Config::from_env(env(&[("AUDITBRIDGE_CONFIG", missing.to_str().unwrap())]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing.toml"), "{err}");
    }

    #[test]
    fn the_migrate_url_defaults_to_the_database_url() {
        let writer = "postgres://auditbridge_writer:pw@db:5432/audit";
        let c = Config::from_env(env(&[("AUDITBRIDGE_DATABASE_URL", writer)])).unwrap();
        assert_eq!(c.migrate_database_url.expose(), writer);
        let owner = "postgres://auditbridge_owner:s3cret@db:5432/audit";
        let c = Config::from_env(env(&[
            ("AUDITBRIDGE_DATABASE_URL", writer),
            ("AUDITBRIDGE_MIGRATE_DATABASE_URL", owner),
        ]))
        .unwrap();
        assert_eq!(c.migrate_database_url.expose(), owner);
        assert!(c.unknown_env().is_empty());
        assert!(!format!("{c:?}").contains("s3cret"));
        let err = Config::from_env(env(&[("AUDITBRIDGE_MIGRATE_DATABASE_URL", "mysql://x/y")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("AUDITBRIDGE_MIGRATE_DATABASE_URL"), "{err}");
    }

    #[test]
    fn unknown_variables_are_reported() {
        let c = Config::from_env(env(&[
            ("AUDITBRIDGE_BACTH_SIZE", "3"),
            ("AUDITBRIDGE_LOG", "debug"),
        ]))
        .unwrap();
        assert_eq!(c.unknown_env(), ["AUDITBRIDGE_BACTH_SIZE".to_owned()]);
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("postgres://app:s3cret@db:5432/audit"),
            "postgres://app:***@db:5432/audit"
        );
        assert_eq!(
            redact_url("postgres://app@db/audit"),
            "postgres://app@db/audit"
        );
        // A password with '@' and ':' in it.
        assert_eq!(
            redact_url("postgres://app:p@ss:w@db/audit"),
            "postgres://app:***@db/audit"
        );
        // Every URL of a NATS server list, and a NATS token.
        assert_eq!(
            redact_url("nats://u:one@h1:4222,nats://u:two@h2:4222, tls://tok3n@h3"),
            "nats://u:***@h1:4222,nats://u:***@h2:4222, tls://***@h3"
        );
        // A PostgreSQL host list is one URL; a password in the query string.
        assert_eq!(
            redact_url(
                "postgres://app:s3cret@h1,h2/audit?sslmode=require&PASSWORD=x&sslpassword=y#f"
            ),
            "postgres://app:***@h1,h2/audit?sslmode=require&PASSWORD=***&sslpassword=***#f"
        );
        assert_eq!(
            redact_url("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact_url("not a url"), "not a url");
        assert_eq!(
            nats_credentials("nats://u:p%40ss@h1:4222,nats://u:p%40ss@h2").unwrap(),
            (
                "nats://h1:4222,nats://h2".to_owned(),
                Some(NatsAuth::UserPassword {
                    user: "u".into(),
                    password: "p@ss".into(),
                })
            )
        );
        assert_eq!(
            nats_credentials("tls://s3cret@h").unwrap(),
            ("tls://h".to_owned(), Some(NatsAuth::Token("s3cret".into())))
        );
        assert_eq!(
            nats_credentials("nats://127.0.0.1:4222").unwrap(),
            ("nats://127.0.0.1:4222".to_owned(), None)
        );
        let mixed = nats_credentials("nats://u:one@h1,nats://u:two@h2").unwrap_err();
        assert!(!mixed.contains("one") && !mixed.contains("two"), "{mixed}");
        let shown = format!("{:?}", nats_credentials("nats://u:s3cret@h").unwrap());
        assert!(!shown.contains("s3cret"), "{shown}");
        let err = Config::from_env(env(&[(
            "AUDITBRIDGE_DATABASE_URL",
            "mysql://app:s3cret@db/x",
        )]))
        .unwrap_err()
        .to_string();
        assert!(
            !err.contains("s3cret") && err.contains("app:***@db"),
            "{err}"
        );
        let c = Config::from_env(env(&[(
            "AUDITBRIDGE_DATABASE_URL",
            "postgres://app:s3cret@db:5432/audit",
        )]))
        .unwrap();
        assert!(!format!("{c:?}").contains("s3cret"));
    }

    #[test]
    fn the_id_key_is_a_secret_with_a_minimum_length() {
        let c = Config::from_env(env(&[])).unwrap();
        assert!(c.id_key.is_none());
        let key = "0123456789abcdef0123456789abcdef-id-key";
        let c = Config::from_env(env(&[("AUDITBRIDGE_ID_KEY", key)])).unwrap();
        assert_eq!(c.id_key.as_ref().map(|k| k.expose_secret()), Some(key));
        assert!(!format!("{c:?}").contains(key), "{c:?}");
        assert!(c.unknown_env().is_empty());
        let short = "too-short-a-key";
        let err = Config::from_env(env(&[("AUDITBRIDGE_ID_KEY", short)]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("AUDITBRIDGE_ID_KEY"), "{err}");
        assert!(err.contains("openssl rand -hex 32"), "{err}");
        assert!(!err.contains(short), "the error printed the secret: {err}");
    }

    /// Every secret the tree can hold, in every place it can hold one: none appears in the
    /// `Debug` output of the whole configuration.
    #[test]
    fn no_secret_appears_in_the_debug_output_of_the_tree() {
        let hash = "5ec0".repeat(16);
        let destinations = r#"[
            {"name": "a", "type": "http", "params": {"url": "https://u:url-SECRET@h/x?token=query-SECRET",
              "bearer_token": "bearer-SECRET", "secret": "hmac-SECRET",
              "headers": {"X-Api-Key": "header-SECRET"}}},
            {"name": "b", "type": "http", "params": {"url": "http://h/x",
              "basic_auth": {"username": "u", "password": "basic-SECRET"}}},
            {"name": "c", "type": "rabbitmq", "params": {"url": "amqp://u:amqp-SECRET@h:5672/%2f", "exchange": "e"}}
        ]"#;
        let sources = r#"[
            {"name": "w", "type": "webhook", "params": {"secret": "webhook-SECRET-0123456789",
             "mapping": {"id": "/id", "tenant": "/t", "type": "/k", "actions": {"x": "y"},
                         "actor": {"id": "/u"}}}}
        ]"#;
        let tokens = format!(r#"[{{"name": "t", "sha256": "{hash}", "admin": true}}]"#);
        let c = Config::from_env(env(&[
            (
                "AUDITBRIDGE_DATABASE_URL",
                "postgres://app:pg-SECRET@db/audit?sslpassword=ssl-SECRET",
            ),
            (
                "AUDITBRIDGE_MIGRATE_DATABASE_URL",
                "postgres://owner:owner-SECRET@db/audit",
            ),
            (
                "AUDITBRIDGE_NATS_URL",
                "nats://nats-SECRET@h1:4222,nats://nats-SECRET@h2:4222",
            ),
            (
                "AUDITBRIDGE_ID_KEY",
                "idkey-SECRET-0123456789abcdef0123456789",
            ),
            ("AUDITBRIDGE_DESTINATIONS", destinations),
            ("AUDITBRIDGE_SOURCES", sources),
            ("AUDITBRIDGE_API_TOKENS", &tokens),
        ]))
        .unwrap();
        let shown = format!("{c:?} {c:#?}");
        assert!(!shown.contains("SECRET"), "{shown}");
        assert!(!shown.contains(&hash), "{shown}");
        // A secret given as another type is refused without being repeated.
        for definition in [
            r#"{"name": "a", "type": "http", "params": {"url": "http://h", "bearer_token": 987654321987}}"#,
            r#"{"name": "a", "type": "http", "params": {"url": "http://h", "secret": 987654321987}}"#,
            r#"{"name": "a", "type": "http", "params": {"url": "http://h", "headers": {"K": 987654321987}}}"#,
            r#"{"name": "a", "type": "http", "params": {"url": "http://h",
                "basic_auth": {"username": "u", "password": 987654321987}}}"#,
        ] {
            let err = Config::from_env(env(&[(
                "AUDITBRIDGE_DESTINATIONS",
                &format!("[{definition}]"),
            )]))
            .unwrap_err()
            .to_string();
            assert!(
                !err.contains("987654321987")
                    && err.contains("not shown")
                    && err.contains("destination a: params."),
                "{err}"
            );
        }
        let err = Config::from_env(env(&[(
            "AUDITBRIDGE_SOURCES",
            r#"[{"name": "w", "type": "webhook", "params": {"secret": 987654321987654321}}]"#,
        )]))
        .unwrap_err()
        .to_string();
        assert!(
            !err.contains("987654321987") && err.contains("source w: params.secret"),
            "{err}"
        );
        // What is not secret still says where things are.
        assert!(shown.contains("postgres://app:***@db/audit"), "{shown}");
        assert!(shown.contains("X-Api-Key"), "{shown}");
    }

    /// What the attacker-minded review of the typed tree found: each is refused at load, or
    /// shown without its secret.
    #[test]
    fn review_findings_stay_fixed() {
        let dir = std::env::temp_dir().join(format!("abcfg-review-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // A TOML syntax error names the line, not its text (which may be a secret).
        let path = dir.join("bad.toml");
        std::fs::write(&path, "log = \"info\"\nid_key = \"unterminated-SECRET\n").unwrap();
        let err = Config::from_env(env(&[("AUDITBRIDGE_CONFIG", path.to_str().unwrap())]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("bad.toml") && err.contains("line 2"), "{err}");
        assert!(!err.contains("SECRET"), "{err}");
        // URLs that do not parse, and more query parameters, are redacted too.
        for url in [
            "postgres://db:5432x/audit?password=s3cret",
            "https://exa mple/in?token=s3cret",
            "https://h/in?api_key=s3cret&sig=s3cret&code=s3cret",
        ] {
            assert!(!redact_url(url).contains("s3cret"), "{}", redact_url(url));
        }
        // A NATS list whose servers carry different credentials, and a bad log filter, are
        // refused at load, by name.
        let err = Config::from_env(env(&[(
            "AUDITBRIDGE_NATS_URL",
            "nats://u:one-SECRET@h1:4222,nats://u:two-SECRET@h2:4222",
        )]))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("AUDITBRIDGE_NATS_URL") && err.contains("same credentials"),
            "{err}"
        );
        assert!(!err.contains("SECRET"), "{err}");
        let err = Config::from_env(env(&[("AUDITBRIDGE_LOG", "info,[[[")]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("AUDITBRIDGE_LOG") && err.contains("tracing filter"),
            "{err}"
        );
        let c = Config::from_env(env(&[("AUDITBRIDGE_LOG_FORMAT", " json ")])).unwrap();
        assert_eq!(c.log_format, LogFormat::Json);
        // An unnamed item is numbered where it was written; a typo at the top of a
        // definition names the keys the operator may write.
        let path = dir.join("lists.toml");
        std::fs::write(
            &path,
            "[[destinations]]\nname = \"a\"\ntype = \"http\"\nparams = { url = \"http://h\" }\n",
        )
        .unwrap();
        let err = Config::from_env(env(&[
            ("AUDITBRIDGE_CONFIG", path.to_str().unwrap()),
            (
                "AUDITBRIDGE_DESTINATIONS",
                r#"[{"type": "http", "params": {"url": "http://h"}}]"#,
            ),
        ]))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("destination #1") && err.contains("from AUDITBRIDGE_DESTINATIONS"),
            "{err}"
        );
        let err = Config::from_env(env(&[(
            "AUDITBRIDGE_DESTINATIONS",
            r#"[{"name": "a", "type": "http", "parmas": {"url": "http://h"}}]"#,
        )]))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("`parmas`") && err.contains("`name`, `type` or `params`"),
            "{err}"
        );
        // Basic-auth credentials of the wrong shape are not repeated.
        let err = Config::from_env(env(&[(
            "AUDITBRIDGE_DESTINATIONS",
            r#"[{"name": "a", "type": "http", "params": {"url": "http://h", "basic_auth": "u:pw-SECRET"}}]"#,
        )]))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("params.basic_auth") && !err.contains("SECRET"),
            "{err}"
        );
    }
}
