//! Workers and their I/O drivers.
//!
//! A worker is one OS thread, pinned to one CPU, that owns one driver: an io_uring
//! ring ([`uring`], feature `uring`) or an epoll instance ([`epoll`]). The supervisor
//! hands it listener sockets over a channel and wakes it through an eventfd; the
//! worker accepts connections on them and runs one [`Session`] per connection.
//!
//! # What a driver must provide
//! Both drivers run the same protocol code ([`crate::proto`]) and the same
//! per-connection bookkeeping ([`Conn`]). A driver must:
//! 1. accept on every listener it was given, without blocking (io_uring: multishot
//!    accept, re-armed when a CQE comes without `IORING_CQE_F_MORE`; epoll:
//!    `accept4` until EAGAIN), re-arming after EINTR/ECONNABORTED and pausing for
//!    [`ACCEPT_PAUSE_MS`] after EMFILE/ENFILE/ENOBUFS/ENOMEM;
//! 2. for each connection call [`Conn::open`], then after every operation report one
//!    [`Completion`] on its [`Side`] through [`Conn::complete`] / [`Conn::sent`];
//! 3. act on the session's requests after every completion, on each side: send
//!    [`Conn::next_send`] (one send in flight per side; a short send is reported as
//!    `Sent(n)` and the rest is sent next), arm one receive when
//!    [`Conn::take_recv_request`] says so, call [`Conn::shutdown_drained`], connect
//!    the upstream when [`Conn::take_connect_request`] says so (through
//!    [`Conn::start_connect`], then a non-blocking connect reported as `Connected`
//!    or `Error`), register the session's deadline with [`Timers::sync`] and report
//!    `Timeout` for those [`Timers::expired`] returns, and close when
//!    [`Conn::finished`] (after [`Conn::linger_if_aborting`]);
//! 4. never let a buffer go while the kernel may still use it, and close an fd only
//!    when no operation on it is in flight;
//! 5. handle [`Command`]s: add a listener, remove one (stop accepting, release its
//!    fd), shut down;
//! 6. never run a blocking syscall.

pub mod epoll;
pub mod udp;
pub mod upstream;
#[cfg(feature = "uring")]
pub mod uring;

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use crate::config::{Action, IoChoice, Proto, SctpConfig};
pub(crate) use crate::eventfd::{drain_eventfd, eventfd, wake};
use crate::proto::{
    Completion, ConnInfo, Origin, OutMessage, Piece, SendBackoff, SendFailed, Session, SessionIo,
    Side,
};
pub use crate::proto::{SEND_RETRY_MAX_MS, SEND_STALL_LIMIT};
use crate::sctp::{MsgInfo, MsgSpace};
pub use upstream::UpstreamSet;

/// How long a listener stops accepting after EMFILE/ENFILE/ENOBUFS/ENOMEM (ms).
pub const ACCEPT_PAUSE_MS: u64 = 100;

/// Which driver a worker runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriverKind {
    /// io_uring (Linux 5.19+ for multishot accept and provided-buffer rings).
    Uring,
    /// epoll, edge-triggered.
    Epoll,
}

impl fmt::Display for DriverKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DriverKind::Uring => "uring",
            DriverKind::Epoll => "epoll",
        })
    }
}

/// Why io_uring cannot be used here, or `Ok` if a ring can be set up.
///
/// # Errors
/// A message naming the cause: `/proc/sys/kernel/io_uring_disabled` is 2, the
/// binary was built without the `uring` feature, or io_uring_setup(2) failed
/// (ENOSYS: no io_uring in the kernel; EPERM: disabled for this process).
pub fn uring_available() -> Result<(), String> {
    if let Ok(s) = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled") {
        if s.trim() == "2" {
            return Err("io_uring is disabled (/proc/sys/kernel/io_uring_disabled = 2)".into());
        }
    }
    #[cfg(feature = "uring")]
    {
        uring::probe_setup().map_err(|e| format!("io_uring_setup failed: {e}"))
    }
    #[cfg(not(feature = "uring"))]
    {
        Err("this ringress was built without the `uring` feature".into())
    }
}

/// Resolves the configured choice to a driver. `auto` takes io_uring when a ring can
/// be set up, else epoll, and logs the choice.
///
/// # Errors
/// `io = "uring"` where io_uring is unavailable: the cause, and a hint to use epoll.
pub fn resolve(choice: IoChoice) -> Result<DriverKind, String> {
    match choice {
        IoChoice::Epoll => Ok(DriverKind::Epoll),
        IoChoice::Uring => uring_available().map(|_| DriverKind::Uring).map_err(|e| {
            format!("io = \"uring\" but {e}; use io = \"epoll\" (or --io epoll, or io = \"auto\")")
        }),
        IoChoice::Auto => match uring_available() {
            Ok(()) => {
                tracing::info!("io = auto: using io_uring");
                Ok(DriverKind::Uring)
            }
            Err(e) => {
                tracing::info!("io = auto: using epoll ({e})");
                Ok(DriverKind::Epoll)
            }
        },
    }
}

