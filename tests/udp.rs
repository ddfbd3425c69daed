//! UDP listeners on both drivers: echo (sizes, families, namespaces), replies from
//! the address the client sent to, proxy sessions, limits, errors, truncation.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use common::*;

both_drivers!(
    echo_sizes_root_and_namespace_v4_v6,
    wildcard_replies_from_the_address_sent_to,
    proxy_sessions_keep_clients_apart_expire_and_are_limited,
    closed_upstream_port_is_counted_and_the_listener_goes_on,
    oversized_datagram_is_dropped_and_counted,
);

fn udp_listener(name: &str, netns: Option<&str>, listen: &str, rest: &str) -> String {
    let ns = netns.map_or(String::new(), |n| format!("netns = \"{n}\"\n"));
    format!("[[listener]]\nname = \"{name}\"\n{ns}proto = \"udp\"\nlisten = \"{listen}\"\n{rest}\n")
}

fn cfg(admin: Option<u16>, listeners: &str) -> String {
    let admin = admin.map_or(String::new(), |p| {
        format!("[admin]\nlisten = \"127.0.0.1:{p}\"\n")
    });
    format!("[runtime]\nworkers = 2\nshutdown_timeout_ms = 1000\n{admin}\n{listeners}")
}

/// Sends `data` from `s` to `to` and returns the reply (and its source).
fn ask(s: &UdpSocket, to: SocketAddr, data: &[u8]) -> std::io::Result<(Vec<u8>, SocketAddr)> {
    s.send_to(data, to)?;
    let mut buf = vec![0u8; 70_000];
    let (n, from) = s.recv_from(&mut buf)?;
    buf.truncate(n);
    Ok((buf, from))
}

fn echo_sizes_root_and_namespace_v4_v6(driver: &str) {
    let ns = netns(&format!("ue-{driver}"));
    let (p4, p6) = (free_port(), free_port());
    let l = udp_listener("r4", None, &format!("127.0.0.1:{p4}"), "action = \"echo\"")
        + &udp_listener("r6", None, &format!("[::1]:{p6}"), "action = \"echo\"")
        + &udp_listener("n4", Some(ns.name()), "127.0.0.1:7800", "action = \"echo\"")
        + &udp_listener("n6", Some(ns.name()), "[::1]:7801", "action = \"echo\"");
    let r = Ringress::start(&format!("ue-{driver}"), driver, &cfg(None, &l));
    let targets: [(Option<&TempNetns>, SocketAddr); 4] = [
        (None, SocketAddr::from(([127, 0, 0, 1], p4))),
        (None, format!("[::1]:{p6}").parse().unwrap()),
        (Some(&ns), "127.0.0.1:7800".parse().unwrap()),
        (Some(&ns), "[::1]:7801".parse().unwrap()),
    ];
    for (ns, to) in targets {
        let s = udp_in(ns, to);
        for size in [0usize, 1, 1472, 65_507] {
            let data = payload(size, size as u64 + 1);
            let (back, from) =
                ask(&s, to, &data).unwrap_or_else(|e| panic!("{to} size {size}: {e}"));
            assert_eq!(back.len(), size, "{to}: length");
            assert!(back == data, "{to}: {size}-byte datagram changed");
            assert_eq!(from, to, "reply from another address");
        }
    }
    assert!(r.stop().success());
}

fn wildcard_replies_from_the_address_sent_to(driver: &str) {
    let ns = netns(&format!("uw-{driver}"));
    let l = udp_listener("w", Some(ns.name()), "0.0.0.0:7810", "action = \"echo\"");
    let r = Ringress::start(&format!("uw-{driver}"), driver, &cfg(None, &l));
    // Two local addresses of the namespace; the client's source is 127.0.0.1 for
    // both, so without IP_PKTINFO the reply to 127.0.0.2 would leave from 127.0.0.1.
    for to in ["127.0.0.1:7810", "127.0.0.2:7810"] {
        let to: SocketAddr = to.parse().unwrap();
        let s = udp_in(Some(&ns), to);
        // A connected client drops datagrams from any other source.
        s.connect(to).unwrap();
        s.send(b"where from?").unwrap();
        let mut buf = [0u8; 64];
        let n = s
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("no reply from {to}: {e}"));
        assert_eq!(&buf[..n], b"where from?");
        let s2 = udp_in(Some(&ns), to);
        let (_, from) = ask(&s2, to, b"x").unwrap();
        assert_eq!(from, to, "reply source differs from the address sent to");
    }
    assert!(r.stop().success());
}

