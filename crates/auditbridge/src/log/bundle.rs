//! A tenant's bundle: what an auditor takes away and checks with no access to the database.
//!
//! - `events.jsonl`: the events in log order, index 0 first, each exactly the bytes of its
//!   leaf (log version 1: the body `GET /v1/events/{id}` returns) and a newline. An event the
//!   log holds but the trail lost is an empty line.
//! - `checkpoint`: the tenant's newest signed checkpoint, which the events reproduce.
//! - `verifier-key`: the log's verifier key, for reference only: a verifier uses the key it
//!   got from the log's operator.
//! - `leaves.txt`: per index, the leaf hash the log stored when it appended the event and the
//!   event's place in commit order (`generation tx_id seq`), or `-`. Not signed: it only lets
//!   `verify` name the index that differs; the proof is the checkpoint.
//! - `receipts.jsonl`: the tenant's retention receipts, one JSON object per line with the
//!   signed `note`: an event whose line is empty because it expired is no finding where a
//!   receipt signed by the key names its index (its leaf in `leaves.txt` still has to give
//!   the checkpoint's root).

use std::fs::File;
use std::io::{BufReader, BufWriter, Write as _};
use std::path::Path;
use std::process::ExitCode;

use auditbridge_config::Config;
use auditbridge_store::Position;
use auditbridge_store::log::LoggedEvent;
use auditbridge_tlog::VerifierKey;
use auditbridge_tlog::note::open_checkpoint;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

use super::replay::{Entry, Replay};
use super::{BATCH, TAMPERED, UNREADABLE, USAGE, origin_tenant, read_text, unix_time};

pub(crate) const EVENTS: &str = "events.jsonl";
pub(crate) const CHECKPOINT: &str = "checkpoint";
pub(crate) const KEY: &str = "verifier-key";
pub(crate) const LEAVES: &str = "leaves.txt";
pub(crate) const RECEIPTS: &str = "receipts.jsonl";
/// The most receipts `verify` reads, and the longest line of [`RECEIPTS`].
const MAX_RECEIPTS: usize = 1_000_000;
const MAX_RECEIPT_LINE: u64 = 64 << 10;
const README: &str = "README.txt";

/// The longest line `verify` reads from `events.jsonl` (far above any event a worker
/// accepts) and from `leaves.txt`, and the largest checkpoint note: a crafted bundle cannot
/// make it read without bound.
const MAX_EVENT_LINE: u64 = 16 << 20;
const MAX_LEAF_LINE: u64 = 4 << 10;
const MAX_NOTE: u64 = 64 << 10;

pub(crate) async fn export(
    config: &Config,
    tenant: &str,
    out: &Path,
    key: &VerifierKey,
) -> ExitCode {
    let store = match super::connect(config) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let code = match export_from(&store, tenant, out, key).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(UNREADABLE)
        }
    };
    store.close().await;
    code
}

