//! `action = "proxy"`: bytes both ways between a client and an upstream.
//!
//! - The upstream connect starts on accept; the client is read only once the
//!   upstream is connected (a PROXY header, if configured, goes first).
//! - Each direction has a window of `buffer_bytes`: a side is read only while the
//!   other side has less than that unsent, so a slow reader slows the writer and
//!   memory stays bounded (back-pressure).
//! - FIN from one side becomes a half-close (shutdown(SHUT_WR)) toward the other,
//!   after everything before it was sent; the other direction keeps flowing. The
//!   session closes when both directions have ended.
//! - An error on either side (reset, refused, unreachable) aborts both: the other
//!   peer sees a reset, never a clean EOF.
//! - With `splice` (TCP), the driver may relay a direction socket → pipe →
//!   socket with splice(2): the bytes in the pipe count in the window like
//!   queued bytes ([`super::SideIo::unsent`]), and the session is told of them
//!   with [`ProxySession::on_piped`] (received) and [`Completion::Sent`].
//! - `connect_timeout_ms` bounds the connect; `idle_timeout_ms` (if not 0) closes a
//!   session with no traffic.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::proxy_header;
use super::{Completion, ConnInfo, SessionIo, Side};
use crate::config::ProxyConfig;

/// State of one proxied connection.
#[derive(Debug)]
pub struct ProxySession {
    cfg: Arc<ProxyConfig>,
    connected: bool,
    /// EOF seen from each side (index by [`Side::index`]).
    eof: [bool; 2],
}

impl ProxySession {
    /// A session for a listener with upstream configuration `cfg`.
    pub fn new(cfg: Arc<ProxyConfig>) -> ProxySession {
        ProxySession {
            cfg,
            connected: false,
            eof: [false; 2],
        }
    }

    /// The listener's proxy settings.
    pub fn config(&self) -> &ProxyConfig {
        &self.cfg
    }

    /// The driver spliced bytes received on side `s` into the pipe toward the
    /// other side (counted in that side's [`super::SideIo::unsent`]), at `now`:
    /// what [`Completion::Recv`] does, without the bytes passing through here.
    pub fn on_piped(&mut self, s: Side, io: &mut SessionIo, now: Instant) {
        io.side(s).want_recv = false;
        self.resume(s, io);
        self.touch(io, now);
    }

    /// Whether the upstream connection has been established.
    pub fn connected(&self) -> bool {
        self.connected
    }

    /// Starts the upstream connect, with the connect timeout counted from `now`;
    /// queues the PROXY header (sent once connected).
    pub fn on_open(&mut self, info: &ConnInfo, netns: &str, io: &mut SessionIo, now: Instant) {
        io.connect();
        io.set_deadline(Some(
            now + Duration::from_millis(self.cfg.connect_timeout_ms),
        ));
        if let Some(v) = self.cfg.proxy_protocol {
            let ns = (netns != "root").then_some(netns);
            let h = proxy_header::encode(v, info.peer, info.local, ns);
            io.side(Side::Upstream).send(&h);
        }
    }

    /// Moves the idle deadline to `idle_timeout_ms` after `now` (if configured).
    fn touch(&self, io: &mut SessionIo, now: Instant) {
        if self.cfg.idle_timeout_ms > 0 {
            io.set_deadline(Some(now + Duration::from_millis(self.cfg.idle_timeout_ms)));
        }
    }

    /// How many more bytes side `s` may take before the other side's queue
    /// reaches the window (`buffer_bytes` minus what the other side has not
    /// sent; bytes). A receive that takes no more than this keeps the window.
    pub fn recv_room(&self, s: Side, io: &SessionIo) -> usize {
        self.cfg
            .buffer_bytes
            .saturating_sub(io.sides[s.other().index()].unsent())
    }

    /// Reads side `s` again if the other side's queue has room and `s` has not ended.
    fn resume(&self, s: Side, io: &mut SessionIo) {
        if !self.eof[s.index()]
            && !io.closing()
            && io.side(s.other()).unsent() < self.cfg.buffer_bytes
        {
            io.side(s).recv();
        }
    }

