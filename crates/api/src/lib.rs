//! `auditbridge serve`: the query API over the trail, and HTTP ways into it.
//!
//! - `GET /v1/events` (filters, keyset pages), `GET /v1/events/{id}`: [`events`].
//! - `GET /v1/events/stream`: the live tail as Server-Sent Events: [`tail`].
//! - `GET /v1/stats`: counts by action and outcome over time, for charts: [`stats`].
//! - `GET /`: a small page showing a tenant's recent events, the live tail and the charts.
//! - `GET /v1/openapi.json`: the OpenAPI document, built from the same parameter
//!   declarations the handlers parse with ([`params`]).
//!
//! Every `/v1` route needs a bearer token ([`auth`]); a token sees one tenant (or, marked admin,
//! all of them), and asking for another tenant is a 403, never an empty answer.
//!
//! Operators get per-route request metrics ([`track`]) and `/metrics`, `/healthz`, `/readyz`
//! on `AUDITBRIDGE_METRICS_ADDR` (`auditbridge_runtime::ops`, as for the worker).
//!
//! [`Server::build`] binds the address (so tests can bind port 0 and read it back);
//! [`Server::run`] serves until its shutdown token is cancelled. Reads go to PostgreSQL
//! through `auditbridge-store`; the server keeps no state of its own beyond the live tail's
//! in-memory fan-out.

pub mod auth;
mod budget;
pub mod error;
mod events;
mod ingest;
mod log;
mod openapi;
mod page;
pub mod params;
mod stats;
mod tail;
mod track;
mod webhooks;
mod write_timeout;

use std::future::IntoFuture as _;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use async_nats::jetstream;
use auditbridge_config::Config;
use auditbridge_runtime::ops::{self, Health};
use auditbridge_runtime::shutdown::Deadline;
use auditbridge_store::Store;
use axum::Router;
use axum::extract::FromRef;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use auth::{Principal, Scope, Tokens};
pub use error::ApiError;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub tokens: Arc<Tokens>,
    /// JetStream, for the routes that write events (they publish; the worker persists).
    pub js: jetstream::Context,
    pub config: Arc<Config>,
    pub(crate) tail: Arc<tail::Hub>,
    /// Database statements per token ([`budget`]).
    pub(crate) budget: Arc<budget::DbBudget>,
    /// The `webhook` sources of `[[sources]]`, for `POST /v1/webhooks/{source}`.
    pub(crate) webhooks: Arc<webhooks::Webhooks>,
}

impl FromRef<AppState> for Arc<Tokens> {
    fn from_ref(state: &AppState) -> Self {
        state.tokens.clone()
    }
}

/// The API server, bound and ready to run.
pub struct Server {
    listener: TcpListener,
    metrics_listener: TcpListener,
    prometheus: metrics_exporter_prometheus::PrometheusHandle,
    state: AppState,
    nats: async_nats::Client,
    hub_start: tail::HubStart,
}

