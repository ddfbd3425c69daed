//! The admin endpoint (`[admin] listen`): `GET /metrics` (Prometheus/OpenMetrics
//! text), `GET /status` (JSON), `GET /healthz`.
//!
//! It is served by the control thread's event loop ([`crate::control`]), so it adds
//! no thread. Connections are non-blocking, one request each (`Connection: close`);
//! requests larger than [`MAX_REQUEST`] or slower than [`ADMIN_IDLE`] are dropped.
//!
//! `/healthz` stays answerable: a new connection beyond [`MAX_ADMIN_CONNS`]
//! evicts the oldest connection still waiting for its request (idle clients
//! cannot crowd out a health check), an accept that fails for lack of fds
//! (EMFILE, ENFILE) first evicts such a connection and else is retried every
//! [`ACCEPT_RETRY`] (the listener is edge-triggered: nothing else would wake it
//! for a connection already queued), and it answers 503 when a worker or the
//! binder is not alive and responsive ([`health_problems`]).

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::procstat;
use crate::server::{ListenerState, Server};

/// Largest request head accepted (bytes).
pub const MAX_REQUEST: usize = 16 * 1024;
/// An admin connection that has not finished within this time is closed.
pub const ADMIN_IDLE: Duration = Duration::from_secs(10);
/// Most admin connections served at once (count); a connection beyond it evicts
/// the oldest one still waiting for its request (or, if every one is being
/// answered, is closed at accept).
pub const MAX_ADMIN_CONNS: usize = 64;
/// How often an admin accept that failed for lack of fds (EMFILE, ENFILE,
/// ENOBUFS, ENOMEM) is retried while it fails.
pub const ACCEPT_RETRY: Duration = Duration::from_millis(100);

type Labels = Vec<(String, String)>;

/// `v` escaped as a label value of the text exposition formats: backslash,
/// double quote and line feed become `\\`, `\"` and `\n` (OpenMetrics 1.0,
/// "Escaping"; Prometheus text format 0.0.4 says the same). prometheus-client
/// writes label values as given, so names from the config and from the netns
/// directory (where `ip netns add` allows any of these) are escaped here.
fn label_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// How long the process's thread and fd counts are reused between scrapes (ms).
pub const PROCESS_FIGURES_TTL_MS: u64 = 1000;

/// The process's OS threads and open fds (counts), read from /proc at most once
/// per [`PROCESS_FIGURES_TTL_MS`]: listing `/proc/self/fd` of a process with
/// 100,000 sockets takes milliseconds of the control loop, and scrapers (or an
/// attacker) may ask often.
fn process_figures() -> (usize, usize) {
    use std::sync::Mutex;
    static CACHE: Mutex<Option<(Instant, usize, usize)>> = Mutex::new(None);
    let mut c = CACHE.lock().unwrap_or_else(|p| p.into_inner());
    let now = Instant::now();
    if let Some((at, t, f)) = *c {
        if now.duration_since(at) < Duration::from_millis(PROCESS_FIGURES_TTL_MS) {
            return (t, f);
        }
    }
    let me = std::process::id();
    let t = procstat::threads(me).unwrap_or(0);
    let f = procstat::open_fds(me).unwrap_or(0);
    *c = Some((now, t, f));
    (t, f)
}

