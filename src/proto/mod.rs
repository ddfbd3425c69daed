//! Per-session protocol logic, written once for every driver.
//!
//! A [`Session`] never performs I/O. It owns up to two sockets, the client's
//! ([`Side::Client`]) and, for `proxy`, the upstream's ([`Side::Upstream`]). The
//! driver reports what an operation did ([`Completion`]: bytes received, end of
//! stream, bytes sent, connected, timer expired, an errno) and on which side, and
//! the session answers by filling in a [`SessionIo`]: bytes to send on a side,
//! whether it wants another receive on a side, whether to connect the upstream,
//! when to time out, whether to close or abort. The io_uring driver turns those
//! requests into SQEs, the epoll driver into non-blocking syscalls; neither knows
//! what echo, respond, http or proxy mean. See [`crate::driver`] for the driver side.

pub mod backoff;
pub mod chunked;
mod http;
pub mod proxy;
pub mod proxy_header;
pub mod sctp;
#[cfg(test)]
pub(crate) mod sim;
pub mod udp;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::config::{Action, Proto, SctpConfig};
use crate::sctp::MsgInfo;
pub use backoff::{
    SendBackoff, UpstreamChoice, SEND_RETRY_MAX_MS, SEND_STALL_LIMIT, UPSTREAM_BACKOFF_MS,
};
pub use http::{HttpSession, MAX_HEADERS, MAX_HEAD_BYTES};
pub use proxy::ProxySession;
pub use sctp::{OutMessage, Piece, SctpSession};

/// Largest number of bytes an echo or http session lets wait in its send queue
/// before it stops asking for more input (back-pressure toward a client that does
/// not read). Proxy sessions use the listener's `buffer_bytes` instead.
pub const SEND_WINDOW: usize = 256 * 1024;

/// How long a lingering close ([`SessionIo::linger`]) goes on reading and
/// discarding input after its FIN waits for the client's FIN, before it closes
/// anyway (ms). Also the longest a lingering close waits for the client to take
/// more of the bytes still queued before its FIN: a client that takes nothing
/// for this long is reset. Apache httpd lingers 2 s after its FIN; nginx's
/// `lingering_timeout` is 5 s between reads (within `lingering_time` 30 s).
/// One second is enough for input already in flight; a tenant cannot hold a
/// slot for long with it.
pub const LINGER_MS: u64 = 1000;

/// Most input a lingering close reads and discards before it closes anyway
/// (bytes); a close with input still unread may then be a reset (RFC 2525 §2.17).
pub const LINGER_MAX_BYTES: usize = 256 * 1024;

/// Which socket of a session an operation concerns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The accepted connection.
    Client = 0,
    /// The connection to the upstream (proxy only).
    Upstream = 1,
}

impl Side {
    /// The other side.
    pub fn other(self) -> Side {
        match self {
            Side::Client => Side::Upstream,
            Side::Upstream => Side::Client,
        }
    }

    /// 0 for the client, 1 for the upstream.
    pub fn index(self) -> usize {
        self as usize
    }
}