impl Server {
    /// Validates the tokens, binds `AUDITBRIDGE_API_ADDR`, and prepares connections (the
    /// database and NATS are connected lazily, so the server starts while either is down).
    pub async fn build(config: Config) -> anyhow::Result<Server> {
        let tokens = Tokens::new(&config.api_tokens);
        let webhooks = webhooks::Webhooks::from_config(&config);
        if tokens.is_empty() {
            tracing::warn!(
                message = "No API tokens are configured (AUDITBRIDGE_API_TOKENS or [[api_tokens]]); every /v1 request will be refused. Create one with `auditbridge token new`."
            );
        }
        let listener = TcpListener::bind(config.api_addr)
            .await
            .with_context(|| format!("binding AUDITBRIDGE_API_ADDR={}", config.api_addr))?;
        let metrics_listener = TcpListener::bind(config.metrics_addr)
            .await
            .with_context(|| format!("binding AUDITBRIDGE_METRICS_ADDR={}", config.metrics_addr))?;
        // A statement that runs longer than `AUDITBRIDGE_API_STATEMENT_TIMEOUT` is cancelled
        // by PostgreSQL: one costly request cannot hold a connection.
        let store = Store::connect_lazy_for_queries(
            config.database_url.expose(),
            config.ingest.db_max_connections,
            config.api_statement_timeout,
        )?;
        // The live tail's hub reads on a connection of its own: requests can never starve it,
        // and it never takes one of theirs.
        let hub_store = Store::connect_lazy_for_queries(
            config.database_url.expose(),
            1,
            config.api_statement_timeout,
        )?;
        let nats =
            auditbridge_runtime::nats::connect(config.nats_url.expose(), "auditbridge-serve")
                .await?;
        let (hub, hub_start) = tail::Hub::new(hub_store, config.api_heartbeat);
        let budget = Arc::new(budget::DbBudget::new(config.ingest.db_max_connections));
        Ok(Server {
            listener,
            metrics_listener,
            prometheus: auditbridge_runtime::telemetry::prometheus(),
            state: AppState {
                store,
                tokens: Arc::new(tokens),
                js: jetstream::new(nats.clone()),
                config: Arc::new(config),
                tail: Arc::new(hub),
                budget,
                webhooks: Arc::new(webhooks),
            },
            nats,
            hub_start,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Serves until `shutdown` is cancelled; open live tails are ended, requests in flight
    /// finish, and the whole stop is bounded by one `shutdown_timeout`.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Server {
            listener,
            metrics_listener,
            prometheus,
            state,
            nats,
            hub_start,
        } = self;
        let tasks = TaskTracker::new();
        tasks.spawn(hub_start.run(shutdown.clone()));
        tasks.spawn(auditbridge_runtime::db_role::warn_if_privileged(
            state.store.clone(),
            "serve",
            auditbridge_store::roles::READER,
            shutdown.clone(),
        ));
        let health = Arc::new(Health::for_service());
        tasks.spawn(ops::watch_connections(
            Some(state.store.clone()),
            nats.clone(),
            health.clone(),
            shutdown.clone(),
        ));
        tasks.spawn(ops::serve(
            metrics_listener,
            health,
            prometheus,
            shutdown.clone(),
        ));
        let timeout = state.config.shutdown_timeout;
        let state_write_timeout = state.config.api_write_timeout;
        let store = state.store.clone();
        let app = router(state);
        let listener = write_timeout::WriteTimeoutListener::new(listener, state_write_timeout);
        let serve = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.clone().cancelled_owned())
            .into_future();
        tokio::pin!(serve);
        let ended = tokio::select! {
            r = &mut serve => Some(r),
            _ = shutdown.cancelled() => None,
        };
        // One deadline for the whole stop (AUDITBRIDGE_SHUTDOWN_TIMEOUT).
        let deadline = Deadline::after(timeout);
        let served = match ended {
            Some(r) => r,
            // Graceful shutdown waits for open requests; the hub ends live tails, and what is
            // still open at the deadline is cut.
            None => deadline
                .within("finishing open requests", &mut serve)
                .await
                .unwrap_or(Ok(())),
        };
        tasks.close();
        deadline.within("stopping tasks", tasks.wait()).await;
        deadline
            .within("flushing publishes to NATS", nats.flush())
            .await;
        deadline
            .within("closing database connections", store.close())
            .await;
        tracing::info!(message = "API server stopped.");
        served.context("serving the API")
    }
}

fn router(state: AppState) -> Router {
    Router::new()
        .merge(events::routes())
        .merge(log::routes())
        .merge(tail::routes())
        .merge(stats::routes())
        .merge(page::routes())
        .merge(openapi::routes())
        .merge(ingest::routes())
        .merge(webhooks::routes())
        .layer(axum::middleware::from_fn(track::track))
        .with_state(state)
}
