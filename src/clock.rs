//! The one place shiftd reads time. Everything that decides *when* takes a [`Clock`], so tests run the
//! daemon on simulated time: [`SimulatedClock`] follows tokio's (pausable) timer and can be stepped like
//! a wall clock that NTP corrects.
//!
//! `clippy.toml` bans `SystemTime::now`, `Instant::now`, `Utc::now` and `Local::now` everywhere else.

use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use chrono::{DateTime, Utc};
use tokio::sync::watch;
use tokio::time::Instant;

/// Wall time (what schedules are about) and monotonic time (what timeouts and elapsed times are about).
pub trait Clock: Send + Sync {
    /// The wall clock: can step (NTP, suspend, an operator's `date -s`).
    fn now(&self) -> DateTime<Utc>;
    /// tokio's monotonic clock: never steps, and pauses with tokio's test time.
    fn monotonic(&self) -> Instant;

    fn system_time(&self) -> SystemTime {
        SystemTime::from(self.now())
    }
}

/// The machine's clocks.
pub struct SystemClock;

impl Clock for SystemClock {
    #[allow(clippy::disallowed_methods)]
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }

    #[allow(clippy::disallowed_methods)]
    fn monotonic(&self) -> Instant {
        Instant::now()
    }
}

/// A wall clock that advances with tokio's timer (so `tokio::time::pause` and auto-advance drive it) from
/// a chosen start, and that a test can step forwards or backwards.
pub struct SimulatedClock {
    origin: Instant,
    wall_at_origin: Mutex<DateTime<Utc>>,
}

impl SimulatedClock {
    /// Wall time `start` now.
    #[allow(clippy::disallowed_methods)]
    pub fn starting_at(start: DateTime<Utc>) -> Self {
        Self {
            origin: Instant::now(),
            wall_at_origin: Mutex::new(start),
        }
    }

    /// Steps the wall clock by `by` (negative: back); monotonic time is unaffected.
    pub fn step(&self, by: chrono::Duration) {
        let mut w = self.wall_at_origin.lock().expect("clock lock");
        *w += by;
    }

    /// Sets the wall clock to `to`.
    pub fn set(&self, to: DateTime<Utc>) {
        let now = self.now();
        self.step(to - now);
    }
}

impl Clock for SimulatedClock {
    fn now(&self) -> DateTime<Utc> {
        let elapsed = self.monotonic().duration_since(self.origin);
        *self.wall_at_origin.lock().expect("clock lock")
            + chrono::Duration::from_std(elapsed).unwrap_or(chrono::Duration::MAX)
    }

    #[allow(clippy::disallowed_methods)]
    fn monotonic(&self) -> Instant {
        Instant::now()
    }
}

/// In the last minute before the instant, [`sleep_until`] re-reads the wall clock every second; before
/// that, every minute (a long wait, such as a credential renewal an hour away, wakes once a minute).
const NEAR: Duration = Duration::from_secs(60);
const RECHECK_NEAR: Duration = Duration::from_secs(1);
const RECHECK_FAR: Duration = Duration::from_secs(60);

/// Sleeps until `clock`'s wall clock reads `at`, re-reading it as it goes so that a step of the wall
/// clock moves the wake-up with it: forward, it wakes within a second of the instant in its last
/// minute (within a minute before that); back, it keeps waiting. Returns true once the instant is
/// reached (at once when it has passed), false when `cancel` turns true first (a dropped sender
/// cancels nothing).
pub async fn sleep_until(
    clock: &dyn Clock,
    at: DateTime<Utc>,
    cancel: Option<&mut watch::Receiver<bool>>,
) -> bool {
    let cancelled = async move {
        if let Some(rx) = cancel
            && rx.wait_for(|c| *c).await.is_ok()
        {
            return;
        }
        std::future::pending().await
    };
    tokio::pin!(cancelled);
    loop {
        let left = (at - clock.now()).to_std().unwrap_or_default();
        if left.is_zero() {
            return true;
        }
        let recheck = if left <= NEAR {
            RECHECK_NEAR
        } else {
            RECHECK_FAR
        };
        tokio::select! {
            () = tokio::time::sleep(left.min(recheck)) => {}
            () = &mut cancelled => return false,
        }
    }
}

