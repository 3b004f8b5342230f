//! The rules of the contract that types alone do not enforce.
//!
//! Serde has already checked the shape (required fields, types, unknown fields); these checks
//! look at the values. They are written by hand rather than with regular expressions: the
//! grammars are tiny, and hand-written checks can say exactly which character is wrong.

use std::net::IpAddr;

use serde_json::{Map, Value};

use crate::error::{Invalid, quoted};
use crate::limits;
use crate::model::Event;

const TENANT_GRAMMAR: &str = "[a-z0-9][a-z0-9_-]{0,62}";
const TENANT_MAX_LEN: usize = limits::TENANT_BYTES;
const ACTION_GRAMMAR: &str =
    "1 to 8 lowercase dot-separated tokens [a-z0-9_-]{1,63}, at most 191 bytes in all";
const ACTION_MAX_TOKENS: usize = limits::ACTION_TOKENS;

impl Event {
    /// Checks every rule of the contract. [`crate::decode`] calls it; code that builds events
    /// should call it before publishing.
    pub fn validate(&self) -> Result<(), Invalid> {
        if self.id.is_nil() {
            return Err(Invalid::schema("id: must not be the nil UUID"));
        }
        validate_tenant(&self.tenant)?;
        validate_timestamp(self.occurred_at)?;
        validate_action(&self.action)?;
        // `outcome` admits only valid values by its type.

        required_text("actor.id", &self.actor.id, limits::ID_BYTES)?;
        optional_text("actor.type", self.actor.kind.as_deref(), limits::TYPE_BYTES)?;
        optional_text("actor.name", self.actor.name.as_deref(), limits::NAME_BYTES)?;
        if let Some(ip) = &self.actor.ip
            && ip.parse::<IpAddr>().is_err()
        {
            return Err(Invalid::schema(format!(
                "actor.ip: expected an IPv4 or IPv6 address, got {}",
                quoted(ip)
            )));
        }
        optional_text(
            "actor.user_agent",
            self.actor.user_agent.as_deref(),
            limits::USER_AGENT_BYTES,
        )?;

        if let Some(target) = &self.target {
            optional_text("target.id", target.id.as_deref(), limits::ID_BYTES)?;
            optional_text("target.type", target.kind.as_deref(), limits::TYPE_BYTES)?;
            optional_text("target.name", target.name.as_deref(), limits::NAME_BYTES)?;
        }

        required_text("source", &self.source, limits::SOURCE_BYTES)?;
        optional_text("reason", self.reason.as_deref(), limits::REASON_BYTES)?;
        optional_text("request_id", self.request_id.as_deref(), limits::ID_BYTES)?;
        if let Some(metadata) = &self.metadata {
            let mut path = String::from("metadata");
            storable_object(&mut path, metadata, 0)?;
        }
        Ok(())
    }
}

/// Checks a tenant name: `[a-z0-9][a-z0-9_-]{0,62}`.
pub fn validate_tenant(tenant: &str) -> Result<(), Invalid> {
    if tenant.is_empty() {
        return Err(Invalid::schema("tenant: must not be empty"));
    }
    // Characters first: once they are all ASCII, the length in bytes is the length in
    // characters.
    let why = if let Some((i, c)) = tenant.char_indices().find(|&(_, c)| !is_token_char(c)) {
        Some(format!("{} at position {i} is not allowed", char_name(c)))
    } else if tenant.len() > TENANT_MAX_LEN {
        Some(format!(
            "{} characters, at most {TENANT_MAX_LEN}",
            tenant.len()
        ))
    } else if !tenant.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit()) {
        Some("must start with a lowercase letter or a digit".to_owned())
    } else {
        None
    };
    match why {
        None => Ok(()),
        Some(why) => Err(Invalid::schema(format!(
            "tenant: expected {TENANT_GRAMMAR}, got {} ({why})",
            quoted(tenant)
        ))),
    }
}

