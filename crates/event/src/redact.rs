//! Redaction rules: values that must not reach a destination (a destination's `redact`
//! parameter) or the trail itself (`[[redact]]` / `AUDITBRIDGE_REDACT`, applied by the worker
//! before an event is stored).
//!
//! A rule selects values by a **path**, a JSON pointer (RFC 6901) whose segments may be `*`
//! for any key or index (`/metadata/*/password`), or by a **key** pattern, a regular
//! expression matched against every object key at any depth (`(?i)^(password|secret)$`); and
//! does one **action** to what it selects: `drop` (the member or element is removed), `mask`
//! (replaced by `"[REDACTED]"`), or `hmac` (replaced by `"hmac-sha256:<hex>"`, an HMAC-SHA256
//! of the value under the configured key, so that equal values can still be joined without
//! being readable; an unkeyed hash of an email or phone number is reversed by guessing, so
//! none is offered). An ingest rule may name one `tenant`.
//!
//! Redaction works on the JSON text, not on a parsed tree: only the objects and arrays that
//! change are written again, so every other value (a long decimal, a key order) stays exactly
//! as it came. The fields an event cannot be stored or routed without (`id`, `tenant`,
//! `action`, `outcome`, `occurred_at`, `source`, `actor`, and `actor.id` for `drop`) are never
//! touched: a path rule naming one is refused when it is read, a wildcard or key rule passes
//! them by. A value that already is a redaction's output is left as it is, so redacting twice
//! (a replayed dead letter) changes nothing.

use std::fmt;

use hmac::{Hmac, KeyInit, Mac};
use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;
use sha2::{Digest as _, Sha256};

/// What a masked value becomes.
pub const MASK: &str = "[REDACTED]";
/// The prefix of a value an `hmac` rule wrote (64 hex digits follow).
pub const HMAC_PREFIX: &str = "hmac-sha256:";
/// The longest key pattern, in characters.
const MAX_PATTERN_CHARS: usize = 1000;
/// The most segments of a path.
const MAX_PATH_SEGMENTS: usize = 64;
/// The deepest nesting redacted (an accepted event nests at most about 70 levels: `metadata`
/// allows 64). Deeper text is refused before it is walked: the walk recurses per level.
pub const MAX_DEPTH: usize = 128;

/// How deep `json` nests objects and arrays, counted outside strings, in one pass.
fn depth(json: &str) -> usize {
    let (mut depth, mut max, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for b in json.bytes() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                max = max.max(depth);
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

/// What a rule does to the values it selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Drop,
    Mask,
    Hmac,
}

impl Action {
    fn as_str(self) -> &'static str {
        match self {
            Action::Drop => "drop",
            Action::Mask => "mask",
            Action::Hmac => "hmac",
        }
    }
}

/// A rule as configuration writes it: `{path | key, action, tenant?}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    /// A JSON pointer, `*` for any key or index.
    #[serde(default)]
    pub path: Option<String>,
    /// A regular expression over key names, at any depth.
    #[serde(default)]
    pub key: Option<String>,
    pub action: Action,
    /// Only this tenant's events (ingest rules); every tenant's when absent.
    #[serde(default)]
    pub tenant: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Token(String),
    Any,
}

#[derive(Debug, Clone)]
enum Selector {
    Path(Vec<Segment>),
    Key(regex::Regex),
}

/// A rule, checked.
#[derive(Debug, Clone)]
pub struct Rule {
    selector: Selector,
    action: Action,
    tenant: Option<String>,
}

/// Why a rule cannot be used: the field (`path`, `key`, `action`, `tenant`) and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleError {
    pub field: &'static str,
    pub message: String,
}

impl fmt::Display for RuleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// The fields an event cannot go without, which no rule touches (`actor.id` may be masked or
/// keyed, never dropped).
fn protected(path: &[String], action: Action) -> bool {
    match path {
        [one] => matches!(
            one.as_str(),
            "id" | "tenant" | "action" | "outcome" | "occurred_at" | "source" | "actor"
        ),
        [a, b] => a == "actor" && b == "id" && action == Action::Drop,
        _ => false,
    }
}

