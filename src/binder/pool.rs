//! Upstream client sockets made ahead of time ([`SocketPool`]), one pool per
//! listener, namespace and address family, and their refill by the binder thread:
//! a worker connects from a pooled socket without a binder round trip.
//!
//! A pool that runs dry between two refills doubles its target for the next one
//! (up to [`GROWTH`] times its base), so a burst of new sessions waits for fewer
//! binder round trips; once no take has found it empty for [`SHRINK_AFTER`], the
//! binder sets it back to its base and closes the sockets beyond it, so a pool
//! that is not drained holds its base.
//!
//! Refills come in batches, so that connection churn does not wake the binder
//! once per session: a take asks for a refill only once it leaves the pool at or
//! below its low water mark (half its target, [`LOW_WATER_DIVISOR`]), and the
//! worker sends that request at the end of its loop turn
//! ([`crate::driver::upstream::send_refills`]). A take that leaves the pool short
//! but above the mark only marks it; the worker tops such pools up once it has
//! been idle for [`crate::driver::upstream::TOP_UP_IDLE`], so an idle pool is full.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use super::{BindError, Binder, BinderState, ClientProto, Msg, Request};

/// Most a pool's target grows under load, as a multiple of its base (count): a
/// pool of base 64 keeps at most 512 sockets ready.
pub const GROWTH: usize = 8;
/// A grown pool returns to its base once no take has found it empty for this long.
pub const SHRINK_AFTER: Duration = Duration::from_secs(5);
/// A take asks for a refill once it leaves the pool at or below `target /
/// LOW_WATER_DIVISOR` sockets (count): a pool of target 64 is refilled when 32 or
/// fewer are left, 32 or more sockets per refill under load.
pub const LOW_WATER_DIVISOR: usize = 2;

/// What [`SocketPool::wants_top_up`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopUp {
    /// At its target: nothing to do.
    Full,
    /// Below its target and no refill running: ask the binder for one now.
    Send,
    /// Below its target while a refill runs: look again later.
    Later,
}

/// Unconnected, non-blocking TCP, UDP or SCTP sockets of one address family made in
/// one namespace, ready for workers to connect from (upstream connects in another
/// namespace without a binder round trip). The binder fills it; workers take.
pub struct SocketPool {
    owner: String,
    netns: PathBuf,
    label: String,
    family_of: SocketAddr,
    proto: ClientProto,
    /// Sockets kept ready when idle (count).
    base: usize,
    /// Sockets the next refill fills up to (count): `base..=base * GROWTH`.
    target: AtomicUsize,
    /// A take found the pool empty since the last refill began.
    ran_dry: AtomicBool,
    /// When a take last found the pool empty.
    dry_at: Mutex<Option<Instant>>,
    fds: Mutex<Vec<OwnedFd>>,
    /// `fds.len()`, written under the `fds` lock, read without it (count).
    ready: AtomicUsize,
    refilling: AtomicBool,
    /// A take left the pool below its target without asking for a refill, and no
    /// top-up has looked at it since ([`SocketPool::mark_short`]).
    short: AtomicBool,
    /// errno of the last failed fill, 0 if the last fill worked.
    last_error: AtomicI32,
    /// When the last fill failed.
    failed_at: Mutex<Option<Instant>>,
    waiters: Mutex<Vec<Arc<OwnedFd>>>,
}

impl fmt::Debug for SocketPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SocketPool")
            .field("netns", &self.label)
            .field("family_of", &self.family_of)
            .field("len", &self.len())
            .finish()
    }
}

