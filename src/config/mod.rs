//! The configuration file: parsing, validation and compiler-style error messages.
//!
//! The file is TOML:
//!
//! ```toml
//! netns_dir = "/run/netns"   # optional; where bare namespace names (and globs) are resolved
//!
//! [runtime]
//! workers = 2                # optional; 1..=1024, default: online CPUs
//! io = "auto"                # optional; "uring" | "epoll" | "auto"
//! shutdown_timeout_ms = 10000 # optional; how long open connections may finish (ms)
//! takeover_socket = "/run/ringress/takeover.sock" # optional; hands the listeners to
//!                            #   `ringress run NEW.toml --takeover PATH` (binary upgrade)
//! shards = "by-worker"       # optional; default of the listeners' `shards`, see [`Shards`]
//!
//! [admin]
//! listen = "127.0.0.1:9900"  # optional table; GET /metrics, /status, /healthz
//!
//! [[listener]]
//! name = "alpha"             # optional, unique; default "{netns or root}-{proto}-{listen}"
//! netns = "ns-alpha"         # optional; a name under netns_dir, an absolute path, or a glob
//! proto = "tcp"              # optional; "tcp" (default) | "udp" | "sctp"
//! listen = "[::]:8080"       # required; a socket address, IPv4 or IPv6
//! action = "echo"            # required; "echo" | "respond" | "http" | "proxy"
//!                            #   (UDP and SCTP: "echo" | "proxy")
//! respond = "ack"            # required iff action = "respond"; non-empty
//! backlog = 1024             # optional, TCP and SCTP; listen(2) backlog, 1..=65535
//! shards = 1                 # optional, TCP and one-to-one SCTP; "by-worker" (default:
//!                            #   [runtime] shards) or 1..=workers shared sockets, see [`Shards`]
//! ```
//!
//! `action = "proxy"` takes `upstream = "ADDR:PORT"` or `upstreams = [...]`
//! (round-robin) and optionally `upstream_netns`; TCP and SCTP proxies also
//! `connect_timeout_ms` (default 5000), `idle_timeout_ms` (default 600000; also
//! on TCP and SCTP `echo` listeners; 0 = none) and
//! `buffer_bytes` (window per direction, default 64 KiB), TCP ones `proxy_protocol`
//! (`"v1"` | `"v2"`) and `splice` (`"off"` | `"on"` | `"auto"`, see [`SpliceMode`]). UDP listeners take `max_datagram_bytes` (default 65507) and,
//! when proxying, `session_idle_timeout_ms` (default 30000),
//! `session_unreplied_timeout_ms` (default 5000) and `max_sessions` (default 4096). SCTP listeners take `sctp_style` (`"one-to-one"` (default) |
//! `"one-to-many"`), `sctp_streams` (default 16) and `max_message_bytes` (default
//! 256 KiB). `action = "http"` takes `header_timeout_ms` (default 10000) and
//! `keepalive_timeout_ms` (default 75000), see [`HttpConfig`]. A key given for a
//! protocol or action it does not apply to is an error.
//!
//! [`Config::parse`] and [`Config::load`] check everything that can be checked from
//! the text alone; [`Config::check_namespaces`] additionally checks that every
//! namespace exists. Every error names the file, the 1-based line and the key at
//! fault, like a compiler diagnostic: `ringress.toml:9: listener #2: key `respond`: ...`.
//!
//! Layout: `raw` is the serde form of the file (with spans), `validate` turns it
//! into the types below, `diag` holds [`ConfigError`] and the span-to-line mapping.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use crate::netns::{open_netns, NetnsRef, NsId, DEFAULT_NETNS_DIR};

mod diag;
mod raw;
#[cfg(test)]
mod tests;
mod validate;

pub use diag::ConfigError;

use diag::Lines;
use raw::RawConfig;
use validate::{check_unique, convert_listener, convert_runtime, Ctx};

/// Largest accepted `workers` value.
pub const MAX_WORKERS: usize = 1024;
/// Fixed part of the fd margin of [`Config::fds_needed`] (counts): a one-worker
/// process with an admin endpoint holds 13 fds besides its listener sockets
/// (stdio, signalfd, inotify, the instance lock, the root namespace, eventfds).
pub const FD_MARGIN_BASE: u64 = 16;
/// Per-worker part of the fd margin of [`Config::fds_needed`] (counts): a
/// worker's ring or epoll instance and eventfds (2 measured).
pub const FD_MARGIN_PER_WORKER: u64 = 4;
/// Default `listen(2)` backlog of a listener.
pub const DEFAULT_BACKLOG: u32 = 1024;
/// Largest accepted `backlog` value.
pub const MAX_BACKLOG: u32 = 65535;

/// Which I/O driver the workers use (`[runtime] io`, or `--io` on the command line).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IoChoice {
    /// io_uring; fail at startup if the kernel or build does not support it.
    Uring,
    /// epoll with non-blocking syscalls.
    Epoll,
    /// io_uring when available, otherwise epoll.
    Auto,
}

impl IoChoice {
    /// The config spelling: `"uring"`, `"epoll"` or `"auto"`.
    pub fn as_str(self) -> &'static str {
        match self {
            IoChoice::Uring => "uring",
            IoChoice::Epoll => "epoll",
            IoChoice::Auto => "auto",
        }
    }
}

impl FromStr for IoChoice {
    type Err = String;