/// Renders the metrics of `server` in the OpenMetrics text format (which Prometheus
/// scrapes): per listener, per worker, and for the process.
pub fn render_metrics(server: &Server) -> String {
    let mut reg = Registry::default();
    let counter = |reg: &mut Registry, name: &str, help: &str| {
        let f = Family::<Labels, Counter>::default();
        reg.register(name, help, f.clone());
        f
    };
    let gauge = |reg: &mut Registry, name: &str, help: &str| {
        let f = Family::<Labels, Gauge>::default();
        reg.register(name, help, f.clone());
        f
    };
    let accepted = counter(
        &mut reg,
        "ringress_listener_connections_accepted",
        "Connections accepted",
    );
    let closed = counter(
        &mut reg,
        "ringress_listener_connections_closed",
        "Connections closed",
    );
    let active = gauge(
        &mut reg,
        "ringress_listener_connections_active",
        "Connections open now",
    );
    let bytes_in = counter(
        &mut reg,
        "ringress_listener_bytes_in",
        "Bytes received from clients",
    );
    let bytes_out = counter(
        &mut reg,
        "ringress_listener_bytes_out",
        "Bytes sent to clients",
    );
    let errors = counter(
        &mut reg,
        "ringress_listener_errors",
        "Errors by kind: upstream_refused, upstream_timeout, upstream_error, reset, accept, truncated_datagram, session_limit, session_queue_full, send_dropped, message_too_big",
    );
    let udp_sessions = gauge(
        &mut reg,
        "ringress_listener_udp_sessions",
        "UDP proxy sessions open now (UDP listeners)",
    );
    let udp_expired = counter(
        &mut reg,
        "ringress_listener_udp_sessions_expired",
        "UDP proxy sessions ended by a timeout, by kind: unreplied (the upstream never answered, session_unreplied_timeout_ms), idle (session_idle_timeout_ms)",
    );
    let sctp_associations = gauge(
        &mut reg,
        "ringress_listener_sctp_associations",
        "SCTP associations open now (SCTP listeners, both styles)",
    );
    let up = gauge(
        &mut reg,
        "ringress_listener_up",
        "1 when the listener is accepting, 0 when it is down",
    );
    let at_capacity = gauge(
        &mut reg,
        "ringress_listener_at_capacity",
        "Sockets of the listener not accepting because of a cap (its max_connections, its namespace's fd share, the process budget)",
    );
    let capacity_pauses = counter(
        &mut reg,
        "ringress_listener_capacity_pauses",
        "Times a worker stopped accepting on the listener at a cap",
    );
    let timeouts = counter(
        &mut reg,
        "ringress_listener_timeouts",
        "Sessions ended by a deadline, by kind: idle (idle_timeout_ms), header (header_timeout_ms, answered 408), keepalive (keepalive_timeout_ms)",
    );
    for l in server.listeners() {
        let s = &l.shared.stats;
        let lab: Labels = vec![
            ("listener".into(), label_value(&l.config.name)),
            ("netns".into(), label_value(&l.config.netns_label())),
            ("proto".into(), l.config.proto.to_string()),
        ];
        accepted
            .get_or_create(&lab)
            .inc_by(s.accepted.load(Relaxed));
        closed.get_or_create(&lab).inc_by(s.closed.load(Relaxed));
        active.get_or_create(&lab).set(s.active() as i64);
        bytes_in
            .get_or_create(&lab)
            .inc_by(s.bytes_in.load(Relaxed));
        bytes_out
            .get_or_create(&lab)
            .inc_by(s.bytes_out.load(Relaxed));
        up.get_or_create(&lab)
            .set(i64::from(l.state == ListenerState::Serving));
        at_capacity
            .get_or_create(&lab)
            .set(s.at_capacity.load(Relaxed) as i64);
        capacity_pauses
            .get_or_create(&lab)
            .inc_by(s.capacity_pauses.load(Relaxed));
        for (kind, v) in [
            ("idle", &s.timeouts_idle),
            ("header", &s.timeouts_header),
            ("keepalive", &s.timeouts_keepalive),
        ] {
            let mut k = lab.clone();
            k.push(("kind".into(), kind.into()));
            timeouts.get_or_create(&k).inc_by(v.load(Relaxed));
        }
        match l.config.proto {
            crate::config::Proto::Udp => {
                for (kind, v) in [
                    ("unreplied", &s.expired_unreplied),
                    ("idle", &s.expired_idle),
                ] {
                    let mut k = lab.clone();
                    k.push(("kind".into(), kind.into()));
                    udp_expired.get_or_create(&k).inc_by(v.load(Relaxed));
                }
                udp_sessions.get_or_create(&lab).set(s.active() as i64)
            }
            crate::config::Proto::Sctp => {
                sctp_associations.get_or_create(&lab).set(s.active() as i64)
            }
            crate::config::Proto::Tcp => 0,
        };
        for (kind, v) in [
            ("upstream_refused", &s.upstream_refused),
            ("upstream_timeout", &s.upstream_timeouts),
            ("upstream_error", &s.upstream_errors),
            ("reset", &s.resets),
            ("accept", &s.accept_errors),
            ("truncated_datagram", &s.truncated),
            ("session_limit", &s.session_limit),
            ("session_queue_full", &s.session_queue_full),
            ("send_dropped", &s.send_drops),
            ("message_too_big", &s.message_too_big),
        ] {
            let mut k = lab.clone();
            k.push(("kind".into(), kind.into()));
            errors.get_or_create(&k).inc_by(v.load(Relaxed));
        }
    }
    let submitted = counter(
        &mut reg,
        "ringress_worker_submitted",
        "Operations started (accept, receive, send, connect, poll; one SQE each on io_uring)",
    );
    let completed = counter(
        &mut reg,
        "ringress_worker_completed",
        "Operation events handled (CQEs on io_uring; completions on epoll)",
    );
    let enobufs = counter(
        &mut reg,
        "ringress_worker_enobufs",
        "Receives that found no free receive buffer (ENOBUFS)",
    );
    let multishot_recv = counter(
        &mut reg,
        "ringress_worker_multishot_recv",
        "Multishot stream receives started (io_uring IORING_RECV_MULTISHOT; 0 on the single-shot path)",
    );
    let sessions = gauge(&mut reg, "ringress_worker_sessions", "Sessions open now");
    for w in server.workers() {
        let lab: Labels = vec![
            ("worker".into(), w.index.to_string()),
            ("driver".into(), server.driver().to_string()),
        ];
        submitted
            .get_or_create(&lab)
            .inc_by(w.stats.submitted.load(Relaxed));
        completed
            .get_or_create(&lab)
            .inc_by(w.stats.completed.load(Relaxed));
        enobufs
            .get_or_create(&lab)
            .inc_by(w.stats.enobufs.load(Relaxed));
        multishot_recv
            .get_or_create(&lab)
            .inc_by(w.stats.multishot_recv.load(Relaxed));
        sessions
            .get_or_create(&lab)
            .set(w.stats.sessions.load(Relaxed) as i64);
    }
    let (n_threads, n_fds) = process_figures();
    let threads = Gauge::<i64>::default();
    threads.set(n_threads as i64);
    reg.register(
        "ringress_process_threads",
        "OS threads of the process",
        threads,
    );
    let fds = Gauge::<i64>::default();
    fds.set(n_fds as i64);
    reg.register("ringress_process_open_fds", "Open file descriptors", fds);
    let b = server.budget();
    for (name, help, v) in [
        (
            "ringress_process_fd_budget",
            "Session file descriptors allowed: RLIMIT_NOFILE minus the fds the process holds for itself minus [runtime] fd_reserve",
            b.limit(),
        ),
        (
            "ringress_process_fd_budget_used",
            "Session file descriptors held now (client and upstream sockets)",
            b.used(),
        ),
        (
            "ringress_process_sessions",
            "Sessions open now (TCP connections, SCTP associations, UDP proxy sessions with an upstream socket)",
            b.sessions(),
        ),
    ] {
        let g = Gauge::<i64>::default();
        g.set(i64::try_from(v).unwrap_or(i64::MAX));
        reg.register(name, help, g);
    }
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, &reg);
    out
}

