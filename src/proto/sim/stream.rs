//! Byte-stream sessions (echo, respond, http, proxy) against simulated TCP peers.

use std::net::SocketAddr;
use std::sync::Arc;

use super::{hit, run, Got, Net, Put, Rng, Sim};
use crate::config::{Action, ProxyConfig};
use crate::proto::http::{
    MAX_HEAD_BYTES, RESP_400, RESP_431, RESP_CLOSE, RESP_KEEPALIVE, RESP_KEEPALIVE_10,
};
use crate::proto::proxy_header::{self, ProxyProtocol};
use crate::proto::{ConnInfo, OutMessage, Session, Side, SEND_WINDOW};

/// One TCP peer: what it writes (then FIN or RST) and what it should receive.
#[derive(Debug, Default)]
struct Peer {
    /// The bytes it writes, in order.
    out: Vec<u8>,
    /// Bytes of `out` written so far (the session may receive them).
    written: usize,
    /// Bytes of `out` the session received.
    taken: usize,
    /// After `out`: FIN (else RST).
    fin_at_end: bool,
    /// RST once this much of `out` is written.
    reset_at: Option<usize>,
    fin_written: bool,
    /// The peer reset the connection.
    reset: bool,
    /// What the session should send it.
    expect: Vec<u8>,
    got: usize,
    /// Its receive buffer: room and bytes waiting in it.
    rcvbuf: usize,
    buffered: usize,
    reading: bool,
    stalls_left: u32,
    /// FIN / RST seen from the session.
    got_fin: bool,
    got_rst: bool,
    /// Receives left that complete with ENOBUFS or ECANCELED.
    spurious: u32,
    /// Largest receive the driver makes (bytes), largest write of the peer.
    max_recv: usize,
    max_write: usize,
    /// The connection exists (the upstream's once connected).
    live: bool,
    /// Writes only after the session's FIN (a server that reads to EOF and
    /// then answers: without the half-close it would wait forever).
    after_fin: bool,
    /// Sends its own FIN only after the session's (a client that reads the
    /// answer to its end before closing).
    fin_after_fin: bool,
}

impl Peer {
    fn new(rng: &mut Rng, out: Vec<u8>, expect: Vec<u8>, bulk: bool) -> Peer {
        let sizes = [1usize, 7, 100, 1500, 16 * 1024];
        let len = out.len();
        // Tiny pieces only for little data, so that a sequence stays short.
        let floor = (len.max(expect.len()) / 100).max(1);
        let size = |rng: &mut Rng| rng.pick(&sizes).max(floor);
        let reset_at = rng.one_in(8).then(|| rng.range(0, len));
        Peer {
            out,
            fin_at_end: !rng.one_in(10),
            reset_at,
            expect,
            rcvbuf: if bulk {
                rng.pick(&[1000, 64 * 1024, 1 << 20])
            } else {
                rng.pick(&[1, 10, 1000, 64 * 1024]).max(floor)
            },
            reading: true,
            stalls_left: rng.range(0, 3) as u32,
            spurious: rng.range(0, 3) as u32,
            max_recv: if bulk { 64 * 1024 } else { size(rng) },
            max_write: if bulk { 64 * 1024 } else { size(rng) },
            live: true,
            ..Peer::default()
        }
    }

    /// It will write nothing more and takes what is sent to it (or is gone).
    fn done(&self) -> bool {
        !self.live || self.reset || (self.fin_written && self.reading)
    }

    fn can_recv(&self) -> bool {
        self.live
            && (self.reset || self.taken < self.written || self.fin_written || self.spurious > 0)
    }

    fn recv(&mut self, rng: &mut Rng) -> Got {
        if self.spurious > 0 && (rng.one_in(3) || !self.can_recv_real()) {
            self.spurious -= 1;
            return Got::Nothing;
        }
        if self.reset {
            return Got::Error(libc::ECONNRESET);
        }
        if self.taken < self.written {
            let n = rng.range(1, (self.written - self.taken).min(self.max_recv));
            let d = self.out[self.taken..self.taken + n].to_vec();
            self.taken += n;
            return Got::Bytes(d);
        }
        assert!(self.fin_written);
        Got::Eof
    }

    fn can_recv_real(&self) -> bool {
        self.reset || self.taken < self.written || self.fin_written
    }

