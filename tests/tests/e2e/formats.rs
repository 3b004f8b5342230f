//! The schemas SIEMs speak (issue 13), validated by tools that are not ours: what HTTP
//! destinations with `schema = cadf | ocsf | ecs` receive is checked by pycadf (CADF 1.0), by
//! the JSON Schema of the pinned OCSF release from the schema.ocsf.io exports
//! (`ocsf-json-schema`, with `jsonschema`), and against the field list of the pinned ECS
//! release (`@elastic/ecs`); `splunk_hec` sends HEC's envelope with `Authorization: Splunk`.
//! The checkers are installed by scripts/test.sh (pinned, outside the clone); their glue is
//! in tests/scripts/.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context as _;
use auditbridge_event::{Event, Outcome, Target};
use auditbridge_tests::rabbit::TestBroker;
use auditbridge_tests::receiver::Receiver;
use auditbridge_tests::{TestEnv, until};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt as _;

const T: Duration = Duration::from_secs(60);

fn scripts() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts")
}

/// Runs a checker over NDJSON on its standard input; its output on failure.
async fn check(
    program: &str,
    args: &[String],
    env: &[(&str, String)],
    ndjson: &str,
) -> anyhow::Result<()> {
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("{program} (scripts/test.sh installs the schema checkers)"))?;
    let mut stdin = child.stdin.take().context("stdin")?;
    stdin.write_all(ndjson.as_bytes()).await?;
    drop(stdin);
    let out = tokio::time::timeout(T, child.wait_with_output()).await??;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    anyhow::ensure!(
        out.status.success(),
        "{program} {args:?} refused:\n{text}\n--- input:\n{ndjson}"
    );
    Ok(())
}

fn venv() -> PathBuf {
    PathBuf::from(
        std::env::var("AB_SCHEMA_VENV")
            .unwrap_or_else(|_| "/var/tmp/auditbridge-schema-venv".into()),
    )
}

fn ecs_modules() -> String {
    let dir = std::env::var("AB_ECS_DIR").unwrap_or_else(|_| "/var/tmp/auditbridge-ecs".into());
    format!("{dir}/node_modules")
}

/// Events of every kind the mappings tell apart.
fn events(env: &mut TestEnv) -> Vec<Event> {
    let mut events = env.events(9);
    let shape = [
        ("user.login", Outcome::Success),
        ("session.logout", Outcome::Success),
        ("user.password_reset", Outcome::Success),
        ("role.create", Outcome::Success),
        ("document.update", Outcome::Success),
        ("document.list", Outcome::Failure),
        ("billing.frobnicate", Outcome::Denied),
        ("user.login", Outcome::Failure),
        ("api_key.revoke", Outcome::Success),
    ];
    for (i, (e, (action, outcome))) in events.iter_mut().zip(shape).enumerate() {
        e.action = action.into();
        e.outcome = outcome;
        e.actor.ip = match i % 3 {
            0 => Some("198.51.100.7".into()),
            1 => Some("2001:db8::1".into()),
            _ => None,
        };
        if i % 2 == 0 {
            e.target = Some(Target {
                id: Some(format!("doc-{i}")),
                kind: Some(if i == 3 { "role".into() } else { "user".into() }),
                name: Some("Quarterly report".into()),
            });
        } else {
            e.target = None;
        }
        e.reason = (outcome != Outcome::Success).then(|| "not allowed".into());
        e.request_id = (i % 2 == 1).then(|| format!("req-{i}"));
        e.actor.user_agent = (i == 0).then(|| "curl/8.5.0".into());
    }
    events
}

/// Every event line a receiver took.
fn lines(rx: &Receiver) -> Vec<Value> {
    rx.requests()
        .iter()
        .filter(|r| r.answered == 200)
        .flat_map(|r| {
            String::from_utf8_lossy(&r.body)
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(|l| serde_json::from_str(l).expect("a JSON line"))
                .collect::<Vec<Value>>()
        })
        .collect()
}

