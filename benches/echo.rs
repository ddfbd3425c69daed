//! Echo round trips over loopback TCP on each driver: one in-process server
//! (`Server::start`, one worker, one echo listener on 127.0.0.1), one blocking
//! client with TCP_NODELAY that writes N bytes and reads N bytes back per iteration.
//!
//! The worker is pinned to the first allowed CPU and the client thread to the same
//! CPU (`RINGRESS_BENCH_CROSS_CPU=1`: to the second, as tools/bench does).
//!
//! `cargo bench --bench echo`. The io_uring variant is skipped (with a note on
//! stderr) when the build lacks the `uring` feature or the kernel refuses a ring.

// criterion_group! generates functions without docs.
#![allow(missing_docs)]

use std::hint::black_box;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
use nix::unistd::Pid;
use ringress::config::{Config, IoChoice};
use ringress::server::Server;

const SIZES: &[usize] = &[64, 1024, 16 * 1024];

/// A port that was free a moment ago on 127.0.0.1.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding 127.0.0.1:0")
}

/// A server with one worker and one echo listener on 127.0.0.1 with driver `io`.
/// The config is parsed from TOML (so it keeps up with new config fields).
fn start(io: IoChoice) -> (Server, SocketAddr) {
    start_with(io, |addr| {
        format!("[[listener]]\nname = \"bench-echo\"\nlisten = \"{addr}\"\naction = \"echo\"\n")
    })
}

/// A server with one worker, driver `io`, and the listeners `listeners(addr)` gives
/// for a free port `addr` on 127.0.0.1.
fn start_with(io: IoChoice, listeners: impl Fn(SocketAddr) -> String) -> (Server, SocketAddr) {
    let mut last = None;
    for _ in 0..5 {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let text = format!(
            "[runtime]\nworkers = 1\nio = \"{}\"\n\n{}",
            io.as_str(),
            listeners(addr)
        );
        let cfg = Config::parse(&text, Path::new("<bench>")).expect("bench config");
        match Server::start(&cfg, Some(io)) {
            Ok(s) => return (s, addr),
            // The port may have been taken in between: try another one.
            Err(e) => last = Some(e.to_string()),
        }
    }
    panic!("starting the bench server: {}", last.unwrap_or_default());
}

fn client(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).expect("connect");
    s.set_nodelay(true).expect("TCP_NODELAY");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Pins the calling (client) thread to the worker's CPU (`Server::start` pins the
/// worker to the first allowed CPU), or to the second allowed CPU when
/// `RINGRESS_BENCH_CROSS_CPU=1`; returns the old mask to restore.
///
/// Same CPU is the default: every round trip is then two context switches and the
/// two paths through the kernel, with no cross-CPU wake-up (an IPI, ~20 us on a
/// VM) to drown the difference between the drivers.
fn pin_client() -> Option<CpuSet> {
    let cpus = ringress::driver::allowed_cpus();
    let cross = std::env::var("RINGRESS_BENCH_CROSS_CPU").is_ok_and(|v| v == "1");
    let me = Pid::from_raw(0);
    let old = sched_getaffinity(me).ok()?;
    let mut set = CpuSet::new();
    set.set(*cpus.get(usize::from(cross))?).ok()?;
    sched_setaffinity(me, &set).ok()?;
    Some(old)
}

fn unpin(old: Option<CpuSet>) {
    if let Some(old) = old {
        let _ = sched_setaffinity(Pid::from_raw(0), &old);
    }
}

fn drivers() -> Vec<(&'static str, IoChoice)> {
    #[allow(unused_mut)] // only pushed to with the `uring` feature
    let mut v = vec![("epoll", IoChoice::Epoll)];
    #[cfg(feature = "uring")]
    match ringress::driver::uring_available() {
        Ok(()) => v.insert(0, ("uring", IoChoice::Uring)),
        Err(e) => eprintln!("echo bench: skipping io_uring: {e}"),
    }
    v
}

