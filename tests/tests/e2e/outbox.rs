//! The outbox under concurrent writers: transactions that insert early and commit late (the
//! commit-order trap of a `bigserial` cursor) must not make a reader skip anything.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use auditbridge_store::{Position, Store};
use auditbridge_tests::{TestEnv, eventually};
use uuid::Uuid;

/// One writer transaction: when it inserted (its highest seq) and when it committed.
#[derive(Debug, Clone, Copy)]
struct Committed {
    max_seq: i64,
    at: Instant,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_that_commit_out_of_order_skip_nothing() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let store = Store::from_pool(env.pool.clone());
    let written: Arc<Mutex<HashSet<Uuid>>> = Arc::default();
    let commits: Arc<Mutex<Vec<Committed>>> = Arc::default();
    let writers_done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    const WRITERS: usize = 6;
    const TXS: usize = 25;

    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(WRITERS as u32 + 2)
        .connect(&env.database_url)
        .await?;
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let (pool, written, commits, done) = (
            pool.clone(),
            written.clone(),
            commits.clone(),
            writers_done.clone(),
        );
        tasks.push(tokio::spawn(async move {
            for t in 0..TXS {
                let mut tx = pool.begin().await?;
                let rows: Vec<(Uuid, i64)> = sqlx::query_as(
                    "INSERT INTO audit_events \
                       (id, tenant, action, outcome, occurred_at, actor_id, source, event) \
                     SELECT gen_random_uuid(), 'acme', 'doc.update', 'success', now(), 'u', 's', '{}' \
                     FROM generate_series(1, $1) RETURNING id, seq",
                )
                .bind(1 + ((w * 7 + t * 3) % 20) as i32)
                .fetch_all(&mut *tx)
                .await?;
                // Hold the transaction open for a varying time so later inserts (higher seq)
                // commit first.
                let hold = ((w * 13 + t * 17) % 60) as f64 / 1000.0;
                sqlx::query("SELECT pg_sleep($1)").bind(hold).execute(&mut *tx).await?;
                tx.commit().await?;
                let at = Instant::now();
                written.lock().unwrap().extend(rows.iter().map(|r| r.0));
                commits.lock().unwrap().push(Committed {
                    max_seq: rows.iter().map(|r| r.1).max().unwrap_or(0),
                    at,
                });
            }
            done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            anyhow::Ok(())
        }));
    }

    // The outbox reader and, beside it, the naive reader the brief warns about (a cursor on
    // `seq` alone), polling as fast as they can while the writers work.
    let mut cursor = Position::start();
    let mut seen: Vec<Uuid> = Vec::new();
    // Where each id was first read, to explain a repeat if one ever happens.
    let mut first_seen: std::collections::HashMap<Uuid, (Position, Position)> = Default::default();
    let mut repeats: Vec<String> = Vec::new();
    let mut naive_last: i64 = 0;
    let mut naive_seen: HashSet<Uuid> = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let finished = writers_done.load(std::sync::atomic::Ordering::SeqCst) == WRITERS;
        let rows = store.read_outbox(&cursor, 200).await?;
        let before = cursor.clone();
        if let Some(last) = rows.last() {
            cursor = last.position.clone();
        }
        // Positions rise numerically (the xid8 order, not its text: "10000" < "9999").
        let mut prev = (before.tx_id.parse::<u64>()?, before.seq);
        for r in &rows {
            let pos = (r.position.tx_id.parse::<u64>()?, r.position.seq);
            assert!(pos > prev, "outbox order went from {prev:?} to {pos:?}");
            prev = pos;
        }
        for r in &rows {
            if let Some(first) = first_seen.insert(r.event.id, (r.position.clone(), before.clone()))
            {
                repeats.push(format!(
                    "{} first at {:?} (read after {:?}), again at {:?} (read after {:?})",
                    r.event.id, first.0, first.1, r.position, before
                ));
            }
        }
        seen.extend(rows.iter().map(|r| r.event.id));

        let naive: Vec<(Uuid, i64)> =
            sqlx::query_as("SELECT id, seq FROM audit_events WHERE seq > $1 ORDER BY seq")
                .bind(naive_last)
                .fetch_all(&env.pool)
                .await?;
        if let Some(l) = naive.last() {
            naive_last = l.1;
        }
        naive_seen.extend(naive.iter().map(|r| r.0));

        if finished && rows.is_empty() && seen.len() >= written.lock().unwrap().len() {
            break;
        }
        assert!(Instant::now() < deadline, "the reader did not catch up");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    for t in tasks {
        t.await??;
    }

    let written = written.lock().unwrap().clone();
    let unique: HashSet<Uuid> = seen.iter().copied().collect();
    assert!(
        repeats.is_empty(),
        "the outbox reader saw events twice:\n{}",
        repeats.join("\n")
    );
    assert_eq!(unique.len(), seen.len());
    assert_eq!(unique, written, "the outbox reader skipped events");

    // The trap was really there: commits happened out of seq order...
    let mut commits = commits.lock().unwrap().clone();
    commits.sort_by_key(|c| c.at);
    let out_of_order = commits
        .windows(2)
        .filter(|w| w[1].max_seq < w[0].max_seq)
        .count();
    assert!(
        out_of_order > 0,
        "writers never committed out of seq order; the test proves nothing"
    );
    // ...and the naive reader fell into it.
    let missed = written.difference(&naive_seen).count();
    assert!(
        missed > 0,
        "the naive seq cursor missed nothing this time ({out_of_order} out-of-order commits); \
         the test did not exercise the trap"
    );
    eprintln!(
        "{} events, {out_of_order} out-of-order commits, naive seq cursor missed {missed}, outbox missed 0",
        written.len()
    );
    Ok(())
}

