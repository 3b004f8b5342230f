//! The field limits of the event format against the real database: whatever validation
//! accepts, `Store::persist` (the worker's batch writer) stores and the readers read back, at
//! every limit; one byte more is refused by validation, naming the field, the limit and the
//! length, before the database could refuse it and hold a batch.

use anyhow::{Context as _, ensure};
use auditbridge_event::{DEFAULT_MAX_EVENT_BYTES, Event, InvalidKind, decode};
use auditbridge_store::{NewEvent, Store};
use auditbridge_tests::TestEnv;
use uuid::Uuid;

/// An event and the exact bytes it is persisted as.
struct Owned {
    event: Event,
    raw: Vec<u8>,
}

impl Owned {
    fn new(event: Event) -> Owned {
        Owned {
            raw: serde_json::to_vec(&event).expect("an event serializes"),
            event,
        }
    }

    fn from_raw(raw: Vec<u8>) -> anyhow::Result<Owned> {
        let event = decode(&raw, DEFAULT_MAX_EVENT_BYTES)?;
        Ok(Owned { event, raw })
    }
}

fn batch(items: &[Owned]) -> Vec<NewEvent<'_>> {
    items
        .iter()
        .map(|o| NewEvent {
            event: &o.event,
            raw: &o.raw,
            redaction: None,
        })
        .collect()
}

/// Stores `items` through both of the writer's paths and reads each one back by id.
///
/// The first batch goes in by `COPY`. The second repeats an event of the first, which sends
/// the whole batch down the `INSERT ... ON CONFLICT` path (a `COPY` meeting a stored id is
/// rolled back and written again that way), so both encodings of every field are exercised.
async fn store_both_ways(env: &mut TestEnv, items: Vec<Owned>) -> anyhow::Result<()> {
    let store = Store::from_pool(env.pool.clone());
    let (first, second) = items.split_at(items.len() / 2);
    let outcome = store
        .persist(&batch(first), &[])
        .await
        .context("the COPY path refused an event that validation accepted")?;
    ensure!(outcome.inserted == first.len() as u64, "{outcome:?}");

    let seed = Owned::new(env.events(1).remove(0));
    store
        .persist(&batch(std::slice::from_ref(&seed)), &[])
        .await?;
    let mut with_seed = vec![seed];
    with_seed.extend(second.iter().map(|o| Owned {
        event: o.event.clone(),
        raw: o.raw.clone(),
    }));
    let outcome = store
        .persist(&batch(&with_seed), &[])
        .await
        .context("the INSERT path refused an event that validation accepted")?;
    ensure!(
        outcome.inserted == second.len() as u64 && outcome.duplicates == 1,
        "{outcome:?}"
    );

    for item in &items {
        let stored = store
            .event(item.event.id, Some(&item.event.tenant))
            .await?
            .with_context(|| format!("event {} was not stored", item.event.id))?;
        let back = decode(stored.json.as_bytes(), usize::MAX)
            .with_context(|| format!("the stored form of {} does not decode", item.event.id))?;
        ensure!(back == item.event, "{} changed when stored", item.event.id);
    }
    Ok(())
}

/// Replaces a field of the example event through its JSON form.
fn with(event: &Event, path: &[&str], value: serde_json::Value) -> Vec<u8> {
    let mut json = serde_json::to_value(event).unwrap();
    let mut at = &mut json;
    for key in &path[..path.len() - 1] {
        at = &mut at[*key];
    }
    at[path[path.len() - 1]] = value;
    serde_json::to_vec(&json).unwrap()
}

