//! One deadline for the whole of a service's stop. `AUDITBRIDGE_SHUTDOWN_TIMEOUT` bounds the
//! stop from the signal to the exit, not each of its steps: an orchestrator that waits that
//! long (Kubernetes' `terminationGracePeriodSeconds`) never has to kill a process that is still
//! draining. Each step runs [`Deadline::within`] the time that is left; a step that does not
//! finish is abandoned with a warning, and what it held is safe to abandon (unacknowledged
//! messages are redelivered, unconfirmed deliveries sent again by the next lease holder).

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

/// The instant a stop must be over by.
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    at: Instant,
    budget: Duration,
}

impl Deadline {
    /// A deadline `budget` from now (call it when the stop begins).
    pub fn after(budget: Duration) -> Deadline {
        Deadline {
            at: Instant::now() + budget,
            budget,
        }
    }

    /// Runs `step` until it finishes or the deadline passes; `None` (and one warning naming
    /// `step`) if the deadline came first.
    pub async fn within<F: Future>(&self, step: &'static str, future: F) -> Option<F::Output> {
        match tokio::time::timeout_at(self.at, future).await {
            Ok(output) => Some(output),
            Err(_) => {
                tracing::warn!(
                    step,
                    timeout = ?self.budget,
                    message = "Gave up on a step of the stop at the shutdown deadline."
                );
                None
            }
        }
    }

    /// The same deadline `reserve` earlier: for a step that must leave time to the steps after
    /// it.
    pub fn sooner_by(&self, reserve: Duration) -> Deadline {
        Deadline {
            at: self.at.checked_sub(reserve).unwrap_or(self.at),
            budget: self.budget.saturating_sub(reserve),
        }
    }

    /// Time left before the deadline (zero once it passed).
    pub fn remaining(&self) -> Duration {
        self.at.saturating_duration_since(Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Steps share one budget: once a slow step used it up, the next gets none.
    #[tokio::test(start_paused = true)]
    async fn steps_share_one_budget() {
        let deadline = Deadline::after(Duration::from_secs(10));
        let first = deadline
            .within("first", tokio::time::sleep(Duration::from_secs(7)))
            .await;
        assert!(first.is_some());
        assert!(deadline.remaining() <= Duration::from_secs(3));
        let second = deadline
            .within("second", tokio::time::sleep(Duration::from_secs(7)))
            .await;
        assert!(second.is_none(), "the second step had only 3 s left");
        assert_eq!(deadline.remaining(), Duration::ZERO);
        let third = deadline.within("third", async { 1 }).await;
        assert_eq!(
            third,
            Some(1),
            "a step that is ready at once still completes"
        );
    }

    /// A step run `sooner_by` a reserve leaves that much to the next one.
    #[tokio::test(start_paused = true)]
    async fn a_reserve_is_left_to_the_next_step() {
        let deadline = Deadline::after(Duration::from_secs(10));
        let first = deadline
            .sooner_by(Duration::from_secs(1))
            .within("first", std::future::pending::<()>())
            .await;
        assert!(first.is_none());
        assert_eq!(deadline.remaining(), Duration::from_secs(1));
    }
}
