//! `action = "http"`: a fixed `200 OK` for every HTTP/1.x request.
//!
//! Requests are parsed with httparse; several requests in one read (pipelining)
//! get one response each, in order. Keep-alive follows RFC 9112 §9.3: HTTP/1.1
//! stays open unless `Connection: close`; HTTP/1.0 closes unless
//! `Connection: keep-alive`. A request body announced by `Content-Length` is read
//! and discarded; `Transfer-Encoding` bodies are refused with 501 and a close.
//!
//! Graceful shutdown ([`HttpSession::on_drain`]): a connection idle between
//! requests closes at once; one with a request in progress answers it with
//! `Connection: close`, then closes. "Closes" is a lingering close (RFC 9112 §9.6):
//! FIN once every queued response has been sent, then whatever the client still
//! sends is read and discarded until its own FIN, for at most [`DRAIN_LINGER_MS`],
//! so that a request racing the close does not turn it into a reset (closing a
//! TCP socket with unread input sends RST, RFC 2525 §2.17).

use std::time::{Duration, Instant};

use super::SessionIo;

/// How long a connection closed by a graceful shutdown goes on reading (and
/// discarding) after its FIN, waiting for the client's FIN, before it closes
/// anyway (ms).
pub const DRAIN_LINGER_MS: u64 = 1000;

/// Most header fields parsed per request; more gives 431.
const MAX_HEADERS: usize = 64;
/// Largest request head kept while waiting for its end (bytes); larger gives 431.
pub(super) const MAX_HEAD_BYTES: usize = 16 * 1024;

pub(super) const RESP_KEEPALIVE: &[u8] =
    b"HTTP/1.1 200 OK\r\nServer: ringress\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\r\nok\n";
pub(super) const RESP_KEEPALIVE_10: &[u8] = b"HTTP/1.1 200 OK\r\nServer: ringress\r\nContent-Type: text/plain\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\nok\n";
pub(super) const RESP_CLOSE: &[u8] = b"HTTP/1.1 200 OK\r\nServer: ringress\r\nContent-Type: text/plain\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n";
pub(super) const RESP_400: &[u8] =
    b"HTTP/1.1 400 Bad Request\r\nServer: ringress\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
pub(super) const RESP_431: &[u8] = b"HTTP/1.1 431 Request Header Fields Too Large\r\nServer: ringress\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
pub(super) const RESP_501: &[u8] = b"HTTP/1.1 501 Not Implemented\r\nServer: ringress\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";

/// Parser state of one HTTP connection.
#[derive(Debug, Default)]
pub struct HttpSession {
    /// Bytes of an incomplete request head carried over to the next read.
    partial: Vec<u8>,
    /// Body bytes of the current request still to be skipped.
    body_left: u64,
    /// The process is shutting down: the next response says `Connection: close`.
    draining: bool,
    /// Shut down (FIN queued): input is read and discarded until EOF or the
    /// deadline.
    lingering: bool,
}

enum Parsed {
    /// A whole head of this many bytes: respond, then skip `body` bytes.
    Request {
        head: usize,
        body: u64,
        keep_alive: bool,
        http10: bool,
    },
    Partial,
    Reject(&'static [u8]),
}

fn parse_one(buf: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Partial) => {
            if buf.len() > MAX_HEAD_BYTES {
                Parsed::Reject(RESP_431)
            } else {
                Parsed::Partial
            }
        }
        Err(httparse::Error::TooManyHeaders) => Parsed::Reject(RESP_431),
        Err(_) => Parsed::Reject(RESP_400),
        Ok(httparse::Status::Complete(head)) => {
            let http10 = req.version == Some(0);
            let mut keep_alive = !http10;
            let mut body = 0u64;
            for h in req.headers.iter() {
                if h.name.eq_ignore_ascii_case("connection") {
                    let v = h.value;
                    if has_token(v, b"close") {
                        keep_alive = false;
                    } else if has_token(v, b"keep-alive") {
                        keep_alive = true;
                    }
                } else if h.name.eq_ignore_ascii_case("content-length") {
                    match std::str::from_utf8(h.value)
                        .ok()
                        .and_then(|s| s.trim().parse().ok())
                    {
                        Some(n) => body = n,
                        None => return Parsed::Reject(RESP_400),
                    }
                } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                    return Parsed::Reject(RESP_501);
                }
            }
            Parsed::Request {
                head,
                body,
                keep_alive,
                http10,
            }
        }
    }
}

fn has_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