/// What one finished operation produced.
#[derive(Debug)]
pub enum Completion<'a> {
    /// A receive returned these bytes (never empty).
    Recv(&'a [u8]),
    /// A receive returned 0: the peer shut down its write side (FIN).
    Eof,
    /// Bytes from the send queue were accepted by the kernel (count in bytes).
    Sent(usize),
    /// The upstream connection was established (after [`SessionIo::connect`]).
    Connected,
    /// The deadline set with [`SessionIo::set_deadline`] passed.
    Timeout,
    /// An operation failed with this errno (for example ECONNRESET, ECONNREFUSED).
    Error(i32),
    /// A receive on an SCTP socket returned a piece of a message, or a
    /// notification (never empty; end of association is [`Completion::Eof`]).
    Message(Piece<'a>),
}

/// The requests a session makes of one of its sockets, and its send queue.
#[derive(Debug, Default)]
pub struct SideIo {
    /// Bytes queued by the session and not yet handed to the kernel.
    pub(crate) out: Vec<u8>,
    /// Bytes handed to the kernel and not yet reported sent (maintained by the driver).
    pub(crate) in_flight: usize,
    /// The session wants one more receive completion.
    pub(crate) want_recv: bool,
    /// Shut down the write side (send FIN) once the queue is drained.
    pub(crate) shutdown_write: bool,
    /// Whole messages queued on an SCTP socket, sent in order after `out`.
    pub(crate) msgs: VecDeque<OutMessage>,
    /// Payload bytes in `msgs`.
    pub(crate) msg_bytes: usize,
    /// Bytes spliced into the pipe toward this side and not yet sent from it
    /// (a proxy direction relayed with splice(2); maintained by the driver).
    pub(crate) piped: usize,
}

impl SideIo {
    /// Queues `data` to be sent after everything queued before it.
    pub fn send(&mut self, data: &[u8]) {
        self.out.extend_from_slice(data);
    }

    /// Asks for one more receive completion (idempotent until it arrives). A
    /// receive already in flight answers it: its completion clears the request,
    /// and the session asks again if it still wants more
    /// ([`Session::on_complete`]).
    pub fn recv(&mut self) {
        self.want_recv = true;
    }

    /// Sends FIN once every queued byte has been sent; receiving may go on.
    pub fn shutdown_write(&mut self) {
        self.shutdown_write = true;
    }

    /// Queues one whole SCTP message (sent with one sendmsg(2), its stream id,
    /// PPID and association in an SCTP_SNDINFO).
    pub fn send_message(&mut self, m: OutMessage) {
        self.msg_bytes += m.data.len();
        self.msgs.push_back(m);
    }

    /// Bytes (and message payload bytes) queued, in flight or in a splice pipe,
    /// not yet reported sent.
    pub fn unsent(&self) -> usize {
        self.out.len() + self.msg_bytes + self.in_flight + self.piped
    }
}

/// The requests a session makes of its driver.
///
/// The driver owns one per session, hands it to the session with each completion,
/// and acts on it afterwards: it sends queued bytes on each side (completing short
/// sends itself), arms one receive per side that asked, connects the upstream when
/// asked, closes every socket once the queues drain after [`SessionIo::close`], and
/// resets them at once after [`SessionIo::abort`].
#[derive(Debug, Default)]
pub struct SessionIo {
    pub(crate) sides: [SideIo; 2],
    pub(crate) close: bool,
    pub(crate) abort: bool,
    pub(crate) connect: bool,
    pub(crate) deadline: Option<Instant>,
    /// SCTP: messages over `max_message_bytes` since the driver last looked (count).
    pub(crate) too_big: u32,
    /// SCTP one-to-many: associations that came up / ended since the driver last
    /// looked (counts).
    pub(crate) assoc_up: u32,
    pub(crate) assoc_down: u32,
    /// SCTP one-to-many proxy: associations to peel off into their own sessions.
    pub(crate) peel_off: Vec<i32>,
    /// SCTP: messages dropped because nobody can take them (an association that
    /// could not be peeled off, or a side that has ended) (count).
    pub(crate) dropped: u32,
    /// SCTP: the association was lost (COMM_LOST: aborted by the peer or failed).
    pub(crate) lost: bool,
    /// A lingering close is under way ([`SessionIo::linger`]): input discarded
    /// so far (bytes).
    pub(crate) linger: Option<u32>,
    /// The listener's idle timeout for an `echo` session, TCP or one-to-one SCTP
    /// (ms; 0: none; set by
    /// the driver before [`Session::on_open`]; u32 keeps every session small:
    /// `MAX_TIMEOUT_MS` fits).
    pub(crate) idle_timeout_ms: u32,
    /// The kind of the deadline that ended the session, if one did (for the
    /// listener's timeout counters; the driver takes it).
    pub(crate) timed_out: Option<TimeoutKind>,
}

/// Which deadline ended a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeoutKind {
    /// No byte either way for `idle_timeout_ms` (echo, proxy).
    Idle,
    /// An http request head (or a body owed an answer) not finished within
    /// `header_timeout_ms`: answered 408.
    Header,
    /// An http connection idle between requests for `keepalive_timeout_ms`.
    KeepAlive,
}

impl TimeoutKind {
    /// The label used in metrics: "idle", "header", "keepalive".
    pub fn as_str(self) -> &'static str {
        match self {
            TimeoutKind::Idle => "idle",
            TimeoutKind::Header => "header",
            TimeoutKind::KeepAlive => "keepalive",
        }
    }
}

