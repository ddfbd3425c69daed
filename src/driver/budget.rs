//! ringress's own bound on what sessions hold: file descriptors and counts.
//!
//! The kernel's RLIMIT_NOFILE is no protection for a multi-tenant server: when it
//! is reached every listener stops together (EMFILE), and io_uring's accept does
//! not even honour a limit lowered after the ring was made. So sessions are
//! charged against a budget of their own, checked before a listener accepts:
//!
//! - **process**: `limit` session fds = RLIMIT_NOFILE − fds the process holds for
//!   itself (listener sockets, rings, pools, the admin endpoint: everything open
//!   that is not a session) − `[runtime] fd_reserve` (at most a quarter of what is
//!   left, for tiny limits); recomputed after start,
//!   reload and namespace changes ([`FdBudget::refresh`]). `[runtime]
//!   max_connections`, if set, also caps the number of sessions.
//! - **namespace**: the listeners of one namespace together may hold at most
//!   `max(netns_fd_share % of the limit, limit / namespaces with listeners)`, so
//!   one tenant cannot take the budget of the others, while a lone namespace (or
//!   two at 50 %) may use all of it.
//! - **listener**: `max_connections` sessions per listener (each template
//!   instance on its own).
//!
//! A listener at any of these stops accepting (the kernel's backlog holds new
//! connections; nothing is accepted and reset) and looks again every
//! [`CAPACITY_RECHECK_MS`]. Accepts already under way when the cap is reached
//! still complete (a multishot accept is cancelled, an epoll accept chunk ends),
//! so a cap may be passed by a few sessions per worker; the reserve absorbs that.
//! Likewise a session's fds are given back when it ends, while io_uring closes
//! them with the worker's next submit (`IORING_OP_CLOSE`): up to one loop turn's
//! closed sessions still hold their fds for that long.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

/// How often a listener held at a cap looks again whether it may accept (ms).
pub const CAPACITY_RECHECK_MS: u64 = 20;

/// Which cap keeps a listener from accepting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cap {
    /// The listener's own `max_connections`.
    Listener,
    /// Its namespace's share of the fd budget (`netns_fd_share`).
    Netns,
    /// The process's fd budget or `[runtime] max_connections`.
    Process,
}

impl Cap {
    /// The label used in logs and metrics: "listener", "netns", "process".
    pub fn as_str(self) -> &'static str {
        match self {
            Cap::Listener => "listener",
            Cap::Netns => "netns",
            Cap::Process => "process",
        }
    }
}

/// The process's session budget, shared by the supervisor and every worker.
#[derive(Debug)]
pub struct FdBudget {
    /// Session fds allowed (counts).
    limit: AtomicU64,
    /// Session fds held now (counts).
    used: AtomicU64,
    /// Sessions open now (counts).
    sessions: AtomicU64,
    /// Most sessions (0: no limit but the fds).
    max_sessions: AtomicU64,
    /// A namespace's share of `limit` (percent).
    netns_share: AtomicU64,
    /// Namespaces that have listeners (counts, at least 1).
    namespaces: AtomicU64,
}

impl Default for FdBudget {
    /// No limit at all (`u64::MAX` fds), a full share per namespace.
    fn default() -> Self {
        FdBudget {
            limit: AtomicU64::new(u64::MAX),
            used: AtomicU64::new(0),
            sessions: AtomicU64::new(0),
            max_sessions: AtomicU64::new(0),
            netns_share: AtomicU64::new(100),
            namespaces: AtomicU64::new(1),
        }
    }
}

/// The session fds held by the listeners of one namespace (counts).
#[derive(Debug, Default)]
pub struct NetnsFds {
    used: AtomicU64,
}

impl NetnsFds {
    /// Session fds held now by this namespace's listeners (counts).
    pub fn used(&self) -> u64 {
        self.used.load(Relaxed)
    }
}

