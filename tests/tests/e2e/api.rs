//! The query API (`auditbridge serve`) against real PostgreSQL and NATS, with events stored by
//! a real worker: every filter compared with the same filter applied to what was published,
//! keyset pages while events arrive, tenant isolation on every endpoint, the error answers,
//! the live tail's seam and reconnects, stats, and the OpenAPI document against the handlers.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use anyhow::ensure;
use auditbridge_event::{Event, Outcome, Target};
use auditbridge_tests::api::{ApiServer, Token};
use auditbridge_tests::sources::Process;
use auditbridge_tests::{TestEnv, eventually};
use serde_json::Value;
use uuid::Uuid;

const T: Duration = Duration::from_secs(60);

/// Synthetic events, spread over two tenants and the last few hours, with a few hand-made
/// actions for the hierarchy's edge cases.
fn dataset(env: &mut TestEnv, n: usize) -> Vec<Event> {
    // Whole milliseconds, so PostgreSQL's microseconds hold them exactly.
    let now = time::OffsetDateTime::now_utc()
        .replace_millisecond(0)
        .expect("0 is a valid millisecond");
    let special = [
        "document",
        "document.update",
        "document.share.revoke",
        "documents.x",
        "doc.x",
        "document_x.y",
    ];
    let mut events = env.events(n);
    for (i, e) in events.iter_mut().enumerate() {
        e.tenant = if i % 3 == 1 { "globex" } else { "acme" }.into();
        e.occurred_at = now - time::Duration::seconds((i as i64 * 37) % (6 * 3600));
        if i % 10 == 0 {
            e.action = special[(i / 30) % special.len()].into();
        }
        if i % 7 == 0 {
            e.target = None;
        } else if i % 5 == 0 {
            e.target = Some(Target {
                id: Some("doc-9".into()),
                kind: Some("document".into()),
                name: None,
            });
        }
        e.outcome = match i % 4 {
            0 => Outcome::Success,
            1 => Outcome::Denied,
            2 => Outcome::Failure,
            _ => Outcome::Unknown,
        };
        if i % 11 == 0 {
            e.actor.id = "u-42".into();
        }
    }
    events
}

async fn stored(
    env: &mut TestEnv,
    n: usize,
) -> anyhow::Result<(Vec<Event>, auditbridge_tests::Worker)> {
    let events = dataset(env, n);
    env.ensure_stream().await?;
    let worker = env.spawn_worker("w", &[]).await?;
    env.publish(&events).await?;
    env.wait_for_count(n as i64, T).await?;
    Ok((events, worker))
}

fn ids_of(values: &[Value]) -> Vec<Uuid> {
    values
        .iter()
        .map(|v| v["id"].as_str().unwrap().parse().unwrap())
        .collect()
}

