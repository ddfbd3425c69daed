//! The configuration file: parsing, validation and compiler-style error messages.
//!
//! The file is TOML:
//!
//! ```toml
//! netns_dir = "/run/netns"   # optional; where bare namespace names are resolved
//!
//! [runtime]
//! workers = 2                # optional; 1..=1024, default: online CPUs
//! io = "auto"                # optional; "uring" | "epoll" | "auto"
//!
//! [[listener]]
//! name = "alpha"             # optional, unique; default "{netns or root}-{proto}-{listen}"
//! netns = "ns-alpha"         # optional; a name under netns_dir or an absolute path
//! proto = "tcp"              # optional; only "tcp" for now
//! listen = "[::]:8080"       # required; a socket address, IPv4 or IPv6
//! action = "echo"            # required; "echo" | "respond" | "http"
//! respond = "ack"            # required iff action = "respond"; non-empty
//! backlog = 1024             # optional; listen(2) backlog, 1..=65535
//! ```
//!
//! [`Config::parse`] and [`Config::load`] check everything that can be checked from
//! the text alone; [`Config::check_namespaces`] additionally checks that every
//! namespace exists. Every error names the file, the 1-based line and the key at
//! fault, like a compiler diagnostic: `ringress.toml:9: listener #2: key `respond`: ...`.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use serde::Deserialize;
use toml::Spanned;

use crate::netns::{check_netns, NetnsRef, DEFAULT_NETNS_DIR};

/// Largest accepted `workers` value.
pub const MAX_WORKERS: usize = 1024;
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
    /// Answer HTTP/1.x requests.
    Http,
    /// Forward bytes both ways to an upstream.
    Proxy(Arc<ProxyConfig>),
}

/// Default `connect_timeout_ms` of a proxy listener (ms).
pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 5000;
/// Default `buffer_bytes` of a proxy listener: the window of each direction (bytes).
pub const DEFAULT_BUFFER_BYTES: usize = 64 * 1024;
/// Smallest and largest accepted `buffer_bytes` (bytes).
pub const BUFFER_BYTES_RANGE: (usize, usize) = (4096, 64 << 20);
/// Largest accepted timeout in ms (one day).
pub const MAX_TIMEOUT_MS: u64 = 86_400_000;

/// The upstream side of `action = "proxy"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyConfig {
    /// Upstream addresses (`upstream = "A"` or `upstreams = ["A", "B"]`), used
    /// round-robin; one that just refused or timed out is skipped for a few seconds.
    pub upstreams: Vec<SocketAddr>,
    /// Namespace of the upstreams; `None` is the namespace ringress started in.
    pub upstream_netns: Option<NetnsRef>,
    /// Resolved namespace file of `upstream_netns` (set by [`Config::parse`]).
    pub upstream_netns_path: Option<PathBuf>,
    /// 1-based line of the `upstream_netns` key (0 when absent), for errors.
    pub upstream_netns_line: usize,
    /// How long a connect to an upstream may take before the client is closed (ms).
    pub connect_timeout_ms: u64,
    /// Close a session with no traffic for this long (ms); 0 = never.
    pub idle_timeout_ms: u64,
    /// Window of each direction (bytes): a side stops reading while the other side
    /// has this much unsent.
    pub buffer_bytes: usize,
    /// PROXY protocol header to send to the upstream first, if any (TCP only).
    pub proxy_protocol: Option<crate::proto::proxy_header::ProxyProtocol>,
    /// UDP: a client session with no datagram either way for this long ends (ms).
    pub session_idle_timeout_ms: u64,
    /// UDP: most client sessions of the listener at once (count); datagrams of new
    /// clients beyond it are dropped and counted.
    pub max_sessions: usize,
}

/// Default `session_idle_timeout_ms` of a UDP proxy listener (ms).
pub const DEFAULT_SESSION_IDLE_TIMEOUT_MS: u64 = 30_000;
/// Default `max_sessions` of a UDP proxy listener (count).
pub const DEFAULT_MAX_SESSIONS: usize = 65_536;
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
            Action::Http => "http",
            Action::Proxy(_) => "proxy",
        }
    }
}

