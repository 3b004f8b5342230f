//! Source definitions: `{"name", "type", "params"}` objects from the TOML file's `[[sources]]`
//! and `AUDITBRIDGE_SOURCES`, validated into typed settings. Unknown keys are refused; every
//! error names the source and the setting; secrets never appear in `Debug`.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

use auditbridge_event::Outcome;
use serde::Deserialize;
use serde_json::Value;

use crate::mapping::{
    ActorMapping, Field, FieldMapping, IdKey, Mapping, TargetMapping, check_action,
};

/// A source definition that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("source {name}: {setting}: {message}")]
pub struct ConfigError {
    /// The source's name, or its position (`#2`) when it has no usable name.
    pub name: String,
    pub setting: String,
    pub message: String,
}

/// A validated source.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceConfig {
    pub name: String,
    pub kind: SourceKind,
}

#[derive(Debug, Clone, PartialEq)]
pub enum SourceKind {
    Webhook(WebhookParams),
    File(FileParams),
}

impl SourceKind {
    pub fn type_name(&self) -> &'static str {
        match self {
            SourceKind::Webhook(_) => "webhook",
            SourceKind::File(_) => "file",
        }
    }
}

/// A signed webhook: `POST /v1/webhooks/<name>`.
#[derive(Clone, PartialEq)]
pub struct WebhookParams {
    /// The HMAC-SHA256 key shared with the sender.
    pub secret: String,
    /// Header carrying the signature (lowercase).
    pub signature_header: String,
    /// Text before the hex digest in that header (`v1=`, `sha256=`, or empty).
    pub signature_prefix: String,
    /// Header carrying the Unix-seconds timestamp that is signed with the body
    /// (`<timestamp>.<body>`). `None`: the body alone is signed and there is no replay window.
    pub timestamp_header: Option<String>,
    /// A timestamp further than this from the server's clock is refused.
    pub replay_window: Duration,
    pub mapping: Mapping,
    /// The tenants this source may write (empty: any). A sender that can sign can otherwise
    /// name any tenant in its payload.
    pub tenants: Vec<String>,
    /// Largest request body of this source (413 above it, by `Content-Length` before
    /// reading).
    pub max_body_bytes: usize,
    /// Longest the body may take to arrive once the headers passed their checks.
    pub body_timeout: Duration,
    /// Most requests of this source read and published at once; more are answered 503 with
    /// `Retry-After`.
    pub max_concurrent_requests: usize,
}

impl std::fmt::Debug for WebhookParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookParams")
            .field("secret", &"***")
            .field("signature_header", &self.signature_header)
            .field("signature_prefix", &self.signature_prefix)
            .field("timestamp_header", &self.timestamp_header)
            .field("replay_window", &self.replay_window)
            .field("mapping", &self.mapping)
            .field("tenants", &self.tenants)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("body_timeout", &self.body_timeout)
            .field("max_concurrent_requests", &self.max_concurrent_requests)
            .finish()
    }
}

