//! TCP listeners on real sockets in real namespaces, on both drivers.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::time::{Duration, Instant};

use common::*;

both_drivers!(
    echo_respond_http_in_root_and_namespace,
    echo_several_mib,
    echo_small_pieces_slow_reader,
    http_keepalive_and_pipelining,
    namespace_isolation_and_same_port,
    fds_return_after_10000_connections,
    thread_count_does_not_grow_with_namespaces,
    out_of_fds_pauses_accepting_and_recovers,
);

fn cfg(driver_workers: usize, listeners: &str) -> String {
    format!("[runtime]\nworkers = {driver_workers}\nshutdown_timeout_ms = 1000\n\n{listeners}")
}

fn listener(name: &str, netns: Option<&str>, listen: &str, action: &str) -> String {
    let ns = netns.map_or(String::new(), |n| format!("netns = \"{n}\"\n"));
    let extra = if action == "respond" {
        "respond = \"ack\\n\"\n"
    } else {
        ""
    };
    format!(
        "[[listener]]\nname = \"{name}\"\n{ns}listen = \"{listen}\"\naction = \"{action}\"\n{extra}\n"
    )
}

fn check_echo(ns: Option<&TempNetns>, addr: SocketAddr, n: usize, seed: u64) {
    let data = payload(n, seed);
    let s = connect_in(ns, addr).expect("connect to echo");
    let back = echo_roundtrip(s, &data);
    assert_eq!(back.len(), data.len(), "echo length");
    assert!(back == data, "echo bytes differ");
}

fn check_respond(ns: Option<&TempNetns>, addr: SocketAddr) {
    let mut s = connect_in(ns, addr).unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"ack\n");
}

fn http_get(s: &mut std::net::TcpStream, n: usize) -> usize {
    let req = b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n".repeat(n);
    s.write_all(&req).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let want = n;
    while got.windows(15).filter(|w| w == b"HTTP/1.1 200 OK").count() < want
        || !got.ends_with(b"ok\n")
    {
        let k = s.read(&mut buf).unwrap();
        assert!(k > 0, "server closed a keep-alive connection");
        got.extend_from_slice(&buf[..k]);
    }
    got.windows(15).filter(|w| w == b"HTTP/1.1 200 OK").count()
}

fn echo_respond_http_in_root_and_namespace(driver: &str) {
    let ns = netns(&format!("erh-{driver}"));
    let (pe, pr, ph) = (free_port(), free_port(), free_port());
    let mut l = String::new();
    for (i, (name, a, p)) in [("e", "echo", pe), ("r", "respond", pr), ("h", "http", ph)]
        .into_iter()
        .enumerate()
    {
        l += &listener(name, None, &format!("127.0.0.1:{p}"), a);
        l += &listener(
            &format!("{name}-ns"),
            Some(ns.name()),
            &format!("127.0.0.1:{}", 9000 + i),
            a,
        );
    }
    let r = Ringress::start(&format!("erh-{driver}"), driver, &cfg(2, &l));
    let root = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
    let nsa = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
    check_echo(None, root(pe), 100_000, 1);
    check_echo(Some(&ns), nsa(9000), 100_000, 2);
    check_respond(None, root(pr));
    check_respond(Some(&ns), nsa(9001));
    assert_eq!(http_get(&mut connect_in(None, root(ph)).unwrap(), 1), 1);
    assert_eq!(
        http_get(&mut connect_in(Some(&ns), nsa(9002)).unwrap(), 1),
        1
    );
    assert!(r.stop().success());
}

fn echo_several_mib(driver: &str) {
    let port = free_port();
    let ns = netns(&format!("mib-{driver}"));
    let l = listener("e", None, &format!("127.0.0.1:{port}"), "echo")
        + &listener("n", Some(ns.name()), "[::1]:7100", "echo");
    ns.ip(&["addr", "add", "::1/128", "dev", "lo"]).ok();
    let r = Ringress::start(&format!("mib-{driver}"), driver, &cfg(2, &l));
    check_echo(None, SocketAddr::from(([127, 0, 0, 1], port)), 8 << 20, 3);
    check_echo(Some(&ns), "[::1]:7100".parse().unwrap(), 8 << 20, 4);
    assert!(r.stop().success());
}

