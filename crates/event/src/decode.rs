//! From payload bytes to a valid [`Event`], or an [`Invalid`] a person can act on.
//!
//! The accepting path is one serde pass straight into [`Event`] plus [`Event::validate`].
//! Serde's data errors do not say which field they are about ("invalid type: null, expected
//! a string"), so only when that pass fails is the payload parsed again, into a
//! [`serde_json::Value`], and walked by [`diagnose`] to name the field. Bad payloads are rare;
//! paying twice for them keeps the common case fast.

use serde_json::error::Category;
use serde_json::{Map, Value};

use crate::error::{Invalid, InvalidKind, quoted};
use crate::limits;
use crate::model::{Event, Outcome};

/// Decodes and fully validates one payload: size limit first, then UTF-8, JSON syntax,
/// schema and every rule of [`Event::validate`].
pub fn decode(payload: &[u8], max_bytes: usize) -> Result<Event, Invalid> {
    if payload.len() > max_bytes {
        return Err(Invalid::new(
            InvalidKind::Oversize,
            format!(
                "payload is {} bytes, larger than the limit of {max_bytes} bytes",
                payload.len()
            ),
        ));
    }
    let text = std::str::from_utf8(payload).map_err(|e| {
        let what = match e.error_len() {
            Some(_) => "invalid",
            None => "incomplete",
        };
        Invalid::not_json(format!(
            "payload is not UTF-8: {what} byte sequence at byte {}",
            e.valid_up_to()
        ))
    })?;
    expect_object(text)?;
    let event: Event = serde_json::from_str(text).map_err(|e| match e.classify() {
        Category::Data => diagnose(text, &e),
        Category::Syntax | Category::Eof | Category::Io => not_json(&e),
    })?;
    event.validate()?;
    numbers_storable(text, max_bytes)?;
    Ok(event)
}

/// Refuses numbers that PostgreSQL's `jsonb` cannot store, or would store much larger than
/// written (see [`crate::limits`]): `jsonb` keeps a number as a `numeric`, every digit written
/// out, so `1e-20000` is refused (more than 16,383 digits after the point) and `1e-300`
/// becomes 302 characters. The parsed [`Event`] cannot tell (serde reads both as an `f64`),
/// so this looks at the text. It runs on JSON that serde has accepted as an event, where a
/// number can only be inside `metadata`.
fn numbers_storable(text: &str, max_bytes: usize) -> Result<(), Invalid> {
    let bytes = text.as_bytes();
    // The payload's length once every number is written out in full.
    let mut written_out = bytes.len();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                // Skip the string; the JSON is valid, so every escape is complete. A `\u0000`
                // is refused here too: validation checks the parsed values, and a key that
                // appears twice keeps only its last value there, while PostgreSQL's jsonb
                // parser reads (and refuses) both.
                i += 1;
                while bytes[i] != b'"' {
                    if bytes[i] == b'\\' {
                        if bytes[i + 1] == b'u' && bytes.get(i + 2..i + 6) == Some(b"0000") {
                            return Err(Invalid::schema(format!(
                                "payload: contains U+0000 (an escaped \\u0000 at byte {i}, in a \
                                 value serde may not keep, such as a repeated key), which \
                                 PostgreSQL cannot store"
                            )));
                        }
                        i += 2;
                    } else {
                        i += 1;
                    }
                }
                i += 1;
            }
            b'-' | b'0'..=b'9' => {
                let start = i;
                let number = scan_number(bytes, &mut i);
                let chars = number.written_out();
                if chars > limits::NUMBER_CHARS {
                    return Err(Invalid::schema(format!(
                        "metadata: the number {} at byte {start} is {chars} characters written \
                         out in full, as the database stores it; at most {}",
                        quoted(&text[start..i]),
                        limits::NUMBER_CHARS
                    )));
                }
                written_out = written_out - (i - start) + chars;
            }
            _ => i += 1,
        }
    }
    if written_out > max_bytes {
        return Err(Invalid::new(
            InvalidKind::Oversize,
            format!(
                "payload is {written_out} bytes with its numbers written out in full, as the \
                 database stores them, larger than the limit of {max_bytes} bytes"
            ),
        ));
    }
    Ok(())
}

/// The parts of a JSON number that decide how PostgreSQL writes it out.
struct NumberShape {
    negative: bool,
    /// Digits before the point, as written (at least one).
    int_digits: usize,
    /// Leading zeros of all the digits, before and after the point.
    leading_zeros: usize,
    /// Whether every digit is zero.
    zero: bool,
    /// Digits after the point, as written.
    frac_digits: usize,
    /// The exponent, saturated far beyond anything that fits.
    exponent: i64,
}