    /// Parses `"uring"`, `"epoll"` or `"auto"` (exact, lower case).
    ///
    /// # Errors
    /// A message naming the value and the accepted spellings.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "uring" => Ok(IoChoice::Uring),
            "epoll" => Ok(IoChoice::Epoll),
            "auto" => Ok(IoChoice::Auto),
            _ => Err(format!(
                "unknown io driver {s:?} (expected \"uring\", \"epoll\" or \"auto\")"
            )),
        }
    }
}

impl fmt::Display for IoChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The transport protocol of a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proto {
    /// TCP (`SOCK_STREAM`).
    Tcp,
    /// UDP (`SOCK_DGRAM`): actions `echo` and `proxy` (per-client sessions).
    Udp,
    /// SCTP (RFC 9260), one-to-one or one-to-many: actions `echo` and `proxy`,
    /// messages kept whole with their stream id and PPID.
    Sctp,
}

impl Proto {
    /// The config spelling, `"tcp"`, `"udp"` or `"sctp"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Sctp => "sctp",
        }
    }
}

impl FromStr for Proto {
    type Err = String;

    /// Parses `"tcp"`, `"udp"` or `"sctp"`.
    ///
    /// # Errors
    /// An "unknown proto" message for anything else.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "tcp" => Ok(Proto::Tcp),
            "udp" => Ok(Proto::Udp),
            "sctp" => Ok(Proto::Sctp),
            _ => Err(format!(
                "unknown proto {s:?} (expected \"tcp\", \"udp\" or \"sctp\")"
            )),
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a listener does with each accepted connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send every received byte back.
    Echo,
    /// Send these bytes (never empty), then close.
    Respond(Vec<u8>),
    /// Answer HTTP/1.x requests, with these deadlines.
    Http(HttpConfig),
    /// Forward bytes both ways to an upstream.
    Proxy(Arc<ProxyConfig>),
}

/// Default `header_timeout_ms` of an http listener (ms): 10 s. A whole request
/// head must arrive within it (from the connection's opening for the first
/// head, from its first byte for later ones), or the client gets 408 and the
/// connection closes. nginx's `client_header_timeout` is 60 s; HAProxy's manual
/// uses `timeout http-request 10s` in its examples, and Envoy recommends a
/// `request_headers_timeout` of seconds for edge proxies: the `http` action
/// answers health checks and load generators, whose heads come in one packet,
/// so the shorter deadline costs them nothing and bounds slow-head clients
/// (slowloris) six times sooner.
pub const DEFAULT_HEADER_TIMEOUT_MS: u64 = 10_000;
/// Default `keepalive_timeout_ms` of an http listener (ms): 75 s, nginx's
/// `keepalive_timeout`. An idle keep-alive connection (no request in progress,
/// its answers sent) closes cleanly after it. Longer than the 60 s idle timeout
/// common in load balancers in front (AWS ALB, nginx), so that they, not we,
/// close an idle pooled connection, and never race a request against our close.
pub const DEFAULT_KEEPALIVE_TIMEOUT_MS: u64 = 75_000;

/// The settings of `action = "http"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HttpConfig {
    /// `header_timeout_ms`: the longest a request head may take, from the
    /// connection's opening (first head) or the head's first byte (later heads)
    /// to its end (ms, 1..=[`MAX_TIMEOUT_MS`], default
    /// [`DEFAULT_HEADER_TIMEOUT_MS`]); also the longest a request body may
    /// stall between reads. Expiry: 408 if a head (or a body whose answer is
    /// owed) is in progress, then a lingering close.
    pub header_timeout_ms: u64,
    /// `keepalive_timeout_ms`: how long a connection may stay idle between
    /// requests, counted from the end of the last request or from when its
    /// answer was last taken by the kernel, whichever is later (ms,
    /// 1..=[`MAX_TIMEOUT_MS`], default [`DEFAULT_KEEPALIVE_TIMEOUT_MS`]). Expiry:
    /// a clean close.
    ///
    /// In code (never from the file, which takes 1 and up), 0 in either field
    /// means no such deadline.
    pub keepalive_timeout_ms: u64,
}

impl Default for HttpConfig {
    /// [`DEFAULT_HEADER_TIMEOUT_MS`] and [`DEFAULT_KEEPALIVE_TIMEOUT_MS`].
    fn default() -> Self {
        HttpConfig {
            header_timeout_ms: DEFAULT_HEADER_TIMEOUT_MS,
            keepalive_timeout_ms: DEFAULT_KEEPALIVE_TIMEOUT_MS,
        }
    }
}

/// Default `idle_timeout_ms` of `echo` and `proxy` listeners (ms): 10 minutes,
/// nginx stream's `proxy_timeout` default (Envoy's TCP proxy uses 1 h, HAProxy
/// ships none and warns). A connection with no byte either way for this long is
/// closed cleanly (FIN, lingering close); 0 disables it.
pub const DEFAULT_IDLE_TIMEOUT_MS: u64 = 600_000;

