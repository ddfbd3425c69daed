//! Conversion of the raw form ([`super::raw`]) into the validated types, with an
//! error naming the line and key of the first problem.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use toml::Spanned;

use super::diag::Lines;
use super::raw::{RawListener, RawRuntime};
use super::{
    default_workers, Action, ConfigError, HttpConfig, IoChoice, ListenerConfig, ListenerId, Proto,
    ProxyConfig, Runtime, Scope, SctpConfig, Shards, BUFFER_BYTES_RANGE, DEFAULT_BACKLOG,
    DEFAULT_BUFFER_BYTES, DEFAULT_CONNECT_TIMEOUT_MS, DEFAULT_FD_RESERVE,
    DEFAULT_HEADER_TIMEOUT_MS, DEFAULT_IDLE_TIMEOUT_MS, DEFAULT_KEEPALIVE_TIMEOUT_MS,
    DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_MAX_SESSIONS, DEFAULT_NETNS_FD_SHARE, DEFAULT_SCTP_STREAMS,
    DEFAULT_SESSION_IDLE_TIMEOUT_MS, DEFAULT_SESSION_UNREPLIED_TIMEOUT_MS,
    DEFAULT_SHUTDOWN_TIMEOUT_MS, MAX_BACKLOG, MAX_CONNECTIONS, MAX_DATAGRAM_BYTES,
    MAX_MESSAGE_BYTES, MAX_TIMEOUT_MS, MAX_WORKERS,
};
use crate::netns::NetnsRef;
use crate::proto::proxy_header::{ProxyProtocol, MAX_NETNS_TLV_BYTES};

/// Builds errors that all name the same file.
pub(super) struct Ctx<'a> {
    pub(super) file: &'a Path,
    pub(super) lines: Lines,
}

impl Ctx<'_> {
    /// The integer at key `key` (in `scope`) if it lies in `range`, `default` when
    /// the key is absent; otherwise an error like "must be between 1 and 1024, got
    /// 0", `unit` (e.g. " (ms)") after the bounds.
    fn ranged<T>(
        &self,
        v: &Option<Spanned<i64>>,
        scope: Scope,
        key: &'static str,
        range: std::ops::RangeInclusive<T>,
        default: T,
        unit: &str,
    ) -> Result<T, ConfigError>
    where
        T: TryFrom<i64> + PartialOrd + fmt::Display + Copy,
    {
        let Some(x) = v else { return Ok(default) };
        match T::try_from(*x.get_ref()) {
            Ok(n) if range.contains(&n) => Ok(n),
            _ => Err(self.invalid(
                x.span(),
                scope,
                key,
                format!(
                    "must be between {} and {}{unit}, got {}",
                    range.start(),
                    range.end(),
                    x.get_ref()
                ),
            )),
        }
    }

    pub(super) fn invalid(
        &self,
        span: Range<usize>,
        scope: Scope,
        key: &'static str,
        message: impl Into<String>,
    ) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.to_path_buf(),
            line: self.lines.of_span(span),
            scope,
            key,
            message: message.into(),
        }
    }

    pub(super) fn toml_error(&self, e: toml::de::Error) -> ConfigError {
        let line = e.span().map_or(1, |s| self.lines.of_span(s));
        let message = e.message().trim_end().to_string();
        // The key path is only reachable through Display without input: it ends
        // with a line "in `a.b`".
        let mut bare = e.clone();
        bare.set_input(None);
        let path = bare
            .to_string()
            .lines()
            .rev()
            .find_map(|l| {
                l.strip_prefix("in `")
                    .and_then(|r| r.strip_suffix('`'))
                    .map(str::to_string)
            })
            .unwrap_or_default();
        if let Some(rest) = message.strip_prefix("unknown field `") {
            if let Some((key, tail)) = rest.split_once('`') {
                let table = match path.as_str() {
                    "" => "the top-level table".to_string(),
                    "runtime" => "[runtime]".to_string(),
                    "listener" => "[[listener]]".to_string(),
                    p => format!("[{p}]"),
                };
                let expected = tail
                    .trim_start_matches(',')
                    .trim()
                    .strip_prefix("expected ")
                    .unwrap_or("")
                    .to_string();
                return ConfigError::UnknownKey {
                    file: self.file.to_path_buf(),
                    line,
                    key: key.to_string(),
                    table,
                    expected,
                };
            }
        }
        ConfigError::Parse {
            file: self.file.to_path_buf(),
            line,
            key: (!path.is_empty()).then_some(path),
            message,
        }
    }
}

