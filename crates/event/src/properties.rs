//! Properties of decode and validation, checked on strange input (the stable harness beside
//! the `cargo fuzz` target in `fuzz/`):
//!
//! 1. Every strange but valid event validates, and serializing it decodes to the same event.
//! 2. Whatever bytes come in, `decode` does not panic; what it accepts re-serializes to bytes
//!    that decode to the same event; what it refuses is refused with a reason that starts with
//!    the field it is about (or `payload`, for the payload as a whole).
//! 3. One byte over any string field's limit is refused, naming the field and the limit.
//! 4. A number is accepted exactly when it is short enough written out in full (checked
//!    against a second, plain way of writing it out).
//! 5. The size limit is monotone and exact: an accepted payload is accepted under any larger
//!    limit and refused as `oversize` one byte below its length.

use proptest::prelude::*;
use serde_json::Value;

use crate::{DEFAULT_MAX_EVENT_BYTES, Event, InvalidKind, arb, decode, limits};

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 200,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Decodes, and checks property 2 on the way.
fn decode_checked(bytes: &[u8]) -> Result<Event, TestCaseError> {
    match decode(bytes, DEFAULT_MAX_EVENT_BYTES) {
        Ok(event) => {
            let again = serde_json::to_vec(&event).unwrap();
            let back = decode(&again, usize::MAX)
                .map_err(|e| TestCaseError::fail(format!("re-serialized event refused: {e}")))?;
            prop_assert_eq!(&back, &event);
            event
                .check_subject("audit", &event.subject("audit"))
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            Ok(event)
        }
        Err(e) => {
            prop_assert!(crate::names_its_subject(&e.detail), "{:?}", e.detail);
            prop_assert!(!e.detail.contains('\0'));
            Err(TestCaseError::reject("refused"))
        }
    }
}

/// A change a careless or hostile producer could make to a valid payload.
#[derive(Debug, Clone)]
enum Mutation {
    Truncate(usize),
    FlipByte(usize, u8),
    Insert(usize, String),
    SetField(&'static str, Value),
    Remove(&'static str),
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        arb::text(80, false).prop_map(Value::String),
        arb::text(1100, false).prop_map(Value::String),
        "[a-z0-9_.-]{0,70}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::vec(("[a-z_]{1,10}", inner), 0..4)
                .prop_map(|pairs| Value::Object(pairs.into_iter().collect())),
        ]
    })
}

fn mutation() -> impl Strategy<Value = Mutation> {
    // The format's fields, and one it does not have.
    let fields: Vec<&str> = decode::EVENT_FIELDS
        .iter()
        .copied()
        .chain(["bogus"])
        .collect();
    let field = proptest::sample::select(fields);
    prop_oneof![
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), any::<u8>()).prop_map(|(at, b)| Mutation::FlipByte(at, b)),
        (
            any::<usize>(),
            prop_oneof![
                Just("\\u0000".to_owned()),
                Just("\\ud800".to_owned()),
                Just("1e-999".to_owned()),
                Just("\"".to_owned()),
                Just(",".to_owned()),
                Just("{".to_owned()),
                Just("]".to_owned()),
                arb::raw_number(),
            ]
        )
            .prop_map(|(at, s)| Mutation::Insert(at, s)),
        (field.clone(), json_value()).prop_map(|(f, v)| Mutation::SetField(f, v)),
        field.prop_map(Mutation::Remove),
    ]
}

fn apply(event: &Event, mutation: &Mutation) -> Vec<u8> {
    let mut bytes = serde_json::to_vec(event).unwrap();
    match mutation {
        Mutation::Truncate(at) => bytes.truncate(at % (bytes.len() + 1)),
        Mutation::FlipByte(at, b) => {
            let at = at % bytes.len();
            bytes[at] = *b;
        }
        Mutation::Insert(at, s) => {
            let at = at % (bytes.len() + 1);
            bytes.splice(at..at, s.bytes());
        }
        Mutation::SetField(field, value) => {
            let mut json = serde_json::to_value(event).unwrap();
            json[*field] = value.clone();
            bytes = serde_json::to_vec(&json).unwrap();
        }
        Mutation::Remove(field) => {
            let mut json = serde_json::to_value(event).unwrap();
            json.as_object_mut().unwrap().remove(*field);
            bytes = serde_json::to_vec(&json).unwrap();
        }
    }
    bytes
}

