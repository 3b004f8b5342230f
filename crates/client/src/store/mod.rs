//! Backing stores: where events wait, in order, while NATS is unreachable or slow.
//!
//! Every store offers the same four operations to the one background task that owns it:
//! `append` (takes a prefix of the events offered; fewer than offered means "full", which is
//! not an error), `peek` (the oldest events, in order), `remove` (the first `n` of the last
//! peek, once JetStream acknowledged them) and `sync`. Every error is transient: the caller
//! keeps the events and retries. A crash between a publish and its `remove` publishes the
//! event again, which JetStream (`Nats-Msg-Id`) and the worker (`ON CONFLICT (id)`) absorb.

mod file;
mod memory;
mod postgres;

use std::sync::{Arc, Mutex, PoisonError};

use auditbridge_event::Uuid;
use bytes::Bytes;

pub(crate) use self::file::FileStore;
pub(crate) use self::memory::MemoryStore;
pub(crate) use self::postgres::PgStore;
use crate::config::StoreConfig;
use crate::error::StoreError;

/// An event ready to publish: its id, its `Nats-Msg-Id` (`<tenant>:<id>`), its subject and
/// its JSON.
#[derive(Debug, Clone)]
pub(crate) struct Pending {
    pub id: Uuid,
    pub msg_id: String,
    pub subject: String,
    pub payload: Bytes,
}

pub(crate) enum Store {
    Memory(MemoryStore),
    /// Behind a mutex only to run its blocking I/O on tokio's blocking pool (which also
    /// works on a current-thread runtime); one task uses it at a time.
    File(Arc<Mutex<FileStore>>),
    Postgres(PgStore),
}

/// Runs blocking file-store work off the async threads.
async fn blocking<T: Send + 'static>(
    store: &Arc<Mutex<FileStore>>,
    work: impl FnOnce(&mut FileStore) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    let store = store.clone();
    tokio::task::spawn_blocking(move || {
        work(&mut store.lock().unwrap_or_else(PoisonError::into_inner))
    })
    .await
    .map_err(|e| StoreError::io("file store task")(std::io::Error::other(e)))?
}

fn locked(store: &Arc<Mutex<FileStore>>) -> std::sync::MutexGuard<'_, FileStore> {
    store.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Store {
    pub(crate) async fn open(
        config: &StoreConfig,
        prefix: &str,
        max_event_bytes: usize,
    ) -> Result<Store, StoreError> {
        Ok(match config {
            StoreConfig::Memory(p) => Store::Memory(MemoryStore::new(p)),
            StoreConfig::File(p) => {
                let p = p.clone();
                let prefix = prefix.to_owned();
                let store = tokio::task::spawn_blocking(move || {
                    FileStore::open(p, prefix, max_event_bytes)
                })
                .await
                .map_err(|e| {
                    StoreError::io("opening the file store")(std::io::Error::other(e))
                })??;
                Store::File(Arc::new(Mutex::new(store)))
            }
            StoreConfig::Postgres(p) => {
                Store::Postgres(PgStore::open(p, prefix, max_event_bytes).await?)
            }
        })
    }

    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Store::Memory(_) => "memory",
            Store::File(_) => "file",
            Store::Postgres(_) => "postgres",
        }
    }

    /// Whether what it holds survives the process.
    pub(crate) fn durable(&self) -> bool {
        !matches!(self, Store::Memory(_))
    }

    /// Stores a prefix of `events`, in order; returns how many. Fewer than offered: full.
    pub(crate) async fn append(&mut self, events: &[Pending]) -> Result<usize, StoreError> {
        match self {
            Store::Memory(s) => Ok(s.append(events)),
            Store::File(s) => {
                let events = events.to_vec();
                blocking(s, move |s| s.append(&events)).await
            }
            Store::Postgres(s) => s.append(events).await,
        }
    }

    /// Up to `max` of the oldest events, in order.
    pub(crate) async fn peek(&mut self, max: usize) -> Result<Vec<Pending>, StoreError> {
        match self {
            Store::Memory(s) => Ok(s.peek(max)),
            Store::File(s) => blocking(s, move |s| s.peek(max)).await,
            Store::Postgres(s) => s.peek(max).await,
        }
    }

    /// Removes the first `n` events of the last `peek`.
    pub(crate) async fn remove(&mut self, n: usize) -> Result<(), StoreError> {
        match self {
            Store::Memory(s) => {
                s.remove(n);
                Ok(())
            }
            Store::File(s) => blocking(s, move |s| s.remove(n)).await,
            Store::Postgres(s) => s.remove(n).await,
        }
    }

    /// Makes what was written durable (file store) and ends an open peek (postgres).
    pub(crate) async fn sync(&mut self) -> Result<(), StoreError> {
        match self {
            Store::Memory(_) => Ok(()),
            Store::File(s) => blocking(s, FileStore::sync).await,
            Store::Postgres(s) => s.release().await,
        }
    }

    /// Periodic upkeep: the file store's interval fsync.
    pub(crate) async fn tick(&mut self) {
        if let Store::File(s) = self
            && locked(s).sync_due()
            && let Err(e) = blocking(s, FileStore::sync).await
        {
            tracing::warn!(error = %e, message = "Audit client: fsync of the file store failed; retrying.");
        }
    }

    /// Events held (for the file store: lines, corrupt ones included until passed).
    pub(crate) fn events(&self) -> u64 {
        match self {
            Store::Memory(s) => s.events(),
            Store::File(s) => locked(s).events(),
            Store::Postgres(s) => s.events(),
        }
    }

    /// Bytes held: payload bytes (memory, postgres) or bytes on disk (file).
    pub(crate) fn bytes(&self) -> u64 {
        match self {
            Store::Memory(s) => s.bytes(),
            Store::File(s) => locked(s).bytes(),
            Store::Postgres(s) => s.bytes(),
        }
    }

    /// Stored events found corrupt and moved aside since the last call.
    pub(crate) fn take_dead_lettered(&mut self) -> u64 {
        match self {
            Store::File(s) => std::mem::take(&mut locked(s).dead_lettered),
            Store::Postgres(s) => std::mem::take(&mut s.dead_lettered),
            Store::Memory(_) => 0,
        }
    }
}

/// Turns a stored payload back into a [`Pending`], by the worker's own rules: a stored line
/// that would be dead-lettered by the worker is refused here instead.
pub(crate) fn decode_stored(
    payload: Bytes,
    prefix: &str,
    max_event_bytes: usize,
) -> Result<Pending, auditbridge_event::Invalid> {
    let event = auditbridge_event::decode(&payload, max_event_bytes)?;
    Ok(Pending {
        id: event.id,
        msg_id: event.message_id(),
        subject: event.subject(prefix),
        payload,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use std::path::{Path, PathBuf};

    use super::*;
    use crate::EventBuilder;

    /// A valid event, ready to store.
    pub(crate) fn pending() -> Pending {
        let event = EventBuilder::new("acme", "user.login")
            .actor("u-1")
            .outcome(auditbridge_event::Outcome::Success)
            .source("auth")
            .build()
            .unwrap();
        Pending {
            id: event.id,
            msg_id: event.message_id(),
            subject: event.subject("audit"),
            payload: serde_json::to_vec(&event).unwrap().into(),
        }
    }

    /// A directory removed when dropped.
    pub(crate) struct TempDir(PathBuf);

    impl TempDir {
        pub(crate) fn new() -> TempDir {
            let dir = std::env::temp_dir().join(format!("abclient-{}", Uuid::now_v7().simple()));
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }

        pub(crate) fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
