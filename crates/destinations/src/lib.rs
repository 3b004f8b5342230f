//! Where stored events go next: the destination configuration and the sinks that deliver to
//! RabbitMQ and HTTP. The relay (in the worker) reads events from the outbox, hands them to a
//! [`Sink`], and moves the destination's cursor only after the sink confirmed them.
//!
//! A sink never decides to drop anything. It either settles a prefix of what it was given
//! ([`Delivered`]: confirmed, except the events it names as undeliverable — those the
//! destination can never take as they are, such as an AMQP routing key over 255 bytes or a
//! message over the broker's `max_message_size`), or
//! fails with a [`DeliveryError`] saying whether a retry may help soon ([`DeliveryError::Retry`])
//! or the destination refused the request itself ([`DeliveryError::Refused`]). What happens to
//! an undeliverable or refused event is the relay's decision (`on_undeliverable`).

pub mod config;
pub mod http;
pub mod rabbitmq;
pub mod schema;

use std::time::Duration;

pub use config::{DestinationConfig, Filter, Kind, OnUndeliverable, Start};

/// What the relay hands a destination: the events as stored, in commit-safe order.
pub use auditbridge_store::StoredEvent;

/// What a sink settled of the events it was given: the first `settled` of them, each either
/// confirmed by the destination or listed in `undeliverable`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Delivered {
    pub settled: usize,
    /// Settled events the destination will never take as they are, in order, by their index in
    /// the slice given to `deliver`.
    pub undeliverable: Vec<Undeliverable>,
}

impl Delivered {
    /// Every one of the first `n` events confirmed.
    pub fn confirmed(n: usize) -> Delivered {
        Delivered {
            settled: n,
            undeliverable: Vec::new(),
        }
    }

    /// How many of the settled events the destination confirmed.
    pub fn confirmed_count(&self) -> usize {
        self.settled - self.undeliverable.len()
    }
}

/// One event a destination cannot take. `reason` is a stable, low-cardinality metric label.
#[derive(Debug, Clone, PartialEq)]
pub struct Undeliverable {
    pub index: usize,
    pub reason: &'static str,
    pub detail: String,
}

/// Why a delivery failed. `reason` is a stable, low-cardinality metric label.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DeliveryError {
    /// Worth retrying after a backoff (connection lost, timeout, 5xx, 429, a broker nack, a
    /// returned message, a confirm that never came). `retry_after` is the destination's own
    /// request (HTTP `Retry-After`), when it gave one.
    #[error("{detail}")]
    Retry {
        reason: &'static str,
        detail: String,
        retry_after: Option<Duration>,
    },
    /// The destination refused the request itself (an HTTP 4xx other than 429, a RabbitMQ
    /// message the broker closed the channel over that cannot be pinned on one event):
    /// retrying the same request will not help until someone fixes the configuration or the
    /// receiver, or the relay offers fewer events. The
    /// relay isolates the event it is about (`on_undeliverable = "dead_letter"`) or keeps the
    /// events and reports the destination as failing.
    #[error("{detail}")]
    Refused {
        reason: &'static str,
        detail: String,
    },
}

impl DeliveryError {
    pub fn reason(&self) -> &'static str {
        match self {
            DeliveryError::Retry { reason, .. } | DeliveryError::Refused { reason, .. } => reason,
        }
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            DeliveryError::Retry { retry_after, .. } => *retry_after,
            DeliveryError::Refused { .. } => None,
        }
    }
}

/// One checkpoint of a tenant's verifiable log, as destinations with `"checkpoints": true`
/// receive it: one message, RabbitMQ routing key `_log.<tenant>`, body (RabbitMQ and HTTP
/// alike) the JSON object `{"type": "checkpoint", "tenant": …, "note": …}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointMessage {
    /// Its id in `log_checkpoints`: the message id and idempotency key `checkpoint-<id>`.
    pub id: i64,
    pub tenant: String,
    /// The checkpoint note, signed or (with no key configured) bare.
    pub note: String,
}

