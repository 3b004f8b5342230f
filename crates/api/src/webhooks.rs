//! `POST /v1/webhooks/{source}`: systems that push their own event shapes.
//!
//! Each `webhook` source of `[[sources]]` has a secret and a signature scheme (by default
//! `X-Auditbridge-Timestamp` and `X-Auditbridge-Signature: v1=<hex HMAC-SHA256 of
//! "<timestamp>.<body>">`, the scheme the HTTP destination signs with), checked in constant
//! time on the raw body before anything is parsed. A bad or missing signature, or a timestamp
//! outside the source's replay window (5 minutes by default), is answered 401 and counted in
//! `auditbridge_webhook_signature_failures_total{source,reason}`. No bearer token: the
//! signature is the authentication, and the source's mapping decides the tenant.
//!
//! **Before the body.** The body is the only thing an unauthenticated sender can make large
//! or slow, so everything else is checked first and refused without reading it: the source
//! exists (404); the signature and timestamp headers are present, well-formed, and the
//! timestamp is inside the window (401); `Content-Length` is within the source's
//! `max_body_bytes` (413, default 1 MiB). Then a request takes a permit of its source
//! (`max_concurrent_requests`, default 16) and one of [`MAX_CONCURRENT`] for all webhooks
//! together: first from the source's own share of them (`MAX_CONCURRENT / sources`, at most
//! its `max_concurrent_requests`), which no other source can take, else from the shared
//! rest; with none free it is answered 503 with `Retry-After` at once. The body must
//! then arrive within the source's `body_timeout` (default 5 s). So unsigned senders cost no
//! memory, and signed-looking slow ones at most `permits × max_body_bytes` for
//! `body_timeout`.
//!
//! The body is one JSON object, or a JSON array of them. Each is mapped to a v1 event by the
//! source's mapping; its id is derived from (source, the payload's own event id), so a
//! re-delivery — or a replay of a captured request inside the window — publishes the same id
//! and is stored once. The answer has the same shape and statuses as `POST /v1/ingest`: 202
//! with per-event results once JetStream acknowledged, 400 when nothing could be mapped (the
//! sender keeps the payload and sees why), 503 when JetStream did not acknowledge.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use auditbridge_config::Config;
use auditbridge_runtime::telemetry as m;
use auditbridge_sources::signature::{SignatureError, check_headers, verify_body};
use auditbridge_sources::{Mapping, Outgoing, SourceKind, WebhookParams, check_tenant};
use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse as _, Response};
use axum::routing::post;
use bytes::Bytes;
use time::OffsetDateTime;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::Instrument as _;

use crate::AppState;
use crate::error::ApiError;
use crate::ingest::{
    BodyError, ItemResult, declared_too_large, publish_and_answer, read_body_within,
};

/// Most webhook requests read and published at once, over every source: with the default
/// body limit, at most 64 MiB of bodies in memory.
pub(crate) const MAX_CONCURRENT: usize = 64;

/// What a client is told to wait before retrying when every permit is taken.
const RETRY_AFTER_SECS: u32 = 1;

/// One configured source and its permits.
#[derive(Debug)]
struct Source {
    params: WebhookParams,
    /// Its mapping, with the id key ready.
    mapping: Mapping,
    /// Its `max_concurrent_requests`.
    permits: Arc<Semaphore>,
    /// Its share of [`MAX_CONCURRENT`] that no other source can take: `MAX_CONCURRENT / n`
    /// for `n` sources, at most its `max_concurrent_requests`. Beyond it a request borrows
    /// from the shared rest.
    reserved: Arc<Semaphore>,
}

/// The configured webhook sources, by name.
#[derive(Debug)]
pub(crate) struct Webhooks {
    by_name: HashMap<String, Source>,
    permits: Arc<Semaphore>,
}

impl Default for Webhooks {
    fn default() -> Webhooks {
        Webhooks {
            by_name: HashMap::new(),
            permits: Arc::new(Semaphore::new(MAX_CONCURRENT)),
        }
    }
}

