//! `/metrics`, `/healthz` and `/readyz` on `AUDITBRIDGE_METRICS_ADDR`.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::Health;

#[derive(Clone)]
struct AppState {
    health: Arc<Health>,
    prometheus: PrometheusHandle,
}

/// Serves until `shutdown` is cancelled.
pub(crate) async fn serve(
    listener: TcpListener,
    health: Arc<Health>,
    prometheus: PrometheusHandle,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(AppState { health, prometheus });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

async fn metrics(State(state): State<AppState>) -> Response {
    (
        [("content-type", "text/plain; version=0.0.4")],
        state.prometheus.render(),
    )
        .into_response()
}

/// Ready when the worker can do its job: PostgreSQL answers, NATS is connected, and the
/// stream and consumer are provisioned. The body says which part is missing.
async fn readyz(State(state): State<AppState>) -> Response {
    let h = &state.health;
    let body = serde_json::json!({
        "database": h.db.load(Ordering::Relaxed),
        "nats": h.nats.load(Ordering::Relaxed),
        "consumer": h.consumer.load(Ordering::Relaxed),
    });
    let status = if h.ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}
