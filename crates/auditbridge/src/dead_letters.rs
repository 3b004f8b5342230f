//! `auditbridge dead-letters list|show|replay`: what ingest refused, why, and the exact
//! bytes; and publishing it again after a fix. Everything a message brought (payload,
//! subject, reasons quoting it) is printed escaped, so a hostile payload cannot drive the
//! operator's terminal.
//!
//! A replay is recorded before it is published (`dead_letter_replays`, migration 0011): a
//! random nonce, which the message carries in `Auditbridge-Replay`, and the SHA-256 of the
//! payload. The worker records its verdict on the message (stored, duplicate, or a new dead
//! letter naming this one) in the transaction that stores it, only for a nonce waiting with
//! that payload hash; this command waits for the JetStream ack, then for the verdict.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream;
use auditbridge_config::Config;
use auditbridge_store::Store;
use auditbridge_store::dead_letters::{
    DeadLetterQuery, REPLAY_HEADER, StoredDeadLetter, StoredReplay,
};
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
    /// Publish dead letters to JetStream again, on their subject, after a fix: the exact
    /// payload, or a corrected one (--payload, for one ID). Waits for JetStream's ack, then
    /// for the worker's verdict on each: stored, already stored (a duplicate: ids
    /// deduplicate, so replaying twice stores once), or refused again as a new dead letter
    /// that names this one. Exit status 0 when every replay was stored, 1 when one failed
    /// again or could not be published, 3 when a verdict did not come within --wait.
    Replay {
        /// The dead letters to replay (or --kind).
        #[arg(required_unless_present = "kind", conflicts_with = "kind")]
        ids: Vec<i64>,
        /// Every dead letter of this kind still to replay (never replayed, or with no verdict
        /// yet), oldest first.
        #[arg(long)]
        kind: Option<String>,
        /// With --kind: only those received at or after this RFC 3339 time.
        #[arg(long, requires = "kind", value_parser = crate::parse_timestamp)]
        since: Option<OffsetDateTime>,
        /// Publish this file's bytes instead of the stored payload (one ID only). Checked
        /// here first as the worker would check it, on the dead letter's subject.
        #[arg(long, value_name = "FILE")]
        payload: Option<std::path::PathBuf>,
        /// How long to wait for the worker's verdicts once JetStream acknowledged.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        wait: Duration,
        /// Do not wait for the verdicts (`dead-letters show ID` tells them later).
        #[arg(long, conflicts_with = "wait")]
        no_wait: bool,
        /// Who replays, recorded with each replay; default: the operating-system user.
        #[arg(long)]
        by: Option<String>,
        /// Print the outcome as JSON lines, one per dead letter.
        #[arg(long)]
        json: bool,
    },
}

/// An optional time in RFC 3339.
pub(crate) fn time(t: Option<OffsetDateTime>) -> Option<String> {
    t.and_then(|t| t.format(&Rfc3339).ok())
}

/// Text a message brought, safe for a terminal: control characters escaped.
pub(crate) fn safe(s: &str) -> String {
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
        "replay_of": d.replay_of,
        "state": d.state,
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
                        "#{} {} {} {} ({} bytes) {}{}: {reason}",
                        d.id,
                        safe(&d.kind),
                        time(Some(d.received_at)).unwrap_or_default(),
                        safe(&d.subject),
                        d.payload.len(),
                        d.state,
                        d.replay_of
                            .map(|o| format!(", replayed from #{o}"))
                            .unwrap_or_default(),
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
                    let replays = store.dead_letter_replays(d.id).await?;
                    let mut doc = json_of(&d, true);
                    doc["replays"] = replays.iter().map(replay_json).collect();
                    println!("{doc}");
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
                    println!("state       {}", d.state);
                    if let Some(of) = d.replay_of {
                        println!("replay of   #{of}");
                    }
                    for r in store.dead_letter_replays(d.id).await? {
                        println!("replay      {}", replay_line(&r));
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
        DeadLettersCommand::Replay {
            ids,
            kind,
            since,
            payload,
            wait,
            no_wait,
            by,
            json,
        } => {
            let by = match by {
                Some(by) => crate::retention::text_arg("--by", &by, 200)?,
                None => crate::retention::os_user(),
            };
            let corrected = match payload {
                None => None,
                Some(_) if ids.len() != 1 => {
                    anyhow::bail!("--payload replaces the payload of one dead letter: give one ID")
                }
                Some(path) => Some(
                    std::fs::read(&path)
                        .with_context(|| format!("reading --payload {}", path.display()))?,
                ),
            };
            let plan = Plan {
                ids,
                kind,
                since,
                corrected,
                wait: (!no_wait).then_some(wait),
                by,
                json,
            };
            replay(&store, config, plan).await
        }
    };
    store.close().await;
    result
}

