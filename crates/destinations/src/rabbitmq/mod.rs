//! The RabbitMQ destination.

mod config;
mod message;
mod sink;

pub(crate) use config::parse_params;
pub use config::{RabbitMode, RabbitParams};
pub use message::render_routing_key;
pub use sink::RabbitSink;
