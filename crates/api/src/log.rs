//! The verifiable log's endpoints, tenant-scoped like every other:
//! `GET /v1/log/checkpoint?tenant=` (the newest signed checkpoint note, as text),
//! `GET /v1/events/{id}/proof[?size=N]` (the event's inclusion proof) and
//! `GET /v1/log/consistency?tenant=&from=M[&to=N]` (a consistency proof),
//! `GET /v1/log/receipts?tenant=` (the signed retention receipts). Proof hashes are
//! base64, nearest the leaf first (RFC 9162 order); without a size, proofs are against the
//! newest signed checkpoint, so a client checks them against a note it verified.

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde_json::json;
use uuid::Uuid;

use auditbridge_store::log::StoredCheckpoint;
use auditbridge_tlog::tree::{consistency_ranges, inclusion_ranges};

use crate::AppState;
use crate::auth::{Principal, Scope};
use crate::error::ApiError;
use crate::params::{self, Endpoint};

pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/log/checkpoint", get(checkpoint))
        .route("/v1/log/consistency", get(consistency))
        .route("/v1/log/receipts", get(receipts))
        .route("/v1/events/{id}/proof", get(proof))
}

/// The tenant's newest signed checkpoint, or 503 saying why there is none.
async fn newest_signed(state: &AppState, tenant: &str) -> Result<StoredCheckpoint, ApiError> {
    state
        .store
        .newest_signed_checkpoint(tenant)
        .await?
        .ok_or_else(|| {
            ApiError::Unavailable(format!(
                "no signed checkpoint of tenant {tenant:?}: AUDITBRIDGE_LOG_KEY_FILE is not set on \
                 the workers, or the sequencer has not signed one yet (within \
                 AUDITBRIDGE_LOG_CHECKPOINT_INTERVAL of the tenant's first event)"
            ))
        })
}

fn tenant_of(parsed: &params::Parsed) -> Result<String, ApiError> {
    parsed
        .filter
        .tenant
        .clone()
        .ok_or_else(|| ApiError::bad("tenant", "required"))
}

async fn checkpoint(
    State(state): State<AppState>,
    principal: Principal,
    Query(pairs): Query<Vec<(String, String)>>,
) -> Result<Response, ApiError> {
    principal.require(Scope::Read)?;
    let parsed = params::parse(Endpoint::Checkpoint, &pairs, &principal)?;
    let tenant = tenant_of(&parsed)?;
    let _turn = state.budget.request(&principal.name).await?;
    let newest = newest_signed(&state, &tenant).await?;
    Ok(([(CONTENT_TYPE, "text/plain; charset=utf-8")], newest.note).into_response())
}

/// The tenant's retention receipts, oldest first: what expiry removed, under which policy,
/// with the log at the cut, each a signed note ([`auditbridge_store::retention`]).
async fn receipts(
    State(state): State<AppState>,
    principal: Principal,
    Query(pairs): Query<Vec<(String, String)>>,
) -> Result<Response, ApiError> {
    principal.require(Scope::Read)?;
    let parsed = params::parse(Endpoint::Receipts, &pairs, &principal)?;
    let tenant = tenant_of(&parsed)?;
    let _turn = state.budget.request(&principal.name).await?;
    let rows = state.store.receipts(Some(&tenant)).await?;
    let time = |t: Option<time::OffsetDateTime>| {
        t.and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
    };
    let list: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            let indexes: Vec<[i64; 2]> =
                auditbridge_store::retention::parse_multirange(&r.log_indexes)
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(a, b)| [a, b])
                    .collect();
            json!({
                "id": r.id,
                "partition": r.partition_name,
                "keep_seconds": r.keep_s,
                "events": r.events,
                "log_indexes": indexes,
                "first_received": time(r.first_received),
                "last_received": time(r.last_received),
                "unlogged": r.unlogged,
                "undelivered": serde_json::from_str::<serde_json::Value>(&r.undelivered)
                    .unwrap_or_default(),
                "tree_size": r.tree_size,
                "signed": r.signed,
                "note": r.note,
                "expired_at": time(Some(r.expired_at)),
            })
        })
        .collect();
    Ok(axum::Json(json!({"tenant": tenant, "receipts": list})).into_response())
}

