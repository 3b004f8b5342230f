//! The errors of this crate. Each variant is a decision for the caller.

use std::fmt;
use std::time::Duration;

use auditbridge_event::Invalid;

/// Why [`crate::EventBuilder::build`] refused to build an event.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BuildError {
    /// A required field was never set.
    #[error("{field}: required field is missing")]
    Missing { field: &'static str },
    /// A field breaks the contract; the detail names it and says what was expected.
    #[error(transparent)]
    Invalid(#[from] Invalid),
}

/// Why [`crate::Client::record`] did not accept an event. The event was *not* recorded; the
/// caller decides what to do (log, fail the request, retry later).
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The event breaks the contract and will never be accepted as it is.
    #[error("invalid audit event: {0}")]
    Invalid(#[from] Invalid),
    /// The serialized event is larger than the configured limit.
    #[error("audit event is {bytes} bytes, larger than the limit of {limit} bytes")]
    Oversize { bytes: usize, limit: usize },
    /// The client cannot take more events now: its queue is full because of `cause`.
    /// Returned at once with [`crate::OnFull::Error`], or after `waited` with
    /// [`crate::OnFull::Wait`].
    #[error("audit client is full ({cause}); waited {waited:?}")]
    Full {
        cause: Backpressure,
        waited: Duration,
    },
    /// [`crate::Client::close`] was called.
    #[error("audit client is closed")]
    Closed,
    /// The event could not be serialized (not expected for a validated event).
    #[error("audit event could not be serialized: {0}")]
    Encode(serde_json::Error),
}

/// Why the client's queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backpressure {
    /// The backing store reached its size limit and NATS is not taking events fast enough
    /// to drain it.
    StoreFull,
    /// The backing store fails (I/O or database errors); writes are being retried. This is
    /// not "full": the events held in memory are kept and written when the store recovers.
    StoreFailing,
    /// Events arrive faster than they can be published or stored.
    Busy,
}

impl Backpressure {
    pub(crate) fn from_u8(v: u8) -> Backpressure {
        match v {
            1 => Backpressure::StoreFull,
            2 => Backpressure::StoreFailing,
            _ => Backpressure::Busy,
        }
    }

    pub(crate) fn as_u8(self) -> u8 {
        match self {
            Backpressure::Busy => 0,
            Backpressure::StoreFull => 1,
            Backpressure::StoreFailing => 2,
        }
    }

    /// A stable label: `store_full`, `store_failing` or `busy`.
    pub fn as_str(self) -> &'static str {
        match self {
            Backpressure::StoreFull => "store_full",
            Backpressure::StoreFailing => "store_failing",
            Backpressure::Busy => "busy",
        }
    }
}

impl fmt::Display for Backpressure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backpressure::StoreFull => "the backing store is at its size limit",
            Backpressure::StoreFailing => "the backing store is failing",
            Backpressure::Busy => "events arrive faster than they are published or stored",
        })
    }
}

/// A setting that cannot be used; the message names it.
#[derive(Debug, thiserror::Error)]
#[error("invalid setting {setting}: {detail}")]
pub struct ConfigError {
    pub setting: String,
    pub detail: String,
}

impl ConfigError {
    pub(crate) fn new(setting: impl Into<String>, detail: impl Into<String>) -> ConfigError {
        ConfigError {
            setting: setting.into(),
            detail: detail.into(),
        }
    }
}

/// A backing store operation failed. All of these are transient from the client's point of
/// view: the events stay in memory and the operation is retried. A full store is not an
/// error (the store accepts fewer events).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{context}: {source}")]
    Database {
        context: &'static str,
        #[source]
        source: sqlx::Error,
    },
}

impl StoreError {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> StoreError {
        let context = context.into();
        move |source| StoreError::Io { context, source }
    }

    pub(crate) fn db(context: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
        move |source| StoreError::Database { context, source }
    }
}

/// [`crate::ClientBuilder::connect`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("opening the {store} backing store: {source}")]
    Store {
        store: &'static str,
        #[source]
        source: StoreError,
    },
    #[error("connecting to NATS: {0}")]
    Nats(#[from] async_nats::ConnectError),
}

/// [`crate::Client::flush`] did not see everything published before its deadline.
#[derive(Debug, thiserror::Error)]
#[error("audit events still unpublished after {waited:?}")]
pub struct FlushTimeout {
    pub waited: Duration,
}

/// [`crate::Client::close`] could not publish everything before its deadline.
#[derive(Debug, thiserror::Error)]
pub enum CloseError {
    /// `events` remain in the backing store. With a durable store (file, postgres) they are
    /// published by the next client that opens the same store; with the memory store they
    /// are lost when the process exits.
    #[error(
        "{events} audit events were not published before the deadline and remain in the {store} store{}",
        if *durable { "" } else { ", which does not survive the process" }
    )]
    Unpublished {
        events: u64,
        store: &'static str,
        durable: bool,
    },
    /// Events that could not even be written to the backing store (it was full or failing
    /// to the end). They are lost.
    #[error(
        "{events} audit events were lost: the {store} store could not take them before the deadline"
    )]
    Lost { events: u64, store: &'static str },
    /// `close` was already called.
    #[error("audit client was already closed")]
    AlreadyClosed,
}
