//! `auditbridge hold …` and `auditbridge retention …`, and what `migrate` says about the
//! retention it stored.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use auditbridge_config::Config;
use auditbridge_store::retention::Hold;
use auditbridge_store::{RetentionPolicy, Store};
use auditbridge_worker::retention::{Outcome, PartitionReport};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

fn keep(d: Option<Duration>) -> String {
    match d {
        Some(d) => humantime::format_duration(d).to_string(),
        None => "forever".to_owned(),
    }
}

/// One line for `migrate`: the partition interval and every policy.
pub(crate) fn describe(policy: &RetentionPolicy) -> String {
    let mut line = format!(
        "retention: partitions of {}, events kept {} by default",
        humantime::format_duration(policy.partition_interval),
        keep(policy.default_keep)
    );
    for (tenant, k) in &policy.tenants {
        line.push_str(&format!(", {} for tenant {tenant:?}", keep(*k)));
    }
    line.push_str(&format!(
        ", dead letters kept {}",
        keep(policy.dead_letter_keep)
    ));
    line
}

/// `auditbridge hold …`: legal holds, which no expiry passes.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum HoldCommand {
    /// Hold a tenant's events that occurred in [--since, --until) (either end open) against
    /// every expiry, whatever its retention policy. Connects with AUDITBRIDGE_DATABASE_URL.
    Add {
        #[arg(long)]
        tenant: String,
        /// RFC 3339, e.g. 2026-01-01T00:00:00Z; default: from the beginning.
        #[arg(long, value_parser = crate::parse_timestamp)]
        since: Option<OffsetDateTime>,
        /// RFC 3339; default: with no end.
        #[arg(long, value_parser = crate::parse_timestamp)]
        until: Option<OffsetDateTime>,
        /// Why (a case, a ticket): kept with the hold.
        #[arg(long)]
        reason: String,
        /// Who places it; default: the operating-system user.
        #[arg(long)]
        by: Option<String>,
    },
    /// The holds in force (with --all, released ones too).
    List {
        #[arg(long)]
        all: bool,
        #[arg(long)]
        json: bool,
    },
    /// Release a hold (it stays listed, with who and when). Connects with
    /// AUDITBRIDGE_MIGRATE_DATABASE_URL: the workers' role may add holds, never release them.
    Release {
        id: i64,
        #[arg(long)]
        by: Option<String>,
    },
}

/// `auditbridge retention …`.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum RetentionCommand {
    /// Expire now what is due (as the worker holding the `_retention` lease does on
    /// schedule): each partition whose tenants are all past their retention and not held is
    /// dropped, with a signed receipt per tenant. With --dry-run, say per partition and tenant
    /// what would go and what keeps it, and change nothing.
    Run {
        #[arg(long)]
        dry_run: bool,
    },
}

