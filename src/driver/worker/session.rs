//! The worker's sessions: starting what a session asks for, handing each
//! operation's end back to it, closing it once nothing is in flight, and the
//! peel-offs of one-to-many SCTP associations.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::Ordering::Relaxed;

use super::{
    SessionOps, SessionSlot, Worker, WorkerCtx, K_CONNECT, K_RECV, K_SEND, K_SPLICE_IN,
    K_SPLICE_OUT,
};
use crate::driver::active::{ActiveSession, ConnectStart};
use crate::driver::backend::{Backend, Event, Meta, MultiKind, Op, Owned, SpliceSock};
use crate::driver::shared::Peeled;
use crate::driver::slab::Key;
use crate::driver::timers::Timer;
use crate::driver::wake;
use crate::proto::{Completion, Side};
use crate::proto::{Origin, SEND_STALL_LIMIT};

impl<B: Backend> Worker<B> {
    /// Adds a session just opened; a draining worker tells it at once
    /// ([`crate::proto::Session::on_drain`]), before it is first driven.
    pub(super) fn insert_session(&mut self, mut session: ActiveSession) -> Key {
        if self.draining {
            session.drain(self.now);
        }
        self.sessions.insert(SessionSlot {
            session,
            ops: SessionOps::default(),
        })
    }

    /// Starts sessions for the associations the binder peeled off (one-to-many
    /// proxy) and lets their one-to-many sockets be read again. A socket whose
    /// one-to-many session has gone (listener removed) is closed, which aborts
    /// its association.
    pub(super) fn peeled(&mut self) {
        let done = std::mem::take(&mut *self.ctx.peeled.lock().unwrap_or_else(|p| p.into_inner()));
        for p in done {
            let Some(e) = self.sessions.get_mut(p.session) else {
                if let Ok(fd) = p.result {
                    self.backend.close(fd);
                }
                continue;
            };
            e.session
                .peel_finished(p.result.as_ref().err().map(|_| p.assoc));
            let shared = e.session.listener.clone();
            match p.result {
                Ok(fd) => {
                    let session =
                        ActiveSession::open(fd, shared, &self.ctx.stats, Origin::Peeled, self.now);
                    let nk = self.insert_session(session);
                    self.drive(nk);
                }
                Err(err) => {
                    tracing::warn!(listener = %shared.name, error = %err, "SCTP peel-off failed");
                }
            }
            self.drive(p.session);
        }
    }

    /// Hands session `k`'s peel-off requests to the binder; each answer lands in
    /// this worker's mailbox and wakes it. A request that cannot even be made is
    /// finished at once (the session reads again).
    pub(super) fn request_peel_offs(ctx: &WorkerCtx, k: Key, c: &mut ActiveSession) {
        for assoc in c.take_peel_offs() {
            let dup = c.sockets[0].fd.as_ref().map(OwnedFd::try_clone);
            match (&c.listener.peel, dup) {
                (Some(src), Some(Ok(fd))) => {
                    let (mailbox, wake_fd) = (ctx.peeled.clone(), ctx.wake.clone());
                    src.binder.peel_off(
                        src.netns.clone(),
                        fd,
                        assoc,
                        Box::new(move |result| {
                            mailbox
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .push(Peeled {
                                    session: k,
                                    assoc,
                                    result,
                                });
                            wake(wake_fd.as_raw_fd());
                        }),
                    );
                }
                (_, dup) => {
                    tracing::warn!(listener = %c.listener.name, assoc, error = ?dup.map(|d| d.err()),
                        "cannot ask for an SCTP peel-off; aborting the association");
                    c.peel_finished(Some(assoc));
                }
            }
        }
    }

    /// Starts what session `k` asks for after a completion: its connect, a send
    /// and a receive per side; closes it when it is done.
    pub(super) fn drive(&mut self, k: Key) {
        let now = self.now;
        let Some(e) = self.sessions.get_mut(k) else {
            return;
        };
        if e.ops.closing || e.session.finished() {
            self.close(k);
            return;
        }
        if e.session.take_connect_request() {
            match e.session.start_connect(&self.ctx.wake, now) {
                ConnectStart::Go => {
                    let sock = &mut e.session.sockets[1];
                    if let (Some(fd), Some(addr)) = (sock.raw(), sock.dest.take()) {
                        let id = self.submit(K_CONNECT, k, Op::Connect { fd, addr });
                        match self.sessions.get_mut(k) {
                            Some(e) => e.ops.connect = Some(id),
                            None => return,
                        }
                    }
                }
                ConnectStart::Wait => {
                    if e.session.park() {
                        self.parked.push(k);
                    }
                }
                ConnectStart::Failed => {
                    self.close(k);
                    return;
                }
            }
        }
        // Before arming: a peel-off request that ends at once lets the session
        // read again.
        let Some(e) = self.sessions.get_mut(k) else {
            return;
        };
        Self::request_peel_offs(&self.ctx, k, &mut e.session);
        for side in [Side::Client, Side::Upstream] {
            self.drive_side(k, side);
        }
        if let Some(e) = self.sessions.get_mut(k) {
            e.session.shutdown_drained();
            self.timers.sync(k, &mut e.session);
        }
    }

