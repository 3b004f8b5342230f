//! The start-up check of the PostgreSQL role a service runs as. A superuser or the owner of
//! `audit_events` still works (local development), but it could disable the immutability
//! triggers or place rows behind every cursor, so the operator is told once, by name, which
//! role to use instead.

use auditbridge_store::Store;
use tokio_util::sync::CancellationToken;

/// Waits until the database answers (the service starts while it is down), then logs one
/// warning if the session's role is more than `expected` (`auditbridge_writer` for workers,
/// `auditbridge_reader` for `serve`) needs.
pub async fn warn_if_privileged(
    store: Store,
    service: &'static str,
    expected: &'static str,
    stop: CancellationToken,
) {
    let mut backoff = crate::retry_backoff();
    loop {
        let found = tokio::select! {
            _ = stop.cancelled() => return,
            r = store.session_role() => r,
        };
        match found {
            Ok(role) => {
                match role.warning(expected) {
                    Some(warning) => {
                        tracing::warn!(service, role = %role.name, expected, message = %warning);
                    }
                    None => {
                        tracing::info!(service, role = %role.name, message = "Connected to PostgreSQL with a least-privilege role.");
                    }
                }
                return;
            }
            Err(e) => {
                tracing::debug!(error = %e, message = "Cannot check the database role yet; retrying.");
                let delay = backoff.next().unwrap_or(std::time::Duration::from_secs(5));
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}
