//! Waiting for something to become true, bounded: the one polling loop of the tests. The bound
//! is a time-out against a hung test, not a claim about speed: a loaded 2-core CI machine is
//! late, so give it room (seconds, not milliseconds). Polls promptly at first (1 ms), then
//! backs off to every 20 ms.
//!
//! The async flavours measure time with tokio's clock, so under a paused clock the time-out is
//! virtual time too.

use std::fmt;
use std::time::Duration;

/// What was awaited, for the failure message: a `&str`, a `String`, or a closure that builds
/// the text when the wait fails (to add a log read at that moment).
pub trait What {
    fn describe(&self) -> String;
}

impl What for &str {
    fn describe(&self) -> String {
        (*self).to_owned()
    }
}

impl What for String {
    fn describe(&self) -> String {
        self.clone()
    }
}

impl<F: Fn() -> String> What for F {
    fn describe(&self) -> String {
        self()
    }
}

/// A wait that ran out of time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimedOut {
    pub what: String,
    pub after: Duration,
}

impl fmt::Display for TimedOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "timed out after {:?} waiting for {}", self.after, self.what)
    }
}

impl std::error::Error for TimedOut {}

const FIRST_PAUSE: Duration = Duration::from_millis(1);
const LONGEST_PAUSE: Duration = Duration::from_millis(20);

fn next_pause(pause: Duration) -> Duration {
    (pause * 2).min(LONGEST_PAUSE)
}

/// Polls `condition` until it gives `Some`, for at most `timeout`; the value, or [`TimedOut`].
pub async fn until_some<T>(
    timeout: Duration,
    what: impl What,
    mut condition: impl AsyncFnMut() -> Option<T>,
) -> Result<T, TimedOut> {
    let start = tokio::time::Instant::now();
    let mut pause = FIRST_PAUSE;
    loop {
        if let Some(value) = condition().await {
            return Ok(value);
        }
        if start.elapsed() >= timeout {
            return Err(TimedOut { what: what.describe(), after: timeout });
        }
        tokio::time::sleep(pause).await;
        pause = next_pause(pause);
    }
}

/// [`until_some`], blocking the thread between polls.
pub fn until_some_blocking<T>(
    timeout: Duration,
    what: impl What,
    mut condition: impl FnMut() -> Option<T>,
) -> Result<T, TimedOut> {
    let start = std::time::Instant::now();
    let mut pause = FIRST_PAUSE;
    loop {
        if let Some(value) = condition() {
            return Ok(value);
        }
        if start.elapsed() >= timeout {
            return Err(TimedOut { what: what.describe(), after: timeout });
        }
        std::thread::sleep(pause);
        pause = next_pause(pause);
    }
}

/// Waits until `condition` holds, for at most `timeout`; panics naming `what` if it never does.
pub async fn eventually(timeout: Duration, what: impl What, mut condition: impl AsyncFnMut() -> bool) {
    if let Err(e) = until_some(timeout, what, async || condition().await.then_some(())).await {
        panic!("{e}");
    }
}

/// Waits until `condition` gives a value, for at most `timeout`, and returns it; panics naming
/// `what` if it never does.
pub async fn eventually_some<T>(timeout: Duration, what: impl What, condition: impl AsyncFnMut() -> Option<T>) -> T {
    until_some(timeout, what, condition).await.unwrap_or_else(|e| panic!("{e}"))
}

/// [`eventually`], blocking the thread between polls (for tests without a runtime, and code
/// that must not yield).
pub fn eventually_blocking(timeout: Duration, what: impl What, mut condition: impl FnMut() -> bool) {
    if let Err(e) = until_some_blocking(timeout, what, || condition().then_some(())) {
        panic!("{e}");
    }
}

/// [`eventually_some`], blocking the thread between polls.
pub fn eventually_some_blocking<T>(timeout: Duration, what: impl What, condition: impl FnMut() -> Option<T>) -> T {
    until_some_blocking(timeout, what, condition).unwrap_or_else(|e| panic!("{e}"))
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    #[test]
    fn a_condition_that_holds_returns_at_once_and_one_that_never_does_names_what() {
        let calls = Cell::new(0);
        eventually_blocking(Duration::from_secs(1), "the third call", || {
            calls.set(calls.get() + 1);
            calls.get() == 3
        });
        assert_eq!(calls.get(), 3);
        let err = until_some_blocking(Duration::from_millis(30), "a miracle", || None::<()>).expect_err("never");
        assert_eq!(err.to_string(), "timed out after 30ms waiting for a miracle");
        let panic = std::panic::catch_unwind(|| {
            eventually_blocking(Duration::from_millis(10), || format!("the log to say {}", "hello"), || false)
        })
        .expect_err("panics");
        let text = panic.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(text.contains("waiting for the log to say hello"), "{text}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_async_flavour_waits_in_tokio_time() {
        let start = tokio::time::Instant::now();
        let err = until_some(Duration::from_secs(600), "nothing", || async { None::<()> }).await.expect_err("never");
        assert_eq!(err.after, Duration::from_secs(600));
        assert!(start.elapsed() >= Duration::from_secs(600), "virtual time passed");
        let mut n = 0;
        let got = eventually_some(Duration::from_secs(1), "the second poll", || {
            n += 1;
            let now = n;
            async move { (now == 2).then_some(now) }
        })
        .await;
        assert_eq!(got, 2);
    }
}
