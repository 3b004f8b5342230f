//! How events become RabbitMQ messages: which events share a message (in `batch` mode, a run
//! of consecutive events with one routing key and tenant, cut at `max_batch_bytes`), the
//! routing key each event gets from the template, the body (the event's JSON, or NDJSON), and
//! the properties (persistent, `message_id`, `timestamp`, content type, headers). No I/O: the
//! sink publishes what this builds.

use std::borrow::Cow;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use uuid::Uuid;

use super::{RabbitMode, RabbitParams};
use crate::{StoredEvent, Undeliverable};

/// One message ready to publish.
pub struct Message<'a> {
    /// The event id (the first one in batch mode), for error details.
    pub(crate) id: Uuid,
    /// The events it carries: `count` of them from index `first` of the call.
    pub(crate) first: usize,
    pub(crate) count: usize,
    pub routing_key: ShortString,
    pub body: Cow<'a, [u8]>,
    pub properties: BasicProperties,
}

/// The messages for one call of `deliver`.
pub(crate) struct Messages<'a> {
    pub(crate) messages: Vec<Message<'a>>,
    /// The event whose routing key cannot be built, if there is one: it is settled as
    /// undeliverable, and it ends the call.
    pub(crate) no_key: Option<Undeliverable>,
    /// How many events of the call the messages and `no_key` cover.
    pub(crate) end: usize,
}

/// The messages for `events`, in order. An event whose routing key cannot be built ends the
/// call: it is settled as undeliverable, and nothing after it is published, so that a relay
/// that blocks on it does not publish the events behind it again on every attempt.
pub(crate) fn messages<'a>(params: &RabbitParams, events: &'a [StoredEvent]) -> Messages<'a> {
    let mut messages = Vec::new();
    let mut index = 0;
    while index < events.len() {
        let event = &events[index];
        let key = match routing_key(params, event) {
            Ok(key) => key,
            Err(detail) => {
                return Messages {
                    messages,
                    no_key: Some(Undeliverable {
                        index,
                        reason: "routing_key",
                        detail,
                    }),
                    end: index + 1,
                };
            }
        };
        match params.mode {
            RabbitMode::Event => {
                messages.push(event_message(index, event, key));
                index += 1;
            }
            RabbitMode::Batch => {
                // A batch message holds one run of consecutive events that share its routing
                // key and its `tenant` header: a queue bound to one tenant's keys must never
                // receive another tenant's events inside a message routed by the first one.
                // A run is cut at `max_batch_bytes` too.
                let run = run_len(params, &events[index..], key.as_str());
                messages.push(batch_message(index, &events[index..index + run], key));
                index += run;
            }
        }
    }
    Messages {
        messages,
        no_key: None,
        end: events.len(),
    }
}

/// How many events from the front of `events` (at least one) one batch message takes:
/// those that share the first one's tenant and routing key `key`, as long as the body (each
/// event's JSON and a newline) stays within `max_batch_bytes`. A first event larger than
/// that still goes, alone: resending cannot make it smaller.
fn run_len(params: &RabbitParams, events: &[StoredEvent], key: &str) -> usize {
    let first = &events[0];
    let mut size = first.json.len() + 1;
    let mut n = 1;
    for event in &events[1..] {
        size += event.json.len() + 1;
        if size > params.max_batch_bytes
            || event.tenant != first.tenant
            || render(params, event) != key
        {
            break;
        }
        n += 1;
    }
    n
}

fn render(params: &RabbitParams, event: &StoredEvent) -> String {
    render_routing_key(
        &params.routing_key,
        &event.tenant,
        &event.action,
        &event.outcome,
        &event.source,
    )
}

/// The event's routing key, or why it has none: AMQP caps routing keys at 255 bytes, and
/// resending the same event cannot fix that.
pub(crate) fn routing_key(
    params: &RabbitParams,
    event: &StoredEvent,
) -> Result<ShortString, String> {
    ShortString::try_new(render(params, event)).map_err(|e| {
        format!(
            "routing key for event {} from template {:?}: {e}",
            event.id, params.routing_key
        )
    })
}

/// The message for event `index` of the call.
pub(crate) fn event_message(
    index: usize,
    event: &StoredEvent,
    routing_key: ShortString,
) -> Message<'_> {
    let mut headers = FieldTable::default();
    headers.insert(
        "tenant".into(),
        AMQPValue::LongString(event.tenant.as_str().into()),
    );
    headers.insert(
        "action".into(),
        AMQPValue::LongString(event.action.as_str().into()),
    );
    headers.insert(
        "outcome".into(),
        AMQPValue::LongString(event.outcome.as_str().into()),
    );
    Message {
        id: event.id,
        first: index,
        count: 1,
        routing_key,
        body: Cow::Borrowed(event.json.as_bytes()),
        properties: properties(event, "application/json", headers),
    }
}

/// One NDJSON message for a run of events (from `first` in the call) that share `routing_key`
/// and tenant; identified by its first event.
fn batch_message<'a>(first: usize, run: &[StoredEvent], routing_key: ShortString) -> Message<'a> {
    let head = &run[0];
    let mut body = Vec::with_capacity(run.iter().map(|e| e.json.len() + 1).sum());
    for event in run {
        body.extend_from_slice(event.json.as_bytes());
        body.push(b'\n');
    }
    let count = i64::try_from(run.len()).unwrap_or(i64::MAX);
    let mut headers = FieldTable::default();
    headers.insert("count".into(), AMQPValue::LongLongInt(count));
    headers.insert(
        "tenant".into(),
        AMQPValue::LongString(head.tenant.as_str().into()),
    );
    Message {
        id: head.id,
        first,
        count: run.len(),
        routing_key,
        body: Cow::Owned(body),
        properties: properties(head, "application/x-ndjson", headers),
    }
}

/// The message of a log checkpoint (its body built by the caller, who keeps it).
pub(crate) fn checkpoint_message<'a>(
    checkpoint: &crate::CheckpointMessage,
    routing_key: ShortString,
    body: &'a [u8],
) -> Message<'a> {
    let mut headers = FieldTable::default();
    headers.insert(
        "tenant".into(),
        AMQPValue::LongString(checkpoint.tenant.as_str().into()),
    );
    headers.insert("type".into(), AMQPValue::LongString("checkpoint".into()));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Message {
        // No event's: error details name the message id instead.
        id: Uuid::nil(),
        first: 0,
        count: 1,
        routing_key,
        body: Cow::Borrowed(body),
        properties: BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_message_id(checkpoint.key().into())
            .with_timestamp(now)
            .with_headers(headers),
    }
}

fn properties(event: &StoredEvent, content_type: &str, headers: FieldTable) -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type(content_type.into())
        .with_message_id(event.id.to_string().into())
        .with_timestamp(u64::try_from(event.received_at.unix_timestamp()).unwrap_or(0))
        .with_headers(headers)
}

/// Fills a routing-key template (checked at startup) for one event.
pub fn render_routing_key(
    template: &str,
    tenant: &str,
    action: &str,
    outcome: &str,
    source: &str,
) -> String {
    template
        .replace("{tenant}", tenant)
        .replace("{action}", action)
        .replace("{outcome}", outcome)
        .replace("{source}", source)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_keys_render() {
        assert_eq!(
            render_routing_key("{tenant}.{action}", "acme", "user.login", "success", "auth"),
            "acme.user.login"
        );
    }
}