impl Webhooks {
    /// The `webhook` sources of the configuration (file sources are `tail-file`'s).
    pub(crate) fn from_config(config: &Config) -> Webhooks {
        let webhooks: Vec<(String, WebhookParams)> = config
            .sources
            .iter()
            .filter_map(|s| match &s.kind {
                SourceKind::Webhook(params) => Some((s.name.clone(), params.clone())),
                SourceKind::File(_) | SourceKind::Api(_) => None,
            })
            .collect();
        Webhooks::new(webhooks)
    }

    fn new(webhooks: Vec<(String, WebhookParams)>) -> Webhooks {
        // Each source keeps a share of the permits for itself, so senders of well-formed but
        // false signatures that hold one source's permits (for up to its `body_timeout`)
        // cannot take another source's.
        let share = MAX_CONCURRENT / webhooks.len().max(1);
        let mut reserved_total = 0;
        let by_name = webhooks
            .into_iter()
            .map(|(name, params)| {
                let reserved = share.min(params.max_concurrent_requests);
                reserved_total += reserved;
                let source = Source {
                    permits: Arc::new(Semaphore::new(params.max_concurrent_requests)),
                    reserved: Arc::new(Semaphore::new(reserved)),
                    mapping: Mapping::new(&params.mapping),
                    params,
                };
                (name, source)
            })
            .collect();
        Webhooks {
            by_name,
            permits: Arc::new(Semaphore::new(MAX_CONCURRENT - reserved_total)),
        }
    }
}

pub(crate) fn routes() -> Router<AppState> {
    Router::new().route("/v1/webhooks/{source}", post(receive))
}

fn count(source: &str, result: &'static str) {
    metrics::counter!(m::WEBHOOK_REQUESTS, "source" => source.to_owned(), "result" => result)
        .increment(1);
}

fn refuse_signature(source: &str, e: &SignatureError) -> ApiError {
    count(source, "unauthorized");
    metrics::counter!(m::WEBHOOK_SIGNATURE_FAILURES, "source" => source.to_owned(), "reason" => e.label())
        .increment(1);
    tracing::warn!(reason = e.label(), error = %e, message = "Webhook signature refused.");
    ApiError::Unauthorized(match e.label() {
        "missing" => "missing signature or timestamp header",
        "bad_timestamp" => "the timestamp header is not Unix seconds",
        "expired" => "the timestamp is outside the replay window",
        "malformed" => "the signature header is not of the form <prefix><hex HMAC-SHA256>",
        _ => "the signature does not match",
    })
}

/// 503 with `Retry-After`: every permit is taken.
fn busy(source: &str, what: &str) -> Response {
    count(source, "busy");
    tracing::info!(
        limit = what,
        message = "Webhook request refused: too many at once."
    );
    let mut response = ApiError::Unavailable(format!(
        "too many webhook requests at once ({what}); retry after {RETRY_AFTER_SECS} s"
    ))
    .into_response();
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
    response
}

/// Both permits, or which limit is reached.
fn take_permits(
    webhooks: &Webhooks,
    source: &Source,
) -> Result<(OwnedSemaphorePermit, OwnedSemaphorePermit), &'static str> {
    let own = source
        .permits
        .clone()
        .try_acquire_owned()
        .map_err(|_| "params.max_concurrent_requests of this source")?;
    let all = source
        .reserved
        .clone()
        .try_acquire_owned()
        .or_else(|_| webhooks.permits.clone().try_acquire_owned())
        .map_err(|_| "all webhook sources: this source's share and the shared rest")?;
    Ok((own, all))
}

async fn receive(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    // Unknown names are not counted by name: the label would be whatever a client typed.
    let Some(source) = state.webhooks.by_name.get(&name) else {
        return Err(ApiError::NotFound(format!(
            "no webhook source named {name:?}"
        )));
    };
    let span = tracing::info_span!("source", source = %name);
    receive_for(&state, &name, source, headers, body)
        .instrument(span)
        .await
}