    /// Starts a send and a receive on `side` of session `k` if wanted and none is
    /// in flight.
    pub(super) fn drive_side(&mut self, k: Key, side: Side) {
        let i = side.index();
        let kind_i = i as u8;
        let Some(e) = self.sessions.get_mut(k) else {
            return;
        };
        let Some(fd) = e.session.sockets[i].raw() else {
            return;
        };
        let message = e.session.is_message_side(side);
        if e.ops.send[i].is_none() && !e.ops.retry[i] {
            let op = if message {
                e.session.take_message(side).map(|(msg, hdr)| Op::SendMsg {
                    fd,
                    msg,
                    hdr,
                    // The send buffer of a one-to-many socket is shared by its
                    // associations: bound the wait for room (see on_send).
                    bound: e.session.many.then_some(SEND_STALL_LIMIT),
                })
            } else {
                e.session
                    .take_send(side)
                    .map(|(buf, off)| Op::Send { fd, buf, off })
            };
            // Nothing left in user space toward this side (bytes queued before
            // the other direction switched to splice(2) go first): the pipe's.
            let (kind, op) = match op {
                Some(op) => (K_SEND + kind_i, Some(op)),
                None => (K_SPLICE_OUT + kind_i, Self::splice_out_op(e, side, fd)),
            };
            if let Some(op) = op {
                let id = self.submit(kind, k, op);
                match self.sessions.get_mut(k) {
                    Some(e) => e.ops.send[i] = Some(id),
                    None => return,
                }
            }
        }
        let Some(e) = self.sessions.get_mut(k) else {
            return;
        };
        if e.ops.recv[i].is_some() || !e.session.wants_recv(side) {
            return;
        }
        if !message && self.caps.splice && e.session.wants_splice(side) {
            // The request stays while the pipe has no room: the splice out of
            // it re-drives the session.
            if let Some(op) = Self::splice_in_op(e, side, fd) {
                e.session.take_recv_request(side);
                let id = self.submit(K_SPLICE_IN + kind_i, k, op);
                if let Some(e) = self.sessions.get_mut(k) {
                    e.ops.recv[i] = Some(id);
                }
                return;
            }
            if e.session.sockets[i].pipe.is_some() {
                return;
            }
        }
        // A multishot receive where the kernel has it; a session whose window
        // a receive can be told (a proxy) gets it as the receive's byte limit,
        // so it ends at the window instead of overshooting it until its cancel
        // lands; without that limit in the kernel, such a session keeps
        // single-shot receives.
        let room = e.session.recv_room(side);
        let multishot = !message
            && self.caps.multishot_recv
            && (room.is_none() || self.caps.multishot_recv_limit);
        let op = if multishot {
            e.ops.multi[i] = true;
            self.ctx.stats.multishot_recv.fetch_add(1, Relaxed);
            Op::RecvMulti {
                fd,
                kind: MultiKind::Stream {
                    limit: room.map_or(0, |r| r.clamp(1, u32::MAX as usize) as u32),
                },
            }
        } else if !message {
            Op::Recv {
                fd,
                poll_first: e.ops.drained[i],
            }
        } else if self.caps.multishot_sctp && e.session.many && e.session.listener.peel.is_none() {
            // A one-to-many echo socket carries every association's messages: a
            // multishot receive takes them in batches instead of one round trip
            // per message. (Not for proxy: reading must stop while a peel-off is
            // pending.)
            e.ops.multi[i] = true;
            Op::RecvMulti {
                fd,
                kind: MultiKind::SctpMany,
            }
        } else {
            match e.session.take_recv_header(side) {
                Some(hdr) => Op::RecvMsg { fd, hdr },
                None => return,
            }
        };
        e.session.take_recv_request(side);
        let id = self.submit(K_RECV + kind_i, k, op);
        if let Some(e) = self.sessions.get_mut(k) {
            e.ops.recv[i] = Some(id);
        }
    }

