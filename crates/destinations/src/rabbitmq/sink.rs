//! The RabbitMQ sink: the connection, publishing in confirm windows, and what the broker's
//! answers mean (confirmed, returned, nacked, refused, lost), settled into a [`Delivered`]
//! prefix or a [`DeliveryError`] that says whether a retry may help.
//!
//! The sink keeps one connection with one confirm-mode channel. It does not use lapin's own
//! recovery: after any failure it drops both, and the next `deliver` connects from scratch.
//! That keeps the failure handling in one place (the relay's backoff) and means a delivery
//! never runs on a half-recovered channel whose confirms could be lost.

use std::fmt;
use std::time::Duration;

use lapin::message::BasicReturnMessage;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::ShortString;
use lapin::{Channel, Confirmation, Connection, ConnectionProperties, ErrorKind, PublisherConfirm};
use tokio::time::Instant;
use tracing::{debug, info};

use super::config::RabbitParams;
use super::message::{self, Message, Messages};
use crate::config::redact_url;
use crate::{Delivered, DeliveryError, OutEvent, Undeliverable};

/// How long one connect attempt (TCP, AMQP handshake, channel, `confirm.select`) may take, so
/// a broker that accepts connections but never answers cannot stall the relay.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Publishes to one RabbitMQ exchange. Connects lazily, on the first `deliver`.
pub struct RabbitSink {
    name: String,
    params: RabbitParams,
    /// The URL with its password replaced, for logs and error details.
    redacted_url: String,
    link: Option<Link>,
}

/// An open connection and its confirm-mode channel. Dropping it closes both.
struct Link {
    connection: Connection,
    channel: Channel,
}

/// What the broker answered for one published message.
#[derive(Debug, PartialEq)]
enum Answer {
    Confirmed,
    /// Returned as unroutable (`mandatory`); the detail says why.
    Returned(String),
    /// The broker closed the channel over this message, the only one of its window, which
    /// holds a single event: that event is undeliverable for `reason`.
    Refused {
        reason: &'static str,
        detail: String,
    },
}

// Written by hand so that the URL's password never reaches a log through `{:?}`.
impl fmt::Debug for RabbitSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitSink")
            .field("name", &self.name)
            .field("url", &self.redacted_url)
            .field("exchange", &self.params.exchange)
            .field("mode", &self.params.mode)
            .field("connected", &self.is_connected())
            .finish_non_exhaustive()
    }
}

impl RabbitSink {
    /// Builds the sink; does no I/O.
    pub fn new(name: &str, params: RabbitParams) -> RabbitSink {
        RabbitSink {
            name: name.to_owned(),
            redacted_url: redact_url(&params.url),
            params,
            link: None,
        }
    }

    /// Whether the sink holds a connection and channel that are both open.
    pub fn is_connected(&self) -> bool {
        self.link
            .as_ref()
            .is_some_and(|l| l.connection.status().connected() && l.channel.status().connected())
    }

    /// Publishes `events` and settles the longest prefix the broker answered for: every
    /// message of it confirmed, or returned as unroutable (with `mandatory`; its events are
    /// then undeliverable, as is an event whose routing key cannot be built, or one whose
    /// message the broker refused alone). After a failure (connection, channel, nack, a
    /// confirm that never came, a refused message) the connection is dropped; what was
    /// confirmed before it still counts, the rest is offered again (duplicates around
    /// failures, never a loss). Fails only when nothing at all was settled: with
    /// [`DeliveryError::Refused`] when the broker refused a message it cannot pin on one event.
    pub async fn deliver(&mut self, events: &[OutEvent]) -> Result<Delivered, DeliveryError> {
        if events.is_empty() {
            return Ok(Delivered::default());
        }
        let exchange = ShortString::try_new(self.params.exchange.as_str()).map_err(|e| {
            DeliveryError::Refused {
                reason: "exchange",
                detail: format!("exchange name {:?}: {e}", self.params.exchange),
            }
        })?;
        let Messages {
            messages,
            no_key,
            end,
        } = message::messages(&self.params, events);
        let mut undeliverable: Vec<Undeliverable> = no_key.into_iter().collect();

        let (answered, error) = self.publish(exchange, &messages).await;
        // Settled: everything before the first message the broker did not answer for.
        let settled = messages.get(answered.len()).map_or(end, |m| m.first);
        for (message, answer) in messages.iter().zip(&answered) {
            let (reason, detail) = match answer {
                Answer::Confirmed => continue,
                Answer::Returned(detail) => ("returned", detail),
                Answer::Refused { reason, detail } => (*reason, detail),
            };
            undeliverable.extend((message.first..message.first + message.count).map(|index| {
                Undeliverable {
                    index,
                    reason,
                    detail: detail.clone(),
                }
            }));
        }
        undeliverable.retain(|u| u.index < settled);
        undeliverable.sort_by_key(|u| u.index);
        if let Some(error) = error {
            // Whatever failed, the next call starts from a new connection.
            self.link = None;
            debug!(destination = %self.name, reason = error.reason(), %error, settled, message = "Dropped the RabbitMQ connection after a failure.");
            if settled == 0 {
                return Err(error);
            }
        }
        Ok(Delivered {
            settled,
            undeliverable,
        })
    }

