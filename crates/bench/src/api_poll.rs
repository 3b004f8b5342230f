//! `auditbridge bench --only api-poll`: an `api` source pulling pages of 1,000 events from a
//! local Okta-like API (in this process, its pages built before the clock starts, so the API
//! is never the limit), next to the raw limit measured in the same run: the same number of
//! events of the same shape, mapped the same way, published by the same publisher in batches
//! of a page, one batch at a time as the poller does, every ack awaited.
//!
//! What the poller adds to the raw rate is its own work per page: the HTTP round trip, the
//! page walked as raw JSON and each item parsed and mapped, and the cursor's fenced commit in
//! PostgreSQL after the acks. Nothing consumes meanwhile (the figure is the pull path's; the
//! worker's ingest is measured by `--only ingest`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use auditbridge_config::Config;
use auditbridge_sources::poll::Poller;
use auditbridge_sources::{Mapping, Outgoing, Publisher, Sink as _, SourceKind};
use axum::extract::{Query, State};
use axum::response::IntoResponse;
use bytes::Bytes;
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio_util::sync::CancellationToken;

use crate::Bench;

const PAGE: usize = 1000;
const ACTIONS: [(&str, &str); 4] = [
    ("user.session.start", "session.create"),
    ("user.session.end", "session.delete"),
    ("user.account.update_password", "user.update"),
    ("application.user_membership.add", "membership.create"),
];