fn replay_json(r: &StoredReplay) -> serde_json::Value {
    serde_json::json!({
        "id": r.id,
        "corrected": r.corrected,
        "requested_by": r.requested_by,
        "requested_at": time(Some(r.requested_at)),
        "stream_seq": r.stream_seq,
        "published_at": time(r.published_at),
        "result": r.result,
        "event_id": r.event_id,
        "new_dead_letter_id": r.new_dead_letter_id,
        "decided_at": time(r.decided_at),
    })
}

fn replay_line(r: &StoredReplay) -> String {
    let how = if r.corrected { "corrected" } else { "exact" };
    let published = match r.stream_seq {
        Some(seq) => format!("published at stream sequence {seq}"),
        None => "not published".to_owned(),
    };
    let verdict = match (r.result.as_deref(), r.event_id, r.new_dead_letter_id) {
        (Some("stored"), Some(id), _) => format!("stored as event {id}"),
        (Some("duplicate"), Some(id), _) => format!("already stored as event {id}"),
        (Some("dead_letter"), _, Some(new)) => format!("refused again as dead letter #{new}"),
        (Some(other), _, _) => other.to_owned(),
        (None, _, _) => "no verdict yet".to_owned(),
    };
    format!(
        "{} by {} ({how}), {published}: {verdict}",
        time(Some(r.requested_at)).unwrap_or_default(),
        safe(&r.requested_by),
    )
}

/// What `dead-letters replay` was asked to do.
struct Plan {
    ids: Vec<i64>,
    kind: Option<String>,
    since: Option<OffsetDateTime>,
    corrected: Option<Vec<u8>>,
    /// None: do not wait for verdicts.
    wait: Option<Duration>,
    by: String,
    json: bool,
}

/// One replay published, waiting for its verdict.
struct Sent {
    dead_letter: i64,
    kind: String,
    nonce: uuid::Uuid,
    stream_seq: u64,
}

/// Publishes replays and keeps what was sent.
struct Publisher<'a> {
    store: &'a Store,
    js: &'a jetstream::Context,
    corrected: bool,
    by: &'a str,
    json: bool,
    sent: Vec<Sent>,
    /// Not published (told as they happen).
    failed: usize,
    started: Instant,
}

impl Publisher<'_> {
    async fn send(&mut self, d: &StoredDeadLetter, payload: &[u8]) {
        match publish_one(self.store, self.js, d, payload, self.corrected, self.by).await {
            Ok(s) => {
                self.sent.push(s);
                if self.sent.len().is_multiple_of(1000) {
                    eprintln!(
                        "published {} replays ({:.0}/s)",
                        self.sent.len(),
                        self.sent.len() as f64 / self.started.elapsed().as_secs_f64().max(1e-9)
                    );
                }
            }
            Err(e) => {
                report(self.json, d.id, &d.kind, "not_published", &format!("{e:#}"));
                self.failed += 1;
            }
        }
    }
}

/// Dead letters per page of `--kind`.
const PAGE: i64 = 500;

