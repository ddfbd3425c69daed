//! SCTP one-to-one sessions (echo, proxy; accepted or peeled off) against
//! simulated SCTP peers: messages in pieces (MSG_EOR on the last), stream ids
//! and PPIDs, notifications, the end of an association as SHUTDOWN_EVENT /
//! SHUTDOWN_COMP notifications and a 0-byte receive, COMM_LOST, sends that find
//! no room (EAGAIN) or fail.

use std::collections::VecDeque;
use std::sync::Arc;

use super::{hit, run, Got, Net, Put, Rng, Sim};
use crate::config::{Action, Proto, ProxyConfig, SctpConfig};
use crate::proto::{ConnInfo, Origin, OutMessage, Session, Side, SEND_WINDOW};
use crate::sctp::{self, MsgInfo};

/// One message of a peer's script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Msg {
    pub data: Vec<u8>,
    pub stream: u16,
    pub ppid: u32,
}

/// `n` messages of stream `salt`, mostly up to `max` bytes; `too_big` adds one
/// over it somewhere.
pub(super) fn script(rng: &mut Rng, salt: u64, n: usize, max: usize, too_big: bool) -> Vec<Msg> {
    let mut v: Vec<Msg> = (0..n)
        .map(|i| Msg {
            data: Rng::pattern(salt.wrapping_mul(1000) + i as u64, rng.range(1, max)),
            stream: rng.below(5) as u16,
            ppid: rng.pick(&[0, 46, 51, 0xdead_beef]),
        })
        .collect();
    if too_big {
        let at = rng.range(0, v.len());
        v.insert(
            at,
            Msg {
                data: Rng::pattern(salt ^ 0xb16, rng.range(max + 1, 2 * max + 10)),
                stream: 1,
                ppid: 7,
            },
        );
    }
    v
}

/// A notification as the kernel lays it out (RFC 6458 6.1): `SCTP_ASSOC_CHANGE`
/// with `state`, for `assoc`.
pub(super) fn assoc_change(state: u16, assoc: i32) -> Vec<u8> {
    let mut n = vec![0u8; 20];
    n[0..2].copy_from_slice(&sctp::SCTP_ASSOC_CHANGE.to_ne_bytes());
    n[4..8].copy_from_slice(&20u32.to_ne_bytes());
    n[8..10].copy_from_slice(&state.to_ne_bytes());
    n[16..20].copy_from_slice(&assoc.to_ne_bytes());
    n
}

/// `SCTP_SHUTDOWN_EVENT` for `assoc`.
pub(super) fn shutdown_event(assoc: i32) -> Vec<u8> {
    let mut n = vec![0u8; 12];
    n[0..2].copy_from_slice(&sctp::SCTP_SHUTDOWN_EVENT.to_ne_bytes());
    n[4..8].copy_from_slice(&12u32.to_ne_bytes());
    n[8..12].copy_from_slice(&assoc.to_ne_bytes());
    n
}

/// `SCTP_PEER_ADDR_CHANGE` (ignored by sessions).
pub(super) fn addr_change(assoc: i32) -> Vec<u8> {
    let mut n = vec![0u8; 148];
    n[0..2].copy_from_slice(&sctp::SCTP_PEER_ADDR_CHANGE.to_ne_bytes());
    n[4..8].copy_from_slice(&148u32.to_ne_bytes());
    n[144..148].copy_from_slice(&assoc.to_ne_bytes());
    n
}

pub(super) fn note(data: Vec<u8>) -> Got {
    Got::Piece {
        data,
        info: MsgInfo::default(),
        eor: true,
        notification: true,
    }
}

/// What ends an association from the peer's side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// SHUTDOWN after its script (and, if patient, after it got everything).
    Graceful,
    /// The association is lost after this many messages (ABORT, or a failure).
    Lost(usize),
}