/// Default `connect_timeout_ms` of a proxy listener (ms).
pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 5000;
/// Default `buffer_bytes` of a proxy listener: the window of each direction (bytes).
pub const DEFAULT_BUFFER_BYTES: usize = 64 * 1024;
/// Smallest and largest accepted `buffer_bytes` (bytes).
pub const BUFFER_BYTES_RANGE: (usize, usize) = (4096, 64 << 20);
/// `splice` of a TCP proxy listener: whether each direction relays its bytes
/// socket → pipe → socket with splice(2) (the bytes stay in the kernel, no copy
/// to and from user space) instead of receiving them into a user-space buffer
/// and sending them from there. The pipe is the direction's window: it holds at
/// most `buffer_bytes`, so back-pressure and memory bounds are as without it. A
/// pipe costs 2 fds per direction, charged to the fd budget; a session that
/// cannot have them relays through user space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpliceMode {
    /// `"off"`: never; every byte goes through user space.
    Off,
    /// `"on"`: every direction, from its first byte (after a PROXY header,
    /// which is sent from user space first).
    On,
    /// `"auto"`: a direction switches to splice(2), for the rest of the
    /// session, the first time one receive fills a whole receive buffer (16 KiB:
    /// that much was waiting in the socket at once, as in a bulk transfer), in
    /// the spirit of HAProxy's `option splice-auto` (splice once the kernel may
    /// hold more than a buffer); small request/response traffic stays in user
    /// space.
    Auto,
}

impl SpliceMode {
    /// The key's value: "off", "on", "auto".
    pub fn as_str(self) -> &'static str {
        match self {
            SpliceMode::Off => "off",
            SpliceMode::On => "on",
            SpliceMode::Auto => "auto",
        }
    }
}

/// Default `splice` of a TCP proxy listener: `"auto"`. Measured on the
/// 2-CPU test machine (BENCHMARKS.md, "Splice"): a 1 GiB bulk transfer costs
/// 0.32–0.33 s of proxy CPU per GiB with it (as HAProxy with splice) against
/// 0.82–0.93 s without, while 50 keep-alive connections of small requests keep
/// their req/s (1.00–1.06x paired); `"on"` costs those small requests 0.70x
/// (io_uring) and 0.81x (epoll) req/s.
pub const DEFAULT_SPLICE: SpliceMode = SpliceMode::Auto;

/// Largest accepted timeout in ms (one day).
pub const MAX_TIMEOUT_MS: u64 = 86_400_000;

/// The upstream side of `action = "proxy"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyConfig {
    /// Upstream addresses (`upstream = "A"` or `upstreams = ["A", "B"]`), used
    /// round-robin; one that just refused or timed out is skipped for a few seconds.
    pub upstreams: Vec<SocketAddr>,
    /// Upstreams whose IPv6 zone is an interface name (`[fe80::2%eth0]:80`), as
    /// (index in `upstreams`, interface name): their scope id is 0 until
    /// [`Config::resolve_zones`] looks the name up in the upstreams' namespace.
    pub upstream_zones: Vec<(usize, String)>,
    /// Namespace of the upstreams; `None` is the namespace ringress started in.
    pub upstream_netns: Option<NetnsRef>,
    /// Resolved namespace file of `upstream_netns` (set by [`Config::parse`]).
    pub upstream_netns_path: Option<PathBuf>,
    /// 1-based line of the `upstream_netns` key (0 when absent), for errors.
    pub upstream_netns_line: usize,
    /// How long a connect to an upstream may take before the client is closed (ms).
    pub connect_timeout_ms: u64,
    /// Close a session with no traffic for this long (ms); 0 = never; default
    /// [`DEFAULT_IDLE_TIMEOUT_MS`].
    pub idle_timeout_ms: u64,
    /// Window of each direction (bytes): a side stops reading while the other side
    /// has this much unsent.
    pub buffer_bytes: usize,
    /// PROXY protocol header to send to the upstream first, if any (TCP only).
    pub proxy_protocol: Option<crate::proto::proxy_header::ProxyProtocol>,
    /// TCP: when a direction relays socket → pipe → socket with splice(2)
    /// instead of through a user-space buffer (key `splice`, default
    /// [`DEFAULT_SPLICE`]).
    pub splice: SpliceMode,
    /// UDP: a client session with no datagram either way for this long ends (ms).
    pub session_idle_timeout_ms: u64,
    /// UDP: a client session whose upstream has never answered ends after this long
    /// without a datagram from the client (ms); at most `session_idle_timeout_ms`
    /// applies.
    pub session_unreplied_timeout_ms: u64,
    /// UDP: most client sessions of the listener at once (count); datagrams of new
    /// clients beyond it are dropped and counted.
    pub max_sessions: usize,
}

#[cfg(test)]
impl ProxyConfig {
    /// A config for unit tests: one upstream 127.0.0.1:1 in the root namespace,
    /// connect timeout 1000 ms, no idle timeout, 4096-byte windows, no PROXY
    /// header, UDP sessions idle 30 s, at most one UDP session. Tests change
    /// fields with struct-update syntax.
    pub(crate) fn test() -> ProxyConfig {
        ProxyConfig {
            upstreams: vec!["127.0.0.1:1".parse().expect("literal")],
            upstream_zones: Vec::new(),
            upstream_netns: None,
            upstream_netns_path: None,
            upstream_netns_line: 0,
            connect_timeout_ms: 1000,
            idle_timeout_ms: 0,
            buffer_bytes: 4096,
            proxy_protocol: None,
            splice: SpliceMode::Off,
            session_idle_timeout_ms: 30_000,
            session_unreplied_timeout_ms: 5_000,
            max_sessions: 1,
        }
    }
}

