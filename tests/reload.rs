//! Reload under load, on both drivers: a listener whose namespace, protocol and
//! address stay keeps its sockets and accept queue (nothing queued is reset); a
//! removed listener refuses new clients but serves what it had queued.

mod common;

use std::io::Read;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

both_drivers!(
    settings_reload_under_load_resets_nothing,
    removed_listener_under_load_refuses_or_serves,
    udp_listener_keeps_its_socket_across_a_reload,
);

/// What one client connection saw.
#[derive(Debug, Default, Clone, Copy)]
struct Seen {
    /// Replies equal to one of the expected texts.
    full: u64,
    /// Connects refused (ECONNREFUSED).
    refused: u64,
    /// Resets (ECONNRESET on connect or read).
    reset: u64,
    /// Connections that ended with no byte.
    empty: u64,
    /// Anything else (a wrong text, a timeout, another error).
    other: u64,
}

impl Seen {
    fn add(&mut self, o: Seen) {
        self.full += o.full;
        self.refused += o.refused;
        self.reset += o.reset;
        self.empty += o.empty;
        self.other += o.other;
    }
}

/// One connection to `addr` in `ns`, read to EOF; the reply must be one of `texts`.
fn one_client(ns: &TempNetns, addr: SocketAddr, texts: &[&str], seen: &mut Seen) -> String {
    let mut s = match connect_in(Some(ns), addr) {
        Ok(s) => s,
        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
            seen.refused += 1;
            return String::new();
        }
        Err(e) if e.raw_os_error() == Some(libc::ECONNRESET) => {
            seen.reset += 1;
            return String::new();
        }
        Err(e) => {
            seen.other += 1;
            return format!("connect: {e}");
        }
    };
    let mut got = Vec::new();
    match s.read_to_end(&mut got) {
        Ok(_) if got.is_empty() => seen.empty += 1,
        Ok(_) if texts.iter().any(|t| t.as_bytes() == got) => seen.full += 1,
        Ok(_) => {
            seen.other += 1;
            return format!("unexpected reply {:?}", String::from_utf8_lossy(&got));
        }
        Err(e) if e.raw_os_error() == Some(libc::ECONNRESET) => seen.reset += 1,
        Err(e) => {
            seen.other += 1;
            return format!("read: {e}");
        }
    }
    String::new()
}

/// Runs `threads` clients against `addr` in `ns` until `stop` (and at most
/// `limit`), each connecting and reading to EOF in a loop; returns what they saw
/// and the first few odd outcomes.
fn load(
    ns: &Arc<TempNetns>,
    addr: SocketAddr,
    threads: usize,
    texts: &'static [&'static str],
    stop: &Arc<AtomicBool>,
    limit: Duration,
) -> Vec<std::thread::JoinHandle<(Seen, Vec<String>)>> {
    (0..threads)
        .map(|_| {
            let (ns, stop) = (ns.clone(), stop.clone());
            std::thread::spawn(move || {
                let t0 = Instant::now();
                let mut seen = Seen::default();
                let mut odd = Vec::new();
                while !stop.load(Relaxed) && t0.elapsed() < limit {
                    let o = one_client(&ns, addr, texts, &mut seen);
                    if !o.is_empty() && odd.len() < 5 {
                        odd.push(o);
                    }
                }
                (seen, odd)
            })
        })
        .collect()
}

fn collect(handles: Vec<std::thread::JoinHandle<(Seen, Vec<String>)>>) -> (Seen, Vec<String>) {
    let mut all = Seen::default();
    let mut odd = Vec::new();
    for h in handles {
        let (s, o) = h.join().unwrap();
        all.add(s);
        odd.extend(o);
    }
    (all, odd)
}

fn respond_cfg(ns: &TempNetns, port: u16, text: &str) -> String {
    format!(
        "[runtime]\nworkers = 4\n[[listener]]\nname = \"r\"\nnetns = \"{}\"\n\
         listen = \"127.0.0.1:{port}\"\naction = \"respond\"\nrespond = \"{text}\\n\"\n\
         backlog = 4096\n",
        ns.path().display()
    )
}

/// 32 clients connect and read to EOF while the respond text flips v1 <-> v2 by
/// SIGHUP every 0.25 s, 20 times: every connection gets "v1\n" or "v2\n", none is
/// reset or empty, and the sockets stay (the log says "updated", never "bound").
fn settings_reload_under_load_resets_nothing(driver: &str) {
    let ns = Arc::new(netns(&format!("rlq-{driver}")));
    let port = free_port();
    let r = Ringress::start(
        &format!("rlq-{driver}"),
        driver,
        &respond_cfg(&ns, port, "v1"),
    );
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let stop = Arc::new(AtomicBool::new(false));
    let clients = load(
        &ns,
        addr,
        32,
        &["v1\n", "v2\n"],
        &stop,
        Duration::from_secs(30),
    );
    for i in 0..20 {
        std::thread::sleep(Duration::from_millis(250));
        let text = if i % 2 == 0 { "v2" } else { "v1" };
        std::fs::write(r.config_path(), respond_cfg(&ns, port, text)).unwrap();
        r.signal(libc::SIGHUP);
        r.wait_log("config reloaded", i + 1, 10);
    }
    std::thread::sleep(Duration::from_millis(250));
    stop.store(true, Relaxed);
    let (seen, odd) = collect(clients);
    let log = r.stderr();
    assert!(
        seen.reset == 0 && seen.empty == 0 && seen.other == 0 && seen.refused == 0,
        "{seen:?} {odd:?}"
    );
    assert!(seen.full > 200, "too little load to tell: {seen:?}");
    assert_eq!(log.matches("listener updated").count(), 20, "{log}");
    assert_eq!(log.matches("listener bound").count(), 1, "{log}");
    // The last config says v1: a new client gets it.
    let mut s = Seen::default();
    assert_eq!(one_client(&ns, addr, &["v1\n"], &mut s), "");
    assert_eq!(s.full, 1, "{s:?}");
    assert!(r.stop().success());
}