async fn export_from(
    store: &auditbridge_store::Store,
    tenant: &str,
    out: &Path,
    key: &VerifierKey,
) -> anyhow::Result<ExitCode> {
    use anyhow::Context as _;
    let Some(stored) = store.newest_signed_checkpoint(tenant).await? else {
        eprintln!(
            "error: tenant {tenant:?} has no signed checkpoint (no log yet, or the workers run \
             without AUDITBRIDGE_LOG_KEY_FILE)"
        );
        return Ok(ExitCode::from(USAGE));
    };
    let signed = match open_checkpoint(&stored.note, key) {
        Ok(s) => s,
        Err(e) => {
            eprintln!(
                "error: tenant {tenant:?}'s newest checkpoint does not verify with key {key}: {e} \
                 (is --key the log's key?)"
            );
            return Ok(ExitCode::from(USAGE));
        }
    };
    let size = signed.checkpoint.size;
    // Events past the tenant's retention are no longer served, by export either; with their
    // payloads missing and no receipt yet, the bundle would not verify. Expiry drops them
    // within a quarter interval, with the receipts that vouch for them.
    let hidden = store.hidden_count(tenant).await?;
    if hidden > 0 {
        eprintln!(
            "error: tenant {tenant:?} has {hidden} events past its retention that expiry has not \
             dropped yet (no longer served); run `auditbridge retention run` (or wait for the \
             worker's next run) and export again"
        );
        return Ok(ExitCode::from(UNREADABLE));
    }
    match std::fs::read_dir(out) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                eprintln!(
                    "error: --out {}: the directory is not empty (a bundle is written to a new \
                     or empty directory)",
                    out.display()
                );
                return Ok(ExitCode::from(USAGE));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::create_dir_all(out)
            .with_context(|| format!("creating --out {}", out.display()))?,
        Err(e) => return Err(e).with_context(|| format!("reading --out {}", out.display())),
    }
    let create = |name: &str| -> anyhow::Result<BufWriter<File>> {
        let path = out.join(name);
        Ok(BufWriter::with_capacity(
            1 << 20,
            File::create(&path).with_context(|| format!("creating {}", path.display()))?,
        ))
    };
    let mut events = create(EVENTS)?;
    let mut leaves = create(LEAVES)?;
    let (mut next, mut gone, mut missing) = (0u64, 0u64, 0u64);
    while next < size {
        let batch = store.logged_events(tenant, next, size, BATCH).await?;
        let Some(last) = batch.last().map(|e| e.index) else {
            break;
        };
        for entry in &batch {
            while next < entry.index {
                events.write_all(b"\n")?;
                leaves.write_all(b"- -\n")?;
                missing += 1;
                next += 1;
            }
            write_entry(&mut events, &mut leaves, entry, &mut gone)?;
            next = entry.index + 1;
        }
        next = next.max(last + 1);
    }
    let written = next;
    // After the events: every drop that removed one of them committed its receipts with it.
    let mut receipts = create(RECEIPTS)?;
    let mut expired = 0u64;
    for r in store.receipts(Some(tenant)).await? {
        expired += u64::try_from(r.events).unwrap_or(0);
        serde_json::to_writer(
            &mut receipts,
            &serde_json::json!({"id": r.id, "signed": r.signed, "note": r.note}),
        )?;
        receipts.write_all(b"\n")?;
    }
    let gone = gone.saturating_sub(expired);
    for (name, mut w) in [(EVENTS, events), (LEAVES, leaves), (RECEIPTS, receipts)] {
        w.flush()?;
        w.get_ref()
            .sync_all()
            .with_context(|| format!("writing {name}"))?;
    }
    std::fs::write(out.join(CHECKPOINT), &stored.note)?;
    std::fs::write(out.join(KEY), format!("{key}\n"))?;
    std::fs::write(out.join(README), readme(tenant, size))?;
    if gone + missing > 0 || written < size {
        eprintln!(
            "warning: the log of tenant {tenant:?} is damaged: {missing} entries missing, {gone} \
             events gone, {} of {size} entries written; `auditbridge log verify` will say where",
            written
        );
    }
    println!(
        "exported tenant {tenant}: {written} events to {}, checkpoint of size {size} signed at {}",
        out.display(),
        signed.signed_at.map_or("an unknown time".into(), unix_time)
    );
    Ok(ExitCode::SUCCESS)
}

fn write_entry(
    events: &mut impl std::io::Write,
    leaves: &mut impl std::io::Write,
    entry: &LoggedEvent,
    gone: &mut u64,
) -> std::io::Result<()> {
    let leaf = STANDARD.encode(&entry.leaf_hash);
    match &entry.event {
        Some(body) => {
            // jsonb's text form never holds a raw newline; one would split the line.
            if body.text.contains('\n') {
                return Err(std::io::Error::other(format!(
                    "event {} holds a raw newline: it cannot be one line",
                    entry.event_id
                )));
            }
            events.write_all(body.text.as_bytes())?;
            events.write_all(b"\n")?;
            let p = &body.position;
            writeln!(leaves, "{leaf} {} {} {}", p.generation, p.tx_id, p.seq)
        }
        None => {
            *gone += 1;
            events.write_all(b"\n")?;
            writeln!(leaves, "{leaf} -")
        }
    }
}

fn readme(tenant: &str, size: u64) -> String {
    format!(
        "Auditbridge log bundle of tenant {tenant}: {size} events.\n\n\
         {EVENTS}: the events in log order, index 0 first, one per line: each line without its\n\
         newline is the exact bytes of the event's leaf, SHA-256(0x00 || bytes) (RFC 6962).\n\
         {CHECKPOINT}: a C2SP tlog-checkpoint as a C2SP signed-note (Ed25519), origin\n\
         <log name>/{tenant}; its root is the RFC 6962 Merkle tree hash of the {size} leaves.\n\
         {KEY}: the log's verifier key, for reference; verify with the key you trust.\n\
         {LEAVES}: per index, the log's stored leaf hash (base64) and the event's commit order;\n\
         not signed, only for naming what differs.\n\
         {RECEIPTS}: the retention receipts (C2SP signed notes): an event that expired under\n\
         one has an empty line in {EVENTS}; its leaf still counts towards the root.\n\n\
         Check it: auditbridge log verify <this directory> --key <verifier key>\n"
    )
}