/// The outbox read must walk the (tx_id, seq) index in xid8 order. Sorting by the text form
/// of the xid (a real bug once: the output column shadowed the table's in ORDER BY) both
/// reorders positions where the xid gains a digit and sorts the whole backlog on every read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outbox_read_walks_the_commit_order_index() -> anyhow::Result<()> {
    let mut env = TestEnv::new().await?;
    let store = Store::from_pool(env.pool.clone());
    for _ in 0..10 {
        let events = env.events(2_000);
        let raws: Vec<Vec<u8>> = events
            .iter()
            .map(|e| serde_json::to_vec(e).unwrap())
            .collect();
        let rows: Vec<auditbridge_store::NewEvent<'_>> = events
            .iter()
            .zip(&raws)
            .map(|(event, raw)| auditbridge_store::NewEvent {
                event,
                raw,
                redaction: None,
            })
            .collect();
        store.persist(&rows, &[]).await?;
    }
    // And 50,000 rows in one transaction, the cursor at its start: every row after it has
    // the one tx_id, which the statistics make look like almost none. The planner must still
    // merge the partitions' indexes rather than sort all 50,000 (a connection of the store
    // plans with enable_sort off for this; see crates/store/src/lib.rs, connect_options).
    let (bulk_tx, bulk_seq): (String, i64) = sqlx::query_as(
        "WITH b AS (INSERT INTO audit_events \
             (id, tenant, action, outcome, occurred_at, actor_id, source, event) \
             SELECT gen_random_uuid(), 'bulk', 'bulk.write', 'success', now(), 'u', 's', '{}' \
             FROM generate_series(1, 50000) RETURNING tx_id, seq) \
         SELECT min(tx_id::text), min(seq) FROM b",
    )
    .fetch_one(&env.pool)
    .await?;
    sqlx::query("ANALYZE audit_events")
        .execute(&env.pool)
        .await?;
    let ours = Store::connect_lazy(&env.database_url, 1)?;
    let explain = format!("EXPLAIN {}", auditbridge_store::outbox::READ_OUTBOX);
    let plan: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(explain))
        .bind(&bulk_tx)
        .bind(bulk_seq)
        .bind(500i64)
        .bind(0i64)
        .fetch_all(ours.pool())
        .await?;
    ours.close().await;
    // The trail is partitioned (migration 0008): the walk merges each partition's
    // (tx_id, seq) index in order, and sorts nothing.
    let plan = plan.join("\n");
    let scans: Vec<&str> = plan
        .lines()
        .filter(|l| l.contains(" Scan ") && l.contains(" on audit_events"))
        .collect();
    assert!(!scans.is_empty(), "{plan}");
    for scan in &scans {
        assert!(
            scan.contains("Index Scan using ") && scan.contains("_tx_id_seq_idx"),
            "a partition is not read by its (tx_id, seq) index: {plan}"
        );
    }
    assert!(
        !plan.lines().any(|l| {
            let node = l.trim_start_matches([' ', '-', '>']);
            node.starts_with("Sort ") && !node.starts_with("Sort Key")
        }),
        "{plan}"
    );

    // A transaction of a test running beside this one can hold the horizon back a moment.
    env.wait_below_horizon(Duration::from_secs(30)).await?;
    let rows = store.read_outbox(&Position::start(), 20_000).await?;
    assert_eq!(rows.len(), 20_000);
    let positions: Vec<(u64, i64)> = rows
        .iter()
        .map(|r| (r.position.tx_id.parse().unwrap(), r.position.seq))
        .collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]));
    Ok(())
}

