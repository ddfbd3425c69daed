//! Shared-socket listeners (`shards`), on both drivers: a `shards = 1` listener
//! with two workers is one fd that both workers accept on (connections land on
//! both), the process holds one fd per listener fewer than with one socket per
//! worker, echo works on every listener, and a reload that changes `shards` binds
//! the listener anew without failing a client or resetting its counters; a
//! takeover hands a shared socket over once, whatever the worker count.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

both_drivers!(
    shared_socket_serves_on_every_worker,
    shards_change_rebinds_on_reload,
    takeover_hands_each_shared_socket_once,
);

/// Listeners per config in [`shared_socket_serves_on_every_worker`].
const LISTENERS: usize = 20;

/// Two workers, an admin endpoint, and one echo listener per port in `ns`, each
/// with `shards` (a TOML value, e.g. `"\"by-worker\""` or `"1"`).
fn cfg(ns: &TempNetns, admin: u16, ports: &[u16], shards: &str) -> String {
    let mut c = format!("[runtime]\nworkers = 2\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n");
    for (i, p) in ports.iter().enumerate() {
        c += &format!(
            "[[listener]]\nname = \"e{i}\"\nnetns = \"{}\"\nlisten = \"127.0.0.1:{p}\"\n\
             action = \"echo\"\nbacklog = 1024\nshards = {shards}\n",
            ns.path().display()
        );
    }
    c
}

/// `ringress_worker_sessions` of each worker, by worker index.
fn worker_sessions(admin: SocketAddr) -> Vec<f64> {
    let s = metrics(admin);
    let mut v: Vec<(usize, f64)> = s
        .samples
        .iter()
        .filter(|x| x.metric == "ringress_worker_sessions")
        .map(|x| {
            let w = x.labels.get("worker").unwrap().parse().unwrap();
            let n = match x.value {
                prometheus_parse::Value::Gauge(n) | prometheus_parse::Value::Untyped(n) => n,
                _ => f64::NAN,
            };
            (w, n)
        })
        .collect();
    v.sort_by_key(|x| x.0);
    v.into_iter().map(|x| x.1).collect()
}

/// One echo exchange on `s` (left open): `data` out, the same back.
fn echo_open(s: &mut TcpStream, data: &[u8]) {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(data).unwrap();
    let mut back = vec![0; data.len()];
    s.read_exact(&mut back).unwrap();
    assert_eq!(back, data);
}

/// With `shards = 1` and two workers: the process holds exactly one fd per
/// listener fewer than with `"by-worker"`; under load (16 clients holding 4
/// connections each), both workers have sessions open; every listener echoes.
fn shared_socket_serves_on_every_worker(driver: &str) {
    let ns = Arc::new(netns(&format!("shw-{driver}")));
    let admin = free_port();
    // Distinct ports (free_port may say the same twice).
    let mut ports: Vec<u16> = Vec::new();
    while ports.len() < LISTENERS {
        let p = free_port();
        if !ports.contains(&p) {
            ports.push(p);
        }
    }
    let by_worker = Ringress::start(
        &format!("shw-bw-{driver}"),
        driver,
        &cfg(&ns, admin, &ports, "\"by-worker\""),
    );
    let fds_by_worker = by_worker.settled_fds();
    let kinds_by_worker = by_worker.fd_kinds();
    assert!(by_worker.stop().success());

    let r = Ringress::start(
        &format!("shw-{driver}"),
        driver,
        &cfg(&ns, admin, &ports, "1"),
    );
    let fds = r.settled_fds();
    assert_eq!(
        fds_by_worker - fds,
        LISTENERS,
        "fds with one socket per worker: {fds_by_worker} {kinds_by_worker}; \
         with shards = 1: {fds} {}",
        r.fd_kinds()
    );
    assert_eq!(r.threads(), 2 + 2, "workers + 2 threads");

    let addr = SocketAddr::from(([127, 0, 0, 1], ports[0]));
    let admin = SocketAddr::from(([127, 0, 0, 1], admin));
    let clients: Vec<_> = (0..16)
        .map(|t| {
            let ns = ns.clone();
            std::thread::spawn(move || {
                let mut held = Vec::new();
                for i in 0..4 {
                    let mut s = connect_in(Some(&ns), addr).unwrap();
                    echo_open(&mut s, &payload(1000, t * 10 + i));
                    held.push(s);
                }
                held
            })
        })
        .collect();
    let held: Vec<TcpStream> = clients
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    let per_worker = worker_sessions(admin);
    assert_eq!(per_worker.len(), 2, "{per_worker:?}");
    assert_eq!(
        per_worker.iter().sum::<f64>(),
        held.len() as f64,
        "{per_worker:?}"
    );
    assert!(
        per_worker.iter().all(|&n| n > 0.0),
        "connections of a shared socket landed on one worker only: {per_worker:?}"
    );
    drop(held);

    // Every listener serves.
    for (i, p) in ports.iter().enumerate() {
        let a = SocketAddr::from(([127, 0, 0, 1], *p));
        let data = payload(64 * 1024, i as u64);
        let back = echo_roundtrip(connect_in(Some(&ns), a).unwrap(), &data);
        assert!(back == data, "listener e{i}: echo differs");
    }
    let log = r.stderr();
    // One line each for the first 16, then one line for them all.
    assert_eq!(log.matches("listener bound").count(), 16, "{log}");
    assert!(
        log.contains(&format!("listeners={LISTENERS} more={}", LISTENERS - 16)),
        "{log}"
    );
    assert!(r.stop().success());
}

