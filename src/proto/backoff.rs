//! Back-off decisions, without I/O and without reading the clock: how long a send
//! that found no room waits before it is tried again, when such a send has waited
//! too long ([`SendBackoff`]), and which upstream a new session connects to while
//! some are skipped for having just failed ([`UpstreamChoice`]). The caller passes
//! the time (`now`): the drivers the current time, the tests a fake clock.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// Longest wait between tries of a send that finds no room (ms, a power of two).
pub const SEND_RETRY_MAX_MS: u64 = 64;
/// How long a one-to-many SCTP socket waits for room for one association's
/// message before it aborts that association.
pub const SEND_STALL_LIMIT: Duration = Duration::from_secs(5);
/// How long an upstream that refused or timed out is skipped (ms).
pub const UPSTREAM_BACKOFF_MS: u64 = 3000;

/// The sends of one socket that found no room (EAGAIN, nothing sent) in a row.
///
/// An SCTP message is sent whole, and writability (POLLOUT) only means "some
/// room", so a send may find no room again and again; it is retried after a wait
/// that doubles per try, from 1 ms up to [`SEND_RETRY_MAX_MS`]. On a one-to-many
/// socket the room is shared by every association (net.sctp.sndbuf_policy 0), so
/// one association whose peer takes nothing for [`SEND_STALL_LIMIT`] would hold
/// up all the others: [`SendBackoff::stalled`] says when to give up on it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SendBackoff {
    /// When the first send of the current run found no room, and how many did.
    blocked: Option<(Instant, u32)>,
}

impl SendBackoff {
    /// A send found no room at `now`. Returns how long to wait before trying it
    /// again: 1 ms for the first in a row, doubling per consecutive one, at most
    /// [`SEND_RETRY_MAX_MS`] ms.
    pub fn no_room(&mut self, now: Instant) -> Duration {
        let (since, tries) = self.blocked.unwrap_or((now, 0));
        self.blocked = Some((since, tries.saturating_add(1)));
        Duration::from_millis(1u64 << tries.min(SEND_RETRY_MAX_MS.trailing_zeros()))
    }

    /// Whether sends have found no room for [`SEND_STALL_LIMIT`] or longer at
    /// `now`, counted from the first of the current run of [`SendBackoff::no_room`].
    pub fn stalled(&self, now: Instant) -> bool {
        self.blocked
            .is_some_and(|(since, _)| now.saturating_duration_since(since) >= SEND_STALL_LIMIT)
    }

    /// A send went out (or the one waiting was given up): the next run of sends
    /// without room starts from 1 ms again.
    pub fn reset(&mut self) {
        self.blocked = None;
    }

    /// Sends that found no room in a row (count; 0 after [`SendBackoff::reset`]).
    pub fn tries(&self) -> u32 {
        self.blocked.map_or(0, |(_, n)| n)
    }
}

/// Round-robin choice among the upstreams of one proxy listener, skipping for
/// [`UPSTREAM_BACKOFF_MS`] one that refused a connect or timed out.
///
/// Shared by every worker (behind an `Arc`): its state is atomics, updated with
/// relaxed ordering; two workers picking at once may both get the same upstream,
/// which only makes the rotation less even.
#[derive(Debug)]
pub struct UpstreamChoice {
    addrs: Vec<SocketAddr>,
    next: AtomicUsize,
    /// Per address: skipped until this many ms after `epoch` (0: usable).
    down_until_ms: Vec<AtomicU64>,
    epoch: Instant,
}

impl UpstreamChoice {
    /// A choice among `addrs` (in config order; must not be empty for
    /// [`UpstreamChoice::pick`]), with times counted from `epoch` (any instant
    /// not later than the first `now` passed).
    pub fn new(addrs: Vec<SocketAddr>, epoch: Instant) -> UpstreamChoice {
        UpstreamChoice {
            down_until_ms: addrs.iter().map(|_| AtomicU64::new(0)).collect(),
            addrs,
            next: AtomicUsize::new(0),
            epoch,
        }
    }

    /// The addresses, in config order.
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// `now` in ms after the epoch, plus 1 so that 0 always means "usable".
    fn ms(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_millis() as u64 + 1
    }

