//! The `auditbridge` command as an operator meets it: configuration errors, `publish`,
//! `status`, signals, and the worker's health and metrics endpoints.

use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use auditbridge_tests::{TestEnv, Worker, eventually};
use tokio::io::AsyncWriteExt as _;

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn describe(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    )
}

/// Runs `auditbridge publish` with `lines` on standard input.
async fn publish_lines(env: &TestEnv, lines: &[String]) -> anyhow::Result<Output> {
    let mut child = env
        .command(&["publish"], &[])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawning auditbridge publish")?;
    let mut stdin = child.stdin.take().context("stdin is piped")?;
    for line in lines {
        stdin.write_all(line.as_bytes()).await?;
        stdin.write_all(b"\n").await?;
    }
    stdin.shutdown().await?;
    // Closing standard input is the end of the input.
    drop(stdin);
    tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .context("auditbridge publish did not finish")?
        .context("waiting for auditbridge publish")
}

async fn stream_messages(env: &TestEnv) -> anyhow::Result<u64> {
    let mut stream = env.js.get_stream(&env.stream).await?;
    Ok(stream.info().await?.state.messages)
}

/// Waits until `/metrics` has a line for `name`, and returns the page.
async fn wait_for_metric(worker: &Worker, name: &str, at_least: f64) -> anyhow::Result<String> {
    let what = format!("{name} >= {at_least} on /metrics");
    eventually(&what, Duration::from_secs(15), async || {
        let (status, body) = worker.get("/metrics").await?;
        let value = body.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
            l.strip_prefix(name)?
                .strip_prefix(' ')?
                .trim()
                .parse::<f64>()
                .ok()
        });
        ensure!(
            status == 200 && value.is_some_and(|v| v >= at_least),
            "{status}, {name} is {value:?}:\n{body}"
        );
        Ok(body)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_settings_stop_every_command_with_exit_code_2() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let commands: &[&[&str]] = &[
        &["worker"],
        &["migrate"],
        &["status"],
        &["publish", "--generate", "1"],
    ];
    let settings = [
        ("AUDITBRIDGE_BATCH_SIZE", "lots"),
        ("AUDITBRIDGE_METRICS_ADDR", "nowhere"),
        ("AUDITBRIDGE_DATABASE_URL", "mysql://x/y"),
        ("AUDITBRIDGE_LOG", "info,[unclosed"),
    ];
    for args in commands {
        for (var, value) in settings {
            let out = tokio::time::timeout(
                Duration::from_secs(10),
                env.command(args, &[(var, value)]).output(),
            )
            .await
            .with_context(|| format!("{var}={value} auditbridge {args:?} did not stop"))??;
            let stderr = text(&out.stderr);
            assert_eq!(
                out.status.code(),
                Some(2),
                "{var}={value} auditbridge {args:?}: {}",
                describe(&out)
            );
            assert!(
                stderr.contains(var) && stderr.contains(value),
                "{var}={value} auditbridge {args:?}: stderr does not name the setting: {stderr}"
            );
        }
    }

    // An unknown key in the file names the key and the file.
    let path = std::env::temp_dir().join(format!("ab_test_{}.toml", env.tag));
    std::fs::write(&path, "batch_size = 100\nbatch_sise = 3\n")?;
    let path_s = path.to_str().context("temp path is UTF-8")?.to_owned();
    let out = env
        .command(&["worker"], &[("AUDITBRIDGE_CONFIG", &path_s)])
        .output()
        .await;
    let _ = std::fs::remove_file(&path);
    let out = out?;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(stderr.contains("batch_sise"), "key not named: {stderr}");
    assert!(stderr.contains(&path_s), "file not named: {stderr}");

    // None of them got as far as touching NATS: the stream was never provisioned.
    assert!(
        env.js.get_stream(&env.stream).await.is_err(),
        "a refused command created the stream"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_generate_is_stored_by_a_worker() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        env.command(&["publish", "--generate", "300", "--tenants", "3"], &[])
            .output(),
    )
    .await
    .context("publish did not finish")??;
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        text(&out.stdout).contains("300 acknowledged"),
        "{}",
        describe(&out)
    );
    assert_eq!(stream_messages(&env).await?, 300);

    let _worker = env.spawn_worker("w", &[]).await?;
    env.wait_for_count(300, Duration::from_secs(20)).await?;
    env.wait_for_drained(Duration::from_secs(10)).await?;
    assert_eq!(env.count().await?, 300);
    let tenants: i64 = sqlx::query_scalar("SELECT count(DISTINCT tenant) FROM audit_events")
        .fetch_one(&env.pool)
        .await?;
    assert!(
        (1..=3).contains(&tenants),
        "{tenants} tenants from --tenants 3"
    );
    assert!(env.dead_letters().await?.is_empty());
    assert_eq!(stream_messages(&env).await?, 300);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_from_stdin_reports_bad_lines_and_deduplicates() -> anyhow::Result<()> {
    let mut env = TestEnv::new().await?;
    let events = env.events(2);
    let valid: Vec<String> = events
        .iter()
        .map(serde_json::to_string)
        .collect::<Result<_, _>>()?;
    let lines = vec![
        valid[0].clone(),
        r#"{"tenant":"x"}"#.to_owned(),
        String::new(),
        valid[1].clone(),
    ];

    let out = publish_lines(&env, &lines).await?;
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(stderr.contains("line 2"), "{}", describe(&out));
    assert!(
        stderr.contains("id: required field is missing"),
        "{}",
        describe(&out)
    );
    assert!(
        !stderr.contains("line 3"),
        "a blank line was reported: {stderr}"
    );
    assert!(stdout.contains("2 acknowledged"), "{}", describe(&out));
    assert!(stdout.contains("(0 duplicates)"), "{}", describe(&out));
    assert!(stdout.contains("1 invalid line"), "{}", describe(&out));

    let _worker = env.spawn_worker("w", &[]).await?;
    env.wait_for_count(2, Duration::from_secs(20)).await?;
    env.wait_for_drained(Duration::from_secs(10)).await?;
    assert_eq!(
        env.stored_ids().await?,
        events.iter().map(|e| e.id).collect()
    );

    // The same lines again: JetStream recognises the Nats-Msg-Id and stores nothing new.
    let out = publish_lines(&env, &valid).await?;
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(stdout.contains("2 acknowledged"), "{}", describe(&out));
    assert!(stdout.contains("2 duplicates"), "{}", describe(&out));
    assert_eq!(stream_messages(&env).await?, 2);
    env.wait_for_drained(Duration::from_secs(10)).await?;
    assert_eq!(env.count().await?, 2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_stream_consumer_database_and_dead_letters() -> anyhow::Result<()> {
    let mut env = TestEnv::new().await?;
    let _worker = env.spawn_worker("w", &[]).await?;
    let events = env.events(12);
    env.publish(&events).await?;
    // Poison: not JSON, and a valid event on another tenant's subject.
    env.publish_raw(&format!("{}.acme.user.login", env.prefix), "not json", None)
        .await?
        .await?;
    let mut stray = env.events(1).remove(0);
    stray.tenant = "acme".into();
    stray.action = "user.login".into();
    env.publish_raw(
        &format!("{}.globex.user.login", env.prefix),
        serde_json::to_vec(&stray)?,
        Some(&stray.id.to_string()),
    )
    .await?
    .await?;

    env.wait_for_count(12, Duration::from_secs(20)).await?;
    eventually("two dead letters", Duration::from_secs(20), async || {
        let dead = env.dead_letters().await?;
        ensure!(dead.len() >= 2, "dead letters: {dead:?}");
        Ok(())
    })
    .await?;
    env.wait_for_drained(Duration::from_secs(10)).await?;

    let out = env.command(&["status", "--json"], &[]).output().await?;
    assert!(out.status.success(), "{}", describe(&out));
    let doc: serde_json::Value =
        serde_json::from_slice(&out.stdout).with_context(|| describe(&out))?;
    assert_eq!(doc["database"]["events"], 12, "{doc:#}");
    assert_eq!(
        doc["database"]["name"],
        format!("ab_test_{}", env.tag),
        "{doc:#}"
    );
    assert_eq!(doc["consumer"]["pending"], 0, "{doc:#}");
    assert_eq!(doc["consumer"]["ack_pending"], 0, "{doc:#}");
    assert_eq!(doc["stream"]["messages"], 14, "{doc:#}");
    let mut kinds: Vec<(String, i64)> = doc["dead_letters"]
        .as_array()
        .context("dead_letters is an array")?
        .iter()
        .map(|d| {
            (
                d["kind"].as_str().unwrap_or_default().to_owned(),
                d["count"].as_i64().unwrap_or(-1),
            )
        })
        .collect();
    kinds.sort();
    assert_eq!(
        kinds,
        [
            ("not_json".to_owned(), 1),
            ("subject_mismatch".to_owned(), 1)
        ],
        "{doc:#}"
    );

    // The text form.
    let out = env.command(&["status"], &[]).output().await?;
    assert!(out.status.success(), "{}", describe(&out));
    let stdout = text(&out.stdout);
    for start in ["stream", "consumer", "database", "dead letters"] {
        assert!(
            stdout.lines().any(|l| l.starts_with(start)),
            "no line starts with {start:?}:\n{stdout}"
        );
    }
    assert!(stdout.contains("12 events stored"), "{stdout}");
    assert!(
        stdout
            .lines()
            .any(|l| l.trim_start().starts_with("not_json")),
        "{stdout}"
    );

    // NATS unreachable: the database part still answers, and the exit code says something
    // is wrong.
    let unreachable = [("AUDITBRIDGE_NATS_URL", "nats://127.0.0.1:1")];
    let started = Instant::now();
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        env.command(&["status", "--json"], &unreachable).output(),
    )
    .await
    .context("status hung on an unreachable NATS")??;
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(started.elapsed() < Duration::from_secs(15));
    let doc: serde_json::Value =
        serde_json::from_slice(&out.stdout).with_context(|| describe(&out))?;
    assert_eq!(doc["database"]["events"], 12, "{doc:#}");
    assert!(doc["nats"]["error"].is_string(), "{doc:#}");
    let out = env.command(&["status"], &unreachable).output().await?;
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let stdout = text(&out.stdout);
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("database") && l.contains("12 events stored")),
        "{stdout}"
    );
    Ok(())
}