fn base64_all(hashes: &[auditbridge_tlog::Hash]) -> Vec<String> {
    hashes.iter().map(|h| STANDARD.encode(h)).collect()
}

async fn proof(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    Query(pairs): Query<Vec<(String, String)>>,
) -> Result<Response, ApiError> {
    principal.require(Scope::Read)?;
    let id: Uuid = id
        .parse()
        .map_err(|_| ApiError::bad("id", format!("{id:?} is not a UUID")))?;
    let parsed = params::parse(Endpoint::Proof, &pairs, &principal)?;
    let _turn = state.budget.request(&principal.name).await?;
    // Another tenant's event is "not found" for this token, as for GET /v1/events/{id}.
    let entry = state
        .store
        .log_entry(id, principal.tenant.as_deref())
        .await?
        .ok_or_else(|| {
            ApiError::NotFound(format!(
                "event {id} is not in a log (not stored, or not sequenced yet)"
            ))
        })?;
    let (size, note) = match parsed.size("size") {
        Some(size) => {
            let log_size = state.store.log_size(&entry.tenant).await?;
            if size <= entry.index || size > log_size {
                return Err(ApiError::bad(
                    "size",
                    format!(
                        "expected more than the event's index {} and at most the log's size {log_size}",
                        entry.index
                    ),
                ));
            }
            (size, None)
        }
        None => {
            let newest = newest_signed(&state, &entry.tenant).await?;
            if newest.tree_size <= entry.index {
                return Err(ApiError::Unavailable(format!(
                    "event {id} is at index {} of its log, after the newest signed checkpoint \
                     ({} events): retry within AUDITBRIDGE_LOG_CHECKPOINT_INTERVAL",
                    entry.index, newest.tree_size
                )));
            }
            (newest.tree_size, Some(newest.note))
        }
    };
    let hashes = state
        .store
        .log_range_hashes(&entry.tenant, &inclusion_ranges(entry.index, size))
        .await?;
    Ok(axum::Json(json!({
        "id": id,
        "tenant": entry.tenant,
        "log_index": entry.index,
        "tree_size": size,
        "leaf_hash": STANDARD.encode(entry.hash),
        "hashes": base64_all(&hashes),
        "checkpoint": note,
    }))
    .into_response())
}

async fn consistency(
    State(state): State<AppState>,
    principal: Principal,
    Query(pairs): Query<Vec<(String, String)>>,
) -> Result<Response, ApiError> {
    principal.require(Scope::Read)?;
    let parsed = params::parse(Endpoint::Consistency, &pairs, &principal)?;
    let tenant = tenant_of(&parsed)?;
    // From the empty tree (an empty proof) unless given.
    let from = parsed.size("from").unwrap_or(0);
    let _turn = state.budget.request(&principal.name).await?;
    let (to, note) = match parsed.size("to") {
        Some(to) => {
            let log_size = state.store.log_size(&tenant).await?;
            if to > log_size {
                return Err(ApiError::bad(
                    "to",
                    format!("expected at most the log's size {log_size}"),
                ));
            }
            (to, None)
        }
        None => {
            let newest = newest_signed(&state, &tenant).await?;
            (newest.tree_size, Some(newest.note))
        }
    };
    if from > to {
        return Err(ApiError::bad(
            "from",
            format!("expected at most the newer size {to}"),
        ));
    }
    let hashes = state
        .store
        .log_range_hashes(&tenant, &consistency_ranges(from, to))
        .await?;
    Ok(axum::Json(json!({
        "tenant": tenant,
        "from": from,
        "to": to,
        "hashes": base64_all(&hashes),
        "checkpoint": note,
    }))
    .into_response())
}