    /// The next upstream at `now`, round-robin, skipping those in back-off; if
    /// all are in back-off, the next one anyway.
    ///
    /// # Panics
    /// There are no addresses (the config requires at least one upstream).
    pub fn pick(&self, now: Instant) -> SocketAddr {
        let n = self.addrs.len();
        let start = self.next.fetch_add(1, Relaxed);
        let now = self.ms(now);
        (0..n)
            .map(|i| (start + i) % n)
            .find(|&i| self.down_until_ms[i].load(Relaxed) <= now)
            .map_or(self.addrs[start % n], |i| self.addrs[i])
    }

    /// `addr` refused a connect or timed out at `now`: skip it for
    /// [`UPSTREAM_BACKOFF_MS`]. An address not in the set is ignored.
    pub fn mark_down(&self, addr: SocketAddr, now: Instant) {
        if let Some(i) = self.addrs.iter().position(|a| *a == addr) {
            let until = self.ms(now) + UPSTREAM_BACKOFF_MS;
            self.down_until_ms[i].store(until, Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn send_backoff_doubles_caps_and_resets() {
        let t0 = Instant::now();
        let mut b = SendBackoff::default();
        let waits: Vec<u64> = (0..9).map(|_| b.no_room(t0).as_millis() as u64).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 64, 64, 64]);
        assert_eq!(b.tries(), 9);
        b.reset();
        assert_eq!(b.no_room(t0), Duration::from_millis(1));
    }

    #[test]
    fn send_backoff_stalls_from_the_first_eagain_in_a_row() {
        let t0 = Instant::now();
        let mut b = SendBackoff::default();
        assert!(!b.stalled(t0 + SEND_STALL_LIMIT), "not blocked: no stall");
        b.no_room(t0);
        b.no_room(t0 + Duration::from_secs(3));
        assert!(!b.stalled(t0 + SEND_STALL_LIMIT - Duration::from_millis(1)));
        assert!(b.stalled(t0 + SEND_STALL_LIMIT));
        b.reset();
        b.no_room(t0 + SEND_STALL_LIMIT);
        assert!(!b.stalled(t0 + SEND_STALL_LIMIT + Duration::from_secs(1)));
    }

    fn addrs(n: u16) -> Vec<SocketAddr> {
        (1..=n)
            .map(|p| SocketAddr::from(([127, 0, 0, 1], p)))
            .collect()
    }

    #[test]
    fn upstream_round_robin_skips_one_in_back_off_until_it_ends() {
        let t0 = Instant::now();
        let a = addrs(3);
        let c = UpstreamChoice::new(a.clone(), t0);
        let picks: Vec<_> = (0..6).map(|_| c.pick(t0)).collect();
        assert_eq!(picks, [a[0], a[1], a[2], a[0], a[1], a[2]]);
        c.mark_down(a[1], t0);
        let t1 = t0 + Duration::from_millis(UPSTREAM_BACKOFF_MS - 1);
        let picks: Vec<_> = (0..6).map(|_| c.pick(t1)).collect();
        assert!(!picks.contains(&a[1]), "{picks:?}");
        let t2 = t0 + Duration::from_millis(UPSTREAM_BACKOFF_MS);
        let picks: Vec<_> = (0..3).map(|_| c.pick(t2)).collect();
        assert!(picks.contains(&a[1]), "back in rotation: {picks:?}");
    }

    #[test]
    fn upstream_all_down_still_picks_in_turn() {
        let t0 = Instant::now();
        let a = addrs(2);
        let c = UpstreamChoice::new(a.clone(), t0);
        c.mark_down(a[0], t0);
        c.mark_down(a[1], t0);
        c.mark_down("10.0.0.1:1".parse().unwrap(), t0); // not ours: ignored
        assert_eq!(c.pick(t0), a[0]);
        assert_eq!(c.pick(t0), a[1]);
    }

    #[test]
    fn upstream_choice_is_shared_by_threads() {
        let t0 = Instant::now();
        let a = addrs(4);
        let c = std::sync::Arc::new(UpstreamChoice::new(a.clone(), t0));
        c.mark_down(a[3], t0);
        let hs: Vec<_> = (0..4)
            .map(|_| {
                let c = c.clone();
                std::thread::spawn(move || (0..1000).map(|_| c.pick(t0)).collect::<Vec<_>>())
            })
            .collect();
        let mut seen = [0usize; 4];
        for h in hs {
            for p in h.join().unwrap() {
                seen[a.iter().position(|x| *x == p).unwrap()] += 1;
            }
        }
        // Every turn is taken exactly once; the turn of the one that is down goes
        // to the next after it.
        assert_eq!(seen, [2000, 1000, 1000, 0]);
    }
}