impl SessionIo {
    /// The requests for one side.
    pub fn side(&mut self, s: Side) -> &mut SideIo {
        &mut self.sides[s.index()]
    }

    /// The client side.
    pub fn client(&mut self) -> &mut SideIo {
        &mut self.sides[0]
    }

    /// Closes every socket once every queued byte has been sent.
    pub fn close(&mut self) {
        self.close = true;
        for l in &mut self.sides {
            l.want_recv = false;
        }
    }

    /// Resets every socket now (SO_LINGER 0, so the peers see RST), dropping queues.
    pub fn abort(&mut self) {
        self.abort = true;
        self.close();
        for l in &mut self.sides {
            l.out.clear();
            l.msgs.clear();
            l.msg_bytes = 0;
        }
    }

    /// A proxy session's deadline passed (also a one-to-one SCTP echo's idle
    /// deadline, as `connected`): when `connected` and nothing is pending
    /// either way, it was idle: both sides end cleanly. Otherwise (connect
    /// timeout, or bytes a peer will not take, e.g. a reader stalled on a zero
    /// window, for which a graceful close would wait forever) both are reset.
    pub fn proxy_timeout(&mut self, connected: bool) {
        if connected {
            self.timed_out = Some(TimeoutKind::Idle);
        }
        let stuck = self.sides.iter().any(|l| l.unsent() > 0);
        if connected && !stuck {
            self.close();
        } else {
            self.abort();
        }
    }

    /// Opens the upstream connection; [`Completion::Connected`] or
    /// [`Completion::Error`] on [`Side::Upstream`] follows.
    pub fn connect(&mut self) {
        self.connect = true;
    }

    /// Asks for a [`Completion::Timeout`] at `at` (`None`: no timer). Replaces an
    /// earlier deadline.
    pub fn set_deadline(&mut self, at: Option<Instant>) {
        self.deadline = at;
    }

    /// Whether [`SessionIo::close`] was called.
    pub fn closing(&self) -> bool {
        self.close
    }

    /// Lingering close of the client, at `now` (RFC 9112 §9.6; what nginx's
    /// `lingering_close` does): FIN once every queued byte has been sent, then
    /// whatever the client still sends is read and discarded until its FIN,
    /// which closes. Closing a TCP socket with unread input sends RST instead of
    /// FIN and the peer may lose what was sent before it (RFC 2525 §2.17), so
    /// every action that ends a connection it has written to while input may
    /// still arrive ends it this way. Bounded: the close comes anyway
    /// [`LINGER_MS`] after the queue was last seen to shrink (a reset if the
    /// client took nothing queued in that time, a FIN otherwise), or after
    /// [`LINGER_MAX_BYTES`] of input. The session's own handling stops: every
    /// later completion is taken by [`Session::on_complete`] for the linger.
    /// Nothing happens if the session is already closing or lingering.
    pub fn linger(&mut self, now: Instant) {
        if self.close || self.linger.is_some() {
            return;
        }
        self.linger = Some(0);
        let c = self.client();
        c.shutdown_write();
        c.recv();
        self.set_deadline(Some(now + Duration::from_millis(LINGER_MS)));
    }

    /// Whether a lingering close ([`SessionIo::linger`]) is under way.
    pub fn lingering(&self) -> bool {
        self.linger.is_some()
    }

    /// What a completion does to a lingering close at `now` (see
    /// [`SessionIo::linger`]).
    fn on_linger(&mut self, side: Side, c: &Completion<'_>, now: Instant) {
        if side != Side::Client {
            return;
        }
        match *c {
            Completion::Recv(d) => {
                let n = self.linger.get_or_insert(0);
                *n = n.saturating_add(u32::try_from(d.len()).unwrap_or(u32::MAX));
                if *n as usize > LINGER_MAX_BYTES {
                    self.close();
                } else {
                    self.client().recv();
                }
            }
            Completion::Eof => self.close(),
            // The client took more: it gets LINGER_MS again (for the rest, or
            // after the FIN, for its own).
            Completion::Sent(_) => self.set_deadline(Some(now + Duration::from_millis(LINGER_MS))),
            Completion::Timeout => {
                if self.client().unsent() > 0 {
                    // A reader stalled on a zero window: a graceful close
                    // would wait forever.
                    self.abort();
                } else {
                    self.close();
                }
            }
            Completion::Error(_) => self.abort(),
            _ => {}
        }
    }

