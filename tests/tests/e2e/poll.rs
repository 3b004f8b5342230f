//! Pull sources (`type = "api"`, `auditbridge poll`) against a local API that behaves like
//! Okta's System Log, a token-paged API and a time-windowed one
//! (`auditbridge_tests::remote_api`): every remote event stored exactly once through
//! rate limits, 500s, slow and malformed pages, duplicates across pages and late arrivals,
//! a poller SIGKILLed mid-page, and a lease taken over by another process.

use std::time::{Duration, Instant};

use auditbridge_store::roles::POLLER;
use auditbridge_tests::remote_api::{Fault, RemoteApi, item};
use auditbridge_tests::sources::Process;
use auditbridge_tests::{TestEnv, eventually};
use serde_json::{Value, json};
use time::OffsetDateTime;

use crate::roles::url_as;

const WAIT: Duration = Duration::from_secs(60);

fn mapping(actions: &[(&str, &str)]) -> Value {
    let actions: serde_json::Map<String, Value> = actions
        .iter()
        .map(|(k, v)| ((*k).to_owned(), Value::from(*v)))
        .collect();
    json!({
        "id": "/uuid",
        "tenant": "/org",
        "type": "/eventType",
        "actions": actions,
        "occurred_at": "/published",
        "outcome": "/outcome/result",
        "outcomes": {"SUCCESS": "success", "FAILURE": "failure"},
        "actor": {"id": "/actor/id", "type": {"const": "user"}, "ip": "/client/ipAddress"},
        "metadata": {"remote_id": "/uuid"}
    })
}

const ACTIONS: [(&str, &str); 2] = [
    ("user.session.start", "session.create"),
    ("user.account.update_password", "user.update"),
];

/// `n` remote events named `<prefix>-<i>`, a second apart, ending a minute ago.
fn items(prefix: &str, n: usize) -> Vec<Value> {
    let end = OffsetDateTime::now_utc() - Duration::from_secs(60);
    (0..n)
        .map(|i| {
            let at = end - Duration::from_secs((n - i) as u64);
            let kind = if i % 3 == 0 {
                "user.account.update_password"
            } else {
                "user.session.start"
            };
            item(&format!("{prefix}-{i:05}"), kind, at)
        })
        .collect()
}

fn uuids(items: &[Value]) -> Vec<String> {
    let mut ids: Vec<String> = items
        .iter()
        .map(|i| i["uuid"].as_str().unwrap_or_default().to_owned())
        .collect();
    ids.sort();
    ids
}

/// The remote ids of the stored events, sorted, repeats kept.
async fn stored_remote_ids(env: &TestEnv) -> anyhow::Result<Vec<String>> {
    Ok(
        sqlx::query_scalar("SELECT event->'metadata'->>'remote_id' FROM audit_events ORDER BY 1")
            .fetch_all(&env.pool)
            .await?,
    )
}

async fn wait_stored(env: &TestEnv, expected: &[String], timeout: Duration) -> anyhow::Result<()> {
    eventually("every remote event stored once", timeout, async || {
        let stored = stored_remote_ids(env).await?;
        anyhow::ensure!(
            stored == expected,
            "{} stored of {} expected; repeated: {:?}",
            stored.len(),
            expected.len(),
            stored
                .windows(2)
                .filter(|w| w[0] == w[1])
                .take(3)
                .collect::<Vec<_>>()
        );
        Ok(())
    })
    .await
}

async fn spawn_poll(
    env: &TestEnv,
    name: &str,
    sources: &Value,
    only: Option<&str>,
) -> anyhow::Result<Process> {
    let sources = sources.to_string();
    let url = url_as(env, POLLER);
    let mut args = vec!["poll"];
    args.extend(only);
    let p = Process::spawn(
        env,
        name,
        &args,
        &[
            ("AUDITBRIDGE_SOURCES", sources.as_str()),
            ("AUDITBRIDGE_DATABASE_URL", url.as_str()),
        ],
    )?;
    p.wait_ready(WAIT).await?;
    Ok(p)
}

