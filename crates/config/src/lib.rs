//! The typed configuration tree shared by every command.
//!
//! Settings are resolved in three layers: built-in defaults that work on a local machine, an
//! optional TOML file named by `AUDITBRIDGE_CONFIG`, then `AUDITBRIDGE_*` environment
//! variables. Every value is validated here, at startup, and an error names the setting and
//! where its value came from (the variable, or the key in the file), so an operator can fix it
//! without reading code. Unknown keys in the file are refused; unknown `AUDITBRIDGE_*`
//! variables are reported by [`Config::unknown_env`] so the caller can warn about typos.
//!
//! This crate does no network I/O; it reads the configuration file and nothing else.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::{ExposeSecret as _, SecretString};

/// Where a setting's value came from; used in error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    Default,
    File(PathBuf),
    Env,
}

/// A setting that could not be used. The message names the setting the way the operator
/// wrote it (`AUDITBRIDGE_BATCH_SIZE`, or `batch_size` in a named file).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
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
        "configuration file {path}: unknown setting {key:?} (known settings: {known})",
        known = KEYS.iter().map(|k| k.name).collect::<Vec<_>>().join(", ")
    )]
    UnknownKey { path: PathBuf, key: String },
}

/// A secret setting: `Debug` never shows it, and nothing else prints it.
#[derive(Clone)]
pub struct Secret(SecretString);

impl Secret {
    pub fn new(value: String) -> Secret {
        Secret(SecretString::from(value))
    }