async fn idle_worker_stops_on(signal: &str) -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let mut worker = env.spawn_worker(&signal.to_lowercase(), &[]).await?;
    worker.wait_ready(Duration::from_secs(20)).await?;
    worker.signal(signal);
    let status = worker.wait_exit(Duration::from_secs(20)).await?;
    let log = worker.log_text();
    assert!(
        status.success(),
        "SIG{signal}: exited {status:?}; log:\n{log}"
    );
    assert!(
        log.contains(&format!("SIG{signal}")),
        "the log does not mention SIG{signal}:\n{log}"
    );
    assert!(log.contains("Worker stopped."), "{log}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_worker_exits_cleanly_on_sigterm() -> anyhow::Result<()> {
    idle_worker_stops_on("TERM").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_worker_exits_cleanly_on_sigint() -> anyhow::Result<()> {
    idle_worker_stops_on("INT").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_and_metrics_endpoints() -> anyhow::Result<()> {
    let mut env = TestEnv::new().await?;
    let mut worker = env.spawn_worker("w", &[]).await?;

    // /healthz answers as soon as the port is served.
    eventually(
        "/healthz to answer",
        Duration::from_secs(15),
        async || match worker.get("/healthz").await {
            Ok((status, _)) => {
                assert_eq!(status, 200);
                Ok(())
            }
            Err(e) => {
                assert!(worker.is_running(), "worker died: {}", worker.log_text());
                Err(e)
            }
        },
    )
    .await?;

    worker.wait_ready(Duration::from_secs(20)).await?;
    let (status, body) = worker.get("/readyz").await?;
    assert_eq!(status, 200, "{body}");
    let ready: serde_json::Value = serde_json::from_str(&body).context(body.clone())?;
    assert_eq!(
        ready,
        serde_json::json!({"database": true, "nats": true, "consumer": true})
    );

    let events = env.events(10);
    env.publish(&events).await?;
    env.wait_for_count(10, Duration::from_secs(20)).await?;
    let body = wait_for_metric(&worker, "auditbridge_events_persisted_total", 10.0).await?;
    assert!(
        body.contains("auditbridge_consumer_pending_messages"),
        "{body}"
    );
    // Once drained, the gauge comes down to 0 (it is refreshed every few seconds).
    env.wait_for_drained(Duration::from_secs(10)).await?;
    let what = "auditbridge_consumer_pending_messages to come down to 0";
    eventually(what, Duration::from_secs(15), async || {
        let (_, body) = worker.get("/metrics").await?;
        let pending = body.lines().find_map(|l| {
            l.strip_prefix("auditbridge_consumer_pending_messages ")?
                .trim()
                .parse::<f64>()
                .ok()
        });
        ensure!(pending == Some(0.0), "it is {pending:?}:\n{body}");
        Ok(())
    })
    .await?;
    Ok(())
}

/// `publish` scopes `Nats-Msg-Id` to the tenant: a line of tenant `globex` published first
/// with the id an `acme` event will carry does not make JetStream drop the `acme` event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_does_not_let_another_tenants_id_suppress_an_event() -> anyhow::Result<()> {
    let mut env = TestEnv::new().await?;
    let victim = env.events(1).remove(0);
    let mut squatter = victim.clone();
    squatter.tenant = if victim.tenant == "globex" {
        "initech".into()
    } else {
        "globex".into()
    };
    let out = publish_lines(&env, &[serde_json::to_string(&squatter)?]).await?;
    assert!(out.status.success(), "{}", describe(&out));
    let out = publish_lines(&env, &[serde_json::to_string(&victim)?]).await?;
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        text(&out.stdout).contains("(0 duplicates)"),
        "{}",
        describe(&out)
    );
    assert_eq!(stream_messages(&env).await?, 2);
    Ok(())
}

