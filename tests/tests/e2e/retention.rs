//! Retention (issue 12) against the real PostgreSQL and NATS: the partitioned trail, its
//! classes, and exactly-once by id across partitions.

use std::collections::HashSet;
use std::time::Duration;

use anyhow::Context as _;
use auditbridge_store::RetentionPolicy;
use auditbridge_tests::TestEnv;
use auditbridge_tests::api::{ApiServer, Token};
use uuid::Uuid;

const T: Duration = Duration::from_secs(60);

/// `auditbridge migrate` with `vars`, which must succeed; its output.
async fn migrate(env: &TestEnv, vars: &[(&str, &str)]) -> anyhow::Result<String> {
    let out = env.command(&["migrate"], vars).output().await?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    anyhow::ensure!(out.status.success(), "migrate failed: {text}");
    Ok(text)
}

/// The partition each stored event is in, by id.
async fn partition_of(env: &TestEnv) -> anyhow::Result<Vec<(Uuid, String, i64)>> {
    Ok(sqlx::query_as(
        "SELECT id, tableoid::regclass::text, retention_class FROM audit_events ORDER BY seq",
    )
    .fetch_all(&env.pool)
    .await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resend_after_a_partition_boundary_is_still_a_duplicate() -> anyhow::Result<()> {
    let policy = RetentionPolicy {
        partition_interval: Duration::from_secs(1),
        tenants: vec![("short".into(), Some(Duration::from_secs(3600)))],
        ..Default::default()
    };
    let mut env = TestEnv::with_retention(Some(&policy)).await?;
    let said = migrate(
        &env,
        &[
            ("AUDITBRIDGE_PARTITION_INTERVAL", "1s"),
            (
                "AUDITBRIDGE_RETENTION",
                r#"[{"tenant": "short", "keep": "1h"}]"#,
            ),
        ],
    )
    .await?;
    assert!(said.contains("retention: partitions of 1s"), "{said}");
    let mut events = env.events(60);
    for e in events.iter_mut().take(20) {
        e.tenant = "short".into();
    }
    env.publish(&events).await?;
    let worker = env.spawn_worker("w", &[]).await?;
    env.wait_for_count(60, T).await?;
    env.wait_for_drained(T).await?;
    let first = partition_of(&env).await?;
    // Tenant "short" keeps one hour: its rows are in class 3600, the others in class 0.
    for (id, _, class) in &first {
        let e = events
            .iter()
            .find(|e| e.id == *id)
            .expect("a stored event was sent");
        let want = if e.tenant == "short" { 3600 } else { 0 };
        assert_eq!(
            *class, want,
            "event {id} of tenant {} in class {class}",
            e.tenant
        );
    }

    // Past the boundary: the same events again, with new message ids (so JetStream stores
    // them again), land in the worker while another partition is the current one.
    tokio::time::sleep(Duration::from_millis(2200)).await;
    for e in &events {
        env.publish_raw(
            &e.subject(&env.prefix),
            serde_json::to_vec(e)?,
            Some(&Uuid::now_v7().to_string()),
        )
        .await?
        .await?;
    }
    env.wait_for_drained(T).await?;
    assert_eq!(env.count().await?, 60);
    // At least the 60 re-sends (a loaded machine may also redeliver a batch whose ack came
    // after the 3 s ack wait: more duplicates, never another row).
    let duplicates = worker.metric("auditbridge_events_duplicate_total").await?;
    assert!(duplicates >= 60.0, "{duplicates} duplicates");
    assert_eq!(partition_of(&env).await?, first, "the stored rows changed");
    assert!(env.dead_letters().await?.is_empty());

    // A fresh event after the boundary goes to another partition than the first ones did.
    let late = env.events(1);
    env.publish(&late).await?;
    env.wait_for_count(61, T).await?;
    let now = partition_of(&env).await?;
    let (_, part, _) = now
        .iter()
        .find(|(id, _, _)| *id == late[0].id)
        .expect("stored");
    let earlier: HashSet<&String> = first.iter().map(|(_, p, _)| p).collect();
    assert!(
        !earlier.contains(part),
        "{part} also holds the first events"
    );
    Ok(())
}

/// The events of `tenant` stored now, by id.
async fn ids_of(env: &TestEnv, tenant: &str) -> anyhow::Result<HashSet<Uuid>> {
    Ok(
        sqlx::query_scalar("SELECT id FROM audit_events WHERE tenant = $1")
            .bind(tenant)
            .fetch_all(&env.pool)
            .await?
            .into_iter()
            .collect(),
    )
}

/// `auditbridge <args>` with `vars`, which must succeed; its standard output.
async fn run(env: &TestEnv, args: &[&str], vars: &[(&str, &str)]) -> anyhow::Result<String> {
    let out = env.command(args, vars).output().await?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    anyhow::ensure!(
        out.status.success(),
        "{args:?} failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(text)
}

/// Waits until every stored event is in its tenant's log and checkpointed.
async fn wait_logged(env: &TestEnv) -> anyhow::Result<()> {
    auditbridge_tests::eventually("every event logged and checkpointed", T, async || {
        let (unlogged, uncheckpointed): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM audit_events e \
                     WHERE NOT EXISTS (SELECT 1 FROM log_leaves l WHERE l.event_id = e.id)), \
                    (SELECT count(*) FROM (SELECT tenant, count(*) AS n FROM log_leaves \
                                           GROUP BY tenant) t \
                     WHERE NOT EXISTS (SELECT 1 FROM log_checkpoints c \
                                       WHERE c.tenant = t.tenant AND c.tree_size = t.n))",
        )
        .fetch_one(&env.pool)
        .await?;
        anyhow::ensure!(
            unlogged == 0 && uncheckpointed == 0,
            "{unlogged} unlogged, {uncheckpointed} tenants behind"
        );
        Ok(())
    })
    .await
}

fn at(s: &str) -> time::OffsetDateTime {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).unwrap()
}