/// Counters of one listener, shared by all workers (all counts; bytes in bytes).
#[derive(Debug, Default)]
pub struct ListenerStats {
    /// Connections accepted.
    pub accepted: AtomicU64,
    /// Connections closed.
    pub closed: AtomicU64,
    /// Bytes received from clients.
    pub bytes_in: AtomicU64,
    /// Bytes sent to clients.
    pub bytes_out: AtomicU64,
    /// Accept errors other than EINTR/ECONNABORTED/EAGAIN.
    pub accept_errors: AtomicU64,
    /// Sessions that ended with an I/O error or timeout (reset, refused, ...).
    pub conn_errors: AtomicU64,
    /// Resets (ECONNRESET/EPIPE) seen on established connections.
    pub resets: AtomicU64,
    /// Upstream connects refused (ECONNREFUSED).
    pub upstream_refused: AtomicU64,
    /// Upstream connects that timed out (`connect_timeout_ms`).
    pub upstream_timeouts: AtomicU64,
    /// Upstream connects that failed otherwise (unreachable, no socket, ...).
    pub upstream_errors: AtomicU64,
    /// UDP datagrams dropped for being larger than `max_datagram_bytes` (MSG_TRUNC).
    pub truncated: AtomicU64,
    /// UDP datagrams of new clients dropped at `max_sessions`.
    pub session_limit: AtomicU64,
    /// UDP datagrams dropped because the socket buffer was full (EAGAIN) or the
    /// send failed; SCTP one-to-many messages whose send failed (association gone).
    pub send_drops: AtomicU64,
    /// SCTP messages larger than `max_message_bytes` (their association was aborted).
    pub message_too_big: AtomicU64,
}

impl ListenerStats {
    /// Connections open now (accepted minus closed).
    pub fn active(&self) -> u64 {
        self.accepted
            .load(Relaxed)
            .saturating_sub(self.closed.load(Relaxed))
    }
}

/// What every worker knows about one listener.
#[derive(Debug)]
pub struct ListenerShared {
    /// Listener name (from the config).
    pub name: Arc<str>,
    /// What connections on it do.
    pub action: Action,
    /// The listener's namespace label ("root" for the start namespace), for the
    /// PROXY v2 NETNS TLV.
    pub netns: Arc<str>,
    /// Upstreams and their socket pools (`action = "proxy"` only).
    pub upstream: Option<Arc<UpstreamSet>>,
    /// Transport protocol.
    pub proto: crate::config::Proto,
    /// UDP: largest datagram accepted (bytes).
    pub max_datagram: usize,
    /// SCTP: style, streams, largest message.
    pub sctp: SctpConfig,
    /// SCTP one-to-many proxy: who peels associations off, and in which namespace.
    pub peel: Option<PeelSource>,
    /// Its counters.
    pub stats: ListenerStats,
}

/// Where a one-to-many SCTP proxy listener's associations are peeled off: the
/// binder, inside the listener's namespace (`None`: the root namespace).
#[derive(Debug, Clone)]
pub struct PeelSource {
    /// The binder thread.
    pub binder: crate::binder::Binder,
    /// The listener's namespace file.
    pub netns: Option<std::path::PathBuf>,
}

/// A peel-off the binder finished for a worker's one-to-many session.
pub(crate) struct Peeled {
    /// The one-to-many session.
    pub conn: Key,
    /// The association.
    pub assoc: i32,
    /// The new one-to-one socket, or why there is none.
    pub result: io::Result<OwnedFd>,
}

/// Peel-offs finished by the binder, waiting for their worker (which the binder
/// wakes through its eventfd).
pub(crate) type PeelMailbox = Arc<std::sync::Mutex<Vec<Peeled>>>;

/// Counters of one worker (counts).
#[derive(Debug, Default)]
pub struct WorkerStats {
    /// SQEs submitted (io_uring) or syscalls attempted (epoll).
    pub submitted: AtomicU64,
    /// CQEs reaped (io_uring) or readiness events handled (epoll).
    pub completed: AtomicU64,
    /// Receives that found the provided-buffer ring empty (ENOBUFS, io_uring only).
    pub enobufs: AtomicU64,
    /// Sessions open now on this worker (a gauge).
    pub sessions: AtomicU64,
}

/// A message from the supervisor to a worker.
#[derive(Debug)]
pub enum Command {
    /// Start accepting on `fd` (a listening, non-blocking socket) for listener `id`.
    AddListener {
        /// Supervisor's id of the listener, unique for the process lifetime.
        id: u64,
        /// The worker's own SO_REUSEPORT socket of this listener.
        fd: OwnedFd,
        /// Name, action and counters.
        shared: Arc<ListenerShared>,
    },
    /// Stop accepting on listener `id` and close its socket; connections go on.
    RemoveListener {
        /// The listener's id.
        id: u64,
    },
    /// Close every listener and connection and end the thread.
    Shutdown,
}

/// The supervisor's handle to a running worker.
pub struct WorkerHandle {
    tx: mpsc::Sender<Command>,
    wake: Arc<OwnedFd>,
    join: Option<thread::JoinHandle<()>>,
    /// The worker's counters.
    pub stats: Arc<WorkerStats>,
    /// Index of the worker (0-based).
    pub index: usize,
}

impl WorkerHandle {
    /// Sends `cmd` and wakes the worker (eventfd write).
    ///
    /// # Errors
    /// The worker thread has exited.
    pub fn send(&self, cmd: Command) -> io::Result<()> {
        self.tx
            .send(cmd)
            .map_err(|_| io::Error::other(format!("worker {} has exited", self.index)))?;
        wake(self.wake.as_raw_fd());
        Ok(())
    }

    /// Asks the worker to shut down and waits for its thread to end.
    pub fn shutdown(mut self) {
        let _ = self.send(Command::Shutdown);
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}

/// The CPUs this process may run on (sched_getaffinity), in order.
pub fn allowed_cpus() -> Vec<usize> {
    match nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)) {
        Ok(set) => (0..nix::sched::CpuSet::count())
            .filter(|&c| set.is_set(c).unwrap_or(false))
            .collect(),
        Err(_) => vec![],
    }
}

