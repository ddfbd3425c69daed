//! The binder thread: the only thread that calls setns(2).
//!
//! A network namespace matters only when a socket is created; once the fd exists it
//! stays in its namespace, and any thread may accept, read and write on it. So one
//! thread creates every namespace-scoped socket: it enters the target namespace,
//! creates the sockets with socket2, enters the root namespace again, and replies
//! with the fds. Workers never change namespace.
//!
//! Invariants:
//! - after every request the binder thread is back in the namespace the process
//!   started in (the "root" namespace); it checks the namespace inode of
//!   `/proc/thread-self/ns/net` after each switch back, and if the switch back fails
//!   or the inode differs it **aborts the process** rather than go on creating
//!   sockets in the wrong namespace;
//! - namespace fds are opened once and cached by path; a cached fd is closed when
//!   it has not been used for [`NS_CACHE_IDLE`], when the file at that path now
//!   names another namespace (it was deleted and re-created), and on
//!   [`Binder::forget`].
//!
//! Sockets are created with `SOCK_NONBLOCK | SOCK_CLOEXEC` using socket(2), not
//! IORING_OP_SOCKET: an io_uring op punted to an io-wq worker spawned before a
//! setns() would create the socket in the worker's old namespace (seen on Linux 6.1
//! and 6.18; see DESIGN.md).

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use nix::sched::{setns, CloneFlags};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::netns;

/// How long an unused namespace fd stays cached before the binder closes it.
pub const NS_CACHE_IDLE: Duration = Duration::from_secs(30);

/// Where a socket is to be created: `None` is the namespace ringress started in.
pub type NetnsPath = Option<PathBuf>;

/// What to create.
#[derive(Debug, Clone)]
pub enum SocketSpec {
    /// `count` TCP listening sockets on `addr`, each with SO_REUSEADDR and
    /// SO_REUSEPORT, so that one can be given to each worker.
    TcpListeners {
        /// Local address to bind.
        addr: SocketAddr,
        /// listen(2) backlog (connections).
        backlog: u32,
        /// Sockets to create (one per worker), at least 1.
        count: usize,
    },
    /// One unconnected TCP socket of `addr`'s family, for the caller to connect
    /// from (used by clients).
    TcpClient {
        /// The address family is taken from this address; nothing is bound.
        family_of: SocketAddr,
    },
    /// `count` UDP sockets bound to `addr`, each with SO_REUSEADDR and
    /// SO_REUSEPORT (one per worker); on a wildcard address also IP_PKTINFO /
    /// IPV6_RECVPKTINFO, so that replies can leave from the address a client sent to.
    UdpSockets {
        /// Local address to bind.
        addr: SocketAddr,
        /// Sockets to create (one per worker), at least 1.
        count: usize,
    },
    /// `count` unbound UDP sockets of `addr`'s family (upstream pools).
    UdpClients {
        /// The address family is taken from this address; nothing is bound.
        family_of: SocketAddr,
        /// Sockets to create.
        count: usize,
    },
    /// `count` unconnected TCP sockets of `addr`'s family (upstream pools).
    TcpClients {
        /// The address family is taken from this address; nothing is bound.
        family_of: SocketAddr,
        /// Sockets to create.
        count: usize,
    },
    /// `count` SCTP listening sockets of `style` on `addr` (one-to-one: listen(2)
    /// with `backlog`; one-to-many: listen(2) to accept associations), each with
    /// SO_REUSEADDR and SO_REUSEPORT and the options of [`crate::sctp::configure`].
    SctpListeners {
        /// Local address to bind.
        addr: SocketAddr,
        /// listen(2) backlog (associations).
        backlog: u32,
        /// Sockets to create, at least 1.
        count: usize,
        /// One-to-one or one-to-many.
        style: crate::sctp::Style,
        /// Streams and buffer sizes.
        opts: crate::sctp::SocketOpts,
    },
    /// `count` unbound one-to-one SCTP sockets of `addr`'s family (upstream pools).
    SctpClients {
        /// The address family is taken from this address; nothing is bound.
        family_of: SocketAddr,
        /// Sockets to create.
        count: usize,
        /// Streams and buffer sizes.
        opts: crate::sctp::SocketOpts,
    },
}

/// The kind of client socket an upstream pool holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientProto {
    /// TCP (SOCK_STREAM).
    Tcp,
    /// UDP (SOCK_DGRAM).
    Udp,
    /// One-to-one SCTP with these options.
    Sctp(crate::sctp::SocketOpts),
}

