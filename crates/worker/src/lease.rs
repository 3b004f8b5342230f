//! The loop every leased task runs on its `destinations` row (relays, the sequencer and the
//! checkpoint relays): make sure the row exists, compete for its lease, work while holding it
//! with the lease renewed beside the work, and hand it over at shutdown.
//!
//! ```text
//! let mut lease = Lease::new(&store, name, holder, ttl);
//! while let Some(held) = lease.acquire(&shutdown, || store.register_…()).await {
//!     work(held.state.clone(), held.token.clone()).await;   // until the token is cancelled
//!     lease.finish(held, &shutdown).await;
//! }
//! ```

use std::future::Future;
use std::time::Duration;

use auditbridge_store::{DestinationState, Store, StoreError};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

/// A row's lease, as one worker competes for it.
pub(crate) struct Lease<'a> {
    store: &'a Store,
    name: &'a str,
    holder: &'a str,
    ttl: Duration,
    registered: bool,
    failures: u32,
}

/// The lease while it is held: the row's state when it was taken, and a token cancelled when
/// the lease is lost (the renewer could not renew it) or shutdown comes.
pub(crate) struct Held {
    pub state: DestinationState,
    pub token: CancellationToken,
    renewer: tokio::task::JoinHandle<()>,
}

impl<'a> Lease<'a> {
    pub(crate) fn new(store: &'a Store, name: &'a str, holder: &'a str, ttl: Duration) -> Self {
        Lease {
            store,
            name,
            holder,
            ttl,
            registered: false,
            failures: 0,
        }
    }

    /// Registers the row with `register` until that works, then waits until this worker
    /// holds the lease. `None` at shutdown.
    pub(crate) async fn acquire<F>(
        &mut self,
        shutdown: &CancellationToken,
        register: impl Fn() -> F,
    ) -> Option<Held>
    where
        F: Future<Output = Result<bool, StoreError>>,
    {
        loop {
            if shutdown.is_cancelled() {
                return None;
            }
            if !self.registered {
                match register().await {
                    Ok(_) => self.registered = true,
                    Err(e) => {
                        self.failures += 1;
                        if self.failures == 1 || self.failures.is_multiple_of(20) {
                            tracing::warn!(error = %e, row = self.name, message = "Cannot register the task's row yet; retrying.");
                        }
                    }
                }
            }
            if self.registered {
                match self
                    .store
                    .acquire_lease(self.name, self.holder, self.ttl)
                    .await
                {
                    Ok(Some(state)) => {
                        let token = shutdown.child_token();
                        let renewer = tokio::spawn(
                            keep_lease(
                                self.store.clone(),
                                self.name.to_owned(),
                                self.holder.to_owned(),
                                self.ttl,
                                token.clone(),
                            )
                            .in_current_span(),
                        );
                        return Some(Held {
                            state,
                            token,
                            renewer,
                        });
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::debug!(error = %e, row = self.name, message = "Lease check failed.");
                    }
                }
            }
            // Someone else holds it (or the database is away): look again well within a TTL.
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                _ = tokio::time::sleep(self.ttl / 3) => {}
            }
        }
    }

    /// Ends a spell of holding: stops the renewer and, at shutdown, hands the lease over at
    /// once rather than after the TTL.
    pub(crate) async fn finish(&self, held: Held, shutdown: &CancellationToken) {
        held.token.cancel();
        let _ = held.renewer.await;
        if shutdown.is_cancelled() {
            let _ = self.store.release_lease(self.name, self.holder).await;
        }
    }
}

/// Renews the lease every third of its TTL; cancels `held` if it is lost.
async fn keep_lease(
    store: Store,
    name: String,
    holder: String,
    ttl: Duration,
    held: CancellationToken,
) {
    let mut last_ok = std::time::Instant::now();
    loop {
        tokio::select! {
            _ = held.cancelled() => return,
            _ = tokio::time::sleep(ttl / 3) => {}
        }
        match store.renew_lease(&name, &holder, ttl).await {
            Ok(true) => last_ok = std::time::Instant::now(),
            Ok(false) => {
                tracing::warn!(
                    row = %name,
                    message = "The lease was taken (expired or rewound); stopping."
                );
                held.cancel();
                return;
            }
            Err(e) if last_ok.elapsed() >= ttl => {
                tracing::warn!(error = %e, row = %name, message = "Cannot renew the lease before it expires; stopping.");
                held.cancel();
                return;
            }
            Err(_) => {}
        }
    }
}
