//! The worker's accepting listeners: arming the (multishot) accept, pausing
//! after EMFILE and the like, removing a listener once its accept has ended.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use super::{Worker, K_ACCEPT};
use crate::config::Proto;
use crate::driver::active::ActiveSession;
use crate::driver::backend::{Backend, Event, Op};
use crate::driver::budget::{Cap, CAPACITY_RECHECK_MS};
use crate::driver::slab::Key;
use crate::driver::timers::Timer;
use crate::driver::{ListenerFd, ListenerShared, ACCEPT_PAUSE_MS, LISTENER_DRAIN_MS};
use crate::proto::Origin;

impl<B: Backend> Worker<B> {
    pub(super) fn arm_accept(&mut self, k: Key) {
        let Some(l) = self.listeners.get_mut(k) else {
            return;
        };
        if l.removing {
            if l.op.is_none() {
                self.drop_listener(k);
            }
            return;
        }
        if l.op.is_some() || l.paused {
            return;
        }
        if let Err(cap) = admits(&l.shared) {
            self.hold_at_capacity(k, cap);
            return;
        }
        if l.capped {
            l.capped = false;
            l.shared.stats.at_capacity.fetch_sub(1, Relaxed);
        }
        let fd = l.fd.as_raw_fd();
        // A multishot accept may bring a whole accept queue before it can be
        // cancelled: near a cap, one connection at a time. A socket shared with
        // other workers (`shards = N`) is accepted one connection at a time too:
        // io_uring arms an accept's poll as exclusive (IORING_OP_ACCEPT has
        // `poll_exclusive` in io_uring/opdef.c), so each connection wakes only
        // the first waiter of the socket's wait queue, and a multishot accept
        // stays first and would take every connection; a single-shot one queues
        // again at the tail, so the workers take turns.
        let multishot = !matches!(l.fd, ListenerFd::Shared(_)) && multishot_pays(&l.shared);
        let id = self.submit(K_ACCEPT, k, Op::Accept { fd, multishot });
        if let Some(l) = self.listeners.get_mut(k) {
            l.op = Some(id);
        }
    }

    /// New settings for a listener whose socket a reload kept: connections
    /// accepted from now on use `shared`; `backlog`, if given, is applied with
    /// listen(2) again (Linux resizes the accept queue of a listening socket).
    pub(super) fn update_listener(
        &mut self,
        k: Key,
        shared: Arc<ListenerShared>,
        backlog: Option<u32>,
    ) {
        let Some(l) = self.listeners.get_mut(k) else {
            return;
        };
        if let Some(b) = backlog {
            let b = i32::try_from(b).unwrap_or(i32::MAX);
            // SAFETY: listen(2) on a socket this listener owns; no memory is passed.
            if unsafe { libc::listen(l.fd.as_raw_fd(), b) } != 0 {
                tracing::warn!(listener = %shared.name, backlog = b,
                    error = %io::Error::last_os_error(), "cannot apply the new backlog");
            }
        }
        l.shared = shared;
    }

    /// Removes a listener without resetting its accept queue: a TCP listener gets a
    /// filter that drops new SYNs ([`drop_new_handshakes`]), keeps accepting what
    /// completed its handshake for [`LISTENER_DRAIN_MS`], then closes. Other
    /// listeners (one-to-one SCTP) close at once.
    ///
    /// The filter needs CAP_NET_ADMIN, which workers do not hold: the binder
    /// attaches it to a duplicate of the socket and wakes the worker with the
    /// answer ([`Worker::filtered`]); the listener keeps accepting meanwhile and
    /// its drain time starts with the answer. Without a binder (tests) the worker
    /// attaches it itself.
    pub(super) fn drain_listener(&mut self, k: Key) {
        let Some(l) = self.listeners.get_mut(k) else {
            return;
        };
        if l.draining || l.removing {
            return;
        }
        if l.shared.proto != Proto::Tcp {
            self.remove_listener(k);
            return;
        }
        l.draining = true;
        let Some(binder) = &self.ctx.binder else {
            let r = drop_new_handshakes(l.fd.as_fd());
            self.filter_attached(k, r);
            return;
        };
        match l.fd.as_fd().try_clone_to_owned() {
            Ok(dup) => {
                let (mailbox, wake_fd) = (self.ctx.filtered.clone(), self.ctx.wake.clone());
                binder.attach_drop_filter(
                    dup,
                    Box::new(move |r| {
                        mailbox
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push((k, r));
                        crate::driver::wake(wake_fd.as_raw_fd());
                    }),
                );
            }
            Err(e) => self.filter_attached(k, Err(e)),
        }
    }

    /// The filters the binder attached (or failed to) since the last look.
    pub(super) fn filtered(&mut self) {
        let done =
            std::mem::take(&mut *self.ctx.filtered.lock().unwrap_or_else(|p| p.into_inner()));
        for (k, r) in done {
            self.filter_attached(k, r);
        }
    }