/// Finding 11: a timestamp start and `rewind` must not place a cursor past an event whose
/// transaction is still running. Here a batch that began after `t` (so its events are "from
/// `t` on") holds its transaction open while a later batch commits; the cursor must stay at or
/// below the commit-safe horizon, so the held batch is delivered once it commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timestamp_start_and_rewind_never_pass_an_event_still_in_flight() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let store = Store::from_pool(env.pool.clone());
    let insert = "INSERT INTO audit_events \
           (id, tenant, action, outcome, occurred_at, actor_id, source, event) \
         VALUES ($1, 'acme', 'doc.update', 'success', now(), 'u', 's', '{}')";
    // An older event, before `t`.
    sqlx::query(insert)
        .bind(Uuid::now_v7())
        .execute(&env.pool)
        .await?;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let t = time::OffsetDateTime::now_utc();
    tokio::time::sleep(Duration::from_millis(20)).await;

    // The held batch: begins after `t` (received_at = its start), takes its xid first.
    let held_id = Uuid::now_v7();
    let mut held = env.pool.begin().await?;
    sqlx::query(insert)
        .bind(held_id)
        .execute(&mut *held)
        .await?;
    // A later batch commits while the first is still open: its xid is higher.
    let later_id = Uuid::now_v7();
    sqlx::query(insert)
        .bind(later_id)
        .execute(&env.pool)
        .await?;

    let created = store
        .register_destination("from-t", "http", &auditbridge_store::StartAt::At(t))
        .await?;
    assert!(created);
    store
        .register_destination("rewound", "http", &auditbridge_store::StartAt::Earliest)
        .await?;
    let rewound = store
        .rewind("rewound", t)
        .await?
        .expect("the destination exists");
    held.commit().await?;

    let cursors: std::collections::HashMap<String, Position> = store
        .destinations()
        .await?
        .into_iter()
        .map(|d| (d.name, d.cursor))
        .collect();
    assert_eq!(cursors["rewound"], rewound);
    for name in ["from-t", "rewound"] {
        // Bounded: the horizon passes both batches once no transaction of this or another
        // test holds it.
        let mut cursor = cursors[name].clone();
        let mut seen = HashSet::new();
        let what = format!("{name}: the later event");
        eventually(&what, Duration::from_secs(30), async || {
            let rows = store.read_outbox(&cursor, 100).await?;
            if let Some(last) = rows.last() {
                cursor = last.position.clone();
            }
            seen.extend(rows.iter().map(|r| r.event.id));
            anyhow::ensure!(seen.contains(&later_id), "{} others read", seen.len());
            Ok(())
        })
        .await?;
        assert!(
            seen.contains(&held_id),
            "{name}: the cursor was placed past the event that was in flight"
        );
    }
    Ok(())
}

