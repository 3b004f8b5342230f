//! `auditbridge log audit`: replays each tenant's log from the database — every event
//! against the leaf the log stored for it, the commit order it was appended in, the stored
//! subtrees, every signed checkpoint in the database and, with `--checkpoint`, one kept
//! elsewhere — and reports each difference as tampering.
//!
//! The checkpoints in the database prove the log up to the newest of them, unless whoever
//! altered it also removed the checkpoints that would show it (a superuser can). A checkpoint
//! kept outside the database is what shows that: a log cut back below it, or rewritten under
//! it, fails.

use std::path::Path;
use std::process::ExitCode;

use auditbridge_config::Config;
use auditbridge_store::Store;
use auditbridge_store::log::LoggedBody;
use auditbridge_tlog::VerifierKey;
use auditbridge_tlog::note::{NoteError, SignedCheckpoint, open_checkpoint};

use super::replay::{Entry, Replay};
use super::{BATCH, TAMPERED, UNREADABLE, USAGE, origin_tenant, read_text, unix_time};

/// A checkpoint kept outside the database, and its tenant.
struct External {
    path: String,
    tenant: String,
    signed: SignedCheckpoint,
}

pub(crate) async fn run(
    config: &Config,
    tenant: Option<&str>,
    checkpoint: Option<&Path>,
    key: &VerifierKey,
) -> ExitCode {
    let external = match checkpoint.map(|p| external(p, key)).transpose() {
        Ok(e) => e,
        Err(code) => return code,
    };
    if let (Some(t), Some(e)) = (tenant, &external)
        && t != e.tenant
    {
        eprintln!(
            "error: --checkpoint {} is of tenant {:?}, not --tenant {t:?}",
            e.path, e.tenant
        );
        return ExitCode::from(USAGE);
    }
    let store = match super::connect(config) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let code = match audit(&store, tenant, external.as_ref(), key).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(TAMPERED),
        Err(e) => {
            eprintln!("error: cannot read the log from the database: {e}");
            ExitCode::from(UNREADABLE)
        }
    };
    store.close().await;
    code
}

fn external(path: &Path, key: &VerifierKey) -> Result<External, ExitCode> {
    let note = read_text(path)?;
    let shown = path.display().to_string();
    let signed = open_checkpoint(&note, key).map_err(|e| {
        eprintln!("error: --checkpoint {shown}: it does not verify with key {key}: {e}");
        ExitCode::from(USAGE)
    })?;
    let tenant = origin_tenant(&signed.checkpoint.origin, key)
        .ok_or_else(|| {
            eprintln!(
                "error: --checkpoint {shown}: its origin {:?} is not <{}>/<tenant>",
                signed.checkpoint.origin,
                key.name()
            );
            ExitCode::from(USAGE)
        })?
        .to_owned();
    Ok(External {
        path: shown,
        tenant,
        signed,
    })
}

/// Audits the tenants; true when nothing was found.
async fn audit(
    store: &Store,
    tenant: Option<&str>,
    external: Option<&External>,
    key: &VerifierKey,
) -> Result<bool, auditbridge_store::StoreError> {
    let mut tenants = match tenant {
        Some(t) => vec![t.to_owned()],
        None => store.log_tenants().await?,
    };
    if let Some(e) = external
        && !tenants.contains(&e.tenant)
    {
        // Its whole log is gone: the replay of nothing says so.
        tenants.push(e.tenant.clone());
    }
    let mut clean = true;
    let (mut found, mut tampered) = (0usize, 0usize);
    for t in &tenants {
        let external = external.filter(|e| &e.tenant == t);
        match audit_tenant(store, t, external, key, &mut found).await {
            Ok(ok) => {
                clean &= ok;
                tampered += usize::from(!ok);
            }
            // What was found before stays found: exit 1, not 3.
            Err(e) if found > 0 => {
                eprintln!("error: cannot read tenant {t}'s log from the database: {e}");
                println!("audit: tampering found in {tampered} tenant log(s) before the error");
                return Ok(false);
            }
            Err(e) => return Err(e),
        }
    }
    if clean {
        println!("audit: {} tenant log(s), no tampering found", tenants.len());
    } else {
        println!(
            "audit: tampering found in {tampered} of {} tenant log(s) ({found} findings)",
            tenants.len()
        );
    }
    Ok(clean)
}