async fn replay(store: &Store, config: &Config, plan: Plan) -> anyhow::Result<ExitCode> {
    let client =
        auditbridge_runtime::nats::connect(config.nats_url.expose(), "auditbridge-replay").await?;
    let js = jetstream::new(client.clone());
    let mut out = Publisher {
        store,
        js: &js,
        corrected: plan.corrected.is_some(),
        by: &plan.by,
        json: plan.json,
        sent: Vec::new(),
        failed: 0,
        started: Instant::now(),
    };
    if let Some(kind) = &plan.kind {
        let mut after = 0;
        let upto = store.last_dead_letter_id().await?;
        loop {
            let page = store
                .open_dead_letters(kind, plan.since, after, upto, PAGE)
                .await
                .context("reading dead_letters")?;
            let Some(last) = page.last() else { break };
            after = last.id;
            for d in &page {
                out.send(d, &d.payload).await;
            }
        }
        if out.sent.is_empty() && out.failed == 0 {
            println!("no dead letters of kind {} to replay", safe(kind));
        }
    } else {
        for &id in &plan.ids {
            let Some(d) = store
                .dead_letter(id)
                .await
                .context("reading dead_letters")?
            else {
                report(
                    plan.json,
                    id,
                    "",
                    "missing",
                    &format!("there is no dead letter #{id}"),
                );
                out.failed += 1;
                continue;
            };
            // A dead letter refused again on replay carries on as the new one: replay that.
            let mut d = d;
            for _ in 0..100 {
                if d.state != "failed_again" {
                    break;
                }
                let replays = store.dead_letter_replays(d.id).await?;
                let Some(next) = replays.last().and_then(|r| r.new_dead_letter_id) else {
                    break;
                };
                let Some(n) = store.dead_letter(next).await? else {
                    break;
                };
                eprintln!(
                    "#{} was refused again on replay as #{next}; replaying #{next} for it",
                    d.id
                );
                d = n;
            }
            let id = d.id;
            if d.state == "replayed" {
                // Publishing it again would only be found a duplicate: say where it is.
                let replays = store.dead_letter_replays(id).await?;
                let stored = replays
                    .iter()
                    .rev()
                    .find(|r| matches!(r.result.as_deref(), Some("stored" | "duplicate")));
                let detail = stored.map(replay_line).unwrap_or_default();
                report(plan.json, id, &d.kind, "already_replayed", &detail);
                continue;
            }
            let payload = match &plan.corrected {
                Some(p) => {
                    if let Err(e) = precheck(config, &d, p) {
                        report(plan.json, id, &d.kind, "not_published", &e);
                        out.failed += 1;
                        continue;
                    }
                    p.clone()
                }
                None => d.payload.clone(),
            };
            out.send(&d, &payload).await;
        }
    }
    client.flush().await.ok();
    let Publisher { sent, failed, .. } = out;

    let Some(wait) = plan.wait else {
        for s in &sent {
            report(
                plan.json,
                s.dead_letter,
                &s.kind,
                "published",
                &format!("published at stream sequence {}", s.stream_seq),
            );
        }
        println!(
            "replayed {}: published, verdicts not awaited (dead-letters show ID tells them)",
            sent.len()
        );
        return Ok(if failed > 0 {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        });
    };
    let verdicts = await_verdicts(store, &sent, wait).await?;
    let (mut stored, mut duplicates, mut again, mut undecided) = (0, 0, 0, 0);
    for s in &sent {
        match verdicts.get(&s.nonce) {
            Some(r) if r.result.as_deref() == Some("stored") => {
                stored += 1;
                let id = r.event_id.map(|i| i.to_string()).unwrap_or_default();
                report(
                    plan.json,
                    s.dead_letter,
                    &s.kind,
                    "stored",
                    &format!("stored as event {id}"),
                );
            }
            Some(r) if r.result.as_deref() == Some("duplicate") => {
                duplicates += 1;
                let id = r.event_id.map(|i| i.to_string()).unwrap_or_default();
                report(
                    plan.json,
                    s.dead_letter,
                    &s.kind,
                    "duplicate",
                    &format!("already stored as event {id}"),
                );
            }
            Some(r) => {
                again += 1;
                let detail = match r.new_dead_letter_id {
                    Some(new) => match store.dead_letter(new).await? {
                        Some(n) => format!(
                            "refused again as dead letter #{new} ({}): {}",
                            safe(&n.kind),
                            safe(&n.reason).chars().take(300).collect::<String>()
                        ),
                        None => format!("refused again as dead letter #{new}"),
                    },
                    None => "refused again".to_owned(),
                };
                report(plan.json, s.dead_letter, &s.kind, "failed_again", &detail);
            }
            None => {
                undecided += 1;
                report(
                    plan.json,
                    s.dead_letter,
                    &s.kind,
                    "no_verdict",
                    &format!(
                        "published at stream sequence {} but no verdict within {}; is a worker running? (dead-letters show {} tells it later)",
                        s.stream_seq,
                        humantime::format_duration(wait),
                        s.dead_letter
                    ),
                );
            }
        }
    }
    println!(
        "replayed {}: {stored} stored, {duplicates} already stored, {again} refused again, {undecided} without a verdict{}",
        sent.len(),
        if failed > 0 {
            format!(", {failed} not published")
        } else {
            String::new()
        }
    );
    Ok(if failed > 0 || again > 0 {
        ExitCode::FAILURE
    } else if undecided > 0 {
        ExitCode::from(3)
    } else {
        ExitCode::SUCCESS
    })
}