    /// Listener `k`'s SYN-dropping filter is in place (it drains for
    /// [`LISTENER_DRAIN_MS`], then closes), or could not be attached (it closes
    /// at once, as it did before filters).
    fn filter_attached(&mut self, k: Key, r: io::Result<()>) {
        let Some(l) = self.listeners.get_mut(k) else {
            return;
        };
        if l.removing {
            return;
        }
        if let Err(e) = r {
            // EPERM: this kernel asks CAP_NET_ADMIN for it (measured on 6.18: CAP_BPF
            // or CAP_SYS_ADMIN alone do not do). Said once per process, not per
            // listener.
            static SAID: std::sync::Once = std::sync::Once::new();
            SAID.call_once(|| {
                tracing::warn!(listener = %l.shared.name, error = %e,
                    "cannot attach a socket filter to stop new handshakes; removed listeners \
                     close at once and may reset connections still queued");
            });
            self.remove_listener(k);
            return;
        }
        let at = self.now + Duration::from_millis(LISTENER_DRAIN_MS);
        self.timers.start(at, Timer::ListenerDrain, k);
    }

    pub(super) fn remove_listener(&mut self, k: Key) {
        let Some(l) = self.listeners.get_mut(k) else {
            return;
        };
        l.removing = true;
        match l.op {
            Some(id) => self.backend.cancel(id),
            None => self.drop_listener(k),
        }
    }

    /// Listener `k` stops accepting at `cap` (its accept is not armed, or its
    /// multishot accept is cancelled) and looks again after
    /// [`CAPACITY_RECHECK_MS`]; the kernel's backlog holds new connections.
    fn hold_at_capacity(&mut self, k: Key, cap: Cap) {
        let Some(l) = self.listeners.get_mut(k) else {
            return;
        };
        if !l.capped {
            l.capped = true;
            let st = &l.shared.stats;
            st.at_capacity.fetch_add(1, Relaxed);
            st.capacity_pauses.fetch_add(1, Relaxed);
            if let Some(held_back) = st.logs.capacity.allow() {
                tracing::warn!(listener = %l.shared.name, cap = cap.as_str(),
                    sessions = st.active(), max_connections = l.shared.max_connections,
                    netns_fds = l.shared.netns_fds.used(), budget_fds = l.shared.budget.used(),
                    budget_limit = l.shared.budget.limit(), more_in_last_10s = held_back,
                    "listener at capacity: not accepting until below it (the backlog holds new connections)");
            }
        }
        if let Some(id) = l.op {
            self.backend.cancel(id);
        }
        if !l.paused {
            l.paused = true;
            let at = self.now + Duration::from_millis(CAPACITY_RECHECK_MS);
            self.timers.start(at, Timer::AcceptPause, k);
        }
    }

    pub(super) fn drop_listener(&mut self, k: Key) {
        if let Some(l) = self.listeners.remove(k) {
            if l.capped {
                l.shared.stats.at_capacity.fetch_sub(1, Relaxed);
            }
            // Release: the sessions it accepted are counted before it is seen gone.
            self.ctx
                .stats
                .listeners
                .fetch_sub(1, std::sync::atomic::Ordering::Release);
            match l.fd.into_last() {
                Ok(fd) => self.backend.close(fd),
                // Shared with other workers (`shards = N`): they go on with the
                // fd; this worker stops watching it (the hold is dropped after).
                Err(hold) => self.backend.forget(hold.as_raw_fd()),
            }
        }
    }

