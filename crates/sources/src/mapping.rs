//! The declarative mapping from a foreign JSON payload to a v1 [`Event`]: pure, no I/O.
//!
//! A source either already speaks v1 ([`Mapping::Identity`]: the payload is decoded and
//! validated as it is) or describes, per field, where the value is found in the foreign
//! object (a JSON pointer such as `/sender/login`) or which constant it takes
//! (`{"const": "user"}`). The foreign event type is looked up in the source's action map;
//! the map's keys are the allow-list, so a type nobody mapped is refused with a reason
//! instead of inventing an action.
//!
//! **Dedup.** A mapped event's `id` is derived from (source name, tenant, the source's own
//! event id) by [`derive_id`], so a re-delivery of the same foreign event yields the same v1
//! id, hence the same `Nats-Msg-Id`, and is stored once (JetStream's duplicate window, then the
//! worker's `ON CONFLICT (id)`). The derivation is keyed ([`IdKey`], `AUDITBRIDGE_ID_KEY`):
//! the inputs (source name, tenant, a vendor's delivery id) are guessable, and an unkeyed
//! hash of them would let another tenant's producer compute an id first and squat it.
//!
//! **Headers for the worker** ([`Mapped`]): `Auditbridge-Time: received` when `occurred_at`
//! is the receive time (it differs per delivery, so the worker compares a re-sent id without
//! it), and `Auditbridge-Legacy-Id` with the id the unkeyed derivation of earlier versions
//! ([`legacy_derive_id`]) gave, so a re-delivery that spans the upgrade is recognised.

use auditbridge_config::ExposeSecret as _;
use auditbridge_config::sources::MappingConfig;
use auditbridge_event::{Actor, Event, Outcome, Target, Uuid};
use hmac::{Hmac, KeyInit as _, Mac as _};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// How a source's payloads become v1 events: its configured mapping
/// ([`auditbridge_config::sources::MappingConfig`]), with the id key ready to use.
#[derive(Debug, Clone)]
pub enum Mapping {
    /// The payload is already a v1 event.
    Identity,
    /// Field by field from a foreign object.
    Fields(Box<FieldMapping>),
}

pub use auditbridge_config::sources::{ActorMapping, Field, TargetMapping};

/// A field-by-field mapping and the key of the ids it derives.
#[derive(Debug, Clone)]
pub struct FieldMapping {
    /// The key of the derived ids.
    pub id_key: IdKey,
    pub spec: auditbridge_config::sources::FieldMapping,
}

impl Mapping {
    /// The mapping a source's configuration names.
    pub fn new(config: &MappingConfig) -> Mapping {
        match config {
            MappingConfig::Identity => Mapping::Identity,
            MappingConfig::Fields(spec) => Mapping::Fields(Box::new(FieldMapping {
                id_key: IdKey::new(spec.id_key.expose_secret()),
                spec: (**spec).clone(),
            })),
        }
    }
}

/// Why a payload was not turned into an event. Permanent: the same payload is refused again.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{detail}")]
pub struct Refusal {
    pub kind: RefusalKind,
    pub detail: String,
}

/// A stable, low-cardinality label for a [`Refusal`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefusalKind {
    /// Not JSON, or not an object.
    NotJson,
    /// The foreign event type is not in the source's action map.
    UnmappedType,
    /// A field the mapping needs is absent or has the wrong JSON type.
    MissingField,
    /// The result (or, for identity, the payload) is not a valid v1 event.
    Invalid,
    /// Larger than the event size limit.
    Oversize,
    /// The event's tenant is not one the source may write.
    TenantNotAllowed,
}

impl RefusalKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalKind::NotJson => "not_json",
            RefusalKind::UnmappedType => "unmapped_type",
            RefusalKind::MissingField => "missing_field",
            RefusalKind::Invalid => "invalid",
            RefusalKind::Oversize => "oversize",
            RefusalKind::TenantNotAllowed => "tenant_not_allowed",
        }
    }
}

fn refuse(kind: RefusalKind, detail: impl Into<String>) -> Refusal {
    Refusal {
        kind,
        detail: detail.into(),
    }
}