    /// The value, for the one place that uses it (never for a log line).
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

// For comparing configurations in tests; not constant-time, and not used to check a secret
// someone presents.
impl PartialEq for Secret {
    fn eq(&self, other: &Secret) -> bool {
        self.expose() == other.expose()
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
#[derive(Clone, PartialEq)]
pub struct Config {
    pub nats_url: String,
    pub database_url: String,
    /// What `auditbridge migrate` connects as: a superuser, or the owner role
    /// (`AUDITBRIDGE_MIGRATE_DATABASE_URL`, defaulting to `database_url`).
    pub migrate_database_url: String,
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
    /// Raw destination definitions (`{"name","type","params"}`), from the file's
    /// `[[destinations]]` tables followed by the `AUDITBRIDGE_DESTINATIONS` JSON array.
    /// They are validated by the destinations layer, which knows each type's parameters.
    pub destinations: Vec<serde_json::Value>,
    /// Raw API token definitions for `auditbridge serve` (`[[api_tokens]]`, then
    /// `AUDITBRIDGE_API_TOKENS`), validated by the API crate. They hold hashes, not tokens.
    pub api_tokens: Vec<serde_json::Value>,
    /// Raw ingest source definitions (`{"name","type","params"}`: signed webhooks, file
    /// tails), from `[[sources]]` then `AUDITBRIDGE_SOURCES`; validated by the sources crate.
    pub sources: Vec<serde_json::Value>,
    /// `AUDITBRIDGE_ID_KEY`: the key of the ids that sources derive for foreign events, one
    /// secret shared by every `serve`, `tail-file` and poller. `None` when unset; a source
    /// that derives ids then refuses to start.
    pub id_key: Option<Secret>,
    unknown_env: Vec<String>,
}

impl fmt::Debug for Config {
    // By hand, so that a password in a URL never reaches a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("nats_url", &redact_url(&self.nats_url))
            .field("database_url", &redact_url(&self.database_url))
            .field(
                "migrate_database_url",
                &redact_url(&self.migrate_database_url),
            )
            .field("subject_prefix", &self.subject_prefix)
            .field("stream", &self.stream)
            .field("consumer", &self.consumer)
            .field("metrics_addr", &self.metrics_addr)
            .field("api_addr", &self.api_addr)
            .field("api_max_body_bytes", &self.api_max_body_bytes)
            .field("api_heartbeat", &self.api_heartbeat)
            .field("api_statement_timeout", &self.api_statement_timeout)
            .field("api_write_timeout", &self.api_write_timeout)
            .field("log", &self.log)
            .field("log_format", &self.log_format)
            .field("ingest", &self.ingest)
            .field("shutdown_timeout", &self.shutdown_timeout)
            .field("lease_ttl", &self.lease_ttl)
            .field("destinations", &self.destinations.len())
            .field("api_tokens", &self.api_tokens.len())
            .field("sources", &self.sources.len())
            .field("id_key", &self.id_key)
            .finish()
    }
}

/// Replaces the secrets of a URL with `***`, keeping everything else so that it still says
/// where it points: the password of `scheme://user:password@host/...`, a NATS token
/// (`nats://token@host`: user info without a password), and the values of query parameters
/// that carry secrets (`?password=`, `sslpassword`, `token`, `auth_token`, `secret`). A
/// comma-separated list of URLs (NATS servers) is redacted URL by URL. The one place URLs are
/// redacted.
pub fn redact_url(url: &str) -> String {
    split_url_list(url)
        .into_iter()
        .map(redact_one_url)
        .collect::<Vec<_>>()
        .join(",")
}

/// Splits `nats://a@h1,nats://b@h2` into its URLs: a comma starts a new URL only when what
/// follows it has a scheme, so a comma in a password or in a host list
/// (`postgres://u:p@h1,h2/db`) stays where it is.
fn split_url_list(text: &str) -> Vec<&str> {
    let starts_url = |rest: &str| {
        rest.find("://").is_some_and(|i| {
            i > 0
                && rest[..i]
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
        })
    };
    let mut parts = Vec::new();
    let mut from = 0;
    for (i, c) in text.char_indices() {
        if c == ',' && starts_url(text[i + 1..].trim_start()) {
            parts.push(&text[from..i]);
            from = i + 1;
        }
    }
    parts.push(&text[from..]);
    parts
}

/// Query parameters whose values are secrets (compared case-insensitively).
const SECRET_PARAMS: [&str; 6] = [
    "password",
    "sslpassword",
    "pass",
    "token",
    "auth_token",
    "secret",
];

fn redact_one_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let scheme = url[..scheme_end - 3].trim().to_ascii_lowercase();
    let authority_end = url[scheme_end..]
        .find(['/', '?', '#'])
        .map_or(url.len(), |i| scheme_end + i);
    let authority = &url[scheme_end..authority_end];
    let mut out = url[..scheme_end].to_owned();
    // The last '@' ends the user info: a password may contain '@' itself.
    match authority.rfind('@') {
        Some(at) => {
            let user_info = &authority[..at];
            match user_info.find(':') {
                Some(colon) => {
                    out.push_str(&user_info[..colon]);
                    out.push_str(":***");
                }
                // A user alone is a token for NATS; for others it is just a name.
                None if matches!(scheme.as_str(), "nats" | "tls" | "ws" | "wss") => {
                    out.push_str("***");
                }
                None => out.push_str(user_info),
            }
            out.push_str(&authority[at..]);
        }
        None => out.push_str(authority),
    }
    let rest = &url[authority_end..];
    let Some(q) = rest.find('?') else {
        out.push_str(rest);
        return out;
    };
    out.push_str(&rest[..=q]);
    let query = &rest[q + 1..];
    let (query, fragment) = query.split_at(query.find('#').unwrap_or(query.len()));
    let params: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((key, _))
                if SECRET_PARAMS
                    .iter()
                    .any(|s| s.eq_ignore_ascii_case(key.trim())) =>
            {
                format!("{key}=***")
            }
            _ => pair.to_owned(),
        })
        .collect();
    out.push_str(&params.join("&"));
    out.push_str(fragment);
    out
}

/// Credentials for NATS, as a server list's URLs carried them.
#[derive(Clone, PartialEq, Eq)]
pub enum NatsAuth {
    /// `nats://user:password@host`.
    UserPassword { user: String, password: String },
    /// `nats://token@host`.
    Token(String),
}

impl fmt::Debug for NatsAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NatsAuth::UserPassword { user, .. } => write!(f, "UserPassword({user}:***)"),
            NatsAuth::Token(_) => f.write_str("Token(***)"),
        }
    }
}

