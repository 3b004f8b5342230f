//! The tenants' verifiable logs against real workers: every stored event in its tenant's log
//! once, with no gap, in leaves that are the events' stored bytes; signed checkpoints a note
//! verifier accepts whose roots a reference computation reproduces; a sequencer killed
//! mid-load taken over without a gap or a repeat.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use auditbridge_tests::{TestEnv, Worker, eventually};
use auditbridge_tlog::note::open_checkpoint;
use auditbridge_tlog::tree::root;
use auditbridge_tlog::{Hash, SignerKey, leaf_hash};
use sqlx::Row as _;

const WAIT: Duration = Duration::from_secs(60);

/// A fresh signing key in a file of the test's own.
pub(crate) fn key_file(env: &TestEnv) -> anyhow::Result<(SignerKey, std::path::PathBuf)> {
    let key = SignerKey::generate("audit.test/log")?;
    let path = std::env::temp_dir().join(format!("ab-logkey-{}", env.tag));
    std::fs::write(&path, key.to_private_text())?;
    Ok((key, path))
}

/// Every tenant's leaves, in log order: (index, event id, leaf hash, the event's stored text).
async fn leaves(
    env: &TestEnv,
) -> anyhow::Result<HashMap<String, Vec<(i64, uuid::Uuid, Hash, String)>>> {
    let rows = sqlx::query(
        "SELECT l.tenant, l.log_index, l.event_id, l.leaf_hash, e.event::text AS json \
         FROM log_leaves l JOIN audit_events e ON e.id = l.event_id \
         ORDER BY l.tenant, l.log_index",
    )
    .fetch_all(&env.pool)
    .await?;
    let mut out: HashMap<String, Vec<_>> = HashMap::new();
    for r in rows {
        let hash: Vec<u8> = r.try_get("leaf_hash")?;
        out.entry(r.try_get("tenant")?).or_default().push((
            r.try_get("log_index")?,
            r.try_get("event_id")?,
            hash.try_into()
                .map_err(|_| anyhow::anyhow!("a leaf hash of another length"))?,
            r.try_get("json")?,
        ));
    }
    Ok(out)
}

/// Waits until every stored event is in a log, then checks each tenant's: as many leaves as
/// stored events, indexes 0..n with no gap, each leaf the hash of the event's stored bytes.
pub(crate) async fn check_logs(
    env: &TestEnv,
    stored: i64,
) -> anyhow::Result<HashMap<String, Vec<Hash>>> {
    eventually(
        "every stored event to be in its tenant's log",
        WAIT,
        async || {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM log_leaves")
                .fetch_one(&env.pool)
                .await?;
            ensure!(n == stored, "{n} of {stored} events sequenced");
            Ok(())
        },
    )
    .await?;
    let per_tenant: Vec<(String, i64)> =
        sqlx::query_as("SELECT tenant, count(*) FROM audit_events GROUP BY tenant")
            .fetch_all(&env.pool)
            .await?;
    let logs = leaves(env).await?;
    ensure!(
        logs.len() == per_tenant.len(),
        "tenants: {} logs, {} stored",
        logs.len(),
        per_tenant.len()
    );
    let mut hashes = HashMap::new();
    for (tenant, count) in per_tenant {
        let log = &logs[&tenant];
        ensure!(
            log.len() as i64 == count,
            "{tenant}: {} leaves, {count} events",
            log.len()
        );
        for (i, (index, id, hash, json)) in log.iter().enumerate() {
            ensure!(
                *index == i as i64,
                "{tenant}: index {index} at position {i}"
            );
            ensure!(
                *hash == leaf_hash(json.as_bytes()),
                "{tenant}: leaf {index} ({id}) is not its event's bytes"
            );
        }
        hashes.insert(tenant, log.iter().map(|l| l.2).collect());
    }
    Ok(hashes)
}