/// Tenants of three retentions share the trail; a hold pins part of one tenant's events.
/// Only what is due and not held goes, partition by partition; each tenant gets a signed
/// receipt; an expired id stays a duplicate; released, the held part goes too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_drops_what_is_due_keeps_what_is_held_and_signs_receipts() -> anyhow::Result<()> {
    let policy = RetentionPolicy {
        partition_interval: Duration::from_secs(1),
        tenants: vec![
            ("brief".into(), Some(Duration::from_secs(8))),
            ("long".into(), Some(Duration::from_secs(3600))),
        ],
        ..Default::default()
    };
    let mut env = TestEnv::with_retention(Some(&policy)).await?;
    let (key, path) = crate::log::key_file(&env)?;
    let key_path = path.to_string_lossy().into_owned();
    let retention = r#"[{"tenant": "brief", "keep": "8s"}, {"tenant": "long", "keep": "1h"}]"#;
    let vars = [
        ("AUDITBRIDGE_LOG_KEY_FILE", key_path.as_str()),
        ("AUDITBRIDGE_LOG_CHECKPOINT_INTERVAL", "1s"),
        ("AUDITBRIDGE_PARTITION_INTERVAL", "1s"),
        ("AUDITBRIDGE_RETENTION", retention),
    ];
    let mut worker = env.spawn_worker("w", &vars).await?;
    worker.wait_ready(T).await?;
    let started = std::time::Instant::now();

    // Old events of `brief` (January), then, in a later partition, its February ones, which
    // a hold will cover; `long` and `acme` (forever) beside them.
    let mut old = env.events(40);
    for e in &mut old {
        e.tenant = "brief".into();
        e.occurred_at = at("2026-01-15T00:00:00Z");
    }
    let mut others = env.events(40);
    for (i, e) in others.iter_mut().enumerate() {
        e.tenant = if i % 2 == 0 { "long" } else { "acme" }.into();
    }
    env.publish(&old).await?;
    env.publish(&others).await?;
    env.wait_for_count(80, T).await?;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut held = env.events(30);
    for e in &mut held {
        e.tenant = "brief".into();
        e.occurred_at = at("2026-02-15T00:00:00Z");
    }
    env.publish(&held).await?;
    env.wait_for_count(110, T).await?;
    wait_logged(&env).await?;
    // From here on `auditbridge retention run` expires, not the worker's schedule (which
    // would do the same at its own time; the last part of this test watches it do so).
    worker.signal("KILL");
    worker.wait_exit(T).await?;
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "the worker was too slow to stop before brief's events were due"
    );

    let added = run(
        &env,
        &[
            "hold",
            "add",
            "--tenant",
            "brief",
            "--since",
            "2026-02-01T00:00:00Z",
            "--until",
            "2026-03-01T00:00:00Z",
            "--reason",
            "case 42",
            "--by",
            "counsel",
        ],
        &[],
    )
    .await?;
    assert!(added.contains("#1 tenant brief"), "{added}");
    let listed = run(&env, &["hold", "list", "--json"], &[]).await?;
    let holds: serde_json::Value = serde_json::from_str(&listed)?;
    assert_eq!(holds[0]["created_by"], "counsel", "{holds}");
    assert_eq!(holds[0]["reason"], "case 42");

    // Past `brief`'s eight seconds: the dry run says what would go and changes nothing.
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(started.elapsed())).await;
    let dry = run(&env, &["retention", "run", "--dry-run"], &vars).await?;
    assert!(dry.contains("would go: brief 40 events"), "{dry}");
    assert!(dry.contains("tenant brief held by #1"), "{dry}");
    assert!(dry.contains("tenant long keeps"), "{dry}");
    assert!(dry.contains("tenant acme keeps forever"), "{dry}");
    assert_eq!(env.count().await?, 110);

    // Due but not yet dropped, the old events are no longer served: not in a page of the
    // tenant nor of everyone, not by id, not in a replay of the live tail; the held ones
    // are.
    let reader = auditbridge_store::Store::connect_lazy(&env.database_url, 2)?;
    let page = |tenant: Option<&str>| auditbridge_store::PageQuery {
        filter: auditbridge_store::EventFilter {
            tenant: tenant.map(str::to_owned),
            ..Default::default()
        },
        order: auditbridge_store::Order::Asc,
        after: None,
        limit: 1000,
    };
    let served: HashSet<Uuid> = reader
        .page(&page(Some("brief")))
        .await?
        .iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(served, held.iter().map(|e| e.id).collect::<HashSet<_>>());
    let everyone = reader.page(&page(None)).await?;
    assert_eq!(everyone.len(), 70, "an admin's page serves expired events");
    assert!(reader.event(old[0].id, None).await?.is_none());
    assert!(reader.event(held[0].id, None).await?.is_some());
    let replay = reader
        .tail(&auditbridge_store::Position::start(), None, 1000)
        .await?;
    assert_eq!(replay.len(), 70, "the live tail replays expired events");
    reader.close().await;

    // Nor exported: a bundle would miss their payloads before a receipt vouches for them.
    let refused = env
        .command(
            &[
                "log",
                "export",
                "--tenant",
                "brief",
                "--out",
                "/nonexistent/never",
            ],
            &[("AUDITBRIDGE_LOG_KEY_FILE", key_path.as_str())],
        )
        .output()
        .await?;
    let said = String::from_utf8_lossy(&refused.stderr).into_owned();
    assert_eq!(refused.status.code(), Some(3), "{said}");
    assert!(said.contains("40 events past its retention"), "{said}");

    let ran = run(&env, &["retention", "run"], &vars).await?;
    assert!(ran.contains("expired 1 partition(s), 40 event(s)"), "{ran}");
    let brief = ids_of(&env, "brief").await?;
    assert_eq!(brief, held.iter().map(|e| e.id).collect::<HashSet<_>>());
    assert_eq!(ids_of(&env, "long").await?.len(), 20);
    assert_eq!(ids_of(&env, "acme").await?.len(), 20);

    // The receipt: signed by the log's key, for the 40 events and their log indexes.
    let receipts = auditbridge_store::Store::from_pool(env.pool.clone())
        .receipts(Some("brief"))
        .await?;
    assert_eq!(receipts.len(), 1, "{receipts:?}");
    let r = &receipts[0];
    assert_eq!((r.events, r.keep_s, r.signed), (40, 8, true));
    let text = auditbridge_tlog::open_note(&r.note, &key.verifier())?;
    assert!(text.starts_with("audit.test/log/brief\nauditbridge retention receipt v1\n"));
    assert!(text.contains("\nevents 40\n"), "{text}");
    assert!(text.contains("\nholds none\n"), "{text}");
    let logged: Vec<i64> =
        sqlx::query_scalar("SELECT log_index FROM log_leaves WHERE event_id = ANY($1) ORDER BY 1")
            .bind(old.iter().map(|e| e.id).collect::<Vec<_>>())
            .fetch_all(&env.pool)
            .await?;
    assert_eq!(logged.len(), 40, "the leaves of expired events stay");
    let ranges = auditbridge_store::retention::parse_multirange(&r.log_indexes).unwrap();
    let covered: Vec<i64> = ranges.iter().flat_map(|&(a, b)| a..b).collect();
    assert_eq!(covered, logged);

    // The API serves the receipt to the tenant's token, never to another tenant's; over
    // HTTP, too, the expired events are gone and the held ones served.
    let brief_token = Token::tenant("b", "brief", &["read"]);
    let long_token = Token::tenant("l", "long", &["read"]);
    let api = ApiServer::start(&env, &[&brief_token, &long_token], &[]).await?;
    let (code, body) = api
        .get("/v1/log/receipts?tenant=brief", Some(&brief_token))
        .await?;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["receipts"].as_array().map(Vec::len), Some(1), "{body}");
    assert_eq!(body["receipts"][0]["events"], 40, "{body}");
    assert_eq!(body["receipts"][0]["note"], r.note.as_str());
    let (code, _) = api
        .get("/v1/log/receipts?tenant=brief", Some(&long_token))
        .await?;
    assert_eq!(code, 403);
    let pages = api.all_pages("tenant=brief", &brief_token, 100).await?;
    assert_eq!(pages.len(), 30);
    drop(api);
    let status = run(&env, &["status", "--json"], &[]).await?;
    let status: serde_json::Value = serde_json::from_str(&status)?;
    assert_eq!(status["retention"]["receipts"], 1, "{status}");
    assert_eq!(status["retention"]["holds_in_force"], 1, "{status}");
    assert_eq!(
        status["retention"]["partition_interval_seconds"], 1,
        "{status}"
    );
    assert!(
        status["retention"]["oldest"]
            .as_array()
            .is_some_and(|o| o.iter().any(|t| t["tenant"] == "brief")),
        "{status}"
    );

    // `log audit` accepts the missing payloads the receipt covers; so does `log verify` of an
    // exported bundle, with no database, and the checkpoints signed before still hold.
    let key_vars = [("AUDITBRIDGE_LOG_KEY_FILE", key_path.as_str())];
    let audit = env.command(&["log", "audit"], &key_vars).output().await?;
    let said = String::from_utf8_lossy(&audit.stdout).into_owned()
        + &String::from_utf8_lossy(&audit.stderr);
    assert_eq!(audit.status.code(), Some(0), "{said}");
    assert!(
        said.contains("(40 expired under signed retention receipts)"),
        "{said}"
    );
    let bundle = std::env::temp_dir().join(format!("ab-bundle-{}", env.tag));
    let bundle_s = bundle.to_string_lossy().into_owned();
    run(
        &env,
        &["log", "export", "--tenant", "brief", "--out", &bundle_s],
        &key_vars,
    )
    .await?;
    let verified = tokio::process::Command::new(auditbridge_tests::binary())
        .args([
            "log",
            "verify",
            &bundle_s,
            "--key",
            &key.verifier().to_string(),
        ])
        .env_clear()
        .output()
        .await?;
    assert!(
        verified.status.success(),
        "{}{}",
        String::from_utf8_lossy(&verified.stdout),
        String::from_utf8_lossy(&verified.stderr)
    );
    // So does the independent verifier, written from the specifications.
    let python = tokio::process::Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/scripts/verify_bundle.py"
        ))
        .arg(&bundle)
        .arg(key.verifier().to_string())
        .output()
        .await?;
    assert!(
        python.status.success(),
        "{}{}",
        String::from_utf8_lossy(&python.stdout),
        String::from_utf8_lossy(&python.stderr)
    );
    // A receipt altered in the bundle no longer vouches: verify finds the missing events.
    let receipts = std::fs::read_to_string(bundle.join("receipts.jsonl"))?;
    std::fs::write(
        bundle.join("receipts.jsonl"),
        receipts.replace("events 40", "events 41"),
    )?;
    let altered = tokio::process::Command::new(auditbridge_tests::binary())
        .args([
            "log",
            "verify",
            &bundle_s,
            "--key",
            &key.verifier().to_string(),
        ])
        .env_clear()
        .output()
        .await?;
    assert_eq!(altered.status.code(), Some(1), "{altered:?}");
    std::fs::remove_dir_all(&bundle).ok();

    // A row removed outside expiry (a superuser past the triggers) is still found.
    let victim = others.iter().find(|e| e.tenant == "acme").unwrap().id;
    let part: String = sqlx::query_scalar(
        "SELECT tableoid::regclass::text FROM audit_events WHERE tenant = 'acme' LIMIT 1",
    )
    .fetch_one(&env.pool)
    .await?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "ALTER TABLE {part} DISABLE TRIGGER audit_events_no_update_delete; \
         DELETE FROM audit_events WHERE id = '{victim}'; \
         ALTER TABLE {part} ENABLE ALWAYS TRIGGER audit_events_no_update_delete"
    )))
    .execute(&env.pool)
    .await?;
    let audit = env.command(&["log", "audit"], &key_vars).output().await?;
    let said = String::from_utf8_lossy(&audit.stdout).into_owned();
    assert_eq!(audit.status.code(), Some(1), "{said}");
    assert!(
        said.contains(&format!("event {victim}: the event is gone")),
        "{said}"
    );

    // An expired event sent again is not stored again: it is kept as a dead letter.
    let worker = env.spawn_worker("w2", &vars).await?;
    worker.wait_ready(T).await?;
    env.publish_raw(
        &old[0].subject(&env.prefix),
        serde_json::to_vec(&old[0])?,
        Some(&Uuid::now_v7().to_string()),
    )
    .await?
    .await?;
    env.wait_for_drained(T).await?;
    let dead = env.dead_letters().await?;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(dead[0].1.contains("has expired"), "{dead:?}");
    assert_eq!(env.count().await?, 69);

    // Released, the held events go at the worker's next scheduled run.
    let released = run(&env, &["hold", "release", "1", "--by", "counsel"], &[]).await?;
    assert!(released.contains("released by counsel"), "{released}");
    auditbridge_tests::eventually("the worker expires the released events", T, async || {
        let left = ids_of(&env, "brief").await?.len();
        anyhow::ensure!(left == 0, "{left} of brief's events left");
        Ok(())
    })
    .await?;
    assert_eq!(env.count().await?, 39);
    // The counter moves when the worker has its commit's answer, a moment after the rows
    // are gone for everyone else.
    auditbridge_tests::eventually("the worker counts the events it expired", T, async || {
        let expired = worker
            .metric("auditbridge_retention_events_expired_total")
            .await?;
        anyhow::ensure!(expired == 30.0, "{expired} counted");
        Ok(())
    })
    .await?;
    drop(worker);
    std::fs::remove_file(path).ok();
    Ok(())
}