impl NumberShape {
    /// The length of `numeric_out`'s text for this number: the integer part without leading
    /// zeros (at least "0"), then a point and `max(0, frac_digits - exponent)` digits.
    fn written_out(&self) -> usize {
        let point = self.int_digits as i64 + self.exponent;
        let int_part = if self.zero {
            1
        } else {
            (point - self.leading_zeros as i64).max(1)
        };
        let scale = (self.frac_digits as i64 - self.exponent).max(0);
        let fraction = if scale > 0 { 1 + scale } else { 0 };
        let total = i64::from(self.negative) + int_part + fraction;
        usize::try_from(total).unwrap_or(usize::MAX)
    }
}

/// Reads one JSON number from `bytes[*i]` on, leaving `*i` after it.
fn scan_number(bytes: &[u8], i: &mut usize) -> NumberShape {
    let digits = |i: &mut usize| {
        let start = *i;
        while *i < bytes.len() && bytes[*i].is_ascii_digit() {
            *i += 1;
        }
        start..*i
    };
    let negative = bytes[*i] == b'-';
    if negative {
        *i += 1;
    }
    let int = digits(i);
    let frac = if bytes.get(*i) == Some(&b'.') {
        *i += 1;
        digits(i)
    } else {
        *i..*i
    };
    let mut exponent: i64 = 0;
    if matches!(bytes.get(*i), Some(b'e' | b'E')) {
        *i += 1;
        let sign = match bytes.get(*i) {
            Some(b'-') => {
                *i += 1;
                -1
            }
            Some(b'+') => {
                *i += 1;
                1
            }
            _ => 1,
        };
        for &d in &bytes[digits(i)] {
            // Saturates at about 10^15: far beyond any limit, and no overflow.
            exponent = (exponent * 10 + i64::from(d - b'0')).min(1_000_000_000_000_000);
        }
        exponent *= sign;
    }
    let all = bytes[int.clone()].iter().chain(&bytes[frac.clone()]);
    let leading_zeros = all.clone().take_while(|&&d| d == b'0').count();
    NumberShape {
        negative,
        int_digits: int.len(),
        leading_zeros,
        zero: leading_zeros == int.len() + frac.len(),
        frac_digits: frac.len(),
        exponent,
    }
}

fn not_json(e: &serde_json::Error) -> Invalid {
    Invalid::not_json(format!("payload is not valid JSON: {e}"))
}

/// Refuses JSON that is not an object before serde sees it: a derived struct would also
/// accept an array of its fields in order, and for a number serde would report a schema
/// error where the contract means "not an event at all".
fn expect_object(text: &str) -> Result<(), Invalid> {
    let first = text
        .bytes()
        .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'));
    let got = match first {
        None => return Err(Invalid::not_json("payload is empty")),
        Some(b'{') => return Ok(()),
        Some(b'[') => "an array",
        Some(b'"') => "a string",
        Some(b't' | b'f') => "a boolean",
        Some(b'n') => "null",
        Some(b'-' | b'0'..=b'9') => "a number",
        Some(_) => "something else",
    };
    // Tell "valid JSON, but not an object" from "not JSON at all".
    if let Err(e) = serde_json::from_str::<serde::de::IgnoredAny>(text) {
        return Err(not_json(&e));
    }
    Err(Invalid::not_json(format!(
        "payload must be a JSON object, got {got}"
    )))
}

/// Finds which field a serde data error is about. Mirrors what the serde attributes of
/// [`Event`] accept; if it finds nothing (a duplicate key, say), serde's message stands.
fn diagnose(text: &str, serde_error: &serde_json::Error) -> Invalid {
    match serde_json::from_str::<Value>(text) {
        // Serde reads as it goes, so a data error can come before a syntax error further on.
        Err(e) => not_json(&e),
        Ok(Value::Object(object)) => walk_event(&object).err().unwrap_or_else(|| {
            Invalid::schema(format!(
                "payload does not fit the event format: {serde_error}"
            ))
        }),
        Ok(_) => Invalid::not_json("payload must be a JSON object"),
    }
}

pub(crate) const EVENT_FIELDS: &[&str] = &[
    "id",
    "tenant",
    "occurred_at",
    "action",
    "outcome",
    "actor",
    "target",
    "source",
    "reason",
    "request_id",
    "metadata",
];
/// Whether a refusal's detail starts by naming what it refuses: a field of the format, the
/// payload itself, or an unknown field. Every refusal does (the property tests and the fuzz
/// target check it on whatever they generate).
pub fn names_its_subject(detail: &str) -> bool {
    EVENT_FIELDS
        .iter()
        .chain(&["payload", "unknown field"])
        .any(|s| {
            detail
                .strip_prefix(s)
                .is_some_and(|rest| rest.starts_with([':', '.', '[', ' ']))
        })
}
const ACTOR_FIELDS: &[&str] = &["id", "type", "name", "ip", "user_agent"];
const TARGET_FIELDS: &[&str] = &["id", "type", "name"];

