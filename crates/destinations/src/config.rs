//! Destination definitions: `{"name", "type", "params"}` objects from the TOML file's
//! `[[destinations]]` and `AUDITBRIDGE_DESTINATIONS`, validated into typed settings. Every
//! error names the destination and the setting.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use auditbridge_event::Outcome;
use serde::Deserialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// A destination definition that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("destination {name}: {setting}: {message}")]
pub struct ConfigError {
    /// The destination's name, or its position (`#2`) when it has no usable name.
    pub name: String,
    pub setting: String,
    pub message: String,
}

/// A validated destination.
#[derive(Debug, Clone, PartialEq)]
pub struct DestinationConfig {
    pub name: String,
    pub kind: Kind,
    pub filter: Filter,
    pub start: Start,
    /// When set, backlog older than this is skipped (loudly, and counted).
    pub max_backlog_age: Option<Duration>,
    /// Most events handed to the sink at once.
    pub batch_size: usize,
    /// Backoff between failed attempts: exponential with jitter from `retry_min` to `retry_max`.
    pub retry_min: Duration,
    pub retry_max: Duration,
    /// What the relay does with an event this destination can never take.
    pub on_undeliverable: OnUndeliverable,
}

/// What the relay does with an event the destination cannot take: one whose message cannot be
/// built (an AMQP routing key over 255 bytes), that the broker returns as unroutable or closes
/// the channel over (406 PRECONDITION_FAILED: over its `max_message_size`), or that the
/// receiver refuses alone (a permanent HTTP 4xx) while it takes the events around it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnUndeliverable {
    /// Keep it in the destination's dead letters (`destination_dead_letters`), count it, and
    /// go on with the next events (the default).
    #[default]
    DeadLetter,
    /// Stop there: the destination is failing and its cursor waits until someone fixes the
    /// event's route or the receiver.
    Block,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    RabbitMq(RabbitParams),
    Http(HttpParams),
}

impl Kind {
    pub fn type_name(&self) -> &'static str {
        match self {
            Kind::RabbitMq(_) => "rabbitmq",
            Kind::Http(_) => "http",
        }
    }
}

/// Which events a destination receives. An empty list means "all".
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Filter {
    pub tenants: Vec<String>,
    /// Action prefixes on token boundaries: `document` matches `document` and
    /// `document.update`, not `documents.x`.
    pub actions: Vec<String>,
    pub outcomes: Vec<Outcome>,
}

impl Filter {
    pub fn matches(&self, tenant: &str, action: &str, outcome: &str) -> bool {
        (self.tenants.is_empty() || self.tenants.iter().any(|t| t == tenant))
            && (self.actions.is_empty()
                || self.actions.iter().any(|p| {
                    action == p
                        || (action.len() > p.len()
                            && action.starts_with(p.as_str())
                            && action.as_bytes()[p.len()] == b'.')
                }))
            && (self.outcomes.is_empty() || self.outcomes.iter().any(|o| o.as_str() == outcome))
    }
}

/// Where a new destination starts.
#[derive(Debug, Clone, PartialEq)]
pub enum Start {
    /// Events stored from the destination's creation on (the default).
    Now,
    /// Every stored event.
    Earliest,
    /// Events stored at or after this time.
    At(OffsetDateTime),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RabbitMode {
    /// One message per event.
    Event,
    /// One NDJSON message per run of consecutive events sharing routing key and tenant, cut
    /// at `max_batch_bytes`.
    Batch,
}

#[derive(Clone, PartialEq)]
pub struct RabbitParams {
    /// `amqp://user:pass@host:port/vhost`.
    pub url: String,
    pub exchange: String,
    /// Template with `{tenant}`, `{action}`, `{outcome}`, `{source}`; default
    /// `{tenant}.{action}`.
    pub routing_key: String,
    pub mandatory: bool,
    pub mode: RabbitMode,
    /// A publish not confirmed within this time counts as failed (and is resent).
    pub confirm_timeout: Duration,
    /// Most unconfirmed messages at once.
    pub max_in_flight: usize,
    /// Batch mode: most body bytes in one message. A message holds at least one event, so one
    /// larger than this still goes, alone.
    pub max_batch_bytes: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpFormat {
    Ndjson,
    JsonArray,
}

#[derive(Clone, PartialEq)]
pub enum HttpAuth {
    Bearer(String),
    Basic { username: String, password: String },
}

#[derive(Clone, PartialEq)]
pub struct HttpParams {
    pub url: String,
    pub format: HttpFormat,
    pub max_batch_events: usize,
    pub max_batch_bytes: usize,
    pub headers: Vec<(String, String)>,
    pub auth: Option<HttpAuth>,
    pub timeout: Duration,
    /// When set, requests carry an HMAC-SHA256 signature of `timestamp + "." + body`.
    pub secret: Option<String>,
}

// Debug by hand for everything that holds a credential, so that logging a configuration
// never prints a token, a password or a signing secret.

impl std::fmt::Debug for HttpAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HttpAuth::Bearer(_) => f.write_str("Bearer(***)"),
            HttpAuth::Basic { username, .. } => write!(f, "Basic({username}:***)"),
        }
    }
}

