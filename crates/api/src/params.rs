//! Query parameters: declared once here, parsed strictly, and documented from the same
//! declarations (the OpenAPI document is built from [`Endpoint`]'s lists, so the two cannot
//! drift).
//!
//! Filters take comma-separated values (any of them matches); a `!` after the name negates it
//! (`outcome!=success`). An unknown parameter is refused: a typo must not silently widen a
//! query of an audit trail.

use std::time::Duration;

use auditbridge_store::{Condition, EventFilter, Order};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

use crate::auth::Principal;
use crate::error::ApiError;

/// How a parameter's value is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A tenant name.
    Tenant,
    /// A list of exact values.
    List,
    /// A list of outcomes.
    Outcomes,
    /// A list of action prefixes.
    Actions,
    /// An RFC 3339 timestamp.
    Timestamp,
    /// `asc` or `desc`.
    Order,
    /// An integer in a range.
    Integer { min: i64, max: i64, default: i64 },
    /// A tree size or index: a non-negative integer, absent unless given.
    Size,
    /// An opaque cursor from an earlier answer.
    Cursor,
    /// A duration such as `1h` or `15m`.
    Duration,
}

/// One query parameter.
#[derive(Debug)]
pub struct Param {
    pub name: &'static str,
    pub kind: Kind,
    /// Whether `name!` (negation) is accepted.
    pub negatable: bool,
    pub description: &'static str,
}

const fn p(name: &'static str, kind: Kind, negatable: bool, description: &'static str) -> Param {
    Param {
        name,
        kind,
        negatable,
        description,
    }
}

/// The filters every reading endpoint accepts.
pub const FILTERS: &[Param] = &[
    p(
        "tenant",
        Kind::Tenant,
        false,
        "The tenant to read. Defaults to the token's own tenant; required with an admin token.",
    ),
    p(
        "actor",
        Kind::List,
        true,
        "actor.id equals one of these (comma-separated). `actor!=` excludes them.",
    ),
    p(
        "target",
        Kind::List,
        true,
        "target.id equals one of these. `target!=` excludes them (events without a target stay).",
    ),
    p(
        "source",
        Kind::List,
        true,
        "source equals one of these. `source!=` excludes them.",
    ),
    p(
        "outcome",
        Kind::Outcomes,
        true,
        "outcome is one of success, failure, denied, unknown. `outcome!=` excludes them.",
    ),
    p(
        "action",
        Kind::Actions,
        true,
        "action is one of these or below it in the hierarchy: `document` matches `document`, `document.update` and `document.share.revoke`, not `documents.x`. `action!=` excludes them.",
    ),
    p(
        "since",
        Kind::Timestamp,
        false,
        "occurred_at at or after this RFC 3339 time (inclusive).",
    ),
    p(
        "until",
        Kind::Timestamp,
        false,
        "occurred_at before this RFC 3339 time (exclusive).",
    ),
];

pub const PAGE: &[Param] = &[
    p(
        "order",
        Kind::Order,
        false,
        "`desc` (newest first, the default) or `asc`, by occurred_at then id.",
    ),
    p(
        "limit",
        Kind::Integer {
            min: 1,
            max: 1000,
            default: 100,
        },
        false,
        "Events per page, 1 to 1000 (default 100).",
    ),
    p(
        "cursor",
        Kind::Cursor,
        false,
        "`next_cursor` of the previous page, with the same filters and order.",
    ),
];

pub const STREAM: &[Param] = &[p(
    "cursor",
    Kind::Cursor,
    false,
    "Resume after this event id of the stream (as `Last-Event-ID` does); without one the stream starts at the commit-safe head (events committed from now on, plus any committed a moment before while an older transaction was still running: never skipped).",
)];

pub const STATS: &[Param] = &[
    p(
        "bucket",
        Kind::Duration,
        false,
        "Bucket width such as `5m`, `1h`, `1d` (default 1h); at most 2000 buckets per window. Without since/until the window is the last 24 hours.",
    ),
    p(
        "depth",
        Kind::Integer {
            min: 1,
            max: 8,
            default: 1,
        },
        false,
        "Group actions by their first N tokens (1: `document`, 2: `document.share`).",
    ),
];