/// Default `session_idle_timeout_ms` of a UDP proxy listener (ms).
pub const DEFAULT_SESSION_IDLE_TIMEOUT_MS: u64 = 30_000;
/// Default `session_unreplied_timeout_ms` of a UDP proxy listener (ms). Linux
/// conntrack ends an unreplied UDP flow after 30 s (`nf_conntrack_udp_timeout`,
/// Documentation/networking/nf_conntrack-sysctl.rst) and an assured one after
/// 120 s; ringress's idle timeout is already conntrack's unreplied one, scaled
/// down. An upstream next to an ingress answers within milliseconds, and a client
/// that retries (the glibc resolver waits 5 s, resolv.conf(5) `timeout`) refreshes
/// its session with each datagram: 5 s keeps such a client's session while a
/// sender that never gets an answer (a port scan, rotated or spoofed sources)
/// holds each socket 5 s instead of 30 s.
pub const DEFAULT_SESSION_UNREPLIED_TIMEOUT_MS: u64 = 5_000;
/// Default `max_sessions` of a UDP proxy listener (count). Each session holds one
/// upstream socket (one fd, about 1-2 KiB of kernel and table memory). 4,096 lets
/// 128 listeners at their limit stay within systemd's default hard fd limit
/// (524,288) and serves about 136 new clients/s that get answers (30 s idle) or
/// 800/s that do not (5 s unreplied); a listener with more clients sets it higher.
pub const DEFAULT_MAX_SESSIONS: usize = 4_096;
/// Default and largest `max_datagram_bytes` of a UDP listener (bytes): the largest
/// UDP payload over IPv4 (65,535 - 8 - 20).
pub const MAX_DATAGRAM_BYTES: usize = 65_507;
/// Default `sctp_streams`: outbound and most inbound streams per association (count).
pub const DEFAULT_SCTP_STREAMS: u16 = 16;
/// Default `max_message_bytes` of an SCTP listener (bytes).
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 256 * 1024;
/// Largest accepted `max_message_bytes` (bytes).
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// The SCTP settings of a listener (`proto = "sctp"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SctpConfig {
    /// `sctp_style`: `"one-to-one"` (SOCK_STREAM, default) or `"one-to-many"`
    /// (SOCK_SEQPACKET).
    pub style: crate::sctp::Style,
    /// `sctp_streams`: outbound and most inbound streams (SCTP_INITMSG), 1..=65535,
    /// default [`DEFAULT_SCTP_STREAMS`].
    pub streams: u16,
    /// `max_message_bytes`: the largest message reassembled (bytes, default
    /// [`DEFAULT_MAX_MESSAGE_BYTES`]); a larger one aborts its association.
    pub max_message_bytes: usize,
}

impl Default for SctpConfig {
    fn default() -> Self {
        SctpConfig {
            style: crate::sctp::Style::OneToOne,
            streams: DEFAULT_SCTP_STREAMS,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
        }
    }
}

impl SctpConfig {
    /// Socket options for this listener's sockets (and its upstream sockets): the
    /// stream count, and buffers that hold a whole message.
    pub fn socket_opts(&self) -> crate::sctp::SocketOpts {
        crate::sctp::SocketOpts {
            streams: self.streams,
            buffer_bytes: self.max_message_bytes.max(256 * 1024),
            max_message: self.max_message_bytes,
        }
    }
}

impl Action {
    /// The config spelling of the action: `"echo"`, `"respond"` or `"http"`.
    pub fn kind(&self) -> &'static str {
        match self {
            Action::Echo => "echo",
            Action::Respond(_) => "respond",
            Action::Http(_) => "http",
            Action::Proxy(_) => "proxy",
        }
    }
}

/// The `[runtime]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Runtime {
    /// Number of worker threads, 1..=[`MAX_WORKERS`].
    pub workers: usize,
    /// Which I/O driver the workers use.
    pub io: IoChoice,
    /// On SIGTERM/SIGINT, how long open connections may go on before they are
    /// closed (ms); default [`DEFAULT_SHUTDOWN_TIMEOUT_MS`].
    pub shutdown_timeout_ms: u64,
    /// Where the running process listens (unix stream socket, mode 0600) for a new
    /// process that takes its listening sockets over (`ringress run --takeover
    /// PATH`, [`crate::takeover`]); `None`: no takeover. An absolute path of at most
    /// 107 bytes (`sun_path`, unix(7)).
    pub takeover_socket: Option<PathBuf>,
    /// Most sessions open at once in the process (TCP connections, SCTP
    /// associations, UDP proxy sessions; counts); 0 (the default): no count limit,
    /// only the fd budget ([`crate::driver::budget`]).
    pub max_connections: u64,
    /// File descriptors kept out of the session fd budget (counts), for the admin
    /// endpoint, reload, the binder's pools and new listeners; default
    /// [`DEFAULT_FD_RESERVE`].
    pub fd_reserve: u64,
    /// The share of the session fd budget that the listeners of one namespace may
    /// hold together (percent, 1..=100); default [`DEFAULT_NETNS_FD_SHARE`].
    pub netns_fd_share: u64,
    /// The `shards` of every TCP and one-to-one SCTP listener that does not set its
    /// own; default [`Shards::ByWorker`]. UDP and one-to-many SCTP listeners do not
    /// take it (see [`Shards`]).
    pub shards: Shards,
}

