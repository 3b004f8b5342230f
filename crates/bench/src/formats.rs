//! `auditbridge bench`, formats part: what a destination's `schema` and a ten-rule `redact`
//! policy cost in forwarding, as a ratio of `native` without rules measured in the same run
//! (target: at least 0.80 for every schema).
//!
//! One backlog of stored events is drained by one worker through each variant in turn, each
//! a destination of its own from `start: earliest`, through two transports where the broker
//! or the receiver does not bound it: an HTTP destination (NDJSON, batches of 500) posting to
//! a receiver in this process that reads every body and answers 200, and RabbitMQ `batch`
//! mode (one NDJSON message per batch) with a consumer draining the queue. `native` runs
//! first and last, so drift over the run shows; the ratio is against the faster of the two.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::Context as _;
use auditbridge_event::synth::Generator;
use auditbridge_fixtures::synthetic;
use axum::body::Bytes;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::forward::{Bus, watch_drain};
use crate::{Bench, STOP_GRACE, persist_synthetic, spawn_worker};

/// Ten rules of the kinds the README's starter policy uses, each selecting values the
/// synthetic events carry (session ids, IPs, user agents, trace ids, recipients), so the
/// rules do work on every event rather than only look.
fn ten_rules() -> serde_json::Value {
    serde_json::json!([
        {"key": "(?i)^(password|passwd|pwd|secret|client_secret|private_key)$", "action": "drop"},
        {"key": "(?i)^(token|access_token|refresh_token|id_token|api_?key|authorization|cookie|session(_id)?)$", "action": "drop"},
        {"key": "(?i)^(card(_?number)?|pan|cc_?number|cvv|cvc)$", "action": "mask"},
        {"key": "(?i)^(ssn|national_id|passport(_number)?|tax_id|nin)$", "action": "mask"},
        {"key": "(?i)^(e?mail|email_address|phone(_number)?|mobile)$", "action": "hmac"},
        {"path": "/actor/ip", "action": "hmac"},
        {"path": "/actor/user_agent", "action": "mask"},
        {"path": "/metadata/trace_id", "action": "hmac"},
        {"path": "/metadata/geo/asn", "action": "drop"},
        {"path": "/metadata/recipient/id", "action": "hmac"},
    ])
}

/// A key for the `hmac` rules (the worker refuses `hmac` without one).
const REDACT_KEY: &str = "bench-redaction-key-0123456789abcdef0123456789";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Transport {
    Http,
    RabbitBatch,
}

impl Transport {
    fn label(self) -> &'static str {
        match self {
            Transport::Http => "http ndjson",
            Transport::RabbitBatch => "rabbitmq batch",
        }
    }

    /// The variants measured: (label, extra params); `native` first and last.
    fn variants(self) -> Vec<(&'static str, serde_json::Value)> {
        let mut v = vec![
            ("native", serde_json::json!({})),
            (
                "native + 10 rules",
                serde_json::json!({"redact": ten_rules()}),
            ),
            ("cadf", serde_json::json!({"schema": "cadf"})),
            ("ocsf", serde_json::json!({"schema": "ocsf"})),
            ("ecs", serde_json::json!({"schema": "ecs"})),
            (
                "ocsf + 10 rules",
                serde_json::json!({"schema": "ocsf", "redact": ten_rules()}),
            ),
        ];
        if self == Transport::Http {
            v.push((
                "splunk_hec",
                serde_json::json!({"schema": "splunk_hec", "hec_token": "bench-token"}),
            ));
        }
        v.push(("native (again)", serde_json::json!({})));
        v
    }
}

pub(crate) async fn measure(bench: Bench<'_>) -> anyhow::Result<()> {
    let bus = Bus::declare(&format!("{}.formats", bench.scratch.tag)).await?;
    let receiver = Receiver::start().await?;
    let result = run(bench, &bus, &receiver).await;
    receiver.stop();
    bus.delete().await;
    result
}