/// Takes the credentials out of a NATS server list (`nats://u:p@h1,nats://u:p@h2`): the
/// list without user info, and the credentials, percent-decoded. The NATS client is then
/// given the credentials as options and the URLs without them, because it writes the URLs
/// it connects to into its own debug log lines (and ignores credentials in them).
/// Servers of one list must share their credentials: an error says so otherwise (without
/// showing them).
pub fn nats_credentials(list: &str) -> Result<(String, Option<NatsAuth>), String> {
    let mut auth: Option<NatsAuth> = None;
    let mut urls = Vec::new();
    for url in split_url_list(list) {
        let url = url.trim();
        let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
            urls.push(url.to_owned());
            continue;
        };
        let authority_end = url[scheme_end..]
            .find(['/', '?', '#'])
            .map_or(url.len(), |i| scheme_end + i);
        let authority = &url[scheme_end..authority_end];
        let Some(at) = authority.rfind('@') else {
            urls.push(url.to_owned());
            continue;
        };
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8()
                .map(|s| s.into_owned())
                .map_err(|_| format!("{}: user info is not UTF-8", redact_url(url)))
        };
        let this = match authority[..at].split_once(':') {
            Some((user, password)) => NatsAuth::UserPassword {
                user: decode(user)?,
                password: decode(password)?,
            },
            None => NatsAuth::Token(decode(&authority[..at])?),
        };
        if auth.as_ref().is_some_and(|a| *a != this) {
            return Err(format!(
                "{}: every server of the list must carry the same credentials",
                redact_url(list)
            ));
        }
        auth = Some(this);
        urls.push(format!(
            "{}{}",
            &url[..scheme_end],
            &url[scheme_end + at + 1..]
        ));
    }
    Ok((urls.join(","), auth))
}

struct Key {
    name: &'static str,
    default: &'static str,
}

/// Every scalar setting, its file key and its default. The environment variable is
/// `AUDITBRIDGE_` followed by the key in upper case.
const KEYS: &[Key] = &[
    Key {
        name: "nats_url",
        default: "nats://127.0.0.1:4222",
    },
    Key {
        name: "database_url",
        default: "postgres://postgres@127.0.0.1:5432/auditbridge",
    },
    // Empty: the same as database_url.
    Key {
        name: "migrate_database_url",
        default: "",
    },
    Key {
        name: "subject_prefix",
        default: "audit",
    },
    Key {
        name: "stream",
        default: "AUDIT",
    },
    Key {
        name: "consumer",
        default: "auditbridge",
    },
    Key {
        name: "metrics_addr",
        default: "127.0.0.1:9464",
    },
    Key {
        name: "api_addr",
        default: "127.0.0.1:8080",
    },
    Key {
        name: "api_max_body_bytes",
        default: "10485760",
    },
    Key {
        name: "api_heartbeat",
        default: "15s",
    },
    Key {
        name: "api_statement_timeout",
        default: "30s",
    },
    Key {
        name: "api_write_timeout",
        default: "30s",
    },
    Key {
        name: "log",
        default: "info",
    },
    Key {
        name: "log_format",
        default: "text",
    },
    Key {
        name: "batch_size",
        default: "2000",
    },
    Key {
        name: "batch_wait",
        default: "20ms",
    },
    Key {
        name: "max_event_bytes",
        default: "65536",
    },
    Key {
        name: "batch_max_bytes",
        default: "16777216",
    },
    Key {
        name: "ack_wait",
        default: "30s",
    },
    Key {
        name: "max_ack_pending",
        default: "20000",
    },
    Key {
        name: "stream_max_age",
        default: "7d",
    },
    Key {
        name: "duplicate_window",
        default: "2m",
    },
    Key {
        name: "db_max_connections",
        default: "8",
    },
    Key {
        name: "persist_concurrency",
        default: "3",
    },
    Key {
        name: "lease_ttl",
        default: "10s",
    },
    Key {
        name: "shutdown_timeout",
        default: "15s",
    },
    // Empty: unset. A secret: never part of an error message.
    Key {
        name: "id_key",
        default: "",
    },
];

/// Variables that are read elsewhere and must not be reported as unknown.
const OTHER_ENV: &[&str] = &["AUDITBRIDGE_CONFIG"];