impl std::fmt::Debug for HttpParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpParams")
            .field("url", &redact_url(&self.url))
            .field("format", &self.format)
            .field("max_batch_events", &self.max_batch_events)
            .field("max_batch_bytes", &self.max_batch_bytes)
            .field(
                "headers",
                &self.headers.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            )
            .field("auth", &self.auth)
            .field("timeout", &self.timeout)
            .field("secret", &self.secret.as_ref().map(|_| "***"))
            .finish()
    }
}

impl std::fmt::Debug for RabbitParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitParams")
            .field("url", &redact_url(&self.url))
            .field("exchange", &self.exchange)
            .field("routing_key", &self.routing_key)
            .field("mandatory", &self.mandatory)
            .field("mode", &self.mode)
            .field("confirm_timeout", &self.confirm_timeout)
            .field("max_in_flight", &self.max_in_flight)
            .field("max_batch_bytes", &self.max_batch_bytes)
            .finish()
    }
}

pub use auditbridge_config::redact_url;

// ---- raw serde shapes ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDestination {
    name: String,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    params: serde_json::Map<String, serde_json::Value>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawFilter {
    #[serde(default)]
    tenants: Vec<String>,
    #[serde(default)]
    actions: Vec<String>,
    #[serde(default)]
    outcomes: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRabbit {
    url: String,
    exchange: String,
    #[serde(default)]
    routing_key: Option<String>,
    #[serde(default)]
    mandatory: Option<bool>,
    #[serde(default)]
    mode: Option<String>,
    #[serde(default)]
    confirm_timeout: Option<String>,
    #[serde(default)]
    max_in_flight: Option<usize>,
    #[serde(default)]
    max_batch_bytes: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    url: String,
    #[serde(default)]
    format: Option<String>,
    #[serde(default)]
    max_batch_events: Option<usize>,
    #[serde(default)]
    max_batch_bytes: Option<usize>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    bearer_token: Option<String>,
    #[serde(default)]
    basic_auth: Option<RawBasic>,
    #[serde(default)]
    timeout: Option<String>,
    #[serde(default)]
    secret: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBasic {
    username: String,
    password: String,
}

/// Parameters every destination type takes. They are split off the params object before the
/// type's own parameters are read, so that both parts can refuse unknown keys (serde's
/// `flatten` cannot be combined with `deny_unknown_fields`).
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Common {
    #[serde(default)]
    filter: Option<RawFilter>,
    #[serde(default)]
    start: Option<String>,
    #[serde(default)]
    max_backlog_age: Option<String>,
    #[serde(default)]
    batch_size: Option<usize>,
    #[serde(default)]
    retry_min: Option<String>,
    #[serde(default)]
    retry_max: Option<String>,
    #[serde(default)]
    on_undeliverable: Option<String>,
}

/// The default bound on a batch-mode RabbitMQ message's body: 1 MiB, as for HTTP requests.
const DEFAULT_RABBIT_BATCH_BYTES: usize = 1024 * 1024;

/// The largest `max_batch_bytes` for RabbitMQ: 16 MiB, the broker's own default
/// `max_message_size` since RabbitMQ 4.0 (128 MiB before). A bound above the broker's limit
/// builds batches that the broker refuses; the relay then splits them, but every split costs
/// a reconnect and a resend.
const MAX_RABBIT_BATCH_BYTES: usize = 16 * 1024 * 1024;

const COMMON_KEYS: [&str; 7] = [
    "filter",
    "start",
    "max_backlog_age",
    "batch_size",
    "retry_min",
    "retry_max",
    "on_undeliverable",
];

/// Validates every definition; fails on the first bad one, or on a duplicate name.
pub fn parse_destinations(
    raw: &[serde_json::Value],
) -> Result<Vec<DestinationConfig>, ConfigError> {
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(raw.len());
    for (i, value) in raw.iter().enumerate() {
        let label = value
            .get("name")
            .and_then(|n| n.as_str())
            .map(str::to_owned)
            .unwrap_or_else(|| format!("#{}", i + 1));
        let d = parse_one(value, &label)?;
        if !seen.insert(d.name.clone()) {
            return Err(err(
                &label,
                "name",
                "is used by another destination; names must be unique",
            ));
        }
        out.push(d);
    }
    Ok(out)
}

fn err(name: &str, setting: &str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        name: name.to_owned(),
        setting: setting.to_owned(),
        message: message.into(),
    }
}

fn parse_one(value: &serde_json::Value, label: &str) -> Result<DestinationConfig, ConfigError> {
    let raw: RawDestination = serde_json::from_value(value.clone()).map_err(|e| {
        err(
            label,
            "definition",
            format!("{e} (expected {{\"name\", \"type\", \"params\"}})"),
        )
    })?;
    let name = raw.name;
    // Names follow the tenant grammar, [a-z0-9][a-z0-9_-]{0,62}: they appear in metric labels
    // (and, for sources, in URLs and file names).
    if auditbridge_event::validate_tenant(&name).is_err() {
        return Err(err(
            label,
            "name",
            format!("expected [a-z0-9][a-z0-9_-]{{0,62}}, got {name:?}"),
        ));
    }
    let (common_params, own_params): (serde_json::Map<_, _>, serde_json::Map<_, _>) = raw
        .params
        .into_iter()
        .partition(|(k, _)| COMMON_KEYS.contains(&k.as_str()));
    let common: Common = serde_json::from_value(serde_json::Value::Object(common_params))
        .map_err(|e| err(&name, "params", e.to_string()))?;
    let params = serde_json::Value::Object(own_params);
    let param_err = |e: serde_json::Error| {
        err(
            &name,
            "params",
            format!(
                "{e} (or one of the common parameters: {})",
                COMMON_KEYS.join(", ")
            ),
        )
    };
    let kind = match raw.kind.as_str() {
        "rabbitmq" => {
            let r: RawRabbit = serde_json::from_value(params).map_err(param_err)?;
            if !(r.url.starts_with("amqp://") || r.url.starts_with("amqps://")) {
                return Err(err(
                    &name,
                    "params.url",
                    format!(
                        "expected an amqp:// or amqps:// URL, got {:?}",
                        redact_url(&r.url)
                    ),
                ));
            }
            // The parser the sink's connect uses, so a URL that loads is a URL it can use. Its
            // message is not quoted: it may repeat the password.
            if r.url.parse::<lapin::uri::AMQPUri>().is_err() {
                return Err(err(
                    &name,
                    "params.url",
                    format!("not a valid AMQP URI: {:?}", redact_url(&r.url)),
                ));
            }
            // The limits the sink's AMQP strings have (short strings: at most 255 bytes).
            if lapin::types::ShortString::try_new(r.exchange.as_str()).is_err() {
                return Err(err(&name, "params.exchange", "expected at most 255 bytes"));
            }
            let mode = match r.mode.as_deref().unwrap_or("event") {
                "event" => RabbitMode::Event,
                "batch" => RabbitMode::Batch,
                other => {
                    return Err(err(
                        &name,
                        "params.mode",
                        format!("expected \"event\" or \"batch\", got {other:?}"),
                    ));
                }
            };
            let routing_key = r.routing_key.unwrap_or_else(|| "{tenant}.{action}".into());
            check_template(&name, &routing_key)?;
            // The template's fixed part alone must fit a routing key; the placeholders are
            // checked per event (an event whose key is too long is undeliverable).
            if render_routing_key(&routing_key, "", "", "", "").len() > 255 {
                return Err(err(
                    &name,
                    "params.routing_key",
                    "the template's text outside placeholders is over 255 bytes, the AMQP limit",
                ));
            }
            let max_in_flight = r.max_in_flight.unwrap_or(1000);
            if max_in_flight == 0 || max_in_flight > 100_000 {
                return Err(err(&name, "params.max_in_flight", "expected 1 to 100000"));
            }
            let max_batch_bytes = r.max_batch_bytes.unwrap_or(DEFAULT_RABBIT_BATCH_BYTES);
            if !(1024..=MAX_RABBIT_BATCH_BYTES).contains(&max_batch_bytes) {
                return Err(err(
                    &name,
                    "params.max_batch_bytes",
                    format!(
                        "expected 1024 to {MAX_RABBIT_BATCH_BYTES} (16 MiB, RabbitMQ 4's default max_message_size), got {max_batch_bytes}"
                    ),
                ));
            }
            Kind::RabbitMq(RabbitParams {
                url: r.url,
                exchange: r.exchange,
                routing_key,
                mandatory: r.mandatory.unwrap_or(true),
                mode,
                confirm_timeout: duration(
                    &name,
                    "params.confirm_timeout",
                    r.confirm_timeout.as_deref(),
                    Duration::from_secs(10),
                )?,
                max_in_flight,
                max_batch_bytes,
            })
        }
        "http" => {
            let h: RawHttp = serde_json::from_value(params).map_err(param_err)?;
            // The parser the sink uses (reqwest's `Url`), so a URL that loads is one it can use.
            let url_ok = (h.url.starts_with("http://") || h.url.starts_with("https://"))
                && reqwest::Url::parse(&h.url)
                    .is_ok_and(|u| u.host_str().is_some_and(|h| !h.is_empty()));
            if !url_ok {
                return Err(err(
                    &name,
                    "params.url",
                    format!(
                        "expected an http:// or https:// URL with a host, got {:?}",
                        redact_url(&h.url)
                    ),
                ));
            }
            let format = match h.format.as_deref().unwrap_or("ndjson") {
                "ndjson" => HttpFormat::Ndjson,
                "json_array" => HttpFormat::JsonArray,
                other => {
                    return Err(err(
                        &name,
                        "params.format",
                        format!("expected \"ndjson\" or \"json_array\", got {other:?}"),
                    ));
                }
            };
            if let Some(token) = &h.bearer_token
                && reqwest::header::HeaderValue::from_str(&format!("Bearer {token}")).is_err()
            {
                return Err(err(
                    &name,
                    "params.bearer_token",
                    "expected no control characters (it is sent in the Authorization header)",
                ));
            }
            let auth = match (h.bearer_token, h.basic_auth) {
                (Some(_), Some(_)) => {
                    return Err(err(
                        &name,
                        "params.bearer_token",
                        "set either bearer_token or basic_auth, not both",
                    ));
                }
                (Some(t), None) => Some(HttpAuth::Bearer(t)),
                (None, Some(b)) => Some(HttpAuth::Basic {
                    username: b.username,
                    password: b.password,
                }),
                (None, None) => None,
            };
            for (k, v) in &h.headers {
                // The name by our own (narrower) rule, the value by the parser the sink uses.
                let ok = !k.is_empty()
                    && k.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b))
                    && reqwest::header::HeaderName::from_bytes(k.as_bytes()).is_ok()
                    && reqwest::header::HeaderValue::from_str(v).is_ok();
                if !ok {
                    // The value is not quoted: it may be an API key.
                    return Err(err(
                        &name,
                        &format!("params.headers.{k}"),
                        "expected a header name of letters, digits, '-' or '_' and a value without control characters",
                    ));
                }
            }
            if h.secret.as_deref().is_some_and(str::is_empty) {
                return Err(err(&name, "params.secret", "must not be empty when set"));
            }
            let max_batch_events = h.max_batch_events.unwrap_or(500);
            if max_batch_events == 0 || max_batch_events > 100_000 {
                return Err(err(
                    &name,
                    "params.max_batch_events",
                    "expected 1 to 100000",
                ));
            }
            let max_batch_bytes = h.max_batch_bytes.unwrap_or(1024 * 1024);
            if max_batch_bytes < 1024 {
                return Err(err(
                    &name,
                    "params.max_batch_bytes",
                    "expected at least 1024",
                ));
            }
            Kind::Http(HttpParams {
                url: h.url,
                format,
                max_batch_events,
                max_batch_bytes,
                headers: h.headers.into_iter().collect(),
                auth,
                timeout: duration(
                    &name,
                    "params.timeout",
                    h.timeout.as_deref(),
                    Duration::from_secs(10),
                )?,
                secret: h.secret,
            })
        }
        other => {
            return Err(err(
                &name,
                "type",
                format!("expected \"rabbitmq\" or \"http\", got {other:?}"),
            ));
        }
    };

    let raw_filter = common.filter.unwrap_or_default();
    for t in &raw_filter.tenants {
        auditbridge_event::validate_tenant(t)
            .map_err(|e| err(&name, "params.filter.tenants", e.to_string()))?;
    }
    for a in &raw_filter.actions {
        auditbridge_event::validate_action(a)
            .map_err(|e| err(&name, "params.filter.actions", e.to_string()))?;
    }
    let outcomes = raw_filter
        .outcomes
        .iter()
        .map(|o| {
            o.parse::<Outcome>()
                .map_err(|e| err(&name, "params.filter.outcomes", e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let start = match common.start.as_deref() {
        None | Some("now") => Start::Now,
        Some("earliest") => Start::Earliest,
        Some(ts) => Start::At(OffsetDateTime::parse(ts, &Rfc3339).map_err(|_| {
            err(
                &name,
                "params.start",
                format!("expected \"now\", \"earliest\" or an RFC 3339 timestamp, got {ts:?}"),
            )
        })?),
    };
    let max_backlog_age = common
        .max_backlog_age
        .as_deref()
        .map(|v| duration(&name, "params.max_backlog_age", Some(v), Duration::ZERO))
        .transpose()?;
    // RabbitMQ: one confirm window per batch, so the broker always has a full window to work
    // on; HTTP: the request size limits cut batches anyway.
    let default_batch = match &kind {
        Kind::RabbitMq(r) => r.max_in_flight.min(10_000),
        Kind::Http(h) => h.max_batch_events.min(10_000),
    };
    let batch_size = common.batch_size.unwrap_or(default_batch);
    if batch_size == 0 || batch_size > 10_000 {
        return Err(err(&name, "params.batch_size", "expected 1 to 10000"));
    }
    let retry_min = duration(
        &name,
        "params.retry_min",
        common.retry_min.as_deref(),
        Duration::from_millis(200),
    )?;
    let retry_max = duration(
        &name,
        "params.retry_max",
        common.retry_max.as_deref(),
        Duration::from_secs(300),
    )?;
    if retry_min > retry_max {
        return Err(err(&name, "params.retry_min", "must not exceed retry_max"));
    }
    let on_undeliverable = match common.on_undeliverable.as_deref() {
        None | Some("dead_letter") => OnUndeliverable::DeadLetter,
        Some("block") => OnUndeliverable::Block,
        Some(other) => {
            return Err(err(
                &name,
                "params.on_undeliverable",
                format!("expected \"dead_letter\" or \"block\", got {other:?}"),
            ));
        }
    };
    Ok(DestinationConfig {
        name,
        kind,
        filter: Filter {
            tenants: raw_filter.tenants,
            actions: raw_filter.actions,
            outcomes,
        },
        start,
        max_backlog_age,
        batch_size,
        retry_min,
        retry_max,
        on_undeliverable,
    })
}

fn duration(
    name: &str,
    setting: &str,
    value: Option<&str>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match value {
        None => Ok(default),
        Some(v) => match humantime::parse_duration(v) {
            Ok(d) if !d.is_zero() => Ok(d),
            _ => Err(err(
                name,
                setting,
                format!("expected a positive duration such as \"10s\" or \"5m\", got {v:?}"),
            )),
        },
    }
}

const PLACEHOLDERS: [&str; 4] = ["tenant", "action", "outcome", "source"];

fn check_template(name: &str, template: &str) -> Result<(), ConfigError> {
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        let Some(close) = rest[open..].find('}') else {
            return Err(err(
                name,
                "params.routing_key",
                format!("unclosed '{{' in {template:?}"),
            ));
        };
        let key = &rest[open + 1..open + close];
        if !PLACEHOLDERS.contains(&key) {
            return Err(err(
                name,
                "params.routing_key",
                format!(
                    "unknown placeholder {{{key}}}; known: {{tenant}}, {{action}}, {{outcome}}, {{source}}"
                ),
            ));
        }
        rest = &rest[open + close + 1..];
    }
    Ok(())
}

/// Fills a routing-key template (checked at startup) for one event.
pub fn render_routing_key(
    template: &str,
    tenant: &str,
    action: &str,
    outcome: &str,
    source: &str,
) -> String {
    template
        .replace("{tenant}", tenant)
        .replace("{action}", action)
        .replace("{outcome}", outcome)
        .replace("{source}", source)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn one(v: serde_json::Value) -> Result<DestinationConfig, ConfigError> {
        parse_destinations(&[v]).map(|mut d| d.remove(0))
    }

    #[test]
    fn a_full_rabbitmq_definition_parses() {
        let d = one(json!({"name": "bus", "type": "rabbitmq", "params": {
            "url": "amqp://guest:guest@127.0.0.1:5672/%2f", "exchange": "audit",
            "routing_key": "audit.{tenant}.{action}", "mode": "batch", "mandatory": false,
            "filter": {"tenants": ["acme"], "actions": ["document"], "outcomes": ["denied"]},
            "start": "earliest", "max_backlog_age": "1h", "batch_size": 100,
            "max_batch_bytes": 65536
        }}))
        .unwrap();
        assert_eq!(d.name, "bus");
        assert_eq!(d.start, Start::Earliest);
        assert_eq!(d.max_backlog_age, Some(Duration::from_secs(3600)));
        assert_eq!(d.batch_size, 100);
        assert_eq!(d.retry_max, Duration::from_secs(300));
        let Kind::RabbitMq(r) = d.kind else { panic!() };
        assert_eq!(r.mode, RabbitMode::Batch);
        assert!(!r.mandatory);
        assert_eq!(r.routing_key, "audit.{tenant}.{action}");
        assert_eq!(r.max_batch_bytes, 65536);
    }

    #[test]
    fn rabbitmq_defaults_and_the_batch_byte_bounds() {
        let with = |extra: serde_json::Value| {
            let mut params =
                json!({"url": "amqp://guest:guest@127.0.0.1:5672/%2f", "exchange": "audit"});
            params
                .as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            one(json!({"name": "bus", "type": "rabbitmq", "params": params}))
        };
        let d = with(json!({})).unwrap();
        let Kind::RabbitMq(r) = d.kind else { panic!() };
        assert_eq!(r.mode, RabbitMode::Event);
        assert!(r.mandatory);
        assert_eq!(r.routing_key, "{tenant}.{action}");
        assert_eq!(r.max_in_flight, 1000);
        assert_eq!(r.max_batch_bytes, 1024 * 1024);
        assert_eq!(d.batch_size, 1000);

        // Both ends of the range load; one byte past either does not, and says why.
        for ok in [1024, 16 * 1024 * 1024] {
            let d = with(json!({"mode": "batch", "max_batch_bytes": ok})).unwrap();
            let Kind::RabbitMq(r) = d.kind else { panic!() };
            assert_eq!(r.max_batch_bytes, ok);
        }
        for bad in [0, 1023, 16 * 1024 * 1024 + 1] {
            let e = with(json!({"mode": "batch", "max_batch_bytes": bad}))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("destination bus: params.max_batch_bytes: expected 1024 to 16777216")
                    && e.contains(&format!("got {bad}")),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn http_defaults() {
        let d = one(
            json!({"name": "siem", "type": "http", "params": {"url": "http://127.0.0.1:9/in"}}),
        )
        .unwrap();
        assert_eq!(d.start, Start::Now);
        assert_eq!(d.max_backlog_age, None);
        let Kind::Http(h) = d.kind else { panic!() };
        assert_eq!(h.format, HttpFormat::Ndjson);
        assert_eq!(h.max_batch_events, 500);
        assert_eq!(h.timeout, Duration::from_secs(10));
        assert_eq!(h.auth, None);
        assert_eq!(d.on_undeliverable, OnUndeliverable::DeadLetter);
        let d = one(json!({"name": "siem", "type": "http", "params": {
            "url": "http://127.0.0.1:9/in", "on_undeliverable": "block"}}))
        .unwrap();
        assert_eq!(d.on_undeliverable, OnUndeliverable::Block);
    }

    #[test]
    fn a_rejected_url_is_shown_without_its_password() {
        let e = one(json!({"name": "x", "type": "rabbitmq", "params": {
            "url": "amqp://u:pw-SECRET@h:notaport/%2f", "exchange": "e"}}))
        .unwrap_err()
        .to_string();
        assert!(e.contains("params.url") && !e.contains("pw-SECRET"), "{e}");
    }

    /// Whatever loads must build: every definition the validation accepts gives a sink.
    #[test]
    fn accepted_definitions_build_their_sinks() {
        let all = parse_destinations(&[
            json!({"name": "a", "type": "http", "params": {"url": "https://h.example:8443/x?k=v",
                   "headers": {"X-Api-Key": "key with spaces\tand tab", "X-Utf8": "caf\u{e9}"},
                   "bearer_token": "tok"}}),
            json!({"name": "b", "type": "rabbitmq", "params": {"url": "amqps://u:p@h:5671/vh", "exchange": "e"}}),
        ])
        .unwrap();
        for d in &all {
            crate::Sink::new(d).unwrap_or_else(|e| panic!("{}: {e}", d.name));
        }
    }

    #[test]
    fn errors_name_the_destination_and_the_setting() {
        let cases = [
            (
                json!({"name": "x", "type": "kafka", "params": {}}),
                "destination x: type",
            ),
            (
                json!({"name": "x", "type": "http", "params": {"url": "ftp://a"}}),
                "destination x: params.url",
            ),
            (
                json!({"name": "x", "type": "http", "params": {"url": "http://a", "formt": "x"}}),
                "unknown field `formt`",
            ),
            (
                json!({"name": "x", "type": "http", "params": {"url": "http://a", "format": "xml"}}),
                "params.format",
            ),
            (
                json!({"name": "x", "type": "rabbitmq", "params": {"url": "amqp://a", "exchange": "e", "routing_key": "{tenat}"}}),
                "params.routing_key",
            ),
            (
                json!({"name": "x", "type": "rabbitmq", "params": {"url": "amqp://a", "exchange": "e", "mode": "bulk"}}),
                "params.mode",
            ),
            (
                json!({"name": "x", "type": "rabbitmq", "params": {"url": "http://a", "exchange": "e"}}),
                "params.url",
            ),
            (
                json!({"name": "x", "type": "http", "params": {"url": "http://a", "start": "yesterday"}}),
                "params.start",
            ),
            (
                json!({"name": "x", "type": "http", "params": {"url": "http://a", "max_backlog_age": "soon"}}),
                "params.max_backlog_age",
            ),
            (
                json!({"name": "x", "type": "http", "params": {"url": "http://a", "filter": {"tenants": ["ACME"]}}}),
                "params.filter.tenants",
            ),
            (
                json!({"name": "x", "type": "http", "params": {"url": "http://a", "filter": {"outcomes": ["ok"]}}}),
                "params.filter.outcomes",
            ),
            (
                json!({"name": "x", "type": "http", "params": {"url": "http://a", "filter": {"actions": ["Doc"]}}}),
                "params.filter.actions",
            ),
            (
                json!({"name": "Bad Name", "type": "http", "params": {"url": "http://a"}}),
                "name",
            ),
            (
                json!({"type": "http", "params": {"url": "http://a"}}),
                "destination #1",
            ),
            (
                json!({"name": "x", "type": "http", "params": {"url": "http://a", "on_undeliverable": "drop"}}),
                "destination x: params.on_undeliverable",
            ),
            // What the sinks' own parsers refuse is refused here, at load, by the same parsers.
            (
                json!({"name": "x", "type": "http", "params": {"url": "http://exa mple/in"}}),
                "destination x: params.url",
            ),
            (
                json!({"name": "x", "type": "http", "params": {"url": "http://a:99999/in"}}),
                "destination x: params.url",
            ),
            (
                json!({"name": "x", "type": "http", "params": {"url": "http://a", "headers": {"X-Key": "ab\u{1}c"}}}),
                "destination x: params.headers.X-Key",
            ),
            (
                json!({"name": "x", "type": "http", "params": {"url": "http://a", "headers": {"X-Key": "ab\u{7f}"}}}),
                "destination x: params.headers.X-Key",
            ),
            (
                json!({"name": "x", "type": "http", "params": {"url": "http://a", "bearer_token": "t\u{0}k"}}),
                "destination x: params.bearer_token",
            ),
            (
                json!({"name": "x", "type": "rabbitmq", "params": {"url": "amqp://h:notaport/%2f", "exchange": "e"}}),
                "destination x: params.url",
            ),
            (
                json!({"name": "x", "type": "rabbitmq", "params": {"url": "amqp://a", "exchange": "e".repeat(256)}}),
                "destination x: params.exchange",
            ),
            (
                json!({"name": "x", "type": "rabbitmq", "params": {"url": "amqp://a", "exchange": "e", "routing_key": format!("{}.{{tenant}}", "k".repeat(256))}}),
                "destination x: params.routing_key",
            ),
        ];
        for (value, want) in cases {
            let e = one(value.clone()).unwrap_err().to_string();
            assert!(e.contains(want), "{value}: {e}");
        }
        let dup = parse_destinations(&[
            json!({"name": "x", "type": "http", "params": {"url": "http://a"}}),
            json!({"name": "x", "type": "http", "params": {"url": "http://b"}}),
        ])
        .unwrap_err()
        .to_string();
        assert!(
            dup.contains("destination x: name") && dup.contains("unique"),
            "{dup}"
        );
    }

    #[test]
    fn action_filters_match_on_token_boundaries() {
        let f = Filter {
            actions: vec!["document".into()],
            ..Default::default()
        };
        assert!(f.matches("t", "document", "success"));
        assert!(f.matches("t", "document.update", "success"));
        assert!(f.matches("t", "document.share.revoke", "success"));
        assert!(!f.matches("t", "documents.x", "success"));
        assert!(!f.matches("t", "doc", "success"));
        let f = Filter {
            tenants: vec!["acme".into()],
            outcomes: vec![Outcome::Denied],
            ..Default::default()
        };
        assert!(f.matches("acme", "x", "denied"));
        assert!(!f.matches("acme", "x", "success"));
        assert!(!f.matches("globex", "x", "denied"));
        assert!(Filter::default().matches("any", "thing", "unknown"));
    }

    #[test]
    fn debug_output_never_shows_credentials() {
        let all = parse_destinations(&[
            json!({"name": "a", "type": "http", "params": {"url": "http://h/x", "bearer_token": "tok-SECRET",
                   "secret": "hmac-SECRET", "headers": {"X-Api-Key": "key-SECRET"}}}),
            json!({"name": "b", "type": "http", "params": {"url": "http://h/x",
                   "basic_auth": {"username": "u", "password": "pw-SECRET"}}}),
            json!({"name": "c", "type": "rabbitmq", "params": {"url": "amqp://u:amqp-SECRET@h:5672/%2f", "exchange": "e"}}),
        ])
        .unwrap();
        let text = format!("{all:?}");
        assert!(!text.contains("SECRET"), "{text}");
    }

    #[test]
    fn routing_keys_render() {
        assert_eq!(
            render_routing_key("{tenant}.{action}", "acme", "user.login", "success", "auth"),
            "acme.user.login"
        );
    }
}
