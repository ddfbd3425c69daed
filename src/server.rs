//! The supervisor: binds listeners through the binder, starts the workers and hands
//! each worker a socket of every listener (its own SO_REUSEPORT socket, or a dup of
//! one shared with other workers: [`crate::config::Shards`]); adds and removes
//! listeners at run time (reload, namespaces that come and go).
//!
//! Thread budget: the calling thread (signals, admin endpoint, namespace watch),
//! the binder, and one thread per worker. Nothing here grows with the number of
//! namespaces, listeners or connections.
//!
//! A listener whose `netns` is a glob (`tenant-*`) is a *template*: it has one
//! *instance*, named `NAME@NAMESPACE`, per matching entry of the netns directory.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use crate::binder::{BatchItem, BindError, Binder, ClientProto, SocketSpec};
use crate::config::{Action, Config, IoChoice, ListenerConfig, Proto};
use crate::driver::budget::{FdBudget, NetnsFds};
use crate::driver::{
    self, Command, DriverKind, ListenerFd, ListenerShared, UpstreamSet, WorkerHandle,
};
use crate::netns::{self, NetnsRef, NsId};
use crate::takeover::{Inherited, SocketInfo};

/// Why the server could not start or a reload was refused.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The driver cannot run here (e.g. io = "uring" without io_uring).
    #[error("{0}")]
    Driver(String),
    /// Creating, binding or listening on a listener's socket failed.
    #[error(transparent)]
    Bind(#[from] BindError),
    /// Two listeners would share one socket address in one namespace.
    #[error("listener {second}: {addr} in netns {netns} is already used by listener {first}")]
    Duplicate {
        /// The listener defined first.
        first: String,
        /// The listener defined later.
        second: String,
        /// The shared address.
        addr: SocketAddr,
        /// The namespace label.
        netns: String,
    },
    /// A thread, ring or epoll instance could not be created.
    #[error("starting workers: {0}")]
    Workers(#[source] std::io::Error),
    /// The kernel lacks a listener's protocol (SCTP: socket(2) fails with
    /// EPROTONOSUPPORT where `CONFIG_IP_SCTP` is off or the module is not loaded).
    #[error(
        "listener {listener}: proto \"{proto}\" is unavailable: this kernel has no {upper} support \
         (socket {addr} in netns {netns}: {errno}); load its module (modprobe {proto}), or run \
         with --skip-unavailable to serve the other listeners without it",
        upper = proto.as_str().to_uppercase(),
        addr = source.addr,
        netns = source.netns,
        errno = source.source
    )]
    Unavailable {
        /// The listener.
        listener: String,
        /// Its protocol.
        proto: Proto,
        /// The socket(2) error.
        #[source]
        source: Box<BindError>,
    },
}

/// How [`Server::start_with`] treats listeners it cannot serve.
#[derive(Debug, Clone, Default)]
pub struct StartOptions {
    /// A listener whose protocol this kernel lacks (SCTP without the sctp module)
    /// is logged and left down instead of failing the start or reload
    /// (`ringress run --skip-unavailable`).
    pub skip_unavailable: bool,
    /// Listening sockets received from a running process (`ringress run
    /// --takeover`): a listener whose namespace file, protocol and address match
    /// an offered one reuses its sockets instead of binding (binding only extra
    /// ones if this process has more workers). Consulted by [`Server::start_with`]
    /// only; the sockets left over are closed when it returns.
    pub inherited: Option<Arc<Mutex<Inherited>>>,
}

/// Whether a listener is accepting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenerState {
    /// Bound and handed to the workers.
    Serving,
    /// Not bound, with the reason (its namespace vanished, or is not there yet).
    Down(String),
}

/// A listener known to the server (serving or down).
#[derive(Debug)]
pub struct RunningListener {
    /// Supervisor's id of the current binding, unique in this process.
    pub id: u64,
    /// Its configuration (for a template instance: `netns` names the namespace).
    pub config: ListenerConfig,
    /// The template it was made from, if any.
    pub template: Option<String>,
    /// Name, action and counters shared with the workers.
    pub shared: Arc<ListenerShared>,
    /// Serving or down.
    pub state: ListenerState,
    /// Worker-side ids of sockets beyond one per worker (a listener taken over
    /// from a process with more workers: some workers then serve two or more of
    /// its sockets, each under its own id). Empty otherwise.
    pub extra_ids: Vec<u64>,
    /// Namespace identity, protocol and address, as resolved when it was
    /// installed (what identifies its sockets: the namespace it was bound in,
    /// held even if its path now names another; kept so that a reload of 10,000
    /// listeners does not stat the old listeners' paths again).
    key: AddrKey,
}

/// A running server: binder, workers, listeners.
pub struct Server {
    binder: Binder,
    /// The session budget every listener charges ([`crate::driver::budget`]).
    budget: Arc<FdBudget>,
    /// Session fds per namespace (keyed by namespace file; `None`: root), shared
    /// by the listeners of that namespace across reloads.
    netns_fds: Mutex<HashMap<Option<PathBuf>, Arc<NetnsFds>>>,
    workers: Vec<WorkerHandle>,
    listeners: BTreeMap<String, RunningListener>,
    driver: DriverKind,
    cfg: Config,
    next_id: u64,
    opts: StartOptions,
    /// Recent namespace identities by path ([`Server::ns_key`]).
    ns_keys: Mutex<HashMap<Option<PathBuf>, (std::time::Instant, NsKey)>>,
    /// Serving listeners whose `netns` is a path, by name: the identity of the
    /// namespace they were bound in. Held, not followed: see
    /// [`Server::check_held_namespaces`].
    held: HashMap<String, NsId>,
    /// Fds the process held for itself (not sessions) at the last count
    /// ([`Server::refresh_budget`]).
    own_fds: u64,
    /// "listener bound" lines of the current start, reload or namespace.
    bound_lines: InfoLines,
    /// "listener closed" lines of the current reload, shutdown or namespace change.
    closed_lines: InfoLines,
}

/// Whether `l` is a one-to-many SCTP listener (one socket, owned by one worker).
fn is_one_to_many(l: &ListenerConfig) -> bool {
    l.proto == Proto::Sctp && l.sctp.style == crate::sctp::Style::OneToMany
}

/// What names the socket behind `fd` whichever fd refers to it: the device and
/// inode of its sockfs file (fstat(2); dups share them). `None` if fstat fails.
fn socket_identity(fd: &OwnedFd) -> Option<(u64, u64)> {
    use std::os::fd::AsRawFd;
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat(2) writes one `struct stat` into the buffer we own; the fd is
    // valid for the borrow.
    let rc = unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: fstat returned 0, so it filled the struct.
    let st = unsafe { st.assume_init() };
    Some((st.st_dev, st.st_ino))
}

