use std::io;

use super::*;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new("ringress.toml"))
}

/// Parses `text`, expects an error, and checks that its message starts with
/// `ringress.toml:LINE:` and mentions every string in `has`.
fn err(text: &str, line: usize, has: &[&str]) -> String {
    let e = match parse(text) {
        Ok(c) => panic!("expected an error, got {c:?}"),
        Err(e) => e,
    };
    let msg = e.to_string();
    let prefix = format!("ringress.toml:{line}: ");
    assert!(
        msg.starts_with(&prefix),
        "{msg:?} should start with {prefix:?}"
    );
    assert_eq!(e.line(), Some(line), "{msg}");
    for h in has {
        assert!(msg.contains(h), "{msg:?} should contain {h:?}");
    }
    assert!(!msg.contains('\n'), "{msg:?} should be one line");
    msg
}

const FULL: &str = r#"
netns_dir = "/tmp/netns"

[runtime]
workers = 3
io = "epoll"

[[listener]]
name = "alpha"
netns = "ns-alpha"
proto = "tcp"
listen = "[::]:8080"
action = "respond"
respond = "ack\n"
backlog = 128

[[listener]]
netns = "/proc/self/ns/net"
listen = "127.0.0.1:7000"
action = "http"

[[listener]]
listen = "127.0.0.1:7001"
action = "echo"
"#;

#[test]
fn full_config() {
    let c = parse(FULL).unwrap();
    assert_eq!(c.source, PathBuf::from("ringress.toml"));
    assert_eq!(c.netns_dir, PathBuf::from("/tmp/netns"));
    assert_eq!(
        c.runtime,
        Runtime {
            workers: 3,
            io: IoChoice::Epoll,
            shutdown_timeout_ms: DEFAULT_SHUTDOWN_TIMEOUT_MS,
            takeover_socket: None,
            max_connections: 0,
            fd_reserve: DEFAULT_FD_RESERVE,
            netns_fd_share: DEFAULT_NETNS_FD_SHARE,
            shards: Shards::ByWorker,
        }
    );
    assert_eq!(c.listeners.len(), 3);
    let a = &c.listeners[0];
    assert_eq!(a.name, "alpha");
    assert_eq!(a.netns, Some(NetnsRef::Named("ns-alpha".into())));
    assert_eq!(a.proto, Proto::Tcp);
    assert_eq!(a.listen, "[::]:8080".parse().unwrap());
    assert_eq!(a.action, Action::Respond(b"ack\n".to_vec()));
    assert_eq!(a.action.kind(), "respond");
    assert_eq!(a.backlog, 128);
    assert_eq!(a.line, 8);
    assert_eq!(a.netns_label(), "ns-alpha");
    assert_eq!(c.netns_path(a), Some(PathBuf::from("/tmp/netns/ns-alpha")));
    let b = &c.listeners[1];
    assert_eq!(b.name, "/proc/self/ns/net-tcp-127.0.0.1:7000");
    assert_eq!(b.action, Action::Http(crate::config::HttpConfig::default()));
    assert_eq!(b.line, 17);
    assert_eq!(c.netns_path(b), Some(PathBuf::from("/proc/self/ns/net")));
    let d = &c.listeners[2];
    assert_eq!(d.name, "root-tcp-127.0.0.1:7001");
    assert_eq!(d.netns_label(), "root");
    assert_eq!(c.netns_path(d), None);
    assert_eq!(d.action, Action::Echo);
    assert_eq!(d.line, 22);
}

#[test]
fn defaults() {
    let c = parse("[[listener]]\nnetns = \"ns-a\"\nlisten = \"[::]:8080\"\naction = \"echo\"\n")
        .unwrap();
    assert_eq!(c.netns_dir, PathBuf::from(DEFAULT_NETNS_DIR));
    assert_eq!(c.runtime.io, IoChoice::Auto);
    assert!(c.runtime.workers >= 1 && c.runtime.workers <= MAX_WORKERS);
    assert_eq!(c.runtime.workers, default_workers());
    let l = &c.listeners[0];
    assert_eq!(l.name, "ns-a-tcp-[::]:8080");
    assert_eq!(l.proto, Proto::Tcp);
    assert_eq!(l.backlog, DEFAULT_BACKLOG);
    assert_eq!(l.line, 1);
    assert_eq!(c.netns_path(l), Some(PathBuf::from("/run/netns/ns-a")));

    let c =
        parse("[runtime]\n[[listener]]\nlisten = \"127.0.0.1:7000\"\naction = \"http\"\n").unwrap();
    assert_eq!(c.listeners[0].name, "root-tcp-127.0.0.1:7000");
    assert_eq!(c.runtime.io, IoChoice::Auto);
}

#[test]
fn inline_listener_array() {
    let c = parse("listener = [\n  { listen = \"127.0.0.1:1\", action = \"echo\" },\n]\n").unwrap();
    assert_eq!(c.listeners[0].line, 2);
}

#[test]
fn io_choice_and_proto_strings() {
    for io in [IoChoice::Uring, IoChoice::Epoll, IoChoice::Auto] {
        assert_eq!(io.to_string().parse::<IoChoice>().unwrap(), io);
    }
    assert!("URING".parse::<IoChoice>().is_err());
    assert_eq!(Proto::Tcp.to_string(), "tcp");
    assert_eq!("sctp".parse::<Proto>().unwrap(), Proto::Sctp);
    assert!("SCTP".parse::<Proto>().unwrap_err().contains("\"sctp\""));
    assert_eq!("udp".parse::<Proto>().unwrap(), Proto::Udp);
    assert_eq!(Action::Echo.kind(), "echo");
    assert_eq!(Action::Http(Default::default()).kind(), "http");
}