/// Checks an action: 1 to 8 lowercase dot-separated tokens, each `[a-z0-9_-]+`.
pub fn validate_action(action: &str) -> Result<(), Invalid> {
    if action.is_empty() {
        return Err(Invalid::schema("action: must not be empty"));
    }
    let mut why = None;
    let mut tokens = 0;
    for token in action.split('.') {
        tokens += 1;
        if token.is_empty() {
            why = Some(format!("token {tokens} is empty"));
            break;
        }
        if let Some(c) = token.chars().find(|&c| !is_token_char(c)) {
            why = Some(format!("{} in token {tokens} is not allowed", char_name(c)));
            break;
        }
        if token.len() > limits::ACTION_TOKEN_BYTES {
            why = Some(format!(
                "token {tokens} is {} bytes, at most {}",
                token.len(),
                limits::ACTION_TOKEN_BYTES
            ));
            break;
        }
    }
    if why.is_none() && tokens > ACTION_MAX_TOKENS {
        why = Some(format!("{tokens} tokens, at most {ACTION_MAX_TOKENS}"));
    }
    if why.is_none() && action.len() > limits::ACTION_BYTES {
        why = Some(format!(
            "{} bytes, at most {}",
            action.len(),
            limits::ACTION_BYTES
        ));
    }
    match why {
        None => Ok(()),
        Some(why) => Err(Invalid::schema(format!(
            "action: expected {ACTION_GRAMMAR}, got {} ({why})",
            quoted(action)
        ))),
    }
}

fn is_token_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-'
}

fn char_name(c: char) -> String {
    if c.is_ascii_uppercase() {
        format!("uppercase {c:?}")
    } else {
        format!("character {c:?}")
    }
}

/// RFC 3339 can only write years 0000 to 9999 and offsets in whole minutes; an event built in
/// code with anything else could not be serialized. PostgreSQL reads no year 0000 (it counts
/// 1 BC, 1 AD), keeps microseconds, and stores the instant: `9999-12-31T23:59:59-05:00` is
/// the year 10000 in UTC, which the `time` crate cannot hold: sqlx panics encoding it (the
/// writer's `INSERT` path, seen in `tests/tests/e2e/limits.rs`), and it could not be read back.
/// So the time must lie in the years 0001 to 9999 both as written and in UTC, rounded to the
/// microsecond.
pub(crate) fn validate_timestamp(t: time::OffsetDateTime) -> Result<(), Invalid> {
    let years = 1..=9999;
    let utc_year = t
        .checked_to_offset(time::UtcOffset::UTC)
        .and_then(|utc| {
            // PostgreSQL rounds to the microsecond; .9999995 s on the last day rounds into
            // the year 10000.
            match utc.nanosecond() % 1000 {
                sub @ 500.. => utc.checked_add(time::Duration::nanoseconds(i64::from(1000 - sub))),
                _ => Some(utc),
            }
        })
        .map(|utc| utc.year());
    let in_range = years.contains(&t.year()) && utc_year.is_some_and(|y| years.contains(&y));
    // PostgreSQL refuses offsets of 16 hours or more ("time zone displacement out of range");
    // the widest in use is +14:00.
    let offset = t.offset();
    let offset_ok = offset.seconds_past_minute() == 0 && offset.whole_hours().abs() < 16;
    if !in_range || !offset_ok {
        return Err(Invalid::schema(format!(
            "occurred_at: expected a time between the years 0001 and 9999, as written and \
             in UTC, with an offset in whole minutes of at most 15:59, got {t}"
        )));
    }
    Ok(())
}

fn required_text(field: &str, value: &str, limit: usize) -> Result<(), Invalid> {
    if value.is_empty() {
        return Err(Invalid::schema(format!("{field}: must not be empty")));
    }
    if value.trim().is_empty() {
        return Err(Invalid::schema(format!(
            "{field}: must not be blank, got {}",
            quoted(value)
        )));
    }
    bounded(field, value, limit)?;
    storable(field, value)
}

fn optional_text(field: &str, value: Option<&str>, limit: usize) -> Result<(), Invalid> {
    match value {
        Some(value) => {
            bounded(field, value, limit)?;
            storable(field, value)
        }
        None => Ok(()),
    }
}

/// The length rule of every string field (see [`crate::limits`]): bytes of UTF-8.
fn bounded(field: &str, value: &str, limit: usize) -> Result<(), Invalid> {
    if value.len() > limit {
        return Err(Invalid::schema(format!(
            "{field}: {} bytes, at most {limit} bytes of UTF-8",
            value.len()
        )));
    }
    Ok(())
}

