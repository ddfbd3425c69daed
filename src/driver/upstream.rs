//! Upstreams of a proxy listener: round-robin choice, a short back-off for an
//! upstream that just failed (both decided by [`UpstreamChoice`]), and sockets
//! for upstreams in another namespace.
//!
//! A worker never calls setns(2). For an upstream in the root namespace it makes
//! the socket itself (socket(2) does not block). For an upstream in another
//! namespace it takes a socket from a [`SocketPool`] that the binder thread keeps
//! filled in the background, so a connect costs no binder round trip; only when
//! the pool runs dry does the session wait for the binder's refill (the worker is
//! woken through its eventfd). A refill is wanted once takes have left a pool at
//! or below half its target, and sent to the binder at the end of the worker's
//! loop turn ([`send_refills`]): under connection churn that is one binder
//! wake-up per batch of sessions instead of one per session. A pool left short
//! above that mark is topped up once the worker has been idle for
//! [`TOP_UP_IDLE`] ([`send_top_ups`]).

use std::cell::RefCell;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::Instant;

use crate::binder::{Binder, ClientProto, SocketPool, TopUp};
use crate::proto::UpstreamChoice;
pub use crate::proto::UPSTREAM_BACKOFF_MS;
/// Sockets a namespace pool keeps ready per address family when idle (count);
/// a pool that runs dry grows up to [`crate::binder::POOL_GROWTH`] times this.
pub const POOL_TARGET: usize = 64;
/// After a pool fill failed, sessions fail at once for this long, then a new fill
/// is tried.
pub const POOL_RETRY_AFTER_FAILURE: std::time::Duration = std::time::Duration::from_secs(1);

thread_local! {
    /// Refills asked for by takes on this thread (a worker) and not sent yet:
    /// [`send_refills`] sends them at the end of the loop turn.
    static REFILLS: RefCell<Vec<(Binder, Weak<SocketPool>)>> = const { RefCell::new(Vec::new()) };
    /// Pools this thread's takes left short above their low water mark, to top
    /// up when the thread is idle ([`send_top_ups`]). Weak: a pool whose listener
    /// a reload removed meanwhile is not filled for nobody.
    static TOP_UPS: RefCell<Vec<(Binder, Weak<SocketPool>)>> = const { RefCell::new(Vec::new()) };
}

/// How long a worker with short pools ([`top_ups_pending`]) waits for events
/// before it tops them up ([`send_top_ups`]): under load its waits end sooner,
/// so only an idle worker sends top-ups.
pub const TOP_UP_IDLE: std::time::Duration = std::time::Duration::from_millis(10);

/// Whether this thread's takes left pools short that no top-up has looked at.
pub fn top_ups_pending() -> bool {
    TOP_UPS.with(|t| !t.borrow().is_empty())
}

/// Asks the binder to fill the pools this thread's takes left short to their
/// target, those with no refill running (a worker calls it when a wait of
/// [`TOP_UP_IDLE`] brought no event). A pool whose refill is still running stays
/// listed for the next idle wait (that refill counted what was missing when it
/// began). Pools that have gone are dropped. Never blocks.
pub fn send_top_ups() {
    let v = TOP_UPS.with(|t| std::mem::take(&mut *t.borrow_mut()));
    let mut later = Vec::new();
    for (b, w) in v {
        let Some(p) = w.upgrade() else {
            continue;
        };
        match p.wants_top_up() {
            TopUp::Send => b.fill_later(p),
            TopUp::Later => later.push((b, w)),
            TopUp::Full => {}
        }
    }
    if !later.is_empty() {
        TOP_UPS.with(|t| t.borrow_mut().extend(later));
    }
}

/// Sends the refills the takes of this thread's loop turn asked for (each pool at
/// most once: [`SocketPool::wants_refill`] is true once until its refill ends).
/// A worker calls it once per loop turn, before it waits; never blocks. A pool
/// that has gone meanwhile is not filled.
pub fn send_refills() {
    let v = REFILLS.with(|r| std::mem::take(&mut *r.borrow_mut()));
    for (b, w) in v {
        if let Some(p) = w.upgrade() {
            b.fill_later(p);
        }
    }
}

/// What [`UpstreamSet::socket_for`] got.
pub enum GetSocket {
    /// A fresh non-blocking TCP socket in the upstream's namespace.
    Ready(OwnedFd),
    /// The pool is empty; a refill was asked for and the caller's eventfd will be
    /// written when it arrives.
    Wait,
    /// No socket can be had (errno): e.g. the namespace is gone.
    Failed(i32),
}