#[test]
fn invalid_listen_address() {
    let text = "[[listener]]\naction = \"echo\"\n\n\nlisten = \"1.2.3:80\"\n";
    let m = err(
        text,
        5,
        &[
            "listener #1",
            "key `listen`",
            "invalid socket address \"1.2.3:80\"",
        ],
    );
    assert!(
        m.starts_with("ringress.toml:5: listener #1: key `listen`:"),
        "{m}"
    );
    // With an explicit name the name is used.
    err(
        "[[listener]]\nname = \"x\"\nlisten = \"nope\"\naction = \"echo\"\n",
        3,
        &["listener \"x\"", "key `listen`"],
    );
    // Missing listen points at the listener.
    err(
        "\n[[listener]]\naction = \"echo\"\n",
        2,
        &["listener #1", "key `listen`", "missing"],
    );
}

#[test]
fn respond_errors() {
    let text = "[[listener]]\nlisten = \"127.0.0.1:1\"\naction = \"echo\"\n\
                [[listener]]\nlisten = \"127.0.0.1:2\"\n\n\n\naction = \"respond\"\n";
    err(
        text,
        9,
        &[
            "key `respond`",
            "action \"respond\" needs a `respond` key",
            "root-tcp-127.0.0.1:2",
        ],
    );
    err(
        "[[listener]]\nlisten = \"127.0.0.1:1\"\naction = \"respond\"\nrespond = \"\"\n",
        4,
        &["key `respond`", "empty"],
    );
    // respond with another action.
    err(
        "[[listener]]\nname = \"e\"\nlisten = \"127.0.0.1:1\"\naction = \"echo\"\nrespond = \"hi\"\n",
        5,
        &["listener \"e\"", "key `respond`", "\"echo\""],
    );
}

#[test]
fn action_and_proto_errors() {
    err(
        "[[listener]]\nlisten = \"127.0.0.1:1\"\naction = \"proxy\"\n",
        3,
        &["key `upstream`", "needs `upstream"],
    );
    err(
        "[[listener]]\nlisten = \"127.0.0.1:1\"\naction = \"nope\"\n",
        3,
        &["key `action`", "unknown action"],
    );
    err(
        "[[listener]]\nlisten = \"127.0.0.1:1\"\n",
        1,
        &["key `action`", "missing"],
    );
    err(
        "[[listener]]\nproto = \"udp\"\nlisten = \"127.0.0.1:1\"\naction = \"http\"\n",
        4,
        &["key `action`", "not available for proto \"udp\""],
    );
    err(
        "[[listener]]\nproto = \"udp\"\nlisten = \"127.0.0.1:1\"\naction = \"echo\"\nbacklog = 5\n",
        5,
        &["key `backlog`", "TCP and SCTP listeners only"],
    );
    err(
        "[[listener]]\nlisten = \"127.0.0.1:1\"\naction = \"echo\"\nmax_datagram_bytes = 5\n",
        4,
        &["key `max_datagram_bytes`", "UDP listeners only"],
    );
    let u = parse(
        "[[listener]]\nproto = \"udp\"\nlisten = \"127.0.0.1:1\"\naction = \"proxy\"\n\
         upstream = \"127.0.0.1:2\"\nmax_sessions = 7\nsession_idle_timeout_ms = 9\nmax_datagram_bytes = 1500\n",
    )
    .unwrap();
    assert_eq!(u.listeners[0].proto, Proto::Udp);
    assert_eq!(u.listeners[0].max_datagram_bytes, 1500);
    let Action::Proxy(p) = &u.listeners[0].action else {
        panic!("not a proxy")
    };
    assert_eq!((p.max_sessions, p.session_idle_timeout_ms), (7, 9));
    assert_eq!(
        p.session_unreplied_timeout_ms,
        super::DEFAULT_SESSION_UNREPLIED_TIMEOUT_MS
    );
    let u = parse(
        "[[listener]]\nproto = \"udp\"\nlisten = \"127.0.0.1:1\"\naction = \"proxy\"\n\
         upstream = \"127.0.0.1:2\"\nsession_unreplied_timeout_ms = 250\n",
    )
    .unwrap();
    let Action::Proxy(p) = &u.listeners[0].action else {
        panic!("not a proxy")
    };
    assert_eq!(
        (p.session_unreplied_timeout_ms, p.max_sessions),
        (250, super::DEFAULT_MAX_SESSIONS)
    );
    let sc = parse(
        "[[listener]]\nproto = \"sctp\"\nlisten = \"[::]:1\"\naction = \"echo\"\n\
         sctp_style = \"one-to-many\"\nsctp_streams = 8\nmax_message_bytes = 1000\n",
    )
    .unwrap();
    assert_eq!(sc.listeners[0].proto, Proto::Sctp);
    assert_eq!(
        sc.listeners[0].sctp,
        SctpConfig {
            style: crate::sctp::Style::OneToMany,
            streams: 8,
            max_message_bytes: 1000
        }
    );
    let d = parse("[[listener]]\nproto = \"sctp\"\nlisten = \"[::]:1\"\naction = \"proxy\"\nupstream = \"127.0.0.1:2\"\n")
        .unwrap();
    assert_eq!(d.listeners[0].sctp, SctpConfig::default());
    err(
        "[[listener]]\nproto = \"sctp\"\nlisten = \"127.0.0.1:1\"\naction = \"http\"\n",
        4,
        &["key `action`", "not available for proto \"sctp\""],
    );
    err(
        "[[listener]]\nproto = \"sctp\"\nlisten = \"127.0.0.1:1\"\naction = \"echo\"\nsctp_style = \"many\"\n",
        5,
        &["key `sctp_style`", "\"one-to-many\""],
    );
    err(
        "[[listener]]\nproto = \"sctp\"\nlisten = \"127.0.0.1:1\"\naction = \"echo\"\nsctp_streams = 0\n",
        5,
        &["key `sctp_streams`", "between 1 and 65535"],
    );
    err(
        "[[listener]]\nlisten = \"127.0.0.1:1\"\naction = \"echo\"\nsctp_streams = 4\n",
        4,
        &["key `sctp_streams`", "SCTP listeners only"],
    );
    err(
        "[[listener]]\nproto = \"sctp\"\nlisten = \"127.0.0.1:1\"\naction = \"proxy\"\nupstream = \"127.0.0.1:2\"\nproxy_protocol = \"v2\"\n",
        6,
        &["key `proxy_protocol`", "TCP listeners only"],
    );
    err(
        "[[listener]]\nlisten = \"127.0.0.1:1\"\naction = \"echo\"\nbacklog = 0\n",
        4,
        &["key `backlog`"],
    );
    err(
        "[[listener]]\nlisten = \"127.0.0.1:1\"\naction = \"echo\"\nbacklog = 65536\n",
        4,
        &["key `backlog`"],
    );
}

