//! The `rabbitmq` destination's parameters (the `params` of a `type = "rabbitmq"` definition,
//! besides the common ones) and their validation. Each setting is checked by the parser or
//! against the limit the sink meets later, so a definition that loads is one the sink can use.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;

use super::message::render_routing_key;
use crate::config::{ConfigError, duration, err, redact_url, type_params};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RabbitMode {
    /// One message per event.
    Event,
    /// One NDJSON message per run of consecutive events sharing routing key and tenant, cut
    /// at `max_batch_bytes`.
    Batch,
}

#[derive(Clone, PartialEq)]
pub struct RabbitParams {
    /// `amqp://user:pass@host:port/vhost`.
    pub url: String,
    pub exchange: String,
    /// Template with `{tenant}`, `{action}`, `{outcome}`, `{source}`; default
    /// `{tenant}.{action}`.
    pub routing_key: String,
    pub mandatory: bool,
    pub mode: RabbitMode,
    /// A publish not confirmed within this time counts as failed (and is resent).
    pub confirm_timeout: Duration,
    /// Most unconfirmed messages at once.
    pub max_in_flight: usize,
    /// Batch mode: most body bytes in one message. A message holds at least one event, so one
    /// larger than this still goes, alone.
    pub max_batch_bytes: usize,
}

// Written by hand so that logging a configuration never prints the URL's password.
impl fmt::Debug for RabbitParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitParams")
            .field("url", &redact_url(&self.url))
            .field("exchange", &self.exchange)
            .field("routing_key", &self.routing_key)
            .field("mandatory", &self.mandatory)
            .field("mode", &self.mode)
            .field("confirm_timeout", &self.confirm_timeout)
            .field("max_in_flight", &self.max_in_flight)
            .field("max_batch_bytes", &self.max_batch_bytes)
            .finish()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRabbit {
    url: String,
    exchange: String,
    #[serde(default)]
    routing_key: Option<String>,
    #[serde(default)]
    mandatory: Option<bool>,
    #[serde(default)]
    mode: Option<String>,
    #[serde(default)]
    confirm_timeout: Option<String>,
    #[serde(default)]
    max_in_flight: Option<usize>,
    #[serde(default)]
    max_batch_bytes: Option<usize>,
}

/// The default bound on a batch-mode RabbitMQ message's body: 1 MiB, as for HTTP requests.
const DEFAULT_BATCH_BYTES: usize = 1024 * 1024;

/// The largest `max_batch_bytes` for RabbitMQ: 16 MiB, the broker's own default
/// `max_message_size` since RabbitMQ 4.0 (128 MiB before). A bound above the broker's limit
/// builds batches that the broker refuses; the relay then splits them, but every split costs
/// a reconnect and a resend.
const MAX_BATCH_BYTES: usize = 16 * 1024 * 1024;

/// Reads and checks the parameters of destination `name`, the common ones taken out.
pub(crate) fn parse_params(
    name: &str,
    params: serde_json::Value,
) -> Result<RabbitParams, ConfigError> {
    let r: RawRabbit = type_params(name, params)?;
    if !(r.url.starts_with("amqp://") || r.url.starts_with("amqps://")) {
        return Err(err(
            name,
            "params.url",
            format!(
                "expected an amqp:// or amqps:// URL, got {:?}",
                redact_url(&r.url)
            ),
        ));
    }
    // The parser the sink's connect uses, so a URL that loads is a URL it can use. Its
    // message is not quoted: it may repeat the password.
    if r.url.parse::<lapin::uri::AMQPUri>().is_err() {
        return Err(err(
            name,
            "params.url",
            format!("not a valid AMQP URI: {:?}", redact_url(&r.url)),
        ));
    }
    // The limits the sink's AMQP strings have (short strings: at most 255 bytes).
    if lapin::types::ShortString::try_new(r.exchange.as_str()).is_err() {
        return Err(err(name, "params.exchange", "expected at most 255 bytes"));
    }
    let mode = match r.mode.as_deref().unwrap_or("event") {
        "event" => RabbitMode::Event,
        "batch" => RabbitMode::Batch,
        other => {
            return Err(err(
                name,
                "params.mode",
                format!("expected \"event\" or \"batch\", got {other:?}"),
            ));
        }
    };
    let routing_key = r.routing_key.unwrap_or_else(|| "{tenant}.{action}".into());
    check_template(name, &routing_key)?;
    // The template's fixed part alone must fit a routing key; the placeholders are
    // checked per event (an event whose key is too long is undeliverable).
    if render_routing_key(&routing_key, "", "", "", "").len() > 255 {
        return Err(err(
            name,
            "params.routing_key",
            "the template's text outside placeholders is over 255 bytes, the AMQP limit",
        ));
    }
    let max_in_flight = r.max_in_flight.unwrap_or(1000);
    if max_in_flight == 0 || max_in_flight > 100_000 {
        return Err(err(name, "params.max_in_flight", "expected 1 to 100000"));
    }
    let max_batch_bytes = r.max_batch_bytes.unwrap_or(DEFAULT_BATCH_BYTES);
    if !(1024..=MAX_BATCH_BYTES).contains(&max_batch_bytes) {
        return Err(err(
            name,
            "params.max_batch_bytes",
            format!(
                "expected 1024 to {MAX_BATCH_BYTES} (16 MiB, RabbitMQ 4's default max_message_size), got {max_batch_bytes}"
            ),
        ));
    }
    Ok(RabbitParams {
        url: r.url,
        exchange: r.exchange,
        routing_key,
        mandatory: r.mandatory.unwrap_or(true),
        mode,
        confirm_timeout: duration(
            name,
            "params.confirm_timeout",
            r.confirm_timeout.as_deref(),
            Duration::from_secs(10),
        )?,
        max_in_flight,
        max_batch_bytes,
    })
}