    fn can_send(&self) -> bool {
        self.live && (self.reset || self.buffered < self.rcvbuf)
    }

    fn send(&mut self, who: Side, data: &[u8], rng: &mut Rng) -> Put {
        assert!(!self.got_fin, "{who:?}: bytes after FIN");
        assert!(!self.got_rst, "{who:?}: bytes after the reset");
        if self.reset {
            return Put::Failed(rng.pick(&[libc::EPIPE, libc::ECONNRESET]));
        }
        let n = rng.range(1, data.len().min(self.rcvbuf - self.buffered));
        let want = self.expect.get(self.got..self.got + n);
        assert!(
            want == Some(&data[..n]),
            "{who:?}: wrong bytes at {} (got {:?}..., expected {:?}...)",
            self.got,
            &data[..n.min(24)],
            self.expect
                .get(self.got..(self.got + 24).min(self.expect.len()))
        );
        self.got += n;
        self.buffered += n;
        Put::Took(n)
    }

    fn may_write(&self) -> bool {
        !self.after_fin || self.got_fin
    }

    fn moves(&self) -> usize {
        if !self.live || self.reset {
            return 0;
        }
        let w = self.may_write();
        let end = w && (!self.fin_after_fin || self.got_fin);
        usize::from(w && self.written < self.out.len())
            + usize::from(end && self.written == self.out.len() && !self.fin_written)
            + usize::from(self.reading && self.buffered > 0)
            + usize::from(self.reading && self.stalls_left > 0)
            + usize::from(!self.reading)
    }

    fn step(&mut self, rng: &mut Rng) {
        let mut k = rng.below(self.moves());
        let mut next = |on: bool| {
            if !on {
                return false;
            }
            let hit = k == 0;
            k = k.wrapping_sub(1);
            hit
        };
        let w = self.may_write();
        let end = w && (!self.fin_after_fin || self.got_fin);
        if next(w && self.written < self.out.len()) {
            let left = self.out.len() - self.written;
            self.written += rng.range(1, left.min(self.max_write));
            if let Some(r) = self.reset_at.filter(|&r| self.written >= r) {
                self.written = r;
                self.reset = true;
            }
        } else if next(end && self.written == self.out.len() && !self.fin_written) {
            if self.fin_at_end && self.reset_at.is_none() {
                self.fin_written = true;
            } else {
                self.reset = true;
            }
        } else if next(self.reading && self.buffered > 0) {
            self.buffered -= rng.range(1, self.buffered);
        } else if next(self.reading && self.stalls_left > 0) {
            self.reading = false;
            self.stalls_left -= 1;
        } else if next(!self.reading) {
            self.reading = true;
        }
        if self.reset {
            // Its buffer is gone with it.
            self.buffered = 0;
            self.reading = true;
        }
    }

    fn closed(&mut self, aborted: bool) {
        if self.live {
            if aborted {
                self.got_rst = true;
            } else {
                self.got_fin = true;
            }
        }
    }
}

/// The client, and for proxy the upstream.
#[derive(Debug)]
struct Peers {
    p: [Peer; 2],
    /// Upstream connect: `None` never answers, else its outcome.
    connect: Option<Result<(), i32>>,
    connecting: bool,
}

impl Net for Peers {
    fn can_recv(&self, side: Side) -> bool {
        self.p[side.index()].can_recv()
    }
    fn recv(&mut self, side: Side, rng: &mut Rng) -> Got {
        self.p[side.index()].recv(rng)
    }
    fn can_send(&self, side: Side) -> bool {
        self.p[side.index()].can_send()
    }
    fn send_bytes(&mut self, side: Side, data: &[u8], rng: &mut Rng) -> Put {
        self.p[side.index()].send(side, data, rng)
    }
    fn send_msg(&mut self, _side: Side, _m: &OutMessage, _rng: &mut Rng) -> Put {
        unreachable!("no messages on a byte stream")
    }
    fn shutdown(&mut self, side: Side) {
        let p = &mut self.p[side.index()];
        assert!(
            p.got == p.expect.len() || p.got_rst,
            "{side:?}: FIN after {} of {} bytes",
            p.got,
            p.expect.len()
        );
        p.got_fin = true;
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
        self.p[0].moves() + self.p[1].moves()
    }
    fn peer_step(&mut self, rng: &mut Rng) {
        let a = self.p[0].moves();
        if rng.below(a + self.p[1].moves()) < a {
            self.p[0].step(rng);
        } else {
            self.p[1].step(rng);
        }
    }
    fn closed(&mut self, aborted: bool) {
        self.connecting = false;
        self.p[0].closed(aborted);
        self.p[1].closed(aborted);
    }
    fn quiet(&self) -> bool {
        self.p[0].done() && self.p[1].done() && !self.connecting
    }
}

