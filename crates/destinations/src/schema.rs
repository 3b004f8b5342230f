//! The schemas events are sent in (`params.schema`): `native` (the event as stored), `cadf`
//! (DMTF CADF 1.0, as pycadf writes it), `ocsf` (OCSF [`OCSF_VERSION`]: Authentication 3002,
//! Account Change 3001, API Activity 6003), `ecs` (Elastic Common Schema [`ECS_VERSION`]) and
//! `splunk_hec` (the HTTP Event Collector's envelope around the native event). Every schema
//! but `native` keeps the event as it was sent (CADF in an attachment, OCSF in `unmapped`,
//! ECS in `event.original`, HEC as `event`), so nothing of it is lost in a mapping. The
//! mapping of each field is the README's table ("Formats").

use std::net::IpAddr;

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::StoredEvent;
use crate::config::DestinationConfig;
pub use auditbridge_config::destinations::{ECS_VERSION, OCSF_VERSION, OcsfMapping, Schema};

/// How a destination's events are written, from its parameters.
#[derive(Debug, Clone)]
pub struct Shape {
    schema: Schema,
    ocsf_map: Vec<OcsfMapping>,
    hec_index: Option<String>,
    hec_sourcetype: String,
}

/// The fields of a stored event that the mappings read.
#[derive(Deserialize)]
struct In {
    id: String,
    tenant: String,
    occurred_at: String,
    action: String,
    outcome: String,
    actor: Actor,
    #[serde(default)]
    target: Option<Target>,
    source: String,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    request_id: Option<String>,
}

#[derive(Deserialize)]
struct Actor {
    id: String,
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    ip: Option<String>,
    #[serde(default)]
    user_agent: Option<String>,
}

#[derive(Deserialize)]
struct Target {
    #[serde(default)]
    id: Option<String>,
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    name: Option<String>,
}

/// The verb of an action: its last token (`user.password_reset` → `password_reset`).
fn verb(action: &str) -> &str {
    action.rsplit('.').next().unwrap_or(action)
}

/// The verb's words (`password_reset` → `password`, `reset`).
fn words(action: &str) -> Vec<&str> {
    verb(action).split(['_', '-']).collect()
}

fn has(action: &str, list: &[&str]) -> bool {
    let v = verb(action);
    list.contains(&v) || words(action).iter().any(|w| list.contains(w))
}

const CREATE: &[&str] = &[
    "create",
    "created",
    "add",
    "added",
    "new",
    "register",
    "signup",
    "invite",
    "provision",
];
const READ: &[&str] = &[
    "read", "get", "view", "viewed", "download", "export", "search", "show", "access", "accessed",
];
const LIST: &[&str] = &["list", "listed"];
const UPDATE: &[&str] = &[
    "update", "updated", "edit", "modify", "change", "changed", "set", "rename", "patch", "move",
];
const DELETE: &[&str] = &[
    "delete", "deleted", "remove", "removed", "destroy", "purge", "revoke", "revoked",
];
const LOGIN: &[&str] = &[
    "login",
    "logon",
    "signin",
    "sign_in",
    "authenticate",
    "authenticated",
];
const LOGOUT: &[&str] = &["logout", "logoff", "signout", "sign_out"];
const ENABLE: &[&str] = &["enable", "enabled", "activate", "unsuspend"];
const DISABLE: &[&str] = &["disable", "disabled", "deactivate", "suspend", "suspended"];
const LOCK: &[&str] = &["lock", "locked"];
const UNLOCK: &[&str] = &["unlock", "unlocked"];
const ALLOW: &[&str] = &[
    "allow", "grant", "granted", "approve", "approved", "assign", "assigned",
];
const DENY: &[&str] = &[
    "deny", "denied", "reject", "rejected", "block", "blocked", "unassign",
];

/// `*` in a pattern matches any characters (also none, also dots).
fn matches(pattern: &str, action: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == action;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !action.starts_with(first)
        || action.len() < first.len() + last.len()
        || !action.ends_with(last)
    {
        return false;
    }
    let mut rest = &action[first.len()..action.len() - last.len()];
    for middle in &parts[1..parts.len() - 1] {
        match rest.find(middle) {
            Some(at) => rest = &rest[at + middle.len()..],
            None => return false,
        }
    }
    true
}

