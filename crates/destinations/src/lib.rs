//! Where stored events go next: the destination configuration and the sinks that deliver to
//! RabbitMQ and HTTP. The relay (in the worker) reads events from the outbox, hands them to a
//! [`Sink`], and moves the destination's cursor only after the sink confirmed them.
//!
//! A sink never decides to drop anything. It either confirms a prefix of what it was given, or
//! fails with a [`DeliveryError`] saying whether a retry may help soon ([`DeliveryError::Retry`])
//! or the destination refused the request itself ([`DeliveryError::Refused`]); in both cases
//! the relay keeps the events and tries again later.

pub mod config;
pub mod http;
pub mod rabbitmq;

use std::time::Duration;

use time::OffsetDateTime;
use uuid::Uuid;

pub use config::{DestinationConfig, Filter, Kind, Start, parse_destinations};

/// One stored event as the relay hands it to a destination.
#[derive(Debug, Clone, PartialEq)]
pub struct OutEvent {
    pub id: Uuid,
    pub tenant: String,
    pub action: String,
    pub outcome: String,
    pub source: String,
    /// When it was stored (its transaction's start).
    pub received_at: OffsetDateTime,
    /// The stored event, as compact JSON.
    pub json: String,
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
    /// The destination refused the request itself (an HTTP 4xx other than 429): retrying the
    /// same request will not help until someone fixes the configuration or the receiver. The
    /// events are kept and the destination is reported as failing.
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

/// A connected (or connecting) destination.
#[derive(Debug)]
pub enum Sink {
    RabbitMq(rabbitmq::RabbitSink),
    Http(http::HttpSink),
}

impl Sink {
    /// Builds the sink for a destination. Connects lazily: the first `deliver` connects.
    pub fn new(config: &DestinationConfig) -> Result<Sink, DeliveryError> {
        Ok(match &config.kind {
            Kind::RabbitMq(params) => {
                Sink::RabbitMq(rabbitmq::RabbitSink::new(&config.name, params.clone()))
            }
            Kind::Http(params) => Sink::Http(http::HttpSink::new(&config.name, params.clone())?),
        })
    }

    /// Delivers a prefix of `events` (at least one event when `events` is not empty) and
    /// returns how many were confirmed by the destination. Events past that prefix were not
    /// sent (a size limit) and will be offered again.
    pub async fn deliver(&mut self, events: &[OutEvent]) -> Result<usize, DeliveryError> {
        match self {
            Sink::RabbitMq(s) => s.deliver(events).await,
            Sink::Http(s) => s.deliver(events).await,
        }
    }
}
