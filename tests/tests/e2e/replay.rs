//! `auditbridge dead-letters replay` (issue 13) against the real services: dead letters
//! published again after a fix are stored exactly once, also when replayed twice; a replay
//! refused again becomes a new dead letter naming the one it came from; a corrected payload
//! is checked before it is published; and a producer cannot link a message of its own to a
//! replay, nor change a verdict, by setting the header.

use std::time::Duration;

use anyhow::Context as _;
use auditbridge_store::Store;
use auditbridge_store::dead_letters::REPLAY_HEADER;
use auditbridge_tests::eventually;
use auditbridge_tests::{TempDir, TestEnv};
use sha2::Digest as _;

const T: Duration = Duration::from_secs(60);

async fn run(env: &TestEnv, args: &[&str]) -> anyhow::Result<(Option<i32>, String)> {
    env.run(args, &[]).await
}

/// The dead letters as `dead-letters list --json` shows them, oldest first.
async fn listed(env: &TestEnv) -> anyhow::Result<Vec<serde_json::Value>> {
    let (code, out) = run(env, &["dead-letters", "list", "--json"]).await?;
    anyhow::ensure!(code == Some(0), "{out}");
    let mut list: Vec<serde_json::Value> = serde_json::from_str::<serde_json::Value>(&out)?
        .as_array()
        .cloned()
        .context("an array")?;
    list.reverse();
    Ok(list)
}

async fn id_of_kind(env: &TestEnv, kind: &str) -> anyhow::Result<String> {
    listed(env)
        .await?
        .iter()
        .find(|d| d["kind"] == kind)
        .and_then(|d| d["id"].as_i64())
        .map(|id| id.to_string())
        .with_context(|| format!("no dead letter of kind {kind}"))
}

