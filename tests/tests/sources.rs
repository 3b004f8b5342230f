//! Sources for systems that cannot speak NATS, end to end: HTTP ingest and signed webhooks
//! through `auditbridge serve`, JSONL files through `auditbridge tail-file`, each into the
//! real JetStream and through a real worker into PostgreSQL, asserted by id.

use std::collections::HashSet;
use std::io::Write as _;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::bail;
use auditbridge_event::Event;
use auditbridge_sources::signature::sign;
use auditbridge_sources::{SourceKind, parse_sources};
use auditbridge_tests::TestEnv;
use auditbridge_tests::api::Token;
use auditbridge_tests::sources::Process;
use serde_json::{Value, json};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(30);

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// `n` generated events, all of tenant `tenant`.
fn events_of(env: &mut TestEnv, tenant: &str, n: usize) -> Vec<Event> {
    let mut events = env.events(n);
    for e in &mut events {
        e.tenant = tenant.to_owned();
    }
    events
}

fn ndjson(events: &[Event]) -> String {
    events
        .iter()
        .map(|e| serde_json::to_string(e).unwrap() + "\n")
        .collect()
}

async fn wait_stored(env: &TestEnv, ids: &HashSet<Uuid>) -> anyhow::Result<()> {
    let deadline = Instant::now() + WAIT;
    loop {
        let stored = env.stored_ids().await?;
        if ids.is_subset(&stored) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{} of {} ids stored after {WAIT:?}",
                ids.intersection(&stored).count(),
                ids.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn stored_event(env: &TestEnv, id: Uuid) -> anyhow::Result<Value> {
    Ok(
        sqlx::query_scalar("SELECT event FROM audit_events WHERE id = $1")
            .bind(id)
            .fetch_one(&env.pool)
            .await?,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_ingest_accepts_per_event_and_scopes_tokens_to_their_tenant() -> anyhow::Result<()> {
    let mut env = TestEnv::new().await?;
    let worker = env.spawn_worker("w", &[]).await?;
    worker.wait_ready(WAIT).await?;
    let acme_token = Token::tenant("acme-ingest", "acme", &["ingest"]);
    let reader_token = Token::tenant("acme-read", "acme", &["read"]);
    let (acme, reader) = (acme_token.token.clone(), reader_token.token.clone());
    let tokens = json!([acme_token.entry, reader_token.entry]).to_string();
    let mut serve = Process::spawn(
        &env,
        "serve",
        &["serve"],
        &[
            ("AUDITBRIDGE_API_TOKENS", &tokens),
            ("AUDITBRIDGE_API_MAX_BODY_BYTES", "65536"),
        ],
    )?;
    serve.wait_listening(WAIT).await?;
    let http = reqwest::Client::new();
    let url = serve.url("/v1/ingest");
    let post = |body: String, token: Option<&str>, ndjson: bool| {
        let mut req = http.post(&url).body(body).header(
            "content-type",
            if ndjson {
                "application/x-ndjson"
            } else {
                "application/json"
            },
        );
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req.send()
    };

    // A batch with two invalid lines: 202, every line answered by index.
    let good = events_of(&mut env, "acme", 40);
    let mut body = ndjson(&good[..20]);
    body.push_str("{\"not\": \"an event\"}\n");
    body.push_str(&ndjson(&good[20..]));
    body.push_str("this is not json\n");
    let resp = post(body.clone(), Some(&acme), true).await?;
    assert_eq!(resp.status(), 202);
    let answer: Value = resp.json().await?;
    assert_eq!(answer["accepted"], 40, "{answer}");
    assert_eq!(answer["rejected"], 2, "{answer}");
    let results = answer["results"].as_array().unwrap();
    assert_eq!(results.len(), 42);
    assert_eq!(results[20]["status"], "rejected");
    assert_eq!(results[20]["index"], 20);
    assert_eq!(results[20]["kind"], "schema");
    assert!(
        results[20]["reason"].as_str().unwrap().contains("not"),
        "{answer}"
    );
    assert_eq!(results[41]["kind"], "not_json");
    assert_eq!(results[0]["id"], good[0].id.to_string());

    // The same batch again (a client retry): accepted again, stored once.
    let resp = post(body, Some(&acme), true).await?;
    assert_eq!(resp.status(), 202);

    // One event as plain JSON.
    let single = events_of(&mut env, "acme", 1).remove(0);
    let resp = post(serde_json::to_string_pretty(&single)?, Some(&acme), false).await?;
    assert_eq!(resp.status(), 202, "{}", resp.text().await?);

    // Refusals: no token, a token without the ingest scope, another tenant in the batch,
    // nothing valid, too large.
    let other = events_of(&mut env, "globex", 1);
    let mixed = events_of(&mut env, "acme", 3);
    let mut forbidden_body = ndjson(&mixed);
    forbidden_body.push_str(&ndjson(&other));
    assert_eq!(post(ndjson(&mixed), None, true).await?.status(), 401);
    assert_eq!(
        post(ndjson(&mixed), Some("abt_unknown"), true)
            .await?
            .status(),
        401
    );
    assert_eq!(
        post(ndjson(&mixed), Some(&reader), true).await?.status(),
        403
    );
    let resp = post(forbidden_body, Some(&acme), true).await?;
    assert_eq!(resp.status(), 403);
    let text = resp.text().await?;
    assert!(
        text.contains("globex") && text.contains("index 3"),
        "{text}"
    );
    let resp = post("{\"id\": 1}\n".into(), Some(&acme), true).await?;
    assert_eq!(resp.status(), 400);
    let answer: Value = resp.json().await?;
    assert_eq!(answer["results"][0]["status"], "rejected", "{answer}");
    let big = events_of(&mut env, "acme", 200);
    let resp = post(ndjson(&big), Some(&acme), true).await?;
    assert_eq!(resp.status(), 413);

    assert_eq!(
        serve
            .metric("auditbridge_ingest_events_total{result=\"accepted\"}")
            .await?,
        81.0
    );
    assert_eq!(
        serve
            .metric("auditbridge_ingest_events_total{result=\"rejected\"}")
            .await?,
        5.0
    );

    let mut expected: HashSet<Uuid> = good.iter().map(|e| e.id).collect();
    expected.insert(single.id);
    wait_stored(&env, &expected).await?;
    env.wait_for_drained(WAIT).await?;
    let stored = env.stored_ids().await?; // fails on an id stored twice
    assert_eq!(stored, expected, "only the accepted events, once each");
    for refused in mixed.iter().chain(&other).chain(&big) {
        assert!(!stored.contains(&refused.id));
    }
    // The stored event is the bytes the producer sent.
    let row = stored_event(&env, single.id).await?;
    assert_eq!(serde_json::from_value::<Event>(row)?, single);

    // JetStream cannot take events (the stream is gone): 503 after the ack timeout, and no
    // event is claimed accepted.
    let mut worker = worker;
    worker.signal("KILL");
    worker.wait_exit(WAIT).await?;
    env.js.delete_stream(&env.stream).await?;
    let resp = post(ndjson(&events_of(&mut env, "acme", 2)), Some(&acme), true).await?;
    assert_eq!(resp.status(), 503);
    let text = resp.text().await?;
    assert!(text.contains("nothing is claimed accepted"), "{text}");
    serve.signal("TERM");
    assert!(serve.wait_exit(WAIT).await?.success());
    Ok(())
}

fn vendor_source() -> Value {
    json!({
        "name": "vendor",
        "type": "webhook",
        "params": {
            "secret": "vendor-secret-0123456789",
            "tenants": ["acme", "globex"],
            "mapping": {
                "id": "/delivery_id",
                "tenant": "/org",
                "type": ["/kind", "/verb"],
                "actions": {"doc.edited": "document.update", "user.login": "session.create"},
                "occurred_at": "/at",
                "outcome": "/ok",
                "outcomes": {"true": "success", "false": "failure"},
                "actor": {"id": "/who/id", "type": {"const": "user"}, "ip": "/who/ip"},
                "target": {"id": "/doc", "type": {"const": "document"}},
                "metadata": {"client": "/client"}
            }
        }
    })
}

fn hub_source() -> Value {
    json!({
        "name": "hub",
        "type": "webhook",
        "params": {
            "secret": "hub-secret-0123456789",
            "signature_header": "X-Hub-Signature-256",
            "signature_prefix": "sha256=",
            "timestamp_header": "",
            "mapping": {
                "id": "/id", "tenant": {"const": "acme"}, "type": "/event",
                "actions": {"push": "repository.push"}, "actor": {"id": "/pusher"}
            }
        }
    })
}

fn vendor_payload(delivery: &str, verb: &str, org: &str) -> String {
    json!({
        "delivery_id": delivery,
        "org": org,
        "kind": "doc",
        "verb": verb,
        "at": "2026-11-23T10:00:00.250Z",
        "ok": true,
        "who": {"id": "u-7", "ip": "203.0.113.9"},
        "doc": "doc-1",
        "client": {"name": "desktop", "version": 3}
    })
    .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_verify_signatures_map_payloads_and_store_redeliveries_once() -> anyhow::Result<()>
{
    let env = TestEnv::new().await?;
    let worker = env.spawn_worker("w", &[]).await?;
    worker.wait_ready(WAIT).await?;
    let sources = json!([vendor_source(), hub_source()]);
    let parsed = parse_sources(sources.as_array().unwrap())?;
    let (SourceKind::Webhook(vendor), SourceKind::Webhook(hub)) =
        (&parsed[0].kind, &parsed[1].kind)
    else {
        bail!("two webhooks")
    };
    let mut serve = Process::spawn(
        &env,
        "serve",
        &["serve"],
        &[("AUDITBRIDGE_SOURCES", &sources.to_string())],
    )?;
    serve.wait_listening(WAIT).await?;
    let http = reqwest::Client::new();
    let url = serve.url("/v1/webhooks/vendor");
    let deliver = |body: String, ts: u64, signature: Option<String>| {
        let signature = signature.unwrap_or_else(|| sign(vendor, Some(ts), body.as_bytes()));
        http.post(&url)
            .header("content-type", "application/json")
            .header("x-auditbridge-timestamp", ts.to_string())
            .header("x-auditbridge-signature", signature)
            .body(body)
            .send()
    };

    // Valid: mapped, published, stored with the derived id.
    let body = vendor_payload("dlv-1", "edited", "acme");
    let resp = deliver(body.clone(), now(), None).await?;
    assert_eq!(resp.status(), 202);
    let answer: Value = resp.json().await?;
    let id: Uuid = answer["results"][0]["id"].as_str().unwrap().parse()?;
    let occurred = time::macros::datetime!(2026-11-23 10:00:00.250 UTC);
    assert_eq!(
        id,
        auditbridge_sources::derive_id("vendor", "acme", "dlv-1", Some(occurred))
    );

    // Re-delivered later (new timestamp, new signature): the same id, stored once.
    let resp = deliver(body.clone(), now() + 1, None).await?;
    assert_eq!(resp.status(), 202);
    let again: Value = resp.json().await?;
    assert_eq!(again["results"][0]["id"], id.to_string());

    // A batch (JSON array) with an unlisted type: 202 for the rest, the refusal says why.
    let batch = format!(
        "[{}, {}]",
        vendor_payload("dlv-2", "edited", "globex"),
        vendor_payload("dlv-3", "deleted", "acme")
    );
    let resp = deliver(batch, now(), None).await?;
    assert_eq!(resp.status(), 202);
    let answer: Value = resp.json().await?;
    assert_eq!(
        (answer["accepted"].as_u64(), answer["rejected"].as_u64()),
        (Some(1), Some(1))
    );
    let id2: Uuid = answer["results"][0]["id"].as_str().unwrap().parse()?;
    assert_eq!(answer["results"][1]["kind"], "unmapped_type");
    assert!(
        answer["results"][1]["reason"]
            .as_str()
            .unwrap()
            .contains("doc.deleted"),
        "{answer}"
    );

    // Nothing mappable: 400 with the reason (the sender keeps the payload).
    let resp = deliver(
        vendor_payload("dlv-4", "edited", "Not A Tenant"),
        now(),
        None,
    )
    .await?;
    assert_eq!(resp.status(), 400);
    let answer: Value = resp.json().await?;
    assert!(
        answer["results"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("tenant"),
        "{answer}"
    );

    // A tenant the source may not write: refused with the reason.
    let resp = deliver(vendor_payload("dlv-6", "edited", "initech"), now(), None).await?;
    assert_eq!(resp.status(), 400);
    let answer: Value = resp.json().await?;
    assert_eq!(
        answer["results"][0]["kind"], "tenant_not_allowed",
        "{answer}"
    );

    // Bad signature, wrong secret, missing headers, replayed (old) signature: 401.
    let fresh = vendor_payload("dlv-5", "edited", "acme");
    let ts = now();
    let good_sig = sign(vendor, Some(ts), fresh.as_bytes());
    let tampered = fresh.replace("u-7", "u-8");
    assert_eq!(
        deliver(tampered, ts, Some(good_sig.clone()))
            .await?
            .status(),
        401
    );
    assert_eq!(
        deliver(fresh.clone(), ts, Some("v1=00".into()))
            .await?
            .status(),
        401
    );
    let old = now() - 600;
    assert_eq!(
        deliver(fresh.clone(), old, None).await?.status(),
        401,
        "outside the replay window"
    );
    let resp = http.post(&url).body(fresh.clone()).send().await?;
    assert_eq!(resp.status(), 401);
    assert_eq!(
        http.post(serve.url("/v1/webhooks/nope"))
            .body("{}")
            .send()
            .await?
            .status(),
        404
    );

    // The body-only (GitHub-like) scheme of the other source.
    let push = json!({"id": 991, "event": "push", "pusher": "ada"}).to_string();
    let resp = http
        .post(serve.url("/v1/webhooks/hub"))
        .header("X-Hub-Signature-256", sign(hub, None, push.as_bytes()))
        .body(push.clone())
        .send()
        .await?;
    assert_eq!(resp.status(), 202);
    let hub_id = auditbridge_sources::derive_id("hub", "acme", "991", None);

    for (series, want) in [
        (
            "auditbridge_webhook_signature_failures_total{source=\"vendor\",reason=\"mismatch\"}",
            2.0,
        ),
        (
            "auditbridge_webhook_signature_failures_total{source=\"vendor\",reason=\"expired\"}",
            1.0,
        ),
        (
            "auditbridge_webhook_signature_failures_total{source=\"vendor\",reason=\"missing\"}",
            1.0,
        ),
        (
            "auditbridge_webhook_requests_total{source=\"vendor\",result=\"unauthorized\"}",
            4.0,
        ),
        (
            "auditbridge_webhook_requests_total{source=\"vendor\",result=\"accepted\"}",
            3.0,
        ),
        (
            "auditbridge_webhook_requests_total{source=\"vendor\",result=\"rejected\"}",
            2.0,
        ),
        (
            "auditbridge_webhook_requests_total{source=\"hub\",result=\"accepted\"}",
            1.0,
        ),
    ] {
        assert_eq!(serve.metric(series).await?, want, "{series}");
    }

    let expected: HashSet<Uuid> = [id, id2, hub_id].into();
    wait_stored(&env, &expected).await?;
    env.wait_for_drained(WAIT).await?;
    assert_eq!(
        env.stored_ids().await?,
        expected,
        "each foreign event once; nothing refused"
    );
    let e = stored_event(&env, id).await?;
    assert_eq!(e["tenant"], "acme");
    assert_eq!(e["action"], "document.update");
    assert_eq!(e["outcome"], "success");
    assert_eq!(
        e["actor"],
        json!({"id": "u-7", "type": "user", "ip": "203.0.113.9"})
    );
    assert_eq!(e["target"], json!({"id": "doc-1", "type": "document"}));
    assert_eq!(e["source"], "vendor");
    assert_eq!(e["metadata"]["source_event_id"], "dlv-1");
    assert_eq!(e["metadata"]["client"]["version"], 3);
    assert_eq!(stored_event(&env, id2).await?["tenant"], "globex");
    assert_eq!(
        stored_event(&env, hub_id).await?["action"],
        "repository.push"
    );
    Ok(())
}

fn append(path: &Path, text: &str) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

async fn wait_until(what: &str, mut check: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + WAIT;
    while !check() {
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_file_follows_appends_restarts_rotation_truncation_and_partial_lines()
-> anyhow::Result<()> {
    let mut env = TestEnv::new().await?;
    let worker = env.spawn_worker("w", &[]).await?;
    worker.wait_ready(WAIT).await?;
    let dir = std::env::temp_dir().join(format!("ab-tail-{}", env.tag));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("audit.jsonl");
    let sources = json!([{"name": "app", "type": "file",
        "params": {"path": path, "poll_interval": "50ms"}}])
    .to_string();
    let state = dir.join(".auditbridge-tail-app.state.json");
    let offset = || {
        auditbridge_sources::tail::read_position(&state)
            .ok()
            .flatten()
            .map_or(0, |p| p.offset)
    };
    let file_len = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
    let tail = |env: &TestEnv, name: &str| {
        Process::spawn(
            env,
            name,
            &["tail-file", "app"],
            &[("AUDITBRIDGE_SOURCES", &sources)],
        )
    };
    let mut all: HashSet<Uuid> = HashSet::new();

    // Appends, with an unmappable line and a partial last line.
    let first = env.events(30);
    all.extend(first.iter().map(|e| e.id));
    append(&path, &ndjson(&first[..10]));
    append(&path, "{\"broken\": true}\n");
    append(&path, &ndjson(&first[10..29]));
    let last = serde_json::to_string(&first[29])?;
    let (head, rest) = last.split_at(50);
    append(&path, head);
    let mut p = tail(&env, "tail-1")?;
    p.wait_listening(WAIT).await?;
    let complete = file_len(&path) - head.len() as u64;
    wait_until("the complete lines to be settled", || offset() == complete).await?;
    wait_stored(&env, &first[..29].iter().map(|e| e.id).collect()).await?;
    env.wait_for_drained(WAIT).await?;
    assert!(
        !env.stored_ids().await?.contains(&first[29].id),
        "a partial line is held"
    );
    append(&path, &format!("{rest}\n"));
    wait_stored(&env, &[first[29].id].into()).await?;
    assert_eq!(
        p.metric("auditbridge_tail_lines_total{source=\"app\",result=\"rejected\"}")
            .await?,
        1.0
    );
    let rejected = std::fs::read_to_string(dir.join("auditbridge-tail-app.rejected.jsonl"))?;
    assert!(
        rejected.contains("broken") && rejected.contains("\"kind\":\"invalid\""),
        "{rejected}"
    );

    // Killed in the middle of a large append: the restart resumes from the saved position and
    // everything is stored exactly once.
    let bulk = env.events(3000);
    all.extend(bulk.iter().map(|e| e.id));
    append(&path, &ndjson(&bulk));
    let before = offset();
    wait_until("the tail to move into the append", || offset() > before).await?;
    p.signal("KILL");
    p.wait_exit(WAIT).await?;
    let killed_at = offset();
    let mut p = tail(&env, "tail-2")?;
    p.wait_listening(WAIT).await?;
    wait_stored(&env, &bulk.iter().map(|e| e.id).collect()).await?;
    assert!(killed_at <= file_len(&path));

    // Rotation: the writer renames the file, writes a last line to its old handle, then
    // starts a new file.
    let rotated = env.events(6);
    all.extend(rotated.iter().map(|e| e.id));
    std::fs::rename(&path, dir.join("audit.jsonl.1"))?;
    append(&dir.join("audit.jsonl.1"), &ndjson(&rotated[..3]));
    append(&path, &ndjson(&rotated[3..]));
    wait_stored(&env, &rotated.iter().map(|e| e.id).collect()).await?;

    // Truncation: the new file is emptied and written again from 0.
    let truncated = env.events(4);
    all.extend(truncated.iter().map(|e| e.id));
    std::fs::File::create(&path)?;
    append(&path, &ndjson(&truncated));
    wait_stored(&env, &truncated.iter().map(|e| e.id).collect()).await?;
    wait_until("the position to reach the end", || {
        offset() == file_len(&path)
    })
    .await?;
    assert_eq!(
        p.metric("auditbridge_tail_rotations_total{source=\"app\"}")
            .await?,
        1.0
    );
    assert_eq!(
        p.metric("auditbridge_tail_truncations_total{source=\"app\"}")
            .await?,
        1.0
    );

    // A clean stop (SIGTERM), lines appended meanwhile, a restart: exactly those are new.
    p.signal("TERM");
    assert!(p.wait_exit(WAIT).await?.success());
    let later = env.events(5);
    all.extend(later.iter().map(|e| e.id));
    append(&path, &ndjson(&later));
    let mut p = tail(&env, "tail-3")?;
    p.wait_listening(WAIT).await?;
    wait_stored(&env, &later.iter().map(|e| e.id).collect()).await?;
    assert_eq!(
        p.metric("auditbridge_tail_lines_total{source=\"app\",result=\"published\"}")
            .await?,
        5.0,
        "the restart read only what was appended"
    );
    env.wait_for_drained(WAIT).await?;
    assert_eq!(
        env.stored_ids().await?,
        all,
        "every line once, nothing else"
    );
    assert!(env.dead_letters().await?.is_empty());
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Renames `<path>.N` to `.N+1` (highest first) and `<path>` to `<path>.1`, as logrotate does.
fn rotate(path: &Path) -> anyhow::Result<()> {
    let name = |i: usize| std::path::PathBuf::from(format!("{}.{i}", path.display()));
    let mut highest = 0;
    while name(highest + 1).exists() {
        highest += 1;
    }
    for i in (1..=highest).rev() {
        std::fs::rename(name(i), name(i + 1))?;
    }
    std::fs::rename(path, name(1))?;
    Ok(())
}

/// The ids of the stream's messages, in stream order.
async fn stream_order(env: &TestEnv) -> anyhow::Result<Vec<Uuid>> {
    let mut stream = env.js.get_stream(&env.stream).await?;
    let info = stream.info().await?.clone();
    let mut ids = Vec::new();
    for seq in info.state.first_sequence..=info.state.last_sequence {
        let message = stream.get_raw_message(seq).await?;
        ids.push(auditbridge_event::decode(&message.payload, 1 << 20)?.id);
    }
    Ok(ids)
}

/// `tail-file` stopped (SIGTERM) after file A, which is then rotated twice with B and C
/// written in between (A → .1 → .2), 100 lines each: at the restart every line of A, B and
/// C is stored exactly once, and each file's lines reach the stream in the file's order.
/// Then the saved file is deleted before a restart: what is lost is said in a log line and
/// a counter, and the files rotated after it are still read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_file_reads_every_file_rotated_while_it_was_stopped() -> anyhow::Result<()> {
    let mut env = TestEnv::new().await?;
    let worker = env.spawn_worker("w", &[]).await?;
    worker.wait_ready(WAIT).await?;
    let dir = std::env::temp_dir().join(format!("ab-tail-rot-{}", env.tag));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("audit.jsonl");
    let sources = json!([{"name": "app", "type": "file",
        "params": {"path": path, "poll_interval": "50ms"}}])
    .to_string();
    let tail = |env: &TestEnv, name: &str| {
        Process::spawn(
            env,
            name,
            &["tail-file", "app"],
            &[("AUDITBRIDGE_SOURCES", &sources)],
        )
    };
    let ids = |events: &[Event]| events.iter().map(|e| e.id).collect::<Vec<_>>();

    let a = env.events(100);
    append(&path, &ndjson(&a));
    let mut p = tail(&env, "tail-1")?;
    p.wait_listening(WAIT).await?;
    wait_stored(&env, &ids(&a).into_iter().collect()).await?;
    p.signal("TERM");
    assert!(p.wait_exit(WAIT).await?.success());

    let a_more = env.events(100);
    append(&path, &ndjson(&a_more));
    rotate(&path)?;
    let b = env.events(100);
    append(&path, &ndjson(&b));
    rotate(&path)?;
    let c = env.events(100);
    append(&path, &ndjson(&c));
    let mut p = tail(&env, "tail-2")?;
    p.wait_listening(WAIT).await?;
    let files = [[a.clone(), a_more].concat(), b, c];
    let all: HashSet<Uuid> = files.iter().flat_map(|f| ids(f)).collect();
    wait_stored(&env, &all).await?;
    env.wait_for_drained(WAIT).await?;
    assert_eq!(env.stored_ids().await?, all, "every line, nothing else");
    assert_eq!(env.count().await?, 300 + 100, "each exactly once");
    let order = stream_order(&env).await?;
    for file in &files {
        let want = ids(file);
        let got: Vec<Uuid> = order
            .iter()
            .filter(|id| want.contains(id))
            .copied()
            .collect();
        // A chunk re-published after a stop may repeat ids; the first occurrences keep order.
        let mut seen = HashSet::new();
        let firsts: Vec<Uuid> = got.into_iter().filter(|id| seen.insert(*id)).collect();
        assert_eq!(firsts, want, "a file's lines in the file's order");
    }
    assert_eq!(
        p.metric("auditbridge_tail_lines_total{source=\"app\",result=\"published\"}")
            .await?,
        300.0,
        "A's new lines, then B, then C: nothing read twice"
    );
    p.signal("TERM");
    assert!(p.wait_exit(WAIT).await?.success());

    // Lines appended to the saved file while stopped; it is rotated twice and deleted.
    let lost = env.events(10);
    append(&path, &ndjson(&lost));
    rotate(&path)?;
    let d = env.events(100);
    append(&path, &ndjson(&d));
    rotate(&path)?;
    let e = env.events(100);
    append(&path, &ndjson(&e));
    std::fs::remove_file(dir.join("audit.jsonl.2"))?;
    let mut p = tail(&env, "tail-3")?;
    p.wait_listening(WAIT).await?;
    let after: HashSet<Uuid> = ids(&d).into_iter().chain(ids(&e)).collect();
    wait_stored(&env, &after).await?;
    env.wait_for_drained(WAIT).await?;
    let stored = env.stored_ids().await?;
    assert!(lost.iter().all(|e| !stored.contains(&e.id)));
    assert_eq!(
        p.metric("auditbridge_tail_files_lost_total{source=\"app\"}")
            .await?,
        1.0
    );
    let log = p.log_text();
    assert!(
        log.contains("ERROR") && log.contains("are lost"),
        "the loss is said loudly: {log}"
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// The same with `tail-file` running and NATS down (a private `nats-server`, killed): the
/// tail is held inside file A while A is rotated twice with B and C written in between; once
/// NATS is back every line of A, B and C is stored exactly once, each file in its order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_file_reads_every_file_rotated_while_nats_was_down() -> anyhow::Result<()> {
    let mut env = TestEnv::new().await?;
    let mut nats = auditbridge_tests::nats_server::NatsServer::start().await?;
    let url = nats.url();
    let worker = env
        .spawn_worker("w", &[("AUDITBRIDGE_NATS_URL", &url)])
        .await?;
    worker.wait_ready(WAIT).await?;
    let dir = std::env::temp_dir().join(format!("ab-tail-down-{}", env.tag));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("audit.jsonl");
    let sources = json!([{"name": "app", "type": "file",
        "params": {"path": path, "poll_interval": "50ms"}}])
    .to_string();
    let ids = |events: &[Event]| events.iter().map(|e| e.id).collect::<Vec<_>>();
    let mut p = Process::spawn(
        &env,
        "tail",
        &["tail-file", "app"],
        &[
            ("AUDITBRIDGE_SOURCES", &sources),
            ("AUDITBRIDGE_NATS_URL", &url),
        ],
    )?;
    p.wait_listening(WAIT).await?;
    let a = env.events(100);
    append(&path, &ndjson(&a));
    wait_stored(&env, &ids(&a).into_iter().collect()).await?;

    nats.kill().await?;
    let a_more = env.events(100);
    append(&path, &ndjson(&a_more));
    // The tail has read A's new lines and is retrying their publish.
    let deadline = Instant::now() + WAIT;
    while p
        .metric("auditbridge_tail_publish_failures_total{source=\"app\"}")
        .await?
        < 1.0
    {
        assert!(Instant::now() < deadline, "the tail never tried to publish");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    rotate(&path)?;
    let b = env.events(100);
    append(&path, &ndjson(&b));
    rotate(&path)?;
    let c = env.events(100);
    append(&path, &ndjson(&c));
    nats.restart().await?;

    let files = [[a, a_more].concat(), b, c];
    let all: HashSet<Uuid> = files.iter().flat_map(|f| ids(f)).collect();
    wait_stored(&env, &all).await?;
    // (`wait_for_drained` asks the shared NATS; this stream is on the private one.)
    assert_eq!(env.stored_ids().await?, all, "every line, nothing else");
    assert_eq!(env.count().await?, 400, "each exactly once");
    let js = async_nats::jetstream::new(async_nats::connect(&url).await?);
    let mut stream = js.get_stream(&env.stream).await?;
    let info = stream.info().await?.clone();
    let mut order = Vec::new();
    for seq in info.state.first_sequence..=info.state.last_sequence {
        let message = stream.get_raw_message(seq).await?;
        order.push(auditbridge_event::decode(&message.payload, 1 << 20)?.id);
    }
    for file in &files {
        let want = ids(file);
        let mut seen = HashSet::new();
        let firsts: Vec<Uuid> = order
            .iter()
            .filter(|id| want.contains(id) && seen.insert(**id))
            .copied()
            .collect();
        assert_eq!(firsts, want, "a file's lines in the file's order");
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