pub(super) fn convert_runtime(cx: &Ctx<'_>, rt: &RawRuntime) -> Result<Runtime, ConfigError> {
    let workers = cx.ranged(
        &rt.workers,
        Scope::Runtime,
        "workers",
        1..=MAX_WORKERS,
        default_workers(),
        "",
    )?;
    let io = match &rt.io {
        None => IoChoice::Auto,
        Some(s) => s
            .get_ref()
            .parse()
            .map_err(|m: String| cx.invalid(s.span(), Scope::Runtime, "io", m))?,
    };
    let shutdown_timeout_ms = cx.ranged(
        &rt.shutdown_timeout_ms,
        Scope::Runtime,
        "shutdown_timeout_ms",
        0..=MAX_TIMEOUT_MS,
        DEFAULT_SHUTDOWN_TIMEOUT_MS,
        " (ms)",
    )?;
    let takeover_socket = match &rt.takeover_socket {
        None => None,
        Some(s) => {
            let p = std::path::PathBuf::from(s.get_ref());
            if !p.is_absolute() || p.file_name().is_none() {
                return Err(cx.invalid(
                    s.span(),
                    Scope::Runtime,
                    "takeover_socket",
                    format!(
                        "\"{}\" is not an absolute path of a socket file (e.g. \"/run/ringress/takeover.sock\")",
                        s.get_ref()
                    ),
                ));
            }
            // sockaddr_un.sun_path: 108 bytes with the terminating NUL (unix(7)).
            if s.get_ref().len() > 107 {
                return Err(cx.invalid(
                    s.span(),
                    Scope::Runtime,
                    "takeover_socket",
                    format!(
                        "path is {} bytes; a unix socket path holds at most 107 (unix(7))",
                        s.get_ref().len()
                    ),
                ));
            }
            Some(p)
        }
    };
    let max_connections = cx.ranged(
        &rt.max_connections,
        Scope::Runtime,
        "max_connections",
        0..=MAX_CONNECTIONS,
        0,
        " (0: no limit but the fd budget)",
    )?;
    let fd_reserve = cx.ranged(
        &rt.fd_reserve,
        Scope::Runtime,
        "fd_reserve",
        16..=1_000_000,
        DEFAULT_FD_RESERVE,
        " (fds)",
    )?;
    let netns_fd_share = cx.ranged(
        &rt.netns_fd_share,
        Scope::Runtime,
        "netns_fd_share",
        1..=100,
        DEFAULT_NETNS_FD_SHARE,
        " (percent)",
    )?;
    let shards = convert_shards(cx, &rt.shards, Scope::Runtime, workers)?.unwrap_or_default();
    Ok(Runtime {
        workers,
        io,
        shutdown_timeout_ms,
        takeover_socket,
        max_connections,
        fd_reserve,
        netns_fd_share,
        shards,
    })
}

/// A `shards` value: `"by-worker"` or a socket count in 1..=`workers`; `None`
/// when the key is absent.
fn convert_shards(
    cx: &Ctx<'_>,
    v: &Option<Spanned<toml::Value>>,
    scope: Scope,
    workers: usize,
) -> Result<Option<Shards>, ConfigError> {
    let Some(v) = v else { return Ok(None) };
    let expected = || {
        format!(
            "must be \"by-worker\" or a number of shared sockets between 1 and {workers} \
             (runtime.workers)"
        )
    };
    match v.get_ref() {
        toml::Value::String(s) if s == "by-worker" => Ok(Some(Shards::ByWorker)),
        toml::Value::Integer(n) => match usize::try_from(*n) {
            Ok(n) if (1..=workers).contains(&n) => Ok(Some(Shards::Count(n))),
            _ => Err(cx.invalid(
                v.span(),
                scope,
                "shards",
                format!("{}, got {n}", expected()),
            )),
        },
        other => Err(cx.invalid(
            v.span(),
            scope,
            "shards",
            format!("{}, got {other}", expected()),
        )),
    }
}

