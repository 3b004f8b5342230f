//! Ingest source definitions (`[[sources]]`, `AUDITBRIDGE_SOURCES`): `{"name", "type",
//! "params"}` for signed webhooks, followed files and polled APIs (`api_source.rs`), read
//! into typed settings and checked here, at load, including their field mappings. Secrets are
//! [`SecretString`]s: `Debug` never shows them.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use auditbridge_event::Outcome;
use secrecy::{ExposeSecret as _, SecretString};
use serde::{Deserialize, Deserializer};
use serde_json::Value;

use crate::de::{self, positive_duration};
use crate::lists::{
    Refusal, check_name, check_range, check_tenants, refuse, typed, typed_definition,
};

/// A validated source.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    pub name: String,
    pub kind: SourceKind,
}

/// A source's type and its parameters: `{"type": "webhook", "params": {..}}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(
    tag = "type",
    content = "params",
    rename_all = "lowercase",
    deny_unknown_fields
)]
pub enum SourceKind {
    Webhook(WebhookParams),
    File(FileParams),
    Api(Box<crate::api_source::ApiParams>),
}

impl SourceKind {
    pub fn type_name(&self) -> &'static str {
        match self {
            SourceKind::Webhook(_) => "webhook",
            SourceKind::File(_) => "file",
            SourceKind::Api(_) => "api",
        }
    }
}

/// A signed webhook: `POST /v1/webhooks/<name>`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookParams {
    /// The HMAC-SHA256 key shared with the sender.
    #[serde(deserialize_with = "de::secret")]
    pub secret: SecretString,
    /// Header carrying the signature (lowercase).
    #[serde(default = "WebhookParams::default_signature_header")]
    pub signature_header: String,
    /// Text before the hex digest in that header (`v1=`, `sha256=`, or empty).
    #[serde(default = "WebhookParams::default_signature_prefix")]
    pub signature_prefix: String,
    /// Header carrying the Unix-seconds timestamp that is signed with the body
    /// (`<timestamp>.<body>`). `None` (written as `""`): the body alone is signed and there is
    /// no replay window.
    #[serde(
        default = "WebhookParams::default_timestamp_header",
        deserialize_with = "empty_is_none"
    )]
    pub timestamp_header: Option<String>,
    /// A timestamp further than this from the server's clock is refused.
    #[serde(
        default = "WebhookParams::default_replay_window",
        deserialize_with = "positive_duration::deserialize"
    )]
    pub replay_window: Duration,
    /// Set from `mapping_json` when the definition is read.
    #[serde(skip)]
    pub mapping: MappingConfig,
    #[serde(default, rename = "mapping")]
    mapping_json: Option<Value>,
    /// The tenants this source may write (empty: any). A sender that can sign can otherwise
    /// name any tenant in its payload.
    #[serde(default)]
    pub tenants: Vec<String>,
    /// Largest request body of this source (413 above it, by `Content-Length` before
    /// reading).
    #[serde(default = "WebhookParams::default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// Longest the body may take to arrive once the headers passed their checks.
    #[serde(
        default = "WebhookParams::default_body_timeout",
        deserialize_with = "positive_duration::deserialize"
    )]
    pub body_timeout: Duration,
    /// Most requests of this source read and published at once; more are answered 503 with
    /// `Retry-After`.
    #[serde(default = "WebhookParams::default_max_concurrent_requests")]
    pub max_concurrent_requests: usize,
}

impl WebhookParams {
    fn default_signature_header() -> String {
        "x-auditbridge-signature".into()
    }

    fn default_signature_prefix() -> String {
        "v1=".into()
    }

    fn default_timestamp_header() -> Option<String> {
        Some("x-auditbridge-timestamp".into())
    }

    fn default_replay_window() -> Duration {
        Duration::from_secs(300)
    }

    fn default_max_body_bytes() -> usize {
        1024 * 1024
    }

    fn default_body_timeout() -> Duration {
        Duration::from_secs(5)
    }

    fn default_max_concurrent_requests() -> usize {
        16
    }

