//! One session's sockets and its driver-neutral bookkeeping ([`ActiveSession`]).
//!
//! A [`ActiveSession`] turns the session's requests ([`SessionIo`]) into what the worker
//! starts next (bytes to send, a message to send, a receive, a connect) and the
//! worker's events back into [`Completion`]s, counting bytes and failures. What
//! the kernel may touch during an operation leaves the [`SideSocket`] while it is in
//! flight (moved into the [`super::backend::Op`]) and comes back with its event.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::pipe::Pipe;
use super::shared::{ListenerShared, WorkerStats};
use super::upstream;
use crate::config::{Proto, SpliceMode};
use crate::proto::{
    Completion, ConnInfo, Origin, OutMessage, Piece, SendBackoff, SendFailed, Session, SessionIo,
    Side, TimeoutKind, SEND_STALL_LIMIT,
};
use crate::sctp::{MsgInfo, RecvHeader, SendHeader};

/// One socket of a session: the client's or the upstream's.
pub(crate) struct SideSocket {
    /// The socket; `None` for an upstream not yet opened.
    pub fd: Option<OwnedFd>,
    /// Bytes being sent, from offset `sent`; moved into the send operation while
    /// one is in flight (empty here meanwhile).
    pub sending: Vec<u8>,
    /// Bytes of `sending` already sent.
    pub sent: usize,
    /// shutdown(SHUT_WR) was done.
    pub write_shut: bool,
    /// A connect is in progress: no send or receive may start yet.
    pub connecting: bool,
    /// The connect destination, until the connect operation takes it.
    pub dest: Option<Box<socket2::SockAddr>>,
    /// SCTP: the socket carries whole messages (recvmsg/sendmsg).
    pub message: bool,
    /// SCTP: the recvmsg header; `None` while a receive has it.
    pub recv_hdr: Option<Box<RecvHeader>>,
    /// SCTP: the sendmsg header; `None` while a send has it.
    pub send_hdr: Option<Box<SendHeader>>,
    /// SCTP: the message being sent (taken from the queue, not yet sent whole);
    /// `None` while a send operation holds it.
    pub sending_msg: Option<OutMessage>,
    /// Since when, and how many times in a row, a send found no room (EAGAIN).
    pub backoff: SendBackoff,
    /// The pipe of the direction from this socket to the other side's, once
    /// that direction relays with splice(2) (for the rest of the session).
    pub pipe: Option<Pipe>,
    /// A receive on this socket filled a whole receive buffer: a bulk transfer
    /// (what `splice = "auto"` waits for).
    pub bulk: bool,
    /// This direction will not splice: its pipe could not be had (fd budget,
    /// pipe2(2) failed); it relays through user space.
    pub no_splice: bool,
}

impl SideSocket {
    fn new(fd: Option<OwnedFd>) -> SideSocket {
        SideSocket {
            fd,
            sending: Vec::new(),
            sent: 0,
            write_shut: false,
            connecting: false,
            dest: None,
            message: false,
            recv_hdr: None,
            send_hdr: None,
            sending_msg: None,
            backoff: SendBackoff::default(),
            pipe: None,
            bulk: false,
            no_splice: false,
        }
    }

    /// The raw fd, when the side is open.
    pub fn raw(&self) -> Option<RawFd> {
        self.fd.as_ref().map(AsRawFd::as_raw_fd)
    }

    /// Whether sends and receives may be issued (open, and not connecting).
    pub fn ready(&self) -> bool {
        self.fd.is_some() && !self.connecting
    }

    /// Makes this an SCTP side, with its own recvmsg and sendmsg headers.
    fn set_message(&mut self) {
        self.message = true;
        self.recv_hdr = Some(RecvHeader::new());
        self.send_hdr = Some(SendHeader::new());
    }
}

/// What [`ActiveSession::start_connect`] got.
pub(crate) enum ConnectStart {
    /// The socket is in the upstream side; issue the connect to `sock.dest`.
    Go,
    /// The namespace's socket pool is empty; retry when the worker is woken.
    Wait,
    /// No socket could be had; the session was told (Error completion).
    Failed,
}