/// Starts `count` workers running `kind`, worker `i` pinned to the `i`-th allowed CPU
/// (wrapping around).
///
/// # Errors
/// A ring or epoll instance could not be created, or a thread could not be spawned;
/// workers already started are shut down.
pub fn spawn_workers(count: usize, kind: DriverKind) -> io::Result<Vec<WorkerHandle>> {
    let cpus = allowed_cpus();
    let mut out = Vec::with_capacity(count);
    for index in 0..count {
        let cpu = if cpus.is_empty() {
            None
        } else {
            Some(cpus[index % cpus.len()])
        };
        match spawn_one(index, cpu, kind) {
            Ok(h) => out.push(h),
            Err(e) => {
                for h in out {
                    h.shutdown();
                }
                return Err(e);
            }
        }
    }
    Ok(out)
}

fn spawn_one(index: usize, cpu: Option<usize>, kind: DriverKind) -> io::Result<WorkerHandle> {
    let (tx, rx) = mpsc::channel();
    let wake = Arc::new(eventfd()?);
    let stats = Arc::new(WorkerStats::default());
    let (ready_tx, ready_rx) = mpsc::sync_channel::<io::Result<()>>(1);
    let (w2, s2) = (wake.clone(), stats.clone());
    let join = thread::Builder::new()
        .name(format!("ringress-w{index}"))
        .spawn(move || {
            if let Some(cpu) = cpu {
                let mut set = nix::sched::CpuSet::new();
                if set.set(cpu).is_ok() {
                    if let Err(e) =
                        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
                    {
                        tracing::warn!(worker = index, cpu, error = %e, "cannot pin worker");
                    }
                }
            }
            let ctx = WorkerCtx {
                index,
                rx,
                wake: w2,
                stats: s2,
                peeled: Default::default(),
            };
            match kind {
                #[cfg(feature = "uring")]
                DriverKind::Uring => uring::run(ctx, ready_tx),
                #[cfg(not(feature = "uring"))]
                DriverKind::Uring => {
                    let _ = ready_tx.send(Err(io::Error::other("built without io_uring")));
                }
                DriverKind::Epoll => epoll::run(ctx, ready_tx),
            }
        })?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok(WorkerHandle {
            tx,
            wake,
            join: Some(join),
            stats,
            index,
        }),
        Ok(Err(e)) => {
            let _ = join.join();
            Err(e)
        }
        Err(_) => {
            let _ = join.join();
            Err(io::Error::other(format!("worker {index} died at start")))
        }
    }
}

/// Reports a worker's setup result on `ready` (the supervisor waits for it), then
/// runs the worker if it was set up.
pub(crate) fn serve<W>(
    made: io::Result<W>,
    ready: mpsc::SyncSender<io::Result<()>>,
    run: impl FnOnce(W),
) {
    match made {
        Ok(w) => {
            let _ = ready.send(Ok(()));
            run(w);
        }
        Err(e) => {
            let _ = ready.send(Err(e));
        }
    }
}

/// What a worker thread gets from the supervisor.
pub(crate) struct WorkerCtx {
    pub index: usize,
    pub rx: mpsc::Receiver<Command>,
    pub wake: Arc<OwnedFd>,
    pub stats: Arc<WorkerStats>,
    /// Peel-offs finished by the binder for this worker.
    pub peeled: PeelMailbox,
}

impl WorkerCtx {
    /// Hands session `k`'s peel-off requests to the binder; each answer lands in
    /// this worker's mailbox and wakes it. A request that cannot even be made is
    /// finished at once (the session reads again).
    pub fn request_peel_offs(&self, k: Key, c: &mut Conn) {
        let assocs = c.take_peel_offs();
        for assoc in assocs {
            let dup = c.legs[0].fd.as_ref().map(OwnedFd::try_clone);
            match (&c.listener.peel, dup) {
                (Some(src), Some(Ok(fd))) => {
                    let (mailbox, wake_fd) = (self.peeled.clone(), self.wake.clone());
                    src.binder.peel_off(
                        src.netns.clone(),
                        fd,
                        assoc,
                        Box::new(move |result| {
                            mailbox
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .push(Peeled {
                                    conn: k,
                                    assoc,
                                    result,
                                });
                            wake(wake_fd.as_raw_fd());
                        }),
                    );
                }
                (_, dup) => {
                    tracing::warn!(listener = %c.listener.name, assoc, error = ?dup.map(|d| d.err()),
                        "cannot ask for an SCTP peel-off; aborting the association");
                    c.peel_finished(Some(assoc));
                }
            }
        }
    }

    /// Ends the peel-offs the binder finished: tells each one-to-many session in
    /// `slab` (whose [`Conn`] `conn` gives), which may read again, and opens a
    /// session for each new socket. Returns `(one-to-many session, new session)`
    /// pairs for the driver to add and drive. A socket whose one-to-many session
    /// has gone (listener removed) is closed, which aborts its association.
    pub fn finish_peel_offs<T>(
        &self,
        slab: &mut Slab<T>,
        conn: impl Fn(&mut T) -> &mut Conn,
    ) -> Vec<(Key, Option<Conn>)> {
        let done = std::mem::take(&mut *self.peeled.lock().unwrap_or_else(|p| p.into_inner()));
        let mut out = Vec::with_capacity(done.len());
        for p in done {
            let Some(c) = slab.get_mut(p.conn).map(&conn) else {
                continue;
            };
            c.peel_finished(p.result.as_ref().err().map(|_| p.assoc));
            let shared = c.listener.clone();
            let new = match p.result {
                Ok(fd) => Some(Conn::open_peeled(fd, shared, &self.stats)),
                Err(e) => {
                    tracing::warn!(listener = %shared.name, error = %e, "SCTP peel-off failed");
                    None
                }
            };
            out.push((p.conn, new));
        }
        out
    }
}

