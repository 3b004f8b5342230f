//! Any bytes through `decode`: no panic, and the properties of
//! `crates/event/src/properties.rs` on whatever comes out.
//!
//! `cargo +nightly fuzz run decode -- -max_total_time=600` (README, "Fuzzing").

#![no_main]

use auditbridge_event::{DEFAULT_MAX_EVENT_BYTES, decode, limits, names_its_subject};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match decode(data, DEFAULT_MAX_EVENT_BYTES) {
        Ok(event) => {
            // Accepted: serializing it decodes to the same event, on its own subject.
            let bytes = serde_json::to_vec(&event).expect("an accepted event serializes");
            let back = decode(&bytes, usize::MAX).expect("a re-serialized event decodes");
            assert_eq!(back, event);
            event
                .check_subject("audit", &event.subject("audit"))
                .expect("an event belongs on its own subject");
            // What the database needs, checked again from outside validation.
            assert!(event.tenant.len() <= limits::TENANT_BYTES);
            assert!(event.action.len() <= limits::ACTION_BYTES);
            assert!(event.actor.id.len() <= limits::ID_BYTES);
            assert!(
                event
                    .target
                    .as_ref()
                    .and_then(|t| t.id.as_ref())
                    .is_none_or(|id| id.len() <= limits::ID_BYTES)
            );
            assert!(event.source.len() <= limits::SOURCE_BYTES);
            let utc = event
                .occurred_at
                .checked_to_offset(time::UtcOffset::UTC)
                .expect("occurred_at is representable in UTC");
            assert!((1..=9999).contains(&utc.year()));
        }
        Err(e) => {
            assert!(
                names_its_subject(&e.detail),
                "a refusal that names nothing: {:?}",
                e.detail
            );
            assert!(!e.detail.contains('\0'));
        }
    }
});