/// Prints one dead letter's outcome.
fn report(json: bool, id: i64, kind: &str, outcome: &str, detail: &str) {
    if json {
        println!(
            "{}",
            serde_json::json!({"id": id, "kind": kind, "outcome": outcome, "detail": detail})
        );
    } else if kind.is_empty() {
        println!("#{id}: {outcome}: {}", safe(detail));
    } else {
        println!("#{id} {}: {outcome}: {}", safe(kind), safe(detail));
    }
}

/// A corrected payload is checked as the worker checks a message, on the dead letter's
/// subject, before anything is published: a typo is told now, not as one more dead letter.
fn precheck(config: &Config, d: &StoredDeadLetter, payload: &[u8]) -> Result<(), String> {
    let event = auditbridge_event::decode(payload, config.ingest.max_event_bytes)
        .map_err(|e| format!("the corrected payload would be refused: {e}"))?;
    event
        .check_subject(&config.subject_prefix, &d.subject)
        .map_err(|e| {
            format!(
                "the corrected payload would be refused on subject {}: {e}",
                d.subject
            )
        })
}

/// Records the replay, publishes it, and waits for JetStream's ack.
async fn publish_one(
    store: &Store,
    js: &jetstream::Context,
    d: &StoredDeadLetter,
    payload: &[u8],
    corrected: bool,
    by: &str,
) -> anyhow::Result<Sent> {
    use sha2::Digest as _;
    let nonce = uuid::Uuid::new_v4();
    let sha: [u8; 32] = sha2::Sha256::digest(payload).into();
    // Recorded first: the worker may take the message before this command hears the ack.
    store
        .request_replay(d.id, nonce, corrected, &sha, by)
        .await
        .context("recording the replay")?;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(REPLAY_HEADER, nonce.to_string().as_str());
    // Its own message id: the original's (`tenant:id`) would be dropped by JetStream's
    // duplicate window if the replay came soon after it.
    headers.insert(
        async_nats::header::NATS_MESSAGE_ID,
        format!("replay:{nonce}").as_str(),
    );
    let ack = js
        .publish_with_headers(
            d.subject.clone(),
            headers,
            bytes::Bytes::copy_from_slice(payload),
        )
        .await
        .context("publishing to JetStream")?
        .await
        .context("waiting for JetStream's ack")?;
    anyhow::ensure!(
        !ack.duplicate,
        "JetStream took the replay for a duplicate and did not store it"
    );
    store
        .replay_published(nonce, &ack.stream, ack.sequence)
        .await
        .context("recording where JetStream stored the replay")?;
    Ok(Sent {
        dead_letter: d.id,
        kind: d.kind.clone(),
        nonce,
        stream_seq: ack.sequence,
    })
}

/// Waits until every replay sent has a verdict, or `wait` has passed.
async fn await_verdicts(
    store: &Store,
    sent: &[Sent],
    wait: Duration,
) -> anyhow::Result<std::collections::HashMap<uuid::Uuid, StoredReplay>> {
    let deadline = Instant::now() + wait;
    let mut verdicts = std::collections::HashMap::new();
    let mut waiting: Vec<uuid::Uuid> = sent.iter().map(|s| s.nonce).collect();
    while !waiting.is_empty() {
        for chunk in waiting.chunks(10_000) {
            for r in store.decided_replays(chunk).await? {
                verdicts.insert(r.nonce, r);
            }
        }
        waiting.retain(|n| !verdicts.contains_key(n));
        if waiting.is_empty() || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(verdicts)
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