/// "listener bound" and "listener closed" lines logged at info per start,
/// reload, shutdown or namespace change (counts, each kind); the others are
/// logged at debug, and counted in one info line ([`InfoLines`]).
const BOUND_INFO_LINES: usize = 16;

/// Counts per-listener lines of one operation (a start, a reload, a shutdown):
/// the first [`BOUND_INFO_LINES`] go out at info, the rest at debug, and
/// [`InfoLines::summary`] says at info how many were not listed. A start or a
/// shutdown of 10,000 listeners is a few dozen info lines, not 10,000.
#[derive(Debug, Default)]
struct InfoLines(usize);

impl InfoLines {
    /// The level of the next line.
    fn next(&mut self) -> tracing::Level {
        self.0 += 1;
        if self.0 <= BOUND_INFO_LINES {
            tracing::Level::INFO
        } else {
            tracing::Level::DEBUG
        }
    }

    /// Says at info how many of `what` ("listeners bound") were logged at debug
    /// only, if any, and starts counting again.
    fn summary(&mut self, what: &'static str) {
        let n = std::mem::take(&mut self.0);
        if n > BOUND_INFO_LINES {
            tracing::info!(
                listeners = n,
                more = n - BOUND_INFO_LINES,
                "{what}: the first {BOUND_INFO_LINES} are listed above, the others at debug level"
            );
        }
    }
}

/// How long a namespace file's identity is reused by [`Server::ns_key`]: about one
/// start, reload or namespace event; a namespace re-made at the same path is seen
/// after it.
const NS_KEY_TTL: std::time::Duration = std::time::Duration::from_millis(250);

/// What makes two listeners clash: their namespace, protocol and address.
type AddrKey = (NsKey, Proto, SocketAddr);

/// A listener's namespace as compared for clashes: its identity ([`NsId`]; the
/// root namespace is the process's own, `/proc/self/ns/net`), so that two
/// spellings of one namespace (`a`, `/run/netns/a`, a bind mount,
/// `/proc/PID/ns/net`) clash; the namespace file's path only when it cannot be
/// stat'ed (it vanished).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum NsKey {
    Id(NsId),
    Path(Option<PathBuf>),
}

/// One listener to bind: its (instance) config and the template it came from.
struct Planned {
    config: ListenerConfig,
    template: Option<String>,
}

/// Sockets made for a listener, not yet handed to workers.
struct Bound {
    fds: Vec<OwnedFd>,
    upstream: Option<Arc<UpstreamSet>>,
}

/// The listeners `cfg` asks for, given the netns directory's entries `present`:
/// templates expanded into one instance per matching name.
fn plan(cfg: &Config, present: &[String]) -> Vec<Planned> {
    let mut out = Vec::with_capacity(cfg.listeners.len());
    for l in &cfg.listeners {
        match &l.netns {
            Some(g @ NetnsRef::Glob(_)) => {
                for ns in present.iter().filter(|n| g.matches(n)) {
                    out.push(Planned {
                        config: instance(l, ns),
                        template: Some(l.name.clone()),
                    });
                }
            }
            _ => out.push(Planned {
                config: l.clone(),
                template: None,
            }),
        }
    }
    out
}

/// The instance of template `t` in namespace `ns`: named `T@NS`.
fn instance(t: &ListenerConfig, ns: &str) -> ListenerConfig {
    ListenerConfig {
        name: format!("{}@{ns}", t.name),
        netns: Some(NetnsRef::Named(ns.to_string())),
        ..t.clone()
    }
}

/// Whether two listener configs would behave the same (line numbers aside).
/// Compares field by field, without a copy: a reload compares every listener.
fn same(a: &ListenerConfig, b: &ListenerConfig) -> bool {
    // Destructured so that a new field cannot be forgotten here.
    let ListenerConfig {
        name,
        netns,
        proto,
        listen,
        action,
        backlog,
        line: _,
        netns_line: _,
        max_datagram_bytes,
        sctp,
        idle_timeout_ms,
        max_connections,
        shards,
    } = a;
    *name == b.name
        && *netns == b.netns
        && *proto == b.proto
        && *listen == b.listen
        && *backlog == b.backlog
        && *max_datagram_bytes == b.max_datagram_bytes
        && *sctp == b.sctp
        && *idle_timeout_ms == b.idle_timeout_ms
        && *max_connections == b.max_connections
        && *shards == b.shards
        && match (action, &b.action) {
            (Action::Proxy(x), Action::Proxy(y)) => Arc::ptr_eq(x, y) || same_proxy(x, y),
            (x, y) => x == y,
        }
}

/// Whether two proxy settings are the same, the line of `upstream_netns` aside.
fn same_proxy(a: &crate::config::ProxyConfig, b: &crate::config::ProxyConfig) -> bool {
    let crate::config::ProxyConfig {
        upstreams,
        upstream_zones,
        upstream_netns,
        upstream_netns_path,
        upstream_netns_line: _,
        connect_timeout_ms,
        idle_timeout_ms,
        buffer_bytes,
        proxy_protocol,
        splice,
        session_idle_timeout_ms,
        session_unreplied_timeout_ms,
        max_sessions,
    } = a;
    *upstreams == b.upstreams
        && *upstream_zones == b.upstream_zones
        && *upstream_netns == b.upstream_netns
        && *upstream_netns_path == b.upstream_netns_path
        && *connect_timeout_ms == b.connect_timeout_ms
        && *idle_timeout_ms == b.idle_timeout_ms
        && *buffer_bytes == b.buffer_bytes
        && *proxy_protocol == b.proxy_protocol
        && *splice == b.splice
        && *session_idle_timeout_ms == b.session_idle_timeout_ms
        && *session_unreplied_timeout_ms == b.session_unreplied_timeout_ms
        && *max_sessions == b.max_sessions
}

/// Whether a reload may give `old`'s sockets the settings of `new` (same
/// namespace, protocol and address assumed): not for one-to-many SCTP (the socket
/// is one session) nor when SCTP socket options or style change (they are set when
/// the socket is made).
///
/// A change of `shards` never keeps them: the listener is bound anew with the new
/// socket count (the old sockets drain as a removed listener's do).
fn keeps_sockets(old: &ListenerConfig, new: &ListenerConfig) -> bool {
    if old.shards != new.shards {
        return false;
    }
    match old.proto {
        Proto::Sctp => old.sctp == new.sctp && old.sctp.style == crate::sctp::Style::OneToOne,
        Proto::Tcp | Proto::Udp => true,
    }
}