    fn check(&mut self) -> Result<(), Refusal> {
        if self.secret.expose_secret().len() < 16 {
            return Err(refuse("params.secret", "expected at least 16 characters"));
        }
        self.signature_header = header_name("params.signature_header", &self.signature_header)?;
        if self.signature_header.is_empty() {
            return Err(refuse("params.signature_header", "must not be empty"));
        }
        if let Some(h) = &self.timestamp_header {
            self.timestamp_header = Some(header_name("params.timestamp_header", h)?);
        }
        check_tenants("params.tenants", &self.tenants)?;
        check_range(
            "params.max_body_bytes",
            self.max_body_bytes,
            1024..=64 * 1024 * 1024,
        )?;
        check_range(
            "params.max_concurrent_requests",
            self.max_concurrent_requests,
            1..=4096,
        )?;
        Ok(())
    }
}

/// A header name, lowercased; letters, digits and '-' only.
fn header_name(setting: &str, name: &str) -> Result<String, Refusal> {
    let h = name.to_ascii_lowercase();
    if !h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return Err(refuse(setting, format!("{h:?} is not a header name")));
    }
    Ok(h)
}

fn empty_is_none<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let text = String::deserialize(d)?;
    Ok((!text.is_empty()).then_some(text))
}

/// A followed JSONL file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileParams {
    pub path: PathBuf,
    /// Where the state and rejected files go; default: the followed file's directory.
    #[serde(default)]
    state_dir: Option<PathBuf>,
    /// The position (inode and byte offset), replaced atomically after each acknowledged
    /// chunk. Set from the source's name when the definition is read.
    #[serde(skip)]
    pub state_file: PathBuf,
    /// Lines that could not be mapped, one JSON object each, with the reason.
    #[serde(skip)]
    pub rejected_file: PathBuf,
    #[serde(
        default = "FileParams::default_poll_interval",
        deserialize_with = "positive_duration::deserialize"
    )]
    pub poll_interval: Duration,
    /// Longer lines are rejected (and skipped up to their newline).
    #[serde(default = "FileParams::default_max_line_bytes")]
    pub max_line_bytes: usize,
    /// Where to start with no state file yet: `beginning` (the default) or `end`.
    #[serde(default)]
    start: FileStart,
    /// With no state file yet: start at the end of the file instead of the beginning.
    #[serde(skip)]
    pub start_at_end: bool,
    /// Set from `mapping_json` when the definition is read.
    #[serde(skip)]
    pub mapping: MappingConfig,
    #[serde(default, rename = "mapping")]
    mapping_json: Option<Value>,
    /// The tenants this source may write (empty: any).
    #[serde(default)]
    pub tenants: Vec<String>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
enum FileStart {
    #[default]
    Beginning,
    End,
}

impl FileParams {
    fn default_poll_interval() -> Duration {
        Duration::from_millis(250)
    }

    fn default_max_line_bytes() -> usize {
        1024 * 1024
    }

    fn check(&mut self, name: &str) -> Result<(), Refusal> {
        if self.path.as_os_str().is_empty() {
            return Err(refuse("params.path", "must not be empty"));
        }
        let dir = self.state_dir.clone().unwrap_or_else(|| {
            self.path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .map_or_else(|| PathBuf::from("."), PathBuf::from)
        });
        self.state_file = dir.join(format!(".auditbridge-tail-{name}.state.json"));
        self.rejected_file = dir.join(format!("auditbridge-tail-{name}.rejected.jsonl"));
        self.start_at_end = matches!(self.start, FileStart::End);
        check_range(
            "params.max_line_bytes",
            self.max_line_bytes,
            16..=64 * 1024 * 1024,
        )?;
        check_tenants("params.tenants", &self.tenants)
    }
}

/// How a source's payloads become v1 events.
#[derive(Debug, Clone, Default)]
pub enum MappingConfig {
    /// The payload is already a v1 event (`"identity"`, or no mapping).
    #[default]
    Identity,
    /// Field by field from a foreign object.
    Fields(Box<FieldMapping>),
}

/// Where one string field comes from: a JSON pointer (`"/user/id"`) or `{"const": "text"}`.
#[derive(Debug, Clone, PartialEq)]
pub enum Field {
    /// A JSON pointer (RFC 6901) into the payload; numbers and booleans are taken as text.
    Pointer(String),
    /// A fixed value.
    Const(String),
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Field::Const(c) => write!(f, "the constant {c:?}"),
            Field::Pointer(p) => f.write_str(p),
        }
    }
}

