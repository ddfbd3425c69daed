//! The worker's accepting listeners: arming the (multishot) accept, pausing
//! after EMFILE and the like, removing a listener once its accept has ended.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use super::{Worker, K_ACCEPT};
use crate::driver::active::ActiveSession;
use crate::driver::backend::{Backend, Event, Op};
use crate::driver::slab::Key;
use crate::driver::timers::Timer;
use crate::driver::ACCEPT_PAUSE_MS;
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
        let fd = l.fd.as_raw_fd();
        let id = self.submit(K_ACCEPT, k, Op::Accept { fd });
        if let Some(l) = self.listeners.get_mut(k) {
            l.op = Some(id);
        }
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

    pub(super) fn drop_listener(&mut self, k: Key) {
        if let Some(l) = self.listeners.remove(k) {
            // Release: the sessions it accepted are counted before it is seen gone.
            self.ctx
                .stats
                .listeners
                .fetch_sub(1, std::sync::atomic::Ordering::Release);
            self.backend.close(l.fd);
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
                tracing::warn!(listener = %l.shared.name, error = %io::Error::from_raw_os_error(errno),
                    "accept failed; pausing {ACCEPT_PAUSE_MS} ms");
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
                tracing::warn!(listener = %l.shared.name, error = %io::Error::from_raw_os_error(errno), "accept failed");
            }
        }
        if !ev.more {
            self.arm_accept(k);
        }
    }
}