/// One session: its sockets, its protocol state machine and the driver-neutral
/// I/O state. Both drivers use it, so the bookkeeping is the same for both.
pub(crate) struct ActiveSession {
    pub sockets: [SideSocket; 2],
    pub session: Session,
    pub io: SessionIo,
    pub listener: Arc<ListenerShared>,
    pub failed: bool,
    /// The upstream address chosen for this session.
    pub upstream: Option<SocketAddr>,
    /// The earliest deadline registered in the worker's [`Timers`] for this session.
    pub timer: Option<Instant>,
    /// The owning worker's counters (its open-sessions gauge).
    worker: Arc<WorkerStats>,
    /// Waiting in the worker's list of sessions for an upstream socket.
    parked: bool,
    /// The session of a whole one-to-many SCTP socket (not one connection: it is
    /// not counted as accepted, and its associations are counted instead).
    pub many: bool,
    /// The fds it charged to the session budget (client, upstream, two per
    /// splice pipe; 0 for a one-to-many socket, which is the listener), given
    /// back in Drop.
    charged_fds: u32,
}

impl ActiveSession {
    /// Wraps a socket that came to be as `how` (accepted, a one-to-many
    /// listener socket, or peeled off one) and runs the session's `on_open`. A
    /// one-to-many socket is one session for all of its associations and is not
    /// counted as accepted (its associations are); the others are.
    pub fn open(
        fd: OwnedFd,
        listener: Arc<ListenerShared>,
        worker: &Arc<WorkerStats>,
        how: Origin,
        now: Instant,
    ) -> ActiveSession {
        let many = how == Origin::Many;
        let charged_fds = u32::from(!many);
        if !many {
            // Released in Drop, through the listener this session keeps.
            listener.budget.charge_unguarded(&listener.netns_fds, 1);
        }
        if !many {
            listener.stats.accepted.fetch_add(1, Relaxed);
            worker.sessions.fetch_add(1, Relaxed);
        }
        // TCP_NODELAY: inherited from the listener socket (the binder sets it).
        let sctp = listener.proto == Proto::Sctp;
        if many {
            many_idle_timeout(std::os::fd::AsFd::as_fd(&fd), &listener);
        }
        let info = if Session::needs_info(&listener.action) {
            let s = socket2::SockRef::from(&fd);
            ConnInfo {
                peer: s.peer_addr().ok().and_then(|a| a.as_socket()),
                local: s.local_addr().ok().and_then(|a| a.as_socket()),
            }
        } else {
            ConnInfo {
                peer: None,
                local: None,
            }
        };
        let session = Session::for_listener(&listener.action, listener.proto, &listener.sctp, how);
        let mut client = SideSocket::new(Some(fd));
        if sctp {
            client.set_message();
        }
        let mut io = SessionIo::default();
        // Echo's idle timeout: TCP, and one-to-one SCTP (a one-to-many socket
        // gets SCTP_AUTOCLOSE instead: `many_idle_timeout` above).
        if !many
            && matches!(listener.action, crate::config::Action::Echo)
            && listener.idle_timeout_ms > 0
        {
            io.idle_timeout_ms = u32::try_from(listener.idle_timeout_ms).unwrap_or(u32::MAX);
        }
        let mut c = ActiveSession {
            sockets: [client, SideSocket::new(None)],
            session,
            io,
            listener,
            failed: false,
            upstream: None,
            timer: None,
            worker: worker.clone(),
            parked: false,
            many,
            charged_fds,
        };
        c.session
            .on_open(&c.listener.action, &info, &c.listener.netns, &mut c.io, now);
        c
    }

    /// Tells the session that the process is stopping (graceful shutdown), at
    /// `now`; see [`Session::on_drain`].
    pub fn drain(&mut self, now: Instant) {
        self.session.on_drain(&mut self.io, now);
    }

    /// Reports a completion other than a send on `side` to the session, counting
    /// bytes and upstream failures (and logging those, naming listener and upstream).
    pub fn complete(&mut self, side: Side, c: Completion<'_>, now: Instant) {
        self.account(side, &c, now);
        self.session.on_complete(side, c, &mut self.io, now);
        if let Some(kind) = self.io.timed_out.take() {
            let st = &self.listener.stats;
            match kind {
                TimeoutKind::Idle => &st.timeouts_idle,
                TimeoutKind::Header => &st.timeouts_header,
                TimeoutKind::KeepAlive => &st.timeouts_keepalive,
            }
            .fetch_add(1, Relaxed);
        }
        self.take_sctp_events();
    }