fn ndjson(values: &[Value]) -> String {
    values.iter().map(|v| format!("{v}\n")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cadf_ocsf_ecs_and_hec_are_what_their_own_tools_accept() -> anyhow::Result<()> {
    let mut env = TestEnv::new().await?;
    env.ensure_stream().await?;
    let (cadf, ocsf, ocsf_mapped, ecs, hec) = (
        Receiver::start().await?,
        Receiver::start().await?,
        Receiver::start().await?,
        Receiver::start().await?,
        Receiver::start().await?,
    );
    let dest = |name: &str, rx: &Receiver, extra: Value| {
        let mut params = json!({"url": rx.url("/in"), "start": "earliest"});
        params
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        json!({"name": name, "type": "http", "params": params})
    };
    let dests = Value::from(vec![
        dest("cadf", &cadf, json!({"schema": "cadf"})),
        dest("ocsf", &ocsf, json!({"schema": "ocsf"})),
        dest(
            "ocsf-mapped",
            &ocsf_mapped,
            json!({"schema": "ocsf", "ocsf_map": [
                {"actions": "billing.*", "class_uid": 3001, "activity_id": 7}]}),
        ),
        dest("ecs", &ecs, json!({"schema": "ecs"})),
        dest(
            "hec",
            &hec,
            json!({"schema": "splunk_hec", "hec_token": "hec-token-1", "hec_index": "audit"}),
        ),
    ])
    .to_string();
    let _worker = env
        .spawn_worker("w", &[("AUDITBRIDGE_DESTINATIONS", &dests)])
        .await?;
    let events = events(&mut env);
    env.publish(&events).await?;
    for rx in [&cadf, &ocsf, &ocsf_mapped, &ecs, &hec] {
        until("every event at each receiver", T, || {
            lines(rx).len() >= events.len()
        })
        .await?;
    }
    let python = venv().join("bin/python").to_string_lossy().into_owned();

    // CADF: pycadf builds and validates every event (taxonomies, ids, mandatory attributes),
    // the time in pycadf's own format.
    let sent = lines(&cadf);
    check(
        &python,
        &[
            scripts()
                .join("cadf_check.py")
                .to_string_lossy()
                .into_owned(),
            "--pycadf-time".into(),
        ],
        &[],
        &ndjson(&sent),
    )
    .await?;
    let login = sent
        .iter()
        .find(|v| v["id"] == events[0].id.to_string())
        .context("login")?;
    assert_eq!(login["action"], "authenticate/login");
    assert_eq!(login["initiator"]["host"]["address"], "198.51.100.7");
    assert_eq!(
        login["attachments"][0]["content"]["id"],
        events[0].id.to_string()
    );

    // OCSF: the class's JSON Schema of the pinned release, unknown attributes refused.
    for (rx, mapped) in [(&ocsf, false), (&ocsf_mapped, true)] {
        let sent = lines(rx);
        check(
            &python,
            &[
                scripts()
                    .join("ocsf_check.py")
                    .to_string_lossy()
                    .into_owned(),
                "--version".into(),
                auditbridge_destinations::schema::OCSF_VERSION.into(),
            ],
            &[],
            &ndjson(&sent),
        )
        .await?;
        let class_of = |i: usize| {
            sent.iter()
                .find(|v| v["metadata"]["uid"] == events[i].id.to_string())
                .map(|v| {
                    (
                        v["class_uid"].as_u64().unwrap(),
                        v["activity_id"].as_u64().unwrap(),
                    )
                })
                .unwrap()
        };
        assert_eq!(class_of(0), (3002, 1), "user.login");
        assert_eq!(class_of(1), (3002, 2), "session.logout");
        assert_eq!(class_of(2), (3001, 4), "user.password_reset");
        assert_eq!(class_of(4), (6003, 3), "document.update");
        assert_eq!(
            class_of(6),
            if mapped { (3001, 7) } else { (6003, 99) },
            "billing.frobnicate"
        );
        let e = sent
            .iter()
            .find(|v| v["metadata"]["uid"] == events[4].id.to_string())
            .unwrap();
        assert_eq!(
            e["unmapped"]["auditbridge"]["id"],
            events[4].id.to_string(),
            "the original kept"
        );
    }

    // ECS: every field name of the pinned release's list, with its type and allowed values.
    let sent = lines(&ecs);
    check(
        "node",
        &[
            scripts()
                .join("ecs_check.js")
                .to_string_lossy()
                .into_owned(),
            "--pin-version".into(),
            "--strict-arrays".into(),
        ],
        &[("NODE_PATH", ecs_modules())],
        &ndjson(&sent),
    )
    .await?;
    let login = sent
        .iter()
        .find(|v| v["event"]["id"] == events[0].id.to_string())
        .unwrap();
    assert_eq!(login["event"]["category"], json!(["authentication"]));
    assert_eq!(login["source"]["ip"], "198.51.100.7");
    let original: Value = serde_json::from_str(login["event"]["original"].as_str().unwrap())?;
    assert_eq!(original["id"], events[0].id.to_string());

    // HEC: the envelope, the token in HEC's own scheme, the native event inside.
    let requests = hec.requests();
    assert!(
        requests.iter().all(
            |r| r.headers.get("authorization").and_then(|v| v.to_str().ok())
                == Some("Splunk hec-token-1")
        ),
        "Authorization: Splunk <token> on every request"
    );
    for v in lines(&hec) {
        assert_eq!(v["sourcetype"], "auditbridge:event", "{v}");
        assert_eq!(v["index"], "audit", "{v}");
        assert!(v["time"].as_f64().is_some(), "{v}");
        let id = v["event"]["id"].as_str().context("event.id")?;
        let e = events
            .iter()
            .find(|e| e.id.to_string() == id)
            .context("an event sent")?;
        assert_eq!(
            v["event"],
            serde_json::to_value(e)?,
            "the event is the native one"
        );
        assert_eq!(v["fields"]["tenant"], e.tenant.as_str());
    }
    Ok(())
}

/// RabbitMQ carries the schemas too: OCSF one message per event (`message_id` the event's
/// id, routing keys from the stored columns), CADF and ECS as NDJSON batches, after the
/// destination's redaction rules, each accepted by its community's checker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_destinations_send_each_schema_after_redaction() -> anyhow::Result<()> {
    let mut env = TestEnv::new().await?;
    env.ensure_stream().await?;
    let (ocsf, cadf, ecs) = (
        TestBroker::new(&format!("{}o", env.tag)).await?,
        TestBroker::new(&format!("{}c", env.tag)).await?,
        TestBroker::new(&format!("{}e", env.tag)).await?,
    );
    let rules = json!([
        {"key": "(?i)^password$", "action": "drop"},
        {"path": "/actor/user_agent", "action": "mask"},
    ]);
    let dests = Value::from(vec![
        ocsf.destination("ocsf", json!({"schema": "ocsf", "redact": rules})),
        cadf.destination(
            "cadf",
            json!({"schema": "cadf", "mode": "batch", "redact": rules}),
        ),
        ecs.destination("ecs", json!({"schema": "ecs", "mode": "batch"})),
    ])
    .to_string();
    let mut events = events(&mut env);
    for e in &mut events {
        let mut metadata = serde_json::Map::new();
        metadata.insert("password".into(), json!("hunter2"));
        metadata.insert("kept".into(), json!(1));
        e.metadata = Some(metadata);
    }
    let _worker = env
        .spawn_worker("w", &[("AUDITBRIDGE_DESTINATIONS", &dests)])
        .await?;
    env.publish(&events).await?;
    let n = events.len();
    let (mut o, mut c, mut x) = (Vec::new(), Vec::new(), Vec::new());
    ocsf.collect_until(T, &mut o, |g| g.len() >= n).await?;
    cadf.collect_until(T, &mut c, |g| {
        g.iter().map(|m| m.ids(true).len()).sum::<usize>() >= n
    })
    .await?;
    let lines_of = |got: &[auditbridge_tests::rabbit::Got]| -> Vec<Value> {
        got.iter()
            .flat_map(|m| {
                String::from_utf8_lossy(&m.body)
                    .lines()
                    .filter(|l| !l.trim().is_empty())
                    .map(|l| serde_json::from_str(l).expect("a JSON line"))
                    .collect::<Vec<Value>>()
            })
            .collect()
    };
    // ECS batches carry `event.id`, not `id`.
    ecs.collect_until(T, &mut x, |g| lines_of(g).len() >= n)
        .await?;
    let python = venv().join("bin/python").to_string_lossy().into_owned();

    // OCSF, one message per event: the message id and the routing key are the stored event's.
    let sent = lines_of(&o);
    assert_eq!(sent.len(), n, "one OCSF object per message");
    for (m, v) in o.iter().zip(&sent) {
        let id = v["metadata"]["uid"].as_str().context("metadata.uid")?;
        assert_eq!(m.message_id.as_deref(), Some(id));
        let e = events
            .iter()
            .find(|e| e.id.to_string() == id)
            .context("sent")?;
        assert_eq!(m.routing_key, format!("{}.{}", e.tenant, e.action));
        let kept = &v["unmapped"]["auditbridge"];
        assert!(kept["metadata"].get("password").is_none(), "redacted: {v}");
        assert_eq!(kept["metadata"]["kept"], 1);
    }
    check(
        &python,
        &[
            scripts()
                .join("ocsf_check.py")
                .to_string_lossy()
                .into_owned(),
            "--version".into(),
            auditbridge_destinations::schema::OCSF_VERSION.into(),
        ],
        &[],
        &ndjson(&sent),
    )
    .await?;

    // CADF in NDJSON batches, after the rules: the user agent masked, the password gone.
    let sent = lines_of(&c);
    assert_eq!(sent.len(), n);
    check(
        &python,
        &[
            scripts()
                .join("cadf_check.py")
                .to_string_lossy()
                .into_owned(),
            "--pycadf-time".into(),
        ],
        &[],
        &ndjson(&sent),
    )
    .await?;
    let login = sent
        .iter()
        .find(|v| v["id"] == events[0].id.to_string())
        .context("login")?;
    assert_eq!(login["initiator"]["host"]["agent"], "[REDACTED]");
    let original = &login["attachments"][0]["content"];
    assert!(original["metadata"].get("password").is_none(), "{login}");

    // ECS in batches, without rules: the whole event kept in event.original.
    let sent = lines_of(&x);
    assert_eq!(sent.len(), n);
    check(
        "node",
        &[
            scripts()
                .join("ecs_check.js")
                .to_string_lossy()
                .into_owned(),
            "--pin-version".into(),
            "--strict-arrays".into(),
        ],
        &[("NODE_PATH", ecs_modules())],
        &ndjson(&sent),
    )
    .await?;
    for v in &sent {
        let original: Value = serde_json::from_str(v["event"]["original"].as_str().unwrap())?;
        assert_eq!(original["metadata"]["password"], "hunter2", "no rules here");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_settings_that_cannot_work_stop_start_up() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let cases = [
        (
            json!({"name": "r", "type": "rabbitmq", "params": {"url": "amqp://127.0.0.1/%2f", "exchange": "e", "schema": "splunk_hec"}}),
            "destination r: params.schema: splunk_hec is HTTP's",
        ),
        (
            json!({"name": "h", "type": "http", "params": {"url": "http://127.0.0.1:9/", "schema": "splunk_hec"}}),
            "destination h: params.hec_token",
        ),
        (
            json!({"name": "h", "type": "http", "params": {"url": "http://127.0.0.1:9/", "schema": "ocsf", "ocsf_map": [{"actions": "x.*", "class_uid": 4001}]}}),
            "destination h: params.ocsf_map[0].class_uid",
        ),
        (
            json!({"name": "h", "type": "http", "params": {"url": "http://127.0.0.1:9/", "schema": "gelf"}}),
            "destination h: params.schema",
        ),
    ];
    for (d, expected) in cases {
        let list = Value::from(vec![d]).to_string();
        let out = tokio::time::timeout(
            T,
            env.command(&["worker"], &[("AUDITBRIDGE_DESTINATIONS", &list)])
                .output(),
        )
        .await??;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{list}: {stderr}");
        assert!(stderr.contains(expected), "{list}: {stderr}");
    }
    Ok(())
}