/// The default OCSF classes: authentication for sessions and logins, account change for
/// users, roles, groups, credentials and keys, API activity for everything else.
const DEFAULT_OCSF_MAP: &[(&str, u32)] = &[
    ("session.*", 3002),
    ("auth.*", 3002),
    ("*.login", 3002),
    ("*.logout", 3002),
    ("*.signin", 3002),
    ("*.signout", 3002),
    ("*.authenticate", 3002),
    ("user.*", 3001),
    ("account.*", 3001),
    ("role.*", 3001),
    ("group.*", 3001),
    ("credential.*", 3001),
    ("password.*", 3001),
    ("mfa.*", 3001),
    ("api_key.*", 3001),
    ("apikey.*", 3001),
    ("token.*", 3001),
];

fn ocsf_class_name(class: u32) -> &'static str {
    match class {
        3001 => "Account Change",
        3002 => "Authentication",
        _ => "API Activity",
    }
}

/// The activity of an action in a class: (id, name).
fn ocsf_activity(class: u32, action: &str) -> (u8, &'static str) {
    match class {
        3002 => {
            if has(action, LOGOUT) {
                (2, "Logoff")
            } else if has(action, LOGIN) {
                (1, "Logon")
            } else {
                (99, "Other")
            }
        }
        3001 => {
            let w = words(action);
            let mfa = action.contains("mfa") || w.contains(&"mfa");
            if has(action, &["reset"]) && action.contains("password") {
                (4, "Password Reset")
            } else if action.contains("password") && has(action, UPDATE) {
                (3, "Password Change")
            } else if mfa && has(action, ENABLE) {
                (10, "MFA Factor Enable")
            } else if mfa && has(action, DISABLE) {
                (11, "MFA Factor Disable")
            } else if has(action, CREATE) {
                (1, "Create")
            } else if has(action, ENABLE) {
                (2, "Enable")
            } else if has(action, DISABLE) {
                (5, "Disable")
            } else if has(action, DELETE) {
                (6, "Delete")
            } else if has(action, ALLOW) {
                (7, "Attach Policy")
            } else if has(action, DENY) {
                (8, "Detach Policy")
            } else if has(action, UNLOCK) {
                (12, "Unlock")
            } else if has(action, LOCK) {
                (9, "Lock")
            } else {
                (99, "Other")
            }
        }
        _ => {
            if has(action, CREATE) {
                (1, "Create")
            } else if has(action, READ) || has(action, LIST) {
                (2, "Read")
            } else if has(action, UPDATE) {
                (3, "Update")
            } else if has(action, DELETE) {
                (4, "Delete")
            } else {
                (99, "Other")
            }
        }
    }
}

/// The name of an OCSF activity id given by a mapping.
fn ocsf_activity_name(class: u32, id: u8) -> &'static str {
    match (class, id) {
        (_, 0) => "Unknown",
        (_, 99) => "Other",
        (3002, 1) => "Logon",
        (3002, 2) => "Logoff",
        (3002, 3) => "Authentication Ticket",
        (3002, 4) => "Service Ticket Request",
        (3002, 5) => "Service Ticket Renew",
        (3002, 6) => "Preauth",
        (3002, 7) => "Account Switch",
        (3001, 1) => "Create",
        (3001, 2) => "Enable",
        (3001, 3) => "Password Change",
        (3001, 4) => "Password Reset",
        (3001, 5) => "Disable",
        (3001, 6) => "Delete",
        (3001, 7) => "Attach Policy",
        (3001, 8) => "Detach Policy",
        (3001, 9) => "Lock",
        (3001, 10) => "MFA Factor Enable",
        (3001, 11) => "MFA Factor Disable",
        (3001, 12) => "Unlock",
        (3001, 13) => "Enable MFA",
        (3001, 14) => "Disable MFA",
        (6003, 1) => "Create",
        (6003, 2) => "Read",
        (6003, 3) => "Update",
        (6003, 4) => "Delete",
        _ => "Other",
    }
}

