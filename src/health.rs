//! Heartbeats: how `/healthz` knows that each worker and the binder are alive
//! and responsive, not merely that their threads exist.
//!
//! A worker beats once per loop turn, and its wait is bounded by [`BEAT_EVERY`]
//! so an idle worker beats too; the binder beats once per message and at least
//! every [`BEAT_EVERY`] while idle. A heartbeat older than [`STALE_AFTER`] means
//! the thread is stuck (or gone): `/healthz` answers 503 naming it.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Longest a healthy worker or binder goes without a heartbeat (1 s).
pub const BEAT_EVERY: Duration = Duration::from_secs(1);
/// A heartbeat older than this makes `/healthz` answer 503 (2 s).
pub const STALE_AFTER: Duration = Duration::from_secs(2);

/// The process's reference instant for heartbeats.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// The time of a thread's last sign of life, in ms since a process-wide epoch.
/// A new heartbeat counts as a beat now.
#[derive(Debug)]
pub struct Heartbeat(AtomicU64);

impl Default for Heartbeat {
    fn default() -> Heartbeat {
        let h = Heartbeat(AtomicU64::new(0));
        h.beat();
        h
    }
}

impl Heartbeat {
    /// Records a sign of life now.
    pub fn beat(&self) {
        self.beat_at(Instant::now());
    }

    /// Records a sign of life at `now` (a time the caller read anyway: a worker
    /// beats with its loop's clock, no extra clock read per turn).
    pub fn beat_at(&self, now: Instant) {
        let ms =
            u64::try_from(now.saturating_duration_since(epoch()).as_millis()).unwrap_or(u64::MAX);
        self.0.store(ms, Relaxed);
    }

    /// How long ago the last beat was.
    pub fn age(&self) -> Duration {
        let now = epoch().elapsed().as_millis();
        let last = u128::from(self.0.load(Relaxed));
        Duration::from_millis(u64::try_from(now.saturating_sub(last)).unwrap_or(u64::MAX))
    }

    /// Whether the last beat is older than [`STALE_AFTER`].
    pub fn stale(&self) -> bool {
        self.age() > STALE_AFTER
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_beat_is_fresh_and_ages() {
        let h = Heartbeat::default();
        assert!(!h.stale());
        std::thread::sleep(Duration::from_millis(30));
        assert!(h.age() >= Duration::from_millis(20), "{:?}", h.age());
        h.beat();
        assert!(h.age() < Duration::from_millis(20), "{:?}", h.age());
    }
}
