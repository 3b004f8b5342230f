//! The operational server every service runs on `AUDITBRIDGE_METRICS_ADDR`: `/metrics`,
//! `/healthz` and `/readyz`, on a listener of its own so that the API port carries no
//! operational endpoints. What `/readyz` reports is a [`Health`], kept current by the tasks
//! that find out and by [`watch_connections`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use auditbridge_store::Store;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics::gauge;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::telemetry::{DATABASE_UP, NATS_UP, upkeep};

/// What `/readyz` reports: NATS is connected, PostgreSQL answers (for the services that use
/// it) and, for a worker, the stream and consumer are provisioned. Updated by the tasks that
/// find out.
#[derive(Debug)]
pub struct Health {
    /// `None` for a service that uses no database (`tail-file`).
    database: Option<AtomicBool>,
    nats: AtomicBool,
    /// `None` for a service that consumes nothing (`serve`, `tail-file`).
    consumer: Option<AtomicBool>,
}

impl Health {
    /// The health of a worker: ready once the consumer is provisioned too.
    pub fn for_consumer() -> Health {
        Health {
            database: Some(AtomicBool::new(false)),
            nats: AtomicBool::new(false),
            consumer: Some(AtomicBool::new(false)),
        }
    }

    /// The health of a service that needs PostgreSQL and NATS (`serve`).
    pub fn for_service() -> Health {
        Health {
            database: Some(AtomicBool::new(false)),
            nats: AtomicBool::new(false),
            consumer: None,
        }
    }

    /// The health of a service that only publishes to NATS (`tail-file`).
    pub fn for_publisher() -> Health {
        Health {
            database: None,
            nats: AtomicBool::new(false),
            consumer: None,
        }
    }

    pub fn set_database(&self, up: bool) {
        if let Some(database) = &self.database {
            database.store(up, Ordering::Relaxed);
        }
    }

    pub fn set_nats(&self, up: bool) {
        self.nats.store(up, Ordering::Relaxed);
    }

    pub fn set_consumer(&self, up: bool) {
        if let Some(consumer) = &self.consumer {
            consumer.store(up, Ordering::Relaxed);
        }
    }

    pub fn ready(&self) -> bool {
        let up =
            |part: &Option<AtomicBool>| part.as_ref().is_none_or(|p| p.load(Ordering::Relaxed));
        up(&self.database) && self.nats.load(Ordering::Relaxed) && up(&self.consumer)
    }

    /// `/readyz`'s body: each part and whether it is up.
    fn parts(&self) -> serde_json::Value {
        let mut parts = serde_json::json!({"nats": self.nats.load(Ordering::Relaxed)});
        if let Some(database) = &self.database {
            parts["database"] = database.load(Ordering::Relaxed).into();
        }
        if let Some(consumer) = &self.consumer {
            parts["consumer"] = consumer.load(Ordering::Relaxed).into();
        }
        parts
    }
}

#[derive(Clone)]
struct OpsState {
    health: Arc<Health>,
    prometheus: PrometheusHandle,
}

/// Serves `/metrics`, `/healthz` and `/readyz` until `shutdown` is cancelled, and keeps the
/// recorder's histograms drained meanwhile.
pub async fn serve(
    listener: TcpListener,
    health: Arc<Health>,
    prometheus: PrometheusHandle,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(OpsState {
            health,
            prometheus: prometheus.clone(),
        });
    let server = axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned());
    tokio::select! {
        served = server => served,
        never = upkeep(prometheus) => match never {},
    }
}

async fn metrics(State(state): State<OpsState>) -> Response {
    (
        [("content-type", "text/plain; version=0.0.4")],
        state.prometheus.render(),
    )
        .into_response()
}

/// 200 when the service can do its job, 503 otherwise; the body says which part is missing.
async fn readyz(State(state): State<OpsState>) -> Response {
    let status = if state.health.ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(state.health.parts())).into_response()
}

/// Keeps the database (when the service has one) and NATS parts of `health`, and the `*_up`
/// gauges, current: checks every 2 s until `stop`. (A check per `/readyz` request instead
/// would let anyone who can reach the port make the service query its database at will.)
pub async fn watch_connections(
    store: Option<Store>,
    nats: async_nats::Client,
    health: Arc<Health>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Some(store) = &store {
            let db = matches!(
                tokio::time::timeout(Duration::from_secs(2), store.ping()).await,
                Ok(Ok(()))
            );
            health.set_database(db);
            gauge!(DATABASE_UP).set(if db { 1.0 } else { 0.0 });
        }
        let nats_up = nats.connection_state() == async_nats::connection::State::Connected;
        health.set_nats(nats_up);
        gauge!(NATS_UP).set(if nats_up { 1.0 } else { 0.0 });
    }
}