/// Renders `server`'s listeners as JSON: name, netns, proto, address, action,
/// state, driver (and, when down, why), for http listeners `header_timeout_ms`
/// and `keepalive_timeout_ms` (ms); and, under `"io_uring"`, what the io_uring
/// probe found (see [`io_uring_status`]).
pub fn render_status(server: &Server) -> String {
    let listeners: Vec<serde_json::Value> = server
        .listeners()
        .map(|l| {
            let (state, reason) = match &l.state {
                ListenerState::Serving => ("serving", None),
                ListenerState::Down(r) => ("down", Some(r.clone())),
            };
            let mut v = serde_json::json!({
                "name": l.config.name,
                "netns": l.config.netns_label(),
                "proto": l.config.proto.to_string(),
                "address": l.config.listen.to_string(),
                "action": l.config.action.kind(),
                "template": l.template,
                "state": state,
                "reason": reason,
                "driver": server.driver().to_string(),
                "connections_active": l.shared.stats.active(),
                "max_connections": l.config.max_connections,
                "at_capacity": l.shared.stats.at_capacity.load(Relaxed) > 0,
            });
            // The effective deadlines (defaults included), ms.
            match &l.config.action {
                crate::config::Action::Http(h) => {
                    v["header_timeout_ms"] = h.header_timeout_ms.into();
                    v["keepalive_timeout_ms"] = h.keepalive_timeout_ms.into();
                }
                crate::config::Action::Proxy(p) => {
                    v["connect_timeout_ms"] = p.connect_timeout_ms.into();
                    v["idle_timeout_ms"] = p.idle_timeout_ms.into();
                }
                crate::config::Action::Echo => {
                    v["idle_timeout_ms"] = l.config.idle_timeout_ms.into();
                }
                crate::config::Action::Respond(_) => {}
            }
            v
        })
        .collect();
    let v = serde_json::json!({
        "driver": server.driver().to_string(),
        "workers": server.workers().len(),
        "listeners": listeners,
        "io_uring": io_uring_status(server),
        "fd_budget": {
            "limit": server.budget().limit(),
            "used": server.budget().used(),
            "netns_limit": server.budget().netns_limit(),
            "sessions": server.budget().sessions(),
            "max_connections": server.config().runtime.max_connections,
            "fd_reserve": server.config().runtime.fd_reserve,
            "netns_fd_share": server.config().runtime.netns_fd_share,
        },
    });
    let mut s = v.to_string();
    s.push('\n');
    s
}