/// Waits for each tenant's newest checkpoint to cover its whole log, then checks it: signed
/// by `key` (a plain note verifier's check, and the timestamped cosignature), origin
/// `<log name>/<tenant>`, and the root a reference computation gets from the leaves.
pub(crate) async fn check_checkpoints(
    env: &TestEnv,
    key: &SignerKey,
    logs: &HashMap<String, Vec<Hash>>,
) -> anyhow::Result<()> {
    for (tenant, leaves) in logs {
        let note: String = eventually("a checkpoint of the whole log", WAIT, async || {
            let row: Option<(i64, String)> = sqlx::query_as(
                "SELECT tree_size, note FROM log_checkpoints WHERE tenant = $1 AND signed \
                 ORDER BY id DESC LIMIT 1",
            )
            .bind(tenant)
            .fetch_optional(&env.pool)
            .await?;
            match row {
                Some((size, note)) if size as usize == leaves.len() => Ok(note),
                other => anyhow::bail!(
                    "{tenant}: newest checkpoint {:?} of {}",
                    other.map(|o| o.0),
                    leaves.len()
                ),
            }
        })
        .await?;
        let opened = open_checkpoint(&note, &key.verifier()).context("the note verifies")?;
        ensure!(
            opened.checkpoint.origin == format!("audit.test/log/{tenant}"),
            "{note}"
        );
        ensure!(
            opened.checkpoint.root == root(leaves),
            "{tenant}: the root is not the leaves'"
        );
        let signed_at = opened.signed_at.context("a timestamped cosignature")?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs();
        ensure!(
            signed_at <= now && now - signed_at < 600,
            "signed at {signed_at}, now {now}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_sequence_every_event_once_and_sign_checkpoints() -> anyhow::Result<()> {
    let mut env = TestEnv::new().await?;
    let (key, path) = key_file(&env)?;
    let path_s = path.to_string_lossy().into_owned();
    let vars = [
        ("AUDITBRIDGE_LOG_KEY_FILE", path_s.as_str()),
        ("AUDITBRIDGE_LOG_CHECKPOINT_INTERVAL", "1s"),
        ("AUDITBRIDGE_BATCH_SIZE", "50"),
    ];
    let mut workers: Vec<Worker> = Vec::new();
    for name in ["w1", "w2", "w3"] {
        workers.push(env.spawn_worker(name, &vars).await?);
    }
    for w in &workers {
        w.wait_ready(WAIT).await?;
    }
    // Three workers committing small batches at once: their transactions commit out of order.
    // `log audit` run meanwhile, against logs that grow under it, finds nothing.
    let events = env.events(3_000);
    let publishing = env.publish(&events);
    let auditing = async {
        for _ in 0..3 {
            let out = env
                .command(&["log", "audit"], &[("AUDITBRIDGE_LOG_KEY_FILE", &path_s)])
                .output()
                .await?;
            ensure!(
                out.status.code() == Some(0),
                "an audit beside the sequencer: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        anyhow::Ok(())
    };
    let (published, audited) = tokio::join!(publishing, auditing);
    published?;
    audited?;
    env.wait_for_count(3_000, WAIT).await?;
    let logs = check_logs(&env, 3_000).await?;
    check_checkpoints(&env, &key, &logs).await?;
    let holders: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM destinations WHERE name = '_log' AND lease_holder IS NOT NULL",
    )
    .fetch_one(&env.pool)
    .await?;
    ensure!(holders == 1, "{holders} sequencers");

    // `status` shows the log (not as a destination): every tenant's size and its signed
    // checkpoint; the sequencer's row cannot be rewound.
    let out = env
        .command(
            &["status", "--json"],
            &[("AUDITBRIDGE_LOG_KEY_FILE", &path_s)],
        )
        .output()
        .await?;
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let tenants = doc["log"]["tenants"].as_array().context("log tenants")?;
    ensure!(tenants.len() == logs.len(), "{doc}");
    for t in tenants {
        let name = t["tenant"].as_str().unwrap_or("");
        ensure!(
            t["tree_size"].as_u64() == Some(logs[name].len() as u64),
            "{t}"
        );
        ensure!(t["checkpoint_signed"] == true, "{t}");
    }
    ensure!(doc["log"]["sequencer"]["unsequenced_events"] == 0, "{doc}");
    ensure!(
        doc["destinations"].as_array().is_some_and(|d| d.is_empty()),
        "the sequencer listed as a destination: {doc}"
    );
    let out = env
        .command(
            &[
                "destinations",
                "rewind",
                "_log",
                "--to",
                "2026-01-01T00:00:00Z",
            ],
            &[],
        )
        .output()
        .await?;
    ensure!(out.status.code() == Some(2), "{out:?}");
    let _ = std::fs::remove_file(path);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sequencer_killed_mid_load_is_taken_over_without_a_gap_or_a_repeat() -> anyhow::Result<()>
{
    let mut env = TestEnv::new().await?;
    let (key, path) = key_file(&env)?;
    let path_s = path.to_string_lossy().into_owned();
    let vars = [
        ("AUDITBRIDGE_LOG_KEY_FILE", path_s.as_str()),
        ("AUDITBRIDGE_LOG_CHECKPOINT_INTERVAL", "1s"),
        ("AUDITBRIDGE_LEASE_TTL", "2s"),
        ("AUDITBRIDGE_BATCH_SIZE", "100"),
    ];
    let mut workers = Vec::new();
    for name in ["w1", "w2"] {
        workers.push(env.spawn_worker(name, &vars).await?);
    }
    for w in &workers {
        w.wait_ready(WAIT).await?;
    }
    let first = env.events(2_000);
    env.publish(&first).await?;
    // The holder's id carries its pid: kill that worker while it sequences.
    let holder: String = eventually("a sequencer to hold the log's lease", WAIT, async || {
        let h: Option<String> = sqlx::query_scalar(
            "SELECT lease_holder FROM destinations WHERE name = '_log' AND lease_holder IS NOT NULL",
        )
        .fetch_optional(&env.pool)
        .await?;
        h.context("no holder yet")
    })
    .await?;
    let killed = workers
        .iter()
        .position(|w| holder.contains(&format!("-{}-", w.pid())))
        .context("the holder is one of the workers")?;
    let more = env.events(2_000);
    let publishing = env.publish(&more);
    workers[killed].signal("KILL");
    publishing.await?;
    env.wait_for_count(4_000, WAIT).await?;
    let logs = check_logs(&env, 4_000).await?;
    check_checkpoints(&env, &key, &logs).await?;
    let taken: String =
        sqlx::query_scalar("SELECT lease_holder FROM destinations WHERE name = '_log'")
            .fetch_one(&env.pool)
            .await?;
    ensure!(taken != holder, "the killed worker still holds the lease");
    let _ = std::fs::remove_file(path);
    Ok(())
}

/// Without a key the logs are built all the same; their checkpoints are not signed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_key_the_log_is_built_and_checkpoints_are_unsigned() -> anyhow::Result<()> {
    let mut env = TestEnv::new().await?;
    let worker = env
        .spawn_worker("w", &[("AUDITBRIDGE_LOG_CHECKPOINT_INTERVAL", "1s")])
        .await?;
    worker.wait_ready(WAIT).await?;
    let events = env.events(300);
    env.publish(&events).await?;
    env.wait_for_count(300, WAIT).await?;
    let logs = check_logs(&env, 300).await?;
    for (tenant, leaves) in &logs {
        let (signed, note): (bool, String) =
            eventually("an unsigned checkpoint", WAIT, async || {
                let row: Option<(bool, String, i64)> = sqlx::query_as(
                    "SELECT signed, note, tree_size FROM log_checkpoints WHERE tenant = $1 \
                 ORDER BY id DESC LIMIT 1",
                )
                .bind(tenant)
                .fetch_optional(&env.pool)
                .await?;
                match row {
                    Some((signed, note, size)) if size as usize == leaves.len() => {
                        Ok((signed, note))
                    }
                    _ => anyhow::bail!("no checkpoint of the whole log yet"),
                }
            })
            .await?;
        ensure!(!signed, "{note}");
        let checkpoint = auditbridge_tlog::Checkpoint::parse(&note)?;
        ensure!(
            checkpoint.root == root(leaves) && checkpoint.origin == format!("auditbridge/{tenant}"),
            "{note}"
        );
    }
    let out = env.command(&["status"], &[]).output().await?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        text.contains("AUDITBRIDGE_LOG_KEY_FILE is not set"),
        "{text}"
    );
    ensure!(text.contains("UNSIGNED"), "{text}");
    Ok(())
}

fn unbase64(v: &serde_json::Value) -> anyhow::Result<Hash> {
    use base64::Engine as _;
    let bytes =
        base64::engine::general_purpose::STANDARD.decode(v.as_str().context("a string")?)?;
    bytes
        .try_into()
        .map_err(|_| anyhow::anyhow!("not 32 bytes"))
}

/// `serve`'s log endpoints: the newest signed checkpoint as a note the verifier key opens; each
/// event's inclusion proof and a consistency proof, checked by the RFC 9162 verifiers against
/// roots taken from verified notes only; another tenant's token learns nothing; without a
/// signed checkpoint the answer is 503 naming the setting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_gives_checkpoints_and_proofs_a_verifier_accepts() -> anyhow::Result<()> {
    use auditbridge_tests::api::{ApiServer, Token};
    use auditbridge_tlog::tree::{verify_consistency, verify_inclusion};

    let mut env = TestEnv::new().await?;
    let (key, path) = key_file(&env)?;
    let path_s = path.to_string_lossy().into_owned();
    let worker = env
        .spawn_worker(
            "w",
            &[
                ("AUDITBRIDGE_LOG_KEY_FILE", path_s.as_str()),
                ("AUDITBRIDGE_LOG_CHECKPOINT_INTERVAL", "1s"),
            ],
        )
        .await?;
    worker.wait_ready(WAIT).await?;
    let admin = Token::admin("ops", &["read"]);
    let api = ApiServer::start(&env, &[&admin], &[]).await?;

    let first = env.events(100);
    env.publish(&first).await?;
    env.wait_for_count(100, WAIT).await?;
    let logs = check_logs(&env, 100).await?;
    check_checkpoints(&env, &key, &logs).await?;
    let (tenant, leaves) = logs
        .iter()
        .max_by_key(|(_, l)| l.len())
        .context("a tenant")?;
    let old_size = leaves.len() as u64;
    let (status, body) = api
        .get(&format!("/v1/log/checkpoint?tenant={tenant}"), Some(&admin))
        .await?;
    ensure!(status == 200, "{body}");
    let old_note = body.as_str().context("the note as text")?.to_owned();
    let old = open_checkpoint(&old_note, &key.verifier())?.checkpoint;
    ensure!(old.size == old_size, "{old_note}");

    let more = env.events(200);
    env.publish(&more).await?;
    env.wait_for_count(300, WAIT).await?;
    let logs = check_logs(&env, 300).await?;
    check_checkpoints(&env, &key, &logs).await?;
    let ids: Vec<(uuid::Uuid, i64)> = sqlx::query_as(
        "SELECT event_id, log_index FROM log_leaves WHERE tenant = $1 ORDER BY log_index",
    )
    .bind(tenant)
    .fetch_all(&env.pool)
    .await?;
    for (id, index) in &ids {
        let (status, proof) = api
            .get(&format!("/v1/events/{id}/proof"), Some(&admin))
            .await?;
        ensure!(status == 200, "{proof}");
        // The root comes from the note, once it verified; nothing else of the answer is trusted.
        let note = proof["checkpoint"].as_str().context("the checkpoint")?;
        let cp = open_checkpoint(note, &key.verifier())?.checkpoint;
        // The leaf is the hash of exactly the body GET /v1/events/{id} returns.
        let body = api
            .http
            .get(api.url(&format!("/v1/events/{id}")))
            .bearer_auth(&admin.token)
            .send()
            .await?
            .text()
            .await?;
        let leaf = leaf_hash(body.as_bytes());
        ensure!(
            proof["leaf_hash"]
                == base64::Engine::encode(&base64::engine::general_purpose::STANDARD, leaf),
            "{proof}"
        );
        let hashes: Vec<Hash> = proof["hashes"]
            .as_array()
            .context("hashes")?
            .iter()
            .map(unbase64)
            .collect::<anyhow::Result<_>>()?;
        ensure!(
            proof["log_index"] == *index && proof["tree_size"] == cp.size,
            "{proof}"
        );
        verify_inclusion(*index as u64, cp.size, &leaf, &hashes, &cp.root)
            .with_context(|| format!("event {id} at {index}: {proof}"))?;
        // Against an older size too.
        if (*index as u64) < old_size {
            let (status, p) = api
                .get(
                    &format!("/v1/events/{id}/proof?size={old_size}"),
                    Some(&admin),
                )
                .await?;
            ensure!(status == 200, "{p}");
            let hashes: Vec<Hash> = p["hashes"]
                .as_array()
                .context("hashes")?
                .iter()
                .map(unbase64)
                .collect::<anyhow::Result<_>>()?;
            verify_inclusion(*index as u64, old_size, &leaf, &hashes, &old.root)?;
        }
    }
    let (status, c) = api
        .get(
            &format!("/v1/log/consistency?tenant={tenant}&from={old_size}"),
            Some(&admin),
        )
        .await?;
    ensure!(status == 200, "{c}");
    let new =
        open_checkpoint(c["checkpoint"].as_str().context("note")?, &key.verifier())?.checkpoint;
    let hashes: Vec<Hash> = c["hashes"]
        .as_array()
        .context("hashes")?
        .iter()
        .map(unbase64)
        .collect::<anyhow::Result<_>>()?;
    verify_consistency(old_size, new.size, &old.root, &new.root, &hashes)?;

    // Sizes out of range are refused by name; another tenant's token learns nothing.
    let (id, _) = ids[0];
    let (status, _) = api
        .get(&format!("/v1/events/{id}/proof?size=0"), Some(&admin))
        .await?;
    ensure!(status == 400);
    let (status, _) = api
        .get(
            &format!("/v1/log/consistency?tenant={tenant}&from=5&to=999999"),
            Some(&admin),
        )
        .await?;
    ensure!(status == 400);
    let other = Token::tenant("other", "zz-nobody", &["read"]);
    let api2 = ApiServer::start(&env, &[&other], &[]).await?;
    let (status, _) = api2
        .get(&format!("/v1/events/{id}/proof"), Some(&other))
        .await?;
    ensure!(status == 404, "another tenant's event is not found");
    let (status, _) = api2
        .get(&format!("/v1/log/checkpoint?tenant={tenant}"), Some(&other))
        .await?;
    ensure!(status == 403);
    let (status, body) = api2.get("/v1/log/checkpoint", Some(&other)).await?;
    ensure!(
        status == 503 && body.to_string().contains("AUDITBRIDGE_LOG_KEY_FILE"),
        "{status} {body}"
    );
    let _ = std::fs::remove_file(path);
    Ok(())
}

/// The note of a forwarded checkpoint message, if `body` is one of `tenant`'s.
fn checkpoint_note(body: &[u8]) -> Option<(String, String)> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    (v["type"] == "checkpoint").then(|| {
        (
            v["tenant"].as_str().unwrap_or("").to_owned(),
            v["note"].as_str().unwrap_or("").to_owned(),
        )
    })
}

