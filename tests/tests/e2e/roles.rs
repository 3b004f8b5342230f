//! Least-privilege roles (README, "Database roles"): `auditbridge migrate` creates
//! `auditbridge_owner`, `auditbridge_writer` and `auditbridge_reader`, gives the owner every
//! object and grants the others exactly `crates/store/sql/grants.sql`. Every way around
//! immutability is refused to the writer and the reader; a worker running as the writer and
//! `serve` as the reader do their whole job with those grants (a missing grant fails here);
//! a superuser or owner URL still works, with a warning; migrating many databases of one
//! cluster at once creates each role once.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use auditbridge_event::Event;
use auditbridge_store::roles::{OWNER, POLLER, READER, WRITER};
use auditbridge_store::{DeadLetter, NewEvent, Store};
use auditbridge_tests::api::{ApiServer, Token};
use auditbridge_tests::receiver::{Answer, Receiver};
use auditbridge_tests::{TestEnv, eventually, free_addr, until};
use serde_json::json;
use sqlx::{AssertSqlSafe, Connection as _, PgConnection};
use uuid::Uuid;

const T: Duration = Duration::from_secs(60);

/// The test database's URL as `role` (the local server trusts 127.0.0.1, so no password).
pub(crate) fn url_as(env: &TestEnv, role: &str) -> String {
    let rest = env
        .database_url
        .strip_prefix("postgres://postgres@")
        .expect("the harness connects as postgres");
    format!("postgres://{role}@{rest}")
}

/// Waits until a query as the harness's superuser returns true.
async fn until_sql(env: &TestEnv, what: &str, sql: &'static str) -> anyhow::Result<()> {
    eventually(what, T, async || {
        let done: bool = sqlx::query_scalar(sql).fetch_one(&env.pool).await?;
        ensure!(done, "`{sql}` is false");
        Ok(())
    })
    .await
}

fn owned(events: &[Event]) -> Vec<(Event, Vec<u8>)> {
    events
        .iter()
        .map(|e| {
            (
                e.clone(),
                serde_json::to_vec(e).expect("an event serializes"),
            )
        })
        .collect()
}

fn batch(items: &[(Event, Vec<u8>)]) -> Vec<NewEvent<'_>> {
    items
        .iter()
        .map(|(event, raw)| NewEvent {
            event,
            raw,
            redaction: None,
        })
        .collect()
}

/// Every stored row, whole: what "unchanged" is compared against.
async fn snapshot(env: &TestEnv) -> anyhow::Result<Vec<String>> {
    Ok(
        sqlx::query_scalar("SELECT row_to_json(a)::text FROM audit_events a ORDER BY id")
            .fetch_all(&env.pool)
            .await?,
    )
}

/// One row of the columns `id, tenant, action, outcome, occurred_at, actor_id, source,
/// event` plus the value of `extra` (`tx_id`, `received_at` or `seq`).
fn insert_setting(extra: &str, value: &str) -> String {
    let overriding = if extra == "seq" {
        " OVERRIDING SYSTEM VALUE"
    } else {
        ""
    };
    format!(
        "INSERT INTO audit_events (id, tenant, action, outcome, occurred_at, actor_id, \
         source, event, {extra}){overriding} VALUES ('{}', 'acme', 'x.y', 'success', now(), \
         'u', 's', '{{}}', {value})",
        Uuid::now_v7()
    )
}

/// A statement a role must not be able to run, and whether the harness's superuser (who
/// stands in for the owner) can: then the statement is valid, and the refusal is the role's.
struct Bypass {
    sql: String,
    owner_can: bool,
}

fn bypass(sql: impl Into<String>) -> Bypass {
    Bypass {
        sql: sql.into(),
        owner_can: true,
    }
}