/// A source whose mapping derives ids cannot run without `AUDITBRIDGE_ID_KEY`: `serve` and
/// `tail-file` refuse to start with an error that names the setting and says how to make one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sources_that_derive_ids_refuse_to_start_without_the_id_key() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let mapping = serde_json::json!({"id": "/id", "tenant": {"const": "acme"}, "type": "/t",
        "actions": {"x": "thing.do"}, "actor": {"id": "/u"}});
    let sources = serde_json::json!([
        {"name": "vendor", "type": "webhook",
         "params": {"secret": "vendor-secret-0123456789", "mapping": mapping}},
        {"name": "app", "type": "file",
         "params": {"path": "/nonexistent/audit.jsonl", "mapping": mapping}}
    ])
    .to_string();
    for args in [&["serve"][..], &["tail-file"][..]] {
        let out = env
            .command(
                args,
                &[
                    ("AUDITBRIDGE_SOURCES", &sources),
                    ("AUDITBRIDGE_ID_KEY", ""),
                    ("AUDITBRIDGE_API_ADDR", "127.0.0.1:0"),
                ],
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .await?;
        let all = describe(&out);
        assert!(!out.status.success(), "{args:?}: {all}");
        assert!(all.contains("AUDITBRIDGE_ID_KEY"), "{args:?}: {all}");
        assert!(all.contains("openssl rand -hex 32"), "{args:?}: {all}");
    }
    // A key shorter than the minimum is refused without being printed.
    let short = "short-key-1234";
    let out = env
        .command(
            &["serve"],
            &[
                ("AUDITBRIDGE_SOURCES", &sources),
                ("AUDITBRIDGE_ID_KEY", short),
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .await?;
    let all = describe(&out);
    assert!(!out.status.success(), "{all}");
    assert!(all.contains("AUDITBRIDGE_ID_KEY"), "{all}");
    assert!(!all.contains(short), "the key was printed: {all}");
    Ok(())
}

/// `log keygen` writes a private key only its owner can read, prints its verifier key, and
/// never overwrites a key; a bad name exits 2 naming `--name`.
#[test]
fn log_keygen_writes_a_private_key_and_prints_its_verifier() -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;

    let dir = std::env::temp_dir().join(format!("ab-keygen-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir)?;
    let out = dir.join("log.key");
    let keygen = |name: &str| {
        std::process::Command::new(auditbridge_tests::binary())
            .args(["log", "keygen", "--name", name, "--out"])
            .arg(&out)
            .output()
    };
    let first = keygen("audit.example/log")?;
    ensure!(first.status.success(), "{}", describe(&first));
    let mode = std::fs::metadata(&out)?.permissions().mode() & 0o777;
    ensure!(mode == 0o600, "mode {mode:o}");
    let private = std::fs::read_to_string(&out)?;
    let key = auditbridge_tlog::SignerKey::parse(&private)?;
    let printed = text(&first.stdout);
    ensure!(printed.trim() == key.verifier().to_string(), "{printed}");
    ensure!(!printed.contains("PRIVATE"), "{printed}");

    let again = keygen("audit.example/log")?;
    ensure!(again.status.code() == Some(2), "{}", describe(&again));
    ensure!(
        text(&again.stderr).contains("exists"),
        "{}",
        describe(&again)
    );
    ensure!(
        std::fs::read_to_string(&out)? == private,
        "the key was overwritten"
    );
    std::fs::remove_file(&out)?;
    let bad = keygen("not a name")?;
    ensure!(
        bad.status.code() == Some(2) && text(&bad.stderr).contains("--name"),
        "{}",
        describe(&bad)
    );
    ensure!(!out.exists());
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