pub(super) fn convert_listener(
    cx: &Ctx<'_>,
    rt: &Runtime,
    index: usize,
    span: Range<usize>,
    raw: &RawListener,
) -> Result<ListenerConfig, ConfigError> {
    let line = cx.lines.of_span(span.clone());

    // Until the name is known, errors name the listener by explicit name or index.
    let explicit = raw.name.as_ref().map(|n| n.get_ref().clone());
    let early_id = || match &explicit {
        Some(n) => ListenerId::Name(n.clone()),
        None => ListenerId::Index(index),
    };
    let early = || Scope::Listener(early_id());

    if let Some(n) = &raw.name {
        let s = n.get_ref();
        if s.is_empty() {
            return Err(cx.invalid(
                n.span(),
                Scope::Listener(ListenerId::Index(index)),
                "name",
                "listener name is empty",
            ));
        }
        if s.chars().any(char::is_control) {
            return Err(cx.invalid(
                n.span(),
                Scope::Listener(ListenerId::Index(index)),
                "name",
                format!("listener name {s:?} contains control characters"),
            ));
        }
        if s.contains('@') {
            return Err(cx.invalid(
                n.span(),
                Scope::Listener(ListenerId::Index(index)),
                "name",
                format!(
                    "listener name {s:?} contains '@', which is kept for template instances (NAME@NAMESPACE)"
                ),
            ));
        }
    }

    let netns_line = raw
        .netns
        .as_ref()
        .map_or(line, |n| cx.lines.of_span(n.span()));
    let netns = match &raw.netns {
        None => None,
        Some(n) => Some(
            NetnsRef::parse(n.get_ref()).map_err(|m| cx.invalid(n.span(), early(), "netns", m))?,
        ),
    };

    let proto = match &raw.proto {
        None => Proto::Tcp,
        Some(p) => p
            .get_ref()
            .parse()
            .map_err(|m: String| cx.invalid(p.span(), early(), "proto", m))?,
    };

    let listen =
        match &raw.listen {
            None => return Err(cx.invalid(
                span,
                early(),
                "listen",
                "missing required key (a socket address such as \"0.0.0.0:8080\" or \"[::]:8080\")",
            )),
            Some(a) => a
                .get_ref()
                .trim()
                .parse::<SocketAddr>()
                .map_err(|_| {
                    cx.invalid(
                        a.span(),
                        early(),
                        "listen",
                        format!(
                    "invalid socket address {:?} (expected e.g. \"0.0.0.0:8080\" or \"[::]:8080\")",
                    a.get_ref()
                ),
                    )
                })
                .and_then(|addr| {
                    if addr.port() == 0 {
                        return Err(cx.invalid(
                            a.span(),
                            early(),
                            "listen",
                            "port 0 is not allowed: each worker's socket would get its own \
                         ephemeral port (give the port to listen on)",
                        ));
                    }
                    Ok(addr)
                })?,
        };

    let name = explicit.clone().unwrap_or_else(|| {
        let ns = netns
            .as_ref()
            .map_or_else(|| "root".to_string(), NetnsRef::label);
        format!("{ns}-{proto}-{listen}")
    });
    let scope = || Scope::Listener(ListenerId::Name(name.clone()));

    let action = match &raw.action {
        None => {
            return Err(cx.invalid(
                span,
                scope(),
                "action",
                "missing required key (\"echo\", \"respond\", \"http\" or \"proxy\")",
            ))
        }
        Some(a) => match a.get_ref().as_str() {
            "echo" => Action::Echo,
            "http" => Action::Http(convert_http(cx, &scope, raw)?),
            "respond" => match &raw.respond {
                None => {
                    return Err(cx.invalid(
                        a.span(),
                        scope(),
                        "respond",
                        "action \"respond\" needs a `respond` key",
                    ))
                }
                Some(r) if r.get_ref().is_empty() => {
                    return Err(cx.invalid(
                        r.span(),
                        scope(),
                        "respond",
                        "the response must not be empty",
                    ))
                }
                Some(r) => Action::Respond(r.get_ref().as_bytes().to_vec()),
            },
            "proxy" => Action::Proxy(Arc::new(convert_proxy(cx, a.span(), &scope, raw)?)),
            other => {
                return Err(cx.invalid(
                    a.span(),
                    scope(),
                    "action",
                    format!(
                        "unknown action {other:?} (expected \"echo\", \"respond\", \"http\" or \"proxy\")"
                    ),
                ))
            }
        },
    };
    if let (Some(r), false) = (&raw.respond, matches!(action, Action::Respond(_))) {
        return Err(cx.invalid(
            r.span(),
            scope(),
            "respond",
            format!(
                "`respond` is only allowed with action = \"respond\" (this listener's action is {:?})",
                action.kind()
            ),
        ));
    }

    if !matches!(action, Action::Http(_)) {
        for (key, v) in [
            ("header_timeout_ms", &raw.header_timeout_ms),
            ("keepalive_timeout_ms", &raw.keepalive_timeout_ms),
        ] {
            if let Some(v) = v {
                return Err(cx.invalid(
                    v.span(),
                    scope(),
                    key,
                    format!(
                        "`{key}` is only allowed with action = \"http\" (this listener's action is {:?})",
                        action.kind()
                    ),
                ));
            }
        }
    }

    // idle_timeout_ms: echo and proxy (http and respond have their own deadlines).
    if let (Some(x), Action::Respond(_) | Action::Http(_)) = (&raw.idle_timeout_ms, &action) {
        let instead = match action {
            Action::Http(_) => "use header_timeout_ms and keepalive_timeout_ms",
            _ => "a respond connection closes after its answer (lingering close, at most 1 s)",
        };
        return Err(cx.invalid(
            x.span(),
            scope(),
            "idle_timeout_ms",
            format!("`idle_timeout_ms` is for action = \"echo\" and \"proxy\" ({instead})"),
        ));
    }
    if !matches!(action, Action::Proxy(_)) {
        if let Some((key, span)) = proxy_only_keys(raw).into_iter().next() {
            return Err(cx.invalid(
                span,
                scope(),
                key,
                format!(
                    "`{key}` is only allowed with action = \"proxy\" (this listener's action is {:?})",
                    action.kind()
                ),
            ));
        }
    }

    check_proto_keys(cx, &scope, proto, &action, raw)?;
    if let (Action::Proxy(p), Some(ns), Some(span)) =
        (&action, &netns, raw.netns.as_ref().map(|n| n.span()))
    {
        let len = ns.label().len();
        if p.proxy_protocol == Some(ProxyProtocol::V2) && len > MAX_NETNS_TLV_BYTES {
            return Err(cx.invalid(
                span,
                scope(),
                "netns",
                format!(
                    "with proxy_protocol = \"v2\" the namespace is sent in the NETNS TLV, \
                     and this one is {len} bytes: at most {MAX_NETNS_TLV_BYTES} keep the \
                     header within the 536 bytes the PROXY protocol asks senders to respect \
                     (use a shorter name or path, e.g. a bind mount under /run/netns)"
                ),
            ));
        }
    }
    let max_datagram_bytes = cx.ranged(
        &raw.max_datagram_bytes,
        scope(),
        "max_datagram_bytes",
        1..=MAX_DATAGRAM_BYTES,
        MAX_DATAGRAM_BYTES,
        "",
    )?;

    let backlog = cx.ranged(
        &raw.backlog,
        scope(),
        "backlog",
        1..=MAX_BACKLOG,
        DEFAULT_BACKLOG,
        "",
    )?;
    let sctp = convert_sctp(cx, &scope, raw)?;
    let idle_timeout_ms = cx.ranged(
        &raw.idle_timeout_ms,
        scope(),
        "idle_timeout_ms",
        0..=MAX_TIMEOUT_MS,
        DEFAULT_IDLE_TIMEOUT_MS,
        " (ms)",
    )?;
    let max_connections = cx.ranged(
        &raw.max_connections,
        scope(),
        "max_connections",
        0..=MAX_CONNECTIONS,
        0,
        " (0: no limit)",
    )?;
    // One socket per worker is the only choice where the socket cannot be shared:
    // UDP (a client's datagrams and session stay on one worker) and one-to-many
    // SCTP (one socket, owned by one worker).
    let shareable = match proto {
        Proto::Tcp => true,
        Proto::Udp => false,
        Proto::Sctp => sctp.style == crate::sctp::Style::OneToOne,
    };
    let shards = match convert_shards(cx, &raw.shards, scope(), rt.workers)? {
        Some(Shards::Count(_)) if !shareable => {
            let span = raw.shards.as_ref().map_or(span, |v| v.span());
            return Err(cx.invalid(
                span,
                scope(),
                "shards",
                format!(
                    "a count of shared sockets is only allowed on TCP and one-to-one SCTP \
                     listeners (this one is {}; only \"by-worker\" applies)",
                    match proto {
                        Proto::Udp => "UDP",
                        _ => "one-to-many SCTP",
                    }
                ),
            ));
        }
        Some(s) => s,
        None if shareable => rt.shards,
        None => Shards::ByWorker,
    };

    Ok(ListenerConfig {
        name,
        netns,
        proto,
        listen,
        action,
        backlog,
        line,
        netns_line,
        max_datagram_bytes,
        sctp,
        idle_timeout_ms,
        max_connections,
        shards,
    })
}

