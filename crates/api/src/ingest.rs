//! `POST /v1/ingest`: v1 events over HTTP, for producers that cannot speak NATS.
//!
//! The body is one event (`Content-Type: application/json`, the default) or a batch of one
//! event per line (`application/x-ndjson` or `application/jsonl`). The token needs the
//! `ingest` scope, and every event's tenant must be one the token may write: a single foreign
//! tenant refuses the whole request with 403 and nothing is published.
//!
//! Each event is validated exactly as the worker would; valid ones are published to
//! `<prefix>.<tenant>.<action>` with `Nats-Msg-Id: <tenant>:<id>`, and the answer waits for JetStream's
//! acks. So a 202 means "durably in the stream" (guarantee 1 starts there), and:
//!
//! - 202 `{"accepted", "rejected", "results": [{"index", "id", "status", "reason"?}]}` when at
//!   least one event was accepted; refused events of the batch are listed with the reason
//!   (the caller fixes and re-sends those; re-sending the whole batch is also safe, the ids
//!   deduplicate).
//! - 400 with the same `results` (and an `error`) when no event was valid.
//! - 401 without a known token, 403 for a missing scope or another tenant, 413 above
//!   `AUDITBRIDGE_API_MAX_BODY_BYTES`.
//! - 503 when JetStream did not acknowledge every accepted event in time: nothing is claimed
//!   accepted (some may be stored; a retry cannot store them twice).

use std::time::Duration;

use auditbridge_event::Uuid;
use auditbridge_runtime::telemetry as m;
use auditbridge_sources::{Outgoing, Publisher, Sink as _};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde::Serialize;

use crate::AppState;
use crate::auth::{Principal, Scope};
use crate::error::ApiError;

/// How long a request waits for JetStream's acks before answering 503.
pub(crate) const ACK_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) fn routes() -> Router<AppState> {
    Router::new().route("/v1/ingest", post(ingest))
}