impl FdBudget {
    /// Sets the limits: `nofile` is the process's RLIMIT_NOFILE (soft), `open_now`
    /// the fds open in the process now (sessions included), `reserve` the fds kept
    /// out of the budget; `max_sessions` (0: none) and `netns_share` (percent) as
    /// configured; `namespaces` the namespaces that have listeners. With
    /// `free = nofile − (open_now − used)`, the session fd limit
    /// becomes `free − min(reserve, free / 4)`: the whole reserve when the limit
    /// allows it, a quarter of what is free under a tiny RLIMIT_NOFILE (so that a
    /// 64-fd limit still serves sessions).
    pub fn refresh(
        &self,
        nofile: u64,
        open_now: u64,
        reserve: u64,
        max_sessions: u64,
        netns_share: u64,
        namespaces: u64,
    ) {
        let own = open_now.saturating_sub(self.used.load(Relaxed));
        let free = nofile.saturating_sub(own);
        let limit = free - reserve.min(free / 4);
        self.limit.store(limit, Relaxed);
        self.max_sessions.store(max_sessions, Relaxed);
        self.netns_share.store(netns_share.clamp(1, 100), Relaxed);
        self.namespaces.store(namespaces.max(1), Relaxed);
    }

    /// Session fds allowed to the whole process (counts).
    pub fn limit(&self) -> u64 {
        self.limit.load(Relaxed)
    }

    /// Session fds held now (counts).
    pub fn used(&self) -> u64 {
        self.used.load(Relaxed)
    }

    /// Sessions open now (counts).
    pub fn sessions(&self) -> u64 {
        self.sessions.load(Relaxed)
    }

    /// Session fds allowed to the listeners of one namespace together (counts):
    /// `max(netns_fd_share % of the limit, limit / namespaces)`.
    pub fn netns_limit(&self) -> u64 {
        let limit = self.limit();
        let share = self.netns_share.load(Relaxed);
        let by_share = if share >= 100 {
            limit
        } else {
            limit / 100 * share + limit % 100 * share / 100
        };
        by_share.max(limit / self.namespaces.load(Relaxed).max(1))
    }

    /// Whether a listener with `active` sessions out of `max` (0: no limit) in
    /// namespace `netns` may accept one more session that will hold `fds` fds;
    /// `Err` names the first cap in the way (listener, namespace, process).
    pub fn admits(&self, netns: &NetnsFds, active: u64, max: u64, fds: u64) -> Result<(), Cap> {
        if max > 0 && active >= max {
            return Err(Cap::Listener);
        }
        let max_sessions = self.max_sessions.load(Relaxed);
        if max_sessions > 0 && self.sessions() >= max_sessions {
            return Err(Cap::Process);
        }
        if self.used().saturating_add(fds) > self.limit() {
            return Err(Cap::Process);
        }
        if netns.used().saturating_add(fds) > self.netns_limit() {
            return Err(Cap::Netns);
        }
        Ok(())
    }

    /// How many more sessions of `fds` fds each a listener with `active` sessions
    /// out of `max` (0: no limit) in namespace `netns` may open before a cap
    /// (counts). The worker accepts one connection at a time (not multishot) when
    /// this is smaller than what one multishot burst can bring (its backlog).
    pub fn headroom(&self, netns: &NetnsFds, active: u64, max: u64, fds: u64) -> u64 {
        let fds = fds.max(1);
        let mut room = self.limit().saturating_sub(self.used()) / fds;
        room = room.min(self.netns_limit().saturating_sub(netns.used()) / fds);
        if max > 0 {
            room = room.min(max.saturating_sub(active));
        }
        let max_sessions = self.max_sessions.load(Relaxed);
        if max_sessions > 0 {
            room = room.min(max_sessions.saturating_sub(self.sessions()));
        }
        room
    }

