//! The event model v1: the types a payload decodes into, and the subject an event belongs on.
//!
//! The serde attributes here are the wire format. Two details are stricter than plain
//! `derive(Deserialize)`, because serde's defaults accept shapes the contract does not:
//! `actor` and `target` must be JSON objects (a derived struct also accepts an array of its
//! fields in order), and `outcome` must be a string (a derived enum also accepts
//! `{"success": null}`).

use std::fmt;
use std::str::FromStr;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};

use crate::error::{Invalid, InvalidKind, quoted};

/// One audit event: who did what to which resource, in which tenant, with what outcome.
///
/// Build one in code, then call [`Event::validate`] before publishing it; [`crate::decode`]
/// does both the parsing and the validation for a payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Event {
    /// The idempotency key (UUIDv7 recommended: time-ordered ids keep indexes append-mostly).
    pub id: uuid::Uuid,
    /// `[a-z0-9][a-z0-9_-]{0,62}`; the second token of the subject.
    pub tenant: String,
    #[serde(with = "time::serde::rfc3339")]
    pub occurred_at: time::OffsetDateTime,
    /// Lowercase dot-separated tokens, e.g. `document.update`; the rest of the subject.
    pub action: String,
    pub outcome: Outcome,
    #[serde(deserialize_with = "object_only")]
    pub actor: Actor,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "optional_object_only"
    )]
    pub target: Option<Target>,
    /// The service that observed and emitted the event.
    pub source: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// Any JSON object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
}

/// How the action ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Success,
    Failure,
    Denied,
    Unknown,
}

/// Who did it (CADF initiator).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Actor {
    pub id: String,
    /// E.g. `user`, `service`.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// An IPv4 or IPv6 address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_agent: Option<String>,
}

/// What it was done to.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// E.g. `document`, `invoice`.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl Outcome {
    /// Every outcome, in the order of the contract.
    pub const ALL: [Outcome; 4] = [
        Outcome::Success,
        Outcome::Failure,
        Outcome::Denied,
        Outcome::Unknown,
    ];

    const NAMES: &'static [&'static str] = &["success", "failure", "denied", "unknown"];

    /// The wire name: `success`, `failure`, `denied` or `unknown`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Failure => "failure",
            Outcome::Denied => "denied",
            Outcome::Unknown => "unknown",
        }
    }

    fn from_name(name: &str) -> Option<Outcome> {
        Outcome::ALL.into_iter().find(|o| o.as_str() == name)
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Parses a wire name, e.g. from a CLI flag or a destination filter.
impl FromStr for Outcome {
    type Err = Invalid;

    fn from_str(s: &str) -> Result<Outcome, Invalid> {
        Outcome::from_name(s).ok_or_else(|| {
            Invalid::schema(format!(
                "outcome: expected one of \"success\", \"failure\", \"denied\", \"unknown\", got {}",
                quoted(s)
            ))
        })
    }
}

impl<'de> Deserialize<'de> for Outcome {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Outcome, D::Error> {
        struct OutcomeVisitor;

        impl Visitor<'_> for OutcomeVisitor {
            type Value = Outcome;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("one of \"success\", \"failure\", \"denied\", \"unknown\"")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Outcome, E> {
                Outcome::from_name(v).ok_or_else(|| E::unknown_variant(v, Outcome::NAMES))
            }
        }

        deserializer.deserialize_str(OutcomeVisitor)
    }
}

impl Event {
    /// `<prefix>.<tenant>.<action>`, the subject this event is published on.
    pub fn subject(&self, prefix: &str) -> String {
        format!("{prefix}.{}.{}", self.tenant, self.action)
    }

    /// `<tenant>:<id>`, the `Nats-Msg-Id` every producer publishes this event with.
    ///
    /// Tenant-scoped because JetStream's duplicate window is per stream: with the bare id, a
    /// producer of one tenant that published first with the id another tenant's event will
    /// carry would have that event dropped as a "duplicate" before any worker saw it.
    pub fn message_id(&self) -> String {
        message_id(&self.tenant, self.id)
    }

    /// Checks that a message arrived on its own subject, `<prefix>.<tenant>.<action>`.
    ///
    /// This is what lets NATS permissions (`publish: audit.acme.>`) enforce tenant isolation:
    /// a producer allowed only on `audit.acme.>` cannot slip in an event claiming `globex`.
    pub fn check_subject(&self, prefix: &str, subject: &str) -> Result<(), Invalid> {
        // Compared piece by piece so that the common, matching case allocates nothing.
        let rest = subject
            .strip_prefix(prefix)
            .and_then(|r| r.strip_prefix('.'));
        let Some(rest) = rest else {
            return Err(self.subject_mismatch(
                prefix,
                subject,
                &format!("it does not start with the prefix \"{prefix}.\""),
            ));
        };
        // A tenant has no dots, so the first token after the prefix is the tenant.
        let (tenant, action) = rest.split_once('.').unwrap_or((rest, ""));
        if tenant != self.tenant {
            let why = format!(
                "subject tenant {} differs from payload tenant {}",
                quoted(tenant),
                quoted(&self.tenant)
            );
            return Err(self.subject_mismatch(prefix, subject, &why));
        }
        if action != self.action {
            let why = format!(
                "subject action {} differs from payload action {}",
                quoted(action),
                quoted(&self.action)
            );
            return Err(self.subject_mismatch(prefix, subject, &why));
        }
        Ok(())
    }

    fn subject_mismatch(&self, prefix: &str, subject: &str, why: &str) -> Invalid {
        Invalid::new(
            InvalidKind::SubjectMismatch,
            format!(
                "subject {} does not match the payload, which belongs on {}: {why}",
                quoted(subject),
                quoted(&self.subject(prefix)),
            ),
        )
    }
}