/// The key of derived ids: `AUDITBRIDGE_ID_KEY`, one secret shared by every `serve`,
/// `tail-file` and poller (all of them must derive the same id for the same foreign event).
/// Never printed; compared (for configuration tests) by a fingerprint, not by the key.
#[derive(Clone)]
pub struct IdKey {
    mac: Hmac<Sha256>,
    fingerprint: [u8; 16],
}

impl IdKey {
    /// The key is the setting's text as bytes (any format: `openssl rand -hex 32` gives one).
    pub fn new(secret: &str) -> IdKey {
        let mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes())
            .expect("HMAC takes a key of any length");
        let digest = mac
            .clone()
            .chain_update(b"auditbridge id key fingerprint")
            .finalize()
            .into_bytes();
        let mut fingerprint = [0u8; 16];
        fingerprint.copy_from_slice(&digest[..16]);
        IdKey { mac, fingerprint }
    }
}

impl PartialEq for IdKey {
    fn eq(&self, other: &IdKey) -> bool {
        self.fingerprint == other.fingerprint
    }
}

impl std::fmt::Debug for IdKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IdKey(***)")
    }
}

/// The namespace of keyed derived ids.
const ID_NAMESPACE: &[u8] = b"auditbridge.sources.v2\0";

/// The v1 id of the foreign event `foreign_id` of source `source` for `tenant`:
/// deterministic, so a re-delivery gets the same id, and keyed, so that nobody without the
/// key can compute it (another tenant's producer could otherwise publish first with it).
/// The tenant is part of it because a multi-tenant source may number its events per tenant:
/// without it, tenant B's `evt_1` would get tenant A's id. With a known `occurred_at` the id
/// is UUIDv7-shaped (its first 48 bits are the event's Unix milliseconds, so ids stay
/// time-ordered, which keeps the primary-key index append-mostly); without one it is a UUIDv8
/// of the MAC alone (the receive time cannot be part of it: it differs per delivery). The
/// remaining bits are the HMAC-SHA256, under `key`, of the namespace, the source name, the
/// tenant and the foreign id.
pub fn derive_id(
    key: &IdKey,
    source: &str,
    tenant: &str,
    foreign_id: &str,
    occurred_at: Option<OffsetDateTime>,
) -> Uuid {
    let mut mac = key.mac.clone();
    mac.update(ID_NAMESPACE);
    mac.update(source.as_bytes());
    mac.update(&[0]);
    mac.update(tenant.as_bytes());
    mac.update(&[0]);
    mac.update(foreign_id.as_bytes());
    uuid_from(&mac.finalize().into_bytes(), occurred_at)
}

/// The namespace of the unkeyed ids of earlier versions. Fixed: [`legacy_derive_id`] must
/// keep giving exactly what they stored.
const LEGACY_ID_NAMESPACE: &[u8] = b"auditbridge.sources.v1\0";

/// The id earlier versions derived, an unkeyed SHA-256 of (namespace, source, tenant, foreign
/// id), in the same shape as [`derive_id`]. Used **only** for the `Auditbridge-Legacy-Id`
/// header, so that the worker recognises a re-delivery of an event stored before the upgrade
/// (under this id) as a duplicate. Never an event's id: anyone can compute it.
pub fn legacy_derive_id(
    source: &str,
    tenant: &str,
    foreign_id: &str,
    occurred_at: Option<OffsetDateTime>,
) -> Uuid {
    let mut h = Sha256::new();
    h.update(LEGACY_ID_NAMESPACE);
    h.update(source.as_bytes());
    h.update([0]);
    h.update(tenant.as_bytes());
    h.update([0]);
    h.update(foreign_id.as_bytes());
    uuid_from(&h.finalize(), occurred_at)
}

/// UUIDv7 with `occurred_at`'s milliseconds in front of the digest's bits, or UUIDv8 of the
/// digest alone.
fn uuid_from(digest: &[u8], occurred_at: Option<OffsetDateTime>) -> Uuid {
    let mut b = [0u8; 16];
    b.copy_from_slice(&digest[..16]);
    let millis = occurred_at
        .map(|t| t.unix_timestamp_nanos() / 1_000_000)
        .filter(|ms| (0..1i128 << 48).contains(ms));
    match millis {
        Some(ms) => {
            let ms = u64::try_from(ms).unwrap_or(0).to_be_bytes();
            b[..6].copy_from_slice(&ms[2..]);
            b[6] = (b[6] & 0x0f) | 0x70;
            b[8] = (b[8] & 0x3f) | 0x80;
            Uuid::from_bytes(b)
        }
        None => uuid::Builder::from_custom_bytes(b).into_uuid(),
    }
}