impl HttpSession {
    /// Consumes `data` received at `now`, queueing one response per complete
    /// request into `io`. Closes (after the queue drains) on `Connection: close`,
    /// HTTP/1.0 without keep-alive, or a malformed request. While draining, the
    /// first complete request gets `Connection: close` and a lingering close;
    /// while lingering, input is discarded.
    pub fn on_input(&mut self, mut data: &[u8], io: &mut SessionIo, now: Instant) {
        if self.lingering {
            return;
        }
        // Skip the rest of a body still in flight.
        let skip = (self.body_left.min(data.len() as u64)) as usize;
        self.body_left -= skip as u64;
        data = &data[skip..];
        if self.draining && skip > 0 && self.body_left == 0 {
            // The body of a request answered before the drain has ended: the
            // connection is idle, whatever follows.
            self.linger(io, now);
            return;
        }
        if data.is_empty() {
            return;
        }
        if self.partial.is_empty() {
            let used = self.parse_all(data, io, now);
            if used < data.len() && !io.close && !self.lingering {
                self.partial.extend_from_slice(&data[used..]);
            }
        } else {
            let mut buf = std::mem::take(&mut self.partial);
            buf.extend_from_slice(data);
            let used = self.parse_all(&buf, io, now);
            if used < buf.len() && !io.close && !self.lingering {
                buf.drain(..used);
                self.partial = buf;
            }
        }
    }

    /// Graceful shutdown, at `now`: a connection idle between requests (no
    /// partial request head, no body being read) starts a lingering close at once
    /// (FIN after the responses already queued); otherwise the request in
    /// progress is answered with `Connection: close` and the connection closes
    /// after that response. Called once; later calls change nothing.
    pub fn on_drain(&mut self, io: &mut SessionIo, now: Instant) {
        if self.draining || io.close {
            return;
        }
        self.draining = true;
        if self.idle() {
            self.linger(io, now);
        }
    }

    /// Whether a deadline that passes now ends a lingering close (a clean close,
    /// not a reset).
    pub fn lingering(&self) -> bool {
        self.lingering
    }

    /// No request in progress: no partial head, no body left to skip.
    fn idle(&self) -> bool {
        self.partial.is_empty() && self.body_left == 0
    }

    /// Starts a lingering close at `now`: FIN once the queue is sent, then read
    /// and discard until EOF (which closes) or [`DRAIN_LINGER_MS`] (which closes
    /// too).
    fn linger(&mut self, io: &mut SessionIo, now: Instant) {
        self.lingering = true;
        self.partial = Vec::new();
        self.body_left = 0;
        io.client().shutdown_write();
        io.client().recv();
        io.set_deadline(Some(now + Duration::from_millis(DRAIN_LINGER_MS)));
    }

    /// Parses as many whole requests as `buf` holds; returns the bytes consumed.
    fn parse_all(&mut self, buf: &[u8], io: &mut SessionIo, now: Instant) -> usize {
        let mut pos = 0;
        while pos < buf.len() && !io.close && !self.lingering {
            match parse_one(&buf[pos..]) {
                Parsed::Partial => break,
                Parsed::Reject(resp) => {
                    io.client().send(resp);
                    io.close();
                    return buf.len();
                }
                Parsed::Request {
                    head,
                    body,
                    keep_alive,
                    http10,
                } => {
                    pos += head;
                    let avail = (buf.len() - pos) as u64;
                    let skip = body.min(avail);
                    pos += skip as usize;
                    self.body_left = body - skip;
                    if self.draining {
                        // Shutting down: this is the last response.
                        io.client().send(RESP_CLOSE);
                        self.linger(io, now);
                        return buf.len();
                    }
                    if keep_alive {
                        io.client().send(if http10 {
                            RESP_KEEPALIVE_10
                        } else {
                            RESP_KEEPALIVE
                        });
                    } else {
                        io.client().send(RESP_CLOSE);
                        io.close();
                    }
                    if self.body_left > 0 {
                        return buf.len();
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
        let close = io.close;
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
            assert!(s.lingering(), "{ctx}: not closing");
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
            let mut s = Session::new(&Action::Http);
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
                Some(now + Duration::from_millis(DRAIN_LINGER_MS))
            );
            s.on_complete(Side::Client, end, &mut io, now);
            assert!(io.close && !io.abort, "a lingering close must not reset");
        }
        // Without a drain, a timeout still aborts as before.
        let mut s = Session::new(&Action::Http);
        let mut io = SessionIo::default();
        s.on_complete(Side::Client, Completion::Timeout, &mut io, Instant::now());
        assert!(io.abort);
    }
}