/// A slot-map key: index in the low 32 bits, generation above, so that a stale
/// completion for a reused slot is recognised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Key {
    pub idx: u32,
    pub gen: u32,
}

/// A slab of values addressed by [`Key`]; freed slots are reused with a new generation.
pub(crate) struct Slab<T> {
    entries: Vec<(u32, Option<T>)>,
    free: Vec<u32>,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Slab {
            entries: Vec::new(),
            free: Vec::new(),
        }
    }
}

/// Generations are kept to 24 bits so that a key fits in user_data with a kind byte.
pub(crate) const GEN_MASK: u32 = 0x00ff_ffff;

impl<T> Slab<T> {
    pub fn insert(&mut self, v: T) -> Key {
        if let Some(idx) = self.free.pop() {
            let e = &mut self.entries[idx as usize];
            e.0 = (e.0 + 1) & GEN_MASK;
            e.1 = Some(v);
            Key { idx, gen: e.0 }
        } else {
            self.entries.push((0, Some(v)));
            Key {
                idx: (self.entries.len() - 1) as u32,
                gen: 0,
            }
        }
    }

    pub fn get_mut(&mut self, k: Key) -> Option<&mut T> {
        match self.entries.get_mut(k.idx as usize) {
            Some((g, Some(v))) if *g == k.gen => Some(v),
            _ => None,
        }
    }

    pub fn remove(&mut self, k: Key) -> Option<T> {
        match self.entries.get_mut(k.idx as usize) {
            Some((g, slot @ Some(_))) if *g == k.gen => {
                self.free.push(k.idx);
                slot.take()
            }
            _ => None,
        }
    }

    pub fn keys(&self) -> Vec<Key> {
        self.entries
            .iter()
            .enumerate()
            .filter(|(_, (_, v))| v.is_some())
            .map(|(i, (g, _))| Key {
                idx: i as u32,
                gen: *g,
            })
            .collect()
    }
}

/// Packs a key and an op kind into a 64-bit token (io_uring user_data, epoll data):
/// bits 0..32 index, 32..56 generation, 56..64 kind.
pub(crate) fn token(kind: u8, k: Key) -> u64 {
    (kind as u64) << 56 | ((k.gen & GEN_MASK) as u64) << 32 | k.idx as u64
}

/// Unpacks [`token`].
pub(crate) fn untoken(t: u64) -> (u8, Key) {
    (
        (t >> 56) as u8,
        Key {
            idx: t as u32,
            gen: ((t >> 32) as u32) & GEN_MASK,
        },
    )
}

/// One socket of a session: the client's or the upstream's.
pub(crate) struct Leg {
    /// The socket; `None` for an upstream not yet opened.
    pub fd: Option<OwnedFd>,
    /// Bytes being sent (handed to the kernel, or being written by epoll), from `sent`.
    pub sending: Vec<u8>,
    pub sent: usize,
    pub write_shut: bool,
    /// A connect is in progress: no send or receive may start yet.
    pub connecting: bool,
    /// The connect destination; boxed so that its address stays put while an
    /// io_uring CONNECT SQE points at it.
    pub dest: Option<Box<socket2::SockAddr>>,
    /// SCTP: the socket carries whole messages; its recvmsg/sendmsg headers and
    /// control buffers, boxed so that io_uring SQEs may point at them.
    pub msg: Option<Box<MsgSpace>>,
    /// SCTP: the message being sent (stays put until its send completes).
    pub sending_msg: Option<OutMessage>,
    /// Sends in a row that found no room (EAGAIN), and since when.
    pub backoff: SendBackoff,
}

impl Leg {
    fn new(fd: Option<OwnedFd>) -> Leg {
        Leg {
            fd,
            sending: Vec::new(),
            sent: 0,
            write_shut: false,
            connecting: false,
            dest: None,
            msg: None,
            sending_msg: None,
            backoff: SendBackoff::default(),
        }
    }

    /// The raw fd, when the leg is open.
    pub fn raw(&self) -> Option<RawFd> {
        self.fd.as_ref().map(AsRawFd::as_raw_fd)
    }

    /// Whether sends and receives may be issued (open, and not connecting).
    pub fn ready(&self) -> bool {
        self.fd.is_some() && !self.connecting
    }
}

/// What [`Conn::start_connect`] got.
pub(crate) enum ConnectStart {
    /// The socket is in the upstream leg; issue the connect to `leg.dest`.
    Go,
    /// The namespace's socket pool is empty; retry when the worker is woken.
    Wait,
    /// No socket could be had; the session was told (Error completion).
    Failed,
}

/// One session: its sockets, its protocol state machine and the driver-neutral
/// I/O state. Both drivers use it, so the bookkeeping is the same for both.
pub(crate) struct Conn {
    pub legs: [Leg; 2],
    pub session: Session,
    pub io: SessionIo,
    pub listener: Arc<ListenerShared>,
    pub failed: bool,
    /// The upstream address chosen for this session.
    pub upstream: Option<SocketAddr>,
    /// The earliest deadline registered in the worker's [`Timers`] for this session.
    pub timer: Option<Instant>,
    /// The owning worker's counters (its open-sessions gauge).
    worker: Arc<WorkerStats>,
    /// Waiting in the worker's list of sessions for an upstream socket.
    parked: bool,
    /// The session of a whole one-to-many SCTP socket (not one connection: it is
    /// not counted as accepted, and its associations are counted instead).
    pub many: bool,
}