/// The operating-system user, for `--by`'s default.
pub(crate) fn os_user() -> String {
    for var in ["USER", "LOGNAME"] {
        if let Ok(u) = std::env::var(var)
            && !u.is_empty()
        {
            return u;
        }
    }
    std::process::Command::new("id")
        .arg("-un")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// A name for `--by` or a reason: printable, not empty, at most `max` characters.
pub(crate) fn text_arg(what: &str, value: &str, max: usize) -> anyhow::Result<String> {
    let value = value.trim();
    anyhow::ensure!(!value.is_empty(), "{what} is empty");
    anyhow::ensure!(
        value.chars().count() <= max,
        "{what} is longer than {max} characters"
    );
    anyhow::ensure!(
        !value.chars().any(char::is_control),
        "{what} holds control characters"
    );
    Ok(value.to_owned())
}

fn hold_json(h: &Hold) -> serde_json::Value {
    let t = |t: Option<OffsetDateTime>| t.and_then(|t| t.format(&Rfc3339).ok());
    serde_json::json!({
        "id": h.id,
        "tenant": h.tenant,
        "since": t(h.since),
        "until": t(h.until),
        "reason": h.reason,
        "created_by": h.created_by,
        "created_at": t(Some(h.created_at)),
        "released_by": h.released_by,
        "released_at": t(h.released_at),
    })
}

fn hold_line(h: &Hold) -> String {
    let t = |t: Option<OffsetDateTime>, open: &str| {
        t.and_then(|t| t.format(&Rfc3339).ok())
            .unwrap_or_else(|| open.to_owned())
    };
    let mut line = format!(
        "#{} tenant {} events occurred [{}, {}) by {} at {}: {}",
        h.id,
        h.tenant,
        t(h.since, "the beginning"),
        t(h.until, "no end"),
        h.created_by,
        t(Some(h.created_at), "-"),
        h.reason
    );
    if let Some(at) = h.released_at {
        line.push_str(&format!(
            " (released by {} at {})",
            h.released_by.as_deref().unwrap_or("?"),
            t(Some(at), "-")
        ));
    }
    line
}

pub(crate) async fn hold(command: HoldCommand, config: &Config) -> anyhow::Result<ExitCode> {
    match command {
        HoldCommand::Add {
            tenant,
            since,
            until,
            reason,
            by,
        } => {
            auditbridge_event::validate_tenant(&tenant)
                .map_err(|e| anyhow::anyhow!("--tenant: {e}"))?;
            if let (Some(s), Some(u)) = (since, until) {
                anyhow::ensure!(s < u, "--since must be before --until");
            }
            let reason = text_arg("--reason", &reason, 2000)?;
            let by = text_arg("--by", &by.unwrap_or_else(os_user), 200)?;
            let store = Store::connect_lazy(config.database_url.expose(), 1)?;
            let hold = store
                .add_hold(&tenant, since, until, &reason, &by)
                .await
                .context("adding the hold")?;
            store.close().await;
            println!("added hold {}", hold_line(&hold));
            Ok(ExitCode::SUCCESS)
        }
        HoldCommand::List { all, json } => {
            let store = Store::connect_lazy(config.database_url.expose(), 1)?;
            let holds = store.holds(all).await.context("listing holds")?;
            store.close().await;
            if json {
                let list: Vec<serde_json::Value> = holds.iter().map(hold_json).collect();
                println!("{}", serde_json::Value::Array(list));
            } else if holds.is_empty() {
                println!("no holds{}", if all { "" } else { " in force" });
            } else {
                for h in &holds {
                    println!("{}", hold_line(h));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        HoldCommand::Release { id, by } => {
            let by = text_arg("--by", &by.unwrap_or_else(os_user), 200)?;
            let store = Store::connect_lazy(config.migrate_database_url.expose(), 1)?;
            let hold = store
                .release_hold(id, &by)
                .await
                .context("releasing the hold (as AUDITBRIDGE_MIGRATE_DATABASE_URL's role)")?;
            store.close().await;
            match hold {
                None => {
                    eprintln!("error: there is no hold #{id}");
                    Ok(ExitCode::FAILURE)
                }
                Some(h)
                    if h.released_by.as_deref() != Some(by.as_str()) && h.released_at.is_some() =>
                {
                    println!("hold was already released: {}", hold_line(&h));
                    Ok(ExitCode::SUCCESS)
                }
                Some(h) => {
                    println!("released hold {}", hold_line(&h));
                    Ok(ExitCode::SUCCESS)
                }
            }
        }
    }
}

fn tenants_text(p: &PartitionReport) -> String {
    if p.counted.is_empty() {
        return p
            .tenants
            .iter()
            .map(|(t, _, _)| t.clone())
            .collect::<Vec<_>>()
            .join(", ");
    }
    p.counted
        .iter()
        .map(|t| {
            let mut s = format!("{} {} events", t.tenant, t.events);
            if t.unlogged > 0 {
                s.push_str(&format!(" ({} not yet in the log)", t.unlogged));
            }
            for (d, n) in &t.undelivered {
                s.push_str(&format!(" ({n} not yet delivered to {d})"));
            }
            s
        })
        .collect::<Vec<_>>()
        .join(", ")
}

pub(crate) async fn retention(
    command: RetentionCommand,
    config: &Config,
) -> anyhow::Result<ExitCode> {
    let RetentionCommand::Run { dry_run } = command;
    let key = match &config.log_key_file {
        Some(path) => Some(auditbridge_worker::read_log_key(path)?),
        None => None,
    };
    let store = Store::connect_lazy(config.database_url.expose(), 2)?;
    let stop = tokio_util::sync::CancellationToken::new();
    let report = auditbridge_worker::retention::expire(&store, key.as_ref(), dry_run, &stop)
        .await
        .context("expiring")?;
    store.close().await;
    for p in &report.partitions {
        let what = match &p.outcome {
            Outcome::Dropped => "dropped".to_owned(),
            Outcome::WouldGo => "would go".to_owned(),
            Outcome::Kept(why) => format!("kept ({why})"),
        };
        println!("partition {}: {what}: {}", p.partition, tenants_text(p));
    }
    if dry_run {
        let go: Vec<&PartitionReport> = report
            .partitions
            .iter()
            .filter(|p| p.outcome == Outcome::WouldGo)
            .collect();
        let events: i64 = go
            .iter()
            .flat_map(|p| p.counted.iter().map(|t| t.events))
            .sum();
        println!(
            "dry run: {} partition(s) with {events} event(s) would expire; nothing changed",
            go.len()
        );
    } else {
        println!(
            "expired {} partition(s), {} event(s), {} dead letter(s), {} empty partition(s){}",
            report.dropped,
            report.events,
            report.dead_letters,
            report.empty_dropped,
            if key.is_some() {
                "; receipts signed"
            } else {
                "; receipts unsigned (no AUDITBRIDGE_LOG_KEY_FILE)"
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}
