//! `action = "http"`: a fixed `200 OK` for every HTTP/1.x request.
//!
//! Request heads are parsed with httparse; several requests in one read
//! (pipelining) get one response each, in order. Keep-alive follows RFC 9112 §9.3:
//! HTTP/1.1 stays open unless `Connection: close`; HTTP/1.0 closes unless
//! `Connection: keep-alive`.
//!
//! Framing (RFC 9112 §6): a request body is read and discarded, its length taken
//! from `Content-Length` (repeated fields or a list must all give the same value,
//! RFC 9110 §8.6, else 400) or from `Transfer-Encoding: chunked` (decoded by
//! [`super::chunked`]; a malformed body gets 400). Any other transfer coding,
//! `Transfer-Encoding` together with `Content-Length`, or `Transfer-Encoding` in
//! an HTTP/1.0 request gets 400 (RFC 9112 §6.1, §6.3: the length cannot be
//! determined reliably, and a message with both may be an attempt at request
//! smuggling). `Expect: 100-continue` with a body is answered `100 Continue`
//! at once and the final answer follows the body (RFC 9110 §10.1.1). The 200 of
//! a request with a `Content-Length` body is sent when its head ends; that of a
//! chunked body or a 100-continue request when its body ends (so that a
//! malformed body gets its 400 alone).
//!
//! Limits: a head of at most [`MAX_HEAD_BYTES`] bytes and [`MAX_HEADERS`] field
//! lines, counted over the whole head whatever the read boundaries (431
//! otherwise); a chunked body's trailers have the same bounds.
//!
//! Deadlines ([`HttpConfig`]): a new connection must bring a whole request head
//! within `header_timeout_ms`, as must every later head from its first byte;
//! after a request (and once its answer is taken by the kernel) the connection
//! may stay idle for `keepalive_timeout_ms`; a body must not stall for
//! `header_timeout_ms` between reads. A head still incomplete at its deadline
//! gets `408 Request Timeout` (so does a chunked or 100-continue body not yet
//! answered); the other expiries close without an answer.
//!
//! Every error answer (400, 408, 431) says `Connection: close`; the connection
//! then ends with a lingering close ([`SessionIo::linger`]: FIN after the
//! answers, input discarded until the client's FIN, bounded), as do
//! `Connection: close` requests and graceful shutdown, so what was written is
//! delivered and not lost to a reset.
//!
//! Graceful shutdown ([`HttpSession::on_drain`]): a connection idle between
//! requests closes at once; one with a request in progress answers it with
//! `Connection: close`, then closes.

use std::time::{Duration, Instant};

use super::chunked::ChunkedDecoder;
use super::SessionIo;
use crate::config::HttpConfig;

/// Most header fields in a request head (count); more gives 431. Also the most
/// trailer fields of a chunked body (more gives 400).
pub const MAX_HEADERS: usize = 64;
/// Largest request head, request-line to the empty line included (bytes);
/// larger gives 431. Also the largest trailer section of a chunked body (larger
/// gives 400).
pub const MAX_HEAD_BYTES: usize = 16 * 1024;

pub(super) const RESP_KEEPALIVE: &[u8] =
    b"HTTP/1.1 200 OK\r\nServer: ringress\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\r\nok\n";
pub(super) const RESP_KEEPALIVE_10: &[u8] = b"HTTP/1.1 200 OK\r\nServer: ringress\r\nContent-Type: text/plain\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\nok\n";
pub(super) const RESP_CLOSE: &[u8] = b"HTTP/1.1 200 OK\r\nServer: ringress\r\nContent-Type: text/plain\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n";
pub(super) const RESP_100: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";
pub(super) const RESP_400: &[u8] =
    b"HTTP/1.1 400 Bad Request\r\nServer: ringress\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
pub(super) const RESP_408: &[u8] =
    b"HTTP/1.1 408 Request Timeout\r\nServer: ringress\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
pub(super) const RESP_431: &[u8] = b"HTTP/1.1 431 Request Header Fields Too Large\r\nServer: ringress\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";