impl Server {
    /// Resolves the driver (`io` overrides `runtime.io`), binds every listener (one
    /// socket per worker, all made by the binder; templates in every matching
    /// namespace present now), starts `runtime.workers` workers and hands them their
    /// sockets.
    ///
    /// Nothing is left open on error: sockets already bound are closed and no
    /// worker keeps running. A template instance that cannot be bound is logged
    /// and left down; it does not stop the start.
    ///
    /// # Errors
    /// [`StartError`], naming the listener, namespace and errno where there is one.
    pub fn start(cfg: &Config, io: Option<IoChoice>) -> Result<Server, StartError> {
        Server::start_with(cfg, io, StartOptions::default())
    }

    /// [`Server::start`] with options (see [`StartOptions`]).
    ///
    /// # Errors
    /// As [`Server::start`]; [`StartError::Unavailable`] when a listener's protocol
    /// is missing from the kernel and `opts.skip_unavailable` is off.
    pub fn start_with(
        cfg: &Config,
        io: Option<IoChoice>,
        opts: StartOptions,
    ) -> Result<Server, StartError> {
        let driver = driver::resolve(io.unwrap_or(cfg.runtime.io)).map_err(StartError::Driver)?;
        let binder = Binder::start().map_err(StartError::Workers)?;
        let mut server = Server {
            binder,
            budget: Arc::default(),
            netns_fds: Mutex::default(),
            workers: Vec::new(),
            listeners: BTreeMap::new(),
            driver,
            cfg: cfg.clone(),
            next_id: 0,
            opts,
            held: HashMap::new(),
            ns_keys: Mutex::default(),
            own_fds: 0,
            bound_lines: InfoLines::default(),
            closed_lines: InfoLines::default(),
        };
        // Bind everything first: a failure leaves no thread and no socket behind.
        let planned = plan(cfg, &netns::list_dir(&cfg.netns_dir));
        let t_bind = std::time::Instant::now();
        let bound = server.bind_all(&planned, HashMap::new())?;
        let sockets: usize = bound
            .iter()
            .map(|b| b.as_ref().map_or(0, |b| b.fds.len()))
            .sum();
        // The bind phase alone (binder batches, upstream pools), for the scale
        // report's per-socket cost (tools/bench).
        tracing::info!(
            listeners = planned.len(),
            sockets,
            bind_us = t_bind.elapsed().as_micros() as u64,
            "bind phase done"
        );
        // A first budget before any worker accepts (refreshed once all is running).
        let namespaces: HashSet<Option<PathBuf>> = planned
            .iter()
            .map(|p| server.cfg.netns_path(&p.config))
            .collect();
        server.refresh_budget_for(
            namespaces.len(),
            crate::procstat::open_fds(std::process::id()).unwrap_or(0) as u64,
        );
        server.workers =
            driver::spawn_workers(server.worker_count(), driver, Some(server.binder.clone()))
                .map_err(StartError::Workers)?;
        for (p, b) in planned.into_iter().zip(bound) {
            server.install(p, b);
        }
        server.bound_summary();
        // Offered sockets no listener took: the old process drains them.
        if let Some(i) = server.opts.inherited.take() {
            if let Ok(mut i) = i.lock() {
                for name in i.release_rest() {
                    tracing::info!(listener = %name,
                        "takeover: not in this config; the old process drains it");
                }
            }
        }
        server.refresh_budget();
        Ok(server)
    }

    /// Running workers (counts; the config's count before the workers exist; a
    /// reload does not change it).
    pub fn worker_count(&self) -> usize {
        if self.workers.is_empty() {
            self.cfg.runtime.workers.max(1)
        } else {
            self.workers.len()
        }
    }

    /// What makes two listeners clash: namespace identity, protocol, address
    /// (one `stat(2)` of the namespace file).
    fn addr_key(&self, l: &ListenerConfig) -> AddrKey {
        (self.ns_key(self.cfg.netns_path(l)), l.proto, l.listen)
    }

    /// The identity of namespace file `path` (`None`: ringress's own), stat'ed at
    /// most once per [`NS_KEY_TTL`] per path: a reload of 10,000 listeners over
    /// 1,000 namespaces stats 1,000 files, not 10,000, on the control loop.
    fn ns_key(&self, path: Option<PathBuf>) -> NsKey {
        let mut cache = self.ns_keys.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        if let Some((at, key)) = cache.get(&path) {
            if now.duration_since(*at) < NS_KEY_TTL {
                return key.clone();
            }
        }
        let id = match &path {
            None => NsId::own(),
            Some(p) => NsId::of_path(p),
        };
        let key = id.map_or_else(|_| NsKey::Path(path.clone()), NsKey::Id);
        if cache.len() > 65_536 {
            cache.clear();
        }
        cache.insert(path, (now, key.clone()));
        key
    }

    /// Addresses taken by serving listeners, by (namespace file, address), except
    /// those in `except` (about to be replaced or removed).
    fn taken(&self, except: &HashSet<String>) -> HashMap<AddrKey, String> {
        self.listeners
            .values()
            .filter(|l| l.state == ListenerState::Serving && !except.contains(&l.config.name))
            .map(|l| (l.key.clone(), l.config.name.clone()))
            .collect()
    }

