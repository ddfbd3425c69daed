//! SCTP sessions: echo and proxy of whole messages, without I/O.
//!
//! The driver reports each piece a receive returned ([`Piece`]: bytes, stream id,
//! PPID, association, whether it ends the message (MSG_EOR) and whether it is a
//! notification (MSG_NOTIFICATION)). The session reassembles pieces into whole
//! messages up to `max_message_bytes`, then queues them whole
//! ([`crate::proto::SideIo::send_message`]): back on the same stream with the
//! same PPID for echo, to the other side with the same stream and PPID for proxy.
//! A message larger than the limit aborts its association (on a one-to-many
//! socket: an `SCTP_ABORT` send to that association only) and is counted.
//!
//! Notifications (association change, shutdown, peer address change) are logged
//! at debug and never taken for data. On a one-to-many socket an association that
//! ends drops its partial message. For `proxy` on a one-to-many socket each new
//! association (SCTP_COMM_UP) is peeled off into a one-to-one session of its own
//! ([`SessionIo`]'s peel-off requests, served by the binder, since Linux peels off
//! only inside the socket's namespace); the shared socket is not read while a
//! peel-off is pending, so the association's queued messages move with it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Completion, SessionIo, Side, SEND_WINDOW};
use crate::config::{Action, ProxyConfig, SctpConfig};
use crate::sctp::{self, MsgInfo, Notification};

/// One piece of a received SCTP message, or a notification.
#[derive(Debug, Clone, Copy)]
pub struct Piece<'a> {
    /// The bytes received (never empty).
    pub data: &'a [u8],
    /// Stream id, PPID and association (from SCTP_RCVINFO).
    pub info: MsgInfo,
    /// MSG_EOR: this piece ends its message.
    pub eor: bool,
    /// MSG_NOTIFICATION: an event from the SCTP stack, not user data.
    pub notification: bool,
}

/// A message waiting to be sent whole.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutMessage {
    /// The payload.
    pub data: Vec<u8>,
    /// Stream id, PPID and (one-to-many) association.
    pub info: MsgInfo,
    /// `snd_flags` ([`sctp::SCTP_ABORT`] to abort the association).
    pub flags: u16,
}

/// A message being reassembled.
#[derive(Debug, Default)]
struct Partial {
    data: Vec<u8>,
    info: MsgInfo,
    /// Over the limit: the rest of the message is discarded.
    dropping: bool,
}

/// Consecutive receive errors a one-to-many socket tolerates before it gives up.
const MANY_ERROR_LIMIT: u32 = 100;

/// The state of one SCTP association (one-to-one), or of a whole one-to-many
/// socket (`many`).
#[derive(Debug)]
pub struct SctpSession {
    proxy: Option<Arc<ProxyConfig>>,
    max_message: usize,
    window: usize,
    many: bool,
    /// Messages being reassembled per side, by association (0 on one-to-one).
    partial: [HashMap<i32, Partial>; 2],
    connected: bool,
    eof: [bool; 2],
    /// One-to-one: a send on this side was refused because its association is
    /// shutting down or has shut down (ESHUTDOWN, EPIPE); nothing more is sent
    /// there, though its end may not have been read yet.
    send_shut: [bool; 2],
    errors_in_a_row: u32,
    /// One-to-many proxy: peel-offs asked for and not finished yet.
    peels_pending: u32,
    /// Bytes held in partial messages, all associations together.
    partial_bytes: usize,
    /// The client socket was peeled off a one-to-many socket: it keeps that
    /// style, so its end shows only as a notification (recvmsg never returns 0)
    /// and shutdown(2) does nothing on it; SCTP_EOF ends it instead.
    peeled: bool,
}

impl SctpSession {
    /// A session for `action` (echo or proxy) with `cfg`'s limits; `many` for the
    /// session of a one-to-many listener socket.
    pub fn new(action: &Action, cfg: &SctpConfig, many: bool) -> SctpSession {
        let proxy = match action {
            Action::Proxy(p) => Some(p.clone()),
            _ => None,
        };
        let window = proxy.as_ref().map_or(SEND_WINDOW, |p| p.buffer_bytes);
        SctpSession {
            proxy,
            max_message: cfg.max_message_bytes,
            // A whole message must fit, or reading would stop for good.
            window: window.max(cfg.max_message_bytes),
            many,
            partial: Default::default(),
            connected: false,
            eof: [false; 2],
            send_shut: [false; 2],
            errors_in_a_row: 0,
            peels_pending: 0,
            partial_bytes: 0,
            peeled: false,
        }
    }