/// Checks the bundle in `dir` against `key`, with no database.
pub(crate) fn verify(dir: &Path, key: &VerifierKey) -> ExitCode {
    for name in [CHECKPOINT, EVENTS] {
        let path = dir.join(name);
        match std::fs::metadata(&path) {
            Ok(m) if m.is_file() && (name != CHECKPOINT || m.len() <= MAX_NOTE) => {}
            Ok(m) if m.is_file() => {
                eprintln!(
                    "error: {} is {} bytes: not a checkpoint note",
                    path.display(),
                    m.len()
                );
                return ExitCode::from(UNREADABLE);
            }
            Ok(_) => {
                eprintln!("error: {} is not a regular file", path.display());
                return ExitCode::from(UNREADABLE);
            }
            Err(e) => {
                eprintln!("error: cannot read {}: {e}", path.display());
                return ExitCode::from(UNREADABLE);
            }
        }
    }
    let note = match read_text(&dir.join(CHECKPOINT)) {
        Ok(n) => n,
        Err(code) => return code,
    };
    let signed = match open_checkpoint(&note, key) {
        Ok(s) => s,
        Err(e) => {
            println!(
                "TAMPERED {}: the checkpoint does not verify with key {key}: {e}",
                dir.join(CHECKPOINT).display()
            );
            return ExitCode::from(TAMPERED);
        }
    };
    let checkpoint = &signed.checkpoint;
    let Some(tenant) = origin_tenant(&checkpoint.origin, key) else {
        println!(
            "TAMPERED {}: its origin {:?} is not <{}>/<tenant>: not a checkpoint of this log",
            dir.join(CHECKPOINT).display(),
            checkpoint.origin,
            key.name()
        );
        return ExitCode::from(TAMPERED);
    };
    if let Ok(theirs) = std::fs::read_to_string(dir.join(KEY))
        && theirs.trim() != key.to_string()
    {
        eprintln!(
            "note: the bundle's {KEY} is {:?}, not the key you gave; only yours counts",
            theirs.trim()
        );
    }
    let events_path = dir.join(EVENTS);
    let mut events = match File::open(&events_path) {
        Ok(f) => BufReader::with_capacity(1 << 20, f),
        Err(e) => {
            eprintln!("error: cannot read {}: {e}", events_path.display());
            return ExitCode::from(UNREADABLE);
        }
    };
    let leaves_path = dir.join(LEAVES);
    let mut leaves = match File::open(&leaves_path) {
        Ok(f) if f.metadata().is_ok_and(|m| m.is_file()) => {
            Some(BufReader::with_capacity(1 << 20, f))
        }
        _ => {
            eprintln!(
                "note: no {LEAVES}: a difference is still found, but only the root can show it"
            );
            None
        }
    };
    let mut replay = Replay::new(tenant).with_unsigned_stored();
    replay.expect(
        checkpoint.size,
        checkpoint.root,
        format!(
            "the checkpoint (signed at {})",
            signed.signed_at.map_or("an unknown time".into(), unix_time)
        ),
    );
    let (mut line, mut leaf_line) = (Vec::new(), Vec::new());
    let mut index = 0u64;
    loop {
        match read_line(&mut events, &mut line, MAX_EVENT_LINE) {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => {
                eprintln!(
                    "error: cannot read line {} of {}: {e}",
                    index + 1,
                    events_path.display()
                );
                return ExitCode::from(UNREADABLE);
            }
        }
        let (stored, position) = match leaves.as_mut() {
            None => (None, None),
            Some(l) => match read_line(l, &mut leaf_line, MAX_LEAF_LINE) {
                Ok(true) => parse_leaf_line(&String::from_utf8_lossy(&leaf_line)),
                Ok(false) => (None, None),
                Err(e) => {
                    eprintln!(
                        "error: cannot read line {} of {}: {e}",
                        index + 1,
                        leaves_path.display()
                    );
                    return ExitCode::from(UNREADABLE);
                }
            },
        };
        let head: Option<Head> = serde_json::from_slice(&line).ok();
        let event_id = head.as_ref().and_then(|h| h.id);
        if index == checkpoint.size {
            replay.find(
                Some(index),
                event_id,
                format!(
                    "the bundle has events beyond the checkpoint's {}",
                    checkpoint.size
                ),
            );
        }
        if let Some(h) = &head
            && h.tenant.as_deref() != Some(tenant)
        {
            replay.find(
                Some(index),
                event_id,
                format!(
                    "the event is not of tenant {tenant} (it says {:?})",
                    h.tenant
                ),
            );
        }
        if index < checkpoint.size {
            replay.push(Entry {
                index,
                event_id,
                bytes: (!line.is_empty()).then_some(line.as_slice()),
                stored_leaf: stored.as_deref(),
                position,
            });
        }
        index += 1;
    }
    if let Err(code) = vouch_from_receipts(&dir.join(RECEIPTS), key, tenant, &mut replay) {
        return code;
    }
    let outcome = replay.finish();
    if outcome.found > 0 && outcome.found == outcome.soft {
        // Only the unsigned leaves.txt disagrees; the signed root holds.
        for f in &outcome.findings {
            eprintln!("note: {LEAVES} (not signed) disagrees: {f}");
        }
    }
    if outcome.found == outcome.soft {
        println!(
            "verified: tenant {tenant}, {} events reproduce the checkpoint signed by {} at {}",
            outcome.size,
            key.name(),
            signed.signed_at.map_or("an unknown time".into(), unix_time)
        );
        ExitCode::SUCCESS
    } else {
        outcome.print_findings();
        ExitCode::from(TAMPERED)
    }
}