/// A followed JSONL file.
#[derive(Debug, Clone, PartialEq)]
pub struct FileParams {
    pub path: PathBuf,
    /// The position (inode and byte offset), replaced atomically after each acknowledged
    /// chunk.
    pub state_file: PathBuf,
    /// Lines that could not be mapped, one JSON object each, with the reason.
    pub rejected_file: PathBuf,
    pub poll_interval: Duration,
    /// Longer lines are rejected (and skipped up to their newline).
    pub max_line_bytes: usize,
    /// With no state file yet: start at the end of the file instead of the beginning.
    pub start_at_end: bool,
    pub mapping: Mapping,
    /// The tenants this source may write (empty: any).
    pub tenants: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    name: String,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    params: serde_json::Map<String, Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWebhook {
    secret: String,
    #[serde(default)]
    signature_header: Option<String>,
    #[serde(default)]
    signature_prefix: Option<String>,
    /// `""` means "no timestamp": the body alone is signed.
    #[serde(default)]
    timestamp_header: Option<String>,
    #[serde(default)]
    replay_window: Option<String>,
    #[serde(default)]
    mapping: Option<Value>,
    #[serde(default)]
    tenants: Vec<String>,
    #[serde(default)]
    max_body_bytes: Option<usize>,
    #[serde(default)]
    body_timeout: Option<String>,
    #[serde(default)]
    max_concurrent_requests: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    path: PathBuf,
    #[serde(default)]
    state_dir: Option<PathBuf>,
    #[serde(default)]
    poll_interval: Option<String>,
    #[serde(default)]
    max_line_bytes: Option<usize>,
    #[serde(default)]
    start: Option<String>,
    #[serde(default)]
    mapping: Option<Value>,
    #[serde(default)]
    tenants: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMapping {
    id: Value,
    tenant: Value,
    #[serde(rename = "type")]
    event_type: Value,
    actions: BTreeMap<String, String>,
    #[serde(default)]
    occurred_at: Option<String>,
    #[serde(default)]
    outcome: Option<Value>,
    #[serde(default)]
    outcomes: BTreeMap<String, String>,
    actor: BTreeMap<String, Value>,
    #[serde(default)]
    target: Option<BTreeMap<String, Value>>,
    #[serde(default)]
    source: Option<Value>,
    #[serde(default)]
    reason: Option<Value>,
    #[serde(default)]
    request_id: Option<Value>,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
}

/// Validates every definition; fails on the first bad one, or on a duplicate name. `id_key`
/// is `AUDITBRIDGE_ID_KEY`: a source whose mapping derives ids is refused without it.
pub fn parse_sources(
    raw: &[Value],
    id_key: Option<&IdKey>,
) -> Result<Vec<SourceConfig>, ConfigError> {
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(raw.len());
    for (i, value) in raw.iter().enumerate() {
        let label = value
            .get("name")
            .and_then(|n| n.as_str())
            .map(str::to_owned)
            .unwrap_or_else(|| format!("#{}", i + 1));
        let s = parse_one(value, &label, id_key)?;
        if !seen.insert(s.name.clone()) {
            return Err(err(
                &label,
                "name",
                "is used by another source; names must be unique",
            ));
        }
        out.push(s);
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

fn duration(
    name: &str,
    setting: &str,
    v: Option<&str>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match v {
        None => Ok(default),
        Some(s) => humantime::parse_duration(s.trim())
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or_else(|| {
                err(
                    name,
                    setting,
                    format!("expected a duration such as \"250ms\" or \"5m\", got {s:?}"),
                )
            }),
    }
}

fn parse_one(
    value: &Value,
    label: &str,
    id_key: Option<&IdKey>,
) -> Result<SourceConfig, ConfigError> {
    let raw: RawSource = serde_json::from_value(value.clone()).map_err(|e| {
        err(
            label,
            "definition",
            format!("{e} (expected {{\"name\", \"type\", \"params\"}})"),
        )
    })?;
    let name = raw.name;
    // Source names appear in URLs (/v1/webhooks/<name>), metric labels and file names.
    // Names follow the tenant grammar, [a-z0-9][a-z0-9_-]{0,62}: they appear in metric labels
    // (and, for sources, in URLs and file names).
    if auditbridge_event::validate_tenant(&name).is_err() {
        return Err(err(
            label,
            "name",
            format!("expected [a-z0-9][a-z0-9_-]{{0,62}}, got {name:?}"),
        ));
    }
    let params = Value::Object(raw.params);
    let param_err = |e: serde_json::Error| err(&name, "params", e.to_string());
    let kind = match raw.kind.as_str() {
        "webhook" => {
            let w: RawWebhook = serde_json::from_value(params).map_err(param_err)?;
            if w.secret.len() < 16 {
                return Err(err(
                    &name,
                    "params.secret",
                    "expected at least 16 characters",
                ));
            }
            let header = |v: Option<String>, default: &str, setting: &str| {
                let h = v.unwrap_or_else(|| default.to_owned()).to_ascii_lowercase();
                if !h.is_empty() && !h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
                    return Err(err(&name, setting, format!("{h:?} is not a header name")));
                }
                Ok(h)
            };
            let signature_header = header(
                w.signature_header,
                "x-auditbridge-signature",
                "params.signature_header",
            )?;
            if signature_header.is_empty() {
                return Err(err(&name, "params.signature_header", "must not be empty"));
            }
            let timestamp_header = header(
                w.timestamp_header,
                "x-auditbridge-timestamp",
                "params.timestamp_header",
            )?;
            SourceKind::Webhook(WebhookParams {
                secret: w.secret,
                signature_header,
                signature_prefix: w.signature_prefix.unwrap_or_else(|| "v1=".into()),
                timestamp_header: (!timestamp_header.is_empty()).then_some(timestamp_header),
                replay_window: duration(
                    &name,
                    "params.replay_window",
                    w.replay_window.as_deref(),
                    Duration::from_secs(300),
                )?,
                mapping: mapping(&name, w.mapping.as_ref(), id_key)?,
                tenants: tenants(&name, w.tenants)?,
                max_body_bytes: in_range(
                    &name,
                    "params.max_body_bytes",
                    w.max_body_bytes,
                    1024 * 1024,
                    1024..=64 * 1024 * 1024,
                )?,
                body_timeout: duration(
                    &name,
                    "params.body_timeout",
                    w.body_timeout.as_deref(),
                    Duration::from_secs(5),
                )?,
                max_concurrent_requests: in_range(
                    &name,
                    "params.max_concurrent_requests",
                    w.max_concurrent_requests,
                    16,
                    1..=4096,
                )?,
            })
        }
        "file" => {
            let f: RawFile = serde_json::from_value(params).map_err(param_err)?;
            if f.path.as_os_str().is_empty() {
                return Err(err(&name, "params.path", "must not be empty"));
            }
            let dir = f.state_dir.clone().unwrap_or_else(|| {
                f.path
                    .parent()
                    .filter(|p| !p.as_os_str().is_empty())
                    .map_or_else(|| PathBuf::from("."), PathBuf::from)
            });
            let start_at_end = match f.start.as_deref().unwrap_or("beginning") {
                "beginning" => false,
                "end" => true,
                other => {
                    return Err(err(
                        &name,
                        "params.start",
                        format!("expected \"beginning\" or \"end\", got {other:?}"),
                    ));
                }
            };
            let max_line_bytes = f.max_line_bytes.unwrap_or(1024 * 1024);
            if !(16..=64 * 1024 * 1024).contains(&max_line_bytes) {
                return Err(err(
                    &name,
                    "params.max_line_bytes",
                    "expected 16 to 67108864",
                ));
            }
            SourceKind::File(FileParams {
                state_file: dir.join(format!(".auditbridge-tail-{name}.state.json")),
                rejected_file: dir.join(format!("auditbridge-tail-{name}.rejected.jsonl")),
                path: f.path,
                poll_interval: duration(
                    &name,
                    "params.poll_interval",
                    f.poll_interval.as_deref(),
                    Duration::from_millis(250),
                )?,
                max_line_bytes,
                start_at_end,
                mapping: mapping(&name, f.mapping.as_ref(), id_key)?,
                tenants: tenants(&name, f.tenants)?,
            })
        }
        other => {
            return Err(err(
                &name,
                "type",
                format!("expected \"webhook\" or \"file\", got {other:?}"),
            ));
        }
    };
    Ok(SourceConfig { name, kind })
}

fn tenants(name: &str, tenants: Vec<String>) -> Result<Vec<String>, ConfigError> {
    for t in &tenants {
        auditbridge_event::validate_tenant(t).map_err(|e| err(name, "params.tenants", e.detail))?;
    }
    Ok(tenants)
}

fn in_range(
    name: &str,
    setting: &str,
    v: Option<usize>,
    default: usize,
    range: std::ops::RangeInclusive<usize>,
) -> Result<usize, ConfigError> {
    let v = v.unwrap_or(default);
    if !range.contains(&v) {
        return Err(err(
            name,
            setting,
            format!("expected {} to {}, got {v}", range.start(), range.end()),
        ));
    }
    Ok(v)
}

/// `"identity"` (or absent): payloads are v1 events; an object: a [`FieldMapping`], which
/// derives ids and so needs the id key.
fn mapping(name: &str, v: Option<&Value>, id_key: Option<&IdKey>) -> Result<Mapping, ConfigError> {
    match v {
        None => Ok(Mapping::Identity),
        Some(Value::String(s)) if s == "identity" => Ok(Mapping::Identity),
        Some(v @ Value::Object(_)) => {
            let Some(key) = id_key else {
                return Err(err(
                    name,
                    "AUDITBRIDGE_ID_KEY",
                    "is not set, and this source's mapping derives event ids, which are keyed with it \
                     (so that other tenants cannot compute them); make one with `openssl rand -hex 32` \
                     and give the same value to every serve, tail-file and poll",
                ));
            };
            parse_mapping(v, key).map_err(|(setting, message)| {
                err(name, &format!("params.mapping.{setting}"), message)
            })
        }
        Some(other) => Err(err(
            name,
            "params.mapping",
            format!("expected \"identity\" or an object, got {other}"),
        )),
    }
}

/// Parses a mapping object; the error is (setting under `mapping`, message).
pub(crate) fn parse_mapping(v: &Value, id_key: &IdKey) -> Result<Mapping, (String, String)> {
    let raw: RawMapping =
        serde_json::from_value(v.clone()).map_err(|e| ("definition".to_owned(), e.to_string()))?;
    let field = |setting: &str, v: &Value| -> Result<Field, (String, String)> {
        match v {
            Value::String(p) => {
                pointer(p).map_err(|m| (setting.to_owned(), m))?;
                Ok(Field::Pointer(p.clone()))
            }
            Value::Object(o) if o.len() == 1 && o.get("const").is_some_and(Value::is_string) => Ok(
                Field::Const(o["const"].as_str().unwrap_or_default().to_owned()),
            ),
            other => Err((
                setting.to_owned(),
                format!(
                    "expected a JSON pointer such as \"/user/id\" or {{\"const\": \"text\"}}, got {other}"
                ),
            )),
        }
    };
    let opt = |setting: &str, v: Option<&Value>| v.map(|v| field(setting, v)).transpose();
    let event_type = match &raw.event_type {
        Value::String(p) => vec![p.clone()],
        Value::Array(items) if !items.is_empty() => items
            .iter()
            .map(|i| i.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| ("type".to_owned(), "expected JSON pointers".to_owned()))?,
        _ => {
            return Err((
                "type".into(),
                "expected a JSON pointer or a list of them (joined with '.')".into(),
            ));
        }
    };
    for p in &event_type {
        pointer(p).map_err(|m| ("type".to_owned(), m))?;
    }
    if raw.actions.is_empty() {
        return Err((
            "actions".into(),
            "expected at least one foreign type mapped to a v1 action".into(),
        ));
    }
    for (from, to) in &raw.actions {
        check_action(to).map_err(|m| (format!("actions.{from}"), m))?;
    }
    let mut outcomes = BTreeMap::new();
    for (from, to) in &raw.outcomes {
        let o: Outcome = to.parse().map_err(|_| {
            (
                format!("outcomes.{from}"),
                format!("expected success, failure, denied or unknown, got {to:?}"),
            )
        })?;
        outcomes.insert(from.clone(), o);
    }
    if let Some(p) = &raw.occurred_at {
        pointer(p).map_err(|m| ("occurred_at".to_owned(), m))?;
    }
    for (k, p) in &raw.metadata {
        pointer(p).map_err(|m| (format!("metadata.{k}"), m))?;
    }
    let mut actor = ActorMapping::default();
    for (k, v) in &raw.actor {
        let f = Some(field(&format!("actor.{k}"), v)?);
        match k.as_str() {
            "id" => actor.id = f,
            "type" => actor.kind = f,
            "name" => actor.name = f,
            "ip" => actor.ip = f,
            "user_agent" => actor.user_agent = f,
            _ => {
                return Err((
                    format!("actor.{k}"),
                    "unknown field (expected id, type, name, ip, user_agent)".into(),
                ));
            }
        }
    }
    if actor.id.is_none() {
        return Err(("actor.id".into(), "is required".into()));
    }
    let target = match &raw.target {
        None => None,
        Some(t) => {
            let mut target = TargetMapping::default();
            for (k, v) in t {
                let f = Some(field(&format!("target.{k}"), v)?);
                match k.as_str() {
                    "id" => target.id = f,
                    "type" => target.kind = f,
                    "name" => target.name = f,
                    _ => {
                        return Err((
                            format!("target.{k}"),
                            "unknown field (expected id, type, name)".into(),
                        ));
                    }
                }
            }
            Some(target)
        }
    };
    Ok(Mapping::Fields(Box::new(FieldMapping {
        id_key: id_key.clone(),
        id: field("id", &raw.id)?,
        tenant: field("tenant", &raw.tenant)?,
        event_type,
        actions: raw.actions,
        occurred_at: raw.occurred_at,
        outcome: opt("outcome", raw.outcome.as_ref())?,
        outcomes,
        actor,
        target,
        source: opt("source", raw.source.as_ref())?,
        reason: opt("reason", raw.reason.as_ref())?,
        request_id: opt("request_id", raw.request_id.as_ref())?,
        metadata: raw.metadata,
    })))
}

fn pointer(p: &str) -> Result<(), String> {
    if p.starts_with('/') {
        Ok(())
    } else {
        Err(format!(
            "expected a JSON pointer starting with '/', such as \"/user/id\", got {p:?}"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn key() -> IdKey {
        IdKey::new("test-id-key-0123456789abcdef0123456789")
    }

    fn parse(v: Value) -> Result<Vec<SourceConfig>, ConfigError> {
        parse_sources(&[v], Some(&key()))
    }

    #[test]
    fn webhook_defaults_and_redacted_debug() {
        let s = parse(json!({"name": "gh", "type": "webhook",
            "params": {"secret": "0123456789abcdef-secret"}}))
        .unwrap();
        let SourceKind::Webhook(w) = &s[0].kind else {
            panic!("a webhook")
        };
        assert_eq!(w.signature_header, "x-auditbridge-signature");
        assert_eq!(
            w.timestamp_header.as_deref(),
            Some("x-auditbridge-timestamp")
        );
        assert_eq!(w.signature_prefix, "v1=");
        assert_eq!(w.replay_window, Duration::from_secs(300));
        assert_eq!(w.mapping, Mapping::Identity);
        assert!(!format!("{s:?}").contains("0123456789abcdef-secret"));

        let s = parse(json!({"name": "hub", "type": "webhook", "params": {
            "secret": "0123456789abcdef", "signature_header": "X-Hub-Signature-256",
            "signature_prefix": "sha256=", "timestamp_header": ""}}))
        .unwrap();
        let SourceKind::Webhook(w) = &s[0].kind else {
            panic!("a webhook")
        };
        assert_eq!(w.signature_header, "x-hub-signature-256");
        assert_eq!(w.timestamp_header, None);
    }

    #[test]
    fn a_mapping_that_derives_ids_needs_the_id_key() {
        let mapped = json!({"name": "vendor", "type": "webhook", "params": {
            "secret": "0123456789abcdef", "mapping": {"id": "/id", "tenant": "/t", "type": "/k",
            "actions": {"x": "y"}, "actor": {"id": "/u"}}}});
        let e = parse_sources(std::slice::from_ref(&mapped), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("source vendor"), "{e}");
        assert!(e.contains("AUDITBRIDGE_ID_KEY"), "{e}");
        assert!(e.contains("openssl rand -hex 32"), "{e}");
        assert!(parse_sources(&[mapped], Some(&key())).is_ok());
        // Identity mappings keep the producer's ids: no key needed.
        let identity = json!({"name": "app", "type": "file", "params": {"path": "x"}});
        assert!(parse_sources(&[identity], None).is_ok());
    }

    #[test]
    fn webhook_body_and_concurrency_limits() {
        let s = parse(json!({"name": "gh", "type": "webhook",
            "params": {"secret": "0123456789abcdef-secret"}}))
        .unwrap();
        let SourceKind::Webhook(w) = &s[0].kind else {
            panic!("a webhook")
        };
        assert_eq!(w.max_body_bytes, 1024 * 1024);
        assert_eq!(w.body_timeout, Duration::from_secs(5));
        assert_eq!(w.max_concurrent_requests, 16);
        for (param, value) in [
            ("max_body_bytes", json!(10)),
            ("max_concurrent_requests", json!(0)),
            ("body_timeout", json!("soon")),
        ] {
            let mut v = json!({"name": "gh", "type": "webhook",
                "params": {"secret": "0123456789abcdef-secret"}});
            v["params"][param] = value;
            let e = parse(v).unwrap_err().to_string();
            assert!(e.contains(&format!("params.{param}")), "{e}");
        }
    }

    #[test]
    fn file_defaults() {
        let s = parse(json!({"name": "app", "type": "file",
            "params": {"path": "/var/log/app/audit.jsonl"}}))
        .unwrap();
        let SourceKind::File(f) = &s[0].kind else {
            panic!("a file")
        };
        assert_eq!(
            f.state_file,
            PathBuf::from("/var/log/app/.auditbridge-tail-app.state.json")
        );
        assert_eq!(
            f.rejected_file,
            PathBuf::from("/var/log/app/auditbridge-tail-app.rejected.jsonl")
        );
        assert!(!f.start_at_end);
        assert_eq!(f.poll_interval, Duration::from_millis(250));
    }

    #[test]
    fn errors_name_the_source_and_the_setting() {
        let cases = [
            (
                json!({"name": "a", "type": "webhook", "params": {"secret": "short"}}),
                "params.secret",
            ),
            (
                json!({"name": "a", "type": "webhook", "params": {"secret": "0123456789abcdef", "sekret": 1}}),
                "sekret",
            ),
            (json!({"name": "a", "type": "ftp"}), "type"),
            (
                json!({"name": "a", "type": "file", "params": {"path": "x", "tenants": ["Acme"]}}),
                "params.tenants",
            ),
            (
                json!({"name": "A b", "type": "file", "params": {"path": "x"}}),
                "name",
            ),
            (
                json!({"name": "a", "type": "file", "params": {"path": "x", "start": "middle"}}),
                "params.start",
            ),
            (
                json!({"name": "a", "type": "file", "params": {"path": "x", "poll_interval": "often"}}),
                "params.poll_interval",
            ),
            (
                json!({"name": "a", "type": "file", "params": {"path": "x", "mapping": 3}}),
                "params.mapping",
            ),
            (
                json!({"name": "a", "type": "file", "params": {"path": "x", "mapping": {
                "id": "/id", "tenant": "tenant", "type": "/t", "actions": {"x": "y"}, "actor": {"id": "/u"}}}}),
                "params.mapping.tenant",
            ),
            (
                json!({"name": "a", "type": "file", "params": {"path": "x", "mapping": {
                "id": "/id", "tenant": "/t", "type": "/t", "actions": {"x": "Not.Valid"}, "actor": {"id": "/u"}}}}),
                "params.mapping.actions.x",
            ),
            (
                json!({"name": "a", "type": "file", "params": {"path": "x", "mapping": {
                "id": "/id", "tenant": "/t", "type": "/t", "actions": {"x": "y"}, "actor": {"name": "/u"}}}}),
                "params.mapping.actor.id",
            ),
            (
                json!({"name": "a", "type": "file", "params": {"path": "x", "mapping": {
                "id": "/id", "tenant": "/t", "type": "/t", "actions": {"x": "y"}, "actor": {"id": "/u"},
                "outcomes": {"ok": "fine"}}}}),
                "params.mapping.outcomes.ok",
            ),
        ];
        for (v, setting) in cases {
            let e = parse(v.clone()).unwrap_err().to_string();
            assert!(e.starts_with("source "), "{v}: {e}");
            assert!(e.contains(setting), "{v}: expected {setting} in {e}");
        }
        let dup = json!({"name": "a", "type": "file", "params": {"path": "x"}});
        let e = parse_sources(&[dup.clone(), dup], Some(&key()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unique"), "{e}");
    }
}