/// The `header_timeout_ms` and `keepalive_timeout_ms` keys of an http listener.
fn convert_http(
    cx: &Ctx<'_>,
    scope: &dyn Fn() -> Scope,
    raw: &RawListener,
) -> Result<HttpConfig, ConfigError> {
    let ms = |v: &Option<Spanned<i64>>, key: &'static str, default: u64| {
        cx.ranged(v, scope(), key, 1..=MAX_TIMEOUT_MS, default, " (ms)")
    };
    Ok(HttpConfig {
        header_timeout_ms: ms(
            &raw.header_timeout_ms,
            "header_timeout_ms",
            DEFAULT_HEADER_TIMEOUT_MS,
        )?,
        keepalive_timeout_ms: ms(
            &raw.keepalive_timeout_ms,
            "keepalive_timeout_ms",
            DEFAULT_KEEPALIVE_TIMEOUT_MS,
        )?,
    })
}

/// The `sctp_style`, `sctp_streams` and `max_message_bytes` keys (checked to be on
/// an SCTP listener by [`check_proto_keys`]).
fn convert_sctp(
    cx: &Ctx<'_>,
    scope: &dyn Fn() -> Scope,
    raw: &RawListener,
) -> Result<SctpConfig, ConfigError> {
    let style = match &raw.sctp_style {
        None => crate::sctp::Style::OneToOne,
        Some(s) => match s.get_ref().as_str() {
            "one-to-one" => crate::sctp::Style::OneToOne,
            "one-to-many" => crate::sctp::Style::OneToMany,
            other => {
                return Err(cx.invalid(
                    s.span(),
                    scope(),
                    "sctp_style",
                    format!(
                        "unknown SCTP style {other:?} (expected \"one-to-one\" or \"one-to-many\")"
                    ),
                ))
            }
        },
    };
    let streams = cx.ranged(
        &raw.sctp_streams,
        scope(),
        "sctp_streams",
        1..=u16::MAX,
        DEFAULT_SCTP_STREAMS,
        "",
    )?;
    let max_message_bytes = cx.ranged(
        &raw.max_message_bytes,
        scope(),
        "max_message_bytes",
        1..=MAX_MESSAGE_BYTES,
        DEFAULT_MAX_MESSAGE_BYTES,
        "",
    )?;
    Ok(SctpConfig {
        style,
        streams,
        max_message_bytes,
    })
}