fn under(action: &str, prefix: &str) -> bool {
    action == prefix || action.starts_with(&format!("{prefix}."))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_filter_returns_exactly_the_matching_events_in_order() -> anyhow::Result<()> {
    let mut env = TestEnv::new().await?;
    let (events, _worker) = stored(&mut env, 1_200).await?;
    let acme = Token::tenant("acme-reader", "acme", &["read"]);
    let api = ApiServer::start(&env, &[&acme], &[]).await?;

    let mid = events[600].occurred_at;
    let mid_s = mid.format(&time::format_description::well_known::Rfc3339)?;
    type Pred = Box<dyn Fn(&Event) -> bool>;
    let cases: Vec<(String, Pred)> = vec![
        ("".into(), Box::new(|_| true)),
        ("actor=u-42".into(), Box::new(|e| e.actor.id == "u-42")),
        ("actor!=u-42".into(), Box::new(|e| e.actor.id != "u-42")),
        (
            "target=doc-9".into(),
            Box::new(|e| e.target.as_ref().and_then(|t| t.id.as_deref()) == Some("doc-9")),
        ),
        (
            "target!=doc-9".into(),
            Box::new(|e| e.target.as_ref().and_then(|t| t.id.as_deref()) != Some("doc-9")),
        ),
        (
            format!("source={}", events[1].source),
            Box::new({
                let s = events[1].source.clone();
                move |e| e.source == s
            }),
        ),
        (
            "outcome=denied,failure".into(),
            Box::new(|e| matches!(e.outcome, Outcome::Denied | Outcome::Failure)),
        ),
        (
            "outcome!=success".into(),
            Box::new(|e| e.outcome != Outcome::Success),
        ),
        (
            "action=document".into(),
            Box::new(|e| under(&e.action, "document")),
        ),
        (
            "action=document.share".into(),
            Box::new(|e| under(&e.action, "document.share")),
        ),
        ("action=doc".into(), Box::new(|e| under(&e.action, "doc"))),
        (
            "action!=document".into(),
            Box::new(|e| !under(&e.action, "document")),
        ),
        (
            "action=document,doc&outcome!=unknown".into(),
            Box::new(|e| {
                (under(&e.action, "document") || under(&e.action, "doc"))
                    && e.outcome != Outcome::Unknown
            }),
        ),
        (
            format!("since={mid_s}"),
            Box::new(move |e| e.occurred_at >= mid),
        ),
        (
            format!("until={mid_s}"),
            Box::new(move |e| e.occurred_at < mid),
        ),
    ];
    for (query, pred) in &cases {
        for order in ["desc", "asc"] {
            let got = api
                .all_pages(&format!("order={order}&{query}"), &acme, 97)
                .await?;
            let mut want: Vec<&Event> = events
                .iter()
                .filter(|e| e.tenant == "acme" && pred(e))
                .collect();
            want.sort_by_key(|e| (e.occurred_at, e.id));
            if order == "desc" {
                want.reverse();
            }
            let want_ids: Vec<Uuid> = want.iter().map(|e| e.id).collect();
            assert!(
                !want_ids.is_empty(),
                "{query}: the data set must exercise it"
            );
            assert_eq!(ids_of(&got), want_ids, "{query} order={order}");
        }
    }
    // The hierarchy's edges, by name.
    let got = api.all_pages("action=document", &acme, 1000).await?;
    let actions: HashSet<&str> = got.iter().map(|e| e["action"].as_str().unwrap()).collect();
    assert!(actions.contains("document") && actions.contains("document.share.revoke"));
    assert!(!actions.contains("documents.x") && !actions.contains("document_x.y"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_have_no_gap_or_repeat_while_events_arrive() -> anyhow::Result<()> {
    let mut env = TestEnv::new().await?;
    let (events, _worker) = stored(&mut env, 1_000).await?;
    let acme = Token::tenant("acme", "acme", &["read"]);
    let api = ApiServer::start(&env, &[&acme], &[]).await?;
    let before: HashSet<Uuid> = events
        .iter()
        .filter(|e| e.tenant == "acme")
        .map(|e| e.id)
        .collect();

    for order in ["desc", "asc"] {
        // New events keep arriving while the pages are read (some with occurred_at in the
        // past, inside the range being paged).
        let mut more = dataset(&mut env, 600);
        let arriving = {
            let env_js = env.js.clone();
            let prefix = env.prefix.clone();
            let more = std::mem::take(&mut more);
            tokio::spawn(async move {
                for chunk in more.chunks(50) {
                    for e in chunk {
                        let mut h = async_nats::HeaderMap::new();
                        h.insert("Nats-Msg-Id", e.message_id().as_str());
                        env_js
                            .publish_with_headers(
                                e.subject(&prefix),
                                h,
                                serde_json::to_vec(e).unwrap().into(),
                            )
                            .await?
                            .await?;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                anyhow::Ok(())
            })
        };
        let got = api.all_pages(&format!("order={order}"), &acme, 25).await?;
        arriving.await??;
        let ids = ids_of(&got);
        let unique: HashSet<Uuid> = ids.iter().copied().collect();
        assert_eq!(
            unique.len(),
            ids.len(),
            "order={order}: an event was repeated"
        );
        let missing = before.difference(&unique).count();
        assert_eq!(missing, 0, "order={order}: {missing} events skipped");
        // Pages are in keyset order throughout.
        let keys: Vec<(String, String)> = got
            .iter()
            .map(|e| {
                let t = time::OffsetDateTime::parse(
                    e["occurred_at"].as_str().unwrap(),
                    &time::format_description::well_known::Rfc3339,
                )
                .unwrap();
                (
                    format!("{:020}", t.unix_timestamp_nanos()),
                    e["id"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        let mut sorted = keys.clone();
        sorted.sort();
        if order == "desc" {
            sorted.reverse();
        }
        assert_eq!(keys, sorted, "order={order}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_are_isolated_on_every_endpoint_and_errors_say_why() -> anyhow::Result<()> {
    let mut env = TestEnv::new().await?;
    let (events, _worker) = stored(&mut env, 300).await?;
    let acme = Token::tenant("acme", "acme", &["read"]);
    let ingest_only = Token::tenant("acme-ingest", "acme", &["ingest"]);
    let admin = Token::admin("ops", &["read"]);
    let api = ApiServer::start(&env, &[&acme, &ingest_only, &admin], &[]).await?;
    let globex_event = events.iter().find(|e| e.tenant == "globex").unwrap();
    let acme_event = events.iter().find(|e| e.tenant == "acme").unwrap();

    // 403 for another tenant, on every endpoint; never an empty answer.
    for path in [
        "/v1/events?tenant=globex",
        "/v1/stats?tenant=globex",
        "/v1/events/stream?tenant=globex",
    ] {
        let (status, body) = api.get(path, Some(&acme)).await?;
        assert_eq!(status, 403, "{path}: {body}");
        assert_eq!(body["error"]["code"], "forbidden", "{path}");
    }
    // Another tenant's event does not exist for this token.
    let (status, _) = api
        .get(&format!("/v1/events/{}", globex_event.id), Some(&acme))
        .await?;
    assert_eq!(status, 404);
    let (status, body) = api
        .get(&format!("/v1/events/{}", acme_event.id), Some(&acme))
        .await?;
    assert_eq!(status, 200);
    assert_eq!(body["id"], acme_event.id.to_string());
    assert_eq!(body["actor"]["id"], acme_event.actor.id);
    let (status, body) = api
        .get(&format!("/v1/events/{}", globex_event.id), Some(&admin))
        .await?;
    assert_eq!((status, body["tenant"].as_str()), (200, Some("globex")));
    // Default tenant is the token's own; admin must name one.
    let own = api.all_pages("order=asc", &acme, 1000).await?;
    assert!(!own.is_empty() && own.iter().all(|e| e["tenant"] == "acme"));
    let (status, body) = api.get("/v1/events", Some(&admin)).await?;
    assert_eq!(
        (status, body["error"]["param"].as_str()),
        (400, Some("tenant"))
    );
    let theirs = api.all_pages("tenant=globex", &admin, 1000).await?;
    assert_eq!(
        theirs.len(),
        events.iter().filter(|e| e.tenant == "globex").count()
    );

    // 401: no token, a wrong one, a malformed header.
    let (status, body) = api.get("/v1/events", None).await?;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (401, Some("unauthorized"))
    );
    let wrong = Token::tenant("x", "acme", &["read"]);
    assert_eq!(api.get("/v1/events", Some(&wrong)).await?.0, 401);
    let resp = api
        .http
        .get(api.url("/v1/events"))
        .header("Authorization", "Basic abc")
        .send()
        .await?;
    assert_eq!(resp.status(), 401);
    assert!(resp.headers().contains_key("www-authenticate"));
    // 403: a token without the read scope.
    assert_eq!(api.get("/v1/events", Some(&ingest_only)).await?.0, 403);

    // 400 names the parameter.
    for (path, param) in [
        ("/v1/events?limit=5000", "limit"),
        ("/v1/events?order=sideways", "order"),
        ("/v1/events?since=last-week", "since"),
        ("/v1/events?outcome=ok", "outcome"),
        ("/v1/events?action=Doc", "action"),
        ("/v1/events?actr=u-1", "actr"),
        ("/v1/events?cursor=abc", "cursor"),
        ("/v1/events?tenant=ACME", "tenant"),
        ("/v1/stats?bucket=1s", "bucket"),
        ("/v1/stats?depth=9", "depth"),
        ("/v1/events/not-a-uuid", "id"),
    ] {
        let (status, body) = api.get(path, Some(&acme)).await?;
        assert_eq!(status, 400, "{path}: {body}");
        assert_eq!(body["error"]["param"], param, "{path}: {body}");
    }
    // A cursor made for another order is refused by name too.
    let (_, page) = api.get("/v1/events?limit=2", Some(&acme)).await?;
    let cursor = page["next_cursor"].as_str().unwrap();
    let (status, body) = api
        .get(
            &format!("/v1/events?order=asc&cursor={cursor}"),
            Some(&acme),
        )
        .await?;
    assert_eq!(
        (status, body["error"]["param"].as_str()),
        (400, Some("cursor"))
    );
    let (status, _) = api
        .get(&format!("/v1/events/{}", Uuid::now_v7()), Some(&acme))
        .await?;
    assert_eq!(status, 404);

    // The stream and stats only ever show the token's tenant. A replay reads what is below
    // the commit-safe horizon, which another test's open transaction may hold back a moment.
    env.wait_below_horizon(T).await?;
    let mut tail = api.stream("", &acme, Some("0.0")).await?;
    let replayed = tail.caught_up(T).await?;
    assert_eq!(
        replayed.len(),
        events.iter().filter(|e| e.tenant == "acme").count()
    );
    assert!(
        replayed
            .iter()
            .all(|e| e.data.contains("\"tenant\": \"acme\"")
                || e.data.contains("\"tenant\":\"acme\""))
    );
    let (status, stats) = api.get("/v1/stats?bucket=1h&depth=1", Some(&acme)).await?;
    assert_eq!(status, 200, "{stats}");
    assert_eq!(stats["tenant"], "acme");
    assert_eq!(
        stats["total"].as_u64().unwrap() as usize,
        events.iter().filter(|e| e.tenant == "acme").count()
    );
    // Operators see it: refusals by route and status, open tails, readiness.
    let metrics = reqwest::get(format!("http://{}/metrics", api.metrics))
        .await?
        .text()
        .await?;
    for line in [
        "auditbridge_api_requests_total{route=\"/v1/events\",status=\"403\"}",
        "auditbridge_api_requests_total{route=\"/v1/events/{id}\",status=\"404\"}",
        "auditbridge_api_tail_clients",
    ] {
        assert!(metrics.contains(line), "{line} missing from /metrics");
    }
    let ready = reqwest::get(format!("http://{}/readyz", api.metrics)).await?;
    assert_eq!(ready.status(), 200);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_count_by_action_depth_and_outcome_per_bucket() -> anyhow::Result<()> {
    let mut env = TestEnv::new().await?;
    let (events, _worker) = stored(&mut env, 800).await?;
    let acme = Token::tenant("acme", "acme", &["read"]);
    let api = ApiServer::start(&env, &[&acme], &[]).await?;
    let (status, s) = api
        .get(
            "/v1/stats?bucket=30m&depth=2&action=document,doc",
            Some(&acme),
        )
        .await?;
    assert_eq!(status, 200, "{s}");
    let mine: Vec<&Event> = events
        .iter()
        .filter(|e| e.tenant == "acme" && (under(&e.action, "document") || under(&e.action, "doc")))
        .collect();
    let mut by_action: BTreeMap<String, u64> = BTreeMap::new();
    let mut by_outcome: BTreeMap<String, u64> = BTreeMap::new();
    for e in &mine {
        let group: Vec<&str> = e.action.split('.').take(2).collect();
        *by_action.entry(group.join(".")).or_default() += 1;
        *by_outcome.entry(e.outcome.as_str().to_owned()).or_default() += 1;
    }
    let as_map = |v: &Value| -> BTreeMap<String, u64> {
        v.as_object()
            .unwrap()
            .iter()
            .map(|(k, n)| (k.clone(), n.as_u64().unwrap()))
            .collect()
    };
    assert_eq!(as_map(&s["by_action"]), by_action);
    assert_eq!(as_map(&s["by_outcome"]), by_outcome);
    assert_eq!(s["total"].as_u64().unwrap() as usize, mine.len());
    let buckets = s["buckets"].as_array().unwrap();
    assert_eq!(buckets.len(), 48, "24 hours of 30-minute buckets");
    // Each event is counted in the bucket its occurred_at falls in.
    let fmt = &time::format_description::well_known::Rfc3339;
    let since = time::OffsetDateTime::parse(s["since"].as_str().unwrap(), fmt)?;
    let mut want = vec![0u64; 48];
    for e in &mine {
        let index = (e.occurred_at - since).whole_seconds() / 1800;
        want[index as usize] += 1;
    }
    let got: Vec<u64> = buckets
        .iter()
        .map(|b| b["total"].as_u64().unwrap())
        .collect();
    assert_eq!(got, want, "counts per bucket");
    for (i, b) in buckets.iter().enumerate() {
        let start = time::OffsetDateTime::parse(b["start"].as_str().unwrap(), fmt)?;
        assert_eq!(start, since + time::Duration::seconds(1800 * i as i64));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_tail_replays_then_follows_without_gap_or_repeat_across_reconnects()
-> anyhow::Result<()> {
    let mut env = TestEnv::new().await?;
    let (events, _worker) = stored(&mut env, 400).await?;
    let acme = Token::tenant("acme", "acme", &["read"]);
    let api = ApiServer::start(&env, &[&acme], &[("AUDITBRIDGE_API_HEARTBEAT", "200ms")]).await?;

    // Without a cursor: only what is committed from now on. "Now" is the commit-safe horizon:
    // an event committed a moment ago while an older transaction (of any test sharing this
    // server) was still running lies above it and is delivered, never skipped.
    env.wait_below_horizon(T).await?;
    let mut tail = api.stream("action!=doc", &acme, None).await?;
    assert!(tail.caught_up(T).await?.is_empty());

    // Batch B arrives while we read; two workers commit concurrently, out of order.
    let _w2 = env.spawn_worker("w2", &[]).await?;
    let b = dataset(&mut env, 900);
    let want_b: Vec<Uuid> = b
        .iter()
        .filter(|e| e.tenant == "acme" && !under(&e.action, "doc"))
        .map(|e| e.id)
        .collect();
    env.publish(&b).await?;
    let first = tail.audit_events(want_b.len() / 2, T).await?;
    let resume = first.last().unwrap().id.clone().unwrap();
    drop(tail);

    // Batch C is published while we are away and while we reconnect.
    let c = dataset(&mut env, 600);
    let want_c: Vec<Uuid> = c
        .iter()
        .filter(|e| e.tenant == "acme" && !under(&e.action, "doc"))
        .map(|e| e.id)
        .collect();
    let publishing = {
        let js = env.js.clone();
        let prefix = env.prefix.clone();
        tokio::spawn(async move {
            for e in &c {
                let mut h = async_nats::HeaderMap::new();
                h.insert("Nats-Msg-Id", e.message_id().as_str());
                js.publish_with_headers(e.subject(&prefix), h, serde_json::to_vec(e)?.into())
                    .await?
                    .await?;
            }
            anyhow::Ok(())
        })
    };
    let mut tail = api.stream("action!=doc", &acme, Some(&resume)).await?;
    let rest = tail
        .audit_events(want_b.len() - first.len() + want_c.len(), T)
        .await?;
    publishing.await??;

    let mut seen: Vec<Uuid> = first
        .iter()
        .chain(rest.iter())
        .map(|e| {
            serde_json::from_str::<Value>(&e.data).unwrap()["id"]
                .as_str()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    let unique: HashSet<Uuid> = seen.iter().copied().collect();
    assert_eq!(unique.len(), seen.len(), "an event was sent twice");
    let want: HashSet<Uuid> = want_b.iter().chain(want_c.iter()).copied().collect();
    assert_eq!(unique, want, "the tail missed or added events");
    // Nothing older than the stream's start, nothing of other tenants or filtered actions.
    assert!(events.iter().all(|e| !unique.contains(&e.id)));
    // Ids (positions) only go forward.
    let positions: Vec<(u64, i64)> = first
        .iter()
        .chain(rest.iter())
        .map(|e| {
            let (tx, seq) = e.id.as_deref().unwrap().split_once('.').unwrap();
            (tx.parse().unwrap(), seq.parse().unwrap())
        })
        .collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]));
    seen.clear();

    // Heartbeats keep an idle stream alive.
    let mut beats = 0;
    for _ in 0..10 {
        if let Some(raw) = tail.next_raw(Duration::from_secs(2)).await? {
            beats += raw.matches(":\n").count() + raw.matches(": \n").count();
        }
        if beats >= 2 {
            break;
        }
    }
    assert!(beats >= 2, "no heartbeats on an idle stream");
    Ok(())
}

/// `auditbridge serve` as a process of its own, for the tests that read the live tail's
/// metrics: metrics are global to a process, and an in-process [`ApiServer`] shares them with
/// every test of this binary (another test's tails or slow disconnection would pass for the
/// test's own; one did once, and the test then read the live stream forever).
async fn serve_process(
    env: &TestEnv,
    token: &Token,
    extra: &[(&str, &str)],
) -> anyhow::Result<Process> {
    let tokens = Value::Array(vec![token.entry.clone()]).to_string();
    let mut vars = vec![("AUDITBRIDGE_API_TOKENS", tokens.as_str())];
    vars.extend_from_slice(extra);
    let mut serve = Process::spawn(env, "serve", &["serve"], &vars)?;
    serve.wait_listening(T).await?;
    Ok(serve)
}

/// The count of live tails the server at `metrics_addr` disconnected as slow; the tests
/// compare it with the count before their own client stopped reading.
async fn slow_disconnects(metrics_addr: std::net::SocketAddr) -> anyhow::Result<f64> {
    let metrics = reqwest::get(format!("http://{metrics_addr}/metrics"))
        .await?
        .text()
        .await?;
    Ok(metrics
        .lines()
        .find_map(|l| l.strip_prefix("auditbridge_api_tail_disconnects_total{reason=\"slow\"} "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0))
}

/// The three tests of a client that stops reading each push tens of megabytes through a worker
/// and a server; this lock runs them one at a time. (It once kept their process-wide metrics
/// apart; each now has a `serve` process of its own for that.) Run together, they load the
/// machine enough that the tail tests beside them lose their stream to a statement timeout
/// (seen twice: `a_small_tenant_…` with its 60 ms, and `one_token_with_many_…`).
static SLOW_CLIENT_TESTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Waits until the server at `metrics_addr` has disconnected more live tails as slow than
/// `before`.
async fn wait_for_slow_disconnect(
    metrics_addr: std::net::SocketAddr,
    before: f64,
) -> anyhow::Result<()> {
    let what = "the client that reads nothing to be disconnected as slow";
    eventually(what, T, async || {
        let now = slow_disconnects(metrics_addr).await?;
        ensure!(
            now > before,
            "{now} slow disconnects, {before} before its client stopped"
        );
        Ok(())
    })
    .await
}

/// Opens a live tail on a plain socket with a small receive buffer (so what the kernel absorbs
/// for a client that stops reading is small and the same on every machine), and reads until
/// the replay has caught up. The caller then stops reading.
async fn open_tail_that_stops_reading(
    addr: std::net::SocketAddr,
    token: &Token,
) -> anyhow::Result<tokio::net::TcpStream> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_recv_buffer_size(4096)?;
    let mut conn = socket.connect(addr).await?;
    conn.write_all(
        format!(
            "GET /v1/events/stream HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
            addr, token.token
        )
        .as_bytes(),
    )
    .await?;
    let mut head = Vec::new();
    let mut buf = vec![0u8; 4096];
    while !String::from_utf8_lossy(&head).contains("caught-up") {
        let n = tokio::time::timeout(T, conn.read(&mut buf)).await??;
        anyhow::ensure!(n > 0, "the stream closed before it caught up");
        head.extend_from_slice(&buf[..n]);
    }
    anyhow::ensure!(
        String::from_utf8_lossy(&head).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    Ok(conn)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_read_is_disconnected() -> anyhow::Result<()> {
    use tokio::io::AsyncReadExt as _;

    let _one_at_a_time = SLOW_CLIENT_TESTS.lock().await;
    let mut env = TestEnv::new().await?;
    env.ensure_stream().await?;
    let _worker = env.spawn_worker("w", &[]).await?;
    let admin = Token::admin("ops", &["read"]);
    let api = serve_process(&env, &admin, &[]).await?;
    let before = slow_disconnects(api.metrics).await?;
    let mut conn = open_tail_that_stops_reading(api.addr, &admin).await?;
    let mut buf = vec![0u8; 4096];
    // Stop reading; publish far more than the client queue and the socket buffers hold.
    let events = dataset(&mut env, 30_000);
    env.publish(&events).await?;
    env.wait_for_count(30_000, T).await?;
    // Without the client reading a byte, the server gives up on it and says so.
    wait_for_slow_disconnect(api.metrics, before).await?;
    // What it had queued is still delivered, then the response ends (and, with
    // `Connection: close`, the connection).
    let mut received = Vec::new();
    // Bounded in all, not only per read: heartbeats would keep an open stream alive forever.
    let read_to_end = tokio::time::timeout(T, async {
        loop {
            match tokio::time::timeout(Duration::from_secs(20), conn.read(&mut buf)).await {
                Ok(Ok(0)) => break,
                Ok(Ok(n)) => received.extend_from_slice(&buf[..n]),
                Ok(Err(_)) => break,
                Err(_) => panic!(
                    "the server kept the stream open ({} events read)",
                    String::from_utf8_lossy(&received)
                        .matches("event: audit")
                        .count()
                ),
            }
        }
    })
    .await;
    assert!(
        read_to_end.is_ok(),
        "the stream of a client disconnected as slow was still open after {T:?}"
    );
    let text = String::from_utf8_lossy(&received);
    let delivered = text.matches("event: audit").count();
    assert!(
        delivered < 60_000,
        "a client that did not read got everything"
    );
    assert!(
        text.ends_with("0\r\n\r\n"),
        "the response did not end cleanly"
    );
    Ok(())
}

/// Finding 12: what the server queues for a live tail is bounded in bytes, not only in
/// events. A client that reads nothing while 600 events of about 60 KiB each are stored gets
/// at most its byte budget (1 MiB) plus what the sockets buffer, then is disconnected; by event
/// count alone (1,024 queued) it would have been sent all 600 (36 MiB).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_client_of_large_events_is_bounded_in_bytes() -> anyhow::Result<()> {
    let _one_at_a_time = SLOW_CLIENT_TESTS.lock().await;
    let mut env = TestEnv::new().await?;
    env.ensure_stream().await?;
    let _worker = env.spawn_worker("w", &[]).await?;
    let admin = Token::admin("ops", &["read"]);
    let api = serve_process(&env, &admin, &[]).await?;
    let before = slow_disconnects(api.metrics).await?;
    let mut conn = open_tail_that_stops_reading(api.addr, &admin).await?;
    publish_padded(&mut env, 600, 60_000).await?;
    // Bounded: the server disconnects it (slow) within SLOW_CLIENT of its budget filling.
    wait_for_slow_disconnect(api.metrics, before).await?;
    let received = read_until_closed(&mut conn, Duration::from_secs(20)).await;
    let delivered = String::from_utf8_lossy(&received)
        .matches("event: audit")
        .count();
    eprintln!(
        "a non-reading client was sent {delivered} events of 60 KiB ({} bytes)",
        received.len()
    );
    assert!(
        delivered < 300,
        "a client that did not read was queued {delivered} events of 60 KiB: not bounded in bytes"
    );
    Ok(())
}

/// A client that stops reading for good is cut after `AUDITBRIDGE_API_WRITE_TIMEOUT`: its
/// queued events and its live-tail slot are freed without it reading a byte. (Before, the
/// response, and so its queue and slot, lived as long as the idle connection: a few tokens
/// could hold the whole byte budget with sockets that never read.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_and_frees_its_tail() -> anyhow::Result<()> {
    let _one_at_a_time = SLOW_CLIENT_TESTS.lock().await;
    let mut env = TestEnv::new().await?;
    env.ensure_stream().await?;
    let _worker = env.spawn_worker("w", &[]).await?;
    let admin = Token::admin("ops", &["read"]);
    let api = serve_process(&env, &admin, &[("AUDITBRIDGE_API_WRITE_TIMEOUT", "2s")]).await?;
    let mut conn = open_tail_that_stops_reading(api.addr, &admin).await?;
    assert_eq!(tail_clients(api.metrics).await?, 1.0);
    publish_padded(&mut env, 200, 60_000).await?;
    let what = "the client that stopped reading to lose its live tail";
    eventually(what, T, async || {
        let open = tail_clients(api.metrics).await?;
        ensure!(open == 0.0, "{open} live tails open");
        Ok(())
    })
    .await?;
    // The connection is closed: what the kernel buffered, then the end.
    read_until_closed(&mut conn, Duration::from_secs(10)).await;
    Ok(())
}

/// `n` events of about `bytes` each (a `pad` of that many characters in their metadata),
/// published and stored.
async fn publish_padded(env: &mut TestEnv, n: usize, bytes: usize) -> anyhow::Result<()> {
    let pad = "x".repeat(bytes);
    let mut events = env.events(n);
    for e in &mut events {
        let mut m = serde_json::Map::new();
        m.insert("pad".into(), Value::String(pad.clone()));
        e.metadata = Some(m);
    }
    env.publish(&events).await?;
    env.wait_for_count(n as i64, T).await?;
    Ok(())
}

/// Reads `conn` until the server closes it, within `T` in all and `quiet` between reads
/// (heartbeats would keep an open stream alive forever); returns what it read. Panics when
/// the server keeps it open.
async fn read_until_closed(conn: &mut tokio::net::TcpStream, quiet: Duration) -> Vec<u8> {
    use tokio::io::AsyncReadExt as _;

    let mut buf = vec![0u8; 65536];
    let mut received = Vec::new();
    let read_to_end = tokio::time::timeout(T, async {
        loop {
            match tokio::time::timeout(quiet, conn.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(n)) => received.extend_from_slice(&buf[..n]),
                Err(_) => panic!("the server kept the connection open"),
            }
        }
    })
    .await;
    assert!(
        read_to_end.is_ok(),
        "the connection was still open after {T:?}"
    );
    received
}

async fn tail_clients(metrics_addr: std::net::SocketAddr) -> anyhow::Result<f64> {
    let metrics = reqwest::get(format!("http://{metrics_addr}/metrics"))
        .await?
        .text()
        .await?;
    Ok(metrics
        .lines()
        .find_map(|l| l.strip_prefix("auditbridge_api_tail_clients "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_matches_the_handlers() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    env.ensure_stream().await?;
    let admin = Token::admin("ops", &["read", "ingest"]);
    let api = ApiServer::start(&env, &[&admin], &[]).await?;
    let (status, doc) = api.get("/v1/openapi.json", None).await?;
    assert_eq!(status, 200);
    assert_eq!(doc["openapi"], "3.1.0");
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.len() >= 5);
    let fmt = &time::format_description::well_known::Rfc3339;
    let since = (time::OffsetDateTime::now_utc() - time::Duration::hours(2)).format(fmt)?;
    let until = (time::OffsetDateTime::now_utc() + time::Duration::hours(1)).format(fmt)?;
    let sample = |schema: &Value, name: &str| -> String {
        match (name.trim_end_matches('!'), schema["type"].as_str()) {
            ("tenant", _) => "acme".into(),
            ("outcome", _) => "denied".into(),
            ("action", _) => "document".into(),
            ("order", _) => "asc".into(),
            ("since", _) => since.clone(),
            ("until", _) => until.clone(),
            ("bucket", _) => "1h".into(),
            ("cursor", _) => String::new(),
            (_, Some("integer")) if schema["default"].is_null() => schema["minimum"].to_string(),
            (_, Some("integer")) => schema["default"].to_string(),
            _ => "x".into(),
        }
    };
    for (path, item) in paths {
        for (method, op) in item.as_object().unwrap() {
            let concrete = path
                .replace("{id}", &Uuid::now_v7().to_string())
                .replace("{source}", "no-such-source");
            // Each documented operation exists: anything but the router's own 404/405.
            let req = match method.as_str() {
                "get" => api.http.get(api.url(&concrete)),
                "post" => api.http.post(api.url(&concrete)),
                other => panic!("undocumented method kind {other}"),
            };
            let resp = req.bearer_auth(&admin.token).send().await?;
            let status = resp.status().as_u16();
            // A stream's body never ends; its status is enough here.
            let body = if path.ends_with("/stream") {
                String::new()
            } else {
                resp.text().await?
            };
            assert_ne!(status, 405, "{method} {path}");
            if status == 404 {
                assert!(body.contains("not_found"), "{method} {path}: router 404");
            }
            let documented: Vec<&str> = op["responses"]
                .as_object()
                .unwrap()
                .keys()
                .map(String::as_str)
                .collect();
            assert!(
                documented.contains(&status.to_string().as_str()) || status == 202,
                "{method} {path}: {status} is not documented ({documented:?}); body {body}"
            );
            // Reads share the token's database budget: each documents its 429.
            if method == "get" && !path.ends_with("openapi.json") {
                assert!(
                    op["responses"]["429"]["headers"]["Retry-After"].is_object(),
                    "{method} {path}: no 429 with Retry-After"
                );
            }
            if method != "get" || path.ends_with("/stream") || path.contains("{id}") {
                continue;
            }
            // Every documented query parameter is accepted with a valid value...
            let params = op["parameters"].as_array().cloned().unwrap_or_default();
            for p in params.iter().filter(|p| p["in"] == "query") {
                let name = p["name"].as_str().unwrap();
                let value = sample(&p["schema"], name);
                if value.is_empty() {
                    continue;
                }
                let (status, body) = api
                    .get(
                        &format!("{path}?tenant=acme&{name}={value}")
                            .replace("tenant=acme&tenant=acme", "tenant=acme"),
                        Some(&admin),
                    )
                    .await?;
                // The log's endpoints answer 503 naming the setting while no checkpoint is
                // signed (none is here): the parameter itself was accepted.
                let no_checkpoint = path.starts_with("/v1/log/")
                    && status == 503
                    && body.to_string().contains("AUDITBRIDGE_LOG_KEY_FILE");
                assert!(
                    status == 200 || no_checkpoint,
                    "{path} {name}={value}: {status} {body}"
                );
            }
            // ...and an undocumented one is refused by name.
            if !params.is_empty() {
                let (status, body) = api
                    .get(&format!("{path}?tenant=acme&bogus=1"), Some(&admin))
                    .await?;
                assert_eq!(
                    (status, body["error"]["param"].as_str()),
                    (400, Some("bogus")),
                    "{path}"
                );
            }
        }
    }
    // And the stream answers with the documented content type.
    let resp = api
        .http
        .get(api.url("/v1/events/stream?tenant=acme"))
        .bearer_auth(&admin.token)
        .send()
        .await?;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-type"].to_str()?,
        "text/event-stream"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_from_the_cli_with_a_new_token_never_logs_it_and_stops_on_sigterm()
-> anyhow::Result<()> {
    let mut env = TestEnv::new().await?;
    let (events, _worker) = stored(&mut env, 50).await?;
    // `auditbridge token new` prints the token once and the entry that holds its hash.
    let out = env
        .command(
            &[
                "token", "new", "--name", "cli", "--tenant", "acme", "--scopes", "read",
            ],
            &[],
        )
        .output()
        .await?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout)?;
    let token = stdout
        .lines()
        .find_map(|l| l.strip_prefix("token (shown once, give it to the client): "))
        .expect("a token line")
        .to_owned();
    let entry = stdout
        .lines()
        .find_map(|l| l.strip_prefix("AUDITBRIDGE_API_TOKENS item: "))
        .expect("an entry line");
    assert!(!entry.contains(&token), "the entry must hold only the hash");
    let bad = env
        .command(
            &["token", "new", "--name", "x", "--tenant", "Not Valid"],
            &[],
        )
        .output()
        .await?;
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("tenant"));

    let tokens = format!("[{entry}]");
    let mut serve = Process::spawn(
        &env,
        "serve",
        &["serve"],
        &[
            ("AUDITBRIDGE_API_TOKENS", &tokens),
            ("AUDITBRIDGE_LOG", "debug"),
        ],
    )?;
    serve.wait_listening(T).await?;
    let http = reqwest::Client::new();
    let url = serve.url("/v1/events?limit=1000");
    let resp = http.get(&url).bearer_auth(&token).send().await?;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await?;
    assert_eq!(
        body["events"].as_array().unwrap().len(),
        events.iter().filter(|e| e.tenant == "acme").count()
    );
    // A wrong token is refused, and does not appear in the log either.
    let wrong = format!("{token}x");
    assert_eq!(
        http.get(&url).bearer_auth(&wrong).send().await?.status(),
        401
    );
    // An open live tail must not hold up shutdown.
    let _tail = http
        .get(serve.url("/v1/events/stream"))
        .bearer_auth(&token)
        .send()
        .await?;
    serve.signal("TERM");
    let status = serve.wait_exit(Duration::from_secs(20)).await?;
    assert!(status.success(), "serve exited with {status}");
    let text = serve.log_text();
    assert!(text.contains("API server listening"), "{text}");
    assert!(
        !text.contains(&token) && !text.contains(&wrong),
        "a token reached the log"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_query_pool_cancels_statements_that_run_too_long() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let store = auditbridge_store::Store::connect_lazy_for_queries(
        &env.database_url,
        2,
        Duration::from_millis(200),
    )?;
    let err = sqlx::query("SELECT pg_sleep(2)")
        .execute(store.pool())
        .await
        .expect_err("the statement must be cancelled");
    let code = err
        .as_database_error()
        .and_then(|e| e.code().map(|c| c.into_owned()));
    assert_eq!(code.as_deref(), Some("57014"), "{err}");
    sqlx::query("SELECT 1").execute(store.pool()).await?;
    store.close().await;
    Ok(())
}

/// Stores `n` events of `tenant` in one transaction, straight by SQL (a worker would take
/// minutes for the volumes these tests need); the JSON carries the id the tail sends.
async fn insert_bulk(env: &TestEnv, tenant: &str, n: i64) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO audit_events (id, tenant, action, outcome, occurred_at, actor_id, source, event) \
         SELECT u, $1, 'bulk.write', 'success', now(), 'u-bulk', 'test', \
                jsonb_build_object('id', u, 'tenant', $1::text) \
         FROM (SELECT gen_random_uuid() AS u FROM generate_series(1, $2)) g",
    )
    .bind(tenant)
    .bind(n)
    .execute(&env.pool)
    .await?;
    Ok(())
}

/// One event of `tenant` in its own transaction; its id and its live-tail position.
async fn insert_one(env: &TestEnv, tenant: &str) -> anyhow::Result<(Uuid, String)> {
    let id = Uuid::new_v4();
    let (tx, seq): (String, i64) = sqlx::query_as(
        "INSERT INTO audit_events (id, tenant, action, outcome, occurred_at, actor_id, source, event) \
         VALUES ($1, $2, 'small.write', 'success', now(), 'u-small', 'test', \
                 jsonb_build_object('id', $1, 'tenant', $2::text)) \
         RETURNING tx_id::text, seq",
    )
    .bind(id)
    .bind(tenant)
    .fetch_one(&env.pool)
    .await?;
    Ok((id, format!("{tx}.{seq}")))
}

fn sse_id(e: &auditbridge_tests::api::Sse) -> Uuid {
    serde_json::from_str::<Value>(&e.data).unwrap()["id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_tenant_resuming_behind_many_other_events_catches_up_under_a_short_statement_timeout()
-> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    // The tenant is not tiny overall (so the planner reads the outbox order and filters),
    // but has almost nothing after the cursor.
    insert_bulk(&env, "small", 20_000).await?;
    let (_, resume) = insert_one(&env, "small").await?;
    insert_bulk(&env, "big", 450_000).await?;
    let mut want = Vec::new();
    for _ in 0..3 {
        want.push(insert_one(&env, "small").await?.0);
    }
    insert_bulk(&env, "big", 50_000).await?;
    want.push(insert_one(&env, "small").await?.0);
    sqlx::query("ANALYZE audit_events")
        .execute(&env.pool)
        .await?;
    env.wait_below_horizon(T).await?;

    // Every statement of serve is cancelled after 60 ms: a replay that reads its tenant's
    // rows in one statement over 450,000 rows of another tenant never gets past them.
    let small = Token::tenant("small", "small", &["read"]);
    let api = ApiServer::start(
        &env,
        &[&small],
        &[("AUDITBRIDGE_API_STATEMENT_TIMEOUT", "60ms")],
    )
    .await?;
    // As a browser's EventSource would, the client resumes from the last id it saw if the
    // server ends the stream (a statement cut by the timeout when the machine is loaded); the
    // replay must still move forward and finish, without a gap or a repeat.
    let got = api.replay("", &small, &resume, T, 20).await?;
    let got: Vec<Uuid> = got.iter().map(sse_id).collect();
    assert_eq!(got, want, "the replay missed, repeated or reordered events");

    // And an admin-like filter with no index of its own (actor) over the whole trail.
    let got = api.replay("actor=u-small", &small, "0.0", T, 20).await?;
    let got: Vec<Uuid> = got.iter().map(sse_id).collect();
    assert_eq!(got.len(), want.len() + 1);
    assert_eq!(&got[1..], &want[..]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_token_with_many_deep_replays_and_queries_cannot_starve_another_token()
-> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    insert_bulk(&env, "big", 450_000).await?;
    let (mine, _) = insert_one(&env, "other").await?;
    sqlx::query("ANALYZE audit_events")
        .execute(&env.pool)
        .await?;
    env.wait_below_horizon(T).await?;
    let hog = Token::tenant("hog", "big", &["read"]);
    let other = Token::tenant("other", "other", &["read"]);
    // A pool of 4: one token's share is 1.
    let api = ApiServer::start(
        &env,
        &[&hog, &other],
        &[("AUDITBRIDGE_DB_MAX_CONNECTIONS", "4")],
    )
    .await?;

    // The hog: as many deep replays as it may open (from the start, with a filter no index
    // serves and nothing matches), and 40 stats requests over its 450,000 events at once.
    let mut tails = Vec::new();
    for _ in 0..16 {
        tails.push(api.stream("outcome=denied", &hog, Some("0.0")).await?);
    }
    let mut hogging = Vec::new();
    for _ in 0..40 {
        let req = api
            .http
            .get(api.url("/v1/stats?bucket=1h"))
            .bearer_auth(&hog.token);
        hogging.push(tokio::spawn(async move {
            let resp = req.send().await?;
            let status = resp.status().as_u16();
            let retry_after = resp
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            anyhow::Ok((status, retry_after))
        }));
    }
    // Give the hog's requests a moment to reach the database: this is the load the other
    // token's request must get through (there is no condition to wait for from outside).
    tokio::time::sleep(Duration::from_millis(300)).await;

    let started = std::time::Instant::now();
    let (status, body) = api.get("/v1/events?limit=10", Some(&other)).await?;
    let took = started.elapsed();
    assert_eq!(status, 200, "{body}");
    assert_eq!(ids_of(body["events"].as_array().unwrap()), vec![mine]);
    assert!(
        took < Duration::from_millis(1500),
        "another token's page took {took:?} behind one token's load"
    );

    // The hog is answered or told when to retry, never left waiting without bound.
    let mut refused = 0;
    for h in hogging {
        let (status, retry_after) = tokio::time::timeout(T, h).await???;
        match status {
            200 => {}
            429 => {
                assert_eq!(retry_after.as_deref(), Some("1"));
                refused += 1;
            }
            s => panic!("the hog's stats request got {s}"),
        }
    }
    assert!(
        refused > 0,
        "40 concurrent stats of one token were all run at once"
    );
    // And its replays all finish, sharing its turn (one deadline for all of them: they run
    // one statement at a time between them).
    tokio::time::timeout(Duration::from_secs(180), async {
        for tail in &mut tails {
            assert!(tail.caught_up(T).await?.is_empty());
        }
        anyhow::Ok(())
    })
    .await
    .map_err(|_| anyhow::anyhow!("16 replays of one token did not finish within 180 s"))??;
    Ok(())
}