/// Stores `events` the way the worker does (one batch, one transaction).
async fn persist(store: &Store, events: &[auditbridge_event::Event]) -> anyhow::Result<()> {
    let raws: Vec<Vec<u8>> = events
        .iter()
        .map(|e| serde_json::to_vec(e).unwrap())
        .collect();
    let rows: Vec<auditbridge_store::NewEvent<'_>> = events
        .iter()
        .zip(&raws)
        .map(|(event, raw)| auditbridge_store::NewEvent {
            event,
            raw,
            redaction: None,
        })
        .collect();
    store.persist(&rows, &[]).await?;
    Ok(())
}

/// Finding 6: a trail moved with `pg_dump` / `pg_restore` into a freshly initialised cluster
/// (whose transaction ids start low again) must go on relaying and tailing. A destination
/// that had relayed part of the trail and a live tail resuming from its last id both get the
/// rest of the old events and then the new ones, with no gap and no repeat, once
/// `auditbridge outbox rebase` ran (which `migrate` asks for).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trail_restored_into_a_new_cluster_keeps_relaying_and_tailing() -> anyhow::Result<()> {
    use auditbridge_tests::api::{ApiServer, Token};
    use auditbridge_tests::cluster::Cluster;

    let mut env = TestEnv::new().await?;
    let store = Store::from_pool(env.pool.clone());
    let old = env.events(50);
    persist(&store, &old[..25]).await?;
    persist(&store, &old[25..]).await?;
    // A destination that relayed the first 30 events.
    let ttl = Duration::from_secs(30);
    store
        .register_destination("d", "http", &auditbridge_store::StartAt::Earliest)
        .await?;
    env.wait_below_horizon(Duration::from_secs(30)).await?;
    store
        .acquire_lease("d", "before", ttl)
        .await?
        .expect("free");
    let first = store.read_outbox(&Position::start(), 30).await?;
    assert_eq!(first.len(), 30);
    let passed = first.last().unwrap().position.clone();
    assert!(store.advance("d", "before", &passed, 30, 0).await?);
    store.release_lease("d", "before").await?;
    // A live tail that saw the same 30 events resumes from the 30th's id.
    let last_event_id = format!("{}.{}", passed.tx_id, passed.seq);
    let old_rest: Vec<Uuid> = store
        .read_outbox(&passed, 100)
        .await?
        .iter()
        .map(|r| r.event.id)
        .collect();
    assert_eq!(old_rest.len(), 20);

    let cluster = Cluster::start()?;
    let url = cluster.restore_from(&env.database_url, &format!("ab_restored_{}", env.tag))?;
    let restored_pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect(&url)
        .await?;
    let (stored_max, cluster_next): (String, String) = sqlx::query_as(
        "SELECT max(tx_id)::text, pg_snapshot_xmax(pg_current_snapshot())::text FROM audit_events",
    )
    .fetch_one(&restored_pool)
    .await?;
    assert!(
        stored_max.parse::<u64>()? > cluster_next.parse::<u64>()?,
        "the fresh cluster's xids ({cluster_next}) are not below the stored ones ({stored_max}); \
         the test proves nothing"
    );

    // Events written in the new cluster before anyone noticed (a worker started at once).
    let restored = Store::from_pool(restored_pool.clone());
    let new = env.events(40);
    persist(&restored, &new[..20]).await?;
    // The freeze this fixes: from the destination's cursor, nothing at all is readable (the
    // moved rows lie above the new cluster's horizon, the new rows behind the cursor).
    let frozen_cursor = restored
        .destinations()
        .await?
        .into_iter()
        .find(|d| d.name == "d")
        .expect("restored")
        .cursor;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        restored.read_outbox(&frozen_cursor, 100).await?.is_empty(),
        "the restored outbox was not frozen; the test proves nothing"
    );

    // `migrate` on the restored trail says what to do; `outbox rebase` does it.
    let run = |args: &[&str]| {
        let mut cmd = env.command(args, &[("AUDITBRIDGE_DATABASE_URL", url.as_str())]);
        async move { cmd.output().await }
    };
    let migrated = run(&["migrate"]).await?;
    let text = String::from_utf8_lossy(&migrated.stdout).into_owned()
        + &String::from_utf8_lossy(&migrated.stderr);
    assert!(migrated.status.success(), "{text}");
    assert!(
        text.contains("auditbridge outbox rebase"),
        "migrate did not say what to do: {text}"
    );
    let status = run(&["status", "--json"]).await?;
    let doc: serde_json::Value = serde_json::from_slice(&status.stdout)?;
    assert_eq!(doc["outbox"]["needs_rebase"], true, "{doc}");
    let rebased = run(&["outbox", "rebase"]).await?;
    let text = String::from_utf8_lossy(&rebased.stdout).into_owned()
        + &String::from_utf8_lossy(&rebased.stderr);
    assert!(rebased.status.success(), "{text}");
    // Idempotent: a second run has nothing to do.
    let again = run(&["outbox", "rebase"]).await?;
    assert!(again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stdout).contains("nothing to do"),
        "{}",
        String::from_utf8_lossy(&again.stdout)
    );
    let status = run(&["status", "--json"]).await?;
    let doc: serde_json::Value = serde_json::from_slice(&status.stdout)?;
    assert_eq!(doc["outbox"]["needs_rebase"], false, "{doc}");

    // More, after the rebase.
    persist(&restored, &new[20..]).await?;
    let want: Vec<Uuid> = old_rest
        .iter()
        .copied()
        .chain(new.iter().map(|e| e.id))
        .collect();

    // The destination, from its stored cursor.
    let state = restored
        .acquire_lease("d", "after", ttl)
        .await?
        .expect("free");
    let mut cursor = state.cursor;
    let mut relayed = Vec::new();
    let what = "the destination to relay every event after the restore";
    eventually(what, Duration::from_secs(30), async || {
        // Read on while there is something to read; wait only when there is not.
        while relayed.len() < want.len() {
            let rows = restored.read_outbox(&cursor, 7).await?;
            let Some(last) = rows.last() else {
                anyhow::bail!("{} of {} events relayed", relayed.len(), want.len());
            };
            cursor = last.position.clone();
            assert!(
                restored
                    .advance("d", "after", &cursor, rows.len() as u64, 0)
                    .await?
            );
            relayed.extend(rows.iter().map(|r| r.event.id));
        }
        Ok(())
    })
    .await?;
    assert_eq!(
        relayed, want,
        "the destination missed, repeated or reordered events"
    );

    // The live tail, resuming from the id it had before the move.
    let admin = Token::admin("ops", &["read"]);
    let db = ("AUDITBRIDGE_DATABASE_URL", url.as_str());
    let api = ApiServer::start(&env, &[&admin], &[db]).await?;
    let mut tail = api.stream("", &admin, Some(&last_event_id)).await?;
    let got = tail
        .audit_events(want.len(), Duration::from_secs(30))
        .await?;
    let ids: Vec<Uuid> = got
        .iter()
        .map(|e| {
            serde_json::from_str::<serde_json::Value>(&e.data).unwrap()["id"]
                .as_str()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    let got_set: HashSet<Uuid> = ids.iter().copied().collect();
    assert_eq!(got_set.len(), ids.len(), "the tail repeated an event");
    assert_eq!(got_set, want.iter().copied().collect::<HashSet<_>>());
    // And it follows what comes next.
    let more = env.events(5);
    persist(&restored, &more).await?;
    let next = tail.audit_events(5, Duration::from_secs(30)).await?;
    assert_eq!(next.len(), 5);
    drop(tail);
    drop(api);
    restored_pool.close().await;
    drop(cluster);
    Ok(())
}