const PLACEHOLDERS: [&str; 4] = ["tenant", "action", "outcome", "source"];

/// Checks a routing-key template: every `{` closed, every placeholder known.
fn check_template(name: &str, template: &str) -> Result<(), ConfigError> {
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        let Some(close) = rest[open..].find('}') else {
            return Err(err(
                name,
                "params.routing_key",
                format!("unclosed '{{' in {template:?}"),
            ));
        };
        let key = &rest[open + 1..open + close];
        if !PLACEHOLDERS.contains(&key) {
            return Err(err(
                name,
                "params.routing_key",
                format!(
                    "unknown placeholder {{{key}}}; known: {{tenant}}, {{action}}, {{outcome}}, {{source}}"
                ),
            ));
        }
        rest = &rest[open + close + 1..];
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;

    use super::*;
    use crate::config::tests::one;
    use crate::{Kind, Start};

    #[test]
    fn a_full_rabbitmq_definition_parses() {
        let d = one(json!({"name": "bus", "type": "rabbitmq", "params": {
            "url": "amqp://guest:guest@127.0.0.1:5672/%2f", "exchange": "audit",
            "routing_key": "audit.{tenant}.{action}", "mode": "batch", "mandatory": false,
            "filter": {"tenants": ["acme"], "actions": ["document"], "outcomes": ["denied"]},
            "start": "earliest", "max_backlog_age": "1h", "batch_size": 100,
            "max_batch_bytes": 65536
        }}))
        .unwrap();
        assert_eq!(d.name, "bus");
        assert_eq!(d.start, Start::Earliest);
        assert_eq!(d.max_backlog_age, Some(Duration::from_secs(3600)));
        assert_eq!(d.batch_size, 100);
        assert_eq!(d.retry_max, Duration::from_secs(300));
        let Kind::RabbitMq(r) = d.kind else { panic!() };
        assert_eq!(r.mode, RabbitMode::Batch);
        assert!(!r.mandatory);
        assert_eq!(r.routing_key, "audit.{tenant}.{action}");
        assert_eq!(r.max_batch_bytes, 65536);
    }

    #[test]
    fn rabbitmq_defaults_and_the_batch_byte_bounds() {
        let with = |extra: serde_json::Value| {
            let mut params =
                json!({"url": "amqp://guest:guest@127.0.0.1:5672/%2f", "exchange": "audit"});
            params
                .as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            one(json!({"name": "bus", "type": "rabbitmq", "params": params}))
        };
        let d = with(json!({})).unwrap();
        let Kind::RabbitMq(r) = d.kind else { panic!() };
        assert_eq!(r.mode, RabbitMode::Event);
        assert!(r.mandatory);
        assert_eq!(r.routing_key, "{tenant}.{action}");
        assert_eq!(r.max_in_flight, 1000);
        assert_eq!(r.max_batch_bytes, 1024 * 1024);
        assert_eq!(d.batch_size, 1000);

        // Both ends of the range load; one byte past either does not, and says why.
        for ok in [1024, 16 * 1024 * 1024] {
            let d = with(json!({"mode": "batch", "max_batch_bytes": ok})).unwrap();
            let Kind::RabbitMq(r) = d.kind else { panic!() };
            assert_eq!(r.max_batch_bytes, ok);
        }
        for bad in [0, 1023, 16 * 1024 * 1024 + 1] {
            let e = with(json!({"mode": "batch", "max_batch_bytes": bad}))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("destination bus: params.max_batch_bytes: expected 1024 to 16777216")
                    && e.contains(&format!("got {bad}")),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn a_rejected_url_is_shown_without_its_password() {
        let e = one(json!({"name": "x", "type": "rabbitmq", "params": {
            "url": "amqp://u:pw-SECRET@h:notaport/%2f", "exchange": "e"}}))
        .unwrap_err()
        .to_string();
        assert!(e.contains("params.url") && !e.contains("pw-SECRET"), "{e}");
    }
}