/// The `[runtime]` table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Runtime {
    /// Number of worker threads, 1..=[`MAX_WORKERS`].
    pub workers: usize,
    /// Which I/O driver the workers use.
    pub io: IoChoice,
    /// On SIGTERM/SIGINT, how long open connections may go on before they are
    /// closed (ms); default [`DEFAULT_SHUTDOWN_TIMEOUT_MS`].
    pub shutdown_timeout_ms: u64,
}

/// Default `[runtime] shutdown_timeout_ms` (ms).
pub const DEFAULT_SHUTDOWN_TIMEOUT_MS: u64 = 10_000;

impl Default for Runtime {
    /// [`default_workers`] workers, [`IoChoice::Auto`], a 10 s shutdown timeout.
    fn default() -> Self {
        Runtime {
            workers: default_workers(),
            io: IoChoice::Auto,
            shutdown_timeout_ms: DEFAULT_SHUTDOWN_TIMEOUT_MS,
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
    /// Address and port to bind (port 0 picks an ephemeral port).
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

/// Why a configuration could not be loaded or validated.
///
/// Every variant's `Display` starts with the file, and all but [`ConfigError::Io`]
/// and [`ConfigError::NoListeners`] with `FILE:LINE:` (1-based line).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read (or is not UTF-8).
    #[error("{}: cannot read config: {source}", file.display())]
    Io {
        /// The config file.
        file: PathBuf,
        /// The error from reading it.
        #[source]
        source: io::Error,
    },
    /// Malformed TOML, or a value of the wrong TOML type (then `key` is its dotted
    /// path, e.g. `runtime.workers`).
    #[error("{}:{line}: {}{message}", file.display(), parse_prefix(key))]
    Parse {
        /// The config file.
        file: PathBuf,
        /// 1-based line of the error.
        line: usize,
        /// Dotted path of the key whose value has the wrong type, when known.
        key: Option<String>,
        /// The toml crate's one-line message.
        message: String,
    },
    /// A key that the format does not define.
    #[error("{}:{line}: unknown key `{key}` in {table}{}", file.display(), expected_suffix(expected))]
    UnknownKey {
        /// The config file.
        file: PathBuf,
        /// 1-based line of the key.
        line: usize,
        /// The unknown key.
        key: String,
        /// `[runtime]`, `[[listener]]` or `the top-level table`.
        table: String,
        /// The accepted keys, as serde lists them (may be empty).
        expected: String,
    },
    /// A key with an unacceptable value, a missing required key, or a conflict
    /// between keys or listeners.
    #[error("{}:{line}: {scope}key `{key}`: {message}", file.display())]
    Invalid {
        /// The config file.
        file: PathBuf,
        /// 1-based line of the key's value (or of the listener when a key is missing).
        line: usize,
        /// The table the key belongs to.
        scope: Scope,
        /// The key at fault, e.g. `listen`.
        key: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The file defines no `[[listener]]` table.
    #[error("{}: no [[listener]] defined", file.display())]
    NoListeners {
        /// The config file.
        file: PathBuf,
    },
    /// A listener's namespace is missing or is not a namespace
    /// (from [`Config::check_namespaces`]).
    #[error(
        "{}:{line}: {listener}: key `{key}`: namespace {label:?} {} ({})",
        file.display(),
        netns_problem(source),
        netns_detail(path, source)
    )]
    Netns {
        /// The config file.
        file: PathBuf,
        /// 1-based line of the listener.
        line: usize,
        /// The listener.
        listener: ListenerId,
        /// The key naming the namespace: `netns` or `upstream_netns`.
        key: &'static str,
        /// The namespace as written in the config.
        label: Box<str>,
        /// The namespace file that was checked.
        path: Box<Path>,
        /// The error from opening or inspecting it (`NotFound` when missing,
        /// `InvalidInput` when the file is not a namespace).
        #[source]
        source: io::Error,
    },
}

impl ConfigError {
    /// The 1-based line the error points at, if it points at one.
    pub fn line(&self) -> Option<usize> {
        match self {
            ConfigError::Io { .. } | ConfigError::NoListeners { .. } => None,
            ConfigError::Parse { line, .. }
            | ConfigError::UnknownKey { line, .. }
            | ConfigError::Invalid { line, .. }
            | ConfigError::Netns { line, .. } => Some(*line),
        }
    }
}

fn parse_prefix(key: &Option<String>) -> String {
    match key {
        Some(k) => format!("key `{k}`: "),
        None => "TOML parse error: ".to_string(),
    }
}

fn expected_suffix(expected: &str) -> String {
    if expected.is_empty() {
        String::new()
    } else {
        format!(" (expected {expected})")
    }
}

/// `PATH: ERROR`, or just `ERROR` when the error message already names the path.
fn netns_detail(path: &Path, e: &io::Error) -> String {
    let p = path.display().to_string();
    let m = e.to_string();
    if m.starts_with(&p) {
        m
    } else {
        format!("{p}: {m}")
    }
}

fn netns_problem(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::NotFound => "not found",
        io::ErrorKind::InvalidInput => "is not a namespace",
        _ => "cannot be opened",
    }
}

