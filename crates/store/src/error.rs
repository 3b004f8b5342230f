use sqlx::error::DatabaseError;

/// What went wrong talking to PostgreSQL, sorted by what the caller should do about it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not do it now (down, restarting, overloaded, connection lost, a
    /// schema object missing). Keep the batch, back off, retry.
    // The inner error is part of the message, not a `#[source]`, so that `{:#}` chains do not
    // print it twice.
    #[error("database unavailable: {0}")]
    Unavailable(sqlx::Error),
    /// The database refused the data itself (a data exception or a constraint). Retrying the
    /// same rows cannot succeed.
    #[error("database rejected the data: {0}")]
    Rejected(sqlx::Error),
    #[error(
        "the database schema is not up to date (missing migrations {missing:?}); run `auditbridge migrate`"
    )]
    NotMigrated { missing: Vec<i64> },
    #[error("invalid database URL: {0}")]
    Config(sqlx::Error),
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
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::Database(db) if is_data_error(db.as_ref()) => StoreError::Rejected(e),
            _ => StoreError::Unavailable(e),
        }
    }
}

/// SQLSTATE classes 22 (data exception) and 23 (integrity constraint violation) are about the
/// rows themselves. Everything else — connection loss, shutdown, missing tables, permission
/// changes — is about the database's state, and must not cost an event its place in the trail.
fn is_data_error(e: &dyn DatabaseError) -> bool {
    e.code()
        .is_some_and(|code| code.starts_with("22") || code.starts_with("23"))
}