    /// Binds every planned listener; the first failure of an explicit listener
    /// fails the whole call (closing what was bound). Template instances that fail
    /// come back as `Err(reason)`.
    ///
    /// `seen` holds the addresses already served: two listeners on one address in
    /// one namespace would silently share it through SO_REUSEPORT, so that is an
    /// error (for a template instance: a warning, and the instance stays down).
    fn bind_all(
        &self,
        planned: &[Planned],
        mut seen: HashMap<AddrKey, String>,
    ) -> Result<Vec<Result<Bound, String>>, StartError> {
        let mut out: Vec<Option<Result<Bound, String>>> = Vec::with_capacity(planned.len());
        let mut items = Vec::with_capacity(planned.len());
        let mut inherited = Vec::with_capacity(planned.len());
        for p in planned {
            let l = &p.config;
            let key = self.addr_key(l);
            if let Some(first) = seen.get(&key) {
                let e = StartError::Duplicate {
                    first: first.clone(),
                    second: l.name.clone(),
                    addr: l.listen,
                    netns: l.netns_label(),
                };
                if p.template.is_none() {
                    return Err(e);
                }
                tracing::warn!(error = %e, "template instance not bound");
                out.push(Some(Err(e.to_string())));
                continue;
            }
            seen.insert(key, l.name.clone());
            out.push(None);
            // Sockets handed over by a takeover first; the binder makes the rest.
            let (fds, more) = self.inherited_for(l);
            let asks = more > 0 || fds.is_empty();
            if asks {
                let mut it = self.batch_item(l, more.max(1));
                if !fds.is_empty() {
                    // Extra sockets of a taken-over group: ringress's own.
                    it.spec = it.spec.joining_own_group();
                }
                items.push(it);
            }
            inherited.push((fds, asks));
        }
        // Every socket in one batch: the binder enters each namespace once.
        let mut made = self.binder.create_many(items).into_iter();
        let mut inherited = inherited.into_iter();
        for (p, slot) in planned.iter().zip(&mut out) {
            if slot.is_some() {
                continue;
            }
            let l = &p.config;
            let (mut fds, asks) = inherited.next().expect("one entry per listener");
            let made = match asks {
                true => made.next().expect("one result per item"),
                false => Ok(Vec::new()),
            };
            let bound = made.and_then(|more| {
                fds.extend(more);
                Ok(Bound {
                    fds,
                    upstream: self.upstream_set(l)?,
                })
            });
            *slot = Some(match bound {
                Ok(b) => Ok(b),
                Err(e) if e.step == "socket" && crate::sctp::is_unsupported(&e.source) => {
                    let e = StartError::Unavailable {
                        listener: l.name.clone(),
                        proto: l.proto,
                        source: Box::new(e),
                    };
                    if !self.opts.skip_unavailable {
                        return Err(e);
                    }
                    tracing::warn!(listener = %l.name, proto = %l.proto,
                        "listener not served: this kernel has no {} support (skipped: --skip-unavailable)",
                        l.proto.as_str().to_uppercase());
                    Err(format!(
                        "unavailable: this kernel has no {} support",
                        l.proto.as_str().to_uppercase()
                    ))
                }
                Err(e) if p.template.is_some() => {
                    tracing::warn!(error = %e, "template instance not bound");
                    Err(e.to_string())
                }
                Err(e) => return Err(e.into()),
            });
        }
        Ok(out
            .into_iter()
            .map(|b| b.expect("every listener decided"))
            .collect())
    }

    /// The listening sockets listener `l` has (counts): one per worker for
    /// `shards = "by-worker"`, N for `shards = N` (at most one per worker), one for
    /// a one-to-many SCTP listener.
    fn sockets_for(&self, l: &ListenerConfig) -> usize {
        if is_one_to_many(l) {
            return 1;
        }
        l.shards.sockets(self.worker_count())
    }

    /// The sockets listener `l` needs: `count` of them (one for a one-to-many SCTP
    /// listener, whatever `count` says).
    fn spec_for(&self, l: &ListenerConfig, count: usize) -> SocketSpec {
        match l.proto {
            Proto::Tcp => SocketSpec::TcpListeners {
                addr: l.listen,
                backlog: l.backlog,
                count,
                exclusive: true,
            },
            Proto::Udp => SocketSpec::UdpSockets {
                addr: l.listen,
                count,
                exclusive: true,
            },
            Proto::Sctp => SocketSpec::SctpListeners {
                addr: l.listen,
                backlog: l.backlog,
                // A one-to-many socket carries every association and its
                // reassembly state: one worker owns it.
                count: match l.sctp.style {
                    crate::sctp::Style::OneToOne => count,
                    crate::sctp::Style::OneToMany => 1,
                },
                style: l.sctp.style,
                opts: l.sctp.socket_opts(),
            },
        }
    }

    /// The binder request for `count` of listener `l`'s sockets.
    fn batch_item(&self, l: &ListenerConfig, count: usize) -> BatchItem {
        BatchItem {
            owner: l.name.clone(),
            netns: self.cfg.netns_path(l),
            netns_label: l.netns_label(),
            spec: self.spec_for(l, count),
        }
    }

    /// The sockets of listener `l` handed over by the running process in a
    /// takeover (same namespace, protocol and address), if any, with the new
    /// backlog applied; and how many more must be bound to reach
    /// [`Server::sockets_for`]. More sockets than that are all kept (closing one
    /// would reset the connections queued in it).
    fn inherited_for(&self, l: &ListenerConfig) -> (Vec<OwnedFd>, usize) {
        let count = self.sockets_for(l);
        let one_to_many = is_one_to_many(l);
        let path = self.cfg.netns_path(l);
        let fds = match &self.opts.inherited {
            Some(i) if !one_to_many => i
                .lock()
                .ok()
                .and_then(|mut i| i.take(path.as_deref(), l.proto, l.listen)),
            _ => None,
        };
        let Some(fds) = fds else {
            return (Vec::new(), count);
        };
        if l.proto != Proto::Udp {
            // listen(2) again sets the new backlog on the shared socket; TCP_NODELAY,
            // which accepted connections inherit, in case an older binary bound it.
            for fd in &fds {
                let s = socket2::SockRef::from(fd);
                let r = s.listen(l.backlog as i32).and_then(|()| match l.proto {
                    Proto::Tcp => s.set_tcp_nodelay(true),
                    _ => Ok(()),
                });
                if let Err(e) = r {
                    tracing::warn!(listener = %l.name, error = %e,
                        "takeover: cannot set the backlog or TCP_NODELAY of a taken-over socket");
                }
            }
        }
        let more = count.saturating_sub(fds.len());
        tracing::info!(listener = %l.name, netns = %l.netns_label(), proto = %l.proto,
            address = %l.listen, taken = fds.len(), bound = more,
            "takeover: listener reuses the running process's sockets");
        (fds, more)
    }

    /// Creates listener `l`'s sockets ([`Server::sockets_for`]; taken-over ones
    /// first, see [`Server::inherited_for`]) and, for a proxy, its upstream set with filled
    /// socket pools.
    fn bind(&self, l: &ListenerConfig) -> Result<Bound, BindError> {
        let (mut fds, more) = self.inherited_for(l);
        if more > 0 || fds.is_empty() {
            let mut it = self.batch_item(l, more.max(1));
            if !fds.is_empty() {
                it.spec = it.spec.joining_own_group();
            }
            fds.extend(self.binder.create(
                &it.owner,
                it.netns.as_deref(),
                &it.netns_label,
                it.spec,
            )?);
        }
        let upstream = self.upstream_set(l)?;
        Ok(Bound { fds, upstream })
    }