    /// Publishes `messages` in confirm windows. Returns the answers for the prefix of messages
    /// the broker answered for, and the failure that stopped it, if any.
    async fn publish(
        &mut self,
        exchange: ShortString,
        messages: &[Message<'_>],
    ) -> (Vec<Answer>, Option<DeliveryError>) {
        if messages.is_empty() {
            return (Vec::new(), None);
        }
        let channel = match self.channel().await {
            Ok(channel) => channel,
            Err(error) => return (Vec::new(), Some(error)),
        };
        let options = BasicPublishOptions {
            mandatory: self.params.mandatory,
            immediate: false,
        };
        let mut answered = Vec::with_capacity(messages.len());
        // `max_in_flight` is at least 1 (checked at startup); `max` guards a hand-built config.
        for window in messages.chunks(self.params.max_in_flight.max(1)) {
            let (outcomes, error) = publish_window(
                &channel,
                &exchange,
                options,
                window,
                self.params.confirm_timeout,
            )
            .await;
            answered.extend(outcomes.into_iter().map(|o| match o {
                None => Answer::Confirmed,
                Some(detail) => Answer::Returned(detail),
            }));
            let Some(error) = error else { continue };
            // The broker closes the channel at the first message it refuses and drops what
            // follows, but the confirms of the messages before it may never come: the refusal
            // is about one message only when that message was alone in its window. And only
            // one holding a single event is undeliverable: a batch that is too large as a
            // whole is not the fault of any of its events (the relay offers fewer).
            if let DeliveryError::Refused { reason, detail } = &error {
                if let [message] = window
                    && message.count == 1
                {
                    answered.push(Answer::Refused {
                        reason,
                        detail: detail.clone(),
                    });
                    return (answered, Some(error));
                }
                // The detail names the first message without a confirm, which need not be
                // the one refused.
                let what = match window {
                    [message] => format!("a batch of {} events", message.count),
                    _ => format!("one of {} messages published together", window.len()),
                };
                let error = DeliveryError::Refused {
                    reason,
                    detail: format!("{detail} (the broker refused {what}; fewer may go)"),
                };
                return (answered, Some(error));
            }
            if let DeliveryError::Retry {
                reason: "confirm_timeout",
                detail,
                ..
            } = &error
                && self
                    .link
                    .as_ref()
                    .is_some_and(|l| l.connection.status().blocked())
            {
                let error = retry(
                    "confirm_timeout",
                    format!("{detail} (the broker is blocking publishers: a memory or disk alarm)"),
                );
                return (answered, Some(error));
            }
            return (answered, Some(error));
        }
        (answered, None)
    }

    /// The open channel, connecting first when there is none or the old one died.
    async fn channel(&mut self) -> Result<Channel, DeliveryError> {
        if self.is_connected()
            && let Some(link) = &self.link
        {
            return Ok(link.channel.clone());
        }
        // Close what is left of a dead link before opening the next one.
        self.link = None;
        let link = self.connect().await?;
        let channel = link.channel.clone();
        self.link = Some(link);
        Ok(channel)
    }

    async fn connect(&self) -> Result<Link, DeliveryError> {
        let properties = ConnectionProperties::default()
            .with_connection_name(format!("auditbridge {}", self.name).into());
        let attempt = async {
            let connection = Connection::connect(&self.params.url, properties).await?;
            let channel = connection.create_channel().await?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
            Ok::<_, lapin::Error>(Link {
                connection,
                channel,
            })
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
            Ok(Ok(link)) => {
                info!(destination = %self.name, url = %self.redacted_url, message = "Connected to RabbitMQ.");
                Ok(link)
            }
            Ok(Err(error)) => Err(retry(
                "connect",
                format!(
                    "cannot connect to {}: {}",
                    self.redacted_url,
                    self.scrub(&error.to_string())
                ),
            )),
            Err(_) => Err(retry(
                "connect",
                format!(
                    "connecting to {} took longer than {CONNECT_TIMEOUT:?}",
                    self.redacted_url
                ),
            )),
        }
    }

    /// Removes the URL (which holds the password) from a message that might quote it.
    fn scrub(&self, text: &str) -> String {
        text.replace(&self.params.url, &self.redacted_url)
    }
}

/// Publishes `window` and waits for its confirms, in order. Returns the outcome of each
/// message up to the first failure (`None`: confirmed, `Some(detail)`: returned as
/// unroutable), and that failure. A confirm that has not come `confirm_timeout` after the last
/// publish of the window counts as failed.
async fn publish_window(
    channel: &Channel,
    exchange: &ShortString,
    options: BasicPublishOptions,
    window: &[Message<'_>],
    confirm_timeout: Duration,
) -> (Vec<Option<String>>, Option<DeliveryError>) {
    // All publishes of the window run together: each one waits until lapin wrote its frames,
    // and waiting for them one by one costs a wakeup of the I/O loop per message. They are
    // first polled in order, so the messages still go out in the order of `window`.
    let publishes = window.iter().map(|message| {
        channel.basic_publish(
            exchange.clone(),
            message.routing_key.clone(),
            options,
            &message.body,
            message.properties.clone(),
        )
    });
    // A publish waits until its frames are written, which a broker that blocks publishers
    // (a resource alarm) can delay for as long as the alarm lasts.
    let Ok(published) =
        tokio::time::timeout(confirm_timeout, futures::future::join_all(publishes)).await
    else {
        let error = retry(
            "confirm_timeout",
            format!(
                "the broker did not take {} messages for exchange {:?} within {confirm_timeout:?}",
                window.len(),
                exchange.as_str()
            ),
        );
        return (Vec::new(), Some(error));
    };
    // In order: when a publish failed because the broker closed the channel, the earlier
    // confirms carry the broker's reason (`NOT_FOUND - no exchange ...`).
    let deadline = Instant::now() + confirm_timeout;
    let mut returns = Vec::new();
    for (message, published) in window.iter().zip(published) {
        let outcome = match published {
            Ok(confirm) => {
                check_confirm(
                    exchange.as_str(),
                    message,
                    confirm,
                    deadline,
                    confirm_timeout,
                )
                .await
            }
            Err(error) => Err(publish_failure(
                &error,
                format!(
                    "publishing event {} to exchange {:?} failed: {error}",
                    message.id,
                    exchange.as_str()
                ),
            )),
        };
        match outcome {
            Ok(Some(returned)) => returns.push(returned),
            Ok(None) => {}
            // A return can ride on any confirm of the window (below), so after a failure no
            // message of the window can be said to be confirmed rather than returned.
            Err(error) => return (Vec::new(), Some(error)),
        }
    }
    // lapin hands each returned message to whichever confirm it completes next, not to the
    // confirm of the message that was returned (with `multiple` acks, any of the window's).
    // The broker sends a return before the ack of its message, and the whole window's acks
    // are awaited here, so every return of the window is among `returns`: match them to the
    // messages by message id (unique within a call).
    let mut outcomes: Vec<Option<String>> = vec![None; window.len()];
    for returned in returns {
        let id = returned
            .properties
            .message_id()
            .as_ref()
            .map(|m| m.as_str().to_owned());
        let Some(i) = window.iter().position(|m| Some(m.id.to_string()) == id) else {
            let error = retry(
                "returned",
                format!(
                    "the broker returned a message this window did not publish (message id {id:?}); sending the window again"
                ),
            );
            return (Vec::new(), Some(error));
        };
        outcomes[i] = Some(returned_detail(exchange.as_str(), &window[i], &returned));
    }
    (outcomes, None)
}

/// `Ok` when the broker confirmed the message, with the returned message lapin attached to
/// this confirm (which may be another message's), an error otherwise.
async fn check_confirm(
    exchange: &str,
    message: &Message<'_>,
    confirm: PublisherConfirm,
    deadline: Instant,
    confirm_timeout: Duration,
) -> Result<Option<BasicReturnMessage>, DeliveryError> {
    let id = message.id;
    match tokio::time::timeout_at(deadline, confirm).await {
        Err(_) => Err(retry(
            "confirm_timeout",
            format!(
                "no publisher confirm for event {id} on exchange {exchange:?} within {confirm_timeout:?}"
            ),
        )),
        Ok(Err(error)) => Err(publish_failure(
            &error,
            format!("publishing event {id} to exchange {exchange:?} failed: {error}"),
        )),
        Ok(Ok(Confirmation::Ack(None))) => Ok(None),
        Ok(Ok(Confirmation::Ack(Some(returned)))) => Ok(Some(returned)),
        Ok(Ok(Confirmation::Nack(_))) => Err(retry(
            "nack",
            format!(
                "the broker nacked event {id} on exchange {exchange:?} (routing key {:?})",
                message.routing_key.as_str()
            ),
        )),
        Ok(Ok(Confirmation::NotRequested)) => Err(retry(
            "channel",
            "the channel is not in confirm mode; cannot tell whether the broker took the message"
                .into(),
        )),
    }
}

fn returned_detail(exchange: &str, message: &Message<'_>, returned: &BasicReturnMessage) -> String {
    let what = if message.count == 1 {
        format!("event {}", message.id)
    } else {
        format!("a batch of {} events from {}", message.count, message.id)
    };
    format!(
        "the broker returned {what}: exchange {exchange:?} has no route for routing key {:?} ({} {})",
        returned.delivery.routing_key.as_str(),
        returned.reply_code,
        returned.reply_text,
    )
}

/// The failure for a lapin error while publishing a message or awaiting its confirm:
/// [`DeliveryError::Refused`] when the broker closed the channel over the message itself
/// (see [`refusal_reason`]), a retry otherwise.
fn publish_failure(error: &lapin::Error, detail: String) -> DeliveryError {
    match refusal_reason(error) {
        Some(reason) => DeliveryError::Refused { reason, detail },
        None => retry(lapin_reason(error), detail),
    }
}

/// The metric reason when `error` is the broker closing the channel over the message being
/// published, which the same bytes would meet again, rather than over its configuration or
/// state, which someone can fix while the events wait.
///
/// On `basic.publish` RabbitMQ answers 406 PRECONDITION_FAILED for a message over its
/// `max_message_size` (`too_large`, told by the reply text; the detail keeps all of it) and
/// for properties it will not take, such as a `user_id` that is not the connection's user or an
/// `expiration` that is not a number (`precondition_failed`; the sink sets neither). Not the
/// message's fault: 403 ACCESS_REFUSED (no write permission, an internal exchange) and 404
/// NOT_FOUND (no such exchange) are configuration, 405 RESOURCE_LOCKED is the broker's state;
/// 311 CONTENT_TOO_LARGE, which RabbitMQ does not send, is "may retry later" in the AMQP spec.
/// Connection-level (hard) errors stop every message alike.
fn refusal_reason(error: &lapin::Error) -> Option<&'static str> {
    let ErrorKind::ProtocolError(amqp) = error.kind() else {
        return None;
    };
    match amqp.kind() {
        AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED) => {
            if amqp.get_message().as_str().contains("message size") {
                Some("too_large")
            } else {
                Some("precondition_failed")
            }
        }
        _ => None,
    }
}