/// How many listening sockets a listener has and how the workers share them
/// (`shards`, per listener or as the `[runtime]` default; HAProxy's `shards` bind
/// option is the model).
///
/// - [`Shards::ByWorker`] (`"by-worker"`, the default): one SO_REUSEPORT socket
///   per worker. The kernel spreads new connections over the sockets by a hash of
///   the 4-tuple (socket(7), SO_REUSEPORT), each worker has its own accept queue,
///   and the listener costs `workers` fds.
/// - [`Shards::Count`] (a number N, 1..=workers): N sockets; worker `i` accepts on
///   socket `i % N` (workers sharing a socket use its one fd, no dup). N = 1 is
///   one socket, one accept queue and one fd for all workers, and a connection goes
///   to whichever worker accepts first. A count above the running worker count (`--workers` lower than the
///   file's) is served as one socket per worker.
///
/// Only TCP and one-to-one SCTP listeners take a count: a UDP socket shared by
/// workers would split one client's datagrams (and its proxy session) over them,
/// and a one-to-many SCTP listener is always one socket owned by one worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Shards {
    /// One socket per worker (`"by-worker"`).
    #[default]
    ByWorker,
    /// This many sockets (counts, 1..=workers), shared round-robin by the workers.
    Count(usize),
}

impl Shards {
    /// The listening sockets a listener with these shards has when `workers`
    /// workers run (counts, at least 1).
    pub fn sockets(self, workers: usize) -> usize {
        match self {
            Shards::ByWorker => workers.max(1),
            Shards::Count(n) => n.clamp(1, workers.max(1)),
        }
    }
}

impl fmt::Display for Shards {
    /// The config spelling: `by-worker` or the count.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Shards::ByWorker => f.write_str("by-worker"),
            Shards::Count(n) => write!(f, "{n}"),
        }
    }
}

/// Default `[runtime] fd_reserve` (fds).
pub const DEFAULT_FD_RESERVE: u64 = 256;
/// Default `[runtime] netns_fd_share` (percent).
pub const DEFAULT_NETNS_FD_SHARE: u64 = 50;
/// Largest `max_connections` (counts).
pub const MAX_CONNECTIONS: u64 = 1 << 30;

/// Default `[runtime] shutdown_timeout_ms` (ms).
pub const DEFAULT_SHUTDOWN_TIMEOUT_MS: u64 = 10_000;

impl Default for Runtime {
    /// [`default_workers`] workers, [`IoChoice::Auto`], a 10 s shutdown timeout.
    fn default() -> Self {
        Runtime {
            workers: default_workers(),
            io: IoChoice::Auto,
            shutdown_timeout_ms: DEFAULT_SHUTDOWN_TIMEOUT_MS,
            takeover_socket: None,
            max_connections: 0,
            fd_reserve: DEFAULT_FD_RESERVE,
            netns_fd_share: DEFAULT_NETNS_FD_SHARE,
            shards: Shards::ByWorker,
        }
    }
}

/// The default worker count: the number of CPUs this process may run on
/// (`std::thread::available_parallelism`), 1 if unknown, at most [`MAX_WORKERS`].
pub fn default_workers() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, MAX_WORKERS)
}

/// One validated `[[listener]]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerConfig {
    /// Unique name: as given, or derived as `"{netns or root}-{proto}-{listen}"`,
    /// e.g. `"ns-a-tcp-[::]:8080"` or `"root-tcp-127.0.0.1:7000"`.
    pub name: String,
    /// The namespace to listen in; `None` is the namespace ringress started in.
    pub netns: Option<NetnsRef>,
    /// Transport protocol.
    pub proto: Proto,
    /// Address and port to bind (never port 0: each worker's socket would get its
    /// own ephemeral port).
    pub listen: SocketAddr,
    /// What to do with each connection.
    pub action: Action,
    /// `listen(2)` backlog, 1..=[`MAX_BACKLOG`].
    pub backlog: u32,
    /// 1-based line of the `[[listener]]` header (or of the `{` of an inline table)
    /// in the config file.
    pub line: usize,
    /// 1-based line of the `netns` key (the listener's `line` when there is none),
    /// for errors about the namespace.
    pub netns_line: usize,
    /// UDP: largest datagram accepted (bytes, 1..=[`MAX_DATAGRAM_BYTES`]); larger
    /// ones are dropped and counted, never forwarded truncated.
    pub max_datagram_bytes: usize,
    /// SCTP: style, streams and largest message (defaults for other protocols).
    pub sctp: SctpConfig,
    /// `echo` over TCP or SCTP: close a connection (association) with no byte
    /// either way for this long (ms; 0 = never; default
    /// [`DEFAULT_IDLE_TIMEOUT_MS`]; one-to-many SCTP: SCTP_AUTOCLOSE, whole
    /// seconds). A proxy's is in its
    /// [`ProxyConfig`]; `http` has `header_timeout_ms`/`keepalive_timeout_ms`
    /// instead, and `respond` closes after its answer.
    pub idle_timeout_ms: u64,
    /// Most sessions of this listener open at once (counts; each template instance
    /// on its own); 0 (the default): no per-listener limit. At the limit the
    /// listener stops accepting (the kernel's backlog holds new connections) and
    /// resumes below it.
    pub max_connections: u64,
    /// Listening sockets and how workers share them: the listener's `shards` key,
    /// else `[runtime] shards` (TCP and one-to-one SCTP), else
    /// [`Shards::ByWorker`]. A reload that changes it binds the listener anew.
    pub shards: Shards,
}