    /// Handles one completion on side `side`, reported at `now`.
    pub fn on_complete(&mut self, side: Side, c: Completion<'_>, io: &mut SessionIo, now: Instant) {
        match c {
            Completion::Connected => {
                self.connected = true;
                io.set_deadline(None);
                self.touch(io, now);
                self.resume(Side::Client, io);
                self.resume(Side::Upstream, io);
            }
            Completion::Recv(data) => {
                io.side(side.other()).send(data);
                self.resume(side, io);
                self.touch(io, now);
            }
            Completion::Sent(_) => {
                // Room on `side`: the other side, whose bytes these were, may read again.
                self.resume(side.other(), io);
                self.touch(io, now);
            }
            Completion::Eof => {
                self.eof[side.index()] = true;
                io.side(side.other()).shutdown_write();
                if self.eof == [true, true] {
                    io.close();
                }
            }
            Completion::Timeout => io.proxy_timeout(self.connected),
            Completion::Error(_) => io.abort(),
            // SCTP pieces go to SctpSession, never here.
            Completion::Message(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::proxy_header::ProxyProtocol;

    fn cfg(buffer: usize, pp: Option<ProxyProtocol>) -> Arc<ProxyConfig> {
        Arc::new(ProxyConfig {
            connect_timeout_ms: 5000,
            buffer_bytes: buffer,
            proxy_protocol: pp,
            max_sessions: 10,
            ..ProxyConfig::test()
        })
    }

    fn now() -> Instant {
        Instant::now()
    }

    const INFO: ConnInfo = ConnInfo {
        peer: None,
        local: None,
    };

    #[test]
    fn connects_first_then_reads_both_sides() {
        let mut p = ProxySession::new(cfg(1000, Some(ProxyProtocol::V1)));
        let mut io = SessionIo::default();
        p.on_open(&INFO, "tenant", &mut io, now());
        assert!(io.connect && io.deadline.is_some());
        assert!(
            !io.client().want_recv,
            "client read before the upstream is up"
        );
        assert_eq!(io.side(Side::Upstream).out, b"PROXY UNKNOWN\r\n");
        p.on_complete(Side::Upstream, Completion::Connected, &mut io, now());
        assert!(io.client().want_recv && io.side(Side::Upstream).want_recv);
        assert!(io.deadline.is_none());
    }

    #[test]
    fn window_stalls_the_writer_until_the_reader_drains() {
        let mut p = ProxySession::new(cfg(1000, None));
        let mut io = SessionIo::default();
        p.on_open(&INFO, "root", &mut io, now());
        p.on_complete(Side::Upstream, Completion::Connected, &mut io, now());
        io.side(Side::Upstream).want_recv = false;
        p.on_complete(
            Side::Upstream,
            Completion::Recv(&[1u8; 1000]),
            &mut io,
            now(),
        );
        assert_eq!(io.client().out.len(), 1000);
        assert!(
            !io.side(Side::Upstream).want_recv,
            "upstream read past the window"
        );
        io.client().out.clear();
        p.on_complete(Side::Client, Completion::Sent(1000), &mut io, now());
        assert!(io.side(Side::Upstream).want_recv);
    }

    #[test]
    fn piped_bytes_count_in_the_window_and_hold_the_fin() {
        let mut p = ProxySession::new(cfg(1000, None));
        let mut io = SessionIo::default();
        p.on_open(&INFO, "root", &mut io, now());
        p.on_complete(Side::Upstream, Completion::Connected, &mut io, now());
        io.side(Side::Upstream).want_recv = false;
        // The driver spliced 1000 bytes from the upstream into the client's pipe.
        io.client().piped += 1000;
        p.on_piped(Side::Upstream, &mut io, now());
        assert!(
            !io.side(Side::Upstream).want_recv,
            "upstream read past the window"
        );
        assert_eq!(p.recv_room(Side::Upstream, &io), 0);
        p.on_complete(Side::Upstream, Completion::Eof, &mut io, now());
        assert!(io.client().shutdown_write && io.client().unsent() == 1000);
        // Spliced out: room again, and nothing left before the FIN.
        io.client().piped -= 1000;
        p.on_complete(Side::Client, Completion::Sent(1000), &mut io, now());
        assert_eq!(io.client().unsent(), 0);
    }

    #[test]
    fn fin_is_a_half_close_and_both_fins_close() {
        let mut p = ProxySession::new(cfg(1000, None));
        let mut io = SessionIo::default();
        p.on_open(&INFO, "root", &mut io, now());
        p.on_complete(Side::Upstream, Completion::Connected, &mut io, now());
        p.on_complete(Side::Client, Completion::Eof, &mut io, now());
        assert!(io.side(Side::Upstream).shutdown_write);
        assert!(!io.close);
        io.side(Side::Upstream).want_recv = false;
        p.on_complete(Side::Upstream, Completion::Recv(b"reply"), &mut io, now());
        assert_eq!(io.client().out, b"reply");
        assert!(io.side(Side::Upstream).want_recv);
        p.on_complete(Side::Upstream, Completion::Eof, &mut io, now());
        assert!(io.client().shutdown_write && io.close && !io.abort);
    }

    #[test]
    fn reset_aborts_and_connect_timeout_aborts() {
        let mut p = ProxySession::new(cfg(1000, None));
        let mut io = SessionIo::default();
        p.on_open(&INFO, "root", &mut io, now());
        p.on_complete(Side::Client, Completion::Timeout, &mut io, now());
        assert!(io.abort);
        let mut p = ProxySession::new(cfg(1000, None));
        let mut io = SessionIo::default();
        p.on_open(&INFO, "root", &mut io, now());
        p.on_complete(Side::Upstream, Completion::Connected, &mut io, now());
        p.on_complete(
            Side::Upstream,
            Completion::Error(libc::ECONNRESET),
            &mut io,
            now(),
        );
        assert!(io.abort && io.close);
    }

    #[test]
    fn idle_timeout_closes_cleanly_unless_bytes_are_stuck() {
        let mut p = ProxySession::new(cfg(1000, None));
        let mut io = SessionIo::default();
        p.on_open(&INFO, "root", &mut io, now());
        p.on_complete(Side::Upstream, Completion::Connected, &mut io, now());
        p.on_complete(Side::Client, Completion::Timeout, &mut io, now());
        assert!(io.close && !io.abort, "an idle session closes cleanly");
        let mut p = ProxySession::new(cfg(1000, None));
        let mut io = SessionIo::default();
        p.on_open(&INFO, "root", &mut io, now());
        p.on_complete(Side::Upstream, Completion::Connected, &mut io, now());
        p.on_complete(
            Side::Upstream,
            Completion::Recv(b"never read"),
            &mut io,
            now(),
        );
        p.on_complete(Side::Client, Completion::Timeout, &mut io, now());
        assert!(
            io.abort,
            "bytes a client will not take must not hold the session"
        );
    }
}