fn proxy_sessions_keep_clients_apart_expire_and_are_limited(driver: &str) {
    let inside_uml = std::env::var_os("INSIDE_UML").is_some();
    let (clients, per_client) = if inside_uml { (20, 50) } else { (100, 1000) };
    let front = netns(&format!("upf-{driver}"));
    let back = netns(&format!("upb-{driver}"));
    let admin = free_port();
    let l = udp_listener(
        "px",
        Some(front.name()),
        "127.0.0.1:7820",
        &format!(
            "action = \"proxy\"\nupstream = \"127.0.0.1:7821\"\nupstream_netns = \"{}\"\n\
             session_idle_timeout_ms = 1500",
            back.name()
        ),
    ) + &udp_listener(
        "lim",
        Some(front.name()),
        "127.0.0.1:7822",
        &format!(
            "action = \"proxy\"\nupstream = \"127.0.0.1:7821\"\nupstream_netns = \"{}\"\nmax_sessions = 5",
            back.name()
        ),
    ) + &udp_listener("echo", Some(back.name()), "127.0.0.1:7821", "action = \"echo\"");
    let r = Ringress::start(&format!("up-{driver}"), driver, &cfg(Some(admin), &l));
    let admin = SocketAddr::from(([127, 0, 0, 1], admin));
    let to: SocketAddr = "127.0.0.1:7820".parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let _sockets = std::thread::scope(|sc| {
        let front = &front;
        let handles: Vec<_> = (0..4)
            .map(|t| {
                sc.spawn(move || {
                    // Every client socket stays open to the end, so that no two
                    // clients share a source port (a reused port is the same client
                    // to a UDP server).
                    let mut keep = Vec::new();
                    for c in (t..clients).step_by(4) {
                        let s = udp_in(Some(front), to);
                        for i in 0..per_client {
                            assert!(Instant::now() < deadline, "too slow");
                            let msg = format!("client {c} datagram {i}");
                            // Loopback does not lose datagrams, but allow a retry.
                            let back = ask(&s, to, msg.as_bytes())
                                .or_else(|_| ask(&s, to, msg.as_bytes()))
                                .unwrap_or_else(|e| panic!("{msg}: {e}"));
                            assert_eq!(
                                back.0,
                                msg.as_bytes(),
                                "a reply crossed to the wrong client"
                            );
                        }
                        keep.push(s);
                    }
                    keep
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect::<Vec<UdpSocket>>()
    });
    // One session per client (a session counts as one accepted connection).
    assert_eq!(
        scrape(
            admin,
            "ringress_listener_connections_accepted_total",
            "px",
            None
        ),
        clients as f64,
        "one session per client"
    );
    assert!(scrape(admin, "ringress_listener_udp_sessions", "px", None) > 0.0);
    // Idle sessions expire after session_idle_timeout_ms (1.5 s).
    let t0 = Instant::now();
    while scrape(admin, "ringress_listener_udp_sessions", "px", None) > 0.0 {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "sessions did not expire"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // max_sessions = 5: the sixth client onwards gets nothing.
    let lim: SocketAddr = "127.0.0.1:7822".parse().unwrap();
    let mut answered = 0;
    let socks: Vec<UdpSocket> = (0..10).map(|_| udp_in(Some(&front), lim)).collect();
    for s in &socks {
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        if ask(s, lim, b"hi").is_ok() {
            answered += 1;
        }
    }
    assert_eq!(answered, 5, "max_sessions = 5 did not hold");
    assert_eq!(
        scrape(admin, "ringress_listener_udp_sessions", "lim", None),
        5.0
    );
    assert!(
        scrape(
            admin,
            "ringress_listener_errors_total",
            "lim",
            Some("session_limit")
        ) >= 5.0
    );
    assert!(r.stop().success());
}

fn closed_upstream_port_is_counted_and_the_listener_goes_on(driver: &str) {
    let front = netns(&format!("ucf-{driver}"));
    let back = netns(&format!("ucb-{driver}"));
    let admin = free_port();
    let l = udp_listener(
        "px",
        Some(front.name()),
        "127.0.0.1:7830",
        &format!(
            "action = \"proxy\"\nupstream = \"127.0.0.1:7831\"\nupstream_netns = \"{}\"",
            back.name()
        ),
    );
    let r = Ringress::start(&format!("uc-{driver}"), driver, &cfg(Some(admin), &l));
    let admin = SocketAddr::from(([127, 0, 0, 1], admin));
    let to: SocketAddr = "127.0.0.1:7830".parse().unwrap();
    let a = udp_in(Some(&front), to);
    a.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    // Nothing listens on the upstream port: no reply, ever.
    for _ in 0..3 {
        assert!(
            ask(&a, to, b"anyone?").is_err(),
            "a reply from a closed port"
        );
    }
    let t0 = Instant::now();
    while scrape(
        admin,
        "ringress_listener_errors_total",
        "px",
        Some("upstream_refused"),
    ) < 1.0
    {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "ICMP port unreachable not counted"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The upstream comes up: a new client is served through the same listener.
    let up = udp_in(Some(&back), "127.0.0.1:1".parse().unwrap());
    let up_fd = socket2::SockRef::from(&up);
    up_fd
        .bind(&"127.0.0.1:7831".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    let echo = std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        if let Ok((n, from)) = up.recv_from(&mut buf) {
            let _ = up.send_to(&buf[..n], from);
        }
    });
    let b = udp_in(Some(&front), to);
    let (back_msg, _) = ask(&b, to, b"now?").expect("the listener stopped serving");
    assert_eq!(back_msg, b"now?");
    echo.join().unwrap();
    assert!(r.stop().success());
}

fn oversized_datagram_is_dropped_and_counted(driver: &str) {
    let (port, admin) = (free_port(), free_port());
    let l = udp_listener(
        "small",
        None,
        &format!("127.0.0.1:{port}"),
        "action = \"echo\"\nmax_datagram_bytes = 1500",
    );
    let r = Ringress::start(&format!("ut-{driver}"), driver, &cfg(Some(admin), &l));
    let admin = SocketAddr::from(([127, 0, 0, 1], admin));
    let to = SocketAddr::from(([127, 0, 0, 1], port));
    let s = udp_in(None, to);
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    assert!(
        ask(&s, to, &payload(9000, 1)).is_err(),
        "a 9,000-byte datagram was forwarded"
    );
    assert_eq!(
        scrape(
            admin,
            "ringress_listener_errors_total",
            "small",
            Some("truncated_datagram")
        ),
        1.0
    );
    // Datagrams that fit still pass.
    assert_eq!(ask(&s, to, &payload(1500, 2)).unwrap().0, payload(1500, 2));
    assert!(r.stop().success());
}
