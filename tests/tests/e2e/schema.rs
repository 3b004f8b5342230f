//! The database's side of the contract: `audit_events` is append-only whoever asks
//! (guarantee 6), `auditbridge migrate` creates and upgrades a database, `Store::persist`
//! deduplicates by id and keeps dead letters exactly, and nothing writes into a schema that
//! was never migrated.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use auditbridge_event::{Event, Target};
use auditbridge_store::{
    DeadLetter, Incoming, NewEvent, Origin, PersistOutcome, Store, StoreError,
};
use auditbridge_tests::{PG_BASE, TestEnv};
use sqlx::{AssertSqlSafe, Connection as _, PgConnection};
use time::OffsetDateTime;
use uuid::Uuid;

/// An event and the exact bytes it is persisted as.
#[derive(Clone)]
struct Owned {
    event: Event,
    raw: Vec<u8>,
}

fn owned(events: Vec<Event>) -> Vec<Owned> {
    events
        .into_iter()
        .map(|event| Owned {
            raw: serde_json::to_vec(&event).expect("an event serializes"),
            event,
        })
        .collect()
}

fn batch(items: &[Owned]) -> Vec<NewEvent<'_>> {
    items
        .iter()
        .map(|o| NewEvent {
            event: &o.event,
            raw: &o.raw,
            redaction: None,
        })
        .collect()
}

/// Every stored row, whole, in id order: what "unchanged" is compared against.
async fn snapshot(conn: &mut PgConnection) -> anyhow::Result<Vec<String>> {
    Ok(
        sqlx::query_scalar("SELECT row_to_json(a)::text FROM audit_events a ORDER BY id")
            .fetch_all(conn)
            .await?,
    )
}

/// Runs every statement that would change stored events and checks that the trigger refused
/// each one (not a missing privilege, not zero rows).
async fn assert_refused(conn: &mut PgConnection, who: &str) -> anyhow::Result<()> {
    const CHANGES: &[&str] = &[
        "UPDATE audit_events SET tenant = 'mallory'",
        "UPDATE audit_events SET event = '{}'::jsonb \
         WHERE id = (SELECT id FROM audit_events ORDER BY id LIMIT 1)",
        "DELETE FROM audit_events",
        "DELETE FROM audit_events WHERE id = (SELECT id FROM audit_events ORDER BY id LIMIT 1)",
        "TRUNCATE audit_events",
    ];
    for sql in CHANGES {
        match sqlx::query(*sql).execute(&mut *conn).await {
            Ok(done) => bail!(
                "{who}: `{sql}` was allowed ({} rows affected)",
                done.rows_affected()
            ),
            Err(sqlx::Error::Database(e)) => {
                ensure!(
                    e.message().contains("append-only"),
                    "{who}: `{sql}` failed, but not by the append-only trigger: {}",
                    e.message()
                );
                ensure!(
                    e.code().as_deref() == Some("42501"),
                    "{who}: `{sql}`: SQLSTATE {:?}, expected 42501",
                    e.code()
                );
            }
            Err(e) => bail!("{who}: `{sql}` failed unexpectedly: {e}"),
        }
    }
    Ok(())
}

/// Drops a role (and what it was granted in `database_url`) when the test ends, also when an
/// assertion failed. Runs on its own thread, as `TestEnv`'s cleanup does.
struct RoleGuard {
    role: String,
    database_url: String,
}

impl Drop for RoleGuard {
    fn drop(&mut self) {
        let role = self.role.clone();
        let url = self.database_url.clone();
        auditbridge_tests::run_cleanup(async move {
            if let Ok(mut conn) = PgConnection::connect(&url).await {
                let sql = format!("DROP OWNED BY {role}; DROP ROLE IF EXISTS {role}");
                if let Err(e) = sqlx::raw_sql(AssertSqlSafe(sql)).execute(&mut conn).await {
                    eprintln!("cleanup: dropping role {role} failed: {e}");
                }
                let _ = conn.close().await;
            }
        });
    }
}

