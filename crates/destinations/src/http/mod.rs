//! The HTTP destination: POSTs a batch of events as NDJSON or as a JSON array to a webhook (a
//! SIEM's HTTP collector, usually), optionally signed with HMAC-SHA256 so the receiver can tell
//! the request came from us and was not altered.
//!
//! One `deliver` is one request. The receiver's answer decides what the relay does next: 2xx
//! confirms the whole batch; 429, 408, 5xx, timeouts and connection errors are worth a retry;
//! any other status (redirects included: they are not followed) is a refusal, which the relay
//! answers by isolating the event refused (`on_undeliverable`) or holding the events.
//!
//! Every request carries `Idempotency-Key: <first id>..<last id>`. The relay resends a batch
//! whose answer it never saw, so a receiver that remembers recent keys can drop the duplicate.
//!
//! The parameters are read and checked with the rest of the configuration
//! (`auditbridge_config::destinations`); `message` lays a batch out as a body and its
//! headers (and signs it), `sink` sends it and reads the answer.

mod message;
mod sink;

pub use auditbridge_config::destinations::{HttpAuth, HttpFormat, HttpParams};
pub use message::{
    COUNT_HEADER, DESTINATION_HEADER, IDEMPOTENCY_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, sign,
    verify,
};
pub use sink::HttpSink;
