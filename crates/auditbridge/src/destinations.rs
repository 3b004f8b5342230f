//! `auditbridge destinations rewind|dead-letters|redeliver`: a destination's progress, and the
//! events it could not take (`destination_dead_letters`), offered again once it can.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use auditbridge_config::Config;
use auditbridge_store::{Store, StoredDestinationDeadLetter};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::dead_letters::{safe, time};

#[derive(Debug, clap::Subcommand)]
pub(crate) enum DestinationsCommand {
    /// Replay a destination from a point in time: its cursor moves to just before the first
    /// event stored at or after --to, and the relay delivers from there again.
    Rewind {
        /// The destination's name.
        name: String,
        /// An RFC 3339 timestamp, e.g. 2026-11-22T10:00:00Z.
        #[arg(long, value_parser = crate::parse_timestamp)]
        to: OffsetDateTime,
    },
    /// The events a destination could not take (its dead letters), in outbox order: the
    /// event, its first refusal, and any re-delivery. Those redelivered only with --all.
    DeadLetters {
        /// The destination's name.
        name: String,
        #[arg(long)]
        all: bool,
        /// At most this many (1–100,000).
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(i64).range(1..=100_000))]
        limit: i64,
        #[arg(long)]
        json: bool,
    },
    /// Offer a destination's dead letters again once it can take them: every one not yet
    /// redelivered, or the events given. The relay holding the destination's lease offers
    /// each alone, beside the outbox order (its cursor does not move), and records the
    /// outcome; this waits for it. Exit status 0 when every one was delivered, 1 when one was
    /// refused again, 3 when an outcome did not come within --wait.
    Redeliver {
        /// The destination's name.
        name: String,
        /// Event ids (default: all of its dead letters not yet redelivered).
        ids: Vec<Uuid>,
        /// How long to wait for the relay's outcomes.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        wait: Duration,
        /// Do not wait (`destinations dead-letters NAME --all` shows the outcomes later).
        #[arg(long, conflicts_with = "wait")]
        no_wait: bool,
        /// Who asks, recorded with each request; default: the operating-system user.
        #[arg(long)]
        by: Option<String>,
    },
}

fn dead_json(d: &StoredDestinationDeadLetter) -> serde_json::Value {
    serde_json::json!({
        "event_id": d.event_id,
        "position": {"tx_id": d.tx_id, "seq": d.seq},
        "kind": d.kind,
        "reason": d.reason,
        "created_at": time(Some(d.created_at)),
        "redeliver_requested_at": time(d.redeliver_requested_at),
        "redeliver_requested_by": d.redeliver_requested_by,
        "redelivered_at": time(d.redelivered_at),
        "attempts": d.attempts,
        "last_attempt_at": time(d.last_attempt_at),
        "last_reason": d.last_reason,
    })
}

fn dead_line(d: &StoredDestinationDeadLetter) -> String {
    let state = match (d.redelivered_at, d.redeliver_requested_at) {
        (Some(at), _) => format!("redelivered {}", time(Some(at)).unwrap_or_default()),
        (None, Some(at)) => format!("redelivery asked {}", time(Some(at)).unwrap_or_default()),
        (None, None) if d.attempts > 0 => format!(
            "refused again ({} attempts): {}",
            d.attempts,
            safe(d.last_reason.as_deref().unwrap_or(""))
        ),
        (None, None) => "open".to_owned(),
    };
    format!(
        "{} {} at ({}, {}) {}: {} [{state}]",
        d.event_id,
        time(Some(d.created_at)).unwrap_or_default(),
        d.tx_id,
        d.seq,
        safe(&d.kind),
        safe(&d.reason).chars().take(200).collect::<String>(),
    )
}

/// Names the cursors that are not destinations (the log's sequencer, checkpoint cursors).
fn not_a_destination(name: &str) -> Option<String> {
    if name == auditbridge_store::log::LOG_CURSOR {
        return Some(format!(
            "{name:?} is the verifiable log's sequencer, not a destination: a log is appended once and never rewound"
        ));
    }
    if name.starts_with('_') {
        return Some(format!(
            "{name:?} is a checkpoint cursor, not a destination (name the destination itself)"
        ));
    }
    None
}

