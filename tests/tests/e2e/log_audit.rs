//! `auditbridge log export`, `log verify` and `log audit` against tampering by a database
//! superuser: with the append-only triggers dropped, one tenant's event is changed, another's
//! deleted, a third's two entries swapped and a fourth's log cut back; each is found, by
//! `audit` from the database and by `verify` on a bundle exported after it, naming the
//! tenant, the index and the event, and the untouched tenant stays clean. A bundle is also
//! checked by an independent verifier written in Python with hashlib and `cryptography`.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use anyhow::ensure;
use auditbridge_tests::{TempDir, TestEnv};

use super::log::{check_checkpoints, check_logs, key_file};

const WAIT: Duration = Duration::from_secs(60);
const VERIFIER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/verify_bundle.py");

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

async fn run(env: &TestEnv, args: &[&str], key_file: &str) -> anyhow::Result<Output> {
    Ok(env
        .command(args, &[("AUDITBRIDGE_LOG_KEY_FILE", key_file)])
        .output()
        .await?)
}

async fn export(env: &TestEnv, tenant: &str, out: &Path, key_file: &str) -> anyhow::Result<()> {
    let out_s = out.to_string_lossy();
    let done = run(
        env,
        &["log", "export", "--tenant", tenant, "--out", &out_s],
        key_file,
    )
    .await?;
    ensure!(done.status.success(), "export {tenant}: {}", text(&done));
    Ok(())
}

/// `log verify` needs no database: it runs with nothing but the bundle and the key.
async fn verify(bundle: &Path, key: &str) -> anyhow::Result<Output> {
    let binary = auditbridge_tests::binary();
    Ok(tokio::process::Command::new(binary)
        .args(["log", "verify"])
        .arg(bundle)
        .args(["--key", key])
        .env_clear()
        .output()
        .await?)
}

async fn python_verify(bundle: &Path, key: &str) -> anyhow::Result<Output> {
    Ok(tokio::process::Command::new("python3")
        .arg(VERIFIER)
        .arg(bundle)
        .arg(key)
        .output()
        .await?)
}