/// The body of the request being read.
#[derive(Debug, Default)]
enum Body {
    /// No body in progress.
    #[default]
    None,
    /// This many `Content-Length` bytes are still to be skipped (> 0).
    Length(u64),
    /// A chunked body.
    Chunked(Box<ChunkedDecoder>),
}

/// Parser state of one HTTP connection.
#[derive(Debug, Default)]
pub struct HttpSession {
    /// The listener's deadlines.
    cfg: HttpConfig,
    /// Bytes of an incomplete request head carried over to the next read.
    partial: Vec<u8>,
    /// The body in progress.
    body: Body,
    /// The final answer of the request whose body is being read, sent when it
    /// ends (chunked bodies, `Expect: 100-continue`).
    deferred: Option<&'static [u8]>,
    /// The process is shutting down: the next response says `Connection: close`.
    draining: bool,
    /// When the head in progress started (its first byte, or the connection's
    /// opening for the first head).
    head_since: Option<Instant>,
}

/// What a complete head says about the body that follows.
#[derive(Debug, PartialEq, Eq)]
enum BodyKind {
    /// `Content-Length` (0 when absent).
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

#[derive(Debug, PartialEq, Eq)]
enum Parsed {
    /// A whole head of this many bytes.
    Request {
        head: usize,
        body: BodyKind,
        keep_alive: bool,
        http10: bool,
        /// `Expect: 100-continue` in an HTTP/1.1 request.
        expect_continue: bool,
    },
    Partial,
    Reject(&'static [u8]),
}

/// Parses the head at the start of `buf` and checks its framing.
fn parse_one(buf: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head = match req.parse(buf) {
        Ok(httparse::Status::Partial) => {
            // Everything in `buf` belongs to the head so far.
            return if buf.len() > MAX_HEAD_BYTES {
                Parsed::Reject(RESP_431)
            } else {
                Parsed::Partial
            };
        }
        Err(httparse::Error::TooManyHeaders) => return Parsed::Reject(RESP_431),
        Err(_) => return Parsed::Reject(RESP_400),
        Ok(httparse::Status::Complete(head)) => head,
    };
    if head > MAX_HEAD_BYTES {
        return Parsed::Reject(RESP_431);
    }
    let http10 = req.version == Some(0);
    let mut keep_alive = !http10;
    let mut length: Option<u64> = None;
    let mut te = false;
    let mut chunked = 0usize;
    let mut other_coding = false;
    let mut expect_continue = false;
    for h in req.headers.iter() {
        let v = h.value;
        if h.name.eq_ignore_ascii_case("connection") {
            if has_token(v, b"close") {
                keep_alive = false;
            } else if has_token(v, b"keep-alive") {
                keep_alive = true;
            }
        } else if h.name.eq_ignore_ascii_case("content-length") {
            // RFC 9110 §8.6: 1*DIGIT; a list of identical values may stand for
            // one; anything else makes the framing invalid (RFC 9112 §6.3).
            for item in v.split(|&b| b == b',') {
                let item = item.trim_ascii();
                let n = match parse_digits(item) {
                    Some(n) => n,
                    None => return Parsed::Reject(RESP_400),
                };
                match length {
                    Some(m) if m != n => return Parsed::Reject(RESP_400),
                    _ => length = Some(n),
                }
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            te = true;
            for item in v.split(|&b| b == b',') {
                let item = item.trim_ascii();
                if item.eq_ignore_ascii_case(b"chunked") {
                    chunked += 1;
                } else {
                    other_coding = true;
                }
            }
        } else if h.name.eq_ignore_ascii_case("expect") {
            expect_continue |= has_token(v, b"100-continue");
        }
    }
    let body = if te {
        // Only exactly `chunked`, once (RFC 9112 §7: never applied twice), in
        // HTTP/1.1 (§6.1), without Content-Length (§6.3).
        if other_coding || chunked != 1 || http10 || length.is_some() {
            return Parsed::Reject(RESP_400);
        }
        BodyKind::Chunked
    } else {
        BodyKind::Length(length.unwrap_or(0))
    };
    Parsed::Request {
        head,
        body,
        keep_alive,
        http10,
        // RFC 9110 §10.1.1: ignored in an HTTP/1.0 request.
        expect_continue: expect_continue && !http10,
    }
}

/// A non-empty run of ASCII digits as a u64; `None` for anything else or an
/// overflow.
fn parse_digits(s: &[u8]) -> Option<u64> {
    if s.is_empty() || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    s.iter().try_fold(0u64, |n, &d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

fn has_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

impl HttpSession {
    /// A session for a connection of a listener with these settings.
    pub fn new(cfg: HttpConfig) -> HttpSession {
        HttpSession {
            cfg,
            ..HttpSession::default()
        }
    }

    /// The connection was accepted at `now`: read, and expect a whole head
    /// within `header_timeout_ms`.
    pub fn on_open(&mut self, io: &mut SessionIo, now: Instant) {
        io.client().recv();
        self.head_since = Some(now);
        self.arm(io, now);
    }

    /// Consumes `data` received at `now`, queueing one response per complete
    /// request into `io`. A lingering close ([`SessionIo::linger`]) follows
    /// `Connection: close`, HTTP/1.0 without keep-alive, and every error answer.
    /// While draining, the first complete request gets `Connection: close` and a
    /// lingering close.
    pub fn on_input(&mut self, mut data: &[u8], io: &mut SessionIo, now: Instant) {
        if io.lingering() || io.closing() {
            return;
        }
        if !matches!(self.body, Body::None) {
            let used = match self.skip_body(data) {
                Ok(n) => n,
                Err(()) => return self.reject(RESP_400, io, now),
            };
            data = &data[used..];
            if !matches!(self.body, Body::None) {
                self.arm(io, now);
                return;
            }
            if self.body_ended(io, now) {
                return;
            }
        }
        if !data.is_empty() {
            if self.partial.is_empty() {
                let used = self.parse_all(data, io, now);
                if used < data.len() && !io.closing() && !io.lingering() {
                    self.partial.extend_from_slice(&data[used..]);
                }
            } else {
                let mut buf = std::mem::take(&mut self.partial);
                // A head can only end at an LF: until one arrives there is
                // nothing new to parse (no quadratic re-parsing of a head that
                // trickles in byte by byte), only the size to check.
                let ends_line = data.contains(&b'\n');
                buf.extend_from_slice(data);
                if !ends_line {
                    if buf.len() > MAX_HEAD_BYTES {
                        return self.reject(RESP_431, io, now);
                    }
                    self.partial = buf;
                } else {
                    let used = self.parse_all(&buf, io, now);
                    if used < buf.len() && !io.closing() && !io.lingering() {
                        buf.drain(..used);
                        self.partial = buf;
                    }
                }
            }
            if !self.partial.is_empty() {
                self.head_since.get_or_insert(now);
            }
        }
        if !io.closing() && !io.lingering() {
            self.arm(io, now);
        }
    }

    /// Bytes of the answers were taken by the kernel at `now`: an idle
    /// connection's keep-alive deadline counts from the last of them.
    pub fn on_sent(&mut self, io: &mut SessionIo, now: Instant) {
        if self.idle() && !io.closing() && !io.lingering() {
            self.arm(io, now);
        }
    }

    /// The session's deadline (see the module notes) passed, at `now`: a head (or a
    /// body whose answer is still owed) in progress gets 408; in every case the
    /// connection ends with a lingering close.
    pub fn on_timeout(&mut self, io: &mut SessionIo, now: Instant) {
        if io.lingering() || io.closing() {
            return;
        }
        if !self.partial.is_empty() || self.deferred.is_some() {
            io.client().send(RESP_408);
            io.timed_out = Some(super::TimeoutKind::Header);
        } else {
            io.timed_out = Some(super::TimeoutKind::KeepAlive);
        }
        self.end(io, now);
    }

    /// Graceful shutdown, at `now`: a connection idle between requests (no
    /// partial request head, no body being read) starts a lingering close at once
    /// (FIN after the responses already queued); otherwise the request in
    /// progress is answered with `Connection: close` and the connection closes
    /// after that response. Called once; later calls change nothing.
    pub fn on_drain(&mut self, io: &mut SessionIo, now: Instant) {
        if self.draining || io.closing() || io.lingering() {
            return;
        }
        self.draining = true;
        if self.idle() {
            self.end(io, now);
        }
    }

    /// No request in progress: no partial head, no body left to read.
    fn idle(&self) -> bool {
        self.partial.is_empty() && matches!(self.body, Body::None)
    }

    /// Sets the deadline for the current state at `now` (see the module notes).
    fn arm(&self, io: &mut SessionIo, now: Instant) {
        let (from, ms) = if !self.partial.is_empty() || (self.head_since.is_some() && self.idle()) {
            (self.head_since.unwrap_or(now), self.cfg.header_timeout_ms)
        } else if !matches!(self.body, Body::None) {
            (now, self.cfg.header_timeout_ms)
        } else {
            (now, self.cfg.keepalive_timeout_ms)
        };
        io.set_deadline((ms > 0).then(|| from + Duration::from_millis(ms)));
    }

    /// Ends the connection at `now` with a lingering close (after what is queued).
    fn end(&mut self, io: &mut SessionIo, now: Instant) {
        self.partial = Vec::new();
        self.body = Body::None;
        self.deferred = None;
        io.linger(now);
    }

    /// Answers `resp` (an error with `Connection: close`) and ends.
    fn reject(&mut self, resp: &'static [u8], io: &mut SessionIo, now: Instant) {
        io.client().send(resp);
        self.end(io, now);
    }

    /// Skips body bytes at the start of `data`; returns how many it took.
    /// `Err` for a malformed chunked body.
    fn skip_body(&mut self, data: &[u8]) -> Result<usize, ()> {
        match &mut self.body {
            Body::None => Ok(0),
            Body::Length(left) => {
                let n = (*left).min(data.len() as u64);
                *left -= n;
                if *left == 0 {
                    self.body = Body::None;
                }
                Ok(n as usize)
            }
            Body::Chunked(d) => {
                let n = d.feed(data).map_err(|_| ())?;
                if d.done() {
                    self.body = Body::None;
                }
                Ok(n)
            }
        }
    }

    /// The body of the current request has ended at `now`: its deferred answer
    /// goes out; while draining, the connection ends. Returns whether it ended.
    fn body_ended(&mut self, io: &mut SessionIo, now: Instant) -> bool {
        match self.deferred.take() {
            Some(_) if self.draining => {
                io.client().send(RESP_CLOSE);
                self.end(io, now);
                true
            }
            Some(answer) => {
                io.client().send(answer);
                false
            }
            None if self.draining => {
                // A request answered before the drain has ended: the
                // connection is idle, whatever follows.
                self.end(io, now);
                true
            }
            None => false,
        }
    }

    /// Parses as many whole requests as `buf` holds; returns the bytes consumed.
    fn parse_all(&mut self, buf: &[u8], io: &mut SessionIo, now: Instant) -> usize {
        let mut pos = 0;
        while pos < buf.len() && !io.closing() && !io.lingering() {
            match parse_one(&buf[pos..]) {
                Parsed::Partial => break,
                Parsed::Reject(resp) => {
                    self.reject(resp, io, now);
                    return buf.len();
                }
                Parsed::Request {
                    head,
                    body,
                    keep_alive,
                    http10,
                    expect_continue,
                } => {
                    pos += head;
                    self.head_since = None;
                    if self.draining || !keep_alive {
                        // The last response: what follows is not read.
                        io.client().send(RESP_CLOSE);
                        self.end(io, now);
                        return buf.len();
                    }
                    let answer = if http10 {
                        RESP_KEEPALIVE_10
                    } else {
                        RESP_KEEPALIVE
                    };
                    self.body = match body {
                        BodyKind::Length(0) => Body::None,
                        BodyKind::Length(n) => Body::Length(n),
                        BodyKind::Chunked => Body::Chunked(Box::default()),
                    };
                    let has_body = !matches!(self.body, Body::None);
                    if expect_continue && has_body {
                        io.client().send(RESP_100);
                    }
                    if matches!(self.body, Body::Chunked(_)) || (expect_continue && has_body) {
                        self.deferred = Some(answer);
                    } else {
                        io.client().send(answer);
                    }
                    if has_body {
                        match self.skip_body(&buf[pos..]) {
                            Ok(n) => pos += n,
                            Err(()) => {
                                self.reject(RESP_400, io, now);
                                return buf.len();
                            }
                        }
                        if !matches!(self.body, Body::None) {
                            return buf.len();
                        }
                        if self.body_ended(io, now) {
                            return buf.len();
                        }
                    }
                }
            }
        }
        pos
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(s: &mut HttpSession, chunks: &[&[u8]]) -> (Vec<u8>, bool) {
        let mut io = SessionIo::default();
        for c in chunks {
            s.on_input(c, &mut io, Instant::now());
        }
        // Ending: a lingering close (FIN after the answers), or a plain close.
        let close = io.close || io.lingering();
        (std::mem::take(&mut io.client().out), close)
    }

    fn count(out: &[u8]) -> usize {
        out.windows(15).filter(|w| w == b"HTTP/1.1 200 OK").count()
    }

    #[test]
    fn pipelined_requests_each_answered() {
        let mut s = HttpSession::default();
        let req = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        let three = [&req[..], &req[..], &req[..]].concat();
        let (out, close) = feed(&mut s, &[&three]);
        assert_eq!(count(&out), 3);
        assert!(!close);
    }

    #[test]
    fn request_split_across_reads() {
        let mut s = HttpSession::default();
        let (out, close) = feed(&mut s, &[b"GET / HT", b"TP/1.1\r\nHost:", b" x\r\n\r\n"]);
        assert_eq!(count(&out), 1);
        assert!(!close);
    }

    #[test]
    fn connection_close_and_http10() {
        let mut s = HttpSession::default();
        let (out, close) = feed(&mut s, &[b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n"]);
        assert_eq!(count(&out), 1);
        assert!(close);
        let mut s = HttpSession::default();
        let (_, close) = feed(&mut s, &[b"GET / HTTP/1.0\r\n\r\n"]);
        assert!(close);
    }

    #[test]
    fn body_is_skipped() {
        let mut s = HttpSession::default();
        let (out, _) = feed(
            &mut s,
            &[
                b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nab",
                b"cdeGET / HTTP/1.1\r\n\r\n",
            ],
        );
        assert_eq!(count(&out), 2);
    }

    #[test]
    fn garbage_gets_400_and_close() {
        let mut s = HttpSession::default();
        let (out, close) = feed(&mut s, &[b"\x00\x01 nonsense\r\n\r\n"]);
        assert!(out.starts_with(b"HTTP/1.1 400"));
        assert!(close);
    }

    #[test]
    fn oversized_head_gets_431() {
        let mut s = HttpSession::default();
        let big = vec![b'a'; MAX_HEAD_BYTES + 10];
        let (out, close) = feed(&mut s, &[b"GET /", &big]);
        assert!(out.starts_with(b"HTTP/1.1 431"));
        assert!(close);
    }

    /// A small xorshift generator for the randomized drain test.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % n as u64) as usize
        }
    }

    /// Feeds `data` to `s` in random pieces.
    fn feed_pieces(s: &mut HttpSession, data: &[u8], io: &mut SessionIo, rng: &mut Rng) {
        let mut pos = 0;
        while pos < data.len() {
            let n = 1 + rng.below(data.len() - pos);
            s.on_input(&data[pos..pos + n], io, Instant::now());
            pos += n;
        }
    }

    /// Randomized: a stream of keep-alive requests (some with bodies) is cut at a
    /// random byte, the first part fed in random pieces, then the drain, then the
    /// rest. Cut between requests (idle): no further response, FIN asked for.
    /// Cut inside a head: exactly one more response, with `Connection: close`, then
    /// FIN. Cut inside a body (its head already answered): no further response,
    /// FIN. Never an abort; the close waits for the client's FIN (lingering).
    #[test]
    fn drain_closes_idle_and_answers_a_request_in_progress_with_close() {
        for seed in 1..=2000u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
            // (start, head end, body end) of each request.
            let mut stream = Vec::new();
            let mut spans = Vec::new();
            for _ in 0..1 + rng.below(4) {
                let start = stream.len();
                let body = if rng.below(3) == 0 { rng.below(40) } else { 0 };
                let head = if body > 0 {
                    format!("POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: {body}\r\n\r\n")
                } else {
                    "GET / HTTP/1.1\r\nHost: h\r\n\r\n".to_string()
                };
                stream.extend_from_slice(head.as_bytes());
                let head_end = stream.len();
                stream.extend(std::iter::repeat_n(b'b', body));
                spans.push((start, head_end, stream.len()));
            }
            let cut = rng.below(stream.len() + 1);
            let mut s = HttpSession::default();
            let mut io = SessionIo::default();
            feed_pieces(&mut s, &stream[..cut], &mut io, &mut rng);
            let before = std::mem::take(&mut io.client().out);
            s.on_drain(&mut io, Instant::now());
            feed_pieces(&mut s, &stream[cut..], &mut io, &mut rng);
            let after = std::mem::take(&mut io.client().out);
            let ctx = format!(
                "seed {seed}, cut {cut} of {}, spans {spans:?}",
                stream.len()
            );
            // Heads complete before the cut were answered, as keep-alive.
            let answered = spans.iter().filter(|&&(_, h, _)| h <= cut).count();
            assert_eq!(count(&before), answered, "{ctx}");
            assert_eq!(before, RESP_KEEPALIVE.repeat(answered), "{ctx}");
            let in_head = spans.iter().any(|&(st, h, _)| st < cut && cut < h);
            if in_head {
                assert_eq!(after, RESP_CLOSE, "{ctx}");
            } else {
                assert!(
                    after.is_empty(),
                    "{ctx}: {}",
                    String::from_utf8_lossy(&after)
                );
            }
            assert!(io.lingering(), "{ctx}: not closing");
            assert!(io.client().shutdown_write && io.client().want_recv, "{ctx}");
            assert!(!io.abort && !io.close && io.deadline.is_some(), "{ctx}");
            // Later input is read and discarded.
            s.on_input(b"GET / HTTP/1.1\r\n\r\n", &mut io, Instant::now());
            assert!(io.client().out.is_empty(), "{ctx}");
        }
    }

    #[test]
    fn a_lingering_close_ends_cleanly_at_eof_or_its_deadline() {
        use crate::config::Action;
        use crate::proto::{Completion, Session, Side};
        for end in [Completion::Eof, Completion::Timeout] {
            let mut s = Session::new(&Action::Http(Default::default()));
            let mut io = SessionIo::default();
            let now = Instant::now();
            s.on_complete(
                Side::Client,
                Completion::Recv(b"GET / HTTP/1.1\r\n\r\n"),
                &mut io,
                now,
            );
            s.on_drain(&mut io, now);
            assert_eq!(
                io.deadline,
                Some(now + Duration::from_millis(crate::proto::LINGER_MS))
            );
            // The driver hands the answer to the kernel, which takes it.
            let n = std::mem::take(&mut io.client().out).len();
            s.on_complete(Side::Client, Completion::Sent(n), &mut io, now);
            s.on_complete(Side::Client, end, &mut io, now);
            assert!(io.close && !io.abort, "a lingering close must not reset");
        }
        // Without a drain, the deadline of a connection that sent nothing
        // (header_timeout_ms) ends it cleanly too, without an answer.
        let a = Action::Http(Default::default());
        let mut s = Session::new(&a);
        let mut io = SessionIo::default();
        let info = crate::proto::ConnInfo {
            peer: None,
            local: None,
        };
        s.on_open(&a, &info, "root", &mut io, Instant::now());
        s.on_complete(Side::Client, Completion::Timeout, &mut io, Instant::now());
        assert!(io.lingering() && !io.abort && io.client().out.is_empty());
    }
}

#[cfg(test)]
mod framing_tests {
    use super::*;
    use crate::proto::chunked::tests::Rng;

    /// Feeds `chunks` to a fresh session; returns (output, ended).
    fn run(chunks: &[&[u8]]) -> (Vec<u8>, bool) {
        let mut s = HttpSession::default();
        let mut io = SessionIo::default();
        for c in chunks {
            s.on_input(c, &mut io, Instant::now());
        }
        let end = io.close || io.lingering();
        (std::mem::take(&mut io.client().out), end)
    }

    fn statuses(out: &[u8]) -> Vec<u16> {
        out.windows(12)
            .filter(|w| w.starts_with(b"HTTP/1.1 "))
            .filter_map(|w| std::str::from_utf8(&w[9..12]).ok()?.parse().ok())
            .collect()
    }

    #[test]
    fn differing_content_lengths_get_400_alone() {
        let smuggle = b"POST /one HTTP/1.1\r\nHost: x\r\nContent-Length: 36\r\nContent-Length: 0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
        let (out, end) = run(&[smuggle]);
        assert_eq!(out, RESP_400);
        assert!(end);
        for bad in [
            &b"POST / HTTP/1.1\r\nContent-Length: 5, 6\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 5,\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
            b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        ] {
            let (out, end) = run(&[bad]);
            assert_eq!(out, RESP_400, "{}", String::from_utf8_lossy(bad));
            assert!(end);
        }
        // Identical values, repeated or listed, stand for one.
        let (out, end) = run(&[
            b"POST / HTTP/1.1\r\nContent-Length: 3, 3\r\nContent-Length: 3\r\n\r\nabcGET / HTTP/1.1\r\n\r\n",
        ]);
        assert_eq!(statuses(&out), [200, 200]);
        assert!(!end);
    }

    #[test]
    fn chunked_upload_then_pipelined_request() {
        let req = b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n4;a=b\r\nGET \r\n0\r\nX-Trailer: 1\r\n\r\nGET /next HTTP/1.1\r\nHost: x\r\n\r\n";
        let (out, end) = run(&[req]);
        assert_eq!(out, [RESP_KEEPALIVE, RESP_KEEPALIVE].concat());
        assert!(!end);
        // A malformed chunked body gets 400 alone (its 200 is owed until the end).
        let (out, end) =
            run(&[b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX"]);
        assert_eq!(out, RESP_400);
        assert!(end);
    }

    #[test]
    fn expect_100_continue_then_body_then_answer() {
        let mut s = HttpSession::default();
        let mut io = SessionIo::default();
        let now = Instant::now();
        s.on_input(
            b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
            &mut io,
            now,
        );
        assert_eq!(std::mem::take(&mut io.client().out), RESP_100);
        s.on_input(b"hel", &mut io, now);
        assert!(io.client().out.is_empty());
        s.on_input(b"loGET / HTTP/1.1\r\n\r\n", &mut io, now);
        assert_eq!(
            std::mem::take(&mut io.client().out),
            [RESP_KEEPALIVE, RESP_KEEPALIVE].concat()
        );
        // Without a body there is nothing to continue; HTTP/1.0 ignores it.
        let (out, _) = run(&[b"GET / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n"]);
        assert_eq!(out, RESP_KEEPALIVE);
        let (out, _) = run(&[
            b"POST / HTTP/1.0\r\nConnection: keep-alive\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\nx",
        ]);
        assert_eq!(out, RESP_KEEPALIVE_10);
    }

    #[test]
    fn head_limits_apply_to_the_whole_head() {
        // A head over 16 KiB that arrives whole in one read.
        let big = format!(
            "GET / HTTP/1.1\r\nX-Big: {}\r\n\r\n",
            "a".repeat(MAX_HEAD_BYTES)
        );
        let (out, end) = run(&[big.as_bytes()]);
        assert_eq!(out, RESP_431);
        assert!(end);
        // Just under the limit is fine, whatever the pieces.
        let head = b"GET / HTTP/1.1\r\nX: ";
        let fill = MAX_HEAD_BYTES - head.len() - 4;
        let ok = [&head[..], &vec![b'v'; fill], b"\r\n\r\n"].concat();
        assert_eq!(ok.len(), MAX_HEAD_BYTES);
        let pieces: Vec<&[u8]> = ok.chunks(1000).collect();
        assert_eq!(run(&pieces).0, RESP_KEEPALIVE);
        // 65 fields, in one read or line by line.
        let many = [
            &b"GET / HTTP/1.1\r\n"[..],
            &b"A: b\r\n".repeat(MAX_HEADERS + 1),
            b"\r\n",
        ]
        .concat();
        assert_eq!(run(&[&many]).0, RESP_431);
        let lines: Vec<&[u8]> = many.split_inclusive(|&b| b == b'\n').collect();
        assert_eq!(run(&lines).0, RESP_431);
        // 64 fields are fine.
        let max = [
            &b"GET / HTTP/1.1\r\n"[..],
            &b"A: b\r\n".repeat(MAX_HEADERS),
            b"\r\n",
        ]
        .concat();
        assert_eq!(run(&[&max]).0, RESP_KEEPALIVE);
    }

    #[test]
    fn deadlines_head_keepalive_and_408() {
        let cfg = HttpConfig {
            header_timeout_ms: 100,
            keepalive_timeout_ms: 500,
        };
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut s = HttpSession::new(cfg);
        let mut io = SessionIo::default();
        s.on_open(&mut io, t0);
        assert_eq!(
            io.deadline,
            Some(t0 + ms(100)),
            "first head from the opening"
        );
        s.on_input(b"GET / HTTP/1.1\r\n\r\n", &mut io, t0 + ms(10));
        assert_eq!(io.deadline, Some(t0 + ms(510)), "idle: keep-alive");
        s.on_sent(&mut io, t0 + ms(20));
        assert_eq!(io.deadline, Some(t0 + ms(520)), "from the last send");
        s.on_input(b"GET / HT", &mut io, t0 + ms(300));
        assert_eq!(
            io.deadline,
            Some(t0 + ms(400)),
            "a head from its first byte"
        );
        s.on_input(b"TP/1.1\r\nX: y", &mut io, t0 + ms(350));
        assert_eq!(io.deadline, Some(t0 + ms(400)), "does not move");
        io.client().out.clear();
        s.on_timeout(&mut io, t0 + ms(400));
        assert_eq!(io.client().out, RESP_408);
        assert!(io.lingering() && !io.abort);
    }

    /// Randomized: a stream of requests of every framing (Content-Length,
    /// chunked with extensions and trailers, 100-continue, pipelined) gives the
    /// same answers fed whole and fed in random pieces.
    #[test]
    fn same_answers_whatever_the_read_boundaries() {
        for seed in 1..=1500u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
            let mut stream = Vec::new();
            for i in 0..1 + rng.below(5) {
                match rng.below(5) {
                    0 => stream.extend_from_slice(
                        format!("GET /{i} HTTP/1.1\r\nHost: h\r\n\r\n").as_bytes(),
                    ),
                    1 => {
                        let n = rng.below(50);
                        stream.extend_from_slice(
                            format!("POST /{i} HTTP/1.1\r\nContent-Length: {n}\r\n\r\n").as_bytes(),
                        );
                        stream.extend(std::iter::repeat_n(b'\n', n));
                    }
                    2 => {
                        stream.extend_from_slice(
                            b"POST /c HTTP/1.1\r\nTransfer-Encoding: Chunked\r\n\r\n",
                        );
                        for _ in 0..rng.below(4) {
                            let n = 1 + rng.below(30);
                            stream.extend_from_slice(format!("{n:X};e=1\r\n").as_bytes());
                            stream.extend(std::iter::repeat_n(b'\r', n));
                            stream.extend_from_slice(b"\r\n");
                        }
                        stream.extend_from_slice(b"0\r\nT: 1\r\n\r\n");
                    }
                    3 => {
                        let n = 1 + rng.below(20);
                        stream.extend_from_slice(format!("PUT /e HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: {n}\r\n\r\n").as_bytes());
                        stream.extend(std::iter::repeat_n(b'x', n));
                    }
                    _ => stream.extend_from_slice(
                        b"GET /bad HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                    ),
                }
            }
            let (whole, whole_end) = run(&[&stream]);
            let mut pieces = Vec::new();
            let mut pos = 0;
            while pos < stream.len() {
                let n = 1 + rng.below((stream.len() - pos).min(40));
                pieces.push(&stream[pos..pos + n]);
                pos += n;
            }
            let (split, split_end) = run(&pieces);
            assert_eq!(
                String::from_utf8_lossy(&split),
                String::from_utf8_lossy(&whole),
                "seed {seed}"
            );
            assert_eq!(split_end, whole_end, "seed {seed}");
            assert!(!statuses(&whole).is_empty(), "seed {seed}");
        }
    }
}