    /// Charges one new session holding `fds` fds to the process and to `netns`;
    /// released when the returned charge is dropped. Never refuses: admission is
    /// [`FdBudget::admits`]'s job, before the accept.
    pub fn charge(self: &Arc<Self>, netns: &Arc<NetnsFds>, fds: u64) -> FdCharge {
        self.sessions.fetch_add(1, Relaxed);
        self.used.fetch_add(fds, Relaxed);
        netns.used.fetch_add(fds, Relaxed);
        FdCharge {
            budget: self.clone(),
            netns: netns.clone(),
            fds,
        }
    }
}

impl FdBudget {
    /// Charges one session of `fds` fds without a guard (for a session that keeps
    /// its listener, and so this budget, anyway: 4 bytes instead of a 24-byte
    /// [`FdCharge`] per session); the caller must call [`FdBudget::release`] with
    /// the same `netns` and the fds it charged in all, exactly once.
    pub fn charge_unguarded(&self, netns: &NetnsFds, fds: u64) {
        self.sessions.fetch_add(1, Relaxed);
        self.used.fetch_add(fds, Relaxed);
        netns.used.fetch_add(fds, Relaxed);
    }

    /// One more fd for a session charged with [`FdBudget::charge_unguarded`].
    pub fn charge_fd(&self, netns: &NetnsFds) {
        self.used.fetch_add(1, Relaxed);
        netns.used.fetch_add(1, Relaxed);
    }

    /// `fds` more fds for a session charged with [`FdBudget::charge_unguarded`]
    /// (a splice pipe's two ends), if the process's and `netns`'s fd limits
    /// still allow them; `false` (nothing charged) otherwise: the session goes
    /// on without them. Checked then added, as [`FdBudget::admits`] is: workers
    /// racing may pass a limit by a few fds, which the reserve absorbs.
    pub fn try_charge_fds(&self, netns: &NetnsFds, fds: u64) -> bool {
        if self.used().saturating_add(fds) > self.limit()
            || netns.used().saturating_add(fds) > self.netns_limit()
        {
            return false;
        }
        self.used.fetch_add(fds, Relaxed);
        netns.used.fetch_add(fds, Relaxed);
        true
    }

    /// Gives back `fds` fds of [`FdBudget::try_charge_fds`] that the session
    /// could not use after all (pipe2(2) failed).
    pub fn release_fds(&self, netns: &NetnsFds, fds: u64) {
        self.used.fetch_sub(fds, Relaxed);
        netns.used.fetch_sub(fds, Relaxed);
    }

    /// Gives back what a session charged with [`FdBudget::charge_unguarded`]
    /// (and [`FdBudget::charge_fd`]) holds: `fds` fds in all.
    pub fn release(&self, netns: &NetnsFds, fds: u64) {
        self.sessions.fetch_sub(1, Relaxed);
        self.used.fetch_sub(fds, Relaxed);
        netns.used.fetch_sub(fds, Relaxed);
    }
}

/// What one session holds of the budget; given back on drop.
#[derive(Debug)]
pub struct FdCharge {
    budget: Arc<FdBudget>,
    netns: Arc<NetnsFds>,
    fds: u64,
}

impl FdCharge {
    /// The session took one more fd (a proxy's upstream socket).
    pub fn add_fd(&mut self) {
        self.fds += 1;
        self.budget.used.fetch_add(1, Relaxed);
        self.netns.used.fetch_add(1, Relaxed);
    }
}

