//! `action = "http"` framing (RFC 9112), its deadlines, and the lingering close
//! of http and respond, on real sockets, on both drivers.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;

both_drivers!(
    framing_inputs_get_their_answers,
    pipelined_3000_to_a_slow_small_buffer_reader_then_eof,
    head_deadline_408_and_keepalive_idle_close,
    close_with_more_input_is_never_a_reset,
);

/// A one-worker ringress with one http listener (extra keys in `extra`) and one
/// respond listener; returns it and the two addresses.
fn start(tag: &str, driver: &str, extra: &str) -> (Ringress, SocketAddr, SocketAddr) {
    let (ph, pr) = (free_port(), free_port());
    let cfg = format!(
        "[runtime]\nworkers = 1\nshutdown_timeout_ms = 1000\n\n\
         [[listener]]\nname = \"h\"\nlisten = \"127.0.0.1:{ph}\"\naction = \"http\"\n{extra}\n\
         [[listener]]\nname = \"r\"\nlisten = \"127.0.0.1:{pr}\"\naction = \"respond\"\nrespond = \"ack\\n\"\n"
    );
    let r = Ringress::start(&format!("{tag}-{driver}"), driver, &cfg);
    (
        r,
        SocketAddr::from(([127, 0, 0, 1], ph)),
        SocketAddr::from(([127, 0, 0, 1], pr)),
    )
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// The status codes of every response head in `got`, in order.
fn statuses(got: &[u8]) -> Vec<u16> {
    got.windows(12)
        .filter(|w| w.starts_with(b"HTTP/1.1 "))
        .filter_map(|w| std::str::from_utf8(&w[9..12]).ok()?.parse().ok())
        .collect()
}

/// Sends `req` on a new connection, reads until EOF; the end must be clean.
fn exchange(addr: SocketAddr, req: &[u8]) -> Vec<u8> {
    let mut s = connect(addr);
    s.write_all(req).unwrap();
    let (got, err) = read_until_end(&mut s);
    assert!(
        err.is_none(),
        "not a clean end ({err:?}) after {:?}",
        String::from_utf8_lossy(&got)
    );
    got
}

fn framing_inputs_get_their_answers(driver: &str) {
    let (r, h, _) = start("hframe", driver, "");
    // Two different Content-Length values: one 400, then the close.
    let got = exchange(
        h,
        b"POST /one HTTP/1.1\r\nHost: x\r\nContent-Length: 36\r\nContent-Length: 0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    assert_eq!(statuses(&got), [400], "{}", String::from_utf8_lossy(&got));
    assert!(got.windows(17).any(|w| w == b"Connection: close"));
    // Transfer codings other than chunked, and TE with CL: 400 and close.
    for bad in [
        &b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\nGET / HTTP/1.1\r\n\r\n"[..],
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n",
    ] {
        assert_eq!(statuses(&exchange(h, bad)), [400]);
    }
    // A chunked upload followed by a pipelined request: two 200s.
    let got = exchange(
        h,
        b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
          5;ext=1\r\nhello\r\n1a\r\nGET /inside HTTP/1.1\r\n\r\n\r\n\r\n0\r\nX-T: 1\r\n\r\n\
          GET /next HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(
        statuses(&got),
        [200, 200],
        "{}",
        String::from_utf8_lossy(&got)
    );
    // A malformed chunked body: 400 alone.
    let got = exchange(
        h,
        b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX\r\n0\r\n\r\n",
    );
    assert_eq!(statuses(&got), [400]);
    // Expect: 100-continue: 100 first, the body is read, then the answers.
    let mut s = connect(h);
    s.write_all(
        b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
    )
    .unwrap();
    let mut first = [0u8; 25];
    s.read_exact(&mut first).unwrap();
    assert_eq!(&first, b"HTTP/1.1 100 Continue\r\n\r\n");
    s.write_all(b"helloGET /next HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let (got, err) = read_until_end(&mut s);
    assert!(err.is_none(), "{err:?}");
    assert_eq!(
        statuses(&got),
        [200, 200],
        "{}",
        String::from_utf8_lossy(&got)
    );
    // A head over 16 KiB in one write, then more: 431, then EOF.
    let big = format!(
        "GET / HTTP/1.1\r\nX-Big: {}\r\n\r\nGET / HTTP/1.1\r\n\r\n",
        "a".repeat(17 * 1024)
    );
    assert_eq!(statuses(&exchange(h, big.as_bytes())), [431]);
    // 65 header fields: 431.
    let many = format!("GET / HTTP/1.1\r\n{}\r\n", "A: b\r\n".repeat(65));
    assert_eq!(statuses(&exchange(h, many.as_bytes())), [431]);
    assert!(r.stop().success());
}

fn pipelined_3000_to_a_slow_small_buffer_reader_then_eof(driver: &str) {
    let (r, h, _) = start("hslow", driver, "");
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect(&h.into()).unwrap();
    let mut s: TcpStream = sock.into();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let n = 3000;
    let mut req = b"GET /p HTTP/1.1\r\nHost: x\r\n\r\n".repeat(n - 1);
    req.extend_from_slice(b"GET /last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || w.write_all(&req));
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    let err = loop {
        match s.read(&mut buf) {
            Ok(0) => break None,
            Ok(k) => got.extend_from_slice(&buf[..k]),
            Err(e) => break Some(e),
        }
        std::thread::sleep(Duration::from_micros(500));
    };
    writer.join().unwrap().unwrap();
    assert!(err.is_none(), "not a clean end: {err:?}");
    let st = statuses(&got);
    assert_eq!(st.len(), n, "responses received before EOF");
    assert!(st.iter().all(|&c| c == 200));
    assert!(got.ends_with(b"Connection: close\r\n\r\nok\n"));
    assert!(r.stop().success());
}

fn head_deadline_408_and_keepalive_idle_close(driver: &str) {
    let (r, h, _) = start(
        "hdead",
        driver,
        "header_timeout_ms = 300\nkeepalive_timeout_ms = 600\n",
    );
    // A head that never finishes: 408, then EOF.
    let t0 = Instant::now();
    let got = exchange(h, b"GET / HTTP/1.1\r\nHost: x\r\nX-a: ");
    let took = t0.elapsed();
    assert_eq!(statuses(&got), [408], "{}", String::from_utf8_lossy(&got));
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(3),
        "408 after {took:?}"
    );
    // One byte now and then does not extend it.
    let mut s = connect(h);
    let t0 = Instant::now();
    s.write_all(b"GET / HTTP/1.1\r\n").unwrap();
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(80));
        let _ = s.write_all(b"X");
    }
    let (got, _) = read_until_end(&mut s);
    assert_eq!(statuses(&got), [408]);
    assert!(t0.elapsed() < Duration::from_secs(3));
    // A connection that sends nothing: closed cleanly without an answer.
    let mut s = connect(h);
    let (got, err) = read_until_end(&mut s);
    assert!(got.is_empty() && err.is_none(), "{got:?} {err:?}");
    // Keep-alive: idle after an answer, the connection closes cleanly.
    let mut s = connect(h);
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let t0 = Instant::now();
    let (got, err) = read_until_end(&mut s);
    let took = t0.elapsed();
    assert!(err.is_none(), "{err:?}");
    assert_eq!(statuses(&got), [200]);
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_secs(3),
        "keep-alive close after {took:?}"
    );
    assert!(r.stop().success());
}

fn close_with_more_input_is_never_a_reset(driver: &str) {
    let (r, h, resp) = start("hlinger", driver, "");
    // Connection: close followed by more bytes: the response intact, then EOF.
    let mut req = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec();
    req.extend(std::iter::repeat_n(b'z', 100_000));
    let got = exchange(h, &req);
    assert_eq!(statuses(&got), [200]);
    assert!(got.ends_with(b"ok\n"));
    // A malformed request followed by more: 400, then EOF.
    let mut req = b"\x00\x01 nonsense\r\n\r\n".to_vec();
    req.extend(std::iter::repeat_n(b'y', 50_000));
    assert_eq!(statuses(&exchange(h, &req)), [400]);
    // respond: the answer, then EOF, whatever the client sends meanwhile (more
    // than the 64 KiB respond used to read), and whether it half-closes or not.
    for half_close in [false, true] {
        let mut s = connect(resp);
        s.write_all(&vec![b'q'; 100_000]).unwrap();
        if half_close {
            s.shutdown(Shutdown::Write).unwrap();
        }
        let (got, err) = read_until_end(&mut s);
        assert!(err.is_none(), "respond reset: {err:?}");
        assert_eq!(got, b"ack\n");
    }
    assert!(r.stop().success());
}
