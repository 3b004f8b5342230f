//! A RabbitMQ exchange and queue of a test's own on the local broker, and a way to read back
//! what a destination published (ids by `message_id`, NDJSON bodies in batch mode).

use std::time::Duration;

use lapin::options::{
    BasicGetOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties, ExchangeKind};
use uuid::Uuid;

pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

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

/// A topic exchange with a durable queue bound to `#` (or to another binding key). Deleted on
/// drop.
pub struct TestBroker {
    pub exchange: String,
    pub queue: String,
}

impl TestBroker {
    pub async fn new(tag: &str) -> anyhow::Result<TestBroker> {
        TestBroker::bound(tag, "#").await
    }

    /// The queue bound with `binding` only (e.g. `acme.#`: one tenant's events).
    pub async fn bound(tag: &str, binding: &str) -> anyhow::Result<TestBroker> {
        let b = TestBroker {
            exchange: format!("abt.{tag}"),
            queue: format!("abt.{tag}.q"),
        };
        let conn = Connection::connect(AMQP_URL, ConnectionProperties::default()).await?;
        let ch = conn.create_channel().await?;
        ch.exchange_declare(
            b.exchange.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
        // The broker removes the queue by itself if a failed test leaves it behind.
        let mut args = FieldTable::default();
        args.insert("x-expires".into(), AMQPValue::LongLongInt(900_000));
        ch.queue_declare(
            b.queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await?;
        ch.queue_bind(
            b.queue.as_str().into(),
            b.exchange.as_str().into(),
            binding.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
        let _ = conn.close(200, "done".into()).await;
        Ok(b)
    }

    /// Takes every message now on the queue (connecting afresh each time, so it works across
    /// a broker restart).
    pub async fn drain(&self) -> anyhow::Result<Vec<Got>> {
        let conn = Connection::connect(AMQP_URL, ConnectionProperties::default()).await?;
        let ch = conn.create_channel().await?;
        let mut out = Vec::new();
        while let Some(m) = ch
            .basic_get(self.queue.as_str().into(), BasicGetOptions { no_ack: true })
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
        let what = format!("the messages wanted from {}", self.queue);
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

    /// A destination definition publishing to this exchange.
    pub fn destination(&self, name: &str, extra: serde_json::Value) -> serde_json::Value {
        let mut params = serde_json::json!({
            "url": AMQP_URL, "exchange": self.exchange, "start": "earliest"
        });
        if let (Some(p), serde_json::Value::Object(e)) = (params.as_object_mut(), extra) {
            p.extend(e);
        }
        serde_json::json!({"name": name, "type": "rabbitmq", "params": params})
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        let (exchange, queue) = (self.exchange.clone(), self.queue.clone());
        crate::run_cleanup(async move {
            if let Ok(conn) = Connection::connect(AMQP_URL, ConnectionProperties::default()).await
                && let Ok(ch) = conn.create_channel().await
            {
                let _ = ch
                    .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                    .await;
                let _ = ch
                    .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                    .await;
                let _ = conn.close(200, "done".into()).await;
            }
        });
    }
}
