//! The fake's peers: clients and upstreams with scripts, and what each session's
//! peers should receive.

use super::*;

/// What a peer does once it has written its script.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) enum End {
    /// FIN.
    #[default]
    Fin,
    /// A reset.
    Reset,
    /// Nothing: it stays open (until the worker closes it).
    Stay,
}

/// How the engine closed one socket.
#[derive(Debug, Clone, Copy)]
pub(super) struct Closed {
    /// SO_LINGER {on, 0}: the peer sees a reset.
    pub(super) aborted: bool,
    /// After the fake sent Shutdown (the session may have been cut short).
    pub(super) after_shutdown: bool,
}

/// One simulated peer: a client, or a proxy's upstream.
#[derive(Debug, Default)]
pub(super) struct Peer {
    /// The bytes it writes, in order (an echoing upstream appends what it gets).
    pub(super) out: Vec<u8>,
    /// Bytes of `out` written so far (the engine may receive them).
    pub(super) written: usize,
    /// Bytes of `out` the engine received.
    pub(super) taken: usize,
    /// Bytes of `taken` the engine ignored (a cancelled receive that finished first).
    pub(super) ignored: usize,
    pub(super) end: End,
    /// A reset once this much of `out` is written.
    pub(super) reset_at: Option<usize>,
    pub(super) fin_written: bool,
    pub(super) reset: bool,
    /// The engine received the end of stream.
    pub(super) eof_taken: bool,
    /// An upstream that sends back what it gets past the PROXY header.
    pub(super) echo: bool,
    /// Bytes it received from the engine.
    pub(super) got: usize,
    /// Bytes of `got` from sends the engine had cancelled (not counted by it).
    pub(super) got_ignored: usize,
    /// Its receive buffer: room and bytes waiting in it.
    pub(super) rcvbuf: usize,
    pub(super) buffered: usize,
    pub(super) reading: bool,
    pub(super) stalls_left: u32,
    /// Receives left that end with ENOBUFS, EAGAIN or ECANCELED.
    pub(super) spurious: u32,
    /// Sends left that end with EAGAIN (or ECANCELED) without sending.
    pub(super) eagain: u32,
    pub(super) max_recv: usize,
    pub(super) max_write: usize,
    /// Writes only after the engine's FIN.
    pub(super) after_fin: bool,
    /// Sends its own FIN only after the engine's.
    pub(super) fin_after_fin: bool,
    /// The connection exists (a client once accepted, an upstream once connected).
    pub(super) live: bool,
    /// The upstream's connect succeeded (sends and receives may start).
    pub(super) connected: bool,
    /// The engine's fd, and the fake's end of the connection.
    pub(super) fd: Option<RawFd>,
    pub(super) end_fd: Option<OwnedFd>,
    pub(super) tcp: bool,
    /// FIN from the engine seen at `end_fd`.
    pub(super) fin_seen: bool,
    pub(super) closed: Option<Closed>,
    /// Errors the engine got on this socket (not counting cancelled operations).
    pub(super) errors: u32,
    /// The next send must be this buffer (pointer, length) from this offset.
    pub(super) next_send: Option<(usize, usize, usize)>,
}

/// What a receive returns.
pub(super) enum RecvOut {
    Spurious(i32),
    /// A buffer and where in it the payload starts.
    Bytes(Vec<u8>, usize),
    Eof,
    Err(i32),
}

/// What a send does.
pub(super) enum SendOut {
    Took(usize),
    Again(i32),
    Failed(i32),
}

impl Peer {
    pub(super) fn new(rng: &mut Rng, out: Vec<u8>, expect_len: usize, bulk: bool) -> Peer {
        let sizes = [1usize, 7, 100, 1500, 16 * 1024];
        // Tiny pieces only for little data, so that a sequence stays short.
        let floor = (out.len().max(expect_len) / 20).max(1);
        let size = |rng: &mut Rng| rng.pick(&sizes).max(floor);
        let len = out.len();
        Peer {
            out,
            end: match rng.below(12) {
                0 => End::Reset,
                1 => End::Stay,
                _ => End::Fin,
            },
            reset_at: rng.one_in(12).then(|| rng.range(0, len)),
            rcvbuf: if bulk {
                rng.pick(&[64 * 1024, 1 << 20])
            } else {
                rng.pick(&[10, 1000, 64 * 1024]).max(floor)
            },
            reading: true,
            stalls_left: rng.range(0, 2) as u32,
            spurious: rng.range(0, 3) as u32,
            eagain: if rng.one_in(4) {
                rng.range(1, 3) as u32
            } else {
                0
            },
            max_recv: if bulk { 64 * 1024 } else { size(rng) },
            max_write: if bulk { 64 * 1024 } else { size(rng) },
            ..Peer::default()
        }
    }