    pub(super) fn on_accept(&mut self, k: Key, ev: Event) {
        let Some(l) = self.listeners.get_mut(k) else {
            if ev.res >= 0 {
                // SAFETY: the kernel just installed this fd for us; nobody else owns it.
                self.backend.close(unsafe { OwnedFd::from_raw_fd(ev.res) });
            }
            return;
        };
        if !ev.more {
            l.op = None;
        }
        if ev.res >= 0 {
            // SAFETY: as above.
            let fd = unsafe { OwnedFd::from_raw_fd(ev.res) };
            // A connection accepted while the listener is being removed is served
            // all the same (closing it would reset a client the kernel already
            // accepted; after a takeover the socket goes on in the new process);
            // only a worker shutting down closes it.
            if l.removing && self.shutdown.is_some() {
                self.backend.close(fd);
            } else {
                let session = ActiveSession::open(
                    fd,
                    l.shared.clone(),
                    &self.ctx.stats,
                    Origin::Accepted,
                    self.now,
                );
                let ck = self.insert_session(session);
                self.drive(ck);
                // A multishot accept goes on by itself: stop it at a cap, and
                // near one go over to single accepts (cancel; re-armed single).
                if ev.more {
                    if let Some(l) = self.listeners.get(k) {
                        match admits(&l.shared) {
                            Err(cap) => self.hold_at_capacity(k, cap),
                            Ok(()) if !multishot_pays(&l.shared) => {
                                if let Some(id) = l.op {
                                    self.backend.cancel(id);
                                }
                            }
                            Ok(()) => {}
                        }
                    }
                }
            }
        } else {
            let errno = -ev.res;
            if l.removing {
                if !ev.more {
                    self.drop_listener(k);
                }
                return;
            }
            if errno == libc::ECANCELED {
                // Not asked for (the listener is not being removed): accept again
                // below rather than stop accepting for good.
            } else if crate::driver::accept_error_pauses(errno) {
                l.shared.stats.accept_errors.fetch_add(1, Relaxed);
                if let Some(held_back) = l.shared.stats.logs.accept.allow() {
                    tracing::warn!(listener = %l.shared.name, error = %io::Error::from_raw_os_error(errno),
                        more_in_last_10s = held_back, "accept failed; pausing {ACCEPT_PAUSE_MS} ms");
                }
                if !ev.more && !l.paused {
                    l.paused = true;
                    let at = self.now + Duration::from_millis(ACCEPT_PAUSE_MS);
                    self.timers.start(at, Timer::AcceptPause, k);
                }
                return;
            } else if errno == libc::EINTR {
                // SCTP's accept checks for a pending signal before it checks for a
                // non-blocking call, and io_uring's task-work notification counts
                // as one: the accept is simply asked again.
                tracing::debug!(listener = %l.shared.name, "accept interrupted (EINTR); re-armed");
            } else if !crate::driver::accept_error_benign(errno) {
                l.shared.stats.accept_errors.fetch_add(1, Relaxed);
                if let Some(held_back) = l.shared.stats.logs.accept.allow() {
                    tracing::warn!(listener = %l.shared.name, error = %io::Error::from_raw_os_error(errno),
                        more_in_last_10s = held_back, "accept failed");
                }
            }
        }
        if !ev.more {
            self.arm_accept(k);
        }
    }
}

/// Whether listener `l` may accept one more session now ([`FdBudget::admits`]): a
/// proxy session will hold two fds (client and upstream), the others one.
///
/// [`FdBudget::admits`]: crate::driver::budget::FdBudget::admits
fn admits(l: &ListenerShared) -> Result<(), Cap> {
    l.budget.admits(
        &l.netns_fds,
        l.stats.active(),
        l.max_connections,
        session_fds(l),
    )
}

/// Whether listener `l` is far enough from every cap for a multishot accept,
/// which may bring a whole accept queue (up to its backlog) before it can be
/// cancelled.
fn multishot_pays(l: &ListenerShared) -> bool {
    headroom(l) > u64::from(l.backlog) + 64
}

/// How many more sessions listener `l` may open before a cap (counts).
fn headroom(l: &ListenerShared) -> u64 {
    l.budget.headroom(
        &l.netns_fds,
        l.stats.active(),
        l.max_connections,
        session_fds(l),
    )
}

/// The fds one session of listener `l` holds: two for a proxy (client and
/// upstream), one otherwise.
fn session_fds(l: &ListenerShared) -> u64 {
    if matches!(l.action, crate::config::Action::Proxy(_)) {
        2
    } else {
        1
    }
}

/// Attaches a classic BPF socket filter to TCP listener `fd` that drops segments
/// carrying SYN without ACK (new handshakes) and passes everything else, so the
/// handshakes already under way complete into the accept queue while new clients
/// wait for their SYN retransmission (and are refused once the socket closes).
///
/// The filter sees the TCP header at offset 0 (socket filters run on the
/// transport payload, `tcp_filter()` in net/ipv4/tcp_ipv4.c); byte 13 holds the
/// flags (RFC 9293 §3.1: ACK = 0x10, SYN = 0x02). See socket(7) SO_ATTACH_FILTER
/// and Documentation/networking/filter.rst.
///
/// # Errors
/// setsockopt(2) failed: EPERM where the kernel wants CAP_NET_ADMIN for it
/// (measured on Linux 6.18: without CAP_NET_ADMIN it fails even with CAP_SYS_ADMIN
/// or CAP_BPF), ENOMEM.
pub(crate) fn drop_new_handshakes(fd: BorrowedFd<'_>) -> io::Result<()> {
    const LD_B_ABS: u16 = (libc::BPF_LD | libc::BPF_B | libc::BPF_ABS) as u16;
    const JSET_K: u16 = (libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K) as u16;
    const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    let insn = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    let mut prog = [
        insn(LD_B_ABS, 0, 0, 13),    // A = TCP flags
        insn(JSET_K, 2, 0, 0x10),    // ACK set: pass
        insn(JSET_K, 0, 1, 0x02),    // SYN set: drop
        insn(RET_K, 0, 0, 0),        // drop
        insn(RET_K, 0, 0, u32::MAX), // pass the whole segment
    ];
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_mut_ptr(),
    };
    // SAFETY: `fprog` points at `prog`, both alive for the call; the kernel copies
    // the program before setsockopt returns.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            std::ptr::addr_of!(fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