/// A key, where it is in the file, the protocols it is for, and how to name them.
type KeyRule<'a> = (&'a str, Option<Range<usize>>, &'a [Proto], &'a str);

/// Keys and actions that only make sense for some protocols.
fn check_proto_keys(
    cx: &Ctx<'_>,
    scope: &dyn Fn() -> Scope,
    proto: Proto,
    action: &Action,
    raw: &RawListener,
) -> Result<(), ConfigError> {
    use Proto::{Sctp, Tcp, Udp};
    let span_of = |x: &Option<Spanned<i64>>| x.as_ref().map(|v| v.span());
    if let Some(a) = &raw.action {
        if proto != Tcp && !matches!(action, Action::Echo | Action::Proxy(_)) {
            return Err(cx.invalid(
                a.span(),
                scope(),
                "action",
                format!(
                    "action {:?} is not available for proto \"{proto}\" (use \"echo\" or \"proxy\")",
                    action.kind()
                ),
            ));
        }
    }
    // (key, where it is, the protocols it is for, how to name them)
    let keys: [KeyRule<'_>; 13] = [
        (
            "backlog",
            span_of(&raw.backlog),
            &[Tcp, Sctp],
            "TCP and SCTP",
        ),
        (
            "connect_timeout_ms",
            span_of(&raw.connect_timeout_ms),
            &[Tcp, Sctp],
            "TCP and SCTP",
        ),
        (
            "idle_timeout_ms",
            span_of(&raw.idle_timeout_ms),
            &[Tcp, Sctp],
            "TCP and SCTP",
        ),
        (
            "buffer_bytes",
            span_of(&raw.buffer_bytes),
            &[Tcp, Sctp],
            "TCP and SCTP",
        ),
        (
            "proxy_protocol",
            raw.proxy_protocol.as_ref().map(|x| x.span()),
            &[Tcp],
            "TCP",
        ),
        (
            "splice",
            raw.splice.as_ref().map(|x| x.span()),
            &[Tcp],
            "TCP",
        ),
        (
            "session_idle_timeout_ms",
            span_of(&raw.session_idle_timeout_ms),
            &[Udp],
            "UDP",
        ),
        (
            "session_unreplied_timeout_ms",
            span_of(&raw.session_unreplied_timeout_ms),
            &[Udp],
            "UDP",
        ),
        ("max_sessions", span_of(&raw.max_sessions), &[Udp], "UDP"),
        (
            "max_datagram_bytes",
            span_of(&raw.max_datagram_bytes),
            &[Udp],
            "UDP",
        ),
        (
            "sctp_style",
            raw.sctp_style.as_ref().map(|x| x.span()),
            &[Sctp],
            "SCTP",
        ),
        ("sctp_streams", span_of(&raw.sctp_streams), &[Sctp], "SCTP"),
        (
            "max_message_bytes",
            span_of(&raw.max_message_bytes),
            &[Sctp],
            "SCTP",
        ),
    ];
    for (key, span, protos, names) in keys {
        if let Some(span) = span {
            if !protos.contains(&proto) {
                return Err(cx.invalid(
                    span,
                    scope(),
                    key,
                    format!("`{key}` is for {names} listeners only"),
                ));
            }
        }
    }
    Ok(())
}

