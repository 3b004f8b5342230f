//! Strange but valid events, for property tests (feature `proptest`).
//!
//! "Strange" is what a hostile or careless producer can send within the contract: every
//! string field at or near its limit in bytes, made of multi-byte characters, control
//! characters (all but U+0000), non-characters, bidirectional marks and a BOM; times at the
//! ends of the range with odd offsets; metadata nested close to its depth limit, with large
//! strings, odd keys and extreme numbers; many tenants. Every event this produces passes
//! [`Event::validate`]; [`raw_numbers`] adds numbers near the written-out limit to a
//! payload's text, which only [`crate::decode`] can judge.
//!
//! The database property test (`tests/tests/e2e/limits.rs`) stores what these produce; the
//! decode properties (`crates/event/tests/properties.rs`) check the accept/refuse rules.

use proptest::prelude::*;
use serde_json::{Map, Number, Value};
use time::OffsetDateTime;

use crate::limits;
use crate::model::{Actor, Event, Outcome, Target};

/// Characters that stress storage and escaping, U+0000 excepted (the contract refuses it).
const ODD: &[char] = &[
    'a',
    'Z',
    '0',
    ' ',
    '"',
    '\\',
    '\'',
    '\t',
    '\n',
    '\r',
    '\u{1}',
    '\u{8}',
    '\u{b}',
    '\u{c}',
    '\u{1b}',
    '\u{1f}',
    '\u{7f}',
    '\u{80}',
    '\u{9f}',
    '\u{a0}',
    '\u{ad}',
    'é',
    'ß',
    'Ω',
    'я',
    '€',
    '\u{200b}',
    '\u{200d}',
    '\u{200e}',
    '\u{202e}',
    '\u{2028}',
    '\u{2029}',
    '\u{2066}',
    '\u{fe0f}',
    '\u{feff}',
    '\u{fffd}',
    '\u{fffe}',
    '\u{ffff}',
    '中',
    '\u{0301}',
    '😀',
    '𝔸',
    '\u{e000}',
    '\u{f8ff}',
    '\u{1f3fb}',
    '\u{e0001}',
    '\u{10ffff}',
    '\u{fdd0}',
];

fn odd_char() -> impl Strategy<Value = char> {
    prop_oneof![
        4 => proptest::sample::select(ODD),
        1 => any::<char>().prop_filter("U+0000", |c| *c != '\0'),
    ]
}

/// A string of at most `max` bytes: often exactly at the limit or just under it, sometimes
/// short; `non_blank` for required fields.
pub fn text(max: usize, non_blank: bool) -> impl Strategy<Value = String> {
    let target = prop_oneof![
        2 => Just(max),
        2 => max.saturating_sub(3)..=max,
        3 => 1..=max.min(40),
        1 => 1..=max,
    ];
    (target, proptest::collection::vec(odd_char(), 1..48)).prop_map(move |(target, chars)| {
        let mut s = String::with_capacity(target);
        'fill: for c in chars.iter().cycle() {
            if s.len() + c.len_utf8() > target {
                // Pad with ASCII to land on the byte count exactly.
                while s.len() < target {
                    s.push('x');
                }
                break 'fill;
            }
            s.push(*c);
        }
        if non_blank && s.trim().is_empty() {
            s.insert(0, 'x');
            while s.len() > target.max(1) {
                s.pop();
            }
        }
        s
    })
}

/// A tenant of the grammar, often 63 bytes long; `count` keeps them few enough to repeat.
pub fn tenant() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9]",
        "[a-z0-9][a-z0-9_-]{0,62}",
        "[a-z0-9][a-z0-9_-]{62}",
        (0u32..50).prop_map(|n| format!("t-{n}")),
    ]
}

