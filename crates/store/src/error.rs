//! [`StoreError`]: what went wrong talking to PostgreSQL, sorted by what the caller should
//! do about it (retry later, isolate the batch, stop).

use sqlx::error::DatabaseError;

/// What went wrong talking to PostgreSQL, sorted by what the caller should do about it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not do it now (down, restarting, overloaded, connection lost, a
    /// statement cancelled or timed out, a deadlock). Keep the batch, back off, retry.
    // The inner error is part of the message, not a `#[source]`, so that `{:#}` chains do not
    // print it twice.
    #[error("database unavailable: {0}")]
    Unavailable(sqlx::Error),
    /// The database refused the statement for a reason that may lie in the rows themselves.
    /// Retrying the same statement cannot succeed; writing the rows one by one
    /// ([`crate::Store::ingest_isolated`]) tells which row, if any, is at fault.
    #[error("database rejected the statement: {0}")]
    Rejected(sqlx::Error),
    /// An event failed alone and a known-good control row failed in the same session too: the
    /// database refuses every write now (permissions, read-only, disk), so no event is at
    /// fault. Keep the batch, back off, retry.
    #[error(
        "database refuses writes (a control row was refused too): {control}; the event's error was: {event}"
    )]
    RefusesWrites {
        event: sqlx::Error,
        control: sqlx::Error,
    },
    /// The dead letters of a batch could not be written. Nothing else keeps those messages, so
    /// the batch is held, unacknowledged, and retried with backoff.
    #[error("database refused the dead letters: {0}")]
    DeadLettersRefused(sqlx::Error),
    #[error(
        "the database schema is not up to date (missing migrations {missing:?}); run `auditbridge migrate`"
    )]
    NotMigrated { missing: Vec<i64> },
    #[error("invalid database URL: {0}")]
    Config(sqlx::Error),
    /// Stored data that cannot be what this version wrote (a log hash of the wrong length).
    #[error("stored data is not what it should be: {0}")]
    Corrupt(String),
    /// What is stored does not fit the configuration (an api source's saved cursor of another
    /// style); the message says what to do.
    #[error("{0}")]
    Mismatch(String),
    #[error("applying migrations failed: {0}")]
    Migrate(sqlx::migrate::MigrateError),
    /// Creating the least-privilege roles or applying their grants failed (usually: the
    /// migrating role may not create roles; see README, "Database roles", or `--no-roles`).
    #[error(
        "setting up the database roles failed ({step}): {source}; migrate as a superuser, create the roles beforehand, or use `migrate --no-roles` where roles and grants are managed elsewhere"
    )]
    Roles { step: String, source: sqlx::Error },
}

impl StoreError {
    /// The database's error, where there is one.
    pub(crate) fn sql(&self) -> Option<&sqlx::Error> {
        match self {
            StoreError::Unavailable(e) | StoreError::Rejected(e) => Some(e),
            _ => None,
        }
    }

    /// The database's SQLSTATE, where there is one.
    pub fn sqlstate(&self) -> Option<String> {
        self.sql().and_then(code)
    }

    /// A lock was not granted within the statement's `lock_timeout` (SQLSTATE 55P03).
    pub fn is_lock_timeout(&self) -> bool {
        self.sql().and_then(code).as_deref() == Some("55P03")
    }

    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            StoreError::Unavailable(_)
                | StoreError::RefusesWrites { .. }
                | StoreError::DeadLettersRefused(_)
        )
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        if is_transient(&e) {
            StoreError::Unavailable(e)
        } else {
            StoreError::Rejected(e)
        }
    }
}

/// Errors that say nothing about the rows, only about the database's state right now: no
/// answer from the server (connection lost, pool timeout, I/O), or a SQLSTATE of class 08
/// (connection), 40 (deadlock, serialization: another session's doing), 53 (out of disk,
/// memory or connections), 57 (statement timeout or cancel, shutdown), 58 (system I/O), or a
/// lock timeout (55P03). A control insert could not observe these (a timeout or a deadlock
/// need not repeat), so they never make an event a dead letter. Every other refusal may be
/// the rows' fault: the writer isolates the batch and asks a control insert.
///
/// Two more say nothing about the rows: a race for an id with another batch ([`is_race`]) and
/// a row that found no partition ([`is_missing_partition`]; the writer creates it).
pub(crate) fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => {
            is_transient_code(db.as_ref()) || is_race(e) || is_missing_partition(e)
        }
        _ => true,
    }
}

fn code(e: &sqlx::Error) -> Option<String> {
    match e {
        sqlx::Error::Database(db) => db.code().map(|c| c.into_owned()),
        _ => None,
    }
}

/// Another transaction wrote one of the batch's ids first (a unique violation on
/// `audit_event_ids_pkey`, which the `NOT EXISTS` of the insert could not see while the
/// other was uncommitted), or a deadlock: written again, the batch finds the id stored.
pub(crate) fn is_race(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => match db.code().as_deref() {
            Some("40P01") => true,
            Some("23505") => db.constraint() == Some("audit_event_ids_pkey"),
            _ => false,
        },
        _ => false,
    }
}

/// A row's (retention class, time) has no partition yet (SQLSTATE 23514, "no partition of
/// relation ... found for row").
pub(crate) fn is_missing_partition(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => {
            db.code().as_deref() == Some("23514")
                && db.message().starts_with("no partition of relation")
        }
        _ => false,
    }
}

fn is_transient_code(e: &dyn DatabaseError) -> bool {
    let Some(code) = e.code() else {
        return true;
    };
    ["08", "40", "53", "57", "58"]
        .iter()
        .any(|class| code.starts_with(class))
        || code == "55P03"
}