/// The `"io_uring"` object of `/status`: the probe's result
/// ([`crate::driver::uring::UringProbe`]: kernel, setup flags, feature bits,
/// opcodes, provided-buffer ring, multishot accept/RECVMSG/RECV, bundles) when the
/// workers run io_uring; `null` when they run epoll.
pub fn io_uring_status(server: &Server) -> serde_json::Value {
    #[cfg(feature = "uring")]
    if server.driver() == crate::driver::DriverKind::Uring {
        return match crate::driver::uring::probe() {
            Ok(p) => serde_json::to_value(p).unwrap_or(serde_json::Value::Null),
            Err(e) => serde_json::json!({ "error": e }),
        };
    }
    #[cfg(not(feature = "uring"))]
    let _ = server;
    serde_json::Value::Null
}

struct AdminConn {
    stream: TcpStream,
    input: Vec<u8>,
    output: Vec<u8>,
    written: usize,
    since: Instant,
}

/// The admin listener and its open connections, driven by the control loop.
pub struct Admin {
    listener: TcpListener,
    conns: HashMap<u64, AdminConn>,
    next: u64,
    /// When to try accepting again after a failure for lack of fds.
    retry_at: Option<Instant>,
    /// The last accept failed for lack of fds (warned once per episode).
    out_of_fds: bool,
}

/// What the control loop should do with an admin connection's fd.
pub enum Interest {
    /// Wait until it is readable.
    Read,
    /// Wait until it is writable.
    Write,
    /// It is closed; forget it.
    Closed,
}

impl Admin {
    /// Binds the admin endpoint at `addr` (in the namespace ringress started in).
    ///
    /// # Errors
    /// bind(2) or listen(2) failed (EADDRINUSE, EACCES, ...).
    pub fn bind(addr: std::net::SocketAddr) -> io::Result<Admin> {
        let listener = TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        Ok(Admin {
            listener,
            conns: HashMap::new(),
            next: 0,
            retry_at: None,
            out_of_fds: false,
        })
    }

    /// The listening socket (for the event loop).
    pub fn listener(&self) -> &TcpListener {
        &self.listener
    }