/// Bytes the client sends: mostly small, sometimes bulk (over the window).
fn data_len(rng: &mut Rng, bulk: bool) -> usize {
    if bulk {
        rng.range(SEND_WINDOW, SEND_WINDOW * 3)
    } else {
        match rng.below(10) {
            0 => 0,
            1..=6 => rng.range(1, 300),
            _ => rng.range(300, 20_000),
        }
    }
}

fn no_upstream() -> Peer {
    Peer::default()
}

fn sim(
    trace: bool,
    action: &Action,
    info: &ConnInfo,
    client: Peer,
    upstream: Peer,
    connect: Option<Result<(), i32>>,
    rng: Rng,
) -> Sim<Peers> {
    let net = Peers {
        p: [client, upstream],
        connect,
        connecting: false,
    };
    Sim::open(
        Session::new(action),
        action,
        info,
        net,
        rng,
        false,
        false,
        trace,
    )
}

const NO_INFO: ConnInfo = ConnInfo {
    peer: None,
    local: None,
};

fn echo_one(seed: u64, trace: bool) -> usize {
    let mut rng = Rng::new(seed);
    let bulk = rng.one_in(30);
    let out = Rng::pattern(seed, data_len(&mut rng, bulk));
    let client = Peer::new(&mut rng, out.clone(), out, bulk);
    let max_recv = client.max_recv;
    let mut s = sim(
        trace,
        &Action::Echo,
        &NO_INFO,
        client,
        no_upstream(),
        None,
        rng,
    );
    s.max_unsent[0] = SEND_WINDOW + max_recv;
    s.run(400_000, 20_000);
    let c = &s.net.p[0];
    let aborted = s.closed == Some(true);
    if !aborted && s.eofs[0] > 0 {
        assert_eq!(c.got, c.expect.len(), "echo ended cleanly but short");
        hit("clean end: everything delivered, checked");
    }
    assert_eq!(aborted, s.errors[0] > 0, "echo aborts exactly on an error");
    s.steps
}

fn respond_one(seed: u64, trace: bool) -> usize {
    let mut rng = Rng::new(seed);
    let reply = Rng::pattern(seed ^ 0xAB, rng.range(0, 3000));
    let action = Action::Respond(reply.clone());
    let len = if rng.one_in(10) {
        rng.range(60_000, 100_000)
    } else {
        data_len(&mut rng, false)
    };
    let out = Rng::pattern(seed, len);
    let mut client = Peer::new(&mut rng, out, reply.clone(), false);
    client.fin_after_fin = rng.one_in(3);
    let mut s = sim(trace, &action, &NO_INFO, client, no_upstream(), None, rng);
    s.max_unsent[0] = reply.len();
    s.run(400_000, 20_000);
    let c = &s.net.p[0];
    if s.closed == Some(false) {
        assert_eq!(c.got, reply.len(), "respond ended cleanly but short");
        hit("clean end: everything delivered, checked");
    } else {
        // Or at the lingering close's deadline, when the client took nothing
        // of the answer for LINGER_MS (the clock jumps there).
        assert!(
            s.errors[0] > 0 || (s.counts.timeouts > 0 && c.got < reply.len()),
            "respond aborts only on an error or a stalled reader"
        );
    }
    s.steps
}