/// The event at `index` of `tenant`'s log.
async fn event_at(env: &TestEnv, tenant: &str, index: i64) -> anyhow::Result<uuid::Uuid> {
    Ok(
        sqlx::query_scalar("SELECT event_id FROM log_leaves WHERE tenant = $1 AND log_index = $2")
            .bind(tenant)
            .bind(index)
            .fetch_one(&env.pool)
            .await?,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampering_by_a_superuser_is_found_by_audit_and_by_verify() -> anyhow::Result<()> {
    let mut env = TestEnv::new().await?;
    let (key, path) = key_file(&env)?;
    let key_path = path.to_string_lossy().into_owned();
    let vk = key.verifier().to_string();
    let scratch = TempDir::new("ab-bundles")?;
    let mut worker = env
        .spawn_worker(
            "w",
            &[
                ("AUDITBRIDGE_LOG_KEY_FILE", key_path.as_str()),
                ("AUDITBRIDGE_LOG_CHECKPOINT_INTERVAL", "1s"),
            ],
        )
        .await?;
    worker.wait_ready(WAIT).await?;

    // Two rounds, each covered by a checkpoint: the first round's sizes are what the fourth
    // tenant's log is cut back to; the second round's checkpoint is kept "elsewhere".
    let first = env.events(600);
    env.publish(&first).await?;
    env.wait_for_count(600, WAIT).await?;
    let logs = check_logs(&env, 600).await?;
    check_checkpoints(&env, &key, &logs).await?;
    let second = env.events(600);
    env.publish(&second).await?;
    env.wait_for_count(1_200, WAIT).await?;
    let logs_after = check_logs(&env, 1_200).await?;
    check_checkpoints(&env, &key, &logs_after).await?;
    // No sequencer re-signs while the test alters what it signed.
    worker.signal("TERM");
    worker.wait_exit(WAIT).await?;

    let mut tenants: Vec<(&String, usize)> = logs_after.iter().map(|(t, l)| (t, l.len())).collect();
    tenants.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    ensure!(tenants.len() == 5, "five tenants: {tenants:?}");
    ensure!(
        tenants.iter().all(|(t, _)| logs[*t].len() >= 8),
        "every tenant has 8 events in the first round: {tenants:?}"
    );
    let (changed, deleted, swapped, cut, clean) = (
        tenants[0].0.as_str(),
        tenants[1].0.as_str(),
        tenants[2].0.as_str(),
        tenants[3].0.as_str(),
        tenants[4].0.as_str(),
    );

    // Untampered: audit is clean, a bundle verifies with our verifier and the independent one.
    let out = run(&env, &["log", "audit"], &key_path).await?;
    ensure!(out.status.code() == Some(0), "{}", text(&out));
    let bundle = scratch.path().join("clean-before");
    export(&env, clean, &bundle, &key_path).await?;
    let out = verify(&bundle, &vk).await?;
    ensure!(out.status.code() == Some(0), "{}", text(&out));
    let out = python_verify(&bundle, &vk).await?;
    ensure!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).starts_with("OK "),
        "the independent verifier: {}",
        text(&out)
    );
    // The key inside the bundle proves nothing: another key refuses it.
    let stranger = auditbridge_tlog::SignerKey::generate("audit.test/log")?
        .verifier()
        .to_string();
    let out = verify(&bundle, &stranger).await?;
    ensure!(out.status.code() == Some(1), "{}", text(&out));
    let out = python_verify(&bundle, &stranger).await?;
    ensure!(out.status.code() == Some(1), "{}", text(&out));
    // The cut tenant's newest checkpoint, kept outside the database.
    let kept = scratch.path().join("kept-checkpoint");
    let note: String = sqlx::query_scalar(
        "SELECT note FROM log_checkpoints WHERE tenant = $1 AND signed ORDER BY id DESC LIMIT 1",
    )
    .bind(cut)
    .fetch_one(&env.pool)
    .await?;
    std::fs::write(&kept, note)?;
    let kept_s = kept.to_string_lossy().into_owned();

    // The superuser's tampering.
    for table in ["audit_events", "log_leaves", "log_nodes", "log_checkpoints"] {
        for trigger in ["no_update_delete", "no_truncate"] {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP TRIGGER {table}_{trigger} ON {table}"
            )))
            .execute(&env.pool)
            .await?;
        }
    }
    let changed_id = event_at(&env, changed, 3).await?;
    sqlx::query(
        "UPDATE audit_events SET event = jsonb_set(event, '{action}', '\"nothing.happened\"') \
         WHERE id = $1",
    )
    .bind(changed_id)
    .execute(&env.pool)
    .await?;
    // A row whose routing and query column says something else than its event.
    let recolumned = event_at(&env, changed, 4).await?;
    sqlx::query("UPDATE audit_events SET action = 'nothing.happened' WHERE id = $1")
        .bind(recolumned)
        .execute(&env.pool)
        .await?;
    let deleted_id = event_at(&env, deleted, 2).await?;
    sqlx::query("DELETE FROM audit_events WHERE id = $1")
        .bind(deleted_id)
        .execute(&env.pool)
        .await?;
    // An event slipped in behind the sequencer's cursor (an old transaction id): no relay
    // and no sequencer reads it, the query API serves it. The writer role could do this.
    let slipped = uuid::Uuid::now_v7();
    sqlx::query(
        "INSERT INTO audit_events \
             (id, tenant, action, outcome, occurred_at, actor_id, target_id, source, event, tx_id) \
         SELECT $2, tenant, action, outcome, occurred_at, actor_id, target_id, source, \
                jsonb_set(event, '{id}', to_jsonb($2::text)), '5'::xid8 \
         FROM audit_events WHERE id = $1",
    )
    .bind(event_at(&env, deleted, 0).await?)
    .bind(slipped)
    .execute(&env.pool)
    .await?;
    // Entries 1 and 5 trade places (leaf hashes and all: each still matches its event).
    let (s1, s5) = (
        event_at(&env, swapped, 1).await?,
        event_at(&env, swapped, 5).await?,
    );
    for (from, to) in [(1i64, 1_000_000i64), (5, 1), (1_000_000, 5)] {
        sqlx::query("UPDATE log_leaves SET log_index = $3 WHERE tenant = $1 AND log_index = $2")
            .bind(swapped)
            .bind(from)
            .bind(to)
            .execute(&env.pool)
            .await?;
    }
    // Back to the first round's size: entries, their events and the newer checkpoints go.
    let cut_size = logs[cut].len() as i64;
    sqlx::query(
        "DELETE FROM audit_events WHERE id IN \
         (SELECT event_id FROM log_leaves WHERE tenant = $1 AND log_index >= $2)",
    )
    .bind(cut)
    .bind(cut_size)
    .execute(&env.pool)
    .await?;
    for sql in [
        "DELETE FROM log_leaves WHERE tenant = $1 AND log_index >= $2",
        "DELETE FROM log_checkpoints WHERE tenant = $1 AND tree_size > $2",
    ] {
        sqlx::query(sql)
            .bind(cut)
            .bind(cut_size)
            .execute(&env.pool)
            .await?;
    }

    // `log audit` over every tenant: exit 1, each tampering named; the clean tenant passes.
    let out = run(&env, &["log", "audit"], &key_path).await?;
    let all = text(&out);
    ensure!(out.status.code() == Some(1), "{all}");
    let found = |tenant: &str, needle: &str| {
        all.lines()
            .any(|l| l.starts_with(&format!("TAMPERED tenant {tenant}")) && l.contains(needle))
    };
    ensure!(
        found(
            changed,
            &format!("index 3, event {changed_id}: the event was changed")
        ),
        "the change: {all}"
    );
    ensure!(
        found(
            deleted,
            &format!("index 2, event {deleted_id}: the event is gone")
        ),
        "the deletion: {all}"
    );
    ensure!(
        found(
            changed,
            &format!("index 4, event {recolumned}: the row's action column")
        ),
        "the column: {all}"
    );
    ensure!(
        found(
            deleted,
            &format!("event {slipped}: the event is in the trail, behind")
        ),
        "the event slipped in behind the cursor: {all}"
    );
    ensure!(
        found(swapped, "the log was reordered") && found(swapped, &s5.to_string()),
        "the swap of {s1} and {s5}: {all}"
    );
    ensure!(
        found(
            swapped,
            "an event among them was changed, removed, added or moved"
        ),
        "the swap against the checkpoint: {all}"
    );
    ensure!(
        !all.contains(&format!("TAMPERED tenant {clean}")),
        "the clean tenant: {all}"
    );
    ensure!(
        all.contains(&format!("tenant {clean}: ")),
        "the clean tenant reported: {all}"
    );
    // The cut is self-consistent in the database; the checkpoint kept elsewhere shows it.
    let out = run(&env, &["log", "audit", "--tenant", cut], &key_path).await?;
    ensure!(out.status.code() == Some(0), "{}", text(&out));
    let out = run(
        &env,
        &["log", "audit", "--tenant", cut, "--checkpoint", &kept_s],
        &key_path,
    )
    .await?;
    let t = text(&out);
    ensure!(
        out.status.code() == Some(1) && t.contains("the log was cut back"),
        "{t}"
    );
    // Usage: a checkpoint of another tenant than --tenant.
    let out = run(
        &env,
        &["log", "audit", "--tenant", clean, "--checkpoint", &kept_s],
        &key_path,
    )
    .await?;
    ensure!(out.status.code() == Some(2), "{}", text(&out));

    // Bundles exported after the tampering: `verify` names the same; the independent
    // verifier refuses them too; the clean tenant's still verifies.
    for (tenant, needle) in [
        (
            changed,
            format!("index 3, event {changed_id}: the event was changed"),
        ),
        (deleted, "index 2: the event is gone".to_owned()),
        (swapped, "the log was reordered".to_owned()),
    ] {
        let bundle = scratch.path().join(tenant);
        export(&env, tenant, &bundle, &key_path).await?;
        let out = verify(&bundle, &vk).await?;
        let t = text(&out);
        ensure!(
            out.status.code() == Some(1)
                && t.contains(&format!("TAMPERED tenant {tenant}"))
                && t.contains(&needle),
            "verify {tenant}, wanted {needle:?}: {t}"
        );
        let out = python_verify(&bundle, &vk).await?;
        ensure!(
            out.status.code() == Some(1),
            "python, {tenant}: {}",
            text(&out)
        );
    }
    let bundle = scratch.path().join("clean-after");
    export(&env, clean, &bundle, &key_path).await?;
    let out = verify(&bundle, &vk).await?;
    ensure!(out.status.code() == Some(0), "{}", text(&out));

    // Unreadable input exits 3; a malformed key 2.
    let out = verify(&scratch.path().join("no-such-bundle"), &vk).await?;
    ensure!(out.status.code() == Some(3), "{}", text(&out));
    let out = verify(&bundle, "not-a-key").await?;
    ensure!(out.status.code() == Some(2), "{}", text(&out));
    let _ = std::fs::remove_file(path);
    Ok(())
}

