//! Database work per token: each token may run at most a few statements on `serve`'s pool
//! at once, so one token's deep replays, stats or pages cannot take every connection and
//! starve the others.
//!
//! Keyed by the token's configured name (what [`crate::auth`] resolves), so a token is one
//! budget however many connections it opens. The map holds one entry per configured token
//! that has been used: bounded by the configuration, never by requests.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::ApiError;

/// How long a request waits for its token's turn before it is answered 429: long enough for
/// a short statement to finish, short enough that a client is never left waiting unbounded.
const REQUEST_WAIT: Duration = Duration::from_secs(2);
/// What a refused request is told to wait, in seconds (`Retry-After`).
const RETRY_AFTER_SECS: u32 = 1;

pub(crate) struct DbBudget {
    per_token: usize,
    /// A `std` mutex: held for a map lookup, never across an `.await`.
    tokens: Mutex<HashMap<String, Arc<Semaphore>>>,
}

impl DbBudget {
    /// A budget for a pool of `pool_size` connections: a token may use a quarter of it (at
    /// least one), so it takes three others at least to fill the pool.
    pub(crate) fn new(pool_size: u32) -> DbBudget {
        DbBudget {
            per_token: (pool_size as usize / 4).max(1),
            tokens: Mutex::new(HashMap::new()),
        }
    }

    fn semaphore(&self, token: &str) -> Arc<Semaphore> {
        let mut tokens = self.tokens.lock().expect("not poisoned");
        tokens
            .entry(token.to_owned())
            .or_insert_with(|| Arc::new(Semaphore::new(self.per_token)))
            .clone()
    }

    /// A turn for one request's statement; a token that already runs its share for longer
    /// than [`REQUEST_WAIT`] gets a 429 with `Retry-After`, not an unbounded wait.
    pub(crate) async fn request(&self, token: &str) -> Result<OwnedSemaphorePermit, ApiError> {
        let semaphore = self.semaphore(token);
        match tokio::time::timeout(REQUEST_WAIT, semaphore.acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(ApiError::TooBusy {
                retry_after: RETRY_AFTER_SECS,
                message: format!(
                    "token {token:?} already runs {} database queries at once; retry later",
                    self.per_token
                ),
            }),
        }
    }

    /// A turn for one statement of a live tail's replay. A tail waits as long as it takes
    /// (it is a background reader whose client is already answered), one statement at a
    /// time, so a token's many tails share its budget with its requests.
    pub(crate) async fn tail(&self, token: &str) -> OwnedSemaphorePermit {
        self.semaphore(token)
            .acquire_owned()
            .await
            .expect("the semaphore is never closed")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_token_over_its_share_is_refused_and_others_are_not() {
        let budget = DbBudget::new(8);
        assert_eq!(budget.per_token, 2);
        let _a = budget.request("a").await.unwrap();
        let _b = budget.tail("a").await;
        let started = tokio::time::Instant::now();
        let refused = budget.request("a").await.unwrap_err();
        assert!(matches!(refused, ApiError::TooBusy { .. }), "{refused}");
        assert!(started.elapsed() >= REQUEST_WAIT);
        // Another token is not affected.
        let _c = budget.request("b").await.unwrap();
        drop(_a);
        let _d = budget.request("a").await.unwrap();
    }
}