    /// Closes session `k` now if nothing is in flight, else cancels what is and
    /// closes when the last operation has ended. An aborted session's sockets get
    /// SO_LINGER 0 first, so their peers see a reset.
    pub(super) fn close(&mut self, k: Key) {
        let Some(e) = self.sessions.get_mut(k) else {
            return;
        };
        if !e.ops.closing {
            e.ops.closing = true;
            e.session.linger_if_aborting();
            let ops = &e.ops;
            let ids = [
                ops.recv[0],
                ops.recv[1],
                ops.send[0],
                ops.send[1],
                ops.connect,
            ];
            for id in ids.into_iter().flatten() {
                self.backend.cancel(id);
            }
        }
        let Some(e) = self.sessions.get_mut(k) else {
            return;
        };
        if e.ops.count() == 0 {
            if let Some(mut e) = self.sessions.remove(k) {
                for sock in &mut e.session.sockets {
                    if let Some(fd) = sock.fd.take() {
                        self.backend.close(fd);
                    }
                    if let Some(p) = sock.pipe.take() {
                        self.backend.close(p.r);
                        self.backend.close(p.w);
                    }
                }
            }
        }
    }

    pub(super) fn on_recv(&mut self, k: Key, side: Side, ev: Event) {
        let now = self.now;
        let i = side.index();
        let Some(e) = self.sessions.get_mut(k) else {
            return;
        };
        if e.ops.multi[i] {
            self.on_recv_multi(k, side, ev);
            return;
        }
        e.ops.recv[i] = None;
        if let Owned::RecvHeader(h) = ev.owned {
            e.session.return_recv_header(side, h);
        }
        if !e.ops.closing {
            let res = ev.res;
            if res == -libc::ENOBUFS {
                // Back-pressure from the buffer pool, not an error: retry once
                // this batch has returned its buffers.
                self.ctx.stats.enobufs.fetch_add(1, Relaxed);
                e.session.io.side(side).recv();
                self.starved.push(k);
                return;
            }
            if res == -libc::EAGAIN || res == -libc::ECANCELED {
                // A receive retried in io-wq on a non-blocking socket after a
                // spurious wake-up (EAGAIN): nothing was read; ask again.
                e.session.io.side(side).recv();
            } else if e.session.is_message_side(side) && res >= 0 {
                let (flags, info) = match ev.meta {
                    Meta::Message { flags, info } => (flags, info),
                    _ => (0, Default::default()),
                };
                let data = ev.buf.map_or(&[][..], |b| self.backend.data(b));
                e.session.complete_message(side, data, flags, info, now);
            } else if res > 0 {
                e.ops.drained[i] = (res as usize) < self.caps.recv_buf_size;
                if !e.ops.drained[i] {
                    e.session.note_full_receive(side);
                }
                let data = ev.buf.map_or(&[][..], |b| self.backend.data(b));
                e.session.complete(side, Completion::Recv(data), now);
            } else if res == 0 {
                e.session.complete(side, Completion::Eof, now);
            } else {
                e.session.complete(side, Completion::Error(-res), now);
            }
        }
        self.drive(k);
    }