impl Conn {
    /// Wraps a freshly accepted socket and runs the session's `on_open`.
    pub fn open(fd: OwnedFd, listener: Arc<ListenerShared>, worker: &Arc<WorkerStats>) -> Conn {
        Conn::open_as(fd, listener, worker, Origin::Accepted)
    }

    /// Wraps an association peeled off a one-to-many SCTP socket (one-to-many
    /// proxy): a session of its own, counted as accepted.
    pub fn open_peeled(
        fd: OwnedFd,
        listener: Arc<ListenerShared>,
        worker: &Arc<WorkerStats>,
    ) -> Conn {
        Conn::open_as(fd, listener, worker, Origin::Peeled)
    }

    /// Wraps a one-to-many SCTP listener socket: one session for all of its
    /// associations.
    pub fn open_many(
        fd: OwnedFd,
        listener: Arc<ListenerShared>,
        worker: &Arc<WorkerStats>,
    ) -> Conn {
        Conn::open_as(fd, listener, worker, Origin::Many)
    }

    fn open_as(
        fd: OwnedFd,
        listener: Arc<ListenerShared>,
        worker: &Arc<WorkerStats>,
        how: Origin,
    ) -> Conn {
        let many = how == Origin::Many;
        if !many {
            listener.stats.accepted.fetch_add(1, Relaxed);
            worker.sessions.fetch_add(1, Relaxed);
        }
        let sctp = listener.proto == Proto::Sctp;
        if !sctp {
            set_nodelay(fd.as_raw_fd());
        }
        let info = if Session::needs_info(&listener.action) {
            let s = socket2::SockRef::from(&fd);
            ConnInfo {
                peer: s.peer_addr().ok().and_then(|a| a.as_socket()),
                local: s.local_addr().ok().and_then(|a| a.as_socket()),
            }
        } else {
            ConnInfo {
                peer: None,
                local: None,
            }
        };
        let session = Session::for_listener(&listener.action, listener.proto, &listener.sctp, how);
        let mut client = Leg::new(Some(fd));
        if sctp {
            client.msg = Some(MsgSpace::new());
        }
        let mut c = Conn {
            legs: [client, Leg::new(None)],
            session,
            io: SessionIo::default(),
            listener,
            failed: false,
            upstream: None,
            timer: None,
            worker: worker.clone(),
            parked: false,
            many,
        };
        c.session.on_open(
            &c.listener.action,
            &info,
            &c.listener.netns,
            &mut c.io,
            Instant::now(),
        );
        c
    }

    /// Reports a completion other than a send on `side` to the session, counting
    /// bytes and upstream failures (and logging those, naming listener and upstream).
    pub fn complete(&mut self, side: Side, c: Completion<'_>) {
        self.account(side, &c);
        self.session
            .on_complete(side, c, &mut self.io, Instant::now());
        self.take_sctp_events();
    }

    /// Counts completion `c` on `side` (bytes, errors, upstream failures) before
    /// the session sees it.
    fn account(&mut self, side: Side, c: &Completion<'_>) {
        let st = &self.listener.stats;
        match c {
            Completion::Recv(d) if side == Side::Client => {
                st.bytes_in.fetch_add(d.len() as u64, Relaxed);
            }
            Completion::Message(p) if side == Side::Client && !p.notification => {
                st.bytes_in.fetch_add(p.data.len() as u64, Relaxed);
            }
            Completion::Error(_) if self.many => {}
            &Completion::Error(errno) => {
                self.failed = true;
                if side == Side::Upstream && self.legs[1].connecting {
                    self.upstream_failed(errno);
                } else if errno == libc::ECONNRESET || errno == libc::EPIPE {
                    st.resets.fetch_add(1, Relaxed);
                }
            }
            Completion::Timeout if self.legs[1].connecting || self.awaiting_upstream() => {
                self.failed = true;
                self.upstream_failed(libc::ETIMEDOUT);
            }
            Completion::Connected => {
                self.legs[1].connecting = false;
                self.legs[1].dest = None;
            }
            _ => {}
        }
    }

    /// Counts what an SCTP session noted: messages over the limit, and (one-to-many)
    /// associations that came up or ended.
    fn take_sctp_events(&mut self) {
        let st = &self.listener.stats;
        let io = &mut self.io;
        if io.too_big > 0 {
            st.message_too_big
                .fetch_add(u64::from(std::mem::take(&mut io.too_big)), Relaxed);
        }
        if io.assoc_up > 0 {
            st.accepted
                .fetch_add(u64::from(std::mem::take(&mut io.assoc_up)), Relaxed);
        }
        if io.assoc_down > 0 {
            st.closed
                .fetch_add(u64::from(std::mem::take(&mut io.assoc_down)), Relaxed);
        }
        if io.dropped > 0 {
            st.send_drops
                .fetch_add(u64::from(std::mem::take(&mut io.dropped)), Relaxed);
        }
        if std::mem::take(&mut io.lost) {
            st.resets.fetch_add(1, Relaxed);
            self.failed = true;
        }
    }

    /// Whether `side` carries SCTP messages (recvmsg/sendmsg) instead of bytes.
    pub fn is_message_leg(&self, side: Side) -> bool {
        self.legs[side.index()].msg.is_some()
    }