    /// Gives up on association `assoc` of the one-to-many SCTP socket on `side`
    /// (its peer took no message for [`SEND_STALL_LIMIT`]): drops every message
    /// queued for it and queues an `SCTP_ABORT` for it first of all, so that the
    /// other associations' messages can go. Returns how many queued messages were
    /// dropped (count; the message being sent, which the driver holds, is not
    /// among them).
    pub fn abort_association(&mut self, side: Side, assoc: i32) -> usize {
        let l = &mut self.sides[side.index()];
        let before = l.msgs.len();
        l.msgs.retain(|m| m.info.assoc != assoc);
        l.msg_bytes = l.msgs.iter().map(|m| m.data.len()).sum();
        let dropped = before - l.msgs.len();
        l.msgs.push_front(OutMessage {
            data: Vec::new(),
            info: MsgInfo {
                assoc,
                ..MsgInfo::default()
            },
            flags: crate::sctp::SCTP_ABORT,
        });
        dropped
    }
}

/// Addresses of an accepted connection, for sessions that need them (PROXY header).
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    /// The client's address (getpeername).
    pub peer: Option<SocketAddr>,
    /// The address the client connected to (getsockname).
    pub local: Option<SocketAddr>,
}

/// Moves an echo session's idle deadline to its idle timeout after `now` (none
/// without one): every byte (TCP) or message (one-to-one SCTP) either way counts
/// as activity.
pub(super) fn echo_idle(io: &mut SessionIo, now: Instant) {
    if io.idle_timeout_ms > 0 {
        io.set_deadline(Some(
            now + std::time::Duration::from_millis(u64::from(io.idle_timeout_ms)),
        ));
    }
}

/// The per-session state machine of one action.
#[derive(Debug)]
pub enum Session {
    /// Every byte received is sent back; EOF closes after the echo drains.
    Echo,
    /// Fixed bytes are written once, then a lingering close
    /// ([`SessionIo::linger`]): FIN, input read and discarded until the client's
    /// FIN, bounded in time and bytes (so that closing does not reset the peer).
    Respond,
    /// A fixed `200 OK` per HTTP/1.x request, keep-alive and pipelining honoured
    /// (boxed like the other large variants: every session is as big as the
    /// largest variant, and most are echo or proxy).
    Http(Box<HttpSession>),
    /// Bytes both ways between the client and an upstream.
    Proxy(Box<ProxySession>),
    /// SCTP echo or proxy of whole messages (one association, or a one-to-many
    /// socket).
    Sctp(Box<SctpSession>),
}

/// How a session's client socket came to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// accept(2) on a listener (TCP, SCTP one-to-one).
    Accepted,
    /// A one-to-many SCTP listener socket itself: one session for all of its
    /// associations.
    Many,
    /// An association peeled off a one-to-many SCTP socket (sctp_peeloff(3)).
    Peeled,
}

/// What became of a send that failed (an errno other than EAGAIN/EINTR), see
/// [`Session::on_send_failed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendFailed {
    /// This many messages were lost (count, for the listener's `send_drops`); the
    /// session goes on.
    Dropped(u32),
    /// The session was told ([`Completion::Error`]) and ends (abort).
    Ended,
}

impl Session {
    /// A fresh session for `action`.
    pub fn new(action: &Action) -> Session {
        match action {
            Action::Echo => Session::Echo,
            Action::Respond(_) => Session::Respond,
            Action::Http(h) => Session::Http(Box::new(HttpSession::new(*h))),
            Action::Proxy(p) => Session::Proxy(Box::new(ProxySession::new(p.clone()))),
        }
    }

    /// The session for a socket of a listener with `action` over `proto`, made
    /// as `origin` says: an [`SctpSession`] for SCTP (of the whole socket for
    /// [`Origin::Many`], ended with SCTP_EOF for [`Origin::Peeled`]), else the
    /// byte-stream session of `action` ([`Session::new`]).
    pub fn for_listener(
        action: &Action,
        proto: Proto,
        sctp: &SctpConfig,
        origin: Origin,
    ) -> Session {
        if proto != Proto::Sctp {
            return Session::new(action);
        }
        let s = SctpSession::new(action, sctp, origin == Origin::Many);
        Session::Sctp(Box::new(if origin == Origin::Peeled {
            s.peeled_off()
        } else {
            s
        }))
    }