/// `log audit` against a database it cannot reach exits 3; without any key, 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_exits_3_when_the_database_is_unreachable_and_2_without_a_key() -> anyhow::Result<()>
{
    let env = TestEnv::new().await?;
    let (_key, path) = key_file(&env)?;
    let key_path = path.to_string_lossy().into_owned();
    let out = env
        .command(
            &["log", "audit"],
            &[
                ("AUDITBRIDGE_LOG_KEY_FILE", &key_path),
                (
                    "AUDITBRIDGE_DATABASE_URL",
                    "postgres://postgres@127.0.0.1:1/nothing",
                ),
            ],
        )
        .output()
        .await?;
    ensure!(out.status.code() == Some(3), "{}", text(&out));
    let out = env.command(&["log", "audit"], &[]).output().await?;
    ensure!(
        out.status.code() == Some(2) && text(&out).contains("AUDITBRIDGE_LOG_KEY_FILE"),
        "{}",
        text(&out)
    );
    let out = env
        .command(
            &[
                "log",
                "export",
                "--tenant",
                "acme",
                "--out",
                "/nonexistent/x",
            ],
            &[],
        )
        .output()
        .await?;
    ensure!(out.status.code() == Some(2), "{}", text(&out));
    let _ = std::fs::remove_file(path);
    Ok(())
}
