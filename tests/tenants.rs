//! One tenant cannot take the others down, on both drivers: a namespace that
//! holds thousands of idle connections is held to its share of ringress's own fd
//! budget, while another namespace's listener, the admin endpoint and reload go on;
//! a listener's `max_connections` holds it at its cap without resetting anyone.

mod common;

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use common::*;
use ringress::binder::SocketSpec;

both_drivers!(
    idle_flood_in_one_namespace_leaves_the_others_served,
    listener_cap_holds_the_backlog_and_resumes,
    idle_echo_is_closed_by_its_timeout_and_defaults_show,
    refused_upstream_storm_is_counted_not_logged_per_connection,
);

/// `n` TCP client sockets in `ns`, each connecting (non-blocking) to `addr`;
/// they stay open (idle) until dropped.
fn idle_clients(ns: &TempNetns, addr: SocketAddr, n: usize) -> Vec<OwnedFd> {
    let fds = binder()
        .create(
            "idle-flood",
            Some(&ns.path()),
            ns.name(),
            SocketSpec::TcpClients {
                family_of: addr,
                count: n,
            },
        )
        .unwrap_or_else(|e| panic!("{e}"));
    let sa = socket2::SockAddr::from(addr);
    for fd in &fds {
        // SAFETY: connect(2) on a socket we own with a valid sockaddr; it is
        // non-blocking, so EINPROGRESS is the normal answer.
        let r = unsafe { libc::connect(fd.as_raw_fd(), sa.as_ptr().cast(), sa.len()) };
        let e = std::io::Error::last_os_error().raw_os_error();
        assert!(r == 0 || e == Some(libc::EINPROGRESS), "connect: {e:?}");
    }
    fds
}