async fn wait_for_dead_letters(env: &TestEnv, n: usize) -> anyhow::Result<()> {
    eventually(&format!("{n} dead letters"), T, async || {
        let have = env.dead_letters().await?.len();
        anyhow::ensure!(have >= n, "{have} of {n} dead letters");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_after_a_fix_are_stored_once_and_a_refusal_carries_on() -> anyhow::Result<()> {
    let mut env = TestEnv::new().await?;
    env.ensure_stream().await?;
    let mut events = env.events(4);
    // Oversize for a worker allowing 4 KiB; fine for the default 64 KiB.
    let mut big = serde_json::to_value(&events[0])?;
    big["metadata"] = serde_json::json!({ "blob": "x".repeat(6000) });
    env.publish_raw(
        &events[0].subject(&env.prefix),
        serde_json::to_vec(&big)?,
        None,
    )
    .await?
    .await?;
    // A schema error.
    let mut wrong = serde_json::to_value(&events[1])?;
    wrong["outcome"] = "maybe".into();
    env.publish_raw(
        &events[1].subject(&env.prefix),
        serde_json::to_vec(&wrong)?,
        None,
    )
    .await?
    .await?;
    // A stored event, then its id again with other content: a conflict.
    env.publish(&events[2..]).await?;
    let worker = env
        .spawn_worker("w1", &[("AUDITBRIDGE_MAX_EVENT_BYTES", "4096")])
        .await?;
    env.wait_for_count(2, T).await?;
    events[2].reason = Some("changed afterwards".into());
    env.publish_raw(
        &events[2].subject(&env.prefix),
        serde_json::to_vec(&events[2])?,
        None,
    )
    .await?
    .await?;
    wait_for_dead_letters(&env, 3).await?;
    env.wait_for_drained(T).await?;
    drop(worker);

    // No worker runs: JetStream acknowledges, no verdict comes.
    let oversize = id_of_kind(&env, "oversize").await?;
    let (code, out) = run(&env, &["dead-letters", "replay", &oversize, "--wait", "2s"]).await?;
    assert_eq!(code, Some(3), "{out}");
    assert!(out.contains("no_verdict"), "{out}");
    assert!(out.contains("0 stored"), "{out}");
    // Replayed again (by kind: it is still to replay) before any worker took the first: two
    // messages of one event.
    let (code, out) = run(
        &env,
        &["dead-letters", "replay", "--kind", "oversize", "--no-wait"],
    )
    .await?;
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains(&format!("#{oversize} oversize: published")),
        "{out}"
    );

    // The fix: a worker allowing the default size. Both replays get their verdict; the event
    // is stored once.
    let _worker = env.spawn_worker("w2", &[]).await?;
    env.wait_for_count(3, T).await?;
    let verdicts = eventually("both replays decided", T, async || {
        let (_, shown) = run(&env, &["dead-letters", "show", &oversize, "--json"]).await?;
        let shown: serde_json::Value = serde_json::from_str(&shown)?;
        let results: Vec<String> = shown["replays"]
            .as_array()
            .context("replays")?
            .iter()
            .filter_map(|r| r["result"].as_str().map(str::to_owned))
            .collect();
        anyhow::ensure!(results.len() == 2, "{shown}");
        Ok(results)
    })
    .await?;
    let mut sorted = verdicts.clone();
    sorted.sort();
    assert_eq!(sorted, ["duplicate", "stored"], "{verdicts:?}");
    env.wait_for_drained(T).await?;
    assert_eq!(env.count().await?, 3);
    // Run twice more: nothing is published again.
    let (code, out) = run(&env, &["dead-letters", "replay", &oversize]).await?;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("already_replayed"), "{out}");
    let (code, out) = run(&env, &["dead-letters", "replay", "--kind", "oversize"]).await?;
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("no dead letters of kind oversize to replay"),
        "{out}"
    );

    // The conflict replayed as it is: refused again, as a new dead letter naming it.
    let conflict = id_of_kind(&env, "conflict").await?;
    let (code, out) = run(&env, &["dead-letters", "replay", &conflict]).await?;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("failed_again"), "{out}");
    assert!(out.contains("refused again as dead letter #"), "{out}");
    let list = listed(&env).await?;
    let original = list
        .iter()
        .find(|d| d["id"].as_i64() == conflict.parse().ok())
        .unwrap();
    assert_eq!(original["state"], "failed_again", "{original}");
    let again = list
        .iter()
        .find(|d| d["replay_of"].as_i64() == conflict.parse().ok())
        .with_context(|| format!("no dead letter names #{conflict}: {list:?}"))?;
    assert_eq!(again["kind"], "conflict");
    assert_eq!(again["state"], "open");
    // Corrected (a new id): the replay goes to the dead letter that carries on, and is stored.
    let dir = TempDir::new("ab-replay")?;
    let mut fixed = events[2].clone();
    fixed.id = auditbridge_event::Uuid::now_v7();
    let fixed_path = dir.path().join("fixed.json");
    std::fs::write(&fixed_path, serde_json::to_vec(&fixed)?)?;
    let fixed_arg = fixed_path.to_str().unwrap();
    let (code, out) = run(
        &env,
        &["dead-letters", "replay", &conflict, "--payload", fixed_arg],
    )
    .await?;
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains(&format!("stored as event {}", fixed.id)),
        "{out}"
    );
    assert!(
        out.contains(&format!("was refused again on replay as #{}", again["id"])),
        "{out}"
    );

    // A corrected payload that is still wrong is told at once and not published.
    let schema = id_of_kind(&env, "schema").await?;
    let still_wrong = dir.path().join("wrong.json");
    std::fs::write(&still_wrong, serde_json::to_vec(&wrong)?)?;
    let (code, out) = run(
        &env,
        &[
            "dead-letters",
            "replay",
            &schema,
            "--payload",
            still_wrong.to_str().unwrap(),
        ],
    )
    .await?;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("would be refused"), "{out}");
    assert!(out.contains("outcome"), "{out}");
    // On another tenant's subject: refused too (the subject is the dead letter's).
    let mut other = events[1].clone();
    other.tenant = "someone-else".into();
    let other_path = dir.path().join("other.json");
    std::fs::write(&other_path, serde_json::to_vec(&other)?)?;
    let (code, out) = run(
        &env,
        &[
            "dead-letters",
            "replay",
            &schema,
            "--payload",
            other_path.to_str().unwrap(),
        ],
    )
    .await?;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("would be refused on subject"), "{out}");
    let (_, shown) = run(&env, &["dead-letters", "show", &schema, "--json"]).await?;
    let shown: serde_json::Value = serde_json::from_str(&shown)?;
    assert_eq!(
        shown["replays"].as_array().map(Vec::len),
        Some(0),
        "{shown}"
    );
    assert_eq!(shown["state"], "open");
    // --payload is for one dead letter.
    let (code, out) = run(
        &env,
        &[
            "dead-letters",
            "replay",
            &schema,
            &conflict,
            "--payload",
            fixed_arg,
        ],
    )
    .await?;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("give one ID"), "{out}");
    // Fixed: stored.
    let right_path = dir.path().join("right.json");
    std::fs::write(&right_path, serde_json::to_vec(&events[1])?)?;
    let (code, out) = run(
        &env,
        &[
            "dead-letters",
            "replay",
            &schema,
            "--payload",
            right_path.to_str().unwrap(),
        ],
    )
    .await?;
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains(&format!("stored as event {}", events[1].id)),
        "{out}"
    );
    env.wait_for_drained(T).await?;
    assert_eq!(env.count().await?, 5);

    // status: nothing left to replay, by kind.
    let (code, out) = run(&env, &["status", "--json"]).await?;
    assert!(code == Some(0) || code == Some(1), "{out}");
    let status: serde_json::Value = serde_json::from_str(&out).with_context(|| out.clone())?;
    let by_kind = |kind: &str| {
        status["dead_letters"]
            .as_array()
            .and_then(|l| l.iter().find(|d| d["kind"] == kind).cloned())
            .unwrap_or_default()
    };
    assert_eq!(by_kind("oversize")["count"], 0, "{status}");
    assert_eq!(by_kind("oversize")["replayed"], 1, "{status}");
    assert_eq!(by_kind("conflict")["count"], 0, "{status}");
    assert_eq!(by_kind("conflict")["replayed"], 1, "{status}");
    assert_eq!(by_kind("conflict")["failed_again"], 1, "{status}");
    assert_eq!(by_kind("schema")["replayed"], 1, "{status}");
    let (_, text) = run(&env, &["status"]).await?;
    assert!(text.contains("dead letters by kind"), "{text}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_cannot_link_its_messages_to_a_replay() -> anyhow::Result<()> {
    let mut env = TestEnv::new().await?;
    env.ensure_stream().await?;
    let events = env.events(3);
    let subject = events[0].subject(&env.prefix);
    env.publish_raw(&subject, b"not json".to_vec(), None)
        .await?
        .await?;
    let _worker = env.spawn_worker("w", &[]).await?;
    wait_for_dead_letters(&env, 1).await?;
    let original: i64 = id_of_kind(&env, "not_json").await?.parse()?;

    // A replay recorded (as `dead-letters replay` does before it publishes) for this payload.
    let store = Store::connect_lazy(&env.database_url, 1)?;
    let genuine = serde_json::to_vec(&events[0])?;
    let nonce = uuid::Uuid::new_v4();
    let sha: [u8; 32] = sha2::Sha256::digest(&genuine).into();
    store
        .request_replay(original, nonce, true, &sha, "test")
        .await?;

    // A producer that learned the nonce sends its own messages with it: other content.
    let with_header = |payload: Vec<u8>, nonce: String| {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(REPLAY_HEADER, nonce.as_str());
        let js = env.js.clone();
        let subject = subject.clone();
        async move {
            js.publish_with_headers(subject, headers, payload.into())
                .await?
                .await?;
            anyhow::Ok(())
        }
    };
    let forged_event = serde_json::to_vec(&events[1]).map(|v| {
        // Same tenant and action (the subject), another event.
        let mut e: serde_json::Value = serde_json::from_slice(&v).unwrap();
        e["tenant"] = events[0].tenant.clone().into();
        e["action"] = events[0].action.clone().into();
        serde_json::to_vec(&e).unwrap()
    })?;
    with_header(forged_event, nonce.to_string()).await?;
    with_header(b"forged, not json".to_vec(), nonce.to_string()).await?;
    with_header(
        b"{ unknown nonce".to_vec(),
        uuid::Uuid::new_v4().to_string(),
    )
    .await?;
    with_header(
        b"{ not a uuid".to_vec(),
        "'; DROP TABLE dead_letters; --".into(),
    )
    .await?;
    env.wait_for_count(1, T).await?;
    wait_for_dead_letters(&env, 4).await?;
    env.wait_for_drained(T).await?;
    let links: Vec<(i64, Option<i64>)> =
        sqlx::query_as("SELECT id, replay_of FROM dead_letters ORDER BY id")
            .fetch_all(&env.pool)
            .await?;
    assert!(links.iter().all(|(_, of)| of.is_none()), "{links:?}");
    let undecided: (Option<String>, Option<i64>) = sqlx::query_as(
        "SELECT result, new_dead_letter_id FROM dead_letter_replays WHERE nonce = $1",
    )
    .bind(nonce)
    .fetch_one(&env.pool)
    .await?;
    assert_eq!(
        undecided,
        (None, None),
        "a forged message decided the replay"
    );

    // The genuine payload with the nonce: the verdict is recorded; a copy later changes it not.
    with_header(genuine.clone(), nonce.to_string()).await?;
    env.wait_for_count(2, T).await?;
    let decided = eventually("the replay decided", T, async || {
        let r: (Option<String>, Option<uuid::Uuid>) =
            sqlx::query_as("SELECT result, event_id FROM dead_letter_replays WHERE nonce = $1")
                .bind(nonce)
                .fetch_one(&env.pool)
                .await?;
        anyhow::ensure!(r.0.is_some(), "undecided");
        Ok(r)
    })
    .await?;
    assert_eq!(decided, (Some("stored".into()), Some(events[0].id)));
    with_header(genuine, nonce.to_string()).await?;
    env.wait_for_drained(T).await?;
    let after: (Option<String>,) =
        sqlx::query_as("SELECT result FROM dead_letter_replays WHERE nonce = $1")
            .bind(nonce)
            .fetch_one(&env.pool)
            .await?;
    assert_eq!(after.0.as_deref(), Some("stored"));
    assert_eq!(env.count().await?, 2);
    store.close().await;
    Ok(())
}
