//! A RabbitMQ exchange and queue of a test's own on the local broker (an
//! [`auditbridge_fixtures::Exchange`]), and a way to read back what a destination published
//! (ids by `message_id`, NDJSON bodies in batch mode).

use std::time::Duration;

use auditbridge_fixtures::{Exchange, QueueOptions};
use lapin::options::BasicGetOptions;
use uuid::Uuid;

pub use auditbridge_fixtures::AMQP_URL;

/// One message as read back.
#[derive(Debug, Clone)]
pub struct Got {
    pub message_id: Option<String>,
    pub routing_key: String,
    pub body: Vec<u8>,
}

impl Got {
    /// The event ids this message carries: its `message_id` in event mode, every line's `id`
    /// in batch mode (NDJSON body).
    pub fn ids(&self, batch: bool) -> Vec<Uuid> {
        if batch {
            String::from_utf8_lossy(&self.body)
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .filter_map(|v| v["id"].as_str()?.parse().ok())
                .collect()
        } else {
            self.message_id
                .iter()
                .filter_map(|m| m.parse().ok())
                .collect()
        }
    }
}

/// A topic exchange `abt.<tag>` with a durable queue bound to `#` (or to another binding
/// key). Deleted on drop.
pub struct TestBroker {
    exchange: Exchange,
}

impl TestBroker {
    pub async fn new(tag: &str) -> anyhow::Result<TestBroker> {
        TestBroker::bound(tag, "#").await
    }

    /// The queue bound with `binding` only (e.g. `acme.#`: one tenant's events).
    pub async fn bound(tag: &str, binding: &str) -> anyhow::Result<TestBroker> {
        let options = QueueOptions {
            binding: binding.into(),
            // The broker removes the queue by itself if a failed test leaves it behind.
            expires: Some(Duration::from_secs(900)),
            ..QueueOptions::default()
        };
        let exchange = Exchange::declare(AMQP_URL, &format!("abt.{tag}"), &options).await?;
        Ok(TestBroker { exchange })
    }

    /// Takes every message now on the queue (connecting afresh each time, so it works across
    /// a broker restart).
    pub async fn drain(&self) -> anyhow::Result<Vec<Got>> {
        let conn = self.exchange.connect().await?;
        let ch = conn.create_channel().await?;
        let mut out = Vec::new();
        while let Some(m) = ch
            .basic_get(
                self.exchange.queue.as_str().into(),
                BasicGetOptions { no_ack: true },
            )
            .await?
        {
            out.push(Got {
                message_id: m.properties.message_id().as_ref().map(|s| s.to_string()),
                routing_key: m.routing_key.to_string(),
                body: m.data.clone(),
            });
        }
        let _ = conn.close(200, "done".into()).await;
        Ok(out)
    }

    /// Drains until `check` holds for everything collected so far, or fails after `timeout`.
    pub async fn collect_until(
        &self,
        timeout: Duration,
        got: &mut Vec<Got>,
        mut check: impl FnMut(&[Got]) -> bool,
    ) -> anyhow::Result<()> {
        let what = format!("the messages wanted from {}", self.exchange.queue);
        crate::eventually(&what, timeout, async || {
            let drained = self.drain().await.map(|more| got.extend(more));
            if check(got) {
                return Ok(());
            }
            drained?;
            anyhow::bail!("{} messages so far", got.len())
        })
        .await
    }

    /// A destination definition publishing to this exchange, from the earliest event unless
    /// `extra` says otherwise.
    pub fn destination(&self, name: &str, extra: serde_json::Value) -> serde_json::Value {
        let mut params = serde_json::json!({"start": "earliest"});
        if let (Some(p), serde_json::Value::Object(e)) = (params.as_object_mut(), extra) {
            p.extend(e);
        }
        self.exchange.destination(name, params)
    }
}