/// The CADF action of an event's action (CADF 1.0 action taxonomy).
fn cadf_action(action: &str) -> &'static str {
    if has(action, LOGOUT) {
        "authenticate/logout"
    } else if has(action, LOGIN) {
        "authenticate/login"
    } else if has(action, LIST) {
        "read/list"
    } else if has(action, CREATE) {
        "create"
    } else if has(action, READ) {
        "read"
    } else if has(action, UPDATE) {
        "update"
    } else if has(action, DELETE) {
        "delete"
    } else if has(action, ENABLE) {
        "enable"
    } else if has(action, DISABLE) {
        "disable"
    } else if has(action, ALLOW) {
        "allow"
    } else if has(action, DENY) {
        "deny"
    } else if has(action, &["start"]) {
        "start"
    } else if has(action, &["stop"]) {
        "stop"
    } else if has(action, &["configure", "config"]) {
        "configure"
    } else if has(action, &["backup"]) {
        "backup"
    } else if has(action, &["restore"]) {
        "restore"
    } else if has(action, &["send", "sent"]) {
        "send"
    } else if has(action, &["receive", "received"]) {
        "receive"
    } else {
        "unknown"
    }
}

fn ip(value: Option<&str>) -> Option<String> {
    value
        .and_then(|v| v.parse::<IpAddr>().ok())
        .map(|a| a.to_string())
}

/// Sets `key` to `value` when it is `Some`.
fn put(map: &mut Map<String, Value>, key: &str, value: Option<impl Into<Value>>) {
    if let Some(v) = value {
        map.insert(key.to_owned(), v.into());
    }
}

impl Shape {
    pub fn new(config: &DestinationConfig) -> Shape {
        let (hec_index, hec_sourcetype) = match &config.kind {
            crate::Kind::Http(h) => (h.hec_index.clone(), h.hec_sourcetype.clone()),
            crate::Kind::RabbitMq(_) => (None, String::new()),
        };
        Shape {
            schema: config.schema,
            ocsf_map: config.ocsf_map.clone(),
            hec_index,
            hec_sourcetype,
        }
    }

    pub fn is_native(&self) -> bool {
        self.schema == Schema::Native
    }

    /// The OCSF class (and a mapped activity) of an action: the destination's map first, then
    /// the defaults, else API Activity.
    fn ocsf_class(&self, action: &str) -> (u32, Option<u8>) {
        if let Some(m) = self.ocsf_map.iter().find(|m| matches(&m.actions, action)) {
            return (m.class_uid, m.activity_id);
        }
        DEFAULT_OCSF_MAP
            .iter()
            .find(|(p, _)| matches(p, action))
            .map_or((6003, None), |&(_, c)| (c, None))
    }

    /// The event in this destination's schema.
    pub fn render(&self, e: &StoredEvent) -> Result<String, String> {
        if self.schema == Schema::Native {
            return Ok(e.json.clone());
        }
        let original: &RawValue =
            serde_json::from_str(&e.json).map_err(|err| format!("stored JSON: {err}"))?;
        let ev: In = serde_json::from_str(&e.json).map_err(|err| format!("stored event: {err}"))?;
        let occurred = OffsetDateTime::parse(&ev.occurred_at, &Rfc3339)
            .map_err(|err| format!("occurred_at: {err}"))?;
        let value = match self.schema {
            Schema::Native => unreachable!("returned above"),
            Schema::Cadf => cadf(&ev, occurred, original),
            Schema::Ocsf => self.ocsf(&ev, occurred, original),
            Schema::Ecs => ecs(&ev, e, original),
            Schema::SplunkHec => self.hec(&ev, occurred, original),
        };
        serde_json::to_string(&value).map_err(|err| err.to_string())
    }