/// Rejects duplicate names, then two listeners on the same address and protocol
/// in the same namespace reference.
pub(super) fn check_unique(
    cx: &Ctx<'_>,
    raw: &[Spanned<RawListener>],
    listeners: &[ListenerConfig],
) -> Result<(), ConfigError> {
    let mut names: HashMap<&str, usize> = HashMap::new();
    for (r, l) in raw.iter().zip(listeners) {
        if let Some(&first) = names.get(l.name.as_str()) {
            let (span, how) = match &r.get_ref().name {
                Some(n) => (n.span(), String::new()),
                None => (
                    r.span(),
                    "; the name is derived from netns, proto and listen: give one of them a distinct `name`"
                        .to_string(),
                ),
            };
            return Err(cx.invalid(
                span,
                Scope::Listener(ListenerId::Name(l.name.clone())),
                "name",
                format!(
                    "duplicate listener name {:?} (first defined at line {first}){how}",
                    l.name
                ),
            ));
        }
        names.insert(&l.name, l.line);
    }

    let mut addrs: HashMap<(Option<&NetnsRef>, Proto, SocketAddr), &ListenerConfig> =
        HashMap::new();
    for (r, l) in raw.iter().zip(listeners) {
        let key = (l.netns.as_ref(), l.proto, l.listen);
        if let Some(first) = addrs.get(&key) {
            let span = r.get_ref().listen.as_ref().map_or(r.span(), |s| s.span());
            return Err(cx.invalid(
                span,
                Scope::Listener(ListenerId::Name(l.name.clone())),
                "listen",
                format!(
                    "{} {} in namespace {:?} is already used by listener {:?} (line {})",
                    l.proto,
                    l.listen,
                    l.netns_label(),
                    first.name,
                    first.line
                ),
            ));
        }
        addrs.insert(key, l);
    }
    Ok(())
}