async fn status_json(env: &TestEnv, sources: &Value) -> anyhow::Result<Value> {
    let sources = sources.to_string();
    let out = env
        .command(
            &["status", "--json"],
            &[("AUDITBRIDGE_SOURCES", sources.as_str())],
        )
        .output()
        .await?;
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn okta_source(remote: &RemoteApi) -> Value {
    json!({
        "name": "okta",
        "type": "api",
        "params": {
            "url": remote.url("/api/v1/logs"),
            "cursor": "link",
            "headers": {"Authorization": "SSWS 00okta-secret-token-value"},
            "interval": "300ms",
            "page_size": 200,
            "timeout": "1s",
            "tenants": ["acme"],
            "mapping": mapping(&ACTIONS)
        }
    })
}

/// An Okta-like System Log, polled through a 429 with `Retry-After`, a 503 with one, two
/// 500s, a response slower than the timeout and a page cut in the middle: every event stored
/// exactly once, the items no mapping takes kept as rejects, the empty pages of a caught-up
/// poll followed by their next links, and what arrives later fetched from the saved link.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_okta_log_is_stored_once_through_rate_limits_errors_and_a_malformed_page()
-> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let worker = env.spawn_worker("w", &[]).await?;
    worker.wait_ready(WAIT).await?;
    let remote = RemoteApi::start().await?;
    remote.require_authorization("SSWS 00okta-secret-token-value");
    let good = items("okta", 1000);
    let mut served = good.clone();
    // Three items no mapping takes: an action off the allow-list, a tenant off the source's
    // list, and one that is not an object.
    let mut off_list = item(
        "bad-action",
        "user.mfa.factor.deactivate",
        OffsetDateTime::now_utc(),
    );
    off_list["org"] = "acme".into();
    let mut other_tenant = item(
        "bad-tenant",
        "user.session.start",
        OffsetDateTime::now_utc(),
    );
    other_tenant["org"] = "globex".into();
    served.insert(250, off_list);
    served.insert(500, other_tenant);
    served.insert(750, json!(42));
    remote.push(served);
    remote.fail_next([
        Fault::RetryAfter(429, 2),
        Fault::Status(500),
        Fault::Status(500),
        Fault::Slow(Duration::from_secs(3)),
        Fault::Malformed,
        Fault::RetryAfter(503, 1),
    ]);
    let sources = json!([okta_source(&remote)]);
    let mut poll = spawn_poll(&env, "poll", &sources, None).await?;

    let expected = uuids(&good);
    wait_stored(&env, &expected, WAIT).await?;
    assert_eq!(remote.faults_left(), 0);
    let requests = remote.requests();
    // Retry-After was waited for.
    for (status, secs) in [(429, 2.0), (503, 1.0)] {
        let at = requests
            .iter()
            .position(|r| r.answered == status)
            .expect("the scripted answer");
        let next = &requests[at + 1];
        let waited = next.at.duration_since(requests[at].at).as_secs_f64();
        assert!(
            waited >= secs * 0.95,
            "{status}: asked again after {waited}s"
        );
    }
    // Resumed from the saved link, never from a timestamp: every request but the first
    // carries Okta's `after`, and it never goes back.
    let pages: Vec<_> = requests.iter().filter(|r| r.answered == 200).collect();
    let resumed = pages
        .iter()
        .position(|r| r.param("after").is_some())
        .expect("a page fetched by its next link");
    let mut last = 0;
    for r in &pages[resumed..] {
        let after: usize = r
            .param("after")
            .expect("resumed from the saved link")
            .parse()?;
        assert!(after >= last, "the cursor went back from {last} to {after}");
        last = after;
    }

    // Caught up: empty pages, each with its next link, until more arrives.
    eventually("empty pages polled", WAIT, async || {
        let empty = remote
            .requests()
            .iter()
            .filter(|r| r.answered == 200 && r.items == 0)
            .count();
        anyhow::ensure!(empty >= 2, "{empty} empty pages");
        Ok(())
    })
    .await?;
    let later = items("later", 30);
    remote.push(later.clone());
    let mut all = good.clone();
    all.extend(later);
    wait_stored(&env, &uuids(&all), WAIT).await?;
    env.wait_for_drained(WAIT).await?;
    assert!(
        env.dead_letters().await?.is_empty(),
        "a re-fetch was not a re-send"
    );

    // Metrics and status say what happened, by kind.
    for (kind, at_least) in [
        ("rate_limited", 1.0),
        ("unavailable", 1.0),
        ("http_5xx", 2.0),
        ("timeout", 1.0),
        ("malformed", 1.0),
    ] {
        let n = poll
            .metric_sum(
                "auditbridge_poll_errors_total",
                &[("source", "okta"), ("kind", kind)],
            )
            .await?;
        assert!(n >= at_least, "{kind}: {n}");
    }
    let published = poll
        .metric_sum(
            "auditbridge_poll_events_total",
            &[("source", "okta"), ("result", "published")],
        )
        .await?;
    assert_eq!(published, 1030.0);
    let rejected = poll
        .metric_sum(
            "auditbridge_poll_events_total",
            &[("source", "okta"), ("result", "rejected")],
        )
        .await?;
    assert_eq!(rejected, 3.0);
    assert_eq!(
        poll.metric_sum("auditbridge_poll_lease_held", &[("source", "okta")])
            .await?,
        1.0
    );
    let status = status_json(&env, &sources).await?;
    let s = &status["api_sources"][0];
    assert_eq!(s["name"], "okta", "{status}");
    assert_eq!(s["cursor"], "link");
    assert_eq!(s["events_total"], 1030, "{s}");
    assert_eq!(s["open_rejects"], 3, "{s}");
    assert_eq!(s["failing"], false, "{s}");
    assert!(s["lease_holder"].is_string(), "{s}");
    assert!(s["lag_seconds"].as_f64().is_some_and(|l| l >= 60.0), "{s}");
    assert!(
        s["errors"]["http_5xx"].as_i64().is_some_and(|n| n >= 2),
        "{s}"
    );
    let reasons: Vec<String> = sqlx::query_scalar(
        "SELECT kind || ': ' || reason FROM api_source_rejects WHERE source = 'okta' ORDER BY item_index",
    )
    .fetch_all(&env.pool)
    .await?;
    assert_eq!(reasons.len(), 3, "{reasons:?}");
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("user.mfa.factor.deactivate")),
        "{reasons:?}"
    );
    assert!(reasons.iter().any(|r| r.contains("globex")), "{reasons:?}");
    // The API token never reaches the log.
    assert!(!poll.log_text().contains("00okta-secret-token-value"));
    poll.signal("TERM");
    assert!(poll.wait_exit(WAIT).await?.success(), "{}", poll.log_text());
    Ok(())
}

