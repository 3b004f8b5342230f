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

use super::RabbitParams;
use super::message::{self, Message, Messages};
use crate::{Delivered, DeliveryError, StoredEvent, Undeliverable};

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
pub enum Answer {
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
            redacted_url: params.url.redacted().to_owned(),
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
    pub async fn deliver(&mut self, events: &[StoredEvent]) -> Result<Delivered, DeliveryError> {
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

    /// Publishes one checkpoint (routing key `_log.<tenant>`); done once the broker confirmed
    /// it. One the broker returns as unroutable (no binding for `_log.#` while `mandatory`)
    /// is refused: it is retried, never dropped.
    pub async fn deliver_checkpoint(
        &mut self,
        checkpoint: &crate::CheckpointMessage,
    ) -> Result<(), DeliveryError> {
        let refused = |reason, detail| DeliveryError::Refused { reason, detail };
        let exchange = ShortString::try_new(self.params.exchange.as_str()).map_err(|e| {
            refused(
                "exchange",
                format!("exchange name {:?}: {e}", self.params.exchange),
            )
        })?;
        let key = ShortString::try_new(checkpoint.routing_key())
            .map_err(|e| refused("routing_key", format!("checkpoint routing key: {e}")))?;
        let body = checkpoint.body();
        let message = message::checkpoint_message(checkpoint, key, &body);
        let (answered, error) = self.publish(exchange, std::slice::from_ref(&message)).await;
        if error.is_some() {
            self.link = None;
        }
        match (answered.into_iter().next(), error) {
            (Some(Answer::Confirmed), _) => Ok(()),
            (Some(Answer::Returned(detail)), _) => Err(refused(
                "returned",
                format!("{detail} (bind `_log.#`, or set mandatory false, to take checkpoints)"),
            )),
            (Some(Answer::Refused { reason, detail }), _) => Err(refused(reason, detail)),
            (None, Some(error)) => Err(error),
            (None, None) => Err(retry("confirm", "no answer for the checkpoint".into())),
        }
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
            let connection = Connection::connect(self.params.url.expose(), properties).await?;
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
        text.replace(self.params.url.expose(), &self.redacted_url)
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
        // Matched by the message id each message was published with (an event's id, a
        // batch's first event's, `checkpoint-<id>`).
        let Some(i) = window
            .iter()
            .position(|m| m.properties.message_id().as_ref().map(|p| p.as_str()) == id.as_deref())
        else {
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
    let what = if message.id.is_nil() {
        // Not an event's: a checkpoint, named by its message id.
        let id = message.properties.message_id();
        id.as_ref().map_or("a message", |m| m.as_str()).to_string()
    } else if message.count == 1 {
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

/// Not part of the API (hidden from the docs, no stability promised): the sink's message
/// building and confirm windows, for the two tests in `tests/tests/e2e/destinations.rs` that no
/// public behaviour reaches. One sends a property the sink never sets (a `user_id` RabbitMQ
/// refuses with 406) through the sink's own publishing and reads the answer for each message;
/// the other publishes the sink's exact messages with lapin directly, to compare throughput.
#[doc(hidden)]
pub mod testing {
    pub use super::Answer;
    use super::RabbitSink;
    pub use crate::rabbitmq::message::Message;
    use crate::rabbitmq::message::{event_message, routing_key};
    use crate::{DeliveryError, StoredEvent};

    /// The event-mode message the sink builds for each of `events`.
    ///
    /// # Panics
    /// When an event has no routing key (see `deliver`).
    pub fn event_messages<'a>(sink: &RabbitSink, events: &'a [StoredEvent]) -> Vec<Message<'a>> {
        events
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let key = routing_key(&sink.params, e).expect("the event has a routing key");
                event_message(i, e, key)
            })
            .collect()
    }

    /// Publishes `messages` to `exchange` in the sink's confirm windows, as `deliver` does:
    /// the answers for the prefix of messages the broker answered for, and the failure that
    /// stopped it.
    pub async fn publish(
        sink: &mut RabbitSink,
        exchange: &str,
        messages: &[Message<'_>],
    ) -> (Vec<Answer>, Option<DeliveryError>) {
        sink.publish(exchange.into(), messages).await
    }
}

#[cfg(test)]
mod tests {
    use time::OffsetDateTime;
    use uuid::Uuid;

    use super::*;
    use crate::rabbitmq::RabbitMode;

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
                url: auditbridge_config::SecretUrl::unchecked(format!(
                    "amqp://guest:guest@127.0.0.1:{port}/%2f"
                )),
                exchange: "x".into(),
                routing_key: "{tenant}".into(),
                mandatory: true,
                mode: RabbitMode::Event,
                confirm_timeout: Duration::from_secs(10),
                max_in_flight: 1000,
                max_batch_bytes: 1024 * 1024,
                checkpoints: false,
            },
        );
        let event = StoredEvent {
            id: Uuid::new_v4(),
            tenant: "acme".into(),
            action: "document.update".into(),
            outcome: "success".into(),
            actor_id: "u-1".into(),
            target_id: None,
            source: "docs-api".into(),
            occurred_at: OffsetDateTime::now_utc(),
            received_at: OffsetDateTime::now_utc(),
            json: "{}".into(),
        };
        let started = Instant::now();
        let result = sink.deliver(&[event]).await;
        let Err(DeliveryError::Retry { reason, detail, .. }) = result else {
            panic!("expected a Retry error, got {result:?}");
        };
        assert_eq!(reason, "connect");
        assert!(detail.contains("took longer than"), "{detail}");
        assert!(
            started.elapsed() < CONNECT_TIMEOUT + Duration::from_secs(2),
            "took {:?}",
            started.elapsed()
        );
        silent.abort();
    }
}
