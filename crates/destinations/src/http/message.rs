//! How a batch of events becomes one HTTP request: how many events fit the limits, the body
//! (NDJSON or a JSON array of the events' stored JSON, byte for byte), and the headers that
//! describe it (content type, count, idempotency key, and with a secret the timestamp and the
//! HMAC-SHA256 signature, whose check for receivers is [`verify`]). No I/O: the sink sends
//! what this builds.

use auditbridge_config::ExposeSecret as _;
use std::time::{SystemTime, UNIX_EPOCH};

use hmac::{Hmac, KeyInit, Mac};
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderValue};
use sha2::Sha256;

use super::HttpFormat;
use crate::StoredEvent;

/// Request headers set on every request (the signature pair only with a `secret`).
pub const DESTINATION_HEADER: &str = "x-auditbridge-destination";
pub const COUNT_HEADER: &str = "x-auditbridge-count";
pub const IDEMPOTENCY_HEADER: &str = "idempotency-key";
pub const TIMESTAMP_HEADER: &str = "x-auditbridge-timestamp";
pub const SIGNATURE_HEADER: &str = "x-auditbridge-signature";

type HmacSha256 = Hmac<Sha256>;

/// What of a destination's parameters decides the requests' bodies and the headers that
/// describe them. No `Debug`: it holds the signing secret.
pub(crate) struct Layout {
    pub(crate) format: HttpFormat,
    pub(crate) max_batch_events: usize,
    pub(crate) max_batch_bytes: usize,
    pub(crate) secret: Option<auditbridge_config::SecretString>,
}

impl Layout {
    /// How many events from the front of `events` fit the limits (at least one).
    pub(crate) fn batch_len(&self, events: &[StoredEvent]) -> usize {
        // Both formats spend one byte per event beyond its JSON (the newline, or the comma or
        // closing bracket); a JSON array adds its opening bracket.
        let mut size = match self.format {
            HttpFormat::Ndjson => 0,
            HttpFormat::JsonArray => 1,
        };
        let mut n = 0;
        for event in events.iter().take(self.max_batch_events) {
            size += event.json.len() + 1;
            if n > 0 && size > self.max_batch_bytes {
                break;
            }
            n += 1;
        }
        n
    }

    /// The body for `batch`: each event's stored JSON as it is, one per line or in an array.
    pub(crate) fn body(&self, batch: &[StoredEvent]) -> Vec<u8> {
        let mut body =
            Vec::with_capacity(batch.iter().map(|e| e.json.len() + 1).sum::<usize>() + 1);
        match self.format {
            HttpFormat::Ndjson => {
                for event in batch {
                    body.extend_from_slice(event.json.as_bytes());
                    body.push(b'\n');
                }
            }
            HttpFormat::JsonArray => {
                body.push(b'[');
                for (i, event) in batch.iter().enumerate() {
                    if i > 0 {
                        body.push(b',');
                    }
                    body.extend_from_slice(event.json.as_bytes());
                }
                body.push(b']');
            }
        }
        body
    }

    fn content_type(&self) -> &'static str {
        match self.format {
            HttpFormat::Ndjson => "application/x-ndjson",
            HttpFormat::JsonArray => "application/json",
        }
    }

    /// Adds the headers that describe `batch`, sent as `body`, to `headers`.
    pub(crate) fn describe(&self, headers: &mut HeaderMap, batch: &[StoredEvent], body: &[u8]) {
        let n = batch.len();
        let key = format!("{}..{}", batch[0].id, batch[n - 1].id);
        self.describe_as(headers, self.content_type(), n, &key, body);
    }

    /// Adds the headers of a checkpoint's request (`body` from [`crate::CheckpointMessage`]).
    pub(crate) fn describe_checkpoint(&self, headers: &mut HeaderMap, key: &str, body: &[u8]) {
        self.describe_as(headers, "application/json", 1, key, body);
    }

    fn describe_as(
        &self,
        headers: &mut HeaderMap,
        content_type: &'static str,
        count: usize,
        key: &str,
        body: &[u8],
    ) {
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
        headers.insert(COUNT_HEADER, HeaderValue::from(count));
        headers.insert(
            IDEMPOTENCY_HEADER,
            HeaderValue::from_str(key).expect("idempotency keys are header-safe"),
        );
        if let Some(secret) = &self.secret {
            let timestamp = unix_now();
            let signature = sign(secret.expose_secret().as_bytes(), timestamp, body);
            headers.insert(TIMESTAMP_HEADER, HeaderValue::from(timestamp));
            headers.insert(
                SIGNATURE_HEADER,
                HeaderValue::from_str(&signature).expect("hex is header-safe"),
            );
        }
    }
}

/// The `X-Auditbridge-Signature` value for a request body sent at `timestamp` (Unix seconds):
/// `v1=` and the lowercase hex HMAC-SHA256, keyed with `secret`, of `"<timestamp>.<body>"`.
pub fn sign(secret: &[u8], timestamp: u64, body: &[u8]) -> String {
    format!(
        "v1={}",
        hex::encode(mac(secret, timestamp, body).finalize().into_bytes())
    )
}

/// Checks an `X-Auditbridge-Signature` header as a receiver should:
///
/// 1. Take the timestamp from `X-Auditbridge-Timestamp` and the body exactly as received, raw
///    bytes, before any JSON parsing (re-serialized JSON will not match).
/// 2. Recompute the HMAC-SHA256 of `"<timestamp>.<body>"` with the shared secret and compare it
///    with the header's `v1=<hex>` in constant time (this function does both steps).
/// 3. Reject a timestamp far from your clock (say more than 5 minutes old) so that a captured
///    request cannot be replayed later; this function does not look at the clock.
///
/// Returns false for a header that is not `v1=` followed by hex.
pub fn verify(secret: &[u8], timestamp: u64, body: &[u8], header: &str) -> bool {
    let Some(expected) = header
        .trim()
        .strip_prefix("v1=")
        .and_then(|h| hex::decode(h).ok())
    else {
        return false;
    };
    mac(secret, timestamp, body).verify_slice(&expected).is_ok()
}

fn mac(secret: &[u8], timestamp: u64, body: &[u8]) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_matches_a_fixed_vector() {
        // printf '1700000000.{"a":1}' | openssl dgst -sha256 -hmac Jefe
        let signature = sign(b"Jefe", 1_700_000_000, br#"{"a":1}"#);
        assert_eq!(
            signature,
            "v1=fa5f6481efc59da48b19c9dc10196c9953e5651f8304b3a318b6b87d70272e0a"
        );
    }
}