fn token_source(remote: &RemoteApi, actions: &[(&str, &str)]) -> Value {
    json!({
        "name": "vault",
        "type": "api",
        "params": {
            "url": remote.url("/v2/audit"),
            "cursor": "token",
            "token_pointer": "/meta/next",
            "items": "/data",
            "oauth2": {
                "token_url": remote.url("/oauth/token"),
                "client_id": "auditbridge",
                "client_secret": "client-secret-0123456789",
                "scopes": ["audit.read"]
            },
            "interval": "200ms",
            "page_size": 100,
            "mapping": mapping(actions)
        }
    })
}

/// A token-paged API behind OAuth 2 client credentials whose pages each repeat the last
/// event of the page before: every event stored once, the short-lived token refreshed before
/// it expires (no request refused), and the items of an action the mapping lacked published
/// by `--replay-rejects` once the mapping has it, exactly once however often it runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_paged_api_with_repeats_and_oauth_then_rejects_replayed_after_a_mapping_fix()
-> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let worker = env.spawn_worker("w", &[]).await?;
    worker.wait_ready(WAIT).await?;
    let remote = RemoteApi::start().await?;
    remote.repeat_across_pages();
    remote.require_oauth(
        "auditbridge",
        "client-secret-0123456789",
        Duration::from_secs(3),
    );
    let good = items("vault", 600);
    let mut served = good.clone();
    let deleted: Vec<Value> = (0..2)
        .map(|i| {
            item(
                &format!("vault-del-{i}"),
                "user.lifecycle.delete",
                OffsetDateTime::now_utc(),
            )
        })
        .collect();
    served.insert(150, deleted[0].clone());
    served.insert(420, deleted[1].clone());
    remote.push(served);
    let sources = json!([token_source(&remote, &ACTIONS)]);
    let mut poll = spawn_poll(&env, "poll", &sources, Some("vault")).await?;
    wait_stored(&env, &uuids(&good), WAIT).await?;
    // Past the token's lifetime, still polling the newest page.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let requests = remote.requests();
    assert!(
        requests.iter().all(|r| r.answered == 200),
        "a request was refused"
    );
    assert!(remote.tokens_issued() >= 2, "the token was never refreshed");
    assert!(requests.iter().all(|r| {
        r.authorization
            .as_deref()
            .is_some_and(|a| a.starts_with("Bearer tok-"))
    }));
    poll.signal("TERM");
    assert!(poll.wait_exit(WAIT).await?.success());

    let sources_s = sources.to_string();
    let url = url_as(&env, POLLER);
    let replay = |sources: String| {
        let url = url.clone();
        let env = &env;
        async move {
            env.run(
                &["poll", "vault", "--replay-rejects"],
                &[
                    ("AUDITBRIDGE_SOURCES", sources.as_str()),
                    ("AUDITBRIDGE_DATABASE_URL", url.as_str()),
                ],
            )
            .await
        }
    };
    let (code, said) = replay(sources_s).await?;
    assert_eq!(code, Some(0), "{said}");
    assert!(
        said.contains("0 reject(s) published, 2 refused again"),
        "{said}"
    );
    let mut fixed = ACTIONS.to_vec();
    fixed.push(("user.lifecycle.delete", "user.delete"));
    let fixed_sources = json!([token_source(&remote, &fixed)]).to_string();
    let (code, said) = replay(fixed_sources.clone()).await?;
    assert_eq!(code, Some(0), "{said}");
    assert!(
        said.contains("2 reject(s) published, 0 refused again"),
        "{said}"
    );
    let (code, said) = replay(fixed_sources).await?;
    assert_eq!(code, Some(0), "{said}");
    assert!(
        said.contains("0 reject(s) published, 0 refused again"),
        "{said}"
    );
    let mut all = good.clone();
    all.extend(deleted);
    wait_stored(&env, &uuids(&all), WAIT).await?;
    let settled: Vec<(String, bool)> = sqlx::query_as(
        "SELECT replay_result, event_id IS NOT NULL FROM api_source_rejects ORDER BY id",
    )
    .fetch_all(&env.pool)
    .await?;
    assert_eq!(
        settled,
        vec![
            ("published".to_owned(), true),
            ("published".to_owned(), true)
        ]
    );
    Ok(())
}