#[test]
fn runtime_errors() {
    err(
        "[runtime]\nworkers = 0\n[[listener]]\nlisten = \"127.0.0.1:1\"\naction = \"echo\"\n",
        2,
        &["[runtime]", "key `workers`", "got 0"],
    );
    err("[runtime]\nworkers = -3\n", 2, &["key `workers`"]);
    err("[runtime]\nworkers = 1025\n", 2, &["key `workers`"]);
    err("[runtime]\n\nio = \"kqueue\"\n", 3, &["key `io`", "kqueue"]);
    // Wrong TOML type: named by dotted key path.
    err(
        "[runtime]\nworkers = \"two\"\n",
        2,
        &["key `runtime.workers`"],
    );
    err(
        "[[listener]]\nname = 5\n",
        2,
        &["key `listener.name`", "invalid type"],
    );
    err("netns_dir = \"\"\n", 1, &["key `netns_dir`"]);
}

#[test]
fn unknown_keys() {
    let m = err(
        "[runtime]\nworkers = 2\n\nwrkers = 3\n",
        4,
        &["unknown key `wrkers` in [runtime]"],
    );
    assert!(
        m.starts_with("ringress.toml:4: unknown key `wrkers` in [runtime]"),
        "{m}"
    );
    err(
        "[[listener]]\nlisten = \"127.0.0.1:1\"\naction = \"echo\"\nlisen = 1\n",
        4,
        &["unknown key `lisen` in [[listener]]"],
    );
    err(
        "\nbogus = 1\n",
        2,
        &["unknown key `bogus` in the top-level table"],
    );
}

#[test]
fn malformed_toml() {
    let m = err(
        "[runtime]\nworkers = 2\nio = \"epoll\n",
        3,
        &["TOML parse error: "],
    );
    assert!(m.starts_with("ringress.toml:3: TOML parse error: "), "{m}");
    err("[[listener]\n", 1, &["TOML parse error: "]);
}

#[test]
fn no_listeners() {
    let e = parse("[runtime]\nworkers = 1\n").unwrap_err();
    assert!(matches!(e, ConfigError::NoListeners { .. }));
    assert_eq!(e.to_string(), "ringress.toml: no [[listener]] defined");
    assert!(parse("").is_err());
}

#[test]
fn duplicate_names() {
    let text = "\n\n[[listener]]\nname = \"alpha\"\nlisten = \"127.0.0.1:1\"\naction = \"echo\"\n\
                [[listener]]\nname = \"alpha\"\nlisten = \"127.0.0.1:2\"\naction = \"echo\"\n";
    let m = err(
        text,
        8,
        &[
            "listener \"alpha\"",
            "key `name`",
            "duplicate listener name \"alpha\"",
            "first defined at line 3",
        ],
    );
    assert!(
        m.starts_with("ringress.toml:8: listener \"alpha\": key `name`: duplicate"),
        "{m}"
    );

    // Derived duplicates: same netns/proto/listen and no names.
    let text = "[[listener]]\nnetns = \"a\"\nlisten = \"[::]:80\"\naction = \"echo\"\n\
                [[listener]]\nnetns = \"a\"\nlisten = \"[::]:80\"\naction = \"http\"\n";
    err(
        text,
        5,
        &[
            "key `name`",
            "duplicate listener name \"a-tcp-[::]:80\"",
            "first defined at line 1",
        ],
    );

    // An explicit name that collides with a derived one.
    let text = "[[listener]]\nlisten = \"127.0.0.1:80\"\naction = \"echo\"\n\
                [[listener]]\nname = \"root-tcp-127.0.0.1:80\"\nlisten = \"127.0.0.1:81\"\naction = \"echo\"\n";
    err(text, 5, &["key `name`", "first defined at line 1"]);
}

#[test]
fn duplicate_addresses() {
    let text = "[[listener]]\nname = \"a\"\nlisten = \"127.0.0.1:80\"\naction = \"echo\"\n\
                [[listener]]\nname = \"b\"\nlisten = \"127.0.0.1:80\"\naction = \"http\"\n";
    err(
        text,
        7,
        &[
            "listener \"b\"",
            "key `listen`",
            "already used by listener \"a\"",
        ],
    );
    // Port 0 is refused: each worker's socket would get its own ephemeral port.
    let text = "[[listener]]\nname = \"a\"\nlisten = \"127.0.0.1:0\"\naction = \"echo\"\n";
    err(
        text,
        3,
        &["listener \"a\"", "key `listen`", "port 0 is not allowed"],
    );
    // Same address in different namespaces is fine.
    let text = "[[listener]]\nnetns = \"x\"\nlisten = \"127.0.0.1:80\"\naction = \"echo\"\n\
                [[listener]]\nnetns = \"y\"\nlisten = \"127.0.0.1:80\"\naction = \"echo\"\n";
    assert_eq!(parse(text).unwrap().listeners.len(), 2);
}