/// The fate of one event of a request.
#[derive(Debug, Serialize)]
pub(crate) struct ItemResult {
    pub index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<Uuid>,
    pub status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl ItemResult {
    pub(crate) fn accepted(index: usize, id: Uuid) -> ItemResult {
        ItemResult {
            index,
            id: Some(id),
            status: "accepted",
            kind: None,
            reason: None,
        }
    }

    pub(crate) fn rejected(index: usize, kind: &'static str, reason: String) -> ItemResult {
        ItemResult {
            index,
            id: None,
            status: "rejected",
            kind: Some(kind),
            reason: Some(reason),
        }
    }
}

/// Publishes the accepted events and builds the answer: 202 when something was accepted and
/// acknowledged, 400 when nothing was valid, 503 when JetStream did not acknowledge.
pub(crate) async fn publish_and_answer(
    state: &AppState,
    outgoing: Vec<Outgoing>,
    results: Vec<ItemResult>,
) -> Result<(StatusCode, usize, usize, Response), ApiError> {
    let accepted = outgoing.len();
    let rejected = results.len() - accepted;
    if accepted == 0 {
        let body = serde_json::json!({
            "error": {"code": "bad_request", "message": "no valid event in the request; see results", "param": "body"},
            "accepted": 0,
            "rejected": rejected,
            "results": results,
        });
        let response = (StatusCode::BAD_REQUEST, axum::Json(body)).into_response();
        return Ok((StatusCode::BAD_REQUEST, 0, rejected, response));
    }
    let publisher = Publisher::new(state.js.clone(), ACK_TIMEOUT);
    if let Err(e) = publisher.publish(&outgoing).await {
        tracing::warn!(error = %e, events = accepted, message = "JetStream did not acknowledge an HTTP batch; answering 503.");
        return Err(ApiError::Unavailable(format!(
            "the event stream did not acknowledge the events in time ({} of {} acknowledged); nothing is claimed accepted; retry the request (ids deduplicate)",
            e.acked, e.total
        )));
    }
    let body = serde_json::json!({
        "accepted": accepted,
        "rejected": rejected,
        "results": results,
    });
    let response = (StatusCode::ACCEPTED, axum::Json(body)).into_response();
    Ok((StatusCode::ACCEPTED, accepted, rejected, response))
}

/// Longest a request body may take to arrive.
const BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// Reads the whole body, refusing more than `limit` bytes with 413 (by `Content-Length`
/// before reading, and while reading for chunked bodies).
pub(crate) async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<Bytes, ApiError> {
    Ok(read_body_within(headers, body, limit, BODY_TIMEOUT).await?)
}

/// Why a body was not read.
#[derive(Debug)]
pub(crate) enum BodyError {
    TooLarge { limit: usize },
    Timeout(Duration),
    Read(String),
}

impl From<BodyError> for ApiError {
    fn from(e: BodyError) -> ApiError {
        match e {
            BodyError::TooLarge { limit } => ApiError::PayloadTooLarge { limit },
            BodyError::Timeout(t) => ApiError::bad(
                "body",
                format!("not received within {}", humantime::format_duration(t)),
            ),
            BodyError::Read(e) => {
                ApiError::bad("body", format!("could not read the request body: {e}"))
            }
        }
    }
}

/// True when `Content-Length` already says the body is larger than `limit`.
pub(crate) fn declared_too_large(headers: &HeaderMap, limit: usize) -> bool {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        .is_some_and(|n| n > limit)
}

/// [`read_body`] with a deadline of its own.
pub(crate) async fn read_body_within(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    timeout: Duration,
) -> Result<Bytes, BodyError> {
    if declared_too_large(headers, limit) {
        return Err(BodyError::TooLarge { limit });
    }
    // A body that trickles in is given up on: each request may hold up to `limit` bytes, and
    // a client must not be able to pin that memory with a slow upload.
    let read = tokio::time::timeout(timeout, axum::body::to_bytes(body, limit))
        .await
        .map_err(|_| BodyError::Timeout(timeout))?;
    read.map_err(|e| {
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        while let Some(s) = source {
            if s.to_string().contains("length limit exceeded") {
                return BodyError::TooLarge { limit };
            }
            source = s.source();
        }
        BodyError::Read(e.to_string())
    })
}

fn is_ndjson(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .is_some_and(|t| {
            matches!(
                t.as_str(),
                "application/x-ndjson"
                    | "application/ndjson"
                    | "application/jsonl"
                    | "application/x-jsonlines"
            )
        })
}

async fn ingest(
    State(state): State<AppState>,
    principal: Principal,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    principal.require(Scope::Ingest)?;
    let body = read_body(&headers, body, state.config.api_max_body_bytes).await?;
    // (index, bytes): lines of a batch (blank lines skipped), or the whole body.
    let items: Vec<(usize, Bytes)> = if is_ndjson(&headers) {
        let mut items = Vec::new();
        let mut start = 0;
        for (index, line) in body.split(|b| *b == b'\n').enumerate() {
            let end = start + line.len();
            let trimmed = line.strip_suffix(b"\r").unwrap_or(line);
            if !trimmed.iter().all(u8::is_ascii_whitespace) {
                items.push((index, body.slice(start..start + trimmed.len())));
            }
            start = end + 1;
        }
        items
    } else {
        vec![(0, body)]
    };
    if items.is_empty()
        || items
            .iter()
            .all(|(_, b)| b.iter().all(u8::is_ascii_whitespace))
    {
        return Err(ApiError::bad(
            "body",
            "expected an event (or one event per line with Content-Type: application/x-ndjson)",
        ));
    }
    let max = state.config.ingest.max_event_bytes;
    let prefix = &state.config.subject_prefix;
    let mut outgoing = Vec::with_capacity(items.len());
    let mut results = Vec::with_capacity(items.len());
    for (index, bytes) in items {
        match auditbridge_event::decode(&bytes, max) {
            Ok(event) => {
                // One foreign tenant refuses the request: this token cannot write it, and
                // publishing the rest would hide a misrouted producer.
                principal.authorize_tenant(&event.tenant).map_err(|e| {
                    metrics::counter!(m::INGEST_EVENTS, "result" => "forbidden").increment(1);
                    match e {
                        ApiError::Forbidden(msg) => ApiError::Forbidden(format!(
                            "event at index {index}: {msg}; nothing was published"
                        )),
                        other => other,
                    }
                })?;
                results.push(ItemResult::accepted(index, event.id));
                outgoing.push(Outgoing::new(&event, prefix, Some(bytes)));
            }
            Err(invalid) => {
                results.push(ItemResult::rejected(
                    index,
                    invalid.kind.as_str(),
                    invalid.detail,
                ));
            }
        }
    }
    let (_, accepted, rejected, response) = publish_and_answer(&state, outgoing, results).await?;
    metrics::counter!(m::INGEST_EVENTS, "result" => "accepted").increment(accepted as u64);
    metrics::counter!(m::INGEST_EVENTS, "result" => "rejected").increment(rejected as u64);
    Ok(response)
}
