//! The RabbitMQ destination.

mod sink;

pub use sink::RabbitSink;
