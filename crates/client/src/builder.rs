//! [`EventBuilder`]: valid events without writing the struct out.

use auditbridge_event::{Actor, Event, Outcome, Target, Uuid};
use serde_json::{Map, Value};
use time::OffsetDateTime;

use crate::error::BuildError;

/// Builds a valid [`Event`]. The id defaults to a fresh UUIDv7 and `occurred_at` to now;
/// `actor`, `outcome` and `source` must be set (a [`crate::Client`] sets `source` for you).
///
/// ```
/// use auditbridge_client::{EventBuilder, Outcome};
///
/// let event = EventBuilder::new("acme", "document.update")
///     .actor("u-42")
///     .actor_ip("203.0.113.9")
///     .target("doc-9")
///     .target_type("document")
///     .outcome(Outcome::Success)
///     .source("docs-api")
///     .meta("fields", serde_json::json!(["title"]))
///     .build()?;
/// assert_eq!(event.id.get_version_num(), 7);
///
/// let err = EventBuilder::new("Acme", "document.update")
///     .actor("u-42")
///     .outcome(Outcome::Success)
///     .source("docs-api")
///     .build()
///     .unwrap_err();
/// assert!(err.to_string().starts_with("tenant: expected"));
/// # Ok::<(), auditbridge_client::BuildError>(())
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct EventBuilder {
    id: Option<Uuid>,
    tenant: String,
    action: String,
    occurred_at: Option<OffsetDateTime>,
    outcome: Option<Outcome>,
    actor: Actor,
    target: Option<Target>,
    source: Option<String>,
    reason: Option<String>,
    request_id: Option<String>,
    metadata: Option<Map<String, Value>>,
}

impl EventBuilder {
    /// An event of `tenant` (`[a-z0-9][a-z0-9_-]{0,62}`) about `action` (lowercase
    /// dot-separated tokens, e.g. `document.update`).
    pub fn new(tenant: impl Into<String>, action: impl Into<String>) -> EventBuilder {
        EventBuilder {
            id: None,
            tenant: tenant.into(),
            action: action.into(),
            occurred_at: None,
            outcome: None,
            actor: Actor::default(),
            target: None,
            source: None,
            reason: None,
            request_id: None,
            metadata: None,
        }
    }

    /// Overrides the generated UUIDv7 (e.g. to make a retried request idempotent).
    pub fn id(mut self, id: Uuid) -> Self {
        self.id = Some(id);
        self
    }

    /// Overrides "now".
    pub fn occurred_at(mut self, at: OffsetDateTime) -> Self {
        self.occurred_at = Some(at);
        self
    }

    pub fn outcome(mut self, outcome: Outcome) -> Self {
        self.outcome = Some(outcome);
        self
    }

    /// `actor.id`: who did it.
    pub fn actor(mut self, id: impl Into<String>) -> Self {
        self.actor.id = id.into();
        self
    }

    /// `actor.type`, e.g. `user` or `service`.
    pub fn actor_type(mut self, kind: impl Into<String>) -> Self {
        self.actor.kind = Some(kind.into());
        self
    }

    pub fn actor_name(mut self, name: impl Into<String>) -> Self {
        self.actor.name = Some(name.into());
        self
    }

    /// `actor.ip`: an IPv4 or IPv6 address.
    pub fn actor_ip(mut self, ip: impl Into<String>) -> Self {
        self.actor.ip = Some(ip.into());
        self
    }

    pub fn actor_user_agent(mut self, user_agent: impl Into<String>) -> Self {
        self.actor.user_agent = Some(user_agent.into());
        self
    }

    /// `target.id`: what it was done to.
    pub fn target(mut self, id: impl Into<String>) -> Self {
        self.target.get_or_insert_default().id = Some(id.into());
        self
    }

    /// `target.type`, e.g. `document`.
    pub fn target_type(mut self, kind: impl Into<String>) -> Self {
        self.target.get_or_insert_default().kind = Some(kind.into());
        self
    }

    pub fn target_name(mut self, name: impl Into<String>) -> Self {
        self.target.get_or_insert_default().name = Some(name.into());
        self
    }

    /// The service that emits the event.
    pub fn source(mut self, source: impl Into<String>) -> Self {
        self.source = Some(source.into());
        self
    }

    pub fn reason(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(reason.into());
        self
    }