    /// Counts completion `c` on `side` (bytes, errors, upstream failures, logging
    /// those) before the session sees it.
    fn account(&mut self, side: Side, c: &Completion<'_>, now: Instant) {
        let st = &self.listener.stats;
        match c {
            Completion::Recv(d) if side == Side::Client => {
                st.bytes_in.fetch_add(d.len() as u64, Relaxed);
            }
            Completion::Message(p) if side == Side::Client && !p.notification => {
                st.bytes_in.fetch_add(p.data.len() as u64, Relaxed);
            }
            Completion::Error(_) if self.many => {}
            &Completion::Error(errno) => {
                self.failed = true;
                if side == Side::Upstream && self.sockets[1].connecting {
                    self.upstream_failed(errno, now);
                } else if errno == libc::ECONNRESET || errno == libc::EPIPE {
                    st.resets.fetch_add(1, Relaxed);
                }
            }
            Completion::Timeout if self.sockets[1].connecting || self.awaiting_upstream() => {
                self.failed = true;
                self.upstream_failed(libc::ETIMEDOUT, now);
            }
            Completion::Connected => {
                self.sockets[1].connecting = false;
                self.sockets[1].dest = None;
            }
            _ => {}
        }
    }

    /// Counts what an SCTP session noted: messages over the limit, and (one-to-many)
    /// associations that came up or ended.
    fn take_sctp_events(&mut self) {
        let st = &self.listener.stats;
        let io = &mut self.io;
        add_taken(&st.message_too_big, &mut io.too_big);
        add_taken(&st.accepted, &mut io.assoc_up);
        add_taken(&st.closed, &mut io.assoc_down);
        add_taken(&st.send_drops, &mut io.dropped);
        if std::mem::take(&mut io.lost) {
            st.resets.fetch_add(1, Relaxed);
            self.failed = true;
        }
    }

    /// How many more bytes side `side` may take before its window is full
    /// (bytes), for sessions whose window a receive can be told: a proxy's
    /// `buffer_bytes` ([`crate::proto::ProxySession::recv_room`]); `None` for
    /// the others (and during a lingering close), whose receives are stopped by
    /// cancelling them.
    pub fn recv_room(&self, side: Side) -> Option<usize> {
        match &self.session {
            Session::Proxy(p) if self.io.linger.is_none() => Some(p.recv_room(side, &self.io)),
            _ => None,
        }
    }

    /// Whether the direction from `side` (its socket → the other side's) relays
    /// with splice(2) from its next receive on: it already does (it has its
    /// pipe), or a TCP proxy listener's `splice` asks for it now (`"on"`;
    /// `"auto"` once a receive on `side` filled a whole buffer) and its pipe
    /// was not refused before.
    pub fn wants_splice(&self, side: Side) -> bool {
        let sock = &self.sockets[side.index()];
        if sock.pipe.is_some() {
            return true;
        }
        let Session::Proxy(p) = &self.session else {
            return false;
        };
        if sock.no_splice || sock.message || self.listener.proto != Proto::Tcp {
            return false;
        }
        match p.config().splice {
            SpliceMode::Off => false,
            SpliceMode::On => true,
            SpliceMode::Auto => sock.bulk,
        }
    }

    /// A receive on `side` filled a whole receive buffer (bytes were waiting):
    /// noted for `splice = "auto"`.
    pub fn note_full_receive(&mut self, side: Side) {
        self.sockets[side.index()].bulk = true;
    }

    /// The pipe of the direction from `side`, made now if it has none: sized to
    /// the window (`buffer_bytes`), its two fds charged to the fd budget (given
    /// back with the session's). `None` if the budget or pipe2(2) refuses; that
    /// direction then relays through user space for good.
    pub fn direction_pipe(&mut self, side: Side) -> Option<&Pipe> {
        let i = side.index();
        if self.sockets[i].pipe.is_none() && !self.sockets[i].no_splice {
            let bytes = match &self.session {
                Session::Proxy(p) => p.config().buffer_bytes,
                _ => return None,
            };
            let l = &self.listener;
            if self.charged_fds > 0 && l.budget.try_charge_fds(&l.netns_fds, 2) {
                match Pipe::new(bytes) {
                    Ok(p) => {
                        self.charged_fds += 2;
                        self.sockets[i].pipe = Some(p);
                    }
                    Err(e) => {
                        l.budget.release_fds(&l.netns_fds, 2);
                        tracing::debug!(listener = %l.name, error = %e,
                            "no pipe for splice(2); this direction relays through user space");
                        self.sockets[i].no_splice = true;
                    }
                }
            } else {
                self.sockets[i].no_splice = true;
            }
        }
        self.sockets[i].pipe.as_ref()
    }

