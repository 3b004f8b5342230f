//! Creates the JetStream stream and the shared durable consumer when they are missing, and
//! brings existing ones in line with the configuration where JetStream allows it.

use std::time::Duration;

use async_nats::jetstream::consumer::{self, AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::context::{ConsumerInfoErrorKind, GetStreamErrorKind};
use async_nats::jetstream::stream::{self, RetentionPolicy, StorageType};
use async_nats::jetstream::{self, ErrorCode};
use auditbridge_config::Config;

/// Why the stream or consumer could not be provisioned; the variants are the caller's decision.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    /// The stream or consumer exists with settings JetStream cannot change in place: a person
    /// must decide (the message says what to do). Workers stop rather than retry.
    #[error("{0}")]
    Conflict(String),
    /// NATS did not answer, or answered with an error that may pass (not connected, a
    /// timeout, a cluster without a leader): try again later.
    #[error("{what}: {source}")]
    Unavailable {
        /// What was being done: "creating stream AUDIT".
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl ProvisionError {
    /// Whether trying again can help (false: a person must change something first).
    pub fn is_retryable(&self) -> bool {
        matches!(self, ProvisionError::Unavailable { .. })
    }
}

/// Wraps a NATS error as [`ProvisionError::Unavailable`], saying what was being done.
fn unavailable<E>(what: impl FnOnce() -> String) -> impl FnOnce(E) -> ProvisionError
where
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    move |source| ProvisionError::Unavailable {
        what: what(),
        source: source.into(),
    }
}

/// The stream's subjects: everything under the prefix.
pub fn stream_subject(prefix: &str) -> String {
    format!("{prefix}.>")
}

/// Makes sure the stream exists with file storage, limits retention, our subjects, max age,
/// duplicate window and largest message. Storage and retention cannot be changed in place; a
/// mismatch there is an error that says so. Returns the stream.
///
/// The largest message is `max_event_bytes` plus header room
/// ([`auditbridge_config::IngestConfig::stream_max_message_size`]); a stream created by an
/// earlier version without one gets it here. A larger message is then refused to its producer
/// at publish time (JetStream error 10054, "message size exceeds maximum allowed") instead of
/// being stored and dead-lettered as `oversize`; messages stored before are not affected.
pub async fn ensure_stream(
    js: &jetstream::Context,
    config: &Config,
) -> Result<stream::Stream, ProvisionError> {
    let name = &config.stream;
    let subject = stream_subject(&config.subject_prefix);
    let ingest = &config.ingest;
    match js.get_stream(name).await {
        Ok(mut existing) => {
            let current = existing
                .info()
                .await
                .map_err(unavailable(|| format!("reading stream {name}")))?
                .config
                .clone();
            if current.storage != StorageType::File {
                return Err(ProvisionError::Conflict(format!(
                    "stream {name} exists with {:?} storage, but the audit stream must use file \
                     storage; JetStream cannot change storage in place: move its messages to a \
                     new stream with file storage, or point AUDITBRIDGE_STREAM at another name",
                    current.storage
                )));
            }
            if current.retention != RetentionPolicy::Limits {
                return Err(ProvisionError::Conflict(format!(
                    "stream {name} exists with {:?} retention, but the audit stream must use \
                     limits retention (so it can be replayed); JetStream cannot change retention \
                     in place: point AUDITBRIDGE_STREAM at another name",
                    current.retention
                )));
            }
            let mut desired = current.clone();
            let mut changes = Vec::new();
            if !current.subjects.contains(&subject) {
                desired.subjects.push(subject.clone());
                changes.push(format!("subjects += {subject}"));
            }
            if current.max_age != ingest.stream_max_age {
                desired.max_age = ingest.stream_max_age;
                changes.push(format!(
                    "max_age {} -> {}",
                    humanize(current.max_age),
                    humanize(ingest.stream_max_age)
                ));
            }
            if current.duplicate_window != ingest.duplicate_window {
                desired.duplicate_window = ingest.duplicate_window;
                changes.push(format!(
                    "duplicate_window {} -> {}",
                    humanize(current.duplicate_window),
                    humanize(ingest.duplicate_window)
                ));
            }
            let max_message_size = max_message_size(config);
            if current.max_message_size != max_message_size {
                desired.max_message_size = max_message_size;
                changes.push(format!(
                    "max_message_size {} -> {max_message_size}",
                    current.max_message_size
                ));
            }
            if !changes.is_empty() {
                js.update_stream(&desired).await.map_err(unavailable(|| {
                    format!("updating stream {name} ({})", changes.join(", "))
                }))?;
                tracing::warn!(stream = %name, changes = %changes.join(", "), message = "Updated the stream to match the configuration.");
            }
            Ok(existing)
        }
        Err(e) if is_not_found(&e) => {
            let created = js
                .create_stream(stream::Config {
                    name: name.clone(),
                    subjects: vec![subject],
                    storage: StorageType::File,
                    retention: RetentionPolicy::Limits,
                    max_age: ingest.stream_max_age,
                    duplicate_window: ingest.duplicate_window,
                    max_message_size: max_message_size(config),
                    ..Default::default()
                })
                .await
                .map_err(unavailable(|| format!("creating stream {name}")))?;
            tracing::info!(stream = %name, message = "Created the stream.");
            Ok(created)
        }
        Err(e) => Err(unavailable(|| format!("looking up stream {name}"))(e)),
    }
}

/// The stream's `max_message_size`, an `i32` in JetStream's API. The configuration bounds
/// `max_event_bytes` to 8 MiB, far below `i32::MAX`.
fn max_message_size(config: &Config) -> i32 {
    i32::try_from(config.ingest.stream_max_message_size()).unwrap_or(i32::MAX)
}

fn is_not_found(e: &jetstream::context::GetStreamError) -> bool {
    matches!(e.kind(), GetStreamErrorKind::JetStream(js) if js.error_code() == ErrorCode::STREAM_NOT_FOUND)
}

fn humanize(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// The consumer every worker shares: durable, pull, explicit acks, never gives up on a message
/// (`max_deliver` unlimited: a message that cannot be stored now must be retried, not
/// dropped).
fn desired_consumer(config: &Config) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(config.consumer.clone()),
        description: Some("auditbridge workers (shared)".into()),
        deliver_policy: DeliverPolicy::All,
        ack_policy: AckPolicy::Explicit,
        ack_wait: config.ingest.ack_wait,
        max_deliver: -1,
        max_ack_pending: config.ingest.max_ack_pending,
        filter_subject: stream_subject(&config.subject_prefix),
        ..Default::default()
    }
}