async fn audit_tenant(
    store: &Store,
    tenant: &str,
    external: Option<&External>,
    key: &VerifierKey,
    found: &mut usize,
) -> Result<bool, auditbridge_store::StoreError> {
    // Checkpoints first, then the log's size, then the stored subtrees within it, then the
    // entries below it: everything read was committed before what is read after it, so a
    // sequencer appending meanwhile is never mistaken for a forger.
    let checkpoints = store.all_checkpoints(tenant).await?;
    let end = store.log_size(tenant).await?;
    let nodes = store
        .log_nodes(tenant)
        .await?
        .into_iter()
        .filter(|((level, index), _)| {
            (index + 1)
                .checked_mul(1u64.checked_shl(8 * level).unwrap_or(u64::MAX))
                .is_some_and(|last| last <= end)
        })
        .collect();
    let mut replay = Replay::new(tenant).with_nodes(nodes);
    let mut newest: Option<(u64, Option<u64>)> = None;
    let mut other_keys = 0usize;
    let ours = format!("\n\u{2014} {} ", key.name());
    for (id, signed, note) in checkpoints {
        match open_checkpoint(&note, key) {
            Ok(opened) => {
                let c = &opened.checkpoint;
                if origin_tenant(&c.origin, key) != Some(tenant) {
                    replay.find(
                        None,
                        None,
                        format!(
                            "checkpoint #{id} is of origin {:?}, not {}/{tenant}: moved from \
                             another log",
                            c.origin,
                            key.name()
                        ),
                    );
                    continue;
                }
                let label = format!(
                    "checkpoint #{id} (signed at {})",
                    opened.signed_at.map_or("an unknown time".into(), unix_time)
                );
                replay.expect(c.size, c.root, label);
                newest = Some((c.size, opened.signed_at));
            }
            // Signed under this log's name by another key: altered (or a key replaced
            // under the same name, which `log keygen` never does).
            Err(NoteError::Unverified(_)) if note.contains(&ours) => replay.find(
                None,
                None,
                format!(
                    "checkpoint #{id} is signed under the name {} but not by key {key}: altered",
                    key.name()
                ),
            ),
            Err(NoteError::Unverified(_)) => other_keys += 1,
            // A bare checkpoint, stored while no key was configured.
            Err(NoteError::Malformed(_)) if !signed && !note.contains('\u{2014}') => {}
            Err(e) => replay.find(
                None,
                None,
                format!("checkpoint #{id} does not verify with key {key}: {e}: forged or altered"),
            ),
        }
    }
    if let Some(e) = external {
        let c = &e.signed.checkpoint;
        replay.expect(c.size, c.root, format!("--checkpoint {}", e.path));
    }
    let mut next = 0u64;
    while next < end {
        let batch = store.logged_events(tenant, next, end, BATCH).await?;
        let Some(last) = batch.last().map(|e| e.index) else {
            break;
        };
        for entry in &batch {
            let body = entry.event.as_ref();
            if let Some(b) = body
                && let Some(what) = columns_differ(b, tenant)
            {
                replay.find(Some(entry.index), Some(entry.event_id), what);
            }
            replay.push(Entry {
                index: entry.index,
                event_id: Some(entry.event_id),
                bytes: body.map(|b| b.text.as_bytes()),
                stored_leaf: Some(&entry.leaf_hash),
                position: body.map(|b| b.position.clone()),
            });
        }
        next = last + 1;
    }
    // Retention receipts, read after the entries: every drop that removed one of them
    // committed its receipts with it. Only those signed by the key vouch for anything.
    for r in store.receipts(Some(tenant)).await? {
        match super::receipts::vouched(&r.note, key, tenant) {
            Ok(ranges) => {
                let stored: Vec<(u64, u64)> =
                    auditbridge_store::retention::parse_multirange(&r.log_indexes)
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(a, b)| (a.max(0) as u64, b.max(0) as u64))
                        .collect();
                if stored != ranges {
                    replay.find(
                        None,
                        None,
                        format!(
                            "retention receipt #{} lists other log indexes ({}) than its signed \
                             note: altered",
                            r.id, r.log_indexes
                        ),
                    );
                }
                replay.vouch(&ranges);
            }
            Err(why) if r.signed => replay.find(
                None,
                None,
                format!(
                    "retention receipt #{} does not count: {why}: forged or altered",
                    r.id
                ),
            ),
            Err(_) => eprintln!(
                "note: tenant {tenant}: retention receipt #{} is unsigned (no key when it was \
                 made) and vouches for nothing",
                r.id
            ),
        }
    }
    // Events the sequencer passed that no log holds: inserted behind its cursor.
    for id in store.unlogged_events(tenant, 50).await? {
        replay.find(
            None,
            Some(id),
            "the event is in the trail, behind the sequencer's cursor, in no log: inserted \
             after the fact",
        );
    }
    let outcome = replay.finish();
    if other_keys > 0 {
        eprintln!(
            "note: tenant {tenant}: {other_keys} checkpoint(s) signed by other keys than {} \
             were not checked",
            key.name()
        );
    }
    if outcome.found > 0 {
        *found += outcome.found;
        outcome.print_findings();
        return Ok(false);
    }
    match newest {
        Some((size, at)) => println!(
            "tenant {tenant}: {} entries ({} expired under signed retention receipts), {} \
             checkpoint(s) hold; the newest, of size {size}, signed at {}",
            outcome.size,
            outcome.expired,
            outcome.checked,
            at.map_or("an unknown time".into(), unix_time)
        ),
        None => println!(
            "tenant {tenant}: {} entries agree with their events, but no checkpoint signed by \
             {} vouches for them (no key configured, or every checkpoint was removed: a \
             checkpoint kept elsewhere, with --checkpoint, tells which)",
            outcome.size,
            key.name()
        ),
    }
    Ok(true)
}

