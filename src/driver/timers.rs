//! The timers of one worker, earliest first: session deadlines, send back-offs
//! and accept pauses. Backends have no timers: the worker waits on the backend
//! until the earliest one.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

use super::active::ActiveSession;
use super::slab::{Key, Slab};

/// What a timer is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Timer {
    /// A session's deadline ([`crate::proto::SessionIo::set_deadline`]).
    Deadline,
    /// A send that found no room on side 0 / 1 is tried again.
    SendRetry(u8),
    /// A listener that paused accepting (EMFILE...) accepts again.
    AcceptPause,
    /// A removed listener's drain ends: it stops accepting and closes.
    ListenerDrain,
}

/// The timers of one worker.
///
/// A session's deadline may move; the heap keeps the earliest registered time per
/// session ([`ActiveSession::timer`]) and a popped entry is checked against the session's
/// current deadline, so moving a deadline later costs nothing until it fires.
#[derive(Default)]
pub(crate) struct Timers {
    heap: BinaryHeap<Reverse<(Instant, Timer, u32, u32)>>,
}

impl Timers {
    /// Registers `c`'s current deadline if it is earlier than what is registered.
    pub fn sync(&mut self, k: Key, c: &mut ActiveSession) {
        if let Some(d) = c.io.deadline {
            if c.timer.is_none_or(|t| d < t) {
                c.timer = Some(d);
                self.heap.push(Reverse((d, Timer::Deadline, k.idx, k.gen)));
            }
        }
    }

    /// Starts a one-off timer `t` for key `k` (a session or a listener) at `at`.
    pub fn start(&mut self, at: Instant, t: Timer, k: Key) {
        self.heap.push(Reverse((at, t, k.idx, k.gen)));
    }

    /// Time until the earliest timer, if any.
    pub fn next_wait(&self, now: Instant) -> Option<Duration> {
        self.heap
            .peek()
            .map(|Reverse((t, ..))| t.saturating_duration_since(now))
    }

    /// Pops the timers due at `now`. A session deadline is returned only if it is
    /// still the session's current deadline (it is then cleared; one that moved
    /// later is registered again); one-off timers are returned as they are, for
    /// the worker to check against its state.
    pub fn expired<T>(
        &mut self,
        now: Instant,
        slab: &mut Slab<T>,
        session: impl Fn(&mut T) -> &mut ActiveSession,
    ) -> Vec<(Timer, Key)> {
        let mut due = Vec::new();
        while let Some(Reverse((t, kind, idx, gen))) = self.heap.peek().copied() {
            if t > now {
                break;
            }
            self.heap.pop();
            let k = Key { idx, gen };
            if kind != Timer::Deadline {
                due.push((kind, k));
                continue;
            }
            let Some(c) = slab.get_mut(k).map(&session) else {
                continue;
            };
            if c.timer != Some(t) {
                continue; // superseded by an earlier registration
            }
            c.timer = None;
            match c.io.deadline {
                Some(d) if d <= now => {
                    c.io.deadline = None;
                    due.push((kind, k));
                }
                Some(d) => {
                    c.timer = Some(d);
                    self.heap.push(Reverse((d, kind, idx, gen)));
                }
                None => {}
            }
        }
        due
    }
}