    /// Called once, right after the connection is accepted, at `now` (timeouts
    /// count from it). `info` holds the connection's addresses when the action
    /// needs them (see [`Session::needs_info`]).
    pub fn on_open(
        &mut self,
        action: &Action,
        info: &ConnInfo,
        netns: &str,
        io: &mut SessionIo,
        now: Instant,
    ) {
        match self {
            Session::Echo => {
                io.client().recv();
                echo_idle(io, now);
            }
            Session::Http(h) => h.on_open(io, now),
            Session::Respond => {
                if let Action::Respond(bytes) = action {
                    io.client().send(bytes);
                }
                io.linger(now);
            }
            Session::Proxy(p) => p.on_open(info, netns, io, now),
            Session::Sctp(s) => s.on_open(io, now),
        }
    }

    /// Graceful shutdown: the process has stopped accepting and is stopping; told
    /// once per session, at `now`, by a draining worker
    /// ([`crate::driver::Command::Drain`]), also to sessions opened after it.
    /// What each action does:
    /// - `http`: a connection idle between requests closes at once; a request in
    ///   progress is answered with `Connection: close`, then the connection
    ///   closes. Both close cleanly (a lingering close, [`SessionIo::linger`]:
    ///   FIN, then input is discarded until the client's FIN, for at most
    ///   [`LINGER_MS`]), never with a reset ([`HttpSession::on_drain`]);
    /// - `respond`: nothing changes (its one answer and its lingering close
    ///   start at open);
    /// - `echo`, `proxy`, SCTP: nothing changes: transfers go on until the peers
    ///   end them or `runtime.shutdown_timeout_ms` cuts them.
    pub fn on_drain(&mut self, io: &mut SessionIo, now: Instant) {
        match self {
            Session::Http(h) => h.on_drain(io, now),
            Session::Echo | Session::Respond | Session::Proxy(_) | Session::Sctp(_) => {}
        }
    }

    /// Whether [`Session::on_open`] needs the connection's addresses.
    pub fn needs_info(action: &Action) -> bool {
        matches!(action, Action::Proxy(p) if p.proxy_protocol.is_some())
    }

    /// Called for every completion of this session, reported at `now`.
    pub fn on_complete(&mut self, side: Side, c: Completion<'_>, io: &mut SessionIo, now: Instant) {
        if matches!(
            c,
            Completion::Recv(_) | Completion::Message(_) | Completion::Eof
        ) {
            // A receive answers every request for one made while it was in
            // flight; the session asks again below if it still wants more, with
            // what it knows now. (Otherwise a request made before this receive
            // filled the window would start one more receive past it.)
            io.side(side).want_recv = false;
        }
        if io.linger.is_some() {
            io.on_linger(side, &c, now);
            return;
        }
        match self {
            Session::Proxy(p) => return p.on_complete(side, c, io, now),
            Session::Sctp(s) => return s.on_complete(side, c, io, now),
            _ => {}
        }
        match c {
            Completion::Timeout if matches!(self, Session::Http(_)) => {}
            Completion::Timeout if matches!(self, Session::Echo) && io.idle_timeout_ms > 0 => {
                // Idle: a clean end (FIN, then input discarded until the client's).
                io.timed_out = Some(TimeoutKind::Idle);
                io.linger(now);
                return;
            }
            Completion::Error(_) | Completion::Timeout => {
                io.abort();
                return;
            }
            Completion::Eof => {
                io.close();
                return;
            }
            _ => {}
        }
        let cl = io.client();
        match self {
            Session::Echo => {
                match c {
                    Completion::Recv(data) => {
                        cl.send(data);
                        if cl.unsent() < SEND_WINDOW {
                            cl.recv();
                        }
                    }
                    Completion::Sent(_) => resume_below_window(io),
                    _ => {}
                }
                echo_idle(io, now);
            }
            // Lingering from its open on: every completion went to the linger.
            Session::Respond => {}
            Session::Http(h) => match c {
                Completion::Recv(data) => {
                    h.on_input(data, io, now);
                    resume_below_window(io);
                }
                Completion::Sent(_) => {
                    h.on_sent(io, now);
                    resume_below_window(io);
                }
                Completion::Timeout => h.on_timeout(io, now),
                _ => {}
            },
            Session::Proxy(_) | Session::Sctp(_) => {}
        }
    }
}