/// A payload turned into an event, with what the worker needs to know about how.
#[derive(Debug, Clone, PartialEq)]
pub struct Mapped {
    pub event: Event,
    /// `occurred_at` is the time the payload was received (the mapping has no time for it):
    /// a re-delivery carries another one. Published as `Auditbridge-Time: received`.
    pub time_received: bool,
    /// For a derived id: the id [`legacy_derive_id`] gives for the same event. Published as
    /// `Auditbridge-Legacy-Id`.
    pub legacy_id: Option<Uuid>,
}

impl Mapping {
    /// Turns one payload into a valid v1 event. `received_at` stands in for `occurred_at`
    /// when the mapping has no pointer for it.
    pub fn apply(
        &self,
        source: &str,
        payload: &[u8],
        max_bytes: usize,
        received_at: OffsetDateTime,
    ) -> Result<Mapped, Refusal> {
        match self {
            Mapping::Identity => auditbridge_event::decode(payload, max_bytes)
                .map(|event| Mapped {
                    event,
                    time_received: false,
                    legacy_id: None,
                })
                .map_err(|e| {
                    let kind = match e.kind {
                        auditbridge_event::InvalidKind::Oversize => RefusalKind::Oversize,
                        auditbridge_event::InvalidKind::NotJson => RefusalKind::NotJson,
                        _ => RefusalKind::Invalid,
                    };
                    refuse(kind, e.detail)
                }),
            Mapping::Fields(m) => {
                if payload.len() > max_bytes {
                    return Err(refuse(
                        RefusalKind::Oversize,
                        format!("payload is {} bytes, more than {max_bytes}", payload.len()),
                    ));
                }
                let doc: Value = serde_json::from_slice(payload)
                    .map_err(|e| refuse(RefusalKind::NotJson, format!("not JSON: {e}")))?;
                map_value(m, source, &doc, max_bytes, received_at)
            }
        }
    }

    /// Maps one foreign object already parsed (an item of a polled page). Only a field
    /// mapping can: an identity mapping is refused with `invalid`.
    pub fn apply_value(
        &self,
        source: &str,
        doc: &Value,
        max_bytes: usize,
        received_at: OffsetDateTime,
    ) -> Result<Mapped, Refusal> {
        match self {
            Mapping::Identity => Err(refuse(
                RefusalKind::Invalid,
                "an identity mapping takes payloads, not parsed items",
            )),
            Mapping::Fields(m) => map_value(m, source, doc, max_bytes, received_at),
        }
    }
}

fn map_value(
    m: &FieldMapping,
    source: &str,
    doc: &Value,
    max_bytes: usize,
    received_at: OffsetDateTime,
) -> Result<Mapped, Refusal> {
    if !doc.is_object() {
        return Err(refuse(RefusalKind::NotJson, "expected a JSON object"));
    }
    let mapped = m.map(source, doc, received_at)?;
    let size = serde_json::to_vec(&mapped.event).map_or(0, |v| v.len());
    if size > max_bytes {
        return Err(refuse(
            RefusalKind::Oversize,
            format!("the mapped event is {size} bytes, more than {max_bytes}"),
        ));
    }
    Ok(mapped)
}

/// Refuses an event whose tenant is not in `allowed` (an empty list allows every tenant).
pub fn check_tenant(source: &str, allowed: &[String], event: &Event) -> Result<(), Refusal> {
    if allowed.is_empty() || allowed.contains(&event.tenant) {
        return Ok(());
    }
    Err(refuse(
        RefusalKind::TenantNotAllowed,
        format!(
            "tenant {:?} is not one source {source} may write (params.tenants: {})",
            event.tenant,
            allowed.join(", ")
        ),
    ))
}