fn echo_round_trip(c: &mut Criterion) {
    let mut g = c.benchmark_group("echo_round_trip");
    g.sample_size(20)
        .warm_up_time(Duration::from_millis(400))
        .measurement_time(Duration::from_millis(1500));
    for (name, io) in drivers() {
        let (server, addr) = start(io);
        let pinned = pin_client();
        let mut s = client(addr);
        for &n in SIZES {
            let out: Vec<u8> = (0..n).map(|i| (i * 131 + 7) as u8).collect();
            let mut back = vec![0u8; n];
            g.throughput(Throughput::Bytes(n as u64));
            g.bench_with_input(BenchmarkId::new(name, n), &n, |b, _| {
                b.iter(|| {
                    s.write_all(&out).expect("write");
                    s.read_exact(&mut back).expect("read");
                    black_box(&back);
                })
            });
            // (A filtered-out benchmark never ran: nothing to check then.)
            assert!(
                back == out || back.iter().all(|&b| b == 0),
                "{name}: the echo differs from what was sent"
            );
        }
        drop(s);
        unpin(pinned);
        server.shutdown();
    }
    g.finish();
}

/// Connection setup and teardown: connect, one 64-byte echo, close.
fn connect_echo_close(c: &mut Criterion) {
    let mut g = c.benchmark_group("connect_echo_close");
    g.sample_size(20)
        .warm_up_time(Duration::from_millis(400))
        .measurement_time(Duration::from_millis(1500));
    for (name, io) in drivers() {
        let (server, addr) = start(io);
        let pinned = pin_client();
        let out = [7u8; 64];
        let mut back = [0u8; 64];
        g.bench_function(name, |b| {
            b.iter(|| {
                let mut s = client(addr);
                s.write_all(&out).expect("write");
                s.read_exact(&mut back).expect("read");
                // Close from the server side first would leave TIME_WAIT there;
                // half-close and wait for the server's FIN like a polite client.
                s.shutdown(std::net::Shutdown::Write).expect("shutdown");
                let mut rest = [0u8; 1];
                let n = s.read(&mut rest).expect("read EOF");
                assert_eq!(n, 0);
            })
        });
        unpin(pinned);
        server.shutdown();
    }
    g.finish();
}

/// One session through a proxy listener, by where its upstream lives: connect,
/// one 64-byte echo through the proxy, close. The same ringress serves the proxy
/// listener and the upstream echo listener: in the root namespace, or in a
/// namespace of its own, reached through the binder's upstream socket pool.
fn proxy_connect(c: &mut Criterion) {
    if !ringress::procstat::has_cap_sys_admin() {
        eprintln!("proxy_connect bench: skipped (needs root for a namespace)");
        return;
    }
    let ns = ringress::netns::TempNetns::create(&format!("rgb-bench-{}", std::process::id()))
        .expect("creating a namespace");
    let mut g = c.benchmark_group("proxy_connect");
    g.sample_size(20)
        .warm_up_time(Duration::from_millis(400))
        .measurement_time(Duration::from_millis(1500));
    for (name, io) in drivers() {
        for (where_, upstream_netns) in [
            ("root", String::new()),
            ("netns", format!("upstream_netns = \"{}\"\n", ns.name())),
        ] {
            let echo_ns = if upstream_netns.is_empty() {
                String::new()
            } else {
                format!("netns = \"{}\"\n", ns.name())
            };
            let (server, addr) = start_with(io, |addr| {
                let up = SocketAddr::from(([127, 0, 0, 1], free_port()));
                format!(
                    "[[listener]]\nname = \"px\"\nlisten = \"{addr}\"\naction = \"proxy\"\nupstream = \"{up}\"\n{upstream_netns}\n\
                     [[listener]]\nname = \"up\"\n{echo_ns}listen = \"{up}\"\naction = \"echo\"\n"
                )
            });
            let pinned = pin_client();
            let out = [7u8; 64];
            let mut back = [0u8; 64];
            g.bench_function(BenchmarkId::new(name, where_), |b| {
                b.iter(|| {
                    let mut s = client(addr);
                    s.write_all(&out).expect("write");
                    s.read_exact(&mut back).expect("read");
                    s.shutdown(std::net::Shutdown::Write).expect("shutdown");
                    let mut rest = Vec::new();
                    s.read_to_end(&mut rest).expect("read EOF");
                    assert!(rest.is_empty());
                })
            });
            unpin(pinned);
            server.shutdown();
        }
    }
    g.finish();
}

criterion_group!(benches, echo_round_trip, connect_echo_close, proxy_connect);
criterion_main!(benches);