fn echo_small_pieces_slow_reader(driver: &str) {
    let ns = netns(&format!("slow-{driver}"));
    let l = listener("e", Some(ns.name()), "127.0.0.1:7200", "echo");
    let r = Ringress::start(&format!("slow-{driver}"), driver, &cfg(1, &l));
    let s = connect_in(Some(&ns), "127.0.0.1:7200".parse().unwrap()).unwrap();
    let data = payload(3000, 5);
    let mut w = s.try_clone().unwrap();
    let d2 = data.clone();
    let writer = std::thread::spawn(move || {
        for chunk in d2.chunks(3) {
            w.write_all(chunk).unwrap();
            if chunk[0] % 16 == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        w.shutdown(Shutdown::Write).unwrap();
    });
    let mut back = Vec::new();
    let mut buf = [0u8; 7];
    let mut r2 = s;
    loop {
        let n = r2.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        back.extend_from_slice(&buf[..n]);
        std::thread::sleep(Duration::from_micros(300));
    }
    writer.join().unwrap();
    assert!(
        back == data,
        "slow echo differs ({} vs {} bytes)",
        back.len(),
        data.len()
    );
    assert!(r.stop().success());
}

fn http_keepalive_and_pipelining(driver: &str) {
    let port = free_port();
    let l = listener("h", None, &format!("127.0.0.1:{port}"), "http");
    let r = Ringress::start(&format!("http-{driver}"), driver, &cfg(2, &l));
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = connect_in(None, addr).unwrap();
    // Keep-alive: several requests one after the other on one connection...
    for _ in 0..5 {
        assert_eq!(http_get(&mut s, 1), 1);
    }
    // ...and 50 pipelined in one write, answered in order.
    assert_eq!(http_get(&mut s, 50), 50);
    // Connection: close is honoured.
    let mut c = connect_in(None, addr).unwrap();
    c.write_all(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut all = Vec::new();
    c.read_to_end(&mut all).unwrap();
    assert!(all.starts_with(b"HTTP/1.1 200 OK"));
    assert!(all.ends_with(b"ok\n"));
    assert!(r.stop().success());
}

fn namespace_isolation_and_same_port(driver: &str) {
    let a = netns(&format!("isoa-{driver}"));
    let b = netns(&format!("isob-{driver}"));
    let c = netns(&format!("isoc-{driver}"));
    let port = free_port();
    let addr: SocketAddr = SocketAddr::from(([127, 0, 0, 1], port));
    let l = listener("a", Some(a.name()), &addr.to_string(), "echo")
        + &listener("b", Some(b.name()), &addr.to_string(), "respond");
    let r = Ringress::start(&format!("iso-{driver}"), driver, &cfg(2, &l));
    // Same port in two namespaces: both serve, each its own action.
    check_echo(Some(&a), addr, 1000, 6);
    check_respond(Some(&b), addr);
    // Not reachable from a third namespace nor from the root namespace.
    for ns in [Some(&c), None] {
        let e = connect_in(ns, addr).expect_err("listener reachable outside its namespace");
        assert_eq!(e.raw_os_error(), Some(libc::ECONNREFUSED), "{e}");
    }
    assert!(r.stop().success());
}

fn fds_return_after_10000_connections(driver: &str) {
    let port = free_port();
    let l = listener("e", None, &format!("127.0.0.1:{port}"), "echo");
    let r = Ringress::start(&format!("fds-{driver}"), driver, &cfg(2, &l));
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let before = r.settled_fds();
    let deadline = Instant::now() + Duration::from_secs(120);
    for i in 0..10_000u32 {
        assert!(
            Instant::now() < deadline,
            "10,000 connections took too long"
        );
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        if i % 2 == 0 {
            s.write_all(b"x").unwrap();
            let mut b = [0u8; 1];
            s.read_exact(&mut b).unwrap();
        }
        // Odd ones close at once, without a byte: the server sees a bare EOF.
    }
    // The last closes may still be in flight in the server: wait for them.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut after = r.fds();
    while after != before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        after = r.fds();
    }
    assert_eq!(after, before, "ringress leaked fds over 10,000 connections");
    assert!(r.stop().success());
}

fn thread_count_does_not_grow_with_namespaces(driver: &str) {
    let workers = 2;
    let one = netns(&format!("thr1-{driver}"));
    let r1 = Ringress::start(
        &format!("thr1-{driver}"),
        driver,
        &cfg(
            workers,
            &listener("only", Some(one.name()), "127.0.0.1:7300", "echo"),
        ),
    );
    check_echo(Some(&one), "127.0.0.1:7300".parse().unwrap(), 100, 7);
    let t1 = r1.threads();
    assert!(r1.stop().success());

    let many: Vec<TempNetns> = (0..200)
        .map(|i| netns(&format!("thr{i}-{driver}")))
        .collect();
    let mut l = String::new();
    for (i, ns) in many.iter().enumerate() {
        l += &listener(&format!("l{i}"), Some(ns.name()), "127.0.0.1:7300", "echo");
    }
    let r200 = Ringress::start(&format!("thr200-{driver}"), driver, &cfg(workers, &l));
    // Every one of them serves.
    for (i, ns) in many.iter().enumerate().step_by(20) {
        check_echo(Some(ns), "127.0.0.1:7300".parse().unwrap(), 100, i as u64);
    }
    let t200 = r200.threads();
    assert_eq!(t200, t1, "threads with 200 namespaces vs 1");
    assert!(t200 <= workers + 3, "{t200} threads for {workers} workers");
    assert!(r200.stop().success());
}

fn out_of_fds_pauses_accepting_and_recovers(driver: &str) {
    let port = free_port();
    let l = listener("e", None, &format!("127.0.0.1:{port}"), "echo");
    // Room for the runtime's own fds and a handful of connections only.
    let r = Ringress::start_limited(&format!("emfile-{driver}"), driver, &cfg(1, &l), Some(40));
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let spare = 40 - r.fds();
    // Hold more connections than the server has fds for: the kernel completes the
    // handshakes (backlog), the server hits EMFILE on accept.
    let mut held = Vec::new();
    for _ in 0..spare + 10 {
        held.push(std::net::TcpStream::connect(addr).unwrap());
    }
    std::thread::sleep(Duration::from_millis(300));
    // While out of fds the server must not spin: well under half a CPU over 1 s.
    let t0 = r.cpu_ticks();
    std::thread::sleep(Duration::from_secs(1));
    let used = r.cpu_ticks() - t0;
    assert!(
        used < 50,
        "server used {used} ticks/s while out of fds (busy loop?)"
    );
    // ringress's own fd budget stops accepting before the kernel's limit does
    // (the backlog holds the rest); the process never runs out.
    assert!(
        r.stderr().contains("listener at capacity") && r.stderr().contains("cap=\"process\""),
        "no at-capacity log:\n{}",
        r.stderr()
    );
    assert!(r.fds() < 40, "{} fds: past the limit", r.fds());
    // Free them; every later connection is served again.
    drop(held);
    std::thread::sleep(Duration::from_millis(300));
    for i in 0..20 {
        check_echo(None, addr, 1000, 100 + i);
    }
    assert!(r.stop().success());
}