    /// Marks the client socket as peeled off a one-to-many socket.
    pub fn peeled_off(mut self) -> SctpSession {
        self.peeled = true;
        self
    }

    /// Ends the association on `side` gracefully once its queue drains: SHUTDOWN
    /// through shutdown(2) on a one-to-one socket, an empty message with SCTP_EOF
    /// on a peeled-off one (RFC 6458 5.3.4).
    fn end_side(&self, side: Side, io: &mut SessionIo) {
        if side == Side::Client && self.peeled {
            io.client().send_message(OutMessage {
                data: Vec::new(),
                info: MsgInfo::default(),
                flags: sctp::SCTP_EOF,
            });
        } else {
            io.side(side).shutdown_write();
        }
    }

    /// Whether this is the session of a whole one-to-many socket.
    pub fn one_to_many(&self) -> bool {
        self.many
    }

    /// Whether the upstream association is established (proxy).
    pub fn connected(&self) -> bool {
        self.connected
    }

    /// Whether this session proxies (to an upstream association).
    pub fn is_proxy(&self) -> bool {
        self.proxying()
    }

    /// Whether this is a proxy session of a one-to-one association.
    fn proxying(&self) -> bool {
        self.proxy.is_some() && !self.many
    }

    /// Called once when the session starts, at `now` (the connect timeout of a
    /// proxy counts from it).
    pub fn on_open(&mut self, io: &mut SessionIo, now: Instant) {
        match &self.proxy {
            Some(p) if !self.many => {
                io.connect();
                io.set_deadline(Some(now + Duration::from_millis(p.connect_timeout_ms)));
            }
            _ => {
                self.touch(io, now);
                io.client().recv();
            }
        }
    }

    /// Called for every completion, reported at `now`.
    pub fn on_complete(&mut self, side: Side, c: Completion<'_>, io: &mut SessionIo, now: Instant) {
        match c {
            Completion::Message(p) if p.notification => {
                self.on_notification(side, &p, io, now);
                self.resume(io);
            }
            Completion::Message(p) => {
                self.errors_in_a_row = 0;
                self.on_piece(side, &p, io);
                self.touch(io, now);
                self.resume(io);
            }
            Completion::Recv(_) => {} // byte receives are not used on SCTP sides
            Completion::Sent(_) => {
                self.touch(io, now);
                self.resume(io);
            }
            Completion::Connected => {
                self.connected = true;
                io.set_deadline(None);
                self.touch(io, now);
                self.resume(io);
            }
            Completion::Eof if self.many => io.close(),
            Completion::Eof => {
                self.eof[side.index()] = true;
                if self.proxying() {
                    // SCTP has no half-close: the other association is shut down
                    // gracefully once its queue drains, and its end closes us.
                    self.end_side(side.other(), io);
                    if self.eof[side.other().index()] || !self.connected {
                        io.close();
                    }
                } else {
                    io.close();
                }
            }
            Completion::Error(errno) if self.many => {
                self.errors_in_a_row += 1;
                tracing::debug!(errno, "one-to-many SCTP receive failed");
                if self.errors_in_a_row >= MANY_ERROR_LIMIT {
                    io.abort();
                } else {
                    self.resume(io);
                }
            }
            // One-to-one echo: idle (no message either way for
            // `idle_timeout_ms`); closed like an idle proxy.
            Completion::Timeout if self.proxy.is_none() && !self.many => io.proxy_timeout(true),
            Completion::Timeout => io.proxy_timeout(self.connected),
            Completion::Error(_) => io.abort(),
        }
    }

