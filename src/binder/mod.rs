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
//!   it has not been used for [`NS_CACHE_IDLE`] (looked for every 5 s, not after
//!   every request), when the file at that path now
//!   names another namespace (it was deleted and re-created), and on
//!   [`Binder::forget`].
//!
//! Sockets are created with `SOCK_NONBLOCK | SOCK_CLOEXEC` using socket(2), not
//! IORING_OP_SOCKET: an io_uring op punted to an io-wq worker spawned before a
//! setns() would create the socket in the worker's old namespace (seen on Linux 6.1
//! and 6.18).
//!
//! Capabilities: the binder is the one thread that keeps any after start-up,
//! and only [`crate::privs::BINDER_CAPS`] (those the process has): it drops the
//! rest when it starts. So whatever needs a capability later runs here: socket
//! creation, SCTP peel-offs, the SYN-dropping filter of a removed TCP listener
//! ([`Binder::attach_drop_filter`]) and the namespace checks of a reload
//! ([`Binder::call`]).
//!
//! Health: the binder beats its [`Heartbeat`] once per message and at least every
//! [`crate::health::BEAT_EVERY`]; a panic on the binder thread is logged and
//! stops the process (exit status 1) as a failed worker does.
//!
//! Files: `mod.rs` holds the thread, its requests and the setns guard; `spec.rs`
//! says what sockets to make and makes them ([`SocketSpec`], [`ClientProto`]);
//! `pool.rs` keeps upstream client sockets made ahead of time and refills them
//! ([`SocketPool`]).

mod holder;
mod pool;
mod spec;

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use nix::sched::{setns, CloneFlags};

use crate::health::{Heartbeat, BEAT_EVERY};
use crate::netns;

pub use self::pool::{SocketPool, TopUp, GROWTH as POOL_GROWTH, SHRINK_AFTER as POOL_SHRINK_AFTER};
use self::spec::create_sockets;
pub use self::spec::{udp_socket, ClientProto, SocketSpec};

/// How long an unused namespace fd stays cached before the binder closes it.
pub const NS_CACHE_IDLE: Duration = Duration::from_secs(30);
/// How often the binder looks for cached namespace fds idle for
/// [`NS_CACHE_IDLE`]: an unused fd is closed between 30 and 35 s after its last use.
const NS_CACHE_SWEEP: Duration = Duration::from_secs(5);

/// Where a socket is to be created: `None` is the namespace ringress started in.
pub type NetnsPath = Option<PathBuf>;

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
        match self.source.kind() {
            // A first bind's refusal naming the holder (errno kept in meaning).
            io::ErrorKind::AddrInUse if self.source.raw_os_error().is_none() => {
                Some(libc::EADDRINUSE)
            }
            _ => self.source.raw_os_error(),
        }
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

/// Called by the binder with the result of [`Binder::attach_drop_filter`].
pub type FilterReply = Box<dyn FnOnce(io::Result<()>) + Send>;

/// One socket request of a batch ([`Binder::create_many`]).
#[derive(Debug, Clone)]
pub struct BatchItem {
    /// The listener (or client) the sockets are for, used in errors.
    pub owner: String,
    /// The namespace file (`None`: the root namespace).
    pub netns: NetnsPath,
    /// How the namespace is named in errors ("root" if `None`).
    pub netns_label: String,
    /// What to make.
    pub spec: SocketSpec,
}

/// Items per binder message in [`Binder::create_many`]: bounds how long one
/// message keeps the binder from other work (peel-offs, pool refills).
const BATCH_MAX: usize = 256;

type BatchReply = mpsc::SyncSender<Vec<Result<Vec<OwnedFd>, BindError>>>;

enum Msg {
    Create(Request),
    /// Several requests, grouped by namespace: one setns pair per namespace.
    Batch(Vec<BatchItem>, BatchReply),
    /// Peel association `assoc` off one-to-many socket `fd` (a dup) in `netns`.
    Peeloff {
        netns: Option<PathBuf>,
        fd: OwnedFd,
        assoc: i32,
        reply: PeelReply,
    },
    Forget(PathBuf),
    /// Attach the SYN-dropping filter to TCP listener `fd` (a dup; closed after).
    Filter {
        fd: OwnedFd,
        reply: FilterReply,
    },
    /// Run a closure on the binder thread (with its capabilities).
    Run(Box<dyn FnOnce() + Send>),
    /// Fill a pool; reply when asked to (synchronous fill).
    Fill(
        Arc<SocketPool>,
        Option<mpsc::SyncSender<Result<(), BindError>>>,
    ),
}