/// A hold added after a run listed its candidates, but before it dropped the partition,
/// wins; and the guarded path refuses a drop of a held partition even to a caller that
/// ignores what it was told.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_added_during_a_run_wins_and_the_guarded_path_checks_it_itself() -> anyhow::Result<()>
{
    let policy = RetentionPolicy {
        partition_interval: Duration::from_secs(1),
        default_keep: Some(Duration::from_secs(1)),
        ..Default::default()
    };
    let mut env = TestEnv::with_retention(Some(&policy)).await?;
    let store = auditbridge_store::Store::connect_lazy(&env.database_url, 2)?;
    let events = env.events(25);
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
    tokio::time::sleep(Duration::from_millis(2500)).await;

    let candidates = store.expiry_candidates().await?;
    let due: Vec<_> = candidates
        .iter()
        .filter(|c| c.all_due() && !c.tenants.is_empty())
        .collect();
    assert!(!due.is_empty(), "{candidates:?}");
    // Meanwhile, a hold on one of the tenants in it.
    let tenant = &due[0].tenants[0].0;
    store
        .add_hold(tenant, None, None, "litigation", "counsel")
        .await?;
    let expiry = store.begin_expiry(&due[0].partition).await?;
    assert!(
        expiry.tenants.iter().any(|t| !t.held_by.is_empty()),
        "{:?}",
        expiry.tenants
    );
    let receipts: Vec<auditbridge_store::retention::Receipt> = expiry
        .tenants
        .iter()
        .map(|t| auditbridge_store::retention::Receipt {
            tenant: t.tenant.clone(),
            note: "ignored what it was told\n".into(),
            tree_size: None,
            root: None,
        })
        .collect();
    let refused = expiry
        .commit(&receipts, false, Duration::from_millis(50), 2)
        .await
        .expect_err("a held partition was dropped");
    assert!(refused.to_string().contains("held by"), "{refused}");
    assert_eq!(env.count().await?, 25);
    let receipts = store.receipts(None).await?;
    assert!(receipts.is_empty(), "{receipts:?}");

    // The worker's run says so, and keeps it.
    let stop = tokio_util::sync::CancellationToken::new();
    let report = auditbridge_worker::retention::expire(&store, None, false, &stop).await?;
    let kept = report
        .partitions
        .iter()
        .find(|p| p.partition == due[0].partition.name)
        .expect("reported");
    assert!(
        matches!(&kept.outcome, auditbridge_worker::retention::Outcome::Kept(w) if w.contains("held by #1")),
        "{kept:?}"
    );
    store.close().await;
    Ok(())
}

