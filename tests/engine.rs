//! Driver parity: what the io_uring and epoll drivers must do alike, seen from
//! outside the process. Graceful shutdown of a proxy session (drained when it ends
//! in time, closed cleanly when it does not), and the blocking mode of every socket
//! a worker accepts or connects.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

#[cfg(feature = "uring")]
mod uring {
    #[test]
    fn shutdown_drains_an_active_proxy_session() {
        super::shutdown_drains_an_active_proxy_session("uring")
    }
    #[test]
    fn shutdown_timeout_closes_a_proxy_session_cleanly() {
        super::shutdown_timeout_closes_a_proxy_session_cleanly("uring")
    }
    #[test]
    fn accepted_sockets_are_non_blocking() {
        super::accepted_sockets_are_non_blocking("uring", &[])
    }
    /// The single-shot accept path, as on a kernel without multishot accept.
    #[test]
    fn accepted_sockets_are_non_blocking_without_multishot_accept() {
        super::accepted_sockets_are_non_blocking(
            "uring",
            &[("RINGRESS_URING_DISABLE", "multishot_accept")],
        )
    }
}

mod epoll {
    #[test]
    fn shutdown_drains_an_active_proxy_session() {
        super::shutdown_drains_an_active_proxy_session("epoll")
    }
    #[test]
    fn shutdown_timeout_closes_a_proxy_session_cleanly() {
        super::shutdown_timeout_closes_a_proxy_session_cleanly("epoll")
    }
    #[test]
    fn accepted_sockets_are_non_blocking() {
        super::accepted_sockets_are_non_blocking("epoll", &[])
    }
}

/// The proxy listener's address, inside the client namespace.
const LISTEN: &str = "127.0.0.1:7500";
/// The test upstream's address, inside the upstream namespace.
const UPSTREAM: &str = "127.0.0.1:8000";

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// A proxy listener in `cn` to [`UPSTREAM`] in `un`, with `shutdown_timeout_ms`.
fn proxy_cfg(cn: &TempNetns, un: &TempNetns, shutdown_timeout_ms: u64) -> String {
    format!(
        "[runtime]\nworkers = 2\nshutdown_timeout_ms = {shutdown_timeout_ms}\n\n\
         [[listener]]\nname = \"px\"\nnetns = \"{}\"\nlisten = \"{LISTEN}\"\naction = \"proxy\"\n\
         upstream = \"{UPSTREAM}\"\nupstream_netns = \"{}\"\n",
        cn.name(),
        un.name()
    )
}

/// Watches process `pid` (our child, not reaped until the test waits for it) and
/// records when it is first seen to have exited (a zombie, or gone).
struct ExitWatch {
    at: Arc<Mutex<Option<Instant>>>,
    stop: Arc<AtomicBool>,
}

