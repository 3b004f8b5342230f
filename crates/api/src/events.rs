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
use serde_json::value::RawValue;
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

#[derive(serde::Serialize)]
struct PageBody<'a> {
    events: Vec<&'a RawValue>,
    next_cursor: Option<String>,
}

fn raw(e: &StoredEvent) -> Result<Box<RawValue>, ApiError> {
    RawValue::from_string(e.json.clone())
        .map_err(|_| ApiError::Unavailable("a stored event could not be read".into()))
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
    let raws = rows.iter().map(raw).collect::<Result<Vec<_>, _>>()?;
    let body = PageBody {
        events: raws.iter().map(|r| r.as_ref()).collect(),
        next_cursor,
    };
    Ok(axum::Json(body).into_response())
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
    let found = state.store.event(id, principal.tenant.as_deref()).await?;
    match found {
        Some(e) => Ok(([(CONTENT_TYPE, "application/json")], e.json).into_response()),
        None => Err(ApiError::NotFound(format!("no event {id}"))),
    }
}