/// A `retention run` SIGKILLed at any moment leaves all or nothing: the partition with all
/// its rows and no receipt, or no partition and its receipts; the next run finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_killed_mid_way_leaves_all_or_nothing_and_the_next_one_finishes() -> anyhow::Result<()>
{
    let policy = RetentionPolicy {
        partition_interval: Duration::from_secs(2),
        default_keep: Some(Duration::from_secs(1)),
        ..Default::default()
    };
    let env = TestEnv::with_retention(Some(&policy)).await?;
    // Enough rows that counting them takes a while, in one partition.
    sqlx::query(
        "INSERT INTO audit_events \
             (id, tenant, action, outcome, occurred_at, actor_id, source, event, retention_class) \
         SELECT gen_random_uuid(), 't' || (g % 7), 'bulk.write', 'success', now(), 'u', 's', \
                '{}', 1 FROM generate_series(1, 150000) g",
    )
    .execute(&env.pool)
    .await?;
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let vars = [
        ("AUDITBRIDGE_PARTITION_INTERVAL", "2s"),
        ("AUDITBRIDGE_RETENTION", "1s"),
    ];
    let state = || async {
        let (rows, receipts, pending): (i64, i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM audit_events), \
                    (SELECT coalesce(sum(events), 0)::int8 FROM retention_receipts), \
                    (SELECT count(*) FROM retention_pending)",
        )
        .fetch_one(&env.pool)
        .await?;
        anyhow::Ok((rows, receipts, pending))
    };
    let mut killed_before = 0;
    for delay in [30u64, 120, 300] {
        let mut child = env.command(&["retention", "run"], &vars).spawn()?;
        tokio::time::sleep(Duration::from_millis(delay)).await;
        let _ = child.start_kill();
        let _ = child.wait().await;
        let (rows, receipts, pending) = state().await?;
        assert_eq!(pending, 0, "a killed run left pending counts");
        assert!(
            (rows, receipts) == (150_000, 0) || (rows, receipts) == (0, 150_000),
            "half done after a kill at {delay} ms: {rows} rows, receipts for {receipts}"
        );
        if rows == 150_000 {
            killed_before += 1;
        } else {
            break;
        }
    }
    eprintln!("{killed_before} run(s) killed before their commit");
    run(&env, &["retention", "run"], &vars).await?;
    assert_eq!(state().await?, (0, 150_000, 0));
    Ok(())
}