    /// Moves the idle deadline to `idle_timeout_ms` after `now`: a connected
    /// proxy with `idle_timeout_ms`, or a one-to-one echo whose driver set
    /// [`SessionIo::idle_timeout_ms`] (a one-to-many socket's associations are
    /// closed by the kernel instead: SCTP_AUTOCLOSE, set by the worker when it
    /// opens the socket).
    fn touch(&self, io: &mut SessionIo, now: Instant) {
        match &self.proxy {
            Some(p) if self.connected && p.idle_timeout_ms > 0 => {
                io.set_deadline(Some(now + Duration::from_millis(p.idle_timeout_ms)));
            }
            None if !self.many => super::echo_idle(io, now),
            _ => {}
        }
    }

    /// A peel-off asked for by this one-to-many session ended; `failed` names the
    /// association if it could not be peeled off: it is aborted (it would
    /// otherwise stay open with nobody to serve it).
    pub fn on_peeled(&mut self, failed: Option<i32>, io: &mut SessionIo) {
        self.peels_pending = self.peels_pending.saturating_sub(1);
        if let Some(assoc) = failed {
            io.client().send_message(OutMessage {
                data: Vec::new(),
                info: MsgInfo {
                    assoc,
                    ..MsgInfo::default()
                },
                flags: sctp::SCTP_ABORT,
            });
        }
        self.resume(io);
    }

    /// Whether the association on `side` has ended (its peer shut it down): sends
    /// toward it can only fail.
    pub fn ended(&self, side: Side) -> bool {
        !self.many && (self.eof[side.index()] || self.send_shut[side.index()])
    }

    /// A send on `side` failed with `errno`. On a one-to-one socket ESHUTDOWN
    /// (the association is in a SHUTDOWN state: Linux `sctp_sf_error_shutdown`)
    /// and EPIPE (it has closed; an abort reports ECONNRESET instead) mean that
    /// its peer shut it down, possibly before the session read that end: the
    /// side takes nothing more ([`SctpSession::ended`]) and messages for it are
    /// dropped from now on; the end itself is still read and ends the session
    /// as usual.
    pub fn on_send_error(&mut self, side: Side, errno: i32) {
        if !self.many && matches!(errno, libc::ESHUTDOWN | libc::EPIPE) {
            self.send_shut[side.index()] = true;
        }
    }

    /// Asks for a receive on every side whose destination has room.
    fn resume(&self, io: &mut SessionIo) {
        if io.closing() || self.peels_pending > 0 {
            return;
        }
        if !self.proxying() {
            if io.client().unsent() < self.window {
                io.client().recv();
            }
            return;
        }
        if !self.connected {
            return;
        }
        for s in [Side::Client, Side::Upstream] {
            if !self.eof[s.index()] && io.side(s.other()).unsent() < self.window {
                io.side(s).recv();
            }
        }
    }

    fn on_piece(&mut self, side: Side, p: &Piece<'_>, io: &mut SessionIo) {
        if self.many && self.proxy.is_some() {
            // Its association could not be peeled off: nowhere to forward it.
            io.dropped += 1;
            return;
        }
        let dest = if self.proxying() {
            side.other()
        } else {
            Side::Client
        };
        if self.ended(dest) {
            // That side has ended (SCTP has no half-close: it takes no more data).
            io.dropped += 1;
            return;
        }
        let key = if self.many { p.info.assoc } else { 0 };
        // One-to-many: every association may hold a partial message; together they
        // may not hold more than the budget.
        let part = self.partial[side.index()].entry(key).or_default();
        // A whole message in one piece needs no buffering: never over budget.
        let over_budget = self.many
            && !(part.data.is_empty() && p.eor)
            && self.partial_bytes + p.data.len() > (4 * self.max_message).max(1 << 20);
        if part.data.is_empty() && !part.dropping {
            part.info = p.info;
        }
        if !part.dropping && (part.data.len() + p.data.len() > self.max_message || over_budget) {
            io.too_big += 1;
            self.partial_bytes -= part.data.len();
            tracing::debug!(
                assoc = p.info.assoc,
                limit = self.max_message,
                "SCTP message larger than max_message_bytes; aborting its association"
            );
            if !self.many {
                io.abort();
                return;
            }
            part.dropping = true;
            part.data = Vec::new();
            io.client().send_message(OutMessage {
                data: Vec::new(),
                info: MsgInfo {
                    assoc: p.info.assoc,
                    ..MsgInfo::default()
                },
                flags: sctp::SCTP_ABORT,
            });
        }
        if part.dropping {
            if p.eor {
                self.partial[side.index()].remove(&key);
            }
            return;
        }
        part.data.extend_from_slice(p.data);
        self.partial_bytes += p.data.len();
        if !p.eor {
            return;
        }
        let Some(whole) = self.partial[side.index()].remove(&key) else {
            return;
        };
        self.partial_bytes -= whole.data.len();
        if self.proxying() {
            io.side(side.other()).send_message(OutMessage {
                data: whole.data,
                info: MsgInfo {
                    assoc: 0,
                    ..whole.info
                },
                flags: 0,
            });
        } else {
            io.client().send_message(OutMessage {
                data: whole.data,
                info: whole.info,
                flags: 0,
            });
        }
    }