/// An action of 1 to 8 tokens, often at the limits of a token or of the whole.
pub fn action() -> impl Strategy<Value = String> {
    let token = prop_oneof!["[a-z0-9_-]{1,8}", "[a-z0-9_-]{63}", "[a-z0-9_-]{1,63}",];
    proptest::collection::vec(token, 1..=limits::ACTION_TOKENS).prop_map(|tokens| {
        let mut action = String::new();
        for token in tokens {
            let sep = usize::from(!action.is_empty());
            let room = limits::ACTION_BYTES.saturating_sub(action.len() + sep);
            if room == 0 {
                break;
            }
            if sep == 1 {
                action.push('.');
            }
            action.push_str(&token[..token.len().min(room)]);
        }
        action
    })
}

/// A time anywhere in the range, often at its ends, with an offset in whole minutes.
pub fn occurred_at() -> impl Strategy<Value = OffsetDateTime> {
    use time::macros::datetime;
    let first = datetime!(0001-01-01 00:00 UTC).unix_timestamp();
    let last = datetime!(9999-12-31 23:59:59 UTC).unix_timestamp();
    let seconds = prop_oneof![
        first..=first + 86_400 * 2,
        last - 86_400 * 2..=last,
        first..=last,
        0i64..=4_102_444_800,
    ];
    let nanos = prop_oneof![Just(0u32), Just(999_999_999), 0u32..1_000_000_000];
    let offset_minutes = prop_oneof![Just(0i32), -1439i32..=1439];
    (seconds, nanos, offset_minutes).prop_filter_map(
        "outside the contract's range",
        |(s, n, minutes)| {
            let offset = time::UtcOffset::from_whole_seconds(minutes * 60).ok()?;
            let t = OffsetDateTime::from_unix_timestamp(s)
                .ok()?
                .replace_nanosecond(n)
                .ok()?
                .checked_to_offset(offset)?;
            crate::validate::validate_timestamp(t).ok().map(|()| t)
        },
    )
}

/// A JSON number a producer's serializer writes: integers at the ends of their types, and
/// `f64` values at the ends of theirs.
fn number() -> impl Strategy<Value = Number> {
    prop_oneof![
        proptest::sample::select(vec![
            Number::from(i64::MIN),
            Number::from(i64::MAX),
            Number::from(u64::MAX),
            Number::from(0),
        ]),
        any::<i64>().prop_map(Number::from),
        proptest::sample::select(vec![
            f64::MAX,
            f64::MIN,
            f64::MIN_POSITIVE,
            -f64::MIN_POSITIVE,
            5e-324,
            -5e-324,
            // The largest subnormal.
            f64::from_bits(0x000f_ffff_ffff_ffff),
            1e300,
            1e-300,
            0.1,
            -0.0,
        ])
        .prop_filter_map("finite", Number::from_f64),
        any::<f64>().prop_filter_map("finite", Number::from_f64),
    ]
}

/// Metadata: any JSON object, nested up to the limit, with odd keys and large strings.
pub fn metadata() -> impl Strategy<Value = Map<String, Value>> {
    let leaf = prop_oneof![
        3 => Just(Value::Null),
        3 => any::<bool>().prop_map(Value::Bool),
        6 => number().prop_map(Value::Number),
        6 => text(64, false).prop_map(Value::String),
        1 => text(8 * 1024, false).prop_map(Value::String),
    ];
    let tree = leaf.prop_recursive(6, 48, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::vec((text(32, false), inner), 0..6)
                .prop_map(|pairs| Value::Object(pairs.into_iter().collect())),
        ]
    });
    // A chain as deep as the limit allows, so depth is tested at its edge, not only at 6.
    let deep = (1..=limits::METADATA_DEPTH, any::<bool>()).prop_map(|(depth, arrays)| {
        let mut value = Value::from("bottom");
        for level in 0..depth {
            value = if arrays {
                Value::Array(vec![value])
            } else {
                Value::Object(Map::from_iter([(format!("l{level}"), value)]))
            };
        }
        value
    });
    proptest::collection::vec((text(40, false), prop_oneof![4 => tree, 1 => deep]), 0..6)
        .prop_map(|pairs| pairs.into_iter().collect())
}

