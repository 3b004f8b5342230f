//! Least-privilege database roles: which exist, how `migrate` creates them, and what the
//! session a service runs as is allowed to do.
//!
//! Every grant is in `sql/grants.sql`, applied after the migrations on every `migrate`
//! (see that file for each role's privileges and why).

use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{Connection as _, Row as _};

use crate::{Store, StoreError};

/// Owns every object of the schema; used only by `auditbridge migrate`.
pub const OWNER: &str = "auditbridge_owner";
/// `auditbridge worker`: inserts events and dead letters, relays destinations.
pub const WRITER: &str = "auditbridge_writer";
/// `auditbridge serve` and `auditbridge status`: reads only.
pub const READER: &str = "auditbridge_reader";

/// `auditbridge poll`: its api sources' cursors, leases and rejected items only.
pub const POLLER: &str = "auditbridge_poller";

/// The roles, in the order they are created.
pub const ALL: [&str; 4] = [OWNER, WRITER, READER, POLLER];

/// The grants, applied by [`apply_grants`].
pub const GRANTS_SQL: &str = include_str!("../sql/grants.sql");

/// Roles are cluster-global while advisory locks are per database: every `migrate` takes
/// this one on the `postgres` maintenance database, so that migrating many databases at once
/// creates each role once.
const ROLES_LOCK: i64 = 7_243_586_041_907_425_120;

/// Creates the roles that do not exist yet (LOGIN, no password: see README, "Database
/// roles"). Returns the ones it created. Idempotent, and safe when many databases of one
/// cluster are migrated at once.
pub(crate) async fn ensure_roles(
    options: &PgConnectOptions,
) -> Result<Vec<&'static str>, StoreError> {
    let step = |what: &str| {
        let what = what.to_owned();
        move |source| StoreError::Roles { step: what, source }
    };
    // The maintenance database for the cluster-wide lock; the target database (where the
    // lock serialises nothing across databases, but duplicates are still caught) if the
    // migrating role may not connect there.
    let mut conn = match PgConnection::connect_with(&options.clone().database("postgres")).await {
        Ok(c) => c,
        Err(_) => PgConnection::connect_with(options)
            .await
            .map_err(step("connecting"))?,
    };
    let mut created = Vec::new();
    // Bounded: with the lock held a retry finds the role; without it, a racing CREATE ROLE
    // of the same name fails once with duplicate_object (42710) or unique_violation (23505),
    // and the next look finds the role.
    for role in ALL {
        let mut attempts = 0;
        loop {
            attempts += 1;
            match create_role(&mut conn, role).await {
                Ok(made) => {
                    if made {
                        created.push(role);
                    }
                    break;
                }
                Err(sqlx::Error::Database(e))
                    if attempts < 3
                        && matches!(e.code().as_deref(), Some("42710" | "23505" | "XX000")) =>
                {
                    continue;
                }
                Err(e) => return Err(step(&format!("creating role {role}"))(e)),
            }
        }
    }
    let _ = conn.close().await;
    Ok(created)
}

/// Creates `role` unless it exists, under [`ROLES_LOCK`]. True if it created it.
async fn create_role(conn: &mut PgConnection, role: &str) -> Result<bool, sqlx::Error> {
    let mut tx = conn.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(ROLES_LOCK)
        .execute(&mut *tx)
        .await?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)")
            .bind(role)
            .fetch_one(&mut *tx)
            .await?;
    if !exists {
        // `role` is one of the constants above, not input.
        let sql = format!("CREATE ROLE {role} LOGIN");
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(!exists)
}

/// Gives the owner role every object of the schema and grants the writer and the reader
/// exactly what `sql/grants.sql` lists, in one transaction.
pub(crate) async fn apply_grants(conn: &mut PgConnection) -> Result<(), StoreError> {
    let mut tx = conn.begin().await?;
    sqlx::raw_sql(GRANTS_SQL)
        .execute(&mut *tx)
        .await
        .map_err(|source| StoreError::Roles {
            step: "applying sql/grants.sql".into(),
            source,
        })?;
    tx.commit().await?;
    Ok(())
}

/// The role a session runs as, and whether it is more than a service should be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRole {
    /// `current_user`.
    pub name: String,
    pub superuser: bool,
    /// Owns `audit_events` (or is a member of the role that does).
    pub owner: bool,
    /// May change or delete stored events, or set the columns the database fills
    /// (`seq`, `tx_id`, `received_at`), through grants beyond the writer's.
    pub excess_privileges: bool,
}

impl SessionRole {
    /// What to tell an operator when a service that should run as `expected` runs as this
    /// role instead; `None` when the role is no more than a service role.
    pub fn warning(&self, expected: &str) -> Option<String> {
        let what = if self.superuser {
            "a superuser"
        } else if self.owner {
            "the owner of audit_events"
        } else if self.excess_privileges {
            "a role that may change stored events or set seq, tx_id or received_at"
        } else {
            return None;
        };
        Some(format!(
            "Connected to PostgreSQL as {:?}, {what}: it can disable the immutability \
             triggers, rewrite stored events or place rows behind every cursor. Fine for \
             local development; otherwise connect as {expected} (created by `auditbridge \
             migrate`, see README, \"Database roles\").",
            self.name
        ))
    }
}

impl Store {
    /// Who this pool's sessions are, for the start-up warning of `worker` and `serve`.
    pub async fn session_role(&self) -> Result<SessionRole, StoreError> {
        let row = sqlx::query(
            "SELECT current_user::text AS name, r.rolsuper AS superuser, \
                 coalesce(pg_has_role(current_user, c.relowner, 'USAGE'), false) AS owner, \
                 coalesce(has_table_privilege(c.oid, 'UPDATE, DELETE, TRUNCATE, TRIGGER') \
                     OR has_column_privilege(c.oid, 'seq', 'INSERT') \
                     OR has_column_privilege(c.oid, 'tx_id', 'INSERT') \
                     OR has_column_privilege(c.oid, 'received_at', 'INSERT'), false) AS excess \
             FROM pg_roles r \
             LEFT JOIN pg_class c ON c.oid = to_regclass('audit_events') \
             WHERE r.rolname = current_user",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(SessionRole {
            name: row.try_get("name")?,
            superuser: row.try_get("superuser")?,
            owner: row.try_get("owner")?,
            excess_privileges: row.try_get("excess")?,
        })
    }
}
