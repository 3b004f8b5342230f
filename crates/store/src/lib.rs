//! PostgreSQL access for Auditbridge. This is the only crate that speaks SQL.
//!
//! - [`migrate`] creates the database when it is missing, applies `migrations/`, and (unless
//!   told not to) creates the least-privilege roles and applies their grants ([`roles`]).
//! - [`Store::ingest`] writes one batch of the worker (events, conflicts and dead letters) in
//!   one transaction; [`Store::ingest_isolated`] writes a batch the database refused event by
//!   event, to find the event at fault. [`Store::persist`] is the plain writer tools use.
//! - [`Store::status`] answers `auditbridge status`; [`dead_letters`] reads what ingest
//!   refused (`auditbridge dead-letters`).
//! - [`query`]: the query API's reads (pages, one event, the live tail, stats).
//! - [`StoredEvent`]: the one type of a stored event every reader gets (with its position in
//!   the outbox order: [`OutboxEvent`]).
//! - [`Store::record_undeliverable`]: per-destination dead letters.
//! - [`retention`]: the policies, the class each row is written with, the partitions of
//!   `audit_events`.
//! - [`log`]: the tenants' verifiable logs (leaves, stored subtrees, checkpoints), appended by
//!   the sequencer under the `_log` lease.
//!
//! Errors are split by what the caller should do: [`StoreError::Unavailable`] means "the
//! database could not do it now, keep the batch and retry"; [`StoreError::Rejected`] means "the
//! database refused this statement", which the worker answers by isolating the batch: an event
//! that fails alone while a control row succeeds is at fault, anything else is the database's.

pub mod api_sources;
pub mod dead_letters;
mod error;
pub mod log;
pub mod outbox;
mod persist;
pub mod query;
pub mod retention;
pub mod roles;
mod status;
mod stored;
mod undeliverable;

pub use error::StoreError;
pub use outbox::{Backlog, DestinationState, Position, StartAt};
pub use persist::{
    CONFLICT, COPY_COLUMNS, DB_REJECTED, DeadLetter, Incoming, Ingested, NewEvent, Origin,
    PersistOutcome, Replay, encode_copy_row,
};
pub use query::{Condition, EventFilter, Order, PageQuery, StatsRow, TailScan};
pub use retention::{Partition, RetentionPolicy};
pub use roles::SessionRole;
pub use status::{DeadLetterCount, Status};
pub use stored::{OutboxEvent, StoredEvent};
pub use undeliverable::{
    DestinationDeadLetter, DestinationDeadLetterCount, Redelivery, StoredDestinationDeadLetter,
};

use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::{MigrateDatabase, Migrator};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres};

/// The SQL migrations in `migrations/` at the repository root, embedded at compile time.
pub static MIGRATOR: Migrator = sqlx::migrate!("../../migrations");

/// Whether `migrate` manages the least-privilege roles ([`roles`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Roles {
    /// Create the roles that are missing, give the owner role every object, apply
    /// `sql/grants.sql`.
    Manage,
    /// Only apply the migrations (`migrate --no-roles`): roles and grants are managed
    /// elsewhere.
    Skip,
}

/// What [`migrate_with`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migrated {
    /// The database did not exist and was created.
    pub created_database: bool,
    /// Roles that did not exist and were created.
    pub created_roles: Vec<&'static str>,
}

/// [`migrate_with`] with [`Roles::Manage`] and the stored retention policy; returns whether
/// the database was created.
pub async fn migrate(url: &str) -> Result<bool, StoreError> {
    Ok(migrate_with(url, Roles::Manage, None)
        .await?
        .created_database)
}

/// Creates the database named in `url` if it does not exist (connecting to the server's
/// maintenance database to do so), then applies every pending migration, then (with
/// [`Roles::Manage`]) creates the missing roles and applies the grants, then stores
/// `retention` (the configuration's; `None` keeps what is stored, on a new database the
/// defaults: daily partitions, kept forever) and creates the partitions of `audit_events`
/// it needs ahead of time. Safe to run concurrently, on one database (sqlx takes an advisory
/// lock; so do the grants and the partition maintenance) and on many databases of one
/// cluster (role creation is serialised cluster-wide).
pub async fn migrate_with(
    url: &str,
    roles: Roles,
    retention: Option<&RetentionPolicy>,
) -> Result<Migrated, StoreError> {
    let created_database = if Postgres::database_exists(url).await? {
        false
    } else {
        match Postgres::create_database(url).await {
            Ok(()) => true,
            // Another `migrate` created it between our check and our CREATE.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P04") => false,
            Err(e) => return Err(e.into()),
        }
    };
    let options = connect_options(url)?;
    let created_roles = match roles {
        Roles::Manage => roles::ensure_roles(&options).await?,
        Roles::Skip => Vec::new(),
    };
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await?;
    MIGRATOR.run(&pool).await.map_err(StoreError::Migrate)?;
    if roles == Roles::Manage {
        let mut conn = pool.acquire().await?;
        roles::apply_grants(&mut conn).await?;
    }
    let store = Store::from_pool(pool);
    match retention {
        Some(policy) => store.apply_retention(policy).await?,
        None => {
            store.ensure_partitions().await?;
        }
    }
    store.close().await;
    Ok(Migrated {
        created_database,
        created_roles,
    })
}