impl Session {
    /// A send on `side` failed at `now` with `errno` (not EAGAIN or EINTR); the
    /// driver no longer holds what it was sending (for SCTP, one message). Decides
    /// what that costs:
    /// - an SCTP association that has ended (its peer shut it down; SCTP has no
    ///   half-close) takes nothing more: everything queued toward it is dropped
    ///   too, `Dropped(1 + queued)`, and the session ends as it would anyway. A
    ///   one-to-one send refused with ESHUTDOWN or EPIPE says just that, even
    ///   before the session has read the end ([`SctpSession::on_send_error`]);
    /// - on a one-to-many SCTP socket only that message's association is gone:
    ///   `Dropped(1)`, the other associations go on;
    /// - otherwise the session gets [`Completion::Error`] and aborts: `Ended`.
    pub fn on_send_failed(
        &mut self,
        side: Side,
        errno: i32,
        io: &mut SessionIo,
        now: Instant,
    ) -> SendFailed {
        let (ended, many) = match self {
            Session::Sctp(s) => {
                s.on_send_error(side, errno);
                (s.ended(side), s.one_to_many())
            }
            _ => (false, false),
        };
        let side_io = io.side(side);
        let n = if ended {
            let n = 1 + side_io.msgs.len();
            side_io.msgs.clear();
            side_io.msg_bytes = 0;
            n
        } else if many {
            1
        } else {
            self.on_complete(side, Completion::Error(errno), io, now);
            return SendFailed::Ended;
        };
        side_io.in_flight = 0;
        self.on_complete(side, Completion::Sent(0), io, now);
        SendFailed::Dropped(u32::try_from(n).unwrap_or(u32::MAX))
    }
}