    fn on_notification(&mut self, side: Side, p: &Piece<'_>, io: &mut SessionIo, now: Instant) {
        let n = Notification::parse(p.data);
        tracing::debug!(?side, notification = ?n, "SCTP notification");
        match n {
            Some(Notification::AssocChange { state, assoc }) if self.many => match state {
                // Proxy: the peeled-off session counts itself.
                sctp::SCTP_COMM_UP if self.proxy.is_some() => {
                    self.peels_pending += 1;
                    io.peel_off.push(assoc);
                }
                sctp::SCTP_COMM_UP => io.assoc_up += 1,
                sctp::SCTP_COMM_LOST | sctp::SCTP_SHUTDOWN_COMP if self.proxy.is_none() => {
                    io.assoc_down += 1;
                    if let Some(p) = self.partial[0].remove(&assoc) {
                        self.partial_bytes -= p.data.len();
                    }
                }
                _ => {}
            },
            // One association per socket: its end, as seen by the stack. A
            // one-to-one socket also reports it by recvmsg returning 0 or an
            // error, a peeled-off one only this way.
            Some(Notification::Shutdown { .. }) if !self.many && !self.eof[side.index()] => {
                self.on_complete(side, Completion::Eof, io, now)
            }
            Some(Notification::AssocChange { state, .. }) if !self.many => match state {
                sctp::SCTP_COMM_LOST => {
                    io.lost = true;
                    self.on_complete(side, Completion::Error(libc::ECONNRESET), io, now)
                }
                sctp::SCTP_SHUTDOWN_COMP if !self.eof[side.index()] => {
                    self.on_complete(side, Completion::Eof, io, now)
                }
                _ => {}
            },
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{Completion, Session};

    fn now() -> Instant {
        Instant::now()
    }

    fn cfg(max: usize) -> SctpConfig {
        SctpConfig {
            max_message_bytes: max,
            ..SctpConfig::default()
        }
    }

    fn piece(data: &[u8], stream: u16, ppid: u32, assoc: i32, eor: bool) -> Completion<'_> {
        Completion::Message(Piece {
            data,
            info: MsgInfo {
                stream,
                ppid,
                assoc,
            },
            eor,
            notification: false,
        })
    }

    #[test]
    fn echo_reassembles_and_keeps_stream_and_ppid() {
        let mut s = SctpSession::new(&Action::Echo, &cfg(100), false);
        let mut io = SessionIo::default();
        s.on_open(&mut io, now());
        assert!(io.client().want_recv);
        s.on_complete(Side::Client, piece(b"hel", 3, 77, 0, false), &mut io, now());
        assert!(io.client().msgs.is_empty(), "no partial message is sent");
        s.on_complete(Side::Client, piece(b"lo", 3, 77, 0, true), &mut io, now());
        let m = io.client().msgs.pop_front().unwrap();
        assert_eq!(m.data, b"hello");
        assert_eq!((m.info.stream, m.info.ppid), (3, 77));
    }

    /// One-to-one echo honours `idle_timeout_ms` like TCP echo: the deadline is
    /// set at open, moved by every message, and its expiry ends the association
    /// cleanly (SHUTDOWN) when nothing is unsent, with an abort otherwise. A
    /// one-to-many socket gets no session deadline (SCTP_AUTOCLOSE instead).
    #[test]
    fn one_to_one_echo_idle_timeout() {
        let t0 = now();
        let ms = |n| Duration::from_millis(n);
        for unsent in [false, true] {
            let mut s = SctpSession::new(&Action::Echo, &cfg(100), false);
            let mut io = SessionIo {
                idle_timeout_ms: 100,
                ..SessionIo::default()
            };
            s.on_open(&mut io, t0);
            assert_eq!(io.deadline, Some(t0 + ms(100)));
            s.on_complete(
                Side::Client,
                piece(b"hi", 1, 2, 0, true),
                &mut io,
                t0 + ms(50),
            );
            assert_eq!(io.deadline, Some(t0 + ms(150)), "a message moves it");
            if !unsent {
                // The driver sent it.
                let c = io.client();
                c.msgs.clear();
                c.msg_bytes = 0;
            }
            s.on_complete(Side::Client, Completion::Timeout, &mut io, t0 + ms(150));
            assert_eq!(io.timed_out, Some(crate::proto::TimeoutKind::Idle));
            // (An abort closes too.)
            assert_eq!((io.close, io.abort), (true, unsent), "unsent {unsent}");
        }
        let mut s = SctpSession::new(&Action::Echo, &cfg(100), true);
        let mut io = SessionIo {
            idle_timeout_ms: 100,
            ..SessionIo::default()
        };
        s.on_open(&mut io, t0);
        s.on_complete(Side::Client, piece(b"hi", 1, 2, 7, true), &mut io, t0);
        assert_eq!(io.deadline, None, "one-to-many: no session deadline");
    }

    #[test]
    fn too_big_aborts_one_to_one_and_counts() {
        let mut s = SctpSession::new(&Action::Echo, &cfg(4), false);
        let mut io = SessionIo::default();
        s.on_complete(Side::Client, piece(b"abc", 0, 0, 0, false), &mut io, now());
        s.on_complete(Side::Client, piece(b"de", 0, 0, 0, true), &mut io, now());
        assert!(io.abort && io.too_big == 1);
    }

    #[test]
    fn one_to_many_keeps_associations_apart_and_aborts_only_the_big_one() {
        let mut s = SctpSession::new(&Action::Echo, &cfg(4), true);
        let mut io = SessionIo::default();
        s.on_complete(Side::Client, piece(b"ab", 1, 5, 10, false), &mut io, now());
        s.on_complete(Side::Client, piece(b"xyz", 2, 6, 11, false), &mut io, now());
        s.on_complete(Side::Client, piece(b"c", 1, 5, 10, true), &mut io, now());
        let m = io.client().msgs.pop_front().unwrap();
        assert_eq!(
            (m.data.as_slice(), m.info.assoc, m.info.stream),
            (&b"abc"[..], 10, 1)
        );
        // association 11 goes over the limit: an abort for it alone.
        s.on_complete(Side::Client, piece(b"zz", 2, 6, 11, false), &mut io, now());
        let a = io.client().msgs.pop_front().unwrap();
        assert_eq!((a.flags, a.info.assoc), (sctp::SCTP_ABORT, 11));
        assert!(!io.abort && io.too_big == 1);
        s.on_complete(Side::Client, piece(b"end", 2, 6, 11, true), &mut io, now());
        assert!(
            io.client().msgs.is_empty(),
            "the rest of the big one is dropped"
        );
    }

    #[test]
    fn notifications_are_not_data() {
        let mut s = SctpSession::new(&Action::Echo, &cfg(100), true);
        let mut io = SessionIo::default();
        let mut n = vec![0u8; 20];
        n[0..2].copy_from_slice(&sctp::SCTP_ASSOC_CHANGE.to_ne_bytes());
        s.on_complete(
            Side::Client,
            Completion::Message(Piece {
                data: &n,
                info: MsgInfo::default(),
                eor: true,
                notification: true,
            }),
            &mut io,
            now(),
        );
        assert!(io.client().msgs.is_empty());
        assert_eq!(io.assoc_up, 1);
        assert!(io.client().want_recv);
    }

    fn notification(ty: u16, state: u16) -> Vec<u8> {
        let mut n = vec![0u8; 20];
        n[0..2].copy_from_slice(&ty.to_ne_bytes());
        n[8..10].copy_from_slice(&state.to_ne_bytes());
        n
    }

    fn note(n: &[u8]) -> Completion<'_> {
        Completion::Message(Piece {
            data: n,
            info: MsgInfo::default(),
            eor: true,
            notification: true,
        })
    }