    /// For a proxy listener, its upstream set with filled socket pools; `None` for
    /// the other actions.
    fn upstream_set(&self, l: &ListenerConfig) -> Result<Option<Arc<UpstreamSet>>, BindError> {
        let Action::Proxy(p) = &l.action else {
            return Ok(None);
        };
        let ns = p.upstream_netns_path.clone().map(|path| {
            let label = p
                .upstream_netns
                .as_ref()
                .map_or_else(String::new, |n| n.label());
            (path, label)
        });
        Ok(Some(Arc::new(UpstreamSet::new(
            p.upstreams.clone(),
            ns,
            match l.proto {
                Proto::Tcp => ClientProto::Tcp,
                Proto::Udp => ClientProto::Udp,
                Proto::Sctp => ClientProto::Sctp(l.sctp.socket_opts()),
            },
            &l.name,
            &self.binder,
        )?)))
    }

    /// The session-fd counter of listener `l`'s namespace (made on first use).
    fn netns_fds(&self, l: &ListenerConfig) -> Arc<NetnsFds> {
        let mut m = self.netns_fds.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(self.cfg.netns_path(l)).or_default().clone()
    }

    /// Recomputes the session budget from RLIMIT_NOFILE and the fds open now
    /// (after start, reload and namespace changes: listener sockets and pools
    /// change what the process holds for itself).
    pub fn refresh_budget(&mut self) {
        let open = crate::procstat::open_fds(std::process::id()).unwrap_or(0) as u64;
        self.own_fds = open.saturating_sub(self.budget.used());
        self.refresh_budget_settings();
    }

    /// [`Server::refresh_budget`] with the fds ringress holds for itself as last
    /// counted (after a reload that changed no listener): the limits, RLIMIT_NOFILE
    /// and the namespace count are applied again.
    fn refresh_budget_settings(&self) {
        let namespaces: HashSet<&NsKey> = self
            .listeners
            .values()
            .filter(|l| l.state == ListenerState::Serving)
            .map(|l| &l.key.0)
            .collect();
        self.refresh_budget_for(namespaces.len(), self.own_fds + self.budget.used());
    }

    /// Sets the budget's limits for `namespaces` namespaces with listeners and
    /// `open` fds open in the process now (sessions included).
    fn refresh_budget_for(&self, namespaces: usize, open: u64) {
        // Debug builds only: `RINGRESS_TEST_FD_BUDGET=off` leaves the budget
        // unlimited, so tests can run the process out of fds (what the budget
        // prevents) and check what still copes then (the admin accept retry).
        #[cfg(debug_assertions)]
        if std::env::var_os("RINGRESS_TEST_FD_BUDGET").is_some_and(|v| v == "off") {
            return;
        }
        let nofile = crate::procstat::nofile_limit().unwrap_or(1024);
        let rt = &self.cfg.runtime;
        self.budget.refresh(
            nofile,
            open,
            rt.fd_reserve,
            rt.max_connections,
            rt.netns_fd_share,
            namespaces as u64,
        );
    }

    /// The session budget (for metrics and /status).
    pub fn budget(&self) -> &FdBudget {
        &self.budget
    }

    /// What the workers get to know about listener `l`.
    fn shared_for(
        &self,
        l: &ListenerConfig,
        upstream: Option<Arc<UpstreamSet>>,
        stats: Arc<crate::driver::ListenerStats>,
    ) -> Arc<ListenerShared> {
        Arc::new(ListenerShared {
            name: Arc::from(l.name.as_str()),
            action: l.action.clone(),
            netns: Arc::from(l.netns_label().as_str()),
            upstream,
            proto: l.proto,
            max_datagram: l.max_datagram_bytes,
            sctp: l.sctp,
            peel: (l.proto == Proto::Sctp
                && l.sctp.style == crate::sctp::Style::OneToMany
                && matches!(l.action, Action::Proxy(_)))
            .then(|| crate::driver::PeelSource {
                binder: self.binder.clone(),
                netns: self.cfg.netns_path(l),
            }),
            stats,
            max_connections: l.max_connections,
            backlog: l.backlog,
            idle_timeout_ms: l.idle_timeout_ms,
            budget: self.budget.clone(),
            netns_fds: self.netns_fds(l),
        })
    }

    /// Says at info how many listeners were bound or closed beyond the
    /// [`BOUND_INFO_LINES`] listed one by one, and starts counting again.
    fn bound_summary(&mut self) {
        self.bound_lines.summary("listeners bound");
        self.closed_lines.summary("listeners closed");
    }

    /// Hands a bound listener to the workers (or records it as down), with new
    /// counters.
    fn install(&mut self, p: Planned, b: Result<Bound, String>) {
        self.install_with(p, b, Default::default());
    }

    /// [`Server::install`] with the listener's counters `stats` (those of the
    /// listener it replaces under the same name, when a reload binds it anew).
    fn install_with(
        &mut self,
        p: Planned,
        b: Result<Bound, String>,
        stats: Arc<crate::driver::ListenerStats>,
    ) {
        let l = p.config;
        let id = self.next_id;
        self.next_id += 1;
        let (state, fds, upstream) = match b {
            Ok(b) => (ListenerState::Serving, b.fds, b.upstream),
            Err(reason) => (ListenerState::Down(reason), Vec::new(), None),
        };
        let shared = self.shared_for(&l, upstream, stats);
        let n = self.workers.len().max(1);
        let sockets = fds.len();
        // Fewer sockets than workers (`shards = N`): worker i accepts on socket
        // i % N, the same fd in every worker that shares it (no dup: the listener
        // costs N fds), under the listener's one id. Not for a one-to-many SCTP
        // socket: one worker owns it.
        let fds: Vec<ListenerFd> = if sockets > 0 && sockets < n && !is_one_to_many(&l) {
            let held: Vec<Arc<OwnedFd>> = fds.into_iter().map(Arc::new).collect();
            (0..n)
                .map(|i| ListenerFd::Shared(held[i % sockets].clone()))
                .collect()
        } else {
            fds.into_iter().map(ListenerFd::Own).collect()
        };
        // One socket per worker; sockets beyond that (taken over from a process
        // with more workers) go round again, each under an id of its own: closing
        // one would reset the connections queued in it.
        let mut extra_ids = Vec::new();
        for (i, fd) in fds.into_iter().enumerate() {
            let wid = if i < n {
                id
            } else {
                self.next_id += 1;
                extra_ids.push(self.next_id - 1);
                self.next_id - 1
            };
            let Some(w) = self.workers.get(i % n) else {
                break;
            };
            if let Err(e) = w.send(Command::AddListener {
                id: wid,
                fd,
                shared: shared.clone(),
            }) {
                tracing::error!(listener = %l.name, error = %e, "cannot hand listener to worker");
            }
        }
        if state == ListenerState::Serving {
            if let Some(NetnsRef::Path(path)) = &l.netns {
                // Just bound there (a stat away from the binder's open).
                if let Ok(ns) = NsId::of_path(path) {
                    self.held.insert(l.name.clone(), ns);
                }
            }
            macro_rules! bound {
                ($level:expr) => {
                    tracing::event!(
                        $level,
                        listener = %l.name,
                        netns = %l.netns_label(),
                        proto = %l.proto,
                        address = %l.listen,
                        action = l.action.kind(),
                        driver = %self.driver,
                        workers = self.workers.len(),
                        sockets,
                        "listener bound"
                    )
                };
            }
            // The first few of a start or reload at info, the rest at debug: a
            // start of 10,000 listeners is not 10,000 info lines.
            match self.bound_lines.next() {
                tracing::Level::INFO => bound!(tracing::Level::INFO),
                _ => bound!(tracing::Level::DEBUG),
            }
        }
        if self.listeners.contains_key(&l.name) {
            self.retire(&l.name, true, "replaced");
        }
        self.listeners.insert(
            l.name.clone(),
            RunningListener {
                id,
                key: self.addr_key(&l),
                config: l,
                template: p.template,
                shared,
                state,
                extra_ids,
            },
        );
    }