    /// One event of a multishot receive: of a one-to-many echo socket (SCTP
    /// pieces) or of a stream side (bytes). The receive is cancelled when the
    /// session stops asking for more (its window is full); events that come
    /// before the cancel lands still carry data, which the session takes (never
    /// dropped), so a side overshoots its window by at most what the backend's
    /// buffers hold ([`crate::driver::backend::Op::RecvMulti`]). Its last event
    /// lacks `more`; the next [`Worker::drive`] re-arms it if the session still
    /// asks.
    pub(super) fn on_recv_multi(&mut self, k: Key, side: Side, ev: Event) {
        let now = self.now;
        let i = side.index();
        let Some(e) = self.sessions.get_mut(k) else {
            return;
        };
        let message = e.session.is_message_side(side);
        // A cancel of ours was on its way: a stream session's request stands as
        // it is (it asks again itself once its window has room).
        let cancelled = e.ops.cancelling[i];
        if !ev.more {
            e.ops.recv[i] = None;
            e.ops.multi[i] = false;
            e.ops.cancelling[i] = false;
        }
        if e.ops.closing {
            // Cancelled or not, nothing more goes to a closing session.
        } else if ev.res > 0 || (ev.res == 0 && message) {
            let data = ev.buf.map_or(&[][..], |b| self.backend.data(b));
            if message {
                if let Meta::Message { flags, info } = ev.meta {
                    e.session.complete_message(side, data, flags, info, now);
                }
            } else {
                if ev.res as usize >= self.caps.recv_buf_size {
                    e.session.note_full_receive(side);
                }
                e.session.complete(side, Completion::Recv(data), now);
            }
            // Still running but no longer wanted: stop it (its last events may
            // still carry data, which the session takes). Once a cancel is on its
            // way, a request made meanwhile is kept for the re-arm.
            let wanted = e.session.wants_recv(side);
            if ev.more {
                if wanted && !e.ops.cancelling[i] {
                    e.session.take_recv_request(side);
                } else if !wanted && !e.ops.cancelling[i] {
                    if let Some(id) = e.ops.recv[i] {
                        e.ops.cancelling[i] = true;
                        self.backend.cancel(id);
                    }
                }
            }
        } else if ev.res == 0 {
            e.session.complete(side, Completion::Eof, now);
        } else if ev.res == -libc::ENOBUFS {
            // Back-pressure from the buffer pool: re-armed once this batch has
            // given its buffers back.
            self.ctx.stats.enobufs.fetch_add(1, Relaxed);
            if message || !cancelled {
                e.session.io.side(side).recv();
            }
            if !ev.more {
                self.starved.push(k);
                return;
            }
        } else if ev.res == -libc::ECANCELED || ev.res == -libc::EAGAIN {
            if !ev.more && (message || !cancelled) {
                e.session.io.side(side).recv();
            }
        } else {
            e.session.complete(side, Completion::Error(-ev.res), now);
        }
        self.drive(k);
    }

    pub(super) fn on_send(&mut self, k: Key, side: Side, ev: Event) {
        let now = self.now;
        let i = side.index();
        let Some(e) = self.sessions.get_mut(k) else {
            return;
        };
        e.ops.send[i] = None;
        let res = ev.res;
        match ev.owned {
            _ if e.ops.closing => {}
            Owned::Bytes(buf) if res >= 0 => e.session.sent(side, buf, res as usize, now),
            Owned::Message(msg, hdr) if res >= 0 => e.session.message_sent(side, msg, hdr, now),
            Owned::Bytes(buf) if res == -libc::ECANCELED => e.session.restore_send(side, buf),
            Owned::Message(msg, hdr) if res == -libc::ECANCELED && e.session.many => {
                // Not closing, so the bound on the wait for room cancelled it: the
                // association took nothing for SEND_STALL_LIMIT.
                e.session.restore_message(side, msg, hdr);
                e.session.send_stalled(side);
            }
            owned if res == -libc::EAGAIN => {
                // No room (an SCTP message goes whole and "writable" only means
                // "some room"; or a send retried in io-wq on a non-blocking
                // socket). Nothing was sent: wait a little (doubling), then send
                // the same again.
                match owned {
                    Owned::Bytes(buf) => e.session.restore_send(side, buf),
                    Owned::Message(msg, hdr) => e.session.restore_message(side, msg, hdr),
                    _ => {}
                }
                let wait = e.session.send_would_block(side, now);
                tracing::trace!(listener = %e.session.listener.name, ?wait, "send found no room (EAGAIN)");
                if !wait.is_zero() {
                    e.ops.retry[i] = true;
                    let kind = if i == 0 { 0 } else { 1 };
                    self.timers.start(now + wait, Timer::SendRetry(kind), k);
                }
            }
            Owned::Message(_, hdr) => {
                e.session.sockets[i].send_hdr = Some(hdr);
                e.session.send_failed(side, -res, now);
            }
            _ => e.session.complete(side, Completion::Error(-res), now),
        }
        self.drive(k);
    }

    pub(super) fn on_connect(&mut self, k: Key, ev: Event) {
        let now = self.now;
        if let Some(e) = self.sessions.get_mut(k) {
            e.ops.connect = None;
            if !e.ops.closing {
                let c = if ev.res == 0 {
                    Completion::Connected
                } else {
                    Completion::Error(-ev.res)
                };
                e.session.complete(Side::Upstream, c, now);
            }
        }
        self.drive(k);
    }

