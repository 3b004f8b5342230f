//! `GET /v1/events` (a filtered page of one tenant's trail) and `GET /v1/events/{id}`.
//!
//! Pages are keyset pages on `(occurred_at, id)`: the answer's `next_cursor` is the last row's
//! key, so a later page starts exactly after it, whatever arrives in between, and a deep page
//! costs what the first does. One extra row is read to know whether there is a next page; the
//! total is never counted.

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use uuid::Uuid;

use auditbridge_store::{Order, PageQuery, StoredEvent};

use crate::AppState;
use crate::auth::{Principal, Scope};
use crate::error::ApiError;
use crate::params::{self, Endpoint};

pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/events", get(list))
        .route("/v1/events/{id}", get(one))
}

/// `{"events": [...], "next_cursor": ...}`, with each event's stored JSON copied in as is
/// (PostgreSQL produced it from `jsonb`, so it is valid JSON), not parsed and re-serialised.
fn page_body(rows: &[StoredEvent], next_cursor: Option<&str>) -> String {
    let mut body = String::with_capacity(64 + rows.iter().map(|r| r.json.len() + 1).sum::<usize>());
    body.push_str("{\"events\":[");
    for (i, row) in rows.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(&row.json);
    }
    body.push_str("],\"next_cursor\":");
    match next_cursor {
        // Cursors are hex: nothing to escape.
        Some(c) => {
            body.push('"');
            body.push_str(c);
            body.push('"');
        }
        None => body.push_str("null"),
    }
    body.push('}');
    body
}

async fn list(
    State(state): State<AppState>,
    principal: Principal,
    Query(pairs): Query<Vec<(String, String)>>,
) -> Result<Response, ApiError> {
    principal.require(Scope::Read)?;
    let parsed = params::parse(Endpoint::Events, &pairs, &principal)?;
    let order = parsed.order.unwrap_or(Order::Desc);
    let after = parsed
        .cursor
        .as_deref()
        .map(|c| params::decode_cursor(c, order))
        .transpose()?;
    let limit = u32::try_from(parsed.int("limit")).unwrap_or(100);
    let _turn = state.budget.request(&principal.name).await?;
    let mut rows = state
        .store
        .page(&PageQuery {
            filter: parsed.filter,
            order,
            after,
            limit: limit + 1,
        })
        .await?;
    let more = rows.len() > limit as usize;
    rows.truncate(limit as usize);
    let next_cursor = more
        .then(|| rows.last())
        .flatten()
        .map(|last| params::encode_cursor(order, last.occurred_at, last.id));
    let body = page_body(&rows, next_cursor.as_deref());
    Ok(([(CONTENT_TYPE, "application/json")], body).into_response())
}

async fn one(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    principal.require(Scope::Read)?;
    let id: Uuid = id
        .parse()
        .map_err(|_| ApiError::bad("id", format!("{id:?} is not a UUID")))?;
    // Another tenant's event is "not found" for this token: its existence is not disclosed.
    let _turn = state.budget.request(&principal.name).await?;
    let found = state.store.event(id, principal.tenant.as_deref()).await?;
    match found {
        Some(e) => Ok(([(CONTENT_TYPE, "application/json")], e.json).into_response()),
        None => Err(ApiError::NotFound(format!("no event {id}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_body_is_json_with_the_events_as_stored() {
        let row = |json: &str| StoredEvent {
            id: Uuid::now_v7(),
            tenant: "acme".into(),
            action: "doc.read".into(),
            outcome: "success".into(),
            actor_id: "u-1".into(),
            target_id: None,
            source: "app".into(),
            occurred_at: time::OffsetDateTime::UNIX_EPOCH,
            received_at: time::OffsetDateTime::UNIX_EPOCH,
            json: json.into(),
        };
        let rows = [row(r#"{"a": "x\"y"}"#), row(r#"{"b": [1, 2]}"#)];
        let v: serde_json::Value = serde_json::from_str(&page_body(&rows, Some("01ab"))).unwrap();
        assert_eq!(v["events"][0]["a"], "x\"y");
        assert_eq!(v["events"][1]["b"][1], 2);
        assert_eq!(v["next_cursor"], "01ab");
        let v: serde_json::Value = serde_json::from_str(&page_body(&[], None)).unwrap();
        assert_eq!(v, serde_json::json!({"events": [], "next_cursor": null}));
    }
}
