//! The HTTP destination.

mod config;
mod sink;

pub(crate) use config::parse_params;
pub use config::{HttpAuth, HttpFormat, HttpParams};
pub use sink::{
    COUNT_HEADER, DESTINATION_HEADER, HttpSink, IDEMPOTENCY_HEADER, SIGNATURE_HEADER,
    TIMESTAMP_HEADER, sign, verify,
};