/// The text at a pointer: strings as they are, numbers and booleans as written; `None` when
/// absent or null.
fn text_at(doc: &Value, pointer: &str) -> Result<Option<String>, Refusal> {
    match doc.pointer(pointer) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(v @ (Value::Number(_) | Value::Bool(_))) => Ok(Some(v.to_string())),
        Some(_) => Err(refuse(
            RefusalKind::MissingField,
            format!("{pointer}: expected a string or number, found an object or array"),
        )),
    }
}

/// The text a field gives for `doc`.
fn field_text(field: &Field, doc: &Value) -> Result<Option<String>, Refusal> {
    match field {
        Field::Const(c) => Ok(Some(c.clone())),
        Field::Pointer(p) => text_at(doc, p),
    }
}

fn optional(field: Option<&Field>, doc: &Value) -> Result<Option<String>, Refusal> {
    field.map_or(Ok(None), |f| field_text(f, doc))
}

fn required(field: &Field, doc: &Value, what: &str) -> Result<String, Refusal> {
    field_text(field, doc)?
        .filter(|s| !s.is_empty())
        .ok_or_else(|| {
            refuse(
                RefusalKind::MissingField,
                format!("{what}: nothing at {field}"),
            )
        })
}

impl FieldMapping {
    fn map(
        &self,
        source: &str,
        doc: &Value,
        received_at: OffsetDateTime,
    ) -> Result<Mapped, Refusal> {
        let spec = &self.spec;
        let foreign_id = required(&spec.id, doc, "id")?;
        let mut parts = Vec::with_capacity(spec.event_type.len());
        for p in &spec.event_type {
            match text_at(doc, &p.0)? {
                Some(t) if !t.is_empty() => parts.push(t),
                _ => {
                    return Err(refuse(
                        RefusalKind::MissingField,
                        format!("event type: nothing at {}", p.0),
                    ));
                }
            }
        }
        let event_type = parts.join(".");
        let Some(action) = spec.actions.get(&event_type) else {
            return Err(refuse(
                RefusalKind::UnmappedType,
                format!(
                    "event type {event_type:?} is not in the action map of source {source} (allowed: {})",
                    spec.actions.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            ));
        };
        let occurred_at = match &spec.occurred_at {
            None => None,
            Some(p) => Some(timestamp_at(doc, &p.0)?),
        };
        let outcome = match optional(spec.outcome.as_ref(), doc)? {
            None => Outcome::Unknown,
            Some(v) => match spec.outcomes.get(&v) {
                Some(o) => *o,
                None => v.parse().map_err(|_| {
                    refuse(
                        RefusalKind::Invalid,
                        format!("outcome: {v:?} is neither mapped in outcomes nor a v1 outcome"),
                    )
                })?,
            },
        };
        let actor = Actor {
            id: match &spec.actor.id {
                Some(f) => required(f, doc, "actor.id")?,
                None => return Err(refuse(RefusalKind::MissingField, "actor.id: not mapped")),
            },
            kind: optional(spec.actor.kind.as_ref(), doc)?,
            name: optional(spec.actor.name.as_ref(), doc)?,
            ip: optional(spec.actor.ip.as_ref(), doc)?,
            user_agent: optional(spec.actor.user_agent.as_ref(), doc)?,
        };
        let target = match &spec.target {
            None => None,
            Some(t) => {
                let target = Target {
                    id: optional(t.id.as_ref(), doc)?,
                    kind: optional(t.kind.as_ref(), doc)?,
                    name: optional(t.name.as_ref(), doc)?,
                };
                (target != Target::default()).then_some(target)
            }
        };
        let mut metadata = Map::new();
        for (key, pointer) in &spec.metadata {
            if let Some(v) = doc.pointer(&pointer.0).filter(|v| !v.is_null()) {
                metadata.insert(key.clone(), v.clone());
            }
        }
        metadata.insert("source_event_id".into(), Value::String(foreign_id.clone()));
        let tenant = required(&spec.tenant, doc, "tenant")?;
        let legacy_id = legacy_derive_id(source, &tenant, &foreign_id, occurred_at);
        let event = Event {
            id: derive_id(&self.id_key, source, &tenant, &foreign_id, occurred_at),
            tenant,
            occurred_at: occurred_at.unwrap_or(received_at),
            action: action.clone(),
            outcome,
            actor,
            target,
            source: match &spec.source {
                Some(f) => required(f, doc, "source")?,
                None => source.to_owned(),
            },
            reason: optional(spec.reason.as_ref(), doc)?,
            request_id: optional(spec.request_id.as_ref(), doc)?,
            metadata: Some(metadata),
        };
        event
            .validate()
            .map_err(|e| refuse(RefusalKind::Invalid, e.detail))?;
        Ok(Mapped {
            event,
            time_received: occurred_at.is_none(),
            legacy_id: Some(legacy_id),
        })
    }
}

fn timestamp_at(doc: &Value, pointer: &str) -> Result<OffsetDateTime, Refusal> {
    let bad = |what: String| refuse(RefusalKind::MissingField, format!("occurred_at: {what}"));
    match doc.pointer(pointer) {
        Some(Value::String(s)) => OffsetDateTime::parse(s, &Rfc3339)
            .map_err(|e| bad(format!("{s:?} at {pointer} is not RFC 3339 ({e})"))),
        Some(Value::Number(n)) => {
            let secs = n
                .as_f64()
                .ok_or_else(|| bad(format!("{n} at {pointer} is not a number of seconds")))?;
            OffsetDateTime::from_unix_timestamp_nanos((secs * 1e9) as i128)
                .map_err(|e| bad(format!("{n} at {pointer} is out of range ({e})")))
        }
        _ => Err(bad(format!(
            "expected RFC 3339 text or Unix seconds at {pointer}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn now() -> OffsetDateTime {
        time::macros::datetime!(2026-11-23 12:00:00 UTC)
    }

    fn key() -> IdKey {
        IdKey::new("test-id-key-0123456789abcdef0123456789")
    }

    fn github_like() -> Mapping {
        let config = json!({
            "id": "/delivery",
            "tenant": "/installation/account",
            "type": ["/event", "/action"],
            "actions": {"issues.opened": "issue.create", "issues.closed": "issue.close"},
            "occurred_at": "/created_at",
            "outcome": {"const": "success"},
            "actor": {"id": "/sender/id", "type": {"const": "user"}, "name": "/sender/login"},
            "target": {"id": "/issue/number", "type": {"const": "issue"}, "name": "/issue/title"},
            "metadata": {"repository": "/repository"}
        });
        crate::test_config::mapping(&config)
    }

    fn payload(kind: &str) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "delivery": "d-1",
            "event": "issues",
            "action": kind,
            "created_at": "2026-11-23T10:00:00Z",
            "installation": {"account": "acme"},
            "sender": {"id": 42, "login": "ada"},
            "issue": {"number": 7, "title": "Crash"},
            "repository": {"full_name": "acme/app"}
        }))
        .unwrap()
    }