/// A number written out in plain decimal the slow way, as PostgreSQL's `numeric_out` does:
/// the digits with the point moved by the exponent, leading zeros of the integer part
/// dropped, every digit after the point kept.
fn written_out_plainly(token: &str) -> Option<usize> {
    let (negative, rest) = match token.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, token),
    };
    let (mantissa, exponent) = match rest.find(['e', 'E']) {
        Some(at) => (&rest[..at], rest[at + 1..].parse::<i64>().ok()?),
        None => (rest, 0),
    };
    if exponent.abs() > 100_000 {
        return None;
    }
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let point = int.len() as i64 + exponent;
    let scale = (frac.len() as i64 - exponent).max(0) as usize;
    // Pad with zeros on whichever side the point moved past the digits.
    let mut padded = format!("{int}{frac}");
    let mut point = point;
    if point < 0 {
        padded = format!("{}{padded}", "0".repeat((-point) as usize));
        point = 0;
    }
    let needed = point as usize + scale;
    while padded.len() < needed {
        padded.push('0');
    }
    let (int_part, frac_part) = padded.split_at(point as usize);
    let int_part = int_part.trim_start_matches('0');
    let int_part = if int_part.is_empty() { "0" } else { int_part };
    let frac_part = &frac_part[..scale];
    let sign = usize::from(negative);
    Some(sign + int_part.len() + if scale > 0 { 1 + frac_part.len() } else { 0 })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn strange_valid_events_validate_and_round_trip(event in arb::event()) {
        prop_assert!(event.validate().is_ok(), "{:?}", event.validate());
        let bytes = serde_json::to_vec(&event).unwrap();
        let decoded = decode(&bytes, DEFAULT_MAX_EVENT_BYTES)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(decoded, event);
    }

    #[test]
    fn mutated_payloads_never_panic_and_refusals_name_a_field(
        event in arb::event(),
        mutations in proptest::collection::vec(mutation(), 1..4),
    ) {
        let mut bytes = serde_json::to_vec(&event).unwrap();
        for m in &mutations {
            // Apply to the current bytes when they still decode; else keep mutating the text.
            bytes = match serde_json::from_slice::<Event>(&bytes) {
                Ok(current) => apply(&current, m),
                Err(_) => match m {
                    Mutation::Truncate(at) => bytes[..at % (bytes.len() + 1)].to_vec(),
                    _ => bytes,
                },
            };
        }
        // Accepted or refused, property 2 holds; a refusal is not a failure here.
        match decode_checked(&bytes) {
            Ok(_) | Err(TestCaseError::Reject(_)) => {}
            Err(e) => return Err(e),
        }
    }

    #[test]
    fn one_byte_over_a_limit_is_refused_naming_the_field(
        event in arb::event(),
        field in 0usize..10,
        extra in 1usize..8,
    ) {
        let fields: [(&str, &str, usize); 10] = [
            ("actor", "id", limits::ID_BYTES),
            ("actor", "type", limits::TYPE_BYTES),
            ("actor", "name", limits::NAME_BYTES),
            ("actor", "user_agent", limits::USER_AGENT_BYTES),
            ("target", "id", limits::ID_BYTES),
            ("target", "type", limits::TYPE_BYTES),
            ("target", "name", limits::NAME_BYTES),
            ("", "source", limits::SOURCE_BYTES),
            ("", "reason", limits::REASON_BYTES),
            ("", "request_id", limits::ID_BYTES),
        ];
        let (outer, inner, limit) = fields[field];
        let mut json = serde_json::to_value(&event).unwrap();
        let long = Value::from("é".repeat(limit / 2 + extra));
        let name = if outer.is_empty() {
            json[inner] = long;
            inner.to_owned()
        } else {
            if json[outer].is_null() {
                json[outer] = serde_json::json!({});
            }
            json[outer][inner] = long;
            format!("{outer}.{inner}")
        };
        let bytes = serde_json::to_vec(&json).unwrap();
        let err = decode(&bytes, usize::MAX).unwrap_err();
        prop_assert_eq!(err.kind, InvalidKind::Schema);
        let expected = format!(
            "{name}: {} bytes, at most {limit} bytes of UTF-8",
            (limit / 2 + extra) * 2
        );
        prop_assert_eq!(err.detail, expected);
    }

    #[test]
    fn a_number_is_accepted_exactly_when_it_is_short_written_out(
        event in arb::event(),
        number in arb::raw_number(),
    ) {
        let bytes = serde_json::to_vec(&event).unwrap();
        let with_number = arb::raw_numbers(&bytes, std::slice::from_ref(&number));
        let fits = written_out_plainly(&number).is_some_and(|n| n <= limits::NUMBER_CHARS);
        match decode(&with_number, usize::MAX) {
            Ok(_) => prop_assert!(fits, "{} was accepted", number),
            Err(e) => {
                // serde refuses numbers beyond f64 (not JSON); else it is the length rule.
                if e.kind == InvalidKind::Schema {
                    prop_assert!(!fits, "{} was refused: {}", number, e);
                    prop_assert!(e.detail.starts_with("metadata: the number "), "{}", e);
                } else {
                    prop_assert_eq!(e.kind, InvalidKind::NotJson, "{}", e);
                }
            }
        }
    }

    #[test]
    fn the_size_limit_is_exact(event in arb::event(), more in 0usize..1000) {
        let bytes = serde_json::to_vec(&event).unwrap();
        prop_assert!(decode(&bytes, DEFAULT_MAX_EVENT_BYTES).is_ok());
        prop_assert!(decode(&bytes, DEFAULT_MAX_EVENT_BYTES + more).is_ok());
        let err = decode(&bytes, bytes.len() - 1).unwrap_err();
        prop_assert_eq!(err.kind, InvalidKind::Oversize);
    }
}

#[test]
fn the_plain_oracle_agrees_with_postgres_on_known_lengths() {
    // Measured on PostgreSQL 15 (see decode.rs); the oracle is independent of scan_number.
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
        assert_eq!(written_out_plainly(number), Some(len), "{number}");
    }
}