/// One SCTP peer of a one-to-one association.
#[derive(Debug)]
struct Peer {
    script: Vec<Msg>,
    /// Messages written (the session may receive them).
    written: usize,
    /// Messages the session received whole, and bytes of the next one.
    taken: usize,
    pos: usize,
    end: End,
    /// Waits for everything it should get before it ends.
    patient: bool,
    /// Never ends by itself: waits for the session to end the association.
    waits_for_end: bool,
    end_written: bool,
    /// What receives return once the end is written and the data taken.
    ending: VecDeque<Got>,
    /// The association is gone (lost, or aborted by the session).
    dead: bool,
    got: usize,
    stalled: bool,
    stalls_left: u32,
    spurious: u32,
    notes_left: u32,
    /// The session ended the association (shutdown(2) or SCTP_EOF).
    got_shutdown: bool,
    /// The session closed or aborted.
    closed: bool,
    /// Peeled off a one-to-many socket: no 0-byte receive at the end, and
    /// shutdown(2) does nothing.
    peeled: bool,
    live: bool,
    max_recv: usize,
    /// The kernel's association id (one-to-one sockets report it too).
    assoc: i32,
}

impl Peer {
    fn new(rng: &mut Rng, script: Vec<Msg>, peeled: bool) -> Peer {
        // Tiny pieces only for little data, so that a sequence stays short.
        let floor = (script.iter().map(|m| m.data.len()).sum::<usize>() / 300).max(1);
        let end = if rng.one_in(8) {
            End::Lost(rng.range(0, script.len()))
        } else {
            End::Graceful
        };
        Peer {
            script,
            written: 0,
            taken: 0,
            pos: 0,
            end,
            patient: !rng.one_in(4),
            waits_for_end: false,
            end_written: false,
            ending: VecDeque::new(),
            dead: false,
            got: 0,
            stalled: false,
            stalls_left: rng.range(0, 3) as u32,
            spurious: rng.range(0, 2) as u32,
            notes_left: rng.range(0, 2) as u32,
            got_shutdown: false,
            closed: false,
            peeled,
            live: true,
            max_recv: rng.pick(&[1, 10, 100, 16 * 1024]).max(floor),
            assoc: rng.range(1, 1000) as i32,
        }
    }

    /// The graceful end signals, as receives return them.
    fn graceful_ending(&mut self, rng: &mut Rng, by_peer: bool) {
        let a = self.assoc;
        let mut e = VecDeque::new();
        if by_peer && !rng.one_in(3) {
            e.push_back(note(shutdown_event(a)));
        }
        if self.peeled || rng.one_in(2) {
            e.push_back(note(assoc_change(sctp::SCTP_SHUTDOWN_COMP, a)));
        }
        if !self.peeled {
            e.push_back(Got::Eof);
        }
        self.ending = e;
        self.end_written = true;
    }

    fn lost(&mut self, rng: &mut Rng) {
        self.ending = VecDeque::from([if self.peeled || rng.one_in(2) {
            note(assoc_change(sctp::SCTP_COMM_LOST, self.assoc))
        } else {
            Got::Error(libc::ECONNRESET)
        }]);
        self.end_written = true;
        self.dead = true;
    }

    fn data_left(&self) -> bool {
        self.taken < self.written
    }

    fn can_recv(&self) -> bool {
        self.live
            && (self.spurious > 0
                || self.data_left()
                || (self.pos == 0 && self.notes_left > 0)
                || (self.end_written && (!self.ending.is_empty() || !self.peeled)))
    }

    fn recv(&mut self, rng: &mut Rng) -> Got {
        if self.spurious > 0 && rng.one_in(2) {
            self.spurious -= 1;
            return Got::Nothing;
        }
        if self.pos == 0 && self.notes_left > 0 && (rng.one_in(3) || !self.can_recv_else()) {
            self.notes_left -= 1;
            return note(addr_change(self.assoc));
        }
        // A lost association may drop what was still to be read.
        if self.data_left() && !(self.dead && self.pos == 0 && rng.one_in(2)) {
            let m = &self.script[self.taken];
            let n = rng.range(1, (m.data.len() - self.pos).min(self.max_recv));
            let data = m.data[self.pos..self.pos + n].to_vec();
            let info = MsgInfo {
                stream: m.stream,
                ppid: m.ppid,
                assoc: self.assoc,
            };
            self.pos += n;
            let eor = self.pos == m.data.len();
            if eor {
                self.taken += 1;
                self.pos = 0;
            }
            return Got::Piece {
                data,
                info,
                eor,
                notification: false,
            };
        }
        if self.end_written {
            if let Some(g) = self.ending.pop_front() {
                if self.dead {
                    // The rest is gone with the association.
                    self.taken = self.written;
                    self.pos = 0;
                }
                return g;
            }
            if !self.peeled {
                return if self.dead {
                    Got::Error(libc::ECONNRESET)
                } else {
                    Got::Eof
                };
            }
        }
        self.spurious = self.spurious.saturating_sub(1);
        Got::Nothing
    }