    /// Bytes the engine took and acted on.
    pub(super) fn eff(&self) -> usize {
        self.taken - self.ignored
    }

    pub(super) fn may_write(&self) -> bool {
        !self.after_fin || self.fin_seen
    }

    pub(super) fn can_end(&self) -> bool {
        self.may_write()
            && (!self.fin_after_fin || self.fin_seen)
            && self.written == self.out.len()
            && !self.fin_written
            && !self.reset
            && self.end != End::Stay
    }

    /// It will write nothing more and takes what is sent to it (or is gone).
    pub(super) fn done(&self) -> bool {
        !self.live || self.reset || (self.fin_written && self.reading)
    }

    pub(super) fn moves(&self) -> usize {
        if !self.live || self.reset {
            return 0;
        }
        usize::from(self.may_write() && self.written < self.out.len())
            + usize::from(self.can_end())
            + usize::from(self.reading && self.buffered > 0)
            + usize::from(self.reading && self.stalls_left > 0)
            + usize::from(!self.reading)
    }

    pub(super) fn step(&mut self, rng: &mut Rng) {
        let mut k = rng.below(self.moves());
        let mut next = |on: bool| {
            if !on {
                return false;
            }
            let hit = k == 0;
            k = k.wrapping_sub(1);
            hit
        };
        if next(self.may_write() && self.written < self.out.len()) {
            let left = self.out.len() - self.written;
            self.written += rng.range(1, left.min(self.max_write));
            if let Some(r) = self.reset_at.filter(|&r| self.written >= r) {
                self.written = r.max(self.taken);
                self.reset = true;
            }
        } else if next(self.can_end()) {
            match self.end {
                End::Fin if self.reset_at.is_none() => self.fin_written = true,
                _ => self.reset = true,
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

    pub(super) fn can_recv(&self) -> bool {
        self.live
            && (self.reset || self.taken < self.written || self.fin_written || self.spurious > 0)
    }

    pub(super) fn recv(&mut self, rng: &mut Rng, buf_size: usize) -> RecvOut {
        let real = self.reset || self.taken < self.written || self.fin_written;
        if self.spurious > 0 && (rng.one_in(3) || !real) {
            self.spurious -= 1;
            return RecvOut::Spurious(rng.pick(&[libc::ENOBUFS, libc::EAGAIN, libc::ECANCELED]));
        }
        if self.reset {
            return RecvOut::Err(libc::ECONNRESET);
        }
        if self.taken < self.written {
            let n = rng.range(
                1,
                (self.written - self.taken).min(self.max_recv).min(buf_size),
            );
            let d = &self.out[self.taken..self.taken + n];
            // The payload sits at a random offset in its buffer.
            let off = rng.below(3);
            let mut buf = vec![0xEE; off];
            buf.extend_from_slice(d);
            self.taken += n;
            return RecvOut::Bytes(buf, off);
        }
        RecvOut::Eof
    }

    pub(super) fn can_send(&self) -> bool {
        self.live && (self.reset || self.buffered < self.rcvbuf || self.eagain > 0)
    }

    pub(super) fn send(&mut self, rng: &mut Rng, len: usize) -> SendOut {
        let full = !self.reset && self.buffered >= self.rcvbuf;
        if self.eagain > 0 && (rng.one_in(3) || full) {
            self.eagain -= 1;
            return SendOut::Again(if rng.one_in(4) {
                libc::ECANCELED
            } else {
                libc::EAGAIN
            });
        }
        if self.reset {
            return SendOut::Failed(rng.pick(&[libc::EPIPE, libc::ECONNRESET]));
        }
        SendOut::Took(rng.range(1, len.min(self.rcvbuf - self.buffered)))
    }
}

/// What a session's peers should receive.
#[derive(Debug)]
pub(super) enum Kind {
    /// The client gets back what the engine received from it.
    Echo,
    /// The client gets these bytes (respond, http); `true`: the engine half-closes
    /// after them (respond).
    Fixed(Vec<u8>, bool),
    /// Each side gets what the engine received from the other; the upstream
    /// gets the PROXY header first (made at accept, from the client's addresses).
    Proxy {
        pp: Option<ProxyProtocol>,
        header: Vec<u8>,
    },
}

/// One client connection, its session's peers and what the fake knows of it.
#[derive(Debug)]
pub(super) struct Sess {
    pub(super) kind: Kind,
    /// Client and upstream.
    pub(super) p: [Peer; 2],
    /// The session's key in the worker's tokens.
    pub(super) key: Option<u64>,
    /// Its fd went to the worker.
    pub(super) accepted: bool,
    /// The worker closed it without a session (its listener was being removed).
    pub(super) dropped: bool,
    /// How the upstream's connect ends (`None`: it never answers).
    pub(super) connect: Option<Result<(), i32>>,
    /// Since when both peers have stopped and no byte has moved (step), and
    /// the bytes moved until then.
    pub(super) quiet_since: Option<usize>,
    pub(super) moved: usize,
}

impl Sess {
    /// What side `side` should receive: a prefix, then bytes of a source (as far
    /// as the engine has received them).
    pub(super) fn stream(&self, side: usize) -> (&[u8], &[u8]) {
        match &self.kind {
            Kind::Echo => (&[], &self.p[0].out[..self.p[0].eff()]),
            Kind::Fixed(v, _) => (&[], v),
            Kind::Proxy { header, .. } => {
                let src = &self.p[1 - side];
                let pre: &[u8] = if side == 1 { header } else { &[] };
                (pre, &src.out[..src.eff()])
            }
        }
    }

    /// Bytes side `side` should have got by now, all told.
    pub(super) fn due(&self, side: usize) -> usize {
        let (pre, src) = self.stream(side);
        pre.len() + src.len()
    }

    /// `data` reaches side `side`: it must be the next bytes it should get.
    pub(super) fn deliver(&mut self, side: usize, data: &[u8]) {
        let got = self.p[side].got;
        let (pre, src) = self.stream(side);
        let due = pre.len() + src.len();
        assert!(
            got + data.len() <= due,
            "{}: {} bytes sent at offset {got}, but only {due} are due (not received yet, or made up)",
            name(side),
            data.len()
        );
        let mut at = got;
        let mut rest = data;
        if at < pre.len() {
            let n = rest.len().min(pre.len() - at);
            assert!(
                rest[..n] == pre[at..at + n],
                "{}: wrong header bytes at {at}",
                name(side)
            );
            at += n;
            rest = &rest[n..];
        }
        if !rest.is_empty() {
            let off = at - pre.len();
            assert!(
                rest == &src[off..off + rest.len()],
                "{}: wrong bytes at offset {at} (got {:?}..., expected {:?}...)",
                name(side),
                &rest[..rest.len().min(16)],
                &src[off..(off + 16).min(src.len())]
            );
        }
        let echo_from = pre.len().max(got);
        self.p[side].got += data.len();
        if side == 1 && self.p[1].echo && got + data.len() > echo_from {
            let skip = echo_from - got;
            self.p[1].out.extend_from_slice(&data[skip..]);
        }
    }

    /// Whether the worker has closed every socket of the session.
    pub(super) fn closed(&self) -> bool {
        self.p[0].closed.is_some() && (self.p[1].fd.is_none() || self.p[1].closed.is_some())
    }

    /// Whether a peer may keep the session open for good (until Shutdown).
    pub(super) fn may_live_on(&self) -> bool {
        self.p[0].end == End::Stay
            || (matches!(self.kind, Kind::Proxy { .. })
                && self.connect == Some(Ok(()))
                && self.p[1].end == End::Stay)
    }

    /// Both peers have stopped: the session must end.
    pub(super) fn quiet(&self) -> bool {
        self.p[0].done() && (!matches!(self.kind, Kind::Proxy { .. }) || self.p[1].done())
    }

    pub(super) fn errors(&self) -> u32 {
        self.p[0].errors + self.p[1].errors
    }

    /// The state of the session in a line (for failure reports).
    pub(super) fn summary(&self) -> String {
        let side = |i: usize| {
            let p = &self.p[i];
            format!(
                "{}: wrote {}/{} taken {} (ignored {}) fin {} reset {} eof taken {} | got {}/{} \
                 buffered {}/{} reading {} fin seen {} | live {} closed {:?} errors {}",
                name(i),
                p.written,
                p.out.len(),
                p.taken,
                p.ignored,
                p.fin_written,
                p.reset,
                p.eof_taken,
                p.got,
                self.due(i),
                p.buffered,
                p.rcvbuf,
                p.reading,
                p.fin_seen,
                p.live,
                p.closed,
                p.errors
            )
        };
        format!(
            "[{}; {}; connect {:?}, key {:?}]",
            side(0),
            side(1),
            self.connect,
            self.key
        )
    }
}

pub(super) fn name(side: usize) -> &'static str {
    if side == 0 {
        "client"
    } else {
        "upstream"
    }
}
