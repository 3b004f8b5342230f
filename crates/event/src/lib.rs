//! The Auditbridge event model, format v1: the serde types of an audit event, the rules a
//! payload must pass to be stored, and a generator of realistic synthetic events.
//!
//! This crate does no I/O. Workers call [`decode`] on each message and [`Event::check_subject`]
//! with the subject it arrived on; every refusal is an [`Invalid`] whose [`InvalidKind`] is a
//! stable label for metrics and `dead_letters`, and whose detail names the field and what was
//! expected. Producers build an [`Event`], call [`Event::validate`], and publish it on
//! [`Event::subject`].
//!
//! - `model`: the types and the subject rules.
//! - `decode`: bytes to a valid event, with messages that name the field.
//! - `validate`: the value rules (tenant and action grammars, U+0000, addresses, lengths).
//! - [`limits`]: the size limits of the contract, and why the database can always take them.
//! - [`synth`]: synthetic traffic for `auditbridge publish --generate` and benchmarks.
//! - `arb` (feature `proptest`): strange but valid events for property tests.

#[cfg(any(test, feature = "proptest"))]
pub mod arb;
mod decode;
mod error;
pub mod limits;
mod model;
#[cfg(test)]
mod properties;
pub mod redact;
pub mod synth;
mod validate;

pub use decode::{decode, names_its_subject};
pub use error::{Invalid, InvalidKind};
pub use model::{Actor, Event, Outcome, Target, message_id};
/// Re-exported so users of the model need no direct `uuid` dependency.
pub use uuid::Uuid;
pub use validate::{validate_action, validate_tenant};

/// The default payload size limit (64 KiB), in bytes.
pub const DEFAULT_MAX_EVENT_BYTES: usize = 64 * 1024;

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The example of the design brief, "Event format v1", verbatim.
    pub(crate) const EXAMPLE: &str = r#"{
  "id": "0192f7a4-6b1e-7c3d-9a2b-5f1e2d3c4b5a",
  "tenant": "acme",
  "occurred_at": "2026-11-22T10:15:30.123Z",
  "action": "document.update",
  "outcome": "success",
  "actor": {"id": "u-42", "type": "user", "name": "Ada", "ip": "203.0.113.9", "user_agent": "curl/8"},
  "target": {"id": "doc-9", "type": "document", "name": "Q3 plan"},
  "source": "docs-api",
  "reason": "edited title",
  "request_id": "req-7f3a",
  "metadata": {"changes": {"title": ["old", "new"]}}
}"#;

    /// [`EXAMPLE`], built in code rather than parsed.
    pub(crate) fn example() -> Event {
        let metadata = serde_json::json!({"changes": {"title": ["old", "new"]}});
        Event {
            id: uuid::uuid!("0192f7a4-6b1e-7c3d-9a2b-5f1e2d3c4b5a"),
            tenant: "acme".into(),
            occurred_at: time::macros::datetime!(2026-11-22 10:15:30.123 UTC),
            action: "document.update".into(),
            outcome: Outcome::Success,
            actor: Actor {
                id: "u-42".into(),
                kind: Some("user".into()),
                name: Some("Ada".into()),
                ip: Some("203.0.113.9".into()),
                user_agent: Some("curl/8".into()),
            },
            target: Some(Target {
                id: Some("doc-9".into()),
                kind: Some("document".into()),
                name: Some("Q3 plan".into()),
            }),
            source: "docs-api".into(),
            reason: Some("edited title".into()),
            request_id: Some("req-7f3a".into()),
            metadata: metadata.as_object().cloned(),
        }
    }
}
