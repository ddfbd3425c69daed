//! Binary upgrade by listener takeover (`[runtime] takeover_socket`, `ringress run
//! --takeover`), on both drivers: upgrades in a row under continuous TCP and UDP
//! traffic in three namespaces lose nothing; a missing takeover socket fails the
//! new process before it binds anything.

mod common;

use std::io::{ErrorKind, Write};
use std::net::{Shutdown, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;

both_drivers!(
    upgrades_under_load_lose_nothing,
    missing_takeover_socket_binds_nothing,
    hostile_peer_is_a_clear_error,
    failed_upgrade_leaves_the_old_process_serving,
);

/// Upgrades in a row.
const UPGRADES: usize = 10;
/// TCP echo and UDP echo ports, in every namespace.
const TCP_PORT: u16 = 7000;
const UDP_PORT: u16 = 7001;

/// What the clients saw.
#[derive(Default)]
struct Tally {
    tcp_ok: AtomicU64,
    refused: AtomicU64,
    reset: AtomicU64,
    corrupt: AtomicU64,
    other: AtomicU64,
    udp_ok: AtomicU64,
    udp_lost: AtomicU64,
    errors: Mutex<Vec<String>>,
}

impl Tally {
    fn failed(&self, e: &std::io::Error, what: &str) {
        let c = match e.kind() {
            ErrorKind::ConnectionRefused => &self.refused,
            ErrorKind::ConnectionReset | ErrorKind::BrokenPipe => &self.reset,
            _ => &self.other,
        };
        c.fetch_add(1, Relaxed);
        let mut v = self.errors.lock().unwrap();
        if v.len() < 20 {
            v.push(format!("{what}: {e}"));
        }
    }
}

fn config(workers: usize, ns: &[TempNetns], sock: &Path) -> String {
    let mut c = format!(
        "[runtime]\nworkers = {workers}\nshutdown_timeout_ms = 10000\n\
         takeover_socket = \"{}\"\n",
        sock.display()
    );
    for (i, n) in ns.iter().enumerate() {
        c += &format!(
            "[[listener]]\nname = \"t{i}\"\nnetns = \"{ns}\"\nlisten = \"127.0.0.1:{TCP_PORT}\"\n\
             action = \"echo\"\n\
             [[listener]]\nname = \"u{i}\"\nnetns = \"{ns}\"\nproto = \"udp\"\n\
             listen = \"127.0.0.1:{UDP_PORT}\"\naction = \"echo\"\n",
            ns = n.name()
        );
    }
    c
}

/// Connect, send, half-close, read the echo to EOF; until `stop`.
fn tcp_client(ns: &TempNetns, stop: &AtomicBool, t: &Tally) {
    let addr = SocketAddr::from(([127, 0, 0, 1], TCP_PORT));
    let mut seq = 0u64;
    while !stop.load(Relaxed) {
        seq += 1;
        let data = payload(4096, seq);
        let mut s = match connect_in(Some(ns), addr) {
            Ok(s) => s,
            Err(e) => {
                t.failed(&e, "connect");
                continue;
            }
        };
        if let Err(e) = s.write_all(&data) {
            t.failed(&e, "write");
            continue;
        }
        let _ = s.shutdown(Shutdown::Write);
        match read_until_end(&mut s) {
            (_, Some(e)) => t.failed(&e, "read"),
            (got, None) if got == data => {
                t.tcp_ok.fetch_add(1, Relaxed);
            }
            (got, None) => {
                t.corrupt.fetch_add(1, Relaxed);
                t.errors.lock().unwrap().push(format!(
                    "echo of {} bytes came back as {}",
                    data.len(),
                    got.len()
                ));
            }
        }
    }
}

/// One datagram at a time, each answered within 1 s or counted lost.
fn udp_client(ns: &TempNetns, stop: &AtomicBool, t: &Tally) {
    let addr = SocketAddr::from(([127, 0, 0, 1], UDP_PORT));
    let s = udp_in(Some(ns), addr);
    s.connect(addr).unwrap();
    let mut seq = 0u64;
    let mut buf = [0u8; 2048];
    while !stop.load(Relaxed) {
        seq += 1;
        let msg = payload(512, seq ^ 0x5eed);
        s.send(&msg).unwrap();
        let until = Instant::now() + Duration::from_secs(1);
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                t.udp_lost.fetch_add(1, Relaxed);
                break;
            }
            s.set_read_timeout(Some(left)).unwrap();
            match s.recv(&mut buf) {
                Ok(n) if buf[..n] == msg[..] => {
                    t.udp_ok.fetch_add(1, Relaxed);
                    break;
                }
                // A late answer to an earlier datagram: not this one.
                Ok(_) => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) => {
                    t.failed(&e, "udp recv");
                    break;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn upgrades_under_load_lose_nothing(driver: &str) {
    let tag = format!("up{}", &driver[..1]);
    let ns: Vec<TempNetns> = (0..3).map(|i| netns(&format!("{tag}{i}"))).collect();
    let dir = TempDir::new(&format!("upg-{driver}"));
    let sock = dir.0.join("run").join("takeover.sock");
    // Worker counts alternate 3, 2, 3, ...: a process with fewer workers than
    // sockets serves them all; one with more binds extra ones into the group.
    let workers = |i: usize| if i % 2 == 0 { 3 } else { 2 };
    let mut cur = Ringress::start(&format!("{tag}-0"), driver, &config(workers(0), &ns, &sock));
    let stop = AtomicBool::new(false);
    let tally = Tally::default();
    let deadline = Instant::now() + Duration::from_secs(240);
    std::thread::scope(|sc| {
        for n in &ns {
            sc.spawn(|| tcp_client(n, &stop, &tally));
            sc.spawn(|| udp_client(n, &stop, &tally));
        }
        let stop_on_panic = StopOnDrop(&stop);
        std::thread::sleep(Duration::from_millis(300));
        for i in 1..=UPGRADES {
            assert!(Instant::now() < deadline, "upgrade {i}: out of time");
            let before = tally.tcp_ok.load(Relaxed);
            let next = Ringress::start_takeover(
                &format!("{tag}-{i}"),
                driver,
                &config(workers(i), &ns, &sock),
                &sock,
            );
            let st = cur.wait_exit(20);
            assert!(
                st.success(),
                "upgrade {i}: the old process exited with {st}:\n{}",
                cur.stderr()
            );
            assert!(
                cur.stderr().contains("taken over by a new process"),
                "{}",
                cur.stderr()
            );
            cur = next;
            // Traffic flows through the new process before the next upgrade.
            let t0 = Instant::now();
            while tally.tcp_ok.load(Relaxed) < before + 20 && t0.elapsed() < Duration::from_secs(5)
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        drop(stop_on_panic);
    });
    let errors = tally.errors.lock().unwrap().join("\n");
    let (ok, udp_ok) = (tally.tcp_ok.load(Relaxed), tally.udp_ok.load(Relaxed));
    eprintln!("{UPGRADES} upgrades: {ok} TCP echoes, {udp_ok} UDP answers");
    assert_eq!(tally.refused.load(Relaxed), 0, "refused:\n{errors}");
    assert_eq!(tally.reset.load(Relaxed), 0, "reset:\n{errors}");
    assert_eq!(tally.corrupt.load(Relaxed), 0, "corrupt echoes:\n{errors}");
    assert_eq!(tally.other.load(Relaxed), 0, "other errors:\n{errors}");
    assert_eq!(
        tally.udp_lost.load(Relaxed),
        0,
        "UDP datagrams lost:\n{errors}"
    );
    assert!(
        ok > 100 && udp_ok > 100,
        "too little traffic: {ok} TCP, {udp_ok} UDP"
    );

    // The last process holds what a fresh start with its config holds.
    let last = workers(UPGRADES);
    let (threads, fds, kinds) = (cur.threads(), held_fds(&cur), cur.fd_kinds());
    assert!(cur.stop().success());
    assert!(!sock.exists(), "the takeover socket file is left behind");
    let fresh = Ringress::start(&format!("{tag}-fresh"), driver, &config(last, &ns, &sock));
    assert_eq!(
        threads,
        fresh.threads(),
        "threads after {UPGRADES} upgrades"
    );
    assert_eq!(
        fds,
        held_fds(&fresh),
        "fds after {UPGRADES} upgrades: {kinds}; fresh: {}",
        fresh.fd_kinds()
    );
    assert!(fresh.stop().success());
}

/// The server's open fds once settled, less the binder's cached namespace fds
/// (files under /run/netns): the binder opens those to bind, and closes them
/// after `NS_CACHE_IDLE` (30 s) unused, so a fresh start holds them for a while
/// and a process that took its sockets over (and bound nothing) does not.
fn held_fds(r: &Ringress) -> usize {
    let n = r.settled_fds();
    let cached = std::fs::read_dir(format!("/proc/{}/fd", r.pid()))
        .unwrap()
        .flatten()
        .filter(|e| {
            std::fs::read_link(e.path())
                .is_ok_and(|t| t.starts_with(ringress::netns::DEFAULT_NETNS_DIR))
        })
        .count();
    n - cached
}

/// Sets the flag when dropped (also when the test panics: the clients end).
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Relaxed);
    }
}

/// A temporary directory with a takeover socket path (not made) and the config
/// of a new process (one echo listener on a free port), for the failure cases.
fn new_process_files(tag: &str) -> (TempDir, std::path::PathBuf, std::path::PathBuf, u16) {
    let port = free_port();
    let dir = TempDir::new(tag);
    let sock = dir.0.join("takeover.sock");
    let cfg = dir.0.join("new.toml");
    std::fs::write(
        &cfg,
        format!("[[listener]]\nname = \"e\"\nlisten = \"127.0.0.1:{port}\"\naction = \"echo\"\n"),
    )
    .unwrap();
    (dir, sock, cfg, port)
}

fn missing_takeover_socket_binds_nothing(driver: &str) {
    let (dir, sock, cfg, port) = new_process_files(&format!("upg-miss-{driver}"));
    let (code, _, err) = ringress_cmd(&[
        "run",
        cfg.to_str().unwrap(),
        "--io",
        driver,
        "--takeover",
        sock.to_str().unwrap(),
    ]);
    assert_ne!(code, 0, "{err}");
    assert!(
        err.contains(sock.to_str().unwrap()) && err.contains("No such file or directory"),
        "the message names the path and errno: {err}"
    );
    assert!(err.contains("nothing was bound"), "{err}");
    // Nothing bound: the port is free.
    std::net::TcpListener::bind(("127.0.0.1", port)).expect("the port is free");

    // `check` shows the takeover socket.
    let with = dir.0.join("with.toml");
    std::fs::write(
        &with,
        format!(
            "[runtime]\ntakeover_socket = \"{}\"\n[[listener]]\nlisten = \"127.0.0.1:{port}\"\n\
             action = \"echo\"\n",
            sock.display()
        ),
    )
    .unwrap();
    let (code, out, err) = ringress_cmd(&["check", with.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!("takeover socket: {}", sock.display())),
        "{out}"
    );

    // A stale socket file (nobody listening) refuses: the same, ECONNREFUSED.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    let (code, _, err) = ringress_cmd(&[
        "run",
        cfg.to_str().unwrap(),
        "--io",
        driver,
        "--takeover",
        sock.to_str().unwrap(),
    ]);
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("Connection refused"), "{err}");
    std::net::TcpListener::bind(("127.0.0.1", port)).expect("the port is free");
}