    fn can_recv_else(&self) -> bool {
        self.data_left() || (self.end_written && (!self.ending.is_empty() || !self.peeled))
    }

    fn send(&mut self, who: Side, m: &OutMessage, from: &[Msg]) -> Put {
        assert!(!self.closed, "{who:?}: a message after the close");
        assert!(
            m.flags & sctp::SCTP_ABORT == 0,
            "{who:?}: SCTP_ABORT on one-to-one"
        );
        if self.dead {
            // ECONNRESET, or EPIPE once the socket error was taken.
            return Put::Failed(if self.got % 2 == 0 {
                libc::ECONNRESET
            } else {
                libc::EPIPE
            });
        }
        if self.end_written {
            // It shut the association down: no new data (RFC 9260 9.2); Linux
            // says ESHUTDOWN in the SHUTDOWN states, EPIPE once closed.
            return Put::Failed(if self.ending.is_empty() {
                libc::EPIPE
            } else {
                libc::ESHUTDOWN
            });
        }
        assert!(
            !self.got_shutdown,
            "{who:?}: a message after the session ended the association"
        );
        if self.stalled {
            return Put::NoRoom;
        }
        if m.flags & sctp::SCTP_EOF != 0 {
            assert!(self.peeled && m.data.is_empty(), "{who:?}: SCTP_EOF");
            assert_eq!(
                self.got,
                from.len(),
                "{who:?}: SCTP_EOF before everything was sent"
            );
            self.got_shutdown = true;
            return Put::Took(0);
        }
        assert_eq!(m.flags, 0, "{who:?}: flags");
        let want = from.get(self.got);
        let got = Msg {
            data: m.data.clone(),
            stream: m.info.stream,
            ppid: m.info.ppid,
        };
        assert!(
            want == Some(&got),
            "{who:?}: message {} is {} bytes on stream {} PPID {}, expected {:?}",
            self.got,
            got.data.len(),
            got.stream,
            got.ppid,
            want.map(|w| (w.data.len(), w.stream, w.ppid))
        );
        self.got += 1;
        Put::Took(m.data.len())
    }

    fn moves(&self, expected: usize) -> [bool; 4] {
        let can_write = self.live && !self.closed && !self.end_written && !self.got_shutdown;
        let end_now = match self.end {
            End::Lost(at) => self.written >= at,
            End::Graceful => {
                self.written == self.script.len()
                    && (!self.patient || self.got >= expected)
                    && !self.waits_for_end
            }
        };
        [
            can_write
                && self.written < self.script.len()
                && !matches!(self.end, End::Lost(at) if self.written >= at),
            self.live
                && !self.closed
                && !self.end_written
                && (self.got_shutdown || (can_write && end_now)),
            self.live && !self.closed && !self.dead && self.stalls_left > 0 && !self.stalled,
            self.live && !self.closed && self.stalled,
        ]
    }

    fn step(&mut self, k: usize, rng: &mut Rng) {
        match k {
            0 => self.written += 1,
            1 => {
                if self.got_shutdown {
                    // The session's SHUTDOWN: the peer writes nothing more.
                    self.script.truncate(self.written);
                    self.graceful_ending(rng, false);
                } else if matches!(self.end, End::Lost(_)) {
                    self.lost(rng);
                } else {
                    self.graceful_ending(rng, true);
                }
            }
            2 => {
                self.stalled = true;
                self.stalls_left -= 1;
            }
            _ => self.stalled = false,
        }
    }