/// Makes sure the durable consumer exists with our settings. `ack_policy` and
/// `deliver_policy` cannot change on an existing consumer: a mismatch is an error naming them.
/// The rest (ack wait, max ack pending, max deliver, filter) is updated in place.
pub async fn ensure_consumer(
    stream: &stream::Stream,
    config: &Config,
) -> Result<PullConsumer, ProvisionError> {
    let name = &config.consumer;
    let desired = desired_consumer(config);
    match stream.consumer_info(name).await {
        Ok(info) => {
            let current = info.config;
            if current.ack_policy != AckPolicy::Explicit {
                return Err(ProvisionError::Conflict(format!(
                    "consumer {name} on stream {} exists with ack policy {:?}; auditbridge needs \
                     explicit acks (an event is acknowledged only after its commit) and JetStream \
                     cannot change it in place: delete the consumer (it is recreated at start) \
                     or set AUDITBRIDGE_CONSUMER to another name",
                    config.stream, current.ack_policy
                )));
            }
            if current.deliver_policy != DeliverPolicy::All {
                return Err(ProvisionError::Conflict(format!(
                    "consumer {name} on stream {} exists with deliver policy {:?}, expected All; \
                     JetStream cannot change it in place: delete the consumer or set \
                     AUDITBRIDGE_CONSUMER to another name",
                    config.stream, current.deliver_policy
                )));
            }
            let mut changes = Vec::new();
            if current.ack_wait != desired.ack_wait {
                changes.push(format!(
                    "ack_wait {} -> {}",
                    humanize(current.ack_wait),
                    humanize(desired.ack_wait)
                ));
            }
            if current.max_ack_pending != desired.max_ack_pending {
                changes.push(format!(
                    "max_ack_pending {} -> {}",
                    current.max_ack_pending, desired.max_ack_pending
                ));
            }
            if current.max_deliver != desired.max_deliver {
                changes.push(format!("max_deliver {} -> unlimited", current.max_deliver));
            }
            if current.filter_subject != desired.filter_subject {
                changes.push(format!(
                    "filter_subject {:?} -> {:?}",
                    current.filter_subject, desired.filter_subject
                ));
            }
            if !changes.is_empty() {
                stream
                    .create_consumer(desired)
                    .await
                    .map_err(unavailable(|| {
                        format!("updating consumer {name} ({})", changes.join(", "))
                    }))?;
                tracing::warn!(consumer = %name, changes = %changes.join(", "), message = "Updated the consumer to match the configuration.");
            }
        }
        Err(e) => {
            let not_found = match e.kind() {
                ConsumerInfoErrorKind::NotFound => true,
                ConsumerInfoErrorKind::JetStream(js) => {
                    js.error_code() == ErrorCode::CONSUMER_NOT_FOUND
                }
                _ => false,
            };
            if !not_found {
                return Err(unavailable(|| format!("looking up consumer {name}"))(e));
            }
            stream
                .create_consumer(desired)
                .await
                .map_err(unavailable(|| format!("creating consumer {name}")))?;
            tracing::info!(consumer = %name, message = "Created the durable consumer.");
        }
    }
    stream
        .get_consumer(name)
        .await
        .map_err(unavailable(|| format!("binding to consumer {name}")))
}