impl Drop for FdCharge {
    fn drop(&mut self) {
        self.budget.sessions.fetch_sub(1, Relaxed);
        self.budget.used.fetch_sub(self.fds, Relaxed);
        self.netns.used.fetch_sub(self.fds, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_in_order_and_charges_return() {
        let b = Arc::new(FdBudget::default());
        // 1,100 − (150 open − 0 used) − 50 reserve = 900 fds for sessions.
        b.refresh(1100, 150, 50, 0, 50, 2);
        assert_eq!((b.limit(), b.netns_limit()), (900, 450));
        // Alone, a namespace may use it all; among ten, still its 50 %.
        b.refresh(1100, 150, 50, 0, 50, 1);
        assert_eq!(b.netns_limit(), 900);
        b.refresh(1100, 150, 50, 0, 50, 10);
        assert_eq!(b.netns_limit(), 450);
        let a = Arc::new(NetnsFds::default());
        let c = Arc::new(NetnsFds::default());
        assert_eq!(b.admits(&a, 3, 3, 1), Err(Cap::Listener));
        assert_eq!(b.headroom(&a, 3, 10, 1), 7);
        assert_eq!(b.headroom(&a, 0, 0, 2), 225);
        let mut held: Vec<FdCharge> = (0..225).map(|_| b.charge(&a, 2)).collect();
        assert_eq!(a.used(), 450);
        assert_eq!(b.admits(&a, 0, 0, 1), Err(Cap::Netns));
        // Another namespace still gets its share...
        assert_eq!(b.admits(&c, 0, 0, 1), Ok(()));
        held.extend((0..449).map(|_| b.charge(&c, 1)));
        held.push(b.charge(&c, 1));
        // ...until the process budget is spent.
        assert_eq!(b.admits(&c, 0, 0, 1), Err(Cap::Process));
        assert_eq!(b.sessions(), 675);
        held.truncate(10);
        assert_eq!(b.used(), 20);
        held[0].add_fd();
        assert_eq!((b.used(), a.used()), (21, 21));
        drop(held);
        assert_eq!((b.used(), b.sessions(), a.used(), c.used()), (0, 0, 0, 0));
        // Unguarded charges balance with their release.
        b.charge_unguarded(&a, 1);
        b.charge_fd(&a);
        assert_eq!((b.used(), b.sessions(), a.used()), (2, 1, 2));
        b.release(&a, 2);
        assert_eq!((b.used(), b.sessions(), a.used()), (0, 0, 0));
        // Optional fds (a pipe) only within the limits.
        b.charge_unguarded(&a, 1);
        assert!(b.try_charge_fds(&a, 2));
        assert_eq!((b.used(), a.used()), (3, 3));
        b.release(&a, 3);
        b.refresh(1100, 150, 50, 0, 100, 1);
        b.charge_unguarded(&a, 899);
        assert!(!b.try_charge_fds(&a, 2), "past the process limit");
        assert_eq!(b.used(), 899);
        b.release(&a, 899);
        // A session count limit.
        b.refresh(1100, 150, 50, 2, 100, 1);
        let _x = (b.charge(&a, 1), b.charge(&a, 1));
        assert_eq!(b.admits(&c, 0, 0, 1), Err(Cap::Process));
    }

    /// Randomized: whatever the order of charges and releases, the counters end
    /// at zero and `admits` never lets a namespace past its share by itself.
    #[test]
    fn random_charges_balance() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut rnd = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let b = Arc::new(FdBudget::default());
        b.refresh(10_000, 0, 0, 0, 30, 4);
        let ns: Vec<Arc<NetnsFds>> = (0..4).map(|_| Arc::default()).collect();
        let mut held: Vec<(usize, FdCharge)> = Vec::new();
        for _ in 0..20_000 {
            let i = rnd(4) as usize;
            if rnd(3) > 0 {
                let fds = 1 + rnd(2);
                if b.admits(&ns[i], 0, 0, fds).is_ok() {
                    held.push((i, b.charge(&ns[i], fds)));
                }
            } else if !held.is_empty() {
                let k = rnd(held.len() as u64) as usize;
                held.swap_remove(k);
            }
            assert!(ns[i].used() <= b.netns_limit());
            assert!(b.used() <= b.limit());
        }
        held.clear();
        assert_eq!((b.used(), b.sessions()), (0, 0));
        assert!(ns.iter().all(|n| n.used() == 0));
    }
}