/// `<tenant>:<id>`: see [`Event::message_id`].
pub fn message_id(tenant: &str, id: uuid::Uuid) -> String {
    format!("{tenant}:{id}")
}

/// Deserializes a struct from a JSON object only (see the module docs).
fn object_only<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(ObjectOnly(deserializer))
}

fn optional_object_only<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct Wrapped<T>(T);

    impl<'de, T: Deserialize<'de>> Deserialize<'de> for Wrapped<T> {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            object_only(deserializer).map(Wrapped)
        }
    }

    Option::<Wrapped<T>>::deserialize(deserializer).map(|o| o.map(|Wrapped(t)| t))
}

/// A deserializer that turns "a struct" into "a map": a derived struct's visitor handles both
/// a map and a sequence, and asking the inner deserializer for a map refuses the sequence.
struct ObjectOnly<D>(D);

impl<'de, D: Deserializer<'de>> Deserializer<'de> for ObjectOnly<D> {
    type Error = D::Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, D::Error> {
        self.0.deserialize_any(visitor)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.0.deserialize_map(visitor)
    }

    fn is_human_readable(&self) -> bool {
        self.0.is_human_readable()
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
        ignored_any
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::example;

    #[test]
    fn outcome_names_round_trip() {
        for outcome in Outcome::ALL {
            let json = serde_json::to_string(&outcome).unwrap();
            assert_eq!(json, format!("\"{}\"", outcome.as_str()));
            assert_eq!(serde_json::from_str::<Outcome>(&json).unwrap(), outcome);
            assert_eq!(outcome.as_str().parse::<Outcome>().unwrap(), outcome);
        }
        let err = "ok".parse::<Outcome>().unwrap_err();
        assert_eq!(err.kind, InvalidKind::Schema);
        assert!(err.detail.contains(r#"got "ok""#), "{err}");
    }

    #[test]
    fn outcome_only_from_a_string() {
        // A derived enum would accept these externally tagged forms.
        assert!(serde_json::from_str::<Outcome>(r#"{"success": null}"#).is_err());
        assert!(serde_json::from_str::<Outcome>(r#""Success""#).is_err());
    }

    #[test]
    fn actor_and_target_only_from_objects() {
        let mut value = serde_json::to_value(example()).unwrap();
        value["actor"] = serde_json::json!(["u-42", "user"]);
        assert!(serde_json::from_value::<Event>(value.clone()).is_err());

        value["actor"] = serde_json::json!({"id": "u-42"});
        value["target"] = serde_json::json!(["doc-9"]);
        assert!(serde_json::from_value::<Event>(value.clone()).is_err());

        value["target"] = serde_json::Value::Null;
        let event: Event = serde_json::from_value(value).unwrap();
        assert_eq!(event.target, None);
        assert_eq!(event.actor.id, "u-42");
    }

    #[test]
    fn subject_is_prefix_tenant_action() {
        assert_eq!(example().subject("audit"), "audit.acme.document.update");
        assert_eq!(example().subject("t.abc"), "t.abc.acme.document.update");
    }

    #[test]
    fn the_message_id_is_scoped_to_the_tenant() {
        let e = example();
        assert_eq!(e.message_id(), format!("acme:{}", e.id));
        let mut other = example();
        other.tenant = "globex".into();
        assert_ne!(
            e.message_id(),
            other.message_id(),
            "same id, another tenant"
        );
    }

    #[test]
    fn check_subject_accepts_its_own_subject() {
        let event = example();
        event
            .check_subject("audit", "audit.acme.document.update")
            .unwrap();
        event
            .check_subject("t.abc", "t.abc.acme.document.update")
            .unwrap();
    }

    fn mismatch(prefix: &str, subject: &str) -> String {
        let err = example().check_subject(prefix, subject).unwrap_err();
        assert_eq!(err.kind, InvalidKind::SubjectMismatch);
        // Both subjects are named.
        assert!(err.detail.contains(&format!("{subject:?}")), "{err}");
        assert!(
            err.detail
                .contains(&format!("{:?}", example().subject(prefix))),
            "{err}"
        );
        err.detail
    }

    #[test]
    fn check_subject_refuses_another_tenant() {
        let detail = mismatch("audit", "audit.globex.document.update");
        assert!(detail.contains(r#"subject tenant "globex""#), "{detail}");
        assert!(detail.contains(r#"payload tenant "acme""#), "{detail}");
    }

    #[test]
    fn check_subject_refuses_another_action() {
        let detail = mismatch("audit", "audit.acme.document.delete");
        assert!(
            detail.contains(r#"subject action "document.delete""#),
            "{detail}"
        );
        // A parent or child action is still another action.
        mismatch("audit", "audit.acme.document");
        mismatch("audit", "audit.acme.document.update.title");
        mismatch("audit", "audit.acme");
    }

    #[test]
    fn check_subject_refuses_another_prefix() {
        let detail = mismatch("audit", "audits.acme.document.update");
        assert!(detail.contains("prefix \"audit.\""), "{detail}");
        mismatch("audit", "other.acme.document.update");
        mismatch("audit", "acme.document.update");
    }

    #[test]
    fn check_subject_with_dotted_prefix() {
        let event = example();
        mismatch("t.abc", "audit.acme.document.update");
        mismatch("t.abc", "t.abd.acme.document.update");
        // The prefix "t" alone would read "abc" as the tenant.
        let err = event
            .check_subject("t", "t.abc.acme.document.update")
            .unwrap_err();
        assert!(err.detail.contains(r#"subject tenant "abc""#), "{err}");
    }
}