impl SocketPool {
    /// An empty pool for `proto` sockets of `family_of`'s family in namespace file
    /// `netns` (labelled `label` in errors), for listener `owner`, kept at `target`
    /// sockets when idle (at least 2), up to [`GROWTH`] times that under load.
    pub fn new(
        owner: String,
        netns: PathBuf,
        label: String,
        family_of: SocketAddr,
        proto: ClientProto,
        target: usize,
    ) -> SocketPool {
        SocketPool {
            owner,
            netns,
            label,
            family_of,
            proto,
            base: target.max(2),
            target: AtomicUsize::new(target.max(2)),
            ran_dry: AtomicBool::new(false),
            dry_at: Mutex::new(None),
            fds: Mutex::new(Vec::new()),
            ready: AtomicUsize::new(0),
            refilling: AtomicBool::new(false),
            short: AtomicBool::new(false),
            last_error: AtomicI32::new(0),
            failed_at: Mutex::new(None),
            waiters: Mutex::new(Vec::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<OwnedFd>> {
        self.fds.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds `fds` to the ready sockets.
    fn put(&self, fds: impl IntoIterator<Item = OwnedFd>) {
        let mut v = self.lock();
        v.extend(fds);
        self.ready.store(v.len(), Ordering::Release);
    }

    /// Keeps at most `keep` ready sockets; returns the others (to close outside
    /// the lock).
    fn keep_at_most(&self, keep: usize) -> Vec<OwnedFd> {
        let mut v = self.lock();
        let at = keep.min(v.len());
        let extra = v.split_off(at);
        self.ready.store(v.len(), Ordering::Release);
        extra
    }

    /// Takes a socket, if one is ready (one lock round trip). Finding none makes
    /// the next refill larger.
    pub fn take(&self) -> Option<OwnedFd> {
        let fd = {
            let mut v = self.lock();
            let fd = v.pop();
            self.ready.store(v.len(), Ordering::Release);
            fd
        };
        if fd.is_none() {
            self.ran_dry.store(true, Ordering::Release);
            *self.dry_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        }
        fd
    }

    /// The target of the next refill (count): doubled if the pool ran dry since
    /// the last refill, at most `base * GROWTH`.
    fn next_target(&self) -> usize {
        let t = self.target.load(Ordering::Acquire);
        let next = if self.ran_dry.swap(false, Ordering::AcqRel) {
            (t * 2).min(self.base * GROWTH)
        } else {
            t
        };
        self.target.store(next, Ordering::Release);
        next
    }

    /// Sets a grown pool back to its base and closes the sockets beyond it, if no
    /// take has found it empty for [`SHRINK_AFTER`] at `now`; returns whether it
    /// is at its base now.
    pub(super) fn trim(&self, now: Instant) -> bool {
        if self.target() == self.base {
            return true;
        }
        let dry_at = *self.dry_at.lock().unwrap_or_else(|p| p.into_inner());
        if dry_at.is_some_and(|d| now.saturating_duration_since(d) < SHRINK_AFTER) {
            return false;
        }
        self.target.store(self.base, Ordering::Release);
        drop(self.keep_at_most(self.base));
        true
    }

    /// The target the pool is refilled to now (count).
    pub fn target(&self) -> usize {
        self.target.load(Ordering::Acquire)
    }

    /// Sockets ready (count); read without taking the pool's lock.
    pub fn len(&self) -> usize {
        self.ready.load(Ordering::Acquire)
    }

    /// The low water mark (count): at or below it, a take asks for a refill.
    pub fn low_water(&self) -> usize {
        self.target() / LOW_WATER_DIVISOR
    }

    /// Whether no socket is ready.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// True once when the pool is at or below its low water mark
    /// ([`SocketPool::low_water`]) and no refill is running or asked for: the
    /// caller must then ask the binder for one ([`Binder::fill_later`]), which
    /// fills it to its target. Takes made until that refill ends are made up by
    /// the next one, so under load refills come in batches of at least half a
    /// target.
    pub fn wants_refill(&self) -> bool {
        self.len() <= self.low_water() && self.start_refill()
    }

    /// Marks the pool as short (below its target, above its low water mark);
    /// true the first time since the last [`SocketPool::wants_top_up`], when the
    /// caller must list the pool for a top-up when idle.
    pub fn mark_short(&self) -> bool {
        self.len() < self.target()
            && !self.short.load(Ordering::Relaxed)
            && !self.short.swap(true, Ordering::AcqRel)
    }

    /// What a top-up of a pool marked short ([`SocketPool::mark_short`]) should
    /// do now: [`TopUp::Send`] (a refill is marked running: the caller must ask
    /// the binder for it, [`Binder::fill_later`]) or [`TopUp::Full`] clear the
    /// mark; [`TopUp::Later`] (below target, a refill running) keeps it.
    pub fn wants_top_up(&self) -> TopUp {
        if self.len() >= self.target() {
            self.short.store(false, Ordering::Release);
            TopUp::Full
        } else if self.start_refill() {
            self.short.store(false, Ordering::Release);
            TopUp::Send
        } else {
            TopUp::Later
        }
    }

    /// Marks a refill as running; false if one already was.
    fn start_refill(&self) -> bool {
        self.refilling
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    }

    /// Whether a refill is running.
    pub fn refilling(&self) -> bool {
        self.refilling.load(Ordering::Acquire)
    }

    /// errno of the last fill, if it failed.
    pub fn last_error(&self) -> Option<i32> {
        match self.last_error.load(Ordering::Acquire) {
            0 => None,
            e => Some(e),
        }
    }

    /// Whether the last fill failed less than `within` ago.
    pub fn failed_recently(&self, within: Duration) -> bool {
        self.last_error().is_some()
            && self
                .failed_at
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_some_and(|t| t.elapsed() < within)
    }

    /// The namespace file this pool's sockets are made in.
    pub fn netns(&self) -> &Path {
        &self.netns
    }

    /// Closes every pooled socket (their namespace has gone).
    pub fn flush(&self) {
        drop(self.keep_at_most(0));
    }

    /// Writes eventfd `wake` when the running refill ends (at once if none runs or
    /// sockets are ready).
    /// Each eventfd is listed once, however many sessions of its worker wait.
    pub fn notify_on_refill(&self, wake: Arc<OwnedFd>) {
        {
            let mut w = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
            if !w.iter().any(|x| Arc::ptr_eq(x, &wake)) {
                w.push(wake);
            }
        }
        if !self.refilling() || !self.is_empty() {
            self.wake_waiters();
        }
    }

    fn wake_waiters(&self) {
        let w = std::mem::take(&mut *self.waiters.lock().unwrap_or_else(|p| p.into_inner()));
        for fd in w {
            crate::eventfd::wake(fd.as_raw_fd());
        }
    }
}

impl Binder {
    /// Fills `pool` to its target now, waiting for the binder.
    ///
    /// # Errors
    /// Entering the namespace or socket(2) failed; the pool keeps what it had.
    pub fn fill_now(&self, pool: &Arc<SocketPool>) -> Result<(), BindError> {
        let (reply, rx) = mpsc::sync_channel(1);
        let gone = || BindError {
            listener: pool.owner.clone(),
            step: "request",
            addr: pool.family_of,
            netns: pool.label.clone(),
            source: io::Error::other("binder thread is gone"),
        };
        pool.refilling.store(true, Ordering::Release);
        self.tx
            .send(Msg::Fill(pool.clone(), Some(reply)))
            .map_err(|_| gone())?;
        rx.recv().map_err(|_| gone())?
    }

    /// Asks the binder to fill `pool` in the background (the caller has seen
    /// [`SocketPool::wants_refill`] return true). Never blocks.
    pub fn fill_later(&self, pool: Arc<SocketPool>) {
        if let Err(mpsc::SendError(Msg::Fill(pool, _))) = self.tx.send(Msg::Fill(pool, None)) {
            pool.last_error.store(libc::ESHUTDOWN, Ordering::Release);
            pool.refilling.store(false, Ordering::Release);
            pool.wake_waiters();
        }
    }
}

impl BinderState {
    /// Trims the grown pools that have been calm ([`SocketPool::trim`]); forgets
    /// those back at their base and those whose listener has gone.
    pub(super) fn trim_pools(&mut self, now: Instant) {
        self.grown
            .retain(|w| w.upgrade().is_some_and(|p| !p.trim(now)));
    }

    /// Fills `pool` up to its target in its namespace; wakes its waiters.
    ///
    /// Sockets taken while a refill runs do not start another refill, and the
    /// running one counted what was missing when it began: so once it ends, the
    /// pool is topped up again here if takes left it at or below its low water
    /// mark meanwhile (a few passes at most).
    pub(super) fn fill(&mut self, pool: &Arc<SocketPool>) -> Result<(), BindError> {
        let mut out = self.fill_once(pool);
        for _ in 0..3 {
            if out.is_err() || !pool.wants_refill() {
                break;
            }
            out = self.fill_once(pool);
        }
        if pool.target() > pool.base && !self.grown.iter().any(|w| w.as_ptr() == Arc::as_ptr(pool))
        {
            self.grown.push(Arc::downgrade(pool));
        }
        out
    }

    /// One refill of `pool` to its target.
    fn fill_once(&mut self, pool: &SocketPool) -> Result<(), BindError> {
        let ready = pool.len();
        let missing = pool.next_target().saturating_sub(ready);
        let req = Request {
            owner: pool.owner.clone(),
            netns_label: pool.label.clone(),
            netns: Some(pool.netns.clone()),
            spec: pool.proto.spec(pool.family_of, missing),
            reply: mpsc::sync_channel(1).0,
        };
        let r = if missing == 0 {
            Ok(Vec::new())
        } else {
            self.serve(&req)
        };
        let out = match r {
            Ok(fds) => {
                pool.put(fds);
                pool.last_error.store(0, Ordering::Release);
                Ok(())
            }
            Err(e) => {
                tracing::warn!(error = %e, "upstream socket pool refill failed");
                pool.last_error
                    .store(e.errno().unwrap_or(libc::EIO), Ordering::Release);
                *pool.failed_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
                Err(e)
            }
        };
        pool.refilling.store(false, Ordering::Release);
        pool.wake_waiters();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A UDP pool in this process's namespace with base target `target`.
    fn test_pool(target: usize) -> SocketPool {
        SocketPool::new(
            "t".into(),
            "/proc/self/ns/net".into(),
            "self".into(),
            "127.0.0.1:1".parse().unwrap(),
            ClientProto::Udp,
            target,
        )
    }

    #[test]
    fn a_pool_that_runs_dry_grows_bounded_and_is_trimmed_when_calm() {
        let pool = test_pool(64);
        assert_eq!(pool.target(), 64);
        // Not dry: the target stays.
        assert_eq!(pool.next_target(), 64);
        assert!(pool.trim(Instant::now()), "at its base");
        for want in [128, 256, 512, 512, 512] {
            assert!(pool.take().is_none());
            assert_eq!(pool.next_target(), want, "grows when dry, up to 8x");
        }
        assert_eq!(pool.next_target(), 512, "a pool not dry keeps its size");
        // 100 sockets ready (any fds will do).
        pool.put((0..100).map(|_| crate::eventfd::eventfd().unwrap()));
        let now = Instant::now();
        assert!(!pool.trim(now), "ran dry just now");
        assert_eq!((pool.target(), pool.len()), (512, 100));
        assert!(pool.trim(now + SHRINK_AFTER));
        assert_eq!((pool.target(), pool.len()), (64, 64), "back to its base");
    }

    #[test]
    fn refills_at_the_low_water_mark_and_top_ups_when_short() {
        let pool = test_pool(8);
        pool.put((0..8).map(|_| crate::eventfd::eventfd().unwrap()));
        assert_eq!((pool.len(), pool.low_water()), (8, 4));
        assert!(!pool.mark_short(), "a full pool is not short");
        assert!(pool.take().is_some());
        assert!(
            !pool.wants_refill(),
            "refill asked for above the low water mark"
        );
        assert!(pool.mark_short(), "listed once");
        for left in [6, 5] {
            assert!(pool.take().is_some());
            assert_eq!(pool.len(), left);
            assert!(!pool.wants_refill());
            assert!(!pool.mark_short(), "listed twice");
        }
        assert_eq!(pool.wants_top_up(), TopUp::Send, "idle and short: a top-up");
        assert_eq!(
            pool.wants_top_up(),
            TopUp::Later,
            "no second refill while one runs, but the pool stays listed"
        );
        pool.refilling.store(false, Ordering::Release);
        pool.put((0..3).map(|_| crate::eventfd::eventfd().unwrap()));
        assert_eq!(pool.wants_top_up(), TopUp::Full, "back at its target");
        assert!(pool.take().is_some());
        assert!(pool.take().is_some());
        assert!(pool.take().is_some());
        assert!(pool.take().is_some());
        assert!(pool.wants_refill(), "at the low water mark");
        assert!(pool.take().is_some());
        assert!(!pool.wants_refill(), "a second refill while one runs");
        pool.flush();
        assert!(pool.is_empty());
    }

    #[test]
    fn pool_wakes_each_waiting_worker_once() {
        let pool = SocketPool::new(
            "t".into(),
            "/proc/self/ns/net".into(),
            "self".into(),
            "127.0.0.1:1".parse().unwrap(),
            ClientProto::Tcp,
            4,
        );
        assert!(pool.wants_refill());
        assert!(!pool.wants_refill(), "a second refill while one runs");
        let efd = Arc::new(crate::eventfd::eventfd().unwrap());
        // Many sessions of one worker wait: its eventfd is listed once.
        for _ in 0..100 {
            pool.notify_on_refill(efd.clone());
        }
        pool.refilling.store(false, Ordering::Release);
        pool.wake_waiters();
        let mut v = [0u8; 8];
        // SAFETY: reading 8 bytes from an eventfd into an 8-byte buffer.
        let n = unsafe { libc::read(efd.as_raw_fd(), v.as_mut_ptr().cast(), 8) };
        assert_eq!(n, 8);
        assert_eq!(
            u64::from_ne_bytes(v),
            1,
            "the worker was woken more than once"
        );
    }
}