pub(crate) async fn run(command: DestinationsCommand, config: &Config) -> anyhow::Result<ExitCode> {
    let name = match &command {
        DestinationsCommand::Rewind { name, .. }
        | DestinationsCommand::DeadLetters { name, .. }
        | DestinationsCommand::Redeliver { name, .. } => name.clone(),
    };
    if let Some(why) = not_a_destination(&name) {
        eprintln!("error: {why}");
        return Ok(ExitCode::from(2));
    }
    let store = Store::connect_lazy(config.database_url.expose(), 2)?;
    let known = store
        .destinations()
        .await
        .context("reading destinations")?
        .iter()
        .any(|d| d.name == name);
    if !known {
        store.close().await;
        eprintln!(
            "error: no destination named {:?} (it is created when a worker first starts with it configured)",
            safe(&name)
        );
        return Ok(ExitCode::FAILURE);
    }
    let result = match command {
        DestinationsCommand::Rewind { name, to } => match store.rewind(&name, to).await? {
            Some(cursor) => {
                println!(
                    "destination {name} rewound to {to}: cursor ({}, {}, {}); its relay restarts from there within one lease renewal",
                    cursor.generation, cursor.tx_id, cursor.seq
                );
                Ok(ExitCode::SUCCESS)
            }
            None => {
                eprintln!("error: no destination named {name:?}");
                Ok(ExitCode::FAILURE)
            }
        },
        DestinationsCommand::DeadLetters {
            name,
            all,
            limit,
            json,
        } => {
            let rows = store.destination_dead_letters(&name, all, limit).await?;
            if json {
                let list: Vec<serde_json::Value> = rows.iter().map(dead_json).collect();
                println!("{}", serde_json::Value::Array(list));
            } else if rows.is_empty() {
                println!("destination {name}: no dead letters");
            } else {
                for d in &rows {
                    println!("{}", dead_line(d));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        DestinationsCommand::Redeliver {
            name,
            ids,
            wait,
            no_wait,
            by,
        } => {
            let by = match by {
                Some(by) => crate::retention::text_arg("--by", &by, 200)?,
                None => crate::retention::os_user(),
            };
            redeliver(&store, &name, &ids, (!no_wait).then_some(wait), &by).await
        }
    };
    store.close().await;
    result
}

async fn redeliver(
    store: &Store,
    name: &str,
    ids: &[Uuid],
    wait: Option<Duration>,
    by: &str,
) -> anyhow::Result<ExitCode> {
    let asked = store
        .request_redelivery(name, (!ids.is_empty()).then_some(ids), by)
        .await
        .context("asking for the re-delivery")?;
    let mut missing = 0;
    for id in ids {
        if !asked.iter().any(|(a, _)| a == id) {
            missing += 1;
            println!(
                "{id}: not among {name}'s dead letters waiting (never refused, or redelivered already)"
            );
        }
    }
    if asked.is_empty() {
        println!("destination {name}: nothing to redeliver");
        return Ok(if missing > 0 {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        });
    }
    let Some(wait) = wait else {
        println!(
            "asked {name}'s relay to redeliver {} events; `destinations dead-letters {name} --all` shows the outcomes",
            asked.len()
        );
        return Ok(ExitCode::SUCCESS);
    };
    // The outcome of a request is recorded when the relay settles it (the request is then
    // cleared); a request still set after the wait was not tried, or its delivery failed.
    let deadline = Instant::now() + wait;
    let wanted: std::collections::HashMap<Uuid, OffsetDateTime> = asked.iter().copied().collect();
    let mut settled: std::collections::HashMap<Uuid, StoredDestinationDeadLetter> =
        std::collections::HashMap::new();
    let mut reported = Instant::now();
    loop {
        for d in store.destination_dead_letters(name, true, 100_000).await? {
            if let Some(asked_at) = wanted.get(&d.event_id)
                && d.redeliver_requested_at.is_none()
                && d.last_attempt_at.is_some_and(|at| at >= *asked_at)
            {
                settled.insert(d.event_id, d);
            }
        }
        if settled.len() == wanted.len() || Instant::now() >= deadline {
            break;
        }
        if reported.elapsed() >= Duration::from_secs(5) {
            eprintln!(
                "{} of {} redelivered or refused so far",
                settled.len(),
                wanted.len()
            );
            reported = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (mut delivered, mut refused) = (0, 0);
    for (id, _) in &asked {
        match settled.get(id) {
            Some(d) if d.redelivered_at.is_some() => {
                delivered += 1;
                println!("{id}: delivered");
            }
            Some(d) => {
                refused += 1;
                println!(
                    "{id}: refused again: {}",
                    safe(d.last_reason.as_deref().unwrap_or(""))
                );
            }
            None => println!(
                "{id}: no outcome within {} (is a worker with {name} configured running, and the destination up?)",
                humantime::format_duration(wait)
            ),
        }
    }
    let pending = asked.len() - delivered - refused;
    println!(
        "destination {name}: {delivered} delivered, {refused} refused again, {pending} without an outcome"
    );
    Ok(if refused > 0 || missing > 0 {
        ExitCode::FAILURE
    } else if pending > 0 {
        ExitCode::from(3)
    } else {
        ExitCode::SUCCESS
    })
}