/// A time-windowed API (`[high_water - overlap, now - settle)`): an event that appears late,
/// within the overlap of a window already fetched, is stored; the events every overlapping
/// window serves again, one of them edited by the remote side in between, are stored once
/// and are no conflict.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_windowed_api_takes_late_events_within_the_overlap_and_repeats_none() -> anyhow::Result<()>
{
    let env = TestEnv::new().await?;
    let worker = env.spawn_worker("w", &[]).await?;
    worker.wait_ready(WAIT).await?;
    let remote = RemoteApi::start().await?;
    let now = OffsetDateTime::now_utc();
    let start = now - Duration::from_secs(120);
    let early: Vec<Value> = (0..150)
        .map(|i| {
            let at = start + Duration::from_millis(500 * i as u64);
            item(&format!("win-{i:04}"), "user.session.start", at)
        })
        .collect();
    remote.push(early.clone());
    let sources = json!([{
        "name": "workspace",
        "type": "api",
        "params": {
            "url": remote.url("/activity"),
            "cursor": "window",
            "start": start.format(&time::format_description::well_known::Rfc3339)?,
            "overlap": "30s",
            "settle": "1s",
            "token_pointer": "/nextPageToken",
            "token_param": "pageToken",
            "items": "/items",
            "interval": "500ms",
            "page_size": 40,
            "mapping": mapping(&ACTIONS)
        }
    }]);
    let poll = spawn_poll(&env, "poll", &sources, None).await?;
    wait_stored(&env, &uuids(&early), WAIT).await?;

    // Late: an event ten seconds old, after windows up to now were fetched, and an edit of one
    // the earlier windows served (the remote side fixed a field).
    let late = item(
        "win-late",
        "user.session.start",
        OffsetDateTime::now_utc() - Duration::from_secs(10),
    );
    remote.push_hidden([late.clone()]);
    let first_window_end = remote.requests().len();
    eventually("a later window polled", WAIT, async || {
        anyhow::ensure!(remote.requests().len() > first_window_end + 2);
        Ok(())
    })
    .await?;
    remote.reveal();
    remote.edit("win-0149", |i| {
        i["client"]["ipAddress"] = "198.51.100.1".into();
    });
    let mut all = early.clone();
    all.push(late);
    wait_stored(&env, &uuids(&all), WAIT).await?;
    // Several windows overlapped (each reached back 30 s) and the worker saw no repeats of
    // them at all: the overlap's ids were remembered.
    eventually("windows past the overlap", WAIT, async || {
        let seen = poll
            .metric_sum(
                "auditbridge_poll_events_total",
                &[("source", "workspace"), ("result", "seen")],
            )
            .await?;
        anyhow::ensure!(seen >= 10.0, "{seen} repeats in overlaps");
        Ok(())
    })
    .await?;
    env.wait_for_drained(WAIT).await?;
    assert!(
        env.dead_letters().await?.is_empty(),
        "{:?}",
        env.dead_letters().await?
    );
    assert_eq!(
        worker.metric("auditbridge_events_duplicate_total").await?,
        0.0,
        "an overlap's event was published again"
    );
    let requests = remote.requests();
    assert!(
        requests
            .iter()
            .all(|r| r.param("since").is_some() && r.param("until").is_some()),
        "a request without its window"
    );
    Ok(())
}