    fn ocsf(&self, ev: &In, occurred: OffsetDateTime, original: &RawValue) -> Value {
        let (class, mapped) = self.ocsf_class(&ev.action);
        let (activity, activity_name) = match mapped {
            Some(id) => (id, ocsf_activity_name(class, id)),
            None => ocsf_activity(class, &ev.action),
        };
        let class_name = ocsf_class_name(class);
        let (status_id, status) = match ev.outcome.as_str() {
            "success" => (1, "Success"),
            "failure" | "denied" => (2, "Failure"),
            _ => (0, "Unknown"),
        };
        let (severity_id, severity) = match ev.outcome.as_str() {
            "denied" => (3, "Medium"),
            "failure" => (2, "Low"),
            _ => (1, "Informational"),
        };
        let mut user = Map::new();
        user.insert("uid".into(), ev.actor.id.clone().into());
        put(&mut user, "name", ev.actor.name.clone());
        let mut actor = Map::new();
        actor.insert("user".into(), Value::Object(user.clone()));
        let mut src = Map::new();
        match ip(ev.actor.ip.as_deref()) {
            Some(a) => {
                src.insert("ip".into(), a.into());
            }
            None => {
                src.insert("name".into(), ev.source.clone().into());
            }
        }
        let mut metadata = json!({
            "version": OCSF_VERSION,
            "uid": ev.id,
            "product": {"name": "Auditbridge", "vendor_name": "Auditbridge",
                        "version": env!("CARGO_PKG_VERSION")},
            "tenant_uid": ev.tenant,
            "log_name": ev.source,
        });
        if let Some(r) = &ev.request_id {
            metadata["correlation_uid"] = r.clone().into();
        }
        let mut out = json!({
            "class_uid": class,
            "class_name": class_name,
            "category_uid": if class == 6003 { 6 } else { 3 },
            "category_name": if class == 6003 { "Application Activity" } else { "Identity & Access Management" },
            "activity_id": activity,
            "activity_name": activity_name,
            "type_uid": u64::from(class) * 100 + u64::from(activity),
            "type_name": format!("{class_name}: {activity_name}"),
            "severity_id": severity_id,
            "severity": severity,
            "status_id": status_id,
            "status": status,
            "time": occurred.unix_timestamp_nanos() / 1_000_000,
            "message": ev.action,
            "metadata": metadata,
            "actor": Value::Object(actor),
            "src_endpoint": Value::Object(src),
            "unmapped": {"auditbridge": original},
        });
        if let Some(r) = &ev.reason {
            out["status_detail"] = r.clone().into();
        }
        if let Some(ua) = &ev.actor.user_agent {
            out["http_request"] = json!({"user_agent": ua});
        }
        match class {
            3002 => {
                out["user"] = Value::Object(user);
                // The service authenticated to: the event's source.
                out["service"] = json!({"name": ev.source});
            }
            3001 => {
                // The account changed: the target when the event names one, else the actor.
                let mut changed = Map::new();
                match ev.target.as_ref().and_then(|t| t.id.clone()) {
                    Some(id) => {
                        changed.insert("uid".into(), id.into());
                        put(
                            &mut changed,
                            "name",
                            ev.target.as_ref().and_then(|t| t.name.clone()),
                        );
                    }
                    None => changed = user,
                }
                out["user"] = Value::Object(changed);
            }
            _ => {
                let mut api = json!({"operation": ev.action});
                if let Some(r) = &ev.request_id {
                    api["request"] = json!({"uid": r});
                }
                out["api"] = api;
                if let Some(t) = &ev.target {
                    let mut resource = Map::new();
                    put(&mut resource, "uid", t.id.clone());
                    put(&mut resource, "type", t.kind.clone());
                    put(&mut resource, "name", t.name.clone());
                    if !resource.is_empty() {
                        out["resources"] = json!([resource]);
                    }
                }
            }
        }
        out
    }

    fn hec(&self, ev: &In, occurred: OffsetDateTime, original: &RawValue) -> Value {
        let mut out = json!({
            "time": (occurred.unix_timestamp_nanos() / 1_000_000) as f64 / 1000.0,
            "source": ev.source,
            "sourcetype": self.hec_sourcetype,
            "event": original,
            "fields": {"tenant": ev.tenant, "action": ev.action, "outcome": ev.outcome},
        });
        if let Some(i) = &self.hec_index {
            out["index"] = i.clone().into();
        }
        out
    }
}