/// A client's HTTP/1.x byte stream, and the responses it must get.
pub(crate) fn http_script(rng: &mut Rng, seed: u64) -> (Vec<u8>, Vec<u8>) {
    let mut out = Vec::new();
    let mut expect = Vec::new();
    let mut answering = true;
    let n = rng.range(0, 12);
    let answer = |expect: &mut Vec<u8>, r: &[u8], answering: &mut bool, last: bool| {
        if *answering {
            expect.extend_from_slice(r);
            *answering = !last;
        }
    };
    for i in 0..n {
        match rng.below(100) {
            0 => {
                out.extend_from_slice(b"\x00\x01 nonsense\r\n\r\n");
                answer(&mut expect, RESP_400, &mut answering, true);
                continue;
            }
            1 => {
                // A chunked body (with a request inside it) is read and
                // skipped; the answer comes at its end.
                out.extend_from_slice(
                    b"POST /u HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
                      5;x=y\r\nhello\r\n17\r\nGET /inner HTTP/1.1\r\n\r\n\r\n0\r\nT: v\r\n\r\n",
                );
                answer(&mut expect, RESP_KEEPALIVE, &mut answering, false);
                continue;
            }
            2 if rng.one_in(2) => {
                // Two different lengths: refused, whatever follows.
                out.extend_from_slice(
                    b"POST /s HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 0\r\n\r\nhello",
                );
                answer(&mut expect, RESP_400, &mut answering, true);
                continue;
            }
            2 if rng.one_in(4) => {
                // A head that never ends and outgrows the limit.
                out.extend_from_slice(b"GET /");
                out.extend(std::iter::repeat_n(
                    b'a',
                    MAX_HEAD_BYTES + rng.range(1, 5000),
                ));
                answer(&mut expect, RESP_431, &mut answering, true);
                return (out, expect);
            }
            _ => {}
        }
        let http10 = rng.one_in(4);
        let conn = rng.pick(&[
            "",
            "",
            "Connection: close\r\n",
            "Connection: keep-alive\r\n",
            "Connection: Keep-Alive, Upgrade\r\n",
            "Connection: foo, close\r\n",
        ]);
        let body = if rng.one_in(4) {
            let mut b = Rng::pattern(seed ^ i as u64, rng.range(0, 60));
            if rng.one_in(2) {
                // A body that looks like a request must be skipped, not parsed.
                b.extend_from_slice(b"GET /inner HTTP/1.1\r\n\r\n");
            }
            Some(b)
        } else {
            None
        };
        let method = if body.is_some() { "POST" } else { "GET" };
        let version = if http10 { "1.0" } else { "1.1" };
        out.extend_from_slice(
            format!("{method} /r{i} HTTP/{version}\r\nHost: example\r\n{conn}").as_bytes(),
        );
        if let Some(b) = &body {
            out.extend_from_slice(format!("Content-Length: {}\r\n", b.len()).as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        if let Some(b) = &body {
            out.extend_from_slice(b);
        }
        let lower = conn.to_ascii_lowercase();
        let keep = if lower.contains("close") {
            false
        } else {
            !http10 || lower.contains("keep-alive")
        };
        let r = match (keep, http10) {
            (true, false) => RESP_KEEPALIVE,
            (true, true) => RESP_KEEPALIVE_10,
            (false, _) => RESP_CLOSE,
        };
        answer(&mut expect, r, &mut answering, !keep);
    }
    if rng.one_in(5) {
        // A head cut short by the end of the stream: no answer.
        out.extend_from_slice(b"GET /cut HTTP/1.1\r\nHost: exa");
    }
    (out, expect)
}

fn http_one(seed: u64, trace: bool) -> usize {
    let mut rng = Rng::new(seed);
    let (out, expect) = http_script(&mut rng, seed);
    let client = Peer::new(&mut rng, out, expect, false);
    let max_recv = client.max_recv;
    let mut s = sim(
        trace,
        // The clock jumps by whole timeouts: the head and keep-alive deadlines
        // would cut the scripts short (0: none).
        &Action::Http(crate::config::HttpConfig {
            header_timeout_ms: 0,
            keepalive_timeout_ms: 0,
        }),
        &NO_INFO,
        client,
        no_upstream(),
        None,
        rng,
    );
    // Each receive of requests (>= 18 bytes each) queues at most ~6x its size.
    s.max_unsent[0] = SEND_WINDOW + 8 * max_recv;
    s.run(400_000, 20_000);
    let c = &s.net.p[0];
    if s.closed == Some(false) {
        assert_eq!(
            c.got,
            c.expect.len(),
            "http ended cleanly without all answers"
        );
        hit("clean end: everything delivered, checked");
    } else {
        // Or at the lingering close's deadline, when the client took nothing
        // of the answers for LINGER_MS (the clock jumps there).
        assert!(
            s.errors[0] > 0 || (s.counts.timeouts > 0 && c.got < c.expect.len()),
            "http aborts only on an error or a stalled reader"
        );
    }
    s.steps
}

fn addr(rng: &mut Rng) -> Option<SocketAddr> {
    match rng.below(4) {
        0 => None,
        1 => Some(SocketAddr::from(([10, 0, 0, rng.below(255) as u8], 4000))),
        2 => Some(SocketAddr::from(([192, 168, 1, 1], 443))),
        _ => Some("[2001:db8::7]:8443".parse().expect("literal")),
    }
}

fn proxy_one(seed: u64, trace: bool) -> usize {
    let mut rng = Rng::new(seed);
    let bulk = rng.one_in(40);
    let pp = rng.pick(&[None, None, Some(ProxyProtocol::V1), Some(ProxyProtocol::V2)]);
    let cfg = Arc::new(ProxyConfig {
        connect_timeout_ms: rng.pick(&[10, 1000, 5000]),
        idle_timeout_ms: rng.pick(&[0, 0, 20, 1000]),
        buffer_bytes: if bulk {
            rng.pick(&[16 * 1024, 256 * 1024])
        } else {
            rng.pick(&[1, 100, 1000, 4096, 65_536])
        },
        proxy_protocol: pp,
        ..ProxyConfig::test()
    });
    let info = ConnInfo {
        peer: addr(&mut rng),
        local: addr(&mut rng),
    };
    let header = pp.map_or_else(Vec::new, |v| {
        proxy_header::encode(v, info.peer, info.local, Some("tenant"))
    });
    let a = Rng::pattern(seed, data_len(&mut rng, bulk));
    let b = Rng::pattern(seed ^ 0x5555, data_len(&mut rng, bulk));
    let mut client = Peer::new(&mut rng, a.clone(), b.clone(), bulk);
    let mut upstream = Peer::new(&mut rng, b, [header.clone(), a].concat(), bulk);
    upstream.live = false;
    // One may wait for the other's end, not both (that would wait forever).
    upstream.after_fin = rng.one_in(4);
    client.fin_after_fin = !upstream.after_fin && rng.one_in(4);
    let connect = match rng.below(20) {
        0 => None,
        1 | 2 => Some(Err(libc::ECONNREFUSED)),
        _ => Some(Ok(())),
    };
    let (rc, ru) = (client.max_recv, upstream.max_recv);
    let window = cfg.buffer_bytes;
    let action = Action::Proxy(cfg);
    let mut s = sim(trace, &action, &info, client, upstream, connect, rng);
    s.max_unsent = [window + ru, (window + rc).max(header.len())];
    s.run(400_000, 20_000);
    let aborted = s.closed == Some(true);
    let [c, u] = &s.net.p;
    if !aborted && s.eofs == [1, 1] {
        assert_eq!(c.got, c.expect.len(), "client short on a clean end");
        assert_eq!(u.got, u.expect.len(), "upstream short on a clean end");
        hit("clean end: everything delivered, checked");
    }
    if aborted {
        assert!(
            s.errors.iter().sum::<u32>() > 0 || s.counts.timeouts > 0,
            "proxy aborts only on an error or timeout"
        );
        assert!(
            c.got_rst && (u.got_rst || !u.live),
            "an abort resets both peers"
        );
    } else {
        assert!(s.errors == [0, 0], "an error that did not abort");
    }
    if connect != Some(Ok(())) {
        assert!(aborted, "no upstream, yet no abort");
    } else if s.counts.timeouts == 0 && !c.reset && !u.reset {
        assert!(!aborted, "peers that end with FIN got an abort");
    }
    s.steps
}

#[test]
fn echo() {
    run(module_path!(), "echo", 3000, echo_one);
}

#[test]
fn respond() {
    run(module_path!(), "respond", 1500, respond_one);
}

#[test]
fn http() {
    run(module_path!(), "http", 4000, http_one);
}

#[test]
fn proxy() {
    run(module_path!(), "proxy", 3000, proxy_one);
}
