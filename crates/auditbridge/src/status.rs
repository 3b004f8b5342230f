//! `auditbridge status`: what JetStream still holds for the workers, what PostgreSQL has
//! stored, and what was refused.

use std::process::ExitCode;
use std::time::Duration;

use async_nats::jetstream;
use auditbridge_config::Config;
use auditbridge_store::Store;
use auditbridge_store::log::{LOG_CURSOR, checkpoints_cursor};
use serde_json::json;
use time::format_description::well_known::Rfc3339;

#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Print one JSON document instead of text.
    #[arg(long)]
    json: bool,
}

pub(crate) async fn run(args: Args, config: &Config) -> anyhow::Result<ExitCode> {
    let mut ok = true;
    let mut doc = json!({});

    // JetStream: the stream and the shared consumer.
    let nats = tokio::time::timeout(
        Duration::from_secs(5),
        auditbridge_runtime::nats::options(config.nats_url.expose())?
            .name("auditbridge-status")
            .connection_timeout(Duration::from_secs(3))
            .connect(auditbridge_runtime::nats::servers(
                config.nats_url.expose(),
            )?),
    )
    .await;
    match nats {
        Ok(Ok(client)) => {
            let js = jetstream::new(client);
            match js.get_stream(&config.stream).await {
                Ok(mut stream) => {
                    match stream.info().await {
                        Ok(info) => {
                            doc["stream"] = json!({
                                "name": config.stream,
                                "messages": info.state.messages,
                                "bytes": info.state.bytes,
                                "first_seq": info.state.first_sequence,
                                "last_seq": info.state.last_sequence,
                            });
                        }
                        Err(e) => {
                            ok = false;
                            doc["stream"] = json!({"name": config.stream, "error": e.to_string()});
                        }
                    }
                    match stream.consumer_info(&config.consumer).await {
                        Ok(info) => {
                            doc["consumer"] = json!({
                                "name": config.consumer,
                                "pending": info.num_pending,
                                "ack_pending": info.num_ack_pending,
                                "redelivered": info.num_redelivered,
                                "waiting_pulls": info.num_waiting,
                                "acked_through_stream_seq": info.ack_floor.stream_sequence,
                            });
                        }
                        Err(e) => {
                            ok = false;
                            doc["consumer"] =
                                json!({"name": config.consumer, "error": e.to_string()});
                        }
                    }
                }
                Err(e) => {
                    ok = false;
                    doc["stream"] = json!({"name": config.stream, "error": e.to_string()});
                }
            }
        }
        Ok(Err(e)) => {
            ok = false;
            doc["nats"] = json!({"url": config.nats_url.redacted(), "error": e.to_string()});
        }
        Err(_) => {
            ok = false;
            doc["nats"] =
                json!({"url": config.nats_url.redacted(), "error": "timed out connecting"});
        }
    }

    // PostgreSQL: stored events and dead letters.
    let store = Store::connect_lazy(config.database_url.expose(), 2)?;
    match tokio::time::timeout(Duration::from_secs(30), store.status()).await {
        Ok(Ok(s)) => {
            doc["database"] = json!({
                "name": config.database_name(),
                "events": s.events,
                "newest_received_at": s.newest_received_at.and_then(|t| t.format(&Rfc3339).ok()),
            });
            doc["dead_letters"] = s
                .dead_letters
                .iter()
                .map(|d| {
                    json!({
                        "kind": d.kind,
                        "count": d.count,
                        "replayed": d.replayed,
                        "failed_again": d.failed_again,
                        "newest": d.newest.and_then(|t| t.format(&Rfc3339).ok()),
                        "latest_reason": d.latest_reason,
                    })
                })
                .collect();
        }
        Ok(Err(e)) => {
            ok = false;
            doc["database"] = json!({"name": config.database_name(), "error": e.to_string()});
        }
        Err(_) => {
            ok = false;
            doc["database"] = json!({"name": config.database_name(), "error": "timed out"});
        }
    }
    if doc["database"]["error"].is_null() {
        match store.outbox_health().await {
            Ok(h) => {
                doc["outbox"] = json!({
                    "generation": h.generation,
                    "needs_rebase": h.needs_rebase(),
                    "advice": h.needs_rebase().then(|| h.advice()),
                });
                if h.needs_rebase() {
                    ok = false;
                }
            }
            Err(e) => doc["outbox"] = json!({"error": e.to_string()}),
        }
        match destinations(&store, config).await {
            Ok(list) => doc["destinations"] = list,
            Err(e) => {
                ok = false;
                doc["destinations"] = json!({"error": format!("{e:#}")});
            }
        }
        match log(&store, config).await {
            Ok(l) => doc["log"] = l,
            Err(e) => {
                ok = false;
                doc["log"] = json!({"error": format!("{e:#}")});
            }
        }
        match retention(&store).await {
            Ok(r) => doc["retention"] = r,
            Err(e) => {
                ok = false;
                doc["retention"] = json!({"error": format!("{e:#}")});
            }
        }
        match api_sources(&store, config).await {
            Ok(a) => doc["api_sources"] = a,
            Err(e) => {
                ok = false;
                doc["api_sources"] = json!({"error": format!("{e:#}")});
            }
        }
    }
    store.close().await;

    if args.json {
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        print_text(&doc);
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Each destination's progress: cursor lag, last error, lease holder, dead letters.
async fn destinations(store: &Store, config: &Config) -> anyhow::Result<serde_json::Value> {
    let configured: Vec<&str> = config
        .destinations
        .iter()
        .map(|d| d.name.as_str())
        .collect();
    // The database's clock: lease expiries and `received_at` were taken on it.
    let now = store.now().await?;
    let dead = store.destination_dead_letter_counts().await?;
    let mut list = Vec::new();
    // The sequencer's row is the log's, not a destination (see `log`); a checkpoint
    // cursor's row is shown with its destination.
    let rows = store.destinations().await?;
    for d in rows.iter().filter(|d| !d.name.starts_with('_')).cloned() {
        let checkpoints = match rows.iter().find(|c| c.name == checkpoints_cursor(&d.name)) {
            Some(c) => json!({
                "behind": store.checkpoints_behind(c.cursor.seq).await?,
                "delivered_total": c.delivered_total,
                "skipped_total": c.skipped_total,
                "last_delivered_at": c.last_delivered_at.and_then(|t| t.format(&Rfc3339).ok()),
                "failing": c.failing,
                "last_error": c.last_error,
            }),
            None => serde_json::Value::Null,
        };
        let backlog = store.backlog(&d.cursor).await?;
        let lease_live = d.lease_expires_at.is_some_and(|t| t > now);
        let dead_letters =
            dead.iter()
                .find(|c| c.destination == d.name)
                .map_or(json!({"count": 0}), |c| {
                    json!({
                        "count": c.count,
                        "newest": c.newest.format(&Rfc3339).ok(),
                        "latest_event": c.latest_event,
                        "latest_reason": c.latest_reason,
                    })
                });
        list.push(json!({
            "name": d.name,
            "type": d.kind,
            "configured": configured.contains(&d.name.as_str()),
            "backlog_events": backlog.events,
            "backlog_exact": backlog.exact,
            "lag_seconds": backlog.oldest.map(|t| (now - t).as_seconds_f64().max(0.0)),
            "delivered_total": d.delivered_total,
            "skipped_total": d.skipped_total,
            "last_delivered_at": d.last_delivered_at.and_then(|t| t.format(&Rfc3339).ok()),
            "failing": d.failing,
            "last_error": d.last_error,
            "last_error_at": d.last_error_at.and_then(|t| t.format(&Rfc3339).ok()),
            "lease_holder": if lease_live { d.lease_holder } else { None },
            "dead_letters": dead_letters,
            "checkpoints": checkpoints,
        }));
    }
    Ok(serde_json::Value::Array(list))
}

/// The verifiable logs: the sequencer's progress, and each tenant's size and newest
/// checkpoint.
async fn log(store: &Store, config: &Config) -> anyhow::Result<serde_json::Value> {
    let now = store.now().await?;
    let state = store
        .destinations()
        .await?
        .into_iter()
        .find(|d| d.name == LOG_CURSOR);
    let backlog = match &state {
        Some(s) => Some(store.backlog(&s.cursor).await?),
        None => None,
    };
    let tenants: Vec<serde_json::Value> = store
        .newest_checkpoints()
        .await?
        .into_iter()
        .map(|c| {
            json!({
                "tenant": c.tenant,
                "tree_size": c.tree_size,
                "checkpoint_signed": c.signed,
                "checkpoint_at": c.signed_at.format(&Rfc3339).ok(),
                "checkpoint_age_seconds": (now - c.signed_at).as_seconds_f64().max(0.0),
            })
        })
        .collect();
    Ok(json!({
        "signing": match &config.log_key_file {
            Some(path) => json!({"key_file": path.display().to_string()}),
            None => json!({"key_file": null, "warning": "AUDITBRIDGE_LOG_KEY_FILE is not set: checkpoints are not signed"}),
        },
        "sequencer": state.map(|s| json!({
            "lease_holder": s.lease_expires_at.is_some_and(|t| t > now).then_some(s.lease_holder).flatten(),
            "sequenced_total": s.delivered_total,
            "unsequenced_events": backlog.map(|b| b.events),
            "lag_seconds": backlog.and_then(|b| b.oldest).map(|t| (now - t).as_seconds_f64().max(0.0)),
        })),
        "tenants": tenants,
    }))
}

fn print_text(doc: &serde_json::Value) {
    if let Some(e) = doc["nats"]["error"].as_str() {
        println!(
            "NATS        {}: UNREACHABLE: {e}",
            doc["nats"]["url"].as_str().unwrap_or("")
        );
    }
    let s = &doc["stream"];
    match s["error"].as_str() {
        Some(e) => println!(
            "stream      {}: ERROR: {e}",
            s["name"].as_str().unwrap_or("")
        ),
        None if !s.is_null() => println!(
            "stream      {}: {} messages, {} bytes, seq {}..{}",
            s["name"].as_str().unwrap_or(""),
            s["messages"],
            s["bytes"],
            s["first_seq"],
            s["last_seq"]
        ),
        None => {}
    }
    let c = &doc["consumer"];
    match c["error"].as_str() {
        Some(e) => println!(
            "consumer    {}: ERROR: {e}",
            c["name"].as_str().unwrap_or("")
        ),
        None if !c.is_null() => println!(
            "consumer    {}: {} pending, {} ack-pending, {} redelivered, {} waiting pulls",
            c["name"].as_str().unwrap_or(""),
            c["pending"],
            c["ack_pending"],
            c["redelivered"],
            c["waiting_pulls"]
        ),
        None => {}
    }
    let d = &doc["database"];
    match d["error"].as_str() {
        Some(e) => println!(
            "database    {}: ERROR: {e}",
            d["name"].as_str().unwrap_or("")
        ),
        None => println!(
            "database    {}: {} events stored, newest received {}",
            d["name"].as_str().unwrap_or(""),
            d["events"],
            d["newest_received_at"].as_str().unwrap_or("-")
        ),
    }
    if let Some(advice) = doc["outbox"]["advice"].as_str() {
        println!("outbox      NEEDS REBASE: {advice}");
    }
    match doc["dead_letters"].as_array() {
        Some(list) if !list.is_empty() => {
            println!("dead letters by kind (open: still to replay):");
            for l in list {
                let example = match l["latest_reason"].as_str() {
                    Some(reason) => format!(
                        "  newest {}  e.g. {}",
                        l["newest"].as_str().unwrap_or("-"),
                        crate::dead_letters::safe(reason)
                            .chars()
                            .take(160)
                            .collect::<String>()
                    ),
                    None => String::new(),
                };
                println!(
                    "  {:<18} {:>8} open {:>8} replayed {:>6} failed again{example}",
                    crate::dead_letters::safe(l["kind"].as_str().unwrap_or("")),
                    l["count"],
                    l["replayed"],
                    l["failed_again"],
                );
            }
        }
        Some(_) => println!("dead letters: none"),
        None => {}
    }
    print_log(&doc["log"]);
    print_retention(&doc["retention"]);
    print_api_sources(&doc["api_sources"]);
    match &doc["destinations"] {
        serde_json::Value::Array(list) if !list.is_empty() => {
            println!("destinations:");
            for d in list {
                let lag = d["lag_seconds"]
                    .as_f64()
                    .map_or("-".to_owned(), |s| format!("{s:.1}s"));
                println!(
                    "  {:<16} {:<8} backlog {}{:>8} events, lag {:>8}, delivered {}, {}{}{}",
                    d["name"].as_str().unwrap_or(""),
                    d["type"].as_str().unwrap_or(""),
                    if d["backlog_exact"] == false { "~" } else { "" },
                    d["backlog_events"],
                    lag,
                    d["delivered_total"],
                    match d["lease_holder"].as_str() {
                        Some(h) => format!("relayed by {h}"),
                        None => "no relay holds it".to_owned(),
                    },
                    if d["failing"].as_bool() == Some(true) {
                        ", FAILING"
                    } else {
                        ""
                    },
                    if d["configured"].as_bool() == Some(false) {
                        ", not in the configuration"
                    } else {
                        ""
                    },
                );
                if let Some(e) = d["last_error"].as_str() {
                    println!(
                        "  {:<16} last error at {}: {e}",
                        "",
                        d["last_error_at"].as_str().unwrap_or("-")
                    );
                }
                let dead = &d["dead_letters"];
                if dead["count"].as_i64().is_some_and(|n| n > 0) {
                    println!(
                        "  {:<16} {} events it cannot take kept in its dead letters, newest {} (event {}): {}",
                        "",
                        dead["count"],
                        dead["newest"].as_str().unwrap_or("-"),
                        dead["latest_event"].as_str().unwrap_or("-"),
                        dead["latest_reason"].as_str().unwrap_or("")
                    );
                }
            }
        }
        serde_json::Value::Object(o) => {
            println!(
                "destinations: ERROR: {}",
                o.get("error").and_then(|e| e.as_str()).unwrap_or("")
            );
        }
        _ => {}
    }
}

/// Each `api` source: who polls it, how far its cursor and its events are behind, what it
/// counted, its errors by kind, and the items it kept as rejects.
async fn api_sources(store: &Store, config: &Config) -> anyhow::Result<serde_json::Value> {
    let now = store.now().await?;
    let time = |t: Option<time::OffsetDateTime>| t.and_then(|t| t.format(&Rfc3339).ok());
    let age = |t: Option<time::OffsetDateTime>| t.map(|t| (now - t).as_seconds_f64().max(0.0));
    let list = store
        .api_sources()
        .await?
        .into_iter()
        .map(|s| {
            json!({
                "name": s.name,
                "cursor": s.cursor_style,
                "configured": config.sources.iter().any(|c| c.name == s.name),
                "lease_holder": s.lease_holder,
                "cursor_moved_at": time(s.cursor_moved_at),
                "cursor_age_seconds": age(s.cursor_moved_at),
                "newest_event_at": time(s.newest_event_at),
                "lag_seconds": age(s.newest_event_at),
                "last_poll_at": time(s.last_poll_at),
                "polls_total": s.polls_total,
                "pages_total": s.pages_total,
                "events_total": s.events_total,
                "rejected_total": s.rejected_total,
                "open_rejects": s.open_rejects,
                "errors": s.errors,
                "failing": s.failing,
                "last_error": s.last_error,
                "last_error_kind": s.last_error_kind,
                "last_error_at": time(s.last_error_at),
            })
        })
        .collect();
    Ok(serde_json::Value::Array(list))
}

fn print_api_sources(list: &serde_json::Value) {
    match list {
        serde_json::Value::Array(list) if !list.is_empty() => {
            println!("api sources:");
            for s in list {
                let secs = |v: &serde_json::Value| {
                    v.as_f64().map_or("-".to_owned(), |s| format!("{s:.1}s"))
                };
                println!(
                    "  {:<16} {:<6} cursor moved {} ago, lag {}, {} polls, {} pages, {} events, {} open reject(s), {}{}",
                    crate::dead_letters::safe(s["name"].as_str().unwrap_or("")),
                    s["cursor"].as_str().unwrap_or(""),
                    secs(&s["cursor_age_seconds"]),
                    secs(&s["lag_seconds"]),
                    s["polls_total"],
                    s["pages_total"],
                    s["events_total"],
                    s["open_rejects"],
                    match s["lease_holder"].as_str() {
                        Some(h) => format!("polled by {h}"),
                        None => "no poller holds it".to_owned(),
                    },
                    if s["failing"].as_bool() == Some(true) {
                        ", FAILING"
                    } else {
                        ""
                    },
                );
                if let Some(e) = s["last_error"].as_str() {
                    println!(
                        "  {:<16} last error ({}) at {}: {}; errors by kind {}",
                        "",
                        s["last_error_kind"].as_str().unwrap_or("-"),
                        s["last_error_at"].as_str().unwrap_or("-"),
                        crate::dead_letters::safe(e),
                        s["errors"]
                    );
                }
            }
        }
        serde_json::Value::Object(o) => {
            println!(
                "api sources: ERROR: {}",
                o.get("error").and_then(|e| e.as_str()).unwrap_or("")
            );
        }
        _ => {}
    }
}

/// Retention: the stored policy, each partition (size, tenants, when it becomes droppable),
/// holds in force, receipts, and where each tenant's oldest partition begins.
async fn retention(store: &Store) -> anyhow::Result<serde_json::Value> {
    let r = store.retention_status().await?;
    let time = |t: Option<time::OffsetDateTime>| t.and_then(|t| t.format(&Rfc3339).ok());
    let keep = |d: Option<Duration>| d.map(|d| d.as_secs());
    Ok(json!({
        "partition_interval_seconds": r.policy.partition_interval.as_secs(),
        "default_keep_seconds": keep(r.policy.default_keep),
        "tenant_policies": r.policy.tenants.iter()
            .map(|(t, k)| json!({"tenant": t, "keep_seconds": keep(*k)}))
            .collect::<Vec<_>>(),
        "dead_letter_keep_seconds": keep(r.policy.dead_letter_keep),
        "partitions": r.partitions.iter().map(|p| json!({
            "name": p.partition.name,
            "class": p.partition.class,
            "from": time(p.partition.lower_at),
            "to": time(Some(p.partition.upper_at)),
            "bytes": p.bytes,
            "tenants": p.tenants,
            "due_at": time(p.due_at),
        })).collect::<Vec<_>>(),
        "bytes": r.partitions.iter().map(|p| p.bytes).sum::<i64>(),
        "next_expiry": time(r.next_expiry()),
        "holds_in_force": r.holds_in_force,
        "receipts": r.receipts,
        "oldest": r.oldest.iter()
            .map(|(t, from)| json!({"tenant": t, "oldest_partition_from": time(*from)}))
            .collect::<Vec<_>>(),
    }))
}

fn print_retention(r: &serde_json::Value) {
    if r.is_null() {
        return;
    }
    if let Some(e) = r["error"].as_str() {
        println!("retention   ERROR: {e}");
        return;
    }
    let keep = |v: &serde_json::Value| v.as_u64().map_or("forever".to_owned(), |s| format!("{s}s"));
    let partitions = r["partitions"].as_array().map_or(0, Vec::len);
    println!(
        "retention   default {}, {} tenant polic(ies), partitions of {}s: {partitions} ({} MiB), next expiry {}, {} hold(s) in force, {} receipt(s)",
        keep(&r["default_keep_seconds"]),
        r["tenant_policies"].as_array().map_or(0, Vec::len),
        r["partition_interval_seconds"],
        r["bytes"].as_i64().unwrap_or(0) / (1 << 20),
        r["next_expiry"].as_str().unwrap_or("none due"),
        r["holds_in_force"],
        r["receipts"],
    );
    for t in r["oldest"].as_array().into_iter().flatten() {
        println!(
            "  {:<16} oldest partition from {}",
            t["tenant"].as_str().unwrap_or(""),
            t["oldest_partition_from"]
                .as_str()
                .unwrap_or("the beginning (legacy)")
        );
    }
}

fn print_log(log: &serde_json::Value) {
    if log.is_null() {
        return;
    }
    if let Some(e) = log["error"].as_str() {
        println!("log         ERROR: {e}");
        return;
    }
    let seq = &log["sequencer"];
    if seq.is_null() {
        println!("log         no sequencer has started yet");
    } else {
        println!(
            "log         {} events sequenced, {} waiting, lag {}, {}",
            seq["sequenced_total"],
            seq["unsequenced_events"],
            seq["lag_seconds"]
                .as_f64()
                .map_or("-".to_owned(), |s| format!("{s:.1}s")),
            match seq["lease_holder"].as_str() {
                Some(h) => format!("sequenced by {h}"),
                None => "no worker sequences it".to_owned(),
            }
        );
    }
    if let Some(w) = log["signing"]["warning"].as_str() {
        println!("            {w}");
    }
    for t in log["tenants"].as_array().into_iter().flatten() {
        println!(
            "  {:<16} {:>10} events, newest checkpoint {} ({}, {:.0}s ago)",
            t["tenant"].as_str().unwrap_or(""),
            t["tree_size"],
            t["checkpoint_at"].as_str().unwrap_or("-"),
            if t["checkpoint_signed"].as_bool() == Some(true) {
                "signed"
            } else {
                "UNSIGNED"
            },
            t["checkpoint_age_seconds"].as_f64().unwrap_or(0.0)
        );
    }
}