/// A CADF resource type (pycadf's taxonomy) for a target's kind; `data` when none fits.
fn cadf_resource(kind: Option<&str>) -> &'static str {
    match kind.unwrap_or("") {
        "user" | "account" => "data/security/account/user",
        "role" => "data/security/role",
        "group" | "team" => "data/security/group",
        "credential" | "password" | "token" => "data/security/credential",
        "key" | "api_key" | "apikey" => "data/security/key",
        "policy" => "data/security/policy",
        "project" => "data/security/project",
        "domain" => "data/security/domain",
        "document" | "file" | "report" => "data/file",
        "folder" | "directory" => "data/directory",
        "database" => "data/database",
        "table" => "data/database/table",
        "config" | "setting" | "settings" => "data/config",
        "message" | "email" => "data/message",
        "image" => "data/image",
        "service" => "service",
        "host" | "server" | "machine" => "compute/machine",
        _ => "data",
    }
}

fn cadf(ev: &In, occurred: OffsetDateTime, original: &RawValue) -> Value {
    let outcome = match ev.outcome.as_str() {
        "success" => "success",
        "failure" | "denied" => "failure",
        _ => "unknown",
    };
    let initiator_type = match ev.actor.kind.as_deref() {
        Some("user") | None => "data/security/account/user",
        Some("service") => "service",
        Some(_) => "unknown",
    };
    let mut initiator = json!({"typeURI": initiator_type, "id": ev.actor.id});
    if let Some(n) = &ev.actor.name {
        initiator["name"] = n.clone().into();
    }
    let mut host = Map::new();
    put(&mut host, "address", ev.actor.ip.clone());
    put(&mut host, "agent", ev.actor.user_agent.clone());
    if !host.is_empty() {
        initiator["host"] = Value::Object(host);
    }
    let target = match &ev.target {
        Some(t) => {
            let mut v = json!({
                "typeURI": cadf_resource(t.kind.as_deref()),
                "id": t.id.clone().unwrap_or_else(|| "unknown".into()),
            });
            if let Some(n) = &t.name {
                v["name"] = n.clone().into();
            }
            v
        }
        None => json!({"typeURI": "data", "id": "unknown"}),
    };
    // pycadf's own form: microseconds and a +0000 offset.
    let time = format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}+0000",
        occurred.year(),
        u8::from(occurred.month()),
        occurred.day(),
        occurred.hour(),
        occurred.minute(),
        occurred.second(),
        occurred.microsecond()
    );
    let mut out = json!({
        "typeURI": "http://schemas.dmtf.org/cloud/audit/1.0/event",
        "id": ev.id,
        "eventType": "activity",
        "eventTime": time,
        "action": cadf_action(&ev.action),
        "outcome": outcome,
        "initiator": initiator,
        "target": target,
        "observer": {"typeURI": "service/security", "id": ev.source, "name": ev.source},
        "tags": [format!("tenant:{}", ev.tenant), format!("action:{}", ev.action)],
        "attachments": [{"name": "auditbridge_event", "typeURI": "mime:application/json",
                         "content": original}],
    });
    if let Some(r) = &ev.reason {
        out["reason"] = json!({"reasonType": "auditbridge", "reasonCode": r});
    }
    out
}