    /// Reports a receive on an SCTP leg: `n` bytes of `data` with recvmsg `flags`
    /// (MSG_EOR, MSG_NOTIFICATION) and `info`; 0 bytes is the end of the association.
    pub fn complete_message(&mut self, side: Side, data: &[u8], flags: i32, info: MsgInfo) {
        if data.is_empty() {
            self.complete(side, Completion::Eof);
            return;
        }
        self.complete(
            side,
            Completion::Message(Piece {
                data,
                info,
                eor: flags & libc::MSG_EOR != 0,
                notification: flags & crate::sctp::MSG_NOTIFICATION != 0,
            }),
        );
    }

    #[cfg(feature = "uring")]
    /// The recvmsg header of SCTP leg `side`, for a receive of up to `len` bytes
    /// into `buf` (null: io_uring picks a provided buffer). Valid until the leg goes.
    pub fn recv_header(
        &mut self,
        side: Side,
        buf: *mut u8,
        len: usize,
    ) -> Option<*mut libc::msghdr> {
        let m = self.legs[side.index()].msg.as_mut()?;
        Some(m.prepare_recv(buf, len))
    }

    #[cfg(feature = "uring")]
    /// `(flags, info)` of the last receive on SCTP leg `side`.
    pub fn received(&self, side: Side) -> (i32, MsgInfo) {
        self.legs[side.index()]
            .msg
            .as_ref()
            .map_or((0, MsgInfo::default()), |m| m.received())
    }

    /// Calls `f` with the next message to send on SCTP leg `side` (its bytes,
    /// stream/PPID/association, `snd_flags`) and the leg's header space, taking it
    /// from the session's queue if none is being sent. The message stays put until
    /// [`Conn::message_sent`] or [`Conn::send_failed`]. `None`: nothing to send or
    /// the leg is not ready.
    pub fn with_next_message<R>(
        &mut self,
        side: Side,
        f: impl FnOnce(&[u8], MsgInfo, u16, &mut MsgSpace) -> R,
    ) -> Option<R> {
        let i = side.index();
        let leg = &mut self.legs[i];
        if !leg.ready() {
            return None;
        }
        if leg.sending_msg.is_none() {
            let io = &mut self.io.legs[i];
            let m = io.msgs.pop_front()?;
            io.msg_bytes -= m.data.len();
            io.in_flight = m.data.len();
            leg.sending_msg = Some(m);
        }
        let (Some(m), Some(space)) = (&leg.sending_msg, leg.msg.as_mut()) else {
            return None;
        };
        Some(f(&m.data, m.info, m.flags, space))
    }

    /// The message from [`Conn::with_next_message`] on `side` was sent whole.
    pub fn message_sent(&mut self, side: Side) {
        let i = side.index();
        self.legs[i].backoff.reset();
        let n = self.legs[i].sending_msg.take().map_or(0, |m| m.data.len());
        self.io.legs[i].in_flight = 0;
        if side == Side::Client {
            self.listener.stats.bytes_out.fetch_add(n as u64, Relaxed);
        }
        self.session
            .on_complete(side, Completion::Sent(n), &mut self.io, Instant::now());
        self.take_sctp_events();
    }

    /// A send on `side` found no room (EAGAIN; nothing was sent). Returns how long
    /// to wait before the same send is tried again: 1 ms, doubling up to
    /// [`SEND_RETRY_MAX_MS`], or zero when the send queue changed and the next send
    /// can go now. On a one-to-many socket the room is shared by every association
    /// (net.sctp.sndbuf_policy 0): an association whose peer has not taken a
    /// message for [`SEND_STALL_LIMIT`] would hold up all the others, so it is
    /// aborted (SCTP_ABORT) and its queued messages dropped and counted.
    pub fn send_would_block(&mut self, side: Side) -> Duration {
        let now = Instant::now();
        let backoff = &mut self.legs[side.index()].backoff;
        let wait = backoff.no_room(now);
        if self.many && backoff.stalled(now) && self.send_stalled(side) {
            return Duration::ZERO;
        }
        wait
    }

    /// The message being sent on one-to-many leg `side` found no room for
    /// [`SEND_STALL_LIMIT`]: its association is aborted (an SCTP_ABORT goes first)
    /// and every message queued for it dropped and counted. `false` if nothing
    /// was being sent.
    pub fn send_stalled(&mut self, side: Side) -> bool {
        let i = side.index();
        let Some(head) = self.legs[i].sending_msg.take() else {
            return false;
        };
        let assoc = head.info.assoc;
        let dropped = 1 + self.io.abort_association(side, assoc);
        self.io.legs[i].in_flight = 0;
        self.legs[i].backoff.reset();
        self.listener
            .stats
            .send_drops
            .fetch_add(dropped as u64, Relaxed);
        tracing::warn!(listener = %self.listener.name, assoc, dropped,
            "SCTP association took no data for {SEND_STALL_LIMIT:?}; aborted so the others on its socket can go on");
        true
    }

    /// Associations the session asked to peel off (one-to-many proxy).
    pub fn take_peel_offs(&mut self) -> Vec<i32> {
        std::mem::take(&mut self.io.peel_off)
    }

    /// One peel-off asked for by this session ended (the new session, if any, is
    /// the driver's): the one-to-many socket may be read again when none is left.
    /// `failed`: the association that could not be peeled off (it is aborted).
    pub fn peel_finished(&mut self, failed: Option<i32>) {
        if let Session::Sctp(s) = &mut self.session {
            s.on_peeled(failed, &mut self.io);
        }
    }

