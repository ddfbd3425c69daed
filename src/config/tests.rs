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
    assert_eq!(b.action, Action::Http);
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
    assert_eq!(Action::Http.kind(), "http");
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
    // Port 0 (ephemeral) may repeat.
    let text = "[[listener]]\nname = \"a\"\nlisten = \"127.0.0.1:0\"\naction = \"echo\"\n\
                [[listener]]\nname = \"b\"\nlisten = \"127.0.0.1:0\"\naction = \"http\"\n";
    assert_eq!(parse(text).unwrap().listeners.len(), 2);
    // Same address in different namespaces is fine.
    let text = "[[listener]]\nnetns = \"x\"\nlisten = \"127.0.0.1:80\"\naction = \"echo\"\n\
                [[listener]]\nnetns = \"y\"\nlisten = \"127.0.0.1:80\"\naction = \"echo\"\n";
    assert_eq!(parse(text).unwrap().listeners.len(), 2);
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
        (DEFAULT_CONNECT_TIMEOUT_MS, 0)
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