    /// Stops listener `name` accepting (its workers close their sockets); its open
    /// connections go on. With `forget`, it is dropped from the table; otherwise it
    /// stays, down, with `reason`.
    fn retire(&mut self, name: &str, forget: bool, reason: &str) {
        let Some(l) = self.listeners.get_mut(name) else {
            return;
        };
        if l.state == ListenerState::Serving {
            for id in std::iter::once(l.id).chain(l.extra_ids.iter().copied()) {
                for w in &self.workers {
                    let _ = w.send(Command::RemoveListener { id });
                }
            }
            match self.closed_lines.next() {
                tracing::Level::INFO => tracing::info!(listener = %name, reason, "listener closed"),
                _ => tracing::debug!(listener = %name, reason, "listener closed"),
            }
        }
        if forget {
            self.listeners.remove(name);
        } else {
            l.state = ListenerState::Down(reason.to_string());
        }
    }

    /// Applies a new, validated config (SIGHUP) without dropping a connection:
    ///
    /// - a listener whose namespace file, protocol and address are unchanged keeps
    ///   its sockets and accept queues, whatever else changed (action, texts,
    ///   upstreams, timeouts, backlog; a rename too): the workers get its new
    ///   settings ([`Command::UpdateListener`]) for the connections they accept from
    ///   now on, and open sessions finish under the old ones. Its counters go on
    ///   when its name is kept. Exceptions, bound anew: SCTP listeners whose socket
    ///   options changed, and one-to-many SCTP listeners that changed in any way
    ///   (their socket is a session; an unchanged one keeps its socket and
    ///   associations);
    /// - a removed listener stops taking new connections and serves what is already
    ///   queued before its sockets close ([`Command::RemoveListener`]);
    /// - new listeners bind.
    ///
    /// Every new socket and upstream pool is made before anything changes, so a
    /// failure leaves the running config untouched.
    ///
    /// # Errors
    /// The first bind failure of an explicit listener, or a duplicate address.
    pub fn reload(&mut self, new: Config) -> Result<(), StartError> {
        if new.runtime.workers.max(1) != self.worker_count() {
            tracing::warn!(
                running = self.worker_count(),
                configured = new.runtime.workers,
                "runtime.workers changes need a restart; keeping the running workers"
            );
        }
        let planned = plan(&new, &netns::list_dir(&new.netns_dir));
        // Down listeners the new config no longer has are forgotten (looked for
        // only when there are down listeners).
        let stale: Vec<String> = if self
            .listeners
            .values()
            .any(|l| l.state != ListenerState::Serving)
        {
            let wanted: HashSet<&str> = planned.iter().map(|p| p.config.name.as_str()).collect();
            self.listeners
                .values()
                .filter(|l| {
                    l.state != ListenerState::Serving && !wanted.contains(l.config.name.as_str())
                })
                .map(|l| l.config.name.clone())
                .collect()
        } else {
            Vec::new()
        };
        let old_cfg = std::mem::replace(&mut self.cfg, new);
        // Serving listeners by what identifies their sockets (as resolved when
        // they were bound), borrowed: a reload of 10,000 unchanged listeners
        // copies none of them.
        let mut by_addr: HashMap<&AddrKey, &RunningListener> = self
            .listeners
            .values()
            .filter(|l| l.state == ListenerState::Serving)
            .map(|l| (&l.key, l))
            .collect();
        let mut unchanged = 0;
        let mut updates: Vec<(String, Planned)> = Vec::new();
        let mut todo = Vec::new();
        for p in planned {
            let key = self.addr_key(&p.config);
            // Kept: a listener whose sockets can take the new settings, and one
            // that did not change at all (a one-to-many SCTP listener, whose socket
            // is one session, would otherwise be bound anew by every reload and
            // lose its associations).
            let old = by_addr.get(&key).filter(|o| {
                keeps_sockets(&o.config, &p.config)
                    || (o.config.name == p.config.name && same(&o.config, &p.config))
            });
            match old {
                Some(o) if o.config.name == p.config.name && same(&o.config, &p.config) => {
                    by_addr.remove(&key);
                    unchanged += 1;
                }
                Some(o) => {
                    let name = o.config.name.clone();
                    by_addr.remove(&key);
                    updates.push((name, p));
                }
                None => todo.push(p),
            }
        }
        // Old listeners neither unchanged nor updated are about to go: their
        // addresses are free for the new ones.
        let going: HashSet<String> = by_addr
            .into_values()
            .map(|l| l.config.name.clone())
            .collect();
        // Addresses served by the listeners that stay, when something is to bind.
        let taken = match todo.is_empty() {
            true => HashMap::new(),
            false => self.taken(&going),
        };
        let result = self.bind_all(&todo, taken).and_then(|bound| {
            let ups = updates
                .iter()
                .map(|(old, p)| self.upstream_for(&self.listeners[old], &p.config))
                .collect::<Result<Vec<_>, BindError>>()?;
            Ok((bound, ups))
        });
        let (bound, upstreams) = match result {
            Ok(b) => b,
            Err(e) => {
                self.cfg = old_cfg;
                return Err(e);
            }
        };
        let removed = going.len() + stale.len();
        let mut kept_stats: HashMap<String, Arc<crate::driver::ListenerStats>> = going
            .iter()
            .filter_map(|n| self.listeners.get(n))
            .map(|l| (l.config.name.clone(), l.shared.stats.clone()))
            .collect();
        for n in going.iter().chain(&stale) {
            self.retire(n, true, "removed or changed by reload");
        }
        let updated = updates.len();
        for ((old, p), upstream) in updates.into_iter().zip(upstreams) {
            self.update(&old, p, upstream);
        }
        let bound_count = todo.len();
        for (p, b) in todo.into_iter().zip(bound) {
            // Bound anew under the same name (its `shards` or SCTP socket options
            // changed): the counters go on.
            let stats = kept_stats.remove(&p.config.name).unwrap_or_default();
            self.install_with(p, b, stats);
        }
        self.bound_summary();
        // Nothing bound, updated or removed: the listener and pool fds are the
        // same, so the fds are not counted again (a /proc/self/fd listing of
        // 10,000 entries costs tens of ms).
        if bound_count == 0 && updated == 0 && removed == 0 {
            self.refresh_budget_settings();
        } else {
            self.refresh_budget();
        }
        tracing::info!(
            kept = unchanged,
            updated,
            bound = bound_count,
            removed,
            "config reloaded"
        );
        Ok(())
    }