    /// `n` bytes received on `side` were spliced into its direction's pipe, at
    /// `now`: counted (bytes in from the client), added to the other side's
    /// unsent bytes (the window), told to the session.
    pub fn piped(&mut self, side: Side, n: usize, now: Instant) {
        self.io.sides[side.other().index()].piped += n;
        if side == Side::Client {
            self.listener.stats.bytes_in.fetch_add(n as u64, Relaxed);
        }
        if let Session::Proxy(p) = &mut self.session {
            p.on_piped(side, &mut self.io, now);
        }
    }

    /// `n` bytes of the pipe toward `side` were spliced out to its socket, at
    /// `now`: counted (bytes out to the client) and told to the session as a
    /// send ([`Completion::Sent`]).
    pub fn spliced_out(&mut self, side: Side, n: usize, now: Instant) {
        let io = &mut self.io.sides[side.index()];
        io.piped = io.piped.saturating_sub(n);
        if side == Side::Client {
            self.listener.stats.bytes_out.fetch_add(n as u64, Relaxed);
        }
        self.session
            .on_complete(side, Completion::Sent(n), &mut self.io, now);
    }

    /// Whether `side` carries SCTP messages (recvmsg/sendmsg) instead of bytes.
    pub fn is_message_side(&self, side: Side) -> bool {
        self.sockets[side.index()].message
    }

    /// Reports a receive on an SCTP side: `n` bytes of `data` with recvmsg `flags`
    /// (MSG_EOR, MSG_NOTIFICATION) and `info`; 0 bytes is the end of the association.
    pub fn complete_message(
        &mut self,
        side: Side,
        data: &[u8],
        flags: i32,
        info: MsgInfo,
        now: Instant,
    ) {
        if data.is_empty() {
            self.complete(side, Completion::Eof, now);
            return;
        }
        self.complete(
            side,
            Completion::Message(Piece {
                data,
                info,
                eor: flags & libc::MSG_EOR != 0,
                notification: flags & crate::sctp::MSG_NOTIFICATION != 0,
            }),
            now,
        );
    }

    /// Takes SCTP side `side`'s recvmsg header for a receive operation (give it
    /// back with [`ActiveSession::return_recv_header`]). `None` while a receive has it.
    pub fn take_recv_header(&mut self, side: Side) -> Option<Box<RecvHeader>> {
        self.sockets[side.index()].recv_hdr.take()
    }

    /// Gives back the recvmsg header a receive operation held.
    pub fn return_recv_header(&mut self, side: Side, hdr: Box<RecvHeader>) {
        self.sockets[side.index()].recv_hdr = Some(hdr);
    }

    /// The next message to send on SCTP side `side` and the side's sendmsg header,
    /// both moved out for the send operation: the one being sent, else the next
    /// from the session's queue. They come back with [`ActiveSession::message_sent`] or
    /// [`ActiveSession::restore_message`]. `None`: nothing to send, a send holds them, or
    /// the side is not ready.
    pub fn take_message(&mut self, side: Side) -> Option<(OutMessage, Box<SendHeader>)> {
        let i = side.index();
        let sock = &mut self.sockets[i];
        if !sock.ready() || sock.send_hdr.is_none() {
            return None;
        }
        let m = match sock.sending_msg.take() {
            Some(m) => m,
            None => {
                let io = &mut self.io.sides[i];
                let m = io.msgs.pop_front()?;
                io.msg_bytes -= m.data.len();
                io.in_flight = m.data.len();
                m
            }
        };
        let hdr = sock.send_hdr.take()?;
        Some((m, hdr))
    }

    /// A send operation ended without sending its message whole (no room, or
    /// cancelled): message and header go back to side `side`; the message is the
    /// one to send next.
    pub fn restore_message(&mut self, side: Side, msg: OutMessage, hdr: Box<SendHeader>) {
        let sock = &mut self.sockets[side.index()];
        sock.sending_msg = Some(msg);
        sock.send_hdr = Some(hdr);
    }