/// Two pollers of one source: only the lease holder polls. It is SIGKILLed while a page is
/// in flight; the other takes over from the saved cursor; the killed one, restarted, stands
/// by; the new holder is killed too and the restarted one finishes. Every event stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pollers_killed_mid_page_hand_over_by_lease_and_store_every_event_once()
-> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let worker = env.spawn_worker("w", &[]).await?;
    worker.wait_ready(WAIT).await?;
    let remote = RemoteApi::start().await?;
    remote.require_authorization("SSWS 00okta-secret-token-value");
    remote.delay(Duration::from_millis(300));
    let good = items("okta", 8000);
    remote.push(good.clone());
    let sources = json!([okta_source(&remote)]);
    let a = spawn_poll(&env, "poll-a", &sources, None).await?;
    let b = spawn_poll(&env, "poll-b", &sources, None).await?;

    let first_is_a = eventually("one poller holds the lease", WAIT, async || {
        match (held(&a).await?, held(&b).await?) {
            (true, false) => Ok(true),
            (false, true) => Ok(false),
            other => anyhow::bail!("lease held by (a, b) = {other:?}"),
        }
    })
    .await?;
    let (mut holder, mut standby) = if first_is_a { (a, b) } else { (b, a) };
    // Only the holder asks.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(asked(&holder).await? > 0.0);
    assert_eq!(asked(&standby).await?, 0.0, "the standby polled");

    // Killed mid-page: while the API is answering it.
    let kill_mid_page = async |p: &mut Process| -> anyhow::Result<()> {
        eventually("a page in flight", WAIT, async || {
            anyhow::ensure!(remote.in_flight() > 0);
            Ok(())
        })
        .await?;
        p.signal("KILL");
        p.wait_exit(WAIT).await?;
        Ok(())
    };
    kill_mid_page(&mut holder).await?;
    let at_kill = stored_remote_ids(&env).await?.len();
    assert!(at_kill < good.len(), "all stored before the kill");
    let started = Instant::now();
    eventually("the standby takes the lease", WAIT, async || {
        anyhow::ensure!(held(&standby).await?);
        Ok(())
    })
    .await?;
    eprintln!("taken over after {:?}", started.elapsed());
    let restarted = spawn_poll(&env, "poll-c", &sources, None).await?;
    eventually("more stored by the new holder", WAIT, async || {
        anyhow::ensure!(stored_remote_ids(&env).await?.len() > at_kill + 200);
        Ok(())
    })
    .await?;
    assert_eq!(
        asked(&restarted).await?,
        0.0,
        "the restarted poller polled beside the holder"
    );
    kill_mid_page(&mut standby).await?;
    wait_stored(&env, &uuids(&good), Duration::from_secs(120)).await?;
    env.wait_for_drained(WAIT).await?;
    assert!(env.dead_letters().await?.is_empty());
    drop(restarted);
    Ok(())
}