/// A string of exactly `bytes` bytes of UTF-8, mixing one- to four-byte characters (and
/// control characters, which PostgreSQL stores), so that no limit is counted in characters.
fn text_of(bytes: usize) -> String {
    const PIECES: [&str; 6] = ["a", "é", "€", "😀", "\u{1}\t", "\u{7f}"];
    let mut s = String::with_capacity(bytes);
    let mut i = 0;
    while s.len() < bytes {
        let piece = PIECES[i % PIECES.len()];
        if s.len() + piece.len() <= bytes {
            s.push_str(piece);
        } else {
            s.push('a');
        }
        i += 1;
    }
    assert_eq!(s.len(), bytes);
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_3000_character_actor_id_is_refused_by_validation_not_by_the_database()
-> anyhow::Result<()> {
    let mut env = TestEnv::new().await?;
    let event = env.events(1).remove(0);
    // Random, so PostgreSQL cannot compress it below the btree limit.
    let id: String = (0..94)
        .map(|_| Uuid::new_v4().simple().to_string())
        .collect::<String>()[..3000]
        .to_owned();
    let raw = with(&event, &["actor", "id"], serde_json::json!(id));
    let err = decode(&raw, DEFAULT_MAX_EVENT_BYTES).expect_err("a 3000-byte actor.id");
    assert_eq!(err.kind, InvalidKind::Schema);
    assert!(
        err.detail.starts_with("actor.id: 3000 bytes, at most 1024"),
        "{err}"
    );

    // What validation saves the batch from: the index refuses the row (SQLSTATE 54000).
    let unchecked: Event = serde_json::from_slice(&raw)?;
    let store = Store::from_pool(env.pool.clone());
    let refused = store
        .persist(
            &[NewEvent {
                event: &unchecked,
                raw: &raw,
                redaction: None,
            }],
            &[],
        )
        .await
        .expect_err("PostgreSQL refuses an index entry over 2704 bytes");
    assert!(
        refused
            .to_string()
            .contains("exceeds btree version 4 maximum 2704"),
        "{refused}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn times_at_the_ends_of_the_range_are_stored_and_read_back_or_refused() -> anyhow::Result<()>
{
    let mut env = TestEnv::new().await?;
    let base = env.events(1).remove(0);
    let mut accepted = Vec::new();
    for (time, ok) in [
        ("0001-01-01T00:00:00Z", true),
        ("0001-01-01T00:00:00-01:00", true),
        ("9999-12-31T23:59:59.999999Z", true),
        ("9999-12-31T18:59:59-05:00", true),
        ("2016-12-31T23:59:60Z", true),
        ("1970-01-01T00:00:00.000000001+14:00", true),
        ("2026-06-01T00:00:00-15:59", true),
        // PostgreSQL's text input refuses offsets of 16 hours (the COPY path).
        ("2026-06-01T00:00:00+16:00", false),
        // The year 10000 in UTC: PostgreSQL stores it, sqlx panics reading it back.
        ("9999-12-31T23:59:59-05:00", false),
        ("9999-12-31T23:59:59.9999995Z", false),
        // PostgreSQL reads no year 0000, and 0001 at +01:00 is 0000 in UTC.
        ("0000-06-01T00:00:00Z", false),
        ("0001-01-01T00:30:00+01:00", false),
    ] {
        let mut event = base.clone();
        event.id = Uuid::now_v7();
        let raw = with(&event, &["occurred_at"], serde_json::json!(time));
        match decode(&raw, DEFAULT_MAX_EVENT_BYTES) {
            Ok(event) => {
                ensure!(ok, "{time} was accepted");
                accepted.push(Owned { event, raw });
            }
            Err(e) => {
                ensure!(!ok, "{time} was refused: {e}");
                ensure!(e.detail.starts_with("occurred_at: "), "{e}");
            }
        }
    }
    store_both_ways(&mut env, accepted).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_field_at_its_limit_is_stored_and_one_byte_more_is_refused() -> anyhow::Result<()> {
    use auditbridge_event::limits;
    let mut env = TestEnv::new().await?;
    let base = env.events(1).remove(0);
    // (path in the JSON, limit in bytes)
    let fields: [(&[&str], usize); 9] = [
        (&["actor", "id"], limits::ID_BYTES),
        (&["actor", "type"], limits::TYPE_BYTES),
        (&["actor", "name"], limits::NAME_BYTES),
        (&["actor", "user_agent"], limits::USER_AGENT_BYTES),
        (&["target", "id"], limits::ID_BYTES),
        (&["target", "type"], limits::TYPE_BYTES),
        (&["target", "name"], limits::NAME_BYTES),
        (&["source"], limits::SOURCE_BYTES),
        (&["reason"], limits::REASON_BYTES),
    ];
    let request_id: (&[&str], usize) = (&["request_id"], limits::ID_BYTES);

    // One event with every field at its limit at once (the index tuples at their largest),
    // then one per field.
    let mut all = serde_json::to_value(&base)?;
    all["tenant"] = serde_json::json!("t".repeat(limits::TENANT_BYTES));
    let action = format!(
        "{}.{}.{}",
        "a".repeat(limits::ACTION_TOKEN_BYTES),
        "b".repeat(limits::ACTION_TOKEN_BYTES),
        "c".repeat(limits::ACTION_BYTES - 2 * limits::ACTION_TOKEN_BYTES - 2)
    );
    assert_eq!(action.len(), limits::ACTION_BYTES);
    all["action"] = serde_json::json!(action);
    for (path, limit) in fields.iter().chain([&request_id]) {
        let mut at = &mut all;
        for key in &path[..path.len() - 1] {
            at = &mut at[*key];
        }
        at[path[path.len() - 1]] = serde_json::json!(text_of(*limit));
    }
    let mut items = vec![Owned::from_raw(serde_json::to_vec(&all)?)?];
    for (path, limit) in fields.iter().chain([&request_id]) {
        let mut event = base.clone();
        event.id = Uuid::now_v7();
        items.push(Owned::from_raw(with(
            &event,
            path,
            serde_json::json!(text_of(*limit)),
        ))?);

        let raw = with(&event, path, serde_json::json!(text_of(limit + 1)));
        let err = decode(&raw, DEFAULT_MAX_EVENT_BYTES).expect_err("one byte over");
        let field = path.join(".");
        assert_eq!(err.kind, InvalidKind::Schema, "{field}: {err}");
        assert_eq!(
            err.detail,
            format!(
                "{field}: {} bytes, at most {limit} bytes of UTF-8",
                limit + 1
            )
        );
    }
    store_both_ways(&mut env, items).await
}

/// The worst case of every btree index of `audit_events`, from the catalog: the largest entry
/// the field limits allow, counted as PostgreSQL lays it out (8-byte header, the null bitmap,
/// each column aligned, a 4-byte length before each text, nothing compressed), must stay
/// under half of the 2,704 bytes a btree entry may take. A new index on a column the limits
/// do not bound fails here, naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_index_entry_fits_the_btree_limit_with_room_to_spare() -> anyhow::Result<()> {
    use auditbridge_event::limits;
    let env = TestEnv::new().await?;
    /// Index, access method, column (none for an expression), its length and alignment.
    type IndexColumn = (String, String, Option<String>, Option<i16>, Option<String>);
    let columns: Vec<IndexColumn> = sqlx::query_as(
        "SELECT c.relname::text, am.amname::text, a.attname::text, a.attlen, a.attalign::text \
             FROM pg_index i \
             JOIN pg_class c ON c.oid = i.indexrelid \
             JOIN pg_am am ON am.oid = c.relam \
             CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord) \
             LEFT JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
             WHERE i.indrelid IN ('audit_events'::regclass, 'audit_event_ids'::regclass) \
             ORDER BY c.relname, k.ord",
    )
    .fetch_all(&env.pool)
    .await?;
    let text_bound = |column: &str| match column {
        "tenant" => Some(limits::TENANT_BYTES),
        "action" => Some(limits::ACTION_BYTES),
        "outcome" => Some("success".len()),
        "actor_id" | "target_id" => Some(limits::ID_BYTES),
        "source" => Some(limits::SOURCE_BYTES),
        _ => None,
    };
    let align = |at: usize, to: usize| at.div_ceil(to) * to;
    let mut sizes: std::collections::BTreeMap<String, usize> = Default::default();
    for (index, am, column, len, alignment) in columns {
        ensure!(
            am == "btree",
            "{index} is a {am} index: bound its entries here"
        );
        let column =
            column.with_context(|| format!("{index} indexes an expression: bound it here"))?;
        let (len, alignment) = (len.unwrap(), alignment.unwrap());
        // Header and null bitmap, then the columns.
        let at = sizes.entry(index.clone()).or_insert(8 + 4);
        let width = match alignment.as_str() {
            "c" => 1,
            "s" => 2,
            "i" => 4,
            _ => 8,
        };
        if len > 0 {
            *at = align(*at, width) + len as usize;
        } else {
            let bound = text_bound(&column).with_context(|| {
                format!(
                    "{index} indexes {column}, which no field limit bounds: \
                     add one to auditbridge_event::limits"
                )
            })?;
            *at = align(*at, 4) + 4 + bound;
        }
    }
    for (index, size) in &mut sizes {
        *size = align(*size, 8);
        ensure!(
            *size <= limits::BTREE_MAX_ITEM_BYTES / 2,
            "{index}: an entry may take {size} bytes, over half of {}",
            limits::BTREE_MAX_ITEM_BYTES
        );
    }
    for index in [
        "audit_event_ids_pkey",
        "audit_events_tenant_time",
        "audit_events_tenant_actor",
        "audit_events_tenant_action",
        "audit_events_tenant_target",
        "audit_events_outbox_order",
    ] {
        ensure!(sizes.contains_key(index), "{index} is missing: {sizes:?}");
    }
    assert_eq!(sizes["audit_events_tenant_actor"], 1136, "{sizes:?}");
    Ok(())
}

/// The property of issue 9: every event that validation accepts is stored by the worker's
/// batch writer, and nothing it accepts can make a batch fail. 300 batches of 1 to 6 strange
/// events (`auditbridge_event::arb`: fields at their limits in multi-byte and control
/// characters, times at the ends of the range, deep metadata, extreme numbers, also as raw
/// text near the written-out limit, many tenants). Every other batch repeats a stored event,
/// which sends it down the `INSERT` path instead of `COPY`. Each stored event is read back and
/// must decode to the event that was sent.
#[test]
fn whatever_validation_accepts_the_batch_writer_stores() -> anyhow::Result<()> {
    use auditbridge_event::arb;
    use proptest::test_runner::{Config, TestCaseError, TestRunner};

    let runtime = tokio::runtime::Runtime::new()?;
    let env = runtime.block_on(TestEnv::new())?;
    let store = Store::from_pool(env.pool.clone());
    let case = proptest::collection::vec(
        (
            arb::event(),
            proptest::option::weighted(0.3, proptest::collection::vec(arb::raw_number(), 1..4)),
        ),
        1..=6,
    );
    let mut runner = TestRunner::new(Config {
        cases: 300,
        failure_persistence: None,
        ..Config::default()
    });
    let stored_before: std::cell::RefCell<Option<Owned>> = Default::default();
    let started = std::time::Instant::now();
    let (accepted, refused) = (std::cell::Cell::new(0u64), std::cell::Cell::new(0u64));
    let result = runner.run(&case, |events| {
        let mut items = Vec::new();
        for (mut event, numbers) in events {
            // A fresh id, so that shrinking (which drives every id towards the same value)
            // never turns a new event into a duplicate of one stored by an earlier case.
            event.id = Uuid::now_v7();
            let mut raw = serde_json::to_vec(&event).unwrap();
            if let Some(numbers) = numbers {
                raw = arb::raw_numbers(&raw, &numbers);
            }
            match Owned::from_raw(raw) {
                Ok(item) => items.push(item),
                // Raw numbers past the limit: refused by name, never stored.
                Err(_) => refused.set(refused.get() + 1),
            }
        }
        accepted.set(accepted.get() + items.len() as u64);
        let check = async {
            let mut batch_items: Vec<&Owned> = Vec::new();
            let repeat = stored_before.borrow_mut().take();
            if let Some(seen) = &repeat {
                batch_items.push(seen);
            }
            batch_items.extend(items.iter());
            let batch: Vec<NewEvent<'_>> = batch_items
                .iter()
                .map(|o| NewEvent {
                    event: &o.event,
                    raw: &o.raw,
                    redaction: None,
                })
                .collect();
            let outcome = store
                .persist(&batch, &[])
                .await
                .context("persist refused a batch of accepted events")?;
            ensure!(
                outcome.inserted == items.len() as u64
                    && outcome.duplicates == u64::from(repeat.is_some()),
                "{outcome:?} for {} new events",
                items.len()
            );
            for item in &items {
                let stored = store
                    .event(item.event.id, Some(&item.event.tenant))
                    .await?
                    .with_context(|| format!("{} was not stored", item.event.id))?;
                let back = decode(stored.json.as_bytes(), usize::MAX)
                    .with_context(|| format!("the stored {} does not decode", item.event.id))?;
                ensure!(
                    same_value(
                        &serde_json::to_value(&back)?,
                        &serde_json::to_value(&item.event)?
                    ),
                    "{} changed when stored:\nsent   {}\nstored {}",
                    item.event.id,
                    String::from_utf8_lossy(&item.raw),
                    stored.json
                );
            }
            anyhow::Ok(())
        };
        runtime
            .block_on(check)
            .map_err(|e| TestCaseError::fail(format!("{e:#}")))?;
        // Every other batch starts with an event already stored.
        if repeat_next(&items) {
            let first = &items[0];
            *stored_before.borrow_mut() = Some(Owned {
                event: first.event.clone(),
                raw: first.raw.clone(),
            });
        }
        Ok(())
    });
    let (accepted, refused) = (accepted.get(), refused.get());
    eprintln!(
        "{accepted} events stored, {refused} refused, in {:?}",
        started.elapsed()
    );
    result.map_err(|e| anyhow::anyhow!("{e}"))?;
    ensure!(accepted >= 300, "only {accepted} events were accepted");
    let stored = runtime.block_on(env.count())?;
    ensure!(
        stored as u64 == accepted,
        "{stored} rows for {accepted} events"
    );
    drop(env);
    Ok(())
}

/// Equal as JSON values, numbers compared by value: `jsonb` stores a number as a `numeric`
/// and writes it back in its own form (`1E+2` as `100`, `-0` as `0`), which serde then reads
/// as an integer where the payload had a float.
fn same_value(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    use serde_json::Value;
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x == y || x.as_f64() == y.as_f64(),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same_value(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| same_value(v, w)))
        }
        _ => a == b,
    }
}

fn repeat_next(items: &[Owned]) -> bool {
    items.first().is_some_and(|o| o.event.id.as_u128() % 2 == 0)
}