/// A strange but valid event (see the module docs). Its id is random; callers that store
/// several in one batch must not repeat one (they never do, short of a UUID collision).
pub fn event() -> impl Strategy<Value = Event> {
    let actor = (
        text(limits::ID_BYTES, true),
        proptest::option::of(text(limits::TYPE_BYTES, false)),
        proptest::option::of(text(limits::NAME_BYTES, false)),
        proptest::option::of(prop_oneof![
            Just("::".to_owned()),
            Just("ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255".to_owned()),
            any::<std::net::IpAddr>().prop_map(|ip| ip.to_string()),
        ]),
        proptest::option::of(text(limits::USER_AGENT_BYTES, false)),
    )
        .prop_map(|(id, kind, name, ip, user_agent)| Actor {
            id,
            kind,
            name,
            ip,
            user_agent,
        });
    let target = proptest::option::of(
        (
            proptest::option::of(text(limits::ID_BYTES, false)),
            proptest::option::of(text(limits::TYPE_BYTES, false)),
            proptest::option::of(text(limits::NAME_BYTES, false)),
        )
            .prop_map(|(id, kind, name)| Target { id, kind, name }),
    );
    (
        (any::<u128>(), tenant(), occurred_at(), action()),
        proptest::sample::select(Outcome::ALL.to_vec()),
        actor,
        target,
        text(limits::SOURCE_BYTES, true),
        proptest::option::of(text(limits::REASON_BYTES, false)),
        proptest::option::of(text(limits::ID_BYTES, false)),
        proptest::option::of(metadata()),
    )
        .prop_map(
            |(
                (id, tenant, occurred_at, action),
                outcome,
                actor,
                target,
                source,
                reason,
                request_id,
                metadata,
            )| {
                Event {
                    id: uuid::Uuid::from_u128(id.max(1)),
                    tenant,
                    occurred_at,
                    action,
                    outcome,
                    actor,
                    target,
                    source,
                    reason,
                    request_id,
                    metadata,
                }
            },
        )
        .prop_filter("larger than the default payload limit", |event| {
            serde_json::to_vec(event)
                // Half, so that numbers written out in full (a tiny f64 is ~300 characters)
                // cannot take it over the limit.
                .is_ok_and(|bytes| bytes.len() <= crate::DEFAULT_MAX_EVENT_BYTES / 2)
        })
}

/// Number tokens as a producer could write them by hand: near the written-out limit of
/// [`limits::NUMBER_CHARS`] on both sides, tiny exponents, long mantissas, zeros with scale.
pub fn raw_number() -> impl Strategy<Value = String> {
    prop_oneof![
        (380i32..=420).prop_map(|e| format!("1e-{e}")),
        (380i32..=420).prop_map(|e| format!("-0e-{e}")),
        (290i32..=308).prop_map(|e| format!("9.99e{e}")),
        (1usize..=420).prop_map(|n| format!("0.{}", "7".repeat(n))),
        (1usize..=420).prop_map(|n| format!("{}e-5", "3".repeat(n.min(300)))),
        (0usize..=30, 0i32..=400).prop_map(|(n, e)| format!("0.{}1e{e}", "0".repeat(n))),
        Just("-0".to_owned()),
        Just("0e99999".to_owned()),
        Just("1E+2".to_owned()),
    ]
}

/// Puts `numbers` into the payload's text, under the metadata key `raw_numbers` (an object
/// is added when the event has no metadata), where serde would have read them as `f64`.
pub fn raw_numbers(payload: &[u8], numbers: &[String]) -> Vec<u8> {
    let text = std::str::from_utf8(payload).expect("a serialized event is UTF-8");
    let list = format!("\"raw_numbers\":[{}]", numbers.join(","));
    let out = match text.find("\"metadata\":{") {
        Some(at) => {
            let at = at + "\"metadata\":{".len();
            let comma = if text[at..].starts_with('}') { "" } else { "," };
            format!("{}{list}{comma}{}", &text[..at], &text[at..])
        }
        None => {
            let end = text.rfind('}').expect("an object");
            format!("{},\"metadata\":{{{list}}}}}", &text[..end])
        }
    };
    out.into_bytes()
}