    #[test]
    fn a_foreign_payload_becomes_a_valid_event() {
        let mapped = github_like()
            .apply("gh", &payload("opened"), 65536, now())
            .unwrap();
        assert!(!mapped.time_received, "the payload has a time");
        let e = mapped.event;
        assert_eq!(e.tenant, "acme");
        assert_eq!(e.action, "issue.create");
        assert_eq!(e.outcome, Outcome::Success);
        assert_eq!(e.actor.id, "42");
        assert_eq!(e.actor.kind.as_deref(), Some("user"));
        assert_eq!(e.actor.name.as_deref(), Some("ada"));
        let t = e.target.unwrap();
        assert_eq!(t.id.as_deref(), Some("7"));
        assert_eq!(t.name.as_deref(), Some("Crash"));
        assert_eq!(e.source, "gh");
        assert_eq!(
            e.occurred_at,
            time::macros::datetime!(2026-11-23 10:00:00 UTC)
        );
        let m = e.metadata.unwrap();
        assert_eq!(m["source_event_id"], "d-1");
        assert_eq!(m["repository"]["full_name"], "acme/app");
        assert_eq!(e.id.get_version_num(), 7);
    }

    #[test]
    fn the_id_depends_only_on_source_and_foreign_id() {
        let m = github_like();
        let a = m.apply("gh", &payload("opened"), 65536, now()).unwrap();
        let later = now() + time::Duration::hours(1);
        let b = m.apply("gh", &payload("opened"), 65536, later).unwrap();
        assert_eq!(a.event.id, b.event.id, "a re-delivery keeps its id");
        let c = m.apply("gh2", &payload("opened"), 65536, now()).unwrap();
        assert_ne!(
            a.event.id, c.event.id,
            "another source's event 'd-1' is another event"
        );
        // Time-ordered: the id starts with the event's milliseconds.
        let t = time::macros::datetime!(2026-11-23 10:00:00 UTC);
        let ms = u64::try_from(t.unix_timestamp() * 1000).unwrap();
        assert_eq!(a.event.id.as_u128() >> 80, u128::from(ms));
        let k = key();
        let v8 = derive_id(&k, "gh", "acme", "d-1", None);
        assert_eq!(v8.get_version_num(), 8);
        assert_eq!(v8, derive_id(&k, "gh", "acme", "d-1", None));
        assert_ne!(v8, derive_id(&k, "gh", "acme", "d-2", None));
        // Per-tenant numbering at the source must not collide across tenants.
        assert_ne!(v8, derive_id(&k, "gh", "globex", "d-1", None));
    }