/// The metric reason for a lapin error: the connection as a whole (`connect`) or just the
/// channel (`channel`, e.g. the broker closed it because the exchange is missing).
fn lapin_reason(error: &lapin::Error) -> &'static str {
    match error.kind() {
        ErrorKind::IOError(_)
        | ErrorKind::InvalidConnectionState(_)
        | ErrorKind::MissingHeartbeatError
        | ErrorKind::RuntimeShutdownError(_) => "connect",
        _ if error.is_amqp_hard_error() => "connect",
        _ => "channel",
    }
}

fn retry(reason: &'static str, detail: String) -> DeliveryError {
    DeliveryError::Retry {
        reason,
        detail,
        retry_after: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rabbitmq::RabbitMode;
    use crate::rabbitmq::message::event_message;
    use lapin::types::{AMQPValue, FieldTable};
    use std::collections::{HashMap, HashSet};
    use uuid::Uuid;

    use lapin::ExchangeKind;
    use lapin::message::BasicGetMessage;
    use lapin::options::{
        BasicGetOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
        QueueDeclareOptions, QueueDeleteOptions,
    };
    use time::OffsetDateTime;

    const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

    /// A topic exchange of its own (and, when bound, a queue that takes everything), set up by
    /// the test the way an operator would.
    struct Broker {
        _connection: Connection,
        channel: Channel,
        exchange: String,
        queue: String,
    }

    impl Broker {
        async fn new(bound: bool) -> Broker {
            let suffix = Uuid::new_v4();
            Broker::declare(
                format!("test.ab.{suffix}"),
                format!("test.ab.{suffix}"),
                bound,
            )
            .await
        }

        async fn declare(exchange: String, queue: String, bound: bool) -> Broker {
            let connection = Connection::connect(URL, ConnectionProperties::default())
                .await
                .unwrap();
            let channel = connection.create_channel().await.unwrap();
            channel
                .exchange_declare(
                    exchange.as_str().into(),
                    ExchangeKind::Topic,
                    ExchangeDeclareOptions::default(),
                    FieldTable::default(),
                )
                .await
                .unwrap();
            if bound {
                let options = QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                };
                channel
                    .queue_declare(queue.as_str().into(), options, expiring())
                    .await
                    .unwrap();
                channel
                    .queue_bind(
                        queue.as_str().into(),
                        exchange.as_str().into(),
                        "#".into(),
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await
                    .unwrap();
            }
            Broker {
                _connection: connection,
                channel,
                exchange,
                queue,
            }
        }

        fn params(&self, mode: RabbitMode) -> RabbitParams {
            params(&self.exchange, mode)
        }

        /// Takes `want` messages off the queue, giving up after 10 s; then checks none is left.
        async fn take(&self, want: usize) -> Vec<BasicGetMessage> {
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut got = Vec::with_capacity(want);
            while got.len() < want && Instant::now() < deadline {
                match self.get().await {
                    Some(m) => got.push(m),
                    None => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
            assert_eq!(got.len(), want, "messages on queue {}", self.queue);
            assert!(
                self.get().await.is_none(),
                "more than {want} messages on queue {}",
                self.queue
            );
            got
        }

        async fn get(&self) -> Option<BasicGetMessage> {
            self.channel
                .basic_get(self.queue.as_str().into(), BasicGetOptions { no_ack: true })
                .await
                .unwrap()
        }

        async fn queued(&self) -> u32 {
            let options = QueueDeclareOptions {
                passive: true,
                ..Default::default()
            };
            let queue = self
                .channel
                .queue_declare(self.queue.as_str().into(), options, FieldTable::default())
                .await
                .unwrap();
            queue.message_count()
        }

        async fn delete(self) {
            let _ = self
                .channel
                .queue_delete(self.queue.as_str().into(), QueueDeleteOptions::default())
                .await;
            self.channel
                .exchange_delete(
                    self.exchange.as_str().into(),
                    ExchangeDeleteOptions::default(),
                )
                .await
                .unwrap();
        }
    }

    /// Queue arguments that let the broker remove a queue a failed test left behind.
    fn expiring() -> FieldTable {
        let mut arguments = FieldTable::default();
        arguments.insert("x-expires".into(), AMQPValue::LongLongInt(600_000));
        arguments
    }

    fn params(exchange: &str, mode: RabbitMode) -> RabbitParams {
        RabbitParams {
            url: URL.into(),
            exchange: exchange.into(),
            routing_key: "audit.{tenant}.{action}.{outcome}.{source}".into(),
            mandatory: true,
            mode,
            confirm_timeout: Duration::from_secs(10),
            max_in_flight: 1000,
            max_batch_bytes: 1024 * 1024,
        }
    }

    fn event(n: usize) -> OutEvent {
        let tenant = if n.is_multiple_of(2) {
            "acme"
        } else {
            "globex"
        };
        let outcome = if n.is_multiple_of(3) {
            "denied"
        } else {
            "success"
        };
        event_for(n, tenant, "document.update", outcome)
    }

    fn event_for(n: usize, tenant: &str, action: &str, outcome: &str) -> OutEvent {
        let id = Uuid::new_v4();
        OutEvent {
            id,
            tenant: tenant.into(),
            action: action.into(),
            outcome: outcome.into(),
            source: "docs-api".into(),
            received_at: OffsetDateTime::now_utc(),
            json: serde_json::json!({"id": id, "tenant": tenant, "action": action, "outcome": outcome, "n": n})
                .to_string(),
        }
    }

    /// Declares a queue of the broker's name bound to its exchange with `binding` only.
    async fn bind_only(broker: &Broker, binding: &str) {
        let options = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        broker
            .channel
            .queue_declare(broker.queue.as_str().into(), options, expiring())
            .await
            .unwrap();
        broker
            .channel
            .queue_bind(
                broker.queue.as_str().into(),
                broker.exchange.as_str().into(),
                binding.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
    }

    fn body_ids(m: &BasicGetMessage) -> Vec<Uuid> {
        String::from_utf8_lossy(&m.data)
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["id"]
                    .as_str()
                    .unwrap()
                    .parse()
                    .unwrap()
            })
            .collect()
    }

    /// The ids of the events `messages` carry, in order: each message's id in event mode, the
    /// ids in each NDJSON body in batch mode.
    fn event_ids(mode: &RabbitMode, messages: &[BasicGetMessage]) -> Vec<Uuid> {
        match mode {
            RabbitMode::Batch => messages.iter().flat_map(body_ids).collect(),
            RabbitMode::Event => messages
                .iter()
                .map(|m| {
                    m.properties
                        .message_id()
                        .as_ref()
                        .expect("message_id")
                        .as_str()
                        .parse()
                        .unwrap()
                })
                .collect(),
        }
    }

    fn header<'a>(m: &'a BasicGetMessage, key: &str) -> &'a AMQPValue {
        let headers = m.properties.headers().as_ref().expect("headers");
        headers
            .inner()
            .get(key)
            .unwrap_or_else(|| panic!("header {key} missing"))
    }

    fn retry_reason(result: Result<Delivered, DeliveryError>) -> (&'static str, String) {
        match result {
            Err(DeliveryError::Retry { reason, detail, .. }) => (reason, detail),
            other => panic!("expected a Retry error, got {other:?}"),
        }
    }

    fn refused_reason(result: Result<Delivered, DeliveryError>) -> (&'static str, String) {
        match result {
            Err(DeliveryError::Refused { reason, detail }) => (reason, detail),
            other => panic!("expected a Refused error, got {other:?}"),
        }
    }

    /// Runs `rabbitmqctl` on the local broker; its standard output.
    fn rabbitmqctl(args: &[&str]) -> String {
        let out = std::process::Command::new("rabbitmqctl")
            .args(args)
            .output()
            .expect("rabbitmqctl");
        assert!(
            out.status.success(),
            "rabbitmqctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// The broker's `max_message_size` (read only: it is global, and tests run in parallel).
    fn max_message_size() -> usize {
        let out = rabbitmqctl(&["eval", "application:get_env(rabbit, max_message_size)."]);
        // `{ok,134217728}`
        out.trim()
            .strip_prefix("{ok,")
            .and_then(|rest| rest.strip_suffix('}'))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no max_message_size in {out:?}"))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn event_mode_publishes_one_persistent_message_per_event() {
        let broker = Broker::new(true).await;
        let mut sink = RabbitSink::new("bus", broker.params(RabbitMode::Event));
        let events: Vec<OutEvent> = (0..12).map(event).collect();

        assert_eq!(
            sink.deliver(&events).await.unwrap(),
            Delivered::confirmed(12)
        );
        assert!(sink.is_connected());

        let by_id: HashMap<String, &OutEvent> =
            events.iter().map(|e| (e.id.to_string(), e)).collect();
        let messages = broker.take(12).await;
        let mut seen = HashSet::new();
        for m in &messages {
            let id = m
                .properties
                .message_id()
                .as_ref()
                .expect("message_id")
                .to_string();
            let e = by_id[&id];
            assert!(seen.insert(id.clone()), "{id} arrived twice");
            assert_eq!(m.data, e.json.as_bytes());
            assert_eq!(
                m.routing_key.as_str(),
                format!("audit.{}.document.update.{}.docs-api", e.tenant, e.outcome)
            );
            assert_eq!(*m.properties.delivery_mode(), Some(2));
            assert_eq!(
                m.properties
                    .content_type()
                    .as_ref()
                    .map(ShortString::as_str),
                Some("application/json")
            );
            assert_eq!(
                *m.properties.timestamp(),
                Some(e.received_at.unix_timestamp() as u64)
            );
            assert_eq!(
                header(m, "tenant"),
                &AMQPValue::LongString(e.tenant.as_str().into())
            );
            assert_eq!(
                header(m, "action"),
                &AMQPValue::LongString("document.update".into())
            );
            assert_eq!(
                header(m, "outcome"),
                &AMQPValue::LongString(e.outcome.as_str().into())
            );
        }
        let order: Vec<&str> = messages
            .iter()
            .map(|m| m.properties.message_id().as_ref().unwrap().as_str())
            .collect();
        let want: Vec<String> = events.iter().map(|e| e.id.to_string()).collect();
        assert_eq!(order, want, "messages arrive in the order given");
        broker.delete().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn batch_mode_publishes_one_ndjson_message_per_run() {
        let broker = Broker::new(true).await;
        let mut sink = RabbitSink::new("bus", broker.params(RabbitMode::Batch));
        let events: Vec<OutEvent> = (1..=7)
            .map(|n| event_for(n, "globex", "document.update", "success"))
            .collect();

        assert_eq!(
            sink.deliver(&events).await.unwrap(),
            Delivered::confirmed(7)
        );

        let messages = broker.take(1).await;
        let m = &messages[0];
        let body = String::from_utf8(m.data.clone()).unwrap();
        let want: String = events.iter().map(|e| format!("{}\n", e.json)).collect();
        assert_eq!(body, want);
        let ids: Vec<String> = body
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["id"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        assert_eq!(
            ids,
            events.iter().map(|e| e.id.to_string()).collect::<Vec<_>>()
        );
        assert_eq!(
            m.properties.message_id().as_ref().unwrap().as_str(),
            events[0].id.to_string()
        );
        assert_eq!(
            m.properties
                .content_type()
                .as_ref()
                .map(ShortString::as_str),
            Some("application/x-ndjson")
        );
        assert_eq!(*m.properties.delivery_mode(), Some(2));
        assert_eq!(header(m, "count"), &AMQPValue::LongLongInt(7));
        assert_eq!(header(m, "tenant"), &AMQPValue::LongString("globex".into()));
        assert_eq!(
            m.routing_key.as_str(),
            "audit.globex.document.update.success.docs-api"
        );
        broker.delete().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn batch_messages_never_mix_routing_keys_or_tenants() {
        let broker = Broker::new(true).await;
        let mut params = broker.params(RabbitMode::Batch);
        // Without {tenant} in the key, the tenant still splits runs (and is a header).
        params.routing_key = "{action}".into();
        let mut sink = RabbitSink::new("bus", params);
        let spec = [
            ("acme", "a.x"),
            ("acme", "a.x"),
            ("globex", "a.x"),
            ("acme", "a.x"),
            ("acme", "b.y"),
            ("acme", "b.y"),
        ];
        let events: Vec<OutEvent> = spec
            .iter()
            .enumerate()
            .map(|(n, (t, a))| event_for(n, t, a, "success"))
            .collect();

        assert_eq!(
            sink.deliver(&events).await.unwrap(),
            Delivered::confirmed(6)
        );

        let messages = broker.take(4).await;
        let runs: Vec<(String, AMQPValue, Vec<Uuid>)> = messages
            .iter()
            .map(|m| {
                (
                    m.routing_key.to_string(),
                    header(m, "tenant").clone(),
                    body_ids(m),
                )
            })
            .collect();
        let ids = |r: std::ops::Range<usize>| events[r].iter().map(|e| e.id).collect::<Vec<_>>();
        let tenant = |t: &str| AMQPValue::LongString(t.into());
        assert_eq!(
            runs,
            vec![
                ("a.x".into(), tenant("acme"), ids(0..2)),
                ("a.x".into(), tenant("globex"), ids(2..3)),
                ("a.x".into(), tenant("acme"), ids(3..4)),
                ("b.y".into(), tenant("acme"), ids(4..6)),
            ]
        );
        broker.delete().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn batch_messages_are_cut_at_max_batch_bytes_but_a_lone_oversized_event_still_goes() {
        let broker = Broker::new(true).await;
        let mut params = broker.params(RabbitMode::Batch);
        // Three 200-byte events take 3 × 201 = 603 bytes, an exact fit; four would take 804.
        params.max_batch_bytes = 603;
        let mut sink = RabbitSink::new("bus", params);
        let same = |n| padded(event_for(n, "acme", "a", "success"), 200);
        let events = vec![
            same(0),
            same(1),
            same(2),
            same(3),
            // Larger than the bound on its own: it goes alone, and cuts the run around it.
            padded(event_for(4, "acme", "a", "success"), 2000),
            same(5),
            same(6),
        ];
        assert!(
            events
                .iter()
                .all(|e| e.json.len() == 200 || e.json.len() == 2000)
        );

        assert_eq!(
            sink.deliver(&events).await.unwrap(),
            Delivered::confirmed(7)
        );

        let messages = broker.take(4).await;
        let ids = |r: std::ops::Range<usize>| events[r].iter().map(|e| e.id).collect::<Vec<_>>();
        let got: Vec<(Vec<Uuid>, usize, AMQPValue)> = messages
            .iter()
            .map(|m| (body_ids(m), m.data.len(), header(m, "count").clone()))
            .collect();
        assert_eq!(
            got,
            vec![
                (ids(0..3), 603, AMQPValue::LongLongInt(3)),
                (ids(3..4), 201, AMQPValue::LongLongInt(1)),
                (ids(4..5), 2001, AMQPValue::LongLongInt(1)),
                (ids(5..7), 402, AMQPValue::LongLongInt(2)),
            ]
        );
        broker.delete().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_queue_bound_to_one_tenant_gets_only_its_events_and_returns_are_undeliverable() {
        for mode in [RabbitMode::Batch, RabbitMode::Event] {
            let broker = Broker::new(false).await;
            bind_only(&broker, "acme.#").await;
            let mut params = broker.params(mode.clone());
            params.routing_key = "{tenant}.{action}".into();
            let mut sink = RabbitSink::new("bus", params);
            let tenants = ["acme", "globex", "globex", "acme", "initech", "acme"];
            let events: Vec<OutEvent> = tenants
                .iter()
                .enumerate()
                .map(|(n, t)| event_for(n, t, "document.update", "success"))
                .collect();

            let got = sink.deliver(&events).await.unwrap();

            assert_eq!(got.settled, 6, "{mode:?}: {got:?}");
            let refused: Vec<usize> = got.undeliverable.iter().map(|u| u.index).collect();
            assert_eq!(refused, [1, 2, 4], "{mode:?}");
            assert!(got.undeliverable.iter().all(|u| u.reason == "returned"));
            assert!(
                got.undeliverable[0]
                    .detail
                    .contains("globex.document.update")
                    && got.undeliverable[0].detail.contains("NO_ROUTE"),
                "{}",
                got.undeliverable[0].detail
            );
            // A return is an answer, not a failure: the connection stays.
            assert!(sink.is_connected());
            let want: Vec<Uuid> = [0, 3, 5].iter().map(|&i| events[i].id).collect();
            let queued = event_ids(&mode, &broker.take(3).await);
            assert_eq!(queued, want, "{mode:?}");
            broker.delete().await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_event_whose_routing_key_is_too_long_is_undeliverable_and_the_rest_go() {
        for mode in [RabbitMode::Event, RabbitMode::Batch] {
            let broker = Broker::new(true).await;
            let mut params = broker.params(mode.clone());
            params.routing_key = "{tenant}.{action}".into();
            let mut sink = RabbitSink::new("bus", params);
            // Five 60-character tokens: a valid action, a 300-byte routing key.
            let long = vec!["x".repeat(60); 5].join(".");
            let events = vec![
                event_for(0, "acme", "a", "success"),
                event_for(1, "acme", &long, "success"),
                event_for(2, "acme", "a", "success"),
            ];

            // The call ends at the event: settled up to and including it, nothing after it.
            let got = sink.deliver(&events).await.unwrap();
            assert_eq!(got.settled, 2, "{mode:?}");
            assert_eq!(got.undeliverable.len(), 1);
            assert_eq!(got.undeliverable[0].index, 1);
            assert_eq!(got.undeliverable[0].reason, "routing_key");
            assert!(
                got.undeliverable[0]
                    .detail
                    .contains(&events[1].id.to_string()),
                "{}",
                got.undeliverable[0].detail
            );
            assert_eq!(
                sink.deliver(&events[2..]).await.unwrap(),
                Delivered::confirmed(1)
            );
            let ids = event_ids(&mode, &broker.take(2).await);
            assert_eq!(ids, [events[0].id, events[2].id], "{mode:?}");
            broker.delete().await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unroutable_mandatory_message_is_undeliverable() {
        let broker = Broker::new(false).await;
        let mut params = broker.params(RabbitMode::Event);
        params.routing_key = "{tenant}.{action}".into();
        let mut sink = RabbitSink::new("bus", params.clone());
        let events: Vec<OutEvent> = (0..3).map(event).collect();

        let got = sink.deliver(&events).await.unwrap();
        assert_eq!(got.settled, 3);
        assert_eq!(got.confirmed_count(), 0);
        let detail = &got.undeliverable[0].detail;
        assert_eq!(got.undeliverable[0].reason, "returned");
        assert!(
            detail.contains("acme.document.update") && detail.contains("NO_ROUTE"),
            "{detail}"
        );

        // Without `mandatory` the broker drops unroutable messages and confirms them.
        params.mandatory = false;
        let mut sink = RabbitSink::new("bus", params);
        assert_eq!(
            sink.deliver(&events).await.unwrap(),
            Delivered::confirmed(3)
        );
        broker.delete().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_connection_closed_by_the_broker_is_replaced_on_the_next_call() {
        let broker = Broker::new(true).await;
        let name = format!("closed-{}", Uuid::new_v4());
        let mut sink = RabbitSink::new(&name, broker.params(RabbitMode::Event));
        let first: Vec<OutEvent> = (0..3).map(event).collect();
        assert_eq!(sink.deliver(&first).await.unwrap(), Delivered::confirmed(3));

        // Only this sink's connection is closed, by the broker (as `stop_app` does to all).
        // Tab-separated: the Erlang pid (as `close_connection` wants it), then the properties.
        let listing = rabbitmqctl(&["-q", "list_connections", "pid", "client_properties"]);
        let pid = listing
            .lines()
            .find(|line| line.contains(&name))
            .and_then(|line| line.split('\t').next())
            .unwrap_or_else(|| panic!("no connection named {name} in {listing}"));
        rabbitmqctl(&["close_connection", pid, "test"]);
        let deadline = Instant::now() + Duration::from_secs(10);
        while sink.is_connected() {
            assert!(
                Instant::now() < deadline,
                "the sink did not notice the closed connection"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        let second: Vec<OutEvent> = (0..3).map(event).collect();
        assert_eq!(
            sink.deliver(&second).await.unwrap(),
            Delivered::confirmed(3)
        );
        assert!(sink.is_connected());
        let ids: Vec<String> = broker
            .take(6)
            .await
            .iter()
            .map(|m| m.properties.message_id().as_ref().unwrap().to_string())
            .collect();
        let want: Vec<String> = first
            .iter()
            .chain(&second)
            .map(|e| e.id.to_string())
            .collect();
        assert_eq!(ids, want);
        broker.delete().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_nack_is_a_failure() {
        // A full queue with `reject-publish` overflow makes the broker nack further publishes.
        let broker = Broker::new(false).await;
        let mut arguments = expiring();
        arguments.insert("x-max-length".into(), AMQPValue::LongLongInt(1));
        arguments.insert(
            "x-overflow".into(),
            AMQPValue::LongString("reject-publish".into()),
        );
        let queue = broker.queue.as_str();
        broker
            .channel
            .queue_declare(queue.into(), QueueDeclareOptions::default(), arguments)
            .await
            .unwrap();
        broker
            .channel
            .queue_bind(
                queue.into(),
                broker.exchange.as_str().into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let mut sink = RabbitSink::new("bus", broker.params(RabbitMode::Event));
        let events: Vec<OutEvent> = (0..3).map(event).collect();

        // Nothing of a window with a nack counts (a return may ride on any of its confirms).
        let (reason, detail) = retry_reason(sink.deliver(&events).await);
        assert_eq!(reason, "nack");
        assert!(detail.contains(&events[1].id.to_string()), "{detail}");
        assert!(!sink.is_connected());
        broker.delete().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_broker_that_never_answers_fails_within_the_connect_timeout() {
        // Accepts TCP connections and never speaks AMQP.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let silent = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        let mut sink = RabbitSink::new(
            "bus",
            RabbitParams {
                url: format!("amqp://guest:guest@127.0.0.1:{port}/%2f"),
                ..params("x", RabbitMode::Event)
            },
        );
        let started = Instant::now();
        let (reason, detail) = retry_reason(sink.deliver(&[event(0)]).await);
        assert_eq!(reason, "connect");
        assert!(detail.contains("took longer than"), "{detail}");
        assert!(
            started.elapsed() < CONNECT_TIMEOUT + Duration::from_secs(2),
            "took {:?}",
            started.elapsed()
        );
        silent.abort();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_missing_exchange_fails_the_channel_and_the_next_call_reconnects() {
        let suffix = Uuid::new_v4();
        let exchange = format!("test.ab.missing.{suffix}");
        let mut sink = RabbitSink::new("bus", params(&exchange, RabbitMode::Event));
        let events: Vec<OutEvent> = (0..5).map(event).collect();

        let (reason, detail) = retry_reason(sink.deliver(&events).await);
        assert_eq!(reason, "channel");
        assert!(
            detail.contains("NOT_FOUND") && detail.contains(&exchange),
            "{detail}"
        );
        assert!(!sink.is_connected());

        // The operator creates the exchange; the same sink delivers on a new connection.
        let broker = Broker::declare(exchange, format!("test.ab.{suffix}"), true).await;
        assert_eq!(
            sink.deliver(&events).await.unwrap(),
            Delivered::confirmed(5)
        );
        assert!(sink.is_connected());
        let ids: HashSet<String> = broker
            .take(5)
            .await
            .iter()
            .map(|m| m.properties.message_id().as_ref().unwrap().to_string())
            .collect();
        assert_eq!(ids, events.iter().map(|e| e.id.to_string()).collect());
        broker.delete().await;
    }

    /// A message over the broker's `max_message_size` makes it close the channel with 406
    /// PRECONDITION_FAILED. Provoked for real, with an event one byte over the broker's own
    /// limit (128 MiB by default in RabbitMQ 3, 16 MiB in 4): the limit is global, so the test
    /// reads it and never changes it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_event_over_the_brokers_max_message_size_is_undeliverable_and_the_next_call_reconnects()
     {
        let limit = max_message_size();
        let big = padded(event_for(2, "acme", "a", "success"), limit + 1);
        assert_eq!(big.json.len(), limit + 1);
        let events = vec![
            event_for(0, "acme", "a", "success"),
            event_for(1, "acme", "a", "success"),
            big,
            event_for(3, "acme", "a", "success"),
        ];
        // Batch mode: the event is larger than `max_batch_bytes` and goes alone, as in event mode.
        for mode in [RabbitMode::Event, RabbitMode::Batch] {
            let broker = Broker::new(true).await;
            let mut params = broker.params(mode.clone());
            // One message per confirm window: the broker's refusal is about that message.
            params.max_in_flight = 1;
            params.max_batch_bytes = 1024;
            let mut sink = RabbitSink::new("bus", params);

            let got = sink.deliver(&events).await.unwrap();
            // Confirmed before it, undeliverable itself; the call ends with the channel.
            assert_eq!(got.settled, 3, "{mode:?}: {got:?}");
            assert_eq!(got.undeliverable.len(), 1, "{mode:?}: {got:?}");
            let u = &got.undeliverable[0];
            assert_eq!((u.index, u.reason), (2, "too_large"), "{mode:?}");
            assert!(
                u.detail.contains(&events[2].id.to_string())
                    && u.detail.contains("PRECONDITION_FAILED")
                    && u.detail.contains("message size"),
                "{}",
                u.detail
            );
            assert!(!sink.is_connected());

            // The same sink goes on with the next event, on a new connection.
            assert_eq!(
                sink.deliver(&events[3..]).await.unwrap(),
                Delivered::confirmed(1)
            );
            assert!(sink.is_connected());
            // In batch mode the first two events share a message.
            let count = if mode == RabbitMode::Event { 3 } else { 2 };
            let ids = event_ids(&mode, &broker.take(count).await);
            assert_eq!(ids, [events[0].id, events[1].id, events[3].id], "{mode:?}");
            broker.delete().await;
        }
    }

    /// When the refused message shared its confirm window with others, or carries several
    /// events, nothing tells which event it is about: the call is refused as a whole, and the
    /// relay offers less until one event is alone in its message.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refused_message_that_cannot_be_pinned_on_one_event_refuses_the_call() {
        let limit = max_message_size();
        let broker = Broker::new(true).await;

        // Event mode, one window: four messages in flight when the broker closes the channel.
        let big = padded(event_for(2, "acme", "a", "success"), limit + 1);
        let events = vec![
            event_for(0, "acme", "a", "success"),
            event_for(1, "acme", "a", "success"),
            big,
            event_for(3, "acme", "a", "success"),
        ];
        let mut sink = RabbitSink::new("bus", broker.params(RabbitMode::Event));
        let (reason, detail) = refused_reason(sink.deliver(&events).await);
        assert_eq!(reason, "too_large");
        assert!(
            detail.contains("PRECONDITION_FAILED")
                && detail.contains("the broker refused one of 4 messages published together"),
            "{detail}"
        );
        assert!(!sink.is_connected());
        // What the relay does next: the first half goes, the event alone is undeliverable.
        assert_eq!(
            sink.deliver(&events[..2]).await.unwrap(),
            Delivered::confirmed(2)
        );
        let got = sink.deliver(&events[2..3]).await.unwrap();
        assert_eq!(got.settled, 1);
        assert_eq!(got.undeliverable[0].reason, "too_large");
        let (first, second) = (events[0].id, events[1].id);
        drop(events);

        // Batch mode with a bound above the broker's limit (a broker configured below 16 MiB,
        // or a hand-built configuration): two events that each fit make one message that does
        // not. Neither is undeliverable; alone, each goes.
        let mut params = broker.params(RabbitMode::Batch);
        params.max_batch_bytes = usize::MAX;
        let mut sink = RabbitSink::new("bus", params);
        let half: Vec<OutEvent> = (0..2)
            .map(|n| padded(event_for(n, "acme", "a", "success"), limit / 2 + 1))
            .collect();
        let (reason, detail) = refused_reason(sink.deliver(&half).await);
        assert_eq!(reason, "too_large");
        assert!(
            detail.contains("the broker refused a batch of 2 events"),
            "{detail}"
        );
        assert!(!sink.is_connected());
        assert_eq!(
            sink.deliver(&half[..1]).await.unwrap(),
            Delivered::confirmed(1)
        );
        assert_eq!(
            sink.deliver(&half[1..]).await.unwrap(),
            Delivered::confirmed(1)
        );
        // The broker routed the two messages before the big one, but they were never reported
        // settled: the relay offered them again. Then the halves, one message each.
        let ids: Vec<Uuid> = broker.take(6).await.iter().flat_map(body_ids).collect();
        assert_eq!(ids, [first, second, first, second, half[0].id, half[1].id]);
        broker.delete().await;
    }

    /// Another 406 on publish, cheap to provoke per test: RabbitMQ refuses a `user_id` property
    /// that is not the connection's user. The sink never sets one, so the message is built by
    /// hand and goes through the sink's own publishing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_message_refused_for_its_properties_is_precondition_failed() {
        let broker = Broker::new(true).await;
        let mut params = broker.params(RabbitMode::Event);
        params.max_in_flight = 1;
        let mut sink = RabbitSink::new("bus", params);
        let events: Vec<OutEvent> = (0..3).map(event).collect();
        let mut messages: Vec<Message<'_>> = events
            .iter()
            .enumerate()
            .map(|(i, e)| event_message(i, e, message::routing_key(&sink.params, e).unwrap()))
            .collect();
        messages[1].properties = messages[1]
            .properties
            .clone()
            .with_user_id("not-guest".into());

        let (answered, error) = sink
            .publish(broker.exchange.as_str().into(), &messages)
            .await;

        // Confirmed before it, refused itself, nothing after it (the channel is gone).
        assert_eq!(answered.len(), 2, "{answered:?}");
        assert_eq!(answered[0], Answer::Confirmed);
        let Answer::Refused { reason, detail } = &answered[1] else {
            panic!("{answered:?}");
        };
        assert_eq!(*reason, "precondition_failed");
        assert!(
            detail.contains("PRECONDITION_FAILED")
                && detail.contains("user_id")
                && detail.contains(&events[1].id.to_string()),
            "{detail}"
        );
        let error = error.expect("the channel closed");
        assert_eq!(error.reason(), "precondition_failed");
        assert!(!sink.is_connected());
        assert_eq!(
            event_ids(&RabbitMode::Event, &broker.take(1).await),
            [events[0].id]
        );
        broker.delete().await;
    }

    /// Which lapin errors on publish are the message's fault (refused) and which are the
    /// broker's or the configuration's (retried, holding the events).
    #[test]
    fn only_a_channel_closed_over_the_message_itself_refuses_it() {
        let amqp = |kind: AMQPErrorKind, text: &str| {
            lapin::Error::from(ErrorKind::ProtocolError(lapin::protocol::AMQPError::new(
                kind,
                text.into(),
            )))
        };
        let soft = |e: AMQPSoftError, text: &str| amqp(AMQPErrorKind::Soft(e), text);
        let cases = [
            (
                soft(
                    AMQPSoftError::PRECONDITIONFAILED,
                    "PRECONDITION_FAILED - message size 134217729 is larger than configured max size 134217728",
                ),
                Some("too_large"),
                "too_large",
            ),
            (
                soft(
                    AMQPSoftError::PRECONDITIONFAILED,
                    "PRECONDITION_FAILED - user_id property set to 'x' but authenticated user was 'guest'",
                ),
                Some("precondition_failed"),
                "precondition_failed",
            ),
            (
                soft(
                    AMQPSoftError::NOTFOUND,
                    "NOT_FOUND - no exchange 'audit' in vhost '/'",
                ),
                None,
                "channel",
            ),
            (
                soft(
                    AMQPSoftError::ACCESSREFUSED,
                    "ACCESS_REFUSED - write access to exchange 'audit' refused",
                ),
                None,
                "channel",
            ),
            (
                soft(AMQPSoftError::RESOURCELOCKED, "RESOURCE_LOCKED"),
                None,
                "channel",
            ),
            (
                soft(AMQPSoftError::CONTENTTOOLARGE, "CONTENT_TOO_LARGE"),
                None,
                "channel",
            ),
            (
                amqp(
                    AMQPErrorKind::Hard(lapin::protocol::AMQPHardError::CONNECTIONFORCED),
                    "CONNECTION_FORCED - broker forced connection closure",
                ),
                None,
                "connect",
            ),
            (
                lapin::Error::from(ErrorKind::InvalidChannelState(
                    lapin::ChannelState::Closed,
                    "closed",
                )),
                None,
                "channel",
            ),
            (
                lapin::Error::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset)),
                None,
                "connect",
            ),
        ];
        for (error, refusal, reason) in cases {
            assert_eq!(refusal_reason(&error), refusal, "{error}");
            let failure = publish_failure(&error, format!("detail: {error}"));
            assert_eq!(failure.reason(), reason, "{error}");
            assert_eq!(
                matches!(failure, DeliveryError::Refused { .. }),
                refusal.is_some(),
                "{error}"
            );
            assert_eq!(failure.to_string(), format!("detail: {error}"));
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_wrong_password_fails_to_connect_quickly_without_showing_it() {
        let password = format!("not-the-password-{}", Uuid::new_v4());
        let url = format!("amqp://guest:{password}@127.0.0.1:5672/%2f");
        let params = RabbitParams {
            url: url.clone(),
            exchange: "amq.topic".into(),
            routing_key: "{tenant}".into(),
            mandatory: false,
            mode: RabbitMode::Event,
            confirm_timeout: Duration::from_secs(10),
            max_in_flight: 10,
            max_batch_bytes: 1024 * 1024,
        };
        let mut sink = RabbitSink::new("bus", params);
        let started = Instant::now();
        let (reason, detail) = retry_reason(sink.deliver(&[event(0)]).await);
        assert_eq!(reason, "connect");
        assert!(
            started.elapsed() < Duration::from_secs(6),
            "took {:?}",
            started.elapsed()
        );
        assert!(
            !detail.contains(&password) && detail.contains("guest:***@127.0.0.1"),
            "{detail}"
        );
        assert!(!format!("{sink:?}").contains(&password));
        assert!(!sink.is_connected());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_empty_call_does_no_io() {
        let params = RabbitParams {
            // Nothing listens on port 1: any attempt to connect would fail.
            url: "amqp://guest:guest@127.0.0.1:1/%2f".into(),
            exchange: "x".into(),
            routing_key: "{tenant}".into(),
            mandatory: true,
            mode: RabbitMode::Event,
            confirm_timeout: Duration::from_secs(1),
            max_in_flight: 10,
            max_batch_bytes: 1024 * 1024,
        };
        let mut sink = RabbitSink::new("bus", params);
        assert_eq!(sink.deliver(&[]).await.unwrap(), Delivered::confirmed(0));
        assert!(!sink.is_connected());
        let (reason, _) = retry_reason(sink.deliver(&[event(0)]).await);
        assert_eq!(reason, "connect");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_call_larger_than_max_in_flight_is_published_in_windows() {
        let broker = Broker::new(true).await;
        let mut params = broker.params(RabbitMode::Event);
        params.max_in_flight = 100;
        let mut sink = RabbitSink::new("bus", params);
        let events: Vec<OutEvent> = (0..2000).map(event).collect();

        assert_eq!(
            sink.deliver(&events).await.unwrap(),
            Delivered::confirmed(2000)
        );

        // All arrived, once each, and in the order given (one channel, one queue).
        let ids: Vec<String> = broker
            .take(2000)
            .await
            .iter()
            .map(|m| m.properties.message_id().as_ref().unwrap().to_string())
            .collect();
        assert_eq!(
            ids,
            events.iter().map(|e| e.id.to_string()).collect::<Vec<_>>()
        );
        broker.delete().await;
    }

    /// Event mode with confirms, 20,000 events in calls of 500 (max_in_flight 1000), against
    /// the same 20,000 messages published with lapin directly (windows of 1000 unconfirmed,
    /// all publishes of a window in flight together). Both go to a durable queue; the rounds
    /// alternate so that load from elsewhere on the machine hits both alike. Prints the rates
    /// (run with `--release --nocapture` for meaningful figures); asserts only that everything
    /// arrived.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn throughput_of_event_mode_against_raw_lapin() {
        const TOTAL: usize = 20_000;
        const ROUNDS: usize = 2;
        // 600-byte events, as in the design's measured limits.
        let events: Vec<OutEvent> = (0..TOTAL).map(|n| padded(event(n), 600)).collect();
        assert_eq!(events[0].json.len(), 600);
        let (mut sink_rates, mut raw_rates) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            sink_rates.push(sink_rate(&events).await);
            raw_rates.push(raw_rate(&events).await);
        }
        let best = |rates: &[f64]| rates.iter().copied().fold(0.0, f64::max);
        println!(
            "rabbitmq event mode, {TOTAL} persistent 600-byte messages with confirms: sink {:.0} msg/s \
             (calls of 500, rounds {sink_rates:.0?}), raw lapin {:.0} msg/s (rounds {raw_rates:.0?})",
            best(&sink_rates),
            best(&raw_rates),
        );
    }

    /// Grows the event's JSON to `size` bytes with a padding field.
    fn padded(mut e: OutEvent, size: usize) -> OutEvent {
        e.json.pop(); // the closing brace
        e.json.push_str(r#","pad":""#);
        let pad = size.saturating_sub(e.json.len() + 2);
        e.json.extend(std::iter::repeat_n('x', pad));
        e.json.push_str(r#""}"#);
        e
    }

    async fn sink_rate(events: &[OutEvent]) -> f64 {
        let broker = Broker::new(true).await;
        let mut sink = RabbitSink::new("bench", broker.params(RabbitMode::Event));
        sink.deliver(&events[..1]).await.unwrap(); // connect outside the measurement
        let started = Instant::now();
        for call in events.chunks(500) {
            assert_eq!(
                sink.deliver(call).await.unwrap(),
                Delivered::confirmed(call.len())
            );
        }
        let rate = events.len() as f64 / started.elapsed().as_secs_f64();
        assert_eq!(broker.queued().await as usize, events.len() + 1);
        broker.delete().await;
        rate
    }

    async fn raw_rate(events: &[OutEvent]) -> f64 {
        let broker = Broker::new(true).await;
        let connection = Connection::connect(URL, ConnectionProperties::default())
            .await
            .unwrap();
        let channel = connection.create_channel().await.unwrap();
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        // The sink's own message building, so both publish the same bytes and properties.
        let helper = RabbitSink::new("bench", broker.params(RabbitMode::Event));
        let messages: Vec<Message<'_>> = events
            .iter()
            .enumerate()
            .map(|(i, e)| event_message(i, e, message::routing_key(&helper.params, e).unwrap()))
            .collect();
        let exchange: ShortString = broker.exchange.as_str().into();
        let options = BasicPublishOptions {
            mandatory: true,
            immediate: false,
        };
        let started = Instant::now();
        for window in messages.chunks(1000) {
            let publishes = window
                .iter()
                .map(|m| publish_one(&channel, &exchange, options, m));
            for confirm in futures::future::join_all(publishes).await {
                assert_eq!(confirm.unwrap().await.unwrap(), Confirmation::Ack(None));
            }
        }
        let rate = events.len() as f64 / started.elapsed().as_secs_f64();
        assert_eq!(broker.queued().await as usize, events.len());
        broker.delete().await;
        rate
    }

    async fn publish_one(
        channel: &Channel,
        exchange: &ShortString,
        options: BasicPublishOptions,
        m: &Message<'_>,
    ) -> lapin::Result<PublisherConfirm> {
        channel
            .basic_publish(
                exchange.clone(),
                m.routing_key.clone(),
                options,
                &m.body,
                m.properties.clone(),
            )
            .await
    }
}