/// Relays, the live tail and the query API keep working while partitions are dropped under
/// them: no error, and nothing that remains is skipped (every event of the tenant that keeps
/// forever is delivered once, tailed once, and paged).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_go_on_without_error_or_gap_while_partitions_are_dropped() -> anyhow::Result<()> {
    use auditbridge_tests::receiver::Receiver;
    let policy = RetentionPolicy {
        partition_interval: Duration::from_secs(1),
        tenants: vec![("fleeting".into(), Some(Duration::from_secs(1)))],
        ..Default::default()
    };
    let mut env = TestEnv::with_retention(Some(&policy)).await?;
    env.ensure_stream().await?;
    let rx = Receiver::start().await?;
    let dest = serde_json::json!([{"name": "siem", "type": "http", "params": {
        "url": rx.url("/siem"), "start": "earliest", "max_batch_events": 50,
        "filter": {"tenants": ["steady"]}
    }}])
    .to_string();
    let vars = [
        ("AUDITBRIDGE_PARTITION_INTERVAL", "1s"),
        (
            "AUDITBRIDGE_RETENTION",
            r#"[{"tenant": "fleeting", "keep": "1s"}]"#,
        ),
        ("AUDITBRIDGE_DESTINATIONS", dest.as_str()),
        ("AUDITBRIDGE_BATCH_SIZE", "40"),
    ];
    let worker = env.spawn_worker("w", &vars).await?;
    worker.wait_ready(T).await?;
    let admin = Token::admin("admin", &["read"]);
    let steady_token = Token::tenant("s", "steady", &["read"]);
    let api = ApiServer::start(&env, &[&admin, &steady_token], &[]).await?;
    let mut tail = api.stream("tenant=steady", &steady_token, None).await?;
    tail.caught_up(T).await?;

    // Eight seconds of both tenants, in small batches: `fleeting`'s partitions expire and
    // are dropped (one a second) while everything reads.
    let mut steady = Vec::new();
    let started = std::time::Instant::now();
    let mut pages_ok = 0;
    while started.elapsed() < Duration::from_secs(8) {
        let mut batch = env.events(20);
        for (i, e) in batch.iter_mut().enumerate() {
            e.tenant = if i % 2 == 0 { "steady" } else { "fleeting" }.into();
        }
        env.publish(&batch).await?;
        steady.extend(batch.into_iter().filter(|e| e.tenant == "steady"));
        let (code, body) = api
            .get("/v1/events?tenant=fleeting&limit=100", Some(&admin))
            .await?;
        assert_eq!(
            code, 200,
            "a page failed while partitions were dropped: {body}"
        );
        let (code, body) = api
            .get("/v1/stats?tenant=fleeting&bucket=1h", Some(&admin))
            .await?;
        assert_eq!(
            code, 200,
            "stats failed while partitions were dropped: {body}"
        );
        pages_ok += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let want: HashSet<Uuid> = steady.iter().map(|e| e.id).collect();
    auditbridge_tests::until("every steady event delivered", T, || {
        rx.delivered().is_superset(&want)
    })
    .await?;
    let tailed = tail.audit_events(want.len(), T).await?;
    let tailed_ids: Vec<Uuid> = tailed
        .iter()
        .map(|s| {
            serde_json::from_str::<serde_json::Value>(&s.data).unwrap()["id"]
                .as_str()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    assert_eq!(
        tailed_ids.len(),
        want.len(),
        "the tail repeated or missed events"
    );
    assert_eq!(tailed_ids.iter().copied().collect::<HashSet<_>>(), want);
    let paged = api.all_pages("tenant=steady", &steady_token, 100).await?;
    assert_eq!(paged.len(), want.len());
    assert_eq!(
        rx.delivered_count(),
        want.len(),
        "a steady event was delivered twice"
    );

    // Partitions were dropped meanwhile, with receipts, and the relay never failed.
    let dropped = worker
        .metric("auditbridge_retention_partitions_dropped_total")
        .await?;
    assert!(dropped >= 2.0, "only {dropped} partitions dropped in 8 s");
    let (_, metrics) = worker.get("/metrics").await?;
    let failures: f64 = metrics
        .lines()
        .filter(|l| {
            l.starts_with("auditbridge_destination_failures_total")
                || l.starts_with("auditbridge_log_sequencer_failures_total")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(
        failures, 0.0,
        "the relay or the sequencer failed while partitions were dropped"
    );
    eprintln!("{pages_ok} rounds of pages and stats, {dropped} partitions dropped");
    Ok(())
}

/// The guarded path as a hostile writer calls it (an attacker's review of 0008/0009, fixed
/// in 0010): every crafted call is refused and nothing leaves the trail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crafted_calls_of_the_guarded_path_are_refused() -> anyhow::Result<()> {
    use sqlx::Connection as _;
    let policy = RetentionPolicy {
        partition_interval: Duration::from_secs(1),
        default_keep: Some(Duration::from_secs(1)),
        tenants: vec![("forever".into(), None)],
        ..Default::default()
    };
    let mut env = TestEnv::with_retention(Some(&policy)).await?;
    let writer_url = crate::roles::url_as(&env, auditbridge_store::roles::WRITER);
    let store = auditbridge_store::Store::connect_lazy(&writer_url, 2)?;
    let mut events = env.events(30);
    for (i, e) in events.iter_mut().enumerate() {
        e.tenant = ["a", "b", "forever"][i % 3].into();
    }
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
    // Two partitions: one with a tenant kept forever, one of `a` and `b` only.
    store.persist(&rows[..20], &[]).await?;
    let ab: Vec<auditbridge_store::NewEvent<'_>> = rows
        .iter()
        .filter(|r| r.event.tenant != "forever")
        .copied()
        .collect();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    store.persist(&ab[ab.len() - 3..], &[]).await?;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let count = env.count().await?;
    let mut w = sqlx::PgConnection::connect(&writer_url).await?;
    let refused = |sql: String| {
        let url = writer_url.clone();
        async move {
            let mut c = sqlx::PgConnection::connect(&url).await?;
            let r = sqlx::raw_sql(sqlx::AssertSqlSafe(sql.clone()))
                .execute(&mut c)
                .await;
            c.close().await.ok();
            anyhow::ensure!(r.is_err(), "`{sql}` was allowed");
            anyhow::Ok(r.unwrap_err().to_string())
        }
    };
    // A temporary table that would shadow pg_locks or a policy table: none may be made.
    let e = refused("CREATE TEMP TABLE pg_locks (x int)".into()).await?;
    assert!(e.contains("permission denied"), "{e}");
    // A live partition cannot be begun (which would hold ingest into it).
    store.ensure_partitions().await?;
    let live: String = sqlx::query_scalar(
        "SELECT name FROM audit_partitions WHERE class = 1 AND lower_at > now() \
         ORDER BY lower_at LIMIT 1",
    )
    .fetch_one(&env.pool)
    .await?;
    let e = refused(format!("SELECT * FROM auditbridge_expiry_begin('{live}')")).await?;
    assert!(e.contains("has not ended"), "{e}");
    // A snapshot older than the locks.
    let candidates = store.expiry_candidates().await?;
    let due = candidates
        .iter()
        .find(|c| c.all_due() && c.tenants.len() >= 2)
        .expect("a due partition of two tenants");
    let part = &due.partition.name;
    let e = refused(format!(
        "BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT * FROM auditbridge_expiry_begin('{part}')"
    ))
    .await?;
    assert!(e.contains("READ COMMITTED"), "{e}");
    // Receipts that are not exactly one per counted tenant: a NULL, a missing one, a repeat.
    let t0 = &due.tenants[0].0;
    for tenants in [
        format!("ARRAY['{t0}', NULL]"),
        format!("ARRAY['{t0}']"),
        format!("ARRAY['{t0}', '{t0}']"),
    ] {
        let n = if tenants.contains("NULL") || tenants.matches('\'').count() == 4 {
            2
        } else {
            1
        };
        let notes = vec!["'n'"; n].join(", ");
        let e = refused(format!(
            "BEGIN; SELECT * FROM auditbridge_expiry_begin('{part}'); \
             SELECT auditbridge_expire_partition('{part}', {tenants}, ARRAY[{notes}], false, \
                 ARRAY[{}]::bigint[], ARRAY[{}]::bytea[], 50, 1)",
            vec!["NULL"; n].join(", "),
            vec!["NULL"; n].join(", "),
        ))
        .await?;
        assert!(e.contains("needs one receipt"), "{tenants}: {e}");
    }
    // Under a caller's time zone and date style, partitions still get the bounds they are
    // listed with (a row of now goes where the list says).
    sqlx::raw_sql(
        "SET TimeZone = 'EST-167'; SET DateStyle = 'SQL, DMY'; \
         SELECT auditbridge_ensure_partitions()",
    )
    .execute(&mut w)
    .await?;
    let (listed, routed): (String, String) = sqlx::query_as(
        "WITH r AS (INSERT INTO audit_events (id, tenant, action, outcome, occurred_at, \
                        actor_id, source, event, retention_class) \
                    VALUES (gen_random_uuid(), 'probe', 'x.y', 'success', now(), 'u', 's', \
                            '{}', 0) RETURNING tableoid::regclass::text AS part, received_at) \
         SELECT p.name, r.part FROM r JOIN audit_partitions p \
           ON p.class = 0 AND p.lower_at <= r.received_at AND p.upper_at > r.received_at",
    )
    .fetch_one(&env.pool)
    .await?;
    assert_eq!(listed, routed);
    w.close().await?;
    assert_eq!(env.count().await?, count + 1, "a crafted call removed rows");
    store.close().await;
    Ok(())
}

/// A trail written before partitioning (migrations up to 0007) migrates without losing or
/// duplicating a row: the old table becomes the legacy partition, every id stays a
/// duplicate, `seq` goes on where it was, partitions are made (the legacy bound is not on a
/// second), and new events land in partitions of their own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trail_of_before_partitioning_migrates_without_losing_or_repeating_a_row()
-> anyhow::Result<()> {
    use sqlx::Connection as _;
    let mut env = TestEnv::new().await?;
    let name = format!("ab_test_{}_old", env.tag);
    let url = env
        .database_url
        .replace(env.database_url.rsplit('/').next().unwrap(), &name);
    let mut admin = sqlx::PgConnection::connect(&env.database_url).await?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
        .execute(&mut admin)
        .await?;
    let result = async {
        let pool = sqlx::PgPool::connect(&url).await?;
        let full = &auditbridge_store::MIGRATOR;
        let before = sqlx::migrate::Migrator {
            migrations: std::borrow::Cow::Owned(
                full.migrations
                    .iter()
                    .filter(|m| m.version <= 7)
                    .cloned()
                    .collect(),
            ),
            ignore_missing: false,
            locking: true,
            no_tx: false,
            table_name: full.table_name.clone(),
            create_schemas: full.create_schemas.clone(),
        };
        before.run(&pool).await?;
        let old = env.events(500);
        for e in &old {
            sqlx::query(
                "INSERT INTO audit_events (id, tenant, action, outcome, occurred_at, actor_id, \
                     source, event) VALUES ($1, $2, $3, 'success', $4, 'u', 's', $5::jsonb)",
            )
            .bind(e.id)
            .bind(&e.tenant)
            .bind(&e.action)
            .bind(e.occurred_at)
            .bind(serde_json::to_string(e)?)
            .execute(&pool)
            .await?;
        }
        let (old_rows, old_max): (i64, i64) =
            sqlx::query_as("SELECT count(*), max(seq) FROM audit_events")
                .fetch_one(&pool)
                .await?;
        // The rest of the migrations, as an operator runs them, bounded in time.
        let out = tokio::time::timeout(
            Duration::from_secs(120),
            env.command(&["migrate"], &[("AUDITBRIDGE_DATABASE_URL", url.as_str())])
                .output(),
        )
        .await
        .context("migrate did not finish within 120 s")??;
        anyhow::ensure!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let (rows, ids, legacy): (i64, i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM audit_events), (SELECT count(*) FROM audit_event_ids), \
                    (SELECT count(*) FROM audit_events_legacy)",
        )
        .fetch_one(&pool)
        .await?;
        assert_eq!((rows, ids, legacy), (old_rows, old_rows, old_rows));
        // Old ids are duplicates; new events are stored after the old ones, elsewhere.
        let store = auditbridge_store::Store::connect_lazy(&url, 2)?;
        let raws: Vec<Vec<u8>> = old.iter().map(|e| serde_json::to_vec(e).unwrap()).collect();
        let again: Vec<auditbridge_store::NewEvent<'_>> = old
            .iter()
            .zip(&raws)
            .map(|(event, raw)| auditbridge_store::NewEvent {
                event,
                raw,
                redaction: None,
            })
            .collect();
        let done = store.persist(&again, &[]).await?;
        assert_eq!((done.inserted, done.duplicates), (0, 500));
        let new = env.events(50);
        let raws: Vec<Vec<u8>> = new.iter().map(|e| serde_json::to_vec(e).unwrap()).collect();
        let rows: Vec<auditbridge_store::NewEvent<'_>> = new
            .iter()
            .zip(&raws)
            .map(|(event, raw)| auditbridge_store::NewEvent {
                event,
                raw,
                redaction: None,
            })
            .collect();
        assert_eq!(store.persist(&rows, &[]).await?.inserted, 50);
        let (min_new, in_legacy): (i64, i64) = sqlx::query_as(
            "SELECT min(seq) FILTER (WHERE tableoid <> 'audit_events_legacy'::regclass), \
                    count(*) FILTER (WHERE tableoid = 'audit_events_legacy'::regclass) \
             FROM audit_events",
        )
        .fetch_one(&pool)
        .await?;
        assert!(
            min_new > old_max,
            "seq went back: {min_new} after {old_max}"
        );
        assert_eq!(
            in_legacy, old_rows,
            "a new event went into the legacy table"
        );
        // And the maintenance goes on (a worker's call, again).
        assert_eq!(store.ensure_partitions().await?, 0);
        store.close().await;
        pool.close().await;
        anyhow::Ok(())
    }
    .await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
    )))
    .execute(&mut admin)
    .await?;
    result
}