    /// A send on `side` failed with `errno`: the session decides what is lost
    /// ([`Session::on_send_failed`]); dropped messages are counted, an error that
    /// ends the session is counted as [`Conn::complete`] would.
    pub fn send_failed(&mut self, side: Side, errno: i32) {
        self.legs[side.index()].sending_msg = None;
        match self
            .session
            .on_send_failed(side, errno, &mut self.io, Instant::now())
        {
            SendFailed::Dropped(n) => {
                self.listener
                    .stats
                    .send_drops
                    .fetch_add(u64::from(n), Relaxed);
                if self.many {
                    tracing::debug!(listener = %self.listener.name, errno, "SCTP one-to-many send failed; message dropped");
                }
            }
            SendFailed::Ended => self.account(side, &Completion::Error(errno)),
        }
        self.take_sctp_events();
    }

    /// Whether the session asked for an upstream it does not have yet.
    fn awaiting_upstream(&self) -> bool {
        match &self.session {
            Session::Proxy(p) => !p.connected(),
            Session::Sctp(s) => s.is_proxy() && !s.connected(),
            _ => false,
        }
    }

    fn upstream_failed(&mut self, errno: i32) {
        let st = &self.listener.stats;
        match errno {
            libc::ETIMEDOUT => st.upstream_timeouts.fetch_add(1, Relaxed),
            libc::ECONNREFUSED => st.upstream_refused.fetch_add(1, Relaxed),
            _ => st.upstream_errors.fetch_add(1, Relaxed),
        };
        // Back off from the upstream only if it was contacted: not when the session
        // never got a socket to try it with.
        if self.legs[1].fd.is_some() {
            if let (Some(set), Some(addr)) = (&self.listener.upstream, self.upstream) {
                set.mark_down(addr);
            }
        }
        tracing::warn!(
            listener = %self.listener.name,
            upstream = ?self.upstream,
            error = %std::io::Error::from_raw_os_error(errno),
            "upstream connect failed; closing the client"
        );
    }

    /// Reports that `n` bytes of [`Conn::next_send`]'s slice on `side` were sent.
    pub fn sent(&mut self, side: Side, n: usize) {
        let leg = &mut self.legs[side.index()];
        leg.backoff.reset();
        leg.sent += n;
        if leg.sent >= leg.sending.len() {
            leg.sending.clear();
            leg.sent = 0;
        }
        self.io.legs[side.index()].in_flight = leg.sending.len() - leg.sent;
        if side == Side::Client {
            self.listener.stats.bytes_out.fetch_add(n as u64, Relaxed);
        }
        self.session
            .on_complete(side, Completion::Sent(n), &mut self.io, Instant::now());
    }

    /// The bytes to send next on `side`, if any: the rest of a short send, else
    /// everything the session queued since. The slice stays valid and unchanged
    /// until [`Conn::sent`] or the session is dropped, so io_uring may point an SQE
    /// at it. `None` while the leg is not [`Leg::ready`].
    pub fn next_send(&mut self, side: Side) -> Option<&[u8]> {
        let i = side.index();
        let leg = &mut self.legs[i];
        if !leg.ready() {
            return None;
        }
        if leg.sending.is_empty() {
            let io = &mut self.io.legs[i];
            if io.out.is_empty() {
                return None;
            }
            std::mem::swap(&mut leg.sending, &mut io.out);
            leg.sent = 0;
            io.in_flight = leg.sending.len();
        }
        Some(&leg.sending[leg.sent..])
    }

    /// Whether the session asked for a receive on `side` (and the leg is ready);
    /// clears the request.
    pub fn take_recv_request(&mut self, side: Side) -> bool {
        self.legs[side.index()].ready() && std::mem::take(&mut self.io.legs[side.index()].want_recv)
    }

    /// Whether a receive on `side` is wanted (without clearing the request).
    pub fn wants_recv(&self, side: Side) -> bool {
        self.legs[side.index()].ready() && self.io.legs[side.index()].want_recv
    }

    /// Shuts down the write side of every leg that asked for it and has drained.
    /// Errors (peer gone) are ignored: the next operation reports them.
    pub fn shutdown_drained(&mut self) {
        for (leg, io) in self.legs.iter_mut().zip(&self.io.legs) {
            if io.shutdown_write && !leg.write_shut && leg.ready() && io.unsent() == 0 {
                leg.write_shut = true;
                if let Some(fd) = leg.raw() {
                    // SAFETY: shutdown(2) on an fd we own; no pointers.
                    unsafe { libc::shutdown(fd, libc::SHUT_WR) };
                }
            }
        }
    }

    /// Whether the session is done: close asked for and nothing left to send on any
    /// ready leg, or aborted, or failed.
    pub fn finished(&self) -> bool {
        if self.io.abort || self.failed {
            return true;
        }
        self.io.close
            && self
                .legs
                .iter()
                .zip(&self.io.legs)
                .all(|(leg, io)| !leg.ready() || io.unsent() == 0)
    }

    /// Sets SO_LINGER {on, 0} on every open leg when the session aborted, so that
    /// closing them sends RST (the peers see ECONNRESET, not a clean EOF).
    pub fn linger_if_aborting(&mut self) {
        if self.io.abort || self.failed {
            for leg in &self.legs {
                if let Some(fd) = &leg.fd {
                    let _ = socket2::SockRef::from(fd).set_linger(Some(Duration::ZERO));
                }
            }
        }
    }

    /// Marks the session as waiting for an upstream socket; `true` if it was not
    /// already, so that the driver lists it once.
    pub fn park(&mut self) -> bool {
        !std::mem::replace(&mut self.parked, true)
    }

    /// The driver took the session off its waiting list (to drive it again).
    pub fn unpark(&mut self) {
        self.parked = false;
    }

    /// Whether the session asked to connect its upstream; clears the request.
    pub fn take_connect_request(&mut self) -> bool {
        std::mem::take(&mut self.io.connect)
    }