fn hostile_peer_is_a_clear_error(driver: &str) {
    let (_dir, sock, cfg, port) = new_process_files(&format!("upg-bad-{driver}"));
    // A frame announcing 4 GiB, then one that is not JSON.
    let frames: [&[u8]; 2] = [b"\xff\xff\xff\xff", b"\x03\x00\x00\x00{x}"];
    for (frame, needle) in frames.into_iter().zip(["bytes announced", "bad JSON"]) {
        let _ = std::fs::remove_file(&sock);
        let l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let peer = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let _ = s.write_all(frame);
            // Hold the connection until the other side gives up.
            let _ = std::io::Read::read(&mut s, &mut [0u8; 1]);
        });
        let (code, _, err) = ringress_cmd(&[
            "run",
            cfg.to_str().unwrap(),
            "--io",
            driver,
            "--takeover",
            sock.to_str().unwrap(),
        ]);
        peer.join().unwrap();
        assert_eq!(code, 1, "{err}");
        assert!(
            err.contains("malformed message") && err.contains(needle),
            "{err}"
        );
        assert!(!err.contains("panicked"), "{err}");
        std::net::TcpListener::bind(("127.0.0.1", port)).expect("the port is free");
    }
}

fn failed_upgrade_leaves_the_old_process_serving(driver: &str) {
    let (port, busy) = (free_port(), free_port());
    let dir = TempDir::new(&format!("upg-fail-{driver}"));
    let sock = dir.0.join("takeover.sock");
    let base = format!(
        "[runtime]\nworkers = 2\ntakeover_socket = \"{}\"\n\
         [[listener]]\nname = \"e\"\nlisten = \"127.0.0.1:{port}\"\naction = \"echo\"\n",
        sock.display()
    );
    let old = Ringress::start(&format!("upf-{driver}"), driver, &base);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    // The new config also wants a port that is taken: the new process gets the
    // sockets, fails to bind, and exits; the old one never hears "stop".
    let _taken = std::net::TcpListener::bind(("127.0.0.1", busy)).unwrap();
    let bad = format!(
        "{base}[[listener]]\nname = \"b\"\nlisten = \"127.0.0.1:{busy}\"\naction = \"echo\"\n"
    );
    let bad_cfg = dir.0.join("bad.toml");
    std::fs::write(&bad_cfg, bad).unwrap();
    let (code, _, err) = ringress_cmd(&[
        "run",
        bad_cfg.to_str().unwrap(),
        "--io",
        driver,
        "--takeover",
        sock.to_str().unwrap(),
    ]);
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("Address already in use"), "{err}");
    old.wait_log("takeover abandoned; still serving", 1, 10);
    let data = payload(1000, 7);
    assert_eq!(echo_roundtrip(connect_in(None, addr).unwrap(), &data), data);
    // The takeover socket still answers: the next upgrade goes through.
    let mut old = old;
    let new = Ringress::start_takeover(&format!("upf2-{driver}"), driver, &base, &sock);
    assert!(old.wait_exit(15).success(), "{}", old.stderr());
    assert_eq!(echo_roundtrip(connect_in(None, addr).unwrap(), &data), data);
    assert!(new.stop().success());
}