impl ClientProto {
    /// A non-blocking, close-on-exec, unbound socket of this kind for `addr`'s
    /// family, made in the calling thread's namespace.
    ///
    /// # Errors
    /// socket(2) or, for SCTP, setsockopt(2) failed.
    pub fn socket(self, addr: SocketAddr) -> io::Result<Socket> {
        match self {
            ClientProto::Tcp => tcp_socket(addr),
            ClientProto::Udp => udp_socket(addr),
            ClientProto::Sctp(opts) => {
                crate::sctp::socket(addr, crate::sctp::Style::OneToOne, &opts)
            }
        }
    }

    /// The binder request for `count` sockets of this kind.
    fn spec(self, family_of: SocketAddr, count: usize) -> SocketSpec {
        match self {
            ClientProto::Tcp => SocketSpec::TcpClients { family_of, count },
            ClientProto::Udp => SocketSpec::UdpClients { family_of, count },
            ClientProto::Sctp(opts) => SocketSpec::SctpClients {
                family_of,
                count,
                opts,
            },
        }
    }
}

impl SocketSpec {
    fn addr(&self) -> SocketAddr {
        match self {
            SocketSpec::TcpListeners { addr, .. } => *addr,
            SocketSpec::TcpClient { family_of } => *family_of,
            SocketSpec::TcpClients { family_of, .. } => *family_of,
            SocketSpec::UdpSockets { addr, .. } => *addr,
            SocketSpec::UdpClients { family_of, .. } => *family_of,
            SocketSpec::SctpListeners { addr, .. } => *addr,
            SocketSpec::SctpClients { family_of, .. } => *family_of,
        }
    }
}

/// A failed binder request. Its message names the listener, the step, the address,
/// the namespace and the errno, e.g.
/// `listener alpha: bind [::]:8080 in netns ns-alpha: Address already in use (os error 98)`.
#[derive(Debug, thiserror::Error)]
#[error("listener {listener}: {step} {addr} in netns {netns}: {source}")]
pub struct BindError {
    /// The listener (or client) the socket was for.
    pub listener: String,
    /// The step that failed: "enter", "socket", "setsockopt", "bind", "listen".
    pub step: &'static str,
    /// The socket address concerned.
    pub addr: SocketAddr,
    /// The namespace label ("root" for the start namespace).
    pub netns: String,
    /// The OS error, errno kept.
    #[source]
    pub source: io::Error,
}

impl BindError {
    /// The errno of the failure, when it came from the OS.
    pub fn errno(&self) -> Option<i32> {
        self.source.raw_os_error()
    }
}

struct Request {
    owner: String,
    netns_label: String,
    netns: NetnsPath,
    spec: SocketSpec,
    reply: mpsc::SyncSender<Result<Vec<OwnedFd>, BindError>>,
}

/// Called by the binder with the socket a peel-off produced (or its error).
pub type PeelReply = Box<dyn FnOnce(io::Result<OwnedFd>) + Send>;

enum Msg {
    Create(Request),
    /// Peel association `assoc` off one-to-many socket `fd` (a dup) in `netns`.
    Peeloff {
        netns: Option<PathBuf>,
        fd: OwnedFd,
        assoc: i32,
        reply: PeelReply,
    },
    Forget(PathBuf),
    /// Fill a pool; reply when asked to (synchronous fill).
    Fill(
        Arc<SocketPool>,
        Option<mpsc::SyncSender<Result<(), BindError>>>,
    ),
}

/// Unconnected, non-blocking TCP (or UDP) sockets of one address family made in
/// one namespace, ready for workers to connect from (upstream connects in another
/// namespace without a binder round trip). The binder fills it; workers take.
pub struct SocketPool {
    owner: String,
    netns: PathBuf,
    label: String,
    family_of: SocketAddr,
    proto: ClientProto,
    target: usize,
    fds: Mutex<Vec<OwnedFd>>,
    refilling: AtomicBool,
    /// errno of the last failed fill, 0 if the last fill worked.
    last_error: AtomicI32,
    /// When the last fill failed.
    failed_at: Mutex<Option<Instant>>,
    waiters: Mutex<Vec<Arc<OwnedFd>>>,
}

