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
//! The body is one JSON object, or a JSON array of them. Each is mapped to a v1 event by the
//! source's mapping; its id is derived from (source, the payload's own event id), so a
//! re-delivery — or a replay of a captured request inside the window — publishes the same id
//! and is stored once. The answer has the same shape and statuses as `POST /v1/ingest`: 202
//! with per-event results once JetStream acknowledged, 400 when nothing could be mapped (the
//! sender keeps the payload and sees why), 503 when JetStream did not acknowledge.

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use auditbridge_config::Config;
use auditbridge_sources::signature::verify_request;
use auditbridge_sources::{
    Outgoing, SourceKind, WebhookParams, check_tenant, metrics as m, parse_sources,
};
use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::post;
use bytes::Bytes;
use time::OffsetDateTime;

use crate::AppState;
use crate::error::ApiError;
use crate::ingest::{ItemResult, publish_and_answer, read_body};

/// The configured webhook sources, by name.
#[derive(Debug, Default)]
pub struct Webhooks {
    by_name: HashMap<String, WebhookParams>,
}

impl Webhooks {
    /// The `webhook` sources of the configuration (file sources are `tail-file`'s).
    pub fn from_config(config: &Config) -> Result<Webhooks, auditbridge_sources::ConfigError> {
        let by_name = parse_sources(&config.sources)?
            .into_iter()
            .filter_map(|s| match s.kind {
                SourceKind::Webhook(p) => Some((s.name, p)),
                SourceKind::File(_) => None,
            })
            .collect();
        Ok(Webhooks { by_name })
    }
}

pub(crate) fn routes() -> Router<AppState> {
    Router::new().route("/v1/webhooks/{source}", post(receive))
}

fn count(source: &str, result: &'static str) {
    metrics::counter!(m::WEBHOOK_REQUESTS, "source" => source.to_owned(), "result" => result)
        .increment(1);
}

async fn receive(
    State(state): State<AppState>,
    Path(source): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    // Unknown names are not counted by name: the label would be whatever a client typed.
    let Some(params) = state.webhooks.by_name.get(&source) else {
        return Err(ApiError::NotFound(format!(
            "no webhook source named {source:?}"
        )));
    };
    let body = match read_body(&headers, body, state.config.api_max_body_bytes).await {
        Ok(b) => b,
        Err(e) => {
            count(&source, "too_large");
            return Err(e);
        }
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Err(e) = verify_request(params, header, &body, now) {
        count(&source, "unauthorized");
        metrics::counter!(m::WEBHOOK_SIGNATURE_FAILURES, "source" => source.clone(), "reason" => e.label())
            .increment(1);
        tracing::warn!(source = %source, reason = e.label(), error = %e, message = "Webhook signature refused.");
        return Err(ApiError::Unauthorized(match e.label() {
            "missing" => "missing signature or timestamp header",
            "bad_timestamp" => "the timestamp header is not Unix seconds",
            "expired" => "the timestamp is outside the replay window",
            _ => "the signature does not match",
        }));
    }
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
        let mapped = params
            .mapping
            .apply(&source, &payload, max, received_at)
            .and_then(|event| check_tenant(&source, &params.tenants, &event).map(|()| event));
        match mapped {
            Ok(event) => {
                results.push(ItemResult::accepted(index, event.id));
                let raw = matches!(params.mapping, auditbridge_sources::Mapping::Identity)
                    .then_some(payload);
                outgoing.push(Outgoing::new(&event, &state.config.subject_prefix, raw));
            }
            Err(refusal) => {
                tracing::info!(source = %source, index, kind = refusal.kind.as_str(), reason = %refusal.detail, message = "Webhook payload refused.");
                results.push(ItemResult::rejected(
                    index,
                    refusal.kind.as_str(),
                    refusal.detail,
                ));
            }
        }
    }
    match publish_and_answer(&state, outgoing, results).await {
        Ok((status, _, _, response)) => {
            count(
                &source,
                if status == StatusCode::ACCEPTED {
                    "accepted"
                } else {
                    "rejected"
                },
            );
            Ok(response)
        }
        Err(e) => {
            count(&source, "unavailable");
            Err(e)
        }
    }
}