/// Destinations with `"checkpoints": true` get every tenant's new checkpoints, one message
/// each: RabbitMQ with routing key `_log.<tenant>`, only for the tenants `filter.tenants`
/// takes; HTTP as `{"type": "checkpoint", …}`, through a run of 500s, none lost. Each note
/// verifies and the newest covers the tenant's whole log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_reach_the_destinations_that_ask_for_them() -> anyhow::Result<()> {
    use auditbridge_tests::rabbit::TestBroker;
    use auditbridge_tests::receiver::{Answer, Receiver};

    let mut env = TestEnv::new().await?;
    env.ensure_stream().await?;
    let (key, path) = key_file(&env)?;
    let path_s = path.to_string_lossy().into_owned();
    let rx = Receiver::start().await?;
    rx.answer(Answer::Status(500));
    let broker = TestBroker::new(&env.tag).await?;
    let events = env.events(300);
    let wanted = events[0].tenant.clone();
    // A broker that routes only `wanted`'s checkpoints: it returns every other tenant's (and
    // every event), which must not hold `wanted`'s back.
    let picky = TestBroker::bound(&format!("{}p", env.tag), &format!("_log.{wanted}")).await?;
    let destinations = serde_json::json!([
        broker.destination(
            "bus",
            serde_json::json!({"checkpoints": true, "filter": {"tenants": [wanted]}})
        ),
        picky.destination(
            "picky",
            serde_json::json!({"checkpoints": true, "retry_min": "50ms", "retry_max": "1s"})
        ),
        {"name": "siem", "type": "http", "params": {"url": rx.url("/siem"), "checkpoints": true,
            "start": "earliest", "retry_min": "50ms", "retry_max": "500ms"}},
    ])
    .to_string();
    let worker = env
        .spawn_worker(
            "w",
            &[
                ("AUDITBRIDGE_LOG_KEY_FILE", path_s.as_str()),
                ("AUDITBRIDGE_LOG_CHECKPOINT_INTERVAL", "1s"),
                ("AUDITBRIDGE_DESTINATIONS", destinations.as_str()),
            ],
        )
        .await?;
    worker.wait_ready(WAIT).await?;
    env.publish(&events).await?;
    env.wait_for_count(300, WAIT).await?;
    let logs = check_logs(&env, 300).await?;
    check_checkpoints(&env, &key, &logs).await?;
    eventually("checkpoint posts refused with 500", WAIT, async || {
        let refused = rx
            .requests()
            .iter()
            .filter(|r| r.answered == 500 && checkpoint_note(&r.body).is_some())
            .count();
        ensure!(refused >= 3, "{refused} refused so far");
        Ok(())
    })
    .await?;
    rx.answer(Answer::Ok);

    // HTTP: every tenant's whole log, in a note that verifies, with its headers.
    eventually(
        "every tenant's newest checkpoint over HTTP",
        WAIT,
        async || {
            let mut newest: HashMap<String, u64> = HashMap::new();
            for r in rx.requests().iter().filter(|r| r.answered == 200) {
                let Some((tenant, note)) = checkpoint_note(&r.body) else {
                    continue;
                };
                let cp = open_checkpoint(&note, &key.verifier())?.checkpoint;
                ensure!(cp.origin == format!("audit.test/log/{tenant}"), "{note}");
                ensure!(
                    r.headers.get("content-type").and_then(|v| v.to_str().ok())
                        == Some("application/json")
                        && r.headers
                            .get("idempotency-key")
                            .and_then(|v| v.to_str().ok())
                            .is_some_and(|k| k.starts_with("checkpoint-")),
                    "{:?}",
                    r.headers
                );
                let n = newest.entry(tenant).or_default();
                *n = (*n).max(cp.size);
            }
            for (tenant, leaves) in &logs {
                ensure!(
                    newest.get(tenant) == Some(&(leaves.len() as u64)),
                    "{tenant}: newest {:?} of {}",
                    newest.get(tenant),
                    leaves.len()
                );
            }
            Ok(())
        },
    )
    .await?;

    // RabbitMQ: only the filtered tenant's, routing key `_log.<tenant>`.
    let mut got = Vec::new();
    let size = logs[&wanted].len() as u64;
    let key_v = key.verifier();
    broker
        .collect_until(WAIT, &mut got, |got| {
            got.iter().any(|m| {
                m.routing_key == format!("_log.{wanted}")
                    && checkpoint_note(&m.body).is_some_and(|(_, note)| {
                        open_checkpoint(&note, &key_v).is_ok_and(|c| c.checkpoint.size == size)
                    })
            })
        })
        .await?;
    // The picky broker: `wanted`'s newest checkpoint arrives although the others' are refused.
    let mut picked = Vec::new();
    picky
        .collect_until(WAIT, &mut picked, |got| {
            got.iter().any(|m| {
                checkpoint_note(&m.body).is_some_and(|(_, note)| {
                    open_checkpoint(&note, &key_v).is_ok_and(|c| c.checkpoint.size == size)
                })
            })
        })
        .await
        .context("one tenant's refused checkpoints held another's back")?;
    for m in got.iter().filter(|m| m.routing_key.starts_with("_log.")) {
        let (tenant, _) = checkpoint_note(&m.body).context("a checkpoint body")?;
        ensure!(
            tenant == wanted && m.routing_key == format!("_log.{wanted}"),
            "a checkpoint the filter does not take: {} {tenant}",
            m.routing_key
        );
    }

    // `status` shows the checkpoint cursor with its destination, not as one of its own.
    let out = env
        .command(
            &["status", "--json"],
            &[("AUDITBRIDGE_DESTINATIONS", destinations.as_str())],
        )
        .output()
        .await?;
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let list = doc["destinations"].as_array().context("destinations")?;
    ensure!(
        list.len() == 3
            && list
                .iter()
                .all(|d| !d["name"].as_str().unwrap_or("_").starts_with('_')),
        "{doc}"
    );
    let siem = list.iter().find(|d| d["name"] == "siem").context("siem")?;
    ensure!(
        siem["checkpoints"]["delivered_total"].as_i64() >= Some(logs.len() as i64),
        "{siem}"
    );
    let _ = std::fs::remove_file(path);
    Ok(())
}

