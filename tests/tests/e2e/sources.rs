//! Sources for systems that cannot speak NATS, end to end: HTTP ingest and signed webhooks
//! through `auditbridge serve`, JSONL files through `auditbridge tail-file`, each into the
//! real JetStream and through a real worker into PostgreSQL, asserted by id.

use std::collections::HashSet;
use std::io::Write as _;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure};
use auditbridge_event::Event;
use auditbridge_sources::signature::sign;
use auditbridge_sources::{Mapping, SourceKind, WebhookParams};
use auditbridge_tests::api::Token;
use auditbridge_tests::sources::Process;
use auditbridge_tests::{TestEnv, eventually, id_key, load_sources, until};
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

/// `serve` with these sources (and more variables), listening.
async fn serve_with(
    env: &TestEnv,
    sources: &Value,
    more: &[(&str, &str)],
) -> anyhow::Result<Process> {
    let sources = sources.to_string();
    let mut vars = vec![("AUDITBRIDGE_SOURCES", sources.as_str())];
    vars.extend_from_slice(more);
    let mut serve = Process::spawn(env, "serve", &["serve"], &vars)?;
    serve.wait_listening(WAIT).await?;
    Ok(serve)
}

/// The parameters of webhook sources, loaded as `serve` loads them, in order.
fn webhooks(sources: &Value) -> anyhow::Result<Vec<WebhookParams>> {
    load_sources(sources)?
        .into_iter()
        .map(|s| match s.kind {
            SourceKind::Webhook(params) => Ok(params),
            SourceKind::File(_) | SourceKind::Api(_) => bail!("source {} is not a webhook", s.name),
        })
        .collect()
}