    /// The upstream set listener `new` (replacing serving listener `old` on the same
    /// sockets) will use: `old`'s own when its upstreams, their namespace and the
    /// protocol are the same (its socket pools and back-off state go on), a new one
    /// otherwise.
    fn upstream_for(
        &self,
        old: &RunningListener,
        new: &ListenerConfig,
    ) -> Result<Option<Arc<UpstreamSet>>, BindError> {
        let (Action::Proxy(o), Action::Proxy(n)) = (&old.config.action, &new.action) else {
            return self.upstream_set(new);
        };
        if o.upstreams == n.upstreams && o.upstream_netns_path == n.upstream_netns_path {
            return Ok(old.shared.upstream.clone());
        }
        self.upstream_set(new)
    }

    /// Gives serving listener `old` the settings of `p` (maybe a new name) on the
    /// sockets it has: the workers switch for new connections.
    fn update(&mut self, old: &str, p: Planned, upstream: Option<Arc<UpstreamSet>>) {
        let Some(mut running) = self.listeners.remove(old) else {
            return;
        };
        let l = p.config;
        let stats = if l.name == running.config.name {
            running.shared.stats.clone()
        } else {
            Default::default()
        };
        let shared = self.shared_for(&l, upstream, stats);
        let backlog =
            (l.backlog != running.config.backlog && l.proto != Proto::Udp).then_some(l.backlog);
        // A worker that does not hold one of these ids ignores it.
        let ids: Vec<u64> = std::iter::once(running.id)
            .chain(running.extra_ids.iter().copied())
            .collect();
        for w in &self.workers {
            for &id in &ids {
                if let Err(e) = w.send(Command::UpdateListener {
                    id,
                    shared: shared.clone(),
                    backlog,
                }) {
                    tracing::error!(listener = %l.name, error = %e,
                        "cannot update listener in worker");
                }
            }
        }
        tracing::info!(listener = %l.name, previous = %old, netns = %l.netns_label(),
            proto = %l.proto, address = %l.listen, action = l.action.kind(),
            "listener updated; its sockets and queued connections are kept");
        running.config = l;
        running.template = p.template;
        running.shared = shared;
        self.listeners.insert(running.config.name.clone(), running);
    }

    /// Namespace `name` appeared in the netns directory: binds the template
    /// instances it matches and the explicit listeners waiting for it.
    ///
    /// Returns `false` when something could not be bound *yet* (the entry is not a
    /// namespace yet, or its loopback is not up: ENOENT, EINVAL from the nsfs check,
    /// EADDRNOTAVAIL), so the caller should call again shortly.
    pub fn netns_appeared(&mut self, name: &str) -> bool {
        let mut todo = Vec::new();
        for t in &self.cfg.listeners {
            let Some(ns) = &t.netns else { continue };
            if !ns.matches(name) {
                continue;
            }
            let (config, template) = if ns.is_glob() {
                (instance(t, name), Some(t.name.clone()))
            } else {
                (t.clone(), None)
            };
            let serving = self
                .listeners
                .get(&config.name)
                .map(|l| l.state == ListenerState::Serving);
            // A template gets a new instance; an explicit listener is re-bound only
            // if it is known and down.
            let wanted = match template {
                Some(_) => serving != Some(true),
                None => serving == Some(false),
            };
            if wanted {
                todo.push(Planned { config, template });
            }
        }
        let mut done = true;
        self.bound_lines = InfoLines::default();
        // Addresses served now, made once (not once per listener to bind).
        let mut taken = match todo.is_empty() {
            true => HashMap::new(),
            false => self.taken(&HashSet::new()),
        };
        for p in todo {
            let key = self.addr_key(&p.config);
            if let Some(first) = taken.get(&key) {
                tracing::warn!(listener = %p.config.name, address = %p.config.listen,
                    "not bound in namespace {name}: the address is already served by listener {first}");
                continue;
            }
            match self.bind(&p.config) {
                Ok(b) => {
                    taken.insert(key, p.config.name.clone());
                    self.listeners.remove(&p.config.name);
                    self.install(p, Ok(b));
                }
                Err(e) => {
                    // A namespace still being set up (`ip netns add` mounts it after
                    // creating the file; its addresses may come later): try again.
                    let retry = e.step == "enter"
                        || matches!(e.errno(), Some(libc::ENOENT | libc::EADDRNOTAVAIL));
                    tracing::debug!(error = %e, retry, "binding in a new namespace");
                    done &= !retry;
                    if !retry {
                        tracing::warn!(error = %e, "cannot bind in namespace {name}");
                    }
                }
            }
        }
        self.bound_summary();
        self.refresh_budget();
        done
    }

    /// Namespace `name` left the netns directory: its template instances close and
    /// are dropped; explicit listeners in it close and wait, down, for it to return.
    pub fn netns_vanished(&mut self, name: &str) {
        let affected: Vec<(String, bool)> = self
            .listeners
            .values()
            .filter(|l| matches!(&l.config.netns, Some(NetnsRef::Named(n)) if n == name))
            .map(|l| (l.config.name.clone(), l.template.is_some()))
            .collect();
        for (n, is_instance) in affected {
            self.retire(&n, is_instance, "namespace vanished");
        }
        self.bound_summary();
        let path = self.cfg.netns_dir.join(name);
        for l in self.listeners.values() {
            if let Some(u) = &l.shared.upstream {
                u.flush_if_in(&path);
            }
        }
        self.binder.forget(&path);
    }