    /// The splice that moves bytes from `side`'s socket into its direction's
    /// pipe (made now if need be), if the window and the pipe have room: at
    /// most what the window allows (`buffer_bytes` minus what the other side
    /// has unsent, pipe included) and the pipe can take. It waits for the
    /// socket first (`poll_first`) only when the last one found it empty and the
    /// pipe is empty (so that an EAGAIN can only be the socket's). `None`: no
    /// pipe (relay through user space), no room, or the pipe was full (EAGAIN)
    /// and no splice out of it has ended since.
    fn splice_in_op(e: &mut SessionSlot, side: Side, fd: std::os::fd::RawFd) -> Option<Op> {
        let i = side.index();
        if e.ops.fill_blocked[i] || !e.session.sockets[side.other().index()].ready() {
            return None;
        }
        let room = e.session.recv_room(side)?;
        let piped = e.session.io.sides[side.other().index()].piped;
        let pipe = e.session.direction_pipe(side)?;
        let len = room
            .min(pipe.cap.saturating_sub(piped))
            .min(u32::MAX as usize) as u32;
        if len == 0 {
            return None;
        }
        let fd_out = pipe.w.as_raw_fd();
        e.ops.fill_len[i] = len;
        Some(Op::Splice {
            fd_in: fd,
            fd_out,
            len,
            sock: SpliceSock::In,
            poll_first: e.ops.drained[i] && piped == 0,
        })
    }

    /// The splice that moves everything in the pipe toward `side` (the other
    /// side's direction) out to its socket `fd`; `None` if that pipe is empty.
    /// After an EAGAIN it waits for the socket to be writable first.
    fn splice_out_op(e: &mut SessionSlot, side: Side, fd: std::os::fd::RawFd) -> Option<Op> {
        let i = side.index();
        let piped = e.session.io.sides[i].piped;
        if piped == 0 || !e.session.sockets[i].ready() {
            return None;
        }
        let pipe = e.session.sockets[side.other().index()].pipe.as_ref()?;
        Some(Op::Splice {
            fd_in: pipe.r.as_raw_fd(),
            fd_out: fd,
            len: piped.min(u32::MAX as usize) as u32,
            sock: SpliceSock::Out,
            poll_first: e.ops.splice_wait[i],
        })
    }

    /// A splice from `side`'s socket into its direction's pipe ended: bytes
    /// moved count as a receive would ([`ActiveSession::piped`]), 0 is the
    /// peer's FIN, EAGAIN asks again (after the next splice out if the pipe
    /// may be full, after readiness if the socket was empty), other errors end
    /// the session as a receive's would.
    pub(super) fn on_splice_in(&mut self, k: Key, side: Side, ev: Event) {
        let now = self.now;
        let i = side.index();
        let Some(e) = self.sessions.get_mut(k) else {
            return;
        };
        e.ops.recv[i] = None;
        if !e.ops.closing {
            let res = ev.res;
            if res > 0 {
                e.ops.drained[i] = (res as u32) < e.ops.fill_len[i];
                e.session.piped(side, res as usize, now);
            } else if res == 0 {
                e.session.complete(side, Completion::Eof, now);
            } else if res == -libc::EAGAIN || res == -libc::ECANCELED || res == -libc::EINTR {
                if res == -libc::EAGAIN {
                    if e.session.io.sides[side.other().index()].piped > 0 {
                        e.ops.fill_blocked[i] = true;
                    } else {
                        e.ops.drained[i] = true;
                    }
                }
                e.session.io.side(side).recv();
            } else {
                e.session.complete(side, Completion::Error(-res), now);
            }
        }
        self.drive(k);
    }

    /// A splice from the pipe toward `side` out to its socket ended: bytes
    /// moved count as a send's ([`ActiveSession::spliced_out`]) and let the
    /// pipe's splice in go again; EAGAIN waits for the socket to be writable;
    /// other errors end the session as a send's would.
    pub(super) fn on_splice_out(&mut self, k: Key, side: Side, ev: Event) {
        let now = self.now;
        let i = side.index();
        let Some(e) = self.sessions.get_mut(k) else {
            return;
        };
        e.ops.send[i] = None;
        e.ops.fill_blocked[side.other().index()] = false;
        if !e.ops.closing {
            let res = ev.res;
            if res > 0 {
                e.ops.splice_wait[i] = false;
                e.session.spliced_out(side, res as usize, now);
            } else if res == -libc::EAGAIN || res == 0 {
                e.ops.splice_wait[i] = true;
            } else if res != -libc::ECANCELED && res != -libc::EINTR {
                e.session.complete(side, Completion::Error(-res), now);
            }
        }
        self.drive(k);
    }
}