/// 10,000 listeners (10 ports in each of 1,000 namespaces), each table 5 lines:
/// `[runtime]` on lines 1-2, listener k's header on line 5k + 4, its `netns` on
/// 5k + 5 and its `listen` on 5k + 6.
fn many_listeners() -> String {
    let mut t = String::from("[runtime]\nworkers = 1\n");
    for ns in 0..1000 {
        for port in 0..10 {
            t += &format!(
                "\n[[listener]]\nnetns = \"t{ns}\"\nlisten = \"127.0.0.1:{}\"\naction = \"echo\"\n",
                20000 + port
            );
        }
    }
    t
}

#[test]
fn many_listeners_keep_their_lines() {
    let text = many_listeners();
    let c = parse(&text).unwrap();
    assert_eq!(c.listeners.len(), 10_000);
    for (k, l) in c.listeners.iter().enumerate() {
        assert_eq!(l.line, 5 * k + 4, "{}", l.name);
        assert_eq!(l.netns_line, 5 * k + 5, "{}", l.name);
    }
    assert_eq!(c.listeners[9_999].name, "t999-tcp-127.0.0.1:20009");

    // A duplicate address after 10,000 listeners names both lines. Its derived name
    // collides too, and names are checked first: give it its own name.
    let dup = format!(
        "{text}\n[[listener]]\nname = \"late\"\nnetns = \"t500\"\nlisten = \"127.0.0.1:20003\"\naction = \"echo\"\n"
    );
    let k = 500 * 10 + 3;
    err(
        &dup,
        50_000 + 7,
        &[
            "listener \"late\"",
            "key `listen`",
            &format!(
                "already used by listener \"t500-tcp-127.0.0.1:20003\" (line {})",
                5 * k + 4
            ),
        ],
    );

    // A duplicate (derived) name: the error points at the table's header.
    let dup = format!(
        "{text}\n[[listener]]\nnetns = \"t7\"\nlisten = \"127.0.0.1:20001\"\naction = \"http\"\n"
    );
    let k = 7 * 10 + 1;
    err(
        &dup,
        50_000 + 4,
        &[
            "key `name`",
            "duplicate listener name \"t7-tcp-127.0.0.1:20001\"",
            &format!("first defined at line {}", 5 * k + 4),
        ],
    );
}

#[test]
fn many_listeners_in_one_namespace_then_a_missing_one() {
    // 2,000 listeners share one namespace file (checked once), then one names a
    // namespace that does not exist: the error is about that one, at its line.
    let mut text = String::new();
    for port in 0..2000 {
        text += &format!(
            "[[listener]]\nnetns = \"/proc/self/ns/net\"\nlisten = \"127.0.0.1:{}\"\naction = \"echo\"\n",
            20000 + port
        );
    }
    let c = parse(&text).unwrap();
    c.check_namespaces().unwrap();
    text += "[[listener]]\nname = \"gone\"\nnetns = \"/proc/self/ns/does-not-exist\"\nlisten = \"127.0.0.1:1\"\naction = \"echo\"\n";
    let c = parse(&text).unwrap();
    let e = c.check_namespaces().unwrap_err();
    assert_eq!(e.line(), Some(2000 * 4 + 3), "{e}");
    assert!(
        e.to_string().contains("listener \"gone\": key `netns`"),
        "{e}"
    );
}

#[test]
fn invalid_netns_name() {
    err(
        "[[listener]]\nlisten = \"127.0.0.1:1\"\nnetns = \"a/b\"\naction = \"echo\"\n",
        3,
        &["listener #1", "key `netns`", "a/b"],
    );
    err(
        "[[listener]]\nlisten = \"127.0.0.1:1\"\nnetns = \"\"\naction = \"echo\"\n",
        3,
        &["key `netns`"],
    );
}