/// The proofs `serve` computes from the stored tiles (`Store::log_range_hashes`: leaves, and
/// subtrees of height 8 and 16, read back in ranges) equal the reference computation from
/// the leaves themselves, for trees on both sides of every tile boundary up to three levels,
/// and each verifies against the reference root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_tiles_give_the_reference_proofs_for_many_sizes() -> anyhow::Result<()> {
    use auditbridge_store::log::{LOG_CURSOR, LogLeaf, LogNode};
    use auditbridge_tlog::Frontier;
    use auditbridge_tlog::stored::stored_node;
    use auditbridge_tlog::tree::{
        consistency_ranges, inclusion_ranges, range_hashes, verify_consistency, verify_inclusion,
    };

    let env = TestEnv::new().await?;
    const N: u64 = 66_000;
    let leaves: Vec<Hash> = (0..N).map(|i| leaf_hash(&i.to_be_bytes())).collect();
    // Appended the sequencer's way: the leaves and the subtrees they complete, under its lease.
    let store = auditbridge_store::Store::connect_lazy(&env.database_url, 2)?;
    store.register_log().await?;
    let state = store
        .acquire_lease(LOG_CURSOR, "test", Duration::from_secs(600))
        .await?
        .context("the log's lease")?;
    let mut tree = Frontier::new();
    let (mut log_leaves, mut log_nodes) = (Vec::new(), Vec::new());
    for (i, leaf) in leaves.iter().enumerate() {
        log_leaves.push(LogLeaf {
            tenant: "acme".into(),
            index: i as u64,
            event_id: uuid::Uuid::now_v7(),
            hash: *leaf,
        });
        for (subtree, hash) in tree.push(*leaf) {
            let (level, index) = stored_node(subtree).context("a stored node")?;
            log_nodes.push(LogNode {
                tenant: "acme".into(),
                level,
                index,
                hash,
            });
        }
    }
    ensure!(
        log_nodes.iter().any(|n| n.level == 2),
        "a subtree of height 16 is stored"
    );
    ensure!(
        store
            .append_log(
                "test",
                &state.cursor,
                &state.cursor,
                &log_leaves,
                &log_nodes
            )
            .await?,
        "appended under the lease"
    );

    let sizes = [
        1u64, 2, 3, 7, 8, 255, 256, 257, 511, 512, 513, 4_095, 4_096, 65_535, 65_536, 65_537, N,
    ];
    for &n in &sizes {
        let r = root(&leaves[..n as usize]);
        let mut picks = vec![0, n / 2, n - 1, n.saturating_sub(257), 255.min(n - 1)];
        picks.dedup();
        for m in picks {
            let ranges = inclusion_ranges(m, n);
            let stored = store.log_range_hashes("acme", &ranges).await?;
            ensure!(
                stored == range_hashes(&ranges, &leaves),
                "inclusion of {m} in {n}"
            );
            verify_inclusion(m, n, &leaves[m as usize], &stored, &r)?;
        }
        for &old in sizes.iter().filter(|&&o| o <= n) {
            let ranges = consistency_ranges(old, n);
            let stored = store.log_range_hashes("acme", &ranges).await?;
            ensure!(
                stored == range_hashes(&ranges, &leaves),
                "consistency {old} -> {n}"
            );
            verify_consistency(old, n, &root(&leaves[..old as usize]), &r, &stored)?;
        }
    }
    store.close().await;
    Ok(())
}