/// The settings that hold lists of definitions: the file's array of tables, the variable that
/// extends it (a JSON array), and the shape of one item for error messages.
const LISTS: &[List] = &[
    List {
        key: "destinations",
        shape: "{\"name\",\"type\",\"params\"}",
    },
    List {
        key: "api_tokens",
        shape: "{\"name\",\"sha256\",\"tenant\" or \"admin\",\"scopes\"}",
    },
    List {
        key: "sources",
        shape: "{\"name\",\"type\",\"params\"}",
    },
];

struct List {
    key: &'static str,
    shape: &'static str,
}

fn env_name(key: &str) -> String {
    format!("AUDITBRIDGE_{}", key.to_ascii_uppercase())
}

struct Value {
    text: String,
    origin: Origin,
}

/// The merged raw values, before typing.
struct Layers {
    values: BTreeMap<&'static str, Value>,
}

impl Layers {
    fn setting_name(&self, key: &str) -> String {
        match &self.values[key].origin {
            Origin::Env => env_name(key),
            Origin::File(path) => format!("{key} (in {})", path.display()),
            Origin::Default => format!("{key} (default)"),
        }
    }

    fn get(&self, key: &str) -> &str {
        &self.values[key].text
    }

    fn invalid(&self, key: &str, expected: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            setting: self.setting_name(key),
            value: self.get(key).to_owned(),
            expected: expected.into(),
        }
    }

    fn parse<T: std::str::FromStr>(&self, key: &str, expected: &str) -> Result<T, ConfigError> {
        self.get(key)
            .trim()
            .parse()
            .map_err(|_| self.invalid(key, expected))
    }

    fn int_in<T>(&self, key: &str, lo: T, hi: T) -> Result<T, ConfigError>
    where
        T: std::str::FromStr + PartialOrd + fmt::Display + Copy,
    {
        let expected = format!("an integer from {lo} to {hi}");
        let v: T = self.parse(key, &expected)?;
        if v < lo || v > hi {
            return Err(self.invalid(key, expected));
        }
        Ok(v)
    }

    fn duration_in(&self, key: &str, lo: Duration, hi: Duration) -> Result<Duration, ConfigError> {
        let expected = format!(
            "a duration such as \"500ms\", \"30s\" or \"7d\", from {} to {}",
            humantime::format_duration(lo),
            humantime::format_duration(hi)
        );
        let v = humantime::parse_duration(self.get(key).trim())
            .map_err(|_| self.invalid(key, expected.clone()))?;
        if v < lo || v > hi {
            return Err(self.invalid(key, expected));
        }
        Ok(v)
    }

    fn url(&self, key: &str, schemes: &[&str]) -> Result<String, ConfigError> {
        let v = self.get(key).trim();
        let expected = format!("a URL starting with {}", schemes.join(" or "));
        let ok = schemes.iter().any(|s| {
            v.strip_prefix(s)
                .and_then(|r| r.strip_prefix("://"))
                .is_some_and(|r| !r.is_empty() && !r.starts_with('/'))
        });
        if !ok {
            // Not `invalid`: the value is shown, and a URL may hold a password.
            return Err(ConfigError::Invalid {
                setting: self.setting_name(key),
                value: redact_url(v),
                expected,
            });
        }
        Ok(v.to_owned())
    }

    /// NATS names: stream and consumer names may not contain whitespace, `.`, `*`, `>`,
    /// path separators or control characters.
    fn nats_name(&self, key: &str) -> Result<String, ConfigError> {
        let v = self.get(key);
        let ok = !v.is_empty()
            && v.len() <= 255
            && v.chars()
                .all(|c| c.is_ascii_graphic() && !matches!(c, '.' | '*' | '>' | '/' | '\\'));
        if !ok {
            return Err(self.invalid(
                key,
                "a name of printable ASCII without spaces, '.', '*', '>', '/' or '\\'",
            ));
        }
        Ok(v.to_owned())
    }

    /// A subject prefix: one or more dot-separated tokens, no wildcards.
    fn subject_prefix(&self, key: &str) -> Result<String, ConfigError> {
        let v = self.get(key);
        let ok = !v.is_empty()
            && v.split('.').all(|t| {
                !t.is_empty()
                    && t.chars()
                        .all(|c| c.is_ascii_graphic() && c != '*' && c != '>')
            });
        if !ok {
            return Err(self.invalid(
                key,
                "dot-separated subject tokens without spaces or wildcards, such as \"audit\"",
            ));
        }
        Ok(v.to_owned())
    }
}

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

        let mut values: BTreeMap<&'static str, Value> = KEYS
            .iter()
            .map(|k| {
                (
                    k.name,
                    Value {
                        text: k.default.to_owned(),
                        origin: Origin::Default,
                    },
                )
            })
            .collect();

        let mut lists: BTreeMap<&'static str, Vec<serde_json::Value>> = BTreeMap::new();
        if let Some(path) = env.get("AUDITBRIDGE_CONFIG").filter(|p| !p.is_empty()) {
            lists = read_file(Path::new(path), &mut values)?;
        }
        for key in KEYS {
            if let Some(v) = env.get(&env_name(key.name)) {
                values.insert(
                    key.name,
                    Value {
                        text: v.clone(),
                        origin: Origin::Env,
                    },
                );
            }
        }
        for list in LISTS {
            let var = env_name(list.key);
            let Some(raw) = env.get(&var).filter(|s| !s.trim().is_empty()) else {
                continue;
            };
            let expected = format!("a JSON array of {}", list.shape);
            let parsed: serde_json::Value =
                serde_json::from_str(raw).map_err(|e| ConfigError::Invalid {
                    setting: var.clone(),
                    value: raw.clone(),
                    expected: format!("{expected} ({e})"),
                })?;
            let serde_json::Value::Array(items) = parsed else {
                return Err(ConfigError::Invalid {
                    setting: var,
                    value: raw.clone(),
                    expected,
                });
            };
            lists.entry(list.key).or_default().extend(items);
        }

        let unknown_env = env
            .keys()
            .filter(|k| {
                !OTHER_ENV.contains(&k.as_str())
                    && !KEYS.iter().any(|key| env_name(key.name) == **k)
                    && !LISTS.iter().any(|list| env_name(list.key) == **k)
            })
            .cloned()
            .collect();

        let l = Layers { values };
        let log_format = match l.get("log_format").trim() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            _ => return Err(l.invalid("log_format", "\"text\" or \"json\"")),
        };
        let ingest = IngestConfig {
            batch_size: l.int_in("batch_size", 1, 10_000)?,
            batch_wait: l.duration_in(
                "batch_wait",
                Duration::from_millis(1),
                Duration::from_secs(10),
            )?,
            max_event_bytes: l.int_in("max_event_bytes", 256, 8 * 1024 * 1024)?,
            batch_max_bytes: l.int_in("batch_max_bytes", 1024 * 1024, 256 * 1024 * 1024)?,
            ack_wait: l.duration_in(
                "ack_wait",
                Duration::from_secs(1),
                Duration::from_secs(3600),
            )?,
            max_ack_pending: l.int_in("max_ack_pending", 1, 1_000_000)?,
            stream_max_age: l.duration_in(
                "stream_max_age",
                Duration::from_secs(60),
                Duration::from_secs(10 * 365 * 86_400),
            )?,
            duplicate_window: l.duration_in(
                "duplicate_window",
                Duration::from_secs(1),
                Duration::from_secs(86_400),
            )?,
            db_max_connections: l.int_in("db_max_connections", 2, 1000)?,
            persist_concurrency: l.int_in("persist_concurrency", 1, 16)?,
        };
        if ingest.persist_concurrency as u32 >= ingest.db_max_connections {
            return Err(l.invalid(
                "persist_concurrency",
                format!(
                    "fewer than db_max_connections ({}), which must also serve health checks",
                    ingest.db_max_connections
                ),
            ));
        }
        let largest = ingest.stream_max_message_size() + DELIVERY_OVERHEAD;
        if ingest.batch_max_bytes < largest {
            return Err(l.invalid(
                "batch_max_bytes",
                format!(
                    "at least {largest} bytes with {}={}: the largest message the stream takes \
                     ({} of payload + {STREAM_HEADER_HEADROOM} of headers) and its delivery \
                     ({DELIVERY_OVERHEAD}) must fit in one batch; raise it, or lower the \
                     largest event",
                    l.setting_name("max_event_bytes"),
                    ingest.max_event_bytes,
                    ingest.max_event_bytes,
                ),
            ));
        }
        let id_key = match l.get("id_key").trim() {
            "" => None,
            key if key.chars().count() < ID_KEY_MIN_LEN => {
                return Err(ConfigError::Invalid {
                    setting: l.setting_name("id_key"),
                    value: "***".into(),
                    expected: format!(
                        "a secret of at least {ID_KEY_MIN_LEN} characters, such as the output of `openssl rand -hex 32`"
                    ),
                });
            }
            key => Some(Secret::new(key.to_owned())),
        };
        if ingest.duplicate_window > ingest.stream_max_age {
            return Err(l.invalid(
                "duplicate_window",
                "a duration no longer than stream_max_age",
            ));
        }
        let database_url = l.url("database_url", &["postgres", "postgresql"])?;
        let migrate_database_url = if l.get("migrate_database_url").trim().is_empty() {
            database_url.clone()
        } else {
            l.url("migrate_database_url", &["postgres", "postgresql"])?
        };
        Ok(Config {
            nats_url: l.url("nats_url", &["nats", "tls", "ws", "wss"])?,
            database_url,
            migrate_database_url,
            subject_prefix: l.subject_prefix("subject_prefix")?,
            stream: l.nats_name("stream")?,
            consumer: l.nats_name("consumer")?,
            metrics_addr: l.parse("metrics_addr", "a socket address such as 127.0.0.1:9464")?,
            api_addr: l.parse("api_addr", "a socket address such as 127.0.0.1:8080")?,
            api_max_body_bytes: l.int_in("api_max_body_bytes", 1024, 256 * 1024 * 1024)?,
            api_heartbeat: l.duration_in(
                "api_heartbeat",
                Duration::from_millis(100),
                Duration::from_secs(3600),
            )?,
            api_statement_timeout: l.duration_in(
                "api_statement_timeout",
                Duration::from_millis(10),
                Duration::from_secs(3600),
            )?,
            api_write_timeout: l.duration_in(
                "api_write_timeout",
                Duration::from_millis(100),
                Duration::from_secs(3600),
            )?,
            log: l.get("log").to_owned(),
            log_format,
            ingest,
            shutdown_timeout: l.duration_in(
                "shutdown_timeout",
                Duration::from_secs(1),
                Duration::from_secs(600),
            )?,
            lease_ttl: l.duration_in(
                "lease_ttl",
                Duration::from_secs(1),
                Duration::from_secs(600),
            )?,
            destinations: lists.remove("destinations").unwrap_or_default(),
            api_tokens: lists.remove("api_tokens").unwrap_or_default(),
            sources: lists.remove("sources").unwrap_or_default(),
            id_key,
            unknown_env,
        })
    }

    /// `AUDITBRIDGE_*` variables that no setting reads (probably typos).
    pub fn unknown_env(&self) -> &[String] {
        &self.unknown_env
    }

    /// The database name in `database_url` (the part after the last `/`, before `?`).
    pub fn database_name(&self) -> &str {
        let tail = self.database_url.rsplit('/').next().unwrap_or("");
        tail.split('?').next().unwrap_or("")
    }
}

