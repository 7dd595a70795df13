//! The one place shiftd reads time. Everything that decides *when* takes a [`Clock`], so tests run the
//! daemon on simulated time: [`SimulatedClock`] follows tokio's (pausable) timer and can be stepped like
//! a wall clock that NTP corrects.
//!
//! `clippy.toml` bans `SystemTime::now`, `Instant::now`, `Utc::now` and `Local::now` everywhere else.

use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use chrono::{DateTime, Utc};
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

/// `d` as chrono's duration, saturating (configured durations are bounded, but never panic on one).
pub fn chrono_duration(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn simulated_wall_time_follows_paused_tokio_time_and_steps() {
        let start = DateTime::parse_from_rfc3339("2026-12-01T20:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
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
}