// ---- raw, span-carrying form of the file -------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    netns_dir: Option<Spanned<String>>,
    runtime: Option<Spanned<RawRuntime>>,
    admin: Option<Spanned<RawAdmin>>,
    #[serde(default)]
    listener: Vec<Spanned<RawListener>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRuntime {
    workers: Option<Spanned<i64>>,
    io: Option<Spanned<String>>,
    shutdown_timeout_ms: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    name: Option<Spanned<String>>,
    netns: Option<Spanned<String>>,
    proto: Option<Spanned<String>>,
    listen: Option<Spanned<String>>,
    action: Option<Spanned<String>>,
    respond: Option<Spanned<String>>,
    backlog: Option<Spanned<i64>>,
    upstream: Option<Spanned<String>>,
    upstreams: Option<Spanned<Vec<Spanned<String>>>>,
    upstream_netns: Option<Spanned<String>>,
    connect_timeout_ms: Option<Spanned<i64>>,
    idle_timeout_ms: Option<Spanned<i64>>,
    buffer_bytes: Option<Spanned<i64>>,
    proxy_protocol: Option<Spanned<String>>,
    session_idle_timeout_ms: Option<Spanned<i64>>,
    max_sessions: Option<Spanned<i64>>,
    max_datagram_bytes: Option<Spanned<i64>>,
    sctp_style: Option<Spanned<String>>,
    sctp_streams: Option<Spanned<i64>>,
    max_message_bytes: Option<Spanned<i64>>,
}

/// Maps byte offsets in the config text to 1-based line numbers.
struct Lines<'a> {
    text: &'a str,
}

impl Lines<'_> {
    fn of(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        1 + self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
    }

    fn of_span(&self, span: Range<usize>) -> usize {
        self.of(span.start)
    }
}