    #[test]
    fn derived_ids_are_keyed() {
        let (k, other) = (key(), IdKey::new("another-key-0123456789abcdef0123456789"));
        let at = Some(time::macros::datetime!(2026-11-23 10:00:00 UTC));
        let id = derive_id(&k, "gh", "acme", "d-1", at);
        assert_ne!(id, derive_id(&other, "gh", "acme", "d-1", at));
        // Nor is it the unkeyed hash anyone could compute.
        assert_ne!(id, legacy_derive_id("gh", "acme", "d-1", at));
        assert_eq!(id.get_version_num(), 7);
        assert_ne!(k, other);
        assert_eq!(format!("{k:?}"), "IdKey(***)");
    }

    /// The unkeyed derivation of earlier versions, pinned: `Auditbridge-Legacy-Id` must keep
    /// naming exactly the ids they stored, or re-deliveries across the upgrade are stored
    /// twice. (Values computed independently from the definition.)
    #[test]
    fn the_legacy_derivation_never_drifts() {
        let at = time::macros::datetime!(2026-11-23 10:00:00.250 UTC);
        assert_eq!(
            legacy_derive_id("vendor", "acme", "dlv-1", Some(at)).to_string(),
            "01a207d9-21fa-760c-ace9-285b3a88c9aa"
        );
        assert_eq!(
            legacy_derive_id("hub", "acme", "991", None).to_string(),
            "f96d99a1-3a64-8958-a730-489d8262ee65"
        );
    }

    #[test]
    fn mapped_events_carry_their_legacy_id_and_time_origin() {
        let a = github_like()
            .apply("gh", &payload("opened"), 65536, now())
            .unwrap();
        let at = time::macros::datetime!(2026-11-23 10:00:00 UTC);
        assert_eq!(
            a.legacy_id,
            Some(legacy_derive_id("gh", "acme", "d-1", Some(at)))
        );
        let line = br#"{"id":"0192f7a4-6b1e-7c3d-9a2b-5f1e2d3c4b5a","tenant":"acme","occurred_at":"2026-11-22T10:15:30.123Z","action":"document.update","outcome":"success","actor":{"id":"u-42"},"source":"docs-api"}"#;
        let identity = Mapping::Identity.apply("f", line, 65536, now()).unwrap();
        assert_eq!((identity.legacy_id, identity.time_received), (None, false));
    }

    #[test]
    fn unlisted_types_are_refused_with_the_allow_list() {
        let err = github_like()
            .apply("gh", &payload("deleted"), 65536, now())
            .unwrap_err();
        assert_eq!(err.kind, RefusalKind::UnmappedType);
        assert!(err.detail.contains("issues.deleted"), "{err}");
        assert!(err.detail.contains("issues.opened"), "{err}");
    }