/// Every way we know to change, hide or reorder stored events, or to remove what ingest
/// kept, for `role`.
fn bypasses(role: &str) -> Vec<Bypass> {
    let mut all = vec![
        // The trigger refuses these to everyone, the owner too.
        Bypass {
            sql: "UPDATE audit_events SET tenant = 'mallory'".into(),
            owner_can: false,
        },
        Bypass {
            sql: "DELETE FROM audit_events".into(),
            owner_can: false,
        },
        Bypass {
            sql: "TRUNCATE audit_events".into(),
            owner_can: false,
        },
        // What an owner could do to get past the triggers.
        bypass("ALTER TABLE audit_events DISABLE TRIGGER audit_events_no_update_delete"),
        bypass("ALTER TABLE audit_events DISABLE TRIGGER ALL"),
        bypass("ALTER TABLE audit_events ALTER COLUMN tenant TYPE text USING 'mallory'"),
        bypass("ALTER TABLE audit_events ALTER COLUMN event TYPE jsonb USING '{}'::jsonb"),
        bypass("ALTER TABLE audit_events ALTER COLUMN tx_id SET DEFAULT '1'::xid8"),
        bypass("DROP TRIGGER audit_events_no_update_delete ON audit_events"),
        bypass("DROP TRIGGER audit_events_no_truncate ON audit_events"),
        bypass("DROP TABLE audit_events"),
        bypass("ALTER TABLE audit_events RENAME TO audit_events_old"),
        bypass(
            "CREATE OR REPLACE FUNCTION audit_events_refuse_change() RETURNS trigger \
             LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$",
        ),
        bypass(
            "CREATE TRIGGER sneak BEFORE INSERT ON audit_events FOR EACH ROW \
             EXECUTE FUNCTION audit_events_refuse_change()",
        ),
        bypass("CREATE RULE hide AS ON INSERT TO audit_events DO INSTEAD NOTHING"),
        bypass("ALTER TABLE audit_events ENABLE ROW LEVEL SECURITY"),
        bypass(format!("ALTER TABLE audit_events OWNER TO {role}")),
        bypass("SET session_replication_role = replica"),
        // Objects of its own beside the trail's.
        bypass("CREATE TABLE public.shadow (id uuid)"),
        bypass("CREATE FUNCTION public.shadow() RETURNS int LANGUAGE sql AS 'SELECT 1'"),
        // Placing a row behind every cursor: the columns the database fills.
        bypass(insert_setting("tx_id", "'1'::xid8")),
        // (An hour ago: a partition holds it, so the refusal is the role's.)
        bypass(insert_setting("received_at", "now() - interval '1 hour'")),
        bypass(insert_setting("seq", "1")),
        // Hiding what ingest refused, or the relays' progress.
        bypass("UPDATE dead_letters SET reason = 'nothing to see'"),
        bypass("DELETE FROM dead_letters"),
        bypass("TRUNCATE dead_letters CASCADE"),
        bypass("DROP TABLE dead_letters CASCADE"),
        // Replays (0011): moving a replay's link to another dead letter or payload, or
        // removing the record of one.
        bypass("UPDATE dead_letters SET replay_of = id"),
        bypass("UPDATE dead_letter_replays SET dead_letter_id = 1"),
        bypass("UPDATE dead_letter_replays SET payload_sha256 = sha256('x'::bytea)"),
        bypass("UPDATE dead_letter_replays SET nonce = gen_random_uuid()"),
        bypass("DELETE FROM dead_letter_replays"),
        // Re-delivery (0012): rewriting why or which event a destination refused.
        bypass("UPDATE destination_dead_letters SET reason = 'fine'"),
        bypass("UPDATE destination_dead_letters SET event_id = gen_random_uuid()"),
        bypass("DELETE FROM destination_dead_letters"),
        bypass("DELETE FROM destinations"),
        bypass("TRUNCATE destinations"),
        bypass("DELETE FROM _sqlx_migrations"),
        // Retention (0008, 0009): the ids that keep a re-send of an expired event out, the
        // sequence, the policies, a partition, the holds and the receipts.
        Bypass {
            sql: "DELETE FROM audit_event_ids".into(),
            owner_can: false,
        },
        Bypass {
            sql: "TRUNCATE audit_event_ids".into(),
            owner_can: false,
        },
        bypass("INSERT INTO audit_event_ids VALUES (gen_random_uuid(), 0, now(), '1'::xid8, 1)"),
        bypass("SELECT setval('audit_events_seq', 1)"),
        bypass("UPDATE retention_policies SET keep_s = 1"),
        bypass("INSERT INTO retention_policies (tenant, keep_s) VALUES ('acme', 1)"),
        bypass("UPDATE retention_settings SET default_keep_s = 1"),
        bypass(
            "DO $$ BEGIN EXECUTE (SELECT format('DROP TABLE %I', name) FROM audit_partitions \
             ORDER BY name LIMIT 1); END $$",
        ),
        bypass(
            "DO $$ BEGIN EXECUTE (SELECT format('INSERT INTO %I (id, tenant, action, outcome, \
             occurred_at, actor_id, source, event) VALUES (gen_random_uuid(), ''acme'', \
             ''x.y'', ''success'', now(), ''u'', ''s'', ''{}'')', name) \
             FROM audit_partitions WHERE class = 0 AND lower_at <= now() AND upper_at > now()); \
             END $$",
        ),
        bypass("UPDATE legal_holds SET released_at = now(), released_by = 'x'"),
        bypass("DELETE FROM legal_holds"),
        bypass("DELETE FROM retention_receipts"),
        bypass("UPDATE retention_receipts SET note = ''"),
        bypass(
            "INSERT INTO retention_receipts (tenant, partition_name, keep_s, events, log_indexes, signed, note) VALUES ('acme', 'p', 1, 0, '{}', false, '')",
        ),
    ];
    if role == READER {
        // The reader writes nothing at all.
        all.extend([
            bypass(format!(
                "INSERT INTO audit_events (id, tenant, action, outcome, occurred_at, \
                 actor_id, source, event) VALUES ('{}', 'acme', 'x.y', 'success', now(), \
                 'u', 's', '{{}}')",
                Uuid::now_v7()
            )),
            bypass(
                "INSERT INTO dead_letters (stream, stream_seq, subject, payload, kind, reason) \
                 VALUES ('S', 2, 'x', '\\x00', 'schema', 'r')",
            ),
            bypass(
                "INSERT INTO destinations (name, type, cursor_tx, cursor_seq) \
                 VALUES ('x', 'http', '0', 0)",
            ),
            bypass("UPDATE destinations SET cursor_seq = 0"),
            bypass(
                "INSERT INTO legal_holds (tenant, reason, created_by) VALUES ('acme', 'r', 'x')",
            ),
            bypass("SELECT auditbridge_ensure_partitions()"),
            Bypass {
                sql: "SELECT * FROM auditbridge_expiry_begin('audit_events_legacy')".into(),
                owner_can: false,
            },
            Bypass {
                sql:
                    "SELECT auditbridge_expire_partition('p', '{}', '{}', false, '{}', '{}', 1, 1)"
                        .into(),
                owner_can: false,
            },
            bypass("SELECT auditbridge_expire_dead_letters(1)"),
        ]);
    }
    all
}