async fn held(p: &Process) -> anyhow::Result<bool> {
    Ok(
        p.metric_sum("auditbridge_poll_lease_held", &[("source", "okta")])
            .await?
            == 1.0,
    )
}

async fn asked(p: &Process) -> anyhow::Result<f64> {
    p.metric_sum("auditbridge_poll_requests_total", &[("source", "okta")])
        .await
}

/// Credentials the API refuses mark the source failing in `status`; it keeps retrying
/// slowly, and goes on by itself once they are accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_credentials_mark_the_source_failing_and_it_recovers_when_they_work()
-> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let worker = env.spawn_worker("w", &[]).await?;
    worker.wait_ready(WAIT).await?;
    let remote = RemoteApi::start().await?;
    remote.require_authorization("SSWS the-right-one-0123");
    let good = items("okta", 20);
    remote.push(good.clone());
    let sources = json!([okta_source(&remote)]);
    let poll = spawn_poll(&env, "poll", &sources, None).await?;
    let status = eventually("the source is failing", WAIT, async || {
        let status = status_json(&env, &sources).await?;
        anyhow::ensure!(status["api_sources"][0]["failing"] == true, "{status}");
        Ok(status)
    })
    .await?;
    let s = &status["api_sources"][0];
    assert_eq!(s["last_error_kind"], "auth", "{s}");
    assert!(
        s["last_error"].as_str().unwrap_or("").contains("401"),
        "{s}"
    );
    let (_, text) = env
        .run(
            &["status"],
            &[("AUDITBRIDGE_SOURCES", &sources.to_string())],
        )
        .await?;
    assert!(text.contains("FAILING"), "{text}");
    // Slowly: at most one attempt in the next three seconds (5 s apart at least).
    let before = remote.requests().len();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(remote.requests().len() - before <= 1, "retried quickly");
    remote.require_authorization("SSWS 00okta-secret-token-value");
    wait_stored(&env, &uuids(&good), WAIT).await?;
    let status = status_json(&env, &sources).await?;
    assert_eq!(status["api_sources"][0]["failing"], false, "{status}");
    drop(poll);
    Ok(())
}
