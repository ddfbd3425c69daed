//! Honest health, on both drivers: `/healthz` answers within 100 ms however many
//! idle admin connections there are, answers at the process's fd limit, and says
//! 503 when a worker or the binder is not alive and responsive; a worker or
//! binder that dies makes the process exit non-zero. The failures are made with
//! hooks of debug builds only (`RINGRESS_TEST_WORKER_PANIC`,
//! `RINGRESS_TEST_BINDER`), which the tests' binary is.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;

both_drivers!(
    idle_admin_connections_do_not_block_healthz,
    healthz_answers_at_the_fd_limit,
    healthz_is_retried_when_fds_come_back,
    worker_panic_exits_nonzero_and_healthz_says_503,
    stuck_binder_makes_healthz_503_and_binder_panic_exits_nonzero,
);

fn config(admin: u16, port: u16, extra: &str) -> String {
    format!(
        "[runtime]\nworkers = 2\nshutdown_timeout_ms = 1000\n{extra}[admin]\n\
         listen = \"127.0.0.1:{admin}\"\n[[listener]]\nname = \"e\"\n\
         listen = \"127.0.0.1:{port}\"\naction = \"echo\"\n"
    )
}

/// `GET /healthz` at `addr`: (status, body, time from connect to the answer).
/// `None` if there is no answer within `wait`.
fn healthz(addr: SocketAddr, wait: Duration) -> Option<(u16, String, Duration)> {
    let t0 = Instant::now();
    let mut s = TcpStream::connect_timeout(&addr, wait).ok()?;
    s.set_read_timeout(Some(wait)).unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .ok()?;
    let mut all = Vec::new();
    s.read_to_end(&mut all).ok()?;
    let all = String::from_utf8(all).ok()?;
    let status = all.get(9..12)?.parse().ok()?;
    let body = all.split_once("\r\n\r\n")?.1.to_string();
    Some((status, body, t0.elapsed()))
}

/// `n` idle connections to `addr` (nothing sent).
fn idle_clients(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    (0..n)
        .filter_map(|_| TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok())
        .collect()
}

fn idle_admin_connections_do_not_block_healthz(driver: &str) {
    let _ = ringress::procstat::raise_nofile_limit();
    let (admin, port) = (free_port(), free_port());
    let r = Ringress::start(
        &format!("hz-idle-{driver}"),
        driver,
        &config(admin, port, ""),
    );
    let addr = SocketAddr::from(([127, 0, 0, 1], admin));
    for n in [64, 2000] {
        let idle = idle_clients(addr, n);
        assert_eq!(idle.len(), n);
        std::thread::sleep(Duration::from_millis(200));
        // Best of three: the answer itself must not wait on the idle clients.
        let best = (0..3)
            .map(|_| {
                let (code, body, took) =
                    healthz(addr, Duration::from_secs(10)).expect("no /healthz answer");
                assert_eq!((code, body.as_str()), (200, "ok\n"));
                took
            })
            .min()
            .unwrap();
        assert!(
            best < Duration::from_millis(100),
            "{n} idle admin connections: /healthz took {best:?}"
        );
        drop(idle);
    }
    assert!(r.stop().success());
}

