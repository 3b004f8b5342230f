//! The HTTP destination.

mod sink;

pub use sink::{
    COUNT_HEADER, DESTINATION_HEADER, HttpSink, IDEMPOTENCY_HEADER, SIGNATURE_HEADER,
    TIMESTAMP_HEADER, sign, verify,
};