/// COPY rows into `columns` of audit_events (the first eight are the writer's own).
async fn copy_with(conn: &mut PgConnection, extra: Option<(&str, &str)>) -> anyhow::Result<()> {
    let mut columns =
        "id, tenant, action, outcome, occurred_at, actor_id, source, event".to_owned();
    let mut row = format!(
        "{}\tacme\tx.y\tsuccess\t2026-11-22T10:00:00Z\tu\ts\t{{}}",
        Uuid::now_v7()
    );
    if let Some((column, value)) = extra {
        columns.push_str(&format!(", {column}"));
        row.push_str(&format!("\t{value}"));
    }
    row.push('\n');
    let sql = format!("COPY audit_events ({columns}) FROM STDIN");
    let mut copy = conn.copy_in_raw(&sql).await?;
    copy.send(row.into_bytes()).await?;
    copy.finish().await?;
    Ok(())
}

/// Fails unless `result` is PostgreSQL's insufficient_privilege (42501).
fn expect_refused<T>(
    result: Result<T, anyhow::Error>,
    who: &str,
    what: &str,
) -> anyhow::Result<()> {
    match result {
        Ok(_) => bail!("{who}: `{what}` was allowed"),
        Err(e) => {
            let code = e
                .downcast_ref::<sqlx::Error>()
                .and_then(|e| e.as_database_error())
                .and_then(|d| d.code().map(|c| c.into_owned()));
            ensure!(
                code.as_deref() == Some("42501"),
                "{who}: `{what}` failed, but not for lack of privilege (SQLSTATE {code:?}): {e}"
            );
            Ok(())
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bypass_of_immutability_is_refused_for_the_writer_and_the_reader()
-> anyhow::Result<()> {
    let mut env = TestEnv::new().await?;

    // The writer persists a batch (COPY), the same batch again (the ON CONFLICT path) and a
    // dead letter, as a worker does.
    let writer = Store::connect_lazy(&url_as(&env, WRITER), 2)?;
    let items = owned(&env.events(20));
    let first = writer.persist(&batch(&items), &[]).await?;
    assert_eq!(first.inserted, 20);
    let dead = DeadLetter {
        origin: auditbridge_store::Origin {
            stream: "S",
            stream_seq: 1,
            stored_at: time::OffsetDateTime::UNIX_EPOCH,
            subject: "audit.acme.x",
            replay: None,
        },
        payload: b"not json",
        kind: "not_json",
        reason: "r",
    };
    let again = writer.persist(&batch(&items), &[dead]).await?;
    assert_eq!(
        (again.inserted, again.duplicates, again.dead_lettered),
        (0, 20, 1)
    );
    writer.close().await;
    let before = snapshot(&env).await?;

    let mut superuser = PgConnection::connect(&env.database_url).await?;
    for role in [WRITER, READER] {
        let mut conn = PgConnection::connect(&url_as(&env, role))
            .await
            .with_context(|| format!("connecting as {role}"))?;
        let (name, superuser_role): (String, bool) = sqlx::query_as(
            "SELECT current_user::text, rolsuper FROM pg_roles WHERE rolname = current_user",
        )
        .fetch_one(&mut conn)
        .await?;
        assert_eq!(name, role);
        assert!(!superuser_role, "{role} must not be a superuser");

        for b in bypasses(role) {
            let result = sqlx::raw_sql(AssertSqlSafe(b.sql.clone()))
                .execute(&mut conn)
                .await
                .map_err(anyhow::Error::from);
            expect_refused(result, role, &b.sql)?;
            if b.owner_can {
                // Valid SQL that the owner could run: the refusal above is the role's.
                let mut tx = superuser.begin().await?;
                sqlx::raw_sql(AssertSqlSafe(b.sql.clone()))
                    .execute(&mut *tx)
                    .await
                    .with_context(|| format!("the owner could not run `{}`", b.sql))?;
                tx.rollback().await?;
            }
        }

        // COPY naming a column the database fills is refused like the INSERT.
        let an_hour_ago = (time::OffsetDateTime::now_utc() - time::Duration::hours(1))
            .format(&time::format_description::well_known::Rfc3339)?;
        for (column, value) in [
            ("tx_id", "1"),
            ("received_at", an_hour_ago.as_str()),
            ("seq", "1"),
        ] {
            let result = copy_with(&mut conn, Some((column, value))).await;
            expect_refused(result, role, &format!("COPY with {column}"))?;
            let mut tx = superuser.begin().await?;
            if column != "seq" {
                copy_with(&mut tx, Some((column, value)))
                    .await
                    .with_context(|| format!("the owner could not COPY with {column}"))?;
            }
            tx.rollback().await?;
        }
        if role == READER {
            expect_refused(copy_with(&mut conn, None).await, role, "COPY")?;
        } else {
            // The writer's own columns: allowed (and rolled back).
            let mut tx = conn.begin().await?;
            copy_with(&mut tx, None).await?;
            tx.rollback().await?;
        }
        conn.close().await?;
    }

    assert_eq!(snapshot(&env).await?, before, "stored events changed");
    let triggers: Vec<(String, String)> = sqlx::query_as(
        "SELECT tgname::text, tgenabled::text FROM pg_trigger \
         WHERE tgrelid = 'audit_events'::regclass AND NOT tgisinternal ORDER BY tgname",
    )
    .fetch_all(&env.pool)
    .await?;
    assert_eq!(
        triggers,
        [
            ("audit_events_no_truncate".to_owned(), "A".to_owned()),
            ("audit_events_no_update_delete".to_owned(), "A".to_owned()),
            ("audit_events_note_ids".to_owned(), "A".to_owned())
        ]
    );
    // Every partition carries both immutability triggers, firing always (TRUNCATE triggers
    // are not cloned: auditbridge_ensure_partitions adds its own to each).
    let partitions: Vec<(String, Vec<String>)> = sqlx::query_as(
        "SELECT c.relname::text, \
                ARRAY(SELECT t.tgname || '=' || t.tgenabled::text FROM pg_trigger t \
                      WHERE t.tgrelid = c.oid AND NOT t.tgisinternal ORDER BY t.tgname)::text[] \
         FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
         WHERE i.inhparent = 'audit_events'::regclass ORDER BY 1",
    )
    .fetch_all(&env.pool)
    .await?;
    ensure!(!partitions.is_empty(), "audit_events has no partitions");
    for (name, triggers) in &partitions {
        assert_eq!(
            triggers,
            &[
                "audit_events_no_truncate=A",
                "audit_events_no_update_delete=A"
            ],
            "{name}"
        );
    }
    let dead_letters: i64 = sqlx::query_scalar("SELECT count(*) FROM dead_letters")
        .fetch_one(&env.pool)
        .await?;
    assert_eq!(dead_letters, 1);
    superuser.close().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grants_are_exactly_the_listed_ones_and_migrate_restores_them() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    // As on a cluster upgraded from PostgreSQL 14, where everyone may create in `public`:
    // `migrate` takes that away.
    sqlx::query("GRANT CREATE ON SCHEMA public TO PUBLIC")
        .execute(&env.pool)
        .await?;
    auditbridge_store::migrate(&env.database_url).await?;
    let creators: (bool, bool, bool) = sqlx::query_as(
        "SELECT has_schema_privilege($1, 'public', 'CREATE'), \
             has_schema_privilege($2, 'public', 'CREATE'), \
             has_schema_privilege($3, 'public', 'CREATE')",
    )
    .bind(WRITER)
    .bind(READER)
    .bind(OWNER)
    .fetch_one(&env.pool)
    .await?;
    assert_eq!(creators, (false, false, true));

    // Every table belongs to the owner role; the reader can read each one (a table a
    // migration adds without a line in grants.sql fails here).
    // Partitions of audit_events (0008) are read through it, never by themselves: no grants.
    let tables: Vec<(String, String, bool, bool)> = sqlx::query_as(
        "SELECT c.relname::text, pg_get_userbyid(c.relowner)::text, \
             has_table_privilege($1, c.oid, 'SELECT'), c.relispartition \
         FROM pg_class c WHERE c.relnamespace = 'public'::regnamespace \
           AND c.relkind IN ('r', 'p', 'v', 'm') ORDER BY 1",
    )
    .bind(READER)
    .fetch_all(&env.pool)
    .await?;
    ensure!(tables.len() >= 4, "{tables:?}");
    ensure!(tables.iter().any(|t| t.3), "no partitions: {tables:?}");
    for (table, owner, readable, partition) in &tables {
        assert_eq!(owner, OWNER, "{table} is owned by {owner}");
        if *partition {
            assert!(
                !readable,
                "{READER} can read the partition {table} directly"
            );
        } else {
            assert!(
                readable,
                "{READER} cannot read {table}: grant it in grants.sql"
            );
        }
    }

    // Table privileges beyond SELECT, per role and table.
    let privileges = |role: &'static str| {
        let pool = env.pool.clone();
        async move {
            let rows: Vec<(String, String)> = sqlx::query_as(
                "SELECT table_name::text, privilege_type::text \
                 FROM information_schema.role_table_grants \
                 WHERE grantee = $1 AND privilege_type <> 'SELECT' ORDER BY 1, 2",
            )
            .bind(role)
            .fetch_all(&pool)
            .await?;
            anyhow::Ok(rows)
        }
    };
    assert_eq!(privileges(READER).await?, []);
    assert_eq!(
        privileges(WRITER).await?,
        [
            ("destination_dead_letters".to_owned(), "INSERT".to_owned()),
            ("destinations".to_owned(), "INSERT".to_owned()),
            ("destinations".to_owned(), "UPDATE".to_owned()),
            ("log_checkpoints".to_owned(), "INSERT".to_owned()),
            ("log_leaves".to_owned(), "INSERT".to_owned()),
            ("log_nodes".to_owned(), "INSERT".to_owned())
        ]
    );
    // Column INSERT grants of the writer: the columns a batch carries, nothing the database
    // fills.
    let columns_of = |table: &'static str, privilege: &'static str| {
        let pool = env.pool.clone();
        async move {
            let rows: Vec<String> = sqlx::query_scalar(
                "SELECT column_name::text FROM information_schema.column_privileges \
                 WHERE grantee = $1 AND table_name = $2 AND privilege_type = $3 \
                 ORDER BY 1",
            )
            .bind(WRITER)
            .bind(table)
            .bind(privilege)
            .fetch_all(&pool)
            .await?;
            anyhow::Ok(rows)
        }
    };
    assert_eq!(
        columns_of("audit_events", "INSERT").await?,
        [
            "action",
            "actor_id",
            "event",
            "id",
            "occurred_at",
            "outcome",
            "redaction",
            "retention_class",
            "source",
            "target_id",
            "tenant"
        ]
    );
    assert_eq!(
        columns_of("dead_letters", "INSERT").await?,
        [
            "kind",
            "payload",
            "reason",
            "replay_of",
            "stream",
            "stream_seq",
            "stream_stored_at",
            "subject"
        ]
    );
    // A replay's request is written once; only where it was published and the verdict are
    // updated.
    assert_eq!(
        columns_of("dead_letter_replays", "INSERT").await?,
        [
            "corrected",
            "dead_letter_id",
            "nonce",
            "payload_sha256",
            "requested_by"
        ]
    );
    assert_eq!(
        columns_of("destination_dead_letters", "UPDATE").await?,
        [
            "attempts",
            "last_attempt_at",
            "last_reason",
            "redeliver_requested_at",
            "redeliver_requested_by",
            "redelivered_at"
        ]
    );
    assert_eq!(
        columns_of("dead_letter_replays", "UPDATE").await?,
        [
            "decided_at",
            "event_id",
            "new_dead_letter_id",
            "published_at",
            "result",
            "stream",
            "stream_seq"
        ]
    );

    // A privilege granted by hand is gone at the next migrate, and ownership taken back.
    sqlx::raw_sql(AssertSqlSafe(format!(
        "GRANT UPDATE, DELETE ON audit_events TO {WRITER}; \
         GRANT INSERT (tx_id) ON audit_events TO {WRITER}; \
         GRANT INSERT ON dead_letters TO {READER}; \
         ALTER TABLE destinations OWNER TO postgres"
    )))
    .execute(&env.pool)
    .await?;
    auditbridge_store::migrate(&env.database_url).await?;
    let (update, tx_id, reader_insert, owner): (bool, bool, bool, String) = sqlx::query_as(
        "SELECT has_table_privilege($1, 'audit_events', 'UPDATE'), \
             has_column_privilege($1, 'audit_events', 'tx_id', 'INSERT'), \
             has_table_privilege($2, 'dead_letters', 'INSERT'), \
             (SELECT pg_get_userbyid(relowner)::text FROM pg_class \
              WHERE oid = 'destinations'::regclass)",
    )
    .bind(WRITER)
    .bind(READER)
    .fetch_one(&env.pool)
    .await?;
    assert_eq!(
        (update, tx_id, reader_insert, owner.as_str()),
        (false, false, false, OWNER)
    );
    Ok(())
}

/// `status --json` as `role`.
async fn status_as(env: &TestEnv, role: &str, dest: &str) -> anyhow::Result<serde_json::Value> {
    let url = url_as(env, role);
    let out = env
        .command(
            &["status", "--json"],
            &[
                ("AUDITBRIDGE_DATABASE_URL", &url),
                ("AUDITBRIDGE_DESTINATIONS", dest),
            ],
        )
        .stderr(Stdio::piped())
        .output()
        .await?;
    ensure!(
        out.status.success(),
        "status as {role}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// A permission change is the database's fault, not the events': a writer that loses INSERT
/// on `audit_events` mid-stream fails every event alone *and* its control row, so the batch
/// is held (no event dead-lettered, nothing acknowledged) and everything is stored once the
/// grant is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_that_loses_insert_holds_its_batches_and_dead_letters_nothing()
-> anyhow::Result<()> {
    let mut env = TestEnv::new().await?;
    env.ensure_stream().await?;
    let writer_url = url_as(&env, WRITER);
    let worker = env
        .spawn_worker("writer", &[("AUDITBRIDGE_DATABASE_URL", &writer_url)])
        .await?;
    worker.wait_ready(T).await?;
    let first = env.events(50);
    env.publish(&first).await?;
    env.wait_for_count(50, T).await?;

    sqlx::query("REVOKE INSERT ON audit_events FROM auditbridge_writer")
        .execute(&env.pool)
        .await?;
    let held = env.events(200);
    env.publish(&held).await?;
    // Long enough for several attempts and the isolation of a batch (the worker retries with
    // backoff): nothing is stored, nothing becomes a dead letter.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(env.count().await?, 50);
    assert!(
        env.dead_letters().await?.is_empty(),
        "events dead-lettered for the database's fault: {:?}",
        env.dead_letters().await?
    );

    // `migrate` puts the listed grants back.
    auditbridge_store::migrate(&env.database_url).await?;
    env.wait_for_count(250, T).await?;
    env.wait_for_drained(T).await?;
    let want: HashSet<Uuid> = first.iter().chain(&held).map(|e| e.id).collect();
    assert_eq!(env.stored_ids().await?, want);
    assert!(env.dead_letters().await?.is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_as_the_writer_and_serve_as_the_reader_work_end_to_end() -> anyhow::Result<()> {
    let mut env = TestEnv::new().await?;
    env.ensure_stream().await?;
    let rx = Receiver::start().await?;
    // The first attempts fail, so the relay also records failures.
    rx.answer(Answer::Status(500));
    let dest = json!([{"name": "siem", "type": "http", "params": {
        "url": rx.url("/siem"), "start": "earliest", "retry_min": "50ms", "retry_max": "500ms",
        "max_batch_events": 100
    }}])
    .to_string();
    let writer_url = url_as(&env, WRITER);
    let mut worker = env
        .spawn_worker(
            "writer",
            &[
                ("AUDITBRIDGE_DATABASE_URL", &writer_url),
                ("AUDITBRIDGE_DESTINATIONS", &dest),
            ],
        )
        .await?;
    worker.wait_ready(T).await?;

    let events = env.events(400);
    env.publish(&events).await?;
    // A poison message (dead letter) and re-sends without a message id (duplicates, written
    // through the INSERT ... ON CONFLICT path).
    env.publish_raw(&format!("{}.acme.x", env.prefix), "not json", None)
        .await?
        .await?;
    for e in &events[..50] {
        env.publish_raw(&e.subject(&env.prefix), serde_json::to_vec(e)?, None)
            .await?
            .await?;
    }
    env.wait_for_count(400, T).await?;
    env.wait_for_drained(T).await?;
    let ids: HashSet<Uuid> = events.iter().map(|e| e.id).collect();
    assert_eq!(env.stored_ids().await?, ids);
    let kinds: Vec<String> = env.dead_letters().await?.into_iter().map(|d| d.0).collect();
    assert_eq!(kinds, ["not_json"]);

    until("two refused deliveries", T, || {
        rx.requests().iter().filter(|r| r.answered == 500).count() >= 2
    })
    .await?;
    until_sql(
        &env,
        "the failure recorded",
        "SELECT last_error IS NOT NULL FROM destinations WHERE name = 'siem'",
    )
    .await?;
    rx.answer(Answer::Ok);
    until("every event delivered", T, || rx.delivered() == ids).await?;
    until_sql(
        &env,
        "the cursor moved past every event",
        "SELECT delivered_total >= 400 AND NOT failing FROM destinations WHERE name = 'siem'",
    )
    .await?;

    // serve as the reader: pages, one event, stats and the live tail's replay.
    let admin = Token::admin("admin", &["read"]);
    let reader_url = url_as(&env, READER);
    let api = ApiServer::start(
        &env,
        &[&admin],
        &[("AUDITBRIDGE_DATABASE_URL", &reader_url)],
    )
    .await?;
    let tenant = events[0].tenant.clone();
    let mine: HashSet<Uuid> = events
        .iter()
        .filter(|e| e.tenant == tenant)
        .map(|e| e.id)
        .collect();
    let page = api
        .all_pages(&format!("tenant={tenant}"), &admin, 50)
        .await?;
    let paged: HashSet<Uuid> = page
        .iter()
        .map(|e| e["id"].as_str().unwrap_or_default().parse())
        .collect::<Result<_, _>>()?;
    assert_eq!(paged, mine);
    let (status, one) = api
        .get(
            &format!("/v1/events/{}?tenant={tenant}", events[0].id),
            Some(&admin),
        )
        .await?;
    assert_eq!(
        (status, one["id"].as_str()),
        (200, Some(events[0].id.to_string().as_str()))
    );
    let (status, _) = api
        .get(&format!("/v1/stats?tenant={tenant}"), Some(&admin))
        .await?;
    assert_eq!(status, 200);
    let mut tail = api
        .stream(&format!("tenant={tenant}"), &admin, Some("0.0"))
        .await?;
    assert_eq!(tail.caught_up(T).await?.len(), mine.len());
    drop(tail);

    // `status` as the reader.
    let status = status_as(&env, READER, &dest).await?;
    assert_eq!(status["database"]["events"].as_i64(), Some(400), "{status}");
    assert!(
        status["destinations"][0]["delivered_total"].as_i64() >= Some(400),
        "{status}"
    );

    // At SIGTERM the writer releases its lease.
    worker.signal("TERM");
    let exit = worker.wait_exit(T).await?;
    assert!(exit.success(), "worker exited with {exit}");
    until_sql(
        &env,
        "the lease released",
        "SELECT lease_holder IS NULL FROM destinations WHERE name = 'siem'",
    )
    .await?;
    let log = worker.log_text();
    for bad in ["permission denied", "42501", "superuser"] {
        assert!(!log.contains(bad), "worker log mentions {bad:?}:\n{log}");
    }
    assert!(
        log.contains("least-privilege role"),
        "the worker did not check its role:\n{log}"
    );
    Ok(())
}

/// Waits until `path` contains `needle`; returns the text.
async fn wait_for_log(path: &Path, needle: &str) -> anyhow::Result<String> {
    eventually(
        &format!("{} to say {needle:?}", path.display()),
        T,
        async || {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            ensure!(text.contains(needle), "it says:\n{text}");
            Ok(text)
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_superuser_or_owner_url_still_works_with_a_warning_naming_the_role() -> anyhow::Result<()>
{
    let mut env = TestEnv::new().await?;
    env.ensure_stream().await?;
    // The harness's URL is the superuser's; then the owner role's.
    let owner_url = url_as(&env, OWNER);
    let superuser = env.spawn_worker("superuser", &[]).await?;
    let owner = env
        .spawn_worker("owner", &[("AUDITBRIDGE_DATABASE_URL", &owner_url)])
        .await?;
    superuser.wait_ready(T).await?;
    owner.wait_ready(T).await?;
    let events = env.events(100);
    env.publish(&events).await?;
    env.wait_for_count(100, T).await?;

    let log = wait_for_log(&superuser.log, "a superuser").await?;
    assert!(
        log.contains("\\\"postgres\\\"") || log.contains("\"postgres\""),
        "the warning names the role:\n{log}"
    );
    assert!(
        log.contains(WRITER),
        "the warning names the role to use:\n{log}"
    );
    let log = wait_for_log(&owner.log, "the owner of audit_events").await?;
    assert!(log.contains(OWNER) && log.contains(WRITER), "{log}");

    // serve, as a process, with the superuser's URL.
    let log_path = superuser
        .log
        .with_file_name(format!("{}-serve.log", env.tag));
    let file = std::fs::File::create(&log_path)?;
    let api_addr = free_addr()?.to_string();
    let metrics_addr = free_addr()?.to_string();
    let mut serve = env
        .command(
            &["serve"],
            &[
                ("AUDITBRIDGE_API_ADDR", &api_addr),
                ("AUDITBRIDGE_METRICS_ADDR", &metrics_addr),
            ],
        )
        .stdout(file.try_clone()?)
        .stderr(file)
        .spawn()?;
    let log = wait_for_log(&log_path, "a superuser").await;
    let _ = serve.start_kill();
    let log = log?;
    assert!(
        log.contains(READER),
        "serve's warning names its role:\n{log}"
    );
    Ok(())
}

/// The Auditbridge roles that exist in a cluster.
async fn roles(conn: &mut PgConnection) -> anyhow::Result<Vec<String>> {
    Ok(sqlx::query_scalar(
        "SELECT rolname::text FROM pg_roles WHERE rolname LIKE 'auditbridge%' ORDER BY 1",
    )
    .fetch_all(conn)
    .await?)
}

/// A PostgreSQL cluster of the test's own, on another port, where no Auditbridge role
/// exists yet. Stopped and deleted when dropped.
struct PrivateCluster {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
}

fn as_postgres(bin: &Path, program: &str) -> std::process::Command {
    let path = bin.join(program);
    // initdb and postgres refuse to run as root.
    if std::env::var("USER").as_deref() == Ok("root")
        || std::process::Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout.starts_with(b"0\n"))
    {
        let mut cmd = std::process::Command::new("runuser");
        cmd.args(["-u", "postgres", "--"]).arg(path);
        cmd
    } else {
        std::process::Command::new(path)
    }
}

impl PrivateCluster {
    fn start(tag: &str) -> anyhow::Result<PrivateCluster> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")?
            .filter_map(|e| e.ok())
            .map(|e| e.path().join("bin"))
            .filter(|b| b.join("initdb").exists())
            .max()
            .context("no PostgreSQL server binaries under /usr/lib/postgresql")?;
        let dir = std::env::temp_dir().join(format!("ab-roles-pg-{tag}"));
        std::fs::create_dir_all(&dir)?;
        let _ = std::process::Command::new("chown")
            .args(["postgres:postgres"])
            .arg(&dir)
            .status();
        let port = free_addr()?.port();
        let cluster = PrivateCluster { dir, bin, port };
        let data = cluster.dir.join("data");
        let out = as_postgres(&cluster.bin, "initdb")
            .args([
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-sync",
                "-D",
            ])
            .arg(&data)
            .output()?;
        ensure!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let options = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            cluster.dir.display()
        );
        let out = as_postgres(&cluster.bin, "pg_ctl")
            .args(["-w", "-t", "60", "-o", &options, "-l"])
            .arg(cluster.dir.join("log"))
            .arg("-D")
            .arg(&data)
            .arg("start")
            .output()?;
        ensure!(
            out.status.success(),
            "pg_ctl start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(cluster)
    }

    fn url(&self, user: &str, database: &str) -> String {
        format!("postgres://{user}@127.0.0.1:{}/{database}", self.port)
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        let _ = as_postgres(&self.bin, "pg_ctl")
            .args(["-m", "immediate", "-D"])
            .arg(self.dir.join("data"))
            .arg("stop")
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrating_many_databases_at_once_creates_each_role_once() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let cluster = PrivateCluster::start(&env.tag)?;
    let mut admin = PgConnection::connect(&cluster.url("postgres", "postgres")).await?;
    assert_eq!(roles(&mut admin).await?, Vec::<String>::new());

    // `migrate --no-roles` uses AUDITBRIDGE_MIGRATE_DATABASE_URL (the worker's URL points
    // nowhere) and creates no role.
    let run_migrate = |args: &'static [&'static str], url: String| {
        let cmd = env.command(
            args,
            &[
                ("AUDITBRIDGE_MIGRATE_DATABASE_URL", &url),
                (
                    "AUDITBRIDGE_DATABASE_URL",
                    "postgres://nobody@127.0.0.1:1/nowhere",
                ),
            ],
        );
        async move {
            let mut cmd = cmd;
            let out = cmd.output().await?;
            ensure!(
                out.status.success(),
                "{args:?}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            anyhow::Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        }
    };
    let out = run_migrate(&["migrate", "--no-roles"], cluster.url("postgres", "plain")).await?;
    assert!(out.contains("--no-roles"), "{out}");
    assert_eq!(roles(&mut admin).await?, Vec::<String>::new());
    let mut plain = PgConnection::connect(&cluster.url("postgres", "plain")).await?;
    let owner: String = sqlx::query_scalar(
        "SELECT pg_get_userbyid(relowner)::text FROM pg_class WHERE oid = 'audit_events'::regclass",
    )
    .fetch_one(&mut plain)
    .await?;
    assert_eq!(owner, "postgres");
    plain.close().await?;

    // Eight databases migrated at once, each creating the roles it finds missing.
    let urls: Vec<String> = (0..8)
        .map(|i| cluster.url("postgres", &format!("many_{i}")))
        .collect();
    let results = futures::future::join_all(
        urls.iter()
            .map(|u| auditbridge_store::migrate_with(u, auditbridge_store::Roles::Manage, None)),
    )
    .await;
    let mut created = Vec::new();
    for (url, r) in urls.iter().zip(results) {
        let done = r.with_context(|| format!("migrating {url}"))?;
        assert!(done.created_database);
        created.extend(done.created_roles);
    }
    created.sort();
    assert_eq!(
        created,
        [OWNER, POLLER, READER, WRITER],
        "each role is created exactly once"
    );
    assert_eq!(roles(&mut admin).await?, [OWNER, POLLER, READER, WRITER]);
    for url in &urls {
        let mut conn = PgConnection::connect(url).await?;
        let owner: String = sqlx::query_scalar(
            "SELECT pg_get_userbyid(relowner)::text FROM pg_class \
             WHERE oid = 'audit_events'::regclass",
        )
        .fetch_one(&mut conn)
        .await?;
        assert_eq!(owner, OWNER, "{url}");
        conn.close().await?;
    }

    // The database migrated without roles takes them at its next `migrate`, and the owner
    // role itself (not a superuser) can run `migrate` from then on.
    let out = run_migrate(&["migrate"], cluster.url("postgres", "plain")).await?;
    assert!(out.contains("grants applied"), "{out}");
    let out = run_migrate(&["migrate"], cluster.url(OWNER, "plain")).await?;
    assert!(out.contains("grants applied"), "{out}");
    let mut plain = PgConnection::connect(&cluster.url(WRITER, "plain")).await?;
    let can: bool = sqlx::query_scalar(
        "SELECT has_table_privilege('audit_events', 'SELECT') \
             AND NOT has_table_privilege('audit_events', 'UPDATE') \
             AND (SELECT pg_get_userbyid(relowner) = $1 FROM pg_class \
                  WHERE oid = 'audit_events'::regclass)",
    )
    .bind(OWNER)
    .fetch_one(&mut plain)
    .await?;
    assert!(can);
    plain.close().await?;
    admin.close().await?;
    Ok(())
}