    /// The message from [`ActiveSession::take_message`] on `side` was sent whole; its
    /// header comes back to the sock.
    pub fn message_sent(
        &mut self,
        side: Side,
        msg: OutMessage,
        hdr: Box<SendHeader>,
        now: Instant,
    ) {
        let i = side.index();
        self.sockets[i].backoff.reset();
        self.sockets[i].send_hdr = Some(hdr);
        let n = msg.data.len();
        self.io.sides[i].in_flight = 0;
        if side == Side::Client {
            self.listener.stats.bytes_out.fetch_add(n as u64, Relaxed);
        }
        self.session
            .on_complete(side, Completion::Sent(n), &mut self.io, now);
        self.take_sctp_events();
    }

    /// A send on `side` found no room (EAGAIN; nothing was sent). Returns how long
    /// to wait before the same send is tried again: 1 ms, doubling up to
    /// [`SEND_RETRY_MAX_MS`], or zero when the send queue changed and the next send
    /// can go now. On a one-to-many socket the room is shared by every association
    /// (net.sctp.sndbuf_policy 0): an association whose peer has not taken a
    /// message for [`SEND_STALL_LIMIT`] would hold up all the others, so it is
    /// aborted (SCTP_ABORT) and its queued messages dropped and counted.
    pub fn send_would_block(&mut self, side: Side, now: Instant) -> Duration {
        let backoff = &mut self.sockets[side.index()].backoff;
        let wait = backoff.no_room(now);
        if self.many && backoff.stalled(now) && self.send_stalled(side) {
            return Duration::ZERO;
        }
        wait
    }

    /// The message being sent on one-to-many side `side` found no room for
    /// [`SEND_STALL_LIMIT`]: its association is aborted (an SCTP_ABORT goes first)
    /// and every message queued for it dropped and counted. `false` if nothing
    /// was being sent.
    pub fn send_stalled(&mut self, side: Side) -> bool {
        let i = side.index();
        let Some(head) = self.sockets[i].sending_msg.take() else {
            return false;
        };
        let assoc = head.info.assoc;
        let dropped = 1 + self.io.abort_association(side, assoc);
        self.io.sides[i].in_flight = 0;
        self.sockets[i].backoff.reset();
        self.listener
            .stats
            .send_drops
            .fetch_add(dropped as u64, Relaxed);
        tracing::warn!(listener = %self.listener.name, assoc, dropped,
            "SCTP association took no data for {SEND_STALL_LIMIT:?}; aborted so the others on its socket can go on");
        true
    }

    /// Associations the session asked to peel off (one-to-many proxy).
    pub fn take_peel_offs(&mut self) -> Vec<i32> {
        std::mem::take(&mut self.io.peel_off)
    }

    /// One peel-off asked for by this session ended (the new session, if any, is
    /// the driver's): the one-to-many socket may be read again when none is left.
    /// `failed`: the association that could not be peeled off (it is aborted).
    pub fn peel_finished(&mut self, failed: Option<i32>) {
        if let Session::Sctp(s) = &mut self.session {
            s.on_peeled(failed, &mut self.io);
        }
    }

    /// A send on `side` failed with `errno`: the session decides what is lost
    /// ([`Session::on_send_failed`]); dropped messages are counted, an error that
    /// ends the session is counted as [`ActiveSession::complete`] would.
    pub fn send_failed(&mut self, side: Side, errno: i32, now: Instant) {
        self.sockets[side.index()].sending_msg = None;
        match self.session.on_send_failed(side, errno, &mut self.io, now) {
            SendFailed::Dropped(n) => {
                self.listener
                    .stats
                    .send_drops
                    .fetch_add(u64::from(n), Relaxed);
                if self.many {
                    tracing::debug!(listener = %self.listener.name, errno, "SCTP one-to-many send failed; message dropped");
                }
            }
            SendFailed::Ended => self.account(side, &Completion::Error(errno), now),
        }
        self.take_sctp_events();
    }

    /// Whether the session asked for an upstream it does not have yet.
    fn awaiting_upstream(&self) -> bool {
        match &self.session {
            Session::Proxy(p) => !p.connected(),
            Session::Sctp(s) => s.is_proxy() && !s.connected(),
            _ => false,
        }
    }

