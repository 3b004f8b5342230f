//! The RabbitMQ destination: publishes events to an operator-owned exchange, persistent and
//! with publisher confirms, and reports an event settled only when the broker confirmed its
//! message, or returned it as unroutable (`mandatory`): then the event is undeliverable and the
//! relay's `on_undeliverable` decides. In `batch` mode a message holds one run of consecutive
//! events sharing its routing key and tenant (at most `max_batch_bytes` of them, unless one
//! event alone is larger), so a return concerns exactly those events.
//!
//! A message the broker closes the channel over (406 PRECONDITION_FAILED: over its
//! `max_message_size`, say) is refused for what it is, not retried as a lost channel: when it
//! was alone in its confirm window and holds one event, that event is undeliverable; otherwise
//! the call is [`DeliveryError::Refused`](crate::DeliveryError::Refused), and the relay offers
//! less until it is.
//!
//! The parameters are read and checked with the rest of the configuration
//! (`auditbridge_config::destinations`); `message` turns events into messages (routing
//! key, body, properties), `sink` connects, publishes and reads the broker's answers.

mod message;
mod sink;

pub use auditbridge_config::destinations::{RabbitMode, RabbitParams};
pub use message::render_routing_key;
pub use sink::RabbitSink;
#[doc(hidden)]
pub use sink::testing;