impl ExitWatch {
    fn start(pid: u32) -> ExitWatch {
        let at = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let (a2, s2) = (at.clone(), stop.clone());
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(120);
            while !s2.load(Ordering::Relaxed) && Instant::now() < deadline {
                let exited = match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
                    // The state is the field after the parenthesised command name.
                    Ok(stat) => stat[stat.rfind(')').unwrap() + 2..].starts_with('Z'),
                    Err(_) => true,
                };
                if exited {
                    *a2.lock().unwrap() = Some(Instant::now());
                    return;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        ExitWatch { at, stop }
    }

    /// When the process exited, waiting up to `limit` for it to happen.
    fn wait(&self, limit: Duration) -> Option<Instant> {
        let deadline = Instant::now() + limit;
        loop {
            let at = *self.at.lock().unwrap();
            if at.is_some() || Instant::now() >= deadline {
                return at;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for ExitWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// SIGTERM arrives while a proxy session moves bytes both ways; a
/// `shutdown_timeout_ms` far away lets it finish. The client receives every byte
/// and then a clean EOF, the upstream every byte of the client, and the server
/// exits 0 only after the session ended (and soon after it).
fn shutdown_drains_an_active_proxy_session(driver: &str) {
    const CHUNKS: usize = 20;
    const PACE: Duration = Duration::from_millis(75);
    const UP_N: usize = 200_000;
    const DOWN_N: usize = 320_000;
    let cn = netns(&format!("drc-{driver}"));
    let un = netns(&format!("dru-{driver}"));
    let down = payload(DOWN_N, 31);
    let up = payload(UP_N, 32);
    // When the upstream starts sending its last bytes (after the client's FIN).
    let upstream_done: Arc<Mutex<Option<Instant>>> = Arc::default();
    let (tx, rx) = std::sync::mpsc::channel();
    let (down2, done2) = (down.clone(), upstream_done.clone());
    let _up = Upstream::spawn(Some(&un), addr(UPSTREAM), move |s| {
        // Read the client's bytes while answering slowly, in chunks.
        let mut r = s.try_clone().unwrap();
        let reader = std::thread::spawn(move || read_until_end(&mut r));
        let mut w = s;
        for c in down2.chunks(DOWN_N.div_ceil(CHUNKS)) {
            if w.write_all(c).is_err() {
                break;
            }
            std::thread::sleep(PACE);
        }
        // After the client's FIN: a trailer counting what arrived, then FIN.
        let (got, err) = reader.join().unwrap();
        // Taken before the trailer goes: the session cannot end before it.
        *done2.lock().unwrap() = Some(Instant::now());
        let _ = w.write_all(format!("got {}\n", got.len()).as_bytes());
        let _ = w.shutdown(Shutdown::Write);
        tx.send((got, err.map(|e| e.to_string()))).unwrap();
    });
    let mut r = Ringress::start(
        &format!("drain-{driver}"),
        driver,
        &proxy_cfg(&cn, &un, 20_000),
    );
    let watch = ExitWatch::start(r.pid());
    let s = connect_in(Some(&cn), addr(LISTEN)).unwrap();
    let mut w = s.try_clone().unwrap();
    let up2 = up.clone();
    let writer = std::thread::spawn(move || {
        for c in up2.chunks(UP_N.div_ceil(CHUNKS)) {
            w.write_all(c)?;
            std::thread::sleep(PACE);
        }
        w.shutdown(Shutdown::Write)
    });
    std::thread::sleep(Duration::from_millis(300));
    r.signal(libc::SIGTERM);
    r.wait_log("shutting down", 1, 5);
    let mut rd = s;
    let (got, err) = read_until_end(&mut rd);
    let eof_at = Instant::now();
    writer
        .join()
        .unwrap()
        .expect("the client's writes failed during the drain");
    assert!(
        err.is_none(),
        "the client's session ended with {err:?} after {} bytes, not a clean EOF",
        got.len()
    );
    let mut want = down.clone();
    want.extend_from_slice(format!("got {UP_N}\n").as_bytes());
    assert_eq!(got.len(), want.len(), "client received a different length");
    assert!(got == want, "bytes upstream→client differ");
    let (up_got, up_err) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(up_err, None);
    assert!(up_got == up, "bytes client→upstream differ");
    // Seen by the watch before the child is reaped (the exit time stays exact).
    let exited = watch.wait(Duration::from_secs(5));
    let status = r.wait_exit(1);
    assert!(status.success(), "exit status {status}");
    let done = upstream_done.lock().unwrap().expect("upstream not done");
    let exited = exited.expect("the server did not exit within 5 s of the session's end");
    assert!(
        exited > done,
        "the server exited {:?} before the upstream sent its last bytes",
        done.saturating_duration_since(exited)
    );
    assert!(
        exited.saturating_duration_since(eof_at) < Duration::from_secs(3),
        "the server exited {:?} after the session ended",
        exited.saturating_duration_since(eof_at)
    );
}

/// SIGTERM arrives while a proxy session stays open (the upstream keeps sending
/// slowly, forever) and `shutdown_timeout_ms` (500 ms) expires. The expected
/// behaviour on both drivers is the io_uring driver's: the session is closed, not
/// aborted, so the client reads a prefix of the stream and then a clean EOF (no
/// reset); the server exits 0 within the timeout + 2 s.
fn shutdown_timeout_closes_a_proxy_session_cleanly(driver: &str) {
    const TIMEOUT_MS: u64 = 500;
    const PIECE: usize = 100;
    let cn = netns(&format!("toc-{driver}"));
    let un = netns(&format!("tou-{driver}"));
    let stream = payload(1 << 20, 41);
    let s2 = stream.clone();
    let _up = Upstream::spawn(Some(&un), addr(UPSTREAM), move |mut s| {
        let mut hello = [0u8; 5];
        if s.read_exact(&mut hello).is_err() {
            return;
        }
        // Drip until the server closes (at most 30 s).
        let t0 = Instant::now();
        for c in s2.chunks(PIECE) {
            if s.write_all(c).is_err() || t0.elapsed() > Duration::from_secs(30) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let mut r = Ringress::start(
        &format!("tmo-{driver}"),
        driver,
        &proxy_cfg(&cn, &un, TIMEOUT_MS),
    );
    let mut s = connect_in(Some(&cn), addr(LISTEN)).unwrap();
    s.write_all(b"hello").unwrap();
    // The session is established and bytes flow.
    let mut first = vec![0u8; 3 * PIECE];
    s.read_exact(&mut first).unwrap();
    let t0 = Instant::now();
    r.signal(libc::SIGTERM);
    let (rest, err) = read_until_end(&mut s);
    let closed_after = t0.elapsed();
    let limit = Duration::from_millis(TIMEOUT_MS + 2000);
    let status = r.wait_exit(5);
    let exited_after = t0.elapsed();
    let mut got = first;
    got.extend_from_slice(&rest);
    assert!(
        got[..] == stream[..got.len()],
        "the client received bytes that are not a prefix of the upstream's stream"
    );
    assert!(
        err.is_none(),
        "{driver}: after the shutdown timeout the client saw {err:?} ({} bytes), \
         not a clean EOF",
        got.len()
    );
    assert!(
        closed_after >= Duration::from_millis(TIMEOUT_MS - 100),
        "the session was closed {closed_after:?} after SIGTERM, before shutdown_timeout_ms"
    );
    assert!(
        closed_after < limit,
        "the session was closed {closed_after:?} after SIGTERM (limit {limit:?})"
    );
    assert!(status.success(), "exit status {status}");
    // wait_exit polls every 20 ms.
    assert!(
        exited_after < limit + Duration::from_millis(100),
        "the server exited {exited_after:?} after SIGTERM (limit {limit:?})"
    );
}

/// One established TCP socket of a table: its local and remote port and inode.
#[derive(Debug, Clone, Copy)]
struct TcpEntry {
    local_port: u16,
    remote_port: u16,
    inode: u64,
}

/// The established entries of /proc/net/tcp and tcp6 as seen from `ns` (or the
/// root namespace): read on a thread that enters the namespace first.
fn established(ns: Option<&TempNetns>) -> Vec<TcpEntry> {
    let path = ns.map(|n| n.path());
    std::thread::spawn(move || {
        if let Some(p) = path {
            let f = std::fs::File::open(&p).unwrap();
            // SAFETY: setns(2) on this short-lived thread only, with an open
            // namespace file.
            let rc =
                unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {}", p.display());
        }
        let mut out = Vec::new();
        for table in ["tcp", "tcp6"] {
            let text = std::fs::read_to_string(format!("/proc/thread-self/net/{table}")).unwrap();
            for line in text.lines().skip(1) {
                let f: Vec<&str> = line.split_whitespace().collect();
                // sl local rem st tx:rx tr:when retrnsmt uid timeout inode ...
                if f.len() < 10 || f[3] != "01" {
                    continue;
                }
                let port =
                    |a: &str| u16::from_str_radix(a.rsplit(':').next().unwrap(), 16).unwrap();
                out.push(TcpEntry {
                    local_port: port(f[1]),
                    remote_port: port(f[2]),
                    inode: f[9].parse().unwrap(),
                });
            }
        }
        out
    })
    .join()
    .unwrap()
}

/// The socket fds of process `pid`, by socket inode.
fn socket_fds(pid: u32) -> HashMap<u64, u32> {
    let mut out = HashMap::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        let Ok(target) = std::fs::read_link(e.path()) else {
            continue;
        };
        let t = target.to_string_lossy();
        if let Some(inode) = t.strip_prefix("socket:[").and_then(|x| x.strip_suffix(']')) {
            let fd: u32 = e.file_name().to_string_lossy().parse().unwrap();
            out.insert(inode.parse().unwrap(), fd);
        }
    }
    out
}

/// The `flags:` of /proc/PID/fdinfo/FD (octal open flags).
fn fd_flags(pid: u32, fd: u32) -> u32 {
    let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).unwrap();
    let line = info
        .lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .expect("no flags: line");
    u32::from_str_radix(line.trim(), 8).unwrap()
}

/// Every socket a worker accepted (from an echo listener and two proxy
/// listeners) and every upstream socket it connected (made by socket(2) in the
/// root namespace, and taken from the binder's pool in a namespace) is
/// non-blocking (O_NONBLOCK in /proc/PID/fdinfo): a worker must never block in a
/// syscall, and io_uring punts a blocking socket's stalled op to an io-wq thread.
/// `env` goes to the server (on io_uring, `RINGRESS_URING_DISABLE=multishot_accept`
/// takes the single-shot accept path).
fn accepted_sockets_are_non_blocking(driver: &str, env: &[(&str, &str)]) {
    const CONNS: usize = 3;
    let single = !env.is_empty();
    let tag = if single { "s" } else { "m" };
    let cn = netns(&format!("nbc{tag}-{driver}"));
    let un = netns(&format!("nbu{tag}-{driver}"));
    let echo_back = |mut s: TcpStream| {
        let mut b = [0u8; 1];
        while s.read_exact(&mut b).is_ok() {
            if s.write_all(&b).is_err() {
                return;
            }
        }
    };
    let _up_ns = Upstream::spawn(Some(&un), addr(UPSTREAM), echo_back);
    // Port 0: the kernel picks one no other test holds.
    let up_root = Upstream::spawn(None, SocketAddr::from(([127, 0, 0, 1], 0)), echo_back);
    let root_up = up_root.addr.port();
    let (p_echo, p_px_ns, p_px_root) = (7501u16, 7502u16, 7503u16);
    let cfg = format!(
        "[runtime]\nworkers = 2\nshutdown_timeout_ms = 500\n\
         [[listener]]\nname = \"echo\"\nnetns = \"{c}\"\nlisten = \"127.0.0.1:{p_echo}\"\naction = \"echo\"\n\
         [[listener]]\nname = \"pxns\"\nnetns = \"{c}\"\nlisten = \"127.0.0.1:{p_px_ns}\"\naction = \"proxy\"\n\
         upstream = \"{UPSTREAM}\"\nupstream_netns = \"{u}\"\n\
         [[listener]]\nname = \"pxroot\"\nnetns = \"{c}\"\nlisten = \"127.0.0.1:{p_px_root}\"\naction = \"proxy\"\n\
         upstream = \"127.0.0.1:{root_up}\"\n",
        c = cn.name(),
        u = un.name()
    );
    let r = Ringress::start_with(&format!("nb{tag}-{driver}"), driver, &cfg, None, env);
    if single {
        // The probe, and so the workers, took the single-shot accept path.
        assert!(
            r.stderr().contains("multishot_accept=false"),
            "{}",
            r.stderr()
        );
    }
    // Keep every session open (one byte echoed end to end: upstreams connected).
    let mut clients = Vec::new();
    for port in [p_echo, p_px_ns, p_px_root] {
        for _ in 0..CONNS {
            let mut s = connect_in(Some(&cn), SocketAddr::from(([127, 0, 0, 1], port))).unwrap();
            s.write_all(b"x").unwrap();
            let mut b = [0u8; 1];
            s.read_exact(&mut b).unwrap();
            clients.push(s);
        }
    }
    let pid = r.pid();
    let fds = socket_fds(pid);
    let mut found: Vec<(String, u32)> = Vec::new();
    let mine = |e: &TcpEntry| fds.get(&e.inode).copied();
    for e in established(Some(&cn)) {
        if [p_echo, p_px_ns, p_px_root].contains(&e.local_port) {
            if let Some(fd) = mine(&e) {
                found.push((format!("accepted on port {}", e.local_port), fd));
            }
        }
    }
    for e in established(Some(&un)) {
        if e.remote_port == 8000 {
            if let Some(fd) = mine(&e) {
                found.push(("upstream from the namespace pool".into(), fd));
            }
        }
    }
    for e in established(None) {
        if e.remote_port == root_up {
            if let Some(fd) = mine(&e) {
                found.push(("upstream in the root namespace".into(), fd));
            }
        }
    }
    // Every session's sockets were found: 3 listeners' accepted, 2 proxies' upstream.
    assert_eq!(
        found.len(),
        5 * CONNS,
        "sockets found: {found:?}\n{}",
        r.fd_kinds()
    );
    let blocking: Vec<String> = found
        .iter()
        .map(|(what, fd)| (what, *fd, fd_flags(pid, *fd)))
        .filter(|(_, _, flags)| flags & libc::O_NONBLOCK as u32 == 0)
        .map(|(what, fd, flags)| format!("fd {fd} ({what}): flags {flags:o}"))
        .collect();
    assert!(
        blocking.is_empty(),
        "{driver}{}: blocking sockets in the server:\n{}",
        if single { " (single-shot accept)" } else { "" },
        blocking.join("\n")
    );
    drop(clients);
    assert!(r.stop().success());
}