pub(crate) async fn measure(bench: Bench<'_>) -> anyhow::Result<()> {
    let Bench {
        args, config, js, ..
    } = bench;
    let n = args.poll_events.div_ceil(PAGE) * PAGE;
    println!("auditbridge bench, api poll: {n} events in pages of {PAGE} (link cursor)");
    auditbridge_runtime::provision::ensure_stream(js, config).await?;

    // The API, serving pages built beforehand.
    let pages: Vec<Bytes> = (0..n / PAGE)
        .map(|p| {
            let page: Vec<Value> = (p * PAGE..(p + 1) * PAGE)
                .map(|i| item("poll", i, args.tenants))
                .collect();
            Bytes::from(serde_json::to_vec(&page).expect("pages serialize"))
        })
        .collect();
    let mean = pages.iter().map(Bytes::len).sum::<usize>() / n;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let stop = CancellationToken::new();
    let app = axum::Router::new()
        .route("/api/v1/logs", axum::routing::get(page))
        .with_state(Arc::new(Api {
            pages,
            base: base.clone(),
        }));
    let serving = tokio::spawn(
        axum::serve(listener, app)
            .with_graceful_shutdown(stop.clone().cancelled_owned())
            .into_future(),
    );

    let tenants: Vec<String> = (0..args.tenants).map(tenant).collect();
    let source = json!({
        "name": "bench-okta",
        "type": "api",
        "params": {
            "url": format!("{base}/api/v1/logs"),
            "cursor": "link",
            "headers": {"Authorization": "SSWS bench-token-0123456789"},
            "interval": "1s",
            "page_size": PAGE,
            "tenants": tenants,
            "mapping": {
                "id": "/uuid",
                "tenant": "/org",
                "type": "/eventType",
                "actions": ACTIONS.iter().map(|(k, v)| ((*k).to_owned(), Value::from(*v))).collect::<serde_json::Map<_, _>>(),
                "occurred_at": "/published",
                "outcome": "/outcome/result",
                "outcomes": {"SUCCESS": "success", "FAILURE": "failure"},
                "actor": {"id": "/actor/id", "type": {"const": "user"}, "name": "/actor/displayName", "ip": "/client/ipAddress"},
                "target": {"id": "/target/0/id", "type": {"const": "app"}},
                "metadata": {"user_agent": "/client/userAgent/rawUserAgent", "request": "/debugContext/debugData/requestId"}
            }
        }
    });
    let mut vars: Vec<(String, String)> = vec![
        ("AUDITBRIDGE_SOURCES".into(), json!([source]).to_string()),
        (
            "AUDITBRIDGE_ID_KEY".into(),
            "bench-id-key-0123456789abcdef0123456789".into(),
        ),
    ];
    vars.push(("AUDITBRIDGE_LOG".into(), "error".into()));
    let loaded = Config::from_env(vars).context("the benchmark's api source")?;
    let Some(SourceKind::Api(params)) = loaded.sources.into_iter().next().map(|s| s.kind) else {
        bail!("the benchmark's source is not an api source");
    };
    let publisher = Publisher::new(js.clone(), Duration::from_secs(30));

    let result = async {
        // 1. Raw: other events of the same shape (the poll's would be JetStream duplicates
        //    after them), mapped beforehand, published a page at a time.
        let mapping = Mapping::new(&params.mapping);
        let received = OffsetDateTime::now_utc();
        let batches: Vec<Vec<Outgoing>> = (0..n / PAGE)
            .map(|p| {
                (p * PAGE..(p + 1) * PAGE)
                    .map(|i| {
                        let mapped = mapping
                            .apply_value("bench-okta", &item("raw", i, args.tenants), 1 << 20, received)
                            .expect("the benchmark's items map");
                        Outgoing::mapped(&mapped, &config.subject_prefix, None)
                    })
                    .collect()
            })
            .collect();
        let started = Instant::now();
        for b in &batches {
            publisher.publish(b).await.context("raw publishing")?;
        }
        let raw_rate = n as f64 / started.elapsed().as_secs_f64();
        println!(
            "raw limit     JetStream publish with acks, a page of {PAGE} at a time: {raw_rate:>9.0} msg/s  (items of ~{mean} bytes as served)"
        );
        drop(batches);

        // 2. The poller, in this process, from an empty cursor to the last page.
        let before = stream_messages(js, &config.stream).await?;
        let holder = auditbridge_runtime::holder_id();
        let poller = Poller::new(
            "bench-okta".into(),
            (*params).clone(),
            publisher.clone(),
            bench.store.clone(),
            holder,
            config.subject_prefix.clone(),
            config.ingest.max_event_bytes,
        )?;
        let shutdown = CancellationToken::new();
        let started = Instant::now();
        let running = {
            let token = shutdown.clone();
            tokio::spawn(async move { poller.run(token).await })
        };
        let deadline = started + Duration::from_secs(600);
        while stream_messages(js, &config.stream).await? < before + n as u64 {
            if Instant::now() > deadline || running.is_finished() {
                shutdown.cancel();
                bail!("the poller did not publish {n} events in 10 minutes");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let elapsed = started.elapsed();
        shutdown.cancel();
        running.await??;
        let rate = n as f64 / elapsed.as_secs_f64();
        println!(
            "api poll      pages of {PAGE}, cursor committed per page:  {rate:>9.0} events/s  ({:.2} of raw; target: bounded by publishing, >= 0.80)",
            rate / raw_rate
        );
        anyhow::Ok(())
    }
    .await;
    stop.cancel();
    let _ = serving.await;
    result
}

struct Api {
    pages: Vec<Bytes>,
    base: String,
}

/// Okta's System Log in its polling shape: a page by `after`, and always a next link (the
/// same page again once there is no more).
async fn page(
    State(api): State<Arc<Api>>,
    Query(query): Query<Vec<(String, String)>>,
) -> axum::response::Response {
    let at: usize = query
        .iter()
        .find(|(k, _)| k == "after")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let (body, next) = match api.pages.get(at) {
        Some(p) => (p.clone(), at + 1),
        None => (Bytes::from_static(b"[]"), at),
    };
    (
        [
            ("content-type", "application/json".to_owned()),
            (
                "link",
                format!("<{}/api/v1/logs?after={next}>; rel=\"next\"", api.base),
            ),
        ],
        body,
    )
        .into_response()
}

fn tenant(i: usize) -> String {
    format!("tenant-{i:03}")
}

/// One Okta-like System Log event, about 700 bytes.
fn item(prefix: &str, i: usize, tenants: usize) -> Value {
    let published =
        OffsetDateTime::now_utc() - Duration::from_secs(3600) + Duration::from_millis(i as u64);
    let (kind, _) = ACTIONS[i % ACTIONS.len()];
    json!({
        "uuid": format!("{prefix}-{i:09}-5b1c-11ef-9f3c-0d2a8e4e7f10"),
        "published": published.format(&Rfc3339).expect("times format"),
        "eventType": kind,
        "org": tenant(i % tenants.max(1)),
        "version": "0",
        "severity": "INFO",
        "displayMessage": "User login to Okta",
        "actor": {"id": format!("00u{:08x}", i * 7919 % 100_000), "type": "User", "alternateId": format!("user{}@example.com", i % 5000), "displayName": format!("User {}", i % 5000)},
        "client": {
            "userAgent": {"rawUserAgent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36", "os": "Linux", "browser": "CHROME"},
            "zone": "null", "device": "Computer", "ipAddress": format!("198.51.100.{}", i % 250)
        },
        "outcome": {"result": if i.is_multiple_of(17) { "FAILURE" } else { "SUCCESS" }},
        "target": [{"id": format!("0oa{:06x}", i % 300), "type": "AppInstance", "displayName": "Salesforce"}],
        "transaction": {"type": "WEB", "id": format!("Y{i:016x}")},
        "debugContext": {"debugData": {"requestId": format!("req-{i:012}"), "requestUri": "/api/v1/authn"}}
    })
}

async fn stream_messages(js: &async_nats::jetstream::Context, stream: &str) -> anyhow::Result<u64> {
    Ok(js.get_stream(stream).await?.info().await?.state.messages)
}