impl ListenerConfig {
    /// The namespace label for logs and derived names: the namespace name or path
    /// as given, or `"root"` when the listener has no `netns`.
    pub fn netns_label(&self) -> String {
        self.netns
            .as_ref()
            .map_or_else(|| "root".to_string(), NetnsRef::label)
    }
}

/// A validated configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The file the configuration came from (as given; used in messages).
    pub source: PathBuf,
    /// Directory under which bare namespace names are resolved (default
    /// [`DEFAULT_NETNS_DIR`]).
    pub netns_dir: PathBuf,
    /// The `[runtime]` settings, with defaults filled in.
    pub runtime: Runtime,
    /// The listeners in file order; at least one, names unique.
    pub listeners: Vec<ListenerConfig>,
    /// `[admin] listen`: where /metrics, /status and /healthz are served; `None`
    /// (the default) serves nothing.
    pub admin: Option<SocketAddr>,
}

impl Default for Config {
    /// No listeners, default runtime, names resolved under [`DEFAULT_NETNS_DIR`],
    /// no admin endpoint; for building a config in code (`..Default::default()`).
    fn default() -> Self {
        Config {
            source: PathBuf::from("<built-in>"),
            netns_dir: PathBuf::from(DEFAULT_NETNS_DIR),
            runtime: Runtime::default(),
            listeners: Vec::new(),
            admin: None,
        }
    }
}

/// Which listener an error is about: by name (given or derived) or, when no name
/// is known yet, by its 1-based position in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenerId {
    /// The listener's name; displays as `listener "NAME"`.
    Name(String),
    /// 1-based index among the `[[listener]]` tables; displays as `listener #N`.
    Index(usize),
}

impl fmt::Display for ListenerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenerId::Name(n) => write!(f, "listener {n:?}"),
            ListenerId::Index(i) => write!(f, "listener #{i}"),
        }
    }
}

/// Where in the file an [`ConfigError::Invalid`] key lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// A top-level key such as `netns_dir`.
    Top,
    /// A key of the `[runtime]` table.
    Runtime,
    /// A key of a `[[listener]]` table.
    Listener(ListenerId),
}

impl fmt::Display for Scope {
    /// Empty, `[runtime]: ` or `listener "NAME": ` (a prefix for messages).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::Top => Ok(()),
            Scope::Runtime => f.write_str("[runtime]: "),
            Scope::Listener(id) => write!(f, "{id}: "),
        }
    }
}

impl Config {
    /// Reads, parses and validates the config file at `path` (see [`Config::parse`]).
    /// Namespaces are not checked; see [`Config::check_namespaces`].
    ///
    /// # Errors
    /// [`ConfigError::Io`] if the file cannot be read or is not UTF-8, otherwise
    /// as [`Config::parse`].
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            file: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Parses and validates config text; `source` names the file in messages and
    /// is stored in [`Config::source`]. Fills in defaults (workers, io, proto,
    /// backlog, listener names, proxy, UDP and SCTP settings). Namespaces are not
    /// checked.
    ///
    /// # Errors
    /// - [`ConfigError::Parse`]: malformed TOML or a value of the wrong TOML type;
    /// - [`ConfigError::UnknownKey`]: a key the format does not define;
    /// - [`ConfigError::Invalid`]: a bad value (out of range, an unknown spelling,
    ///   a bad socket address or namespace name), a missing `listen`, `action`,
    ///   `respond` or upstream, a key or action given for a protocol or action it
    ///   does not apply to (e.g. `respond` with an action other than "respond",
    ///   `max_sessions` on a TCP listener), a listen port of 0, a link-local IPv6
    ///   upstream without a zone, a NETNS TLV longer than
    ///   [`crate::proto::proxy_header::MAX_NETNS_TLV_BYTES`], a duplicate listener
    ///   name, or two listeners on the same address and protocol in the same
    ///   namespace reference (other spellings: [`Config::check_namespaces`]);
    /// - [`ConfigError::NoListeners`]: no `[[listener]]` table.
    ///
    /// The first error in file order is returned.
    pub fn parse(text: &str, source: &Path) -> Result<Config, ConfigError> {
        let cx = Ctx {
            file: source,
            lines: Lines::new(text),
        };
        let raw: RawConfig = toml::from_str(text).map_err(|e| cx.toml_error(e))?;

        let netns_dir = match &raw.netns_dir {
            None => PathBuf::from(DEFAULT_NETNS_DIR),
            Some(d) => {
                let s = d.get_ref();
                if s.is_empty() || s.contains('\0') {
                    return Err(cx.invalid(
                        d.span(),
                        Scope::Top,
                        "netns_dir",
                        "must be a non-empty path without NUL bytes",
                    ));
                }
                PathBuf::from(s)
            }
        };

        let runtime = match &raw.runtime {
            None => Runtime::default(),
            Some(rt) => convert_runtime(&cx, rt.get_ref())?,
        };

        let mut listeners = Vec::with_capacity(raw.listener.len());
        for (i, l) in raw.listener.iter().enumerate() {
            listeners.push(convert_listener(
                &cx,
                &runtime,
                i + 1,
                l.span(),
                l.get_ref(),
            )?);
        }
        if listeners.is_empty() {
            return Err(ConfigError::NoListeners {
                file: source.to_path_buf(),
            });
        }

        check_unique(&cx, &raw.listener, &listeners)?;
        for l in &mut listeners {
            if let Action::Proxy(p) = &mut l.action {
                if let Some(ns) = &p.upstream_netns {
                    let path = ns.path_in(&netns_dir);
                    Arc::make_mut(p).upstream_netns_path = Some(path);
                }
            }
        }

        let admin = match &raw.admin {
            None => None,
            Some(a) => {
                let l = &a.get_ref().listen;
                Some(l.get_ref().trim().parse::<SocketAddr>().map_err(|_| {
                    cx.invalid(
                        l.span(),
                        Scope::Top,
                        "admin.listen",
                        format!(
                            "invalid socket address {:?} (expected e.g. \"127.0.0.1:9900\")",
                            l.get_ref()
                        ),
                    )
                })?)
            }
        };

        Ok(Config {
            source: source.to_path_buf(),
            netns_dir,
            runtime,
            listeners,
            admin,
        })
    }