/// Clients hammer listener "gone" while a reload removes it: each sees a full
/// reply or a refused connect, never a reset or an empty reply; afterwards the
/// port refuses.
fn removed_listener_under_load_refuses_or_serves(driver: &str) {
    let ns = Arc::new(netns(&format!("rlr-{driver}")));
    let (port, other) = (free_port(), free_port());
    let keep = format!(
        "[[listener]]\nname = \"keep\"\nnetns = \"{}\"\nlisten = \"127.0.0.1:{other}\"\n\
         action = \"echo\"\n",
        ns.path().display()
    );
    let cfg_a = respond_cfg(&ns, port, "v1").replace("name = \"r\"", "name = \"gone\"") + &keep;
    let cfg_b = format!("[runtime]\nworkers = 4\n{keep}");
    let r = Ringress::start(&format!("rlr-{driver}"), driver, &cfg_a);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let stop = Arc::new(AtomicBool::new(false));
    let clients = load(&ns, addr, 32, &["v1\n"], &stop, Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(500));
    std::fs::write(r.config_path(), &cfg_b).unwrap();
    r.signal(libc::SIGHUP);
    r.wait_log("config reloaded", 1, 10);
    // Long enough for the drain to end and dropped SYNs to be retried.
    std::thread::sleep(Duration::from_millis(2500));
    stop.store(true, Relaxed);
    let (seen, odd) = collect(clients);
    assert!(
        seen.reset == 0 && seen.empty == 0 && seen.other == 0,
        "{seen:?} {odd:?}\n{}",
        r.stderr()
    );
    assert!(seen.full > 50 && seen.refused > 0, "{seen:?}");
    let e = connect_in(Some(&ns), addr).expect_err("removed listener still accepts");
    assert_eq!(e.raw_os_error(), Some(libc::ECONNREFUSED), "{e}");
    let kept = SocketAddr::from(([127, 0, 0, 1], other));
    assert_eq!(
        echo_roundtrip(connect_in(Some(&ns), kept).unwrap(), b"k"),
        b"k"
    );
    assert!(r.stop().success());
}

/// A UDP echo listener that becomes a UDP proxy by reload keeps its socket: a
/// client socket that sent before the reload gets the upstream's answers after it
/// from the same address, and nothing was re-bound.
fn udp_listener_keeps_its_socket_across_a_reload(driver: &str) {
    let (port, up) = (free_port(), free_port());
    let upstream = std::net::UdpSocket::bind(("127.0.0.1", up)).unwrap();
    upstream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let serve = std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        let (n, from) = upstream.recv_from(&mut buf).unwrap();
        let mut reply = b"up:".to_vec();
        reply.extend_from_slice(&buf[..n]);
        upstream.send_to(&reply, from).unwrap();
    });
    let l = |action: &str| {
        format!(
            "[runtime]\nworkers = 2\n[[listener]]\nname = \"u\"\nproto = \"udp\"\n\
             listen = \"127.0.0.1:{port}\"\n{action}"
        )
    };
    let r = Ringress::start(&format!("rlu-{driver}"), driver, &l("action = \"echo\"\n"));
    let c = udp_in(None, SocketAddr::from(([127, 0, 0, 1], port)));
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let server = SocketAddr::from(([127, 0, 0, 1], port));
    c.send_to(b"a", server).unwrap();
    let mut buf = [0u8; 64];
    let (n, from) = c.recv_from(&mut buf).unwrap();
    assert_eq!((&buf[..n], from), (&b"a"[..], server));
    std::fs::write(
        r.config_path(),
        l(&format!(
            "action = \"proxy\"\nupstreams = [\"127.0.0.1:{up}\"]\n"
        )),
    )
    .unwrap();
    r.signal(libc::SIGHUP);
    r.wait_log("config reloaded", 1, 10);
    c.send_to(b"b", server).unwrap();
    let (n, from) = c.recv_from(&mut buf).unwrap();
    assert_eq!((&buf[..n], from), (&b"up:b"[..], server));
    serve.join().unwrap();
    let log = r.stderr();
    assert_eq!(log.matches("listener bound").count(), 1, "{log}");
    assert_eq!(log.matches("listener updated").count(), 1, "{log}");
    assert!(r.stop().success());
}