fn walk_event(object: &Map<String, Value>) -> Result<(), Invalid> {
    known_fields("", object, EVENT_FIELDS)?;

    let id = required_string(object, "", "id")?;
    if let Err(e) = uuid::Uuid::parse_str(id) {
        return Err(Invalid::schema(format!(
            "id: expected a UUID, got {} ({e})",
            quoted(id)
        )));
    }
    required_string(object, "", "tenant")?;
    let occurred_at = required_string(object, "", "occurred_at")?;
    let format = &time::format_description::well_known::Rfc3339;
    if let Err(e) = time::OffsetDateTime::parse(occurred_at, format) {
        return Err(Invalid::schema(format!(
            "occurred_at: expected an RFC 3339 timestamp, got {} ({e})",
            quoted(occurred_at)
        )));
    }
    required_string(object, "", "action")?;
    required_string(object, "", "outcome")?.parse::<Outcome>()?;

    let actor = required_object(object, "", "actor")?;
    known_fields("actor", actor, ACTOR_FIELDS)?;
    required_string(actor, "actor.", "id")?;
    for field in &ACTOR_FIELDS[1..] {
        optional_string(actor, "actor.", field)?;
    }

    if let Some(target) = optional_object(object, "", "target")? {
        known_fields("target", target, TARGET_FIELDS)?;
        for field in TARGET_FIELDS {
            optional_string(target, "target.", field)?;
        }
    }

    required_string(object, "", "source")?;
    optional_string(object, "", "reason")?;
    optional_string(object, "", "request_id")?;
    optional_object(object, "", "metadata")?;
    Ok(())
}

fn known_fields(path: &str, object: &Map<String, Value>, fields: &[&str]) -> Result<(), Invalid> {
    let Some(unknown) = object.keys().find(|k| !fields.contains(&k.as_str())) else {
        return Ok(());
    };
    let expected: Vec<String> = fields.iter().map(|f| format!("\"{f}\"")).collect();
    let at = if path.is_empty() {
        String::new()
    } else {
        format!("{path}: ")
    };
    Err(Invalid::schema(format!(
        "{at}unknown field {} (expected one of {})",
        quoted(unknown),
        expected.join(", ")
    )))
}

fn required<'a>(
    object: &'a Map<String, Value>,
    path: &str,
    field: &str,
) -> Result<&'a Value, Invalid> {
    match object.get(field) {
        None => Err(Invalid::schema(format!(
            "{path}{field}: required field is missing"
        ))),
        Some(Value::Null) => Err(Invalid::schema(format!(
            "{path}{field}: required field is null"
        ))),
        Some(value) => Ok(value),
    }
}

fn required_string<'a>(
    object: &'a Map<String, Value>,
    path: &str,
    field: &str,
) -> Result<&'a str, Invalid> {
    match required(object, path, field)? {
        Value::String(s) => Ok(s),
        other => Err(wrong_type(path, field, "a string", other)),
    }
}

fn required_object<'a>(
    object: &'a Map<String, Value>,
    path: &str,
    field: &str,
) -> Result<&'a Map<String, Value>, Invalid> {
    match required(object, path, field)? {
        Value::Object(o) => Ok(o),
        other => Err(wrong_type(path, field, "a JSON object", other)),
    }
}

fn optional_string(object: &Map<String, Value>, path: &str, field: &str) -> Result<(), Invalid> {
    match object.get(field) {
        None | Some(Value::Null | Value::String(_)) => Ok(()),
        Some(other) => Err(wrong_type(path, field, "a string", other)),
    }
}

fn optional_object<'a>(
    object: &'a Map<String, Value>,
    path: &str,
    field: &str,
) -> Result<Option<&'a Map<String, Value>>, Invalid> {
    match object.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(o)) => Ok(Some(o)),
        Some(other) => Err(wrong_type(path, field, "a JSON object", other)),
    }
}