/// Clients echo on a listener while reloads switch its `shards` from
/// "by-worker" to 1 and back: each switch binds it anew ("listener bound" again,
/// the old sockets drain) with the new socket count, no exchange fails, and its
/// accepted counter goes on.
fn shards_change_rebinds_on_reload(driver: &str) {
    let ns = Arc::new(netns(&format!("shr-{driver}")));
    let (admin, port) = (free_port(), free_port());
    let r = Ringress::start(
        &format!("shr-{driver}"),
        driver,
        &cfg(&ns, admin, &[port], "\"by-worker\""),
    );
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let admin_addr = SocketAddr::from(([127, 0, 0, 1], admin));
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let clients: Vec<_> = (0..8)
        .map(|t| {
            let (ns, stop, ok, failed) = (ns.clone(), stop.clone(), ok.clone(), failed.clone());
            std::thread::spawn(move || {
                let mut errors = Vec::new();
                let mut i = 0;
                while !stop.load(Relaxed) {
                    i += 1;
                    let data = payload(512, t * 100_000 + i);
                    let r = connect_in(Some(&ns), addr).and_then(|mut s| {
                        s.set_read_timeout(Some(Duration::from_secs(5)))?;
                        s.write_all(&data)?;
                        s.shutdown(std::net::Shutdown::Write)?;
                        let mut back = Vec::new();
                        s.read_to_end(&mut back)?;
                        Ok(back)
                    });
                    match r {
                        Ok(back) if back == data => ok.fetch_add(1, Relaxed),
                        other => {
                            if errors.len() < 5 {
                                errors.push(format!("{:?}", other.map(|b| b.len())));
                            }
                            failed.fetch_add(1, Relaxed)
                        }
                    };
                }
                errors
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut accepted = 0.0;
    for (n, shards) in ["1", "\"by-worker\""].iter().enumerate() {
        let before = scrape(
            admin_addr,
            "ringress_listener_connections_accepted_total",
            "e0",
            None,
        );
        assert!(
            before >= accepted,
            "counter went back: {before} < {accepted}"
        );
        std::fs::write(r.config_path(), cfg(&ns, admin, &[port], shards)).unwrap();
        r.signal(libc::SIGHUP);
        r.wait_log("config reloaded", n + 1, 10);
        r.wait_log("listener bound", n + 2, 10);
        // The old sockets' drain (500 ms) ends and SYNs they dropped are retried.
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_millis(1500) {
            std::thread::sleep(Duration::from_millis(100));
        }
        accepted = scrape(
            admin_addr,
            "ringress_listener_connections_accepted_total",
            "e0",
            None,
        );
        assert!(accepted >= before, "counter reset: {accepted} < {before}");
        // Bound with the new socket count (fds are compared without load in
        // shared_socket_serves_on_every_worker).
        let sockets = if *shards == "1" { 1 } else { 2 };
        let log = r.stderr();
        let line = log.lines().rfind(|l| l.contains("listener bound"));
        assert!(
            line.is_some_and(|l| l.contains(&format!("sockets={sockets}"))),
            "{log}"
        );
    }
    stop.store(true, Relaxed);
    let errors: Vec<String> = clients
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    let (ok, failed) = (ok.load(Relaxed), failed.load(Relaxed));
    assert_eq!(
        failed, 0,
        "{ok} exchanges fine, {failed} failed: {errors:?}"
    );
    assert!(ok > 100, "too little load to tell: {ok}");
    let log = r.stderr();
    assert_eq!(log.matches("listener bound").count(), 3, "{log}");
    assert!(r.stop().success());
}

/// A takeover from a process whose listener has `shards = 1` (two workers, one
/// fd) offers that socket once: a new process with `shards = 1` takes it and
/// binds nothing; the next one, with "by-worker", takes it and binds one more.
/// Echo works through each, and each old process exits 0.
fn takeover_hands_each_shared_socket_once(driver: &str) {
    let ns = netns(&format!("sht-{driver}"));
    let dir = TempDir::new(&format!("sht-{driver}"));
    let sock = dir.0.join("takeover.sock");
    let port = free_port();
    let config = |shards: &str| {
        format!(
            "[runtime]\nworkers = 2\ntakeover_socket = \"{}\"\n\
             [[listener]]\nname = \"e\"\nnetns = \"{}\"\nlisten = \"127.0.0.1:{port}\"\n\
             action = \"echo\"\nshards = {shards}\n",
            sock.display(),
            ns.path().display()
        )
    };
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let data = payload(4000, 3);
    let mut old = Ringress::start(&format!("sht0-{driver}"), driver, &config("1"));
    assert_eq!(
        echo_roundtrip(connect_in(Some(&ns), addr).unwrap(), &data),
        data
    );
    for (i, (shards, bound)) in [("1", 0), ("\"by-worker\"", 1)].iter().enumerate() {
        let new = Ringress::start_takeover(
            &format!("sht{}-{driver}", i + 1),
            driver,
            &config(shards),
            &sock,
        );
        let st = old.wait_exit(20);
        assert!(
            st.success(),
            "old process exited with {st}:\n{}",
            old.stderr()
        );
        let log = new.stderr();
        assert!(
            log.contains(&format!("taken=1 bound={bound}")),
            "shards = {shards}: {log}"
        );
        assert_eq!(
            echo_roundtrip(connect_in(Some(&ns), addr).unwrap(), &data),
            data
        );
        old = new;
    }
    assert!(old.stop().success());
}