/// One request of a configured webhook source, inside its span.
async fn receive_for(
    state: &AppState,
    name: &str,
    source: &Source,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let params = &source.params;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let header = |h: &str| headers.get(h).and_then(|v| v.to_str().ok());
    let presented = check_headers(params, header, now).map_err(|e| refuse_signature(name, &e))?;
    if declared_too_large(&headers, params.max_body_bytes) {
        count(name, "too_large");
        return Err(ApiError::PayloadTooLarge {
            limit: params.max_body_bytes,
        });
    }
    // Held until the answer: the body and the publish are what the permits bound.
    let _permits = match take_permits(&state.webhooks, source) {
        Ok(p) => p,
        Err(limit) => return Ok(busy(name, limit)),
    };
    let body =
        match read_body_within(&headers, body, params.max_body_bytes, params.body_timeout).await {
            Ok(b) => b,
            Err(e) => {
                count(
                    name,
                    match e {
                        BodyError::TooLarge { .. } => "too_large",
                        BodyError::Timeout(_) => "timeout",
                        BodyError::Read(_) => "rejected",
                    },
                );
                return Err(e.into());
            }
        };
    verify_body(params, &presented, &body).map_err(|e| refuse_signature(name, &e))?;
    let payloads: Vec<Bytes> = match serde_json::from_slice::<serde_json::Value>(&body) {
        Ok(serde_json::Value::Array(items)) => items
            .iter()
            .map(|v| Bytes::from(serde_json::to_vec(v).expect("JSON values serialize")))
            .collect(),
        _ => vec![body],
    };
    let received_at = OffsetDateTime::now_utc();
    let max = state.config.ingest.max_event_bytes;
    let mut outgoing = Vec::with_capacity(payloads.len());
    let mut results = Vec::with_capacity(payloads.len());
    for (index, payload) in payloads.into_iter().enumerate() {
        let mapped = source
            .mapping
            .apply(name, &payload, max, received_at)
            .and_then(|mapped| check_tenant(name, &params.tenants, &mapped.event).map(|()| mapped));
        match mapped {
            Ok(mapped) => {
                results.push(ItemResult::accepted(index, mapped.event.id));
                let raw = matches!(source.mapping, Mapping::Identity).then_some(payload);
                outgoing.push(Outgoing::mapped(&mapped, &state.config.subject_prefix, raw));
            }
            Err(refusal) => {
                tracing::info!(index, kind = refusal.kind.as_str(), reason = %refusal.detail, message = "Webhook payload refused.");
                results.push(ItemResult::rejected(
                    index,
                    refusal.kind.as_str(),
                    refusal.detail,
                ));
            }
        }
    }
    match publish_and_answer(state, outgoing, results).await {
        Ok((status, _, _, response)) => {
            count(
                name,
                if status == StatusCode::ACCEPTED {
                    "accepted"
                } else {
                    "rejected"
                },
            );
            Ok(response)
        }
        Err(e) => {
            count(name, "unavailable");
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Five sources of 16 permits each: four flooded by senders that hold their permits (a
    /// false signature, a slow body) leave the fifth its own share; before the shares, the
    /// four took all 64 and the fifth got none.
    #[test]
    fn a_flooded_source_cannot_take_another_sources_share() {
        let raw: Vec<serde_json::Value> = (0..5)
            .map(|i| {
                serde_json::json!({"name": format!("s{i}"), "type": "webhook",
                "params": {"secret": "0123456789abcdef", "max_concurrent_requests": 16}})
            })
            .collect();
        let vars = [(
            "AUDITBRIDGE_SOURCES".to_owned(),
            serde_json::Value::from(raw).to_string(),
        )];
        let webhooks = Webhooks::from_config(&Config::from_env(vars).unwrap());
        let source = |name: &str| &webhooks.by_name[name];
        let mut held = Vec::new();
        for name in ["s0", "s1", "s2", "s3"] {
            while let Ok(p) = take_permits(&webhooks, source(name)) {
                held.push(p);
            }
        }
        // Each flooded source got its share (12) and the shared rest (4) went to the first.
        assert_eq!(held.len(), 4 * 12 + 4);
        let mut fifth = Vec::new();
        while let Ok(p) = take_permits(&webhooks, source("s4")) {
            fifth.push(p);
        }
        assert_eq!(fifth.len(), 12, "the fifth source keeps its share");
        // Never more than MAX_CONCURRENT bodies in all.
        assert!(held.len() + fifth.len() <= MAX_CONCURRENT);
        drop(held);
        assert!(
            take_permits(&webhooks, source("s4")).is_ok(),
            "the shared rest is back"
        );
    }
}