async fn wait_stored(env: &TestEnv, ids: &HashSet<Uuid>) -> anyhow::Result<()> {
    eventually(&format!("{} ids stored", ids.len()), WAIT, async || {
        let stored = env.stored_ids().await?;
        ensure!(
            ids.is_subset(&stored),
            "{} of {} ids stored",
            ids.intersection(&stored).count(),
            ids.len()
        );
        Ok(())
    })
    .await
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
    let [vendor, hub] = &webhooks(&sources)?[..] else {
        bail!("two webhooks")
    };
    let serve = serve_with(&env, &sources, &[]).await?;
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
        auditbridge_sources::derive_id(&id_key(), "vendor", "acme", "dlv-1", Some(occurred))
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
    let hub_id = auditbridge_sources::derive_id(&id_key(), "hub", "acme", "991", None);

    for (series, want) in [
        (
            "auditbridge_webhook_signature_failures_total{source=\"vendor\",reason=\"mismatch\"}",
            1.0,
        ),
        (
            "auditbridge_webhook_signature_failures_total{source=\"vendor\",reason=\"malformed\"}",
            1.0,
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
    until("the complete lines to be settled", WAIT, || {
        offset() == complete
    })
    .await?;
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
    until("the tail to move into the append", WAIT, || {
        offset() > before
    })
    .await?;
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
    until("the position to reach the end", WAIT, || {
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

async fn stream_messages(env: &TestEnv) -> anyhow::Result<u64> {
    let mut stream = env.js.get_stream(&env.stream).await?;
    Ok(stream.info().await?.state.messages)
}

async fn wait_stream_messages(env: &TestEnv, n: u64) -> anyhow::Result<()> {
    eventually(&format!("{n} messages in the stream"), WAIT, async || {
        let have = stream_messages(env).await?;
        ensure!(have >= n, "{have} of {n} messages in the stream");
        Ok(())
    })
    .await
}

/// An event of tenant `globex` carrying `victim`'s id (what a squatting producer sends).
fn squatting(victim: &Event) -> Event {
    let mut e = victim.clone();
    e.tenant = "globex".into();
    e.actor.id = "mallory".into();
    e
}

/// JetStream's duplicate window is per stream, so each way in publishes with
/// `Nats-Msg-Id: <tenant>:<id>`: tenant `globex` sending first an event with the id tenant
/// `acme`'s event will carry must not make JetStream drop `acme`'s as a duplicate. (Whether
/// the worker then stores it or keeps it as a conflict is the worker's side; here: both
/// messages reach the stream.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_way_in_lets_another_tenants_id_suppress_an_event() -> anyhow::Result<()> {
    let mut env = TestEnv::new().await?;
    env.ensure_stream().await?;
    let acme_token = Token::tenant("acme-ingest", "acme", &["ingest"]);
    let globex_token = Token::tenant("globex-ingest", "globex", &["ingest"]);
    let tokens = json!([acme_token.entry, globex_token.entry]).to_string();
    let relay = json!([{"name": "relay", "type": "webhook",
        "params": {"secret": "relay-secret-0123456789"}}]);
    let [relay_params] = &webhooks(&relay)?[..] else {
        bail!("a webhook")
    };
    let serve = serve_with(&env, &relay, &[("AUDITBRIDGE_API_TOKENS", &tokens)]).await?;
    let http = reqwest::Client::new();

    // HTTP ingest.
    let victim = events_of(&mut env, "acme", 1).remove(0);
    for (event, token) in [
        (squatting(&victim), &globex_token.token),
        (victim.clone(), &acme_token.token),
    ] {
        let resp = http
            .post(serve.url("/v1/ingest"))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(serde_json::to_string(&event)?)
            .send()
            .await?;
        assert_eq!(resp.status(), 202, "{}", resp.text().await?);
    }
    assert_eq!(stream_messages(&env).await?, 2, "HTTP ingest");

    // A webhook whose payloads are v1 events (identity mapping).
    let victim = events_of(&mut env, "acme", 1).remove(0);
    for event in [squatting(&victim), victim.clone()] {
        let body = serde_json::to_string(&event)?;
        let ts = now();
        let resp = http
            .post(serve.url("/v1/webhooks/relay"))
            .header("x-auditbridge-timestamp", ts.to_string())
            .header(
                "x-auditbridge-signature",
                sign(relay_params, Some(ts), body.as_bytes()),
            )
            .body(body)
            .send()
            .await?;
        assert_eq!(resp.status(), 202, "{}", resp.text().await?);
    }
    assert_eq!(stream_messages(&env).await?, 4, "webhook");

    // A followed file of v1 events.
    let dir = std::env::temp_dir().join(format!("ab-squat-{}", env.tag));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("audit.jsonl");
    let victim = events_of(&mut env, "acme", 1).remove(0);
    append(&path, &ndjson(&[squatting(&victim), victim.clone()]));
    let sources = json!([{"name": "app", "type": "file",
        "params": {"path": path, "poll_interval": "50ms"}}])
    .to_string();
    let mut tail = Process::spawn(
        &env,
        "tail",
        &["tail-file", "app"],
        &[("AUDITBRIDGE_SOURCES", &sources)],
    )?;
    tail.wait_listening(WAIT).await?;
    let state = dir.join(".auditbridge-tail-app.state.json");
    let len = std::fs::metadata(&path)?.len();
    until("the file to be settled", WAIT, || {
        auditbridge_sources::tail::read_position(&state)
            .ok()
            .flatten()
            .is_some_and(|p| p.offset == len)
    })
    .await?;
    wait_stream_messages(&env, 6).await?;
    assert_eq!(stream_messages(&env).await?, 6, "tail-file");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Writes a request head (and maybe part of a body) on a fresh connection; the connection is
/// returned so that the test decides whether the rest ever comes.
async fn open_request(
    addr: std::net::SocketAddr,
    path: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> anyhow::Result<tokio::net::TcpStream> {
    use tokio::io::AsyncWriteExt as _;
    let mut head = format!("POST {path} HTTP/1.1\r\nHost: {addr}\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let mut conn = tokio::net::TcpStream::connect(addr).await?;
    conn.write_all(head.as_bytes()).await?;
    conn.write_all(body).await?;
    conn.flush().await?;
    Ok(conn)
}

/// The status code and head of the answer on `conn`, or an error after `within`.
async fn answer(
    conn: &mut tokio::net::TcpStream,
    within: Duration,
) -> anyhow::Result<(u16, String)> {
    use tokio::io::AsyncReadExt as _;
    let mut got = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = conn.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(within, read)
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {within:?}"))??;
    let head = String::from_utf8_lossy(&got).into_owned();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("not an HTTP answer: {head:?}"))?;
    Ok((status, head))
}

/// Webhooks check all they can before the body (source, signature and timestamp headers,
/// replay window, declared length), bound the body per source in size and time, and bound
/// concurrent requests per source and in all (503 with `Retry-After`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_refuse_unsigned_oversized_slow_and_excess_requests_early() -> anyhow::Result<()> {
    let mut env = TestEnv::new().await?;
    env.ensure_stream().await?;
    let sources = json!([
        {"name": "tight", "type": "webhook", "params": {"secret": "tight-secret-0123456789",
            "max_body_bytes": 4096, "body_timeout": "2s", "max_concurrent_requests": 2}},
        {"name": "bulk", "type": "webhook", "params": {"secret": "bulk-secret-0123456789",
            "body_timeout": "3s", "max_concurrent_requests": 1000}}
    ]);
    let [tight, _] = &webhooks(&sources)?[..] else {
        bail!("two webhooks")
    };
    let mut serve = serve_with(&env, &sources, &[]).await?;
    let addr = serve.addr;
    let fast = Duration::from_millis(1500);
    let well_formed = |ts: u64| {
        vec![
            ("X-Auditbridge-Timestamp", ts.to_string()),
            ("X-Auditbridge-Signature", format!("v1={}", "ab".repeat(32))),
            ("Content-Type", "application/json".to_owned()),
        ]
    };
    let with_length = |mut h: Vec<(&'static str, String)>, n: usize| {
        h.push(("Content-Length", n.to_string()));
        h
    };

    // Unsigned, stale, or with a signature that is no digest: 401 at once, although the
    // declared body (1 MB) never comes.
    let unsigned = vec![
        ("Content-Type", "application/json".to_owned()),
        ("Content-Length", "1000000".to_owned()),
    ];
    let stale = with_length(well_formed(now() - 3600), 1_000_000);
    let mut malformed = with_length(well_formed(now()), 1_000_000);
    malformed[1].1 = "v1=not-a-digest".into();
    for (what, headers) in [
        ("unsigned", unsigned),
        ("stale", stale),
        ("malformed", malformed),
    ] {
        let mut conn = open_request(addr, "/v1/webhooks/tight", &headers, b"{").await?;
        let (status, head) = answer(&mut conn, fast).await.map_err(|e| e.context(what))?;
        assert_eq!(status, 401, "{what}: {head}");
    }

    // Declared larger than the source's limit: 413 before reading.
    let mut conn = open_request(
        addr,
        "/v1/webhooks/tight",
        &with_length(well_formed(now()), 10_000),
        b"",
    )
    .await?;
    assert_eq!(answer(&mut conn, fast).await?.0, 413);
    // Chunked past the limit: 413 while reading.
    let mut chunked = well_formed(now());
    chunked.push(("Transfer-Encoding", "chunked".to_owned()));
    let chunk = format!("{:x}\r\n{}\r\n", 5000, "x".repeat(5000));
    let mut conn = open_request(addr, "/v1/webhooks/tight", &chunked, chunk.as_bytes()).await?;
    assert_eq!(answer(&mut conn, fast).await?.0, 413);

    // A body that trickles: given up after the source's body_timeout (2 s), not 30 s.
    let started = Instant::now();
    let mut slow = open_request(
        addr,
        "/v1/webhooks/tight",
        &with_length(well_formed(now()), 100),
        b"{\"a\":",
    )
    .await?;
    let (status, head) = answer(&mut slow, Duration::from_secs(6)).await?;
    assert_eq!(status, 400, "{head}");
    let waited = started.elapsed();
    assert!(
        (Duration::from_millis(1800)..Duration::from_secs(5)).contains(&waited),
        "answered after {waited:?}"
    );

    // Two slow requests hold the source's two permits: a third, valid one is answered 503
    // with Retry-After at once; once they timed out, it is taken.
    let valid = |env: &mut TestEnv| {
        let body = serde_json::to_string(&events_of(env, "acme", 1)[0]).unwrap();
        let ts = now();
        let headers = vec![
            ("X-Auditbridge-Timestamp", ts.to_string()),
            (
                "X-Auditbridge-Signature",
                sign(tight, Some(ts), body.as_bytes()),
            ),
            ("Content-Type", "application/json".to_owned()),
            ("Content-Length", body.len().to_string()),
        ];
        (headers, body)
    };
    // A request that sends its headers and one byte of a 100-byte body: it holds a permit
    // until its body times out.
    let slow = async |path: &str| {
        open_request(addr, path, &with_length(well_formed(now()), 100), b"{").await
    };
    let send_valid = async |env: &mut TestEnv, within: Duration| {
        let (headers, body) = valid(env);
        let mut conn = open_request(addr, "/v1/webhooks/tight", &headers, body.as_bytes()).await?;
        answer(&mut conn, within).await
    };
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(slow("/v1/webhooks/tight").await?);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, head) = send_valid(&mut env, fast).await?;
    assert_eq!(status, 503, "{head}");
    assert!(
        head.to_ascii_lowercase().contains("retry-after: 1"),
        "{head}"
    );
    for mut conn in held {
        assert_eq!(answer(&mut conn, Duration::from_secs(5)).await?.0, 400);
    }
    let (status, head) = send_valid(&mut env, Duration::from_secs(15)).await?;
    assert_eq!(status, 202, "{head}");

    // In all: slow requests to a source that allows 1000 take its share of the 64 (32 for
    // two sources) and the shared rest (30, beyond `tight`'s reserved 2); one more to it is
    // answered 503 at once, while `tight` keeps its own share.
    let mut held = Vec::new();
    for _ in 0..62 {
        held.push(slow("/v1/webhooks/bulk").await?);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut conn = slow("/v1/webhooks/bulk").await?;
    let (status, head) = answer(&mut conn, fast).await?;
    assert_eq!(status, 503, "{head}");
    assert!(
        head.contains("etry-After") || head.contains("etry-after"),
        "{head}"
    );
    let (status, head) = send_valid(&mut env, Duration::from_secs(15)).await?;
    assert_eq!(status, 202, "another source keeps its share: {head}");
    drop(held);

    for (series, want) in [
        (
            "auditbridge_webhook_requests_total{source=\"tight\",result=\"busy\"}",
            1.0,
        ),
        (
            "auditbridge_webhook_requests_total{source=\"bulk\",result=\"busy\"}",
            1.0,
        ),
        (
            "auditbridge_webhook_requests_total{source=\"tight\",result=\"timeout\"}",
            3.0,
        ),
        (
            "auditbridge_webhook_requests_total{source=\"tight\",result=\"too_large\"}",
            2.0,
        ),
        (
            "auditbridge_webhook_requests_total{source=\"tight\",result=\"unauthorized\"}",
            3.0,
        ),
        (
            "auditbridge_webhook_requests_total{source=\"tight\",result=\"accepted\"}",
            2.0,
        ),
    ] {
        assert_eq!(serve.metric(series).await?, want, "{series}");
    }
    serve.signal("TERM");
    assert!(serve.wait_exit(WAIT).await?.success());
    Ok(())
}

/// The headers of every message in the stream, oldest first.
async fn stream_headers(env: &TestEnv) -> anyhow::Result<Vec<async_nats::HeaderMap>> {
    let mut stream = env.js.get_stream(&env.stream).await?;
    let state = stream.info().await?.state.clone();
    let mut out = Vec::new();
    for seq in state.first_sequence..=state.last_sequence {
        out.push(stream.get_raw_message(seq).await?.headers);
    }
    Ok(out)
}

/// A mapping without `occurred_at` fills it with the receive time, so each re-delivery has
/// another one: the message says so (`Auditbridge-Time: received`) and its id does not depend
/// on it, so an honest re-delivery is stored once and is no conflict. Derived ids also carry
/// the id of the unkeyed derivation of earlier versions (`Auditbridge-Legacy-Id`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redeliveries_with_a_receive_time_stay_duplicates_and_carry_their_headers()
-> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let worker = env.spawn_worker("w", &[]).await?;
    worker.wait_ready(WAIT).await?;
    let sources = json!([hub_source(), vendor_source()]);
    let [hub, vendor] = &webhooks(&sources)?[..] else {
        bail!("two webhooks")
    };
    let serve = serve_with(&env, &sources, &[]).await?;
    let http = reqwest::Client::new();
    let push = json!({"id": 4242, "event": "push", "pusher": "ada"}).to_string();
    let mut ids = Vec::new();
    for _ in 0..2 {
        let resp = http
            .post(serve.url("/v1/webhooks/hub"))
            .header("X-Hub-Signature-256", sign(hub, None, push.as_bytes()))
            .body(push.clone())
            .send()
            .await?;
        assert_eq!(resp.status(), 202);
        let answer: Value = resp.json().await?;
        ids.push(answer["results"][0]["id"].as_str().unwrap().to_owned());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(ids[0], ids[1], "the receive time is not part of the id");
    let ts = now();
    let body = vendor_payload("dlv-h", "edited", "acme");
    let resp = http
        .post(serve.url("/v1/webhooks/vendor"))
        .header("x-auditbridge-timestamp", ts.to_string())
        .header(
            "x-auditbridge-signature",
            sign(vendor, Some(ts), body.as_bytes()),
        )
        .body(body)
        .send()
        .await?;
    assert_eq!(resp.status(), 202);

    let id: Uuid = ids[0].parse()?;
    wait_stored(&env, &[id].into()).await?;
    env.wait_for_drained(WAIT).await?;
    assert_eq!(
        env.count().await?,
        2,
        "the push once, the vendor event once"
    );
    assert!(env.dead_letters().await?.is_empty(), "no conflict");

    // Whether JetStream kept the re-delivery or dropped it inside its window, every message
    // of the hub source says its time is the receive time; the vendor's (it has a time) does
    // not. Both carry the legacy id.
    let headers = stream_headers(&env).await?;
    let occurred = time::macros::datetime!(2026-11-23 10:00:00.250 UTC);
    let vendor_legacy =
        auditbridge_sources::legacy_derive_id("vendor", "acme", "dlv-h", Some(occurred));
    let hub_legacy = auditbridge_sources::legacy_derive_id("hub", "acme", "4242", None);
    let (last, hubs) = headers.split_last().expect("messages in the stream");
    assert!(!hubs.is_empty());
    for h in hubs {
        assert_eq!(
            h.get("Auditbridge-Time").map(|v| v.as_str()),
            Some("received")
        );
        assert_eq!(
            h.get("Auditbridge-Legacy-Id").map(|v| v.as_str()),
            Some(hub_legacy.to_string().as_str())
        );
        assert_eq!(
            h.get("Nats-Msg-Id").map(|v| v.as_str()),
            Some(format!("acme:{id}").as_str())
        );
    }
    assert_eq!(last.get("Auditbridge-Time"), None);
    assert_eq!(
        last.get("Auditbridge-Legacy-Id").map(|v| v.as_str()),
        Some(vendor_legacy.to_string().as_str())
    );
    Ok(())
}

/// The upgrade to keyed ids: an event stored by an earlier version under its unkeyed derived
/// id, re-delivered through the new `serve` (which derives another id), is stored once.
/// Needs the worker to honour `Auditbridge-Legacy-Id` (the ingest side of the change).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivery_spanning_the_upgrade_to_keyed_ids_is_stored_once() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let worker = env.spawn_worker("w", &[]).await?;
    worker.wait_ready(WAIT).await?;
    let sources = json!([vendor_source()]);
    let [vendor] = &webhooks(&sources)?[..] else {
        bail!("a webhook")
    };
    let body = vendor_payload("dlv-upgrade", "edited", "acme");

    // What the earlier version stored: the same mapping, the unkeyed id, published with the
    // bare id as its message id.
    let mapped = Mapping::new(&vendor.mapping)
        .apply(
            "vendor",
            body.as_bytes(),
            65536,
            time::OffsetDateTime::now_utc(),
        )
        .map_err(|r| anyhow::anyhow!("{r}"))?;
    let mut old = mapped.event.clone();
    old.id = mapped.legacy_id.expect("a derived id has a legacy id");
    assert_ne!(old.id, mapped.event.id);
    env.publish_raw(
        &old.subject(&env.prefix),
        serde_json::to_vec(&old)?,
        Some(&old.id.to_string()),
    )
    .await?
    .await?;
    wait_stored(&env, &[old.id].into()).await?;

    // The new serve receives the same delivery again.
    let serve = serve_with(&env, &sources, &[]).await?;
    let ts = now();
    let resp = reqwest::Client::new()
        .post(serve.url("/v1/webhooks/vendor"))
        .header("x-auditbridge-timestamp", ts.to_string())
        .header(
            "x-auditbridge-signature",
            sign(vendor, Some(ts), body.as_bytes()),
        )
        .body(body)
        .send()
        .await?;
    assert_eq!(resp.status(), 202);
    env.wait_for_drained(WAIT).await?;
    let copies: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_events WHERE event->'metadata'->>'source_event_id' = 'dlv-upgrade'",
    )
    .fetch_one(&env.pool)
    .await?;
    assert_eq!(
        copies, 1,
        "the re-delivery across the upgrade was stored again"
    );
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
    eventually("the tail to try to publish", WAIT, async || {
        let failures = p
            .metric("auditbridge_tail_publish_failures_total{source=\"app\"}")
            .await?;
        ensure!(failures >= 1.0, "{failures} failed publishes");
        Ok(())
    })
    .await?;
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