impl CheckpointMessage {
    /// The message body.
    pub fn body(&self) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "type": "checkpoint",
            "tenant": self.tenant,
            "note": self.note,
        }))
        .expect("a JSON object of strings serializes")
    }

    /// Its message id and idempotency key.
    pub fn key(&self) -> String {
        format!("checkpoint-{}", self.id)
    }

    /// The RabbitMQ routing key.
    pub fn routing_key(&self) -> String {
        format!("_log.{}", self.tenant)
    }
}

/// A connected (or connecting) destination, and what is done to each event before it goes
/// there (the destination's `redact` rules).
#[derive(Debug)]
pub struct Sink {
    kind: SinkKind,
    redact: auditbridge_event::redact::Redactor,
    shape: schema::Shape,
}

#[derive(Debug)]
enum SinkKind {
    RabbitMq(rabbitmq::RabbitSink),
    Http(http::HttpSink),
}

impl Sink {
    /// Builds the sink for a destination. Connects lazily: the first `deliver` connects.
    pub fn new(config: &DestinationConfig) -> Result<Sink, DeliveryError> {
        let kind = match &config.kind {
            Kind::RabbitMq(params) => {
                SinkKind::RabbitMq(rabbitmq::RabbitSink::new(&config.name, params.clone()))
            }
            Kind::Http(params) => {
                SinkKind::Http(http::HttpSink::new(&config.name, params.clone())?)
            }
        };
        Ok(Sink {
            kind,
            redact: config.redact.clone(),
            shape: schema::Shape::new(config),
        })
    }

    /// Delivers a prefix of `events` and says how much of it is settled (see [`Delivered`]).
    /// Events past that prefix were not confirmed (a size limit, a failure after the prefix)
    /// and will be offered again. A sink may settle nothing; the relay then backs off.
    ///
    /// With `redact` rules, each event is redacted first: the destination gets the redacted
    /// JSON, the trail keeps the event whole.
    pub async fn deliver(&mut self, events: &[StoredEvent]) -> Result<Delivered, DeliveryError> {
        let shaped;
        let events = if self.redact.is_empty() && self.shape.is_native() {
            events
        } else {
            shaped = shape(&self.redact, &self.shape, events)?;
            &shaped[..]
        };
        match &mut self.kind {
            SinkKind::RabbitMq(s) => s.deliver(events).await,
            SinkKind::Http(s) => s.deliver(events).await,
        }
    }

    /// Delivers one checkpoint; done once the destination confirmed it.
    pub async fn deliver_checkpoint(
        &mut self,
        checkpoint: &CheckpointMessage,
    ) -> Result<(), DeliveryError> {
        match &mut self.kind {
            SinkKind::RabbitMq(s) => s.deliver_checkpoint(checkpoint).await,
            SinkKind::Http(s) => s.deliver_checkpoint(checkpoint).await,
        }
    }
}

/// The events with the destination's rules applied to their JSON, then written in its schema.
/// Routing keys and filters read the stored columns (tenant, action, outcome, source), which
/// no rule may touch.
fn shape(
    rules: &auditbridge_event::redact::Redactor,
    shape: &schema::Shape,
    events: &[StoredEvent],
) -> Result<Vec<StoredEvent>, DeliveryError> {
    events
        .iter()
        .map(|e| {
            let mut e = e.clone();
            match rules.redact(&e.json, Some(&e.tenant)) {
                Ok(Some(auditbridge_event::redact::Redacted {
                    json: Some(json), ..
                })) => {
                    e.json = json;
                }
                Ok(_) => {}
                // Stored JSON always parses; should it not, nothing unredacted goes out: the
                // refusal isolates the event, which becomes the destination's dead letter.
                Err(auditbridge_event::redact::NotJson(why)) => {
                    return Err(DeliveryError::Refused {
                        reason: "redaction",
                        detail: format!("cannot redact event {}: {why}", e.id),
                    });
                }
            }
            if !shape.is_native() {
                e.json = shape.render(&e).map_err(|why| DeliveryError::Refused {
                    reason: "schema",
                    detail: format!("cannot write event {} in its schema: {why}", e.id),
                })?;
            }
            Ok(e)
        })
        .collect()
}