impl Rule {
    /// Checks a rule as written.
    pub fn parse(spec: &RuleSpec) -> Result<Rule, RuleError> {
        let err = |field, message: String| RuleError { field, message };
        let selector = match (&spec.path, &spec.key) {
            (Some(_), Some(_)) => {
                return Err(err("path", "give a path or a key pattern, not both".into()));
            }
            (None, None) => {
                return Err(err(
                    "path",
                    "missing: give a path (a JSON pointer such as \"/metadata/password\", * for any key) or a key pattern".into(),
                ));
            }
            (Some(path), None) => {
                let segments = parse_pointer(path).map_err(|m| err("path", m))?;
                let literal: Option<Vec<String>> = segments
                    .iter()
                    .map(|s| match s {
                        Segment::Token(t) => Some(t.clone()),
                        Segment::Any => None,
                    })
                    .collect();
                if let Some(literal) = literal
                    && protected(&literal, spec.action)
                {
                    return Err(err(
                        "path",
                        format!(
                            "{path:?} is a field every event needs (id, tenant, action, outcome, occurred_at, source, actor; actor.id may be masked or keyed, not dropped)"
                        ),
                    ));
                }
                Selector::Path(segments)
            }
            (None, Some(key)) => {
                if key.chars().count() > MAX_PATTERN_CHARS {
                    return Err(err(
                        "key",
                        format!("longer than {MAX_PATTERN_CHARS} characters"),
                    ));
                }
                let re = regex::RegexBuilder::new(key)
                    .size_limit(1 << 20)
                    .build()
                    .map_err(|e| err("key", format!("not a valid regular expression: {e}")))?;
                Selector::Key(re)
            }
        };
        if let Some(t) = &spec.tenant {
            crate::validate_tenant(t).map_err(|e| err("tenant", e.detail))?;
        }
        Ok(Rule {
            selector,
            action: spec.action,
            tenant: spec.tenant.clone(),
        })
    }

    /// The rule in one canonical line (for the rule set's version).
    fn canonical(&self) -> String {
        let selector = match &self.selector {
            Selector::Path(segments) => {
                let mut p = String::from("path:");
                for s in segments {
                    p.push('/');
                    match s {
                        Segment::Any => p.push('*'),
                        Segment::Token(t) => p.push_str(&escape_token(t)),
                    }
                }
                p
            }
            Selector::Key(re) => format!("key:{}", re.as_str()),
        };
        format!(
            "{selector}\t{}\t{}",
            self.action.as_str(),
            self.tenant.as_deref().unwrap_or("*")
        )
    }

    fn applies_to(&self, tenant: Option<&str>) -> bool {
        match (&self.tenant, tenant) {
            (None, _) => true,
            (Some(t), Some(tenant)) => t == tenant,
            (Some(_), None) => false,
        }
    }

    /// Whether this rule selects the node at `path` (whose last token is a key when `is_key`).
    fn selects(&self, path: &[String], is_key: bool) -> bool {
        match &self.selector {
            Selector::Path(segments) => {
                segments.len() == path.len()
                    && segments.iter().zip(path).all(|(s, p)| match s {
                        Segment::Any => true,
                        Segment::Token(t) => t == p,
                    })
            }
            Selector::Key(re) => is_key && path.last().is_some_and(|k| re.is_match(k)),
        }
    }

    /// Whether this rule may select something below `path`.
    fn reaches_below(&self, path: &[String]) -> bool {
        match &self.selector {
            Selector::Path(segments) => {
                segments.len() > path.len()
                    && segments.iter().zip(path).all(|(s, p)| match s {
                        Segment::Any => true,
                        Segment::Token(t) => t == p,
                    })
            }
            Selector::Key(_) => true,
        }
    }
}

/// `"/a/b~1c/*"` → `[a, b/c, *]`. The empty pointer (the whole event) is refused.
fn parse_pointer(path: &str) -> Result<Vec<Segment>, String> {
    let Some(rest) = path.strip_prefix('/') else {
        return Err(format!(
            "{path:?} is not a JSON pointer: it must start with '/', such as \"/metadata/password\""
        ));
    };
    let mut segments = Vec::new();
    for raw in rest.split('/') {
        let segment = if raw == "*" {
            Segment::Any
        } else {
            let mut token = String::with_capacity(raw.len());
            let mut chars = raw.chars();
            while let Some(c) = chars.next() {
                if c == '~' {
                    match chars.next() {
                        Some('0') => token.push('~'),
                        Some('1') => token.push('/'),
                        _ => {
                            return Err(format!(
                                "{path:?}: '~' must be followed by 0 ('~') or 1 ('/')"
                            ));
                        }
                    }
                } else {
                    token.push(c);
                }
            }
            Segment::Token(token)
        };
        segments.push(segment);
    }
    if segments.len() > MAX_PATH_SEGMENTS {
        return Err(format!("more than {MAX_PATH_SEGMENTS} segments"));
    }
    Ok(segments)
}

