//! The ingest path against real NATS and PostgreSQL: deduplication, poison input, scale-out.

use std::collections::HashSet;
use std::time::Duration;

use auditbridge_tests::{TestEnv, eventually};
use uuid::Uuid;

const T: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_sent_twice_is_stored_once() -> anyhow::Result<()> {
    let mut env = TestEnv::new().await?;
    let events = env.events(100);
    env.publish(&events).await?;
    // Re-sent with the same Nats-Msg-Id: JetStream drops it inside its duplicate window.
    let mut acks = Vec::new();
    for e in &events[..10] {
        let ack = env
            .publish_raw(
                &e.subject(&env.prefix),
                serde_json::to_vec(e)?,
                Some(&e.message_id()),
            )
            .await?;
        acks.push(ack.await?);
    }
    assert!(
        acks.iter().all(|a| a.duplicate),
        "JetStream should drop same-id re-sends"
    );
    // Re-sent with a new Nats-Msg-Id (as after the window): JetStream stores it again, in the
    // same batch as the original, so the worker must deduplicate within a batch.
    for e in &events[..30] {
        env.publish_raw(
            &e.subject(&env.prefix),
            serde_json::to_vec(e)?,
            Some(&Uuid::now_v7().to_string()),
        )
        .await?
        .await?;
    }

    let worker = env.spawn_worker("w", &[]).await?;
    env.wait_for_count(100, T).await?;
    env.wait_for_drained(T).await?;
    let expected: HashSet<Uuid> = events.iter().map(|e| e.id).collect();
    assert_eq!(env.stored_ids().await?, expected);
    assert_eq!(
        worker.metric("auditbridge_events_duplicate_total").await?,
        30.0
    );

    // And once more, in a later batch, so the database's ON CONFLICT path is the one that
    // recognises them.
    for e in &events[40..60] {
        env.publish_raw(
            &e.subject(&env.prefix),
            serde_json::to_vec(e)?,
            Some(&Uuid::now_v7().to_string()),
        )
        .await?
        .await?;
    }
    let fresh = env.events(5);
    env.publish(&fresh).await?;
    env.wait_for_count(105, T).await?;
    env.wait_for_drained(T).await?;
    assert_eq!(env.count().await?, 105);
    assert_eq!(
        worker.metric("auditbridge_events_duplicate_total").await?,
        50.0
    );
    assert_eq!(
        worker.metric("auditbridge_events_persisted_total").await?,
        105.0
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_is_dead_lettered_with_a_reason_and_never_blocks_good_events() -> anyhow::Result<()>
{
    let mut env = TestEnv::new().await?;
    env.ensure_stream().await?;
    let p = env.prefix.clone();
    let good = env.events(20);

    let mut valid = serde_json::to_value(&good[0])?;
    valid["id"] = serde_json::json!(Uuid::now_v7());
    let with = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut v = valid.clone();
        f(&mut v);
        serde_json::to_vec(&v).unwrap()
    };
    let tenant = good[0].tenant.clone();
    let action = good[0].action.clone();
    let own = format!("{p}.{tenant}.{action}");
    let poison: Vec<(String, Vec<u8>, &str, &str)> = vec![
        (own.clone(), b"{not json".to_vec(), "not_json", "line 1"),
        (own.clone(), vec![0xff, 0xfe, b'{'], "not_json", "UTF-8"),
        (own.clone(), b"[1,2]".to_vec(), "not_json", "object"),
        (
            own.clone(),
            with(&|v| {
                v.as_object_mut().unwrap().remove("source");
            }),
            "schema",
            "source",
        ),
        (
            own.clone(),
            with(&|v| v["tenat"] = serde_json::json!("typo")),
            "schema",
            "tenat",
        ),
        (
            own.clone(),
            with(&|v| v["outcome"] = serde_json::json!("maybe")),
            "schema",
            "outcome",
        ),
        (
            own.clone(),
            with(&|v| v["metadata"] = serde_json::json!({"note": "a\u{0}b"})),
            "schema",
            "U+0000",
        ),
        (
            format!("{p}.someone-else.{action}"),
            with(&|_| {}),
            "subject_mismatch",
            "someone-else",
        ),
        (
            own.clone(),
            with(&|v| v["metadata"] = serde_json::json!({"blob": "x".repeat(70 * 1024)})),
            "oversize",
            "65536",
        ),
    ];

    // Interleave poison with good events so they share batches.
    let mut expected_kinds = Vec::new();
    for (i, (subject, payload, kind, _)) in poison.iter().enumerate() {
        env.publish(&good[i * 2..i * 2 + 2]).await?;
        env.publish_raw(subject, payload.clone(), None)
            .await?
            .await?;
        expected_kinds.push(*kind);
    }
    env.publish(&good[18..]).await?;

    let worker = env.spawn_worker("w", &[]).await?;
    env.wait_for_count(20, T).await?;
    env.wait_for_drained(T).await?;

    let stored = env.stored_ids().await?;
    assert_eq!(stored, good.iter().map(|e| e.id).collect::<HashSet<_>>());
    let dead = env.dead_letters().await?;
    assert_eq!(dead.len(), poison.len(), "{dead:#?}");
    for ((kind, reason, subject), (want_subject, _, want_kind, hint)) in dead.iter().zip(&poison) {
        assert_eq!(kind, want_kind, "{reason}");
        assert_eq!(subject, want_subject);
        assert!(
            reason.contains(hint),
            "reason {reason:?} should mention {hint:?}"
        );
    }
    // The payload is kept byte for byte, so it can be replayed after a fix.
    let kept: Vec<u8> = sqlx::query_scalar(
        "SELECT payload FROM dead_letters WHERE kind = 'not_json' ORDER BY id LIMIT 1 OFFSET 1",
    )
    .fetch_one(&env.pool)
    .await?;
    assert_eq!(kept, vec![0xff, 0xfe, b'{']);

    // Terminated, not merely acknowledged late: after more than the ack wait (3 s) nothing was
    // delivered again.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let stream = env.js.get_stream(&env.stream).await?;
    let info = stream.consumer_info(&env.consumer).await?;
    assert_eq!(info.num_redelivered, 0);
    assert_eq!(info.num_ack_pending, 0);
    assert_eq!(
        worker.metric("auditbridge_events_received_total").await?,
        (good.len() + poison.len()) as f64
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_on_one_consumer_store_every_event_once() -> anyhow::Result<()> {
    let mut env = TestEnv::new().await?;
    env.ensure_stream().await?;
    let small = [("AUDITBRIDGE_BATCH_SIZE", "200")];
    let workers = vec![
        env.spawn_worker("w1", &small).await?,
        env.spawn_worker("w2", &small).await?,
        env.spawn_worker("w3", &small).await?,
    ];
    for w in &workers {
        w.wait_ready(T).await?;
    }
    let events = env.events(20_000);
    for chunk in events.chunks(2_000) {
        env.publish(chunk).await?;
    }
    env.wait_for_count(20_000, T).await?;
    env.wait_for_drained(T).await?;
    assert_eq!(
        env.stored_ids().await?,
        events.iter().map(|e| e.id).collect::<HashSet<_>>()
    );

    let mut persisted = Vec::new();
    for w in &workers {
        persisted.push(w.metric("auditbridge_events_persisted_total").await?);
    }
    assert_eq!(persisted.iter().sum::<f64>(), 20_000.0, "{persisted:?}");
    assert!(
        persisted.iter().filter(|n| **n > 0.0).count() >= 2,
        "the consumer should spread work across workers: {persisted:?}"
    );
    Ok(())
}

/// The stream takes no message larger than `max_event_bytes` plus header room, also when it
/// was created by an earlier version without that limit: the worker (or any command that
/// provisions the stream) sets it in place, and then JetStream refuses a larger message to its
/// producer at publish time, with an error that says why. Messages stored before the limit
/// are still delivered (each pull allows NATS's `max_payload`) and become `oversize` dead
/// letters, as do messages over `max_event_bytes` but within the header room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_refuses_messages_over_the_event_limit_at_publish() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let subject = format!("{}.acme.document.update", env.prefix);
    // The stream as an earlier version created it.
    env.js
        .create_stream(async_nats::jetstream::stream::Config {
            name: env.stream.clone(),
            subjects: vec![format!("{}.>", env.prefix)],
            storage: async_nats::jetstream::stream::StorageType::File,
            max_age: Duration::from_secs(7 * 86_400),
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
        .await?;
    let mut stream = env.js.get_stream(&env.stream).await?;
    assert_eq!(stream.info().await?.config.max_message_size, -1);
    let before = vec![b'x'; 100 * 1024];
    env.publish_raw(&subject, before, None).await?.await?;

    env.ensure_stream().await?;
    let limit = 65536 + 16 * 1024;
    assert_eq!(
        stream.info().await?.config.max_message_size,
        limit as i32,
        "max_event_bytes (64 KiB by default) plus 16 KiB for headers"
    );
    let refused = env
        .publish_raw(&subject, vec![b'x'; limit + 1], None)
        .await?
        .await
        .expect_err("JetStream takes a message over the limit");
    assert!(
        refused
            .to_string()
            .contains("message size exceeds maximum allowed"),
        "{refused}"
    );
    // Over max_event_bytes, within the header room: stored, and dead-lettered by the worker.
    let within = vec![b'x'; limit - 1024];
    env.publish_raw(&subject, within, None).await?.await?;

    let _worker = env.spawn_worker("w", &[]).await?;
    let dead = eventually("two dead letters", T, async || {
        let dead = env.dead_letters().await?;
        anyhow::ensure!(dead.len() >= 2, "{dead:#?}");
        Ok(dead)
    })
    .await?;
    env.wait_for_drained(T).await?;
    assert_eq!(dead.len(), 2, "{dead:#?}");
    for (kind, reason, _) in &dead {
        assert_eq!(kind, "oversize", "{reason}");
        assert!(reason.contains("65536"), "{reason}");
    }
    Ok(())
}

/// What the worker holds is bounded by bytes, not only by messages: each pull asks for at
/// most `AUDITBRIDGE_BATCH_MAX_BYTES` (or one `max_payload`, if larger), and a batch closes
/// at that many bytes. Here the database is locked, so the worker holds its first batch and
/// pulls no further; 300 refused messages of 40 KiB (12 MB) wait in the stream, and far fewer
/// are delivered to the worker (without the byte bound, a pull of 4,000 messages took them
/// all). Then every one becomes an `oversize` dead letter, in batches of at most 1 MiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_and_batches_are_bounded_by_bytes() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let worker = env
        .spawn_worker(
            "w",
            &[
                ("AUDITBRIDGE_MAX_EVENT_BYTES", "32768"),
                ("AUDITBRIDGE_BATCH_MAX_BYTES", "1048576"),
                ("AUDITBRIDGE_PERSIST_CONCURRENCY", "1"),
                // Held messages must not be redelivered while the test looks.
                ("AUDITBRIDGE_ACK_WAIT", "60s"),
            ],
        )
        .await?;
    worker.wait_ready(T).await?;
    let mut lock = env.pool.begin().await?;
    sqlx::query("LOCK TABLE audit_events, dead_letters IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await?;

    const N: usize = 300;
    const SIZE: usize = 40 * 1024;
    let subject = format!("{}.acme.document.update", env.prefix);
    let mut acks = Vec::new();
    for _ in 0..N {
        acks.push(env.publish_raw(&subject, vec![b'x'; SIZE], None).await?);
    }
    for a in acks {
        a.await?;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let stream = env.js.get_stream(&env.stream).await?;
    let info = stream.consumer_info(&env.consumer).await?;
    // Held: one batch in flight and one closed, waiting (1 MiB each), and what the pulls
    // still had coming (at most 1.5 pulls: the client asks again at half).
    let pull = (1024 * 1024).max(env.nats.server_info().max_payload + 64 * 1024);
    let bound = (2 * 1024 * 1024 + pull * 3 / 2) / SIZE + 1;
    let delivered = info.num_ack_pending as usize;
    assert!(
        delivered > 0 && delivered <= bound,
        "{delivered} messages of {SIZE} bytes delivered and held, at most {bound} expected"
    );
    assert!(info.num_pending > 0, "the rest waits in the stream");
    lock.rollback().await?;

    eventually(&format!("{N} dead letters"), T, async || {
        let dead = env.dead_letters().await?.len();
        anyhow::ensure!(dead >= N, "{dead} of {N} dead letters");
        Ok(())
    })
    .await?;
    env.wait_for_drained(T).await?;
    let dead = env.dead_letters().await?;
    assert_eq!(dead.len(), N);
    assert!(
        dead.iter().all(|(kind, _, _)| kind == "oversize"),
        "{dead:#?}"
    );
    let batches = worker.metric("auditbridge_batch_size_bytes_count").await?;
    let within = worker
        .metric("auditbridge_batch_size_bytes_bucket{le=\"1048576\"}")
        .await?;
    assert!(
        batches >= (N * SIZE / (1024 * 1024)) as f64,
        "{batches} batches"
    );
    assert_eq!(within, batches, "every batch holds at most 1 MiB");
    assert_eq!(
        worker.metric("auditbridge_batch_size_messages_sum").await?,
        N as f64
    );
    Ok(())
}
