//! The worker's UDP sockets: one multishot receive per listener and per
//! session upstream socket, handed to the shared UDP logic ([`crate::driver::udp`]).

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering::Relaxed;

use super::{Worker, K_UDP_LISTENER, K_UDP_UPSTREAM};
use crate::driver::backend::{Backend, Event, Meta, MultiKind, Op, OpId};
use crate::driver::slab::Key;
use crate::driver::udp::{After, Datagram};

impl<B: Backend> Worker<B> {
    /// The fd, in-flight receive and closing flag of a UDP listener
    /// (`K_UDP_LISTENER`) or upstream socket (`K_UDP_UPSTREAM`).
    pub(super) fn udp_socket(
        &mut self,
        kind: u8,
        k: Key,
    ) -> Option<(i32, &mut Option<OpId>, &mut bool)> {
        if kind == K_UDP_LISTENER {
            let l = self.udp.listeners.get_mut(k)?;
            Some((l.fd.as_raw_fd(), &mut l.recv, &mut l.closing))
        } else {
            let u = self.udp.upstreams.get_mut(k)?;
            Some((u.fd.as_raw_fd(), &mut u.recv, &mut u.closing))
        }
    }

    /// Starts the multishot receive of a UDP socket, unless one runs or it closes.
    pub(super) fn arm_udp(&mut self, kind: u8, k: Key) {
        if self.shutdown.is_some() {
            return;
        }
        let Some((fd, recv, closing)) = self.udp_socket(kind, k) else {
            return;
        };
        if recv.is_some() || *closing {
            return;
        }
        let op = Op::RecvMulti {
            fd,
            kind: MultiKind::Datagram,
        };
        let id = self.submit(kind, k, op);
        if let Some((_, recv, _)) = self.udp_socket(kind, k) {
            *recv = Some(id);
        }
    }

    /// One event of a UDP multishot receive.
    pub(super) fn on_udp(&mut self, kind: u8, k: Key, ev: Event) {
        let now = self.now;
        let mut watch = None;
        if let (
            true,
            Some(b),
            Meta::Datagram {
                from,
                to,
                truncated,
            },
        ) = (ev.res >= 0, ev.buf, ev.meta)
        {
            let d = Datagram {
                data: self.backend.data(b),
                from,
                to,
                truncated,
            };
            if kind == K_UDP_LISTENER {
                if let After::Watch(uk) = self.udp.on_listener_datagram(k, &d, &self.ctx.wake, now)
                {
                    watch = Some(uk);
                }
            } else {
                self.udp.on_upstream_datagram(k, &d, now);
            }
        }
        let mut starved = false;
        let mut broken = false;
        if ev.res < 0 {
            match -ev.res {
                libc::ENOBUFS => {
                    self.ctx.stats.enobufs.fetch_add(1, Relaxed);
                    starved = true;
                }
                libc::ECANCELED | libc::EAGAIN | libc::EINTR => {}
                errno if kind == K_UDP_UPSTREAM => self.udp.on_upstream_error(k, errno),
                errno @ (libc::ENOMEM | libc::EINVAL | libc::ENOSYS) => {
                    // The receive cannot be set up (no buffer memory): not served.
                    tracing::error!(worker = self.ctx.index, error = %io::Error::from_raw_os_error(errno),
                        "cannot receive on a udp listener; it is not served by this worker");
                    broken = true;
                }
                errno => tracing::debug!(errno, "udp listener receive failed; re-arming"),
            }
        }
        if let Some(uk) = watch {
            self.arm_udp(K_UDP_UPSTREAM, uk);
        }
        if !ev.more {
            let closing = self.udp_socket(kind, k).map(|(_, recv, closing)| {
                *recv = None;
                *closing
            });
            match closing {
                // Its receive has ended: the socket can go.
                Some(true) => self.udp_remove(kind, k),
                Some(false) if broken => {}
                Some(false) if starved => self.udp_starved.push((kind, k)),
                Some(false) => self.arm_udp(kind, k),
                None => {}
            }
        }
    }

    /// Ends a UDP socket: at once if no receive is in flight, else after the
    /// cancelled receive's last event.
    pub(super) fn udp_close(&mut self, kind: u8, k: Key) {
        let recv = self.udp_socket(kind, k).map(|(_, recv, closing)| {
            *closing = true;
            *recv
        });
        match recv {
            Some(Some(id)) => self.backend.cancel(id),
            Some(None) => self.udp_remove(kind, k),
            None => {}
        }
    }

    /// Closes a UDP socket whose receive has ended.
    pub(super) fn udp_remove(&mut self, kind: u8, k: Key) {
        let fd = if kind == K_UDP_LISTENER {
            let l = self.udp.listeners.remove(k);
            if l.is_some() {
                self.ctx
                    .stats
                    .listeners
                    .fetch_sub(1, std::sync::atomic::Ordering::Release);
            }
            l.map(|l| l.fd)
        } else {
            self.udp.upstreams.remove(k).map(|u| u.fd)
        };
        if let Some(fd) = fd {
            self.backend.close(fd);
        }
    }
}
