//! `auditbridge dead-letters list|show`: what ingest refused, why, and the exact bytes.
//! Everything a message brought (payload, subject, reasons quoting it) is printed escaped, so
//! a hostile payload cannot drive the operator's terminal.

use std::process::ExitCode;

use anyhow::Context as _;
use auditbridge_config::Config;
use auditbridge_store::Store;
use auditbridge_store::dead_letters::{DeadLetterQuery, StoredDeadLetter};
use base64::Engine as _;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

#[derive(Debug, clap::Subcommand)]
pub(crate) enum DeadLettersCommand {
    /// List dead letters, newest first: id, kind, when, subject and reason.
    List {
        /// Only this kind (schema, not_json, subject_mismatch, oversize, conflict, …).
        #[arg(long)]
        kind: Option<String>,
        /// Only those received at or after this RFC 3339 time.
        #[arg(long, value_parser = crate::parse_timestamp)]
        since: Option<OffsetDateTime>,
        /// At most this many (1–10,000).
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(i64).range(1..=10_000))]
        limit: i64,
        #[arg(long)]
        json: bool,
    },
    /// Show one dead letter whole: reason, subject, stream position, and the payload as
    /// escaped text (its exact bytes: base64 with --json).
    Show {
        id: i64,
        #[arg(long)]
        json: bool,
    },
}

fn time(t: Option<OffsetDateTime>) -> Option<String> {
    t.and_then(|t| t.format(&Rfc3339).ok())
}

/// Text a message brought, safe for a terminal: control characters escaped.
fn safe(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect()
}

fn json_of(d: &StoredDeadLetter, payload: bool) -> serde_json::Value {
    let mut v = serde_json::json!({
        "id": d.id,
        "kind": d.kind,
        "reason": d.reason,
        "subject": d.subject,
        "stream": d.stream,
        "stream_seq": d.stream_seq,
        "stream_stored_at": time(d.stream_stored_at),
        "received_at": time(Some(d.received_at)),
        "replayed_at": time(d.replayed_at),
        "payload_bytes": d.payload.len(),
    });
    if payload {
        v["payload_base64"] = base64::engine::general_purpose::STANDARD
            .encode(&d.payload)
            .into();
        v["payload_utf8"] = std::str::from_utf8(&d.payload).is_ok().into();
    }
    v
}

pub(crate) async fn run(command: DeadLettersCommand, config: &Config) -> anyhow::Result<ExitCode> {
    let store = Store::connect_lazy(config.database_url.expose(), 1)?;
    let result = match command {
        DeadLettersCommand::List {
            kind,
            since,
            limit,
            json,
        } => {
            let rows = store
                .dead_letters(&DeadLetterQuery { kind, since, limit })
                .await
                .context("reading dead_letters")?;
            if json {
                let list: Vec<serde_json::Value> = rows.iter().map(|d| json_of(d, false)).collect();
                println!("{}", serde_json::Value::Array(list));
            } else if rows.is_empty() {
                println!("no dead letters");
            } else {
                for d in &rows {
                    let reason: String = safe(&d.reason).chars().take(160).collect();
                    println!(
                        "#{} {} {} {} ({} bytes){}: {reason}",
                        d.id,
                        safe(&d.kind),
                        time(Some(d.received_at)).unwrap_or_default(),
                        safe(&d.subject),
                        d.payload.len(),
                        if d.replayed_at.is_some() {
                            " replayed"
                        } else {
                            ""
                        }
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        DeadLettersCommand::Show { id, json } => {
            match store
                .dead_letter(id)
                .await
                .context("reading dead_letters")?
            {
                None => {
                    eprintln!("error: there is no dead letter #{id}");
                    Ok(ExitCode::FAILURE)
                }
                Some(d) if json => {
                    println!("{}", json_of(&d, true));
                    Ok(ExitCode::SUCCESS)
                }
                Some(d) => {
                    println!("dead letter #{}", d.id);
                    println!("kind        {}", safe(&d.kind));
                    println!("reason      {}", safe(&d.reason));
                    println!("subject     {}", safe(&d.subject));
                    println!(
                        "stream      {} sequence {}, stored {}",
                        safe(&d.stream),
                        d.stream_seq,
                        time(d.stream_stored_at).unwrap_or_else(|| "(unknown)".into())
                    );
                    println!(
                        "received    {}",
                        time(Some(d.received_at)).unwrap_or_default()
                    );
                    if let Some(at) = time(d.replayed_at) {
                        println!("replayed    {at}");
                    }
                    println!(
                        "payload     {} bytes{}, escaped:",
                        d.payload.len(),
                        if std::str::from_utf8(&d.payload).is_ok() {
                            ""
                        } else {
                            " (not UTF-8)"
                        }
                    );
                    println!("{}", d.payload.escape_ascii());
                    Ok(ExitCode::SUCCESS)
                }
            }
        }
    };
    store.close().await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_a_message_brought_cannot_drive_a_terminal() {
        assert_eq!(safe("a\u{1b}[31mred\nx"), "a\\u{1b}[31mred\\nx");
        assert_eq!(
            b"{\"a\":\"\x1b[2J\xff\"}".escape_ascii().to_string(),
            "{\\\"a\\\":\\\"\\x1b[2J\\xff\\\"}"
        );
    }
}
