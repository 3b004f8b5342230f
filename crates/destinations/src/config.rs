//! Destination definitions: `{"name", "type", "params"}` objects from the TOML file's
//! `[[destinations]]` and `AUDITBRIDGE_DESTINATIONS`, validated into typed settings. Every
//! error names the destination and the setting.
//!
//! This module holds what every type shares: the definition, the filter, the start, the
//! backlog and retry settings, and the split of `params` into the common keys and the type's
//! own. Each type's parameters are read and checked by its folder (`rabbitmq/config.rs`,
//! `http/config.rs`); they are re-exported here, where they have always been.

use std::collections::HashSet;
use std::time::Duration;

use auditbridge_event::Outcome;
use serde::Deserialize;
use serde::de::DeserializeOwned;
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

pub use crate::http::{HttpAuth, HttpFormat, HttpParams};
pub use crate::rabbitmq::{RabbitMode, RabbitParams, render_routing_key};
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

pub(crate) fn err(name: &str, setting: &str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        name: name.to_owned(),
        setting: setting.to_owned(),
        message: message.into(),
    }
}

/// A type's own parameters (what is left of `params` without the common keys), read as `T`.
pub(crate) fn type_params<T: DeserializeOwned>(
    name: &str,
    params: serde_json::Value,
) -> Result<T, ConfigError> {
    serde_json::from_value(params).map_err(|e| {
        err(
            name,
            "params",
            format!(
                "{e} (or one of the common parameters: {})",
                COMMON_KEYS.join(", ")
            ),
        )
    })
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
    let kind = match raw.kind.as_str() {
        "rabbitmq" => Kind::RabbitMq(crate::rabbitmq::parse_params(&name, params)?),
        "http" => Kind::Http(crate::http::parse_params(&name, params)?),
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

/// A positive duration such as `"10s"`, or `default` when the setting is absent.
pub(crate) fn duration(
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    /// One definition, parsed as a list of one.
    pub(crate) fn one(v: serde_json::Value) -> Result<DestinationConfig, ConfigError> {
        parse_destinations(&[v]).map(|mut d| d.remove(0))
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
}
