//! Redaction (issue 13) against the real services: ingest rules redact values before they are
//! stored, record the paths and the rules' version beside the event, apply to what dead
//! letters keep, key their HMACs stably across restarts, and a redelivery after a rule change
//! is a duplicate, not a conflict; destination rules redact what is sent while the trail keeps
//! the whole event; a rule that cannot be used stops the worker, naming it.

use std::time::Duration;

use anyhow::Context as _;
use auditbridge_event::redact::{HMAC_PREFIX, MASK};
use auditbridge_tests::receiver::Receiver;
use auditbridge_tests::{TestEnv, eventually, until};
use serde_json::{Value, json};
use uuid::Uuid;

const T: Duration = Duration::from_secs(60);
const KEY: &str = "0123456789abcdef0123456789abcdef-redaction";

async fn stored(env: &TestEnv, id: Uuid) -> anyhow::Result<(Value, Option<Value>, String)> {
    let (event, redaction, actor): (Value, Option<Value>, String) =
        sqlx::query_as("SELECT event, redaction, actor_id FROM audit_events WHERE id = $1")
            .bind(id)
            .fetch_one(&env.pool)
            .await
            .with_context(|| format!("event {id}"))?;
    Ok((event, redaction, actor))
}

fn hmac_form(v: &Value) -> bool {
    v.as_str().is_some_and(|s| {
        s.strip_prefix(HMAC_PREFIX)
            .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_rules_redact_before_storing_and_survive_restarts_and_rule_changes()
-> anyhow::Result<()> {
    let mut env = TestEnv::new().await?;
    env.ensure_stream().await?;
    let mut events = env.events(4);
    let tenant = events[0].tenant.clone();
    for e in &mut events {
        e.actor.ip = Some("198.51.100.7".into());
        e.metadata = Some(
            json!({
                "password": "hunter2",
                "card": "4111111111111111",
                "nested": {"Password": "x", "keep": "y"},
                "list": [{"password": "p1", "n": 1}, {"n": 2}]
            })
            .as_object()
            .cloned()
            .unwrap(),
        );
    }
    // Another tenant: the card rule is not theirs.
    events[1].tenant = format!("{tenant}-other");
    let card_rule = json!({"path": "/metadata/card", "action": "mask", "tenant": tenant});
    let rules = |with_card: bool| {
        let mut r = vec![
            json!({"key": "(?i)^password$", "action": "drop"}),
            json!({"path": "/actor/ip", "action": "hmac"}),
        ];
        if with_card {
            r.push(card_rule.clone());
        }
        Value::from(r).to_string()
    };
    let first_rules = rules(true);
    let settings = [
        ("AUDITBRIDGE_REDACT", first_rules.as_str()),
        ("AUDITBRIDGE_REDACT_KEY", KEY),
    ];
    // A schema error carrying a password: its dead letter keeps no password either.
    let mut wrong = serde_json::to_value(&events[3])?;
    wrong["outcome"] = "maybe".into();
    env.publish_raw(
        &events[3].subject(&env.prefix),
        serde_json::to_vec(&wrong)?,
        None,
    )
    .await?
    .await?;
    env.publish(&events[..2]).await?;
    let worker = env.spawn_worker("w1", &settings).await?;
    env.wait_for_count(2, T).await?;
    env.wait_for_drained(T).await?;

    let (e0, r0, actor0) = stored(&env, events[0].id).await?;
    assert_eq!(
        actor0, events[0].actor.id,
        "the actor column is the event's"
    );
    let text = e0.to_string();
    assert!(
        !text.contains("hunter2") && !text.contains("\"p1\""),
        "{text}"
    );
    assert!(e0["metadata"].get("password").is_none());
    assert!(e0["metadata"]["nested"].get("Password").is_none());
    assert_eq!(e0["metadata"]["nested"]["keep"], "y");
    assert_eq!(e0["metadata"]["list"][0], json!({"n": 1}));
    assert_eq!(e0["metadata"]["card"], MASK);
    assert!(hmac_form(&e0["actor"]["ip"]), "{}", e0["actor"]["ip"]);
    let r0 = r0.context("no redaction recorded")?;
    let version = r0["rules"].as_str().unwrap().to_owned();
    assert_eq!(version.len(), 16, "{r0}");
    let mut paths: Vec<&str> = r0["paths"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    paths.sort_unstable();
    assert_eq!(
        paths,
        [
            "/actor/ip",
            "/metadata/card",
            "/metadata/list/0/password",
            "/metadata/nested/Password",
            "/metadata/password"
        ]
    );
    // The other tenant's card is kept; its password is not.
    let (e1, _, _) = stored(&env, events[1].id).await?;
    assert_eq!(e1["metadata"]["card"], "4111111111111111");
    assert!(e1["metadata"].get("password").is_none());
    assert_eq!(
        e1["actor"]["ip"], e0["actor"]["ip"],
        "one key, one value, joinable"
    );
    // The dead letter.
    let payload: Vec<u8> = sqlx::query_scalar("SELECT payload FROM dead_letters")
        .fetch_one(&env.pool)
        .await?;
    let payload = String::from_utf8(payload)?;
    assert!(
        !payload.contains("hunter2") && !payload.contains("198.51.100.7"),
        "{payload}"
    );
    assert!(payload.contains("\"maybe\""), "{payload}");

    // Restarted with the same key: the same HMAC.
    drop(worker);
    let worker = env.spawn_worker("w2", &settings).await?;
    env.publish(&events[2..3]).await?;
    env.wait_for_count(3, T).await?;
    let (e2, _, _) = stored(&env, events[2].id).await?;
    assert_eq!(e2["actor"]["ip"], e0["actor"]["ip"]);
    drop(worker);

    // The rules change (the card rule goes): the same events sent again are duplicates, not
    // conflicts, though the stored body and the new redaction differ.
    let second_rules = rules(false);
    let changed = [
        ("AUDITBRIDGE_REDACT", second_rules.as_str()),
        ("AUDITBRIDGE_REDACT_KEY", KEY),
    ];
    let _worker = env.spawn_worker("w3", &changed).await?;
    for e in &events[..3] {
        env.publish_raw(&e.subject(&env.prefix), serde_json::to_vec(e)?, None)
            .await?
            .await?;
    }
    let (_, _, _) = eventually("the re-sends handled", T, async || {
        let duplicates = _worker.metric("auditbridge_events_duplicate_total").await?;
        anyhow::ensure!(duplicates >= 3.0, "{duplicates} duplicates");
        stored(&env, events[0].id).await
    })
    .await?;
    env.wait_for_drained(T).await?;
    assert_eq!(env.count().await?, 3);
    let kinds: Vec<String> = env.dead_letters().await?.into_iter().map(|d| d.0).collect();
    assert_eq!(
        kinds,
        ["schema"],
        "a re-send after a rule change became a dead letter"
    );
    // A new event under the new rules records the new version.
    env.publish(&events[3..4]).await?;
    env.wait_for_count(4, T).await?;
    let (e3, r3, _) = stored(&env, events[3].id).await?;
    assert_eq!(e3["metadata"]["card"], "4111111111111111");
    let r3 = r3.context("no redaction recorded")?;
    assert_ne!(r3["rules"], version.as_str());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_that_cannot_be_used_stops_the_worker_naming_it() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let cases = [
        (
            json!([{"path": "/a", "action": "drop"}, {"key": "(unclosed", "action": "drop"}]),
            Some(KEY),
            "redaction rule #2: key: not a valid regular expression",
        ),
        (
            json!([{"path": "/tenant", "action": "mask"}]),
            Some(KEY),
            "redaction rule #1: path: \"/tenant\" is a field every event needs",
        ),
        (
            json!([{"path": "/actor/ip", "action": "hmac"}]),
            None,
            "an hmac rule needs AUDITBRIDGE_REDACT_KEY",
        ),
        (
            json!([{"path": "/a", "action": "shred"}]),
            Some(KEY),
            "redaction rule #1: action",
        ),
    ];
    for (rules, key, expected) in cases {
        let rules = rules.to_string();
        let mut vars = vec![("AUDITBRIDGE_REDACT", rules.as_str())];
        if let Some(k) = key {
            vars.push(("AUDITBRIDGE_REDACT_KEY", k));
        }
        let out = tokio::time::timeout(T, env.command(&["worker"], &vars).output())
            .await
            .context("the worker started with a rule that cannot be used")??;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{rules}: {stderr}");
        assert!(stderr.contains(expected), "{rules}: {stderr}");
        assert!(!stderr.contains(KEY), "the key was printed: {stderr}");
    }
    // A destination's rules are named by the destination.
    let dest = json!([{"name": "siem", "type": "http", "params": {
        "url": "http://127.0.0.1:9/in", "redact": [{"path": "nope", "action": "drop"}]}}])
    .to_string();
    let out = tokio::time::timeout(
        T,
        env.command(&["worker"], &[("AUDITBRIDGE_DESTINATIONS", &dest)])
            .output(),
    )
    .await??;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("destination siem: params.redact[0].path"),
        "{stderr}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destination_rules_redact_what_is_sent_and_the_trail_keeps_the_event() -> anyhow::Result<()>
{
    let mut env = TestEnv::new().await?;
    env.ensure_stream().await?;
    let rx = Receiver::start().await?;
    let mut events = env.events(5);
    for (i, e) in events.iter_mut().enumerate() {
        e.metadata = Some(
            json!({
                "password": format!("secret-{i}"),
                "list": [{"card": "4111", "n": 1}, {"card": "5500", "n": 2}]
            })
            .as_object()
            .cloned()
            .unwrap(),
        );
    }
    let dest = json!([{"name": "siem", "type": "http", "params": {
    "url": rx.url("/in"), "start": "earliest",
    "redact": [
        {"key": "password", "action": "drop"},
        {"path": "/metadata/list/*/card", "action": "mask"},
        {"path": "/actor/id", "action": "hmac"}
    ]}}])
    .to_string();
    let _worker = env
        .spawn_worker(
            "w",
            &[
                ("AUDITBRIDGE_DESTINATIONS", &dest),
                ("AUDITBRIDGE_REDACT_KEY", KEY),
            ],
        )
        .await?;
    env.publish(&events).await?;
    until("every event at the receiver", T, || {
        rx.delivered().len() == 5
    })
    .await?;

    let mut sent: Vec<Value> = Vec::new();
    for r in rx.requests().iter().filter(|r| r.answered == 200) {
        for line in String::from_utf8_lossy(&r.body).lines() {
            sent.push(serde_json::from_str(line)?);
        }
    }
    for e in &events {
        let out = sent
            .iter()
            .find(|v| v["id"] == e.id.to_string())
            .context("an event not sent")?;
        assert!(out["metadata"].get("password").is_none(), "{out}");
        assert_eq!(out["metadata"]["list"][1]["card"], MASK, "{out}");
        assert_eq!(out["metadata"]["list"][1]["n"], 2, "{out}");
        assert!(hmac_form(&out["actor"]["id"]), "{out}");
        assert_eq!(out["tenant"], e.tenant.as_str());
        // The trail keeps it whole, and no redaction is recorded for it.
        let (kept, redaction, _) = stored(&env, e.id).await?;
        assert!(
            kept["metadata"]["password"]
                .as_str()
                .is_some_and(|p| p.starts_with("secret-"))
        );
        assert_eq!(kept["actor"]["id"], e.actor.id.as_str());
        assert_eq!(redaction, None);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_shapes_neither_crash_the_worker_nor_hold_a_batch() -> anyhow::Result<()> {
    let mut env = TestEnv::new().await?;
    env.ensure_stream().await?;
    let rules = json!([{"key": "password", "action": "drop"}]).to_string();
    let mut worker = env
        .spawn_worker("w", &[("AUDITBRIDGE_REDACT", rules.as_str())])
        .await?;
    let events = env.events(2);
    let subject = events[0].subject(&env.prefix);
    // Nested 5,000 levels (not JSON to the event parser): a walk per level would overflow
    // the stack; the dead letter keeps its size and hash only.
    let deep = format!(
        "{{\"metadata\":{}1{}, \"password\": \"p\"}}",
        "[".repeat(5000),
        "]".repeat(5000)
    );
    env.publish_raw(&subject, deep.clone().into_bytes(), None)
        .await?
        .await?;
    // Not UTF-8, with a password in it.
    env.publish_raw(&subject, b"{\"password\":\"p\xff\"}".to_vec(), None)
        .await?
        .await?;
    env.publish(&events).await?;
    env.wait_for_count(2, T).await?;
    env.wait_for_drained(T).await?;
    assert!(worker.is_running(), "the worker died");
    let kept: Vec<Vec<u8>> = sqlx::query_scalar("SELECT payload FROM dead_letters ORDER BY id")
        .fetch_all(&env.pool)
        .await?;
    assert_eq!(kept.len(), 2);
    for p in &kept {
        let v: Value = serde_json::from_slice(p)?;
        assert!(
            v["auditbridge_withheld"]["sha256"].as_str().is_some(),
            "{v}"
        );
    }
    // A pointer through an array with a step that is no index removes nothing, and errs not.
    let same: Value = sqlx::query_scalar(
        "SELECT auditbridge_without('{\"metadata\": {\"x\": [1, 2]}}', \
                                    ARRAY['/metadata/x/password', '/metadata/x/7', '/nope/a'])",
    )
    .fetch_one(&env.pool)
    .await?;
    assert_eq!(same, json!({"metadata": {"x": [1, 2]}}));
    Ok(())
}