    fn upstream_failed(&mut self, errno: i32, now: Instant) {
        let st = &self.listener.stats;
        match errno {
            libc::ETIMEDOUT => st.upstream_timeouts.fetch_add(1, Relaxed),
            libc::ECONNREFUSED => st.upstream_refused.fetch_add(1, Relaxed),
            _ => st.upstream_errors.fetch_add(1, Relaxed),
        };
        // Back off from the upstream only if it was contacted: not when the session
        // never got a socket to try it with.
        if self.sockets[1].fd.is_some() {
            if let (Some(set), Some(addr)) = (&self.listener.upstream, self.upstream) {
                set.mark_down(addr, now);
            }
        }
        if let Some(held_back) = st.logs.upstream.allow() {
            tracing::warn!(
                listener = %self.listener.name,
                upstream = ?self.upstream,
                error = %std::io::Error::from_raw_os_error(errno),
                more_in_last_10s = held_back,
                "upstream connect failed; closing the client (one line per 10 s per listener; counters have every one)"
            );
        }
    }

    /// Reports that `n` bytes of the send from [`ActiveSession::take_send`] on `side` were
    /// sent; `buf` is the buffer the operation held (the rest goes next).
    pub fn sent(&mut self, side: Side, buf: Vec<u8>, n: usize, now: Instant) {
        let sock = &mut self.sockets[side.index()];
        sock.sending = buf;
        sock.backoff.reset();
        sock.sent += n;
        if sock.sent >= sock.sending.len() {
            sock.sending.clear();
            sock.sent = 0;
        }
        self.io.sides[side.index()].in_flight = sock.sending.len() - sock.sent;
        if side == Side::Client {
            self.listener.stats.bytes_out.fetch_add(n as u64, Relaxed);
        }
        self.session
            .on_complete(side, Completion::Sent(n), &mut self.io, now);
    }

    /// The bytes to send next on `side`, moved out for a send operation, with the
    /// offset to send from: the rest of a short send, else everything the session
    /// queued since. The buffer comes back with [`ActiveSession::sent`] or
    /// [`ActiveSession::restore_send`]. `None`: nothing to send, or the side is not ready.
    pub fn take_send(&mut self, side: Side) -> Option<(Vec<u8>, usize)> {
        let i = side.index();
        let sock = &mut self.sockets[i];
        if !sock.ready() {
            return None;
        }
        if sock.sending.is_empty() {
            let io = &mut self.io.sides[i];
            if io.out.is_empty() {
                return None;
            }
            std::mem::swap(&mut sock.sending, &mut io.out);
            sock.sent = 0;
            io.in_flight = sock.sending.len();
        }
        Some((std::mem::take(&mut sock.sending), sock.sent))
    }

    /// A send operation ended without sending (EAGAIN, cancelled): its buffer goes
    /// back to side `side`, to be sent next.
    pub fn restore_send(&mut self, side: Side, buf: Vec<u8>) {
        self.sockets[side.index()].sending = buf;
    }

    /// Whether the session asked for a receive on `side` (and the side is ready);
    /// clears the request.
    pub fn take_recv_request(&mut self, side: Side) -> bool {
        self.sockets[side.index()].ready()
            && std::mem::take(&mut self.io.sides[side.index()].want_recv)
    }

    /// Whether a receive on `side` is wanted (without clearing the request).
    pub fn wants_recv(&self, side: Side) -> bool {
        self.sockets[side.index()].ready() && self.io.sides[side.index()].want_recv
    }

    /// Shuts down the write side of every socket that asked for it and has drained.
    /// Errors (peer gone) are ignored: the next operation reports them.
    pub fn shutdown_drained(&mut self) {
        for (sock, io) in self.sockets.iter_mut().zip(&self.io.sides) {
            if io.shutdown_write && !sock.write_shut && sock.ready() && io.unsent() == 0 {
                sock.write_shut = true;
                if let Some(fd) = sock.raw() {
                    // SAFETY: shutdown(2) on an fd we own; no pointers.
                    unsafe { libc::shutdown(fd, libc::SHUT_WR) };
                }
            }
        }
    }

    /// Whether the session is done: close asked for and nothing left to send on any
    /// ready socket, or aborted, or failed.
    pub fn finished(&self) -> bool {
        if self.io.abort || self.failed {
            return true;
        }
        self.io.close
            && self
                .sockets
                .iter()
                .zip(&self.io.sides)
                .all(|(sock, io)| !sock.ready() || io.unsent() == 0)
    }

    /// Sets SO_LINGER {on, 0} on every open socket when the session aborted, so that
    /// closing them sends RST (the peers see ECONNRESET, not a clean EOF).
    pub fn linger_if_aborting(&mut self) {
        if self.io.abort || self.failed {
            for sock in &self.sockets {
                if let Some(fd) = &sock.fd {
                    let _ = socket2::SockRef::from(fd).set_linger(Some(Duration::ZERO));
                }
            }
        }
    }