impl fmt::Debug for SocketPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SocketPool")
            .field("netns", &self.label)
            .field("family_of", &self.family_of)
            .field("len", &self.len())
            .finish()
    }
}

impl SocketPool {
    /// An empty pool for `proto` sockets of `family_of`'s family in namespace file
    /// `netns` (labelled `label` in errors), for listener `owner`, kept at `target`
    /// sockets.
    pub fn new(
        owner: String,
        netns: PathBuf,
        label: String,
        family_of: SocketAddr,
        proto: ClientProto,
        target: usize,
    ) -> SocketPool {
        SocketPool {
            owner,
            netns,
            label,
            family_of,
            proto,
            target: target.max(2),
            fds: Mutex::new(Vec::new()),
            refilling: AtomicBool::new(false),
            last_error: AtomicI32::new(0),
            failed_at: Mutex::new(None),
            waiters: Mutex::new(Vec::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<OwnedFd>> {
        self.fds.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a socket, if one is ready.
    pub fn take(&self) -> Option<OwnedFd> {
        self.lock().pop()
    }

    /// Sockets ready (count).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no socket is ready.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// True once when the pool is below its target and no refill is running: the
    /// caller must then ask the binder for one ([`Binder::fill_later`]). Takes made
    /// while a refill runs are made up by the next one, so refills batch under
    /// load, and an idle pool is always full.
    pub fn wants_refill(&self) -> bool {
        self.len() < self.target
            && self
                .refilling
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
    }

    /// Whether a refill is running.
    pub fn refilling(&self) -> bool {
        self.refilling.load(Ordering::Acquire)
    }

    /// errno of the last fill, if it failed.
    pub fn last_error(&self) -> Option<i32> {
        match self.last_error.load(Ordering::Acquire) {
            0 => None,
            e => Some(e),
        }
    }

    /// Whether the last fill failed less than `within` ago.
    pub fn failed_recently(&self, within: Duration) -> bool {
        self.last_error().is_some()
            && self
                .failed_at
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_some_and(|t| t.elapsed() < within)
    }

    /// The namespace file this pool's sockets are made in.
    pub fn netns(&self) -> &Path {
        &self.netns
    }

    /// Closes every pooled socket (their namespace has gone).
    pub fn flush(&self) {
        self.lock().clear();
    }

    /// Writes eventfd `wake` when the running refill ends (at once if none runs or
    /// sockets are ready).
    /// Each eventfd is listed once, however many sessions of its worker wait.
    pub fn notify_on_refill(&self, wake: Arc<OwnedFd>) {
        {
            let mut w = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
            if !w.iter().any(|x| Arc::ptr_eq(x, &wake)) {
                w.push(wake);
            }
        }
        if !self.refilling() || !self.is_empty() {
            self.wake_waiters();
        }
    }

    fn wake_waiters(&self) {
        let w = std::mem::take(&mut *self.waiters.lock().unwrap_or_else(|p| p.into_inner()));
        for fd in w {
            crate::eventfd::wake(fd.as_raw_fd());
        }
    }
}

/// Handle to the binder thread. Cloning is cheap; the thread ends when the last
/// handle is dropped.
#[derive(Clone)]
pub struct Binder {
    tx: mpsc::Sender<Msg>,
    tid: i32,
    root_inode: u64,
}

impl fmt::Debug for Binder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Binder").field("tid", &self.tid).finish()
    }
}

impl Binder {
    /// Starts the binder thread ("ringress-binder"). The namespace of the calling
    /// thread becomes the root namespace that the binder always returns to.
    ///
    /// # Errors
    /// Opening `/proc/thread-self/ns/net` failed, or the thread could not be spawned.
    pub fn start() -> io::Result<Binder> {
        let root = File::open("/proc/thread-self/ns/net")?;
        let root_inode = root.metadata()?.ino();
        let (tx, rx) = mpsc::channel::<Msg>();
        let (tid_tx, tid_rx) = mpsc::sync_channel(1);
        thread::Builder::new()
            .name("ringress-binder".into())
            .spawn(move || {
                let _ = tid_tx.send(nix::unistd::gettid().as_raw());
                let mut state = BinderState {
                    root,
                    root_inode,
                    cache: HashMap::new(),
                };
                // The thread starts in its parent's namespace; make sure it is the root.
                state.return_to_root();
                loop {
                    match rx.recv_timeout(NS_CACHE_IDLE) {
                        Ok(Msg::Create(req)) => {
                            let result = state.serve(&req);
                            let _ = req.reply.send(result);
                        }
                        Ok(Msg::Peeloff {
                            netns,
                            fd,
                            assoc,
                            reply,
                        }) => {
                            reply(state.peeloff(netns.as_deref(), &fd, assoc));
                        }
                        Ok(Msg::Forget(path)) => {
                            state.cache.remove(&path);
                        }
                        Ok(Msg::Fill(pool, reply)) => {
                            let r = state.fill(&pool);
                            if let Some(reply) = reply {
                                let _ = reply.send(r);
                            }
                        }
                        Err(mpsc::RecvTimeoutError::Timeout) => {}
                        Err(mpsc::RecvTimeoutError::Disconnected) => break,
                    }
                    let now = Instant::now();
                    state
                        .cache
                        .retain(|_, c| now.duration_since(c.last_used) < NS_CACHE_IDLE);
                }
            })?;
        let tid = tid_rx
            .recv()
            .map_err(|_| io::Error::other("binder thread died at start"))?;
        Ok(Binder {
            tx,
            tid,
            root_inode,
        })
    }

    /// Thread id of the binder thread (for `/proc/self/task/TID/ns/net` checks).
    pub fn tid(&self) -> i32 {
        self.tid
    }

    /// Inode of the root network namespace, the one the binder returns to.
    pub fn root_inode(&self) -> u64 {
        self.root_inode
    }

    /// Creates the sockets of `spec` in namespace `netns` (a namespace file, or
    /// `None` for the root namespace) for `owner` (a listener name, used in errors).
    /// `netns_label` is how the namespace is named in errors ("root" if `None`).
    ///
    /// Blocks until the binder answers.
    ///
    /// # Errors
    /// A [`BindError`] naming owner, step, address, namespace and errno. On error no
    /// socket of the request stays open.
    pub fn create(
        &self,
        owner: &str,
        netns: Option<&Path>,
        netns_label: &str,
        spec: SocketSpec,
    ) -> Result<Vec<OwnedFd>, BindError> {
        let (reply, rx) = mpsc::sync_channel(1);
        let addr = spec.addr();
        let gone = |step| BindError {
            listener: owner.to_string(),
            step,
            addr,
            netns: netns_label.to_string(),
            source: io::Error::other("binder thread is gone"),
        };
        self.tx
            .send(Msg::Create(Request {
                owner: owner.to_string(),
                netns_label: netns_label.to_string(),
                netns: netns.map(Path::to_path_buf),
                spec,
                reply,
            }))
            .map_err(|_| gone("request"))?;
        rx.recv().map_err(|_| gone("reply"))?
    }

    /// Fills `pool` to its target now, waiting for the binder.
    ///
    /// # Errors
    /// Entering the namespace or socket(2) failed; the pool keeps what it had.
    pub fn fill_now(&self, pool: &Arc<SocketPool>) -> Result<(), BindError> {
        let (reply, rx) = mpsc::sync_channel(1);
        let gone = || BindError {
            listener: pool.owner.clone(),
            step: "request",
            addr: pool.family_of,
            netns: pool.label.clone(),
            source: io::Error::other("binder thread is gone"),
        };
        pool.refilling.store(true, Ordering::Release);
        self.tx
            .send(Msg::Fill(pool.clone(), Some(reply)))
            .map_err(|_| gone())?;
        rx.recv().map_err(|_| gone())?
    }

    /// Asks the binder to fill `pool` in the background (the caller has seen
    /// [`SocketPool::wants_refill`] return true). Never blocks.
    pub fn fill_later(&self, pool: Arc<SocketPool>) {
        if let Err(mpsc::SendError(Msg::Fill(pool, _))) = self.tx.send(Msg::Fill(pool, None)) {
            pool.last_error.store(libc::ESHUTDOWN, Ordering::Release);
            pool.refilling.store(false, Ordering::Release);
            pool.wake_waiters();
        }
    }

    /// Asks the binder to branch association `assoc` of one-to-many SCTP socket
    /// `fd` (a duplicate; the binder closes it) off into a one-to-one socket, inside
    /// namespace file `netns` (`None`: the root namespace): Linux refuses a
    /// peel-off from another namespace than the socket's (EINVAL). `reply` gets the
    /// new socket on the binder thread. Never blocks.
    ///
    /// # Errors
    /// Through `reply`: entering the namespace or the peel-off failed (EINVAL: no
    /// such association any more), or the binder is gone.
    pub fn peel_off(&self, netns: Option<PathBuf>, fd: OwnedFd, assoc: i32, reply: PeelReply) {
        if let Err(mpsc::SendError(Msg::Peeloff { reply, .. })) = self.tx.send(Msg::Peeloff {
            netns,
            fd,
            assoc,
            reply,
        }) {
            reply(Err(io::Error::other("binder thread is gone")));
        }
    }

    /// Drops the cached fd of namespace file `path`, if any (when its last user is
    /// gone, or it was deleted).
    pub fn forget(&self, path: &Path) {
        let _ = self.tx.send(Msg::Forget(path.to_path_buf()));
    }
}

struct CachedNs {
    file: File,
    dev: u64,
    ino: u64,
    last_used: Instant,
}

struct BinderState {
    root: File,
    root_inode: u64,
    cache: HashMap<PathBuf, CachedNs>,
}

impl BinderState {
    fn serve(&mut self, req: &Request) -> Result<Vec<OwnedFd>, BindError> {
        let addr = req.spec.addr();
        let err = |step: &'static str, source: io::Error| BindError {
            listener: req.owner.clone(),
            step,
            addr,
            netns: req.netns_label.clone(),
            source,
        };
        self.in_netns(req.netns.as_deref(), || create_sockets(&req.spec))
            .map_err(|(s, e)| err(s, e))
    }

    /// Runs `f` inside namespace file `netns` (`None`: here, the root namespace)
    /// and returns to the root namespace afterwards (or aborts the process).
    ///
    /// # Errors
    /// `("enter", errno)` when the namespace cannot be opened or entered; else
    /// `f`'s error.
    fn in_netns<T>(
        &mut self,
        netns: Option<&Path>,
        f: impl FnOnce() -> Result<T, (&'static str, io::Error)>,
    ) -> Result<T, (&'static str, io::Error)> {
        let Some(path) = netns else {
            return f();
        };
        let ns = self.namespace(path).map_err(|e| ("enter", e))?;
        setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|e| ("enter", e.into()))?;
        let result = f();
        self.return_to_root();
        result
    }

    /// Peels `assoc` off `fd` from inside `netns`, then returns to the root.
    fn peeloff(&mut self, netns: Option<&Path>, fd: &OwnedFd, assoc: i32) -> io::Result<OwnedFd> {
        let step = format!("peel off association {assoc} in");
        self.in_netns(netns, || {
            crate::sctp::peeloff(fd.as_raw_fd(), assoc).map_err(|e| ("peel off", e))
        })
        .map_err(|(s, e)| {
            let step = if s == "enter" { "enter" } else { step.as_str() };
            let place = netns.map_or_else(|| "root".into(), |p| p.display().to_string());
            io::Error::new(e.kind(), format!("{step} {place}: {e}"))
        })
    }

    /// Fills `pool` up to its target in its namespace; wakes its waiters.
    ///
    /// Sockets taken while a refill runs do not start another refill, and the
    /// running one counted what was missing when it began: so once it ends, the
    /// pool is topped up again here if it is short (a few passes at most), and an
    /// idle pool is full.
    fn fill(&mut self, pool: &SocketPool) -> Result<(), BindError> {
        let mut out = self.fill_once(pool);
        for _ in 0..3 {
            if out.is_err() || !pool.wants_refill() {
                break;
            }
            out = self.fill_once(pool);
        }
        out
    }

    /// One refill of `pool` to its target.
    fn fill_once(&mut self, pool: &SocketPool) -> Result<(), BindError> {
        let missing = pool.target.saturating_sub(pool.len());
        let req = Request {
            owner: pool.owner.clone(),
            netns_label: pool.label.clone(),
            netns: Some(pool.netns.clone()),
            spec: pool.proto.spec(pool.family_of, missing),
            reply: mpsc::sync_channel(1).0,
        };
        let r = if missing == 0 {
            Ok(Vec::new())
        } else {
            self.serve(&req)
        };
        let out = match r {
            Ok(fds) => {
                pool.lock().extend(fds);
                pool.last_error.store(0, Ordering::Release);
                Ok(())
            }
            Err(e) => {
                tracing::warn!(error = %e, "upstream socket pool refill failed");
                pool.last_error
                    .store(e.errno().unwrap_or(libc::EIO), Ordering::Release);
                *pool.failed_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
                Err(e)
            }
        };
        pool.refilling.store(false, Ordering::Release);
        pool.wake_waiters();
        out
    }

    /// The cached fd of namespace file `path`, (re)opened when the file now names
    /// another namespace than the cached one.
    fn namespace(&mut self, path: &Path) -> io::Result<&File> {
        let meta = std::fs::metadata(path)?;
        let fresh = match self.cache.get(path) {
            Some(c) => c.dev != meta.dev() || c.ino != meta.ino(),
            None => true,
        };
        if fresh {
            let file = netns::open_netns(path)?;
            let m = file.metadata()?;
            self.cache.insert(
                path.to_path_buf(),
                CachedNs {
                    file,
                    dev: m.dev(),
                    ino: m.ino(),
                    last_used: Instant::now(),
                },
            );
        }
        let c = self.cache.get_mut(path).expect("inserted above");
        c.last_used = Instant::now();
        Ok(&c.file)
    }

    /// Enters the root namespace again, or aborts the process.
    fn return_to_root(&self) {
        if let Err(e) = setns(self.root.as_fd(), CloneFlags::CLONE_NEWNET) {
            tracing::error!(error = %e, "binder: cannot return to the root network namespace; aborting");
            std::process::abort();
        }
        match netns::current_netns_inode() {
            Ok(ino) if ino == self.root_inode => {}
            other => {
                tracing::error!(
                    ?other,
                    expected = self.root_inode,
                    "binder: not in the root network namespace after setns; aborting"
                );
                std::process::abort();
            }
        }
    }
}

/// Creates the sockets of `spec` in the calling thread's namespace.
fn create_sockets(spec: &SocketSpec) -> Result<Vec<OwnedFd>, (&'static str, io::Error)> {
    match *spec {
        SocketSpec::TcpListeners {
            addr,
            backlog,
            count,
        } => listening(count, addr, backlog, tcp_socket),
        SocketSpec::TcpClient { family_of } => unbound(1, family_of, tcp_socket),
        SocketSpec::TcpClients { family_of, count } => unbound(count, family_of, tcp_socket),
        SocketSpec::UdpClients { family_of, count } => unbound(count, family_of, udp_socket),
        SocketSpec::SctpClients {
            family_of,
            count,
            opts,
        } => unbound(count, family_of, |a| ClientProto::Sctp(opts).socket(a)),
        SocketSpec::SctpListeners {
            addr,
            backlog,
            count,
            style,
            opts,
        } => listening(count, addr, backlog, |a| {
            crate::sctp::socket(a, style, &opts)
        }),
        SocketSpec::UdpSockets { addr, count } => {
            let mut fds = Vec::with_capacity(count);
            for _ in 0..count.max(1) {
                let s = udp_socket(addr).map_err(|e| ("socket", e))?;
                s.set_reuse_address(true)
                    .and_then(|_| s.set_reuse_port(true))
                    .map_err(|e| ("setsockopt", e))?;
                if addr.ip().is_unspecified() {
                    set_pktinfo(&s, addr.is_ipv6()).map_err(|e| ("setsockopt", e))?;
                }
                s.bind(&SockAddr::from(addr)).map_err(|e| ("bind", e))?;
                fds.push(OwnedFd::from(s));
            }
            Ok(fds)
        }
    }
}

/// `count` sockets from `make(family_of)`, none bound.
fn unbound(
    count: usize,
    family_of: SocketAddr,
    make: impl Fn(SocketAddr) -> io::Result<Socket>,
) -> Result<Vec<OwnedFd>, (&'static str, io::Error)> {
    (0..count)
        .map(|_| {
            make(family_of)
                .map(OwnedFd::from)
                .map_err(|e| ("socket", e))
        })
        .collect()
}

/// `count` (at least 1) sockets from `make(addr)`, each with SO_REUSEADDR and
/// SO_REUSEPORT, bound to `addr` and listening with `backlog` (TCP, SCTP).
fn listening(
    count: usize,
    addr: SocketAddr,
    backlog: u32,
    make: impl Fn(SocketAddr) -> io::Result<Socket>,
) -> Result<Vec<OwnedFd>, (&'static str, io::Error)> {
    let mut fds = Vec::with_capacity(count);
    for _ in 0..count.max(1) {
        let s = make(addr).map_err(|e| ("socket", e))?;
        s.set_reuse_address(true)
            .and_then(|_| s.set_reuse_port(true))
            .map_err(|e| ("setsockopt", e))?;
        s.bind(&SockAddr::from(addr)).map_err(|e| ("bind", e))?;
        s.listen(backlog.min(i32::MAX as u32) as i32)
            .map_err(|e| ("listen", e))?;
        fds.push(OwnedFd::from(s));
    }
    Ok(fds)
}

/// A non-blocking, close-on-exec UDP socket of `addr`'s family.
pub fn udp_socket(addr: SocketAddr) -> io::Result<Socket> {
    Socket::new(
        Domain::for_address(addr),
        Type::DGRAM.nonblocking().cloexec(),
        Some(Protocol::UDP),
    )
}

/// Asks for the destination address of each datagram (ip(7) IP_PKTINFO, ipv6(7)
/// IPV6_RECVPKTINFO; an IPv6 socket gets both, for IPv4-mapped clients).
fn set_pktinfo(s: &Socket, v6: bool) -> io::Result<()> {
    let on: libc::c_int = 1;
    let set = |level, name| {
        // SAFETY: setsockopt with a valid int pointer and its size on our socket.
        let r = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(s),
                level,
                name,
                (&on as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    };
    if v6 {
        set(libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO)?;
        // Dual-stack sockets also see IPv4 datagrams; ignore a v6-only socket's refusal.
        let _ = set(libc::IPPROTO_IP, libc::IP_PKTINFO);
        Ok(())
    } else {
        set(libc::IPPROTO_IP, libc::IP_PKTINFO)
    }
}

fn tcp_socket(addr: SocketAddr) -> io::Result<Socket> {
    Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_namespace_listener_and_port_in_use() {
        let b = Binder::start().unwrap();
        let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let fds = b
            .create(
                "t",
                None,
                "root",
                SocketSpec::TcpListeners {
                    addr,
                    backlog: 16,
                    count: 2,
                },
            )
            .unwrap();
        assert_eq!(fds.len(), 2);
        // A plain (non-reuseport) socket on a used port gives EADDRINUSE with context.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let used = l.local_addr().unwrap();
        let e = b
            .create(
                "alpha",
                None,
                "root",
                SocketSpec::TcpListeners {
                    addr: used,
                    backlog: 16,
                    count: 1,
                },
            )
            .unwrap_err();
        assert_eq!(e.errno(), Some(libc::EADDRINUSE));
        let msg = e.to_string();
        assert!(
            msg.starts_with(&format!("listener alpha: bind {used} in netns root: ")),
            "{msg}"
        );
        assert_eq!(netns::thread_netns_inode(b.tid()).unwrap(), b.root_inode());
    }

    #[test]
    fn missing_namespace_is_an_enter_error() {
        let b = Binder::start().unwrap();
        let e = b
            .create(
                "x",
                Some(Path::new("/run/netns/ringress-binder-test-missing")),
                "ringress-binder-test-missing",
                SocketSpec::TcpClient {
                    family_of: "127.0.0.1:1".parse().unwrap(),
                },
            )
            .unwrap_err();
        assert_eq!(e.step, "enter");
        assert_eq!(e.errno(), Some(libc::ENOENT));
    }

    #[test]
    fn pool_wakes_each_waiting_worker_once() {
        let pool = SocketPool::new(
            "t".into(),
            "/proc/self/ns/net".into(),
            "self".into(),
            "127.0.0.1:1".parse().unwrap(),
            ClientProto::Tcp,
            4,
        );
        assert!(pool.wants_refill());
        assert!(!pool.wants_refill(), "a second refill while one runs");
        let efd = Arc::new(crate::eventfd::eventfd().unwrap());
        // Many sessions of one worker wait: its eventfd is listed once.
        for _ in 0..100 {
            pool.notify_on_refill(efd.clone());
        }
        pool.refilling.store(false, Ordering::Release);
        pool.wake_waiters();
        let mut v = [0u8; 8];
        // SAFETY: reading 8 bytes from an eventfd into an 8-byte buffer.
        let n = unsafe { libc::read(efd.as_raw_fd(), v.as_mut_ptr().cast(), 8) };
        assert_eq!(n, 8);
        assert_eq!(
            u64::from_ne_bytes(v),
            1,
            "the worker was woken more than once"
        );
    }
}