/// The proxy-only keys present in `raw`, with their spans.
fn proxy_only_keys(raw: &RawListener) -> Vec<(&'static str, Range<usize>)> {
    let mut v = Vec::new();
    if let Some(x) = &raw.upstream {
        v.push(("upstream", x.span()));
    }
    if let Some(x) = &raw.upstreams {
        v.push(("upstreams", x.span()));
    }
    if let Some(x) = &raw.upstream_netns {
        v.push(("upstream_netns", x.span()));
    }
    for (k, x) in [
        ("connect_timeout_ms", &raw.connect_timeout_ms),
        ("buffer_bytes", &raw.buffer_bytes),
    ] {
        if let Some(x) = x {
            v.push((k, x.span()));
        }
    }
    if let Some(x) = &raw.proxy_protocol {
        v.push(("proxy_protocol", x.span()));
    }
    if let Some(x) = &raw.splice {
        v.push(("splice", x.span()));
    }
    for (k, x) in [
        ("session_idle_timeout_ms", &raw.session_idle_timeout_ms),
        (
            "session_unreplied_timeout_ms",
            &raw.session_unreplied_timeout_ms,
        ),
        ("max_sessions", &raw.max_sessions),
    ] {
        if let Some(x) = x {
            v.push((k, x.span()));
        }
    }
    v
}

