//! The one way the suite waits for a condition: [`eventually`] (and [`until`], its form for a
//! condition checked without waiting).

use std::time::Duration;

use anyhow::{anyhow, bail, ensure};
use tokio::time::Instant;

/// The pause after the first attempt; it doubles after each attempt up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(10);
/// The longest pause between two attempts.
const MAX_PAUSE: Duration = Duration::from_millis(100);

/// Makes `attempt` until it returns `Ok`, and returns its value.
///
/// An `Err` means "not yet": the error says what the attempt saw (`ensure!(have >= n, "{have}
/// of {n} stored")`), and the attempt is made again after a short pause (10 ms, doubling to
/// 100 ms). Once `timeout` has passed since the start, the wait fails with `what` it waited
/// for and the last attempt's error. An attempt that does not finish within `timeout` counts
/// as a failed one, so the wait is bounded even when an attempt hangs (at most twice
/// `timeout`). A panic inside an attempt (an `assert!` that must hold at every attempt) ends
/// the wait at once.
pub async fn eventually<T>(
    what: &str,
    timeout: Duration,
    mut attempt: impl AsyncFnMut() -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    let mut pause = FIRST_PAUSE;
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let last = match tokio::time::timeout(timeout, attempt()).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(error)) => error,
            Err(_) => anyhow!("the attempt did not finish within {timeout:?}"),
        };
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} ({attempts} attempts) waiting for {what}: {last:#}");
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(MAX_PAUSE);
    }
}

/// [`eventually`] for a condition checked without waiting (a receiver's log, a counter):
/// waits until `check` holds.
pub async fn until(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    eventually(what, timeout, async || {
        ensure!(check(), "not yet");
        Ok(())
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn returns_the_value_once_an_attempt_succeeds() {
        let mut n = 0;
        let got = eventually("the third attempt", Duration::from_secs(5), async || {
            n += 1;
            anyhow::ensure!(n >= 3, "attempt {n}");
            Ok(n)
        })
        .await
        .unwrap();
        assert_eq!(got, 3);
    }

    #[tokio::test]
    async fn names_what_it_waited_for_and_the_last_state() {
        let started = Instant::now();
        let mut n = 0;
        let err = eventually(
            "a miracle",
            Duration::from_millis(300),
            async || -> anyhow::Result<()> {
                n += 1;
                bail!("still {n} short")
            },
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(started.elapsed() >= Duration::from_millis(300), "{err}");
        assert!(err.contains("waiting for a miracle"), "{err}");
        assert!(err.contains(&format!("still {n} short")), "{err}");
    }

    #[tokio::test]
    async fn an_attempt_that_hangs_is_bounded() {
        let err = eventually(
            "a hang",
            Duration::from_millis(100),
            async || -> anyhow::Result<()> { std::future::pending().await },
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(err.contains("did not finish within"), "{err}");
    }
}