    #[test]
    fn association_end_notifications_end_one_to_one_sessions() {
        // A lost association aborts (the peer sees an abort, not a clean end).
        let mut s = SctpSession::new(&Action::Echo, &cfg(100), false);
        let mut io = SessionIo::default();
        let lost = notification(sctp::SCTP_ASSOC_CHANGE, sctp::SCTP_COMM_LOST);
        s.on_complete(Side::Client, note(&lost), &mut io, now());
        assert!(io.abort);
        // The peer's SHUTDOWN ends an echo session cleanly.
        let mut s = SctpSession::new(&Action::Echo, &cfg(100), false);
        let mut io = SessionIo::default();
        let shut = notification(sctp::SCTP_SHUTDOWN_EVENT, 0);
        s.on_complete(Side::Client, note(&shut), &mut io, now());
        assert!(io.close && !io.abort);
    }

    #[test]
    fn peeled_off_client_is_ended_with_sctp_eof() {
        let a = Action::Proxy(Arc::new(proxy_cfg()));
        let mut s = SctpSession::new(&a, &cfg(100), false).peeled_off();
        let mut io = SessionIo::default();
        s.on_open(&mut io, now());
        s.on_complete(Side::Upstream, Completion::Connected, &mut io, now());
        s.on_complete(Side::Upstream, Completion::Eof, &mut io, now());
        let m = io.client().msgs.pop_front().expect("an SCTP_EOF message");
        assert_eq!((m.flags, m.data.len()), (sctp::SCTP_EOF, 0));
        assert!(
            !io.client().shutdown_write,
            "shutdown(2) does nothing there"
        );
    }

