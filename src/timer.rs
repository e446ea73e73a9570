//! A deadline timer that wakes the daemon once, at the deadline.
//!
//! tokio's timer wheel parks the runtime until the start of the wheel slot that holds a far
//! deadline, then again for each finer level: measured with `cargo bench --bench throughput`,
//! 2 to 3 wake-ups for each scheduled step. A timerfd armed for the exact deadline wakes the
//! thread once. The engine uses it in the daemon; tests on tokio's paused clock keep tokio's
//! timer (see [`crate::engine::Engine::with_timerfd`]).

use std::io;
use std::os::fd::OwnedFd;
use std::time::Duration;

use rustix::time::Timespec;
use rustix::time::{timerfd_create, timerfd_settime, Itimerspec, TimerfdClockId, TimerfdFlags, TimerfdTimerFlags};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::time::Instant;

pub struct DeadlineTimer {
    fd: AsyncFd<OwnedFd>,
    armed: Option<Instant>,
}

impl DeadlineTimer {
    /// A timerfd on CLOCK_MONOTONIC, the clock of [`Instant`].
    pub fn new() -> io::Result<DeadlineTimer> {
        let fd = timerfd_create(TimerfdClockId::Monotonic, TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC)?;
        // SAFETY: the AsyncFd owns this OwnedFd, which nothing else can close or replace.
        let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }?;
        Ok(DeadlineTimer { fd, armed: None })
    }

    /// Completes at `deadline` (at once if it has passed).
    pub async fn sleep_until(&mut self, deadline: Instant) -> io::Result<()> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(());
            }
            if self.armed != Some(deadline) {
                self.set(left)?;
                self.armed = Some(deadline);
            }
            let mut ready = self.fd.readable().await?;
            let mut expirations = [0u8; 8];
            match rustix::io::read(self.fd.get_ref(), &mut expirations) {
                Ok(_) => {
                    self.armed = None;
                    // The timerfd and Instant share CLOCK_MONOTONIC: the deadline has passed,
                    // which the loop confirms before returning.
                }
                Err(rustix::io::Errno::AGAIN) => ready.clear_ready(),
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Nothing is scheduled: a timer still armed for an old deadline would wake the daemon.
    pub fn disarm(&mut self) -> io::Result<()> {
        if self.armed.take().is_some() {
            self.set(Duration::ZERO)?;
        }
        Ok(())
    }

    fn set(&self, after: Duration) -> io::Result<()> {
        let zero = Timespec { tv_sec: 0, tv_nsec: 0 };
        let value = Timespec { tv_sec: after.as_secs() as i64, tv_nsec: after.subsec_nanos().into() };
        timerfd_settime(
            self.fd.get_ref(),
            TimerfdTimerFlags::empty(),
            &Itimerspec { it_interval: zero, it_value: value },
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn fires_at_the_deadline_not_before_and_can_be_moved_or_disarmed() {
        let mut t = DeadlineTimer::new().expect("timerfd");
        let start = Instant::now();
        t.sleep_until(start + Duration::from_millis(30)).await.expect("sleep");
        assert!(start.elapsed() >= Duration::from_millis(30));

        // Armed, then moved earlier before it fires: the earlier deadline wins.
        let far = Instant::now() + Duration::from_secs(60);
        let moved = tokio::time::timeout(Duration::from_millis(50), t.sleep_until(far)).await;
        assert!(moved.is_err(), "the far deadline has not come");
        let near = Instant::now() + Duration::from_millis(20);
        t.sleep_until(near).await.expect("sleep");
        assert!(Instant::now() >= near);

        t.disarm().expect("disarm");
        t.sleep_until(Instant::now()).await.expect("a passed deadline completes at once");
    }
}