fn healthz_answers_at_the_fd_limit(driver: &str) {
    let (admin, port) = (free_port(), free_port());
    let r = Ringress::start_limited(
        &format!("hz-fds-{driver}"),
        driver,
        &config(admin, port, ""),
        Some(64),
    );
    let addr = SocketAddr::from(([127, 0, 0, 1], admin));
    // More idle admin clients than the server has fds: it reaches its limit.
    let idle = idle_clients(addr, 100);
    let deadline = Instant::now() + Duration::from_secs(10);
    // 63 or 64 of 64: at EMFILE the admin endpoint evicts an idle client, so the
    // count can hover one below the limit.
    while r.fds() < 63 {
        assert!(
            Instant::now() < deadline,
            "{} fds: {}",
            r.fds(),
            r.fd_kinds()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // A health check sent meanwhile is answered, at the latest once the idle
    // clients leave.
    let (code, body, _) = std::thread::scope(|s| {
        let h = s.spawn(|| healthz(addr, Duration::from_secs(10)));
        std::thread::sleep(Duration::from_millis(300));
        drop(idle);
        h.join().unwrap()
    })
    .expect("/healthz sent at the fd limit was not answered");
    assert_eq!((code, body.as_str()), (200, "ok\n"));
    // And the server serves as before.
    let a = SocketAddr::from(([127, 0, 0, 1], port));
    assert_eq!(echo_roundtrip(connect_in(None, a).unwrap(), b"fd"), b"fd");
    let (code, _, _) = healthz(addr, Duration::from_secs(5)).unwrap();
    assert_eq!(code, 200);
    assert!(r.stop().success());
}

/// The process's fds taken by UDP proxy sessions (one upstream socket per client
/// address), no admin connection to evict: the admin accept fails with EMFILE and
/// is retried until the sessions expire, and the `/healthz` that waited in the
/// queue meanwhile is answered (nothing else connects to wake the listener).
fn healthz_is_retried_when_fds_come_back(driver: &str) {
    let (admin, port) = (free_port(), free_port());
    let upstream = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let up = upstream.local_addr().unwrap();
    let extra = format!(
        "[[listener]]\nname = \"u\"\nproto = \"udp\"\nlisten = \"127.0.0.1:{port}\"\n\
         action = \"proxy\"\nupstream = \"{up}\"\nsession_idle_timeout_ms = 2000\n"
    );
    let cfg = format!(
        "[runtime]\nworkers = 1\nshutdown_timeout_ms = 1000\n[admin]\n\
         listen = \"127.0.0.1:{admin}\"\n{extra}"
    );
    // ringress's fd budget would keep UDP sessions from taking every fd: turned
    // off (debug builds) to run the process out of fds as something outside the
    // budget could.
    let r = Ringress::start_with(
        &format!("hz-retry-{driver}"),
        driver,
        &cfg,
        Some(64),
        &[("RINGRESS_TEST_FD_BUDGET", "off")],
    );
    let addr = SocketAddr::from(([127, 0, 0, 1], admin));
    let target = SocketAddr::from(([127, 0, 0, 1], port));
    let clients: Vec<std::net::UdpSocket> = (0..100)
        .map(|_| {
            let c = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            c.send_to(b"x", target).unwrap();
            c
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while r.fds() < 64 {
        assert!(
            Instant::now() < deadline,
            "{} fds: {}",
            r.fds(),
            r.fd_kinds()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let t0 = Instant::now();
    let answer = std::thread::scope(|s| {
        let h = s.spawn(|| healthz(addr, Duration::from_secs(15)));
        r.wait_log("admin endpoint cannot accept (out of fds)", 1, 5);
        h.join().unwrap()
    });
    let (code, body, _) = answer.expect("/healthz sent at the fd limit was not answered");
    assert_eq!((code, body.as_str()), (200, "ok\n"));
    // Answered once the sessions expired (2 s idle), not before.
    assert!(
        t0.elapsed() >= Duration::from_millis(500),
        "{:?}",
        t0.elapsed()
    );
    drop(clients);
    assert!(r.stop().success());
}

fn worker_panic_exits_nonzero_and_healthz_says_503(driver: &str) {
    let (admin, port) = (free_port(), free_port());
    let mut r = Ringress::start_with(
        &format!("hz-panic-{driver}"),
        driver,
        &config(admin, port, ""),
        None,
        &[("RINGRESS_TEST_WORKER_PANIC", "1:1500")],
    );
    let addr = SocketAddr::from(([127, 0, 0, 1], admin));
    // Until the process is gone, /healthz says 200 before the panic and 503 after.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut answers = (0, 0);
    while r.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "still running:\n{}", r.stderr());
        let panicked = r.stderr().contains("worker panicked");
        if let Some((code, body, _)) = healthz(addr, Duration::from_millis(500)) {
            if panicked {
                assert_eq!(code, 503, "{body}");
                assert!(body.contains("worker 1 stopped"), "{body}");
                answers.1 += 1;
            } else if code == 200 {
                answers.0 += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(answers.0 > 0, "no /healthz answer before the panic");
    let st = r.wait_exit(1);
    assert_eq!(st.code(), Some(1), "{st}:\n{}", r.stderr());
    assert!(r.stderr().contains("worker panicked"), "{}", r.stderr());
}

fn stuck_binder_makes_healthz_503_and_binder_panic_exits_nonzero(driver: &str) {
    let (admin, port) = (free_port(), free_port());
    let addr = SocketAddr::from(([127, 0, 0, 1], admin));
    // Stuck for 4 s from 0.5 s on: 503 naming the binder once its heartbeat is
    // 2 s old, 200 again once it answers.
    let r = Ringress::start_with(
        &format!("hz-stall-{driver}"),
        driver,
        &config(admin, port, ""),
        None,
        &[("RINGRESS_TEST_BINDER", "stall:500:4000")],
    );
    let t0 = Instant::now();
    let mut saw_503 = false;
    loop {
        let (code, body, _) = healthz(addr, Duration::from_secs(5)).expect("no answer");
        if code == 503 {
            assert!(body.contains("binder not responsive"), "{body}");
            saw_503 = true;
        } else if saw_503 {
            assert_eq!((code, body.as_str()), (200, "ok\n"));
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(15), "saw 503: {saw_503}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(r.stop().success());

    let mut r = Ringress::start_with(
        &format!("hz-bpanic-{driver}"),
        driver,
        &config(admin, port, ""),
        None,
        &[("RINGRESS_TEST_BINDER", "panic:300")],
    );
    let st = r.wait_exit(10);
    assert_eq!(st.code(), Some(1), "{st}:\n{}", r.stderr());
    assert!(
        r.stderr().contains("binder thread panicked"),
        "{}",
        r.stderr()
    );
}