    #[test]
    fn missing_and_malformed_fields_are_named() {
        let m = github_like();
        let mut doc: Value = serde_json::from_slice(&payload("opened")).unwrap();
        doc["installation"]["account"] = json!("Not A Tenant");
        let err = m
            .apply("gh", &serde_json::to_vec(&doc).unwrap(), 65536, now())
            .unwrap_err();
        assert_eq!(err.kind, RefusalKind::Invalid);
        assert!(err.detail.contains("tenant"), "{err}");

        doc["installation"] = json!({});
        let err = m
            .apply("gh", &serde_json::to_vec(&doc).unwrap(), 65536, now())
            .unwrap_err();
        assert_eq!(err.kind, RefusalKind::MissingField);
        assert!(err.detail.contains("/installation/account"), "{err}");

        let mut doc: Value = serde_json::from_slice(&payload("opened")).unwrap();
        doc["sender"]["id"] = json!({"nested": 1});
        let err = m
            .apply("gh", &serde_json::to_vec(&doc).unwrap(), 65536, now())
            .unwrap_err();
        assert!(err.detail.contains("/sender/id"), "{err}");

        let err = m.apply("gh", b"[1,2]", 65536, now()).unwrap_err();
        assert_eq!(err.kind, RefusalKind::NotJson);
        let err = m.apply("gh", b"{oops", 65536, now()).unwrap_err();
        assert_eq!(err.kind, RefusalKind::NotJson);
        let err = m.apply("gh", &payload("opened"), 100, now()).unwrap_err();
        assert_eq!(err.kind, RefusalKind::Oversize);
    }

    #[test]
    fn outcomes_map_and_default_to_unknown() {
        let config = json!({
            "id": "/id", "tenant": {"const": "acme"}, "type": "/t",
            "actions": {"login": "session.create"},
            "outcome": "/result", "outcomes": {"ok": "success", "blocked": "denied"},
            "actor": {"id": "/user"}
        });
        let m = crate::test_config::mapping(&config);
        let ev = |result: Value| {
            let body = json!({"id": 1, "t": "login", "user": "u", "result": result});
            m.apply("s", &serde_json::to_vec(&body).unwrap(), 65536, now())
                .map(|mapped| mapped.event)
        };
        assert_eq!(ev(json!("ok")).unwrap().outcome, Outcome::Success);
        assert_eq!(ev(json!("blocked")).unwrap().outcome, Outcome::Denied);
        assert_eq!(ev(json!("failure")).unwrap().outcome, Outcome::Failure);
        assert_eq!(ev(Value::Null).unwrap().outcome, Outcome::Unknown);
        assert_eq!(ev(json!("weird")).unwrap_err().kind, RefusalKind::Invalid);
        // No occurred_at pointer: the receive time, said so, and an id that does not depend
        // on it.
        let e = ev(json!("ok")).unwrap();
        assert_eq!(e.occurred_at, now());
        assert_eq!(e.id, derive_id(&key(), "s", "acme", "1", None));
        let body = br#"{"id": 1, "t": "login", "user": "u"}"#;
        let later = m
            .apply("s", body, 65536, now() + time::Duration::minutes(5))
            .unwrap();
        assert!(later.time_received);
        assert_eq!(
            later.event.id, e.id,
            "the receive time is not part of the id"
        );
        assert_eq!(
            later.legacy_id,
            Some(legacy_derive_id("s", "acme", "1", None))
        );
    }

    #[test]
    fn identity_decodes_v1_events() {
        let line = br#"{"id":"0192f7a4-6b1e-7c3d-9a2b-5f1e2d3c4b5a","tenant":"acme","occurred_at":"2026-11-22T10:15:30.123Z","action":"document.update","outcome":"success","actor":{"id":"u-42"},"source":"docs-api"}"#;
        let e = Mapping::Identity
            .apply("f", line, 65536, now())
            .unwrap()
            .event;
        assert_eq!(e.id.to_string(), "0192f7a4-6b1e-7c3d-9a2b-5f1e2d3c4b5a");
        let err = Mapping::Identity
            .apply("f", br#"{"id":"x"}"#, 65536, now())
            .unwrap_err();
        assert_eq!(err.kind, RefusalKind::Invalid);
        let err = Mapping::Identity
            .apply("f", b"nope", 65536, now())
            .unwrap_err();
        assert_eq!(err.kind, RefusalKind::NotJson);
    }
}
