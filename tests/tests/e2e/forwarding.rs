//! Forwarding to HTTP destinations through failures, leases and filters, with real workers,
//! NATS, PostgreSQL and a real HTTP receiver on 127.0.0.1.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::ensure;
use auditbridge_event::Event;
use auditbridge_tests::rabbit::TestBroker;
use auditbridge_tests::receiver::{Answer, Receiver};
use auditbridge_tests::{TestEnv, Worker, eventually, until};
use serde_json::json;
use uuid::Uuid;

const T: Duration = Duration::from_secs(60);

fn ids<'a>(events: impl IntoIterator<Item = &'a Event>) -> HashSet<Uuid> {
    events.into_iter().map(|e| e.id).collect()
}

async fn status_json(env: &TestEnv, destinations: &str) -> anyhow::Result<serde_json::Value> {
    let out = env
        .command(
            &["status", "--json"],
            &[("AUDITBRIDGE_DESTINATIONS", destinations)],
        )
        .output()
        .await?;
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// `base` with the keys of `extra` added (or replaced): a destination's params for one case.
fn merged(mut base: serde_json::Value, extra: serde_json::Value) -> serde_json::Value {
    let serde_json::Value::Object(extra) = extra else {
        panic!("extra params must be an object: {extra}")
    };
    base.as_object_mut()
        .expect("base params are an object")
        .extend(extra);
    base
}

fn destination<'a>(status: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    status["destinations"]
        .as_array()
        .and_then(|l| l.iter().find(|d| d["name"] == name))
        .unwrap_or(&serde_json::Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_destination_rides_out_500s_then_429s_and_delivers_everything() -> anyhow::Result<()> {
    let mut env = TestEnv::new().await?;
    env.ensure_stream().await?;
    let rx = Receiver::start().await?;
    rx.answer(Answer::Status(500));
    let broker = TestBroker::new(&env.tag).await?;
    let dest = (json!([{"name": "siem", "type": "http", "params": {
        "url": rx.url("/siem"), "start": "earliest", "retry_min": "50ms", "retry_max": "1s",
        "max_batch_events": 200
    }}, broker.destination("bus", json!({}))]))
    .to_string();
    // Two workers: concurrent writers, one relay.
    let w1 = env
        .spawn_worker("w1", &[("AUDITBRIDGE_DESTINATIONS", &dest)])
        .await?;
    let w2 = env
        .spawn_worker("w2", &[("AUDITBRIDGE_DESTINATIONS", &dest)])
        .await?;
    w1.wait_ready(T).await?;
    w2.wait_ready(T).await?;

    let events = env.events(3_000);
    env.publish(&events).await?;
    // Ingest does not wait for the failing destination.
    env.wait_for_count(3_000, T).await?;
    until("three 500s", T, || {
        rx.requests().iter().filter(|r| r.answered == 500).count() >= 3
    })
    .await?;
    assert!(rx.delivered().is_empty());
    // Meanwhile the RabbitMQ destination kept up: everything is on the bus while the webhook
    // still fails.
    let mut on_bus = Vec::new();
    broker
        .collect_until(T, &mut on_bus, |got| {
            got.iter()
                .flat_map(|g| g.ids(false))
                .collect::<HashSet<_>>()
                == ids(&events)
        })
        .await?;
    assert!(rx.delivered().is_empty(), "the webhook was still failing");

    rx.answer(Answer::TooMany(1));
    until("two 429s", T, || {
        rx.requests().iter().filter(|r| r.answered == 429).count() >= 2
    })
    .await?;
    let tries: Vec<Instant> = rx
        .requests()
        .iter()
        .filter(|r| r.answered == 429)
        .map(|r| r.at)
        .collect();
    assert!(
        tries[1].duration_since(tries[0]) >= Duration::from_millis(900),
        "Retry-After: 1 was not honoured ({:?} between attempts)",
        tries[1].duration_since(tries[0])
    );

    rx.answer(Answer::Ok);
    until("every event delivered", T, || {
        rx.delivered().len() == events.len()
    })
    .await?;
    assert_eq!(rx.delivered(), ids(&events));

    // Progress, failures and the lease are visible.
    let status = status_json(&env, &dest).await?;
    let siem = destination(&status, "siem");
    assert!(
        siem["delivered_total"].as_i64().unwrap_or(0) >= 3_000,
        "{siem}"
    );
    assert_eq!(siem["failing"], false);
    assert_eq!(
        siem["dead_letters"]["count"], 0,
        "5xx and 429 are retried, never dead-lettered: {siem}"
    );
    assert!(
        siem["last_error"].as_str().unwrap_or("").contains("429"),
        "{siem}"
    );
    assert!(siem["lease_holder"].is_string(), "{siem}");
    let mut fails_5xx = 0.0;
    let mut fails_429 = 0.0;
    for w in [&w1, &w2] {
        fails_5xx += w
            .metric("auditbridge_destination_failures_total{destination=\"siem\",reason=\"status_5xx\"}")
            .await?;
        fails_429 += w
            .metric("auditbridge_destination_failures_total{destination=\"siem\",reason=\"status_429\"}")
            .await?;
    }
    assert!(
        fails_5xx >= 3.0 && fails_429 >= 2.0,
        "{fails_5xx} {fails_429}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_and_start_positions_route_exactly_what_they_should_and_signatures_verify()
-> anyhow::Result<()> {
    let mut env = TestEnv::new().await?;
    env.ensure_stream().await?;
    let rx = Receiver::start().await?;

    // Events stored before the destinations exist.
    let before = env.events(300);
    env.publish(&before).await?;
    let first = env.spawn_worker("plain", &[]).await?;
    env.wait_for_count(300, T).await?;
    drop(first);

    let tenant = before[0].tenant.clone();
    let dest = (json!([
        {"name": "all-earliest", "type": "http", "params": {"url": rx.url("/earliest"), "start": "earliest"}},
        {"name": "all-now", "type": "http", "params": {"url": rx.url("/now"), "secret": "s3cret"}},
        {"name": "one-tenant", "type": "http", "params": {"url": rx.url("/tenant"), "start": "earliest",
            "filter": {"tenants": [tenant]}, "format": "json_array"}},
        {"name": "documents", "type": "http", "params": {"url": rx.url("/documents"), "start": "earliest",
            "filter": {"actions": ["document"]}}},
        {"name": "refusals", "type": "http", "params": {"url": rx.url("/refusals"), "start": "earliest",
            "filter": {"outcomes": ["denied", "failure"]}}}
    ])).to_string();
    let worker = env
        .spawn_worker("relay", &[("AUDITBRIDGE_DESTINATIONS", &dest)])
        .await?;
    worker.wait_ready(T).await?;
    // `now` means from the destination's creation: wait until it exists before publishing.
    until_status(&env, &dest, "destination all-now registered", T, |s| {
        !destination(s, "all-now").is_null()
    })
    .await?;
    let after = env.events(500);
    env.publish(&after).await?;
    let all: Vec<Event> = before.iter().chain(&after).cloned().collect();

    until("the earliest destination", T, || {
        rx.delivered_on("/earliest").len() == all.len()
    })
    .await?;
    until("the now destination", T, || {
        rx.delivered_on("/now").len() >= after.len()
    })
    .await?;
    let want = |f: &dyn Fn(&Event) -> bool| ids(all.iter().filter(|e| f(e)));
    let want_tenant = want(&|e| e.tenant == tenant);
    let want_docs = want(&|e| e.action == "document" || e.action.starts_with("document."));
    let want_refusals = want(&|e| matches!(e.outcome.as_str(), "denied" | "failure"));
    assert!(!want_docs.is_empty() && !want_refusals.is_empty() && want_tenant.len() < all.len());
    until("the filtered destinations", T, || {
        rx.delivered_on("/tenant") == want_tenant
            && rx.delivered_on("/documents") == want_docs
            && rx.delivered_on("/refusals") == want_refusals
    })
    .await?;

    assert_eq!(rx.delivered_on("/earliest"), ids(&all));
    assert_eq!(
        rx.delivered_on("/now"),
        ids(&after),
        "`now` must start at creation"
    );
    // Nothing extra arrives later either.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(rx.delivered_on("/tenant"), want_tenant);

    // Every request to the signed destination verifies; a tampered body does not.
    let signed: Vec<_> = rx
        .requests()
        .into_iter()
        .filter(|r| r.path == "/now")
        .collect();
    assert!(!signed.is_empty());
    for r in &signed {
        let ts: u64 = r.headers["x-auditbridge-timestamp"].to_str()?.parse()?;
        let sig = r.headers["x-auditbridge-signature"].to_str()?;
        assert!(auditbridge_destinations::http::verify(
            b"s3cret", ts, &r.body, sig
        ));
        let mut tampered = r.body.to_vec();
        tampered[0] ^= 1;
        assert!(!auditbridge_destinations::http::verify(
            b"s3cret", ts, &tampered, sig
        ));
    }
    let unsigned = rx
        .requests()
        .into_iter()
        .find(|r| r.path == "/earliest")
        .unwrap();
    assert!(!unsigned.headers.contains_key("x-auditbridge-signature"));
    Ok(())
}

/// The pid in a lease holder name (`host-pid-nonce`).
fn holder_pid(holder: &str) -> Option<u32> {
    holder.rsplit('-').nth(1)?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_lease_holder_is_replaced_and_every_event_delivered() -> anyhow::Result<()> {
    let mut env = TestEnv::new().await?;
    env.ensure_stream().await?;
    let rx = Receiver::start().await?;
    let dest = (json!([{"name": "siem", "type": "http", "params": {
        "url": rx.url("/siem"), "start": "earliest", "max_batch_events": 100
    }}]))
    .to_string();
    let vars = [
        ("AUDITBRIDGE_DESTINATIONS", dest.as_str()),
        ("AUDITBRIDGE_LEASE_TTL", "2s"),
    ];
    let mut workers: Vec<Worker> = vec![
        env.spawn_worker("w1", &vars).await?,
        env.spawn_worker("w2", &vars).await?,
    ];
    for w in &workers {
        w.wait_ready(T).await?;
    }
    let first = env.events(2_000);
    env.publish(&first).await?;
    until("some deliveries", T, || rx.delivered().len() >= 200).await?;

    let holder = destination(&status_json(&env, &dest).await?, "siem")["lease_holder"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| anyhow::anyhow!("nobody holds the lease"))?;
    let pid = holder_pid(&holder).ok_or_else(|| anyhow::anyhow!("no pid in {holder}"))?;
    let idx = workers
        .iter()
        .position(|w| w.pid() == pid)
        .expect("the holder is one of ours");
    workers[idx].signal("KILL");
    workers[idx].wait_exit(Duration::from_secs(10)).await?;
    let killed_at = Instant::now();

    let second = env.events(1_000);
    env.publish(&second).await?;
    let all: HashSet<Uuid> = ids(first.iter().chain(&second));
    until("every event delivered after the takeover", T, || {
        rx.delivered() == all
    })
    .await?;
    let new_holder = destination(&status_json(&env, &dest).await?, "siem")["lease_holder"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_default();
    assert_ne!(
        holder_pid(&new_holder),
        Some(pid),
        "the dead worker still holds the lease"
    );
    assert_eq!(holder_pid(&new_holder), Some(workers[1 - idx].pid()));
    eprintln!("takeover and catch-up took {:?}", killed_at.elapsed());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewind_replays_and_max_backlog_age_skips_loudly() -> anyhow::Result<()> {
    let mut env = TestEnv::new().await?;
    env.ensure_stream().await?;
    let rx = Receiver::start().await?;
    let dest = (json!([
        {"name": "replayable", "type": "http", "params": {"url": rx.url("/replay"), "start": "earliest"}},
        {"name": "impatient", "type": "http", "params": {"url": rx.url("/impatient"), "start": "earliest",
            "max_backlog_age": "6s", "retry_min": "100ms", "retry_max": "500ms"}}
    ])).to_string();
    rx.answer(Answer::Status(400));
    let worker = env
        .spawn_worker("w", &[("AUDITBRIDGE_DESTINATIONS", &dest)])
        .await?;
    worker.wait_ready(T).await?;

    let old = env.events(300);
    env.publish(&old).await?;
    env.wait_for_count(300, T).await?;
    // A 400 keeps the batch and marks the destination failing.
    let s = until_status(&env, &dest, "impatient marked failing", T, |s| {
        destination(s, "impatient")["failing"] == true
    })
    .await?;
    let d = destination(&s, "impatient");
    assert!(
        d["last_error"].as_str().unwrap_or("").contains("400"),
        "{d}"
    );
    // Let the backlog age past 6 s, then recover. (6 s, not less: `received_at` is the
    // transaction's start, and on a loaded machine a batch can take seconds to commit, so
    // a shorter age can pass before the relay ever sees the events.)
    tokio::time::sleep(Duration::from_secs(7)).await;
    let mark = time::OffsetDateTime::now_utc();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let new = env.events(100);
    env.publish(&new).await?;
    env.wait_for_count(400, T).await?;
    rx.answer(Answer::Ok);

    until("new events on the impatient destination", T, || {
        rx.delivered_on("/impatient") == ids(&new)
    })
    .await?;
    until("everything on the replayable destination", T, || {
        rx.delivered_on("/replay") == ids(old.iter().chain(&new))
    })
    .await?;
    let s = status_json(&env, &dest).await?;
    assert_eq!(destination(&s, "impatient")["skipped_total"], 300, "{s}");
    assert_eq!(destination(&s, "replayable")["skipped_total"], 0);
    assert_eq!(
        worker
            .metric("auditbridge_destination_skipped_total{destination=\"impatient\"}")
            .await?,
        300.0
    );
    assert!(
        worker
            .log_text()
            .contains("Skipping backlog older than max_backlog_age")
    );

    // Rewind the replayable destination to before the new events: they come again, the old
    // ones do not.
    let before_rewind = rx.delivered_count();
    let ts = mark.format(&time::format_description::well_known::Rfc3339)?;
    let out = env
        .command(
            &["destinations", "rewind", "replayable", "--to", &ts],
            &[("AUDITBRIDGE_DESTINATIONS", &dest)],
        )
        .output()
        .await?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    until("the replay", T, || {
        rx.delivered_count() >= before_rewind + new.len()
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let replayed: Vec<Uuid> = rx
        .requests()
        .iter()
        .filter(|r| r.path == "/replay" && r.answered == 200)
        .flat_map(|r| r.ids())
        .collect();
    for e in &new {
        assert_eq!(
            replayed.iter().filter(|id| **id == e.id).count(),
            2,
            "replayed once more"
        );
    }
    for e in &old {
        assert_eq!(
            replayed.iter().filter(|id| **id == e.id).count(),
            1,
            "not replayed"
        );
    }
    let unknown = env
        .command(&["destinations", "rewind", "nope", "--to", &ts], &[])
        .output()
        .await?;
    assert!(!unknown.status.success());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_event_and_batch_modes_carry_every_event_with_its_routing_key()
-> anyhow::Result<()> {
    let mut env = TestEnv::new().await?;
    env.ensure_stream().await?;
    let events_bus = TestBroker::new(&format!("{}e", env.tag)).await?;
    let batch_bus = TestBroker::new(&format!("{}b", env.tag)).await?;
    let events = env.events(1_500);
    let tenant = events[0].tenant.clone();
    let dest = (json!([
        events_bus.destination(
            "per-event",
            json!({"routing_key": "audit.{tenant}.{action}.{outcome}"})
        ),
        batch_bus.destination(
            "batched",
            json!({"mode": "batch", "batch_size": 200, "filter": {"tenants": [tenant]}})
        )
    ]))
    .to_string();
    let worker = env
        .spawn_worker("w", &[("AUDITBRIDGE_DESTINATIONS", &dest)])
        .await?;
    worker.wait_ready(T).await?;
    env.publish(&events).await?;

    let mut per_event = Vec::new();
    events_bus
        .collect_until(T, &mut per_event, |got| got.len() >= events.len())
        .await?;
    let want_tenant = ids(events.iter().filter(|e| e.tenant == tenant));
    let mut batched = Vec::new();
    batch_bus
        .collect_until(T, &mut batched, |got| {
            got.iter().flat_map(|g| g.ids(true)).collect::<HashSet<_>>() == want_tenant
        })
        .await?;

    // One message per event, each with its id and a rendered routing key; no extras.
    assert_eq!(per_event.len(), events.len());
    let by_id: std::collections::HashMap<Uuid, &Event> = events.iter().map(|e| (e.id, e)).collect();
    for m in &per_event {
        let id: Uuid = m.message_id.as_deref().unwrap_or_default().parse()?;
        let e = by_id[&id];
        assert_eq!(
            m.routing_key,
            format!("audit.{}.{}.{}", e.tenant, e.action, e.outcome.as_str())
        );
        let body: Event = serde_json::from_slice(&m.body)?;
        assert_eq!(&body, e);
    }
    // Batches: NDJSON, at most batch_size each, only the filtered tenant.
    assert!(batched.len() < want_tenant.len(), "batch mode should batch");
    let all: Vec<Uuid> = batched.iter().flat_map(|g| g.ids(true)).collect();
    assert_eq!(all.len(), want_tenant.len(), "no event twice");
    assert!(batched.iter().all(|g| g.ids(true).len() <= 200));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adding_and_removing_destinations_on_restart_keeps_the_others_progress()
-> anyhow::Result<()> {
    let mut env = TestEnv::new().await?;
    env.ensure_stream().await?;
    let rx = Receiver::start().await?;
    let kept = json!({"name": "kept", "type": "http", "params": {"url": rx.url("/kept"), "start": "earliest"}});
    let dropped = json!({"name": "dropped", "type": "http", "params": {"url": rx.url("/dropped"), "start": "earliest"}});
    let added = json!({"name": "added", "type": "http", "params": {"url": rx.url("/added"), "start": "earliest"}});

    let first_config = json!([kept.clone(), dropped]).to_string();
    let first = env
        .spawn_worker("first", &[("AUDITBRIDGE_DESTINATIONS", &first_config)])
        .await?;
    let before = env.events(400);
    env.publish(&before).await?;
    until("both destinations caught up", T, || {
        rx.delivered_on("/kept") == ids(&before) && rx.delivered_on("/dropped") == ids(&before)
    })
    .await?;
    let mut first = first;
    first.signal("TERM");
    first.wait_exit(Duration::from_secs(20)).await?;
    let kept_requests = rx.requests().iter().filter(|r| r.path == "/kept").count();

    // Restart with `dropped` removed and `added` new; `kept` unchanged.
    let second_config = json!([kept, added]).to_string();
    let _second = env
        .spawn_worker("second", &[("AUDITBRIDGE_DESTINATIONS", &second_config)])
        .await?;
    let after = env.events(100);
    env.publish(&after).await?;
    let all = ids(before.iter().chain(&after));
    until("the restart's deliveries", T, || {
        rx.delivered_on("/kept") == all && rx.delivered_on("/added") == all
    })
    .await?;
    // `kept` resumed from its cursor: only the new events were sent to it again.
    let kept_again: Vec<Uuid> = rx
        .requests()
        .iter()
        .filter(|r| r.path == "/kept")
        .skip(kept_requests)
        .flat_map(|r| r.ids())
        .collect();
    assert_eq!(
        kept_again.iter().copied().collect::<HashSet<_>>(),
        ids(&after)
    );
    assert_eq!(kept_again.len(), after.len(), "nothing sent twice to kept");
    // `dropped` got nothing more, and its progress is kept for if it comes back.
    assert_eq!(rx.delivered_on("/dropped"), ids(&before));
    let s = status_json(&env, &second_config).await?;
    let d = destination(&s, "dropped");
    assert_eq!(d["configured"], false, "{s}");
    assert_eq!(d["delivered_total"], 400, "{s}");
    assert_eq!(d["backlog_events"], 100, "{s}");
    Ok(())
}

/// An event with a valid action of five 60-character tokens: its `{tenant}.{action}` routing
/// key is over AMQP's 255 bytes.
/// An event whose routing key under [`LONG_KEY_TEMPLATE`] is over AMQP's 255 bytes. (The
/// default `{tenant}.{action}` always fits: validation bounds both so that it does.)
fn with_long_action(mut e: Event) -> Event {
    e.action = vec!["x".repeat(60); 3].join(".");
    e.source = "s".repeat(200);
    e
}

/// A routing-key template that can exceed 255 bytes within the field limits.
const LONG_KEY_TEMPLATE: &str = "{tenant}.{action}.{source}";

/// Polls `status --json` until `check` holds for it, or fails after `timeout`.
async fn until_status(
    env: &TestEnv,
    dest: &str,
    what: &str,
    timeout: Duration,
    check: impl Fn(&serde_json::Value) -> bool,
) -> anyhow::Result<serde_json::Value> {
    eventually(what, timeout, async || {
        let s = status_json(env, dest).await?;
        ensure!(check(&s), "status: {s}");
        Ok(s)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_batch_mode_to_a_queue_bound_to_one_tenant_carries_exactly_its_events()
-> anyhow::Result<()> {
    let mut env = TestEnv::new().await?;
    env.ensure_stream().await?;
    let mut first = env.events(800);
    let t1 = first[0].tenant.clone();
    assert!(first.iter().any(|e| e.tenant != t1), "mixed tenants");
    // Each round ends with a t1 event: the relay dead-letters a refused event only once the
    // destination took one after it (else it cannot tell the event's fault from the
    // destination's, and holds it until one comes), so a round ending in other tenants'
    // events would be held until the next round.
    first.rotate_left(1);
    // Only t1's keys are bound; `mandatory` (the default) makes the others unroutable.
    let bus = TestBroker::bound(&env.tag, &format!("{t1}.#")).await?;
    let dest =
        (json!([bus.destination("bus", json!({"mode": "batch", "batch_size": 200}))])).to_string();
    let worker = env
        .spawn_worker("w", &[("AUDITBRIDGE_DESTINATIONS", &dest)])
        .await?;
    worker.wait_ready(T).await?;
    env.publish(&first).await?;
    // The destination keeps going: a second round after the first is relayed too.
    let s = until_status(&env, &dest, "the first round relayed", T, |s| {
        destination(s, "bus")["backlog_events"] == 0 && env_count_is(s, first.len())
    })
    .await?;
    let mut second = env.events(200);
    if let Some(last_t1) = second.iter().rposition(|e| e.tenant == t1) {
        let e = second.remove(last_t1);
        second.push(e);
    }
    env.publish(&second).await?;
    let all: Vec<Event> = first.iter().chain(&second).cloned().collect();
    let want = ids(all.iter().filter(|e| e.tenant == t1));
    let others = all.len() - want.len();
    let mut got = Vec::new();
    bus.collect_until(T, &mut got, |got| {
        got.iter().flat_map(|g| g.ids(true)).collect::<HashSet<_>>() == want
    })
    .await?;
    let s = until_status(
        &env,
        &dest,
        "every other tenant's event dead-lettered",
        T,
        |s| destination(s, "bus")["dead_letters"]["count"] == others,
    )
    .await
    .map_err(|e| e.context(format!("after {s}")))?;

    // Exactly t1's events, each once, and every message of one tenant and one routing key.
    tokio::time::sleep(Duration::from_millis(500)).await;
    got.extend(bus.drain().await?);
    let carried: Vec<Uuid> = got.iter().flat_map(|g| g.ids(true)).collect();
    assert_eq!(
        carried.len(),
        want.len(),
        "no event twice, none of another tenant"
    );
    assert_eq!(carried.iter().copied().collect::<HashSet<_>>(), want);
    let by_id: std::collections::HashMap<Uuid, &Event> = all.iter().map(|e| (e.id, e)).collect();
    for m in &got {
        for id in m.ids(true) {
            let e = by_id[&id];
            assert_eq!(m.routing_key, format!("{}.{}", e.tenant, e.action));
        }
    }
    // The others are kept, not dropped: in the destination's dead letters, counted.
    let d = destination(&s, "bus");
    assert!(
        d["dead_letters"]["latest_reason"]
            .as_str()
            .unwrap_or("")
            .contains("returned"),
        "{d}"
    );
    assert_eq!(d["failing"], false, "{d}");
    let dead: Vec<Uuid> = sqlx::query_scalar(
        "SELECT event_id FROM destination_dead_letters WHERE destination = 'bus'",
    )
    .fetch_all(&env.pool)
    .await?;
    let dead: HashSet<Uuid> = dead.into_iter().collect();
    let want_dead = ids(all.iter().filter(|e| e.tenant != t1));
    assert!(
        dead == want_dead,
        "{} dead-lettered that should not be, {} missing of {}",
        dead.difference(&want_dead).count(),
        want_dead.difference(&dead).count(),
        want_dead.len()
    );
    assert_eq!(
        worker
            .metric("auditbridge_destination_dead_lettered_total{destination=\"bus\",reason=\"returned\"}")
            .await?,
        others as f64
    );
    Ok(())
}

fn env_count_is(s: &serde_json::Value, n: usize) -> bool {
    s["database"]["events"] == n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_a_destination_cannot_take_is_dead_lettered_there_or_blocks_it()
-> anyhow::Result<()> {
    let mut env = TestEnv::new().await?;
    env.ensure_stream().await?;
    let rx = Receiver::start().await?;
    let bus = TestBroker::new(&format!("{}d", env.tag)).await?;
    let bus_block = TestBroker::new(&format!("{}k", env.tag)).await?;
    let mut events = env.events(400);
    // One event the receiver refuses (400 for any request holding it), one whose routing key
    // is too long for AMQP.
    let refused = events[150].id;
    events[250] = with_long_action(events[250].clone());
    let long_key = events[250].id;
    rx.refuse_ids([refused]);
    let http = |path: &str, extra: serde_json::Value| {
        merged(
            json!({"url": rx.url(path), "start": "earliest",
                "max_batch_events": 100, "retry_min": "50ms", "retry_max": "1s"}),
            extra,
        )
    };
    let dest = (json!([
        {"name": "siem", "type": "http", "params": http("/siem", json!({}))},
        {"name": "siem-block", "type": "http", "params": http("/block", json!({"on_undeliverable": "block"}))},
        bus.destination("bus", json!({"retry_min": "50ms", "retry_max": "1s", "routing_key": LONG_KEY_TEMPLATE})),
        bus_block.destination("bus-block", json!({"on_undeliverable": "block", "retry_min": "50ms", "retry_max": "1s", "routing_key": LONG_KEY_TEMPLATE})),
    ]))
    .to_string();
    let worker = env
        .spawn_worker("w", &[("AUDITBRIDGE_DESTINATIONS", &dest)])
        .await?;
    worker.wait_ready(T).await?;
    env.publish(&events).await?;

    // `dead_letter`: every other event delivered, the one kept with the reason.
    let all = ids(&events);
    let mut want = all.clone();
    want.remove(&refused);
    until("every other event on /siem", T, || {
        rx.delivered_on("/siem") == want
    })
    .await?;
    let mut on_bus = Vec::new();
    let mut want_bus = all.clone();
    want_bus.remove(&long_key);
    bus.collect_until(T, &mut on_bus, |got| {
        got.iter()
            .flat_map(|g| g.ids(false))
            .collect::<HashSet<_>>()
            == want_bus
    })
    .await?;
    let s = until_status(&env, &dest, "both dead letters", T, |s| {
        destination(s, "siem")["dead_letters"]["count"] == 1
            && destination(s, "bus")["dead_letters"]["count"] == 1
            && destination(s, "siem")["backlog_events"] == 0
            && destination(s, "bus")["backlog_events"] == 0
    })
    .await?;
    let siem = destination(&s, "siem");
    assert_eq!(
        siem["dead_letters"]["latest_event"],
        refused.to_string(),
        "{siem}"
    );
    let reason = siem["dead_letters"]["latest_reason"].as_str().unwrap_or("");
    assert!(
        reason.contains("400") && reason.contains("field x is not allowed"),
        "{siem}"
    );
    let b = destination(&s, "bus");
    assert_eq!(
        b["dead_letters"]["latest_event"],
        long_key.to_string(),
        "{b}"
    );
    assert!(
        b["dead_letters"]["latest_reason"]
            .as_str()
            .unwrap_or("")
            .starts_with("routing_key:"),
        "{b}"
    );
    let rows: Vec<(String, Uuid, String)> = sqlx::query_as(
        "SELECT destination, event_id, kind FROM destination_dead_letters ORDER BY destination",
    )
    .fetch_all(&env.pool)
    .await?;
    assert_eq!(
        rows,
        [
            ("bus".to_owned(), long_key, "routing_key".to_owned()),
            ("siem".to_owned(), refused, "status_4xx".to_owned()),
        ]
    );
    // The position recorded is the event's own.
    let at_event: bool = sqlx::query_scalar(
        "SELECT d.tx_id = e.tx_id AND d.seq = e.seq FROM destination_dead_letters d \
         JOIN audit_events e ON e.id = d.event_id WHERE d.destination = 'siem'",
    )
    .fetch_one(&env.pool)
    .await?;
    assert!(at_event);
    assert_eq!(
        worker
            .metric("auditbridge_destination_dead_lettered_total{destination=\"siem\",reason=\"status_4xx\"}")
            .await?,
        1.0
    );
    assert_eq!(
        worker
            .metric("auditbridge_destination_dead_lettered_total{destination=\"bus\",reason=\"routing_key\"}")
            .await?,
        1.0
    );
    let text = env
        .command(&["status"], &[("AUDITBRIDGE_DESTINATIONS", &dest)])
        .output()
        .await?;
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("1 events it cannot take") && text.contains(&refused.to_string()),
        "{text}"
    );

    // `block`: the destinations stay failing, their cursors wait, nothing is dead-lettered.
    let s = until_status(&env, &dest, "both block destinations failing", T, |s| {
        destination(s, "siem-block")["failing"] == true
            && destination(s, "bus-block")["failing"] == true
    })
    .await?;
    let cursor_of =
        |s: &serde_json::Value, name: &str| destination(s, name)["backlog_events"].clone();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let later = status_json(&env, &dest).await?;
    for name in ["siem-block", "bus-block"] {
        let d = destination(&later, name);
        assert_eq!(d["dead_letters"]["count"], 0, "{d}");
        assert_eq!(d["failing"], true, "{d}");
        assert!(d["backlog_events"].as_i64().unwrap_or(0) > 0, "{d}");
        assert_eq!(
            cursor_of(&s, name),
            cursor_of(&later, name),
            "the cursor waits: {d}"
        );
    }
    assert!(!rx.delivered_on("/block").contains(&refused));
    assert!(rx.delivered_on("/block").len() < all.len() - 1);
    let mut on_block = Vec::new();
    on_block.extend(bus_block.drain().await?);
    let blocked: HashSet<Uuid> = on_block.iter().flat_map(|g| g.ids(false)).collect();
    assert!(!blocked.contains(&long_key));
    assert!(
        blocked.len() < all.len() - 1,
        "the cursor stopped at the event"
    );
    Ok(())
}

/// Three ways one tenant's events once held a destination for good: a run of more events
/// refused one by one than the relay probes before backing off; one refused event followed by
/// more than a read window of events the destination's filter drops; and, the other way
/// round, a receiver that refuses everything for a while must not get innocent events
/// dead-lettered, and receives them in order once it recovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_of_refused_events_and_filtered_windows_do_not_hold_a_destination()
-> anyhow::Result<()> {
    let mut env = TestEnv::new().await?;
    env.ensure_stream().await?;
    let run_rx = Receiver::start().await?;
    let lone_rx = Receiver::start().await?;
    let down_rx = Receiver::start().await?;
    let mut events = env.events(300);
    // 12 consecutive events refused (more than twice the first round's allowance of 5).
    let run: HashSet<Uuid> = ids(&events[100..112]);
    run_rx.refuse_ids(run.iter().copied());
    // Tenant `lone`: one refused event, 150 other-tenant events (more than the destination's
    // read window of 50), then one it takes.
    let lone = |mut e: Event| {
        e.tenant = "lone".into();
        e
    };
    events[20] = lone(events[20].clone());
    events[171] = lone(events[171].clone());
    let (lone_refused, lone_taken) = (events[20].id, events[171].id);
    for e in &mut events[21..171] {
        if e.tenant == "lone" {
            e.tenant = "other".into();
        }
    }
    lone_rx.refuse_ids([lone_refused]);
    // A receiver refusing every request until the test says otherwise.
    down_rx.answer(Answer::Status(400));
    let params = |rx: &Receiver, extra: serde_json::Value| {
        merged(
            json!({"url": rx.url("/in"), "start": "earliest", "max_batch_events": 50,
                "retry_min": "50ms", "retry_max": "300ms"}),
            extra,
        )
    };
    let dest = json!([
        {"name": "run", "type": "http", "params": params(&run_rx, json!({}))},
        {"name": "lone", "type": "http", "params": params(&lone_rx, json!({"batch_size": 50, "filter": {"tenants": ["lone"]}}))},
        {"name": "down", "type": "http", "params": params(&down_rx, json!({}))},
    ])
    .to_string();
    let worker = env
        .spawn_worker("w", &[("AUDITBRIDGE_DESTINATIONS", &dest)])
        .await?;
    worker.wait_ready(T).await?;
    env.publish(&events).await?;

    let all = ids(&events);
    let want_run: HashSet<Uuid> = all.difference(&run).copied().collect();
    until("every event but the refused run", T, || {
        run_rx.delivered() == want_run
    })
    .await?;
    until("the lone tenant's second event", T, || {
        lone_rx.delivered() == HashSet::from([lone_taken])
    })
    .await?;
    // The down receiver has been probed past the first events (one by one), and refused all.
    until("probes of the refusing receiver", T, || {
        down_rx.requests().len() >= 20
    })
    .await?;
    let s = status_json(&env, &dest).await?;
    assert_eq!(destination(&s, "down")["dead_letters"]["count"], 0, "{s}");
    assert_eq!(destination(&s, "down")["failing"], true, "{s}");
    down_rx.answer(Answer::Ok);

    let s = until_status(&env, &dest, "every destination caught up", T, |s| {
        ["run", "lone", "down"]
            .iter()
            .all(|n| destination(s, n)["backlog_events"] == 0)
    })
    .await?;
    assert_eq!(destination(&s, "run")["dead_letters"]["count"], 12, "{s}");
    assert_eq!(destination(&s, "lone")["dead_letters"]["count"], 1, "{s}");
    assert_eq!(destination(&s, "down")["dead_letters"]["count"], 0, "{s}");
    let dead: HashSet<Uuid> = sqlx::query_scalar(
        "SELECT event_id FROM destination_dead_letters WHERE destination = 'run'",
    )
    .fetch_all(&env.pool)
    .await?
    .into_iter()
    .collect();
    assert_eq!(dead, run);
    let lone_dead: Vec<Uuid> = sqlx::query_scalar(
        "SELECT event_id FROM destination_dead_letters WHERE destination = 'lone'",
    )
    .fetch_all(&env.pool)
    .await?;
    assert_eq!(lone_dead, [lone_refused]);
    // The recovered receiver got everything, the held events oldest first: the first event
    // stored opens its first accepted request, or its second when a probe of a later event
    // happened to be the first request after the recovery.
    until("everything on the recovered receiver", T, || {
        down_rx.delivered() == all
    })
    .await?;
    let first_stored: Uuid =
        sqlx::query_scalar("SELECT id FROM audit_events ORDER BY tx_id, seq LIMIT 1")
            .fetch_one(&env.pool)
            .await?;
    let firsts: Vec<Option<Uuid>> = down_rx
        .requests()
        .into_iter()
        .filter(|r| r.answered == 200)
        .take(2)
        .map(|r| r.ids().first().copied())
        .collect();
    assert!(firsts.contains(&Some(first_stored)), "{firsts:?}");
    Ok(())
}

/// libfaketime (Debian package `faketime`), to run a worker whose clock is wrong.
const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_backlog_age_is_measured_on_the_database_clock_not_the_workers() -> anyhow::Result<()> {
    if !std::path::Path::new(LIBFAKETIME).exists() {
        eprintln!("SKIPPED: {LIBFAKETIME} is missing (apt-get install faketime)");
        return Ok(());
    }
    let mut env = TestEnv::new().await?;
    env.ensure_stream().await?;
    let rx = Receiver::start().await?;
    let dest = (json!([{"name": "recent", "type": "http", "params": {
        "url": rx.url("/recent"), "start": "earliest", "max_backlog_age": "1h"}}]))
    .to_string();
    // The worker's wall clock runs two hours ahead of the database's.
    let worker = env
        .spawn_worker(
            "ahead",
            &[
                ("AUDITBRIDGE_DESTINATIONS", &dest),
                ("LD_PRELOAD", LIBFAKETIME),
                ("FAKETIME", "+2h"),
                ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
            ],
        )
        .await?;
    worker.wait_ready(T).await?;
    let events = env.events(50);
    env.publish(&events).await?;
    // Fresh events are not "older than 1h", whatever the worker's clock says.
    until("every event delivered", T, || {
        rx.delivered_on("/recent") == ids(&events)
    })
    .await?;
    let s = status_json(&env, &dest).await?;
    assert_eq!(destination(&s, "recent")["skipped_total"], 0, "{s}");
    assert!(
        !worker
            .log_text()
            .contains("Skipping backlog older than max_backlog_age"),
        "{}",
        worker.log_text()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_setting_its_sink_cannot_use_stops_the_worker_at_start_naming_it()
-> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    // Each passed the old checks and failed only when the sink was built, after the lease was
    // taken: again and again, at once.
    let cases = [
        (
            json!({"name": "siem", "type": "http", "params": {"url": "http://127.0.0.1:9/in",
                "headers": {"X-Key": "ab\u{1}c"}}}),
            "destination siem: params.headers.X-Key",
        ),
        (
            json!({"name": "siem", "type": "http", "params": {"url": "http://exa mple/in"}}),
            "destination siem: params.url",
        ),
        (
            json!({"name": "bus", "type": "rabbitmq", "params": {"url": "amqp://h:port/%2f", "exchange": "e"}}),
            "destination bus: params.url",
        ),
    ];
    for (definition, want) in cases {
        let dest = json!([definition]).to_string();
        let out = tokio::time::timeout(
            T,
            env.command(&["worker"], &[("AUDITBRIDGE_DESTINATIONS", &dest)])
                .output(),
        )
        .await??;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{dest}: {stderr}");
        assert!(stderr.contains(want), "{dest}: {stderr}");
    }
    Ok(())
}

/// `auditbridge destinations …` with the destinations configured, and its exit code and output.
async fn destinations_cli(
    env: &TestEnv,
    dest: &str,
    args: &[&str],
) -> anyhow::Result<(Option<i32>, String)> {
    let mut all = vec!["destinations"];
    all.extend_from_slice(args);
    env.run(&all, &[("AUDITBRIDGE_DESTINATIONS", dest)]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destinations_dead_letters_are_listed_and_redelivered_once_it_takes_them()
-> anyhow::Result<()> {
    let mut env = TestEnv::new().await?;
    env.ensure_stream().await?;
    let rx = Receiver::start().await?;
    let events = env.events(20);
    let (first, second) = (events[3].id, events[7].id);
    rx.refuse_ids([first, second]);
    let dest = json!([{"name": "siem", "type": "http", "params": {
        "url": rx.url("/in"), "start": "earliest", "retry_min": "50ms", "retry_max": "300ms"}}])
    .to_string();
    let _worker = env
        .spawn_worker("w", &[("AUDITBRIDGE_DESTINATIONS", &dest)])
        .await?;
    env.publish(&events).await?;
    let all = ids(&events);
    let taken: HashSet<Uuid> = all
        .iter()
        .copied()
        .filter(|id| *id != first && *id != second)
        .collect();
    until("every event but the two refused", T, || {
        rx.delivered() == taken
    })
    .await?;
    until_status(&env, &dest, "two dead letters", T, |s| {
        destination(s, "siem")["dead_letters"]["count"] == 2
    })
    .await?;

    let (code, out) = destinations_cli(&env, &dest, &["dead-letters", "siem", "--json"]).await?;
    assert_eq!(code, Some(0), "{out}");
    let list: serde_json::Value = serde_json::from_str(&out)?;
    let listed: HashSet<Uuid> = list
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|d| d["event_id"].as_str()?.parse().ok())
        .collect();
    assert_eq!(listed, HashSet::from([first, second]), "{out}");
    assert_eq!(list[0]["kind"], "status_4xx", "{out}");

    // Still refused: each is offered again, refused again, and kept with the new answer.
    let (code, out) =
        destinations_cli(&env, &dest, &["redeliver", "siem", "--wait", "20s"]).await?;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("0 delivered, 2 refused again"), "{out}");
    let (_, out) = destinations_cli(&env, &dest, &["dead-letters", "siem", "--json"]).await?;
    let list: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(list.as_array().map(Vec::len), Some(2), "{out}");
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .all(|d| d["attempts"] == 1 && d["last_reason"].as_str().is_some()),
        "{out}"
    );
    // An event that is not one of its dead letters.
    let stranger = events[0].id.to_string();
    let (code, out) = destinations_cli(&env, &dest, &["redeliver", "siem", &stranger]).await?;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("not among siem's dead letters"), "{out}");

    // The receiver is fixed: one by id, then the rest.
    rx.refuse_ids([]);
    let (code, out) =
        destinations_cli(&env, &dest, &["redeliver", "siem", &first.to_string()]).await?;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains(&format!("{first}: delivered")), "{out}");
    assert!(rx.delivered().contains(&first));
    assert!(!rx.delivered().contains(&second));
    let (code, out) = destinations_cli(&env, &dest, &["redeliver", "siem"]).await?;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("1 delivered, 0 refused again"), "{out}");
    assert_eq!(rx.delivered(), all);
    // Nothing left; the record stays.
    let (code, out) = destinations_cli(&env, &dest, &["redeliver", "siem"]).await?;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("nothing to redeliver"), "{out}");
    let (_, out) = destinations_cli(&env, &dest, &["dead-letters", "siem"]).await?;
    assert!(out.contains("no dead letters"), "{out}");
    let (_, out) = destinations_cli(&env, &dest, &["dead-letters", "siem", "--all"]).await?;
    assert_eq!(out.matches("redelivered 20").count(), 2, "{out}");
    let s = status_json(&env, &dest).await?;
    assert_eq!(destination(&s, "siem")["dead_letters"]["count"], 0, "{s}");
    // Names that are not destinations.
    let (code, out) = destinations_cli(&env, &dest, &["dead-letters", "nope"]).await?;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("no destination named \"nope\""), "{out}");
    let (code, out) = destinations_cli(&env, &dest, &["redeliver", "_log"]).await?;
    assert_eq!(code, Some(2), "{out}");
    Ok(())
}