fn wrong_type(path: &str, field: &str, expected: &str, got: &Value) -> Invalid {
    let got = match got {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    };
    Invalid::schema(format!("{path}{field}: expected {expected}, got {got}"))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::DEFAULT_MAX_EVENT_BYTES;
    use crate::tests::{EXAMPLE, example};

    fn example_json() -> Value {
        serde_json::from_str(EXAMPLE).unwrap()
    }

    fn decode_value(value: &Value) -> Result<Event, Invalid> {
        decode(&serde_json::to_vec(value).unwrap(), DEFAULT_MAX_EVENT_BYTES)
    }

    /// Decodes `value`, expects a refusal of `kind`, returns its detail.
    fn refused(value: &Value, kind: InvalidKind) -> String {
        let err = decode_value(value).unwrap_err();
        assert_eq!(err.kind, kind, "{err}");
        err.detail
    }

    fn with(field: &str, value: Value) -> Value {
        let mut event = example_json();
        event[field] = value;
        event
    }

    #[test]
    fn the_design_doc_example_decodes() {
        let event = decode(EXAMPLE.as_bytes(), DEFAULT_MAX_EVENT_BYTES).unwrap();
        assert_eq!(event, example());
        assert_eq!(event.id.to_string(), "0192f7a4-6b1e-7c3d-9a2b-5f1e2d3c4b5a");
        assert_eq!(event.outcome, Outcome::Success);
        assert_eq!(event.actor.kind.as_deref(), Some("user"));
        assert_eq!(event.metadata.unwrap()["changes"]["title"][1], "new");
    }

    #[test]
    fn round_trip_serialize_decode_is_identity() {
        let event = example();
        let bytes = serde_json::to_vec(&event).unwrap();
        assert_eq!(decode(&bytes, DEFAULT_MAX_EVENT_BYTES).unwrap(), event);

        let mut minimal = example();
        minimal.target = None;
        minimal.reason = None;
        minimal.request_id = None;
        minimal.metadata = None;
        minimal.actor = crate::Actor {
            id: "u-1".into(),
            ..Default::default()
        };
        let bytes = serde_json::to_vec(&minimal).unwrap();
        let text = std::str::from_utf8(&bytes).unwrap();
        // Absent optional fields are left out, not written as null.
        assert!(!text.contains("null"), "{text}");
        assert_eq!(decode(&bytes, DEFAULT_MAX_EVENT_BYTES).unwrap(), minimal);
    }

    #[test]
    fn only_required_fields_decode() {
        let value = json!({
            "id": "0192f7a4-6b1e-7c3d-9a2b-5f1e2d3c4b5a",
            "tenant": "acme",
            "occurred_at": "2026-11-22T10:15:30Z",
            "action": "user.login",
            "outcome": "failure",
            "actor": {"id": "u-1"},
            "source": "auth",
        });
        let event = decode_value(&value).unwrap();
        assert_eq!(event.target, None);
        assert_eq!(event.metadata, None);
    }

    #[test]
    fn optional_fields_may_be_null() {
        let mut value = example_json();
        for field in ["target", "reason", "request_id", "metadata"] {
            value[field] = Value::Null;
        }
        value["actor"]["name"] = Value::Null;
        let event = decode_value(&value).unwrap();
        assert_eq!((event.target, event.reason), (None, None));
        assert_eq!(event.actor.name, None);
    }

    #[test]
    fn oversize_is_checked_first_at_the_exact_limit() {
        let len = EXAMPLE.len();
        decode(EXAMPLE.as_bytes(), len).unwrap();
        let err = decode(EXAMPLE.as_bytes(), len - 1).unwrap_err();
        assert_eq!(err.kind, InvalidKind::Oversize);
        assert_eq!(
            err.detail,
            format!(
                "payload is {len} bytes, larger than the limit of {} bytes",
                len - 1
            )
        );
        // Before anything else: garbage over the limit is oversize, not "not JSON".
        let garbage = vec![0xff; 11];
        assert_eq!(
            decode(&garbage, 10).unwrap_err().kind,
            InvalidKind::Oversize
        );
    }

    #[test]
    fn invalid_utf8_names_the_byte() {
        let mut bytes = br#"{"tenant": "ac"#.to_vec();
        bytes.push(0xff);
        bytes.extend_from_slice(br#"me"}"#);
        let err = decode(&bytes, DEFAULT_MAX_EVENT_BYTES).unwrap_err();
        assert_eq!(err.kind, InvalidKind::NotJson);
        assert_eq!(
            err.detail,
            "payload is not UTF-8: invalid byte sequence at byte 14"
        );

        let truncated = [b'{', b'"', 0xc3];
        let err = decode(&truncated, DEFAULT_MAX_EVENT_BYTES).unwrap_err();
        assert_eq!(
            err.detail,
            "payload is not UTF-8: incomplete byte sequence at byte 2"
        );
    }

    #[test]
    fn json_syntax_errors_keep_their_position() {
        let err = decode(br#"{"id": "x",}"#, DEFAULT_MAX_EVENT_BYTES).unwrap_err();
        assert_eq!(err.kind, InvalidKind::NotJson);
        assert!(
            err.detail.starts_with("payload is not valid JSON: "),
            "{err}"
        );
        assert!(err.detail.contains("line 1 column 12"), "{err}");

        for text in ["{", "{\"id\"", "{} trailing", "{\"a\": tru}", "\u{feff}{}"] {
            let err = decode(text.as_bytes(), DEFAULT_MAX_EVENT_BYTES).unwrap_err();
            assert_eq!(err.kind, InvalidKind::NotJson, "{text}: {err}");
        }
    }

    #[test]
    fn a_syntax_error_after_a_schema_error_is_not_json() {
        // Serde meets the unknown field first, but the payload is not JSON at all.
        let err = decode(br#"{"bogus": 1, "id": }"#, DEFAULT_MAX_EVENT_BYTES).unwrap_err();
        assert_eq!(err.kind, InvalidKind::NotJson, "{err}");
    }

    #[test]
    fn json_that_is_not_an_object_is_refused() {
        let cases = [
            ("[1, 2]", "an array"),
            ("42", "a number"),
            ("-1.5", "a number"),
            ("\"event\"", "a string"),
            ("true", "a boolean"),
            (" null ", "null"),
        ];
        for (text, got) in cases {
            let err = decode(text.as_bytes(), DEFAULT_MAX_EVENT_BYTES).unwrap_err();
            assert_eq!(err.kind, InvalidKind::NotJson, "{text}");
            assert_eq!(
                err.detail,
                format!("payload must be a JSON object, got {got}")
            );
        }
        // Even an array holding the fields in order, which serde alone would accept.
        let example = example();
        let array = json!([
            example.id, example.tenant, "2026-11-22T10:15:30Z", example.action, "success",
            {"id": "u-1"}, null, "docs-api", null, null, null
        ]);
        assert_eq!(
            refused(&array, InvalidKind::NotJson),
            "payload must be a JSON object, got an array"
        );

        for text in ["", "  \n"] {
            let err = decode(text.as_bytes(), DEFAULT_MAX_EVENT_BYTES).unwrap_err();
            assert_eq!(
                (err.kind, err.detail.as_str()),
                (InvalidKind::NotJson, "payload is empty")
            );
        }
    }

    #[test]
    fn every_required_field_is_required() {
        let cases = [
            ("id", None),
            ("tenant", None),
            ("occurred_at", None),
            ("action", None),
            ("outcome", None),
            ("actor", None),
            ("source", None),
            ("actor", Some("id")),
        ];
        for (field, inner) in cases {
            let mut value = example_json();
            let name = match inner {
                None => {
                    value.as_object_mut().unwrap().remove(field);
                    field.to_owned()
                }
                Some(inner) => {
                    value[field].as_object_mut().unwrap().remove(inner);
                    format!("{field}.{inner}")
                }
            };
            assert_eq!(
                refused(&value, InvalidKind::Schema),
                format!("{name}: required field is missing")
            );
        }
    }

    #[test]
    fn null_for_a_required_field_names_the_field() {
        for field in [
            "id",
            "tenant",
            "occurred_at",
            "action",
            "outcome",
            "actor",
            "source",
        ] {
            assert_eq!(
                refused(&with(field, Value::Null), InvalidKind::Schema),
                format!("{field}: required field is null")
            );
        }
        let mut value = example_json();
        value["actor"]["id"] = Value::Null;
        assert_eq!(
            refused(&value, InvalidKind::Schema),
            "actor.id: required field is null"
        );
    }

    #[test]
    fn wrong_types_name_the_field() {
        let cases = [
            (
                "tenant",
                json!(7),
                "tenant: expected a string, got a number",
            ),
            (
                "source",
                json!(["a"]),
                "source: expected a string, got an array",
            ),
            (
                "actor",
                json!("u-42"),
                "actor: expected a JSON object, got a string",
            ),
            (
                "actor",
                json!(["u-42"]),
                "actor: expected a JSON object, got an array",
            ),
            (
                "target",
                json!(["doc-9"]),
                "target: expected a JSON object, got an array",
            ),
            (
                "reason",
                json!(false),
                "reason: expected a string, got a boolean",
            ),
        ];
        for (field, value, expected) in cases {
            assert_eq!(refused(&with(field, value), InvalidKind::Schema), expected);
        }
        let mut value = example_json();
        value["actor"]["name"] = json!({"first": "Ada"});
        assert_eq!(
            refused(&value, InvalidKind::Schema),
            "actor.name: expected a string, got an object"
        );
    }

    #[test]
    fn metadata_must_be_an_object() {
        for (value, got) in [
            (json!([1]), "an array"),
            (json!("x"), "a string"),
            (json!(1), "a number"),
        ] {
            assert_eq!(
                refused(&with("metadata", value), InvalidKind::Schema),
                format!("metadata: expected a JSON object, got {got}")
            );
        }
        decode_value(&with("metadata", json!({}))).unwrap();
    }

    #[test]
    fn unknown_top_level_field_is_refused() {
        let mut value = example_json();
        let tenant = value.as_object_mut().unwrap().remove("tenant").unwrap();
        value["tenat"] = tenant;
        let detail = refused(&value, InvalidKind::Schema);
        assert!(
            detail.starts_with(r#"unknown field "tenat" (expected one of "id", "tenant", "#),
            "{detail}"
        );
        assert!(detail.ends_with(r#""metadata")"#), "{detail}");
    }

    #[test]
    fn unknown_actor_and_target_fields_are_refused() {
        let mut value = example_json();
        value["actor"]["email"] = json!("ada@example.com");
        let detail = refused(&value, InvalidKind::Schema);
        assert_eq!(
            detail,
            r#"actor: unknown field "email" (expected one of "id", "type", "name", "ip", "user_agent")"#
        );

        let mut value = example_json();
        value["target"]["kind"] = json!("document");
        let detail = refused(&value, InvalidKind::Schema);
        assert_eq!(
            detail,
            r#"target: unknown field "kind" (expected one of "id", "type", "name")"#
        );
    }

    #[test]
    fn duplicate_fields_are_refused() {
        let text = EXAMPLE.replacen(
            r#""tenant": "acme","#,
            r#""tenant": "acme", "tenant": "globex","#,
            1,
        );
        let err = decode(text.as_bytes(), DEFAULT_MAX_EVENT_BYTES).unwrap_err();
        assert_eq!(err.kind, InvalidKind::Schema);
        assert!(err.detail.contains("duplicate field"), "{err}");
    }

    #[test]
    fn id_must_be_a_uuid_of_any_version_but_nil() {
        for id in [
            "0192f7a4-6b1e-7c3d-9a2b-5f1e2d3c4b5a", // v7
            "f47ac10b-58cc-4372-a567-0e02b2c3d479", // v4
            "6ba7b810-9dad-11d1-80b4-00c04fd430c8", // v1
        ] {
            assert_eq!(
                decode_value(&with("id", json!(id))).unwrap().id.to_string(),
                id
            );
        }
        let detail = refused(&with("id", json!("not-a-uuid")), InvalidKind::Schema);
        assert!(
            detail.starts_with(r#"id: expected a UUID, got "not-a-uuid""#),
            "{detail}"
        );
        let detail = refused(&with("id", json!("")), InvalidKind::Schema);
        assert!(
            detail.starts_with(r#"id: expected a UUID, got """#),
            "{detail}"
        );
        assert_eq!(
            refused(
                &with("id", json!("00000000-0000-0000-0000-000000000000")),
                InvalidKind::Schema
            ),
            "id: must not be the nil UUID"
        );
    }

    #[test]
    fn occurred_at_must_be_rfc3339() {
        let detail = refused(
            &with("occurred_at", json!("yesterday")),
            InvalidKind::Schema,
        );
        assert!(
            detail.starts_with(r#"occurred_at: expected an RFC 3339 timestamp, got "yesterday""#),
            "{detail}"
        );
        for bad in [
            "2026-11-22",
            "2026-11-22T10:15:30",
            "2026-13-01T00:00:00Z",
            "1764000000",
            "",
        ] {
            refused(&with("occurred_at", json!(bad)), InvalidKind::Schema);
        }
        refused(
            &with("occurred_at", json!(1_764_000_000)),
            InvalidKind::Schema,
        );
    }

    #[test]
    fn occurred_at_with_an_offset_is_accepted_and_kept() {
        let event =
            decode_value(&with("occurred_at", json!("2026-11-22T12:15:30.5+02:00"))).unwrap();
        assert_eq!(event.occurred_at.offset().whole_hours(), 2);
        assert_eq!(
            event.occurred_at,
            time::macros::datetime!(2026-11-22 10:15:30.5 UTC)
        );
        let text = serde_json::to_string(&event).unwrap();
        assert!(
            text.contains(r#""occurred_at":"2026-11-22T12:15:30.5+02:00""#),
            "{text}"
        );
        decode_value(&with("occurred_at", json!("2026-11-22t10:15:30-05:30"))).unwrap();
        // RFC 3339 section 5.6 allows a space for the "T".
        decode_value(&with("occurred_at", json!("2026-11-22 10:15:30Z"))).unwrap();
    }

    #[test]
    fn each_outcome_decodes() {
        for outcome in Outcome::ALL {
            let event = decode_value(&with("outcome", json!(outcome.as_str()))).unwrap();
            assert_eq!(event.outcome, outcome);
        }
        for bad in ["ok", "Success", "SUCCESS", ""] {
            let detail = refused(&with("outcome", json!(bad)), InvalidKind::Schema);
            assert!(
                detail.starts_with("outcome: expected one of \"success\""),
                "{detail}"
            );
        }
        refused(
            &with("outcome", json!({"success": null})),
            InvalidKind::Schema,
        );
    }

    #[test]
    fn value_rules_apply_when_decoding() {
        let detail = refused(&with("tenant", json!("Acme")), InvalidKind::Schema);
        assert!(detail.starts_with(r#"tenant: expected [a-z0-9][a-z0-9_-]{0,62}, got "Acme""#));
        refused(
            &with("action", json!("document..update")),
            InvalidKind::Schema,
        );
        assert_eq!(
            refused(&with("source", json!("")), InvalidKind::Schema),
            "source: must not be empty"
        );
        refused(&with("source", json!("  ")), InvalidKind::Schema);
        let mut value = example_json();
        value["actor"]["id"] = json!("");
        assert_eq!(
            refused(&value, InvalidKind::Schema),
            "actor.id: must not be empty"
        );
    }

    #[test]
    fn bad_actor_ip_is_refused() {
        let mut value = example_json();
        value["actor"]["ip"] = json!("203.0.113.256");
        assert_eq!(
            refused(&value, InvalidKind::Schema),
            r#"actor.ip: expected an IPv4 or IPv6 address, got "203.0.113.256""#
        );
        value["actor"]["ip"] = json!("2001:db8::9");
        decode_value(&value).unwrap();
    }

    #[test]
    fn nul_in_a_repeated_key_serde_drops_is_still_refused() {
        // serde keeps the last of a repeated key, so validation never sees the first value;
        // PostgreSQL's jsonb parser reads both and refuses the U+0000 (22P05).
        let text = EXAMPLE.replace(
            r#""metadata": {"#,
            r#""metadata": {"k": "a\u0000b", "k": "x", "#,
        );
        assert_ne!(text, EXAMPLE, "the example has a metadata object");
        let err = decode(text.as_bytes(), DEFAULT_MAX_EVENT_BYTES).unwrap_err();
        assert_eq!(err.kind, InvalidKind::Schema);
        assert!(err.detail.contains("U+0000"), "{}", err.detail);
        // An escaped backslash followed by the text `u0000` is no U+0000.
        let text = EXAMPLE.replace(r#""metadata": {"#, r#""metadata": {"k": "a\\u0000b", "#);
        decode(text.as_bytes(), DEFAULT_MAX_EVENT_BYTES).unwrap();
    }

    #[test]
    fn nul_in_nested_metadata_is_refused() {
        let text = EXAMPLE.replace(r#"["old", "new"]"#, r#"["old", "n\u0000ew"]"#);
        let err = decode(text.as_bytes(), DEFAULT_MAX_EVENT_BYTES).unwrap_err();
        assert_eq!(err.kind, InvalidKind::Schema);
        assert_eq!(
            err.detail,
            "metadata.changes.title[1]: contains U+0000, which PostgreSQL cannot store"
        );
        let text = EXAMPLE.replace(r#""source": "docs-api""#, r#""source": "docs\u0000api""#);
        let err = decode(text.as_bytes(), DEFAULT_MAX_EVENT_BYTES).unwrap_err();
        assert_eq!(
            err.detail,
            "source: contains U+0000, which PostgreSQL cannot store"
        );
    }

    #[test]
    fn refusal_details_never_carry_nul() {
        // Quoted input goes into dead_letters.reason, a text column.
        let mut value = example_json();
        value["outcome"] = json!("succ\u{0}ess");
        value["t\u{0}"] = json!(1);
        let detail = refused(&value, InvalidKind::Schema);
        assert!(!detail.contains('\0'), "{detail}");
        assert!(detail.contains(r#""t\0""#), "{detail}");
    }

    fn with_number(number: &str) -> String {
        EXAMPLE.replace(r#"["old", "new"]"#, &format!(r#"["old", {number}]"#))
    }

    #[test]
    fn numbers_the_database_cannot_store_are_refused_with_their_length() {
        // Each of these is refused by PostgreSQL's jsonb ("value overflows numeric format")
        // or stored hundreds of times larger than written; serde reads them all as 0.0.
        let cases: [(&str, usize); 7] = [
            ("1e-16384", 16386),
            ("0e-20000", 20002),
            ("1.5e-16383", 16386),
            ("-1e-1000", 1003),
            ("1e-400", 402),
            ("0e-2000000000", 2_000_000_002),
            ("1e-99999999999999999999", 1_000_000_000_000_002),
        ];
        for (number, chars) in cases {
            let text = with_number(number);
            let err = decode(text.as_bytes(), DEFAULT_MAX_EVENT_BYTES).unwrap_err();
            assert_eq!(err.kind, InvalidKind::Schema, "{number}: {err}");
            assert!(
                err.detail
                    .starts_with(&format!("metadata: the number \"{number}\" at byte ")),
                "{err}"
            );
            assert!(
                err.detail
                    .contains(&format!(" is {chars} characters written out in full")),
                "{err}"
            );
            assert!(err.detail.ends_with("at most 400"), "{err}");
        }
    }

    #[test]
    fn every_f64_and_plain_numbers_are_accepted() {
        for number in [
            "0",
            "-0",
            "0.0",
            "1.7976931348623157e308",
            "-2.2250738585072014e-308",
            "5e-324",
            "4.9406564584124654e-324",
            "123456789012345678901234567890",
            "1E+2",
            "0.5e1",
            "0e2000",
            "0.0000000001e310",
            "-9223372036854775808",
            "18446744073709551615",
        ] {
            let text = with_number(number);
            decode(text.as_bytes(), DEFAULT_MAX_EVENT_BYTES)
                .unwrap_or_else(|e| panic!("{number}: {e}"));
        }
    }

    #[test]
    fn the_written_out_length_is_what_postgres_prints() {
        // Lengths of `numeric_out` measured on PostgreSQL 15 (`select length('…'::numeric::text)`).
        for (number, len) in [
            ("1e-300", 302),
            ("1e300", 301),
            ("-1.50", 5),
            ("0.001e2", 3),
            ("0.5e1", 1),
            ("100", 3),
            ("0e-3", 5),
            ("12.345e1", 6),
            ("0.0000000001e310", 301),
        ] {
            let mut i = 0;
            let shape = scan_number(number.as_bytes(), &mut i);
            assert_eq!(i, number.len(), "{number}");
            assert_eq!(shape.written_out(), len, "{number}");
        }
    }

    #[test]
    fn numbers_written_out_must_fit_the_size_limit() {
        // 250 numbers of 6 characters, each 302 written out: 72 KiB more.
        let numbers = vec!["1e-300"; 250].join(", ");
        let text = with_number(&format!("[{numbers}]"));
        assert!(text.len() < 4096);
        let err = decode(text.as_bytes(), DEFAULT_MAX_EVENT_BYTES).unwrap_err();
        assert_eq!(err.kind, InvalidKind::Oversize, "{err}");
        assert!(
            err.detail.contains("with its numbers written out in full"),
            "{err}"
        );
        decode(text.as_bytes(), 4 * DEFAULT_MAX_EVENT_BYTES).unwrap();
    }

    #[test]
    fn numbers_inside_strings_are_not_numbers() {
        let text = with_number(r#""1e-99999 \" 1e-99999""#);
        decode(text.as_bytes(), DEFAULT_MAX_EVENT_BYTES).unwrap();
    }

    #[test]
    fn metadata_nesting_is_bounded_below_the_parser_limit() {
        let nested = |levels: usize| {
            let inner = format!("{}1{}", "[".repeat(levels), "]".repeat(levels));
            EXAMPLE.replace(r#"["old", "new"]"#, &inner)
        };
        // metadata > changes > title > 62 more arrays: 64 levels below metadata.
        decode(nested(63).as_bytes(), DEFAULT_MAX_EVENT_BYTES).unwrap();
        let err = decode(nested(64).as_bytes(), DEFAULT_MAX_EVENT_BYTES).unwrap_err();
        assert_eq!(err.kind, InvalidKind::Schema);
        assert!(
            err.detail.starts_with("metadata.changes.title[0][0]"),
            "{err}"
        );
        assert!(
            err.detail
                .ends_with(": nested deeper than 64 levels below metadata"),
            "{err}"
        );
        // Past the JSON parser's own limit the payload is refused as not JSON, not a panic.
        let err = decode(nested(200).as_bytes(), DEFAULT_MAX_EVENT_BYTES).unwrap_err();
        assert_eq!(err.kind, InvalidKind::NotJson, "{err}");
        assert!(err.detail.contains("recursion limit exceeded"), "{err}");
    }

    #[test]
    fn a_lone_surrogate_is_not_json() {
        for escape in [r"\ud800", r"\udc00", r"\ud800\u0041"] {
            let text = with_number(&format!("\"{escape}\""));
            let err = decode(text.as_bytes(), DEFAULT_MAX_EVENT_BYTES).unwrap_err();
            assert_eq!(err.kind, InvalidKind::NotJson, "{escape}: {err}");
        }
        let text = with_number(r#""\ud83d\ude00""#);
        decode(text.as_bytes(), DEFAULT_MAX_EVENT_BYTES).unwrap();
    }
}