/// Which parameters an endpoint accepts.
#[derive(Debug, Clone, Copy)]
pub enum Endpoint {
    Events,
    Stream,
    Stats,
    /// `GET /v1/log/checkpoint`.
    Checkpoint,
    /// `GET /v1/events/{id}/proof`.
    Proof,
    /// `GET /v1/log/consistency`.
    Consistency,
    /// `GET /v1/log/receipts`.
    Receipts,
}

/// The parameters of the log's endpoints (besides `tenant`).
pub const PROOF: &[Param] = &[p(
    "size",
    Kind::Size,
    false,
    "The tree size to prove against (greater than the event's log index, at most the log's size). Default: the size of the tenant's newest signed checkpoint.",
)];

pub const CONSISTENCY: &[Param] = &[
    p("from", Kind::Size, false, "The older tree size (required)."),
    p(
        "to",
        Kind::Size,
        false,
        "The newer tree size, at most the log's size. Default: the size of the tenant's newest signed checkpoint.",
    ),
];

impl Endpoint {
    pub fn params(self) -> Vec<&'static Param> {
        let tenant = FILTERS.iter().take(1);
        match self {
            Endpoint::Events => FILTERS.iter().chain(PAGE).collect(),
            Endpoint::Stream => FILTERS.iter().chain(STREAM).collect(),
            Endpoint::Stats => FILTERS.iter().chain(STATS).collect(),
            Endpoint::Checkpoint | Endpoint::Receipts => tenant.collect(),
            Endpoint::Proof => PROOF.iter().collect(),
            Endpoint::Consistency => tenant.chain(CONSISTENCY).collect(),
        }
    }
}

/// The parsed query string of a reading endpoint.
#[derive(Debug, Default)]
pub struct Parsed {
    pub filter: EventFilter,
    pub order: Option<Order>,
    pub ints: Vec<(&'static str, i64)>,
    pub cursor: Option<String>,
    pub bucket: Option<Duration>,
}

impl Parsed {
    /// A [`Kind::Size`] parameter, if given.
    pub fn size(&self, name: &str) -> Option<u64> {
        self.ints
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| *v as u64)
    }

    pub fn int(&self, name: &str) -> i64 {
        self.ints
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| *v)
            .unwrap_or_default()
    }
}