impl Default for Config {
    fn default() -> Self {
        Config::from_env(std::iter::empty()).expect("the built-in defaults are valid")
    }
}

/// Reads the TOML file into `values`; returns its arrays of tables (`[[destinations]]`,
/// `[[api_tokens]]`, `[[sources]]`) by key.
fn read_file(
    path: &Path,
    values: &mut BTreeMap<&'static str, Value>,
) -> Result<BTreeMap<&'static str, Vec<serde_json::Value>>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
    let mut lists: BTreeMap<&'static str, Vec<serde_json::Value>> = BTreeMap::new();
    for (key, value) in table {
        if let Some(list) = LISTS.iter().find(|l| l.key == key) {
            let toml::Value::Array(items) = value else {
                return Err(ConfigError::Parse {
                    path: path.to_owned(),
                    message: format!("`{key}` must be an array of tables ([[{key}]])"),
                });
            };
            for item in items {
                let json = serde_json::to_value(&item).map_err(|e| ConfigError::Parse {
                    path: path.to_owned(),
                    message: format!("{key}: {e}"),
                })?;
                lists.entry(list.key).or_default().push(json);
            }
            continue;
        }
        let Some(known) = KEYS.iter().find(|k| k.name == key) else {
            return Err(ConfigError::UnknownKey {
                path: path.to_owned(),
                key,
            });
        };
        let text = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            other => {
                return Err(ConfigError::Invalid {
                    setting: format!("{key} (in {})", path.display()),
                    value: other.to_string(),
                    expected: "a string or a number".into(),
                });
            }
        };
        values.insert(
            known.name,
            Value {
                text,
                origin: Origin::File(path.to_owned()),
            },
        );
    }
    Ok(lists)
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
        assert_eq!(c.nats_url, "nats://127.0.0.1:4222");
        assert_eq!(
            c.database_url,
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
            "batch_size = 100\nstream = \"FROMFILE\"\n[[destinations]]\nname = \"siem\"\ntype = \"http\"\n",
        )
        .unwrap();
        let c = Config::from_env(env(&[
            ("AUDITBRIDGE_CONFIG", path.to_str().unwrap()),
            ("AUDITBRIDGE_BATCH_SIZE", "250"),
            (
                "AUDITBRIDGE_DESTINATIONS",
                r#"[{"name":"bus","type":"rabbitmq"}]"#,
            ),
        ]))
        .unwrap();
        assert_eq!(c.ingest.batch_size, 250);
        assert_eq!(c.stream, "FROMFILE");
        assert_eq!(c.destinations.len(), 2);
        assert_eq!(c.destinations[0]["name"], "siem");
        assert_eq!(c.destinations[1]["name"], "bus");
    }

    #[test]
    fn every_list_comes_from_the_file_then_the_environment() {
        let dir = std::env::temp_dir().join(format!("abcfg3-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("lists.toml");
        std::fs::write(
            &path,
            "[[api_tokens]]\nname = \"a\"\n[[sources]]\nname = \"gh\"\ntype = \"webhook\"\n",
        )
        .unwrap();
        let c = Config::from_env(env(&[
            ("AUDITBRIDGE_CONFIG", path.to_str().unwrap()),
            ("AUDITBRIDGE_API_TOKENS", r#"[{"name":"b"}]"#),
            ("AUDITBRIDGE_SOURCES", r#"[{"name":"f","type":"file"}]"#),
        ]))
        .unwrap();
        assert!(c.unknown_env().is_empty(), "{:?}", c.unknown_env());
        let names = |l: &[serde_json::Value]| -> Vec<String> {
            l.iter()
                .map(|v| v["name"].as_str().unwrap().to_owned())
                .collect()
        };
        assert_eq!(names(&c.api_tokens), ["a", "b"]);
        assert_eq!(names(&c.sources), ["gh", "f"]);
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
            err.contains("batch_size (in ") && err.contains("b.toml"),
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
        assert_eq!(c.migrate_database_url, writer);
        let owner = "postgres://auditbridge_owner:s3cret@db:5432/audit";
        let c = Config::from_env(env(&[
            ("AUDITBRIDGE_DATABASE_URL", writer),
            ("AUDITBRIDGE_MIGRATE_DATABASE_URL", owner),
        ]))
        .unwrap();
        assert_eq!(c.migrate_database_url, owner);
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
                    password: "p@ss".into()
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
        assert_eq!(c.id_key, None);
        let key = "0123456789abcdef0123456789abcdef-id-key";
        let c = Config::from_env(env(&[("AUDITBRIDGE_ID_KEY", key)])).unwrap();
        assert_eq!(c.id_key.as_ref().map(Secret::expose), Some(key));
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
}