/// Handle to the binder thread. Cloning is cheap; the thread ends when the last
/// handle is dropped.
#[derive(Clone)]
pub struct Binder {
    tx: mpsc::Sender<Msg>,
    tid: i32,
    root_inode: u64,
    heartbeat: Arc<Heartbeat>,
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
    /// The thread keeps only the capabilities of [`crate::privs::BINDER_CAPS`]
    /// that the process has, and drops every other one of its own (the calling
    /// thread's are untouched).
    ///
    /// # Errors
    /// Opening `/proc/thread-self/ns/net` failed, the thread could not be spawned,
    /// or it could not drop its capabilities.
    pub fn start() -> io::Result<Binder> {
        let root = File::open("/proc/thread-self/ns/net")?;
        let root_inode = root.metadata()?.ino();
        let (tx, rx) = mpsc::channel::<Msg>();
        let (tid_tx, tid_rx) = mpsc::sync_channel::<io::Result<i32>>(1);
        let heartbeat = Arc::new(Heartbeat::default());
        let beat = heartbeat.clone();
        thread::Builder::new()
            .name("ringress-binder".into())
            .spawn(move || {
                match crate::privs::keep_only(&crate::privs::BINDER_CAPS) {
                    Ok(kept) => {
                        tracing::debug!(kept = ?crate::privs::names(&kept), "binder capabilities");
                        let _ = tid_tx.send(Ok(nix::unistd::gettid().as_raw()));
                    }
                    Err(e) => {
                        let _ = tid_tx.send(Err(e));
                        return;
                    }
                }
                let mut state = BinderState {
                    root,
                    root_inode,
                    cache: HashMap::new(),
                    grown: Vec::new(),
                };
                // The thread starts in its parent's namespace, the root. No setns
                // unless it is not (setns needs CAP_SYS_ADMIN: an unprivileged
                // ringress serving only its own namespace must not need it).
                if netns::current_netns_inode().ok() != Some(root_inode) {
                    state.return_to_root();
                }
                let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    serve_loop(&mut state, &rx, &beat)
                }));
                if served.is_err() {
                    tracing::error!("binder thread panicked; stopping the process");
                    crate::driver::notify_worker_failed();
                }
            })?;
        let tid = tid_rx
            .recv()
            .map_err(|_| io::Error::other("binder thread died at start"))??;
        Ok(Binder {
            tx,
            tid,
            root_inode,
            heartbeat,
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

    /// Creates the sockets of every item, as [`Binder::create`] would one by one,
    /// but entering each namespace once for all its items (the items are grouped
    /// by namespace; at most [`BATCH_MAX`] per message to the binder). Results come
    /// back in the order of `items`.
    ///
    /// Blocks until the binder answers.
    ///
    /// # Errors
    /// Per item, a [`BindError`] as from [`Binder::create`]; an item whose
    /// namespace cannot be entered gets step "enter". No socket of a failed item
    /// stays open.
    pub fn create_many(&self, items: Vec<BatchItem>) -> Vec<Result<Vec<OwnedFd>, BindError>> {
        let mut order: Vec<usize> = (0..items.len()).collect();
        order.sort_by(|&a, &b| items[a].netns.cmp(&items[b].netns));
        let mut out: Vec<Option<Result<Vec<OwnedFd>, BindError>>> =
            (0..items.len()).map(|_| None).collect();
        for chunk in order.chunks(BATCH_MAX) {
            let batch: Vec<BatchItem> = chunk.iter().map(|&i| items[i].clone()).collect();
            let (reply, rx) = mpsc::sync_channel(1);
            let results = match self.tx.send(Msg::Batch(batch, reply)) {
                Ok(()) => rx.recv().ok(),
                Err(_) => None,
            };
            match results {
                Some(results) => {
                    for (&i, r) in chunk.iter().zip(results) {
                        out[i] = Some(r);
                    }
                }
                None => {
                    for &i in chunk {
                        let it = &items[i];
                        out[i] = Some(Err(BindError {
                            listener: it.owner.clone(),
                            step: "request",
                            addr: it.spec.addr(),
                            netns: it.netns_label.clone(),
                            source: io::Error::other("binder thread is gone"),
                        }));
                    }
                }
            }
        }
        out.into_iter()
            .map(|r| r.expect("every item answered"))
            .collect()
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

    /// Asks the binder to attach the SYN-dropping socket filter
    /// ([`crate::driver::drop_new_handshakes`]) to TCP listener `fd` (a
    /// duplicate; the binder closes it): SO_ATTACH_FILTER needs CAP_NET_ADMIN on
    /// Linux 6.18, which workers no longer hold. The filter belongs to the socket
    /// (the open file description), so it applies to every fd of it. `reply` gets
    /// the result on the binder thread. Never blocks.
    ///
    /// # Errors
    /// Through `reply`: setsockopt(2) failed (EPERM without CAP_NET_ADMIN,
    /// ENOMEM), or the binder is gone.
    pub fn attach_drop_filter(&self, fd: OwnedFd, reply: FilterReply) {
        if let Err(mpsc::SendError(Msg::Filter { reply, .. })) =
            self.tx.send(Msg::Filter { fd, reply })
        {
            reply(Err(io::Error::other("binder thread is gone")));
        }
    }

    /// Runs `f` on the binder thread, which keeps the capabilities the other
    /// threads dropped (e.g. CAP_SYS_PTRACE to open `/proc/PID/ns/net` of a
    /// privileged process when a reload checks namespaces), and returns its result.
    /// Blocks until `f` has run; `f` delays every other binder request meanwhile,
    /// so it must be short and must not wait on a worker or the control loop.
    ///
    /// # Errors
    /// The binder thread is gone (or `f` panicked there, which stops the process).
    pub fn call<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> io::Result<T> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.tx
            .send(Msg::Run(Box::new(move || {
                let _ = tx.send(f());
            })))
            .map_err(|_| io::Error::other("binder thread is gone"))?;
        rx.recv()
            .map_err(|_| io::Error::other("binder thread is gone"))
    }

    /// The binder's heartbeat: stale (older than [`crate::health::STALE_AFTER`])
    /// when the binder is stuck or gone.
    pub fn heartbeat(&self) -> &Heartbeat {
        &self.heartbeat
    }
}

/// The binder's loop: serves messages until every [`Binder`] handle is gone,
/// beating `beat` once per message and at least every [`BEAT_EVERY`].
fn serve_loop(state: &mut BinderState, rx: &mpsc::Receiver<Msg>, beat: &Heartbeat) {
    #[cfg(debug_assertions)]
    let mut hook = test_hooks::Hook::from_env();
    let mut swept = Instant::now();
    loop {
        beat.beat();
        #[cfg(debug_assertions)]
        if hook.as_ref().is_some_and(test_hooks::Hook::run) {
            hook = None;
        }
        match rx.recv_timeout(BEAT_EVERY) {
            Ok(Msg::Create(req)) => {
                let result = state.serve(&req);
                let _ = req.reply.send(result);
            }
            Ok(Msg::Batch(items, reply)) => {
                let _ = reply.send(state.serve_batch(&items));
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
            Ok(Msg::Filter { fd, reply }) => {
                reply(crate::driver::drop_new_handshakes(fd.as_fd()));
            }
            Ok(Msg::Run(f)) => f(),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        // Idle namespace fds are looked for every NS_CACHE_SWEEP, not after
        // every request (a scan of up to thousands of entries).
        let now = Instant::now();
        if now.duration_since(swept) >= NS_CACHE_SWEEP {
            swept = now;
            state
                .cache
                .retain(|_, c| now.duration_since(c.last_used) < NS_CACHE_IDLE);
        }
        // Grown pools shrink back (looked at every turn: at least every
        // BEAT_EVERY, 1 s).
        state.trim_pools(now);
    }
}

/// Debug builds only, for the tests of `/healthz` and of a dying binder:
/// `RINGRESS_TEST_BINDER=stall:AFTER_MS:FOR_MS` makes the binder thread stop
/// answering for FOR_MS once AFTER_MS have passed since it started, and
/// `RINGRESS_TEST_BINDER=panic:AFTER_MS` makes it panic then. Release builds have
/// no such hook.
#[cfg(debug_assertions)]
mod test_hooks {
    use std::time::{Duration, Instant};

    pub(super) struct Hook {
        at: Instant,
        stall: Option<Duration>,
    }

    impl Hook {
        pub(super) fn from_env() -> Option<Hook> {
            let v = std::env::var("RINGRESS_TEST_BINDER").ok()?;
            let mut it = v.split(':');
            let kind = it.next()?;
            let after: u64 = it.next()?.parse().ok()?;
            let stall = match kind {
                "stall" => Some(Duration::from_millis(it.next()?.parse().ok()?)),
                "panic" => None,
                _ => return None,
            };
            Some(Hook {
                at: Instant::now() + Duration::from_millis(after),
                stall,
            })
        }

        /// Stalls or panics once its time has come; `true` once done.
        pub(super) fn run(&self) -> bool {
            if Instant::now() < self.at {
                return false;
            }
            match self.stall {
                Some(d) => std::thread::sleep(d),
                None => panic!("RINGRESS_TEST_BINDER asked the binder to panic"),
            }
            true
        }
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
    /// Pools grown past their base, to be trimmed back once calm
    /// ([`SocketPool::trim`]).
    grown: Vec<std::sync::Weak<SocketPool>>,
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

    /// Serves a batch whose items are sorted by namespace: one setns pair per run
    /// of items in the same namespace.
    fn serve_batch(&mut self, items: &[BatchItem]) -> Vec<Result<Vec<OwnedFd>, BindError>> {
        let err = |it: &BatchItem, step: &'static str, source: io::Error| BindError {
            listener: it.owner.clone(),
            step,
            addr: it.spec.addr(),
            netns: it.netns_label.clone(),
            source,
        };
        let mut out = Vec::with_capacity(items.len());
        for group in items.chunk_by(|a, b| a.netns == b.netns) {
            let made = self.in_netns(group[0].netns.as_deref(), || {
                Ok(group
                    .iter()
                    .map(|it| create_sockets(&it.spec))
                    .collect::<Vec<_>>())
            });
            match made {
                Ok(results) => {
                    for (it, r) in group.iter().zip(results) {
                        out.push(r.map_err(|(step, e)| err(it, step, e)));
                    }
                }
                Err((step, e)) => {
                    for it in group {
                        // io::Error is not Clone: the errno is what callers test.
                        let copy = match e.raw_os_error() {
                            Some(n) => io::Error::from_raw_os_error(n),
                            None => io::Error::new(e.kind(), e.to_string()),
                        };
                        out.push(Err(err(it, step, copy)));
                    }
                }
            }
        }
        out
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
        setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|e| {
            let e = io::Error::from(e);
            if e.raw_os_error() == Some(libc::EPERM) {
                // setns(2): CAP_SYS_ADMIN in the caller's user namespace is needed.
                let hint =
                    "entering a network namespace needs CAP_SYS_ADMIN, which this process lacks";
                ("enter", io::Error::new(e.kind(), format!("{e}: {hint}")))
            } else {
                ("enter", e)
            }
        })?;
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
                    exclusive: false,
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
                    exclusive: false,
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
    fn filter_and_call_run_on_the_binder_thread() {
        let b = Binder::start().unwrap();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (tx, rx) = mpsc::channel();
        b.attach_drop_filter(
            OwnedFd::from(l.try_clone().unwrap()),
            Box::new(move |r| {
                let _ = tx.send((r, nix::unistd::gettid().as_raw()));
            }),
        );
        let (r, tid) = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(tid, b.tid());
        // The test process is root: the binder kept CAP_NET_ADMIN.
        r.unwrap();
        let tid = b.call(|| nix::unistd::gettid().as_raw()).unwrap();
        assert_eq!(tid, b.tid());
        assert!(!b.heartbeat().stale());
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
    fn batch_keeps_order_and_enters_each_namespace() {
        let b = Binder::start().unwrap();
        let pid = std::process::id();
        let a = netns::TempNetns::create(&format!("rgb-a-{pid}")).unwrap();
        let c = netns::TempNetns::create(&format!("rgb-c-{pid}")).unwrap();
        let missing = PathBuf::from(format!("/run/netns/rgb-missing-{pid}"));
        let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let item = |owner: &str, netns: Option<PathBuf>| BatchItem {
            owner: owner.to_string(),
            netns,
            netns_label: owner.to_string(),
            spec: SocketSpec::TcpListeners {
                addr,
                backlog: 8,
                count: 2,
                exclusive: false,
            },
        };
        // Interleaved namespaces: results must come back in this order.
        let items = vec![
            item("a1", Some(a.path())),
            item("r1", None),
            item("c1", Some(c.path())),
            item("x", Some(missing)),
            item("a2", Some(a.path())),
        ];
        let out = b.create_many(items);
        assert_eq!(out.len(), 5);
        let ino = |fd: &OwnedFd| {
            // SIOCGSKNS gives the socket's namespace as an fd (Linux 4.9).
            // SAFETY: ioctl on a socket we own; it returns a new fd or -1.
            let ns = unsafe { libc::ioctl(fd.as_raw_fd(), 0x894C) };
            assert!(ns >= 0, "{}", io::Error::last_os_error());
            // SAFETY: the ioctl just gave us this fd.
            let f = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(ns) };
            f.metadata().unwrap().ino()
        };
        let ns_ino = |p: PathBuf| std::fs::metadata(p).unwrap().ino();
        let want = [
            Some(ns_ino(a.path())),
            Some(b.root_inode()),
            Some(ns_ino(c.path())),
            None,
            Some(ns_ino(a.path())),
        ];
        for (r, w) in out.iter().zip(want) {
            match (r, w) {
                (Ok(fds), Some(w)) => {
                    assert_eq!(fds.len(), 2);
                    assert!(fds.iter().all(|f| ino(f) == w));
                }
                (Err(e), None) => {
                    assert_eq!((e.step, e.errno()), ("enter", Some(libc::ENOENT)));
                    assert_eq!(e.listener, "x");
                }
                (r, w) => panic!("{:?} vs {w:?}", r.as_ref().map(|f| f.len())),
            }
        }
        assert_eq!(netns::thread_netns_inode(b.tid()).unwrap(), b.root_inode());
    }
}