    #[test]
    fn one_to_many_proxy_pauses_reading_until_peel_off_ends() {
        let a = Action::Proxy(Arc::new(proxy_cfg()));
        let mut s = SctpSession::new(&a, &cfg(100), true);
        let mut io = SessionIo::default();
        s.on_open(&mut io, now());
        io.client().want_recv = false;
        let mut up = notification(sctp::SCTP_ASSOC_CHANGE, sctp::SCTP_COMM_UP);
        up[16..20].copy_from_slice(&33i32.to_ne_bytes());
        s.on_complete(Side::Client, note(&up), &mut io, now());
        assert_eq!(io.peel_off, vec![33]);
        assert!(
            !io.client().want_recv,
            "no read while the peel-off is pending"
        );
        s.on_peeled(None, &mut io);
        assert!(io.client().want_recv);
    }

    fn proxy_cfg() -> ProxyConfig {
        ProxyConfig {
            session_idle_timeout_ms: 0,
            ..ProxyConfig::test()
        }
    }

    #[test]
    fn proxy_forwards_both_ways_and_propagates_shutdown() {
        let a = Action::Proxy(Arc::new(proxy_cfg()));
        let mut s = Session::Sctp(Box::new(SctpSession::new(&a, &cfg(100), false)));
        let mut io = SessionIo::default();
        let Session::Sctp(inner) = &mut s else {
            unreachable!()
        };
        inner.on_open(&mut io, now());
        assert!(io.connect && !io.client().want_recv);
        s.on_complete(Side::Upstream, Completion::Connected, &mut io, now());
        assert!(io.client().want_recv && io.side(Side::Upstream).want_recv);
        s.on_complete(Side::Client, piece(b"req", 4, 9, 0, true), &mut io, now());
        let m = io.side(Side::Upstream).msgs.pop_front().unwrap();
        assert_eq!(
            (m.data.as_slice(), m.info.stream, m.info.ppid),
            (&b"req"[..], 4, 9)
        );
        s.on_complete(
            Side::Upstream,
            piece(b"rsp", 5, 10, 0, true),
            &mut io,
            now(),
        );
        let m = io.client().msgs.pop_front().unwrap();
        assert_eq!((m.info.stream, m.info.ppid), (5, 10));
        s.on_complete(Side::Client, Completion::Eof, &mut io, now());
        assert!(io.side(Side::Upstream).shutdown_write && !io.close);
        s.on_complete(Side::Upstream, Completion::Eof, &mut io, now());
        assert!(io.close);
    }
}