/// Drops the database named in `url` (used by tests and benchmarks for their own databases).
pub async fn drop_database(url: &str) -> Result<(), StoreError> {
    let options = connect_options(url)?;
    let name = options
        .get_database()
        .ok_or_else(|| {
            StoreError::Config(sqlx::Error::Configuration(
                "no database name in the URL".into(),
            ))
        })?
        .to_owned();
    // Same server, user and parameters; the maintenance database instead of the target.
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(options.database("postgres"))
        .await?;
    let sql = format!(
        "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
        name.replace('"', "\"\"")
    );
    sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&pool).await?;
    pool.close().await;
    Ok(())
}

/// Every connection of ours plans with `enable_sort = off`. The trail's reads are ordered
/// walks of an index with a `LIMIT` (the outbox order, the live tail, keyset pages), and on a
/// partitioned `audit_events` (migration 0008) the planner chooses between merging each
/// partition's index in order (reads as many rows as the limit) and sorting everything
/// after the cursor (reads them all) by its row estimate alone. Where the estimate is low and
/// wrong (every row after a cursor in one large transaction, statistics older than the rows
/// just written) it sorts: 372 ms instead of 8 ms for 500 rows behind 350,000 (ARCHITECTURE.md,
/// "Retention"). Off, a sort is only chosen where nothing else can answer (the few groups of
/// a stats query).
fn connect_options(url: &str) -> Result<PgConnectOptions, StoreError> {
    let options = PgConnectOptions::from_str(url).map_err(StoreError::Config)?;
    Ok(options
        .application_name("auditbridge")
        .options([("enable_sort", "off")]))
}

/// A pool of connections to the trail's database.
#[derive(Clone, Debug)]
pub struct Store {
    pool: PgPool,
    /// Whether the last batch met an id that was already stored. While that keeps happening
    /// (redelivery after a crash) the writer goes straight to the `ON CONFLICT` path instead of
    /// trying `COPY` first; see [`Store::persist`].
    recent_conflict: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Whether each committed batch notifies relays (only needed when destinations exist).
    notify: bool,
    /// The retention class of each tenant, as last read ([`retention`]).
    classes: std::sync::Arc<std::sync::RwLock<std::sync::Arc<retention::Classes>>>,
    /// What readers hide, as last read ([`retention::Hidden`]).
    hidden: std::sync::Arc<std::sync::RwLock<std::sync::Arc<retention::Hidden>>>,
}

impl Store {
    /// A pool that connects on first use, so a worker can start while PostgreSQL is down and
    /// catch up when it returns.
    pub fn connect_lazy(url: &str, max_connections: u32) -> Result<Store, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .min_connections(0)
            .acquire_timeout(Duration::from_secs(5))
            // No ping before each use: a connection that died with the server fails its
            // batch, which is retried (and the pool replaces the connection).
            .test_before_acquire(false)
            .connect_lazy_with(connect_options(url)?);
        Ok(Store::from_pool(pool))
    }

    /// Like [`Store::connect_lazy`], for readers that serve other people's requests (the
    /// query API): every statement is cancelled by PostgreSQL after `statement_timeout`, so a
    /// costly request cannot hold a connection, and the pool, indefinitely.
    pub fn connect_lazy_for_queries(
        url: &str,
        max_connections: u32,
        statement_timeout: Duration,
    ) -> Result<Store, StoreError> {
        let options = connect_options(url)?.options([(
            "statement_timeout",
            format!("{}ms", statement_timeout.as_millis()),
        )]);
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .min_connections(0)
            .acquire_timeout(Duration::from_secs(5))
            .test_before_acquire(false)
            .connect_lazy_with(options);
        Ok(Store::from_pool(pool))
    }

    pub fn from_pool(pool: PgPool) -> Store {
        Store {
            pool,
            recent_conflict: Default::default(),
            notify: false,
            classes: Default::default(),
            hidden: Default::default(),
        }
    }

    /// Makes every committed batch send a notification on [`outbox::NOTIFY_CHANNEL`].
    pub fn with_notify(mut self, notify: bool) -> Store {
        self.notify = notify;
        self
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Cheap liveness check, for `/readyz`.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Fails with [`StoreError::NotMigrated`] unless every migration this build knows is
    /// applied, so a worker never writes into a schema it does not expect.
    pub async fn check_schema(&self) -> Result<(), StoreError> {
        let applied: Vec<i64> = match sqlx::query_scalar(
            "SELECT version FROM _sqlx_migrations WHERE success ORDER BY version",
        )
        .fetch_all(&self.pool)
        .await
        {
            Ok(v) => v,
            // No migrations table, or no database at all (3D000): nothing is applied.
            Err(sqlx::Error::Database(e))
                if matches!(e.code().as_deref(), Some("42P01") | Some("3D000")) =>
            {
                Vec::new()
            }
            Err(e) => return Err(e.into()),
        };
        let missing: Vec<i64> = MIGRATOR
            .iter()
            .map(|m| m.version)
            .filter(|v| !applied.contains(v))
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(StoreError::NotMigrated { missing })
        }
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}