/// Dead letters have a retention of their own: older ones go at the next run, newer ones
/// stay; and a tenant whose policy shortens has its older events (in the partitions of its
/// old class, shared with tenants that keep longer) hidden at once, and kept until their
/// partition goes, which the dry run says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_expire_by_their_own_retention_and_a_shortened_policy_hides_at_once()
-> anyhow::Result<()> {
    let policy = RetentionPolicy {
        partition_interval: Duration::from_secs(1),
        dead_letter_keep: Some(Duration::from_secs(2)),
        ..Default::default()
    };
    let mut env = TestEnv::with_retention(Some(&policy)).await?;
    env.ensure_stream().await?;
    let worker = env.spawn_worker("w", &[]).await?;
    worker.wait_ready(T).await?;
    let mut events = env.events(20);
    for (i, e) in events.iter_mut().enumerate() {
        e.tenant = if i % 2 == 0 { "shortened" } else { "steady" }.into();
    }
    env.publish(&events).await?;
    env.publish_raw(&events[0].subject(&env.prefix), b"{not json".to_vec(), None)
        .await?
        .await?;
    env.wait_for_count(20, T).await?;
    env.wait_for_drained(T).await?;
    assert_eq!(env.dead_letters().await?.len(), 1);
    drop(worker);

    // `shortened` now keeps one second; its events stay in class 0, with `steady`'s.
    let vars = [
        ("AUDITBRIDGE_PARTITION_INTERVAL", "1s"),
        ("AUDITBRIDGE_DEAD_LETTER_RETENTION", "2s"),
        (
            "AUDITBRIDGE_RETENTION",
            r#"[{"tenant": "shortened", "keep": "1s"}]"#,
        ),
    ];
    migrate(&env, &vars).await?;
    tokio::time::sleep(Duration::from_millis(2600)).await;
    let reader = auditbridge_store::Store::connect_lazy(&env.database_url, 1)?;
    let page = auditbridge_store::PageQuery {
        filter: auditbridge_store::EventFilter {
            tenant: Some("shortened".into()),
            ..Default::default()
        },
        order: auditbridge_store::Order::Asc,
        after: None,
        limit: 100,
    };
    assert!(
        reader.page(&page).await?.is_empty(),
        "shortened's events are still served"
    );
    reader.close().await;
    let dry = run(&env, &["retention", "run", "--dry-run"], &vars).await?;
    assert!(dry.contains("tenant steady keeps forever"), "{dry}");
    let ran = run(&env, &["retention", "run"], &vars).await?;
    assert!(ran.contains("1 dead letter(s)"), "{ran}");
    assert!(env.dead_letters().await?.is_empty());
    assert_eq!(
        env.count().await?,
        20,
        "a partition shared with steady was dropped"
    );
    Ok(())
}