    /// Picks an upstream and gets a socket for it: made here for the root namespace
    /// (socket(2) is non-blocking), taken from the binder-filled pool otherwise.
    /// On `Wait` the worker must retry after its next wake-up.
    pub fn start_connect(&mut self, wake: &Arc<OwnedFd>) -> ConnectStart {
        let Some(set) = self.listener.upstream.clone() else {
            self.complete(Side::Upstream, Completion::Error(libc::EINVAL));
            return ConnectStart::Failed;
        };
        let addr = *self.upstream.get_or_insert_with(|| set.pick());
        match set.socket_for(addr, wake) {
            upstream::GetSocket::Ready(fd) => {
                let sctp = self.listener.proto == Proto::Sctp;
                if !sctp {
                    set_nodelay(fd.as_raw_fd());
                }
                let leg = &mut self.legs[1];
                if sctp {
                    leg.msg = Some(MsgSpace::new());
                }
                leg.fd = Some(fd);
                leg.connecting = true;
                leg.dest = Some(Box::new(addr.into()));
                ConnectStart::Go
            }
            upstream::GetSocket::Wait => {
                // Ask again when the worker is woken by the refill.
                self.io.connect = true;
                ConnectStart::Wait
            }
            upstream::GetSocket::Failed(errno) => {
                self.legs[1].connecting = true;
                self.complete(Side::Upstream, Completion::Error(errno));
                self.legs[1].connecting = false;
                ConnectStart::Failed
            }
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if self.many {
            // A one-to-many echo socket takes its associations with it. (For
            // proxy, the peeled-off sessions count themselves.)
            let s = &self.listener.stats;
            if self.listener.peel.is_none() {
                s.closed.fetch_add(s.active(), Relaxed);
            }
            return;
        }
        let s = &self.listener.stats;
        s.closed.fetch_add(1, Relaxed);
        self.worker.sessions.fetch_sub(1, Relaxed);
        if self.failed {
            s.conn_errors.fetch_add(1, Relaxed);
        }
    }
}

/// Session deadlines of one worker, earliest first.
///
/// A session's deadline may move; the heap keeps the earliest registered time per
/// session ([`Conn::timer`]) and a popped entry is checked against the session's
/// current deadline, so moving a deadline later costs nothing until it fires.
#[derive(Default)]
pub(crate) struct Timers {
    heap: std::collections::BinaryHeap<std::cmp::Reverse<(Instant, u32, u32)>>,
}

impl Timers {
    /// Registers `c`'s current deadline if it is earlier than what is registered.
    pub fn sync(&mut self, k: Key, c: &mut Conn) {
        if let Some(d) = c.io.deadline {
            if c.timer.is_none_or(|t| d < t) {
                c.timer = Some(d);
                self.heap.push(std::cmp::Reverse((d, k.idx, k.gen)));
            }
        }
    }

    /// Time until the earliest registered deadline, if any.
    pub fn next_wait(&self, now: Instant) -> Option<Duration> {
        self.heap
            .peek()
            .map(|std::cmp::Reverse((t, _, _))| t.saturating_duration_since(now))
    }

    /// Pops the entries due at `now`; returns the keys of sessions whose current
    /// deadline has passed (their [`Completion::Timeout`] is due), re-registering
    /// those whose deadline moved later.
    pub fn expired<T>(
        &mut self,
        now: Instant,
        slab: &mut Slab<T>,
        conn: impl Fn(&mut T) -> &mut Conn,
    ) -> Vec<Key> {
        let mut due = Vec::new();
        while let Some(std::cmp::Reverse((t, idx, gen))) = self.heap.peek().copied() {
            if t > now {
                break;
            }
            self.heap.pop();
            let k = Key { idx, gen };
            let Some(c) = slab.get_mut(k).map(&conn) else {
                continue;
            };
            if c.timer != Some(t) {
                continue; // superseded by an earlier registration
            }
            c.timer = None;
            match c.io.deadline {
                Some(d) if d <= now => {
                    c.io.deadline = None;
                    due.push(k);
                }
                Some(d) => {
                    c.timer = Some(d);
                    self.heap.push(std::cmp::Reverse((d, idx, gen)));
                }
                None => {}
            }
        }
        due
    }
}

fn set_nodelay(fd: RawFd) {
    let one: libc::c_int = 1;
    // SAFETY: setsockopt with a valid int pointer and its size; fd is an open socket.
    unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// Classifies an accept errno: `true` when accepting should pause for
/// [`ACCEPT_PAUSE_MS`] (out of fds or memory), `false` when it should simply go on.
pub(crate) fn accept_error_pauses(errno: i32) -> bool {
    matches!(
        errno,
        libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM
    )
}

/// Whether an accept errno is routine (re-arm silently).
pub(crate) fn accept_error_benign(errno: i32) -> bool {
    matches!(
        errno,
        libc::EINTR | libc::ECONNABORTED | libc::EAGAIN | libc::EPROTO | libc::EPERM
    )
}

/// Listener table of a worker, by the supervisor's listener id.
pub(crate) type ListenerIds = HashMap<u64, Key>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slab_generations_reject_stale_keys() {
        let mut s = Slab::default();
        let a = s.insert(1);
        assert_eq!(s.remove(a), Some(1));
        let b = s.insert(2);
        assert_eq!(a.idx, b.idx);
        assert!(s.get_mut(a).is_none());
        assert_eq!(s.get_mut(b), Some(&mut 2));
        let (kind, k) = untoken(token(7, b));
        assert_eq!((kind, k), (7, b));
    }
}