/// `d` as chrono's duration, saturating (configured durations are bounded, but never panic on one).
pub fn chrono_duration(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-12-01T20:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    fn secs(s: i64) -> chrono::Duration {
        chrono::Duration::seconds(s)
    }

    #[tokio::test(start_paused = true)]
    async fn simulated_wall_time_follows_paused_tokio_time_and_steps() {
        let start = start();
        let clock = SimulatedClock::starting_at(start);
        assert_eq!(clock.now(), start);
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert_eq!(clock.now(), start + chrono::Duration::hours(1));
        let mono = clock.monotonic();
        clock.step(chrono::Duration::minutes(-30));
        assert_eq!(clock.now(), start + chrono::Duration::minutes(30));
        assert_eq!(
            clock.monotonic(),
            mono,
            "a wall step leaves monotonic time alone"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn sleep_until_reaches_the_instant() {
        let clock = SimulatedClock::starting_at(start());
        let at = start() + secs(3600 + 30);
        assert!(sleep_until(&clock, at, None).await);
        assert_eq!(clock.now(), at);
        // An instant already past: at once.
        let mono = clock.monotonic();
        assert!(sleep_until(&clock, at - secs(10), None).await);
        assert_eq!(clock.monotonic(), mono);
    }

    #[tokio::test(start_paused = true)]
    async fn a_wall_clock_stepped_forward_wakes_sleep_until_early_enough() {
        // In the last minute: within a second of the wall clock reading the instant.
        let clock = SimulatedClock::starting_at(start());
        let at = start() + secs(30);
        let step = async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            clock.step(secs(20));
        };
        let (reached, ()) = tokio::join!(sleep_until(&clock, at, None), step);
        assert!(reached);
        assert!(
            clock.now() >= at && clock.now() <= at + secs(1),
            "woke at {}",
            clock.now()
        );

        // An hour ahead, stepped forward by half an hour: within a minute of it.
        let clock = SimulatedClock::starting_at(start());
        let at = start() + secs(3600);
        let step = async {
            tokio::time::sleep(Duration::from_secs(600)).await;
            clock.step(secs(1800));
        };
        let (reached, ()) = tokio::join!(sleep_until(&clock, at, None), step);
        assert!(reached);
        assert!(
            clock.now() >= at && clock.now() <= at + secs(60),
            "woke at {}",
            clock.now()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_wall_clock_stepped_back_keeps_sleep_until_waiting() {
        let clock = SimulatedClock::starting_at(start());
        let mono = clock.monotonic();
        let at = start() + secs(30);
        let step = async {
            tokio::time::sleep(Duration::from_secs(10)).await;
            clock.step(secs(-3600));
        };
        let (reached, ()) = tokio::join!(sleep_until(&clock, at, None), step);
        assert!(reached);
        assert_eq!(clock.now(), at, "woke when the wall clock read the instant");
        assert_eq!(
            clock.monotonic().duration_since(mono),
            Duration::from_secs(3600 + 30)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_sleep_until_returns_false_and_a_dropped_sender_cancels_nothing() {
        let clock = SimulatedClock::starting_at(start());
        let at = start() + secs(60);
        let (tx, mut rx) = watch::channel(false);
        let cancel = async {
            tokio::time::sleep(Duration::from_secs(10)).await;
            tx.send(true).unwrap();
        };
        let (reached, ()) = tokio::join!(sleep_until(&clock, at, Some(&mut rx)), cancel);
        assert!(!reached);
        assert_eq!(clock.now(), start() + secs(10));

        let (tx, mut rx) = watch::channel(false);
        drop(tx);
        assert!(sleep_until(&clock, at, Some(&mut rx)).await);
        assert_eq!(clock.now(), at);
    }
}