impl<'de> Deserialize<'de> for Field {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Field, D::Error> {
        match Value::deserialize(d)? {
            Value::String(p) => pointer(&p).map(|()| Field::Pointer(p)),
            Value::Object(o) if o.len() == 1 && o.get("const").is_some_and(Value::is_string) => {
                Ok(Field::Const(
                    o["const"].as_str().unwrap_or_default().to_owned(),
                ))
            }
            other => Err(format!(
                "expected a JSON pointer such as \"/user/id\" or {{\"const\": \"text\"}}, got {other}"
            )),
        }
        .map_err(serde::de::Error::custom)
    }
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

/// A JSON pointer given as text (the event type's parts, `occurred_at`, metadata values).
#[derive(Debug, Clone, PartialEq)]
pub struct Pointer(pub String);

impl<'de> Deserialize<'de> for Pointer {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Pointer, D::Error> {
        let p = String::deserialize(d)?;
        pointer(&p).map_err(serde::de::Error::custom)?;
        Ok(Pointer(p))
    }
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActorMapping {
    #[serde(default)]
    pub id: Option<Field>,
    #[serde(default, rename = "type")]
    pub kind: Option<Field>,
    #[serde(default)]
    pub name: Option<Field>,
    #[serde(default)]
    pub ip: Option<Field>,
    #[serde(default)]
    pub user_agent: Option<Field>,
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetMapping {
    #[serde(default)]
    pub id: Option<Field>,
    #[serde(default, rename = "type")]
    pub kind: Option<Field>,
    #[serde(default)]
    pub name: Option<Field>,
}

/// A field-by-field mapping.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldMapping {
    /// `AUDITBRIDGE_ID_KEY`, the key of the ids derived for this source's events; set when
    /// the definition is read (a mapping is refused without it).
    #[serde(skip, default = "unset_key")]
    pub id_key: SecretString,
    /// The source's own event id: the dedup key.
    pub id: Field,
    pub tenant: Field,
    /// The foreign event type: the values at these pointers joined with `.`
    /// (e.g. `["/event", "/action"]` gives `issues.opened`).
    #[serde(rename = "type", deserialize_with = "one_or_more")]
    pub event_type: Vec<Pointer>,
    /// Foreign type → v1 action. Its keys are the allow-list.
    pub actions: BTreeMap<String, String>,
    /// RFC 3339 text or Unix seconds. Absent: the time the payload was received.
    #[serde(default)]
    pub occurred_at: Option<Pointer>,
    /// Absent: `unknown`.
    #[serde(default)]
    pub outcome: Option<Field>,
    /// Foreign outcome value → v1 outcome; values that are already v1 outcomes pass.
    #[serde(default, deserialize_with = "outcomes")]
    pub outcomes: BTreeMap<String, Outcome>,
    pub actor: ActorMapping,
    #[serde(default)]
    pub target: Option<TargetMapping>,
    /// Absent: the source's name.
    #[serde(default)]
    pub source: Option<Field>,
    #[serde(default)]
    pub reason: Option<Field>,
    #[serde(default)]
    pub request_id: Option<Field>,
    /// Metadata key → JSON pointer; the value is copied as JSON. `source_event_id` is always
    /// added.
    #[serde(default)]
    pub metadata: BTreeMap<String, Pointer>,
}

fn unset_key() -> SecretString {
    SecretString::from(String::new())
}

fn one_or_more<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Pointer>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMore {
        One(Pointer),
        More(Vec<Pointer>),
    }
    let fail = || {
        serde::de::Error::custom(
            "expected a JSON pointer or a non-empty list of them (joined with '.')",
        )
    };
    match OneOrMore::deserialize(d).map_err(|_| fail())? {
        OneOrMore::One(p) => Ok(vec![p]),
        OneOrMore::More(list) if !list.is_empty() => Ok(list),
        OneOrMore::More(_) => Err(fail()),
    }
}

fn outcomes<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, Outcome>, D::Error> {
    struct V1(Outcome);
    impl<'de> Deserialize<'de> for V1 {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<V1, D::Error> {
            let text = String::deserialize(d)?;
            text.parse().map(V1).map_err(|_| {
                serde::de::Error::custom(format!(
                    "expected success, failure, denied or unknown, got {text:?}"
                ))
            })
        }
    }
    let map = BTreeMap::<String, V1>::deserialize(d)?;
    Ok(map.into_iter().map(|(k, v)| (k, v.0)).collect())
}

/// Reads a source's `mapping` parameter: absent or `"identity"`, or a mapping object (kept
/// as JSON until now, so that a refusal in it names its path under `params.mapping`).
fn read_mapping(
    raw: Option<Value>,
    id_key: Option<&SecretString>,
) -> Result<MappingConfig, Refusal> {
    let value = match raw {
        None => return Ok(MappingConfig::Identity),
        Some(Value::String(s)) if s == "identity" => return Ok(MappingConfig::Identity),
        Some(v @ Value::Object(_)) => v,
        Some(other) => {
            return Err(refuse(
                "params.mapping",
                format!("expected \"identity\" or an object, got {other}"),
            ));
        }
    };
    let Some(key) = id_key else {
        return Err(refuse(
            "AUDITBRIDGE_ID_KEY",
            "is not set, and this source's mapping derives event ids, which are keyed with it \
             (so that other tenants cannot compute them); make one with `openssl rand -hex 32` \
             and give the same value to every serve, tail-file and poll",
        ));
    };
    let mut read: FieldMapping =
        typed(&value).map_err(|(path, message)| (format!("params.mapping.{path}"), message))?;
    if read.actions.is_empty() {
        return Err(refuse(
            "params.mapping.actions",
            "expected at least one foreign type mapped to a v1 action",
        ));
    }
    for (from, to) in &read.actions {
        auditbridge_event::validate_action(to)
            .map_err(|e| refuse(format!("params.mapping.actions.{from}"), e.detail))?;
    }
    if read.actor.id.is_none() {
        return Err(refuse("params.mapping.actor.id", "is required"));
    }
    read.id_key = key.clone();
    Ok(MappingConfig::Fields(Box::new(read)))
}

/// Reads and checks one definition; `id_key` is `AUDITBRIDGE_ID_KEY`, without which a source
/// whose mapping derives ids is refused.
pub(crate) fn read(value: &Value, id_key: Option<&SecretString>) -> Result<SourceConfig, Refusal> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Definition {
        name: String,
        kind: SourceKind,
    }
    let Definition { name, mut kind } = typed_definition(value, &[])?;
    check_name(&name)?;
    match &mut kind {
        SourceKind::Webhook(w) => {
            w.check()?;
            w.mapping = read_mapping(w.mapping_json.take(), id_key)?;
        }
        SourceKind::File(f) => {
            f.check(&name)?;
            f.mapping = read_mapping(f.mapping_json.take(), id_key)?;
        }
        SourceKind::Api(a) => {
            a.check()?;
            // A remote event's id is the API's, not ours: the event's is derived from it.
            let Some(raw) = a.mapping_json.take() else {
                return Err(refuse(
                    "params.mapping",
                    "an api source needs a mapping (its events' ids are derived from each remote event's own id)",
                ));
            };
            a.mapping = read_mapping(Some(raw), id_key)?;
            if matches!(a.mapping, MappingConfig::Identity) {
                return Err(refuse(
                    "params.mapping",
                    "an api source needs a field mapping, not \"identity\" (its events' ids are derived from each remote event's own id)",
                ));
            }
        }
    }
    Ok(SourceConfig { name, kind })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::{Config, ConfigError};

    const KEY: &str = "test-id-key-0123456789abcdef0123456789";

    /// Definitions, loaded as `AUDITBRIDGE_SOURCES` (with `AUDITBRIDGE_ID_KEY` when `key`).
    fn parse_sources(list: &[Value], key: Option<&str>) -> Result<Vec<SourceConfig>, ConfigError> {
        let mut vars = vec![(
            "AUDITBRIDGE_SOURCES".to_owned(),
            Value::from(list.to_vec()).to_string(),
        )];
        if let Some(key) = key {
            vars.push(("AUDITBRIDGE_ID_KEY".to_owned(), key.to_owned()));
        }
        Config::from_env(vars).map(|c| c.sources)
    }

    fn parse(v: Value) -> Result<Vec<SourceConfig>, ConfigError> {
        parse_sources(&[v], Some(KEY))
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
        assert!(matches!(w.mapping, MappingConfig::Identity));
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
        assert!(parse_sources(&[mapped], Some(KEY)).is_ok());
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
        let e = parse_sources(&[dup.clone(), dup], Some(KEY))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unique"), "{e}");
    }
}