/// The first column of the stored row that says something else than the event: what queries
/// filter on and destinations route by must be the event's own.
fn columns_differ(body: &LoggedBody, tenant: &str) -> Option<String> {
    let c = &body.columns;
    if c.tenant != tenant {
        return Some(format!(
            "the event's row is of tenant {:?}, not this log's",
            c.tenant
        ));
    }
    let event: serde_json::Value = match serde_json::from_str(&body.text) {
        Ok(v) => v,
        Err(e) => return Some(format!("the stored event is not JSON: {e}")),
    };
    let text = |pointer: &str| event.pointer(pointer).and_then(|v| v.as_str());
    let occurred = text("/occurred_at")
        .and_then(|t| {
            time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok()
        })
        .and_then(to_microseconds);
    let checks: [(&str, bool); 8] = [
        (
            "id",
            text("/id").and_then(|t| t.parse::<uuid::Uuid>().ok()) == Some(c.id),
        ),
        ("tenant", text("/tenant") == Some(c.tenant.as_str())),
        ("action", text("/action") == Some(c.action.as_str())),
        ("outcome", text("/outcome") == Some(c.outcome.as_str())),
        ("occurred_at", occurred == Some(c.occurred_at)),
        ("actor_id", text("/actor/id") == Some(c.actor_id.as_str())),
        ("target_id", text("/target/id") == c.target_id.as_deref()),
        ("source", text("/source") == Some(c.source.as_str())),
    ];
    checks.iter().find(|(_, same)| !same).map(|(column, _)| {
        format!(
            "the row's {column} column says something else than the event: queries and \
             destinations see an altered event"
        )
    })
}

/// A time as PostgreSQL stores it: rounded to the microsecond, half up (the event keeps the
/// nanoseconds its producer wrote; the column cannot).
fn to_microseconds(t: time::OffsetDateTime) -> Option<time::OffsetDateTime> {
    let sub = i64::from(t.nanosecond() % 1000);
    if sub >= 500 {
        t.checked_add(time::Duration::nanoseconds(1000 - sub))
    } else {
        t.checked_sub(time::Duration::nanoseconds(sub))
    }
}

#[cfg(test)]
mod tests {
    use auditbridge_store::Position;
    use auditbridge_store::log::EventColumns;
    use time::macros::datetime;

    use super::*;

    fn body(occurred_json: &str, column: time::OffsetDateTime, action: &str) -> LoggedBody {
        let id = uuid::Uuid::nil();
        LoggedBody {
            text: format!(
                r#"{{"id": "{id}", "tenant": "acme", "action": "doc.read", "outcome": "success", "occurred_at": "{occurred_json}", "actor": {{"id": "u1"}}, "source": "s"}}"#
            ),
            columns: EventColumns {
                id,
                tenant: "acme".into(),
                action: action.into(),
                outcome: "success".into(),
                occurred_at: column,
                actor_id: "u1".into(),
                target_id: None,
                source: "s".into(),
            },
            position: Position::start(),
        }
    }

    /// The columns agree with an event whose time has nanoseconds (PostgreSQL keeps
    /// microseconds, rounded half up) or another offset; an altered column does not.
    #[test]
    fn columns_are_compared_as_postgresql_stores_them() {
        let col = datetime!(2026-12-03 18:36:44.123457 UTC);
        for written in [
            "2026-12-03T18:36:44.1234565Z",
            "2026-12-03T18:36:44.123457Z",
            "2026-12-03T19:36:44.123456501+01:00",
        ] {
            assert_eq!(
                columns_differ(&body(written, col, "doc.read"), "acme"),
                None,
                "{written}"
            );
        }
        let changed = columns_differ(&body("2026-12-03T18:36:44.123457Z", col, "x.y"), "acme");
        assert!(changed.is_some_and(|w| w.contains("action")));
        let later = datetime!(2026-12-03 18:36:44.123458 UTC);
        let moved = columns_differ(
            &body("2026-12-03T18:36:44.123457Z", later, "doc.read"),
            "acme",
        );
        assert!(moved.is_some_and(|w| w.contains("occurred_at")));
        assert!(
            columns_differ(
                &body("2026-12-03T18:36:44.123457Z", col, "doc.read"),
                "other"
            )
            .is_some_and(|w| w.contains("tenant"))
        );
    }
}
