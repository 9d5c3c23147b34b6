//! Waiting in tests: poll a condition until it holds or a deadline passes, then fail
//! saying what never came. Tests wait for what they need this way, never with a fixed
//! sleep that is too short on a loaded machine and too long everywhere else.

use std::fmt::Display;
use std::future::Future;
use std::time::{Duration, Instant};

/// How long a wait lasts, and how often it looks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Patience {
    pub timeout: Duration,
    pub interval: Duration,
}

impl Patience {
    pub const fn new(timeout: Duration, interval: Duration) -> Self {
        Self { timeout, interval }
    }
}

impl Default for Patience {
    /// 20 s, looking every 10 ms.
    fn default() -> Self {
        Self::new(Duration::from_secs(20), Duration::from_millis(10))
    }
}

/// Polls `condition` every 10 ms until it holds; panics saying `what` never came after
/// 20 s.
pub async fn wait_until<F, Fut>(what: impl Display, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let patience = Patience::default();
    let deadline = tokio::time::Instant::now() + patience.timeout;
    while !condition().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "waited 20 s for {what}"
        );
        tokio::time::sleep(patience.interval).await;
    }
}

/// Polls `probe` until it gives `Ok(value)`, and returns the value. Each `Err` says what
/// the probe saw instead; once `patience.timeout` has passed, the last one is the panic
/// message.
pub async fn wait_until_ok<T, F, Fut>(patience: Patience, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + patience.timeout;
    loop {
        match probe().await {
            Ok(value) => return value,
            Err(seen) => assert!(Instant::now() < deadline, "{seen}"),
        }
        tokio::time::sleep(patience.interval).await;
    }
}

/// [`wait_until_ok`] for code that cannot await (a plain `#[test]` driving a child
/// process): the thread sleeps between polls.
pub fn wait_until_ok_blocking<T, F>(patience: Patience, mut probe: F) -> T
where
    F: FnMut() -> Result<T, String>,
{
    let deadline = Instant::now() + patience.timeout;
    loop {
        match probe() {
            Ok(value) => return value,
            Err(seen) => assert!(Instant::now() < deadline, "{seen}"),
        }
        std::thread::sleep(patience.interval);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn returns_what_the_probe_found() {
        let mut polls = 0;
        let found = wait_until_ok(Patience::default(), || {
            polls += 1;
            let seen = polls;
            async move {
                if seen >= 3 {
                    Ok(seen)
                } else {
                    Err(format!("only {seen} polls"))
                }
            }
        })
        .await;
        assert_eq!(found, 3);
    }

    #[test]
    #[should_panic(expected = "still nothing")]
    fn fails_with_the_last_thing_seen() {
        wait_until_ok_blocking(
            Patience::new(Duration::from_millis(30), Duration::from_millis(5)),
            || Err::<(), _>("still nothing".to_owned()),
        );
    }

    #[tokio::test]
    async fn wait_until_returns_once_the_condition_holds() {
        let mut polls = 0;
        wait_until("three polls", || {
            polls += 1;
            let seen = polls;
            async move { seen >= 3 }
        })
        .await;
        assert_eq!(polls, 3);
    }
}