/// Tenant A holds 5,000 idle connections against its echo listener while the
/// server's fd limit is 2,048: ringress stays within its budget (A gets its
/// namespace's share), tenant B completes 1,000 echo round trips, /healthz
/// answers, a reload succeeds, fewer than 50 log lines are written meanwhile, and
/// once A's clients leave the fds return to where they were.
fn idle_flood_in_one_namespace_leaves_the_others_served(driver: &str) {
    let (a, b) = (
        netns(&format!("tna-{driver}")),
        netns(&format!("tnb-{driver}")),
    );
    let (pa, pb, admin) = (free_port(), free_port(), free_port());
    let cfg = format!(
        "[runtime]\nworkers = 2\nshutdown_timeout_ms = 1000\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n\
         [[listener]]\nname = \"a\"\nnetns = \"{}\"\nlisten = \"127.0.0.1:{pa}\"\naction = \"echo\"\n\
         backlog = 1024\n\
         [[listener]]\nname = \"b\"\nnetns = \"{}\"\nlisten = \"127.0.0.1:{pb}\"\naction = \"echo\"\n",
        a.name(),
        b.name()
    );
    let r = Ringress::start_limited(&format!("tn-{driver}"), driver, &cfg, Some(2048));
    let admin = SocketAddr::from(([127, 0, 0, 1], admin));
    let baseline = r.settled_fds();
    let status = || {
        let (code, body) = Ringress::admin_get(admin, "/status");
        assert_eq!(code, 200);
        serde_json::from_str::<serde_json::Value>(&body).unwrap()
    };
    let v = status();
    let limit = v["fd_budget"]["limit"].as_u64().unwrap();
    let netns_limit = v["fd_budget"]["netns_limit"].as_u64().unwrap();
    assert!(limit > 1000 && limit < 2048, "{v}");
    assert_eq!(netns_limit, limit / 2, "{v}");

    let lines_before = r.stderr().lines().count();
    let t0 = Instant::now();
    let flood = idle_clients(&a, SocketAddr::from(([127, 0, 0, 1], pa)), 5000);
    // A fills its share.
    let deadline = Instant::now() + Duration::from_secs(10);
    while scrape(admin, "ringress_listener_connections_active", "a", None)
        < netns_limit as f64 - 2.0
    {
        assert!(
            Instant::now() < deadline,
            "A never reached its share:\n{}",
            r.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // B is served meanwhile.
    let bb = SocketAddr::from(([127, 0, 0, 1], pb));
    for i in 0..1000u32 {
        let s = connect_in(Some(&b), bb).unwrap();
        let msg = i.to_be_bytes();
        assert_eq!(echo_roundtrip(s, &msg), msg);
    }
    let t = Instant::now();
    let (code, _) = Ringress::admin_get(admin, "/healthz");
    assert_eq!(code, 200);
    assert!(t.elapsed() < Duration::from_millis(500));
    r.signal(libc::SIGHUP);
    r.wait_log("config reloaded", 1, 10);
    let v = status();
    let a_active = v["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == "a")
        .unwrap()["connections_active"]
        .as_u64()
        .unwrap();
    // At most a few past the share (accepts under way when the cap was hit).
    assert!(
        a_active <= netns_limit + 16,
        "{a_active} > {netns_limit}: {v}"
    );
    assert!(r.fds() < 2048 - 64, "{} fds", r.fds());
    assert!(scrape(admin, "ringress_listener_at_capacity", "a", None) >= 1.0);
    assert!(scrape(admin, "ringress_listener_capacity_pauses_total", "a", None) >= 1.0);
    // Stay 10 s in all, then count what was logged.
    std::thread::sleep(Duration::from_secs(10).saturating_sub(t0.elapsed()));
    let log = r.stderr();
    let lines = log.lines().count() - lines_before;
    assert!(lines < 50, "{lines} log lines in 10 s:\n{log}");
    drop(flood);
    let deadline = Instant::now() + Duration::from_secs(15);
    while r.settled_fds() > baseline + 2 {
        assert!(
            Instant::now() < deadline,
            "fds {} did not return to {baseline}:\n{}",
            r.fds(),
            r.fd_kinds()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(r.stop().success());
}

/// `max_connections = 20` on a listener: 30 clients connect; 20 are served at
/// once, the other 10 wait in the backlog (connected, not reset), and are served
/// as the first ones leave.
fn listener_cap_holds_the_backlog_and_resumes(driver: &str) {
    let (port, admin) = (free_port(), free_port());
    let cfg = format!(
        "[runtime]\nworkers = 2\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n\
         [[listener]]\nname = \"c\"\nlisten = \"127.0.0.1:{port}\"\naction = \"echo\"\n\
         max_connections = 20\n"
    );
    let r = Ringress::start(&format!("cap-{driver}"), driver, &cfg);
    let admin = SocketAddr::from(([127, 0, 0, 1], admin));
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    // An echo session lasts while its client is open.
    let held: Vec<std::net::TcpStream> = (0..30)
        .map(|_| connect_in(None, addr).expect("connect"))
        .collect();
    for mut s in &held {
        use std::io::Write;
        s.write_all(b"hi\n").unwrap();
    }
    let answered = |mut s: &std::net::TcpStream| {
        use std::io::Read;
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let mut b = [0u8; 3];
        matches!(s.read(&mut b), Ok(3))
    };
    std::thread::sleep(Duration::from_millis(300));
    let (served, mut waiting): (Vec<_>, Vec<_>) = held.into_iter().partition(|s| answered(s));
    // A few over the cap may be accepted by accepts already under way.
    assert!(
        (20..=24).contains(&served.len()),
        "{} served at once",
        served.len()
    );
    assert!(scrape(admin, "ringress_listener_at_capacity", "c", None) > 0.0);
    // The served ones leave; the rest are served from the backlog.
    drop(served);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut rest = 0;
    for s in &waiting {
        while !answered(s) {
            assert!(
                Instant::now() < deadline,
                "a queued client was never served"
            );
        }
        rest += 1;
    }
    assert!(rest >= 6, "{rest}");
    waiting.clear();
    let deadline = Instant::now() + Duration::from_secs(5);
    while scrape(admin, "ringress_listener_at_capacity", "c", None) > 0.0 {
        assert!(Instant::now() < deadline, "still at capacity");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(r.stop().success());
}

/// An echo client that never sends is closed by `idle_timeout_ms` (300 ms here)
/// with a clean EOF, not a reset, and counted; one that keeps talking is not.
/// Without the keys, /status shows the defaults of every action.
fn idle_echo_is_closed_by_its_timeout_and_defaults_show(driver: &str) {
    use std::io::{Read, Write};
    let (pe, pd, ph, admin) = (free_port(), free_port(), free_port(), free_port());
    let cfg = format!(
        "[runtime]\nworkers = 1\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n\
         [[listener]]\nname = \"e\"\nlisten = \"127.0.0.1:{pe}\"\naction = \"echo\"\n\
         idle_timeout_ms = 300\n\
         [[listener]]\nname = \"d\"\nlisten = \"127.0.0.1:{pd}\"\naction = \"echo\"\n\
         [[listener]]\nname = \"h\"\nlisten = \"127.0.0.1:{ph}\"\naction = \"http\"\n"
    );
    let r = Ringress::start(&format!("idle-{driver}"), driver, &cfg);
    let admin = SocketAddr::from(([127, 0, 0, 1], admin));
    let e = SocketAddr::from(([127, 0, 0, 1], pe));
    let t0 = Instant::now();
    let mut quiet = connect_in(None, e).unwrap();
    let mut talker = connect_in(None, e).unwrap();
    // The talker sends every 100 ms for 1 s and keeps getting its bytes back.
    for i in 0..10u8 {
        talker.write_all(&[i]).unwrap();
        let mut b = [0u8; 1];
        talker.read_exact(&mut b).unwrap();
        assert_eq!(b[0], i);
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut buf = [0u8; 16];
    // The quiet one was closed cleanly meanwhile: EOF, not ECONNRESET.
    let n = quiet.read(&mut buf).expect("a clean close, not a reset");
    assert_eq!(n, 0);
    assert!(t0.elapsed() >= Duration::from_millis(300));
    assert_eq!(
        scrape(admin, "ringress_listener_timeouts_total", "e", Some("idle")),
        1.0
    );
    let (code, body) = Ringress::admin_get(admin, "/status");
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let l = |name: &str| {
        v["listeners"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["name"] == name)
            .unwrap()
            .clone()
    };
    assert_eq!(l("e")["idle_timeout_ms"], 300);
    assert_eq!(l("d")["idle_timeout_ms"], 600_000);
    assert_eq!(l("h")["header_timeout_ms"], 10_000);
    assert_eq!(l("h")["keepalive_timeout_ms"], 75_000);
    assert_eq!(l("d")["max_connections"], 0);
    drop(talker);
    assert!(r.stop().success());
}

/// A client loops connect/close for 3 s against a proxy whose upstream refuses:
/// every connection is counted as an upstream failure, and the log holds a few
/// lines, not one per connection.
fn refused_upstream_storm_is_counted_not_logged_per_connection(driver: &str) {
    let (port, admin) = (free_port(), free_port());
    // A port nobody listens on: connects are refused.
    let refused = free_port();
    let cfg = format!(
        "[runtime]\nworkers = 2\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n\
         [[listener]]\nname = \"p\"\nlisten = \"127.0.0.1:{port}\"\naction = \"proxy\"\n\
         upstream = \"127.0.0.1:{refused}\"\n"
    );
    let r = Ringress::start(&format!("storm-{driver}"), driver, &cfg);
    let admin = SocketAddr::from(([127, 0, 0, 1], admin));
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let before = r.stderr().lines().count();
    let t0 = Instant::now();
    let mut n = 0u64;
    while t0.elapsed() < Duration::from_secs(3) && n < 200_000 {
        // The proxy resets the client once its upstream refused, sometimes before
        // connect(2) has returned here.
        match connect_in(None, addr) {
            Ok(mut s) => {
                let _ = read_until_end(&mut s);
            }
            Err(e) if e.raw_os_error() == Some(libc::ECONNRESET) => {}
            Err(e) => panic!("connect: {e}"),
        }
        n += 1;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let failures = || {
        ["upstream_refused", "upstream_error", "upstream_timeout"]
            .iter()
            .map(|k| scrape(admin, "ringress_listener_errors_total", "p", Some(k)))
            .sum::<f64>()
    };
    while failures() < n as f64 {
        assert!(
            Instant::now() < deadline,
            "{} failures for {n} connections",
            failures()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(failures(), n as f64);
    assert_eq!(
        scrape(
            admin,
            "ringress_listener_connections_accepted_total",
            "p",
            None
        ),
        n as f64
    );
    let log = r.stderr();
    let lines = log.lines().count() - before;
    assert!(n > 100, "too few connections to tell: {n}");
    assert!(lines < 20, "{lines} log lines for {n} connections:\n{log}");
    assert!(log.contains("upstream connect failed"), "{log}");
    assert!(r.stop().success());
}
