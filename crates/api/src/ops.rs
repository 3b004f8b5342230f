//! What operators watch: per-route request metrics on every API request, and `/metrics`,
//! `/healthz` and `/readyz` on `AUDITBRIDGE_METRICS_ADDR` (a separate listener, as for the
//! worker, so the API port carries no operational endpoints).

use std::time::{Duration, Instant};

use auditbridge_store::Store;
use auditbridge_worker::telemetry::{API_REQUEST_DURATION, API_REQUESTS};
use axum::Router;
use axum::extract::{MatchedPath, Request};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

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

#[derive(Clone)]
struct OpsState {
    prometheus: PrometheusHandle,
    store: Store,
    nats: async_nats::Client,
}

/// Serves the operational endpoints until `shutdown`.
pub(crate) async fn serve(
    listener: TcpListener,
    prometheus: PrometheusHandle,
    store: Store,
    nats: async_nats::Client,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let upkeep = prometheus.clone();
    let app = Router::new()
        .route(
            "/metrics",
            get(
                |axum::extract::State(s): axum::extract::State<OpsState>| async move {
                    (
                        [("content-type", "text/plain; version=0.0.4")],
                        s.prometheus.render(),
                    )
                },
            ),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(OpsState {
            prometheus,
            store,
            nats,
        });
    let stop = shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = auditbridge_worker::telemetry::upkeep(upkeep) => {}
        }
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

/// Ready when PostgreSQL answers (queries) and NATS is connected (ingest, webhooks); the body
/// says which part is missing.
async fn readyz(axum::extract::State(s): axum::extract::State<OpsState>) -> Response {
    let database = matches!(
        tokio::time::timeout(Duration::from_secs(2), s.store.ping()).await,
        Ok(Ok(()))
    );
    let nats = s.nats.connection_state() == async_nats::connection::State::Connected;
    let status = if database && nats {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        axum::Json(serde_json::json!({"database": database, "nats": nats})),
    )
        .into_response()
}