/// Drops a database when the test ends, also when an assertion failed.
struct DatabaseGuard(String);

impl Drop for DatabaseGuard {
    fn drop(&mut self) {
        let url = self.0.clone();
        auditbridge_tests::run_cleanup(async move {
            if let Err(e) = auditbridge_store::drop_database(&url).await {
                eprintln!("cleanup: dropping {url} failed: {e}");
            }
        });
    }
}

async fn database_exists(env: &TestEnv, name: &str) -> anyhow::Result<bool> {
    Ok(
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(name)
            .fetch_one(&env.pool)
            .await?,
    )
}

/// Creates an empty database (no migrations) through the maintenance database.
async fn create_bare_database(name: &str) -> anyhow::Result<DatabaseGuard> {
    let mut admin = PgConnection::connect(&format!("{PG_BASE}/postgres")).await?;
    sqlx::query(AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
        .execute(&mut admin)
        .await
        .with_context(|| format!("creating database {name}"))?;
    admin.close().await?;
    Ok(DatabaseGuard(format!("{PG_BASE}/{name}")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_events_cannot_be_changed_by_anyone() -> anyhow::Result<()> {
    let mut env = TestEnv::new().await?;
    let items = owned(env.events(25));
    let store = Store::from_pool(env.pool.clone());
    let outcome = store.persist(&batch(&items), &[]).await?;
    assert_eq!(outcome.inserted, 25);

    let mut admin = PgConnection::connect(&env.database_url).await?;
    let before = snapshot(&mut admin).await?;
    assert_eq!(before.len(), 25);

    // The superuser.
    assert_refused(&mut admin, "superuser").await?;
    assert_eq!(
        snapshot(&mut admin).await?,
        before,
        "superuser changed rows"
    );

    // The superuser with ordinary triggers switched off (what replication and some restore
    // tools do); ours are ENABLE ALWAYS.
    let mut replica = PgConnection::connect(&env.database_url).await?;
    sqlx::query("SET session_replication_role = replica")
        .execute(&mut replica)
        .await?;
    let role: String = sqlx::query_scalar("SHOW session_replication_role")
        .fetch_one(&mut replica)
        .await?;
    assert_eq!(role, "replica");
    assert_refused(&mut replica, "superuser as replica").await?;
    replica.close().await?;
    assert_eq!(
        snapshot(&mut admin).await?,
        before,
        "replica role changed rows"
    );

    // An ordinary role that holds every privilege on the table.
    let role = format!("ab_test_role_{}", env.tag);
    sqlx::raw_sql(AssertSqlSafe(format!(
        "CREATE ROLE {role} LOGIN; GRANT ALL PRIVILEGES ON audit_events TO {role}"
    )))
    .execute(&mut admin)
    .await?;
    let _cleanup = RoleGuard {
        role: role.clone(),
        database_url: env.database_url.clone(),
    };
    // Trust authentication lets any role in.
    let role_url = format!("postgres://{role}@127.0.0.1:5432/ab_test_{}", env.tag);
    let mut ordinary = PgConnection::connect(&role_url)
        .await
        .with_context(|| format!("connecting as {role}"))?;
    let (who, is_super): (String, bool) = sqlx::query_as(
        "SELECT current_user::text, rolsuper FROM pg_roles WHERE rolname = current_user",
    )
    .fetch_one(&mut ordinary)
    .await?;
    assert_eq!(who, role);
    assert!(!is_super, "{role} must not be a superuser");
    // It can read and append, so a refusal below is the trigger, not a missing grant.
    let visible: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_events")
        .fetch_one(&mut ordinary)
        .await?;
    assert_eq!(visible, 25);
    assert_refused(&mut ordinary, &role).await?;
    ordinary.close().await?;
    assert_eq!(
        snapshot(&mut admin).await?,
        before,
        "an ordinary role changed rows"
    );
    admin.close().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_creates_a_missing_database_and_is_idempotent() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let name = format!("ab_test_{}_m", env.tag);
    let url = format!("{PG_BASE}/{name}");
    let _cleanup = DatabaseGuard(url.clone());
    assert!(!database_exists(&env, &name).await?);

    let first = env
        .command(&["migrate"], &[("AUDITBRIDGE_DATABASE_URL", &url)])
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&first.stdout);
    let stderr = String::from_utf8_lossy(&first.stderr);
    assert!(
        first.status.success(),
        "first migrate failed: {:?}\n{stdout}\n{stderr}",
        first.status
    );
    assert!(
        stdout.contains(&format!("created database {name}")),
        "first migrate does not say it created the database: {stdout}"
    );
    assert!(database_exists(&env, &name).await?);
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&url)
        .await?;
    Store::from_pool(pool.clone())
        .check_schema()
        .await
        .context("the schema after `auditbridge migrate`")?;
    pool.close().await;

    let second = env
        .command(&["migrate"], &[("AUDITBRIDGE_DATABASE_URL", &url)])
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&second.stdout);
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(
        second.status.success(),
        "second migrate failed: {:?}\n{stdout}\n{stderr}",
        second.status
    );
    assert!(
        !stdout.contains("created"),
        "second migrate claims it created the database: {stdout}"
    );
    assert!(
        stdout.contains(&format!("database {name} is at migration")),
        "{stdout}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persist_deduplicates_events_and_dead_letters() -> anyhow::Result<()> {
    let mut env = TestEnv::new().await?;
    let store = Store::from_pool(env.pool.clone());
    let items = owned(env.events(30));
    let fresh = owned(env.events(1));

    // First batch: all new (the COPY path).
    let out = store.persist(&batch(&items[..10]), &[]).await?;
    assert_eq!(
        out,
        PersistOutcome {
            inserted: 10,
            duplicates: 0,
            dead_lettered: 0
        }
    );

    // Second batch: 4 ids already stored, 6 new. COPY meets the conflict and the batch is
    // written again by INSERT ... ON CONFLICT.
    let out = store.persist(&batch(&items[6..16]), &[]).await?;
    assert_eq!(
        out,
        PersistOutcome {
            inserted: 6,
            duplicates: 4,
            dead_lettered: 0
        }
    );

    // All stored, once each.
    let ids = env.stored_ids().await?;
    let expected: HashSet<Uuid> = items[..16].iter().map(|o| o.event.id).collect();
    assert_eq!(ids, expected);

    // Next batch all new: every row inserted (while the writer is on its INSERT path), and
    // the batch after that too (back on COPY).
    let out = store.persist(&batch(&items[16..23]), &[]).await?;
    assert_eq!((out.inserted, out.duplicates), (7, 0));
    let out = store.persist(&batch(&items[23..]), &[]).await?;
    assert_eq!((out.inserted, out.duplicates), (7, 0));
    // A batch that is nothing but duplicates.
    let out = store.persist(&batch(&items), &[]).await?;
    assert_eq!((out.inserted, out.duplicates), (0, 30));
    let ids = env.stored_ids().await?;
    assert_eq!(ids, items.iter().map(|o| o.event.id).collect());

    // Dead letters: one message (stream, sequence, and the stream's timestamp of it) is kept
    // once, whether it comes back in a later batch or twice in the same one.
    let stored_at = OffsetDateTime::now_utc();
    let origin = Origin {
        stream: &env.stream,
        stream_seq: 7,
        stored_at,
        subject: "x.acme.user.login",
        replay: None,
    };
    let letter = DeadLetter {
        origin,
        payload: b"not json",
        kind: "not_json",
        reason: "payload is not valid JSON",
    };
    let out = store.persist(&[], &[letter]).await?;
    assert_eq!(out.dead_lettered, 1);
    let out = store.persist(&[], &[letter]).await?;
    assert_eq!(
        out.dead_lettered, 0,
        "a redelivered dead letter was kept twice"
    );
    let other = DeadLetter {
        origin: Origin {
            stream_seq: 8,
            ..origin
        },
        ..letter
    };
    let out = store.persist(&[], &[other, other]).await?;
    assert_eq!(out.dead_lettered, 1, "a dead letter twice in one batch");
    // The same sequence in a stream created again (another message, stored later): kept too.
    let reused = DeadLetter {
        origin: Origin {
            stored_at: stored_at + time::Duration::seconds(1),
            ..origin
        },
        ..letter
    };
    let out = store.persist(&[], &[reused]).await?;
    assert_eq!(
        out.dead_lettered, 1,
        "a reused sequence hid a new dead letter"
    );
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM dead_letters")
        .fetch_one(&env.pool)
        .await?;
    assert_eq!(n, 3);

    // U+0000 cannot be stored in text: subject and reason get U+FFFD; the payload is bytea
    // and kept byte for byte. Stored together with an event, in one transaction.
    let payload: &[u8] = b"\x00\xff\xfe{\"a\":\0}\\\t\n\r";
    let nul = DeadLetter {
        origin: Origin {
            stream_seq: 9,
            subject: "x.ac\0me.user.login",
            ..origin
        },
        payload,
        kind: "schema",
        reason: "tenant: \0 is not allowed",
    };
    let out = store.persist(&batch(&fresh), &[nul]).await?;
    assert_eq!((out.inserted, out.dead_lettered), (1, 1));
    let (subject, reason, stored, kind): (String, String, Vec<u8>, String) = sqlx::query_as(
        "SELECT subject, reason, payload, kind FROM dead_letters WHERE stream = $1 AND stream_seq = 9",
    )
    .bind(&env.stream)
    .fetch_one(&env.pool)
    .await?;
    assert_eq!(subject, "x.ac\u{FFFD}me.user.login");
    assert_eq!(reason, "tenant: \u{FFFD} is not allowed");
    assert_eq!(stored, payload);
    assert_eq!(kind, "schema");
    Ok(())
}

/// A statement timeout is the database's fault, never the event's: the control row could
/// not observe it (the next attempt may be fast). `ingest` and `ingest_isolated` both hold
/// the batch, and nothing is dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_timeout_holds_the_batch_and_makes_no_dead_letter() -> anyhow::Result<()> {
    let mut env = TestEnv::new().await?;
    sqlx::raw_sql(
        "CREATE FUNCTION test_slow() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN IF NEW.actor_id LIKE 'slow-%' THEN PERFORM pg_sleep(2); END IF; RETURN NEW; END $$; \
         CREATE TRIGGER test_slow BEFORE INSERT ON audit_events \
           FOR EACH ROW EXECUTE FUNCTION test_slow();",
    )
    .execute(&env.pool)
    .await?;
    let options: sqlx::postgres::PgConnectOptions = env.database_url.parse()?;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect_with(options.options([("statement_timeout", "300ms")]))
        .await?;
    let store = Store::from_pool(pool);
    let mut items = owned(env.events(5));
    items[2].event.actor.id = "slow-1".into();
    items[2].raw = serde_json::to_vec(&items[2].event)?;
    let origin = Origin {
        stream: &env.stream,
        stream_seq: 1,
        stored_at: OffsetDateTime::now_utc(),
        subject: "x",
        replay: None,
    };
    let incoming: Vec<Incoming<'_>> = batch(&items)
        .into_iter()
        .map(|event| Incoming {
            event,
            origin,
            time_received: false,
            legacy_id: None,
        })
        .collect();
    for isolated in [false, true] {
        let result = if isolated {
            store.ingest_isolated(&incoming, &[]).await
        } else {
            store.ingest(&incoming, &[]).await
        };
        match result {
            Err(StoreError::Unavailable(sqlx::Error::Database(e)))
                if e.code().as_deref() == Some("57014") => {}
            other => bail!("isolated={isolated}: expected a held batch (57014), got {other:?}"),
        }
    }
    assert_eq!(env.count().await?, 0);
    assert!(env.dead_letters().await?.is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_persists_store_every_id_once() -> anyhow::Result<()> {
    const TASKS: usize = 4;
    const BATCHES: usize = 20;
    const HALF: usize = 125;
    let mut env = TestEnv::new().await?;

    // Tasks 0 and 1 share half of each of their batches, as do tasks 2 and 3: each batch of
    // 250 is 125 ids of its own and 125 that another task writes at the same moment.
    let mut shared: Vec<Vec<Vec<Owned>>> = Vec::new();
    for _ in 0..TASKS / 2 {
        shared.push((0..BATCHES).map(|_| owned(env.events(HALF))).collect());
    }
    let mut plans: Vec<Vec<Vec<Owned>>> = Vec::new();
    let mut all = HashSet::new();
    for t in 0..TASKS {
        let mut batches = Vec::new();
        for (b, common) in shared[t / 2].iter().enumerate() {
            let own = owned(env.events(HALF));
            // Half the tasks put the shared ids first, half last; the shared ids keep one
            // order in both, as messages of one stream would.
            let mut items = if t % 2 == 0 {
                [own, common.clone()].concat()
            } else {
                [common.clone(), own].concat()
            };
            if b % 3 == 0 {
                items.reverse();
            }
            all.extend(items.iter().map(|o| o.event.id));
            batches.push(items);
        }
        plans.push(batches);
    }
    assert_eq!(
        all.len(),
        TASKS * BATCHES * HALF + TASKS / 2 * BATCHES * HALF
    );

    let store = Store::connect_lazy(&env.database_url, 8)?;
    let barrier = Arc::new(tokio::sync::Barrier::new(TASKS));
    let mut handles = Vec::new();
    for batches in plans {
        let store = store.clone();
        let barrier = barrier.clone();
        handles.push(tokio::spawn(async move {
            let mut sum = PersistOutcome::default();
            for items in &batches {
                // Start each round together, so the shared ids really race.
                barrier.wait().await;
                let out = store.persist(&batch(items), &[]).await?;
                anyhow::ensure!(out.inserted + out.duplicates == items.len() as u64);
                sum.inserted += out.inserted;
                sum.duplicates += out.duplicates;
            }
            anyhow::Ok(sum)
        }));
    }
    let mut inserted = 0;
    let mut duplicates = 0;
    for h in handles {
        let sum = tokio::time::timeout(Duration::from_secs(25), h)
            .await
            .context("concurrent persists did not finish in time")???;
        inserted += sum.inserted;
        duplicates += sum.duplicates;
    }
    store.close().await;

    assert_eq!(inserted, all.len() as u64, "sum(inserted) != distinct ids");
    assert_eq!(
        duplicates,
        (TASKS * BATCHES * 2 * HALF) as u64 - all.len() as u64
    );
    let stored = env.stored_ids().await?;
    assert_eq!(stored.len(), all.len());
    assert!(stored == all, "stored ids differ from the published ones");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_row_matches_the_event() -> anyhow::Result<()> {
    let mut env = TestEnv::new().await?;
    let mut events = env.events(20);
    // Characters COPY's text format must escape, and some it need not, in a column of their
    // own (target_id) and inside the JSON.
    let tricky = "tab\there, newline\nthere, cr\r, backslash \\ \"quoted\" é ✓ 😀";
    events[3].target = Some(Target {
        id: Some(tricky.to_owned()),
        kind: Some("document".into()),
        name: Some(tricky.to_owned()),
    });
    events[3].reason = Some(tricky.to_owned());
    events[14].target = events[3].target.clone();
    events[14].reason = Some(tricky.to_owned());
    events[15].target = None;
    for e in &events {
        e.validate()?;
    }
    let items = owned(events);
    let store = Store::from_pool(env.pool.clone());
    // The first half by COPY; the second with one id already stored, so by INSERT.
    store.persist(&batch(&items[..10]), &[]).await?;
    let out = store.persist(&batch(&items[9..]), &[]).await?;
    assert_eq!((out.inserted, out.duplicates), (10, 1));

    type Row = (
        Uuid,
        String,
        String,
        String,
        OffsetDateTime,
        String,
        Option<String>,
        String,
        serde_json::Value,
    );
    for o in &items {
        let e = &o.event;
        let row: Row = sqlx::query_as(
            "SELECT id, tenant, action, outcome, occurred_at, actor_id, target_id, source, event \
             FROM audit_events WHERE id = $1",
        )
        .bind(e.id)
        .fetch_optional(&env.pool)
        .await?
        .with_context(|| format!("event {} not stored", e.id))?;
        let (id, tenant, action, outcome, occurred_at, actor_id, target_id, source, json) = row;
        assert_eq!(id, e.id);
        assert_eq!(tenant, e.tenant);
        assert_eq!(action, e.action);
        assert_eq!(outcome, e.outcome.as_str());
        assert_eq!(occurred_at, e.occurred_at, "occurred_at of {}", e.id);
        assert_eq!(actor_id, e.actor.id);
        assert_eq!(
            target_id.as_deref(),
            e.target.as_ref().and_then(|t| t.id.as_deref())
        );
        assert_eq!(source, e.source);
        assert_eq!(json, serde_json::to_value(e)?, "event jsonb of {}", e.id);
        // And it reads back as the same event.
        let back: Event = serde_json::from_value(json)?;
        assert_eq!(&back, e);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_schema_reports_a_database_that_was_never_migrated() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    // The migrated one passes.
    Store::from_pool(env.pool.clone()).check_schema().await?;

    let name = format!("ab_test_{}_bare", env.tag);
    let guard = create_bare_database(&name).await?;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&guard.0)
        .await?;
    let result = Store::from_pool(pool.clone()).check_schema().await;
    pool.close().await;
    match result {
        Err(StoreError::NotMigrated { missing }) => {
            let all: Vec<i64> = auditbridge_store::MIGRATOR
                .iter()
                .map(|m| m.version)
                .collect();
            assert!(!missing.is_empty());
            assert_eq!(missing, all, "every migration is missing");
        }
        other => panic!("expected NotMigrated, got {other:?}"),
    }
    assert!(database_exists(&env, &name).await?);
    drop(guard);
    assert!(
        !database_exists(&env, &name).await?,
        "bare database not dropped"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_refuses_an_unmigrated_database() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let name = format!("ab_test_{}_bare", env.tag);
    let guard = create_bare_database(&name).await?;
    let mut worker = env
        .spawn_worker("unmigrated", &[("AUDITBRIDGE_DATABASE_URL", &guard.0)])
        .await?;
    let status = worker.wait_exit(Duration::from_secs(20)).await?;
    let log = worker.log_text();
    assert!(
        !status.success(),
        "worker exited with {status:?} on an unmigrated database; log:\n{log}"
    );
    assert!(
        log.contains("auditbridge migrate"),
        "the log does not say to run `auditbridge migrate`:\n{log}"
    );
    // It wrote nothing there: no tables were created behind the operator's back.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&guard.0)
        .await?;
    let tables: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'",
    )
    .fetch_one(&pool)
    .await?;
    pool.close().await;
    assert_eq!(tables, 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_refuses_a_database_that_does_not_exist() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let missing = format!("{PG_BASE}/ab_test_{}_missing", env.tag);
    let mut worker = env
        .spawn_worker("missing", &[("AUDITBRIDGE_DATABASE_URL", &missing)])
        .await?;
    let status = worker.wait_exit(Duration::from_secs(20)).await?;
    let log = worker.log_text();
    assert!(!status.success(), "exited with {status:?}; log:\n{log}");
    assert!(log.contains("auditbridge migrate"), "{log}");
    Ok(())
}