/// Reads the bundle's receipts (none if the file is missing): each signed by `key` for
/// `tenant` vouches for its indexes; any other is a finding.
fn vouch_from_receipts(
    path: &Path,
    key: &VerifierKey,
    tenant: &str,
    replay: &mut Replay,
) -> Result<(), ExitCode> {
    #[derive(serde::Deserialize)]
    struct Line {
        note: String,
    }
    let file = match File::open(path) {
        Ok(f) if f.metadata().is_ok_and(|m| m.is_file()) => f,
        _ => return Ok(()),
    };
    let mut reader = BufReader::new(file);
    let mut line = Vec::new();
    for n in 1..=MAX_RECEIPTS {
        match read_line(&mut reader, &mut line, MAX_RECEIPT_LINE) {
            Ok(true) => {}
            Ok(false) => return Ok(()),
            Err(e) => {
                eprintln!("error: cannot read line {n} of {}: {e}", path.display());
                return Err(ExitCode::from(UNREADABLE));
            }
        }
        let note = match serde_json::from_slice::<Line>(&line) {
            Ok(l) => l.note,
            Err(e) => {
                replay.find(
                    None,
                    None,
                    format!("{RECEIPTS} line {n} is not a receipt: {e}"),
                );
                continue;
            }
        };
        match super::receipts::vouched(&note, key, tenant) {
            Ok(ranges) => replay.vouch(&ranges),
            Err(why) => replay.find(
                None,
                None,
                format!("{RECEIPTS} line {n} does not count: {why}"),
            ),
        }
    }
    eprintln!(
        "error: {} has more than {MAX_RECEIPTS} receipts",
        path.display()
    );
    Err(ExitCode::from(UNREADABLE))
}

/// What `verify` reads of an event: enough to name it.
#[derive(serde::Deserialize)]
struct Head {
    id: Option<uuid::Uuid>,
    tenant: Option<String>,
}

/// A line of `leaves.txt`: the stored leaf hash and the commit order, each `-` if unknown.
fn parse_leaf_line(line: &str) -> (Option<Vec<u8>>, Option<Position>) {
    let mut parts = line.split(' ');
    let leaf = parts.next().and_then(|l| STANDARD.decode(l).ok());
    let position = match (parts.next(), parts.next(), parts.next()) {
        (Some(g), Some(tx), Some(seq)) => match (g.parse(), tx.parse::<u64>(), seq.parse()) {
            (Ok(g), Ok(_), Ok(seq)) => Some(Position::new(g, tx, seq)),
            _ => None,
        },
        _ => None,
    };
    (leaf, position)
}

/// Reads one line into `line` (without its newline), at most `max` bytes; false at the end.
fn read_line(
    reader: &mut impl std::io::BufRead,
    line: &mut Vec<u8>,
    max: u64,
) -> std::io::Result<bool> {
    use std::io::{BufRead as _, Read as _};
    line.clear();
    let n = reader.by_ref().take(max + 1).read_until(b'\n', line)?;
    if n == 0 {
        return Ok(false);
    }
    if line.last() == Some(&b'\n') {
        line.pop();
    } else if line.len() as u64 > max {
        return Err(std::io::Error::other(format!(
            "the line is longer than {max} bytes"
        )));
    }
    Ok(true)
}