    /// Listeners whose `netns` is a path (`/proc/PID/ns/net`, a bind mount) hold
    /// the namespace they were bound in; they never follow the path. When the path
    /// now names another namespace (the process exited and its pid was reused, a
    /// bind mount was re-pointed), each such listener closes and goes down, and
    /// nothing is bound in the new namespace (a reload binds it anew, on
    /// purpose). A path that no longer exists changes nothing: the listener's
    /// sockets keep their namespace alive and serve on. One `stat(2)` per such
    /// listener; the control loop calls this every second. Returns the number
    /// of listeners taken down.
    pub fn check_held_namespaces(&mut self) -> usize {
        let mut moved = Vec::new();
        let mut seen = HashSet::new();
        for l in self.listeners.values() {
            let Some(NetnsRef::Path(path)) = &l.config.netns else {
                continue;
            };
            if l.state != ListenerState::Serving {
                continue;
            }
            seen.insert(l.config.name.clone());
            let Ok(now) = NsId::of_path(path) else {
                continue;
            };
            match self.held.get(&l.config.name) {
                Some(&was) if was != now => moved.push((l.config.name.clone(), was, now)),
                Some(_) => {}
                // Kept through a reload or a rename: hold what it serves in now.
                None => moved.push((l.config.name.clone(), now, now)),
            }
        }
        self.held.retain(|n, _| seen.contains(n));
        let mut down = 0;
        for (name, was, now) in moved {
            if was == now {
                self.held.insert(name, now);
                continue;
            }
            tracing::warn!(listener = %name, held = %was, now = %now,
                "the listener's namespace path now names another namespace: not followed; the listener is down");
            self.retire(
                &name,
                false,
                "its namespace path now names another namespace (not followed)",
            );
            self.held.remove(&name);
            down += 1;
        }
        if down > 0 {
            self.bound_summary();
            self.refresh_budget();
        }
        down
    }

    /// Stops every listener accepting (graceful shutdown); connections go on.
    pub fn stop_accepting(&mut self) {
        let names: Vec<String> = self.listeners.keys().cloned().collect();
        for n in names {
            self.retire(&n, false, "shutting down");
        }
        self.bound_summary();
    }

    /// Close-on-exec copies of every serving listener's sockets, asked from the
    /// workers ([`Command::ExportListeners`]), with the listener's identity, for a
    /// takeover. Left out: listeners on port 0 (their address names no socket) and
    /// one-to-many SCTP listeners (their socket carries associations).
    ///
    /// # Errors
    /// A worker did not answer within 2 s (the copies received are closed).
    pub fn export_listeners(&self) -> Result<Vec<(SocketInfo, Vec<OwnedFd>)>, String> {
        let (tx, rx) = mpsc::channel();
        let mut asked = 0;
        for w in &self.workers {
            if w.send(Command::ExportListeners { reply: tx.clone() })
                .is_ok()
            {
                asked += 1;
            }
        }
        drop(tx);
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut by_id: HashMap<u64, Vec<OwnedFd>> = HashMap::new();
        for _ in 0..asked {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(v) => {
                    for (id, fd) in v {
                        by_id.entry(id).or_default().push(fd);
                    }
                }
                Err(_) => return Err("a worker did not hand over its sockets in 2 s".into()),
            }
        }
        let mut out = Vec::new();
        for l in self.listeners.values() {
            let c = &l.config;
            if l.state != ListenerState::Serving
                || (c.proto == Proto::Sctp && c.sctp.style == crate::sctp::Style::OneToMany)
            {
                continue;
            }
            // Workers sharing a socket (`shards = N`) each sent a copy of it: the
            // new process gets each socket once (identity: fstat's dev and inode).
            let mut sockets = HashSet::new();
            let fds: Vec<OwnedFd> = std::iter::once(l.id)
                .chain(l.extra_ids.iter().copied())
                .filter_map(|id| by_id.remove(&id))
                .flatten()
                .filter(|fd| socket_identity(fd).is_none_or(|k| sockets.insert(k)))
                .collect();
            if fds.is_empty() {
                continue;
            }
            out.push((
                SocketInfo {
                    name: c.name.clone(),
                    netns: self.cfg.netns_path(c),
                    netns_label: c.netns_label(),
                    proto: c.proto.as_str().to_string(),
                    address: c.listen,
                    fds: fds.len(),
                },
                fds,
            ));
        }
        Ok(out)
    }

    /// A new process serves the listeners in `taken` now (takeover): their
    /// workers stop accepting and close their fds without touching the shared
    /// sockets ([`Command::DetachListener`]); every other listener stops
    /// accepting as on SIGTERM. Open connections go on.
    pub fn handed_over(&mut self, taken: &HashSet<String>) {
        for (name, l) in &mut self.listeners {
            if l.state != ListenerState::Serving || !taken.contains(name) {
                continue;
            }
            for id in std::iter::once(l.id).chain(l.extra_ids.iter().copied()) {
                for w in &self.workers {
                    let _ = w.send(Command::DetachListener { id });
                }
            }
            l.state = ListenerState::Down("handed over to a new process".into());
            tracing::info!(listener = %name, "listener handed over to the new process");
        }
        self.stop_accepting();
    }

    /// The listeners (serving and down), by name.
    pub fn listeners(&self) -> impl Iterator<Item = &RunningListener> {
        self.listeners.values()
    }

    /// The listener named `name`, if any.
    pub fn listener(&self, name: &str) -> Option<&RunningListener> {
        self.listeners.get(name)
    }

    /// The binder (for creating client sockets in namespaces).
    pub fn binder(&self) -> &Binder {
        &self.binder
    }

    /// The driver the workers run.
    pub fn driver(&self) -> DriverKind {
        self.driver
    }

    /// The workers' handles (for their counters).
    pub fn workers(&self) -> &[WorkerHandle] {
        &self.workers
    }

    /// The config in force.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Sessions the workers have open now, whatever listener they came from
    /// (listeners removed by a reload included): accepted minus closed, summed over
    /// the workers' own counters.
    pub fn open_sessions(&self) -> u64 {
        self.workers
            .iter()
            .map(|w| w.stats.sessions.load(Relaxed))
            .sum()
    }

    /// Listener sockets the workers still hold (removed ones count until their
    /// accept or receive has ended): 0 once no connection can be accepted. Read
    /// it before [`Server::open_sessions`]: the sessions a listener accepted are
    /// counted by then (Acquire, paired with the worker's Release).
    pub fn listener_sockets(&self) -> u64 {
        self.workers
            .iter()
            .map(|w| w.stats.listeners.load(std::sync::atomic::Ordering::Acquire))
            .sum()
    }

    /// Closes every listener and connection, and joins the workers.
    pub fn shutdown(self) {
        for w in self.workers {
            w.shutdown();
        }
        tracing::info!(listeners = self.listeners.len(), "listeners closed");
    }
}