    pub fn request_id(mut self, request_id: impl Into<String>) -> Self {
        self.request_id = Some(request_id.into());
        self
    }

    /// Replaces `metadata` with `metadata`.
    pub fn metadata(mut self, metadata: Map<String, Value>) -> Self {
        self.metadata = Some(metadata);
        self
    }

    /// Sets one key of `metadata`.
    pub fn meta(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.metadata
            .get_or_insert_default()
            .insert(key.into(), value.into());
        self
    }

    /// The event, checked by the same rules the worker applies ([`Event::validate`]).
    pub fn build(self) -> Result<Event, BuildError> {
        if self.actor.id.is_empty() {
            return Err(BuildError::Missing { field: "actor.id" });
        }
        let Some(outcome) = self.outcome else {
            return Err(BuildError::Missing { field: "outcome" });
        };
        let Some(source) = self.source else {
            return Err(BuildError::Missing { field: "source" });
        };
        let event = Event {
            id: self.id.unwrap_or_else(Uuid::now_v7),
            tenant: self.tenant,
            occurred_at: self.occurred_at.unwrap_or_else(now),
            action: self.action,
            outcome,
            actor: self.actor,
            target: self.target,
            source,
            reason: self.reason,
            request_id: self.request_id,
            metadata: self.metadata,
        };
        event.validate()?;
        Ok(event)
    }
}

/// Now, to the millisecond: what RFC 3339 timestamps in the trail usually carry.
fn now() -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    now.replace_nanosecond(now.nanosecond() / 1_000_000 * 1_000_000)
        .unwrap_or(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> EventBuilder {
        EventBuilder::new("acme", "user.login")
            .actor("u-1")
            .outcome(Outcome::Success)
            .source("auth")
    }

    #[test]
    fn defaults_are_a_v7_id_and_now() {
        let before = OffsetDateTime::now_utc() - time::Duration::milliseconds(1);
        let a = valid().build().unwrap();
        let b = valid().build().unwrap();
        assert_eq!(a.id.get_version_num(), 7);
        assert!(a.id < b.id, "v7 ids are time-ordered");
        assert!(a.occurred_at >= before && a.occurred_at <= OffsetDateTime::now_utc());
        assert_eq!(a.subject("audit"), "audit.acme.user.login");
    }

    #[test]
    fn every_field_lands_where_it_belongs() {
        let id = Uuid::now_v7();
        let at = time::macros::datetime!(2026-11-22 10:15:30.123 UTC);
        let event = valid()
            .id(id)
            .occurred_at(at)
            .actor_type("user")
            .actor_name("Ada")
            .actor_ip("2001:db8::1")
            .actor_user_agent("curl/8")
            .target("doc-9")
            .target_type("document")
            .target_name("Q3 plan")
            .reason("edited title")
            .request_id("req-1")
            .meta("n", 1)
            .build()
            .unwrap();
        assert_eq!((event.id, event.occurred_at), (id, at));
        assert_eq!(event.actor.name.as_deref(), Some("Ada"));
        assert_eq!(event.target.unwrap().kind.as_deref(), Some("document"));
        assert_eq!(event.metadata.unwrap()["n"], 1);
    }

    #[test]
    fn missing_required_fields_are_named() {
        let missing = |b: EventBuilder| b.build().unwrap_err().to_string();
        assert_eq!(
            missing(EventBuilder::new("acme", "x").outcome(Outcome::Denied)),
            "actor.id: required field is missing"
        );
        assert_eq!(
            missing(EventBuilder::new("acme", "x").actor("u")),
            "outcome: required field is missing"
        );
        assert_eq!(
            missing(
                EventBuilder::new("acme", "x")
                    .actor("u")
                    .outcome(Outcome::Failure)
            ),
            "source: required field is missing"
        );
    }

    #[test]
    fn the_workers_rules_apply() {
        let err = |b: EventBuilder| b.build().unwrap_err().to_string();
        assert!(err(valid().actor_ip("localhost")).starts_with("actor.ip: expected"));
        let mut b = valid();
        b.action = "Document.Update".into();
        assert!(err(b).starts_with("action: expected"));
        assert!(err(valid().reason("a\0b")).starts_with("reason: contains U+0000"));
        assert!(err(valid().actor(" ")).starts_with("actor.id: must not be blank"));
    }
}