/// Parses `pairs` for `endpoint`, resolving the tenant against the caller's token.
pub fn parse(
    endpoint: Endpoint,
    pairs: &[(String, String)],
    principal: &Principal,
) -> Result<Parsed, ApiError> {
    let known = endpoint.params();
    let mut out = Parsed::default();
    let mut tenant: Option<String> = None;
    let mut seen: Vec<String> = Vec::new();
    for (key, value) in pairs {
        let (name, negated) = match key.strip_suffix('!') {
            Some(n) => (n, true),
            None => (key.as_str(), false),
        };
        let Some(param) = known.iter().find(|p| p.name == name) else {
            let names: Vec<&str> = known.iter().map(|p| p.name).collect();
            return Err(ApiError::bad(
                key,
                format!("unknown parameter (known: {})", names.join(", ")),
            ));
        };
        if negated && !param.negatable {
            return Err(ApiError::bad(key, format!("{name} cannot be negated")));
        }
        if seen.contains(key) {
            return Err(ApiError::bad(
                key,
                "given twice; list several values comma-separated instead",
            ));
        }
        seen.push(key.clone());
        let values = || -> Result<Vec<String>, ApiError> {
            let v: Vec<String> = value.split(',').map(|s| s.trim().to_owned()).collect();
            if v.iter().any(String::is_empty) {
                return Err(ApiError::bad(key, "empty value"));
            }
            Ok(v)
        };
        match param.kind {
            Kind::Tenant => tenant = Some(value.clone()),
            Kind::List | Kind::Outcomes | Kind::Actions => {
                let v = values()?;
                for one in &v {
                    match param.kind {
                        Kind::Outcomes
                            if !matches!(
                                one.as_str(),
                                "success" | "failure" | "denied" | "unknown"
                            ) =>
                        {
                            return Err(ApiError::bad(
                                key,
                                format!(
                                    "{one:?} is not an outcome (success, failure, denied, unknown)"
                                ),
                            ));
                        }
                        Kind::Actions => auditbridge_event::validate_action(one)
                            .map_err(|e| ApiError::bad(key, e.detail))?,
                        _ => {}
                    }
                }
                let condition = match name {
                    "actor" => &mut out.filter.actor,
                    "target" => &mut out.filter.target,
                    "source" => &mut out.filter.source,
                    "outcome" => &mut out.filter.outcome,
                    _ => &mut out.filter.action,
                };
                set(condition, negated, v);
            }
            Kind::Timestamp => {
                let t = OffsetDateTime::parse(value, &Rfc3339).map_err(|_| {
                    ApiError::bad(
                        key,
                        format!("{value:?} is not an RFC 3339 time such as 2026-11-22T10:00:00Z"),
                    )
                })?;
                if name == "since" {
                    out.filter.since = Some(t);
                } else {
                    out.filter.until = Some(t);
                }
            }
            Kind::Order => {
                out.order = Some(match value.as_str() {
                    "asc" => Order::Asc,
                    "desc" => Order::Desc,
                    _ => return Err(ApiError::bad(key, "expected asc or desc")),
                });
            }
            Kind::Integer { min, max, .. } => {
                let n: i64 = value
                    .parse()
                    .ok()
                    .filter(|n| (min..=max).contains(n))
                    .ok_or_else(|| {
                        ApiError::bad(key, format!("expected an integer from {min} to {max}"))
                    })?;
                out.ints.push((param.name, n));
            }
            Kind::Size => {
                let n: i64 = value
                    .parse()
                    .ok()
                    .filter(|n| *n >= 0)
                    .ok_or_else(|| ApiError::bad(key, "expected a non-negative integer"))?;
                out.ints.push((param.name, n));
            }
            Kind::Cursor => out.cursor = Some(value.clone()),
            Kind::Duration => {
                let d = humantime::parse_duration(value)
                    .ok()
                    .filter(|d| *d >= Duration::from_secs(1))
                    .ok_or_else(|| {
                        ApiError::bad(key, "expected a duration of at least 1s, such as 5m or 1h")
                    })?;
                out.bucket = Some(d);
            }
        }
    }
    for param in &known {
        if let Kind::Integer { default, .. } = param.kind
            && !out.ints.iter().any(|(n, _)| *n == param.name)
        {
            out.ints.push((param.name, default));
        }
    }
    if let (Some(s), Some(u)) = (out.filter.since, out.filter.until)
        && s >= u
    {
        return Err(ApiError::bad("until", "must be later than since"));
    }
    out.filter.tenant = match endpoint {
        // An admin may tail every tenant at once; everything else reads one tenant.
        Endpoint::Stream if tenant.is_none() && principal.tenant.is_none() => None,
        // The event names its tenant.
        Endpoint::Proof => None,
        _ => Some(principal.tenant_for(tenant.as_deref())?),
    };
    Ok(out)
}

fn set(condition: &mut Condition, negated: bool, values: Vec<String>) {
    if negated {
        condition.exclude = values;
    } else {
        condition.include = values;
    }
}

/// A page cursor: the keyset of the last row, and the order it was made for. Opaque to
/// clients (hex of a version byte, the order, microseconds and the id).
pub fn encode_cursor(order: Order, occurred_at: OffsetDateTime, id: Uuid) -> String {
    let mut bytes = Vec::with_capacity(26);
    bytes.push(1u8);
    bytes.push(match order {
        Order::Asc => 0,
        Order::Desc => 1,
    });
    let micros = (occurred_at.unix_timestamp_nanos() / 1000) as i64;
    bytes.extend_from_slice(&micros.to_be_bytes());
    bytes.extend_from_slice(id.as_bytes());
    hex::encode(bytes)
}