    /// Checks that every listener's namespace exists and is a network namespace
    /// file ([`crate::netns::open_netns`] on [`Config::netns_path`]), and that no two
    /// listeners share a protocol and address in one namespace, whatever its
    /// spelling: namespaces are compared by identity ([`NsId`], the nsfs device and
    /// inode), so `a`, `/run/netns/a`, a bind mount of it and `/proc/PID/ns/net` of a
    /// process inside it are one namespace, and a listener without `netns` is in
    /// the namespace ringress runs in (`/proc/self/ns/net`). Templates (globs) are
    /// expanded at run time and skipped here.
    ///
    /// Linear: each namespace file is opened once, however many listeners name it
    /// (10 listeners in each of 1,000 namespaces cost 1,000 opens, not 10,000), and
    /// addresses are compared through one hash map.
    ///
    /// # Errors
    /// [`ConfigError::Netns`] for the first listener (in file order) whose
    /// namespace is missing, unreadable or not a network namespace;
    /// [`ConfigError::Invalid`] (key `netns`) for the second of two listeners on
    /// one protocol and address in one namespace, naming both and the namespace.
    pub fn check_namespaces(&self) -> Result<(), ConfigError> {
        // Only successes are cached: the first failure ends the check.
        let mut ids: HashMap<PathBuf, NsId> = HashMap::new();
        // `None`: /proc is unreadable; root listeners then compare as one namespace.
        let own = NsId::own().ok();
        let mut addrs: HashMap<(Option<NsId>, Proto, SocketAddr), &ListenerConfig> = HashMap::new();
        for l in &self.listeners {
            let mut refs = Vec::with_capacity(2);
            let mut skip_addr = false;
            if let (Some(ns), Some(path)) = (&l.netns, self.netns_path(l)) {
                // A template's namespaces are found at run time.
                if ns.is_glob() {
                    skip_addr = true;
                } else {
                    refs.push(("netns", l.netns_line, ns, path));
                }
            }
            if let Action::Proxy(p) = &l.action {
                if let (Some(ns), Some(path)) = (&p.upstream_netns, &p.upstream_netns_path) {
                    refs.push(("upstream_netns", p.upstream_netns_line, ns, path.clone()));
                }
            }
            let mut listener_ns = own;
            for (key, line, ns, path) in refs {
                let id = match ids.get(&path) {
                    Some(id) => *id,
                    None => {
                        let id = open_netns(&path).and_then(|f| NsId::of_file(&f)).map_err(
                            |source| ConfigError::Netns {
                                file: self.source.clone(),
                                line,
                                listener: ListenerId::Name(l.name.clone()),
                                key,
                                label: ns.label().into(),
                                path: path.clone().into(),
                                source,
                            },
                        )?;
                        ids.insert(path, id);
                        id
                    }
                };
                if key == "netns" {
                    listener_ns = Some(id);
                }
            }
            if skip_addr {
                continue;
            }
            let key = (listener_ns, l.proto, l.listen);
            if let Some(first) = addrs.get(&key) {
                let same = match listener_ns {
                    Some(id) => format!(" ({id})"),
                    None => String::new(),
                };
                return Err(ConfigError::Invalid {
                    file: self.source.clone(),
                    line: l.netns_line,
                    scope: Scope::Listener(ListenerId::Name(l.name.clone())),
                    key: "netns",
                    message: format!(
                        "{} {} in namespace {:?} is already used by listener {:?} (line {}) \
                         in namespace {:?}: they are the same namespace{same}; two \
                         listeners on one address would split its connections",
                        l.proto,
                        l.listen,
                        l.netns_label(),
                        first.name,
                        first.line,
                        first.netns_label(),
                    ),
                });
            }
            addrs.insert(key, l);
        }
        Ok(())
    }