#[test]
fn missing_namespace() {
    let name = format!("ringress-cfgtest-missing-{}", std::process::id());
    let text = format!(
        "\n[[listener]]\nname = \"alpha\"\nnetns = \"{name}\"\nlisten = \"127.0.0.1:1\"\naction = \"echo\"\n"
    );
    let c = parse(&text).unwrap();
    let e = c.check_namespaces().unwrap_err();
    let m = e.to_string();
    let want = format!(
        "ringress.toml:4: listener \"alpha\": key `netns`: namespace \"{name}\" not found (/run/netns/{name}: "
    );
    assert!(m.starts_with(&want), "{m:?} should start with {want:?}");
    match e {
        ConfigError::Netns { source, .. } => {
            assert_eq!(source.kind(), io::ErrorKind::NotFound)
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn namespace_by_path() {
    let c = parse(
        "[[listener]]\nnetns = \"/proc/self/ns/net\"\nlisten = \"127.0.0.1:1\"\naction = \"echo\"\n\
         [[listener]]\nlisten = \"127.0.0.1:2\"\naction = \"echo\"\n",
    )
    .unwrap();
    c.check_namespaces().unwrap();

    // A file that is not a namespace.
    let c = parse(
        "[[listener]]\nnetns = \"/etc/hostname\"\nlisten = \"127.0.0.1:1\"\naction = \"echo\"\n",
    )
    .unwrap();
    if Path::new("/etc/hostname").exists() {
        let m = c.check_namespaces().unwrap_err().to_string();
        assert!(
            m.contains("key `netns`") && m.contains("is not a namespace"),
            "{m}"
        );
    }
}

/// Namespaces compare by identity, not spelling: `/proc/self/ns/net`,
/// `/proc/thread-self/ns/net` and no `netns` at all are the namespace the tests
/// run in, so a second listener on the same address in it is refused, naming both.
#[test]
fn same_namespace_by_another_spelling_is_a_duplicate() {
    let text = "[[listener]]\nname = \"plain\"\nlisten = \"127.0.0.1:80\"\naction = \"echo\"\n\
                [[listener]]\nname = \"by-proc\"\nnetns = \"/proc/self/ns/net\"\nlisten = \"127.0.0.1:80\"\naction = \"echo\"\n";
    let c = parse(text).unwrap();
    let e = c.check_namespaces().unwrap_err();
    let m = e.to_string();
    assert_eq!(e.line(), Some(7), "{m}");
    for want in [
        "listener \"by-proc\": key `netns`",
        "tcp 127.0.0.1:80 in namespace \"/proc/self/ns/net\"",
        "already used by listener \"plain\" (line 1) in namespace \"root\"",
        "the same namespace",
    ] {
        assert!(m.contains(want), "{m:?} lacks {want:?}");
    }
    // Two paths of one namespace; other protocols and addresses stay apart.
    let text = "[[listener]]\nname = \"a\"\nnetns = \"/proc/self/ns/net\"\nproto = \"udp\"\nlisten = \"127.0.0.1:80\"\naction = \"echo\"\n\
                [[listener]]\nname = \"b\"\nnetns = \"/proc/thread-self/ns/net\"\nlisten = \"127.0.0.1:80\"\naction = \"echo\"\n\
                [[listener]]\nname = \"c\"\nlisten = \"127.0.0.1:81\"\naction = \"echo\"\n";
    parse(text).unwrap().check_namespaces().unwrap();
    let text = format!("{text}[[listener]]\nname = \"d\"\nnetns = \"/proc/self/ns/net\"\nproto = \"udp\"\nlisten = \"127.0.0.1:81\"\naction = \"echo\"\n\
                [[listener]]\nname = \"e\"\nnetns = \"/proc/thread-self/ns/net\"\nproto = \"udp\"\nlisten = \"127.0.0.1:80\"\naction = \"echo\"\n");
    let m = parse(&text)
        .unwrap()
        .check_namespaces()
        .unwrap_err()
        .to_string();
    assert!(
        m.contains("listener \"e\"") && m.contains("already used by listener \"a\""),
        "{m}"
    );
}

#[test]
fn link_local_upstreams_need_a_zone() {
    let l = |up: &str| {
        format!("[[listener]]\nname = \"p\"\nlisten = \"127.0.0.1:80\"\naction = \"proxy\"\nupstream = \"{up}\"\n")
    };
    err(
        &l("[fe80::1]:80"),
        5,
        &[
            "key `upstream`",
            "link-local upstream [fe80::1]:80 needs a zone",
            "\"[fe80::1%2]:80\"",
        ],
    );
    let c = parse(&l("[fe80::1%2]:80")).unwrap();
    match &c.listeners[0].action {
        Action::Proxy(p) => assert_eq!(p.upstreams[0].to_string(), "[fe80::1%2]:80"),
        other => panic!("{other:?}"),
    }
    parse(&l("[2001:db8::1]:80")).unwrap();
    parse(&l("[febf::1%3]:80")).unwrap();
    // An interface name: resolved in the upstreams' namespace (here ours).
    let mut c = parse(&l("[fe80::1%lo]:80")).unwrap();
    c.resolve_zones().unwrap();
    match &c.listeners[0].action {
        Action::Proxy(p) => match p.upstreams[0] {
            SocketAddr::V6(v6) => assert_eq!(v6.scope_id(), 1, "lo is interface 1"),
            other => panic!("{other}"),
        },
        other => panic!("{other:?}"),
    }
    let mut c = parse(&l("[fe80::1%no-such-if0]:80")).unwrap();
    let m = c.resolve_zones().unwrap_err().to_string();
    assert!(
        m.contains(
            "zone %no-such-if0 of upstream [fe80::1]:80: no such interface in namespace \"root\""
        ),
        "{m}"
    );
    err(&l("[fe80::1%a/b]:80"), 5, &["invalid upstream address"]);
}

/// The PROXY v2 NETNS TLV carries the namespace label: at most 481 bytes, so that
/// the header fits in 536 bytes.
#[test]
fn proxy_v2_netns_tlv_is_bounded() {
    let l = |ns: &str, pp: &str| {
        format!(
            "[[listener]]\nname = \"p\"\nnetns = \"{ns}\"\nlisten = \"127.0.0.1:80\"\naction = \"proxy\"\n\
             upstream = \"127.0.0.1:81\"\nupstream_netns = \"/proc/self/ns/net\"\nproxy_protocol = \"{pp}\"\n"
        )
    };
    let ok = format!("/{}", "a".repeat(480));
    parse(&l(&ok, "v2")).unwrap();
    let long = format!("/{}", "a".repeat(481));
    err(
        &l(&long, "v2"),
        3,
        &["key `netns`", "482 bytes", "at most 481"],
    );
    // v1 sends no TLV.
    parse(&l(&long, "v1")).unwrap();
    // The longest header: IPv6 addresses and a 481-byte TLV.
    let h = crate::proto::proxy_header::encode(
        crate::proto::proxy_header::ProxyProtocol::V2,
        Some("[2001:db8::1]:1".parse().unwrap()),
        Some("[2001:db8::2]:2".parse().unwrap()),
        Some(&ok),
    );
    assert_eq!(h.len(), 536);
}

#[test]
fn fd_limit_preflight_counts_sockets_namespaces_and_a_margin() {
    let text = "[runtime]\nworkers = 4\n\
                [[listener]]\nlisten = \"127.0.0.1:1\"\naction = \"echo\"\n\
                [[listener]]\nnetns = \"a\"\nlisten = \"127.0.0.1:1\"\naction = \"echo\"\n\
                [[listener]]\nnetns = \"a\"\nlisten = \"127.0.0.1:2\"\naction = \"echo\"\n\
                [[listener]]\nnetns = \"t*\"\nlisten = \"127.0.0.1:3\"\naction = \"echo\"\n";
    let c = parse(text).unwrap();
    // 3 listeners × 4 sockets, 1 namespace file, 16 + 4 × 4.
    assert_eq!(c.fds_needed(), 12 + 1 + 16 + 16);
    c.check_fd_limit(45).unwrap();
    let m = c.check_fd_limit(44).unwrap_err();
    for want in ["RLIMIT_NOFILE", "is 44", "45 file descriptors"] {
        assert!(m.contains(want), "{m}");
    }
}

#[test]
fn loopback_upstream_inside_a_namespace_is_warned_about() {
    let text = "[[listener]]\nname = \"in-ns\"\nnetns = \"a\"\nlisten = \"127.0.0.1:1\"\naction = \"proxy\"\nupstream = \"127.0.0.1:8080\"\n\
                [[listener]]\nname = \"with-ns\"\nnetns = \"a\"\nlisten = \"127.0.0.1:2\"\naction = \"proxy\"\nupstream = \"127.0.0.1:8080\"\nupstream_netns = \"a\"\n\
                [[listener]]\nname = \"root\"\nlisten = \"127.0.0.1:3\"\naction = \"proxy\"\nupstream = \"[::1]:8080\"\n\
                [[listener]]\nname = \"far\"\nnetns = \"a\"\nlisten = \"127.0.0.1:4\"\naction = \"proxy\"\nupstream = \"10.0.0.1:8080\"\n";
    let w = parse(text).unwrap().warnings();
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].starts_with(
            "ringress.toml:1: listener \"in-ns\": upstream 127.0.0.1:8080 is a loopback address"
        ) && w[0].contains("upstream_netns = \"a\""),
        "{w:?}"
    );
}

#[test]
fn load_reads_file_and_reports_missing() {
    let dir = std::env::temp_dir().join(format!("ringress-cfgtest-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("ringress.toml");
    std::fs::write(&path, FULL).unwrap();
    let c = Config::load(&path).unwrap();
    assert_eq!(c.source, path);
    assert_eq!(c.listeners.len(), 3);
    std::fs::write(&path, "[runtime]\nworkers = 0\n").unwrap();
    let m = Config::load(&path).unwrap_err().to_string();
    assert!(m.starts_with(&format!("{}:2: ", path.display())), "{m}");
    std::fs::remove_dir_all(&dir).unwrap();

    let e = Config::load(&dir.join("missing.toml")).unwrap_err();
    assert!(matches!(e, ConfigError::Io { .. }));
    assert!(e.to_string().contains("missing.toml"));
}

#[test]
fn proxy_keys() {
    let c = parse(
        "[[listener]]\nname = \"p\"\nlisten = \"127.0.0.1:1\"\naction = \"proxy\"\n\
         upstreams = [\"10.0.0.1:80\", \"[2001:db8::1]:80\"]\nupstream_netns = \"up\"\n\
         connect_timeout_ms = 250\nidle_timeout_ms = 1000\nbuffer_bytes = 8192\nproxy_protocol = \"v2\"\n",
    )
    .unwrap();
    let Action::Proxy(p) = &c.listeners[0].action else {
        panic!("not a proxy")
    };
    assert_eq!(p.upstreams.len(), 2);
    assert_eq!(
        p.upstream_netns_path.as_deref(),
        Some(Path::new("/run/netns/up"))
    );
    assert_eq!(
        (p.connect_timeout_ms, p.idle_timeout_ms, p.buffer_bytes),
        (250, 1000, 8192)
    );
    assert_eq!(p.upstream_netns_line, 6);
    let d = parse(
        "[[listener]]\nlisten = \"127.0.0.1:1\"\naction = \"proxy\"\nupstream = \"127.0.0.1:2\"\n",
    )
    .unwrap();
    let Action::Proxy(p) = &d.listeners[0].action else {
        panic!("not a proxy")
    };
    assert_eq!(
        (p.connect_timeout_ms, p.idle_timeout_ms),
        (DEFAULT_CONNECT_TIMEOUT_MS, DEFAULT_IDLE_TIMEOUT_MS)
    );
    assert_eq!(p.buffer_bytes, DEFAULT_BUFFER_BYTES);
    // Errors name the key and its line.
    let base = "[[listener]]\nlisten = \"127.0.0.1:1\"\naction = \"proxy\"\n";
    err(
        &format!("{base}upstream = \"nope\"\n"),
        4,
        &["key `upstream`", "nope"],
    );
    err(
        &format!("{base}upstreams = []\n"),
        4,
        &["key `upstreams`", "empty"],
    );
    err(
        &format!("{base}upstream = \"1.1.1.1:1\"\nbuffer_bytes = 10\n"),
        5,
        &["key `buffer_bytes`"],
    );
    err(
        &format!("{base}upstream = \"1.1.1.1:1\"\nproxy_protocol = \"v3\"\n"),
        5,
        &["key `proxy_protocol`", "v3"],
    );
    err(
        &format!("{base}upstream = \"1.1.1.1:1\"\nsplice = \"always\"\n"),
        5,
        &["key `splice`", "always"],
    );
    err(
        "[[listener]]\nproto = \"sctp\"\nlisten = \"127.0.0.1:1\"\naction = \"proxy\"\nupstream = \"127.0.0.1:2\"\nsplice = \"on\"\n",
        6,
        &["key `splice`", "TCP listeners only"],
    );
    err(
        "[[listener]]\nlisten = \"127.0.0.1:1\"\naction = \"echo\"\nsplice = \"on\"\n",
        4,
        &["key `splice`"],
    );
    assert_eq!(p.splice, crate::config::DEFAULT_SPLICE);
    for (v, want) in [
        ("off", crate::config::SpliceMode::Off),
        ("on", crate::config::SpliceMode::On),
        ("auto", crate::config::SpliceMode::Auto),
    ] {
        let c = parse(&format!(
            "{base}upstream = \"1.1.1.1:1\"\nsplice = \"{v}\"\n"
        ))
        .unwrap();
        let Action::Proxy(p) = &c.listeners[0].action else {
            panic!("not a proxy")
        };
        assert_eq!((p.splice, p.splice.as_str()), (want, v));
    }
    err(
        &format!("{base}upstream = \"1.1.1.1:1\"\nconnect_timeout_ms = 0\n"),
        5,
        &["key `connect_timeout_ms`"],
    );
    err(
        "[[listener]]\nlisten = \"127.0.0.1:1\"\naction = \"echo\"\nupstream = \"1.1.1.1:1\"\n",
        4,
        &["key `upstream`", "only allowed with action = \"proxy\""],
    );
    // A missing upstream namespace is named by its key and line.
    let missing = format!("ringress-cfgtest-up-{}", std::process::id());
    let c = parse(&format!(
        "{base}upstream = \"1.1.1.1:1\"\nupstream_netns = \"{missing}\"\n"
    ))
    .unwrap();
    let m = c.check_namespaces().unwrap_err().to_string();
    assert!(
        m.contains("ringress.toml:5:") && m.contains("key `upstream_netns`"),
        "{m}"
    );
}

#[test]
fn takeover_socket_is_an_absolute_socket_path() {
    let c = parse(
        "[runtime]\ntakeover_socket = \"/run/ringress/takeover.sock\"\n\
         [[listener]]\nlisten = \"127.0.0.1:7000\"\naction = \"echo\"\n",
    )
    .unwrap();
    assert_eq!(
        c.runtime.takeover_socket,
        Some(PathBuf::from("/run/ringress/takeover.sock"))
    );
    err(
        "[runtime]\n\ntakeover_socket = \"takeover.sock\"\n",
        3,
        &["[runtime]", "key `takeover_socket`", "absolute path"],
    );
    err(
        "[runtime]\ntakeover_socket = \"/\"\n",
        2,
        &["key `takeover_socket`", "absolute path"],
    );
    let long = format!("/{}", "x".repeat(120));
    err(
        &format!("[runtime]\ntakeover_socket = \"{long}\"\n"),
        2,
        &["key `takeover_socket`", "107"],
    );
}

#[test]
fn connection_limits_and_fd_budget_keys() {
    let c = parse(
        "[runtime]\nmax_connections = 5000\nfd_reserve = 100\nnetns_fd_share = 25\n\
         [[listener]]\nlisten = \"127.0.0.1:1\"\naction = \"echo\"\nmax_connections = 7\n",
    )
    .unwrap();
    assert_eq!(
        (
            c.runtime.max_connections,
            c.runtime.fd_reserve,
            c.runtime.netns_fd_share
        ),
        (5000, 100, 25)
    );
    assert_eq!(c.listeners[0].max_connections, 7);
    let d = parse("[[listener]]\nlisten = \"127.0.0.1:1\"\naction = \"echo\"\n").unwrap();
    assert_eq!(d.listeners[0].max_connections, 0);
    for (bad, key) in [
        ("[runtime]\nnetns_fd_share = 0\n", "netns_fd_share"),
        ("[runtime]\nnetns_fd_share = 101\n", "netns_fd_share"),
        ("[runtime]\nfd_reserve = 3\n", "fd_reserve"),
        ("[runtime]\nmax_connections = -1\n", "max_connections"),
    ] {
        let e = parse(&format!(
            "{bad}[[listener]]\nlisten = \"127.0.0.1:1\"\naction = \"echo\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains(key) && e.contains("must be between"), "{e}");
    }
}

#[test]
fn http_keys() {
    let c = parse(
        "[[listener]]\nlisten = \"127.0.0.1:1\"\naction = \"http\"\n\
         header_timeout_ms = 250\nkeepalive_timeout_ms = 3000\n",
    )
    .unwrap();
    assert_eq!(
        c.listeners[0].action,
        Action::Http(HttpConfig {
            header_timeout_ms: 250,
            keepalive_timeout_ms: 3000,
        })
    );
    let d = parse("[[listener]]\nlisten = \"127.0.0.1:1\"\naction = \"http\"\n").unwrap();
    let Action::Http(h) = d.listeners[0].action else {
        panic!("not http")
    };
    assert_eq!(
        (h.header_timeout_ms, h.keepalive_timeout_ms),
        (DEFAULT_HEADER_TIMEOUT_MS, DEFAULT_KEEPALIVE_TIMEOUT_MS)
    );
    let base = "[[listener]]\nlisten = \"127.0.0.1:1\"\naction = \"http\"\n";
    err(
        &format!("{base}header_timeout_ms = 0\n"),
        4,
        &["key `header_timeout_ms`"],
    );
    err(
        &format!("{base}keepalive_timeout_ms = -1\n"),
        4,
        &["key `keepalive_timeout_ms`"],
    );
    // Refused on the other actions, naming the action.
    for (action, extra) in [("echo", ""), ("respond", "respond = \"x\"\n")] {
        for key in ["header_timeout_ms", "keepalive_timeout_ms"] {
            err(
                &format!(
                    "[[listener]]\nlisten = \"127.0.0.1:1\"\naction = \"{action}\"\n{extra}{key} = 5\n"
                ),
                if extra.is_empty() { 4 } else { 5 },
                &[
                    &format!("key `{key}`"),
                    "only allowed with action = \"http\"",
                    &format!("\"{action}\""),
                ],
            );
        }
    }
}

#[test]
fn idle_timeout_for_echo_and_proxy_with_a_default() {
    let c = parse(
        "[[listener]]\nname = \"e\"\nlisten = \"127.0.0.1:1\"\naction = \"echo\"\nidle_timeout_ms = 250\n\
         [[listener]]\nname = \"d\"\nlisten = \"127.0.0.1:2\"\naction = \"echo\"\n\
         [[listener]]\nname = \"p\"\nlisten = \"127.0.0.1:3\"\naction = \"proxy\"\nupstream = \"127.0.0.1:4\"\n",
    )
    .unwrap();
    assert_eq!(c.listeners[0].idle_timeout_ms, 250);
    assert_eq!(c.listeners[1].idle_timeout_ms, DEFAULT_IDLE_TIMEOUT_MS);
    let Action::Proxy(p) = &c.listeners[2].action else {
        panic!("not a proxy")
    };
    assert_eq!(p.idle_timeout_ms, DEFAULT_IDLE_TIMEOUT_MS);
    for (action, hint) in [
        (
            "action = \"respond\"\nrespond = \"x\"",
            "respond connection closes",
        ),
        (
            "action = \"http\"",
            "header_timeout_ms and keepalive_timeout_ms",
        ),
    ] {
        let e = parse(&format!(
            "[[listener]]\nlisten = \"127.0.0.1:1\"\n{action}\nidle_timeout_ms = 5\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("idle_timeout_ms") && e.contains(hint), "{e}");
    }
}

#[test]
fn shards_default_per_listener_and_runtime() {
    let c = parse(
        "[runtime]\nworkers = 4\nshards = 2\n\
         [[listener]]\nlisten = \"127.0.0.1:1\"\naction = \"echo\"\n\
         [[listener]]\nlisten = \"127.0.0.1:2\"\naction = \"echo\"\nshards = \"by-worker\"\n\
         [[listener]]\nlisten = \"127.0.0.1:3\"\naction = \"echo\"\nshards = 1\n\
         [[listener]]\nproto = \"udp\"\nlisten = \"127.0.0.1:4\"\naction = \"echo\"\n\
         [[listener]]\nproto = \"sctp\"\nlisten = \"127.0.0.1:5\"\naction = \"echo\"\n\
         [[listener]]\nproto = \"sctp\"\nsctp_style = \"one-to-many\"\nlisten = \"127.0.0.1:6\"\naction = \"echo\"\n",
    )
    .unwrap();
    assert_eq!(c.runtime.shards, Shards::Count(2));
    let got: Vec<Shards> = c.listeners.iter().map(|l| l.shards).collect();
    assert_eq!(
        got,
        [
            Shards::Count(2),
            Shards::ByWorker,
            Shards::Count(1),
            // UDP and one-to-many SCTP do not take the runtime default.
            Shards::ByWorker,
            Shards::Count(2),
            Shards::ByWorker,
        ]
    );
    // Without any `shards` key: one socket per worker.
    let d = parse("[[listener]]\nlisten = \"127.0.0.1:1\"\naction = \"echo\"\n").unwrap();
    assert_eq!(d.runtime.shards, Shards::ByWorker);
    assert_eq!(d.listeners[0].shards, Shards::ByWorker);
    assert_eq!(Shards::ByWorker.to_string(), "by-worker");
    assert_eq!(Shards::Count(3).to_string(), "3");
}

#[test]
fn shards_sockets_per_worker_count() {
    assert_eq!(Shards::ByWorker.sockets(4), 4);
    assert_eq!(Shards::Count(1).sockets(4), 1);
    assert_eq!(Shards::Count(3).sockets(4), 3);
    // More than the running workers (--workers lower than the file's): one each.
    assert_eq!(Shards::Count(8).sockets(2), 2);
    assert_eq!(Shards::ByWorker.sockets(0), 1);
}

#[test]
fn shards_invalid_values() {
    err(
        "[runtime]\nworkers = 2\nshards = 3\n[[listener]]\nlisten = \"127.0.0.1:1\"\naction = \"echo\"\n",
        3,
        &["[runtime]", "key `shards`", "between 1 and 2", "got 3"],
    );
    err(
        "[runtime]\nworkers = 2\n[[listener]]\nlisten = \"127.0.0.1:1\"\naction = \"echo\"\nshards = 0\n",
        6,
        &["key `shards`", "\"by-worker\"", "got 0"],
    );
    err(
        "[[listener]]\nlisten = \"127.0.0.1:1\"\naction = \"echo\"\nshards = \"per-worker\"\n",
        4,
        &["key `shards`", "\"by-worker\"", "got \"per-worker\""],
    );
    err(
        "[runtime]\nworkers = 2\n[[listener]]\nproto = \"udp\"\nlisten = \"127.0.0.1:1\"\naction = \"echo\"\nshards = 1\n",
        7,
        &["key `shards`", "TCP and one-to-one SCTP", "UDP"],
    );
    err(
        "[runtime]\nworkers = 2\n[[listener]]\nproto = \"sctp\"\nsctp_style = \"one-to-many\"\n\
         listen = \"127.0.0.1:1\"\naction = \"echo\"\nshards = 1\n",
        8,
        &["key `shards`", "one-to-many SCTP"],
    );
}