/// Builds errors that all name the same file.
struct Ctx<'a> {
    file: &'a Path,
    lines: Lines<'a>,
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

    fn invalid(
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

    fn toml_error(&self, e: toml::de::Error) -> ConfigError {
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
    /// backlog, listener names). Namespaces are not checked.
    ///
    /// # Errors
    /// - [`ConfigError::Parse`]: malformed TOML or a value of the wrong TOML type;
    /// - [`ConfigError::UnknownKey`]: a key the format does not define;
    /// - [`ConfigError::Invalid`]: a bad value (workers, io, netns_dir, name,
    ///   netns, proto, listen, action, respond, backlog), a missing `listen`,
    ///   `action` or `respond`, `respond` with an action other than "respond", a
    ///   duplicate listener name, or two listeners on the same non-zero-port
    ///   address in the same namespace;
    /// - [`ConfigError::NoListeners`]: no `[[listener]]` table.
    ///
    /// The first error in file order is returned.
    pub fn parse(text: &str, source: &Path) -> Result<Config, ConfigError> {
        let cx = Ctx {
            file: source,
            lines: Lines { text },
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
            listeners.push(convert_listener(&cx, i + 1, l.span(), l.get_ref())?);
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
    /// file ([`check_netns`] on [`Config::netns_path`]). Listeners without `netns`
    /// are skipped.
    ///
    /// # Errors
    /// [`ConfigError::Netns`] for the first listener (in file order) whose
    /// namespace is missing, unreadable or not a namespace.
    pub fn check_namespaces(&self) -> Result<(), ConfigError> {
        for l in &self.listeners {
            let mut refs = Vec::with_capacity(2);
            if let (Some(ns), Some(path)) = (&l.netns, self.netns_path(l)) {
                // A template's namespaces are found at run time.
                if !ns.is_glob() {
                    refs.push(("netns", l.netns_line, ns, path));
                }
            }
            if let Action::Proxy(p) = &l.action {
                if let (Some(ns), Some(path)) = (&p.upstream_netns, &p.upstream_netns_path) {
                    refs.push(("upstream_netns", p.upstream_netns_line, ns, path.clone()));
                }
            }
            for (key, line, ns, path) in refs {
                if let Err(source) = check_netns(&path) {
                    return Err(ConfigError::Netns {
                        file: self.source.clone(),
                        line,
                        listener: ListenerId::Name(l.name.clone()),
                        key,
                        label: ns.label().into(),
                        path: path.into(),
                        source,
                    });
                }
            }
        }
        Ok(())
    }

    /// The namespace file of listener `l`: its `netns` name resolved under
    /// [`Config::netns_dir`], or its path as given; `None` when it has no `netns`.
    pub fn netns_path(&self, l: &ListenerConfig) -> Option<PathBuf> {
        l.netns.as_ref().map(|n| n.path_in(&self.netns_dir))
    }
}

fn convert_runtime(cx: &Ctx<'_>, rt: &RawRuntime) -> Result<Runtime, ConfigError> {
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
    Ok(Runtime {
        workers,
        io,
        shutdown_timeout_ms,
    })
}

fn convert_listener(
    cx: &Ctx<'_>,
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
            Some(a) => a.get_ref().trim().parse::<SocketAddr>().map_err(|_| {
                cx.invalid(
                    a.span(),
                    early(),
                    "listen",
                    format!(
                    "invalid socket address {:?} (expected e.g. \"0.0.0.0:8080\" or \"[::]:8080\")",
                    a.get_ref()
                ),
                )
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
            "http" => Action::Http,
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
    let keys: [KeyRule<'_>; 11] = [
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
            "session_idle_timeout_ms",
            span_of(&raw.session_idle_timeout_ms),
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

/// Rejects duplicate names, then two listeners on the same address (non-zero
/// port) and protocol in the same namespace reference.
fn check_unique(
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
        if l.listen.port() == 0 {
            continue;
        }
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
        ("idle_timeout_ms", &raw.idle_timeout_ms),
        ("buffer_bytes", &raw.buffer_bytes),
    ] {
        if let Some(x) = x {
            v.push((k, x.span()));
        }
    }
    if let Some(x) = &raw.proxy_protocol {
        v.push(("proxy_protocol", x.span()));
    }
    for (k, x) in [
        ("session_idle_timeout_ms", &raw.session_idle_timeout_ms),
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
    let addr = |s: &Spanned<String>, key: &'static str| {
        s.get_ref().trim().parse::<SocketAddr>().map_err(|_| {
            cx.invalid(
                s.span(),
                scope(),
                key,
                format!(
                    "invalid upstream address {:?} (expected e.g. \"10.0.0.2:80\" or \"[2001:db8::2]:80\")",
                    s.get_ref()
                ),
            )
        })
    };
    let upstreams = match (&raw.upstream, &raw.upstreams) {
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
    let idle_timeout_ms = ms(&raw.idle_timeout_ms, "idle_timeout_ms", 0, 0)?;
    let session_idle_timeout_ms = ms(
        &raw.session_idle_timeout_ms,
        "session_idle_timeout_ms",
        DEFAULT_SESSION_IDLE_TIMEOUT_MS,
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
    Ok(ProxyConfig {
        upstreams,
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
        session_idle_timeout_ms,
        max_sessions,
    })
}

#[cfg(test)]
mod tests {
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
        let c =
            parse("[[listener]]\nnetns = \"ns-a\"\nlisten = \"[::]:8080\"\naction = \"echo\"\n")
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

        let c = parse("[runtime]\n[[listener]]\nlisten = \"127.0.0.1:7000\"\naction = \"http\"\n")
            .unwrap();
        assert_eq!(c.listeners[0].name, "root-tcp-127.0.0.1:7000");
        assert_eq!(c.runtime.io, IoChoice::Auto);
    }

    #[test]
    fn inline_listener_array() {
        let c =
            parse("listener = [\n  { listen = \"127.0.0.1:1\", action = \"echo\" },\n]\n").unwrap();
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
        let text =
            "\n\n[[listener]]\nname = \"alpha\"\nlisten = \"127.0.0.1:1\"\naction = \"echo\"\n\
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
}