fn escape_token(t: &str) -> String {
    t.replace('~', "~0").replace('/', "~1")
}

fn pointer(path: &[String]) -> String {
    path.iter()
        .map(|t| format!("/{}", escape_token(t)))
        .collect()
}

/// What redaction did to one event: the paths redacted (JSON pointers of the values, in the
/// order met) and, when the text changed, the new text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redacted {
    pub paths: Vec<String>,
    /// `None`: every selected value already was a redaction's output.
    pub json: Option<String>,
}

/// A set of rules and the key of their `hmac` actions. No `Debug` of the key.
#[derive(Clone, Default)]
pub struct Redactor {
    rules: Vec<Rule>,
    key: Option<Vec<u8>>,
    version: String,
}

impl fmt::Debug for Redactor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Redactor")
            .field("rules", &self.rules.len())
            .field("keyed", &self.key.is_some())
            .field("version", &self.version)
            .finish()
    }
}

/// Why a rule set cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedactorError {
    /// Rule `index` (from 0) is an `hmac` rule and no key is configured.
    NoKey { index: usize },
}

/// A redaction failed on text that is not the JSON a validated event is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotJson(pub String);

impl Redactor {
    /// A rule set. `key` is needed if any rule is an `hmac` rule.
    pub fn new(rules: Vec<Rule>, key: Option<&[u8]>) -> Result<Redactor, RedactorError> {
        if key.is_none()
            && let Some(index) = rules.iter().position(|r| r.action == Action::Hmac)
        {
            return Err(RedactorError::NoKey { index });
        }
        let mut text = String::from("auditbridge-redact-v1\n");
        for r in &rules {
            text.push_str(&r.canonical());
            text.push('\n');
        }
        if let Some(k) = key
            && rules.iter().any(|r| r.action == Action::Hmac)
        {
            // The key's fingerprint: a new key makes other values, so another version.
            text.push_str(&format!("key:{}\n", hex::encode(Sha256::digest(k))));
        }
        let version = if rules.is_empty() {
            String::new()
        } else {
            hex::encode(&Sha256::digest(text.as_bytes())[..8])
        };
        Ok(Redactor {
            rules,
            key: key.map(<[u8]>::to_vec),
            version,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// The rule set's version: the first 16 hex digits of a SHA-256 over the rules (and the
    /// key's fingerprint when there is an `hmac` rule). Empty without rules.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Whether any rule may apply to `tenant`'s events.
    pub fn applies_to(&self, tenant: &str) -> bool {
        self.rules.iter().any(|r| r.applies_to(Some(tenant)))
    }

    /// Redacts the JSON text `json` of an event of `tenant` (unknown: only rules for every
    /// tenant). `None` when no rule selected anything.
    pub fn redact(&self, json: &str, tenant: Option<&str>) -> Result<Option<Redacted>, NotJson> {
        let rules: Vec<&Rule> = self.rules.iter().filter(|r| r.applies_to(tenant)).collect();
        if rules.is_empty() {
            return Ok(None);
        }
        let deep = depth(json);
        if deep > MAX_DEPTH {
            return Err(NotJson(format!(
                "nested {deep} levels deep, more than the {MAX_DEPTH} redaction reads"
            )));
        }
        let raw: &RawValue = serde_json::from_str(json).map_err(|e| NotJson(e.to_string()))?;
        let mut paths = Vec::new();
        let mut path = Vec::new();
        let changed = self.walk(raw, &mut path, &rules, &mut paths)?;
        if paths.is_empty() {
            return Ok(None);
        }
        Ok(Some(Redacted {
            paths,
            json: changed,
        }))
    }

    /// Redacts below `raw` (at `path`); the new text if anything changed.
    fn walk(
        &self,
        raw: &RawValue,
        path: &mut Vec<String>,
        rules: &[&Rule],
        paths: &mut Vec<String>,
    ) -> Result<Option<String>, NotJson> {
        let text = raw.get();
        let bad = |e: serde_json::Error| NotJson(e.to_string());
        match text.trim_start().as_bytes().first() {
            Some(b'{') => {
                let Members(members) = serde_json::from_str(text).map_err(bad)?;
                let mut out: Vec<(String, String)> = Vec::with_capacity(members.len());
                let mut changed = false;
                for (key, value) in members {
                    path.push(key);
                    let fate = self.node(&value, path, true, rules, paths)?;
                    let key = path.pop().unwrap_or_default();
                    match fate {
                        Fate::Keep => out.push((key, value.get().to_owned())),
                        Fate::Drop => changed = true,
                        Fate::Replace(new) => {
                            changed = true;
                            out.push((key, new));
                        }
                    }
                }
                if !changed {
                    return Ok(None);
                }
                let mut s = String::with_capacity(text.len());
                s.push('{');
                for (i, (k, v)) in out.iter().enumerate() {
                    if i > 0 {
                        s.push(',');
                    }
                    s.push_str(&serde_json::to_string(k).map_err(bad)?);
                    s.push(':');
                    s.push_str(v);
                }
                s.push('}');
                Ok(Some(s))
            }
            Some(b'[') => {
                let items: Vec<Box<RawValue>> = serde_json::from_str(text).map_err(bad)?;
                let mut out: Vec<String> = Vec::with_capacity(items.len());
                let mut changed = false;
                for (i, value) in items.into_iter().enumerate() {
                    path.push(i.to_string());
                    let fate = self.node(&value, path, false, rules, paths)?;
                    path.pop();
                    match fate {
                        Fate::Keep => out.push(value.get().to_owned()),
                        Fate::Drop => changed = true,
                        Fate::Replace(new) => {
                            changed = true;
                            out.push(new);
                        }
                    }
                }
                if !changed {
                    return Ok(None);
                }
                Ok(Some(format!("[{}]", out.join(","))))
            }
            _ => Ok(None),
        }
    }

    /// What becomes of the value at `path`.
    fn node(
        &self,
        value: &RawValue,
        path: &mut Vec<String>,
        is_key: bool,
        rules: &[&Rule],
        paths: &mut Vec<String>,
    ) -> Result<Fate, NotJson> {
        let selected = rules
            .iter()
            .find(|r| r.selects(path, is_key) && !protected(path, r.action));
        if let Some(rule) = selected {
            paths.push(pointer(path));
            if already_redacted(value) {
                return Ok(Fate::Keep);
            }
            return Ok(match rule.action {
                Action::Drop => Fate::Drop,
                Action::Mask => Fate::Replace(format!("\"{MASK}\"")),
                Action::Hmac => Fate::Replace(format!("\"{HMAC_PREFIX}{}\"", self.mac(value))),
            });
        }
        if rules.iter().any(|r| r.reaches_below(path)) {
            return Ok(match self.walk(value, path, rules, paths)? {
                Some(new) => Fate::Replace(new),
                None => Fate::Keep,
            });
        }
        Ok(Fate::Keep)
    }

    /// The HMAC-SHA256 of a value, in hex: of a string's characters, else of its JSON text.
    fn mac(&self, value: &RawValue) -> String {
        let key = self.key.as_deref().unwrap_or_default();
        let mut mac =
            <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC takes a key of any size");
        match serde_json::from_str::<String>(value.get()) {
            Ok(s) => mac.update(s.as_bytes()),
            Err(_) => mac.update(value.get().trim().as_bytes()),
        }
        hex::encode(mac.finalize().into_bytes())
    }
}

enum Fate {
    Keep,
    Drop,
    Replace(String),
}

/// A value a redaction wrote: `"[REDACTED]"` or `"hmac-sha256:<64 hex>"`.
fn already_redacted(value: &RawValue) -> bool {
    let Ok(s) = serde_json::from_str::<&str>(value.get()) else {
        return false;
    };
    s == MASK
        || s.strip_prefix(HMAC_PREFIX)
            .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// An object's members in order, each value as its raw text.
struct Members(Vec<(String, Box<RawValue>)>);

impl<'de> Deserialize<'de> for Members {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Members, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Members;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Members, A::Error> {
                let mut out = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some((k, v)) = map.next_entry::<String, Box<RawValue>>()? {
                    out.push((k, v));
                }
                Ok(Members(out))
            }
        }
        d.deserialize_map(V)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    fn rule(v: Value) -> Rule {
        Rule::parse(&serde_json::from_value(v).unwrap()).unwrap()
    }

    fn redactor(rules: Vec<Value>) -> Redactor {
        Redactor::new(
            rules.into_iter().map(rule).collect(),
            Some(b"k".repeat(32).as_slice()),
        )
        .unwrap()
    }

    fn event() -> Value {
        json!({
            "id": "0190b6c2-0000-7000-8000-000000000001", "tenant": "acme",
            "occurred_at": "2026-12-01T00:00:00Z", "action": "user.login", "outcome": "success",
            "actor": {"id": "u-1", "ip": "198.51.100.7", "name": "Ann"},
            "source": "sso",
            "metadata": {
                "password": "hunter2",
                "nested": {"Password": "x", "keep": 1.000000000000000000001, "token": 7},
                "list": [{"card": "4111", "n": 1}, {"card": "5500", "n": 2}],
                "tags": ["a", "b", "c"]
            }
        })
    }

    fn apply(r: &Redactor, v: &Value) -> (Value, Vec<String>, String) {
        let text = v.to_string();
        let out = r
            .redact(&text, Some("acme"))
            .unwrap()
            .expect("something redacted");
        let json = out.json.clone().unwrap_or(text);
        (serde_json::from_str(&json).unwrap(), out.paths, json)
    }

    #[test]
    fn every_action_on_paths_with_wildcards_in_objects_and_arrays() {
        let r = redactor(vec![
            json!({"path": "/metadata/password", "action": "drop"}),
            json!({"path": "/metadata/list/*/card", "action": "mask"}),
            json!({"path": "/actor/ip", "action": "hmac"}),
            json!({"path": "/metadata/tags/1", "action": "drop"}),
        ]);
        let (v, paths, _) = apply(&r, &event());
        assert!(v["metadata"].get("password").is_none());
        assert_eq!(v["metadata"]["list"][0]["card"], MASK);
        assert_eq!(v["metadata"]["list"][1]["card"], MASK);
        assert_eq!(v["metadata"]["list"][1]["n"], 2);
        assert_eq!(v["metadata"]["tags"], json!(["a", "c"]));
        let ip = v["actor"]["ip"].as_str().unwrap();
        assert!(
            ip.starts_with(HMAC_PREFIX) && ip.len() == HMAC_PREFIX.len() + 64,
            "{ip}"
        );
        assert_eq!(
            paths,
            [
                "/actor/ip",
                "/metadata/list/0/card",
                "/metadata/list/1/card",
                "/metadata/password",
                "/metadata/tags/1"
            ]
        );
    }

    #[test]
    fn key_patterns_match_at_any_depth_and_leave_other_values_exactly() {
        let r = redactor(vec![
            json!({"key": "(?i)^(password|token)$", "action": "mask"}),
        ]);
        let (v, paths, _) = apply(&r, &event());
        assert_eq!(v["metadata"]["password"], MASK);
        assert_eq!(v["metadata"]["nested"]["Password"], MASK);
        assert_eq!(v["metadata"]["nested"]["token"], MASK);
        assert_eq!(paths.len(), 3);
        // A long decimal is kept as written, not rounded through a float.
        let written = event()
            .to_string()
            .replace("\"keep\":1.0", "\"keep\":1.000000000000000000001");
        let out = r.redact(&written, None).unwrap().unwrap().json.unwrap();
        assert!(out.contains("\"keep\":1.000000000000000000001"), "{out}");
    }

    #[test]
    fn hmac_is_keyed_stable_and_joinable() {
        let a = redactor(vec![json!({"path": "/actor/id", "action": "hmac"})]);
        let b = redactor(vec![json!({"path": "/actor/id", "action": "hmac"})]);
        let (va, _, _) = apply(&a, &event());
        let (vb, _, _) = apply(&b, &event());
        assert_eq!(va["actor"]["id"], vb["actor"]["id"]);
        let other = Redactor::new(
            vec![rule(json!({"path": "/actor/id", "action": "hmac"}))],
            Some(b"another key, also long enough.....".as_slice()),
        )
        .unwrap();
        let (vo, _, _) = apply(&other, &event());
        assert_ne!(va["actor"]["id"], vo["actor"]["id"]);
        assert_ne!(a.version(), other.version());
        // Known answer: HMAC-SHA256(key, "u-1").
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&b"k".repeat(32)).unwrap();
        mac.update(b"u-1");
        let want = format!("{HMAC_PREFIX}{}", hex::encode(mac.finalize().into_bytes()));
        assert_eq!(va["actor"]["id"], want.as_str());
    }

    #[test]
    fn redacting_twice_changes_nothing_more() {
        let r = redactor(vec![
            json!({"path": "/actor/ip", "action": "hmac"}),
            json!({"key": "password", "action": "mask"}),
        ]);
        let (once, paths, text) = apply(&r, &event());
        let again = r.redact(&text, Some("acme")).unwrap().unwrap();
        assert_eq!(again.json, None, "a redacted value was redacted again");
        assert_eq!(again.paths, paths);
        assert_eq!(
            once["actor"]["ip"].as_str().unwrap().len(),
            HMAC_PREFIX.len() + 64
        );
    }

    #[test]
    fn required_fields_are_never_touched() {
        for path in [
            "/id",
            "/tenant",
            "/action",
            "/outcome",
            "/occurred_at",
            "/source",
            "/actor",
        ] {
            let spec: RuleSpec =
                serde_json::from_value(json!({"path": path, "action": "mask"})).unwrap();
            let e = Rule::parse(&spec).unwrap_err();
            assert_eq!(e.field, "path", "{path}");
        }
        let spec: RuleSpec =
            serde_json::from_value(json!({"path": "/actor/id", "action": "drop"})).unwrap();
        assert!(Rule::parse(&spec).is_err());
        // A wildcard or key rule passes them by.
        let r = redactor(vec![
            json!({"path": "/*", "action": "drop"}),
            json!({"key": ".*", "action": "drop"}),
        ]);
        let (v, _, _) = apply(&r, &event());
        for field in ["id", "tenant", "action", "outcome", "occurred_at", "source"] {
            assert_eq!(v[field], event()[field], "{field}");
        }
        assert_eq!(v["actor"]["id"], "u-1");
        assert!(v.get("metadata").is_none());
        assert!(v["actor"].get("ip").is_none());
    }

    #[test]
    fn rules_that_cannot_be_used_are_refused_naming_the_field() {
        let cases = [
            (json!({"path": "metadata/x", "action": "drop"}), "path"),
            (json!({"path": "/a~2b", "action": "drop"}), "path"),
            (json!({"key": "(unclosed", "action": "drop"}), "key"),
            (json!({"path": "/a", "key": "b", "action": "drop"}), "path"),
            (json!({"action": "drop"}), "path"),
            (
                json!({"path": "/a", "action": "drop", "tenant": "Not A Tenant"}),
                "tenant",
            ),
        ];
        for (v, field) in cases {
            let spec: RuleSpec = serde_json::from_value(v.clone()).unwrap();
            let e = Rule::parse(&spec).unwrap_err();
            assert_eq!(e.field, field, "{v}: {e}");
        }
        assert!(
            serde_json::from_value::<RuleSpec>(json!({"path": "/a", "action": "shred"})).is_err()
        );
        let hmac = rule(json!({"path": "/a", "action": "hmac"}));
        assert_eq!(
            Redactor::new(
                vec![rule(json!({"path": "/b", "action": "drop"})), hmac],
                None
            )
            .unwrap_err(),
            RedactorError::NoKey { index: 1 }
        );
    }

    #[test]
    fn tenant_rules_apply_to_their_tenant_only() {
        let r = redactor(vec![
            json!({"path": "/metadata", "action": "drop", "tenant": "other"}),
        ]);
        assert!(
            r.redact(&event().to_string(), Some("acme"))
                .unwrap()
                .is_none()
        );
        assert!(
            r.redact(&event().to_string(), Some("other"))
                .unwrap()
                .is_some()
        );
        assert!(r.redact(&event().to_string(), None).unwrap().is_none());
        assert!(!r.applies_to("acme"));
    }

    #[test]
    fn text_nested_too_deep_is_refused_not_walked() {
        let r = redactor(vec![json!({"key": "password", "action": "drop"})]);
        let deep = format!("{{\"metadata\":{}1{}}}", "[".repeat(5000), "]".repeat(5000));
        assert!(r.redact(&deep, None).is_err());
        let strings = format!("{{\"metadata\":\"{}\"}}", "[\\\"".repeat(5000));
        assert!(
            r.redact(&strings, None).unwrap().is_none(),
            "brackets in strings count not"
        );
    }

    #[test]
    fn a_key_with_escapes_is_named_by_its_pointer() {
        let r = redactor(vec![json!({"path": "/metadata/a~1b", "action": "mask"})]);
        let mut e = event();
        e["metadata"]["a/b"] = json!("secret");
        let (v, paths, _) = apply(&r, &e);
        assert_eq!(v["metadata"]["a/b"], MASK);
        assert_eq!(paths, ["/metadata/a~1b"]);
    }
}