/// PostgreSQL `text` and `jsonb` cannot hold U+0000, and the event is stored in both.
fn storable(path: &str, value: &str) -> Result<(), Invalid> {
    if value.contains('\0') {
        return Err(nul_error(path, ""));
    }
    Ok(())
}

fn nul_error(path: &str, what: &str) -> Invalid {
    Invalid::schema(format!(
        "{path}: {what}contains U+0000, which PostgreSQL cannot store"
    ))
}

/// Walks a JSON object, keys and values, building the path only as deep as it goes.
/// `depth` is the number of objects and arrays above this one, below `metadata`.
fn storable_object(
    path: &mut String,
    object: &Map<String, Value>,
    depth: usize,
) -> Result<(), Invalid> {
    for (key, value) in object {
        let len = path.len();
        push_key(path, key);
        if key.contains('\0') {
            return Err(nul_error(path, "key "));
        }
        storable_value(path, value, depth + 1)?;
        path.truncate(len);
    }
    Ok(())
}

fn storable_value(path: &mut String, value: &Value, depth: usize) -> Result<(), Invalid> {
    if matches!(value, Value::Object(_) | Value::Array(_)) && depth > limits::METADATA_DEPTH {
        return Err(Invalid::schema(format!(
            "{path}: nested deeper than {} levels below metadata",
            limits::METADATA_DEPTH
        )));
    }
    match value {
        Value::String(s) => storable(path, s),
        Value::Object(object) => storable_object(path, object, depth),
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                storable_value(path, item, depth + 1)?;
                path.truncate(len);
            }
            Ok(())
        }
        Value::Null | Value::Bool(_) | Value::Number(_) => Ok(()),
    }
}