/// Re-arms receiving on the client once its send queue is below the window.
fn resume_below_window(io: &mut SessionIo) {
    if !io.close && io.client().unsent() < SEND_WINDOW {
        io.client().recv();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> Instant {
        Instant::now()
    }

    const NO_INFO: ConnInfo = ConnInfo {
        peer: None,
        local: None,
    };

    #[test]
    fn echo_stops_reading_above_window_and_resumes() {
        let mut s = Session::new(&Action::Echo);
        let mut io = SessionIo::default();
        s.on_open(&Action::Echo, &NO_INFO, "root", &mut io, now());
        assert!(io.client().want_recv);
        io.client().want_recv = false;
        let big = vec![7u8; SEND_WINDOW];
        s.on_complete(Side::Client, Completion::Recv(&big), &mut io, now());
        assert!(
            !io.client().want_recv,
            "must not read while the window is full"
        );
        assert_eq!(io.client().out.len(), SEND_WINDOW);
        // The driver hands the bytes to the kernel, which takes them all.
        io.client().out.clear();
        s.on_complete(Side::Client, Completion::Sent(SEND_WINDOW), &mut io, now());
        assert!(io.client().want_recv);
    }

    /// An echo session with an idle timeout: the deadline follows every byte
    /// either way; when it passes, a lingering close (FIN, not a reset) starts and
    /// the timeout is reported as idle. Without one, no deadline is set.
    #[test]
    fn echo_idle_timeout_moves_with_traffic_and_ends_cleanly() {
        let t0 = now();
        let d = std::time::Duration::from_millis(100);
        let mut s = Session::new(&Action::Echo);
        let mut io = SessionIo {
            idle_timeout_ms: 100,
            ..Default::default()
        };
        s.on_open(&Action::Echo, &NO_INFO, "root", &mut io, t0);
        assert_eq!(io.deadline, Some(t0 + d));
        let t1 = t0 + std::time::Duration::from_millis(60);
        s.on_complete(Side::Client, Completion::Recv(b"x"), &mut io, t1);
        assert_eq!(io.deadline, Some(t1 + d));
        let t2 = t1 + std::time::Duration::from_millis(30);
        s.on_complete(Side::Client, Completion::Sent(1), &mut io, t2);
        assert_eq!(io.deadline, Some(t2 + d));
        s.on_complete(Side::Client, Completion::Timeout, &mut io, t2 + d);
        assert!(io.lingering() && !io.abort, "{io:?}");
        assert_eq!(io.timed_out, Some(TimeoutKind::Idle));

        let mut s = Session::new(&Action::Echo);
        let mut io = SessionIo::default();
        s.on_open(&Action::Echo, &NO_INFO, "root", &mut io, t0);
        assert_eq!(io.deadline, None);
    }

    #[test]
    fn respond_writes_then_half_closes() {
        let a = Action::Respond(b"ack".to_vec());
        let mut s = Session::new(&a);
        let mut io = SessionIo::default();
        s.on_open(&a, &NO_INFO, "root", &mut io, now());
        assert_eq!(io.client().out, b"ack");
        assert!(io.client().shutdown_write && io.client().want_recv && !io.close);
        s.on_complete(Side::Client, Completion::Eof, &mut io, now());
        assert!(io.close);
    }

    #[test]
    fn error_drops_queue_and_aborts() {
        let mut s = Session::new(&Action::Echo);
        let mut io = SessionIo::default();
        io.client().send(b"x");
        s.on_complete(
            Side::Client,
            Completion::Error(libc::ECONNRESET),
            &mut io,
            now(),
        );
        assert!(io.close && io.abort && io.client().out.is_empty());
    }

    fn msg(assoc: i32, len: usize) -> OutMessage {
        OutMessage {
            data: vec![1; len],
            info: MsgInfo {
                assoc,
                ..MsgInfo::default()
            },
            flags: 0,
        }
    }

    #[test]
    fn for_listener_picks_the_session_kind() {
        let sctp = SctpConfig::default();
        let s = Session::for_listener(
            &Action::Http(Default::default()),
            Proto::Tcp,
            &sctp,
            Origin::Accepted,
        );
        assert!(matches!(s, Session::Http(_)));
        let s = Session::for_listener(&Action::Echo, Proto::Sctp, &sctp, Origin::Many);
        assert!(matches!(&s, Session::Sctp(x) if x.one_to_many()));
        let s = Session::for_listener(&Action::Echo, Proto::Sctp, &sctp, Origin::Accepted);
        assert!(matches!(&s, Session::Sctp(x) if !x.one_to_many()));
    }

    #[test]
    fn abort_association_drops_its_messages_and_aborts_first() {
        let mut io = SessionIo::default();
        for (assoc, len) in [(1, 10), (2, 20), (1, 30), (3, 40)] {
            io.client().send_message(msg(assoc, len));
        }
        assert_eq!(io.abort_association(Side::Client, 1), 2);
        let l = io.client();
        assert_eq!(l.msg_bytes, 60);
        let m = l.msgs.pop_front().unwrap();
        assert_eq!(
            (m.flags, m.info.assoc, m.data.len()),
            (crate::sctp::SCTP_ABORT, 1, 0)
        );
        let rest: Vec<i32> = l.msgs.iter().map(|m| m.info.assoc).collect();
        assert_eq!(rest, [2, 3]);
    }

    #[test]
    fn send_failures_end_a_stream_but_only_drop_on_one_to_many() {
        // A byte stream: the session ends.
        let mut s = Session::new(&Action::Echo);
        let mut io = SessionIo::default();
        let r = s.on_send_failed(Side::Client, libc::EPIPE, &mut io, now());
        assert_eq!(r, SendFailed::Ended);
        assert!(io.abort);
        // One-to-many: one message lost, reading goes on.
        let sctp = SctpConfig::default();
        let mut s = Session::for_listener(&Action::Echo, Proto::Sctp, &sctp, Origin::Many);
        let mut io = SessionIo::default();
        io.client().send_message(msg(7, 5));
        io.client().in_flight = 9;
        let r = s.on_send_failed(Side::Client, libc::EINVAL, &mut io, now());
        assert_eq!(r, SendFailed::Dropped(1));
        assert!(!io.abort && io.client().in_flight == 0 && io.client().msgs.len() == 1);
        assert!(io.client().want_recv);
        // One-to-one whose peer has shut down: everything queued goes too.
        let mut s = Session::for_listener(&Action::Echo, Proto::Sctp, &sctp, Origin::Accepted);
        let mut io = SessionIo::default();
        io.client().send_message(msg(0, 5));
        io.client().send_message(msg(0, 6));
        s.on_complete(Side::Client, Completion::Eof, &mut io, now());
        let r = s.on_send_failed(Side::Client, libc::EPIPE, &mut io, now());
        assert_eq!(r, SendFailed::Dropped(3));
        assert!(io.client().unsent() == 0 && io.close && !io.abort);
        // One-to-one still open: the error ends it.
        let mut s = Session::for_listener(&Action::Echo, Proto::Sctp, &sctp, Origin::Accepted);
        let mut io = SessionIo::default();
        let r = s.on_send_failed(Side::Client, libc::ECONNRESET, &mut io, now());
        assert_eq!(r, SendFailed::Ended);
        assert!(io.abort);
    }

    #[test]
    fn sctp_send_refused_by_a_shutting_down_association_drops_not_aborts() {
        // The upstream shut its association down and a send toward it fails
        // before its SHUTDOWN notification was read: the response still queued
        // toward the client must not be lost to an abort.
        let p = crate::config::ProxyConfig {
            session_idle_timeout_ms: 0,
            ..crate::config::ProxyConfig::test()
        };
        let a = Action::Proxy(std::sync::Arc::new(p));
        let sctp = SctpConfig::default();
        let mut s = Session::for_listener(&a, Proto::Sctp, &sctp, Origin::Accepted);
        let mut io = SessionIo::default();
        s.on_open(&a, &NO_INFO, "root", &mut io, now());
        s.on_complete(Side::Upstream, Completion::Connected, &mut io, now());
        io.client().send_message(msg(0, 10)); // the upstream's response
        io.side(Side::Upstream).send_message(msg(0, 3));
        let r = s.on_send_failed(Side::Upstream, libc::ESHUTDOWN, &mut io, now());
        assert_eq!(r, SendFailed::Dropped(2));
        assert!(!io.abort, "a graceful end is not an abort");
        assert_eq!(io.client().msgs.len(), 1, "the response still goes out");
        // More from the client has nowhere to go: dropped, counted.
        let piece = Piece {
            data: b"late",
            info: MsgInfo::default(),
            eor: true,
            notification: false,
        };
        s.on_complete(Side::Client, Completion::Message(piece), &mut io, now());
        assert_eq!((io.dropped, io.side(Side::Upstream).msgs.len()), (1, 0));
        // The end is read later and ends the session the usual way.
        s.on_complete(Side::Upstream, Completion::Eof, &mut io, now());
        assert!(io.client().shutdown_write && !io.abort);
        // An abort of the association is still an error.
        let mut s = Session::for_listener(&a, Proto::Sctp, &sctp, Origin::Accepted);
        let mut io = SessionIo::default();
        s.on_open(&a, &NO_INFO, "root", &mut io, now());
        s.on_complete(Side::Upstream, Completion::Connected, &mut io, now());
        let r = s.on_send_failed(Side::Upstream, libc::ECONNRESET, &mut io, now());
        assert_eq!(r, SendFailed::Ended);
        assert!(io.abort);
    }

    #[test]
    fn a_receive_answers_requests_made_while_it_was_in_flight() {
        // io_uring: a client receive is in flight when room on the upstream
        // asks for one more; the receive then fills the window. No further
        // receive may follow it.
        let p = crate::config::ProxyConfig {
            buffer_bytes: 1000,
            session_idle_timeout_ms: 0,
            ..crate::config::ProxyConfig::test()
        };
        let a = Action::Proxy(std::sync::Arc::new(p));
        let mut s = Session::new(&a);
        let mut io = SessionIo::default();
        s.on_open(&a, &NO_INFO, "root", &mut io, now());
        s.on_complete(Side::Upstream, Completion::Connected, &mut io, now());
        // The driver armed the client receive (taking the request).
        assert!(std::mem::take(&mut io.client().want_recv));
        // Room on the upstream: the session asks again, the receive still out.
        s.on_complete(Side::Upstream, Completion::Sent(0), &mut io, now());
        assert!(io.client().want_recv);
        s.on_complete(Side::Client, Completion::Recv(&[5; 1000]), &mut io, now());
        assert!(
            !io.client().want_recv,
            "a receive past the window was still asked for"
        );
    }
}