    /// Marks the session as waiting for an upstream socket; `true` if it was not
    /// already, so that the driver lists it once.
    pub fn park(&mut self) -> bool {
        !std::mem::replace(&mut self.parked, true)
    }

    /// The driver took the session off its waiting list (to drive it again).
    pub fn unpark(&mut self) {
        self.parked = false;
    }

    /// Whether the session asked to connect its upstream; clears the request.
    pub fn take_connect_request(&mut self) -> bool {
        std::mem::take(&mut self.io.connect)
    }

    /// Picks an upstream and gets a socket for it: made here for the root namespace
    /// (socket(2) is non-blocking), taken from the binder-filled pool otherwise.
    /// On `Wait` the worker must retry after its next wake-up.
    pub fn start_connect(&mut self, wake: &Arc<OwnedFd>, now: Instant) -> ConnectStart {
        let Some(set) = self.listener.upstream.clone() else {
            self.complete(Side::Upstream, Completion::Error(libc::EINVAL), now);
            return ConnectStart::Failed;
        };
        let addr = *self.upstream.get_or_insert_with(|| set.pick(now));
        match set.socket_for(addr, wake) {
            upstream::GetSocket::Ready(fd) => {
                // TCP sockets come with TCP_NODELAY from the binder.
                let sctp = self.listener.proto == Proto::Sctp;
                let sock = &mut self.sockets[1];
                if sctp {
                    sock.set_message();
                }
                sock.fd = Some(fd);
                sock.connecting = true;
                if self.charged_fds > 0 {
                    self.listener.budget.charge_fd(&self.listener.netns_fds);
                    self.charged_fds += 1;
                }
                sock.dest = Some(Box::new(addr.into()));
                ConnectStart::Go
            }
            upstream::GetSocket::Wait => {
                // Ask again when the worker is woken by the refill.
                self.io.connect = true;
                ConnectStart::Wait
            }
            upstream::GetSocket::Failed(errno) => {
                self.sockets[1].connecting = true;
                self.complete(Side::Upstream, Completion::Error(errno), now);
                self.sockets[1].connecting = false;
                ConnectStart::Failed
            }
        }
    }
}

/// The idle timeout of a one-to-many SCTP echo socket, whose associations have
/// no session each: the kernel shuts down those idle for the listener's
/// `idle_timeout_ms` (SCTP_AUTOCLOSE, whole seconds), which applies to
/// associations set up after this call. Called when a worker opens the socket;
/// a reload binds one-to-many listeners anew (`keeps_sockets` in server.rs), so
/// a changed value comes with the new socket. Nothing for a one-to-many proxy (its
/// associations are peeled off into sessions with their own deadline). A
/// failure is logged: idle associations then stay open.
pub fn many_idle_timeout(fd: std::os::fd::BorrowedFd<'_>, listener: &ListenerShared) {
    if !matches!(listener.action, crate::config::Action::Echo) {
        return;
    }
    if let Err(e) = crate::sctp::set_autoclose(fd, listener.idle_timeout_ms) {
        tracing::warn!(listener = %listener.name, error = %e,
            "cannot set SCTP_AUTOCLOSE; idle associations stay open");
    }
}

impl Drop for ActiveSession {
    fn drop(&mut self) {
        if self.many {
            // A one-to-many echo socket takes its associations with it. (For
            // proxy, the peeled-off sessions count themselves.)
            let s = &self.listener.stats;
            if self.listener.peel.is_none() {
                s.closed.fetch_add(s.active(), Relaxed);
            }
            return;
        }
        let s = &self.listener.stats;
        s.closed.fetch_add(1, Relaxed);
        self.worker.sessions.fetch_sub(1, Relaxed);
        if self.charged_fds > 0 {
            self.listener
                .budget
                .release(&self.listener.netns_fds, u64::from(self.charged_fds));
        }
        if self.failed {
            s.conn_errors.fetch_add(1, Relaxed);
        }
    }
}

/// Adds what `n` counted to `counter` and zeroes it.
fn add_taken(counter: &std::sync::atomic::AtomicU64, n: &mut u32) {
    if *n > 0 {
        counter.fetch_add(u64::from(std::mem::take(n)), Relaxed);
    }
}
