//! Hot-path pieces that need no sockets: the http session parsing 1 and 16
//! pipelined requests from one receive, the echo session queueing a receive, and
//! parsing a config with many listeners.
//!
//! `cargo bench --bench session`.

// criterion_group! generates functions without docs.
#![allow(missing_docs)]

use std::fmt::Write as _;
use std::hint::black_box;
use std::path::Path;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ringress::config::{Action, Config};
use ringress::proto::{Completion, Session, SessionIo, Side};

/// What wrk sends for `wrk http://127.0.0.1:PORT/`.
const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8081\r\n\r\n";
/// A browser-like request with more headers.
const REQUEST_BIG: &[u8] = b"GET /index.html?q=1 HTTP/1.1\r\nHost: example.com\r\n\
User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0\r\n\
Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8\r\n\
Accept-Language: en-US,en;q=0.5\r\nAccept-Encoding: gzip, deflate, br\r\n\
Connection: keep-alive\r\nCookie: session=0123456789abcdef0123456789abcdef\r\n\r\n";

fn http_session(c: &mut Criterion) {
    let mut g = c.benchmark_group("http_session");
    g.sample_size(50)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    for (label, req) in [("wrk", REQUEST), ("browser", REQUEST_BIG)] {
        for n in [1usize, 16] {
            let input = req.repeat(n);
            g.throughput(Throughput::Elements(n as u64));
            g.bench_with_input(BenchmarkId::new(label, n), &input, |b, input| {
                b.iter(|| {
                    let mut s = Session::new(&Action::Http(Default::default()));
                    let mut io = SessionIo::default();
                    s.on_complete(
                        Side::Client,
                        Completion::Recv(black_box(input)),
                        &mut io,
                        Instant::now(),
                    );
                    black_box(io.client().unsent())
                })
            });
        }
    }
    g.finish();
}

fn echo_session(c: &mut Criterion) {
    let mut g = c.benchmark_group("echo_session");
    g.sample_size(50)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    let data = vec![7u8; 1024];
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.bench_function("recv_1k", |b| {
        b.iter(|| {
            let mut s = Session::new(&Action::Echo);
            let mut io = SessionIo::default();
            s.on_complete(
                Side::Client,
                Completion::Recv(black_box(&data)),
                &mut io,
                Instant::now(),
            );
            black_box(io.client().unsent())
        })
    });
    g.finish();
}

fn config_parse(c: &mut Criterion) {
    let mut g = c.benchmark_group("config_parse");
    g.sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    for n in [1usize, 1000] {
        let mut text = String::from("[runtime]\nworkers = 2\nio = \"auto\"\n");
        for i in 0..n {
            let _ = write!(
                text,
                "\n[[listener]]\nname = \"l{i}\"\nlisten = \"127.0.0.1:{}\"\naction = \"echo\"\n",
                10000 + i
            );
        }
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::new("listeners", n), &text, |b, text| {
            b.iter(|| Config::parse(black_box(text), Path::new("<bench>")).expect("parse"))
        });
    }
    g.finish();
}

criterion_group!(benches, http_session, echo_session, config_parse);
criterion_main!(benches);