    /// Resolves the interface-name zones of IPv6 upstreams
    /// ([`ProxyConfig::upstream_zones`], e.g. `[fe80::2%eth0]:80`) to interface
    /// indexes (`if_nametoindex(3)`), inside the upstreams' namespace
    /// (`upstream_netns`, entered by a short-lived thread of its own, which needs
    /// CAP_SYS_ADMIN; else the calling thread's namespace, ringress's own when
    /// called from the main thread or the binder between requests). Each
    /// (namespace, name) pair is looked up once. Run after
    /// [`Config::check_namespaces`].
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] (key `upstream`) naming the listener, the
    /// interface and the namespace when the interface does not exist there or the
    /// namespace cannot be entered.
    pub fn resolve_zones(&mut self) -> Result<(), ConfigError> {
        let mut cache: HashMap<(Option<PathBuf>, String), u32> = HashMap::new();
        let source = self.source.clone();
        for l in &mut self.listeners {
            let Action::Proxy(p) = &mut l.action else {
                continue;
            };
            if p.upstream_zones.is_empty() {
                continue;
            }
            let ns = p.upstream_netns_path.clone();
            let label = p
                .upstream_netns
                .as_ref()
                .map_or_else(|| "root".into(), NetnsRef::label);
            let mut resolved = Vec::with_capacity(p.upstream_zones.len());
            for (i, name) in &p.upstream_zones {
                let key = (ns.clone(), name.clone());
                let index = match cache.get(&key) {
                    Some(&x) => x,
                    None => {
                        let x = crate::netns::if_index_in(ns.as_deref(), name).map_err(|e| {
                            ConfigError::Invalid {
                                file: source.clone(),
                                line: l.line,
                                scope: Scope::Listener(ListenerId::Name(l.name.clone())),
                                key: "upstream",
                                message: format!(
                                    "zone %{name} of upstream {}: no such interface in namespace {label:?} ({e})",
                                    p.upstreams[*i]
                                ),
                            }
                        })?;
                        cache.insert(key, x);
                        x
                    }
                };
                resolved.push((*i, index));
            }
            let p = Arc::make_mut(p);
            for (i, index) in resolved {
                if let SocketAddr::V6(v6) = &mut p.upstreams[i] {
                    v6.set_scope_id(index);
                }
            }
        }
        Ok(())
    }

    /// File descriptors a start needs (counts): every listener's sockets (one
    /// per worker; one for a one-to-many SCTP listener), one per namespace file
    /// (the binder holds it while binding), plus a margin of [`FD_MARGIN_BASE`] +
    /// [`FD_MARGIN_PER_WORKER`] × workers for the process's own fds. Template
    /// listeners are not counted: their namespaces are only known at run time.
    /// Sessions and upstream pools are not counted either: the session budget
    /// ([`crate::driver::budget`]) adapts to what is left.
    pub fn fds_needed(&self) -> u64 {
        let workers = self.runtime.workers.max(1) as u64;
        let namespaces: std::collections::HashSet<PathBuf> = self
            .listeners
            .iter()
            .filter(|l| !l.netns.as_ref().is_some_and(NetnsRef::is_glob))
            .filter_map(|l| self.netns_path(l))
            .collect();
        let sockets: u64 = self
            .listeners
            .iter()
            .filter(|l| !l.netns.as_ref().is_some_and(NetnsRef::is_glob))
            .map(|l| match (l.proto, l.sctp.style) {
                (Proto::Sctp, crate::sctp::Style::OneToMany) => 1,
                _ => workers,
            })
            .sum();
        sockets + namespaces.len() as u64 + FD_MARGIN_BASE + FD_MARGIN_PER_WORKER * workers
    }

    /// Checks [`Config::fds_needed`] against `limit`, the RLIMIT_NOFILE soft limit
    /// `run` will have (it raises the soft limit to the hard one first).
    ///
    /// # Errors
    /// A message naming RLIMIT_NOFILE, the limit, and the fds needed.
    pub fn check_fd_limit(&self, limit: u64) -> Result<(), String> {
        let need = self.fds_needed();
        if need <= limit {
            return Ok(());
        }
        Err(format!(
            "{}: the open-files limit (RLIMIT_NOFILE) is {limit}, but {need} file descriptors \
             are needed at start ({} listener(s) × {} worker socket(s), their namespace \
             files, and {} for the process itself): raise it (ulimit -n, LimitNOFILE= in the systemd unit) or \
             lower `workers`",
            self.source.display(),
            self.listeners.len(),
            self.runtime.workers.max(1),
            FD_MARGIN_BASE + FD_MARGIN_PER_WORKER * self.runtime.workers.max(1) as u64,
        ))
    }

    /// Things that are valid but probably not what was meant, one message each
    /// (printed by `ringress check`): a listener inside a namespace proxying to a
    /// loopback upstream without `upstream_netns`, whose upstream is then looked
    /// up in ringress's own namespace, not the listener's.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        for l in &self.listeners {
            let (Some(ns), Action::Proxy(p)) = (&l.netns, &l.action) else {
                continue;
            };
            if p.upstream_netns.is_some() {
                continue;
            }
            if let Some(u) = p.upstreams.iter().find(|u| u.ip().is_loopback()) {
                out.push(format!(
                    "{}:{}: listener {:?}: upstream {u} is a loopback address, and without \
                     `upstream_netns` it is reached in ringress's own namespace, not in {:?}; \
                     add upstream_netns = {:?} if the upstream runs there",
                    self.source.display(),
                    l.line,
                    l.name,
                    ns.label(),
                    ns.label()
                ));
            }
        }
        out
    }

    /// The namespace file of listener `l`: its `netns` name resolved under
    /// [`Config::netns_dir`], or its path as given; `None` when it has no `netns`.
    pub fn netns_path(&self, l: &ListenerConfig) -> Option<PathBuf> {
        l.netns.as_ref().map(|n| n.path_in(&self.netns_dir))
    }
}