/// `.key` for plain keys, `["odd key"]` for the others, so the path stays unambiguous.
fn push_key(path: &mut String, key: &str) {
    if !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        path.push('.');
        path.push_str(key);
    } else {
        path.push('[');
        path.push_str(&quoted(key));
        path.push(']');
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::InvalidKind;
    use crate::limits;
    use crate::tests::example;

    fn refused(result: Result<(), Invalid>) -> String {
        let err = result.unwrap_err();
        assert_eq!(err.kind, InvalidKind::Schema, "{err}");
        err.detail
    }

    #[test]
    fn tenant_accepts_the_grammar() {
        for tenant in ["a", "0", "acme", "tenant-07", "a_b-c", "9lives", "a-", "a_"] {
            validate_tenant(tenant).unwrap();
        }
        validate_tenant(&"a".repeat(63)).unwrap();
    }

    #[test]
    fn tenant_of_64_characters_is_refused() {
        let detail = refused(validate_tenant(&"a".repeat(64)));
        assert!(detail.contains("64 characters, at most 63"), "{detail}");
    }

    #[test]
    fn tenant_must_start_with_letter_or_digit() {
        for tenant in ["-acme", "_acme"] {
            let detail = refused(validate_tenant(tenant));
            assert!(detail.contains("must start with"), "{detail}");
        }
    }

    #[test]
    fn tenant_uppercase_is_refused_with_the_expected_message() {
        let detail = refused(validate_tenant("Acme"));
        assert!(
            detail.starts_with(r#"tenant: expected [a-z0-9][a-z0-9_-]{0,62}, got "Acme""#),
            "{detail}"
        );
        assert!(detail.contains("uppercase 'A' at position 0"), "{detail}");
    }

    #[test]
    fn tenant_other_characters_are_refused() {
        for tenant in [
            "ac me", "acme.eu", "acmé", "acme*", "acme>", " acme", "ac\0me",
        ] {
            refused(validate_tenant(tenant));
        }
        assert_eq!(refused(validate_tenant("")), "tenant: must not be empty");
        refused(validate_tenant("   "));
    }

    #[test]
    fn action_accepts_1_to_8_tokens() {
        for action in [
            "login",
            "user.login",
            "api_key.create",
            "a-b.c_d.0",
            "x.y.z",
        ] {
            validate_action(action).unwrap();
        }
        validate_action("a.b.c.d.e.f.g.h").unwrap();
    }

    #[test]
    fn action_of_9_tokens_is_refused() {
        let detail = refused(validate_action("a.b.c.d.e.f.g.h.i"));
        assert!(detail.contains("9 tokens, at most 8"), "{detail}");
    }

    #[test]
    fn action_empty_tokens_are_refused() {
        for (action, token) in [("a..b", 2), (".a", 1), ("a.", 2), (".", 1)] {
            let detail = refused(validate_action(action));
            assert!(
                detail.contains(&format!("token {token} is empty")),
                "{action}: {detail}"
            );
        }
        assert_eq!(refused(validate_action("")), "action: must not be empty");
    }

    #[test]
    fn action_uppercase_and_spaces_are_refused() {
        let detail = refused(validate_action("document.Update"));
        assert!(detail.starts_with("action: expected"), "{detail}");
        assert!(detail.contains("uppercase 'U' in token 2"), "{detail}");
        let detail = refused(validate_action("document update"));
        assert!(detail.contains("character ' '"), "{detail}");
        for action in ["user.*", "user.>", " user", "user\t"] {
            refused(validate_action(action));
        }
    }

    #[test]
    fn the_example_is_valid() {
        example().validate().unwrap();
    }

    #[test]
    fn nil_id_is_refused() {
        let mut event = example();
        event.id = uuid::Uuid::nil();
        assert_eq!(refused(event.validate()), "id: must not be the nil UUID");
    }

    #[test]
    fn required_text_must_not_be_empty_or_blank() {
        let mut event = example();
        event.actor.id = String::new();
        assert_eq!(refused(event.validate()), "actor.id: must not be empty");
        event.actor.id = " \t".to_owned();
        assert!(refused(event.validate()).starts_with("actor.id: must not be blank"));

        let mut event = example();
        event.source = String::new();
        assert_eq!(refused(event.validate()), "source: must not be empty");
        event.source = "\n".to_owned();
        assert!(refused(event.validate()).starts_with("source: must not be blank"));
    }

    #[test]
    fn actor_ip_must_parse() {
        let mut event = example();
        for ip in ["198.51.100.7", "2001:db8::1", "::1"] {
            event.actor.ip = Some(ip.to_owned());
            event.validate().unwrap();
        }
        for ip in [
            "999.1.1.1",
            "203.0.113.9:443",
            "localhost",
            "",
            "2001:db8::g",
        ] {
            event.actor.ip = Some(ip.to_owned());
            let detail = refused(event.validate());
            assert!(
                detail.starts_with("actor.ip: expected an IPv4 or IPv6 address, got"),
                "{detail}"
            );
        }
    }

    fn target(event: &mut Event) -> &mut crate::Target {
        event.target.as_mut().unwrap()
    }

    #[test]
    fn nul_is_refused_in_every_string_field() {
        type Set = fn(&mut Event);
        let cases: [(&str, Set); 10] = [
            ("actor.id", |e| e.actor.id = "u\0".into()),
            ("actor.type", |e| e.actor.kind = Some("\0".into())),
            ("actor.name", |e| e.actor.name = Some("A\0da".into())),
            ("actor.user_agent", |e| {
                e.actor.user_agent = Some("\0".into());
            }),
            ("target.id", |e| target(e).id = Some("\0".into())),
            ("target.type", |e| target(e).kind = Some("\0".into())),
            ("target.name", |e| target(e).name = Some("\0".into())),
            ("source", |e| e.source = "docs\0".into()),
            ("reason", |e| e.reason = Some("\0".into())),
            ("request_id", |e| e.request_id = Some("\0".into())),
        ];
        for (field, set) in cases {
            let mut event = example();
            set(&mut event);
            assert_eq!(
                refused(event.validate()),
                format!("{field}: contains U+0000, which PostgreSQL cannot store")
            );
        }
    }

    #[test]
    fn nul_in_nested_metadata_is_refused_with_its_path() {
        let mut event = example();
        event.metadata = serde_json::json!({
            "changes": {"title": ["old", "n\u{0}ew"]},
        })
        .as_object()
        .cloned();
        assert_eq!(
            refused(event.validate()),
            "metadata.changes.title[1]: contains U+0000, which PostgreSQL cannot store"
        );

        event.metadata = serde_json::json!({"a": [{"b c": {"k\u{0}": 1}}]})
            .as_object()
            .cloned();
        assert_eq!(
            refused(event.validate()),
            r#"metadata.a[0]["b c"]["k\0"]: key contains U+0000, which PostgreSQL cannot store"#
        );
    }

    #[test]
    fn metadata_without_nul_is_fine() {
        let mut event = example();
        event.metadata = serde_json::json!({
            "n": null, "b": true, "x": 1.5, "list": [[], {}, "ok"], "": {"é": "ü"},
        })
        .as_object()
        .cloned();
        event.validate().unwrap();
    }

    #[test]
    fn unrepresentable_timestamps_are_refused() {
        let mut event = example();
        event.occurred_at = event
            .occurred_at
            .to_offset(time::UtcOffset::from_hms(1, 0, 30).unwrap());
        assert!(refused(event.validate()).starts_with("occurred_at: expected"));

        let mut event = example();
        event.occurred_at = event.occurred_at.replace_year(-1).unwrap();
        assert!(refused(event.validate()).starts_with("occurred_at: expected"));
    }

    #[test]
    fn action_tokens_and_the_whole_action_are_bounded() {
        validate_action(&"a".repeat(63)).unwrap();
        let detail = refused(validate_action(&format!("ok.{}", "a".repeat(64))));
        assert!(
            detail.contains("(token 2 is 64 bytes, at most 63)"),
            "{detail}"
        );
        // Five tokens of 60 made a routing key RabbitMQ cannot take (issue 9).
        let five = vec!["a".repeat(60); 5].join(".");
        let detail = refused(validate_action(&five));
        assert!(detail.contains("(304 bytes, at most 191)"), "{detail}");
        let longest = format!("{}.{}.{}", "a".repeat(63), "b".repeat(63), "c".repeat(63));
        assert_eq!(longest.len(), limits::ACTION_BYTES);
        validate_action(&longest).unwrap();
        // The default routing key fits AMQP's short string.
        assert_eq!(limits::TENANT_BYTES + 1 + limits::ACTION_BYTES, 255);
    }

    #[test]
    fn string_fields_are_bounded_in_bytes_not_characters() {
        let mut event = example();
        event.actor.id = "é".repeat(512);
        event.validate().unwrap();
        event.actor.id.push('a');
        assert_eq!(
            refused(event.validate()),
            "actor.id: 1025 bytes, at most 1024 bytes of UTF-8"
        );
        let mut event = example();
        event.reason = Some("x".repeat(limits::REASON_BYTES + 1));
        assert_eq!(
            refused(event.validate()),
            "reason: 4097 bytes, at most 4096 bytes of UTF-8"
        );
    }

    #[test]
    fn times_postgres_cannot_store_or_read_back_are_refused() {
        use time::macros::datetime;
        let accepted = [
            datetime!(0001-01-01 00:00 UTC),
            datetime!(9999-12-31 23:59:59.999_999 UTC),
            datetime!(9999-12-31 23:59:59.999_999_499 UTC),
            datetime!(9999-12-31 18:59:59 -05:00),
            datetime!(0001-01-01 00:00 -01:00),
            datetime!(2026-01-01 00:00 +15:59),
            datetime!(2026-01-01 00:00 -15:59),
        ];
        for t in accepted {
            let mut event = example();
            event.occurred_at = t;
            event.validate().unwrap_or_else(|e| panic!("{t}: {e}"));
        }
        let refused_times = [
            // The year 10000 in UTC: stored by PostgreSQL, unreadable by sqlx.
            datetime!(9999-12-31 23:59:59 -05:00),
            // Rounds to the microsecond into the year 10000.
            datetime!(9999-12-31 23:59:59.999_999_5 UTC),
            // PostgreSQL reads no year 0000.
            datetime!(0000-06-01 00:00 UTC),
            // The year 0000 in UTC.
            datetime!(0001-01-01 00:30 +01:00),
            // PostgreSQL refuses offsets of 16 hours and more (RFC 3339 allows 23:59).
            datetime!(2026-01-01 00:00 +16:00),
            datetime!(2026-01-01 00:00 -23:59),
        ];
        for t in refused_times {
            let mut event = example();
            event.occurred_at = t;
            let detail = refused(event.validate());
            assert!(
                detail.starts_with("occurred_at: expected a time between the years 0001 and 9999"),
                "{t}: {detail}"
            );
        }
    }
}