    fn done(&self) -> bool {
        !self.live || self.closed || (self.end_written && !self.stalled)
    }
}

/// The client and, for proxy, the upstream association.
#[derive(Debug)]
struct Peers {
    p: [Peer; 2],
    /// Whose script each peer should get back (echo: its own).
    from: [usize; 2],
    connect: Option<Result<(), i32>>,
    connecting: bool,
}

impl Peers {
    /// How many messages peer `i` waits for before it ends, if patient: all
    /// of its source's script (never, if the source will lose the association).
    fn expected(&self, i: usize) -> usize {
        let src = &self.p[self.from[i]];
        match src.end {
            End::Graceful => src.script.len(),
            End::Lost(_) if self.from[i] == i => src.script.len(),
            End::Lost(_) => usize::MAX,
        }
    }
}

impl Net for Peers {
    fn can_recv(&self, side: Side) -> bool {
        self.p[side.index()].can_recv()
    }
    fn recv(&mut self, side: Side, rng: &mut Rng) -> Got {
        self.p[side.index()].recv(rng)
    }
    fn can_send(&self, side: Side) -> bool {
        self.p[side.index()].live
    }
    fn send_bytes(&mut self, _: Side, _: &[u8], _: &mut Rng) -> Put {
        unreachable!("bytes on an SCTP socket")
    }
    fn send_msg(&mut self, side: Side, m: &OutMessage, _rng: &mut Rng) -> Put {
        let i = side.index();
        let from = std::mem::take(&mut self.p[self.from[i]].script);
        let r = self.p[i].send(side, m, &from);
        self.p[self.from[i]].script = from;
        r
    }
    fn shutdown(&mut self, side: Side) {
        let i = side.index();
        let written = self.p[self.from[i]].written;
        let p = &mut self.p[i];
        if p.peeled {
            return; // shutdown(2) does nothing on a peeled-off socket
        }
        if !p.dead && !p.end_written {
            assert_eq!(
                p.got, written,
                "{side:?}: SHUTDOWN before everything was sent"
            );
        }
        p.got_shutdown = true;
    }
    fn connect_started(&mut self, _rng: &mut Rng) {
        self.connecting = true;
    }
    fn can_connect(&self) -> bool {
        self.connecting && self.connect.is_some()
    }
    fn connect(&mut self, _rng: &mut Rng) -> Result<(), i32> {
        self.connecting = false;
        let r = self.connect.expect("can_connect");
        self.p[1].live = r.is_ok();
        r
    }
    fn peer_moves(&self) -> usize {
        (0..2)
            .map(|i| {
                let want = self.expected(i);
                self.p[i].moves(want).iter().filter(|&&m| m).count()
            })
            .sum()
    }
    fn peer_step(&mut self, rng: &mut Rng) {
        let mut k = rng.below(self.peer_moves());
        for i in 0..2 {
            let want = self.expected(i);
            for (j, on) in self.p[i].moves(want).into_iter().enumerate() {
                if on {
                    if k == 0 {
                        self.p[i].step(j, rng);
                        return;
                    }
                    k -= 1;
                }
            }
        }
    }
    fn closed(&mut self, _aborted: bool) {
        self.connecting = false;
        for p in &mut self.p {
            p.closed = true;
        }
    }
    fn quiet(&self) -> bool {
        self.p[0].done() && self.p[1].done() && !self.connecting
    }
}