/// Validates the proxy keys of a listener whose `action = "proxy"` is at `action_span`.
fn convert_proxy(
    cx: &Ctx<'_>,
    action_span: Range<usize>,
    scope: &dyn Fn() -> Scope,
    raw: &RawListener,
) -> Result<ProxyConfig, ConfigError> {
    // Each upstream, with its interface-name zone if it has one.
    let addr = |s: &Spanned<String>, key: &'static str| {
        let text = s.get_ref().trim();
        let (a, zone) = match text.parse::<SocketAddr>() {
            Ok(a) => (a, None),
            Err(_) => parse_named_zone(text).ok_or_else(|| {
                cx.invalid(
                    s.span(),
                    scope(),
                    key,
                    format!(
                        "invalid upstream address {:?} (expected e.g. \"10.0.0.2:80\" or \"[2001:db8::2]:80\")",
                        s.get_ref()
                    ),
                )
            })?,
        };
        match a {
            // fe80::/10 (RFC 4291 2.5.6): without a zone the kernel cannot tell
            // which link, and every connect fails (EINVAL).
            SocketAddr::V6(v6)
                if zone.is_none()
                    && v6.scope_id() == 0
                    && (v6.ip().segments()[0] & 0xffc0) == 0xfe80 =>
            {
                Err(cx.invalid(
                    s.span(),
                    scope(),
                    key,
                    format!(
                        "link-local upstream {a} needs a zone: an interface name or index, \
                         e.g. \"[{}%eth0]:{}\" or \"[{}%2]:{}\"",
                        v6.ip(),
                        v6.port(),
                        v6.ip(),
                        v6.port()
                    ),
                ))
            }
            _ => Ok((a, zone)),
        }
    };
    let upstreams: Vec<(SocketAddr, Option<String>)> = match (&raw.upstream, &raw.upstreams) {
        (Some(u), None) => vec![addr(u, "upstream")?],
        (None, Some(list)) => {
            if list.get_ref().is_empty() {
                return Err(cx.invalid(list.span(), scope(), "upstreams", "the list is empty"));
            }
            list.get_ref()
                .iter()
                .map(|u| addr(u, "upstreams"))
                .collect::<Result<Vec<_>, _>>()?
        }
        (Some(u), Some(_)) => {
            return Err(cx.invalid(
                u.span(),
                scope(),
                "upstream",
                "give either `upstream` or `upstreams`, not both",
            ))
        }
        (None, None) => {
            return Err(cx.invalid(
                action_span,
                scope(),
                "upstream",
                "action \"proxy\" needs `upstream = \"ADDR:PORT\"` or `upstreams = [...]`",
            ))
        }
    };
    let upstream_zones: Vec<(usize, String)> = upstreams
        .iter()
        .enumerate()
        .filter_map(|(i, (_, z))| z.clone().map(|z| (i, z)))
        .collect();
    let upstreams: Vec<SocketAddr> = upstreams.into_iter().map(|(a, _)| a).collect();
    let upstream_netns = match &raw.upstream_netns {
        None => None,
        Some(n) => match NetnsRef::parse(n.get_ref()) {
            Ok(r) if r.is_glob() => {
                return Err(cx.invalid(
                    n.span(),
                    scope(),
                    "upstream_netns",
                    "must name one namespace, not a glob",
                ))
            }
            Ok(r) => Some(r),
            Err(m) => return Err(cx.invalid(n.span(), scope(), "upstream_netns", m)),
        },
    };
    let ms = |v: &Option<Spanned<i64>>, key: &'static str, default: u64, min: u64| {
        cx.ranged(v, scope(), key, min..=MAX_TIMEOUT_MS, default, " (ms)")
    };
    let connect_timeout_ms = ms(
        &raw.connect_timeout_ms,
        "connect_timeout_ms",
        DEFAULT_CONNECT_TIMEOUT_MS,
        1,
    )?;
    let idle_timeout_ms = ms(
        &raw.idle_timeout_ms,
        "idle_timeout_ms",
        DEFAULT_IDLE_TIMEOUT_MS,
        0,
    )?;
    let session_idle_timeout_ms = ms(
        &raw.session_idle_timeout_ms,
        "session_idle_timeout_ms",
        DEFAULT_SESSION_IDLE_TIMEOUT_MS,
        1,
    )?;
    let session_unreplied_timeout_ms = ms(
        &raw.session_unreplied_timeout_ms,
        "session_unreplied_timeout_ms",
        DEFAULT_SESSION_UNREPLIED_TIMEOUT_MS,
        1,
    )?;
    let max_sessions = cx.ranged(
        &raw.max_sessions,
        scope(),
        "max_sessions",
        1..=(1 << 24),
        DEFAULT_MAX_SESSIONS,
        "",
    )?;
    let buffer_bytes = cx.ranged(
        &raw.buffer_bytes,
        scope(),
        "buffer_bytes",
        BUFFER_BYTES_RANGE.0..=BUFFER_BYTES_RANGE.1,
        DEFAULT_BUFFER_BYTES,
        " (bytes)",
    )?;
    use crate::proto::proxy_header::ProxyProtocol;
    let proxy_protocol = match &raw.proxy_protocol {
        None => None,
        Some(p) => match p.get_ref().as_str() {
            "v1" => Some(ProxyProtocol::V1),
            "v2" => Some(ProxyProtocol::V2),
            other => {
                return Err(cx.invalid(
                    p.span(),
                    scope(),
                    "proxy_protocol",
                    format!("unknown PROXY protocol version {other:?} (expected \"v1\" or \"v2\")"),
                ))
            }
        },
    };
    use super::SpliceMode;
    let splice = match &raw.splice {
        None => super::DEFAULT_SPLICE,
        Some(p) => match p.get_ref().as_str() {
            "off" => SpliceMode::Off,
            "on" => SpliceMode::On,
            "auto" => SpliceMode::Auto,
            other => {
                return Err(cx.invalid(
                    p.span(),
                    scope(),
                    "splice",
                    format!("unknown value {other:?} (expected \"off\", \"on\" or \"auto\")"),
                ))
            }
        },
    };
    Ok(ProxyConfig {
        upstreams,
        upstream_zones,
        upstream_netns,
        upstream_netns_path: None,
        upstream_netns_line: raw
            .upstream_netns
            .as_ref()
            .map_or(0, |n| cx.lines.of_span(n.span())),
        connect_timeout_ms,
        idle_timeout_ms,
        buffer_bytes,
        proxy_protocol,
        splice,
        session_idle_timeout_ms,
        session_unreplied_timeout_ms,
        max_sessions,
    })
}

/// `[IPV6%NAME]:PORT` with an interface name as the zone (RFC 6874's textual
/// form; std parses numeric zones only): the address with scope id 0 and the
/// name, which [`super::Config::resolve_zones`] turns into an index. `None` for
/// anything else (a numeric zone, a name longer than IFNAMSIZ − 1 = 15 bytes or
/// with `/`, whitespace or `%`).
fn parse_named_zone(s: &str) -> Option<(SocketAddr, Option<String>)> {
    let rest = s.strip_prefix('[')?;
    let (inside, port) = rest.split_once("]:")?;
    let (ip, zone) = inside.split_once('%')?;
    let bad = |c: char| c == '/' || c == '%' || c.is_whitespace() || c.is_control();
    if zone.is_empty() || zone.len() > 15 || zone.contains(bad) || zone.parse::<u32>().is_ok() {
        return None;
    }
    let ip: std::net::Ipv6Addr = ip.parse().ok()?;
    let port: u16 = port.parse().ok()?;
    Some((
        SocketAddr::V6(std::net::SocketAddrV6::new(ip, port, 0, 0)),
        Some(zone.to_string()),
    ))
}
