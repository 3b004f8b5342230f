//! Per-route request metrics on every API request.

use std::time::Instant;

use auditbridge_runtime::telemetry::{API_REQUEST_DURATION, API_REQUESTS};
use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;

/// Counts and times every request by its route pattern (never the raw path, whose ids would
/// make the label unbounded) and status code.
pub(crate) async fn track(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |m| m.as_str())
        .to_owned();
    let started = Instant::now();
    let response = next.run(request).await;
    metrics::counter!(API_REQUESTS, "route" => route.clone(), "status" => response.status().as_u16().to_string())
        .increment(1);
    metrics::histogram!(API_REQUEST_DURATION, "route" => route)
        .record(started.elapsed().as_secs_f64());
    response
}