fn sctp_one(seed: u64, trace: bool, proxy: bool) -> usize {
    let mut rng = Rng::new(seed);
    let max_message = rng.pick(&[64, 1000, 65_536]);
    let sctp_cfg = SctpConfig {
        max_message_bytes: max_message,
        ..SctpConfig::default()
    };
    let peeled = proxy && rng.one_in(3);
    if peeled {
        hit("sctp: client peeled off");
    }
    let too_big = [rng.one_in(12), proxy && rng.one_in(12)];
    let biggest = max_message.min(3000);
    let n = rng.range(0, 12);
    let s0 = script(&mut rng, seed, n, biggest, too_big[0]);
    let mut client = Peer::new(&mut rng, s0, peeled);
    let cfg = Arc::new(ProxyConfig {
        connect_timeout_ms: rng.pick(&[10, 1000]),
        idle_timeout_ms: rng.pick(&[0, 0, 20, 1000]),
        buffer_bytes: rng.pick(&[1, 1000, 65_536]),
        ..ProxyConfig::test()
    });
    let (action, upstream, from, connect) = if proxy {
        let n = rng.range(0, 12);
        let s1 = script(&mut rng, seed ^ 0x77, n, biggest, too_big[1]);
        let mut u = Peer::new(&mut rng, s1, false);
        u.live = false;
        // A client that leaves the end to the upstream: the session must end
        // its association (SHUTDOWN, or SCTP_EOF when peeled off).
        if u.end == End::Graceful && rng.one_in(3) {
            hit("sctp: client waits for the session to end it");
            client.waits_for_end = true;
        }
        let connect = match rng.below(20) {
            0 => None,
            1 | 2 => Some(Err(libc::ECONNREFUSED)),
            _ => Some(Ok(())),
        };
        (Action::Proxy(cfg.clone()), u, [1, 0], connect)
    } else {
        let mut u = Peer::new(&mut rng, Vec::new(), false);
        u.live = false;
        (Action::Echo, u, [0, 1], None)
    };
    let window = if proxy { cfg.buffer_bytes } else { SEND_WINDOW }.max(max_message);
    let origin = if peeled {
        Origin::Peeled
    } else {
        Origin::Accepted
    };
    let session = Session::for_listener(&action, Proto::Sctp, &sctp_cfg, origin);
    let net = Peers {
        p: [client, upstream],
        from,
        connect,
        connecting: false,
    };
    let info = ConnInfo {
        peer: None,
        local: None,
    };
    let mut s = Sim::open(session, &action, &info, net, rng, true, false, trace);
    s.max_unsent = [window + max_message; 2];
    s.run(200_000, 20_000);
    let aborted = s.closed == Some(true);
    let [c, u] = &s.net.p;
    if s.counts.too_big > 0 {
        assert!(
            aborted,
            "a message over the limit aborts a one-to-one association"
        );
    }
    if !too_big[0] && !too_big[1] {
        assert_eq!(s.counts.too_big, 0);
    }
    let graceful = |p: &Peer| p.end == End::Graceful && p.patient;
    // (An idle timeout may close cleanly in the middle: that is what it is for.)
    if !aborted && s.counts.timeouts == 0 && graceful(c) && (!proxy || graceful(u)) {
        if proxy {
            if s.net.connect == Some(Ok(())) {
                assert_eq!(c.got, u.written, "client: messages lost on a clean end");
                assert_eq!(u.got, c.written, "upstream: messages lost on a clean end");
                hit("clean end: everything delivered, checked");
            }
        } else {
            assert_eq!(c.got, c.written, "echo: messages lost on a clean end");
            hit("clean end: everything delivered, checked");
        }
    }
    let faultless = c.end == End::Graceful
        && (!proxy || (u.end == End::Graceful && s.net.connect == Some(Ok(()))))
        && s.counts.too_big == 0
        && s.counts.timeouts == 0;
    if faultless {
        assert!(!aborted, "peers that end gracefully got an abort");
    }
    if aborted {
        assert!(
            s.errors.iter().sum::<u32>() > 0
                || s.counts.timeouts > 0
                || s.counts.too_big > 0
                || s.counts.lost > 0,
            "an abort without an error, lost association, timeout or message over the limit"
        );
    }
    s.steps
}

#[test]
fn sctp_echo() {
    run(module_path!(), "sctp_echo", 3000, |seed, trace| {
        sctp_one(seed, trace, false)
    });
}

#[test]
fn sctp_proxy() {
    run(module_path!(), "sctp_proxy", 3000, |seed, trace| {
        sctp_one(seed, trace, true)
    });
}