pub fn decode_cursor(s: &str, order: Order) -> Result<(OffsetDateTime, Uuid), ApiError> {
    let bad = || {
        ApiError::bad(
            "cursor",
            "not a cursor from this API (use next_cursor as given)",
        )
    };
    let bytes = hex::decode(s).map_err(|_| bad())?;
    if bytes.len() != 26 || bytes[0] != 1 {
        return Err(bad());
    }
    let made_for = if bytes[1] == 0 {
        Order::Asc
    } else {
        Order::Desc
    };
    if made_for != order {
        return Err(ApiError::bad(
            "cursor",
            format!(
                "made for order={}, but this request has order={}",
                order_str(made_for),
                order_str(order)
            ),
        ));
    }
    let micros = i64::from_be_bytes(bytes[2..10].try_into().map_err(|_| bad())?);
    let t =
        OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1000).map_err(|_| bad())?;
    let id = Uuid::from_slice(&bytes[10..26]).map_err(|_| bad())?;
    Ok((t, id))
}

pub fn order_str(o: Order) -> &'static str {
    match o {
        Order::Asc => "asc",
        Order::Desc => "desc",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Scope;

    fn tenant_token() -> Principal {
        Principal {
            name: "t".into(),
            tenant: Some("acme".into()),
            scopes: vec![Scope::Read],
        }
    }

    fn pairs(q: &[(&str, &str)]) -> Vec<(String, String)> {
        q.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn filters_and_negations_parse() {
        let p = parse(
            Endpoint::Events,
            &pairs(&[
                ("action", "document,user.login"),
                ("outcome!", "success"),
                ("target", "doc-9"),
                ("since", "2026-11-22T10:00:00Z"),
                ("limit", "5"),
                ("order", "asc"),
            ]),
            &tenant_token(),
        )
        .unwrap();
        assert_eq!(p.filter.tenant.as_deref(), Some("acme"));
        assert_eq!(p.filter.action.include, ["document", "user.login"]);
        assert_eq!(p.filter.outcome.exclude, ["success"]);
        assert_eq!(p.filter.target.include, ["doc-9"]);
        assert_eq!(p.int("limit"), 5);
        assert_eq!(p.order, Some(Order::Asc));
    }

    #[test]
    fn every_mistake_names_its_parameter() {
        for (q, param) in [
            (vec![("limit", "0")], "limit"),
            (vec![("limit", "1001")], "limit"),
            (vec![("limit", "x")], "limit"),
            (vec![("order", "up")], "order"),
            (vec![("since", "yesterday")], "since"),
            (vec![("outcome", "ok")], "outcome"),
            (vec![("action", "Document")], "action"),
            (vec![("action", "a,,b")], "action"),
            (vec![("tenant!", "acme")], "tenant!"),
            (vec![("actr", "u-1")], "actr"),
            (vec![("actor", "a"), ("actor", "b")], "actor"),
            (vec![("cursor", "zz")], "cursor"),
            (
                vec![
                    ("since", "2026-11-22T10:00:00Z"),
                    ("until", "2026-11-22T09:00:00Z"),
                ],
                "until",
            ),
        ] {
            let err =
                parse(Endpoint::Events, &pairs(&q), &tenant_token()).and_then(|p| match p.cursor {
                    Some(ref c) => decode_cursor(c, Order::Desc).map(|_| p),
                    None => Ok(p),
                });
            match err {
                Err(ApiError::BadRequest { param: got, .. }) => assert_eq!(got, param, "{q:?}"),
                other => panic!("{q:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn cursors_round_trip_and_remember_their_order() {
        let t = time::macros::datetime!(2026-11-22 10:15:30.123456 UTC);
        let id = Uuid::now_v7();
        let c = encode_cursor(Order::Desc, t, id);
        assert_eq!(decode_cursor(&c, Order::Desc).unwrap(), (t, id));
        assert!(decode_cursor(&c, Order::Asc).is_err());
    }
}