async fn run(bench: Bench<'_>, bus: &Bus, receiver: &Receiver) -> anyhow::Result<()> {
    let Bench {
        args,
        scratch,
        store,
        ..
    } = bench;
    let want = args.formats_backlog;
    println!(
        "formats: forwarding per schema and with a ten-rule redaction policy, a backlog of {want} events, one worker"
    );
    let have = scratch.count_events().await? as usize;
    if have < want {
        let started = Instant::now();
        let mut generator = Generator::new(55, args.tenants);
        let mut left = want - have;
        while left > 0 {
            let chunk = left.min(5_000);
            persist_synthetic(store, &synthetic(&mut generator, chunk)).await?;
            left -= chunk;
        }
        println!(
            "backlog       stored {} events in {:.1}s",
            want - have,
            started.elapsed().as_secs_f64()
        );
    }
    let backlog = scratch.count_events().await? as usize;
    let downstream = bus.downstream().await?;

    for transport in [Transport::Http, Transport::RabbitBatch] {
        let mut native: Option<f64> = None;
        for (i, (label, extra)) in transport.variants().into_iter().enumerate() {
            let name = format!(
                "fmt-{}-{i}",
                if transport == Transport::Http {
                    "http"
                } else {
                    "amqp"
                }
            );
            let destination = match transport {
                Transport::Http => {
                    let mut params = serde_json::json!({
                        "url": receiver.url,
                        "start": "earliest",
                    });
                    merge(&mut params, extra);
                    serde_json::json!({"name": name, "type": "http", "params": params})
                }
                Transport::RabbitBatch => {
                    let mut params = serde_json::json!({"mode": "batch", "start": "earliest"});
                    merge(&mut params, extra);
                    bus.exchange.destination(&name, params)
                }
            };
            let destinations = serde_json::json!([destination]).to_string();
            let env = [
                ("AUDITBRIDGE_DESTINATIONS", destinations.as_str()),
                ("AUDITBRIDGE_REDACT_KEY", REDACT_KEY),
            ];
            let bytes_before = receiver.bytes.load(Ordering::Relaxed);
            let mut worker = spawn_worker(scratch, &env, "127.0.0.1:0")?;
            let drain = watch_drain(store, &name, backlog, &worker).await;
            worker.stop(STOP_GRACE).await;
            bus.purge().await?;
            let d = drain.with_context(|| format!("{} {label}", transport.label()))?;
            let size = match transport {
                Transport::Http => format!(
                    ", {:.0} bytes/event received",
                    (receiver.bytes.load(Ordering::Relaxed) - bytes_before) as f64 / backlog as f64
                ),
                Transport::RabbitBatch => String::new(),
            };
            let ratio = match native {
                None => {
                    native = Some(d.rate);
                    "(the baseline)".to_owned()
                }
                Some(base) if label.starts_with("native (again)") => {
                    native = Some(base.max(d.rate));
                    format!("({:.2} of the first native run)", d.rate / base)
                }
                Some(base) => format!("{:.2} of native (target >= 0.80)", d.rate / base),
            };
            println!(
                "{:<15} {label:<18} {:>9.0} events/s  {ratio}{size}",
                transport.label(),
                d.rate
            );
        }
    }
    let _ = downstream.close(200, "done".into()).await;
    Ok(())
}

fn merge(params: &mut serde_json::Value, extra: serde_json::Value) {
    if let (Some(all), serde_json::Value::Object(more)) = (params.as_object_mut(), extra) {
        all.extend(more);
    }
}

/// An HTTP receiver that reads every request's body whole and answers 200, counting bytes:
/// a SIEM collector that is never the bottleneck.
struct Receiver {
    url: String,
    bytes: Arc<AtomicU64>,
    stop: CancellationToken,
}

impl Receiver {
    async fn start() -> anyhow::Result<Receiver> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the benchmark's HTTP receiver")?;
        let addr = listener.local_addr()?;
        let bytes = Arc::new(AtomicU64::new(0));
        let counted = bytes.clone();
        let app = axum::Router::new()
            .fallback(move |body: Bytes| {
                let counted = counted.clone();
                async move {
                    counted.fetch_add(body.len() as u64, Ordering::Relaxed);
                    axum::http::StatusCode::OK
                }
            })
            .layer(axum::extract::DefaultBodyLimit::disable());
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(stopped.cancelled_owned())
                .await;
        });
        Ok(Receiver {
            url: format!("http://{addr}/services/collector/event"),
            bytes,
            stop,
        })
    }

    fn stop(&self) {
        self.stop.cancel();
    }
}