/// The upstreams of one proxy listener.
pub struct UpstreamSet {
    /// The addresses (in config order), round-robin and back-off over them.
    choice: UpstreamChoice,
    /// Pools for an upstream namespace: index 0 IPv4, 1 IPv6.
    pools: Option<[Arc<SocketPool>; 2]>,
    binder: Option<Binder>,
    /// The kind of socket an upstream is reached with.
    proto: ClientProto,
}

impl std::fmt::Debug for UpstreamSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamSet")
            .field("addrs", &self.choice.addrs())
            .field("namespaced", &self.pools.is_some())
            .finish()
    }
}

impl UpstreamSet {
    /// Upstreams `addrs` in the root namespace (`netns = None`) or in namespace file
    /// `netns` (labelled `label` in errors), whose pools `binder` fills, reached
    /// with `proto` sockets (TCP, UDP, or SCTP one-to-one).
    /// Pools of the families in use are filled before this returns.
    ///
    /// # Errors
    /// The first fill failed (namespace missing, socket(2) error), with its message.
    pub fn new(
        addrs: Vec<SocketAddr>,
        netns: Option<(PathBuf, String)>,
        proto: ClientProto,
        owner: &str,
        binder: &Binder,
    ) -> Result<UpstreamSet, crate::binder::BindError> {
        let pools = match netns {
            None => None,
            Some((path, label)) => {
                let v4: SocketAddr = "0.0.0.0:0".parse().expect("literal");
                let v6: SocketAddr = "[::]:0".parse().expect("literal");
                let mk = |fam: SocketAddr| {
                    Arc::new(SocketPool::new(
                        owner.to_string(),
                        path.clone(),
                        label.clone(),
                        fam,
                        proto,
                        POOL_TARGET,
                    ))
                };
                let pools = [mk(v4), mk(v6)];
                for (i, p) in pools.iter().enumerate() {
                    if addrs.iter().any(|a| usize::from(a.is_ipv6()) == i) {
                        binder.fill_now(p)?;
                    }
                }
                Some(pools)
            }
        };
        Ok(UpstreamSet {
            choice: UpstreamChoice::new(addrs, Instant::now()),
            binder: pools.as_ref().map(|_| binder.clone()),
            pools,
            proto,
        })
    }

    /// The next upstream, round-robin, skipping those in back-off; if all are in
    /// back-off, the next one anyway ([`UpstreamChoice::pick`] now).
    pub fn pick(&self, now: Instant) -> SocketAddr {
        self.choice.pick(now)
    }

    /// Skips `addr` for [`UPSTREAM_BACKOFF_MS`] from now ([`UpstreamChoice::mark_down`]).
    pub fn mark_down(&self, addr: SocketAddr, now: Instant) {
        self.choice.mark_down(addr, now);
    }

    /// A socket to connect to `addr` from. `wake` is the caller's eventfd, written
    /// when an empty pool has been refilled. A refill this take asks for is sent
    /// by the caller's next [`send_refills`]; at once (with those already asked
    /// for) when the pool is empty.
    pub fn socket_for(&self, addr: SocketAddr, wake: &Arc<OwnedFd>) -> GetSocket {
        let Some(pools) = &self.pools else {
            return match self.proto.socket(addr) {
                Ok(s) => GetSocket::Ready(s.into()),
                Err(e) => GetSocket::Failed(e.raw_os_error().unwrap_or(libc::EIO)),
            };
        };
        let pool = &pools[usize::from(addr.is_ipv6())];
        let got = pool.take();
        // After a failed fill (the namespace is gone, say), fail fast for a while
        // instead of asking the binder again for every session.
        let backing_off = pool.failed_recently(POOL_RETRY_AFTER_FAILURE);
        if let (false, Some(b)) = (backing_off, &self.binder) {
            if pool.wants_refill() {
                REFILLS.with(|r| r.borrow_mut().push((b.clone(), Arc::downgrade(pool))));
            } else if pool.mark_short() {
                TOP_UPS.with(|t| t.borrow_mut().push((b.clone(), Arc::downgrade(pool))));
            }
        }
        if got.is_none() {
            // A session will wait for the refill: no waiting for the turn's end.
            send_refills();
        }
        match (got, pool.last_error()) {
            (Some(fd), _) => GetSocket::Ready(fd),
            (None, Some(errno)) if backing_off => GetSocket::Failed(errno),
            (None, _) => {
                pool.notify_on_refill(wake.clone());
                GetSocket::Wait
            }
        }
    }

    /// Drops the pooled sockets if the pools' namespace file is `path`: they were
    /// made in a namespace that has gone, and a namespace of the same name would be
    /// a new one.
    pub fn flush_if_in(&self, path: &std::path::Path) {
        if let Some(pools) = &self.pools {
            for p in pools {
                if p.netns() == path {
                    p.flush();
                }
            }
        }
    }
}