fn ecs(ev: &In, e: &StoredEvent, original: &RawValue) -> Value {
    let outcome = match ev.outcome.as_str() {
        "success" => "success",
        "failure" | "denied" => "failure",
        _ => "unknown",
    };
    let (category, kind) = if has(&ev.action, LOGIN) {
        ("authentication", "start")
    } else if has(&ev.action, LOGOUT) {
        ("authentication", "end")
    } else if ev.action.starts_with("session.") || ev.action.starts_with("auth.") {
        ("authentication", "info")
    } else if [
        "user.",
        "account.",
        "role.",
        "group.",
        "credential.",
        "password.",
        "mfa.",
    ]
    .iter()
    .any(|p| ev.action.starts_with(p))
    {
        let t = if has(&ev.action, CREATE) {
            "creation"
        } else if has(&ev.action, DELETE) {
            "deletion"
        } else if has(&ev.action, READ) || has(&ev.action, LIST) {
            "info"
        } else {
            "change"
        };
        ("iam", t)
    } else {
        let t = if has(&ev.action, CREATE) {
            "creation"
        } else if has(&ev.action, DELETE) {
            "deletion"
        } else if has(&ev.action, UPDATE) {
            "change"
        } else {
            "access"
        };
        ("configuration", t)
    };
    let mut event = json!({
        "id": ev.id,
        "action": ev.action,
        "outcome": outcome,
        "kind": "event",
        "category": [category],
        "type": [kind],
        "provider": ev.source,
        "dataset": "auditbridge.audit",
        "created": e.received_at.format(&Rfc3339).unwrap_or_default(),
        "original": original.get(),
    });
    if let Some(r) = &ev.reason {
        event["reason"] = r.clone().into();
    }
    let mut user = json!({"id": ev.actor.id});
    if let Some(n) = &ev.actor.name {
        user["name"] = n.clone().into();
    }
    let mut labels = Map::new();
    labels.insert("tenant".into(), ev.tenant.clone().into());
    if let Some(k) = &ev.actor.kind {
        labels.insert("actor_kind".into(), k.clone().into());
    }
    if let Some(t) = &ev.target {
        if t.kind.as_deref() == Some("user") {
            let mut target = Map::new();
            put(&mut target, "id", t.id.clone());
            put(&mut target, "name", t.name.clone());
            user["target"] = Value::Object(target);
        }
        put(&mut labels, "target_id", t.id.clone());
        put(&mut labels, "target_kind", t.kind.clone());
        put(&mut labels, "target_name", t.name.clone());
    }
    let mut out = json!({
        "@timestamp": ev.occurred_at,
        "ecs": {"version": ECS_VERSION},
        "event": event,
        "user": user,
        "organization": {"id": ev.tenant},
        "labels": Value::Object(labels),
    });
    if let Some(a) = ip(ev.actor.ip.as_deref()) {
        out["source"] = json!({"ip": a});
    }
    if let Some(ua) = &ev.actor.user_agent {
        out["user_agent"] = json!({"original": ua});
    }
    if let Some(r) = &ev.request_id {
        out["http"] = json!({"request": {"id": r}});
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_as_globs() {
        assert!(matches("user.*", "user.login"));
        assert!(matches("*.login", "user.login"));
        assert!(matches("*", "x"));
        assert!(matches("a*b*c", "a.x.b.y.c"));
        assert!(!matches("a*b*c", "a.c"));
        assert!(!matches("user.*", "users.login"));
        assert!(matches("user.login", "user.login"));
    }

    #[test]
    fn default_classes_and_activities() {
        let s = Shape {
            schema: Schema::Ocsf,
            ocsf_map: vec![],
            hec_index: None,
            hec_sourcetype: String::new(),
        };
        assert_eq!(s.ocsf_class("user.login"), (3002, None));
        assert_eq!(ocsf_activity(3002, "user.login"), (1, "Logon"));
        assert_eq!(ocsf_activity(3002, "session.logout"), (2, "Logoff"));
        assert_eq!(s.ocsf_class("user.password_reset"), (3001, None));
        assert_eq!(
            ocsf_activity(3001, "user.password_reset"),
            (4, "Password Reset")
        );
        assert_eq!(ocsf_activity(3001, "role.create"), (1, "Create"));
        assert_eq!(s.ocsf_class("document.update"), (6003, None));
        assert_eq!(ocsf_activity(6003, "document.update"), (3, "Update"));
        assert_eq!(cadf_action("document.list"), "read/list");
        assert_eq!(cadf_action("user.login"), "authenticate/login");
        assert_eq!(cadf_action("billing.frobnicate"), "unknown");
        let mapped = Shape {
            ocsf_map: vec![OcsfMapping {
                actions: "billing.*".into(),
                class_uid: 3001,
                activity_id: Some(7),
            }],
            ..s
        };
        assert_eq!(mapped.ocsf_class("billing.assign"), (3001, Some(7)));
    }
}