    /// Accepts pending connections; returns their ids and streams' fds to watch.
    /// At [`MAX_ADMIN_CONNS`] a new connection evicts the oldest one still waiting
    /// for its request. Out of fds (EMFILE, ENFILE) it evicts such a connection
    /// and tries again; with none to evict it stops and asks to be called again
    /// after [`ACCEPT_RETRY`] ([`Admin::retry_at`]).
    pub fn accept(&mut self) -> Vec<(u64, std::os::fd::RawFd)> {
        use std::os::fd::AsRawFd;
        let mut out = Vec::new();
        self.retry_at = None;
        loop {
            let s = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if crate::driver::accept_error_pauses(e.raw_os_error().unwrap_or(0)) => {
                    if self.evict_idle() {
                        continue;
                    }
                    if !self.out_of_fds {
                        self.out_of_fds = true;
                        tracing::warn!(error = %e, retry_ms = ACCEPT_RETRY.as_millis() as u64,
                            "admin endpoint cannot accept (out of fds); retrying until it can");
                    }
                    self.retry_at = Some(Instant::now() + ACCEPT_RETRY);
                    break;
                }
                // EAGAIN: nothing more queued.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                // A connection that failed before it was accepted (ECONNABORTED...).
                Err(e) if crate::driver::accept_error_benign(e.raw_os_error().unwrap_or(0)) => {
                    continue
                }
                Err(_) => break,
            };
            self.out_of_fds = false;
            if s.set_nonblocking(true).is_err() {
                continue;
            }
            if self.conns.len() >= MAX_ADMIN_CONNS && !self.evict_idle() {
                continue;
            }
            let id = self.next;
            self.next += 1;
            out.push((id, s.as_raw_fd()));
            self.conns.insert(
                id,
                AdminConn {
                    stream: s,
                    input: Vec::new(),
                    output: Vec::new(),
                    written: 0,
                    since: Instant::now(),
                },
            );
        }
        // A connection evicted above may have been accepted in this very call.
        out.retain(|(id, _)| self.conns.contains_key(id));
        out
    }

    /// Closes the oldest connection that has not sent a whole request yet (one
    /// being answered is left alone); `false` when there is none.
    fn evict_idle(&mut self) -> bool {
        let oldest = self
            .conns
            .iter()
            .filter(|(_, c)| c.output.is_empty())
            .min_by_key(|(&id, c)| (c.since, id))
            .map(|(&id, _)| id);
        match oldest {
            Some(id) => {
                self.conns.remove(&id);
                true
            }
            None => false,
        }
    }

    /// When [`Admin::accept`] should be called again because an accept failed for
    /// lack of fds (`None`: it needs no retry).
    pub fn retry_at(&self) -> Option<Instant> {
        self.retry_at
    }

    /// Open admin connections (count).
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// The fd of admin connection `id`, while it is open.
    pub fn fd_of(&self, id: u64) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        self.conns.get(&id).map(|c| c.stream.as_raw_fd())
    }

    /// Makes progress on connection `id`: reads the request, answers it from
    /// `server`, writes the answer.
    pub fn drive(&mut self, id: u64, server: &Server) -> Interest {
        let Some(c) = self.conns.get_mut(&id) else {
            return Interest::Closed;
        };
        if c.output.is_empty() {
            let mut buf = [0u8; 4096];
            loop {
                match c.stream.read(&mut buf) {
                    Ok(0) => {
                        self.conns.remove(&id);
                        return Interest::Closed;
                    }
                    Ok(n) => {
                        c.input.extend_from_slice(&buf[..n]);
                        if c.input.len() > MAX_REQUEST {
                            c.output = response(431, "text/plain", "request too large\n");
                            break;
                        }
                        if let Some(out) = answer(&c.input, server) {
                            c.output = out;
                            break;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Interest::Read,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => {
                        self.conns.remove(&id);
                        return Interest::Closed;
                    }
                }
            }
        }
        while c.written < c.output.len() {
            match c.stream.write(&c.output[c.written..]) {
                Ok(n) => c.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Interest::Write,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        self.conns.remove(&id);
        Interest::Closed
    }

    /// Closes connections older than [`ADMIN_IDLE`]; returns how many.
    pub fn expire(&mut self, now: Instant) -> usize {
        let before = self.conns.len();
        self.conns
            .retain(|_, c| now.duration_since(c.since) < ADMIN_IDLE);
        before - self.conns.len()
    }
}

/// The response to a complete request in `input`, or `None` if it is incomplete.
fn answer(input: &[u8], server: &Server) -> Option<Vec<u8>> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(input) {
        Ok(httparse::Status::Partial) => None,
        Err(_) => Some(response(400, "text/plain", "bad request\n")),
        Ok(httparse::Status::Complete(_)) => {
            if req.method != Some("GET") {
                return Some(response(405, "text/plain", "only GET\n"));
            }
            let path = req.path.unwrap_or("/").split('?').next().unwrap_or("/");
            Some(match path {
                // Content negotiation as Prometheus does it: OpenMetrics for a
                // scraper that asks for it, text format 0.0.4 otherwise.
                "/metrics" if wants_openmetrics(req.headers) => response(
                    200,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    &render_metrics(server),
                ),
                "/metrics" => response(
                    200,
                    "text/plain; version=0.0.4; charset=utf-8",
                    &to_prometheus_text(&render_metrics(server)),
                ),
                "/status" => response(200, "application/json", &render_status(server)),
                "/healthz" => match health_problems(server) {
                    problems if problems.is_empty() => response(200, "text/plain", "ok\n"),
                    problems => response(503, "text/plain", &(problems.join("\n") + "\n")),
                },
                _ => response(
                    404,
                    "text/plain",
                    "not found: try /metrics, /status, /healthz\n",
                ),
            })
        }
    }
}

/// Why `/healthz` answers 503, one line each, or nothing when healthy: a worker
/// stopped (its listeners' share of new connections would go unanswered; the
/// process is shutting down), or a worker or the binder has not shown a sign of
/// life for more than [`crate::health::STALE_AFTER`] (a worker beats once per
/// loop turn, at least every second; the binder once per request, at least every
/// second), e.g. `worker 1 not responsive (last heartbeat 2300 ms ago)`.
pub fn health_problems(server: &Server) -> Vec<String> {
    let mut out = Vec::new();
    if crate::driver::worker_failed() {
        out.push("a worker or the binder stopped".to_string());
    }
    for w in server.workers() {
        if w.stats.failed.load(Relaxed) {
            out.push(format!("worker {} stopped", w.index));
        } else if w.stats.heartbeat.stale() {
            out.push(format!(
                "worker {} not responsive (last heartbeat {} ms ago)",
                w.index,
                w.stats.heartbeat.age().as_millis()
            ));
        }
    }
    let b = server.binder().heartbeat();
    if b.stale() {
        out.push(format!(
            "binder not responsive (last heartbeat {} ms ago)",
            b.age().as_millis()
        ));
    }
    out
}

/// Whether the request's `Accept` header lists `application/openmetrics-text`.
fn wants_openmetrics(headers: &[httparse::Header<'_>]) -> bool {
    headers.iter().any(|h| {
        h.name.eq_ignore_ascii_case("accept")
            && String::from_utf8_lossy(h.value)
                .to_ascii_lowercase()
                .contains("application/openmetrics-text")
    })
}

/// OpenMetrics text (as prometheus-client writes it) turned into the Prometheus
/// text format 0.0.4: a counter family's `# HELP`/`# TYPE` name its `_total`
/// samples, `unknown` becomes `untyped`, and `# UNIT` and `# EOF` lines, which 0.0.4
/// does not have, are left out. Samples and label escaping are the same in both.
fn to_prometheus_text(om: &str) -> String {
    let counters: std::collections::HashSet<&str> = om
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(om.len());
    for line in om.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        match meta {
            Some((p, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let name = if counters.contains(name) {
                    format!("{name}_total")
                } else {
                    name.to_string()
                };
                let tail = if p == "# TYPE " && tail == "unknown" {
                    "untyped"
                } else {
                    tail
                };
                out.push_str(&format!("{p}{name} {tail}\n"));
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

fn response(code: u16, ctype: &str, body: &str) -> Vec<u8> {
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        503 => "Service Unavailable",
        _ => "Request Header Fields Too Large",
    };
    format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}
